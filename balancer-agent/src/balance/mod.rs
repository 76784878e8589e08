//! Per-call endpoint choice.
//!
//! A [`Balancer`] is built for each snapshot of a service (the store, `state`, builds them):
//! an immutable list of the [`Endpoint`]s that take new calls. Picking reads only atomics and one short per-endpoint
//! lock (the EWMA); it never blocks on the control plane.
//!
//! - [`Policy::P2cEwma`] (default): two endpoints drawn at random, the one with the lower
//!   `peak-EWMA latency × (pending + 1)` wins. "Pending" counts calls that have not yet seen
//!   their first response byte, as linkerd does, so a slow endpoint's cost rises at once.
//! - [`Policy::LeastRequest`]: the fewest calls in flight (a full scan for small sets, two
//!   random choices for large ones, as Envoy does).
//! - [`Policy::RoundRobin`]: each endpoint in turn.
//!
//! Endpoints that refused a connection recently are skipped while others remain, and a call
//! that must retry passes the endpoints it already tried in `avoid`.
//!
//! Outlier detection (linkerd's "failure accrual", Envoy's consecutive gateway failures): an
//! endpoint whose last [`FailurePolicy::consecutive_failures`] calls failed (a transport
//! failure, or a gRPC status that says the server is broken: UNKNOWN, INTERNAL, UNAVAILABLE,
//! DATA_LOSS) is ejected for a while that doubles with each ejection in a row. Once the time
//! is up it takes calls again, and its first failure ejects it at once (half-open); its first
//! success clears the record. Without that, a pod failing fast would look like the fastest
//! pod to peak-EWMA and draw ever more calls. If every endpoint is ejected or backing off,
//! calls still go to one of them rather than fail in the proxy.
#![forbid(unsafe_code)]

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::time::Instant;

pub use crate::config::Policy;
use crate::config::PoolConfig;

/// How fast old latency observations fade (linkerd's default decay).
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// The latency assumed for an endpoint that has not answered yet.
const DEFAULT_RTT: Duration = Duration::from_millis(1);

/// An endpoint as the balancer sees it: its address and its live figures. The store keeps one
/// per address and hands the same `Arc` to every snapshot that lists it, so the figures survive
/// configuration changes; calls in flight keep it alive after it is removed. It holds no
/// connection: the relay keeps its pool (`relay::up::Pools`), by address.
#[derive(Debug)]
pub struct Endpoint {
    /// IP:port.
    pub addr: SocketAddr,
    /// Live figures.
    pub stats: EndpointStats,
}

impl Endpoint {
    /// A new endpoint with fresh figures.
    pub fn new(addr: SocketAddr) -> Arc<Self> {
        Arc::new(Self {
            addr,
            stats: EndpointStats::default(),
        })
    }
}

/// Live figures of one endpoint, shared by every snapshot that contains it.
#[derive(Debug)]
pub struct EndpointStats {
    /// Calls from pick until the call ends.
    pub in_flight: AtomicU32,
    /// Calls from pick until their first response byte (or their end).
    pub pending: AtomicU32,
    /// Calls picked for this endpoint.
    pub calls: AtomicU64,
    /// Calls that failed on this endpoint before an answer (connect or transport failure).
    pub failures: AtomicU64,
    /// When this endpoint last refused a connection, as ms since `epoch`; 0 for never.
    last_failure_ms: AtomicU64,
    /// Calls in a row that failed (outlier detection).
    consecutive_failures: AtomicU32,
    /// Ejections in a row (no success in between): the next one lasts twice as long.
    ejections_in_a_row: AtomicU32,
    /// Until when the endpoint is ejected, as ms since `epoch`; 0 for never.
    ejected_until_ms: AtomicU64,
    /// Times the endpoint was ejected since it appeared.
    pub ejections: AtomicU64,
    ewma: Mutex<PeakEwma>,
    epoch: Instant,
}

