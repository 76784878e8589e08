//! The relay's connections to endpoints (the proxy is the HTTP/2 client), and their pools.
//!
//! [`Pools`] keeps one [`Shard`] per endpoint and worker thread (every call of a client
//! connection runs on its worker, see `crate::workers`), as Envoy's per-worker pools do;
//! `max_connections_per_endpoint` applies to each shard. The store (`crate::state`) holds no
//! connection: an endpoint's shards are found by its address, the store's identity of an
//! endpoint. A call takes the first connection to its endpoint with a free
//! stream slot (below the endpoint's SETTINGS_MAX_CONCURRENT_STREAMS), else opens one (up to
//! `pool.max_connections_per_endpoint`), else goes to another endpoint. A new connection joins the
//! pool once the endpoint answered a PING on it; one too old or that carried its share of
//! calls is retired and closes when its last call ends; one idle for `pool.idle_timeout_ms`
//! closes; keepalive PINGs find a dead endpoint. The pool configuration can be replaced (a
//! reload, [`Pools::set_config`]): leases read it each time, a new connection takes its
//! windows, keepalive and idle timeout from it.
//!
//! A connection's task reads the endpoint's frames and writes them on to the clients'
//! streams. A stream the endpoint refused unprocessed (REFUSED_STREAM, or above a GOAWAY's
//! last stream id) goes back to its client's connection to be replayed on another endpoint;
//! when the connection is lost, every call on it ends with UNAVAILABLE at once.

use std::{
    borrow::Cow,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, MutexGuard, Weak,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use bytes::{Buf, BytesMut};
use foldhash::HashMap;
use tokio::{net::TcpStream, sync::oneshot, time::Instant};
use tracing::{debug, warn};

use super::{
    ConnectionEnded, Io, Keepalive,
    conn::{Conn, Credit, Replayed, Role, State, Stream, apply, unlink},
    down::fail_stream,
    read::{self, ConnError, HeaderBlock, connection_frame, unpad},
    read_more,
};
use crate::{
    balance::Endpoint,
    call::{AttemptError, End, breaker::ConnectionPool, grpc::Status, retry::Outcome},
    config::PoolConfig,
    netns::Source,
    wire::{
        frame::{self, Head, Reason, flag, kind, setting},
        hpack,
        message::Fields,
    },
};

/// Stream ids are 31 bits: a connection near the end of them takes no more calls.
const LAST_SID: u32 = (1 << 31) - 1024;

/// The payload of the PING a new connection waits on before it joins the pool ("ready?").
const READY_PING: [u8; 8] = *b"ready?\0\0";

/// A map of one worker's shards this big is pruned of the endpoints the store dropped.
const PRUNE_MIN: usize = 64;

/// The relay's endpoint pools: for each endpoint, one [`Shard`] of connections per data-plane
/// worker, made on the endpoint's first call on that worker. Made once by the agent's wiring
/// (`app`) with the pool configuration and the number of workers; a reload replaces the
/// configuration ([`Pools::set_config`]).
///
/// An endpoint's shards are keyed by its address, as the store keys its endpoints; they live
/// while the store's [`Endpoint`] at that address does (calls in flight included), and go the
/// next time their worker's map is pruned after it is gone.
#[derive(Debug)]
pub struct Pools {
    cfg: ArcSwap<PoolConfig>,
    /// By worker index (`crate::workers::current`).
    workers: Box<[Mutex<WorkerShards>]>,
}

/// One worker's shards, by endpoint address.
#[derive(Debug, Default)]
struct WorkerShards {
    by_addr: HashMap<SocketAddr, Entry>,
    /// Entries whose endpoint is gone are pruned when the map reaches this size.
    prune_at: usize,
}

#[derive(Debug)]
struct Entry {
    /// The store's endpoint at this address: the entry is pruned once it is gone.
    endpoint: Weak<Endpoint>,
    /// Connections from the node's address.
    shard: Arc<Shard>,
    /// Connections from client pods' addresses, one shard per pod (see [`Source`]); a pod's
    /// shard goes once the pod has no client connection left.
    by_source: HashMap<(u64, IpAddr), SourceShard>,
}

#[derive(Debug)]
struct SourceShard {
    source: Weak<Source>,
    shard: Arc<Shard>,
}

/// What a client connection leases endpoint connections from: the pools, and the client pod
/// whose address those connections carry (`None`: the node's address). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Leases {
    pools: Arc<Pools>,
    source: Option<Arc<Source>>,
    /// A service's own pool settings over the pools' (`call::breaker::ConnectionPool`).
    over: Option<ConnectionPool>,
}

