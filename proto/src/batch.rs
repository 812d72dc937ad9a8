//! `switchyard.v1.DeliveryBatch`, written by hand (the build maps the message here
//! with prost's `extern_path`), and [`DeliveryWriter`], which writes deliveries
//! straight into their wire form.
//!
//! Why: the broker sends every record as a `Delivery`. Building a generated
//! `Delivery` per record and stream costs allocations (topic, headers, ids) that
//! are freed right after encoding, and prost then computes each delivery's length
//! three times and writes each field with a separate buffer call — about a fifth of
//! the broker's CPU at 100-byte records. The writer computes each length once and
//! writes the fields into one buffer that becomes the response.
//!
//! On the wire nothing changes: a `DeliveryBatch` is a sequence of field-1
//! `Delivery` messages, whoever wrote them, and clients decode it as before.

use std::fmt;

use prost::DecodeError;
use prost::bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::encoding::{self, DecodeContext, WireType, encoded_len_varint};

use crate::wire::{Out, bytes_field_len, header_field_len, varint_field_len};

use crate::v1::Delivery;

/// A batch of deliveries (`switchyard.v1.DeliveryBatch`).
///
/// A decoded batch holds its deliveries in [`DeliveryBatch::deliveries`]. A batch
/// being sent may also carry deliveries already encoded by a [`DeliveryWriter`];
/// they go on the wire after `deliveries`. Two batches compare equal when both
/// parts are equal, so a written batch equals its decoded form only once decoded.
#[derive(Clone, PartialEq, Default)]
pub struct DeliveryBatch {
    pub deliveries: Vec<Delivery>,
    /// Field-1 entries written by a [`DeliveryWriter`].
    encoded: Bytes,
}

impl DeliveryBatch {
    pub fn new(deliveries: Vec<Delivery>) -> DeliveryBatch {
        DeliveryBatch {
            deliveries,
            encoded: Bytes::new(),
        }
    }
}

impl fmt::Debug for DeliveryBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeliveryBatch")
            .field("deliveries", &self.deliveries)
            .field("encoded_bytes", &self.encoded.len())
            .finish()
    }
}

impl prost::Message for DeliveryBatch {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encoding::message::encode_repeated(1, &self.deliveries, buf);
        buf.put_slice(&self.encoded);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag == 1 {
            encoding::message::merge_repeated(wire_type, &mut self.deliveries, buf, ctx)
        } else {
            encoding::skip_field(wire_type, tag, buf, ctx)
        }
    }

    fn encoded_len(&self) -> usize {
        encoding::message::encoded_len_repeated(1, &self.deliveries) + self.encoded.len()
    }

    fn clear(&mut self) {
        self.deliveries.clear();
        self.encoded = Bytes::new();
    }
}

/// One delivery for [`DeliveryWriter::push`]: the fields of a [`Delivery`],
/// borrowed. `headers` is walked twice (once to size the delivery, once to write
/// it), so it is a cheap, cloneable iterator.
#[derive(Debug, Clone)]
pub struct DeliveryFields<'a, H> {
    pub topic: &'a str,
    pub offset: u64,
    pub epoch: u64,
    pub timestamp_ms: u64,
    pub headers: H,
    pub payload: &'a [u8],
    pub subscription_ids: &'a [u64],
}

/// Writes deliveries into the wire form of a [`DeliveryBatch`], in one buffer, with
/// each length computed once. The bytes are what prost writes for the same
/// deliveries (fields in order, zero values left out).
#[derive(Debug, Default)]
pub struct DeliveryWriter {
    buf: BytesMut,
    count: usize,
    /// Bytes of the last batch finished: the next batch's first delivery reserves
    /// that much, so a batch grows its buffer once instead of doubling its way up
    /// (each step a copy, and often fresh memory the kernel zeroes).
    last_len: usize,
}

