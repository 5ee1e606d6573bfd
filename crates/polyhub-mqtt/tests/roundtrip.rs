//! Property tests of the codec.
//!
//! - Every valid packet of every version survives `decode(encode(p)) == p`, and decoding consumes
//!   exactly the encoded bytes.
//! - Arbitrary bytes, and valid encodings with bytes flipped, inserted or cut, never make the
//!   decoder panic; whatever it accepts re-encodes to bytes that decode to the same packet.
//!
//! The strategies know the spec's rules (which properties each packet type carries, which reason
//! codes, which values) independently of the codec's own tables, so they check those tables too.

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

use polyhub_mqtt::topic::{parse_shared, validate_topic_filter, validate_topic_name};
use polyhub_mqtt::*;

const MAX_SUBSCRIPTION_ID: u32 = 268_435_455;

// ---------------------------------------------------------------------------------------------
// Field strategies

fn version() -> impl Strategy<Value = ProtocolVersion> {
    prop_oneof![
        Just(ProtocolVersion::V31),
        Just(ProtocolVersion::V311),
        Just(ProtocolVersion::V5)
    ]
}

/// Any UTF-8 text without U+0000, some of it multi-byte.
fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9/ ]{0,8}", "[^\\x00]{0,6}",]
}

fn bytes() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn topic_name() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9$]{1,4}(/[a-z0-9 ]{0,4}){0,3}", "[^\\x00+#]{1,8}",]
        .prop_filter("valid topic name", |topic| {
            validate_topic_name(topic).is_ok()
        })
}

fn plain_filter() -> impl Strategy<Value = String> {
    let level = prop_oneof![Just("+".to_owned()), "[a-z0-9 ]{0,4}", "[^\\x00+#/]{1,3}"];
    (vec(level, 1..4), any::<bool>()).prop_map(|(levels, multi)| {
        let mut filter = levels.join("/");
        if multi {
            filter.push_str("/#");
        }
        filter
    })
}

fn topic_filter() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => plain_filter(),
        1 => Just("#".to_owned()),
        1 => ("[a-z0-9]{1,4}", plain_filter())
            .prop_map(|(group, filter)| format!("$share/{group}/{filter}")),
    ]
    .prop_filter("valid topic filter", |filter| {
        validate_topic_filter(filter).is_ok()
    })
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn packet_id() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

fn reason(codes: &'static [u8]) -> impl Strategy<Value = ReasonCode> {
    proptest::sample::select(codes).prop_map(ReasonCode)
}

// ---------------------------------------------------------------------------------------------
// Properties

fn flag() -> impl Strategy<Value = Option<u8>> {
    option::of(0..=1u8)
}

/// Every property, each with a value the spec allows.
fn any_properties() -> impl Strategy<Value = Properties> {
    let publish_like = (
        flag(),
        option::of(any::<u32>()),
        option::of(text()),
        option::of(topic_name()),
        option::of(bytes()),
        vec(1..=MAX_SUBSCRIPTION_ID, 0..3),
        option::of(1..=u16::MAX),
    );
    let session = (
        option::of(any::<u32>()),
        option::of(text()),
        option::of(any::<u16>()),
        option::of(text()),
        option::of(bytes()),
        flag(),
        option::of(any::<u32>()),
        flag(),
        option::of(text()),
        option::of(text()),
    );
    let limits = (
        option::of(text()),
        option::of(1..=u16::MAX),
        option::of(any::<u16>()),
        flag(),
        flag(),
        vec((text(), text()), 0..3),
        option::of(1..=u32::MAX),
        flag(),
        flag(),
        flag(),
    );
    (publish_like, session, limits).prop_map(|(publish_like, session, limits)| {
        let (
            payload_format_indicator,
            message_expiry_interval,
            content_type,
            response_topic,
            correlation_data,
            subscription_identifiers,
            topic_alias,
        ) = publish_like;
        let (
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
        ) = session;
        let (
            reason_string,
            receive_maximum,
            topic_alias_maximum,
            maximum_qos,
            retain_available,
            user_properties,
            maximum_packet_size,
            wildcard_subscription_available,
            subscription_identifier_available,
            shared_subscription_available,
        ) = limits;
        Properties {
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
        }
    })
}

