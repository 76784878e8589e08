//! The call layer: every rule about a gRPC call, in one place and without I/O. The engine
//! (`relay`, a layer above) moves frames and asks this layer what to do with a call:
//!
//! ```text
//! request head ──▶ Calls::admit ──▶ which service, admitted or the proxy's own answer
//!                  (the seam for routes, faults, authorization: a rule that picks the
//!                   backends or answers the call itself goes here)
//!                       │
//!                       ▼
//!                  Attempts::next ──▶ which endpoint, within MAX_ATTEMPTS; when none is left,
//!                  (the seam for retries)  the status that says why (Attempts::exhausted)
//!                       │
//!                       ▼
//!                  Call (sent) ──▶ request DATA kept for a replay (Call::request_data,
//!                                  REPLAY_LIMIT), replay or not (Call::replay_refusal),
//!                                  the deadline and the time left passed on (deadline_field),
//!                                  how the call ends and is counted (Call::finish)
//! ```
//!
//! The proxy's own answers are gRPC statuses ([`grpc::Status`]) written as header fields
//! ([`answer_fields`]): trailers-only when nothing was sent on the stream, trailers otherwise.
//! Nothing here reads a socket or a clock other than tokio's, so the rules are unit-tested with
//! a paused clock.
#![forbid(unsafe_code)]

pub mod breaker;
pub mod fault;
pub mod grpc;
pub mod registry;
pub mod retry;
pub mod route;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
};

use arc_swap::ArcSwap;
use bytes::BytesMut;
use tokio::time::Instant;

use crate::{
    balance::{CallGuard, PickContext},
    config::Limits,
    metrics::{Metrics, RouteLabels},
    state::{Service, Snapshot, Store},
    wire::message::Fields,
};

use grpc::{Code, MessageCounter, Status};
use registry::{CallHandle, ConnInfo, Registry};
use retry::{CallRetry, NoRetry, Outcome};
use route::{Destination, Router};

/// What selects the service of a connection's calls.
#[derive(Clone, Debug)]
pub enum Target {
    /// The datapath recorded the VIP the client dialed.
    Vip(SocketAddr),
    /// Each call's `:authority`, falling back to the listener's default service.
    Authority {
        /// The listener's default service.
        default: Option<Arc<str>>,
    },
}

impl Target {
    /// The service for a call with `authority` in `snapshot`.
    pub fn resolve<'s>(
        &self,
        snapshot: &'s Snapshot,
        authority: Option<&str>,
    ) -> Option<&'s Arc<Service>> {
        match self {
            Target::Vip(vip) => snapshot.by_vip(vip),
            Target::Authority { default } => authority
                .and_then(|a| snapshot.by_authority(a))
                .or_else(|| default.as_deref().and_then(|d| snapshot.by_name(d))),
        }
    }

    /// How this target reads in logs and in `inspect`.
    pub fn describe(&self) -> String {
        match self {
            Target::Vip(v) => format!("vip {v}"),
            Target::Authority { default: Some(d) } => format!("authority (default {d})"),
            Target::Authority { default: None } => "authority".into(),
        }
    }
}

/// What every call shares: the store it is routed from, the metrics it ends in, the limits it
/// is admitted under, the registry `inspect` reads.
pub struct Calls {
    /// Services and endpoints.
    pub store: Arc<Store>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The limits in force (a reload replaces them: [`Calls::set_limits`]).
    limits: ArcSwap<Limits>,
    /// Live connections and calls, for `inspect`.
    pub registry: Registry,
    /// The traffic policy in force: routes, backends, subsets.
    pub router: Arc<Router>,
    /// Each service's circuit breaker and retry budget counters; retry, fault and overflow
    /// metrics.
    pub resilience: breaker::Registry,
    active: AtomicUsize,
}

impl std::fmt::Debug for Calls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Calls")
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

/// Endpoints tried for one call at most (connect failures, full connections, refused streams).
pub const MAX_ATTEMPTS: usize = 3;

