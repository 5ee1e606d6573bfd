//! MQTT 5 properties (MQTT 5.0 §2.2.2): which packet may carry which property, how each is
//! coded, and the value rules the spec states for them.

use super::header::MAX_VARINT;
use super::reader::Reader;
use super::writer::{Counter, Sink, write_binary, write_str, write_varint};
use crate::error::{DecodeError, EncodeError};
use crate::packet::Properties;
use crate::topic::validate_topic_name;

const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
const CONTENT_TYPE: u8 = 0x03;
const RESPONSE_TOPIC: u8 = 0x08;
const CORRELATION_DATA: u8 = 0x09;
const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
const SERVER_KEEP_ALIVE: u8 = 0x13;
const AUTHENTICATION_METHOD: u8 = 0x15;
const AUTHENTICATION_DATA: u8 = 0x16;
const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
const WILL_DELAY_INTERVAL: u8 = 0x18;
const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
const RESPONSE_INFORMATION: u8 = 0x1A;
const SERVER_REFERENCE: u8 = 0x1C;
const REASON_STRING: u8 = 0x1F;
const RECEIVE_MAXIMUM: u8 = 0x21;
const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
const TOPIC_ALIAS: u8 = 0x23;
const MAXIMUM_QOS: u8 = 0x24;
const RETAIN_AVAILABLE: u8 = 0x25;
const USER_PROPERTY: u8 = 0x26;
const MAXIMUM_PACKET_SIZE: u8 = 0x27;
const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;

/// The properties one packet type may carry, as bit sets indexed by property id (every id the
/// spec defines is below 64).
#[derive(Debug, Clone, Copy)]
pub(super) struct PropertySet {
    allowed: u64,
    repeatable: u64,
}

const fn bits(ids: &[u8]) -> u64 {
    let mut mask = 0;
    let mut index = 0;
    while index < ids.len() {
        mask |= 1 << ids[index];
        index += 1;
    }
    mask
}

impl PropertySet {
    const fn new(allowed: &[u8], repeatable: &[u8]) -> PropertySet {
        PropertySet {
            allowed: bits(allowed),
            repeatable: bits(repeatable),
        }
    }

    fn allows(self, id: u8) -> bool {
        id < 64 && self.allowed & (1 << id) != 0
    }
}

// The sets below follow the property table of MQTT 5.0 §2.2.2.2.

pub(super) const CONNECT_PROPERTIES: PropertySet = PropertySet::new(
    &[
        SESSION_EXPIRY_INTERVAL,
        AUTHENTICATION_METHOD,
        AUTHENTICATION_DATA,
        REQUEST_PROBLEM_INFORMATION,
        REQUEST_RESPONSE_INFORMATION,
        RECEIVE_MAXIMUM,
        TOPIC_ALIAS_MAXIMUM,
        USER_PROPERTY,
        MAXIMUM_PACKET_SIZE,
    ],
    &[USER_PROPERTY],
);

pub(super) const WILL_PROPERTIES: PropertySet = PropertySet::new(
    &[
        PAYLOAD_FORMAT_INDICATOR,
        MESSAGE_EXPIRY_INTERVAL,
        CONTENT_TYPE,
        RESPONSE_TOPIC,
        CORRELATION_DATA,
        WILL_DELAY_INTERVAL,
        USER_PROPERTY,
    ],
    &[USER_PROPERTY],
);

pub(super) const CONNACK_PROPERTIES: PropertySet = PropertySet::new(
    &[
        SESSION_EXPIRY_INTERVAL,
        ASSIGNED_CLIENT_IDENTIFIER,
        SERVER_KEEP_ALIVE,
        AUTHENTICATION_METHOD,
        AUTHENTICATION_DATA,
        RESPONSE_INFORMATION,
        SERVER_REFERENCE,
        REASON_STRING,
        RECEIVE_MAXIMUM,
        TOPIC_ALIAS_MAXIMUM,
        MAXIMUM_QOS,
        RETAIN_AVAILABLE,
        USER_PROPERTY,
        MAXIMUM_PACKET_SIZE,
        WILDCARD_SUBSCRIPTION_AVAILABLE,
        SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        SHARED_SUBSCRIPTION_AVAILABLE,
    ],
    &[USER_PROPERTY],
);

