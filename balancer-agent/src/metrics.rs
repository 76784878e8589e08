//! Prometheus metrics.
//!
//! Per-call figures are recorded once, when the call ends. Per-endpoint figures (in flight,
//! EWMA, pooled connections) are not updated on the hot path at all: a collector reads them
//! from the store's live endpoint statistics when `/metrics` is scraped, and the connection
//! counts from the relay's pools, through [`EndpointConnections`] (the relay sits above this
//! module: the wiring passes the function in).
//!
//! Label cardinality is bounded: a service's distinct method labels are capped
//! (`limits.max_methods_per_service`); further methods are counted as `other`, so a client
//! that invents paths cannot grow the proxy's memory.
//!
//! Two families describe calls: our own (`balancer_calls_total`,
//! `balancer_call_duration_seconds`) and Istio's standard ones (`istio_requests_total` with
//! `grpc_response_status`, `istio_request_duration_milliseconds`, `istio_request_messages_total`,
//! `istio_response_messages_total`) with Istio's label names, so existing Istio dashboards work
//! unchanged. The agent reports as `reporter="source"`: it measures on the client's node.
//! Handles for a (service, method, status) are cached, so recording a call costs one map
//! lookup under a read lock and no allocation.
#![forbid(unsafe_code)]

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
    core::{Collector, Desc},
    proto::MetricFamily,
};

use crate::{
    config::Section,
    state::{Endpoint, Service, Store},
};

/// How many pooled connections an endpoint has (over every worker): the relay's pools answer,
/// given to [`Metrics::with_connections`] by the wiring.
pub type EndpointConnections = Box<dyn Fn(&Endpoint) -> usize + Send + Sync>;

