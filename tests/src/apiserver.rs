//! An in-process Kubernetes API server for the discovery tests and the benchmark: plain HTTP
//! (hyper 1), speaking the API server's list and watch protocol for the resources the agent
//! watches (namespaces, services, pods in `v1`; endpointslices in `discovery.k8s.io/v1`; and,
//! once their CRDs are installed, Istio's virtualservices and destinationrules in
//! `networking.istio.io` `v1`/`v1beta1`/`v1alpha3` and grpcroutes in
//! `gateway.networking.k8s.io` `v1`/`v1alpha2`), so that the real kube-rs client inside the
//! real agent runs against it.
//!
//! What it implements, as the API server does:
//! - discovery: `/api`, `/api/v1`, `/apis`, `/apis/GROUP`, `/apis/GROUP/VERSION`, listing what
//!   is served; a custom resource's group and paths answer 404 until [`ApiServer::install`], and
//!   again after [`ApiServer::uninstall`] (which deletes its objects and ends its watches);
//! - custom resources are stored as written and served in whichever of their versions is asked
//!   (one schema, no conversion webhook); `creationTimestamp` is set at creation;
//! - every write bumps one resourceVersion counter; objects carry theirs;
//! - lists: typed lists (items without `kind`/`apiVersion`; custom resources' items with them),
//!   `limit`/`continue` pages served from the snapshot of the first page, label and field
//!   selectors; `Accept: ...;as=PartialObjectMetadata` lists and watches serve metadata only;
//! - watches: from a resourceVersion, replaying what the client missed, then live; chunked
//!   `application/json`, one event per line; `ADDED`/`MODIFIED`/`DELETED`, `DELETED` with the
//!   old object at the new resourceVersion when an object stops matching the selectors;
//!   `BOOKMARK`s when asked (`allowWatchBookmarks`); the stream ends after `timeoutSeconds`;
//! - a watch from a resourceVersion older than its history gets HTTP 200 with one `ERROR` event
//!   (`410`, reason `Expired`) and the stream ends; one from a resourceVersion ahead of the
//!   server gets HTTP 504 "Too large resource version".
//!
//! And what tests need on demand: cut every watch connection ([`ApiServer::disconnect_watches`]),
//! forget the history ([`ApiServer::compact`]), stop and start again on the same port as a
//! restarted API server does (its watch cache starts empty: resuming watches get `410`), and a
//! resourceVersion that goes backwards ([`ApiServer::rewind`], a restore from backup).
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{body::Frame, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};

/// The resources served: the four the agent always watches, and the custom resources of Istio
/// and the Gateway API, served only once installed ([`ApiServer::install`]) as a cluster with
/// their CRDs serves them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `v1` namespaces (cluster-scoped).
    Namespace,
    /// `v1` services.
    Service,
    /// `discovery.k8s.io/v1` endpointslices.
    EndpointSlice,
    /// `v1` pods.
    Pod,
    /// Istio's `networking.istio.io` virtualservices (`v1`, `v1beta1`, `v1alpha3`).
    VirtualService,
    /// Istio's `networking.istio.io` destinationrules (`v1`, `v1beta1`, `v1alpha3`).
    DestinationRule,
    /// The Gateway API's `gateway.networking.k8s.io` grpcroutes (`v1`, `v1alpha2`).
    GrpcRoute,
}

/// What the API server says of a kind: the columns of its discovery documents.
struct KindInfo {
    kind: &'static str,
    plural: &'static str,
    singular: &'static str,
    /// `""` for the core group.
    group: &'static str,
    /// Served versions, the preferred (storage) one first.
    versions: &'static [&'static str],
    namespaced: bool,
    /// Served without installing anything (not a custom resource).
    builtin: bool,
}

const ISTIO_VERSIONS: &[&str] = &["v1", "v1beta1", "v1alpha3"];

impl Kind {
    /// Every kind the fixture knows.
    pub const ALL: [Kind; 7] = [
        Kind::Namespace,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::GrpcRoute,
    ];

