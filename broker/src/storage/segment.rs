//! One segment file: a fixed header, then record frames; written with `pwrite`,
//! read through a read-only memory mapping.
//!
//! ```text
//! byte  size  field
//!    0     8  magic        b"SWYDSEG\0"
//!    8     2  version      1
//!   10     2  header_len   64
//!   12     4  shard        the shard this segment belongs to
//!   16     8  base         log position of byte 0 of this file
//!   24     8  generation   store generation that created the file
//!   32    28  reserved     zero
//!   60     4  crc32        CRC-32 of bytes 0..60
//! ```
//! A segment being written is as long as the configured segment size, reserved up
//! front with `fallocate` so that a full disk is an error at creation rather than a
//! failed write later; unwritten space is zero. A sealed segment is cut to the
//! length of its data and synced.
//!
//! Appends are not written through the mapping: the first write to each page of
//! reserved space would fault, have the kernel zero the page (reading an unwritten
//! extent), then mark it writable, and every sync would write-protect the mapped
//! pages again (a TLB shootdown per sync). Frames are encoded into a staging buffer
//! instead and written with one `pwrite` per appended batch, which copies into the
//! page cache directly; the read-only mapping sees the same pages. Until then, reads
//! of staged frames come from the buffer, and reads of the batch written last come
//! from the buffer it was written from: the append path reads the records just
//! before the one it appends (skip pointers), and the first read of a page through
//! the mapping faults and takes the page's lock, which the sync thread's write-back
//! may hold for milliseconds.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::os::unix::fs::FileExt;

use memmap2::{Mmap, MmapOptions};

use crate::storage::error::IoError;

pub const SEGMENT_MAGIC: [u8; 8] = *b"SWYDSEG\0";
pub const SEGMENT_VERSION: u16 = 1;
pub const SEGMENT_HEADER_LEN: usize = 64;
pub const SEGMENT_SUFFIX: &str = "seg";

/// Why a segment header could not be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentHeaderError {
    #[error("file is {len} bytes, shorter than a segment header")]
    TooShort { len: usize },
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported segment version {found}")]
    UnsupportedVersion { found: u16 },
    #[error("header checksum mismatch: computed {got:#010x}, stored {expected:#010x}")]
    ChecksumMismatch { got: u32, expected: u32 },
}

/// The fields of a segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub shard: u32,
    pub base: u64,
    pub generation: u64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut buf = [0u8; SEGMENT_HEADER_LEN];
        buf[0..8].copy_from_slice(&SEGMENT_MAGIC);
        buf[8..10].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        buf[10..12].copy_from_slice(&(SEGMENT_HEADER_LEN as u16).to_le_bytes());
        buf[12..16].copy_from_slice(&self.shard.to_le_bytes());
        buf[16..24].copy_from_slice(&self.base.to_le_bytes());
        buf[24..32].copy_from_slice(&self.generation.to_le_bytes());
        let crc = crc32fast::hash(&buf[0..60]);
        buf[60..64].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    pub fn decode(buf: &[u8]) -> Result<SegmentHeader, SegmentHeaderError> {
        if buf.len() < SEGMENT_HEADER_LEN {
            return Err(SegmentHeaderError::TooShort { len: buf.len() });
        }
        if buf[0..8] != SEGMENT_MAGIC {
            return Err(SegmentHeaderError::BadMagic);
        }
        let expected = u32::from_le_bytes(buf[60..64].try_into().expect("4 bytes"));
        let got = crc32fast::hash(&buf[0..60]);
        if got != expected {
            return Err(SegmentHeaderError::ChecksumMismatch { got, expected });
        }
        let version = u16::from_le_bytes([buf[8], buf[9]]);
        if version != SEGMENT_VERSION {
            return Err(SegmentHeaderError::UnsupportedVersion { found: version });
        }
        let u64_at = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
        Ok(SegmentHeader {
            shard: u32::from_le_bytes(buf[12..16].try_into().expect("4 bytes")),
            base: u64_at(16),
            generation: u64_at(24),
        })
    }
}

/// File name of the segment starting at log position `base`.
pub fn segment_file_name(base: u64) -> String {
    format!("{base:020}.{SEGMENT_SUFFIX}")
}

