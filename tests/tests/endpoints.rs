//! Which endpoint takes a call, through a real `balancer-agent` process and real tonic
//! backends: the default policy's even split on one connection, overload answers shedding
//! load, consistent hashing by a header, slow start, locality and active health checks.

use std::{collections::BTreeMap, time::Duration};

use balancer_tests::{
    greeter,
    harness::{agent, client, hello, setup},
};
use tonic::{Code, Request};

/// Sends `n` calls one after another on one connection; counts the backends that answered.
async fn split(
    c: &mut balancer_tests::pb::greeter_client::GreeterClient<tonic::transport::Channel>,
    n: usize,
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let r = c.say_hello(hello(&format!("c{i}"))).await.expect("a call");
        *counts.entry(r.into_inner().backend).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn the_default_policy_splits_sequential_calls_on_one_connection_evenly() {
    let s = setup("p2c-ewma", 4).await;
    let mut c = client(s.listen).await;
    let counts = split(&mut c, 200).await;
    println!("200 calls over 4 backends: {counts:?}");
    assert_eq!(counts.len(), 4, "{counts:?}");
    assert!(counts.values().all(|n| (35..=65).contains(n)), "{counts:?}");

    let s = setup("p2c-ewma", 3).await;
    let mut c = client(s.listen).await;
    let counts = split(&mut c, 300).await;
    println!("300 calls over 3 backends: {counts:?}");
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(
        counts.values().all(|n| (70..=130).contains(n)),
        "{counts:?}"
    );

    // inspect says why: every endpoint even.
    let eps = s.agent.json("/api/endpoints");
    for e in eps.as_array().expect("endpoints") {
        let why = e["pick"].as_str().unwrap_or_default();
        assert!(why.contains("even"), "{e}");
    }
}

#[tokio::test]
async fn an_endpoint_answering_resource_exhausted_sheds_load_before_any_ejection() {
    let mut backends = Vec::new();
    for i in 1..=4 {
        let fail_code = if i == 1 {
            Code::ResourceExhausted as i32
        } else {
            0
        };
        let options = greeter::Options {
            fail_code,
            ..Default::default()
        };
        backends.push(greeter::spawn_with("127.0.0.1:0", &format!("backend-{i}"), options).await);
    }
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let (agent, listen) = agent("p2c-ewma", &addrs, "").await;
    let mut c = client(listen).await;
    let mut exhausted = 0;
    for i in 0..200 {
        match c.say_hello(hello(&format!("c{i}"))).await {
            Ok(_) => {}
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                exhausted += 1;
            }
        }
    }
    let overloaded = backends[0]
        .stats
        .calls
        .load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "the overloaded backend took {overloaded} of 200 calls ({exhausted} answered RESOURCE_EXHAUSTED)"
    );
    // An even share would be 50: a penalised endpoint wins no pairing against a clean one.
    assert!(overloaded <= 25, "{overloaded}");
    let eps = agent.json("/api/endpoints");
    let first = eps
        .as_array()
        .expect("endpoints")
        .iter()
        .find(|e| e["address"] == addrs[0].to_string())
        .expect("the overloaded endpoint");
    assert_eq!(first["ejections"], 0, "{first}");
    assert!(
        first["pick"]
            .as_str()
            .unwrap_or_default()
            .contains("penalised"),
        "{first}"
    );
}

fn keyed(name: &str, key: &str) -> Request<balancer_tests::pb::HelloRequest> {
    let mut r = Request::new(hello(name));
    r.metadata_mut()
        .insert("x-user", key.parse().expect("ascii"));
    r
}

