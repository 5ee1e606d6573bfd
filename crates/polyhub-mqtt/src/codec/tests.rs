//! Byte vectors written from the specs (and from what real clients send), and bad input.

use bytes::{Bytes, BytesMut};

use super::{decode, encode, encode_publish, encoded_len};
use crate::error::{DecodeError, EncodeError};
use crate::packet::*;
use crate::reason::ReasonCode;

use ProtocolVersion::{V5, V31, V311};

const MAX: usize = 1 << 20;

/// A packet from its first byte and hand-written body; only the remaining length is computed.
fn packet(first_byte: u8, body: &[&[u8]]) -> Vec<u8> {
    let body: Vec<u8> = body.concat();
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
    bytes
}

fn try_decode(bytes: &[u8], version: ProtocolVersion) -> Result<Option<Packet>, DecodeError> {
    decode(&mut BytesMut::from(bytes), version, MAX)
}

/// Decode `bytes`, which must hold exactly one packet.
fn decode_exact(bytes: &[u8], version: ProtocolVersion) -> Packet {
    let mut buf = BytesMut::from(bytes);
    let packet = decode(&mut buf, version, MAX)
        .unwrap_or_else(|err| panic!("{bytes:02x?} in {version:?}: {err}"))
        .unwrap_or_else(|| panic!("{bytes:02x?} in {version:?}: incomplete"));
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    packet
}

fn encode_vec(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(packet, version, &mut buf).unwrap();
    assert_eq!(encoded_len(packet, version), Ok(buf.len()));
    buf.to_vec()
}

/// `bytes` decodes to `expected`, and `expected` encodes back to exactly `bytes`.
fn assert_vector(bytes: &[u8], version: ProtocolVersion, expected: &Packet) {
    assert_eq!(
        &decode_exact(bytes, version),
        expected,
        "decoding in {version:?}"
    );
    assert_eq!(
        encode_vec(expected, version),
        bytes,
        "encoding in {version:?}"
    );
}

