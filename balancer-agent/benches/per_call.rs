//! Micro-benchmarks of what the proxy does on every call, outside the network: the balancer's
//! pick (each policy, 4 and 100 endpoints), `grpc-timeout` parse and format, the snapshot's
//! `:authority` lookup, the per-call metrics record, and the frame relay's HPACK work on a
//! request's headers (decoded once from the client, encoded once towards the endpoint).
//!
//! Measurement times are short so that `cargo xtask bench` stays quick; run
//! `cargo bench -p balancer-agent --bench per_call -- <filter>` for one group.
//!
//! Note: the agent's dev-dependencies enable tokio's `test-util`, so `tokio::time::Instant::now`
//! (used by the P2C pick and the call guard) looks up a paused clock first, as it does in the
//! unit tests; the release binary does not pay that.

use std::{hint::black_box, sync::Arc, time::Duration};

use balancer_agent::{
    balance::{Balancer, FailurePolicy, Policy},
    call::grpc,
    config::PoolConfig,
    metrics::{Metrics, RouteLabels},
    state::{Endpoint, EndpointSpec, ServiceSpec, Store, Update},
    wire::hpack,
};
use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

fn endpoints(n: usize) -> Vec<Arc<Endpoint>> {
    (0..n)
        .map(|i| {
            let addr = format!("10.0.{}.{}:50051", i / 250, i % 250 + 1);
            Endpoint::new(addr.parse().expect("an address"))
        })
        .collect()
}

/// A pick and the end of its call (`first_byte`, then drop), as the proxy does per call.
fn pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("balancer_pick");
    for policy in [Policy::P2cEwma, Policy::LeastRequest, Policy::RoundRobin] {
        for n in [4, 100] {
            let b = Balancer::new(
                policy,
                endpoints(n),
                FailurePolicy::from_config(&PoolConfig::default()),
            );
            g.bench_with_input(BenchmarkId::new(policy.as_str(), n), &b, |bench, b| {
                bench.iter(|| {
                    let mut guard = b.pick(black_box(&[])).expect("an endpoint");
                    guard.first_byte();
                    guard
                })
            });
        }
    }
    g.finish();
}

fn timeout(c: &mut Criterion) {
    let mut g = c.benchmark_group("grpc_timeout");
    for v in ["100m", "2S", "99999999u"] {
        g.bench_with_input(BenchmarkId::new("parse", v), v.as_bytes(), |bench, v| {
            bench.iter(|| grpc::parse_timeout(black_box(v)))
        });
    }
    for d in [Duration::from_millis(99), Duration::from_secs(30)] {
        g.bench_with_input(
            BenchmarkId::new("format", format!("{d:?}")),
            &d,
            |bench, d| bench.iter(|| grpc::format_timeout(black_box(*d))),
        );
    }
    g.finish();
}

fn spec(i: usize) -> ServiceSpec {
    ServiceSpec {
        name: format!("svc-{i}"),
        authorities: vec![format!("svc-{i}.default.svc.cluster.local")],
        vips: vec![
            format!("10.96.{}.{}:50051", i / 250, i % 250 + 1)
                .parse()
                .expect("a VIP"),
        ],
        policy: Policy::P2cEwma,
        endpoints: vec![EndpointSpec::ready(
            format!("10.1.{}.{}:50051", i / 250, i % 250 + 1)
                .parse()
                .expect("an address"),
        )],
        balancing: Default::default(),
    }
}

fn authority(c: &mut Criterion) {
    let store = Store::new(PoolConfig::default());
    store.apply(Update::Reset((0..100).map(spec).collect()));
    let snap = store.snapshot();
    let mut g = c.benchmark_group("snapshot_by_authority");
    for (what, a) in [
        ("exact", "svc-42.default.svc.cluster.local"),
        ("host_port", "svc-42.default.svc.cluster.local:50051"),
        ("upper_case", "SVC-42.default.svc.cluster.local:50051"),
        ("miss", "nothing.default.svc.cluster.local:50051"),
    ] {
        g.bench_with_input(BenchmarkId::from_parameter(what), a, |bench, a| {
            bench.iter(|| snap.by_authority(black_box(a)).is_some())
        });
    }
    g.finish();
    c.bench_function("store_snapshot_load", |bench| {
        bench.iter(|| black_box(store.snapshot()))
    });
}

fn metrics(c: &mut Criterion) {
    let store = Store::new(PoolConfig::default());
    store.apply(Update::Upsert(spec(0)));
    let snap = store.snapshot();
    let service = snap.by_name("svc-0").expect("the service");
    let m = Metrics::new(store.clone(), 200);
    let mut g = c.benchmark_group("metrics_record_call");
    g.bench_function("known_method", |bench| {
        bench.iter(|| {
            m.record_call(
                black_box(Some(&**service)),
                black_box("/helloworld.Greeter/SayHello"),
                black_box("0"),
                black_box(Duration::from_micros(250)),
                black_box((1, 1)),
                RouteLabels::default(),
            )
        })
    });
    g.finish();
}

/// A tonic client's unary request headers; `grpc-timeout` changes on every call.
const REQUEST: [(&[u8], &[u8]); 8] = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/helloworld.Greeter/SayHello"),
    (b":authority", b"greeter.default.svc.cluster.local:50051"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"user-agent", b"tonic/0.14.2"),
    (b"grpc-timeout", b"4999876u"),
];

/// The relay's HPACK work per request, in steady state (a connection's second call onwards:
/// the repeated fields are in the dynamic tables).
fn hpack_request(c: &mut Criterion) {
    let mut g = c.benchmark_group("hpack_request_headers");
    let mut enc = hpack::Encoder::default();
    let mut block = BytesMut::new();
    g.bench_function("encode", |bench| {
        bench.iter(|| {
            block.clear();
            enc.begin(&mut block);
            for (n, v) in REQUEST {
                enc.field(black_box(n), black_box(v), &mut block);
            }
            black_box(block.len())
        })
    });
    // A decoder in step with a fresh encoder: the first block fills its table, the second (what
    // every later call sends) is then decoded over and over.
    let mut enc = hpack::Encoder::default();
    let mut dec = hpack::Decoder::default();
    let mut first = BytesMut::new();
    let mut steady = BytesMut::new();
    for block in [&mut first, &mut steady] {
        enc.begin(block);
        for (n, v) in REQUEST {
            enc.field(n, v, block);
        }
    }
    dec.decode(&first, usize::MAX, &mut |_, _| {})
        .expect("a valid block");
    g.bench_function("decode", |bench| {
        bench.iter(|| {
            let mut bytes = 0;
            dec.decode(black_box(&steady), usize::MAX, &mut |n, v| {
                bytes += n.len() + v.len()
            })
            .expect("a valid block");
            black_box(bytes)
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(30)
}

criterion_group! {
    name = per_call;
    config = config();
    targets = pick, timeout, authority, metrics, hpack_request
}
criterion_main!(per_call);
