//! `cargo xtask demo`: the problem and the fix, end to end, on this machine.
//!
//! Four greeter backends stand behind one service. A gRPC client keeps one HTTP/2 connection,
//! as gRPC clients do, and makes 20 calls:
//! 1. through a per-connection (L4) balancer, as a Kubernetes Service does: every call lands
//!    on the one backend the connection was given;
//! 2. through `balancer-agent`: each call is balanced on its own and all four backends serve.
//!
//! Everything printed is measured from the replies. The demo stops by itself and leaves
//! nothing running.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use balancer_tests::{
    agent::Agent,
    free_port, greeter,
    pb::{HelloRequest, greeter_client::GreeterClient},
};
use tokio::net::{TcpListener, TcpStream};

const CALLS: usize = 20;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut backends = Vec::new();
    for i in 1..=4 {
        backends.push(greeter::spawn("127.0.0.1:0", &format!("backend-{i}")).await);
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();

    println!("== Without balancer: a per-connection (L4) Service, one HTTP/2 connection");
    let l4 = l4_balancer(addrs.clone()).await?;
    let without = run_client(l4).await?;

    println!("\n== With balancer-agent: every call balanced on its own, same single connection");
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let eps: String = addrs
        .iter()
        .map(|a| format!("      - address: {a}\n"))
        .collect();
    let config = format!(
        "listeners:\n  - address: {listen}\n    default_service: greeter\nadmin:\n  address: {admin}\nservices:\n  - name: greeter\n    policy: round-robin\n    endpoints:\n{eps}"
    );
    let agent = Agent::start(&config, admin).await;
    let with = run_client(listen).await?;
    drop(agent);

    println!("\n== Calls per backend ({CALLS} calls, one client connection each time)");
    println!(
        "{:<12} {:>16} {:>20}",
        "backend", "without balancer", "with balancer-agent"
    );
    for b in &backends {
        println!(
            "{:<12} {:>16} {:>20}",
            b.name,
            without.get(&b.name).copied().unwrap_or(0),
            with.get(&b.name).copied().unwrap_or(0)
        );
    }
    Ok(())
}

async fn run_client(addr: SocketAddr) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut client = GreeterClient::connect(format!("http://{addr}")).await?;
    let mut counts = BTreeMap::new();
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
        println!("#{n} - Greeting: Hello from {}", reply.backend);
        *counts.entry(reply.backend).or_default() += 1;
    }
    Ok(counts)
}

/// A per-connection TCP balancer, as kube-proxy balances a Service: each new connection goes
/// to the next backend, and stays there.
async fn l4_balancer(backends: Vec<SocketAddr>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let mut next = 0;
        while let Ok((mut client, _)) = listener.accept().await {
            let backend = backends[next % backends.len()];
            next += 1;
            tokio::spawn(async move {
                if let Ok(mut upstream) = TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    Ok(addr)
}