/// Packet kinds with distinct property sets (MQTT 5.0 §2.2.2.2).
#[derive(Debug, Clone, Copy)]
enum Kind {
    Connect,
    Will,
    ConnAck,
    Publish,
    Ack,
    Subscribe,
    Unsubscribe,
    Disconnect,
    Auth,
}

/// Keep only the properties `kind` may carry, written out from the spec's table.
fn restrict(p: Properties, kind: Kind) -> Properties {
    let mut kept = Properties {
        user_properties: p.user_properties,
        ..Properties::default()
    };
    match kind {
        Kind::Connect => {
            kept.session_expiry_interval = p.session_expiry_interval;
            kept.receive_maximum = p.receive_maximum;
            kept.maximum_packet_size = p.maximum_packet_size;
            kept.topic_alias_maximum = p.topic_alias_maximum;
            kept.request_response_information = p.request_response_information;
            kept.request_problem_information = p.request_problem_information;
            // Authentication data needs a method (MQTT 5.0 §3.1.2.11.10).
            kept.authentication_method = p.authentication_method;
            kept.authentication_data = p
                .authentication_data
                .filter(|_| kept.authentication_method.is_some());
        }
        Kind::Will => {
            kept.will_delay_interval = p.will_delay_interval;
            kept.payload_format_indicator = p.payload_format_indicator;
            kept.message_expiry_interval = p.message_expiry_interval;
            kept.content_type = p.content_type;
            kept.response_topic = p.response_topic;
            kept.correlation_data = p.correlation_data;
        }
        Kind::ConnAck => {
            kept.session_expiry_interval = p.session_expiry_interval;
            kept.receive_maximum = p.receive_maximum;
            kept.maximum_qos = p.maximum_qos;
            kept.retain_available = p.retain_available;
            kept.maximum_packet_size = p.maximum_packet_size;
            kept.assigned_client_identifier = p.assigned_client_identifier;
            kept.topic_alias_maximum = p.topic_alias_maximum;
            kept.reason_string = p.reason_string;
            kept.wildcard_subscription_available = p.wildcard_subscription_available;
            kept.subscription_identifier_available = p.subscription_identifier_available;
            kept.shared_subscription_available = p.shared_subscription_available;
            kept.server_keep_alive = p.server_keep_alive;
            kept.response_information = p.response_information;
            kept.server_reference = p.server_reference;
            kept.authentication_method = p.authentication_method;
            kept.authentication_data = p.authentication_data;
        }
        Kind::Publish => {
            kept.payload_format_indicator = p.payload_format_indicator;
            kept.message_expiry_interval = p.message_expiry_interval;
            kept.topic_alias = p.topic_alias;
            kept.response_topic = p.response_topic;
            kept.correlation_data = p.correlation_data;
            kept.subscription_identifiers = p.subscription_identifiers;
            kept.content_type = p.content_type;
        }
        Kind::Ack => kept.reason_string = p.reason_string,
        Kind::Subscribe => {
            kept.subscription_identifiers =
                p.subscription_identifiers.into_iter().take(1).collect();
        }
        Kind::Unsubscribe => {}
        Kind::Disconnect => {
            kept.session_expiry_interval = p.session_expiry_interval;
            kept.reason_string = p.reason_string;
            kept.server_reference = p.server_reference;
        }
        Kind::Auth => {
            kept.authentication_method = p.authentication_method;
            kept.authentication_data = p.authentication_data;
            kept.reason_string = p.reason_string;
        }
    }
    kept
}

/// Properties for `kind`: none for 3.x, and often none for 5.0 too, to exercise short forms.
fn properties(kind: Kind, version: ProtocolVersion) -> BoxedStrategy<Properties> {
    if version.is_v5() {
        prop_oneof![
            1 => Just(Properties::default()),
            3 => any_properties().prop_map(move |p| restrict(p, kind)),
        ]
        .boxed()
    } else {
        Just(Properties::default()).boxed()
    }
}

