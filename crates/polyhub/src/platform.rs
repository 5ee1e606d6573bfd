//! The IoT platform on top of the broker: storage, the hub manager with its parsers, and the
//! REST API. This is where their concrete types meet: [`SqliteStore`] behind `dyn Store`, the
//! embedded broker (or, with `[external_broker]`, an external one over [`MqttBus`]) behind the
//! hub's bus traits, the hub manager behind the API's [`HubRuntime`].
//!
//! With an external broker, who is connected is out of sight: the embedded broker's
//! connection events are not used, and presence comes from the devices' own presence
//! messages (the hub `presence` channel), which the parsers store and the MQTT command client
//! follows.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow};
use async_trait::async_trait;
use polyhub_api::{ApiState, CommandRuntime, DeviceAccount, HubRuntime, RuntimeError};
use polyhub_broker::Broker;
use polyhub_hub::bus::{BusConnector, PresenceEvent};
use polyhub_hub::{HubError, HubManager, ManagerDeps, ProcessParserCommand};
use polyhub_polyglot::backends::mqtt::{MqttClientFactory, PresenceTable};
use polyhub_polyglot::{
    BackendClient, BackendError, BackendEvent, ClientRegistry, CommandError, CommandService,
    FactoryContext, Polyglot,
};
use polyhub_store::{Command, Device, ParserStatus, SqliteStore, Store};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::Failure;
use crate::bus::mqtt::MqttBusOptions;
use crate::bus::{LocalBus, MqttBus};
use crate::config::{BrokerUrl, Config};

/// Client id of the connection that checks, at start, that the external broker answers.
const START_CHECK_CLIENT_ID: &str = "polyhub-start-check";

/// The running platform: what shutdown waits for.
pub(crate) struct Platform {
    manager_task: JoinHandle<()>,
    commands_task: JoinHandle<()>,
    api_task: JoinHandle<std::io::Result<()>>,
    /// The bus to the external broker, whose closing connections are waited for.
    external_bus: Option<Arc<MqttBus>>,
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform").finish_non_exhaustive()
    }
}

/// Opens the store (running migrations) before anything listens, so a database that cannot
/// be used stops the start like any other configuration error.
pub(crate) fn open_store(config: &Config) -> Result<Arc<dyn Store>, Failure> {
    let store = SqliteStore::open(&config.data_dir, &config.storage.sqlite)
        .map_err(|error| Failure::Runtime(anyhow!("storage: {error}")))?;
    Ok(Arc::new(store))
}

/// What `polyhub parser` children need to find the parent again.
pub(crate) struct ChildSettings<'a> {
    /// The embedded broker's MQTT listener; `None` when it does not listen (external broker).
    pub(crate) mqtt_address: Option<SocketAddr>,
    pub(crate) config_file: Option<&'a Path>,
}

