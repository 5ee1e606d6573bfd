//! The MQTT backend client: commands to MQTT devices over polyhub-hub's [`BusConnector`], so
//! the same code runs on the embedded broker (through the binary's `LocalBus`) and on an
//! external broker (through its `MqttBus`).
//!
//! One persistent bus client per [`MqttBackend`] (`polyhub-polyglot-<section>`) is owned by a
//! single task that both publishes and receives: a publish is one request to that task, so
//! commands go out in the order [`BackendClient::send_command`] was called.
//!
//! Wire formats (see `docs/` and the issue 5 contract):
//! - hub-style devices (hub `settings.channels = "hub"`): JSON `{"id", "name", "payload"}` at
//!   QoS 1 on the `command` template, correlation data = the command id, response topic = the
//!   device's `command_reply` channel. The device answers `{"id", "status": "ok"|"error",
//!   "result"?, "reason"?}` there (a reply without `id` is matched by its MQTT 5 correlation
//!   data).
//! - sgframework resources: the payload as text at QoS 1 on `command/<device>/<name>`; the
//!   resource's echo on `data/<device>/<name>` acknowledges it. Only `data` messages for a
//!   (device, name) this client sent a command to and has not seen the echo of are taken as
//!   echoes: everything else on `data/+/+` is telemetry, the hub's business.
//!
//! Presence: on the embedded broker, its sessions (asked through a [`PresenceTable`]); on any
//! broker, what devices report themselves: the hub `presence` channel of hub-style devices
//! (`/{hub}/{device}/presence`, `online` / `offline`, normally retained and the device's last
//! will, the only source with an external broker) and the
//! `resourceavailable/<device>/presence` messages of sgframework resources. Reported presence
//! is kept in the table and also sent as [`BackendEvent::Presence`], so that the command
//! service sends queued commands the moment a device comes online.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::RwLock;
use polyhub_hub::ChannelTemplates;
use polyhub_hub::bus::{BusClient, BusConnector, BusError, BusMessage, Outgoing, Routing};
use polyhub_hub::channels::{SgframeworkTopic, parse_presence_payload, parse_sgframework_topic};
use polyhub_store::{ChannelStyle, Command, Device, Store, StoreError};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backend::{BackendClient, BackendError, BackendEvent, SendOutcome};
use crate::registry::{ClientFactory, FactoryContext};

/// The factory's type name (`type = "mqtt"`).
pub const MQTT_TYPE: &str = "mqtt";

/// How long a hub's channel style is trusted before it is read from the store again (hub
/// settings can change through the API, and nothing tells this client).
const HUB_STYLE_TTL: Duration = Duration::from_secs(5);

/// Publish requests waiting for the bus task.
const REQUEST_QUEUE: usize = 1024;

/// First and longest wait between reconnect attempts.
const RECONNECT_INITIAL: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// The sgframework filters: echoes (`data/<device>/<name>`) and resource presence.
const SGFRAMEWORK_DATA_FILTER: &str = "data/+/+";
const SGFRAMEWORK_PRESENCE_FILTER: &str = "resourceavailable/+/presence";

/// Devices' presence as far as MQTT clients know it, read by [`BackendClient::is_online`].
/// Cheap to clone (shared).
///
/// Design: where the broker is polyhub's own, its sessions are the truth about who is
/// connected, so the table asks them ([`PresenceTable::with_connections`]) instead of keeping a
/// copy: a copy costs memory for every client that ever connected, devices or not. What only
/// messages tell (sgframework presence topics, an external broker's wills) is recorded with
/// [`PresenceTable::set`], one entry per device that reported.
#[derive(Clone, Default)]
pub struct PresenceTable {
    reported: Arc<RwLock<HashMap<String, bool>>>,
    connections: Option<ConnectionLookup>,
    subscriptions: Option<SubscriptionLookup>,
}

/// Whether a client id is connected and can be sent to (`None`: the broker has no session of
/// that id; see [`PresenceTable::with_connections`]).
pub type ConnectionLookup = Arc<dyn Fn(&str) -> Option<bool> + Send + Sync>;

/// Whether the session of a client id has a subscription matching a topic (`None`: the broker
/// has no session of that id); see [`PresenceTable::with_subscriptions`].
pub type SubscriptionLookup = Arc<dyn Fn(&str, &str) -> Option<bool> + Send + Sync>;

