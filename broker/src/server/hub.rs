//! The subscription hub: which subscriber streams follow which topics, and the live
//! tail that feeds them.
//!
//! The hub is the store's [`AppendObserver`]: each append hands it, under its shard's
//! lock, the records just appended, in log order, and the hub queues one event per
//! following stream for the whole batch: the runs of records in a row the stream
//! follows, each naming that stream's subscriptions (send once per edge; the edge
//! fans out). The hub never blocks the writer: a stream's queue is unbounded
//! but metered in bytes, and a stream that lets more than its cap pile up is cut off
//! (counted and logged), never waited for — a slow subscriber cannot slow producers
//! or other subscribers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, mpsc};

use crate::storage::{AppendObserver, Appended, NewRecord, Topic};

/// Records one shard appended in one step, shared by every stream that follows
/// some of them (nothing is copied per stream on the appending thread).
#[derive(Debug)]
pub struct LiveBatch {
    pub records: Vec<NewRecord>,
    pub positions: Vec<Appended>,
    pub timestamp_ms: u64,
}

/// The subscriptions of one stream to one topic, as `(id, generation)` pairs (an id
/// can be removed and used again; the generation tells the stream which use a
/// record was meant for).
pub type Subscribers = Arc<[(u64, u64)]>;

/// A run of records in a row of a [`LiveBatch`] (of one topic) for the same
/// subscriptions of a stream: a batch of one busy topic is one item, not one per
/// record (each held a reference to the subscriptions, counted up on the writer's
/// thread and down on the stream's).
#[derive(Debug)]
pub struct LiveItem {
    /// Where the run starts in the batch.
    pub first: u32,
    /// Records in the run (at least one).
    pub count: u32,
    pub subscribers: Subscribers,
}

impl LiveItem {
    /// Where the run's records are in the batch.
    pub fn indices(&self) -> std::ops::Range<usize> {
        self.first as usize..(self.first + self.count) as usize
    }
}

/// What the hub sends a stream.
#[derive(Debug)]
pub enum LiveEvent {
    /// Records of one appended batch, in log order. Each counts for
    /// [`record_bytes`] against the stream's cap until the stream releases it.
    Records {
        batch: Arc<LiveBatch>,
        items: Vec<LiveItem>,
    },
    /// The stream let more than its cap pile up and is cut off.
    CutOff { pending_bytes: usize },
}

/// The hub's side of one subscriber stream.
#[derive(Debug)]
pub struct StreamSink {
    id: u64,
    events: mpsc::UnboundedSender<LiveEvent>,
    /// Bytes queued for the stream and not yet handed to gRPC.
    pending_bytes: AtomicUsize,
    max_pending_bytes: usize,
    cut: AtomicBool,
    /// Wakes the stream when it is cut off, even while it waits to send.
    cut_signal: Notify,
}

