//! The API from another language: Python stubs generated from `proto/` publish and
//! subscribe against a real broker. The test makes its own virtualenv (cached under
//! cargo's target directory) and installs grpcio and grpcio-tools from PyPI.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::broker::Broker;

fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A virtualenv with grpcio and grpcio-tools; made once, then reused.
fn python_env() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-grpc");
    let python = venv.join("bin/python");
    let ready = venv.join("ready");
    if !ready.exists() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
        run(Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "grpcio==1.*",
            "grpcio-tools==1.*",
        ]));
        std::fs::write(&ready, "").unwrap();
    }
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_publishes_and_subscribes() {
    let python = tokio::task::spawn_blocking(python_env).await.unwrap();
    let stubs = tempfile::tempdir().unwrap();
    let proto_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    run(Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&proto_root)
        .arg(format!("--python_out={}", stubs.path().display()))
        .arg(format!("--grpc_python_out={}", stubs.path().display()))
        .arg("switchyard/v1/broker.proto"));

    let broker = Broker::start().await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/client.py");
    let address = broker.address.to_string();
    let output = tokio::task::spawn_blocking(move || {
        run(Command::new(&python)
            .arg(script)
            .arg(address)
            .env("PYTHONPATH", stubs.path()))
    })
    .await
    .unwrap();

    let lines: Vec<serde_json::Value> = output
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["published"].as_array().unwrap().len(), 3);
    assert_eq!(lines[0]["published"][2][0], 2);
    assert_eq!(lines[1]["refused"], "INVALID_ARGUMENT");
    assert!(lines[1]["message"].as_str().unwrap().contains("bad topic"));
    assert_eq!(lines[2]["update"], "started");
    let delivered = lines[3]["delivered"].as_array().unwrap();
    assert_eq!(delivered.len(), 3);
    for (i, delivery) in delivered.iter().enumerate() {
        assert_eq!(delivery["offset"], i);
        assert_eq!(delivery["ids"][0], 7);
        assert_eq!(delivery["type"], "MESSAGE_CREATE");
        assert_eq!(delivery["payload"]["content"], format!("hello {i}"));
    }
    // And the records are what a Rust reader sees too.
    let batch = broker
        .store_handle()
        .read_async(
            "guild.py",
            0,
            switchyard_broker::storage::ReadLimits::default(),
        )
        .await
        .unwrap();
    assert_eq!(batch.records.len(), 3);
    broker.stop().await;
}
