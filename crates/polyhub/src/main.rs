//! The `polyhub` binary: command line, configuration and wiring of every component.
//!
//! This is the only crate that names concrete types and chooses implementations; the
//! libraries take their configuration, listeners and shutdown signal from here.
//!
//! # Layout
//! - [`cli`]: the clap definitions of `polyhub run` and `polyhub config`.
//! - [`config`]: the configuration file's top level and the layering of file, environment and
//!   flags.
//! - [`run`]: `polyhub run`: logging, listeners, the broker, signals and shutdown.
//!
//! # Errors and exit codes
//! Every failure is reported as one line on standard error, `error: <what went wrong>`, and
//! ends the process with 2 for a usage or configuration error (clap uses 2 as well) or 1 for a
//! failure while running (a port already in use, an unwritable data directory).

mod bus;
mod child;
mod cli;
mod config;
mod ctl;
mod platform;
mod run;

use std::io::Write;
use std::process::ExitCode;

use anyhow::anyhow;
use clap::Parser;

use crate::cli::{CheckArgs, Cli, Command, ConfigCommand};
use crate::config::{Config, ConfigError, DEFAULT_CONFIG_TOML};

/// Why polyhub stopped with an error; decides the exit code.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The command line or configuration cannot be used: exit code 2.
    Config(anyhow::Error),
    /// Something failed while running: exit code 1.
    Runtime(anyhow::Error),
}

impl From<ConfigError> for Failure {
    fn from(error: ConfigError) -> Self {
        Failure::Config(error.into())
    }
}

impl Failure {
    fn exit_code(&self) -> ExitCode {
        match self {
            Failure::Config(_) => ExitCode::from(2),
            Failure::Runtime(_) => ExitCode::from(1),
        }
    }

    /// The error as the single line promised to operators and scripts.
    fn one_line(&self) -> String {
        let (Failure::Config(error) | Failure::Runtime(error)) = self;
        format!("error: {error:#}").replace(['\n', '\r'], " ")
    }
}

fn main() -> ExitCode {
    // rustls needs a process-wide crypto provider for anything built without an explicit
    // one; installing it before any other work keeps that choice in one place. It can only
    // fail if a provider is already installed, which is then just as good.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let cli = Cli::parse();
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("{}", failure.one_line());
            failure.exit_code()
        }
    }
}

fn execute(command: Command) -> Result<(), Failure> {
    match command {
        Command::Run(args) => {
            let (config, source) =
                config::load(args.config.as_deref(), &args.overrides(), |name| {
                    std::env::var_os(name)
                })?;
            run::run(config, source)
        }
        Command::Config(ConfigCommand::Default) => print_stdout(DEFAULT_CONFIG_TOML),
        Command::Config(ConfigCommand::Check(args)) => check(&args),
        Command::Parser(args) => child::run(args),
        Command::Ctl(command) => run_ctl(command),
    }
}

/// The API client commands: one request (or a few), on a small runtime of their own.
fn run_ctl(command: ctl::CtlCommand) -> Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| Failure::Runtime(anyhow!("cannot start the async runtime: {error}")))?;
    runtime
        .block_on(ctl::run(command))
        .map_err(|error| Failure::Runtime(error.into()))
}

/// `polyhub config check`: everything `polyhub run` would check before binding a socket.
fn check(args: &CheckArgs) -> Result<(), Failure> {
    let path = args
        .config
        .clone()
        .or_else(|| config::config_path_from_env(|name| std::env::var_os(name)))
        .ok_or_else(|| {
            Failure::Config(anyhow!(
                "no configuration file to check: give --config FILE or set {}",
                config::env::CONFIG
            ))
        })?;
    let config = Config::from_file(&path)?;
    config.validate()?;
    if let Some(tls) = &config.mqtt.tls {
        polyhub_broker::tls::acceptor(tls)
            .map_err(|error| Failure::Config(anyhow!("config file {}: {error}", path.display())))?;
    }
    print_stdout(&format!("{}: ok\n", path.display()))
}

/// Writes to standard output; a closed pipe (`polyhub config default | head`) is not an error.
fn print_stdout(text: &str) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => Err(Failure::Runtime(
            anyhow!("cannot write to standard output: {error}"),
        )),
        _ => Ok(()),
    }
}
