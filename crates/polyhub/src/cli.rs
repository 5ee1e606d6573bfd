//! The command line: `polyhub run`, `polyhub config default|check`, the hidden `polyhub parser`
//! (a hub parser in its own process), and the API client commands of [`crate::ctl`].
//!
//! Environment variables are deliberately not wired through clap: they form their own layer
//! ([`Overrides::from_env`](crate::config::Overrides::from_env)), so that the precedence
//! file < environment < flags is decided in one place.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::Overrides;

/// polyhub: an IoT hub in one program.
#[derive(Debug, Parser)]
#[command(name = "polyhub", version, propagate_version = true)]
pub(crate) struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Start polyhub (the MQTT broker) and run until SIGINT or SIGTERM.
    ///
    /// Settings come from built-in defaults, then the configuration file, then POLYHUB_*
    /// environment variables, then these flags; later ones win.
    Run(RunArgs),
    /// Print the default configuration, or check a configuration file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run one hub's parser as its own process (started by `polyhub run` for hubs in
    /// process isolation; not meant to be run by hand).
    #[command(hide = true)]
    Parser(ParserArgs),
    /// Registry, hub control and telemetry, through the REST API of a running polyhub.
    #[command(flatten)]
    Ctl(crate::ctl::CtlCommand),
}

/// Flags of `polyhub parser`: what the hub manager passes to a child parser.
#[derive(Debug, Args)]
pub(crate) struct ParserArgs {
    /// The hub to ingest.
    #[arg(long, value_name = "ID")]
    pub(crate) hub: String,
    /// The MQTT listener of the parent polyhub to connect to (embedded broker).
    #[arg(long, value_name = "ADDR", conflicts_with = "external_broker")]
    pub(crate) mqtt_connect: Option<SocketAddr>,
    /// The external broker the parent uses, `mqtt://HOST:PORT` or `mqtts://HOST:PORT`
    /// (its other settings come from the configuration file and environment).
    #[arg(long, value_name = "URL")]
    pub(crate) external_broker: Option<String>,
    /// Configuration file (TOML) of the parent.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// The parent's data directory.
    #[arg(long, value_name = "DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// Log filter.
    #[arg(long, value_name = "LEVEL")]
    pub(crate) log: Option<String>,
}

/// `polyhub config ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Print the default configuration file, every setting documented.
    Default,
    /// Check a configuration file: syntax, keys, values, and the TLS files it names.
    Check(CheckArgs),
}

/// Flags of `polyhub run`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Configuration file (TOML) [env: POLYHUB_CONFIG]
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Address of the MQTT listener, e.g. 127.0.0.1:1883; port 0 picks a free port
    /// [env: POLYHUB_MQTT_LISTEN]
    #[arg(long, value_name = "ADDR")]
    pub(crate) mqtt_listen: Option<SocketAddr>,
    /// Address of the MQTT-over-TLS listener (default 127.0.0.1:8883 once TLS is configured)
    /// [env: POLYHUB_MQTTS_LISTEN]
    #[arg(long, value_name = "ADDR")]
    pub(crate) mqtts_listen: Option<SocketAddr>,
    /// PEM file with the TLS certificate chain [env: POLYHUB_TLS_CERT]
    #[arg(long, value_name = "FILE")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// PEM file with the TLS private key [env: POLYHUB_TLS_KEY]
    #[arg(long, value_name = "FILE")]
    pub(crate) tls_key: Option<PathBuf>,
    /// PEM file with the CAs that client certificates must chain to [env: POLYHUB_TLS_CA]
    #[arg(long, value_name = "FILE")]
    pub(crate) tls_ca: Option<PathBuf>,
    /// Refuse TLS clients without a valid certificate (needs --tls-ca)
    /// [env: POLYHUB_TLS_REQUIRE_CLIENT_CERT]
    #[arg(long)]
    pub(crate) tls_require_client_cert: bool,
    /// Directory for persistent data, created if missing [env: POLYHUB_DATA_DIR]
    #[arg(long, value_name = "DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// Log filter: a level (info, debug, ...) or RUST_LOG syntax [env: POLYHUB_LOG]
    #[arg(long, value_name = "LEVEL")]
    pub(crate) log: Option<String>,
    /// Address of the REST API and web UI, e.g. 127.0.0.1:8080; port 0 picks a free port
    /// [env: POLYHUB_HTTP_LISTEN]
    #[arg(long, value_name = "ADDR")]
    pub(crate) http_listen: Option<SocketAddr>,
    /// Use this MQTT broker instead of the embedded one, mqtt://HOST:PORT or
    /// mqtts://HOST:PORT; the embedded broker then does not listen
    /// [env: POLYHUB_EXTERNAL_BROKER]
    #[arg(long, value_name = "URL")]
    pub(crate) external_broker: Option<String>,
}

