//! Retries of a call on another endpoint, as a route's policy asks ([`RetryPolicy`]): which
//! failures are retried ([`RetryOn`], spelled as Istio's `retryOn`), how many times, each
//! attempt under its own timeout; a retry budget per service ([`RetryBudget`]) so that retries
//! never multiply an outage; the server's `grpc-retry-pushback-ms` honoured and
//! `grpc-previous-rpc-attempts` sent, as gRPC's own retry design (gRFC A6) does.
//!
//! When a call may be tried again (the rule `Call::retry` applies, in this order):
//!
//! 1. its route has a policy and the attempt failed with one of its conditions;
//! 2. nothing of the response reached the client: a trailers-only answer (a gRPC error before
//!    any message) is retried, an error after response headers is not (`response_started`);
//! 3. the request is still held in full: the call keeps its request for a replay up to
//!    [`super::REPLAY_LIMIT`] (`request_too_large`), and a request with trailers is not kept
//!    (`request_trailers`);
//! 4. attempts are left (`attempts_exhausted`);
//! 5. the server did not refuse it: a negative or malformed `grpc-retry-pushback-ms` means do
//!    not retry (`pushback`); a valid one is the wait before the next attempt, instead of the
//!    backoff (25 ms doubling up to 250 ms, jittered, Envoy's defaults, which Istio keeps);
//! 6. the next attempt would start before the call's deadline (`deadline`);
//! 7. the service's circuit breaker allows another retry in flight (`max_retries`);
//! 8. the service's retry budget has room (`budget_exhausted`).
//!
//! A call that fails one of 2-8 ends as it is, and is counted in
//! `balancer_calls_not_retried_total{service,route,reason}` under the reason in parentheses.
//! Each attempt goes to another endpoint while one is left that the call has not tried.
//! Refused streams (REFUSED_STREAM, GOAWAY) and endpoints that could not be reached are tried
//! elsewhere whatever the policy, as before: nothing of the call left the proxy.
#![forbid(unsafe_code)]

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use serde::{Serialize, Serializer};
use tokio::time::Instant;

use super::grpc::Code;
use crate::config::resilience::RETRY_CONDITIONS;

/// What an attempt ended with, as far as retries care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered with this gRPC status.
    Status(Code),
    /// The endpoint reset the stream, or its connection was lost, before the response.
    Reset,
    /// The attempt's own timeout (`per_try_timeout`) passed.
    TryTimeout,
}

impl Outcome {
    /// The condition's name, as a metric label (`unavailable`, `reset`, `per_try_timeout`).
    pub fn label(self) -> &'static str {
        match self {
            Self::Status(c) => match c {
                Code::Cancelled => "cancelled",
                Code::DeadlineExceeded => "deadline-exceeded",
                Code::Internal => "internal",
                Code::ResourceExhausted => "resource-exhausted",
                Code::Unavailable => "unavailable",
                Code::Unknown => "unknown",
                _ => "status",
            },
            Self::Reset => "reset",
            Self::TryTimeout => "per_try_timeout",
        }
    }
}

/// The failures a route retries: a set of Istio `retryOn` conditions.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct RetryOn(u16);

impl RetryOn {
    const CANCELLED: u16 = 1 << 0;
    const DEADLINE_EXCEEDED: u16 = 1 << 1;
    const INTERNAL: u16 = 1 << 2;
    const RESOURCE_EXHAUSTED: u16 = 1 << 3;
    const UNAVAILABLE: u16 = 1 << 4;
    const UNKNOWN: u16 = 1 << 5;
    // 1 << 6 and 1 << 7: `connect-failure`, `refused-stream`, retried whatever the policy.
    const RESET: u16 = 1 << 8;
    const FIVE_XX: u16 = 1 << 9;
    const GATEWAY_ERROR: u16 = 1 << 10;

