//! Recovery scan: opening a shard of 1M records over 100,000 topics (CRC check of
//! every frame, registry rebuild).
//!
//! `cargo bench -p switchyard-broker --bench recovery`

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use switchyard_broker::storage::config::Retention;
use switchyard_broker::storage::log::DiskBudget;
use switchyard_broker::storage::shard::{Shard, ShardOptions};
use switchyard_broker::storage::stats::ShardStats;
use switchyard_broker::storage::{NewRecord, StoreConfig};

const RECORDS: usize = 1_000_000;
const TOPICS: usize = 100_000;

fn options(clean: bool) -> ShardOptions {
    let mut config = StoreConfig::new("unused");
    config.retention = Retention {
        max_bytes: None,
        max_age: None,
    };
    ShardOptions {
        clean,
        ..ShardOptions::from_config(&config, 0)
    }
}

fn open(dir: &std::path::Path, clean: bool) -> Shard {
    Shard::open(
        dir,
        options(clean),
        Arc::new(DiskBudget::new(None)),
        Arc::new(ShardStats::default()),
    )
    .unwrap()
    .0
}

fn recovery(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut shard = open(dir.path(), true);
        for b in 0..RECORDS / 1000 {
            let batch: Vec<NewRecord> = (0..1000)
                .map(|i| {
                    NewRecord::new(format!("user.{}", (b * 1000 + i) % TOPICS), vec![b'x'; 100])
                })
                .collect();
            shard.append(&batch, 1).unwrap();
        }
        shard.sync().unwrap();
    }
    let mut group = c.benchmark_group("recovery");
    group.throughput(Throughput::Elements(RECORDS as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for clean in [true, false] {
        let name = if clean {
            "open_after_clean_stop"
        } else {
            "open_after_crash"
        };
        group.bench_function(name, |b| {
            b.iter(|| {
                let shard = open(dir.path(), clean);
                assert_eq!(shard.topic_count(), TOPICS);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, recovery);
criterion_main!(benches);
