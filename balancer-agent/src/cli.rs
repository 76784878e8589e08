//! The command line: `run`, `inspect`, `probe`.
#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

use crate::{app, config::Config, inspect};

/// balancer: per-call gRPC load balancing for Kubernetes, once per node, without sidecars.
#[derive(Debug, Parser)]
#[command(name = "balancer-agent", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: the proxy, the admin server, and (when enabled) the eBPF datapath.
    Run(RunArgs),
    /// Inspect a running agent through its admin API.
    Inspect(inspect::Args),
    /// Ask the agent of this container whether it is ready or live, through its admin Unix
    /// socket (`run --admin-socket`): the kubelet's exec probes. Exits 0 if so.
    Probe(ProbeArgs),
}

/// `balancer-agent probe`.
#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// What to ask.
    #[arg(value_enum)]
    pub what: Probe,
    /// The agent's admin Unix socket (the same variable as `run --admin-socket`).
    #[arg(long, env = "BALANCER_ADMIN_SOCKET", value_name = "PATH")]
    pub socket: PathBuf,
    /// How long to wait for the answer, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
}

/// What `balancer-agent probe` asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Probe {
    /// `/ready`: the agent serves; the datapath redirects to it.
    Ready,
    /// `/live`: the agent's control runtime answers.
    Live,
}

/// `balancer-agent run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The configuration file (YAML).
    #[arg(long, short, env = "BALANCER_CONFIG")]
    pub config: PathBuf,
    /// Validate the configuration, list every problem, and exit (non-zero if any).
    #[arg(long)]
    pub check: bool,
    /// How often the configuration file is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub reload_interval_ms: u64,
    /// How long to drain on SIGTERM before exiting anyway, in milliseconds.
    #[arg(long, default_value_t = 25_000)]
    pub drain_timeout_ms: u64,
    /// On SIGTERM, keep serving for up to this long, in milliseconds, while no other agent on
    /// the node redirects to itself: one being started (a replacement for a pod deleted by
    /// hand) takes over without a gap. The drain starts as soon as one does. With no other
    /// agent coming (the DaemonSet deleted), this only delays the exit.
    #[arg(long, default_value_t = 0)]
    pub handover_wait_ms: u64,
    /// Discover services, endpoints and opted-in pods from the Kubernetes API, with the
    /// in-cluster configuration (the pod's service account) unless --kubeconfig is given.
    /// Services of the configuration file are served beside them.
    #[arg(long)]
    pub kubernetes: bool,
    /// A kubeconfig file for the Kubernetes API (implies --kubernetes).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name: the pods whose `spec.nodeName` it is may be opted in. The DaemonSet
    /// sets NODE_NAME from the downward API.
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// Also serve the admin API on this Unix socket, a path in the container's own filesystem:
    /// during a handover two agents share the node's network namespace, where only one holds
    /// the admin TCP address, and `balancer-agent probe` asks this one through the socket.
    #[arg(long, env = "BALANCER_ADMIN_SOCKET", value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// The `net.ipv4.tcp_migrate_req` sysctl file, set to 1 at start where it can be written:
    /// connections queued in a listener that closes at the end of a handover move to the new
    /// agent's listener instead of being reset. The DaemonSet mounts the node's file here.
    #[arg(
        long,
        default_value = "/proc/sys/net/ipv4/tcp_migrate_req",
        env = "BALANCER_TCP_MIGRATE_REQ",
        value_name = "PATH"
    )]
    pub tcp_migrate_req: PathBuf,
    /// Data-plane worker threads; 0 runs one per CPU this process may use (its CPU quota
    /// counts).
    #[arg(long, default_value_t = 0, env = "BALANCER_WORKERS")]
    pub workers: usize,
    /// Log format: `text` or `json`.
    #[arg(long, default_value = "text", env = "BALANCER_LOG_FORMAT")]
    pub log_format: String,
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
        Command::Inspect(args) => inspect::main(args),
        Command::Probe(args) => {
            let path = match args.what {
                Probe::Ready => "/ready",
                Probe::Live => "/live",
            };
            crate::admin::probe(&args.socket, path, Duration::from_millis(args.timeout_ms))
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    if args.check {
        return match Config::from_file(&args.config) {
            Ok(_) => {
                println!("{}: valid", args.config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    init_tracing(&args.log_format);
    match app::run(app::RunOptions {
        config: args.config,
        reload_interval: Duration::from_millis(args.reload_interval_ms.max(10)),
        drain_timeout: Duration::from_millis(args.drain_timeout_ms),
        handover_wait: Duration::from_millis(args.handover_wait_ms),
        workers: args.workers,
        admin_socket: args.admin_socket,
        tcp_migrate_req: args.tcp_migrate_req,
        kubernetes: (args.kubernetes || args.kubeconfig.is_some()).then(|| {
            app::KubernetesOptions {
                kubeconfig: args.kubeconfig,
                node_name: args.node_name.filter(|n| !n.is_empty()),
            }
        }),
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("balancer-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BALANCER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
