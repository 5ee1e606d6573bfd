//! The machinery shared by [`Resource`] and [`App`]: registrations, the connection, message
//! dispatch to callbacks, echoes, announcements on every (re)connect, and both ways of running.
//!
//! Design: one [`Framework`] value is a cheap handle (an `Arc`) on the shared state, so the
//! callbacks receive it and can send data or commands from inside. Every outgoing message goes
//! through one ordered queue, drained by a small task into the MQTT client; so sending is
//! synchronous and never waits for the network, which keeps it usable from callbacks and from
//! a caller-driven loop alike (sgframework's `publish()` does not wait either).

use std::fmt;
use std::ops::Deref;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use polyhub_client::{
    Client, ClientOptions, Event, EventLoop, LastWill, Message, Properties, ProtocolVersion,
    Publish, QoS, TlsOptions,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::error::SdkError;
use crate::topics::{
    MessageType, PAYLOAD_FALSE, PAYLOAD_TRUE, SUFFIX_PRESENCE, checked_name, split_topic, topic,
};

/// sgframework's `DEFAULT_KEEPALIVE_TIME`.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(10);
/// sgframework's `DEFAULT_QOS`.
pub const DEFAULT_QOS: QoS = QoS::AtLeastOnce;
/// How long `stop()` waits for queued messages and the presence `False` to be acknowledged
/// (sgframework sleeps `SLEEP_STOP`, one second, instead).
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// What a callback hands back, turned into sgframework's rules: nothing (`()` or `None`) echoes
/// the command's own payload, a value echoes that value, an error is logged and suppresses the
/// echo (like an exception in a Python callback).
pub trait CallbackOutput {
    /// The echo payload to use instead of the command's, or the failure to log.
    fn into_echo(self) -> Result<Option<String>, String>;
}

impl CallbackOutput for () {
    fn into_echo(self) -> Result<Option<String>, String> {
        Ok(None)
    }
}

impl CallbackOutput for Option<String> {
    fn into_echo(self) -> Result<Option<String>, String> {
        Ok(self)
    }
}

impl CallbackOutput for String {
    fn into_echo(self) -> Result<Option<String>, String> {
        Ok(Some(self))
    }
}

impl CallbackOutput for &str {
    fn into_echo(self) -> Result<Option<String>, String> {
        Ok(Some(self.to_owned()))
    }
}

impl<T: CallbackOutput, E: fmt::Display> CallbackOutput for Result<T, E> {
    fn into_echo(self) -> Result<Option<String>, String> {
        match self {
            Ok(output) => output.into_echo(),
            Err(error) => Err(error.to_string()),
        }
    }
}

type Callback = Arc<
    dyn Fn(&Framework, MessageType, &str, &str, &str) -> Result<Option<String>, String>
        + Send
        + Sync,
>;
type StatusCallback = Arc<dyn Fn(&Framework, bool) + Send + Sync>;

/// Options of an incoming command, sgframework's keyword arguments of
/// `register_incoming_command` with the same defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOptions {
    /// Call back only when the payload differs from the previous one (default `false`).
    pub on_change_only: bool,
    /// Echo the command on `data/<me>/<signal>` (default `true`).
    pub echo: bool,
    /// Publish the echo retained (default `false`).
    pub echo_as_retained: bool,
    /// Echoed on every (re)connect when set; replaced by every echo (default `None`: nothing is
    /// sent at connect, and echoes do not start it).
    pub default: Option<String>,
}

impl Default for CommandOptions {
    fn default() -> Self {
        CommandOptions {
            on_change_only: false,
            echo: true,
            echo_as_retained: false,
            default: None,
        }
    }
}

impl CommandOptions {
    /// The defaults: echo, not retained, no default value, every command called back.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set `on_change_only`.
    pub fn on_change_only(mut self, on_change_only: bool) -> Self {
        self.on_change_only = on_change_only;
        self
    }

    /// Set `echo`.
    pub fn echo(mut self, echo: bool) -> Self {
        self.echo = echo;
        self
    }

    /// Set `echo_as_retained`.
    pub fn echo_as_retained(mut self, retained: bool) -> Self {
        self.echo_as_retained = retained;
        self
    }

