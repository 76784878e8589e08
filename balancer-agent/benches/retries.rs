//! What a call costs the call layer with resilience policies configured but not needed (issue
//! 16: "a call with retries configured but not needed costs no more than one without"): the
//! whole life of a unary call in the call layer (`Calls::admit`, the pick, `Admitted::sent`,
//! the request DATA kept for a replay, the response, `Call::finish` with its metrics), for a
//! service with no policy, a route without retries, the same route with retries (3 attempts on
//! unavailable), with retries and a per-try timeout, and with a circuit breaker and a retry
//! budget on the service. The ratio of each to the route without retries is printed at the
//! end.
//!
//! `cargo bench -p balancer-agent --bench retries`

use std::{
    hint::black_box,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use balancer_agent::{
    call::{Attempts, Calls, End, Target, route::PolicySet},
    config::{Config, Limits, Policy, PoolConfig},
    metrics::Metrics,
    state::{EndpointSpec, ServiceSpec, Source, Store, Update},
    wire::message::Fields,
};
use criterion::{Criterion, criterion_group, criterion_main};

/// The variants: a name and the `routes` entry of service `greeter` (none: no policy).
const VARIANTS: [(&str, &str); 5] = [
    ("no_policy", ""),
    (
        "route",
        "    rules:\n      - name: r\n        backends: [{}]\n",
    ),
    (
        "route_with_retries",
        "    rules:\n      - name: r\n        backends: [{}]\n        retries: {attempts: 3, retry_on: unavailable}\n",
    ),
    (
        "route_with_retries_per_try_timeout",
        "    rules:\n      - name: r\n        backends: [{}]\n        retries: {attempts: 3, per_try_timeout_ms: 2000, retry_on: unavailable}\n",
    ),
    (
        "route_with_retries_breaker_budget",
        "    connection_pool: {max_requests: 100000, max_retries: 100}\n    retry_budget: {percent: 20, min_retries_per_second: 10}\n    rules:\n      - name: r\n        backends: [{}]\n        retries: {attempts: 3, retry_on: unavailable}\n",
    ),
];

const TARGET: Target = Target::Authority { default: None };

/// The call layer over service `greeter` (4 endpoints), with `routes` in force.
fn calls(routes: &str) -> Arc<Calls> {
    let store = Store::new(PoolConfig::default());
    store.apply(Update::Reset(vec![ServiceSpec {
        name: "greeter".into(),
        authorities: vec!["greeter".into()],
        vips: vec![],
        policy: Policy::RoundRobin,
        endpoints: (1..=4)
            .map(|i| EndpointSpec::ready(SocketAddr::from(([10, 0, 0, i], 50051))))
            .collect(),
        balancing: Default::default(),
    }]));
    let metrics = Metrics::new(store.clone(), 10);
    let calls = Calls::new(store, metrics, Limits::default());
    if !routes.is_empty() {
        let yaml = format!(
            "listeners: [{{address: 127.0.0.1:15001}}]\nroutes:\n  - service: greeter\n{routes}"
        );
        let config = Config::from_yaml(&yaml, "bench").expect("a valid configuration");
        calls
            .router
            .set(Source::File, PolicySet::from_config(&config.routes));
    }
    calls
}

fn request() -> Fields {
    let mut f = Fields::default();
    for (n, v) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/helloworld.Greeter/SayHello"),
        (":authority", "greeter"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("grpc-timeout", "5S"),
    ] {
        f.push(n.as_bytes(), v.as_bytes());
    }
    f
}

/// One unary call through the call layer, answered OK by its endpoint.
fn one_call(calls: &Arc<Calls>, conn: &Arc<balancer_agent::call::registry::ConnInfo>, f: &Fields) {
    let admitted = calls.admit(&TARGET, conn, f, false).expect("admitted");
    let guard = Attempts::default()
        .next(&admitted.destination)
        .expect("an endpoint");
    let mut call = admitted.sent(calls.clone(), guard);
    call.request_data(
        black_box(&[0, 0, 0, 0, 7, 10, 5, b'w', b'o', b'r', b'l', b'd']),
        true,
    );
    call.responded();
    call.finish(End::Status("0"));
}

fn call_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("call_path");
    let f = request();
    for (name, routes) in VARIANTS {
        let calls = calls(routes);
        let peer = "10.1.0.5:40000".parse().expect("an address");
        let conn = calls.registry.open_connection(peer, peer, &TARGET);
        g.bench_function(name, |b| b.iter(|| one_call(&calls, &conn, &f)));
    }
    g.finish();
    // The ratios, measured here in one run, interleaved so drift hits every variant alike.
    let setups: Vec<_> = VARIANTS
        .iter()
        .map(|(name, routes)| {
            let calls = calls(routes);
            let peer = "10.1.0.5:40000".parse().expect("an address");
            let conn = calls.registry.open_connection(peer, peer, &TARGET);
            (*name, calls, conn)
        })
        .collect();
    let mut best = vec![Duration::MAX; setups.len()];
    for _ in 0..15 {
        for (i, (_, calls, conn)) in setups.iter().enumerate() {
            let start = Instant::now();
            for _ in 0..20_000 {
                one_call(calls, conn, &f);
            }
            best[i] = best[i].min(start.elapsed() / 20_000);
        }
    }
    let base = best[1].as_secs_f64();
    for ((name, _, _), t) in setups.iter().zip(&best) {
        println!(
            "call_path {name:<36} {:>7.0} ns/call  {:.3}x the route without retries",
            t.as_secs_f64() * 1e9,
            t.as_secs_f64() / base
        );
    }
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = call_path
}
criterion_main!(benches);
