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
    node::{BACKEND_PORT, Cgroup, Scenario, kube_proxy_stand_in},
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

/// Asserts that the agent counted `n` successful calls of `service`.
fn assert_calls_ok(agent: &Agent, service: &str, n: u64) {
    let m = agent.metrics();
    let service = format!("service=\"{service}\"");
    let ok =
        balancer_tests::agent::metric(&m, "balancer_calls_total", &[&service, "grpc_status=\"0\""]);
    assert_eq!(ok, n as f64, "{m}");
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
    let cg = s.node.agent_cgroup().expect("agent cgroup");
    start_in(cg, config).await
}

/// [`start`] in the cgroup `cg` (a second agent beside the first needs its own: making the
/// node's agent cgroup again kills what runs in it).
async fn start_in(cg: Cgroup, config: impl FnOnce(SocketAddr) -> String) -> Agent {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
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
    assert_calls_ok(&agent, "greeter", 100);
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

/// The ids of the maps pinned under `dir` (name → kernel map id): the same ids later mean the
/// same maps, neither removed nor made again.
fn pinned_map_ids(dir: &str) -> BTreeMap<String, u64> {
    let v = balancer_agent::ebpf::pinned::read(std::path::Path::new(dir)).expect("pins");
    let ids: BTreeMap<String, u64> = v["map_ids"]
        .as_object()
        .expect("map_ids")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().expect("an id")))
        .collect();
    assert_eq!(
        ids.len(),
        balancer_common::SHARED_MAPS.len(),
        "every shared map is pinned: {ids:?}"
    );
    ids
}

/// The agent slots as `inspect bpf` reads them from the pins.
fn slots(dir: &str) -> Vec<Value> {
    let v = balancer_agent::ebpf::pinned::read(std::path::Path::new(dir)).expect("pins");
    v["agent"]["slots"].as_array().expect("slots").clone()
}

fn live_pids(dir: &str) -> Vec<u64> {
    slots(dir)
        .iter()
        .filter(|s| s["live"] == true)
        .map(|s| s["pid"].as_u64().unwrap())
        .collect()
}