    fn info(self) -> KindInfo {
        let (kind, plural, singular, group, versions, namespaced, builtin) = match self {
            Kind::Namespace => (
                "Namespace",
                "namespaces",
                "namespace",
                "",
                &["v1"][..],
                false,
                true,
            ),
            Kind::Service => (
                "Service",
                "services",
                "service",
                "",
                &["v1"][..],
                true,
                true,
            ),
            Kind::EndpointSlice => (
                "EndpointSlice",
                "endpointslices",
                "endpointslice",
                "discovery.k8s.io",
                &["v1"][..],
                true,
                true,
            ),
            Kind::Pod => ("Pod", "pods", "pod", "", &["v1"][..], true, true),
            Kind::VirtualService => (
                "VirtualService",
                "virtualservices",
                "virtualservice",
                "networking.istio.io",
                ISTIO_VERSIONS,
                true,
                false,
            ),
            Kind::DestinationRule => (
                "DestinationRule",
                "destinationrules",
                "destinationrule",
                "networking.istio.io",
                ISTIO_VERSIONS,
                true,
                false,
            ),
            Kind::GrpcRoute => (
                "GRPCRoute",
                "grpcroutes",
                "grpcroute",
                "gateway.networking.k8s.io",
                &["v1", "v1alpha2"][..],
                true,
                false,
            ),
        };
        KindInfo {
            kind,
            plural,
            singular,
            group,
            versions,
            namespaced,
            builtin,
        }
    }

    fn kind(self) -> &'static str {
        self.info().kind
    }

    /// `group/version` (or `version` in the core group) of one of its served versions.
    fn api_version_of(self, version: &str) -> String {
        match self.info().group {
            "" => version.to_string(),
            g => format!("{g}/{version}"),
        }
    }

    /// The preferred `apiVersion`.
    fn api_version(self) -> String {
        self.api_version_of(self.info().versions[0])
    }

    /// The kind of an object, from its `kind` and the group of its `apiVersion`.
    fn of(obj: &Value) -> Option<Self> {
        let kind = obj["kind"].as_str()?;
        let group = obj["apiVersion"]
            .as_str()
            .and_then(|v| v.rsplit_once('/'))
            .map(|(g, _)| g);
        Kind::ALL.into_iter().find(|k| {
            let i = k.info();
            i.kind == kind && (group.is_none() || group == Some(i.group))
        })
    }

    /// (kind, namespace, version) from a request path.
    fn route(path: &str) -> Option<(Self, Option<String>, &'static str)> {
        let seg: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, version, rest) = match seg.as_slice() {
            ["api", v, rest @ ..] => ("", *v, rest),
            ["apis", g, v, rest @ ..] => (*g, *v, rest),
            _ => return None,
        };
        let (namespace, plural) = match rest {
            [r] => (None, *r),
            ["namespaces", ns, r] if *r != "namespaces" => (Some(ns.to_string()), *r),
            _ => return None,
        };
        let kind = Kind::ALL.into_iter().find(|k| {
            let i = k.info();
            i.group == group && i.plural == plural && (i.namespaced || namespace.is_none())
        })?;
        let version = kind
            .info()
            .versions
            .iter()
            .find(|v| **v == version)
            .copied()?;
        Some((kind, namespace, version))
    }
}

type Key = (Kind, String, String);

/// One write, as the watch history keeps it.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    kind: Kind,
    old: Option<Value>,
    new: Option<Value>,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Change>,
    /// Watches from a resourceVersion below this get 410.
    oldest: u64,
    pages: HashMap<u64, (u64, Vec<Value>)>,
    next_page: u64,
    uid: u64,
    /// Custom resource kinds whose CRDs are installed.
    installed: BTreeSet<Kind>,
}

impl State {
    fn serves(&self, kind: Kind) -> bool {
        kind.info().builtin || self.installed.contains(&kind)
    }
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    disconnect: watch::Sender<u64>,
    bookmark_interval: Duration,
    watches: AtomicUsize,
    requests: AtomicUsize,
}

/// The running fixture.
#[derive(Debug)]
pub struct ApiServer {
    shared: Arc<Shared>,
    /// Where it listens (the same across restarts).
    pub addr: SocketAddr,
    tasks: tokio::sync::Mutex<Option<JoinSet<()>>>,
}

/// The history kept for resuming watches.
const HISTORY: usize = 200_000;

