//! Kubernetes discovery, end to end: the real `balancer-agent` (its real kube-rs client) against
//! the in-process API server fixture (`balancer_tests::apiserver`), with real tonic backends.
//!
//! Backends of one Service listen on distinct loopback addresses (127.0.0.2, 127.0.0.3, ...)
//! and one port, as pods of a Deployment do on their pod IPs, so one EndpointSlice lists them.
//! Pod cgroups are directory trees laid out as the kubelet lays them out, under the agent's
//! `datapath.cgroup_root` (no root needed: the opted-in set is read from `/api/opted_in`),
//! except in the last test (`root_...`), which runs the whole product on the simulated node.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use balancer_tests::{
    agent::{Agent, TempDir, http_get, metric},
    apiserver::{
        ApiServer, Kind,
        objects::{Ep, endpoint_slice, namespace, pod, service},
    },
    free_port, greeter,
    node::{BACKEND_PORT, Scenario, kube_proxy_stand_in},
    pb::{HelloRequest, greeter_client::GreeterClient},
    require_root, wait_until, wait_until_async,
};
use serde_json::Value;
use tonic::{Code, transport::Channel};

const NODE: &str = "node-1";
const AUTHORITY: &str = "greeter.default.svc.cluster.local:50051";
const WAIT: Duration = Duration::from_secs(15);

struct Env {
    api: ApiServer,
    agent: Agent,
    listen: SocketAddr,
    dir: TempDir,
}

impl Env {
    fn cgroup_root(&self) -> PathBuf {
        self.dir.0.join("cgroup")
    }
}

fn config(listen: SocketAddr, admin: SocketAddr, cgroup_root: &std::path::Path) -> String {
    format!(
        "listeners:\n  - address: {listen}\nadmin:\n  address: {admin}\ndatapath:\n  cgroup_root: {}\n",
        cgroup_root.display()
    )
}

/// The fixture, then the agent against it (ready: every cache synced).
async fn start(api: ApiServer) -> Env {
    let dir = TempDir::new("balancer-kube");
    std::fs::create_dir_all(dir.0.join("cgroup")).unwrap();
    let kubeconfig = api.kubeconfig(&dir.0);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let agent = Agent::start_with(&config(listen, admin, &dir.0.join("cgroup")), admin, |c| {
        c.arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--node-name", NODE]);
    })
    .await;
    Env {
        api,
        agent,
        listen,
        dir,
    }
}

/// `n` greeter backends on 127.0.0.2.. with one port, named `backend-<i>`.
async fn backends(n: usize) -> (u16, Vec<greeter::Handle>) {
    'again: loop {
        let port = free_port();
        let mut v = Vec::new();
        for i in 0..n {
            let addr = format!("127.0.0.{}:{port}", i + 2);
            match tokio::net::TcpListener::bind(&addr).await {
                Ok(l) => drop(l),
                Err(_) => continue 'again,
            }
            v.push(greeter::spawn(&addr, &format!("backend-{}", i + 1)).await);
        }
        return (port, v);
    }
}

fn greeter_service() -> Value {
    service(
        "default",
        "greeter",
        "10.96.0.10",
        &[("grpc", 50051, None), ("metrics", 9090, None)],
    )
}

fn slice_of(port: u16, eps: &[Ep]) -> Value {
    endpoint_slice(
        "default",
        "greeter-abcde",
        "greeter",
        &[("grpc", port)],
        eps,
    )
}

fn ready(backends: &[greeter::Handle]) -> Vec<Ep> {
    backends
        .iter()
        .map(|b| Ep::ready(&b.addr.ip().to_string(), &b.name))
        .collect()
}

/// A client connection to the proxy that names the Service in `:authority`.
async fn client(listen: SocketAddr) -> GreeterClient<Channel> {
    let channel = Channel::from_shared(format!("http://{listen}"))
        .unwrap()
        .origin(format!("http://{AUTHORITY}").parse().unwrap())
        .connect()
        .await
        .expect("connecting to the proxy");
    GreeterClient::new(channel)
}

fn hello(name: &str) -> HelloRequest {
    HelloRequest {
        name: name.into(),
        ..Default::default()
    }
}

/// The balanced service the greeter Service's gRPC port becomes.
const GREETER: &str = "greeter.default:50051";

