//! Crashes, torn writes, corruption and full disks: what survives, and what readers
//! are told.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{flip_byte, forget_clean_close, locate, record, small_config, zero_range};
use switchyard_broker::storage::{Ack, AppendError, FsyncPolicy, ReadError, ReadLimits, Store};

/// Every record of every shard: (shard, position, topic, offset).
fn positions(store: &Store) -> Vec<(u32, u64, String, u64)> {
    store
        .for_each_shard(|shard| {
            let mut found = Vec::new();
            let id = shard.id();
            shard.for_each_record(|pos, r| found.push((id, pos, r.topic, r.offset)));
            found
        })
        .unwrap()
        .into_iter()
        .flatten()
        .collect()
}

const ALL: ReadLimits = ReadLimits {
    max_records: usize::MAX,
    max_bytes: usize::MAX,
};

#[test]
fn torn_tail_cuts_the_unfinished_batch_and_readers_past_it_are_told() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path());
    config.shard_count = 1;
    let store = Store::open(config.clone()).unwrap();
    let kept = store
        .append(
            vec![record("guild.1", "a"), record("guild.1", "b")],
            Ack::Durable,
        )
        .unwrap();
    store
        .append(
            vec![
                record("guild.1", "c"),
                record("guild.1", "d"),
                record("user.5", "e"),
            ],
            Ack::Written,
        )
        .unwrap();
    let all = positions(&store);
    store.close().unwrap();
    drop(store);

    // The batch's last frame never reached the disk: its first two frames did.
    let (_, last_pos, _, _) = all.iter().find(|p| p.2 == "user.5").unwrap();
    let (file, at) = locate(dir.path(), 0, *last_pos);
    zero_range(&file, at, 8);
    forget_clean_close(dir.path());

    let store = Store::open(config).unwrap();
    let report = &store.recovery_reports()[0];
    assert_eq!(report.records, 2);
    assert!(report.truncated_bytes > 0, "{report:?}");
    assert_eq!(store.stats().truncated_bytes, report.truncated_bytes);
    assert_eq!(store.topic_info("user.5").unwrap(), None);
    let info = store.topic_info("guild.1").unwrap().unwrap();
    assert_eq!(info.next_offset, 2);

    // Before anything new is written, a reader that saw the lost "c" and "d" is told
    // so: the topic is still at the old epoch, but its position is past the end.
    let err = store
        .validate_position("guild.1", 4, kept[1].epoch)
        .unwrap_err();
    assert!(matches!(err, ReadError::HistoryLost { .. }), "{err}");

    // Offsets go on without a gap, under a new epoch.
    let next = store
        .append(vec![record("guild.1", "c2")], Ack::Durable)
        .unwrap();
    assert_eq!(next[0].offset, 2);
    assert_ne!(next[0].epoch, kept[1].epoch);
    // A reader that saw up to "b" resumes exactly ...
    store
        .validate_position("guild.1", 2, kept[1].epoch)
        .unwrap();
    let batch = store.read("guild.1", 2, ALL).unwrap();
    assert_eq!(&batch.records[0].payload[..], b"c2");
    // ... one that saw the lost "c" or "d" is told that history was lost.
    for offset in [3, 4] {
        let err = store
            .validate_position("guild.1", offset, kept[1].epoch)
            .unwrap_err();
        assert!(
            matches!(err, ReadError::HistoryLost { current_epoch, .. } if current_epoch == next[0].epoch),
            "{err}"
        );
    }
    // The cut bytes are zeroed: a further restart sees the same log.
    store.close().unwrap();
    drop(store);
    forget_clean_close(dir.path());
    let store = Store::open(small_config(dir.path())).unwrap();
    assert_eq!(store.read("guild.1", 0, ALL).unwrap().records.len(), 3);
}

