//! Storage settings. Defaults live in [`StoreConfig::new`]; [`StoreConfig::validate`]
//! rejects combinations that cannot work before anything touches the disk.

use std::path::PathBuf;
use std::time::Duration;

use crate::storage::error::OpenError;
use crate::storage::segment::SEGMENT_HEADER_LEN;

/// When appended data is forced to disk (`fdatasync` of the segment file). Whatever
/// the policy, a segment is synced when it is sealed and every shard is synced on a
/// clean close, and an append with [`crate::storage::Ack::Durable`] is answered only
/// after the sync that covers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Sync after every group of appends, before any of them is acknowledged. Appends
    /// that arrive together share one sync (group commit).
    Always,
    /// Sync at most this often while there is unsynced data; durable acks wait for the
    /// next tick.
    Interval(Duration),
    /// Never sync on a timer; leave write-back to the OS. Durable acks still force a
    /// sync at the end of their group.
    Never,
}

/// How much history a shard keeps. Whole segments are dropped, oldest first, never the
/// one being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Drop old segments while the shard's segments take more than this many bytes.
    pub max_bytes: Option<u64>,
    /// Drop a segment once its newest record is older than this.
    pub max_age: Option<Duration>,
}

/// Settings of a [`crate::storage::Store`].
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The data directory (created if missing).
    pub data_dir: PathBuf,
    /// Number of shards, used only when the data directory is created; afterwards the
    /// manifest's count wins.
    pub shard_count: u32,
    /// Size of a segment file; space is reserved (fallocate) when a segment is created.
    pub segment_bytes: u64,
    /// Largest encoded record (frame) accepted.
    pub max_record_bytes: u64,
    /// Largest batch (sum of encoded records) accepted in one append. At most
    /// `segment_bytes - 72` ([`batch_room`]) so that a batch always fits one segment.
    pub max_batch_bytes: u64,
    /// Most records in one append.
    pub max_batch_records: usize,
    pub fsync: FsyncPolicy,
    pub retention: Retention,
    /// Total bytes of segment files the store may reserve, across shards. Appends that
    /// would need more fail with [`crate::storage::AppendError::DiskBudgetExceeded`].
    pub disk_budget_bytes: Option<u64>,
    /// Operations (reads, subscriptions' starts, counts) waiting for a shard's thread
    /// before their callers wait. Appends do not queue: they run on the caller's
    /// thread, under the shard's lock.
    pub shard_queue_depth: usize,
    /// A page-cache window per shard: after each sync, synced data more than this
    /// many bytes behind the shard's newest synced byte is dropped from the page
    /// cache, in steps of at least 4 MiB (a reader that needs it reads it back from
    /// disk; pages read back are left to the kernel). Applies only where syncs
    /// happen: timed ones, durable acks', seals. `None` leaves the page cache to
    /// the kernel.
    pub page_cache_per_shard: Option<u64>,
}

/// The largest batch a segment of `segment_bytes` holds: all but its header and
/// its last 8 bytes (a segment is never filled to its end, so that recovery can
/// tell a sealed segment by its length).
pub fn batch_room(segment_bytes: u64) -> u64 {
    segment_bytes.saturating_sub(SEGMENT_HEADER_LEN as u64 + 8)
}

impl StoreConfig {
    /// Defaults that work out of the box for a single broker.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        StoreConfig {
            data_dir: data_dir.into(),
            shard_count: 16,
            segment_bytes: 64 << 20,
            max_record_bytes: 1 << 20,
            max_batch_bytes: 16 << 20,
            max_batch_records: 10_000,
            fsync: FsyncPolicy::Interval(Duration::from_millis(5)),
            retention: Retention {
                max_bytes: Some(4 << 30),
                max_age: Some(Duration::from_secs(7 * 24 * 3600)),
            },
            disk_budget_bytes: None,
            shard_queue_depth: 1024,
            page_cache_per_shard: None,
        }
    }

    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<(), OpenError> {
        let invalid = |reason: String| Err(OpenError::InvalidConfig { reason });
        if self.shard_count == 0 || self.shard_count > 4096 {
            return invalid(format!(
                "shard_count must be 1..=4096, got {}",
                self.shard_count
            ));
        }
        if self.segment_bytes < 64 << 10 || self.segment_bytes > 1 << 40 {
            return invalid(format!(
                "segment_bytes must be between 64 KiB and 1 TiB, got {}",
                self.segment_bytes
            ));
        }
        let room = batch_room(self.segment_bytes);
        if self.max_batch_bytes > room {
            return invalid(format!(
                "max_batch_bytes ({}) must fit in one segment ({room} usable bytes)",
                self.max_batch_bytes
            ));
        }
        if self.max_record_bytes > self.max_batch_bytes {
            return invalid(format!(
                "max_record_bytes ({}) must not exceed max_batch_bytes ({})",
                self.max_record_bytes, self.max_batch_bytes
            ));
        }
        if self.max_record_bytes < 1024 {
            return invalid(format!(
                "max_record_bytes must be at least 1024, got {}",
                self.max_record_bytes
            ));
        }
        if self.max_batch_records == 0 || self.shard_queue_depth == 0 {
            return invalid("max_batch_records and shard_queue_depth must be positive".into());
        }
        if let FsyncPolicy::Interval(every) = self.fsync
            && every.is_zero()
        {
            return invalid("an fsync interval must be positive (use Always instead)".into());
        }
        if let Some(budget) = self.disk_budget_bytes
            && budget < self.segment_bytes
        {
            return invalid(format!(
                "disk_budget_bytes ({budget}) must hold at least one segment ({})",
                self.segment_bytes
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        StoreConfig::new("/tmp/x").validate().unwrap();
    }

    #[test]
    fn batch_larger_than_a_segment_is_refused() {
        let mut config = StoreConfig::new("/tmp/x");
        config.segment_bytes = 1 << 20;
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("max_batch_bytes"), "{err}");
    }
}