/// PUBLISH may carry several subscription identifiers: one per matching subscription.
pub(super) const PUBLISH_PROPERTIES: PropertySet = PropertySet::new(
    &[
        PAYLOAD_FORMAT_INDICATOR,
        MESSAGE_EXPIRY_INTERVAL,
        CONTENT_TYPE,
        RESPONSE_TOPIC,
        CORRELATION_DATA,
        SUBSCRIPTION_IDENTIFIER,
        TOPIC_ALIAS,
        USER_PROPERTY,
    ],
    &[USER_PROPERTY, SUBSCRIPTION_IDENTIFIER],
);

/// PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and UNSUBACK.
pub(super) const ACK_PROPERTIES: PropertySet =
    PropertySet::new(&[REASON_STRING, USER_PROPERTY], &[USER_PROPERTY]);

/// SUBSCRIBE carries at most one subscription identifier.
pub(super) const SUBSCRIBE_PROPERTIES: PropertySet =
    PropertySet::new(&[SUBSCRIPTION_IDENTIFIER, USER_PROPERTY], &[USER_PROPERTY]);

pub(super) const UNSUBSCRIBE_PROPERTIES: PropertySet =
    PropertySet::new(&[USER_PROPERTY], &[USER_PROPERTY]);

pub(super) const DISCONNECT_PROPERTIES: PropertySet = PropertySet::new(
    &[
        SESSION_EXPIRY_INTERVAL,
        SERVER_REFERENCE,
        REASON_STRING,
        USER_PROPERTY,
    ],
    &[USER_PROPERTY],
);

pub(super) const AUTH_PROPERTIES: PropertySet = PropertySet::new(
    &[
        AUTHENTICATION_METHOD,
        AUTHENTICATION_DATA,
        REASON_STRING,
        USER_PROPERTY,
    ],
    &[USER_PROPERTY],
);

/// Read a property block: its variable-byte length, then the properties.
///
/// Design: inlined so that the common empty block builds `Properties::default()` in place; the
/// parsing of a non-empty block stays out of line.
#[inline]
pub(super) fn read_properties(
    reader: &mut Reader<'_>,
    set: PropertySet,
) -> Result<Properties, DecodeError> {
    match reader.varint()? {
        0 => Ok(Properties::default()),
        len => read_property_block(reader, len as usize, set),
    }
}

#[inline(never)]
fn read_property_block(
    reader: &mut Reader<'_>,
    len: usize,
    set: PropertySet,
) -> Result<Properties, DecodeError> {
    let mut properties = Properties::default();
    let mut block = reader.sub_reader(len)?;
    let mut seen = 0u64;
    while !block.is_empty() {
        // The identifier is formally a variable byte integer, but every defined one is a
        // single byte below 0x80; a first byte of 0x80 or more is therefore unknown anyway.
        let id = block.u8()?;
        if !set.allows(id) {
            return Err(DecodeError::InvalidProperty(id));
        }
        let bit = 1u64 << id;
        if seen & bit != 0 && set.repeatable & bit == 0 {
            return Err(DecodeError::InvalidProperty(id));
        }
        seen |= bit;
        read_property(&mut block, id, &mut properties)?;
    }
    Ok(properties)
}