impl RunArgs {
    /// The settings given as flags, as the top override layer.
    pub(crate) fn overrides(&self) -> Overrides {
        Overrides {
            data_dir: self.data_dir.clone(),
            log: self.log.clone(),
            mqtt_listen: self.mqtt_listen,
            mqtts_listen: self.mqtts_listen,
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            tls_ca: self.tls_ca.clone(),
            // A boolean flag can only turn the requirement on; absent means "not said".
            tls_require_client_cert: self.tls_require_client_cert.then_some(true),
            http_listen: self.http_listen,
            external_broker: self.external_broker.clone(),
            // Secrets have no flags: command lines are visible to every user of the machine.
            external_broker_username: None,
            external_broker_password: None,
        }
    }
}

/// Flags of `polyhub config check`.
#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// Configuration file to check [env: POLYHUB_CONFIG]
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn run_args(args: &[&str]) -> RunArgs {
        let cli = Cli::try_parse_from(["polyhub", "run"].iter().chain(args)).unwrap();
        match cli.command {
            Command::Run(args) => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_without_flags_overrides_nothing() {
        assert_eq!(run_args(&[]).overrides(), Overrides::default());
    }

    #[test]
    fn run_flags_become_overrides() {
        let args = run_args(&[
            "--mqtt-listen",
            "127.0.0.1:0",
            "--mqtts-listen",
            "127.0.0.1:8884",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--tls-ca",
            "ca.pem",
            "--tls-require-client-cert",
            "--data-dir",
            "d",
            "--log",
            "debug",
            "--config",
            "polyhub.toml",
            "--http-listen",
            "127.0.0.1:0",
            "--external-broker",
            "mqtt://127.0.0.1:1884",
        ]);
        assert_eq!(args.config, Some(PathBuf::from("polyhub.toml")));
        assert_eq!(
            args.overrides(),
            Overrides {
                data_dir: Some("d".into()),
                log: Some("debug".into()),
                mqtt_listen: Some("127.0.0.1:0".parse().unwrap()),
                mqtts_listen: Some("127.0.0.1:8884".parse().unwrap()),
                tls_cert: Some("c.pem".into()),
                tls_key: Some("k.pem".into()),
                tls_ca: Some("ca.pem".into()),
                tls_require_client_cert: Some(true),
                http_listen: Some("127.0.0.1:0".parse().unwrap()),
                external_broker: Some("mqtt://127.0.0.1:1884".into()),
                external_broker_username: None,
                external_broker_password: None,
            }
        );
    }

    #[test]
    fn a_parser_child_connects_to_the_parent_or_to_the_external_broker() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(["polyhub", "parser", "--hub", "h1"].iter().chain(args))
        };
        let Command::Parser(args) = parse(&["--mqtt-connect", "127.0.0.1:1883"])
            .unwrap()
            .command
        else {
            panic!("not a parser command");
        };
        assert_eq!(args.mqtt_connect, Some("127.0.0.1:1883".parse().unwrap()));
        let Command::Parser(args) = parse(&["--external-broker", "mqtt://b:1"]).unwrap().command
        else {
            panic!("not a parser command");
        };
        assert_eq!(args.external_broker.as_deref(), Some("mqtt://b:1"));
        assert!(
            parse(&[
                "--mqtt-connect",
                "127.0.0.1:1883",
                "--external-broker",
                "mqtt://b:1"
            ])
            .is_err()
        );
    }

    #[test]
    fn bad_address_flag_is_a_usage_error() {
        let error =
            Cli::try_parse_from(["polyhub", "run", "--mqtt-listen", "nowhere"]).unwrap_err();
        assert_eq!(error.exit_code(), 2);
    }
}