impl std::fmt::Debug for PresenceTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresenceTable")
            .field("reported", &self.reported)
            .field("connections", &self.connections.is_some())
            .finish()
    }
}

impl PresenceTable {
    /// A table that asks `connections` first. It answers for a client id with a session: a
    /// connected device counts as reachable only once it has subscribed (a device connecting
    /// without a stored session subscribes to its command topic only after the broker accepted
    /// the connection; a command sent in between would reach nobody). For ids without a
    /// session (an sgframework resource's name is not its client id) reported presence counts.
    pub fn with_connections(connections: ConnectionLookup) -> PresenceTable {
        PresenceTable {
            reported: Arc::default(),
            connections: Some(connections),
            subscriptions: None,
        }
    }

    /// Also asks the broker whether a device's session is subscribed to the very topic a
    /// command goes to: a device that subscribed to something else first is connected and
    /// "reachable", yet a command published then would reach nobody.
    pub fn with_subscriptions(mut self, subscriptions: SubscriptionLookup) -> PresenceTable {
        self.subscriptions = Some(subscriptions);
        self
    }

    /// Whether `device_id`'s session would receive a message on `topic` (`None`: not known).
    pub fn subscribed(&self, device_id: &str, topic: &str) -> Option<bool> {
        self.subscriptions
            .as_ref()
            .and_then(|subscriptions| subscriptions(device_id, topic))
    }

    /// Records presence that a message reported for `device_id`.
    pub fn set(&self, device_id: &str, online: bool) {
        self.reported.write().insert(device_id.to_owned(), online);
    }

    /// Whether `device_id` is reachable (`None`: never heard of).
    pub fn get(&self, device_id: &str) -> Option<bool> {
        if let Some(connected) = self
            .connections
            .as_ref()
            .and_then(|connections| connections(device_id))
        {
            return Some(connected);
        }
        self.reported.read().get(device_id).copied()
    }
}

/// What an [`MqttBackend`] needs.
#[derive(Debug, Clone)]
pub struct MqttBackendOptions {
    /// The protocol name devices select it with (the `[polyglot.<name>]` section name).
    pub protocol: String,
    /// The bus client's id; its session is persistent.
    pub client_id: String,
    /// The hub channel templates (`command` and `command_reply` are used).
    pub channels: ChannelTemplates,
    /// Where presence reported by the owner is kept (shared with whoever feeds it).
    pub presence: PresenceTable,
}

/// Where a device's commands go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Hub,
    Sgframework,
}

/// State shared by the handle and its bus task.
#[derive(Debug)]
struct Shared {
    store: Arc<dyn Store>,
    channels: ChannelTemplates,
    presence: PresenceTable,
    /// Channel style of each hub, with when it was read.
    hub_styles: parking_lot::Mutex<HashMap<String, (ChannelStyle, Instant)>>,
}

impl Shared {
    /// The hub of registered device `device` if that hub uses channel style `style`: presence
    /// messages count only on the channels of the device's own style.
    async fn hub_of(&self, device: &str, style: ChannelStyle) -> Option<String> {
        let hub_id = match self.store.get_device(device).await {
            Ok(device) => device.hub_id,
            Err(StoreError::NotFound(_)) => return None,
            Err(error) => {
                warn!(
                    device,
                    "cannot read the device of a presence message: {error}"
                );
                return None;
            }
        };
        match self.hub_style(&hub_id).await {
            Ok(actual) if actual == style => Some(hub_id),
            Ok(_) => None,
            Err(error) => {
                warn!(device, "cannot read the hub of a presence message: {error}");
                None
            }
        }
    }

    /// The channel style of `hub_id`, cached for [`HUB_STYLE_TTL`].
    async fn hub_style(&self, hub_id: &str) -> Result<ChannelStyle, StoreError> {
        if let Some((style, read_at)) = self.hub_styles.lock().get(hub_id)
            && read_at.elapsed() < HUB_STYLE_TTL
        {
            return Ok(*style);
        }
        let hub = self.store.get_hub(hub_id).await?;
        let style = hub.settings.channels;
        self.hub_styles
            .lock()
            .insert(hub_id.to_owned(), (style, Instant::now()));
        Ok(style)
    }
}

