//! What runs inside a simulated pod (tests and demo): a greeter backend, or a gRPC client that
//! keeps one HTTP/2 connection, as gRPC clients do.
//!
//! - `serve --name N --listen ADDR`: a tonic greeter backend named N.
//! - `call --target ADDR --calls N`: N unary SayHello calls over one HTTP/2 connection, printing
//!   `#n - Greeting: Hello from backend-k`, then one JSON line with the count per backend and
//!   the socket's `tcp_info` data segments (0 when the sk_msg shortcut carried everything).
//!   The client speaks raw HTTP/2 (h2) so that it owns the socket it queries.
//! - `churn --target ADDR --count N`: N short TCP connections (closed with RST so the client
//!   keeps no TIME_WAIT), then a JSON line with how many connected.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, TcpStream as StdTcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

use anyhow::{Context, bail};
use balancer_tests::{
    greeter,
    pb::{HelloReply, HelloRequest},
};
use bytes::{BufMut, Bytes, BytesMut};
use clap::{Parser, Subcommand};
use prost::Message;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        listen: SocketAddr,
        /// Accept connections from these addresses only (an allow list keyed by client IP, as
        /// a NetworkPolicy is); any address when none is given.
        #[arg(long)]
        allow: Vec<IpAddr>,
    },
    Call {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 20)]
        calls: usize,
        /// Print one line per call.
        #[arg(long)]
        print: bool,
        /// Ask the backend to wait this long before answering each call.
        #[arg(long, default_value_t = 0)]
        sleep_ms: u32,
    },
    Churn {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        count: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Serve {
            name,
            listen,
            allow,
        } => {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            if allow.is_empty() {
                greeter::serve(listener, name, Default::default()).await;
            } else {
                serve_allowed(listener, name, allow).await?;
            }
            Ok(())
        }
        Cmd::Call {
            target,
            calls,
            print,
            sleep_ms,
        } => call(target, calls, print, sleep_ms).await,
        Cmd::Churn { target, count } => churn(target, count),
    }
}

/// Serves the greeter to the clients in `allow` only: a connection from any other address is
/// closed at once, before a byte of HTTP/2.
async fn serve_allowed(
    listener: tokio::net::TcpListener,
    name: String,
    allow: Vec<IpAddr>,
) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).filter(move |c| {
        let allowed = match c {
            Ok(s) => s.peer_addr().is_ok_and(|p| allow.contains(&p.ip())),
            Err(_) => true,
        };
        std::future::ready(allowed)
    });
    tonic::transport::Server::builder()
        .add_service(greeter::service(&name, Default::default()))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

fn grpc_frame(msg: &impl Message) -> Bytes {
    let body = msg.encode_to_vec();
    let mut b = BytesMut::with_capacity(5 + body.len());
    b.put_u8(0);
    b.put_u32(body.len() as u32);
    b.put_slice(&body);
    b.freeze()
}

async fn call(target: SocketAddr, calls: usize, print: bool, sleep_ms: u32) -> anyhow::Result<()> {
    let std = StdTcpStream::connect_timeout(&target, Duration::from_secs(5))
        .with_context(|| format!("connecting to {target}"))?;
    let probe = std.try_clone()?;
    std.set_nonblocking(true)?;
    let tcp = tokio::net::TcpStream::from_std(std)?;
    let (client, conn) = h2::client::handshake(tcp).await?;
    tokio::spawn(conn);
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut latencies = Vec::with_capacity(calls);
    for n in 1..=calls {
        let started = std::time::Instant::now();
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("http://{target}/helloworld.Greeter/SayHello"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())?;
        let mut sender = client.clone().ready().await?;
        let (resp, mut send) = sender.send_request(req, false)?;
        send.send_data(
            grpc_frame(&HelloRequest {
                name: "pod".into(),
                sleep_ms,
                ..Default::default()
            }),
            true,
        )?;
        let resp = tokio::time::timeout(Duration::from_secs(10), resp)
            .await
            .context("no response within 10s")??;
        let mut body = resp.into_body();
        let mut buf = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            buf.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await?.unwrap_or_default();
        let status = trailers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none");
        if status != "0" || buf.len() < 5 {
            bail!("call {n} failed: grpc-status {status}, {trailers:?}");
        }
        let reply = HelloReply::decode(&buf[5..])?;
        latencies.push(started.elapsed());
        if print {
            println!("#{n} - Greeting: Hello from {}", reply.backend);
        }
        *counts.entry(reply.backend).or_default() += 1;
    }
    let segs = balancer_agent::ebpf::shortcut::data_segs_out(&probe)?;
    // Latency percentiles over the calls after the first tenth (the warm-up: connections).
    let mut steady = latencies.split_off(latencies.len() / 10);
    steady.sort();
    let pct = |p: f64| {
        steady
            .get(((steady.len() as f64 * p) as usize).min(steady.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    println!(
        "{}",
        serde_json::json!({
            "counts": counts,
            "data_segs_out": segs,
            "latency_us": { "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99) },
        })
    );
    Ok(())
}

fn churn(target: SocketAddr, count: usize) -> anyhow::Result<()> {
    let (mut ok, mut failed) = (0usize, 0usize);
    for _ in 0..count {
        match StdTcpStream::connect_timeout(&target, Duration::from_secs(2)) {
            Ok(s) => {
                ok += 1;
                reset_on_close(&s);
            }
            Err(_) => failed += 1,
        }
    }
    println!("{}", serde_json::json!({ "ok": ok, "failed": failed }));
    Ok(())
}

/// SO_LINGER with a zero timeout: close sends RST, leaving no TIME_WAIT behind.
#[allow(unsafe_code)] // setsockopt(SO_LINGER): std has no safe wrapper.
fn reset_on_close(s: &StdTcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads one `linger` from a valid pointer of the given length.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
