//! gRPC semantics through a real `balancer-agent` process (standalone mode) and real tonic
//! backends: every call kind, metadata both ways, flow control, cancellation, deadlines,
//! large messages, refused streams and the proxy's own failures.

use std::{net::SocketAddr, sync::atomic::Ordering::Relaxed, time::Duration};

use balancer_agent::call::grpc::parse_timeout;
use balancer_tests::{
    greeter,
    harness::{
        GoAwayBackend, RawBackend, RawMode, agent, client, hello, hellos, local_addr, rss_kib,
        setup,
    },
    pb::HelloRequest,
    wait_until,
};
use bytes::Bytes;
use tokio::time::{Instant, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, metadata::MetadataValue};

const BOUND: Duration = Duration::from_secs(10);

#[tokio::test]
async fn unary_and_every_streaming_kind_pass_through() {
    let s = setup("round-robin", 2).await;
    let mut c = client(s.listen).await;

    let r = c.say_hello(hello("ada")).await.unwrap().into_inner();
    assert!(
        r.message.starts_with("Hello ada from backend-"),
        "{}",
        r.message
    );

    // Server streaming: every reply, in order.
    let mut req = hello("stream");
    req.count = 50;
    let mut replies = c.say_hello_stream(req).await.unwrap().into_inner();
    let mut indexes = Vec::new();
    while let Some(m) = replies.message().await.unwrap() {
        assert_eq!(m.message, format!("Hello stream from {}", m.backend));
        indexes.push(m.index);
    }
    assert_eq!(indexes, (0..50).collect::<Vec<u32>>());

    // Client streaming: the backend saw every message and byte.
    let msgs = hellos("n", 20, 1000, 7);
    let r = c
        .collect_hellos(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<String> = (0..20).map(|i| format!("n{i}")).collect();
    assert_eq!(r.index, 20);
    assert_eq!(
        r.message,
        format!("Hello {} from {} (20000 bytes)", names.join(","), r.backend)
    );

    // Bidirectional, in lock step: each reply arrives before the next request is sent, so
    // the proxy forwards both directions at once rather than buffering either.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = c.chat(ReceiverStream::new(rx)).await.unwrap().into_inner();
    for i in 0..10u32 {
        tx.send(hello(&format!("ping-{i}"))).await.unwrap();
        let m = timeout(BOUND, replies.message())
            .await
            .expect("a reply per message")
            .unwrap()
            .expect("the stream is open");
        assert_eq!(m.index, i);
        assert!(m.message.starts_with(&format!("Hello ping-{i} from ")));
    }
    drop(tx);
    assert!(replies.message().await.unwrap().is_none());
    assert_eq!(replies.trailers().await.unwrap().map(|_| ()), Some(()));
}

#[tokio::test]
async fn metadata_and_trailers_pass_unchanged() {
    let s = setup("round-robin", 1).await;
    let mut c = client(s.listen).await;
    let binary: &[u8] = &[0, 1, 2, 0x7f, 0x80, 0xfe, 0xff];

    let mut req = Request::new(hello("md"));
    req.metadata_mut().insert(
        "x-echo-plain",
        "value with spaces; and=signs".parse().unwrap(),
    );
    req.metadata_mut()
        .insert_bin("x-echo-blob-bin", MetadataValue::from_bytes(binary));
    let resp = c.say_hello(req).await.unwrap();
    assert_eq!(
        resp.metadata().get("x-echo-plain").unwrap(),
        "value with spaces; and=signs"
    );
    assert_eq!(
        resp.metadata()
            .get_bin("x-echo-blob-bin")
            .unwrap()
            .to_bytes()
            .unwrap(),
        Bytes::from_static(binary)
    );

    // A failing server-streaming call: replies, then trailers with the backend's status,
    // message (non-ASCII, percent-encoded on the wire) and metadata.
    let mut req = Request::new(HelloRequest {
        name: "t".into(),
        count: 3,
        fail_code: Code::FailedPrecondition as i32,
        fail_message: "précondition 100% failed".into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("x-echo-reason", "in-trailers".parse().unwrap());
    req.metadata_mut()
        .insert_bin("x-echo-tbin-bin", MetadataValue::from_bytes(binary));
    let mut replies = c.say_hello_stream(req).await.unwrap().into_inner();
    let mut n = 0;
    let status = loop {
        match replies.message().await {
            Ok(Some(_)) => n += 1,
            Ok(None) => panic!("the call should fail"),
            Err(status) => break status,
        }
    };
    assert_eq!(n, 3);
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(status.message(), "précondition 100% failed");
    assert_eq!(
        status.metadata().get("x-echo-reason").unwrap(),
        "in-trailers"
    );
    assert_eq!(
        status
            .metadata()
            .get_bin("x-echo-tbin-bin")
            .unwrap()
            .to_bytes()
            .unwrap(),
        Bytes::from_static(binary)
    );

    // A failing unary call: the backend's trailers-only answer, unchanged.
    let mut req = Request::new(HelloRequest {
        fail_code: Code::NotFound as i32,
        fail_message: "no such greeting".into(),
        ..hello("u")
    });
    req.metadata_mut()
        .insert("x-echo-unary", "yes".parse().unwrap());
    let status = c.say_hello(req).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), "no such greeting");
    assert_eq!(status.metadata().get("x-echo-unary").unwrap(), "yes");
}

#[tokio::test]
async fn a_slow_reader_throttles_the_backend_instead_of_growing_the_proxy() {
    const MIB: usize = 1024 * 1024;
    const COUNT: u32 = 64;
    let s = setup("round-robin", 1).await;
    let mut c = client(s.listen).await;
    let payload: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    let before = rss_kib(s.agent.pid());

    // 64 replies of 1 MiB each; the client reads none of them for now.
    let req = HelloRequest {
        name: "slow-reader".into(),
        count: COUNT,
        payload: payload.clone(),
        ..Default::default()
    };
    let mut replies = c.say_hello_stream(req).await.unwrap().into_inner();
    let stats = &s.backends[0].stats;

    // Wait until the backend stalls: no message handed to its transport for 500 ms.
    let (mut last, mut since) = (u64::MAX, Instant::now());
    wait_until("the backend to stall on flow control", BOUND * 3, || {
        let now = stats.sent.load(Relaxed);
        if now != last {
            (last, since) = (now, Instant::now());
        }
        now >= u64::from(COUNT) || since.elapsed() > Duration::from_millis(500)
    })
    .await;
    let sent = stats.sent.load(Relaxed);
    let grown_kib = rss_kib(s.agent.pid()).saturating_sub(before);
    println!(
        "backend sent {sent} of {COUNT} MiB while the client read nothing; agent RSS grew {grown_kib} KiB"
    );
    assert!(
        sent < u64::from(COUNT) / 2,
        "the backend could send {sent} MiB to a client that reads nothing"
    );
    assert!(
        grown_kib < 24 * 1024,
        "the agent grew by {grown_kib} KiB holding a stalled stream"
    );

    // Now read everything: all of it arrives, intact and in order.
    let mut n = 0;
    while let Some(m) = timeout(BOUND, replies.message())
        .await
        .expect("the stream moves once the client reads")
        .unwrap()
    {
        assert_eq!(m.index, n);
        assert!(m.payload == payload, "reply {n} corrupted");
        n += 1;
    }
    assert_eq!(n, COUNT);
}

#[tokio::test]
async fn client_cancellation_reaches_the_backend() {
    let s = setup("round-robin", 1).await;
    let c = client(s.listen).await;
    let stats = s.backends[0].stats.clone();

    // Unary: the client drops the call while the backend sleeps.
    let mut c1 = c.clone();
    let call = tokio::spawn(async move {
        let mut req = hello("cancel-me");
        req.sleep_ms = 30_000;
        c1.say_hello(req).await
    });
    wait_until("the call to reach the backend", BOUND, || {
        stats.in_flight.load(Relaxed) == 1
    })
    .await;
    call.abort();
    wait_until("the backend to see the call cancelled", BOUND, || {
        stats.cancelled.load(Relaxed) == 1 && stats.in_flight.load(Relaxed) == 0
    })
    .await;

    // Server streaming: the client stops reading after the first reply and drops the call.
    let mut c2 = c.clone();
    let mut req = hello("stream-cancel");
    req.count = 1000;
    req.sleep_ms = 20;
    let mut replies = c2.say_hello_stream(req).await.unwrap().into_inner();
    assert!(replies.message().await.unwrap().is_some());
    drop(replies);
    wait_until("the backend to see the stream cancelled", BOUND, || {
        stats.cancelled.load(Relaxed) == 2 && stats.in_flight.load(Relaxed) == 0
    })
    .await;
}

#[tokio::test]
async fn a_backend_reset_reaches_the_client_with_its_reason() {
    let raw = RawBackend::spawn(RawMode::ResetAfterReply(h2::Reason::ENHANCE_YOUR_CALM)).await;
    let (_agent, listen) = agent("round-robin", &[raw.addr], "").await;
    let mut c = client(listen).await;
    let mut replies = c
        .say_hello_stream(hello("reset"))
        .await
        .unwrap()
        .into_inner();
    let first = replies
        .message()
        .await
        .unwrap()
        .expect("the reply before the reset");
    assert_eq!(first.message, "one before the reset");
    // The backend never ends the stream otherwise: only the reset, passed on, ends it.
    let e = timeout(BOUND, replies.message())
        .await
        .expect("the reset reaches the client promptly")
        .unwrap_err();
    // tonic maps RST_STREAM(ENHANCE_YOUR_CALM) to RESOURCE_EXHAUSTED: the reason was kept.
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
}

#[tokio::test]
async fn the_deadline_is_enforced_and_passed_on() {
    let s = setup("round-robin", 1).await;
    let mut c = client(s.listen).await;
    let stats = &s.backends[0].stats;

    // The backend sees the time left in grpc-timeout.
    let mut req = Request::new(hello("deadline"));
    req.set_timeout(Duration::from_secs(5));
    let resp = c.say_hello(req).await.unwrap();
    let seen = resp
        .metadata()
        .get("x-received-grpc-timeout")
        .expect("the backend got a grpc-timeout");
    let seen = parse_timeout(seen.as_bytes()).unwrap();
    assert!(
        seen <= Duration::from_secs(5) && seen > Duration::from_secs(4),
        "{seen:?}"
    );

    // A backend slower than the deadline: DEADLINE_EXCEEDED, promptly, and the backend's
    // handler is cancelled. (A raw client: tonic's own client would time the call out itself
    // and hide what the proxy does.)
    let started = Instant::now();
    let answer = raw_unary(
        s.listen,
        HelloRequest {
            sleep_ms: 5_000,
            ..hello("slow")
        },
        &[("grpc-timeout", "200m")],
    )
    .await;
    let took = started.elapsed();
    println!("DEADLINE_EXCEEDED after {took:?}");
    // The proxy's deadline and the backend's (the time left, passed on) fall within the same
    // millisecond tick, so either may end the call: DEADLINE_EXCEEDED from the proxy, or
    // tonic's own answer to an expired grpc-timeout (CANCELLED "Timeout expired"). That the
    // proxy alone ends it is `the_proxy_itself_enforces_the_deadline`.
    let backend_timed_out = answer.status() == "1" && answer.message().starts_with("Timeout");
    assert!(answer.status() == "4" || backend_timed_out, "{answer:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    wait_until("the backend to see the call cancelled", BOUND, || {
        stats.cancelled.load(Relaxed) == 1
    })
    .await;
}

