//! Errors, one enum per boundary.
//!
//! - [`ClientError`]: what a request made through a [`Client`](crate::Client) handle returns.
//! - [`ConnectionError`]: why a connection attempt failed or an established connection ended;
//!   reported in [`Event`](crate::Event)s, never returned to a request.
//! - [`StateError`]: a protocol violation by the broker, found by the I/O-free state machine;
//!   it ends the connection (as a [`ConnectionError::Protocol`]).
//! - [`TlsError`]: why TLS settings could not be built from PEM files.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use polyhub_mqtt::topic::TopicError;
use polyhub_mqtt::{DecodeError, EncodeError, QoS, ReasonCode};

/// Why a request made through a [`Client`](crate::Client) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The client has shut down (`disconnect()`, reconnect disabled after a connection loss, or
    /// the event loop was dropped); no request can succeed any more.
    #[error("the client has shut down")]
    Closed,
    /// `try_*` only: the request channel is full.
    #[error("the request channel is full")]
    RequestChannelFull,
    /// The client is offline and its queue of publishes waiting for the connection is full.
    #[error("offline: the queue of {limit} publishes waiting for the connection is full")]
    OfflineQueueFull {
        /// The configured bound ([`ClientOptions::pending_limit`](crate::ClientOptions::pending_limit)).
        limit: usize,
    },
    /// All 65,535 packet identifiers are taken by unacknowledged requests.
    #[error("all packet identifiers are in use")]
    PacketIdsExhausted,
    /// The topic name of a publish is not valid.
    #[error("invalid topic name `{topic}`: {source}")]
    InvalidTopic {
        /// The offending topic.
        topic: String,
        /// What is wrong with it.
        source: TopicError,
    },
    /// A topic filter of a subscribe or unsubscribe is not valid.
    #[error("invalid topic filter `{filter}`: {source}")]
    InvalidFilter {
        /// The offending filter.
        filter: String,
        /// What is wrong with it.
        source: TopicError,
    },
    /// A subscribe or unsubscribe without any filter.
    #[error("no topic filter given")]
    NoFilters,
    /// The packet is larger than the broker accepts (its MQTT 5 maximum packet size).
    #[error("packet of {size} bytes exceeds the broker's maximum packet size of {max}")]
    PacketTooLarge {
        /// Encoded size of the packet.
        size: usize,
        /// The broker's limit.
        max: u32,
    },
    /// The publish asks for a QoS above the broker's MQTT 5 maximum QoS.
    #[error("QoS {requested:?} is above the broker's maximum of {maximum:?}")]
    QoSNotSupported {
        /// The QoS of the publish.
        requested: QoS,
        /// The broker's maximum QoS.
        maximum: QoS,
    },
    /// A retained publish to a broker that announced it does not support retained messages.
    #[error("the broker does not support retained messages")]
    RetainNotSupported,
    /// The packet could not be encoded (a field longer than MQTT allows, for example).
    #[error("cannot encode the packet: {0}")]
    Encode(#[from] EncodeError),
    /// The broker refused a subscription (SUBACK failure code).
    #[error("subscription to `{filter}` refused with reason code {:#04x}", .reason_code.0)]
    SubscriptionRefused {
        /// The refused filter.
        filter: String,
        /// The code the broker sent (0x80 for every refusal in MQTT 3.x).
        reason_code: ReasonCode,
    },
    /// The broker refused to remove a subscription (MQTT 5 UNSUBACK failure code).
    #[error("unsubscribe from `{filter}` refused with reason code {:#04x}", .reason_code.0)]
    UnsubscribeRefused {
        /// The filter.
        filter: String,
        /// The code the broker sent.
        reason_code: ReasonCode,
    },
    /// The broker refused a QoS 1/2 publish (MQTT 5 PUBACK/PUBREC failure code).
    #[error("publish refused with reason code {:#04x}{}", .reason_code.0,
        .reason_string.as_deref().map(|text| format!(": {text}")).unwrap_or_default())]
    PublishRefused {
        /// The code the broker sent.
        reason_code: ReasonCode,
        /// The broker's explanation, if it sent one.
        reason_string: Option<String>,
    },
}