impl Leases {
    /// Leases from `pools` for connections from `source`.
    pub fn new(pools: Arc<Pools>, source: Option<Arc<Source>>) -> Self {
        Self {
            pools,
            source,
            over: None,
        }
    }

    /// These leases for a service with its own pool settings (connections per endpoint, calls
    /// per connection, connect and idle timeouts, connection age) over the pools'.
    pub fn with_pool(mut self, over: Option<ConnectionPool>) -> Self {
        self.over = over.filter(ConnectionPool::pool_settings);
        self
    }

    /// See [`Pools::lease_pooled`].
    pub fn lease_pooled(&self, ep: &Arc<Endpoint>) -> Option<Arc<Conn>> {
        self.pools
            .lease_pooled_from(ep, self.source.as_ref(), self.over.as_ref())
    }

    /// See [`Pools::lease`].
    pub async fn lease(&self, ep: &Arc<Endpoint>) -> Result<Arc<Conn>, LeaseError> {
        self.pools
            .lease_from(ep, self.source.as_ref(), self.over.as_ref())
            .await
    }
}

/// `cfg` with a service's own pool settings over it, if it has any.
fn config_over<'a>(cfg: &'a PoolConfig, over: Option<&ConnectionPool>) -> Cow<'a, PoolConfig> {
    match over {
        Some(o) => Cow::Owned(o.over(cfg)),
        None => Cow::Borrowed(cfg),
    }
}

impl Pools {
    /// Empty pools configured by `cfg`, with one shard per endpoint for each of `workers`.
    pub fn new(cfg: PoolConfig, workers: usize) -> Arc<Self> {
        Arc::new(Self {
            cfg: ArcSwap::from_pointee(cfg),
            workers: (0..workers.max(1))
                .map(|_| Mutex::new(WorkerShards::default()))
                .collect(),
        })
    }

    /// The pool configuration in force.
    pub fn config(&self) -> Arc<PoolConfig> {
        self.cfg.load_full()
    }

    /// Puts `cfg` in force (a reload): for every lease from now on, and for the connections
    /// opened from now on.
    pub fn set_config(&self, cfg: PoolConfig) {
        self.cfg.store(Arc::new(cfg));
    }

    /// How long a connect to an endpoint may take.
    pub fn connect_timeout(&self) -> Duration {
        self.cfg.load().connect_timeout
    }

    /// Connections to `ep` that take calls, over every worker (`/api/endpoints`, metrics).
    pub fn connections(&self, ep: &Endpoint) -> usize {
        self.shards_of(ep).iter().map(|s| s.connections()).sum()
    }

    /// Connections opened to `ep` since its pool was made, over every worker.
    pub fn opened(&self, ep: &Endpoint) -> u64 {
        self.shards_of(ep)
            .iter()
            .map(|s| s.opened.load(Relaxed))
            .sum()
    }

    /// Every worker's shard for `ep`, taken out of the maps so that counting them holds up no
    /// worker.
    fn shards_of(&self, ep: &Endpoint) -> Vec<Arc<Shard>> {
        let mut shards = Vec::new();
        for w in &self.workers {
            let w = w.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = w.by_addr.get(&ep.addr) {
                shards.push(e.shard.clone());
                shards.extend(e.by_source.values().map(|s| s.shard.clone()));
            }
        }
        shards
    }

    /// Runs `f` on this worker's shard for `ep` and `source`, made on first use.
    fn with_shard<T>(
        &self,
        ep: &Arc<Endpoint>,
        source: Option<&Arc<Source>>,
        f: impl FnOnce(&Arc<Shard>) -> T,
    ) -> T {
        let worker = &self.workers[crate::workers::current() % self.workers.len()];
        let mut w = worker.lock().unwrap_or_else(|p| p.into_inner());
        f(w.shard(ep, source))
    }

    /// A pooled connection of `ep` with a free stream slot, if there is one now.
    pub fn lease_pooled(&self, ep: &Arc<Endpoint>) -> Option<Arc<Conn>> {
        self.lease_pooled_from(ep, None, None)
    }

    /// A pooled connection of `ep` from `source` (`None`: the node) with a free stream slot,
    /// if there is one now; `over`: the service's own pool settings.
    pub fn lease_pooled_from(
        &self,
        ep: &Arc<Endpoint>,
        source: Option<&Arc<Source>>,
        over: Option<&ConnectionPool>,
    ) -> Option<Arc<Conn>> {
        self.with_shard(ep, source, |s| {
            s.try_lease(&config_over(&self.cfg.load(), over))
        })
    }

    /// A connection to `ep` with room for one more call: a pooled one, or a new one (up to
    /// `pool.max_connections_per_endpoint` in this worker's shard).
    pub async fn lease(&self, ep: &Arc<Endpoint>) -> Result<Arc<Conn>, LeaseError> {
        self.lease_from(ep, None, None).await
    }

