//! The hub manager: starts, stops and supervises one parser per running hub, serves the control
//! channels, and records presence.
//!
//! [`HubManager`] is a cheap handle: requests go over a channel to one task that owns the
//! supervisors, so every start, stop and device change is applied in order. Parser status is
//! shared through `watch` channels, so [`HubManager::status`] never waits for that task.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use polyhub_store::{
    DesiredState, Device, Hub, ListQuery, NewDevice, ParserState, ParserStatus, Store, StoreError,
    now_millis,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::bus::{BusClient, BusConnector, BusMessage, Outgoing, PresenceEvent};
use crate::config::HubConfig;
use crate::control::{
    ManagerAction, RegisterRequest, RejectCode, accepted_reply, parse_manager, parse_register,
    rejected_reply,
};
use crate::error::HubError;
use crate::parser::{ParserCommand, ParserContext};
pub use crate::supervisor::ProcessParserCommand;
use crate::supervisor::{SupervisorSpec, spawn_supervisor};

/// The bus client id of the manager's control-channel session.
pub const MANAGER_CLIENT_ID: &str = "polyhub-hub-manager";

/// How long `start_hub`/`restart_hub` wait for the parser to report ready (or fail) before
/// returning its status as it is.
const START_WAIT: Duration = Duration::from_secs(5);

/// Delay between attempts to reconnect the control channels.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Hubs listed from the store per page at start-up.
const HUB_PAGE: u32 = 1000;

/// What the manager runs on.
#[derive(Debug)]
pub struct ManagerDeps {
    pub store: Arc<dyn Store>,
    pub bus: Arc<dyn BusConnector>,
    /// Connection changes of broker clients; a client whose id is a device id sets that
    /// device's presence.
    pub presence: Option<mpsc::Receiver<PresenceEvent>>,
    /// How to spawn parsers of hubs in process isolation; without it such hubs fail to start.
    pub process_parser: Option<ProcessParserCommand>,
    /// Told of every device added through a hub's register channel, for whoever else follows
    /// the registry (the protocol clients of the command service; devices added through the
    /// API reach them from the API's side).
    pub registrations: Option<mpsc::UnboundedSender<Device>>,
}

/// State shared between the handles and the manager task.
#[derive(Debug, Default)]
struct Shared {
    statuses: Mutex<BTreeMap<String, Arc<watch::Sender<ParserStatus>>>>,
    ready: AtomicBool,
}

/// A handle to the hub manager. Cheap to clone; every clone talks to the same manager.
#[derive(Debug, Clone)]
pub struct HubManager {
    requests: mpsc::Sender<Request>,
    shared: Arc<Shared>,
}

type Reply<T> = oneshot::Sender<Result<T, HubError>>;

#[derive(Debug)]
enum Request {
    Start {
        hub_id: String,
        reply: Reply<watch::Receiver<ParserStatus>>,
    },
    Stop {
        hub_id: String,
        reply: Reply<ParserStatus>,
    },
    Restart {
        hub_id: String,
        reply: Reply<watch::Receiver<ParserStatus>>,
    },
    AddDevice {
        device: NewDevice,
        reply: Reply<Device>,
    },
    RemoveDevice {
        device_id: String,
        reply: Reply<()>,
    },
    DeviceAdded {
        hub_id: String,
        device_id: String,
        reply: Reply<()>,
    },
    DeviceRemoved {
        hub_id: String,
        device_id: String,
        reply: Reply<()>,
    },
}

impl HubManager {
    /// Starts the manager: subscribes the control channels, starts the parser of every hub
    /// whose desired state is running, and records presence events. Everything stops when
    /// `shutdown` is cancelled; the returned task ends once every parser has committed and
    /// acknowledged what it received.
    pub async fn start(
        config: HubConfig,
        deps: ManagerDeps,
        shutdown: CancellationToken,
    ) -> Result<(HubManager, JoinHandle<()>), HubError> {
        config.validate()?;
        let config = Arc::new(config);
        let shared = Arc::new(Shared::default());
        let mut core = ManagerCore {
            config,
            store: deps.store,
            bus: deps.bus,
            process_parser: deps.process_parser,
            registrations: deps.registrations,
            shared: shared.clone(),
            supervisors: HashMap::new(),
            shutdown: shutdown.clone(),
        };
        let control = core.connect_control().await?;
        core.start_desired_hubs().await?;
        let presence = deps.presence.map(|events| {
            tokio::spawn(record_presence(
                core.store.clone(),
                events,
                shutdown.clone(),
            ))
        });
        let (requests, receiver) = mpsc::channel(256);
        shared.ready.store(true, Ordering::SeqCst);
        let task = tokio::spawn(core.run(receiver, control, presence));
        Ok((HubManager { requests, shared }, task))
    }

