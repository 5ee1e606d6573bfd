//! How the hub talks to an MQTT broker without naming one.
//!
//! Parsers and the manager see the broker only through [`BusConnector`] / [`BusClient`]. The
//! binary supplies the implementations: the embedded broker's in-process client (task
//! isolation) or an MQTT client over TCP (process isolation, external brokers).
//!
//! Delivery contract: a message received with QoS 1 stays unacknowledged until [`BusClient::ack`]
//! is called with its token; if the client goes away first, the broker delivers it again to the
//! next client that connects with the same id (`persistent = true`). That is what lets a parser
//! acknowledge only what it has committed.

use async_trait::async_trait;
use bytes::Bytes;
use polyhub_store::Millis;

/// Identifies one received message for [`BusClient::ack`]. Opaque to the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AckToken(pub u64);

/// A message received from the broker.
#[derive(Debug, Clone, PartialEq)]
pub struct BusMessage {
    pub topic: String,
    pub payload: Bytes,
    /// 0, 1 or 2 as delivered.
    pub qos: u8,
    /// The broker's unique sequence number for this message, when it provides one (polyhub's
    /// broker does; others do not). Used to recognise redeliveries.
    pub seq: Option<u64>,
    /// Whether the broker marked it as a possible redelivery.
    pub redelivered: bool,
    pub token: AckToken,
    /// MQTT 5 response topic, if the sender set one.
    pub response_topic: Option<String>,
    /// MQTT 5 correlation data, if the sender set it.
    pub correlation_data: Option<Bytes>,
    /// When this process received it.
    pub received_at: Millis,
}

/// A message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 correlation data to echo back on replies.
    pub correlation_data: Option<Bytes>,
    /// MQTT 5 response topic: where the receiver is asked to answer.
    pub response_topic: Option<String>,
}

/// What the broker said it did with a published message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// At least one subscription matched (an offline persistent session counts: the broker
    /// keeps the message for it).
    Matched,
    /// No subscription matched: the broker took the message and it reached nobody (MQTT 5
    /// PUBACK/PUBREC reason code 0x10).
    NoSubscribers,
    /// The broker did not say: QoS 0, or a broker that does not report it (MQTT 3.1.1).
    Unknown,
}

/// Why a bus operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The connection is gone (broker shut down, socket closed); reconnect to continue.
    #[error("bus connection closed: {0}")]
    Closed(String),
    /// The broker refused the operation (bad filter, not authorised, ...).
    #[error("refused by the broker: {0}")]
    Refused(String),
    #[error("bus error: {0}")]
    Other(String),
}

/// One connection to the broker.
#[async_trait]
pub trait BusClient: Send + std::fmt::Debug {
    /// Subscribes at QoS 1; returns once the broker has granted the subscriptions.
    async fn subscribe(&mut self, filters: &[String]) -> Result<(), BusError>;
    /// Returns once the broker has removed the subscriptions.
    async fn unsubscribe(&mut self, filters: &[String]) -> Result<(), BusError>;
    /// The next message; `Ok(None)` when the broker is shutting down.
    async fn recv(&mut self) -> Result<Option<BusMessage>, BusError>;
    /// Acknowledges received QoS 1 messages (tokens of QoS 0 messages are ignored).
    async fn ack(&mut self, tokens: &[AckToken]) -> Result<(), BusError>;
    /// Returns once the broker has taken the message (acknowledged it, for QoS 1/2), with what
    /// it said about who it reached.
    async fn publish(&mut self, message: Outgoing) -> Result<Routing, BusError>;
}

/// Makes [`BusClient`]s.
#[async_trait]
pub trait BusConnector: Send + Sync + std::fmt::Debug + 'static {
    /// Connects as `client_id`. With `persistent`, the broker keeps the session (subscriptions
    /// and unacknowledged messages) when the client goes away, and the next connect with the
    /// same id resumes it.
    async fn connect(
        &self,
        client_id: &str,
        persistent: bool,
    ) -> Result<Box<dyn BusClient>, BusError>;

    /// Makes sure the persistent session of `client_id` exists before a client in another
    /// process connects to it over the network (a process-isolated parser), so that the
    /// session is made with this bus's terms rather than an ordinary client's: the embedded
    /// broker's LocalBus makes it unbounded, because ingest must never drop. The default does
    /// nothing (an external broker's sessions follow that broker's configuration).
    async fn prepare_session(&self, client_id: &str) -> Result<(), BusError> {
        let _ = client_id;
        Ok(())
    }
}

/// A client connected to or disconnected from the broker (the embedded broker reports these;
/// with an external broker they come from wills or presence topics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceEvent {
    pub client_id: String,
    pub online: bool,
    pub at: Millis,
}
