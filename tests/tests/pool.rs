//! Upstream connection pools, through a real `balancer-agent` process.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use balancer_tests::{
    agent::metric,
    greeter,
    harness::{
        RawBackend, RawMode, agent, client,
        frame::{
            self, ACK, DATA, END_HEADERS, END_STREAM, HEADERS, PING, RST_STREAM, SETTINGS,
            WINDOW_UPDATE,
        },
        grpc_frame, hello,
    },
    pb::{HelloReply, HelloRequest, greeter_client::GreeterClient},
    wait_until,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::watch,
    task::JoinHandle,
};
use tonic::transport::Channel;

const BOUND: Duration = Duration::from_secs(10);

/// A backend that takes at most 4 streams per connection.
async fn narrow_backend() -> greeter::Handle {
    greeter::spawn_with(
        "127.0.0.1:0",
        "narrow",
        greeter::Options {
            max_concurrent_streams: Some(4),
            ..Default::default()
        },
    )
    .await
}

/// `n` concurrent calls on `c` that each take `sleep_ms` on the backend.
fn slow_calls(
    c: &GreeterClient<Channel>,
    n: usize,
    sleep_ms: u32,
) -> Vec<JoinHandle<Result<tonic::Response<HelloReply>, tonic::Status>>> {
    (0..n)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move {
                c.say_hello(HelloRequest {
                    sleep_ms,
                    ..hello(&format!("slow-{i}"))
                })
                .await
            })
        })
        .collect()
}

#[tokio::test]
async fn a_backend_with_few_streams_per_connection_gets_more_connections() {
    let backend = narrow_backend().await;
    let (agent, listen) = agent("round-robin", &[backend.addr], "").await;
    let c = client(listen).await;
    let calls = slow_calls(&c, 24, 500);
    // While they run, the pool holds several connections to the one endpoint.
    let mut most = 0.0f64;
    wait_until("more than one pooled connection", BOUND, || {
        let m = agent.metrics();
        most = most.max(metric(&m, "balancer_endpoint_connections", &[]));
        most > 1.0
    })
    .await;
    for (i, c) in calls.into_iter().enumerate() {
        c.await
            .unwrap()
            .unwrap_or_else(|e| panic!("call {i}: {e:?}"));
    }
    let opened = backend.stats.connections.load(Relaxed);
    println!("pool held up to {most} connections; the backend accepted {opened}");
    assert!(opened >= 2, "{opened}");
    let api = agent.json("/api/endpoints");
    assert!(api[0]["connections"].as_u64().unwrap() >= 1, "{api}");
}

#[tokio::test]
async fn old_connections_are_replaced_while_calls_keep_succeeding() {
    let backend = greeter::spawn("127.0.0.1:0", "aging").await;
    let (_agent, listen) = agent(
        "round-robin",
        &[backend.addr],
        "pool:\n  max_connection_age_ms: 150\n",
    )
    .await;
    let mut c = client(listen).await;
    let mut calls = 0;
    // Call until the backend has seen three connections from the proxy; every call succeeds.
    let deadline = tokio::time::Instant::now() + BOUND;
    while backend.stats.connections.load(Relaxed) < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections were not replaced: {} after {calls} calls",
            backend.stats.connections.load(Relaxed)
        );
        c.say_hello(HelloRequest {
            sleep_ms: 10,
            ..hello(&format!("{calls}"))
        })
        .await
        .unwrap_or_else(|e| panic!("call {calls}: {e:?}"));
        calls += 1;
    }
    println!(
        "{calls} calls over {} connections",
        backend.stats.connections.load(Relaxed)
    );
}

