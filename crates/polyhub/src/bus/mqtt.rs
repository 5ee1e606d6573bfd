//! [`MqttBus`]: the hub's bus over an MQTT 5 connection (polyhub-client), for parsers in
//! their own process and for brokers other than the embedded one.
//!
//! Each [`BusClient`] is one polyhub-client connection with manual acknowledgements: a QoS 1
//! message is acknowledged (PUBACK) only when the hub acknowledges its token, and the client's
//! receive maximum (1000) lets that many wait for a batch commit while the broker holds the
//! rest. Persistent connects use clean start 0 and a session expiry of seven days, so the
//! broker keeps the subscriptions and the unacknowledged messages while the parser is away
//! and redelivers them (DUP) when it comes back. Reconnects after a lost connection are the
//! client's business; tokens of messages from before a reconnect go stale (acknowledging them
//! does nothing, the broker sends those messages again). Two live handles with the same
//! client id would take the session from each other at every reconnect: drop the old one
//! before connecting again.
//!
//! **Closing.** Dropping a client first makes a round trip to the broker (an UNSUBSCRIBE of a
//! filter nobody uses), so that the broker has read everything sent before, the last
//! acknowledgements included, and then sends DISCONNECT. [`MqttBus`] keeps that closing
//! connection; the next connect with the same id waits for it, as does [`MqttBus::closed`] at
//! the end of the process. Without the round trip, a parser restarted (or a process ending)
//! right after its last commit could lose its final PUBACKs: closing a socket with unread
//! deliveries in it makes the kernel reset the connection, and Mosquitto then drops what it had
//! not read yet (seen in tests). A broker without polyhub's seq would deliver those committed
//! messages again, and they would be stored twice.
//!
//! CONNECT carries the user property `polyhub-stamp-seq=1`, so polyhub's broker adds
//! `polyhub-seq` to every PUBLISH; other brokers ignore it and `seq` stays `None`.
//!
//! For an external broker ([`MqttBusOptions`] from `[external_broker]`) the options add a
//! user name and password, TLS, and a prefix put before every client id, so that the hub's
//! fixed ids (`polyhub-parser-<hub>`, ...) can be told apart per installation.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use polyhub_client::{
    Client, ClientError, ClientOptions, ConnectionError, DisconnectReason, Event, Events, Message,
    Properties, ProtocolVersion, QoS, ReasonCode, SubscribeFilter, SubscriptionOptions, TlsOptions,
};
use polyhub_hub::bus::{
    AckToken, BusClient, BusConnector, BusError, BusMessage, Outgoing, Routing,
};

/// CONNECT user property asking polyhub's broker to stamp each PUBLISH with its sequence
/// number.
const STAMP_SEQ_PROPERTY: &str = "polyhub-stamp-seq";

/// PUBLISH user property with the sequence number, as polyhub's broker stamps it.
const SEQ_PROPERTY: &str = "polyhub-seq";

/// How long the broker keeps a persistent session while its client is away.
const PERSISTENT_SESSION_EXPIRY: u32 = 7 * 24 * 3600;

/// QoS 1 messages the broker may have waiting for our acknowledgement: room for a parser's
/// batch (1000 messages by default) while it commits.
const RECEIVE_MAXIMUM: u16 = 1000;

/// Longest wait for a dropped client's DISCONNECT (polyhub-client gives up writing after 5 s).
const CLOSE_WAIT: Duration = Duration::from_secs(6);

/// The filter of the closing round trip; never subscribed.
const CLOSE_BARRIER_FILTER: &str = "polyhub/bus/close-barrier";

/// Connections being closed, by the client id the hub asked for.
type Closing = Arc<Mutex<HashMap<String, tokio::task::JoinHandle<()>>>>;

fn lock(
    closing: &Closing,
) -> std::sync::MutexGuard<'_, HashMap<String, tokio::task::JoinHandle<()>>> {
    closing.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where the broker is and how to reach it. `Debug` leaves the password out.
