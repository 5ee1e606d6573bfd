//! The `polyhub` binary as an operator meets it: spawned as a process, observed through its exit
//! code, its one-line errors and its `MQTT listening on <addr>` log line.
//!
//! Every wait is bounded; a hung child is killed when its handle is dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use polyhub_testkit::free_port;
use polyhub_testkit::process::{PolyhubProcess, TIMEOUT, finish, polyhub_command};

const POLYHUB: &str = env!("CARGO_BIN_EXE_polyhub");

/// How quickly a signalled polyhub must be gone.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(5);

/// `polyhub` with `args`, run in `dir` with a clean environment.
fn polyhub(dir: &Path, args: &[&str]) -> Command {
    polyhub_command(POLYHUB, dir, args)
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The single error line of a failed start, checking that it is the only one.
fn sole_error_line(output: &Output) -> String {
    let stderr = stderr_of(output);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "expected one error line in:\n{stderr}");
    errors[0].to_owned()
}

#[test]
fn starts_on_port_zero_and_reports_the_real_address() {
    let dir = tempfile::tempdir().unwrap();
    let mut polyhub = PolyhubProcess::start(polyhub(
        dir.path(),
        &["run", "--mqtt-listen", "127.0.0.1:0"],
    ));
    let address = polyhub.listening_address("MQTT");
    assert_eq!(address.ip().to_string(), "127.0.0.1");
    assert_ne!(address.port(), 0);
    TcpStream::connect_timeout(&address, TIMEOUT).expect("the reported address accepts TCP");
    // The default data directory is created relative to the working directory.
    assert!(dir.path().join("polyhub-data").is_dir());
}

#[test]
fn sigterm_shuts_down_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let mut polyhub = PolyhubProcess::start(polyhub(
        dir.path(),
        &["run", "--mqtt-listen", "127.0.0.1:0"],
    ));
    polyhub.listening_address("MQTT");
    let (status, took) = polyhub.stop_with("TERM", SHUTDOWN_LIMIT);
    assert_eq!(status.code(), Some(0), "log:\n{}", polyhub.log());
    assert!(took < SHUTDOWN_LIMIT);
}

#[test]
fn sigint_shuts_down_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let mut polyhub = PolyhubProcess::start(polyhub(
        dir.path(),
        &["run", "--mqtt-listen", "127.0.0.1:0"],
    ));
    polyhub.listening_address("MQTT");
    let (status, _) = polyhub.stop_with("INT", SHUTDOWN_LIMIT);
    assert_eq!(status.code(), Some(0), "log:\n{}", polyhub.log());
}

#[test]
fn port_in_use_is_one_line_and_a_runtime_failure() {
    let dir = tempfile::tempdir().unwrap();
    let occupant = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = occupant.local_addr().unwrap().to_string();
    let output = finish(polyhub(dir.path(), &["run", "--mqtt-listen", &address]));
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        sole_error_line(&output),
        format!("error: cannot listen for MQTT on {address}: address already in use")
    );
}

#[test]
fn unknown_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("polyhub.toml"),
        "[mqtt]\nlisen = \"127.0.0.1:1883\"\n",
    )
    .unwrap();
    let output = finish(polyhub(dir.path(), &["run", "--config", "polyhub.toml"]));
    assert_eq!(output.status.code(), Some(2));
    // Nothing else is printed before the configuration is known to be good.
    assert_eq!(
        stderr_of(&output),
        "error: config file polyhub.toml: unknown field `lisen` in [mqtt], expected one of \
         `listen`, `tcp_nodelay`, `tls`, `limits`, `persistence` (line 2, column 1)\n"
    );
}

#[test]
fn invalid_toml_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.toml"), "[mqtt\nlisten = 1\n").unwrap();
    let output = finish(polyhub(dir.path(), &["run", "--config", "bad.toml"]));
    assert_eq!(output.status.code(), Some(2));
    let stderr = stderr_of(&output);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: config file bad.toml: ") && stderr.contains("line 1"),
        "{stderr}"
    );
}

#[test]
fn unreadable_config_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let output = finish(polyhub(dir.path(), &["run", "--config", "absent.toml"]));
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        stderr_of(&output),
        "error: cannot read config file absent.toml: no such file or directory\n"
    );

    std::fs::create_dir(dir.path().join("a-directory.toml")).unwrap();
    let output = finish(polyhub(
        dir.path(),
        &["run", "--config", "a-directory.toml"],
    ));
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        stderr_of(&output),
        "error: cannot read config file a-directory.toml: is a directory\n"
    );
}

#[test]
fn config_file_can_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("env.toml"), "[mqtt]\nport = 1\n").unwrap();
    let mut command = polyhub(dir.path(), &["run"]);
    command.env("POLYHUB_CONFIG", "env.toml");
    let output = finish(command);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        sole_error_line(&output).starts_with("error: config file env.toml: unknown field `port`")
    );
}

#[test]
fn bad_environment_value_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = polyhub(dir.path(), &["run"]);
    command.env("POLYHUB_MQTT_LISTEN", "localhost:1883");
    let output = finish(command);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        sole_error_line(&output)
            .starts_with("error: environment variable POLYHUB_MQTT_LISTEN=\"localhost:1883\""),
    );
}

