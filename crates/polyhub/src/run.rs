//! `polyhub run`: logging, the data directory, listeners, the broker, signals and shutdown.
//!
//! Order matters here. Everything that can be wrong with the configuration (TLS files
//! included) is checked before any socket is bound, so a bad setting never leaves a half-started
//! process. The saved broker state is read before binding too (a corrupt snapshot stops the
//! start), restored before any listener accepts, and saved again once every client has been
//! disconnected at shutdown. Signal handlers are registered before the listeners are
//! announced, so a SIGTERM sent right after `MQTT listening on ...` appears always gets the
//! graceful path.
//!
//! Shutdown order is what makes "nothing acknowledged is lost" hold across a restart: stop
//! accepting, disconnect every network client (so no device can publish any more: whatever the
//! broker acknowledged is in some session by then), then stop the platform (each parser
//! commits and acknowledges what it holds), then stop the in-process clients, then save the
//! snapshot, which keeps every persistent session, the parsers' included, with whatever is
//! still queued or unacknowledged in it.

use std::io::{self, IsTerminal};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use polyhub_broker::persist::{self, PersistError};
use polyhub_broker::{Broker, BrokerError, Snapshot};
use polyhub_sdk::ServiceManager;
use polyhub_store::Store;
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use crate::Failure;
use crate::config::{Config, describe_io_error};

