//! Endpoints that die, lag or refuse connections, through a real `balancer-agent` process.

use std::{collections::HashMap, net::SocketAddr, sync::atomic::Ordering::Relaxed, time::Duration};

use balancer_tests::{
    greeter,
    harness::{GreeterProcess, agent, client, hello, local_addr},
    pb::{HelloRequest, greeter_client::GreeterClient},
    wait_until,
};
use tokio::time::timeout;
use tonic::{Code, transport::Channel};

const BOUND: Duration = Duration::from_secs(10);

/// Endpoint address → calls in flight on it, from the admin API.
fn in_flight(agent: &balancer_tests::agent::Agent) -> HashMap<String, u64> {
    agent
        .json("/api/endpoints")
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["address"].as_str().unwrap().to_string(),
                e["in_flight"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_backend_killed_mid_run_fails_only_its_calls_and_at_once() {
    let mut procs: Vec<GreeterProcess> = (1..=3)
        .map(|i| GreeterProcess::spawn(&format!("proc-{i}"), 0))
        .collect();
    let addrs: Vec<SocketAddr> = procs.iter().map(|p| p.addr).collect();
    let (agent, listen) = agent("round-robin", &addrs, "").await;
    let c = client(listen).await;

    // Six long calls, two per backend (round robin).
    let mut calls = Vec::new();
    for i in 0..6 {
        let mut c = c.clone();
        calls.push(tokio::spawn(async move {
            c.say_hello(HelloRequest {
                sleep_ms: 60_000,
                ..hello(&format!("long-{i}"))
            })
            .await
        }));
    }
    let victim = addrs[0].to_string();
    wait_until("two calls in flight on each backend", BOUND, || {
        let f = in_flight(&agent);
        f.values().all(|&n| n == 2) && f.len() == 3
    })
    .await;

    procs[0].kill();
    // The victim's two calls end with UNAVAILABLE at once; the others are still running.
    let mut ended = Vec::new();
    wait_until("the victim's calls to end", BOUND, || {
        calls.iter().filter(|c| c.is_finished()).count() >= 2
    })
    .await;
    let mut running = Vec::new();
    for call in calls {
        if call.is_finished() {
            ended.push(call.await.unwrap().unwrap_err());
        } else {
            running.push(call);
        }
    }
    assert_eq!(ended.len(), 2, "{ended:?}");
    for e in &ended {
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(e.message().contains(&victim), "{e:?}");
    }
    assert_eq!(running.len(), 4, "calls on live backends must go on");

    // Later calls succeed on the others.
    let mut c = c.clone();
    for i in 0..60 {
        let r = timeout(BOUND, c.say_hello(hello(&format!("after-{i}"))))
            .await
            .expect("no call hangs")
            .unwrap_or_else(|e| panic!("call {i} after the kill: {e:?}"));
        assert_ne!(r.into_inner().backend, "proc-1");
    }
    for r in running {
        r.abort();
    }
}

/// How many of `total` calls, 8 at a time, each backend served.
async fn shares(c: &GreeterClient<Channel>, total: usize) -> HashMap<String, usize> {
    let mut tasks = Vec::new();
    for t in 0..8 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for i in 0..total / 8 {
                let r = c.say_hello(hello(&format!("{t}-{i}"))).await.expect("call");
                seen.push(r.into_inner().backend);
            }
            seen
        }));
    }
    let mut counts = HashMap::new();
    for t in tasks {
        for b in t.await.unwrap() {
            *counts.entry(b).or_default() += 1;
        }
    }
    counts
}