/// Request bodies up to this size are kept until the response starts, to replay the call on
/// another endpoint if the first one refused the stream unprocessed (REFUSED_STREAM, or above
/// a GOAWAY's last stream id).
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// A call admitted, on its way to an endpoint: what it is made of until it has one.
#[derive(Debug)]
pub struct Admitted {
    /// Its service.
    pub service: Arc<Service>,
    /// Where its route sends it (no route: all its service's endpoints).
    pub destination: Destination,
    /// The route that took it.
    pub route: Option<Arc<str>>,
    /// Its `:path`.
    pub path: http::uri::PathAndQuery,
    /// When its headers arrived.
    pub start: Instant,
    /// Its entry in the registry.
    pub registration: CallHandle,
    /// Its request as kept so far (the headers, as its route changed them, and DATA once it
    /// comes).
    pub replay: Box<Replay>,
    /// Its route's retries under way.
    pub retry: Option<retry::RetryPolicy>,
    /// The faults drawn for it, if any: sent on after `delay`, or answered with `abort` (after
    /// the delay).
    pub fault: Option<Box<fault::Injected>>,
    /// Counted in flight to its destination service (its circuit breaker).
    pub in_flight: Option<breaker::InFlight>,
    /// Its destination service's own resilience settings (pool, outlier detection), if any.
    pub resilience: Option<Box<route::Resilience>>,
}

/// A call the proxy answers itself, before it has an endpoint.
#[derive(Debug)]
pub struct Refused {
    /// Its service, if one was found.
    pub service: Option<Arc<Service>>,
    /// Its `:path`.
    pub path: http::uri::PathAndQuery,
    /// When its headers arrived.
    pub start: Instant,
    /// The answer.
    pub status: Status,
}

/// What [`Calls::guard`] adds to an admitted call.
#[derive(Default)]
struct Guarded {
    retry: Option<retry::RetryPolicy>,
    fault: fault::Injected,
    in_flight: Option<breaker::InFlight>,
    resilience: Option<Box<route::Resilience>>,
}

impl Calls {
    /// The calls of a proxy over `store`.
    pub fn new(store: Arc<Store>, metrics: Arc<Metrics>, limits: Limits) -> Arc<Self> {
        let router = Router::new(&store, metrics.clone());
        Arc::new(Self {
            resilience: breaker::Registry::new(&metrics),
            store,
            metrics,
            limits: ArcSwap::from_pointee(limits),
            registry: Registry::default(),
            router,
            active: AtomicUsize::new(0),
        })
    }

    /// The limits in force. A connection takes them once, when it is accepted, and keeps them
    /// (its SETTINGS told the client so).
    pub fn limits(&self) -> Arc<Limits> {
        self.limits.load_full()
    }

    /// Puts `limits` in force (a reload): for connections accepted from now on, and at once
    /// for what is counted across connections (calls in flight, connections, method labels).
    pub fn set_limits(&self, limits: Limits) {
        self.metrics.set_max_methods(limits.max_methods_per_service);
        self.limits.store(Arc::new(limits));
    }

    /// Calls in flight.
    pub fn active(&self) -> usize {
        self.active.load(Relaxed)
    }

