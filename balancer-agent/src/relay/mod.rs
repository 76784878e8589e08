//! The frame relay: our own HTTP/2 data plane, the proxy's only engine.
//!
//! The relay moves frames: a HEADERS frame from a client is decoded once (HPACK), checked
//! (RFC 9113 §8: a malformed request is reset here and never reaches an endpoint), routed, and
//! encoded once onto a pooled endpoint connection; DATA is copied from one connection's read
//! buffer into the other's write buffer under both flow-control windows and the write
//! buffer's bound; the response comes back the same way. One task per connection, none per
//! call, no header map.
//!
//! - [`conn`]: a connection's shared state (write buffer, windows, streams) and the send side.
//! - [`down`]: client connections (the proxy is the server).
//! - [`up`]: endpoint connections (the proxy is the client) and their pool.
//! - [`read`]: what both do with the frames they read.
#![forbid(unsafe_code)]

pub mod conn;
pub mod down;
pub mod read;
pub mod up;

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, BytesMut};
use tokio::{net::TcpStream, time::Instant};
use tokio_util::io::poll_read_buf;

use crate::wire::frame::{self, Reason};

use conn::Conn;
use read::ConnError;

pub use down::serve;

/// What a client connection's task needs besides its socket: the call layer it asks, the
/// endpoint pools it leases from and the source address its endpoint connections carry, and
/// the drain signal (true: finish the calls and close).
#[derive(Clone)]
pub struct Relay {
    /// The call layer.
    pub calls: std::sync::Arc<crate::call::Calls>,
    /// The endpoint pools.
    pub pools: std::sync::Arc<up::Pools>,
    /// The client pod whose address the connections to endpoints carry; `None`: the node's.
    pub source: Option<std::sync::Arc<crate::netns::Source>>,
    /// The drain signal.
    pub drain: tokio::sync::watch::Receiver<bool>,
}

/// Why a connection's task ended: a client connection's ([`down::serve`]) or an endpoint
/// connection's ([`up`]).
#[derive(Debug, thiserror::Error)]
pub enum ConnectionEnded {
    /// The peer closed the connection.
    #[error("closed by the peer")]
    PeerClosed,
    /// The peer broke the protocol or a limit: the proxy sent a GOAWAY with this reason and
    /// message, and closed.
    #[error("{}: {}", .0.reason, .0.message)]
    Protocol(ConnError),
    /// A keepalive PING went unanswered.
    #[error("keepalive PING unanswered")]
    KeepaliveTimeout,
    /// A client left this many response bytes unread, more than
    /// `limits.max_connection_buffer`.
    #[error("{0} response bytes left unread (limits.max_connection_buffer)")]
    UnreadResponses(usize),
    /// A client's first bytes were not the HTTP/2 preface.
    #[error("bad HTTP/2 preface")]
    BadPreface,
    /// Reading or writing the socket failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The endpoint's connection finished its calls after a GOAWAY.
    #[error("drained after GOAWAY")]
    Drained,
    /// The pool retired the endpoint's connection (too old, its share of calls, idle) and
    /// its last call ended.
    #[error("retired from the pool")]
    Retired,
}

impl ConnectionEnded {
    /// Its label in metrics (`balancer_client_connection_errors_total{reason}`).
    pub fn label(&self) -> &'static str {
        match self {
            Self::PeerClosed => "peer_closed",
            Self::Protocol(_) => "protocol",
            Self::KeepaliveTimeout => "keepalive_timeout",
            Self::UnreadResponses(_) => "unread_responses",
            Self::BadPreface => "bad_preface",
            Self::Io(_) => "io",
            Self::Drained => "drained",
            Self::Retired => "retired",
        }
    }

    /// The GOAWAY the proxy sends when it closes a connection for this: its error code and
    /// debug data. None for an end the peer caused by closing, or that needs no GOAWAY.
    pub fn goaway(&self) -> Option<(Reason, String)> {
        match self {
            Self::Protocol(e) => Some((e.reason, e.message.clone())),
            Self::KeepaliveTimeout => Some((Reason::NO_ERROR, self.to_string())),
            Self::UnreadResponses(_) => Some((Reason::ENHANCE_YOUR_CALM, self.to_string())),
            _ => None,
        }
    }
}

