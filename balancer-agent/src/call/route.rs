//! Traffic policy: the one model every source translates into (the file, Gateway API
//! `GRPCRoute`, Istio `VirtualService`/`DestinationRule`), and the decision a call takes from
//! it. The call layer never knows where a rule came from, except to name it ([`RouteSource`])
//! in `inspect` and in metrics.
//!
//! ```text
//! source ──▶ PolicySet { services: [ServicePolicy { service, routes: [Route], .. }], rejected }
//!             │ Router::set(source, set)          (control side, rare)
//!             ▼
//!          Table (immutable, ArcSwap): per service id, its routes with their backends resolved
//!          against the store's snapshot (a subset is a Balancer over the endpoints whose labels
//!          match, built here, never per call); rebuilt when the policy or the store changes
//!             │ Table::decide(service, request)   (per call: no allocation, no lock)
//!             ▼
//!          Decision { route, destination: Destination { service, subset } }
//! ```
//!
//! Semantics (those of Istio and the Gateway API, which agree here): a service's routes are
//! tried in order and the first that matches takes the call; a route matches when any of its
//! [`RouteMatch`]es does (none: every call); a `RouteMatch` holds when all its conditions do.
//! A call that no route takes, or to a service without a policy, goes to all the endpoints of
//! its service, as before routes existed. Regular expressions are compiled when the policy is
//! built and match the whole value (RE2 syntax, as Envoy; anchored, as Istio does).
#![forbid(unsafe_code)]

pub mod explain;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use serde::{Serialize, Serializer};
use tracing::warn;

use super::grpc::Status;
use crate::{
    balance::Balancer,
    config::{
        Policy,
        routes::{RoutesConfig, RuleConfig, StringMatchConfig, SubsetConfig},
    },
    metrics::Metrics,
    state::{Service, Snapshot, Source, Store},
    wire::message::Fields,
};

/// How a string (a path, a gRPC service or method name, a header value) is matched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StringMatch {
    /// The whole value equals it.
    Exact(String),
    /// The value starts with it.
    Prefix(String),
    /// The whole value matches this regular expression (RE2 syntax).
    Regex(Pattern),
}

/// A regular expression compiled once, matching a whole value (`^(?:...)$`). Equal when written
/// the same.
#[derive(Clone)]
pub struct Pattern {
    source: String,
    regex: regex::bytes::Regex,
}

impl Pattern {
    /// Compiles `source`, anchored at both ends. The error says what is wrong with it.
    pub fn new(source: &str) -> Result<Self, regex::Error> {
        let regex = crate::config::routes::regex(source)?;
        Ok(Self {
            source: source.to_string(),
            regex,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The whole of `value` matches.
    pub fn is_match(&self, value: &[u8]) -> bool {
        self.regex.is_match(value)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for Pattern {}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?})", self.source)
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl StringMatch {
    /// A regular expression match; the error names what is wrong with the pattern.
    pub fn regex(pattern: &str) -> Result<Self, regex::Error> {
        Pattern::new(pattern).map(Self::Regex)
    }

    /// `value` matches.
    pub fn matches(&self, value: &[u8]) -> bool {
        match self {
            Self::Exact(s) => value == s.as_bytes(),
            Self::Prefix(s) => value.starts_with(s.as_bytes()),
            Self::Regex(p) => p.is_match(value),
        }
    }
}

impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(s) => write!(f, "= {s:?}"),
            Self::Prefix(s) => write!(f, "prefix {s:?}"),
            Self::Regex(p) => write!(f, "~ /{}/", p.as_str()),
        }
    }
}

/// A condition on one request header (gRPC metadata).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HeaderMatch {
    /// The header's name, lowercase (HTTP/2 field names are).
    pub name: String,
    /// What its (first) value must match; `None`: the header is present, whatever its value.
    pub value: Option<StringMatch>,
    /// The condition holds when the match above does not (Istio's `withoutHeaders`; with
    /// `value: None`, the header is absent).
    pub invert: bool,
}

/// A condition on who calls: the client pod's namespace and labels.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SourceMatch {
    /// The client's namespace equals it.
    pub namespace: Option<String>,
    /// The client pod has each of these labels with this value.
    pub labels: BTreeMap<String, String>,
}

/// Who makes a call, when the agent knows (the client pod of a redirected connection). A call
/// whose source is unknown matches no route with a [`SourceMatch`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SourceIdentity {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's labels.
    pub labels: BTreeMap<String, String>,
}

/// One way a call matches a route: every condition set here holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RouteMatch {
    /// The whole `:path`, `/package.Service/Method` (Istio `uri`).
    pub path: Option<StringMatch>,
    /// The gRPC service, `package.Service` (GRPCRoute `method.service`).
    pub service: Option<StringMatch>,
    /// The gRPC method, `Method` (GRPCRoute `method.method`).
    pub method: Option<StringMatch>,
    /// Request headers, each must hold.
    pub headers: Vec<HeaderMatch>,
    /// The caller (Istio `sourceNamespace`, `sourceLabels`).
    pub source: Option<SourceMatch>,
}

/// The endpoints of a service chosen by their labels (Istio's `DestinationRule` subset).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Subset {
    /// Its name (`v1`): the `destination_version` of the calls it takes.
    pub name: String,
    /// An endpoint belongs to it when it has each of these labels with this value.
    pub labels: BTreeMap<String, String>,
    /// How its calls are balanced, when not as its service's.
    pub policy: Option<Policy>,
}

/// Where a route sends calls: a service, or a subset of its endpoints, with a weight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Backend {
    /// The store's name of the service (`greeter-b.default:50051` from Kubernetes, the file's
    /// `services[].name`).
    pub service: String,
    /// Only its endpoints of this subset; `None`: all its endpoints.
    pub subset: Option<Subset>,
    /// Its share of the route's calls against the other backends' weights; 0 takes none.
    pub weight: u32,
}

/// Changes to the request headers before the call is sent on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HeaderMutations {
    /// Replaced (or added when absent): name (lowercase), value.
    pub set: Vec<(String, String)>,
    /// Added beside any value already there.
    pub add: Vec<(String, String)>,
    /// Removed, by name (lowercase).
    pub remove: Vec<String>,
}