#[test]
fn flipped_byte_in_a_sealed_segment_keeps_every_valid_record() {
    let dir = tempfile::tempdir().unwrap();
    let all = several_segments(dir.path());
    assert!(common::segment_files(dir.path(), 0).len() > 3);

    // Damage the payload of guild.1's record 5, in the first (sealed) segment.
    let (_, pos, _, _) = all.iter().find(|p| p.2 == "guild.1" && p.3 == 5).unwrap();
    let (file, at) = locate(dir.path(), 0, *pos);
    assert_eq!(file, common::segment_files(dir.path(), 0)[0]);
    flip_byte(&file, at + 100);

    let store = Store::open(one_shard(dir.path())).unwrap();
    let report = &store.recovery_reports()[0];
    assert_eq!(report.corrupt_frames, 1, "{report:?}");
    assert_eq!(report.records, 599);
    assert!(store.stats().crc_errors >= 1);

    // Reading across the damage stops before it, names it, and goes on after it.
    let before = store.read("guild.1", 0, ALL).unwrap();
    assert_eq!(
        before.records.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    match store.read("guild.1", 5, ALL) {
        Err(ReadError::CorruptRecord {
            offset: 5, next: 6, ..
        }) => {}
        other => panic!("expected CorruptRecord at 5, got {other:?}"),
    }
    let after = store.read("guild.1", 6, ALL).unwrap();
    assert_eq!(after.records.len(), 294);
    assert!(
        after
            .records
            .iter()
            .enumerate()
            .all(|(i, r)| r.offset == 6 + i as u64)
    );
    // The other topic lost nothing.
    assert_eq!(store.read("user.9", 0, ALL).unwrap().records.len(), 300);
}

#[test]
fn damaged_segment_header_is_reported_and_its_records_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path());
    config.shard_count = 1;
    let store = Store::open(config.clone()).unwrap();
    for i in 0..10 {
        store
            .append(vec![record("guild.1", format!("{i}"))], Ack::Written)
            .unwrap();
    }
    store.close().unwrap();
    drop(store);
    flip_byte(&common::segment_files(dir.path(), 0)[0], 20);
    let store = Store::open(config).unwrap();
    assert_eq!(store.recovery_reports()[0].bad_headers, 1);
    assert_eq!(store.read("guild.1", 0, ALL).unwrap().records.len(), 10);
}

const CHILD_DIR_VAR: &str = "SWITCHYARD_TEST_CHILD_DATA_DIR";

