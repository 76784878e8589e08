//! The service/endpoint store.
//!
//! Discovery sources (the file, Kubernetes) speak in [`Update`]s; the store applies them and
//! publishes an immutable [`Snapshot`] that the proxy reads on every call without taking a lock
//! (an `ArcSwap` load). An [`Endpoint`] (the balancer's type) is long-lived: the same `Arc` is
//! reused by every snapshot that lists its address, so its statistics (EWMA, in-flight) survive
//! configuration changes, and calls in flight keep it alive after it is removed.
//!
//! The store holds specs and statistics, never a socket: the relay keeps the connection pools
//! (`relay::up::Pools`), by endpoint address.
//!
//! The store never blocks the data plane: writers rebuild the snapshot under their own mutex.
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex, Weak},
};

use arc_swap::ArcSwap;
use serde::Serialize;

pub use crate::balance::Endpoint;
use crate::{
    balance::{Balancer, FailurePolicy, Place, Settings},
    config::{Balancing, LocalityConfig, Policy, PoolConfig, ServiceConfig},
};

/// A service as discovery describes it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceSpec {
    /// Unique name.
    pub name: String,
    /// `:authority` values (lowercase) that select it.
    pub authorities: Vec<String>,
    /// VIP:port pairs that select it.
    pub vips: Vec<SocketAddr>,
    /// Balancing policy.
    pub policy: Policy,
    /// Its endpoints, ready or not.
    pub endpoints: Vec<EndpointSpec>,
    /// Hash header, locality, warm-up, health checks.
    pub balancing: Balancing,
}

/// An endpoint as discovery describes it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EndpointSpec {
    /// IP:port.
    pub addr: SocketAddr,
    /// Takes new calls.
    pub ready: bool,
    /// Shutting down: finishes its calls, takes no new ones.
    pub terminating: bool,
    /// Topology zone.
    pub zone: Option<String>,
    /// Node name.
    pub node: Option<String>,
    /// A name for people (the pod name).
    pub name: Option<String>,
    /// The endpoint's labels (its pod's, from Kubernetes; `labels` in the file): what a route's
    /// subset selects endpoints by (`call::route::Subset`). Shared: one pod's labels serve
    /// every service and port it backs.
    #[serde(skip_serializing_if = "no_labels", serialize_with = "serialize_labels")]
    pub labels: Labels,
}

fn no_labels(l: &Labels) -> bool {
    l.is_empty()
}

fn serialize_labels<S: serde::Serializer>(l: &Labels, s: S) -> Result<S::Ok, S::Error> {
    l.as_ref().serialize(s)
}

/// An endpoint's labels, by name. Cheap to clone into each snapshot and service.
pub type Labels = Arc<BTreeMap<String, String>>;

impl EndpointSpec {
    /// A ready endpoint with no topology.
    pub fn ready(addr: SocketAddr) -> Self {
        Self {
            addr,
            ready: true,
            terminating: false,
            zone: None,
            node: None,
            name: None,
            labels: Labels::default(),
        }
    }
}

impl ServiceSpec {
    /// The spec of a service from a validated configuration file.
    pub fn from_config(s: &ServiceConfig) -> Self {
        Self {
            name: s.name.clone(),
            authorities: s
                .authorities
                .iter()
                .map(|a| a.to_ascii_lowercase())
                .collect(),
            vips: s.selecting_addresses(),
            policy: s.policy,
            endpoints: s
                .endpoints
                .iter()
                .map(|e| EndpointSpec {
                    addr: e.address,
                    ready: true,
                    terminating: false,
                    zone: e.zone.clone(),
                    node: e.node.clone(),
                    name: e.name.clone(),
                    labels: Arc::new(e.labels.clone()),
                })
                .collect(),
            balancing: s.balancing.clone(),
        }
    }
}

/// Which discovery source a service came from. Each source has its own set of services: a
/// source's [`Update::Reset`] replaces only its own. When two sources name the same service,
/// the file wins (an operator's explicit configuration overrides discovery).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Source {
    /// The configuration file (and every caller of [`Store::apply`]).
    File,
    /// The Kubernetes API.
    Kubernetes,
}

/// A change from a discovery source.
// A few per discovery event, on the control plane: their size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Update {
    /// The source's whole view: services it does not list are removed.
    Reset(Vec<ServiceSpec>),
    /// One service added or changed.
    Upsert(ServiceSpec),
    /// One service removed, by name.
    Remove(String),
}

