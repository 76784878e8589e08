//! Traffic policy from the cluster: Istio `VirtualService`s and `DestinationRule`s
//! ([`super::istio`]) and Gateway API `GRPCRoute`s bound to Services ([`super::gateway`]),
//! merged into one [`PolicySet`] for the call layer (`call::route`), with what wins when several
//! objects name one Service, what is refused and why, and the last good policy kept.
//!
//! Which kinds are watched: those whose API the cluster serves, found by discovery
//! ([`discover`]: `/apis`, then each group version's resources) at start and again every
//! [`RECHECK`] or when a watch of a kind answers 404 (its CRD was removed). A cluster without
//! Istio or the Gateway API works as before; the kinds watched are logged when they change.
//!
//! Precedence for one Service (each gRPC port of it is one store service):
//!
//! 1. Consumer `GRPCRoute`s (GEP-1294 "Namespace boundaries": a route in another namespace than
//!    its parent Service applies to the callers of its own namespace only) come first, their
//!    namespace's callers matched by source namespace; those callers' calls that match none of
//!    them go to the Service's endpoints, not to the producer routes (a consumer route set
//!    replaces the producer's for its namespace). Istio orders them first too (same-namespace
//!    Gateway API routes first, `pilot/pkg/model/push_context.go`).
//! 2. Then one route set for everyone: either one `VirtualService` or the `GRPCRoute`s of the
//!    Service's own namespace (producer routes), whichever is older (creation time, then name,
//!    then namespace: Istio's order, `configCompareByCreationTime`). Istio does not merge
//!    `VirtualService`s for sidecars (its "Multiple virtual services and destination rules for
//!    the same host" guide: host merging is for gateways only; its sidecar routes keep the first
//!    virtual service per host and drop the others as duplicate domains); the same holds for the
//!    `VirtualService`s Istio makes of `GRPCRoute`s. The others are refused as conflicts.
//! 3. Producer `GRPCRoute`s merge: their matches are ordered as the GRPCRoute specification
//!    orders them ([`super::gateway::Precedence`]), ties to the oldest route, then by
//!    `namespace/name`.
//! 4. `DestinationRule`s of one host merge (Istio's rule: the first definition of a subset
//!    wins, the first top-level `trafficPolicy` wins), those in the Service's namespace first,
//!    then by creation time.
//!
//! Between sources, the file's policy of a service wins over the cluster's (`call::route`).
//!
//! Refusal and the last good policy: an object that cannot be read, or that a check refuses
//! (a subset named twice), keeps its last good version in force; a route set that names a
//! missing Service, port or subset, or uses what the agent does not support, keeps the last
//! routes it gave that store service. Each refusal is a [`Rejected`] (shown by `inspect routes`,
//! counted and logged by the router when it appears; logged here when it clears).
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    sync::Arc,
    time::Duration,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{Client, core::ApiResource};
use tracing::info;

use super::{
    gateway::{self, GrpcRoute},
    istio::{self, DestinationRule, VirtualService},
};
use crate::call::route::{
    Backend, PolicySet, Rejected, Route, RouteAction, RouteMatch, RouteSource, ServicePolicy,
    SourceMatch, Subset,
};

/// How often the cluster's APIs are looked at again for policy kinds installed or removed.
pub const RECHECK: Duration = Duration::from_secs(30);

/// A kind of policy object the agent can watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    /// Istio `VirtualService`.
    VirtualService,
    /// Istio `DestinationRule`.
    DestinationRule,
    /// Gateway API `GRPCRoute`.
    GrpcRoute,
}

impl PolicyKind {
    /// Every kind.
    pub const ALL: [PolicyKind; 3] = [
        PolicyKind::VirtualService,
        PolicyKind::DestinationRule,
        PolicyKind::GrpcRoute,
    ];

    /// Its API group.
    pub fn group(self) -> &'static str {
        match self {
            Self::VirtualService | Self::DestinationRule => "networking.istio.io",
            Self::GrpcRoute => "gateway.networking.k8s.io",
        }
    }

    /// Its resource (plural) name.
    pub fn plural(self) -> &'static str {
        match self {
            Self::VirtualService => "virtualservices",
            Self::DestinationRule => "destinationrules",
            Self::GrpcRoute => "grpcroutes",
        }
    }

    /// Its `kind`.
    pub fn kind(self) -> &'static str {
        match self {
            Self::VirtualService => "VirtualService",
            Self::DestinationRule => "DestinationRule",
            Self::GrpcRoute => "GRPCRoute",
        }
    }

    /// The versions the agent reads, preferred first (all of a kind share one schema; the API
    /// server serves every object in each version it serves).
    pub fn versions(self) -> &'static [&'static str] {
        match self {
            Self::VirtualService | Self::DestinationRule => &["v1", "v1beta1", "v1alpha3"],
            Self::GrpcRoute => &["v1", "v1alpha2"],
        }
    }

    /// The `RouteSource` of one of its objects.
    pub fn source(self, namespace: &str, name: &str) -> RouteSource {
        let (namespace, name) = (namespace.to_string(), name.to_string());
        match self {
            Self::VirtualService => RouteSource::VirtualService { namespace, name },
            Self::DestinationRule => RouteSource::DestinationRule { namespace, name },
            Self::GrpcRoute => RouteSource::GrpcRoute { namespace, name },
        }
    }

    /// The resource in `version`, for a dynamic `Api`.
    pub fn api_resource(self, version: &str) -> ApiResource {
        ApiResource {
            group: self.group().into(),
            version: version.into(),
            api_version: format!("{}/{version}", self.group()),
            kind: self.kind().into(),
            plural: self.plural().into(),
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.plural(), self.group())
    }
}

/// The policy kinds the cluster serves, each with the version to watch: the first of
/// [`PolicyKind::versions`] its group serves and whose resource list has the kind.
pub async fn discover(client: &Client) -> Result<BTreeMap<PolicyKind, String>, kube::Error> {
    let groups = client.list_api_groups().await?;
    let mut found = BTreeMap::new();
    let mut resources: HashMap<String, Vec<String>> = HashMap::new();
    for kind in PolicyKind::ALL {
        let Some(group) = groups.groups.iter().find(|g| g.name == kind.group()) else {
            continue;
        };
        for version in kind.versions() {
            let gv = format!("{}/{version}", kind.group());
            if !group.versions.iter().any(|v| v.group_version == gv) {
                continue;
            }
            if !resources.contains_key(&gv) {
                let list = client.list_api_group_resources(&gv).await?;
                resources.insert(
                    gv.clone(),
                    list.resources.into_iter().map(|r| r.name).collect(),
                );
            }
            if resources[&gv].iter().any(|r| r == kind.plural()) {
                found.insert(kind, version.to_string());
                break;
            }
        }
    }
    Ok(found)
}

