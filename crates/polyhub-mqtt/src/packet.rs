//! Control packets of MQTT 3.1, 3.1.1 and 5.0.
//!
//! Design: one set of types serves every protocol version. MQTT 5 only *adds* to 3.1.1
//! (properties, reason codes, AUTH), so a 3.x packet is a 5.0 packet whose v5-only fields hold
//! their defaults. The codec is told which version it speaks and ignores what that version
//! cannot carry.

use bytes::Bytes;

use crate::reason::ReasonCode;

/// The protocol level a client asked for in CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProtocolVersion {
    /// MQTT 3.1: protocol name `MQIsdp`, level 3.
    V31,
    /// MQTT 3.1.1: protocol name `MQTT`, level 4.
    V311,
    /// MQTT 5.0: protocol name `MQTT`, level 5.
    V5,
}

impl ProtocolVersion {
    /// The protocol level byte of CONNECT.
    pub fn level(self) -> u8 {
        match self {
            ProtocolVersion::V31 => 3,
            ProtocolVersion::V311 => 4,
            ProtocolVersion::V5 => 5,
        }
    }

    /// Whether packets of this version carry properties and reason codes.
    pub fn is_v5(self) -> bool {
        self == ProtocolVersion::V5
    }
}

/// Quality of service of a message or subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum QoS {
    /// Fire and forget.
    #[default]
    AtMostOnce = 0,
    /// Acknowledged delivery; duplicates possible.
    AtLeastOnce = 1,
    /// Exactly-once handshake (PUBREC/PUBREL/PUBCOMP).
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS for a wire value, or `None` for 3 and above.
    pub fn from_u8(value: u8) -> Option<QoS> {
        match value {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// MQTT 5 properties. Every packet type uses the same struct; the codec only writes and accepts
/// the properties the spec allows for each packet type (others are a protocol error on decode).
///
/// Single-valued properties are `Option`s; a property that may repeat is a `Vec` in wire order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Properties {
    /// 0x01 — 0 unspecified bytes, 1 UTF-8 text (PUBLISH, will).
    pub payload_format_indicator: Option<u8>,
    /// 0x02 — seconds until the message expires (PUBLISH, will).
    pub message_expiry_interval: Option<u32>,
    /// 0x03 — MIME type of the payload (PUBLISH, will).
    pub content_type: Option<String>,
    /// 0x08 — topic for a response (PUBLISH, will).
    pub response_topic: Option<String>,
    /// 0x09 — correlation data for request/response (PUBLISH, will).
    pub correlation_data: Option<Bytes>,
    /// 0x0B — subscription identifiers (SUBSCRIBE: at most one; PUBLISH: one per matching
    /// subscription that had one).
    pub subscription_identifiers: Vec<u32>,
    /// 0x11 — session expiry in seconds (CONNECT, CONNACK, DISCONNECT).
    pub session_expiry_interval: Option<u32>,
    /// 0x12 — client id the server assigned (CONNACK).
    pub assigned_client_identifier: Option<String>,
    /// 0x13 — keep-alive the server imposes (CONNACK).
    pub server_keep_alive: Option<u16>,
    /// 0x15 — authentication method (CONNECT, CONNACK, AUTH).
    pub authentication_method: Option<String>,
    /// 0x16 — authentication data (CONNECT, CONNACK, AUTH).
    pub authentication_data: Option<Bytes>,
    /// 0x17 — whether reason strings/user properties may be sent on failures (CONNECT).
    pub request_problem_information: Option<u8>,
    /// 0x18 — seconds to delay the will after the connection closes (will properties).
    pub will_delay_interval: Option<u32>,
    /// 0x19 — whether the client wants response information (CONNECT).
    pub request_response_information: Option<u8>,
    /// 0x1A — basis for response topics (CONNACK).
    pub response_information: Option<String>,
    /// 0x1C — another server to use (CONNACK, DISCONNECT).
    pub server_reference: Option<String>,
    /// 0x1F — human-readable reason (all acknowledgements, DISCONNECT, AUTH).
    pub reason_string: Option<String>,
    /// 0x21 — how many unacknowledged QoS 1/2 PUBLISHes the sender accepts (CONNECT, CONNACK).
    pub receive_maximum: Option<u16>,
    /// 0x22 — highest topic alias the sender accepts (CONNECT, CONNACK).
    pub topic_alias_maximum: Option<u16>,
    /// 0x23 — topic alias (PUBLISH).
    pub topic_alias: Option<u16>,
    /// 0x24 — highest QoS the server supports (CONNACK).
    pub maximum_qos: Option<u8>,
    /// 0x25 — whether retained messages are supported (CONNACK).
    pub retain_available: Option<u8>,
    /// 0x26 — user properties, in order; names may repeat (all packets with properties).
    pub user_properties: Vec<(String, String)>,
    /// 0x27 — largest packet the sender accepts (CONNECT, CONNACK).
    pub maximum_packet_size: Option<u32>,
    /// 0x28 — whether wildcard subscriptions are supported (CONNACK).
    pub wildcard_subscription_available: Option<u8>,
    /// 0x29 — whether subscription identifiers are supported (CONNACK).
    pub subscription_identifier_available: Option<u8>,
    /// 0x2A — whether shared subscriptions are supported (CONNACK).
    pub shared_subscription_available: Option<u8>,
}

impl Properties {
    /// Whether no property is set: the common case, which the codec writes as a single 0.
    pub fn is_empty(&self) -> bool {
        // Destructured so that a new field cannot be forgotten here.
        let Properties {
            payload_format_indicator,
            message_expiry_interval,
            content_type,
            response_topic,
            correlation_data,
            subscription_identifiers,
            session_expiry_interval,
            assigned_client_identifier,
            server_keep_alive,
            authentication_method,
            authentication_data,
            request_problem_information,
            will_delay_interval,
            request_response_information,
            response_information,
            server_reference,
            reason_string,
            receive_maximum,
            topic_alias_maximum,
            topic_alias,
            maximum_qos,
            retain_available,
            user_properties,
            maximum_packet_size,
            wildcard_subscription_available,
            subscription_identifier_available,
            shared_subscription_available,
        } = self;
        payload_format_indicator.is_none()
            && message_expiry_interval.is_none()
            && content_type.is_none()
            && response_topic.is_none()
            && correlation_data.is_none()
            && subscription_identifiers.is_empty()
            && session_expiry_interval.is_none()
            && assigned_client_identifier.is_none()
            && server_keep_alive.is_none()
            && authentication_method.is_none()
            && authentication_data.is_none()
            && request_problem_information.is_none()
            && will_delay_interval.is_none()
            && request_response_information.is_none()
            && response_information.is_none()
            && server_reference.is_none()
            && reason_string.is_none()
            && receive_maximum.is_none()
            && topic_alias_maximum.is_none()
            && topic_alias.is_none()
            && maximum_qos.is_none()
            && retain_available.is_none()
            && user_properties.is_empty()
            && maximum_packet_size.is_none()
            && wildcard_subscription_available.is_none()
            && subscription_identifier_available.is_none()
            && shared_subscription_available.is_none()
    }
}

/// A will message registered in CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastWill {
    /// Topic the will is published on.
    pub topic: String,
    /// Will payload.
    pub payload: Bytes,
    /// QoS of the will publication.
    pub qos: QoS,
    /// Whether the will is published retained.
    pub retain: bool,
    /// Will properties (MQTT 5).
    pub properties: Properties,
}

/// CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// The version this client speaks; decides how every later packet is coded.
    pub protocol: ProtocolVersion,
    /// Clean session (3.x) / clean start (5.0).
    pub clean_start: bool,
    /// Keep-alive in seconds; 0 disables it.
    pub keep_alive: u16,
    /// Client identifier; may be empty.
    pub client_id: String,
    /// Last will, if any.
    pub will: Option<LastWill>,
    /// User name, if any.
    pub username: Option<String>,
    /// Password, if any.
    pub password: Option<Bytes>,
    /// CONNECT properties (MQTT 5).
    pub properties: Properties,
}

/// CONNACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    /// Whether the server resumed a stored session.
    pub session_present: bool,
    /// Result; 3.x return codes are mapped from these (see [`ReasonCode::to_v3_connack`]).
    pub reason_code: ReasonCode,
    /// CONNACK properties (MQTT 5).
    pub properties: Properties,
}

/// PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Redelivery flag.
    pub dup: bool,
    /// Delivery QoS.
    pub qos: QoS,
    /// Retain flag.
    pub retain: bool,
    /// Topic name. Empty in MQTT 5 when a topic alias stands for it.
    pub topic: String,
    /// Packet identifier; 0 for QoS 0 (and then not on the wire).
    pub packet_id: u16,
    /// Application payload.
    pub payload: Bytes,
    /// PUBLISH properties (MQTT 5).
    pub properties: Properties,
}

