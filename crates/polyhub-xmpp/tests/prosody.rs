//! The XMPP backend against a real Prosody, with a device played by slixmpp
//! (tests/xmpp_device.py).
//!
//! Needs `prosody` (apt) and slixmpp (apt `python3-slixmpp` or pip `slixmpp`). When they are
//! missing the test fails and says what to install: a skipped interop test would hide a
//! broken backend.

use std::collections::VecDeque;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use polyhub_hub::ChannelTemplates;
use polyhub_polyglot::backend::{
    BackendClient, BackendError, BackendEvent, Credentials, SendOutcome,
};
use polyhub_polyglot::registry::{ClientFactory, FactoryContext};
use polyhub_store::{
    Command, CommandState, Device, NewDevice, NewGroup, NewHub, SqliteConfig, SqliteStore, Store,
};
use polyhub_xmpp::XmppClientFactory;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const DOMAIN: &str = "localhost";
const HUB_PASSWORD: &str = "hub-secret";
/// The component the test server accepts, and its secret.
const COMPONENT: &str = "hub.localhost";
const COMPONENT_SECRET: &str = "component-secret";
/// Bound on every wait, so a broken exchange fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(10);

/// A Prosody on free loopback ports (client and component listeners), in its own temporary
/// folder; killed on drop.
struct Prosody {
    child: Child,
    port: u16,
    component_port: u16,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Prosody {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // The server's side of a failed exchange, before its folder is deleted.
            eprintln!("--- prosody logs ---\n{}", self.logs());
        }
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("no free loopback port")
}