    /// A request's headers (`fields`, already checked well-formed; `end`: they ended the
    /// request) arrived on a connection of `target` registered as `conn`: the call is counted
    /// in flight, and admitted with its service and where its route sends it (the route's
    /// header changes and timeout applied to the request kept), or refused with the proxy's
    /// own answer (no service, over `limits.max_active_calls`, a route without a backend to
    /// go to). A refused call is still in flight until [`Calls::refused`] records it.
    pub fn admit(
        &self,
        target: &Target,
        conn: &Arc<ConnInfo>,
        fields: &Fields,
        end: bool,
    ) -> Result<Admitted, Refused> {
        let start = Instant::now();
        let deadline = fields
            .get(b"grpc-timeout")
            .and_then(grpc::parse_timeout)
            .map(|t| start + t);
        let path = fields
            .get(b":path")
            .and_then(|p| http::uri::PathAndQuery::try_from(p).ok())
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        let registration = conn.start_call(Some(&path));
        let active = self.started();
        let snapshot = self.store.snapshot();
        let authority = fields
            .get(b":authority")
            .and_then(|a| std::str::from_utf8(a).ok());
        let Some(service) = target.resolve(&snapshot, authority).cloned() else {
            let what = match (target, authority) {
                (Target::Vip(vip), _) => format!("no service has VIP {vip}"),
                (_, Some(a)) => format!("no service for authority {a:?} and no default service"),
                (_, None) => "no :authority and no default service".into(),
            };
            let status = Status::unavailable(what);
            return Err(Refused {
                service: None,
                path,
                start,
                status,
            });
        };
        if active >= self.limits.load().max_active_calls {
            let status = Status::exhausted(format!(
                "proxy overloaded: {active} calls in flight (limits.max_active_calls)"
            ));
            return Err(Refused {
                service: Some(service),
                path,
                start,
                status,
            });
        }
        let table = self.router.table();
        // The client pod, when known (a pod of this node): otherwise routes with a source
        // condition take none of its calls.
        let request = route::Request::new(fields, conn.source.as_deref());
        // The route, then what it and its destination's policy add (faults, circuit
        // breaker, retries).
        let routed = table.decide(&service, &request).and_then(|d| {
            let guarded = self.guard(&table, &d, &service, start)?;
            Ok((d, guarded))
        });
        let (decision, guarded) = match routed {
            Ok(routed) => routed,
            Err(status) => {
                return Err(Refused {
                    service: Some(service),
                    path,
                    start,
                    status,
                });
            }
        };
        let mut deadline = deadline;
        let mut sent_fields = None;
        if let Some(r) = decision.route {
            let action = &r.route.action;
            if !action.request_headers.is_empty() {
                sent_fields = Some(action.request_headers.apply(fields));
            }
            if let Some(t) = action.timeout.filter(|t| !t.is_zero())
                && deadline.is_none_or(|d| start + t < d)
            {
                if deadline.is_none() {
                    // The relay writes the time left into it when the call leaves.
                    sent_fields
                        .get_or_insert_with(|| fields.clone())
                        .push(b"grpc-timeout", b"0n");
                }
                deadline = Some(start + t);
            }
        }
        // A ring-hash destination keys the call by its header (as the client sent it).
        let hash = decision
            .destination
            .balancer()
            .hash_header()
            .and_then(|h| fields.get(h.as_bytes()))
            .map(crate::balance::ring::key);
        let replay = Box::new(Replay {
            hash,
            fields: sent_fields.unwrap_or_else(|| fields.clone()),
            data: BytesMut::new(),
            complete: end,
            deadline,
            tried: Vec::new(),
            attempts_from: 0,
        });
        Ok(Admitted {
            service,
            destination: decision.destination,
            route: decision.route.map(|r| r.name.clone()),
            path,
            start,
            registration,
            replay,
            retry: guarded.retry,
            fault: (!guarded.fault.is_none()).then(|| Box::new(guarded.fault)),
            in_flight: guarded.in_flight,
            resilience: guarded.resilience,
        })
    }

    /// What a call's route and its destination's policy add to it: the faults drawn, the call
    /// counted against the destination's circuit breaker, its retries; or the proxy's answer
    /// (an abort without a delay, a limit reached).
    fn guard(
        &self,
        table: &route::Table,
        decision: &route::Decision<'_>,
        service: &Service,
        now: Instant,
    ) -> Result<Guarded, Status> {
        let mut guarded = Guarded::default();
        let dest = &decision.destination.service;
        let policy = table.service(dest).map(|s| &s.policy.resilience);
        if let Some(r) = decision.route {
            let action = &r.route.action;
            if let Some(f) = &action.fault {
                guarded.fault = f.draw(&r.name);
                let faults = &self.resilience.faults;
                for (kind, drawn) in [
                    ("delay", guarded.fault.delay.is_some()),
                    ("abort", guarded.fault.abort.is_some()),
                ] {
                    if drawn {
                        faults
                            .with_label_values(&[&service.name, &r.name, kind])
                            .inc();
                    }
                }
                if guarded.fault.delay.is_none()
                    && let Some(abort) = guarded.fault.abort.take()
                {
                    return Err(abort);
                }
            }
            if let Some(p) = action.retries.filter(|p| p.attempts > 0) {
                let budget = policy.map(|p| p.budget()).unwrap_or_default();
                self.resilience
                    .with_state(dest.id, |s| s.budget.deposit(now, &budget));
                guarded.retry = Some(p);
            }
        }
        if let Some(p) = policy.filter(|p| !p.is_empty()) {
            let max = p.connection_pool.and_then(|c| c.max_requests);
            guarded.in_flight = Some(self.resilience.admit(dest.id, &dest.name, max)?);
            guarded.resilience = Some(Box::new(*p));
        }
        Ok(guarded)
    }

    /// Counts a call of `destination` as waiting for an endpoint connection, under its
    /// service's `max_pending_requests`: the answer when it is reached. `None`: no limit.
    pub fn pending(&self, destination: &Destination) -> Result<Option<breaker::Pending>, Status> {
        let service = &destination.service;
        let table = self.router.table();
        let max = table
            .service(service)
            .and_then(|s| s.policy.resilience.connection_pool)
            .and_then(|c| c.max_pending_requests);
        match max {
            Some(max) => self
                .resilience
                .pending(service.id, &service.name, max)
                .map(Some),
            None => Ok(None),
        }
    }

