//! The admin server, on localhost only: readiness, metrics, the configuration in force, and
//! the JSON API that `balancer-agent inspect` reads. Routes and shapes are documented in
//! ARCHITECTURE.md. It runs on the control runtime, apart from the data plane.
//!
//! It answers on a loopback TCP address and, when asked, on a Unix socket too
//! ([`serve_unix`]): during a handover two agents run on one node, in the node's network
//! namespace, and only one can hold the TCP address; the Unix socket, in the container's own
//! filesystem, is always this agent's, and `balancer-agent probe` ([`probe`]) asks it for the
//! kubelet.
#![forbid(unsafe_code)]

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    process::ExitCode,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header::CONTENT_TYPE};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::json;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::watch,
};
use tracing::{debug, warn};

use crate::{config::Config, ebpf::Datapath, metrics::Metrics, proxy::Proxy, state::Store};

/// Whether the agent is ready, and if not, why. The start waits on it too
/// ([`Readiness::wait_for_only`]): the datapath redirects to this agent once nothing else
/// holds it back.
#[derive(Debug)]
pub struct Readiness {
    not_ready: watch::Sender<Vec<String>>,
}

impl Readiness {
    /// Starts not ready for `reasons`.
    pub fn new(reasons: &[&str]) -> Arc<Self> {
        Arc::new(Self {
            not_ready: watch::Sender::new(reasons.iter().map(|r| r.to_string()).collect()),
        })
    }

    /// Marks one reason resolved.
    pub fn resolve(&self, reason: &str) {
        self.not_ready.send_if_modified(|v| {
            let before = v.len();
            v.retain(|r| r != reason);
            v.len() != before
        });
    }

    /// Adds a reason not to be ready.
    pub fn block(&self, reason: &str) {
        self.not_ready.send_if_modified(|v| {
            let new = !v.iter().any(|r| r == reason);
            if new {
                v.push(reason.to_string());
            }
            new
        });
    }

    /// The reasons not to be ready; empty when ready.
    pub fn reasons(&self) -> Vec<String> {
        self.not_ready.borrow().clone()
    }

    /// Waits until every reason left is one of `reasons`.
    pub async fn wait_for_only(&self, reasons: &[&str]) {
        let mut rx = self.not_ready.subscribe();
        // The sender lives in `self`: the wait ends only by the condition.
        let _ = rx
            .wait_for(|v| v.iter().all(|r| reasons.contains(&r.as_str())))
            .await;
    }
}

/// What the admin server reads.
pub struct Admin {
    /// Services and endpoints.
    pub store: Arc<Store>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The proxy (connections, calls).
    pub proxy: Arc<Proxy>,
    /// The configuration in force.
    pub config: Arc<ArcSwap<Config>>,
    /// The datapath, when it runs.
    pub datapath: Option<Arc<Datapath>>,
    /// Readiness.
    pub readiness: Arc<Readiness>,
    /// When the agent started.
    pub started: Instant,
    /// Where the configuration came from (a file, Kubernetes).
    pub source: String,
    /// The pods of this node that Kubernetes discovery opted in (`/api/opted_in`).
    pub opted_in: tokio::sync::watch::Receiver<Arc<crate::discovery::pods::OptedIn>>,
}

/// `GET /api/status`.
#[derive(Debug, Serialize)]
pub struct StatusView {
    /// Agent version.
    pub version: &'static str,
    /// Ready for traffic.
    pub ready: bool,
    /// Why not, when not.
    pub not_ready_reasons: Vec<String>,
    /// Seconds since start.
    pub uptime_seconds: f64,
    /// Where services come from.
    pub source: String,
    /// Sections of the configuration file that changed since the start and wait for a
    /// restart (`listeners`, `admin`, `datapath`): the file's values are not in force.
    pub restart_required: Vec<&'static str>,
    /// The datapath, if loaded.
    pub datapath: Option<DatapathView>,
    /// Services known.
    pub services: usize,
    /// Endpoints known (all services).
    pub endpoints: usize,
    /// Endpoints taking new calls.
    pub ready_endpoints: usize,
    /// Client connections open.
    pub client_connections: usize,
    /// Calls in flight.
    pub active_calls: usize,
    /// Client connections each data-plane worker serves.
    pub worker_connections: Vec<usize>,
}

