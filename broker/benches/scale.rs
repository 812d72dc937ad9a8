//! Topics at scale: 10M topics of one record each in a default store (16 shards).
//! Reports append rate, registry bytes per topic (table size and anonymous RSS) and
//! restart time after a clean stop and after a crash.
//!
//! `cargo bench -p switchyard-broker --bench scale` (`SWITCHYARD_SCALE_TOPICS` to change
//! the count).

use std::time::Instant;

use switchyard_broker::storage::{Ack, FsyncPolicy, NewRecord, Store, StoreConfig};

/// Anonymous resident memory of this process, in bytes (heap, not mapped files).
fn rss_anon() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn open(dir: &std::path::Path) -> (Store, f64) {
    let mut config = StoreConfig::new(dir);
    config.fsync = FsyncPolicy::Never;
    config.retention.max_bytes = None;
    let started = Instant::now();
    let store = Store::open(config).unwrap();
    (store, started.elapsed().as_secs_f64())
}

fn main() {
    // `cargo bench` passes `--bench`; this harness takes no arguments.
    let topics: u64 = std::env::var("SWITCHYARD_SCALE_TOPICS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path());
    let before = rss_anon();
    let started = Instant::now();
    let mut batch = Vec::with_capacity(10_000);
    let mut pending = Vec::new();
    for i in 0..topics {
        batch.push(NewRecord::new(
            format!("user.{}", 100_000_000_000 + i),
            &b"{\"op\":0,\"d\":{}}"[..],
        ));
        if batch.len() == 10_000 {
            pending.push(
                store
                    .submit(std::mem::take(&mut batch), Ack::Written)
                    .unwrap(),
            );
            if pending.len() >= 4 {
                pending.remove(0).wait().unwrap();
            }
        }
    }
    if !batch.is_empty() {
        pending.push(store.submit(batch, Ack::Written).unwrap());
    }
    for p in pending {
        p.wait().unwrap();
    }
    let append_secs = started.elapsed().as_secs_f64();
    let count = store.topic_count().unwrap();
    assert_eq!(count, topics);
    let table = store.registry_memory_bytes().unwrap();
    let rss = rss_anon().saturating_sub(before);
    println!("topics: {count}");
    println!(
        "append: {:.2} s, {:.0} records/s (10,000-record batches over 16 shards)",
        append_secs,
        topics as f64 / append_secs
    );
    println!(
        "registry: {} bytes in tables = {:.1} bytes/topic; anonymous RSS grew {:.1} bytes/topic",
        table,
        table as f64 / topics as f64,
        rss as f64 / topics as f64
    );
    println!("disk: {} MiB of segments", store.disk_bytes() >> 20);
    store.close().unwrap();
    drop(store);

    let (store, clean_secs) = open(dir.path());
    assert_eq!(store.topic_count().unwrap(), topics);
    println!("restart after clean stop: {clean_secs:.2} s");
    store.close().unwrap();
    drop(store);

    std::fs::remove_file(dir.path().join("CLEAN")).unwrap();
    let (store, crash_secs) = open(dir.path());
    assert_eq!(store.topic_count().unwrap(), topics);
    println!("restart after crash (no CLEAN marker): {crash_secs:.2} s");
    store.close().unwrap();
}
