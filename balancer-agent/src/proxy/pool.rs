//! Pooled HTTP/2 connections to one endpoint.
//!
//! A call leases a connection ([`Pool::lease`]); the lease counts it as active on that
//! connection until dropped. The pool prefers an existing connection with a free stream slot
//! (below the peer's SETTINGS_MAX_CONCURRENT_STREAMS), opens another when all are full (up to
//! `max_connections_per_endpoint`), and otherwise queues on the least busy one (h2's `ready()`
//! waits for a slot).
//!
//! The pool keeps one shard per data-plane worker (`crate::workers`): a call leases from its
//! worker's shard, so an upstream connection is driven by the thread whose calls use it and no
//! call wakes another thread. `max_connections_per_endpoint` applies to each shard, as Envoy's
//! per-worker pools do.
//!
//! Invariants:
//! - A connection leaves the pool's list when it is closed (peer GOAWAY, error, failed
//!   keepalive, idle timeout) or retired (max age or max calls); a retired connection finishes
//!   its calls and closes once its last lease and the list drop their handles, because the h2
//!   connection ends when no `SendRequest` remains and no stream is open.
//! - Connects to one endpoint are serialized, so a burst of calls opens one connection rather
//!   than one per call.
//! - A connection joins the pool only after the endpoint answered a PING on it. Its SETTINGS
//!   come first, so the pool knows the endpoint's stream limit before it leases a slot, and a
//!   socket that only sits in a listen backlog (a server that stopped accepting but has not
//!   closed its listener yet) is never handed a call it would lose.
//! - Each connection has a driver task (the h2 connection future, idle timeout) and, with
//!   keepalive on, a pinger task. Both hold only a `Weak` to the connection.
#![forbid(unsafe_code)]

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use bytes::Bytes;
use tokio::{net::TcpStream, sync::Notify, time::Instant};
use tracing::debug;

use crate::{
    config::{PoolConfig, ms},
    workers,
};

/// Why a connection to an endpoint could not be had.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// TCP connect failed.
    #[error("endpoint {addr}: connect failed: {source}")]
    Connect {
        /// The endpoint.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// TCP connect or HTTP/2 handshake took too long.
    #[error("endpoint {addr}: connect timed out after {timeout:?}")]
    Timeout {
        /// The endpoint.
        addr: SocketAddr,
        /// The limit.
        timeout: Duration,
    },
    /// The HTTP/2 handshake failed.
    #[error("endpoint {addr}: HTTP/2 handshake failed: {source}")]
    Handshake {
        /// The endpoint.
        addr: SocketAddr,
        /// The cause.
        source: h2::Error,
    },
    /// The endpoint closed the connection before it answered the first PING.
    #[error("endpoint {addr}: closed the connection before answering HTTP/2")]
    Closed {
        /// The endpoint.
        addr: SocketAddr,
    },
}

/// One pooled connection.
#[derive(Debug)]
struct Conn {
    send: h2::client::SendRequest<Bytes>,
    active: AtomicUsize,
    calls: AtomicU64,
    created: Instant,
    /// When the last call ended (ms since `created`).
    idle_since_ms: AtomicU64,
    closed: AtomicBool,
    shutdown: Notify,
}

impl Conn {
    fn is_open(&self) -> bool {
        !self.closed.load(Relaxed)
    }

    fn close(&self) {
        self.closed.store(true, Relaxed);
        self.shutdown.notify_one();
    }

    fn has_room(&self) -> bool {
        self.active.load(Relaxed) < self.send.current_max_send_streams()
    }
}

/// A leased connection: the call's right to open a stream on it.
#[derive(Debug)]
pub struct Lease {
    conn: Arc<Conn>,
}

impl Lease {
    /// A handle to send the call's request on.
    pub fn sender(&self) -> h2::client::SendRequest<Bytes> {
        self.conn.send.clone()
    }

    /// Marks the connection unusable (the call saw it fail), so no further call picks it.
    pub fn broken(&self) {
        self.conn.close();
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Relaxed) == 1 {
            let ms = self.conn.created.elapsed().as_millis() as u64;
            self.conn.idle_since_ms.store(ms, Relaxed);
        }
    }
}

