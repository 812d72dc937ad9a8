//! The record frame: how one record is laid out in a segment.
//!
//! ```text
//! byte  size  field
//!    0     4  crc32       CRC-32 (IEEE, as crc32fast computes it) of bytes 4..frame_len
//!    4     4  frame_len   bytes from byte 0 to the end of the payload (padding excluded)
//!    8     1  magic       RECORD_MAGIC (format version 1 of the frame)
//!    9     1  flags       bit 0: last record of its batch
//!   10     2  topic_len
//!   12     2  headers_len bytes of encoded headers
//!   14     2  reserved    zero
//!   16     8  offset      the record's offset within its topic
//!   24     8  epoch       the topic's epoch when the record was written
//!   32     8  timestamp   milliseconds since the Unix epoch, assigned on append
//!   40     8  prev_pos    log position of the topic's record `offset - 1` (or NO_POSITION)
//!   48     8  skip_pos    log position of the topic's record `offset & (offset - 1)`
//!   56     …  topic bytes, header bytes, payload bytes
//! ```
//! Frames start at 8-byte aligned positions; the bytes up to the next multiple of 8
//! are zero. All integers are little-endian. A header is encoded as
//! `key_len: u8, key, value_len: u16, value`.

use bytes::Bytes;

/// A topic name that is cheap to clone (held inline, or if long shared by the
/// records of one topic in a publish request), from the wire to the live tail.
/// Reads as a `&str`.
pub use switchyard_proto::Topic;

/// Magic byte of a version-1 record frame.
pub const RECORD_MAGIC: u8 = 0xA1;
/// Size of the fixed part of a frame.
pub const FRAME_HEADER_LEN: usize = 56;
/// Frames start at multiples of this many bytes.
pub const FRAME_ALIGN: usize = 8;
/// A pointer field that points nowhere.
pub const NO_POSITION: u64 = u64::MAX;
/// Flag bit: this record closes its batch (recovery keeps batches whole).
pub const FLAG_BATCH_END: u8 = 1;

/// Most headers one record may carry.
pub const MAX_HEADERS: usize = 32;
/// Longest header key, in bytes.
pub const MAX_HEADER_KEY_BYTES: usize = 64;
/// Longest header value, in bytes.
pub const MAX_HEADER_VALUE_BYTES: usize = 1024;

/// A small string header (e.g. `type`, `channel_id`): what filters read cheaply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub key: String,
    pub value: String,
}

impl Header {
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Header {
            key: key.into(),
            value: value.into(),
        }
    }
}

/// A record as a producer hands it to the log; offset, epoch and timestamp are
/// assigned on append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRecord {
    pub topic: Topic,
    pub headers: Vec<Header>,
    /// Opaque bytes (JSON from the chat API), stored and returned untouched.
    pub payload: Bytes,
}

impl NewRecord {
    pub fn new(topic: impl Into<Topic>, payload: impl Into<Bytes>) -> Self {
        NewRecord {
            topic: topic.into(),
            headers: Vec::new(),
            payload: payload.into(),
        }
    }

    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push(Header::new(key, value));
        self
    }
}

/// A stored record, as returned by reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub offset: u64,
    pub epoch: u64,
    pub timestamp_ms: u64,
    pub headers: Vec<Header>,
    pub payload: Bytes,
}

/// The fields of a frame that are not its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameMeta {
    pub flags: u8,
    pub offset: u64,
    pub epoch: u64,
    pub timestamp_ms: u64,
    pub prev_pos: u64,
    pub skip_pos: u64,
}

/// Why bytes could not be decoded as a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Zero bytes where a frame would start: the clean end of a segment's data.
    #[error("end of data")]
    End,
    #[error("frame needs {needed} bytes but only {available} remain")]
    Truncated { needed: usize, available: usize },
    #[error("bad frame magic {found:#04x}")]
    BadMagic { found: u8 },
    #[error("frame length {len} is impossible")]
    BadLength { len: usize },
    #[error("checksum mismatch: computed {got:#010x}, stored {expected:#010x}")]
    ChecksumMismatch { got: u32, expected: u32 },
    #[error("frame fields are inconsistent: {what}")]
    BadLayout { what: &'static str },
}

