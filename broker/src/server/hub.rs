//! The subscription hub: which subscriber streams follow which topics, and the live
//! tail that feeds them.
//!
//! The hub is the store's [`AppendObserver`]: each shard's writer thread hands it the
//! records it has just appended, in log order, and the hub queues one delivery per
//! following stream, naming that stream's subscriptions (send once per edge; the
//! edge fans out). The hub never blocks the writer: a stream's queue is unbounded
//! but metered in bytes, and a stream that lets more than its cap pile up is cut off
//! (counted and logged), never waited for — a slow subscriber cannot slow producers
//! or other subscribers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use switchyard_proto as pb;
use tokio::sync::{Notify, mpsc};

use crate::storage::{AppendObserver, Appended, NewRecord};

/// What the hub sends a stream.
#[derive(Debug)]
pub enum LiveEvent {
    /// A record for some of the stream's subscriptions, the generation of each (in
    /// the order of `subscription_ids`), and the bytes it counts for.
    Delivery(pb::Delivery, Vec<u64>, usize),
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

    fn push(&self, delivery: pb::Delivery, generations: Vec<u64>, stats: &HubStats) {
        if self.cut.load(Ordering::Relaxed) {
            return;
        }
        let bytes = delivery_bytes(&delivery);
        let pending = self.pending_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if pending > self.max_pending_bytes {
            self.cut(pending, stats);
            return;
        }
        stats.deliveries.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .events
            .send(LiveEvent::Delivery(delivery, generations, bytes));
    }
}

/// Bytes a delivery counts for against a stream's cap: its content plus a fixed
/// allowance for framing.
pub fn delivery_bytes(delivery: &pb::Delivery) -> usize {
    let headers: usize = delivery
        .headers
        .iter()
        .map(|h| h.key.len() + h.value.len() + 8)
        .sum();
    delivery.payload.len()
        + delivery.topic.len()
        + headers
        + 8 * delivery.subscription_ids.len()
        + 48
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct HubStats {
    pub deliveries: AtomicU64,
    pub slow_consumer_cutoffs: AtomicU64,
    pub subscriptions: AtomicU64,
    pub streams: AtomicU64,
}

/// A stream following a topic, with the ids of its subscriptions to that topic and
/// their generations (an id can be removed and used again; the generation tells the
/// stream which use a record was meant for).
#[derive(Debug)]
struct Follower {
    sink: Arc<StreamSink>,
    ids: Vec<u64>,
    generations: Vec<u64>,
}

/// Topic → followers, for the topics of one shard.
type ShardFollowers = HashMap<String, Vec<Follower>>;

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
                .map(|_| Mutex::new(HashMap::new()))
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
    /// on the shard's thread, so that no append falls between reading the topic's
    /// next offset and this.
    pub fn follow(
        &self,
        shard: u32,
        topic: &str,
        sink: &Arc<StreamSink>,
        id: u64,
        generation: u64,
    ) {
        let mut followers = self.shard(shard);
        let list = followers.entry(topic.to_owned()).or_default();
        match list.iter_mut().find(|f| f.sink.id == sink.id) {
            Some(follower) => {
                follower.ids.push(id);
                follower.generations.push(generation);
            }
            None => list.push(Follower {
                sink: sink.clone(),
                ids: vec![id],
                generations: vec![generation],
            }),
        }
        self.stats.subscriptions.fetch_add(1, Ordering::Relaxed);
    }

    /// Stops delivering `topic` to subscription `id` of stream `stream`.
    pub fn unfollow(&self, shard: u32, topic: &str, stream: u64, id: u64) {
        let mut followers = self.shard(shard);
        let Some(list) = followers.get_mut(topic) else {
            return;
        };
        if let Some(index) = list.iter().position(|f| f.sink.id == stream) {
            let follower = &mut list[index];
            if let Some(at) = follower.ids.iter().position(|&i| i == id) {
                follower.ids.swap_remove(at);
                follower.generations.swap_remove(at);
                self.stats.subscriptions.fetch_sub(1, Ordering::Relaxed);
            }
            if follower.ids.is_empty() {
                list.swap_remove(index);
            }
        }
        if list.is_empty() {
            followers.remove(topic);
        }
    }
}

impl AppendObserver for SubscriptionHub {
    fn appended(
        &self,
        shard: u32,
        records: &[NewRecord],
        appended: &[Appended],
        timestamp_ms: u64,
    ) {
        let followers = self.shard(shard);
        if followers.is_empty() {
            return;
        }
        for (record, position) in records.iter().zip(appended) {
            let Some(list) = followers.get(&record.topic) else {
                continue;
            };
            for follower in list {
                let delivery = pb::Delivery {
                    topic: record.topic.clone(),
                    offset: position.offset,
                    epoch: position.epoch,
                    timestamp_ms,
                    headers: record
                        .headers
                        .iter()
                        .map(|h| pb::Header {
                            key: h.key.clone(),
                            value: h.value.clone(),
                        })
                        .collect(),
                    payload: record.payload.clone(),
                    subscription_ids: follower.ids.clone(),
                };
                follower
                    .sink
                    .push(delivery, follower.generations.clone(), &self.stats);
            }
        }
    }
}