/// The pool of one endpoint.
#[derive(Debug)]
pub struct Pool {
    addr: SocketAddr,
    cfg: Arc<PoolConfig>,
    shards: Box<[Shard]>,
    opened: AtomicU64,
}

/// One worker's connections to the endpoint.
#[derive(Debug, Default)]
struct Shard {
    conns: Mutex<Vec<Arc<Conn>>>,
    connecting: tokio::sync::Mutex<()>,
    /// The frame relay's connections (`crate::relay::up`).
    relay: crate::relay::up::Shard,
}

impl Pool {
    /// An empty pool for `addr`.
    pub fn new(addr: SocketAddr, cfg: Arc<PoolConfig>) -> Self {
        Self {
            addr,
            cfg,
            shards: (0..workers::count()).map(|_| Shard::default()).collect(),
            opened: AtomicU64::new(0),
        }
    }

    /// The pool's configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    /// How long a connect may take.
    pub fn connect_timeout(&self) -> Duration {
        ms(self.cfg.connect_timeout_ms)
    }

    /// Open connections in the pool, over every worker and both engines.
    pub fn connections(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.len() + s.relay.connections())
            .sum()
    }

    /// This worker's shard of frame-relay connections.
    pub fn relay_shard(&self) -> &crate::relay::up::Shard {
        &self.shard().relay
    }

    /// A connection was opened by the frame relay.
    pub fn count_opened(&self) {
        self.opened.fetch_add(1, Relaxed);
    }

    /// This worker's shard.
    fn shard(&self) -> &Shard {
        &self.shards[workers::current() % self.shards.len()]
    }

    /// Connections opened since start.
    pub fn opened(&self) -> u64 {
        self.opened.load(Relaxed)
    }

    /// A connection for one call.
    pub async fn lease(&self) -> Result<Lease, Error> {
        let shard = self.shard();
        if let Some(lease) = self.try_lease(shard, false) {
            return Ok(lease);
        }
        let _connecting = shard.connecting.lock().await;
        // Someone else may have connected while we waited.
        if let Some(lease) = self.try_lease(shard, false) {
            return Ok(lease);
        }
        if shard.len() >= self.cfg.max_connections_per_endpoint
            && let Some(lease) = self.try_lease(shard, true)
        {
            return Ok(lease);
        }
        let conn = self.connect().await?;
        let lease = Self::take(&conn);
        shard
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
        Ok(lease)
    }

    /// A lease on an existing connection: one with room, or with `queue`, the least busy one.
    fn try_lease(&self, shard: &Shard, queue: bool) -> Option<Lease> {
        let mut conns = shard.conns.lock().unwrap_or_else(|p| p.into_inner());
        let max_age = ms(self.cfg.max_connection_age_ms);
        let max_calls = self.cfg.max_calls_per_connection;
        conns.retain(|c| {
            c.is_open()
                && (max_age.is_zero() || c.created.elapsed() < max_age)
                && (max_calls == 0 || c.calls.load(Relaxed) < max_calls)
        });
        let conn = if queue {
            conns.iter().min_by_key(|c| c.active.load(Relaxed))
        } else {
            // The busiest connection with room: keeps the number of connections low.
            conns
                .iter()
                .filter(|c| c.has_room())
                .max_by_key(|c| c.active.load(Relaxed))
        }?;
        Some(Self::take(conn))
    }

    fn take(conn: &Arc<Conn>) -> Lease {
        conn.active.fetch_add(1, Relaxed);
        conn.calls.fetch_add(1, Relaxed);
        Lease { conn: conn.clone() }
    }

    async fn connect(&self) -> Result<Arc<Conn>, Error> {
        let addr = self.addr;
        let timeout = ms(self.cfg.connect_timeout_ms);
        let handshake = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|source| Error::Connect { addr, source })?;
            let _ = tcp.set_nodelay(true);
            let (send, mut connection) = h2::client::Builder::new()
                .initial_window_size(self.cfg.initial_stream_window)
                .initial_connection_window_size(self.cfg.initial_connection_window)
                .max_frame_size(16 * 1024)
                .max_header_list_size(64 * 1024)
                .max_concurrent_reset_streams(256)
                .max_send_buffer_size(1024 * 1024)
                .enable_push(false)
                .handshake::<_, Bytes>(tcp)
                .await
                .map_err(|source| Error::Handshake { addr, source })?;
            // h2's handshake returns once the client preface is written, before the endpoint
            // said anything. Wait for its answer to a PING (which follows its SETTINGS): a
            // call sent on a connection the endpoint never serves (it stopped accepting, the
            // socket sits in its backlog until the listener closes and resets it) would be
            // lost with no sign that it was unprocessed, and a burst of calls would all queue
            // on this connection before its SETTINGS_MAX_CONCURRENT_STREAMS is known.
            let mut ping_pong = connection.ping_pong().expect("taken once, here");
            tokio::select! {
                r = &mut connection => return Err(match r {
                    Err(source) => Error::Handshake { addr, source },
                    Ok(()) => Error::Closed { addr },
                }),
                r = ping_pong.ping(h2::Ping::opaque()) => {
                    r.map_err(|source| Error::Handshake { addr, source })?;
                }
            }
            Ok((send, connection, ping_pong))
        };
        let (send, connection, ping_pong) = tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| Error::Timeout { addr, timeout })??;
        self.opened.fetch_add(1, Relaxed);
        let conn = Arc::new(Conn {
            send,
            active: AtomicUsize::new(0),
            calls: AtomicU64::new(0),
            created: Instant::now(),
            idle_since_ms: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            shutdown: Notify::new(),
        });
        if self.cfg.keepalive_interval_ms > 0 {
            tokio::spawn(keepalive(
                ping_pong,
                Arc::downgrade(&conn),
                ms(self.cfg.keepalive_interval_ms),
                ms(self.cfg.keepalive_timeout_ms),
            ));
        }
        tokio::spawn(drive(
            connection,
            Arc::downgrade(&conn),
            addr,
            ms(self.cfg.idle_timeout_ms),
        ));
        debug!(%addr, "connected to endpoint");
        Ok(conn)
    }
}