    /// Set the default value, converted to a string like Python's `str(value)`.
    pub fn default_value(mut self, value: impl fmt::Display) -> Self {
        self.default = Some(value.to_string());
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Resource,
    App,
}

struct InputSignal {
    message_type: MessageType,
    service: String,
    signal: String,
    callback: Callback,
    on_change_only: bool,
    echo: bool,
    echo_as_retained: bool,
    default: Option<String>,
    last_payload: Option<String>,
}

struct OutputSignal {
    signal: String,
    default: Option<String>,
    retained: bool,
}

#[derive(Debug, Clone)]
struct Settings {
    protocol: ProtocolVersion,
    qos: QoS,
    keep_alive: Duration,
    certificate_directory: Option<PathBuf>,
    clean_session: bool,
    reconnect_backoff: (Duration, Duration),
}

/// What goes through the ordered outgoing queue.
enum Outgoing {
    Subscribe(Vec<String>, QoS),
    Publish(Box<Message>),
    /// Answered once everything queued before it has been handed to the client (and every
    /// subscription before it acknowledged).
    Barrier(oneshot::Sender<()>),
}

struct Running {
    client: Client,
    outgoing: mpsc::UnboundedSender<Outgoing>,
}

#[derive(Default)]
struct Signals {
    /// In registration order, keyed by the full topic, like sgframework's dicts.
    inputs: Vec<(String, InputSignal)>,
    outputs: Vec<(String, OutputSignal)>,
}

struct Inner {
    kind: Kind,
    name: String,
    host: String,
    port: u16,
    settings: Mutex<Settings>,
    signals: Mutex<Signals>,
    running: Mutex<Option<Running>>,
    status: watch::Sender<bool>,
    status_callback: Mutex<Option<StatusCallback>>,
}

/// The part common to resources and apps; callbacks receive it, so they can send data or
/// commands. A cheap handle: clones share everything.
#[derive(Clone)]
pub struct Framework {
    inner: Arc<Inner>,
}

impl fmt::Debug for Framework {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Framework")
            .field("kind", &self.inner.kind)
            .field("name", &self.inner.name)
            .field("host", &self.inner.host)
            .field("port", &self.inner.port)
            .finish_non_exhaustive()
    }
}

impl Framework {
    fn new(kind: Kind, name: &str, host: &str, port: u16) -> Framework {
        Framework {
            inner: Arc::new(Inner {
                kind,
                name: name.trim().to_owned(),
                host: host.trim().to_owned(),
                port,
                settings: Mutex::new(Settings {
                    protocol: ProtocolVersion::V31,
                    qos: DEFAULT_QOS,
                    keep_alive: DEFAULT_KEEP_ALIVE,
                    certificate_directory: None,
                    clean_session: true,
                    reconnect_backoff: (Duration::from_millis(250), Duration::from_secs(30)),
                }),
                signals: Mutex::new(Signals::default()),
                running: Mutex::new(None),
                status: watch::Sender::new(false),
                status_callback: Mutex::new(None),
            }),
        }
    }

    /// The name: the resource's level in its topics, and the base of the client id.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The broker host.
    pub fn host(&self) -> &str {
        &self.inner.host
    }

    /// The broker port.
    pub fn port(&self) -> u16 {
        self.inner.port
    }

    /// MQTT version (default 3.1, `MQIsdp`, like sgframework). Valid from the next start.
    pub fn set_protocol(&self, protocol: ProtocolVersion) {
        self.inner.settings.lock().protocol = protocol;
    }

    /// QoS of every publish and subscription (default 1). Valid from the next start.
    pub fn set_qos(&self, qos: QoS) {
        self.inner.settings.lock().qos = qos;
    }

    /// The QoS in use.
    pub fn qos(&self) -> QoS {
        self.inner.settings.lock().qos
    }

    /// Keep-alive interval (default 10 s). Valid from the next start.
    pub fn set_keep_alive(&self, keep_alive: Duration) {
        self.inner.settings.lock().keep_alive = keep_alive;
    }

    /// Connect with TLS, from sgframework's certificate directory: `ca_public_certificate.pem`,
    /// plus `public_certificate.pem` and `private_key.pem` for a client certificate. The files
    /// are read at start; TLS 1.2 or 1.3 (sgframework's TLS 1.0 default is not offered).
    pub fn set_certificate_directory(&self, directory: impl Into<PathBuf>) {
        self.inner.settings.lock().certificate_directory = Some(directory.into());
    }

    /// Clean session (default `true`). Like sgframework, a clean session uses the client id
    /// `<name>-<pid>` to avoid collisions, a persistent one the bare name.
    pub fn set_clean_session(&self, clean_session: bool) {
        self.inner.settings.lock().clean_session = clean_session;
    }

    /// Reconnect delays: `min`, doubled per failed attempt, up to `max` (default 250 ms, 30 s).
    pub fn set_reconnect_backoff(&self, min: Duration, max: Duration) {
        self.inner.settings.lock().reconnect_backoff = (min, max);
    }

    /// sgframework's `on_broker_connectionstatus_info`: called with `true` on each successful
    /// connection and `false` when it is lost or an attempt fails (only on changes). A panic in
    /// it is logged and survived.
    pub fn on_broker_connectionstatus(
        &self,
        callback: impl Fn(&Framework, bool) + Send + Sync + 'static,
    ) {
        *self.inner.status_callback.lock() = Some(Arc::new(callback));
    }

    /// Whether the client is connected to the broker now.
    pub fn is_connected(&self) -> bool {
        *self.inner.status.borrow()
    }

