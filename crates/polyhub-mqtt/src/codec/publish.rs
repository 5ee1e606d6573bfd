//! PUBLISH and its acknowledgements PUBACK, PUBREC, PUBREL, PUBCOMP (MQTT 3.1.1 §3.3–3.7,
//! 5.0 §3.3–3.7).

use bytes::{Buf, Bytes};

use super::header::{
    PUBACK, PUBCOMP, PUBLISH, PUBLISH_DUP, PUBLISH_RETAIN, PUBREC, PUBREL, publish_qos,
};
use super::properties::{
    ACK_PROPERTIES, PUBLISH_PROPERTIES, properties_len, read_properties, write_properties_with_len,
};
use super::reader::Reader;
use super::writer::{Sink, write_str};
use crate::error::{DecodeError, EncodeError};
use crate::packet::{Packet, Properties, ProtocolVersion, PubResponse, Publish, PublishRef, QoS};
use crate::reason::ReasonCode;
use crate::topic::validate_topic_name;

/// Decode a whole PUBLISH packet (`frame`, fixed header included; the header was checked).
///
/// The payload is `frame` itself, advanced past the variable header: no copy and no extra
/// reference count. The packet is built straight into the return value, as `decode` returns
/// it, to spare the hot path a move of the large `Packet`.
#[inline]
pub(super) fn read_publish(
    mut frame: Bytes,
    header_len: usize,
    version: ProtocolVersion,
) -> Result<Option<Packet>, DecodeError> {
    let first_byte = frame[0];
    let qos = publish_qos(first_byte);
    let mut reader = Reader::over_bytes(&frame, header_len);
    let topic = reader.str()?;
    // In MQTT 5 an empty topic stands for the topic alias the properties carry; the broker
    // resolves (and polices) aliases.
    let alias_only = version.is_v5() && topic.is_empty();
    if !(alias_only || is_plain_topic_name(topic)) {
        validate_topic_name(topic).map_err(|_| DecodeError::InvalidTopicName)?;
    }
    let topic = topic.to_owned();
    let packet_id = if qos == QoS::AtMostOnce {
        0
    } else {
        non_zero_packet_id(&mut reader)?
    };
    let properties = if version.is_v5() {
        read_properties(&mut reader, PUBLISH_PROPERTIES)?
    } else {
        Properties::default()
    };
    let payload_start = reader.position();
    frame.advance(payload_start);
    Ok(Some(Packet::Publish(Publish {
        dup: first_byte & PUBLISH_DUP != 0,
        qos,
        retain: first_byte & PUBLISH_RETAIN != 0,
        topic,
        packet_id,
        payload: frame,
        properties,
    })))
}

/// Fast path for the common topic name: not empty and free of wildcards, in one vectorisable
/// pass. The reader has already refused NUL and the 16-bit length caps the size, so such a
/// topic satisfies every rule of MQTT 3.1.1/5.0 §4.7.3; anything else goes to
/// [`validate_topic_name`], which stays the authority (a test checks the two agree).
pub(super) fn is_plain_topic_name(topic: &str) -> bool {
    let wildcards = topic
        .bytes()
        .fold(false, |found, byte| found | (byte == b'+') | (byte == b'#'));
    !topic.is_empty() && !wildcards
}

/// Encode a PUBLISH body (the flags live in the fixed header).
pub(super) fn write_publish<S: Sink>(
    out: &mut S,
    publish: &PublishRef<'_>,
    version: ProtocolVersion,
) -> Result<(), EncodeError> {
    write_str(out, publish.topic)?;
    if publish.qos != QoS::AtMostOnce {
        out.write_u16(publish.packet_id);
    }
    if version.is_v5() {
        match publish.properties {
            Some(properties) => {
                let len = properties_len(properties, PUBLISH_PROPERTIES)?;
                write_properties_with_len(out, properties, PUBLISH_PROPERTIES, len)?;
            }
            // An empty property list is its length alone.
            None => out.write_u8(0),
        }
    }
    out.write_slice(publish.payload);
    Ok(())
}

/// The first byte of a PUBLISH: type and flags.
pub(super) fn publish_first_byte(publish: &PublishRef<'_>) -> u8 {
    let mut flags = (publish.qos as u8) << 1;
    if publish.dup {
        flags |= PUBLISH_DUP;
    }
    if publish.retain {
        flags |= PUBLISH_RETAIN;
    }
    (PUBLISH << 4) | flags
}

/// A packet identifier, which is never 0 [MQTT-2.3.1-1].
pub(super) fn non_zero_packet_id(reader: &mut Reader<'_>) -> Result<u16, DecodeError> {
    match reader.u16()? {
        0 => Err(DecodeError::ZeroPacketId),
        id => Ok(id),
    }
}

/// Whether `code` is a reason code MQTT 5.0 allows in this acknowledgement type.
fn is_pub_response_reason(packet_type: u8, code: u8) -> bool {
    match packet_type {
        // §3.4.2.1 and §3.5.2.1.
        PUBACK | PUBREC => matches!(
            code,
            0x00 | 0x10 | 0x80 | 0x83 | 0x87 | 0x90 | 0x91 | 0x97 | 0x99
        ),
        // §3.6.2.1 and §3.7.2.1.
        PUBREL | PUBCOMP => matches!(code, 0x00 | 0x92),
        _ => false,
    }
}

/// Decode a PUBACK, PUBREC, PUBREL or PUBCOMP body.
///
/// MQTT 5 lets the sender drop trailing fields: two bytes mean success without properties,
/// three bytes a reason code without properties.
#[inline(always)]
pub(super) fn read_pub_response(
    reader: &mut Reader<'_>,
    packet_type: u8,
    version: ProtocolVersion,
) -> Result<PubResponse, DecodeError> {
    let packet_id = non_zero_packet_id(reader)?;
    let mut response = PubResponse::success(packet_id);
    if version.is_v5() && !reader.is_empty() {
        let code = reader.u8()?;
        if !is_pub_response_reason(packet_type, code) {
            return Err(DecodeError::InvalidReasonCode(code));
        }
        response.reason_code = ReasonCode(code);
        if !reader.is_empty() {
            response.properties = read_properties(reader, ACK_PROPERTIES)?;
        }
    }
    reader.finish()?;
    Ok(response)
}

/// Encode a PUBACK, PUBREC, PUBREL or PUBCOMP body, in the shortest form that carries it.
pub(super) fn write_pub_response<S: Sink>(
    out: &mut S,
    response: &PubResponse,
    version: ProtocolVersion,
) -> Result<(), EncodeError> {
    out.write_u16(response.packet_id);
    if !version.is_v5() {
        return Ok(());
    }
    let len = properties_len(&response.properties, ACK_PROPERTIES)?;
    if len == 0 && response.reason_code == ReasonCode::SUCCESS {
        return Ok(());
    }
    out.write_u8(response.reason_code.0);
    if len > 0 {
        write_properties_with_len(out, &response.properties, ACK_PROPERTIES, len)?;
    }
    Ok(())
}
