//! Bounds-checked reading of MQTT's field types (integers, variable byte integers, UTF-8
//! strings, binary data) from one complete packet.

use bytes::Bytes;

use super::header::{Varint, read_varint};
use crate::error::DecodeError;

/// A field runs past the end of the packet (or of its property block).
pub(super) const TRUNCATED: DecodeError =
    DecodeError::Malformed("a field runs past the end of the packet");

/// A cursor over one complete packet.
///
/// Design: reading happens on a plain slice so that packets without binary fields never touch
/// a reference count. When the packet has been frozen into `Bytes`, `owner` is that `Bytes` and
/// `data` a prefix of it, so binary fields become zero-copy sub-slices of the read buffer.
pub(super) struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    owner: Option<&'a Bytes>,
}

impl<'a> Reader<'a> {
    /// A reader over `data`, starting at `pos` (just after the fixed header).
    pub(super) fn new(data: &'a [u8], pos: usize) -> Reader<'a> {
        Reader {
            data,
            pos,
            owner: None,
        }
    }

    /// A reader over `owner`, whose binary fields are sliced out of it without copying.
    pub(super) fn over_bytes(owner: &'a Bytes, pos: usize) -> Reader<'a> {
        Reader {
            data: owner,
            pos,
            owner: Some(owner),
        }
    }

    /// Offset of the next unread byte from the start of the packet.
    pub(super) fn position(&self) -> usize {
        self.pos
    }

    /// Bytes left to read.
    pub(super) fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    /// Whether every byte has been read.
    pub(super) fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    /// Fail unless every byte has been read.
    pub(super) fn finish(&self) -> Result<(), DecodeError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed(
                "bytes left over after the packet's fields",
            ))
        }
    }

    /// The next `len` bytes.
    pub(super) fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(len).ok_or(TRUNCATED)?;
        let slice = self.data.get(self.pos..end).ok_or(TRUNCATED)?;
        self.pos = end;
        Ok(slice)
    }

    /// A reader over the next `len` bytes only (a property block), which this reader skips.
    pub(super) fn sub_reader(&mut self, len: usize) -> Result<Reader<'a>, DecodeError> {
        let start = self.pos;
        self.take(len)?;
        Ok(Reader {
            data: &self.data[..self.pos],
            pos: start,
            owner: self.owner,
        })
    }

    /// One byte.
    pub(super) fn u8(&mut self) -> Result<u8, DecodeError> {
        let byte = *self.data.get(self.pos).ok_or(TRUNCATED)?;
        self.pos += 1;
        Ok(byte)
    }

    /// A big-endian two-byte integer.
    pub(super) fn u16(&mut self) -> Result<u16, DecodeError> {
        let bytes = self.take(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    /// A big-endian four-byte integer.
    pub(super) fn u32(&mut self) -> Result<u32, DecodeError> {
        let bytes = self.take(4)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// A variable byte integer.
    pub(super) fn varint(&mut self) -> Result<u32, DecodeError> {
        match read_varint(&self.data[self.pos..]) {
            Varint::Complete { value, len } => {
                self.pos += len;
                Ok(value)
            }
            Varint::Incomplete => Err(TRUNCATED),
            Varint::Invalid => Err(DecodeError::Malformed("invalid variable byte integer")),
        }
    }

    /// A two-byte length followed by that many bytes.
    pub(super) fn length_prefixed(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    /// A UTF-8 encoded string, borrowed from the packet.
    ///
    /// `str::from_utf8` already refuses surrogates (U+D800..U+DFFF) and overlong forms, as the
    /// spec requires [MQTT-1.5.4-1]; U+0000 is refused here [MQTT-1.5.4-2].
    pub(super) fn str(&mut self) -> Result<&'a str, DecodeError> {
        let bytes = self.length_prefixed()?;
        // Design: a fold without early exit vectorises; for the short strings of MQTT it beats
        // `memchr`, whose setup costs more than the scan.
        if bytes.iter().fold(false, |found, &byte| found | (byte == 0)) {
            return Err(DecodeError::InvalidUtf8);
        }
        std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8)
    }

    /// A UTF-8 encoded string, owned.
    pub(super) fn string(&mut self) -> Result<String, DecodeError> {
        self.str().map(str::to_owned)
    }

    /// Binary data: a slice of the read buffer when the packet was frozen.
    pub(super) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let start = self.pos;
        let bytes = self.length_prefixed()?;
        Ok(match self.owner {
            Some(owner) => owner.slice(start + 2..self.pos),
            // Only packets without binary fields are read without an owner; copying keeps
            // this path correct should that ever change.
            None => Bytes::copy_from_slice(bytes),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_refuse_nul_and_invalid_utf8() {
        assert_eq!(Reader::new(b"\x00\x02ab", 0).str(), Ok("ab"));
        assert_eq!(
            Reader::new(b"\x00\x02a\x00", 0).str(),
            Err(DecodeError::InvalidUtf8)
        );
        assert_eq!(
            Reader::new(b"\x00\x02\xC3\x28", 0).str(),
            Err(DecodeError::InvalidUtf8)
        );
        // U+D800 as CESU-style UTF-8.
        assert_eq!(
            Reader::new(b"\x00\x03\xED\xA0\x80", 0).str(),
            Err(DecodeError::InvalidUtf8)
        );
        assert_eq!(Reader::new(b"\x00\x03ab", 0).str(), Err(TRUNCATED));
    }

    #[test]
    fn binary_is_sliced_from_the_owner() {
        let owner = Bytes::from_static(b"xx\x00\x03abc!");
        let mut reader = Reader::over_bytes(&owner, 2);
        let data = reader.binary().unwrap();
        assert_eq!(&data[..], b"abc");
        assert_eq!(data.as_ptr(), owner[4..].as_ptr());
        assert_eq!(reader.remaining(), 1);
        assert!(reader.finish().is_err());
    }

    #[test]
    fn sub_reader_is_bounded() {
        let mut reader = Reader::new(b"\x01\x02\x03\x04", 0);
        let mut sub = reader.sub_reader(2).unwrap();
        assert_eq!(sub.u16(), Ok(0x0102));
        assert_eq!(sub.u8(), Err(TRUNCATED));
        assert_eq!(reader.u16(), Ok(0x0304));
        assert!(reader.sub_reader(1).is_err());
    }
}