    /// A receiver of the connection status, for waiting on it.
    pub fn connection_status(&self) -> watch::Receiver<bool> {
        self.inner.status.subscribe()
    }

    /// Wait until connected and every subscription, announcement and message queued so far has
    /// been handed to the client; `false` on timeout or when not started.
    ///
    /// With a caller-driven loop the loop must keep turning meanwhile: call this from another
    /// task, or with a short timeout between [`Runner::poll_timeout`] calls.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let work = async {
            let mut status = self.connection_status();
            if status.wait_for(|connected| *connected).await.is_err() {
                return false;
            }
            self.flush().await
        };
        tokio::time::timeout(timeout, work).await.unwrap_or(false)
    }

    /// Wait until everything queued so far has been handed to the MQTT client; `false` if not
    /// running.
    async fn flush(&self) -> bool {
        let (done, wait) = oneshot::channel();
        if self.enqueue(Outgoing::Barrier(done)).is_err() {
            return false;
        }
        wait.await.is_ok()
    }

    /// Register a callback for `data/<service>/<signal>`, sent by another resource.
    pub fn register_incoming_data<F, R>(
        &self,
        service: &str,
        signal: &str,
        on_change_only: bool,
        callback: F,
    ) -> Result<(), SdkError>
    where
        F: Fn(&Framework, MessageType, &str, &str, &str) -> R + Send + Sync + 'static,
        R: CallbackOutput,
    {
        self.register_input(
            MessageType::Data,
            service,
            signal,
            wrap(callback),
            on_change_only,
            false,
            false,
            None,
        )
    }

    /// Register a callback for availability information: `prefix/<service>/<signal>`, where
    /// `prefix` is [`MessageType::CommandAvailable`], [`MessageType::DataAvailable`] or
    /// [`MessageType::ResourceAvailable`]. For the latter `signal` is ignored (as the seed says)
    /// and `presence` is used.
    pub fn register_incoming_availability<F, R>(
        &self,
        prefix: MessageType,
        service: &str,
        signal: &str,
        callback: F,
    ) -> Result<(), SdkError>
    where
        F: Fn(&Framework, MessageType, &str, &str, &str) -> R + Send + Sync + 'static,
        R: CallbackOutput,
    {
        let signal = match prefix {
            MessageType::ResourceAvailable => SUFFIX_PRESENCE,
            _ => signal,
        };
        self.register_input(
            prefix,
            service,
            signal,
            wrap(callback),
            false,
            false,
            false,
            None,
        )
    }

    #[allow(clippy::too_many_arguments)] // private; mirrors sgframework's _register_inputsignal
    fn register_input(
        &self,
        message_type: MessageType,
        service: &str,
        signal: &str,
        callback: Callback,
        on_change_only: bool,
        echo: bool,
        echo_as_retained: bool,
        default: Option<String>,
    ) -> Result<(), SdkError> {
        let service = checked_name(service)?;
        let signal = checked_name(signal)?;
        let key = topic(message_type, &service, &signal);
        let info = InputSignal {
            message_type,
            service,
            signal,
            callback,
            on_change_only,
            echo,
            echo_as_retained,
            default,
            last_payload: None,
        };
        let mut signals = self.inner.signals.lock();
        match signals
            .inputs
            .iter_mut()
            .find(|(existing, _)| *existing == key)
        {
            Some(entry) => entry.1 = info,
            None => signals.inputs.push((key, info)),
        }
        Ok(())
    }

    /// Send a command on `command/<service>/<signal>`, retained or not. Queued at once (never
    /// waits for the network); an error before `start()`.
    pub fn send_command(
        &self,
        service: &str,
        signal: &str,
        value: impl fmt::Display,
        retained: bool,
    ) -> Result<(), SdkError> {
        let service = checked_name(service)?;
        let signal = checked_name(signal)?;
        let message = self.message(
            topic(MessageType::Command, &service, &signal),
            value.to_string(),
            retained,
        );
        self.enqueue(Outgoing::Publish(Box::new(message)))
            .map_err(|_| SdkError::NotStarted("send_command()"))
    }

    /// Send data on `data/<me>/<signal>`, registered before with
    /// [`Resource::register_outgoing_data`] (which also decided whether it is retained). The
    /// value becomes the signal's new default when it has one. Queued at once.
    pub fn send_data(&self, signal: &str, value: impl fmt::Display) -> Result<(), SdkError> {
        let signal_name = signal.trim();
        let key = topic(MessageType::Data, &self.inner.name, signal_name);
        let value = value.to_string();
        let retained = {
            let signals = self.inner.signals.lock();
            let Some((_, output)) = signals
                .outputs
                .iter()
                .find(|(existing, _)| *existing == key)
            else {
                tracing::warn!(framework = %self.inner.name, signal = signal_name, value, "This data signal has not been registered.");
                return Err(SdkError::UnregisteredSignal(signal_name.to_owned()));
            };
            output.retained
        };
        let message = self.message(key.clone(), value.clone(), retained);
        self.enqueue(Outgoing::Publish(Box::new(message)))
            .map_err(|_| SdkError::NotStarted("send_data()"))?;
        let mut signals = self.inner.signals.lock();
        if let Some((_, output)) = signals
            .outputs
            .iter_mut()
            .find(|(existing, _)| *existing == key)
            && output.default.is_some()
        {
            output.default = Some(value);
        }
        Ok(())
    }

    /// The default (last sent or echoed) value of an outgoing signal or echoed command, as it
    /// would be re-sent at the next reconnect.
    pub fn default_value(&self, signal: &str) -> Option<String> {
        let key = topic(MessageType::Data, &self.inner.name, signal.trim());
        let command_key = topic(MessageType::Command, &self.inner.name, signal.trim());
        let signals = self.inner.signals.lock();
        signals
            .outputs
            .iter()
            .find(|(existing, _)| *existing == key)
            .and_then(|(_, output)| output.default.clone())
            .or_else(|| {
                signals
                    .inputs
                    .iter()
                    .find(|(existing, _)| *existing == command_key)
                    .and_then(|(_, input)| input.default.clone())
            })
    }

    /// Connect and run on an owned background task. Returns at once (the connection, and
    /// reconnections with backoff, happen on the task); the handle can abort the task (an
    /// abrupt close: the broker publishes the will). Needs a tokio runtime.
    pub fn start(&self) -> Result<TaskHandle, SdkError> {
        let runner = self.event_loop()?;
        Ok(TaskHandle {
            task: tokio::spawn(runner.run()),
            framework: self.clone(),
        })
    }

    /// Prepare to run in a loop the caller drives (sgframework's `start()` without threaded
    /// networking, then `loop()`): nothing happens on the network until
    /// [`Runner::step`] or [`Runner::poll_timeout`] is called, and they must be called often.
    pub fn event_loop(&self) -> Result<Runner, SdkError> {
        let mut running = self.inner.running.lock();
        // A client whose loop is gone (aborted, dropped runner) no longer counts as started.
        if running
            .as_ref()
            .is_some_and(|running| !running.client.is_closed())
        {
            return Err(SdkError::AlreadyStarted);
        }
        let options = self.client_options()?;
        let qos = self.qos();
        let (client, event_loop) = EventLoop::new(options);
        let (outgoing, queue) = mpsc::unbounded_channel();
        let filters: Vec<String> = self
            .inner
            .signals
            .lock()
            .inputs
            .iter()
            .map(|(key, _)| key.clone())
            .collect();
        if !filters.is_empty() {
            // The client renews these after every reconnect without a session; we ask once.
            let _ = outgoing.send(Outgoing::Subscribe(filters, qos));
        }
        tokio::spawn(forward(client.clone(), queue, self.inner.name.clone()));
        *running = Some(Running { client, outgoing });
        drop(running);
        tracing::info!(framework = %self.inner.name, host = %self.inner.host, port = self.inner.port, "Setting up connection to the MQTT broker.");
        Ok(Runner {
            framework: self.clone(),
            event_loop,
        })
    }

    /// Disconnect: a resource first publishes its presence `False` (retained); then DISCONNECT,
    /// so no will. Waits at most a few seconds for the broker. An error if not started.
    ///
    /// With a caller-driven loop, use [`Runner::stop`], which keeps the loop turning meanwhile.
    pub async fn stop(&self) -> Result<(), SdkError> {
        let Some(running) = self.inner.running.lock().take() else {
            return Err(SdkError::NotStarted("stop()"));
        };
        tracing::info!(framework = %self.inner.name, "Disconnecting from the MQTT broker.");
        let (done, flushed) = oneshot::channel();
        let _ = running.outgoing.send(Outgoing::Barrier(done));
        let goodbye = async {
            let _ = flushed.await;
            if self.inner.kind == Kind::Resource {
                let presence = self.presence_topic();
                running
                    .client
                    .publish(presence, QoS::AtLeastOnce, true, PAYLOAD_FALSE)
                    .await?;
            }
            Ok::<(), SdkError>(())
        };
        let outcome = match tokio::time::timeout(STOP_TIMEOUT, goodbye).await {
            Ok(outcome) => outcome,
            Err(_) => {
                tracing::warn!(framework = %self.inner.name, "The broker did not acknowledge the goodbye in time.");
                Ok(())
            }
        };
        let _ = running.client.disconnect().await;
        self.set_status(false);
        outcome
    }

    fn presence_topic(&self) -> String {
        topic(
            MessageType::ResourceAvailable,
            &self.inner.name,
            SUFFIX_PRESENCE,
        )
    }

    fn client_options(&self) -> Result<ClientOptions, SdkError> {
        let settings = self.inner.settings.lock().clone();
        let client_id = if settings.clean_session {
            format!("{}-{}", self.inner.name, std::process::id())
        } else {
            self.inner.name.clone()
        };
        let mut options = ClientOptions::new(client_id, self.inner.host.clone(), self.inner.port)
            .protocol(settings.protocol)
            .keep_alive(settings.keep_alive)
            .clean_start(settings.clean_session)
            .reconnect_backoff(settings.reconnect_backoff.0, settings.reconnect_backoff.1);
        if let Some(directory) = &settings.certificate_directory {
            options = options.tls(TlsOptions::from_certificate_directory(directory)?);
        }
        if self.inner.kind == Kind::Resource {
            options = options.last_will(LastWill {
                topic: self.presence_topic(),
                payload: Bytes::from_static(PAYLOAD_FALSE.as_bytes()),
                qos: settings.qos,
                retain: true,
                properties: Properties::default(),
            });
        }
        Ok(options)
    }

    fn message(&self, topic: String, payload: String, retained: bool) -> Message {
        Message::new(topic, payload)
            .qos(self.qos())
            .retain(retained)
    }

    fn enqueue(&self, outgoing: Outgoing) -> Result<(), ()> {
        match &*self.inner.running.lock() {
            Some(running) => running.outgoing.send(outgoing).map_err(|_| ()),
            None => Err(()),
        }
    }

    fn set_status(&self, connected: bool) {
        let changed = self.inner.status.send_if_modified(|current| {
            let changed = *current != connected;
            *current = connected;
            changed
        });
        if !changed {
            return;
        }
        let callback = self.inner.status_callback.lock().clone();
        if let Some(callback) = callback
            && catch_unwind(AssertUnwindSafe(|| callback(self, connected))).is_err()
        {
            tracing::warn!(framework = %self.inner.name, connected, "Failed to run the callback for the broker connection status.");
        }
    }

    fn handle_event(&self, event: Event) {
        match event {
            Event::Connected { .. } => {
                tracing::info!(framework = %self.inner.name, "Successful connection to the MQTT broker.");
                self.set_status(true);
                self.announce();
            }
            Event::Message(publish) => self.dispatch(publish),
            Event::Disconnected { reason } => {
                tracing::warn!(framework = %self.inner.name, ?reason, "Now disconnected from the MQTT broker.");
                self.set_status(false);
            }
            Event::ConnectFailed { error, retry_in } => {
                tracing::warn!(framework = %self.inner.name, %error, ?retry_in, "Failed to connect to the MQTT broker.");
                self.set_status(false);
            }
            Event::ResubscribeFailed {
                filter,
                reason_code,
            } => {
                tracing::warn!(framework = %self.inner.name, filter, ?reason_code, "The broker refused a subscription after reconnecting.");
            }
        }
    }

    /// sgframework's `_publish_capablities_and_defaultvalues`, in its order: presence, then per
    /// outgoing data its availability and default, then per command its availability, the
    /// echo's data availability and default.
    fn announce(&self) {
        if self.inner.kind != Kind::Resource {
            return;
        }
        let name = &self.inner.name;
        let mut messages = vec![self.message(self.presence_topic(), PAYLOAD_TRUE.into(), true)];
        {
            let signals = self.inner.signals.lock();
            for (key, output) in &signals.outputs {
                messages.push(self.message(
                    topic(MessageType::DataAvailable, name, &output.signal),
                    PAYLOAD_TRUE.into(),
                    true,
                ));
                if let Some(default) = &output.default {
                    messages.push(self.message(key.clone(), default.clone(), output.retained));
                }
            }
            for (_, input) in &signals.inputs {
                if input.message_type != MessageType::Command {
                    continue;
                }
                messages.push(self.message(
                    topic(MessageType::CommandAvailable, name, &input.signal),
                    PAYLOAD_TRUE.into(),
                    true,
                ));
                if input.echo {
                    messages.push(self.message(
                        topic(MessageType::DataAvailable, name, &input.signal),
                        PAYLOAD_TRUE.into(),
                        true,
                    ));
                    if let Some(default) = &input.default {
                        messages.push(self.message(
                            topic(MessageType::Data, name, &input.signal),
                            default.clone(),
                            input.echo_as_retained,
                        ));
                    }
                }
            }
        }
        for message in messages {
            let _ = self.enqueue(Outgoing::Publish(Box::new(message)));
        }
    }

    /// sgframework's `_on_incoming_message`.
    fn dispatch(&self, publish: Publish) {
        let name = &self.inner.name;
        let input_topic = publish.topic.trim();
        let Ok(payload) = std::str::from_utf8(&publish.payload) else {
            tracing::warn!(framework = %name, topic = input_topic, "Received a payload that is not UTF-8; dropped.");
            return;
        };
        let payload = payload.trim();
        let Some((prefix, service, signal)) = split_topic(input_topic) else {
            tracing::warn!(framework = %name, topic = input_topic, payload, "Received wrong MQTT topic structure.");
            return;
        };
        let (callback, message_type, echo, echo_as_retained) = {
            let mut signals = self.inner.signals.lock();
            let Some((_, input)) = signals
                .inputs
                .iter_mut()
                .find(|(existing, _)| existing == input_topic)
            else {
                tracing::warn!(framework = %name, topic = input_topic, payload, "Received unregistered input message.");
                return;
            };
            if input.on_change_only {
                if input.last_payload.as_deref() == Some(payload) {
                    tracing::debug!(framework = %name, topic = input_topic, payload, "The payload has not changed, skipping callback.");
                    return;
                }
                input.last_payload = Some(payload.to_owned());
            }
            (
                input.callback.clone(),
                input.message_type,
                input.echo,
                input.echo_as_retained,
            )
        };
        let (service, signal) = (service.trim(), signal.trim());
        debug_assert_eq!(prefix.trim(), message_type.as_str());
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            callback(self, message_type, service, signal, payload)
        }));
        let returned = match outcome {
            Ok(Ok(returned)) => returned,
            Ok(Err(error)) => {
                tracing::warn!(framework = %name, topic = input_topic, payload, error, "Failed to run callback.");
                return;
            }
            Err(_) => {
                tracing::warn!(framework = %name, topic = input_topic, payload, "The callback panicked.");
                return;
            }
        };
        if !echo || message_type != MessageType::Command {
            return;
        }
        let echo_payload = returned.unwrap_or_else(|| payload.to_owned());
        let echo_topic = topic(MessageType::Data, service, signal);
        let message = self.message(echo_topic, echo_payload.clone(), echo_as_retained);
        let _ = self.enqueue(Outgoing::Publish(Box::new(message)));
        let mut signals = self.inner.signals.lock();
        if let Some((_, input)) = signals
            .inputs
            .iter_mut()
            .find(|(existing, _)| existing == input_topic)
            && input.default.is_some()
        {
            input.default = Some(echo_payload);
        }
    }

    fn describe(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let signals = self.inner.signals.lock();
        let (name, host, port) = (&self.inner.name, &self.inner.host, self.inner.port);
        match self.inner.kind {
            Kind::Resource => write!(
                f,
                "SG Resource: '{name}', connecting to host '{host}', port {port}. Has {} incoming and {} outgoing topics registered.",
                signals.inputs.len(),
                signals.outputs.len()
            )?,
            Kind::App => write!(
                f,
                "SG App: '{name}', connecting to host '{host}', port {port}. Has {} input signals registered.",
                signals.inputs.len()
            )?,
        }
        writeln!(f, " Details: ")?;
        writeln!(f, "  Registered incoming topics:")?;
        for (key, input) in &signals.inputs {
            writeln!(f, "    {key}")?;
            writeln!(
                f,
                "        IN: '{}'-'{}'-'{}' Default: '{}' Echo: {} (echo retained: {}) Callback only on change: {}",
                input.message_type,
                input.service,
                input.signal,
                input.default.as_deref().unwrap_or("None"),
                python_bool(input.echo),
                python_bool(input.echo_as_retained),
                python_bool(input.on_change_only)
            )?;
        }
        writeln!(f, "  Registered outgoing topics:")?;
        for (key, output) in &signals.outputs {
            writeln!(f, "    {key}")?;
            writeln!(
                f,
                "        OUT: 'data'-'{name}'-'{}' Default: '{}' Retained: {}",
                output.signal,
                output.default.as_deref().unwrap_or("None"),
                python_bool(output.retained)
            )?;
        }
        Ok(())
    }
}