/// The datapath in `status`.
#[derive(Debug, Serialize)]
pub struct DatapathView {
    /// Programs and the hooks they are attached to.
    pub programs: Vec<String>,
    /// Where they are attached.
    pub cgroup_root: String,
    /// Where pods are redirected.
    pub proxy_address: String,
    /// Where maps are pinned.
    pub pin_dir: Option<String>,
    /// The shortcut.
    pub shortcut: crate::ebpf::ShortcutState,
}

/// An endpoint in `services`/`endpoints`.
#[derive(Debug, Serialize)]
pub struct EndpointView {
    /// The service.
    pub service: String,
    /// IP:port.
    pub address: String,
    /// Pod name, if known.
    pub name: Option<String>,
    /// Zone.
    pub zone: Option<String>,
    /// Node.
    pub node: Option<String>,
    /// `ready`, `terminating`, `not-ready`, `backing-off` after a refused connection,
    /// `ejected` by outlier detection, or `not-serving` by its health check.
    pub health: String,
    /// What its active health check says: `unchecked`, `serving`, `not-serving`.
    pub check: &'static str,
    /// Why the balancer gives it the share it gets (`balance::Balancer::explain`).
    pub pick: String,
    /// Calls in flight.
    pub in_flight: u32,
    /// Peak-EWMA latency, ms.
    pub ewma_ms: f64,
    /// Calls sent since it appeared.
    pub calls: u64,
    /// Calls that failed on it before an answer.
    pub failures: u64,
    /// Times outlier detection ejected it.
    pub ejections: u64,
    /// Pooled connections.
    pub connections: usize,
}

/// A service in `services`.
#[derive(Debug, Serialize)]
pub struct ServiceView {
    /// Name.
    pub name: String,
    /// VIP:ports.
    pub vips: Vec<String>,
    /// Authorities.
    pub authorities: Vec<String>,
    /// Protocol (always gRPC over HTTP/2 today).
    pub protocol: &'static str,
    /// Balancing policy.
    pub policy: &'static str,
    /// Endpoints taking new calls.
    pub ready_endpoints: usize,
    /// All endpoints.
    pub endpoints: usize,
}

impl Admin {
    /// The status view.
    pub fn status(&self) -> StatusView {
        let snap = self.store.snapshot();
        let reasons = self.readiness.reasons();
        StatusView {
            version: env!("CARGO_PKG_VERSION"),
            ready: reasons.is_empty(),
            not_ready_reasons: reasons,
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            source: self.source.clone(),
            restart_required: self.metrics.restart_required(),
            datapath: self.datapath.as_ref().map(|d| DatapathView {
                programs: vec![
                    "blb_connect4 (cgroup/connect4)".into(),
                    "blb_sock_ops (sockops)".into(),
                    "blb_sk_msg (sk_msg on BLB_SOCKETS)".into(),
                ],
                cgroup_root: d.cgroup_root().display().to_string(),
                proxy_address: d.proxy().to_string(),
                pin_dir: d.pin_dir().map(|p| p.display().to_string()),
                shortcut: d.shortcut().clone(),
            }),
            services: snap.services.len(),
            endpoints: snap.services.values().map(|s| s.endpoints.len()).sum(),
            ready_endpoints: snap
                .services
                .values()
                .map(|s| s.balancer.ready().len())
                .sum(),
            client_connections: self.proxy.connections(),
            active_calls: self.proxy.active_calls(),
            worker_connections: self.proxy.worker_connections(),
        }
    }

    /// Every service.
    pub fn services(&self) -> Vec<ServiceView> {
        self.store
            .snapshot()
            .services
            .values()
            .map(|s| ServiceView {
                name: s.spec.name.clone(),
                vips: s.spec.vips.iter().map(|v| v.to_string()).collect(),
                authorities: s.spec.authorities.clone(),
                protocol: "grpc",
                policy: s.spec.policy.as_str(),
                ready_endpoints: s.balancer.ready().len(),
                endpoints: s.endpoints.len(),
            })
            .collect()
    }

