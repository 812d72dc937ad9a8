//! The `switchyard` binary as a separate process: killed with SIGKILL under load,
//! restarted, and every acknowledged record delivered once, in order.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::broker::{publish, record};
use switchyard_proto as pb;
use switchyard_proto::broker_client::BrokerClient;
use tonic::transport::Channel;

/// `switchyard serve` on a free loopback port, metrics off, data in `data_dir`.
fn serve(data_dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
        ])
        .arg("--data-dir")
        .arg(data_dir);
    command
}

/// A running `switchyard serve` and its gRPC address.
struct Process {
    child: Child,
    address: String,
}

impl Process {
    /// Starts the broker on a free loopback port and waits for its "listening" line.
    fn start(data_dir: &Path) -> Process {
        Self::start_with(data_dir, &[])
    }

    fn start_with(data_dir: &Path, extra: &[&str]) -> Process {
        let mut child = serve(data_dir)
            .args(["--fsync", "always"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = lines.next().expect("the broker printed nothing").unwrap();
        let address = line
            .strip_prefix("switchyard listening on ")
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Process { child, address }
    }

    async fn client(&self) -> BrokerClient<Channel> {
        BrokerClient::connect(format!("http://{}", self.address))
            .await
            .unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_durable_load_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Process::start(dir.path());
    let mut producers = Vec::new();
    for producer in 0..4u32 {
        let mut client = broker.client().await;
        producers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let started = Instant::now();
            // Bounded in count and time; the broker is killed while this runs.
            for batch in 0..100_000u32 {
                if started.elapsed() > Duration::from_secs(20) {
                    break;
                }
                let topic = format!("guild.{}", (batch + producer) % 8);
                let payloads: Vec<String> =
                    (0..5).map(|i| format!("{producer}-{batch}-{i}")).collect();
                let records = payloads.iter().map(|p| record(&topic, p)).collect();
                match client
                    .publish(publish(0, records, pb::AckLevel::Durable))
                    .await
                {
                    Ok(response) => {
                        for (position, payload) in
                            response.into_inner().positions.iter().zip(payloads)
                        {
                            acked.push((topic.clone(), position.offset, payload));
                        }
                    }
                    Err(_) => break, // the broker is gone
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    broker.child.kill().unwrap(); // SIGKILL
    broker.child.wait().unwrap();
    let mut acked = Vec::new();
    for producer in producers {
        acked.extend(producer.await.unwrap());
    }
    assert!(
        acked.len() > 100,
        "only {} records were acknowledged",
        acked.len()
    );

    let broker = Process::start(dir.path());
    let mut client = broker.client().await;
    for topic in 0..8 {
        let topic = format!("guild.{topic}");
        let expected: Vec<&(String, u64, String)> = acked.iter().filter(|a| a.0 == topic).collect();
        let Some(highest) = expected.iter().map(|a| a.1).max() else {
            continue;
        };
        // Everything from the start, through Subscribe, until the highest acknowledged offset.
        let add = pb::SubscribeRequest {
            command: Some(pb::subscribe_request::Command::Add(pb::Subscription {
                id: 1,
                topic: topic.clone(),
                start: Some(pb::StartPosition {
                    start: Some(pb::start_position::Start::Earliest(pb::Earliest {})),
                }),
                filter: String::new(),
                context: Default::default(),
            })),
        };
        let requests =
            tokio_stream::StreamExt::chain(tokio_stream::iter(vec![add]), tokio_stream::pending());
        let mut responses = client.subscribe(requests).await.unwrap().into_inner();
        let mut delivered: Vec<pb::Delivery> = Vec::new();
        while delivered.last().is_none_or(|d| d.offset < highest) {
            let response = tokio::time::timeout(Duration::from_secs(10), responses.message())
                .await
                .expect("deliveries within 10 s")
                .unwrap()
                .unwrap();
            if let Some(pb::subscribe_response::Event::Deliveries(batch)) = response.event {
                delivered.extend(batch.deliveries);
            }
        }
        // Once each, in order, from offset 0.
        assert!(
            delivered
                .iter()
                .enumerate()
                .all(|(i, d)| d.offset == i as u64),
            "{topic}"
        );
        for (_, offset, payload) in expected {
            assert_eq!(
                delivered[*offset as usize].payload,
                payload.as_bytes(),
                "{topic} offset {offset}"
            );
        }
    }
}

/// Runs `switchyard ARGS` against `broker`, with `input` on standard input.
fn cli(broker: &Process, args: &[&str], input: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env("SWITCHYARD_BROKER", format!("http://{}", broker.address))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[test]
fn the_readme_tour_works_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Process::start(dir.path());
    let (ok, out, _) = cli(
        &broker,
        &[
            "pub",
            "guild.1",
            r#"{"content":"hello"}"#,
            "-H",
            "type=MESSAGE_CREATE",
        ],
        "",
    );
    assert!(ok);
    assert!(
        out.starts_with("published 1 to guild.1 at offsets 0..=0"),
        "{out}"
    );
    let (ok, out, _) = cli(
        &broker,
        &["pub", "user.42", "--durable"],
        "one\ntwo\nthree\n",
    );
    assert!(ok);
    assert!(
        out.contains("published 3 to user.42 at offsets 0..=2"),
        "{out}"
    );

    let (ok, out, _) = cli(
        &broker,
        &[
            "sub", "guild.1", "user.42", "--from", "earliest", "--count", "4",
        ],
        "",
    );
    assert!(ok);
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines.len(), 4);
    assert!(
        lines[0].starts_with("guild.1 0 ")
            && lines[0].ends_with(r#"type=MESSAGE_CREATE {"content":"hello"}"#),
        "{}",
        lines[0]
    );
    assert!(
        lines[3].starts_with("user.42 2 ") && lines[3].ends_with(" three"),
        "{}",
        lines[3]
    );

    let (ok, out, _) = cli(&broker, &["fetch", "user.42", "--offset", "1"], "");
    assert!(ok);
    assert_eq!(out.lines().count(), 2);
    let (ok, out, _) = cli(&broker, &["topic", "info", "user.42"], "");
    assert!(ok);
    assert!(out.contains("offsets 0..3"), "{out}");
    let (ok, _, err) = cli(&broker, &["pub", "bad topic", "x"], "");
    assert!(!ok);
    assert!(err.contains("invalid topic name"), "{err}");
}

#[test]
fn sigterm_stops_the_broker_cleanly_with_everything_synced() {
    let dir = tempfile::tempdir().unwrap();
    // With a page-cache window too: the setting must not change what a clean stop
    // keeps (the storage tests check what it releases).
    let mut broker = Process::start_with(dir.path(), &["--page-cache-mib-per-shard", "0"]);
    let (ok, _, _) = cli(&broker, &["pub", "guild.1", "kept"], "");
    assert!(ok);
    let killed = Command::new("kill")
        .args(["-TERM", &broker.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = broker.child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        dir.path().join("CLEAN").exists(),
        "a clean stop marks the data directory"
    );
    // And the record is there after a restart.
    let broker = Process::start(dir.path());
    let (ok, out, _) = cli(&broker, &["fetch", "guild.1"], "");
    assert!(ok);
    assert!(out.ends_with(" kept\n"), "{out}");
}

#[test]
fn filters_from_the_command_line_check_test_reload_and_filter() {
    let lua_filters = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lua-filters");
    let dir = tempfile::tempdir().unwrap();
    let filters = dir.path().join("filters");
    std::fs::create_dir(&filters).unwrap();
    std::fs::copy(lua_filters.join("intents.lua"), filters.join("intents.lua")).unwrap();
    let broker = Process::start_with(
        &dir.path().join("data"),
        &[
            "--filters-dir",
            filters.to_str().unwrap(),
            "--filters-reload",
            "off",
        ],
    );
    // check and test run locally.
    let intents = lua_filters.join("intents.lua");
    let (ok, out, _) = cli(&broker, &["filter", "check", intents.to_str().unwrap()], "");
    assert!(ok && out.ends_with(": ok\n"), "{out}");
    let broken = dir.path().join("broken.lua");
    std::fs::write(&broken, "return function(e)\n  return (\nend").unwrap();
    let (ok, _, err) = cli(&broker, &["filter", "check", broken.to_str().unwrap()], "");
    assert!(!ok);
    assert!(err.contains("broken.lua:3:"), "{err}");
    let cases = lua_filters.join("cases/intents.json");
    let (ok, out, _) = cli(
        &broker,
        &[
            "filter",
            "test",
            intents.to_str().unwrap(),
            "--cases",
            cases.to_str().unwrap(),
        ],
        "",
    );
    assert!(ok, "{out}");
    assert!(out.contains("9 passed, 0 failed"), "{out}");

    // A filtered subscriber sees only what its intents allow.
    let sub = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "sub",
            "guild.9",
            "--from",
            "earliest",
            "--count",
            "2",
            "--filter",
            "intents",
            "-c",
            "intents=512",
        ])
        .env("SWITCHYARD_BROKER", format!("http://{}", broker.address))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for (kind, text) in [
        ("TYPING_START", "typing"),
        ("MESSAGE_CREATE", "one"),
        ("PRESENCE_UPDATE", "away"),
        ("MESSAGE_CREATE", "two"),
    ] {
        let header = format!("type={kind}");
        assert!(cli(&broker, &["pub", "guild.9", text, "-H", &header], "").0);
    }
    let output = sub.wait_with_output().unwrap();
    let out = String::from_utf8(output.stdout).unwrap();
    let payloads: Vec<&str> = out.lines().map(|l| l.rsplit(' ').next().unwrap()).collect();
    assert_eq!(payloads, vec!["one", "two"]);

    // Reload on request: a new filter serves, a broken one is refused.
    std::fs::write(
        filters.join("deny.lua"),
        "return function() return false end",
    )
    .unwrap();
    let (ok, out, _) = cli(&broker, &["filter", "reload"], "");
    assert!(ok, "{out}");
    assert!(out.contains("deny") && out.contains("intents"), "{out}");
    std::fs::write(filters.join("deny.lua"), "return function() return ( end").unwrap();
    let (ok, out, _) = cli(&broker, &["filter", "reload"], "");
    assert!(!ok);
    assert!(
        out.contains("refused:") && out.contains("deny.lua:1:"),
        "{out}"
    );
    assert!(
        out.contains("serving: deny, intents"),
        "the old version keeps serving: {out}"
    );
}

#[test]
fn serve_refuses_a_page_cache_setting_that_is_not_a_size() {
    let dir = tempfile::tempdir().unwrap();
    let output = serve(dir.path())
        .args(["--page-cache-mib-per-shard", "lots"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("--page-cache-mib-per-shard must be a number of MiB or \"off\""),
        "{err}"
    );
}

/// `THP_enabled` of a process's status (0 once it turned transparent huge pages off).
fn thp_enabled(pid: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("THP_enabled:"))
        .map(|value| value.trim().to_owned())
        .unwrap_or_else(|| panic!("no THP_enabled in the status of {pid}"))
}

#[test]
fn the_broker_turns_transparent_huge_pages_off_for_itself_unless_asked_not_to() {
    if thp_enabled("self") != "1" {
        eprintln!("skipped: transparent huge pages are not on for this test");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = Process::start(dir.path());
    assert_eq!(thp_enabled(&broker.child.id().to_string()), "0");
    drop(broker);
    // Kept: as the process that started it has them.
    let broker = Process::start_with(dir.path(), &["--transparent-huge-pages"]);
    assert_eq!(thp_enabled(&broker.child.id().to_string()), "1");
}