impl Default for EndpointStats {
    fn default() -> Self {
        let now = Instant::now();
        Self {
            in_flight: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_failure_ms: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections_in_a_row: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            ewma: Mutex::new(PeakEwma::new(now)),
            epoch: now,
        }
    }
}

impl EndpointStats {
    /// The current peak-EWMA latency estimate.
    pub fn ewma(&self) -> Duration {
        let now = Instant::now();
        let e = self.ewma.lock().unwrap_or_else(|p| p.into_inner());
        Duration::from_nanos(e.decayed(now) as u64)
    }

    fn cost(&self, now: Instant) -> f64 {
        let rtt = self
            .ewma
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .decayed(now);
        rtt * f64::from(self.pending.load(Relaxed) + 1)
    }

    /// Records that a connection to the endpoint failed.
    pub fn connect_failed(&self) {
        self.failures.fetch_add(1, Relaxed);
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_failure_ms.store(ms.max(1), Relaxed);
    }

    /// Whether the endpoint refused a connection less than `backoff` ago.
    pub fn backing_off(&self, backoff: Duration) -> bool {
        let at = self.last_failure_ms.load(Relaxed);
        at != 0 && self.now_ms() < at + backoff.as_millis() as u64
    }

    /// Whether outlier detection ejected the endpoint and its time is not up. Reads the clock
    /// only for an endpoint that was ever ejected (this runs for every candidate of a pick).
    pub fn ejected(&self) -> bool {
        let until = self.ejected_until_ms.load(Relaxed);
        until != 0 && self.now_ms() < until
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Records how a call on this endpoint ended, for outlier detection.
    fn record(&self, failed: bool, policy: &FailurePolicy) {
        if !failed {
            if self.consecutive_failures.load(Relaxed) != 0 {
                self.consecutive_failures.store(0, Relaxed);
            }
            if self.ejections_in_a_row.load(Relaxed) != 0 {
                self.ejections_in_a_row.store(0, Relaxed);
            }
            return;
        }
        let threshold = policy.consecutive_failures;
        let failures = self.consecutive_failures.fetch_add(1, Relaxed) + 1;
        if threshold == 0 || failures < threshold || self.ejected() {
            return;
        }
        let n = self.ejections_in_a_row.fetch_add(1, Relaxed).min(16);
        let time = policy
            .base_ejection
            .saturating_mul(1 << n)
            .min(policy.max_ejection.max(policy.base_ejection));
        self.ejected_until_ms
            .store(self.now_ms() + time.as_millis() as u64, Relaxed);
        self.ejections.fetch_add(1, Relaxed);
        // Half-open: once readmitted, one more failure ejects it again.
        self.consecutive_failures.store(threshold - 1, Relaxed);
    }
}

/// How the balancer treats endpoints that fail.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FailurePolicy {
    /// An endpoint that refused a connection is skipped this long.
    pub connect_backoff: Duration,
    /// Calls in a row that must fail to eject an endpoint; 0 disables outlier detection.
    pub consecutive_failures: u32,
    /// How long the first ejection lasts; each one in a row doubles it.
    pub base_ejection: Duration,
    /// The longest ejection.
    pub max_ejection: Duration,
}

impl FailurePolicy {
    /// From the `pool` section of the configuration.
    pub fn from_config(pool: &PoolConfig) -> Self {
        let o = &pool.outlier_detection;
        Self {
            connect_backoff: pool.failure_backoff,
            consecutive_failures: o.consecutive_failures,
            base_ejection: o.base_ejection,
            max_ejection: o.max_ejection,
        }
    }
}

/// Whether a gRPC status from an endpoint says the endpoint is broken (not that the call was
/// wrong): UNKNOWN (2), INTERNAL (13), UNAVAILABLE (14), DATA_LOSS (15). An answer without a
/// status (HTTP/2 that is not gRPC) is not counted against the endpoint.
pub fn is_endpoint_failure(grpc_status: Option<&[u8]>) -> bool {
    matches!(grpc_status, Some(b"2" | b"13" | b"14" | b"15"))
}