#[tokio::test]
async fn ring_hash_keeps_a_key_on_one_endpoint_and_falls_back_to_the_next_one() {
    let mut backends = Vec::new();
    for i in 1..=5 {
        backends.push(greeter::spawn("127.0.0.1:0", &format!("backend-{i}")).await);
    }
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let listen = balancer_tests::harness::local_addr();
    let admin = balancer_tests::harness::local_addr();
    let config = balancer_tests::harness::config(listen, admin, "ring-hash", &addrs, "").replace(
        "    policy: ring-hash\n",
        "    policy: ring-hash\n    hash_header: x-user\n",
    );
    let _agent = balancer_tests::agent::Agent::start(&config, admin).await;
    let mut c = client(listen).await;
    let mut owner = BTreeMap::new();
    for k in 0..40 {
        let key = format!("user-{k}");
        for i in 0..4 {
            let b = c
                .say_hello(keyed(&format!("{i}"), &key))
                .await
                .expect("a call")
                .into_inner()
                .backend;
            let first = owner.entry(key.clone()).or_insert_with(|| b.clone());
            assert_eq!(*first, b, "key {key} moved");
        }
    }
    let used: std::collections::BTreeSet<_> = owner.values().collect();
    assert!(
        used.len() >= 4,
        "40 keys over 5 endpoints used only {used:?}"
    );
    // The owner of user-0 goes away: its keys go to one other endpoint, with no failed call.
    let gone = owner["user-0"].clone();
    let i = backends
        .iter()
        .position(|b| b.name == gone)
        .expect("a backend");
    let stopped = backends.remove(i);
    stopped.shutdown();
    balancer_tests::wait_until("the backend stops", Duration::from_secs(10), || {
        stopped.is_finished()
    })
    .await;
    let mut fallback = None;
    for n in 0..20 {
        let b = c
            .say_hello(keyed(&format!("{n}"), "user-0"))
            .await
            .expect("no failed call")
            .into_inner()
            .backend;
        assert_ne!(b, gone);
        assert_eq!(
            *fallback.get_or_insert_with(|| b.clone()),
            b,
            "one fallback endpoint"
        );
    }
    // Keys of the other endpoints did not move.
    for (key, b) in owner.iter().filter(|(_, b)| **b != gone).take(10) {
        let now = c
            .say_hello(keyed("again", key))
            .await
            .expect("a call")
            .into_inner()
            .backend;
        assert_eq!(&now, b, "{key}");
    }
}

/// An agent over `backends` whose service `greeter` (policy `policy`) has `service_yaml` added.
async fn agent_with(
    policy: &str,
    backends: &[&greeter::Handle],
    service_yaml: &str,
    extra: &str,
) -> (balancer_tests::agent::Agent, std::net::SocketAddr) {
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let listen = balancer_tests::harness::local_addr();
    let admin = balancer_tests::harness::local_addr();
    let line = format!("    policy: {policy}\n");
    let config = balancer_tests::harness::config(listen, admin, policy, &addrs, extra)
        .replace(&line, &format!("{line}{service_yaml}"));
    (
        balancer_tests::agent::Agent::start(&config, admin).await,
        listen,
    )
}

