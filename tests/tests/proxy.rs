//! The HTTP/2 demultiplexer, end to end: real tonic clients and backends through a real
//! `balancer-agent` process in standalone mode.

use std::{collections::HashMap, sync::atomic::Ordering::Relaxed, time::Duration};

use balancer_tests::{
    agent::{Agent, metric},
    greeter,
    harness::{client, config, hello, local_addr, setup},
    pb::greeter_client::GreeterClient,
    wait_until,
};
use tonic::{Code, transport::Channel};

async fn shares(c: &mut GreeterClient<Channel>, calls: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for i in 0..calls {
        let r = c
            .say_hello(hello(&format!("call-{i}")))
            .await
            .expect("call through the proxy");
        *counts.entry(r.into_inner().backend).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn round_robin_spreads_one_connection_evenly() {
    let s = setup("round-robin", 4).await;
    let mut c = client(s.listen).await;
    let counts = shares(&mut c, 1000).await;
    assert_eq!(counts.len(), 4, "{counts:?}");
    for (backend, n) in &counts {
        assert!(
            (200..=300).contains(n),
            "{backend} got {n} of 1000: {counts:?}"
        );
    }
    // One client connection carried all of it.
    let conns = s.agent.json("/api/connections");
    assert_eq!(conns.as_array().unwrap().len(), 1, "{conns}");
}

#[tokio::test]
async fn p2c_ewma_reaches_every_backend() {
    let s = setup("p2c-ewma", 4).await;
    let mut c = client(s.listen).await;
    let counts = shares(&mut c, 1000).await;
    assert_eq!(counts.len(), 4, "{counts:?}");
    assert!(counts.values().all(|&n| n > 0), "{counts:?}");
}

#[tokio::test]
async fn concurrent_calls_on_one_connection_reach_all_backends() {
    let s = setup("p2c-ewma", 4).await;
    let c = client(s.listen).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut req = hello(&format!("c{i}"));
            req.sleep_ms = 20;
            c.say_hello(req).await.map(|r| r.into_inner().backend)
        }));
    }
    let mut counts: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        *counts.entry(t.await.unwrap().expect("call")).or_default() += 1;
    }
    assert_eq!(counts.values().sum::<usize>(), 200);
    assert_eq!(counts.len(), 4, "{counts:?}");
    let _ = &s.backends;
}

#[tokio::test]
async fn metrics_count_calls_by_service_method_and_status() {
    let s = setup("round-robin", 2).await;
    let mut c = client(s.listen).await;
    for _ in 0..7 {
        c.say_hello(hello("m")).await.unwrap();
    }
    let mut failing = hello("f");
    failing.fail_code = Code::NotFound as i32;
    failing.fail_message = "no such greeting".into();
    for _ in 0..3 {
        let e = c.say_hello(failing.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert_eq!(e.message(), "no such greeting");
    }
    // A call is counted when it ends in the proxy, which may be just after the client saw
    // its end: wait for the last one.
    let counts = |m: &str| {
        let ok = metric(
            m,
            "balancer_calls_total",
            &[
                "service=\"greeter\"",
                "method=\"/helloworld.Greeter/SayHello\"",
                "grpc_status=\"0\"",
            ],
        );
        (
            ok,
            metric(m, "balancer_calls_total", &["grpc_status=\"5\""]),
        )
    };
    wait_until("every call counted", Duration::from_secs(5), || {
        counts(&s.agent.metrics()) >= (7.0, 3.0)
    })
    .await;
    let m = s.agent.metrics();
    assert_eq!(counts(&m), (7.0, 3.0), "{m}");
    let total_backend_calls: u64 = s.backends.iter().map(|b| b.stats.calls.load(Relaxed)).sum();
    assert_eq!(total_backend_calls, 10);
    wait_until("active calls back to 0", Duration::from_secs(5), || {
        metric(&s.agent.metrics(), "balancer_active_calls", &[]) == 0.0
    })
    .await;
}

#[tokio::test]
async fn client_connections_spread_over_the_workers_and_each_balances_its_calls() {
    let backends = [
        greeter::spawn("127.0.0.1:0", "backend-1").await,
        greeter::spawn("127.0.0.1:0", "backend-2").await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let (listen, admin) = (local_addr(), local_addr());
    let agent = Agent::start_with(
        &config(listen, admin, "round-robin", &addrs, ""),
        admin,
        |c| {
            c.args(["--workers", "2"]);
        },
    )
    .await;
    // Four client connections, opened one after the other: two per worker.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(client(listen).await);
        let n = clients.len();
        wait_until(
            "the agent to count the connection",
            Duration::from_secs(5),
            || agent.json("/api/status")["client_connections"] == n,
        )
        .await;
    }
    let status = agent.json("/api/status");
    assert_eq!(
        status["worker_connections"],
        serde_json::json!([2, 2]),
        "{status}"
    );
    // Every connection's calls, served on either worker, reach both backends.
    for (i, c) in clients.iter_mut().enumerate() {
        let counts = shares(c, 20).await;
        assert_eq!(counts.len(), 2, "connection {i}: {counts:?}");
    }
    // Each worker keeps its own pool shard: the backends saw a connection from each.
    for b in &backends {
        assert_eq!(b.stats.connections.load(Relaxed), 2, "{}", b.addr);
    }
}