/// Read buffer space kept free before each read.
const READ_RESERVE: usize = 16 * 1024;

/// What woke a connection's task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    /// Bytes were read.
    Read,
    /// The peer closed the connection.
    Eof,
    /// The connection's state has work for its task ([`conn::State::has_work`]).
    Work,
}

/// Flushes what is queued for `sock`, then waits until it has bytes to read or its state has
/// work for the task. Queued frames are flushed whenever the task is woken.
pub async fn read_more(conn: &Conn, sock: &mut TcpStream, rbuf: &mut BytesMut) -> io::Result<Io> {
    poll_fn(|cx| poll_io(conn, sock, rbuf, cx)).await
}

fn poll_io(
    conn: &Conn,
    sock: &mut TcpStream,
    rbuf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<Io>> {
    loop {
        let mut st = conn.lock();
        st.register(cx.waker());
        let blocked = match write_out(&mut st.out, sock) {
            Ok(written) => !written,
            Err(e) => return Poll::Ready(Err(e)),
        };
        if st.out_full && st.out.len() <= st.max_out / 2 {
            // The peer read: DATA that waited for room in the write buffer goes out, and its
            // window goes back to its sender.
            st.out_full = false;
            let mut credits = Vec::new();
            st.drain_all(&mut credits);
            drop(st);
            conn::apply(&mut credits);
            continue;
        }
        if st.has_work() {
            return Poll::Ready(Ok(Io::Work));
        }
        // A peer that does not read while it makes the proxy write (PINGs, SETTINGS, requests
        // answered at once) is not read either until it does: the buffer stays bounded.
        let stalled = st.out.len() > st.max_out;
        drop(st);
        if blocked {
            match sock.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        if stalled {
            return Poll::Pending;
        }
        rbuf.reserve(READ_RESERVE);
        // Through `AsyncRead`: a read that does not fill the buffer tells tokio the socket is
        // drained, which saves the read that would return WouldBlock on every wake-up.
        return match poll_read_buf(Pin::new(&mut *sock), cx, rbuf) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(0)) => Poll::Ready(Ok(Io::Eof)),
            Poll::Ready(Ok(_)) => Poll::Ready(Ok(Io::Read)),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        };
    }
}

/// Resolves once the drain signal is set (or its sender is gone).
async fn drained(drain: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = drain.wait_for(|d| *d).await;
}

/// How a client connection closes when the agent drains: the graceful two-step GOAWAY of
/// RFC 9113 §6.8, so that no stream the client sent is refused or lost.
///
/// 1. [`Drain::announce`]: a GOAWAY with the largest stream id (2^31-1) and NO_ERROR tells the
///    client to open no more streams here (it opens its next ones on a new connection), and a
///    PING follows it. Streams that were on their way keep being accepted.
/// 2. [`Drain::finish`]: when the PING's ACK comes back, every stream the client opened before
///    it read the first GOAWAY has arrived (frames are read in order); a client that does not
///    answer gets [`DRAIN_ANNOUNCE_WAIT`]. A second GOAWAY then names the last stream the
///    proxy serves. Every stream up to it is served to its end; a stream above it (only a
///    client that ignored the first GOAWAY sends one) is refused unprocessed, which it may
///    retry elsewhere.
///
/// The connection closes once it is [`Drain::Final`] and its streams are done.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Not draining.
    #[default]
    Serving,
    /// The first GOAWAY and its PING are out; the second GOAWAY goes at the ACK or at `until`.
    Announced {
        /// When the second GOAWAY goes without an ACK.
        until: Instant,
    },
    /// The second GOAWAY is out: no new stream; the connection closes when its streams are done.
    Final,
}

/// How long the first GOAWAY waits for its PING's ACK before the second goes anyway.
pub const DRAIN_ANNOUNCE_WAIT: Duration = Duration::from_secs(1);

/// The payload of the PING that follows the first GOAWAY ("drain" tag, distinct from keepalive
/// PINGs).
pub const DRAIN_PING: [u8; 8] = *b"blbdrain";

/// The largest stream id: the first GOAWAY's last-stream-id (RFC 9113 §6.8).
pub const MAX_STREAM_ID: u32 = (1 << 31) - 1;

