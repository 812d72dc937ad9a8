//! Switchyard broker library.
//!
//! # Layout
//! - [`storage`]: the storage engine — sharded, memory-mapped, CRC-checked append logs
//!   holding tens of millions of lightweight topics, with a compact topic registry,
//!   group commit, recovery and retention. It knows nothing of gRPC, Lua or clustering.
//! - [`filter`]: Lua delivery filters — sandboxed, bounded, one state per thread.
//! - [`server`]: the gRPC server (`switchyard.v1.Broker`) over a store.
//!
//! The on-disk format is documented in `docs/storage-format.md`.

pub mod filter;
pub mod hash;
pub mod server;
pub mod storage;