/// Times a connection's write buffer reached its bound (`limits.max_send_buffer` for client
/// connections) and DATA had to wait for the peer to read: a peer that does not read holds
/// the proxy to that bound instead of growing its memory. Counted where the write happens,
/// which knows no `Metrics`, hence a process-wide counter.
pub static WRITE_BUFFER_FULL: std::sync::LazyLock<IntCounter> = std::sync::LazyLock::new(|| {
    IntCounter::new(
        "balancer_write_buffer_full_total",
        "Times a connection's write buffer reached its bound and DATA waited for the peer to read.",
    )
    .expect("valid metric")
});

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    calls: IntCounterVec,
    duration: HistogramVec,
    istio_requests: IntCounterVec,
    istio_duration: HistogramVec,
    istio_request_messages: IntCounterVec,
    istio_response_messages: IntCounterVec,
    route_calls: IntCounterVec,
    handles: RwLock<HashMap<String, Arc<CallHandles>>>,
    /// Traffic policies a source refused, by kind and object: 1 while refused.
    policy_rejected: IntGaugeVec,
    /// Calls in flight through the proxy.
    pub active_calls: IntGauge,
    /// Client connections open.
    pub client_connections: IntGauge,
    /// Client connections closed for breaking a limit or the protocol.
    pub client_connection_errors: IntCounterVec,
    /// Client streams the proxy reset for a stream error, by reason (the request never
    /// reached an endpoint, or its call was cancelled there).
    pub client_stream_errors: IntCounterVec,
    /// Configuration reloads by result: `ok` (every change in force), `restart_required` (the
    /// live sections in force, a section that needs a restart changed), `rejected`.
    pub config_reloads: IntCounterVec,
    /// By section that needs a restart (`listeners`, `admin`, `datapath`): 1 while the file's
    /// value differs from the one in force.
    pub config_restart_required: IntGaugeVec,
    methods: RwLock<HashMap<String, HashSet<String>>>,
    max_methods: AtomicUsize,
    /// A histogram of how long a discovery change takes to reach the balancer, seconds.
    pub discovery_lag: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers every metric; endpoint figures are read from `store` at scrape time, and no
    /// endpoint has a pooled connection (for what runs without the relay: tests, benchmarks).
    pub fn new(store: Arc<Store>, max_methods: usize) -> Arc<Self> {
        Self::with_connections(store, max_methods, Box::new(|_| 0))
    }

    /// Registers every metric; endpoint figures are read from `store`, and their pooled
    /// connections from `connections`, at scrape time.
    pub fn with_connections(
        store: Arc<Store>,
        max_methods: usize,
        connections: EndpointConnections,
    ) -> Arc<Self> {
        let registry = Registry::new();
        let calls = IntCounterVec::new(
            Opts::new(
                "balancer_calls_total",
                "gRPC calls through the proxy, by service, method and gRPC status.",
            ),
            &["service", "method", "grpc_status"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "balancer_call_duration_seconds",
                "Duration of gRPC calls through the proxy, from request headers to the end.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
            &["service", "method"],
        )
        .expect("valid metric");
        let route_calls = IntCounterVec::new(
            Opts::new(
                "balancer_route_calls_total",
                "gRPC calls a route took, by service called, route, the service and subset \
                 they were sent to, and gRPC status.",
            ),
            &ROUTE_LABELS,
        )
        .expect("valid metric");
        let policy_rejected = IntGaugeVec::new(
            Opts::new(
                "balancer_policy_rejected",
                "1 for each traffic policy object a source refused (inspect routes says why).",
            ),
            &["kind", "name"],
        )
        .expect("valid metric");
        let istio = |name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, help), &ISTIO_LABELS).expect("valid metric")
        };
        let istio_requests = istio(
            "istio_requests_total",
            "Requests (Istio standard metric; gRPC calls through balancer).",
        );
        let istio_request_messages = istio(
            "istio_request_messages_total",
            "gRPC messages sent by clients (Istio standard metric).",
        );
        let istio_response_messages = istio(
            "istio_response_messages_total",
            "gRPC messages sent by servers (Istio standard metric).",
        );
        let istio_duration = HistogramVec::new(
            HistogramOpts::new(
                "istio_request_duration_milliseconds",
                "Request duration in ms (Istio standard metric).",
            )
            .buckets(vec![
                0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
                10000.0, 30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
            ]),
            &ISTIO_LABELS,
        )
        .expect("valid metric");
        let active_calls = IntGauge::new(
            "balancer_active_calls",
            "gRPC calls in flight through the proxy.",
        )
        .expect("valid metric");
        let client_connections =
            IntGauge::new("balancer_client_connections", "Client connections open.")
                .expect("valid metric");
        let client_connection_errors = IntCounterVec::new(
            Opts::new(
                "balancer_client_connection_errors_total",
                "Client connections closed by the proxy for a protocol error or a broken limit.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let client_stream_errors = IntCounterVec::new(
            Opts::new(
                "balancer_client_stream_errors_total",
                "Client streams reset by the proxy for a stream error (a malformed request, \
                 a frame on a closed stream, a flow-control error), by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "balancer_config_reloads_total",
                "Configuration reloads by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let config_restart_required = IntGaugeVec::new(
            Opts::new(
                "balancer_config_restart_required",
                "1 while the file changes this section and the change waits for a restart.",
            ),
            &["section"],
        )
        .expect("valid metric");
        for s in Section::ALL.into_iter().filter(|s| !s.live()) {
            config_restart_required
                .with_label_values(&[s.name()])
                .set(0);
        }
        let discovery_lag = Histogram::with_opts(
            HistogramOpts::new(
                "balancer_discovery_apply_seconds",
                "Time from a discovery event to the balancer using the change.",
            )
            .buckets(vec![
                0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
            ]),
        )
        .expect("valid metric");
        for c in [
            Box::new(calls.clone()) as Box<dyn Collector>,
            Box::new(route_calls.clone()),
            Box::new(policy_rejected.clone()),
            Box::new(duration.clone()),
            Box::new(istio_requests.clone()),
            Box::new(istio_duration.clone()),
            Box::new(istio_request_messages.clone()),
            Box::new(istio_response_messages.clone()),
            Box::new(active_calls.clone()),
            Box::new(client_connections.clone()),
            Box::new(client_connection_errors.clone()),
            Box::new(client_stream_errors.clone()),
            Box::new(WRITE_BUFFER_FULL.clone()),
            Box::new(config_reloads.clone()),
            Box::new(config_restart_required.clone()),
            Box::new(discovery_lag.clone()),
            Box::new(EndpointCollector::new(store, connections)),
        ] {
            registry.register(c).expect("unique metric names");
        }
        Arc::new(Self {
            registry,
            calls,
            route_calls,
            policy_rejected,
            duration,
            istio_requests,
            istio_duration,
            istio_request_messages,
            istio_response_messages,
            handles: RwLock::new(HashMap::new()),
            active_calls,
            client_connections,
            client_connection_errors,
            client_stream_errors,
            config_reloads,
            config_restart_required,
            methods: RwLock::new(HashMap::new()),
            max_methods: AtomicUsize::new(max_methods),
            discovery_lag,
        })
    }

    /// Registers a metric another layer keeps (the call layer's retry, fault and circuit
    /// breaker counters). A second metric of the same name is not exported.
    pub fn register(&self, c: Box<dyn Collector>) {
        if let Err(e) = self.registry.register(c) {
            tracing::debug!(error = %e, "metric not registered");
        }
    }

    /// Distinct method labels per service from now on (`limits.max_methods_per_service`, on a
    /// reload); methods already labelled keep their label.
    pub fn set_max_methods(&self, max: usize) {
        self.max_methods.store(max, Relaxed);
    }

    /// The sections of the configuration file whose change waits for a restart.
    pub fn restart_required(&self) -> Vec<&'static str> {
        Section::ALL
            .into_iter()
            .filter(|s| {
                !s.live()
                    && self
                        .config_restart_required
                        .with_label_values(&[s.name()])
                        .get()
                        != 0
            })
            .map(Section::name)
            .collect()
    }

    /// Marks the traffic policy objects refused now (kind, `namespace/name`): each 1, the
    /// others gone.
    pub fn set_policy_rejected<'a>(&self, refused: impl Iterator<Item = (&'a str, String)>) {
        self.policy_rejected.reset();
        for (kind, name) in refused {
            self.policy_rejected
                .with_label_values(&[kind, &name])
                .set(1);
        }
    }

    /// Records a finished call: its service (if one was resolved), `:path`, final gRPC status
    /// (or `reset`), duration, gRPC messages (request, response), and where a route sent it.
    pub fn record_call(
        &self,
        service: Option<&Service>,
        path: &str,
        grpc_status: &str,
        took: Duration,
        messages: (u64, u64),
        to: RouteLabels<'_>,
    ) {
        let name = service.map_or("unknown", |s| &*s.name);
        let method = self.method_label(name, path);
        let h = self.handles(service, name, method, grpc_status, to);
        if let Some(r) = &h.route_calls {
            r.inc();
        }
        h.calls.inc();
        h.duration.observe(took.as_secs_f64());
        h.istio_requests.inc();
        h.istio_duration.observe(took.as_secs_f64() * 1000.0);
        h.istio_request_messages.inc_by(messages.0);
        h.istio_response_messages.inc_by(messages.1);
    }

    fn handles(
        &self,
        service: Option<&Service>,
        name: &str,
        method: &str,
        status: &str,
        to: RouteLabels<'_>,
    ) -> Arc<CallHandles> {
        thread_local! {
            static KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        KEY.with_borrow_mut(|key| {
            key.clear();
            let dest_name = to.destination.map_or("", |d| &*d.name);
            for part in [
                name, "\0", method, "\0", status, "\0", to.route, "\0", dest_name, "\0", to.subset,
            ] {
                key.push_str(part);
            }
            if let Some(h) = self
                .handles
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(key.as_str())
            {
                return h.clone();
            }
            let (dest, dest_svc_name, dest_ns) = match to.destination {
                Some(d) => istio_destination(Some(d), &d.name),
                None => istio_destination(service, name),
            };
            let version = if to.subset.is_empty() {
                "unknown"
            } else {
                to.subset
            };
            let istio = [
                "source",
                "unknown",
                "unknown",
                &dest,
                &dest_svc_name,
                &dest_ns,
                "unknown",
                version,
                "grpc",
                "200",
                status,
                "-",
                "unknown",
            ];
            let route_calls = (!to.route.is_empty()).then(|| {
                let dest_name = if dest_name.is_empty() {
                    name
                } else {
                    dest_name
                };
                self.route_calls
                    .with_label_values(&[name, to.route, dest_name, to.subset, status])
            });
            let h = Arc::new(CallHandles {
                route_calls,
                calls: self.calls.with_label_values(&[name, method, status]),
                duration: self.duration.with_label_values(&[name, method]),
                istio_requests: self.istio_requests.with_label_values(&istio),
                istio_duration: self.istio_duration.with_label_values(&istio),
                istio_request_messages: self.istio_request_messages.with_label_values(&istio),
                istio_response_messages: self.istio_response_messages.with_label_values(&istio),
            });
            self.handles
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.clone(), h.clone());
            h
        })
    }

    fn method_label<'a>(&self, service: &str, path: &'a str) -> &'a str {
        {
            let methods = self.methods.read().unwrap_or_else(|p| p.into_inner());
            if let Some(set) = methods.get(service) {
                if set.contains(path) {
                    return path;
                }
                if set.len() >= self.max_methods.load(Relaxed) {
                    return "other";
                }
            }
        }
        let mut methods = self.methods.write().unwrap_or_else(|p| p.into_inner());
        let set = methods.entry(service.to_string()).or_default();
        if set.len() < self.max_methods.load(Relaxed) {
            set.insert(path.to_string());
            path
        } else {
            "other"
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encoding to memory");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

/// Where a route sent a call, for its metrics: empty for a call no route took.
#[derive(Clone, Copy, Debug, Default)]
pub struct RouteLabels<'a> {
    /// The route's name; empty: no route took the call.
    pub route: &'a str,
    /// The service the call was sent to (a route may send it to another than the one called);
    /// `None`: the one called.
    pub destination: Option<&'a Service>,
    /// The subset of its endpoints (Istio's `destination_version`); empty: all of them.
    pub subset: &'a str,
}