fn user_properties(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|&(name, value)| (name.to_owned(), value.to_owned()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// CONNECT

/// What paho-mqtt (Python) sends with `protocol=MQTTv31`, `clean_session=True`, keep-alive 60.
const PAHO_V31_CONNECT: &[u8] = b"\x10\x19\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x0btest-client";

#[test]
fn connect_v31_as_paho_sends_it() {
    let expected = Packet::Connect(Connect {
        protocol: V31,
        clean_start: true,
        keep_alive: 60,
        client_id: "test-client".into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    });
    // CONNECT is self-describing: whatever the connection's version, it decodes the same.
    for version in [V31, V311, V5] {
        assert_vector(PAHO_V31_CONNECT, version, &expected);
    }
}

#[test]
fn connect_v31_with_will_user_and_password() {
    let bytes = packet(
        0x10,
        &[
            b"\x00\x06MQIsdp\x03",
            // user name, password, will retain, will QoS 1, will, clean session
            b"\xEE",
            b"\x00\x1e",
            b"\x00\x02c1",
            b"\x00\x09status/c1",
            b"\x00\x07offline",
            b"\x00\x04user",
            b"\x00\x04pass",
        ],
    );
    assert_vector(
        &bytes,
        V31,
        &Packet::Connect(Connect {
            protocol: V31,
            clean_start: true,
            keep_alive: 30,
            client_id: "c1".into(),
            will: Some(LastWill {
                topic: "status/c1".into(),
                payload: Bytes::from_static(b"offline"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: Properties::default(),
            }),
            username: Some("user".into()),
            password: Some(Bytes::from_static(b"pass")),
            properties: Properties::default(),
        }),
    );
}

/// MQTT 3.1.1 §3.1.2.10, figure 3.6: flags 0xCE, keep-alive 10.
#[test]
fn connect_v311_spec_example() {
    let bytes = packet(
        0x10,
        &[
            b"\x00\x04MQTT\x04\xCE\x00\x0A",
            b"\x00\x03cid",
            b"\x00\x05will/",
            b"\x00\x02\xFF\x00",
            b"\x00\x01u",
            b"\x00\x03\x00\x01\x02",
        ],
    );
    assert_vector(
        &bytes,
        V311,
        &Packet::Connect(Connect {
            protocol: V311,
            clean_start: true,
            keep_alive: 10,
            client_id: "cid".into(),
            will: Some(LastWill {
                topic: "will/".into(),
                payload: Bytes::from_static(b"\xFF\x00"),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Properties::default(),
            }),
            username: Some("u".into()),
            password: Some(Bytes::from_static(b"\x00\x01\x02")),
            properties: Properties::default(),
        }),
    );
}

#[test]
fn connect_v311_with_empty_client_id_as_mosquitto_pub_sends_it() {
    assert_vector(
        b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00",
        V311,
        &Packet::Connect(Connect {
            protocol: V311,
            clean_start: true,
            keep_alive: 60,
            client_id: String::new(),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        }),
    );
}

/// MQTT 5.0 §3.1.2.12, figure 3-6 (flags 0xC2, keep-alive 10, session expiry 10), plus will
/// properties and the rest of the CONNECT property table.
#[test]
fn connect_v5_with_properties_and_will_properties() {
    let bytes = packet(
        0x10,
        &[
            b"\x00\x04MQTT\x05",
            // user name, password, will QoS 2, will, clean start
            b"\xD6",
            b"\x00\x0A",
            // properties: 47 bytes, in the order the encoder writes them
            b"\x2F",
            b"\x11\x00\x00\x00\x0A",
            b"\x15\x00\x05PLAIN",
            b"\x16\x00\x02\x01\x02",
            b"\x17\x00",
            b"\x19\x01",
            b"\x21\x00\x14",
            b"\x22\x00\x05",
            b"\x26\x00\x01a\x00\x01b",
            b"\x26\x00\x01a\x00\x01c",
            b"\x27\x00\x00\x10\x00",
            b"\x00\x06client",
            // will properties: 32 bytes
            b"\x20",
            b"\x01\x01",
            b"\x02\x00\x00\x01\x00",
            b"\x03\x00\x04text",
            b"\x08\x00\x04resp",
            b"\x09\x00\x03abc",
            b"\x18\x00\x00\x00\x05",
            b"\x00\x04will",
            b"\x00\x03bye",
            b"\x00\x04user",
            b"\x00\x02pw",
        ],
    );
    assert_vector(
        &bytes,
        V5,
        &Packet::Connect(Connect {
            protocol: V5,
            clean_start: true,
            keep_alive: 10,
            client_id: "client".into(),
            will: Some(LastWill {
                topic: "will".into(),
                payload: Bytes::from_static(b"bye"),
                qos: QoS::ExactlyOnce,
                retain: false,
                properties: Properties {
                    will_delay_interval: Some(5),
                    payload_format_indicator: Some(1),
                    message_expiry_interval: Some(256),
                    content_type: Some("text".into()),
                    response_topic: Some("resp".into()),
                    correlation_data: Some(Bytes::from_static(b"abc")),
                    ..Properties::default()
                },
            }),
            username: Some("user".into()),
            password: Some(Bytes::from_static(b"pw")),
            properties: Properties {
                session_expiry_interval: Some(10),
                receive_maximum: Some(20),
                maximum_packet_size: Some(4096),
                topic_alias_maximum: Some(5),
                request_response_information: Some(1),
                request_problem_information: Some(0),
                user_properties: user_properties(&[("a", "b"), ("a", "c")]),
                authentication_method: Some("PLAIN".into()),
                authentication_data: Some(Bytes::from_static(b"\x01\x02")),
                ..Properties::default()
            },
        }),
    );
}

#[test]
fn connect_password_without_user_name_depends_on_version() {
    let v311 = b"\x10\x10\x00\x04MQTT\x04\x42\x00\x00\x00\x00\x00\x02pw";
    assert_eq!(
        try_decode(v311, V311),
        Err(DecodeError::ProtocolError("password without a user name"))
    );
    let v5 = b"\x10\x11\x00\x04MQTT\x05\x42\x00\x00\x00\x00\x00\x00\x02pw";
    let Packet::Connect(connect) = decode_exact(v5, V5) else {
        panic!("not a CONNECT");
    };
    assert_eq!(
        (connect.username, connect.password),
        (None, Some(Bytes::from_static(b"pw")))
    );
    let v31 = b"\x10\x12\x00\x06MQIsdp\x03\x42\x00\x00\x00\x00\x00\x02pw";
    assert!(matches!(decode_exact(v31, V31), Packet::Connect(_)));
}

#[test]
fn connect_with_unknown_protocol_name_or_level() {
    assert_eq!(
        try_decode(b"\x10\x0c\x00\x04MQTX\x04\x02\x00\x3c\x00\x00", V311),
        Err(DecodeError::InvalidProtocolName)
    );
    assert_eq!(
        try_decode(b"\x10\x0c\x00\x04mqtt\x04\x02\x00\x3c\x00\x00", V311),
        Err(DecodeError::InvalidProtocolName)
    );
    for (bytes, level) in [
        (&b"\x10\x0c\x00\x04MQTT\x06\x02\x00\x3c\x00\x00"[..], 6),
        (b"\x10\x0c\x00\x04MQTT\x03\x02\x00\x3c\x00\x00", 3),
        (b"\x10\x0e\x00\x06MQIsdp\x04\x02\x00\x3c\x00\x00", 4),
        // The level is reported even when what follows it is garbage.
        (b"\x10\x07\x00\x04MQTT\x07", 7),
    ] {
        assert_eq!(
            try_decode(bytes, V311),
            Err(DecodeError::UnsupportedProtocolLevel(level))
        );
        assert_eq!(
            DecodeError::UnsupportedProtocolLevel(level).reason_code(),
            ReasonCode::UNSUPPORTED_PROTOCOL_VERSION
        );
    }
}

#[test]
fn connect_flag_rules() {
    let with_flags = |flags: u8| {
        [
            b"\x10\x0c\x00\x04MQTT\x04".as_slice(),
            &[flags],
            b"\x00\x3c\x00\x00",
        ]
        .concat()
    };
    assert!(matches!(
        try_decode(&with_flags(0x03), V311),
        Err(DecodeError::Malformed(_))
    ));
    // Will QoS or will retain without a will.
    assert!(matches!(
        try_decode(&with_flags(0x0A), V311),
        Err(DecodeError::Malformed(_))
    ));
    assert!(matches!(
        try_decode(&with_flags(0x22), V311),
        Err(DecodeError::Malformed(_))
    ));
    // Will QoS 3.
    assert_eq!(
        try_decode(&with_flags(0x1E), V311),
        Err(DecodeError::InvalidQoS)
    );
    // A will flag with no will in the payload.
    assert!(matches!(
        try_decode(&with_flags(0x06), V311),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn connect_will_topic_must_be_a_topic_name() {
    let bytes = packet(
        0x10,
        &[
            b"\x00\x04MQTT\x04\x06\x00\x00",
            b"\x00\x01c",
            b"\x00\x03a/#",
            b"\x00\x00",
        ],
    );
    assert_eq!(try_decode(&bytes, V311), Err(DecodeError::InvalidTopicName));
}

#[test]
fn connect_v5_authentication_data_needs_a_method() {
    let bytes = packet(
        0x10,
        &[
            b"\x00\x04MQTT\x05\x02\x00\x00",
            b"\x04\x16\x00\x01x",
            b"\x00\x01c",
        ],
    );
    assert_eq!(
        try_decode(&bytes, V5),
        Err(DecodeError::InvalidProperty(0x16))
    );
}

#[test]
fn connect_v5_refuses_publish_properties() {
    let bytes = packet(
        0x10,
        &[
            b"\x00\x04MQTT\x05\x02\x00\x00",
            b"\x03\x23\x00\x01",
            b"\x00\x01c",
        ],
    );
    assert_eq!(
        try_decode(&bytes, V5),
        Err(DecodeError::InvalidProperty(0x23))
    );
}

#[test]
fn connect_nul_in_client_id_is_refused() {
    let bytes = packet(0x10, &[b"\x00\x04MQTT\x04\x02\x00\x00", b"\x00\x03a\x00b"]);
    assert_eq!(try_decode(&bytes, V311), Err(DecodeError::InvalidUtf8));
}

// ---------------------------------------------------------------------------------------------
// CONNACK

#[test]
fn connack_v3_return_codes() {
    for code in 0..=5u8 {
        let reason = ReasonCode::from_v3_connack(code).unwrap();
        let expected = Packet::ConnAck(ConnAck {
            session_present: false,
            reason_code: reason,
            properties: Properties::default(),
        });
        assert_vector(&[0x20, 0x02, 0x00, code], V311, &expected);
        assert_vector(&[0x20, 0x02, 0x00, code], V31, &expected);
    }
    assert_vector(
        b"\x20\x02\x01\x00",
        V311,
        &Packet::ConnAck(ConnAck {
            session_present: true,
            reason_code: ReasonCode::SUCCESS,
            properties: Properties::default(),
        }),
    );
    assert_eq!(
        try_decode(b"\x20\x02\x00\x06", V311),
        Err(DecodeError::InvalidReasonCode(6))
    );
    assert!(try_decode(b"\x20\x02\x02\x00", V311).is_err());
    assert_eq!(
        try_decode(b"\x20\x02\x01\x05", V311),
        Err(DecodeError::ProtocolError(
            "session present on a refused connection"
        ))
    );
}

#[test]
fn connack_v31_has_no_session_present_flag() {
    let Packet::ConnAck(connack) = decode_exact(b"\x20\x02\x01\x00", V31) else {
        panic!("not a CONNACK");
    };
    assert!(!connack.session_present);
    let resumed = Packet::ConnAck(ConnAck {
        session_present: true,
        reason_code: ReasonCode::SUCCESS,
        properties: Properties::default(),
    });
    assert_eq!(encode_vec(&resumed, V31), b"\x20\x02\x00\x00");
}

#[test]
fn connack_v5_reason_codes_map_onto_v3_return_codes() {
    let refused = Packet::ConnAck(ConnAck {
        session_present: false,
        reason_code: ReasonCode::BANNED,
        properties: Properties::default(),
    });
    assert_eq!(encode_vec(&refused, V311), b"\x20\x02\x00\x05");
    assert_eq!(encode_vec(&refused, V5), b"\x20\x03\x00\x8A\x00");
}

#[test]
fn connack_v5_with_properties() {
    let bytes = packet(
        0x20,
        &[
            b"\x00\x00",
            b"\x3B",
            b"\x11\x00\x00\x00\x78",
            b"\x12\x00\x04auto",
            b"\x13\x00\x1E",
            b"\x15\x00\x01m",
            b"\x16\x00\x01d",
            b"\x1A\x00\x02ri",
            b"\x1C\x00\x02sr",
            b"\x1F\x00\x02ok",
            b"\x21\x00\x0A",
            b"\x22\x00\x10",
            b"\x24\x01",
            b"\x25\x00",
            b"\x27\x00\x01\x00\x00",
            b"\x28\x01",
            b"\x29\x00",
            b"\x2A\x01",
        ],
    );
    assert_vector(
        &bytes,
        V5,
        &Packet::ConnAck(ConnAck {
            session_present: false,
            reason_code: ReasonCode::SUCCESS,
            properties: Properties {
                session_expiry_interval: Some(120),
                receive_maximum: Some(10),
                maximum_qos: Some(1),
                retain_available: Some(0),
                maximum_packet_size: Some(65_536),
                assigned_client_identifier: Some("auto".into()),
                topic_alias_maximum: Some(16),
                reason_string: Some("ok".into()),
                wildcard_subscription_available: Some(1),
                subscription_identifier_available: Some(0),
                shared_subscription_available: Some(1),
                server_keep_alive: Some(30),
                response_information: Some("ri".into()),
                server_reference: Some("sr".into()),
                authentication_method: Some("m".into()),
                authentication_data: Some(Bytes::from_static(b"d")),
                ..Properties::default()
            },
        }),
    );
}

/// Properties may come in any order; MQTT 5.0 §3.1.2.12's example order is not ours.
#[test]
fn connect_v5_spec_example_in_spec_order() {
    let bytes = packet(
        0x10,
        &[
            b"\x00\x04MQTT\x05\xC2\x00\x0A",
            b"\x0D",
            b"\x21\x00\x14",
            b"\x11\x00\x00\x00\x0A",
            b"\x22\x00\x05",
            b"\x17\x01",
            b"\x00\x01c",
            b"\x00\x01u",
            b"\x00\x01p",
        ],
    );
    let Packet::Connect(connect) = decode_exact(&bytes, V5) else {
        panic!("not a CONNECT");
    };
    assert_eq!(connect.properties.receive_maximum, Some(20));
    assert_eq!(connect.properties.session_expiry_interval, Some(10));
    assert_eq!(connect.properties.topic_alias_maximum, Some(5));
    assert_eq!(connect.properties.request_problem_information, Some(1));
    assert_eq!(connect.username.as_deref(), Some("u"));
    assert_eq!(connect.password.as_deref(), Some(&b"p"[..]));
    let reencoded = encode_vec(&Packet::Connect(connect.clone()), V5);
    assert_ne!(
        reencoded, bytes,
        "the encoder writes properties in id order"
    );
    assert_eq!(decode_exact(&reencoded, V5), Packet::Connect(connect));
}

#[test]
fn connack_v5_reason_codes_are_checked() {
    assert_eq!(
        try_decode(b"\x20\x03\x00\x01\x00", V5),
        Err(DecodeError::InvalidReasonCode(1))
    );
    assert_eq!(
        try_decode(b"\x20\x03\x00\x8B\x00", V5),
        Err(DecodeError::InvalidReasonCode(0x8B))
    );
    assert!(matches!(
        decode_exact(b"\x20\x03\x00\x9F\x00", V5),
        Packet::ConnAck(ConnAck {
            reason_code: ReasonCode::CONNECTION_RATE_EXCEEDED,
            ..
        })
    ));
}

// ---------------------------------------------------------------------------------------------
// PUBLISH

fn publish(qos: QoS, topic: &str, packet_id: u16, payload: &'static [u8]) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id,
        payload: Bytes::from_static(payload),
        properties: Properties::default(),
    }
}

#[test]
fn publish_v3_qos_0_1_2() {
    for version in [V31, V311] {
        assert_vector(
            b"\x30\x0A\x00\x03a/bhello",
            version,
            &Packet::Publish(publish(QoS::AtMostOnce, "a/b", 0, b"hello")),
        );
        assert_vector(
            b"\x3B\x08\x00\x03a/b\x00\x0Ax",
            version,
            &Packet::Publish(Publish {
                dup: true,
                retain: true,
                ..publish(QoS::AtLeastOnce, "a/b", 10, b"x")
            }),
        );
        assert_vector(
            b"\x34\x07\x00\x03a/b\xFF\xFF",
            version,
            &Packet::Publish(publish(QoS::ExactlyOnce, "a/b", 0xFFFF, b"")),
        );
        // An empty retained payload (which deletes the retained message).
        assert_vector(
            b"\x31\x05\x00\x03a/b",
            version,
            &Packet::Publish(Publish {
                retain: true,
                ..publish(QoS::AtMostOnce, "a/b", 0, b"")
            }),
        );
    }
}

#[test]
fn publish_v5_without_and_with_properties() {
    assert_vector(
        b"\x30\x0B\x00\x03a/b\x00hello",
        V5,
        &Packet::Publish(publish(QoS::AtMostOnce, "a/b", 0, b"hello")),
    );
    let bytes = packet(
        0x32,
        &[
            b"\x00\x03a/b",
            b"\x12\x34",
            b"\x2A",
            b"\x01\x01",
            b"\x02\x00\x00\x00\x3C",
            b"\x03\x00\x04json",
            b"\x08\x00\x05reply",
            b"\x09\x00\x02id",
            b"\x0B\x05",
            b"\x0B\x80\x01",
            b"\x23\x00\x07",
            b"\x26\x00\x01k\x00\x01v",
            b"{}",
        ],
    );
    assert_vector(
        &bytes,
        V5,
        &Packet::Publish(Publish {
            properties: Properties {
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(60),
                content_type: Some("json".into()),
                response_topic: Some("reply".into()),
                correlation_data: Some(Bytes::from_static(b"id")),
                subscription_identifiers: vec![5, 128],
                topic_alias: Some(7),
                user_properties: user_properties(&[("k", "v")]),
                ..Properties::default()
            },
            ..publish(QoS::AtLeastOnce, "a/b", 0x1234, b"{}")
        }),
    );
}

#[test]
fn publish_v5_empty_topic_with_alias_is_left_to_the_broker() {
    assert_vector(
        b"\x30\x08\x00\x00\x03\x23\x00\x01hi",
        V5,
        &Packet::Publish(Publish {
            properties: Properties {
                topic_alias: Some(1),
                ..Properties::default()
            },
            ..publish(QoS::AtMostOnce, "", 0, b"hi")
        }),
    );
    assert_eq!(
        try_decode(b"\x30\x04\x00\x00hi", V311),
        Err(DecodeError::InvalidTopicName)
    );
}

#[test]
fn publish_payload_is_a_slice_of_the_read_buffer() {
    let mut buf = BytesMut::from(&b"\x30\x0A\x00\x03a/bhello\xC0\x00"[..]);
    let base = buf.as_ptr() as usize;
    let Some(Packet::Publish(publish)) = decode(&mut buf, V311, MAX).unwrap() else {
        panic!("not a PUBLISH");
    };
    assert_eq!(publish.payload.as_ptr() as usize, base + 7);
    assert_eq!(&buf[..], b"\xC0\x00", "only the PUBLISH was consumed");
    assert_eq!(decode(&mut buf, V311, MAX), Ok(Some(Packet::PingReq)));
    assert!(buf.is_empty());
}

#[test]
fn publish_bad_topics() {
    for version in [V31, V311, V5] {
        assert_eq!(
            try_decode(b"\x30\x05\x00\x03a/+", version),
            Err(DecodeError::InvalidTopicName)
        );
        assert_eq!(
            try_decode(b"\x30\x05\x00\x03a/#", version),
            Err(DecodeError::InvalidTopicName)
        );
        assert_eq!(
            try_decode(b"\x30\x04\x00\x02\xC3\x28", version),
            Err(DecodeError::InvalidUtf8)
        );
        assert_eq!(
            try_decode(b"\x30\x05\x00\x03a\x00b", version),
            Err(DecodeError::InvalidUtf8)
        );
        // U+FFFF is a noncharacter but valid UTF-8: the spec lets receivers accept it.
        let noncharacter: &[u8] = if version.is_v5() {
            b"\x30\x06\x00\x03\xEF\xBF\xBF\x00"
        } else {
            b"\x30\x05\x00\x03\xEF\xBF\xBF"
        };
        assert!(matches!(
            decode_exact(noncharacter, version),
            Packet::Publish(Publish { ref topic, .. }) if topic == "\u{FFFF}"
        ));
    }
}

#[test]
fn publish_qos_and_packet_id_rules() {
    for version in [V31, V311, V5] {
        assert_eq!(
            try_decode(b"\x36\x07\x00\x03a/b\x00\x01", version),
            Err(DecodeError::InvalidQoS)
        );
        // Refused from the first byte, before the rest arrives.
        assert_eq!(try_decode(b"\x36", version), Err(DecodeError::InvalidQoS));
        assert_eq!(
            try_decode(b"\x32\x07\x00\x03a/b\x00\x00", version),
            Err(DecodeError::ZeroPacketId)
        );
        // QoS 1 without room for the packet id.
        assert!(matches!(
            try_decode(b"\x32\x05\x00\x03a/b", version),
            Err(DecodeError::Malformed(_))
        ));
    }
    // DUP on QoS 0: malformed since 3.1.1, tolerated for 3.1.
    for version in [V311, V5] {
        assert!(matches!(
            try_decode(b"\x38\x05\x00\x03a/b", version),
            Err(DecodeError::Malformed(_))
        ));
    }
    assert_eq!(
        decode_exact(b"\x38\x05\x00\x03a/b", V31),
        Packet::Publish(Publish {
            dup: true,
            ..publish(QoS::AtMostOnce, "a/b", 0, b"")
        })
    );
}

#[test]
fn publish_v5_property_rules() {
    // Subscription identifier 0, a CONNECT-only property, a repeated topic alias.
    for (props, id) in [
        (&b"\x02\x0B\x00"[..], 0x0B),
        (b"\x03\x21\x00\x01", 0x21),
        (b"\x06\x23\x00\x01\x23\x00\x02", 0x23),
    ] {
        let bytes = packet(0x30, &[b"\x00\x01t", props]);
        assert_eq!(
            try_decode(&bytes, V5),
            Err(DecodeError::InvalidProperty(id))
        );
    }
    // A property block longer than the packet.
    assert!(matches!(
        try_decode(b"\x30\x05\x00\x01t\x05\x01", V5),
        Err(DecodeError::Malformed(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// PUBACK, PUBREC, PUBREL, PUBCOMP

fn response(packet_type: u8, response: PubResponse) -> Packet {
    match packet_type {
        4 => Packet::PubAck(response),
        5 => Packet::PubRec(response),
        6 => Packet::PubRel(response),
        _ => Packet::PubComp(response),
    }
}

#[test]
fn pub_responses_short_forms() {
    for (first_byte, packet_type) in [(0x40, 4), (0x50, 5), (0x62, 6), (0x70, 7)] {
        for version in [V31, V311, V5] {
            assert_vector(
                &[first_byte, 0x02, 0x00, 0x07],
                version,
                &response(packet_type, PubResponse::success(7)),
            );
        }
        // MQTT 5: an explicit success code and an empty property block mean the same.
        for long_form in [&[first_byte, 3, 0, 7, 0][..], &[first_byte, 4, 0, 7, 0, 0]] {
            assert_eq!(
                decode_exact(long_form, V5),
                response(packet_type, PubResponse::success(7))
            );
        }
        for version in [V31, V311] {
            assert!(matches!(
                try_decode(&[first_byte, 3, 0, 7, 0], version),
                Err(DecodeError::Malformed(_))
            ));
        }
        assert_eq!(
            try_decode(&[first_byte, 2, 0, 0], V5),
            Err(DecodeError::ZeroPacketId)
        );
    }
}

#[test]
fn pub_responses_v5_reason_codes_and_properties() {
    let quota = PubResponse {
        packet_id: 1,
        reason_code: ReasonCode::QUOTA_EXCEEDED,
        properties: Properties::default(),
    };
    assert_vector(b"\x40\x03\x00\x01\x97", V5, &Packet::PubAck(quota.clone()));
    assert_vector(b"\x50\x03\x00\x01\x97", V5, &Packet::PubRec(quota));
    assert_vector(
        b"\x62\x03\x00\x01\x92",
        V5,
        &Packet::PubRel(PubResponse {
            packet_id: 1,
            reason_code: ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
            properties: Properties::default(),
        }),
    );
    assert_vector(
        b"\x40\x0F\x00\x01\x10\x0B\x1F\x00\x01r\x26\x00\x01a\x00\x01b",
        V5,
        &Packet::PubAck(PubResponse {
            packet_id: 1,
            reason_code: ReasonCode::NO_MATCHING_SUBSCRIBERS,
            properties: Properties {
                reason_string: Some("r".into()),
                user_properties: user_properties(&[("a", "b")]),
                ..Properties::default()
            },
        }),
    );
    // Success with properties keeps the reason code on the wire.
    assert_vector(
        b"\x70\x08\x00\x01\x00\x04\x1F\x00\x01r",
        V5,
        &Packet::PubComp(PubResponse {
            packet_id: 1,
            reason_code: ReasonCode::SUCCESS,
            properties: Properties {
                reason_string: Some("r".into()),
                ..Properties::default()
            },
        }),
    );
    for bytes in [
        &b"\x40\x03\x00\x01\x92"[..],
        b"\x50\x03\x00\x01\x01",
        b"\x62\x03\x00\x01\x10",
        b"\x70\x03\x00\x01\x80",
    ] {
        assert_eq!(
            try_decode(bytes, V5),
            Err(DecodeError::InvalidReasonCode(bytes[4]))
        );
    }
    // Only reason string and user properties belong in an acknowledgement.
    assert_eq!(
        try_decode(b"\x40\x06\x00\x01\x00\x02\x01\x01", V5),
        Err(DecodeError::InvalidProperty(0x01))
    );
}

#[test]
fn pub_responses_drop_v5_fields_in_v3() {
    let failed = Packet::PubAck(PubResponse {
        packet_id: 3,
        reason_code: ReasonCode::NOT_AUTHORIZED,
        properties: Properties {
            reason_string: Some("no".into()),
            ..Properties::default()
        },
    });
    assert_eq!(encode_vec(&failed, V311), b"\x40\x02\x00\x03");
}

// ---------------------------------------------------------------------------------------------
// SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK

fn filter(filter: &str, qos: QoS) -> SubscribeFilter {
    SubscribeFilter {
        filter: filter.into(),
        options: SubscriptionOptions {
            qos,
            ..SubscriptionOptions::default()
        },
    }
}

#[test]
fn subscribe_v3() {
    for version in [V31, V311] {
        assert_vector(
            b"\x82\x0E\x00\x01\x00\x03a/b\x01\x00\x03c/#\x02",
            version,
            &Packet::Subscribe(Subscribe {
                packet_id: 1,
                filters: vec![
                    filter("a/b", QoS::AtLeastOnce),
                    filter("c/#", QoS::ExactlyOnce),
                ],
                properties: Properties::default(),
            }),
        );
        // Reserved option bits, QoS 3, bad filters, no filters at all.
        assert!(matches!(
            try_decode(b"\x82\x08\x00\x01\x00\x03a/b\x04", version),
            Err(DecodeError::Malformed(_))
        ));
        assert_eq!(
            try_decode(b"\x82\x08\x00\x01\x00\x03a/b\x03", version),
            Err(DecodeError::InvalidQoS)
        );
        assert_eq!(
            try_decode(b"\x82\x0A\x00\x01\x00\x05a/#/b\x00", version),
            Err(DecodeError::InvalidTopicFilter)
        );
        assert_eq!(
            try_decode(b"\x82\x05\x00\x01\x00\x00\x00", version),
            Err(DecodeError::InvalidTopicFilter)
        );
        assert!(matches!(
            try_decode(b"\x82\x02\x00\x01", version),
            Err(DecodeError::ProtocolError(_))
        ));
        // A filter without its options byte.
        assert!(matches!(
            try_decode(b"\x82\x07\x00\x01\x00\x03a/b", version),
            Err(DecodeError::Malformed(_))
        ));
    }
    // MQTT 3.1 retries set DUP on SUBSCRIBE.
    assert!(matches!(
        decode_exact(b"\x8A\x08\x00\x01\x00\x03a/b\x00", V31),
        Packet::Subscribe(_)
    ));
}

#[test]
fn subscribe_v5_options_and_properties() {
    let bytes = packet(
        0x82,
        &[
            b"\x00\x01",
            b"\x09\x0B\x05\x26\x00\x01a\x00\x01b",
            // QoS 1, no local, retain as published, retain handling 2
            b"\x00\x03a/b\x2D",
            b"\x00\x0E$share/g/c/+/d\x10",
        ],
    );
    assert_vector(
        &bytes,
        V5,
        &Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![
                SubscribeFilter {
                    filter: "a/b".into(),
                    options: SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: RetainHandling::DoNotSend,
                    },
                },
                SubscribeFilter {
                    filter: "$share/g/c/+/d".into(),
                    options: SubscriptionOptions {
                        retain_handling: RetainHandling::SendIfNewSubscription,
                        ..SubscriptionOptions::default()
                    },
                },
            ],
            properties: Properties {
                subscription_identifiers: vec![5],
                user_properties: user_properties(&[("a", "b")]),
                ..Properties::default()
            },
        }),
    );
    let with_options = |options: u8| packet(0x82, &[b"\x00\x01\x00\x00\x03a/b", &[options]]);
    assert!(matches!(
        try_decode(&with_options(0x40), V5),
        Err(DecodeError::Malformed(_))
    ));
    assert!(matches!(
        try_decode(&with_options(0x30), V5),
        Err(DecodeError::ProtocolError(_))
    ));
    assert_eq!(
        try_decode(&with_options(0x03), V5),
        Err(DecodeError::InvalidQoS)
    );
    // No local on a shared subscription [MQTT-3.8.3-4].
    assert!(matches!(
        try_decode(&packet(0x82, &[b"\x00\x01\x00\x00\x0A$share/g/t\x04"]), V5),
        Err(DecodeError::ProtocolError(_))
    ));
    // A second subscription identifier.
    assert_eq!(
        try_decode(
            &packet(0x82, &[b"\x00\x01\x04\x0B\x01\x0B\x02\x00\x01t\x00"]),
            V5
        ),
        Err(DecodeError::InvalidProperty(0x0B))
    );
}

#[test]
fn suback() {
    let v3 = Packet::SubAck(SubAck {
        packet_id: 1,
        reason_codes: vec![
            ReasonCode::GRANTED_QOS_0,
            ReasonCode::GRANTED_QOS_2,
            ReasonCode::UNSPECIFIED_ERROR,
        ],
        properties: Properties::default(),
    });
    for version in [V31, V311] {
        assert_vector(b"\x90\x05\x00\x01\x00\x02\x80", version, &v3);
        assert_eq!(
            try_decode(b"\x90\x03\x00\x01\x87", version),
            Err(DecodeError::InvalidReasonCode(0x87))
        );
        assert!(matches!(
            try_decode(b"\x90\x02\x00\x01", version),
            Err(DecodeError::ProtocolError(_))
        ));
    }
    let v5 = Packet::SubAck(SubAck {
        packet_id: 1,
        reason_codes: vec![
            ReasonCode::GRANTED_QOS_1,
            ReasonCode::NOT_AUTHORIZED,
            ReasonCode::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED,
        ],
        properties: Properties {
            reason_string: Some("acl".into()),
            ..Properties::default()
        },
    });
    assert_vector(b"\x90\x0C\x00\x01\x06\x1F\x00\x03acl\x01\x87\xA2", V5, &v5);
    // v5 failure codes become 0x80 for 3.x.
    assert_eq!(encode_vec(&v5, V311), b"\x90\x05\x00\x01\x01\x80\x80");
    assert_eq!(
        try_decode(b"\x90\x04\x00\x01\x00\x03", V5),
        Err(DecodeError::InvalidReasonCode(3))
    );
}

#[test]
fn unsubscribe_and_unsuback() {
    let unsubscribe = Packet::Unsubscribe(Unsubscribe {
        packet_id: 2,
        filters: vec!["a/b".into(), "c/#".into()],
        properties: Properties::default(),
    });
    for version in [V31, V311] {
        assert_vector(
            b"\xA2\x0C\x00\x02\x00\x03a/b\x00\x03c/#",
            version,
            &unsubscribe,
        );
        assert_vector(
            b"\xB0\x02\x00\x02",
            version,
            &Packet::UnsubAck(UnsubAck {
                packet_id: 2,
                reason_codes: Vec::new(),
                properties: Properties::default(),
            }),
        );
        assert!(matches!(
            try_decode(b"\xA2\x02\x00\x02", version),
            Err(DecodeError::ProtocolError(_))
        ));
        assert!(matches!(
            try_decode(b"\xB0\x03\x00\x02\x00", version),
            Err(DecodeError::Malformed(_))
        ));
    }
    assert_vector(
        b"\xA2\x0D\x00\x02\x00\x00\x03a/b\x00\x03c/#",
        V5,
        &unsubscribe,
    );
    assert_eq!(
        try_decode(b"\xA2\x09\x00\x02\x00\x00\x04a/+b", V5),
        Err(DecodeError::InvalidTopicFilter)
    );
    assert_vector(
        b"\xB0\x05\x00\x02\x00\x00\x11",
        V5,
        &Packet::UnsubAck(UnsubAck {
            packet_id: 2,
            reason_codes: vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED],
            properties: Properties::default(),
        }),
    );
    assert_eq!(
        try_decode(b"\xB0\x04\x00\x02\x00\x01", V5),
        Err(DecodeError::InvalidReasonCode(1))
    );
    assert!(matches!(
        try_decode(b"\xB0\x03\x00\x02\x00", V5),
        Err(DecodeError::ProtocolError(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// PINGREQ, PINGRESP, DISCONNECT, AUTH

#[test]
fn ping() {
    for version in [V31, V311, V5] {
        assert_vector(b"\xC0\x00", version, &Packet::PingReq);
        assert_vector(b"\xD0\x00", version, &Packet::PingResp);
        assert!(matches!(
            try_decode(b"\xC0\x01\x00", version),
            Err(DecodeError::Malformed(_))
        ));
    }
}

#[test]
fn disconnect() {
    let normal = Packet::Disconnect(Disconnect::with_reason(ReasonCode::NORMAL_DISCONNECTION));
    for version in [V31, V311, V5] {
        assert_vector(b"\xE0\x00", version, &normal);
    }
    assert!(matches!(
        try_decode(b"\xE0\x01\x00", V311),
        Err(DecodeError::Malformed(_))
    ));
    let with_will = Packet::Disconnect(Disconnect::with_reason(
        ReasonCode::DISCONNECT_WITH_WILL_MESSAGE,
    ));
    assert_vector(b"\xE0\x01\x04", V5, &with_will);
    assert_eq!(encode_vec(&with_will, V311), b"\xE0\x00");
    assert_eq!(decode_exact(b"\xE0\x02\x00\x00", V5), normal);
    assert_vector(
        b"\xE0\x11\x8B\x0F\x11\x00\x00\x00\x00\x1C\x00\x01s\x1F\x00\x03bye",
        V5,
        &Packet::Disconnect(Disconnect {
            reason_code: ReasonCode::SERVER_SHUTTING_DOWN,
            properties: Properties {
                session_expiry_interval: Some(0),
                reason_string: Some("bye".into()),
                server_reference: Some("s".into()),
                ..Properties::default()
            },
        }),
    );
    assert_eq!(
        try_decode(b"\xE0\x01\x05", V5),
        Err(DecodeError::InvalidReasonCode(5))
    );
    assert_eq!(
        try_decode(b"\xE0\x04\x00\x02\x23\x00", V5),
        Err(DecodeError::InvalidProperty(0x23))
    );
}

#[test]
fn auth() {
    assert_vector(
        b"\xF0\x00",
        V5,
        &Packet::Auth(Auth {
            reason_code: ReasonCode::SUCCESS,
            properties: Properties::default(),
        }),
    );
    assert_vector(
        b"\xF0\x15\x18\x13\x15\x00\x0BSCRAM-SHA-1\x16\x00\x02\x01\x02",
        V5,
        &Packet::Auth(Auth {
            reason_code: ReasonCode::CONTINUE_AUTHENTICATION,
            properties: Properties {
                authentication_method: Some("SCRAM-SHA-1".into()),
                authentication_data: Some(Bytes::from_static(b"\x01\x02")),
                ..Properties::default()
            },
        }),
    );
    let reauthenticate = Packet::Auth(Auth {
        reason_code: ReasonCode::REAUTHENTICATE,
        properties: Properties::default(),
    });
    assert_vector(b"\xF0\x02\x19\x00", V5, &reauthenticate);
    assert_eq!(decode_exact(b"\xF0\x01\x19", V5), reauthenticate);
    assert_eq!(
        try_decode(b"\xF0\x02\x01\x00", V5),
        Err(DecodeError::InvalidReasonCode(1))
    );
    for version in [V31, V311] {
        assert_eq!(
            try_decode(b"\xF0\x00", version),
            Err(DecodeError::InvalidPacketType(15))
        );
        let mut buf = BytesMut::new();
        assert_eq!(
            encode(&reauthenticate, version, &mut buf),
            Err(EncodeError::NotInVersion(15))
        );
        assert!(buf.is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// Framing and bad input

/// One valid encoding of each packet type per version, from the vectors above.
fn sample_packets() -> Vec<(ProtocolVersion, Vec<u8>)> {
    let mut samples = vec![
        (V31, PAHO_V31_CONNECT.to_vec()),
        (V311, b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00".to_vec()),
        (
            V5,
            packet(
                0x10,
                &[b"\x00\x04MQTT\x05\xC6\x00\x0A\x03\x21\x00\x01\x00\x01c\x02\x01\x01\x00\x01w\x00\x00\x00\x01u\x00\x01p"],
            ),
        ),
        (V5, b"\x20\x05\x00\x00\x02\x24\x01".to_vec()),
        (V5, b"\x32\x0E\x00\x03a/b\x00\x01\x03\x23\x00\x01xyz".to_vec()),
        (V5, b"\x40\x08\x00\x01\x00\x04\x1F\x00\x01r".to_vec()),
        (V5, b"\x82\x0B\x00\x01\x02\x0B\x01\x00\x03a/b\x01".to_vec()),
        (V5, b"\x90\x05\x00\x01\x00\x01\x87".to_vec()),
        (V5, b"\xA2\x08\x00\x02\x00\x00\x03a/b".to_vec()),
        (V5, b"\xB0\x05\x00\x02\x00\x00\x11".to_vec()),
        (V5, b"\xE0\x07\x04\x05\x11\x00\x00\x00\x0A".to_vec()),
        (V5, b"\xF0\x05\x18\x03\x16\x00\x00".to_vec()),
    ];
    for version in [V31, V311] {
        samples.extend(
            [
                &b"\x20\x02\x00\x00"[..],
                b"\x30\x0A\x00\x03a/bhello",
                b"\x62\x02\x00\x07",
                b"\x82\x08\x00\x01\x00\x03a/b\x01",
                b"\x90\x03\x00\x01\x80",
                b"\xA2\x07\x00\x02\x00\x03a/b",
                b"\xB0\x02\x00\x02",
                b"\xC0\x00",
                b"\xD0\x00",
                b"\xE0\x00",
            ]
            .map(|bytes| (version, bytes.to_vec())),
        );
    }
    samples
}

#[test]
fn every_truncation_asks_for_more_bytes() {
    for (version, bytes) in sample_packets() {
        // The whole sample must be valid, or its truncations prove nothing.
        decode_exact(&bytes, version);
        for len in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..len]);
            assert_eq!(
                decode(&mut buf, version, MAX),
                Ok(None),
                "{:02x?} in {version:?}",
                &bytes[..len]
            );
            assert_eq!(&buf[..], &bytes[..len], "buffer untouched");
        }
    }
}

#[test]
fn packets_follow_each_other_in_one_buffer() {
    for version in [V31, V311, V5] {
        let samples: Vec<Vec<u8>> = sample_packets()
            .into_iter()
            .filter(|&(v, _)| v == version)
            .map(|(_, bytes)| bytes)
            .collect();
        let mut buf = BytesMut::from(&samples.concat()[..]);
        for bytes in &samples {
            let packet = decode(&mut buf, version, MAX).unwrap().unwrap();
            assert_eq!(packet, decode_exact(bytes, version));
        }
        assert_eq!(decode(&mut buf, version, MAX), Ok(None));
    }
}

#[test]
fn oversized_packets_fail_before_the_body_arrives() {
    // A PUBLISH announcing 200 bytes, of which only the header has arrived.
    let mut buf = BytesMut::from(&b"\x30\xC8\x01"[..]);
    assert_eq!(
        decode(&mut buf, V311, 100),
        Err(DecodeError::PacketTooLarge {
            size: 203,
            max: 100
        })
    );
    // The limit counts the fixed header: 2 + 10 bytes fit in 12, not in 11.
    let publish = b"\x30\x0A\x00\x03a/bhello";
    assert!(matches!(
        decode(&mut BytesMut::from(&publish[..]), V311, 12),
        Ok(Some(_))
    ));
    assert_eq!(
        decode(&mut BytesMut::from(&publish[..]), V311, 11),
        Err(DecodeError::PacketTooLarge { size: 12, max: 11 })
    );
    assert_eq!(
        DecodeError::PacketTooLarge { size: 12, max: 11 }.reason_code(),
        ReasonCode::PACKET_TOO_LARGE
    );
}

#[test]
fn bad_remaining_lengths() {
    for bytes in [
        &b"\x30\xFF\xFF\xFF\xFF\x7F"[..],
        b"\x30\x80\x80\x80\x80\x01",
        b"\x30\xFF\xFF\xFF\xFF",
        // Overlong: 0 in two bytes.
        b"\xC0\x80\x00",
    ] {
        assert_eq!(
            try_decode(bytes, V311),
            Err(DecodeError::MalformedRemainingLength),
            "{bytes:02x?}"
        );
    }
    // The largest legal length is refused only for its size.
    assert_eq!(
        try_decode(b"\x30\xFF\xFF\xFF\x7F", V311),
        Err(DecodeError::PacketTooLarge {
            size: 268_435_460,
            max: MAX
        })
    );
    assert_eq!(
        decode(
            &mut BytesMut::from(&b"\x30\xFF\xFF\xFF\x7F"[..]),
            V311,
            usize::MAX
        ),
        Ok(None)
    );
}

#[test]
fn bad_first_bytes() {
    for version in [V31, V311, V5] {
        assert_eq!(
            try_decode(b"\x00\x00", version),
            Err(DecodeError::InvalidPacketType(0))
        );
        // Reserved flags, with only the first byte received.
        for byte in [
            0x11, 0x21, 0x41, 0x51, 0x60, 0x71, 0x80, 0x91, 0xA0, 0xB1, 0xC1, 0xD8, 0xE1,
        ] {
            assert!(
                matches!(
                    try_decode(&[byte], version),
                    Err(DecodeError::InvalidFlags { .. })
                ),
                "{byte:#04x} in {version:?}"
            );
        }
    }
    assert!(matches!(
        try_decode(b"\xF1\x00", V5),
        Err(DecodeError::InvalidFlags {
            packet_type: 15,
            flags: 1
        })
    ));
}

#[test]
fn leftover_bytes_after_a_body_are_malformed() {
    for (version, bytes) in [
        (V311, &b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x3c\x00\x00!"[..]),
        (V311, b"\x20\x03\x00\x00\x00"),
        (V5, b"\x20\x04\x00\x00\x00!"),
        (V311, b"\x40\x03\x00\x01\x00"),
        (V5, b"\x40\x05\x00\x01\x00\x00!"),
        (V5, b"\xE0\x03\x00\x00!"),
        (V5, b"\xF0\x03\x00\x00!"),
        (V311, b"\xD0\x01\x00"),
    ] {
        assert!(
            matches!(try_decode(bytes, version), Err(DecodeError::Malformed(_))),
            "{bytes:02x?}"
        );
    }
}

#[test]
fn the_connection_version_decides_how_packets_decode() {
    // A v5 PUBACK with a reason code is malformed on a 3.1.1 connection...
    assert!(try_decode(b"\x40\x03\x00\x01\x10", V311).is_err());
    // ...and a 3.1.1 PUBLISH reads differently in v5 (the first payload byte becomes the
    // property length).
    assert_ne!(
        try_decode(b"\x30\x0A\x00\x03a/b\x00ello", V5),
        try_decode(b"\x30\x0A\x00\x03a/b\x00ello", V311)
    );
}

// ---------------------------------------------------------------------------------------------
// Encoding errors

#[test]
fn encoding_refuses_long_fields_and_leaves_the_buffer_alone() {
    let long_topic = Packet::Publish(Publish {
        topic: "t".repeat(65_536),
        ..publish(QoS::AtMostOnce, "", 0, b"")
    });
    let mut buf = BytesMut::from(&b"keep"[..]);
    assert_eq!(
        encode(&long_topic, V311, &mut buf),
        Err(EncodeError::FieldTooLong)
    );
    assert_eq!(&buf[..], b"keep");
    let long_property = Packet::Disconnect(Disconnect {
        reason_code: ReasonCode::SUCCESS,
        properties: Properties {
            reason_string: Some("r".repeat(70_000)),
            ..Properties::default()
        },
    });
    assert_eq!(
        encoded_len(&long_property, V5),
        Err(EncodeError::FieldTooLong)
    );
    // Dropped in 3.x, so no error there.
    assert_eq!(encoded_len(&long_property, V311), Ok(2));
    let bad_identifier = Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![filter("a", QoS::AtMostOnce)],
        properties: Properties {
            subscription_identifiers: vec![0],
            ..Properties::default()
        },
    });
    assert_eq!(
        encoded_len(&bad_identifier, V5),
        Err(EncodeError::InvalidValue("subscription identifier"))
    );
}

#[test]
fn large_payloads_use_multi_byte_remaining_lengths() {
    static PAYLOAD: [u8; 20_000] = [7; 20_000];
    let big = Packet::Publish(publish(QoS::AtLeastOnce, "big", 9, &PAYLOAD));
    let bytes = encode_vec(&big, V5);
    assert_eq!(
        &bytes[..4],
        &[0x32, 0xA8, 0x9C, 0x01],
        "20,008 = 0x4E28 in three digits"
    );
    assert_eq!(bytes.len(), 4 + 20_008);
    assert_eq!(decode_exact(&bytes, V5), big);
}

// ---------------------------------------------------------------------------------------------
// Fast paths agree with the rules they shortcut

proptest::proptest! {
    #[test]
    fn topic_fast_path_agrees_with_validate_topic_name(topic in "[^\\x00]{0,12}|[a/+#]{0,6}") {
        if super::publish::is_plain_topic_name(&topic) {
            proptest::prop_assert_eq!(crate::topic::validate_topic_name(&topic), Ok(()));
        }
    }
}

#[test]
fn properties_is_empty_sees_every_field() {
    assert!(Properties::default().is_empty());
    let each: Vec<Properties> = vec![
        Properties {
            payload_format_indicator: Some(0),
            ..Properties::default()
        },
        Properties {
            subscription_identifiers: vec![1],
            ..Properties::default()
        },
        Properties {
            user_properties: vec![(String::new(), String::new())],
            ..Properties::default()
        },
        Properties {
            shared_subscription_available: Some(0),
            ..Properties::default()
        },
        Properties {
            correlation_data: Some(Bytes::new()),
            ..Properties::default()
        },
    ];
    for properties in each {
        assert!(!properties.is_empty(), "{properties:?}");
    }
}

#[test]
fn borrowed_publish_encodes_as_the_owned_packet() {
    let with_properties = Properties {
        message_expiry_interval: Some(30),
        topic_alias: Some(3),
        user_properties: user_properties(&[("k", "v")]),
        ..Properties::default()
    };
    for version in [V31, V311, V5] {
        for (qos, packet_id) in [
            (QoS::AtMostOnce, 0),
            (QoS::AtLeastOnce, 7),
            (QoS::ExactlyOnce, 9),
        ] {
            for properties in [Properties::default(), with_properties.clone()] {
                let publish = Publish {
                    dup: qos != QoS::AtMostOnce,
                    qos,
                    retain: true,
                    topic: "a/b".into(),
                    packet_id,
                    payload: Bytes::from_static(b"payload"),
                    properties,
                };
                let owned = encode_vec(&Packet::Publish(publish.clone()), version);
                let mut borrowed = BytesMut::new();
                encode_publish(&PublishRef::from(&publish), version, &mut borrowed).unwrap();
                assert_eq!(&borrowed[..], &owned[..], "{version:?} {qos:?}");
                if publish.properties.is_empty() {
                    // `None` stands for empty properties.
                    let mut without = BytesMut::new();
                    let view = PublishRef {
                        properties: None,
                        ..PublishRef::from(&publish)
                    };
                    encode_publish(&view, version, &mut without).unwrap();
                    assert_eq!(&without[..], &owned[..]);
                }
            }
        }
    }
}

#[test]
fn borrowed_publish_too_long_is_refused_and_leaves_the_buffer_alone() {
    let topic = "t".repeat(65_536);
    let view = PublishRef {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: &topic,
        packet_id: 0,
        payload: b"",
        properties: None,
    };
    let mut buf = BytesMut::from(&b"kept"[..]);
    assert_eq!(
        encode_publish(&view, V311, &mut buf),
        Err(EncodeError::FieldTooLong)
    );
    assert_eq!(&buf[..], b"kept");
}

#[test]
fn publish_filling_the_buffer_exactly_is_decoded_and_empties_it() {
    let bytes = packet(0x30, &[b"\x00\x03a/b", b"hello"]);
    // Exactly sized (taken whole) and with room to spare (split off): the same packet.
    let mut exact = BytesMut::with_capacity(bytes.len());
    exact.extend_from_slice(&bytes);
    assert_eq!(exact.capacity(), bytes.len());
    let mut roomy = BytesMut::with_capacity(bytes.len() * 4);
    roomy.extend_from_slice(&bytes);
    for buf in [&mut exact, &mut roomy] {
        let Ok(Some(Packet::Publish(publish))) = decode(buf, V311, MAX) else {
            panic!("not a PUBLISH");
        };
        assert_eq!(publish.topic, "a/b");
        assert_eq!(&publish.payload[..], b"hello");
        assert!(buf.is_empty());
    }
}