// ---------------------------------------------------------------------------------------------
// Packets

fn connect(protocol: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let will = (
        topic_name(),
        bytes(),
        qos(),
        any::<bool>(),
        properties(Kind::Will, protocol),
    )
        .prop_map(|(topic, payload, qos, retain, properties)| LastWill {
            topic,
            payload,
            qos,
            retain,
            properties,
        });
    (
        any::<bool>(),
        any::<u16>(),
        text(),
        option::of(will),
        option::of(text()),
        option::of(bytes()),
        properties(Kind::Connect, protocol),
    )
        .prop_map(
            move |(clean_start, keep_alive, client_id, will, username, password, properties)| {
                // 3.1.1 forbids a password without a user name [MQTT-3.1.2-22].
                let username = match (protocol, &password, username) {
                    (ProtocolVersion::V311, Some(_), None) => Some("user".to_owned()),
                    (_, _, username) => username,
                };
                Packet::Connect(Connect {
                    protocol,
                    clean_start,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                    properties,
                })
            },
        )
}

const CONNACK_V5: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];
const CONNACK_V3: &[u8] = &[0x00, 0x84, 0x85, 0x88, 0x86, 0x87];
const PUBACK: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const PUBREL: &[u8] = &[0x00, 0x92];
const SUBACK_V5: &[u8] = &[
    0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
];
const SUBACK_V3: &[u8] = &[0x00, 0x01, 0x02, 0x80];
const UNSUBACK_V5: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
const DISCONNECT_V5: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
const AUTH: &[u8] = &[0x00, 0x18, 0x19];

fn connack(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let codes = if version.is_v5() {
        CONNACK_V5
    } else {
        CONNACK_V3
    };
    (
        any::<bool>(),
        reason(codes),
        properties(Kind::ConnAck, version),
    )
        .prop_map(move |(session_present, reason_code, properties)| {
            Packet::ConnAck(ConnAck {
                // Only a successful connection resumes a session; 3.1 cannot say it did.
                session_present: session_present
                    && !reason_code.is_error()
                    && version != ProtocolVersion::V31,
                reason_code,
                properties,
            })
        })
}

fn publish(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let topic = if version.is_v5() {
        prop_oneof![4 => topic_name(), 1 => Just(String::new())].boxed()
    } else {
        topic_name().boxed()
    };
    (
        any::<bool>(),
        qos(),
        any::<bool>(),
        topic,
        packet_id(),
        bytes(),
        properties(Kind::Publish, version),
    )
        .prop_map(
            move |(dup, qos, retain, topic, packet_id, payload, properties)| {
                let at_most_once = qos == QoS::AtMostOnce;
                Packet::Publish(Publish {
                    // DUP on QoS 0 is malformed from 3.1.1 on.
                    dup: dup && (!at_most_once || version == ProtocolVersion::V31),
                    qos,
                    retain,
                    topic,
                    packet_id: if at_most_once { 0 } else { packet_id },
                    payload,
                    properties,
                })
            },
        )
}

fn pub_response(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let response = |codes: &'static [u8]| {
        (packet_id(), reason(codes), properties(Kind::Ack, version)).prop_map(
            move |(packet_id, reason_code, properties)| PubResponse {
                packet_id,
                reason_code: if version.is_v5() {
                    reason_code
                } else {
                    ReasonCode::SUCCESS
                },
                properties,
            },
        )
    };
    prop_oneof![
        response(PUBACK).prop_map(Packet::PubAck),
        response(PUBACK).prop_map(Packet::PubRec),
        response(PUBREL).prop_map(Packet::PubRel),
        response(PUBREL).prop_map(Packet::PubComp),
    ]
}