#[tokio::test]
async fn the_deadline_ends_a_stream_already_under_way() {
    // A server stream that would take 5 s; the deadline (300 ms) falls after its first
    // replies: the proxy ends it with DEADLINE_EXCEEDED in the trailers and cancels the
    // backend's side.
    let s = setup("round-robin", 1).await;
    let started = Instant::now();
    let answer = raw_call(
        s.listen,
        "SayHelloStream",
        HelloRequest {
            count: 100,
            sleep_ms: 50,
            ..hello("long stream")
        },
        &[("grpc-timeout", "300m")],
    )
    .await;
    let took = started.elapsed();
    assert!(!answer.trailers_only, "{answer:?}");
    assert!(answer.body_bytes > 0, "no reply before the deadline");
    assert_eq!(answer.status(), "4", "{answer:?}");
    assert!(answer.message().contains("deadline"), "{answer:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    wait_until("the backend to see the stream cancelled", BOUND, || {
        s.backends[0].stats.cancelled.load(Relaxed) == 1
    })
    .await;
}

#[tokio::test]
async fn the_proxy_itself_enforces_the_deadline() {
    // A backend that ignores grpc-timeout and never answers: only the proxy can end the call.
    let raw = RawBackend::spawn(RawMode::BlackHole).await;
    let (_agent, listen) = agent("round-robin", &[raw.addr], "").await;
    let answer = raw_unary(listen, hello("black-hole"), &[("grpc-timeout", "300m")]).await;
    assert_eq!(answer.status(), "4", "{answer:?}");
    assert!(answer.trailers_only, "{answer:?}");
    let message = answer.message();
    assert!(
        message.contains("deadline") && message.contains("greeter"),
        "{message}"
    );
    let headers = raw.stats.headers.lock().unwrap().clone();
    let sent = parse_timeout(headers[0]["grpc-timeout"].as_bytes()).unwrap();
    assert!(
        sent <= Duration::from_millis(300) && sent > Duration::ZERO,
        "{sent:?}"
    );
    // And the upstream stream was cancelled, not left open on the backend.
    wait_until("the proxy to reset the upstream stream", BOUND, || {
        raw.stats.reset_by_peer.load(Relaxed) == 1
    })
    .await;
}