#[derive(Clone)]
pub(crate) struct MqttBusOptions {
    /// Host name or IP address.
    pub(crate) host: String,
    /// Port.
    pub(crate) port: u16,
    /// TLS settings; `None` for plain TCP.
    pub(crate) tls: Option<TlsOptions>,
    /// Keep-alive of each connection.
    pub(crate) keep_alive: Duration,
    /// User name to log in with.
    pub(crate) username: Option<String>,
    /// Password to log in with (sent only with a user name).
    pub(crate) password: Option<String>,
    /// Put before every client id the hub asks for.
    pub(crate) client_id_prefix: String,
}

impl std::fmt::Debug for MqttBusOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttBusOptions")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("keep_alive", &self.keep_alive)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("client_id_prefix", &self.client_id_prefix)
            .finish()
    }
}

impl MqttBusOptions {
    /// Plain TCP to `address`, keep-alive 30 s.
    pub(crate) fn new(address: SocketAddr) -> MqttBusOptions {
        MqttBusOptions::to_host(address.ip().to_string(), address.port())
    }

    /// Plain TCP to `host` (a name or an IP address) and `port`, keep-alive 30 s, no login,
    /// no client id prefix.
    pub(crate) fn to_host(host: String, port: u16) -> MqttBusOptions {
        MqttBusOptions {
            host,
            port,
            tls: None,
            keep_alive: Duration::from_secs(30),
            username: None,
            password: None,
            client_id_prefix: String::new(),
        }
    }

