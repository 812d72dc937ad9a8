//! The storage engine through its public interface: appends, reads, ordering, limits,
//! restarts, retention.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{record, small_config};
use switchyard_broker::storage::{
    Ack, AppendError, NewRecord, OpenError, ReadError, ReadLimits, Retention, Store, StoreConfig,
};

#[test]
fn append_then_read_returns_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(small_config(dir.path())).unwrap();
    let appended = store
        .append(
            vec![
                NewRecord::new("guild.1", &b"{\"content\":\"hi\"}"[..])
                    .with_header("type", "MESSAGE_CREATE")
                    .with_header("channel_id", "42"),
                record("guild.1", "second"),
                record("user.7", "other topic"),
            ],
            Ack::Durable,
        )
        .unwrap();
    assert_eq!(appended[0].offset, 0);
    assert_eq!(appended[1].offset, 1);
    assert_eq!(appended[2].offset, 0);
    assert_eq!(appended[0].epoch, appended[1].epoch);

    let batch = store.read("guild.1", 0, ReadLimits::default()).unwrap();
    assert_eq!(batch.next_offset, 2);
    let first = &batch.records[0];
    assert_eq!(first.topic, "guild.1");
    assert_eq!(first.offset, 0);
    assert_eq!(first.epoch, appended[0].epoch);
    assert_eq!(&first.payload[..], b"{\"content\":\"hi\"}");
    assert_eq!(first.headers[0].key, "type");
    let shards_written = if store.shard_of("guild.1") == store.shard_of("user.7") {
        1
    } else {
        2
    };
    assert_eq!(
        store.stats().segment_bytes,
        shards_written * (64 << 10),
        "one segment per shard written to"
    );
    assert_eq!(first.headers[1].value, "42");
    assert!(first.timestamp_ms > 1_600_000_000_000);
    assert_eq!(&batch.records[1].payload[..], b"second");

    let info = store.topic_info("guild.1").unwrap().unwrap();
    assert_eq!((info.earliest_offset, info.next_offset), (0, 2));
    assert_eq!(store.topic_info("guild.404").unwrap(), None);
    let empty = store.read("guild.404", 0, ReadLimits::default()).unwrap();
    assert!(empty.records.is_empty());
    store.close().unwrap();
}

#[test]
fn reads_from_any_offset_of_a_long_interleaved_topic() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(small_config(dir.path())).unwrap();
    // 3,000 records of guild.1 interleaved with 7 other topics of the same shard set,
    // across many 64 KiB segments.
    for round in 0..3000u32 {
        let mut batch = vec![record("guild.1", format!("g1-{round}"))];
        for other in 0..7 {
            batch.push(record(
                &format!("guild.{}", 100 + other),
                format!("x-{round}"),
            ));
        }
        store.append(batch, Ack::Written).unwrap();
    }
    for from in [0u64, 1, 2, 3, 511, 512, 1023, 1024, 1500, 2047, 2999] {
        let batch = store
            .read(
                "guild.1",
                from,
                ReadLimits {
                    max_records: 37,
                    max_bytes: 1 << 20,
                },
            )
            .unwrap();
        let expected = (from..3000).take(37).collect::<Vec<_>>();
        let got = batch.records.iter().map(|r| r.offset).collect::<Vec<_>>();
        assert_eq!(got, expected, "read from {from}");
        for r in &batch.records {
            assert_eq!(r.payload, format!("g1-{}", r.offset).as_bytes());
        }
    }
    let tail = store.read_latest("guild.1", 5, 1 << 20).unwrap();
    assert_eq!(
        tail.records.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![2995, 2996, 2997, 2998, 2999]
    );
    // max_bytes stops early, but never returns nothing.
    let small = store
        .read(
            "guild.1",
            10,
            ReadLimits {
                max_records: 100,
                max_bytes: 12,
            },
        )
        .unwrap();
    assert_eq!(small.records.len(), 2);
    let tiny = store
        .read(
            "guild.1",
            10,
            ReadLimits {
                max_records: 100,
                max_bytes: 0,
            },
        )
        .unwrap();
    assert_eq!(tiny.records.len(), 1);
    assert!(matches!(
        store.read("guild.1", 3001, ReadLimits::default()),
        Err(ReadError::OffsetOutOfRange {
            requested: 3001,
            next: 3000,
            ..
        })
    ));
}