/// Bytes the headers take once encoded.
pub fn headers_encoded_len(headers: &[Header]) -> usize {
    headers
        .iter()
        .map(|h| 1 + h.key.len() + 2 + h.value.len())
        .sum()
}

/// Unpadded frame length for the given content sizes.
pub fn frame_len(topic_len: usize, headers_len: usize, payload_len: usize) -> usize {
    FRAME_HEADER_LEN + topic_len + headers_len + payload_len
}

/// Frame length rounded up to the alignment: the space a frame takes in a segment.
pub fn padded_len(frame_len: usize) -> usize {
    frame_len.next_multiple_of(FRAME_ALIGN)
}

/// Encodes one frame at the start of `out`, which must hold
/// `padded_len(frame_len(..))` bytes. Returns the padded length written.
///
/// The caller has validated the sizes (topic ≤ 65535, headers within limits).
pub fn encode_frame(
    out: &mut [u8],
    meta: &FrameMeta,
    topic: &[u8],
    headers: &[Header],
    payload: &[u8],
) -> usize {
    let headers_len = headers_encoded_len(headers);
    let len = frame_len(topic.len(), headers_len, payload.len());
    let padded = padded_len(len);
    let out = &mut out[..padded];
    out[8] = RECORD_MAGIC;
    out[9] = meta.flags;
    out[10..12].copy_from_slice(&(topic.len() as u16).to_le_bytes());
    out[12..14].copy_from_slice(&(headers_len as u16).to_le_bytes());
    out[14..16].fill(0);
    out[16..24].copy_from_slice(&meta.offset.to_le_bytes());
    out[24..32].copy_from_slice(&meta.epoch.to_le_bytes());
    out[32..40].copy_from_slice(&meta.timestamp_ms.to_le_bytes());
    out[40..48].copy_from_slice(&meta.prev_pos.to_le_bytes());
    out[48..56].copy_from_slice(&meta.skip_pos.to_le_bytes());
    let mut at = FRAME_HEADER_LEN;
    out[at..at + topic.len()].copy_from_slice(topic);
    at += topic.len();
    for header in headers {
        out[at] = header.key.len() as u8;
        at += 1;
        out[at..at + header.key.len()].copy_from_slice(header.key.as_bytes());
        at += header.key.len();
        out[at..at + 2].copy_from_slice(&(header.value.len() as u16).to_le_bytes());
        at += 2;
        out[at..at + header.value.len()].copy_from_slice(header.value.as_bytes());
        at += header.value.len();
    }
    out[at..at + payload.len()].copy_from_slice(payload);
    at += payload.len();
    out[at..padded].fill(0);
    out[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    let crc = crc32fast::hash(&out[4..len]);
    out[0..4].copy_from_slice(&crc.to_le_bytes());
    padded
}

/// A decoded frame borrowing the segment's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameView<'a> {
    pub meta: FrameMeta,
    pub topic: &'a [u8],
    pub headers: &'a [u8],
    pub payload: &'a [u8],
    /// Unpadded length of the frame.
    pub frame_len: usize,
}

impl<'a> FrameView<'a> {
    /// Space the frame takes in the segment, padding included.
    pub fn padded_len(&self) -> usize {
        padded_len(self.frame_len)
    }

    pub fn is_batch_end(&self) -> bool {
        self.meta.flags & FLAG_BATCH_END != 0
    }

    /// The headers, decoded. Fails only on a frame whose CRC matched but whose
    /// header bytes are malformed, which only a writer bug produces.
    pub fn decode_headers(&self) -> Result<Vec<Header>, DecodeError> {
        HeaderIter { rest: self.headers }
            .map(|h| h.map(|(k, v)| Header::new(k, v)))
            .collect()
    }

    /// An owned copy of the record.
    pub fn to_record(&self) -> Result<Record, DecodeError> {
        let topic = std::str::from_utf8(self.topic).map_err(|_| DecodeError::BadLayout {
            what: "topic is not UTF-8",
        })?;
        Ok(Record {
            topic: topic.to_owned(),
            offset: self.meta.offset,
            epoch: self.meta.epoch,
            timestamp_ms: self.meta.timestamp_ms,
            headers: self.decode_headers()?,
            payload: Bytes::copy_from_slice(self.payload),
        })
    }
}