/// `balancer_route_calls_total`'s labels.
const ROUTE_LABELS: [&str; 5] = [
    "service",
    "route",
    "destination_service",
    "destination_subset",
    "grpc_status",
];

/// Metric handles of one (service, method, status, route, destination, subset).
struct CallHandles {
    route_calls: Option<IntCounter>,
    calls: IntCounter,
    duration: Histogram,
    istio_requests: IntCounter,
    istio_duration: Histogram,
    istio_request_messages: IntCounter,
    istio_response_messages: IntCounter,
}

/// Istio's standard label names, in the order `handles` fills them.
const ISTIO_LABELS: [&str; 13] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_workload",
    "destination_version",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

/// Istio's `destination_service` (the FQDN), `destination_service_name` and
/// `destination_service_namespace`, from the service's cluster-local authority when it has one.
fn istio_destination(service: Option<&Service>, name: &str) -> (String, String, String) {
    let fqdn = service.and_then(|s| {
        s.spec
            .authorities
            .iter()
            .find(|a| a.contains(".svc."))
            .map(|a| a.split(':').next().unwrap_or(a).to_string())
    });
    match fqdn {
        Some(fqdn) => {
            let mut parts = fqdn.split('.');
            let n = parts.next().unwrap_or(name).to_string();
            let ns = parts.next().unwrap_or("unknown").to_string();
            (fqdn, n, ns)
        }
        None => (name.to_string(), name.to_string(), "unknown".to_string()),
    }
}