#[test]
fn many_writers_keep_per_topic_order_and_gap_free_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(small_config(dir.path())).unwrap();
    let writers = 8u32;
    let per_writer = 2000u32;
    let topics = 50u32;
    let handles: Vec<_> = (0..writers)
        .map(|writer| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut seq = 0;
                while seq < per_writer {
                    // Batches of 1..=10 records over several topics and shards.
                    let size = (seq % 10 + 1).min(per_writer - seq);
                    let batch = (seq..seq + size)
                        .map(|s| {
                            record(
                                &format!("guild.{}", (s * 7 + writer) % topics),
                                format!("{writer}:{s}"),
                            )
                        })
                        .collect();
                    store.append(batch, Ack::Written).unwrap();
                    seq += size;
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
    let mut total = 0;
    for topic in 0..topics {
        let name = format!("guild.{topic}");
        let batch = store
            .read(
                &name,
                0,
                ReadLimits {
                    max_records: 100_000,
                    max_bytes: usize::MAX,
                },
            )
            .unwrap();
        let mut last_seq: HashMap<u32, u32> = HashMap::new();
        for (i, r) in batch.records.iter().enumerate() {
            assert_eq!(r.offset, i as u64, "{name}: offsets must have no gaps");
            let text = std::str::from_utf8(&r.payload).unwrap();
            let (writer, seq) = text.split_once(':').unwrap();
            let (writer, seq): (u32, u32) = (writer.parse().unwrap(), seq.parse().unwrap());
            if let Some(prev) = last_seq.insert(writer, seq) {
                assert!(
                    prev < seq,
                    "{name}: writer {writer} sent {prev} before {seq}"
                );
            }
        }
        total += batch.records.len();
    }
    assert_eq!(total, (writers * per_writer) as usize);
    assert_eq!(store.stats().records_appended, total as u64);
}

#[test]
fn bad_input_is_refused_with_a_typed_error_and_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(small_config(dir.path())).unwrap();
    let err = store
        .append(vec![record("guild.1", vec![0u8; 20 << 10])], Ack::Written)
        .unwrap_err();
    assert!(
        matches!(err, AppendError::RecordTooLarge { max, .. } if max == 16 << 10),
        "{err}"
    );
    let err = store
        .append(vec![record("guild 1", "x")], Ack::Written)
        .unwrap_err();
    assert!(matches!(err, AppendError::InvalidTopic { .. }), "{err}");
    assert!(err.to_string().contains("guild 1"));
    let err = store
        .append(vec![record("", "x")], Ack::Written)
        .unwrap_err();
    assert!(matches!(err, AppendError::InvalidTopic { .. }), "{err}");
    assert!(matches!(
        store.append(vec![], Ack::Written),
        Err(AppendError::EmptyBatch)
    ));
    let err = store
        .append(
            vec![record("guild.1", "x").with_header("", "v")],
            Ack::Written,
        )
        .unwrap_err();
    assert!(matches!(err, AppendError::InvalidHeader { .. }), "{err}");
    let err = store
        .append(
            vec![record("guild.1", "x").with_header("k", "v".repeat(2000))],
            Ack::Written,
        )
        .unwrap_err();
    assert!(matches!(err, AppendError::InvalidHeader { .. }), "{err}");
    let big_batch = (0..5)
        .map(|_| record("guild.1", vec![1u8; 10 << 10]))
        .collect();
    assert!(matches!(
        store.append(big_batch, Ack::Written),
        Err(AppendError::BatchTooLarge { .. })
    ));
    let too_many = (0..10_001).map(|_| record("guild.1", "")).collect();
    assert!(matches!(
        store.append(too_many, Ack::Written),
        Err(AppendError::TooManyRecords { .. })
    ));
    // A batch with one bad record writes none of its records, in any shard.
    let mixed = vec![
        record("guild.1", "ok"),
        record("user.2", "ok"),
        record("bad topic", "x"),
    ];
    assert!(store.append(mixed, Ack::Written).is_err());
    assert_eq!(store.topic_info("guild.1").unwrap(), None);
    assert_eq!(store.topic_info("user.2").unwrap(), None);
    assert!(matches!(
        store.read("bad topic", 0, ReadLimits::default()),
        Err(ReadError::InvalidTopic { .. })
    ));
    assert_eq!(store.stats().records_appended, 0);
}