    /// A call that ended before it had an endpoint, with gRPC status `code` (the proxy's own
    /// answer, or `1` when the client cancelled it): counted, and out of flight.
    pub fn unrouted_ended(
        &self,
        service: Option<&Service>,
        path: &http::uri::PathAndQuery,
        start: Instant,
        code: &str,
        to: RouteLabels<'_>,
    ) {
        self.metrics
            .record_call(service, path.path(), code, start.elapsed(), (0, 0), to);
        self.ended();
    }

    /// A call refused at admission was answered.
    pub fn refused(&self, r: &Refused) {
        let code = (r.status.code as u16).to_string();
        let to = RouteLabels::default();
        self.unrouted_ended(r.service.as_deref(), &r.path, r.start, &code, to);
    }

    /// A call started: counted in flight. Returns the calls in flight before it.
    fn started(&self) -> usize {
        self.metrics.active_calls.inc();
        self.active.fetch_add(1, Relaxed)
    }

    fn ended(&self) {
        self.metrics.active_calls.dec();
        self.active.fetch_sub(1, Relaxed);
    }
}

impl Admitted {
    /// The call sent to the endpoint of `guard`: from here on it is a [`Call`].
    pub fn sent(self, calls: Arc<Calls>, mut guard: CallGuard) -> Box<Call> {
        self.registration
            .routed(&self.service.name, guard.endpoint().addr);
        guard.sent();
        let retry = self.retry.map(|p| {
            let mut r = CallRetry::new(p, self.destination.service.id);
            // The first attempt's time counts from the call's start (no clock read per call).
            r.attempt_sent(|| self.start);
            r
        });
        Box::new(Call {
            calls,
            deadline: self.replay.deadline,
            retry,
            _in_flight: self.in_flight,
            resilience: self.resilience,
            request_trailers: false,
            service: self.service,
            destination: self.destination,
            route: self.route,
            path: self.path,
            start: self.start,
            guard,
            registration: self.registration,
            messages: Default::default(),
            responded: false,
            replay: Some(self.replay),
        })
    }

    /// The client cancelled it before it had an endpoint.
    pub fn cancelled(self, calls: &Calls) {
        let to = route_labels(&self.service, &self.destination, self.route.as_deref());
        calls.unrouted_ended(Some(&self.service), &self.path, self.start, "1", to);
    }

    /// It could not be sent (every endpoint tried failed, or its deadline passed on the way):
    /// answered with `status`.
    pub fn failed(self, calls: &Calls, status: &Status) {
        let code = (status.code as u16).to_string();
        let to = route_labels(&self.service, &self.destination, self.route.as_deref());
        calls.unrouted_ended(Some(&self.service), &self.path, self.start, &code, to);
    }
}

/// The metric labels of a call to `service` that `route` sent to `destination`.
fn route_labels<'a>(
    service: &Service,
    destination: &'a Destination,
    route: Option<&'a str>,
) -> RouteLabels<'a> {
    let Some(route) = route else {
        return RouteLabels::default();
    };
    RouteLabels {
        route,
        destination: (destination.service.id != service.id).then_some(&*destination.service),
        subset: destination.subset().unwrap_or(""),
    }
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End<'a> {
    /// With this grpc-status (the endpoint's, or the proxy's own).
    Status(&'a str),
    /// The client went away or reset the stream.
    Cancelled,
    /// A reset ended it: the endpoint's (passed to the client), or the proxy's for a stream
    /// error of the client's.
    Reset,
    /// The endpoint's connection was lost: UNAVAILABLE, and a failure of the endpoint.
    Lost,
}

/// A call sent to an endpoint: what its metrics and its endpoint's statistics need when it
/// ends. It lives on the endpoint side of the call (the endpoint's answer ends it).
#[derive(Debug)]
pub struct Call {
    /// What every call shares.
    pub calls: Arc<Calls>,
    /// Its service.
    pub service: Arc<Service>,
    /// Where its route sent it: a replay goes to the same service or subset, even if the
    /// policy changed meanwhile.
    pub destination: Destination,
    /// The route that took it.
    pub route: Option<Arc<str>>,
    /// Its `:path`.
    pub path: http::uri::PathAndQuery,
    /// When its headers arrived.
    pub start: Instant,
    /// The endpoint it was sent to, counted in flight there.
    pub guard: CallGuard,
    /// Its entry in the registry.
    pub registration: CallHandle,
    /// gRPC messages of the request and of the response.
    pub messages: [MessageCounter; 2],
    /// The endpoint answered with headers.
    pub responded: bool,
    /// What it takes to send the call to another endpoint, until the response starts or the
    /// request outgrows [`REPLAY_LIMIT`].
    pub replay: Option<Box<Replay>>,
    /// Its deadline: the client's `grpc-timeout` or its route's timeout, the sooner.
    pub deadline: Option<Instant>,
    /// Its route's retries under way.
    pub retry: Option<CallRetry>,
    /// Counted in flight to its destination service, until it ends.
    _in_flight: Option<breaker::InFlight>,
    /// Its destination service's own resilience settings (pool, outlier detection), if any.
    pub resilience: Option<Box<route::Resilience>>,
    /// The client ended its request with trailers (so it was not kept for a replay).
    request_trailers: bool,
}

