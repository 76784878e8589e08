//! The per-call pick cost of each policy (ring hash included), with locality tiers and a
//! hash key where they apply: `cargo bench -p balancer-agent --bench pick`.

use std::{hint::black_box, sync::Arc};

use balancer_agent::{
    balance::{Balancer, Endpoint, PickContext, Place, Policy, Settings, ring},
    config::{Balancing, TrafficDistribution},
};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

fn endpoints(n: usize) -> Vec<Arc<Endpoint>> {
    (0..n)
        .map(|i| {
            let e = Endpoint::new(
                format!("10.0.{}.{}:50051", i / 250, i % 250 + 1)
                    .parse()
                    .expect("an address"),
            );
            e.set_place(Place::new(
                Some(&format!("node-{}", i % 4)),
                Some(&format!("zone-{}", i % 2)),
            ));
            e
        })
        .collect()
}

fn pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick");
    let local = Place::new(Some("node-0"), Some("zone-0"));
    for n in [4, 100] {
        for (name, policy, td) in [
            ("p2c-ewma", Policy::P2cEwma, TrafficDistribution::Any),
            (
                "least-request",
                Policy::LeastRequest,
                TrafficDistribution::Any,
            ),
            ("round-robin", Policy::RoundRobin, TrafficDistribution::Any),
            ("ring-hash", Policy::RingHash, TrafficDistribution::Any),
            (
                "p2c-ewma+PreferSameNode",
                Policy::P2cEwma,
                TrafficDistribution::PreferSameNode,
            ),
        ] {
            let settings = Settings {
                balancing: Balancing {
                    hash_header: Some("x-user".into()),
                    traffic_distribution: td,
                    ..Balancing::default()
                },
                local: local.clone(),
                ..Settings::default()
            };
            let b = Balancer::new(policy, endpoints(n), settings);
            let mut k = 0u64;
            g.bench_function(BenchmarkId::new(name, n), |bench| {
                bench.iter(|| {
                    k = k.wrapping_add(1);
                    let hash = Some(ring::key(&k.to_le_bytes()));
                    let mut guard = b
                        .pick_with(PickContext {
                            avoid: black_box(&[]),
                            hash,
                        })
                        .expect("an endpoint");
                    guard.first_byte();
                    guard.answered(Some(b"0"));
                    guard
                })
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1));
    targets = pick
}
criterion_main!(benches);
