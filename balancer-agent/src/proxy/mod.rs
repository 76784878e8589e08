//! The HTTP/2 demultiplexer.
//!
//! A client connection is accepted on a listener ([`Proxy::serve`]), its protocol detected
//! (the HTTP/2 client preface, or plain TCP), and for HTTP/2 served by the frame relay
//! (`crate::relay`), which sends every stream, one gRPC call, to an endpoint chosen for that
//! call over pooled connections (the relay's [`Pools`]). A connection that is not HTTP/2 is
//! relayed as TCP to one endpoint.
//!
//! Which service a connection means: the original destination the datapath recorded
//! ([`OrigDstLookup`]), else each call's `:authority`, else the listener's default service.
//!
//! This module must never let one client affect another: every limit is per connection
//! (streams, header size, frame size, windows, resets), and a client that breaks one loses its
//! own connection only.
#![forbid(unsafe_code)]

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{debug, info, warn};

use crate::{
    call::{Calls, Target, route::SourceIdentity},
    netns::{Netns, Source},
    relay::{ConnectionEnded, up::Pools},
    workers::Workers,
};

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The datapath's answer to "where did this client want to go?".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// The VIP:port the client dialed.
    pub addr: SocketAddr,
    /// The process that connected (its id on the host), when the datapath knows it: its
    /// network namespace is the client pod's.
    pub pid: Option<u32>,
}

/// Looks up the original destination of a redirected connection by its 4-tuple. The eBPF
/// datapath implements it (`ebpf::Datapath`); without a datapath there is none.
pub trait OrigDstLookup: Send + Sync + 'static {
    /// `client` is the accepted connection's peer, `local` its local address.
    fn lookup(&self, client: SocketAddr, local: SocketAddr) -> Option<OrigDst>;
}

/// The proxy: shared by every listener, connection and call.
pub struct Proxy {
    /// What every call shares (store, metrics, limits, registry) and its rules.
    pub calls: Arc<Calls>,
    /// The endpoint pools the relay leases from.
    pub pools: Arc<Pools>,
    /// The datapath's original destinations, when the datapath runs.
    pub orig_dst: Option<Arc<dyn OrigDstLookup>>,
    /// The client pods whose addresses the connections to endpoints carry, when on.
    sources: Option<Sources>,
    /// Who the pods of this node are, by address (from Kubernetes discovery).
    identities: ArcSwap<foldhash::HashMap<IpAddr, Arc<SourceIdentity>>>,
    /// The workers that serve accepted connections.
    workers: Arc<Workers>,
    connections: AtomicUsize,
    drain: watch::Receiver<bool>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("calls", &self.calls)
            .field("connections", &self.connections)
            .finish_non_exhaustive()
    }
}