fn python_bool(value: bool) -> &'static str {
    if value { PAYLOAD_TRUE } else { PAYLOAD_FALSE }
}

fn wrap<F, R>(callback: F) -> Callback
where
    F: Fn(&Framework, MessageType, &str, &str, &str) -> R + Send + Sync + 'static,
    R: CallbackOutput,
{
    Arc::new(move |framework, message_type, service, signal, payload| {
        callback(framework, message_type, service, signal, payload).into_echo()
    })
}

/// Drain the outgoing queue into the client, in order.
async fn forward(client: Client, mut queue: mpsc::UnboundedReceiver<Outgoing>, name: String) {
    while let Some(outgoing) = queue.recv().await {
        match outgoing {
            Outgoing::Subscribe(filters, qos) => {
                for filter in filters {
                    tracing::info!(framework = %name, filter, "Subscribing to MQTT topic.");
                    if let Err(error) = client.subscribe(filter.clone(), qos).await {
                        tracing::warn!(framework = %name, filter, %error, "Subscription failed.");
                    }
                }
            }
            Outgoing::Publish(message) => match client.begin_publish(*message).await {
                Ok(ack) => {
                    let name = name.clone();
                    tokio::spawn(async move {
                        if let Err(error) = ack.await {
                            tracing::warn!(framework = %name, %error, "A publish failed.");
                        }
                    });
                }
                Err(error) => tracing::warn!(framework = %name, %error, "A publish failed."),
            },
            Outgoing::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// The caller-driven loop of a started [`Framework`] ([`Framework::event_loop`]).
#[derive(Debug)]
pub struct Runner {
    framework: Framework,
    event_loop: EventLoop,
}

impl Runner {
    /// Run the network until one event (connection, message, loss) has been handled; the
    /// callbacks run inside. `false` once the client has shut down. Cancel safe.
    pub async fn step(&mut self) -> bool {
        match self.event_loop.poll().await {
            Some(event) => {
                self.framework.handle_event(event);
                true
            }
            None => {
                self.framework.set_status(false);
                false
            }
        }
    }

    /// sgframework's `loop()`: like [`step`](Runner::step) but returns after `timeout` even
    /// when nothing happened (`true` then).
    pub async fn poll_timeout(&mut self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.step())
            .await
            .unwrap_or(true)
    }

    /// Run until the client shuts down ([`Framework::stop`]).
    pub async fn run(mut self) {
        while self.step().await {}
    }

    /// [`Framework::stop`] while this loop keeps turning, then the loop ends.
    pub async fn stop(mut self) -> Result<(), SdkError> {
        let framework = self.framework.clone();
        let (outcome, ()) = tokio::join!(framework.stop(), async { while self.step().await {} });
        outcome
    }

    /// The framework this loop runs.
    pub fn framework(&self) -> &Framework {
        &self.framework
    }
}

/// The background task of [`Framework::start`].
#[derive(Debug)]
pub struct TaskHandle {
    task: JoinHandle<()>,
    framework: Framework,
}

impl TaskHandle {
    /// Kill the task without DISCONNECT: the socket closes and the broker publishes the will
    /// (a resource's presence `False`). Call [`Framework::stop`] for a clean exit.
    pub fn abort(&self) {
        self.task.abort();
        // Forget the dead client so that `start()` works again and sending reports NotStarted.
        let running = self.framework.inner.running.lock().take();
        self.framework.set_status(false);
        // Its handles must outlive the loop: the loop may still be in a poll on another thread,
        // and a client whose last handle is dropped sends DISCONNECT, which would cancel the
        // will that an abort is meant to fire.
        if let (Some(running), Ok(runtime)) = (running, tokio::runtime::Handle::try_current()) {
            let aborted = self.task.abort_handle();
            runtime.spawn(async move {
                while !aborted.is_finished() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                drop(running);
            });
        }
    }

    /// Whether the task has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Wait for the task to end (after [`Framework::stop`] or [`abort`](TaskHandle::abort)).
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

/// A device or service on the hub: receives commands, sends data, announces what it offers
/// and its presence (sgframework's `Resource`). Dereferences to [`Framework`] for everything
/// shared with apps.
///
/// Its last will is `resourceavailable/<name>/presence` = `False`, retained.
#[derive(Clone, Debug)]
pub struct Resource {
    framework: Framework,
}

impl Resource {
    /// A resource named `name` (its topic level), for the broker at `host:port`. Nothing is
    /// connected before [`start`](Framework::start) or [`event_loop`](Framework::event_loop).
    pub fn new(name: &str, host: &str, port: u16) -> Resource {
        Resource {
            framework: Framework::new(Kind::Resource, name, host, port),
        }
    }

    /// Register a callback for `command/<me>/<signal>`. With `echo`, the command is echoed on
    /// `data/<me>/<signal>`: the callback's value when it returns one, else the payload; and
    /// `commandavailable` plus `dataavailable` are announced (retained `True`) on every
    /// connect. Registrations take effect at the next start.
    pub fn register_incoming_command<F, R>(
        &self,
        signal: &str,
        options: CommandOptions,
        callback: F,
    ) -> Result<(), SdkError>
    where
        F: Fn(&Framework, MessageType, &str, &str, &str) -> R + Send + Sync + 'static,
        R: CallbackOutput,
    {
        let name = self.framework.inner.name.clone();
        self.framework.register_input(
            MessageType::Command,
            &name,
            signal,
            wrap(callback),
            options.on_change_only,
            options.echo,
            options.echo_as_retained,
            options.default,
        )
    }

    /// Declare an outgoing data signal: `dataavailable/<me>/<signal>` is announced on every
    /// connect, with the default (if any) on `data/<me>/<signal>`. `retained` decides how
    /// [`send_data`](Framework::send_data) publishes it.
    pub fn register_outgoing_data(
        &self,
        signal: &str,
        default: Option<&str>,
        retained: bool,
    ) -> Result<(), SdkError> {
        let signal = checked_name(signal)?;
        let key = topic(MessageType::Data, &self.framework.inner.name, &signal);
        let info = OutputSignal {
            signal,
            default: default.map(str::to_owned),
            retained,
        };
        let mut signals = self.framework.inner.signals.lock();
        match signals
            .outputs
            .iter_mut()
            .find(|(existing, _)| *existing == key)
        {
            Some(entry) => entry.1 = info,
            None => signals.outputs.push((key, info)),
        }
        Ok(())
    }
}

impl Deref for Resource {
    type Target = Framework;

    fn deref(&self) -> &Framework {
        &self.framework
    }
}

impl fmt::Display for Resource {
    /// sgframework's `get_descriptive_ascii_art()`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.framework.describe(f)
    }
}

/// An application: sends commands, listens to data and availability (sgframework's `App`).
/// No last will, no presence. Dereferences to [`Framework`].
#[derive(Clone, Debug)]
pub struct App {
    framework: Framework,
}

impl App {
    /// An app named `name`, for the broker at `host:port`.
    pub fn new(name: &str, host: &str, port: u16) -> App {
        App {
            framework: Framework::new(Kind::App, name, host, port),
        }
    }
}

impl Deref for App {
    type Target = Framework;

    fn deref(&self) -> &Framework {
        &self.framework
    }
}

impl fmt::Display for App {
    /// sgframework's `get_descriptive_ascii_art()`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.framework.describe(f)
    }
}

impl fmt::Display for Framework {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.describe(f)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use polyhub_client::Publish;

    use super::*;

    fn publish(topic: &str, payload: &[u8]) -> Publish {
        Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: topic.into(),
            packet_id: 1,
            payload: Bytes::copy_from_slice(payload),
            properties: Properties::default(),
        }
    }

    #[test]
    fn display_matches_sgframework() {
        let sign = Resource::new("sign", "localhost", 1883);
        let ignore = |_: &Framework, _: MessageType, _: &str, _: &str, _: &str| {};
        sign.register_incoming_command(
            "state",
            CommandOptions::new()
                .default_value("False")
                .echo_as_retained(true),
            ignore,
        )
        .unwrap();
        sign.register_outgoing_data("speed", None, false).unwrap();
        sign.register_incoming_data("other", "temp", true, ignore)
            .unwrap();
        // Produced by sgframework 0.2.3's get_descriptive_ascii_art() for the same resource.
        let expected = "SG Resource: 'sign', connecting to host 'localhost', port 1883. Has 2 incoming and 1 outgoing topics registered. Details: \n  Registered incoming topics:\n    command/sign/state\n        IN: 'command'-'sign'-'state' Default: 'False' Echo: True (echo retained: True) Callback only on change: False\n    data/other/temp\n        IN: 'data'-'other'-'temp' Default: 'None' Echo: False (echo retained: False) Callback only on change: True\n  Registered outgoing topics:\n    data/sign/speed\n        OUT: 'data'-'sign'-'speed' Default: 'None' Retained: False\n";
        assert_eq!(sign.to_string(), expected);
        let app = App::new("driver", "localhost", 1883);
        assert_eq!(
            app.to_string(),
            "SG App: 'driver', connecting to host 'localhost', port 1883. Has 0 input signals registered. Details: \n  Registered incoming topics:\n  Registered outgoing topics:\n"
        );
    }

    #[test]
    fn unregistered_wrong_depth_and_binary_messages_are_dropped() {
        let sign = Resource::new("sign", "localhost", 1883);
        let calls = Arc::new(Mutex::new(Vec::<String>::new()));
        let record = calls.clone();
        sign.register_incoming_command(
            "state",
            CommandOptions::new(),
            move |_: &Framework, _: MessageType, _: &str, _: &str, payload: &str| {
                record.lock().push(payload.to_owned());
            },
        )
        .unwrap();
        sign.dispatch(publish("command/sign/state/extra", b"a"));
        sign.dispatch(publish("command/sign", b"b"));
        sign.dispatch(publish("command/sign/other", b"c"));
        sign.dispatch(publish("data/sign/state", b"d"));
        sign.dispatch(publish("command/sign/state", b"\xff\xfe"));
        assert!(calls.lock().is_empty());
        // Not started: the echo cannot go out, and that does not hurt either.
        sign.dispatch(publish("command/sign/state", b" \t on \r\n"));
        assert_eq!(*calls.lock(), vec!["on"]);
    }

    #[test]
    fn status_callback_panics_are_survived_and_only_changes_reported() {
        let app = App::new("driver", "localhost", 1883);
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        app.on_broker_connectionstatus(move |_, connected| {
            counter.fetch_add(1, Ordering::SeqCst);
            assert!(!connected, "panics when connected, on purpose");
        });
        app.set_status(true);
        app.set_status(true);
        app.set_status(false);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(!app.is_connected());
    }
}