    /// Every condition by its name in `retryOn`
    /// ([`crate::config::resilience::RETRY_CONDITIONS`], bit `i` for name `i`). The gRPC ones
    /// are Envoy's `x-envoy-retry-grpc-on`; the others its `x-envoy-retry-on` as far as a
    /// gRPC call can meet them: `reset` (the endpoint reset the stream or its connection was
    /// lost before the response), `5xx` and `gateway-error` (for a gRPC call, whose HTTP
    /// status is 200: a reset or a per-try timeout, as Envoy counts them), `connect-failure`
    /// and `refused-stream` (always tried elsewhere anyway: nothing of the call left the
    /// proxy).
    pub const ALL: [&'static str; 11] = RETRY_CONDITIONS;

    /// Envoy's `retryOn` values that concern HTTP statuses or headers a gRPC call never
    /// produces: accepted in an Istio object, with no effect.
    pub const HTTP_ONLY: [&'static str; 5] = [
        "retriable-4xx",
        "retriable-status-codes",
        "retriable-headers",
        "envoy-ratelimited",
        "http3-post-connect-failure",
    ];

    /// What Istio retries when a route's `retries` sets no `retryOn`.
    pub const ISTIO_DEFAULT: &'static str = "connect-failure,refused-stream,unavailable,cancelled";

    /// Parses a comma-separated `retryOn` (spaces allowed). `Err` names each unknown
    /// condition; HTTP-only conditions and HTTP status numbers are ignored when `lenient` (an
    /// Istio object may carry them for its HTTP routes), unknown otherwise.
    pub fn parse(s: &str, lenient: bool) -> Result<Self, String> {
        let mut set = 0;
        let mut unknown = Vec::new();
        for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match Self::ALL.iter().position(|n| n.eq_ignore_ascii_case(word)) {
                Some(i) => set |= 1 << i,
                None if lenient
                    && (Self::HTTP_ONLY.contains(&word) || word.parse::<u16>().is_ok()) => {}
                None => unknown.push(word),
            }
        }
        if unknown.is_empty() {
            Ok(Self(set))
        } else {
            Err(format!(
                "unknown retry condition(s) {unknown:?}; known: {}",
                Self::ALL.join(", ")
            ))
        }
    }

    /// No condition at all.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// An attempt that ended with `outcome` is retried.
    pub fn covers(self, outcome: Outcome) -> bool {
        let bit = match outcome {
            Outcome::Status(Code::Cancelled) => Self::CANCELLED,
            Outcome::Status(Code::DeadlineExceeded) => Self::DEADLINE_EXCEEDED,
            Outcome::Status(Code::Internal) => Self::INTERNAL,
            Outcome::Status(Code::ResourceExhausted) => Self::RESOURCE_EXHAUSTED,
            Outcome::Status(Code::Unavailable) => Self::UNAVAILABLE,
            Outcome::Status(Code::Unknown) => Self::UNKNOWN,
            Outcome::Status(_) => 0,
            Outcome::Reset => Self::RESET | Self::FIVE_XX | Self::GATEWAY_ERROR,
            Outcome::TryTimeout => {
                Self::FIVE_XX | Self::GATEWAY_ERROR | Self::RESET | Self::DEADLINE_EXCEEDED
            }
        };
        self.0 & bit != 0
    }
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = Self::ALL
            .iter()
            .enumerate()
            .filter(|(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, n)| *n)
            .collect();
        f.write_str(&names.join(","))
    }
}

impl fmt::Debug for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RetryOn({self})")
    }
}

impl Serialize for RetryOn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Retries of a route's calls (Istio `retries`, the file's `retries`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RetryPolicy {
    /// Attempts after the first, at most (Istio `attempts`). 0: none.
    pub attempts: u32,
    /// Each attempt's own timeout, within the call's (Istio `perTryTimeout`); `None`: only the
    /// call's.
    #[serde(serialize_with = "millis_opt")]
    pub per_try_timeout: Option<Duration>,
    /// The failures retried (Istio `retryOn`).
    pub retry_on: RetryOn,
}