#[tokio::test]
async fn idle_endpoint_connections_are_closed_and_opened_again_on_demand() {
    let backend = greeter::spawn("127.0.0.1:0", "idle").await;
    let (agent, listen) = agent(
        "round-robin",
        &[backend.addr],
        "pool:\n  idle_timeout_ms: 200\n",
    )
    .await;
    let mut c = client(listen).await;
    c.say_hello(hello("first")).await.unwrap();
    assert_eq!(backend.stats.connections.load(Relaxed), 1);
    wait_until("the idle pooled connection to close", BOUND, || {
        metric(&agent.metrics(), "balancer_endpoint_connections", &[]) == 0.0
    })
    .await;
    c.say_hello(hello("second")).await.unwrap();
    assert_eq!(backend.stats.connections.load(Relaxed), 2);
}

/// An endpoint that answers the HTTP/2 handshake (its SETTINGS, and the first PING) and then
/// falls silent, as a frozen or partitioned server does: it reads on but answers nothing.
async fn spawn_silent_endpoint() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut preface = [0u8; 24];
                if tcp.read_exact(&mut preface).await.is_err() {
                    return;
                }
                let _ = tcp.write_all(&frame::encode(SETTINGS, 0, 0, &[])).await;
                let mut pinged = false;
                while let Some((kind, flags, _, payload)) = frame::read(&mut tcp).await {
                    let answer = match kind {
                        SETTINGS if flags & ACK == 0 => frame::encode(SETTINGS, ACK, 0, &[]),
                        PING if flags & ACK == 0 && !pinged => {
                            pinged = true;
                            frame::encode(PING, ACK, 0, &payload)
                        }
                        _ => continue,
                    };
                    let _ = tcp.write_all(&answer).await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_endpoint_that_stops_answering_pings_is_dropped_and_its_calls_fail() {
    // Keepalive PINGs on pooled connections every 100 ms, 200 ms to answer. The call has no
    // deadline: without keepalive it would wait on the silent endpoint forever.
    let silent = spawn_silent_endpoint().await;
    let (_agent, listen) = agent(
        "round-robin",
        &[silent],
        "pool:\n  keepalive_interval_ms: 100\n  keepalive_timeout_ms: 200\n",
    )
    .await;
    let mut c = client(listen).await;
    let answer = tokio::time::timeout(BOUND, c.say_hello(hello("lost")))
        .await
        .expect("the call ended: keepalive found the endpoint gone");
    let e = answer.expect_err("a silent endpoint answers no call");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
}

#[tokio::test]
async fn a_call_beyond_every_connection_slot_stalls_no_other_call() {
    // The relay answers such a call RESOURCE_EXHAUSTED at once (one task serves a client
    // connection: waiting for a slot would stall its other calls).
    // One connection of 4 streams to the only endpoint: 4 slow calls take every slot.
    let backend = narrow_backend().await;
    let (_agent, listen) = agent(
        "round-robin",
        &[backend.addr],
        "pool:\n  max_connections_per_endpoint: 1\n",
    )
    .await;
    let c = client(listen).await;
    let slow = slow_calls(&c, 4, 1_000);
    wait_until("4 calls on the endpoint", BOUND, || {
        backend.stats.in_flight.load(Relaxed) == 4
    })
    .await;
    // A fifth call on the same client connection.
    let e = c
        .clone()
        .say_hello(hello("fifth"))
        .await
        .expect_err("no slot left");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("stream limit"), "{e:?}");
    // Answered while the slow calls still hold every slot.
    assert_eq!(backend.stats.in_flight.load(Relaxed), 4);
    // The client connection was not held up: the slow calls end well, and it takes more.
    for (i, s) in slow.into_iter().enumerate() {
        s.await
            .unwrap()
            .unwrap_or_else(|e| panic!("slow call {i}: {e:?}"));
    }
    c.clone().say_hello(hello("after")).await.unwrap();
}