    /// [`Pools::lease`] for connections from `source` (`None`: the node's address), `over`:
    /// the service's own pool settings.
    pub async fn lease_from(
        &self,
        ep: &Arc<Endpoint>,
        source: Option<&Arc<Source>>,
        over: Option<&ConnectionPool>,
    ) -> Result<Arc<Conn>, LeaseError> {
        let shard = self.with_shard(ep, source, Arc::clone);
        let base = self.cfg.load_full();
        let cfg = config_over(&base, over);
        let cfg = &*cfg;
        if let Some(c) = shard.try_lease(cfg) {
            return Ok(c);
        }
        let _connecting = shard.connecting.lock().await;
        // Someone else may have connected while we waited.
        if let Some(c) = shard.try_lease(cfg) {
            return Ok(c);
        }
        if shard.connections() >= cfg.max_connections_per_endpoint {
            return Err(LeaseError::Full(ep.addr));
        }
        let conn = connect(ep, source.map(|s| &**s), cfg).await?;
        shard.opened.fetch_add(1, Relaxed);
        {
            // Its task ran between the endpoint's answer and now: it may have closed already
            // (a GOAWAY right after the handshake, say). A call put on it would have no reader.
            let st = conn.lock();
            if st.closed || st.going_away {
                return Err(ConnectError {
                    endpoint: ep.addr,
                    kind: ConnectErrorKind::ClosedAfterHandshake,
                }
                .into());
            }
        }
        shard.conns().push(conn.clone());
        Ok(conn)
    }
}

impl WorkerShards {
    /// The shard for `ep` and `source`, made on first use.
    fn shard(&mut self, ep: &Arc<Endpoint>, source: Option<&Arc<Source>>) -> &Arc<Shard> {
        if !self.by_addr.contains_key(&ep.addr) && self.by_addr.len() >= self.prune_at {
            self.by_addr.retain(|_, e| e.endpoint.strong_count() > 0);
            self.prune_at = (2 * self.by_addr.len()).max(PRUNE_MIN);
        }
        let e = self.by_addr.entry(ep.addr).or_insert_with(|| Entry {
            endpoint: Weak::new(),
            shard: Arc::default(),
            by_source: HashMap::default(),
        });
        // The store had dropped the endpoint at this address and made a new one since.
        if e.endpoint.strong_count() == 0 {
            e.endpoint = Arc::downgrade(ep);
        }
        let Some(source) = source else {
            return &e.shard;
        };
        let key = source.key();
        if !e.by_source.contains_key(&key) {
            // A pod new to this endpoint: the pods gone since leave first (their connections
            // close by themselves once idle).
            e.by_source.retain(|_, s| s.source.strong_count() > 0);
        }
        let s = e.by_source.entry(key).or_insert_with(|| SourceShard {
            source: Weak::new(),
            shard: Arc::default(),
        });
        if s.source.strong_count() == 0 {
            s.source = Arc::downgrade(source);
        }
        &s.shard
    }
}

/// One worker's relay connections to one endpoint, a shard of [`Pools`].
#[derive(Debug, Default)]
pub struct Shard {
    conns: Mutex<Vec<Arc<Conn>>>,
    /// Connects are serialized, so a burst of calls opens one connection, not one per call.
    connecting: tokio::sync::Mutex<()>,
    /// Connections opened.
    opened: AtomicU64,
}

impl Shard {
    /// Connections in the shard that take calls (closed and retired ones leave it on the
    /// next lease).
    pub fn connections(&self) -> usize {
        self.conns()
            .iter()
            .filter(|c| {
                let st = c.lock();
                !(st.closed || st.going_away || st.retired)
            })
            .count()
    }

    fn conns(&self) -> MutexGuard<'_, Vec<Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection with a free stream slot. Connections too old, or that carried their share
    /// of calls, are retired on the way: they leave the shard and close once their calls end.
    fn try_lease(&self, cfg: &PoolConfig) -> Option<Arc<Conn>> {
        let max_age = cfg.max_connection_age;
        let max_calls = cfg.max_calls_per_connection;
        let mut found = None;
        self.conns().retain(|c| {
            let mut st = c.lock();
            if st.closed || st.going_away || st.retired {
                return false;
            }
            let calls = u64::from(st.next_sid / 2);
            if (!max_age.is_zero() && st.created.elapsed() >= max_age)
                || (max_calls > 0 && calls >= max_calls)
                || st.next_sid >= LAST_SID
            {
                st.retired = true;
                st.wake();
                return false;
            }
            if found.is_none() && st.streams.len() < st.peer_max_streams {
                found = Some(c.clone());
            }
            true
        });
        found
    }
}