#[tokio::test]
async fn messages_of_several_mebibytes_pass_both_ways() {
    let s = setup("round-robin", 1).await;
    let mut c = client(s.listen).await;
    for size in [4 * 1024 * 1024 + 1, 9 * 1024 * 1024] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 % 256) as u8).collect();
        let r = c
            .say_hello(HelloRequest {
                payload: payload.clone(),
                ..hello("big")
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.payload.len(), size);
        assert!(r.payload == payload, "payload of {size} bytes corrupted");
    }
    // Large messages on a bidirectional stream too.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = c.chat(ReceiverStream::new(rx)).await.unwrap().into_inner();
    for i in 0..3u8 {
        let payload = vec![i; 5 * 1024 * 1024];
        tx.send(HelloRequest {
            payload: payload.clone(),
            ..hello("big-chat")
        })
        .await
        .unwrap();
        let m = replies.message().await.unwrap().unwrap();
        assert!(m.payload == payload);
    }
}

#[tokio::test]
async fn refused_streams_are_replayed_on_another_endpoint() {
    // One endpoint refuses every stream unprocessed (as a server past its GOAWAY does).
    let refuser = RawBackend::spawn(RawMode::Refuse).await;
    let good = [
        greeter::spawn("127.0.0.1:0", "good-1").await,
        greeter::spawn("127.0.0.1:0", "good-2").await,
    ];
    let (_agent, listen) = agent(
        "round-robin",
        &[refuser.addr, good[0].addr, good[1].addr],
        "",
    )
    .await;
    let mut c = client(listen).await;
    for i in 0..60 {
        let r = c.say_hello(hello(&format!("r{i}"))).await;
        assert!(r.is_ok(), "call {i}: {r:?}");
    }
    // Client streaming with a small, complete body: replayed whole.
    for i in 0..20 {
        let msgs = hellos(&format!("c{i}-"), 4, 4096, 1);
        let r = c.collect_hellos(tokio_stream::iter(msgs)).await;
        let r = r.unwrap_or_else(|e| panic!("client-streaming call {i}: {e:?}"));
        assert_eq!(r.into_inner().index, 4);
    }
    let refused = refuser.stats.streams.load(Relaxed);
    println!("the refusing endpoint refused {refused} streams, all replayed");
    assert!(refused > 0, "the refusing endpoint was never tried");
}

