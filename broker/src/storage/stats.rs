//! Counters a shard keeps for metrics. Relaxed atomics: each is read on its own.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters of one shard.
#[derive(Debug, Default)]
pub struct ShardStats {
    pub records_appended: AtomicU64,
    pub bytes_appended: AtomicU64,
    pub fsyncs: AtomicU64,
    pub fsync_nanos: AtomicU64,
    /// Frames whose CRC or structure was bad, found by recovery or by reads.
    pub crc_errors: AtomicU64,
    /// Bytes recovery stepped over to find the next valid frame in a sealed segment.
    pub corrupt_bytes_skipped: AtomicU64,
    /// Bytes recovery cut from the tail of the last segment (a torn or unfinished batch).
    pub truncated_bytes: AtomicU64,
    pub segments_dropped: AtomicU64,
    /// Topics removed from the registry because their whole history aged out.
    pub topics_expired: AtomicU64,
    pub topics: AtomicU64,
    pub segment_bytes: AtomicU64,
}

impl ShardStats {
    pub(crate) fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            records_appended: get(&self.records_appended),
            bytes_appended: get(&self.bytes_appended),
            fsyncs: get(&self.fsyncs),
            fsync_nanos: get(&self.fsync_nanos),
            crc_errors: get(&self.crc_errors),
            corrupt_bytes_skipped: get(&self.corrupt_bytes_skipped),
            truncated_bytes: get(&self.truncated_bytes),
            segments_dropped: get(&self.segments_dropped),
            topics_expired: get(&self.topics_expired),
            topics: get(&self.topics),
            segment_bytes: get(&self.segment_bytes),
        }
    }
}

/// A point-in-time copy of the counters (summed over shards by the store).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub records_appended: u64,
    pub bytes_appended: u64,
    pub fsyncs: u64,
    pub fsync_nanos: u64,
    pub crc_errors: u64,
    pub corrupt_bytes_skipped: u64,
    pub truncated_bytes: u64,
    pub segments_dropped: u64,
    pub topics_expired: u64,
    pub topics: u64,
    pub segment_bytes: u64,
}

impl std::ops::Add for StatsSnapshot {
    type Output = StatsSnapshot;

    fn add(self, o: StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            records_appended: self.records_appended + o.records_appended,
            bytes_appended: self.bytes_appended + o.bytes_appended,
            fsyncs: self.fsyncs + o.fsyncs,
            fsync_nanos: self.fsync_nanos + o.fsync_nanos,
            crc_errors: self.crc_errors + o.crc_errors,
            corrupt_bytes_skipped: self.corrupt_bytes_skipped + o.corrupt_bytes_skipped,
            truncated_bytes: self.truncated_bytes + o.truncated_bytes,
            segments_dropped: self.segments_dropped + o.segments_dropped,
            topics_expired: self.topics_expired + o.topics_expired,
            topics: self.topics + o.topics,
            segment_bytes: self.segment_bytes + o.segment_bytes,
        }
    }
}
