//! Kubernetes discovery at scale: the API server fixture holding S services × E endpoints (and
//! a node's worth of pods), the real agent against it, and then many single-endpoint changes.
//!
//! Prints, and writes as JSON to `--out`: the agent's memory (VmRSS, VmHWM) once synced and
//! after the changes, the time to become ready (every cache listed), and the time from each
//! change to the balancer using it, measured from outside (the fixture writes the watch event
//! as the change is made; the admin API is polled until the endpoint shows) and from inside
//! (`balancer_discovery_apply_seconds`, from the watcher yielding the event to the new
//! snapshot).
//!
//! `cargo xtask bench` runs it; by hand:
//! `cargo build --release -p balancer-agent -p balancer-tests --bins &&
//!  target/release/balancer-bench-kube --out /tmp/kube.json`
#![forbid(unsafe_code)]

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use balancer_tests::{
    agent::{Agent, TempDir, metric},
    apiserver::{
        ApiServer,
        objects::{Ep, endpoint_slice, namespace, pod, service},
    },
    free_port,
};
use clap::Parser;
use serde_json::{Value, json};

/// Kubernetes discovery benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Services (each with one gRPC port).
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Endpoints per service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Pods on the agent's node (in an opted-in namespace).
    #[arg(long, default_value_t = 100)]
    pods: usize,
    /// Single-endpoint changes to time.
    #[arg(long, default_value_t = 300)]
    changes: usize,
    /// Where to write the results as JSON.
    #[arg(long)]
    out: Option<PathBuf>,
}

const NODE: &str = "bench-node";

fn svc_name(i: usize) -> String {
    format!("svc-{i}")
}

fn ip(prefix: u8, n: usize) -> String {
    format!("10.{prefix}.{}.{}", (n >> 8) & 0xff, n & 0xff)
}

fn slice(i: usize, eps: &[Ep]) -> Value {
    endpoint_slice(
        "bench",
        &format!("{}-x", svc_name(i)),
        &svc_name(i),
        &[("grpc", 8080)],
        eps,
    )
}

fn endpoints_of(i: usize, per: usize) -> Vec<Ep> {
    (0..per)
        .map(|j| Ep::ready(&ip(1 + (j as u8), i), &format!("{}-{j}", svc_name(i))))
        .collect()
}

/// (VmRSS, VmHWM) in KiB.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let api = ApiServer::start().await;
    api.apply(namespace("bench", &[("balancer.dev/enabled", "true")]));
    let mut objects = Vec::new();
    for i in 0..args.services {
        objects.push(service(
            "bench",
            &svc_name(i),
            &ip(96, i),
            &[("grpc", 50051, None)],
        ));
        objects.push(slice(i, &endpoints_of(i, args.endpoints)));
    }
    for p in 0..args.pods {
        objects.push(pod(
            "bench",
            &format!("client-{p}"),
            &format!("00000000-0000-4000-8000-{p:012}"),
            NODE,
            &[],
            false,
        ));
    }
    api.apply_all(objects);

    let dir = TempDir::new("balancer-bench-kube");
    let kubeconfig = api.kubeconfig(&dir.0);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let yaml = format!(
        "listeners:\n  - address: {listen}\nadmin:\n  address: {admin}\ndatapath:\n  cgroup_root: {}\n",
        dir.0.display()
    );
    let started = Instant::now();
    let agent = Agent::start_with(&yaml, admin, |c| {
        c.arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--node-name", NODE]);
    })
    .await;
    let ready_after = started.elapsed();
    let status = agent.json("/api/status");
    let (rss_synced, hwm_synced) = memory(agent.pid());
    anyhow::ensure!(
        status["services"].as_u64() == Some(args.services as u64),
        "the agent has {} services, expected {}",
        status["services"],
        args.services
    );

    // Single-endpoint changes, one at a time: endpoint 0 of a service gets a new address.
    let mut lags = Vec::with_capacity(args.changes);
    for k in 0..args.changes {
        let i = (k * 7919) % args.services;
        let mut eps = endpoints_of(i, args.endpoints);
        let new_ip = ip(200, k);
        eps[0] = Ep::ready(&new_ip, "moved");
        let want = format!("{new_ip}:8080");
        let path = format!("/api/endpoints?service={}.bench:50051", svc_name(i));
        let t0 = Instant::now();
        api.apply(slice(i, &eps));
        loop {
            let (_, body) = agent.get(&path)?;
            if body.contains(&want) {
                break;
            }
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(10),
                "change {k} not seen after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        lags.push(t0.elapsed());
    }
    lags.sort();
    let (rss, hwm) = memory(agent.pid());
    let m = agent.metrics();
    let count = metric(&m, "balancer_discovery_apply_seconds_count", &[]);
    let sum = metric(&m, "balancer_discovery_apply_seconds_sum", &[]);
    let bucket = |le: &str| {
        metric(
            &m,
            "balancer_discovery_apply_seconds_bucket",
            &[&format!("le=\"{le}\"")],
        )
    };
    let opted = agent.json("/api/opted_in");

    let report = json!({
        "services": args.services,
        "endpoints_per_service": args.endpoints,
        "pods_on_node": args.pods,
        "opted_in_pods": opted["pods"].as_object().map_or(0, |p| p.len()),
        "ready_after_ms": ready_after.as_secs_f64() * 1000.0,
        "memory_kib": {
            "synced": {"vm_rss": rss_synced, "vm_hwm": hwm_synced},
            "after_changes": {"vm_rss": rss, "vm_hwm": hwm},
        },
        "change_to_balancer_ms": {
            "changes": lags.len(),
            "p50": percentile(&lags, 0.50),
            "p90": percentile(&lags, 0.90),
            "p99": percentile(&lags, 0.99),
            "max": percentile(&lags, 1.0),
            "measured": "from the fixture's write (the watch event goes out at once) to the admin API showing the endpoint, polled every 1 ms",
        },
        "agent_discovery_apply": {
            "observations": count,
            "mean_ms": if count > 0.0 { sum / count * 1000.0 } else { 0.0 },
            "within_1ms": bucket("0.001") / count.max(1.0),
            "within_10ms": bucket("0.01") / count.max(1.0),
            "within_100ms": bucket("0.1") / count.max(1.0),
        },
    });
    println!(
        "== Kubernetes discovery: {} services x {} endpoints, {} pods on the node",
        args.services, args.endpoints, args.pods
    );
    println!(
        "ready (every cache listed)     {:>10.1} ms",
        ready_after.as_secs_f64() * 1000.0
    );
    println!(
        "memory once synced             {:>10} KiB VmRSS, {} KiB VmHWM",
        rss_synced, hwm_synced
    );
    println!(
        "memory after {:>5} changes     {:>10} KiB VmRSS, {} KiB VmHWM",
        lags.len(),
        rss,
        hwm
    );
    println!(
        "change -> balancer (outside)   p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&lags, 0.5),
        percentile(&lags, 0.9),
        percentile(&lags, 0.99),
        percentile(&lags, 1.0)
    );
    println!(
        "event -> snapshot (agent)      mean {:.3} ms over {count} events; {:.0}% within 1 ms, {:.0}% within 100 ms",
        report["agent_discovery_apply"]["mean_ms"]
            .as_f64()
            .unwrap_or(0.0),
        report["agent_discovery_apply"]["within_1ms"]
            .as_f64()
            .unwrap_or(0.0)
            * 100.0,
        report["agent_discovery_apply"]["within_100ms"]
            .as_f64()
            .unwrap_or(0.0)
            * 100.0,
    );
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")?;
        println!("written to {}", out.display());
    }
    Ok(())
}
