//! Limits against abusive clients, and plain TCP passthrough, through a real `balancer-agent`
//! process. The abusive clients write HTTP/2 frames by hand: a well-behaved library (the `h2`
//! crate) will not break the limits its peer advertises.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use balancer_tests::{
    agent::metric,
    harness::{
        client,
        frame::{
            self, ACK, CONTINUATION, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, RST_STREAM,
            SETTINGS, WINDOW_UPDATE, header_block,
        },
        grpc_frame, hello, local_addr, setup, setup_with,
    },
    pb::HelloRequest,
    wait_until,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, tcp::OwnedWriteHalf},
};

const BOUND: Duration = Duration::from_secs(10);

const ENHANCE_YOUR_CALM: u32 = 0xb;
const COMPRESSION_ERROR: u32 = 0x9;

fn request_fields(addr: SocketAddr) -> Vec<(&'static str, String)> {
    vec![
        (":method", "POST".into()),
        (":scheme", "http".into()),
        (":path", "/helloworld.Greeter/SayHello".into()),
        (":authority", addr.to_string()),
        ("content-type", "application/grpc".into()),
        ("te", "trailers".into()),
    ]
}

fn request_block(addr: SocketAddr, extra: &[(&str, &str)]) -> Vec<u8> {
    let fields = request_fields(addr);
    let mut all: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(extra);
    header_block(&all)
}

/// What the proxy did to a hand-written connection.
#[derive(Debug, Default)]
struct Seen {
    goaway: Option<u32>,
    resets: usize,
    closed: bool,
    /// Streams that got a HEADERS frame or a reset back.
    answered: Vec<u32>,
}

/// A client connection that writes frames by hand and records what comes back.
struct RawClient {
    write: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    seen: Arc<Mutex<Seen>>,
}

impl RawClient {
    async fn connect(addr: SocketAddr) -> Self {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut read, mut write) = tcp.into_split();
        write
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        write
            .write_all(&frame::encode(SETTINGS, 0, 0, &[]))
            .await
            .unwrap();
        let write = Arc::new(tokio::sync::Mutex::new(write));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (w, s) = (write.clone(), seen.clone());
        tokio::spawn(async move {
            loop {
                let Some((kind, flags, stream, payload)) = frame::read(&mut read).await else {
                    s.lock().unwrap().closed = true;
                    return;
                };
                match kind {
                    SETTINGS if flags & ACK == 0 => {
                        let _ = w
                            .lock()
                            .await
                            .write_all(&frame::encode(SETTINGS, ACK, 0, &[]))
                            .await;
                    }
                    GOAWAY => {
                        let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                        s.lock().unwrap().goaway = Some(code);
                    }
                    RST_STREAM => {
                        let mut s = s.lock().unwrap();
                        s.resets += 1;
                        s.answered.push(stream);
                    }
                    HEADERS => s.lock().unwrap().answered.push(stream),
                    _ => {}
                }
            }
        });
        Self { write, seen }
    }

    async fn send(&self, bytes: &[u8]) {
        // The proxy may close the connection in the middle of a flood: that is the point.
        let _ = self.write.lock().await.write_all(bytes).await;
    }

    async fn wait_for_goaway(&self, what: &str) -> u32 {
        wait_until(what, BOUND, || {
            let s = self.seen.lock().unwrap();
            s.goaway.is_some() || s.closed
        })
        .await;
        let s = self.seen.lock().unwrap();
        assert!(s.goaway.is_some(), "closed without a GOAWAY: {s:?}");
        s.goaway.unwrap()
    }
}

/// Runs `abuse` while a well-behaved client makes 40 concurrent calls on its own connection;
/// every one of those must succeed.
async fn while_a_neighbour_calls<F: std::future::Future<Output = ()>>(
    listen: SocketAddr,
    abuse: F,
) {
    let c = client(listen).await;
    let mut calls = Vec::new();
    for i in 0..40 {
        let mut c = c.clone();
        calls.push(tokio::spawn(async move {
            c.say_hello(HelloRequest {
                sleep_ms: 200,
                ..hello(&format!("neighbour-{i}"))
            })
            .await
        }));
    }
    abuse.await;
    for (i, call) in calls.into_iter().enumerate() {
        call.await
            .unwrap()
            .unwrap_or_else(|e| panic!("the neighbour's call {i} failed: {e:?}"));
    }
    // And the neighbour's connection is still good.
    client(listen)
        .await
        .say_hello(hello("after"))
        .await
        .unwrap();
}

