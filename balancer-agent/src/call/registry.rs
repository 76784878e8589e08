//! Live client connections and the calls in flight on them, for `inspect connections` and
//! `inspect calls`. Calls are registered per connection, under that connection's own lock, so
//! calls on different connections never contend.
#![forbid(unsafe_code)]

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, SystemTime},
};

use foldhash::{HashMap, HashMapExt};
use serde::Serialize;
use tokio::time::Instant;

use super::{Target, route::SourceIdentity};

/// A client connection.
#[derive(Debug)]
pub struct ConnInfo {
    /// Unique id.
    pub id: u64,
    /// The client's address.
    pub peer: SocketAddr,
    /// The address it connected to (the listener, or the proxy address after a redirect).
    pub local: SocketAddr,
    /// What selects its service.
    pub target: String,
    /// The client pod, when the agent knows it (a pod of this node): route and authorization
    /// rules on the caller match it.
    pub source: Option<Arc<SourceIdentity>>,
    /// When it was accepted.
    pub opened: SystemTime,
    /// Calls it has made.
    pub calls_total: AtomicU64,
    calls: Mutex<HashMap<u64, CallInfo>>,
    next_call: AtomicU64,
}

/// A call in flight.
#[derive(Debug, Clone)]
struct CallInfo {
    path: http::uri::PathAndQuery,
    service: Option<Arc<str>>,
    endpoint: Option<SocketAddr>,
    started: Instant,
}

/// A call's registration; removes the call when dropped.
#[derive(Debug)]
pub struct CallHandle {
    conn: Arc<ConnInfo>,
    id: u64,
}

impl CallHandle {
    /// Records the service and endpoint the call was sent to.
    pub fn routed(&self, service: &Arc<str>, endpoint: SocketAddr) {
        if let Some(c) = self
            .conn
            .calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&self.id)
        {
            c.service = Some(service.clone());
            c.endpoint = Some(endpoint);
        }
    }
}

impl Drop for CallHandle {
    fn drop(&mut self) {
        self.conn
            .calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl ConnInfo {
    /// Registers a call on this connection.
    pub fn start_call(self: &Arc<Self>, path: Option<&http::uri::PathAndQuery>) -> CallHandle {
        let id = self.next_call.fetch_add(1, Relaxed);
        self.calls_total.fetch_add(1, Relaxed);
        let info = CallInfo {
            path: path
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
            service: None,
            endpoint: None,
            started: Instant::now(),
        };
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, info);
        CallHandle {
            conn: self.clone(),
            id,
        }
    }
}

/// Every live connection.
#[derive(Debug, Default)]
pub struct Registry {
    conns: Mutex<HashMap<u64, Arc<ConnInfo>>>,
    next: AtomicU64,
}

/// A connection as the admin API shows it.
#[derive(Debug, Serialize)]
pub struct ConnectionView {
    /// Unique id.
    pub id: u64,
    /// Client address.
    pub peer: String,
    /// Local address.
    pub local: String,
    /// What selects its service.
    pub target: String,
    /// Seconds since it was accepted.
    pub age_seconds: f64,
    /// Calls in flight on it.
    pub active_calls: usize,
    /// Calls it made.
    pub calls_total: u64,
}

/// A call as the admin API shows it.
#[derive(Debug, Serialize)]
pub struct CallView {
    /// The connection it came on.
    pub connection: u64,
    /// Client address.
    pub peer: String,
    /// `/package.Service/Method`.
    pub method: String,
    /// The service it was routed to.
    pub service: Option<String>,
    /// The endpoint it was sent to.
    pub endpoint: Option<String>,
    /// Seconds since it started.
    pub age_seconds: f64,
}

impl Registry {
    /// Registers a new connection.
    pub fn open_connection(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
        target: &Target,
    ) -> Arc<ConnInfo> {
        self.open_connection_from(peer, local, target, None)
    }

    /// [`Registry::open_connection`] for a connection whose client pod is known.
    pub fn open_connection_from(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
        target: &Target,
        source: Option<Arc<SourceIdentity>>,
    ) -> Arc<ConnInfo> {
        let id = self.next.fetch_add(1, Relaxed) + 1;
        let info = Arc::new(ConnInfo {
            id,
            peer,
            local,
            target: target.describe(),
            source,
            opened: SystemTime::now(),
            calls_total: AtomicU64::new(0),
            calls: Mutex::new(HashMap::new()),
            next_call: AtomicU64::new(0),
        });
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, info.clone());
        info
    }

    /// Forgets a closed connection.
    pub fn close_connection(&self, info: &ConnInfo) {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&info.id);
    }

    fn all(&self) -> Vec<Arc<ConnInfo>> {
        let mut v: Vec<_> = self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// Every live connection.
    pub fn connections(&self) -> Vec<ConnectionView> {
        self.all()
            .iter()
            .map(|c| ConnectionView {
                id: c.id,
                peer: c.peer.to_string(),
                local: c.local.to_string(),
                target: c.target.clone(),
                age_seconds: c.opened.elapsed().unwrap_or(Duration::ZERO).as_secs_f64(),
                active_calls: c.calls.lock().unwrap_or_else(|p| p.into_inner()).len(),
                calls_total: c.calls_total.load(Relaxed),
            })
            .collect()
    }

    /// Every call in flight.
    pub fn calls(&self) -> Vec<CallView> {
        let mut out = Vec::new();
        for c in self.all() {
            let calls = c.calls.lock().unwrap_or_else(|p| p.into_inner());
            for call in calls.values() {
                out.push(CallView {
                    connection: c.id,
                    peer: c.peer.to_string(),
                    method: call.path.path().to_string(),
                    service: call.service.as_deref().map(str::to_string),
                    endpoint: call.endpoint.map(|e| e.to_string()),
                    age_seconds: call.started.elapsed().as_secs_f64(),
                });
            }
        }
        out
    }
}
