//! One client cannot hurt another: the agent answers what is malformed or abusive itself, on
//! the offending client's stream or connection, and the endpoint connections other clients'
//! calls share never see it. Each test runs a well-behaved "victim" client (tonic) through the
//! same agent and the same backends (one data-plane worker, so every call shares one pool)
//! while an attacker writes HTTP/2 by hand; every victim call must succeed.
//!
//! The backends are tonic servers (the h2 crate): they close a whole connection with GOAWAY
//! on an uppercase header name (PROTOCOL_ERROR) or on a burst of streams reset before they
//! were accepted (ENHANCE_YOUR_CALM), which is what made one client's requests fail others'.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use balancer_tests::{
    agent::{Agent, metric},
    greeter,
    harness::{
        client, config,
        frame::{
            self, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, RST_STREAM, SETTINGS,
            WINDOW_UPDATE, header_block,
        },
        grpc_frame, hello, local_addr, rss_kib,
    },
    pb::HelloRequest,
    wait_until,
};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpStream, tcp::OwnedWriteHalf},
    task::JoinHandle,
};

const BOUND: Duration = Duration::from_secs(10);
const PROTOCOL_ERROR: u32 = 0x1;
const STREAM_CLOSED: u32 = 0x5;
const ENHANCE_YOUR_CALM: u32 = 0xb;
const ACK: u8 = 0x1;

/// An agent with one worker over `n` in-process greeter backends.
async fn setup(n: usize, extra: &str) -> (Agent, Vec<greeter::Handle>, SocketAddr) {
    let mut backends = Vec::new();
    for i in 1..=n {
        backends.push(greeter::spawn("127.0.0.1:0", &format!("backend-{i}")).await);
    }
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let (listen, admin) = (local_addr(), local_addr());
    let yaml = config(listen, admin, "round-robin", &addrs, extra);
    let agent = Agent::start_with(&yaml, admin, |c| {
        c.args(["--workers", "1"]);
    })
    .await;
    (agent, backends, listen)
}

/// Calls the backends count, over all of them.
fn backend_calls(backends: &[greeter::Handle]) -> u64 {
    backends.iter().map(|b| b.stats.calls.load(Relaxed)).sum()
}

/// Well-behaved clients calling in a loop until stopped: 4 connections, 8 calls in flight on
/// each, every call held 20 ms by the backend so that calls are always in flight on the
/// shared endpoint connections.
struct Victims {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<Result<(), String>>>,
}

impl Victims {
    async fn start(listen: SocketAddr) -> Self {
        let (stop, ok) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let mut tasks = Vec::new();
        for conn in 0..4 {
            let c = client(listen).await;
            for i in 0..8 {
                let (mut c, stop, ok) = (c.clone(), stop.clone(), ok.clone());
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Relaxed) {
                        let req = HelloRequest {
                            sleep_ms: 20,
                            ..hello(&format!("victim-{conn}-{i}"))
                        };
                        c.say_hello(req)
                            .await
                            .map_err(|e| format!("a victim's call failed: {e:?}"))?;
                        ok.fetch_add(1, Relaxed);
                    }
                    Ok(())
                }));
            }
        }
        // Under way before the attack starts.
        let ok2 = ok.clone();
        wait_until("the victims' first calls", BOUND, || {
            ok2.load(Relaxed) >= 32
        })
        .await;
        Self { stop, ok, tasks }
    }

    /// Stops them; every call must have succeeded. Returns how many did.
    async fn finish(self) -> u64 {
        self.stop.store(true, Relaxed);
        for t in self.tasks {
            tokio::time::timeout(BOUND, t)
                .await
                .expect("victims stop within the bound")
                .unwrap()
                .unwrap();
        }
        self.ok.load(Relaxed)
    }
}

/// What came back on a hand-written connection.
#[derive(Debug, Default)]
struct Seen {
    /// (stream, error code) of every RST_STREAM.
    resets: Vec<(u32, u32)>,
    /// Streams answered with HEADERS.
    headers: Vec<u32>,
    goaway: Option<u32>,
    closed: bool,
}

/// A connection that writes frames by hand; with `read`, a task records what comes back.
struct Raw {
    write: OwnedWriteHalf,
    seen: Arc<Mutex<Seen>>,
    listen: SocketAddr,
}