impl HeaderMutations {
    /// Nothing to change.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// Retries of a route's calls ([`super::retry`]).
pub use super::retry::{RetryBudget, RetryOn, RetryPolicy};

/// Faults injected into a route's calls: delays, aborts ([`super::fault`]).
pub use super::fault::{FaultAbort, FaultDelay, FaultPolicy, Percent};

/// A service's circuit breaker, outlier detection and retry budget ([`super::breaker`]).
pub use super::breaker::{ConnectionPool, FailureCodes, OutlierDetection, Resilience};

/// Who may call a service. A placeholder for issue 16: no source fills it yet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct AuthorizationPolicy {}

/// What a route does with the calls it takes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RouteAction {
    /// Where the calls go, by weight. Empty, or every weight 0: the calls are answered
    /// UNAVAILABLE (as Envoy does for a route without a cluster).
    pub backends: Vec<Backend>,
    /// Changes to the request headers.
    pub request_headers: HeaderMutations,
    /// The call's deadline from its start, if sooner than the client's `grpc-timeout`;
    /// `None` (or `0s` in a source): none of the route's own.
    pub timeout: Option<Duration>,
    /// Retries of its calls; `None`: none (endpoints that refused a call unprocessed or could
    /// not be reached are still tried elsewhere).
    pub retries: Option<RetryPolicy>,
    /// Faults injected into its calls.
    pub fault: Option<FaultPolicy>,
}

/// Where a rule came from, to name it in `inspect`, metrics and logs.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(tag = "kind")]
pub enum RouteSource {
    /// The configuration file's `routes` section.
    File,
    /// A Gateway API `GRPCRoute`.
    #[serde(rename = "GRPCRoute")]
    GrpcRoute {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// An Istio `VirtualService`.
    VirtualService {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// An Istio `DestinationRule` (subsets and balancing, no routes of its own).
    DestinationRule {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
}

impl RouteSource {
    /// The kind, as a metric label: `file`, `GRPCRoute`, `VirtualService`, `DestinationRule`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::File => "file",
            Self::GrpcRoute { .. } => "GRPCRoute",
            Self::VirtualService { .. } => "VirtualService",
            Self::DestinationRule { .. } => "DestinationRule",
        }
    }

    /// `namespace/name`, or `file`.
    pub fn object(&self) -> String {
        match self {
            Self::File => "file".into(),
            Self::GrpcRoute { namespace, name }
            | Self::VirtualService { namespace, name }
            | Self::DestinationRule { namespace, name } => format!("{namespace}/{name}"),
        }
    }
}

impl fmt::Display for RouteSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File => f.write_str("file"),
            _ => write!(f, "{} {}", self.kind(), self.object()),
        }
    }
}

/// One route of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Route {
    /// Its name, unique within the service: a metric label and what `inspect` shows. Sources
    /// name unnamed rules after their place (`greeter-b/http[1]`).
    pub name: String,
    /// Where it came from.
    pub source: RouteSource,
    /// It takes a call when any of these holds; none: every call.
    pub matches: Vec<RouteMatch>,
    /// What it does with the call.
    pub action: RouteAction,
}

/// The traffic policy of one service: its routes, in order, and what applies to all of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePolicy {
    /// The store's name of the service whose calls these routes take (the one the client
    /// dialed, by VIP or authority).
    pub service: String,
    /// Tried in order; the first that matches takes the call.
    pub routes: Vec<Route>,
    /// How calls to all its endpoints are balanced, when not as the store says (Istio's
    /// `DestinationRule` `trafficPolicy.loadBalancer`).
    pub load_balancer: Option<Policy>,
    /// Consistent hashing and locality weights a source sets for the service's endpoints and
    /// its subsets (Istio's `loadBalancer.consistentHash`, `localityLbSetting`).
    pub balancing: BalancingOverride,
    /// Who may call it (issue 16).
    pub authorization: Option<AuthorizationPolicy>,
    /// Its circuit breaker, outlier detection and retry budget (Istio `DestinationRule`
    /// `connectionPool`, `outlierDetection`); what is not set keeps the node-wide defaults.
    pub resilience: Resilience,
}

impl ServicePolicy {
    /// A policy of `service` with these routes and nothing else.
    pub fn new(service: impl Into<String>, routes: Vec<Route>) -> Self {
        Self {
            service: service.into(),
            routes,
            load_balancer: None,
            balancing: BalancingOverride::default(),
            authorization: None,
            resilience: Resilience::default(),
        }
    }
}

/// A rule a source refused, kept to be shown (`inspect routes`), counted and logged; the last
/// good policy of what it names stays in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rejected {
    /// The refused object.
    pub source: RouteSource,
    /// The service it was meant for, when known.
    pub service: Option<String>,
    /// Why, for a person: `subset "v3" is not defined by any DestinationRule of greeter-b`.
    pub reason: String,
}

/// What one source says about traffic policy, whole: a source's new set replaces its previous
/// one ([`Router::set`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PolicySet {
    /// Per service, at most one entry (a source merges its objects first, by its precedence).
    pub services: Vec<ServicePolicy>,
    /// What it refused.
    pub rejected: Vec<Rejected>,
}

/// The source of a [`PolicySet`]: the store's sources. When both give a policy for one
/// service, the file's wins (an operator's explicit configuration, as for services).
pub type PolicySource = Source;

impl PolicySet {
    /// The file's `routes` section (checked by `config`) as the model. A rule whose regular
    /// expression does not compile here (the section was not checked) is refused, not built.
    pub fn from_config(routes: &[RoutesConfig]) -> Self {
        let mut set = PolicySet::default();
        let subsets: HashMap<&str, &[SubsetConfig]> = routes
            .iter()
            .map(|r| (r.service.as_str(), r.subsets.as_slice()))
            .collect();
        for r in routes {
            let mut policy = ServicePolicy::new(r.service.clone(), Vec::new());
            policy.load_balancer = r.load_balancer.as_deref().and_then(Policy::parse);
            policy.resilience = super::breaker::from_config(r);
            for (i, rule) in r.rules.iter().enumerate() {
                let name = if rule.name.is_empty() {
                    format!("rules[{i}]")
                } else {
                    rule.name.clone()
                };
                match file_route(&name, rule, &r.service, &subsets) {
                    Ok(route) => policy.routes.push(route),
                    Err(e) => set.rejected.push(Rejected {
                        source: RouteSource::File,
                        service: Some(r.service.clone()),
                        reason: format!("rule {name}: {e}"),
                    }),
                }
            }
            set.services.push(policy);
        }
        set
    }
}

