//! Wiring: configuration, store, discovery, datapath, proxy listeners and the admin server.
//!
//! The data plane (listeners, calls, pools, and the datapath heartbeat, so that a stuck data
//! plane stops renewing the lease and pods fail open) runs on single-threaded workers, one per
//! core (`workers`), worker 0 on the main thread; control work (discovery, admin, metrics) runs
//! on a current-thread runtime of its own thread, as ztunnel separates them, so a burst of
//! control work never steals the data plane's cores and a stuck control plane never stops
//! calls.
#![forbid(unsafe_code)]

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::{net::TcpListener, sync::watch};
use tracing::{error, info, warn};

use crate::{
    admin::{self, Admin, Readiness},
    call::Calls,
    config::Config,
    discovery,
    ebpf::{self, Datapath},
    metrics::Metrics,
    proxy::{self, OrigDstLookup, Proxy},
    relay::up::Pools,
    state::Store,
    workers::{self, Workers},
};

/// How `balancer-agent run` was asked to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The configuration file.
    pub config: PathBuf,
    /// How often the file is checked for changes.
    pub reload_interval: Duration,
    /// How long a drain may take on SIGTERM before the agent exits anyway.
    pub drain_timeout: Duration,
    /// Kubernetes discovery, when enabled.
    pub kubernetes: Option<KubernetesOptions>,
    /// Data-plane workers (0: one per CPU this process may use).
    pub workers: usize,
}

/// `--kubernetes`, `--kubeconfig`, `--node-name`.
#[derive(Clone, Debug)]
pub struct KubernetesOptions {
    /// A kubeconfig file; `None` for the in-cluster configuration.
    pub kubeconfig: Option<PathBuf>,
    /// This node's name.
    pub node_name: Option<String>,
}

