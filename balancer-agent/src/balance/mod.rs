//! Per-call endpoint choice.
//!
//! A [`Balancer`] is built for each snapshot of a service (the store, `state`, builds them):
//! an immutable list of the [`Endpoint`]s that take new calls, their locality tiers and, for
//! `ring-hash`, their ring. Picking reads atomics and one short per-endpoint lock (the
//! estimate); it never blocks on the control plane.
//!
//! - [`Policy::P2cEwma`] (default): power of two choices over latency times load, where the
//!   first choice is the next endpoint in round-robin order and the second a random other.
//!   The second wins only for a *measured* difference: a latency higher by more than both
//!   endpoints' jitter (`estimate`), or more calls awaiting their first byte (linkerd's
//!   pending count) or a higher overload penalty; otherwise the round-robin choice does. Equal
//!   endpoints therefore share calls evenly, one connection and sequential calls included,
//!   where random pairs and strict comparisons of noisy estimates made one endpoint take most
//!   calls and another starve after one slow call.
//! - [`Policy::LeastRequest`]: the fewest calls in flight (a full scan from the round-robin
//!   position for small sets, so ties go round-robin; two random choices for large ones, as
//!   Envoy does).
//! - [`Policy::RoundRobin`]: each endpoint in turn.
//! - [`Policy::RingHash`]: consistent hashing of a request header ([`ring`]).
//!
//! Before the policy, locality ([`Settings`]): the endpoints are ranked in disjoint tiers
//! (this node, the rest of this zone, the failover zones, the rest, as `trafficDistribution`
//! or `localityLbSetting` say), and a call goes to the first tier whose endpoints that take calls are enough for it:
//! a tier with `h` of its `t` endpoints taking calls takes `min(1, 1.4 h / t)` of the calls
//! (Envoy's overprovisioning factor), the rest spill to the next tier. Never a dead end: when
//! no tier has an endpoint that takes calls, any endpoint does.
//!
//! An endpoint takes calls unless it refused a connection lately (backing off), outlier
//! detection ejected it, or its health check says NOT_SERVING (`health`). Slow start: an
//! endpoint that joins a service that already had endpoints, or comes back from NOT_SERVING,
//! is accepted when picked with a probability that ramps from 10% to 100% over `warmup`.
//!
//! Outlier detection (linkerd's "failure accrual", Envoy's consecutive gateway failures): an
//! endpoint whose last [`FailurePolicy::consecutive_failures`] calls failed (a transport
//! failure, or a gRPC status that says the server is broken: UNKNOWN, INTERNAL, UNAVAILABLE,
//! DATA_LOSS) is ejected for a while that doubles with each ejection in a row. Once the time
//! is up it takes calls again, and its first failure ejects it at once (half-open); its first
//! success clears the record. Before that, RESOURCE_EXHAUSTED and UNAVAILABLE answers raise the
//! endpoint's penalty (`estimate`), so an overloaded endpoint sheds load first. If every
//! endpoint is out, calls still go to one of them rather than fail in the proxy.
#![forbid(unsafe_code)]

pub mod estimate;
pub mod ring;

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::time::Instant;

pub use crate::config::Policy;
use crate::config::{Balancing, PoolConfig, TrafficDistribution};
use estimate::{Estimate, Reading};

/// The share of calls a locality tier takes is its share of endpoints that take calls times
/// this (Envoy's overprovisioning factor): a tier with 5 of 7 endpoints up still takes all.
pub const OVERPROVISIONING: f64 = 1.4;
/// A penalty of 1 (every recent answer an overload) weighs as this many more calls in flight.
pub const PENALTY_WEIGHT: f64 = 4.0;
/// Loads (calls awaiting a first byte, weighed by the penalty) closer than this are equal.
pub const LOAD_TIE: f64 = 0.5;
/// The smallest share of a full one that slow start gives a warming endpoint.
pub const WARMUP_MIN: f64 = 0.1;

/// Where an endpoint, or this agent, runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Place {
    /// Node name.
    pub node: Option<Arc<str>>,
    /// Zone (`topology.kubernetes.io/zone`).
    pub zone: Option<Arc<str>>,
}

