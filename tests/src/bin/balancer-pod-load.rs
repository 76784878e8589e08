//! A pod's gRPC clients under load, for the handover tests: run inside a simulated pod, it keeps
//! `--connections` tonic clients (one HTTP/2 connection each, reconnecting when told to go
//! away) with `--in-flight` calls each always in flight, plus one client making sequential
//! calls, all to `--target`.
//!
//! `--transport` picks what carries the calls:
//! - `pooled`: tonic's generated client over hyper-util's pooled client (HTTP/2 only). A
//!   request that a connection never sent (it was going away) is sent again on a new
//!   connection, as gRPC's own clients (C-core, Go, Java) retry such a call transparently.
//! - `channel`: tonic's `Channel`. After a GOAWAY on a connection with a call open, hyper's
//!   client cancels the next request it is given ("operation was canceled") instead of sending
//!   it elsewhere, whatever the server does; the call fails.
//!
//! Protocol on its standard streams:
//! - out, every 100 ms: `{"ok": N, "failed": M}`, the totals so far;
//! - in, a line `mark`: the calls from now on count in a new phase;
//! - in, end of file: no new call; the calls in flight finish, then one last line out:
//!   `{"phases": [{"ok", "failed", "sequential": {backend: calls}, "errors": [...]}], ...}`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use anyhow::Context;
use balancer_tests::pb::{HelloRequest, greeter_client::GreeterClient};
use clap::Parser;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::io::AsyncBufReadExt;
use tonic::transport::{Channel, Endpoint};

/// What carries the calls.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Transport {
    Pooled,
    Channel,
}

/// A client over hyper-util's pool: one HTTP/2 connection, a request never sent is sent again.
type PooledClient = GreeterClient<Client<HttpConnector, tonic::body::Body>>;

#[derive(Parser)]
struct Args {
    /// Where the clients connect (a Service VIP).
    #[arg(long)]
    target: SocketAddr,
    /// Channels with calls in flight all the time.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Calls in flight on each of them.
    #[arg(long, default_value_t = 4)]
    in_flight: usize,
    /// How long the backend holds each of those calls.
    #[arg(long, default_value_t = 20)]
    sleep_ms: u32,
    /// Most errors kept per phase.
    #[arg(long, default_value_t = 20)]
    max_errors: usize,
    /// What carries the calls.
    #[arg(long, value_enum, default_value = "pooled")]
    transport: Transport,
}

/// What the calls of one phase did.
#[derive(Default, serde::Serialize)]
struct Phase {
    ok: u64,
    failed: u64,
    /// Backends that served the sequential channel's calls.
    sequential: BTreeMap<String, u64>,
    /// The first errors, as `code: message`.
    errors: Vec<String>,
}

struct Shared {
    phases: Mutex<Vec<Phase>>,
    ok: AtomicU64,
    failed: AtomicU64,
    stop: AtomicBool,
    max_errors: usize,
}

impl Shared {
    fn record(&self, result: Result<String, tonic::Status>, sequential: bool) {
        let mut phases = self.phases.lock().expect("lock");
        let phase = phases.last_mut().expect("a phase");
        match result {
            Ok(backend) => {
                self.ok.fetch_add(1, Relaxed);
                phase.ok += 1;
                if sequential {
                    *phase.sequential.entry(backend).or_default() += 1;
                }
            }
            Err(status) => {
                self.failed.fetch_add(1, Relaxed);
                phase.failed += 1;
                if phase.errors.len() < self.max_errors {
                    // The cause too: a request hyper never sent says so there.
                    let cause = std::error::Error::source(&status)
                        .map(|e| format!(" ({e:?})"))
                        .unwrap_or_default();
                    phase
                        .errors
                        .push(format!("{:?}: {}{cause}", status.code(), status.message()));
                }
            }
        }
    }
}

async fn channel(target: SocketAddr) -> anyhow::Result<Channel> {
    Endpoint::from_shared(format!("http://{target}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {target}"))
}

fn pooled(target: SocketAddr) -> anyhow::Result<PooledClient> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(http);
    let origin = format!("http://{target}").parse()?;
    Ok(GreeterClient::with_origin(client, origin))
}

/// One of the clients, whichever its transport.
#[derive(Clone)]
enum Caller {
    Pooled(Box<PooledClient>),
    Channel(GreeterClient<Channel>),
}

impl Caller {
    async fn new(transport: Transport, target: SocketAddr) -> anyhow::Result<Self> {
        Ok(match transport {
            Transport::Pooled => Caller::Pooled(Box::new(pooled(target)?)),
            Transport::Channel => Caller::Channel(GreeterClient::new(channel(target).await?)),
        })
    }

    async fn call(&mut self, sleep_ms: u32) -> Result<String, tonic::Status> {
        let req = HelloRequest {
            name: "load".into(),
            sleep_ms,
            ..Default::default()
        };
        let reply = match self {
            Caller::Pooled(c) => c.say_hello(req).await,
            Caller::Channel(c) => c.say_hello(req).await,
        };
        reply.map(|r| r.into_inner().backend)
    }
}

/// Calls on `client` one after the other until told to stop.
async fn calls(shared: Arc<Shared>, mut client: Caller, sleep_ms: u32, seq: bool) {
    while !shared.stop.load(Relaxed) {
        let result = client.call(sleep_ms).await;
        shared.record(result, seq);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let shared = Arc::new(Shared {
        phases: Mutex::new(vec![Phase::default()]),
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        max_errors: args.max_errors,
    });
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let client = Caller::new(args.transport, args.target).await?;
        for _ in 0..args.in_flight {
            let (shared, client) = (shared.clone(), client.clone());
            tasks.push(tokio::spawn(calls(shared, client, args.sleep_ms, false)));
        }
    }
    let sequential = Caller::new(args.transport, args.target).await?;
    tasks.push(tokio::spawn(calls(shared.clone(), sequential, 0, true)));

    let progress = tokio::spawn({
        let shared = shared.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let ok = shared.ok.load(Relaxed);
                let failed = shared.failed.load(Relaxed);
                println!("{}", serde_json::json!({"ok": ok, "failed": failed}));
            }
        }
    });
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim() == "mark" {
            shared.phases.lock().expect("lock").push(Phase::default());
        }
    }
    shared.stop.store(true, Relaxed);
    for t in tasks {
        t.await?;
    }
    progress.abort();
    let phases = std::mem::take(&mut *shared.phases.lock().expect("lock"));
    println!("{}", serde_json::json!({"phases": phases}));
    Ok(())
}
