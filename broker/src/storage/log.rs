//! A shard's log: its segments in order, addressed by log position.
//!
//! A log position is a byte address that grows across segments: segment files are
//! named by the position of their first byte, and a record's position is its segment's
//! base plus its offset in the file. Positions only grow, except that recovery may cut
//! a torn tail and write there again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::storage::error::{AppendError, IoError};
use crate::storage::record::{
    DecodeError, FrameMeta, FrameView, decode_frame, decode_frame_unchecked,
};
use crate::storage::segment::{
    CacheRelease, SEGMENT_HEADER_LEN, Sealing, Segment, Spare, sync_dir,
};

/// A sync of the newest segment's data, to run on another thread while appends go
/// on (see `worker`): the file, and how much of it the sync covers.
#[derive(Debug)]
pub struct SyncJob {
    file: Arc<std::fs::File>,
    path: PathBuf,
    base: u64,
    written: usize,
    #[cfg(test)]
    pub(crate) hold: Option<Arc<SyncHold>>,
}

impl SyncJob {
    /// Forces the covered data to disk (`fdatasync`: data written to the file
    /// before the call is on disk when it returns).
    pub fn run(&self) -> Result<(), IoError> {
        #[cfg(test)]
        if let Some(hold) = &self.hold
            && hold.pass()
        {
            return Err(IoError::new(
                "syncing segment",
                &self.path,
                std::io::Error::other("injected sync failure"),
            ));
        }
        self.file
            .sync_data()
            .map_err(|e| IoError::new("syncing segment", &self.path, e))
    }
}

/// Tests: holds sync jobs until released, then lets them pass, or fails the first.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct SyncHold {
    /// (released, fail, jobs started)
    state: std::sync::Mutex<(bool, bool, usize)>,
    changed: std::sync::Condvar,
}

#[cfg(test)]
impl SyncHold {
    /// Called by a job: waits for the release; true when the job is to fail (only
    /// the first after a failing release: a retried sync may well succeed).
    fn pass(&self) -> bool {
        let mut state = self.state.lock().unwrap();
        state.2 += 1;
        self.changed.notify_all();
        while !state.0 {
            state = self.changed.wait(state).unwrap();
        }
        std::mem::take(&mut state.1)
    }

    /// Waits until `jobs` jobs have started; panics (releasing them) after 10 s.
    pub(crate) fn wait_started(&self, jobs: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut state = self.state.lock().unwrap();
        while state.2 < jobs {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                *state = (true, false, state.2);
                self.changed.notify_all();
                panic!("{} sync jobs started, not {jobs}", state.2);
            }
            state = self.changed.wait_timeout(state, left).unwrap().0;
        }
    }

    pub(crate) fn release(&self, fail: bool) {
        let mut state = self.state.lock().unwrap();
        *state = (true, fail, state.2);
        self.changed.notify_all();
    }
}

/// A segment roll's disk work, for the shard's sync thread, which runs it in order
/// with its syncs ([`Roll::run`]): it seals the old segment (its data synced, then
/// its file cut to the data and synced: recovery tells a sealed segment by its
/// length) and makes the new segment's file and name durable. It ends before any
/// sync of the new segment runs, so a sync that counts the new segment's data as
/// durable comes after every older segment is sealed.
#[derive(Debug)]
pub struct Roll {
    sealing: Sealing,
    dir: PathBuf,
    /// Bytes the cut gives back (already taken off the budget and disk bytes).
    freed: u64,
    /// The new segment's file, when it was made without a spare and its size and
    /// blocks are not yet on disk.
    unsynced: Option<Arc<std::fs::File>>,
    /// Tests: holds the roll until released, or fails it.
    #[cfg(test)]
    pub(crate) hold: Option<Arc<SyncHold>>,
}

impl Roll {
    /// Tests: the new segment was not made from a spare file.
    #[cfg(test)]
    pub(crate) fn made_its_own_segment(&self) -> bool {
        self.unsynced.is_some()
    }

    /// The sealed segment's base.
    pub fn base(&self) -> u64 {
        self.sealing.base()
    }

    pub fn freed(&self) -> u64 {
        self.freed
    }

    pub fn run(self) -> Result<(), IoError> {
        #[cfg(test)]
        if let Some(hold) = &self.hold
            && hold.pass()
        {
            return Err(IoError::new(
                "syncing segment",
                self.sealing.path(),
                std::io::Error::other("injected sync failure"),
            ));
        }
        self.sealing.seal()?;
        if let Some(file) = &self.unsynced {
            file.sync_all()
                .map_err(|e| IoError::new("syncing segment", &self.dir, e))?;
        }
        sync_dir(&self.dir)
    }
}