/// Why no connection to an endpoint could be had for a call.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Every connection of this worker's shard is at the endpoint's stream limit and the shard
    /// holds `max_connections_per_endpoint`. The call does not wait for a slot: that would
    /// stall its whole client connection (one task serves all its calls).
    #[error("endpoint {0}: every pooled connection full")]
    Full(SocketAddr),
    /// The connection could not be opened.
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

impl From<LeaseError> for AttemptError {
    fn from(e: LeaseError) -> Self {
        match e {
            LeaseError::Full(endpoint) => Self::Full(endpoint),
            LeaseError::Connect(e) => Self::Unreachable(Box::new(e)),
        }
    }
}

/// A connection to an endpoint that could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("endpoint {endpoint}: {kind}")]
pub struct ConnectError {
    /// The endpoint.
    pub endpoint: SocketAddr,
    /// What happened.
    pub kind: ConnectErrorKind,
}

/// What happened to a connection to an endpoint that could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectErrorKind {
    /// The TCP connect failed (refused, unreachable, ...).
    #[error("connect failed: {0}")]
    Tcp(#[source] io::Error),
    /// The connect and the HTTP/2 handshake took longer than `pool.connect_timeout_ms`.
    #[error("connect timed out after {0:?}")]
    TimedOut(Duration),
    /// The endpoint's connection ended before it answered HTTP/2 (its SETTINGS, then our
    /// PING's ACK).
    #[error("closed the connection before answering HTTP/2 ({0})")]
    ClosedBeforeHandshake(#[source] ConnectionEnded),
    /// The endpoint closed the connection, or sent GOAWAY, right after the handshake.
    #[error("closed the connection right after the handshake")]
    ClosedAfterHandshake,
}

/// Opens a connection to `ep`: TCP, the preface, our SETTINGS and a PING. It is ready once the
/// endpoint answered the PING: its SETTINGS came first, so its stream limit is known before a
/// call takes a slot, and a socket that only sits in the backlog of a server that stopped
/// accepting is never handed a call it would lose unprocessed.
async fn connect(
    ep: &Arc<Endpoint>,
    source: Option<&Source>,
    cfg: &PoolConfig,
) -> Result<Arc<Conn>, ConnectError> {
    let timeout = cfg.connect_timeout;
    let addr = ep.addr;
    let failed = |kind| ConnectError {
        endpoint: addr,
        kind,
    };
    let mut opened = None;
    let handshake = async {
        let mut sock = tcp_connect(addr, source)
            .await
            .map_err(|e| failed(ConnectErrorKind::Tcp(e)))?;
        let _ = sock.set_nodelay(true);
        let conn_window = i64::from(cfg.initial_connection_window);
        let mut st = State::new(
            Role::Client,
            conn_window,
            i64::from(cfg.initial_stream_window),
        );
        st.out.extend_from_slice(frame::PREFACE);
        frame::settings(
            &mut st.out,
            &[
                (setting::ENABLE_PUSH, 0),
                (setting::INITIAL_WINDOW_SIZE, cfg.initial_stream_window),
            ],
        );
        if conn_window > frame::DEFAULT_WINDOW {
            frame::window_update(&mut st.out, 0, (conn_window - frame::DEFAULT_WINDOW) as u32);
            st.recv_window = conn_window;
        }
        frame::ping(&mut st.out, false, READY_PING);
        let conn = Conn::new(st);
        opened = Some(conn.clone());
        let (ready, answered) = oneshot::channel();
        let mut up = Up {
            conn: conn.clone(),
            dec: hpack::Decoder::default(),
            fields: Fields::default(),
            block: HeaderBlock::default(),
            max_block: 1 << 20,
            credits: Vec::new(),
            ready: Some(ready),
            keepalive: Keepalive::new(cfg.keepalive_interval, cfg.keepalive_timeout),
            idle_timeout: cfg.idle_timeout,
        };
        tokio::spawn(async move {
            let why = up.run(&mut sock).await;
            debug!(endpoint = %addr, reason = %why, "endpoint connection closed");
            up.lost(&format!("endpoint {addr}: connection lost: {why}"));
            // Still waited for: the connection ended before the endpoint answered.
            if let Some(ready) = up.ready.take() {
                let _ = ready.send(Err(why));
            }
        });
        match answered.await {
            Ok(Ok(())) => Ok(conn),
            Ok(Err(why)) => Err(failed(ConnectErrorKind::ClosedBeforeHandshake(why))),
            Err(_) => Err(failed(ConnectErrorKind::ClosedBeforeHandshake(
                io::Error::other("the connection's task ended").into(),
            ))),
        }
    };
    match tokio::time::timeout(timeout, handshake).await {
        Ok(r) => r,
        Err(_) => {
            // Its task closes it: it will never take a call.
            if let Some(c) = opened {
                let mut st = c.lock();
                st.retired = true;
                st.wake();
            }
            Err(failed(ConnectErrorKind::TimedOut(timeout)))
        }
    }
}

/// A TCP connection to `addr` from `source`'s address, made in its namespace; from the node's
/// address without a source, or when the pod's socket cannot be made (the pod is gone, or the
/// agent lacks the capability: logged, and the call goes on from the node's address).
pub async fn tcp_connect(addr: SocketAddr, source: Option<&Source>) -> io::Result<TcpStream> {
    let Some(source) = source.filter(|s| s.ip.is_ipv4() == addr.is_ipv4()) else {
        return TcpStream::connect(addr).await;
    };
    match source.tcp_socket() {
        Ok(socket) => socket.connect(addr).await,
        Err(e) => {
            warn!(
                endpoint = %addr,
                source = %source.ip,
                error = %e,
                "cannot connect from the client pod's address; connecting from the node's"
            );
            TcpStream::connect(addr).await
        }
    }
}

struct Up {
    conn: Arc<Conn>,
    dec: hpack::Decoder,
    fields: Fields,
    block: HeaderBlock,
    /// The largest header block accepted.
    max_block: usize,
    credits: Vec<Credit>,
    /// Told when the endpoint answers the first PING, or why the connection ended before.
    ready: Option<oneshot::Sender<Result<(), ConnectionEnded>>>,
    keepalive: Option<Keepalive>,
    /// A connection without streams this long is closed (zero: never).
    idle_timeout: Duration,
}

impl Up {
    /// Reads the endpoint's frames until the connection ends; returns why it ended.
    async fn run(&mut self, sock: &mut TcpStream) -> ConnectionEnded {
        let mut rbuf = BytesMut::with_capacity(32 * 1024);
        // The idle check runs four times per idle timeout; with none, rarely.
        let idle_check = if self.idle_timeout.is_zero() {
            Duration::from_secs(3600)
        } else {
            (self.idle_timeout / 4).max(Duration::from_millis(10))
        };
        let next_tick = |keepalive: &Option<Keepalive>, now: Instant| {
            let idle = now + idle_check;
            keepalive.as_ref().map_or(idle, |k| idle.min(k.due()))
        };
        let mut idle_since: Option<(Instant, u32)> = None;
        let mut timer = Box::pin(tokio::time::sleep_until(next_tick(
            &self.keepalive,
            Instant::now(),
        )));
        loop {
            let io = tokio::select! {
                r = read_more(&self.conn, sock, &mut rbuf) => r,
                () = &mut timer => {
                    let now = Instant::now();
                    if let Some(k) = &mut self.keepalive
                        && k.due() <= now
                        && !k.fire(&self.conn)
                    {
                        return ConnectionEnded::KeepaliveTimeout;
                    }
                    if !self.idle_timeout.is_zero() {
                        let mut st = self.conn.lock();
                        if !st.streams.is_empty() {
                            idle_since = None;
                        } else {
                            // Idle since the first check that saw it idle, unless a call came
                            // and went in between (a new stream id).
                            let (since, sid) = *idle_since.get_or_insert((now, st.next_sid));
                            if sid != st.next_sid {
                                idle_since = Some((now, st.next_sid));
                            } else if now - since >= self.idle_timeout {
                                // Out of the pool's reach: `try_lease` skips it.
                                st.retired = true;
                            }
                        }
                    }
                    timer.as_mut().reset(next_tick(&self.keepalive, now));
                    continue;
                }
            };
            match io {
                Ok(Io::Eof) => return ConnectionEnded::PeerClosed,
                Ok(Io::Read) => {
                    if let Some(k) = &mut self.keepalive {
                        k.heard();
                    }
                }
                Ok(Io::Work) => {}
                Err(e) => return ConnectionEnded::Io(e),
            }
            while rbuf.len() >= frame::HEADER_LEN {
                let head = Head::parse(&rbuf);
                let total = frame::HEADER_LEN + head.len;
                // We advertise no SETTINGS_MAX_FRAME_SIZE to endpoints: the default holds.
                let handled = if head.len > frame::DEFAULT_MAX_FRAME as usize {
                    Err(ConnError::new(
                        Reason::FRAME_SIZE_ERROR,
                        format!(
                            "frame of {} bytes, limit {}",
                            head.len,
                            frame::DEFAULT_MAX_FRAME
                        ),
                    ))
                } else if rbuf.len() < total {
                    rbuf.reserve(total - rbuf.len());
                    break;
                } else {
                    self.frame(head, &rbuf[frame::HEADER_LEN..total])
                };
                if let Err(e) = handled {
                    {
                        let mut st = self.conn.lock();
                        frame::goaway(&mut st.out, 0, e.reason, e.message.as_bytes());
                    }
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        super::flush(&self.conn, &*sock),
                    )
                    .await;
                    return ConnectionEnded::Protocol(e);
                }
                rbuf.advance(total);
            }
            let (finished, going_away) = {
                let mut st = self.conn.lock();
                let finished = st.finished();
                if finished && !st.going_away {
                    frame::goaway(&mut st.out, 0, Reason::NO_ERROR, b"");
                }
                (finished, st.going_away)
            };
            if finished {
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), super::flush(&self.conn, &*sock))
                        .await;
                return if going_away {
                    ConnectionEnded::Drained
                } else {
                    ConnectionEnded::Retired
                };
            }
        }
    }

    fn frame(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        self.block.check(head.kind)?;
        match head.kind {
            kind::DATA => self.data(head, payload),
            kind::HEADERS | kind::CONTINUATION => {
                if self.block.frame(head, payload, self.max_block)? {
                    self.headers()
                } else {
                    Ok(())
                }
            }
            kind::RST_STREAM => {
                self.reset(head.stream, read::rst_reason(payload)?);
                Ok(())
            }
            kind::GOAWAY => {
                if payload.len() < 8 {
                    return Err(ConnError::new(Reason::FRAME_SIZE_ERROR, "short GOAWAY"));
                }
                let last =
                    u32::from_be_bytes(payload[..4].try_into().expect("4 bytes")) & 0x7fff_ffff;
                let reason = Reason(u32::from_be_bytes(
                    payload[4..8].try_into().expect("4 bytes"),
                ));
                debug!(%reason, debug = %String::from_utf8_lossy(&payload[8..]), last, "GOAWAY from the endpoint");
                self.goaway(last);
                Ok(())
            }
            kind::PING if head.flags & flag::ACK != 0 => {
                if payload == READY_PING {
                    if let Some(ready) = self.ready.take() {
                        let _ = ready.send(Ok(()));
                    }
                } else if let Some(k) = &mut self.keepalive {
                    k.pong(payload);
                }
                Ok(())
            }
            _ => connection_frame(&self.conn, head, payload, &mut self.credits).map(drop),
        }
    }

    fn data(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        let sid = head.stream;
        let end = head.flags & flag::END_STREAM != 0;
        let data = unpad(head.flags, payload)?;
        let mut st = self.conn.lock();
        st.received(sid, payload.len())?;
        st.credit_connection(payload.len());
        let Some(s) = st.streams.get_mut(&sid).filter(|s| !s.recv_done) else {
            st.credit(sid, payload.len());
            return Ok(());
        };
        let link = s.link.clone();
        let mut call = None;
        if let Some(c) = s.call.as_mut() {
            c.messages[1].feed(data);
            if end {
                call = s.call.take();
            }
        }
        let padding = payload.len() - data.len();
        if padding > 0 {
            st.credit(sid, padding);
        }
        if end {
            st.received_end(sid, &mut self.credits);
        }
        drop(st);
        let taken = match &link {
            Some(l) => l.conn.lock().send_data(l.sid, data, end, &mut self.credits),
            None => false,
        };
        if !taken {
            self.conn.lock().credit(sid, data.len());
        }
        apply(&mut self.credits);
        if let Some(c) = call {
            // A response that ends without trailers has no grpc-status.
            c.finish(End::Status("0"));
        }
        Ok(())
    }

    fn headers(&mut self) -> Result<(), ConnError> {
        let sid = self.block.sid;
        let end = self.block.end_stream;
        self.fields.clear();
        let fields = &mut self.fields;
        self.dec
            .decode(&self.block.block, usize::MAX, &mut |n, v| fields.push(n, v))
            .map_err(|e| ConnError::new(Reason::COMPRESSION_ERROR, e.to_string()))?;
        let mut st = self.conn.lock();
        let Some(s) = st.streams.get_mut(&sid).filter(|s| !s.recv_done) else {
            return Ok(());
        };
        let link = s.link.clone();
        // A trailers-only answer (a gRPC status before any message) reaches the client only
        // once the call layer decided not to try the call again; one that comes once the
        // call's deadline passed (the endpoint timed out with it) is the proxy's
        // DEADLINE_EXCEEDED, whichever timer ran first.
        let now = Instant::now();
        let late = end
            .then(|| {
                s.call
                    .as_ref()
                    .and_then(|c| c.late_answer(&self.fields, now))
            })
            .flatten();
        if end
            && let Some(c) = s.call.as_mut()
            && !c.responded
            && (late.is_some() || c.retry_answer(&self.fields, now))
        {
            let call = s.call.take().expect("checked");
            st.received_end(sid, &mut self.credits);
            drop(st);
            match (late, link) {
                (Some(status), Some(l)) => {
                    fail_stream(&mut l.conn.lock(), l.sid, &status, &mut self.credits);
                    apply(&mut self.credits);
                    call.finish(End::Status("4"));
                }
                (Some(_), None) => call.finish(End::Status("4")),
                (None, link) => {
                    apply(&mut self.credits);
                    hand_back(link, call);
                }
            }
            return Ok(());
        }
        let mut first = false;
        let mut call = None;
        if let Some(c) = s.call.as_mut() {
            if !c.responded {
                c.responded = true;
                // The endpoint took the call: no replay from here on.
                c.replay = None;
                c.guard.first_byte();
                first = true;
            }
            if end {
                call = s.call.take();
            }
        }
        if end {
            st.received_end(sid, &mut self.credits);
        }
        drop(st);
        if let Some(l) = &link {
            let mut down = l.conn.lock();
            if first {
                down.send_headers(l.sid, self.fields.iter(), end);
            } else {
                down.send_trailers(l.sid, &self.fields, &mut self.credits);
            }
        }
        apply(&mut self.credits);
        if let Some(c) = call {
            let status = self
                .fields
                .get(b"grpc-status")
                .map(|s| String::from_utf8_lossy(s));
            let status = status.as_deref().unwrap_or(if first { "2" } else { "0" });
            c.finish(End::Status(status));
        }
        Ok(())
    }

    /// The endpoint reset a stream: pass the reset to the client, or replay the call elsewhere
    /// if the endpoint refused it unprocessed.
    fn reset(&mut self, sid: u32, reason: Reason) {
        let removed = self.conn.lock().remove(sid);
        let Some(mut s) = removed else { return };
        if reason == Reason::REFUSED_STREAM {
            self.refused(s, "endpoint refused the stream (REFUSED_STREAM)");
        } else if retried(&mut s) {
            apply(&mut self.credits);
        } else {
            unlink(s, reason, End::Reset);
        }
    }

    /// The endpoint is going away: streams above `last` were not processed.
    fn goaway(&mut self, last: u32) {
        let refused: Vec<_> = {
            let mut st = self.conn.lock();
            st.going_away = true;
            let ids: Vec<u32> = st.streams.keys().copied().filter(|&id| id > last).collect();
            ids.into_iter().filter_map(|id| st.remove(id)).collect()
        };
        for s in refused {
            self.refused(
                s,
                "endpoint is shutting down: it refused the call unprocessed",
            );
        }
        apply(&mut self.credits);
    }

    /// A stream the endpoint did not process: its call goes back to the client's connection
    /// to be sent to another endpoint, if its request is still at hand (see
    /// [`super::call::Replay`]); otherwise it ends with UNAVAILABLE.
    fn refused(&mut self, s: Stream, why: &str) {
        let owed = s.uncredited();
        let Some(link) = s.link else {
            if let Some(c) = s.call {
                c.finish(End::Status("14"));
            }
            return;
        };
        let mut down = link.conn.lock();
        // Whatever waited here for window is in the replay, or lost with the call.
        if let Some(c) = owed {
            down.credit(c.sid, c.n);
        }
        let replayable = !down.closed
            && down.streams.get(&link.sid).is_some_and(|d| !d.send_done)
            && s.call.as_ref().is_some_and(|c| c.replay.is_some());
        if replayable && let Some(call) = s.call {
            if let Some(d) = down.streams.get_mut(&link.sid) {
                d.link = None;
            }
            down.replays.push(Replayed {
                sid: link.sid,
                call,
            });
            down.wake();
            return;
        }
        let status = Status::unavailable(format!(
            "{why}, and the call cannot be replayed (its response started or its request \
             outgrew the replay buffer)"
        ));
        fail_stream(&mut down, link.sid, &status, &mut self.credits);
        drop(down);
        apply(&mut self.credits);
        if let Some(c) = s.call {
            c.finish(End::Status("14"));
        }
    }

    /// The connection is gone: every call on it ends with UNAVAILABLE.
    fn lost(&mut self, why: &str) {
        let streams: Vec<_> = {
            let mut st = self.conn.lock();
            st.closed = true;
            st.streams.drain().map(|(_, s)| s).collect()
        };
        let status = Status::unavailable(why);
        for mut s in streams {
            if retried(&mut s) {
                continue;
            }
            let owed = s.uncredited();
            if let Some(l) = s.link {
                let mut down = l.conn.lock();
                if let Some(c) = owed {
                    down.credit(c.sid, c.n);
                }
                fail_stream(&mut down, l.sid, &status, &mut self.credits);
            }
            if let Some(c) = s.call {
                c.finish(End::Lost);
            }
        }
        apply(&mut self.credits);
    }
}