    /// Where these options lead, for messages: `mqtt://host:port` or `mqtts://host:port`.
    pub(crate) fn describe(&self) -> String {
        let scheme = if self.tls.is_some() { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// The hub's bus over MQTT 5 connections to one broker.
#[derive(Debug)]
pub(crate) struct MqttBus {
    options: MqttBusOptions,
    closing: Closing,
}

impl MqttBus {
    /// A bus to the broker at `address` over plain TCP (the parent's listener, for a
    /// `polyhub parser` child).
    pub(crate) fn new(address: SocketAddr) -> MqttBus {
        MqttBus::with_options(MqttBusOptions::new(address))
    }

    /// A bus with the given connection settings.
    pub(crate) fn with_options(options: MqttBusOptions) -> MqttBus {
        MqttBus {
            options,
            closing: Closing::default(),
        }
    }

    /// Waits until every dropped client has sent its DISCONNECT (each at most [`CLOSE_WAIT`]):
    /// call it before the process ends, so that the last acknowledgements reach the broker.
    pub(crate) async fn closed(&self) {
        let closing: Vec<_> = lock(&self.closing).drain().map(|(_, task)| task).collect();
        for task in closing {
            let _ = tokio::time::timeout(CLOSE_WAIT, task).await;
        }
    }

    fn client_options(&self, client_id: &str, persistent: bool) -> ClientOptions {
        let client_id = format!("{}{client_id}", self.options.client_id_prefix);
        let mut options = ClientOptions::new(client_id, &self.options.host, self.options.port)
            .protocol(ProtocolVersion::V5)
            .keep_alive(self.options.keep_alive)
            .clean_start(!persistent)
            .manual_acks(true)
            .receive_maximum(RECEIVE_MAXIMUM)
            .connect_user_property(STAMP_SEQ_PROPERTY, "1")
            .reconnect_backoff(Duration::from_millis(100), Duration::from_secs(5))
            // A full batch plus connection events fits without stalling the connection task.
            .event_capacity(usize::from(RECEIVE_MAXIMUM) + 64);
        if persistent {
            options = options.session_expiry_interval(PERSISTENT_SESSION_EXPIRY);
        }
        if let Some(tls) = &self.options.tls {
            options = options.tls(tls.clone());
        }
        match (&self.options.username, &self.options.password) {
            (Some(username), Some(password)) => {
                options = options.credentials(username.clone(), password.clone().into_bytes());
            }
            (Some(username), None) => options = options.username(username.clone()),
            // MQTT 3.1.1 has no password without a user name; configuration refuses it.
            (None, _) => {}
        }
        options
    }
}

#[async_trait]
impl BusConnector for MqttBus {
    async fn connect(
        &self,
        client_id: &str,
        persistent: bool,
    ) -> Result<Box<dyn BusClient>, BusError> {
        // The previous connection with this id says goodbye first (see the module header).
        let previous = lock(&self.closing).remove(client_id);
        if let Some(previous) = previous {
            let _ = tokio::time::timeout(CLOSE_WAIT, previous).await;
        }
        let options = self.client_options(client_id, persistent);
        let (client, events) = Client::connect(options).await.map_err(connection_error)?;
        Ok(Box::new(MqttBusClient {
            client,
            events,
            tokens: HashMap::new(),
            next_token: 1,
            finished: false,
            client_id: client_id.to_owned(),
            closing: Arc::clone(&self.closing),
        }))
    }
}

/// One MQTT connection (reconnected by the client as needed).
#[derive(Debug)]
struct MqttBusClient {
    client: Client,
    events: Events,
    /// The client's acknowledgement tokens of the messages handed out on the current
    /// connection, by bus token.
    tokens: HashMap<u64, polyhub_client::AckToken>,
    next_token: u64,
    /// The broker said it is shutting down: `recv` returns `None` from then on.
    finished: bool,
    /// The id the hub asked for (without the prefix), under which the bus tracks the close.
    client_id: String,
    closing: Closing,
}

impl Drop for MqttBusClient {
    fn drop(&mut self) {
        // Outside a runtime nothing can be awaited; the client's task closes the connection
        // on its own when the last handle is gone.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let client = self.client.clone();
        let finished = self.finished;
        let task = runtime.spawn(async move {
            if !finished {
                let barrier = client
                    .unsubscribe_many(vec![CLOSE_BARRIER_FILTER.to_owned()], Properties::default());
                let _ = tokio::time::timeout(CLOSE_WAIT, barrier).await;
            }
            let _ = client.disconnect().await;
        });
        if let Some(older) = lock(&self.closing).insert(self.client_id.clone(), task) {
            // Two handles with one id were alive (a caller error); the older close goes on
            // unobserved.
            drop(older);
        }
    }
}

impl MqttBusClient {
    fn bus_message(
        &mut self,
        publish: polyhub_client::Publish,
        token: Option<polyhub_client::AckToken>,
    ) -> BusMessage {
        let bus_token = self.next_token;
        self.next_token += 1;
        if let Some(token) = token {
            self.tokens.insert(bus_token, token);
        }
        let properties = publish.properties;
        let seq = properties
            .user_properties
            .iter()
            .find(|(name, _)| name == SEQ_PROPERTY)
            .and_then(|(_, value)| value.parse::<u64>().ok());
        BusMessage {
            topic: publish.topic,
            payload: publish.payload,
            qos: publish.qos as u8,
            seq,
            redelivered: publish.dup,
            token: AckToken(bus_token),
            response_topic: properties.response_topic,
            correlation_data: properties.correlation_data,
            received_at: polyhub_store::now_millis(),
        }
    }
}

#[async_trait]
impl BusClient for MqttBusClient {
    async fn subscribe(&mut self, filters: &[String]) -> Result<(), BusError> {
        if filters.is_empty() {
            return Ok(());
        }
        let requested = filters.iter().map(|filter| SubscribeFilter {
            filter: filter.clone(),
            options: SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..SubscriptionOptions::default()
            },
        });
        let codes = self
            .client
            .subscribe_many(requested, Properties::default())
            .await
            .map_err(client_error)?;
        refused_filters(filters, &codes, "subscription")
    }

    async fn unsubscribe(&mut self, filters: &[String]) -> Result<(), BusError> {
        if filters.is_empty() {
            return Ok(());
        }
        let codes = self
            .client
            .unsubscribe_many(filters.to_vec(), Properties::default())
            .await
            .map_err(client_error)?;
        // "No subscription existed" is what we wanted anyway.
        let codes: Vec<ReasonCode> = codes
            .into_iter()
            .map(|code| {
                if code == ReasonCode::NO_SUBSCRIPTION_EXISTED {
                    ReasonCode::SUCCESS
                } else {
                    code
                }
            })
            .collect();
        refused_filters(filters, &codes, "unsubscribe")
    }

    /// Cancel safe: an event is taken from the client only when it is returned or skipped.
    async fn recv(&mut self) -> Result<Option<BusMessage>, BusError> {
        loop {
            if self.finished {
                return Ok(None);
            }
            let Some((event, token)) = self.events.recv_with_ack().await else {
                return Err(BusError::Closed("the MQTT client has stopped".into()));
            };
            match event {
                Event::Message(publish) => return Ok(Some(self.bus_message(publish, token))),
                Event::Connected {
                    session_present, ..
                } => {
                    // Messages of the previous connection were all read before this event;
                    // their tokens are stale, and the broker sends those messages again.
                    self.tokens.clear();
                    tracing::debug!(session_present, "Bus connection (re)established.");
                }
                Event::Disconnected {
                    reason:
                        DisconnectReason::ServerDisconnect {
                            reason_code: ReasonCode::SERVER_SHUTTING_DOWN,
                            ..
                        },
                } => {
                    tracing::info!("The broker is shutting down.");
                    self.finished = true;
                    self.tokens.clear();
                    // Stop reconnecting; the broker is going away on purpose.
                    let _ = self.client.disconnect().await;
                }
                Event::Disconnected { reason } => {
                    tracing::warn!(?reason, "Bus connection lost; reconnecting.");
                }
                Event::ConnectFailed { error, retry_in } => {
                    tracing::warn!(%error, ?retry_in, "Bus connection attempt failed.");
                }
                Event::ResubscribeFailed {
                    filter,
                    reason_code,
                } => {
                    tracing::warn!(
                        filter,
                        reason_code = reason_code.0,
                        "The broker refused a subscription after reconnecting."
                    );
                }
            }
        }
    }

    async fn ack(&mut self, tokens: &[AckToken]) -> Result<(), BusError> {
        // Unknown tokens (QoS 0, already acknowledged, from before a reconnect) are skipped.
        let client_tokens: Vec<polyhub_client::AckToken> = tokens
            .iter()
            .filter_map(|token| self.tokens.remove(&token.0))
            .collect();
        self.client
            .ack_all(client_tokens)
            .await
            .map_err(client_error)
    }

    async fn publish(&mut self, message: Outgoing) -> Result<Routing, BusError> {
        let qos = QoS::from_u8(message.qos)
            .ok_or_else(|| BusError::Refused(format!("QoS {} does not exist", message.qos)))?;
        let mut outgoing = Message::new(message.topic, message.payload)
            .qos(qos)
            .retain(message.retain);
        if let Some(correlation_data) = message.correlation_data {
            outgoing = outgoing.correlation_data(correlation_data);
        }
        if let Some(response_topic) = message.response_topic {
            outgoing = outgoing.response_topic(response_topic);
        }
        let published = self
            .client
            .publish_message(outgoing)
            .await
            .map_err(client_error)?;
        // The bus connects with MQTT 5, so a QoS 1/2 acknowledgement says whether anyone
        // subscribed; a broker that does not fill in the code answers plain success, which
        // cannot be told from "matched".
        Ok(match published.reason_code() {
            None => Routing::Unknown,
            Some(_) if published.no_matching_subscribers() => Routing::NoSubscribers,
            Some(_) => Routing::Matched,
        })
    }
}

/// An error if any filter got a failure code, naming them.
fn refused_filters(filters: &[String], codes: &[ReasonCode], what: &str) -> Result<(), BusError> {
    let refused: Vec<String> = filters
        .iter()
        .zip(codes)
        .filter(|(_, code)| code.is_error())
        .map(|(filter, code)| format!("{filter:?} (reason code 0x{:02x})", code.0))
        .collect();
    if refused.is_empty() {
        Ok(())
    } else {
        Err(BusError::Refused(format!(
            "{what} refused for {}",
            refused.join(", ")
        )))
    }
}

fn client_error(error: ClientError) -> BusError {
    match error {
        ClientError::Closed => BusError::Closed(error.to_string()),
        ClientError::InvalidTopic { .. }
        | ClientError::InvalidFilter { .. }
        | ClientError::SubscriptionRefused { .. }
        | ClientError::UnsubscribeRefused { .. }
        | ClientError::PublishRefused { .. }
        | ClientError::QoSNotSupported { .. }
        | ClientError::RetainNotSupported
        | ClientError::PacketTooLarge { .. } => BusError::Refused(error.to_string()),
        other => BusError::Other(other.to_string()),
    }
}

fn connection_error(error: ConnectionError) -> BusError {
    match error {
        ConnectionError::Refused { .. } => BusError::Refused(error.to_string()),
        other => BusError::Closed(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use polyhub_broker::{Broker, BrokerConfig};
    use tokio::net::TcpListener;

    use super::*;
    use crate::bus::test_support::{WAIT, filters, next, nothing_within, outgoing};

    /// How long "nothing arrives" is watched for.
    const QUIET: Duration = Duration::from_millis(300);

    async fn nothing(client: &mut Box<dyn BusClient>) {
        nothing_within(client, QUIET).await;
    }

    /// An embedded broker serving on 127.0.0.1:0, and a bus to it.
    async fn broker() -> (Broker, MqttBus) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let broker = Broker::new(BrokerConfig {
            sys_interval: 0,
            ..BrokerConfig::default()
        });
        let serving = broker.clone();
        tokio::spawn(async move { serving.serve(listener, std::future::pending()).await });
        (broker, MqttBus::new(address))
    }

    #[tokio::test]
    async fn unacknowledged_messages_are_redelivered_with_their_seq_after_a_dropped_handle() {
        let (broker, bus) = broker().await;
        let mut parser = bus.connect("parser", true).await.unwrap();
        parser.subscribe(&filters(&["data/#"])).await.unwrap();
        let mut device = bus.connect("device", false).await.unwrap();
        for payload in ["1", "2", "3"] {
            device
                .publish(outgoing("data/x", payload, 1))
                .await
                .unwrap();
        }
        let mut seqs = Vec::new();
        let mut tokens = Vec::new();
        for payload in ["1", "2", "3"] {
            let message = next(&mut parser).await;
            assert_eq!(message.payload, Bytes::from(payload));
            assert!(!message.redelivered);
            seqs.push(message.seq.expect("polyhub's broker stamps seq"));
            tokens.push(message.token);
        }
        assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]), "{seqs:?}");
        parser.ack(&tokens[..1]).await.unwrap();
        // The acknowledgement travels before this round trip ends.
        parser.subscribe(&filters(&["sync"])).await.unwrap();
        drop(parser);

        let mut parser = bus.connect("parser", true).await.unwrap();
        let mut again = Vec::new();
        for _ in 0..2 {
            let message = next(&mut parser).await;
            assert!(message.redelivered);
            again.push((message.seq.unwrap(), message.token));
        }
        again.sort_by_key(|(seq, _)| *seq);
        assert_eq!(
            again.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            seqs[1..]
        );
        // Subscriptions survived with the session.
        device.publish(outgoing("data/y", "4", 1)).await.unwrap();
        let fresh = next(&mut parser).await;
        assert_eq!(fresh.payload, Bytes::from_static(b"4"));
        assert!(fresh.seq.unwrap() > seqs[2]);

        let mut all: Vec<AckToken> = again.iter().map(|(_, token)| *token).collect();
        all.push(fresh.token);
        parser.ack(&all).await.unwrap();
        parser.subscribe(&filters(&["sync"])).await.unwrap();
        drop(parser);
        let mut parser = bus.connect("parser", true).await.unwrap();
        nothing(&mut parser).await;
        broker.shutdown().await;
    }

