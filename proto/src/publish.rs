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
//!
//! `switchyard.v1.PublishRequest` itself is written by hand too (the build maps the
//! message here with prost's `extern_path`), for the broker's side: it reads a
//! request from one contiguous buffer, each record's payload a slice of it, where
//! prost's generic decoding walked the receive buffer field by field — a tenth of
//! the broker's CPU at 100-byte records.

use std::fmt;

use prost::DecodeError;
use prost::bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::encoding::{self, DecodeContext, WireType};

use crate::read::{Topic, TopicCache, read_header};
use crate::v1::{AckLevel, Header};
use crate::wire::{
    In, LEN, Out, VARINT, WireError, bytes_field_len, header_field_len, message_field_len,
    varint_field_len,
};

/// A batch of records to append (`switchyard.v1.PublishRequest`).
#[derive(Clone, PartialEq, Default)]
pub struct PublishRequest {
    /// Chosen by the client and echoed in the response; `PublishStream` clients
    /// use it to match responses to requests.
    pub request_id: u64,
    /// 1 to 10,000 records, at most 16 MiB encoded.
    pub records: Vec<PublishRecord>,
    /// An [`AckLevel`].
    pub ack: i32,
    /// Answer with position runs instead of a position per record.
    pub want_position_runs: bool,
}

impl PublishRequest {
    /// The acknowledgement level; unknown values read as the default.
    pub fn ack(&self) -> AckLevel {
        AckLevel::try_from(self.ack).unwrap_or_default()
    }

    pub fn set_ack(&mut self, ack: AckLevel) {
        self.ack = ack as i32;
    }
}

impl fmt::Debug for PublishRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublishRequest")
            .field("request_id", &self.request_id)
            .field("records", &self.records)
            .field("ack", &self.ack())
            .field("want_position_runs", &self.want_position_runs)
            .finish()
    }
}

impl prost::Message for PublishRequest {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if self.request_id != 0 {
            encoding::uint64::encode(1, &self.request_id, buf);
        }
        encoding::message::encode_repeated(2, &self.records, buf);
        if self.ack != 0 {
            encoding::int32::encode(3, &self.ack, buf);
        }
        if self.want_position_runs {
            encoding::bool::encode(4, &self.want_position_runs, buf);
        }
    }

    /// Field by field, as prost does; [`PublishRequest::merge`] takes the fast way
    /// and comes here only for bytes it cannot read.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let field = |name| in_field("PublishRequest", name);
        match tag {
            1 => encoding::uint64::merge(wire_type, &mut self.request_id, buf, ctx)
                .map_err(field("request_id")),
            2 => encoding::message::merge_repeated(wire_type, &mut self.records, buf, ctx)
                .map_err(field("records")),
            3 => encoding::int32::merge(wire_type, &mut self.ack, buf, ctx).map_err(field("ack")),
            4 => encoding::bool::merge(wire_type, &mut self.want_position_runs, buf, ctx)
                .map_err(field("want_position_runs")),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    /// Reads the whole request from one contiguous buffer. Bytes that do not read
    /// are decoded again field by field, so that errors (and any case this reader
    /// does not take) are exactly prost's.
    fn merge(&mut self, mut buf: impl Buf) -> Result<(), DecodeError> {
        let message = buf.copy_to_bytes(buf.remaining());
        match read_request(&message) {
            Ok(read) => {
                if let Some(request_id) = read.request_id {
                    self.request_id = request_id;
                }
                if let Some(ack) = read.ack {
                    self.ack = ack;
                }
                if let Some(runs) = read.want_position_runs {
                    self.want_position_runs = runs;
                }
                if self.records.is_empty() {
                    // The usual case: take the list rather than copy it over.
                    self.records = read.records;
                } else {
                    self.records.extend(read.records);
                }
                Ok(())
            }
            Err(_) => {
                let mut buf = message;
                while buf.has_remaining() {
                    let (tag, wire_type) = encoding::decode_key(&mut buf)?;
                    self.merge_field(tag, wire_type, &mut buf, DecodeContext::default())?;
                }
                Ok(())
            }
        }
    }

    fn encoded_len(&self) -> usize {
        (if self.request_id != 0 {
            encoding::uint64::encoded_len(1, &self.request_id)
        } else {
            0
        }) + encoding::message::encoded_len_repeated(2, &self.records)
            + if self.ack != 0 {
                encoding::int32::encoded_len(3, &self.ack)
            } else {
                0
            }
            + if self.want_position_runs {
                encoding::bool::encoded_len(4, &self.want_position_runs)
            } else {
                0
            }
    }

    fn clear(&mut self) {
        *self = PublishRequest::default();
    }
}