/// Starts the hub manager (and with it the parsers of running hubs) and the REST API on
/// `http`. Both stop when `shutdown` is cancelled; [`Platform::finish`] waits for them.
pub(crate) async fn start(
    config: &Config,
    broker: &Broker,
    store: Arc<dyn Store>,
    http: TcpListener,
    child: ChildSettings<'_>,
    shutdown: CancellationToken,
) -> Result<Platform, Failure> {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("cannot install the metrics recorder")
        .map_err(Failure::Runtime)?;

    let external = match &config.external_broker {
        Some(external) => Some(external.bus_options().map_err(Failure::from)?),
        None => None,
    };
    let external_bus = match &external {
        Some(options) => Some(Arc::new(connect_external(options).await?)),
        None => None,
    };
    let bus: Arc<dyn polyhub_hub::bus::BusConnector> = match &external_bus {
        Some(external_bus) => external_bus.clone(),
        None => Arc::new(LocalBus::new(broker.clone())),
    };
    // Who is connected matters to the hub (presence rows) and to the command service (when to
    // send); one feed from the broker serves both. An external broker's connections are out
    // of sight: presence messages stand in for them (parsers, MQTT command client).
    let (hub_presence, command_presence) = if external.is_none() {
        let (hub, commands) = split_presence(forward_presence(broker, shutdown.clone()));
        (Some(hub), Some(commands))
    } else {
        (None, None)
    };
    let (registrations, mut registered) = mpsc::unbounded_channel();
    let deps = ManagerDeps {
        store: store.clone(),
        bus: bus.clone(),
        presence: hub_presence,
        process_parser: Some(process_parser_command(config, &child)?),
        registrations: Some(registrations),
    };
    let (manager, manager_task) = HubManager::start(config.hub.clone(), deps, shutdown.clone())
        .await
        .map_err(|error| Failure::Runtime(anyhow!("hub manager: {error}")))?;

    // Polyglot: the protocol clients from `[polyglot.*]`, built through the registry of the
    // factories this binary knows, and the command service over them.
    let mqtt_factory = if external.is_some() {
        // Only the devices' presence messages say who is there.
        MqttClientFactory::new(PresenceTable::default()).with_external_hub()
    } else {
        // The broker's sessions say who can be sent to: a device counts as reachable once it
        // has subscribed, and a command goes out once it has subscribed to that command's
        // topic; ids without a session (sgframework resource names) fall back to the
        // presence their messages report.
        let sessions = broker.clone();
        let subscriptions = broker.clone();
        MqttClientFactory::new(
            PresenceTable::with_connections(Arc::new(move |device_id: &str| {
                sessions.client_reachable(device_id)
            }))
            .with_subscriptions(Arc::new(move |device_id: &str, topic: &str| {
                subscriptions.client_subscribed(device_id, topic)
            })),
        )
    };
    let mqtt_factory = mqtt_factory.with_external(Arc::new(commands_only_broker));
    let registry = ClientRegistry::new()
        .with(Box::new(mqtt_factory))
        .with(Box::new(polyhub_xmpp::XmppClientFactory));
    let (events, backend_events) = mpsc::channel::<BackendEvent>(4096);
    let context = FactoryContext {
        events,
        store: store.clone(),
        shutdown: shutdown.clone(),
        bus: Some(bus.clone()),
        channels: config.hub.channels.clone(),
    };
    let polyglot = Polyglot::build(&config.polyglot, &registry, context)
        .await
        .map_err(|error| Failure::Runtime(anyhow!("polyglot: {error}")))?;
    // Device accounts go straight to the protocol's client; the command service has the same
    // clients for commands.
    let accounts = polyglot.clone();
    let (commands, commands_task) = CommandService::start(
        store.clone(),
        polyglot,
        backend_events,
        config.commands.clone(),
        shutdown.clone(),
    );
    if let Some(mut command_presence) = command_presence {
        let presence_commands = commands.clone();
        tokio::spawn(async move {
            while let Some(event) = command_presence.recv().await {
                presence_commands
                    .device_presence(&event.client_id, event.online)
                    .await;
            }
        });
        // A device that just subscribed may be what its commands were waiting for.
        forward_subscriptions(broker, commands.clone(), shutdown.clone());
    }
    // Devices added through a hub's register channel: their protocol clients follow them at
    // once, as for devices added through the API (ManagerRuntime::device_added).
    let registered_commands = commands.clone();
    tokio::spawn(async move {
        while let Some(device) = registered.recv().await {
            if let Err(error) = registered_commands.device_added(&device).await {
                warn!(device = %device.id, "protocol client not told about the new device: {error}");
            }
        }
    });

    let router = polyhub_api::router_with_config(
        ApiState {
            store,
            runtime: Arc::new(ManagerRuntime {
                manager,
                commands: commands.clone(),
                bus,
            }),
            commands: Some(Arc::new(CommandsRuntime { commands, accounts })),
            metrics: Some(metrics),
        },
        &config.http,
    );
    let address = http
        .local_addr()
        .context("cannot read the HTTP listener's address")
        .map_err(Failure::Runtime)?;
    info!("HTTP listening on {address}");
    let api_task = tokio::spawn(polyhub_api::serve(http, router, shutdown));
    Ok(Platform {
        manager_task,
        commands_task,
        api_task,
        external_bus,
    })
}

impl Platform {
    /// Waits for the API and the manager (which commits and acknowledges what its parsers
    /// received) to stop after the shutdown token was cancelled.
    pub(crate) async fn finish(self) {
        match self.api_task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!("HTTP server stopped with an error: {error}"),
            Err(error) => warn!("HTTP server task ended abnormally: {error}"),
        }
        if let Err(error) = self.manager_task.await {
            warn!("hub manager task ended abnormally: {error}");
        }
        if let Err(error) = self.commands_task.await {
            warn!("command service task ended abnormally: {error}");
        }
        // The parsers' last acknowledgements reach the external broker before we exit.
        if let Some(bus) = self.external_bus {
            bus.closed().await;
        }
    }
}