/// Peak-sensitive EWMA of latency: a slower observation replaces the estimate at once, faster
/// ones pull it down with weight `exp(-elapsed/decay)`, and reads decay it toward zero so an
/// endpoint that was slow once is tried again after a while.
#[derive(Debug)]
struct PeakEwma {
    rtt_ns: f64,
    stamp: Instant,
}

impl PeakEwma {
    fn new(now: Instant) -> Self {
        Self {
            rtt_ns: DEFAULT_RTT.as_nanos() as f64,
            stamp: now,
        }
    }

    fn weight(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.stamp).as_secs_f64();
        (-elapsed / EWMA_DECAY.as_secs_f64()).exp()
    }

    fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        if rtt > self.rtt_ns {
            self.rtt_ns = rtt;
        } else {
            let w = self.weight(now);
            self.rtt_ns = self.rtt_ns * w + rtt * (1.0 - w);
        }
        self.stamp = now;
    }

    fn decayed(&self, now: Instant) -> f64 {
        self.rtt_ns * self.weight(now)
    }
}

/// The endpoints of one service snapshot that take new calls, and how to choose among them.
#[derive(Debug)]
pub struct Balancer {
    policy: Policy,
    ready: Vec<Arc<Endpoint>>,
    next: AtomicUsize,
    failures: FailurePolicy,
}

impl Balancer {
    /// A balancer over `ready` endpoints, skipping those that `failures` says to.
    pub fn new(policy: Policy, ready: Vec<Arc<Endpoint>>, failures: FailurePolicy) -> Self {
        Self {
            policy,
            next: AtomicUsize::new(fastrand::usize(..ready.len().max(1))),
            ready,
            failures,
        }
    }

    /// The policy in use.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// The endpoints that take new calls.
    pub fn ready(&self) -> &[Arc<Endpoint>] {
        &self.ready
    }

    /// Chooses an endpoint for a call, skipping those in `avoid`. The returned guard counts the
    /// call as in flight until it is dropped.
    pub fn pick(&self, avoid: &[SocketAddr]) -> Option<CallGuard> {
        let ep = self.choose(avoid)?;
        Some(CallGuard::new(ep, self.failures))
    }

    fn choose(&self, avoid: &[SocketAddr]) -> Option<Arc<Endpoint>> {
        let n = self.ready.len();
        if n == 0 {
            return None;
        }
        let usable = |e: &Arc<Endpoint>| !avoid.contains(&e.addr);
        let healthy = |e: &Arc<Endpoint>| {
            usable(e) && !e.stats.backing_off(self.failures.connect_backoff) && !e.stats.ejected()
        };
        let chosen = match self.policy {
            Policy::RoundRobin => {
                let start = self.next.fetch_add(1, Relaxed);
                (0..n)
                    .map(|i| &self.ready[(start + i) % n])
                    .find(|e| healthy(e))
            }
            Policy::P2cEwma => {
                let now = Instant::now();
                self.p2c(|e| e.stats.cost(now), &healthy)
            }
            Policy::LeastRequest => {
                let load = |e: &Arc<Endpoint>| f64::from(e.stats.in_flight.load(Relaxed));
                if n <= 8 {
                    let start = fastrand::usize(..n);
                    (0..n)
                        .map(|i| &self.ready[(start + i) % n])
                        .filter(|e| healthy(e))
                        .min_by(|a, b| load(a).total_cmp(&load(b)))
                } else {
                    self.p2c(load, &healthy)
                }
            }
        };
        // Every healthy endpoint excluded: fall back to one that is merely backing off or
        // ejected, since a refused connection an instant ago may be accepted now, and a call
        // tried beats a call failed in the proxy.
        chosen
            .or_else(|| {
                let start = fastrand::usize(..n);
                (0..n)
                    .map(|i| &self.ready[(start + i) % n])
                    .find(|e| usable(e))
            })
            .cloned()
    }