impl Raw {
    /// Opens it with the preface and `settings` (id, value pairs).
    async fn connect(listen: SocketAddr, settings: &[(u16, u32)], read: bool) -> Self {
        let (mut rd, mut write) = TcpStream::connect(listen).await.unwrap().into_split();
        let payload: Vec<u8> = settings
            .iter()
            .flat_map(|(id, v)| id.to_be_bytes().into_iter().chain(v.to_be_bytes()))
            .collect();
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(frame::encode(SETTINGS, 0, 0, &payload));
        hello.extend(frame::encode(SETTINGS, ACK, 0, &[]));
        write.write_all(&hello).await.unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s = seen.clone();
        if read {
            tokio::spawn(async move {
                while let Some((kind, _, stream, payload)) = frame::read(&mut rd).await {
                    let code =
                        || u32::from_be_bytes(payload[payload.len() - 4..].try_into().unwrap());
                    let mut s = s.lock().unwrap();
                    match kind {
                        RST_STREAM => s.resets.push((stream, code())),
                        HEADERS => s.headers.push(stream),
                        GOAWAY => {
                            s.goaway = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()))
                        }
                        _ => {}
                    }
                }
                s.lock().unwrap().closed = true;
            });
        } else {
            // Holds the read half open without ever reading it.
            tokio::spawn(async move {
                let _rd = rd;
                std::future::pending::<()>().await;
            });
        }
        Self {
            write,
            seen,
            listen,
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        // The agent may close the connection in the middle of an attack: that is the point.
        let _ = self.write.write_all(bytes).await;
    }

    /// A well-formed request's fields for `path`, then `extra`.
    fn request(&self, path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
        let authority = self.listen.to_string();
        let mut fields = vec![
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", authority.as_str()),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ];
        fields.extend_from_slice(extra);
        header_block(&fields)
    }

    async fn wait_reset(&self, stream: u32) -> u32 {
        wait_until(&format!("a RST_STREAM on stream {stream}"), BOUND, || {
            let s = self.seen.lock().unwrap();
            s.closed || s.resets.iter().any(|r| r.0 == stream)
        })
        .await;
        let s = self.seen.lock().unwrap();
        s.resets
            .iter()
            .find(|r| r.0 == stream)
            .unwrap_or_else(|| panic!("closed without resetting stream {stream}: {s:?}"))
            .1
    }
}

/// Header blocks the RFC calls malformed (RFC 9113 §8.2, §8.3), each with its name.
fn malformed_blocks(raw: &Raw) -> Vec<(&'static str, Vec<u8>)> {
    const PATH: &str = "/helloworld.Greeter/SayHello";
    let authority = raw.listen.to_string();
    vec![
        ("uppercase name", raw.request(PATH, &[("X-Upper", "1")])),
        (
            "connection",
            raw.request(PATH, &[("connection", "keep-alive")]),
        ),
        (
            "transfer-encoding",
            raw.request(PATH, &[("transfer-encoding", "chunked")]),
        ),
        ("upgrade", raw.request(PATH, &[("upgrade", "h2c")])),
        ("te: gzip", {
            header_block(&[
                (":method", "POST"),
                (":scheme", "http"),
                (":path", PATH),
                (":authority", &authority),
                ("te", "gzip"),
            ])
        }),
        (
            "value with CRLF",
            raw.request(PATH, &[("x-a", "1\r\nx-b: 2")]),
        ),
        ("unknown pseudo-header", raw.request(PATH, &[(":foo", "1")])),
        ("empty :path", raw.request("", &[])),
        (
            "no :method",
            header_block(&[
                (":scheme", "http"),
                (":path", PATH),
                (":authority", &authority),
            ]),
        ),
        (
            "duplicate :path",
            header_block(&[
                (":method", "POST"),
                (":path", PATH),
                (":scheme", "http"),
                (":path", PATH),
            ]),
        ),
        (
            ":status in a request",
            header_block(&[
                (":status", "200"),
                (":method", "POST"),
                (":scheme", "http"),
                (":path", PATH),
            ]),
        ),
    ]
}