/// One publish for the bus task, answered when the broker took it.
#[derive(Debug)]
struct PublishRequest {
    message: Outgoing,
    /// For sgframework commands: the (device, name) whose next `data` message is the echo.
    echo: Option<(String, String)>,
    done: oneshot::Sender<Result<Routing, BusError>>,
}

/// The MQTT backend client (see the module documentation).
#[derive(Debug)]
pub struct MqttBackend {
    protocol: String,
    shared: Arc<Shared>,
    requests: mpsc::Sender<PublishRequest>,
    /// Held from route lookup to queueing, so that calls queue their publishes in call order
    /// even when a lookup has to wait for the store (tokio's mutex is fair).
    send_order: tokio::sync::Mutex<()>,
}

impl MqttBackend {
    /// Connects the bus client, subscribes to the reply, echo and presence channels, and
    /// starts the task that owns it (ends with `shutdown`). Fails if the first connection or
    /// subscription fails; later losses are retried in the background.
    pub async fn start(
        options: MqttBackendOptions,
        connector: Arc<dyn BusConnector>,
        store: Arc<dyn Store>,
        events: mpsc::Sender<BackendEvent>,
        shutdown: CancellationToken,
    ) -> Result<Arc<MqttBackend>, BackendError> {
        options
            .channels
            .validate()
            .map_err(|error| BackendError::Config(error.to_string()))?;
        let filters = vec![
            options.channels.command_reply_filter(),
            options.channels.presence_filter(),
            SGFRAMEWORK_DATA_FILTER.to_owned(),
            SGFRAMEWORK_PRESENCE_FILTER.to_owned(),
        ];
        let client = connect(connector.as_ref(), &options.client_id, &filters)
            .await
            .map_err(|error| {
                BackendError::Unavailable(format!(
                    "cannot connect to the broker as {:?}: {error}",
                    options.client_id
                ))
            })?;
        let shared = Arc::new(Shared {
            store,
            channels: options.channels,
            presence: options.presence,
            hub_styles: parking_lot::Mutex::new(HashMap::new()),
        });
        let (requests, request_receiver) = mpsc::channel(REQUEST_QUEUE);
        let task = BusTask {
            connector,
            client_id: options.client_id,
            filters,
            client: Some(client),
            requests: request_receiver,
            events,
            shared: Arc::clone(&shared),
            pending_echoes: HashMap::new(),
            shutdown,
        };
        tokio::spawn(task.run());
        Ok(Arc::new(MqttBackend {
            protocol: options.protocol,
            shared,
            requests,
            send_order: tokio::sync::Mutex::new(()),
        }))
    }

    /// Which channels `device` uses, from its hub's settings.
    async fn route(&self, device: &Device) -> Result<Route, BackendError> {
        match self.shared.hub_style(&device.hub_id).await {
            Ok(ChannelStyle::Hub) => Ok(Route::Hub),
            Ok(ChannelStyle::Sgframework) => Ok(Route::Sgframework),
            Err(StoreError::NotFound(_)) => Err(BackendError::Rejected(format!(
                "hub {:?} of device {:?} does not exist",
                device.hub_id, device.id
            ))),
            Err(error) => Err(BackendError::Unavailable(format!(
                "cannot read hub {:?}: {error}",
                device.hub_id
            ))),
        }
    }

