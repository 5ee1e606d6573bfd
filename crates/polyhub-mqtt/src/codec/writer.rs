//! Writing MQTT's field types, to a buffer or to a byte counter.
//!
//! Design: every packet body is written by one generic function run twice, first into a
//! [`Counter`] to learn the remaining length (and catch over-long fields before anything is
//! written), then into the real buffer. One code path for both means the announced length can
//! never disagree with the bytes that follow it.

use bytes::{BufMut, BytesMut};

use super::header::MAX_VARINT;
use crate::error::EncodeError;

/// Where encoded bytes go.
pub(super) trait Sink {
    /// Whether this sink only counts, so that callers may add a length they already know
    /// instead of writing the bytes again.
    const COUNTS_ONLY: bool = false;

    /// Account for `len` bytes without producing them; only called when `COUNTS_ONLY`.
    fn skip(&mut self, len: usize) {
        let _ = len;
    }

    /// Append one byte.
    fn write_u8(&mut self, value: u8);
    /// Append a big-endian two-byte integer.
    fn write_u16(&mut self, value: u16);
    /// Append a big-endian four-byte integer.
    fn write_u32(&mut self, value: u32);
    /// Append raw bytes.
    fn write_slice(&mut self, bytes: &[u8]);
}

/// A sink that only counts bytes.
#[derive(Debug, Default)]
pub(super) struct Counter(pub(super) usize);

impl Sink for Counter {
    const COUNTS_ONLY: bool = true;

    fn skip(&mut self, len: usize) {
        self.0 += len;
    }

    fn write_u8(&mut self, _: u8) {
        self.0 += 1;
    }
    fn write_u16(&mut self, _: u16) {
        self.0 += 2;
    }
    fn write_u32(&mut self, _: u32) {
        self.0 += 4;
    }
    fn write_slice(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }
}

impl Sink for BytesMut {
    fn write_u8(&mut self, value: u8) {
        self.put_u8(value);
    }
    fn write_u16(&mut self, value: u16) {
        self.put_u16(value);
    }
    fn write_u32(&mut self, value: u32) {
        self.put_u32(value);
    }
    fn write_slice(&mut self, bytes: &[u8]) {
        self.put_slice(bytes);
    }
}

/// Append a variable byte integer.
pub(super) fn write_varint<S: Sink>(out: &mut S, value: usize) -> Result<(), EncodeError> {
    let mut value = u32::try_from(value)
        .ok()
        .filter(|&value| value <= MAX_VARINT)
        .ok_or(EncodeError::PacketTooLarge)?;
    loop {
        let byte = (value & 0x7F) as u8;
        value >>= 7;
        if value == 0 {
            out.write_u8(byte);
            return Ok(());
        }
        out.write_u8(byte | 0x80);
    }
}

/// Append a two-byte length and `bytes` (binary data, MQTT 5.0 §1.5.6).
pub(super) fn write_binary<S: Sink>(out: &mut S, bytes: &[u8]) -> Result<(), EncodeError> {
    let len = u16::try_from(bytes.len()).map_err(|_| EncodeError::FieldTooLong)?;
    out.write_u16(len);
    out.write_slice(bytes);
    Ok(())
}

/// Append a UTF-8 encoded string.
pub(super) fn write_str<S: Sink>(out: &mut S, text: &str) -> Result<(), EncodeError> {
    write_binary(out, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_use_the_fewest_bytes() {
        for (value, expected) in [
            (0usize, &[0x00][..]),
            (127, &[0x7F]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xFF, 0x7F]),
            (16_384, &[0x80, 0x80, 0x01]),
            (268_435_455, &[0xFF, 0xFF, 0xFF, 0x7F]),
        ] {
            let mut buf = BytesMut::new();
            write_varint(&mut buf, value).unwrap();
            assert_eq!(&buf[..], expected);
        }
        let mut buf = BytesMut::new();
        assert_eq!(
            write_varint(&mut buf, 268_435_456),
            Err(EncodeError::PacketTooLarge)
        );
    }

    #[test]
    fn long_fields_are_refused() {
        let mut counter = Counter::default();
        assert_eq!(write_str(&mut counter, &"a".repeat(65_535)), Ok(()));
        assert_eq!(counter.0, 65_537);
        assert_eq!(
            write_binary(&mut counter, &[0; 65_536]),
            Err(EncodeError::FieldTooLong)
        );
    }
}