/// Iterates over encoded headers, yielding `(key, value)`.
#[derive(Debug)]
pub struct HeaderIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for HeaderIter<'a> {
    type Item = Result<(&'a str, &'a str), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let bad = DecodeError::BadLayout {
            what: "malformed header",
        };
        let parse = |rest: &'a [u8]| -> Option<(&'a str, &'a str, &'a [u8])> {
            let (&key_len, rest) = rest.split_first()?;
            let (key, rest) = rest.split_at_checked(usize::from(key_len))?;
            let (value_len, rest) = rest.split_at_checked(2)?;
            let value_len = usize::from(u16::from_le_bytes([value_len[0], value_len[1]]));
            let (value, rest) = rest.split_at_checked(value_len)?;
            Some((
                std::str::from_utf8(key).ok()?,
                std::str::from_utf8(value).ok()?,
                rest,
            ))
        };
        match parse(self.rest) {
            Some((key, value, rest)) => {
                self.rest = rest;
                Some(Ok((key, value)))
            }
            None => {
                self.rest = &[];
                Some(Err(bad))
            }
        }
    }
}

fn read_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([buf[at], buf[at + 1]])
}

fn read_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn read_u64(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// Decodes and verifies the frame at the start of `buf`.
pub fn decode_frame(buf: &[u8]) -> Result<FrameView<'_>, DecodeError> {
    let view = decode_frame_unchecked(buf)?;
    let expected = read_u32(buf, 0);
    let got = crc32fast::hash(&buf[4..view.frame_len]);
    if got != expected {
        return Err(DecodeError::ChecksumMismatch { got, expected });
    }
    Ok(view)
}