#[test]
fn disk_budget_refuses_appends_and_keeps_acknowledged_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path());
    config.shard_count = 1;
    config.disk_budget_bytes = Some(3 * config.segment_bytes);
    let store = Store::open(config).unwrap();
    let mut acked = 0u64;
    let err = loop {
        match store.append(vec![record("guild.1", vec![7u8; 4000])], Ack::Durable) {
            Ok(a) => {
                assert_eq!(a[0].offset, acked);
                acked += 1;
            }
            Err(err) => break err,
        }
        assert!(acked < 10_000, "the budget never stopped the writer");
    };
    assert!(
        matches!(err, AppendError::DiskBudgetExceeded { budget, .. } if budget == 3 * (64 << 10)),
        "{err}"
    );
    assert!(err.to_string().contains("disk budget"));
    assert!(acked > 20);
    let batch = store
        .read(
            "guild.1",
            0,
            ReadLimits {
                max_records: 100_000,
                max_bytes: usize::MAX,
            },
        )
        .unwrap();
    assert_eq!(batch.records.len() as u64, acked);
    store.close().unwrap();
    // Still all there after a restart.
    let store = Store::open(small_config(dir.path())).unwrap();
    assert_eq!(
        store.topic_info("guild.1").unwrap().unwrap().next_offset,
        acked
    );
}

#[test]
fn a_second_process_cannot_open_the_same_directory() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(small_config(dir.path())).unwrap();
    // flock locks belong to the open file description, so a second open in the same
    // process conflicts just as another process would.
    let err = Store::open(small_config(dir.path())).unwrap_err();
    assert!(matches!(err, OpenError::Locked { .. }), "{err}");
    store.close().unwrap();
}

#[test]
fn invalid_config_is_refused_before_touching_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StoreConfig::new(dir.path().join("data"));
    config.shard_count = 0;
    assert!(matches!(
        Store::open(config),
        Err(OpenError::InvalidConfig { .. })
    ));
    assert!(!dir.path().join("data").exists());
}

#[test]
fn clean_restart_keeps_offsets_and_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(small_config(dir.path())).unwrap();
    let first = store
        .append(
            vec![record("guild.1", "a"), record("guild.1", "b")],
            Ack::Written,
        )
        .unwrap();
    store.close().unwrap();
    assert!(matches!(
        store.append(vec![record("guild.1", "c")], Ack::Written),
        Err(AppendError::Closed)
    ));
    let store = Store::open(small_config(dir.path())).unwrap();
    assert_eq!(
        store
            .recovery_reports()
            .iter()
            .map(|r| r.records)
            .sum::<u64>(),
        2
    );
    let next = store
        .append(vec![record("guild.1", "c")], Ack::Written)
        .unwrap();
    assert_eq!(next[0].offset, 2);
    assert_eq!(
        next[0].epoch, first[1].epoch,
        "a clean restart keeps the epoch"
    );
    store
        .validate_position("guild.1", 2, first[1].epoch)
        .unwrap();
}

#[test]
fn one_million_topics_round_trip_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path());
    config.segment_bytes = 64 << 20;
    config.max_batch_bytes = 16 << 20;
    const TOPICS: u32 = 1_000_000;
    let store = Store::open(config.clone()).unwrap();
    for chunk in (0..TOPICS).collect::<Vec<_>>().chunks(5000) {
        let batch = chunk
            .iter()
            .map(|i| record(&format!("user.{i}"), i.to_le_bytes().to_vec()))
            .collect();
        store.append(batch, Ack::Written).unwrap();
    }
    assert_eq!(store.topic_count().unwrap(), u64::from(TOPICS));
    store.close().unwrap();
    drop(store);

    let store = Store::open(config).unwrap();
    assert_eq!(store.topic_count().unwrap(), u64::from(TOPICS));
    // Every topic, checked on its shard's own thread.
    let checked = store
        .for_each_shard(move |shard| {
            let mut checked = 0u32;
            for i in 0..TOPICS {
                let name = format!("user.{i}");
                let Ok(batch) = shard.read(&name, 0, ReadLimits::default()) else {
                    continue;
                };
                if let [only] = &batch.records[..] {
                    assert_eq!(only.payload, i.to_le_bytes().to_vec());
                    assert_eq!(only.offset, 0);
                    checked += 1;
                }
            }
            checked
        })
        .unwrap();
    assert_eq!(checked.iter().sum::<u32>(), TOPICS);
    let again = store
        .append(vec![record("user.123", "more")], Ack::Written)
        .unwrap();
    assert_eq!(again[0].offset, 1);
}

