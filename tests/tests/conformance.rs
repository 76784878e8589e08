//! HTTP/2 conformance of the agent's frame relay, case by case after h2spec.
//!
//! [h2spec](https://github.com/summerwind/h2spec) is the usual conformance tester of HTTP/2
//! servers. This suite walks its case list for servers (`http2`: HTTP/2, `hpack`: RFC 7541,
//! `generic`: what every server must accept) against a real `balancer-agent` process in front
//! of a real greeter backend (or of a [`Recorder`], where what reaches the endpoint must be
//! seen frame by frame), writing the frames by hand, and asserts the exact reaction of each
//! case:
//!
//! - a connection error (RFC 9113 §5.4.1): GOAWAY with the error code, then the connection
//!   closes;
//! - a stream error (§5.4.2): RST_STREAM with the error code on that stream, and the
//!   connection goes on (a PING sent after it is answered);
//! - anything else: what the case asks for (a PING ACK with the payload sent, a SETTINGS ACK,
//!   the backend's `:status 200` response, DATA within the window), with no GOAWAY and no
//!   RST_STREAM on the way. "No reaction" is checked the h2spec way: a PING sent after the case
//!   must be answered.
//!
//! Every wait is bounded ([`BOUND`]); a failure names the case, what the RFC requires, what
//! the agent did, and every frame the agent sent since the handshake.
//!
//! The rules are RFC 9113's, which obsoletes RFC 7540 (h2spec's text). Where h2spec accepts a
//! connection error for a stream error, or several error codes, a case asserts what RFC 9113
//! requires most precisely (the first reaction it lists) and accepts only the alternatives
//! h2spec accepts (the others). A malformed request (RFC 9113 §8.1.1: bad field names or
//! values, connection-specific fields, wrong pseudo-header fields, a content-length the DATA
//! does not match) is a stream error PROTOCOL_ERROR, and, the agent being an intermediary, the
//! request must not reach the backend ([`Case::refused`], [`Case::refused_later`]); a good call
//! on the same connection after it must then be the only one the backend served.
//!
//! Where h2spec sends `GET /`, the cases send a unary gRPC call (`POST` to the greeter's
//! SayHello with one message), so that a request the agent should pass on is served by the
//! backend and one it should refuse is one the backend would have served.
//!
//! Naming: a module per h2spec section, with h2spec's (RFC 7540) numbering: `http2::s6_5_2`
//! is h2spec's `http2/6.5.2`; its doc names the RFC 9113 section where the numbers differ. In
//! it, `cN_*` is h2spec's case N of that section (`h2spec http2/6.5.2/1` in messages), and
//! `xN_*` a case h2spec lacks, for a rule its doc cites. Small sections share a module, their
//! tests named with the section: `hpack::s5_2_c1_*` is h2spec's `hpack/5.2/1`. `cargo test
//! --test conformance http2::s6_5` runs a section. Each case is one test, declared with
//! [`cases!`] when it is one of the scenarios below ([`reacts`], [`ignored`], [`succeeds`], the
//! malformed requests...), written out when it has steps of its own.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
    time::Duration,
};

use Reaction::{Connection, Stream};
use balancer_tests::{
    agent::Agent,
    greeter,
    harness::{
        self, Setup,
        frame::{
            self, ACK, CONTINUATION, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, PING,
            RST_STREAM, SETTINGS, WINDOW_UPDATE,
        },
        grpc_frame, hello, setup_with,
    },
    pb::{HelloReply, HelloRequest},
};
use tokio::{
    io::AsyncWriteExt,
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    time::{Instant, timeout_at},
};

/// How long the agent has for each reaction.
const BOUND: Duration = Duration::from_secs(5);

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// Frame types and flags the harness does not name (RFC 9113 §6).
const PRIORITY: u8 = 0x2;
const PUSH_PROMISE: u8 = 0x5;
/// A frame type no specification defines.
const UNKNOWN_TYPE: u8 = 0xff;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

// SETTINGS parameters (RFC 9113 §6.5.2).
const HEADER_TABLE_SIZE: u16 = 0x1;
const ENABLE_PUSH: u16 = 0x2;
const MAX_CONCURRENT_STREAMS: u16 = 0x3;
const INITIAL_WINDOW_SIZE: u16 = 0x4;
const MAX_FRAME_SIZE: u16 = 0x5;
const MAX_HEADER_LIST_SIZE: u16 = 0x6;

// Error codes (RFC 9113 §7).
const NO_ERROR: u32 = 0x0;
const PROTOCOL_ERROR: u32 = 0x1;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const STREAM_CLOSED: u32 = 0x5;
const FRAME_SIZE_ERROR: u32 = 0x6;
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;
const COMPRESSION_ERROR: u32 = 0x9;

/// The largest flow-control window, 2^31-1 (RFC 9113 §6.9.1).
const MAX_WINDOW: u32 = 0x7fff_ffff;

fn code_name(code: u32) -> String {
    const NAMES: [&str; 14] = [
        "NO_ERROR",
        "PROTOCOL_ERROR",
        "INTERNAL_ERROR",
        "FLOW_CONTROL_ERROR",
        "SETTINGS_TIMEOUT",
        "STREAM_CLOSED",
        "FRAME_SIZE_ERROR",
        "REFUSED_STREAM",
        "CANCEL",
        "COMPRESSION_ERROR",
        "CONNECT_ERROR",
        "ENHANCE_YOUR_CALM",
        "INADEQUATE_SECURITY",
        "HTTP_1_1_REQUIRED",
    ];
    NAMES
        .get(code as usize)
        .map_or_else(|| format!("{code:#x}"), |n| (*n).to_string())
}

// ---------------------------------------------------------------------------------------------
// What the agent sends, as the suite sees it.

/// One thing that came from the agent. A header block arrives whole (its CONTINUATION frames
/// folded in), decoded.
#[derive(Debug)]
enum Event {
    Settings {
        ack: bool,
    },
    Ping {
        ack: bool,
        payload: Vec<u8>,
    },
    Headers {
        sid: u32,
        end: bool,
        fields: Vec<(String, String)>,
    },
    Data {
        sid: u32,
        end: bool,
        len: usize,
    },
    Reset {
        sid: u32,
        code: u32,
    },
    GoAway {
        code: u32,
        debug: String,
    },
    Other {
        kind: u8,
        sid: u32,
    },
    Closed,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let end = |end: &bool| if *end { " END_STREAM" } else { "" };
        match self {
            Event::Settings { ack: true } => write!(f, "SETTINGS ACK"),
            Event::Settings { ack: false } => write!(f, "SETTINGS"),
            Event::Ping { ack, payload } => {
                let ack = if *ack { " ACK" } else { "" };
                write!(f, "PING{ack} {:?}", String::from_utf8_lossy(payload))
            }
            Event::Headers {
                sid,
                end: e,
                fields,
            } => {
                let fields: Vec<String> = fields.iter().map(|(n, v)| format!("{n}: {v}")).collect();
                write!(f, "HEADERS({sid}) [{}]{}", fields.join(", "), end(e))
            }
            Event::Data { sid, end: e, len } => write!(f, "DATA({sid}) {len} bytes{}", end(e)),
            Event::Reset { sid, code } => write!(f, "RST_STREAM({sid}) {}", code_name(*code)),
            Event::GoAway { code, debug } => write!(f, "GOAWAY {} {debug:?}", code_name(*code)),
            Event::Other { kind, sid } => write!(f, "frame type {kind:#x} on stream {sid}"),
            Event::Closed => write!(f, "closed the connection"),
        }
    }
}

/// An error the agent may answer a case with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reaction {
    /// A connection error: GOAWAY with this code, then the connection closes.
    Connection(u32),
    /// A stream error: RST_STREAM with this code on this stream; the connection goes on.
    Stream(u32, u32),
}

impl fmt::Display for Reaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reaction::Connection(code) => write!(f, "GOAWAY {} and close", code_name(*code)),
            Reaction::Stream(sid, code) => write!(f, "RST_STREAM({sid}) {}", code_name(*code)),
        }
    }
}

/// What to do with an event while waiting for something.
enum Step<T> {
    /// Not what is waited for: read on.
    Next,
    /// What was waited for.
    Done(T),
    /// The agent did something else; why the wait failed.
    Fail(String),
}

/// The step for an event that is not waited for: a GOAWAY, a reset or the close ends the wait.
fn interrupts<T>(event: &Event) -> Step<T> {
    match event {
        Event::GoAway { .. } | Event::Reset { .. } | Event::Closed => Step::Fail(event.to_string()),
        _ => Step::Next,
    }
}

// ---------------------------------------------------------------------------------------------
// A hand-written client connection.

/// A client connection to the agent that writes frames by hand. Reading answers the agent's
/// SETTINGS and PINGs and decodes its header blocks, as any client must.
struct Client {
    read: OwnedReadHalf,
    write: OwnedWriteHalf,
    /// The agent's SETTINGS.
    settings: HashMap<u16, u32>,
    /// The decoder of the agent's header blocks (its encoder indexes fields).
    hpack: Hpack,
    /// Everything the agent sent since the handshake, for failure messages.
    log: Vec<String>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Self {
        let tcp = tokio::time::timeout(BOUND, TcpStream::connect(addr))
            .await
            .expect("connecting within the bound")
            .expect("connecting to the agent");
        let (read, write) = tcp.into_split();
        Self {
            read,
            write,
            settings: HashMap::new(),
            hpack: Hpack::default(),
            log: Vec::new(),
        }
    }

    /// Writes `bytes`. A failed write is only logged: the agent may close the connection in
    /// the middle of a case, and the case's expectation says whether it should have.
    async fn send(&mut self, bytes: &[u8]) {
        if let Err(e) = self.write.write_all(bytes).await {
            self.log.push(format!("(our write failed: {e})"));
        }
    }

    /// The preface and an empty SETTINGS, then waits for the agent's SETTINGS and the ACK of
    /// ours.
    async fn handshake(&mut self) -> Result<(), String> {
        let mut hello = PREFACE.to_vec();
        hello.extend(settings(&[]));
        self.send(&hello).await;
        let (mut theirs, mut ours) = (false, false);
        self.until(|event| {
            match event {
                Event::Settings { ack: false } => theirs = true,
                Event::Settings { ack: true } => ours = true,
                _ => return interrupts(event),
            }
            if theirs && ours {
                Step::Done(())
            } else {
                Step::Next
            }
        })
        .await?;
        self.log.clear();
        Ok(())
    }

    /// The next event, or `None` at `deadline`.
    async fn next(&mut self, deadline: Instant) -> Option<Event> {
        let event = match timeout_at(deadline, frame::read(&mut self.read)).await {
            Err(_) => return None,
            // EOF, or a reset by the agent.
            Ok(None) => Event::Closed,
            Ok(Some((kind, flags, sid, payload))) => {
                self.event(kind, flags, sid, payload, deadline).await?
            }
        };
        self.log.push(event.to_string());
        Some(event)
    }

