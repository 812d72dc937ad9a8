//! Append throughput of one shard into the page cache (no fsync), batches of 1,000.
//!
//! `cargo bench -p switchyard-broker --bench append`

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use switchyard_broker::storage::config::Retention;
use switchyard_broker::storage::log::DiskBudget;
use switchyard_broker::storage::shard::{Shard, ShardOptions};
use switchyard_broker::storage::stats::ShardStats;
use switchyard_broker::storage::{NewRecord, StoreConfig};

const BATCH: usize = 1000;

fn options() -> ShardOptions {
    let mut config = StoreConfig::new("unused");
    config.retention = Retention {
        max_bytes: Some(256 << 20),
        max_age: None,
    };
    ShardOptions::from_config(&config, 0)
}

fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("append");
    group.throughput(Throughput::Elements(BATCH as u64));
    // One topic: a busy guild's burst, every record after the first following the
    // one before it in the batch.
    for (payload, topics) in [(100usize, 1usize), (100, 100), (100, 10_000), (1024, 100)] {
        let dir = tempfile::tempdir().unwrap();
        let budget = Arc::new(DiskBudget::new(None));
        let (mut shard, _) = Shard::open(
            dir.path(),
            options(),
            budget,
            Arc::new(ShardStats::default()),
        )
        .unwrap();
        let batches: Vec<Vec<NewRecord>> = (0..topics.div_ceil(BATCH).max(1))
            .map(|b| {
                (0..BATCH)
                    .map(|i| {
                        NewRecord::new(
                            format!("guild.{}", (b * BATCH + i) % topics),
                            vec![b'x'; payload],
                        )
                    })
                    .collect()
            })
            .collect();
        let mut next = 0;
        group.bench_function(
            BenchmarkId::new(format!("{payload}B"), format!("{topics}_topics")),
            |b| {
                b.iter(|| {
                    let batch = &batches[next % batches.len()];
                    next += 1;
                    shard.append(batch, 1).unwrap();
                    if next % 256 == 0 {
                        shard.enforce_retention(1).unwrap();
                    }
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);
