//! Reading deliveries straight from a received `SubscribeResponse`, for clients.
//!
//! Why: decoding a batch with prost builds a generated `Delivery` per record, with
//! its topic and subscription ids in fresh allocations, reading every field through
//! the receive buffer's generic cursor. A gateway edge receives every event of its
//! guilds, so that was most of what a subscriber's CPU went to. Here a delivery's
//! payload is a slice of the received message (a reference count, no copy), its
//! topic held inline (or, if long, one copy shared by each run of deliveries of
//! that topic), and its ids (almost always one) are held inline too.
//!
//! What is accepted is what prost accepts for the same bytes: fields in any order,
//! repeated scalars last-wins (every occurrence of a string checked), ids packed or
//! not, unknown fields and groups skipped up to prost's recursion limit. Anything
//! other than a batch of deliveries (a subscription update, an empty event) is left
//! to prost: [`read_deliveries`] returns `None` for it.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

use prost::bytes::Bytes;

use crate::wire::{In, LEN, VARINT, WireError};

/// Longest topic name held inline: `guild.` or `user.` and a 20-digit id fit with
/// room to spare.
const INLINE_TOPIC_BYTES: usize = 38;

/// A topic name, cheap to clone. Reads as a `&str`.
///
/// Names of up to 38 bytes (`guild.<id>`, `user.<id>`) are held inline: making,
/// cloning and dropping one is a copy of 40 bytes, with no allocation to free on
/// another thread and no reference count shared between threads. A longer name is
/// one shared copy, cloned by reference count.
#[derive(Clone)]
pub struct Topic(Repr);

const _: () = assert!(std::mem::size_of::<Topic>() == 40);
// `PartialEq` compares the inline bytes as words at 0, 8, 16, 24 and the last 8.
const _: () = assert!(INLINE_TOPIC_BYTES >= 32 && INLINE_TOPIC_BYTES <= 40);

#[derive(Clone)]
enum Repr {
    /// The bytes past `len` are zero (`Topic::inline` is the only constructor):
    /// `PartialEq` compares all of them.
    Inline {
        len: u8,
        bytes: [u8; INLINE_TOPIC_BYTES],
    },
    Shared(Bytes),
}

impl Default for Topic {
    fn default() -> Topic {
        Topic::inline(b"").expect("the empty name fits")
    }
}

impl Topic {
    /// Checks that `bytes` are UTF-8; a long name keeps them, a short one is copied.
    pub fn from_utf8(bytes: Bytes) -> Result<Topic, std::str::Utf8Error> {
        std::str::from_utf8(&bytes)?;
        Ok(Topic::inline(&bytes).unwrap_or(Topic(Repr::Shared(bytes))))
    }

    /// `name` held inline, if it fits (callers check it is UTF-8).
    fn inline(name: &[u8]) -> Option<Topic> {
        let mut bytes = [0; INLINE_TOPIC_BYTES];
        bytes.get_mut(..name.len())?.copy_from_slice(name);
        Some(Topic(Repr::Inline {
            len: name.len() as u8,
            bytes,
        }))
    }

    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor checks UTF-8 (`from_utf8`) or starts from a
        // `str`, and the bytes never change.
        unsafe { std::str::from_utf8_unchecked(self.as_bytes()) }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Repr::Shared(bytes) => bytes,
        }
    }

    /// Whether the name is held inline (for tests).
    #[cfg(test)]
    pub(crate) fn is_inline(&self) -> bool {
        matches!(self.0, Repr::Inline { .. })
    }
}