/// Decodes the frame at the start of `buf`, checking its structure but not its CRC.
///
/// For frames this process wrote or already verified (the append path reads the
/// latest record of a topic on every append).
pub fn decode_frame_unchecked(buf: &[u8]) -> Result<FrameView<'_>, DecodeError> {
    if buf.len() < 8 {
        return if buf.iter().all(|&b| b == 0) {
            Err(DecodeError::End)
        } else {
            Err(DecodeError::Truncated {
                needed: 8,
                available: buf.len(),
            })
        };
    }
    let len = read_u32(buf, 4) as usize;
    if len == 0 && read_u32(buf, 0) == 0 {
        return Err(DecodeError::End);
    }
    if len < FRAME_HEADER_LEN {
        return Err(DecodeError::BadLength { len });
    }
    if len > buf.len() {
        return Err(DecodeError::Truncated {
            needed: len,
            available: buf.len(),
        });
    }
    if buf[8] != RECORD_MAGIC {
        return Err(DecodeError::BadMagic { found: buf[8] });
    }
    if read_u16(buf, 14) != 0 {
        return Err(DecodeError::BadLayout {
            what: "reserved bytes are not zero",
        });
    }
    let topic_len = usize::from(read_u16(buf, 10));
    let headers_len = usize::from(read_u16(buf, 12));
    let content = FRAME_HEADER_LEN + topic_len + headers_len;
    if content > len {
        return Err(DecodeError::BadLayout {
            what: "topic and headers exceed the frame",
        });
    }
    let meta = FrameMeta {
        flags: buf[9],
        offset: read_u64(buf, 16),
        epoch: read_u64(buf, 24),
        timestamp_ms: read_u64(buf, 32),
        prev_pos: read_u64(buf, 40),
        skip_pos: read_u64(buf, 48),
    };
    let topic_end = FRAME_HEADER_LEN + topic_len;
    Ok(FrameView {
        meta,
        topic: &buf[FRAME_HEADER_LEN..topic_end],
        headers: &buf[topic_end..content],
        payload: &buf[content..len],
        frame_len: len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn meta() -> FrameMeta {
        FrameMeta {
            flags: FLAG_BATCH_END,
            offset: 42,
            epoch: 7 << 32 | 3,
            timestamp_ms: 1_700_000_000_123,
            prev_pos: 4096,
            skip_pos: NO_POSITION,
        }
    }

    fn encode(meta: &FrameMeta, topic: &str, headers: &[Header], payload: &[u8]) -> Vec<u8> {
        let len = padded_len(frame_len(
            topic.len(),
            headers_encoded_len(headers),
            payload.len(),
        ));
        let mut buf = vec![0xEE; len];
        assert_eq!(
            encode_frame(&mut buf, meta, topic.as_bytes(), headers, payload),
            len
        );
        buf
    }

    #[test]
    fn round_trips_every_field() {
        let headers = vec![
            Header::new("type", "MESSAGE_CREATE"),
            Header::new("channel_id", "9"),
        ];
        let buf = encode(&meta(), "guild.1", &headers, b"{\"content\":\"hi\"}");
        assert_eq!(buf.len() % FRAME_ALIGN, 0);
        let view = decode_frame(&buf).unwrap();
        assert_eq!(view.meta, meta());
        assert!(view.is_batch_end());
        assert_eq!(view.padded_len(), buf.len());
        let record = view.to_record().unwrap();
        assert_eq!(record.topic, "guild.1");
        assert_eq!(record.offset, 42);
        assert_eq!(record.headers, headers);
        assert_eq!(&record.payload[..], b"{\"content\":\"hi\"}");
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let buf = encode(
            &meta(),
            "user.5",
            &[Header::new("k", "v")],
            b"payload bytes",
        );
        let len = decode_frame(&buf).unwrap().frame_len;
        for i in 0..len {
            for bit in [0x01, 0x80] {
                let mut bad = buf.clone();
                bad[i] ^= bit;
                assert!(
                    decode_frame(&bad).is_err(),
                    "flip of byte {i} bit {bit:#x} passed"
                );
            }
        }
    }

    #[test]
    fn zeroes_are_the_end_and_short_buffers_are_truncated() {
        assert_eq!(decode_frame(&[0u8; 64]), Err(DecodeError::End));
        assert_eq!(decode_frame(&[0u8; 3]), Err(DecodeError::End));
        let buf = encode(&meta(), "t", &[], b"abc");
        assert!(matches!(
            decode_frame(&buf[..buf.len() - 8]),
            Err(DecodeError::Truncated { .. })
        ));
        let mut bad = buf.clone();
        bad[4..8].copy_from_slice(&10u32.to_le_bytes());
        assert_eq!(decode_frame(&bad), Err(DecodeError::BadLength { len: 10 }));
    }

    #[test]
    fn checksum_mismatch_reports_both_values() {
        let mut buf = encode(&meta(), "t", &[], b"abc");
        buf[57] ^= 0xFF;
        match decode_frame(&buf) {
            Err(DecodeError::ChecksumMismatch { got, expected }) => assert_ne!(got, expected),
            other => panic!("expected a checksum mismatch, got {other:?}"),
        }
    }

    fn header_strategy() -> impl Strategy<Value = Header> {
        ("[a-z_]{1,64}", "\\PC{0,40}").prop_map(|(k, v)| Header::new(k, v))
    }

    proptest! {
        #[test]
        fn any_record_round_trips(
            topic in "[a-z0-9.]{1,255}",
            headers in proptest::collection::vec(header_strategy(), 0..8),
            payload in proptest::collection::vec(any::<u8>(), 0..2048),
            offset in any::<u64>(),
            epoch in any::<u64>(),
            timestamp_ms in any::<u64>(),
            prev_pos in any::<u64>(),
            skip_pos in any::<u64>(),
            flags in 0u8..2,
        ) {
            let meta = FrameMeta { flags, offset, epoch, timestamp_ms, prev_pos, skip_pos };
            let buf = encode(&meta, &topic, &headers, &payload);
            let view = decode_frame(&buf).unwrap();
            prop_assert_eq!(view.meta, meta);
            let record = view.to_record().unwrap();
            prop_assert_eq!(record.topic, topic);
            prop_assert_eq!(record.headers, headers);
            prop_assert_eq!(&record.payload[..], &payload[..]);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(view) = decode_frame(&bytes) {
                let _ = view.to_record();
            }
        }
    }
}
