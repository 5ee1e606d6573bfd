//! DISCONNECT and AUTH (MQTT 5.0 §3.14–3.15): a reason code and properties, both of which may
//! be left off the wire. PINGREQ and PINGRESP need no code of their own: their body is empty.

use super::properties::{
    AUTH_PROPERTIES, DISCONNECT_PROPERTIES, PropertySet, properties_len, read_properties,
    write_properties_with_len,
};
use super::reader::Reader;
use super::writer::Sink;
use crate::error::{DecodeError, EncodeError};
use crate::packet::{Auth, Disconnect, Properties, ProtocolVersion};
use crate::reason::ReasonCode;

/// DISCONNECT reason codes of MQTT 5.0 §3.14.2.1.
fn is_disconnect_reason(code: u8) -> bool {
    matches!(
        code,
        0x00 | 0x04 | 0x80..=0x83 | 0x87 | 0x89 | 0x8B | 0x8D..=0x90 | 0x93..=0xA2
    )
}

/// AUTH reason codes of MQTT 5.0 §3.15.2.1.
fn is_auth_reason(code: u8) -> bool {
    matches!(code, 0x00 | 0x18 | 0x19)
}

/// Read "reason code, then properties", where a missing reason code means 0x00 and missing
/// properties mean none.
fn read_reason_and_properties(
    reader: &mut Reader<'_>,
    is_allowed: fn(u8) -> bool,
    set: PropertySet,
) -> Result<(ReasonCode, Properties), DecodeError> {
    let mut reason = ReasonCode::SUCCESS;
    let mut properties = Properties::default();
    if !reader.is_empty() {
        let code = reader.u8()?;
        if !is_allowed(code) {
            return Err(DecodeError::InvalidReasonCode(code));
        }
        reason = ReasonCode(code);
        if !reader.is_empty() {
            properties = read_properties(reader, set)?;
        }
    }
    reader.finish()?;
    Ok((reason, properties))
}

/// Decode a DISCONNECT body; in 3.x it is empty.
pub(super) fn read_disconnect(
    reader: &mut Reader<'_>,
    version: ProtocolVersion,
) -> Result<Disconnect, DecodeError> {
    if !version.is_v5() {
        reader.finish()?;
        return Ok(Disconnect::with_reason(ReasonCode::NORMAL_DISCONNECTION));
    }
    let (reason_code, properties) =
        read_reason_and_properties(reader, is_disconnect_reason, DISCONNECT_PROPERTIES)?;
    Ok(Disconnect {
        reason_code,
        properties,
    })
}

/// Encode a DISCONNECT body: nothing in 3.x; in 5.0 the shortest form that carries it
/// (MQTT 5.0 §3.14.2.1 and §3.14.2.2.1 allow dropping the properties, then the reason).
pub(super) fn write_disconnect<S: Sink>(
    out: &mut S,
    disconnect: &Disconnect,
    version: ProtocolVersion,
) -> Result<(), EncodeError> {
    if !version.is_v5() {
        return Ok(());
    }
    let len = properties_len(&disconnect.properties, DISCONNECT_PROPERTIES)?;
    if len == 0 && disconnect.reason_code == ReasonCode::NORMAL_DISCONNECTION {
        return Ok(());
    }
    out.write_u8(disconnect.reason_code.0);
    if len > 0 {
        write_properties_with_len(out, &disconnect.properties, DISCONNECT_PROPERTIES, len)?;
    }
    Ok(())
}

/// Decode an AUTH body (the caller has refused AUTH on 3.x connections).
///
/// A body holding only the reason code is accepted, as for DISCONNECT: the spec only names the
/// empty short form for AUTH, but a reason without properties is unambiguous.
pub(super) fn read_auth(reader: &mut Reader<'_>) -> Result<Auth, DecodeError> {
    let (reason_code, properties) =
        read_reason_and_properties(reader, is_auth_reason, AUTH_PROPERTIES)?;
    Ok(Auth {
        reason_code,
        properties,
    })
}

/// Encode an AUTH body: empty for success without properties (MQTT 5.0 §3.15.2.1), otherwise
/// the reason code and a property block, which is always written because the spec only
/// defines the fully empty short form.
pub(super) fn write_auth<S: Sink>(
    out: &mut S,
    auth: &Auth,
    version: ProtocolVersion,
) -> Result<(), EncodeError> {
    if !version.is_v5() {
        return Err(EncodeError::NotInVersion(super::header::AUTH));
    }
    let len = properties_len(&auth.properties, AUTH_PROPERTIES)?;
    if len == 0 && auth.reason_code == ReasonCode::SUCCESS {
        return Ok(());
    }
    out.write_u8(auth.reason_code.0);
    write_properties_with_len(out, &auth.properties, AUTH_PROPERTIES, len)
}