/// The `field` of the endpoint at `addr` in `/api/endpoints`.
fn endpoint_field(
    agent: &balancer_tests::agent::Agent,
    addr: std::net::SocketAddr,
    field: &str,
) -> String {
    let eps = agent.json("/api/endpoints");
    eps.as_array()
        .into_iter()
        .flatten()
        .find(|e| e["address"] == addr.to_string())
        .map(|e| e[field].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

const HEALTH: &str = "    health_check:\n      interval_ms: 300\n      timeout_ms: 500\n      healthy_threshold: 2\n      unhealthy_threshold: 2\n";

async fn health_backends(n: usize, watch: bool) -> Vec<greeter::Handle> {
    let mut v = Vec::new();
    for i in 1..=n {
        let options = greeter::Options {
            health: Some(greeter::HealthControl::new(watch)),
            ..Default::default()
        };
        v.push(greeter::spawn_with("127.0.0.1:0", &format!("backend-{i}"), options).await);
    }
    v
}

fn control(b: &greeter::Handle) -> &greeter::HealthControl {
    b.health.as_ref().expect("a health service")
}

#[tokio::test]
async fn a_backend_switched_to_not_serving_gets_no_new_call_then_comes_back() {
    let backends = health_backends(3, true).await;
    let refs: Vec<_> = backends.iter().collect();
    let (agent, listen) = agent_with("p2c-ewma", &refs, HEALTH, "").await;
    let bound = Duration::from_secs(10);
    balancer_tests::wait_until("a Watch stream per endpoint", bound, || {
        backends.iter().all(|b| control(b).watches_open() == 1)
    })
    .await;
    let mut c = client(listen).await;
    let sick = &backends[0];
    let calls = |b: &greeter::Handle| b.stats.calls.load(std::sync::atomic::Ordering::Relaxed);

    control(sick).set_serving(false);
    let switched = std::time::Instant::now();
    balancer_tests::wait_until("the endpoint is seen NOT_SERVING", bound, || {
        endpoint_field(&agent, sick.addr, "check") == "not-serving"
    })
    .await;
    let took = switched.elapsed();
    println!("NOT_SERVING seen by the agent after {took:?} (interval 300 ms)");
    assert!(took < Duration::from_millis(300), "{took:?}");
    assert_eq!(endpoint_field(&agent, sick.addr, "health"), "not-serving");
    let before = calls(sick);
    let counts = split(&mut c, 90).await;
    assert_eq!(
        calls(sick),
        before,
        "no new call on a NOT_SERVING endpoint: {counts:?}"
    );

    control(sick).set_serving(true);
    balancer_tests::wait_until(
        "the endpoint is back after the healthy threshold",
        bound,
        || endpoint_field(&agent, sick.addr, "check") == "serving",
    )
    .await;
    let counts = split(&mut c, 90).await;
    println!("after SERVING again: {counts:?}");
    assert!(
        calls(sick) > before,
        "calls again after SERVING: {counts:?}"
    );
    // Every call of the test succeeded (split panics on a failed call); one stream each.
    assert!(backends.iter().all(|b| control(b).watches_opened() == 1));
    let m = agent.metrics();
    let healthy =
        balancer_tests::agent::metric(&m, "balancer_endpoint_healthy", &[&sick.addr.to_string()]);
    assert_eq!(healthy, 1.0, "{m}");
}

#[tokio::test]
async fn check_is_polled_where_watch_is_unimplemented() {
    let backends = health_backends(2, false).await;
    let refs: Vec<_> = backends.iter().collect();
    let (agent, listen) = agent_with("round-robin", &refs, HEALTH, "").await;
    let bound = Duration::from_secs(10);
    balancer_tests::wait_until("Check polled", bound, || {
        control(&backends[0]).checks() >= 2
    })
    .await;
    control(&backends[0]).set_serving(false);
    balancer_tests::wait_until("NOT_SERVING seen by polling", bound, || {
        endpoint_field(&agent, backends[0].addr, "check") == "not-serving"
    })
    .await;
    let mut c = client(listen).await;
    let counts = split(&mut c, 20).await;
    assert_eq!(counts.get("backend-2"), Some(&20), "{counts:?}");
    assert_eq!(control(&backends[0]).watches_open(), 0, "no Watch stream");
}

#[tokio::test]
async fn a_thousand_client_connections_cost_one_health_stream_per_endpoint() {
    let backends = health_backends(3, true).await;
    let refs: Vec<_> = backends.iter().collect();
    let (_agent, listen) = agent_with("p2c-ewma", &refs, HEALTH, "").await;
    let mut clients = Vec::new();
    for batch in 0..20 {
        let opened = futures_util::future::join_all((0..50).map(|_| client(listen))).await;
        for mut c in opened {
            c.say_hello(hello(&format!("b{batch}")))
                .await
                .expect("a call");
            clients.push(c);
        }
    }
    assert_eq!(clients.len(), 1000);
    for b in &backends {
        assert_eq!(control(b).watches_opened(), 1, "{}", b.name);
        assert_eq!(control(b).watches_open(), 1, "{}", b.name);
    }
}
