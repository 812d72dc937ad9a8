//! A hook for what is appended: the live tail that subscriptions follow.

use crate::storage::record::NewRecord;
use crate::storage::shard::Appended;

/// Told of every append, on the appending thread under the shard's lock, right after the records are
/// in the log and before the append is acknowledged: calls for one shard come in log
/// order, so an observer sees each topic's records in offset order. It must not
/// block: it runs on the append path. It is handed the records themselves (the
/// shard is done with them), so that it can pass them on without copying.
pub trait AppendObserver: std::fmt::Debug + Send + Sync + 'static {
    fn appended(
        &self,
        shard: u32,
        records: Vec<NewRecord>,
        appended: &[Appended],
        timestamp_ms: u64,
    );
}