    /// The publish that carries `command` to `device` over `route`.
    fn outgoing(
        &self,
        device: &Device,
        command: &Command,
        route: Route,
    ) -> Result<PublishRequestParts, BackendError> {
        match route {
            Route::Hub => {
                let payload = serde_json::json!({
                    "id": command.id,
                    "name": command.name,
                    "payload": command.payload,
                });
                let payload = serde_json::to_vec(&payload).map_err(|error| {
                    BackendError::Rejected(format!("cannot encode the command: {error}"))
                })?;
                Ok(PublishRequestParts {
                    message: Outgoing {
                        topic: self
                            .shared
                            .channels
                            .command_topic(&device.hub_id, &device.id),
                        payload: Bytes::from(payload),
                        qos: 1,
                        retain: false,
                        correlation_data: Some(Bytes::from(command.id.clone().into_bytes())),
                        response_topic: Some(
                            self.shared
                                .channels
                                .command_reply_topic(&device.hub_id, &device.id),
                        ),
                    },
                    echo: None,
                })
            }
            Route::Sgframework => {
                // The name becomes a topic level; the service validates it, but a bad one
                // must not turn into a wildcard publish.
                if command.name.is_empty() || command.name.contains(['/', '+', '#', '\0']) {
                    return Err(BackendError::Rejected(format!(
                        "command name {:?} is not a valid topic level",
                        command.name
                    )));
                }
                Ok(PublishRequestParts {
                    message: Outgoing {
                        topic: format!("command/{}/{}", device.id, command.name),
                        payload: Bytes::from(sgframework_payload(&command.payload)),
                        qos: 1,
                        retain: false,
                        correlation_data: None,
                        response_topic: None,
                    },
                    echo: Some((device.id.clone(), command.name.clone())),
                })
            }
        }
    }
}

/// A publish before it is queued.
struct PublishRequestParts {
    message: Outgoing,
    echo: Option<(String, String)>,
}

