//! Switchyard broker library.
//!
//! # Layout
//! - [`storage`]: the storage engine — sharded, memory-mapped, CRC-checked append logs
//!   holding tens of millions of lightweight topics, with a compact topic registry,
//!   group commit, recovery and retention. It knows nothing of gRPC, Lua or clustering.
//!
//! The on-disk format is documented in `docs/storage-format.md`.

pub mod storage;