/// What passed of a call's time ([`Call::expiry`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// Nothing: the call and its attempt have time left.
    None,
    /// The attempt in flight's own timeout (`per_try_timeout`); the call has time left.
    Attempt,
    /// The call's deadline.
    Call,
}

/// A call's request as the client sent it so far, kept for a replay.
#[derive(Debug)]
pub struct Replay {
    /// The request headers.
    pub fields: Fields,
    /// The request DATA so far.
    pub data: BytesMut,
    /// The client ended the request.
    pub complete: bool,
    /// The call's deadline (`grpc-timeout`).
    pub deadline: Option<Instant>,
    /// Endpoints tried, in order.
    pub tried: Vec<SocketAddr>,
    /// How many of `tried` came before the attempt under way (a retry): the attempt may try
    /// [`MAX_ATTEMPTS`] endpoints of its own.
    pub attempts_from: usize,
    /// The call's key for a `ring-hash` destination (its `hash_header`, hashed).
    pub hash: Option<u64>,
}

impl Call {
    /// A call an endpoint refused unprocessed, or retried, sent again to the endpoint of
    /// `guard` (the last endpoint's guard goes: its outcome is recorded already).
    pub fn resent(&mut self, mut guard: CallGuard) {
        self.registration
            .routed(&self.service.name, guard.endpoint().addr);
        guard.sent();
        self.guard = guard;
        if let Some(r) = self.retry.as_mut() {
            r.attempt_sent(Instant::now);
        }
    }

    /// When the attempt in flight must end: the call's deadline, or the attempt's own
    /// (`per_try_timeout`), the sooner. The endpoint is told the call's.
    pub fn attempt_deadline(&self) -> Option<Instant> {
        let attempt = self.retry.as_ref().and_then(|r| r.try_deadline);
        match (self.deadline, attempt) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// What passed of the call's time at `now`.
    pub fn expiry(&self, now: Instant) -> Expiry {
        if self.deadline.is_some_and(|d| d <= now) {
            Expiry::Call
        } else if self
            .retry
            .as_ref()
            .and_then(|r| r.try_deadline)
            .is_some_and(|d| d <= now)
        {
            Expiry::Attempt
        } else {
            Expiry::None
        }
    }

    /// When the next attempt may leave, if the call is being retried (a backoff, or the
    /// server's pushback).
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry.as_ref().and_then(|r| r.retry_at)
    }

    /// The endpoint answered trailers-only with a failure (`fields`) at `now`, once the call's
    /// deadline passed: the endpoint ended the call at the deadline it was told (tonic says
    /// CANCELLED then). The client gets the proxy's DEADLINE_EXCEEDED instead, as when the
    /// proxy's own timer runs first.
    pub fn late_answer(&self, fields: &Fields, now: Instant) -> Option<Status> {
        let failed = fields.get(b"grpc-status").is_some_and(|s| s != b"0");
        (failed && !self.responded && self.deadline.is_some_and(|d| d <= now))
            .then(|| deadline_status(&self.service.name, "on a call to"))
    }

    /// The endpoint answered trailers-only with `fields` (a gRPC status before any message):
    /// whether the call is tried again (see [`Call::retry`]). Nothing of the answer reached
    /// the client yet.
    pub fn retry_answer(&mut self, fields: &Fields, now: Instant) -> bool {
        if self.retry.is_none() {
            return false;
        }
        match fields.get(b"grpc-status").and_then(Code::from_status) {
            Some(code) => self.retry(Outcome::Status(code), Some(fields), now),
            None => false,
        }
    }

