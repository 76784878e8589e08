//! A client that is not Rust: Python grpcio (tests/python/interop_client.py) through a real
//! `balancer-agent` process to tonic backends. `cargo xtask setup` installs grpcio; without it
//! this test fails and says so.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use balancer_tests::harness::setup;

const UNARY: usize = 40;
const STREAMS: usize = 8;
const PER_STREAM: usize = 5;

#[tokio::test]
async fn python_grpcio_calls_spread_over_backends_on_one_channel() {
    let s = setup("round-robin", 4).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/interop_client.py");
    let check = Command::new("python3")
        .args(["-c", "import grpc"])
        .output()
        .unwrap_or_else(|e| panic!("python3 is needed for the interop test: {e}"));
    assert!(
        check.status.success(),
        "python3 cannot import grpc: run `cargo xtask setup` (it installs grpcio): {}",
        String::from_utf8_lossy(&check.stderr)
    );

    let mut child = Command::new("python3")
        .arg(script)
        .arg(s.listen.to_string())
        .args([UNARY, STREAMS, PER_STREAM].map(|n| n.to_string()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting python3");
    let stdout = child.stdout.take().unwrap();
    // The script prints its summary, then holds its channel open until stdin closes.
    let line = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        }),
    )
    .await
    .expect("the Python client finishes its calls within 60 s")
    .unwrap()
    .unwrap();
    assert!(
        !line.is_empty(),
        "the Python client failed: {:?}",
        child.wait()
    );
    println!("python: {line}");
    let out: serde_json::Value = serde_json::from_str(&line).expect("a JSON summary");
    assert_eq!(out["unary_ok"], UNARY);
    assert_eq!(out["stream_ok"], STREAMS);

    // Round robin over one channel: every backend served a quarter of the unary calls.
    let backends = out["unary_backends"].as_object().unwrap();
    assert_eq!(backends.len(), 4, "{out}");
    for (name, n) in backends {
        assert_eq!(n.as_u64(), Some((UNARY / 4) as u64), "{name}: {out}");
    }
    let streamed: u64 = out["stream_messages_by_backend"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(streamed, (STREAMS * PER_STREAM) as u64);
    assert!(out["stream_messages_by_backend"].as_object().unwrap().len() > 1);

    // All of it on one client connection.
    let conns = s.agent.json("/api/connections");
    let conns = conns.as_array().unwrap();
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert_eq!(conns[0]["calls_total"], UNARY + STREAMS);

    drop(child.stdin.take());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}
