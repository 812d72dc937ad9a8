//! The CI smoke run: every scenario against every system for a moment, through the
//! real binaries (a `switchyard serve` process, nats-server and redis-server started
//! by `benches/peers.sh`, which installs them when missing). Proves each scenario
//! still works end to end; asserts what was measured, never how fast.

use std::path::Path;
use std::process::Command;

#[test]
fn every_scenario_runs_against_every_system() {
    let bench = Path::new(env!("CARGO_BIN_EXE_switchyard-bench"));
    // `cargo test --workspace` builds the broker's binary into the same directory.
    let switchyard = bench.with_file_name("switchyard");
    assert!(
        switchyard.is_file(),
        "{} is missing: run `cargo test --workspace` (or build the switchyard binary)",
        switchyard.display()
    );
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