/// An endpoint that accepts connections and answers nothing, not even the HTTP/2 handshake,
/// as a server stuck before its first byte does, until `release`: then it closes them (and
/// every later one at once), or, with `then`, joins them (and every later one) to that server,
/// which finds the bytes sent meanwhile waiting. Counts the connections it accepted.
async fn spawn_mute_endpoint(
    then: Option<SocketAddr>,
) -> (SocketAddr, Arc<AtomicUsize>, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let (release, released) = watch::channel(false);
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            count.fetch_add(1, Relaxed);
            let mut released = released.clone();
            tokio::spawn(async move {
                let _ = released.wait_for(|r| *r).await;
                if let Some(server) = then
                    && let Ok(mut up) = tokio::net::TcpStream::connect(server).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut up).await;
                }
            });
        }
    });
    (addr, accepted, release)
}

/// A hand-written client connection to `listen` whose call on stream 1 (request headers only,
/// so far) waits for the handshake of a [`spawn_mute_endpoint`] that counts in `accepted`.
async fn call_waiting_on(listen: SocketAddr, accepted: &AtomicUsize) -> tokio::net::TcpStream {
    let mut tcp = tokio::net::TcpStream::connect(listen).await.unwrap();
    let block = frame::header_block(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/helloworld.Greeter/SayHello"),
        (":authority", &listen.to_string()),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]);
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame::encode(SETTINGS, 0, 0, &[]));
    out.extend(frame::encode(HEADERS, END_HEADERS, 1, &block));
    tcp.write_all(&out).await.unwrap();
    wait_until(
        "the call to wait on the endpoint's handshake",
        BOUND,
        || accepted.load(Relaxed) > 0,
    )
    .await;
    tcp
}

#[tokio::test]
async fn a_call_waiting_for_a_new_connection_holds_up_no_other_call() {
    // Round-robin over an endpoint whose handshake never comes and a live one; the pool waits
    // up to 30 s for a handshake, far beyond this test's bounds.
    let (mute, accepted, release) = spawn_mute_endpoint(None).await;
    let live = greeter::spawn("127.0.0.1:0", "live").await;
    let (_agent, listen) = agent(
        "round-robin",
        &[mute, live.addr],
        "pool:\n  connect_timeout_ms: 30000\n",
    )
    .await;
    let c = client(listen).await;
    // Calls one at a time until one waits on the mute endpoint's handshake. Each carries
    // 1 MiB, more than the proxy keeps to replay a call: what the client sends while its call
    // waits is held under flow control, and sent once the call has a connection.
    let payload: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let mut waiting = None;
    for i in 0..4 {
        let mut cc = c.clone();
        let request = HelloRequest {
            payload: payload.clone(),
            ..hello(&format!("call-{i}"))
        };
        let call = tokio::spawn(async move { cc.say_hello(request).await });
        wait_until(
            "the call to end or the mute endpoint to be dialled",
            BOUND,
            || call.is_finished() || accepted.load(Relaxed) > 0,
        )
        .await;
        if accepted.load(Relaxed) > 0 {
            waiting = Some(call);
            break;
        }
        call.await.unwrap().expect("a call to the live endpoint");
    }
    let waiting = waiting.expect("round-robin sent a call to the mute endpoint");
    // Another call on the same client connection goes to the live endpoint meanwhile.
    let meanwhile = tokio::time::timeout(BOUND, c.clone().say_hello(hello("meanwhile")))
        .await
        .expect("a call answered while another waits for its endpoint's handshake")
        .expect("the live endpoint answers");
    assert_eq!(meanwhile.into_inner().backend, "live");
    assert!(
        !waiting.is_finished(),
        "the first call still waits for its handshake"
    );
    // The mute endpoint closes: the waiting call goes to the live one, before any byte of it
    // went upstream.
    release.send(true).unwrap();
    let reply = tokio::time::timeout(BOUND, waiting)
        .await
        .expect("the waiting call ended once its endpoint closed")
        .unwrap()
        .expect("sent to the live endpoint instead")
        .into_inner();
    assert_eq!(reply.backend, "live");
    assert!(reply.payload == payload, "the request arrived whole");
}