impl Place {
    /// A place from optional names; empty names are unknown.
    pub fn new(node: Option<&str>, zone: Option<&str>) -> Self {
        let name = |s: Option<&str>| s.filter(|s| !s.is_empty()).map(Arc::from);
        Self {
            node: name(node),
            zone: name(zone),
        }
    }
}

/// An endpoint as the balancer sees it: its address, where it runs and its live figures. The
/// store keeps one per address and hands the same `Arc` to every snapshot that lists it, so
/// the figures survive configuration changes; calls in flight keep it alive after it is
/// removed. It holds no connection: the relay keeps its pool (`relay::up::Pools`), by address.
#[derive(Debug)]
pub struct Endpoint {
    /// IP:port.
    pub addr: SocketAddr,
    /// Live figures.
    pub stats: EndpointStats,
    place: Mutex<Place>,
}

impl Endpoint {
    /// A new endpoint with fresh figures.
    pub fn new(addr: SocketAddr) -> Arc<Self> {
        Arc::new(Self {
            addr,
            stats: EndpointStats::default(),
            place: Mutex::new(Place::default()),
        })
    }

    /// Where it runs (discovery says; read when balancers are built, never per call).
    pub fn place(&self) -> Place {
        self.place.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records where it runs.
    pub fn set_place(&self, place: Place) {
        let mut p = self.place.lock().unwrap_or_else(|p| p.into_inner());
        if *p != place {
            *p = place;
        }
    }
}

/// What an active health check says of an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Not checked (the service has no health check, or no answer yet): takes calls.
    Unchecked,
    /// SERVING.
    Serving,
    /// NOT_SERVING, or its checks failed: takes no new calls.
    NotServing,
}

impl Health {
    /// How it reads in `inspect` and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unchecked => "unchecked",
            Self::Serving => "serving",
            Self::NotServing => "not-serving",
        }
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
    /// [`Health`] as a number.
    health: AtomicU8,
    /// When its slow start began, as ms since `epoch` plus one; 0: not warming.
    warm_from_ms: AtomicU64,
    estimate: Mutex<Estimate>,
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
            health: AtomicU8::new(0),
            warm_from_ms: AtomicU64::new(0),
            estimate: Mutex::new(Estimate::new(now)),
            epoch: now,
        }
    }
}

impl EndpointStats {
    /// The current latency estimate (mean, decayed while unobserved).
    pub fn ewma(&self) -> Duration {
        Duration::from_nanos(self.reading(Instant::now()).latency_ns as u64)
    }