    async fn request<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, HubError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(make(reply))
            .await
            .map_err(|_| HubError::ShutDown)?;
        answer.await.map_err(|_| HubError::ShutDown)?
    }

    /// Starts the hub's parser (persisting the desired state `running`) and returns its status
    /// once it is running or has failed (or after a few seconds).
    pub async fn start_hub(&self, hub_id: &str) -> Result<ParserStatus, HubError> {
        let hub_id = hub_id.to_owned();
        let status = self
            .request(|reply| Request::Start { hub_id, reply })
            .await?;
        Ok(settle(status).await)
    }

    /// Stops the hub's parser after it committed what it received (persisting `stopped`).
    pub async fn stop_hub(&self, hub_id: &str) -> Result<ParserStatus, HubError> {
        let hub_id = hub_id.to_owned();
        self.request(|reply| Request::Stop { hub_id, reply }).await
    }

    /// Stops then starts the hub's parser (persisting `running`).
    pub async fn restart_hub(&self, hub_id: &str) -> Result<ParserStatus, HubError> {
        let hub_id = hub_id.to_owned();
        let status = self
            .request(|reply| Request::Restart { hub_id, reply })
            .await?;
        Ok(settle(status).await)
    }

    /// Creates the device and returns once its hub's running parser subscribed its channel.
    /// If the parser refuses, the device is deleted again.
    pub async fn add_device(&self, device: NewDevice) -> Result<Device, HubError> {
        self.request(|reply| Request::AddDevice { device, reply })
            .await
    }

    /// Unsubscribes the device's channel, then deletes the device.
    pub async fn remove_device(&self, device_id: &str) -> Result<(), HubError> {
        let device_id = device_id.to_owned();
        self.request(|reply| Request::RemoveDevice { device_id, reply })
            .await
    }

    /// A device was created by someone else (the API): its hub's running parser subscribes
    /// its channel before this returns.
    pub async fn device_added(&self, device: &Device) -> Result<(), HubError> {
        let (hub_id, device_id) = (device.hub_id.clone(), device.id.clone());
        self.request(|reply| Request::DeviceAdded {
            hub_id,
            device_id,
            reply,
        })
        .await
    }

    /// A device is being deleted by someone else: its hub's running parser unsubscribes its
    /// channel before this returns.
    pub async fn device_removed(&self, hub_id: &str, device_id: &str) -> Result<(), HubError> {
        let (hub_id, device_id) = (hub_id.to_owned(), device_id.to_owned());
        self.request(|reply| Request::DeviceRemoved {
            hub_id,
            device_id,
            reply,
        })
        .await
    }

    /// The status of a hub's parser; `None` for a hub the manager has not seen.
    pub fn status(&self, hub_id: &str) -> Option<ParserStatus> {
        self.shared
            .statuses
            .lock()
            .get(hub_id)
            .map(|status| status.borrow().clone())
    }

    /// The status of every parser the manager has seen, by hub id.
    pub fn statuses(&self) -> Vec<ParserStatus> {
        self.shared
            .statuses
            .lock()
            .values()
            .map(|status| status.borrow().clone())
            .collect()
    }

    /// Whether start-up finished and the manager has not shut down.
    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::SeqCst)
    }
}

/// Waits (boundedly) until a freshly started parser leaves `starting`.
async fn settle(mut status: watch::Receiver<ParserStatus>) -> ParserStatus {
    let _ = tokio::time::timeout(
        START_WAIT,
        status.wait_for(|status| status.state != ParserState::Starting),
    )
    .await;
    status.borrow().clone()
}