fn subscribe(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let options = (qos(), any::<bool>(), any::<bool>(), 0..3u8).prop_map(
        move |(qos, no_local, retain_as_published, retain_handling)| {
            if !version.is_v5() {
                return SubscriptionOptions {
                    qos,
                    ..SubscriptionOptions::default()
                };
            }
            SubscriptionOptions {
                qos,
                no_local,
                retain_as_published,
                retain_handling: match retain_handling {
                    0 => RetainHandling::SendAtSubscribe,
                    1 => RetainHandling::SendIfNewSubscription,
                    _ => RetainHandling::DoNotSend,
                },
            }
        },
    );
    let filter = (topic_filter(), options).prop_map(|(filter, mut options)| {
        // No local is a protocol error on a shared subscription [MQTT-3.8.3-4].
        if matches!(parse_shared(&filter), Ok(Some(_))) {
            options.no_local = false;
        }
        SubscribeFilter { filter, options }
    });
    (
        packet_id(),
        vec(filter, 1..4),
        properties(Kind::Subscribe, version),
    )
        .prop_map(|(packet_id, filters, properties)| {
            Packet::Subscribe(Subscribe {
                packet_id,
                filters,
                properties,
            })
        })
}

fn suback(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let codes = if version.is_v5() {
        SUBACK_V5
    } else {
        SUBACK_V3
    };
    (
        packet_id(),
        vec(reason(codes), 1..5),
        properties(Kind::Ack, version),
    )
        .prop_map(|(packet_id, reason_codes, properties)| {
            Packet::SubAck(SubAck {
                packet_id,
                reason_codes,
                properties,
            })
        })
}

fn unsubscribe(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    (
        packet_id(),
        vec(topic_filter(), 1..4),
        properties(Kind::Unsubscribe, version),
    )
        .prop_map(|(packet_id, filters, properties)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                filters,
                properties,
            })
        })
}

fn unsuback(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    (
        packet_id(),
        vec(reason(UNSUBACK_V5), 1..5),
        properties(Kind::Ack, version),
    )
        .prop_map(move |(packet_id, reason_codes, properties)| {
            Packet::UnsubAck(UnsubAck {
                packet_id,
                // 3.x UNSUBACK carries no reason codes.
                reason_codes: if version.is_v5() {
                    reason_codes
                } else {
                    Vec::new()
                },
                properties,
            })
        })
}

fn disconnect(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    (reason(DISCONNECT_V5), properties(Kind::Disconnect, version)).prop_map(
        move |(reason_code, properties)| {
            Packet::Disconnect(Disconnect {
                reason_code: if version.is_v5() {
                    reason_code
                } else {
                    ReasonCode::NORMAL_DISCONNECTION
                },
                properties,
            })
        },
    )
}

fn auth() -> impl Strategy<Value = Packet> {
    (reason(AUTH), properties(Kind::Auth, ProtocolVersion::V5)).prop_map(
        |(reason_code, properties)| {
            Packet::Auth(Auth {
                reason_code,
                properties,
            })
        },
    )
}

/// Any valid packet of `version`, each packet type about equally likely.
fn packet(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    let common = prop_oneof![
        connect(version),
        connack(version),
        publish(version),
        pub_response(version),
        subscribe(version),
        suback(version),
        unsubscribe(version),
        unsuback(version),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        disconnect(version),
    ];
    if version.is_v5() {
        prop_oneof![10 => common, 1 => auth()].boxed()
    } else {
        common.boxed()
    }
}

fn versioned_packet() -> impl Strategy<Value = (ProtocolVersion, Packet)> {
    version().prop_flat_map(|version| (Just(version), packet(version)))
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn encode_to_vec(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(packet, version, &mut buf).expect("a valid packet encodes");
    buf.to_vec()
}

/// Decode packets from `bytes` until the decoder needs more bytes or fails, checking that each
/// packet it returns re-encodes to bytes that decode to the same packet.
fn decode_all_and_recheck(
    bytes: &[u8],
    version: ProtocolVersion,
    max_packet_size: usize,
) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::from(bytes);
    while let Ok(Some(packet)) = decode(&mut buf, version, max_packet_size) {
        let mut reencoded = BytesMut::new();
        encode(&packet, version, &mut reencoded)
            .map_err(|err| TestCaseError::fail(format!("{packet:?} does not re-encode: {err}")))?;
        let again = decode(&mut reencoded, version, usize::MAX);
        prop_assert_eq!(again, Ok(Some(packet)));
        prop_assert!(reencoded.is_empty());
    }
    Ok(())
}

