//! The CI smoke run: every scenario against every system for a moment, through the
//! real binaries (a `switchyard serve` process, nats-server and redis-server started
//! by `benches/peers.sh`, which installs them when missing). Proves each scenario
//! still works end to end; asserts what was measured, never how fast.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Every system a run measures.
const SYSTEMS: [&str; 6] = [
    "switchyard",
    "switchyard-durable",
    "nats",
    "jetstream",
    "redis-pubsub",
    "redis-streams",
];

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

/// A bench run with its stderr read line by line aside. Dropping it kills the run
/// and anything still running from its temporary directory, so that a failed
/// assertion leaves nothing behind.
struct Run {
    child: Child,
    tmp: PathBuf,
    lines: mpsc::Receiver<String>,
    seen: String,
}

impl Run {
    fn start(command: &mut Command, tmp: &Path) -> Run {
        let mut child = command
            .env("TMPDIR", tmp)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = sender.send(line);
            }
        });
        Run {
            child,
            tmp: tmp.to_owned(),
            lines,
            seen: String::new(),
        }
    }

    /// Reads stderr until a line holds `needle`.
    fn wait_for(&mut self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.seen.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen += &(line + "\n"),
                Err(_) => panic!("no {needle:?} within {limit:?}: {}", self.seen),
            }
        }
    }

    /// Waits for the run to exit (at most `limit`); its exit status and stderr.
    fn finish(&mut self, limit: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {limit:?}: {}",
                self.seen
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        // The rest of stderr; a broker left running would hold the pipe open.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen += &(line + "\n");
        }
        (status, self.seen.clone())
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("pkill")
            .args(["-KILL", "-f"])
            .arg(&self.tmp)
            .status();
    }
}

#[test]
fn a_refused_write_ends_the_run_with_the_brokers_reason_and_cleans_up() {
    let (bench, switchyard) = binaries();
    let out = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // One shard and a disk budget of one 2 MiB segment: the 1 KiB throughput run
    // (20 MB) fills it at once.
    let mut run = Run::start(
        Command::new(bench)
            .args(["run", "--smoke", "--scenarios", "throughput,restart"])
            .args(["--systems", "switchyard-durable", "--payloads", "1024"])
            .arg("--out")
            .arg(out.path())
            .env("SWITCHYARD_BIN", &switchyard)
            .env("SWITCHYARD_SHARDS", "1")
            .env("SWITCHYARD_SEGMENT_MIB", "2")
            .env("SWITCHYARD_DISK_BUDGET_MIB", "2"),
        tmp.path(),
    );
    // Seconds; a producer that retried the refused batches would take an hour.
    let (status, stderr) = run.finish(Duration::from_secs(120));
    assert!(!status.success(), "{stderr}");
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
    // Twenty repetitions of every scenario: far longer than the test waits.
    let mut run = Run::start(
        Command::new(bench)
            .args([
                "run",
                "--smoke",
                "--systems",
                "switchyard,switchyard-durable",
            ])
            .args(["--reps", "20", "--out"])
            .arg(out.path())
            .env("SWITCHYARD_BIN", &switchyard),
        tmp.path(),
    );
    run.wait_for("== throughput", Duration::from_secs(60));
    assert!(!processes_using(tmp.path()).is_empty(), "no broker running");
    let pid = run.child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let (status, stderr) = run.finish(Duration::from_secs(60));
    assert!(!status.success());
    assert!(stderr.contains("stopped by SIGTERM"), "{stderr}");
    let left_running = processes_using(tmp.path());
    assert!(left_running.is_empty(), "left running: {left_running:?}");
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
    let traces = out.path().join("traces");
    let status = Command::new(bench)
        .args(["run", "--smoke", "--out"])
        .arg(out.path())
        .arg("--latency-trace")
        .arg(&traces)
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
    for system in SYSTEMS {
        assert!(
            has("throughput", system, "records_per_s"),
            "throughput {system}"
        );
        assert!(
            has("throughput", system, "client_cpu_us_per_record"),
            "load generator CPU {system}"
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
    // Every latency repetition left its batches; no record's latency exceeds its
    // arrival time (both count from the run's start, so its send stamp was read).
    for system in SYSTEMS {
        for load in [10, 50, 80] {
            let path = traces.join(format!("latency-{system}-{load}-1.tsv"));
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let mut lines = text.lines();
            assert!(lines.next().unwrap().starts_with("# started: "), "{text}");
            assert!(lines.next().unwrap().starts_with("# warm-up"), "{text}");
            assert_eq!(lines.next(), Some("arrived_us\trecords\tmax_latency_us"));
            let batches: Vec<Vec<u64>> = lines
                .map(|line| line.split('\t').map(|v| v.parse().unwrap()).collect())
                .collect();
            assert!(!batches.is_empty(), "{}", path.display());
            assert!(batches.windows(2).all(|w| w[0][0] <= w[1][0]), "{text}");
            assert!(
                batches
                    .iter()
                    .all(|b| b.len() == 3 && b[1] > 0 && b[2] <= b[0]),
                "{text}"
            );
        }
    }
}