    /// The estimates as read now.
    pub fn reading(&self, now: Instant) -> Reading {
        self.estimate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read(now)
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

    /// What its health check says.
    pub fn health(&self) -> Health {
        match self.health.load(Relaxed) {
            1 => Health::Serving,
            2 => Health::NotServing,
            _ => Health::Unchecked,
        }
    }

    /// Records what its health check says. Back from NOT_SERVING, it warms up again.
    pub fn set_health(&self, h: Health) {
        let n = match h {
            Health::Unchecked => 0,
            Health::Serving => 1,
            Health::NotServing => 2,
        };
        if self.health.swap(n, Relaxed) == 2 && n != 2 {
            self.start_warmup();
        }
    }

    /// Its slow start begins now.
    pub fn start_warmup(&self) {
        self.warm_from_ms.store(self.now_ms() + 1, Relaxed);
    }

    /// The share of a full one that slow start gives it at `now_ms`, for `warmup`: 1 when not
    /// warming.
    fn warm_factor(&self, warmup: Duration) -> f64 {
        let from = self.warm_from_ms.load(Relaxed);
        if from == 0 || warmup.is_zero() {
            return 1.0;
        }
        let elapsed = self.now_ms().saturating_sub(from - 1) as f64;
        let f = elapsed / warmup.as_millis() as f64;
        if f >= 1.0 {
            // Done: later picks need not read the clock.
            self.warm_from_ms.store(0, Relaxed);
            return 1.0;
        }
        f.max(WARMUP_MIN)
    }

    fn takes_calls(&self, backoff: Duration) -> bool {
        !self.backing_off(backoff) && !self.ejected() && self.health() != Health::NotServing
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

    fn answered(&self, overloaded: bool) {
        self.estimate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .answered(overloaded, Instant::now());
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

impl Default for FailurePolicy {
    fn default() -> Self {
        Self::from_config(&PoolConfig::default())
    }
}

/// Whether a gRPC status from an endpoint says the endpoint is broken (not that the call was
/// wrong): UNKNOWN (2), INTERNAL (13), UNAVAILABLE (14), DATA_LOSS (15). An answer without a
/// status (HTTP/2 that is not gRPC) is not counted against the endpoint.
pub fn is_endpoint_failure(grpc_status: Option<&[u8]>) -> bool {
    matches!(grpc_status, Some(b"2" | b"13" | b"14" | b"15"))
}

/// Whether a gRPC status says the endpoint is overloaded or going away: RESOURCE_EXHAUSTED (8),
/// UNAVAILABLE (14). Such answers raise its load penalty.
pub fn is_overload(grpc_status: Option<&[u8]>) -> bool {
    matches!(grpc_status, Some(b"8" | b"14"))
}

/// Everything a balancer is built with besides its policy and endpoints: how failing
/// endpoints are treated, the service's balancing settings, and where this agent runs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Settings {
    /// Backoff and outlier detection.
    pub failures: FailurePolicy,
    /// Hash header, locality, warm-up (health checks are read by `health`, not here).
    pub balancing: Balancing,
    /// Where this agent runs.
    pub local: Place,
}

impl From<FailurePolicy> for Settings {
    fn from(failures: FailurePolicy) -> Self {
        Self {
            failures,
            ..Self::default()
        }
    }
}

/// A group of endpoints (indices into the balancer's list) and its weight in its tier.
#[derive(Debug)]
struct Group {
    weight: u32,
    members: Vec<u32>,
    /// A name for `explain`.
    name: String,
}

/// Endpoints of one locality rank.
#[derive(Debug)]
struct Tier {
    groups: Vec<Group>,
}

/// The endpoints of one service snapshot that take new calls, and how to choose among them.
#[derive(Debug)]
pub struct Balancer {
    policy: Policy,
    ready: Vec<Arc<Endpoint>>,
    next: AtomicUsize,
    settings: Arc<Settings>,
    /// Locality tiers, nearest first; the last holds every endpoint.
    tiers: Vec<Tier>,
    ring: Option<ring::Ring>,
}

/// What a call brings to its pick besides the endpoints it tried.
#[derive(Clone, Copy, Debug, Default)]
pub struct PickContext<'a> {
    /// Endpoints not to pick (tried already).
    pub avoid: &'a [SocketAddr],
    /// The call's key for `ring-hash` ([`ring::key`] of its `hash_header` value).
    pub hash: Option<u64>,
}

impl Balancer {
    /// A balancer over `ready` endpoints, skipping those that `settings` says to (a
    /// [`FailurePolicy`] alone: no locality, no hash header, no warm-up).
    pub fn new(policy: Policy, ready: Vec<Arc<Endpoint>>, settings: impl Into<Settings>) -> Self {
        let settings: Settings = settings.into();
        let tiers = tiers(&ready, &settings);
        let ring = (policy == Policy::RingHash).then(|| {
            let addrs: Vec<SocketAddr> = ready.iter().map(|e| e.addr).collect();
            ring::Ring::new(&addrs)
        });
        Self {
            policy,
            next: AtomicUsize::new(fastrand::usize(..ready.len().max(1))),
            ready,
            settings: Arc::new(settings),
            tiers,
            ring,
        }
    }

    /// The policy in use.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// How it treats failing endpoints (a subset's balancer treats them the same).
    pub fn failures(&self) -> FailurePolicy {
        self.settings.failures
    }

    /// Everything it was built with but its policy and endpoints: a subset's balancer built
    /// with these keeps the service's locality, hash header and warm-up.
    pub fn settings(&self) -> Settings {
        (*self.settings).clone()
    }

    /// The request header whose value keys a call, for `ring-hash`.
    pub fn hash_header(&self) -> Option<&str> {
        match self.policy {
            Policy::RingHash => self.settings.balancing.hash_header.as_deref(),
            _ => None,
        }
    }

    /// The endpoints that take new calls.
    pub fn ready(&self) -> &[Arc<Endpoint>] {
        &self.ready
    }

    /// Chooses an endpoint for a call, skipping those in `avoid`. The returned guard counts the
    /// call as in flight until it is dropped.
    pub fn pick(&self, avoid: &[SocketAddr]) -> Option<CallGuard> {
        self.pick_with(PickContext { avoid, hash: None })
    }

    /// [`Balancer::pick`] with the call's hash key.
    pub fn pick_with(&self, cx: PickContext<'_>) -> Option<CallGuard> {
        let ep = self.choose(&cx)?;
        Some(CallGuard::new(ep, self.settings.failures))
    }

    fn choose(&self, cx: &PickContext<'_>) -> Option<Arc<Endpoint>> {
        let n = self.ready.len();
        if n == 0 {
            return None;
        }
        let backoff = self.settings.failures.connect_backoff;
        let usable = |e: &Endpoint| !cx.avoid.contains(&e.addr);
        let healthy = |e: &Endpoint| usable(e) && e.stats.takes_calls(backoff);
        let chosen = match &self.ring {
            Some(ring) => {
                let h = cx.hash.unwrap_or_else(|| fastrand::u64(..));
                ring.find(h, |i| healthy(&self.ready[i]))
                    .map(|i| &self.ready[i])
            }
            None => self
                .members(&healthy)
                .and_then(|m| self.within(m, &healthy)),
        };
        // Every healthy endpoint excluded: fall back to one that is merely backing off,
        // ejected or unhealthy, since a refused connection an instant ago may be accepted now,
        // and a call tried beats a call failed in the proxy.
        chosen
            .or_else(|| {
                let start = fastrand::usize(..n);
                (0..n)
                    .map(|i| &self.ready[(start + i) % n])
                    .find(|e| usable(e))
            })
            .cloned()
    }

    /// The endpoints (indices) of the locality tier and group that takes this call.
    fn members(&self, healthy: &dyn Fn(&Endpoint) -> bool) -> Option<&[u32]> {
        if let [tier] = self.tiers.as_slice()
            && let [group] = tier.groups.as_slice()
        {
            return Some(&group.members);
        }
        let mut first_up: Option<&[u32]> = None;
        for tier in &self.tiers {
            let (mut up, mut total, mut weight_up) = (0usize, 0usize, 0u64);
            let mut ups = [0usize; 8];
            for (g, group) in tier.groups.iter().enumerate() {
                let h = group
                    .members
                    .iter()
                    .filter(|i| healthy(&self.ready[**i as usize]))
                    .count();
                up += h;
                total += group.members.len();
                if h > 0 {
                    weight_up += u64::from(group.weight);
                }
                if g < ups.len() {
                    ups[g] = h;
                }
            }
            if up == 0 || weight_up == 0 {
                continue;
            }
            // The group, by weight among those with an endpoint up.
            let mut draw = fastrand::u64(..weight_up);
            let group = tier
                .groups
                .iter()
                .enumerate()
                .filter(|(g, group)| *g >= ups.len() || ups[*g] > 0 && !group.members.is_empty())
                .find(|(_, group)| {
                    let w = u64::from(group.weight);
                    if draw < w {
                        true
                    } else {
                        draw -= w;
                        false
                    }
                })
                .map(|(_, group)| group.members.as_slice())?;
            first_up.get_or_insert(group);
            let share = OVERPROVISIONING * up as f64 / total as f64;
            if share >= 1.0 || fastrand::f64() < share {
                return Some(group);
            }
        }
        first_up
    }

    /// The policy's choice among `members`.
    fn within(
        &self,
        members: &[u32],
        healthy: &dyn Fn(&Endpoint) -> bool,
    ) -> Option<&Arc<Endpoint>> {
        let n = members.len();
        if n == 0 {
            return None;
        }
        let at = |k: usize| &self.ready[members[k % n] as usize];
        let warmup = self.settings.balancing.warmup;
        let warm = |e: &Endpoint| {
            let f = e.stats.warm_factor(warmup);
            f >= 1.0 || fastrand::f64() < f
        };
        match self.policy {
            Policy::RoundRobin | Policy::RingHash => {
                let start = self.next.fetch_add(1, Relaxed);
                (0..n)
                    .map(|k| at(start + k))
                    .find(|e| healthy(e) && warm(e))
                    .or_else(|| (0..n).map(|k| at(start + k)).find(|e| healthy(e)))
            }
            Policy::LeastRequest => {
                let load = |e: &Endpoint| e.stats.in_flight.load(Relaxed);
                let chosen = if n <= 8 {
                    let start = self.next.fetch_add(1, Relaxed);
                    (0..n)
                        .map(|k| at(start + k))
                        .filter(|e| healthy(e))
                        .min_by_key(|e| load(e))
                } else {
                    let (a, b) = self.two(members, healthy)?;
                    Some(if load(b) < load(a) { b } else { a })
                };
                chosen.filter(|e| warm(e)).or_else(|| {
                    let (a, b) = self.two(members, healthy)?;
                    Some(if warm(a) { a } else { b })
                })
            }
            Policy::P2cEwma => {
                let (a, b) = self.two(members, healthy)?;
                let now = Instant::now();
                let (win, lose) = if Arc::ptr_eq(a, b) || prefers(a, b, now) {
                    (a, b)
                } else {
                    (b, a)
                };
                Some(if warm(win) { win } else { lose })
            }
        }
    }

    /// The next endpoint in round-robin order that takes calls, and a random other one (the
    /// same one when it is alone).
    fn two(
        &self,
        members: &[u32],
        healthy: &dyn Fn(&Endpoint) -> bool,
    ) -> Option<(&Arc<Endpoint>, &Arc<Endpoint>)> {
        let n = members.len();
        let at = |k: usize| &self.ready[members[k % n] as usize];
        let start = self.next.fetch_add(1, Relaxed);
        let (k, a) = (0..n)
            .map(|k| (k, at(start + k)))
            .find(|(_, e)| healthy(e))?;
        if n == 1 {
            return Some((a, a));
        }
        // A random other: draws first (the usual case, every endpoint up), then a scan.
        for _ in 0..2 {
            let j = fastrand::usize(..n - 1);
            let b = at(start + k + 1 + j);
            if healthy(b) {
                return Some((a, b));
            }
        }
        let off = fastrand::usize(..n);
        let b = (0..n)
            .map(|j| at(start + k + 1 + off + j))
            .find(|e| !Arc::ptr_eq(e, a) && healthy(e))
            .unwrap_or(a);
        Some((a, b))
    }

    /// Why each endpoint gets the share it gets, for `inspect`: in the order of
    /// [`Balancer::ready`].
    pub fn explain(&self) -> Vec<(SocketAddr, String)> {
        let now = Instant::now();
        let backoff = self.settings.failures.connect_backoff;
        let readings: Vec<Reading> = self.ready.iter().map(|e| e.stats.reading(now)).collect();
        let best = readings
            .iter()
            .zip(&self.ready)
            .filter(|(r, e)| r.samples > 0 && e.stats.takes_calls(backoff))
            .min_by(|(a, _), (b, _)| a.latency_ns.total_cmp(&b.latency_ns))
            .map(|(r, _)| *r);
        self.ready
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let s = &e.stats;
                let mut why = Vec::new();
                if s.ejected() {
                    why.push("out: ejected by outlier detection".to_string());
                } else if s.backing_off(backoff) {
                    why.push("out: backing off after a refused connection".into());
                } else if s.health() == Health::NotServing {
                    why.push("out: its health check says NOT_SERVING".into());
                }
                if self.tiers.len() > 1 {
                    let t = self
                        .tiers
                        .iter()
                        .position(|t| t.groups.iter().any(|g| g.members.contains(&(i as u32))))
                        .unwrap_or(0);
                    let group = &self.tiers[t]
                        .groups
                        .iter()
                        .find(|g| g.members.contains(&(i as u32)));
                    let name = group.map_or("", |g| g.name.as_str());
                    why.push(if t == 0 {
                        format!("locality: {name}, first choice")
                    } else {
                        format!("locality: {name}, tier {t}: only what nearer tiers cannot take")
                    });
                }
                let f = s.warm_factor(self.settings.balancing.warmup);
                if f < 1.0 {
                    why.push(format!("warming up: {:.0}% of a full share", f * 100.0));
                }
                let r = readings[i];
                let ms = |ns: f64| ns / 1e6;
                if self.policy == Policy::P2cEwma {
                    match best {
                        _ if r.samples == 0 => why.push("latency: not measured yet, even".into()),
                        Some(b) if r.latency_differs(&b) => why.push(format!(
                            "slower: {:.2} ms ± {:.2} against the best {:.2} ms ± {:.2}, loses \
                             its pairings",
                            ms(r.latency_ns),
                            ms(r.jitter_ns),
                            ms(b.latency_ns),
                            ms(b.jitter_ns)
                        )),
                        _ => why.push(format!(
                            "even: {:.2} ms ± {:.2}, within the others' jitter",
                            ms(r.latency_ns),
                            ms(r.jitter_ns)
                        )),
                    }
                    if r.penalty >= 0.05 {
                        why.push(format!(
                            "penalised: {:.0}% of recent answers RESOURCE_EXHAUSTED or \
                             UNAVAILABLE",
                            r.penalty * 100.0
                        ));
                    }
                    let pending = s.pending.load(Relaxed);
                    if pending > 0 {
                        why.push(format!("{pending} call(s) awaiting a first byte"));
                    }
                } else {
                    why.push(self.policy.as_str().to_string());
                }
                (e.addr, why.join("; "))
            })
            .collect()
    }
}

