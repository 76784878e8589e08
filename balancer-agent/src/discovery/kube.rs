//! The Kubernetes API as a discovery source.
//!
//! kube-rs watchers over [`super::WATCHED_RESOURCES`]: Services and EndpointSlices of every
//! namespace become the store's services ([`Source::Kubernetes`]), their endpoints labelled with
//! their pods' labels (a metadata-only watch of every pod: `PartialObjectMetadata`, labels kept,
//! one shared copy per distinct label set); Namespaces labelled `balancer.dev/enabled=true` and
//! the Pods of this node (field selector `spec.nodeName`) become the set of opted-in pod
//! cgroups, published on a `watch` channel that the wiring applies to the datapath (discovery
//! never touches the kernel itself). The traffic policy kinds the cluster serves
//! (`VirtualService`, `DestinationRule`, `GRPCRoute`: [`policy::discover`], looked at again
//! every [`policy::RECHECK`] and when one's watch answers 404) are watched as dynamic objects
//! and become the Kubernetes source's policy in the router ([`Router::set`]).
//!
//! One task owns the model. Watchers only decode and forward; the model task drains every event
//! already queued, applies them, and publishes one store update per batch: a single event
//! reaches the balancer in the time of one snapshot rebuild (`balancer_discovery_apply_seconds`
//! measures it from the moment the watcher yielded the event), and a burst costs one rebuild.
//!
//! Naming. A Kubernetes Service becomes one store service per gRPC port, named
//! `<name>.<namespace>:<port>`: unique, and stable when other ports are added or removed (a
//! rename would reset the service's id and statistics). Each is selected by its ClusterIP(s) and
//! port, and by the authorities `name`, `name.ns`, `name.ns.svc`, `name.ns.svc.<domain>` with
//! `:port`; the same authorities without a port select the Service's first gRPC port (in the
//! order of `spec.ports`). `name` and `name.ns` are ambiguous across namespaces or clusters; the
//! VIP of a redirected connection is always looked up first.
//!
//! Failure. Until every watcher has listed once, the agent is not ready. After that, a watch
//! that fails (a dropped connection, a `410 Gone`, an API server restart) is retried with a
//! short backoff ([`Backoff`]), and the model keeps the last known objects: a relist replaces
//! them only when it is complete (`InitDone`). A watch that keeps failing for
//! [`RELIST_AFTER`], or that is told its resourceVersion is too large (the server's went
//! backwards: a restore), is dropped and started over with a fresh list, which kube-rs would
//! never do by itself. Discovery never makes the agent unready once it was ready: stale
//! endpoints serve better than none.
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    pin::pin,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    core::{DynamicObject, PartialObjectMeta},
    runtime::watcher::{self, Event},
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{debug, error, info, warn};

use super::{
    gateway::GrpcRoute,
    istio::{DestinationRule, VirtualService},
    pods::{self, ENABLED_LABEL, OptedIn, OptedInPod, PodInfo},
    policy::{self, Decoded, PolicyKind, ServiceRef, Translator},
};
use crate::{
    call::route::{PolicySet, Router, SourceIdentity},
    config::{Balancing, HealthCheck, Policy, TrafficDistribution},
    metrics::Metrics,
    state::{EndpointSpec, Labels, ServiceSpec, Source, Store, Update},
};

/// The readiness reason the agent holds until every watcher has listed once (see `synced` in
/// [`run`]).
pub const NOT_SYNCED: &str = "kubernetes caches not synced";
/// The label of an EndpointSlice that names its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// A watch failing this long is dropped and started over with a fresh list.
pub const RELIST_AFTER: Duration = Duration::from_secs(10);
/// The server ends each watch after this long (the client resumes it at once); it bounds how
/// long a silently dead connection goes unnoticed.
pub const WATCH_TIMEOUT_SECS: u32 = 60;
/// How often pods whose cgroup was not found yet are looked for again.
const CGROUP_RETRY: Duration = Duration::from_secs(1);

/// What went wrong setting up the Kubernetes source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kubeconfig could not be used.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: kube::config::KubeconfigError,
    },
    /// Not in a pod, or the service account is not mounted.
    #[error("in-cluster Kubernetes configuration: {0} (outside a cluster, pass --kubeconfig PATH)")]
    InCluster(#[from] kube::config::InClusterError),
    /// The client could not be built.
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// How the Kubernetes source runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// A kubeconfig file; `None` for the in-cluster configuration (service account).
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (`spec.nodeName` of its pods); without it no pod is opted in.
    pub node_name: Option<String>,
    /// Where pod cgroups are looked for: the cgroup v2 mount, or `datapath.cgroup_root`.
    pub cgroup_root: PathBuf,
    /// The cluster's DNS domain. Default `cluster.local`.
    pub cluster_domain: String,
}

impl Options {
    /// Where the source reads from, for `/api/status`.
    pub fn describe(&self) -> String {
        match &self.kubeconfig {
            Some(p) => format!("kubernetes (kubeconfig {})", p.display()),
            None => "kubernetes (in-cluster)".into(),
        }
    }
}

/// The client configuration the options ask for. Errors name the file or what is missing.
pub async fn client_config(opts: &Options) -> Result<kube::Config, Error> {
    let mut config = match &opts.kubeconfig {
        Some(path) => {
            let err = |source| Error::Kubeconfig {
                path: path.clone(),
                source,
            };
            let file = kube::config::Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(err)?
        }
        None => kube::Config::incluster()?,
    };
    // A control plane that does not answer a connect in 5 s is treated as down (the watch is
    // retried), rather than holding a watcher for kube's default 30 s.
    config.connect_timeout = Some(Duration::from_secs(5));
    // Retries are the watchers' own, with [`Backoff`]: kube's retry layer would retry a 504
    // ("too large resource version", a server restored from a backup) 15 times with delays
    // doubling from 5 ms, minutes before the watcher could see it and start over.
    config.default_retry = false;
    Ok(config)
}

/// An exponential backoff for failing watches: 50 ms doubling to 2 s, ±25% jitter, reset by any
/// successful event. kube's default (0.8 s to 30 s, reset only after 120 s without errors) can
/// leave caches stale for tens of seconds after an API server restart.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    /// The first delay.
    pub const MIN: Duration = Duration::from_millis(50);
    /// The longest delay.
    pub const MAX: Duration = Duration::from_secs(2);

    /// A fresh backoff.
    pub fn new() -> Self {
        Self { next: Self::MIN }
    }

    /// Starts over from [`Backoff::MIN`].
    pub fn reset(&mut self) {
        self.next = Self::MIN;
    }

    /// The next delay (jittered).
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        base.mul_f64(0.75 + fastrand::f64() * 0.5)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// A Service as the model keeps it.
#[derive(Clone, Debug, PartialEq)]
struct Svc {
    namespace: String,
    name: String,
    cluster_ips: Vec<IpAddr>,
    /// A headless Service opted in to per-call balancing ([`HEADLESS_ANNOTATION`]): its
    /// endpoints' addresses select it, as VIPs do.
    balance_headless: bool,
    /// gRPC ports, in the order of `spec.ports`: (port name, port).
    ports: Vec<(String, u16)>,
    policy: Policy,
    /// From `spec.trafficDistribution` and the `balancer.dev/*` annotations.
    balancing: Balancing,
}