impl ApiServer {
    /// Starts on an ephemeral 127.0.0.1 port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let addr = listener.local_addr().expect("local addr");
        let server = Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    rv: 1000,
                    oldest: 1000,
                    ..Default::default()
                }),
                changed: watch::channel(1000).0,
                disconnect: watch::channel(0).0,
                bookmark_interval: Duration::from_millis(500),
                watches: AtomicUsize::new(0),
                requests: AtomicUsize::new(0),
            }),
            addr,
            tasks: tokio::sync::Mutex::new(None),
        };
        server.serve(listener).await;
        server
    }

    async fn serve(&self, listener: TcpListener) {
        let mut set = JoinSet::new();
        let shared = self.shared.clone();
        set.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = shared.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(&shared, req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        *self.tasks.lock().await = Some(set);
    }

    /// Stops listening and drops every connection, as a dying API server does.
    pub async fn stop(&self) {
        if let Some(mut set) = self.tasks.lock().await.take() {
            set.shutdown().await;
        }
        self.shared.disconnect.send_modify(|g| *g += 1);
    }

    /// Listens again on the same port. Like a restarted API server, its watch cache starts
    /// at the current resourceVersion: watches resuming from before it get `410 Gone`.
    pub async fn start_again(&self) {
        self.compact();
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("rebinding {}: {e}", self.addr),
            }
        };
        self.serve(listener).await;
    }

    /// [`ApiServer::stop`] then [`ApiServer::start_again`].
    pub async fn restart(&self) {
        self.stop().await;
        self.start_again().await;
    }

    /// Ends every watch stream abruptly (the connection is cut mid-body).
    pub fn disconnect_watches(&self) {
        self.shared.disconnect.send_modify(|g| *g += 1);
    }

    /// Forgets the watch history: watches resuming from an older resourceVersion get `410`.
    pub fn compact(&self) {
        let mut s = self.lock();
        s.history.clear();
        s.oldest = s.rv;
    }

    /// Moves the resourceVersion back by `by` (a restore from an older backup): every object is
    /// stamped anew below the version clients last saw; watches resuming from it get 504.
    pub fn rewind(&self, by: u64) {
        let mut s = self.lock();
        s.rv = s.rv.saturating_sub(by).max(1);
        s.history.clear();
        s.oldest = s.rv;
        let rv = s.rv;
        for o in s.objects.values_mut() {
            o["metadata"]["resourceVersion"] = json!(rv.to_string());
        }
        drop(s);
        self.shared.changed.send_replace(rv);
    }

    /// Watch streams open now.
    pub fn watches(&self) -> usize {
        self.shared.watches.load(Relaxed)
    }

    /// Requests served so far.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Relaxed)
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Installs the CRDs of custom resource kinds: from now on they are listed in discovery
    /// (`/apis`, `/apis/GROUP`, `/apis/GROUP/VERSION`) and served; until then their paths
    /// answer 404, as on a cluster without them.
    pub fn install(&self, kinds: &[Kind]) {
        let mut s = self.lock();
        for k in kinds {
            assert!(!k.info().builtin, "{k:?} is always served");
            s.installed.insert(*k);
        }
    }

    /// Removes the CRD of a custom resource kind, as `kubectl delete crd` does: every object of
    /// the kind is deleted (watchers see `DELETED`), its watches end, and its paths answer 404.
    pub fn uninstall(&self, kind: Kind) {
        let keys: Vec<Key> = self
            .lock()
            .objects
            .keys()
            .filter(|(k, _, _)| *k == kind)
            .cloned()
            .collect();
        for (k, ns, name) in keys {
            self.delete(k, &ns, &name);
        }
        self.lock().installed.remove(&kind);
        self.shared.changed.send_modify(|_| {});
    }

    /// Creates or replaces an object (its `kind` says which resource); returns its new
    /// resourceVersion. A custom resource keeps the `apiVersion` it was written with when that
    /// version is served (the fixture stores every version alike, as CRDs without conversion
    /// webhooks do) and needs its kind installed.
    pub fn apply(&self, obj: Value) -> u64 {
        self.apply_all([obj])
    }

    /// Creates or replaces several objects, one resourceVersion each; returns the last.
    pub fn apply_all(&self, objs: impl IntoIterator<Item = Value>) -> u64 {
        let mut s = self.lock();
        for mut obj in objs {
            let kind = Kind::of(&obj).expect("an object with a known kind");
            assert!(
                s.serves(kind),
                "{kind:?}: its CRD is not installed (ApiServer::install)"
            );
            let key = key_of(kind, &obj);
            s.rv += 1;
            let rv = s.rv;
            let old = s.objects.get(&key).cloned();
            let meta = &mut obj["metadata"];
            meta["resourceVersion"] = json!(rv.to_string());
            if meta.get("uid").is_none() {
                let uid = match &old {
                    Some(o) => o["metadata"]["uid"].clone(),
                    None => {
                        s.uid += 1;
                        json!(format!("00000000-0000-4000-8000-{:012x}", s.uid))
                    }
                };
                obj["metadata"]["uid"] = uid;
            }
            let written = obj["apiVersion"].as_str().unwrap_or_default();
            let served = kind
                .info()
                .versions
                .iter()
                .any(|v| kind.api_version_of(v) == written);
            if kind.info().builtin || !served {
                obj["apiVersion"] = json!(kind.api_version());
            }
            let created = match &old {
                Some(o) => o["metadata"]["creationTimestamp"].clone(),
                None => obj["metadata"]["creationTimestamp"].clone(),
            };
            obj["metadata"]["creationTimestamp"] = if created.is_string() {
                created
            } else {
                json!(rfc3339(std::time::SystemTime::now()))
            };
            s.objects.insert(key, obj.clone());
            push(
                &mut s,
                Change {
                    rv,
                    kind,
                    old,
                    new: Some(obj),
                },
            );
        }
        let rv = s.rv;
        drop(s);
        self.shared.changed.send_replace(rv);
        rv
    }

    /// Deletes an object; returns the resourceVersion of the deletion, if it existed.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Option<u64> {
        let mut s = self.lock();
        let old = s
            .objects
            .remove(&(kind, namespace.to_string(), name.to_string()))?;
        s.rv += 1;
        let rv = s.rv;
        push(
            &mut s,
            Change {
                rv,
                kind,
                old: Some(old),
                new: None,
            },
        );
        drop(s);
        self.shared.changed.send_replace(rv);
        Some(rv)
    }

    /// The stored object.
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(kind, namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Writes a kubeconfig for this server into `dir`; returns its path.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fixture\n  cluster:\n    server: http://{}\n\
                 users:\n- name: fixture\n  user:\n    token: fixture-token\n\
                 contexts:\n- name: fixture\n  context:\n    cluster: fixture\n    user: fixture\n    namespace: default\n\
                 current-context: fixture\n",
                self.addr
            ),
        )
        .expect("writing the kubeconfig");
        path
    }
}