fn file_string_match(m: &StringMatchConfig) -> Result<StringMatch, regex::Error> {
    Ok(match (&m.exact, &m.prefix, &m.regex) {
        (Some(e), _, _) => StringMatch::Exact(e.clone()),
        (_, Some(p), _) => StringMatch::Prefix(p.clone()),
        (_, _, Some(r)) => StringMatch::regex(r)?,
        // Not a checked section: a condition nothing meets.
        _ => StringMatch::regex("[^\\s\\S]")?,
    })
}

fn file_route(
    name: &str,
    rule: &RuleConfig,
    service: &str,
    subsets: &HashMap<&str, &[SubsetConfig]>,
) -> Result<Route, regex::Error> {
    let opt = |m: &Option<StringMatchConfig>| m.as_ref().map(file_string_match).transpose();
    let mut matches = Vec::with_capacity(rule.matches.len());
    for m in &rule.matches {
        let mut headers = Vec::with_capacity(m.headers.len() + m.without_headers.len());
        for (invert, list) in [(false, &m.headers), (true, &m.without_headers)] {
            for (name, h) in list {
                let any = h.exact.is_none() && h.prefix.is_none() && h.regex.is_none();
                headers.push(HeaderMatch {
                    name: name.to_ascii_lowercase(),
                    value: (!any).then(|| file_string_match(h)).transpose()?,
                    invert,
                });
            }
        }
        matches.push(RouteMatch {
            path: opt(&m.path)?,
            service: opt(&m.service)?,
            method: opt(&m.method)?,
            headers,
            source: m.source.as_ref().map(|s| SourceMatch {
                namespace: s.namespace.clone(),
                labels: s.labels.clone(),
            }),
        });
    }
    let backends = rule
        .backends
        .iter()
        .map(|b| {
            let to = b.service.clone().unwrap_or_else(|| service.to_string());
            let subset = b.subset.as_ref().map(|name| {
                let declared = subsets
                    .get(to.as_str())
                    .and_then(|s| s.iter().find(|s| s.name == *name));
                Subset {
                    name: name.clone(),
                    labels: declared.map(|s| s.labels.clone()).unwrap_or_default(),
                    policy: declared
                        .and_then(|s| s.policy.as_deref())
                        .and_then(Policy::parse),
                }
            });
            Backend {
                service: to,
                subset,
                weight: b.weight.unwrap_or(1),
            }
        })
        .collect();
    let h = &rule.request_headers;
    let pairs =
        |m: &BTreeMap<String, String>| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    Ok(Route {
        name: name.to_string(),
        source: RouteSource::File,
        matches,
        action: RouteAction {
            backends,
            request_headers: HeaderMutations {
                set: pairs(&h.set),
                add: pairs(&h.add),
                remove: h.remove.clone(),
            },
            timeout: (rule.timeout_ms > 0).then(|| Duration::from_millis(rule.timeout_ms)),
            retries: rule.retries.as_ref().map(super::retry::from_config),
            fault: rule.fault.as_ref().map(super::fault::from_config),
        },
    })
}

/// What a call brings to the routes: its request head and, when known, who makes it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// `:path`.
    pub path: &'a [u8],
    /// The request header fields.
    pub fields: &'a Fields,
    /// The client pod, when the agent knows it.
    pub source: Option<&'a SourceIdentity>,
}

impl<'a> Request<'a> {
    /// A request with these fields (its `:path` read from them).
    pub fn new(fields: &'a Fields, source: Option<&'a SourceIdentity>) -> Self {
        Self {
            path: fields.get(b":path").unwrap_or(b"/"),
            fields,
            source,
        }
    }

    /// The gRPC service and method of `/package.Service/Method`; `None` for another path.
    fn grpc(&self) -> Option<(&'a [u8], &'a [u8])> {
        let rest = self.path.strip_prefix(b"/")?;
        let slash = rest.iter().position(|&b| b == b'/')?;
        let (service, method) = (&rest[..slash], &rest[slash + 1..]);
        (!service.is_empty() && !method.is_empty() && !method.contains(&b'/'))
            .then_some((service, method))
    }
}

/// The condition of a [`RouteMatch`] a request did not meet (the first one checked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Miss {
    /// `path`.
    Path,
    /// `service` (or the path is not `/package.Service/Method`).
    Service,
    /// `method` (or the path is not `/package.Service/Method`).
    Method,
    /// `headers[i]`.
    Header(usize),
    /// `source`: the caller is another, or unknown.
    Source,
}

impl HeaderMatch {
    /// The header condition holds for `fields`.
    pub fn holds(&self, fields: &Fields) -> bool {
        let found = match (fields.get(self.name.as_bytes()), &self.value) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(v), Some(m)) => m.matches(v),
        };
        found != self.invert
    }
}

impl SourceMatch {
    /// `source` is such a caller.
    pub fn holds(&self, source: Option<&SourceIdentity>) -> bool {
        let Some(s) = source else {
            return false;
        };
        self.namespace.as_ref().is_none_or(|n| *n == s.namespace)
            && self
                .labels
                .iter()
                .all(|(k, v)| s.labels.get(k).is_some_and(|have| have == v))
    }
}

impl RouteMatch {
    /// Every condition holds for `req`, or the first that does not. Allocates nothing.
    pub fn check(&self, req: &Request<'_>) -> Result<(), Miss> {
        if let Some(m) = &self.path
            && !m.matches(req.path)
        {
            return Err(Miss::Path);
        }
        if self.service.is_some() || self.method.is_some() {
            let grpc = req.grpc();
            if let Some(m) = &self.service
                && !grpc.is_some_and(|(s, _)| m.matches(s))
            {
                return Err(Miss::Service);
            }
            if let Some(m) = &self.method
                && !grpc.is_some_and(|(_, meth)| m.matches(meth))
            {
                return Err(Miss::Method);
            }
        }
        if let Some(i) = self.headers.iter().position(|h| !h.holds(req.fields)) {
            return Err(Miss::Header(i));
        }
        if let Some(s) = &self.source
            && !s.holds(req.source)
        {
            return Err(Miss::Source);
        }
        Ok(())
    }

