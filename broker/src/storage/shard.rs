//! A shard: one append log holding many topics, owned by one writer.
//!
//! Every record points back to its topic's previous record (`prev_pos`) and to the
//! record at `offset & (offset - 1)` (`skip_pos`), so a topic's history is a chain
//! through the shared log that a reader walks without scanning other topics' records:
//! finding offset `x` from the latest record takes O(log² n) hops, then the records up
//! to the requested count are collected by `prev_pos`.
//!
//! # Epochs
//! An epoch is `generation << 32 | n`: the store generation (bumped on every open)
//! and a counter. A topic gets a new epoch when it is created — for the first time, or
//! again after its whole history aged out — and on its first append after an unclean
//! stop (or after recovery found damage), because records it had may have been lost.
//! Records keep the epoch they were written with, so a reader that resumes from
//! `(offset, epoch)` — epoch being that of record `offset - 1`, the last it saw —
//! resumes exactly when that record still carries that epoch, and is told that
//! history was lost otherwise.

use std::path::Path;
use std::sync::Arc;

use crate::storage::config::Retention;
use crate::storage::error::{AppendError, IoError, OpenError, ReadError};
use crate::storage::log::{Deletion, DiskBudget, Roll, SegmentLog, SpareJob, SyncJob};
use crate::storage::record::{
    FLAG_BATCH_END, FrameMeta, MAX_HEADER_KEY_BYTES, MAX_HEADER_VALUE_BYTES, MAX_HEADERS,
    NO_POSITION, NewRecord, Record, Topic, encode_frame, frame_len, headers_encoded_len,
    padded_len,
};
use crate::storage::recovery::{RecoveryReport, ScanEvent, recover_shard, scan_segment};
use crate::storage::registry::TopicTable;
use crate::storage::segment::{CacheRelease, Spare};
use crate::storage::skips::{self, SkipCache};
use crate::storage::stats::ShardStats;
use crate::storage::topic::{topic_hash, validate_topic_name};

/// Where an appended record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub offset: u64,
    pub epoch: u64,
}

/// Bounds of one read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    pub max_records: usize,
    /// Stop before the payloads exceed this many bytes (at least one record is
    /// returned when one is available).
    pub max_bytes: usize,
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits {
            max_records: 1000,
            max_bytes: 4 << 20,
        }
    }
}

/// Records read from a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadBatch {
    pub records: Vec<Record>,
    /// The offset to read from next.
    pub next_offset: u64,
}

/// What a topic holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicInfo {
    /// Epoch of the latest record.
    pub epoch: u64,
    /// Oldest offset still retained.
    pub earliest_offset: u64,
    /// Offset the next record will get.
    pub next_offset: u64,
    pub latest_timestamp_ms: u64,
}

/// Settings a shard needs.
#[derive(Debug, Clone)]
pub struct ShardOptions {
    pub id: u32,
    pub segment_bytes: u64,
    pub max_record_bytes: u64,
    pub max_batch_bytes: u64,
    pub max_batch_records: usize,
    pub retention: Retention,
    /// Generation of this opening of the store (epochs are made from it).
    pub generation: u64,
    /// Topics whose latest epoch is below this get a new epoch on their next append.
    pub epoch_floor: u64,
    /// The previous stop was clean (decides how much recovery verifies).
    pub clean: bool,
    /// See [`crate::storage::StoreConfig::page_cache_per_shard`].
    pub page_cache_per_shard: Option<u64>,
}

impl ShardOptions {
    /// The options of shard `id` under `config`, for a first open (generation 1, no
    /// epoch floor, clean); the store sets those three from its state files.
    pub fn from_config(config: &crate::storage::config::StoreConfig, id: u32) -> Self {
        ShardOptions {
            id,
            segment_bytes: config.segment_bytes,
            max_record_bytes: config.max_record_bytes,
            max_batch_bytes: config.max_batch_bytes,
            max_batch_records: config.max_batch_records,
            retention: config.retention,
            generation: 1,
            epoch_floor: 0,
            clean: true,
            page_cache_per_shard: config.page_cache_per_shard,
        }
    }
}

/// A topic's latest record as the append path sees it.
#[derive(Debug, Clone, Copy)]
struct Latest {
    /// The topic's hash ([`topic_hash`]).
    hash: u64,
    /// Its slot in the registry: valid until the next insert of another topic or
    /// rebuild of the registry, so it is kept only for the record appended next
    /// ([`Shard::last`], cleared when retention rebuilds the registry).
    index: usize,
    pos: u64,
    meta: FrameMeta,
}

/// Hands out epochs: `generation << 32 | counter`.
#[derive(Debug)]
struct EpochSource {
    generation: u64,
    issued: u32,
}

impl EpochSource {
    fn remaining(&self) -> u64 {
        u64::from(u32::MAX - self.issued)
    }

    fn next(&mut self) -> u64 {
        self.issued += 1;
        self.generation << 32 | u64::from(self.issued)
    }
}

/// How a walk along a topic's chain ended early.
enum ChainBreak {
    /// The pointer leads to history that retention removed; `earliest` is the oldest
    /// offset reached.
    NotRetained { earliest: u64 },
    /// A record on the chain is unreadable or not the one expected.
    Damaged {
        position: u64,
        source: crate::storage::record::DecodeError,
    },
}

/// A single-writer shard.
#[derive(Debug)]
pub struct Shard {
    options: ShardOptions,
    log: SegmentLog,
    topics: TopicTable,
    epochs: EpochSource,
    stats: Arc<ShardStats>,
    /// Set when a sync failed: the page cache may have dropped data, so nothing more
    /// is acknowledged.
    failed: Option<String>,
    /// Long skip targets of busy topics, so that appends do not read old records.
    skips: SkipCache,
    /// The topic of the last record appended and that record, while the registry
    /// is unchanged but for appends: a batch of the topic that was last appended
    /// to starts from it, without reading the record back through the mapping
    /// (where the page it is on may be locked by a write-back the sync thread
    /// runs: the shard's thread waited for that ~200 times in a benchmark run).
    last: Option<(Topic, Latest)>,
    /// Tests: the most topic records back a skip walk has read.
    #[cfg(test)]
    walk_reach: std::cell::Cell<u64>,
    /// Tests: holds the sync jobs handed out.
    #[cfg(test)]
    pub(crate) sync_hold: Option<Arc<crate::storage::log::SyncHold>>,
}

impl Shard {
    /// Opens (recovering) the shard in `dir`.
    pub fn open(
        dir: &Path,
        options: ShardOptions,
        budget: Arc<DiskBudget>,
        stats: Arc<ShardStats>,
    ) -> Result<(Shard, RecoveryReport), OpenError> {
        if options.generation > u64::from(u32::MAX) {
            return Err(OpenError::InvalidConfig {
                reason: "store generation overflow".into(),
            });
        }
        let (log, topics, report) = recover_shard(
            dir,
            options.id,
            options.generation,
            options.segment_bytes,
            budget,
            options.clean,
            &stats,
        )?;
        stats
            .topics
            .store(topics.len() as u64, std::sync::atomic::Ordering::Relaxed);
        stats
            .segment_bytes
            .store(log.disk_bytes(), std::sync::atomic::Ordering::Relaxed);
        let epochs = EpochSource {
            generation: options.generation,
            issued: 0,
        };
        Ok((
            Shard {
                options,
                log,
                topics,
                epochs,
                stats,
                failed: None,
                skips: SkipCache::default(),
                last: None,
                #[cfg(test)]
                walk_reach: Default::default(),
                #[cfg(test)]
                sync_hold: None,
            },
            report,
        ))
    }