/// Why a connection attempt failed or an established connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The TCP connection could not be opened.
    #[error("cannot connect to {address}: {source}")]
    Connect {
        /// `host:port` as configured.
        address: String,
        /// The socket error.
        source: io::Error,
    },
    /// The host is not a valid TLS server name (DNS name or IP address).
    #[error("`{0}` is not a valid TLS server name")]
    InvalidServerName(String),
    /// The TLS handshake failed (certificate not trusted, client certificate refused, ...).
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(io::Error),
    /// The CONNECT packet could not be encoded (a client id, user name, password or will
    /// longer than MQTT allows).
    #[error("cannot encode CONNECT: {0}")]
    InvalidConnect(EncodeError),
    /// No CONNACK within the connect timeout.
    #[error("no CONNACK within {0:?}")]
    ConnectTimeout(Duration),
    /// The broker answered CONNECT with a failure code.
    #[error("connection refused with reason code {:#04x}{}", .reason_code.0,
        .reason_string.as_deref().map(|text| format!(": {text}")).unwrap_or_default())]
    Refused {
        /// The CONNACK code (3.x return codes are mapped to their MQTT 5 equivalents).
        reason_code: ReasonCode,
        /// The broker's explanation, if it sent one.
        reason_string: Option<String>,
    },
    /// Reading or writing the socket failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The broker closed the connection without a DISCONNECT.
    #[error("the broker closed the connection")]
    ClosedByBroker,
    /// A PINGREQ went unanswered for a whole keep-alive period: the broker or the path to it
    /// is gone.
    #[error("no PINGRESP within the keep-alive of {0:?}")]
    KeepAliveTimeout(Duration),
    /// The broker sent bytes that are not a valid packet.
    #[error("invalid packet from the broker: {0}")]
    Decode(#[from] DecodeError),
    /// The broker broke a protocol rule.
    #[error("protocol violation by the broker: {0}")]
    Protocol(#[from] StateError),
}

/// A protocol violation by the broker. The connection is closed (MQTT 5: after a DISCONNECT
/// with [`StateError::reason_code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// A packet a server never sends (CONNECT, SUBSCRIBE, ...), or a second CONNACK.
    #[error("unexpected packet of type {0}")]
    UnexpectedPacket(u8),
    /// AUTH: enhanced authentication is not supported by this client.
    #[error("AUTH is not supported")]
    AuthNotSupported,
    /// A topic alias of 0 or above the maximum we announced.
    #[error("topic alias {0} out of range")]
    TopicAliasOutOfRange(u16),
    /// A PUBLISH with an empty topic and an alias never set on this connection.
    #[error("unknown topic alias {0}")]
    UnknownTopicAlias(u16),
    /// A PUBLISH with an empty topic and no alias.
    #[error("PUBLISH with an empty topic and no topic alias")]
    MissingTopic,
    /// An acknowledgement we had to send could not be encoded.
    #[error("cannot encode a response: {0}")]
    Encode(#[from] EncodeError),
}

impl StateError {
    /// The MQTT 5 DISCONNECT reason code for this violation.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            StateError::TopicAliasOutOfRange(_)
            | StateError::UnknownTopicAlias(_)
            | StateError::MissingTopic => ReasonCode::TOPIC_ALIAS_INVALID,
            StateError::Encode(_) => ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR,
            StateError::UnexpectedPacket(_) | StateError::AuthNotSupported => {
                ReasonCode::PROTOCOL_ERROR
            }
        }
    }
}

/// Why TLS settings could not be built. Each file error names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds no usable item.
    #[error("cannot use {path}: {reason}")]
    File {
        /// The offending file.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// A certificate directory holds a client certificate without its key, or the reverse.
    #[error("{present} exists but {missing} does not: a client certificate needs both")]
    IncompleteClientIdentity {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// rustls refused the configuration (for example a key that does not match the certificate).
    #[error("invalid TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}