impl Shard {
    /// Connections in the shard that take calls (closed ones leave it on the next lease).
    fn len(&self) -> usize {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.iter().filter(|c| c.is_open()).count()
    }
}

/// Runs the h2 connection until it ends, it is told to shut down, or it stays idle too long.
async fn drive(
    mut connection: h2::client::Connection<TcpStream, Bytes>,
    conn: Weak<Conn>,
    addr: SocketAddr,
    idle_timeout: Duration,
) {
    let check = if idle_timeout.is_zero() {
        Duration::from_secs(3600)
    } else {
        (idle_timeout / 2).max(Duration::from_millis(100))
    };
    let shutdown = async {
        loop {
            let Some(c) = conn.upgrade() else {
                // Dropped by everyone: the connection finishes by itself.
                return std::future::pending().await;
            };
            tokio::select! {
                _ = c.shutdown.notified() => return,
                _ = tokio::time::sleep(check) => {}
            }
            let active = c.active.load(Relaxed);
            let idle_for = c
                .created
                .elapsed()
                .saturating_sub(Duration::from_millis(c.idle_since_ms.load(Relaxed)));
            if !idle_timeout.is_zero() && active == 0 && idle_for >= idle_timeout {
                c.closed.store(true, Relaxed);
                // A lease taken between the two loads sees `closed` on its next use.
                if c.active.load(Relaxed) == 0 {
                    debug!(%addr, "closing idle connection");
                    return;
                }
            }
        }
    };
    tokio::select! {
        r = &mut connection => {
            if let Err(e) = r {
                debug!(%addr, error = %e, "endpoint connection ended");
            }
        }
        () = shutdown => {}
    }
    if let Some(c) = conn.upgrade() {
        c.closed.store(true, Relaxed);
    }
}

/// Sends a PING every `interval`; a PING unanswered within `timeout` closes the connection.
async fn keepalive(
    mut ping_pong: h2::PingPong,
    conn: Weak<Conn>,
    interval: Duration,
    timeout: Duration,
) {
    loop {
        tokio::time::sleep(interval).await;
        let Some(c) = conn.upgrade() else { return };
        if !c.is_open() {
            return;
        }
        drop(c);
        match tokio::time::timeout(timeout, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            _ => {
                if let Some(c) = conn.upgrade() {
                    c.close();
                }
                return;
            }
        }
    }
}