/// The base position encoded in a segment file name, if it is one.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(SEGMENT_SUFFIX)?.strip_suffix('.')?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// A segment file, read through a memory mapping.
pub struct Segment {
    path: PathBuf,
    /// Log position of byte 0 of the file: positions are global within a shard.
    base: u64,
    /// Written with `pwrite`; kept open to remap when the segment is sealed. Shared
    /// with the shard's sync thread (`Segment::sync_target`).
    file: Arc<File>,
    /// The whole file, mapped shared and read-only (the data directory is locked by
    /// this process, see `Store::open`).
    map: Mmap,
    /// Bytes of data (header included), staged ones included; appends start here.
    len: usize,
    /// Bytes written to the file; `len - written` are staged.
    written: usize,
    /// Frames encoded but not yet written: bytes `written..len` of the segment, at
    /// the start of the buffer (which may be longer: it is reused).
    staged: Vec<u8>,
    /// The batch written last: bytes `recent_from..written` of the segment, at the
    /// start of the buffer (`recent_from == usize::MAX`: none).
    recent: Vec<u8>,
    recent_from: usize,
    /// Makes the next write fail (tests of a failing device).
    #[cfg(test)]
    pub(crate) fail_next_write: bool,
    /// Bytes known to be on disk.
    synced_len: usize,
    /// File bytes before this (page aligned) were dropped from the page cache.
    cache_released: usize,
    /// Newest record timestamp, for retention by age.
    last_timestamp_ms: u64,
    /// File bytes past the mapping (a roll whose cut failed).
    uncut: u64,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("path", &self.path)
            .field("base", &self.base)
            .field("len", &self.len)
            .field("written", &self.written)
            .field("synced_len", &self.synced_len)
            .field("capacity", &self.map.len())
            .finish_non_exhaustive()
    }
}

/// Maps `file` (`len` bytes) shared and read-only.
fn map_file(file: &File, path: &Path, len: usize) -> Result<Mmap, IoError> {
    // SAFETY: the file lives in the locked data directory of this process and is only
    // resized by this `Segment`, which never reads past the length it mapped; other
    // processes do not write to it, and this one only past the data it has read.
    unsafe { MmapOptions::new().len(len).map(file) }.map_err(|e| IoError::new("mapping", path, e))
}

/// A staging buffer larger than this is given back after its batch is written.
const MAX_KEPT_STAGING: usize = 4 << 20;
/// The largest page-cache folio's alignment (a PMD on x86-64 and arm64 with 4 KiB
/// pages).
const FOLIO_ALIGN: usize = 2 << 20;

/// Pages of a segment file to drop from the page cache (see
/// [`Segment::release_cache`]). Holds the file open, so it may run after the segment
/// is sealed or deleted.
#[derive(Debug)]
pub struct CacheRelease {
    file: Arc<File>,
    from: u64,
    len: u64,
}

impl CacheRelease {
    /// The same release in ranges of at most `max` bytes.
    pub fn pieces(&self, max: u64) -> impl Iterator<Item = CacheRelease> + '_ {
        let max = max.max(1);
        (0..self.len.div_ceil(max)).map(move |i| CacheRelease {
            file: self.file.clone(),
            from: self.from + i * max,
            len: max.min(self.len - i * max),
        })
    }

    /// Asks the kernel to drop the pages (`POSIX_FADV_DONTNEED`); best effort.
    pub fn run(&self) {
        let _ = rustix::fs::fadvise(
            &self.file,
            self.from,
            std::num::NonZeroU64::new(self.len),
            rustix::fs::Advice::DontNeed,
        );
    }
}

impl Segment {
    /// Creates a new segment file of `capacity` bytes starting at log position `base`.
    /// The file's blocks are reserved, its header written and synced, and the
    /// directory synced, before it is returned.
    pub fn create(
        dir: &Path,
        shard: u32,
        base: u64,
        capacity: u64,
        generation: u64,
    ) -> Result<Segment, IoError> {
        let segment = Self::create_unsynced(dir, shard, base, capacity, generation)?;
        let synced = segment
            .file
            .sync_all()
            .map_err(|e| IoError::new("syncing segment", &segment.path, e))
            .and_then(|()| sync_dir(dir));
        if let Err(error) = synced {
            let _ = std::fs::remove_file(&segment.path);
            return Err(error);
        }
        Ok(segment)
    }

