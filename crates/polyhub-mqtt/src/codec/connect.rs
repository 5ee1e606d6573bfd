//! CONNECT and CONNACK (MQTT 3.1 §3.1–3.2, 3.1.1 §3.1–3.2, 5.0 §3.1–3.2).

use super::properties::{
    CONNACK_PROPERTIES, CONNECT_PROPERTIES, WILL_PROPERTIES, has_data_without_method,
    read_properties, write_properties,
};
use super::reader::Reader;
use super::writer::{Sink, write_binary, write_str};
use crate::error::{DecodeError, EncodeError};
use crate::packet::{ConnAck, Connect, LastWill, Properties, ProtocolVersion, QoS};
use crate::reason::ReasonCode;
use crate::topic::validate_topic_name;

const USERNAME_FLAG: u8 = 0x80;
const PASSWORD_FLAG: u8 = 0x40;
const WILL_RETAIN_FLAG: u8 = 0x20;
const WILL_QOS_SHIFT: u8 = 3;
const WILL_FLAG: u8 = 0x04;
const CLEAN_START_FLAG: u8 = 0x02;
const RESERVED_CONNECT_FLAG: u8 = 0x01;
const SESSION_PRESENT_FLAG: u8 = 0x01;

/// The protocol name each version announces.
fn protocol_name(version: ProtocolVersion) -> &'static [u8] {
    match version {
        ProtocolVersion::V31 => b"MQIsdp",
        ProtocolVersion::V311 | ProtocolVersion::V5 => b"MQTT",
    }
}