/// Reads per-endpoint figures from the store (and the relay's pools) at scrape time.
struct EndpointCollector {
    store: Arc<Store>,
    connections: EndpointConnections,
    descs: Vec<Desc>,
}

const ENDPOINT_LABELS: [&str; 2] = ["service", "endpoint"];

impl EndpointCollector {
    fn new(store: Arc<Store>, connections: EndpointConnections) -> Self {
        let descs = Self::families()
            .iter()
            .map(|(name, help)| {
                Desc::new(
                    name.to_string(),
                    help.to_string(),
                    ENDPOINT_LABELS.iter().map(|l| l.to_string()).collect(),
                    HashMap::new(),
                )
                .expect("valid desc")
            })
            .collect();
        Self {
            store,
            connections,
            descs,
        }
    }

    fn families() -> [(&'static str, &'static str); 8] {
        [
            (
                "balancer_endpoint_in_flight",
                "Calls in flight on an endpoint.",
            ),
            (
                "balancer_endpoint_ewma_seconds",
                "Peak-EWMA latency estimate of an endpoint.",
            ),
            (
                "balancer_endpoint_calls",
                "Calls sent to an endpoint since it appeared.",
            ),
            (
                "balancer_endpoint_failures",
                "Calls that failed on an endpoint before an answer.",
            ),
            (
                "balancer_endpoint_connections",
                "Pooled HTTP/2 connections to an endpoint.",
            ),
            (
                "balancer_endpoint_ejected",
                "1 while outlier detection keeps an endpoint out of the balancer, else 0.",
            ),
            (
                "balancer_endpoint_ejections",
                "Times outlier detection ejected an endpoint since it appeared.",
            ),
            (
                "balancer_endpoint_healthy",
                "0 while an endpoint's active health check says NOT_SERVING (or keeps failing), \
                 else 1.",
            ),
        ]
    }
}

impl Collector for EndpointCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let snapshot = self.store.snapshot();
        let mut gauges: Vec<prometheus::GaugeVec> = Self::families()
            .iter()
            .map(|(n, h)| {
                prometheus::GaugeVec::new(Opts::new(*n, *h), &ENDPOINT_LABELS).expect("valid")
            })
            .collect();
        for service in snapshot.services.values() {
            for e in &service.endpoints {
                let ep = &e.endpoint;
                let addr = ep.addr.to_string();
                let labels = [service.spec.name.as_str(), addr.as_str()];
                let s = &ep.stats;
                let values = [
                    f64::from(s.in_flight.load(Relaxed)),
                    s.ewma().as_secs_f64(),
                    s.calls.load(Relaxed) as f64,
                    s.failures.load(Relaxed) as f64,
                    (self.connections)(ep) as f64,
                    f64::from(u8::from(s.ejected())),
                    s.ejections.load(Relaxed) as f64,
                    f64::from(u8::from(s.health() != crate::balance::Health::NotServing)),
                ];
                for (g, v) in gauges.iter_mut().zip(values) {
                    g.with_label_values(&labels).set(v);
                }
            }
        }
        gauges.iter().flat_map(|g| g.collect()).collect()
    }
}
