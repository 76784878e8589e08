//! `cargo xtask demo`: the problem balancer solves, and the fix, end to end.
//!
//! As root (the normal case), on a simulated node: four greeter backend pods behind a Service
//! VIP, and a client pod that keeps one HTTP/2 connection to the VIP, as gRPC clients do. With
//! `balancer-agent` running, the kernel hands the connection to the agent, which balances every
//! call; with the agent stopped, the same client goes through a stand-in for kube-proxy and
//! every call lands on the one backend its connection was given. Everything printed is measured
//! from the replies. The demo ends by itself and removes every namespace, cgroup, pin and
//! process it made.
//!
//! Without root, the same story runs on loopback with the agent as a plain proxy.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use balancer_tests::{
    agent::Agent,
    free_port, greeter, is_root,
    node::{BACKEND_PORT, Scenario, kube_proxy_stand_in},
    pb::{HelloRequest, greeter_client::GreeterClient},
};

const CALLS: usize = 20;

type Counts = BTreeMap<String, usize>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (with, without, names) = if is_root() {
        on_a_node().await?
    } else {
        println!(
            "NOTE: not root: showing the proxy alone on loopback (run as root for the node)\n"
        );
        on_loopback().await?
    };
    println!("\n== Calls per backend ({CALLS} calls over one client connection each time)");
    println!(
        "{:<12} {:>20} {:>22}",
        "backend", "with balancer-agent", "agent stopped (L4)"
    );
    for n in names {
        println!(
            "{:<12} {:>20} {:>22}",
            n,
            with.get(&n).copied().unwrap_or(0),
            without.get(&n).copied().unwrap_or(0)
        );
    }
    Ok(())
}

fn tally(output: &str) -> Counts {
    let mut counts = Counts::new();
    for line in output.lines().filter(|l| l.starts_with('#')) {
        println!("{line}");
        if let Some(b) = line.rsplit(' ').next() {
            *counts.entry(b.to_string()).or_default() += 1;
        }
    }
    counts
}

async fn on_a_node() -> anyhow::Result<(Counts, Counts, Vec<String>)> {
    println!("Building a simulated node: 4 greeter backend pods, a client pod, Service greeter");
    let s = Scenario::new(4).await?;
    let gw = s.node.gateway.octets();
    let vip_ip = std::net::Ipv4Addr::new(10, 96, gw[2], 10);
    s.node.add_vip(vip_ip)?;
    let vip = SocketAddr::from((vip_ip, BACKEND_PORT));
    for (name, addr) in &s.backends {
        println!("  pod {name:<10} {addr}");
    }
    println!("  Service greeter VIP {vip} (kube-proxy stand-in: one backend per connection)");
    kube_proxy_stand_in(vip, s.backends.iter().map(|b| b.1).collect()).await?;

    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let agent_cg = s.node.agent_cgroup()?;
    let mut agent = Agent::start_in_cgroup(
        &default_policy(&s.agent_config(vip, admin, "auto")),
        admin,
        agent_cg.path(),
    )
    .await;
    let status = agent.json("/api/status");
    println!(
        "\n== balancer-agent running: eBPF attached at {}, sk_msg shortcut {} ({})",
        status["datapath"]["cgroup_root"].as_str().unwrap_or("?"),
        if status["datapath"]["shortcut"]["enabled"] == true {
            "on"
        } else {
            "off"
        },
        status["datapath"]["shortcut"]["reason"]
            .as_str()
            .unwrap_or("?"),
    );
    println!("client pod -> {vip}, one HTTP/2 connection:");
    let with = tally(&s.call_output("client", vip, CALLS, true).await);

    agent.terminate();
    drop(agent);
    println!("\n== balancer-agent stopped: the same client, the same Service");
    let without = tally(&s.call_output("client", vip, CALLS, true).await);
    drop(agent_cg);
    let names = s.backends.iter().map(|b| b.0.clone()).collect();
    drop(s);
    println!("\nRemoved the node's namespaces, cgroups, pins and processes.");
    Ok((with, without, names))
}

async fn on_loopback() -> anyhow::Result<(Counts, Counts, Vec<String>)> {
    let mut backends = Vec::new();
    for i in 1..=4 {
        backends.push(greeter::spawn("127.0.0.1:0", &format!("backend-{i}")).await);
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let eps: String = addrs
        .iter()
        .map(|a| format!("      - address: {a}\n"))
        .collect();
    let config = format!(
        "listeners:\n  - address: {listen}\n    default_service: greeter\nadmin:\n  address: {admin}\nservices:\n  - name: greeter\n    endpoints:\n{eps}"
    );
    let agent = Agent::start(&config, admin).await;
    println!("== through balancer-agent, one HTTP/2 connection:");
    let with = tally(&call_lines(listen).await?);
    drop(agent);
    let vip: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    kube_proxy_stand_in(vip, addrs).await?;
    println!("\n== through a per-connection (L4) balancer, as a Service without balancer:");
    let without = tally(&call_lines(vip).await?);
    Ok((
        with,
        without,
        backends.iter().map(|b| b.name.clone()).collect(),
    ))
}

async fn call_lines(addr: SocketAddr) -> anyhow::Result<String> {
    let mut client = GreeterClient::connect(format!("http://{addr}")).await?;
    let mut out = String::new();
    for n in 1..=CALLS {
        let reply = tokio::time::timeout(
            Duration::from_secs(5),
            client.say_hello(HelloRequest {
                name: "demo".into(),
                ..Default::default()
            }),
        )
        .await??
        .into_inner();
        out += &format!("#{n} - Greeting: Hello from {}\n", reply.backend);
    }
    Ok(out)
}

/// The demo's service with the default policy (`p2c-ewma`), as a user's Service gets it: the
/// node's configuration names round-robin for the tests.
fn default_policy(config: &str) -> String {
    config.replace("    policy: round-robin\n", "")
}