    /// Endpoints of one service, or of all.
    pub fn endpoints(&self, service: Option<&str>) -> Vec<EndpointView> {
        let snap = self.store.snapshot();
        let backoff = self.config.load().pool.failure_backoff;
        let mut out = Vec::new();
        for s in snap.services.values() {
            if service.is_some_and(|n| n != s.spec.name) {
                continue;
            }
            let why: std::collections::HashMap<_, _> = s.balancer.explain().into_iter().collect();
            for e in &s.endpoints {
                let st = &e.endpoint.stats;
                let health = if e.spec.terminating {
                    "terminating"
                } else if !e.spec.ready {
                    "not-ready"
                } else if st.ejected() {
                    "ejected"
                } else if st.backing_off(backoff) {
                    "backing-off"
                } else if st.health() == crate::balance::Health::NotServing {
                    "not-serving"
                } else {
                    "ready"
                };
                out.push(EndpointView {
                    service: s.spec.name.clone(),
                    address: e.endpoint.addr.to_string(),
                    name: e.spec.name.clone(),
                    zone: e.spec.zone.clone(),
                    node: e.spec.node.clone(),
                    health: health.into(),
                    check: st.health().as_str(),
                    pick: why
                        .get(&e.endpoint.addr)
                        .cloned()
                        .unwrap_or_else(|| "takes no new calls: not ready, or terminating".into()),
                    in_flight: st.in_flight.load(Relaxed),
                    ewma_ms: st.ewma().as_secs_f64() * 1000.0,
                    calls: st.calls.load(Relaxed),
                    failures: st.failures.load(Relaxed),
                    ejections: st.ejections.load(Relaxed),
                    connections: self.proxy.pools.connections(&e.endpoint),
                });
            }
        }
        out
    }

    fn bpf(&self) -> serde_json::Value {
        match &self.datapath {
            None => json!({"loaded": false}),
            Some(d) => {
                let (tuples, cookies) = d.tracked();
                json!({
                    "loaded": true,
                    "counters": d.counters().into_iter().collect::<std::collections::BTreeMap<_, _>>(),
                    "orig_dst_by_tuple": tuples,
                    "orig_dst_by_cookie": cookies,
                    "shortcut_sockets": d.shortcut_sockets(),
                })
            }
        }
    }

    fn route(&self, method: &Method, path: &str, query: Option<&str>) -> Response<Full<Bytes>> {
        if method != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
        }
        match path {
            "/ready" => {
                let reasons = self.readiness.reasons();
                if reasons.is_empty() {
                    text(StatusCode::OK, "ready\n".into())
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {}\n", reasons.join("; ")),
                    )
                }
            }
            "/live" => text(StatusCode::OK, "live\n".into()),
            "/metrics" => {
                let mut r = text(StatusCode::OK, self.metrics.render());
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    "text/plain; version=0.0.4".parse().expect("valid"),
                );
                r
            }
            "/config_dump" => json_response(&*self.config.load_full()),
            "/api/status" => json_response(&self.status()),
            "/api/services" => json_response(&self.services()),
            "/api/endpoints" => {
                let service = query_value(query, "service");
                if let Some(s) = &service
                    && self.store.snapshot().by_name(s).is_none()
                {
                    return text(StatusCode::NOT_FOUND, format!("no service is named {s:?}\n"));
                }
                json_response(&self.endpoints(service.as_deref()))
            }
            "/api/routes" => {
                let service = query_value(query, "service");
                json_response(&self.proxy.calls.router.table().view(service.as_deref()))
            }
            "/api/explain" => match self.explain(query) {
                Ok(e) => json_response(&e),
                Err((status, why)) => text(status, why + "\n"),
            },
            "/api/connections" => json_response(&self.proxy.calls.registry.connections()),
            "/api/calls" => json_response(&self.proxy.calls.registry.calls()),
            "/api/bpf" => json_response(&self.bpf()),
            "/api/opted_in" => json_response(&**self.opted_in.borrow()),
            _ => text(
                StatusCode::NOT_FOUND,
                "routes: /ready /live /metrics /config_dump /api/{status,services,endpoints,routes,explain,connections,calls,bpf,opted_in}\n"
                    .into(),
            ),
        }
    }
}

impl Admin {
    /// `/api/explain?to=DEST&method=/pkg.Svc/Method&header=name:value...`: the call layer's
    /// decision for such a call.
    fn explain(&self, query: Option<&str>) -> Result<serde_json::Value, (StatusCode, String)> {
        use crate::call::route::explain;
        let bad = |why: String| (StatusCode::BAD_REQUEST, why);
        let to = query_value(query, "to").ok_or_else(|| bad("to= is needed".into()))?;
        let method = query_value(query, "method").ok_or_else(|| bad("method= is needed".into()))?;
        let headers = query_values(query, "header");
        let snapshot = self.store.snapshot();
        let (service, _) = explain::destination(&snapshot, &to).ok_or_else(|| {
            (
                StatusCode::NOT_FOUND,
                format!("no service has VIP, authority or name {to:?}"),
            )
        })?;
        let fields = explain::request_fields(&to, &method, &headers).map_err(bad)?;
        let decision = self
            .proxy
            .calls
            .router
            .table()
            .explain(service, &fields, None);
        let mut v = serde_json::to_value(decision).expect("serializable");
        // Then the balancer: why each endpoint gets the share it gets.
        v["picks"] = service
            .balancer
            .explain()
            .into_iter()
            .map(|(address, why)| serde_json::json!({"address": address.to_string(), "why": why}))
            .collect();
        Ok(v)
    }
}