/// A segment retention dropped: its file is unlinked, but its blocks stay allocated
/// until the file is cut or closed, and freeing them is slow: on the benchmark
/// machine (ext4 mounted with `discard`) closing a 64 MiB segment's file took
/// 10–15 ms in synchronous discards and reads of block bitmaps, and the directory
/// sync after it ~10 ms more. Retention drops several segments at a time, so on the
/// shard's thread that stalled appends and live deliveries for 40–90 ms once a
/// second. A shard with a sync thread hands deletions to it
/// ([`SegmentLog::defer_deletions`]), which does them in pieces
/// ([`Deletion::step`]) between the syncs appends wait for.
#[derive(Debug)]
pub struct Deletion {
    /// Until the first step: the segment, still mapped.
    segment: Option<Segment>,
    /// Then: the file, cut shorter at each step.
    file: Option<Arc<std::fs::File>>,
    /// Bytes the file still holds.
    left: u64,
    dir: PathBuf,
    shard: u32,
}

impl Deletion {
    fn new(segment: Segment, dir: PathBuf, shard: u32) -> Deletion {
        Deletion {
            left: segment.disk_len(),
            segment: Some(segment),
            file: None,
            dir,
            shard,
        }
    }

    /// Does the next piece of the work; returns whether any is left. The first
    /// step makes the unlink durable (a directory sync) and unmaps the segment;
    /// each later one cuts at most `piece` bytes off the end of the file. Only a
    /// file whose unlink is on disk is cut: one that came back after a crash, cut
    /// short, would look like a damaged segment to recovery. The file is closed
    /// when the deletion is dropped (at once when nothing is left to cut).
    pub fn step(&mut self, piece: u64) -> bool {
        if let Some(segment) = self.segment.take() {
            match sync_dir(&self.dir) {
                Ok(()) => self.file = Some(segment.file()),
                Err(error) => {
                    // The file is gone from the namespace; a crash could bring it
                    // back, whole, which only brings back old records. Closing it
                    // frees its blocks.
                    tracing::warn!(shard = self.shard, %error, "syncing the directory after a deletion failed");
                }
            }
            drop(segment);
            return self.file.is_some();
        }
        let Some(file) = &self.file else {
            return false;
        };
        let to = self.left.saturating_sub(piece.max(1));
        if let Err(error) = file.set_len(to) {
            tracing::warn!(shard = self.shard, %error, "cutting a deleted segment failed; closing it frees it");
            self.file = None;
            return false;
        }
        self.left = to;
        if to == 0 {
            self.file = None;
        }
        self.file.is_some()
    }

    /// Tests: the length of the file being cut (`None` before the first step and
    /// once it is closed).
    #[cfg(test)]
    pub(crate) fn file_len(&self) -> Option<u64> {
        self.file
            .as_ref()
            .map(|file| file.metadata().unwrap().len())
    }

    /// The whole deletion, at once.
    pub fn run(mut self) {
        while self.step(u64::MAX) {}
    }
}

/// A spare segment file to make, for the shard's sync thread (see [`Spare`]).
#[derive(Debug)]
pub struct SpareJob {
    pub dir: PathBuf,
    pub capacity: u64,
}

/// Where a shard's spare segment file stands. From the roll that wants it until
/// it is used or deleted, it counts in the budget and the disk bytes: counting it
/// at the roll, not when the sync thread is asked, means retention run right after
/// a roll already sees it.
#[derive(Debug)]
enum SpareState {
    /// None wanted: no segment has rolled or passed half full since the log was
    /// opened (a shard that never fills half a segment never needs one), the
    /// budget had no room when it was last asked for, or making the last one
    /// failed. The next roll asks again (and the next segment at half full).
    Unwanted,
    /// Wanted and counted; not yet asked of the sync thread.
    Wanted,
    /// The sync thread is making it.
    Making,
    /// Ready for the next roll.
    Ready(Spare),
}

/// Space reserved for segment files across a whole store, against an optional budget.
#[derive(Debug)]
pub struct DiskBudget {
    limit: Option<u64>,
    used: AtomicU64,
}

impl DiskBudget {
    pub fn new(limit: Option<u64>) -> Self {
        DiskBudget {
            limit,
            used: AtomicU64::new(0),
        }
    }

