//! Helpers shared by the storage integration tests.
#![allow(dead_code)]

pub mod broker;
pub mod subscriber;

use std::path::{Path, PathBuf};

use switchyard_broker::storage::{FsyncPolicy, NewRecord, Retention, StoreConfig};

/// A configuration with small segments so tests cross segment boundaries.
pub fn small_config(dir: &Path) -> StoreConfig {
    let mut config = StoreConfig::new(dir);
    config.shard_count = 4;
    config.segment_bytes = 64 << 10;
    config.max_record_bytes = 16 << 10;
    config.max_batch_bytes = 32 << 10;
    config.fsync = FsyncPolicy::Never;
    config.retention = Retention {
        max_bytes: None,
        max_age: None,
    };
    config
}

pub fn record(topic: &str, payload: impl Into<Vec<u8>>) -> NewRecord {
    NewRecord::new(topic, payload.into())
}

/// Segment files of the shard directory `shard`, oldest first.
pub fn segment_files(data_dir: &Path, shard: u32) -> Vec<PathBuf> {
    let dir = data_dir.join(format!("shard-{shard:04}"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

/// Makes the next open see an unclean stop.
pub fn forget_clean_close(data_dir: &Path) {
    let _ = std::fs::remove_file(data_dir.join("CLEAN"));
}

/// Flips one byte of a file in place.
pub fn flip_byte(path: &Path, at: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.seek(SeekFrom::Start(at)).unwrap();
    file.read_exact(&mut byte).unwrap();
    file.seek(SeekFrom::Start(at)).unwrap();
    file.write_all(&[byte[0] ^ 0x40]).unwrap();
    file.sync_all().unwrap();
}

/// Overwrites `len` bytes of a file at `at` with zeroes.
pub fn zero_range(path: &Path, at: u64, len: usize) {
    use std::io::{Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.seek(SeekFrom::Start(at)).unwrap();
    file.write_all(&vec![0u8; len]).unwrap();
    file.sync_all().unwrap();
}

/// The segment file and file offset holding log position `pos` of shard `shard`.
pub fn locate(data_dir: &Path, shard: u32, pos: u64) -> (PathBuf, u64) {
    let files = segment_files(data_dir, shard);
    let file = files
        .iter()
        .rev()
        .find(|f| base_of(f) <= pos)
        .expect("a segment holds the position")
        .clone();
    let base = base_of(&file);
    (file, pos - base)
}

fn base_of(file: &Path) -> u64 {
    file.file_stem().unwrap().to_str().unwrap().parse().unwrap()
}