#[tokio::test]
async fn p2c_ewma_gives_a_slow_backend_a_smaller_share_than_round_robin() {
    let backends = [
        greeter::spawn_with(
            "127.0.0.1:0",
            "slow",
            greeter::Options {
                delay_ms: 40,
                ..Default::default()
            },
        )
        .await,
        greeter::spawn("127.0.0.1:0", "fast-1").await,
        greeter::spawn("127.0.0.1:0", "fast-2").await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let mut share = HashMap::new();
    for policy in ["round-robin", "p2c-ewma"] {
        let (_agent, listen) = agent(policy, &addrs, "").await;
        let c = client(listen).await;
        let counts = shares(&c, 480).await;
        let slow = counts.get("slow").copied().unwrap_or(0) as f64 / 480.0;
        println!(
            "{policy}: slow backend served {:.1}% ({counts:?})",
            slow * 100.0
        );
        share.insert(policy, slow);
    }
    assert!(
        share["round-robin"] > 0.25,
        "round robin ignores latency: {share:?}"
    );
    assert!(
        share["p2c-ewma"] < share["round-robin"] / 2.0,
        "p2c-ewma should avoid the slow backend: {share:?}"
    );
}

#[tokio::test]
async fn an_endpoint_refusing_connections_is_avoided_before_any_request_byte() {
    let good = [
        greeter::spawn("127.0.0.1:0", "good-1").await,
        greeter::spawn("127.0.0.1:0", "good-2").await,
        greeter::spawn("127.0.0.1:0", "good-3").await,
    ];
    let dead = local_addr();
    let mut addrs = vec![dead];
    addrs.extend(good.iter().map(|b| b.addr));
    for policy in ["round-robin", "p2c-ewma"] {
        let (agent, listen) = agent(policy, &addrs, "").await;
        let mut c = client(listen).await;
        for i in 0..100 {
            c.say_hello(hello(&format!("{i}")))
                .await
                .unwrap_or_else(|e| panic!("{policy}: call {i}: {e:?}"));
        }
        let eps = agent.json("/api/endpoints");
        let dead_ep = eps
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["address"] == dead.to_string())
            .unwrap();
        assert!(
            dead_ep["failures"].as_u64().unwrap() > 0,
            "{policy}: the dead endpoint was never tried: {eps}"
        );
    }
    let served: u64 = good.iter().map(|b| b.stats.calls.load(Relaxed)).sum();
    assert_eq!(served, 200);
}

/// Outlier detection: a pod that fails every call at once (UNAVAILABLE) answers as fast as a
/// healthy one, so latency-aware balancing alone keeps sending it calls. Without ejection it
/// fails its whole share (a third, under round robin); with the default (7 failures in a row)
/// it is ejected after its seventh failure and takes no call until its time is up.
#[tokio::test]
async fn a_backend_failing_every_call_is_ejected_after_consecutive_failures() {
    let backends = [
        greeter::spawn_with(
            "127.0.0.1:0",
            "broken",
            greeter::Options {
                fail_code: Code::Unavailable as i32,
                ..Default::default()
            },
        )
        .await,
        greeter::spawn("127.0.0.1:0", "ok-1").await,
        greeter::spawn("127.0.0.1:0", "ok-2").await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let broken = addrs[0].to_string();
    let run = |extra: &'static str| {
        let addrs = addrs.clone();
        async move {
            let (agent, listen) = agent("round-robin", &addrs, extra).await;
            let mut c = client(listen).await;
            let mut failed = 0;
            for i in 0..300 {
                match c.say_hello(hello(&format!("c{i}"))).await {
                    Ok(_) => {}
                    Err(s) => {
                        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
                        assert!(
                            s.message().contains("broken"),
                            "the backend's own status: {s:?}"
                        );
                        failed += 1;
                    }
                }
            }
            (agent, failed)
        }
    };

    // Disabled: the broken pod keeps its share of the calls, each one failed.
    let (_agent, failed) = run("pool:\n  outlier_detection:\n    consecutive_failures: 0\n").await;
    assert_eq!(failed, 100, "without ejection, the broken pod's third");

    // Default, with a long ejection so that it cannot end during the run.
    let (agent, failed) = run(
        "pool:\n  outlier_detection:\n    base_ejection_ms: 600000\n    max_ejection_ms: 600000\n",
    )
    .await;
    assert_eq!(failed, 7, "ejected after seven failures in a row");
    let ep = agent
        .json("/api/endpoints")
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == broken.as_str())
        .cloned()
        .unwrap();
    assert_eq!(ep["health"], "ejected", "{ep}");
    assert_eq!(ep["ejections"], 1, "{ep}");
    assert_eq!(ep["calls"], 7, "no call after the ejection: {ep}");
    let m = agent.metrics();
    assert_eq!(
        balancer_tests::agent::metric(
            &m,
            "balancer_endpoint_ejected",
            &[&format!("endpoint=\"{broken}\"")]
        ),
        1.0,
        "{m}"
    );
}
