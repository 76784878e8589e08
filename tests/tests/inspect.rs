//! `balancer-agent inspect` against running agents (standalone, and on a simulated node with
//! the datapath), and the metrics after known traffic.

use std::{net::SocketAddr, process::Command, time::Duration};

use balancer_tests::{
    agent::{Agent, agent_bin, metric},
    free_port, greeter,
    node::Scenario,
    pb::HelloRequest,
    require_root, wait_until,
};
use futures_util::StreamExt;
use serde_json::Value;

struct Standalone {
    agent: Agent,
    listen: SocketAddr,
    _backends: Vec<greeter::Handle>,
}

async fn standalone() -> Standalone {
    let mut backends = Vec::new();
    for i in 1..=3 {
        backends.push(greeter::spawn("127.0.0.1:0", &format!("backend-{i}")).await);
    }
    let eps: String = backends
        .iter()
        .map(|b| format!("      - address: {}\n        zone: zone-a\n", b.addr))
        .collect();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = format!(
        "listeners:\n  - address: {listen}\n    default_service: greeter\nadmin:\n  address: {admin}\nservices:\n  - name: greeter\n    authorities: [greeter.default.svc.cluster.local]\n    vips: [\"10.96.0.10:50051\"]\n    policy: least-request\n    endpoints:\n{eps}"
    );
    Standalone {
        agent: Agent::start(&config, admin).await,
        listen,
        _backends: backends,
    }
}

/// Runs `balancer-agent inspect ARGS` against `admin`: (success, stdout, stderr).
fn inspect(admin: SocketAddr, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(agent_bin())
        .args(["inspect", "--admin", &admin.to_string()])
        .args(args)
        .output()
        .expect("running inspect");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn inspect_json(admin: SocketAddr, args: &[&str]) -> Value {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    let (ok, out, err) = inspect(admin, &all);
    assert!(ok, "inspect {args:?} failed: {err}");
    serde_json::from_str(&out).expect("JSON")
}

#[tokio::test]
async fn every_subcommand_shows_the_running_agent() {
    let s = standalone().await;
    let admin = s.agent.admin;
    let mut client = balancer_tests::harness::client(s.listen).await;
    for _ in 0..9 {
        client
            .say_hello(HelloRequest::default())
            .await
            .expect("call");
    }

    let (ok, status, _) = inspect(admin, &["status"]);
    assert!(ok);
    assert!(status.contains("ready:              yes"), "{status}");
    assert!(status.contains("datapath:           off"), "{status}");
    assert!(
        status.contains("endpoints:          3 ready of 3"),
        "{status}"
    );
    let st = inspect_json(admin, &["status"]);
    assert_eq!(st["services"], 1);
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"));

    let (_, services, _) = inspect(admin, &["services"]);
    let line = services
        .lines()
        .find(|l| l.starts_with("greeter"))
        .expect("greeter row");
    for needle in ["10.96.0.10:50051", "least-request", "grpc"] {
        assert!(line.contains(needle), "{needle} in {line}");
    }

    let eps = inspect_json(admin, &["endpoints", "greeter"]);
    let eps = eps.as_array().unwrap();
    assert_eq!(eps.len(), 3);
    assert_eq!(
        eps.iter()
            .map(|e| e["calls"].as_u64().unwrap())
            .sum::<u64>(),
        9
    );
    assert!(
        eps.iter()
            .all(|e| e["health"] == "ready" && e["zone"] == "zone-a")
    );
    let (_, table, _) = inspect(admin, &["endpoints"]);
    assert!(table.starts_with("SERVICE"), "{table}");
    assert_eq!(table.lines().count(), 4, "{table}");

    // A slow call in flight shows in `calls` and on its connection in `connections`.
    let mut slow = client.clone();
    let call = tokio::spawn(async move {
        slow.say_hello(HelloRequest {
            name: "slow".into(),
            sleep_ms: 3000,
            ..Default::default()
        })
        .await
    });
    wait_until(
        "the slow call shows in inspect calls",
        Duration::from_secs(5),
        || {
            let calls = inspect_json(admin, &["calls"]);
            calls.as_array().unwrap().iter().any(|c| {
                c["method"] == "/helloworld.Greeter/SayHello"
                    && c["service"] == "greeter"
                    && c["endpoint"]
                        .as_str()
                        .is_some_and(|e| e.starts_with("127.0.0.1:"))
            })
        },
    )
    .await;
    let conns = inspect_json(admin, &["connections"]);
    let conns = conns.as_array().unwrap();
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert_eq!(conns[0]["active_calls"], 1);
    assert!(conns[0]["calls_total"].as_u64().unwrap() >= 10);
    let (_, table, _) = inspect(admin, &["calls"]);
    assert!(table.contains("/helloworld.Greeter/SayHello"), "{table}");
    call.await.unwrap().expect("the slow call completes");

    let config = inspect_json(admin, &["config"]);
    assert_eq!(config["services"][0]["policy"], "least-request");
}

#[tokio::test]
async fn a_stopped_agent_gives_a_one_line_error_saying_what_to_check() {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (ok, out, err) = inspect(admin, &["status"]);
    assert!(!ok);
    assert!(out.is_empty());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&admin.to_string()) && err.contains("check"),
        "{err}"
    );

    let (ok, _, err) = inspect(
        admin,
        &["bpf", "--pin-path", "/sys/fs/bpf/balancer-nowhere"],
    );
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("/sys/fs/bpf/balancer-nowhere") && err.contains("datapath.enabled"),
        "{err}"
    );
}