#[tokio::test]
async fn a_call_reset_while_it_waits_for_a_connection_gives_its_window_back() {
    // The only endpoint never completes a handshake, so the call waits. What its client sends
    // meanwhile is held against the client connection's window (65,535 bytes here): reset, the
    // call must give it back and be counted as cancelled at once, not when the connect gives
    // up (30 s).
    let (mute, accepted, _release) = spawn_mute_endpoint(None).await;
    let (agent, listen) = agent(
        "round-robin",
        &[mute],
        "pool:\n  connect_timeout_ms: 30000\nlimits:\n  initial_connection_window: 65535\n",
    )
    .await;
    let mut tcp = call_waiting_on(listen, &accepted).await;
    // The whole connection window, in DATA the call holds; then the reset.
    let window = 65_535usize;
    let mut out = Vec::new();
    for chunk in vec![0u8; window].chunks(16_384) {
        out.extend(frame::encode(DATA, 0, 1, chunk));
    }
    out.extend(frame::encode(RST_STREAM, 0, 1, &8u32.to_be_bytes()));
    tcp.write_all(&out).await.unwrap();
    let mut granted = 0usize;
    tokio::time::timeout(BOUND, async {
        while granted < window {
            let (kind, _, stream, payload) = frame::read(&mut tcp)
                .await
                .expect("the connection stays open");
            if kind == WINDOW_UPDATE && stream == 0 {
                granted += u32::from_be_bytes(payload[..4].try_into().unwrap()) as usize;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the connection window came back: {granted} of {window}"));
    assert_eq!(granted, window, "the connection window came back");
    wait_until("the cancelled call counted", BOUND, || {
        metric(
            &agent.metrics(),
            "balancer_calls_total",
            &["grpc_status=\"1\""],
        ) == 1.0
    })
    .await;
}

#[tokio::test]
async fn a_request_sent_while_its_call_waits_for_a_connection_arrives_whole() {
    // The call waits for its endpoint's handshake while its client sends the request message
    // and then request trailers (gRPC clients send none; HTTP/2 allows them): once the
    // endpoint answers, it gets the headers, the DATA and the trailers, and the call ends OK.
    let endpoint = RawBackend::spawn(RawMode::Record).await;
    let (late, accepted, release) = spawn_mute_endpoint(Some(endpoint.addr)).await;
    let (_agent, listen) = agent(
        "round-robin",
        &[late],
        "pool:\n  connect_timeout_ms: 30000\n",
    )
    .await;
    let mut tcp = call_waiting_on(listen, &accepted).await;
    let message = grpc_frame(&hello("held"));
    let trailers = frame::header_block(&[("x-request-trailer", "1")]);
    let mut out = frame::encode(DATA, 0, 1, &message);
    out.extend(frame::encode(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &trailers,
    ));
    out.extend(frame::encode(PING, 0, 0, b"12345678"));
    tcp.write_all(&out).await.unwrap();
    // The PING answered: the proxy read the request while the call waited.
    tokio::time::timeout(BOUND, async {
        while let Some((kind, flags, _, _)) = frame::read(&mut tcp).await {
            if kind == PING && flags & ACK != 0 {
                return;
            }
        }
        panic!("connection closed");
    })
    .await
    .expect("the PING answered");
    release.send(true).unwrap();
    tokio::time::timeout(BOUND, async {
        loop {
            let (kind, flags, stream, payload) = frame::read(&mut tcp)
                .await
                .expect("the connection stays open");
            match kind {
                HEADERS if stream == 1 && flags & END_STREAM != 0 => return,
                RST_STREAM if stream == 1 => panic!("the call was reset: {payload:?}"),
                _ => {}
            }
        }
    })
    .await
    .expect("the call answered");
    let requests = endpoint.stats.requests.lock().unwrap();
    let [(data, trailers)] = &requests[..] else {
        panic!("one request: {requests:?}");
    };
    assert_eq!(data[..], message[..], "the request message");
    let trailers = trailers.as_ref().expect("the request trailers");
    assert_eq!(trailers.get("x-request-trailer").unwrap(), "1");
}