/// A time as the API server writes `creationTimestamp`: RFC 3339 in UTC, whole seconds.
fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn push(s: &mut State, c: Change) {
    s.history.push_back(c);
    while s.history.len() > HISTORY {
        let dropped = s.history.pop_front().expect("not empty");
        s.oldest = dropped.rv;
    }
}

fn key_of(kind: Kind, obj: &Value) -> Key {
    let m = &obj["metadata"];
    (
        kind,
        m["namespace"].as_str().unwrap_or_default().to_string(),
        m["name"].as_str().expect("metadata.name").to_string(),
    )
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(v.to_string()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "application/json".parse().expect("valid"),
    );
    r
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn fail(code: u16, reason: &str, message: &str) -> Response<Body> {
    full(
        StatusCode::from_u16(code).expect("valid code"),
        &status(code, reason, message),
    )
}

/// `%XX` and `+` decoding of a query value.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A parsed label or field selector: every requirement must hold.
#[derive(Debug, Default, Clone)]
struct Selector {
    /// (key, op, value): op is `=`, `!=`, `exists`, `!exists`.
    reqs: Vec<(String, &'static str, String)>,
}

impl Selector {
    fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if term.contains(" in ") || term.contains(" notin ") || term.contains('(') {
                return Err(format!("unsupported selector term {term:?}"));
            }
            let r = if let Some((k, v)) = term.split_once("!=") {
                (k.trim().to_string(), "!=", v.trim().to_string())
            } else if let Some((k, v)) = term.split_once("==") {
                (k.trim().to_string(), "=", v.trim().to_string())
            } else if let Some((k, v)) = term.split_once('=') {
                (k.trim().to_string(), "=", v.trim().to_string())
            } else if let Some(k) = term.strip_prefix('!') {
                (k.trim().to_string(), "!exists", String::new())
            } else {
                (term.to_string(), "exists", String::new())
            };
            reqs.push(r);
        }
        Ok(Self { reqs })
    }

    fn matches(&self, get: impl Fn(&str) -> Option<String>) -> bool {
        self.reqs.iter().all(|(k, op, v)| {
            let have = get(k);
            match *op {
                "=" => have.as_deref() == Some(v.as_str()),
                "!=" => have.as_deref() != Some(v.as_str()),
                "exists" => have.is_some(),
                _ => have.is_none(),
            }
        })
    }
}

#[derive(Debug, Clone)]
struct Query {
    kind: Kind,
    namespace: Option<String>,
    labels: Selector,
    fields: Selector,
    /// The version asked for: objects are served in it.
    version: &'static str,
    /// `Accept: ...;as=PartialObjectMetadata...`: metadata only, as `meta.k8s.io/v1`
    /// `PartialObjectMetadata` (kube-rs' `metadata_watcher`).
    meta_only: bool,
}

impl Query {
    /// The `kind` and `apiVersion` of what this query serves.
    fn served_type(&self) -> (String, String) {
        if self.meta_only {
            ("PartialObjectMetadata".into(), "meta.k8s.io/v1".into())
        } else {
            (
                self.kind.kind().into(),
                self.kind.api_version_of(self.version),
            )
        }
    }

    /// A stored object as this query serves it (at `rv` when given), with its `kind` and
    /// `apiVersion`.
    fn serve(&self, obj: &Value, rv: Option<u64>) -> Value {
        let mut o = if self.meta_only {
            json!({"metadata": obj["metadata"]})
        } else {
            obj.clone()
        };
        let (kind, api_version) = self.served_type();
        o["kind"] = json!(kind);
        o["apiVersion"] = json!(api_version);
        if let Some(rv) = rv {
            o["metadata"]["resourceVersion"] = json!(rv.to_string());
        }
        o
    }