fn read_property(
    block: &mut Reader<'_>,
    id: u8,
    properties: &mut Properties,
) -> Result<(), DecodeError> {
    let p = properties;
    match id {
        PAYLOAD_FORMAT_INDICATOR => p.payload_format_indicator = Some(zero_or_one(block, id)?),
        MESSAGE_EXPIRY_INTERVAL => p.message_expiry_interval = Some(block.u32()?),
        CONTENT_TYPE => p.content_type = Some(block.string()?),
        RESPONSE_TOPIC => {
            // The response topic is a topic name: no wildcards [MQTT-3.3.2-14].
            let topic = block.str()?;
            validate_topic_name(topic).map_err(|_| DecodeError::InvalidProperty(id))?;
            p.response_topic = Some(topic.to_owned());
        }
        CORRELATION_DATA => p.correlation_data = Some(block.binary()?),
        SUBSCRIPTION_IDENTIFIER => {
            // 0 is a protocol error (MQTT 5.0 §3.3.2.3.8).
            let value = block.varint()?;
            if value == 0 {
                return Err(DecodeError::InvalidProperty(id));
            }
            p.subscription_identifiers.push(value);
        }
        SESSION_EXPIRY_INTERVAL => p.session_expiry_interval = Some(block.u32()?),
        ASSIGNED_CLIENT_IDENTIFIER => p.assigned_client_identifier = Some(block.string()?),
        SERVER_KEEP_ALIVE => p.server_keep_alive = Some(block.u16()?),
        AUTHENTICATION_METHOD => p.authentication_method = Some(block.string()?),
        AUTHENTICATION_DATA => p.authentication_data = Some(block.binary()?),
        REQUEST_PROBLEM_INFORMATION => {
            p.request_problem_information = Some(zero_or_one(block, id)?);
        }
        WILL_DELAY_INTERVAL => p.will_delay_interval = Some(block.u32()?),
        REQUEST_RESPONSE_INFORMATION => {
            p.request_response_information = Some(zero_or_one(block, id)?);
        }
        RESPONSE_INFORMATION => p.response_information = Some(block.string()?),
        SERVER_REFERENCE => p.server_reference = Some(block.string()?),
        REASON_STRING => p.reason_string = Some(block.string()?),
        RECEIVE_MAXIMUM => p.receive_maximum = Some(non_zero_u16(block, id)?),
        TOPIC_ALIAS_MAXIMUM => p.topic_alias_maximum = Some(block.u16()?),
        TOPIC_ALIAS => p.topic_alias = Some(non_zero_u16(block, id)?),
        MAXIMUM_QOS => p.maximum_qos = Some(zero_or_one(block, id)?),
        RETAIN_AVAILABLE => p.retain_available = Some(zero_or_one(block, id)?),
        USER_PROPERTY => {
            let name = block.string()?;
            let value = block.string()?;
            p.user_properties.push((name, value));
        }
        MAXIMUM_PACKET_SIZE => {
            let value = block.u32()?;
            if value == 0 {
                return Err(DecodeError::InvalidProperty(id));
            }
            p.maximum_packet_size = Some(value);
        }
        WILDCARD_SUBSCRIPTION_AVAILABLE => {
            p.wildcard_subscription_available = Some(zero_or_one(block, id)?);
        }
        SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
            p.subscription_identifier_available = Some(zero_or_one(block, id)?);
        }
        SHARED_SUBSCRIPTION_AVAILABLE => {
            p.shared_subscription_available = Some(zero_or_one(block, id)?);
        }
        _ => return Err(DecodeError::InvalidProperty(id)),
    }
    Ok(())
}

/// A byte property that the spec limits to 0 or 1.
fn zero_or_one(block: &mut Reader<'_>, id: u8) -> Result<u8, DecodeError> {
    match block.u8()? {
        value @ (0 | 1) => Ok(value),
        _ => Err(DecodeError::InvalidProperty(id)),
    }
}

/// A two-byte property for which 0 is a protocol error.
fn non_zero_u16(block: &mut Reader<'_>, id: u8) -> Result<u16, DecodeError> {
    match block.u16()? {
        0 => Err(DecodeError::InvalidProperty(id)),
        value => Ok(value),
    }
}

/// Bytes that the properties of `set` in `properties` take, without the length prefix.
pub(super) fn properties_len(
    properties: &Properties,
    set: PropertySet,
) -> Result<usize, EncodeError> {
    let mut counter = Counter::default();
    write_property_list(&mut counter, properties, set)?;
    Ok(counter.0)
}

/// Append a property block: its length, then each property of `set` present in `properties`.
/// Properties the packet type may not carry are left out.
pub(super) fn write_properties<S: Sink>(
    out: &mut S,
    properties: &Properties,
    set: PropertySet,
) -> Result<(), EncodeError> {
    let len = properties_len(properties, set)?;
    write_properties_with_len(out, properties, set, len)
}

/// Append a property block whose length [`properties_len`] already gave.
pub(super) fn write_properties_with_len<S: Sink>(
    out: &mut S,
    properties: &Properties,
    set: PropertySet,
    len: usize,
) -> Result<(), EncodeError> {
    write_varint(out, len)?;
    if S::COUNTS_ONLY {
        out.skip(len);
        Ok(())
    } else if len == 0 {
        Ok(())
    } else {
        write_property_list(out, properties, set)
    }
}

