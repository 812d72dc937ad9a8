//! The protobuf wire format, as far as the hand-written messages need it: sizing
//! and writing fields with one-byte keys ([`Out`]), and reading fields from one
//! contiguous message ([`In`]).

use std::fmt;

use prost::bytes::BytesMut;
use prost::encoding::encoded_len_varint;

/// Bytes of a length-delimited field with a one-byte key, left out when empty.
pub(crate) fn bytes_field_len(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        1 + encoded_len_varint(len as u64) + len
    }
}

/// Bytes of a varint field with a one-byte key, left out when zero.
pub(crate) fn varint_field_len(value: u64) -> usize {
    if value == 0 {
        0
    } else {
        1 + encoded_len_varint(value)
    }
}

pub(crate) fn header_len(key: &str, value: &str) -> usize {
    bytes_field_len(key.len()) + bytes_field_len(value.len())
}

/// Bytes of a message field (one-byte key) holding `len` bytes; written even when
/// empty.
pub(crate) fn message_field_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

/// Bytes of a `Header` field.
pub(crate) fn header_field_len(key: &str, value: &str) -> usize {
    message_field_len(header_len(key, value))
}

// A `Header`'s field keys.
const HEADER_KEY: u8 = 1 << 3 | 2;
const HEADER_VALUE: u8 = 2 << 3 | 2;

/// A cursor over a zeroed region sized exactly for what is written into it.
pub(crate) struct Out<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Out<'_> {
    /// Appends a message field with `key` holding `len` bytes to `buf`, zeroed, and
    /// returns a cursor over it with the key and length written: what follows must
    /// fill it exactly ([`Out::finish`] checks).
    pub(crate) fn append(buf: &mut BytesMut, key: u8, len: usize) -> Out<'_> {
        let start = buf.len();
        buf.resize(start + message_field_len(len), 0);
        let mut out = Out {
            buf: &mut buf[start..],
            at: 0,
        };
        out.byte(key);
        out.varint(len as u64);
        out
    }

    /// Writes a `Header` field with `field_key`.
    pub(crate) fn header(&mut self, field_key: u8, key: &str, value: &str) {
        self.byte(field_key);
        self.varint(header_len(key, value) as u64);
        self.bytes_field(HEADER_KEY, key.as_bytes());
        self.bytes_field(HEADER_VALUE, value.as_bytes());
    }

    /// Checks that the field was filled exactly: a size computed wrong would leave
    /// zeroes (or panic on the way).
    pub(crate) fn finish(self, what: &str) {
        assert_eq!(self.at, self.buf.len(), "{what}'s size was computed wrong");
    }

    pub(crate) fn byte(&mut self, byte: u8) {
        self.buf[self.at] = byte;
        self.at += 1;
    }

    pub(crate) fn varint(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.byte(value as u8 | 0x80);
            value >>= 7;
        }
        self.byte(value as u8);
    }

    pub(crate) fn varint_field(&mut self, key: u8, value: u64) {
        if value != 0 {
            self.byte(key);
            self.varint(value);
        }
    }

    pub(crate) fn bytes_field(&mut self, key: u8, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.byte(key);
            self.varint(bytes.len() as u64);
            self.buf[self.at..self.at + bytes.len()].copy_from_slice(bytes);
            self.at += bytes.len();
        }
    }
}

/// A message that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError(pub(crate) &'static str);

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed message: {}", self.0)
    }
}

impl std::error::Error for WireError {}

// Wire types.
pub(crate) const VARINT: u8 = 0;
pub(crate) const FIXED64: u8 = 1;
pub(crate) const LEN: u8 = 2;
pub(crate) const START_GROUP: u8 = 3;
pub(crate) const END_GROUP: u8 = 4;
pub(crate) const FIXED32: u8 = 5;

/// prost's recursion limit: in a top-level message, fields may sit at most this
/// deep, counting each level of message and each unknown group around them.
pub(crate) const RECURSION_LIMIT: u32 = 100;

/// A cursor reading fields from one whole message held in a slice.
#[derive(Debug)]
pub(crate) struct In<'a> {
    buf: &'a [u8],
    at: usize,
    /// What is left of [`RECURSION_LIMIT`] at this message's level.
    depth: u32,
}

