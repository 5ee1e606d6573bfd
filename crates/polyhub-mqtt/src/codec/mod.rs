//! Bytes ↔ [`Packet`].
//!
//! [`decode`] looks at the front of a buffer: with a whole packet there it removes those bytes
//! and returns the packet; with a partial packet it leaves the buffer alone and returns
//! `Ok(None)`. [`encode`] appends a packet to a buffer. Neither performs I/O.
//!
//! # Layout
//! - `header`: packet types, fixed-header flags, the remaining-length integer.
//! - `reader` / `writer`: MQTT's field types, bounds-checked; writing runs once into a byte
//!   counter and once into the buffer, so announced lengths always match.
//! - `properties`: MQTT 5 properties and which packet may carry which.
//! - `connect`, `publish`, `subscribe`, `control`: one module per packet family.
//!
//! # Strictness
//! Decoding follows the specs to the letter and refuses what they call malformed or a protocol
//! error, with three allowances for MQTT 3.1, whose spec is looser than its successors: DUP may
//! be set on PUBREL/SUBSCRIBE/UNSUBSCRIBE (3.1 retries set it) and on a QoS 0 PUBLISH, a
//! password may come without a user name, and CONNACK's first byte is ignored (3.1 has no
//! session-present flag). Variable byte integers must use their shortest form (MQTT 5.0
//! [MQTT-1.5.5-1]; no 3.x client sends anything else). Whatever [`encode`] writes, [`decode`]
//! accepts and returns unchanged, for every valid packet of every version.
//!
//! Design: the payload of a PUBLISH (and every binary field) is a slice of the read buffer, not
//! a copy; only the `String`s of the packet types allocate. Such a slice keeps the whole read
//! buffer allocation alive, so a consumer that stores a payload for long (retained messages,
//! offline queues) may prefer to copy it with `Bytes::copy_from_slice`.

mod connect;
mod control;
mod header;
mod properties;
mod publish;
mod reader;
mod subscribe;
mod writer;

#[cfg(test)]
mod tests;

use bytes::{Buf, BytesMut};

use self::header::{Varint, read_varint, varint_len};
use self::reader::Reader;
use self::writer::{Counter, Sink, write_varint};
use crate::error::{DecodeError, EncodeError};
use crate::packet::{Packet, ProtocolVersion, PublishRef};

/// Largest remaining length MQTT can express (four variable-byte digits).
pub const MAX_REMAINING_LENGTH: usize = header::MAX_VARINT as usize;

/// Decode one packet from the front of `buf`.
///
/// `version` is the protocol the connection speaks (CONNECT is self-describing and is decoded
/// whatever `version` says). `max_packet_size` bounds the whole packet, fixed header included;
/// a larger announced size fails at once with [`DecodeError::PacketTooLarge`], before the body
/// arrives.
///
/// Returns `Ok(None)`, with `buf` untouched, while the packet is incomplete. On success the
/// packet's bytes are removed from `buf`. After an error the connection cannot be resynchronised
/// and must be closed; whether the bad packet's bytes are still in `buf` is unspecified.
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some(&first_byte) = buf.first() else {
        return Ok(None);
    };
    header::check_first_byte(first_byte, version)?;
    let (remaining_len, header_len) = match read_varint(&buf[1..]) {
        Varint::Complete { value, len } => (value as usize, 1 + len),
        Varint::Incomplete => return Ok(None),
        Varint::Invalid => return Err(DecodeError::MalformedRemainingLength),
    };
    let size = header_len + remaining_len;
    if size > max_packet_size {
        return Err(DecodeError::PacketTooLarge {
            size,
            max: max_packet_size,
        });
    }
    if buf.len() < size {
        return Ok(None);
    }

    // Design: every arm builds the packet straight into the return value. `Packet` is large
    // (CONNECT carries two property sets), and each intermediate move would be a memcpy of it
    // on the hot path.
    match first_byte >> 4 {
        // Packets with binary fields are frozen so that those fields can share the buffer.
        header::CONNECT => {
            let frame = buf.split_to(size).freeze();
            let mut reader = Reader::over_bytes(&frame, header_len);
            Ok(Some(Packet::Connect(connect::read_connect(&mut reader)?)))
        }
        header::CONNACK => {
            let frame = buf.split_to(size).freeze();
            let mut reader = Reader::over_bytes(&frame, header_len);
            Ok(Some(Packet::ConnAck(connect::read_connack(
                &mut reader,
                version,
            )?)))
        }
        header::PUBLISH => {
            // A buffer that holds this packet and nothing else, with no room to spare, is
            // taken whole: freezing it needs no shared header allocation, which splitting
            // would (the common case of a reader that sizes its buffer to each read).
            let frame = if buf.len() == size && buf.capacity() == size {
                std::mem::take(buf).freeze()
            } else {
                buf.split_to(size).freeze()
            };
            publish::read_publish(frame, header_len, version)
        }
        header::AUTH => {
            let frame = buf.split_to(size).freeze();
            let mut reader = Reader::over_bytes(&frame, header_len);
            Ok(Some(Packet::Auth(control::read_auth(&mut reader)?)))
        }
        // The others are read in place and only then dropped from the buffer: no reference
        // counting on the acknowledgement path.
        packet_type => read_plain(buf, size, header_len, packet_type, version),
    }
}

