//! Start-up recovery of one shard: find its segments, verify every frame's CRC, cut a
//! torn tail, step over corrupt frames in sealed segments, and rebuild the registry.
//!
//! The rules (also in `docs/storage-format.md`):
//! - In a sealed segment (every segment but the newest), a frame that fails its checks
//!   is counted and logged, and the scan resumes at the next 8-byte aligned position
//!   where a valid frame starts; every valid record around it is kept.
//! - In the newest segment, data ends at the first frame that fails its checks, and
//!   only whole batches are kept: records after the last batch-end flag belong to a
//!   batch whose append never completed (it was never acknowledged), so they are cut.
//!   Anything past the cut is zeroed so that a later scan cannot resurrect it.
//! - A segment is sealed when its file is exactly as long as its data, which ends
//!   where the next segment starts (a seal syncs the data, then cuts the file; a
//!   segment is never filled to its last byte). A segment followed by another but
//!   not sealed (a stop during its seal, which runs on the sync thread) is scanned
//!   like the newest: if its whole batches reach the next segment's start it is
//!   complete, and its seal is finished; if not, its end was lost and the log is cut
//!   there — the later segments are deleted. Nothing in them was acknowledged as
//!   durable: a sync of a segment counts only after the seals of those before it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::storage::error::{IoError, OpenError};
use crate::storage::log::{DiskBudget, SegmentLog};
use crate::storage::record::{
    DecodeError, FRAME_ALIGN, FRAME_HEADER_LEN, FrameView, decode_frame, padded_len,
};
use crate::storage::registry::TopicTable;
use crate::storage::segment::{SEGMENT_HEADER_LEN, Segment, parse_segment_file_name, sync_dir};
use crate::storage::stats::ShardStats;
use crate::storage::topic::topic_hash;

/// What recovery found in one shard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: usize,
    pub records: u64,
    pub topics: usize,
    /// Frames that failed their checks in sealed segments.
    pub corrupt_frames: u64,
    pub corrupt_bytes: u64,
    /// Segment headers that failed their checks (the frames were still scanned).
    pub bad_headers: usize,
    /// Bytes cut from the end of the newest segment.
    pub truncated_bytes: u64,
    /// Segment files deleted because an earlier segment's seal never finished and
    /// its data ends short of them.
    pub cut_segments: usize,
    pub duration: Duration,
}

impl RecoveryReport {
    /// True when recovery had to drop or skip anything.
    pub fn found_damage(&self) -> bool {
        self.corrupt_frames > 0
            || self.truncated_bytes > 0
            || self.bad_headers > 0
            || self.cut_segments > 0
    }
}

/// What a scan of one segment's frames met, in order.
#[derive(Debug)]
pub enum ScanEvent<'a> {
    Frame {
        pos: u64,
        view: FrameView<'a>,
    },
    /// Bytes from `pos` did not hold a valid frame; `skipped` bytes were stepped over.
    Corrupt {
        pos: u64,
        skipped: u64,
        error: DecodeError,
    },
}

/// Scans the frames of `segment` from its first frame. With `resync`, a bad frame is
/// reported and the scan goes on at the next valid frame; without it the scan stops
/// there. Returns the file offset where the scan stopped.
pub fn scan_segment<'a>(
    segment: &'a Segment,
    limit: usize,
    resync: bool,
    mut on_event: impl FnMut(ScanEvent<'a>),
) -> usize {
    let data = &segment.mapped()[..limit];
    let mut at = SEGMENT_HEADER_LEN;
    while at < data.len() {
        match decode_frame(&data[at..]) {
            Ok(view) => {
                let next = at + view.padded_len();
                on_event(ScanEvent::Frame {
                    pos: segment.base() + at as u64,
                    view,
                });
                at = next;
            }
            Err(DecodeError::End) if !resync || data[at..].iter().all(|&b| b == 0) => break,
            Err(error) => {
                if !resync {
                    on_event(ScanEvent::Corrupt {
                        pos: segment.base() + at as u64,
                        skipped: 0,
                        error,
                    });
                    break;
                }
                let start = at;
                // Most damage is a flipped bit in a frame whose length is intact: try
                // the frame's own end first, so the scan does not look for frames
                // inside its payload (which a producer controls).
                let claimed = padded_len(u32::from_le_bytes(
                    data[at + 4..at + 8].try_into().expect("4 bytes"),
                ) as usize);
                if claimed >= FRAME_HEADER_LEN
                    && at + claimed < data.len()
                    && decode_frame(&data[at + claimed..]).is_ok()
                {
                    at += claimed;
                } else {
                    at += FRAME_ALIGN;
                    while at < data.len() && decode_frame(&data[at..]).is_err() {
                        at += FRAME_ALIGN;
                    }
                }
                on_event(ScanEvent::Corrupt {
                    pos: segment.base() + start as u64,
                    skipped: (at - start) as u64,
                    error,
                });
            }
        }
    }
    at.min(data.len())
}