/// One endpoint of a service in a snapshot, with what discovery said of it.
#[derive(Debug)]
pub struct ServiceEndpoint {
    /// The shared endpoint.
    pub endpoint: Arc<Endpoint>,
    /// What discovery said.
    pub spec: EndpointSpec,
}

/// A service in a snapshot.
#[derive(Debug)]
pub struct Service {
    /// Stable id for the lifetime of the agent (also the datapath's `service_id`).
    pub id: u32,
    /// The name, cheap to clone into per-call records.
    pub name: Arc<str>,
    /// What discovery said.
    pub spec: ServiceSpec,
    /// All endpoints, ready or not.
    pub endpoints: Vec<ServiceEndpoint>,
    /// The ready ones and how to choose among them.
    pub balancer: Balancer,
}

/// An immutable view of every service.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Incremented on every change.
    pub version: u64,
    /// Services by name.
    pub services: BTreeMap<String, Arc<Service>>,
    by_vip: HashMap<SocketAddr, Arc<Service>>,
    by_authority: HashMap<String, Arc<Service>>,
}

impl Snapshot {
    /// The service a VIP:port means.
    pub fn by_vip(&self, vip: &SocketAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(vip)
    }

    /// The service an `:authority` means: `host:port` first, then `host`, case-insensitively.
    pub fn by_authority(&self, authority: &str) -> Option<&Arc<Service>> {
        if let Some(s) = self.by_authority.get(authority) {
            return Some(s);
        }
        let lower;
        let authority = if authority.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = authority.to_ascii_lowercase();
            if let Some(s) = self.by_authority.get(&lower) {
                return Some(s);
            }
            lower.as_str()
        } else {
            authority
        };
        let host = match authority.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => return None,
        };
        self.by_authority.get(host)
    }

    /// The service by name.
    pub fn by_name(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.get(name)
    }
}

/// The store: the current snapshot and what is needed to build the next one.
pub struct Store {
    current: ArcSwap<Snapshot>,
    inner: Mutex<Inner>,
    changed: tokio::sync::watch::Sender<u64>,
    /// Told of every snapshot published, in order ([`Store::on_publish`]).
    observers: Mutex<Vec<Observer>>,
}

/// What [`Store::on_publish`] calls.
type Observer = Box<dyn Fn(&Arc<Snapshot>) + Send + Sync>;

struct Inner {
    /// Each source's services by name; `build` merges them, the file first.
    sources: BTreeMap<Source, BTreeMap<String, ServiceSpec>>,
    ids: HashMap<String, u32>,
    next_id: u32,
    endpoints: HashMap<SocketAddr, Weak<Endpoint>>,
    failures: FailurePolicy,
    /// Where this agent runs, as the file says.
    locality: LocalityConfig,
    /// This node's name from the command line (`--node-name`).
    node_name: Option<String>,
    /// Where this agent runs, as the balancers are built with it.
    local: Place,
    version: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("version", &self.current.load().version)
            .finish()
    }
}

