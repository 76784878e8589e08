//! What the end-to-end tests share: an agent in front of greeter backends ([`Setup`]), a gRPC
//! client with the tests' message limits, backends in their own processes
//! ([`GreeterProcess`]), HTTP/2 backends that misbehave on purpose ([`RawBackend`], and
//! [`GoAwayBackend`] on hand-written frames), HTTP/2 frame and HPACK writers for clients that
//! break the rules, and the agent's resident memory.
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

/// `n` requests named `<prefix><i>`, each with `payload` bytes of `fill`: a client stream.
pub fn hellos(prefix: &str, n: u32, payload: usize, fill: u8) -> Vec<HelloRequest> {
    (0..n)
        .map(|i| HelloRequest {
            name: format!("{prefix}{i}"),
            payload: vec![fill; payload],
            ..Default::default()
        })
        .collect()
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
        let bin = crate::agent::workspace_bin("greeter");
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
    /// Reads the whole request, its DATA and its trailers, records them, and answers with
    /// status OK and no message.
    Record,
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
    /// [`RawMode::Record`]: the request DATA and trailers of every stream.
    pub requests: Mutex<Vec<(Vec<u8>, Option<http::HeaderMap>)>>,
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
                        streams.spawn(raw_stream(mode, req.into_body(), respond, st.clone()));
                    }
                });
            }
        });
        Self { addr, stats, task }
    }
}

async fn raw_stream(
    mode: RawMode,
    mut body: h2::RecvStream,
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
        RawMode::Record => {
            let mut data = Vec::new();
            while let Some(Ok(chunk)) = body.data().await {
                let _ = body.flow_control().release_capacity(chunk.len());
                data.extend_from_slice(&chunk);
            }
            let trailers = body.trailers().await.ok().flatten();
            st.requests
                .lock()
                .expect("not poisoned")
                .push((data, trailers));
            let Ok(mut send) = respond.send_response(grpc_ok(), false) else {
                return;
            };
            let mut status = http::HeaderMap::new();
            status.insert("grpc-status", http::HeaderValue::from_static("0"));
            let _ = send.send_trailers(status);
        }
    }
}

/// HTTP/2 frame types and flags the hand-written peers use (RFC 9113 §6).
pub mod frame {
    /// DATA.
    pub const DATA: u8 = 0x0;
    /// HEADERS.
    pub const HEADERS: u8 = 0x1;
    /// RST_STREAM.
    pub const RST_STREAM: u8 = 0x3;
    /// SETTINGS.
    pub const SETTINGS: u8 = 0x4;
    /// PING.
    pub const PING: u8 = 0x6;
    /// GOAWAY.
    pub const GOAWAY: u8 = 0x7;
    /// WINDOW_UPDATE.
    pub const WINDOW_UPDATE: u8 = 0x8;
    /// CONTINUATION.
    pub const CONTINUATION: u8 = 0x9;
    /// END_STREAM (DATA, HEADERS).
    pub const END_STREAM: u8 = 0x1;
    /// ACK (SETTINGS, PING).
    pub const ACK: u8 = 0x1;
    /// END_HEADERS (HEADERS, CONTINUATION).
    pub const END_HEADERS: u8 = 0x4;

    /// One frame: 9-byte header, then the payload.
    pub fn encode(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1), high bits of the first byte
    /// zero.
    fn hpack_int(out: &mut Vec<u8>, mut v: usize, n: u32) {
        let max = (1usize << n) - 1;
        if v < max {
            out.push(v as u8);
            return;
        }
        out.push(max as u8);
        v -= max;
        while v >= 128 {
            out.push((v % 128 + 128) as u8);
            v /= 128;
        }
        out.push(v as u8);
    }

    /// A header block of literal fields without indexing (RFC 7541 §6.2.2), no Huffman
    /// coding: it leaves the decoder's dynamic table alone, so blocks can be sent in any order.
    pub fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in fields {
            out.push(0);
            hpack_int(&mut out, name.len(), 7);
            out.extend_from_slice(name.as_bytes());
            hpack_int(&mut out, value.len(), 7);
            out.extend_from_slice(value.as_bytes());
        }
        out
    }

    /// Reads one frame: (type, flags, stream id, payload); `None` at EOF.
    pub async fn read(
        r: &mut (impl tokio::io::AsyncRead + Unpin),
    ) -> Option<(u8, u8, u32, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let mut head = [0u8; 9];
        r.read_exact(&mut head).await.ok()?;
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let mut payload = vec![0; len];
        r.read_exact(&mut payload).await.ok()?;
        let stream = u32::from_be_bytes(head[5..9].try_into().expect("4 bytes")) & 0x7fff_ffff;
        Some((head[3], head[4], stream, payload))
    }
}