    /// Why `req` does not meet condition `miss` of this match, for a person.
    pub fn explain(&self, miss: Miss, req: &Request<'_>) -> String {
        let shown = |v: Option<&[u8]>| match v {
            Some(v) => format!("{:?}", String::from_utf8_lossy(v)),
            None => "none".into(),
        };
        let cond =
            |m: &Option<StringMatch>| m.as_ref().map(ToString::to_string).unwrap_or_default();
        match miss {
            Miss::Path => format!("path {} is not {}", shown(Some(req.path)), cond(&self.path)),
            Miss::Service => format!(
                "gRPC service {} is not {}",
                shown(req.grpc().map(|g| g.0)),
                cond(&self.service)
            ),
            Miss::Method => format!(
                "gRPC method {} is not {}",
                shown(req.grpc().map(|g| g.1)),
                cond(&self.method)
            ),
            Miss::Header(i) => {
                let h = &self.headers[i];
                let value = req.fields.get(h.name.as_bytes());
                let want = match (&h.value, h.invert) {
                    (None, false) => "present".to_string(),
                    (None, true) => "absent".to_string(),
                    (Some(m), false) => m.to_string(),
                    (Some(m), true) => format!("not {m}"),
                };
                format!("header {}: {} is not {want}", h.name, shown(value))
            }
            Miss::Source => match req.source {
                None => "the caller is unknown (a source condition needs the client pod)".into(),
                Some(s) => format!(
                    "the caller (namespace {:?}, labels {:?}) is not {:?}",
                    s.namespace,
                    s.labels,
                    self.source.as_ref().map(|m| (&m.namespace, &m.labels))
                ),
            },
        }
    }
}

impl Route {
    /// It takes `req`: any of its matches holds (it has none: every request).
    pub fn takes(&self, req: &Request<'_>) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.check(req).is_ok())
    }

    /// Why it does not take `req`, one reason per match; empty when it does.
    pub fn misses(&self, req: &Request<'_>) -> Vec<String> {
        if self.takes(req) {
            return Vec::new();
        }
        self.matches
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                let miss = m.check(req).err()?;
                let why = m.explain(miss, req);
                Some(if self.matches.len() == 1 {
                    why
                } else {
                    format!("matches[{i}]: {why}")
                })
            })
            .collect()
    }
}

impl HeaderMutations {
    /// `fields` with these changes: removed names go, set names are replaced, added values
    /// join the others.
    pub fn apply(&self, fields: &Fields) -> Fields {
        let mut out = Fields::default();
        for (n, v) in fields.iter() {
            let gone = self.remove.iter().any(|r| r.as_bytes() == n)
                || self.set.iter().any(|(s, _)| s.as_bytes() == n);
            if !gone {
                out.push(n, v);
            }
        }
        for (n, v) in self.set.iter().chain(&self.add) {
            out.push(n.as_bytes(), v.as_bytes());
        }
        out
    }
}

/// The endpoints a call may go to once its route and backend are chosen: a service, or a
/// subset of it, with the balancer that picks among them.
#[derive(Clone, Debug)]
pub struct Destination {
    /// The service.
    pub service: Arc<Service>,
    /// Its subset, or its endpoints balanced otherwise than the store says; `None`: the
    /// service's own balancer.
    pub set: Option<Arc<EndpointSet>>,
}

/// Endpoints of a service chosen for a subset (or all of them, balanced by another policy),
/// with their balancer, built when the table is, never per call.
#[derive(Debug)]
pub struct EndpointSet {
    /// The subset's name; `None`: all the service's endpoints.
    pub subset: Option<Arc<str>>,
    /// Its ready endpoints and how to choose among them.
    pub balancer: Balancer,
}

impl Destination {
    /// All of `service`'s endpoints, as the store balances them.
    pub fn service(service: Arc<Service>) -> Self {
        Self { service, set: None }
    }

    /// Who picks the endpoint.
    pub fn balancer(&self) -> &Balancer {
        self.set
            .as_ref()
            .map_or(&self.service.balancer, |s| &s.balancer)
    }

    /// The subset's name, if a subset.
    pub fn subset(&self) -> Option<&str> {
        self.set.as_ref().and_then(|s| s.subset.as_deref())
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.subset() {
            Some(s) => write!(f, "service {} subset {s}", self.service.name),
            None => write!(f, "service {}", self.service.name),
        }
    }
}

/// One backend of a route, resolved.
#[derive(Debug)]
struct Resolved {
    /// Cumulative weight up to and with this backend.
    until: u32,
    /// Where its calls go, or why they cannot (its service is not in the store).
    destination: Result<Destination, Arc<str>>,
}

/// A route in force, its backends resolved against the store.
#[derive(Debug)]
pub struct RouteEntry {
    /// The route as its source gave it.
    pub route: Route,
    /// Its name, for each call's metrics.
    pub name: Arc<str>,
    backends: Vec<Resolved>,
}

impl RouteEntry {
    /// The backend for a draw `r` in `0..total weight`.
    fn backend(&self, r: u32) -> Option<&Resolved> {
        self.backends.iter().find(|b| r < b.until)
    }

    fn total(&self) -> u32 {
        self.backends.last().map_or(0, |b| b.until)
    }

    /// A backend, by weight: its destination, or the answer for a call that has none.
    pub fn pick(&self) -> Result<&Destination, Status> {
        self.pick_with(fastrand::u32(..self.total().max(1)))
    }

    /// [`RouteEntry::pick`] with the draw given (tests).
    fn pick_with(&self, r: u32) -> Result<&Destination, Status> {
        match self.backend(r).filter(|_| self.total() > 0) {
            Some(Resolved {
                destination: Ok(d), ..
            }) => Ok(d),
            Some(Resolved {
                destination: Err(why),
                ..
            }) => Err(Status::unavailable(format!(
                "route {} ({}): {why}",
                self.name, self.route.source
            ))),
            None => Err(Status::unavailable(format!(
                "route {} ({}) has no backend with a weight",
                self.name, self.route.source
            ))),
        }
    }
}

/// A service's policy in force.
#[derive(Debug)]
pub struct ServiceRoutes {
    /// Which source gave it.
    pub from: PolicySource,
    /// The policy as given.
    pub policy: ServicePolicy,
    /// Its routes, in order, resolved.
    pub routes: Vec<RouteEntry>,
    /// Where calls no route takes go: all the service's endpoints.
    pub default: Destination,
}