/// An EndpointSlice as the model keeps it.
#[derive(Clone, Debug, PartialEq)]
struct Slice {
    /// `namespace/service`.
    service: String,
    /// (port name, port number).
    ports: Vec<(String, u16)>,
    endpoints: Vec<SliceEndpoint>,
}

#[derive(Clone, Debug, PartialEq)]
struct SliceEndpoint {
    addresses: Vec<IpAddr>,
    ready: bool,
    terminating: bool,
    zone: Option<String>,
    node: Option<String>,
    pod: Option<String>,
}

/// Whether a Service port carries gRPC: appProtocol `grpc` or `kubernetes.io/h2c`, or a name
/// `grpc`, `grpc-*`, `http2`, `http2-*` (Istio's naming convention).
pub fn is_grpc_port(
    name: Option<&str>,
    app_protocol: Option<&str>,
    protocol: Option<&str>,
) -> bool {
    if protocol.is_some_and(|p| p != "TCP") {
        return false;
    }
    if let Some(a) = app_protocol {
        return a == "grpc" || a == "kubernetes.io/h2c";
    }
    name.is_some_and(|n| {
        n == "grpc" || n.starts_with("grpc-") || n == "http2" || n.starts_with("http2-")
    })
}

/// The annotation that chooses a Service's balancing policy (`p2c-ewma`, `least-request`,
/// `round-robin`); default `p2c-ewma`.
pub const POLICY_ANNOTATION: &str = "balancer.dev/policy";

fn key(ns: Option<&String>, name: Option<&String>) -> String {
    format!(
        "{}/{}",
        ns.map_or("", String::as_str),
        name.map_or("", String::as_str)
    )
}

/// `balancer.dev/headless: balance` on a headless Service (`clusterIP: None`): a connect from
/// an opted-in pod to one of its pods' addresses is balanced per call over all of them, as a
/// connect to a VIP is (clients that resolve the Service's DNS name to pod IPs and dial one).
pub const HEADLESS_ANNOTATION: &str = "balancer.dev/headless";

fn svc_of(s: &Service) -> Svc {
    let spec = s.spec.as_ref();
    let balance_headless = spec.and_then(|s| s.cluster_ip.as_deref()) == Some("None")
        && s.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(HEADLESS_ANNOTATION))
            .is_some_and(|v| v == "balance");
    let headless_or_none = |ip: &String| ip.is_empty() || ip == "None";
    let mut cluster_ips: Vec<IpAddr> = spec
        .and_then(|s| s.cluster_ips.clone())
        .unwrap_or_default()
        .iter()
        .filter(|ip| !headless_or_none(ip))
        .filter_map(|ip| ip.parse().ok())
        .collect();
    if cluster_ips.is_empty()
        && let Some(ip) = spec.and_then(|s| s.cluster_ip.as_ref())
        && let Ok(ip) = ip.parse()
    {
        cluster_ips.push(ip);
    }
    let external = spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName");
    let ports = spec
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .filter(|_| !external)
        .filter(|p| {
            is_grpc_port(
                p.name.as_deref(),
                p.app_protocol.as_deref(),
                p.protocol.as_deref(),
            )
        })
        .filter_map(|p| {
            Some((
                p.name.clone().unwrap_or_default(),
                u16::try_from(p.port).ok()?,
            ))
        })
        .collect();
    Svc {
        namespace: s.metadata.namespace.clone().unwrap_or_default(),
        name: s.metadata.name.clone().unwrap_or_default(),
        cluster_ips,
        balance_headless,
        ports,
        policy: s
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(POLICY_ANNOTATION))
            .and_then(|p| Policy::parse(p))
            .unwrap_or_default(),
        balancing: balancing_of(s),
    }
}

/// `balancer.dev/hash-header`: the header a `ring-hash` Service's calls are keyed by.
pub const HASH_HEADER_ANNOTATION: &str = "balancer.dev/hash-header";
/// `balancer.dev/warmup`: slow start of new endpoints (`30s`, `500ms`, or ms).
pub const WARMUP_ANNOTATION: &str = "balancer.dev/warmup";
/// `balancer.dev/health-check: grpc` turns on active gRPC health checks; the
/// `balancer.dev/health-check-{service,interval,timeout,healthy-threshold,unhealthy-threshold}`
/// annotations set them.
pub const HEALTH_CHECK_ANNOTATION: &str = "balancer.dev/health-check";

/// A duration annotation: `250ms`, `2s`, `1m`, or a number of milliseconds.
fn duration_annotation(v: &str) -> Option<std::time::Duration> {
    let v = v.trim();
    let (n, unit) = match v.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => v.split_at(i),
        None => (v, "ms"),
    };
    let n: u64 = n.parse().ok()?;
    let ms = match unit {
        "ms" => n,
        "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        _ => return None,
    };
    Some(std::time::Duration::from_millis(ms))
}

/// A Service's balancing settings: `spec.trafficDistribution` and the `balancer.dev/*`
/// annotations. A value that does not parse is ignored (the default stays) and logged.
fn balancing_of(s: &Service) -> Balancing {
    let empty = Default::default();
    let a = s.metadata.annotations.as_ref().unwrap_or(&empty);
    let get = |k: &str| a.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let name = || key(s.metadata.namespace.as_ref(), s.metadata.name.as_ref());
    let bad = |k: &str, v: &str| warn!(service = %name(), "annotation {k}: {v:?} ignored");
    let traffic_distribution = s
        .spec
        .as_ref()
        .and_then(|s| s.traffic_distribution.as_deref())
        .map_or(TrafficDistribution::Any, |t| {
            TrafficDistribution::parse(t).unwrap_or(TrafficDistribution::Any)
        });
    let warmup = get(WARMUP_ANNOTATION)
        .and_then(|v| duration_annotation(v).or_else(|| (bad(WARMUP_ANNOTATION, v), None).1))
        .unwrap_or_default();
    let health_check = get(HEALTH_CHECK_ANNOTATION)
        .filter(|v| {
            let grpc = *v == "grpc";
            if !grpc && *v != "none" {
                bad(HEALTH_CHECK_ANNOTATION, v);
            }
            grpc
        })
        .map(|_| {
            let mut h = HealthCheck::default();
            let k = |what: &str| format!("{HEALTH_CHECK_ANNOTATION}-{what}");
            if let Some(v) = get(&k("service")) {
                h.service = v.to_string();
            }
            for (what, field) in [("interval", &mut h.interval), ("timeout", &mut h.timeout)] {
                if let Some(v) = get(&k(what)) {
                    match duration_annotation(v).filter(|d| !d.is_zero()) {
                        Some(d) => *field = d,
                        None => bad(&k(what), v),
                    }
                }
            }
            for (what, field) in [
                ("healthy-threshold", &mut h.healthy_threshold),
                ("unhealthy-threshold", &mut h.unhealthy_threshold),
            ] {
                if let Some(v) = get(&k(what)) {
                    match v.parse::<u32>().ok().filter(|n| *n > 0) {
                        Some(n) => *field = n,
                        None => bad(&k(what), v),
                    }
                }
            }
            h
        });
    Balancing {
        hash_header: get(HASH_HEADER_ANNOTATION).map(str::to_ascii_lowercase),
        traffic_distribution,
        warmup,
        health_check,
        ..Balancing::default()
    }
}