/// Whether `a` (the round-robin choice) keeps the call against `b`: unless `b` is measurably
/// faster for its load, or carries measurably less load.
fn prefers(a: &Endpoint, b: &Endpoint, now: Instant) -> bool {
    let (ra, rb) = (a.stats.reading(now), b.stats.reading(now));
    let load = |e: &Endpoint, r: &Reading| {
        f64::from(e.stats.pending.load(Relaxed) + 1) * (1.0 + PENALTY_WEIGHT * r.penalty)
    };
    let (la, lb) = (load(a, &ra), load(b, &rb));
    if ra.samples > 0 && rb.samples > 0 && ra.latency_differs(&rb) {
        ra.latency_ns * la <= rb.latency_ns * lb
    } else {
        la <= lb + LOAD_TIE
    }
}

/// The locality tiers of `ready` for `settings`, nearest first, the last one every endpoint.
fn tiers(ready: &[Arc<Endpoint>], settings: &Settings) -> Vec<Tier> {
    let all = || Tier {
        groups: vec![Group {
            weight: 1,
            members: (0..ready.len() as u32).collect(),
            name: "any".into(),
        }],
    };
    let local = &settings.local;
    let b = &settings.balancing;
    let places: Vec<Place> = ready.iter().map(|e| e.place()).collect();
    let in_zone = |z: &str| -> Vec<u32> {
        (0..ready.len() as u32)
            .filter(|i| places[*i as usize].zone.as_deref() == Some(z))
            .collect()
    };
    let mut out = Vec::new();
    let one = |members: Vec<u32>, name: String| Tier {
        groups: vec![Group {
            weight: 1,
            members,
            name,
        }],
    };
    let zone = local.zone.as_deref();
    if let Some(z) = zone
        && let Some(d) = b
            .locality_lb
            .distribute
            .iter()
            .find(|d| d.from == z || d.from == "*")
    {
        let named: Vec<&str> =
            d.to.keys()
                .map(String::as_str)
                .filter(|k| *k != "*")
                .collect();
        let groups =
            d.to.iter()
                .filter(|(_, w)| **w > 0)
                .map(|(to, w)| {
                    let members = if to == "*" {
                        (0..ready.len() as u32)
                            .filter(|i| {
                                !places[*i as usize]
                                    .zone
                                    .as_deref()
                                    .is_some_and(|z| named.contains(&z))
                            })
                            .collect()
                    } else {
                        in_zone(to)
                    };
                    Group {
                        weight: *w,
                        members,
                        name: format!("zone {to} (weight {w})"),
                    }
                })
                .collect();
        out.push(Tier { groups });
    } else {
        let prefer = b.traffic_distribution;
        if prefer == TrafficDistribution::PreferSameNode
            && let Some(node) = local.node.as_deref()
        {
            let members = (0..ready.len() as u32)
                .filter(|i| places[*i as usize].node.as_deref() == Some(node))
                .collect();
            out.push(one(members, format!("this node ({node})")));
        }
        if let Some(z) = zone
            && (prefer != TrafficDistribution::Any || !b.locality_lb.failover.is_empty())
        {
            out.push(one(in_zone(z), format!("this zone ({z})")));
            for f in b.locality_lb.failover.iter().filter(|f| f.from == z) {
                out.push(one(in_zone(&f.to), format!("failover zone {}", f.to)));
            }
        }
    }
    // Disjoint tiers, as Envoy's priorities: a tier holds the endpoints no nearer tier holds,
    // so the node's endpoints being down does not count against its zone's others.
    let mut taken = vec![false; ready.len()];
    for tier in &mut out {
        for g in &mut tier.groups {
            g.members.retain(|i| !taken[*i as usize]);
        }
        for i in tier.groups.iter().flat_map(|g| &g.members) {
            taken[*i as usize] = true;
        }
    }
    out.retain(|t| t.groups.iter().any(|g| !g.members.is_empty()));
    if out.is_empty() {
        return vec![all()];
    }
    let rest: Vec<u32> = (0..ready.len() as u32)
        .filter(|i| !taken[*i as usize])
        .collect();
    if !rest.is_empty() {
        out.push(one(rest, "any other".into()));
    }
    out
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

    /// The endpoint answered: its latency feeds the estimate and the call stops being pending.
    pub fn first_byte(&mut self) {
        if std::mem::take(&mut self.pending) {
            let now = Instant::now();
            let s = &self.endpoint.stats;
            s.pending.fetch_sub(1, Relaxed);
            s.estimate
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .observe(now - self.start, now);
        }
    }

    /// The endpoint answered the call with this gRPC status (`None`: it sent none).
    pub fn answered(&self, grpc_status: Option<&[u8]>) {
        let s = &self.endpoint.stats;
        s.answered(is_overload(grpc_status));
        s.record(is_endpoint_failure(grpc_status), &self.failures);
    }

    /// Outlier detection for this call follows `failures` (its service's own settings over the
    /// node-wide ones).
    pub fn set_failures(&mut self, failures: FailurePolicy) {
        self.failures = failures;
    }

    /// How outlier detection treats this call.
    pub fn failures(&self) -> FailurePolicy {
        self.failures
    }

    /// [`CallGuard::answered`], the caller having decided whether the status counts against
    /// the endpoint (`failed`: its service counts other statuses than [`is_endpoint_failure`]).
    pub fn answered_as(&self, grpc_status: Option<&[u8]>, failed: bool) {
        let s = &self.endpoint.stats;
        s.answered(is_overload(grpc_status));
        s.record(failed, &self.failures);
    }

    /// The call failed on the endpoint without an answer (its connection broke).
    pub fn failed(&self) {
        let s = &self.endpoint.stats;
        s.failures.fetch_add(1, Relaxed);
        s.answered(true);
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
mod locality_tests;

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
        // Teach the balancer that endpoint 0 answers in 50ms and the others in 1ms (enough
        // calls each for a difference to count).
        for _ in 0..estimate::MIN_SAMPLES {
            for (i, e) in eps.iter().enumerate() {
                let mut g = guard(e);
                tokio::time::advance(Duration::from_millis(if i == 0 { 50 } else { 1 })).await;
                g.first_byte();
            }
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