/// What a call is routed by: the route that took it (none: its service's endpoints) and where
/// it goes.
#[derive(Debug)]
pub struct Decision<'t> {
    /// The route that took it.
    pub route: Option<&'t RouteEntry>,
    /// Where it goes.
    pub destination: Destination,
}

/// Every policy in force, resolved against one store snapshot: what calls read, immutable.
#[derive(Debug, Default)]
pub struct Table {
    /// Incremented on every rebuild.
    pub version: u64,
    /// The store snapshot it was resolved against.
    pub snapshot_version: u64,
    /// By the id of the service whose calls they take.
    services: foldhash::HashMap<u32, ServiceRoutes>,
    /// Policies for services the store does not have (yet): kept, shown, applied when the
    /// service comes.
    pub unresolved: Vec<(PolicySource, ServicePolicy)>,
    /// What the sources refused.
    pub rejected: Vec<Rejected>,
}

impl Table {
    /// The policy of `service`, if it has one.
    pub fn service(&self, service: &Service) -> Option<&ServiceRoutes> {
        self.services.get(&service.id)
    }

    /// Every service's policy in force, by service name.
    pub fn services(&self) -> impl Iterator<Item = &ServiceRoutes> {
        let mut v: Vec<_> = self.services.values().collect();
        v.sort_by(|a, b| a.policy.service.cmp(&b.policy.service));
        v.into_iter()
    }

    /// Routes a call to `service`: the first of its routes that takes `req`, and a backend of
    /// it by weight; no route: all the service's endpoints. The answer when the route has no
    /// backend to go to. Allocates nothing but on that answer.
    pub fn decide<'t>(
        &'t self,
        service: &Arc<Service>,
        req: &Request<'_>,
    ) -> Result<Decision<'t>, Status> {
        let Some(s) = self.services.get(&service.id) else {
            return Ok(Decision {
                route: None,
                destination: Destination::service(service.clone()),
            });
        };
        match s.routes.iter().find(|r| r.route.takes(req)) {
            Some(r) => Ok(Decision {
                route: Some(r),
                destination: r.pick()?.clone(),
            }),
            None => Ok(Decision {
                route: None,
                destination: s.default.clone(),
            }),
        }
    }

    /// Resolves the policies of `sets` against `snapshot`: by source, the file first; a
    /// service a source before names keeps that one's policy.
    fn build(version: u64, sets: &BTreeMap<PolicySource, PolicySet>, snapshot: &Snapshot) -> Self {
        let mut table = Table {
            version,
            snapshot_version: snapshot.version,
            ..Self::default()
        };
        let mut named = std::collections::HashSet::new();
        let mut policies = Vec::new();
        for (source, set) in sets {
            table.rejected.extend(set.rejected.iter().cloned());
            for p in &set.services {
                if named.insert(p.service.as_str()) {
                    policies.push((*source, p));
                }
            }
        }
        // Calls to a service without a subset go where its own policy says (its balancing).
        let mut defaults: HashMap<&str, Destination> = HashMap::new();
        let mut overrides: HashMap<&str, &BalancingOverride> = HashMap::new();
        for (_, p) in &policies {
            if let Some(s) = snapshot.by_name(&p.service) {
                defaults.insert(p.service.as_str(), default_destination(s, p));
                overrides.insert(p.service.as_str(), &p.balancing);
            }
        }
        for (source, p) in policies {
            let Some(service) = snapshot.by_name(&p.service) else {
                table.unresolved.push((source, p.clone()));
                continue;
            };
            let routes = p
                .routes
                .iter()
                .map(|r| resolve(r, snapshot, &defaults, &overrides))
                .collect();
            table.services.insert(
                service.id,
                ServiceRoutes {
                    from: source,
                    policy: p.clone(),
                    routes,
                    default: defaults[p.service.as_str()].clone(),
                },
            );
        }
        table
    }
}

/// All of `service`'s endpoints, balanced as `policy` says when it says otherwise than the
/// store (a policy, a hash header, locality weights).
fn default_destination(service: &Arc<Service>, policy: &ServicePolicy) -> Destination {
    let o = &policy.balancing;
    // Istio's `consistentHash` and `simple` exclude each other: a hash header means ring-hash.
    let chosen = if o.hash_header.is_some() {
        Some(Policy::RingHash)
    } else {
        policy.load_balancer
    };
    let differs = chosen.is_some_and(|p| p != service.balancer.policy());
    let set = (differs || !o.is_empty()).then(|| {
        Arc::new(EndpointSet {
            subset: None,
            balancer: Balancer::new(
                chosen.unwrap_or(service.balancer.policy()),
                service.balancer.ready().to_vec(),
                o.applied_to(service.balancer.settings()),
            ),
        })
    });
    Destination {
        service: service.clone(),
        set,
    }
}

/// Balancing a source sets over the store's for a service (Istio `DestinationRule`
/// `trafficPolicy.loadBalancer`); what is not set keeps the service's own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BalancingOverride {
    /// Ring-hash on this request header (`consistentHash.httpHeaderName`).
    pub hash_header: Option<String>,
    /// Locality weights and failover (`localityLbSetting`).
    pub locality_lb: Option<crate::config::LocalityLb>,
}

impl BalancingOverride {
    /// Whether it sets nothing.
    pub fn is_empty(&self) -> bool {
        self.hash_header.is_none() && self.locality_lb.is_none()
    }

    /// `settings` with what this sets.
    fn applied_to(&self, mut settings: crate::balance::Settings) -> crate::balance::Settings {
        if let Some(h) = &self.hash_header {
            settings.balancing.hash_header = Some(h.to_ascii_lowercase());
        }
        if let Some(l) = &self.locality_lb {
            settings.balancing.locality_lb = l.clone();
        }
        settings
    }
}

/// `route`'s backends against `snapshot`.
fn resolve(
    route: &Route,
    snapshot: &Snapshot,
    defaults: &HashMap<&str, Destination>,
    overrides: &HashMap<&str, &BalancingOverride>,
) -> RouteEntry {
    let mut until = 0u32;
    let backends = route
        .action
        .backends
        .iter()
        .map(|b| {
            until = until.saturating_add(b.weight);
            let destination = match (snapshot.by_name(&b.service), &b.subset) {
                (None, _) => Err(format!("backend service {} is not known", b.service).into()),
                (Some(s), None) => Ok(defaults
                    .get(b.service.as_str())
                    .cloned()
                    .unwrap_or_else(|| Destination::service(s.clone()))),
                (Some(s), Some(subset)) => Ok(subset_destination(
                    s,
                    subset,
                    overrides.get(b.service.as_str()).copied(),
                )),
            };
            Resolved { until, destination }
        })
        .collect();
    RouteEntry {
        name: route.name.as_str().into(),
        route: route.clone(),
        backends,
    }
}

