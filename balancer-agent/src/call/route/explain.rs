//! What `inspect routes` and `inspect explain` show: the policies in force, and for one call
//! (a destination, a method, headers) the decision the call layer would take, read from the same
//! table and the same matching code a call goes through ([`Table::decide`]), with why each other
//! route did not take it. Allocates freely: it runs for the admin API, never per call.

use std::{fmt, sync::Arc};

use serde::Serialize;

use super::{
    Destination, Request, Resolved, RouteEntry, RouteMatch, ServiceRoutes, SourceIdentity, Table,
};
use crate::{
    state::{Service, Snapshot},
    wire::message::Fields,
};

impl fmt::Display for RouteMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        for (what, m) in [
            ("path", &self.path),
            ("service", &self.service),
            ("method", &self.method),
        ] {
            if let Some(m) = m {
                parts.push(format!("{what} {m}"));
            }
        }
        for h in &self.headers {
            parts.push(match (&h.value, h.invert) {
                (None, false) => format!("header {} present", h.name),
                (None, true) => format!("header {} absent", h.name),
                (Some(m), false) => format!("header {} {m}", h.name),
                (Some(m), true) => format!("header {} not {m}", h.name),
            });
        }
        if let Some(s) = &self.source {
            if let Some(ns) = &s.namespace {
                parts.push(format!("source namespace {ns:?}"));
            }
            for (k, v) in &s.labels {
                parts.push(format!("source label {k}={v}"));
            }
        }
        if parts.is_empty() {
            f.write_str("any call")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// A backend as `inspect` shows it.
#[derive(Debug, Serialize)]
pub struct BackendView {
    /// The service the calls go to.
    pub service: String,
    /// Its subset, if one.
    pub subset: Option<String>,
    /// The labels that select the subset's endpoints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
    /// Its weight.
    pub weight: u32,
    /// Its share of the route's calls, percent.
    pub percent: f64,
    /// How it balances.
    pub policy: Option<&'static str>,
    /// The endpoints it picks from (ready, and in the subset).
    pub endpoints: Vec<String>,
    /// Why no call can go there, when none can (its service is not known).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A route as `inspect routes` shows it.
#[derive(Debug, Serialize)]
pub struct RouteView {
    /// Its name.
    pub name: String,
    /// Where it came from (`file`, `GRPCRoute ns/name`, `VirtualService ns/name`).
    pub source: String,
    /// What it takes, one line per alternative.
    pub matches: Vec<String>,
    /// Where its calls go.
    pub backends: Vec<BackendView>,
    /// Its timeout, ms.
    pub timeout_ms: Option<u128>,
    /// Its header changes.
    pub request_headers: super::HeaderMutations,
    /// Its retries (`call::retry`).
    pub retries: Option<super::RetryPolicy>,
    /// The faults it injects (`call::fault`).
    pub fault: Option<super::FaultPolicy>,
}

/// A service's policy as `inspect routes` shows it.
#[derive(Debug, Serialize)]
pub struct ServiceRoutesView {
    /// The service.
    pub service: String,
    /// Which source's policy is in force (`File`, `Kubernetes`).
    pub from: String,
    /// Its balancing for calls no subset narrows, when its policy sets one.
    pub load_balancer: Option<&'static str>,
    /// Its routes, in order.
    pub routes: Vec<RouteView>,
    /// The policy names a service the store does not have: nothing is routed by it yet.
    pub unresolved: bool,
    /// Its circuit breaker, outlier detection and retry budget, when its policy sets any
    /// (`call::breaker`).
    pub resilience: Option<super::Resilience>,
}

/// A refused policy as `inspect routes` shows it.
#[derive(Debug, Serialize)]
pub struct RejectedView {
    /// The kind (`file`, `GRPCRoute`, `VirtualService`, `DestinationRule`).
    pub kind: &'static str,
    /// `namespace/name`.
    pub name: String,
    /// The service it was meant for.
    pub service: Option<String>,
    /// Why it was refused.
    pub reason: String,
}

/// `GET /api/routes`.
#[derive(Debug, Serialize)]
pub struct RoutesView {
    /// Policies in force, by service.
    pub services: Vec<ServiceRoutesView>,
    /// What the sources refused.
    pub rejected: Vec<RejectedView>,
}

fn endpoints_of(d: &Destination) -> Vec<String> {
    d.balancer()
        .ready()
        .iter()
        .map(|e| e.addr.to_string())
        .collect()
}

fn backend_views(entry: &RouteEntry) -> Vec<BackendView> {
    let total = f64::from(entry.total().max(1));
    entry
        .route
        .action
        .backends
        .iter()
        .zip(&entry.backends)
        .map(|(b, Resolved { destination, .. })| BackendView {
            service: b.service.clone(),
            subset: b.subset.as_ref().map(|s| s.name.clone()),
            labels: b.subset.as_ref().map(|s| s.labels.clone()),
            weight: b.weight,
            percent: (f64::from(b.weight) * 1000.0 / total).round() / 10.0,
            policy: destination
                .as_ref()
                .ok()
                .map(|d| d.balancer().policy().as_str()),
            endpoints: destination.as_ref().map(endpoints_of).unwrap_or_default(),
            error: destination.as_ref().err().map(|e| e.to_string()),
        })
        .collect()
}

fn default_view(d: &Destination) -> BackendView {
    BackendView {
        service: d.service.name.to_string(),
        subset: None,
        labels: None,
        weight: 1,
        percent: 100.0,
        policy: Some(d.balancer().policy().as_str()),
        endpoints: endpoints_of(d),
        error: None,
    }
}

fn route_view(entry: &RouteEntry) -> RouteView {
    let r = &entry.route;
    RouteView {
        name: r.name.clone(),
        source: r.source.to_string(),
        matches: r.matches.iter().map(ToString::to_string).collect(),
        backends: backend_views(entry),
        timeout_ms: r.action.timeout.map(|t| t.as_millis()),
        request_headers: r.action.request_headers.clone(),
        retries: r.action.retries,
        fault: r.action.fault,
    }
}

/// A service policy's resilience settings, when it sets any.
fn resilience(p: &super::ServicePolicy) -> Option<super::Resilience> {
    (!p.resilience.is_empty()).then_some(p.resilience)
}

fn service_view(s: &ServiceRoutes) -> ServiceRoutesView {
    ServiceRoutesView {
        service: s.policy.service.clone(),
        from: format!("{:?}", s.from),
        load_balancer: s.policy.load_balancer.map(|p| p.as_str()),
        routes: s.routes.iter().map(route_view).collect(),
        unresolved: false,
        resilience: resilience(&s.policy),
    }
}

impl Table {
    /// The policies in force (of `service` only, when given) and every refusal.
    pub fn view(&self, service: Option<&str>) -> RoutesView {
        let wanted = |name: &str| service.is_none_or(|s| s == name);
        let mut services: Vec<ServiceRoutesView> = self
            .services()
            .filter(|s| wanted(&s.policy.service))
            .map(service_view)
            .collect();
        for (from, p) in &self.unresolved {
            if wanted(&p.service) {
                services.push(ServiceRoutesView {
                    service: p.service.clone(),
                    from: format!("{from:?}"),
                    load_balancer: p.load_balancer.map(|p| p.as_str()),
                    routes: p
                        .routes
                        .iter()
                        .map(|r| RouteView {
                            name: r.name.clone(),
                            source: r.source.to_string(),
                            matches: r.matches.iter().map(ToString::to_string).collect(),
                            backends: Vec::new(),
                            timeout_ms: r.action.timeout.map(|t| t.as_millis()),
                            request_headers: r.action.request_headers.clone(),
                            retries: r.action.retries,
                            fault: r.action.fault,
                        })
                        .collect(),
                    unresolved: true,
                    resilience: resilience(p),
                });
            }
        }
        let rejected = self
            .rejected
            .iter()
            .filter(|r| service.is_none() || r.service.as_deref().is_some_and(wanted))
            .map(|r| RejectedView {
                kind: r.source.kind(),
                name: r.source.object(),
                service: r.service.clone(),
                reason: r.reason.clone(),
            })
            .collect();
        RoutesView { services, rejected }
    }

    /// The decision for a call to `service` with these `fields` (`:path` and headers), from
    /// `source` if known: the route that takes it, its backends and their endpoints, and why
    /// each other route does not.
    pub fn explain(
        &self,
        service: &Arc<Service>,
        fields: &Fields,
        source: Option<&SourceIdentity>,
    ) -> Explanation {
        let req = Request::new(fields, source);
        let policy = self.service(service);
        let routes = policy.map_or(&[][..], |p| &p.routes[..]);
        let taken = routes.iter().position(|r| r.route.takes(&req));
        let others = routes
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != taken)
            .map(|(i, r)| OtherRoute {
                name: r.route.name.clone(),
                source: r.route.source.to_string(),
                why: match taken {
                    Some(t) if i > t => vec![format!(
                        "comes after route {}, which takes the call",
                        routes[t].route.name
                    )],
                    _ => r.route.misses(&req),
                },
            })
            .collect();
        let (route, backends, outcome) = match taken.map(|i| &routes[i]) {
            Some(r) => (
                Some(route_view(r)),
                backend_views(r),
                format!("route {} ({}) takes the call", r.route.name, r.route.source),
            ),
            None => {
                let d = policy.map_or_else(
                    || Destination::service(service.clone()),
                    |p| p.default.clone(),
                );
                let why = if policy.is_none() {
                    "no traffic policy names this service"
                } else {
                    "no route takes the call"
                };
                (
                    None,
                    vec![default_view(&d)],
                    format!("{why}: every endpoint of service {}", service.name),
                )
            }
        };
        Explanation {
            service: service.name.to_string(),
            resilience: policy.and_then(|p| resilience(&p.policy)),
            policy_from: policy.map(|p| format!("{:?}", p.from)),
            outcome,
            route,
            backends,
            others,
        }
    }
}

/// A route that did not take the call, and why.
#[derive(Debug, Serialize)]
pub struct OtherRoute {
    /// Its name.
    pub name: String,
    /// Where it came from.
    pub source: String,
    /// Why it did not take the call: one reason per alternative match.
    pub why: Vec<String>,
}

/// `GET /api/explain`: what the call layer would do with one call.
#[derive(Debug, Serialize)]
pub struct Explanation {
    /// The service the destination means.
    pub service: String,
    /// Which source's policy applies to it, if any.
    pub policy_from: Option<String>,
    /// Its circuit breaker, outlier detection and retry budget, when its policy sets any.
    pub resilience: Option<super::Resilience>,
    /// The decision, in a sentence.
    pub outcome: String,
    /// The route that takes the call.
    pub route: Option<RouteView>,
    /// Where the call may go: the route's backends with their weights and endpoints, or all
    /// the service's endpoints.
    pub backends: Vec<BackendView>,
    /// The other routes of the service, and why each did not take the call.
    pub others: Vec<OtherRoute>,
}

/// The service `to` means in `snapshot`: a `VIP:port`, else an `:authority`, else a service
/// name; and how it was found.
pub fn destination<'s>(
    snapshot: &'s Snapshot,
    to: &str,
) -> Option<(&'s Arc<Service>, &'static str)> {
    if let Ok(vip) = to.parse()
        && let Some(s) = snapshot.by_vip(&vip)
    {
        return Some((s, "vip"));
    }
    if let Some(s) = snapshot.by_authority(to) {
        return Some((s, "authority"));
    }
    snapshot.by_name(to).map(|s| (s, "name"))
}

/// The request fields `explain` matches: `:path` = `method`, `:authority` = `to`, and
/// `headers` as `name:value` (names lowercased).
pub fn request_fields(to: &str, method: &str, headers: &[String]) -> Result<Fields, String> {
    let mut f = Fields::default();
    f.push(b":method", b"POST");
    f.push(b":scheme", b"http");
    f.push(b":path", method.as_bytes());
    f.push(b":authority", to.as_bytes());
    for h in headers {
        let Some((n, v)) = h.split_once(':') else {
            return Err(format!("header {h:?} is not name:value"));
        };
        f.push(
            n.trim().to_ascii_lowercase().as_bytes(),
            v.trim().as_bytes(),
        );
    }
    f.push(b"content-type", b"application/grpc");
    Ok(f)
}
