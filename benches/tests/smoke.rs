//! The CI smoke run: every scenario against every system for a moment, through the
//! real binaries (a `switchyard serve` process, nats-server and redis-server started
//! by `benches/peers.sh`, which installs them when missing). Proves each scenario
//! still works end to end; asserts what was measured, never how fast.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The bench binary and the switchyard binary beside it.
fn binaries() -> (&'static Path, PathBuf) {
    let bench = Path::new(env!("CARGO_BIN_EXE_switchyard-bench"));
    // `cargo test --workspace` builds the broker's binary into the same directory.
    let switchyard = bench.with_file_name("switchyard");
    assert!(
        switchyard.is_file(),
        "{} is missing: run `cargo test --workspace` (or build the switchyard binary)",
        switchyard.display()
    );
    (bench, switchyard)
}

/// Processes whose command line mentions `path`.
fn processes_using(path: &Path) -> Vec<String> {
    let needle = path.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| std::fs::read(entry.ok()?.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .filter(|cmdline| cmdline.contains(&needle))
        .collect()
}

/// Entries left in `dir`.
fn left_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect()
}

#[test]
fn a_refused_write_ends_the_run_with_the_brokers_reason_and_cleans_up() {
    let (bench, switchyard) = binaries();
    let out = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // One shard and a disk budget of one 2 MiB segment: the 1 KiB throughput run
    // (20 MB) fills it at once.
    let output = Command::new(bench)
        .args(["run", "--smoke", "--scenarios", "throughput,restart"])
        .args([
            "--systems",
            "switchyard-durable",
            "--payloads",
            "1024",
            "--out",
        ])
        .arg(out.path())
        .env("SWITCHYARD_BIN", &switchyard)
        .env("TMPDIR", tmp.path())
        .env("SWITCHYARD_SHARDS", "1")
        .env("SWITCHYARD_SEGMENT_MIB", "2")
        .env("SWITCHYARD_DISK_BUDGET_MIB", "2")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("ResourceExhausted") && stderr.contains("disk budget"),
        "{stderr}"
    );
    // The restart scenario after it never ran: the run stopped at the refusal.
    assert!(!stderr.contains("== restart"), "{stderr}");
    assert!(left_in(tmp.path()).is_empty(), "{:?}", left_in(tmp.path()));
    assert!(processes_using(tmp.path()).is_empty());
}

#[test]
fn a_run_stopped_by_sigterm_stops_its_broker_and_removes_its_directory() {
    let (bench, switchyard) = binaries();
    let out = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(bench)
        .args([
            "run",
            "--smoke",
            "--systems",
            "switchyard,switchyard-durable",
        ])
        .args(["--reps", "20", "--out"])
        .arg(out.path())
        .env("SWITCHYARD_BIN", &switchyard)
        .env("TMPDIR", tmp.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    // Twenty repetitions of every scenario take far longer than this wait.
    while !seen.contains("== throughput") {
        assert_ne!(stderr.read_line(&mut seen).unwrap(), 0, "{seen}");
    }
    assert!(!processes_using(tmp.path()).is_empty(), "no broker running");
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    // The rest of its stderr, read aside: a broker left running would hold the
    // pipe open.
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut rest);
        let _ = sender.send(rest);
    });
    seen += &receiver
        .recv_timeout(std::time::Duration::from_secs(30))
        .unwrap_or_default();
    let left_running = processes_using(tmp.path());
    if !left_running.is_empty() {
        let _ = Command::new("pkill")
            .args(["-KILL", "-f"])
            .arg(tmp.path())
            .status();
    }
    assert!(left_running.is_empty(), "left running: {left_running:?}");
    assert!(!status.success());
    assert!(seen.contains("stopped by SIGTERM"), "{seen}");
    assert!(left_in(tmp.path()).is_empty(), "{:?}", left_in(tmp.path()));
    assert!(!out.path().join("results.json").exists());
}

#[test]
fn every_scenario_runs_against_every_system() {
    let (bench, switchyard) = binaries();
    let out = tempfile::tempdir().unwrap();
    // Ports no one else holds, so that a peer left running elsewhere cannot answer.
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
            .to_string()
    };
    let status = Command::new(bench)
        .args(["run", "--smoke", "--out"])
        .arg(out.path())
        .env("SWITCHYARD_BIN", &switchyard)
        .env("NATS_PORT", free_port())
        .env("REDIS_PORT", free_port())
        .status()
        .unwrap();
    assert!(status.success(), "switchyard-bench run --smoke failed");

    let text = std::fs::read_to_string(out.path().join("results.json")).unwrap();
    let results: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(results["smoke"], true);
    let measurements = results["measurements"].as_array().unwrap();
    let has = |scenario: &str, system: &str, metric: &str| {
        measurements.iter().any(|m| {
            m["scenario"] == scenario
                && m["system"] == system
                && m["metric"] == metric
                && m["median"]
                    .as_f64()
                    .is_some_and(|v| v.is_finite() && v > 0.0)
        })
    };
    for system in [
        "switchyard",
        "switchyard-durable",
        "nats",
        "jetstream",
        "redis-pubsub",
        "redis-streams",
    ] {
        assert!(
            has("throughput", system, "records_per_s"),
            "throughput {system}"
        );
        assert!(has("latency", system, "p99_us"), "latency {system}");
        assert!(has("fanout", system, "deliveries_per_s"), "fanout {system}");
    }
    for system in ["switchyard", "nats", "redis-pubsub"] {
        assert!(
            has("many_topics", system, "rss_bytes_per_topic"),
            "many topics {system}"
        );
    }
    assert!(has("filters", "switchyard", "events_per_s"));
    for system in ["switchyard", "jetstream", "redis-streams"] {
        assert!(has("restart", system, "clean_s"), "restart {system}");
        assert!(has("restart", system, "sigkill_s"), "restart {system}");
    }
    // Nothing lost (at least once: a resend after a reconnect may add), except
    // that NATS core drops messages for a lagging subscriber by design.
    for m in measurements.iter().filter(|m| m["metric"] == "delivered") {
        let min = m["min"].as_f64().unwrap();
        if m["system"] == "nats" {
            assert!(min > 0.0, "{m}");
        } else {
            assert!(min >= 1.0, "{m}");
        }
    }
    for file in [
        "results.md",
        "throughput.svg",
        "latency-p99.svg",
        "fanout.svg",
        "restart.svg",
    ] {
        assert!(out.path().join(file).is_file(), "{file} missing");
    }
}