/// The hub's bus on the external broker, after one connection proved that the broker answers
/// and takes our login: a wrong address or password is one clear line at start rather than
/// parsers failing and retrying in the background. Connections lost later are retried.
async fn connect_external(options: &MqttBusOptions) -> Result<MqttBus, Failure> {
    let bus = MqttBus::with_options(options.clone());
    let address = options.describe();
    match polyhub_hub::bus::BusConnector::connect(&bus, START_CHECK_CLIENT_ID, false).await {
        Ok(check) => drop(check),
        Err(error) => {
            return Err(Failure::Runtime(anyhow!(
                "cannot connect to the external MQTT broker {address}: {}",
                bus_error_reason(&error)
            )));
        }
    }
    info!("using the external MQTT broker {address}; the embedded broker does not listen");
    Ok(bus)
}

/// The reason inside a bus error, without the bus's own wording around it.
fn bus_error_reason(error: &polyhub_hub::bus::BusError) -> String {
    use polyhub_hub::bus::BusError;
    match error {
        BusError::Closed(reason) | BusError::Refused(reason) | BusError::Other(reason) => {
            reason.clone()
        }
    }
}

/// A `[polyglot.<name>]` client of type mqtt with `broker = "mqtt://HOST:PORT"` (or
/// `"HOST:PORT"`): a broker for commands alone, without login or TLS (those are only
/// configurable for `[external_broker]`).
fn commands_only_broker(address: &str) -> Result<Arc<dyn polyhub_hub::bus::BusConnector>, String> {
    let url = if address.contains("://") {
        address.to_owned()
    } else {
        format!("mqtt://{address}")
    };
    let url = BrokerUrl::parse(&url)?;
    if url.tls {
        return Err(
            "mqtts:// is only supported for [external_broker] (which has ca_file)".to_owned(),
        );
    }
    Ok(Arc::new(MqttBus::with_options(MqttBusOptions::to_host(
        url.host, url.port,
    ))))
}

/// Tells the command service of each device that subscribes on the embedded broker, so that
/// commands held back until the device could receive them go out at once.
fn forward_subscriptions(broker: &Broker, commands: CommandService, shutdown: CancellationToken) {
    let mut subscribed = broker.subscription_events();
    tokio::spawn(async move {
        while let Some(event) = next_broadcast(&mut subscribed, &shutdown).await {
            match event {
                Ok(client_id) => commands.device_subscribed(&client_id).await,
                // The missed ones are retried on the service's timer (about a second).
                Err(missed) => {
                    debug!("commands: {missed} subscription events were missed under load");
                }
            }
        }
    });
}

/// The next event of a broker broadcast, `Err(missed)` after falling behind, `None` once the
/// broker is gone or `shutdown` is cancelled.
async fn next_broadcast<T: Clone>(
    events: &mut tokio::sync::broadcast::Receiver<T>,
    shutdown: &CancellationToken,
) -> Option<Result<T, u64>> {
    use tokio::sync::broadcast::error::RecvError;
    let event = tokio::select! {
        () = shutdown.cancelled() => return None,
        event = events.recv() => event,
    };
    match event {
        Ok(event) => Some(Ok(event)),
        Err(RecvError::Lagged(missed)) => Some(Err(missed)),
        Err(RecvError::Closed) => None,
    }
}

/// The broker's connect/disconnect events as the hub's presence events. Clients already
/// connected when this starts are reported online first.
fn forward_presence(broker: &Broker, shutdown: CancellationToken) -> mpsc::Receiver<PresenceEvent> {
    let (sender, receiver) = mpsc::channel(1024);
    let mut events = broker.presence_events();
    let connected = broker.connected_clients();
    tokio::spawn(async move {
        let now = polyhub_store::now_millis();
        for client_id in connected {
            let event = PresenceEvent {
                client_id,
                online: true,
                at: now,
            };
            if sender.send(event).await.is_err() {
                return;
            }
        }
        while let Some(event) = next_broadcast(&mut events, &shutdown).await {
            match event {
                Ok(event) => {
                    let at = event
                        .at
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |since| {
                            i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
                        });
                    let event = PresenceEvent {
                        client_id: event.client_id,
                        online: event.online,
                        at,
                    };
                    if sender.send(event).await.is_err() {
                        return;
                    }
                }
                Err(missed) => {
                    warn!("presence: {missed} connection events were missed under load");
                }
            }
        }
    });
    receiver
}

