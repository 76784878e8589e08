//! Circuit breaking and the other per-service resilience settings (Istio `DestinationRule`
//! `connectionPool` and `outlierDetection`, the file's `routes[].connection_pool`,
//! `outlier_detection` and `retry_budget`), and the live counters they are checked against.
//!
//! A service's limits are checked where a call would pass them, and a call over one fails at
//! once, in the proxy, with RESOURCE_EXHAUSTED and a `grpc-message` that names the limit; each
//! such overflow is counted in `balancer_circuit_breaker_overflows_total{service,limit}`:
//!
//! | limit | checked | Istio |
//! | --- | --- | --- |
//! | `max_requests` | calls in flight to the service, at admission | `http.http2MaxRequests` |
//! | `max_pending_requests` | calls waiting for an endpoint connection | `http.http1MaxPendingRequests` |
//! | `max_retries` | calls retrying at once (no retry beyond: the call fails as it is) | `http.maxRetries` |
//! | `max_connections` | connections per endpoint (each worker's pool) | `tcp.maxConnections` |
//!
//! Istio answers an overflow with HTTP 503, which a gRPC client reads as UNAVAILABLE; the
//! agent answers RESOURCE_EXHAUSTED, the gRPC status for a limit the caller hit, which a
//! client does not confuse with a dead service (and which the issue asks for).
//!
//! The counters are the agent's own (per node, as Envoy's are per proxy), kept per service id
//! for as long as the agent runs, across policy and endpoint changes: a call counted in
//! flight when a policy changes is still counted out when it ends.
#![forbid(unsafe_code)]

use std::{
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering::Relaxed},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use foldhash::{HashMap, HashMapExt};
use prometheus::{IntCounterVec, Opts};
use serde::{Serialize, Serializer};

use super::{
    grpc::Status,
    retry::{BudgetWindow, RetryBudget},
};
use crate::{balance::FailurePolicy, metrics::Metrics};

/// A service's connection pool limits. `None`: the node-wide setting (`pool`, `limits`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConnectionPool {
    /// Calls in flight to the service at most (Istio `http2MaxRequests`).
    pub max_requests: Option<u32>,
    /// Calls waiting for an endpoint connection at most (Istio `http1MaxPendingRequests`).
    pub max_pending_requests: Option<u32>,
    /// Calls retrying at once at most (Istio `maxRetries`).
    pub max_retries: Option<u32>,
    /// Connections per endpoint at most, in each worker's pool (Istio `tcp.maxConnections`;
    /// `pool.max_connections_per_endpoint`).
    pub max_connections: Option<u32>,
    /// Calls a connection carries before it is retired (Istio `maxRequestsPerConnection`;
    /// `pool.max_calls_per_connection`).
    pub max_requests_per_connection: Option<u64>,
    /// TCP connect plus HTTP/2 handshake timeout (Istio `tcp.connectTimeout`;
    /// `pool.connect_timeout_ms`).
    #[serde(serialize_with = "millis_opt")]
    pub connect_timeout: Option<Duration>,
    /// A connection without calls this long is closed (Istio `idleTimeout`;
    /// `pool.idle_timeout_ms`).
    #[serde(serialize_with = "millis_opt")]
    pub idle_timeout: Option<Duration>,
    /// A connection older than this takes no new calls (Istio `tcp.maxConnectionDuration`;
    /// `pool.max_connection_age_ms`).
    #[serde(serialize_with = "millis_opt")]
    pub max_connection_age: Option<Duration>,
}

impl ConnectionPool {
    /// Settings of the endpoint pools (connections, calls per connection, timeouts), as
    /// opposed to the limits the call layer checks itself.
    pub fn pool_settings(&self) -> bool {
        self.max_connections.is_some()
            || self.max_requests_per_connection.is_some()
            || self.connect_timeout.is_some()
            || self.idle_timeout.is_some()
            || self.max_connection_age.is_some()
    }