fn slice_of(s: &EndpointSlice) -> Slice {
    let service = s
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL));
    let ip = s.address_type == "IPv4" || s.address_type == "IPv6";
    Slice {
        service: key(s.metadata.namespace.as_ref(), service),
        ports: s
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    p.name.clone().unwrap_or_default(),
                    u16::try_from(p.port?).ok()?,
                ))
            })
            .collect(),
        endpoints: s
            .endpoints
            .iter()
            .filter(|_| ip)
            .map(|e| {
                let c = e.conditions.as_ref();
                SliceEndpoint {
                    addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                    // The API: an unknown `ready` means ready; an unknown `terminating`, not.
                    ready: c.and_then(|c| c.ready).unwrap_or(true),
                    terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                    zone: e.zone.clone(),
                    node: e.node_name.clone(),
                    pod: e.target_ref.as_ref().and_then(|t| t.name.clone()),
                }
            })
            .collect(),
    }
}

/// A change to one kind of object, keyed by `namespace/name` (or `name`).
enum Change<T> {
    Apply(String, T),
    Delete(String),
    Init,
    InitApply(String, T),
    InitDone,
}

enum Msg {
    Service(Change<Svc>),
    Slice(Change<Slice>),
    Namespace(Change<()>),
    Pod(Change<PodInfo>),
    /// A pod's labels (every pod of the cluster, metadata only).
    PodLabels(Change<Labels>),
    VirtualService(Change<Decoded<VirtualService>>),
    DestinationRule(Change<Decoded<DestinationRule>>),
    GrpcRoute(Change<Decoded<GrpcRoute>>),
    /// The policy kinds watched from now on (after [`policy::discover`]).
    PolicyKinds(BTreeSet<PolicyKind>),
}

impl Msg {
    /// Whether the event changes what the balancer uses (and so counts for the lag).
    fn is_endpoint_change(&self) -> bool {
        matches!(
            self,
            Msg::Service(Change::Apply(..) | Change::Delete(_) | Change::InitDone)
                | Msg::Slice(Change::Apply(..) | Change::Delete(_) | Change::InitDone)
                | Msg::PodLabels(Change::Apply(..) | Change::Delete(_) | Change::InitDone)
        )
    }
}

/// One kind's objects, and the buffer of a relist in progress.
struct Cache<T> {
    objects: HashMap<String, T>,
    relist: Option<HashMap<String, T>>,
    synced: bool,
}

impl<T: PartialEq> Cache<T> {
    fn new() -> Self {
        Self {
            objects: HashMap::new(),
            relist: None,
            synced: false,
        }
    }

    /// Applies a change; returns the keys whose object changed (with the old value, if any).
    fn apply(&mut self, change: Change<T>) -> Vec<(String, Option<T>)> {
        match change {
            Change::Apply(k, v) => {
                if self.objects.get(&k) == Some(&v) {
                    return Vec::new();
                }
                let old = self.objects.insert(k.clone(), v);
                vec![(k, old)]
            }
            Change::Delete(k) => match self.objects.remove(&k) {
                Some(old) => vec![(k, Some(old))],
                None => Vec::new(),
            },
            Change::Init => {
                self.relist = Some(HashMap::new());
                Vec::new()
            }
            Change::InitApply(k, v) => {
                self.relist.get_or_insert_with(HashMap::new).insert(k, v);
                Vec::new()
            }
            Change::InitDone => {
                self.synced = true;
                let new = self.relist.take().unwrap_or_default();
                let old = std::mem::replace(&mut self.objects, new);
                let mut changed: Vec<(String, Option<T>)> = self
                    .objects
                    .keys()
                    .filter(|k| !old.contains_key(*k))
                    .map(|k| (k.clone(), None))
                    .collect();
                for (k, v) in old {
                    if self.objects.get(&k) != Some(&v) {
                        changed.push((k, Some(v)));
                    }
                }
                changed
            }
        }
    }
}

/// Everything discovery knows, and what it last told the store.
struct Model {
    domain: String,
    services: Cache<Svc>,
    slices: Cache<Slice>,
    /// `namespace/service` to the keys of its slices.
    slices_of: HashMap<String, BTreeSet<String>>,
    namespaces: Cache<()>,
    pods: Cache<PodInfo>,
    /// Every pod's labels, by `namespace/name`.
    pod_labels: Cache<Labels>,
    /// One shared copy of each distinct label set (the pods of a Deployment share theirs).
    label_sets: HashSet<Labels>,
    /// `namespace/pod` to the keys of the slices that list it.
    slices_of_pod: HashMap<String, BTreeSet<String>>,
    /// `namespace/service` to the store names it published.
    published: HashMap<String, Vec<String>>,
    /// Services published at least once (both caches synced).
    started: bool,
    dirty: BTreeSet<String>,
    pods_dirty: bool,
    policy: PolicyModel,
}

/// The cluster's traffic policy objects and what the router was last told.
struct PolicyModel {
    /// The kinds watched; `None` until the first discovery of the cluster's APIs.
    kinds: Option<BTreeSet<PolicyKind>>,
    virtual_services: Cache<Decoded<VirtualService>>,
    destination_rules: Cache<Decoded<DestinationRule>>,
    grpc_routes: Cache<Decoded<GrpcRoute>>,
    /// Services with their gRPC ports, as policy resolves hosts and backends.
    services: HashMap<ServiceRef, Vec<(String, u16)>>,
    translator: Translator,
    dirty: bool,
    published: Option<PolicySet>,
}

impl PolicyModel {
    fn new() -> Self {
        Self {
            kinds: None,
            virtual_services: Cache::new(),
            destination_rules: Cache::new(),
            grpc_routes: Cache::new(),
            services: HashMap::new(),
            translator: Translator::default(),
            dirty: true,
            published: None,
        }
    }

    /// Every kind watched has listed once.
    fn synced(&self) -> bool {
        self.kinds.as_ref().is_some_and(|kinds| {
            kinds.iter().all(|k| match k {
                PolicyKind::VirtualService => self.virtual_services.synced,
                PolicyKind::DestinationRule => self.destination_rules.synced,
                PolicyKind::GrpcRoute => self.grpc_routes.synced,
            })
        })
    }
}