/// A change to a valid encoding.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { index: usize, xor: u8 },
    Insert { index: usize, byte: u8 },
    Remove { index: usize },
    Truncate { len: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 1..=u8::MAX).prop_map(|(index, xor)| Mutation::Flip { index, xor }),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(index, byte)| Mutation::Insert { index, byte }),
        1 => any::<usize>().prop_map(|index| Mutation::Remove { index }),
        1 => any::<usize>().prop_map(|len| Mutation::Truncate { len }),
    ]
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    match *mutation {
        Mutation::Flip { index, xor } => {
            let index = index % bytes.len();
            bytes[index] ^= xor;
        }
        Mutation::Insert { index, byte } => bytes.insert(index % (bytes.len() + 1), byte),
        Mutation::Remove { index } => {
            bytes.remove(index % bytes.len());
        }
        Mutation::Truncate { len } => bytes.truncate(len % bytes.len()),
    }
}

// ---------------------------------------------------------------------------------------------
// Properties under test

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn valid_packets_round_trip((version, packet) in versioned_packet()) {
        let bytes = encode_to_vec(&packet, version);
        prop_assert_eq!(encoded_len(&packet, version), Ok(bytes.len()));
        // A PINGREQ after the packet shows where decoding stopped.
        let mut buf = BytesMut::from(&bytes[..]);
        buf.extend_from_slice(b"\xC0\x00");
        let decoded = decode(&mut buf, version, bytes.len());
        prop_assert_eq!(decoded, Ok(Some(packet)));
        prop_assert_eq!(&buf[..], b"\xC0\x00");
    }

    #[test]
    fn every_prefix_of_a_valid_packet_waits_for_more((version, packet) in versioned_packet()) {
        let bytes = encode_to_vec(&packet, version);
        for len in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..len]);
            prop_assert_eq!(decode(&mut buf, version, usize::MAX), Ok(None));
            prop_assert_eq!(&buf[..], &bytes[..len]);
        }
    }

    #[test]
    fn a_smaller_limit_refuses_the_packet((version, packet) in versioned_packet()) {
        let bytes = encode_to_vec(&packet, version);
        let limit = bytes.len() - 1;
        prop_assert_eq!(
            decode(&mut BytesMut::from(&bytes[..]), version, limit),
            Err(DecodeError::PacketTooLarge { size: bytes.len(), max: limit })
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in vec(any::<u8>(), 0..300),
        version in version(),
        max_packet_size in prop_oneof![Just(usize::MAX), 0..400usize],
    ) {
        decode_all_and_recheck(&bytes, version, max_packet_size)?;
    }

    #[test]
    fn arbitrary_bodies_behind_valid_headers_never_panic(
        first_byte in any::<u8>(),
        body in vec(any::<u8>(), 0..120),
        version in version(),
    ) {
        // Random bytes rarely form a header whose length matches; this builds one that does,
        // so the body parsers see random input.
        let mut bytes = vec![first_byte];
        let mut len = body.len();
        loop {
            let digit = (len % 128) as u8;
            len /= 128;
            if len == 0 {
                bytes.push(digit);
                break;
            }
            bytes.push(digit | 0x80);
        }
        bytes.extend_from_slice(&body);
        decode_all_and_recheck(&bytes, version, usize::MAX)?;
    }

    #[test]
    fn mutated_valid_packets_never_panic(
        (version, packet) in versioned_packet(),
        mutations in vec(mutation(), 1..4),
        decode_as in version(),
    ) {
        let mut bytes = encode_to_vec(&packet, version);
        for mutation in &mutations {
            apply(&mut bytes, mutation);
        }
        // Decoding with the right version and with another one both exercise the parsers.
        decode_all_and_recheck(&bytes, version, usize::MAX)?;
        decode_all_and_recheck(&bytes, decode_as, usize::MAX)?;
    }
}