impl Drain {
    /// Step 1: the first GOAWAY (2^31-1, NO_ERROR) and a PING, queued on `conn`.
    pub fn announce(&mut self, conn: &Conn) {
        if *self != Drain::Serving {
            return;
        }
        let mut st = conn.lock();
        frame::goaway(&mut st.out, MAX_STREAM_ID, Reason::NO_ERROR, b"");
        frame::ping(&mut st.out, false, DRAIN_PING);
        st.wake();
        *self = Drain::Announced {
            until: Instant::now() + DRAIN_ANNOUNCE_WAIT,
        };
    }

    /// Step 2: the second GOAWAY naming `last_sid`, the last stream the client opened; the
    /// connection takes no stream above it.
    pub fn finish(&mut self, conn: &Conn, last_sid: u32) {
        if !matches!(self, Drain::Announced { .. }) {
            return;
        }
        let mut st = conn.lock();
        st.going_away = true;
        frame::goaway(&mut st.out, last_sid, Reason::NO_ERROR, b"");
        st.wake();
        *self = Drain::Final;
    }

    /// A PING ACK with `payload` arrived: the ACK of the drain PING finishes the drain.
    pub fn pong(&mut self, payload: &[u8], conn: &Conn, last_sid: u32) {
        if payload == DRAIN_PING {
            self.finish(conn, last_sid);
        }
    }

    /// When [`Drain::expire`] is due, if it is.
    pub fn due(&self) -> Option<Instant> {
        match self {
            Drain::Announced { until } => Some(*until),
            _ => None,
        }
    }

    /// At [`Drain::due`]: the second GOAWAY goes without the ACK.
    pub fn expire(&mut self, conn: &Conn, last_sid: u32) {
        if self.due().is_some_and(|t| t <= Instant::now()) {
            self.finish(conn, last_sid);
        }
    }
}

/// Keepalive PINGs on a connection: one every `interval`; one unanswered for `timeout` means
/// the peer is gone. Driven by the connection's task: [`Keepalive::due`] says when to call
/// [`Keepalive::fire`], whose frames go into the connection's write buffer.
#[derive(Debug)]
pub struct Keepalive {
    interval: Duration,
    timeout: Duration,
    /// The next PING, or, with one unanswered, the time it is given up on.
    due: Instant,
    /// The payload of the PING in flight.
    outstanding: Option<[u8; 8]>,
    /// Bytes came from the peer since that PING: it is alive, whatever became of the PING.
    heard: bool,
    /// The PING's time ran out once already (see [`Keepalive::fire`]).
    late: bool,
    sent: u64,
}

impl Keepalive {
    /// `None` when `interval` is zero (keepalive off).
    pub fn new(interval: Duration, timeout: Duration) -> Option<Self> {
        (!interval.is_zero()).then(|| Self {
            interval,
            timeout,
            due: Instant::now() + interval,
            outstanding: None,
            heard: false,
            late: false,
            sent: 0,
        })
    }

    /// The peer sent something.
    pub fn heard(&mut self) {
        self.heard = true;
    }

    /// When [`Keepalive::fire`] is next due.
    pub fn due(&self) -> Instant {
        self.due
    }

    /// At [`Self::due`]: sends the next PING; false if the last one went unanswered and
    /// nothing else came either (the peer is gone). A PING out of time is given a short grace
    /// first: the timer and the answer may be ready in the same turn, and the task may run the
    /// timer first; with the grace it reads the answer before it decides.
    pub fn fire(&mut self, conn: &Conn) -> bool {
        if self.outstanding.is_some() && !self.heard {
            if self.late {
                return false;
            }
            self.late = true;
            self.due = Instant::now() + KEEPALIVE_GRACE;
            return true;
        }
        self.heard = false;
        self.late = false;
        self.sent += 1;
        let payload = (KEEPALIVE_TAG | self.sent).to_be_bytes();
        self.outstanding = Some(payload);
        self.due = Instant::now() + self.timeout;
        let mut st = conn.lock();
        frame::ping(&mut st.out, false, payload);
        st.wake();
        true
    }

