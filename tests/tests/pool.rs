//! Upstream connection pools, through a real `balancer-agent` process.

use std::{sync::atomic::Ordering::Relaxed, time::Duration};

use balancer_tests::{
    agent::metric,
    greeter,
    harness::{agent, client, hello},
    pb::HelloRequest,
    wait_until,
};

const BOUND: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_backend_with_few_streams_per_connection_gets_more_connections() {
    let backend = greeter::spawn_with(
        "127.0.0.1:0",
        "narrow",
        greeter::Options {
            max_concurrent_streams: Some(4),
            ..Default::default()
        },
    )
    .await;
    let (agent, listen) = agent("round-robin", &[backend.addr], "").await;
    let c = client(listen).await;
    let mut calls = Vec::new();
    for i in 0..24 {
        let mut c = c.clone();
        calls.push(tokio::spawn(async move {
            c.say_hello(HelloRequest {
                sleep_ms: 500,
                ..hello(&format!("{i}"))
            })
            .await
        }));
    }
    // While they run, the pool holds several connections to the one endpoint.
    let mut most = 0.0f64;
    wait_until("more than one pooled connection", BOUND, || {
        let m = agent.metrics();
        most = most.max(metric(&m, "balancer_endpoint_connections", &[]));
        most > 1.0
    })
    .await;
    for (i, c) in calls.into_iter().enumerate() {
        c.await
            .unwrap()
            .unwrap_or_else(|e| panic!("call {i}: {e:?}"));
    }
    let opened = backend.stats.connections.load(Relaxed);
    println!("pool held up to {most} connections; the backend accepted {opened}");
    assert!(opened >= 2, "{opened}");
    let api = agent.json("/api/endpoints");
    assert!(api[0]["connections"].as_u64().unwrap() >= 1, "{api}");
}

#[tokio::test]
async fn old_connections_are_replaced_while_calls_keep_succeeding() {
    let backend = greeter::spawn("127.0.0.1:0", "aging").await;
    let (_agent, listen) = agent(
        "round-robin",
        &[backend.addr],
        "pool:\n  max_connection_age_ms: 150\n",
    )
    .await;
    let mut c = client(listen).await;
    let mut calls = 0;
    // Call until the backend has seen three connections from the proxy; every call succeeds.
    let deadline = tokio::time::Instant::now() + BOUND;
    while backend.stats.connections.load(Relaxed) < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections were not replaced: {} after {calls} calls",
            backend.stats.connections.load(Relaxed)
        );
        c.say_hello(HelloRequest {
            sleep_ms: 10,
            ..hello(&format!("{calls}"))
        })
        .await
        .unwrap_or_else(|e| panic!("call {calls}: {e:?}"));
        calls += 1;
    }
    println!(
        "{calls} calls over {} connections",
        backend.stats.connections.load(Relaxed)
    );
}