/// sgframework payloads are strings: a JSON string goes out bare, anything else as its JSON
/// text.
fn sgframework_payload(payload: &serde_json::Value) -> String {
    match payload {
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

#[async_trait]
impl BackendClient for MqttBackend {
    fn protocol(&self) -> &str {
        &self.protocol
    }

    async fn send_command(
        &self,
        device: &Device,
        command: &Command,
    ) -> Result<SendOutcome, BackendError> {
        let (done, answer) = oneshot::channel();
        {
            let _order = self.send_order.lock().await;
            let route = self.route(device).await?;
            let parts = self.outgoing(device, command, route)?;
            if self
                .shared
                .presence
                .subscribed(&device.id, &parts.message.topic)
                == Some(false)
            {
                // Sent now, it would reach nobody; the service tries again shortly.
                return Err(BackendError::Unavailable(format!(
                    "device {:?} is not subscribed to {:?} yet",
                    device.id, parts.message.topic
                )));
            }
            let request = PublishRequest {
                message: parts.message,
                echo: parts.echo,
                done,
            };
            self.requests.send(request).await.map_err(|_| {
                BackendError::Unavailable("the MQTT client has shut down".to_owned())
            })?;
        }
        match answer.await {
            Ok(Ok(Routing::Matched | Routing::Unknown)) => {}
            // The broker says nobody subscribed the command topic (an external broker's MQTT 5
            // PUBACK; with our own broker, its subscription events usually tell us before the
            // send): the command went nowhere, so it stays queued and goes out again.
            Ok(Ok(Routing::NoSubscribers)) => {
                return Err(BackendError::Unavailable(format!(
                    "the broker had no subscriber for the command: device {:?} has not \
                     subscribed to its command topic (yet)",
                    device.id
                )));
            }
            Ok(Err(BusError::Refused(reason))) => {
                return Err(BackendError::Rejected(format!(
                    "the broker refused the command: {reason}"
                )));
            }
            Ok(Err(error)) => return Err(BackendError::Unavailable(error.to_string())),
            Err(_) => {
                return Err(BackendError::Unavailable(
                    "the MQTT client has shut down".to_owned(),
                ));
            }
        }
        // The broker routed a QoS 1 publish to the session of a connected device: as close
        // to "delivered" as MQTT tells.
        if self.shared.presence.get(&device.id) == Some(true) {
            Ok(SendOutcome::Delivered)
        } else {
            Ok(SendOutcome::Sent)
        }
    }

    fn is_online(&self, device_id: &str) -> Option<bool> {
        self.shared.presence.get(device_id)
    }
}

/// Connects as `client_id` (persistent session) and subscribes `filters`.
async fn connect(
    connector: &dyn BusConnector,
    client_id: &str,
    filters: &[String],
) -> Result<Box<dyn BusClient>, BusError> {
    let mut client = connector.connect(client_id, true).await?;
    client.subscribe(filters).await?;
    Ok(client)
}

/// The task owning the bus client.
#[derive(Debug)]
struct BusTask {
    connector: Arc<dyn BusConnector>,
    client_id: String,
    filters: Vec<String>,
    /// `None` while disconnected.
    client: Option<Box<dyn BusClient>>,
    requests: mpsc::Receiver<PublishRequest>,
    events: mpsc::Sender<BackendEvent>,
    shared: Arc<Shared>,
    /// sgframework commands published and not echoed yet, per (device, name).
    pending_echoes: HashMap<(String, String), u32>,
    shutdown: CancellationToken,
}

/// What the bus task woke up for.
enum Wake {
    Shutdown,
    Received(Result<Option<BusMessage>, BusError>),
    Request(Option<PublishRequest>),
}

impl BusTask {
    async fn run(mut self) {
        loop {
            let Some(client) = self.client.as_mut() else {
                if !self.reconnect().await {
                    return;
                }
                continue;
            };
            // Incoming first: what is already waiting (replies, retained messages replayed on
            // subscription) is taken before the next publish.
            let wake = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => Wake::Shutdown,
                received = client.recv() => Wake::Received(received),
                request = self.requests.recv() => Wake::Request(request),
            };
            match wake {
                Wake::Shutdown | Wake::Request(None) => return,
                Wake::Received(Ok(Some(message))) => {
                    self.handle(&message).await;
                    if let Some(client) = self.client.as_mut()
                        && let Err(error) = client.ack(&[message.token]).await
                    {
                        warn!(client = %self.client_id, "cannot acknowledge a message: {error}");
                        self.client = None;
                    }
                }
                Wake::Received(Ok(None)) => {
                    info!(client = %self.client_id, "the broker is shutting down");
                    self.client = None;
                }
                Wake::Received(Err(error)) => {
                    warn!(client = %self.client_id, "bus connection lost: {error}");
                    self.client = None;
                }
                Wake::Request(Some(request)) => self.publish(request).await,
            }
        }
    }

    /// Publishes one request and answers it.
    async fn publish(&mut self, request: PublishRequest) {
        let Some(client) = self.client.as_mut() else {
            let _ = request
                .done
                .send(Err(BusError::Closed("not connected".to_owned())));
            return;
        };
        let result = client.publish(request.message).await;
        match &result {
            // Nobody will echo a command that reached nobody.
            Ok(Routing::NoSubscribers) => {}
            Ok(Routing::Matched | Routing::Unknown) => {
                if let Some(key) = request.echo {
                    *self.pending_echoes.entry(key).or_insert(0) += 1;
                }
            }
            Err(BusError::Refused(_)) => {}
            Err(error) => {
                warn!(client = %self.client_id, "publish failed, reconnecting: {error}");
                self.client = None;
            }
        }
        let _ = request.done.send(result);
    }

    /// Connects again after a backoff, answering publish requests meanwhile as unavailable.
    /// Returns false when it is time to stop.
    async fn reconnect(&mut self) -> bool {
        let mut delay = RECONNECT_INITIAL;
        loop {
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = self.shutdown.cancelled() => return false,
                    () = &mut sleep => break,
                    request = self.requests.recv() => match request {
                        None => return false,
                        Some(request) => {
                            let _ = request.done.send(Err(BusError::Closed(
                                "not connected to the broker".to_owned(),
                            )));
                        }
                    },
                }
            }
            let attempt = tokio::select! {
                () = self.shutdown.cancelled() => return false,
                attempt = connect(self.connector.as_ref(), &self.client_id, &self.filters) => attempt,
            };
            match attempt {
                Ok(client) => {
                    info!(client = %self.client_id, "reconnected to the broker");
                    self.client = Some(client);
                    return true;
                }
                Err(error) => {
                    debug!(client = %self.client_id, "reconnect failed: {error}");
                    delay = (delay * 2).min(RECONNECT_MAX);
                }
            }
        }
    }

    /// Turns one received message into events, if it is a reply, an echo or a presence.
    async fn handle(&mut self, message: &BusMessage) {
        if let Some(topic) = self
            .shared
            .channels
            .parse_command_reply_topic(&message.topic)
        {
            let device_id = topic.device.to_owned();
            match parse_reply(&message.payload, message.correlation_data.as_ref()) {
                Ok(reply) => {
                    self.emit(BackendEvent::Reply {
                        device_id,
                        command_id: Some(reply.id),
                        name: None,
                        ok: reply.ok,
                        reply: reply.result,
                        reason: reply.reason,
                        at: message.received_at,
                    })
                    .await;
                }
                Err(problem) => {
                    debug!(topic = %message.topic, "ignoring a malformed command reply: {problem}");
                    // The service counts what it ignores under the same name.
                    metrics::counter!(
                        "polyhub_command_replies_ignored_total",
                        "reason" => "malformed"
                    )
                    .increment(1);
                }
            }
            return;
        }
        if let Some(topic) = self.shared.channels.parse_presence_topic(&message.topic) {
            let (hub, device) = (topic.hub.map(str::to_owned), topic.device.to_owned());
            self.handle_hub_presence(hub.as_deref(), &device, message)
                .await;
            return;
        }
        match parse_sgframework_topic(&message.topic) {
            Some(SgframeworkTopic::Data { device, signal }) => {
                self.handle_echo(device, signal, message).await;
            }
            Some(SgframeworkTopic::Presence { device }) => {
                self.handle_presence(device, message).await;
            }
            None => {}
        }
    }

    /// A `data/<device>/<signal>` message: the echo of a command if one is waiting for it.
    async fn handle_echo(&mut self, device: &str, signal: &str, message: &BusMessage) {
        let key = (device.to_owned(), signal.to_owned());
        let Some(waiting) = self.pending_echoes.get_mut(&key) else {
            return;
        };
        let Ok(text) = std::str::from_utf8(&message.payload) else {
            debug!(topic = %message.topic, "ignoring an echo that is not UTF-8");
            return;
        };
        *waiting -= 1;
        if *waiting == 0 {
            self.pending_echoes.remove(&key);
        }
        let event = BackendEvent::Reply {
            device_id: key.0,
            command_id: None,
            name: Some(key.1),
            ok: true,
            reply: Some(serde_json::Value::String(text.to_owned())),
            reason: None,
            at: message.received_at,
        };
        self.emit(event).await;
    }

    /// A message on the hub `presence` channel of a hub-style device.
    async fn handle_hub_presence(&mut self, hub: Option<&str>, device: &str, message: &BusMessage) {
        let Some(online) = parse_presence_payload(&message.payload) else {
            debug!(topic = %message.topic, "ignoring a presence payload that is not online/offline");
            return;
        };
        let Some(hub_id) = self.shared.hub_of(device, ChannelStyle::Hub).await else {
            return;
        };
        // Another hub's topic naming this device id is not this device speaking.
        if hub.is_some_and(|hub| hub != hub_id) {
            return;
        }
        self.report_presence(device, online, message.received_at)
            .await;
    }

    /// A `resourceavailable/<device>/presence` message of a device of an sgframework hub.
    async fn handle_presence(&mut self, device: &str, message: &BusMessage) {
        let online = match message.payload.trim_ascii() {
            b"True" | b"true" | b"online" | b"1" => true,
            b"False" | b"false" | b"offline" | b"0" => false,
            _ => {
                debug!(topic = %message.topic, "ignoring a presence payload that is not True/False");
                return;
            }
        };
        if self
            .shared
            .hub_of(device, ChannelStyle::Sgframework)
            .await
            .is_some()
        {
            self.report_presence(device, online, message.received_at)
                .await;
        }
    }

    /// Records presence a device reported and tells the command service.
    async fn report_presence(&mut self, device: &str, online: bool, at: polyhub_store::Millis) {
        self.shared.presence.set(device, online);
        self.emit(BackendEvent::Presence {
            device_id: device.to_owned(),
            online,
            at,
        })
        .await;
    }

    async fn emit(&mut self, event: BackendEvent) {
        if self.events.send(event).await.is_err() {
            debug!(client = %self.client_id, "no one listens to backend events any more");
        }
    }
}