impl Model {
    fn new(domain: String) -> Self {
        Self {
            domain,
            services: Cache::new(),
            slices: Cache::new(),
            slices_of: HashMap::new(),
            namespaces: Cache::new(),
            pods: Cache::new(),
            pod_labels: Cache::new(),
            label_sets: HashSet::new(),
            slices_of_pod: HashMap::new(),
            published: HashMap::new(),
            started: false,
            dirty: BTreeSet::new(),
            pods_dirty: false,
            policy: PolicyModel::new(),
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Service(c) => {
                for (k, _) in self.services.apply(c) {
                    let ports = self.services.objects.get(&k).map(|s| s.ports.clone());
                    let (ns, name) = k.split_once('/').unwrap_or_default();
                    let svc = ServiceRef::new(ns, name);
                    let have = self.policy.services.get(&svc);
                    if have != ports.as_ref() {
                        self.policy.dirty = true;
                        match ports {
                            Some(p) => self.policy.services.insert(svc, p),
                            None => self.policy.services.remove(&svc),
                        };
                    }
                    self.dirty.insert(k);
                }
            }
            Msg::Slice(c) => {
                for (k, old) in self.slices.apply(c) {
                    if let Some(old) = old {
                        for pod in slice_pods(&old) {
                            if let Some(set) = self.slices_of_pod.get_mut(&pod) {
                                set.remove(&k);
                                if set.is_empty() {
                                    self.slices_of_pod.remove(&pod);
                                }
                            }
                        }
                        if let Some(set) = self.slices_of.get_mut(&old.service) {
                            set.remove(&k);
                            if set.is_empty() {
                                self.slices_of.remove(&old.service);
                            }
                            self.dirty.insert(old.service);
                        }
                    }
                    if let Some(new) = self.slices.objects.get(&k) {
                        for pod in slice_pods(new) {
                            self.slices_of_pod.entry(pod).or_default().insert(k.clone());
                        }
                        self.slices_of
                            .entry(new.service.clone())
                            .or_default()
                            .insert(k);
                        self.dirty.insert(new.service.clone());
                    }
                }
            }
            Msg::PodLabels(c) => {
                let c = match c {
                    Change::Apply(k, l) => Change::Apply(k, self.intern(l)),
                    Change::InitApply(k, l) => Change::InitApply(k, self.intern(l)),
                    other => other,
                };
                let relisted = matches!(c, Change::InitDone);
                for (pod, _) in self.pod_labels.apply(c) {
                    for slice in self.slices_of_pod.get(&pod).into_iter().flatten() {
                        if let Some(s) = self.slices.objects.get(slice) {
                            self.dirty.insert(s.service.clone());
                        }
                    }
                }
                if relisted || self.label_sets.len() > 2 * self.pod_labels.objects.len() + 64 {
                    // Label sets no pod has any more (the cache and this set hold the others).
                    self.label_sets.retain(|l| Arc::strong_count(l) > 1);
                }
            }
            Msg::VirtualService(c) => {
                self.policy.dirty |= policy_changed(&mut self.policy.virtual_services, c);
            }
            Msg::DestinationRule(c) => {
                self.policy.dirty |= policy_changed(&mut self.policy.destination_rules, c);
            }
            Msg::GrpcRoute(c) => {
                self.policy.dirty |= policy_changed(&mut self.policy.grpc_routes, c);
            }
            Msg::PolicyKinds(kinds) => {
                self.policy.kinds = Some(kinds);
                self.policy.dirty = true;
            }
            Msg::Namespace(c) => {
                self.pods_dirty |= !self.namespaces.apply(c).is_empty()
                    || !self.namespaces.synced
                    || self.namespaces.relist.is_none();
            }
            Msg::Pod(c) => {
                self.pods_dirty |= !self.pods.apply(c).is_empty()
                    || !self.pods.synced
                    || self.pods.relist.is_none();
            }
        }
    }

    /// The store services of the Service `key`.
    fn specs_of(&self, key: &str) -> Vec<ServiceSpec> {
        let Some(svc) = self.services.objects.get(key) else {
            return Vec::new();
        };
        let slices: Vec<&Slice> = self
            .slices_of
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.objects.get(k))
            .collect();
        let hosts = [
            svc.name.clone(),
            format!("{}.{}", svc.name, svc.namespace),
            format!("{}.{}.svc", svc.name, svc.namespace),
            format!("{}.{}.svc.{}", svc.name, svc.namespace, self.domain),
        ];
        svc.ports
            .iter()
            .enumerate()
            .map(|(i, (port_name, port))| {
                let mut authorities: Vec<String> =
                    hosts.iter().map(|h| format!("{h}:{port}")).collect();
                if i == 0 {
                    authorities.extend(hosts.iter().cloned());
                }
                let mut endpoints: BTreeMap<SocketAddr, EndpointSpec> = BTreeMap::new();
                for slice in &slices {
                    let Some((_, target)) = slice.ports.iter().find(|(n, _)| n == port_name) else {
                        continue;
                    };
                    for e in &slice.endpoints {
                        for ip in &e.addresses {
                            let spec = EndpointSpec {
                                addr: SocketAddr::new(*ip, *target),
                                ready: e.ready,
                                terminating: e.terminating,
                                zone: e.zone.clone(),
                                node: e.node.clone(),
                                name: e.pod.clone(),
                                labels: e
                                    .pod
                                    .as_ref()
                                    .and_then(|p| {
                                        self.pod_labels
                                            .objects
                                            .get(&format!("{}/{p}", svc.namespace))
                                    })
                                    .cloned()
                                    .unwrap_or_default(),
                            };
                            // The same address in two slices (a migration): ready wins.
                            match endpoints.get(&spec.addr) {
                                Some(have) if have.ready && !have.terminating => {}
                                _ => {
                                    endpoints.insert(spec.addr, spec);
                                }
                            }
                        }
                    }
                }
                ServiceSpec {
                    name: format!("{}.{}:{port}", svc.name, svc.namespace),
                    authorities,
                    vips: if svc.balance_headless {
                        endpoints.keys().copied().collect()
                    } else {
                        svc.cluster_ips
                            .iter()
                            .map(|ip| SocketAddr::new(*ip, *port))
                            .collect()
                    },
                    policy: svc.policy,
                    endpoints: endpoints.into_values().collect(),
                    balancing: svc.balancing.clone(),
                }
            })
            .collect()
    }

    /// The store updates for what changed since the last call.
    fn updates(&mut self) -> Vec<Update> {
        if !(self.services.synced && self.slices.synced && self.pod_labels.synced) {
            return Vec::new();
        }
        if !self.started {
            // The first complete view goes in whole: one snapshot, no service seen half-built.
            self.started = true;
            self.dirty.clear();
            let keys: Vec<String> = self.services.objects.keys().cloned().collect();
            let mut all = Vec::new();
            for k in keys {
                let specs = self.specs_of(&k);
                self.published
                    .insert(k, specs.iter().map(|s| s.name.clone()).collect());
                all.extend(specs);
            }
            return vec![Update::Reset(all)];
        }
        let mut updates = Vec::new();
        for k in std::mem::take(&mut self.dirty) {
            let specs = self.specs_of(&k);
            let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
            for old in self.published.remove(&k).unwrap_or_default() {
                if !names.contains(&old) {
                    updates.push(Update::Remove(old));
                }
            }
            if !names.is_empty() {
                self.published.insert(k, names);
            }
            updates.extend(specs.into_iter().map(Update::Upsert));
        }
        updates
    }

    fn caches_synced(&self, with_pods: bool) -> bool {
        self.services.synced
            && self.slices.synced
            && self.pod_labels.synced
            && self.policy.synced()
            && (!with_pods || (self.namespaces.synced && self.pods.synced))
    }

    /// The shared copy of a label set.
    fn intern(&mut self, labels: Labels) -> Labels {
        if let Some(l) = self.label_sets.get(&labels) {
            return l.clone();
        }
        self.label_sets.insert(labels.clone());
        labels
    }

    /// The policy to put in force, when it changed (and everything it reads has listed).
    fn policy_update(&mut self) -> Option<PolicySet> {
        let p = &mut self.policy;
        if !(p.dirty && p.synced() && self.services.synced) {
            return None;
        }
        p.dirty = false;
        let set = p.translator.translate(&policy::Inputs {
            services: &p.services,
            domain: &self.domain,
            virtual_services: &p.virtual_services.objects,
            destination_rules: &p.destination_rules.objects,
            grpc_routes: &p.grpc_routes.objects,
        });
        if p.published.as_ref() == Some(&set) {
            return None;
        }
        p.published = Some(set.clone());
        Some(set)
    }
}