    #[tokio::test]
    async fn subscribe_and_unsubscribe_are_effective_on_return() {
        let (broker, bus) = broker().await;
        let mut parser = bus.connect("parser", false).await.unwrap();
        let mut device = bus.connect("device", false).await.unwrap();
        parser.subscribe(&filters(&["a", "b/+"])).await.unwrap();
        // The PUBACK of an MQTT 5 broker says whether anyone subscribed; QoS 0 has none.
        let routed = device.publish(outgoing("a", "1", 1)).await.unwrap();
        assert_eq!(routed, Routing::Matched);
        assert_eq!(next(&mut parser).await.topic, "a");
        parser.unsubscribe(&filters(&["a"])).await.unwrap();
        let routed = device.publish(outgoing("a", "2", 1)).await.unwrap();
        assert_eq!(routed, Routing::NoSubscribers);
        let routed = device.publish(outgoing("b/c", "3", 0)).await.unwrap();
        assert_eq!(routed, Routing::Unknown);
        let message = next(&mut parser).await;
        assert_eq!((message.topic.as_str(), message.qos), ("b/c", 0));
        nothing(&mut parser).await;

        let refused = parser.subscribe(&filters(&["bad/#/x"])).await;
        assert!(matches!(refused, Err(BusError::Refused(_))), "{refused:?}");
        broker.shutdown().await;
    }

