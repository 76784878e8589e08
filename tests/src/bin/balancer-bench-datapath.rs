//! `cargo xtask bench` (datapath part): a pod calling a Service VIP through the eBPF redirect
//! and the agent, with and without the `sk_msg` shortcut, with the client pod's address kept
//! as the source of the endpoint connections (`source_address: pod`) and without (`node`),
//! side by side in one run with the same pod calling the agent's listener directly (the
//! standalone proxy path), haproxy and nginx on the node, and a backend pod directly (no
//! proxy). Sequential unary calls over one HTTP/2 connection;
//! latency percentiles from the client, the agent's CPU time per call from /proc.
//!
//! Needs root (network namespaces, cgroups, eBPF). Prints a table and writes JSON (`--out`).

use std::{net::SocketAddr, path::PathBuf};

use balancer_tests::{
    agent::Agent,
    bench::{
        peers::{self, Placement},
        procfs,
    },
    free_port, is_root,
    node::{BACKEND_PORT, Scenario},
};
use clap::Parser;
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    /// Calls per mode.
    #[arg(long, default_value_t = 5000)]
    calls: usize,
    /// Where to write the JSON results.
    #[arg(long)]
    out: Option<PathBuf>,
}

type Start = fn(&Placement, &[SocketAddr], SocketAddr) -> anyhow::Result<peers::Proxy>;

/// `calls` sequential calls from the client pod to `target`; the CPU time `pids` spent on
/// them, per call.
async fn measure(
    s: &Scenario,
    label: String,
    target: SocketAddr,
    pids: &[u32],
    calls: usize,
) -> Value {
    let before = procfs::cpu_ticks_of(pids);
    let out = s.call("client", target, calls).await;
    // Clock ticks of 10 ms.
    let cpu = (procfs::cpu_ticks_of(pids) - before) as f64 / 100.0 / calls as f64 * 1e6;
    json!({"mode": label, "latency_us": out["latency_us"], "agent_cpu_us_per_call": cpu, "data_segs_out": out["data_segs_out"]})
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !is_root() {
        println!("balancer-bench-datapath: SKIPPED (needs root for namespaces, cgroups and eBPF)");
        return Ok(());
    }
    let s = Scenario::new(4).await?;
    let gw = s.node.gateway.octets();
    let vip_ip = std::net::Ipv4Addr::new(10, 96, gw[2], 30);
    s.node.add_vip(vip_ip)?;
    let vip = SocketAddr::from((vip_ip, BACKEND_PORT));
    let proxy = SocketAddr::from((s.node.gateway, 15001));
    let mut rows: Vec<Value> = Vec::new();

    let direct = s.call("client", s.backends[0].1, args.calls).await;
    rows.push(json!({"mode": "pod -> backend pod (no proxy)", "latency_us": direct["latency_us"], "agent_cpu_us_per_call": Value::Null}));

    // (shortcut, source address): the default first, then each changed alone.
    for (shortcut, source) in [("off", "pod"), ("on", "pod"), ("off", "node")] {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let config = s
            .agent_config(vip, admin, shortcut)
            .replace(
                "listeners:\n  - address: ",
                "listeners:\n  - default_service: greeter\n    address: ",
            )
            .replacen(
                "  opted_in_cgroups:",
                &format!("  source_address: {source}\n  opted_in_cgroups:"),
                1,
            );
        let cg = s.node.agent_cgroup()?;
        let agent = Agent::start_in_cgroup(&config, admin, cg.path()).await;
        let pids = vec![agent.pid()];
        if shortcut == "off" && source == "pod" {
            rows.push(
                measure(
                    &s,
                    "pod -> agent listener (standalone proxy path)".into(),
                    proxy,
                    &pids,
                    args.calls,
                )
                .await,
            );
        }
        let label = format!("pod -> VIP -> eBPF -> agent (shortcut {shortcut}, source {source})");
        rows.push(measure(&s, label, vip, &pids, args.calls).await);
        drop(agent);
        drop(cg);
    }

    // The same pod calling haproxy and nginx on the node, in front of the same backend pods
    // (one thread, one worker process; neither can keep the pod's address without TPROXY).
    let placement = Placement {
        proxy_cpus: "0-1".into(),
        workers: 1,
        health_checks: false,
        retries: false,
    };
    let backends: Vec<SocketAddr> = s.backends.iter().map(|b| b.1).collect();
    for (name, start) in [
        ("haproxy", peers::start_haproxy_at as Start),
        ("nginx", peers::start_nginx_at as Start),
    ] {
        let at = SocketAddr::from((s.node.gateway, free_port()));
        match start(&placement, &backends, at) {
            Ok(p) => {
                let label = format!("pod -> {name} on the node");
                rows.push(measure(&s, label, at, &p.pids, args.calls).await);
            }
            Err(e) => println!("{name}: not measured ({e:#}); `cargo xtask bench` installs it"),
        }
    }

    println!(
        "\nDatapath benchmark: {} sequential unary calls per mode, one HTTP/2 connection",
        args.calls
    );
    println!(
        "{:<60} {:>9} {:>9} {:>9} {:>16}",
        "mode", "p50 µs", "p90 µs", "p99 µs", "proxy CPU µs/call"
    );
    for r in &rows {
        let l = &r["latency_us"];
        let cpu = r["agent_cpu_us_per_call"]
            .as_f64()
            .map_or("-".to_string(), |c| format!("{c:.1}"));
        println!(
            "{:<60} {:>9.1} {:>9.1} {:>9.1} {:>16}",
            r["mode"].as_str().unwrap_or("?"),
            l["p50"].as_f64().unwrap_or(0.0),
            l["p90"].as_f64().unwrap_or(0.0),
            l["p99"].as_f64().unwrap_or(0.0),
            cpu
        );
    }
    let row = |prefix: &str| {
        rows.iter()
            .find(|r| r["mode"].as_str().unwrap_or("").starts_with(prefix))
    };
    let ratio = |a: &str, b: &str, what: &str| -> Option<f64> {
        let (a, b) = (row(a)?, row(b)?);
        let get = |r: &Value| match what {
            "p50" => r["latency_us"]["p50"].as_f64(),
            _ => r["agent_cpu_us_per_call"].as_f64(),
        };
        Some(get(a)? / get(b)?)
    };
    let agent = "pod -> VIP -> eBPF -> agent (shortcut off, source pod)";
    for (a, b, what) in [
        (
            "pod -> VIP -> eBPF -> agent (shortcut on, source pod)",
            agent,
            "shortcut on vs off",
        ),
        (
            agent,
            "pod -> VIP -> eBPF -> agent (shortcut off, source node)",
            "source pod vs node",
        ),
        (agent, "pod -> haproxy", "agent vs haproxy"),
        (agent, "pod -> nginx", "agent vs nginx"),
    ] {
        if let (Some(p50), Some(cpu)) = (ratio(a, b, "p50"), ratio(a, b, "cpu")) {
            println!("{what}: p50 {p50:.2}x, CPU per call {cpu:.2}x");
        }
    }
    if let Some(out) = args.out {
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(
            &out,
            serde_json::to_string_pretty(&json!({"calls": args.calls, "rows": rows}))?,
        )?;
        println!("wrote {}", out.display());
    }
    Ok(())
}