/// The `namespace/pod` keys of the pods a slice lists.
fn slice_pods(s: &Slice) -> impl Iterator<Item = String> + '_ {
    let ns = s.service.split_once('/').map_or("", |(ns, _)| ns);
    s.endpoints
        .iter()
        .filter_map(move |e| Some(format!("{ns}/{}", e.pod.as_ref()?)))
}

/// Applies a change to a policy cache; whether the policy must be computed again.
fn policy_changed<T: PartialEq>(cache: &mut Cache<T>, change: Change<T>) -> bool {
    let done = matches!(change, Change::InitDone);
    !cache.apply(change).is_empty() || done
}

/// Looks up opted-in pods' cgroups, remembering what it found.
struct Cgroups {
    root: PathBuf,
    /// uid to the pod-level cgroup and its id.
    found: HashMap<String, (PathBuf, u64)>,
}

impl Cgroups {
    fn opted_in(&mut self, model: &Model) -> OptedIn {
        let mut out = OptedIn {
            synced: model.namespaces.synced && model.pods.synced,
            pods: BTreeMap::new(),
        };
        let mut live = HashSet::new();
        for (k, p) in &model.pods.objects {
            if !p.opted_in(model.namespaces.objects.contains_key(&p.namespace)) {
                continue;
            }
            live.insert(p.uid.clone());
            let cached = self
                .found
                .get(&p.uid)
                .filter(|(path, id)| crate::ebpf::cgroup::id(path).ok() == Some(*id))
                .cloned();
            let found = cached.or_else(|| {
                let path = pods::pod_cgroup(&self.root, &p.uid, &p.qos, &p.container_ids)?;
                let id = crate::ebpf::cgroup::id(&path).ok()?;
                debug!(pod = %k, cgroup = %path.display(), id, "pod cgroup found");
                self.found.insert(p.uid.clone(), (path.clone(), id));
                Some((path, id))
            });
            out.pods.insert(
                k.clone(),
                OptedInPod {
                    pod: k.clone(),
                    uid: p.uid.clone(),
                    cgroup_id: found.as_ref().map(|f| f.1),
                    cgroup: found.map(|f| f.0),
                    ips: p.ips.clone(),
                    identity: Arc::new(SourceIdentity {
                        namespace: p.namespace.clone(),
                        labels: p.labels.clone(),
                    }),
                },
            );
        }
        self.found.retain(|uid, _| live.contains(uid));
        out
    }
}

/// Runs the Kubernetes source until the process ends: feeds `store`, puts the cluster's
/// traffic policy in force in `router`, publishes opted-in pods on `opted_in`, and calls
/// `synced` once every watcher has listed (the agent then drops [`NOT_SYNCED`] from its
/// readiness).
pub async fn run(
    config: kube::Config,
    opts: Options,
    store: Arc<Store>,
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    synced: impl FnOnce() + Send,
    opted_in: watch::Sender<Arc<OptedIn>>,
) -> Result<(), Error> {
    let client = Client::try_from(config)?;
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Msg)>();
    let wc = watcher::Config::default().timeout(WATCH_TIMEOUT_SECS);
    tokio::spawn(watch_kind(
        "services".into(),
        typed(Api::<Service>::all(client.clone()), wc.clone()),
        tx.clone(),
        |s| {
            (
                key(s.metadata.namespace.as_ref(), s.metadata.name.as_ref()),
                svc_of(s),
            )
        },
        Msg::Service,
        Optional::No,
    ));
    tokio::spawn(watch_kind(
        "endpointslices".into(),
        typed(
            Api::<EndpointSlice>::all(client.clone()),
            wc.clone().labels(SERVICE_NAME_LABEL),
        ),
        tx.clone(),
        |s| {
            (
                key(s.metadata.namespace.as_ref(), s.metadata.name.as_ref()),
                slice_of(s),
            )
        },
        Msg::Slice,
        Optional::No,
    ));
    // Every pod's labels, metadata only: what subsets select endpoints by.
    tokio::spawn(watch_kind(
        "pods (metadata)".into(),
        typed(
            Api::<PartialObjectMeta<Pod>>::all(client.clone()),
            wc.clone(),
        ),
        tx.clone(),
        |p: &PartialObjectMeta<Pod>| {
            (
                key(p.metadata.namespace.as_ref(), p.metadata.name.as_ref()),
                Arc::new(p.metadata.labels.clone().unwrap_or_default()),
            )
        },
        Msg::PodLabels,
        Optional::No,
    ));
    tokio::spawn(watch_policy_kinds(client.clone(), wc.clone(), tx.clone()));
    let with_pods = match &opts.node_name {
        Some(node) => {
            tokio::spawn(watch_kind(
                "namespaces".into(),
                typed(
                    Api::<Namespace>::all(client.clone()),
                    wc.clone().labels(&format!("{ENABLED_LABEL}=true")),
                ),
                tx.clone(),
                |n| (n.metadata.name.clone().unwrap_or_default(), ()),
                Msg::Namespace,
                Optional::No,
            ));
            tokio::spawn(watch_kind(
                "pods".into(),
                typed(
                    Api::<Pod>::all(client.clone()),
                    wc.clone().fields(&format!("spec.nodeName={node}")),
                ),
                tx.clone(),
                |p| {
                    let info = PodInfo::from_pod(p);
                    (format!("{}/{}", info.namespace, info.name), info)
                },
                Msg::Pod,
                Optional::No,
            ));
            true
        }
        None => {
            warn!("no node name (--node-name or NODE_NAME): no pod of this node is opted in");
            false
        }
    };
    let mut model = Model::new(opts.cluster_domain.clone());
    let mut cgroups = Cgroups {
        root: opts.cgroup_root.clone(),
        found: HashMap::new(),
    };
    let mut synced = Some(synced);
    let mut retry = tokio::time::interval(CGROUP_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unresolved = false;
    loop {
        let first = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => Some(m),
                None => return Ok(()),
            },
            _ = retry.tick(), if unresolved => None,
        };
        let mut lag_from = Vec::new();
        // Unresolved cgroups are looked for again on the retry tick only, not on every batch.
        let retry_due = first.is_none();
        let mut batch: Vec<(Instant, Msg)> = first.into_iter().collect();
        while batch.len() < 50_000 {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        for (at, msg) in batch {
            if msg.is_endpoint_change() {
                lag_from.push(at);
            }
            model.handle(msg);
        }
        let updates = model.updates();
        if !updates.is_empty() {
            store.apply_from(Source::Kubernetes, updates);
        }
        // After the store: the routes name services and subsets it now has.
        if let Some(set) = model.policy_update() {
            router.set(Source::Kubernetes, set);
        }
        if model.started {
            for at in lag_from {
                metrics.discovery_lag.observe(at.elapsed().as_secs_f64());
            }
        }
        if with_pods
            && (model.pods_dirty || (unresolved && retry_due))
            && model.namespaces.synced
            && model.pods.synced
        {
            model.pods_dirty = false;
            let set = cgroups.opted_in(&model);
            unresolved = set.pods.values().any(|p| p.cgroup_id.is_none());
            opted_in.send_if_modified(|cur| {
                if **cur == set {
                    false
                } else {
                    *cur = Arc::new(set);
                    true
                }
            });
        }
        if synced.is_some() && model.caches_synced(with_pods) {
            let snap = store.snapshot();
            info!(
                services = model.services.objects.len(),
                endpoint_slices = model.slices.objects.len(),
                store_services = snap.services.len(),
                "kubernetes caches synced"
            );
            if let Some(synced) = synced.take() {
                synced();
            }
        }
    }
}