impl Prosody {
    fn start() -> Prosody {
        assert!(
            on_path("prosody") && on_path("prosodyctl"),
            "prosody is not installed: this test needs it (apt-get install -y --no-install-recommends prosody)"
        );
        let dir = tempfile::tempdir().expect("temporary folder");
        let port = free_port();
        let component_port = free_port();
        let path = dir.path();
        let config = path.join("prosody.cfg.lua");
        std::fs::create_dir_all(path.join("data")).expect("data folder");
        let text = format!(
            r#"
run_as_root = true
pidfile = "{dir}/prosody.pid"
data_path = "{dir}/data"
log = {{ info = "{dir}/prosody.log" }}
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {port} }}
s2s_ports = {{ }}
component_ports = {{ {component_port} }}
component_interfaces = {{ "127.0.0.1" }}
http_ports = {{ }}
https_ports = {{ }}
modules_enabled = {{ "roster", "saslauth", "disco", "register", "offline", "ping", "adhoc", "admin_adhoc" }}
admins = {{ "hub@{DOMAIN}" }}
modules_disabled = {{ "s2s", "tls" }}
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
allow_registration = true
min_seconds_between_registrations = 0
authentication = "internal_plain"
VirtualHost "{DOMAIN}"
Component "{COMPONENT}"
    component_secret = "{COMPONENT_SECRET}"
"#,
            dir = path.display(),
        );
        std::fs::write(&config, text).expect("prosody config");
        let child = spawn_prosody(&config);
        let mut prosody = Prosody {
            child,
            port,
            component_port,
            config,
            _dir: dir,
        };
        prosody.wait_listening();
        prosody
    }

    /// Kills the server and starts it again on the same port with the same accounts.
    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_prosody(&self.config);
        self.wait_listening();
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + WAIT;
        let listening = |port| TcpStream::connect(("127.0.0.1", port)).is_ok();
        while !(listening(self.port) && listening(self.component_port)) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prosody exited ({status}):\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "prosody did not listen on {}:\n{}",
                self.port,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn logs(&self) -> String {
        let dir = self.config.parent().unwrap_or(Path::new("."));
        ["stdout.log", "prosody.log"]
            .iter()
            .map(|name| std::fs::read_to_string(dir.join(name)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn register(&self, user: &str, password: &str) {
        let output = Process::new("prosodyctl")
            .arg("--config")
            .arg(&self.config)
            .args(["register", user, DOMAIN, password])
            .output()
            .expect("running prosodyctl");
        assert!(
            output.status.success(),
            "prosodyctl register {user} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn server(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn component_server(&self) -> String {
        format!("127.0.0.1:{}", self.component_port)
    }
}

fn spawn_prosody(config: &Path) -> Child {
    let dir = config.parent().unwrap_or(Path::new("."));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("stdout.log"))
        .expect("log file");
    Process::new("prosody")
        .arg("--config")
        .arg(config)
        .arg("-F")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .expect("starting prosody")
}

/// A Python with slixmpp: `POLYHUB_TEST_PYTHON`, Debian's, or the first on the path.
fn python_with_slixmpp() -> String {
    let candidates = std::env::var("POLYHUB_TEST_PYTHON")
        .into_iter()
        .chain(["/usr/bin/python3".to_owned(), "python3".to_owned()]);
    for python in candidates {
        let works = Process::new(&python)
            .args(["-c", "import slixmpp"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if works {
            return python;
        }
    }
    panic!(
        "no Python with slixmpp: this test needs it (apt-get install -y python3-slixmpp, or pip install slixmpp; set POLYHUB_TEST_PYTHON to choose the interpreter)"
    );
}

/// The device script, running; killed on drop.
struct DeviceProcess {
    child: tokio::process::Child,
}

impl DeviceProcess {
    async fn start(jid: &str, password: &str, prosody: &Prosody, hub_jid: &str) -> DeviceProcess {
        DeviceProcess::try_start(jid, password, prosody, hub_jid, WAIT)
            .await
            .expect("the device script did not log in")
    }

    /// The script, once it has logged in within `wait`; `None` (and the script killed) if it
    /// has not.
    async fn try_start(
        jid: &str,
        password: &str,
        prosody: &Prosody,
        hub_jid: &str,
        wait: Duration,
    ) -> Option<DeviceProcess> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/xmpp_device.py");
        let mut child = tokio::process::Command::new(python_with_slixmpp())
            .arg(script)
            .args([
                jid,
                password,
                "127.0.0.1",
                &prosody.port.to_string(),
                hub_jid,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("starting the device script");
        let stdout = child.stdout.take().expect("device stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(wait, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.trim() == "READY" {
                    return true;
                }
            }
            false
        })
        .await;
        (ready == Ok(true)).then_some(DeviceProcess { child })
    }

    async fn kill(mut self) {
        self.child.kill().await.expect("killing the device script");
    }
}

/// Backend events, kept until a wait asks for them (they may come in any order).
struct Events {
    rx: mpsc::Receiver<BackendEvent>,
    pending: VecDeque<BackendEvent>,
}

impl Events {
    async fn wait_for(
        &mut self,
        what: &str,
        matches: impl Fn(&BackendEvent) -> bool,
    ) -> BackendEvent {
        if let Some(index) = self.pending.iter().position(&matches) {
            return self.pending.remove(index).expect("index in range");
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(event)) if matches(&event) => return event,
                Ok(Some(event)) => self.pending.push_back(event),
                Ok(None) => panic!("event channel closed while waiting for {what}"),
                Err(_) => panic!(
                    "no {what} within {WAIT:?}; other events: {:?}",
                    self.pending
                ),
            }
        }
    }
}

async fn store_with_device(dir: &Path, device_id: &str) -> (Arc<dyn Store>, Device) {
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(dir, &SqliteConfig::default()).expect("store"));
    store
        .create_group(NewGroup {
            id: "g".to_owned(),
            name: None,
            metadata: None,
        })
        .await
        .expect("group");
    store
        .create_hub(NewHub {
            id: "h".to_owned(),
            group_id: "g".to_owned(),
            name: None,
            metadata: None,
            settings: Default::default(),
            desired_state: Default::default(),
        })
        .await
        .expect("hub");
    let device = store
        .create_device(NewDevice {
            id: device_id.to_owned(),
            hub_id: "h".to_owned(),
            name: None,
            protocol: Some("xmpp".to_owned()),
            metadata: None,
        })
        .await
        .expect("device");
    (store, device)
}

