//! Test support for balancer's end-to-end tests, demo and benchmarks: real tonic greeter
//! backends that say who served each call, a handle on a real `balancer-agent` process, and
//! bounded waits. Nothing here stubs a part of the product.
#![forbid(unsafe_code)]

pub mod agent;
pub mod apiserver;
pub mod bench;
pub mod greeter;
pub mod harness;
pub mod node;

use std::time::Duration;

/// The generated gRPC code of `proto/greeter.proto` (documented in the .proto file).
#[allow(missing_docs)]
pub mod pb {
    tonic::include_proto!("helloworld");
}

/// `grpc.health.v1`, for backends with a controllable health service.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod health_pb {
    tonic::include_proto!("grpc.health.v1");
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

/// A free TCP port on 127.0.0.1 for a listener a test configures by address.
///
/// Ports come from below the kernel's ephemeral range, so an outgoing connection of a test
/// running in parallel cannot take the port between this check and the listener's bind (a port
/// bound to `:0` and released is from that range, and that race failed a CI run). Each test
/// process starts at its own offset and counts up; a port found busy is skipped.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = ephemeral_low().unwrap_or(32_768);
    if low <= FIRST + 1_000 {
        // No room below the ephemeral range: fall back to a port the kernel picks.
        return std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("binding an ephemeral port");
    }
    let span = low - FIRST;
    let start = std::process::id().wrapping_mul(97) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (start + n) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 below the ephemeral range");
}

/// The first port of the kernel's ephemeral range.
fn ephemeral_low() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