/// The writer that `sigkill_while_appending_loses_no_acknowledged_record` kills.
/// Appends with durable acks from four threads and prints every acknowledged record.
#[test]
#[ignore = "run as a child process by sigkill_while_appending_loses_no_acknowledged_record"]
fn child_writer_for_sigkill() {
    let Ok(dir) = std::env::var(CHILD_DIR_VAR) else {
        return;
    };
    let mut config = small_config(Path::new(&dir));
    config.fsync = FsyncPolicy::Always;
    let store = Store::open(config).unwrap();
    let threads: Vec<_> = (0..4u32)
        .map(|writer| {
            let store = store.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                // Bounded: the parent kills us long before either limit.
                for seq in 0..200_000u32 {
                    if started.elapsed() > Duration::from_secs(60) {
                        break;
                    }
                    let topics: Vec<String> = (0..(seq % 3 + 1))
                        .map(|k| format!("guild.{}", (seq + k + writer) % 20))
                        .collect();
                    let batch = topics
                        .iter()
                        .map(|t| record(t, format!("{writer}-{seq}-{t}")))
                        .collect();
                    let acked = store.append(batch, Ack::Durable).unwrap();
                    for (topic, a) in topics.iter().zip(acked) {
                        println!(
                            "ACK {topic} {} {} {writer}-{seq}-{topic}",
                            a.offset, a.epoch
                        );
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
}

#[test]
fn sigkill_while_appending_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_writer_for_sigkill",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_VAR, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut acked = Vec::new();
    let started = Instant::now();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while acked.len() < 3000 && started.elapsed() < Duration::from_secs(30) {
        let Some(Ok(line)) = lines.next() else { break };
        if let Some(rest) = line.strip_prefix("ACK ") {
            let parts: Vec<&str> = rest.split(' ').collect();
            acked.push((
                parts[0].to_owned(),
                parts[1].parse::<u64>().unwrap(),
                parts[2].parse::<u64>().unwrap(),
                parts[3].to_owned(),
            ));
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        acked.len() > 100,
        "the child acknowledged only {} records",
        acked.len()
    );

    let store = Store::open(small_config(dir.path())).unwrap();
    eprintln!(
        "acknowledged before SIGKILL: {}; recovered: {:?}",
        acked.len(),
        store.recovery_reports()
    );
    for (topic, offset, epoch, payload) in &acked {
        let batch = store
            .read(
                topic,
                *offset,
                ReadLimits {
                    max_records: 1,
                    max_bytes: 0,
                },
            )
            .unwrap();
        let r = &batch.records[0];
        assert_eq!(
            (r.offset, r.epoch, &r.payload[..]),
            (*offset, *epoch, payload.as_bytes()),
            "{topic}"
        );
    }
    // Every topic is gap-free from 0, and writing goes on after the crash.
    for topic in 0..20 {
        let name = format!("guild.{topic}");
        let records = store.read(&name, 0, ALL).unwrap().records;
        assert!(
            records
                .iter()
                .enumerate()
                .all(|(i, r)| r.offset == i as u64),
            "{name}"
        );
        if let Some(last) = records.last() {
            store
                .validate_position(&name, last.offset + 1, last.epoch)
                .unwrap();
            let next = store
                .append(vec![record(&name, "after")], Ack::Durable)
                .unwrap();
            assert_eq!(next[0].offset, last.offset + 1);
            assert_ne!(
                next[0].epoch, last.epoch,
                "an unclean stop starts a new epoch"
            );
        }
    }
}

/// Unmounts on drop.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_disk_is_a_typed_error_and_acknowledged_records_survive() {
    let dir = tempfile::tempdir().unwrap();
    let mount_point = dir.path().join("small-disk");
    std::fs::create_dir(&mount_point).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mount_point)
        .stderr(Stdio::null())
        .status();
    if !mounted.is_ok_and(|s| s.success()) {
        eprintln!("skipped: mounting a 1 MiB tmpfs needs root (CI runs as root)");
        return;
    }
    let _mount = Mount(mount_point.clone());
    let mut config = small_config(&mount_point.join("data"));
    config.shard_count = 1;
    let store = Store::open(config.clone()).unwrap();
    let mut acked = 0u64;
    let err = loop {
        match store.append(vec![record("guild.1", vec![3u8; 4000])], Ack::Durable) {
            Ok(a) => {
                assert_eq!(a[0].offset, acked);
                acked += 1;
            }
            Err(err) => break err,
        }
        assert!(acked < 1000, "a 1 MiB disk never filled up");
    };
    assert!(matches!(err, AppendError::DiskFull(_)), "{err}");
    assert!(err.to_string().contains("disk full"), "{err}");
    assert!(acked >= 100, "{acked}");
    eprintln!("disk full after {acked} acknowledged records: {err}");
    // Nothing acknowledged is lost, now or after a restart.
    assert_eq!(
        store.read("guild.1", 0, ALL).unwrap().records.len() as u64,
        acked
    );
    store.close().unwrap();
    drop(store);
    let store = Store::open(config).unwrap();
    assert_eq!(
        store.topic_info("guild.1").unwrap().unwrap().next_offset,
        acked
    );
}

#[test]
fn resync_after_damage_does_not_pick_up_a_frame_hidden_in_a_payload() {
    use switchyard_broker::storage::record::{
        FLAG_BATCH_END, FrameMeta, encode_frame, frame_len, padded_len,
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path());
    config.shard_count = 1;
    let store = Store::open(config.clone()).unwrap();
    // A producer's payload that is itself a valid frame of guild.1 at offset 1000.
    let forged_len = padded_len(frame_len("guild.1".len(), 0, 5));
    let mut forged = vec![0u8; forged_len];
    let meta = FrameMeta {
        flags: FLAG_BATCH_END,
        offset: 1000,
        epoch: 1,
        timestamp_ms: 1,
        prev_pos: u64::MAX,
        skip_pos: u64::MAX,
    };
    encode_frame(&mut forged, &meta, b"guild.1", &[], b"forge");
    // Pad so the embedded frame sits at an 8-byte aligned position.
    let mut payload = vec![0u8; 8 - "guild.1".len() % 8];
    payload.extend_from_slice(&forged);
    for i in 0..200u32 {
        let p = if i == 3 {
            payload.clone()
        } else {
            vec![i as u8; 600]
        };
        store
            .append(vec![record("guild.1", p)], Ack::Written)
            .unwrap();
    }
    let all = positions(&store);
    store.close().unwrap();
    drop(store);
    // Damage record 3's header (its timestamp), not its length.
    let (_, pos, _, _) = all.iter().find(|p| p.3 == 3).unwrap();
    let (file, at) = locate(dir.path(), 0, *pos);
    assert_eq!(
        file,
        common::segment_files(dir.path(), 0)[0],
        "record 3 is in a sealed segment"
    );
    flip_byte(&file, at + 33);

    let store = Store::open(config).unwrap();
    assert_eq!(store.recovery_reports()[0].corrupt_frames, 1);
    let info = store.topic_info("guild.1").unwrap().unwrap();
    assert_eq!(
        info.next_offset, 200,
        "the hidden frame must not become the latest"
    );
    let next = store
        .append(vec![record("guild.1", "after")], Ack::Written)
        .unwrap();
    assert_eq!(next[0].offset, 200);
}

#[test]
fn an_interrupted_segment_creation_is_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path());
    config.shard_count = 1;
    let store = Store::open(config.clone()).unwrap();
    store
        .append(vec![record("guild.1", "kept")], Ack::Durable)
        .unwrap();
    store.close().unwrap();
    drop(store);
    // A crash after the file was reserved but before its header was written.
    let shard_dir = dir.path().join("shard-0000");
    let stray = shard_dir.join(format!("{:020}.seg", 1u64 << 30));
    std::fs::write(&stray, vec![0u8; 64 << 10]).unwrap();
    forget_clean_close(dir.path());

    let store = Store::open(config).unwrap();
    assert!(!stray.exists());
    assert_eq!(store.read("guild.1", 0, ALL).unwrap().records.len(), 1);
    let next = store
        .append(vec![record("guild.1", "more")], Ack::Durable)
        .unwrap();
    assert_eq!(next[0].offset, 1);
}