    /// `pool` with this service's settings over it.
    pub fn over(&self, pool: &crate::config::PoolConfig) -> crate::config::PoolConfig {
        let mut p = pool.clone();
        if let Some(n) = self.max_connections {
            p.max_connections_per_endpoint = n.max(1) as usize;
        }
        if let Some(n) = self.max_requests_per_connection {
            p.max_calls_per_connection = n;
        }
        if let Some(t) = self.connect_timeout {
            p.connect_timeout = t;
        }
        if let Some(t) = self.idle_timeout {
            p.idle_timeout = t;
        }
        if let Some(t) = self.max_connection_age {
            p.max_connection_age = t;
        }
        p
    }
}

fn millis_opt<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&format!("{}ms", d.as_millis())),
        None => s.serialize_none(),
    }
}

/// Which gRPC statuses count as an endpoint's failure for outlier detection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureCodes {
    /// Those that say the server is broken: UNKNOWN, INTERNAL, UNAVAILABLE, DATA_LOSS (the
    /// node-wide default; Istio `consecutive5xxErrors`, for which Envoy maps these to 500 and
    /// 503).
    #[default]
    ServerErrors,
    /// UNAVAILABLE only, and lost connections (Istio `consecutiveGatewayErrors`: 502-504).
    GatewayErrors,
}

impl FailureCodes {
    /// A `grpc-status` value counts as a failure of the endpoint.
    pub fn is_failure(self, status: &[u8]) -> bool {
        match self {
            Self::ServerErrors => crate::balance::is_endpoint_failure(Some(status)),
            Self::GatewayErrors => status == b"14",
        }
    }
}

/// A service's outlier detection, over the node-wide one (`pool.outlier_detection`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct OutlierDetection {
    /// Calls in a row that must fail to eject an endpoint; 0 disables.
    pub consecutive_errors: u32,
    /// The statuses that count as failures.
    pub codes: FailureCodes,
    /// Istio's sweep `interval`: kept and shown. The agent needs none: an endpoint is ejected
    /// by the failure that crosses the threshold, and readmitted when its time is up.
    #[serde(serialize_with = "millis_opt")]
    pub interval: Option<Duration>,
    /// How long the first ejection lasts; each one in a row doubles it.
    #[serde(serialize_with = "millis_opt")]
    pub base_ejection: Option<Duration>,
    /// At most this share of the service's endpoints ejected at once, percent: a failure
    /// that would eject one more ejects none (Envoy's rule: with Istio's default of 10%, a
    /// service of fewer than ten endpoints has none ejected).
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_errors: 5,
            codes: FailureCodes::default(),
            interval: None,
            base_ejection: None,
            max_ejection_percent: 100,
        }
    }
}

impl OutlierDetection {
    /// `node`'s policy (the store's, from `pool`) with this service's settings over it.
    pub fn over(&self, node: FailurePolicy) -> FailurePolicy {
        let base = self.base_ejection.unwrap_or(node.base_ejection);
        FailurePolicy {
            consecutive_failures: self.consecutive_errors,
            base_ejection: base,
            max_ejection: node.max_ejection.max(base),
            ..node
        }
    }
}

/// Everything about a service's resilience a policy may set; `None`: the node-wide default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Resilience {
    /// Circuit breaker and pool limits.
    pub connection_pool: Option<ConnectionPool>,
    /// Ejection of endpoints that keep failing.
    pub outlier_detection: Option<OutlierDetection>,
    /// What retries may add to the calls (default: [`RetryBudget::default`]).
    pub retry_budget: Option<RetryBudget>,
}

impl Resilience {
    /// Nothing set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The retry budget in force.
    pub fn budget(&self) -> RetryBudget {
        self.retry_budget.unwrap_or_default()
    }

    /// The limit on retries in flight, if any.
    pub fn max_retries(&self) -> Option<u32> {
        self.connection_pool.and_then(|p| p.max_retries)
    }
}