#[derive(Debug)]
struct SupervisorHandle {
    commands: mpsc::Sender<ParserCommand>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// The manager task's state.
#[derive(Debug)]
struct ManagerCore {
    config: Arc<HubConfig>,
    store: Arc<dyn Store>,
    bus: Arc<dyn BusConnector>,
    process_parser: Option<ProcessParserCommand>,
    registrations: Option<mpsc::UnboundedSender<Device>>,
    shared: Arc<Shared>,
    supervisors: HashMap<String, SupervisorHandle>,
    shutdown: CancellationToken,
}

async fn recv_control(
    control: &mut Option<Box<dyn BusClient>>,
) -> Result<Option<BusMessage>, crate::bus::BusError> {
    match control {
        Some(client) => client.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// A refusal on a control channel.
type Refusal = (RejectCode, String);

fn internal(error: impl std::fmt::Display) -> Refusal {
    (RejectCode::Internal, error.to_string())
}

impl ManagerCore {
    async fn connect_control(&self) -> Result<Box<dyn BusClient>, HubError> {
        let mut client = self.bus.connect(MANAGER_CLIENT_ID, true).await?;
        let channels = &self.config.channels;
        client
            .subscribe(&[channels.register_filter(), channels.manager.clone()])
            .await?;
        Ok(client)
    }

    async fn run(
        mut self,
        mut requests: mpsc::Receiver<Request>,
        control: Box<dyn BusClient>,
        presence: Option<JoinHandle<()>>,
    ) {
        let mut control = Some(control);
        let mut requests_open = true;
        let mut reconnect_at: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                request = requests.recv(), if requests_open => match request {
                    Some(request) => self.handle(request).await,
                    None => requests_open = false,
                },
                message = recv_control(&mut control) => match message {
                    Ok(Some(message)) => {
                        if let Some(client) = control.as_mut()
                            && !self.handle_control(client.as_mut(), message).await
                        {
                            control = None;
                            reconnect_at = Some(Instant::now() + RECONNECT_DELAY);
                        }
                    }
                    Ok(None) | Err(_) => {
                        warn!("hub manager: control channel connection lost; reconnecting");
                        control = None;
                        reconnect_at = Some(Instant::now() + RECONNECT_DELAY);
                    }
                },
                () = sleep_until(reconnect_at) => {
                    reconnect_at = None;
                    match self.connect_control().await {
                        Ok(client) => control = Some(client),
                        Err(error) => {
                            warn!("hub manager: cannot reconnect the control channels: {error}");
                            reconnect_at = Some(Instant::now() + RECONNECT_DELAY);
                        }
                    }
                }
            }
        }
        self.shared.ready.store(false, Ordering::SeqCst);
        // Stop every parser at once; each commits and acknowledges what it holds.
        let supervisors: Vec<SupervisorHandle> =
            self.supervisors.drain().map(|(_, handle)| handle).collect();
        for handle in &supervisors {
            handle.stop.cancel();
        }
        for handle in supervisors {
            let _ = handle.task.await;
        }
        if let Some(presence) = presence {
            let _ = presence.await;
        }
        info!("hub manager stopped");
    }

    async fn handle(&mut self, request: Request) {
        match request {
            Request::Start { hub_id, reply } => {
                let _ = reply.send(self.start_hub(&hub_id).await);
            }
            Request::Stop { hub_id, reply } => {
                let _ = reply.send(self.stop_hub(&hub_id).await);
            }
            Request::Restart { hub_id, reply } => {
                let _ = reply.send(self.restart_hub(&hub_id).await);
            }
            Request::AddDevice { device, reply } => {
                let _ = reply.send(self.add_device(device).await);
            }
            Request::RemoveDevice { device_id, reply } => {
                let _ = reply.send(self.remove_device(&device_id).await);
            }
            Request::DeviceAdded {
                hub_id,
                device_id,
                reply,
            } => {
                let _ = reply.send(self.device_command(&hub_id, &device_id, true).await);
            }
            Request::DeviceRemoved {
                hub_id,
                device_id,
                reply,
            } => {
                let _ = reply.send(self.device_command(&hub_id, &device_id, false).await);
            }
        }
    }

    /// The status channel of a hub, created (as stopped) on first sight.
    fn status_of(&self, hub: &Hub) -> Arc<watch::Sender<ParserStatus>> {
        let mut statuses = self.shared.statuses.lock();
        statuses
            .entry(hub.id.clone())
            .or_insert_with(|| {
                Arc::new(watch::Sender::new(ParserStatus {
                    hub_id: hub.id.clone(),
                    state: ParserState::Stopped,
                    isolation: hub.settings.isolation.unwrap_or(self.config.isolation),
                    pid: None,
                    restarts: 0,
                    last_error: None,
                    since: now_millis(),
                    devices: 0,
                    messages_in: 0,
                    rows_written: 0,
                    dead_letters: 0,
                    duplicates_skipped: 0,
                    last_batch_messages: 0,
                    last_lag_ms: 0,
                }))
            })
            .clone()
    }

    async fn start_desired_hubs(&mut self) -> Result<(), HubError> {
        let mut after = None;
        loop {
            let page = self
                .store
                .list_hubs(ListQuery {
                    parent: None,
                    after: after.clone(),
                    limit: HUB_PAGE,
                })
                .await?;
            let full = page.len() >= HUB_PAGE as usize;
            after = page.last().map(|hub| hub.id.clone());
            for hub in page {
                self.status_of(&hub);
                if hub.desired_state == DesiredState::Running {
                    self.ensure_supervisor(&hub);
                }
            }
            if !full || after.is_none() {
                return Ok(());
            }
        }
    }

    /// Starts supervising the hub's parser unless it already is.
    fn ensure_supervisor(&mut self, hub: &Hub) -> Arc<watch::Sender<ParserStatus>> {
        let status = self.status_of(hub);
        if self
            .supervisors
            .get(&hub.id)
            .is_some_and(|handle| !handle.task.is_finished())
        {
            return status;
        }
        status.send_modify(|status| {
            status.state = ParserState::Starting;
            status.since = now_millis();
        });
        let (commands, receiver) = mpsc::channel(64);
        let stop = self.shutdown.child_token();
        let spec = SupervisorSpec {
            context: ParserContext {
                hub_id: hub.id.clone(),
                config: self.config.clone(),
                store: self.store.clone(),
                bus: self.bus.clone(),
            },
            process: self.process_parser.clone(),
            status: status.clone(),
        };
        let task = spawn_supervisor(spec, receiver, stop.clone());
        info!(hub = %hub.id, "starting the hub's parser");
        self.supervisors.insert(
            hub.id.clone(),
            SupervisorHandle {
                commands,
                stop,
                task,
            },
        );
        status
    }

    /// Stops the hub's supervisor (and parser) and waits until it has finished.
    async fn stop_supervisor(&mut self, hub_id: &str) {
        if let Some(handle) = self.supervisors.remove(hub_id) {
            info!(hub = %hub_id, "stopping the hub's parser");
            handle.stop.cancel();
            let _ = handle.task.await;
        }
    }

    async fn start_hub(&mut self, hub_id: &str) -> Result<watch::Receiver<ParserStatus>, HubError> {
        let mut hub = self.store.get_hub(hub_id).await?;
        if hub.desired_state != DesiredState::Running {
            hub = self
                .store
                .set_hub_desired_state(hub_id, DesiredState::Running)
                .await?;
        }
        Ok(self.ensure_supervisor(&hub).subscribe())
    }

    async fn stop_hub(&mut self, hub_id: &str) -> Result<ParserStatus, HubError> {
        let mut hub = self.store.get_hub(hub_id).await?;
        if hub.desired_state != DesiredState::Stopped {
            hub = self
                .store
                .set_hub_desired_state(hub_id, DesiredState::Stopped)
                .await?;
        }
        self.stop_supervisor(hub_id).await;
        let status = self.status_of(&hub);
        let current = status.borrow().clone();
        Ok(current)
    }

    async fn restart_hub(
        &mut self,
        hub_id: &str,
    ) -> Result<watch::Receiver<ParserStatus>, HubError> {
        let mut hub = self.store.get_hub(hub_id).await?;
        if hub.desired_state != DesiredState::Running {
            hub = self
                .store
                .set_hub_desired_state(hub_id, DesiredState::Running)
                .await?;
        }
        self.stop_supervisor(hub_id).await;
        Ok(self.ensure_supervisor(&hub).subscribe())
    }

    /// Asks the hub's running parser to (un)subscribe a device and waits for its answer. A hub
    /// without a parser has nothing to do: its next start subscribes from the store.
    async fn device_command(
        &mut self,
        hub_id: &str,
        device_id: &str,
        adding: bool,
    ) -> Result<(), HubError> {
        let Some(handle) = self.supervisors.get(hub_id) else {
            return Ok(());
        };
        let (answer, answered) = oneshot::channel();
        let device_id = device_id.to_owned();
        let command = if adding {
            ParserCommand::AddDevice { device_id, answer }
        } else {
            ParserCommand::RemoveDevice { device_id, answer }
        };
        if handle.commands.send(command).await.is_err() {
            return Ok(());
        }
        match answered.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(HubError::Parser(reason)),
            // The parser ended before answering; its next run subscribes from the store.
            Err(_) => Ok(()),
        }
    }

