//! Replacing a node's agent without failing a call.
//!
//! - The drain's two steps at the frame level (RFC 9113 §6.8): a first GOAWAY with 2^31-1, a
//!   PING, a second GOAWAY with the last stream once the PING is answered; every stream up to
//!   it is served, none is refused.

use std::{collections::BTreeMap, sync::atomic::Ordering::Relaxed, time::Duration};

use balancer_agent::wire::hpack;
use balancer_tests::{
    greeter,
    harness::{self, frame, grpc_frame},
    pb::HelloRequest,
    wait_until,
};
use tokio::{io::AsyncWriteExt, net::TcpStream};

const BOUND: Duration = Duration::from_secs(20);

/// The request HEADERS of a SayHello call on stream `sid`.
fn request(sid: u32) -> Vec<u8> {
    let block = frame::header_block(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/helloworld.Greeter/SayHello"),
        (":authority", "greeter"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]);
    frame::encode(frame::HEADERS, frame::END_HEADERS, sid, &block)
}

/// The request body of a call the backend holds `sleep_ms`.
fn body(sid: u32, sleep_ms: u32) -> Vec<u8> {
    let msg = grpc_frame(&HelloRequest {
        name: format!("stream {sid}"),
        sleep_ms,
        ..Default::default()
    });
    frame::encode(frame::DATA, frame::END_STREAM, sid, &msg)
}

/// What a raw client saw of one stream.
#[derive(Debug, Default)]
struct Seen {
    status: Option<String>,
    reset: Option<u32>,
}

#[tokio::test]
async fn the_drain_sends_two_goaways_and_serves_every_stream_up_to_the_second() {
    let backend = greeter::spawn("127.0.0.1:0", "backend-1").await;
    let (mut agent, listen) = harness::agent("round-robin", &[backend.addr], "").await;
    let mut sock = TcpStream::connect(listen).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame::encode(frame::SETTINGS, 0, 0, &[]));
    // Stream 1: a call the backend holds 1 s, in flight when the drain starts.
    out.extend(request(1));
    out.extend(body(1, 1000));
    sock.write_all(&out).await.unwrap();
    wait_until("the call in flight", BOUND, || {
        backend.stats.in_flight.load(Relaxed) == 1
    })
    .await;

    agent.sigterm();
    let (mut rd, mut wr) = sock.into_split();
    let mut dec = hpack::Decoder::default();
    let mut seen: BTreeMap<u32, Seen> = BTreeMap::new();
    let mut goaways = Vec::new();
    let mut drain_ping = None;
    let mut answered = false;
    let read = tokio::time::timeout(BOUND, async {
        while let Some((kind, flags, sid, payload)) = frame::read(&mut rd).await {
            match kind {
                frame::GOAWAY => {
                    let last = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                    goaways.push((last, code));
                }
                frame::PING if flags & frame::ACK == 0 => drain_ping = Some(payload),
                frame::SETTINGS if flags & frame::ACK == 0 => {
                    wr.write_all(&frame::encode(frame::SETTINGS, frame::ACK, 0, &[]))
                        .await
                        .unwrap();
                }
                frame::HEADERS => {
                    let s = seen.entry(sid).or_default();
                    dec.decode(&payload, 64 * 1024, &mut |n, v| {
                        if n == b"grpc-status" {
                            s.status = Some(String::from_utf8_lossy(v).into_owned());
                        }
                    })
                    .expect("a valid header block");
                }
                frame::RST_STREAM => {
                    let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    seen.entry(sid).or_default().reset = Some(code);
                }
                _ => {}
            }
            if goaways.len() == 1
                && !answered
                && let Some(ping) = &drain_ping
            {
                // A stream the client sent before it read the first GOAWAY: it arrives before
                // the PING's ACK, and must be served.
                let mut out = request(3);
                out.extend(body(3, 200));
                out.extend(frame::encode(frame::PING, frame::ACK, 0, ping));
                wr.write_all(&out).await.unwrap();
                answered = true;
            }
            if goaways.len() == 2 && !seen.contains_key(&5) {
                // A client that ignores both GOAWAYs: above the last stream, refused.
                let mut out = request(5);
                out.extend(body(5, 0));
                wr.write_all(&out).await.unwrap();
                seen.insert(5, Seen::default());
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the connection did not close: {goaways:?} {seen:?}"
    );
    const NO_ERROR: u32 = 0;
    const REFUSED_STREAM: u32 = 7;
    assert_eq!(
        goaways,
        [((1 << 31) - 1, NO_ERROR), (3, NO_ERROR)],
        "a first GOAWAY with 2^31-1, a second naming the last stream"
    );
    assert!(drain_ping.is_some(), "a PING followed the first GOAWAY");
    for sid in [1, 3] {
        let s = &seen[&sid];
        assert_eq!(s.reset, None, "stream {sid} reset: {seen:?}");
        assert_eq!(
            s.status.as_deref(),
            Some("0"),
            "stream {sid} served: {seen:?}"
        );
    }
    assert_eq!(seen[&5].reset, Some(REFUSED_STREAM), "{seen:?}");
    assert_eq!(
        backend.stats.calls.load(Relaxed),
        2,
        "the backend served streams 1 and 3, never 5"
    );
    let status = agent.wait_exit(BOUND).await.expect("the agent exits");
    assert!(status.success(), "{status}");
}