/// Watches the policy kinds the cluster serves ([`policy::discover`], at start, every
/// [`policy::RECHECK`] and when a watch of one ends), starting a watcher for each kind
/// installed and stopping it when the kind goes (its objects leave the model). Says which
/// kinds it watches when that changes; tells the model with [`Msg::PolicyKinds`].
async fn watch_policy_kinds(
    client: Client,
    config: watcher::Config,
    tx: mpsc::UnboundedSender<(Instant, Msg)>,
) {
    let (ended_tx, mut ended) = mpsc::unbounded_channel::<PolicyKind>();
    let mut running: BTreeMap<PolicyKind, (String, JoinHandle<()>)> = BTreeMap::new();
    // Kinds whose watch the server refused (403): tried again at the next recheck only.
    let mut refused: BTreeSet<PolicyKind> = BTreeSet::new();
    let mut backoff = Backoff::new();
    let mut told: Option<BTreeSet<PolicyKind>> = None;
    let mut failing = false;
    loop {
        let found = match policy::discover(&client).await {
            Ok(found) => {
                backoff.reset();
                if std::mem::take(&mut failing) {
                    info!("discovery of the cluster's APIs recovered");
                }
                Some(found)
            }
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    warn!(error = %e, "discovery of the cluster's APIs failed; the policy kinds watched stay as they are");
                }
                None
            }
        };
        if let Some(found) = &found {
            for (kind, (version, handle)) in std::mem::take(&mut running) {
                if found.get(&kind) == Some(&version) && !handle.is_finished() {
                    running.insert(kind, (version, handle));
                    continue;
                }
                handle.abort();
                // Gone: its objects leave the model. Served in another version: the new
                // watcher's list replaces them whole, nothing is cleared meanwhile.
                if !found.contains_key(&kind) {
                    clear_policy_kind(&tx, kind);
                }
            }
            for (kind, version) in found {
                if running.contains_key(kind) || refused.contains(kind) {
                    continue;
                }
                let handle = tokio::spawn(watch_policy_kind(
                    client.clone(),
                    config.clone(),
                    tx.clone(),
                    *kind,
                    version.clone(),
                    ended_tx.clone(),
                ));
                running.insert(*kind, (version.clone(), handle));
            }
        }
        let watching: BTreeSet<PolicyKind> = running.keys().copied().collect();
        if found.is_some() && told.as_ref() != Some(&watching) {
            let describe = |kinds: &mut dyn Iterator<Item = PolicyKind>| {
                kinds
                    .map(|k| match running.get(&k) {
                        Some((v, _)) => format!("{k} {v}"),
                        None => k.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            info!(
                watching = %describe(&mut watching.iter().copied()),
                not_served = %describe(&mut PolicyKind::ALL.into_iter().filter(|k| !watching.contains(k))),
                "traffic policy kinds"
            );
            if tx
                .send((Instant::now(), Msg::PolicyKinds(watching.clone())))
                .is_err()
            {
                return;
            }
            told = Some(watching);
        }
        refused.clear();
        let wait = if told.is_none() {
            // Not known yet: the agent waits for them to be ready; try again soon.
            backoff.next_delay()
        } else {
            policy::RECHECK
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            Some(kind) = ended.recv() => {
                // Refused or gone: the model stops waiting for it now; a recheck follows.
                if let Some((_, handle)) = running.remove(&kind) {
                    handle.abort();
                }
                refused.insert(kind);
                clear_policy_kind(&tx, kind);
            }
        }
    }
}

/// Empties the model's objects of a kind no longer watched.
fn clear_policy_kind(tx: &mpsc::UnboundedSender<(Instant, Msg)>, kind: PolicyKind) {
    let msgs = match kind {
        PolicyKind::VirtualService => [Change::Init, Change::InitDone].map(Msg::VirtualService),
        PolicyKind::DestinationRule => [Change::Init, Change::InitDone].map(Msg::DestinationRule),
        PolicyKind::GrpcRoute => [Change::Init, Change::InitDone].map(Msg::GrpcRoute),
    };
    for m in msgs {
        let _ = tx.send((Instant::now(), m));
    }
}

/// Watches one policy kind in `version` until the server stops serving it (or refuses it);
/// then says so on `ended`.
async fn watch_policy_kind(
    client: Client,
    config: watcher::Config,
    tx: mpsc::UnboundedSender<(Instant, Msg)>,
    kind: PolicyKind,
    version: String,
    ended: mpsc::UnboundedSender<PolicyKind>,
) {
    let api = Api::<DynamicObject>::all_with(client, &kind.api_resource(&version));
    let start = move || watcher::watcher(api.clone(), config.clone()).boxed();
    let name = format!("{kind}");
    fn decoded<T: serde::de::DeserializeOwned>(o: &DynamicObject) -> (String, Decoded<T>) {
        (
            key(o.metadata.namespace.as_ref(), o.metadata.name.as_ref()),
            Decoded::of(o),
        )
    }
    match kind {
        PolicyKind::VirtualService => {
            watch_kind(name, start, tx, decoded, Msg::VirtualService, Optional::Yes).await
        }
        PolicyKind::DestinationRule => {
            watch_kind(
                name,
                start,
                tx,
                decoded,
                Msg::DestinationRule,
                Optional::Yes,
            )
            .await
        }
        PolicyKind::GrpcRoute => {
            watch_kind(name, start, tx, decoded, Msg::GrpcRoute, Optional::Yes).await
        }
    }
    let _ = ended.send(kind);
}

/// A watcher of a typed kind: what [`watch_kind`] starts (again).
fn typed<K>(api: Api<K>, config: watcher::Config) -> impl Fn() -> WatchStream<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    move || watcher::watcher(api.clone(), config.clone()).boxed()
}

type WatchStream<K> = futures_util::stream::BoxStream<'static, watcher::Result<Event<K>>>;

/// How a watch of a kind the cluster may not serve ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Optional {
    /// A kind the agent always needs: retried forever.
    No,
    /// A policy kind: a 404 (not installed, or removed) or 403 (not granted) ends the watch.
    Yes,
}

/// Whether the server refused a watch because the resource is not served (404) or not
/// granted (403).
fn not_served(e: &watcher::Error) -> Option<u16> {
    let status = api_status(e)?;
    [403, 404].contains(&status.code).then_some(status.code)
}