impl Deref for Topic {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Topic {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for Topic {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq for Topic {
    /// Two inline names compare as their lengths and five words each, with no call
    /// to `memcmp` (the broker compares each record's topic with the one before it
    /// several times); this relies on the bytes past an inline name being zero.
    #[inline]
    fn eq(&self, other: &Topic) -> bool {
        match (&self.0, &other.0) {
            (Repr::Inline { len, bytes }, Repr::Inline { len: l, bytes: b }) => {
                // Words at 0, 8, 16, 24 and 30 cover the 38 bytes.
                let word = |bytes: &[u8; INLINE_TOPIC_BYTES], at: usize| {
                    u64::from_ne_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
                };
                let differ = [0, 8, 16, 24, INLINE_TOPIC_BYTES - 8]
                    .into_iter()
                    .fold(0, |acc, at| acc | (word(bytes, at) ^ word(b, at)));
                len == l && differ == 0
            }
            _ => self.as_bytes() == other.as_bytes(),
        }
    }
}

impl Eq for Topic {}

impl Hash for Topic {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialOrd for Topic {
    fn partial_cmp(&self, other: &Topic) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Topic {
    fn cmp(&self, other: &Topic) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl PartialEq<str> for Topic {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Topic {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Topic {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl From<String> for Topic {
    fn from(name: String) -> Topic {
        Topic::inline(name.as_bytes()).unwrap_or_else(|| Topic(Repr::Shared(Bytes::from(name))))
    }
}

impl From<&str> for Topic {
    fn from(name: &str) -> Topic {
        Topic::inline(name.as_bytes())
            .unwrap_or_else(|| Topic(Repr::Shared(Bytes::copy_from_slice(name.as_bytes()))))
    }
}

impl From<Topic> for String {
    fn from(topic: Topic) -> String {
        topic.as_str().to_owned()
    }
}

/// Inline room: a record reaches a stream once, for each of the stream's
/// subscriptions it matches — one, unless a client subscribes twice to a topic.
const INLINE_IDS: usize = 3;

/// The subscription ids a delivery is for; up to three are held without an
/// allocation. Reads as a `&[u64]`.
#[derive(Clone)]
pub struct SubscriptionIds(Ids);

#[derive(Clone)]
enum Ids {
    Inline { len: u8, ids: [u64; INLINE_IDS] },
    Heap(Vec<u64>),
}

impl SubscriptionIds {
    pub const fn new() -> SubscriptionIds {
        SubscriptionIds(Ids::Inline {
            len: 0,
            ids: [0; INLINE_IDS],
        })
    }

    pub fn push(&mut self, id: u64) {
        match &mut self.0 {
            Ids::Inline { len, ids } if usize::from(*len) < INLINE_IDS => {
                ids[usize::from(*len)] = id;
                *len += 1;
            }
            Ids::Inline { ids, .. } => {
                let mut heap = ids.to_vec();
                heap.push(id);
                self.0 = Ids::Heap(heap);
            }
            Ids::Heap(heap) => heap.push(id),
        }
    }

    pub fn as_slice(&self) -> &[u64] {
        match &self.0 {
            Ids::Inline { len, ids } => &ids[..usize::from(*len)],
            Ids::Heap(heap) => heap,
        }
    }
}

impl Default for SubscriptionIds {
    fn default() -> SubscriptionIds {
        SubscriptionIds::new()
    }
}

impl Deref for SubscriptionIds {
    type Target = [u64];

    fn deref(&self) -> &[u64] {
        self.as_slice()
    }
}

impl fmt::Debug for SubscriptionIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_slice(), f)
    }
}

impl PartialEq for SubscriptionIds {
    fn eq(&self, other: &SubscriptionIds) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for SubscriptionIds {}

impl Hash for SubscriptionIds {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state);
    }
}

impl PartialEq<[u64]> for SubscriptionIds {
    fn eq(&self, other: &[u64]) -> bool {
        self.as_slice() == other
    }
}

impl PartialEq<&[u64]> for SubscriptionIds {
    fn eq(&self, other: &&[u64]) -> bool {
        self.as_slice() == *other
    }
}

impl<const N: usize> PartialEq<[u64; N]> for SubscriptionIds {
    fn eq(&self, other: &[u64; N]) -> bool {
        self.as_slice() == other
    }
}

impl PartialEq<Vec<u64>> for SubscriptionIds {
    fn eq(&self, other: &Vec<u64>) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl FromIterator<u64> for SubscriptionIds {
    fn from_iter<I: IntoIterator<Item = u64>>(iter: I) -> SubscriptionIds {
        let mut ids = SubscriptionIds::new();
        for id in iter {
            ids.push(id);
        }
        ids
    }
}

impl From<Vec<u64>> for SubscriptionIds {
    fn from(ids: Vec<u64>) -> SubscriptionIds {
        if ids.len() <= INLINE_IDS {
            ids.into_iter().collect()
        } else {
            SubscriptionIds(Ids::Heap(ids))
        }
    }
}

impl<'a> IntoIterator for &'a SubscriptionIds {
    type Item = &'a u64;
    type IntoIter = std::slice::Iter<'a, u64>;

    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter()
    }
}

/// A delivery read by [`read_deliveries`]: the fields of a `Delivery`, with the
/// topic and payload sharing the received message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReceivedDelivery {
    pub topic: Topic,
    pub offset: u64,
    pub epoch: u64,
    pub timestamp_ms: u64,
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
    pub subscription_ids: SubscriptionIds,
}

/// Reads a whole `SubscribeResponse` message. When its event is a batch of
/// deliveries, returns them; `Ok(None)` for any other event (decode that one with
/// prost); an error for bytes that are not a valid message.
pub fn read_deliveries(message: &Bytes) -> Result<Option<Vec<ReceivedDelivery>>, WireError> {
    read_deliveries_as(message, |delivery| delivery)
}

/// [`read_deliveries`], each delivery made into a `T` by `wrap` as it is read:
/// the caller's own type (an event enum, say) is built in place in the vector,
/// rather than moved out of a vector of deliveries into another.
pub fn read_deliveries_as<T>(
    message: &Bytes,
    mut wrap: impl FnMut(ReceivedDelivery) -> T,
) -> Result<Option<Vec<T>>, WireError> {
    let mut input = In::new(message);
    let mut deliveries: Option<Vec<T>> = None;
    let mut topics = TopicCache::default();
    while !input.is_done() {
        let (field, wire_type) = input.key()?;
        match field {
            // `deliveries`: batches met more than once merge, as prost merges them.
            1 => {
                In::expect(wire_type, LEN)?;
                let batch = input.len_delimited()?;
                let deliveries = deliveries.get_or_insert_with(Vec::new);
                read_batch(message, &input, batch, deliveries, &mut topics, &mut wrap)?;
            }
            // `update`, or an event this reader does not know: prost decides.
            2 => return Ok(None),
            _ => input.skip(field, wire_type)?,
        }
    }
    Ok(deliveries)
}

/// The topic of the delivery (or publish record) before. A batch's records mostly
/// share a topic (a guild's events in a row): a name is checked for UTF-8 once per
/// run, and a long one is one copy shared by the run. A topic kept by the
/// application (or in the broker's live tail) never keeps the whole message alive.
#[derive(Default)]
pub(crate) struct TopicCache(Option<Topic>);

impl TopicCache {
    #[inline]
    pub(crate) fn get(&mut self, name: &[u8]) -> Result<Topic, WireError> {
        if let Some(topic) = &self.0
            && topic.as_bytes() == name
        {
            return Ok(topic.clone());
        }
        let name = std::str::from_utf8(name).map_err(|_| WireError("topic is not UTF-8"))?;
        let topic = Topic::from(name);
        self.0 = Some(topic.clone());
        Ok(topic)
    }
}

/// Reads the `DeliveryBatch` at `range` of `parent` (which starts at byte 0 of
/// `message`).
fn read_batch<T>(
    message: &Bytes,
    parent: &In<'_>,
    range: std::ops::Range<usize>,
    deliveries: &mut Vec<T>,
    topics: &mut TopicCache,
    wrap: &mut impl FnMut(ReceivedDelivery) -> T,
) -> Result<(), WireError> {
    let base = range.start;
    let mut input = parent.nested(range);
    while !input.is_done() {
        let (field, wire_type) = input.key()?;
        if field == 1 {
            In::expect(wire_type, LEN)?;
            let at = input.len_delimited()?;
            let delivery = read_delivery(message, &input, base, at, topics)?;
            deliveries.push(wrap(delivery));
        } else {
            input.skip(field, wire_type)?;
        }
    }
    Ok(())
}

/// Reads the `Delivery` at `range` of `parent`, which starts at byte `base` of
/// `message`. The fields are read into locals and the delivery is made once at the
/// end, inlined into the caller's push: filling a default delivery field by field
/// and moving it into the vector cost a third of the read (stores read back before
/// they had landed), measured with `cargo bench -p switchyard-proto --bench wire`.
#[inline(always)]
fn read_delivery(
    message: &Bytes,
    parent: &In<'_>,
    base: usize,
    range: std::ops::Range<usize>,
    topics: &mut TopicCache,
) -> Result<ReceivedDelivery, WireError> {
    let base = base + range.start;
    let mut input = parent.nested(range);
    let mut topic = None;
    let (mut offset, mut epoch, mut timestamp_ms) = (0, 0, 0);
    let mut headers = Vec::new();
    let mut payload = 0..0;
    let mut subscription_ids = SubscriptionIds::new();
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
                In::expect(wire_type, VARINT)?;
                offset = input.varint()?;
            }
            3 => {
                In::expect(wire_type, VARINT)?;
                epoch = input.varint()?;
            }
            4 => {
                In::expect(wire_type, VARINT)?;
                timestamp_ms = input.varint()?;
            }
            5 => {
                In::expect(wire_type, LEN)?;
                let header = input.len_delimited()?;
                headers.push(read_header(input.nested(header))?);
            }
            6 => {
                In::expect(wire_type, LEN)?;
                payload = input.len_delimited()?;
            }
            7 => match wire_type {
                LEN => {
                    let packed = input.len_delimited()?;
                    let mut ids = input.nested(packed);
                    while !ids.is_done() {
                        subscription_ids.push(ids.varint()?);
                    }
                }
                VARINT => subscription_ids.push(input.varint()?),
                _ => return Err(WireError("a known field has the wrong wire type")),
            },
            _ => input.skip(field, wire_type)?,
        }
    }
    Ok(ReceivedDelivery {
        topic: match topic {
            Some(name) => topics.get(input.slice(name))?,
            None => Topic::default(),
        },
        offset,
        epoch,
        timestamp_ms,
        headers,
        payload: if payload.is_empty() {
            Bytes::new()
        } else {
            message.slice(base + payload.start..base + payload.end)
        },
        subscription_ids,
    })
}

/// Reads a `Header` message (`input` covers exactly it).
pub(crate) fn read_header(mut input: In<'_>) -> Result<(String, String), WireError> {
    let (mut key, mut value) = (String::new(), String::new());
    while !input.is_done() {
        let (field, wire_type) = input.key()?;
        let target = match field {
            1 => &mut key,
            2 => &mut value,
            _ => {
                input.skip(field, wire_type)?;
                continue;
            }
        };
        In::expect(wire_type, LEN)?;
        // Every occurrence is checked, as prost checks it; the last counts.
        let range = input.len_delimited()?;
        let text = std::str::from_utf8(input.slice(range))
            .map_err(|_| WireError("header is not UTF-8"))?;
        target.clear();
        target.push_str(text);
    }
    Ok((key, value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::tests::delivery;
    use crate::v1::{
        Delivery, Header, Position, Started, SubscribeResponse, SubscriptionUpdate,
        subscribe_response::Event, subscription_update::State,
    };
    use crate::wire::test_bytes::{WITH_A_BAD_NAME, field, topics};
    use crate::{DeliveryBatch, DeliveryWriter};
    use prost::Message;

    fn received(d: Delivery) -> ReceivedDelivery {
        ReceivedDelivery {
            topic: d.topic.into(),
            offset: d.offset,
            epoch: d.epoch,
            timestamp_ms: d.timestamp_ms,
            headers: d.headers.into_iter().map(|h| (h.key, h.value)).collect(),
            payload: d.payload,
            subscription_ids: d.subscription_ids.into(),
        }
    }

    fn response(deliveries: Vec<Delivery>) -> Vec<u8> {
        SubscribeResponse {
            event: Some(Event::Deliveries(DeliveryBatch::new(deliveries))),
        }
        .encode_to_vec()
    }

    /// What the reader makes of `bytes` agrees with prost: an error only where prost
    /// errs, and the same deliveries where it reads them. Returns what it read.
    fn agrees_with_prost(bytes: &[u8]) -> Result<Option<Vec<ReceivedDelivery>>, WireError> {
        let read = read_deliveries(&Bytes::copy_from_slice(bytes));
        let decoded = SubscribeResponse::decode(bytes);
        match (&read, decoded) {
            (Err(error), Ok(decoded)) => {
                panic!("read failed ({error}) where prost decoded {decoded:?} from {bytes:?}")
            }
            (Ok(Some(deliveries)), Ok(decoded)) => {
                let Some(Event::Deliveries(batch)) = decoded.event else {
                    panic!("read deliveries where prost decoded {decoded:?} from {bytes:?}");
                };
                let expected: Vec<_> = batch.deliveries.into_iter().map(received).collect();
                assert_eq!(deliveries, &expected, "from {bytes:?}");
            }
            (Ok(Some(deliveries)), Err(error)) => {
                panic!("read {deliveries:?} where prost failed ({error}) on {bytes:?}")
            }
            // Left to prost, or failed with prost.
            (Ok(None), _) | (Err(_), Err(_)) => {}
        }
        read
    }

    #[test]
    fn a_written_batch_reads_as_prost_decodes_it() {
        let deliveries: Vec<Delivery> = (0..200).map(delivery).collect();
        let mut writer = DeliveryWriter::new();
        for d in &deliveries {
            writer.push_delivery(d);
        }
        let bytes = SubscribeResponse {
            event: Some(Event::Deliveries(writer.finish())),
        }
        .encode_to_vec();
        let read = agrees_with_prost(&bytes).unwrap().expect("a batch");
        assert_eq!(
            read,
            deliveries.into_iter().map(received).collect::<Vec<_>>()
        );
    }

    #[test]
    fn other_events_are_left_to_prost() {
        let update = SubscribeResponse {
            event: Some(Event::Update(SubscriptionUpdate {
                id: 3,
                state: Some(State::Started(Started {
                    next: Some(Position {
                        offset: 1,
                        epoch: 2,
                    }),
                })),
            })),
        }
        .encode_to_vec();
        assert_eq!(agrees_with_prost(&update), Ok(None));
        assert_eq!(agrees_with_prost(&[]), Ok(None));
        // An update after a batch replaces it (a oneof keeps the last): prost's call.
        let mut both = response(vec![delivery(1)]);
        both.extend_from_slice(&update);
        assert_eq!(agrees_with_prost(&both), Ok(None));
        // Two batches merge.
        let mut two = response(vec![delivery(1)]);
        two.extend_from_slice(&response(vec![delivery(2)]));
        assert_eq!(agrees_with_prost(&two).unwrap().unwrap().len(), 2);
    }

    #[test]
    fn any_field_order_repeats_unpacked_ids_and_unknown_fields_read_as_prost_reads_them() {
        let mut d = Vec::new();
        // ids unpacked (field 7, varint), payload before topic, offset twice (the
        // last counts), an unknown varint, fixed64 and group field, a header.
        d.extend_from_slice(&[7 << 3, 5, 7 << 3, 0x80, 0x01]);
        d.extend_from_slice(&[6 << 3 | 2, 2, b'h', b'i']);
        d.extend_from_slice(&[1 << 3 | 2, 3, b'g', b'.', b'1']);
        d.extend_from_slice(&[2 << 3, 9, 2 << 3, 10]);
        d.extend_from_slice(&[15 << 3, 1, 14 << 3 | 1, 1, 2, 3, 4, 5, 6, 7, 8]);
        d.extend_from_slice(&[13 << 3 | 3, 12 << 3, 1, 13 << 3 | 4]);
        d.extend_from_slice(&[5 << 3 | 2, 5, 1 << 3 | 2, 1, b'k', 3 << 3, 1]);
        d.extend_from_slice(&[7 << 3 | 2, 2, 1, 2]);
        let mut batch = vec![1 << 3 | 2, d.len() as u8];
        batch.extend_from_slice(&d);
        let mut message = vec![1 << 3 | 2, batch.len() as u8];
        message.extend_from_slice(&batch);
        let read = agrees_with_prost(&message).unwrap().unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].topic, "g.1");
        assert_eq!(read[0].offset, 10);
        assert_eq!(read[0].subscription_ids, [5, 128, 1, 2]);
        assert_eq!(read[0].headers, vec![("k".to_owned(), String::new())]);
        assert_eq!(&read[0].payload[..], b"hi");
    }

    #[test]
    fn every_truncation_and_byte_change_fails_or_reads_exactly_as_with_prost() {
        let mut deliveries: Vec<Delivery> = (1..6).map(delivery).collect();
        deliveries[1].headers.push(Header {
            key: "type".into(),
            value: "MESSAGE_CREATE".into(),
        });
        let bytes = response(deliveries);
        let mut failed = 0;
        for len in 0..bytes.len() {
            failed += usize::from(agrees_with_prost(&bytes[..len]).is_err());
        }
        assert!(failed > bytes.len() / 2, "most truncations are errors");
        for at in 0..bytes.len() {
            for value in [0x00, 0x01, 0x02, 0x03, 0x04, 0x07, 0x0a, 0x7f, 0x80, 0xff] {
                let mut changed = bytes.clone();
                changed[at] = value;
                let _ = agrees_with_prost(&changed);
            }
        }
    }

    /// A response with one delivery whose body is `delivery`.
    fn one_delivery(delivery: &[u8]) -> Vec<u8> {
        field(1 << 3 | 2, &field(1 << 3 | 2, delivery))
    }

    /// An unknown field 15 made of `depth` nested groups around a varint.
    fn groups(depth: usize) -> Vec<u8> {
        let mut out = vec![15 << 3 | 3; depth];
        out.extend_from_slice(&[15 << 3, 1]);
        out.extend(std::iter::repeat_n(15 << 3 | 4, depth));
        out
    }

    #[test]
    fn every_occurrence_of_a_string_is_checked_and_groups_nest_only_as_deep_as_prost_allows() {
        // A bad name anywhere among a delivery's topics: prost refuses the message,
        // and so must we; of good ones, the last counts (the second delivery finds
        // its name in the topic cache).
        for names in WITH_A_BAD_NAME {
            assert!(agrees_with_prost(&one_delivery(&topics(names))).is_err());
        }
        let mut two = one_delivery(&topics(&[b"g.1"]));
        two.extend(one_delivery(&topics(&[b"g.2", b"g.1"])));
        let read = agrees_with_prost(&two).unwrap().unwrap();
        assert!(read.iter().all(|delivery| delivery.topic == "g.1"));
        let mut keys = field(1 << 3 | 2, b"\xff");
        keys.extend(field(1 << 3 | 2, b"k"));
        assert!(agrees_with_prost(&one_delivery(&field(5 << 3 | 2, &keys))).is_err());
        // A delivery's unknown fields are 3 messages deep: 97 groups are fine, 98
        // are not; in a header (4 deep), 96 and 97.
        let read = |depth| agrees_with_prost(&one_delivery(&groups(depth)));
        assert!(read(97).unwrap().is_some());
        assert!(read(98).is_err());
        let header = |depth| agrees_with_prost(&one_delivery(&field(5 << 3 | 2, &groups(depth))));
        assert!(header(96).unwrap().is_some());
        assert!(header(97).is_err());
        // The top level: 99 and 100.
        assert_eq!(agrees_with_prost(&groups(99)), Ok(None));
        assert!(agrees_with_prost(&groups(100)).is_err());
    }

    #[test]
    fn a_topic_is_inline_or_a_copy_shared_by_its_run_not_a_slice_of_the_response() {
        let long = |i: u64| format!("guild.{i}.a-name-longer-than-a-topic-held-inline");
        let topics = [
            long(1),
            long(1),
            long(2),
            "user.12345678901234567890".to_owned(),
        ];
        let deliveries: Vec<Delivery> = topics
            .iter()
            .enumerate()
            .map(|(i, topic)| Delivery {
                topic: topic.clone(),
                offset: i as u64,
                ..Default::default()
            })
            .collect();
        let message = Bytes::from(response(deliveries));
        let read = read_deliveries(&message).unwrap().unwrap();
        let name = |i: usize| read[i].topic.as_bytes().as_ptr();
        assert_eq!(name(0), name(1), "one copy per run");
        assert_ne!(name(0), name(2));
        assert!(!message.as_ptr_range().contains(&name(0)));
        assert!(!read[0].topic.is_inline());
        // A short name is held inline.
        assert!(read[3].topic.is_inline());
        for (delivery, topic) in read.iter().zip(&topics) {
            assert_eq!(delivery.topic, *topic);
        }
    }

    #[test]
    fn subscription_ids_hold_three_inline_then_spill() {
        let mut ids = SubscriptionIds::new();
        assert!(ids.is_empty());
        for id in 1..=5 {
            ids.push(id);
            assert_eq!(ids.as_slice(), (1..=id).collect::<Vec<_>>().as_slice());
        }
        assert_eq!(ids, vec![1, 2, 3, 4, 5]);
        assert_eq!(SubscriptionIds::from(vec![9]), [9]);
        assert_eq!(format!("{:?}", SubscriptionIds::from(vec![1, 2])), "[1, 2]");
    }

    #[test]
    fn a_topic_reads_and_compares_as_its_name() {
        let topic = Topic::from("guild.1");
        assert_eq!(topic, "guild.1");
        assert_eq!(topic, "guild.1".to_owned());
        assert_eq!(topic.len(), 7);
        assert_eq!(format!("{topic} {topic:?}"), "guild.1 \"guild.1\"");
        assert_eq!(String::from(topic.clone()), "guild.1");
        assert!(Topic::from_utf8(Bytes::from_static(b"\xff")).is_err());
        let set: std::collections::HashSet<Topic> = [topic].into();
        assert!(set.contains("guild.1"));
        // The same, for a name too long to be held inline, however it was made.
        let name = "x".repeat(INLINE_TOPIC_BYTES + 1);
        for long in [
            Topic::from(name.as_str()),
            Topic::from(name.clone()),
            Topic::from_utf8(Bytes::from(name.clone())).unwrap(),
        ] {
            assert!(!long.is_inline());
            assert_eq!(long, name);
            assert_eq!(long, Topic::from(name.as_str()));
        }
        let fits = "x".repeat(INLINE_TOPIC_BYTES);
        assert!(Topic::from(fits.as_str()).is_inline());
        assert!(Topic::default().is_inline() && Topic::default().is_empty());
        // Topics are equal exactly when their names are, however each was made.
        // Names of one length that differ only in the last word's bytes, too.
        let (end, near_end) = ("x".repeat(37) + "y", "x".repeat(32) + "yxxxxx");
        let names = [
            "", "u", "u\0", "user.1", "user.10", "user.2", &fits, &end, &near_end, &name,
        ];
        let made = |n: &str| {
            [
                Topic::from(n),
                Topic::from(n.to_owned()),
                Topic::from_utf8(Bytes::copy_from_slice(n.as_bytes())).unwrap(),
            ]
        };
        for a in names {
            for b in names {
                for (x, y) in made(a).iter().zip(made(b).iter().rev()) {
                    assert_eq!(x == y, a == b, "{a:?} against {b:?}");
                }
            }
        }
    }
}
