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

use std::{collections::BTreeMap, fmt, time::Duration};

use serde::{Serialize, Serializer};

use crate::{config::Policy, state::Source};

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
        let regex = regex::bytes::RegexBuilder::new(&format!("^(?:{source})$"))
            // Bounded memory for what a policy author writes: a pattern that would compile to
            // more is refused, not built.
            .size_limit(1 << 20)
            .build()?;
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

/// Retries of a route's calls. A placeholder for the next part of traffic policy (issue 16):
/// no source fills it yet, and a call is tried as [`super::Attempts`] says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RetryPolicy {}

/// Faults injected into a route's calls (delays, aborts). A placeholder for issue 16.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct FaultPolicy {}

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
    /// Retries (issue 16).
    pub retries: Option<RetryPolicy>,
    /// Faults (issue 16).
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
    /// Who may call it (issue 16).
    pub authorization: Option<AuthorizationPolicy>,
}

impl ServicePolicy {
    /// A policy of `service` with these routes and nothing else.
    pub fn new(service: impl Into<String>, routes: Vec<Route>) -> Self {
        Self {
            service: service.into(),
            routes,
            load_balancer: None,
            authorization: None,
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
/// one (`Router::set`, next).
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