#[tokio::test]
async fn istio_compatible_metrics_after_known_traffic() {
    let s = standalone().await;
    let mut client = balancer_tests::harness::client(s.listen).await;
    for _ in 0..4 {
        client.say_hello(HelloRequest::default()).await.unwrap();
    }
    // Server streaming: 1 request message, 5 response messages.
    let mut stream = client
        .say_hello_stream(HelloRequest {
            count: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = 0;
    while let Some(m) = stream.next().await {
        m.unwrap();
        got += 1;
    }
    assert_eq!(got, 5);
    let failing = HelloRequest {
        fail_code: tonic::Code::PermissionDenied as i32,
        ..Default::default()
    };
    assert!(client.say_hello(failing).await.is_err());

    let m = s.agent.metrics();
    let dest = "destination_service=\"greeter.default.svc.cluster.local\"";
    let ok = metric(
        &m,
        "istio_requests_total",
        &[
            dest,
            "grpc_response_status=\"0\"",
            "reporter=\"source\"",
            "request_protocol=\"grpc\"",
        ],
    );
    assert_eq!(ok, 5.0, "{m}");
    let denied = metric(
        &m,
        "istio_requests_total",
        &[dest, "grpc_response_status=\"7\""],
    );
    assert_eq!(denied, 1.0);
    assert_eq!(
        metric(&m, "istio_request_duration_milliseconds_count", &[dest]),
        6.0
    );
    assert!(
        m.contains("destination_service_namespace=\"default\""),
        "{m}"
    );
    // 4 unary (1 each way), 1 stream (1 in, 5 out), 1 failed unary (1 in, 0 out).
    assert_eq!(metric(&m, "istio_request_messages_total", &[dest]), 6.0);
    assert_eq!(metric(&m, "istio_response_messages_total", &[dest]), 9.0);
    // Our own per-endpoint figures.
    assert_eq!(
        metric(&m, "balancer_endpoint_calls", &["service=\"greeter\""]),
        6.0
    );
    assert!(m.contains("balancer_endpoint_ewma_seconds{"), "{m}");
    assert!(m.contains("balancer_endpoint_in_flight{"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_inspect_bpf_reads_the_pinned_datapath_maps() {
    require_root!();
    let s = Scenario::new(2).await.unwrap();
    let gw = s.node.gateway.octets();
    let vip_ip = std::net::Ipv4Addr::new(10, 96, gw[2], 20);
    s.node.add_vip(vip_ip).unwrap();
    let vip = SocketAddr::from((vip_ip, balancer_tests::node::BACKEND_PORT));
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cg = s.node.agent_cgroup().unwrap();
    let agent = Agent::start_in_cgroup(&s.agent_config(vip, admin, "auto"), admin, cg.path()).await;
    s.call("client", vip, 4).await;

    let pins = s.pin_path();
    let bpf = inspect_json(admin, &["bpf", "--pin-path", &pins]);
    assert_eq!(bpf["services"][0]["vip"], vip.to_string(), "{bpf}");
    assert_eq!(bpf["agent"]["alive"], true);
    assert_eq!(
        bpf["agent"]["proxy_address"],
        format!("{}:15001", s.node.gateway)
    );
    assert_eq!(bpf["opted_in_cgroups"].as_array().unwrap().len(), 1);
    assert_eq!(bpf["counters"]["connect4_redirected"], 1);
    let (ok, table, _) = inspect(admin, &["bpf", "--pin-path", &pins]);
    assert!(
        ok && table.contains(&vip.to_string()) && table.contains("connect4_redirected"),
        "{table}"
    );

    // The other subcommands on the node: the VIP's service, its pod endpoints, and a
    // redirected connection (held open by a slow call) with its call.
    let services = inspect_json(admin, &["services"]);
    assert_eq!(services[0]["vips"][0], vip.to_string());
    let eps = inspect_json(admin, &["endpoints", "greeter"]);
    let pod_ips: Vec<String> = s.backends.iter().map(|b| b.1.to_string()).collect();
    let listed: Vec<String> = eps
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["address"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, pod_ips);
    assert_eq!(
        eps.as_array()
            .unwrap()
            .iter()
            .map(|e| e["calls"].as_u64().unwrap())
            .sum::<u64>(),
        4
    );
    let config = inspect_json(admin, &["config"]);
    assert_eq!(config["datapath"]["enabled"], true);
    let slow = s
        .node
        .pod("client")
        .command(
            balancer_tests::node::pod_bin().to_str().unwrap(),
            &[
                "call",
                "--target",
                &vip.to_string(),
                "--calls",
                "1",
                "--sleep-ms",
                "3000",
            ],
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let target = format!("vip {vip}");
    wait_until(
        "the pod's slow call shows in inspect calls",
        Duration::from_secs(5),
        || {
            let calls = inspect_json(admin, &["calls"]);
            calls.as_array().unwrap().iter().any(|c| {
                c["service"] == "greeter"
                    && c["endpoint"]
                        .as_str()
                        .is_some_and(|e| pod_ips.iter().any(|p| p == e))
            })
        },
    )
    .await;
    let conns = inspect_json(admin, &["connections"]);
    let conn = &conns.as_array().unwrap()[0];
    assert_eq!(
        conn["target"], target,
        "a redirected connection shows its VIP: {conns}"
    );
    assert_eq!(
        conn["peer"].as_str().unwrap().split(':').next(),
        Some(s.node.pod("client").ip.to_string().as_str())
    );
    let out = tokio::task::spawn_blocking(move || slow.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success());

    let status = inspect_json(admin, &["status"]);
    assert_eq!(status["datapath"]["shortcut"]["enabled"], true, "{status}");
    let (_, text, _) = inspect(admin, &["status"]);
    assert!(text.contains("sk_msg shortcut:  on"), "{text}");
    drop(agent);
    drop(cg);
}