/// Copies each presence event to two consumers; the second one may lag behind the first
/// without slowing it (its channel is unbounded: presence events are small and rare).
fn split_presence(
    mut events: mpsc::Receiver<PresenceEvent>,
) -> (
    mpsc::Receiver<PresenceEvent>,
    mpsc::UnboundedReceiver<PresenceEvent>,
) {
    let (first, first_receiver) = mpsc::channel(1024);
    let (second, second_receiver) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let _ = second.send(event.clone());
            if first.send(event).await.is_err() {
                break;
            }
        }
    });
    (first_receiver, second_receiver)
}

/// `polyhub parser ... --hub ID` as the manager spawns it: this very executable, pointed at
/// the parent's MQTT listener, data directory and configuration file.
fn process_parser_command(
    config: &Config,
    child: &ChildSettings<'_>,
) -> Result<ProcessParserCommand, Failure> {
    let program = std::env::current_exe()
        .context("cannot locate the polyhub executable for process-isolated parsers")
        .map_err(Failure::Runtime)?;
    let data_dir = absolute(&config.data_dir)?;
    // The URL is passed on because it may have come from a flag; the rest of
    // [external_broker] comes from the same file and the inherited environment.
    let broker = match (&config.external_broker, child.mqtt_address) {
        (Some(external), _) => ["--external-broker".to_owned(), external.url.clone()],
        (None, Some(address)) => ["--mqtt-connect".to_owned(), address.to_string()],
        (None, None) => {
            return Err(Failure::Runtime(anyhow!(
                "process-isolated parsers need the embedded broker's MQTT listener"
            )));
        }
    };
    let mut args = vec!["parser".to_owned()];
    args.extend(broker);
    args.extend([
        "--data-dir".to_owned(),
        data_dir.display().to_string(),
        "--log".to_owned(),
        config.log.level.clone(),
    ]);
    if let Some(file) = child.config_file {
        args.push("--config".to_owned());
        args.push(absolute(file)?.display().to_string());
    }
    Ok(ProcessParserCommand { program, args })
}

fn absolute(path: &Path) -> Result<PathBuf, Failure> {
    std::path::absolute(path)
        .with_context(|| format!("cannot resolve {}", path.display()))
        .map_err(Failure::Runtime)
}

/// The hub manager as the API sees it; devices it adds are also announced to the command
/// service, whose protocol clients may need to follow them (XMPP presence).
#[derive(Debug)]
struct ManagerRuntime {
    manager: HubManager,
    commands: CommandService,
    /// The hub's bus, whose sessions outlive parsers (and must end with their hub).
    bus: Arc<dyn BusConnector>,
}

fn runtime_error(error: HubError) -> RuntimeError {
    match error {
        HubError::NotFound(message) => RuntimeError::NotFound(message),
        HubError::Conflict(message) => RuntimeError::Conflict(message),
        HubError::Invalid(message) => RuntimeError::Invalid(message),
        other => RuntimeError::Failed(other.to_string()),
    }
}

#[async_trait]
impl HubRuntime for ManagerRuntime {
    async fn start_hub(&self, hub_id: &str) -> Result<ParserStatus, RuntimeError> {
        self.manager.start_hub(hub_id).await.map_err(runtime_error)
    }

    async fn stop_hub(&self, hub_id: &str) -> Result<ParserStatus, RuntimeError> {
        self.manager.stop_hub(hub_id).await.map_err(runtime_error)
    }

    async fn restart_hub(&self, hub_id: &str) -> Result<ParserStatus, RuntimeError> {
        self.manager
            .restart_hub(hub_id)
            .await
            .map_err(runtime_error)
    }