/// The endpoints of `service` in `subset`: ready, not terminating, with each of its labels,
/// balanced with the service's settings (hash header, locality, warm-up) and what its policy
/// sets over them.
fn subset_destination(
    service: &Arc<Service>,
    subset: &Subset,
    o: Option<&BalancingOverride>,
) -> Destination {
    let ready = service
        .endpoints
        .iter()
        .filter(|e| e.spec.ready && !e.spec.terminating)
        .filter(|e| {
            subset
                .labels
                .iter()
                .all(|(k, v)| e.spec.labels.get(k).is_some_and(|have| have == v))
        })
        .map(|e| e.endpoint.clone())
        .collect();
    let hashed = o.is_some_and(|o| o.hash_header.is_some());
    let policy = match subset.policy {
        Some(p) => p,
        None if hashed => Policy::RingHash,
        None => service.balancer.policy(),
    };
    let settings = match o {
        Some(o) => o.applied_to(service.balancer.settings()),
        None => service.balancer.settings(),
    };
    Destination {
        service: service.clone(),
        set: Some(Arc::new(EndpointSet {
            subset: Some(subset.name.as_str().into()),
            balancer: Balancer::new(policy, ready, settings),
        })),
    }
}

/// The policies of every source, and the table calls read. A source's new [`PolicySet`]
/// replaces its last; a store change re-resolves the table (the store calls
/// [`Router::store_changed`]). Each change publishes a new immutable table: calls admitted
/// before keep the destination they were given.
pub struct Router {
    table: ArcSwap<Table>,
    inner: Mutex<RouterInner>,
    metrics: Arc<Metrics>,
}

struct RouterInner {
    sets: BTreeMap<PolicySource, PolicySet>,
    snapshot: Arc<Snapshot>,
    version: u64,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("version", &self.table.load().version)
            .finish_non_exhaustive()
    }
}

impl Router {
    /// A router without policies that follows `store`.
    pub fn new(store: &Store, metrics: Arc<Metrics>) -> Arc<Self> {
        let router = Arc::new(Self {
            table: ArcSwap::from_pointee(Table::default()),
            inner: Mutex::new(RouterInner {
                sets: BTreeMap::new(),
                snapshot: store.snapshot(),
                version: 0,
            }),
            metrics,
        });
        let weak = Arc::downgrade(&router);
        store.on_publish(move |s| {
            if let Some(r) = weak.upgrade() {
                r.store_changed(s);
            }
        });
        router
    }

    /// The table in force. Cheap; per call.
    pub fn table(&self) -> arc_swap::Guard<Arc<Table>> {
        self.table.load()
    }

