//! `polyhub parser --hub ID`: one hub's parser in its own process.
//!
//! The hub manager of a `polyhub run` starts this for hubs in process isolation. It reads the
//! same configuration as its parent, opens the same database, connects over MQTT to the
//! parent's broker (`--mqtt-connect`) or to the external broker the parent uses
//! (`--external-broker`, with the rest of `[external_broker]` from the same file and
//! environment), and speaks the JSON-lines protocol of `polyhub_hub::child` on its standard input
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
        external_broker: args.external_broker.clone(),
        ..Overrides::default()
    };
    let (config, _) = config::load(args.config.as_deref(), &flags, |name| {
        std::env::var_os(name)
    })?;
    let bus = match (args.mqtt_connect, &config.external_broker) {
        (Some(address), _) => MqttBus::new(address),
        (None, Some(external)) => MqttBus::with_options(external.bus_options()?),
        (None, None) => {
            return Err(Failure::Config(anyhow!(
                "polyhub parser needs --mqtt-connect ADDR or an external broker"
            )));
        }
    };
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
        let bus = Arc::new(bus);
        let result =
            polyhub_hub::run_child_parser(&args.hub, config.hub, store, bus.clone(), shutdown)
                .await
                .map_err(|error| Failure::Runtime(anyhow!("parser of hub {}: {error}", args.hub)));
        // The last acknowledgements go out before the process ends.
        bus.closed().await;
        result
    });
    // Standard input is read on a blocking thread that stays parked in read(2) until the
    // parent closes the pipe; waiting for it at runtime drop would keep a stopped child alive.
    runtime.shutdown_background();
    result
}