    pub fn id(&self) -> u32 {
        self.options.id
    }

    pub fn topic_count(&self) -> usize {
        self.topics.len()
    }

    /// Heap bytes of the topic registry.
    pub fn registry_memory_bytes(&self) -> usize {
        self.topics.memory_bytes()
    }

    pub fn stats(&self) -> &Arc<ShardStats> {
        &self.stats
    }

    fn find_topic(&self, topic: &[u8]) -> Option<usize> {
        let log = &self.log;
        self.topics
            .find(topic_hash(topic), |pos| log.topic_at(pos) == Some(topic))
    }

    fn latest_pos(&self, topic: &str) -> Option<u64> {
        self.find_topic(topic.as_bytes())
            .map(|i| self.topics.pos(i))
    }

    /// Retires epochs below `floor` (see the module docs).
    pub fn set_epoch_floor(&mut self, floor: u64) {
        self.options.epoch_floor = floor;
    }

    /// Appends a batch: all of it or, on error, none of it. The records are written
    /// contiguously to the newest segment, the last one flagged as the batch's end.
    /// They are in the page cache on return; [`Shard::sync`] makes them durable.
    pub fn append(
        &mut self,
        records: &[NewRecord],
        now_ms: u64,
    ) -> Result<Vec<Appended>, AppendError> {
        if let Some(reason) = &self.failed {
            return Err(AppendError::ShardFailed {
                shard: self.options.id,
                reason: reason.clone(),
            });
        }
        let o = &self.options;
        let total = check_batch(
            records,
            o.max_record_bytes,
            o.max_batch_bytes,
            o.max_batch_records,
        )?;
        if self.epochs.remaining() < records.len() as u64 {
            return Err(AppendError::EpochsExhausted);
        }
        if let Err(error) = self.ensure_room(total as usize) {
            // Retention may free what the budget needs.
            if !matches!(error, AppendError::DiskBudgetExceeded { .. })
                || self.enforce_retention(now_ms)? == 0
            {
                return Err(error);
            }
            // The room is wanted now, on the disk as in the budget: the dropped
            // segments' blocks are freed here, not left to the sync thread.
            for deletion in self.log.take_deletions() {
                deletion.run();
            }
            self.ensure_room(total as usize)?;
        }
        self.stats
            .segment_bytes
            .store(self.log.disk_bytes(), std::sync::atomic::Ordering::Relaxed);
        self.log.active_mut().reserve_staging(total as usize);
        let batch_start = self.log.end();
        let mut appended = Vec::with_capacity(records.len());
        let last = records.len() - 1;
        let last_before = self.last.take();
        let mut previous = last_before.as_ref().map(|(topic, latest)| (topic, *latest));
        for (i, record) in records.iter().enumerate() {
            let flags = if i == last { FLAG_BATCH_END } else { 0 };
            // A record of the same topic as the one before follows what that one
            // left: no hash, registry probe or read of the latest frame.
            let known = previous
                .filter(|(topic, _)| **topic == record.topic)
                .map(|(_, latest)| latest);
            let latest = self.append_one(record, known, flags, now_ms);
            appended.push(Appended {
                offset: latest.meta.offset,
                epoch: latest.meta.epoch,
            });
            previous = Some((&record.topic, latest));
        }
        // One write for the batch. If it fails, the batch is undone (nothing reads
        // it) and the shard stops, as after a failed sync: part of the batch may be in
        // the page cache and reach the disk, where recovery cuts it (it has no
        // batch-end frame).
        if let Err(error) = self.log.active_mut().write_staged() {
            tracing::error!(shard = self.options.id, %error, "writing a segment failed; the shard stops accepting appends");
            self.undo_staged(batch_start);
            self.failed = Some(error.to_string());
            return Err(AppendError::ShardFailed {
                shard: self.options.id,
                reason: error.to_string(),
            });
        }
        self.last = previous.map(|(topic, latest)| (topic.clone(), latest));
        ShardStats::add(&self.stats.records_appended, records.len() as u64);
        ShardStats::add(&self.stats.bytes_appended, total);
        Ok(appended)
    }