fn one_shard(dir: &Path) -> switchyard_broker::storage::StoreConfig {
    let mut config = small_config(dir);
    config.shard_count = 1;
    config
}

/// A store of one shard with 300 two-record batches over several segments,
/// closed cleanly; returns every record's position.
fn several_segments(dir: &Path) -> Vec<(u32, u64, String, u64)> {
    let store = Store::open(one_shard(dir)).unwrap();
    for i in 0..300u32 {
        store
            .append(
                vec![
                    record("guild.1", format!("g-{i}-{}", "x".repeat(900))),
                    record("user.9", format!("u-{i}")),
                ],
                Ack::Written,
            )
            .unwrap();
    }
    let all = positions(&store);
    store.close().unwrap();
    all
}

#[test]
fn a_seal_a_stop_interrupted_is_finished_when_the_data_is_all_there() {
    let dir = tempfile::tempdir().unwrap();
    let all = several_segments(dir.path());
    let files = common::segment_files(dir.path(), 0);
    assert!(files.len() > 3, "{files:?}");
    // Stopped (SIGKILL) after the roll, before the seal cut the file: the file is
    // still as long as the reserved segment, and its data all there.
    let sealed_len = std::fs::metadata(&files[1]).unwrap().len();
    assert!(sealed_len < 64 << 10, "a sealed segment is cut to its data");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&files[1])
        .unwrap()
        .set_len(64 << 10)
        .unwrap();
    forget_clean_close(dir.path());

    let store = Store::open(one_shard(dir.path())).unwrap();
    let report = &store.recovery_reports()[0];
    assert_eq!(report.records, all.len() as u64, "{report:?}");
    assert_eq!(report.cut_segments, 0, "{report:?}");
    assert_eq!(common::segment_files(dir.path(), 0), files);
    assert_eq!(
        std::fs::metadata(&files[1]).unwrap().len(),
        sealed_len,
        "recovery finished the seal"
    );
    assert_eq!(store.read("guild.1", 0, ALL).unwrap().records.len(), 300);
    assert_eq!(store.read("user.9", 0, ALL).unwrap().records.len(), 300);
}