impl Store {
    /// An empty store whose balancers treat failing endpoints as `pool` says
    /// ([`FailurePolicy`]).
    pub fn new(pool: PoolConfig) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::from_pointee(Snapshot::default()),
            inner: Mutex::new(Inner {
                sources: BTreeMap::new(),
                ids: HashMap::new(),
                next_id: 1,
                endpoints: HashMap::new(),
                failures: FailurePolicy::from_config(&pool),
                locality: LocalityConfig::default(),
                node_name: None,
                local: Place::default(),
                version: 0,
            }),
            changed: tokio::sync::watch::channel(0).0,
            observers: Mutex::new(Vec::new()),
        })
    }

    /// Calls `f` with the current snapshot now, then with every snapshot published, in the
    /// order they are published and before the next can be: what is derived from the store
    /// (the call layer's route table: its backends and subsets resolved against the services)
    /// follows each change. `f` runs under the store's writer lock: it must be quick and must
    /// not write to the store.
    pub fn on_publish(&self, f: impl Fn(&Arc<Snapshot>) + Send + Sync + 'static) {
        let _writer = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&self.current.load_full());
        self.observers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(f));
    }

    /// The current snapshot. Cheap; call it per call.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// A receiver that sees the snapshot version after every change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Applies an update from the file source and publishes the new snapshot.
    pub fn apply(&self, update: Update) {
        self.apply_from(Source::File, [update]);
    }

    /// Applies a batch of updates from `source` and publishes one new snapshot (none if nothing
    /// changed). A `Reset` replaces only that source's services.
    pub fn apply_from(&self, source: Source, updates: impl IntoIterator<Item = Update>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let specs = inner.sources.entry(source).or_default();
        let mut changed = false;
        for update in updates {
            match update {
                Update::Reset(new) => {
                    let new: BTreeMap<_, _> =
                        new.into_iter().map(|s| (s.name.clone(), s)).collect();
                    changed |= *specs != new;
                    *specs = new;
                }
                Update::Upsert(spec) => {
                    if specs.get(&spec.name) != Some(&spec) {
                        specs.insert(spec.name.clone(), spec);
                        changed = true;
                    }
                }
                Update::Remove(name) => changed |= specs.remove(&name).is_some(),
            }
        }
        if !changed {
            return;
        }
        let snapshot = inner.build(&self.current.load());
        self.publish(inner, snapshot);
    }

    /// Treats failing endpoints as `pool` says from now on (a reload of the `pool` section):
    /// every service's balancer is made again, over the same endpoints and their statistics.
    pub fn set_pool(&self, pool: &PoolConfig) {
        let failures = FailurePolicy::from_config(pool);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.failures == failures {
            return;
        }
        inner.failures = failures;
        // No service of an empty previous snapshot is reused: each gets a new balancer.
        let snapshot = inner.build(&Snapshot::default());
        self.publish(inner, snapshot);
    }

    /// Where this agent runs, as the file's `locality` section says (empty fields: from
    /// `--node-name`, and the zone of the endpoints on this node). Every balancer is made again
    /// when that changes what they prefer.
    pub fn set_locality(&self, locality: &LocalityConfig) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.locality = locality.clone();
        self.relocate(inner);
    }

    /// This node's name from the command line (`--node-name`, NODE_NAME).
    pub fn set_node_name(&self, node: Option<String>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.node_name = node.filter(|n| !n.is_empty());
        self.relocate(inner);
    }

    /// Where this agent runs, as its balancers see it.
    pub fn local(&self) -> Place {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .local
            .clone()
    }

    fn relocate(&self, mut inner: std::sync::MutexGuard<'_, Inner>) {
        let local = inner.local_place();
        if local == inner.local {
            return;
        }
        inner.local = local;
        let snapshot = inner.build(&Snapshot::default());
        self.publish(inner, snapshot);
    }

    fn publish(&self, inner: std::sync::MutexGuard<'_, Inner>, snapshot: Snapshot) {
        let version = snapshot.version;
        let snapshot = Arc::new(snapshot);
        self.current.store(snapshot.clone());
        for f in self
            .observers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            f(&snapshot);
        }
        drop(inner);
        self.changed.send_replace(version);
    }
}

impl Inner {
    /// Where this agent runs: the file's names, else the node from the command line and the
    /// zone that discovery reports for the endpoints on that node.
    fn local_place(&self) -> Place {
        let node = Some(self.locality.node.as_str())
            .filter(|n| !n.is_empty())
            .or(self.node_name.as_deref());
        let zone = Some(self.locality.zone.as_str())
            .filter(|z| !z.is_empty())
            .or_else(|| {
                let node = node?;
                self.sources
                    .values()
                    .flat_map(|s| s.values())
                    .flat_map(|s| &s.endpoints)
                    .find(|e| e.node.as_deref() == Some(node) && e.zone.is_some())
                    .and_then(|e| e.zone.as_deref())
            });
        Place::new(node, zone)
    }

    fn build(&mut self, previous: &Snapshot) -> Snapshot {
        self.version += 1;
        // The zone may come from the endpoints, which may have changed.
        let local = self.local_place();
        let empty = Snapshot::default();
        let previous = if local == self.local {
            previous
        } else {
            self.local = local;
            &empty
        };
        self.endpoints.retain(|_, e| e.strong_count() > 0);
        let mut snap = Snapshot {
            version: self.version,
            ..Default::default()
        };
        let sources = std::mem::take(&mut self.sources);
        let file = sources.get(&Source::File);
        let specs = sources.iter().flat_map(|(source, specs)| {
            specs.values().filter(move |s| {
                *source == Source::File || !file.is_some_and(|f| f.contains_key(&s.name))
            })
        });
        for spec in specs {
            // Unchanged services keep their Arc (and their round-robin position).
            let service = match previous.services.get(&spec.name) {
                Some(prev) if prev.spec == *spec => prev.clone(),
                prev => Arc::new(self.service(spec, prev.map(|p| &**p))),
            };
            for vip in &spec.vips {
                snap.by_vip.insert(*vip, service.clone());
            }
            for a in &spec.authorities {
                snap.by_authority.insert(a.clone(), service.clone());
            }
            snap.services.insert(spec.name.clone(), service);
        }
        self.sources = sources;
        snap
    }