impl StreamSink {
    /// Completes once the stream has been cut off.
    pub async fn cut_off(&self) {
        if !self.cut.load(Ordering::Relaxed) {
            self.cut_signal.notified().await;
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Counts bytes the stream has passed on (or dropped).
    pub fn release(&self, bytes: usize) {
        self.pending_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Counts bytes the stream holds back itself (replays in progress).
    pub fn hold(&self, bytes: usize) -> bool {
        let pending = self.pending_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        pending <= self.max_pending_bytes
    }

    /// Marks the stream cut off (counted and logged once) and wakes it.
    pub fn cut(&self, pending: usize, stats: &HubStats) {
        if !self.cut.swap(true, Ordering::Relaxed) {
            stats.slow_consumer_cutoffs.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                stream = self.id,
                pending,
                cap = self.max_pending_bytes,
                "slow consumer cut off"
            );
            let _ = self.events.send(LiveEvent::CutOff {
                pending_bytes: pending,
            });
            self.cut_signal.notify_one();
        }
    }

    /// Queues `items` (`records` records, `bytes` against the cap) of `batch`.
    fn push(
        &self,
        batch: Arc<LiveBatch>,
        items: Vec<LiveItem>,
        records: usize,
        bytes: usize,
        stats: &HubStats,
    ) {
        if self.cut.load(Ordering::Relaxed) {
            return;
        }
        let pending = self.pending_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if pending > self.max_pending_bytes {
            self.cut(pending, stats);
            return;
        }
        stats
            .deliveries
            .fetch_add(records as u64, Ordering::Relaxed);
        let _ = self.events.send(LiveEvent::Records { batch, items });
    }
}

/// The `count` records `items` name, copied out of `batch` (payloads too, which
/// otherwise share the publish request's buffer), with `items` renumbered to match.
fn compact(batch: &LiveBatch, items: &mut [LiveItem], count: usize) -> LiveBatch {
    let mut records = Vec::with_capacity(count);
    let mut positions = Vec::with_capacity(count);
    for item in items {
        let first = records.len() as u32;
        for index in item.indices() {
            let record = &batch.records[index];
            records.push(NewRecord {
                topic: record.topic.clone(),
                headers: record.headers.clone(),
                payload: bytes::Bytes::copy_from_slice(&record.payload),
            });
            positions.push(batch.positions[index]);
        }
        item.first = first;
    }
    LiveBatch {
        records,
        positions,
        timestamp_ms: batch.timestamp_ms,
    }
}

/// Bytes a delivery of `record` to `subscriptions` subscriptions counts for against
/// a stream's cap: its content plus a fixed allowance for framing.
pub fn record_bytes(record: &NewRecord, subscriptions: usize) -> usize {
    let headers: usize = record
        .headers
        .iter()
        .map(|h| h.key.len() + h.value.len() + 8)
        .sum();
    record.payload.len() + record.topic.len() + headers + 8 * subscriptions + 48
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct HubStats {
    pub deliveries: AtomicU64,
    pub slow_consumer_cutoffs: AtomicU64,
    pub subscriptions: AtomicU64,
    pub streams: AtomicU64,
}

/// A stream following a topic, with its subscriptions to it.
#[derive(Debug)]
struct Follower {
    sink: Arc<StreamSink>,
    subscriptions: Vec<(u64, u64)>,
    /// `subscriptions` as handed to the stream, made when a record first needs it
    /// after a change and shared from then on.
    shared: Option<Subscribers>,
}

impl Follower {
    fn subscribers(&mut self) -> Subscribers {
        self.shared
            .get_or_insert_with(|| self.subscriptions.as_slice().into())
            .clone()
    }
}

/// The followers of one shard's topics, and what a delivery step reuses.
#[derive(Debug, Default)]
struct ShardFollowers {
    topics: HashMap<String, Vec<Follower>>,
    /// Outgoing events of the step in progress, one per stream.
    outgoing: Vec<Outgoing>,
    /// Stream id → its slot in `outgoing`.
    slots: HashMap<u64, usize>,
}

#[derive(Debug)]
struct Outgoing {
    sink: Arc<StreamSink>,
    items: Vec<LiveItem>,
    /// Records in `items`.
    records: usize,
    bytes: usize,
}

/// Subscriber streams and the topics they follow.
#[derive(Debug)]
pub struct SubscriptionHub {
    /// One map per shard, locked by that shard's writer (when it delivers) and by
    /// streams adding or removing subscriptions of its topics.
    shards: Vec<Mutex<ShardFollowers>>,
    next_stream: AtomicU64,
    max_pending_bytes: usize,
    max_streams: usize,
    stats: Arc<HubStats>,
}

impl SubscriptionHub {
    pub fn new(shard_count: u32, max_pending_bytes: usize, max_streams: usize) -> Self {
        SubscriptionHub {
            shards: (0..shard_count)
                .map(|_| Mutex::new(ShardFollowers::default()))
                .collect(),
            next_stream: AtomicU64::new(1),
            max_pending_bytes,
            max_streams,
            stats: Arc::new(HubStats::default()),
        }
    }

    pub fn stats(&self) -> &Arc<HubStats> {
        &self.stats
    }

    fn shard(&self, shard: u32) -> MutexGuard<'_, ShardFollowers> {
        self.shards[shard as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a stream, or `None` when the broker already serves its limit of streams.
    pub fn open_stream(&self) -> Option<(Arc<StreamSink>, mpsc::UnboundedReceiver<LiveEvent>)> {
        let streams = self.stats.streams.fetch_add(1, Ordering::Relaxed);
        if streams >= self.max_streams as u64 {
            self.stats.streams.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let (events, receiver) = mpsc::unbounded_channel();
        let sink = Arc::new(StreamSink {
            id: self.next_stream.fetch_add(1, Ordering::Relaxed),
            events,
            pending_bytes: AtomicUsize::new(0),
            max_pending_bytes: self.max_pending_bytes,
            cut: AtomicBool::new(false),
            cut_signal: Notify::new(),
        });
        Some((sink, receiver))
    }

    /// Forgets a stream that ended (its subscriptions must be unfollowed first).
    pub fn close_stream(&self) {
        self.stats.streams.fetch_sub(1, Ordering::Relaxed);
    }

    /// Starts delivering `topic`'s new records to subscription `id` of `sink`. Call it
    /// on the shard's thread (which holds the shard's lock), so that no append falls
    /// between reading the topic's next offset and this.
    pub fn follow(
        &self,
        shard: u32,
        topic: &str,
        sink: &Arc<StreamSink>,
        id: u64,
        generation: u64,
    ) {
        let mut followers = self.shard(shard);
        let list = followers.topics.entry(topic.to_owned()).or_default();
        match list.iter_mut().find(|f| f.sink.id == sink.id) {
            Some(follower) => {
                follower.subscriptions.push((id, generation));
                follower.shared = None;
            }
            None => list.push(Follower {
                sink: sink.clone(),
                subscriptions: vec![(id, generation)],
                shared: None,
            }),
        }
        self.stats.subscriptions.fetch_add(1, Ordering::Relaxed);
    }

    /// Stops delivering `topic` to subscription `id` of stream `stream`.
    pub fn unfollow(&self, shard: u32, topic: &str, stream: u64, id: u64) {
        let mut followers = self.shard(shard);
        let Some(list) = followers.topics.get_mut(topic) else {
            return;
        };
        if let Some(index) = list.iter().position(|f| f.sink.id == stream) {
            let follower = &mut list[index];
            if let Some(at) = follower.subscriptions.iter().position(|&(i, _)| i == id) {
                follower.subscriptions.swap_remove(at);
                follower.shared = None;
                self.stats.subscriptions.fetch_sub(1, Ordering::Relaxed);
            }
            if follower.subscriptions.is_empty() {
                list.swap_remove(index);
            }
        }
        if list.is_empty() {
            followers.topics.remove(topic);
        }
    }
}

impl AppendObserver for SubscriptionHub {
    /// Queues one event per following stream for the whole batch: the records are
    /// shared, and a run of records of one topic looks its followers up once.
    fn appended(
        &self,
        shard: u32,
        records: Vec<NewRecord>,
        appended: &[Appended],
        timestamp_ms: u64,
    ) {
        let mut guard = self.shard(shard);
        if guard.topics.is_empty() {
            return;
        }
        let ShardFollowers {
            topics,
            outgoing,
            slots,
        } = &mut *guard;
        let batch = Arc::new(LiveBatch {
            records,
            positions: appended.to_vec(),
            timestamp_ms,
        });
        // The topic of the previous record and the slots of its followers.
        let mut run: Option<(&Topic, Vec<(usize, Subscribers)>)> = None;
        for (index, record) in batch.records.iter().enumerate() {
            let same_topic = run.as_ref().is_some_and(|(t, _)| **t == record.topic);
            if !same_topic {
                let Some(list) = topics.get_mut(record.topic.as_str()) else {
                    run = None;
                    continue;
                };
                let targets = list
                    .iter_mut()
                    .map(|follower| {
                        let slot = *slots.entry(follower.sink.id).or_insert_with(|| {
                            outgoing.push(Outgoing {
                                sink: follower.sink.clone(),
                                items: Vec::new(),
                                records: 0,
                                bytes: 0,
                            });
                            outgoing.len() - 1
                        });
                        (slot, follower.subscribers())
                    })
                    .collect();
                run = Some((&record.topic, targets));
            }
            let Some((_, targets)) = &run else { continue };
            for (slot, subscribers) in targets {
                let out = &mut outgoing[*slot];
                out.bytes += record_bytes(record, subscribers.len());
                out.records += 1;
                match out.items.last_mut() {
                    Some(last)
                        if last.indices().end == index
                            && Arc::ptr_eq(&last.subscribers, subscribers) =>
                    {
                        last.count += 1
                    }
                    _ => out.items.push(LiveItem {
                        first: index as u32,
                        count: 1,
                        subscribers: subscribers.clone(),
                    }),
                }
            }
        }
        drop(run);
        let batch_bytes: usize = batch.records.iter().map(|r| record_bytes(r, 0)).sum();
        for mut out in outgoing.drain(..) {
            // A stream is charged for its own records only, so it must not keep a
            // much larger batch alive while it lags: it gets a copy of its share.
            let shared = if out.bytes * 4 < batch_bytes {
                Arc::new(compact(&batch, &mut out.items, out.records))
            } else {
                batch.clone()
            };
            out.sink
                .push(shared, out.items, out.records, out.bytes, &self.stats);
        }
        slots.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn appended(n: usize) -> Vec<Appended> {
        (0..n as u64)
            .map(|offset| Appended { offset, epoch: 1 })
            .collect()
    }

    #[test]
    fn a_stream_with_a_small_share_of_a_batch_holds_only_its_records() {
        let hub = SubscriptionHub::new(1, 1 << 30, 10);
        let (small, mut small_rx) = hub.open_stream().unwrap();
        let (big, mut big_rx) = hub.open_stream().unwrap();
        hub.follow(0, "user.1", &small, 7, 1);
        hub.follow(0, "guild.1", &big, 8, 1);
        // 99 records of guild.1 and one of user.1 in one appended batch.
        let records: Vec<NewRecord> = (0..100)
            .map(|i| match i {
                50 => NewRecord::new("user.1", vec![b'u'; 100]),
                _ => NewRecord::new("guild.1", vec![b'g'; 100]),
            })
            .collect();
        hub.appended(0, records, &appended(100), 5);

        let Ok(LiveEvent::Records { batch, items }) = small_rx.try_recv() else {
            panic!("an event for the small stream");
        };
        assert_eq!(batch.records.len(), 1, "a copy of its share, not the batch");
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].indices(), 0..1);
        assert_eq!(batch.records[0].topic, "user.1");
        assert_eq!(batch.positions[0].offset, 50);
        assert_eq!(&items[0].subscribers[..], &[(7, 1)]);

        let Ok(LiveEvent::Records { batch, items }) = big_rx.try_recv() else {
            panic!("an event for the big stream");
        };
        assert_eq!(batch.records.len(), 100, "most of the batch: shared");
        // The records in a row are one item each side of the other topic's.
        let runs: Vec<_> = items.iter().map(LiveItem::indices).collect();
        assert_eq!(runs, [0..50, 51..100]);
        assert!(items.iter().all(|i| i.subscribers[..] == [(8, 1)]));
        assert!(
            items
                .iter()
                .flat_map(LiveItem::indices)
                .all(|index| batch.records[index].topic == "guild.1")
        );
    }

    #[test]
    fn each_stream_of_a_topic_gets_one_run_naming_all_its_subscriptions() {
        let hub = SubscriptionHub::new(1, 1 << 30, 10);
        let (one, mut one_rx) = hub.open_stream().unwrap();
        let (two, mut two_rx) = hub.open_stream().unwrap();
        hub.follow(0, "guild.1", &one, 7, 1);
        hub.follow(0, "guild.1", &two, 8, 1);
        hub.follow(0, "guild.1", &two, 9, 1);
        let records: Vec<NewRecord> = (0..100)
            .map(|_| NewRecord::new("guild.1", vec![b'g'; 100]))
            .collect();
        hub.appended(0, records, &appended(100), 5);

        let mut batches = Vec::new();
        for (rx, subscribers) in [
            (&mut one_rx, &[(7, 1)][..]),
            (&mut two_rx, &[(8, 1), (9, 1)]),
        ] {
            let Ok(LiveEvent::Records { batch, items }) = rx.try_recv() else {
                panic!("an event for each stream");
            };
            assert_eq!(items.len(), 1);
            assert_eq!(items[0].indices(), 0..100);
            assert_eq!(&items[0].subscribers[..], subscribers);
            batches.push(batch);
        }
        assert!(Arc::ptr_eq(&batches[0], &batches[1]), "one batch, shared");
        // A delivery per record per stream, whatever the stream's subscriptions.
        assert_eq!(hub.stats().deliveries.load(Ordering::Relaxed), 200);
    }

    #[test]
    fn a_copied_share_keeps_its_runs_and_their_records_in_log_order() {
        let hub = SubscriptionHub::new(1, 1 << 30, 10);
        let (stream, mut rx) = hub.open_stream().unwrap();
        hub.follow(0, "user.1", &stream, 7, 1);
        hub.follow(0, "user.2", &stream, 9, 1);
        // user.1 ×3, user.2 ×2, user.1 ×1, among 94 records of a topic not followed.
        let topic = |i: usize| match i {
            10..=12 | 40 => "user.1",
            20 | 21 => "user.2",
            _ => "guild.1",
        };
        let records: Vec<NewRecord> = (0..100)
            .map(|i| NewRecord::new(topic(i), vec![b'x'; 100]))
            .collect();
        hub.appended(0, records, &appended(100), 5);

        let Ok(LiveEvent::Records { batch, items }) = rx.try_recv() else {
            panic!("an event for the stream");
        };
        assert_eq!(batch.records.len(), 6, "a copy of its share");
        let runs: Vec<_> = items
            .iter()
            .map(|i| (i.indices(), i.subscribers[0].0))
            .collect();
        assert_eq!(runs, [(0..3, 7), (3..5, 9), (5..6, 7)]);
        let offsets: Vec<u64> = batch.positions.iter().map(|p| p.offset).collect();
        assert_eq!(offsets, [10, 11, 12, 20, 21, 40]);
        assert_eq!(hub.stats().deliveries.load(Ordering::Relaxed), 6);
    }
}
