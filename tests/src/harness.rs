//! What the end-to-end tests share: an agent in front of greeter backends ([`Setup`]), a gRPC
//! client with the tests' message limits, backends in their own processes
//! ([`GreeterProcess`]), HTTP/2 backends that misbehave on purpose ([`RawBackend`]), and the
//! agent's resident memory.
#![forbid(unsafe_code)]

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use bytes::Bytes;
use tonic::transport::Channel;

use crate::{
    agent::Agent,
    free_port, greeter,
    pb::{HelloReply, HelloRequest, greeter_client::GreeterClient},
};

/// An agent in front of in-process greeter backends `backend-1..=n`.
#[derive(Debug)]
pub struct Setup {
    /// The agent.
    pub agent: Agent,
    /// The backends, in the order of the configuration's endpoints.
    pub backends: Vec<greeter::Handle>,
    /// The agent's client listener.
    pub listen: SocketAddr,
}

/// A fresh loopback address with a free port.
pub fn local_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A configuration with one service `greeter` (the listener's default) over `endpoints`, and
/// `extra` YAML appended at the top level (`limits:`, `pool:` sections).
pub fn config(
    listen: SocketAddr,
    admin: SocketAddr,
    policy: &str,
    endpoints: &[SocketAddr],
    extra: &str,
) -> String {
    let eps: String = if endpoints.is_empty() {
        "    endpoints: []\n".into()
    } else {
        let list: String = endpoints
            .iter()
            .map(|e| format!("      - address: {e}\n"))
            .collect();
        format!("    endpoints:\n{list}")
    };
    format!(
        r#"
listeners:
  - address: {listen}
    default_service: greeter
admin:
  address: {admin}
services:
  - name: greeter
    authorities: [greeter.default.svc.cluster.local]
    policy: {policy}
{eps}{extra}
"#
    )
}

/// Starts an agent over `endpoints`; returns it and its listener.
pub async fn agent(policy: &str, endpoints: &[SocketAddr], extra: &str) -> (Agent, SocketAddr) {
    let listen = local_addr();
    let admin = local_addr();
    let agent = Agent::start(&config(listen, admin, policy, endpoints, extra), admin).await;
    (agent, listen)
}

/// An agent over `n` default greeter backends.
pub async fn setup(policy: &str, n: usize) -> Setup {
    setup_with(policy, n, "").await
}

/// An agent over `n` default greeter backends, with `extra` configuration.
pub async fn setup_with(policy: &str, n: usize, extra: &str) -> Setup {
    let mut backends = Vec::new();
    for i in 1..=n {
        backends.push(greeter::spawn("127.0.0.1:0", &format!("backend-{i}")).await);
    }
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let (agent, listen) = agent(policy, &addrs, extra).await;
    Setup {
        agent,
        backends,
        listen,
    }
}

/// One HTTP/2 connection to `addr`, as a gRPC client keeps it, with room for the tests'
/// largest messages.
pub async fn client(addr: SocketAddr) -> GreeterClient<Channel> {
    let channel = tokio::time::timeout(
        Duration::from_secs(5),
        Channel::from_shared(format!("http://{addr}"))
            .expect("a valid URI")
            .connect(),
    )
    .await
    .expect("connecting within 5 s")
    .expect("connecting to the proxy");
    GreeterClient::new(channel)
        .max_decoding_message_size(greeter::MAX_MESSAGE)
        .max_encoding_message_size(greeter::MAX_MESSAGE)
}

/// A request with `name` and no knobs set.
pub fn hello(name: &str) -> HelloRequest {
    HelloRequest {
        name: name.into(),
        ..Default::default()
    }
}

/// Resident memory of a process, KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// A greeter backend in its own process (the `greeter` binary of this crate), killed on drop.
#[derive(Debug)]
pub struct GreeterProcess {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl GreeterProcess {
    /// Starts `greeter --name NAME --delay-ms DELAY` on a free port and waits until it listens.
    pub fn spawn(name: &str, delay_ms: u64) -> Self {
        let exe = std::env::current_exe().expect("current exe");
        let mut dir = exe.parent().expect("exe dir").to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let bin = dir.join("greeter");
        assert!(
            bin.exists(),
            "{} is missing: `cargo test -p balancer-tests` builds it",
            bin.display()
        );
        let mut child = Command::new(&bin)
            .args(["--listen", "127.0.0.1:0", "--name", name])
            .args(["--delay-ms", &delay_ms.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the greeter process");
        // The first line says where it listens; it comes once the socket is bound.
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("reading the greeter's first line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from greeter: {line:?}"));
        Self { child, addr }
    }

    /// SIGKILL, as a node kills a pod, and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GreeterProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How a [`RawBackend`] treats every stream.
#[derive(Debug, Clone, Copy)]
pub enum RawMode {
    /// Reads the request headers and never answers (the proxy's deadline must end the call).
    BlackHole,
    /// Resets every stream with REFUSED_STREAM before processing it.
    Refuse,
    /// Sends response headers and one reply message, then resets the stream with this reason.
    ResetAfterReply(h2::Reason),
}

/// What a [`RawBackend`] has seen.
#[derive(Debug, Default)]
pub struct RawStats {
    /// Streams opened by the proxy.
    pub streams: AtomicU64,
    /// Streams the proxy reset (a cancellation passed on).
    pub reset_by_peer: AtomicU64,
    /// The request headers of every stream.
    pub headers: Mutex<Vec<http::HeaderMap>>,
}

/// An HTTP/2 backend written on the `h2` crate, for behaviour a tonic server does not show on
/// demand: never answering, refusing streams, resetting them.
#[derive(Debug)]
pub struct RawBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it saw.
    pub stats: Arc<RawStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A gRPC message frame (uncompressed) around a protobuf body.
pub fn grpc_frame(msg: &impl prost::Message) -> Bytes {
    let body = msg.encode_to_vec();
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(0);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out.into()
}

impl RawBackend {
    /// Starts a backend on a free loopback port.
    pub async fn spawn(mode: RawMode) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a raw backend");
        let addr = listener.local_addr().expect("local addr");
        let stats = Arc::new(RawStats::default());
        let st = stats.clone();
        let task = tokio::spawn(async move {
            // Connection tasks live in a JoinSet so that dropping the backend ends them too.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let st = st.clone();
                conns.spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(tcp).await else {
                        return;
                    };
                    let mut streams = tokio::task::JoinSet::new();
                    while let Some(Ok((req, respond))) = conn.accept().await {
                        st.streams.fetch_add(1, Relaxed);
                        st.headers
                            .lock()
                            .expect("not poisoned")
                            .push(req.headers().clone());
                        streams.spawn(raw_stream(mode, respond, st.clone()));
                    }
                });
            }
        });
        Self { addr, stats, task }
    }
}

async fn raw_stream(
    mode: RawMode,
    mut respond: h2::server::SendResponse<Bytes>,
    st: Arc<RawStats>,
) {
    let grpc_ok = || {
        http::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .body(())
            .expect("a valid response")
    };
    match mode {
        RawMode::BlackHole => {
            if std::future::poll_fn(|cx| respond.poll_reset(cx))
                .await
                .is_ok()
            {
                st.reset_by_peer.fetch_add(1, Relaxed);
            }
        }
        RawMode::Refuse => respond.send_reset(h2::Reason::REFUSED_STREAM),
        RawMode::ResetAfterReply(reason) => {
            let Ok(mut send) = respond.send_response(grpc_ok(), false) else {
                return;
            };
            let reply = HelloReply {
                message: "one before the reset".into(),
                backend: "raw".into(),
                ..Default::default()
            };
            let _ = send.send_data(grpc_frame(&reply), false);
            // Let the reply reach the proxy before the reset.
            tokio::time::sleep(Duration::from_millis(50)).await;
            send.send_reset(reason);
        }
    }
}