/// A Service by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ServiceRef {
    /// `namespace`/`name`.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The store's name of its gRPC port `port` (as Kubernetes discovery names it).
    pub fn store_name(&self, port: u16) -> String {
        store_name(&self.namespace, &self.name, port)
    }
}

/// The store's name of a Service's gRPC port: `<name>.<namespace>:<port>`.
pub fn store_name(namespace: &str, name: &str, port: u16) -> String {
    format!("{name}.{namespace}:{port}")
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What the agent keeps of a policy object: who it is, and its spec or why it could not be read.
#[derive(Clone, Debug, PartialEq)]
pub struct Decoded<T> {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `metadata.creationTimestamp`.
    pub created: Option<Time>,
    /// The spec, or why it could not be read.
    pub spec: Result<Arc<T>, String>,
}

impl<T: serde::de::DeserializeOwned> Decoded<T> {
    /// Reads a dynamic object's `spec`; a spec that does not fit is kept as the reason.
    pub fn of(obj: &kube::core::DynamicObject) -> Self {
        let spec = match obj.data.get("spec") {
            Some(spec) => T::deserialize(spec)
                .map(Arc::new)
                .map_err(|e| format!("spec cannot be read: {e}")),
            None => Err("no spec".to_string()),
        };
        Self {
            namespace: obj.metadata.namespace.clone().unwrap_or_default(),
            name: obj.metadata.name.clone().unwrap_or_default(),
            created: obj.metadata.creation_timestamp.clone(),
            spec,
        }
    }
}

/// Istio's order of configuration objects: creation time, then name, then namespace.
type Age<'a> = (Option<&'a Time>, &'a str, &'a str);

fn age<T>(d: &Decoded<T>) -> Age<'_> {
    (d.created.as_ref(), &d.name, &d.namespace)
}

/// The Services of the cluster as policy needs them, and how hosts name them.
pub struct Ctx<'a> {
    services: &'a HashMap<ServiceRef, Vec<(String, u16)>>,
    domain: &'a str,
    rules: &'a HashMap<ServiceRef, MergedRule>,
}