/// Decode a CONNECT body. The packet names its own protocol version.
pub(super) fn read_connect(reader: &mut Reader<'_>) -> Result<Connect, DecodeError> {
    let name = reader.length_prefixed()?;
    let level = reader.u8()?;
    // The level is reported before anything else is checked, so that the server can answer
    // "unsupported protocol version" even when the rest means something else in that version.
    let protocol = match (name, level) {
        (b"MQIsdp", 3) => ProtocolVersion::V31,
        (b"MQTT", 4) => ProtocolVersion::V311,
        (b"MQTT", 5) => ProtocolVersion::V5,
        (b"MQIsdp" | b"MQTT", level) => return Err(DecodeError::UnsupportedProtocolLevel(level)),
        _ => return Err(DecodeError::InvalidProtocolName),
    };

    let flags = reader.u8()?;
    if flags & RESERVED_CONNECT_FLAG != 0 {
        return Err(DecodeError::Malformed("reserved CONNECT flag set"));
    }
    let has_will = flags & WILL_FLAG != 0;
    let will_qos = QoS::from_u8((flags >> WILL_QOS_SHIFT) & 0b11).ok_or(DecodeError::InvalidQoS)?;
    let will_retain = flags & WILL_RETAIN_FLAG != 0;
    if !has_will && (will_qos != QoS::AtMostOnce || will_retain) {
        return Err(DecodeError::Malformed(
            "will QoS or retain set without a will",
        ));
    }
    let has_username = flags & USERNAME_FLAG != 0;
    let has_password = flags & PASSWORD_FLAG != 0;
    // [MQTT-3.1.2-22] in 3.1.1 only: MQTT 5 allows a password alone, and MQTT 3.1 does not
    // say, so we accept it there.
    if protocol == ProtocolVersion::V311 && has_password && !has_username {
        return Err(DecodeError::ProtocolError("password without a user name"));
    }
    let keep_alive = reader.u16()?;
    let properties = if protocol.is_v5() {
        let properties = read_properties(reader, CONNECT_PROPERTIES)?;
        if has_data_without_method(&properties) {
            return Err(DecodeError::InvalidProperty(0x16));
        }
        properties
    } else {
        Properties::default()
    };

    let client_id = reader.string()?;
    let will = if has_will {
        let properties = if protocol.is_v5() {
            read_properties(reader, WILL_PROPERTIES)?
        } else {
            Properties::default()
        };
        let topic = reader.str()?;
        validate_topic_name(topic).map_err(|_| DecodeError::InvalidTopicName)?;
        Some(LastWill {
            topic: topic.to_owned(),
            payload: reader.binary()?,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(reader.string()?)
    } else {
        None
    };
    let password = if has_password {
        Some(reader.binary()?)
    } else {
        None
    };
    reader.finish()?;
    Ok(Connect {
        protocol,
        clean_start: flags & CLEAN_START_FLAG != 0,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

/// Encode a CONNECT body in the version the packet itself names.
pub(super) fn write_connect<S: Sink>(out: &mut S, connect: &Connect) -> Result<(), EncodeError> {
    let protocol = connect.protocol;
    write_binary(out, protocol_name(protocol))?;
    out.write_u8(protocol.level());
    let mut flags = 0;
    if connect.username.is_some() {
        flags |= USERNAME_FLAG;
    }
    if connect.password.is_some() {
        flags |= PASSWORD_FLAG;
    }
    if let Some(will) = &connect.will {
        flags |= WILL_FLAG | ((will.qos as u8) << WILL_QOS_SHIFT);
        if will.retain {
            flags |= WILL_RETAIN_FLAG;
        }
    }
    if connect.clean_start {
        flags |= CLEAN_START_FLAG;
    }
    out.write_u8(flags);
    out.write_u16(connect.keep_alive);
    if protocol.is_v5() {
        write_properties(out, &connect.properties, CONNECT_PROPERTIES)?;
    }
    write_str(out, &connect.client_id)?;
    if let Some(will) = &connect.will {
        if protocol.is_v5() {
            write_properties(out, &will.properties, WILL_PROPERTIES)?;
        }
        write_str(out, &will.topic)?;
        write_binary(out, &will.payload)?;
    }
    if let Some(username) = &connect.username {
        write_str(out, username)?;
    }
    if let Some(password) = &connect.password {
        write_binary(out, password)?;
    }
    Ok(())
}

/// CONNACK reason codes of MQTT 5.0 §3.2.2.2.
fn is_connack_reason(code: u8) -> bool {
    matches!(
        code,
        0x00 | 0x80..=0x8A | 0x8C | 0x90 | 0x95 | 0x97 | 0x99..=0x9D | 0x9F
    )
}

/// Decode a CONNACK body.
pub(super) fn read_connack(
    reader: &mut Reader<'_>,
    version: ProtocolVersion,
) -> Result<ConnAck, DecodeError> {
    let flags = reader.u8()?;
    let code = reader.u8()?;
    // MQTT 3.1 has no session-present flag: its first byte is "reserved, not used".
    let session_present = match version {
        ProtocolVersion::V31 => false,
        ProtocolVersion::V311 | ProtocolVersion::V5 => {
            if flags & !SESSION_PRESENT_FLAG != 0 {
                return Err(DecodeError::Malformed("reserved CONNACK flags set"));
            }
            flags & SESSION_PRESENT_FLAG != 0
        }
    };
    let (reason_code, properties) = if version.is_v5() {
        if !is_connack_reason(code) {
            return Err(DecodeError::InvalidReasonCode(code));
        }
        (
            ReasonCode(code),
            read_properties(reader, CONNACK_PROPERTIES)?,
        )
    } else {
        let reason =
            ReasonCode::from_v3_connack(code).ok_or(DecodeError::InvalidReasonCode(code))?;
        (reason, Properties::default())
    };
    // [MQTT-3.2.2-4] (3.1.1) and [MQTT-3.2.2-6] (5.0).
    if session_present && reason_code.is_error() {
        return Err(DecodeError::ProtocolError(
            "session present on a refused connection",
        ));
    }
    reader.finish()?;
    Ok(ConnAck {
        session_present,
        reason_code,
        properties,
    })
}

/// Encode a CONNACK body; 3.x return codes come from [`ReasonCode::to_v3_connack`].
pub(super) fn write_connack<S: Sink>(
    out: &mut S,
    connack: &ConnAck,
    version: ProtocolVersion,
) -> Result<(), EncodeError> {
    let session_present = connack.session_present && version != ProtocolVersion::V31;
    out.write_u8(if session_present {
        SESSION_PRESENT_FLAG
    } else {
        0
    });
    if version.is_v5() {
        out.write_u8(connack.reason_code.0);
        write_properties(out, &connack.properties, CONNACK_PROPERTIES)?;
    } else {
        out.write_u8(connack.reason_code.to_v3_connack());
    }
    Ok(())
}