    async fn add_device(&mut self, new: NewDevice) -> Result<Device, HubError> {
        let device = self.store.create_device(new).await?;
        if let Err(error) = self.device_command(&device.hub_id, &device.id, true).await {
            // Not half-applied: a device its parser cannot hear is taken out again.
            if let Err(undo) = self.store.delete_device(&device.id).await {
                warn!(device = %device.id, "cannot undo the creation of the device: {undo}");
            }
            return Err(error);
        }
        info!(hub = %device.hub_id, device = %device.id, "device added");
        Ok(device)
    }

    async fn remove_device(&mut self, device_id: &str) -> Result<(), HubError> {
        let device = self.store.get_device(device_id).await?;
        self.device_command(&device.hub_id, device_id, false)
            .await?;
        if let Err(error) = self.store.delete_device(device_id).await {
            // Still registered: listen to it again.
            if let Err(undo) = self.device_command(&device.hub_id, device_id, true).await {
                warn!(device = %device_id, "cannot resubscribe the device: {undo}");
            }
            return Err(error.into());
        }
        info!(hub = %device.hub_id, device = %device_id, "device removed");
        Ok(())
    }

    /// Applies one control message and replies. Returns `false` if the connection broke.
    async fn handle_control(&mut self, client: &mut dyn BusClient, message: BusMessage) -> bool {
        let channels = &self.config.channels;
        let (reply_topic, reply) =
            if let Some(hub_id) = channels.parse_register_topic(&message.topic) {
                let hub_id = hub_id.to_owned();
                let reply_topic = channels.register_reply_topic(&hub_id);
                (reply_topic, self.register(&hub_id, &message.payload).await)
            } else if message.topic == channels.manager {
                let reply_topic = channels.manager_reply.clone();
                (reply_topic, self.manage(&message.payload).await)
            } else {
                return client.ack(&[message.token]).await.is_ok();
            };
        let mut replies = vec![Outgoing {
            topic: reply_topic,
            payload: reply.clone(),
            qos: 1,
            retain: false,
            correlation_data: None,
            response_topic: None,
        }];
        if let Some(response_topic) = message.response_topic.filter(|topic| !topic.is_empty()) {
            replies.push(Outgoing {
                topic: response_topic,
                payload: reply,
                qos: 1,
                retain: false,
                correlation_data: message.correlation_data,
                response_topic: None,
            });
        }
        for outgoing in replies {
            if let Err(error) = client.publish(outgoing).await {
                warn!("hub manager: cannot publish a control reply: {error}");
                return false;
            }
        }
        // Acknowledged after the reply: a crash in between re-applies the request, which then
        // answers as a repeat (e.g. `conflict` for an add).
        client.ack(&[message.token]).await.is_ok()
    }