/// A device's answer on the reply channel.
#[derive(Debug, Clone, PartialEq)]
struct Reply {
    id: String,
    ok: bool,
    result: Option<serde_json::Value>,
    reason: Option<String>,
}

/// The reply JSON as devices send it.
#[derive(Debug, Deserialize)]
struct WireReply {
    #[serde(default)]
    id: Option<String>,
    status: String,
    #[serde(default)]
    result: Option<serde_json::Value>,
    #[serde(default)]
    reason: Option<String>,
}

/// Parses a reply; the command id comes from the JSON or else the MQTT 5 correlation data.
fn parse_reply(payload: &[u8], correlation_data: Option<&Bytes>) -> Result<Reply, String> {
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|error| format!("not JSON: {error}"))?;
    // serde would also read a struct from a JSON array; a reply is an object.
    if !value.is_object() {
        return Err("not a JSON object".to_owned());
    }
    let wire: WireReply =
        serde_json::from_value(value).map_err(|error| format!("not a reply object: {error}"))?;
    let ok = match wire.status.as_str() {
        "ok" => true,
        "error" => false,
        other => return Err(format!("status {other:?} is neither \"ok\" nor \"error\"")),
    };
    let id = match (wire.id, correlation_data) {
        (Some(id), _) => id,
        (None, Some(data)) => std::str::from_utf8(data)
            .map_err(|_| "correlation data is not a command id".to_owned())?
            .to_owned(),
        (None, None) => return Err("no command id (no \"id\", no correlation data)".to_owned()),
    };
    if id.is_empty() {
        return Err("empty command id".to_owned());
    }
    Ok(Reply {
        id,
        ok,
        result: wire.result.filter(|result| !result.is_null()),
        reason: wire.reason,
    })
}

