//! Bytes ↔ [`Packet`].
//!
//! [`decode`] looks at the front of a buffer: with a whole packet there it removes those bytes
//! and returns the packet; with a partial packet it leaves the buffer alone and returns
//! `Ok(None)`. [`encode`] appends a packet to a buffer. Neither performs I/O.

use bytes::BytesMut;

use crate::error::{DecodeError, EncodeError};
use crate::packet::{Packet, ProtocolVersion};

/// Decode one packet from the front of `buf`.
///
/// `version` is the protocol the connection speaks (CONNECT is self-describing and is decoded
/// whatever `version` says). `max_packet_size` bounds the whole packet, fixed header included;
/// a larger announced size fails at once with [`DecodeError::PacketTooLarge`], before the body
/// arrives.
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let _ = (buf, version, max_packet_size);
    Err(DecodeError::Malformed("decoder not implemented yet"))
}

/// Append the wire form of `packet`, as `version` codes it, to `buf`.
pub fn encode(
    packet: &Packet,
    version: ProtocolVersion,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    let _ = (packet, version, buf);
    Err(EncodeError::PacketTooLarge)
}
