//! Route matching per call (`call::route::Table::decide`): a service with 1 route and with 50
//! routes, where the call is taken by the last one (every route before it is tried and fails on
//! its method, header or regular expression), beside a service without a policy. Before
//! measuring, the bench counts the heap allocations of 10,000 decisions with a counting
//! allocator and fails if there is any: matching must not allocate.
//!
//! `cargo bench -p balancer-agent --bench routes`

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use balancer_agent::{
    call::route::{PolicySet, Request, Router},
    config::{Config, PoolConfig},
    discovery,
    metrics::Metrics,
    state::{Source, Store},
    wire::message::Fields,
};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

/// The system allocator, counting allocations.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; only a counter is added.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The configuration of service `payment` with `routes` rules; rule `N-1` takes a call with
/// `x-tenant: last` to `/pay.Payment/Process`, every earlier one fails on something.
fn config(routes: usize) -> Config {
    let mut rules = String::new();
    for i in 0..routes.saturating_sub(1) {
        rules += &match i % 3 {
            0 => format!(
                "      - name: method-{i}\n        match:\n          - service: {{exact: pay.Payment}}\n            method: {{exact: Refund{i}}}\n        backends: [{{subset: v2}}]\n"
            ),
            1 => format!(
                "      - name: header-{i}\n        match:\n          - path: {{prefix: /pay.Payment/}}\n            headers: {{x-tenant: {{prefix: t{i}-}}}}\n        backends: [{{subset: v2}}]\n"
            ),
            _ => format!(
                "      - name: regex-{i}\n        match:\n          - method: {{regex: \"Process|Capture{i}\"}}\n            headers: {{x-tenant: {{regex: \"tenant-{i}-[a-z]+\"}}}}\n        backends: [{{subset: v2}}]\n"
            ),
        };
    }
    rules += "      - name: last\n        match:\n          - path: {exact: /pay.Payment/Process}\n            headers: {x-tenant: {exact: last}}\n        backends: [{subset: v1, weight: 80}, {subset: v2, weight: 20}]\n";
    let yaml = format!(
        "listeners:\n  - address: 127.0.0.1:15001\nservices:\n  - name: payment\n    endpoints:\n\
         {eps}  - name: plain\n    endpoints:\n      - address: 10.0.1.1:50051\n\
         routes:\n  - service: payment\n    subsets:\n      - {{name: v1, labels: {{version: v1}}}}\n      - {{name: v2, labels: {{version: v2}}}}\n    rules:\n{rules}",
        eps = (1..=4)
            .map(|i| format!(
                "      - address: 10.0.0.{i}:50051\n        labels: {{version: v{}}}\n",
                1 + i % 2
            ))
            .collect::<String>()
    );
    Config::from_yaml(&yaml, "bench").expect("a valid configuration")
}

fn request() -> Fields {
    let mut f = Fields::default();
    for (n, v) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/pay.Payment/Process"),
        (":authority", "payment:50051"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("grpc-timeout", "1S"),
        ("user-agent", "grpc-go/1.70.0"),
        ("x-tenant", "last"),
    ] {
        f.push(n.as_bytes(), v.as_bytes());
    }
    f
}

fn decide(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_decide");
    let fields = request();
    for routes in [1, 50] {
        let config = config(routes);
        let store = Store::new(PoolConfig::default());
        let router = Router::new(&store, Metrics::new(store.clone(), 10));
        store.apply(discovery::file::update_of(&config));
        router.set(Source::File, PolicySet::from_config(&config.routes));
        let snapshot = store.snapshot();
        let table = router.table();
        for (what, service) in [("routes", "payment"), ("no_policy", "plain")] {
            if what == "no_policy" && routes > 1 {
                continue;
            }
            let service = snapshot.by_name(service).expect("the service").clone();
            let run = || {
                let req = Request::new(&fields, None);
                let d = table.decide(&service, &req).expect("a destination");
                black_box(d.route.map(|r| r.name.len()));
                black_box(d.destination)
            };
            // Warm (the regex caches of this thread), then count.
            for _ in 0..100 {
                run();
            }
            let before = ALLOCATIONS.load(Relaxed);
            for _ in 0..10_000 {
                run();
            }
            let allocated = ALLOCATIONS.load(Relaxed) - before;
            assert_eq!(
                allocated, 0,
                "{allocated} allocations in 10,000 decisions ({what}, {routes} routes)"
            );
            let id = if what == "routes" {
                BenchmarkId::new("last_of", routes)
            } else {
                BenchmarkId::new("no_policy", 0)
            };
            g.bench_function(id, |bench| bench.iter(run));
        }
    }
    g.finish();
}

fn config_short() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(30)
}

criterion_group! {
    name = routes;
    config = config_short();
    targets = decide
}
criterion_main!(routes);