    /// [`Segment::create`] without the syncs: a segment a roll starts when no spare
    /// is ready; the shard's sync thread syncs the file and the directory (see
    /// [`Roll`](crate::storage::log::Roll)).
    pub fn create_unsynced(
        dir: &Path,
        shard: u32,
        base: u64,
        capacity: u64,
        generation: u64,
    ) -> Result<Segment, IoError> {
        let path = dir.join(segment_file_name(base));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| IoError::new("creating segment", &path, e))?;
        let result = reserve(&file, &path, capacity)
            .and_then(|()| Self::start(file, path.clone(), shard, base, capacity, generation));
        if result.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        result
    }

    /// Starts the segment at log position `base` in a spare file (see [`Spare`]):
    /// renames it to the segment's name and writes the header. Nothing is synced:
    /// the shard's sync thread syncs the directory before any sync of the new
    /// segment's data (see [`Roll`](crate::storage::log::Roll)). On failure the
    /// spare is deleted.
    pub fn from_spare(
        spare: Spare,
        dir: &Path,
        shard: u32,
        base: u64,
        generation: u64,
    ) -> Result<Segment, IoError> {
        let path = dir.join(segment_file_name(base));
        if let Err(error) = std::fs::rename(&spare.path, &path) {
            let _ = std::fs::remove_file(&spare.path);
            return Err(IoError::new("renaming spare segment", &spare.path, error));
        }
        let result = Self::start(
            spare.file,
            path.clone(),
            shard,
            base,
            spare.capacity,
            generation,
        );
        if result.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        result
    }

    /// Writes the header of a reserved file and maps it.
    fn start(
        file: File,
        path: PathBuf,
        shard: u32,
        base: u64,
        capacity: u64,
        generation: u64,
    ) -> Result<Segment, IoError> {
        let header = SegmentHeader {
            shard,
            base,
            generation,
        }
        .encode();
        file.write_all_at(&header, 0)
            .map_err(|e| IoError::new("writing segment header", &path, e))?;
        let map = map_file(&file, &path, capacity as usize)?;
        Ok(Segment {
            path,
            base,
            file: Arc::new(file),
            map,
            len: SEGMENT_HEADER_LEN,
            written: SEGMENT_HEADER_LEN,
            staged: Vec::new(),
            recent: Vec::new(),
            recent_from: usize::MAX,
            #[cfg(test)]
            fail_next_write: false,
            synced_len: SEGMENT_HEADER_LEN,
            cache_released: 0,
            last_timestamp_ms: 0,
            uncut: 0,
        })
    }

    /// Opens an existing segment for recovery. Its data length is unknown until the
    /// caller has scanned it: until [`Segment::set_recovered_len`] the whole file
    /// counts as data, so the scan can look up frames it has already passed. Returns the header, or why it is unusable
    /// (the frames may still be readable: the caller decides).
    pub fn open(
        path: &Path,
        base: u64,
    ) -> Result<(Segment, Result<SegmentHeader, SegmentHeaderError>), IoError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| IoError::new("opening segment", path, e))?;
        let file_len = file
            .metadata()
            .map_err(|e| IoError::new("reading metadata of", path, e))?
            .len() as usize;
        if file_len < SEGMENT_HEADER_LEN {
            return Err(IoError::new(
                "opening segment",
                path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "shorter than a segment header",
                ),
            ));
        }
        let map = map_file(&file, path, file_len)?;
        let header = SegmentHeader::decode(&map);
        let segment = Segment {
            path: path.to_owned(),
            base,
            file: Arc::new(file),
            map,
            len: file_len,
            written: file_len,
            staged: Vec::new(),
            recent: Vec::new(),
            recent_from: usize::MAX,
            #[cfg(test)]
            fail_next_write: false,
            synced_len: file_len,
            cache_released: 0,
            last_timestamp_ms: 0,
            uncut: 0,
        };
        Ok((segment, header))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    /// Log position just past the data.
    pub fn end(&self) -> u64 {
        self.base + self.len as u64
    }

    /// Bytes of data, header included.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len <= SEGMENT_HEADER_LEN
    }

    /// Bytes the file takes on disk.
    pub fn capacity(&self) -> usize {
        self.map.len()
    }

    /// Bytes the file takes on disk: its mapping, and what a failed roll left uncut.
    pub fn disk_len(&self) -> u64 {
        self.map.len() as u64 + self.uncut
    }

    /// A roll's cut may have failed: `bytes` past the mapping may still be in the file.
    pub fn set_uncut(&mut self, bytes: u64) {
        self.uncut = bytes;
    }

    pub fn remaining(&self) -> usize {
        self.map.len() - self.len
    }

    pub fn last_timestamp_ms(&self) -> u64 {
        self.last_timestamp_ms
    }

    /// All mapped bytes, including unwritten space (for recovery scans).
    pub fn mapped(&self) -> &[u8] {
        &self.map
    }

    /// The data bytes from file offset `at` to the end of the data, or to the end of
    /// what is written when `at` is in it (a frame never spans the two: batches are
    /// written whole).
    pub fn data_from(&self, at: usize) -> &[u8] {
        if at >= self.written {
            &self.staged[at - self.written..self.len - self.written]
        } else if at >= self.recent_from {
            &self.recent[at - self.recent_from..self.written - self.recent_from]
        } else {
            &self.map[at..self.written]
        }
    }

    /// Makes room to stage `bytes` more (at most [`Segment::remaining`]).
    pub fn reserve_staging(&mut self, bytes: usize) {
        let need = self.len - self.written + bytes;
        if self.staged.len() < need {
            self.staged.resize(need, 0);
        }
    }

    /// Staging space past the data, to encode frames into before
    /// [`Segment::commit`]: as much as [`Segment::reserve_staging`] made room for.
    pub fn spare_mut(&mut self) -> &mut [u8] {
        let at = self.len - self.written;
        let room = self.remaining();
        let end = self.staged.len().min(at + room);
        &mut self.staged[at..end]
    }

    /// Marks `bytes` of staging space as data (readable at once; in the file after
    /// [`Segment::write_staged`]).
    pub fn commit(&mut self, bytes: usize, timestamp_ms: u64) {
        debug_assert!(self.len + bytes <= self.map.len());
        debug_assert!(self.len + bytes - self.written <= self.staged.len());
        self.len += bytes;
        self.last_timestamp_ms = self.last_timestamp_ms.max(timestamp_ms);
    }

    /// Writes the staged frames to the file (into the page cache: durable after
    /// [`Segment::sync`]). On failure they stay staged until
    /// [`Segment::discard_staged`]; part of them may be in the file.
    pub fn write_staged(&mut self) -> Result<(), IoError> {
        if self.written == self.len {
            return Ok(());
        }
        #[cfg(test)]
        if std::mem::take(&mut self.fail_next_write) {
            return Err(IoError::new(
                "writing segment",
                &self.path,
                std::io::Error::from_raw_os_error(5),
            ));
        }
        let batch = self.len - self.written;
        self.file
            .write_all_at(&self.staged[..batch], self.written as u64)
            .map_err(|e| IoError::new("writing segment", &self.path, e))?;
        let from = self.written;
        self.written = self.len;
        if batch <= MAX_KEPT_STAGING {
            // The buffer just written holds the batch: it is the recent one now,
            // and the last one is staged into next.
            std::mem::swap(&mut self.staged, &mut self.recent);
            self.recent_from = from;
        } else {
            self.forget_recent();
            self.staged = Vec::new();
        }
        if self.staged.len() > MAX_KEPT_STAGING {
            self.staged = Vec::new();
        }
        Ok(())
    }

    /// Reads of the batch written last go to the mapping from now on.
    fn forget_recent(&mut self) {
        self.recent = Vec::new();
        self.recent_from = usize::MAX;
    }

    /// Forgets the staged frames (after a failed write).
    pub fn discard_staged(&mut self) {
        self.len = self.written;
    }

    /// After a recovery scan: where the data ends and its newest timestamp.
    /// The recovered data counts as unsynced: after a crash it may exist only in the
    /// page cache, so the next sync covers all of it.
    pub fn set_recovered_len(&mut self, len: usize, last_timestamp_ms: u64) {
        debug_assert_eq!(self.written, self.len, "recovery stages nothing");
        self.len = len;
        self.written = len;
        self.synced_len = SEGMENT_HEADER_LEN;
        self.last_timestamp_ms = last_timestamp_ms;
    }

    /// Log position just past the data known to be on disk.
    pub fn synced_end(&self) -> u64 {
        self.base + self.synced_len as u64
    }

    /// True when written data not known to be on disk exists.
    pub fn is_dirty(&self) -> bool {
        self.synced_len < self.written
    }

    /// The segment's file (shared).
    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// What a sync started now covers: the file, and the bytes written to it so far
    /// (see [`Segment::synced_to`]).
    pub fn sync_target(&self) -> (Arc<File>, usize) {
        (self.file.clone(), self.written)
    }

    /// A sync of the file that started when `written` bytes had been written to it
    /// succeeded: those bytes are on disk.
    pub fn synced_to(&mut self, written: usize) {
        debug_assert!(written <= self.written);
        self.synced_len = self.synced_len.max(written.min(self.written));
    }

    /// Forces written data to disk. Staged frames are not written by it: a batch is
    /// written by its append, or (after a failed write) discarded.
    pub fn sync(&mut self) -> Result<(), IoError> {
        if self.synced_len < self.written {
            self.file
                .sync_data()
                .map_err(|e| IoError::new("syncing segment", &self.path, e))?;
            self.synced_len = self.written;
        }
        Ok(())
    }

    /// Drops from the page cache the file's pages from where the last call stopped
    /// up to offset `upto`, as far as they hold synced data (rounded down to whole
    /// pages; a sealed segment whose data is all asked for goes to its end). They
    /// are clean, so nothing is lost; later reads fault them back in from the disk,
    /// and pages read back are then left to the kernel. Best effort: the kernel
    /// keeps pages it cannot drop, and failures are ignored.
    ///
    /// This unmaps the pages from the segment's mapping at once; dropping them from
    /// the page cache is the returned [`CacheRelease`], which may run on any thread.
    /// The shard's sync thread runs it: `posix_fadvise` took 0.3–14 ms per 4 MiB
    /// on the benchmark machine, time the shard would not append.
    ///
    /// Why: every page a growing log adds to the page cache is a page of memory
    /// touched for the first time, which costs more than the copy into it where
    /// the kernel must find free memory (reclaim) or the host must back it (virtual
    /// machines that give free memory back). Pages dropped right behind the tail are
    /// reused for the next writes. See `StoreConfig::page_cache_per_shard`.
    pub fn release_cache(&mut self, upto: usize) -> Option<CacheRelease> {
        let page = rustix::param::page_size();
        let whole_file = self.map.len() == self.len && self.synced_len == self.len;
        let upto = if whole_file && upto >= self.len {
            self.len
        } else {
            upto.min(self.synced_len) / page * page
        };
        if upto <= self.cache_released {
            return None;
        }
        let from = self.cache_released;
        // Pages mapped into this process are not dropped by `fadvise`: unmap them
        // from the read-only mapping first.
        // SAFETY: the mapping is shared, read-only and backed by the file, so after
        // MADV_DONTNEED a read of these bytes faults in the same file contents: no
        // reference into the mapping sees different bytes. The range is within the
        // mapping (`upto` never exceeds `synced_len`, which never exceeds the mapped
        // length).
        let _ = unsafe {
            self.map
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, from, upto - from)
        };
        self.cache_released = upto;
        // The kernel drops only whole folios (up to 2 MiB, aligned to their size)
        // within the range: start at the 2 MiB boundary before `from`, so that a
        // folio the last call's end cut through goes now.
        let folio_from = from / FOLIO_ALIGN * FOLIO_ALIGN;
        Some(CacheRelease {
            file: self.file.clone(),
            from: folio_from as u64,
            len: (upto - folio_from) as u64,
        })
    }

    /// Writes bytes anywhere in the file, past the data too (tests that fake a
    /// crash's leftovers), and syncs them.
    #[cfg(test)]
    fn write_raw_for_test(&mut self, at: usize, bytes: &[u8]) {
        self.file.write_all_at(bytes, at as u64).unwrap();
        self.file.sync_all().unwrap();
    }

    /// File offset of the last non-zero byte at or after `from`, if any. Only the
    /// file's data regions are read: space reserved by `fallocate` and never
    /// written reads as zeroes and is skipped (`SEEK_DATA`/`SEEK_HOLE`), so that
    /// recovering after a crash does not page in the whole reserved segment (tens
    /// of MiB per shard). Where the file system cannot tell, everything is read.
    pub fn last_nonzero_from(&self, from: usize) -> Option<usize> {
        use rustix::fs::{SeekFrom, seek};
        let end = self.map.len();
        let mut regions = Vec::new();
        let mut at = from;
        while at < end {
            let data = match seek(&self.file, SeekFrom::Data(at as u64)) {
                Ok(pos) => pos as usize,
                // Nothing but holes (or reserved, unwritten space) past `at`.
                Err(rustix::io::Errno::NXIO) => break,
                Err(_) => {
                    regions = vec![(from, end)];
                    break;
                }
            };
            if data >= end {
                break;
            }
            let hole = seek(&self.file, SeekFrom::Hole(data as u64))
                .map_or(end, |pos| (pos as usize).min(end));
            regions.push((data.max(from), hole));
            at = hole.max(data + 1);
        }
        regions.iter().rev().find_map(|&(start, stop)| {
            self.map[start..stop]
                .iter()
                .rposition(|&b| b != 0)
                .map(|i| start + i)
        })
    }

    /// Zeroes everything past the data (garbage left by a crash), then syncs it.
    pub fn zero_tail(&mut self) -> Result<(), IoError> {
        let len = self.len;
        if let Some(last) = self.last_nonzero_from(len) {
            let zeroes = vec![0u8; (last + 1 - len).min(1 << 20)];
            let mut at = len;
            while at <= last {
                let n = zeroes.len().min(last + 1 - at);
                self.file
                    .write_all_at(&zeroes[..n], at as u64)
                    .map_err(|e| IoError::new("zeroing segment tail", &self.path, e))?;
                at += n;
            }
            self.file
                .sync_data()
                .map_err(|e| IoError::new("syncing zeroed segment tail", &self.path, e))?;
        }
        Ok(())
    }

    /// Syncs the data and cuts the file to its length: the segment becomes read-only
    /// history. Returns the bytes given back to the file system.
    pub fn seal(&mut self) -> Result<u64, IoError> {
        debug_assert_eq!(self.written, self.len, "a failed write stops appends");
        self.sync()?;
        self.staged = Vec::new();
        self.forget_recent();
        let freed = (self.map.len() - self.len) as u64;
        if freed == 0 {
            return Ok(0);
        }
        // Map the shorter length first, so no mapping ever covers bytes past the end
        // of the file.
        let map = map_file(&self.file, &self.path, self.len)?;
        self.map = map;
        self.file
            .set_len(self.len as u64)
            .map_err(|e| IoError::new("cutting sealed segment", &self.path, e))?;
        self.file
            .sync_all()
            .map_err(|e| IoError::new("syncing sealed segment", &self.path, e))?;
        Ok(freed)
    }

    /// Ends appends to the segment without waiting for the disk: maps just its
    /// data (the mapping of the reserved space goes with the returned [`Sealing`],
    /// which syncs and cuts the file on another thread). Until that is done the
    /// segment's data counts as unsynced.
    pub fn roll(&mut self) -> Result<Sealing, IoError> {
        debug_assert_eq!(self.written, self.len, "a failed write stops appends");
        let old_map = if self.map.len() > self.len {
            let map = map_file(&self.file, &self.path, self.len)?;
            Some(std::mem::replace(&mut self.map, map))
        } else {
            None
        };
        self.staged = Vec::new();
        self.forget_recent();
        Ok(Sealing {
            file: self.file.clone(),
            path: self.path.clone(),
            base: self.base,
            len: self.len,
            old_map,
        })
    }
}