/// A store of one shard whose retention keeps four small segments.
fn one_shard_keeping_four_segments(dir: &std::path::Path) -> Store {
    let mut config = small_config(dir);
    config.shard_count = 1;
    config.retention = Retention {
        max_bytes: Some(4 * (64 << 10)),
        max_age: None,
    };
    Store::open(config).unwrap()
}

#[test]
fn retention_by_size_drops_old_segments_and_expires_topics() {
    let dir = tempfile::tempdir().unwrap();
    let store = one_shard_keeping_four_segments(dir.path());
    let old = store
        .append(vec![record("user.old", "gone soon")], Ack::Written)
        .unwrap();
    for i in 0..2000 {
        store
            .append(vec![record("guild.1", vec![i as u8; 500])], Ack::Written)
            .unwrap();
    }
    // Retention also runs on its own every second: it may have dropped some already.
    store.enforce_retention().unwrap();
    assert!(store.disk_bytes() <= 4 * (64 << 10));
    assert_eq!(store.stats().segment_bytes, store.disk_bytes());
    let stats = store.stats();
    assert!(stats.segments_dropped > 0);
    assert_eq!(stats.topics_expired, 1);

    // The old topic left the registry; it comes back at offset 0 with a new epoch.
    assert_eq!(store.topic_info("user.old").unwrap(), None);
    let reborn = store
        .append(vec![record("user.old", "again")], Ack::Written)
        .unwrap();
    assert_eq!(reborn[0].offset, 0);
    assert_ne!(reborn[0].epoch, old[0].epoch);
    let err = store
        .validate_position("user.old", 1, old[0].epoch)
        .unwrap_err();
    assert!(matches!(err, ReadError::HistoryLost { .. }), "{err}");

    // The long topic lost its oldest records: reading them says where history starts.
    let info = store.topic_info("guild.1").unwrap().unwrap();
    assert!(info.earliest_offset > 0);
    assert_eq!(info.next_offset, 2000);
    match store.read("guild.1", 0, ReadLimits::default()) {
        Err(ReadError::OffsetNotRetained {
            requested: 0,
            earliest,
            ..
        }) => assert_eq!(earliest, info.earliest_offset),
        other => panic!("expected OffsetNotRetained, got {other:?}"),
    }
    let batch = store
        .read("guild.1", info.earliest_offset, ReadLimits::default())
        .unwrap();
    assert_eq!(batch.records[0].offset, info.earliest_offset);
    assert!(matches!(
        store.validate_position("guild.1", 1, info.epoch),
        Err(ReadError::HistoryLost { .. })
    ));
}

/// Files and mappings of this process under `dir` whose files were deleted.
fn deleted_files_held_open(dir: &std::path::Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    let mut held: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .map(|target| target.to_string_lossy().into_owned())
        .collect();
    held.extend(
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .map(str::to_owned),
    );
    held.retain(|line| line.contains(&dir) && line.ends_with("(deleted)"));
    held
}

#[test]
fn segments_retention_drops_are_freed_by_the_shards_sync_thread() {
    let dir = tempfile::tempdir().unwrap();
    let store = one_shard_keeping_four_segments(dir.path());
    for i in 0..2000 {
        store
            .append(vec![record("guild.1", vec![i as u8; 500])], Ack::Written)
            .unwrap();
    }
    store.enforce_retention().unwrap();
    assert!(store.stats().segments_dropped > 0);
    // The shard's thread unlinks a dropped segment and hands the rest (unmapping,
    // freeing its blocks, closing it) to its sync thread: none stays held.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let held = deleted_files_held_open(dir.path());
        if held.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "deleted segments still held: {held:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // And the store goes on.
    store
        .append(vec![record("guild.1", "after")], Ack::Durable)
        .unwrap();
    store.close().unwrap();
}

#[test]
fn retention_by_age_drops_segments_whose_records_are_old() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path());
    config.shard_count = 1;
    config.retention = Retention {
        max_bytes: None,
        max_age: Some(Duration::from_millis(300)),
    };
    let store = Store::open(config).unwrap();
    for _ in 0..200 {
        store
            .append(vec![record("guild.1", vec![1u8; 1000])], Ack::Written)
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(400));
    store
        .append(vec![record("guild.2", "fresh")], Ack::Written)
        .unwrap();
    store.enforce_retention().unwrap();
    // Every sealed segment aged out; the one being written stays.
    let info = store.topic_info("guild.1").unwrap();
    assert!(info.is_none_or(|i| i.earliest_offset > 150), "{info:?}");
    assert!(store.stats().segments_dropped >= 2);
    assert_eq!(
        store
            .read("guild.2", 0, ReadLimits::default())
            .unwrap()
            .records
            .len(),
        1
    );
}