impl Ctx<'_> {
    /// The Service a host names, resolved against `namespace`: `name`, `name.ns`,
    /// `name.ns.svc`, `name.ns.svc.<cluster domain>` (case-insensitive); `None` for another
    /// host or a Service the cluster does not have.
    pub fn resolve_host(&self, host: &str, namespace: &str) -> Option<ServiceRef> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let labels: Vec<&str> = host.split('.').collect();
        let svc = match labels.as_slice() {
            [name] => ServiceRef::new(namespace, name),
            [name, ns] | [name, ns, "svc"] => ServiceRef::new(ns, name),
            [name, ns, "svc", rest @ ..] if rest.join(".") == self.domain => {
                ServiceRef::new(ns, name)
            }
            _ => return None,
        };
        self.services.contains_key(&svc).then_some(svc)
    }

    /// Whether the cluster has the Service.
    pub fn has_service(&self, svc: &ServiceRef) -> bool {
        self.services.contains_key(svc)
    }

    /// The gRPC port of `target` that calls go to: `explicit` if it is one; without it, the
    /// port being routed when `target` is the routed Service, else `target`'s only gRPC port.
    pub fn backend_port(
        &self,
        target: &ServiceRef,
        explicit: Option<u16>,
        routed: (&ServiceRef, u16),
    ) -> Result<u16, String> {
        let ports = self
            .services
            .get(target)
            .ok_or_else(|| format!("Service {target} not found"))?;
        match explicit {
            Some(p) if ports.iter().any(|(_, q)| *q == p) => Ok(p),
            Some(p) => Err(format!(
                "port {p} of Service {target} is not a gRPC port (name it grpc or http2, or set \
                 appProtocol grpc)"
            )),
            None if target == routed.0 => Ok(routed.1),
            None => match ports.as_slice() {
                [(_, p)] => Ok(*p),
                [] => Err(format!("Service {target} has no gRPC port")),
                _ => Err(format!(
                    "Service {target} has several gRPC ports ({}): name one",
                    ports
                        .iter()
                        .map(|(_, p)| p.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            },
        }
    }

    /// The subset `name` of `target` as its `DestinationRule`s define it, with its balancing
    /// policy for `port`.
    pub fn subset(&self, target: &ServiceRef, name: &str, port: u16) -> Result<Subset, String> {
        let rule = self
            .rules
            .get(target)
            .ok_or_else(|| format!("{name:?}: no DestinationRule defines subsets of {target}"))?;
        let s = rule.subsets.get(name).ok_or_else(|| {
            format!(
                "{name:?} is not defined by any DestinationRule of {target} (defined: {})",
                rule.subsets.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?;
        Ok(Subset {
            name: name.to_string(),
            labels: s.labels.clone(),
            policy: s
                .traffic_policy
                .as_ref()
                .and_then(|tp| tp.policy_for_port(port)),
        })
    }
}

/// The `DestinationRule`s of one host, merged.
#[derive(Default)]
struct MergedRule {
    subsets: BTreeMap<String, istio::IstioSubset>,
    /// The first rule with a top-level traffic policy.
    traffic: Option<Arc<DestinationRule>>,
}

/// Limits route matches to callers in `namespaces` (each match once per namespace; a match
/// that already names another namespace is dropped). No match: one per namespace. An empty
/// result: the route applies to none of them.
pub fn restrict_to_namespaces(matches: Vec<RouteMatch>, namespaces: &[String]) -> Vec<RouteMatch> {
    let matches = if matches.is_empty() {
        vec![RouteMatch::default()]
    } else {
        matches
    };
    let mut out = Vec::new();
    for m in &matches {
        for ns in namespaces {
            let mut source = m.source.clone().unwrap_or_default();
            if source.namespace.as_ref().is_some_and(|n| n != ns) {
                continue;
            }
            source.namespace = Some(ns.clone());
            out.push(RouteMatch {
                source: Some(source),
                ..m.clone()
            });
        }
    }
    out
}

/// A duration as Istio writes it (protobuf JSON `10s`, `1.5s`) or as Go does (`500ms`,
/// `1m30s`): units `h`, `m`, `s`, `ms`, `us`/`µs`, `ns`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (10s, 1.5s, 500ms)");
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let value: f64 = rest[..n].parse().map_err(|_| bad())?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let scale = match &rest[..u] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = &rest[u..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

/// The cluster's policy objects and Services, as the Kubernetes source keeps them.
pub struct Inputs<'a> {
    /// Every Service by namespace and name, with its gRPC ports (name, port), in order.
    pub services: &'a HashMap<ServiceRef, Vec<(String, u16)>>,
    /// The cluster's DNS domain.
    pub domain: &'a str,
    /// `VirtualService`s by `namespace/name`.
    pub virtual_services: &'a HashMap<String, Decoded<VirtualService>>,
    /// `DestinationRule`s by `namespace/name`.
    pub destination_rules: &'a HashMap<String, Decoded<DestinationRule>>,
    /// `GRPCRoute`s by `namespace/name`.
    pub grpc_routes: &'a HashMap<String, Decoded<GrpcRoute>>,
}

/// Turns the cluster's objects into a [`PolicySet`], remembering the last good version of
/// each object and the last good routes each object gave each store service.
#[derive(Default)]
pub struct Translator {
    last_vs: HashMap<RouteSource, Arc<VirtualService>>,
    last_dr: HashMap<RouteSource, Arc<DestinationRule>>,
    last_gr: HashMap<RouteSource, Arc<GrpcRoute>>,
    /// (object, store service) to the routes it last gave that service.
    last_routes: HashMap<(RouteSource, String), Vec<Route>>,
    /// The refusals last reported, to log only their changes.
    reported: BTreeSet<(String, Option<String>, String)>,
}

/// A `GRPCRoute` attached to a Service: which of its ports (`None`: all).
struct Attached<'a> {
    source: RouteSource,
    decoded: &'a Decoded<GrpcRoute>,
    spec: Arc<GrpcRoute>,
    ports: Option<BTreeSet<u16>>,
}

/// What competes for a Service's one route set for everyone.
enum Candidate<'a> {
    Virtual(RouteSource, Age<'a>, Arc<VirtualService>, &'a str),
    Producers(Age<'a>),
}

/// An object usable now: its spec, or its last good one.
fn usable<'a, T>(
    kind: PolicyKind,
    objects: &'a HashMap<String, Decoded<T>>,
    last: &mut HashMap<RouteSource, Arc<T>>,
    check: impl Fn(&T) -> Result<(), String>,
    rejected: &mut Vec<Rejected>,
) -> Vec<(RouteSource, &'a Decoded<T>, Arc<T>)> {
    let mut out = Vec::new();
    let mut live = BTreeSet::new();
    for d in objects.values() {
        let source = kind.source(&d.namespace, &d.name);
        live.insert(source.clone());
        let spec = d.spec.clone().and_then(|s| check(&s).map(|()| s));
        match spec {
            Ok(s) => {
                last.insert(source.clone(), s.clone());
                out.push((source, d, s));
            }
            Err(reason) => {
                let kept = last.get(&source).cloned();
                rejected.push(Rejected {
                    source: source.clone(),
                    service: None,
                    reason: if kept.is_some() {
                        format!("{reason}; its last good version stays in force")
                    } else {
                        reason
                    },
                });
                if let Some(s) = kept {
                    out.push((source, d, s));
                }
            }
        }
    }
    last.retain(|s, _| live.contains(s));
    out.sort_by(|a, b| age(a.1).cmp(&age(b.1)));
    out
}

impl Translator {
    /// The policy the objects give now.
    pub fn translate(&mut self, inp: &Inputs<'_>) -> PolicySet {
        let mut rejected = Vec::new();
        let vss = usable(
            PolicyKind::VirtualService,
            inp.virtual_services,
            &mut self.last_vs,
            |_| Ok(()),
            &mut rejected,
        );
        let drs = usable(
            PolicyKind::DestinationRule,
            inp.destination_rules,
            &mut self.last_dr,
            DestinationRule::validate,
            &mut rejected,
        );
        let grs = usable(
            PolicyKind::GrpcRoute,
            inp.grpc_routes,
            &mut self.last_gr,
            |_| Ok(()),
            &mut rejected,
        );
        let empty = HashMap::new();
        let lookup = Ctx {
            services: inp.services,
            domain: inp.domain,
            rules: &empty,
        };

        // DestinationRules, merged per host: the Service's own namespace first, then by age.
        let mut by_host: BTreeMap<ServiceRef, Vec<(bool, Age<'_>, Arc<DestinationRule>)>> =
            BTreeMap::new();
        for (source, d, spec) in &drs {
            match lookup.resolve_host(&spec.host, &d.namespace) {
                Some(svc) => by_host.entry(svc.clone()).or_default().push((
                    d.namespace != svc.namespace,
                    age(d),
                    spec.clone(),
                )),
                None => rejected.push(Rejected {
                    source: source.clone(),
                    service: None,
                    reason: format!("host {:?} names no Service of the cluster", spec.host),
                }),
            }
        }
        let mut rules: HashMap<ServiceRef, MergedRule> = HashMap::new();
        for (svc, mut list) in by_host {
            list.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
            let merged = rules.entry(svc).or_default();
            for (_, _, dr) in list {
                for s in &dr.subsets {
                    merged
                        .subsets
                        .entry(s.name.clone())
                        .or_insert_with(|| s.clone());
                }
                if merged.traffic.is_none() && dr.traffic_policy.is_some() {
                    merged.traffic = Some(dr);
                }
            }
        }
        let ctx = Ctx {
            services: inp.services,
            domain: inp.domain,
            rules: &rules,
        };

        // What competes for each Service.
        let mut candidates: BTreeMap<ServiceRef, Vec<Candidate<'_>>> = BTreeMap::new();
        for (source, d, spec) in &vss {
            if !spec.for_mesh()
                || spec.export_to.iter().all(|e| e == "~") && !spec.export_to.is_empty()
            {
                continue;
            }
            let mut hosts: Vec<ServiceRef> = spec
                .hosts
                .iter()
                .filter_map(|h| ctx.resolve_host(h, &d.namespace))
                .collect();
            hosts.sort();
            hosts.dedup();
            if hosts.is_empty() {
                rejected.push(Rejected {
                    source: source.clone(),
                    service: None,
                    reason: format!(
                        "no host names a Service of the cluster: {}",
                        spec.hosts.join(", ")
                    ),
                });
            }
            for svc in hosts {
                candidates.entry(svc).or_default().push(Candidate::Virtual(
                    source.clone(),
                    age(d),
                    spec.clone(),
                    &d.namespace,
                ));
            }
        }
        let mut producers: BTreeMap<ServiceRef, Vec<Attached<'_>>> = BTreeMap::new();
        let mut consumers: BTreeMap<ServiceRef, BTreeMap<String, Vec<Attached<'_>>>> =
            BTreeMap::new();
        for (source, d, spec) in &grs {
            let mut parents: BTreeMap<ServiceRef, Option<BTreeSet<u16>>> = BTreeMap::new();
            let mut problem = None;
            for (i, p) in spec.parent_refs.iter().enumerate() {
                if !p.is_service() {
                    continue;
                }
                let svc = ServiceRef::new(p.namespace.as_deref().unwrap_or(&d.namespace), &p.name);
                let Some(ports) = inp.services.get(&svc) else {
                    problem = Some(format!("parentRefs[{i}]: Service {svc} not found"));
                    continue;
                };
                let port = match (&p.section_name, p.port) {
                    (Some(section), want) => match ports.iter().find(|(n, _)| n == section) {
                        Some((_, q)) if want.is_none_or(|w| w == *q) => Some(*q),
                        _ => {
                            problem = Some(format!(
                                "parentRefs[{i}].sectionName: {section:?} is not a gRPC \
                                     port of Service {svc}"
                            ));
                            continue;
                        }
                    },
                    (None, Some(want)) => {
                        if !ports.iter().any(|(_, q)| *q == want) {
                            problem = Some(format!(
                                "parentRefs[{i}].port: {want} is not a gRPC port of Service {svc}"
                            ));
                            continue;
                        }
                        Some(want)
                    }
                    (None, None) => None,
                };
                let entry = parents.entry(svc).or_insert(Some(BTreeSet::new()));
                match (entry.as_mut(), port) {
                    (Some(set), Some(p)) => {
                        set.insert(p);
                    }
                    _ => *entry = None,
                }
            }
            if let Some(reason) = problem {
                rejected.push(Rejected {
                    source: source.clone(),
                    service: None,
                    reason,
                });
            }
            for (svc, ports) in parents {
                let attached = Attached {
                    source: source.clone(),
                    decoded: d,
                    spec: spec.clone(),
                    ports,
                };
                if svc.namespace == d.namespace {
                    producers.entry(svc).or_default().push(attached);
                } else {
                    consumers
                        .entry(svc)
                        .or_default()
                        .entry(d.namespace.clone())
                        .or_default()
                        .push(attached);
                }
            }
        }
        for (svc, list) in &producers {
            let oldest = list
                .iter()
                .map(|a| age(a.decoded))
                .min()
                .expect("not empty");
            candidates
                .entry(svc.clone())
                .or_default()
                .push(Candidate::Producers(oldest));
        }
        for svc in consumers.keys().chain(rules.keys()) {
            candidates.entry(svc.clone()).or_default();
        }

        let mut services = Vec::new();
        let mut live_routes = BTreeSet::new();
        for (svc, mut cands) in candidates {
            let Some(ports) = inp.services.get(&svc) else {
                continue;
            };
            cands.sort_by(|a, b| cand_age(a).cmp(cand_age(b)));
            let mut cands = cands.into_iter();
            let winner = cands.next();
            let winner_name = winner.as_ref().map(|w| self.describe(w, &svc, &producers));
            for loser in cands {
                let reason = format!(
                    "conflicts with {} for Service {svc}, which is older and wins (Istio uses one \
                     VirtualService per host for sidecars, and GRPCRoutes become one)",
                    winner_name.as_deref().unwrap_or_default()
                );
                let losers: Vec<RouteSource> = match &loser {
                    Candidate::Virtual(s, ..) => vec![s.clone()],
                    Candidate::Producers(_) => {
                        producers[&svc].iter().map(|a| a.source.clone()).collect()
                    }
                };
                for source in losers {
                    rejected.push(Rejected {
                        source,
                        service: None,
                        reason: reason.clone(),
                    });
                }
            }
            for (_, port) in ports {
                let port = *port;
                let store = svc.store_name(port);
                let mut routes = Vec::new();
                let mut attempt = |source: &RouteSource,
                                   result: Result<Vec<Route>, String>,
                                   rejected: &mut Vec<Rejected>|
                 -> Vec<Route> {
                    let key = (source.clone(), store.clone());
                    live_routes.insert(key.clone());
                    match result {
                        Ok(rs) => {
                            self.last_routes.insert(key, rs.clone());
                            rs
                        }
                        Err(reason) => {
                            let kept = self.last_routes.get(&key).cloned();
                            rejected.push(Rejected {
                                source: source.clone(),
                                service: Some(store.clone()),
                                reason: if kept.is_some() {
                                    format!("{reason}; its last good routes stay in force")
                                } else {
                                    reason
                                },
                            });
                            kept.unwrap_or_default()
                        }
                    }
                };
                for (ns, list) in consumers.get(&svc).into_iter().flatten() {
                    let merged =
                        merge_grpc_routes(list, &svc, port, &ctx, &mut attempt, &mut rejected);
                    let Some(first) = list
                        .iter()
                        .find(|a| a.ports.as_ref().is_none_or(|p| p.contains(&port)))
                    else {
                        continue;
                    };
                    let namespaces = [ns.clone()];
                    for mut r in merged {
                        r.matches = restrict_to_namespaces(r.matches, &namespaces);
                        routes.push(r);
                    }
                    // The consumer routes replace the producer's for their namespace's callers.
                    routes.push(Route {
                        name: format!("{ns}/consumer-default"),
                        source: first.source.clone(),
                        matches: vec![RouteMatch {
                            source: Some(SourceMatch {
                                namespace: Some(ns.clone()),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }],
                        action: RouteAction {
                            backends: vec![Backend {
                                service: store.clone(),
                                subset: None,
                                weight: 1,
                            }],
                            ..Default::default()
                        },
                    });
                }
                match &winner {
                    Some(Candidate::Virtual(source, _, spec, ns)) => {
                        let r = istio::translate(spec, source, ns, &svc, port, &ctx);
                        routes.extend(attempt(source, r, &mut rejected));
                    }
                    Some(Candidate::Producers(_)) => {
                        routes.extend(merge_grpc_routes(
                            &producers[&svc],
                            &svc,
                            port,
                            &ctx,
                            &mut attempt,
                            &mut rejected,
                        ));
                    }
                    None => {}
                }
                let traffic = rules.get(&svc).and_then(|r| r.traffic.as_ref());
                let load_balancer = traffic.and_then(|dr| dr.policy_for_port(port));
                let balancing = traffic
                    .map(|dr| dr.balancing_for_port(port))
                    .unwrap_or_default();
                let resilience = traffic
                    .map(|dr| dr.resilience_for_port(port))
                    .unwrap_or_default();
                if routes.is_empty()
                    && load_balancer.is_none()
                    && balancing.is_empty()
                    && resilience.is_empty()
                {
                    continue;
                }
                unique_names(&mut routes);
                let mut policy = ServicePolicy::new(store, routes);
                policy.load_balancer = load_balancer;
                policy.balancing = balancing;
                policy.resilience = resilience;
                services.push(policy);
            }
        }
        self.last_routes.retain(|k, _| live_routes.contains(k));
        services.sort_by(|a, b| a.service.cmp(&b.service));
        rejected.sort_by(|a, b| {
            (&a.source, &a.service, &a.reason).cmp(&(&b.source, &b.service, &b.reason))
        });
        rejected.dedup();
        self.report(&rejected);
        PolicySet { services, rejected }
    }

    fn describe(
        &self,
        c: &Candidate<'_>,
        svc: &ServiceRef,
        producers: &BTreeMap<ServiceRef, Vec<Attached<'_>>>,
    ) -> String {
        match c {
            Candidate::Virtual(s, ..) => s.to_string(),
            Candidate::Producers(_) => producers[svc]
                .iter()
                .map(|a| a.source.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    /// Logs the refusals that cleared (the router logs those that appear).
    fn report(&mut self, rejected: &[Rejected]) {
        let now: BTreeSet<(String, Option<String>, String)> = rejected
            .iter()
            .map(|r| (r.source.to_string(), r.service.clone(), r.reason.clone()))
            .collect();
        for (source, service, _) in self.reported.difference(&now) {
            if !now.iter().any(|(s, v, _)| s == source && v == service) {
                info!(
                    %source,
                    service = service.as_deref().unwrap_or("-"),
                    "traffic policy no longer refused"
                );
            }
        }
        self.reported = now;
    }
}

fn cand_age<'a>(c: &'a Candidate<'a>) -> &'a Age<'a> {
    match c {
        Candidate::Virtual(_, age, ..) | Candidate::Producers(age) => age,
    }
}

/// The routes of the `GRPCRoute`s of one Service's port, ordered by the specification's
/// precedence (each route's result through `attempt`, which keeps its last good routes).
fn merge_grpc_routes(
    list: &[Attached<'_>],
    svc: &ServiceRef,
    port: u16,
    ctx: &Ctx<'_>,
    attempt: &mut impl FnMut(&RouteSource, Result<Vec<Route>, String>, &mut Vec<Rejected>) -> Vec<Route>,
    rejected: &mut Vec<Rejected>,
) -> Vec<Route> {
    let mut all = Vec::new();
    for a in list {
        if a.ports.as_ref().is_some_and(|p| !p.contains(&port)) {
            continue;
        }
        let d = a.decoded;
        let result = gateway::translate(&a.spec, &a.source, &d.namespace, svc, port, ctx);
        // The precedence is recomputed from the result; routes kept from a last good version
        // keep their order among themselves, after the others of equal specificity.
        let (ordered, plain): (Vec<_>, Result<Vec<Route>, String>) = match result {
            Ok(v) => {
                let routes = v.iter().map(|(_, r)| r.clone()).collect();
                (v, Ok(routes))
            }
            Err(e) => (Vec::new(), Err(e)),
        };
        let kept = attempt(&a.source, plain, rejected);
        let older = (d.created.clone(), d.namespace.clone(), d.name.clone());
        if ordered.is_empty() {
            for (j, r) in kept.into_iter().enumerate() {
                all.push((None, older.clone(), j, r));
            }
        } else {
            for (j, (p, r)) in ordered.into_iter().enumerate() {
                all.push((Some(p), older.clone(), j, r));
            }
        }
    }
    all.sort_by(|a, b| match (&a.0, &b.0) {
        (Some(pa), Some(pb)) => pa.key(&a.1).cmp(&pb.key(&b.1)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => (&a.1, a.2).cmp(&(&b.1, b.2)),
    });
    all.into_iter().map(|(_, _, _, r)| r).collect()
}

/// Makes route names unique within a service (`name#2`, ...).
fn unique_names(routes: &mut [Route]) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in routes {
        let n = seen.entry(r.name.clone()).or_default();
        *n += 1;
        if *n > 1 {
            r.name = format!("{}#{n}", r.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        call::route::{Percent, StringMatch},
        config::Policy,
    };

    /// The cluster of a test: Services and policy objects as users write them.
    struct Cluster {
        services: HashMap<ServiceRef, Vec<(String, u16)>>,
        vs: HashMap<String, Decoded<VirtualService>>,
        dr: HashMap<String, Decoded<DestinationRule>>,
        gr: HashMap<String, Decoded<GrpcRoute>>,
        clock: i64,
    }

    impl Cluster {
        fn new() -> Self {
            let mut c = Self {
                services: HashMap::new(),
                vs: HashMap::new(),
                dr: HashMap::new(),
                gr: HashMap::new(),
                clock: 1_700_000_000,
            };
            for name in ["greeter-b", "payment-service", "grpc-service"] {
                c.service("default", name, &[("grpc", 50051)]);
            }
            c
        }

        fn service(&mut self, ns: &str, name: &str, ports: &[(&str, u16)]) {
            self.services.insert(
                ServiceRef::new(ns, name),
                ports.iter().map(|(n, p)| (n.to_string(), *p)).collect(),
            );
        }

        /// Applies a YAML object (its `kind` says which); each is created one second after the
        /// last, unless it exists (an update keeps its creation time).
        fn apply(&mut self, yaml: &str) {
            let v: serde_json::Value = serde_yaml::from_str(yaml).unwrap();
            let ns = v["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            let name = v["metadata"]["name"].as_str().unwrap().to_string();
            self.clock += 1;
            let created = Some(Time(jiff_ts(self.clock)));
            let key = format!("{ns}/{name}");
            fn put<T: serde::de::DeserializeOwned>(
                map: &mut HashMap<String, Decoded<T>>,
                key: String,
                ns: String,
                name: String,
                created: Option<Time>,
                spec: &serde_json::Value,
            ) {
                let created = map.get(&key).map_or(created, |d| d.created.clone());
                let spec = T::deserialize(spec)
                    .map(Arc::new)
                    .map_err(|e| format!("spec cannot be read: {e}"));
                map.insert(
                    key,
                    Decoded {
                        namespace: ns,
                        name,
                        created,
                        spec,
                    },
                );
            }
            let spec = &v["spec"];
            match v["kind"].as_str().unwrap() {
                "VirtualService" => put(&mut self.vs, key, ns, name, created, spec),
                "DestinationRule" => put(&mut self.dr, key, ns, name, created, spec),
                "GRPCRoute" => put(&mut self.gr, key, ns, name, created, spec),
                k => panic!("{k}"),
            }
        }

        /// Services `payment-v1` and `payment-v2`, and [`SPLIT_ROUTE`] over them.
        fn payment_split(&mut self) {
            self.service("default", "payment-v1", &[("grpc", 50051)]);
            self.service("default", "payment-v2", &[("grpc", 50051)]);
            self.apply(SPLIT_ROUTE);
        }

        /// The policy of a fresh translator, which must refuse nothing.
        fn accepted(&self) -> PolicySet {
            let set = self.translate(&mut Translator::default());
            assert!(set.rejected.is_empty(), "{:#?}", set.rejected);
            set
        }

        fn translate(&self, t: &mut Translator) -> PolicySet {
            t.translate(&Inputs {
                services: &self.services,
                domain: "cluster.local",
                virtual_services: &self.vs,
                destination_rules: &self.dr,
                grpc_routes: &self.gr,
            })
        }
    }

    fn jiff_ts(secs: i64) -> k8s_openapi::jiff::Timestamp {
        k8s_openapi::jiff::Timestamp::from_second(secs).unwrap()
    }

    fn policy<'a>(set: &'a PolicySet, service: &str) -> &'a ServicePolicy {
        set.services
            .iter()
            .find(|s| s.service == service)
            .unwrap_or_else(|| panic!("no policy for {service}: {set:#?}"))
    }

    /// Seed 002's VirtualService and DestinationRule, as written.
    const SEED_002: &str = include_str!("testdata/seed-002-greeter-b.yaml");

    /// Seed 004's complete payment-service example, as written.
    const SEED_004: &str = include_str!("testdata/seed-004-payment-service.yaml");

    fn apply_all(c: &mut Cluster, yaml: &str) {
        for doc in yaml.split("\n---\n") {
            c.apply(doc);
        }
    }

    #[test]
    fn seed_002_routes_every_call_to_the_v1_subset() {
        let mut c = Cluster::new();
        apply_all(&mut c, SEED_002);
        let set = c.accepted();
        let p = policy(&set, "greeter-b.default:50051");
        assert_eq!(p.routes.len(), 1);
        let r = &p.routes[0];
        assert_eq!(r.name, "greeter-b/http[0]");
        assert!(r.matches.is_empty());
        assert_eq!(
            r.source,
            RouteSource::VirtualService {
                namespace: "default".into(),
                name: "greeter-b".into()
            }
        );
        let b = &r.action.backends[..];
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].service, "greeter-b.default:50051");
        let subset = b[0].subset.as_ref().unwrap();
        assert_eq!(subset.name, "v1");
        assert_eq!(subset.labels["version"], "v1");
    }

    #[test]
    fn seed_004_methods_headers_split_timeout_and_balancing() {
        let mut c = Cluster::new();
        apply_all(&mut c, SEED_004);
        let set = c.accepted();
        let p = policy(&set, "payment-service.default:50051");
        assert_eq!(p.load_balancer, Some(Policy::LeastRequest));
        assert_eq!(p.routes.len(), 3);
        let [prod, testing, rollout] = &p.routes[..] else {
            unreachable!()
        };
        let m = &prod.matches[0];
        assert_eq!(
            m.path,
            Some(StringMatch::Exact(
                "/payment.PaymentService/ProcessPayment".into()
            ))
        );
        assert_eq!(m.headers[0].name, "x-environment");
        assert_eq!(
            m.headers[0].value,
            Some(StringMatch::Exact("production".into()))
        );
        assert_eq!(prod.action.timeout, Some(Duration::from_secs(15)));
        let retries = prod.action.retries.as_ref().unwrap();
        assert_eq!(retries.attempts, 3);
        assert_eq!(retries.per_try_timeout, Some(Duration::from_secs(5)));
        assert_eq!(
            retries.retry_on,
            crate::call::route::RetryOn::parse(
                "cancelled,deadline-exceeded,internal,resource-exhausted",
                false
            )
            .unwrap()
        );
        assert!(testing.action.retries.is_none());
        // The connection pool is the service's circuit breaker.
        let pool = p.resilience.connection_pool.unwrap();
        assert_eq!(pool.max_requests, Some(1000));
        assert_eq!(pool.max_requests_per_connection, Some(100));
        assert_eq!(pool.max_pending_requests, None);
        assert_eq!(
            testing.matches[0].path,
            Some(StringMatch::Prefix("/payment.PaymentService/".into()))
        );
        assert_eq!(
            testing.action.backends[0].subset.as_ref().unwrap().name,
            "v2"
        );
        let weights: Vec<(String, u32)> = rollout
            .action
            .backends
            .iter()
            .map(|b| (b.subset.as_ref().unwrap().name.clone(), b.weight))
            .collect();
        assert_eq!(weights, [("v1".into(), 80), ("v2".into(), 20)]);
        assert!(rollout.matches.is_empty());
    }

    /// A cluster with seed 002, and a translator that put it in force.
    fn seed_002_in_force() -> (Cluster, Translator, PolicySet) {
        let mut c = Cluster::new();
        apply_all(&mut c, SEED_002);
        let mut t = Translator::default();
        let good = c.translate(&mut t);
        (c, t, good)
    }

    /// Seed 002's VirtualService naming a subset no DestinationRule defines.
    fn seed_002_with_subset_v3() -> String {
        let vs = SEED_002.split("\n---\n").next().unwrap();
        vs.replace("subset: v1", "subset: v3")
    }

    #[test]
    fn an_unknown_subset_is_refused_and_the_last_good_routes_stay() {
        let (mut c, mut t, good) = seed_002_in_force();
        c.apply(&seed_002_with_subset_v3());
        let set = c.translate(&mut t);
        assert_eq!(set.rejected.len(), 1, "{:#?}", set.rejected);
        let r = &set.rejected[0];
        assert_eq!(r.service.as_deref(), Some("greeter-b.default:50051"));
        assert!(
            r.reason.starts_with(
                "http[0].route[0].destination.subset: \"v3\" is not defined by any \
                 DestinationRule of default/greeter-b (defined: v1)"
            ) && r.reason.ends_with("its last good routes stay in force"),
            "{}",
            r.reason
        );
        assert_eq!(set.services, good.services, "the last good policy serves");
        // Fixed: in force, nothing refused.
        apply_all(&mut c, SEED_002);
        let set = c.translate(&mut t);
        assert!(set.rejected.is_empty());
        // A new translator (a restart) has no last good routes: nothing for the service.
        c.apply(&seed_002_with_subset_v3());
        let set = c.translate(&mut Translator::default());
        assert!(set.services.is_empty(), "{:#?}", set.services);
        assert!(!set.rejected[0].reason.contains("last good"));
    }

    #[test]
    fn an_unreadable_object_keeps_its_last_good_version() {
        let (mut c, mut t, good) = seed_002_in_force();
        c.apply(
            "kind: VirtualService\nmetadata: {name: greeter-b}\nspec: {hosts: greeter-b, http: 3}",
        );
        let set = c.translate(&mut t);
        assert_eq!(set.services, good.services);
        assert!(set.rejected[0].reason.starts_with("spec cannot be read"));
        assert!(
            set.rejected[0]
                .reason
                .ends_with("its last good version stays in force")
        );
    }

    #[test]
    fn hosts_resolve_against_the_namespace_in_every_form() {
        let mut c = Cluster::new();
        c.service("apps", "greeter", &[("grpc", 50051)]);
        for (i, host) in [
            "greeter",
            "greeter.apps",
            "greeter.apps.svc",
            "greeter.apps.svc.cluster.local",
            "GREETER.apps.svc.cluster.local.",
        ]
        .iter()
        .enumerate()
        {
            c.vs.clear();
            c.apply(&format!(
                "kind: VirtualService\nmetadata: {{name: v{i}, namespace: apps}}\n\
                 spec: {{hosts: [{host}], http: [{{route: [{{destination: {{host: {host}}}}}]}}]}}"
            ));
            let set = c.translate(&mut Translator::default());
            assert!(set.rejected.is_empty(), "{host}: {:#?}", set.rejected);
            let p = policy(&set, "greeter.apps:50051");
            assert_eq!(p.routes[0].action.backends[0].service, "greeter.apps:50051");
        }
        // Another namespace's short name is another Service; a foreign host is none.
        c.vs.clear();
        c.apply(
            "kind: VirtualService\nmetadata: {name: x, namespace: default}\n\
             spec: {hosts: [greeter, example.com], http: [{route: [{destination: {host: greeter}}]}]}",
        );
        let set = c.translate(&mut Translator::default());
        assert!(set.services.is_empty());
        assert!(
            set.rejected[0]
                .reason
                .starts_with("no host names a Service")
        );
    }

    #[test]
    fn a_virtual_service_for_gateways_only_is_not_the_agents() {
        let mut c = Cluster::new();
        c.apply(
            "kind: VirtualService\nmetadata: {name: web}\n\
             spec: {hosts: [grpc-service], gateways: [grpc-web-gateway],\
                    http: [{route: [{destination: {host: grpc-service, port: {number: 9000}}}]}]}",
        );
        let set = c.translate(&mut Translator::default());
        assert_eq!(set, PolicySet::default());
    }

    #[test]
    fn the_oldest_virtual_service_of_a_host_wins_the_others_are_refused() {
        let mut c = Cluster::new();
        apply_all(&mut c, SEED_002);
        c.apply(
            "kind: VirtualService\nmetadata: {name: newer}\n\
             spec: {hosts: [greeter-b.default.svc.cluster.local],\
                    http: [{route: [{destination: {host: greeter-b}}]}]}",
        );
        let set = c.translate(&mut Translator::default());
        let p = policy(&set, "greeter-b.default:50051");
        assert_eq!(p.routes[0].name, "greeter-b/http[0]");
        assert_eq!(set.rejected.len(), 1);
        assert_eq!(set.rejected[0].source.object(), "default/newer");
        assert!(
            set.rejected[0]
                .reason
                .starts_with("conflicts with VirtualService default/greeter-b"),
            "{}",
            set.rejected[0].reason
        );
    }

    /// Seed 004's routing as a GRPCRoute `payment-service` over Services `payment-v1` and
    /// `payment-v2`.
    const SPLIT_ROUTE: &str = include_str!("testdata/payment-grpcroute.yaml");

    #[test]
    fn grpc_routes_bound_to_a_service() {
        let mut c = Cluster::new();
        c.payment_split();
        // A second route, newer: its matches take their places by the spec's precedence.
        c.apply(
            "kind: GRPCRoute\nmetadata: {name: refunds}\n\
             spec: {parentRefs: [{group: '', kind: Service, name: payment-service}],\
                    rules: [{matches: [{method: {service: payment.PaymentService, method: Refund}},\
                                       {method: {service: payment.PaymentService}}],\
                             filters: [{type: RequestHeaderModifier,\
                                        requestHeaderModifier: {set: [{name: X-Refund, value: '1'}]}}],\
                             backendRefs: [{name: payment-v2, port: 50051}]}]}",
        );
        // Gateways' routes are not the agent's.
        c.apply(
            "kind: GRPCRoute\nmetadata: {name: ingress}\n\
             spec: {parentRefs: [{name: gw}], rules: [{backendRefs: [{name: payment-v2, port: 50051}]}]}",
        );
        let set = c.accepted();
        let p = policy(&set, "payment-service.default:50051");
        let names: Vec<&str> = p.routes.iter().map(|r| r.name.as_str()).collect();
        // Same service: the longer method first (ProcessPayment, then Refund), then the
        // service-only matches (with a header match first), then the catch-all.
        assert_eq!(
            names,
            [
                "payment-service/rules[0]",
                "refunds/rules[0].matches[0]",
                "payment-service/rules[1]",
                "refunds/rules[0].matches[1]",
                "payment-service/rules[2]"
            ]
        );
        assert_eq!(
            p.routes[1].action.request_headers.set,
            [("x-refund".to_string(), "1".to_string())]
        );
        let split: Vec<(&str, u32)> = p.routes[4]
            .action
            .backends
            .iter()
            .map(|b| (b.service.as_str(), b.weight))
            .collect();
        assert_eq!(
            split,
            [
                ("payment-v1.default:50051", 80),
                ("payment-v2.default:50051", 20)
            ]
        );
        // A backend Service that does not exist refuses the route; nothing was good before.
        c.apply(&SPLIT_ROUTE.replace("name: payment-v2", "name: payment-v3"));
        let set = c.translate(&mut Translator::default());
        let r = set
            .rejected
            .iter()
            .find(|r| r.source.object() == "default/payment-service")
            .unwrap();
        assert_eq!(
            r.reason,
            "rules[1].backendRefs[0]: Service default/payment-v3 not found"
        );
    }

    #[test]
    fn between_a_virtual_service_and_grpc_routes_the_older_wins() {
        let mut c = Cluster::new();
        c.payment_split();
        apply_all(&mut c, SEED_004);
        let set = c.translate(&mut Translator::default());
        let p = policy(&set, "payment-service.default:50051");
        assert!(p.routes.iter().all(|r| r.source.kind() == "GRPCRoute"));
        assert!(
            set.rejected
                .iter()
                .any(|r| r.source.object() == "default/payment-service"
                    && r.source.kind() == "VirtualService"
                    && r.reason.contains("GRPCRoute default/payment-service")),
            "{:#?}",
            set.rejected
        );
        // The DestinationRule's balancing applies whichever routes win.
        assert_eq!(p.load_balancer, Some(Policy::LeastRequest));
    }

    #[test]
    fn consumer_routes_come_first_for_their_namespace_only() {
        let mut c = Cluster::new();
        c.payment_split();
        c.apply(
            "kind: GRPCRoute\nmetadata: {name: mine, namespace: checkout}\n\
             spec: {parentRefs: [{group: '', kind: Service, name: payment-service, namespace: default}],\
                    rules: [{matches: [{method: {service: payment.PaymentService}}],\
                             backendRefs: [{name: payment-v2, namespace: default, port: 50051}]}]}",
        );
        let set = c.accepted();
        let p = policy(&set, "payment-service.default:50051");
        let checkout = Some(SourceMatch {
            namespace: Some("checkout".into()),
            labels: BTreeMap::new(),
        });
        assert_eq!(p.routes[0].name, "mine/rules[0]");
        assert_eq!(p.routes[0].matches[0].source, checkout);
        assert_eq!(p.routes[1].name, "checkout/consumer-default");
        assert_eq!(p.routes[1].matches[0].source, checkout);
        assert_eq!(
            p.routes[1].action.backends[0].service,
            "payment-service.default:50051"
        );
        assert_eq!(p.routes[2].name, "payment-service/rules[0]");
        assert!(p.routes[2].matches[0].source.is_none());
    }

    #[test]
    fn destination_rules_merge_the_first_subset_definition_wins() {
        let mut c = Cluster::new();
        apply_all(&mut c, SEED_002);
        // A newer rule in another namespace redefines v1 and adds v2: v1 stays the first one.
        c.apply(
            "kind: DestinationRule\nmetadata: {name: other, namespace: ops}\n\
             spec: {host: greeter-b.default.svc.cluster.local,\
                    trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}},\
                    subsets: [{name: v1, labels: {version: other}}, {name: v2, labels: {version: v2}}]}",
        );
        c.apply(
            "kind: VirtualService\nmetadata: {name: greeter-b}\n\
             spec: {hosts: [greeter-b], http: [{route: [\
               {destination: {host: greeter-b, subset: v1}, weight: 50},\
               {destination: {host: greeter-b, subset: v2}, weight: 50}]}]}",
        );
        let set = c.accepted();
        let p = policy(&set, "greeter-b.default:50051");
        let b = &p.routes[0].action.backends;
        assert_eq!(b[0].subset.as_ref().unwrap().labels["version"], "v1");
        assert_eq!(b[1].subset.as_ref().unwrap().labels["version"], "v2");
        assert_eq!(p.load_balancer, Some(Policy::RoundRobin));
    }

    #[test]
    fn unsupported_actions_are_refused_with_their_place() {
        let mut c = Cluster::new();
        for (field, value) in [
            ("redirect", "{uri: /x}"),
            ("rewrite", "{uri: /x}"),
            ("headers", "{response: {set: {a: b}}}"),
        ] {
            c.vs.clear();
            c.apply(&format!(
                "kind: VirtualService\nmetadata: {{name: g}}\n\
                 spec: {{hosts: [greeter-b], http: [{{{field}: {value}, route: [{{destination: {{host: greeter-b}}}}]}}]}}"
            ));
            let set = c.translate(&mut Translator::default());
            assert!(
                set.rejected[0]
                    .reason
                    .starts_with(&format!("http[0].{field}")),
                "{field}: {:#?}",
                set.rejected
            );
        }
    }

    #[test]
    fn faults_and_outlier_detection_as_istio_writes_them() {
        let mut c = Cluster::new();
        c.apply(
            "kind: VirtualService\nmetadata: {name: grpc-fault}\n\
             spec: {hosts: [grpc-service], http: [{\
               fault: {delay: {percentage: {value: 10.0}, fixedDelay: 1s},\
                       abort: {percentage: {value: 5.0}, grpcStatus: UNAVAILABLE}},\
               route: [{destination: {host: grpc-service}}]}]}",
        );
        c.apply(
            "kind: DestinationRule\nmetadata: {name: grpc-service}\n\
             spec: {host: grpc-service, trafficPolicy: {outlierDetection: {\
               consecutiveErrors: 5, interval: 30s, baseEjectionTime: 30s, maxEjectionPercent: 100}}}",
        );
        let set = c.accepted();
        let p = policy(&set, "grpc-service.default:50051");
        let fault = p.routes[0].action.fault.unwrap();
        assert_eq!(fault.delay.unwrap().fixed, Duration::from_secs(1));
        assert_eq!(fault.delay.unwrap().percent, Percent::new(10.0).unwrap());
        assert_eq!(
            fault.abort.unwrap().code,
            crate::call::grpc::Code::Unavailable
        );
        let o = p.resilience.outlier_detection.unwrap();
        assert_eq!(o.consecutive_errors, 5);
        assert_eq!(o.base_ejection, Some(Duration::from_secs(30)));
        assert_eq!(o.max_ejection_percent, 100);
        // Seed 004's own fault example aborts with httpStatus 14, which is no HTTP status.
        c.apply(
            "kind: VirtualService\nmetadata: {name: grpc-fault}\n\
             spec: {hosts: [grpc-service], http: [{fault: {abort: {httpStatus: 14}},\
               route: [{destination: {host: grpc-service}}]}]}",
        );
        let set = c.translate(&mut Translator::default());
        assert_eq!(
            set.rejected[0].reason,
            "http[0].fault.abort.httpStatus: 14 is not an HTTP status (200-599)"
        );
        // A duration that does not read refuses the rule.
        c.apply(
            "kind: DestinationRule\nmetadata: {name: grpc-service}\n\
             spec: {host: grpc-service, trafficPolicy: {outlierDetection: {interval: soon}}}",
        );
        let set = c.translate(&mut Translator::default());
        assert!(
            set.rejected.iter().any(|r| r.reason.starts_with(
                "trafficPolicy.outlierDetection.interval: \"soon\" is not a duration"
            )),
            "{:#?}",
            set.rejected
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for bad in ["", "10", "s", "10x", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn restricting_matches_to_namespaces() {
        let m = RouteMatch {
            path: Some(StringMatch::Prefix("/a.B/".into())),
            ..Default::default()
        };
        let out = restrict_to_namespaces(vec![m], &["x".into(), "y".into()]);
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[1].source.as_ref().unwrap().namespace.as_deref(),
            Some("y")
        );
        let named = RouteMatch {
            source: Some(SourceMatch {
                namespace: Some("z".into()),
                labels: BTreeMap::new(),
            }),
            ..Default::default()
        };
        assert!(restrict_to_namespaces(vec![named], &["x".into()]).is_empty());
        assert_eq!(restrict_to_namespaces(vec![], &["x".into()]).len(), 1);
    }
}
