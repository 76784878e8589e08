//! Locality and slow start through a real `balancer-agent` process and real tonic backends
//! with a switchable `grpc.health.v1` service: endpoints carry their node and zone in the file,
//! the top-level `locality:` section says where the agent runs; calls stay local while the
//! local endpoints take calls and fail over with no failed call when they stop; a new
//! endpoint's share ramps over `warmup_ms`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use balancer_tests::{
    agent::Agent,
    greeter,
    harness::{client, hello, local_addr},
    pb::greeter_client::GreeterClient,
};
use tonic::transport::Channel;

const HEALTH: &str = "    health_check:\n      interval_ms: 300\n      timeout_ms: 500\n      healthy_threshold: 2\n      unhealthy_threshold: 2\n";

/// Backends with a health service, `backend-1`.. in the order of `places` (node, zone).
async fn backends(places: &[(&str, &str)]) -> Vec<greeter::Handle> {
    let mut v = Vec::new();
    for i in 1..=places.len() {
        let options = greeter::Options {
            health: Some(greeter::HealthControl::new(true)),
            ..Default::default()
        };
        v.push(greeter::spawn_with("127.0.0.1:0", &format!("backend-{i}"), options).await);
    }
    v
}

/// The file: service `greeter` (p2c-ewma) with `service_yaml`, its endpoints at their places,
/// this agent on `node` in `zone`.
fn config(
    listen: SocketAddr,
    admin: SocketAddr,
    endpoints: &[(SocketAddr, &str, &str)],
    service_yaml: &str,
    (node, zone): (&str, &str),
) -> String {
    let list: String = endpoints
        .iter()
        .map(|(a, n, z)| format!("      - {{address: {a}, node: {n}, zone: {z}}}\n"))
        .collect();
    balancer_tests::harness::config(listen, admin, "p2c-ewma", &[], "")
        .replace(
            "    endpoints: []\n",
            &format!("{service_yaml}    endpoints:\n{list}"),
        )
        .replace(
            "\nadmin:",
            &format!("\nlocality:\n  node: {node}\n  zone: {zone}\nadmin:"),
        )
}

async fn start(
    backends: &[greeter::Handle],
    places: &[(&str, &str)],
    service_yaml: &str,
    here: (&str, &str),
) -> (Agent, SocketAddr) {
    let eps: Vec<_> = backends
        .iter()
        .zip(places)
        .map(|(b, (n, z))| (b.addr, *n, *z))
        .collect();
    let (listen, admin) = (local_addr(), local_addr());
    let agent = Agent::start(&config(listen, admin, &eps, service_yaml, here), admin).await;
    (agent, listen)
}

async fn split(c: &mut GreeterClient<Channel>, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let r = c.say_hello(hello(&format!("c{i}"))).await.expect("a call");
        *counts.entry(r.into_inner().backend).or_default() += 1;
    }
    counts
}

fn control(b: &greeter::Handle) -> &greeter::HealthControl {
    b.health.as_ref().expect("a health service")
}