#[tokio::test]
async fn refused_streaming_calls_are_replayed_mid_body() {
    // Streaming calls whose request is still open when the endpoint refuses them: the
    // first message already went to the refusing endpoint, more are to come. REFUSED_STREAM
    // says the endpoint processed nothing, so the proxy replays what it sent and goes on.
    let refuser = RawBackend::spawn(RawMode::Refuse).await;
    let good = greeter::spawn("127.0.0.1:0", "good").await;
    let (_agent, listen) = agent("round-robin", &[refuser.addr, good.addr], "").await;
    let mut c = client(listen).await;
    for call in 0..6 {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(HelloRequest {
            payload: vec![9; 2000],
            ..hello(&format!("first-{call}"))
        })
        .await
        .unwrap();
        let mut replies = timeout(BOUND, c.chat(ReceiverStream::new(rx)))
            .await
            .expect("response headers")
            .unwrap_or_else(|e| panic!("chat {call}: {e:?}"))
            .into_inner();
        for i in 0..3u32 {
            let m = timeout(BOUND, replies.message())
                .await
                .expect("a reply")
                .unwrap_or_else(|e| panic!("chat {call}, message {i}: {e:?}"))
                .unwrap();
            assert_eq!(m.index, i);
            assert_eq!(m.backend, "good");
            if i < 2 {
                tx.send(hello(&format!("next-{call}-{i}"))).await.unwrap();
            }
        }
        drop(tx);
        assert!(replies.message().await.unwrap().is_none());
    }
    assert!(refuser.stats.streams.load(Relaxed) > 0);
}