    /// Reserves `bytes`, or says how far over the budget that would go.
    pub fn reserve(&self, bytes: u64) -> Result<(), AppendError> {
        let Some(limit) = self.limit else {
            self.used.fetch_add(bytes, Ordering::Relaxed);
            return Ok(());
        };
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                (used + bytes <= limit).then_some(used + bytes)
            })
            .map(|_| ())
            .map_err(|used| AppendError::DiskBudgetExceeded {
                used,
                budget: limit,
                needed: bytes,
            })
    }

    /// Counts bytes that exist already (found at start-up), budget or not.
    pub fn force_reserve(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn release(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

/// The segments of one shard.
#[derive(Debug)]
pub struct SegmentLog {
    dir: PathBuf,
    shard: u32,
    generation: u64,
    segment_bytes: u64,
    budget: Arc<DiskBudget>,
    /// Ordered by base; the last one is written to (if it has room).
    segments: Vec<Segment>,
    /// Bytes the segment files take on disk, kept up to date as they come and go.
    disk_bytes: u64,
    /// Log position before which the page cache was released.
    cache_released_to: u64,
    /// Rolls whose work is not yet handed out (see [`SegmentLog::take_rolls`]).
    rolls: Vec<Roll>,
    /// Deletions not yet handed out, when they are deferred
    /// ([`SegmentLog::defer_deletions`]); `None`: done on the spot.
    deletions: Option<Vec<Deletion>>,
    /// The file for the next segment.
    spare: SpareState,
    /// Base of the newest segment once it passed half full and a spare was asked
    /// for then (once per segment: a failure waits for the roll to ask again).
    spare_asked_at_half: Option<u64>,
    /// Tests: holds the rolls' work.
    #[cfg(test)]
    pub(crate) roll_hold: Option<Arc<SyncHold>>,
}

/// The page cache is released in steps of at least this many bytes (a few
/// system calls per step).
const CACHE_RELEASE_STEP: u64 = 4 << 20;

impl SegmentLog {
    /// A log over `segments` (recovered, in order, possibly none).
    pub fn new(
        dir: &Path,
        shard: u32,
        generation: u64,
        segment_bytes: u64,
        budget: Arc<DiskBudget>,
        segments: Vec<Segment>,
    ) -> Self {
        SegmentLog {
            dir: dir.to_owned(),
            shard,
            generation,
            segment_bytes,
            budget,
            disk_bytes: segments.iter().map(|s| s.capacity() as u64).sum(),
            segments,
            cache_released_to: 0,
            rolls: Vec::new(),
            deletions: None,
            spare: SpareState::Unwanted,
            spare_asked_at_half: None,
            #[cfg(test)]
            roll_hold: None,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Position of the oldest retained byte of data: pointers below it lead to
    /// history that is gone.
    pub fn start(&self) -> u64 {
        self.segments
            .first()
            .map_or(0, |s| s.base() + SEGMENT_HEADER_LEN as u64)
    }

    /// Position just past the newest data: where the next frame goes.
    pub fn end(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.end())
    }

    /// Bytes the segment files take on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes
    }

    /// The segment holding data at `pos` and the offset in its file.
    fn locate(&self, pos: u64) -> Option<(&Segment, usize)> {
        let index = match self.segments.binary_search_by(|s| s.base().cmp(&pos)) {
            Ok(i) => i,
            Err(0) => return None,
            Err(i) => i - 1,
        };
        let segment = &self.segments[index];
        let at = (pos - segment.base()) as usize;
        (at >= SEGMENT_HEADER_LEN && at < segment.len()).then_some((segment, at))
    }

    /// Data bytes from `pos` to the end of its segment's data.
    pub fn bytes_at(&self, pos: u64) -> Option<&[u8]> {
        // The newest segment is by far the most read: look there first.
        if let Some(last) = self.segments.last()
            && pos >= last.base()
        {
            let at = (pos - last.base()) as usize;
            return (at >= SEGMENT_HEADER_LEN && at < last.len()).then(|| last.data_from(at));
        }
        self.locate(pos).map(|(segment, at)| segment.data_from(at))
    }

    /// The frame at `pos`, CRC verified.
    pub fn frame_at(&self, pos: u64) -> Result<FrameView<'_>, DecodeError> {
        let bytes = self.bytes_at(pos).ok_or(DecodeError::Truncated {
            needed: 8,
            available: 0,
        })?;
        decode_frame(bytes)
    }

    /// The fields of the frame at `pos`, without a CRC check: for frames this process
    /// wrote or verified during recovery.
    pub fn meta_at(&self, pos: u64) -> Option<(FrameMeta, &[u8])> {
        let view = decode_frame_unchecked(self.bytes_at(pos)?).ok()?;
        Some((view.meta, view.topic))
    }

    /// The topic name stored at `pos`, without a CRC check.
    pub fn topic_at(&self, pos: u64) -> Option<&[u8]> {
        self.meta_at(pos).map(|(_, topic)| topic)
    }

    /// Makes sure the newest segment has more than `bytes` of room (a segment is
    /// never filled to its last byte, so that recovery can tell a sealed segment by
    /// its length), rolling to a new one if needed. Fails without changing anything
    /// on a full disk or budget.
    ///
    /// A roll does no disk sync here: the new segment comes from the spare file
    /// when one is ready, and the seal's syncs are left as a [`Roll`] for the
    /// shard's sync thread ([`SegmentLog::take_rolls`]); they took 5–20 ms per
    /// roll on the benchmark machine, time the shard would not append or
    /// deliver.
    pub fn ensure_room(&mut self, bytes: usize) -> Result<(), AppendError> {
        if let Some(last) = self.segments.last()
            && last.remaining() > bytes
        {
            // A shard's first roll has no spare from an earlier one: ask for it
            // when the segment is half full, so that the sync thread has made it
            // by the roll (creating a segment on this thread, with its syncs,
            // took 10–30 ms).
            if last.len() > last.capacity() / 2 && self.spare_asked_at_half != Some(last.base()) {
                self.spare_asked_at_half = Some(last.base());
                self.want_spare();
            }
            return Ok(());
        }
        if let Some(last) = self.segments.last_mut()
            && last.remaining() == 0
        {
            // A full segment (written before segments were kept short of full) has
            // no reserved space to cut: it would look sealed before its roll synced
            // it, so it is synced here first.
            last.sync().map_err(|error| AppendError::ShardFailed {
                shard: self.shard,
                reason: error.to_string(),
            })?;
        }
        let base = self.end();
        let spare = match std::mem::replace(&mut self.spare, SpareState::Unwanted) {
            SpareState::Ready(spare) => Some(spare),
            // A second roll before the sync thread was asked for the spare (in one
            // command group): the new segment takes the bytes counted for it.
            SpareState::Wanted => None,
            other => {
                self.spare = other;
                self.budget.reserve(self.segment_bytes)?;
                self.disk_bytes += self.segment_bytes;
                None
            }
        };
        let from_spare = spare.is_some();
        let created = match (spare, self.segments.is_empty()) {
            (Some(spare), _) => {
                Segment::from_spare(spare, &self.dir, self.shard, base, self.generation)
            }
            (None, true) => Segment::create(
                &self.dir,
                self.shard,
                base,
                self.segment_bytes,
                self.generation,
            ),
            (None, false) => Segment::create_unsynced(
                &self.dir,
                self.shard,
                base,
                self.segment_bytes,
                self.generation,
            ),
        };
        let segment = match created {
            Ok(segment) => segment,
            Err(error) => {
                self.unreserve(self.segment_bytes);
                return Err(error.into());
            }
        };
        if let Some(last) = self.segments.last_mut() {
            let capacity = last.capacity();
            match last.roll() {
                Ok(sealing) => {
                    // The file is cut to its data soon: count it so from now on
                    // (retention and the budget).
                    let freed = (capacity - last.len()) as u64;
                    self.unreserve(freed);
                    self.rolls.push(Roll {
                        sealing,
                        dir: self.dir.clone(),
                        freed,
                        unsynced: (!from_spare).then(|| segment.sync_target().0),
                        #[cfg(test)]
                        hold: self.roll_hold.clone(),
                    });
                }
                Err(error) => {
                    // Mapping the sealed data failed (out of memory): the new
                    // segment goes, and the shard stops.
                    let path = segment.path().to_owned();
                    drop(segment);
                    let _ = std::fs::remove_file(&path);
                    self.unreserve(self.segment_bytes);
                    return Err(AppendError::ShardFailed {
                        shard: self.shard,
                        reason: error.to_string(),
                    });
                }
            }
        }
        if !self.segments.is_empty() {
            self.want_spare();
        }
        tracing::debug!(shard = self.shard, base, from_spare, "started segment");
        self.segments.push(segment);
        Ok(())
    }

    /// Gives back budget and disk bytes counted for a segment file that is gone.
    fn unreserve(&mut self, bytes: u64) {
        self.disk_bytes -= bytes;
        self.budget.release(bytes);
    }

    /// The work of the rolls since the last call, oldest first, for the shard's
    /// sync thread: run in this order, before any later [`SyncJob`]. Each one's
    /// outcome goes to [`SegmentLog::sealed`].
    pub fn take_rolls(&mut self) -> Vec<Roll> {
        std::mem::take(&mut self.rolls)
    }

    /// From now on, retention leaves the disk work of a deletion to the caller
    /// ([`SegmentLog::take_deletions`]) instead of doing it on the spot.
    pub fn defer_deletions(&mut self) {
        self.deletions.get_or_insert_with(Vec::new);
    }

    /// The deletions since the last call, when they are deferred.
    pub fn take_deletions(&mut self) -> Vec<Deletion> {
        self.deletions
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// A roll's work ended. A failure is returned: the sealed data may not be on
    /// disk (and the file may not be cut: its `freed` bytes count again).
    pub fn sealed(
        &mut self,
        base: u64,
        freed: u64,
        result: Result<(), IoError>,
    ) -> Result<(), IoError> {
        if let Err(error) = result {
            self.budget.force_reserve(freed);
            self.disk_bytes += freed;
            if let Some(segment) = self.segments.iter_mut().find(|s| s.base() == base) {
                segment.set_uncut(freed);
            }
            return Err(error);
        }
        if let Some(segment) = self.segments.iter_mut().find(|s| s.base() == base) {
            segment.synced_to(segment.len());
        }
        Ok(())
    }

    /// A segment rolled or is half full: a spare file is wanted for the next roll,
    /// unless one is wanted, being made or ready, or the budget has no room for
    /// it. It counts from now on.
    fn want_spare(&mut self) {
        if matches!(self.spare, SpareState::Unwanted)
            && self.budget.reserve(self.segment_bytes).is_ok()
        {
            self.disk_bytes += self.segment_bytes;
            self.spare = SpareState::Wanted;
        }
    }

    /// The spare file to make for the next roll, if one is wanted and not yet
    /// asked for. Report the outcome to [`SegmentLog::spare_made`].
    pub fn spare_job(&mut self) -> Option<SpareJob> {
        if !matches!(self.spare, SpareState::Wanted) {
            return None;
        }
        self.spare = SpareState::Making;
        Some(SpareJob {
            dir: self.dir.clone(),
            capacity: self.segment_bytes,
        })
    }

    pub fn spare_made(&mut self, result: Result<Spare, IoError>) {
        match result {
            Ok(spare) => self.spare = SpareState::Ready(spare),
            Err(error) => {
                tracing::warn!(shard = self.shard, %error, "making a spare segment failed; the next roll makes its own");
                self.spare = SpareState::Unwanted;
                self.unreserve(self.segment_bytes);
            }
        }
    }

    /// Deletes the spare file, if any, and stops counting a wanted one (the shard
    /// stops, once no spare is being made).
    pub fn discard_spare(&mut self) {
        match std::mem::replace(&mut self.spare, SpareState::Unwanted) {
            SpareState::Ready(spare) => {
                let bytes = spare.capacity();
                spare.discard();
                self.unreserve(bytes);
            }
            SpareState::Wanted => self.unreserve(self.segment_bytes),
            SpareState::Unwanted => {}
            // Its outcome still comes to `spare_made`.
            making @ SpareState::Making => self.spare = making,
        }
    }

    /// Adds a segment found by recovery after the ones already here.
    pub fn push_recovered(&mut self, segment: Segment) {
        self.disk_bytes += segment.capacity() as u64;
        self.segments.push(segment);
    }

    /// Seals the newest segment on this thread (recovery: a segment whose seal a
    /// stop interrupted, followed by another).
    pub fn seal_newest(&mut self) -> Result<(), IoError> {
        if let Some(segment) = self.segments.last_mut() {
            let freed = segment.seal()?;
            self.unreserve(freed);
        }
        Ok(())
    }

    pub fn newest_mut(&mut self) -> Option<&mut Segment> {
        self.segments.last_mut()
    }

    /// The segment appends go to (call [`SegmentLog::ensure_room`] first).
    pub fn active_mut(&mut self) -> &mut Segment {
        self.segments
            .last_mut()
            .expect("ensure_room created a segment")
    }

    /// True when written data is not known to be on disk: in the newest segment,
    /// or in one rolled since the last sync (a sync that ends marks the segments
    /// before its own as synced, so no older one can be dirty).
    pub fn is_dirty(&self) -> bool {
        self.segments.iter().rev().take(2).any(Segment::is_dirty)
    }

    /// A sync of the newest segment's data written so far, when anything is not on
    /// disk. Run after the rolls handed out before it, its success means every
    /// segment's data written so far is on disk.
    pub fn sync_job(&self) -> Option<SyncJob> {
        debug_assert!(self.rolls.is_empty(), "rolls are handed out first");
        if !self.is_dirty() {
            return None;
        }
        let segment = self.segments.last()?;
        let (file, written) = segment.sync_target();
        Some(SyncJob {
            file,
            path: segment.path().to_owned(),
            base: segment.base(),
            written,
            #[cfg(test)]
            hold: None,
        })
    }

    /// `job` succeeded: its segment's data up to where the job started is on disk,
    /// and so is every older segment's (their rolls ran before it). Its segment may
    /// have been dropped since.
    pub fn synced(&mut self, job: &SyncJob) {
        for segment in self.segments.iter_mut().rev() {
            if segment.base() < job.base {
                if !segment.is_dirty() {
                    break;
                }
                segment.synced_to(segment.len());
            } else if segment.base() == job.base {
                segment.synced_to(job.written);
            }
        }
    }

    /// Forces all written data to disk on this thread: the rolls not handed out
    /// first, then the newest segment.
    pub fn sync(&mut self) -> Result<(), IoError> {
        for roll in self.take_rolls() {
            let (base, freed) = (roll.base(), roll.freed());
            self.sealed(base, freed, roll.run())?;
        }
        match self.segments.last_mut() {
            Some(segment) => segment.sync(),
            None => Ok(()),
        }
    }

    /// Drops from the page cache the synced data more than `keep` bytes behind the
    /// newest synced byte (see [`Segment::release_cache`]: the returned releases
    /// finish the job, on any thread); does nothing until there
    /// are at least `CACHE_RELEASE_STEP` bytes to drop, so up to `keep` plus 4 MiB
    /// of synced data stay cached (plus releases not yet run), besides unsynced data
    /// and what reads bring back.
    pub fn release_cache(&mut self, keep: u64) -> Vec<CacheRelease> {
        let mut releases = Vec::new();
        let Some(newest) = self.segments.last() else {
            return releases;
        };
        let target = newest.synced_end().saturating_sub(keep);
        if target < self.cache_released_to + CACHE_RELEASE_STEP {
            return releases;
        }
        for segment in self.segments.iter_mut().rev() {
            if segment.end() <= self.cache_released_to {
                break;
            }
            if segment.base() < target {
                releases.extend(
                    segment.release_cache(
                        usize::try_from(target - segment.base()).unwrap_or(usize::MAX),
                    ),
                );
            }
        }
        self.cache_released_to = target;
        releases
    }

    /// Deletes the oldest segment, unless it is the only one. Returns whether one was
    /// deleted. The file is unlinked first: if that fails the segment stays in the log
    /// (and in the budget) and retention tries again later.
    pub fn drop_oldest(&mut self) -> Result<bool, IoError> {
        if self.segments.len() < 2 {
            return Ok(false);
        }
        let path = self.segments[0].path().to_owned();
        // Unlinking a mapped file is fine: the mapping stays valid until dropped.
        std::fs::remove_file(&path).map_err(|e| IoError::new("deleting segment", &path, e))?;
        let oldest = self.segments.remove(0);
        let bytes = oldest.disk_len();
        // Counted free from now on, although a deferred deletion frees the blocks
        // a moment later: an append that retention made room for must find it.
        self.disk_bytes -= bytes;
        self.budget.release(bytes);
        let deletion = Deletion::new(oldest, self.dir.clone(), self.shard);
        match &mut self.deletions {
            Some(deferred) => deferred.push(deletion),
            None => deletion.run(),
        }
        tracing::info!(shard = self.shard, path = %path.display(), "retention dropped segment");
        Ok(true)
    }

    /// Forgets and deletes the newest segment (recovery: a file whose creation a crash
    /// interrupted, holding no record).
    pub fn discard_newest(&mut self) -> Result<(), IoError> {
        if let Some(segment) = self.segments.pop() {
            let bytes = segment.capacity() as u64;
            let path = segment.path().to_owned();
            drop(segment);
            std::fs::remove_file(&path).map_err(|e| IoError::new("deleting segment", &path, e))?;
            self.disk_bytes -= bytes;
            self.budget.release(bytes);
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}