    /// The service of `spec`; `previous`: its last version, whose endpoints need no warm-up.
    fn service(&mut self, spec: &ServiceSpec, previous: Option<&Service>) -> Service {
        let id = match self.ids.get(&spec.name) {
            Some(id) => *id,
            None => {
                let id = self.next_id;
                self.next_id += 1;
                self.ids.insert(spec.name.clone(), id);
                id
            }
        };
        let endpoints: Vec<ServiceEndpoint> = spec
            .endpoints
            .iter()
            .map(|e| {
                let endpoint = self.endpoint(e.addr);
                endpoint.set_place(Place::new(e.node.as_deref(), e.zone.as_deref()));
                // Slow start for an endpoint that joins a service that already had endpoints
                // to take its calls; a new service's first endpoints start at full share.
                if !spec.balancing.warmup.is_zero()
                    && let Some(prev) = previous
                    && !prev.balancer.ready().is_empty()
                    && !prev.endpoints.iter().any(|p| p.spec.addr == e.addr)
                {
                    endpoint.stats.start_warmup();
                }
                ServiceEndpoint {
                    endpoint,
                    spec: e.clone(),
                }
            })
            .collect();
        let ready = endpoints
            .iter()
            .filter(|e| e.spec.ready && !e.spec.terminating)
            .map(|e| e.endpoint.clone())
            .collect();
        Service {
            id,
            name: spec.name.as_str().into(),
            spec: spec.clone(),
            endpoints,
            balancer: Balancer::new(
                spec.policy,
                ready,
                Settings {
                    failures: self.failures,
                    balancing: spec.balancing.clone(),
                    local: self.local.clone(),
                },
            ),
        }
    }