/// Why a client connection ended with an error (for the log).
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    /// Its protocol could not be told: the socket failed, or the client closed at once.
    #[error("detecting the protocol: {0}")]
    Detect(#[source] std::io::Error),
    /// An HTTP/2 connection ended with an error (the relay's).
    #[error(transparent)]
    Relay(#[from] ConnectionEnded),
    /// A plain TCP connection whose target names no service.
    #[error("plain TCP connection for {0}: no service")]
    NoService(String),
    /// A plain TCP connection that no endpoint of its service accepted.
    #[error("plain TCP connection for service {0}: no endpoint accepted it")]
    NoEndpoint(String),
}

/// One listener's settings.
#[derive(Clone, Debug)]
pub struct Listener {
    /// Its name.
    pub name: Arc<str>,
    /// The default service for calls that match nothing else.
    pub default_service: Option<Arc<str>>,
}

impl Proxy {
    /// A proxy over `store`. Setting `drain` to true makes every connection finish its calls
    /// and close (GOAWAY), and every listener stop accepting.
    /// With `sources`, a redirected connection's calls go to their endpoints from the
    /// client pod's address (`datapath.source_address: pod`).
    pub fn new(
        calls: Arc<Calls>,
        pools: Arc<Pools>,
        orig_dst: Option<Arc<dyn OrigDstLookup>>,
        sources: Option<Sources>,
        workers: Arc<Workers>,
        drain: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(Self {
            calls,
            pools,
            orig_dst,
            sources,
            identities: ArcSwap::default(),
            workers,
            connections: AtomicUsize::new(0),
            drain,
        })
    }

    /// Calls in flight.
    pub fn active_calls(&self) -> usize {
        self.calls.active()
    }

    /// Puts in force who the pods of this node are, by address: the connections accepted from
    /// then on from one of them carry its namespace and labels to the call layer.
    pub fn set_identities(&self, identities: foldhash::HashMap<IpAddr, Arc<SourceIdentity>>) {
        self.identities.store(Arc::new(identities));
    }

    /// Client connections open.
    pub fn connections(&self) -> usize {
        self.connections.load(Relaxed)
    }

    /// Client connections each worker serves.
    pub fn worker_connections(&self) -> Vec<usize> {
        self.workers.loads()
    }

    /// Accepts connections on `listener` until drained, each served by one of the workers.
    /// Drained, it serves what the kernel queued before it closes: those connections are told
    /// to go away like the others, rather than reset.
    pub async fn serve(self: Arc<Self>, tcp: TcpListener, listener: Listener) {
        let mut drain = self.drain.clone();
        let listener = Arc::new(listener);
        loop {
            let (stream, peer) = tokio::select! {
                r = tcp.accept() => match r {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(listener = %listener.name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = drained(&mut drain) => break,
            };
            self.accepted(stream, peer, &listener);
        }
        let mut queued = 0;
        let noop = &mut std::task::Context::from_waker(std::task::Waker::noop());
        while let std::task::Poll::Ready(Ok((stream, peer))) = tcp.poll_accept(noop) {
            self.accepted(stream, peer, &listener);
            queued += 1;
        }
        info!(listener = %listener.name, queued, "listener stopped");
    }

    /// Hands an accepted connection to a worker, unless `limits.max_connections` are open.
    fn accepted(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr, listener: &Arc<Listener>) {
        if self.connections.load(Relaxed) >= self.calls.limits().max_connections {
            self.calls
                .metrics
                .client_connection_errors
                .with_label_values(&["max_connections"])
                .inc();
            drop(stream);
            return;
        }
        let proxy = self.clone();
        let listener = listener.clone();
        self.workers.dispatch(stream, move |stream| async move {
            proxy.connection(stream, peer, listener).await;
        });
    }

    async fn connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr, l: Arc<Listener>) {
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap_or(peer);
        let orig = self.orig_dst.as_ref().and_then(|o| o.lookup(peer, local));
        let source = match (&self.sources, orig.and_then(|o| o.pid)) {
            (Some(sources), Some(pid)) => sources.of(peer.ip(), pid),
            _ => None,
        };
        let target = match orig {
            Some(o) => Target::Vip(o.addr),
            None => Target::Authority {
                default: l.default_service.clone(),
            },
        };
        self.connections.fetch_add(1, Relaxed);
        self.calls.metrics.client_connections.inc();
        let identity = self
            .identities
            .load()
            .get(&peer.ip().to_canonical())
            .cloned();
        let info = self
            .calls
            .registry
            .open_connection_from(peer, local, &target, identity);
        let detect_timeout = self.calls.limits().protocol_detect_timeout;
        let result = match detect_h2(&stream, detect_timeout).await {
            Ok(true) => {
                let relay = crate::relay::Relay {
                    calls: self.calls.clone(),
                    pools: self.pools.clone(),
                    source: source.clone(),
                    drain: self.drain.clone(),
                };
                crate::relay::serve(relay, stream, Arc::new(target), info.clone())
                    .await
                    .map_err(ConnectionError::from)
            }
            Ok(false) => self.relay_tcp(stream, &target, source.as_deref()).await,
            Err(e) => Err(ConnectionError::Detect(e)),
        };
        if let Err(e) = result {
            debug!(%peer, error = %e, "client connection ended with an error");
        }
        self.calls.registry.close_connection(&info);
        self.calls.metrics.client_connections.dec();
        self.connections.fetch_sub(1, Relaxed);
    }

    /// A connection that is not HTTP/2: relay it to one endpoint of its service.
    async fn relay_tcp(
        &self,
        mut client: TcpStream,
        target: &Target,
        source: Option<&Source>,
    ) -> Result<(), ConnectionError> {
        let snapshot = self.calls.store.snapshot();
        let Some(service) = target.resolve(&snapshot, None) else {
            let _ = client.shutdown().await;
            return Err(ConnectionError::NoService(target.describe()));
        };
        let mut tried = Vec::new();
        loop {
            let Some(guard) = service.balancer.pick(&tried) else {
                return Err(ConnectionError::NoEndpoint(service.spec.name.clone()));
            };
            let ep = guard.endpoint().clone();
            let connect = crate::relay::up::tcp_connect(ep.addr, source);
            match tokio::time::timeout(self.pools.connect_timeout(), connect).await {
                Ok(Ok(mut upstream)) => {
                    let _ = upstream.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    return Ok(());
                }
                _ => {
                    ep.stats.connect_failed();
                    tried.push(ep.addr);
                }
            }
        }
    }
}

/// The client pods that connections to endpoints come from (`datapath.source_address: pod`),
/// found by the process that connected (the datapath records its id) and kept while a client
/// connection of the pod is open: every client connection of one pod shares its endpoint
/// connections (the relay pools them per pod).
#[derive(Debug)]
pub struct Sources {
    proc_root: PathBuf,
    by_key: Mutex<foldhash::HashMap<(u64, IpAddr), Weak<Source>>>,
}

impl Sources {
    /// Sources found under `proc_root` (the host's `/proc`).
    pub fn new(proc_root: PathBuf) -> Self {
        Self {
            proc_root,
            by_key: Mutex::default(),
        }
    }

    /// The source of a client connection from `ip` made by process `pid`: `ip` in the
    /// process's network namespace. `None` (the node's address) when the process is gone
    /// already; a namespace that does not hold `ip` is found out when the first endpoint
    /// connection binds to it (`netns`), which then falls back to the node's address.
    fn of(&self, ip: IpAddr, pid: u32) -> Option<Arc<Source>> {
        let netns = match Netns::of_pid(&self.proc_root, pid) {
            Ok(n) => n,
            Err(e) => {
                debug!(%ip, pid, error = %e, "no network namespace for the client; node address");
                return None;
            }
        };
        let key = (netns.id(), ip);
        let mut by_key = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(source) = by_key.get(&key).and_then(Weak::upgrade) {
            return Some(source);
        }
        // Pods gone since leave the map before a new one joins it.
        by_key.retain(|_, s| s.strong_count() > 0);
        let source = Arc::new(Source { ip, netns });
        by_key.insert(key, Arc::downgrade(&source));
        Some(source)
    }

    /// Client pods with an open connection.
    pub fn len(&self) -> usize {
        let by_key = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        by_key.values().filter(|s| s.strong_count() > 0).count()
    }

    /// Whether no client pod has an open connection.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads (without consuming) the start of a connection: HTTP/2 if it begins with the client
/// preface, plain TCP if it does not, or if the client says nothing within `timeout`
/// (server-speaks-first protocols).
async fn detect_h2(stream: &TcpStream, timeout: Duration) -> std::io::Result<bool> {
    let mut buf = [0u8; PREFACE.len()];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(r) => r?,
            Err(_) => return Ok(false),
        };
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "client closed before sending anything",
            ));
        }
        if buf[..n] != PREFACE[..n] {
            return Ok(false);
        }
        if n == PREFACE.len() {
            return Ok(true);
        }
        // A partial preface: wait for the rest to arrive.
        tokio::select! {
            r = stream.readable() => r?,
            _ = tokio::time::sleep_until(deadline) => return Ok(false),
        }
        // `readable` fires at once while unread data sits in the buffer: pace the re-peek.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Resolves once the drain signal is set (or its sender is gone).
async fn drained(drain: &mut watch::Receiver<bool>) {
    let _ = drain.wait_for(|d| *d).await;
}