    /// A PING ACK arrived.
    pub fn pong(&mut self, payload: &[u8]) {
        if self.outstanding.is_some_and(|p| p == payload) {
            self.outstanding = None;
            self.late = false;
            self.due = Instant::now() + self.interval;
        }
    }
}

/// How long a keepalive PING out of time waits for bytes already on their way.
const KEEPALIVE_GRACE: Duration = Duration::from_millis(20);

/// The high bytes of our keepalive PING payloads ("kA").
const KEEPALIVE_TAG: u64 = 0x6b41 << 48;

/// Writes what is queued for `sock`, waiting for the socket as needed (before closing it).
pub async fn flush(conn: &Conn, sock: &TcpStream) -> io::Result<()> {
    loop {
        if write_out(&mut conn.lock().out, sock)? {
            return Ok(());
        }
        sock.writable().await?;
    }
}

/// Writes `out` to `sock` until it is empty (true) or the socket is full (false). A buffer
/// that grew large for a burst is given back once empty.
fn write_out(out: &mut BytesMut, sock: &TcpStream) -> io::Result<bool> {
    while !out.is_empty() {
        match sock.try_write(out) {
            Ok(n) => out.advance(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    if out.capacity() > 256 * 1024 {
        *out = BytesMut::with_capacity(16 * 1024);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::wire::frame::{Head, kind};
    use conn::{Role, State};

    /// The frames queued on `conn` (kind, flags, stream, payload), taken out.
    fn frames(conn: &Conn) -> Vec<(u8, u32, Vec<u8>)> {
        let mut st = conn.lock();
        let mut b = std::mem::take(&mut st.out);
        let mut out = Vec::new();
        while b.len() >= frame::HEADER_LEN {
            let h = Head::parse(&b);
            let total = frame::HEADER_LEN + h.len;
            out.push((h.kind, h.stream, b[frame::HEADER_LEN..total].to_vec()));
            b.advance(total);
        }
        out
    }

    fn goaway(last: u32) -> (u8, u32, Vec<u8>) {
        let mut p = last.to_be_bytes().to_vec();
        p.extend_from_slice(&Reason::NO_ERROR.0.to_be_bytes());
        (kind::GOAWAY, 0, p)
    }

    fn server() -> Arc<Conn> {
        Conn::new(State::new(Role::Server, 65_535, 65_535))
    }

    #[test]
    fn a_drain_announces_with_the_largest_id_then_names_the_last_stream_at_the_ping_ack() {
        let conn = server();
        let mut d = Drain::default();
        d.announce(&conn);
        assert_eq!(
            frames(&conn),
            [goaway(MAX_STREAM_ID), (kind::PING, 0, DRAIN_PING.to_vec())]
        );
        assert!(
            !conn.lock().going_away,
            "streams still arrive after the first GOAWAY"
        );
        // Announcing twice, or another PING's ACK, changes nothing.
        d.announce(&conn);
        d.pong(&[0; 8], &conn, 7);
        assert!(frames(&conn).is_empty());
        assert!(matches!(d, Drain::Announced { .. }));
        d.pong(&DRAIN_PING, &conn, 7);
        assert_eq!(frames(&conn), [goaway(7)]);
        assert_eq!(d, Drain::Final);
        assert!(conn.lock().going_away);
        assert!(
            conn.lock().drained(),
            "no stream left: the connection closes"
        );
        d.pong(&DRAIN_PING, &conn, 9);
        assert!(frames(&conn).is_empty(), "one second GOAWAY only");
    }

    #[tokio::test(start_paused = true)]
    async fn without_an_ack_the_second_goaway_goes_after_the_wait() {
        let conn = server();
        let mut d = Drain::default();
        d.announce(&conn);
        frames(&conn);
        let due = d.due().expect("a second step is due");
        assert_eq!(due - Instant::now(), DRAIN_ANNOUNCE_WAIT);
        tokio::time::sleep(DRAIN_ANNOUNCE_WAIT / 2).await;
        d.expire(&conn, 3);
        assert!(frames(&conn).is_empty(), "not yet");
        tokio::time::sleep_until(due).await;
        d.expire(&conn, 3);
        assert_eq!(frames(&conn), [goaway(3)]);
        assert_eq!(d.due(), None);
    }
}
