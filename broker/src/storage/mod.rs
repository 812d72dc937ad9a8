//! The storage engine.
//!
//! # Layout
//! - [`topic`]: topic name rules and the stable topic → shard hash.
//! - [`record`]: the on-disk record frame (length, CRC32, fields) and its codec.
//! - [`segment`]: one memory-mapped segment file (header, append, sync, seal).
//! - [`log`]: a shard's ordered list of segments addressed by log position.
//! - [`registry`]: the packed open-addressing table mapping a topic to its latest record.
//! - [`shard`]: the single-writer shard — append, read, recovery, retention, epochs.
//! - `skips`: where busy topics' long skip pointers lead, so appends read no old records.
//! - [`worker`]: a shard behind its lock, its threads, and group commit.
//! - [`observer`]: the hook that tells of every append (the live tail).
//! - [`store`]: the public entry point — a data directory of shards behind one handle.
//! - [`manifest`]: the data directory's manifest and generation state files.
//! - [`config`]: storage settings, their defaults and validation.
//! - [`error`]: the error types returned by the public API.
//! - [`stats`]: counters exported for metrics.

pub mod config;
pub mod error;
pub mod log;
pub mod manifest;
pub mod observer;
pub mod record;
pub mod recovery;
pub mod registry;
pub mod segment;
pub mod shard;
mod skips;
pub mod stats;
pub mod store;
pub mod topic;
mod worker;

pub use config::{FsyncPolicy, Retention, StoreConfig};
pub use error::{AppendError, OpenError, ReadError};
pub use observer::AppendObserver;
pub use record::{Header, NewRecord, Record, Topic};
pub use shard::{Appended, ReadBatch, ReadLimits, TopicInfo};
pub use stats::StatsSnapshot;
pub use store::{Ack, Store};
pub use topic::{TopicNameError, shard_for_topic, validate_topic_name};