    fn p2c(
        &self,
        cost: impl Fn(&Arc<Endpoint>) -> f64,
        healthy: &dyn Fn(&Arc<Endpoint>) -> bool,
    ) -> Option<&Arc<Endpoint>> {
        let n = self.ready.len();
        if n == 1 {
            return Some(&self.ready[0]).filter(|e| healthy(e));
        }
        let i = fastrand::usize(..n);
        let mut j = fastrand::usize(..n - 1);
        if j >= i {
            j += 1;
        }
        let (a, b) = (&self.ready[i], &self.ready[j]);
        match (healthy(a), healthy(b)) {
            (true, true) => Some(if cost(a) <= cost(b) { a } else { b }),
            (true, false) => Some(a),
            (false, true) => Some(b),
            (false, false) => {
                let start = fastrand::usize(..n);
                (0..n)
                    .map(|k| &self.ready[(start + k) % n])
                    .filter(|e| healthy(e))
                    .min_by(|x, y| cost(x).total_cmp(&cost(y)))
            }
        }
    }
}

/// A call in flight on an endpoint: counted in `in_flight` until dropped, and in `pending`
/// until [`CallGuard::first_byte`].
#[derive(Debug)]
pub struct CallGuard {
    endpoint: Arc<Endpoint>,
    start: Instant,
    pending: bool,
    failures: FailurePolicy,
}

