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
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::watch,
};
use tracing::{debug, error, info, warn};

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
    /// On SIGTERM, how long to keep serving while no other agent on the node redirects, for
    /// one being started to take over.
    pub handover_wait: Duration,
    /// Kubernetes discovery, when enabled.
    pub kubernetes: Option<KubernetesOptions>,
    /// Data-plane workers (0: one per CPU this process may use).
    pub workers: usize,
    /// A Unix socket to serve the admin API on too (the kubelet's exec probes ask it).
    pub admin_socket: Option<PathBuf>,
    /// The `net.ipv4.tcp_migrate_req` sysctl file (see [`enable_listener_migration`]).
    pub tcp_migrate_req: PathBuf,
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
    let readiness = Readiness::new(&[LISTENERS_NOT_BOUND]);
    if config.datapath.enabled {
        readiness.block(NOT_REDIRECTING);
    }

    let datapath = if config.datapath.enabled {
        // Idle: its slot is live but sends nothing here until the agent is ready (below).
        Some(Arc::new(ebpf::sync::load_idle(&config)?))
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

    // Bind everything before reporting ready, so a port clash fails the start. The listeners
    // share their address with another agent's (SO_REUSEPORT): during a handover the new agent
    // binds beside the old one, which keeps serving until the new one is ready.
    enable_listener_migration(&opts.tcp_migrate_req, config.datapath.enabled);
    let listeners: Vec<(TcpListener, proxy::Listener)> = data_plane.block_on(async {
        let mut v = Vec::new();
        for l in &config.listeners {
            let addr = l.address;
            let tcp = bind_shared(addr)
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
    let accepting: Vec<_> = listeners
        .into_iter()
        .map(|(tcp, l)| data_plane.spawn(proxy.clone().serve(tcp, l)))
        .collect();
    readiness.resolve(LISTENERS_NOT_BOUND);

    if let Some(dp) = &datapath {
        data_plane.spawn(ebpf::sync::heartbeat(dp.clone()));
        data_plane.spawn(redirect_when_ready(
            dp.clone(),
            readiness.clone(),
            store.clone(),
            config.datapath.opted_in_cgroups.clone(),
            kube.is_some().then(|| opted_in_rx.clone()),
        ));
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
            let (identities_proxy, identities_rx) = (proxy.clone(), admin.opted_in.clone());
            move || {
                let end = match control_plane(|| {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("starting the control runtime")?;
                    rt.block_on(async move {
                        if let Some(path) = &opts.admin_socket {
                            let listener = admin::bind_unix(path).with_context(|| {
                                format!("binding the admin socket {}", path.display())
                            })?;
                            info!(socket = %path.display(), "admin server listening");
                            tokio::spawn(admin::serve_unix(admin.clone(), listener));
                        }
                        serve_admin_tcp(admin, admin_addr).await?;
                        // Active health checks, once per node for every client.
                        tokio::spawn(crate::health::run(store.clone()));
                        if let Some((kopts, kconfig)) = kube {
                            tokio::spawn(pod_identities(identities_proxy, identities_rx));
                            let (store, metrics) = (store.clone(), metrics.clone());
                            let router = calls.router.clone();
                            tokio::spawn(async move {
                                let synced = move || readiness.resolve(discovery::kube::NOT_SYNCED);
                                let r = discovery::kube::run(
                                    kconfig,
                                    kopts,
                                    store,
                                    router,
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
            // New connections go to the agent beside this one if there is one, else around
            // the proxy, to their Services (fail open). A rollout starts the new agent and
            // waits until it is ready before it stops this one; but a pod deleted by hand gets
            // SIGTERM as its replacement is created (with maxSurge the DaemonSet controller
            // does not wait for a terminating pod to be gone): this one serves on until the
            // replacement redirects, for at most --handover-wait-ms.
            let until = tokio::time::Instant::now() + opts.handover_wait;
            while dp.others_serving() == 0 && tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let successors = dp.others_serving();
            dp.release();
            info!(
                successors,
                "datapath slot released: new connections go to {}",
                if successors > 0 {
                    "the agent that took over"
                } else {
                    "their Services directly (no other agent serves)"
                }
            );
        }
        // The listeners close (what is queued in them is served, or moves to the other
        // agent's listener), and every client connection is told to go away in two steps
        // (relay::Drain): its calls finish, it reconnects, to the new agent.
        let _ = drain_tx.send(true);
        let deadline = tokio::time::Instant::now() + opts.drain_timeout;
        // The listeners first: what they accept as they close counts below.
        for listener in accepting {
            let _ = tokio::time::timeout_at(deadline, listener).await;
        }
        // Dispatched to a worker, whether or not its task has started yet.
        let open = || proxy.worker_connections().iter().sum::<usize>();
        while open() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if open() > 0 {
            warn!(
                connections = open(),
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

/// Why the agent is not ready until its listeners are bound.
const LISTENERS_NOT_BOUND: &str = "listeners not bound";

/// Why the agent is not ready until its datapath slot redirects to it.
const NOT_REDIRECTING: &str = "datapath not redirecting to this agent yet";

/// How often an agent that found its admin address taken tries again.
const ADMIN_RETRY: Duration = Duration::from_secs(1);

/// Binds a proxy listener that another agent may bind too (SO_REUSEPORT): during a handover
/// the new agent listens beside the old one on the same address, and the kernel spreads new
/// connections over both until the old one closes its listener. Only a process of the same
/// user can join the group; any other holder of the address still makes the bind fail.
fn bind_shared(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    // tokio's own TcpListener::bind backlog.
    socket.listen(1024)
}

/// Makes the kernel move the connections queued in a listener that closes to another listener
/// of its SO_REUSEPORT group instead of resetting them (`net.ipv4.tcp_migrate_req`, Linux
/// 5.14): when the old agent of a handover closes its listeners, the connections the kernel
/// had queued there (handshakes done or under way, not yet accepted) move to the new agent's.
/// The setting belongs to the network namespace, the node's for the DaemonSet (hostNetwork);
/// it changes nothing for a listener without a group. Without it (a read-only /proc/sys), a
/// listener is emptied of what is queued before it closes (`proxy::Proxy::serve`), which
/// leaves only the microseconds between the last accept and the close. Not being able to set
/// it is worth a warning only on a node (`datapath`: handovers happen there); a standalone
/// proxy, often run unprivileged, says it at debug level.
fn enable_listener_migration(path: &Path, node: bool) {
    const WITHOUT: &str = "a connection that reaches a listener as this agent closes it, at the \
        end of a handover, is reset instead of moving to the agent that took over";
    let unset = |what: &str, e: &std::io::Error| {
        if node {
            warn!(path = %path.display(), error = %e, "{what}: {WITHOUT}");
        } else {
            debug!(path = %path.display(), error = %e, "{what}: {WITHOUT}");
        }
    };
    match std::fs::read_to_string(path) {
        Ok(v) if v.trim() == "1" => return,
        Ok(_) => {}
        Err(e) => return unset("net.ipv4.tcp_migrate_req unknown", &e),
    }
    match std::fs::write(path, "1") {
        Ok(()) => info!(
            path = %path.display(),
            "net.ipv4.tcp_migrate_req set to 1: connections queued in a closing listener move \
             to another agent's"
        ),
        Err(e) => unset("cannot set net.ipv4.tcp_migrate_req", &e),
    }
}

/// Serves the admin API on its TCP address. During a handover the agent being replaced holds
/// it: this one takes it over once it is free, trying every [`ADMIN_RETRY`] (its Unix socket
/// answers meanwhile). Any other failure to bind fails the start.
async fn serve_admin_tcp(admin: Arc<Admin>, addr: SocketAddr) -> anyhow::Result<()> {
    match admin::bind(addr).await {
        Ok(listener) => {
            info!(%addr, "admin server listening");
            tokio::spawn(admin::serve(admin, listener));
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            warn!(
                %addr,
                "admin address in use (by the agent this one replaces?): taking it over once \
                 it is free"
            );
            tokio::spawn(async move {
                let listener = loop {
                    tokio::time::sleep(ADMIN_RETRY).await;
                    if let Ok(l) = admin::bind(addr).await {
                        break l;
                    }
                };
                info!(%addr, "admin server listening");
                admin::serve(admin, listener).await;
            });
        }
        Err(e) => {
            return Err(e).with_context(|| format!("binding the admin server on {addr}"));
        }
    }
    Ok(())
}

/// Turns this agent's datapath slot on once nothing else holds readiness back: its listeners
/// are bound and discovery has synced. Only then does it write the maps it shares with any
/// other agent on the node (services, opted-in pods) from its store: a new agent beside a
/// running one leaves the maps it adopted as they are until its store is complete. Then the
/// agent is ready, and a rollout may stop the agent it replaces.
async fn redirect_when_ready(
    dp: Arc<Datapath>,
    readiness: Arc<Readiness>,
    store: Arc<Store>,
    opted_in_cgroups: Vec<String>,
    pods: Option<watch::Receiver<Arc<discovery::pods::OptedIn>>>,
) {
    readiness.wait_for_only(&[NOT_REDIRECTING]).await;
    // Each sync's first turn runs here, not when its task is first polled: what it records
    // (the store's VIPs, the configured cgroups, then with Kubernetes those plus the synced
    // pods) must be in before the redirect turns on, which writes it into the shared maps.
    let noop = &mut std::task::Context::from_waker(std::task::Waker::noop());
    let mut services = Box::pin(ebpf::sync::services(
        dp.clone(),
        store,
        opted_in_cgroups.clone(),
    ));
    let _ = services.as_mut().poll(noop);
    tokio::spawn(services);
    if let Some(pods) = pods {
        let mut pods = Box::pin(sync_opted_in_pods(dp.clone(), opted_in_cgroups, pods));
        let _ = pods.as_mut().poll(noop);
        tokio::spawn(pods);
    }
    dp.set_redirect(true);
    readiness.resolve(NOT_REDIRECTING);
    info!(
        slot = dp.slot(),
        other_agents = dp.others_serving(),
        "datapath redirecting to this agent; ready"
    );
}

/// Keeps the proxy's map of this node's pods by address equal to the opted-in pods that
/// Kubernetes discovery publishes: a connection from one of them carries its namespace and
/// labels to the call layer.
async fn pod_identities(
    proxy: Arc<Proxy>,
    mut pods: watch::Receiver<Arc<discovery::pods::OptedIn>>,
) {
    loop {
        let identities = pods.borrow_and_update().identities();
        proxy.set_identities(identities);
        if pods.changed().await.is_err() {
            return;
        }
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