/// The endpoints the agent knows for the greeter's gRPC port: (address, health).
fn endpoints(agent: &Agent) -> Vec<(String, String)> {
    endpoints_of(agent, GREETER)
}

/// The endpoints the agent knows for `service`: (address, health); none while the agent does
/// not know the service (the admin API answers 404 for it).
fn endpoints_of(agent: &Agent, service: &str) -> Vec<(String, String)> {
    let (code, body) = agent
        .get(&format!("/api/endpoints?service={service}"))
        .expect("the admin API");
    if code == 404 {
        return Vec::new();
    }
    serde_json::from_str::<Value>(&body)
        .expect("JSON")
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["address"].as_str().unwrap().to_string(),
                e["health"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn ready_count(agent: &Agent) -> usize {
    ready_count_of(agent, GREETER)
}

fn ready_count_of(agent: &Agent, service: &str) -> usize {
    endpoints_of(agent, service)
        .iter()
        .filter(|(_, h)| h == "ready")
        .count()
}

#[tokio::test]
async fn a_namespace_labelled_at_run_time_opts_its_pods_in_and_out() {
    let api = ApiServer::start().await;
    api.apply(namespace("apps", &[]));
    let uids = [
        "0f6c1b2a-3d4e-4f50-8a9b-0c1d2e3f4a51",
        "0f6c1b2a-3d4e-4f50-8a9b-0c1d2e3f4a52",
        "0f6c1b2a-3d4e-4f50-8a9b-0c1d2e3f4a53",
        "0f6c1b2a-3d4e-4f50-8a9b-0c1d2e3f4a54",
        "0f6c1b2a-3d4e-4f50-8a9b-0c1d2e3f4a55",
    ];
    api.apply_all([
        pod("apps", "a", uids[0], NODE, &[], false),
        pod("apps", "b", uids[1], NODE, &[], false),
        pod(
            "apps",
            "opted-out",
            uids[2],
            NODE,
            &[("balancer.dev/enabled", "false")],
            false,
        ),
        pod("apps", "meshed", uids[3], NODE, &[], true),
        pod("apps", "elsewhere", uids[4], "node-2", &[], false),
    ]);
    let env = start(api).await;
    // The kubelet's layout: systemd driver for a (Burstable), cgroupfs for b.
    let root = env.cgroup_root();
    let a_dir = root.join(format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
        uids[0].replace('-', "_")
    ));
    let b_dir = root.join(format!("kubepods/burstable/pod{}", uids[1]));
    for (i, d) in [&a_dir, &b_dir].into_iter().enumerate() {
        std::fs::create_dir_all(d.join(format!("cri-containerd-{i:064}.scope"))).unwrap();
    }
    for u in &uids[2..] {
        std::fs::create_dir_all(root.join(format!("kubepods/burstable/pod{u}"))).unwrap();
    }
    let opted = |env: &Env| -> Vec<(String, Option<u64>)> {
        let v = env.agent.json("/api/opted_in");
        assert_eq!(v["synced"], true, "{v}");
        v["pods"]
            .as_object()
            .unwrap()
            .values()
            .map(|p| {
                (
                    p["pod"].as_str().unwrap().to_string(),
                    p["cgroup_id"].as_u64(),
                )
            })
            .collect()
    };
    assert!(opted(&env).is_empty());

    env.api
        .apply(namespace("apps", &[("balancer.dev/enabled", "true")]));
    let want = vec![
        (
            "apps/a".to_string(),
            Some(std::fs::metadata(&a_dir).unwrap().ino()),
        ),
        (
            "apps/b".to_string(),
            Some(std::fs::metadata(&b_dir).unwrap().ino()),
        ),
    ];
    wait_until("pods a and b opted in, with their cgroup ids", WAIT, || {
        opted(&env) == want
    })
    .await;

    // One pod opts out at run time.
    env.api.apply(pod(
        "apps",
        "b",
        uids[1],
        NODE,
        &[("balancer.dev/enabled", "false")],
        false,
    ));
    wait_until("pod b opted out", WAIT, || opted(&env) == want[..1]).await;

    env.api.apply(namespace("apps", &[]));
    wait_until("every pod out once the label is gone", WAIT, || {
        opted(&env).is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_service_added_routes_and_removed_fails_unavailable() {
    let (port, b) = backends(2).await;
    let env = start(ApiServer::start().await).await;
    let mut c = client(env.listen).await;
    let e = c.say_hello(hello("before")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");

    env.api
        .apply_all([greeter_service(), slice_of(port, &ready(&b))]);
    wait_until("the service and its 2 endpoints", WAIT, || {
        ready_count(&env.agent) == 2
    })
    .await;
    let services = env.agent.json("/api/services");
    let names: HashSet<&str> = services
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, HashSet::from([GREETER]), "{services}");
    let vips = &services[0]["vips"];
    assert_eq!(vips, &serde_json::json!(["10.96.0.10:50051"]));
    let mut seen = HashSet::new();
    for i in 0..40 {
        let r = c.say_hello(hello(&format!("c{i}"))).await.expect("routed");
        seen.insert(r.into_inner().backend);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");

    env.api.delete(Kind::Service, "default", "greeter");
    wait_until("the service gone", WAIT, || {
        env.agent
            .json("/api/services")
            .as_array()
            .unwrap()
            .is_empty()
    })
    .await;
    let e = c.say_hello(hello("after")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
}

/// Runs `workers` clients calling in a loop until `stop`; counts calls and failures.
fn load(
    listen: SocketAddr,
    workers: usize,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<std::sync::Mutex<Vec<String>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..workers)
        .map(|w| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                let mut c = client(listen).await;
                let mut i = 0u64;
                while !stop.load(Relaxed) {
                    i += 1;
                    match c.say_hello(hello(&format!("w{w}-{i}"))).await {
                        Ok(_) => {
                            ok.fetch_add(1, Relaxed);
                        }
                        Err(e) => failed.lock().unwrap().push(format!("{e:?}")),
                    }
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_scale_1_to_100_to_1_under_load_without_a_failed_call() {
    let (port, b) = backends(100).await;
    let env = start(ApiServer::start().await).await;
    env.api
        .apply_all([greeter_service(), slice_of(port, &ready(&b[..1]))]);
    wait_until("1 endpoint", WAIT, || ready_count(&env.agent) == 1).await;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let tasks = load(env.listen, 4, stop.clone(), ok.clone(), failed.clone());
    wait_until("calls flowing", WAIT, || ok.load(Relaxed) > 50).await;

    env.api.apply(slice_of(port, &ready(&b)));
    wait_until("100 endpoints", WAIT, || ready_count(&env.agent) == 100).await;
    wait_until(
        "calls reach at least 90 of the 100 backends",
        WAIT * 2,
        || b.iter().filter(|b| b.stats.calls.load(Relaxed) > 0).count() >= 90,
    )
    .await;

    env.api.apply(slice_of(port, &ready(&b[..1])));
    wait_until("back to 1 endpoint", WAIT, || {
        endpoints(&env.agent).len() == 1
    })
    .await;
    let before: u64 = b[1..].iter().map(|b| b.stats.calls.load(Relaxed)).sum();
    let first = b[0].stats.calls.load(Relaxed);
    wait_until("new calls all go to the one left", WAIT, || {
        b[0].stats.calls.load(Relaxed) > first + 200
    })
    .await;
    let after: u64 = b[1..].iter().map(|b| b.stats.calls.load(Relaxed)).sum();
    stop.store(true, Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let failed = failed.lock().unwrap();
    assert!(
        failed.is_empty(),
        "{} failed calls: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    // Calls already on their way to a removed endpoint may land; none start after.
    assert!(
        after - before <= 4,
        "{} calls reached removed endpoints",
        after - before
    );
    assert!(ok.load(Relaxed) > 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminating_endpoint_takes_no_new_calls_and_finishes_its_own() {
    let (port, b) = backends(2).await;
    let env = start(ApiServer::start().await).await;
    env.api
        .apply_all([greeter_service(), slice_of(port, &ready(&b[..1]))]);
    wait_until("1 endpoint", WAIT, || ready_count(&env.agent) == 1).await;

    let mut c = client(env.listen).await;
    let mut slow = c.clone();
    let in_flight = tokio::spawn(async move {
        let mut req = hello("long");
        req.sleep_ms = 3000;
        slow.say_hello(req).await.map(|r| r.into_inner().backend)
    });
    wait_until("the long call on backend-1", WAIT, || {
        b[0].stats.in_flight.load(Relaxed) == 1
    })
    .await;

    // backend-1 starts terminating; backend-2 appears.
    env.api.apply(slice_of(
        port,
        &[
            Ep::terminating(&b[0].addr.ip().to_string(), &b[0].name),
            Ep::ready(&b[1].addr.ip().to_string(), &b[1].name),
        ],
    ));
    wait_until("backend-1 terminating", WAIT, || {
        endpoints(&env.agent)
            .iter()
            .any(|(a, h)| a == &b[0].addr.to_string() && h == "terminating")
    })
    .await;
    for i in 0..20 {
        let r = c
            .say_hello(hello(&format!("n{i}")))
            .await
            .expect("new call");
        assert_eq!(r.into_inner().backend, "backend-2");
    }
    assert_eq!(b[0].stats.in_flight.load(Relaxed), 1, "still draining");
    assert_eq!(
        in_flight
            .await
            .unwrap()
            .expect("the draining call finishes"),
        "backend-1"
    );
    assert_eq!(b[0].stats.calls.load(Relaxed), 1);
    assert_eq!(b[0].stats.cancelled.load(Relaxed), 0);
}

/// Calls until one reaches `backend`, bounded.
async fn until_served_by(c: &GreeterClient<Channel>, backend: &str) {
    wait_until_async(&format!("calls served by {backend}"), WAIT, || {
        let mut c = c.clone();
        let backend = backend.to_string();
        async move {
            c.say_hello(hello("x"))
                .await
                .is_ok_and(|r| r.into_inner().backend == backend)
        }
    })
    .await;
}

#[tokio::test]
async fn the_api_server_restarts_and_the_agent_keeps_then_refreshes_its_endpoints() {
    let (port, b) = backends(3).await;
    let env = start(ApiServer::start().await).await;
    env.api
        .apply_all([greeter_service(), slice_of(port, &ready(&b[..1]))]);
    wait_until("1 endpoint", WAIT, || ready_count(&env.agent) == 1).await;
    let mut c = client(env.listen).await;

    env.api.stop().await;
    wait_until("the watches gone", WAIT, || env.api.watches() == 0).await;
    for i in 0..20 {
        let r = c
            .say_hello(hello(&format!("down{i}")))
            .await
            .expect("last known endpoints");
        assert_eq!(r.into_inner().backend, "backend-1");
    }
    assert_eq!(http_get(env.agent.admin, "/ready").unwrap().0, 200);
    // A change while the server is down is seen after it comes back (relist after 410).
    env.api.apply(slice_of(port, &ready(&b[1..2])));
    env.api.start_again().await;
    until_served_by(&c, "backend-2").await;
    // And the watches that follow work.
    env.api.apply(slice_of(port, &ready(&b[2..3])));
    until_served_by(&c, "backend-3").await;
}

#[tokio::test]
async fn dropped_watches_410_and_a_resource_version_going_back_are_recovered() {
    let (port, b) = backends(3).await;
    let env = start(ApiServer::start().await).await;
    env.api
        .apply_all([greeter_service(), slice_of(port, &ready(&b[..1]))]);
    wait_until("1 endpoint", WAIT, || ready_count(&env.agent) == 1).await;
    let c = client(env.listen).await;
    let watches = env.api.watches();

    // Cut mid-stream; the watchers resume from their resourceVersion.
    env.api.disconnect_watches();
    env.api.apply(slice_of(port, &ready(&b[1..2])));
    until_served_by(&c, "backend-2").await;

    // History gone: resuming gets 410 (an ERROR event), the watcher relists.
    env.api.disconnect_watches();
    env.api.compact();
    env.api.apply(slice_of(port, &ready(&b[..1])));
    until_served_by(&c, "backend-1").await;

    // A restore: the server's resourceVersion goes back below the agent's.
    env.api.stop().await;
    env.api.rewind(500);
    env.api.start_again().await;
    env.api.apply(slice_of(port, &ready(&b[2..3])));
    until_served_by(&c, "backend-3").await;
    wait_until("every watch open again", WAIT, || {
        env.api.watches() >= watches
    })
    .await;
}

#[tokio::test]
async fn not_ready_until_every_cache_synced() {
    let api = ApiServer::start().await;
    api.stop().await;
    let dir = TempDir::new("balancer-kube-ready");
    let kubeconfig = api.kubeconfig(&dir.0);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let yaml = config(listen, admin, &dir.0);
    let starting = Agent::start_with(&yaml, admin, |c| {
        c.arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--node-name", NODE]);
    });
    let api_comes_up = async {
        wait_until("the agent says why it is not ready", WAIT, || {
            http_get(admin, "/ready").is_ok_and(|(code, body)| {
                code == 503 && body.contains("kubernetes caches not synced")
            })
        })
        .await;
        api.start_again().await;
    };
    let (_agent, ()) = tokio::join!(starting, api_comes_up);
}

#[tokio::test]
async fn an_endpoint_change_reaches_the_balancer_within_100ms_of_its_watch_event() {
    let (port, b) = backends(2).await;
    let env = start(ApiServer::start().await).await;
    env.api
        .apply_all([greeter_service(), slice_of(port, &ready(&b[..1]))]);
    wait_until("1 endpoint", WAIT, || ready_count(&env.agent) == 1).await;
    for i in 0..20 {
        let n = 1 + (i % 2);
        env.api.apply(slice_of(port, &ready(&b[..n])));
        wait_until("the change applied", WAIT, || ready_count(&env.agent) == n).await;
    }
    let m = env.agent.metrics();
    let count = metric(&m, "balancer_discovery_apply_seconds_count", &[]);
    let within = metric(
        &m,
        "balancer_discovery_apply_seconds_bucket",
        &["le=\"0.1\""],
    );
    assert!(count >= 20.0, "{count} observations");
    assert_eq!(
        within, count,
        "every change applied within 100 ms of its event"
    );
}

#[tokio::test]
async fn file_and_kubernetes_services_are_served_together_across_a_file_reload() {
    let (port, b) = backends(2).await;
    let env = start(ApiServer::start().await).await;
    env.api
        .apply_all([greeter_service(), slice_of(port, &ready(&b[..1]))]);
    wait_until("the Kubernetes service", WAIT, || {
        ready_count(&env.agent) == 1
    })
    .await;
    let names = |agent: &Agent| -> HashSet<String> {
        agent
            .json("/api/services")
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    };
    // The file gains a service: a reload (the file source's Reset) keeps the Kubernetes one.
    let base = std::fs::read_to_string(&env.agent.config_path).unwrap();
    env.agent.rewrite_config(&format!(
        "{base}services:\n  - name: static\n    authorities: [static.example]\n    endpoints:\n      - address: {}\n",
        b[1].addr
    ));
    let both = HashSet::from(["static".to_string(), GREETER.to_string()]);
    wait_until("file and Kubernetes services side by side", WAIT, || {
        names(&env.agent) == both
    })
    .await;
    let channel = Channel::from_shared(format!("http://{}", env.listen))
        .unwrap()
        .origin("http://static.example".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let r = GreeterClient::new(channel)
        .say_hello(hello("s"))
        .await
        .unwrap();
    assert_eq!(r.into_inner().backend, "backend-2");
    let r = client(env.listen)
        .await
        .say_hello(hello("k"))
        .await
        .unwrap();
    assert_eq!(r.into_inner().backend, "backend-1");
    // The file drops it again; the Kubernetes service stays.
    env.agent.rewrite_config(&base);
    wait_until("only the Kubernetes service", WAIT, || {
        names(&env.agent) == HashSet::from([GREETER.to_string()])
    })
    .await;
}

/// The whole product on the simulated node, fed by Kubernetes alone: a pod whose namespace is
/// labelled has its connection to the Service's ClusterIP redirected by the real eBPF programs
/// and its calls balanced over every endpoint of the EndpointSlice; unlabelled, it reaches
/// the Service through kube-proxy (its stand-in here), one backend per connection. The pod's
/// cgroup sits where the kubelet puts it (systemd driver), found by the pod's UID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_a_pod_of_a_labelled_namespace_is_redirected_and_balanced_per_call() {
    require_root!();
    const UID: &str = "5a1c2b3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
    let mut s = Scenario::new(4).await.unwrap();
    // The container ID the pod fixture reports for this UID.
    let cid = format!("{:0>64}", UID.replace('-', ""));
    s.node
        .add_pod_in_cgroup(
            "app",
            &format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{cid}.scope",
                UID.replace('-', "_")
            ),
        )
        .unwrap();
    let gw = s.node.gateway.octets();
    let vip_ip = Ipv4Addr::new(10, 96, gw[2], 30);
    s.node.add_vip(vip_ip).unwrap();
    let vip = SocketAddr::from((vip_ip, BACKEND_PORT));
    let pod_ips: Vec<SocketAddr> = s.backends.iter().map(|b| b.1).collect();
    kube_proxy_stand_in(vip, pod_ips).await.unwrap();

    let api = ApiServer::start().await;
    let eps: Vec<Ep> = s
        .backends
        .iter()
        .map(|(name, addr)| Ep::ready(&addr.ip().to_string(), name))
        .collect();
    api.apply_all([
        namespace("apps", &[]),
        service(
            "apps",
            "greeter",
            &vip_ip.to_string(),
            &[("grpc", BACKEND_PORT, None)],
        ),
        endpoint_slice(
            "apps",
            "greeter-abcde",
            "greeter",
            &[("grpc", BACKEND_PORT)],
            &eps,
        ),
        pod("apps", "app", UID, NODE, &[], false),
    ]);
    let dir = TempDir::new("balancer-kube-node");
    let kubeconfig = api.kubeconfig(&dir.0);
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // No services and no opted-in cgroups in the file: both come from Kubernetes.
    let config = s.kubernetes_config(admin, "off");
    let cg = s.node.agent_cgroup().unwrap();
    let agent = Agent::start_in_cgroup_with(&config, admin, cg.path(), |c| {
        c.arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--node-name", NODE]);
    })
    .await;
    std::mem::forget(cg); // removed with the node's cgroup tree, after the agent
    let counts = |v: &Value| -> Vec<u64> {
        let mut c: Vec<u64> = v["counts"]
            .as_object()
            .unwrap()
            .values()
            .map(|n| n.as_u64().unwrap())
            .collect();
        c.sort_unstable();
        c
    };
    let opted_in = |agent: &Agent| -> Vec<String> {
        agent.json("/api/opted_in")["pods"]
            .as_object()
            .unwrap()
            .values()
            .map(|p| p["pod"].as_str().unwrap().to_string())
            .collect()
    };
    wait_until("the Service's ClusterIP in the datapath", WAIT, || {
        ready_count_of(&agent, "greeter.apps:50051") == 4
    })
    .await;

    // The namespace is not labelled: kube-proxy's one backend per connection.
    assert_eq!(counts(&s.call("app", vip, 20).await), vec![20]);
    assert_eq!(agent.bpf_counter("connect4_redirected"), 0);

    label_apps(&api, true);
    wait_until("the pod opted in", WAIT, || {
        opted_in(&agent) == ["apps/app"]
    })
    .await;
    let out = s.call("app", vip, 200).await;
    let c = counts(&out);
    assert_eq!(c.len(), 4, "every endpoint of the slice served: {out}");
    assert_eq!(c.iter().sum::<u64>(), 200, "{out}");
    assert_eq!(
        agent.bpf_counter("connect4_redirected"),
        1,
        "one connection, redirected once"
    );
    let ok = metric(
        &agent.metrics(),
        "balancer_calls_total",
        &["service=\"greeter.apps:50051\"", "grpc_status=\"0\""],
    );
    assert_eq!(ok, 200.0);

    // The label goes: the pod's next connection is left to kube-proxy again.
    label_apps(&api, false);
    wait_until("the pod opted out", WAIT, || opted_in(&agent).is_empty()).await;
    assert_eq!(counts(&s.call("app", vip, 20).await), vec![20]);
    assert_eq!(agent.bpf_counter("connect4_redirected"), 1);
}

fn label_apps(api: &ApiServer, enabled: bool) {
    let labels: &[(&str, &str)] = if enabled {
        &[("balancer.dev/enabled", "true")]
    } else {
        &[]
    };
    api.apply(namespace("apps", labels));
}
