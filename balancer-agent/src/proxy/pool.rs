//! The pool of one endpoint: its configuration, its connection counts, and one shard of
//! frame-relay connections (`crate::relay::up`, which opens, leases and retires them) per
//! data-plane worker.
//!
//! A call leases from its worker's shard (`crate::workers`), so an upstream connection is driven
//! by the thread whose calls use it and no call wakes another thread.
//! `max_connections_per_endpoint` applies to each shard, as Envoy's per-worker pools do.
#![forbid(unsafe_code)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use crate::{
    config::{PoolConfig, ms},
    relay::up::Shard,
    workers,
};

/// The pool of one endpoint.
#[derive(Debug)]
pub struct Pool {
    cfg: Arc<PoolConfig>,
    shards: Box<[Shard]>,
    opened: AtomicU64,
}

impl Pool {
    /// An empty pool.
    pub fn new(cfg: Arc<PoolConfig>) -> Self {
        Self {
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

    /// Open connections in the pool, over every worker.
    pub fn connections(&self) -> usize {
        self.shards.iter().map(Shard::connections).sum()
    }

    /// This worker's shard of frame-relay connections.
    pub fn relay_shard(&self) -> &Shard {
        &self.shards[workers::current() % self.shards.len()]
    }

    /// A connection was opened by the frame relay.
    pub fn count_opened(&self) {
        self.opened.fetch_add(1, Relaxed);
    }

    /// Connections opened since start.
    pub fn opened(&self) -> u64 {
        self.opened.load(Relaxed)
    }
}