    fn matches(&self, obj: &Value) -> bool {
        let m = &obj["metadata"];
        if let Some(ns) = &self.namespace
            && m["namespace"].as_str() != Some(ns.as_str())
        {
            return false;
        }
        self.labels
            .matches(|k| m["labels"][k].as_str().map(str::to_string))
            && self.fields.matches(|k| {
                let v = match k {
                    "metadata.name" => &m["name"],
                    "metadata.namespace" => &m["namespace"],
                    "spec.nodeName" => &obj["spec"]["nodeName"],
                    _ => return None,
                };
                Some(v.as_str().unwrap_or_default().to_string())
            })
    }
}

fn handle(shared: &Arc<Shared>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    shared.requests.fetch_add(1, Relaxed);
    if req.method() != http::Method::GET {
        return fail(405, "MethodNotAllowed", "the fixture serves GET only");
    }
    let path = req.uri().path();
    if path == "/version" {
        return full(
            StatusCode::OK,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-fixture"}),
        );
    }
    if let Some(doc) = discovery(
        &shared.state.lock().unwrap_or_else(|p| p.into_inner()),
        path,
    ) {
        return full(StatusCode::OK, &doc);
    }
    let not_found = || {
        fail(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    };
    let Some((kind, namespace, version)) = Kind::route(path) else {
        return not_found();
    };
    if !shared
        .state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .serves(kind)
    {
        return not_found();
    }
    let meta_only = req
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"));
    let params: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (!k.is_empty()).then(|| (decode(k), decode(v)))
        })
        .collect();
    let p = |k: &str| params.get(k).map(String::as_str).unwrap_or_default();
    let labels = match Selector::parse(p("labelSelector")) {
        Ok(s) => s,
        Err(e) => return fail(400, "BadRequest", &e),
    };
    let fields = match Selector::parse(p("fieldSelector")) {
        Ok(s) => s,
        Err(e) => return fail(400, "BadRequest", &e),
    };
    for (f, _, _) in &fields.reqs {
        let ok = matches!(f.as_str(), "metadata.name" | "metadata.namespace")
            || (kind == Kind::Pod && f == "spec.nodeName");
        if !ok {
            return fail(
                400,
                "BadRequest",
                &format!("field label not supported: {f}"),
            );
        }
    }
    let q = Query {
        kind,
        namespace,
        labels,
        fields,
        version,
        meta_only,
    };
    if matches!(p("watch"), "true" | "1") {
        if p("sendInitialEvents") == "true" {
            return fail(
                422,
                "Invalid",
                "sendInitialEvents is not supported by the fixture",
            );
        }
        watch(shared, q, &params)
    } else {
        list(shared, q, p("limit").parse().unwrap_or(0), p("continue"))
    }
}

/// The discovery document at `path`, if it is one the server serves: `/api`, `/api/v1`,
/// `/apis`, `/apis/GROUP` and `/apis/GROUP/VERSION`, listing the built-in kinds the fixture
/// serves and the installed custom resources.
fn discovery(s: &State, path: &str) -> Option<Value> {
    let served: Vec<KindInfo> = Kind::ALL
        .into_iter()
        .filter(|k| s.serves(*k))
        .map(Kind::info)
        .collect();
    let groups: BTreeMap<&str, &[&str]> = served
        .iter()
        .filter(|i| !i.group.is_empty())
        .map(|i| (i.group, i.versions))
        .collect();
    let group_doc = |g: &str, versions: &[&str]| {
        let vs: Vec<Value> = versions
            .iter()
            .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
            .collect();
        json!({"name": g, "versions": vs, "preferredVersion": vs[0]})
    };
    let resources = |group: &str, version: &str| {
        let rs: Vec<Value> = served
            .iter()
            .filter(|i| i.group == group && i.versions.contains(&version))
            .map(|i| {
                json!({"name": i.plural, "singularName": i.singular, "namespaced": i.namespaced,
                       "kind": i.kind, "verbs": ["get", "list", "watch"]})
            })
            .collect();
        let gv = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        (!rs.is_empty()).then(|| {
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                   "resources": rs})
        })
    };
    let seg: Vec<&str> = path.trim_matches('/').split('/').collect();
    match seg.as_slice() {
        ["api"] => Some(json!({"kind": "APIVersions", "versions": ["v1"],
                               "serverAddressByClientCIDRs": []})),
        ["api", v] => resources("", v),
        ["apis"] => Some(json!({"kind": "APIGroupList", "apiVersion": "v1",
            "groups": groups.iter().map(|(g, vs)| group_doc(g, vs)).collect::<Vec<_>>()})),
        ["apis", g] => groups.get(g).map(|vs| {
            let mut doc = group_doc(g, vs);
            doc["kind"] = json!("APIGroup");
            doc["apiVersion"] = json!("v1");
            doc
        }),
        ["apis", g, v] => resources(g, v),
        _ => None,
    }
}