/// Records the frame at `pos` as its topic's latest. A topic's offsets only grow
/// along the log, so a frame that would move them backwards is not what it seems (a
/// frame found by resync inside damaged data): it is logged and left out.
fn index_frame(topics: &mut TopicTable, log: &SegmentLog, pos: u64, topic: &[u8], offset: u64) {
    let hash = topic_hash(topic);
    match topics.find(hash, |p| log.topic_at(p) == Some(topic)) {
        Some(index) => {
            let latest = log
                .meta_at(topics.pos(index))
                .map_or(0, |(meta, _)| meta.offset);
            if offset > latest {
                topics.set_pos(index, pos);
            } else {
                tracing::warn!(pos, offset, latest, topic = %String::from_utf8_lossy(topic), "ignoring a frame whose offset does not follow its topic's");
            }
        }
        None => {
            topics.insert(hash, pos);
        }
    }
}

fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, IoError> {
    let mut found = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| IoError::new("listing", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| IoError::new("listing", dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(base) = parse_segment_file_name(&name) {
            found.push((base, entry.path()));
        } else if name.ends_with(".tmp") {
            let _ = std::fs::remove_file(entry.path());
        } else {
            tracing::warn!(file = %entry.path().display(), "ignoring unknown file in shard directory");
        }
    }
    found.sort();
    Ok(found)
}

/// Deletes `later`, the segment files after `path`, whose data ends short of them:
/// the log ends at `path`. None of their records was acknowledged as durable (a
/// sync of a segment counts only after the seals of the segments before it), and
/// keeping them would leave a hole in their topics' offsets.
fn cut_log(
    dir: &Path,
    path: &Path,
    later: &[(u64, PathBuf)],
    report: &mut RecoveryReport,
) -> Result<(), IoError> {
    for (_, file) in later {
        tracing::error!(file = %file.display(), after = %path.display(), "deleting a segment that follows one whose end was lost");
        std::fs::remove_file(file).map_err(|e| IoError::new("removing", file, e))?;
        report.cut_segments += 1;
    }
    sync_dir(dir)
}

/// Recovers the shard stored in `dir`.
pub fn recover_shard(
    dir: &Path,
    shard: u32,
    generation: u64,
    segment_bytes: u64,
    budget: Arc<DiskBudget>,
    clean: bool,
    stats: &ShardStats,
) -> Result<(SegmentLog, TopicTable, RecoveryReport), OpenError> {
    let started = Instant::now();
    std::fs::create_dir_all(dir).map_err(|e| IoError::new("creating", dir, e))?;
    let files = list_segments(dir)?;
    let mut report = RecoveryReport {
        segments: files.len(),
        ..RecoveryReport::default()
    };
    let mut log = SegmentLog::new(
        dir,
        shard,
        generation,
        segment_bytes,
        budget.clone(),
        Vec::new(),
    );
    let mut topics = TopicTable::new();
    for (i, (base, path)) in files.iter().enumerate() {
        let (base, path) = (*base, path.as_path());
        let next_base = files.get(i + 1).map(|(next, _)| *next);
        let newest = next_base.is_none();
        let file_len = std::fs::metadata(path)
            .map_err(|e| IoError::new("reading metadata of", path, e))?
            .len();
        // Sealed: as long as its data, which ends where the next segment starts.
        let sealed = next_base.is_some_and(|next| next.checked_sub(base) == Some(file_len));
        // Only whole batches up to the first bad frame count (see the module docs).
        let tail_rules = !sealed;
        if file_len < SEGMENT_HEADER_LEN as u64 {
            // A crash while the file was being created: it cannot hold a record.
            tracing::warn!(file = %path.display(), file_len, "removing a segment file too short to hold a header");
            std::fs::remove_file(path).map_err(|e| IoError::new("removing", path, e))?;
            report.bad_headers += 1;
            if !newest {
                // Its records were lost: what follows cannot be kept either.
                cut_log(dir, path, &files[i + 1..], &mut report)?;
                break;
            }
            continue;
        }
        let (segment, header) = Segment::open(path, base)?;
        let header_ok = header.is_ok();
        match header {
            Ok(header) if header.base == base && header.shard == shard => {}
            Ok(header) => {
                report.bad_headers += 1;
                tracing::error!(file = %path.display(), ?header, shard, "segment header names another shard or position; using the file name");
            }
            Err(error) => {
                report.bad_headers += 1;
                tracing::error!(file = %path.display(), %error, "segment header is damaged; scanning its frames anyway");
            }
        }
        budget.force_reserve(segment.capacity() as u64);
        log.push_recovered(segment);
        let segment = log.segments().last().expect("just pushed");
        // In the newest segment only whole batches count: a batch is indexed when its
        // last frame is seen.
        let mut pending: Vec<(u64, &[u8], u64, u64)> = Vec::new();
        let mut kept_end = SEGMENT_HEADER_LEN;
        let mut last_timestamp = 0;
        let mut records = 0;
        let mut corrupt = (0, 0);
        let stopped = scan_segment(
            segment,
            segment.capacity(),
            !tail_rules,
            |event| match event {
                ScanEvent::Frame { pos, view } => {
                    pending.push((pos, view.topic, view.meta.timestamp_ms, view.meta.offset));
                    if !tail_rules || view.is_batch_end() {
                        kept_end = (pos - base) as usize + view.padded_len();
                        records += pending.len() as u64;
                        for (pos, topic, timestamp, offset) in pending.drain(..) {
                            last_timestamp = last_timestamp.max(timestamp);
                            index_frame(&mut topics, &log, pos, topic, offset);
                        }
                    }
                }
                ScanEvent::Corrupt {
                    pos,
                    skipped,
                    error,
                } if tail_rules => {
                    tracing::warn!(file = %path.display(), pos, skipped, %error, "unsealed segment ends in a damaged frame; cutting it");
                }
                ScanEvent::Corrupt {
                    pos,
                    skipped,
                    error,
                } => {
                    corrupt.0 += 1;
                    corrupt.1 += skipped;
                    tracing::error!(file = %path.display(), pos, skipped, %error, "corrupt frame in a sealed segment; skipped it and kept the rest");
                }
            },
        );
        drop(pending);
        if !sealed && !header_ok && records == 0 {
            // A crash between reserving the file and writing its header (or, not the
            // newest, before any of its records reached the disk).
            tracing::warn!(file = %path.display(), "removing an unsealed segment with no header and no record");
            log.discard_newest()?;
            if !newest {
                cut_log(dir, path, &files[i + 1..], &mut report)?;
                break;
            }
            continue;
        }
        report.records += records;
        report.corrupt_frames += corrupt.0;
        report.corrupt_bytes += corrupt.1;
        let segment = log.newest_mut().expect("just pushed");
        segment.set_recovered_len(
            kept_end.max(if tail_rules { 0 } else { stopped }),
            last_timestamp,
        );
        if sealed {
            // Sealed segments were synced before they were cut.
            segment.synced_to(segment.len());
            continue;
        }
        let complete = next_base.is_some_and(|next| next - base == kept_end as u64);
        if complete {
            // A stop during the seal, after the data was written: finish it.
            tracing::info!(file = %path.display(), "finishing the seal of a complete segment");
            log.seal_newest()?;
            continue;
        }
        // After an unclean stop, or when frames were cut, make sure nothing but zeroes
        // follows the data in the segment that will be written next.
        if (!clean || stopped != kept_end || !newest)
            && let Some(last_nonzero) = segment.last_nonzero_from(kept_end)
        {
            report.truncated_bytes = (last_nonzero + 1 - kept_end) as u64;
            tracing::warn!(file = %path.display(), cut_at = kept_end, bytes = report.truncated_bytes, "cut an unfinished tail from an unsealed segment");
            segment.zero_tail()?;
        }
        if !newest {
            // The segment's seal never finished and its data ends short of the next
            // segment: what followed it was lost, so the log ends here.
            cut_log(dir, path, &files[i + 1..], &mut report)?;
            break;
        }
    }
    report.topics = topics.len();
    report.duration = started.elapsed();
    ShardStats::add(&stats.crc_errors, report.corrupt_frames);
    ShardStats::add(&stats.corrupt_bytes_skipped, report.corrupt_bytes);
    ShardStats::add(&stats.truncated_bytes, report.truncated_bytes);
    Ok((log, topics, report))
}