#[tokio::test]
async fn malformed_requests_are_reset_by_the_agent_and_never_reach_an_endpoint() {
    let (agent, backends, listen) = setup(2, "").await;
    let mut raw = Raw::connect(listen, &[], true).await;
    let mut sid = 1;
    let mut cases = Vec::new();
    for (what, block) in malformed_blocks(&raw) {
        raw.send(&frame::encode(
            HEADERS,
            END_HEADERS | END_STREAM,
            sid,
            &block,
        ))
        .await;
        cases.push((what, sid));
        sid += 2;
    }
    for (what, sid) in &cases {
        assert_eq!(raw.wait_reset(*sid).await, PROTOCOL_ERROR, "{what}");
    }
    // The same connection then makes a good call: it reaches an endpoint and is answered.
    let good = raw.request("/helloworld.Greeter/SayHello", &[]);
    raw.send(&frame::encode(HEADERS, END_HEADERS, sid, &good))
        .await;
    raw.send(&frame::encode(
        DATA,
        END_STREAM,
        sid,
        &grpc_frame(&hello("good")),
    ))
    .await;
    let seen = raw.seen.clone();
    wait_until("the good call's answer", BOUND, || {
        seen.lock().unwrap().headers.contains(&sid)
    })
    .await;
    assert_eq!(
        backend_calls(&backends),
        1,
        "only the good call reached a backend"
    );
    assert!(raw.seen.lock().unwrap().goaway.is_none());
    let m = agent.metrics();
    assert!(
        metric(&m, "balancer_client_stream_errors_total", &[]) >= cases.len() as f64,
        "{m}"
    );
}