impl CallGuard {
    fn new(endpoint: Arc<Endpoint>, failures: FailurePolicy) -> Self {
        let s = &endpoint.stats;
        s.in_flight.fetch_add(1, Relaxed);
        s.pending.fetch_add(1, Relaxed);
        s.calls.fetch_add(1, Relaxed);
        Self {
            endpoint,
            start: Instant::now(),
            pending: true,
            failures,
        }
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// The request left for the endpoint: latency is measured from here, so the time to open a
    /// pooled connection does not count against a cold endpoint.
    pub fn sent(&mut self) {
        self.start = Instant::now();
    }

    /// The endpoint answered: its latency feeds the EWMA and the call stops being pending.
    pub fn first_byte(&mut self) {
        if std::mem::take(&mut self.pending) {
            let now = Instant::now();
            let s = &self.endpoint.stats;
            s.pending.fetch_sub(1, Relaxed);
            s.ewma
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .observe(now - self.start, now);
        }
    }

    /// The endpoint answered the call with this gRPC status (`None`: it sent none).
    pub fn answered(&self, grpc_status: Option<&[u8]>) {
        self.endpoint
            .stats
            .record(is_endpoint_failure(grpc_status), &self.failures);
    }

    /// The call failed on the endpoint without an answer (its connection broke).
    pub fn failed(&self) {
        let s = &self.endpoint.stats;
        s.failures.fetch_add(1, Relaxed);
        s.record(true, &self.failures);
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let s = &self.endpoint.stats;
        if self.pending {
            s.pending.fetch_sub(1, Relaxed);
        }
        s.in_flight.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: usize) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| Endpoint::new(format!("10.0.0.{}:80", i + 1).parse().unwrap()))
            .collect()
    }

    fn backoff(connect_backoff: Duration) -> FailurePolicy {
        FailurePolicy {
            connect_backoff,
            ..FailurePolicy::from_config(&PoolConfig::default())
        }
    }

    /// A call on `e` outside any balancer.
    fn guard(e: &Arc<Endpoint>) -> CallGuard {
        CallGuard::new(e.clone(), backoff(Duration::from_secs(1)))
    }

    fn shares(b: &Balancer, calls: usize) -> Vec<usize> {
        let mut counts = vec![0; b.ready().len()];
        for _ in 0..calls {
            let g = b.pick(&[]).unwrap();
            let i = b
                .ready()
                .iter()
                .position(|e| Arc::ptr_eq(e, g.endpoint()))
                .unwrap();
            counts[i] += 1;
        }
        counts
    }

    #[tokio::test]
    async fn round_robin_is_even() {
        let b = Balancer::new(
            Policy::RoundRobin,
            endpoints(4),
            backoff(Duration::from_secs(1)),
        );
        assert_eq!(shares(&b, 400), vec![100; 4]);
    }

    #[tokio::test]
    async fn every_policy_honours_avoid_and_empty() {
        for policy in [Policy::RoundRobin, Policy::P2cEwma, Policy::LeastRequest] {
            let eps = endpoints(3);
            let avoid = [eps[0].addr, eps[1].addr];
            let b = Balancer::new(policy, eps.clone(), backoff(Duration::from_secs(1)));
            for _ in 0..50 {
                assert_eq!(b.pick(&avoid).unwrap().endpoint().addr, eps[2].addr);
            }
            let all: Vec<_> = eps.iter().map(|e| e.addr).collect();
            assert!(b.pick(&all).is_none(), "{policy:?}");
            assert!(
                Balancer::new(policy, vec![], backoff(Duration::ZERO))
                    .pick(&[])
                    .is_none()
            );
        }
    }

    #[tokio::test]
    async fn least_request_prefers_idle_endpoints() {
        let eps = endpoints(4);
        let b = Balancer::new(
            Policy::LeastRequest,
            eps.clone(),
            backoff(Duration::from_secs(1)),
        );
        // Hold calls on three endpoints; the fourth must win every pick.
        let _held: Vec<_> = eps[..3].iter().map(guard).collect();
        for _ in 0..20 {
            assert_eq!(b.pick(&[]).unwrap().endpoint().addr, eps[3].addr);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_ewma_shuns_a_slow_endpoint() {
        let eps = endpoints(4);
        let b = Balancer::new(
            Policy::P2cEwma,
            eps.clone(),
            backoff(Duration::from_secs(1)),
        );
        // Teach the balancer that endpoint 0 answers in 50ms and the others in 1ms.
        for (i, e) in eps.iter().enumerate() {
            let mut g = guard(e);
            tokio::time::advance(Duration::from_millis(if i == 0 { 50 } else { 1 })).await;
            g.first_byte();
        }
        let counts = shares(&b, 1000);
        // With two random choices the slowest endpoint can only win when drawn against itself,
        // which never happens: it gets no call at all.
        assert_eq!(counts[0], 0, "{counts:?}");
        // Each fast endpoint at least wins every draw against the slow one (1 in 6 draws).
        assert!(counts[1..].iter().all(|&c| c > 100), "{counts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn ewma_decays_so_a_recovered_endpoint_is_tried_again() {
        let e = endpoints(1).pop().unwrap();
        let mut g = guard(&e);
        tokio::time::advance(Duration::from_millis(100)).await;
        g.first_byte();
        drop(g);
        assert!(e.stats.ewma() >= Duration::from_millis(99));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(
            e.stats.ewma() < Duration::from_millis(6),
            "{:?}",
            e.stats.ewma()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refused_endpoints_back_off_then_return() {
        let eps = endpoints(2);
        let b = Balancer::new(
            Policy::RoundRobin,
            eps.clone(),
            backoff(Duration::from_secs(1)),
        );
        eps[0].stats.connect_failed();
        for _ in 0..10 {
            assert_eq!(b.pick(&[]).unwrap().endpoint().addr, eps[1].addr);
        }
        // Only the backing-off endpoint is left: it is still used rather than failing the call.
        assert_eq!(b.pick(&[eps[1].addr]).unwrap().endpoint().addr, eps[0].addr);
        tokio::time::advance(Duration::from_millis(1100)).await;
        let picked: Vec<_> = (0..4)
            .map(|_| b.pick(&[]).unwrap().endpoint().addr)
            .collect();
        assert!(picked.contains(&eps[0].addr));
    }

    #[tokio::test]
    async fn guards_count_in_flight_and_pending() {
        let e = endpoints(1).pop().unwrap();
        let mut g = guard(&e);
        assert_eq!(e.stats.in_flight.load(Relaxed), 1);
        assert_eq!(e.stats.pending.load(Relaxed), 1);
        g.first_byte();
        assert_eq!(e.stats.pending.load(Relaxed), 0);
        drop(g);
        assert_eq!(e.stats.in_flight.load(Relaxed), 0);
        drop(guard(&e));
        assert_eq!(e.stats.pending.load(Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_an_endpoint_for_a_doubling_while() {
        let eps = endpoints(2);
        let policy = FailurePolicy {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(3),
            ..backoff(Duration::from_secs(1))
        };
        let b = Balancer::new(Policy::RoundRobin, eps.clone(), policy);
        let fail = |times: usize| {
            for _ in 0..times {
                let g = b.pick(&[eps[1].addr]).unwrap();
                assert_eq!(g.endpoint().addr, eps[0].addr);
                g.answered(Some(b"14"));
            }
        };
        // Application errors and a success in between do not count.
        fail(2);
        b.pick(&[eps[1].addr]).unwrap().answered(Some(b"5"));
        b.pick(&[eps[1].addr]).unwrap().answered(Some(b"0"));
        fail(2);
        assert!(!eps[0].stats.ejected());
        fail(1);
        assert!(eps[0].stats.ejected(), "three UNAVAILABLE in a row");
        assert_eq!(eps[0].stats.ejections.load(Relaxed), 1);
        for _ in 0..10 {
            assert_eq!(b.pick(&[]).unwrap().endpoint().addr, eps[1].addr);
        }
        // Every endpoint out: the ejected one still takes calls rather than none.
        assert_eq!(b.pick(&[eps[1].addr]).unwrap().endpoint().addr, eps[0].addr);

        // Readmitted after 1 s; one more failure ejects it again, for 2 s this time.
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(!eps[0].stats.ejected());
        let g = b.pick(&[eps[1].addr]).unwrap();
        g.failed();
        assert!(eps[0].stats.ejected(), "half-open: one failure is enough");
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(eps[0].stats.ejected(), "the second ejection lasts 2 s");
        tokio::time::advance(Duration::from_millis(600)).await;
        assert!(!eps[0].stats.ejected());

        // A success clears the record: the next ejection needs three failures and lasts 1 s.
        b.pick(&[eps[1].addr]).unwrap().answered(Some(b"0"));
        fail(2);
        assert!(!eps[0].stats.ejected());
        fail(1);
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(!eps[0].stats.ejected());
        assert_eq!(eps[0].stats.ejections.load(Relaxed), 3);
        assert_eq!(
            eps[0].stats.failures.load(Relaxed),
            1,
            "one transport failure"
        );
    }

    #[tokio::test]
    async fn only_broken_server_statuses_are_failures() {
        for s in ["2", "13", "14", "15"] {
            assert!(is_endpoint_failure(Some(s.as_bytes())), "{s}");
        }
        for s in ["0", "1", "3", "4", "5", "7", "8", "12", "16", "x"] {
            assert!(!is_endpoint_failure(Some(s.as_bytes())), "{s}");
        }
        assert!(!is_endpoint_failure(None));
    }

    #[tokio::test]
    async fn disabled_outlier_detection_never_ejects() {
        let eps = endpoints(1);
        let policy = FailurePolicy {
            consecutive_failures: 0,
            ..backoff(Duration::from_secs(1))
        };
        let b = Balancer::new(Policy::P2cEwma, eps.clone(), policy);
        for _ in 0..100 {
            b.pick(&[]).unwrap().answered(Some(b"14"));
        }
        assert!(!eps[0].stats.ejected());
    }
}