impl fmt::Display for Resilience {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(p) = &self.connection_pool {
            let mut limits = Vec::new();
            let mut add = |name: &str, v: Option<String>| {
                if let Some(v) = v {
                    limits.push(format!("{name} {v}"));
                }
            };
            let ms = |d: Option<Duration>| d.map(|d| format!("{} ms", d.as_millis()));
            add("max_requests", p.max_requests.map(|n| n.to_string()));
            add(
                "max_pending_requests",
                p.max_pending_requests.map(|n| n.to_string()),
            );
            add("max_retries", p.max_retries.map(|n| n.to_string()));
            add("max_connections", p.max_connections.map(|n| n.to_string()));
            add(
                "max_requests_per_connection",
                p.max_requests_per_connection.map(|n| n.to_string()),
            );
            add("connect_timeout", ms(p.connect_timeout));
            add("idle_timeout", ms(p.idle_timeout));
            add("max_connection_age", ms(p.max_connection_age));
            parts.push(format!("circuit breaker: {}", limits.join(", ")));
        }
        if let Some(o) = &self.outlier_detection {
            parts.push(format!(
                "outlier detection: {} errors in a row ({:?}), ejection {} ms, at most {}%",
                o.consecutive_errors,
                o.codes,
                o.base_ejection.map_or(0, |d| d.as_millis()),
                o.max_ejection_percent
            ));
        }
        if let Some(b) = &self.retry_budget {
            parts.push(format!("retry budget: {b}"));
        }
        f.write_str(&parts.join("; "))
    }
}

/// A limit a call went over: the `limit` label of the overflow metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// Calls in flight.
    MaxRequests,
    /// Calls waiting for a connection.
    MaxPendingRequests,
    /// Retries in flight.
    MaxRetries,
}

impl Limit {
    /// The metric label, and the field's name.
    pub fn label(self) -> &'static str {
        match self {
            Self::MaxRequests => "max_requests",
            Self::MaxPendingRequests => "max_pending_requests",
            Self::MaxRetries => "max_retries",
        }
    }

    fn istio(self) -> &'static str {
        match self {
            Self::MaxRequests => "http2MaxRequests",
            Self::MaxPendingRequests => "http1MaxPendingRequests",
            Self::MaxRetries => "maxRetries",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Self::MaxRequests => "calls in flight",
            Self::MaxPendingRequests => "calls waiting for an endpoint connection",
            Self::MaxRetries => "calls retrying",
        }
    }
}

/// The live counters of one service.
#[derive(Debug, Default)]
pub struct ServiceState {
    in_flight: AtomicU32,
    pending: AtomicU32,
    retries: AtomicU32,
    /// Calls and retries counted for its retry budget.
    pub budget: BudgetWindow,
}

impl ServiceState {
    /// Calls in flight, waiting for a connection, retrying.
    pub fn counts(&self) -> (u32, u32, u32) {
        (
            self.in_flight.load(Relaxed),
            self.pending.load(Relaxed),
            self.retries.load(Relaxed),
        )
    }

    /// Adds one to `counter` unless it is at `max` already.
    fn acquire(counter: &AtomicU32, max: Option<u32>) -> bool {
        match max {
            None => {
                counter.fetch_add(1, Relaxed);
                true
            }
            Some(max) => counter
                .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
                .is_ok(),
        }
    }

    pub(super) fn acquire_retry(&self, max: Option<u32>) -> bool {
        Self::acquire(&self.retries, max)
    }

    pub(super) fn release_retry(&self) {
        self.retries.fetch_sub(1, Relaxed);
    }
}

/// A call counted in flight to its service; counted out when dropped.
#[derive(Debug)]
pub struct InFlight(Arc<ServiceState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// A call counted as waiting for an endpoint connection; counted out when dropped.
#[derive(Debug)]
pub struct Pending(Arc<ServiceState>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Relaxed);
    }
}