fn millis_opt<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&format!("{}ms", d.as_millis())),
        None => s.serialize_none(),
    }
}

impl fmt::Display for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} attempt(s) on {}", self.attempts, self.retry_on)?;
        if let Some(t) = self.per_try_timeout {
            write!(f, ", {} ms per try", t.as_millis())?;
        }
        Ok(())
    }
}

/// The first backoff between attempts (Envoy's `base_interval`, which Istio keeps).
pub const BACKOFF_BASE: Duration = Duration::from_millis(25);
/// The longest backoff (Envoy: ten times the base).
pub const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// The wait before retry number `n` (1 for the first): drawn at random up to
/// `BACKOFF_BASE × 2^(n-1)`, at most [`BACKOFF_MAX`] (Envoy's fully jittered exponential
/// backoff).
pub fn backoff(n: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1 << n.saturating_sub(1).min(16))
        .min(BACKOFF_MAX);
    let ms = ceiling.as_millis() as u64;
    Duration::from_millis(fastrand::u64(0..=ms))
}

/// What `grpc-retry-pushback-ms` says (gRFC A6): wait this long before the next attempt, or
/// (a negative or malformed value) do not retry.
pub fn pushback(value: &[u8]) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?;
    let ms: i64 = text.trim().parse().ok()?;
    u64::try_from(ms).ok().map(Duration::from_millis)
}

/// Why a call whose failure its policy retries was not retried: the `reason` label of
/// `balancer_calls_not_retried_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoRetry {
    /// Response headers had reached the client.
    ResponseStarted,
    /// The request outgrew the buffer kept for a replay.
    RequestTooLarge,
    /// The request ended with trailers (not kept for a replay).
    RequestTrailers,
    /// Every attempt the policy allows was made.
    AttemptsExhausted,
    /// The server said not to retry (a negative or malformed `grpc-retry-pushback-ms`).
    Pushback,
    /// The next attempt would start after the call's deadline.
    Deadline,
    /// The service's circuit breaker has its maximum of retries in flight.
    MaxRetries,
    /// The service's retry budget is spent.
    BudgetExhausted,
}

impl NoRetry {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::ResponseStarted => "response_started",
            Self::RequestTooLarge => "request_too_large",
            Self::RequestTrailers => "request_trailers",
            Self::AttemptsExhausted => "attempts_exhausted",
            Self::Pushback => "pushback",
            Self::Deadline => "deadline",
            Self::MaxRetries => "max_retries",
            Self::BudgetExhausted => "budget_exhausted",
        }
    }
}

/// A service's retry budget: retries within a window of `ttl` may add up to `ratio` of the
/// calls admitted in it (to routes with retries), plus `min_per_second` for each second of
/// the window, as linkerd's budgets do. Beyond it a call fails as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RetryBudget {
    /// The share of calls that may be retried, in thousandths (200: 20%).
    pub ratio_permille: u32,
    /// Retries allowed per second whatever the calls (a floor for quiet services).
    pub min_per_second: u32,
    /// The window calls and retries are counted over.
    #[serde(serialize_with = "millis")]
    pub ttl: Duration,
}

fn millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}ms", d.as_millis()))
}

impl Default for RetryBudget {
    /// linkerd's defaults: 20% of calls, 10 per second, over 10 s.
    fn default() -> Self {
        Self {
            ratio_permille: 200,
            min_per_second: 10,
            ttl: Duration::from_secs(10),
        }
    }
}

impl fmt::Display for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}% of calls + {}/s over {} s",
            self.ratio_permille / 10,
            self.ratio_permille % 10,
            self.min_per_second,
            self.ttl.as_secs_f64()
        )
    }
}

/// Buckets a budget's window is counted in.
const BUCKETS: usize = 10;