#[test]
fn durable_acks_wait_for_a_sync_under_every_policy() {
    use switchyard_broker::storage::FsyncPolicy;
    for policy in [
        FsyncPolicy::Always,
        FsyncPolicy::Interval(Duration::from_millis(20)),
        FsyncPolicy::Never,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = small_config(dir.path());
        config.fsync = policy;
        let store = Arc::new(Store::open(config).unwrap());
        let before = store.stats().fsyncs;
        store
            .append(vec![record("guild.1", "x")], Ack::Durable)
            .unwrap();
        assert!(
            store.stats().fsyncs > before,
            "{policy:?}: a durable ack came before any sync"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_appends_and_reads_wait_without_blocking_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path());
    // A queue of one command for the shard's thread: concurrent readers find it
    // full and must wait; appends (on the tasks' threads, under the shard's lock)
    // go on between the reads.
    config.shard_queue_depth = 1;
    let store = Store::open(config).unwrap();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let offset = store
                    .append_async(vec![record("guild.1", format!("{i}"))], Ack::Durable)
                    .await
                    .unwrap()[0]
                    .offset;
                let read = store
                    .read_async("guild.1", offset, ReadLimits::default())
                    .await
                    .unwrap();
                assert_eq!(read.records[0].payload, format!("{i}").as_bytes());
                offset
            })
        })
        .collect();
    let mut offsets = Vec::new();
    for task in tasks {
        offsets.push(task.await.unwrap());
    }
    offsets.sort_unstable();
    assert_eq!(offsets, (0..64).collect::<Vec<u64>>());
    let batch = store
        .read_async(
            "guild.1",
            0,
            ReadLimits {
                max_records: 100,
                max_bytes: usize::MAX,
            },
        )
        .await
        .unwrap();
    assert_eq!(batch.records.len(), 64);
    assert_eq!(
        store
            .topic_info_async("guild.1")
            .await
            .unwrap()
            .unwrap()
            .next_offset,
        64
    );
    // The last handle dropped inside the runtime closes the store without panicking.
    drop(store);
}