// Field keys: (field number << 3) | wire type (0 varint, 2 length-delimited).
const BATCH_DELIVERY: u8 = 1 << 3 | 2;
const TOPIC: u8 = 1 << 3 | 2;
const OFFSET: u8 = 2 << 3;
const EPOCH: u8 = 3 << 3;
const TIMESTAMP: u8 = 4 << 3;
const HEADER: u8 = 5 << 3 | 2;
const PAYLOAD: u8 = 6 << 3 | 2;
const SUBSCRIPTION_IDS: u8 = 7 << 3 | 2;

impl DeliveryWriter {
    pub fn new() -> DeliveryWriter {
        DeliveryWriter::default()
    }

    /// Deliveries written since the last [`DeliveryWriter::finish`].
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes written since the last [`DeliveryWriter::finish`].
    pub fn encoded_len(&self) -> usize {
        self.buf.len()
    }

    /// Appends one delivery.
    pub fn push<'a, H>(&mut self, delivery: DeliveryFields<'a, H>)
    where
        H: Iterator<Item = (&'a str, &'a str)> + Clone,
    {
        let ids_len: usize = delivery
            .subscription_ids
            .iter()
            .map(|&id| encoded_len_varint(id))
            .sum();
        let headers_len: usize = delivery
            .headers
            .clone()
            .map(|(key, value)| header_field_len(key, value))
            .sum();
        let len = bytes_field_len(delivery.topic.len())
            + varint_field_len(delivery.offset)
            + varint_field_len(delivery.epoch)
            + varint_field_len(delivery.timestamp_ms)
            + headers_len
            + bytes_field_len(delivery.payload.len())
            + bytes_field_len(ids_len);
        if self.count == 0 {
            // Reserved when the batch starts, not when the last one finished: by
            // now the last batch may be sent and its buffer free to take back.
            self.buf.reserve(self.last_len);
        }
        let mut out = Out::append(&mut self.buf, BATCH_DELIVERY, len);
        out.bytes_field(TOPIC, delivery.topic.as_bytes());
        out.varint_field(OFFSET, delivery.offset);
        out.varint_field(EPOCH, delivery.epoch);
        out.varint_field(TIMESTAMP, delivery.timestamp_ms);
        for (key, value) in delivery.headers {
            out.header(HEADER, key, value);
        }
        out.bytes_field(PAYLOAD, delivery.payload);
        if ids_len > 0 {
            out.byte(SUBSCRIPTION_IDS);
            out.varint(ids_len as u64);
            for &id in delivery.subscription_ids {
                out.varint(id);
            }
        }
        out.finish("a delivery");
        self.count += 1;
    }

    /// Appends a delivery held as a generated [`Delivery`].
    pub fn push_delivery(&mut self, delivery: &Delivery) {
        self.push(DeliveryFields {
            topic: &delivery.topic,
            offset: delivery.offset,
            epoch: delivery.epoch,
            timestamp_ms: delivery.timestamp_ms,
            headers: delivery
                .headers
                .iter()
                .map(|h| (h.key.as_str(), h.value.as_str())),
            payload: &delivery.payload,
            subscription_ids: &delivery.subscription_ids,
        });
    }

    /// The deliveries written so far as a batch; the writer starts over, reusing
    /// its buffer once the batch is gone (unless it grew past
    /// [`DeliveryWriter::KEPT_CAPACITY`], so that an idle writer holds little).
    pub fn finish(&mut self) -> DeliveryBatch {
        self.count = 0;
        self.last_len = self.buf.len();
        let encoded = if self.buf.capacity() > Self::KEPT_CAPACITY {
            std::mem::take(&mut self.buf).freeze()
        } else {
            self.buf.split().freeze()
        };
        DeliveryBatch {
            deliveries: Vec::new(),
            encoded,
        }
    }

    /// Buffer capacity a writer keeps between batches.
    pub const KEPT_CAPACITY: usize = 256 << 10;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::v1::{Header, SubscribeResponse, subscribe_response::Event};
    use prost::Message;

    /// A delivery whose values cross varint and length boundaries, with zeroes and
    /// empties, different for each `seed`.
    pub(crate) fn delivery(seed: u64) -> Delivery {
        let big = [0, 1, 127, 128, 16_383, 16_384, u64::MAX, 1 << 35];
        let pick = |n: u64| big[(seed.wrapping_mul(n) % big.len() as u64) as usize];
        Delivery {
            topic: if seed.is_multiple_of(7) {
                String::new()
            } else {
                format!("guild.{}", pick(3))
            },
            offset: pick(5),
            epoch: pick(11),
            timestamp_ms: pick(13),
            headers: (0..seed % 4)
                .map(|i| Header {
                    key: if i == 1 {
                        String::new()
                    } else {
                        format!("k{i}")
                    },
                    value: if i == 2 {
                        String::new()
                    } else {
                        "v".repeat((seed as usize * 37 + i as usize) % 300)
                    },
                })
                .collect(),
            payload: Bytes::from(vec![seed as u8; (seed as usize * 131) % 20_000]),
            subscription_ids: (0..seed % 5).map(pick).collect(),
        }
    }

    #[test]
    fn written_deliveries_are_the_bytes_prost_writes_and_decode_back() {
        let deliveries: Vec<Delivery> = (0..200).map(delivery).collect();
        let mut writer = DeliveryWriter::new();
        for d in &deliveries {
            writer.push_delivery(d);
        }
        assert_eq!(writer.len(), deliveries.len());
        let written = writer.finish();
        assert!(writer.is_empty());
        assert_eq!(writer.encoded_len(), 0);

        let generated = DeliveryBatch::new(deliveries.clone());
        assert_eq!(written.encode_to_vec(), generated.encode_to_vec());
        assert_eq!(written.encoded_len(), generated.encoded_len());

        // As the broker sends it: inside a SubscribeResponse.
        let response = SubscribeResponse {
            event: Some(Event::Deliveries(written)),
        };
        let decoded = SubscribeResponse::decode(response.encode_to_vec().as_slice()).unwrap();
        let Some(Event::Deliveries(batch)) = decoded.event else {
            panic!("not a batch: {decoded:?}");
        };
        assert_eq!(batch.deliveries, deliveries);
    }

    #[test]
    fn a_batch_mixes_generated_and_written_deliveries() {
        let mut writer = DeliveryWriter::new();
        writer.push_delivery(&delivery(3));
        let mut batch = writer.finish();
        batch.deliveries.push(delivery(4));
        let decoded = DeliveryBatch::decode(batch.encode_to_vec().as_slice()).unwrap();
        // Generated ones first, then the written ones.
        assert_eq!(decoded.deliveries, vec![delivery(4), delivery(3)]);
    }

    #[test]
    fn the_writer_starts_over_after_finish() {
        let mut writer = DeliveryWriter::new();
        writer.push_delivery(&delivery(1));
        let first = writer.finish();
        writer.push_delivery(&delivery(2));
        let second = writer.finish();
        drop(first);
        let decoded = DeliveryBatch::decode(second.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.deliveries, vec![delivery(2)]);
    }

    #[test]
    fn a_batch_starts_with_room_for_as_much_as_the_last_one() {
        let mut writer = DeliveryWriter::new();
        for seed in 1..60 {
            writer.push_delivery(&delivery(seed));
        }
        let last = writer.encoded_len();
        // While the last batch is still being sent.
        let held = writer.finish();
        writer.push_delivery(&delivery(1));
        assert!(
            writer.buf.capacity() >= last,
            "{} < {last}",
            writer.buf.capacity()
        );
        drop(held);
        writer.push_delivery(&delivery(2));
        let decoded = DeliveryBatch::decode(writer.finish().encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.deliveries, vec![delivery(1), delivery(2)]);
    }

    #[test]
    fn unknown_fields_of_a_batch_are_skipped() {
        let mut bytes = DeliveryBatch::new(vec![delivery(5)]).encode_to_vec();
        // Field 9, varint 300.
        bytes.extend_from_slice(&[9 << 3, 0xAC, 0x02]);
        let decoded = DeliveryBatch::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded.deliveries, vec![delivery(5)]);
    }
}