/// The API server's `Status` in a watcher's error, if it answered with one.
fn api_status(e: &watcher::Error) -> Option<&kube::core::Status> {
    match e {
        watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s))
        | watcher::Error::InitialListFailed(kube::Error::Api(s)) => Some(s.as_ref()),
        watcher::Error::WatchError(s) => Some(s.as_ref()),
        _ => None,
    }
}

/// Runs one watcher, forwarding decoded events; restarts it with a fresh list when it keeps
/// failing or its resourceVersion is ahead of the server's. It runs forever, except for an
/// optional kind the server does not serve or does not let the agent read.
async fn watch_kind<K, T, S>(
    kind: String,
    start: impl Fn() -> S,
    tx: mpsc::UnboundedSender<(Instant, Msg)>,
    decode: fn(&K) -> (String, T),
    wrap: fn(Change<T>) -> Msg,
    optional: Optional,
) where
    S: Stream<Item = watcher::Result<Event<K>>>,
{
    let mut backoff = Backoff::new();
    loop {
        let mut stream = pin!(start());
        let mut failing_since: Option<Instant> = None;
        while let Some(event) = stream.next().await {
            let at = Instant::now();
            let change = match event {
                Ok(Event::Apply(o)) => {
                    let (k, v) = decode(&o);
                    Change::Apply(k, v)
                }
                Ok(Event::Delete(o)) => Change::Delete(decode(&o).0),
                Ok(Event::Init) => Change::Init,
                Ok(Event::InitApply(o)) => {
                    let (k, v) = decode(&o);
                    Change::InitApply(k, v)
                }
                Ok(Event::InitDone) => Change::InitDone,
                Err(e) => {
                    if optional == Optional::Yes
                        && let Some(code) = not_served(&e)
                    {
                        match code {
                            404 => info!(resource = %kind, "not served any more: not watched"),
                            _ => {
                                error!(resource = %kind, error = %e, "not granted to the agent (the ClusterRole lacks get/list/watch on it): not watched")
                            }
                        }
                        return;
                    }
                    let since = *failing_since.get_or_insert(at);
                    if since == at {
                        warn!(resource = %kind, error = %e, "watch failed; retrying, keeping the last known objects");
                    } else {
                        debug!(resource = %kind, error = %e, "watch still failing");
                    }
                    if too_large_resource_version(&e) || since.elapsed() >= RELIST_AFTER {
                        warn!(resource = %kind, error = %e, "starting the watch over with a fresh list");
                        tokio::time::sleep(backoff.next_delay()).await;
                        break;
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            if failing_since.take().is_some() {
                info!(resource = %kind, "watch recovered");
            }
            backoff.reset();
            if tx.send((at, wrap(change))).is_err() {
                return;
            }
        }
    }
}

/// Whether the server said our resourceVersion is ahead of its own (its store went back in
/// time): kube-rs would retry that version forever.
fn too_large_resource_version(e: &watcher::Error) -> bool {
    let Some(status) = api_status(e) else {
        return false;
    };
    status.code == 504
        || status.message.contains("resource version")
            && status.message.to_ascii_lowercase().contains("too large")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::Resource;

    #[test]
    fn the_watched_resources_are_the_declared_ones() {
        let mut watched = vec![
            (Service::GROUP, Service::URL_PATH_SEGMENT),
            (EndpointSlice::GROUP, EndpointSlice::URL_PATH_SEGMENT),
            (Namespace::GROUP, Namespace::URL_PATH_SEGMENT),
            (Pod::GROUP, Pod::URL_PATH_SEGMENT),
        ];
        watched.extend(PolicyKind::ALL.map(|k| (k.group(), k.plural())));
        assert_eq!(&watched[..], super::super::WATCHED_RESOURCES);
    }

    #[test]
    fn grpc_ports() {
        assert!(is_grpc_port(Some("x"), Some("grpc"), None));
        assert!(is_grpc_port(None, Some("kubernetes.io/h2c"), Some("TCP")));
        assert!(is_grpc_port(Some("grpc"), None, None));
        assert!(is_grpc_port(Some("grpc-api"), None, None));
        assert!(is_grpc_port(Some("http2"), None, None));
        assert!(is_grpc_port(Some("http2-x"), None, None));
        assert!(!is_grpc_port(Some("grpcx"), None, None));
        assert!(!is_grpc_port(Some("http"), None, None));
        assert!(!is_grpc_port(Some("grpc"), Some("http"), None));
        assert!(!is_grpc_port(Some("grpc"), None, Some("UDP")));
    }

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut b = Backoff::new();
        let first = b.next_delay();
        assert!(first >= Backoff::MIN.mul_f64(0.75) && first <= Backoff::MIN.mul_f64(1.25));
        let mut last = first;
        for _ in 0..20 {
            last = b.next_delay();
        }
        assert!(last <= Backoff::MAX.mul_f64(1.25) && last >= Backoff::MAX.mul_f64(0.75));
        b.reset();
        assert!(b.next_delay() <= Backoff::MIN.mul_f64(1.25));
    }

    fn service(json: serde_json::Value) -> Svc {
        svc_of(&serde_json::from_value(json).unwrap())
    }

    fn slice(json: serde_json::Value) -> Slice {
        slice_of(&serde_json::from_value(json).unwrap())
    }

    fn synced_model() -> Model {
        let mut m = Model::new("cluster.local".into());
        m.handle(Msg::Service(Change::Init));
        m.handle(Msg::Slice(Change::Init));
        m.handle(Msg::PodLabels(Change::Init));
        m.handle(Msg::Service(Change::InitDone));
        m.handle(Msg::Slice(Change::InitDone));
        m.handle(Msg::PodLabels(Change::InitDone));
        assert!(matches!(&m.updates()[..], [Update::Reset(v)] if v.is_empty()));
        m
    }

    #[test]
    fn a_service_with_two_grpc_ports_becomes_two_named_services() {
        let mut m = synced_model();
        let svc = service(serde_json::json!({
            "metadata": {"name": "greeter", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "ports": [
                {"name": "grpc", "port": 50051, "targetPort": 8080},
                {"name": "metrics", "port": 9090},
                {"name": "admin", "port": 50052, "appProtocol": "kubernetes.io/h2c"}]}
        }));
        m.handle(Msg::Service(Change::Apply("default/greeter".into(), svc)));
        let sl = slice(serde_json::json!({
            "metadata": {"name": "greeter-abc", "namespace": "default",
                         "labels": {SERVICE_NAME_LABEL: "greeter"}},
            "addressType": "IPv4",
            "ports": [{"name": "grpc", "port": 8080}, {"name": "admin", "port": 8081}],
            "endpoints": [
                {"addresses": ["10.244.1.7"], "conditions": {"ready": true}, "zone": "a",
                 "nodeName": "n1", "targetRef": {"kind": "Pod", "name": "greeter-1"}},
                {"addresses": ["10.244.1.8"], "conditions": {"ready": false, "serving": true, "terminating": true}}]
        }));
        m.handle(Msg::Slice(Change::Apply("default/greeter-abc".into(), sl)));
        let updates = m.updates();
        let specs: Vec<&ServiceSpec> = updates
            .iter()
            .filter_map(|u| match u {
                Update::Upsert(s) => Some(s),
                _ => None,
            })
            .collect();
        assert_eq!(specs.len(), 2, "{updates:?}");
        let grpc = specs
            .iter()
            .find(|s| s.name == "greeter.default:50051")
            .unwrap();
        assert_eq!(grpc.vips, vec!["10.96.0.10:50051".parse().unwrap()]);
        assert!(grpc.authorities.contains(&"greeter".to_string()));
        assert!(
            grpc.authorities
                .contains(&"greeter.default.svc.cluster.local:50051".to_string())
        );
        assert_eq!(grpc.endpoints.len(), 2);
        assert_eq!(grpc.endpoints[0].addr, "10.244.1.7:8080".parse().unwrap());
        assert!(grpc.endpoints[0].ready && !grpc.endpoints[0].terminating);
        assert_eq!(grpc.endpoints[0].name.as_deref(), Some("greeter-1"));
        assert_eq!(grpc.endpoints[0].zone.as_deref(), Some("a"));
        assert!(grpc.endpoints[1].terminating);
        let admin = specs
            .iter()
            .find(|s| s.name == "greeter.default:50052")
            .unwrap();
        assert!(!admin.authorities.contains(&"greeter".to_string()));
        assert!(
            admin
                .authorities
                .contains(&"greeter.default:50052".to_string())
        );
        assert_eq!(admin.endpoints[0].addr, "10.244.1.7:8081".parse().unwrap());
        // The gRPC port goes away: its service is removed.
        let svc = service(serde_json::json!({
            "metadata": {"name": "greeter", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "grpc", "port": 50051}]}
        }));
        m.handle(Msg::Service(Change::Apply("default/greeter".into(), svc)));
        let updates = m.updates();
        assert!(
            updates
                .iter()
                .any(|u| matches!(u, Update::Remove(n) if n == "greeter.default:50052")),
            "{updates:?}"
        );
        m.handle(Msg::Service(Change::Delete("default/greeter".into())));
        let updates = m.updates();
        assert!(matches!(&updates[..], [Update::Remove(n)] if n == "greeter.default:50051"));
    }

    #[test]
    fn a_headless_service_opted_in_is_selected_by_its_pods_addresses() {
        let mut m = synced_model();
        let headless = |annotated: bool| {
            let annotations = if annotated {
                serde_json::json!({HEADLESS_ANNOTATION: "balance"})
            } else {
                serde_json::json!({})
            };
            service(serde_json::json!({
                "metadata": {"name": "db", "namespace": "ns", "annotations": annotations},
                "spec": {"clusterIP": "None", "ports": [{"name": "grpc", "port": 50051}]}
            }))
        };
        m.handle(Msg::Service(Change::Apply("ns/db".into(), headless(true))));
        let sl = slice(serde_json::json!({
            "metadata": {"name": "db-abc", "namespace": "ns",
                         "labels": {SERVICE_NAME_LABEL: "db"}},
            "addressType": "IPv4",
            "ports": [{"name": "grpc", "port": 50051}],
            "endpoints": [
                {"addresses": ["10.244.1.7"], "conditions": {"ready": true}},
                {"addresses": ["10.244.1.8"], "conditions": {"ready": true}}]
        }));
        m.handle(Msg::Slice(Change::Apply("ns/db-abc".into(), sl)));
        let updates = m.updates();
        let vips = |updates: &[Update]| -> Vec<SocketAddr> {
            updates
                .iter()
                .find_map(|u| match u {
                    Update::Upsert(s) if s.name == "db.ns:50051" => Some(s.vips.clone()),
                    _ => None,
                })
                .expect("the service")
        };
        assert_eq!(
            vips(&updates),
            [
                "10.244.1.7:50051".parse().unwrap(),
                "10.244.1.8:50051".parse().unwrap()
            ]
        );
        // Without the annotation a headless Service has no address to select it by.
        m.handle(Msg::Service(Change::Apply("ns/db".into(), headless(false))));
        assert!(vips(&m.updates()).is_empty());
    }

    #[test]
    fn a_relist_keeps_the_old_objects_until_it_is_complete() {
        let mut m = synced_model();
        let svc = service(serde_json::json!({
            "metadata": {"name": "a", "namespace": "ns"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "grpc", "port": 80}]}
        }));
        m.handle(Msg::Service(Change::Apply("ns/a".into(), svc.clone())));
        assert_eq!(m.updates().len(), 1);
        m.handle(Msg::Service(Change::Init));
        assert!(m.updates().is_empty());
        assert!(
            !m.specs_of("ns/a").is_empty(),
            "still there during the relist"
        );
        m.handle(Msg::Service(Change::InitApply("ns/a".into(), svc)));
        m.handle(Msg::Service(Change::InitDone));
        assert!(m.dirty.is_empty(), "unchanged: nothing to publish");
        m.handle(Msg::Service(Change::Init));
        m.handle(Msg::Service(Change::InitDone));
        assert!(matches!(&m.updates()[..], [Update::Remove(n)] if n == "a.ns:80"));
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        Arc::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn endpoints_carry_their_pods_labels_one_copy_per_label_set() {
        let mut m = synced_model();
        let v1 = [("app", "g"), ("version", "v1")];
        for pod in ["g-1", "g-2"] {
            m.handle(Msg::PodLabels(Change::Apply(
                format!("default/{pod}"),
                labels(&v1),
            )));
        }
        m.handle(Msg::Service(Change::Apply(
            "default/g".into(),
            service(serde_json::json!({
                "metadata": {"name": "g", "namespace": "default"},
                "spec": {"clusterIP": "10.96.0.9", "ports": [{"name": "grpc", "port": 80}]}
            })),
        )));
        m.handle(Msg::Slice(Change::Apply(
            "default/g-x".into(),
            slice(serde_json::json!({
                "metadata": {"name": "g-x", "namespace": "default",
                             "labels": {SERVICE_NAME_LABEL: "g"}},
                "addressType": "IPv4", "ports": [{"name": "grpc", "port": 8080}],
                "endpoints": [
                    {"addresses": ["10.0.0.1"], "targetRef": {"kind": "Pod", "name": "g-1"}},
                    {"addresses": ["10.0.0.2"], "targetRef": {"kind": "Pod", "name": "g-2"}}]
            })),
        )));
        let eps = |u: &[Update]| -> Vec<EndpointSpec> {
            u.iter()
                .find_map(|u| match u {
                    Update::Upsert(s) => Some(s.endpoints.clone()),
                    _ => None,
                })
                .expect("the service published")
        };
        let e = eps(&m.updates());
        assert_eq!(e[0].labels["version"], "v1");
        assert!(Arc::ptr_eq(&e[0].labels, &e[1].labels), "one shared copy");
        // A pod relabelled: its Service is published again with the new labels.
        m.handle(Msg::PodLabels(Change::Apply(
            "default/g-2".into(),
            labels(&[("app", "g"), ("version", "v2")]),
        )));
        let e = eps(&m.updates());
        assert_eq!(e[1].labels["version"], "v2");
        assert_eq!(e[0].labels["version"], "v1");
        // A pod no slice lists changes nothing.
        m.handle(Msg::PodLabels(Change::Apply(
            "default/other".into(),
            labels(&v1),
        )));
        assert!(m.updates().is_empty());
    }
}