    /// The attempt in flight ended with `outcome` (`answer`: the endpoint's trailers-only
    /// answer, if that is how): whether the call is tried again, by the rule of [`retry`].
    /// If it is, the attempt's outcome is recorded on its endpoint, the next attempt may
    /// leave at [`Call::retry_at`] with `grpc-previous-rpc-attempts`, and the caller hands
    /// the call back to its client connection to be routed again. If not, why is counted
    /// (when the policy covers the outcome) and the call ends as it is.
    pub fn retry(&mut self, outcome: Outcome, answer: Option<&Fields>, now: Instant) -> bool {
        let Some(r) = &self.retry else {
            return false;
        };
        if !r.policy.retry_on.covers(outcome) {
            return false;
        }
        let decision = self.may_retry(answer, now);
        let labels = [&*self.service.name, self.route.as_deref().unwrap_or("")];
        let r = self.retry.as_mut().expect("checked");
        let at = match decision {
            Ok(at) => at,
            Err(why) => {
                r.settled = true;
                self.calls
                    .resilience
                    .not_retried
                    .with_label_values(&[labels[0], labels[1], why.label()])
                    .inc();
                return false;
            }
        };
        r.retries += 1;
        r.retry_at = Some(at);
        let previous = r.retries.to_string();
        self.calls
            .resilience
            .retries
            .with_label_values(&[labels[0], labels[1], outcome.label()])
            .inc();
        match outcome {
            Outcome::Status(_) => {
                let status = answer.and_then(|f| f.get(b"grpc-status"));
                answered(&self.guard, self.resilience.as_deref(), status);
            }
            Outcome::Reset => self.guard.failed(),
            Outcome::TryTimeout => {}
        }
        let replay = self.replay.as_mut().expect("checked by may_retry");
        let mut fields = Fields::default();
        for (n, v) in replay.fields.iter() {
            if n != b"grpc-previous-rpc-attempts" {
                fields.push(n, v);
            }
        }
        fields.push(b"grpc-previous-rpc-attempts", previous.as_bytes());
        replay.fields = fields;
        replay.attempts_from = replay.tried.len();
        true
    }

    /// The rule of [`retry`] for an attempt that ended with `outcome`, which the policy
    /// covers: when the next attempt may leave, or why there is none.
    fn may_retry(&mut self, answer: Option<&Fields>, now: Instant) -> Result<Instant, NoRetry> {
        if self.responded {
            return Err(NoRetry::ResponseStarted);
        }
        if self.replay.is_none() {
            return Err(if self.request_trailers {
                NoRetry::RequestTrailers
            } else {
                NoRetry::RequestTooLarge
            });
        }
        let r = self.retry.as_mut().expect("a policy");
        if r.retries >= r.policy.attempts {
            return Err(NoRetry::AttemptsExhausted);
        }
        let wait = match answer.and_then(|f| f.get(b"grpc-retry-pushback-ms")) {
            Some(v) => retry::pushback(v).ok_or(NoRetry::Pushback)?,
            None => retry::backoff(r.retries + 1),
        };
        let at = now + wait;
        if self.deadline.is_some_and(|d| at >= d) {
            return Err(NoRetry::Deadline);
        }
        let table = self.calls.router.table();
        let policy = table
            .service(&self.destination.service)
            .map(|s| s.policy.resilience)
            .unwrap_or_default();
        let state = self.calls.resilience.state(r.service);
        if !r.hold_retry(state.clone(), policy.max_retries()) {
            self.calls
                .resilience
                .overflowed(&self.destination.service.name, breaker::Limit::MaxRetries);
            return Err(NoRetry::MaxRetries);
        }
        if !state.budget.withdraw(now, &policy.budget()) {
            return Err(NoRetry::BudgetExhausted);
        }
        Ok(at)
    }

    /// Request DATA from the client: counted, and kept for a replay while it is small.
    pub fn request_data(&mut self, data: &[u8], end: bool) {
        self.messages[0].feed(data);
        if let Some(r) = self.replay.as_mut() {
            if r.data.len() + data.len() > REPLAY_LIMIT {
                self.replay = None;
            } else {
                r.data.extend_from_slice(data);
                r.complete = end;
            }
        }
    }

    /// The endpoint answered with headers: the call is taken, no replay from here on.
    pub fn responded(&mut self) -> bool {
        if self.responded {
            return false;
        }
        self.responded = true;
        self.replay = None;
        self.guard.first_byte();
        true
    }

    /// The client sent request trailers: such a request is not replayed (gRPC clients send
    /// none).
    pub fn request_trailers(&mut self) {
        self.replay = None;
        self.request_trailers = true;
    }

