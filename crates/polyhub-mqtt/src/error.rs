//! Codec errors, each tied to the reason code the spec prescribes when a server meets it.

use crate::reason::ReasonCode;

/// Why bytes could not be decoded into a packet. An incomplete packet is not an error: the
/// decoder returns `Ok(None)` and waits for more bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The remaining-length field is longer than four bytes or otherwise invalid.
    #[error("malformed remaining length")]
    MalformedRemainingLength,
    /// The packet announces more bytes than the receiver accepts.
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    PacketTooLarge {
        /// Announced size of the whole packet (fixed header included).
        size: usize,
        /// The receiver's limit.
        max: usize,
    },
    /// Packet type 0, or AUTH on a 3.x connection.
    #[error("invalid packet type {0}")]
    InvalidPacketType(u8),
    /// Reserved fixed-header flag bits are not as the spec requires.
    #[error("invalid fixed header flags {flags:#06b} for packet type {packet_type}")]
    InvalidFlags {
        /// Packet type.
        packet_type: u8,
        /// The low nibble that was received.
        flags: u8,
    },
    /// CONNECT names a protocol other than `MQTT`/`MQIsdp`.
    #[error("unknown protocol name")]
    InvalidProtocolName,
    /// CONNECT asks for a protocol level we do not speak; the server answers CONNACK 0x01
    /// (3.x) or 0x84 (5.0) before closing.
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolLevel(u8),
    /// QoS 3 in a PUBLISH, will or subscription.
    #[error("invalid QoS 3")]
    InvalidQoS,
    /// A string is not well-formed UTF-8, or contains U+0000.
    #[error("invalid UTF-8 string")]
    InvalidUtf8,
    /// A PUBLISH topic name contains a wildcard or is otherwise invalid.
    #[error("invalid topic name")]
    InvalidTopicName,
    /// A subscription filter is invalid.
    #[error("invalid topic filter")]
    InvalidTopicFilter,
    /// A packet that needs a non-zero packet identifier carries 0.
    #[error("packet identifier 0")]
    ZeroPacketId,
    /// An unknown property id, a property not allowed in this packet, one repeated that may
    /// appear only once, or a value the spec forbids (such as a receive maximum of 0).
    #[error("invalid property {0:#04x}")]
    InvalidProperty(u8),
    /// A reason code not allowed in this packet type.
    #[error("invalid reason code {0:#04x}")]
    InvalidReasonCode(u8),
    /// Any other structural problem: fields running past the packet's end, leftover bytes,
    /// SUBSCRIBE without filters, reserved bits set, and so on.
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// Well-formed bytes that break a rule the spec calls a protocol error: a password without
    /// a user name in 3.1.1, SUBSCRIBE without filters, retain handling 3, and so on.
    #[error("protocol error: {0}")]
    ProtocolError(&'static str),
}

impl DecodeError {
    /// The reason code a server sends (CONNACK or DISCONNECT) for this error.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            DecodeError::PacketTooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            DecodeError::UnsupportedProtocolLevel(_) | DecodeError::InvalidProtocolName => {
                ReasonCode::UNSUPPORTED_PROTOCOL_VERSION
            }
            DecodeError::InvalidTopicName => ReasonCode::TOPIC_NAME_INVALID,
            DecodeError::InvalidTopicFilter => ReasonCode::TOPIC_FILTER_INVALID,
            DecodeError::InvalidPacketType(_) => ReasonCode::PROTOCOL_ERROR,
            DecodeError::ZeroPacketId => ReasonCode::PROTOCOL_ERROR,
            DecodeError::ProtocolError(_) => ReasonCode::PROTOCOL_ERROR,
            _ => ReasonCode::MALFORMED_PACKET,
        }
    }
}

/// Why a packet could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The packet would exceed MQTT's 268,435,455-byte remaining-length limit.
    #[error("packet too large to encode")]
    PacketTooLarge,
    /// A string or binary field is longer than 65,535 bytes.
    #[error("field longer than 65535 bytes")]
    FieldTooLong,
    /// The packet does not exist in the target version (AUTH in 3.x).
    #[error("packet type {0} does not exist in this protocol version")]
    NotInVersion(u8),
    /// A field holds a value its wire type cannot carry (a subscription identifier of 0 or
    /// above 268,435,455).
    #[error("invalid value for {0}")]
    InvalidValue(&'static str),
}