/// Makes a decoding error name the field it happened in, as generated code does.
fn in_field(message: &'static str, field: &'static str) -> impl FnOnce(DecodeError) -> DecodeError {
    move |mut error| {
        error.push(message, field);
        error
    }
}

/// One record to append (`switchyard.v1.PublishRecord`). Written by hand for its
/// topic: a [`Topic`] holds a usual name inline (a long one is one copy shared by
/// each run of records of that topic), where a `String` per record was an
/// allocation, a copy and, in the broker, a free on another thread.
#[derive(Clone, PartialEq, Eq, Default, Debug)]
pub struct PublishRecord {
    /// Topic name: 1 to 255 bytes of ASCII letters, digits and `.` `_` `-` `:`, with
    /// no empty dot-separated segment. Created by first use.
    pub topic: Topic,
    /// At most 32 headers.
    pub headers: Vec<Header>,
    /// Opaque bytes, stored and delivered untouched.
    pub payload: Bytes,
}

impl prost::Message for PublishRecord {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if !self.topic.is_empty() {
            buf.put_u8(TOPIC);
            encoding::encode_varint(self.topic.len() as u64, buf);
            buf.put_slice(self.topic.as_bytes());
        }
        encoding::message::encode_repeated(2, &self.headers, buf);
        if !self.payload.is_empty() {
            encoding::bytes::encode(3, &self.payload, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let field = |name| in_field("PublishRecord", name);
        match tag {
            1 => {
                // Read as prost reads a string: it fails as prost fails, and
                // leaves the field empty then, as prost does.
                let mut topic = String::new();
                let read = encoding::string::merge(wire_type, &mut topic, buf, ctx);
                self.topic = Topic::from(topic);
                read.map_err(field("topic"))
            }
            2 => encoding::message::merge_repeated(wire_type, &mut self.headers, buf, ctx)
                .map_err(field("headers")),
            3 => encoding::bytes::merge(wire_type, &mut self.payload, buf, ctx)
                .map_err(field("payload")),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        // Empty fields are left out, as `bytes_field_len` counts them.
        bytes_field_len(self.topic.len())
            + encoding::message::encoded_len_repeated(2, &self.headers)
            + bytes_field_len(self.payload.len())
    }

    fn clear(&mut self) {
        *self = PublishRecord::default();
    }
}

/// What [`read_request`] found: fields absent from the bytes are `None`.
struct ReadRequest {
    request_id: Option<u64>,
    records: Vec<PublishRecord>,
    ack: Option<i32>,
    want_position_runs: Option<bool>,
}

/// Records [`read_request`] makes room for at once: the broker's default limit per
/// request (`max_batch_records`); larger requests grow the list as they are read.
const MAX_RECORDS_RESERVED: usize = 10_000;

fn read_request(message: &Bytes) -> Result<ReadRequest, WireError> {
    let mut input = In::new(message);
    let mut read = ReadRequest {
        request_id: None,
        records: Vec::new(),
        ack: None,
        want_position_runs: None,
    };
    let mut topics = TopicCache::default();
    while !input.is_done() {
        let (field, wire_type) = input.key()?;
        match field {
            1 => {
                In::expect(wire_type, VARINT)?;
                read.request_id = Some(input.varint()?);
            }
            2 => {
                In::expect(wire_type, LEN)?;
                let record = input.len_delimited()?;
                if read.records.is_empty() {
                    // Records of one request are mostly alike: room for as many as
                    // the message holds of the first one's size, up to a cap.
                    let each = message_field_len(record.len());
                    read.records
                        .reserve((message.len() / each).min(MAX_RECORDS_RESERVED));
                }
                read.records
                    .push(read_record(message, &input, record, &mut topics)?);
            }
            3 => {
                In::expect(wire_type, VARINT)?;
                // An int32 on the wire: the low 32 bits, as prost reads it.
                read.ack = Some(input.varint()? as i32);
            }
            4 => {
                In::expect(wire_type, VARINT)?;
                read.want_position_runs = Some(input.varint()? != 0);
            }
            _ => input.skip(field, wire_type)?,
        }
    }
    // Records unlike the first may leave much of the room unused, and the list
    // lives as long as the batch does (slow subscribers hold it).
    if read.records.capacity() > read.records.len() + read.records.len() / 8 {
        read.records.shrink_to_fit();
    }
    Ok(read)
}

/// Reads the `PublishRecord` at `range` of `parent` (which covers all of
/// `message`); the payload is a slice of `message`, the topic shared with the
/// records before of the same topic. As in `read_delivery`, the fields are read
/// into locals and the record is made once, in the caller's push.
#[inline(always)]
fn read_record(
    message: &Bytes,
    parent: &In<'_>,
    range: std::ops::Range<usize>,
    topics: &mut TopicCache,
) -> Result<PublishRecord, WireError> {
    let base = range.start;
    let mut input = parent.nested(range);
    let mut topic = None;
    let mut headers = Vec::new();
    let mut payload = 0..0;
    while !input.is_done() {
        let (field, wire_type) = input.key()?;
        match field {
            1 => {
                In::expect(wire_type, LEN)?;
                // Every occurrence is checked, as prost checks it; the last counts
                // (and is checked when it is made a topic, below).
                if let Some(earlier) = topic.replace(input.len_delimited()?) {
                    std::str::from_utf8(input.slice(earlier))
                        .map_err(|_| WireError("topic is not UTF-8"))?;
                }
            }
            2 => {
                In::expect(wire_type, LEN)?;
                let header = input.len_delimited()?;
                let (key, value) = read_header(input.nested(header))?;
                headers.push(Header { key, value });
            }
            3 => {
                In::expect(wire_type, LEN)?;
                payload = input.len_delimited()?;
            }
            _ => input.skip(field, wire_type)?,
        }
    }
    Ok(PublishRecord {
        topic: match topic {
            Some(name) => topics.get(input.slice(name))?,
            None => Topic::default(),
        },
        headers,
        payload: if payload.is_empty() {
            Bytes::new()
        } else {
            message.slice(base + payload.start..base + payload.end)
        },
    })
}

// Field keys: (field number << 3) | wire type (0 varint, 2 length-delimited).
const REQUEST_ID: u8 = 1 << 3;
const RECORD: u8 = 2 << 3 | 2;
const ACK: u8 = 3 << 3;
const WANT_POSITION_RUNS: u8 = 4 << 3;
const TOPIC: u8 = 1 << 3 | 2;
const HEADER: u8 = 2 << 3 | 2;
const PAYLOAD: u8 = 3 << 3 | 2;

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

    /// Bytes a record takes in [`PublishRecords`] (to size a writer).
    pub fn record_len<'a>(
        topic: &str,
        headers: impl Iterator<Item = (&'a str, &'a str)>,
        payload: &[u8],
    ) -> usize {
        message_field_len(record_body_len(topic, headers, payload))
    }