    async fn event(
        &mut self,
        kind: u8,
        flags: u8,
        sid: u32,
        payload: Vec<u8>,
        deadline: Instant,
    ) -> Option<Event> {
        let be32 = |b: &[u8]| {
            b.get(..4)
                .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        Some(match kind {
            SETTINGS => {
                let ack = flags & ACK != 0;
                if !ack {
                    for p in payload.chunks_exact(6) {
                        self.settings
                            .insert(u16::from_be_bytes([p[0], p[1]]), be32(&p[2..]));
                    }
                    self.send(&frame::encode(SETTINGS, ACK, 0, &[])).await;
                }
                Event::Settings { ack }
            }
            PING => {
                let ack = flags & ACK != 0;
                if !ack {
                    self.send(&frame::encode(PING, ACK, 0, &payload)).await;
                }
                Event::Ping { ack, payload }
            }
            HEADERS => {
                let mut block = fragment(flags, &payload).to_vec();
                let mut done = flags & END_HEADERS != 0;
                while !done {
                    match timeout_at(deadline, frame::read(&mut self.read))
                        .await
                        .ok()?
                    {
                        Some((CONTINUATION, f, _, more)) => {
                            block.extend_from_slice(&more);
                            done = f & END_HEADERS != 0;
                        }
                        Some((other, ..)) => {
                            self.log.push(format!(
                                "(frame type {other:#x} inside the agent's header block)"
                            ));
                            done = true;
                        }
                        None => return Some(Event::Closed),
                    }
                }
                let fields = self
                    .hpack
                    .decode(&block)
                    .unwrap_or_else(|e| vec![("(undecodable header block)".into(), e)]);
                Event::Headers {
                    sid,
                    end: flags & END_STREAM != 0,
                    fields,
                }
            }
            DATA => Event::Data {
                sid,
                end: flags & END_STREAM != 0,
                len: payload.len(),
            },
            RST_STREAM => Event::Reset {
                sid,
                code: be32(&payload),
            },
            GOAWAY => Event::GoAway {
                code: be32(payload.get(4..).unwrap_or_default()),
                debug: String::from_utf8_lossy(payload.get(8..).unwrap_or_default()).into(),
            },
            _ => Event::Other { kind, sid },
        })
    }

    /// Reads events until `step` decides, for at most [`BOUND`].
    async fn until<T>(&mut self, mut step: impl FnMut(&Event) -> Step<T>) -> Result<T, String> {
        let deadline = Instant::now() + BOUND;
        loop {
            let Some(event) = self.next(deadline).await else {
                return Err(format!("did nothing of the kind within {BOUND:?}"));
            };
            match step(&event) {
                Step::Done(t) => return Ok(t),
                Step::Fail(why) => return Err(why),
                Step::Next if matches!(event, Event::Closed) => return Err(event.to_string()),
                Step::Next => {}
            }
        }
    }

    /// Waits for one of the `accepted` reactions: a connection error must close the
    /// connection, a stream error must leave it usable.
    async fn reaction(&mut self, accepted: &[Reaction]) -> Result<Reaction, String> {
        let stream_error_on = |sid: u32| {
            accepted
                .iter()
                .any(|r| matches!(r, Stream(s, _) if *s == sid))
        };
        let any_stream_error = accepted.iter().any(|r| matches!(r, Stream(..)));
        let hit = self
            .until(|event| match *event {
                Event::GoAway { code, .. } if accepted.contains(&Connection(code)) => {
                    Step::Done(Connection(code))
                }
                Event::Reset { sid, code } if accepted.contains(&Stream(sid, code)) => {
                    Step::Done(Stream(sid, code))
                }
                // A reset of another stream than the one a stream error is expected on.
                Event::Reset { sid, .. } if any_stream_error && !stream_error_on(sid) => Step::Next,
                Event::GoAway { .. } | Event::Reset { .. } => Step::Fail(event.to_string()),
                Event::Headers { sid, end: true, .. } | Event::Data { sid, end: true, .. }
                    if stream_error_on(sid) =>
                {
                    Step::Fail(format!("ended stream {sid} normally ({event})"))
                }
                Event::Closed => Step::Fail("closed the connection without a GOAWAY".into()),
                _ => Step::Next,
            })
            .await?;
        let after = match hit {
            Connection(_) => self.closed().await,
            Stream(..) => self.ping(*b"after-rs").await,
        };
        after.map_err(|e| format!("sent {hit}, but then {e}"))?;
        Ok(hit)
    }

    /// Waits for the close; frames before it do not matter.
    async fn closed(&mut self) -> Result<(), String> {
        self.until(|event| match event {
            Event::Closed => Step::Done(()),
            _ => Step::Next,
        })
        .await
        .map_err(|_| format!("left the connection open for {BOUND:?}"))
    }

    /// Sends a PING and waits for its ACK; a GOAWAY, a reset or the close fails.
    async fn ping(&mut self, payload: [u8; 8]) -> Result<(), String> {
        self.send(&ping(payload)).await;
        self.pong(payload).await
    }

    /// Waits for the ACK of a PING with `payload`; a GOAWAY, a reset or the close fails.
    async fn pong(&mut self, payload: [u8; 8]) -> Result<(), String> {
        self.until(|event| match event {
            Event::Ping {
                ack: true,
                payload: p,
            } if p[..] == payload => Step::Done(()),
            Event::Ping { ack: true, .. } => {
                Step::Fail(format!("answered with {event}, not with the payload sent"))
            }
            _ => interrupts(event),
        })
        .await
    }

    /// Sends a PING and waits for its ACK or a graceful close (a GOAWAY NO_ERROR at most).
    async fn ping_or_close(&mut self, payload: [u8; 8]) -> Result<(), String> {
        self.send(&ping(payload)).await;
        self.until(|event| match event {
            Event::Ping {
                ack: true,
                payload: p,
            } if p[..] == payload => Step::Done(()),
            Event::GoAway { code: NO_ERROR, .. } => Step::Next,
            Event::Closed => Step::Done(()),
            _ => interrupts(event),
        })
        .await
    }

    /// Waits for the response header block of stream `sid`.
    async fn response(&mut self, sid: u32) -> Result<Vec<(String, String)>, String> {
        self.until(|event| match event {
            Event::Headers { sid: s, fields, .. } if *s == sid => Step::Done(fields.clone()),
            _ => interrupts(event),
        })
        .await
    }

    /// Waits for the next DATA frame of stream `sid`; returns its length.
    async fn data(&mut self, sid: u32) -> Result<usize, String> {
        self.until(|event| match *event {
            Event::Data { sid: s, len, .. } if s == sid => Step::Done(len),
            Event::Headers {
                sid: s, end: true, ..
            } if s == sid => Step::Fail(format!("ended stream {sid} without DATA ({event})")),
            _ => interrupts(event),
        })
        .await
    }

    /// Waits for the frame that ends stream `sid`.
    async fn stream_end(&mut self, sid: u32) -> Result<(), String> {
        self.until(|event| match *event {
            Event::Headers {
                sid: s, end: true, ..
            }
            | Event::Data {
                sid: s, end: true, ..
            } if s == sid => Step::Done(()),
            _ => interrupts(event),
        })
        .await
    }
}

/// The header block fragment of a HEADERS frame's payload: without padding and priority.
fn fragment(flags: u8, payload: &[u8]) -> &[u8] {
    let mut p = payload;
    if flags & PADDED != 0 && !p.is_empty() {
        let pad = usize::from(p[0]);
        p = &p[1..p.len().saturating_sub(pad).max(1)];
    }
    if flags & PRIORITY_FLAG != 0 {
        p = p.get(5..).unwrap_or_default();
    }
    p
}

// ---------------------------------------------------------------------------------------------
// An endpoint that shows what reached it.

/// An endpoint written on raw frames that records, per stream, what the agent passed on, and
/// answers every request that ends (END_STREAM) with a gRPC OK. For the malformed requests
/// whose fault shows after their header block: a greeter's own HTTP/2 server would reject
/// the fault itself, and an agent that passed it on and relayed the endpoint's reset would
/// look right from the client.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Recorded>>,
    task: tokio::task::JoinHandle<()>,
}

/// What reached a [`Recorder`].
#[derive(Debug, Default)]
struct Recorded {
    connections: u64,
    /// Per stream, in the order they opened: (connection, stream id), what reached it.
    streams: Vec<((u64, u32), Reached)>,
}

/// What of one stream reached a [`Recorder`].
#[derive(Debug, Default, Clone)]
struct Reached {
    /// HEADERS frames (request headers, then trailers, if any).
    header_blocks: usize,
    /// DATA bytes.
    data: usize,
    /// The request ended (END_STREAM).
    end: bool,
    /// The agent reset the stream, with this code.
    reset: Option<u32>,
}

impl Recorded {
    /// Requests that ended, each answered.
    fn served(&self) -> u64 {
        self.streams.iter().filter(|(_, r)| r.end).count() as u64
    }

    fn stream(&mut self, key: (u64, u32)) -> &mut Reached {
        let at = match self.streams.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                self.streams.push((key, Reached::default()));
                self.streams.len() - 1
            }
        };
        &mut self.streams[at].1
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    async fn spawn() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the recorder");
        let addr = listener.local_addr().expect("local addr");
        let seen = Arc::new(Mutex::new(Recorded::default()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let n = {
                    let mut s = s.lock().expect("not poisoned");
                    s.connections += 1;
                    s.connections
                };
                conns.spawn(record(tcp, n, s.clone()));
            }
        });
        Self { addr, seen, task }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.seen.lock().expect("not poisoned")
    }

    /// What reached the recorder of the first stream, if `streams` or more came, once the
    /// agent reset or ended it (or after [`BOUND`]).
    async fn first_settled(&self, streams: usize) -> Option<Reached> {
        let deadline = Instant::now() + BOUND;
        loop {
            let first = {
                let seen = self.seen();
                (seen.streams.len() >= streams).then(|| seen.streams[0].1.clone())
            };
            match first {
                Some(r) if r.end || r.reset.is_some() || Instant::now() > deadline => {
                    return Some(r);
                }
                None => return None,
                Some(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }
}

impl fmt::Display for Reached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let end = if self.end {
            "END_STREAM"
        } else {
            "no END_STREAM"
        };
        write!(
            f,
            "{} header block(s), {} bytes of DATA, {end}, ",
            self.header_blocks, self.data
        )?;
        match self.reset {
            Some(code) => write!(f, "then RST_STREAM {}", code_name(code)),
            None => write!(f, "no RST_STREAM"),
        }
    }
}