/// Pages of `path` in the page cache, one flag per page (mapping the file does not
/// read it).
fn resident_pages(path: &std::path::Path) -> Vec<bool> {
    let file = std::fs::File::open(path).unwrap();
    // SAFETY: a read-only mapping of a file no one writes while the test looks.
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    let page = rustix::param::page_size();
    let mut vec = vec![0u8; map.len().div_ceil(page)];
    // SAFETY: `vec` has one byte per page of the mapping.
    let rc = unsafe {
        libc::mincore(
            map.as_ptr() as *mut libc::c_void,
            map.len(),
            vec.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().map(|&b| b & 1 == 1).collect()
}

#[test]
fn page_cache_behind_the_tail_is_released_and_everything_reads_back() {
    use common::segment_files;
    use switchyard_broker::storage::FsyncPolicy;
    let dir = tempfile::tempdir().unwrap();
    let tmpfs = rustix::fs::statfs(dir.path()).unwrap().f_type as i64 == libc::TMPFS_MAGIC;
    let mut config = small_config(dir.path());
    config.shard_count = 1;
    config.fsync = FsyncPolicy::Always;
    config.page_cache_per_shard = Some(256 << 10);
    let store = Store::open(config.clone()).unwrap();
    // A topic written once, then about 10 MiB of another one (160 segments of 64
    // KiB), then the first one again: its latest record is no longer cached.
    store
        .append(vec![record("user.1", "first")], Ack::Durable)
        .unwrap();
    let payload = vec![7u8; 1000];
    for batch in 0..500 {
        let records = (0..20)
            .map(|i| {
                let mut p = payload.clone();
                p[..8].copy_from_slice(&((batch * 20 + i) as u64).to_le_bytes());
                NewRecord::new("guild.1", p)
            })
            .collect();
        store.append(records, Ack::Durable).unwrap();
    }
    let files = segment_files(dir.path(), 0);
    assert!(files.len() > 100, "{} segments", files.len());
    if !tmpfs {
        // Segments more than the window and a release step (4 MiB) behind the
        // tail: released, but for the few pages that
        // appends read back since (following skip pointers to old records).
        let (mut resident, mut total) = (0, 0);
        for file in &files[..files.len() - 72] {
            let pages = resident_pages(file);
            resident += pages.iter().filter(|&&r| r).count();
            total += pages.len();
        }
        eprintln!("{resident} of {total} pages cached");
        assert!(
            resident * 4 < total,
            "{resident} of {total} pages still cached"
        );
        // The window (256 KiB) holds the three sealed segments before the newest.
        for file in &files[files.len() - 4..files.len() - 1] {
            let pages = resident_pages(file);
            assert!(
                pages.iter().all(|&r| r),
                "released inside the window: {pages:?}"
            );
        }
    }
    let again = store
        .append(vec![record("user.1", "second")], Ack::Durable)
        .unwrap();
    assert_eq!(again[0].offset, 1);
    let user = store.read("user.1", 0, ReadLimits::default()).unwrap();
    assert_eq!(
        user.records
            .iter()
            .map(|r| &r.payload[..])
            .collect::<Vec<_>>(),
        vec![&b"first"[..], &b"second"[..]]
    );
    let mut next = 0u64;
    while next < 10_000 {
        let batch = store.read("guild.1", next, ReadLimits::default()).unwrap();
        for r in &batch.records {
            assert_eq!(r.payload[..8], r.offset.to_le_bytes());
        }
        next = batch.next_offset;
    }
    store.close().unwrap();
    let store = Store::open(config).unwrap();
    assert_eq!(
        store.topic_info("guild.1").unwrap().unwrap().next_offset,
        10_000
    );
    assert_eq!(store.topic_info("user.1").unwrap().unwrap().next_offset, 2);
}

/// Sizes of the files in shard 0's directory, and whether a spare is among them.
fn shard_files(dir: &std::path::Path) -> (u64, bool) {
    let mut total = 0;
    let mut spare = false;
    for entry in std::fs::read_dir(dir.join("shard-0000")).unwrap() {
        let entry = entry.unwrap();
        spare |= entry.file_name() == "spare.tmp";
        total += entry.metadata().unwrap().len();
    }
    (total, spare)
}

#[test]
fn rolls_start_from_a_spare_file_that_counts_as_disk_and_goes_at_close() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path());
    config.shard_count = 1;
    let store = Store::open(config.clone()).unwrap();
    let append = |i: u32| {
        store
            .append(vec![record("guild.1", vec![i as u8; 1000])], Ack::Written)
            .unwrap()
    };
    // The first roll makes the shard want a spare; later rolls start from one.
    for i in 0..400 {
        append(i);
    }
    assert!(common::segment_files(dir.path(), 0).len() >= 5);
    // Once the sync thread is done, the accounting matches the files: sealed
    // segments cut to their data, the newest and the spare as reserved.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (on_disk, spare) = shard_files(dir.path());
        if spare && on_disk == store.disk_bytes() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "files {on_disk} B (spare: {spare}), counted {} B",
            store.disk_bytes()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(store.stats().segment_bytes, store.disk_bytes());
    // The next roll starts in the spare file.
    use std::os::unix::fs::MetadataExt;
    let spare_inode = std::fs::metadata(dir.path().join("shard-0000/spare.tmp"))
        .unwrap()
        .ino();
    let segments = common::segment_files(dir.path(), 0).len();
    let mut i = 400;
    while common::segment_files(dir.path(), 0).len() == segments {
        append(i);
        i += 1;
        assert!(i < 1000, "no roll");
    }
    let newest = common::segment_files(dir.path(), 0).pop().unwrap();
    assert_eq!(std::fs::metadata(newest).unwrap().ino(), spare_inode);
    store.close().unwrap();
    drop(store);
    let (on_disk, spare) = shard_files(dir.path());
    assert!(!spare, "a close deletes the spare");
    let store = Store::open(config).unwrap();
    assert_eq!(store.disk_bytes(), on_disk);
    let all = ReadLimits {
        max_records: usize::MAX,
        max_bytes: usize::MAX,
    };
    let records = store.read("guild.1", 0, all).unwrap().records;
    assert_eq!(records.len(), i as usize);
    assert!(
        records
            .iter()
            .enumerate()
            .all(|(i, r)| r.offset == i as u64)
    );
}