#[tokio::test]
async fn streams_above_a_goaway_last_stream_id_go_to_another_endpoint() {
    // An endpoint that, with one call in hand, answers a second stream with GOAWAY naming the
    // first as its last: the first call completes there, the others are replayed.
    let goaway = GoAwayBackend::spawn().await;
    let good = greeter::spawn("127.0.0.1:0", "good").await;
    let (_agent, listen) = agent("round-robin", &[goaway.addr, good.addr], "").await;
    let c = client(listen).await;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut by = Vec::new();
            for i in 0..10 {
                let r = c
                    .say_hello(hello(&format!("{t}-{i}")))
                    .await
                    .unwrap_or_else(|e| panic!("call {t}-{i}: {e:?}"));
                by.push(r.into_inner().backend);
            }
            by
        }));
    }
    let mut served = std::collections::HashMap::<String, usize>::new();
    for t in tasks {
        for b in t.await.unwrap() {
            *served.entry(b).or_default() += 1;
        }
    }
    let st = &goaway.stats;
    println!(
        "{served:?}; the GOAWAY endpoint answered {}, went away {} times, left {} streams unprocessed",
        st.answered.load(Relaxed),
        st.goaways.load(Relaxed),
        st.unprocessed.load(Relaxed)
    );
    assert_eq!(served.values().sum::<usize>(), 80);
    assert_eq!(
        served.get("goaway").copied().unwrap_or(0) as u64,
        st.answered.load(Relaxed),
        "a call the endpoint answered was lost"
    );
    assert!(
        st.unprocessed.load(Relaxed) > 0,
        "no stream went above a GOAWAY's last id"
    );
}

/// A backend shutting down gracefully (GOAWAY, then close) while calls flow. The proxy must
/// fail no call the backend had not accepted: those above the GOAWAY's last stream id, or
/// sent after it, go to the others. Calls the backend had accepted are its own: tonic (hyper)
/// can close the connection with accepted streams unanswered (a known hyper race on graceful
/// shutdown), and such a call cannot be replayed, since the backend may have run it. So at
/// most the calls in flight at the shutdown may fail, each naming the backend, and none after.
#[tokio::test]
async fn a_backend_shutting_down_gracefully_fails_no_call_it_did_not_accept() {
    const TASKS: usize = 8;
    let backends = [
        greeter::spawn("127.0.0.1:0", "b-1").await,
        greeter::spawn("127.0.0.1:0", "b-2").await,
        greeter::spawn("127.0.0.1:0", "b-3").await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let (_agent, listen) = agent("round-robin", &addrs, "").await;
    let c = client(listen).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let finished = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let mut c = c.clone();
        let (stop, finished) = (stop.clone(), finished.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(Relaxed) {
                let after_shutdown = finished.load(Relaxed);
                let req = HelloRequest {
                    sleep_ms: 5,
                    ..hello(&format!("t{t}-{ok}"))
                };
                match c.say_hello(req).await {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push((after_shutdown, e)),
                }
            }
            (ok, failed)
        }));
    }
    let b1 = &backends[0].stats;
    wait_until("calls to flow to b-1", BOUND, || {
        b1.calls.load(Relaxed) > 20
    })
    .await;
    backends[0].shutdown();
    wait_until("b-1 to finish its shutdown", BOUND, || {
        backends[0].is_finished()
    })
    .await;
    finished.store(true, Relaxed);
    // Keep the load on a while longer: calls now meet an endpoint that is gone.
    let after = backends[1].stats.calls.load(Relaxed);
    wait_until("more calls on the others", BOUND, || {
        backends[1].stats.calls.load(Relaxed) > after + 50
    })
    .await;
    stop.store(true, Relaxed);
    let (mut total, mut failures) = (0, Vec::new());
    for t in tasks {
        let (ok, failed) = t.await.unwrap();
        total += ok;
        failures.extend(failed);
    }
    println!(
        "{total} calls succeeded, {} failed, across a graceful shutdown of b-1",
        failures.len()
    );
    assert!(failures.len() <= TASKS, "{failures:?}");
    for (after_shutdown, e) in &failures {
        assert!(!after_shutdown, "a call failed after b-1 was gone: {e:?}");
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(
            e.message().contains(&backends[0].addr.to_string())
                && e.message().contains("connection lost"),
            "{e:?}"
        );
    }
}