    #[tokio::test]
    async fn correlation_data_and_response_topics_come_through() {
        let (broker, bus) = broker().await;
        let mut manager = bus.connect("manager", false).await.unwrap();
        manager.subscribe(&filters(&["cmd"])).await.unwrap();
        let local = broker.local_client("requester").unwrap();
        local
            .publish_with_properties(
                "cmd",
                "{}",
                QoS::AtLeastOnce,
                false,
                polyhub_broker::MessageProperties {
                    response_topic: Some("answers".into()),
                    correlation_data: Some(Bytes::from_static(b"42")),
                    ..polyhub_broker::MessageProperties::default()
                },
            )
            .await
            .unwrap();
        let request = next(&mut manager).await;
        assert_eq!(request.response_topic.as_deref(), Some("answers"));
        assert_eq!(request.correlation_data, Some(Bytes::from_static(b"42")));

        let mut listener = bus.connect("listener", false).await.unwrap();
        listener.subscribe(&filters(&["answers"])).await.unwrap();
        manager
            .publish(Outgoing {
                topic: "answers".into(),
                payload: Bytes::from_static(b"ok"),
                qos: 1,
                retain: false,
                correlation_data: request.correlation_data,
                response_topic: Some("answers/again".into()),
            })
            .await
            .unwrap();
        let answer = next(&mut listener).await;
        assert_eq!(answer.correlation_data, Some(Bytes::from_static(b"42")));
        assert_eq!(answer.response_topic.as_deref(), Some("answers/again"));
        broker.shutdown().await;
    }