#[test]
fn an_unsealed_segment_whose_end_was_lost_ends_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let all = several_segments(dir.path());
    let files = common::segment_files(dir.path(), 0);
    assert!(files.len() > 3, "{files:?}");
    // A machine crash during the roll after segment 1: its seal never synced it,
    // and its last batches never reached the disk, while later segments' data did.
    let in_second: Vec<_> = all
        .iter()
        .filter(|p| locate(dir.path(), 0, p.1).0 == files[1])
        .collect();
    assert!(in_second.len() > 4);
    // From the start of a batch (its guild.1 record) on.
    let batches: Vec<_> = in_second.iter().filter(|p| p.2 == "guild.1").collect();
    let lost_from = batches[batches.len() - 2].1;
    let (_, at) = locate(dir.path(), 0, lost_from);
    let sealed_len = std::fs::metadata(&files[1]).unwrap().len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&files[1])
        .unwrap();
    file.set_len(64 << 10).unwrap();
    drop(file);
    zero_range(&files[1], at, (sealed_len - at) as usize);
    forget_clean_close(dir.path());

    let store = Store::open(one_shard(dir.path())).unwrap();
    let report = store.recovery_reports()[0].clone();
    assert_eq!(report.cut_segments, files.len() - 2, "{report:?}");
    assert!(report.found_damage());
    assert_eq!(common::segment_files(dir.path(), 0), files[..2].to_vec());
    // Everything before the lost bytes is kept, nothing after them, and every
    // topic is gap-free.
    let kept: Vec<_> = all.iter().filter(|p| p.1 < lost_from).collect();
    assert_eq!(report.records, kept.len() as u64, "{report:?}");
    for topic in ["guild.1", "user.9"] {
        let records = store.read(topic, 0, ALL).unwrap().records;
        let expected = kept.iter().filter(|p| p.2 == topic).count();
        assert_eq!(records.len(), expected, "{topic}");
        assert!(
            records
                .iter()
                .enumerate()
                .all(|(i, r)| r.offset == i as u64)
        );
    }
    // Appends go on where the log now ends.
    let next = store
        .append(vec![record("guild.1", "after")], Ack::Durable)
        .unwrap();
    let guild_kept = kept.iter().filter(|p| p.2 == "guild.1").count() as u64;
    assert_eq!(next[0].offset, guild_kept);
    let written = positions(&store)
        .into_iter()
        .find(|p| p.2 == "guild.1" && p.3 == guild_kept)
        .unwrap();
    assert_eq!(locate(dir.path(), 0, written.1).0, files[1]);
}

#[test]
fn a_segment_lost_in_the_middle_of_the_log_ends_it() {
    let dir = tempfile::tempdir().unwrap();
    let all = several_segments(dir.path());
    let files = common::segment_files(dir.path(), 0);
    assert!(files.len() > 3, "{files:?}");
    let kept: Vec<_> = all
        .iter()
        .filter(|p| files[..2].contains(&locate(dir.path(), 0, p.1).0))
        .collect();
    // A machine crash kept the name of segment 2 but none of its contents, while
    // later segments' data reached the disk.
    std::fs::File::create(&files[2]).unwrap();
    forget_clean_close(dir.path());

    let store = Store::open(one_shard(dir.path())).unwrap();
    let report = store.recovery_reports()[0].clone();
    assert_eq!(report.cut_segments, files.len() - 3, "{report:?}");
    assert_eq!(common::segment_files(dir.path(), 0), files[..2].to_vec());
    assert_eq!(report.records, kept.len() as u64, "{report:?}");
    for topic in ["guild.1", "user.9"] {
        let records = store.read(topic, 0, ALL).unwrap().records;
        assert_eq!(records.len(), kept.iter().filter(|p| p.2 == topic).count());
        assert!(
            records
                .iter()
                .enumerate()
                .all(|(i, r)| r.offset == i as u64)
        );
    }
    // The log now ends in a sealed segment, with no room: the next append rolls.
    let guild_kept = kept.iter().filter(|p| p.2 == "guild.1").count() as u64;
    let next = store
        .append(vec![record("guild.1", "after")], Ack::Durable)
        .unwrap();
    assert_eq!(next[0].offset, guild_kept);
    assert_eq!(common::segment_files(dir.path(), 0).len(), 3);
}

#[test]
fn an_unsealed_segment_with_no_header_and_no_record_in_the_middle_ends_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let all = several_segments(dir.path());
    let files = common::segment_files(dir.path(), 0);
    assert!(files.len() > 3, "{files:?}");
    let kept = all
        .iter()
        .filter(|p| files[..2].contains(&locate(dir.path(), 0, p.1).0))
        .count();
    // A spare renamed to segment 2's name whose header and records never reached
    // the disk, while later segments' data did.
    std::fs::write(&files[2], vec![0u8; 64 << 10]).unwrap();
    forget_clean_close(dir.path());

    let store = Store::open(one_shard(dir.path())).unwrap();
    let report = store.recovery_reports()[0].clone();
    assert_eq!(report.cut_segments, files.len() - 3, "{report:?}");
    assert_eq!(report.records, kept as u64, "{report:?}");
    assert_eq!(common::segment_files(dir.path(), 0), files[..2].to_vec());
}
