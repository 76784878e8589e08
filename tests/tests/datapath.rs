//! The eBPF transparent redirect, end to end on a simulated node: pods are network namespaces
//! with their own cgroups, the real programs are loaded into this kernel, and pods dial a
//! Service VIP exactly as they would in Kubernetes. Every test needs root (skipped loudly
//! without it).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use balancer_tests::{
    agent::Agent,
    free_port,
    node::{BACKEND_PORT, Scenario, kube_proxy_stand_in},
    require_root,
};
use serde_json::Value;

fn counts(v: &Value) -> BTreeMap<String, u64> {
    v["counts"]
        .as_object()
        .expect("counts")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect()
}

/// A VIP for this scenario: an address of the node (so nothing ever leaves the machine).
fn vip(s: &Scenario, last: u8) -> SocketAddr {
    let gw = s.node.gateway.octets();
    let ip = Ipv4Addr::new(10, 96, gw[2], last);
    s.node.add_vip(ip).expect("adding the VIP to the node");
    SocketAddr::from((ip, BACKEND_PORT))
}

/// Starts the agent in the node (in its own cgroup below the node's) with the configuration
/// `config(admin address)`.
async fn start(s: &Scenario, config: impl FnOnce(SocketAddr) -> String) -> Agent {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cg = s.node.agent_cgroup().expect("agent cgroup");
    let agent = Agent::start_in_cgroup(&config(admin), admin, cg.path()).await;
    // The cgroup goes with the node's tree (after the agent's process).
    std::mem::forget(cg);
    agent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_an_opted_in_pod_dialing_a_vip_is_balanced_per_call() {
    require_root!();
    let s = Scenario::new(4).await.unwrap();
    let vip = vip(&s, 10);
    let agent = start(&s, |admin| s.agent_config(vip, admin, "off")).await;
    let out = s.call("client", vip, 100).await;
    let c = counts(&out);
    assert_eq!(c.len(), 4, "every backend pod served: {c:?}");
    assert!(
        c.values().all(|&n| n == 25),
        "round-robin over one connection: {c:?}"
    );
    assert_eq!(
        agent.bpf_counter("connect4_redirected"),
        1,
        "one connection, redirected once"
    );
    // The listener has no default service and the calls' :authority is the VIP, which names
    // no service: they could only be routed by the original destination sock_ops recorded.
    let m = agent.metrics();
    let ok = balancer_tests::agent::metric(
        &m,
        "balancer_calls_total",
        &["service=\"greeter\"", "grpc_status=\"0\""],
    );
    assert_eq!(ok, 100.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_pods_not_opted_in_and_other_destinations_are_left_alone() {
    require_root!();
    let s = Scenario::new(4).await.unwrap();
    let vip = vip(&s, 11);
    // kube-proxy's stand-in: the VIP reaches one backend per connection.
    let backends: Vec<SocketAddr> = s.backends.iter().map(|b| b.1).collect();
    kube_proxy_stand_in(vip, backends.clone()).await.unwrap();
    let agent = start(&s, |admin| s.agent_config(vip, admin, "off")).await;

    // A pod that did not opt in: its one connection lands on one backend, as without us.
    let out = s.call("outsider", vip, 20).await;
    assert_eq!(counts(&out).len(), 1, "not redirected: {out}");
    assert_eq!(agent.bpf_counter("connect4_redirected"), 0);
    assert_eq!(agent.bpf_counter("connect4_not_opted_in"), 1);

    // The opted-in pod dialing a pod IP (not a VIP) reaches that pod directly.
    let out = s.call("client", backends[2], 20).await;
    assert_eq!(
        counts(&out),
        BTreeMap::from([("backend-3".to_string(), 20)])
    );
    assert_eq!(agent.bpf_counter("connect4_redirected"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_the_proxy_recovers_the_original_destination_of_two_services() {
    require_root!();
    let s = Scenario::new(4).await.unwrap();
    let (vip_a, vip_b) = (vip(&s, 12), vip(&s, 13));
    let b = |i: usize| s.backends[i].1;
    let service = |name: &str, vip: SocketAddr, e1: SocketAddr, e2: SocketAddr| {
        format!(
            "  - name: {name}\n    vips: [\"{vip}\"]\n    endpoints:\n      - address: {e1}\n      - address: {e2}\n"
        )
    };
    let services = service("a", vip_a, b(0), b(1)) + &service("b", vip_b, b(2), b(3));
    let _agent = start(&s, |admin| s.config_with_services(&services, admin, "off")).await;
    let a = counts(&s.call("client", vip_a, 40).await);
    let bb = counts(&s.call("client", vip_b, 40).await);
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        ["backend-1", "backend-2"],
        "{a:?}"
    );
    assert_eq!(
        bb.keys().collect::<Vec<_>>(),
        ["backend-3", "backend-4"],
        "{bb:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_the_sk_msg_shortcut_bypasses_tcp_with_identical_results() {
    require_root!();
    let s = Scenario::new(4).await.unwrap();
    let vip = vip(&s, 14);
    let mut results = Vec::new();
    for shortcut in ["auto", "off"] {
        let agent = start(&s, |admin| s.agent_config(vip, admin, shortcut)).await;
        let status = agent.json("/api/status");
        let enabled = status["datapath"]["shortcut"]["enabled"].as_bool().unwrap();
        let out = s.call("client", vip, 40).await;
        let segs = out["data_segs_out"].as_u64().unwrap();
        if shortcut == "auto" {
            assert!(
                enabled,
                "the self-test should pass on this kernel: {status}"
            );
            assert_eq!(
                segs, 0,
                "with the shortcut, no data segment went over TCP: {out}"
            );
            assert!(agent.bpf_counter("sk_msg_redirected") > 0);
        } else {
            assert!(!enabled);
            assert!(
                segs > 0,
                "without the shortcut the data goes over TCP: {out}"
            );
        }
        results.push(counts(&out));
        drop(agent);
    }
    assert_eq!(
        results[0], results[1],
        "same results with and without the shortcut"
    );
    assert_eq!(results[0].len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_fail_open_when_the_agent_is_killed() {
    require_root!();
    let s = Scenario::new(4).await.unwrap();
    let vip = vip(&s, 15);
    // kube-proxy's stand-in sends the VIP to one backend.
    kube_proxy_stand_in(vip, vec![s.backends[0].1])
        .await
        .unwrap();
    let mut agent = start(&s, |admin| s.agent_config(vip, admin, "auto")).await;
    assert_eq!(
        counts(&s.call("client", vip, 8).await).len(),
        4,
        "balanced while alive"
    );

    agent.kill();
    let killed = Instant::now();
    let out = s
        .try_call("client", vip, Duration::from_secs(5))
        .await
        .expect("a new connection after the agent died reaches the VIP");
    let took = killed.elapsed();
    assert_eq!(
        counts(&out),
        BTreeMap::from([("backend-1".to_string(), 1)]),
        "via kube-proxy"
    );
    assert!(
        took < Duration::from_secs(1),
        "reached the VIP {took:?} after the kill"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_fail_open_when_the_agent_hangs() {
    require_root!();
    let s = Scenario::new(2).await.unwrap();
    let vip = vip(&s, 16);
    kube_proxy_stand_in(vip, vec![s.backends[1].1])
        .await
        .unwrap();
    let agent = start(&s, |admin| s.agent_config(vip, admin, "off")).await;
    assert_eq!(counts(&s.call("client", vip, 4).await).len(), 2);

    agent.signal("STOP");
    let stopped = Instant::now();
    // New connections keep being tried; the first that gets an answer must have started
    // within 1 s of the hang (the lease is 750 ms), and it must be kube-proxy's.
    let answered_at = loop {
        let started = stopped.elapsed();
        assert!(
            started < Duration::from_secs(5),
            "no answer 5 s after the agent hung"
        );
        if let Some(out) = s.try_call("client", vip, Duration::from_millis(200)).await {
            assert_eq!(counts(&out).keys().collect::<Vec<_>>(), ["backend-2"]);
            break started;
        }
    };
    agent.signal("CONT");
    assert!(
        answered_at < Duration::from_secs(1),
        "fail-open took {answered_at:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_100k_short_connections_leave_the_maps_bounded() {
    require_root!();
    let s = Scenario::new(1).await.unwrap();
    let vip = vip(&s, 17);
    let agent = start(&s, |admin| s.agent_config(vip, admin, "auto")).await;
    let n = 100_000;
    let child = s
        .node
        .pod("client")
        .command(
            balancer_tests::node::pod_bin().to_str().unwrap(),
            &[
                "churn",
                "--target",
                &vip.to_string(),
                "--count",
                &n.to_string(),
            ],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = tokio::task::spawn_blocking(move || balancer_tests::node::output_of(child))
        .await
        .unwrap();
    let out: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(out["ok"].as_u64(), Some(n), "{out}");
    assert!(agent.bpf_counter("connect4_redirected") >= n);
    balancer_tests::wait_until(
        "closed connections leave the maps",
        Duration::from_secs(10),
        || {
            let bpf = agent.json("/api/bpf");
            let tuples = bpf["orig_dst_by_tuple"].as_u64().unwrap();
            let cookies = bpf["orig_dst_by_cookie"].as_u64().unwrap();
            tuples <= 16 && cookies <= 16
        },
    )
    .await;
    assert!(agent.bpf_counter("sock_ops_closed") >= n - 16);
}
