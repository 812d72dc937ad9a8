//! Errors of the storage API. Each names what went wrong with the values a person
//! needs to act on it; I/O errors keep their source and say which file.

use std::path::PathBuf;

use crate::storage::record::DecodeError;
use crate::storage::topic::TopicNameError;

/// An I/O failure with the operation and file it happened on.
#[derive(Debug, thiserror::Error)]
#[error("{operation} {path}: {source}")]
pub struct IoError {
    pub operation: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl IoError {
    pub fn new(operation: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        IoError {
            operation,
            path: path.into(),
            source,
        }
    }

    /// True when the file system is out of space.
    pub fn is_disk_full(&self) -> bool {
        self.source.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error())
            || self.source.kind() == std::io::ErrorKind::StorageFull
    }
}

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("invalid storage configuration: {reason}")]
    InvalidConfig { reason: String },
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("{path} is not a Switchyard data file: {reason}")]
    BadMetadata { path: PathBuf, reason: String },
    #[error("the data directory {path} is in use by another process")]
    Locked { path: PathBuf },
}

/// Why an append was refused. Nothing of a refused batch is written.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("invalid topic name {topic:?}: {source}")]
    InvalidTopic {
        topic: String,
        #[source]
        source: TopicNameError,
    },
    #[error("record for {topic:?} is {size} bytes encoded; the limit is {max}")]
    RecordTooLarge { topic: String, size: u64, max: u64 },
    #[error("batch is {size} bytes encoded; the limit is {max}")]
    BatchTooLarge { size: u64, max: u64 },
    #[error("batch has {count} records; the limit is {max}")]
    TooManyRecords { count: usize, max: usize },
    #[error("empty batch")]
    EmptyBatch,
    #[error("invalid header on a record for {topic:?}: {reason}")]
    InvalidHeader { topic: String, reason: String },
    #[error(
        "disk budget reached: {used} of {budget} bytes reserved, a new segment needs {needed} more; \
         lower retention or raise the budget"
    )]
    DiskBudgetExceeded { used: u64, budget: u64, needed: u64 },
    #[error("disk full: {0}")]
    DiskFull(#[source] IoError),
    #[error(transparent)]
    Io(IoError),
    #[error("shard {shard} stopped accepting writes after a failed sync: {reason}")]
    ShardFailed { shard: u32, reason: String },
    #[error("epoch numbers of this generation are used up; restart the broker")]
    EpochsExhausted,
    #[error("the store is closed")]
    Closed,
}

impl From<IoError> for AppendError {
    fn from(error: IoError) -> Self {
        if error.is_disk_full() {
            AppendError::DiskFull(error)
        } else {
            AppendError::Io(error)
        }
    }
}

/// Why a read could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("invalid topic name {topic:?}: {source}")]
    InvalidTopic {
        topic: String,
        #[source]
        source: TopicNameError,
    },
    #[error(
        "offset {requested} of {topic:?} is no longer retained; the earliest retained offset is {earliest}"
    )]
    OffsetNotRetained {
        topic: String,
        requested: u64,
        earliest: u64,
    },
    #[error("offset {requested} of {topic:?} is past its end; the next offset is {next}")]
    OffsetOutOfRange {
        topic: String,
        requested: u64,
        next: u64,
    },
    #[error(
        "history of {topic:?} was lost: position (offset {offset}, epoch {epoch}) is not in the \
         retained log; the topic is now at epoch {current_epoch}, offsets {earliest}..{next}"
    )]
    HistoryLost {
        topic: String,
        offset: u64,
        epoch: u64,
        current_epoch: u64,
        earliest: u64,
        next: u64,
    },
    #[error(
        "record {offset} of {topic:?} is corrupt on disk (log position {position}): {source}; \
         read from {next} to skip it"
    )]
    CorruptRecord {
        topic: String,
        offset: u64,
        position: u64,
        next: u64,
        #[source]
        source: DecodeError,
    },
    #[error("the store is closed")]
    Closed,
}