/// Calls and retries counted over a sliding window of [`BUCKETS`] buckets, for a
/// [`RetryBudget`]. Counting a call is two atomic operations and no lock (it happens for every
/// call of a route with retries); a bucket is emptied by the first count of its next turn, and
/// the window read (only when a retry is asked for) skips buckets of an earlier turn. Races at
/// a bucket's turn may lose a count: a budget needs no more precision than that.
#[derive(Debug)]
pub struct BudgetWindow {
    /// Calls per bucket.
    calls: [AtomicU64; BUCKETS],
    /// Retries per bucket.
    retries: [AtomicU64; BUCKETS],
    /// The tick each bucket counts (ticks: bucket widths since `epoch`).
    ticks: [AtomicU64; BUCKETS],
    epoch: Instant,
}

impl Default for BudgetWindow {
    fn default() -> Self {
        Self {
            calls: Default::default(),
            retries: Default::default(),
            ticks: Default::default(),
            epoch: Instant::now(),
        }
    }
}

impl BudgetWindow {
    /// The tick of `now` for buckets of `budget`, and its bucket (emptied if it held an
    /// earlier turn).
    fn bucket(&self, now: Instant, budget: &RetryBudget) -> (u64, usize) {
        let tick = self.tick(now, budget);
        let i = (tick % BUCKETS as u64) as usize;
        let seen = self.ticks[i].load(Relaxed);
        if seen != tick
            && self.ticks[i]
                .compare_exchange(seen, tick, Relaxed, Relaxed)
                .is_ok()
        {
            self.calls[i].store(0, Relaxed);
            self.retries[i].store(0, Relaxed);
        }
        (tick, i)
    }

    /// A call was admitted to a route with retries: it adds to what may be retried.
    pub fn deposit(&self, now: Instant, budget: &RetryBudget) {
        let (_, i) = self.bucket(now, budget);
        self.calls[i].fetch_add(1, Relaxed);
    }

    /// Takes one retry from the budget, if it has room.
    pub fn withdraw(&self, now: Instant, budget: &RetryBudget) -> bool {
        let (tick, i) = self.bucket(now, budget);
        let (calls, retries) = self.counted(tick);
        let allowed = calls * u64::from(budget.ratio_permille) / 1000
            + u64::from(budget.min_per_second) * budget.ttl.as_secs().max(1);
        if retries >= allowed {
            return false;
        }
        self.retries[i].fetch_add(1, Relaxed);
        true
    }

    /// Calls and retries of the window that ends with `tick`.
    fn counted(&self, tick: u64) -> (u64, u64) {
        let mut totals = (0, 0);
        for i in 0..BUCKETS {
            let t = self.ticks[i].load(Relaxed);
            if t <= tick && tick - t < BUCKETS as u64 {
                totals.0 += self.calls[i].load(Relaxed);
                totals.1 += self.retries[i].load(Relaxed);
            }
        }
        totals
    }

    /// Calls and retries in the window now.
    pub fn totals(&self, now: Instant, budget: &RetryBudget) -> (u64, u64) {
        self.counted(self.tick(now, budget))
    }

    /// Bucket widths of `budget` from `epoch` to `now`.
    fn tick(&self, now: Instant, budget: &RetryBudget) -> u64 {
        let ms = |d: Duration| d.as_secs() * 1000 + u64::from(d.subsec_millis());
        let width = (ms(budget.ttl) / BUCKETS as u64).max(1);
        ms(now.saturating_duration_since(self.epoch)) / width
    }
}

/// A call's retries under way: its policy and what it made of it so far. Small and without
/// a lock or a reference count until a retry is asked for: most calls never need one.
#[derive(Debug)]
pub struct CallRetry {
    /// The route's policy.
    pub policy: RetryPolicy,
    /// The id of the service whose budget and breaker it draws on (its destination).
    pub service: u32,
    /// Retries made.
    pub retries: u32,
    /// When the attempt in flight times out (`per_try_timeout`).
    pub try_deadline: Option<Instant>,
    /// When the next attempt may leave (backoff, or the server's pushback).
    pub retry_at: Option<Instant>,
    /// A failure was counted as not retried (or retried): nothing more to count at its end.
    pub settled: bool,
    /// The service's counters while the call holds one of its retries in flight.
    holds: Option<Arc<super::breaker::ServiceState>>,
}