/// An item of a list: typed lists of built-in kinds carry no `kind`/`apiVersion` per item;
/// lists of custom resources and metadata lists do.
fn list_item(q: &Query, obj: &Value) -> Value {
    let mut o = q.serve(obj, None);
    if q.kind.info().builtin
        && !q.meta_only
        && let Some(m) = o.as_object_mut()
    {
        m.remove("kind");
        m.remove("apiVersion");
    }
    o
}

fn list(shared: &Shared, q: Query, limit: usize, cont: &str) -> Response<Body> {
    let mut s = shared.state.lock().unwrap_or_else(|p| p.into_inner());
    let (id, offset) = if cont.is_empty() {
        let items: Vec<Value> = s
            .objects
            .range((q.kind, String::new(), String::new())..)
            .take_while(|((k, _, _), _)| *k == q.kind)
            .filter(|(_, o)| q.matches(o))
            .map(|(_, o)| list_item(&q, o))
            .collect();
        s.next_page += 1;
        let id = s.next_page;
        let rv = s.rv;
        s.pages.insert(id, (rv, items));
        (id, 0)
    } else {
        let parsed = cont
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
        match parsed {
            Some((id, off)) if s.pages.contains_key(&id) => (id, off),
            _ => {
                return fail(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result.",
                );
            }
        }
    };
    let (rv, items) = s.pages.get(&id).expect("page").clone();
    let end = if limit == 0 {
        items.len()
    } else {
        (offset + limit).min(items.len())
    };
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if end < items.len() {
        meta["continue"] = json!(format!("{id}:{end}"));
        meta["remainingItemCount"] = json!(items.len() - end);
    } else {
        s.pages.remove(&id);
    }
    let (kind, api_version) = q.served_type();
    full(
        StatusCode::OK,
        &json!({
            "kind": format!("{kind}List"),
            "apiVersion": api_version,
            "metadata": meta,
            "items": items[offset.min(end)..end],
        }),
    )
}

/// The watch event a change means to a watcher with these selectors, if any.
fn event_of(q: &Query, c: &Change) -> Option<Value> {
    if c.kind != q.kind {
        return None;
    }
    let with_kind = |o: &Value, rv: u64| q.serve(o, Some(rv));
    let was = c.old.as_ref().filter(|o| q.matches(o));
    let is = c.new.as_ref().filter(|o| q.matches(o));
    match (was, is) {
        (Some(_), Some(n)) => Some(json!({"type": "MODIFIED", "object": with_kind(n, c.rv)})),
        (None, Some(n)) => Some(json!({"type": "ADDED", "object": with_kind(n, c.rv)})),
        (Some(o), None) => Some(json!({"type": "DELETED", "object": with_kind(o, c.rv)})),
        (None, None) => None,
    }
}

fn line(v: &Value) -> Result<Frame<Bytes>, std::io::Error> {
    let mut b = v.to_string().into_bytes();
    b.push(b'\n');
    Ok(Frame::data(Bytes::from(b)))
}