/// A PUBLISH to encode whose parts are borrowed: lets a sender write a message it shares with
/// others (topic, payload, properties) without building an owned [`Publish`] per recipient.
///
/// [`encode_publish`](crate::encode_publish) writes exactly what [`encode`](crate::encode)
/// writes for the equivalent [`Publish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishRef<'a> {
    /// Redelivery flag.
    pub dup: bool,
    /// Delivery QoS.
    pub qos: QoS,
    /// Retain flag.
    pub retain: bool,
    /// Topic name. Empty in MQTT 5 when a topic alias stands for it.
    pub topic: &'a str,
    /// Packet identifier; ignored (not on the wire) for QoS 0.
    pub packet_id: u16,
    /// Application payload.
    pub payload: &'a [u8],
    /// PUBLISH properties (MQTT 5); `None` is the same as empty properties.
    pub properties: Option<&'a Properties>,
}

impl<'a> From<&'a Publish> for PublishRef<'a> {
    fn from(publish: &'a Publish) -> PublishRef<'a> {
        PublishRef {
            dup: publish.dup,
            qos: publish.qos,
            retain: publish.retain,
            topic: &publish.topic,
            packet_id: publish.packet_id,
            payload: &publish.payload,
            properties: Some(&publish.properties),
        }
    }
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP share this shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubResponse {
    /// The PUBLISH (or PUBREL) being answered.
    pub packet_id: u16,
    /// Result (MQTT 5); `SUCCESS` for 3.x.
    pub reason_code: ReasonCode,
    /// Properties (MQTT 5).
    pub properties: Properties,
}

impl PubResponse {
    /// A successful response with no properties.
    pub fn success(packet_id: u16) -> PubResponse {
        PubResponse {
            packet_id,
            reason_code: ReasonCode::SUCCESS,
            properties: Properties::default(),
        }
    }
}

/// What the server does with retained messages when a subscription is made (MQTT 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RetainHandling {
    /// Send retained messages at subscribe time.
    #[default]
    SendAtSubscribe = 0,
    /// Send them only if the subscription did not exist yet.
    SendIfNewSubscription = 1,
    /// Never send them at subscribe time.
    DoNotSend = 2,
}

/// Options of one subscription. 3.x only carries `qos`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SubscriptionOptions {
    /// Maximum QoS the subscriber accepts.
    pub qos: QoS,
    /// Do not deliver messages this client published itself.
    pub no_local: bool,
    /// Keep the retain flag as published instead of clearing it.
    pub retain_as_published: bool,
    /// Retained-message behaviour at subscribe time.
    pub retain_handling: RetainHandling,
}

/// One topic filter of a SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeFilter {
    /// Topic filter, possibly `$share/<group>/<filter>`.
    pub filter: String,
    /// Subscription options.
    pub options: SubscriptionOptions,
}

/// SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet identifier (non-zero).
    pub packet_id: u16,
    /// Filters, at least one.
    pub filters: Vec<SubscribeFilter>,
    /// Properties (MQTT 5): subscription identifier, user properties.
    pub properties: Properties,
}

/// SUBACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    /// The SUBSCRIBE being answered.
    pub packet_id: u16,
    /// One code per filter: granted QoS 0/1/2 or a failure (3.x knows only 0x80 as failure).
    pub reason_codes: Vec<ReasonCode>,
    /// Properties (MQTT 5).
    pub properties: Properties,
}

/// UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Packet identifier (non-zero).
    pub packet_id: u16,
    /// Filters to remove, at least one.
    pub filters: Vec<String>,
    /// Properties (MQTT 5): user properties.
    pub properties: Properties,
}

/// UNSUBACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    /// The UNSUBSCRIBE being answered.
    pub packet_id: u16,
    /// One code per filter (MQTT 5 only; empty and not on the wire for 3.x).
    pub reason_codes: Vec<ReasonCode>,
    /// Properties (MQTT 5).
    pub properties: Properties,
}

/// DISCONNECT. In 3.x it has no body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    /// Why the connection ends (MQTT 5).
    pub reason_code: ReasonCode,
    /// Properties (MQTT 5).
    pub properties: Properties,
}

impl Disconnect {
    /// A DISCONNECT with the given reason and no properties.
    pub fn with_reason(reason_code: ReasonCode) -> Disconnect {
        Disconnect {
            reason_code,
            properties: Properties::default(),
        }
    }
}

/// AUTH (MQTT 5 only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// Success, continue authentication, or re-authenticate.
    pub reason_code: ReasonCode,
    /// Properties: authentication method and data, reason string, user properties.
    pub properties: Properties,
}

/// Any MQTT control packet.
// Design: CONNECT (two property sets) dwarfs the rest, but boxing it would change the variant's
// type that the broker matches on; CONNECT is once per connection, so the size is tolerated.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// CONNECT (type 1).
    Connect(Connect),
    /// CONNACK (type 2).
    ConnAck(ConnAck),
    /// PUBLISH (type 3).
    Publish(Publish),
    /// PUBACK (type 4).
    PubAck(PubResponse),
    /// PUBREC (type 5).
    PubRec(PubResponse),
    /// PUBREL (type 6).
    PubRel(PubResponse),
    /// PUBCOMP (type 7).
    PubComp(PubResponse),
    /// SUBSCRIBE (type 8).
    Subscribe(Subscribe),
    /// SUBACK (type 9).
    SubAck(SubAck),
    /// UNSUBSCRIBE (type 10).
    Unsubscribe(Unsubscribe),
    /// UNSUBACK (type 11).
    UnsubAck(UnsubAck),
    /// PINGREQ (type 12).
    PingReq,
    /// PINGRESP (type 13).
    PingResp,
    /// DISCONNECT (type 14).
    Disconnect(Disconnect),
    /// AUTH (type 15, MQTT 5 only).
    Auth(Auth),
}

impl Packet {
    /// The control packet type number (1–15).
    pub fn packet_type(&self) -> u8 {
        match self {
            Packet::Connect(_) => 1,
            Packet::ConnAck(_) => 2,
            Packet::Publish(_) => 3,
            Packet::PubAck(_) => 4,
            Packet::PubRec(_) => 5,
            Packet::PubRel(_) => 6,
            Packet::PubComp(_) => 7,
            Packet::Subscribe(_) => 8,
            Packet::SubAck(_) => 9,
            Packet::Unsubscribe(_) => 10,
            Packet::UnsubAck(_) => 11,
            Packet::PingReq => 12,
            Packet::PingResp => 13,
            Packet::Disconnect(_) => 14,
            Packet::Auth(_) => 15,
        }
    }
}
