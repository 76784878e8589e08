//! Per-service connection cycling through a real `balancer-agent` process and real tonic
//! backends: a service's `connection_pool` (`max_requests_per_connection`, Istio's
//! `maxRequestsPerConnection`; `max_connection_age_ms`, Istio's `tcp.maxConnectionDuration`)
//! over the node-wide pool settings, counted as the connections the backends accepted.

use std::{
    net::SocketAddr,
    sync::atomic::Ordering::Relaxed,
    time::{Duration, Instant},
};

use balancer_tests::{
    agent::Agent,
    greeter::{self, Handle},
    harness::{agent, client, hello},
};

async fn backends(n: usize) -> Vec<Handle> {
    let mut v = Vec::new();
    for i in 1..=n {
        v.push(greeter::spawn("127.0.0.1:0", &format!("backend-{i}")).await);
    }
    v
}

/// An agent over `b` (the default policy) whose service has `pool` as its connection pool.
async fn with_pool(b: &[Handle], pool: &str) -> (Agent, SocketAddr) {
    let addrs: Vec<_> = b.iter().map(|b| b.addr).collect();
    let extra = if pool.is_empty() {
        String::new()
    } else {
        format!("routes:\n  - service: greeter\n    connection_pool: {pool}\n")
    };
    agent("p2c-ewma", &addrs, &extra).await
}

fn connections(b: &[Handle]) -> u64 {
    b.iter().map(|b| b.stats.connections.load(Relaxed)).sum()
}

/// Sends `n` calls one after another on one client connection.
async fn calls(listen: SocketAddr, n: usize) {
    let mut c = client(listen).await;
    for i in 0..n {
        c.say_hello(hello(&format!("c{i}"))).await.expect("a call");
    }
}

#[tokio::test]
async fn max_requests_per_connection_100_cycles_connections_every_100_calls() {
    // Node-wide: one connection per endpoint carries every call.
    let b = backends(4).await;
    let (_agent, listen) = with_pool(&b, "").await;
    calls(listen, 1000).await;
    let baseline = connections(&b);
    println!("1,000 calls, node-wide pool settings: {baseline} connections");
    assert_eq!(baseline, 4);

    // Seed 004's maxRequestsPerConnection: 100 on the service.
    let b = backends(4).await;
    let (_agent, listen) = with_pool(&b, "{max_requests_per_connection: 100}").await;
    calls(listen, 1000).await;
    let opened = connections(&b);
    let per: Vec<_> = b
        .iter()
        .map(|b| {
            (
                b.stats.calls.load(Relaxed),
                b.stats.connections.load(Relaxed),
            )
        })
        .collect();
    println!(
        "1,000 calls, max_requests_per_connection 100: {opened} connections, (calls, connections) per endpoint {per:?}"
    );
    assert!((10..=14).contains(&opened), "{opened}: {per:?}");
    for (calls, conns) in per {
        assert_eq!(conns, calls.div_ceil(100), "{calls} calls");
    }
}

#[tokio::test]
async fn a_services_max_connection_age_retires_its_connections() {
    let b = backends(1).await;
    let (_agent, listen) = with_pool(&b, "{max_connection_age_ms: 300}").await;
    let mut c = client(listen).await;
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_millis(1300) {
        c.say_hello(hello(&format!("c{n}"))).await.expect("a call");
        n += 1;
    }
    let opened = connections(&b);
    println!("{n} calls over 1.3 s, max_connection_age_ms 300: {opened} connections");
    assert!((4..=6).contains(&opened), "{opened}");
}