impl CallRetry {
    /// A call with `policy`, to service `service` (its id).
    pub fn new(policy: RetryPolicy, service: u32) -> Self {
        Self {
            policy,
            service,
            retries: 0,
            try_deadline: None,
            retry_at: None,
            settled: false,
            holds: None,
        }
    }

    /// An attempt leaves: its own timeout starts (`now` is read only for a policy with one).
    pub fn attempt_sent(&mut self, now: impl FnOnce() -> Instant) {
        self.try_deadline = self.policy.per_try_timeout.map(|t| now() + t);
        self.retry_at = None;
    }

    /// Holds one of `service`'s retries in flight if fewer than `max` are (`None`: no limit).
    /// A call holds at most one, until it ends.
    pub fn hold_retry(
        &mut self,
        service: Arc<super::breaker::ServiceState>,
        max: Option<u32>,
    ) -> bool {
        if self.holds.is_some() {
            return true;
        }
        if !service.acquire_retry(max) {
            return false;
        }
        self.holds = Some(service);
        true
    }
}

impl Drop for CallRetry {
    fn drop(&mut self) {
        if let Some(s) = &self.holds {
            s.release_retry();
        }
    }
}

/// A rule's `retries` from the file (checked by `config`): `retry_on` defaults to
/// `unavailable`; an unknown condition (an unchecked section) retries nothing more.
pub fn from_config(r: &crate::config::resilience::RetriesConfig) -> RetryPolicy {
    let on = r.retry_on.as_deref().unwrap_or("unavailable");
    RetryPolicy {
        attempts: r.attempts,
        per_try_timeout: (r.per_try_timeout_ms > 0)
            .then(|| Duration::from_millis(r.per_try_timeout_ms)),
        retry_on: RetryOn::parse(on, true).unwrap_or_default(),
    }
}