const LIMITS: &str = "limits:
  max_concurrent_streams: 50
  max_local_error_reset_streams: 20
  max_pending_accept_reset_streams: 20
";

#[tokio::test]
async fn a_client_opening_too_many_streams_loses_its_connection_only() {
    let s = setup_with("round-robin", 2, LIMITS).await;
    let listen = s.listen;
    while_a_neighbour_calls(listen, async {
        let abuser = RawClient::connect(listen).await;
        // 300 open streams against a limit of 50: the excess is refused, and refusing more
        // than 20 closes the connection.
        let block = request_block(listen, &[]);
        let mut flood = Vec::new();
        for i in 0..300u32 {
            flood.extend(frame::encode(HEADERS, END_HEADERS, 2 * i + 1, &block));
        }
        abuser.send(&flood).await;
        let code = abuser.wait_for_goaway("a GOAWAY for the abuser").await;
        assert_eq!(code, ENHANCE_YOUR_CALM);
        assert!(abuser.seen.lock().unwrap().resets > 0);
    })
    .await;
}

#[tokio::test]
async fn a_rapid_reset_flood_loses_its_connection_only() {
    let s = setup_with("round-robin", 2, LIMITS).await;
    let listen = s.listen;
    while_a_neighbour_calls(listen, async {
        let abuser = RawClient::connect(listen).await;
        let block = request_block(listen, &[]);
        let mut flood = Vec::new();
        for i in 0..2000u32 {
            let id = 2 * i + 1;
            flood.extend(frame::encode(HEADERS, END_HEADERS, id, &block));
            flood.extend(frame::encode(RST_STREAM, 0, id, &8u32.to_be_bytes()));
        }
        abuser.send(&flood).await;
        let code = abuser
            .wait_for_goaway("a GOAWAY for the rapid resetter")
            .await;
        assert_eq!(code, ENHANCE_YOUR_CALM);
    })
    .await;
    let m = s.agent.metrics();
    assert!(
        metric(&m, "balancer_client_connection_errors_total", &[]) >= 1.0,
        "{m}"
    );
}

#[tokio::test]
async fn oversized_header_lists_are_refused_and_a_flood_of_them_closes_the_connection() {
    let s = setup_with("round-robin", 1, LIMITS).await;
    let listen = s.listen;
    while_a_neighbour_calls(listen, async {
        // One header list above max_header_list_size (16 KiB): that stream is refused (HTTP
        // 431 or a reset), the connection stays usable.
        let abuser = RawClient::connect(listen).await;
        let big = "x".repeat(12 * 1024);
        let block = request_block(listen, &[("x-big-1", &big), ("x-big-2", &big)]);
        let (first, rest) = block.split_at(16 * 1024);
        let mut bytes = frame::encode(HEADERS, END_STREAM, 1, first);
        bytes.extend(frame::encode(CONTINUATION, END_HEADERS, 1, rest));
        abuser.send(&bytes).await;
        wait_until("stream 1 refused", BOUND, || {
            abuser.seen.lock().unwrap().answered.contains(&1)
        })
        .await;
        assert_eq!(abuser.seen.lock().unwrap().goaway, None);
        // A header block far beyond any limit, in many CONTINUATION frames: the connection
        // is closed rather than the proxy buffering it.
        let huge = "y".repeat(15 * 1024);
        let fields: Vec<(String, String)> = (0..20)
            .map(|i| (format!("x-huge-{i}"), huge.clone()))
            .collect();
        let refs: Vec<(&str, &str)> = fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let block = request_block(listen, &refs);
        let chunks: Vec<&[u8]> = block.chunks(16 * 1024).collect();
        let mut bytes = frame::encode(HEADERS, END_STREAM, 3, chunks[0]);
        for (i, c) in chunks[1..].iter().enumerate() {
            let flags = if i + 2 == chunks.len() {
                END_HEADERS
            } else {
                0
            };
            bytes.extend(frame::encode(CONTINUATION, flags, 3, c));
        }
        abuser.send(&bytes).await;
        let code = abuser
            .wait_for_goaway("a GOAWAY for the header flood")
            .await;
        // h2 stops at too many CONTINUATION frames (ENHANCE_YOUR_CALM), or, having dropped
        // the oversized block's bytes, fails to decode the rest (COMPRESSION_ERROR): either
        // way a connection error, never a buffered header list.
        assert!(
            [ENHANCE_YOUR_CALM, COMPRESSION_ERROR].contains(&code),
            "GOAWAY with error code {code}"
        );
    })
    .await;
}