fn command(id: &str, device: &Device, name: &str, payload: serde_json::Value) -> Command {
    Command {
        id: id.to_owned(),
        device_id: device.id.clone(),
        hub_id: device.hub_id.clone(),
        protocol: device.protocol.clone(),
        name: name.to_owned(),
        payload,
        seq: 1,
        state: CommandState::Queued,
        created_at: 0,
        expires_at: None,
        sent_at: None,
        delivered_at: None,
        acknowledged_at: None,
        finished_at: None,
        reason: None,
        reply: None,
        attempts: 0,
    }
}

async fn build(
    server: &str,
    store: Arc<dyn Store>,
    shutdown: &CancellationToken,
) -> (Arc<dyn BackendClient>, Events) {
    build_as("hub", server, store, shutdown).await
}

/// A client logged in as `user` (password [`HUB_PASSWORD`]).
async fn build_as(
    user: &str,
    server: &str,
    store: Arc<dyn Store>,
    shutdown: &CancellationToken,
) -> (Arc<dyn BackendClient>, Events) {
    let mut settings = toml::Table::new();
    settings.insert("jid".into(), format!("{user}@{DOMAIN}").into());
    settings.insert("password".into(), HUB_PASSWORD.into());
    settings.insert("server".into(), server.into());
    build_with(settings, store, shutdown).await
}

/// A client in component mode ([`COMPONENT`]) on the component listener `server`, registering
/// device accounts on `registration_server` if given.
async fn build_component(
    server: &str,
    registration_server: Option<&str>,
    store: Arc<dyn Store>,
    shutdown: &CancellationToken,
) -> (Arc<dyn BackendClient>, Events) {
    let mut settings = toml::Table::new();
    settings.insert("mode".into(), "component".into());
    settings.insert("component_domain".into(), COMPONENT.into());
    settings.insert("component_secret".into(), COMPONENT_SECRET.into());
    settings.insert("server".into(), server.into());
    if let Some(registration_server) = registration_server {
        settings.insert("registration_server".into(), registration_server.into());
    }
    build_with(settings, store, shutdown).await
}

/// A client from `settings`, plaintext (loopback) and with a short send timeout.
async fn build_with(
    mut settings: toml::Table,
    store: Arc<dyn Store>,
    shutdown: &CancellationToken,
) -> (Arc<dyn BackendClient>, Events) {
    let (events, rx) = mpsc::channel(64);
    settings.insert("allow_plaintext".into(), true.into());
    settings.insert("send_timeout_ms".into(), 3000.into());
    let context = FactoryContext {
        events,
        store,
        shutdown: shutdown.clone(),
        bus: None,
        channels: ChannelTemplates::default(),
    };
    let client = XmppClientFactory
        .build("xmpp", settings, context)
        .await
        .expect("building the xmpp client");
    (
        client,
        Events {
            rx,
            pending: VecDeque::new(),
        },
    )
}

/// Waits until `device_id` is reported online (or offline), and checks the client agrees.
async fn wait_presence(
    client: &dyn BackendClient,
    events: &mut Events,
    device_id: &str,
    online: bool,
) {
    let what = if online {
        "presence online"
    } else {
        "presence offline"
    };
    events
        .wait_for(what, |event| {
            matches!(event, BackendEvent::Presence { device_id: id, online: state, .. } if id == device_id && *state == online)
        })
        .await;
    assert_eq!(client.is_online(device_id), Some(online));
}

/// A command acknowledged after its receipt, the telemetry the device script sends after each
/// reply, and a command the device fails: what every mode must do with an online device.
/// The device logs in with `credentials` (talking to `hub`) and is seen online, gets through
/// [`command_round_trips`], and is seen offline once its process is killed.
async fn device_online_round_trip_offline(
    client: &dyn BackendClient,
    events: &mut Events,
    device: &Device,
    credentials: &Credentials,
    prosody: &Prosody,
    hub: &str,
) {
    let process =
        DeviceProcess::start(&credentials.username, &credentials.password, prosody, hub).await;
    wait_presence(client, events, &device.id, true).await;
    command_round_trips(client, events, device).await;
    process.kill().await;
    wait_presence(client, events, &device.id, false).await;
}