/// Every service's counters, and the metrics of retries, faults and overflows.
pub struct Registry {
    /// By service id; copied on write (a service's first call with a policy), read without a
    /// lock by every call that needs its service's counters.
    states: ArcSwap<HashMap<u32, Arc<ServiceState>>>,
    adding: Mutex<()>,
    overflows: IntCounterVec,
    /// Retries made: `balancer_call_retries_total{service,route,condition}`.
    pub retries: IntCounterVec,
    /// Calls whose failure their policy retries, not retried:
    /// `balancer_calls_not_retried_total{service,route,reason}`.
    pub not_retried: IntCounterVec,
    /// Faults injected: `balancer_faults_injected_total{service,route,kind}`.
    pub faults: IntCounterVec,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    /// Counters for every service, their metrics registered in `metrics`.
    pub fn new(metrics: &Metrics) -> Self {
        let vec = |name: &str, help: &str, labels: &[&str]| {
            let v = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            metrics.register(Box::new(v.clone()));
            v
        };
        Self {
            states: ArcSwap::from_pointee(HashMap::new()),
            adding: Mutex::new(()),
            overflows: vec(
                "balancer_circuit_breaker_overflows_total",
                "Calls failed at once, or not retried, because their service was at a circuit \
                 breaker limit, by service and limit.",
                &["service", "limit"],
            ),
            retries: vec(
                "balancer_call_retries_total",
                "Attempts after the first made by a route's retry policy, by service, route \
                 and the condition retried.",
                &["service", "route", "condition"],
            ),
            not_retried: vec(
                "balancer_calls_not_retried_total",
                "Calls whose failure their route retries that were not retried, by service, \
                 route and why (response_started, request_too_large, request_trailers, \
                 attempts_exhausted, pushback, deadline, max_retries, budget_exhausted).",
                &["service", "route", "reason"],
            ),
            faults: vec(
                "balancer_faults_injected_total",
                "Faults a route injected, by service, route and kind (delay, abort).",
                &["service", "route", "kind"],
            ),
        }
    }

    /// The counters of service `id`.
    pub fn state(&self, id: u32) -> Arc<ServiceState> {
        self.with_state(id, Arc::clone)
    }

    /// `f` of the counters of service `id` (made on first use), without taking a reference.
    pub fn with_state<T>(&self, id: u32, f: impl FnOnce(&Arc<ServiceState>) -> T) -> T {
        if let Some(s) = self.states.load().get(&id) {
            return f(s);
        }
        let _adding = self.adding.lock().unwrap_or_else(|p| p.into_inner());
        let mut states = HashMap::clone(&self.states.load());
        let s = states.entry(id).or_default().clone();
        self.states.store(Arc::new(states));
        f(&s)
    }

    /// The counters of service `id`, if it has any.
    pub fn existing(&self, id: u32) -> Option<Arc<ServiceState>> {
        self.states.load().get(&id).cloned()
    }

    /// Counts an overflow of `limit` of `service`.
    pub fn overflowed(&self, service: &str, limit: Limit) {
        self.overflows
            .with_label_values(&[service, limit.label()])
            .inc();
    }

    /// Counts a call in flight to `service` (id `id`) unless it has `max` already: the
    /// answer for a call over the limit names it.
    pub fn admit(&self, id: u32, service: &str, max: Option<u32>) -> Result<InFlight, Status> {
        let state = self.state(id);
        if ServiceState::acquire(&state.in_flight, max) {
            return Ok(InFlight(state));
        }
        Err(self.overflow(service, Limit::MaxRequests, max.unwrap_or(0)))
    }

    /// Counts a call of `service` (id `id`) as waiting for a connection unless `max` are.
    pub fn pending(&self, id: u32, service: &str, max: u32) -> Result<Pending, Status> {
        let state = self.state(id);
        if ServiceState::acquire(&state.pending, Some(max)) {
            return Ok(Pending(state));
        }
        Err(self.overflow(service, Limit::MaxPendingRequests, max))
    }

    /// Counts the overflow and words the answer.
    fn overflow(&self, service: &str, limit: Limit, max: u32) -> Status {
        self.overflowed(service, limit);
        Status::exhausted(format!(
            "service {service}: circuit breaker open: {max} {} already, the limit \
             (connection_pool.{}, Istio DestinationRule {})",
            limit.what(),
            limit.label(),
            limit.istio()
        ))
    }
}