#[tokio::test]
async fn plain_tcp_is_relayed_to_an_endpoint() {
    // A line echo server as the endpoint, speaking no HTTP/2 at all.
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(b"echo:").await.is_err() {
                        return;
                    }
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let listen = local_addr();
    let admin = local_addr();
    let agent = balancer_tests::agent::Agent::start(
        &balancer_tests::harness::config(listen, admin, "round-robin", &[echo_addr], ""),
        admin,
    )
    .await;
    let mut tcp = TcpStream::connect(listen).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let want = b"echo:GET / HTTP/1.1\r\n\r\n";
    let mut got = vec![0u8; want.len()];
    tokio::time::timeout(BOUND, tcp.read_exact(&mut got))
        .await
        .expect("the relay answers")
        .unwrap();
    assert_eq!(&got, want);
    // Both directions keep flowing on the same connection.
    tcp.write_all(b"second").await.unwrap();
    let mut got = vec![0u8; 11];
    tokio::time::timeout(BOUND, tcp.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"echo:second");
    let conns = agent.json("/api/connections");
    assert_eq!(conns.as_array().unwrap().len(), 1, "{conns}");
}

#[tokio::test]
async fn a_stream_whose_window_the_client_overflows_is_reset_and_its_call_cancelled() {
    // A call the backend would hold for 5 s; the client then grows the stream's window past
    // 2^31-1. The stream is reset (FLOW_CONTROL_ERROR), and the call ends everywhere: the
    // backend sees it cancelled and the proxy counts no call in flight.
    let s = setup("round-robin", 1).await;
    let abuser = RawClient::connect(s.listen).await;
    let mut bytes = frame::encode(HEADERS, END_HEADERS, 1, &request_block(s.listen, &[]));
    let body = grpc_frame(&HelloRequest {
        sleep_ms: 5_000,
        ..hello("overflow")
    });
    bytes.extend(frame::encode(DATA, END_STREAM, 1, &body));
    abuser.send(&bytes).await;
    // The backend's handler runs (the proxy counting the call in flight is not enough: the
    // request could still be on its way, and a call reset before it arrives is never seen).
    wait_until("the call to reach the backend", BOUND, || {
        s.backends[0]
            .stats
            .in_flight
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    })
    .await;
    abuser
        .send(&frame::encode(
            WINDOW_UPDATE,
            0,
            1,
            &0x7fff_ffffu32.to_be_bytes(),
        ))
        .await;
    wait_until("stream 1 reset", BOUND, || {
        abuser.seen.lock().unwrap().resets == 1
    })
    .await;
    wait_until("the backend to see the call cancelled", BOUND, || {
        s.backends[0]
            .stats
            .cancelled
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    })
    .await;
    wait_until("no call in flight", BOUND, || {
        metric(&s.agent.metrics(), "balancer_active_calls", &[]) == 0.0
    })
    .await;
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_loses_its_connection_only() {
    // Keepalive PINGs every 100 ms, 200 ms to answer each. tonic's client (h2) answers them;
    // the hand-written client answers none.
    let s = setup_with(
        "round-robin",
        1,
        "limits:\n  keepalive_interval_ms: 100\n  keepalive_timeout_ms: 200\n",
    )
    .await;
    let mut neighbour = client(s.listen).await;
    neighbour.say_hello(hello("before")).await.unwrap();
    let silent = RawClient::connect(s.listen).await;
    let code = silent.wait_for_goaway("the silent client's GOAWAY").await;
    assert_eq!(code, 0, "GOAWAY NO_ERROR");
    wait_until("the silent client's connection to close", BOUND, || {
        silent.seen.lock().unwrap().closed
    })
    .await;
    // The neighbour connected first and was pinged as often: it answered, so the silent
    // client's is the only connection closed.
    let m = s.agent.metrics();
    assert_eq!(
        metric(
            &m,
            "balancer_client_connection_errors_total",
            &["reason=\"keepalive_timeout\""]
        ),
        1.0
    );
    neighbour.say_hello(hello("after")).await.unwrap();
}