fn write_property_list<S: Sink>(
    out: &mut S,
    p: &Properties,
    set: PropertySet,
) -> Result<(), EncodeError> {
    if p.is_empty() {
        return Ok(());
    }
    let mut w = PropertyWriter { out, set };
    w.byte(PAYLOAD_FORMAT_INDICATOR, p.payload_format_indicator);
    w.four(MESSAGE_EXPIRY_INTERVAL, p.message_expiry_interval);
    w.string(CONTENT_TYPE, p.content_type.as_deref())?;
    w.string(RESPONSE_TOPIC, p.response_topic.as_deref())?;
    w.binary(CORRELATION_DATA, p.correlation_data.as_deref())?;
    if w.set.allows(SUBSCRIPTION_IDENTIFIER) {
        for &identifier in &p.subscription_identifiers {
            if identifier == 0 || identifier > MAX_VARINT {
                return Err(EncodeError::InvalidValue("subscription identifier"));
            }
            w.out.write_u8(SUBSCRIPTION_IDENTIFIER);
            write_varint(w.out, identifier as usize)?;
        }
    }
    w.four(SESSION_EXPIRY_INTERVAL, p.session_expiry_interval);
    w.string(
        ASSIGNED_CLIENT_IDENTIFIER,
        p.assigned_client_identifier.as_deref(),
    )?;
    w.two(SERVER_KEEP_ALIVE, p.server_keep_alive);
    w.string(AUTHENTICATION_METHOD, p.authentication_method.as_deref())?;
    w.binary(AUTHENTICATION_DATA, p.authentication_data.as_deref())?;
    w.byte(REQUEST_PROBLEM_INFORMATION, p.request_problem_information);
    w.four(WILL_DELAY_INTERVAL, p.will_delay_interval);
    w.byte(REQUEST_RESPONSE_INFORMATION, p.request_response_information);
    w.string(RESPONSE_INFORMATION, p.response_information.as_deref())?;
    w.string(SERVER_REFERENCE, p.server_reference.as_deref())?;
    w.string(REASON_STRING, p.reason_string.as_deref())?;
    w.two(RECEIVE_MAXIMUM, p.receive_maximum);
    w.two(TOPIC_ALIAS_MAXIMUM, p.topic_alias_maximum);
    w.two(TOPIC_ALIAS, p.topic_alias);
    w.byte(MAXIMUM_QOS, p.maximum_qos);
    w.byte(RETAIN_AVAILABLE, p.retain_available);
    if w.set.allows(USER_PROPERTY) {
        for (name, value) in &p.user_properties {
            w.out.write_u8(USER_PROPERTY);
            write_str(w.out, name)?;
            write_str(w.out, value)?;
        }
    }
    w.four(MAXIMUM_PACKET_SIZE, p.maximum_packet_size);
    w.byte(
        WILDCARD_SUBSCRIPTION_AVAILABLE,
        p.wildcard_subscription_available,
    );
    w.byte(
        SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        p.subscription_identifier_available,
    );
    w.byte(
        SHARED_SUBSCRIPTION_AVAILABLE,
        p.shared_subscription_available,
    );
    Ok(())
}

/// Writes single-valued properties, skipping absent ones and ones `set` does not allow.
struct PropertyWriter<'a, S> {
    out: &'a mut S,
    set: PropertySet,
}

impl<S: Sink> PropertyWriter<'_, S> {
    fn byte(&mut self, id: u8, value: Option<u8>) {
        if let Some(value) = value.filter(|_| self.set.allows(id)) {
            self.out.write_u8(id);
            self.out.write_u8(value);
        }
    }

    fn two(&mut self, id: u8, value: Option<u16>) {
        if let Some(value) = value.filter(|_| self.set.allows(id)) {
            self.out.write_u8(id);
            self.out.write_u16(value);
        }
    }

    fn four(&mut self, id: u8, value: Option<u32>) {
        if let Some(value) = value.filter(|_| self.set.allows(id)) {
            self.out.write_u8(id);
            self.out.write_u32(value);
        }
    }

    fn string(&mut self, id: u8, value: Option<&str>) -> Result<(), EncodeError> {
        self.binary(id, value.map(str::as_bytes))
    }

    fn binary(&mut self, id: u8, value: Option<&[u8]>) -> Result<(), EncodeError> {
        if let Some(value) = value.filter(|_| self.set.allows(id)) {
            self.out.write_u8(id);
            write_binary(self.out, value)?;
        }
        Ok(())
    }
}