#[test]
fn flags_override_environment_override_file() {
    let dir = tempfile::tempdir().unwrap();
    let [file_port, env_port, flag_port] = [free_port(), free_port(), free_port()];
    std::fs::write(
        dir.path().join("polyhub.toml"),
        format!("data_dir = \"file-data\"\n[mqtt]\nlisten = \"127.0.0.1:{file_port}\"\n"),
    )
    .unwrap();
    let expect = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));

    // File alone.
    let mut polyhub_process =
        PolyhubProcess::start(polyhub(dir.path(), &["run", "--config", "polyhub.toml"]));
    assert_eq!(polyhub_process.listening_address("MQTT"), expect(file_port));
    assert!(dir.path().join("file-data").is_dir());
    drop(polyhub_process);

    // The environment beats the file.
    let mut command = polyhub(dir.path(), &["run", "--config", "polyhub.toml"]);
    command
        .env("POLYHUB_MQTT_LISTEN", format!("127.0.0.1:{env_port}"))
        .env("POLYHUB_DATA_DIR", "env-data");
    let mut polyhub_process = PolyhubProcess::start(command);
    assert_eq!(polyhub_process.listening_address("MQTT"), expect(env_port));
    assert!(dir.path().join("env-data").is_dir());
    drop(polyhub_process);

    // Flags beat both.
    let flag_address = format!("127.0.0.1:{flag_port}");
    let mut command = polyhub(
        dir.path(),
        &[
            "run",
            "--config",
            "polyhub.toml",
            "--mqtt-listen",
            &flag_address,
            "--data-dir",
            "flag-data",
        ],
    );
    command
        .env("POLYHUB_MQTT_LISTEN", format!("127.0.0.1:{env_port}"))
        .env("POLYHUB_DATA_DIR", "env-data");
    let mut polyhub_process = PolyhubProcess::start(command);
    assert_eq!(polyhub_process.listening_address("MQTT"), expect(flag_port));
    assert!(dir.path().join("flag-data").is_dir());
}

#[test]
fn default_config_is_accepted_by_config_check() {
    let dir = tempfile::tempdir().unwrap();
    let output = finish(polyhub(dir.path(), &["config", "default"]));
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("[mqtt.limits]"), "{text}");
    std::fs::write(dir.path().join("default.toml"), &text).unwrap();

    let output = finish(polyhub(
        dir.path(),
        &["config", "check", "--config", "default.toml"],
    ));
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "default.toml: ok\n"
    );
}

#[test]
fn config_check_rejects_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tls.toml"),
        "[mqtt.tls]\nlisten = \"127.0.0.1:8883\"\ncert_file = \"absent.pem\"\nkey_file = \"absent.key\"\n",
    )
    .unwrap();
    let output = finish(polyhub(
        dir.path(),
        &["config", "check", "--config", "tls.toml"],
    ));
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        stderr_of(&output),
        "error: config file tls.toml: cannot use absent.pem: no such file\n"
    );

    let output = finish(polyhub(dir.path(), &["config", "check"]));
    assert_eq!(output.status.code(), Some(2));
    assert!(sole_error_line(&output).starts_with("error: no configuration file to check"));
}

#[test]
fn missing_tls_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let output = finish(polyhub(
        dir.path(),
        &[
            "run",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--mqtts-listen",
            "127.0.0.1:0",
            "--tls-cert",
            "absent.pem",
            "--tls-key",
            "absent.key",
        ],
    ));
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        stderr_of(&output),
        "error: MQTTS listener: cannot use absent.pem: no such file\n"
    );
}

#[test]
fn required_client_certificate_without_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let output = finish(polyhub(
        dir.path(),
        &[
            "run",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--tls-require-client-cert",
        ],
    ));
    assert_eq!(output.status.code(), Some(2));
    assert!(sole_error_line(&output).contains("require_client_cert needs ca_file"));
}

#[test]
fn tls_listener_reports_its_address() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.path().join("server.pem"), certified.cert.pem()).unwrap();
    std::fs::write(
        dir.path().join("server.key"),
        certified.signing_key.serialize_pem(),
    )
    .unwrap();
    let mut command = polyhub(dir.path(), &["run", "--mqtt-listen", "127.0.0.1:0"]);
    command
        .env("POLYHUB_MQTTS_LISTEN", "127.0.0.1:0")
        .env("POLYHUB_TLS_CERT", "server.pem")
        .env("POLYHUB_TLS_KEY", "server.key");
    let mut polyhub = PolyhubProcess::start(command);
    let mqtt = polyhub.listening_address("MQTT");
    let mqtts = polyhub.listening_address("MQTTS");
    assert_ne!(mqtt, mqtts);
    assert_ne!(mqtts.port(), 0);
    TcpStream::connect_timeout(&mqtts, TIMEOUT).expect("the TLS listener accepts TCP");
    let (status, _) = polyhub.stop_with("TERM", SHUTDOWN_LIMIT);
    assert_eq!(status.code(), Some(0), "log:\n{}", polyhub.log());
}