impl<'a> In<'a> {
    /// A top-level message.
    pub(crate) fn new(buf: &'a [u8]) -> In<'a> {
        In {
            buf,
            at: 0,
            depth: RECURSION_LIMIT,
        }
    }

    /// A message nested in this one: one level less to spend on groups.
    pub(crate) fn nested(&self, range: std::ops::Range<usize>) -> In<'a> {
        In {
            buf: &self.buf[range],
            at: 0,
            depth: self.depth.saturating_sub(1),
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        self.at == self.buf.len()
    }

    /// A varint. One byte (field keys, most lengths, small numbers) is read inline;
    /// longer ones in [`In::long_varint`].
    #[inline]
    pub(crate) fn varint(&mut self) -> Result<u64, WireError> {
        if let Some(&byte) = self.buf.get(self.at)
            && byte < 0x80
        {
            self.at += 1;
            return Ok(u64::from(byte));
        }
        self.long_varint()
    }

    #[inline(never)]
    fn long_varint(&mut self) -> Result<u64, WireError> {
        let mut value = 0u64;
        for i in 0..10 {
            let Some(&byte) = self.buf.get(self.at) else {
                return Err(WireError("truncated varint"));
            };
            self.at += 1;
            // The tenth byte holds the top bit only.
            if i == 9 && byte > 1 {
                return Err(WireError("varint overflows 64 bits"));
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                return Ok(value);
            }
        }
        unreachable!("the tenth byte ends the varint or fails")
    }

    /// The next field's number and wire type.
    pub(crate) fn key(&mut self) -> Result<(u32, u8), WireError> {
        let key = self.varint()?;
        if key > u64::from(u32::MAX) {
            return Err(WireError("field key out of range"));
        }
        let (field, wire_type) = ((key >> 3) as u32, (key & 7) as u8);
        if field == 0 {
            return Err(WireError("field number 0"));
        }
        Ok((field, wire_type))
    }

    /// A length-delimited field's value: where it is in the slice.
    pub(crate) fn len_delimited(&mut self) -> Result<std::ops::Range<usize>, WireError> {
        let len = self.varint()?;
        let remaining = (self.buf.len() - self.at) as u64;
        if len > remaining {
            return Err(WireError("length past the end of the message"));
        }
        let start = self.at;
        self.at += len as usize;
        Ok(start..self.at)
    }

    /// Steps over an unknown field's value. Groups (deprecated, but prost skips
    /// them too) are stepped over whole, nested ones included, without recursion;
    /// as in prost, a field inside as many groups as the message has depth left is
    /// an error.
    pub(crate) fn skip(&mut self, field: u32, wire_type: u8) -> Result<(), WireError> {
        let mut open_groups: Vec<u32> = Vec::new();
        let (mut field, mut wire_type) = (field, wire_type);
        loop {
            if wire_type != END_GROUP && open_groups.len() as u32 >= self.depth {
                return Err(WireError("nested too deep (recursion limit)"));
            }
            match wire_type {
                VARINT => {
                    self.varint()?;
                }
                LEN => {
                    self.len_delimited()?;
                }
                FIXED64 | FIXED32 => {
                    let width = if wire_type == FIXED64 { 8 } else { 4 };
                    if self.buf.len() - self.at < width {
                        return Err(WireError("truncated fixed-width field"));
                    }
                    self.at += width;
                }
                START_GROUP => open_groups.push(field),
                END_GROUP => {
                    if open_groups.pop() != Some(field) {
                        return Err(WireError("unmatched end of group"));
                    }
                }
                _ => return Err(WireError("invalid wire type")),
            }
            if open_groups.is_empty() {
                return Ok(());
            }
            (field, wire_type) = self.key()?;
        }
    }

    /// The bytes at `range` of this message.
    pub(crate) fn slice(&self, range: std::ops::Range<usize>) -> &'a [u8] {
        &self.buf[range]
    }

    /// Expects `wire_type` for a known field.
    pub(crate) fn expect(wire_type: u8, wanted: u8) -> Result<(), WireError> {
        if wire_type == wanted {
            Ok(())
        } else {
            Err(WireError("a known field has the wrong wire type"))
        }
    }
}

/// Hand-made message bytes for the readers' tests.
#[cfg(test)]
pub(crate) mod test_bytes {
    /// A length-delimited field: `key`, then `body` with its length.
    pub(crate) fn field(key: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![key];
        prost::encoding::encode_varint(body.len() as u64, &mut out);
        out.extend_from_slice(body);
        out
    }

    /// Field 1 (the topic of a record or a delivery) once for each of `names`.
    pub(crate) fn topics(names: &[&[u8]]) -> Vec<u8> {
        names
            .iter()
            .flat_map(|name| field(1 << 3 | 2, name))
            .collect()
    }

    /// Topic fields with a name that is not UTF-8 first, last and between good ones:
    /// prost refuses each, wherever the bad one is.
    pub(crate) const WITH_A_BAD_NAME: [&[&[u8]]; 3] = [
        &[b"\xff", b"g.1"],
        &[b"g.1", b"\xff"],
        &[b"g.1", b"\xff", b"g.1"],
    ];
}
