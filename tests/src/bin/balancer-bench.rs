//! `cargo xtask bench`: the end-to-end benchmark of balancer-agent beside nginx and HAProxy
//! (see `tests/src/bench/mod.rs` for what is measured and how it is kept fair).
#![forbid(unsafe_code)]

use balancer_tests::bench;

use std::{path::PathBuf, time::Duration};

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "balancer-bench",
    about = "Unary gRPC calls through balancer-agent, nginx and HAProxy (and directly), side by side"
)]
struct Args {
    /// Where to write the JSON results.
    #[arg(long, default_value = "target/bench/results.json")]
    out: PathBuf,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 5.0)]
    duration_secs: f64,
    /// Warm-up seconds before each measured window.
    #[arg(long, default_value_t = 1.0)]
    warmup_secs: f64,
    /// Calls in flight on the client connection, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,64,100,1000")]
    concurrency: Vec<usize>,
    /// Rounds of every target at each concurrency; the agent's ratios to a peer are taken
    /// within a round and reported as the median over the rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Targets: direct, agent, nginx, haproxy.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,agent,nginx,haproxy"
    )]
    targets: Vec<String>,
    /// CPUs every proxy is pinned to (`taskset -c` list). Default: the last CPU.
    #[arg(long)]
    proxy_cpus: Option<String>,
    /// CPUs of the load generator and the backends. Default: all the others ("" for none).
    #[arg(long)]
    client_cpus: Option<String>,
    /// Worker threads (agent, haproxy) or processes (nginx) of every proxy.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Every proxy routes each call through ten routes (3 on the method, 6 on a header, then an
    /// 80/20 split by subset), each in its own configuration language.
    #[arg(long)]
    routes: bool,
    /// Every proxy that can checks its backends actively (the agent: grpc.health.v1 `Watch`;
    /// haproxy: `check` every second; nginx has none in open source).
    #[arg(long)]
    health_checks: bool,
    /// Every proxy has retries configured that no call needs (the agent: a route with 3
    /// retries on UNAVAILABLE; haproxy: `retries 3`, `retry-on`; nginx: `grpc_next_upstream`).
    #[arg(long)]
    retries: bool,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    for t in &a.targets {
        anyhow::ensure!(bench::TARGETS.contains(&t.as_str()), "unknown target {t:?}");
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let last = cpus - 1;
    let proxy_cpus = a.proxy_cpus.unwrap_or_else(|| last.to_string());
    let client_cpus = a.client_cpus.unwrap_or_else(|| {
        if cpus > 1 {
            format!("0-{}", last - 1)
        } else {
            String::new()
        }
    });
    bench::main(bench::Options {
        out: a.out,
        duration: Duration::from_secs_f64(a.duration_secs),
        warmup: Duration::from_secs_f64(a.warmup_secs),
        concurrency: a.concurrency,
        rounds: a.rounds,
        targets: a.targets,
        routes: a.routes,
        placement: bench::peers::Placement {
            proxy_cpus,
            workers: a.workers,
            health_checks: a.health_checks,
            retries: a.retries,
        },
        client_cpus,
    })
}