    /// The endpoint refused the call unprocessed: why it cannot be sent to another one, if it
    /// cannot (its request outgrew the replay buffer, or its deadline passed).
    pub fn replay_refusal(&self, now: Instant) -> Option<Status> {
        let refused = self.guard.endpoint().addr;
        let Some(r) = &self.replay else {
            return Some(Status::unavailable(format!(
                "endpoint {refused} refused the call unprocessed, and its request outgrew the \
                 replay buffer"
            )));
        };
        r.deadline
            .is_some_and(|d| d <= now)
            .then(|| deadline_status(&self.service.name, "on the way to"))
    }

    /// Records the end of the call in the metrics and the endpoint's statistics.
    pub fn finish(self: Box<Self>, end: End<'_>) {
        let status = match end {
            End::Status(s) => {
                answered(&self.guard, self.resilience.as_deref(), Some(s.as_bytes()));
                s
            }
            End::Cancelled => "1",
            End::Reset => "reset",
            End::Lost => {
                self.guard.failed();
                "14"
            }
        };
        self.count_not_retried(end);
        self.calls.metrics.record_call(
            Some(&self.service),
            self.path.path(),
            status,
            self.start.elapsed(),
            (self.messages[0].count, self.messages[1].count),
            route_labels(&self.service, &self.destination, self.route.as_deref()),
        );
        self.calls.ended();
    }
}

impl Call {
    /// A call ends with a failure its policy retries, and no retry was decided on it: the
    /// response had started (an error in the trailers, a reset after the headers). Counted as
    /// not retried for that reason. The proxy's own DEADLINE_EXCEEDED at the call's deadline
    /// is not such a failure.
    fn count_not_retried(&self, end: End<'_>) {
        let Some(r) = self.retry.as_ref().filter(|r| !r.settled) else {
            return;
        };
        let outcome = match end {
            End::Status(s) => Code::from_status(s.as_bytes()).map(Outcome::Status),
            End::Reset | End::Lost => Some(Outcome::Reset),
            End::Cancelled => None,
        };
        if self.responded
            && outcome.is_some_and(|o| r.policy.retry_on.covers(o))
            && self.deadline.is_none_or(|d| d > Instant::now())
        {
            self.calls
                .resilience
                .not_retried
                .with_label_values(&[
                    &self.service.name,
                    self.route.as_deref().unwrap_or(""),
                    NoRetry::ResponseStarted.label(),
                ])
                .inc();
        }
    }
}

/// The endpoint of `guard` answered with `status`: recorded for outlier detection, by the
/// statuses its service counts as failures (`resilience`), or the node-wide ones.
fn answered(guard: &CallGuard, resilience: Option<&route::Resilience>, status: Option<&[u8]>) {
    match resilience.and_then(|r| r.outlier_detection) {
        Some(o) => guard.answered_as(status, status.is_some_and(|s| o.codes.is_failure(s))),
        None => guard.answered(status),
    }
}

/// Why an endpoint tried for a call did not take it.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// Every pooled connection to it was at its stream limit.
    #[error("endpoint {0}: every pooled connection full")]
    Full(SocketAddr),
    /// It refused the call unprocessed (REFUSED_STREAM, or above a GOAWAY's last stream id).
    #[error("endpoint {0} refused the call unprocessed")]
    Refused(SocketAddr),
    /// It could not be reached: the engine's error (the connect refused or timed out, the
    /// connection closed at once).
    #[error(transparent)]
    Unreachable(Box<dyn std::error::Error + Send + Sync>),
}

/// The endpoints a call tried, and the rule for the next one.
#[derive(Debug, Default)]
pub struct Attempts {
    /// The endpoints tried, in order.
    pub tried: Vec<SocketAddr>,
    /// One was full (every pooled connection at its stream limit).
    full: bool,
    /// One failed (connect failure, or it refused the call).
    failed: bool,
    last_error: Option<AttemptError>,
    /// Endpoints of `tried` that earlier attempts (retries) tried.
    from: usize,
    /// The destination service's own outlier detection, applied to each endpoint picked.
    outlier: Option<route::OutlierDetection>,
    /// The call's key for a `ring-hash` destination.
    hash: Option<u64>,
}

impl Attempts {
    /// Attempts so far: `tried`, and why the last one did not take the call (a replay).
    pub fn new(tried: Vec<SocketAddr>, last_error: Option<AttemptError>) -> Self {
        let mut attempts = Self {
            tried,
            ..Self::default()
        };
        if let Some(e) = last_error {
            attempts.record(e);
        }
        attempts
    }