/// The values of `key` in a query string, URL-decoded (`%3A` is `:`, `+` a space).
fn query_values(query: Option<&str>, key: &str) -> Vec<String> {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (url_decode(k) == key).then(|| url_decode(v))
        })
        .collect()
}

/// The first value of `key` in a query string, URL-decoded.
fn query_value(query: Option<&str>, key: &str) -> Option<String> {
    query_values(query, key).into_iter().next()
}

/// `text` with `%XX` escapes and `+` decoded; an invalid escape stays as written.
fn url_decode(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

fn json_response<T: Serialize + ?Sized>(v: &T) -> Response<Full<Bytes>> {
    let mut r = text(
        StatusCode::OK,
        serde_json::to_string_pretty(v).expect("serializable") + "\n",
    );
    r.headers_mut()
        .insert(CONTENT_TYPE, "application/json".parse().expect("valid"));
    r
}

/// Serves the admin API on `listener` forever.
pub async fn serve(admin: Arc<Admin>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => connection(admin.clone(), stream),
            Err(e) => accept_failed(e).await,
        }
    }
}

/// Serves the admin API on a Unix socket forever.
pub async fn serve_unix(admin: Arc<Admin>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => connection(admin.clone(), stream),
            Err(e) => accept_failed(e).await,
        }
    }
}

/// EMFILE and friends: backs off instead of spinning.
async fn accept_failed(e: std::io::Error) {
    warn!(error = %e, "admin accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Serves one admin connection (HTTP/1.1) on its own task.
fn connection<S>(admin: Arc<Admin>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let svc = service_fn(move |req: Request<Incoming>| {
            let admin = admin.clone();
            async move {
                Ok::<_, Infallible>(admin.route(req.method(), req.uri().path(), req.uri().query()))
            }
        });
        if let Err(e) = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), svc)
            .await
        {
            debug!(error = %e, "admin connection");
        }
    });
}

/// Binds the admin Unix socket at `path`, replacing a socket a previous run of this container
/// left behind (the directory is the container's own: no other agent's socket is there).
pub fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}

/// `balancer-agent probe`: asks the agent behind the Unix socket `socket` for `path` (`/ready`
/// or `/live`) and exits 0 on 200, 1 otherwise, printing the answer (the kubelet keeps it in
/// the pod's events). The kubelet's exec probes run it inside the agent's container, so the
/// socket is that container's agent, whichever other agent runs on the node.
pub fn probe(socket: &Path, path: &str, timeout: Duration) -> ExitCode {
    match get_unix(socket, path, timeout) {
        Ok((200, body)) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            print!("{status}: {body}");
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("admin socket {}: {e}", socket.display());
            ExitCode::FAILURE
        }
    }
}

/// A GET over a Unix socket (HTTP/1.0, the server closes after the answer): status and body.
pub fn get_unix(socket: &Path, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {head:?}")))?;
    Ok((status, body.to_string()))
}

/// Binds the admin address, refusing anything but loopback.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    if !addr.ip().is_loopback() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("admin address {addr} is not loopback"),
        ));
    }
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_start_waits_until_only_the_given_reasons_are_left() {
        let r = Readiness::new(&["listeners not bound", "redirect off"]);
        r.block("caches not synced");
        let waiting = tokio::spawn({
            let r = r.clone();
            async move { r.wait_for_only(&["redirect off"]).await }
        });
        r.resolve("listeners not bound");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished(), "the caches still hold it");
        r.resolve("caches not synced");
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("it ends once only the given reasons are left")
            .unwrap();
        assert_eq!(r.reasons(), ["redirect off"]);
        r.resolve("redirect off");
        assert!(r.reasons().is_empty());
        // Already so: no wait.
        r.wait_for_only(&[]).await;
    }
}
