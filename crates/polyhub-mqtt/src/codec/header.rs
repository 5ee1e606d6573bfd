//! The fixed header: packet type, flag bits and the remaining-length variable byte integer
//! (MQTT 3.1.1 §2.2, MQTT 5.0 §2.1 and §1.5.5).

use crate::error::DecodeError;
use crate::packet::{Packet, ProtocolVersion, QoS};

pub(super) const CONNECT: u8 = 1;
pub(super) const CONNACK: u8 = 2;
pub(super) const PUBLISH: u8 = 3;
pub(super) const PUBACK: u8 = 4;
pub(super) const PUBREC: u8 = 5;
pub(super) const PUBREL: u8 = 6;
pub(super) const PUBCOMP: u8 = 7;
pub(super) const SUBSCRIBE: u8 = 8;
pub(super) const SUBACK: u8 = 9;
pub(super) const UNSUBSCRIBE: u8 = 10;
pub(super) const UNSUBACK: u8 = 11;
pub(super) const PINGREQ: u8 = 12;
pub(super) const PINGRESP: u8 = 13;
pub(super) const DISCONNECT: u8 = 14;
pub(super) const AUTH: u8 = 15;

/// Largest value a variable byte integer can carry (four bytes of seven bits).
pub(super) const MAX_VARINT: u32 = 268_435_455;

/// PUBLISH flag bits of the first byte.
pub(super) const PUBLISH_DUP: u8 = 0b1000;
pub(super) const PUBLISH_RETAIN: u8 = 0b0001;

/// The flags PUBREL, SUBSCRIBE and UNSUBSCRIBE must carry: QoS 1 in MQTT 3.1 terms.
const QOS1_FLAGS: u8 = 0b0010;

/// Check the first byte of a packet: a known type, allowed in `version`, with the flag bits the
/// spec requires.
///
/// Design: this runs before the body has arrived, so a client that sends garbage is refused at
/// its first byte instead of after we have buffered up to the maximum packet size.
pub(super) fn check_first_byte(byte: u8, version: ProtocolVersion) -> Result<(), DecodeError> {
    let packet_type = byte >> 4;
    let flags = byte & 0x0F;
    let flags_ok = match packet_type {
        0 => return Err(DecodeError::InvalidPacketType(0)),
        AUTH if !version.is_v5() => return Err(DecodeError::InvalidPacketType(AUTH)),
        PUBLISH => return check_publish_flags(flags, version),
        // MQTT 3.1 sets DUP on a retried PUBREL, SUBSCRIBE or UNSUBSCRIBE (3.1 §2.1); 3.1.1
        // made that bit reserved.
        PUBREL | SUBSCRIBE | UNSUBSCRIBE if version == ProtocolVersion::V31 => {
            flags & !PUBLISH_DUP == QOS1_FLAGS
        }
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => flags == QOS1_FLAGS,
        _ => flags == 0,
    };
    if flags_ok {
        Ok(())
    } else {
        Err(DecodeError::InvalidFlags { packet_type, flags })
    }
}

fn check_publish_flags(flags: u8, version: ProtocolVersion) -> Result<(), DecodeError> {
    let qos = (flags >> 1) & 0b11;
    if qos == 3 {
        return Err(DecodeError::InvalidQoS);
    }
    // MQTT 3.1.1 [MQTT-3.3.1-2] and 5.0 [MQTT-3.3.1-2]; 3.1 only says DUP is meaningless at
    // QoS 0, so 3.1 clients get the benefit of the doubt.
    if qos == 0 && flags & PUBLISH_DUP != 0 && version != ProtocolVersion::V31 {
        return Err(DecodeError::Malformed("DUP set on a QoS 0 PUBLISH"));
    }
    Ok(())
}

/// The first byte that `packet` is sent with.
pub(super) fn first_byte(packet: &Packet) -> u8 {
    let flags = match packet {
        Packet::Publish(publish) => {
            let mut flags = (publish.qos as u8) << 1;
            if publish.dup {
                flags |= PUBLISH_DUP;
            }
            if publish.retain {
                flags |= PUBLISH_RETAIN;
            }
            flags
        }
        Packet::PubRel(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) => QOS1_FLAGS,
        _ => 0,
    };
    (packet.packet_type() << 4) | flags
}

/// The QoS encoded in a PUBLISH first byte that [`check_first_byte`] accepted.
pub(super) fn publish_qos(first_byte: u8) -> QoS {
    QoS::from_u8((first_byte >> 1) & 0b11).unwrap_or_default()
}