    /// With the call's key for a `ring-hash` destination ([`Replay::hash`]).
    pub fn keyed(mut self, hash: Option<u64>) -> Self {
        self.hash = hash;
        self
    }

    /// For a retry: the endpoints before `from` in `tried` were the earlier attempts'. This
    /// attempt may try [`MAX_ATTEMPTS`] endpoints of its own, and goes to one the call has
    /// not tried while there is one, else to another than the last attempt's.
    pub fn since(mut self, from: usize) -> Self {
        self.from = from.min(self.tried.len());
        self
    }

    /// With the destination service's own outlier detection (over the node-wide one), if it
    /// has one: the endpoints picked are judged by it.
    pub fn judged_by(mut self, resilience: Option<&route::Resilience>) -> Self {
        self.outlier = resilience.and_then(|r| r.outlier_detection);
        self
    }

    /// The next endpoint of `destination` to try, within [`MAX_ATTEMPTS`] (for this attempt);
    /// counted as tried.
    pub fn next(&mut self, destination: &Destination) -> Option<CallGuard> {
        if self.tried.len() - self.from >= MAX_ATTEMPTS {
            return None;
        }
        let pick = |avoid| {
            destination.balancer().pick_with(PickContext {
                avoid,
                hash: self.hash,
            })
        };
        let mut guard = pick(&self.tried)
            .or_else(|| (self.from > 0).then(|| pick(&self.tried[self.from - 1..]))?)
            .or_else(|| (self.from > 0).then(|| pick(&self.tried[self.from..]))?)?;
        if let Some(o) = &self.outlier {
            let mut failures = o.over(guard.failures());
            if o.max_ejection_percent < 100 {
                // At most that share of the destination's endpoints ejected at once, as Envoy
                // counts it: a failure that would eject one more ejects none.
                let ready = destination.balancer().ready();
                let ejected = ready.iter().filter(|e| e.stats.ejected()).count();
                if (ejected + 1) * 100 > ready.len() * o.max_ejection_percent as usize {
                    failures.consecutive_failures = 0;
                }
            }
            guard.set_failures(failures);
        }
        self.tried.push(guard.endpoint().addr);
        Some(guard)
    }

    /// Why the endpoint tried last did not take the call (the call was not sent).
    pub fn record(&mut self, why: AttemptError) {
        match why {
            AttemptError::Full(_) => self.full = true,
            AttemptError::Refused(_) | AttemptError::Unreachable(_) => self.failed = true,
        }
        self.last_error = Some(why);
    }

    /// No endpoint is left to try: the answer. RESOURCE_EXHAUSTED if every endpoint tried was
    /// full, UNAVAILABLE otherwise.
    pub fn exhausted(&self, destination: &Destination) -> Status {
        if self.tried.is_empty() {
            Status::unavailable(format!("{destination} has no ready endpoint"))
        } else if self.full && !self.failed {
            Status::exhausted(format!(
                "{destination}: {} endpoint(s) tried, every pooled connection at its stream \
                 limit (pool.max_connections_per_endpoint)",
                self.tried.len()
            ))
        } else {
            let last = self
                .last_error
                .as_ref()
                .map_or_else(|| "none".to_string(), ToString::to_string);
            Status::unavailable(format!(
                "{destination}: {} endpoint(s) tried, none took the call; last error: {last}",
                self.tried.len(),
            ))
        }
    }
}

/// DEADLINE_EXCEEDED for a call to `service`, met `where_` it.
pub fn deadline_status(service: &str, where_: &str) -> Status {
    Status::deadline(format!(
        "deadline (grpc-timeout) exceeded in the proxy {where_} service {service}"
    ))
}

/// The `grpc-timeout` an endpoint gets for a call with `deadline`: the time left at `now`.
pub fn deadline_field(deadline: Instant, now: Instant) -> http::HeaderValue {
    grpc::format_timeout(deadline.saturating_duration_since(now))
}

/// The fields of a gRPC status the proxy answers itself: trailers-only when nothing was sent
/// on the stream yet, trailers otherwise.
pub fn answer_fields(status: &Status, trailers_only: bool) -> Fields {
    let mut f = Fields::default();
    if trailers_only {
        f.push(b":status", b"200");
        f.push(b"content-type", b"application/grpc");
    }
    f.push(b"grpc-status", (status.code as u16).to_string().as_bytes());
    f.push(
        b"grpc-message",
        grpc::percent_encode(&status.message).as_bytes(),
    );
    f
}

#[cfg(test)]
mod tests;