    #[tokio::test]
    async fn client_ids_get_the_configured_prefix() {
        let (broker, bus) = broker().await;
        let mut options = bus.options.clone();
        options.client_id_prefix = "site1-".into();
        options.username = Some("polyhub".into());
        options.password = Some("secret".into());
        let prefixed = MqttBus::with_options(options);
        let _parser = prefixed.connect("polyhub-parser-h1", true).await.unwrap();
        let connected = broker.connected_clients();
        assert!(
            connected.contains(&"site1-polyhub-parser-h1".to_owned()),
            "{connected:?}"
        );
        assert!(!connected.contains(&"polyhub-parser-h1".to_owned()));
        broker.shutdown().await;
    }

    #[test]
    fn debug_output_hides_the_password() {
        let mut options = MqttBusOptions::to_host("b".into(), 1);
        options.password = Some("hunter2".into());
        let shown = format!("{:?}", MqttBus::with_options(options));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<hidden>"), "{shown}");
    }

    #[test]
    fn options_describe_their_broker() {
        let mut options = MqttBusOptions::to_host("broker.example".into(), 1884);
        assert_eq!(options.describe(), "mqtt://broker.example:1884");
        options.host = "::1".into();
        assert_eq!(options.describe(), "mqtt://[::1]:1884");
    }

    #[tokio::test]
    async fn a_broker_shutdown_ends_recv_with_none() {
        let (broker, bus) = broker().await;
        let mut parser = bus.connect("parser", true).await.unwrap();
        parser.subscribe(&filters(&["data/#"])).await.unwrap();
        let waiting = tokio::spawn(async move { parser.recv().await });
        broker.shutdown().await;
        let result = tokio::time::timeout(WAIT, waiting).await.unwrap().unwrap();
        assert!(matches!(result, Ok(None)), "{result:?}");
    }
}
