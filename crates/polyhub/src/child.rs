//! `polyhub parser --hub ID`: one hub's parser in its own process.
//!
//! The hub manager of a `polyhub run` starts this for hubs in process isolation. It reads the
//! same configuration as its parent, opens the same database, connects to the parent's broker
//! over MQTT, and speaks the JSON-lines protocol of `polyhub_hub::child` on its standard input
//! and output (logs go to standard error). It exits when its input closes, so a parent that dies
//! never leaves it behind.

use std::sync::Arc;

use anyhow::{Context, anyhow};
use tokio_util::sync::CancellationToken;

use crate::Failure;
use crate::bus::MqttBus;
use crate::cli::ParserArgs;
use crate::config::{self, Overrides};

pub(crate) fn run(args: ParserArgs) -> Result<(), Failure> {
    let flags = Overrides {
        data_dir: args.data_dir.clone(),
        log: args.log.clone(),
        ..Overrides::default()
    };
    let (config, _) = config::load(args.config.as_deref(), &flags, |name| {
        std::env::var_os(name)
    })?;
    crate::run::init_logging(&config.log.level)?;
    let store = crate::platform::open_store(&config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .map_err(Failure::Runtime)?;
    let result = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let on_signal = shutdown.clone();
        let mut signals = crate::run::Signals::register()
            .context("cannot install signal handlers")
            .map_err(Failure::Runtime)?;
        tokio::spawn(async move {
            signals.recv().await;
            on_signal.cancel();
        });
        let bus = Arc::new(MqttBus::new(args.mqtt_connect));
        polyhub_hub::run_child_parser(&args.hub, config.hub, store, bus, shutdown)
            .await
            .map_err(|error| Failure::Runtime(anyhow!("parser of hub {}: {error}", args.hub)))
    });
    // Standard input is read on a blocking thread that stays parked in read(2) until the
    // parent closes the pipe; waiting for it at runtime drop would keep a stopped child alive.
    runtime.shutdown_background();
    result
}
