//! `cargo xtask bench` (datapath part): a pod calling a Service VIP through the eBPF redirect
//! and the agent, with and without the `sk_msg` shortcut, side by side in one run with the
//! same pod calling the agent's listener directly (the standalone proxy path) and calling a
//! backend pod directly (no proxy). Sequential unary calls over one HTTP/2 connection;
//! latency percentiles from the client, the agent's CPU time per call from /proc.
//!
//! Needs root (network namespaces, cgroups, eBPF). Prints a table and writes JSON (`--out`).

use std::{net::SocketAddr, path::PathBuf};

use balancer_tests::{
    agent::Agent,
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

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |r| r.1);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of /proc/pid/stat: 11 and 12 after the ')'.
    (ticks(11) + ticks(12)) / 100.0
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

    for shortcut in ["off", "on"] {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let config = s.agent_config(vip, admin, shortcut).replace(
            "listeners:\n  - address: ",
            "listeners:\n  - default_service: greeter\n    address: ",
        );
        let cg = s.node.agent_cgroup()?;
        let agent = Agent::start_in_cgroup(&config, admin, cg.path()).await;
        let measure = |label: String, target: SocketAddr| {
            let s = &s;
            let pid = agent.pid();
            async move {
                let before = cpu_seconds(pid);
                let out = s.call("client", target, args.calls).await;
                let cpu = (cpu_seconds(pid) - before) / args.calls as f64 * 1e6;
                json!({"mode": label, "latency_us": out["latency_us"], "agent_cpu_us_per_call": cpu, "data_segs_out": out["data_segs_out"]})
            }
        };
        if shortcut == "off" {
            rows.push(
                measure(
                    "pod -> agent listener (standalone proxy path)".into(),
                    proxy,
                )
                .await,
            );
        }
        rows.push(
            measure(
                format!("pod -> VIP -> eBPF -> agent (shortcut {shortcut})"),
                vip,
            )
            .await,
        );
        drop(agent);
        drop(cg);
    }

    println!(
        "\nDatapath benchmark: {} sequential unary calls per mode, one HTTP/2 connection",
        args.calls
    );
    println!(
        "{:<52} {:>9} {:>9} {:>9} {:>16}",
        "mode", "p50 µs", "p90 µs", "p99 µs", "agent CPU µs/call"
    );
    for r in &rows {
        let l = &r["latency_us"];
        let cpu = r["agent_cpu_us_per_call"]
            .as_f64()
            .map_or("-".to_string(), |c| format!("{c:.1}"));
        println!(
            "{:<52} {:>9.1} {:>9.1} {:>9.1} {:>16}",
            r["mode"].as_str().unwrap_or("?"),
            l["p50"].as_f64().unwrap_or(0.0),
            l["p90"].as_f64().unwrap_or(0.0),
            l["p99"].as_f64().unwrap_or(0.0),
            cpu
        );
    }
    let p50 = |i: usize| rows[i]["latency_us"]["p50"].as_f64().unwrap_or(f64::NAN);
    let cpu = |i: usize| {
        rows[i]["agent_cpu_us_per_call"]
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    println!(
        "\nshortcut on vs off: p50 {:.2}x, agent CPU per call {:.2}x (below 1 means the shortcut pays)",
        p50(3) / p50(2),
        cpu(3) / cpu(2)
    );
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