    /// Appends one record. `headers` is walked twice (to size, then to write).
    pub fn push<'a, H>(&mut self, topic: &str, headers: H, payload: &[u8])
    where
        H: Iterator<Item = (&'a str, &'a str)> + Clone,
    {
        let len = record_body_len(topic, headers.clone(), payload);
        let mut out = Out::append(&mut self.buf, RECORD, len);
        out.bytes_field(TOPIC, topic.as_bytes());
        for (key, value) in headers {
            out.header(HEADER, key, value);
        }
        out.bytes_field(PAYLOAD, payload);
        out.finish("a record");
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

/// Bytes of a `PublishRecord` message, without its key and length.
fn record_body_len<'a>(
    topic: &str,
    headers: impl Iterator<Item = (&'a str, &'a str)>,
    payload: &[u8],
) -> usize {
    let headers_len: usize = headers
        .map(|(key, value)| header_field_len(key, value))
        .sum();
    bytes_field_len(topic.len()) + headers_len + bytes_field_len(payload.len())
}

/// A `PublishRequest` whose records are already written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPublishRequest {
    pub request_id: u64,
    pub ack: AckLevel,
    pub records: PublishRecords,
    pub want_position_runs: bool,
}

impl EncodedPublishRequest {
    pub fn encoded_len(&self) -> usize {
        varint_field_len(self.request_id)
            + self.records.encoded.len()
            + varint_field_len(self.ack as i32 as u64)
            + varint_field_len(u64::from(self.want_position_runs))
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
        if self.want_position_runs {
            buf.put_u8(WANT_POSITION_RUNS);
            buf.put_u8(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::tests::delivery;
    use crate::v1::Header;
    use crate::wire::test_bytes::{WITH_A_BAD_NAME, field, topics};
    use prost::Message;

    fn record(seed: u64) -> PublishRecord {
        let d = delivery(seed);
        PublishRecord {
            topic: d.topic.into(),
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
        // Names held inline and shared ones, one with a two-byte length.
        records[5].topic = LONG_1.into();
        records[6].topic = LONG_1.into();
        records[7].topic = "g".repeat(200).into();
        for (request_id, ack, want_position_runs) in [
            (0, AckLevel::Unspecified, false),
            (1, AckLevel::Written, true),
            (u64::MAX, AckLevel::Durable, true),
        ] {
            let written = EncodedPublishRequest {
                request_id,
                ack,
                records: write(&records),
                want_position_runs,
            };
            let generated = PublishRequest {
                request_id,
                records: records.clone(),
                ack: ack as i32,
                want_position_runs,
            };
            let mut bytes = Vec::new();
            written.encode(&mut bytes);
            assert_eq!(bytes, generated.encode_to_vec());
            let by_prost = Generated {
                request_id,
                records: records.iter().map(GeneratedRecord::from).collect(),
                ack: ack as i32,
                want_position_runs,
            };
            assert_eq!(bytes, by_prost.encode_to_vec());
            assert_eq!(written.encoded_len(), bytes.len());
            assert_eq!(PublishRequest::decode(bytes.as_slice()).unwrap(), generated);
        }
    }

    /// The message as prost generates it, to compare the hand-written one with.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Generated {
        #[prost(uint64, tag = "1")]
        request_id: u64,
        #[prost(message, repeated, tag = "2")]
        records: Vec<GeneratedRecord>,
        #[prost(enumeration = "AckLevel", tag = "3")]
        ack: i32,
        #[prost(bool, tag = "4")]
        want_position_runs: bool,
    }

    /// `PublishRecord` as prost generates it.
    #[derive(Clone, PartialEq, prost::Message)]
    struct GeneratedRecord {
        #[prost(string, tag = "1")]
        topic: String,
        #[prost(message, repeated, tag = "2")]
        headers: Vec<Header>,
        #[prost(bytes = "bytes", tag = "3")]
        payload: Bytes,
    }

    impl From<&PublishRecord> for GeneratedRecord {
        fn from(record: &PublishRecord) -> GeneratedRecord {
            GeneratedRecord {
                topic: record.topic.to_string(),
                headers: record.headers.clone(),
                payload: record.payload.clone(),
            }
        }
    }

    /// The hand-written request decodes `bytes` exactly as prost's generated one:
    /// the same fields, or an error where it errs.
    fn decodes_as_prost(bytes: &[u8]) -> bool {
        let fast = PublishRequest::decode(Bytes::copy_from_slice(bytes));
        let generated = Generated::decode(bytes);
        match (&fast, &generated) {
            (Ok(fast), Ok(generated)) => {
                assert_eq!(fast.request_id, generated.request_id, "{bytes:?}");
                let fast_records: Vec<GeneratedRecord> =
                    fast.records.iter().map(GeneratedRecord::from).collect();
                assert_eq!(fast_records, generated.records, "{bytes:?}");
                assert_eq!(fast.ack, generated.ack, "{bytes:?}");
                assert_eq!(
                    fast.want_position_runs, generated.want_position_runs,
                    "{bytes:?}"
                );
            }
            (Err(fast), Err(generated)) => assert_eq!(
                fast.to_string(),
                generated
                    .to_string()
                    .replace("GeneratedRecord", "PublishRecord")
                    .replace("Generated", "PublishRequest")
            ),
            _ => panic!("{fast:?} where prost decoded {generated:?} from {bytes:?}"),
        }
        fast.is_ok()
    }

    #[test]
    fn requests_decode_as_prost_decodes_them_whatever_the_bytes() {
        let mut records: Vec<PublishRecord> = (1..6).map(record).collect();
        records[2].headers.push(Header {
            key: "type".into(),
            value: "MESSAGE_CREATE".into(),
        });
        let request = PublishRequest {
            request_id: 300,
            records,
            ack: AckLevel::Durable as i32,
            want_position_runs: true,
        };
        let bytes = request.encode_to_vec();
        assert_eq!(PublishRequest::decode(bytes.as_slice()).unwrap(), request);
        assert!(decodes_as_prost(&bytes));
        // Fields in another order, repeated (the last counts), unknown ones, an
        // unknown ack value, and two requests' bytes run together (records append).
        let mut odd = vec![3 << 3, 7, 9 << 3, 1, 1 << 3, 5];
        odd.extend_from_slice(&bytes);
        odd.extend_from_slice(&bytes);
        odd.extend_from_slice(&[3 << 3, 0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(decodes_as_prost(&odd));
        assert_eq!(
            PublishRequest::decode(odd.as_slice())
                .unwrap()
                .records
                .len(),
            10
        );
        // Both were read the fast way, not field by field.
        assert!(read_request(&Bytes::from(bytes.clone())).is_ok());
        assert!(read_request(&Bytes::from(odd)).is_ok());
        let mut failed = 0;
        for len in 0..bytes.len() {
            failed += usize::from(!decodes_as_prost(&bytes[..len]));
        }
        assert!(failed > bytes.len() / 2, "most truncations are errors");
        for at in 0..bytes.len() {
            for value in [0x00, 0x01, 0x02, 0x03, 0x04, 0x07, 0x0a, 0x7f, 0x80, 0xff] {
                let mut changed = bytes.clone();
                changed[at] = value;
                decodes_as_prost(&changed);
            }
        }
    }

    #[test]
    fn every_occurrence_of_a_string_is_checked_and_groups_nest_only_as_deep_as_prost_allows() {
        let one_record = |record: &[u8]| field(2 << 3 | 2, record);
        // A bad name anywhere among a record's topics is refused, by this reader as
        // by prost; of good ones, the last counts (the second record finds its name
        // in the topic cache).
        for names in WITH_A_BAD_NAME {
            let request = one_record(&topics(names));
            assert!(!decodes_as_prost(&request));
            assert!(read_request(&Bytes::from(request)).is_err());
        }
        let mut two = one_record(&topics(&[b"g.1"]));
        two.extend(one_record(&topics(&[b"g.2", b"g.1"])));
        assert!(decodes_as_prost(&two));
        let read = read_request(&Bytes::from(two)).unwrap();
        assert!(read.records.iter().all(|record| record.topic == "g.1"));
        let mut values = field(2 << 3 | 2, b"\xff");
        values.extend(field(2 << 3 | 2, b"v"));
        assert!(!decodes_as_prost(&one_record(&field(2 << 3 | 2, &values))));
        let groups = |depth: usize| {
            let mut out = vec![15 << 3 | 3; depth];
            out.extend_from_slice(&[15 << 3, 1]);
            out.extend(std::iter::repeat_n(15 << 3 | 4, depth));
            out
        };
        // A record's unknown fields are 1 message deep, a header's 2.
        assert!(decodes_as_prost(&one_record(&groups(98))));
        assert!(!decodes_as_prost(&one_record(&groups(99))));
        assert!(decodes_as_prost(&one_record(&field(
            2 << 3 | 2,
            &groups(97)
        ))));
        assert!(!decodes_as_prost(&one_record(&field(
            2 << 3 | 2,
            &groups(98)
        ))));
        // Those that decode were read the fast way.
        assert!(read_request(&Bytes::from(one_record(&groups(98)))).is_ok());
    }

    #[test]
    fn the_records_of_a_long_topic_in_a_row_share_one_name_and_short_names_are_inline() {
        let records = [LONG_1, LONG_1, LONG_1, LONG_2, LONG_1, "guild.1", "guild.1"]
            .map(|topic| PublishRecord {
                topic: topic.into(),
                headers: Vec::new(),
                payload: Bytes::from_static(b"{}"),
            })
            .to_vec();
        let bytes = PublishRequest {
            records: records.clone(),
            ..PublishRequest::default()
        }
        .encode_to_vec();
        let read = PublishRequest::decode(Bytes::from(bytes)).unwrap().records;
        assert_eq!(read, records);
        let name = |i: usize| read[i].topic.as_ptr();
        assert_eq!(name(0), name(1));
        assert_eq!(name(0), name(2));
        assert_ne!(name(2), name(3));
        // A run of a topic again after another is a new copy (only the last one
        // is looked at).
        assert_ne!(name(0), name(4));
        assert!(!read[0].topic.is_inline());
        assert!(read[5].topic.is_inline() && read[6].topic.is_inline());
    }

    const LONG_1: &str = "guild.1.a-name-longer-than-a-topic-held-inline";
    const LONG_2: &str = "guild.2.a-name-longer-than-a-topic-held-inline";

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
            want_position_runs: false,
        }
        .encode(&mut bytes);
        let decoded = PublishRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded.records.len(), 1);
        assert_eq!(decoded.records[0].topic, "guild.2");
        assert_eq!(&decoded.records[0].payload[..], b"second");
    }

    #[test]
    fn the_record_list_is_sized_to_the_records_read() {
        let request = |records: Vec<PublishRecord>| {
            Bytes::from(
                PublishRequest {
                    records,
                    ..PublishRequest::default()
                }
                .encode_to_vec(),
            )
        };
        let alike = |n: usize, size: usize| -> Vec<PublishRecord> {
            (0..n)
                .map(|_| PublishRecord {
                    topic: "guild.1".into(),
                    headers: Vec::new(),
                    payload: Bytes::from(vec![b'x'; size]),
                })
                .collect()
        };
        // Alike records (short and long lengths): room for exactly them, at once.
        for size in [10, 300] {
            let read = read_request(&request(alike(1000, size))).unwrap();
            assert_eq!((read.records.len(), read.records.capacity()), (1000, 1000));
        }
        // A tiny first record: the list keeps no room the others did not take.
        let mut mixed = alike(1, 0);
        mixed.extend(alike(100, 1000));
        let read = read_request(&request(mixed)).unwrap();
        assert_eq!(read.records.len(), 101);
        assert!(
            read.records.capacity() <= 101 + 101 / 8,
            "{}",
            read.records.capacity()
        );
    }
}
