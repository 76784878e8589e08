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
