//! The configuration file as a discovery source, reloaded when it changes.
//!
//! The file is polled (every second by default) rather than watched with inotify: Kubernetes
//! updates a mounted ConfigMap by swapping a symlink, which inotify watchers of the file miss,
//! and a stat per second costs nothing. A new file that fails validation is refused with one
//! log line listing every problem, and the configuration in force stays.
#![forbid(unsafe_code)]

use std::{path::PathBuf, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use tracing::{error, info, warn};

use crate::{
    config::Config,
    metrics::Metrics,
    state::{ServiceSpec, Store, Update},
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

/// Watches `path`; applies every valid change to `store` and `current`.
pub async fn watch(
    path: PathBuf,
    interval: Duration,
    store: Arc<Store>,
    current: Arc<ArcSwap<Config>>,
    metrics: Arc<Metrics>,
) {
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
        match Config::from_yaml(&text, &path.display().to_string()) {
            Ok(new) => {
                let old = current.load_full();
                if new.listeners != old.listeners
                    || new.admin != old.admin
                    || new.limits != old.limits
                    || new.datapath != old.datapath
                {
                    warn!(
                        "listeners, admin, limits and datapath changes take effect at the next restart; services reload now"
                    );
                }
                store.apply(update_of(&new));
                current.store(Arc::new(new));
                metrics.config_reloads.with_label_values(&["ok"]).inc();
                info!(path = %path.display(), "configuration reloaded");
            }
            Err(e) => {
                metrics
                    .config_reloads
                    .with_label_values(&["rejected"])
                    .inc();
                error!("configuration refused, the previous one stays in force: {e}");
            }
        }
    }
}
