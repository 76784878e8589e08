//! Test support for balancer's end-to-end tests, demo and benchmarks: real tonic greeter
//! backends that say who served each call, a handle on a real `balancer-agent` process, and
//! bounded waits. Nothing here stubs a part of the product.
#![forbid(unsafe_code)]

pub mod agent;
pub mod apiserver;
pub mod greeter;
pub mod harness;
pub mod node;

use std::time::Duration;

/// The generated gRPC code of `proto/greeter.proto`.
pub mod pb {
    tonic::include_proto!("helloworld");
}

/// Waits until `cond` holds, checking every 10 ms, for at most `timeout`. Panics with `what`
/// when it does not: every wait in the tests is bounded.
pub async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Like [`wait_until`] for an async condition.
pub async fn wait_until_async<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond().await {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether this process runs as root (needed by kernel and network-namespace tests).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Skips the calling test, loudly, unless it runs as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!(
                "SKIPPED {}: needs root (it loads eBPF programs or builds network namespaces); \
                 run `sudo cargo xtask test`",
                module_path!()
            );
            return;
        }
    };
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
}