/// Reserves `capacity` bytes of blocks for `file`.
fn reserve(file: &File, path: &Path, capacity: u64) -> Result<(), IoError> {
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, capacity) {
        Ok(()) => Ok(()),
        // A file system without fallocate: allocate by writing zeroes. A sparse
        // file would turn a full disk into a failed write in the middle of a batch.
        Err(rustix::io::Errno::OPNOTSUPP) => write_zeroes(file, capacity)
            .map_err(|e| IoError::new("reserving space for segment", path, e)),
        Err(errno) => Err(IoError::new(
            "reserving space for segment",
            path,
            errno.into(),
        )),
    }
}

/// Name of a shard's spare segment file. Recovery deletes it (it ends in `.tmp`).
pub const SPARE_FILE_NAME: &str = "spare.tmp";
/// Name of a spare segment file while it is being made.
const SPARE_MAKING_NAME: &str = "spare-new.tmp";

/// A file made ready for the next segment by the shard's sync thread: its blocks
/// reserved and synced, so that a roll only renames it and writes a header (see
/// [`Segment::from_spare`]).
#[derive(Debug)]
pub struct Spare {
    file: File,
    path: PathBuf,
    capacity: u64,
}

impl Spare {
    /// Creates (or recreates) the spare file in `dir`: under another name until its
    /// blocks are reserved and synced, so that `spare.tmp` is always ready.
    pub fn create(dir: &Path, capacity: u64) -> Result<Spare, IoError> {
        let making = dir.join(SPARE_MAKING_NAME);
        let path = dir.join(SPARE_FILE_NAME);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&making)
            .map_err(|e| IoError::new("creating spare segment", &making, e))?;
        let result = reserve(&file, &making, capacity)
            .and_then(|()| {
                file.sync_all()
                    .map_err(|e| IoError::new("syncing spare segment", &making, e))
            })
            .and_then(|()| {
                std::fs::rename(&making, &path)
                    .map_err(|e| IoError::new("renaming spare segment", &making, e))
            });
        match result {
            Ok(()) => Ok(Spare {
                file,
                path,
                capacity,
            }),
            Err(error) => {
                let _ = std::fs::remove_file(&making);
                Err(error)
            }
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Deletes the file.
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The rest of a segment's seal after [`Segment::roll`], for the shard's sync
/// thread ([`Sealing::seal`]). Holds the file open, so it may run after the
/// segment is deleted.
pub struct Sealing {
    file: Arc<File>,
    path: PathBuf,
    base: u64,
    len: usize,
    /// The mapping of the whole reserved file, replaced by one of the data.
    old_map: Option<Mmap>,
}

impl std::fmt::Debug for Sealing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealing")
            .field("path", &self.path)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl Sealing {
    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Syncs the data, then drops the mapping of the reserved space, cuts the file
    /// to its data and syncs that: a file as long as its data and followed by
    /// another segment is how recovery knows a segment was sealed (its data was on
    /// disk before the cut).
    pub fn seal(mut self) -> Result<(), IoError> {
        self.file
            .sync_data()
            .map_err(|e| IoError::new("syncing segment", &self.path, e))?;
        let Some(old_map) = self.old_map.take() else {
            return Ok(());
        };
        drop(old_map);
        self.file
            .set_len(self.len as u64)
            .map_err(|e| IoError::new("cutting sealed segment", &self.path, e))?;
        self.file
            .sync_all()
            .map_err(|e| IoError::new("syncing sealed segment", &self.path, e))
    }
}

/// Extends `file` to `len` bytes by writing zeroes, so that every block is allocated.
fn write_zeroes(file: &File, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let chunk = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = chunk.len().min((len - at) as usize);
        file.write_all_at(&chunk[..n], at)?;
        at += n as u64;
    }
    file.sync_all()
}

/// Makes a directory's entries (created, renamed or deleted files) durable.
pub fn sync_dir(dir: &Path) -> Result<(), IoError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| IoError::new("syncing directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_comes_in_pieces_and_runs_after_its_segment_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let mut segment = Segment::create(dir.path(), 0, 0, 8 << 20, 1).unwrap();
        let data = vec![5u8; 3 << 20];
        segment.reserve_staging(data.len());
        segment.spare_mut()[..data.len()].copy_from_slice(&data);
        segment.commit(data.len(), 5);
        segment.write_staged().unwrap();
        segment.sync().unwrap();
        let release = segment.release_cache(usize::MAX).expect("synced data");
        assert!(release.len >= 3 << 20, "{release:?}");
        let pieces: Vec<_> = release.pieces(1 << 20).collect();
        assert_eq!(pieces.len() as u64, release.len.div_ceil(1 << 20));
        assert_eq!(pieces[0].from, release.from);
        for pair in pieces.windows(2) {
            assert_eq!(pair[0].from + pair[0].len, pair[1].from);
        }
        let last = pieces.last().unwrap();
        assert_eq!(last.from + last.len, release.from + release.len);
        assert!(pieces.iter().all(|p| p.len > 0 && p.len <= 1 << 20));
        // The release holds the file open: it may run once the segment is dropped
        // and its file deleted (retention), without effect on anything else.
        let path = segment.path().to_owned();
        drop(segment);
        std::fs::remove_file(&path).unwrap();
        for piece in pieces {
            piece.run();
        }
    }

