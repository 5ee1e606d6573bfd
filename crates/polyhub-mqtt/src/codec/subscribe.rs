//! SUBSCRIBE, SUBACK, UNSUBSCRIBE and UNSUBACK (MQTT 3.1.1 §3.8–3.11, 5.0 §3.8–3.11).

use super::properties::{
    ACK_PROPERTIES, SUBSCRIBE_PROPERTIES, UNSUBSCRIBE_PROPERTIES, read_properties, write_properties,
};
use super::publish::non_zero_packet_id;
use super::reader::Reader;
use super::writer::{Sink, write_str};
use crate::error::{DecodeError, EncodeError};
use crate::packet::{
    Properties, ProtocolVersion, QoS, RetainHandling, SubAck, Subscribe, SubscribeFilter,
    SubscriptionOptions, UnsubAck, Unsubscribe,
};
use crate::reason::ReasonCode;
use crate::topic::{parse_shared, validate_topic_filter};

const QOS_BITS: u8 = 0b0000_0011;
const NO_LOCAL: u8 = 0b0000_0100;
const RETAIN_AS_PUBLISHED: u8 = 0b0000_1000;
const RETAIN_HANDLING_SHIFT: u8 = 4;
const RETAIN_HANDLING_BITS: u8 = 0b0011_0000;

/// The only failure code MQTT 3.1.1 knows in SUBACK.
const V3_SUBACK_FAILURE: u8 = 0x80;

fn read_filter<'a>(reader: &mut Reader<'a>) -> Result<&'a str, DecodeError> {
    let filter = reader.str()?;
    validate_topic_filter(filter).map_err(|_| DecodeError::InvalidTopicFilter)?;
    Ok(filter)
}

/// Decode the subscription options byte (MQTT 5.0 §3.8.3.1; in 3.x only the QoS bits exist
/// and the other six are reserved).
fn read_options(byte: u8, version: ProtocolVersion) -> Result<SubscriptionOptions, DecodeError> {
    let reserved = if version.is_v5() {
        0b1100_0000
    } else {
        !QOS_BITS
    };
    if byte & reserved != 0 {
        return Err(DecodeError::Malformed(
            "reserved subscription option bits set",
        ));
    }
    let qos = QoS::from_u8(byte & QOS_BITS).ok_or(DecodeError::InvalidQoS)?;
    let retain_handling = match (byte & RETAIN_HANDLING_BITS) >> RETAIN_HANDLING_SHIFT {
        0 => RetainHandling::SendAtSubscribe,
        1 => RetainHandling::SendIfNewSubscription,
        2 => RetainHandling::DoNotSend,
        _ => return Err(DecodeError::ProtocolError("retain handling 3")),
    };
    Ok(SubscriptionOptions {
        qos,
        no_local: byte & NO_LOCAL != 0,
        retain_as_published: byte & RETAIN_AS_PUBLISHED != 0,
        retain_handling,
    })
}

fn options_byte(options: &SubscriptionOptions, version: ProtocolVersion) -> u8 {
    let mut byte = options.qos as u8;
    if version.is_v5() {
        if options.no_local {
            byte |= NO_LOCAL;
        }
        if options.retain_as_published {
            byte |= RETAIN_AS_PUBLISHED;
        }
        byte |= (options.retain_handling as u8) << RETAIN_HANDLING_SHIFT;
    }
    byte
}

/// Decode a SUBSCRIBE body.
pub(super) fn read_subscribe(
    reader: &mut Reader<'_>,
    version: ProtocolVersion,
) -> Result<Subscribe, DecodeError> {
    let packet_id = non_zero_packet_id(reader)?;
    let properties = if version.is_v5() {
        read_properties(reader, SUBSCRIBE_PROPERTIES)?
    } else {
        Properties::default()
    };
    let mut filters = Vec::new();
    while !reader.is_empty() {
        let filter = read_filter(reader)?;
        let options = read_options(reader.u8()?, version)?;
        // [MQTT-3.8.3-4]: no local makes no sense for a shared subscription.
        if options.no_local && matches!(parse_shared(filter), Ok(Some(_))) {
            return Err(DecodeError::ProtocolError(
                "no local on a shared subscription",
            ));
        }
        filters.push(SubscribeFilter {
            filter: filter.to_owned(),
            options,
        });
    }
    if filters.is_empty() {
        return Err(DecodeError::ProtocolError(
            "SUBSCRIBE without topic filters",
        ));
    }
    Ok(Subscribe {
        packet_id,
        filters,
        properties,
    })
}

/// Encode a SUBSCRIBE body.
pub(super) fn write_subscribe<S: Sink>(
    out: &mut S,
    subscribe: &Subscribe,
    version: ProtocolVersion,
) -> Result<(), EncodeError> {
    out.write_u16(subscribe.packet_id);
    if version.is_v5() {
        write_properties(out, &subscribe.properties, SUBSCRIBE_PROPERTIES)?;
    }
    for filter in &subscribe.filters {
        write_str(out, &filter.filter)?;
        out.write_u8(options_byte(&filter.options, version));
    }
    Ok(())
}