/// `[polyglot.<name>]` settings of an MQTT client.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttClientSettings {
    /// `"hub"` (the broker the hub ingests from: the embedded one, or the external broker
    /// the binary was configured with), `"embedded"` (only the broker of this process), or
    /// the address of another broker for commands alone (`mqtt://host:port` or `host:port`).
    pub broker: String,
    /// The bus client id; defaults to `polyhub-polyglot-<section name>`.
    pub client_id: Option<String>,
}

impl Default for MqttClientSettings {
    fn default() -> Self {
        MqttClientSettings {
            broker: HUB.to_owned(),
            client_id: None,
        }
    }
}

/// `broker` value selecting the hub's broker, wherever it is.
const HUB: &str = "hub";

/// `broker` value selecting the embedded broker.
const EMBEDDED: &str = "embedded";

/// Makes a bus connector to another broker from the `broker` setting (`mqtt://host:port`,
/// `host:port`; supplied by the binary, which owns the MQTT client implementation of the bus).
pub type ExternalBusConnector =
    Arc<dyn Fn(&str) -> Result<Arc<dyn BusConnector>, String> + Send + Sync>;

/// Builds [`MqttBackend`]s from `[polyglot.<name>]` sections of type `mqtt`.
#[derive(Clone, Default)]
pub struct MqttClientFactory {
    presence: PresenceTable,
    external: Option<ExternalBusConnector>,
    /// The hub's bus is an external broker: `broker = "embedded"` would reach no device.
    hub_is_external: bool,
}

impl std::fmt::Debug for MqttClientFactory {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("MqttClientFactory")
            .field("external", &self.external.is_some())
            .field("hub_is_external", &self.hub_is_external)
            .finish_non_exhaustive()
    }
}

impl MqttClientFactory {
    /// A factory whose clients on the hub's broker read presence from `presence` (on the
    /// embedded broker, a table that asks its sessions; on an external broker, an empty one
    /// that the devices' presence messages fill).
    pub fn new(presence: PresenceTable) -> MqttClientFactory {
        MqttClientFactory {
            presence,
            external: None,
            hub_is_external: false,
        }
    }

    /// Says that the hub's bus ([`FactoryContext::bus`]) is an external broker, not the
    /// embedded one: `broker = "embedded"` is then refused, as no device is on it.
    pub fn with_external_hub(mut self) -> MqttClientFactory {
        self.hub_is_external = true;
        self
    }

    /// Allows `broker = "mqtt://host:port"` (another broker), connecting through `connector`.
    pub fn with_external(mut self, connector: ExternalBusConnector) -> MqttClientFactory {
        self.external = Some(connector);
        self
    }

    /// The presence table shared by the clients on the embedded broker.
    pub fn presence(&self) -> PresenceTable {
        self.presence.clone()
    }
}