/// An endpoint's stream ended before its response (a reset, its connection lost): if the call
/// layer tries the call again, the call goes back to its client's connection and the window
/// of what waited here goes back to the client. Returns whether it did.
fn retried(s: &mut Stream) -> bool {
    let now = Instant::now();
    let Some(c) = s.call.as_mut() else {
        return false;
    };
    if c.responded || !c.retry(Outcome::Reset, None, now) {
        return false;
    }
    let call = s.call.take().expect("checked");
    if let (Some(owed), Some(l)) = (s.uncredited(), &s.link) {
        l.conn.lock().credit(owed.sid, owed.n);
    }
    hand_back(s.link.take(), call);
    true
}

/// Hands a call the call layer tries again back to its client's connection (`link`), to be
/// routed there; if the client went away or its stream is answered already, the call ends as
/// cancelled.
fn hand_back(link: Option<super::conn::Link>, call: Box<crate::call::Call>) {
    if let Some(l) = link {
        let mut down = l.conn.lock();
        if !down.closed
            && let Some(d) = down.streams.get_mut(&l.sid).filter(|d| !d.send_done)
        {
            d.link = None;
            down.replays.push(Replayed { sid: l.sid, call });
            down.wake();
            return;
        }
    }
    call.finish(End::Cancelled);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(i: usize) -> Arc<Endpoint> {
        Endpoint::new(
            format!("10.0.{}.{}:80", i / 250, i % 250 + 1)
                .parse()
                .unwrap(),
        )
    }

    #[test]
    fn an_endpoint_keeps_its_shard_and_a_gone_one_is_pruned() {
        let mut w = WorkerShards::default();
        let a = endpoint(0);
        let first = w.shard(&a, None).clone();
        assert!(
            Arc::ptr_eq(&first, w.shard(&a, None)),
            "one shard per endpoint"
        );
        // The store dropped the endpoint and made a new one at the same address before the
        // map was pruned: the new one takes the shard over, and it is not pruned.
        drop(a);
        let a = endpoint(0);
        assert!(Arc::ptr_eq(&first, w.shard(&a, None)));
        let gone: Vec<_> = (1..PRUNE_MIN).map(endpoint).collect();
        for e in &gone {
            w.shard(e, None);
        }
        drop(gone);
        assert_eq!(w.by_addr.len(), PRUNE_MIN);
        // The next endpoint new to the map prunes it: only the live ones stay.
        let b = endpoint(PRUNE_MIN);
        w.shard(&b, None);
        let mut live: Vec<_> = w.by_addr.keys().copied().collect();
        live.sort();
        assert_eq!(live, [a.addr, b.addr]);
        assert!(Arc::ptr_eq(&first, w.shard(&a, None)));
    }

    #[tokio::test]
    async fn leases_read_the_configuration_in_force_and_say_why_they_failed() {
        let pools = Pools::new(PoolConfig::default(), 1);
        // A port nothing listens on.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let ep = Endpoint::new(addr);
        let e = pools.lease(&ep).await.unwrap_err();
        assert!(
            matches!(
                &e,
                LeaseError::Connect(ConnectError {
                    endpoint,
                    kind: ConnectErrorKind::Tcp(_),
                }) if *endpoint == addr
            ),
            "{e:?}"
        );
        let message = AttemptError::from(e).to_string();
        assert!(
            message.starts_with(&format!("endpoint {addr}: connect failed: ")),
            "{message}"
        );
        // A new configuration: the next lease reads it.
        pools.set_config(PoolConfig {
            max_connections_per_endpoint: 0,
            ..PoolConfig::default()
        });
        assert_eq!(pools.config().max_connections_per_endpoint, 0);
        let e = pools.lease(&ep).await.unwrap_err();
        assert!(matches!(e, LeaseError::Full(a) if a == addr), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!("endpoint {addr}: every pooled connection full")
        );
    }

    #[tokio::test]
    async fn a_lease_makes_only_its_workers_shard() {
        let pools = Pools::new(PoolConfig::default(), 2);
        let ep = endpoint(0);
        assert!(pools.lease_pooled(&ep).is_none(), "no connection yet");
        assert_eq!(pools.connections(&ep), 0);
        // The lease made this worker's (worker 0's) shard for the endpoint; none elsewhere.
        assert_eq!(pools.shards_of(&ep).len(), 1);
    }
}