fn watch(shared: &Arc<Shared>, q: Query, params: &HashMap<String, String>) -> Response<Body> {
    let from = params.get("resourceVersion").cloned().unwrap_or_default();
    let bookmarks = params.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .unwrap_or(1800u64);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(64);
    let mut initial = Vec::new();
    let start = {
        let s = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if from.is_empty() || from == "0" {
            // "Any" version: the current objects as ADDED, then changes.
            for o in s.objects.values().filter(|o| Kind::of_stored(o, q.kind)) {
                if q.matches(o) {
                    initial.push(json!({"type": "ADDED", "object": q.serve(o, None)}));
                }
            }
            s.rv
        } else {
            let Ok(v) = from.parse::<u64>() else {
                return fail(
                    400,
                    "BadRequest",
                    &format!("invalid resourceVersion {from:?}"),
                );
            };
            if v > s.rv {
                let mut st = status(
                    504,
                    "Timeout",
                    &format!("Too large resource version: {v}, current: {}", s.rv),
                );
                st["details"] = json!({"causes": [{"reason": "ResourceVersionTooLarge",
                    "message": "Too large resource version"}], "retryAfterSeconds": 1});
                return full(StatusCode::GATEWAY_TIMEOUT, &st);
            }
            if v < s.oldest {
                initial.push(json!({"type": "ERROR", "object": status(
                    410, "Expired", &format!("too old resource version: {v} ({})", s.oldest))}));
                u64::MAX
            } else {
                v
            }
        }
    };
    let shared2 = shared.clone();
    tokio::spawn(async move {
        let shared = shared2;
        shared.watches.fetch_add(1, Relaxed);
        struct Count(Arc<Shared>);
        impl Drop for Count {
            fn drop(&mut self) {
                self.0.watches.fetch_sub(1, Relaxed);
            }
        }
        let _count = Count(shared.clone());
        for e in &initial {
            if tx.send(line(e)).await.is_err() {
                return;
            }
        }
        if start == u64::MAX {
            return;
        }
        let mut pos = start;
        let mut changed = shared.changed.subscribe();
        let mut disconnect = shared.disconnect.subscribe();
        disconnect.borrow_and_update();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let mut tick = tokio::time::interval(shared.bookmark_interval);
        tick.tick().await;
        loop {
            changed.borrow_and_update();
            let (events, gone): (Vec<Value>, bool) = {
                let s = shared.state.lock().unwrap_or_else(|p| p.into_inner());
                // A CRD removed: its watches end after the deletions of its objects.
                let gone = !s.serves(q.kind);
                let events = if pos < s.oldest {
                    vec![json!({"type": "ERROR", "object": status(
                        410, "Expired", &format!("too old resource version: {pos} ({})", s.oldest))})]
                } else {
                    let i = s.history.partition_point(|c| c.rv <= pos);
                    let evs = s
                        .history
                        .range(i..)
                        .filter_map(|c| event_of(&q, c))
                        .collect();
                    pos = pos.max(s.rv);
                    evs
                };
                (events, gone)
            };
            let expired = events.first().is_some_and(|e| e["type"] == "ERROR");
            for e in &events {
                if tx.send(line(e)).await.is_err() {
                    return;
                }
            }
            if expired || gone {
                return;
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                _ = disconnect.changed() => {
                    let _ = tx.send(Err(std::io::Error::other("disconnected on demand"))).await;
                    return;
                }
                _ = tick.tick(), if bookmarks => {
                    let (kind, api_version) = q.served_type();
                    let bm = json!({"type": "BOOKMARK", "object": {"kind": kind,
                        "apiVersion": api_version,
                        "metadata": {"resourceVersion": pos.to_string()}}});
                    if tx.send(line(&bm)).await.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tx.closed() => return,
            }
        }
    });
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut r = Response::new(BodyExt::boxed(body));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "application/json".parse().expect("valid"),
    );
    r
}

impl Kind {
    fn of_stored(obj: &Value, kind: Kind) -> bool {
        Kind::of(obj).is_some_and(|k| k == kind)
    }
}

/// Objects as a cluster would hold them.
pub mod objects {
    use serde_json::{Value, json};

    /// A namespace with labels.
    pub fn namespace(name: &str, labels: &[(&str, &str)]) -> Value {
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        json!({"kind": "Namespace", "metadata": {"name": name, "labels": labels}})
    }