    /// Releases up to `upto` on this thread, as the shard's sync thread would.
    fn release_now(segment: &mut Segment, upto: usize) {
        if let Some(release) = segment.release_cache(upto) {
            release.run();
        }
    }

    #[test]
    fn the_batch_written_last_reads_from_memory_and_older_ones_from_the_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let mut segment = Segment::create(dir.path(), 0, 0, 8 << 20, 1).unwrap();
        let in_map =
            |segment: &Segment, bytes: &[u8]| segment.map.as_ptr_range().contains(&bytes.as_ptr());
        let mut starts = Vec::new();
        let sizes = [3000usize, 5000, 7000];
        for (i, size) in sizes.into_iter().enumerate() {
            starts.push(segment.len());
            segment.reserve_staging(size);
            segment.spare_mut()[..size].fill(i as u8 + 1);
            segment.commit(size, 5);
            // Staged: from the buffer, up to the end of the data.
            let staged = segment.data_from(starts[i]);
            assert_eq!(staged.len(), size);
            assert!(!in_map(&segment, staged));
            segment.write_staged().unwrap();
            let mapped = segment.mapped()[starts[i]..segment.len()].to_vec();
            // Just written: the same bytes, still from memory, up to the end of what
            // is written.
            let last = segment.data_from(starts[i] + 10);
            assert_eq!(last, &mapped[10..]);
            assert!(!in_map(&segment, last));
            if i > 0 {
                // The batch before: from the mapping, with the same bytes.
                let before = segment.data_from(starts[i - 1]);
                assert!(in_map(&segment, before));
                assert!(before.len() > sizes[i - 1]);
                assert!(before[..sizes[i - 1]].iter().all(|&b| b == i as u8));
            }
        }
        // A failed write keeps the batch before readable, from memory.
        segment.reserve_staging(100);
        segment.spare_mut()[..100].fill(9);
        segment.commit(100, 5);
        segment.fail_next_write = true;
        segment.write_staged().unwrap_err();
        segment.discard_staged();
        let last = segment.data_from(starts[2]);
        assert_eq!(last.len(), 7000);
        assert!(last.iter().all(|&b| b == 3) && !in_map(&segment, last));
        // Sealing forgets it: the mapping holds it all.
        segment.seal().unwrap();
        let last = segment.data_from(starts[2]);
        assert!(in_map(&segment, last) && last.len() == 7000 && last.iter().all(|&b| b == 3));
    }

    #[test]
    fn header_round_trips_and_detects_damage() {
        let header = SegmentHeader {
            shard: 3,
            base: 1 << 40,
            generation: 9,
        };
        let buf = header.encode();
        assert_eq!(SegmentHeader::decode(&buf), Ok(header));
        let mut bad = buf;
        bad[20] ^= 1;
        assert!(matches!(
            SegmentHeader::decode(&bad),
            Err(SegmentHeaderError::ChecksumMismatch { .. })
        ));
        assert_eq!(
            SegmentHeader::decode(&buf[..10]),
            Err(SegmentHeaderError::TooShort { len: 10 })
        );
    }

    #[test]
    fn file_names_round_trip() {
        assert_eq!(segment_file_name(64), "00000000000000000064.seg");
        assert_eq!(
            parse_segment_file_name("00000000000000000064.seg"),
            Some(64)
        );
        assert_eq!(parse_segment_file_name("64.seg"), None);
        assert_eq!(
            parse_segment_file_name("00000000000000000064.seg.tmp"),
            None
        );
    }

    #[test]
    fn create_commit_seal_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut segment = Segment::create(dir.path(), 0, 0, 64 << 10, 1).unwrap();
        assert_eq!(segment.capacity(), 64 << 10);
        segment.reserve_staging(8);
        segment.spare_mut()[..8].copy_from_slice(b"abcdefgh");
        segment.commit(8, 5);
        // Staged: readable, not in the file yet.
        assert_eq!(segment.data_from(64), b"abcdefgh");
        assert_eq!(&segment.mapped()[64..72], &[0; 8]);
        segment.write_staged().unwrap();
        assert_eq!(&segment.mapped()[64..72], b"abcdefgh");
        assert_eq!(segment.data_from(66), b"cdefgh");
        assert!(segment.is_dirty());
        assert_eq!(segment.seal().unwrap(), (64 << 10) - 72);
        assert!(!segment.is_dirty());
        let path = segment.path().to_owned();
        drop(segment);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 72);
        let (mut reopened, header) = Segment::open(&path, 0).unwrap();
        assert_eq!(header.unwrap().generation, 1);
        assert_eq!(&reopened.mapped()[64..72], b"abcdefgh");
        // Recovered data may exist only in the page cache: the next sync covers it.
        reopened.set_recovered_len(72, 5);
        assert!(reopened.is_dirty());
        reopened.sync().unwrap();
        assert!(!reopened.is_dirty());
    }

    /// Which pages of `segment`'s file, from its start, are in the page cache.
    fn resident_pages(segment: &Segment) -> Vec<bool> {
        let page = rustix::param::page_size();
        let mut vec = vec![0u8; segment.map.len().div_ceil(page)];
        // SAFETY: the mapping is `map.len()` bytes at a page-aligned address, and
        // `vec` has one byte per page of it.
        let rc = unsafe {
            libc::mincore(
                segment.map.as_ptr() as *mut libc::c_void,
                segment.map.len(),
                vec.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().map(|&b| b & 1 == 1).collect()
    }

    #[test]
    fn released_pages_leave_the_page_cache_and_read_back_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let statfs = rustix::fs::statfs(dir.path()).unwrap();
        if statfs.f_type as i64 == libc::TMPFS_MAGIC {
            eprintln!("skipped: tmpfs keeps its pages in memory whatever the advice");
            return;
        }
        // The kernel drops whole folios (up to 2 MiB, naturally aligned), so the
        // test asks at 1 MiB boundaries.
        const MIB: usize = 1 << 20;
        let page = rustix::param::page_size();
        let mut segment = Segment::create(dir.path(), 0, 0, 8 << 20, 1).unwrap();
        let data: Vec<u8> = (0..3 * MIB).map(|i| (i % 251) as u8 + 1).collect();
        segment.reserve_staging(data.len());
        segment.spare_mut()[..data.len()].copy_from_slice(&data);
        segment.commit(data.len(), 5);
        segment.write_staged().unwrap();
        let pages = |bytes: usize| bytes / page;
        // Unsynced data is never released.
        assert!(segment.release_cache(usize::MAX).is_none());
        assert!(
            resident_pages(&segment)[..pages(3 * MIB)]
                .iter()
                .all(|&r| r)
        );
        segment.sync().unwrap();
        release_now(&mut segment, 2 * MIB + 100);
        let resident = resident_pages(&segment);
        assert!(resident[..pages(2 * MIB)].iter().all(|&r| !r));
        assert!(resident[pages(2 * MIB)..pages(3 * MIB)].iter().all(|&r| r));
        // Everything reads back, the released pages from the disk; pages read back
        // are the kernel's again.
        assert_eq!(&segment.mapped()[64..64 + data.len()], &data[..]);
        assert!(
            resident_pages(&segment)[..pages(2 * MIB)]
                .iter()
                .all(|&r| r)
        );
        // Asking again for less does nothing; more releases what follows, up to
        // the synced data (pages mapped by the read above included).
        release_now(&mut segment, MIB);
        assert!(
            resident_pages(&segment)[..pages(3 * MIB)]
                .iter()
                .all(|&r| r)
        );
        release_now(&mut segment, usize::MAX);
        let resident = resident_pages(&segment);
        assert!(resident[..pages(2 * MIB)].iter().all(|&r| r));
        assert!(resident[pages(2 * MIB)..pages(3 * MIB)].iter().all(|&r| !r));
        assert_eq!(&segment.data_from(64)[..data.len()], &data[..]);
        // Sealed, the segment goes to its end, the last partial page included.
        segment.seal().unwrap();
        release_now(&mut segment, usize::MAX);
        let resident = resident_pages(&segment);
        assert_eq!(resident.len(), pages(3 * MIB) + 1);
        assert!(
            resident[pages(2 * MIB)..].iter().all(|&r| !r),
            "{resident:?}"
        );
    }

    #[test]
    fn garbage_past_the_data_is_found_and_zeroed_wherever_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let mut segment = Segment::create(dir.path(), 0, 0, 4 << 20, 1).unwrap();
        segment.reserve_staging(8);
        segment.spare_mut()[..8].copy_from_slice(b"abcdefgh");
        segment.commit(8, 5);
        segment.write_staged().unwrap();
        assert!(segment.is_dirty());
        segment.sync().unwrap();
        assert!(!segment.is_dirty());
        assert_eq!(
            segment.last_nonzero_from(72),
            None,
            "reserved space is zeroes"
        );
        // A crash left bytes past the data: near it, and megabytes further on
        // (written and synced, so the file system holds them as data).
        segment.write_raw_for_test(72 + 100, &[1]);
        segment.write_raw_for_test(72 + (3 << 20) + 5, &[7]);
        let path = segment.path().to_owned();
        drop(segment);
        let (mut reopened, _) = Segment::open(&path, 0).unwrap();
        assert_eq!(reopened.last_nonzero_from(72), Some(72 + (3 << 20) + 5));
        assert_eq!(reopened.last_nonzero_from(72 + (3 << 20) + 6), None);
        reopened.set_recovered_len(72, 5);
        reopened.zero_tail().unwrap();
        assert_eq!(reopened.last_nonzero_from(72), None);
        assert_eq!(&reopened.mapped()[64..72], b"abcdefgh");
        assert!(reopened.mapped()[72..].iter().all(|&b| b == 0));
    }
}