/// One call through the proxy at `listen`, which must fail with UNAVAILABLE.
async fn unavailable(listen: SocketAddr) -> tonic::Status {
    let e = client(listen)
        .await
        .say_hello(hello("x"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    e
}

#[tokio::test]
async fn proxy_failures_are_trailers_only_statuses_a_person_can_act_on() {
    // No endpoint at all.
    let (_a, listen) = agent("round-robin", &[], "").await;
    let e = unavailable(listen).await;
    assert!(
        e.message().contains("greeter") && e.message().contains("no ready endpoint"),
        "{e:?}"
    );
    // Trailers-only on the wire: one HEADERS frame that ends the stream, with the status.
    let answer = raw_unary(listen, hello("raw"), &[]).await;
    assert!(answer.trailers_only, "{answer:?}");
    assert_eq!(answer.head.status(), 200);
    assert_eq!(answer.status(), "14");
    assert_eq!(answer.head.headers()["content-type"], "application/grpc");

    // An endpoint with nothing listening.
    let dead = local_addr();
    let (_a, listen) = agent("round-robin", &[dead], "").await;
    let e = unavailable(listen).await;
    assert!(e.message().contains(&dead.to_string()), "{e:?}");
    let answer = raw_unary(listen, hello("raw"), &[]).await;
    assert!(
        answer.trailers_only && answer.status() == "14",
        "{answer:?}"
    );
    assert!(answer.message().contains(&dead.to_string()), "{answer:?}");

    // Overload: two calls in flight fill limits.max_active_calls.
    let backend = greeter::spawn("127.0.0.1:0", "busy").await;
    let (_a, listen) = agent(
        "round-robin",
        &[backend.addr],
        "limits:\n  max_active_calls: 2\n",
    )
    .await;
    let c = client(listen).await;
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut c = c.clone();
        holders.push(tokio::spawn(async move {
            c.say_hello(HelloRequest {
                sleep_ms: 30_000,
                ..hello("hold")
            })
            .await
        }));
    }
    wait_until("two calls in flight", BOUND, || {
        backend.stats.in_flight.load(Relaxed) == 2
    })
    .await;
    let e = c
        .clone()
        .say_hello(hello("one too many"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_active_calls"), "{e:?}");
    for h in holders {
        h.abort();
    }
    // Once they are gone, calls are taken again.
    wait_until("the held calls to end", BOUND, || {
        backend.stats.in_flight.load(Relaxed) == 0
    })
    .await;
    let mut c = c.clone();
    balancer_tests::wait_until_async("a call to be taken again", BOUND, || {
        let mut c = c.clone();
        async move { c.say_hello(hello("again")).await.is_ok() }
    })
    .await;
    c.say_hello(hello("and again")).await.unwrap();
}

/// How a call made with the `h2` crate ended.
#[derive(Debug)]
struct RawAnswer {
    head: http::Response<()>,
    /// The response was one HEADERS frame that ended the stream.
    trailers_only: bool,
    /// The trailers, or the head's headers when trailers-only.
    end: http::HeaderMap,
    /// Response body bytes.
    body_bytes: usize,
}

impl RawAnswer {
    fn status(&self) -> &str {
        self.end
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
    }

    fn message(&self) -> String {
        self.end
            .get("grpc-message")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default()
    }
}

/// A unary SayHello with the `h2` crate, with `headers` added to the request, read to the end.
async fn raw_unary(
    addr: std::net::SocketAddr,
    request: HelloRequest,
    headers: &[(&str, &str)],
) -> RawAnswer {
    raw_call(addr, "SayHello", request, headers).await
}

/// A call of `method` with one request message, made with the `h2` crate, read to the end.
async fn raw_call(
    addr: std::net::SocketAddr,
    method: &str,
    request: HelloRequest,
    headers: &[(&str, &str)],
) -> RawAnswer {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/helloworld.Greeter/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let (resp, mut body) = send.send_request(req.body(()).unwrap(), false).unwrap();
    body.send_data(balancer_tests::harness::grpc_frame(&request), true)
        .unwrap();
    timeout(BOUND, async move {
        let resp = resp.await.unwrap();
        let trailers_only = resp.body().is_end_stream();
        let (parts, mut body) = resp.into_parts();
        let mut body_bytes = 0;
        let end = if trailers_only {
            parts.headers.clone()
        } else {
            while let Some(d) = body.data().await {
                let d = d.unwrap();
                body_bytes += d.len();
                let _ = body.flow_control().release_capacity(d.len());
            }
            body.trailers().await.unwrap().unwrap_or_default()
        };
        RawAnswer {
            head: http::Response::from_parts(parts, ()),
            trailers_only,
            end,
            body_bytes,
        }
    })
    .await
    .expect("the call ends")
}