/// Runs an agent that must fail to start (in the node's agent cgroup, beside the running
/// one); returns what it printed.
async fn failed_start(s: &Scenario, config: &str) -> String {
    let dir = balancer_tests::agent::TempDir::new("balancer-failing-agent");
    let path = dir.0.join("config.yaml");
    std::fs::write(&path, config).unwrap();
    let cg = s.node.cgroup.path().join("agent");
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg("echo $$ > \"$0\"/cgroup.procs && exec \"$@\"")
        .arg(&cg)
        .arg(balancer_tests::agent::agent_bin())
        .args(["run", "--config"])
        .arg(&path)
        .env("BALANCER_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .expect("the failing agent exits within 20 s")
    .unwrap()
    .unwrap();
    assert!(!out.status.success(), "the second agent was meant to fail");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_second_agent_that_fails_to_start_leaves_the_running_one_and_its_pins() {
    require_root!();
    let s = Scenario::new(3).await.unwrap();
    let vip = vip(&s, 18);
    let agent = start(&s, |admin| s.agent_config(vip, admin, "auto")).await;
    assert_eq!(counts(&s.call("client", vip, 30).await).len(), 3);
    let pins = s.pin_path();
    let ids = pinned_map_ids(&pins);
    assert_eq!(live_pids(&pins), [u64::from(agent.pid())]);
    let root = s.node.cgroup.path().display().to_string();
    let other_admin = || format!("127.0.0.1:{}", free_port()).parse().unwrap();

    // 1. Its datapath fails after it adopted the pins and claimed a slot: the cgroup it is
    //    told to attach at does not exist.
    let bad_cgroup = s.agent_config(vip, other_admin(), "auto").replace(
        &format!("cgroup_root: {root}"),
        "cgroup_root: /nonexistent-cgroup",
    );
    let log = failed_start(&s, &bad_cgroup).await;
    assert!(log.contains("nonexistent-cgroup"), "{log}");
    // 2. It fails after its datapath was attached beside the running one's: its listener's
    //    address is taken (by a socket without SO_REUSEPORT).
    let taken = std::net::TcpListener::bind((s.node.gateway, 0)).unwrap();
    let clash = s.agent_config(vip, other_admin(), "auto").replacen(
        &format!("address: {}:15001", s.node.gateway),
        &format!("address: {}", taken.local_addr().unwrap()),
        1,
    );
    let log = failed_start(&s, &clash).await;
    assert!(
        log.contains("datapath attached"),
        "it got as far as the datapath: {log}"
    );
    assert!(log.to_lowercase().contains("address"), "{log}");
    // 3. Its configuration is invalid: it never touches the datapath.
    let log = failed_start(&s, "listeners: [{address: nope}]\n").await;
    assert!(log.contains("nope"), "{log}");

    // The running agent's pins are the same maps, its slot the only live one, and pods are
    // still balanced per call through it.
    assert_eq!(
        pinned_map_ids(&pins),
        ids,
        "the pinned maps were not replaced"
    );
    assert_eq!(live_pids(&pins), [u64::from(agent.pid())]);
    let before = agent.bpf_counter("connect4_redirected");
    let c = counts(&s.call("client", vip, 30).await);
    assert_eq!(c.len(), 3, "{c:?}");
    assert!(c.values().all(|&n| n == 10), "{c:?}");
    assert_eq!(agent.bpf_counter("connect4_redirected"), before + 1);
    let bpf = balancer_agent::ebpf::pinned::read(std::path::Path::new(&pins)).unwrap();
    assert_eq!(bpf["services"][0]["vip"], vip.to_string(), "{bpf}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_two_agents_share_the_pinned_maps_and_the_last_one_out_removes_them() {
    require_root!();
    let s = Scenario::new(3).await.unwrap();
    let vip = vip(&s, 19);
    let mut old = start(&s, |admin| s.agent_config(vip, admin, "auto")).await;
    let pins = s.pin_path();
    let ids = pinned_map_ids(&pins);
    // A second agent on the same node (same proxy address: SO_REUSEPORT) adopts the maps.
    let cg = s.node.cgroup.child("agent-new").unwrap();
    let mut new = start_in(cg, |admin| s.agent_config(vip, admin, "auto")).await;
    assert_eq!(pinned_map_ids(&pins), ids, "adopted, not made again");
    let mut live = live_pids(&pins);
    live.sort();
    let mut want = vec![u64::from(old.pid()), u64::from(new.pid())];
    want.sort();
    assert_eq!(live, want, "{:?}", slots(&pins));
    // Pods are balanced per call whichever agent accepts.
    for _ in 0..4 {
        assert_eq!(counts(&s.call("client", vip, 9).await).len(), 3);
    }
    // Both programs run in attach order; only the first rewrites: one redirect per connect.
    assert_eq!(new.bpf_counter("connect4_redirected"), 4);
    assert_eq!(
        old.bpf_counter("connect4_redirected"),
        4,
        "the counters are shared"
    );

    // The old agent leaves: the new one keeps the pins and takes every connection.
    old.sigterm();
    assert!(old.wait_exit(Duration::from_secs(10)).await.is_some());
    assert_eq!(
        pinned_map_ids(&pins),
        ids,
        "the pins outlive the agent that made them"
    );
    assert_eq!(live_pids(&pins), [u64::from(new.pid())]);
    let c = counts(&s.call("client", vip, 30).await);
    assert!(c.len() == 3 && c.values().all(|&n| n == 10), "{c:?}");
    assert_eq!(new.bpf_counter("connect4_redirected"), 5);

    // The last agent out removes them.
    new.sigterm();
    assert!(new.wait_exit(Duration::from_secs(10)).await.is_some());
    for m in balancer_common::SHARED_MAPS {
        let p = std::path::Path::new(&pins).join(m.name);
        assert!(!p.exists(), "{} left behind", p.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_an_ipv4_mapped_ipv6_socket_dialing_a_vip_is_redirected_and_balanced_per_call() {
    require_root!();
    let s = Scenario::new(4).await.unwrap();
    let vip = vip(&s, 21);
    let agent = start(&s, |admin| s.agent_config(vip, admin, "auto")).await;
    // The client pod dials `[::ffff:VIP]:port` through an AF_INET6 socket.
    let SocketAddr::V4(v4) = vip else {
        unreachable!()
    };
    let mapped = SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port()));
    let out = s.call("client", mapped, 100).await;
    let c = counts(&out);
    assert_eq!(c.len(), 4, "every backend pod served: {c:?}");
    assert!(c.values().all(|&n| n == 25), "{c:?}");
    assert_eq!(agent.bpf_counter("connect6_redirected"), 1, "{out}");
    assert_eq!(agent.bpf_counter("connect4_redirected"), 0);
    // sock_ops keyed it by the IPv4 tuple the proxy accepted on its IPv4 listener: the calls
    // were routed by the original destination (the :authority names no service).
    assert_calls_ok(&agent, "greeter", 100);
    // And the same-node shortcut took the mapped socket too: no data segment over TCP.
    assert_eq!(out["data_segs_out"].as_u64(), Some(0), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_python_grpcio_in_a_pod_with_ipv6_is_redirected_through_connect6_and_balanced() {
    require_root!();
    let check = std::process::Command::new("python3")
        .args(["-c", "import grpc"])
        .output()
        .unwrap_or_else(|e| panic!("python3 is needed for this test: {e}"));
    assert!(
        check.status.success(),
        "python3 cannot import grpc: run `cargo xtask setup` (it installs grpcio): {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let s = Scenario::new(4).await.unwrap();
    let vip = vip(&s, 22);
    let agent = start(&s, |admin| s.agent_config(vip, admin, "off")).await;
    let pod = s.node.pod("client");
    // IPv6 is up in the pod (`::1` on its loopback): grpcio's C-core then dials the IPv4 VIP
    // through an AF_INET6 socket, to `::ffff:VIP`.
    let addrs = std::process::Command::new("ip")
        .args(["-n", &pod.netns, "-6", "addr", "show", "dev", "lo"])
        .output()
        .unwrap();
    let addrs = String::from_utf8_lossy(&addrs.stdout);
    assert!(addrs.contains("::1/128"), "IPv6 is up in the pod: {addrs}");

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/interop_client.py");
    let (unary, streams, per_stream) = (40, 4, 5);
    let mut child = pod
        .command(
            "python3",
            &[
                script,
                &vip.to_string(),
                &unary.to_string(),
                &streams.to_string(),
                &per_stream.to_string(),
            ],
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let mut line = String::new();
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .map(|_| line)
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
    let out: Value = serde_json::from_str(&line).expect("a JSON summary");
    assert_eq!(out["unary_ok"], unary);
    let backends = out["unary_backends"].as_object().unwrap();
    assert_eq!(
        backends.len(),
        4,
        "balanced per call over every backend: {out}"
    );
    assert!(backends.values().all(|n| n == 10), "{out}");
    assert!(
        agent.bpf_counter("connect6_redirected") >= 1,
        "went through connect6"
    );
    assert_eq!(
        agent.bpf_counter("connect4_redirected"),
        0,
        "not through connect4"
    );
    // One client connection, accepted on the IPv4 listener, routed by its original
    // destination.
    let conns = agent.json("/api/connections");
    let conns = conns.as_array().unwrap();
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert_eq!(conns[0]["target"], format!("vip {vip}"), "{conns:?}");
    assert_eq!(conns[0]["calls_total"], unary + streams);
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_an_ipv6_vip_of_a_dual_stack_service_is_balanced_per_call() {
    require_root!();
    let s = Scenario::new(4).await.unwrap();
    let vip4 = vip(&s, 23);
    let g = s.node.gateway.octets();
    let ip6 = std::net::Ipv6Addr::new(0xfd00, 0x96, g[2].into(), 0, 0, 0, 0, 23);
    s.node.add_vip6(ip6).unwrap();
    let vip6 = SocketAddr::from((ip6, BACKEND_PORT));
    let services = s.greeter_service(&[vip4, vip6], false);
    let agent = start(&s, |admin| s.dual_stack_config(&services, admin, "off")).await;

    // The pod dials the IPv6 VIP: connect6 sends it to the agent's IPv6 listener, sock_ops
    // records the IPv6 4-tuple, and the agent routes the calls by it.
    let c = counts(&s.call("client", vip6, 40).await);
    assert_eq!(c.len(), 4, "{c:?}");
    assert!(c.values().all(|&n| n == 10), "{c:?}");
    assert_eq!(agent.bpf_counter("connect6_redirected"), 1);
    // The same service by its IPv4 VIP.
    let c = counts(&s.call("client", vip4, 40).await);
    assert!(c.len() == 4 && c.values().all(|&n| n == 10), "{c:?}");
    assert_eq!(agent.bpf_counter("connect4_redirected"), 1);
    // Both routed by their original destination (the :authority names no service).
    assert_calls_ok(&agent, "greeter", 80);
    let bpf = balancer_agent::ebpf::pinned::read(std::path::Path::new(&s.pin_path())).unwrap();
    let vips: Vec<&str> = bpf["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["vip"].as_str().unwrap())
        .collect();
    assert!(vips.contains(&vip6.to_string().as_str()), "{vips:?}");
    let slot = &bpf["agent"]["slots"][0];
    assert_eq!(
        slot["proxy_address_v6"],
        format!("[{}]:15001", s.node.gateway6),
        "{slot}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_connect_to_a_pod_of_a_headless_service_is_balanced_per_call() {
    require_root!();
    let s = Scenario::new(4).await.unwrap();
    // A headless service: no VIP, its endpoints' addresses select it.
    let services = s.greeter_service(&[], true);
    let agent = start(&s, |admin| s.config_with_services(&services, admin, "off")).await;
    let pod_ip = s.backends[2].1;
    // The opted-in pod dials one pod of the Service (as after a DNS lookup of a headless
    // Service): its calls go to every pod of it.
    let c = counts(&s.call("client", pod_ip, 40).await);
    assert_eq!(c.len(), 4, "{c:?}");
    assert!(c.values().all(|&n| n == 10), "{c:?}");
    // One redirect: the agent's own connections to the same pod addresses (its cgroup is not
    // opted in) were left alone, or no call would have reached a pod.
    assert_eq!(agent.bpf_counter("connect4_redirected"), 1);
    assert_calls_ok(&agent, "greeter", 40);
    // A pod that did not opt in reaches the pod it dialed, and only it.
    let c = counts(&s.call("outsider", pod_ip, 10).await);
    assert_eq!(c, BTreeMap::from([("backend-3".to_string(), 10)]));
    assert_eq!(agent.bpf_counter("connect4_redirected"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_an_agent_started_after_a_kill_9_adopts_the_pins_left_and_balances_again() {
    require_root!();
    let s = Scenario::new(3).await.unwrap();
    let vip = vip(&s, 24);
    let mut killed = start(&s, |admin| s.agent_config(vip, admin, "auto")).await;
    assert_eq!(counts(&s.call("client", vip, 9).await).len(), 3);
    let pins = s.pin_path();
    let ids = pinned_map_ids(&pins);
    killed.kill();
    // No clean exit: the pins stay, with a slot whose lease runs out.
    assert_eq!(pinned_map_ids(&pins), ids);
    balancer_tests::wait_until(
        "the killed agent's lease ran out",
        Duration::from_secs(2),
        || live_pids(&pins).is_empty(),
    )
    .await;
    let agent = start(&s, |admin| s.agent_config(vip, admin, "auto")).await;
    assert_eq!(pinned_map_ids(&pins), ids, "the maps left are adopted");
    assert_eq!(live_pids(&pins), [u64::from(agent.pid())]);
    let c = counts(&s.call("client", vip, 30).await);
    assert!(c.len() == 3 && c.values().all(|&n| n == 10), "{c:?}");
    assert_eq!(
        agent.bpf_counter("connect4_redirected"),
        2,
        "the counters carried on"
    );
}