/// Runs the agent until SIGTERM or SIGINT, then drains.
pub fn run(opts: RunOptions) -> anyhow::Result<()> {
    let config = Config::from_file(&opts.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    info!(config = %serde_json::to_string(&config).unwrap_or_default(), "starting");

    let (data_plane, workers) = Workers::start(workers::resolve(opts.workers))?;
    info!(workers = workers.count(), "data-plane workers started");
    let store = Store::new(config.pool.clone());
    store.set_node_name(opts.kubernetes.as_ref().and_then(|k| k.node_name.clone()));
    store.set_locality(&config.locality);
    store.apply(discovery::file::update_of(&config));
    // The relay's endpoint pools: one shard per endpoint and worker.
    let pools = Pools::new(config.pool.clone(), workers.count());
    let metrics = Metrics::with_connections(
        store.clone(),
        config.limits.max_methods_per_service,
        Box::new({
            let pools = pools.clone();
            move |ep| pools.connections(ep)
        }),
    );
    let current = Arc::new(ArcSwap::from_pointee(config.clone()));
    let readiness = Readiness::new(&["listeners not bound"]);

    let datapath = if config.datapath.enabled {
        Some(Arc::new(ebpf::sync::load(&config)?))
    } else {
        None
    };

    let (drain_tx, drain_rx) = watch::channel(false);
    let orig_dst = datapath.clone().map(|d| d as Arc<dyn OrigDstLookup>);
    let calls = Calls::new(store.clone(), metrics.clone(), config.limits.clone());
    discovery::file::apply_routes(&config, &calls);
    // Endpoint connections of redirected calls from the client pod's address.
    let sources = (config.datapath.enabled
        && config.datapath.source_address == crate::config::SourceAddress::Pod)
        .then(|| proxy::Sources::new(config.datapath.proc_root.clone()));
    let proxy = Proxy::new(calls, pools, orig_dst, sources, workers.clone(), drain_rx);

    // Kubernetes discovery: its client configuration is checked now, so that a bad kubeconfig
    // fails the start; it runs on the control runtime and holds readiness until it synced.
    let (opted_in_tx, opted_in_rx) = watch::channel(Arc::default());
    let kube = match &opts.kubernetes {
        Some(k) => {
            let (kopts, kconfig) = data_plane.block_on(kube_setup(k, &config))?;
            readiness.block(discovery::kube::NOT_SYNCED);
            Some((kopts, kconfig))
        }
        None => None,
    };

    // Bind everything before reporting ready, so a port clash fails the start.
    let listeners: Vec<(TcpListener, proxy::Listener)> = data_plane.block_on(async {
        let mut v = Vec::new();
        for l in &config.listeners {
            let addr = l.address;
            let tcp = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding listener {} on {addr}", l.name))?;
            info!(listener = %l.name, %addr, "listening");
            v.push((
                tcp,
                proxy::Listener {
                    name: l.name.as_str().into(),
                    default_service: l.default_service.as_deref().map(Into::into),
                },
            ));
        }
        anyhow::Ok(v)
    })?;
    for (tcp, l) in listeners {
        data_plane.spawn(proxy.clone().serve(tcp, l));
    }
    readiness.resolve("listeners not bound");

    if let Some(dp) = &datapath {
        data_plane.spawn(ebpf::sync::heartbeat(dp.clone()));
        data_plane.spawn(ebpf::sync::services(
            dp.clone(),
            store.clone(),
            config.datapath.opted_in_cgroups.clone(),
        ));
        if kube.is_some() {
            data_plane.spawn(sync_opted_in_pods(
                dp.clone(),
                config.datapath.opted_in_cgroups.clone(),
                opted_in_rx.clone(),
            ));
        }
    }

    // The control plane.
    let admin_addr = config.admin.address;
    let admin = Arc::new(Admin {
        store: store.clone(),
        metrics: metrics.clone(),
        proxy: proxy.clone(),
        config: current.clone(),
        datapath: datapath.clone(),
        readiness: readiness.clone(),
        started: Instant::now(),
        source: match &kube {
            Some((k, _)) => format!("file {} + {}", opts.config.display(), k.describe()),
            None => format!("file {}", opts.config.display()),
        },
        opted_in: opted_in_rx,
    });
    // The control thread reports how it ended on a channel rather than through a join: the
    // data plane must be able to stop (drain, unpin, exit) without waiting for it.
    let (control_end_tx, control_end) = tokio::sync::oneshot::channel::<String>();
    std::thread::Builder::new()
        .name("balancer-control".into())
        .spawn({
            let opts = opts.clone();
            let readiness = readiness.clone();
            let (calls, pools) = (proxy.calls.clone(), proxy.pools.clone());
            move || {
                let end = match control_plane(|| {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("starting the control runtime")?;
                    rt.block_on(async move {
                        let listener = admin::bind(admin_addr)
                            .await
                            .with_context(|| format!("binding the admin server on {admin_addr}"))?;
                        info!(%admin_addr, "admin server listening");
                        tokio::spawn(admin::serve(admin, listener));
                        // Active health checks, once per node for every client.
                        tokio::spawn(crate::health::run(store.clone()));
                        if let Some((kopts, kconfig)) = kube {
                            let (store, metrics) = (store.clone(), metrics.clone());
                            tokio::spawn(async move {
                                let synced = move || readiness.resolve(discovery::kube::NOT_SYNCED);
                                let r = discovery::kube::run(
                                    kconfig,
                                    kopts,
                                    store,
                                    metrics,
                                    synced,
                                    opted_in_tx,
                                )
                                .await;
                                if let Err(e) = r {
                                    error!("kubernetes discovery stopped: {e}");
                                }
                            });
                        }
                        discovery::file::watch(
                            opts.config.clone(),
                            opts.reload_interval,
                            current,
                            calls,
                            pools,
                        )
                        .await;
                        anyhow::Ok(())
                    })
                }) {
                    Ok(()) => "the control plane stopped".to_string(),
                    Err(e) => format!("the control plane failed: {e:#}"),
                };
                let _ = control_end_tx.send(end);
            }
        })
        .context("starting the control thread")?;

    let failure = data_plane.block_on(async {
        let failure = tokio::select! {
            _ = shutdown_signal() => None,
            end = control_end => Some(end.unwrap_or_else(|_| "the control plane panicked".into())),
        };
        if let Some(f) = &failure {
            error!("{f}");
        }
        info!("draining");
        readiness.block("draining");
        if let Some(dp) = &datapath {
            dp.stop_redirecting();
        }
        let _ = drain_tx.send(true);
        let deadline = tokio::time::Instant::now() + opts.drain_timeout;
        while proxy.connections() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if proxy.connections() > 0 {
            warn!(
                connections = proxy.connections(),
                "drain timeout reached; closing the remaining connections"
            );
        }
        failure
    });
    // Tasks still hold the datapath (heartbeat, sync, admin): remove the pins now; the
    // programs detach when the process exits, whoever holds the last handle.
    if let Some(dp) = &datapath {
        dp.unpin();
    }
    workers.stop();
    data_plane.shutdown_timeout(Duration::from_secs(1));
    info!("stopped");
    match failure {
        Some(f) => Err(anyhow::anyhow!(f)),
        None => Ok(()),
    }
}

/// Runs the control plane; an error ends the agent.
fn control_plane(f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    f()
}

/// The Kubernetes source's options and client configuration.
async fn kube_setup(
    k: &KubernetesOptions,
    config: &Config,
) -> anyhow::Result<(discovery::kube::Options, kube::Config)> {
    let cgroup_root = match &config.datapath.cgroup_root {
        Some(root) => root.clone(),
        // Without a cgroup v2 mount no pod can be redirected anyway; discovery still runs.
        None => ebpf::cgroup::v2_mount().unwrap_or_else(|_| PathBuf::from("/sys/fs/cgroup")),
    };
    let opts = discovery::kube::Options {
        kubeconfig: k.kubeconfig.clone(),
        node_name: k.node_name.clone(),
        cgroup_root,
        cluster_domain: "cluster.local".into(),
    };
    let client = discovery::kube::client_config(&opts).await?;
    info!(source = %opts.describe(), node = ?opts.node_name, "kubernetes discovery");
    Ok((opts, client))
}

/// Keeps the datapath's opted-in map equal to the configured cgroups plus the pods that
/// Kubernetes discovery opted in. It writes only once discovery has synced the pods: until
/// then `sync_datapath`'s write of the configured cgroups stands.
async fn sync_opted_in_pods(
    dp: Arc<Datapath>,
    configured: Vec<String>,
    mut pods: watch::Receiver<Arc<discovery::pods::OptedIn>>,
) {
    loop {
        let set = pods.borrow_and_update().clone();
        if set.synced {
            let mut ids: HashSet<u64> = configured
                .iter()
                .filter_map(|p| {
                    ebpf::cgroup::id(&dp.cgroup_root().join(p.trim_start_matches('/'))).ok()
                })
                .collect();
            ids.extend(set.cgroup_ids());
            if let Err(e) = dp.sync_opted_in(&ids) {
                error!("datapath: {e}");
            }
        }
        if pods.changed().await.is_err() {
            return;
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
