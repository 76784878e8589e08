//! Keeping the datapath in step with the agent: loading it from the configuration, renewing
//! its lease, and writing the store's VIPs and the configured cgroups into its maps.
#![forbid(unsafe_code)]

use std::{collections::HashSet, net::SocketAddr, sync::Arc};

use anyhow::{Context, bail};
use tracing::{error, warn};

use super::{Datapath, HEARTBEAT, Options, cgroup};
use crate::{config::Config, state::Store};

/// Loads and attaches the datapath the configuration describes, redirecting at once (a lone
/// agent).
pub fn load(config: &Config) -> anyhow::Result<Datapath> {
    load_with(config, true)
}

/// Loads and attaches the datapath with this agent's redirect off: its slot is live, the
/// maps it shares with another agent are left as they are, and nothing is sent to it until
/// [`Datapath::set_redirect`]`(true)` (the handover protocol, see [`super`]).
pub fn load_idle(config: &Config) -> anyhow::Result<Datapath> {
    load_with(config, false)
}

fn load_with(config: &Config, redirect_at_start: bool) -> anyhow::Result<Datapath> {
    let d = &config.datapath;
    let cgroup_root = match &d.cgroup_root {
        Some(root) => root.clone(),
        None => cgroup::v2_mount().context("finding the cgroup v2 mount")?,
    };
    let Some(proxy) = d.proxy_address else {
        bail!("datapath.proxy_address must be an IPv4 IP:port");
    };
    Ok(Datapath::load(Options {
        cgroup_root,
        proxy,
        proxy6: d.proxy_address_v6,
        pin_dir: d.pin_path.clone(),
        shortcut: d.shortcut,
        redirect_at_start,
    })?)
}

/// Renews the datapath lease; run it on the data-plane runtime, so that a stuck data plane
/// stops renewing it and pods fail open.
pub async fn heartbeat(dp: Arc<Datapath>) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        tick.tick().await;
        dp.heartbeat();
    }
}

/// The ids of the configured opted-in cgroups (paths relative to the cgroup root) that exist.
pub fn configured_cgroup_ids(dp: &Datapath, paths: &[String]) -> HashSet<u64> {
    paths
        .iter()
        .filter_map(|p| {
            let path = dp.cgroup_root().join(p.trim_start_matches('/'));
            match cgroup::id(&path) {
                Ok(id) => Some(id),
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "opted-in cgroup not found");
                    None
                }
            }
        })
        .collect()
}

/// Keeps the datapath's services and opted-in maps equal to the store and configuration.
pub async fn services(dp: Arc<Datapath>, store: Arc<Store>, opted_in: Vec<String>) {
    let ids = configured_cgroup_ids(&dp, &opted_in);
    if let Err(e) = dp.sync_opted_in(&ids) {
        error!("datapath: {e}");
    }
    let mut changes = store.subscribe();
    loop {
        let snap = store.snapshot();
        let vips: Vec<(SocketAddr, u32)> = snap
            .services
            .values()
            .flat_map(|s| s.spec.vips.iter().map(move |v| (*v, s.id)))
            .collect();
        if let Err(e) = dp.sync_services(&vips) {
            error!("datapath: {e}");
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}