    /// A ClusterIP Service with (name, port, appProtocol) ports.
    pub fn service(
        namespace: &str,
        name: &str,
        cluster_ip: &str,
        ports: &[(&str, u16, Option<&str>)],
    ) -> Value {
        let ports: Vec<Value> = ports
            .iter()
            .map(|(n, p, a)| {
                let mut v = json!({"name": n, "port": p, "protocol": "TCP", "targetPort": p});
                if let Some(a) = a {
                    v["appProtocol"] = json!(a);
                }
                v
            })
            .collect();
        json!({"kind": "Service", "metadata": {"name": name, "namespace": namespace},
               "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                        "ports": ports}})
    }

    /// One endpoint of a slice.
    #[derive(Clone, Debug)]
    pub struct Ep {
        /// Its IP.
        pub ip: String,
        /// conditions.ready.
        pub ready: bool,
        /// conditions.terminating.
        pub terminating: bool,
        /// The pod's name.
        pub pod: String,
    }

    impl Ep {
        /// A ready endpoint.
        pub fn ready(ip: &str, pod: &str) -> Self {
            Self {
                ip: ip.into(),
                ready: true,
                terminating: false,
                pod: pod.into(),
            }
        }

        /// A terminating endpoint (not ready, still serving).
        pub fn terminating(ip: &str, pod: &str) -> Self {
            Self {
                ip: ip.into(),
                ready: false,
                terminating: true,
                pod: pod.into(),
            }
        }
    }

    /// An IPv4 EndpointSlice of `service` with (port name, port) ports.
    pub fn endpoint_slice(
        namespace: &str,
        name: &str,
        service: &str,
        ports: &[(&str, u16)],
        endpoints: &[Ep],
    ) -> Value {
        let eps: Vec<Value> = endpoints
            .iter()
            .map(|e| {
                json!({"addresses": [e.ip],
                       "conditions": {"ready": e.ready, "serving": true, "terminating": e.terminating},
                       "nodeName": "node-1", "zone": "zone-a",
                       "targetRef": {"kind": "Pod", "namespace": namespace, "name": e.pod}})
            })
            .collect();
        let ports: Vec<Value> = ports
            .iter()
            .map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"}))
            .collect();
        json!({"kind": "EndpointSlice",
               "metadata": {"name": name, "namespace": namespace,
                            "labels": {"kubernetes.io/service-name": service,
                                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
               "addressType": "IPv4", "ports": ports, "endpoints": eps})
    }

    /// A running pod on `node` with one container `app` (and optionally Istio's sidecar).
    pub fn pod(
        namespace: &str,
        name: &str,
        uid: &str,
        node: &str,
        labels: &[(&str, &str)],
        istio_sidecar: bool,
    ) -> Value {
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let mut containers = vec![json!({"name": "app", "image": "app:1"})];
        if istio_sidecar {
            containers.push(json!({"name": "istio-proxy", "image": "proxyv2"}));
        }
        let cid = format!("{:0>64}", uid.replace('-', ""));
        json!({"kind": "Pod",
               "metadata": {"name": name, "namespace": namespace, "uid": uid, "labels": labels},
               "spec": {"nodeName": node, "containers": containers},
               "status": {"phase": "Running", "qosClass": "Burstable",
                          "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0,
                              "image": "app:1", "imageID": "",
                              "containerID": format!("containerd://{cid}")}]}})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_and_query_decoding() {
        assert_eq!(
            decode("kubernetes.io%2Fservice-name"),
            "kubernetes.io/service-name"
        );
        assert_eq!(decode("a%3Db%2Cc"), "a=b,c");
        let s = Selector::parse("a=b,!c,d,e!=f").unwrap();
        let labels = |k: &str| match k {
            "a" => Some("b".to_string()),
            "d" => Some(String::new()),
            _ => None,
        };
        assert!(s.matches(labels));
        assert!(Selector::parse("a in (b)").is_err());
    }

    #[test]
    fn custom_resources_are_discovered_and_served_only_once_installed() {
        let mut s = State::default();
        assert_eq!(
            Kind::route("/apis/networking.istio.io/v1alpha3/namespaces/a/virtualservices"),
            Some((Kind::VirtualService, Some("a".into()), "v1alpha3"))
        );
        assert_eq!(
            Kind::route("/apis/networking.istio.io/v2/virtualservices"),
            None
        );
        assert!(discovery(&s, "/apis/networking.istio.io").is_none());
        let groups = discovery(&s, "/apis").unwrap();
        assert_eq!(groups["groups"].as_array().unwrap().len(), 1, "{groups}");
        s.installed.insert(Kind::VirtualService);
        s.installed.insert(Kind::GrpcRoute);
        let g = discovery(&s, "/apis/networking.istio.io").unwrap();
        assert_eq!(
            g["preferredVersion"]["groupVersion"],
            "networking.istio.io/v1"
        );
        let r = discovery(&s, "/apis/networking.istio.io/v1beta1").unwrap();
        let names: Vec<&str> = r["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["virtualservices"], "destinationrules not installed");
        assert!(discovery(&s, "/apis/gateway.networking.k8s.io/v1").is_some());
        // A stored object is served in the version asked for, or as metadata only.
        let obj = json!({"kind": "VirtualService", "apiVersion": "networking.istio.io/v1alpha3",
                         "metadata": {"name": "x", "namespace": "a", "labels": {"k": "v"}},
                         "spec": {"hosts": ["x"]}});
        let q = |version, meta_only| Query {
            kind: Kind::VirtualService,
            namespace: None,
            labels: Selector::default(),
            fields: Selector::default(),
            version,
            meta_only,
        };
        let v1 = q("v1", false).serve(&obj, Some(7));
        assert_eq!(v1["apiVersion"], "networking.istio.io/v1");
        assert_eq!(v1["metadata"]["resourceVersion"], "7");
        assert_eq!(v1["spec"]["hosts"][0], "x");
        let meta = q("v1", true).serve(&obj, None);
        assert_eq!(meta["kind"], "PartialObjectMetadata");
        assert_eq!(meta["metadata"]["labels"]["k"], "v");
        assert!(meta.get("spec").is_none());
        assert!(
            rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(1_709_251_199))
                == "2024-02-29T23:59:59Z"
        );
    }
}