/// Whether the spec's rule "authentication data without an authentication method is a
/// protocol error" (MQTT 5.0 §3.1.2.11.10) is broken.
pub(super) fn has_data_without_method(properties: &Properties) -> bool {
    properties.authentication_data.is_some() && properties.authentication_method.is_none()
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};

    use super::*;

    fn read(bytes: &[u8], set: PropertySet) -> Result<Properties, DecodeError> {
        let owner = Bytes::copy_from_slice(bytes);
        let mut reader = Reader::over_bytes(&owner, 0);
        let properties = read_properties(&mut reader, set)?;
        reader.finish()?;
        Ok(properties)
    }

    #[test]
    fn publish_properties_decode() {
        let bytes = b"\x16\x01\x01\x02\x00\x00\x00\x3C\x0B\x05\x0B\x80\x01\x23\x00\x07\x26\x00\x01k\x00\x01v";
        let properties = read(bytes, PUBLISH_PROPERTIES).unwrap();
        assert_eq!(properties.payload_format_indicator, Some(1));
        assert_eq!(properties.message_expiry_interval, Some(60));
        assert_eq!(properties.subscription_identifiers, vec![5, 128]);
        assert_eq!(properties.topic_alias, Some(7));
        assert_eq!(properties.user_properties, vec![("k".into(), "v".into())]);
    }

    #[test]
    fn properties_outside_their_packet_are_refused() {
        // Topic alias in CONNECT.
        assert_eq!(
            read(b"\x03\x23\x00\x01", CONNECT_PROPERTIES),
            Err(DecodeError::InvalidProperty(0x23))
        );
        // Unknown id 0x7F, and an id with the variable-byte continuation bit.
        assert_eq!(
            read(b"\x02\x7F\x00", CONNECT_PROPERTIES),
            Err(DecodeError::InvalidProperty(0x7F))
        );
        assert_eq!(
            read(b"\x02\x81\x00", CONNECT_PROPERTIES),
            Err(DecodeError::InvalidProperty(0x81))
        );
    }

    #[test]
    fn single_valued_properties_may_not_repeat() {
        assert_eq!(
            read(b"\x06\x21\x00\x01\x21\x00\x02", CONNECT_PROPERTIES),
            Err(DecodeError::InvalidProperty(0x21))
        );
        assert_eq!(
            read(b"\x04\x0B\x01\x0B\x02", SUBSCRIBE_PROPERTIES),
            Err(DecodeError::InvalidProperty(0x0B))
        );
        let twice = read(
            b"\x0B\x26\x00\x01a\x00\x00\x26\x00\x00\x00\x00",
            ACK_PROPERTIES,
        )
        .unwrap();
        assert_eq!(
            twice.user_properties,
            vec![("a".into(), String::new()), (String::new(), String::new())]
        );
    }

    #[test]
    fn values_the_spec_forbids_are_refused() {
        let cases: &[(&[u8], PropertySet, u8)] = &[
            (b"\x03\x21\x00\x00", CONNECT_PROPERTIES, 0x21),
            (b"\x05\x27\x00\x00\x00\x00", CONNECT_PROPERTIES, 0x27),
            (b"\x02\x17\x02", CONNECT_PROPERTIES, 0x17),
            (b"\x02\x19\x02", CONNECT_PROPERTIES, 0x19),
            (b"\x02\x01\x02", PUBLISH_PROPERTIES, 0x01),
            (b"\x02\x0B\x00", PUBLISH_PROPERTIES, 0x0B),
            (b"\x03\x23\x00\x00", PUBLISH_PROPERTIES, 0x23),
            (b"\x04\x08\x00\x01#", PUBLISH_PROPERTIES, 0x08),
            (b"\x02\x24\x02", CONNACK_PROPERTIES, 0x24),
            (b"\x02\x25\x02", CONNACK_PROPERTIES, 0x25),
            (b"\x02\x28\x02", CONNACK_PROPERTIES, 0x28),
            (b"\x02\x29\x02", CONNACK_PROPERTIES, 0x29),
            (b"\x02\x2A\x02", CONNACK_PROPERTIES, 0x2A),
        ];
        for &(bytes, set, id) in cases {
            assert_eq!(
                read(bytes, set),
                Err(DecodeError::InvalidProperty(id)),
                "{bytes:02x?}"
            );
        }
    }

    #[test]
    fn a_property_running_past_its_block_is_malformed() {
        // Block length 2, but the u16 value needs 3 bytes with its id.
        assert!(matches!(
            read(b"\x02\x21\x00\x01", CONNECT_PROPERTIES),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn only_allowed_properties_are_written() {
        let properties = Properties {
            topic_alias: Some(3),
            reason_string: Some("r".into()),
            user_properties: vec![("a".into(), "b".into())],
            ..Properties::default()
        };
        let mut buf = BytesMut::new();
        write_properties(&mut buf, &properties, ACK_PROPERTIES).unwrap();
        assert_eq!(&buf[..], b"\x0B\x1F\x00\x01r\x26\x00\x01a\x00\x01b");
    }
}