/// A service's resilience settings from the file's `routes[]` entry (checked by `config`).
pub fn from_config(r: &crate::config::RoutesConfig) -> Resilience {
    let ms = |v: Option<u64>| v.map(Duration::from_millis);
    Resilience {
        connection_pool: r.connection_pool.as_ref().map(|c| ConnectionPool {
            max_requests: c.max_requests,
            max_pending_requests: c.max_pending_requests,
            max_retries: c.max_retries,
            max_connections: c.max_connections,
            max_requests_per_connection: c.max_requests_per_connection,
            connect_timeout: ms(c.connect_timeout_ms),
            idle_timeout: ms(c.idle_timeout_ms),
            max_connection_age: ms(c.max_connection_age_ms),
        }),
        outlier_detection: r.outlier_detection.as_ref().map(|o| OutlierDetection {
            consecutive_errors: o.consecutive_errors,
            codes: if o.errors == "gateway" {
                FailureCodes::GatewayErrors
            } else {
                FailureCodes::ServerErrors
            },
            interval: (o.interval_ms > 0).then(|| Duration::from_millis(o.interval_ms)),
            base_ejection: ms(o.base_ejection_ms),
            max_ejection_percent: o.max_ejection_percent.min(100),
        }),
        retry_budget: r
            .retry_budget
            .as_ref()
            .map(super::retry::budget_from_config),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{call::grpc::Code, config::PoolConfig, state::Store};

    fn registry() -> (Registry, Arc<Metrics>) {
        let metrics = Metrics::new(Store::new(PoolConfig::default()), 10);
        (Registry::new(&metrics), metrics)
    }

    #[test]
    fn a_limit_trips_exactly_at_its_value_and_recovers() {
        let (r, metrics) = registry();
        let held: Vec<_> = (0..3)
            .map(|_| r.admit(7, "greeter", Some(3)).unwrap())
            .collect();
        let over = r.admit(7, "greeter", Some(3)).unwrap_err();
        assert_eq!(over.code, Code::ResourceExhausted);
        assert!(
            over.message.contains("connection_pool.max_requests")
                && over.message.contains("http2MaxRequests"),
            "{}",
            over.message
        );
        assert_eq!(r.state(7).counts().0, 3);
        drop(held);
        assert_eq!(r.state(7).counts().0, 0);
        let again = r.admit(7, "greeter", Some(3)).unwrap();
        // Another service has its own counters; no limit counts without refusing.
        let others: Vec<_> = (0..10)
            .map(|_| r.admit(8, "other", None).unwrap())
            .collect();
        assert_eq!(r.state(8).counts().0, 10);
        drop((again, others));
        let p = r.pending(7, "greeter", 1).unwrap();
        assert!(r.pending(7, "greeter", 1).is_err());
        drop(p);
        assert!(r.pending(7, "greeter", 1).is_ok());
        let text = metrics.render();
        for limit in ["max_requests", "max_pending_requests"] {
            let line = format!(
                r#"balancer_circuit_breaker_overflows_total{{limit="{limit}",service="greeter"}} 1"#
            );
            assert!(text.contains(&line), "{line} in {text}");
        }
    }

    #[test]
    fn pool_settings_go_over_the_node_wide_ones() {
        let node = PoolConfig::default();
        let cp = ConnectionPool {
            max_connections: Some(2),
            max_requests_per_connection: Some(100),
            connect_timeout: Some(Duration::from_millis(250)),
            ..ConnectionPool::default()
        };
        assert!(cp.pool_settings());
        let p = cp.over(&node);
        assert_eq!(p.max_connections_per_endpoint, 2);
        assert_eq!(p.max_calls_per_connection, 100);
        assert_eq!(p.connect_timeout, Duration::from_millis(250));
        assert_eq!(p.idle_timeout, node.idle_timeout);
        let limits_only = ConnectionPool {
            max_requests: Some(1),
            ..ConnectionPool::default()
        };
        assert!(!limits_only.pool_settings());
    }

    #[test]
    fn outlier_detection_goes_over_the_node_wide_policy() {
        let node = FailurePolicy::from_config(&PoolConfig::default());
        let o = OutlierDetection {
            consecutive_errors: 2,
            base_ejection: Some(Duration::from_secs(30)),
            ..OutlierDetection::default()
        };
        let p = o.over(node);
        assert_eq!(p.consecutive_failures, 2);
        assert_eq!(p.base_ejection, Duration::from_secs(30));
        assert!(p.max_ejection >= p.base_ejection);
        assert_eq!(p.connect_backoff, node.connect_backoff);
    }
}