    async fn register(&mut self, hub_id: &str, payload: &[u8]) -> Bytes {
        let request = match parse_register(payload) {
            Ok(request) => request,
            Err(rejection) => {
                info!(hub = %hub_id, "register request rejected: {}", rejection.reason);
                return rejection.to_reply();
            }
        };
        let request_id = request.request_id.as_deref();
        let action = request.body.action();
        let device_id = request.body.device().to_owned();
        match self.apply_register(hub_id, request.body.clone()).await {
            Ok(()) => accepted_reply(request_id, action, hub_id, Some(&device_id)),
            Err((code, reason)) => {
                info!(hub = %hub_id, device = %device_id, "register {action} rejected: {reason}");
                rejected_reply(request_id, code, &reason)
            }
        }
    }

    async fn apply_register(
        &mut self,
        hub_id: &str,
        request: RegisterRequest,
    ) -> Result<(), Refusal> {
        match self.store.get_hub(hub_id).await {
            Ok(_) => {}
            Err(StoreError::NotFound(_) | StoreError::Invalid(_)) => {
                return Err((RejectCode::UnknownHub, format!("hub {hub_id:?} not found")));
            }
            Err(error) => return Err(internal(error)),
        }
        match request {
            RegisterRequest::Add {
                device,
                name,
                protocol,
                metadata,
            } => {
                let new = NewDevice {
                    id: device,
                    hub_id: hub_id.to_owned(),
                    name,
                    protocol,
                    metadata,
                };
                match self.add_device(new).await {
                    Ok(device) => {
                        if let Some(registrations) = &self.registrations {
                            // Nobody listening any more only happens at shutdown.
                            let _ = registrations.send(device);
                        }
                        Ok(())
                    }
                    Err(HubError::Conflict(reason)) => Err((RejectCode::Conflict, reason)),
                    Err(HubError::Invalid(reason)) => Err((RejectCode::InvalidRequest, reason)),
                    Err(HubError::NotFound(reason)) => Err((RejectCode::UnknownHub, reason)),
                    Err(error) => Err(internal(error)),
                }
            }
            RegisterRequest::Remove { device } => {
                match self.store.get_device(&device).await {
                    Ok(found) if found.hub_id == hub_id => {}
                    Ok(_) | Err(StoreError::NotFound(_)) => {
                        return Err((
                            RejectCode::UnknownDevice,
                            format!("hub {hub_id:?} has no device {device:?}"),
                        ));
                    }
                    Err(error) => return Err(internal(error)),
                }
                match self.remove_device(&device).await {
                    Ok(()) => Ok(()),
                    Err(HubError::NotFound(reason)) => Err((RejectCode::UnknownDevice, reason)),
                    Err(error) => Err(internal(error)),
                }
            }
        }
    }