    /// Puts `set` in force as everything `source` says: its policies and what it refused.
    /// Refusals new since its last set are logged; every refusal in force is a metric.
    pub fn set(&self, source: PolicySource, set: PolicySet) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let before = inner.sets.get(&source);
        if before == Some(&set) {
            return;
        }
        for r in &set.rejected {
            if !before.is_some_and(|b| b.rejected.contains(r)) {
                warn!(source = %r.source, service = ?r.service, reason = %r.reason, "traffic policy refused");
            }
        }
        inner.sets.insert(source, set);
        self.publish(&mut inner);
    }

    /// The store published `snapshot`: backends and subsets are resolved again.
    pub fn store_changed(&self, snapshot: &Arc<Snapshot>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.snapshot = snapshot.clone();
        if inner.sets.is_empty() && self.table.load().version == 0 {
            return;
        }
        self.publish(&mut inner);
    }

    fn publish(&self, inner: &mut RouterInner) {
        inner.version += 1;
        let table = Table::build(inner.version, &inner.sets, &inner.snapshot);
        self.metrics.set_policy_rejected(
            table
                .rejected
                .iter()
                .map(|r| (r.source.kind(), r.source.object())),
        );
        self.table.store(Arc::new(table));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::PoolConfig,
        state::{EndpointSpec, ServiceSpec, Update},
    };

    fn fields(path: &str, headers: &[(&str, &str)]) -> Fields {
        let mut f = Fields::default();
        f.push(b":method", b"POST");
        f.push(b":path", path.as_bytes());
        for (n, v) in headers {
            f.push(n.as_bytes(), v.as_bytes());
        }
        f
    }

    fn exact(s: &str) -> Option<StringMatch> {
        Some(StringMatch::Exact(s.into()))
    }

    fn header(name: &str, value: Option<StringMatch>, invert: bool) -> HeaderMatch {
        HeaderMatch {
            name: name.into(),
            value,
            invert,
        }
    }

    #[test]
    fn string_matches_exact_prefix_and_whole_value_regex() {
        assert!(StringMatch::Exact("a.B".into()).matches(b"a.B"));
        assert!(!StringMatch::Exact("a.B".into()).matches(b"a.BC"));
        assert!(StringMatch::Prefix("/pkg.".into()).matches(b"/pkg.Svc/M"));
        assert!(!StringMatch::Prefix("/pkg.".into()).matches(b"/pk"));
        let r = StringMatch::regex("Say.*").unwrap();
        assert!(r.matches(b"SayHello"));
        // Anchored at both ends, as Istio does: a match inside the value is not a match.
        assert!(!r.matches(b"XSayHello"));
        let alt = StringMatch::regex("a|b").unwrap();
        assert!(alt.matches(b"b") && !alt.matches(b"ab"));
        assert!(StringMatch::regex("(").is_err());
        assert_eq!(r, StringMatch::regex("Say.*").unwrap());
    }

    #[test]
    fn a_match_on_path_service_and_method() {
        let f = fields("/helloworld.Greeter/SayHello", &[]);
        let req = Request::new(&f, None);
        let m = |path, service, method| RouteMatch {
            path,
            service,
            method,
            ..RouteMatch::default()
        };
        assert_eq!(m(None, None, None).check(&req), Ok(()));
        assert_eq!(
            m(exact("/helloworld.Greeter/SayHello"), None, None).check(&req),
            Ok(())
        );
        assert_eq!(
            m(Some(StringMatch::Prefix("/other.".into())), None, None).check(&req),
            Err(Miss::Path)
        );
        assert_eq!(
            m(None, exact("helloworld.Greeter"), None).check(&req),
            Ok(())
        );
        assert_eq!(
            m(None, exact("helloworld.Other"), None).check(&req),
            Err(Miss::Service)
        );
        assert_eq!(
            m(None, exact("helloworld.Greeter"), exact("SayBye")).check(&req),
            Err(Miss::Method)
        );
        let re = StringMatch::regex("Say(Hello|Bye)").ok();
        assert_eq!(m(None, None, re).check(&req), Ok(()));
        // A path that is not /Service/Method matches no service or method condition.
        let odd = fields("/nomethod", &[]);
        assert_eq!(
            m(None, None, exact("nomethod")).check(&Request::new(&odd, None)),
            Err(Miss::Method)
        );
        let why = m(None, exact("helloworld.Other"), None).explain(Miss::Service, &req);
        assert_eq!(
            why,
            r#"gRPC service "helloworld.Greeter" is not = "helloworld.Other""#
        );
    }

    #[test]
    fn a_match_on_headers_every_kind() {
        let f = fields("/a.B/C", &[("x-env", "staging"), ("x-user", "bob-42")]);
        let req = Request::new(&f, None);
        let holds = |h: HeaderMatch| h.holds(req.fields);
        assert!(holds(header("x-env", exact("staging"), false)));
        assert!(!holds(header("x-env", exact("prod"), false)));
        assert!(holds(header(
            "x-user",
            Some(StringMatch::Prefix("bob-".into())),
            false
        )));
        assert!(holds(header(
            "x-user",
            StringMatch::regex("bob-[0-9]+").ok(),
            false
        )));
        assert!(!holds(header(
            "x-user",
            StringMatch::regex("[0-9]+").ok(),
            false
        )));
        assert!(holds(header("x-env", None, false)), "present");
        assert!(!holds(header("x-missing", None, false)));
        assert!(holds(header("x-missing", None, true)), "absent");
        assert!(!holds(header("x-env", None, true)));
        assert!(holds(header("x-env", exact("prod"), true)), "inverted");
        let m = RouteMatch {
            headers: vec![
                header("x-env", exact("staging"), false),
                header("x-user", exact("alice"), false),
            ],
            ..RouteMatch::default()
        };
        assert_eq!(m.check(&req), Err(Miss::Header(1)));
        assert_eq!(
            m.explain(Miss::Header(1), &req),
            r#"header x-user: "bob-42" is not = "alice""#
        );
    }

    #[test]
    fn a_match_on_the_source_needs_a_known_caller() {
        let f = fields("/a.B/C", &[]);
        let m = RouteMatch {
            source: Some(SourceMatch {
                namespace: Some("shop".into()),
                labels: [("app".to_string(), "cart".to_string())].into(),
            }),
            ..RouteMatch::default()
        };
        assert_eq!(m.check(&Request::new(&f, None)), Err(Miss::Source));
        let mut who = SourceIdentity {
            namespace: "shop".into(),
            labels: [
                ("app".to_string(), "cart".to_string()),
                ("v".to_string(), "2".to_string()),
            ]
            .into(),
        };
        assert_eq!(m.check(&Request::new(&f, Some(&who))), Ok(()));
        who.namespace = "other".into();
        assert_eq!(m.check(&Request::new(&f, Some(&who))), Err(Miss::Source));
    }

    #[test]
    fn a_route_takes_a_call_when_any_of_its_matches_holds() {
        let route = Route {
            name: "r".into(),
            source: RouteSource::File,
            matches: vec![
                RouteMatch {
                    method: exact("A"),
                    ..RouteMatch::default()
                },
                RouteMatch {
                    method: exact("B"),
                    ..RouteMatch::default()
                },
            ],
            action: RouteAction::default(),
        };
        for (path, takes) in [("/s.S/A", true), ("/s.S/B", true), ("/s.S/C", false)] {
            let f = fields(path, &[]);
            assert_eq!(route.takes(&Request::new(&f, None)), takes, "{path}");
        }
        let f = fields("/s.S/C", &[]);
        assert_eq!(
            route.misses(&Request::new(&f, None)),
            vec![
                r#"matches[0]: gRPC method "C" is not = "A""#,
                r#"matches[1]: gRPC method "C" is not = "B""#
            ]
        );
    }

    #[test]
    fn header_mutations_set_add_and_remove() {
        let f = fields("/a.B/C", &[("x-a", "1"), ("x-b", "2"), ("x-c", "3")]);
        let m = HeaderMutations {
            set: vec![("x-a".into(), "one".into())],
            add: vec![("x-c".into(), "4".into())],
            remove: vec!["x-b".into()],
        };
        let out: Vec<(String, String)> = m
            .apply(&f)
            .iter()
            .map(|(n, v)| {
                (
                    String::from_utf8_lossy(n).into(),
                    String::from_utf8_lossy(v).into(),
                )
            })
            .filter(|(n, _): &(String, String)| n.starts_with("x-"))
            .collect();
        let want = [("x-c", "3"), ("x-a", "one"), ("x-c", "4")];
        assert_eq!(
            out,
            want.map(|(n, v)| (n.to_string(), v.to_string())).to_vec()
        );
    }

    fn store() -> Arc<Store> {
        let store = Store::new(PoolConfig::default());
        let ep = |i: u8, version: &str| EndpointSpec {
            labels: Arc::new([("version".to_string(), version.to_string())].into()),
            ..EndpointSpec::ready(std::net::SocketAddr::from(([10, 0, 0, i], 50051)))
        };
        store.apply(Update::Reset(vec![ServiceSpec {
            name: "greeter".into(),
            authorities: vec!["greeter".into()],
            vips: vec![],
            policy: Policy::RoundRobin,
            endpoints: vec![ep(1, "v1"), ep(2, "v1"), ep(3, "v2")],
            balancing: Default::default(),
        }]));
        store
    }

    fn backend(subset: Option<&str>, weight: u32) -> Backend {
        Backend {
            service: "greeter".into(),
            subset: subset.map(|s| Subset {
                name: s.into(),
                labels: [("version".to_string(), s.to_string())].into(),
                policy: None,
            }),
            weight,
        }
    }

    fn split(weights: &[(Option<&str>, u32)]) -> PolicySet {
        PolicySet {
            services: vec![ServicePolicy::new(
                "greeter",
                vec![Route {
                    name: "split".into(),
                    source: RouteSource::File,
                    matches: vec![],
                    action: RouteAction {
                        backends: weights.iter().map(|(s, w)| backend(*s, *w)).collect(),
                        ..RouteAction::default()
                    },
                }],
            )],
            rejected: vec![],
        }
    }

    fn router(store: &Store) -> Arc<Router> {
        Router::new(store, Metrics::new(Store::new(PoolConfig::default()), 10))
    }

    #[test]
    fn subsets_are_the_endpoints_with_their_labels() {
        let store = store();
        let router = router(&store);
        router.set(Source::File, split(&[(Some("v1"), 1)]));
        let snap = store.snapshot();
        let svc = snap.by_name("greeter").unwrap();
        let f = fields("/a.B/C", &[]);
        let table = router.table();
        let d = table.decide(svc, &Request::new(&f, None)).unwrap();
        assert_eq!(d.route.unwrap().route.name, "split");
        assert_eq!(d.destination.subset(), Some("v1"));
        let ready: Vec<_> = d
            .destination
            .balancer()
            .ready()
            .iter()
            .map(|e| e.addr.to_string())
            .collect();
        assert_eq!(ready, ["10.0.0.1:50051", "10.0.0.2:50051"]);
        // The store changes: the subset follows.
        let mut spec = svc.spec.clone();
        spec.endpoints.remove(0);
        store.apply(Update::Upsert(spec));
        let snap = store.snapshot();
        let d = router
            .table()
            .decide(snap.by_name("greeter").unwrap(), &Request::new(&f, None))
            .unwrap()
            .destination;
        assert_eq!(d.balancer().ready().len(), 1);
    }

    #[test]
    fn the_weighted_pick_follows_the_weights() {
        let store = store();
        let router = router(&store);
        router.set(Source::File, split(&[(Some("v1"), 80), (Some("v2"), 20)]));
        let table = router.table();
        let entry = &table.services().next().unwrap().routes[0];
        // Every draw lands where the cumulative weights say.
        assert_eq!(entry.pick_with(0).unwrap().subset(), Some("v1"));
        assert_eq!(entry.pick_with(79).unwrap().subset(), Some("v1"));
        assert_eq!(entry.pick_with(80).unwrap().subset(), Some("v2"));
        assert_eq!(entry.pick_with(99).unwrap().subset(), Some("v2"));
        // And the random draw is spread as the weights: 80/20 within 2% over 20,000 picks.
        let n = 20_000;
        let v1 = (0..n)
            .filter(|_| entry.pick().unwrap().subset() == Some("v1"))
            .count();
        let share = v1 as f64 / n as f64;
        assert!((0.78..=0.82).contains(&share), "v1 took {share}");
        // A weight of 0 takes nothing; no weight at all answers UNAVAILABLE.
        router.set(Source::File, split(&[(Some("v1"), 0), (Some("v2"), 5)]));
        let table = router.table();
        let entry = &table.services().next().unwrap().routes[0];
        assert!((0..100).all(|_| entry.pick().unwrap().subset() == Some("v2")));
        router.set(Source::File, split(&[(Some("v1"), 0)]));
        let table = router.table();
        let entry = &table.services().next().unwrap().routes[0];
        let status = entry.pick().unwrap_err();
        assert!(
            status.message.contains("no backend with a weight"),
            "{}",
            status.message
        );
    }

    #[test]
    fn routes_are_tried_in_order_and_no_route_means_every_endpoint() {
        let store = store();
        let router = router(&store);
        let mut set = split(&[(Some("v2"), 1)]);
        set.services[0].routes[0].matches = vec![RouteMatch {
            headers: vec![header("x-env", exact("testing"), false)],
            ..RouteMatch::default()
        }];
        let mut second = set.services[0].routes[0].clone();
        second.name = "later".into();
        set.services[0].routes.push(second);
        router.set(Source::File, set);
        let snap = store.snapshot();
        let svc = snap.by_name("greeter").unwrap();
        let table = router.table();
        let f = fields("/a.B/C", &[("x-env", "testing")]);
        let d = table.decide(svc, &Request::new(&f, None)).unwrap();
        assert_eq!(&*d.route.unwrap().name, "split", "the first that matches");
        let f = fields("/a.B/C", &[]);
        let d = table.decide(svc, &Request::new(&f, None)).unwrap();
        assert!(d.route.is_none());
        assert_eq!(d.destination.balancer().ready().len(), 3);
    }

    #[test]
    fn the_file_wins_a_service_and_refusals_are_kept() {
        let store = store();
        let router = router(&store);
        let mut kube = split(&[(Some("v2"), 1)]);
        kube.services[0].routes[0].source = RouteSource::VirtualService {
            namespace: "default".into(),
            name: "greeter".into(),
        };
        kube.rejected.push(Rejected {
            source: RouteSource::VirtualService {
                namespace: "default".into(),
                name: "bad".into(),
            },
            service: Some("greeter".into()),
            reason: "subset \"v3\" is not defined".into(),
        });
        router.set(Source::Kubernetes, kube);
        assert_eq!(
            router.table().services().next().unwrap().from,
            Source::Kubernetes
        );
        router.set(Source::File, split(&[(Some("v1"), 1)]));
        let table = router.table();
        let s = table.services().next().unwrap();
        assert_eq!(s.from, Source::File);
        assert_eq!(table.rejected.len(), 1);
        assert_eq!(
            router
                .metrics
                .render()
                .lines()
                .find(|l| l.starts_with("balancer_policy_rejected{")),
            Some(r#"balancer_policy_rejected{kind="VirtualService",name="default/bad"} 1"#)
        );
    }

    #[test]
    fn a_backend_of_an_unknown_service_answers_unavailable() {
        let store = store();
        let router = router(&store);
        let mut set = split(&[(None, 1)]);
        set.services[0].routes[0].action.backends[0].service = "nosuch".into();
        router.set(Source::File, set);
        let snap = store.snapshot();
        let f = fields("/a.B/C", &[]);
        let status = router
            .table()
            .decide(snap.by_name("greeter").unwrap(), &Request::new(&f, None))
            .unwrap_err();
        assert!(
            status
                .message
                .contains("backend service nosuch is not known")
        );
    }
}