#[tokio::test]
async fn a_body_that_breaks_its_content_length_or_comes_after_end_stream_is_reset() {
    let (_agent, backends, listen) = setup(1, "").await;
    let mut raw = Raw::connect(listen, &[], true).await;
    let body = grpc_frame(&hello("short"));
    // content-length larger than the DATA that ends the stream.
    let block = raw.request(
        "/helloworld.Greeter/SayHello",
        &[("content-length", &(body.len() + 10).to_string())],
    );
    raw.send(&frame::encode(HEADERS, END_HEADERS, 1, &block))
        .await;
    raw.send(&frame::encode(DATA, END_STREAM, 1, &body)).await;
    assert_eq!(raw.wait_reset(1).await, PROTOCOL_ERROR);
    // DATA after the request ended (half-closed remote): STREAM_CLOSED on that stream.
    let slow = HelloRequest {
        sleep_ms: 2_000,
        ..hello("slow")
    };
    let block = raw.request("/helloworld.Greeter/SayHello", &[]);
    raw.send(&frame::encode(HEADERS, END_HEADERS, 3, &block))
        .await;
    raw.send(&frame::encode(DATA, END_STREAM, 3, &grpc_frame(&slow)))
        .await;
    raw.send(&frame::encode(DATA, 0, 3, b"more")).await;
    assert_eq!(raw.wait_reset(3).await, STREAM_CLOSED);
    // Its call is cancelled on the backend, and the connection lives on.
    let b = backends[0].stats.clone();
    wait_until("the backend's call cancelled", BOUND, || {
        b.cancelled.load(Relaxed) >= 1 && b.in_flight.load(Relaxed) == 0
    })
    .await;
    assert!(raw.seen.lock().unwrap().goaway.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_malformed_requests_fails_no_other_clients_call() {
    let (_agent, _backends, listen) = setup(2, "").await;
    let victims = Victims::start(listen).await;
    for _round in 0..20 {
        let mut raw = Raw::connect(listen, &[], true).await;
        let mut burst = Vec::new();
        for (i, (_, block)) in malformed_blocks(&raw).into_iter().enumerate() {
            burst.extend(frame::encode(
                HEADERS,
                END_HEADERS | END_STREAM,
                2 * i as u32 + 1,
                &block,
            ));
        }
        raw.send(&burst).await;
        let last = 2 * malformed_blocks(&raw).len() as u32 - 1;
        raw.wait_reset(last).await;
    }
    let ok = victims.finish().await;
    assert!(ok > 32, "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_floods_from_several_clients_fail_no_other_clients_call() {
    let (agent, _backends, listen) = setup(2, "").await;
    let victims = Victims::start(listen).await;
    // Each attacker stays under its own connection's limit (20 streams reset before their
    // answer): only together do they pass what a backend allows on one connection.
    for _round in 0..10 {
        let mut attackers = Vec::new();
        for _ in 0..4 {
            attackers.push(Raw::connect(listen, &[], true).await);
        }
        for raw in &mut attackers {
            let block = raw.request("/helloworld.Greeter/SayHello", &[]);
            let mut flood = Vec::new();
            for i in 0..15u32 {
                let sid = 2 * i + 1;
                flood.extend(frame::encode(HEADERS, END_HEADERS, sid, &block));
                flood.extend(frame::encode(RST_STREAM, 0, sid, &8u32.to_be_bytes()));
            }
            raw.send(&flood).await;
        }
        // Each connection is still served: a PING round trip would do, a call shows more.
        for raw in &mut attackers {
            let block = raw.request("/helloworld.Greeter/SayHello", &[]);
            raw.send(&frame::encode(HEADERS, END_HEADERS, 101, &block))
                .await;
            raw.send(&frame::encode(
                DATA,
                END_STREAM,
                101,
                &grpc_frame(&hello("after")),
            ))
            .await;
            let seen = raw.seen.clone();
            wait_until("the attacker's own call answered", BOUND, || {
                seen.lock().unwrap().headers.contains(&101)
            })
            .await;
        }
    }
    let ok = victims.finish().await;
    assert!(ok > 32, "{ok}");
    // And a flood past the per-connection limit still loses its own connection.
    let mut raw = Raw::connect(listen, &[], true).await;
    let block = raw.request("/helloworld.Greeter/SayHello", &[]);
    let mut flood = Vec::new();
    for i in 0..100u32 {
        flood.extend(frame::encode(HEADERS, END_HEADERS, 2 * i + 1, &block));
        flood.extend(frame::encode(RST_STREAM, 0, 2 * i + 1, &8u32.to_be_bytes()));
    }
    raw.send(&flood).await;
    let seen = raw.seen.clone();
    wait_until("a GOAWAY for the flood", BOUND, || {
        seen.lock().unwrap().goaway.is_some()
    })
    .await;
    assert_eq!(raw.seen.lock().unwrap().goaway, Some(ENHANCE_YOUR_CALM));
    let m = agent.metrics();
    assert!(
        metric(&m, "balancer_client_connection_errors_total", &[]) >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_opens_huge_windows_and_stops_reading_keeps_memory_bounded() {
    // The bounds under test: a 1 MiB write buffer per client connection, and 8 MiB of
    // responses held for one client connection before it is closed.
    let limits = "limits:\n  max_send_buffer: 1048576\n  max_connection_buffer: 8388608\n";
    let (agent, _backends, listen) = setup(2, limits).await;
    let victims = Victims::start(listen).await;
    let before = rss_kib(agent.pid());
    let mut peak = before;
    for round in 0..3 {
        // SETTINGS_INITIAL_WINDOW_SIZE and the connection window at 2^31-1: flow control
        // alone would let the agent write gigabytes to this client.
        let mut raw = Raw::connect(listen, &[(0x4, (1 << 31) - 1)], false).await;
        raw.send(&frame::encode(
            WINDOW_UPDATE,
            0,
            0,
            &((1u32 << 31) - 1 - 65_535).to_be_bytes(),
        ))
        .await;
        // 100 server streams of 400 replies of 16 KiB each: 650 MB asked for, none read.
        let block = raw.request("/helloworld.Greeter/SayHelloStream", &[]);
        let req = grpc_frame(&HelloRequest {
            count: 400,
            payload: vec![7; 16 * 1024],
            ..hello("hog")
        });
        let mut burst = Vec::new();
        for i in 0..100u32 {
            burst.extend(frame::encode(HEADERS, END_HEADERS, 2 * i + 1, &block));
            let chunks: Vec<_> = req.chunks(16 * 1024).collect();
            for (n, chunk) in chunks.iter().enumerate() {
                let end = if n + 1 == chunks.len() { END_STREAM } else { 0 };
                burst.extend(frame::encode(DATA, end, 2 * i + 1, chunk));
            }
        }
        raw.send(&burst).await;
        // The agent closes the connection once it holds 8 MiB for it.
        wait_until("the client that does not read closed", BOUND, || {
            peak = peak.max(rss_kib(agent.pid()));
            let m = agent.metrics();
            metric(
                &m,
                "balancer_client_connection_errors_total",
                &["unread_responses"],
            ) >= f64::from(round + 1)
        })
        .await;
    }
    let ok = victims.finish().await;
    assert!(ok > 32, "{ok}");
    let grown = peak.saturating_sub(before);
    eprintln!("agent RSS: {before} KiB before the attacks, {peak} KiB at most during them");
    assert!(
        grown < 48 * 1024,
        "the agent grew by {grown} KiB (from {before} KiB) while clients did not read"
    );
}
