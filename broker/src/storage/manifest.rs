//! Files at the top of a data directory:
//!
//! - `MANIFEST` — fixed when the directory is created: format version and shard count.
//! - `STATE` — rewritten on every open: the store generation and the epoch floor.
//! - `CLEAN` — exists only between a clean close and the next open.
//! - `LOCK` — held (flock) by the process that has the store open.
//!
//! `MANIFEST` and `STATE` are small binary files with a magic, a version and a CRC,
//! written atomically: temporary file, fsync, rename, fsync of the directory.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::storage::error::{IoError, OpenError};
use crate::storage::segment::sync_dir;

pub const MANIFEST_FILE: &str = "MANIFEST";
pub const STATE_FILE: &str = "STATE";
pub const CLEAN_FILE: &str = "CLEAN";
pub const LOCK_FILE: &str = "LOCK";

const MANIFEST_MAGIC: [u8; 8] = *b"SWYDMANI";
const STATE_MAGIC: [u8; 8] = *b"SWYDSTAT";
const FORMAT_VERSION: u16 = 1;

/// Writes `bytes` to `dir/name` atomically and durably.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), IoError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = File::create(&tmp).map_err(|e| IoError::new("creating", &tmp, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| IoError::new("writing", &tmp, e))?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(|e| IoError::new("renaming into place", &path, e))?;
    sync_dir(dir)
}

/// Appends a CRC-32 of `body` and returns the whole file.
fn seal(mut body: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&body);
    body.extend_from_slice(&crc.to_le_bytes());
    body
}

/// Checks magic, length, version and CRC; returns the body after the 10-byte prefix.
fn open_sealed(
    path: &Path,
    bytes: &[u8],
    magic: [u8; 8],
    len: usize,
) -> Result<Vec<u8>, OpenError> {
    let bad = |reason: String| OpenError::BadMetadata {
        path: path.to_owned(),
        reason,
    };
    if bytes.len() != len + 4 || bytes[..8] != magic {
        return Err(bad(format!(
            "expected {} bytes starting with {:?}",
            len + 4,
            String::from_utf8_lossy(&magic)
        )));
    }
    let expected = u32::from_le_bytes(bytes[len..].try_into().expect("4 bytes"));
    let got = crc32fast::hash(&bytes[..len]);
    if got != expected {
        return Err(bad(format!(
            "checksum mismatch: computed {got:#010x}, stored {expected:#010x}"
        )));
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != FORMAT_VERSION {
        return Err(bad(format!(
            "format version {version} is not supported (this build reads {FORMAT_VERSION})"
        )));
    }
    Ok(bytes[..len].to_vec())
}

/// What `MANIFEST` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Manifest {
    pub shard_count: u32,
    pub created_ms: u64,
}

impl Manifest {
    const LEN: usize = 24;

    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(Self::LEN + 4);
        body.extend_from_slice(&MANIFEST_MAGIC);
        body.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        body.extend_from_slice(&[0, 0]);
        body.extend_from_slice(&self.shard_count.to_le_bytes());
        body.extend_from_slice(&self.created_ms.to_le_bytes());
        seal(body)
    }

    pub fn decode(path: &Path, bytes: &[u8]) -> Result<Manifest, OpenError> {
        let body = open_sealed(path, bytes, MANIFEST_MAGIC, Self::LEN)?;
        Ok(Manifest {
            shard_count: u32::from_le_bytes(body[12..16].try_into().expect("4 bytes")),
            created_ms: u64::from_le_bytes(body[16..24].try_into().expect("8 bytes")),
        })
    }
}

/// What `STATE` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct State {
    /// Incremented on every open; the high half of every epoch made while open.
    pub generation: u64,
    /// Epochs below this may have lost records (an unclean stop or damage happened
    /// after they were made): topics still at such an epoch get a new one on append.
    pub epoch_floor: u64,
}

impl State {
    const LEN: usize = 32;

    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(Self::LEN + 4);
        body.extend_from_slice(&STATE_MAGIC);
        body.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        body.extend_from_slice(&[0; 6]);
        body.extend_from_slice(&self.generation.to_le_bytes());
        body.extend_from_slice(&self.epoch_floor.to_le_bytes());
        seal(body)
    }

    pub fn decode(path: &Path, bytes: &[u8]) -> Result<State, OpenError> {
        let body = open_sealed(path, bytes, STATE_MAGIC, Self::LEN)?;
        Ok(State {
            generation: u64::from_le_bytes(body[16..24].try_into().expect("8 bytes")),
            epoch_floor: u64::from_le_bytes(body[24..32].try_into().expect("8 bytes")),
        })
    }
}

/// Reads a metadata file, `None` if it does not exist.
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, IoError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(IoError::new("reading", path, e)),
    }
}

/// Directory of shard `id`.
pub fn shard_dir(data_dir: &Path, id: u32) -> PathBuf {
    data_dir.join(format!("shard-{id:04}"))
}

/// How long opening waits for a held lock: `LOCK_TRIES` × `LOCK_RETRY`.
const LOCK_TRIES: u32 = 10;
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(20);

/// An exclusive lock on the data directory, held while the store is open.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    pub fn acquire(data_dir: &Path) -> Result<DirLock, OpenError> {
        let path = data_dir.join(LOCK_FILE);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| IoError::new("opening", &path, e))?;
        // A lock held only for a moment is waited for: a process that forks (to
        // spawn a program) while it has the store open shares the lock with the
        // child until the child execs, so a close and reopen in that window would
        // otherwise fail.
        let mut tries = LOCK_TRIES;
        loop {
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(DirLock { _file: file }),
                Err(rustix::io::Errno::WOULDBLOCK) if tries > 1 => {
                    tries -= 1;
                    std::thread::sleep(LOCK_RETRY);
                }
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    return Err(OpenError::Locked {
                        path: data_dir.to_owned(),
                    });
                }
                Err(errno) => return Err(IoError::new("locking", &path, errno.into()).into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_and_state_round_trip_and_detect_damage() {
        let path = Path::new("MANIFEST");
        let manifest = Manifest {
            shard_count: 16,
            created_ms: 99,
        };
        let bytes = manifest.encode();
        assert_eq!(Manifest::decode(path, &bytes).unwrap(), manifest);
        let mut bad = bytes.clone();
        bad[13] ^= 1;
        assert!(
            Manifest::decode(path, &bad)
                .unwrap_err()
                .to_string()
                .contains("checksum")
        );
        let state = State {
            generation: 3,
            epoch_floor: 2 << 32,
        };
        assert_eq!(State::decode(path, &state.encode()).unwrap(), state);
        assert!(
            State::decode(path, &bytes).is_err(),
            "a manifest is not a state file"
        );
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), "X", b"one").unwrap();
        write_atomic(dir.path(), "X", b"two").unwrap();
        assert_eq!(std::fs::read(dir.path().join("X")).unwrap(), b"two");
        assert!(!dir.path().join("X.tmp").exists());
    }
}