async fn command_round_trips(client: &dyn BackendClient, events: &mut Events, device: &Device) {
    let reboot = command("cmd-0001", device, "reboot", json!({"delay": 5}));
    assert_eq!(
        client.send_command(device, &reboot).await.expect("send"),
        SendOutcome::Sent
    );
    events
        .wait_for("a delivery receipt", |event| {
            matches!(event, BackendEvent::Delivered { command_id, .. } if command_id == "cmd-0001")
        })
        .await;
    let reply = events
        .wait_for("the reply", |event| {
            matches!(event, BackendEvent::Reply { command_id: Some(id), .. } if id == "cmd-0001")
        })
        .await;
    let BackendEvent::Reply {
        device_id,
        ok,
        reply,
        reason,
        ..
    } = reply
    else {
        unreachable!("matched a reply");
    };
    assert_eq!(device_id, "dev1");
    assert!(ok);
    assert_eq!(
        reply,
        Some(json!({"echo": "reboot", "payload": {"delay": 5}}))
    );
    assert_eq!(reason, None);
    let telemetry = events
        .wait_for("telemetry", |event| {
            matches!(event, BackendEvent::Telemetry { .. })
        })
        .await;
    let BackendEvent::Telemetry {
        device_id, values, ..
    } = telemetry
    else {
        unreachable!("matched telemetry");
    };
    assert_eq!(device_id, "dev1");
    assert_eq!(
        values,
        vec![
            ("commands".to_owned(), polyhub_store::Value::Number(1.0)),
            ("temperature".to_owned(), polyhub_store::Value::Number(21.5)),
        ]
    );

    // A device that reports an error fails the command with its reason.
    let fail = command("cmd-0002", device, "fail", serde_json::Value::Null);
    client.send_command(device, &fail).await.expect("send");
    let failed = events
        .wait_for("the error reply", |event| {
            matches!(event, BackendEvent::Reply { command_id: Some(id), .. } if id == "cmd-0002")
        })
        .await;
    assert!(matches!(
        failed,
        BackendEvent::Reply { ok: false, reason: Some(ref reason), .. } if reason == "asked to fail"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_receipts_replies_telemetry_and_presence_through_prosody() {
    let prosody = Prosody::start();
    prosody.register("hub", HUB_PASSWORD);
    let data = tempfile::tempdir().expect("temporary folder");
    let (store, device) = store_with_device(data.path(), "dev1").await;
    let shutdown = CancellationToken::new();
    let (client, mut events) = build(&prosody.server(), store, &shutdown).await;
    assert_eq!(client.protocol(), "xmpp");

    // The device's account, made by in-band registration; a second one is refused.
    let credentials = client
        .provision_device(&device)
        .await
        .expect("provisioning")
        .expect("credentials");
    assert_eq!(credentials.username, "dev1@localhost");
    assert!(matches!(
        client.provision_device(&device).await,
        Err(BackendError::Rejected(_))
    ));
    assert_eq!(client.is_online("dev1"), Some(false));

    device_online_round_trip_offline(
        client.as_ref(),
        &mut events,
        &device,
        &credentials,
        &prosody,
        &format!("hub@{DOMAIN}"),
    )
    .await;
    shutdown.cancel();
}

/// Component mode (XEP-0114): the same exchange as an account, from `hub.localhost`. The
/// device account is registered over a short client connection (`registration_server`), and
/// the component, which has no roster, gets the device's presence by subscribing (the device
/// script auto-approves) and probing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn component_mode_commands_receipts_replies_telemetry_and_presence() {
    let prosody = Prosody::start();
    let data = tempfile::tempdir().expect("temporary folder");
    let (store, device) = store_with_device(data.path(), "dev1").await;
    let shutdown = CancellationToken::new();
    let (client, mut events) = build_component(
        &prosody.component_server(),
        Some(&prosody.server()),
        store,
        &shutdown,
    )
    .await;

    let credentials = client
        .provision_device(&device)
        .await
        .expect("provisioning over a client connection")
        .expect("credentials");
    assert_eq!(credentials.username, "dev1@localhost");
    // Removal needs an admin account's session, which a component does not have.
    match client.remove_device(&device).await {
        Err(BackendError::Unsupported(message)) => {
            assert!(message.contains("component mode"), "{message}")
        }
        other => panic!("removal in component mode must be unsupported, got {other:?}"),
    }
    assert_eq!(client.is_online("dev1"), Some(false));

    // The subscription request waits for the device at the server; once it logs in and
    // approves it, its presence reaches the component.
    device_online_round_trip_offline(
        client.as_ref(),
        &mut events,
        &device,
        &credentials,
        &prosody,
        COMPONENT,
    )
    .await;
    shutdown.cancel();
}

/// A device that is already online and subscribed when the component connects is found by
/// asking at connection (nothing else would announce it), and followed afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn component_mode_finds_devices_online_before_it_connects() {
    let prosody = Prosody::start();
    prosody.register("dev1", "dev1-password");
    let data = tempfile::tempdir().expect("temporary folder");
    let (store, device) = store_with_device(data.path(), "dev1").await;
    let process =
        DeviceProcess::start("dev1@localhost", "dev1-password", &prosody, COMPONENT).await;

    // A first connection gets the subscription approved.
    let first = CancellationToken::new();
    let (client, mut events) =
        build_component(&prosody.component_server(), None, store.clone(), &first).await;
    wait_presence(client.as_ref(), &mut events, "dev1", true).await;
    first.cancel();
    drop(client);

    // A new connection: the device neither logs in again nor changes its presence, so only
    // the answers to the component's requests (the subscription request, which Prosody answers
    // with `subscribed` and the current presence; the probe sent on `subscribed`) can tell the
    // component it is online.
    let second = CancellationToken::new();
    let (client, mut events) =
        build_component(&prosody.component_server(), None, store, &second).await;
    wait_presence(client.as_ref(), &mut events, "dev1", true).await;
    command_round_trips(client.as_ref(), &mut events, &device).await;
    process.kill().await;
    wait_presence(client.as_ref(), &mut events, "dev1", false).await;
    second.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn component_mode_reconnects_after_the_server_restarts() {
    let mut prosody = Prosody::start();
    prosody.register("dev1", "dev1-password");
    let data = tempfile::tempdir().expect("temporary folder");
    let (store, device) = store_with_device(data.path(), "dev1").await;
    let shutdown = CancellationToken::new();
    let (client, mut events) =
        build_component(&prosody.component_server(), None, store, &shutdown).await;
    let process =
        DeviceProcess::start("dev1@localhost", "dev1-password", &prosody, COMPONENT).await;
    wait_presence(client.as_ref(), &mut events, "dev1", true).await;

    prosody.restart();
    // Without a connection the hub cannot reach the device: offline at once.
    wait_presence(client.as_ref(), &mut events, "dev1", false).await;
    process.kill().await;
    let process =
        DeviceProcess::start("dev1@localhost", "dev1-password", &prosody, COMPONENT).await;
    // Back once the component has reconnected (first retry after 1 s) and asked again.
    wait_presence(client.as_ref(), &mut events, "dev1", true).await;
    let ping = command("cmd-0003", &device, "ping", serde_json::Value::Null);
    client.send_command(&device, &ping).await.expect("send");
    events
        .wait_for("the reply after the restart", |event| {
            matches!(event, BackendEvent::Reply { command_id: Some(id), ok: true, .. } if id == "cmd-0003")
        })
        .await;
    process.kill().await;
    shutdown.cancel();
}

/// A wrong secret never connects: commands stay unavailable rather than going anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn component_mode_with_a_wrong_secret_stays_unavailable() {
    let prosody = Prosody::start();
    let data = tempfile::tempdir().expect("temporary folder");
    let (store, device) = store_with_device(data.path(), "dev1").await;
    let shutdown = CancellationToken::new();
    let mut settings = toml::Table::new();
    settings.insert("mode".into(), "component".into());
    settings.insert("component_domain".into(), COMPONENT.into());
    settings.insert("component_secret".into(), "not-the-secret".into());
    settings.insert("server".into(), prosody.component_server().into());
    let (client, _events) = build_with(settings, store, &shutdown).await;
    // Long enough for the handshake to be answered (and refused) on loopback.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reboot = command("cmd-0001", &device, "reboot", serde_json::Value::Null);
    assert!(matches!(
        client.send_command(&device, &reboot).await,
        Err(BackendError::Unavailable(_))
    ));
    assert_eq!(client.is_online("dev1"), Some(false));
    shutdown.cancel();
}

#[tokio::test]
async fn component_mode_without_a_registration_server_cannot_provision() {
    let data = tempfile::tempdir().expect("temporary folder");
    let (store, device) = store_with_device(data.path(), "dev1").await;
    let shutdown = CancellationToken::new();
    // Nothing listens there; provisioning must not even try.
    let server = format!("127.0.0.1:{}", free_port());
    let (client, _events) = build_component(&server, None, store, &shutdown).await;
    for outcome in [
        client.provision_device(&device).await.map(|_| ()),
        client.remove_device(&device).await,
    ] {
        match outcome {
            Err(BackendError::Unsupported(message)) => {
                assert!(message.contains("component mode"), "{message}")
            }
            other => panic!("expected Unsupported naming component mode, got {other:?}"),
        }
    }
    let reboot = command("cmd-0001", &device, "reboot", serde_json::Value::Null);
    assert!(matches!(
        client.send_command(&device, &reboot).await,
        Err(BackendError::Unavailable(_))
    ));
    shutdown.cancel();
}

/// `remove_device`, retried while the client has not logged in yet.
async fn remove_when_logged_in(
    client: &dyn BackendClient,
    device: &Device,
) -> Result<(), BackendError> {
    let deadline = Instant::now() + WAIT;
    loop {
        match client.remove_device(device).await {
            Err(BackendError::Unavailable(message))
                if message.contains("not connected") && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            outcome => return outcome,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_accounts_are_removed_by_an_admin_hub_only() {
    let prosody = Prosody::start();
    prosody.register("hub", HUB_PASSWORD);
    prosody.register("other", HUB_PASSWORD);
    let data = tempfile::tempdir().expect("temporary folder");
    let (store, device) = store_with_device(data.path(), "dev1").await;
    let shutdown = CancellationToken::new();
    let (client, _events) = build(&prosody.server(), store.clone(), &shutdown).await;
    let (not_admin, _other_events) = build_as("other", &prosody.server(), store, &shutdown).await;

    let first = client
        .provision_device(&device)
        .await
        .expect("provisioning")
        .expect("credentials");
    // A hub account that is not a server admin is told why it may not.
    match remove_when_logged_in(not_admin.as_ref(), &device).await {
        Err(BackendError::Rejected(message)) => assert!(message.contains("admin"), "{message}"),
        other => panic!("a non-admin removal must be rejected, got {other:?}"),
    }
    // The account still exists: registering it again is refused.
    assert!(matches!(
        client.provision_device(&device).await,
        Err(BackendError::Rejected(_))
    ));

    remove_when_logged_in(client.as_ref(), &device)
        .await
        .expect("the admin hub removes the account");
    // Gone: the old password no longer logs in (slixmpp keeps retrying; READY never comes),
    // and the name can be registered afresh.
    let login = DeviceProcess::try_start(
        &first.username,
        &first.password,
        &prosody,
        &format!("hub@{DOMAIN}"),
        Duration::from_secs(3),
    )
    .await;
    assert!(login.is_none(), "the removed account still logs in");
    let second = client
        .provision_device(&device)
        .await
        .expect("registering the name again")
        .expect("credentials");
    assert_ne!(second.password, first.password);
    // Removing an account that does not exist is an error, not a silent success.
    remove_when_logged_in(client.as_ref(), &device)
        .await
        .expect("removing the new account");
    assert!(matches!(
        remove_when_logged_in(client.as_ref(), &device).await,
        Err(BackendError::Rejected(_))
    ));
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reconnects_after_the_server_restarts() {
    let mut prosody = Prosody::start();
    prosody.register("hub", HUB_PASSWORD);
    let data = tempfile::tempdir().expect("temporary folder");
    let (store, device) = store_with_device(data.path(), "dev1").await;
    let shutdown = CancellationToken::new();
    let (client, mut events) = build(&prosody.server(), store, &shutdown).await;
    let credentials = client
        .provision_device(&device)
        .await
        .expect("provisioning")
        .expect("credentials");
    let hub_jid = format!("hub@{DOMAIN}");
    let process = DeviceProcess::start(
        &credentials.username,
        &credentials.password,
        &prosody,
        &hub_jid,
    )
    .await;
    events
        .wait_for("presence online", |event| {
            matches!(event, BackendEvent::Presence { online: true, .. })
        })
        .await;

    prosody.restart();
    // Without a session the hub cannot reach the device: it is reported offline at once.
    events
        .wait_for("presence offline", |event| {
            matches!(event, BackendEvent::Presence { online: false, .. })
        })
        .await;
    process.kill().await;
    let process = DeviceProcess::start(
        &credentials.username,
        &credentials.password,
        &prosody,
        &hub_jid,
    )
    .await;
    // Back online once the client has logged in again (its first retry is after 1 s) and
    // re-subscribed.
    events
        .wait_for("presence online after the restart", |event| {
            matches!(event, BackendEvent::Presence { online: true, .. })
        })
        .await;
    let ping = command("cmd-0003", &device, "ping", serde_json::Value::Null);
    client.send_command(&device, &ping).await.expect("send");
    events
        .wait_for("the reply after the restart", |event| {
            matches!(event, BackendEvent::Reply { command_id: Some(id), ok: true, .. } if id == "cmd-0003")
        })
        .await;
    process.kill().await;
    shutdown.cancel();
}

#[tokio::test]
async fn without_a_server_commands_are_unavailable() {
    let data = tempfile::tempdir().expect("temporary folder");
    let (store, device) = store_with_device(data.path(), "dev1").await;
    let shutdown = CancellationToken::new();
    // Nothing listens there: the client keeps retrying in the background.
    let server = format!("127.0.0.1:{}", free_port());
    let (client, _events) = build(&server, store, &shutdown).await;
    let reboot = command("cmd-0001", &device, "reboot", serde_json::Value::Null);
    assert!(matches!(
        client.send_command(&device, &reboot).await,
        Err(BackendError::Unavailable(_))
    ));
    assert_eq!(client.is_online("dev1"), Some(false));
    shutdown.cancel();
}

#[tokio::test]
async fn bad_settings_fail_the_build_naming_the_problem() {
    let data = tempfile::tempdir().expect("temporary folder");
    let (store, _device) = store_with_device(data.path(), "dev1").await;
    let (events, _rx) = mpsc::channel(1);
    let context = FactoryContext {
        events,
        store,
        shutdown: CancellationToken::new(),
        bus: None,
        channels: ChannelTemplates::default(),
    };
    let mut settings = toml::Table::new();
    settings.insert("password".into(), "pw".into());
    settings.insert("server".into(), "xmpp.example.org:5222".into());
    settings.insert("allow_plaintext".into(), true.into());
    let error = XmppClientFactory
        .build("xmpp", settings, context.clone())
        .await
        .expect_err("plaintext to a remote server");
    assert!(
        matches!(&error, BackendError::Config(message) if message.contains("loopback")),
        "{error}"
    );
    let mut settings = toml::Table::new();
    settings.insert("password".into(), "pw".into());
    settings.insert("secret".into(), "x".into());
    let error = XmppClientFactory
        .build("xmpp", settings, context)
        .await
        .expect_err("unknown setting");
    assert!(
        matches!(&error, BackendError::Config(message) if message.contains("secret")),
        "{error}"
    );
}