/// Decode a packet that has no binary fields, in place, and only then drop it from `buf`.
///
/// Design: each arm advances `buf` itself and returns the packet directly, so that nothing as
/// large as a `Packet` is moved after it is built.
fn read_plain(
    buf: &mut BytesMut,
    size: usize,
    header_len: usize,
    packet_type: u8,
    version: ProtocolVersion,
) -> Result<Option<Packet>, DecodeError> {
    let reader = &mut Reader::new(&buf[..size], header_len);
    match packet_type {
        header::PUBACK | header::PUBREC | header::PUBREL | header::PUBCOMP => {
            let response = publish::read_pub_response(reader, packet_type, version)?;
            buf.advance(size);
            Ok(Some(match packet_type {
                header::PUBACK => Packet::PubAck(response),
                header::PUBREC => Packet::PubRec(response),
                header::PUBREL => Packet::PubRel(response),
                _ => Packet::PubComp(response),
            }))
        }
        header::SUBSCRIBE => {
            let subscribe = subscribe::read_subscribe(reader, version)?;
            buf.advance(size);
            Ok(Some(Packet::Subscribe(subscribe)))
        }
        header::SUBACK => {
            let suback = subscribe::read_suback(reader, version)?;
            buf.advance(size);
            Ok(Some(Packet::SubAck(suback)))
        }
        header::UNSUBSCRIBE => {
            let unsubscribe = subscribe::read_unsubscribe(reader, version)?;
            buf.advance(size);
            Ok(Some(Packet::Unsubscribe(unsubscribe)))
        }
        header::UNSUBACK => {
            let unsuback = subscribe::read_unsuback(reader, version)?;
            buf.advance(size);
            Ok(Some(Packet::UnsubAck(unsuback)))
        }
        header::PINGREQ => {
            reader.finish()?;
            buf.advance(size);
            Ok(Some(Packet::PingReq))
        }
        header::PINGRESP => {
            reader.finish()?;
            buf.advance(size);
            Ok(Some(Packet::PingResp))
        }
        header::DISCONNECT => {
            let disconnect = control::read_disconnect(reader, version)?;
            buf.advance(size);
            Ok(Some(Packet::Disconnect(disconnect)))
        }
        other => Err(DecodeError::InvalidPacketType(other)),
    }
}

/// Append the wire form of `packet`, as `version` codes it, to `buf`.
///
/// CONNECT is written in the version it names itself (`Connect::protocol`), as [`decode`] reads
/// it. Fields a version cannot carry are left out (properties and reason codes in 3.x, except
/// that a CONNACK reason maps to the nearest 3.x return code and a failed SUBACK code to 0x80),
/// and so are properties the packet type may not carry. Fails, leaving `buf` untouched, if a
/// field or the packet is too long, or for AUTH on 3.x.
pub fn encode(
    packet: &Packet,
    version: ProtocolVersion,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    let remaining_len = body_len(packet, version)?;
    // body_len() bounds the length, so it fits a u32.
    let header_len = 1 + varint_len(remaining_len as u32);
    buf.reserve(header_len + remaining_len);
    buf.write_u8(header::first_byte(packet));
    write_varint(buf, remaining_len)?;
    write_body(buf, packet, version)
}

/// Append the wire form of a borrowed PUBLISH to `buf`: the same bytes [`encode`] writes for
/// the equivalent [`Packet::Publish`], without an owned packet (the broker's delivery path).
/// Fails, leaving `buf` untouched, if a field or the packet is too long.
pub fn encode_publish(
    publish: &PublishRef<'_>,
    version: ProtocolVersion,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    let mut counter = Counter::default();
    publish::write_publish(&mut counter, publish, version)?;
    let remaining_len = counter.0;
    if remaining_len > MAX_REMAINING_LENGTH {
        return Err(EncodeError::PacketTooLarge);
    }
    // Bounded above, so it fits a u32.
    let header_len = 1 + varint_len(remaining_len as u32);
    buf.reserve(header_len + remaining_len);
    buf.write_u8(publish::publish_first_byte(publish));
    write_varint(buf, remaining_len)?;
    publish::write_publish(buf, publish, version)
}

/// Bytes [`encode`] would append for `packet`: fixed header included, so comparable with a
/// peer's maximum packet size.
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> Result<usize, EncodeError> {
    let remaining_len = body_len(packet, version)?;
    Ok(1 + varint_len(remaining_len as u32) + remaining_len)
}

/// The remaining length of `packet`, checked against MQTT's limit.
fn body_len(packet: &Packet, version: ProtocolVersion) -> Result<usize, EncodeError> {
    let mut counter = Counter::default();
    write_body(&mut counter, packet, version)?;
    if counter.0 > MAX_REMAINING_LENGTH {
        return Err(EncodeError::PacketTooLarge);
    }
    Ok(counter.0)
}

fn write_body<S: Sink>(
    out: &mut S,
    packet: &Packet,
    version: ProtocolVersion,
) -> Result<(), EncodeError> {
    match packet {
        Packet::Connect(connect) => connect::write_connect(out, connect),
        Packet::ConnAck(connack) => connect::write_connack(out, connack, version),
        Packet::Publish(publish) => {
            publish::write_publish(out, &PublishRef::from(publish), version)
        }
        Packet::PubAck(response)
        | Packet::PubRec(response)
        | Packet::PubRel(response)
        | Packet::PubComp(response) => publish::write_pub_response(out, response, version),
        Packet::Subscribe(subscribe) => subscribe::write_subscribe(out, subscribe, version),
        Packet::SubAck(suback) => subscribe::write_suback(out, suback, version),
        Packet::Unsubscribe(unsubscribe) => subscribe::write_unsubscribe(out, unsubscribe, version),
        Packet::UnsubAck(unsuback) => subscribe::write_unsuback(out, unsuback, version),
        Packet::PingReq | Packet::PingResp => Ok(()),
        Packet::Disconnect(disconnect) => control::write_disconnect(out, disconnect, version),
        Packet::Auth(auth) => control::write_auth(out, auth, version),
    }
}