/// How long listeners and client sessions get to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs polyhub until SIGINT or SIGTERM.
pub(crate) fn run(config: Config, source: Option<PathBuf>) -> Result<(), Failure> {
    // TLS files are configuration: a bad one is reported before anything else happens.
    let tls = match &config.mqtt.tls {
        Some(tls) => {
            let acceptor = polyhub_broker::tls::acceptor(tls)
                .context("MQTTS listener")
                .map_err(Failure::Config)?;
            Some((tls.listen, acceptor))
        }
        None => None,
    };

    init_logging(&config.log.level)?;
    match &source {
        Some(path) => info!(
            "polyhub {} starting with configuration file {}",
            env!("CARGO_PKG_VERSION"),
            path.display()
        ),
        None => info!(
            "polyhub {} starting with built-in defaults",
            env!("CARGO_PKG_VERSION")
        ),
    }

    std::fs::create_dir_all(&config.data_dir).map_err(|error| {
        Failure::Runtime(anyhow!(
            "cannot create data directory {}: {}",
            config.data_dir.display(),
            describe_io_error(&error)
        ))
    })?;
    info!("data directory {}", config.data_dir.display());
    let saved = load_saved_state(&config)?;
    let store = crate::platform::open_store(&config)?;

    // With one CPU (a container limit or a CPU mask), a multi-threaded runtime's single
    // worker only adds a hand-off between threads and work-stealing bookkeeping; the
    // current-thread scheduler runs the same tasks on the one thread we have.
    let one_cpu = std::thread::available_parallelism().is_ok_and(|cpus| cpus.get() == 1);
    let mut builder = if one_cpu {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .map_err(Failure::Runtime)?;
    runtime.block_on(serve(&config, source.as_deref(), tls, saved, store))
}

/// Where the broker state is saved, when persistence is on.
fn snapshot_path(config: &Config) -> Option<PathBuf> {
    config
        .mqtt
        .persistence
        .enabled
        .then(|| persist::snapshot_path(&config.data_dir))
}

/// Reads the saved broker state, if persistence is on and a snapshot exists.
fn load_saved_state(config: &Config) -> Result<Option<Snapshot>, Failure> {
    let Some(path) = snapshot_path(config) else {
        return Ok(None);
    };
    persist::load_for_startup(&path, config.mqtt.persistence.on_corrupt).map_err(|error| {
        let hint = match error {
            PersistError::Corrupt { .. } => {
                "; to start without it, set on_corrupt = \"move_aside\" in [mqtt.persistence] \
                 (the file is then renamed, not deleted)"
            }
            _ => "",
        };
        Failure::Runtime(anyhow!("{error}{hint}"))
    })
}

/// Binds the listeners, serves until a signal, then shuts down gracefully.
async fn serve(
    config: &Config,
    config_file: Option<&Path>,
    tls: Option<(SocketAddr, tokio_rustls::TlsAcceptor)>,
    saved: Option<Snapshot>,
    store: Arc<dyn Store>,
) -> Result<(), Failure> {
    let mut signals = Signals::register()
        .context("cannot install signal handlers")
        .map_err(Failure::Runtime)?;

    // Bind everything before serving anything: a busy TLS port must not leave MQTT running.
    // With an external broker the embedded one serves no listener (docs/external-broker.md).
    let mqtt = match config.external_broker {
        None => Some(bind("MQTT", config.mqtt.listen).await?),
        Some(_) => None,
    };
    let mqtts = match tls {
        Some((address, acceptor)) => Some((bind("MQTTS", address).await?, acceptor)),
        None => None,
    };
    let http = bind("HTTP", config.http.listen).await?;

    let broker =
        Broker::with_socket_options(config.mqtt.limits.clone(), config.mqtt.socket_options());
    let snapshot_path = snapshot_path(config);
    if let (Some(snapshot), Some(path)) = (saved, &snapshot_path) {
        let restored = broker
            .restore(snapshot)
            .map_err(|error| Failure::Runtime(anyhow!("{}: {error}", path.display())))?;
        info!(
            "restored {} retained messages and {} sessions and {} in-process sessions from {}",
            restored.retained,
            restored.sessions,
            restored.local_sessions,
            path.display()
        );
    }
    let (stop, stop_requested) = watch::channel(false);
    let autosave_every = config.mqtt.persistence.autosave_interval;
    let autosave = snapshot_path
        .clone()
        .filter(|_| autosave_every > 0)
        .map(|path| {
            tokio::spawn(persist::autosave(
                broker.clone(),
                path,
                Duration::from_secs(autosave_every),
                stopped(stop_requested.clone()),
            ))
        });
    // sgframework's service manager: when a resource's presence turns False, its signals are
    // withdrawn (retained commandavailable/dataavailable = False) so Apps see them vanish.
    let service_manager = broker
        .local_client("polyhub-servicemanager")
        .map_err(|error| Failure::Runtime(anyhow!("service manager: {error}")))?;
    tokio::spawn(async move {
        if let Err(error) = ServiceManager::new().run_local(service_manager).await {
            warn!("service manager stopped: {error}");
        }
    });
    let mut listeners = JoinSet::new();

    let address = match mqtt {
        Some(mqtt) => {
            let address = bound_address(&mqtt)?;
            info!("MQTT listening on {address}");
            let (handle, shutdown) = (broker.clone(), stopped(stop_requested.clone()));
            listeners.spawn(async move { ("MQTT", address, handle.serve(mqtt, shutdown).await) });
            Some(address)
        }
        None => None,
    };

    if let Some((listener, acceptor)) = mqtts {
        let address = bound_address(&listener)?;
        info!("MQTTS listening on {address}");
        let (handle, shutdown) = (broker.clone(), stopped(stop_requested.clone()));
        listeners.spawn(async move {
            let result = handle.serve_tls(listener, acceptor, shutdown).await;
            ("MQTTS", address, result)
        });
    }

    let platform_shutdown = CancellationToken::new();
    let platform = crate::platform::start(
        config,
        &broker,
        store,
        http,
        crate::platform::ChildSettings {
            mqtt_address: address,
            config_file,
        },
        platform_shutdown.clone(),
    )
    .await?;

    let outcome = tokio::select! {
        name = signals.recv() => {
            info!("{name} received, shutting down");
            Ok(())
        }
        Some(ended) = listeners.join_next() => Err(Failure::Runtime(listener_ended(ended))),
    };

    // Whatever the reason: stop accepting, then disconnect the network clients, so that
    // nothing new arrives; only then stop the parsers, which commit and acknowledge what they
    // hold (they stopped first before, and what devices sent meanwhile was left behind).
    // In-process clients keep working until `broker.shutdown`; the snapshot taken after it
    // keeps what is still queued or unacknowledged in the parsers' persistent sessions.
    let _ = stop.send(true);
    let graceful = async {
        while let Some(ended) = listeners.join_next().await {
            if let Err(error) = flatten(ended) {
                warn!("{error:#}");
            }
        }
        broker.close_network().await;
        platform_shutdown.cancel();
        platform.finish().await;
        broker.shutdown().await;
        // A save in progress is finished before the final one starts.
        if let Some(autosave) = autosave {
            let _ = autosave.await;
        }
    };
    let finished = tokio::select! {
        finished = tokio::time::timeout(SHUTDOWN_GRACE, graceful) => finished,
        name = signals.recv() => {
            return Err(Failure::Runtime(anyhow!(
                "{name} received during shutdown, stopping without waiting"
            )));
        }
    };
    // Saved even after a slow shutdown: what is in memory is still the best state there is.
    if let Some(path) = &snapshot_path {
        tokio::select! {
            saved = persist::save_broker(&broker, path) => {
                let saved = saved.map_err(|error| Failure::Runtime(error.into()))?;
                info!(
                    "saved {} retained messages and {} sessions and {} in-process sessions to {}",
                    saved.retained,
                    saved.sessions,
                    saved.local_sessions,
                    path.display()
                );
            }
            name = signals.recv() => {
                return Err(Failure::Runtime(anyhow!(
                    "{name} received while saving {}, stopping; the previous snapshot is kept",
                    path.display()
                )));
            }
        }
    }
    if finished.is_err() {
        return Err(Failure::Runtime(anyhow!(
            "shutdown did not finish within {} s",
            SHUTDOWN_GRACE.as_secs()
        )));
    }
    if outcome.is_ok() {
        info!("polyhub stopped");
    }
    outcome
}

/// What a listener task returns: its name, its address and how serving ended.
type ListenerEnd = (&'static str, SocketAddr, Result<(), BrokerError>);

/// A listener ended before shutdown was asked for, which is always a failure.
fn listener_ended(ended: Result<ListenerEnd, JoinError>) -> anyhow::Error {
    match flatten(ended) {
        Err(error) => error,
        Ok((name, address)) => anyhow!("{name} listener on {address} stopped unexpectedly"),
    }
}

fn flatten(ended: Result<ListenerEnd, JoinError>) -> anyhow::Result<(&'static str, SocketAddr)> {
    let (name, address, result) =
        ended.map_err(|error| anyhow!("a listener task ended abnormally: {error}"))?;
    result.map_err(|error| anyhow!("{name} listener on {address} failed: {error}"))?;
    Ok((name, address))
}

/// Binds `address` for the listener called `what` (`MQTT`, `MQTTS`, `HTTP`).
async fn bind(what: &str, address: SocketAddr) -> Result<TcpListener, Failure> {
    TcpListener::bind(address).await.map_err(|error| {
        let reason = match error.kind() {
            io::ErrorKind::AddrInUse => "address already in use".to_string(),
            io::ErrorKind::AddrNotAvailable => "address not available on this machine".into(),
            io::ErrorKind::PermissionDenied => "permission denied".into(),
            _ => error.to_string(),
        };
        Failure::Runtime(anyhow!("cannot listen for {what} on {address}: {reason}"))
    })
}

/// The address actually bound: differs from the configured one when the port was 0.
fn bound_address(listener: &TcpListener) -> Result<SocketAddr, Failure> {
    listener
        .local_addr()
        .context("cannot read a listener's address")
        .map_err(Failure::Runtime)
}

/// Completes once a stop has been requested (or the requester is gone).
async fn stopped(mut stop_requested: watch::Receiver<bool>) {
    let _ = stop_requested.wait_for(|stop| *stop).await;
}

/// SIGINT and SIGTERM, registered up front.
pub(crate) struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    pub(crate) fn register() -> io::Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Waits for the next signal and names it.
    pub(crate) async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

/// Logs to standard error, filtered by `filter` (`RUST_LOG` syntax), without colours unless
/// standard error is a terminal, so that logs captured by tests and services stay plain text.
pub(crate) fn init_logging(filter: &str) -> Result<(), Failure> {
    let filter = EnvFilter::try_new(filter)
        .with_context(|| format!("invalid log filter {filter:?}"))
        .map_err(Failure::Config)?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .with_target(false)
        .try_init()
        .map_err(|error| Failure::Runtime(anyhow!("cannot set up logging: {error}")))
}