/// Outcome of reading a variable byte integer from the front of a slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Varint {
    /// The value and how many bytes encoded it.
    Complete { value: u32, len: usize },
    /// The slice ends before the last byte of the integer.
    Incomplete,
    /// More than four bytes, or a longer encoding than the value needs.
    Invalid,
}

/// Read a variable byte integer (MQTT 5.0 §1.5.5).
///
/// Non-minimal encodings such as `0x80 0x00` are refused: MQTT 5.0 requires the minimum number
/// of bytes [MQTT-1.5.5-1], no 3.x implementation produces anything else, and accepting them
/// would let two different byte strings mean the same packet.
pub(super) fn read_varint(bytes: &[u8]) -> Varint {
    let mut value = 0u32;
    for index in 0..4 {
        let Some(&byte) = bytes.get(index) else {
            return Varint::Incomplete;
        };
        value |= u32::from(byte & 0x7F) << (7 * index);
        if byte & 0x80 == 0 {
            if index > 0 && byte == 0 {
                return Varint::Invalid;
            }
            return Varint::Complete {
                value,
                len: index + 1,
            };
        }
    }
    Varint::Invalid
}

/// Bytes needed to encode `value` as a variable byte integer.
pub(super) fn varint_len(value: u32) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_boundaries_from_the_spec_table() {
        // MQTT 5.0 §1.5.5, table 1-1.
        let cases: &[(&[u8], u32)] = &[
            (&[0x00], 0),
            (&[0x7F], 127),
            (&[0x80, 0x01], 128),
            (&[0xFF, 0x7F], 16_383),
            (&[0x80, 0x80, 0x01], 16_384),
            (&[0xFF, 0xFF, 0x7F], 2_097_151),
            (&[0x80, 0x80, 0x80, 0x01], 2_097_152),
            (&[0xFF, 0xFF, 0xFF, 0x7F], 268_435_455),
        ];
        for &(bytes, value) in cases {
            assert_eq!(
                read_varint(bytes),
                Varint::Complete {
                    value,
                    len: bytes.len()
                },
                "{bytes:02x?}"
            );
            assert_eq!(varint_len(value), bytes.len());
        }
    }

    #[test]
    fn varint_rejects_five_bytes_and_overlong_forms() {
        assert_eq!(
            read_varint(&[0xFF, 0xFF, 0xFF, 0xFF, 0x7F]),
            Varint::Invalid
        );
        assert_eq!(
            read_varint(&[0x80, 0x80, 0x80, 0x80, 0x01]),
            Varint::Invalid
        );
        assert_eq!(read_varint(&[0x80, 0x00]), Varint::Invalid);
        assert_eq!(read_varint(&[0xFF, 0x80, 0x00]), Varint::Invalid);
    }

    #[test]
    fn varint_waits_for_its_last_byte() {
        assert_eq!(read_varint(&[]), Varint::Incomplete);
        assert_eq!(read_varint(&[0x80]), Varint::Incomplete);
        assert_eq!(read_varint(&[0xFF, 0xFF, 0xFF]), Varint::Incomplete);
    }

    #[test]
    fn reserved_flags_are_checked_per_type() {
        use ProtocolVersion::*;
        for version in [V31, V311, V5] {
            assert_eq!(check_first_byte(0x62, version), Ok(()));
            assert_eq!(check_first_byte(0x82, version), Ok(()));
            assert_eq!(check_first_byte(0xA2, version), Ok(()));
            assert_eq!(
                check_first_byte(0x60, version),
                Err(DecodeError::InvalidFlags {
                    packet_type: 6,
                    flags: 0
                })
            );
            assert_eq!(
                check_first_byte(0x41, version),
                Err(DecodeError::InvalidFlags {
                    packet_type: 4,
                    flags: 1
                })
            );
            assert_eq!(
                check_first_byte(0x36, version),
                Err(DecodeError::InvalidQoS)
            );
            assert_eq!(
                check_first_byte(0x00, version),
                Err(DecodeError::InvalidPacketType(0))
            );
        }
        assert_eq!(check_first_byte(0x8A, V31), Ok(()));
        assert!(check_first_byte(0x8A, V311).is_err());
        assert_eq!(check_first_byte(0x38, V31), Ok(()));
        assert!(check_first_byte(0x38, V311).is_err());
        assert_eq!(check_first_byte(0xF0, V5), Ok(()));
        assert_eq!(
            check_first_byte(0xF0, V311),
            Err(DecodeError::InvalidPacketType(15))
        );
    }
}