/// What a [`GoAwayBackend`] did.
#[derive(Debug, Default)]
pub struct GoAwayStats {
    /// Calls answered (each the first stream of its connection).
    pub answered: AtomicU64,
    /// GOAWAY frames sent.
    pub goaways: AtomicU64,
    /// Streams above a GOAWAY's last stream id, left unprocessed.
    pub unprocessed: AtomicU64,
}

/// An endpoint written on raw frames that serves one call per connection and then goes
/// away: when a second stream arrives while the first is held, it sends GOAWAY with the first
/// stream as the last one it processes, answers the first (a SayHello reply from backend
/// `goaway`), and never looks at the others. (A second stream that does not come within a
/// second lets it answer and go away anyway.) Streams above the GOAWAY's last stream id are
/// unprocessed by the protocol's promise; a proxy must send them elsewhere.
#[derive(Debug)]
pub struct GoAwayBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it did.
    pub stats: Arc<GoAwayStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GoAwayBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GoAwayBackend {
    /// Starts it on a free loopback port.
    pub async fn spawn() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a GOAWAY backend");
        let addr = listener.local_addr().expect("local addr");
        let stats = Arc::new(GoAwayStats::default());
        let st = stats.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                conns.spawn(goaway_connection(tcp, st.clone()));
            }
        });
        Self { addr, stats, task }
    }
}

async fn goaway_connection(tcp: tokio::net::TcpStream, st: Arc<GoAwayStats>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut r, mut w) = tcp.into_split();
    let mut preface = [0u8; 24];
    if r.read_exact(&mut preface).await.is_err() {
        return;
    }
    if w.write_all(&frame::encode(frame::SETTINGS, 0, 0, &[]))
        .await
        .is_err()
    {
        return;
    }
    /// Not a frame type: the hold on the first stream ran out.
    const HOLD_OVER: u8 = 0xff;
    let mut first: Option<u32> = None;
    let mut gone = false;
    let hold = tokio::time::sleep(Duration::from_secs(1));
    tokio::pin!(hold);
    loop {
        let next = tokio::select! {
            f = frame::read(&mut r) => f,
            () = &mut hold, if first.is_some() && !gone => Some((HOLD_OVER, 0, 0, Vec::new())),
        };
        let Some((kind, flags, stream, payload)) = next else {
            return;
        };
        let mut out = Vec::new();
        let mut go_away = false;
        match kind {
            frame::SETTINGS if flags & frame::ACK == 0 => {
                out = frame::encode(frame::SETTINGS, frame::ACK, 0, &[]);
            }
            frame::PING if flags & frame::ACK == 0 => {
                out = frame::encode(frame::PING, frame::ACK, 0, &payload);
            }
            frame::HEADERS => match first {
                None => first = Some(stream),
                Some(_) => {
                    st.unprocessed.fetch_add(1, Relaxed);
                    go_away = !gone;
                }
            },
            HOLD_OVER => go_away = true,
            _ => {}
        }
        if go_away {
            gone = true;
            let last = first.expect("a first stream");
            let mut goaway = last.to_be_bytes().to_vec();
            goaway.extend_from_slice(&0u32.to_be_bytes());
            out.extend(frame::encode(frame::GOAWAY, 0, 0, &goaway));
            st.goaways.fetch_add(1, Relaxed);
            out.extend(frame::encode(
                frame::HEADERS,
                frame::END_HEADERS,
                last,
                &frame::header_block(&[(":status", "200"), ("content-type", "application/grpc")]),
            ));
            let reply = HelloReply {
                message: "Hello from goaway".into(),
                backend: "goaway".into(),
                ..Default::default()
            };
            out.extend(frame::encode(frame::DATA, 0, last, &grpc_frame(&reply)));
            out.extend(frame::encode(
                frame::HEADERS,
                frame::END_HEADERS | frame::END_STREAM,
                last,
                &frame::header_block(&[("grpc-status", "0")]),
            ));
            st.answered.fetch_add(1, Relaxed);
        }
        if !out.is_empty() && w.write_all(&out).await.is_err() {
            return;
        }
        // After going away, keep reading until the proxy closes: closing first would reset
        // the connection and could destroy the answer before the proxy read it.
    }
}