#[async_trait]
impl ClientFactory for MqttClientFactory {
    fn type_name(&self) -> &'static str {
        MQTT_TYPE
    }

    async fn build(
        &self,
        name: &str,
        settings: toml::Table,
        context: FactoryContext,
    ) -> Result<Arc<dyn BackendClient>, BackendError> {
        let settings: MqttClientSettings = toml::Value::Table(settings)
            .try_into()
            .map_err(|error| BackendError::Config(error.to_string()))?;
        let (connector, presence) = if settings.broker == HUB || settings.broker == EMBEDDED {
            if settings.broker == EMBEDDED && self.hub_is_external {
                return Err(BackendError::Config(
                    "broker = \"embedded\": the embedded broker serves no devices while the \
                     hub uses an external broker; use broker = \"hub\" (the default)"
                        .to_owned(),
                ));
            }
            let connector = context.bus.clone().ok_or_else(|| {
                BackendError::Config(format!(
                    "broker = {:?} but this process has no hub broker",
                    settings.broker
                ))
            })?;
            (connector, self.presence.clone())
        } else {
            let external = self.external.as_ref().ok_or_else(|| {
                BackendError::Config(format!(
                    "broker = {:?}: external brokers are not supported here",
                    settings.broker
                ))
            })?;
            let connector = external(&settings.broker).map_err(|error| {
                BackendError::Config(format!("broker = {:?}: {error}", settings.broker))
            })?;
            // The embedded broker's connections say nothing about another broker's.
            (connector, PresenceTable::default())
        };
        let options = MqttBackendOptions {
            protocol: name.to_owned(),
            client_id: settings
                .client_id
                .unwrap_or_else(|| format!("polyhub-polyglot-{name}")),
            channels: context.channels.clone(),
            presence,
        };
        let backend = MqttBackend::start(
            options,
            connector,
            context.store.clone(),
            context.events.clone(),
            context.shutdown.clone(),
        )
        .await?;
        Ok(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgframework_payload_sends_strings_bare_and_the_rest_as_json() {
        assert_eq!(sgframework_payload(&serde_json::json!("on")), "on");
        assert_eq!(sgframework_payload(&serde_json::json!(42)), "42");
        assert_eq!(sgframework_payload(&serde_json::json!(true)), "true");
        assert_eq!(sgframework_payload(&serde_json::Value::Null), "null");
        assert_eq!(
            sgframework_payload(&serde_json::json!({"a": 1})),
            "{\"a\":1}"
        );
    }

    #[test]
    fn replies_parse_ok_error_and_correlation_ids() {
        let ok = parse_reply(br#"{"id":"c1","status":"ok","result":{"x":1}}"#, None).unwrap();
        assert_eq!(
            ok,
            Reply {
                id: "c1".into(),
                ok: true,
                result: Some(serde_json::json!({"x": 1})),
                reason: None
            }
        );
        let error =
            parse_reply(br#"{"id":"c2","status":"error","reason":"jammed"}"#, None).unwrap();
        assert!(!error.ok);
        assert_eq!(error.reason.as_deref(), Some("jammed"));
        let correlated = Bytes::from_static(b"c3");
        let by_correlation = parse_reply(br#"{"status":"ok"}"#, Some(&correlated)).unwrap();
        assert_eq!(by_correlation.id, "c3");
    }

    #[test]
    fn malformed_replies_are_errors() {
        for payload in [
            &b"not json"[..],
            br#"{"id":"c1"}"#,
            br#"{"id":"c1","status":"maybe"}"#,
            br#"{"status":"ok"}"#,
            br#"{"id":"","status":"ok"}"#,
            br#"{"id":7,"status":"ok"}"#,
            br#"["c1","ok"]"#,
        ] {
            assert!(parse_reply(payload, None).is_err(), "{payload:?}");
        }
        let binary = Bytes::from_static(&[0xff, 0xfe]);
        assert!(parse_reply(br#"{"status":"ok"}"#, Some(&binary)).is_err());
    }

    #[test]
    fn settings_default_to_the_embedded_broker_and_refuse_unknown_keys() {
        let settings: MqttClientSettings =
            toml::Value::Table(toml::Table::new()).try_into().unwrap();
        assert_eq!(settings, MqttClientSettings::default());
        let mut table = toml::Table::new();
        table.insert("brokr".into(), toml::Value::String("x".into()));
        assert!(
            toml::Value::Table(table)
                .try_into::<MqttClientSettings>()
                .is_err()
        );
    }
}