    /// Forgets the staged frames from log position `batch_start` on: each topic
    /// they touched goes back to its latest record before them (the frames' own
    /// back pointers say which), or leaves the registry if it had none. A full scan
    /// of the registry: this happens once, when the shard stops.
    fn undo_staged(&mut self, batch_start: u64) {
        let log = &self.log;
        self.topics.rewrite(|mut pos| {
            loop {
                if pos == NO_POSITION {
                    return None;
                }
                if pos < batch_start {
                    return Some(pos);
                }
                pos = log.meta_at(pos)?.0.prev_pos;
            }
        });
        self.stats.topics.store(
            self.topics.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.log.active_mut().discard_staged();
        // Staged positions may be in it.
        self.skips.clear();
    }

    /// Room for `bytes` in the newest segment; a failed seal stops the shard.
    fn ensure_room(&mut self, bytes: usize) -> Result<(), AppendError> {
        let result = self.log.ensure_room(bytes);
        if let Err(AppendError::ShardFailed { reason, .. }) = &result {
            tracing::error!(shard = self.options.id, %reason, "sealing a segment failed; the shard stops accepting appends");
            self.failed = Some(reason.clone());
        }
        result
    }

    /// Why the shard stopped accepting appends, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// The shard's directory.
    pub fn dir(&self) -> &Path {
        self.log.dir()
    }

    /// The topic's latest record, found through the registry (append path: no CRC
    /// check of a frame this process wrote or recovered).
    fn latest_appended(&self, hash: u64, topic: &[u8]) -> Option<Latest> {
        let log = &self.log;
        let index = self
            .topics
            .find(hash, |pos| log.topic_at(pos) == Some(topic))?;
        let pos = self.topics.pos(index);
        let (meta, _) = log.meta_at(pos).expect("registry points at a record");
        Some(Latest {
            hash,
            index,
            pos,
            meta,
        })
    }

    /// Appends one record; `known` is its topic's latest record when the caller has
    /// it (the record before in the batch was of the same topic).
    fn append_one(
        &mut self,
        record: &NewRecord,
        known: Option<Latest>,
        flags: u8,
        now_ms: u64,
    ) -> Latest {
        let topic = record.topic.as_bytes();
        let (found, hash) = match known {
            Some(latest) => (Some(latest), latest.hash),
            None => {
                let hash = topic_hash(topic);
                (self.latest_appended(hash, topic), hash)
            }
        };
        let (offset, epoch, prev_pos, skip_pos) = match found {
            Some(Latest {
                pos: latest_pos,
                meta: latest,
                ..
            }) => {
                let offset = latest.offset + 1;
                let epoch = if latest.epoch < self.options.epoch_floor {
                    self.epochs.next()
                } else {
                    latest.epoch
                };
                let level = offset.trailing_zeros();
                let skip_pos = if level < skips::MIN_LEVEL {
                    self.skip_target(latest_pos, latest, offset)
                } else if let Some(pos) = self.skips.get(hash, topic, level) {
                    // Retention may have dropped it since; the walk would not
                    // reach it either.
                    if pos < self.log.start() {
                        NO_POSITION
                    } else {
                        pos
                    }
                } else {
                    let pos = self.skip_target(latest_pos, latest, offset);
                    if pos != NO_POSITION {
                        self.skips
                            .learned(hash, topic, level, offset & (offset - 1), pos);
                    }
                    pos
                };
                (offset, epoch, latest_pos, skip_pos)
            }
            None => {
                // Created anew: what the cache knew of an earlier life is wrong.
                self.skips.forget(hash, topic);
                (0, self.epochs.next(), NO_POSITION, NO_POSITION)
            }
        };
        let meta = FrameMeta {
            flags,
            offset,
            epoch,
            timestamp_ms: now_ms,
            prev_pos,
            skip_pos,
        };
        let pos = self.log.end();
        let segment = self.log.active_mut();
        let written = encode_frame(
            segment.spare_mut(),
            &meta,
            topic,
            &record.headers,
            &record.payload,
        );
        segment.commit(written, now_ms);
        self.skips.appended(hash, topic, offset, pos);
        let index = match found {
            Some(latest) => {
                self.topics.set_pos(latest.index, pos);
                latest.index
            }
            None => {
                ShardStats::add(&self.stats.topics, 1);
                self.topics.insert(hash, pos)
            }
        };
        Latest {
            hash,
            index,
            pos,
            meta,
        }
    }

    /// Position of the record at `offset & (offset - 1)`, found from the latest record
    /// (`offset - 1`). Amortised one hop per append. Any doubt gives `NO_POSITION`,
    /// which only makes later reads take more hops.
    fn skip_target(&self, mut pos: u64, mut meta: FrameMeta, offset: u64) -> u64 {
        let target = offset & (offset - 1);
        let start = self.log.start();
        while meta.offset > target {
            let skip_offset = meta.offset & (meta.offset - 1);
            let next = if skip_offset >= target && meta.skip_pos != NO_POSITION {
                meta.skip_pos
            } else {
                meta.prev_pos
            };
            // Pointers only lead backwards; anything else is damage.
            if next == NO_POSITION || next < start || next >= pos {
                return NO_POSITION;
            }
            match self.log.meta_at(next) {
                Some((m, _)) => (pos, meta) = (next, m),
                None => return NO_POSITION,
            }
            #[cfg(test)]
            self.walk_reach
                .set(self.walk_reach.get().max(offset - meta.offset.min(offset)));
        }
        if meta.offset == target {
            pos
        } else {
            NO_POSITION
        }
    }

    /// Forces appended data to disk. After a failure the shard refuses appends: the
    /// kernel may have dropped the dirty pages, so nothing more can be promised.
    pub fn sync(&mut self) -> Result<(), IoError> {
        if !self.log.is_dirty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let result = self.log.sync();
        ShardStats::add(&self.stats.fsyncs, 1);
        ShardStats::add(&self.stats.fsync_nanos, started.elapsed().as_nanos() as u64);
        if let Err(error) = &result {
            tracing::error!(shard = self.options.id, %error, "sync failed; the shard stops accepting appends");
            self.failed = Some(error.to_string());
        }
        result
    }

    /// A sync of what is written and not yet on disk, for another thread to run (see
    /// `worker`); appends may go on meanwhile. Report its end to
    /// [`Shard::sync_finished`].
    pub fn sync_job(&self) -> Option<SyncJob> {
        #[allow(unused_mut)]
        let mut job = self.log.sync_job()?;
        #[cfg(test)]
        {
            job.hold = self.sync_hold.clone();
        }
        Some(job)
    }

    /// `job` ended with `result` after `took`. A failure stops the shard, as in
    /// [`Shard::sync`].
    pub fn sync_finished(
        &mut self,
        job: &SyncJob,
        result: Result<(), IoError>,
        took: std::time::Duration,
    ) -> Result<(), IoError> {
        ShardStats::add(&self.stats.fsyncs, 1);
        ShardStats::add(&self.stats.fsync_nanos, took.as_nanos() as u64);
        match &result {
            Ok(()) => self.log.synced(job),
            Err(error) => {
                tracing::error!(shard = self.options.id, %error, "sync failed; the shard stops accepting appends");
                self.failed = Some(error.to_string());
            }
        }
        result
    }

    /// The work of segment rolls since the last call, for the sync thread, in
    /// order and before any later [`Shard::sync_job`] (see [`SegmentLog::take_rolls`]).
    pub fn take_rolls(&mut self) -> Vec<Roll> {
        self.log.take_rolls()
    }

    /// Retention leaves the disk work of deleting a segment to the caller
    /// ([`Shard::take_deletions`]; see [`Deletion`]).
    pub fn defer_deletions(&mut self) {
        self.log.defer_deletions();
    }

    /// The segments retention dropped since the last call, when deletions are
    /// deferred.
    pub fn take_deletions(&mut self) -> Vec<Deletion> {
        self.log.take_deletions()
    }

    /// A roll's work ended (see [`SegmentLog::sealed`]). A failure stops the shard,
    /// as a failed sync does.
    pub fn sealed(&mut self, base: u64, freed: u64, result: Result<(), IoError>) {
        if let Err(error) = self.log.sealed(base, freed, result) {
            tracing::error!(shard = self.options.id, %error, "sealing a segment failed; the shard stops accepting appends");
            self.fail(error.to_string());
        }
        self.store_disk_bytes();
    }

    /// A spare segment file to make for the next roll, if one is wanted (see
    /// [`SegmentLog::spare_job`]).
    pub fn spare_job(&mut self) -> Option<SpareJob> {
        self.log.spare_job()
    }

    pub fn spare_made(&mut self, result: Result<Spare, IoError>) {
        self.log.spare_made(result);
        self.store_disk_bytes();
    }

    /// Deletes the spare segment file, and stops counting a wanted one (the shard
    /// stops, failed, or lost its sync thread).
    pub fn discard_spare(&mut self) {
        self.log.discard_spare();
        self.store_disk_bytes();
    }

    /// Tests: the rolls' work waits for `hold` (see [`SyncHold`]).
    #[cfg(test)]
    pub(crate) fn hold_rolls(&mut self, hold: Arc<crate::storage::log::SyncHold>) {
        self.log.roll_hold = Some(hold);
    }

    /// Stops the shard: nothing more is appended or acknowledged.
    pub fn fail(&mut self, reason: String) {
        self.failed.get_or_insert(reason);
    }

    fn store_disk_bytes(&self) {
        self.stats
            .segment_bytes
            .store(self.log.disk_bytes(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Drops synced data behind the page-cache window from the page cache, when the
    /// shard has one (`StoreConfig::page_cache_per_shard`): unmaps it here and
    /// returns the rest of the work (see [`SegmentLog::release_cache`]). Run after a
    /// sync, once the appends waiting for it are answered.
    pub fn release_page_cache(&mut self) -> Vec<CacheRelease> {
        match self.options.page_cache_per_shard {
            Some(keep) => self.log.release_cache(keep),
            None => Vec::new(),
        }
    }

    pub fn is_dirty(&self) -> bool {
        self.log.is_dirty()
    }

    /// Drops segments past the retention limits; returns how many were dropped.
    /// Topics whose latest record went with them leave the registry.
    pub fn enforce_retention(&mut self, now_ms: u64) -> Result<usize, IoError> {
        let Retention { max_bytes, max_age } = self.options.retention;
        let mut dropped = 0;
        let mut failure = Ok(());
        while let Some(oldest) = self.log.segments().first() {
            if self.log.segments().len() < 2 {
                break;
            }
            let over_size = max_bytes.is_some_and(|max| self.log.disk_bytes() > max);
            let too_old = max_age.is_some_and(|age| {
                oldest
                    .last_timestamp_ms()
                    .saturating_add(age.as_millis() as u64)
                    < now_ms
            });
            if !(over_size || too_old) {
                break;
            }
            match self.log.drop_oldest() {
                Ok(true) => dropped += 1,
                Ok(false) => break,
                Err(error) => {
                    failure = Err(error);
                    break;
                }
            }
        }
        if dropped > 0 {
            // Its record may be gone, and the registry's slots move.
            self.last = None;
            let start = self.log.start();
            let expired = self.topics.retain(|pos| pos >= start);
            ShardStats::add(&self.stats.segments_dropped, dropped as u64);
            ShardStats::add(&self.stats.topics_expired, expired as u64);
            self.stats.topics.store(
                self.topics.len() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        self.stats
            .segment_bytes
            .store(self.log.disk_bytes(), std::sync::atomic::Ordering::Relaxed);
        failure.map(|()| dropped)
    }

    /// Follows one pointer of the chain of `topic`, checking that it leads to the
    /// expected record.
    fn hop(
        &self,
        topic: &[u8],
        pointer: u64,
        from: u64,
        expected_offset: u64,
        current_offset: u64,
    ) -> Result<FrameMeta, ChainBreak> {
        if pointer == NO_POSITION || pointer < self.log.start() {
            return Err(ChainBreak::NotRetained {
                earliest: current_offset,
            });
        }
        if pointer >= from {
            return Err(ChainBreak::Damaged {
                position: from,
                source: crate::storage::record::DecodeError::BadLayout {
                    what: "pointer does not lead backwards",
                },
            });
        }
        match self.log.frame_at(pointer) {
            Ok(view) if view.topic == topic && view.meta.offset == expected_offset => Ok(view.meta),
            Ok(_) => Err(ChainBreak::Damaged {
                position: pointer,
                source: crate::storage::record::DecodeError::BadLayout {
                    what: "pointer leads to another record",
                },
            }),
            Err(source) => {
                ShardStats::add(&self.stats.crc_errors, 1);
                Err(ChainBreak::Damaged {
                    position: pointer,
                    source,
                })
            }
        }
    }

    /// Walks back from the latest record to `target`; returns its position and fields.
    fn descend(
        &self,
        topic: &[u8],
        mut pos: u64,
        mut meta: FrameMeta,
        target: u64,
    ) -> Result<(u64, FrameMeta), ChainBreak> {
        let start = self.log.start();
        while meta.offset > target {
            let skip_offset = meta.offset & (meta.offset - 1);
            let (next, expected) = if skip_offset >= target
                && meta.skip_pos != NO_POSITION
                && meta.skip_pos >= start
            {
                (meta.skip_pos, skip_offset)
            } else {
                (meta.prev_pos, meta.offset - 1)
            };
            meta = self.hop(topic, next, pos, expected, meta.offset)?;
            pos = next;
        }
        Ok((pos, meta))
    }

    /// Positions of records `from..=last` by the chain.
    fn chain_positions(
        &self,
        topic: &[u8],
        latest_pos: u64,
        latest: FrameMeta,
        from: u64,
        last: u64,
    ) -> Result<Vec<u64>, ChainBreak> {
        let (mut pos, mut meta) = self.descend(topic, latest_pos, latest, last)?;
        let mut positions = Vec::with_capacity((last - from + 1) as usize);
        positions.push(pos);
        while meta.offset > from {
            let next = meta.prev_pos;
            meta = self.hop(topic, next, pos, meta.offset - 1, meta.offset)?;
            pos = next;
            positions.push(pos);
        }
        positions.reverse();
        Ok(positions)
    }

    /// The latest record's fields, verified.
    fn latest(&self, topic: &str) -> Result<Option<(u64, FrameMeta)>, ReadError> {
        validate_topic_name(topic).map_err(|source| ReadError::InvalidTopic {
            topic: topic.to_owned(),
            source,
        })?;
        let Some(pos) = self.latest_pos(topic) else {
            return Ok(None);
        };
        match self.log.frame_at(pos) {
            Ok(view) => Ok(Some((pos, view.meta))),
            Err(source) => Err(ReadError::CorruptRecord {
                topic: topic.to_owned(),
                offset: u64::MAX,
                position: pos,
                next: 0,
                source,
            }),
        }
    }

    /// Reads `topic` forward from offset `from`.
    pub fn read(&self, topic: &str, from: u64, limits: ReadLimits) -> Result<ReadBatch, ReadError> {
        let Some((latest_pos, latest)) = self.latest(topic)? else {
            return if from == 0 {
                Ok(ReadBatch {
                    records: Vec::new(),
                    next_offset: 0,
                })
            } else {
                Err(ReadError::OffsetOutOfRange {
                    topic: topic.to_owned(),
                    requested: from,
                    next: 0,
                })
            };
        };
        let next = latest.offset + 1;
        if from > next {
            return Err(ReadError::OffsetOutOfRange {
                topic: topic.to_owned(),
                requested: from,
                next,
            });
        }
        if from == next || limits.max_records == 0 {
            return Ok(ReadBatch {
                records: Vec::new(),
                next_offset: from,
            });
        }
        let last = (next - 1).min(from.saturating_add(limits.max_records as u64 - 1));
        let positions = match self.chain_positions(topic.as_bytes(), latest_pos, latest, from, last)
        {
            Ok(positions) => positions,
            Err(ChainBreak::NotRetained { earliest }) => {
                return Err(ReadError::OffsetNotRetained {
                    topic: topic.to_owned(),
                    requested: from,
                    earliest,
                });
            }
            Err(ChainBreak::Damaged { position, source }) => {
                tracing::warn!(topic, position, %source, "damaged record on a topic's chain; reading by scan");
                self.scan_positions(topic, from, last, latest_pos, position, source)?
            }
        };
        let mut records = Vec::with_capacity(positions.len());
        let mut bytes = 0;
        for pos in positions {
            let view = self
                .log
                .frame_at(pos)
                .expect("verified while walking the chain");
            if !records.is_empty() && bytes + view.payload.len() > limits.max_bytes {
                break;
            }
            bytes += view.payload.len();
            records.push(
                view.to_record()
                    .map_err(|source| ReadError::CorruptRecord {
                        topic: topic.to_owned(),
                        offset: view.meta.offset,
                        position: pos,
                        next: view.meta.offset + 1,
                        source,
                    })?,
            );
        }
        let next_offset = from + records.len() as u64;
        Ok(ReadBatch {
            records,
            next_offset,
        })
    }

    /// The slow path for a broken chain: scan the whole retained log for the topic's
    /// records, and return the run that starts at `from`.
    fn scan_positions(
        &self,
        topic: &str,
        from: u64,
        last: u64,
        latest_pos: u64,
        damage: u64,
        source: crate::storage::record::DecodeError,
    ) -> Result<Vec<u64>, ReadError> {
        let mut found = std::collections::BTreeMap::new();
        let mut earliest = u64::MAX;
        for segment in self.log.segments() {
            if segment.base() > latest_pos {
                break;
            }
            scan_segment(segment, segment.len(), true, |event| {
                if let ScanEvent::Frame { pos, view } = event
                    && pos <= latest_pos
                    && view.topic == topic.as_bytes()
                {
                    earliest = earliest.min(view.meta.offset);
                    if (from..=last).contains(&view.meta.offset) {
                        found.insert(view.meta.offset, pos);
                    }
                }
            });
        }
        if from < earliest {
            return Err(ReadError::OffsetNotRetained {
                topic: topic.to_owned(),
                requested: from,
                earliest,
            });
        }
        let positions: Vec<u64> = (from..=last)
            .map_while(|offset| found.get(&offset).copied())
            .collect();
        if positions.is_empty() {
            return Err(ReadError::CorruptRecord {
                topic: topic.to_owned(),
                offset: from,
                position: damage,
                next: from + 1,
                source,
            });
        }
        Ok(positions)
    }

    /// The last `count` retained records of `topic`.
    pub fn read_latest(
        &self,
        topic: &str,
        count: usize,
        max_bytes: usize,
    ) -> Result<ReadBatch, ReadError> {
        let Some(info) = self.topic_info(topic)? else {
            return Ok(ReadBatch {
                records: Vec::new(),
                next_offset: 0,
            });
        };
        let from = info
            .next_offset
            .saturating_sub(count as u64)
            .max(info.earliest_offset);
        self.read(
            topic,
            from,
            ReadLimits {
                max_records: count,
                max_bytes,
            },
        )
    }

    /// Offsets, epoch and retained range of `topic`, or `None` if it has no records.
    pub fn topic_info(&self, topic: &str) -> Result<Option<TopicInfo>, ReadError> {
        let Some((pos, latest)) = self.latest(topic)? else {
            return Ok(None);
        };
        Ok(Some(TopicInfo {
            epoch: latest.epoch,
            earliest_offset: self.earliest_offset(topic, pos, latest),
            next_offset: latest.offset + 1,
            latest_timestamp_ms: latest.timestamp_ms,
        }))
    }

    fn earliest_offset(&self, topic: &str, pos: u64, latest: FrameMeta) -> u64 {
        match self.descend(topic.as_bytes(), pos, latest, 0) {
            Ok((_, meta)) => meta.offset,
            Err(ChainBreak::NotRetained { earliest }) => earliest,
            Err(ChainBreak::Damaged { .. }) => {
                // Find the oldest record by scan (rare: only after damage).
                match self.scan_positions(
                    topic,
                    0,
                    0,
                    pos,
                    0,
                    crate::storage::record::DecodeError::End,
                ) {
                    Err(ReadError::OffsetNotRetained { earliest, .. }) => earliest,
                    _ => 0,
                }
            }
        }
    }

    /// Checks that a reader can resume `topic` exactly at `offset`, having last seen a
    /// record of epoch `epoch` (the epoch of record `offset - 1`).
    pub fn validate_position(&self, topic: &str, offset: u64, epoch: u64) -> Result<(), ReadError> {
        let info = self.topic_info(topic)?;
        let lost = |info: Option<TopicInfo>| {
            let info = info.unwrap_or(TopicInfo {
                epoch: 0,
                earliest_offset: 0,
                next_offset: 0,
                latest_timestamp_ms: 0,
            });
            Err(ReadError::HistoryLost {
                topic: topic.to_owned(),
                offset,
                epoch,
                current_epoch: info.epoch,
                earliest: info.earliest_offset,
                next: info.next_offset,
            })
        };
        let Some(current) = info else {
            return if offset == 0 { Ok(()) } else { lost(None) };
        };
        // A reader can only have seen offsets below the next one; a position past it
        // means records it saw are gone (a crash took them before the epoch changed).
        if offset > current.next_offset {
            return lost(info);
        }
        if offset < current.earliest_offset {
            return lost(info);
        }
        // Nothing seen yet (offset 0, still retained): nothing can have been lost.
        if offset == 0 {
            return Ok(());
        }
        // The record the reader saw last, or (when it aged out) the first it will see.
        let check = if offset > current.earliest_offset {
            offset - 1
        } else {
            offset
        };
        let seen = self.read(
            topic,
            check,
            ReadLimits {
                max_records: 1,
                max_bytes: 0,
            },
        )?;
        match seen.records.first() {
            Some(record) if record.epoch == epoch => Ok(()),
            _ => lost(info),
        }
    }

    /// Scans every record of the shard in log order (for tools and tests).
    pub fn for_each_record(&self, mut f: impl FnMut(u64, Record)) {
        for segment in self.log.segments() {
            scan_segment(segment, segment.len(), true, |event| {
                if let ScanEvent::Frame { pos, view } = event
                    && let Ok(record) = view.to_record()
                {
                    f(pos, record);
                }
            });
        }
    }
}

/// Checks a batch against the limits; returns its encoded size in the log.
pub fn check_batch(
    records: &[NewRecord],
    max_record_bytes: u64,
    max_batch_bytes: u64,
    max_batch_records: usize,
) -> Result<u64, AppendError> {
    if records.is_empty() {
        return Err(AppendError::EmptyBatch);
    }
    if records.len() > max_batch_records {
        return Err(AppendError::TooManyRecords {
            count: records.len(),
            max: max_batch_records,
        });
    }
    let mut total = 0u64;
    // A batch's records mostly share a topic (a guild's events in a row): a name
    // equal to the one just checked is not checked again.
    let mut checked: Option<&Topic> = None;
    for record in records {
        if checked != Some(&record.topic) {
            validate_topic_name(&record.topic).map_err(|source| AppendError::InvalidTopic {
                topic: record.topic.to_string(),
                source,
            })?;
            checked = Some(&record.topic);
        }
        validate_headers(record)?;
        let size = padded_len(frame_len(
            record.topic.len(),
            headers_encoded_len(&record.headers),
            record.payload.len(),
        )) as u64;
        if size > max_record_bytes {
            return Err(AppendError::RecordTooLarge {
                topic: record.topic.to_string(),
                size,
                max: max_record_bytes,
            });
        }
        total += size;
    }
    if total > max_batch_bytes {
        return Err(AppendError::BatchTooLarge {
            size: total,
            max: max_batch_bytes,
        });
    }
    Ok(total)
}

fn validate_headers(record: &NewRecord) -> Result<(), AppendError> {
    let invalid = |reason: String| {
        Err(AppendError::InvalidHeader {
            topic: record.topic.to_string(),
            reason,
        })
    };
    if record.headers.len() > MAX_HEADERS {
        return invalid(format!(
            "{} headers; the limit is {MAX_HEADERS}",
            record.headers.len()
        ));
    }
    for header in &record.headers {
        if header.key.is_empty() || header.key.len() > MAX_HEADER_KEY_BYTES {
            return invalid(format!(
                "key {:?} must be 1 to {MAX_HEADER_KEY_BYTES} bytes",
                header.key
            ));
        }
        if header.value.len() > MAX_HEADER_VALUE_BYTES {
            return invalid(format!(
                "value of {:?} is {} bytes; the limit is {MAX_HEADER_VALUE_BYTES}",
                header.key,
                header.value.len()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::config::StoreConfig;
    use crate::storage::log::DiskBudget;

    fn open(dir: &Path) -> Shard {
        let options = ShardOptions::from_config(&StoreConfig::new(dir), 0);
        let budget = Arc::new(DiskBudget::new(None));
        Shard::open(dir, options, budget, Arc::default()).unwrap().0
    }

    fn batch(from: usize) -> Vec<NewRecord> {
        (from..from + 10)
            .map(|i| NewRecord::new("guild.1", format!("record {i}")))
            .collect()
    }

    /// Checks every record of `topic` points back at its previous record and at the
    /// record `offset & (offset - 1)`; returns how many there are.
    fn check_skip_pointers(shard: &Shard, topic: &str) -> u64 {
        let mut positions = std::collections::HashMap::new();
        let mut metas = Vec::new();
        let mut pos = shard.latest_pos(topic).unwrap();
        while pos != NO_POSITION {
            let (meta, _) = shard.log.meta_at(pos).unwrap();
            positions.insert(meta.offset, pos);
            metas.push(meta);
            pos = meta.prev_pos;
        }
        for meta in &metas {
            if meta.offset > 0 {
                let target = meta.offset & (meta.offset - 1);
                assert_eq!(meta.skip_pos, positions[&target], "offset {}", meta.offset);
                assert_eq!(meta.prev_pos, positions[&(meta.offset - 1)]);
            }
        }
        metas.len() as u64
    }

    #[test]
    fn appends_to_a_busy_topic_read_no_old_records_and_skip_pointers_stay_exact() {
        let dir = tempfile::tempdir().unwrap();
        let mut shard = open(dir.path());
        let n = 1u64 << 13;
        let append = |shard: &mut Shard, from: u64, to: u64| {
            let records: Vec<_> = (from..to)
                .flat_map(|i| {
                    [
                        NewRecord::new("guild.1", format!("record {i}")),
                        NewRecord::new("guild.2", format!("other {i}")),
                    ]
                })
                .collect();
            shard.append(&records, 1).unwrap();
        };
        // Offset 64 is the one walk to offset 0 the cache needs.
        append(&mut shard, 0, 128);
        let warm_up = shard.walk_reach.replace(0);
        assert_eq!(warm_up, 1 << skips::MIN_LEVEL);
        for from in (128..n).step_by(100) {
            append(&mut shard, from, (from + 100).min(n));
        }
        assert_eq!(check_skip_pointers(&shard, "guild.1"), n);
        assert_eq!(check_skip_pointers(&shard, "guild.2"), n);
        // Without the cache the walk for offset 2^12 reads back to offset 0.
        let reach = shard.walk_reach.get();
        assert!(
            reach <= 1 << (skips::MIN_LEVEL - 1),
            "walks read {reach} records back"
        );
    }

    #[test]
    fn skip_pointers_stay_exact_when_busy_topics_evict_each_other_and_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut shard = open(dir.path());
        shard.skips = SkipCache::with_capacity(1);
        let topics = ["guild.1", "guild.2", "guild.3"];
        for round in 0..40u64 {
            // Runs of different lengths, so that each topic's coarse offsets fall
            // while another holds the one entry.
            for (i, topic) in topics.iter().enumerate() {
                let records: Vec<_> = (0..(50 + 37 * i as u64 + round))
                    .map(|j| NewRecord::new(*topic, format!("{round} {j}")))
                    .collect();
                shard.append(&records, 1).unwrap();
            }
        }
        assert_eq!(shard.skips.len(), 1);
        for topic in topics {
            assert!(check_skip_pointers(&shard, topic) > 1 << (skips::MIN_LEVEL + 4));
        }
    }

    /// A shard of 64 KiB segments.
    fn open_small(dir: &Path, retention: Retention, budget: &Arc<DiskBudget>) -> Shard {
        let mut config = StoreConfig::new(dir);
        config.segment_bytes = 64 << 10;
        config.max_batch_bytes = 32 << 10;
        config.retention = retention;
        let options = ShardOptions::from_config(&config, 0);
        Shard::open(dir, options, budget.clone(), Arc::default())
            .unwrap()
            .0
    }

    /// Runs the rolls' work here, as the sync thread would.
    fn seal_rolls(shard: &mut Shard) {
        for roll in shard.take_rolls() {
            let (base, freed) = (roll.base(), roll.freed());
            shard.sealed(base, freed, roll.run());
        }
    }

    /// Bytes of the files in the shard's directory.
    fn bytes_on_disk(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().metadata().unwrap().len())
            .sum()
    }

    #[test]
    fn a_topic_continues_from_its_last_record_across_batches_registry_growth_and_retention() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention {
            max_bytes: Some(3 * (64 << 10)),
            max_age: None,
        };
        let mut shard = open_small(dir.path(), retention, &Arc::new(DiskBudget::new(None)));
        let mut next: std::collections::HashMap<String, u64> = Default::default();
        // Appends one record per topic and checks each gets its topic's next offset.
        fn append_to(
            shard: &mut Shard,
            next: &mut std::collections::HashMap<String, u64>,
            topics: &[String],
            payload: usize,
        ) {
            let records: Vec<NewRecord> = topics
                .iter()
                .map(|t| NewRecord::new(t.as_str(), vec![1u8; payload]))
                .collect();
            let appended = shard.append(&records, 1).unwrap();
            for (topic, appended) in topics.iter().zip(appended) {
                let expected = next.entry(topic.clone()).or_insert(0);
                assert_eq!(appended.offset, *expected, "{topic}");
                *expected += 1;
            }
        }
        let mut append = |shard: &mut Shard, topics: &[String], payload: usize| {
            append_to(shard, &mut next, topics, payload)
        };
        let a = "guild.a".to_owned();
        // Within a batch, across batches, with another topic in between.
        append(&mut shard, &[a.clone(), a.clone(), a.clone()], 10);
        append(&mut shard, std::slice::from_ref(&a), 10);
        append(
            &mut shard,
            &["guild.b".to_owned(), a.clone(), a.clone()],
            10,
        );
        // Many new topics (the registry grows, its slots move), then the last one's
        // topic again, and a batch of it.
        let many: Vec<String> = (0..1000).map(|i| format!("user.{i}")).collect();
        for chunk in many.chunks(200) {
            append(&mut shard, chunk, 10);
        }
        append(&mut shard, &[a.clone(), many[999].clone()], 10);
        append(&mut shard, &[many[999].clone(), a.clone()], 10);
        // Only the one topic, last appended throughout, until retention has dropped
        // the segments of the others: the registry is rebuilt smaller.
        for _ in 0..10_000 {
            if shard.topics.len() == 1 {
                break;
            }
            append(&mut shard, &[a.clone(), a.clone()], 500);
            shard.enforce_retention(1).unwrap();
        }
        assert_eq!(shard.topics.len(), 1);
        append(&mut shard, std::slice::from_ref(&a), 10);
        // A topic whose records retention dropped starts again at 0; then the
        // first one again (found through the registry).
        next.remove(&many[0]);
        append_to(&mut shard, &mut next, &[many[0].clone()], 10);
        append_to(&mut shard, &mut next, std::slice::from_ref(&a), 10);
        let info = shard.topic_info(&a).unwrap().unwrap();
        assert_eq!(info.next_offset, next[&a]);
        let batch = shard
            .read(&a, info.earliest_offset, ReadLimits::default())
            .unwrap();
        let offsets: Vec<u64> = batch.records.iter().map(|r| r.offset).collect();
        let expected: Vec<u64> = (info.earliest_offset..info.next_offset).collect();
        assert_eq!(offsets, expected[..offsets.len()]);
    }

    #[test]
    fn a_half_full_segment_asks_for_a_spare_once_so_the_first_roll_finds_one() {
        use crate::storage::segment::SPARE_FILE_NAME;
        let dir = tempfile::tempdir().unwrap();
        let retention = StoreConfig::new(dir.path()).retention;
        let mut shard = open_small(dir.path(), retention, &Arc::new(DiskBudget::new(None)));
        let spare_path = shard.dir().join(SPARE_FILE_NAME);
        let append = |shard: &mut Shard| {
            shard
                .append(&[NewRecord::new("guild.1", vec![3u8; 500])], 1)
                .unwrap();
        };
        append(&mut shard);
        assert!(shard.spare_job().is_none(), "not before half full");
        let capacity = shard.log.segments()[0].capacity();
        while shard.log.segments()[0].len() <= capacity / 2 {
            append(&mut shard);
        }
        append(&mut shard);
        // The first attempt fails: no second one for this segment.
        let job = shard.spare_job().expect("wanted at half full");
        shard.spare_made(Err(IoError::new(
            "making a spare segment in",
            &job.dir,
            std::io::Error::other("injected"),
        )));
        loop {
            append(&mut shard);
            if shard.log.segments().len() == 2 {
                break;
            }
            assert!(shard.spare_job().is_none(), "asked once per segment");
        }
        seal_rolls(&mut shard);
        // The roll asked again; the next segment gets its own at half full only if
        // this one was not made. Made now, the second roll starts from it.
        let job = shard.spare_job().expect("the roll wants one");
        shard.spare_made(Spare::create(&job.dir, job.capacity));
        assert!(spare_path.exists());
        loop {
            append(&mut shard);
            if shard.log.segments().len() == 3 {
                break;
            }
            assert!(shard.spare_job().is_none(), "one is ready");
        }
        assert!(!spare_path.exists(), "the roll took the spare");

        // A fresh shard: its first roll finds the spare asked for at half full.
        let dir = tempfile::tempdir().unwrap();
        let retention = StoreConfig::new(dir.path()).retention;
        let mut shard = open_small(dir.path(), retention, &Arc::new(DiskBudget::new(None)));
        append(&mut shard);
        while shard.log.segments().len() == 1 {
            append(&mut shard);
            if let Some(job) = shard.spare_job() {
                shard.spare_made(Spare::create(&job.dir, job.capacity));
            }
        }
        let rolls = shard.take_rolls();
        assert_eq!(rolls.len(), 1);
        assert!(
            !rolls[0].made_its_own_segment(),
            "the first roll used the spare"
        );
    }

    #[test]
    fn an_append_that_needs_retention_for_the_budget_frees_the_blocks_itself() {
        let dir = tempfile::tempdir().unwrap();
        // Retention would keep two segments; the budget holds four files (with the
        // spare). Retention only runs when the budget is hit.
        let retention = Retention {
            max_bytes: Some(2 * (64 << 10)),
            max_age: None,
        };
        let budget = Arc::new(DiskBudget::new(Some(4 * (64 << 10))));
        let mut shard = open_small(dir.path(), retention, &budget);
        shard.defer_deletions();
        let mut freed_by_an_append = 0;
        for i in 0..2000u32 {
            let dropped = shard
                .stats
                .segments_dropped
                .load(std::sync::atomic::Ordering::Relaxed);
            shard
                .append(&[NewRecord::new("guild.1", vec![i as u8; 4000])], 1)
                .unwrap();
            seal_rolls(&mut shard);
            if let Some(job) = shard.spare_job() {
                shard.spare_made(Spare::create(&job.dir, job.capacity));
            }
            if shard
                .stats
                .segments_dropped
                .load(std::sync::atomic::Ordering::Relaxed)
                > dropped
            {
                // Dropped by the append's own retention: nothing left for the sync
                // thread, and the directory holds what the budget counts.
                assert!(shard.take_deletions().is_empty());
                assert_eq!(bytes_on_disk(shard.dir()), budget.used());
                freed_by_an_append += 1;
            }
        }
        assert!(freed_by_an_append > 3, "{freed_by_an_append}");
    }

    #[test]
    fn a_deferred_deletion_unlinks_at_once_and_frees_the_file_in_pieces_when_stepped() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention {
            max_bytes: Some(2 * (64 << 10)),
            max_age: None,
        };
        let budget = Arc::new(DiskBudget::new(None));
        let mut shard = open_small(dir.path(), retention, &budget);
        shard.defer_deletions();
        while shard.log.segments().len() < 5 {
            shard
                .append(&[NewRecord::new("guild.1", vec![7u8; 500])], 1)
                .unwrap();
            seal_rolls(&mut shard);
        }
        shard.discard_spare();
        let before: Vec<std::path::PathBuf> = shard
            .log
            .segments()
            .iter()
            .map(|s| s.path().to_owned())
            .collect();
        let dropped = shard.enforce_retention(1).unwrap();
        assert!(dropped >= 2, "{dropped}");
        let deletions = shard.take_deletions();
        assert_eq!(deletions.len(), dropped);
        assert!(shard.take_deletions().is_empty());
        // Unlinked and counted free at once: the directory holds what the log counts.
        for path in &before[..dropped] {
            assert!(!path.exists(), "{}", path.display());
        }
        assert_eq!(bytes_on_disk(shard.dir()), shard.log.disk_bytes());
        assert_eq!(budget.used(), shard.log.disk_bytes());
        // The blocks go when the sync thread steps through the deletion: first the
        // directory sync and the unmapping, then a cut per step.
        let piece = 16 << 10;
        for mut deletion in deletions {
            assert_eq!(deletion.file_len(), None);
            assert!(deletion.step(piece));
            let mut len = deletion.file_len().expect("unmapped, open");
            assert!(len > 3 * piece, "{len}");
            while deletion.step(piece) {
                let now = deletion.file_len().expect("still open");
                assert_eq!(now, len - piece);
                len = now;
            }
            assert!(len <= piece, "{len}");
            assert_eq!(deletion.file_len(), None, "closed when cut to nothing");
        }
        // Records after the dropped segments still read.
        let info = shard.topic_info("guild.1").unwrap().unwrap();
        let batch = shard
            .read("guild.1", info.earliest_offset, ReadLimits::default())
            .unwrap();
        assert_eq!(batch.records[0].offset, info.earliest_offset);
    }

    #[test]
    fn a_spare_counts_from_the_roll_that_wants_it_so_retention_just_after_leaves_room() {
        let dir = tempfile::tempdir().unwrap();
        let max = 4 * (64 << 10);
        let retention = Retention {
            max_bytes: Some(max),
            max_age: None,
        };
        let mut shard = open_small(dir.path(), retention, &Arc::new(DiskBudget::new(None)));
        let shard_dir = shard.dir().to_owned();
        let mut rolls = 0;
        for i in 0..1000u32 {
            shard
                .append(&[NewRecord::new("guild.1", vec![i as u8; 500])], 1)
                .unwrap();
            let rolled = shard.take_rolls();
            if rolled.is_empty() {
                continue;
            }
            rolls += 1;
            for roll in rolled {
                let (base, freed) = (roll.base(), roll.freed());
                shard.sealed(base, freed, roll.run());
            }
            // Retention in the same command group as the roll, before the sync
            // thread is asked for the spare, already counts it.
            shard.enforce_retention(1).unwrap();
            let disk = shard.log.disk_bytes();
            assert!(disk <= max, "{disk} after roll {rolls}");
            let job = shard.spare_job().expect("a roll wants a spare");
            assert_eq!(shard.log.disk_bytes(), disk);
            assert_eq!(bytes_on_disk(&shard_dir) + job.capacity, disk);
            shard.spare_made(Spare::create(&job.dir, job.capacity));
            assert_eq!(shard.log.disk_bytes(), disk);
            assert_eq!(bytes_on_disk(&shard_dir), disk);
        }
        assert!(rolls > 5, "{rolls}");
        shard.discard_spare();
        assert_eq!(bytes_on_disk(&shard_dir), shard.log.disk_bytes());
    }

    #[test]
    fn a_second_roll_before_the_spare_is_asked_for_takes_the_bytes_counted_for_it() {
        let dir = tempfile::tempdir().unwrap();
        // Room for three segment files: the first, the first roll's, and its spare.
        let budget = Arc::new(DiskBudget::new(Some(3 * (64 << 10))));
        let retention = StoreConfig::new(dir.path()).retention;
        let mut shard = open_small(dir.path(), retention, &budget);
        let shard_dir = shard.dir().to_owned();
        // Two rolls in one command group: the sync thread is not asked in between.
        let mut rolls = 0;
        for i in 0..1000u32 {
            let appended = shard.append(&[NewRecord::new("guild.1", vec![i as u8; 500])], 1);
            assert!(
                appended.is_ok(),
                "append {i} after {rolls} rolls: {appended:?}"
            );
            for roll in shard.take_rolls() {
                let (base, freed) = (roll.base(), roll.freed());
                shard.sealed(base, freed, roll.run());
                rolls += 1;
            }
            if rolls == 2 {
                break;
            }
        }
        assert_eq!(rolls, 2);
        // The budget had no room for another spare.
        assert!(shard.spare_job().is_none());
        assert_eq!(bytes_on_disk(&shard_dir), shard.log.disk_bytes());
        assert_eq!(budget.used(), shard.log.disk_bytes());
    }

    #[test]
    fn a_newest_segment_an_earlier_version_filled_exactly_is_synced_before_it_rolls() {
        let dir = tempfile::tempdir().unwrap();
        let retention = StoreConfig::new(dir.path()).retention;
        let budget = Arc::new(DiskBudget::new(None));
        let mut shard = open_small(dir.path(), retention, &budget);
        for i in 0..20u8 {
            shard
                .append(&[NewRecord::new("guild.1", vec![i; 500])], 1)
                .unwrap();
        }
        assert!(shard.take_rolls().is_empty());
        shard.sync().unwrap();
        let newest = shard.log.segments().last().unwrap();
        let (path, len) = (newest.path().to_owned(), newest.len());
        drop(shard);
        // Earlier versions could fill a segment to its last byte: its file is exactly
        // as long as its data, as a sealed segment's is.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len as u64)
            .unwrap();

        let mut shard = open_small(dir.path(), retention, &budget);
        let full = shard.log.segments().last().unwrap();
        assert_eq!((full.len(), full.remaining()), (len, 0));
        // Recovery does not know the data it found to be on disk.
        assert!(full.is_dirty());
        shard
            .append(&[NewRecord::new("guild.1", vec![20; 500])], 1)
            .unwrap();
        // The roll put a segment after it, so it now looks sealed: its data was
        // synced first, on this thread, not left for the roll's seal.
        let segments = shard.log.segments();
        assert_eq!(segments.len(), 2);
        assert_eq!(segments[1].base(), segments[0].end());
        assert!(!segments[0].is_dirty());
        let rolls = shard.take_rolls();
        assert_eq!(rolls.len(), 1);
        for roll in rolls {
            let (base, freed) = (roll.base(), roll.freed());
            assert_eq!(freed, 0, "a full segment has nothing to cut");
            shard.sealed(base, freed, roll.run());
        }
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len as u64);
        shard.sync().unwrap();
        drop(shard);

        // Reopened, the full segment is read as sealed and every record is there.
        let shard = open_small(dir.path(), retention, &budget);
        let read = shard.read("guild.1", 0, ReadLimits::default()).unwrap();
        let firsts: Vec<u8> = read.records.iter().map(|r| r.payload[0]).collect();
        assert_eq!(firsts, (0..21).collect::<Vec<u8>>());
    }

    #[test]
    fn a_failed_write_refuses_its_batch_stops_the_shard_and_never_reaches_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut shard = open(dir.path());
        shard.append(&batch(0), 1).unwrap();
        shard.log.active_mut().fail_next_write = true;
        let mut refused = batch(10);
        refused.insert(3, NewRecord::new("guild.2", "only in the refused batch"));
        let error = shard.append(&refused, 2).unwrap_err();
        assert!(
            matches!(&error, AppendError::ShardFailed { reason, .. } if reason.contains("writing segment")),
            "{error:?}"
        );
        // Nothing reads the refused batch: guild.1 is as before it, guild.2 unknown.
        let read = shard.read("guild.1", 0, ReadLimits::default()).unwrap();
        assert_eq!(read.records.len(), 10);
        assert_eq!(read.next_offset, 10);
        assert!(shard.topic_info("guild.2").unwrap().is_none());
        assert_eq!(
            shard
                .stats
                .topics
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        // Stopped: later appends are refused too, though the device would take them.
        assert!(matches!(
            shard.append(&batch(20), 3),
            Err(AppendError::ShardFailed { .. })
        ));
        // What was written before is synced; the refused batch is not written by it.
        shard.sync().unwrap();
        drop(shard);
        let reopened = open(dir.path());
        let read = reopened.read("guild.1", 0, ReadLimits::default()).unwrap();
        let payloads: Vec<_> = read.records.iter().map(|r| r.payload.clone()).collect();
        let expected: Vec<_> = batch(0).into_iter().map(|r| r.payload).collect();
        assert_eq!(payloads, expected);
        assert_eq!(read.next_offset, 10);
    }
}