fn check(agent: &Agent, addr: SocketAddr) -> String {
    agent
        .json("/api/endpoints")
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["address"] == addr.to_string())
        .map(|e| e["check"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

/// Calls sent one after another on their own connection until stopped: (answered, failed).
struct Background {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Background {
    async fn start(listen: SocketAddr) -> Self {
        let (stop, ok, failed) = (Arc::default(), Arc::default(), Arc::default());
        let mut c = client(listen).await;
        let (s, o, f): (Arc<AtomicBool>, Arc<AtomicUsize>, Arc<AtomicUsize>) =
            (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        let task = tokio::spawn(async move {
            while !s.load(Relaxed) {
                match c.say_hello(hello("bg")).await {
                    Ok(_) => o.fetch_add(1, Relaxed),
                    Err(e) => {
                        eprintln!("failed call: {e}");
                        f.fetch_add(1, Relaxed)
                    }
                };
            }
        });
        Self {
            stop,
            ok,
            failed,
            task,
        }
    }

    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Relaxed);
        self.task.await.expect("the calls");
        (self.ok.load(Relaxed), self.failed.load(Relaxed))
    }
}

/// Backends at `places` with a health service, and an agent on node-1 in zone-a over them whose
/// service has `traffic_distribution: td` and health checks, once every endpoint is SERVING;
/// a client; the split of 200 calls with every endpoint up.
async fn located(
    places: &[(&str, &str)],
    td: &str,
) -> (
    Vec<greeter::Handle>,
    Agent,
    SocketAddr,
    GreeterClient<Channel>,
    BTreeMap<String, usize>,
) {
    let b = backends(places).await;
    let yaml = format!("    traffic_distribution: {td}\n{HEALTH}");
    let (agent, listen) = start(&b, places, &yaml, ("node-1", "zone-a")).await;
    balancer_tests::wait_until("every endpoint checked", BOUND, || {
        b.iter().all(|e| check(&agent, e.addr) == "serving")
    })
    .await;
    let mut c = client(listen).await;
    let counts = split(&mut c, 200).await;
    println!("{td}, all up: {counts:?}");
    (b, agent, listen, c, counts)
}

/// The backends that answered are exactly `names`, each within `range` when one is given.
fn only(counts: &BTreeMap<String, usize>, names: &[&str], range: Option<(usize, usize)>) {
    assert_eq!(counts.keys().collect::<Vec<_>>(), names, "{counts:?}");
    if let Some((lo, hi)) = range {
        assert!(counts.values().all(|n| (lo..=hi).contains(n)), "{counts:?}");
    }
}

const BOUND: Duration = Duration::from_secs(10);

#[tokio::test]
async fn prefer_same_node_keeps_calls_on_the_node_and_fails_over_with_no_failed_call() {
    let places = [
        ("node-1", "zone-a"),
        ("node-1", "zone-a"),
        ("node-2", "zone-a"),
        ("node-3", "zone-b"),
    ];
    let (b, agent, listen, mut c, counts) = located(&places, "PreferSameNode").await;
    // Both local endpoints up: every call stays on the node.
    only(&counts, &["backend-1", "backend-2"], Some((70, 130)));

    // One of two local endpoints NOT_SERVING: the node tier keeps 1.4 x 1/2 = 70%, the rest
    // spills to the zone (node-2), none to the other zone.
    let bg = Background::start(listen).await;
    control(&b[0]).set_serving(false);
    balancer_tests::wait_until("backend-1 seen NOT_SERVING", BOUND, || {
        check(&agent, b[0].addr) == "not-serving"
    })
    .await;
    let counts = split(&mut c, 400).await;
    println!("PreferSameNode, one local endpoint NOT_SERVING: {counts:?}");
    assert_eq!(counts.get("backend-1"), None, "{counts:?}");
    assert_eq!(counts.get("backend-4"), None, "{counts:?}");
    let local = counts.get("backend-2").copied().unwrap_or_default();
    assert!((240..=320).contains(&local), "70% of 400 local: {counts:?}");

    // inspect explain says why: out, first choice on the node, the zone's only for the spill.
    let out = std::process::Command::new(balancer_tests::agent::agent_bin())
        .args(["inspect", "--admin", &agent.admin.to_string(), "explain"])
        .args([
            "--to",
            "greeter",
            "--method",
            "/helloworld.Greeter/SayHello",
        ])
        .output()
        .expect("running inspect");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(out.status.success(), "{out:?}");
    for (e, why) in [
        (0, "out: its health check says NOT_SERVING"),
        (1, "locality: this node (node-1), first choice"),
        (2, "tier 1: only what nearer tiers cannot take"),
        (3, "tier 2: only what nearer tiers cannot take"),
    ] {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(&b[e].addr.to_string()))
            .unwrap_or_default();
        assert!(
            line.contains(why),
            "{why:?} for backend-{} in\n{text}",
            e + 1
        );
    }

    // Both local endpoints NOT_SERVING: every call to the zone's endpoint, none failing.
    control(&b[1]).set_serving(false);
    balancer_tests::wait_until("backend-2 seen NOT_SERVING", BOUND, || {
        check(&agent, b[1].addr) == "not-serving"
    })
    .await;
    let counts = split(&mut c, 100).await;
    println!("PreferSameNode, the node's endpoints NOT_SERVING: {counts:?}");
    assert_eq!(counts.get("backend-3"), Some(&100), "{counts:?}");

    // The zone's endpoint stops too (ejected, checks fail): the other zone takes the calls.
    b[2].shutdown();
    balancer_tests::wait_until("backend-3 stops", BOUND, || b[2].is_finished()).await;
    let counts = split(&mut c, 100).await;
    println!("PreferSameNode, only the other zone left: {counts:?}");
    assert_eq!(counts.get("backend-4"), Some(&100), "{counts:?}");

    // The node's endpoints come back: calls return to the node.
    control(&b[0]).set_serving(true);
    control(&b[1]).set_serving(true);
    balancer_tests::wait_until("the node's endpoints serving again", BOUND, || {
        check(&agent, b[0].addr) == "serving" && check(&agent, b[1].addr) == "serving"
    })
    .await;
    let counts = split(&mut c, 100).await;
    println!("PreferSameNode, the node's endpoints back: {counts:?}");
    only(&counts, &["backend-1", "backend-2"], None);

    let (ok, failed) = bg.finish().await;
    println!("background calls across every switch: {ok} answered, {failed} failed");
    assert!(ok > 100, "{ok}");
    assert_eq!(failed, 0);
}

#[tokio::test]
async fn prefer_same_zone_keeps_calls_in_the_zone_and_fails_over_with_no_failed_call() {
    let places = [
        ("node-2", "zone-a"),
        ("node-3", "zone-a"),
        ("node-4", "zone-b"),
        ("node-5", "zone-b"),
    ];
    let (b, agent, listen, mut c, counts) = located(&places, "PreferSameZone").await;
    only(&counts, &["backend-1", "backend-2"], Some((70, 130)));

    // The zone's endpoints go away (one NOT_SERVING, one stopped): the other zone, no failure.
    let bg = Background::start(listen).await;
    control(&b[0]).set_serving(false);
    b[1].shutdown();
    balancer_tests::wait_until("the zone's endpoints out", BOUND, || {
        b[1].is_finished()
            && check(&agent, b[0].addr) == "not-serving"
            && check(&agent, b[1].addr) != "serving"
    })
    .await;
    let counts = split(&mut c, 200).await;
    println!("PreferSameZone, the zone's endpoints out: {counts:?}");
    // Every call in the other zone, on both of its endpoints. How evenly is the default
    // policy's business (tests/tests/endpoints.rs): these two carried the background calls
    // through the failover and may differ by a measured latency on a loaded machine.
    only(&counts, &["backend-3", "backend-4"], Some((30, 170)));

    // Back in the zone once its endpoint serves again.
    control(&b[0]).set_serving(true);
    balancer_tests::wait_until("backend-1 serving again", BOUND, || {
        check(&agent, b[0].addr) == "serving"
    })
    .await;
    let counts = split(&mut c, 100).await;
    println!("PreferSameZone, one zone endpoint back: {counts:?}");
    // One of two up in the zone: 1.4 x 1/2 = 70% stays in the zone.
    let local = counts.get("backend-1").copied().unwrap_or_default();
    assert!((55..=85).contains(&local), "{counts:?}");

    let (ok, failed) = bg.finish().await;
    println!("background calls across every switch: {ok} answered, {failed} failed");
    assert!(ok > 100, "{ok}");
    assert_eq!(failed, 0);
}

#[tokio::test]
async fn a_new_endpoints_share_ramps_over_the_warm_up() {
    let mut b = Vec::new();
    for i in 1..=3 {
        b.push(greeter::spawn("127.0.0.1:0", &format!("backend-{i}")).await);
    }
    let warmup = "    warmup_ms: 2000\n";
    let (listen, admin) = (local_addr(), local_addr());
    let yaml = |eps: &[SocketAddr]| {
        balancer_tests::harness::config(listen, admin, "round-robin", eps, "").replace(
            "    policy: round-robin\n",
            &format!("    policy: round-robin\n{warmup}"),
        )
    };
    let agent = Agent::start(&yaml(&[b[0].addr, b[1].addr]), admin).await;
    let mut c = client(listen).await;
    split(&mut c, 20).await;

    // backend-3 joins: its share ramps from 10% to a third over 2 s.
    agent.rewrite_config(&yaml(&[b[0].addr, b[1].addr, b[2].addr]));
    balancer_tests::wait_until("backend-3 in the service", BOUND, || {
        agent
            .json("/api/endpoints")
            .as_array()
            .is_some_and(|a| a.len() == 3)
    })
    .await;
    let joined = Instant::now();
    let (mut early, mut late) = ((0usize, 0usize), (0usize, 0usize));
    while joined.elapsed() < Duration::from_millis(3500) {
        let r = c.say_hello(hello("w")).await.expect("a call").into_inner();
        let t = joined.elapsed();
        let new = usize::from(r.backend == "backend-3");
        if t < Duration::from_millis(500) {
            early = (early.0 + new, early.1 + 1);
        } else if t > Duration::from_millis(2200) {
            late = (late.0 + new, late.1 + 1);
        }
    }
    let share = |(n, t): (usize, usize)| n as f64 / t.max(1) as f64;
    println!(
        "backend-3's share: {:.3} of {} calls in its first 0.5 s, {:.3} of {} after 2.2 s",
        share(early),
        early.1,
        share(late),
        late.1
    );
    assert!(early.1 >= 50 && late.1 >= 50, "{early:?} {late:?}");
    assert!(share(early) < 0.2, "{early:?}");
    assert!((0.25..=0.42).contains(&share(late)), "{late:?}");
}
