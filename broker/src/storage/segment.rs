//! One segment file: a fixed header, then record frames, memory-mapped.
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
//! `SIGBUS` on a page fault; unwritten space is zero. A sealed segment is cut to the
//! length of its data and synced.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use memmap2::{MmapMut, MmapOptions};

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

/// A memory-mapped segment file.
#[derive(Debug)]
pub struct Segment {
    path: PathBuf,
    /// Log position of byte 0 of the file: positions are global within a shard.
    base: u64,
    /// Kept open so the mapping can be remapped when the segment is sealed.
    file: File,
    /// The whole file, mapped shared and writable (the data directory is locked by
    /// this process, see `Store::open`).
    map: MmapMut,
    /// Bytes of the file holding data (header included); appends start here.
    len: usize,
    /// Bytes known to be on disk.
    synced_len: usize,
    /// Newest record timestamp, for retention by age.
    last_timestamp_ms: u64,
}

/// Maps `file` (`len` bytes) shared and writable.
fn map_file(file: &File, path: &Path, len: usize) -> Result<MmapMut, IoError> {
    // SAFETY: the file lives in the locked data directory of this process and is only
    // resized by this `Segment`, which never reads past the length it mapped; other
    // processes do not write to it.
    unsafe { MmapOptions::new().len(len).map_mut(file) }
        .map_err(|e| IoError::new("mapping", path, e))
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
        let path = dir.join(segment_file_name(base));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| IoError::new("creating segment", &path, e))?;
        let result = Self::init(file, &path, dir, shard, base, capacity, generation);
        if result.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        result
    }

    fn init(
        file: File,
        path: &Path,
        dir: &Path,
        shard: u32,
        base: u64,
        capacity: u64,
        generation: u64,
    ) -> Result<Segment, IoError> {
        match rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, capacity) {
            Ok(()) => {}
            // A file system without fallocate: allocate by writing zeroes. A sparse
            // file would turn a full disk into SIGBUS on a page fault of the mapping.
            Err(rustix::io::Errno::OPNOTSUPP) => write_zeroes(&file, capacity)
                .map_err(|e| IoError::new("reserving space for segment", path, e))?,
            Err(errno) => {
                return Err(IoError::new(
                    "reserving space for segment",
                    path,
                    errno.into(),
                ));
            }
        }
        let mut map = map_file(&file, path, capacity as usize)?;
        map[..SEGMENT_HEADER_LEN].copy_from_slice(
            &SegmentHeader {
                shard,
                base,
                generation,
            }
            .encode(),
        );
        map.flush_range(0, SEGMENT_HEADER_LEN)
            .map_err(|e| IoError::new("syncing segment header", path, e))?;
        file.sync_all()
            .map_err(|e| IoError::new("syncing segment", path, e))?;
        sync_dir(dir)?;
        Ok(Segment {
            path: path.to_owned(),
            base,
            file,
            map,
            len: SEGMENT_HEADER_LEN,
            synced_len: SEGMENT_HEADER_LEN,
            last_timestamp_ms: 0,
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
            file,
            map,
            len: file_len,
            synced_len: file_len,
            last_timestamp_ms: 0,
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

    /// The data bytes from file offset `at` to the end of the data.
    pub fn data_from(&self, at: usize) -> &[u8] {
        &self.map[at..self.len]
    }

    /// Unwritten space, to encode frames into before [`Segment::commit`].
    pub fn spare_mut(&mut self) -> &mut [u8] {
        &mut self.map[self.len..]
    }

    /// Marks `bytes` of spare space as data.
    pub fn commit(&mut self, bytes: usize, timestamp_ms: u64) {
        debug_assert!(self.len + bytes <= self.map.len());
        self.len += bytes;
        self.last_timestamp_ms = self.last_timestamp_ms.max(timestamp_ms);
    }

    /// After a recovery scan: where the data ends and its newest timestamp.
    /// The recovered data counts as unsynced: after a crash it may exist only in the
    /// page cache, so the next sync covers all of it.
    pub fn set_recovered_len(&mut self, len: usize, last_timestamp_ms: u64) {
        self.len = len;
        self.synced_len = SEGMENT_HEADER_LEN;
        self.last_timestamp_ms = last_timestamp_ms;
    }

    /// True when unwritten data exists.
    pub fn is_dirty(&self) -> bool {
        self.synced_len < self.len
    }

    /// Forces written data to disk.
    pub fn sync(&mut self) -> Result<(), IoError> {
        if self.synced_len < self.len {
            self.map
                .flush_range(self.synced_len, self.len - self.synced_len)
                .map_err(|e| IoError::new("syncing segment", &self.path, e))?;
            self.synced_len = self.len;
        }
        Ok(())
    }

    /// Flushes the whole mapping, data or not (tests that fake a crash's leftovers).
    #[cfg(test)]
    fn sync_all_for_test(&mut self) {
        self.map.flush().unwrap();
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
            self.map[len..=last].fill(0);
            self.map
                .flush_range(len, last + 1 - len)
                .map_err(|e| IoError::new("zeroing segment tail", &self.path, e))?;
        }
        Ok(())
    }

    /// Syncs the data and cuts the file to its length: the segment becomes read-only
    /// history. Returns the bytes given back to the file system.
    pub fn seal(&mut self) -> Result<u64, IoError> {
        self.sync()?;
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
        segment.spare_mut()[..8].copy_from_slice(b"abcdefgh");
        segment.commit(8, 5);
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

    #[test]
    fn garbage_past_the_data_is_found_and_zeroed_wherever_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let mut segment = Segment::create(dir.path(), 0, 0, 4 << 20, 1).unwrap();
        segment.spare_mut()[..8].copy_from_slice(b"abcdefgh");
        segment.commit(8, 5);
        segment.sync().unwrap();
        assert_eq!(
            segment.last_nonzero_from(72),
            None,
            "reserved space is zeroes"
        );
        // A crash left bytes past the data: near it, and megabytes further on
        // (written and synced, so the file system holds them as data).
        let spare = segment.spare_mut();
        spare[100] = 1;
        spare[(3 << 20) + 5] = 7;
        let path = segment.path().to_owned();
        segment.sync_all_for_test();
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
