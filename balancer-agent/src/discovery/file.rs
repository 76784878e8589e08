//! The configuration file as a discovery source, reloaded when it changes.
//!
//! The file is polled (every second by default) rather than watched with inotify: Kubernetes
//! updates a mounted ConfigMap by swapping a symlink, which inotify watchers of the file miss,
//! and a stat per second costs nothing. A new file that fails validation is refused with one
//! log line listing every problem, and the configuration in force stays.
//!
//! A valid file is put in force section by section ([`Config::reload`]): `services`,
//! `routes`, `limits` and `pool` at once; `listeners`, `admin` and `datapath` are used once at start,
//! so a change to them is not put in force: it is logged as waiting for a restart, counted
//! (`balancer_config_reloads_total{result="restart_required"}`,
//! `balancer_config_restart_required{section}`), and the configuration in force
//! (`/config_dump`) keeps the values the agent runs with.
#![forbid(unsafe_code)]

use std::{path::PathBuf, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use tracing::{error, info, warn};

use crate::{
    call::{Calls, route::PolicySet},
    config::{Config, Section},
    relay::up::Pools,
    state::{ServiceSpec, Source, Update},
};

/// The store update that makes it serve exactly the file's services.
pub fn update_of(config: &Config) -> Update {
    Update::Reset(
        config
            .services
            .iter()
            .map(ServiceSpec::from_config)
            .collect(),
    )
}

/// Puts the file's `routes` section in force as the file's traffic policy (at start, and on
/// each reload: a section that did not change is not rebuilt).
pub fn apply_routes(config: &Config, calls: &Calls) {
    calls
        .router
        .set(Source::File, PolicySet::from_config(&config.routes));
}

/// Watches `path`; puts every valid change in force: the services in the store, the limits
/// in the call layer, the pool settings in the pools and the balancers, and the configuration
/// in force in `current`.
pub async fn watch(
    path: PathBuf,
    interval: Duration,
    current: Arc<ArcSwap<Config>>,
    calls: Arc<Calls>,
    pools: Arc<Pools>,
) {
    let metrics = calls.metrics.clone();
    let mut last_text = std::fs::read_to_string(&path).ok();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => t,
            Err(e) => {
                if last_text.is_some() {
                    warn!(path = %path.display(), error = %e, "cannot read the configuration; keeping the one in force");
                    last_text = None;
                }
                continue;
            }
        };
        if last_text.as_deref() == Some(text.as_str()) {
            continue;
        }
        last_text = Some(text.clone());
        let source = path.display().to_string();
        let reload = Config::from_yaml(&text, &source).and_then(|file| {
            current
                .load()
                .reload(file)
                .map_err(|problems| crate::config::Error {
                    source_name: source.clone(),
                    problems,
                })
        });
        let reload = match reload {
            Ok(r) => r,
            Err(e) => {
                metrics
                    .config_reloads
                    .with_label_values(&["rejected"])
                    .inc();
                error!("configuration refused, the previous one stays in force: {e}");
                continue;
            }
        };
        apply_live(&reload.in_force, &calls, &pools);
        current.store(Arc::new(reload.in_force));
        for s in Section::ALL.into_iter().filter(|s| !s.live()) {
            let waits = reload.restart_required.contains(&s);
            metrics
                .config_restart_required
                .with_label_values(&[s.name()])
                .set(i64::from(waits));
        }
        let applied = Section::join(&reload.applied);
        if reload.restart_required.is_empty() {
            metrics.config_reloads.with_label_values(&["ok"]).inc();
            info!(path = %path.display(), applied = %applied, "configuration reloaded");
        } else {
            metrics
                .config_reloads
                .with_label_values(&["restart_required"])
                .inc();
            let waiting = Section::join(&reload.restart_required);
            warn!(
                path = %path.display(),
                applied = %applied,
                restart_required = %waiting,
                "configuration reloaded in part: the file changes {waiting}, which take effect at \
                 the next restart; until then the values in force stay (/config_dump shows them)"
            );
        }
    }
}

/// Puts the live sections of `config` in force: the services in the store, the pool
/// settings in the pools and the store's balancers, the limits in the call layer. Sections
/// that did not change are the same values again: nothing is rebuilt for them.
fn apply_live(config: &Config, calls: &Calls, pools: &Pools) {
    calls.store.apply(update_of(config));
    apply_routes(config, calls);
    calls.store.set_pool(&config.pool);
    calls.store.set_locality(&config.locality);
    pools.set_config(config.pool.clone());
    calls.set_limits(config.limits.clone());
}