/// Serves one connection of the agent to a [`Recorder`].
async fn record(tcp: TcpStream, conn: u64, seen: Arc<Mutex<Recorded>>) {
    use tokio::io::AsyncReadExt;
    let (mut r, mut w) = tcp.into_split();
    let mut preface = [0u8; PREFACE.len()];
    if r.read_exact(&mut preface).await.is_err() || w.write_all(&settings(&[])).await.is_err() {
        return;
    }
    // A request whose HEADERS ended it, until its header block ends.
    let mut ending: Option<u32> = None;
    while let Some((kind, flags, sid, payload)) = frame::read(&mut r).await {
        let mut out = Vec::new();
        let mut ended = None;
        {
            let mut s = seen.lock().expect("not poisoned");
            match kind {
                SETTINGS if flags & ACK == 0 => out = frame::encode(SETTINGS, ACK, 0, &[]),
                PING if flags & ACK == 0 => out = frame::encode(PING, ACK, 0, &payload),
                HEADERS => {
                    s.stream((conn, sid)).header_blocks += 1;
                    if flags & END_STREAM != 0 {
                        ending = Some(sid);
                    }
                }
                DATA => {
                    let st = s.stream((conn, sid));
                    st.data += payload.len();
                    if flags & END_STREAM != 0 {
                        ended = Some(sid);
                    }
                }
                RST_STREAM => {
                    let code = payload
                        .get(..4)
                        .map_or(0, |b| u32::from_be_bytes(b.try_into().expect("4 bytes")));
                    s.stream((conn, sid)).reset = Some(code);
                }
                _ => {}
            }
            if matches!(kind, HEADERS | CONTINUATION) && flags & END_HEADERS != 0 {
                ended = ended.or(ending.take());
            }
            if let Some(sid) = ended {
                s.stream((conn, sid)).end = true;
                out.extend(grpc_ok(sid));
            }
        }
        if !out.is_empty() && w.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// A gRPC OK answer on stream `sid`: headers, one reply, trailers.
fn grpc_ok(sid: u32) -> Vec<u8> {
    let status = frame::header_block(&[(":status", "200"), ("content-type", "application/grpc")]);
    let reply = HelloReply {
        message: "recorded".into(),
        backend: "recorder".into(),
        ..Default::default()
    };
    let trailers = frame::header_block(&[("grpc-status", "0")]);
    [
        headers(sid, END_HEADERS, &status),
        data(sid, 0, &grpc_frame(&reply)),
        headers(sid, END_HEADERS | END_STREAM, &trailers),
    ]
    .concat()
}

// ---------------------------------------------------------------------------------------------
// Frames and requests.

fn headers(sid: u32, flags: u8, fragment: &[u8]) -> Vec<u8> {
    frame::encode(HEADERS, flags, sid, fragment)
}

/// A CONTINUATION frame carrying a field of [`dummy_block`] 0.
fn continuation(sid: u32, flags: u8) -> Vec<u8> {
    frame::encode(CONTINUATION, flags, sid, &dummy_block(0))
}

fn data(sid: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    frame::encode(DATA, flags, sid, payload)
}

/// The message of a unary call in DATA, ending the stream.
fn message_data(sid: u32) -> Vec<u8> {
    data(sid, END_STREAM, &message())
}

fn settings(values: &[(u16, u32)]) -> Vec<u8> {
    let payload: Vec<u8> = values
        .iter()
        .flat_map(|(id, v)| id.to_be_bytes().into_iter().chain(v.to_be_bytes()))
        .collect();
    frame::encode(SETTINGS, 0, 0, &payload)
}

fn ping(payload: [u8; 8]) -> Vec<u8> {
    frame::encode(PING, 0, 0, &payload)
}

fn window_update(sid: u32, increment: u32) -> Vec<u8> {
    frame::encode(WINDOW_UPDATE, 0, sid, &increment.to_be_bytes())
}

fn rst_stream(sid: u32, code: u32) -> Vec<u8> {
    frame::encode(RST_STREAM, 0, sid, &code.to_be_bytes())
}

fn goaway(last: u32, code: u32) -> Vec<u8> {
    let mut payload = last.to_be_bytes().to_vec();
    payload.extend(code.to_be_bytes());
    frame::encode(GOAWAY, 0, 0, &payload)
}

/// The 5 bytes of a priority: stream dependency (and the exclusive bit) and weight.
fn priority_fields(depends_on: u32, exclusive: bool, weight: u8) -> Vec<u8> {
    let dep = depends_on | if exclusive { 1 << 31 } else { 0 };
    let mut p = dep.to_be_bytes().to_vec();
    p.push(weight);
    p
}

fn priority(sid: u32, depends_on: u32, exclusive: bool, weight: u8) -> Vec<u8> {
    frame::encode(
        PRIORITY,
        0,
        sid,
        &priority_fields(depends_on, exclusive, weight),
    )
}

/// The greeter's unary method.
const GREETER: &str = "/helloworld.Greeter/SayHello";

/// The one message of a unary call.
fn message() -> Vec<u8> {
    grpc_frame(&hello("conformance")).to_vec()
}

/// The message of a call the backend holds for longer than any case lasts.
fn slow_message() -> Vec<u8> {
    grpc_frame(&HelloRequest {
        sleep_ms: 30_000,
        ..hello("slow")
    })
    .to_vec()
}

/// A message whose gRPC frame is exactly `len` bytes.
fn message_of(len: usize) -> Vec<u8> {
    let with = |n: usize| {
        grpc_frame(&HelloRequest {
            payload: vec![b'x'; n],
            ..hello("sized")
        })
    };
    // The protobuf overhead is the same for every payload length with a 2-byte varint.
    let n = len - (with(len - 64).len() - (len - 64));
    let m = with(n).to_vec();
    assert_eq!(m.len(), len, "a message of {len} bytes");
    m
}

/// The header fields of a request or of trailers, in order.
#[derive(Debug, Clone)]
struct Fields(Vec<(String, String)>);

impl Fields {
    /// The fields of a unary gRPC call to the greeter.
    fn grpc(authority: &str) -> Self {
        Self::of(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", GREETER),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ])
    }

    fn of(fields: &[(&str, &str)]) -> Self {
        Self(
            fields
                .iter()
                .map(|(n, v)| ((*n).into(), (*v).into()))
                .collect(),
        )
    }

    /// Appends a field.
    fn with(mut self, name: &str, value: &str) -> Self {
        self.0.push((name.into(), value.into()));
        self
    }

    /// Adds a field after the last pseudo-header field.
    fn with_pseudo(mut self, name: &str, value: &str) -> Self {
        let at = self
            .0
            .iter()
            .take_while(|(n, _)| n.starts_with(':'))
            .count();
        self.0.insert(at, (name.into(), value.into()));
        self
    }

    /// Adds a field before all others.
    fn first(mut self, name: &str, value: &str) -> Self {
        self.0.insert(0, (name.into(), value.into()));
        self
    }

    /// Sets the value of field `name`.
    fn set(mut self, name: &str, value: &str) -> Self {
        let f = self.0.iter_mut().find(|(n, _)| n == name);
        f.expect("a field to set").1 = value.into();
        self
    }

    fn without(mut self, name: &str) -> Self {
        self.0.retain(|(n, _)| n != name);
        self
    }

    /// The header block: literal fields without indexing, no Huffman coding.
    fn block(&self) -> Vec<u8> {
        let pairs: Vec<(&str, &str)> = self.0.iter().map(|(n, v)| (&n[..], &v[..])).collect();
        frame::header_block(&pairs)
    }
}

/// A header block of one field, `x-dummy<i>`, with a value of 100 bytes.
fn dummy_block(i: usize) -> Vec<u8> {
    Fields::of(&[(&format!("x-dummy{i}"), &"x".repeat(100))]).block()
}

// ---------------------------------------------------------------------------------------------
// HPACK (RFC 7541): what the cases need to write and to read.

/// An integer with an `n`-bit prefix, after the representation's `flags` (RFC 7541 §5.1).
fn hpack_int(flags: u8, n: u32, mut v: usize) -> Vec<u8> {
    let max = (1usize << n) - 1;
    if v < max {
        return vec![flags | v as u8];
    }
    let mut out = vec![flags | max as u8];
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
    out
}

/// A string literal, raw (RFC 7541 §5.2).
fn raw(s: &str) -> Vec<u8> {
    let mut out = hpack_int(0, 7, s.len());
    out.extend_from_slice(s.as_bytes());
    out
}

/// A string literal of Huffman-coded bytes (RFC 7541 §5.2).
fn huffman_literal(coded: &[u8]) -> Vec<u8> {
    let mut out = hpack_int(0x80, 7, coded.len());
    out.extend_from_slice(coded);
    out
}

/// A string literal, Huffman coded.
fn huff(s: &str) -> Vec<u8> {
    huffman_literal(&Bits::coding(s).finish(true))
}

/// The Huffman codes (RFC 7541 Appendix B) of the symbols the cases use: (code, bit length).
fn huffman_code(symbol: u8) -> (u32, u32) {
    match symbol {
        b'-' => (0x16, 6),
        b'2' => (0x2, 5),
        b'a' => (0x3, 5),
        b'c' => (0x4, 5),
        b'e' => (0x5, 5),
        b'g' => (0x26, 6),
        b'h' => (0x27, 6),
        b'n' => (0x2a, 6),
        b'p' => (0x2b, 6),
        b'r' => (0x2c, 6),
        b's' => (0x8, 5),
        b't' => (0x9, 5),
        b'u' => (0x2d, 6),
        b'x' => (0x79, 7),
        _ => panic!("no Huffman code in this suite for {:?}", symbol as char),
    }
}

/// The Huffman code of EOS (RFC 7541 Appendix B).
const EOS: (u32, u32) = (0x3fff_ffff, 30);

/// A bit writer for Huffman codes.
#[derive(Default)]
struct Bits {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    /// The Huffman codes of `s`, not padded yet.
    fn coding(s: &str) -> Self {
        let mut bits = Self::default();
        for b in s.bytes() {
            bits.push(huffman_code(b));
        }
        bits
    }

    fn push(&mut self, (code, len): (u32, u32)) {
        self.acc = (self.acc << len) | u64::from(code);
        self.n += len;
        while self.n >= 8 {
            self.n -= 8;
            self.out.push((self.acc >> self.n) as u8);
        }
        self.acc &= (1 << self.n) - 1;
    }

    /// The bytes, the last one padded with ones (the EOS prefix, as RFC 7541 §5.2 requires)
    /// or with zeros.
    fn finish(mut self, pad_with_ones: bool) -> Vec<u8> {
        if self.n > 0 {
            let pad = 8 - self.n;
            let ones = if pad_with_ones { (1 << pad) - 1 } else { 0 };
            self.out.push(((self.acc << pad) | ones) as u8);
        }
        self.out
    }
}

/// The static table (RFC 7541 Appendix A).
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// The index of the static table's `user-agent` entry.
const USER_AGENT: usize = 58;

/// A decoder of the agent's header blocks, with the dynamic table of a connection. The
/// suite's own, not the agent's: it checks the agent's encoder (hence the static table
/// written out above, as the agent's decoder has it too).
#[derive(Debug)]
struct Hpack {
    table: VecDeque<(String, String)>,
    size: usize,
    max: usize,
}

impl Default for Hpack {
    fn default() -> Self {
        // SETTINGS_HEADER_TABLE_SIZE: the suite sends none, so the protocol's default.
        Self {
            table: VecDeque::new(),
            size: 0,
            max: 4096,
        }
    }
}

impl Hpack {
    fn decode(&mut self, mut b: &[u8]) -> Result<Vec<(String, String)>, String> {
        let mut fields = Vec::new();
        while let Some(&first) = b.first() {
            if first & 0x80 != 0 {
                let i = int(&mut b, 7)?;
                fields.push(self.entry(i)?);
            } else if first & 0xe0 == 0x20 {
                self.max = int(&mut b, 5)?;
                self.evict();
            } else {
                // Literal: with incremental indexing (01), without (0000), never indexed (0001).
                let (prefix, index) = if first & 0x40 != 0 {
                    (6, true)
                } else {
                    (4, false)
                };
                let name = match int(&mut b, prefix)? {
                    0 => string(&mut b)?,
                    i => self.entry(i)?.0,
                };
                let value = string(&mut b)?;
                if index {
                    self.size += name.len() + value.len() + 32;
                    self.table.push_front((name.clone(), value.clone()));
                    self.evict();
                }
                fields.push((name, value));
            }
        }
        Ok(fields)
    }

    fn entry(&self, i: usize) -> Result<(String, String), String> {
        match i {
            1..=61 => {
                let (n, v) = STATIC_TABLE[i - 1];
                Ok((n.into(), v.into()))
            }
            _ => self
                .table
                .get(i.wrapping_sub(62))
                .cloned()
                .ok_or_else(|| format!("no table entry {i}")),
        }
    }

    fn evict(&mut self) {
        while self.size > self.max {
            let (n, v) = self
                .table
                .pop_back()
                .expect("entries while the size is positive");
            self.size -= n.len() + v.len() + 32;
        }
    }
}

fn int(b: &mut &[u8], prefix: u32) -> Result<usize, String> {
    let max = (1usize << prefix) - 1;
    let (&first, rest) = b.split_first().ok_or("truncated integer")?;
    *b = rest;
    let mut v = usize::from(first) & max;
    if v < max {
        return Ok(v);
    }
    let mut shift = 0;
    loop {
        let (&byte, rest) = b.split_first().ok_or("truncated integer")?;
        *b = rest;
        v += usize::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 || shift > 28 {
            return Ok(v);
        }
    }
}

fn string(b: &mut &[u8]) -> Result<String, String> {
    let huffman = b.first().is_some_and(|f| f & 0x80 != 0);
    let len = int(b, 7)?;
    if b.len() < len {
        return Err("truncated string".into());
    }
    let (s, rest) = b.split_at(len);
    *b = rest;
    let mut out = Vec::new();
    if huffman {
        // The agent's decoder, checked against RFC 7541's examples by its own tests, for the
        // agent's own strings (its encoder writes none today).
        balancer_agent::wire::huffman::decode(s, &mut out)
            .map_err(|e| format!("bad Huffman string: {e:?}"))?;
    } else {
        out.extend_from_slice(s);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

// ---------------------------------------------------------------------------------------------
// A case.

/// One case: an agent in front of one backend, and a hand-written connection to it. Its
/// checks panic with the case id, what was expected and what the agent did.
struct Case {
    id: &'static str,
    _agent: Agent,
    listen: SocketAddr,
    backend: Backend,
    c: Client,
}

/// The endpoint behind the agent.
enum Backend {
    /// A real greeter: tonic on h2.
    Greeter(greeter::Handle),
    /// The raw-frame endpoint that shows what reached it ([`Recorder`]).
    Recorder(Recorder),
}

impl Case {
    /// An agent with the default configuration over a greeter; the connection is past the
    /// handshake.
    async fn start(id: &'static str) -> Self {
        Self::start_with(id, "").await
    }

    /// An agent with `extra` configuration over a greeter; the connection is past the
    /// handshake.
    async fn start_with(id: &'static str, extra: &str) -> Self {
        let mut case = Self::connected(id, extra).await;
        case.handshake().await;
        case
    }

    /// An agent over a [`Recorder`]; the connection is past the handshake.
    async fn start_recorded(id: &'static str) -> Self {
        let recorder = Recorder::spawn().await;
        let (agent, listen) = harness::agent("round-robin", &[recorder.addr], "").await;
        let mut case = Self::over(id, agent, listen, Backend::Recorder(recorder)).await;
        case.handshake().await;
        case
    }

    /// An agent over a greeter, and a TCP connection to it, nothing sent yet.
    async fn connected(id: &'static str, extra: &str) -> Self {
        let Setup {
            agent,
            mut backends,
            listen,
        } = setup_with("round-robin", 1, extra).await;
        Self::over(id, agent, listen, Backend::Greeter(backends.remove(0))).await
    }

    /// A TCP connection to `agent`, listening on `listen`, in front of `backend`.
    async fn over(id: &'static str, agent: Agent, listen: SocketAddr, backend: Backend) -> Self {
        let c = Client::connect(listen).await;
        Self {
            id,
            _agent: agent,
            listen,
            backend,
            c,
        }
    }

    async fn handshake(&mut self) {
        let shake = self.c.handshake().await;
        self.check(shake, "the handshake: its SETTINGS and the ACK of ours");
    }

    fn fail(&self, expected: impl fmt::Display, got: &str) -> ! {
        panic!(
            "{}: expected {expected}; the agent {got}.\n  frames from the agent: [{}]",
            self.id,
            self.c.log.join(", ")
        )
    }

    fn check<T>(&self, r: Result<T, String>, expected: impl fmt::Display) -> T {
        r.unwrap_or_else(|got| self.fail(expected, &got))
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.c.send(bytes).await;
    }

    /// Calls the backend has served.
    fn calls(&self) -> u64 {
        match &self.backend {
            Backend::Greeter(g) => g.stats.calls.load(Relaxed),
            Backend::Recorder(r) => r.seen().served(),
        }
    }

    /// Connections the backend has accepted.
    fn connections(&self) -> u64 {
        match &self.backend {
            Backend::Greeter(g) => g.stats.connections.load(Relaxed),
            Backend::Recorder(r) => r.seen().connections,
        }
    }

    fn setting(&self, id: u16) -> Option<u32> {
        self.c.settings.get(&id).copied()
    }

    /// The agent's SETTINGS_MAX_FRAME_SIZE.
    fn max_frame(&self) -> usize {
        self.setting(MAX_FRAME_SIZE).unwrap_or(16_384) as usize
    }

    fn request(&self) -> Fields {
        Fields::grpc(&self.listen.to_string())
    }

    /// A whole unary call on stream `sid`: HEADERS, then its message in DATA with END_STREAM.
    fn call(&self, sid: u32) -> Vec<u8> {
        [self.open(sid), message_data(sid)].concat()
    }

    /// A whole call whose backend holds it: the stream stays half-closed (remote).
    fn slow_call(&self, sid: u32) -> Vec<u8> {
        [self.open(sid), data(sid, END_STREAM, &slow_message())].concat()
    }

    /// A request that ends in its HEADERS (END_STREAM), on stream `sid`.
    fn bodiless(&self, sid: u32) -> Vec<u8> {
        headers(sid, END_HEADERS | END_STREAM, &self.request().block())
    }

    /// The HEADERS of a call on stream `sid`, without END_STREAM: the stream stays open.
    fn open(&self, sid: u32) -> Vec<u8> {
        headers(sid, END_HEADERS, &self.request().block())
    }

    /// The HEADERS of a call on stream `sid` without END_HEADERS: its header block is to go
    /// on in CONTINUATION frames.
    fn block_begun(&self, sid: u32) -> Vec<u8> {
        headers(sid, 0, &self.request().block())
    }

    /// One of `accepted` (the RFC's first, then what h2spec also accepts).
    async fn expect(&mut self, accepted: &[Reaction]) {
        let r = self.c.reaction(accepted).await;
        let names: Vec<String> = accepted.iter().map(Reaction::to_string).collect();
        self.check(r, names.join(", or "));
    }

    /// Nothing but the ACK of a PING sent now.
    async fn no_reaction(&mut self) {
        let r = self.c.ping(*b"no-react").await;
        self.check(
            r,
            "no reaction: the PING sent after the case answered, nothing else",
        );
    }

    /// The ACK of a PING sent now, or a graceful close.
    async fn ping_or_close(&mut self) {
        let r = self.c.ping_or_close(*b"or-close").await;
        self.check(
            r,
            "the PING sent after the case answered, or a graceful close",
        );
    }

    async fn settings_ack(&mut self) {
        let r = self
            .c
            .until(|event| match event {
                Event::Settings { ack: true } => Step::Done(()),
                _ => interrupts(event),
            })
            .await;
        self.check(r, "a SETTINGS ACK");
    }

    /// Sends SETTINGS and waits for their ACK.
    async fn settle(&mut self, values: &[(u16, u32)]) {
        self.send(&settings(values)).await;
        self.settings_ack().await;
    }

    /// The backend's `:status 200` on stream `sid`, and `calls` calls served by the backend.
    async fn answered(&mut self, sid: u32, calls: u64) {
        self.response_200(sid).await;
        self.served(calls);
    }

    /// The backend's `:status 200` on stream `sid`.
    async fn response_200(&mut self, sid: u32) {
        let r = self.c.response(sid).await;
        let fields = self.check(r, format!("a response on stream {sid}"));
        if field(&fields, ":status") != Some("200") {
            self.fail(
                format!("the backend's :status 200 on stream {sid}"),
                &format!("answered {fields:?}"),
            );
        }
    }

    /// Asserts the backend served `calls` calls.
    fn served(&self, calls: u64) {
        let served = self.calls();
        if served != calls {
            self.fail(
                format!("{calls} call(s) served by the backend"),
                &format!("had the backend serve {served}"),
            );
        }
    }

    /// Any response on stream `sid` (a request the backend need not serve).
    async fn responded(&mut self, sid: u32) {
        let r = self.c.response(sid).await;
        let fields = self.check(r, format!("a response on stream {sid}"));
        if field(&fields, ":status").is_none() {
            self.fail(
                format!("a response with a :status on stream {sid}"),
                &format!("answered {fields:?}"),
            );
        }
    }

    /// The length of the next DATA frame of stream `sid`.
    async fn next_data(&mut self, sid: u32) -> usize {
        let r = self.c.data(sid).await;
        self.check(r, format!("DATA on stream {sid}"))
    }

    /// Asserts the next DATA frame of stream `sid` is 1 byte: all its window allows.
    async fn one_byte_of_data(&mut self, sid: u32) {
        let len = self.next_data(sid).await;
        if len != 1 {
            self.fail(
                format!("DATA({sid}) of 1 byte, the stream's window"),
                &format!("sent DATA({sid}) of {len} bytes"),
            );
        }
    }

    async fn stream_end(&mut self, sid: u32) {
        let r = self.c.stream_end(sid).await;
        self.check(r, format!("the end of stream {sid}"));
    }

    /// The connection closes; a GOAWAY before, if any, carries `code`.
    async fn closes(&mut self, code: u32) {
        let r = self
            .c
            .until(|event| match *event {
                Event::Closed => Step::Done(()),
                Event::GoAway { code: c, .. } if c != code => Step::Fail(event.to_string()),
                _ => Step::Next,
            })
            .await;
        self.check(
            r,
            format!(
                "the connection closed (after a GOAWAY {}, if any)",
                code_name(code)
            ),
        );
    }

    /// The request on stream `sid` refused as malformed (RFC 9113 §8.1.1): RST_STREAM
    /// PROTOCOL_ERROR, and the connection goes on. The fault is in the request's header
    /// block, so the request must not reach the backend at all: no call served, not even a
    /// connection (the agent opens endpoint connections for the calls it routes only). Then a
    /// good call on the same connection is the only one the backend serves.
    async fn refused(&mut self, sid: u32) {
        let reaction = self.c.reaction(&[Stream(sid, PROTOCOL_ERROR)]).await;
        let (calls, connections) = (self.calls(), self.connections());
        let passed_on = calls > 0 || connections > 0;
        if reaction.is_err() || passed_on {
            let what = reaction.err().unwrap_or_else(|| "reset the stream".into());
            let verdict = if passed_on {
                ": it passed the request on"
            } else {
                ""
            };
            self.fail(
                format!("RST_STREAM({sid}) PROTOCOL_ERROR, and the request kept from the backend"),
                &format!(
                    "{what}; the backend served {calls} call(s) and accepted {connections} \
                     connection(s){verdict}"
                ),
            );
        }
        self.barrier(sid + 2).await;
    }

    /// The request on stream `sid` refused as malformed (RFC 9113 §8.1.1) for a frame after
    /// its header block: RST_STREAM PROTOCOL_ERROR, and the connection goes on. The agent may
    /// have passed the headers on before the fault showed, but not the fault: after a good
    /// call on the same connection (which the agent routes after the bad one), the
    /// [`Recorder`] behind it must have seen of the bad one at most the header block and
    /// `max_data` bytes of DATA, no END_STREAM, and a reset from the agent; and served the
    /// good call only.
    async fn refused_later(&mut self, sid: u32, max_data: usize) {
        let reaction = self.c.reaction(&[Stream(sid, PROTOCOL_ERROR)]).await;
        // The bad request is the first stream to reach the recorder, if it reached it; the
        // good call, when made, the next.
        let mut streams = 1;
        if reaction.is_ok() {
            let next = sid + 2;
            let call = self.call(next);
            self.send(&call).await;
            self.response_200(next).await;
            streams = 2;
        }
        let Backend::Recorder(recorder) = &self.backend else {
            unreachable!("refused_later runs over a recorder")
        };
        let reached = recorder.first_settled(streams).await;
        let passed_on = reached.as_ref().is_some_and(|r| {
            r.header_blocks > 1 || r.data > max_data || r.end || r.reset.is_none()
        });
        if reaction.is_err() || passed_on {
            let what = reaction.err().unwrap_or_else(|| "reset the stream".into());
            let got = reached.map_or_else(|| "nothing of it".into(), |r| r.to_string());
            self.fail(
                format!(
                    "RST_STREAM({sid}) PROTOCOL_ERROR, and at most the header block and \
                     {max_data} bytes of DATA passed on to the backend, then reset"
                ),
                &format!("{what}; the backend got {got}"),
            );
        }
        self.served(1);
    }

    /// A good call on stream `sid` is answered, and is the only one the backend served.
    async fn barrier(&mut self, sid: u32) {
        let call = self.call(sid);
        self.send(&call).await;
        self.answered(sid, 1).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios the cases share.

/// A case over a greeter that has sent `frames` (built for the case's agent).
async fn sent(id: &'static str, frames: impl FnOnce(&Case) -> Vec<u8>) -> Case {
    let mut case = Case::start(id).await;
    let bytes = frames(&case);
    case.send(&bytes).await;
    case
}

/// The client's preface, then the agent's: a SETTINGS frame (not an ACK) first.
async fn settings_first(id: &'static str) {
    let mut case = Case::connected(id, "").await;
    case.send(&[PREFACE.to_vec(), settings(&[(INITIAL_WINDOW_SIZE, 65_535)])].concat())
        .await;
    let first = case
        .c
        .until(|event| match event {
            Event::Settings { ack: false } => Step::Done(()),
            _ => Step::Fail(format!("sent {event} first")),
        })
        .await;
    case.check(first, "a SETTINGS frame (not an ACK) as its first frame");
}

/// Sends `frames` and expects one of `accepted`.
async fn reacts(id: &'static str, frames: impl FnOnce(&Case) -> Vec<u8>, accepted: &[Reaction]) {
    sent(id, frames).await.expect(accepted).await;
}

/// Sends `frames`, then a PING, which must be answered: the frames changed nothing.
async fn ignored(id: &'static str, frames: impl FnOnce(&Case) -> Vec<u8>) {
    sent(id, frames).await.no_reaction().await;
}

/// Sends `frames`, then a PING, which must be answered unless the agent closes the
/// connection gracefully (h2spec accepts either where the client itself ends something).
async fn tolerated(id: &'static str, frames: impl FnOnce(&Case) -> Vec<u8>) {
    sent(id, frames).await.ping_or_close().await;
}

/// Sends `frames`, a call on stream 1, which the backend must serve: `:status 200`.
async fn succeeds(id: &'static str, frames: impl FnOnce(&Case) -> Vec<u8>) {
    sent(id, frames).await.answered(1, 1).await;
}

/// With the stream windows set by `initial` (acknowledged), sends `frames`, a call on stream
/// 1 among others: its response's first DATA must be 1 byte, all the window allows.
async fn window_of_one(
    id: &'static str,
    initial: &[(u16, u32)],
    frames: impl FnOnce(&Case) -> Vec<u8>,
) {
    let mut case = Case::start(id).await;
    case.settle(initial).await;
    let bytes = frames(&case);
    case.send(&bytes).await;
    case.one_byte_of_data(1).await;
}

/// A whole call on stream 1 whose header fields `fields` makes malformed (it changes the
/// good ones): [`Case::refused`].
async fn malformed_request(id: &'static str, fields: impl FnOnce(Fields) -> Fields) {
    let mut case = Case::start(id).await;
    let bytes = [
        headers(1, END_HEADERS, &fields(case.request()).block()),
        message_data(1),
    ];
    case.send(&bytes.concat()).await;
    case.refused(1).await;
}

/// A call on stream 1 that is malformed after its header block, over a [`Recorder`]: the
/// request HEADERS (`fields` changes the good ones), then `rest` of it, given the message
/// (the frames that make it malformed); at most `max_data` bytes of DATA may reach the
/// backend: [`Case::refused_later`].
async fn malformed_later(
    id: &'static str,
    fields: impl FnOnce(Fields) -> Fields,
    rest: impl FnOnce(&[u8]) -> Vec<u8>,
    max_data: usize,
) {
    let mut case = Case::start_recorded(id).await;
    let request = headers(1, END_HEADERS, &fields(case.request()).block());
    case.send(&[request, rest(&message())].concat()).await;
    case.refused_later(1, max_data).await;
}

/// A call on stream 1 with its whole message, then the trailers `fields` with `flags`
/// (besides END_HEADERS), which make it malformed.
async fn malformed_trailers(id: &'static str, fields: &[(&str, &str)], flags: u8) {
    let trailers = headers(1, END_HEADERS | flags, &Fields::of(fields).block());
    let rest = |m: &[u8]| [data(1, 0, m), trailers].concat();
    malformed_later(id, |r| r, rest, message().len()).await;
}

/// A call on stream 1 that declares a `content-length` of `declared` and sends its message
/// (cut in two DATA frames at `cut`, if any): no more DATA than declared may reach the
/// backend, and not the end of the request.
async fn content_length_mismatch(id: &'static str, declared: usize, cut: Option<usize>) {
    let rest = |m: &[u8]| match cut {
        Some(at) => [data(1, 0, &m[..at]), data(1, END_STREAM, &m[at..])].concat(),
        None => data(1, END_STREAM, m),
    };
    let declare = |r: Fields| r.with("content-length", &declared.to_string());
    malformed_later(id, declare, rest, declared.min(message().len())).await;
}

/// One `#[tokio::test]` per case, `name => its future;`, each under its doc comment.
macro_rules! cases {
    ($($(#[doc = $doc:literal])* $name:ident => $case:expr;)*) => {$(
        $(#[doc = $doc])*
        #[tokio::test]
        async fn $name() {
            $case.await;
        }
    )*};
}

/// A connection error PROTOCOL_ERROR.
const PROTOCOL: &[Reaction] = &[Connection(PROTOCOL_ERROR)];
/// A connection error FRAME_SIZE_ERROR.
const FRAME_SIZE: &[Reaction] = &[Connection(FRAME_SIZE_ERROR)];
/// A connection error FLOW_CONTROL_ERROR.
const FLOW_CONTROL: &[Reaction] = &[Connection(FLOW_CONTROL_ERROR)];
/// A connection error COMPRESSION_ERROR.
const COMPRESSION: &[Reaction] = &[Connection(COMPRESSION_ERROR)];
/// A frame on stream 1 after it closed, or after the client ended it: a stream error
/// STREAM_CLOSED (RFC 9113 §5.1, §6.1); h2spec also accepts it as a connection error.
const STREAM_1_CLOSED: &[Reaction] = &[Stream(1, STREAM_CLOSED), Connection(STREAM_CLOSED)];
/// CONTINUATION on stream 1 with no header block open: a connection error PROTOCOL_ERROR
/// (RFC 9113 §6.10); h2spec also accepts STREAM_CLOSED, and either as a stream error.
const STRAY_CONTINUATION: &[Reaction] = &[
    Connection(PROTOCOL_ERROR),
    Connection(STREAM_CLOSED),
    Stream(1, STREAM_CLOSED),
    Stream(1, PROTOCOL_ERROR),
];

// ---------------------------------------------------------------------------------------------
// The cases.

/// h2spec `http2`: the HTTP/2 cases (RFC 7540's numbering, RFC 9113's rules).
mod http2 {
    use super::*;

    /// 3.5 HTTP/2 Connection Preface (RFC 9113 §3.4).
    mod s3_5 {
        use super::*;

        cases! {
            /// h2spec http2/3.5/1: the server's preface, a SETTINGS frame, comes first.
            c1_the_server_preface_is_a_settings_frame => settings_first("h2spec http2/3.5/1");
        }

        /// h2spec http2/3.5/2: an invalid preface is a connection error PROTOCOL_ERROR, whose
        /// GOAWAY may be omitted (§3.4). (The agent relays a connection that does not start
        /// with the preface to an endpoint as plain TCP: the endpoint's server rejects it.)
        #[tokio::test]
        async fn c2_an_invalid_preface_closes_the_connection() {
            let mut case = Case::connected("h2spec http2/3.5/2", "").await;
            case.send(b"INVALID CONNECTION PREFACE\r\n\r\n").await;
            case.closes(PROTOCOL_ERROR).await;
        }
    }

    /// 4.1 Frame Format.
    mod s4_1 {
        use super::*;

        cases! {
            /// h2spec http2/4.1/1: a frame of unknown type is ignored.
            c1_a_frame_of_unknown_type_is_ignored =>
                ignored("h2spec http2/4.1/1", |_| frame::encode(UNKNOWN_TYPE, 0, 0, &[0; 8]));
            /// h2spec http2/4.1/2: flags a frame type does not define are ignored: a PING with
            /// every flag but ACK is answered.
            c2_undefined_flags_are_ignored =>
                answered_ping("h2spec http2/4.1/2", !ACK, 0);
            /// h2spec http2/4.1/3: the reserved bit of the stream identifier is ignored: a PING
            /// with it is answered.
            c3_the_reserved_bit_is_ignored =>
                answered_ping("h2spec http2/4.1/3", 0, 1 << 31);
        }

        /// Sends a PING with `flags` and the stream field `stream`; it must be answered.
        async fn answered_ping(id: &'static str, flags: u8, stream: u32) {
            let mut case = Case::start(id).await;
            case.send(&frame::encode(PING, flags, stream, b"odd-ping"))
                .await;
            let r = case.c.pong(*b"odd-ping").await;
            case.check(r, "PING ACK \"odd-ping\"");
        }
    }

    /// 4.2 Frame Size.
    mod s4_2 {
        use super::*;

        cases! {
            /// h2spec http2/4.2/1: a DATA frame of 2^14 octets is accepted.
            c1_a_data_frame_of_2_14_octets_is_accepted => succeeds("h2spec http2/4.2/1", |c| {
                [c.open(1), data(1, END_STREAM, &message_of(1 << 14))].concat()
            });
            /// h2spec http2/4.2/2: a DATA frame above SETTINGS_MAX_FRAME_SIZE is a
            /// FRAME_SIZE_ERROR (§4.2: of the stream or, h2spec also accepts, the connection).
            c2_a_data_frame_above_max_frame_size => reacts(
                "h2spec http2/4.2/2",
                |c| [c.open(1), data(1, END_STREAM, &vec![b'x'; c.max_frame() + 1])].concat(),
                &[Stream(1, FRAME_SIZE_ERROR), Connection(FRAME_SIZE_ERROR)],
            );
            /// h2spec http2/4.2/3: a HEADERS frame above SETTINGS_MAX_FRAME_SIZE is a
            /// connection error FRAME_SIZE_ERROR (§4.2: it carries a field block).
            c3_a_headers_frame_above_max_frame_size => reacts(
                "h2spec http2/4.2/3",
                |c| {
                    let mut fields = c.request();
                    for i in 0.. {
                        if fields.block().len() > c.max_frame() {
                            break;
                        }
                        fields = fields.with(&format!("x-dummy{i}"), &"x".repeat(4000));
                    }
                    headers(1, END_HEADERS | END_STREAM, &fields.block())
                },
                FRAME_SIZE,
            );
        }
    }

    /// 4.3 Header Compression and Decompression (RFC 9113 §4.3).
    mod s4_3 {
        use super::*;

        cases! {
            /// h2spec http2/4.3/1: a header block that cannot be decoded (a literal field cut
            /// after its first byte) is a connection error COMPRESSION_ERROR.
            c1_an_undecodable_header_block => reacts(
                "h2spec http2/4.3/1",
                |_| headers(1, END_HEADERS | END_STREAM, &[0x40]),
                COMPRESSION,
            );
            /// h2spec http2/4.3/2: a PRIORITY frame inside a header block is a connection error
            /// PROTOCOL_ERROR.
            c2_a_priority_frame_inside_a_header_block => reacts(
                "h2spec http2/4.3/2",
                |c| {
                    let rest = continuation(1, END_HEADERS);
                    [c.block_begun(1), priority(1, 0, false, 255), rest].concat()
                },
                PROTOCOL,
            );
            /// h2spec http2/4.3/3: HEADERS of another stream inside a header block is a
            /// connection error PROTOCOL_ERROR.
            c3_headers_of_another_stream_inside_a_header_block => reacts(
                "h2spec http2/4.3/3",
                |c| [c.block_begun(1), c.bodiless(3), continuation(1, END_HEADERS)].concat(),
                PROTOCOL,
            );
        }
    }

    /// 5.1 Stream States.
    mod s5_1 {
        use super::*;

        cases! {
            /// h2spec http2/5.1/1: DATA on an idle stream is a connection error PROTOCOL_ERROR
            /// (§5.1 "idle"; h2spec also accepts PROTOCOL_ERROR or STREAM_CLOSED, of the
            /// connection or the stream, after §6.1).
            c1_idle_data => reacts(
                "h2spec http2/5.1/1",
                |_| data(1, END_STREAM, b"test"),
                &[
                    Connection(PROTOCOL_ERROR),
                    Connection(STREAM_CLOSED),
                    Stream(1, PROTOCOL_ERROR),
                    Stream(1, STREAM_CLOSED),
                ],
            );
            /// h2spec http2/5.1/2: RST_STREAM on an idle stream is a connection error
            /// PROTOCOL_ERROR.
            c2_idle_rst_stream =>
                reacts("h2spec http2/5.1/2", |_| rst_stream(1, CANCEL), PROTOCOL);
            /// h2spec http2/5.1/3: WINDOW_UPDATE on an idle stream is a connection error
            /// PROTOCOL_ERROR.
            c3_idle_window_update =>
                reacts("h2spec http2/5.1/3", |_| window_update(1, 100), PROTOCOL);
            /// h2spec http2/5.1/4: CONTINUATION on an idle stream is a connection error
            /// PROTOCOL_ERROR.
            c4_idle_continuation =>
                reacts("h2spec http2/5.1/4", |_| continuation(1, END_HEADERS), PROTOCOL);
            /// h2spec http2/5.1/5: DATA on a half-closed (remote) stream (the backend holds the
            /// call) is a stream error STREAM_CLOSED.
            c5_half_closed_remote_data => reacts(
                "h2spec http2/5.1/5",
                |c| [c.slow_call(1), data(1, END_STREAM, b"test")].concat(),
                STREAM_1_CLOSED,
            );
            /// h2spec http2/5.1/6: HEADERS on a half-closed (remote) stream is a stream error
            /// STREAM_CLOSED.
            c6_half_closed_remote_headers => reacts(
                "h2spec http2/5.1/6",
                |c| [c.slow_call(1), c.bodiless(1)].concat(),
                STREAM_1_CLOSED,
            );
            /// h2spec http2/5.1/7: CONTINUATION on a half-closed (remote) stream, after a
            /// complete header block.
            c7_half_closed_remote_continuation => reacts(
                "h2spec http2/5.1/7",
                |c| [c.slow_call(1), continuation(1, END_HEADERS)].concat(),
                STRAY_CONTINUATION,
            );
            /// h2spec http2/5.1/8: DATA after the client reset the stream is a stream error
            /// STREAM_CLOSED (§6.1).
            c8_closed_data_after_rst_stream => reacts(
                "h2spec http2/5.1/8",
                |c| [c.open(1), rst_stream(1, CANCEL), data(1, END_STREAM, b"test")].concat(),
                STREAM_1_CLOSED,
            );
            /// h2spec http2/5.1/9: HEADERS after the client reset the stream is a stream error
            /// STREAM_CLOSED (h2spec; RFC 9113 §5.1 also allows a connection error).
            c9_closed_headers_after_rst_stream => reacts(
                "h2spec http2/5.1/9",
                |c| [c.open(1), rst_stream(1, CANCEL), c.bodiless(1)].concat(),
                STREAM_1_CLOSED,
            );
            /// h2spec http2/5.1/10: CONTINUATION after the client reset the stream.
            c10_closed_continuation_after_rst_stream => reacts(
                "h2spec http2/5.1/10",
                |c| [c.open(1), rst_stream(1, CANCEL), continuation(1, END_HEADERS)].concat(),
                STRAY_CONTINUATION,
            );
            /// h2spec http2/5.1/11: DATA on a closed stream (both sides ended it) is a stream
            /// error STREAM_CLOSED (§6.1).
            c11_closed_data => after_a_whole_call(
                "h2spec http2/5.1/11",
                |_| data(1, END_STREAM, b"test"),
                STREAM_1_CLOSED,
            );
            /// h2spec http2/5.1/12: HEADERS on a closed stream is a connection error
            /// STREAM_CLOSED (§5.1 "closed").
            c12_closed_headers => after_a_whole_call(
                "h2spec http2/5.1/12",
                |c| c.bodiless(1),
                &[Connection(STREAM_CLOSED)],
            );
            /// h2spec http2/5.1/13: CONTINUATION on a closed stream is a connection error
            /// PROTOCOL_ERROR (§6.10; h2spec also accepts STREAM_CLOSED).
            c13_closed_continuation => after_a_whole_call(
                "h2spec http2/5.1/13",
                |_| continuation(1, END_HEADERS),
                &[Connection(PROTOCOL_ERROR), Connection(STREAM_CLOSED)],
            );
        }

        /// A whole call on stream 1, answered to its end; then `frames`, which must get one
        /// of `accepted`.
        async fn after_a_whole_call(
            id: &'static str,
            frames: impl FnOnce(&Case) -> Vec<u8>,
            accepted: &[Reaction],
        ) {
            let mut case = Case::start(id).await;
            case.send(&case.call(1)).await;
            case.stream_end(1).await;
            case.send(&frames(&case)).await;
            case.expect(accepted).await;
        }
    }

    /// 5.1.1 Stream Identifiers.
    mod s5_1_1 {
        use super::*;

        cases! {
            /// h2spec http2/5.1.1/1: a client stream with an even identifier is a connection
            /// error PROTOCOL_ERROR.
            c1_an_even_stream_identifier =>
                reacts("h2spec http2/5.1.1/1", |c| c.bodiless(2), PROTOCOL);
            /// h2spec http2/5.1.1/2: a new stream below the last one opened is a connection
            /// error PROTOCOL_ERROR.
            c2_a_stream_identifier_below_the_last => reacts(
                "h2spec http2/5.1.1/2",
                |c| [c.bodiless(5), c.bodiless(3)].concat(),
                PROTOCOL,
            );
        }
    }

    /// 5.1.2 Stream Concurrency.
    mod s5_1_2 {
        use super::*;

        /// h2spec http2/5.1.2/1: a stream above SETTINGS_MAX_CONCURRENT_STREAMS is a stream
        /// error PROTOCOL_ERROR or REFUSED_STREAM (the latter tells the client it may retry).
        #[tokio::test]
        async fn c1_streams_above_max_concurrent_streams() {
            let id = "h2spec http2/5.1.2/1";
            let mut case = Case::start_with(id, "limits:\n  max_concurrent_streams: 4\n").await;
            let Some(max) = case.setting(MAX_CONCURRENT_STREAMS) else {
                case.fail("SETTINGS_MAX_CONCURRENT_STREAMS 4", "advertised none");
            };
            // Open streams (no END_STREAM): none of them can end meanwhile.
            let opened: Vec<Vec<u8>> = (0..=max).map(|i| case.open(2 * i + 1)).collect();
            case.send(&opened.concat()).await;
            let over = 2 * max + 1;
            case.expect(&[Stream(over, REFUSED_STREAM), Stream(over, PROTOCOL_ERROR)])
                .await;
        }
    }

    /// 5.3.1 Stream Dependencies (RFC 9113 deprecates priority signals, but a stream still
    /// cannot depend on itself).
    mod s5_3_1 {
        use super::*;

        /// h2spec http2/5.3.1/1: HEADERS depending on its own stream is a stream error
        /// PROTOCOL_ERROR, and the request is not passed on.
        #[tokio::test]
        async fn c1_headers_depending_on_itself() {
            let mut case = Case::start("h2spec http2/5.3.1/1").await;
            let payload = [priority_fields(1, false, 255), case.request().block()].concat();
            let request = headers(1, END_HEADERS | PRIORITY_FLAG, &payload);
            case.send(&[request, message_data(1)].concat()).await;
            case.refused(1).await;
        }

        cases! {
            /// h2spec http2/5.3.1/2: PRIORITY depending on its own stream is a stream error
            /// PROTOCOL_ERROR (h2spec also accepts a connection error).
            c2_priority_depending_on_itself => reacts(
                "h2spec http2/5.3.1/2",
                |_| priority(1, 1, false, 255),
                &[Stream(1, PROTOCOL_ERROR), Connection(PROTOCOL_ERROR)],
            );
        }
    }

    /// 5.4.1 Connection Error Handling.
    mod s5_4_1 {
        use super::*;

        /// h2spec http2/5.4.1/1: after a connection error (a PING on a stream) the connection
        /// is closed.
        #[tokio::test]
        async fn c1_a_connection_error_closes_the_connection() {
            let mut case = Case::start("h2spec http2/5.4.1/1").await;
            case.send(&frame::encode(PING, 0, 3, &[0; 8])).await;
            case.closes(PROTOCOL_ERROR).await;
        }

        cases! {
            /// h2spec http2/5.4.1/2: a connection error is announced with a GOAWAY first.
            c2_a_connection_error_sends_goaway =>
                reacts("h2spec http2/5.4.1/2", |_| frame::encode(PING, 0, 3, &[0; 8]), PROTOCOL);
        }
    }

    /// 5.5 Extending HTTP/2.
    mod s5_5 {
        use super::*;

        cases! {
            /// h2spec http2/5.5/1: an unknown extension frame is ignored.
            c1_an_unknown_extension_frame_is_ignored =>
                ignored("h2spec http2/5.5/1", |_| frame::encode(UNKNOWN_TYPE, 0, 0, &[0; 8]));
            /// h2spec http2/5.5/2: an extension frame inside a header block is a connection
            /// error PROTOCOL_ERROR.
            c2_an_unknown_frame_inside_a_header_block => reacts(
                "h2spec http2/5.5/2",
                |c| [c.block_begun(1), frame::encode(UNKNOWN_TYPE, 0, 0, &[0; 8])].concat(),
                PROTOCOL,
            );
        }
    }

    /// 6.1 DATA.
    mod s6_1 {
        use super::*;

        cases! {
            /// h2spec http2/6.1/1: DATA on stream 0 is a connection error PROTOCOL_ERROR.
            c1_data_on_stream_0 =>
                reacts("h2spec http2/6.1/1", |_| data(0, END_STREAM, b"test"), PROTOCOL);
            /// h2spec http2/6.1/2: DATA on a stream the client ended (not "open" or
            /// "half-closed (local)") is a stream error STREAM_CLOSED.
            c2_data_after_end_stream => reacts(
                "h2spec http2/6.1/2",
                |c| [c.slow_call(1), data(1, END_STREAM, b"test")].concat(),
                STREAM_1_CLOSED,
            );
            /// h2spec http2/6.1/3: DATA whose padding is as long as its payload (5 bytes, of
            /// which the pad length says 6 are padding) is a connection error PROTOCOL_ERROR.
            c3_data_with_an_invalid_pad_length => reacts(
                "h2spec http2/6.1/3",
                |c| [c.open(1), data(1, END_STREAM | PADDED, b"\x06Test")].concat(),
                PROTOCOL,
            );
        }
    }

    /// 6.2 HEADERS.
    mod s6_2 {
        use super::*;

        cases! {
            /// h2spec http2/6.2/1: a PRIORITY frame after HEADERS without END_HEADERS is a
            /// connection error PROTOCOL_ERROR.
            c1_priority_after_headers_without_end_headers => reacts(
                "h2spec http2/6.2/1",
                |c| {
                    let rest = continuation(1, END_HEADERS);
                    [c.block_begun(1), priority(1, 0, false, 255), rest].concat()
                },
                PROTOCOL,
            );
            /// h2spec http2/6.2/2: HEADERS of another stream after HEADERS without END_HEADERS
            /// is a connection error PROTOCOL_ERROR.
            c2_headers_of_another_stream_after_headers_without_end_headers => reacts(
                "h2spec http2/6.2/2",
                |c| [c.block_begun(1), c.bodiless(3), continuation(1, END_HEADERS)].concat(),
                PROTOCOL,
            );
            /// h2spec http2/6.2/3: HEADERS on stream 0 is a connection error PROTOCOL_ERROR.
            c3_headers_on_stream_0 =>
                reacts("h2spec http2/6.2/3", |c| c.bodiless(0), PROTOCOL);
            /// h2spec http2/6.2/4: HEADERS whose padding is longer than its payload is a
            /// connection error PROTOCOL_ERROR (§6.2; h2spec also accepts a stream error).
            c4_headers_with_an_invalid_pad_length => reacts(
                "h2spec http2/6.2/4",
                |c| {
                    let block = c.request().block();
                    let payload = [vec![(block.len() + 2) as u8], block].concat();
                    headers(1, END_HEADERS | END_STREAM | PADDED, &payload)
                },
                &[Connection(PROTOCOL_ERROR), Stream(1, PROTOCOL_ERROR)],
            );
        }
    }

    /// 6.3 PRIORITY.
    mod s6_3 {
        use super::*;

        cases! {
            /// h2spec http2/6.3/1: PRIORITY on stream 0 is a connection error PROTOCOL_ERROR.
            c1_priority_on_stream_0 =>
                reacts("h2spec http2/6.3/1", |_| priority(0, 0, false, 255), PROTOCOL);
            /// h2spec http2/6.3/2: PRIORITY of a length other than 5 is a stream error
            /// FRAME_SIZE_ERROR (h2spec also accepts a connection error).
            c2_priority_of_the_wrong_length => reacts(
                "h2spec http2/6.3/2",
                |c| [c.open(1), frame::encode(PRIORITY, 0, 1, &[0x80, 0, 0, 1])].concat(),
                &[Stream(1, FRAME_SIZE_ERROR), Connection(FRAME_SIZE_ERROR)],
            );
        }
    }

    /// 6.4 RST_STREAM.
    mod s6_4 {
        use super::*;

        cases! {
            /// h2spec http2/6.4/1: RST_STREAM on stream 0 is a connection error PROTOCOL_ERROR.
            c1_rst_stream_on_stream_0 =>
                reacts("h2spec http2/6.4/1", |_| rst_stream(0, CANCEL), PROTOCOL);
            /// h2spec http2/6.4/2: RST_STREAM on an idle stream is a connection error
            /// PROTOCOL_ERROR.
            c2_rst_stream_on_an_idle_stream =>
                reacts("h2spec http2/6.4/2", |_| rst_stream(1, CANCEL), PROTOCOL);
            /// h2spec http2/6.4/3: RST_STREAM of a length other than 4 is a connection error
            /// FRAME_SIZE_ERROR (§6.4; h2spec also accepts a stream error).
            c3_rst_stream_of_the_wrong_length => reacts(
                "h2spec http2/6.4/3",
                |c| [c.open(1), frame::encode(RST_STREAM, 0, 1, &[0, 0, 0])].concat(),
                &[Connection(FRAME_SIZE_ERROR), Stream(1, FRAME_SIZE_ERROR)],
            );
        }
    }

    /// 6.5 SETTINGS.
    mod s6_5 {
        use super::*;

        cases! {
            /// h2spec http2/6.5/1: a SETTINGS ACK with a payload is a connection error
            /// FRAME_SIZE_ERROR.
            c1_settings_ack_with_a_payload =>
                reacts("h2spec http2/6.5/1", |_| frame::encode(SETTINGS, ACK, 0, &[0]), FRAME_SIZE);
            /// h2spec http2/6.5/2: SETTINGS on a stream other than 0 is a connection error
            /// PROTOCOL_ERROR.
            c2_settings_on_a_stream => reacts(
                "h2spec http2/6.5/2",
                |_| frame::encode(SETTINGS, 0, 1, &[0, 3, 0, 0, 0, 100]),
                PROTOCOL,
            );
            /// h2spec http2/6.5/3: SETTINGS of a length not a multiple of 6 is a connection
            /// error FRAME_SIZE_ERROR (h2spec also accepts PROTOCOL_ERROR).
            c3_settings_of_the_wrong_length => reacts(
                "h2spec http2/6.5/3",
                |_| frame::encode(SETTINGS, 0, 0, &[0, 3, 0]),
                &[Connection(FRAME_SIZE_ERROR), Connection(PROTOCOL_ERROR)],
            );
        }
    }

    /// 6.5.2 Defined SETTINGS Parameters (RFC 9113 §6.5.2).
    mod s6_5_2 {
        use super::*;

        cases! {
            /// h2spec http2/6.5.2/1: SETTINGS_ENABLE_PUSH other than 0 or 1 is a connection
            /// error PROTOCOL_ERROR.
            c1_enable_push_other_than_0_or_1 =>
                reacts("h2spec http2/6.5.2/1", |_| settings(&[(ENABLE_PUSH, 2)]), PROTOCOL);
            /// h2spec http2/6.5.2/2: SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1 is a connection
            /// error FLOW_CONTROL_ERROR.
            c2_initial_window_size_above_the_maximum => reacts(
                "h2spec http2/6.5.2/2",
                |_| settings(&[(INITIAL_WINDOW_SIZE, MAX_WINDOW + 1)]),
                FLOW_CONTROL,
            );
            /// h2spec http2/6.5.2/3: SETTINGS_MAX_FRAME_SIZE below 2^14 is a connection error
            /// PROTOCOL_ERROR.
            c3_max_frame_size_below_the_initial_value => reacts(
                "h2spec http2/6.5.2/3",
                |_| settings(&[(MAX_FRAME_SIZE, (1 << 14) - 1)]),
                PROTOCOL,
            );
            /// h2spec http2/6.5.2/4: SETTINGS_MAX_FRAME_SIZE above 2^24-1 is a connection error
            /// PROTOCOL_ERROR.
            c4_max_frame_size_above_the_maximum => reacts(
                "h2spec http2/6.5.2/4",
                |_| settings(&[(MAX_FRAME_SIZE, 1 << 24)]),
                PROTOCOL,
            );
            /// h2spec http2/6.5.2/5: an unknown setting is ignored.
            c5_an_unknown_setting_is_ignored =>
                ignored("h2spec http2/6.5.2/5", |_| settings(&[(0xff, 1)]));
        }
    }

    /// 6.5.3 Settings Synchronization.
    mod s6_5_3 {
        use super::*;

        cases! {
            /// h2spec http2/6.5.3/1: the values of one SETTINGS frame apply in order: of two
            /// SETTINGS_INITIAL_WINDOW_SIZE, the last (1) holds.
            c1_settings_values_apply_in_order => window_of_one(
                "h2spec http2/6.5.3/1",
                &[(INITIAL_WINDOW_SIZE, 100), (INITIAL_WINDOW_SIZE, 1)],
                |c| c.call(1),
            );
        }

        /// h2spec http2/6.5.3/2: SETTINGS are acknowledged.
        #[tokio::test]
        async fn c2_settings_are_acknowledged() {
            let mut case = Case::start("h2spec http2/6.5.3/2").await;
            case.settle(&[(ENABLE_PUSH, 0)]).await;
        }
    }

    /// 6.7 PING.
    mod s6_7 {
        use super::*;

        /// h2spec http2/6.7/1: a PING is answered with an ACK carrying its payload.
        #[tokio::test]
        async fn c1_ping_is_answered() {
            let mut case = Case::start("h2spec http2/6.7/1").await;
            let r = case.c.ping(*b"h2spec\0\0").await;
            case.check(r, "PING ACK \"h2spec\"");
        }

        /// h2spec http2/6.7/2: a PING ACK is not answered (the PING after it is, first).
        #[tokio::test]
        async fn c2_ping_ack_is_not_answered() {
            let mut case = Case::start("h2spec http2/6.7/2").await;
            case.send(&frame::encode(PING, ACK, 0, b"invalid\0")).await;
            let r = case.c.ping(*b"h2spec\0\0").await;
            case.check(r, "only the PING answered, not the PING ACK");
        }

        cases! {
            /// h2spec http2/6.7/3: PING on a stream other than 0 is a connection error
            /// PROTOCOL_ERROR.
            c3_ping_on_a_stream =>
                reacts("h2spec http2/6.7/3", |_| frame::encode(PING, 0, 1, &[0; 8]), PROTOCOL);
            /// h2spec http2/6.7/4: PING of a length other than 8 is a connection error
            /// FRAME_SIZE_ERROR.
            c4_ping_of_the_wrong_length =>
                reacts("h2spec http2/6.7/4", |_| frame::encode(PING, 0, 0, &[0; 6]), FRAME_SIZE);
        }
    }

    /// 6.8 GOAWAY.
    mod s6_8 {
        use super::*;

        cases! {
            /// h2spec http2/6.8/1: GOAWAY on a stream other than 0 is a connection error
            /// PROTOCOL_ERROR.
            c1_goaway_on_a_stream =>
                reacts("h2spec http2/6.8/1", |_| frame::encode(GOAWAY, 0, 1, &[0; 8]), PROTOCOL);
        }
    }

    /// 6.9 WINDOW_UPDATE.
    mod s6_9 {
        use super::*;

        cases! {
            /// h2spec http2/6.9/1: a WINDOW_UPDATE of 0 for the connection is a connection
            /// error PROTOCOL_ERROR.
            c1_window_update_of_0_on_the_connection =>
                reacts("h2spec http2/6.9/1", |_| window_update(0, 0), PROTOCOL);
            /// h2spec http2/6.9/2: a WINDOW_UPDATE of 0 for a stream is a stream error
            /// PROTOCOL_ERROR (h2spec also accepts a connection error).
            c2_window_update_of_0_on_a_stream => reacts(
                "h2spec http2/6.9/2",
                |c| [c.open(1), window_update(1, 0)].concat(),
                &[Stream(1, PROTOCOL_ERROR), Connection(PROTOCOL_ERROR)],
            );
            /// h2spec http2/6.9/3: WINDOW_UPDATE of a length other than 4 is a connection error
            /// FRAME_SIZE_ERROR.
            c3_window_update_of_the_wrong_length => reacts(
                "h2spec http2/6.9/3",
                |_| frame::encode(WINDOW_UPDATE, 0, 0, &[0, 0, 1]),
                FRAME_SIZE,
            );
        }
    }

    /// 6.9.1 The Flow-Control Window.
    mod s6_9_1 {
        use super::*;

        cases! {
            /// h2spec http2/6.9.1/1: no DATA beyond the window: with an initial window of 1,
            /// the response's DATA comes 1 byte at a time.
            c1_data_stays_within_the_window => window_of_one(
                "h2spec http2/6.9.1/1",
                &[(INITIAL_WINDOW_SIZE, 1)],
                |c| c.call(1),
            );
            /// h2spec http2/6.9.1/2: a connection window above 2^31-1 is a connection error
            /// FLOW_CONTROL_ERROR.
            c2_connection_window_above_the_maximum => reacts(
                "h2spec http2/6.9.1/2",
                |_| [window_update(0, MAX_WINDOW), window_update(0, MAX_WINDOW)].concat(),
                FLOW_CONTROL,
            );
            /// h2spec http2/6.9.1/3: a stream window above 2^31-1 is a stream error
            /// FLOW_CONTROL_ERROR.
            c3_stream_window_above_the_maximum => reacts(
                "h2spec http2/6.9.1/3",
                |c| {
                    let over = window_update(1, MAX_WINDOW);
                    [c.open(1), over.clone(), over].concat()
                },
                &[Stream(1, FLOW_CONTROL_ERROR)],
            );
        }
    }

    /// 6.9.2 Initial Flow-Control Window Size.
    mod s6_9_2 {
        use super::*;

        cases! {
            /// h2spec http2/6.9.2/1: a new SETTINGS_INITIAL_WINDOW_SIZE changes the windows of
            /// open streams: from 0 to 1, 1 byte of DATA may go.
            c1_initial_window_size_changes_open_streams => window_of_one(
                "h2spec http2/6.9.2/1",
                &[(INITIAL_WINDOW_SIZE, 0)],
                |c| [c.call(1), settings(&[(INITIAL_WINDOW_SIZE, 1)])].concat(),
            );
            /// h2spec http2/6.9.2/3: SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1 is a connection
            /// error FLOW_CONTROL_ERROR.
            c3_initial_window_size_above_the_maximum => reacts(
                "h2spec http2/6.9.2/3",
                |_| frame::encode(SETTINGS, 0, 0, &[0, 4, 0x80, 0, 0, 0]),
                FLOW_CONTROL,
            );
        }

        /// h2spec http2/6.9.2/2: a window can go negative: 3 bytes sent in a window of 3, the
        /// initial size lowered to 2 (window -1), a WINDOW_UPDATE of 2: 1 byte may go.
        #[tokio::test]
        async fn c2_a_window_can_go_negative() {
            let mut case = Case::start("h2spec http2/6.9.2/2").await;
            case.settle(&[(INITIAL_WINDOW_SIZE, 3)]).await;
            case.send(&case.call(1)).await;
            let mut sent = 0;
            while sent < 3 {
                sent += case.next_data(1).await;
            }
            if sent != 3 {
                case.fail(
                    "3 bytes of DATA in a window of 3",
                    &format!("sent {sent} bytes"),
                );
            }
            case.settle(&[(INITIAL_WINDOW_SIZE, 2)]).await;
            case.send(&window_update(1, 2)).await;
            case.one_byte_of_data(1).await;
        }
    }

    /// 6.10 CONTINUATION.
    mod s6_10 {
        use super::*;

        cases! {
            /// h2spec http2/6.10/1: a header block in HEADERS and several CONTINUATION frames
            /// is accepted.
            c1_several_continuation_frames => succeeds("h2spec http2/6.10/1", |c| {
                let more = |i, flags| frame::encode(CONTINUATION, flags, 1, &dummy_block(i));
                [c.block_begun(1), more(0, 0), more(1, END_HEADERS), message_data(1)].concat()
            });
            /// h2spec http2/6.10/2: another frame than CONTINUATION (DATA) inside a header block
            /// is a connection error PROTOCOL_ERROR.
            c2_data_inside_a_header_block => reacts(
                "h2spec http2/6.10/2",
                |c| [c.block_begun(1), continuation(1, 0), data(1, END_STREAM, b"test")].concat(),
                PROTOCOL,
            );
            /// h2spec http2/6.10/3: CONTINUATION on stream 0 is a connection error
            /// PROTOCOL_ERROR.
            c3_continuation_on_stream_0 => reacts(
                "h2spec http2/6.10/3",
                |c| [c.block_begun(1), continuation(0, END_HEADERS)].concat(),
                PROTOCOL,
            );
            /// h2spec http2/6.10/4: CONTINUATION after a HEADERS with END_HEADERS is a
            /// connection error PROTOCOL_ERROR.
            c4_continuation_after_end_headers => reacts(
                "h2spec http2/6.10/4",
                |c| [c.open(1), continuation(1, END_HEADERS)].concat(),
                PROTOCOL,
            );
            /// h2spec http2/6.10/5: CONTINUATION after a CONTINUATION with END_HEADERS is a
            /// connection error PROTOCOL_ERROR.
            c5_continuation_after_continuation_with_end_headers => reacts(
                "h2spec http2/6.10/5",
                |c| {
                    let ended = continuation(1, END_HEADERS);
                    [c.block_begun(1), ended.clone(), ended].concat()
                },
                PROTOCOL,
            );
            /// h2spec http2/6.10/6: CONTINUATION after DATA (itself inside the header block) is
            /// a connection error PROTOCOL_ERROR.
            c6_continuation_after_data => reacts(
                "h2spec http2/6.10/6",
                |c| {
                    let inside = data(1, END_STREAM, b"test");
                    [c.block_begun(1), inside, continuation(1, END_HEADERS)].concat()
                },
                PROTOCOL,
            );
        }
    }

    /// 7 Error Codes.
    mod s7 {
        use super::*;

        cases! {
            /// h2spec http2/7/1: a GOAWAY with an unknown error code triggers nothing special.
            c1_goaway_with_an_unknown_error_code =>
                tolerated("h2spec http2/7/1", |_| goaway(0, 0xff));
            /// h2spec http2/7/2: a RST_STREAM with an unknown error code triggers nothing
            /// special.
            c2_rst_stream_with_an_unknown_error_code =>
                tolerated("h2spec http2/7/2", |c| [c.open(1), rst_stream(1, 0xff)].concat());
        }
    }

    /// 8.1 HTTP Request/Response Exchange (RFC 9113 §8.1).
    mod s8_1 {
        use super::*;

        cases! {
            /// h2spec http2/8.1/1: a second HEADERS (trailers) without END_STREAM makes the
            /// request malformed.
            c1_trailers_without_end_stream =>
                malformed_trailers("h2spec http2/8.1/1", &[("x-test", "ok")], 0);
        }
    }

    /// 8.1.2 HTTP Header Fields (RFC 9113 §8.2, §8.2.1 Field Validity).
    mod s8_1_2 {
        use super::*;

        cases! {
            /// h2spec http2/8.1.2/1: a field name with uppercase letters makes the request
            /// malformed.
            c1_an_uppercase_field_name =>
                malformed_request("h2spec http2/8.1.2/1", |r| r.with("X-TEST", "ok"));
            /// RFC 9113 §8.2.1: a field value with CR or LF makes the request malformed.
            x1_a_field_value_with_cr_lf => malformed_request(
                "RFC 9113 8.2.1 (CR LF in a value)",
                |r| r.with("x-test", "ok\r\nx-smuggled: 1"),
            );
            /// RFC 9113 §8.2.1: a field value with NUL makes the request malformed.
            x2_a_field_value_with_nul =>
                malformed_request("RFC 9113 8.2.1 (NUL in a value)", |r| r.with("x-test", "o\0k"));
            /// RFC 9113 §8.2.1: a field value starting with whitespace makes the request
            /// malformed.
            x3_a_field_value_with_leading_whitespace => malformed_request(
                "RFC 9113 8.2.1 (leading SP in a value)",
                |r| r.with("x-test", " ok"),
            );
            /// RFC 9113 §8.2.1: a field value ending with whitespace makes the request
            /// malformed.
            x4_a_field_value_with_trailing_whitespace => malformed_request(
                "RFC 9113 8.2.1 (trailing HTAB in a value)",
                |r| r.with("x-test", "ok\t"),
            );
            /// RFC 9113 §8.2.1: a field name with a space makes the request malformed.
            x5_a_field_name_with_a_space =>
                malformed_request("RFC 9113 8.2.1 (SP in a name)", |r| r.with("x test", "ok"));
            /// RFC 9113 §8.2.1: a regular field name with a colon makes the request malformed.
            x6_a_field_name_with_a_colon =>
                malformed_request("RFC 9113 8.2.1 (colon in a name)", |r| r.with("x:test", "ok"));
        }
    }

    /// 8.1.2.1 Pseudo-Header Fields (RFC 9113 §8.3).
    mod s8_1_2_1 {
        use super::*;

        cases! {
            /// h2spec http2/8.1.2.1/1: an unknown pseudo-header field makes the request
            /// malformed.
            c1_an_unknown_pseudo_header_field =>
                malformed_request("h2spec http2/8.1.2.1/1", |r| r.with_pseudo(":test", "ok"));
            /// h2spec http2/8.1.2.1/2: a response pseudo-header field in a request makes it
            /// malformed.
            c2_a_response_pseudo_header_field =>
                malformed_request("h2spec http2/8.1.2.1/2", |r| r.with_pseudo(":status", "200"));
            /// h2spec http2/8.1.2.1/3: a pseudo-header field in trailers makes the request
            /// malformed. (h2spec's trailers also lack END_STREAM, malformed by itself, 8.1/1;
            /// here they end the stream, so the pseudo-header field is the only fault.)
            c3_a_pseudo_header_field_in_trailers =>
                malformed_trailers("h2spec http2/8.1.2.1/3", &[(":method", "POST")], END_STREAM);
            /// h2spec http2/8.1.2.1/4: a pseudo-header field after a regular one makes the
            /// request malformed.
            c4_a_pseudo_header_field_after_a_regular_one =>
                malformed_request("h2spec http2/8.1.2.1/4", |r| r.first("x-test", "ok"));
        }
    }

    /// 8.1.2.2 Connection-Specific Header Fields (RFC 9113 §8.2.2).
    mod s8_1_2_2 {
        use super::*;

        cases! {
            /// h2spec http2/8.1.2.2/1: `connection` makes the request malformed.
            c1_connection =>
                malformed_request("h2spec http2/8.1.2.2/1", |r| r.with("connection", "keep-alive"));
            /// h2spec http2/8.1.2.2/2: `te` other than "trailers" makes the request malformed.
            c2_te_other_than_trailers =>
                malformed_request("h2spec http2/8.1.2.2/2", |r| r.set("te", "trailers, deflate"));
            /// RFC 9113 §8.2.2: `keep-alive` makes the request malformed.
            x1_keep_alive => malformed_request(
                "RFC 9113 8.2.2 (keep-alive)",
                |r| r.with("keep-alive", "timeout=5"),
            );
            /// RFC 9113 §8.2.2: `proxy-connection` makes the request malformed.
            x2_proxy_connection => malformed_request(
                "RFC 9113 8.2.2 (proxy-connection)",
                |r| r.with("proxy-connection", "keep-alive"),
            );
            /// RFC 9113 §8.2.2: `transfer-encoding` makes the request malformed.
            x3_transfer_encoding => malformed_request(
                "RFC 9113 8.2.2 (transfer-encoding)",
                |r| r.with("transfer-encoding", "chunked"),
            );
            /// RFC 9113 §8.2.2: `upgrade` makes the request malformed.
            x4_upgrade =>
                malformed_request("RFC 9113 8.2.2 (upgrade)", |r| r.with("upgrade", "h2c"));
        }
    }

    /// 8.1.2.3 Request Pseudo-Header Fields (RFC 9113 §8.3.1).
    mod s8_1_2_3 {
        use super::*;

        cases! {
            /// h2spec http2/8.1.2.3/1: an empty `:path` makes the request malformed.
            c1_an_empty_path =>
                malformed_request("h2spec http2/8.1.2.3/1", |r| r.set(":path", ""));
            /// h2spec http2/8.1.2.3/2: a request without `:method` is malformed.
            c2_no_method =>
                malformed_request("h2spec http2/8.1.2.3/2", |r| r.without(":method"));
            /// h2spec http2/8.1.2.3/3: a request without `:scheme` is malformed.
            c3_no_scheme =>
                malformed_request("h2spec http2/8.1.2.3/3", |r| r.without(":scheme"));
            /// h2spec http2/8.1.2.3/4: a request without `:path` is malformed.
            c4_no_path =>
                malformed_request("h2spec http2/8.1.2.3/4", |r| r.without(":path"));
            /// h2spec http2/8.1.2.3/5: a duplicated `:method` makes the request malformed.
            c5_a_duplicated_method =>
                malformed_request("h2spec http2/8.1.2.3/5", |r| r.with_pseudo(":method", "POST"));
            /// h2spec http2/8.1.2.3/6: a duplicated `:scheme` makes the request malformed.
            c6_a_duplicated_scheme =>
                malformed_request("h2spec http2/8.1.2.3/6", |r| r.with_pseudo(":scheme", "http"));
            /// h2spec http2/8.1.2.3/7: a duplicated `:path` makes the request malformed.
            c7_a_duplicated_path =>
                malformed_request("h2spec http2/8.1.2.3/7", |r| r.with_pseudo(":path", GREETER));
            /// RFC 9113 §8.3: a duplicated `:authority` makes the request malformed.
            x1_a_duplicated_authority => malformed_request(
                "RFC 9113 8.3 (duplicated :authority)",
                |r| r.with_pseudo(":authority", "other.example"),
            );
        }
    }

    /// 8.1.2.6 Malformed Requests and Responses (RFC 9113 §8.1.1).
    mod s8_1_2_6 {
        use super::*;

        cases! {
            /// h2spec http2/8.1.2.6/1: DATA longer than `content-length` makes the request
            /// malformed.
            c1_content_length_below_the_data =>
                content_length_mismatch("h2spec http2/8.1.2.6/1", 1, None);
            /// h2spec http2/8.1.2.6/2: DATA frames adding up to more than `content-length` make
            /// the request malformed (the first one alone is within it).
            c2_content_length_below_the_sum_of_the_data => content_length_mismatch(
                "h2spec http2/8.1.2.6/2",
                message().len() - 1,
                Some(message().len() / 2),
            );
            /// RFC 9113 §8.1.1: DATA shorter than `content-length` makes the request malformed.
            x1_content_length_above_the_data => content_length_mismatch(
                "RFC 9113 8.1.1 (content-length above)",
                message().len() + 1,
                None,
            );
        }
    }

    /// 8.2 Server Push (RFC 9113 §8.4).
    mod s8_2 {
        use super::*;

        cases! {
            /// h2spec http2/8.2/1: a PUSH_PROMISE from a client is a connection error
            /// PROTOCOL_ERROR.
            c1_push_promise_from_a_client => reacts(
                "h2spec http2/8.2/1",
                |c| {
                    let payload = [3u32.to_be_bytes().to_vec(), c.request().block()].concat();
                    frame::encode(PUSH_PROMISE, END_HEADERS, 1, &payload)
                },
                PROTOCOL,
            );
        }
    }
}

/// h2spec `hpack`: decoding errors in header blocks, each a connection error COMPRESSION_ERROR
/// (RFC 9113 §4.3).
mod hpack {
    use super::*;

    /// A request on stream 1 whose header block is `first`, the request's fields, then
    /// `last`.
    fn request_between(c: &Case, first: &[u8], last: &[u8]) -> Vec<u8> {
        let block = [first, &c.request().block()[..], last].concat();
        headers(1, END_HEADERS | END_STREAM, &block)
    }

    /// A request whose header block ends with `last`: a connection error COMPRESSION_ERROR.
    async fn undecodable(id: &'static str, last: Vec<u8>) {
        reacts(id, |c| request_between(c, &[], &last), COMPRESSION).await;
    }

    /// A literal field without indexing, `x-test` with the Huffman-coded value `value`.
    fn coded_value(value: &[u8]) -> Vec<u8> {
        [vec![0x00], huff("x-test"), huffman_literal(value)].concat()
    }

    cases! {
        /// h2spec hpack/2.3.3/1: an indexed field beyond both tables (the dynamic one is
        /// empty).
        s2_3_3_c1_an_indexed_field_with_an_invalid_index =>
            undecodable("h2spec hpack/2.3.3/1", hpack_int(0x80, 7, 62));
        /// h2spec hpack/2.3.3/2: a literal field whose name index is beyond both tables.
        s2_3_3_c2_a_literal_field_with_an_invalid_name_index =>
            undecodable("h2spec hpack/2.3.3/2", [hpack_int(0x40, 6, 62), raw("h2spec")].concat());
        /// h2spec hpack/4.2/1: a dynamic table size update after the first field of a block.
        s4_2_c1_a_table_size_update_at_the_end_of_a_block =>
            undecodable("h2spec hpack/4.2/1", hpack_int(0x20, 5, 4096));
        /// h2spec hpack/5.2/1: Huffman padding longer than 7 bits.
        s5_2_c1_huffman_padding_longer_than_7_bits => undecodable(
            "h2spec hpack/5.2/1",
            coded_value(&[Bits::coding("test").finish(true), vec![0xff]].concat()),
        );
        /// h2spec hpack/5.2/2: Huffman padding of zeros, not the EOS prefix.
        s5_2_c2_huffman_padding_of_zeros =>
            undecodable("h2spec hpack/5.2/2", coded_value(&Bits::coding("test").finish(false)));
        /// h2spec hpack/5.2/3: a Huffman string containing EOS.
        s5_2_c3_huffman_string_with_eos => undecodable("h2spec hpack/5.2/3", {
            let mut bits = Bits::coding("te");
            bits.push(EOS);
            bits.push(huffman_code(b's'));
            coded_value(&bits.finish(true))
        });
        /// h2spec hpack/6.1/1: an indexed field with index 0.
        s6_1_c1_an_indexed_field_with_index_0 =>
            undecodable("h2spec hpack/6.1/1", vec![0x80]);
        /// h2spec hpack/6.3/1: a dynamic table size update above the agent's
        /// SETTINGS_HEADER_TABLE_SIZE.
        s6_3_c1_a_table_size_update_above_the_setting => reacts(
            "h2spec hpack/6.3/1",
            |c| {
                let limit = c.setting(HEADER_TABLE_SIZE).unwrap_or(4096) as usize;
                request_between(c, &hpack_int(0x20, 5, limit + 1), &[])
            },
            COMPRESSION,
        );
    }
}

/// h2spec `generic`: what every HTTP/2 server must accept.
mod generic {
    use super::*;

    /// 1 Starting HTTP/2.
    mod s1 {
        use super::*;

        cases! {
            /// h2spec generic/1/1: the client preface is accepted, and answered with SETTINGS.
            c1_the_client_preface_is_accepted => settings_first("h2spec generic/1/1");
        }
    }

    /// 2 Streams and Multiplexing.
    mod s2 {
        use super::*;

        cases! {
            /// h2spec generic/2/1: PRIORITY on an idle stream is accepted.
            c1_priority_on_an_idle_stream =>
                ignored("h2spec generic/2/1", |_| priority(1, 0, false, 255));
            /// h2spec generic/2/2: WINDOW_UPDATE on a half-closed (remote) stream is accepted:
            /// with a window of 0, it lets 1 byte of the response go.
            c2_window_update_on_a_half_closed_remote_stream => window_of_one(
                "h2spec generic/2/2",
                &[(INITIAL_WINDOW_SIZE, 0)],
                |c| [c.call(1), window_update(1, 1)].concat(),
            );
            /// h2spec generic/2/3: PRIORITY on a half-closed (remote) stream is accepted.
            c3_priority_on_a_half_closed_remote_stream => window_of_one(
                "h2spec generic/2/3",
                &[(INITIAL_WINDOW_SIZE, 0)],
                |c| [c.call(1), priority(1, 0, false, 255), window_update(1, 1)].concat(),
            );
            /// h2spec generic/2/4: RST_STREAM on a half-closed (remote) stream is accepted.
            c4_rst_stream_on_a_half_closed_remote_stream => tolerated(
                "h2spec generic/2/4",
                |c| [c.slow_call(1), rst_stream(1, CANCEL)].concat(),
            );
        }

        /// h2spec generic/2/5: PRIORITY on a closed stream is accepted.
        #[tokio::test]
        async fn c5_priority_on_a_closed_stream() {
            let mut case = Case::start("h2spec generic/2/5").await;
            case.send(&case.call(1)).await;
            case.stream_end(1).await;
            case.send(&priority(1, 0, false, 255)).await;
            case.no_reaction().await;
        }
    }

    /// 3.1 DATA.
    mod s3_1 {
        use super::*;

        cases! {
            /// h2spec generic/3.1/1: a DATA frame.
            c1_data => succeeds("h2spec generic/3.1/1", |c| c.call(1));
            /// h2spec generic/3.1/2: several DATA frames.
            c2_several_data_frames => succeeds("h2spec generic/3.1/2", |c| {
                let message = message();
                let (first, rest) = message.split_at(8);
                [c.open(1), data(1, 0, first), data(1, END_STREAM, rest)].concat()
            });
            /// h2spec generic/3.1/3: a padded DATA frame.
            c3_padded_data => succeeds("h2spec generic/3.1/3", |c| {
                let padded = [vec![5], message(), vec![0; 5]].concat();
                [c.open(1), data(1, END_STREAM | PADDED, &padded)].concat()
            });
        }
    }

    /// 3.2 HEADERS.
    mod s3_2 {
        use super::*;

        cases! {
            /// h2spec generic/3.2/1: a HEADERS frame.
            c1_headers => succeeds("h2spec generic/3.2/1", |c| c.call(1));
            /// h2spec generic/3.2/2: a padded HEADERS frame.
            c2_padded_headers => succeeds("h2spec generic/3.2/2", |c| {
                let padded = [vec![8], c.request().block(), vec![0; 8]].concat();
                [headers(1, END_HEADERS | PADDED, &padded), message_data(1)].concat()
            });
            /// h2spec generic/3.2/3: a HEADERS frame with a priority.
            c3_headers_with_priority => succeeds("h2spec generic/3.2/3", |c| {
                let payload = [priority_fields(0, false, 255), c.request().block()].concat();
                [headers(1, END_HEADERS | PRIORITY_FLAG, &payload), message_data(1)].concat()
            });
        }
    }

    /// 3.3 PRIORITY: priority signals are accepted (and, RFC 9113 §5.3.2, may be ignored).
    mod s3_3 {
        use super::*;

        /// A call on stream 1 after `priority`, served by the backend.
        async fn call_after(id: &'static str, priority: Vec<u8>) {
            succeeds(id, |c| [priority, c.call(1)].concat()).await;
        }

        cases! {
            /// h2spec generic/3.3/1: PRIORITY with weight 1.
            c1_priority_weight_1 => call_after("h2spec generic/3.3/1", priority(1, 0, false, 0));
            /// h2spec generic/3.3/2: PRIORITY with weight 256.
            c2_priority_weight_256 =>
                call_after("h2spec generic/3.3/2", priority(1, 0, false, 255));
            /// h2spec generic/3.3/3: PRIORITY with a stream dependency.
            c3_priority_with_a_dependency =>
                call_after("h2spec generic/3.3/3", priority(3, 1, false, 0));
            /// h2spec generic/3.3/4: exclusive PRIORITY.
            c4_exclusive_priority => call_after("h2spec generic/3.3/4", priority(1, 0, true, 0));
            /// h2spec generic/3.3/5: PRIORITY for idle stream 3, then HEADERS for stream 1: a
            /// PRIORITY frame opens no stream, so 1 is still a valid new stream.
            c5_priority_on_a_higher_idle_stream_then_headers =>
                call_after("h2spec generic/3.3/5", priority(3, 0, false, 255));
        }
    }

    /// 3.4 to 3.9: RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE.
    mod s3_4_to_3_9 {
        use super::*;

        cases! {
            /// h2spec generic/3.4/1: a RST_STREAM frame is accepted.
            s3_4_c1_rst_stream =>
                tolerated("h2spec generic/3.4/1", |c| [c.open(1), rst_stream(1, CANCEL)].concat());
            /// h2spec generic/3.7/1: a PING is answered.
            s3_7_c1_ping => ignored("h2spec generic/3.7/1", |_| Vec::new());
            /// h2spec generic/3.8/1: a GOAWAY frame is accepted.
            s3_8_c1_goaway => tolerated("h2spec generic/3.8/1", |_| goaway(0, NO_ERROR));
            /// h2spec generic/3.9/1: a WINDOW_UPDATE for the connection.
            s3_9_c1_window_update_on_the_connection =>
                ignored("h2spec generic/3.9/1", |_| window_update(0, 1));
            /// h2spec generic/3.9/2: a WINDOW_UPDATE for a stream.
            s3_9_c2_window_update_on_a_stream => succeeds("h2spec generic/3.9/2", |c| {
                [c.call(1), window_update(1, 1)].concat()
            });
        }

        /// h2spec generic/3.5/1: SETTINGS with every defined parameter is acknowledged.
        #[tokio::test]
        async fn s3_5_c1_settings() {
            let mut case = Case::start("h2spec generic/3.5/1").await;
            case.settle(&[
                (HEADER_TABLE_SIZE, 4096),
                (ENABLE_PUSH, 1),
                (MAX_CONCURRENT_STREAMS, 100),
                (INITIAL_WINDOW_SIZE, 65_535),
                (MAX_FRAME_SIZE, 16_384),
                (MAX_HEADER_LIST_SIZE, 100),
            ])
            .await;
        }
    }

    /// 3.10 CONTINUATION.
    mod s3_10 {
        use super::*;

        /// A call on stream 1 whose header block is cut at `cuts` into HEADERS and
        /// CONTINUATION frames.
        fn split_block(c: &Case, cuts: &[usize]) -> Vec<u8> {
            let block = c.request().block();
            let bounds = [&[0][..], cuts, &[block.len()][..]].concat();
            let mut bytes = Vec::new();
            for (i, w) in bounds.windows(2).enumerate() {
                let kind = if i == 0 { HEADERS } else { CONTINUATION };
                let flags = if w[1] == block.len() { END_HEADERS } else { 0 };
                bytes.extend(frame::encode(kind, flags, 1, &block[w[0]..w[1]]));
            }
            [bytes, message_data(1)].concat()
        }

        cases! {
            /// h2spec generic/3.10/1: a CONTINUATION frame.
            c1_continuation => succeeds("h2spec generic/3.10/1", |c| split_block(c, &[5]));
            /// h2spec generic/3.10/2: several CONTINUATION frames.
            c2_several_continuation_frames =>
                succeeds("h2spec generic/3.10/2", |c| split_block(c, &[5, 10]));
        }
    }

    /// 4 HTTP Message Exchanges.
    mod s4 {
        use super::*;

        /// A request of `method` without a body: the backend need not serve it, but it must
        /// be answered.
        async fn without_body(id: &'static str, method: &str) {
            let mut case = Case::start(id).await;
            let block = case.request().set(":method", method).block();
            case.send(&headers(1, END_HEADERS | END_STREAM, &block))
                .await;
            case.responded(1).await;
        }

        cases! {
            /// h2spec generic/4/1: a GET request is answered.
            c1_get => without_body("h2spec generic/4/1", "GET");
            /// h2spec generic/4/2: a HEAD request is answered.
            c2_head => without_body("h2spec generic/4/2", "HEAD");
            /// h2spec generic/4/3: a POST request is answered.
            c3_post => succeeds("h2spec generic/4/3", |c| c.call(1));
            /// h2spec generic/4/4: a POST request with trailers is answered.
            c4_post_with_trailers => succeeds("h2spec generic/4/4", |c| {
                let block = c.request().with("trailer", "x-test").block();
                let trailers = Fields::of(&[("x-test", "ok")]).block();
                [
                    headers(1, END_HEADERS, &block),
                    data(1, 0, &message()),
                    headers(1, END_HEADERS | END_STREAM, &trailers),
                ]
                .concat()
            });
        }
    }

    /// 5 HPACK: every representation of RFC 7541 §6 is accepted.
    mod s5 {
        use super::*;

        /// A call on stream 1 whose header block is `first`, the request's fields, `last`.
        async fn represented(id: &'static str, first: Vec<u8>, last: Vec<u8>) {
            succeeds(id, |c| {
                let block = [first, c.request().block(), last].concat();
                [headers(1, END_HEADERS, &block), message_data(1)].concat()
            })
            .await;
        }

        /// A call with `last` after the request's fields.
        async fn with(id: &'static str, last: Vec<u8>) {
            represented(id, Vec::new(), last).await;
        }

        /// A literal of kind `flags` (with an `n`-bit name index prefix) with `user-agent`'s
        /// static name and the value `value`.
        fn indexed_name(flags: u8, n: u32, value: Vec<u8>) -> Vec<u8> {
            [hpack_int(flags, n, USER_AGENT), value].concat()
        }

        /// A literal of kind `flags` with a new name.
        fn new_name(flags: u8, name: Vec<u8>, value: Vec<u8>) -> Vec<u8> {
            [vec![flags], name, value].concat()
        }

        cases! {
            /// h2spec generic/5/1: an indexed field.
            c1_indexed => with("h2spec generic/5/1", hpack_int(0x80, 7, USER_AGENT));
            /// h2spec generic/5/2: a literal with incremental indexing, indexed name.
            c2_incremental_indexed_name =>
                with("h2spec generic/5/2", indexed_name(0x40, 6, raw("h2spec")));
            /// h2spec generic/5/3: the same, Huffman coded.
            c3_incremental_indexed_name_huffman =>
                with("h2spec generic/5/3", indexed_name(0x40, 6, huff("h2spec")));
            /// h2spec generic/5/4: a literal with incremental indexing, new name.
            c4_incremental_new_name =>
                with("h2spec generic/5/4", new_name(0x40, raw("x-test"), raw("h2spec")));
            /// h2spec generic/5/5: the same, Huffman coded.
            c5_incremental_new_name_huffman =>
                with("h2spec generic/5/5", new_name(0x40, huff("x-test"), huff("h2spec")));
            /// h2spec generic/5/6: a literal without indexing, indexed name.
            c6_without_indexing_indexed_name =>
                with("h2spec generic/5/6", indexed_name(0x00, 4, raw("h2spec")));
            /// h2spec generic/5/7: the same, Huffman coded.
            c7_without_indexing_indexed_name_huffman =>
                with("h2spec generic/5/7", indexed_name(0x00, 4, huff("h2spec")));
            /// h2spec generic/5/8: a literal without indexing, new name.
            c8_without_indexing_new_name =>
                with("h2spec generic/5/8", new_name(0x00, raw("x-test"), raw("h2spec")));
            /// h2spec generic/5/9: the same, Huffman coded.
            c9_without_indexing_new_name_huffman =>
                with("h2spec generic/5/9", new_name(0x00, huff("x-test"), huff("h2spec")));
            /// h2spec generic/5/10: a literal never indexed, indexed name.
            c10_never_indexed_indexed_name =>
                with("h2spec generic/5/10", indexed_name(0x10, 4, raw("h2spec")));
            /// h2spec generic/5/11: the same, Huffman coded.
            c11_never_indexed_indexed_name_huffman =>
                with("h2spec generic/5/11", indexed_name(0x10, 4, huff("h2spec")));
            /// h2spec generic/5/12: a literal never indexed, new name.
            c12_never_indexed_new_name =>
                with("h2spec generic/5/12", new_name(0x10, raw("x-test"), raw("h2spec")));
            /// h2spec generic/5/13: the same, Huffman coded.
            c13_never_indexed_new_name_huffman =>
                with("h2spec generic/5/13", new_name(0x10, huff("x-test"), huff("h2spec")));
            /// h2spec generic/5/14: a dynamic table size update (to 128) starting the block.
            c14_a_table_size_update =>
                represented("h2spec generic/5/14", hpack_int(0x20, 5, 128), Vec::new());
            /// h2spec generic/5/15: two dynamic table size updates (128, then 4096) starting
            /// the block.
            c15_two_table_size_updates => represented(
                "h2spec generic/5/15",
                [hpack_int(0x20, 5, 128), hpack_int(0x20, 5, 4096)].concat(),
                Vec::new(),
            );
        }
    }
}
