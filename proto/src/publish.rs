//! Publish requests written straight into their wire form, for clients.
//!
//! Why: a producer keeps every batch it sent until the broker answers (to send it
//! again after a reconnect), so with generated messages each send cloned the batch —
//! a topic allocation per record — before prost encoded it. A [`PublishWriter`]
//! writes the records once, into one buffer, when they are queued; sending (and
//! resending) a batch is then a reference count and one copy into the transport.
//!
//! The bytes are what prost writes for the same `PublishRequest`, so the broker
//! decodes them as any other request.

use prost::bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::encoded_len_varint;

use crate::v1::AckLevel;
use crate::wire::{Out, bytes_field_len, header_len, varint_field_len};

// Field keys: (field number << 3) | wire type (0 varint, 2 length-delimited).
const REQUEST_ID: u8 = 1 << 3;
const RECORD: u8 = 2 << 3 | 2;
const ACK: u8 = 3 << 3;
const TOPIC: u8 = 1 << 3 | 2;
const HEADER: u8 = 2 << 3 | 2;
const PAYLOAD: u8 = 3 << 3 | 2;
const HEADER_KEY: u8 = 1 << 3 | 2;
const HEADER_VALUE: u8 = 2 << 3 | 2;

/// Records in the wire form of `PublishRequest.records`. Cheap to clone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishRecords {
    encoded: Bytes,
    count: usize,
}

impl PublishRecords {
    /// Records held.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of the records on the wire.
    pub fn encoded_len(&self) -> usize {
        self.encoded.len()
    }
}

/// Writes records into a [`PublishRecords`].
#[derive(Debug, Default)]
pub struct PublishWriter {
    buf: BytesMut,
    count: usize,
}

impl PublishWriter {
    /// A writer with room for `bytes` of records.
    pub fn with_capacity(bytes: usize) -> PublishWriter {
        PublishWriter {
            buf: BytesMut::with_capacity(bytes),
            count: 0,
        }
    }

    /// Records written since the last [`PublishWriter::finish`].
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends one record. `headers` is walked twice (to size, then to write).
    pub fn push<'a, H>(&mut self, topic: &str, headers: H, payload: &[u8])
    where
        H: Iterator<Item = (&'a str, &'a str)> + Clone,
    {
        let headers_len: usize = headers
            .clone()
            .map(|(key, value)| {
                // Always there, even empty: a key and a length.
                let len = header_len(key, value);
                1 + encoded_len_varint(len as u64) + len
            })
            .sum();
        let len = bytes_field_len(topic.len()) + headers_len + bytes_field_len(payload.len());
        let total = 1 + encoded_len_varint(len as u64) + len;
        let start = self.buf.len();
        self.buf.resize(start + total, 0);
        let mut out = Out {
            buf: &mut self.buf[start..],
            at: 0,
        };
        out.byte(RECORD);
        out.varint(len as u64);
        out.bytes_field(TOPIC, topic.as_bytes());
        for (key, value) in headers {
            out.byte(HEADER);
            out.varint(header_len(key, value) as u64);
            out.bytes_field(HEADER_KEY, key.as_bytes());
            out.bytes_field(HEADER_VALUE, value.as_bytes());
        }
        out.bytes_field(PAYLOAD, payload);
        debug_assert_eq!(out.at, total, "a record's size was computed wrong");
        self.count += 1;
    }

    /// The records written so far; the writer starts over, empty.
    pub fn finish(&mut self) -> PublishRecords {
        let count = std::mem::take(&mut self.count);
        PublishRecords {
            encoded: self.buf.split().freeze(),
            count,
        }
    }
}

/// A `PublishRequest` whose records are already written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPublishRequest {
    pub request_id: u64,
    pub ack: AckLevel,
    pub records: PublishRecords,
}

impl EncodedPublishRequest {
    pub fn encoded_len(&self) -> usize {
        varint_field_len(self.request_id)
            + self.records.encoded.len()
            + varint_field_len(self.ack as i32 as u64)
    }

    /// Writes the request (fields in order, zero values left out, as prost does).
    pub fn encode(&self, buf: &mut impl BufMut) {
        if self.request_id != 0 {
            buf.put_u8(REQUEST_ID);
            prost::encoding::encode_varint(self.request_id, buf);
        }
        buf.put_slice(&self.records.encoded);
        let ack = self.ack as i32;
        if ack != 0 {
            buf.put_u8(ACK);
            // An int32 field: negative values take ten bytes, as in prost.
            prost::encoding::encode_varint(ack as i64 as u64, buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::tests::delivery;
    use crate::v1::{Header, PublishRecord, PublishRequest};
    use prost::Message;

    fn record(seed: u64) -> PublishRecord {
        let d = delivery(seed);
        PublishRecord {
            topic: d.topic,
            headers: d.headers,
            payload: d.payload,
        }
    }

    fn write(records: &[PublishRecord]) -> PublishRecords {
        let mut writer = PublishWriter::default();
        for r in records {
            writer.push(
                &r.topic,
                r.headers.iter().map(|h| (h.key.as_str(), h.value.as_str())),
                &r.payload,
            );
        }
        assert_eq!(writer.len(), records.len());
        writer.finish()
    }

    #[test]
    fn a_written_request_is_the_bytes_prost_writes_and_decodes_back() {
        let mut records: Vec<PublishRecord> = (0..200).map(record).collect();
        records[3].headers.push(Header {
            key: "type".into(),
            value: String::new(),
        });
        for (request_id, ack) in [
            (0, AckLevel::Unspecified),
            (1, AckLevel::Written),
            (u64::MAX, AckLevel::Durable),
        ] {
            let written = EncodedPublishRequest {
                request_id,
                ack,
                records: write(&records),
            };
            let generated = PublishRequest {
                request_id,
                records: records.clone(),
                ack: ack as i32,
            };
            let mut bytes = Vec::new();
            written.encode(&mut bytes);
            assert_eq!(bytes, generated.encode_to_vec());
            assert_eq!(written.encoded_len(), bytes.len());
            assert_eq!(PublishRequest::decode(bytes.as_slice()).unwrap(), generated);
        }
    }

    #[test]
    fn the_writer_starts_over_after_finish() {
        let mut writer = PublishWriter::with_capacity(64);
        writer.push("guild.1", std::iter::empty(), b"first");
        let first = writer.finish();
        assert!(writer.is_empty());
        writer.push("guild.2", std::iter::empty(), b"second");
        let second = writer.finish();
        assert_eq!((first.len(), second.len()), (1, 1));
        let mut bytes = Vec::new();
        EncodedPublishRequest {
            request_id: 1,
            ack: AckLevel::Written,
            records: second,
        }
        .encode(&mut bytes);
        let decoded = PublishRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded.records.len(), 1);
        assert_eq!(decoded.records[0].topic, "guild.2");
        assert_eq!(&decoded.records[0].payload[..], b"second");
    }
}