/// A service's `retry_budget` from the file.
pub fn budget_from_config(b: &crate::config::resilience::RetryBudgetConfig) -> RetryBudget {
    RetryBudget {
        ratio_permille: (b.percent.clamp(0.0, 100.0) * 10.0).round() as u32,
        min_per_second: b.min_retries_per_second,
        ttl: Duration::from_millis(b.ttl_ms.max(1000)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_on_parses_istios_spelling_and_names_unknown_conditions() {
        let r = RetryOn::parse(
            "cancelled, deadline-exceeded,internal,resource-exhausted",
            false,
        )
        .unwrap();
        for (code, covered) in [
            (Code::Cancelled, true),
            (Code::DeadlineExceeded, true),
            (Code::Internal, true),
            (Code::ResourceExhausted, true),
            (Code::Unavailable, false),
            (Code::Ok, false),
            (Code::InvalidArgument, false),
        ] {
            assert_eq!(r.covers(Outcome::Status(code)), covered, "{code:?}");
        }
        assert!(!r.covers(Outcome::Reset));
        assert!(
            r.covers(Outcome::TryTimeout),
            "deadline-exceeded covers a per-try timeout"
        );
        assert_eq!(
            r.to_string(),
            "cancelled,deadline-exceeded,internal,resource-exhausted"
        );
        let reset = RetryOn::parse("reset", false).unwrap();
        assert!(reset.covers(Outcome::Reset) && reset.covers(Outcome::TryTimeout));
        assert!(!reset.covers(Outcome::Status(Code::Unavailable)));
        let e = RetryOn::parse("unavailable,bogus,503", false).unwrap_err();
        assert!(e.contains("\"bogus\"") && e.contains("\"503\""), "{e}");
        // An Istio object may carry HTTP-only conditions: ignored there.
        let lenient = RetryOn::parse("5xx,retriable-4xx,503,unavailable", true).unwrap();
        assert!(lenient.covers(Outcome::Status(Code::Unavailable)));
        assert!(lenient.covers(Outcome::Reset));
        assert!(RetryOn::parse("", false).unwrap().is_empty());
        assert_eq!(Outcome::Status(Code::Unavailable).label(), "unavailable");
        assert_eq!(Outcome::TryTimeout.label(), "per_try_timeout");
    }

    #[test]
    fn pushback_is_a_wait_or_a_refusal() {
        assert_eq!(pushback(b"300"), Some(Duration::from_millis(300)));
        assert_eq!(pushback(b"0"), Some(Duration::ZERO));
        for bad in [&b"-1"[..], b"", b"soon", b"1.5", b"\xff"] {
            assert_eq!(pushback(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn backoff_is_jittered_and_bounded() {
        for n in 1..20 {
            for _ in 0..50 {
                let b = backoff(n);
                let ceiling = BACKOFF_BASE.saturating_mul(1 << (n - 1).min(16));
                assert!(b <= ceiling.min(BACKOFF_MAX), "{n}: {b:?}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_allows_its_ratio_plus_its_floor_over_its_window() {
        let budget = RetryBudget {
            ratio_permille: 100,
            min_per_second: 1,
            ttl: Duration::from_secs(10),
        };
        let w = BudgetWindow::default();
        let now = Instant::now();
        for _ in 0..1000 {
            w.deposit(now, &budget);
        }
        // 10% of 1000, plus 1/s over 10 s.
        let granted = (0..500).filter(|_| w.withdraw(now, &budget)).count();
        assert_eq!(granted, 110);
        // The window slides: after it, the calls and retries of then are forgotten.
        tokio::time::advance(Duration::from_secs(11)).await;
        let later = Instant::now();
        assert_eq!(w.totals(later, &budget), (0, 0));
        let granted = (0..500).filter(|_| w.withdraw(later, &budget)).count();
        assert_eq!(granted, 10, "only the floor without calls");
    }
}

/// The rule of `Call::retry` and what admission adds to a call (faults, circuit breaker,
/// retries), on the call layer alone with a paused clock.
#[cfg(test)]
mod call_tests {
    use std::{net::SocketAddr, sync::Arc};

    use super::*;
    use crate::{
        call::{Attempts, Calls, End, Target, registry::ConnInfo, route::PolicySet},
        config::{Config, Limits, Policy, PoolConfig},
        metrics::Metrics,
        state::{EndpointSpec, ServiceSpec, Source, Store, Update},
        wire::message::Fields,
    };

    const TARGET: Target = Target::Authority { default: None };

    /// Calls to service `greeter` over 3 endpoints, with the file's `routes` entry `routes`.
    fn calls(routes: &str) -> Arc<Calls> {
        let store = Store::new(PoolConfig::default());
        store.apply(Update::Reset(vec![ServiceSpec {
            name: "greeter".into(),
            authorities: vec!["greeter".into()],
            vips: vec![],
            policy: Policy::RoundRobin,
            endpoints: (1..=3)
                .map(|i| EndpointSpec::ready(SocketAddr::from(([10, 0, 0, i], 50051))))
                .collect(),
            balancing: Default::default(),
        }]));
        let metrics = Metrics::new(store.clone(), 10);
        let calls = Calls::new(store, metrics, Limits::default());
        let yaml = format!(
            "listeners: [{{address: 127.0.0.1:15001}}]\nroutes:\n  - service: greeter\n{routes}"
        );
        let config = Config::from_yaml(&yaml, "test").unwrap();
        calls
            .router
            .set(Source::File, PolicySet::from_config(&config.routes));
        calls
    }

    fn conn(calls: &Calls) -> Arc<ConnInfo> {
        let peer = "10.1.0.5:40000".parse().unwrap();
        calls.registry.open_connection(peer, peer, &TARGET)
    }

    fn request() -> Fields {
        let mut f = Fields::default();
        for (n, v) in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/helloworld.Greeter/SayHello"),
            (":authority", "greeter"),
        ] {
            f.push(n.as_bytes(), v.as_bytes());
        }
        f
    }

    fn answer(status: &str, extra: &[(&str, &str)]) -> Fields {
        let mut f = Fields::default();
        f.push(b":status", b"200");
        f.push(b"grpc-status", status.as_bytes());
        for (n, v) in extra {
            f.push(n.as_bytes(), v.as_bytes());
        }
        f
    }

    /// A call admitted and sent to its first endpoint.
    fn sent(calls: &Arc<Calls>) -> Box<crate::call::Call> {
        let admitted = calls
            .admit(&TARGET, &conn(calls), &request(), true)
            .unwrap();
        let guard = Attempts::default().next(&admitted.destination).unwrap();
        admitted.sent(calls.clone(), guard)
    }

    fn sample(calls: &Calls, name: &str, label: &str) -> f64 {
        calls
            .metrics
            .render()
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    const RETRY_2: &str = "    rules:\n      - name: r\n        backends: [{}]\n        retries: {attempts: 2, retry_on: unavailable}\n";

    #[tokio::test(start_paused = true)]
    async fn a_trailers_only_failure_is_retried_on_another_endpoint_until_attempts_run_out() {
        let calls = calls(RETRY_2);
        let mut call = sent(&calls);
        let first = call.guard.endpoint().addr;
        let now = Instant::now();
        // A status the policy does not name passes to the client; OK too.
        assert!(!call.retry_answer(&answer("13", &[]), now));
        assert!(!call.retry_answer(&answer("0", &[]), now));
        assert!(call.retry_answer(&answer("14", &[]), now));
        let at = call.retry_at().unwrap();
        assert!(at >= now && at <= now + BACKOFF_BASE, "{at:?}");
        let replay = call.replay.as_ref().unwrap();
        assert_eq!(
            replay.fields.get(b"grpc-previous-rpc-attempts"),
            Some(&b"1"[..])
        );
        // The next attempt goes to an endpoint not tried yet.
        let mut attempts = Attempts::new(replay.tried.clone(), None).since(replay.attempts_from);
        let guard = attempts.next(&call.destination).unwrap();
        assert_ne!(guard.endpoint().addr, first);
        call.resent(guard);
        assert!(call.retry_answer(&answer("14", &[]), Instant::now()));
        assert_eq!(
            call.replay
                .as_ref()
                .unwrap()
                .fields
                .get(b"grpc-previous-rpc-attempts"),
            Some(&b"2"[..]),
            "one header, the count of attempts before"
        );
        // Two retries made: the third failure ends the call as it is.
        assert!(!call.retry_answer(&answer("14", &[]), Instant::now()));
        call.finish(End::Status("14"));
        assert_eq!(
            sample(&calls, "balancer_call_retries_total", "unavailable"),
            2.0
        );
        let exhausted = r#"reason="attempts_exhausted""#;
        assert_eq!(
            sample(&calls, "balancer_calls_not_retried_total", exhausted),
            1.0
        );
        assert_eq!(calls.active(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn pushback_sets_the_wait_or_stops_the_retries() {
        let calls = calls(RETRY_2);
        let mut call = sent(&calls);
        let now = Instant::now();
        let pushback = answer("14", &[("grpc-retry-pushback-ms", "750")]);
        assert!(call.retry_answer(&pushback, now));
        assert_eq!(call.retry_at(), Some(now + Duration::from_millis(750)));
        let mut call = sent(&calls);
        let refused = answer("14", &[("grpc-retry-pushback-ms", "-5")]);
        assert!(!call.retry_answer(&refused, now));
        assert_eq!(
            sample(&calls, "balancer_calls_not_retried_total", "pushback"),
            1.0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn what_is_not_held_or_already_answered_is_not_retried() {
        let calls = calls(RETRY_2);
        let now = Instant::now();
        let mut large = sent(&calls);
        large.request_data(&vec![0; crate::call::REPLAY_LIMIT + 1], false);
        assert!(!large.retry(Outcome::Status(Code::Unavailable), None, now));
        let mut trailers = sent(&calls);
        trailers.request_trailers();
        assert!(!trailers.retry(Outcome::Status(Code::Unavailable), None, now));
        let mut started = sent(&calls);
        assert!(started.responded());
        started.finish(End::Status("14"));
        for reason in ["request_too_large", "request_trailers", "response_started"] {
            let label = format!("reason=\"{reason}\"");
            let n = sample(&calls, "balancer_calls_not_retried_total", &label);
            assert_eq!(n, 1.0, "{reason}");
        }
        // A reset is retried only when the policy names it.
        assert!(!large.retry(Outcome::Reset, None, now));
        large.finish(End::Reset);
        trailers.finish(End::Reset);
    }

    #[tokio::test(start_paused = true)]
    async fn a_per_try_timeout_expires_the_attempt_before_the_call() {
        let routes = "    rules:\n      - name: r\n        backends: [{}]\n        timeout_ms: 1000\n        retries: {attempts: 1, per_try_timeout_ms: 300, retry_on: deadline-exceeded}\n";
        let calls = calls(routes);
        let call = sent(&calls);
        let start = Instant::now();
        assert_eq!(
            call.attempt_deadline(),
            Some(start + Duration::from_millis(300))
        );
        tokio::time::advance(Duration::from_millis(301)).await;
        assert_eq!(call.expiry(Instant::now()), crate::call::Expiry::Attempt);
        tokio::time::advance(Duration::from_millis(700)).await;
        assert_eq!(call.expiry(Instant::now()), crate::call::Expiry::Call);
        call.finish(End::Status("4"));
        // The proxy's own DEADLINE_EXCEEDED at the deadline is not counted as not retried.
        assert_eq!(
            sample(&calls, "balancer_calls_not_retried_total", "reason"),
            0.0
        );
    }

    #[tokio::test]
    async fn admission_draws_faults_and_counts_calls_against_the_breaker() {
        let routes = "    connection_pool: {max_requests: 2}\n    rules:\n      - name: chaos\n        backends: [{}]\n        fault: {abort: {grpc_status: PERMISSION_DENIED, percent: 100}}\n";
        let calls = calls(routes);
        let conn = conn(&calls);
        let refused = calls.admit(&TARGET, &conn, &request(), true).unwrap_err();
        assert_eq!(refused.status.code, Code::PermissionDenied);
        assert!(refused.status.message.contains("route chaos"));
        calls.refused(&refused);
        assert_eq!(
            sample(&calls, "balancer_faults_injected_total", "abort"),
            1.0
        );

        let routes = "    connection_pool: {max_requests: 2}\n    rules:\n      - name: slow\n        backends: [{}]\n        fault: {delay: {fixed_delay_ms: 50}}\n";
        let calls = self::calls(routes);
        let conn = self::conn(&calls);
        let a = calls.admit(&TARGET, &conn, &request(), true).unwrap();
        assert_eq!(
            a.fault.as_ref().unwrap().delay,
            Some(Duration::from_millis(50))
        );
        let b = calls.admit(&TARGET, &conn, &request(), true).unwrap();
        let over = calls.admit(&TARGET, &conn, &request(), true).unwrap_err();
        assert_eq!(over.status.code, Code::ResourceExhausted);
        assert!(over.status.message.contains("max_requests"));
        calls.refused(&over);
        a.cancelled(&calls);
        let c = calls.admit(&TARGET, &conn, &request(), true).unwrap();
        b.cancelled(&calls);
        c.cancelled(&calls);
        assert_eq!(calls.active(), 0);
    }
}