    async fn device_added(&self, device: &Device) -> Result<(), RuntimeError> {
        self.manager
            .device_added(device)
            .await
            .map_err(runtime_error)?;
        if let Err(error) = self.commands.device_added(device).await {
            // Not fatal: the client follows the device at its next login at the latest.
            warn!(device = %device.id, "protocol client not told about the new device: {error}");
        }
        Ok(())
    }

    async fn hub_deleted(&self, hub_id: &str) -> Result<(), RuntimeError> {
        // A clean connect with the parser's id ends its persistent session, whichever kind.
        let client = self
            .bus
            .connect(&polyhub_hub::parser_client_id(hub_id), false)
            .await
            .map_err(|error| RuntimeError::Failed(error.to_string()))?;
        drop(client);
        Ok(())
    }

    async fn device_removed(&self, hub_id: &str, device_id: &str) -> Result<(), RuntimeError> {
        self.manager
            .device_removed(hub_id, device_id)
            .await
            .map_err(runtime_error)
    }

    fn parser_status(&self, hub_id: &str) -> Option<ParserStatus> {
        self.manager.status(hub_id)
    }

    fn parsers(&self) -> Vec<ParserStatus> {
        self.manager.statuses()
    }

    fn is_ready(&self) -> bool {
        self.manager.is_ready()
    }
}

/// The command service (and the protocol clients, for device accounts) as the API sees it.
#[derive(Debug)]
struct CommandsRuntime {
    commands: CommandService,
    accounts: Polyglot,
}

impl CommandsRuntime {
    fn client_of(&self, device: &Device) -> Result<Arc<dyn BackendClient>, RuntimeError> {
        self.accounts.client(&device.protocol).ok_or_else(|| {
            RuntimeError::Invalid(format!(
                "no polyglot client for protocol {:?}",
                device.protocol
            ))
        })
    }
}

fn no_accounts(device: &Device) -> RuntimeError {
    RuntimeError::Invalid(format!(
        "protocol {:?} does not manage device accounts",
        device.protocol
    ))
}

fn account_error(device: &Device, error: BackendError) -> RuntimeError {
    match error {
        BackendError::Rejected(message) => RuntimeError::Conflict(message),
        // The client's own reason (say, XMPP component mode) says more than ours.
        BackendError::Unsupported(message) => RuntimeError::Invalid(message),
        BackendError::Config(_) => no_accounts(device),
        BackendError::Unavailable(message) => RuntimeError::Failed(message),
    }
}

fn command_error(error: CommandError) -> RuntimeError {
    match error {
        CommandError::NotFound(message) => RuntimeError::NotFound(message),
        CommandError::Invalid(message) => RuntimeError::Invalid(message),
        CommandError::Conflict(message) => RuntimeError::Conflict(message),
        CommandError::PayloadTooLarge(message) => RuntimeError::PayloadTooLarge(message),
        CommandError::Unavailable(message) | CommandError::Failed(message) => {
            RuntimeError::Failed(message)
        }
    }
}

#[async_trait]
impl CommandRuntime for CommandsRuntime {
    async fn submit(
        &self,
        device_id: &str,
        request: polyhub_api::CommandRequest,
    ) -> Result<Command, RuntimeError> {
        let request = polyhub_polyglot::CommandRequest {
            name: request.name,
            payload: request.payload,
            ttl_ms: request.ttl_ms,
        };
        self.commands
            .submit(device_id, request)
            .await
            .map_err(command_error)
    }

    async fn wait(&self, id: &str, timeout: std::time::Duration) -> Result<Command, RuntimeError> {
        self.commands.wait(id, timeout).await.map_err(command_error)
    }

    async fn cancel(&self, id: &str) -> Result<Command, RuntimeError> {
        self.commands.cancel(id).await.map_err(command_error)
    }

    async fn create_account(&self, device: &Device) -> Result<DeviceAccount, RuntimeError> {
        match self.client_of(device)?.provision_device(device).await {
            Ok(Some(credentials)) => Ok(DeviceAccount {
                username: credentials.username,
                password: credentials.password,
            }),
            Ok(None) => Err(no_accounts(device)),
            Err(error) => Err(account_error(device, error)),
        }
    }

    async fn remove_account(&self, device: &Device) -> Result<(), RuntimeError> {
        self.client_of(device)?
            .remove_device(device)
            .await
            .map_err(|error| account_error(device, error))
    }
}