    fn endpoint(&mut self, addr: SocketAddr) -> Arc<Endpoint> {
        if let Some(e) = self.endpoints.get(&addr).and_then(Weak::upgrade) {
            return e;
        }
        let e = Endpoint::new(addr);
        self.endpoints.insert(addr, Arc::downgrade(&e));
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, vip: &str, eps: &[&str]) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            authorities: vec![format!("{name}.default.svc.cluster.local")],
            vips: vec![vip.parse().unwrap()],
            policy: Policy::RoundRobin,
            endpoints: eps
                .iter()
                .map(|e| EndpointSpec::ready(e.parse().unwrap()))
                .collect(),
            balancing: Balancing::default(),
        }
    }

    #[tokio::test]
    async fn lookups_by_vip_authority_and_name() {
        let store = Store::new(PoolConfig::default());
        store.apply(Update::Reset(vec![spec(
            "a",
            "10.96.0.1:80",
            &["10.0.0.1:80"],
        )]));
        let s = store.snapshot();
        assert_eq!(
            s.by_vip(&"10.96.0.1:80".parse().unwrap())
                .unwrap()
                .spec
                .name,
            "a"
        );
        for a in [
            "a.default.svc.cluster.local",
            "a.default.svc.cluster.local:80",
            "A.Default.svc.cluster.local:8080",
        ] {
            assert_eq!(s.by_authority(a).unwrap().spec.name, "a", "{a}");
        }
        assert!(s.by_authority("b.default.svc.cluster.local").is_none());
        assert!(s.by_authority("a.default.svc.cluster.local:x").is_none());
    }

    #[tokio::test]
    async fn endpoints_keep_their_state_across_updates() {
        let store = Store::new(PoolConfig::default());
        store.apply(Update::Upsert(spec("a", "10.96.0.1:80", &["10.0.0.1:80"])));
        let before = store.snapshot().by_name("a").unwrap().endpoints[0]
            .endpoint
            .clone();
        let id = store.snapshot().by_name("a").unwrap().id;
        store.apply(Update::Upsert(spec(
            "a",
            "10.96.0.1:80",
            &["10.0.0.1:80", "10.0.0.2:80"],
        )));
        let s = store.snapshot();
        let a = s.by_name("a").unwrap();
        assert!(Arc::ptr_eq(&before, &a.endpoints[0].endpoint));
        assert_eq!(a.id, id);
        assert_eq!(a.balancer.ready().len(), 2);
    }

    #[tokio::test]
    async fn terminating_and_unready_endpoints_take_no_new_calls() {
        let store = Store::new(PoolConfig::default());
        let mut s = spec(
            "a",
            "10.96.0.1:80",
            &["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"],
        );
        s.endpoints[1].terminating = true;
        s.endpoints[2].ready = false;
        store.apply(Update::Upsert(s));
        let snap = store.snapshot();
        let a = snap.by_name("a").unwrap();
        assert_eq!(a.endpoints.len(), 3);
        let ready: Vec<_> = a
            .balancer
            .ready()
            .iter()
            .map(|e| e.addr.to_string())
            .collect();
        assert_eq!(ready, vec!["10.0.0.1:80"]);
    }

    #[tokio::test]
    async fn remove_and_reset_publish_versions() {
        let store = Store::new(PoolConfig::default());
        let mut rx = store.subscribe();
        store.apply(Update::Upsert(spec("a", "10.96.0.1:80", &[])));
        store.apply(Update::Upsert(spec("b", "10.96.0.2:80", &[])));
        store.apply(Update::Remove("a".into()));
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 3);
        let s = store.snapshot();
        assert!(s.by_name("a").is_none() && s.by_vip(&"10.96.0.1:80".parse().unwrap()).is_none());
        // A no-op update publishes nothing.
        store.apply(Update::Remove("a".into()));
        assert!(!rx.has_changed().unwrap());
        store.apply(Update::Reset(vec![]));
        assert!(store.snapshot().services.is_empty());
    }

    #[tokio::test]
    async fn a_source_resets_only_its_own_services_and_the_file_wins_a_name() {
        let store = Store::new(PoolConfig::default());
        store.apply(Update::Reset(vec![spec("f", "10.96.0.1:80", &[])]));
        store.apply_from(
            Source::Kubernetes,
            [Update::Reset(vec![
                spec("k", "10.96.0.2:80", &[]),
                spec("f", "10.96.0.3:80", &["10.0.0.9:80"]),
            ])],
        );
        let s = store.snapshot();
        assert_eq!(s.services.len(), 2);
        assert!(
            s.by_name("f").unwrap().spec.endpoints.is_empty(),
            "the file wins"
        );
        // The file's reload leaves the Kubernetes services alone...
        store.apply(Update::Reset(vec![]));
        let s = store.snapshot();
        assert!(s.by_name("k").is_some());
        // ...and uncovers the Kubernetes service it hid.
        assert_eq!(s.by_name("f").unwrap().spec.endpoints.len(), 1);
        store.apply_from(Source::Kubernetes, [Update::Reset(vec![])]);
        assert!(store.snapshot().services.is_empty());
    }

    #[tokio::test]
    async fn a_new_pool_section_remakes_the_balancers_over_the_same_endpoints() {
        let store = Store::new(PoolConfig::default());
        store.apply(Update::Upsert(spec(
            "a",
            "10.96.0.1:80",
            &["10.0.0.1:80", "10.0.0.2:80"],
        )));
        let before = store.snapshot();
        let refusing = before.by_name("a").unwrap().endpoints[0].endpoint.clone();
        refusing.stats.connect_failed();
        let picks = |snap: &Snapshot| -> Vec<SocketAddr> {
            let a = snap.by_name("a").unwrap();
            (0..8)
                .map(|_| a.balancer.pick(&[]).unwrap().endpoint().addr)
                .collect()
        };
        // Backing off for the default second: only the other endpoint is picked.
        assert!(!picks(&before).contains(&refusing.addr));
        // The same settings publish nothing.
        store.set_pool(&PoolConfig::default());
        assert_eq!(store.snapshot().version, before.version);
        store.set_pool(&PoolConfig {
            failure_backoff: std::time::Duration::ZERO,
            ..PoolConfig::default()
        });
        let after = store.snapshot();
        assert!(after.version > before.version);
        let a = after.by_name("a").unwrap();
        assert!(
            Arc::ptr_eq(&refusing, &a.endpoints[0].endpoint),
            "statistics kept"
        );
        assert_eq!(a.id, before.by_name("a").unwrap().id);
        // Failures are stamped in whole milliseconds: one must have passed.
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(
            picks(&after).contains(&refusing.addr),
            "no backoff any more"
        );
    }
}