/// Whether `code` may appear in a SUBACK of `version`.
fn is_suback_reason(code: u8, version: ProtocolVersion) -> bool {
    if version.is_v5() {
        // MQTT 5.0 §3.9.3.
        matches!(
            code,
            0x00 | 0x01 | 0x02 | 0x80 | 0x83 | 0x87 | 0x8F | 0x91 | 0x97 | 0x9E | 0xA1 | 0xA2
        )
    } else {
        // MQTT 3.1 had no failure code, but brokers send 0x80 to 3.1 clients too.
        matches!(code, 0x00 | 0x01 | 0x02 | V3_SUBACK_FAILURE)
    }
}

/// Decode a SUBACK body.
pub(super) fn read_suback(
    reader: &mut Reader<'_>,
    version: ProtocolVersion,
) -> Result<SubAck, DecodeError> {
    let packet_id = non_zero_packet_id(reader)?;
    let properties = if version.is_v5() {
        read_properties(reader, ACK_PROPERTIES)?
    } else {
        Properties::default()
    };
    let codes = reader.take(reader.remaining())?;
    if codes.is_empty() {
        return Err(DecodeError::ProtocolError("SUBACK without reason codes"));
    }
    let mut reason_codes = Vec::with_capacity(codes.len());
    for &code in codes {
        if !is_suback_reason(code, version) {
            return Err(DecodeError::InvalidReasonCode(code));
        }
        reason_codes.push(ReasonCode(code));
    }
    Ok(SubAck {
        packet_id,
        reason_codes,
        properties,
    })
}

/// Encode a SUBACK body. For 3.x every failure code becomes 0x80, the only one 3.x has.
pub(super) fn write_suback<S: Sink>(
    out: &mut S,
    suback: &SubAck,
    version: ProtocolVersion,
) -> Result<(), EncodeError> {
    out.write_u16(suback.packet_id);
    if version.is_v5() {
        write_properties(out, &suback.properties, ACK_PROPERTIES)?;
    }
    for &code in &suback.reason_codes {
        let byte = if !version.is_v5() && code.is_error() {
            V3_SUBACK_FAILURE
        } else {
            code.0
        };
        out.write_u8(byte);
    }
    Ok(())
}

/// Decode an UNSUBSCRIBE body.
pub(super) fn read_unsubscribe(
    reader: &mut Reader<'_>,
    version: ProtocolVersion,
) -> Result<Unsubscribe, DecodeError> {
    let packet_id = non_zero_packet_id(reader)?;
    let properties = if version.is_v5() {
        read_properties(reader, UNSUBSCRIBE_PROPERTIES)?
    } else {
        Properties::default()
    };
    let mut filters = Vec::new();
    while !reader.is_empty() {
        filters.push(read_filter(reader)?.to_owned());
    }
    if filters.is_empty() {
        return Err(DecodeError::ProtocolError(
            "UNSUBSCRIBE without topic filters",
        ));
    }
    Ok(Unsubscribe {
        packet_id,
        filters,
        properties,
    })
}

/// Encode an UNSUBSCRIBE body.
pub(super) fn write_unsubscribe<S: Sink>(
    out: &mut S,
    unsubscribe: &Unsubscribe,
    version: ProtocolVersion,
) -> Result<(), EncodeError> {
    out.write_u16(unsubscribe.packet_id);
    if version.is_v5() {
        write_properties(out, &unsubscribe.properties, UNSUBSCRIBE_PROPERTIES)?;
    }
    for filter in &unsubscribe.filters {
        write_str(out, filter)?;
    }
    Ok(())
}

/// UNSUBACK reason codes of MQTT 5.0 §3.11.3.
fn is_unsuback_reason(code: u8) -> bool {
    matches!(code, 0x00 | 0x11 | 0x80 | 0x83 | 0x87 | 0x8F | 0x91)
}

/// Decode an UNSUBACK body: 3.x carries only the packet identifier.
pub(super) fn read_unsuback(
    reader: &mut Reader<'_>,
    version: ProtocolVersion,
) -> Result<UnsubAck, DecodeError> {
    let packet_id = non_zero_packet_id(reader)?;
    if !version.is_v5() {
        reader.finish()?;
        return Ok(UnsubAck {
            packet_id,
            reason_codes: Vec::new(),
            properties: Properties::default(),
        });
    }
    let properties = read_properties(reader, ACK_PROPERTIES)?;
    let codes = reader.take(reader.remaining())?;
    if codes.is_empty() {
        return Err(DecodeError::ProtocolError("UNSUBACK without reason codes"));
    }
    let mut reason_codes = Vec::with_capacity(codes.len());
    for &code in codes {
        if !is_unsuback_reason(code) {
            return Err(DecodeError::InvalidReasonCode(code));
        }
        reason_codes.push(ReasonCode(code));
    }
    Ok(UnsubAck {
        packet_id,
        reason_codes,
        properties,
    })
}

/// Encode an UNSUBACK body.
pub(super) fn write_unsuback<S: Sink>(
    out: &mut S,
    unsuback: &UnsubAck,
    version: ProtocolVersion,
) -> Result<(), EncodeError> {
    out.write_u16(unsuback.packet_id);
    if version.is_v5() {
        write_properties(out, &unsuback.properties, ACK_PROPERTIES)?;
        for code in &unsuback.reason_codes {
            out.write_u8(code.0);
        }
    }
    Ok(())
}