    async fn manage(&mut self, payload: &[u8]) -> Bytes {
        let request = match parse_manager(payload) {
            Ok(request) => request,
            Err(rejection) => {
                info!("hub manager request rejected: {}", rejection.reason);
                return rejection.to_reply();
            }
        };
        let request_id = request.request_id.as_deref();
        let hub_id = request.body.hub.as_str();
        let action = request.body.action;
        let result = match action {
            ManagerAction::Start => self.start_hub(hub_id).await.map(drop),
            ManagerAction::Stop => self.stop_hub(hub_id).await.map(drop),
            ManagerAction::Restart => self.restart_hub(hub_id).await.map(drop),
        };
        match result {
            Ok(()) => {
                info!(hub = %hub_id, "hub manager: {} accepted", action.as_str());
                accepted_reply(request_id, action.as_str(), hub_id, None)
            }
            Err(HubError::NotFound(_) | HubError::Invalid(_)) => rejected_reply(
                request_id,
                RejectCode::UnknownHub,
                &format!("hub {hub_id:?} not found"),
            ),
            Err(error) => rejected_reply(request_id, RejectCode::Internal, &error.to_string()),
        }
    }
}

/// Records connection changes of clients that are registered devices.
async fn record_presence(
    store: Arc<dyn Store>,
    mut events: mpsc::Receiver<PresenceEvent>,
    shutdown: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            event = events.recv() => match event {
                Some(event) => event,
                None => return,
            },
        };
        match store
            .set_presence(&event.client_id, event.online, event.at)
            .await
        {
            // Not every client is a device (parsers, tools, the manager itself).
            Ok(()) | Err(StoreError::NotFound(_) | StoreError::Invalid(_)) => {}
            Err(error) => warn!(client = %event.client_id, "cannot record presence: {error}"),
        }
    }
}
