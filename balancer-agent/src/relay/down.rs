//! A client's connection to the relay: the proxy is the HTTP/2 server.
//!
//! Every request HEADERS is decoded, its call routed (service, endpoint) and its headers
//! encoded onto a pooled endpoint connection ([`super::up`]); DATA, trailers and resets follow
//! the link between the two streams. A call whose endpoint needs a new connection waits for its
//! handshake beside the connection's other calls, which go on meanwhile. A client that breaks
//! the protocol or a limit gets a GOAWAY and loses its connection; its calls are cancelled on the
//! endpoints; no other connection is touched.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use bytes::{Buf, BytesMut};
use futures_util::{
    StreamExt,
    future::{AbortHandle, Abortable, Aborted},
    stream::FuturesUnordered,
};
use tokio::{net::TcpStream, time::Instant};
use tracing::debug;

use super::{
    ConnectionEnded, Drain, Io, Keepalive,
    conn::{Conn, Credit, Link, Replayed, Role, State, Stream, apply, unlink},
    flush,
    read::{self, ConnError, HeaderBlock, check_connection_frame, connection_frame, unpad},
    read_more,
    up::{self, Pools},
};
use crate::{
    balance::CallGuard,
    call::{
        self, Admitted, AttemptError, Attempts, Call, Calls, End, Expiry, Replay, Target,
        breaker::ConnectionPool, grpc::Status, registry::ConnInfo, retry::Outcome,
        route::Destination,
    },
    config::Limits,
    wire::{
        frame::{self, Head, Reason, flag, kind, setting},
        hpack,
        message::{self, Fields, Malformed},
    },
};

/// Ends stream `sid` of `st` with the proxy's own status, if it is still open to send.
pub fn fail_stream(st: &mut State, sid: u32, status: &Status, credits: &mut Vec<Credit>) {
    let Some(s) = st.streams.get(&sid) else {
        return;
    };
    if s.send_done || s.trailers.is_some() {
        return;
    }
    let fields = call::answer_fields(status, !s.headers_sent);
    if s.headers_sent {
        st.send_trailers(sid, &fields, credits);
    } else {
        st.send_headers(sid, fields.iter(), true);
    }
}

struct Down {
    calls: Arc<Calls>,
    /// The limits in force when the connection was accepted, kept for its life: its SETTINGS
    /// told the client so.
    limits: Arc<Limits>,
    /// The endpoint pools, for connections from this client's source address.
    pools: up::Leases,
    target: Arc<Target>,
    info: Arc<ConnInfo>,
    conn: Arc<Conn>,
    dec: hpack::Decoder,
    fields: Fields,
    /// The header block being assembled.
    block: HeaderBlock,
    /// The largest header block accepted.
    max_block: usize,
    last_sid: u32,
    credits: Vec<Credit>,
    /// Streams the client reset before their response started, less one for each reset of
    /// an answered stream: a flood of them (rapid reset) loses the connection.
    resets: usize,
    /// Streams the proxy refused (over the stream limit, header list too large): a flood of
    /// them loses the connection.
    refused: usize,
    /// Calls with a deadline (`grpc-timeout`), soonest first.
    deadlines: BinaryHeap<Reverse<(Instant, u32)>>,
    keepalive: Option<Keepalive>,
    /// Calls waiting for an endpoint connection (its handshake), by client stream.
    waiting: HashMap<u32, Waiting>,
    /// Their routing, polled beside the client's frames.
    routing: FuturesUnordered<Abortable<RouteFuture>>,
    /// Where the connection is in a drain.
    drain: Drain,
}

type RouteFuture = Pin<Box<dyn Future<Output = Routed> + Send>>;

/// A call on its way to an endpoint whose connection is not ready yet.
struct Waiting {
    call: Routing,
    /// Ends its routing (the client reset the stream).
    abort: AbortHandle,
    held: Held,
    /// Counted against its service's `max_pending_requests` while it waits.
    _pending: Option<call::breaker::Pending>,
}

enum Routing {
    /// A new call, admitted.
    New(Admitted),
    /// A call an endpoint refused unprocessed, or that its route retries, sent to another
    /// one.
    Replay(Box<Call>),
}

/// What a call waits for before it is routed: a fault's delay (then, maybe, the fault's
/// abort instead of the call), or a retry's backoff.
struct Delay {
    until: Instant,
    abort: Option<Status>,
}

impl Routing {
    /// The call's request as kept so far.
    fn replay(&mut self) -> &mut Replay {
        match self {
            Self::New(a) => &mut a.replay,
            Self::Replay(call) => call
                .replay
                .as_mut()
                .expect("a call is routed with its request"),
        }
    }

    /// Where its route sends it.
    fn destination(&self) -> &Destination {
        match self {
            Self::New(a) => &a.destination,
            Self::Replay(call) => &call.destination,
        }
    }

    /// Its destination service's own resilience settings (pool, outlier detection).
    fn resilience(&self) -> Option<&call::route::Resilience> {
        match self {
            Self::New(a) => a.resilience.as_deref(),
            Self::Replay(call) => call.resilience.as_deref(),
        }
    }

    /// What it must wait for first, if anything (the call layer drew a fault's delay, or
    /// set a retry's backoff).
    fn delay(&mut self, now: Instant) -> Option<Delay> {
        let until = match self {
            Self::New(a) => a.fault.as_ref().and_then(|f| f.delay).map(|d| a.start + d),
            Self::Replay(call) => call.retry_at(),
        }
        .filter(|t| *t > now)?;
        let abort = match self {
            Self::New(a) => a.fault.as_mut().and_then(|f| f.abort.take()),
            Self::Replay(_) => None,
        };
        Some(Delay { until, abort })
    }

    /// It ends before it was sent: cancelled by the client (`None`), or answered with
    /// `status`.
    fn end(self, calls: &Calls, status: Option<&Status>) {
        match (self, status) {
            (Self::New(a), None) => a.cancelled(calls),
            (Self::New(a), Some(s)) => a.failed(calls, s),
            (Self::Replay(c), None) => c.finish(End::Cancelled),
            (Self::Replay(c), Some(s)) => c.finish(End::Status(&(s.code as u16).to_string())),
        }
    }
}

/// What a client sent of a call's request while it waited for its endpoint connection, sent on
/// after the headers.
#[derive(Default)]
struct Held {
    /// Request DATA: not granted back to the client before it is written on, so the stream's
    /// window bounds it.
    data: BytesMut,
    /// The request ended: with `data`, or with `trailers`.
    end: bool,
    trailers: Option<Fields>,
}

/// The outcome of routing the call of client stream `sid`.
struct Routed {
    sid: u32,
    /// The endpoints tried, the one chosen last.
    tried: Vec<SocketAddr>,
    result: Result<(CallGuard, Arc<Conn>), Status>,
}

/// Serves one client connection whose first bytes are the HTTP/2 preface, until it closes or
/// `drain` is set (then: the two-step GOAWAY of [`super::Drain`], its calls finish, it
/// closes). An error says why the proxy closed it, or why it broke.
pub async fn serve(
    relay: super::Relay,
    mut sock: TcpStream,
    target: Arc<Target>,
    info: Arc<ConnInfo>,
) -> Result<(), ConnectionEnded> {
    let mut drain = relay.drain;
    let leases = up::Leases::new(relay.pools, relay.source);
    let mut down = Down::new(relay.calls, leases, target, info);
    let conn = down.conn.clone();
    let mut rbuf = BytesMut::with_capacity(32 * 1024);
    let mut preface = false;
    // Armed at the soonest call deadline, keepalive PING or drain step.
    let mut timer = Box::pin(tokio::time::sleep_until(Instant::now()));
    let result = loop {
        if down.drain == Drain::Final && conn.lock().streams.is_empty() {
            // Drained: the second GOAWAY went out, every stream up to it is done.
            let _ = tokio::time::timeout(FLUSH_WAIT, flush(&conn, &sock)).await;
            break Ok(());
        }
        let next = [
            down.deadlines.peek().map(|Reverse((d, _))| *d),
            down.keepalive.as_ref().map(Keepalive::due),
            down.drain.due(),
        ]
        .into_iter()
        .flatten()
        .min();
        if let Some(t) = next
            && timer.deadline() != t
        {
            timer.as_mut().reset(t);
        }
        let io = tokio::select! {
            r = read_more(&conn, &mut sock, &mut rbuf) => r,
            () = &mut timer, if next.is_some() => {
                down.expire();
                down.drain.expire(&conn, down.last_sid);
                if let Some(k) = &mut down.keepalive
                    && k.due() <= Instant::now()
                    && !k.fire(&conn)
                {
                    let ended = ConnectionEnded::KeepaliveTimeout;
                    break Err(down.close_for(&sock, ended, FLUSH_WAIT).await);
                }
                continue;
            }
            Some(routed) = down.routing.next(), if !down.routing.is_empty() => {
                // Err: routing aborted, the client reset the stream.
                down.routed(routed);
                continue;
            }
            () = super::drained(&mut drain), if down.drain == Drain::Serving => {
                down.drain.announce(&conn);
                continue;
            }
        };
        match io {
            Ok(Io::Eof) => break Ok(()),
            Ok(Io::Read) => {
                if let Some(k) = &mut down.keepalive {
                    k.heard();
                }
            }
            Ok(Io::Work) => {
                let held = {
                    let st = conn.lock();
                    st.overloaded().then_some(st.held)
                };
                if let Some(held) = held {
                    // The client does not read: the GOAWAY goes out only if there is room.
                    let wait = std::time::Duration::from_millis(100);
                    let ended = ConnectionEnded::UnreadResponses(held);
                    break Err(down.close_for(&sock, ended, wait).await);
                }
                let replays = std::mem::take(&mut conn.lock().replays);
                for r in replays {
                    down.replay(r);
                }
                continue;
            }
            Err(e) => break Err(ConnectionEnded::Io(e)),
        }
        if !preface {
            if rbuf.len() < frame::PREFACE.len() {
                continue;
            }
            if &rbuf[..frame::PREFACE.len()] != frame::PREFACE {
                break Err(ConnectionEnded::BadPreface);
            }
            rbuf.advance(frame::PREFACE.len());
            preface = true;
        }
        if let Err(e) = down.frames(&mut rbuf) {
            let ended = ConnectionEnded::Protocol(e);
            break Err(down.close_for(&sock, ended, FLUSH_WAIT).await);
        }
    };
    down.close();
    result
}

impl Down {
    /// A new client connection of `target`, registered as `info`, under the limits in force:
    /// our SETTINGS (and the connection window above the default) are queued.
    fn new(calls: Arc<Calls>, pools: up::Leases, target: Arc<Target>, info: Arc<ConnInfo>) -> Self {
        let l = calls.limits();
        let conn_window = i64::from(l.initial_connection_window);
        let mut state = State::new(
            Role::Server,
            conn_window,
            i64::from(l.initial_stream_window),
        );
        state.max_out = l.max_send_buffer;
        state.max_held = l.max_connection_buffer;
        frame::settings(
            &mut state.out,
            &[
                (setting::MAX_CONCURRENT_STREAMS, l.max_concurrent_streams),
                (setting::INITIAL_WINDOW_SIZE, l.initial_stream_window),
                (setting::MAX_FRAME_SIZE, l.max_frame_size),
                (setting::MAX_HEADER_LIST_SIZE, l.max_header_list_size),
            ],
        );
        if conn_window > frame::DEFAULT_WINDOW {
            frame::window_update(
                &mut state.out,
                0,
                (conn_window - frame::DEFAULT_WINDOW) as u32,
            );
            state.recv_window = conn_window;
        }
        Down {
            calls,
            pools,
            target,
            info,
            conn: Conn::new(state),
            dec: hpack::Decoder::default(),
            fields: Fields::default(),
            block: HeaderBlock::default(),
            max_block: 2 * l.max_header_list_size as usize,
            last_sid: 0,
            credits: Vec::new(),
            resets: 0,
            refused: 0,
            deadlines: BinaryHeap::new(),
            keepalive: Keepalive::new(l.keepalive_interval, l.keepalive_timeout),
            waiting: HashMap::new(),
            routing: FuturesUnordered::new(),
            drain: Drain::default(),
            limits: l,
        }
    }
}

/// How long a connection being closed may take to write its last frames.
const FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

impl Down {
    /// Closes the connection for `ended`: counted under its label, its GOAWAY flushed for at
    /// most `wait`. Returns `ended`, for the log.
    async fn close_for(
        // `&mut`: the future stays `Send` (`Down` is not `Sync`).
        &mut self,
        sock: &TcpStream,
        ended: ConnectionEnded,
        wait: std::time::Duration,
    ) -> ConnectionEnded {
        self.calls
            .metrics
            .client_connection_errors
            .with_label_values(&[ended.label()])
            .inc();
        if let Some((reason, debug)) = ended.goaway() {
            let mut st = self.conn.lock();
            frame::goaway(&mut st.out, self.last_sid, reason, debug.as_bytes());
        }
        // Its calls end now, not after the flush: their endpoints stop sending, and what
        // waited for the client is freed.
        self.close();
        let _ = tokio::time::timeout(wait, flush(&self.conn, sock)).await;
        ended
    }

    /// Handles every complete frame in `rbuf`.
    fn frames(&mut self, rbuf: &mut BytesMut) -> Result<(), ConnError> {
        let max_frame = self.limits.max_frame_size as usize;
        while rbuf.len() >= frame::HEADER_LEN {
            let head = Head::parse(rbuf);
            if head.len > max_frame {
                return Err(ConnError::new(
                    Reason::FRAME_SIZE_ERROR,
                    format!("frame of {} bytes, limit {max_frame}", head.len),
                ));
            }
            let total = frame::HEADER_LEN + head.len;
            if rbuf.len() < total {
                rbuf.reserve(total - rbuf.len());
                break;
            }
            self.frame(head, &rbuf[frame::HEADER_LEN..total])?;
            rbuf.advance(total);
        }
        Ok(())
    }

    fn frame(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        self.block.check(head.kind)?;
        check_connection_frame(head)?;
        match head.kind {
            kind::DATA => self.data(head, payload),
            kind::PRIORITY => match read::check_priority(head, payload)? {
                Some(reason) => self.stream_error(head.stream, reason, "bad_priority"),
                None => Ok(()),
            },
            kind::WINDOW_UPDATE if head.stream > self.last_sid || head.stream.is_multiple_of(2) => {
                if head.stream == 0 {
                    return connection_frame(&self.conn, head, payload, &mut self.credits)
                        .map(drop);
                }
                Err(ConnError::new(
                    Reason::PROTOCOL_ERROR,
                    "WINDOW_UPDATE on a stream not opened",
                ))
            }
            kind::HEADERS | kind::CONTINUATION => {
                if self.block.frame(head, payload, self.max_block)? {
                    self.headers()
                } else {
                    Ok(())
                }
            }
            kind::RST_STREAM => self.reset(head, payload),
            kind::PING if head.flags & flag::ACK != 0 => {
                if let Some(k) = &mut self.keepalive {
                    k.pong(payload);
                }
                self.drain.pong(payload, &self.conn, self.last_sid);
                Ok(())
            }
            // GOAWAY (the client opens no more streams; it closes when done) and unknown types
            // are ignored.
            _ => connection_frame(&self.conn, head, payload, &mut self.credits).map(drop),
        }
    }

    fn data(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        let sid = head.stream;
        if sid == 0 || sid > self.last_sid {
            return Err(ConnError::new(
                Reason::PROTOCOL_ERROR,
                "DATA on a stream not opened",
            ));
        }
        let end = head.flags & flag::END_STREAM != 0;
        let data = unpad(head.flags, payload)?;
        let mut st = self.conn.lock();
        st.received(sid, payload.len())?;
        let reset_lately = st.reset_lately(sid);
        let link = match st.streams.get_mut(&sid) {
            Some(s) if !s.recv_done => {
                if let Some(left) = &mut s.content_left {
                    let n = data.len() as u64;
                    if n > *left || (end && n != *left) {
                        st.credit(sid, payload.len());
                        drop(st);
                        return self.malformed(sid, Malformed::ContentLengthMismatch);
                    }
                    *left -= n;
                }
                Some(s.link.clone())
            }
            // Half-closed (remote): the client ended its request already (RFC 9113 §5.1).
            Some(_) => {
                st.credit(sid, payload.len());
                drop(st);
                return self.stream_error(sid, Reason::STREAM_CLOSED, "stream_closed");
            }
            // A stream the proxy reset: DATA the client sent before it knew is expected, and
            // its window goes back at once.
            None if reset_lately => None,
            None => {
                return Err(ConnError::new(
                    Reason::STREAM_CLOSED,
                    format!("DATA on closed stream {sid}"),
                ));
            }
        };
        let padding = payload.len() - data.len();
        if end {
            st.received_end(sid, &mut self.credits);
        }
        let Some(Some(link)) = link else {
            if link.is_some()
                && let Some(w) = self.waiting.get_mut(&sid)
            {
                // Its call waits for an endpoint connection: held, the window stays taken.
                st.credit(sid, padding);
                w.held.data.extend_from_slice(data);
                w.held.end = end;
                return Ok(());
            }
            st.credit(sid, payload.len());
            if link.is_some() {
                // An open stream without a link: its call waits to be replayed, and keeps
                // this DATA (its window is back already: the replay buffer is bounded).
                if let Some(r) = st.replays.iter_mut().find(|r| r.sid == sid) {
                    r.call.request_data(data, end);
                }
            }
            return Ok(());
        };
        if padding > 0 {
            st.credit(sid, padding);
        }
        drop(st);
        let mut up = link.conn.lock();
        if let Some(c) = up.streams.get_mut(&link.sid).and_then(|s| s.call.as_mut()) {
            c.request_data(data, end);
        }
        let taken = up.send_data(link.sid, data, end, &mut self.credits);
        drop(up);
        if !taken {
            self.conn.lock().credit(sid, data.len());
        }
        apply(&mut self.credits);
        Ok(())
    }

    fn headers(&mut self) -> Result<(), ConnError> {
        let sid = self.block.sid;
        let end = self.block.end_stream;
        if sid == 0 || sid.is_multiple_of(2) {
            return Err(ConnError::new(
                Reason::PROTOCOL_ERROR,
                "HEADERS on an even stream id",
            ));
        }
        self.fields.clear();
        let fields = &mut self.fields;
        let decoded = self.dec.decode(
            &self.block.block,
            self.limits.max_header_list_size as usize,
            &mut |n, v| fields.push(n, v),
        );
        let too_large = match decoded {
            Ok(()) => false,
            Err(hpack::Error::ListTooLarge(_)) => true,
            Err(e) => return Err(ConnError::new(Reason::COMPRESSION_ERROR, e.to_string())),
        };
        if sid <= self.last_sid {
            return self.headers_again(sid, end, too_large);
        }
        self.last_sid = sid;
        if self.block.self_dependent {
            return self.stream_error(sid, Reason::PROTOCOL_ERROR, "bad_priority");
        }
        // A request is checked whole before anything of it leaves the proxy: a malformed one
        // would make the endpoint close a connection other clients' calls share.
        // A header list over the limit was only partly decoded: refused, whatever it holds.
        if too_large {
            return self.refuse(sid, Reason::PROTOCOL_ERROR);
        }
        let head = match message::check_request(self.fields.iter(), end) {
            Ok(head) => head,
            Err(m) => return self.malformed(sid, m),
        };
        let limits = &self.limits;
        {
            let mut st = self.conn.lock();
            if st.going_away || st.streams.len() >= limits.max_concurrent_streams as usize {
                drop(st);
                return self.refuse(sid, Reason::REFUSED_STREAM);
            }
            let mut s = Stream::new(
                None,
                st.peer_initial_window,
                i64::from(limits.initial_stream_window),
            );
            s.recv_done = end;
            s.content_left = head.content_length;
            st.streams.insert(sid, s);
        }
        self.open(sid, end);
        Ok(())
    }

    /// Refuses new stream `sid` (over a limit, or its header list too large); too many
    /// refusals close the connection.
    fn refuse(&mut self, sid: u32, reason: Reason) -> Result<(), ConnError> {
        self.conn.lock().refuse(sid, reason);
        self.refuse_counted()
    }

    /// A malformed request (RFC 9113 §8.1.1, §8.2, §8.3): a stream error; what was routed of
    /// it is cancelled.
    fn malformed(&mut self, sid: u32, why: Malformed) -> Result<(), ConnError> {
        debug!(stream = sid, reason = %why, "malformed request: stream reset");
        self.stream_error(sid, Reason::PROTOCOL_ERROR, why.label())
    }

    /// A stream error on `sid`: RST_STREAM with `reason`, its call cancelled on its endpoint,
    /// counted under `label`; too many close the connection.
    fn stream_error(&mut self, sid: u32, reason: Reason, label: &str) -> Result<(), ConnError> {
        self.calls
            .metrics
            .client_stream_errors
            .with_label_values(&[label])
            .inc();
        let removed = self.forget(sid, Some(reason));
        if let Some(stream) = removed {
            unlink(stream, Reason::CANCEL, End::Reset);
        }
        self.refuse_counted()
    }

    /// Counts a stream the proxy reset for an error of the client's.
    fn refuse_counted(&mut self) -> Result<(), ConnError> {
        self.refused += 1;
        if self.refused > self.limits.max_local_error_reset_streams {
            return Err(ConnError::new(
                Reason::ENHANCE_YOUR_CALM,
                "too many streams refused",
            ));
        }
        Ok(())
    }

    /// Forgets stream `sid`: a call waiting for its endpoint connection is dropped (recorded
    /// as cancelled, the window of what it held given back), and the stream leaves the
    /// connection, reset with `rst` if given (even when it was closed already). The stream is
    /// returned for its other end to be unlinked.
    fn forget(&mut self, sid: u32, rst: Option<Reason>) -> Option<Stream> {
        let (removed, waiting) = {
            let mut st = self.conn.lock();
            let waiting = self.waiting.remove(&sid);
            if let Some(w) = &waiting {
                // Its call waited for a connection: what it held goes nowhere.
                st.credit(sid, w.held.data.len());
            }
            let removed = match rst {
                Some(reason) => {
                    let s = st.reset(sid, reason);
                    if s.is_none() {
                        st.refuse(sid, reason);
                    }
                    s
                }
                None => st.remove(sid),
            };
            (removed, waiting)
        };
        if let Some(w) = waiting {
            w.abort.abort();
            self.cancel(w.call);
        }
        removed
    }

    /// HEADERS on a stream opened before: the request's trailers if it is still open,
    /// otherwise an error (RFC 9113 §5.1, §5.1.1, §8.1).
    fn headers_again(&mut self, sid: u32, end: bool, too_large: bool) -> Result<(), ConnError> {
        let recv_done = self.conn.lock().streams.get(&sid).map(|s| s.recv_done);
        match recv_done {
            Some(false) if too_large => self.stream_error(sid, Reason::PROTOCOL_ERROR, "too_large"),
            Some(false) => self.trailers(sid, end),
            Some(true) => self.stream_error(sid, Reason::STREAM_CLOSED, "stream_closed"),
            None if self.conn.lock().reset_lately(sid) => Ok(()),
            // The last stream opened, closed since: §5.1 (closed).
            None if sid == self.last_sid => Err(ConnError::new(
                Reason::STREAM_CLOSED,
                format!("HEADERS on closed stream {sid}"),
            )),
            // A stream id below the last one opened can never open (§5.1.1).
            None => Err(ConnError::new(
                Reason::PROTOCOL_ERROR,
                format!("HEADERS on stream {sid}, below the last stream opened"),
            )),
        }
    }

    /// Trailers from the client (a request that ends with them).
    fn trailers(&mut self, sid: u32, end: bool) -> Result<(), ConnError> {
        if !end {
            // A second HEADERS that does not end the stream is a malformed message (§8.1).
            return self.stream_error(sid, Reason::PROTOCOL_ERROR, "trailers_without_end");
        }
        if let Err(m) = message::check_trailers(self.fields.iter()) {
            return self.malformed(sid, m);
        }
        let mut st = self.conn.lock();
        if st
            .streams
            .get(&sid)
            .and_then(|s| s.content_left)
            .is_some_and(|left| left != 0)
        {
            drop(st);
            return self.malformed(sid, Malformed::ContentLengthMismatch);
        }
        let link = match st.streams.get(&sid) {
            Some(s) if !s.recv_done => Some(s.link.clone()),
            _ => None,
        };
        st.received_end(sid, &mut self.credits);
        // A request with trailers is not replayed (gRPC clients send none).
        if let Some(r) = st.replays.iter_mut().find(|r| r.sid == sid) {
            r.call.request_trailers();
        }
        drop(st);
        if let Some(None) = link
            && let Some(w) = self.waiting.get_mut(&sid)
        {
            w.held.trailers = Some(self.fields.clone());
            w.held.end = true;
            return Ok(());
        }
        if let Some(Some(link)) = link {
            let mut up = link.conn.lock();
            if let Some(c) = up.streams.get_mut(&link.sid).and_then(|s| s.call.as_mut()) {
                c.request_trailers();
            }
            up.send_trailers(link.sid, &self.fields, &mut self.credits);
        }
        apply(&mut self.credits);
        Ok(())
    }

    /// Admits the call of new stream `sid` (the call layer decides: its service, or the
    /// proxy's own answer) and routes it.
    fn open(&mut self, sid: u32, end: bool) {
        match self
            .calls
            .admit(&self.target, &self.info, &self.fields, end)
        {
            Ok(admitted) => self.route(sid, Routing::New(admitted), None),
            Err(refused) => {
                self.answer(sid, &refused.status);
                self.calls.refused(&refused);
            }
        }
    }

    /// Routes the call of client stream `sid`: at once when a pooled connection can take it
    /// (the usual case), else once its endpoint's new connection is ready (or its delay is
    /// over: a fault's, a retry's backoff), while the client's other calls go on.
    fn route(&mut self, sid: u32, mut call: Routing, last_error: Option<AttemptError>) {
        let service = call.destination().clone();
        let delay = call.delay(Instant::now());
        let resilience = call.resilience().copied();
        // A service with its own pool settings leases under them.
        let pool = resilience
            .and_then(|r| r.connection_pool)
            .filter(ConnectionPool::pool_settings);
        let r = call.replay();
        let deadline = r.deadline;
        let mut attempts = Attempts::new(std::mem::take(&mut r.tried), last_error)
            .keyed(r.hash)
            .since(r.attempts_from)
            .judged_by(resilience.as_ref());
        // The usual case first, with no future to box: the endpoint picked has a pooled
        // connection with a free stream slot.
        let first = if delay.is_none() {
            attempts.next(&service)
        } else {
            None
        };
        if let Some(guard) = &first
            && let Some(conn) = match pool {
                None => self.pools.lease_pooled(guard.endpoint()),
                p => self
                    .pools
                    .clone()
                    .with_pool(p)
                    .lease_pooled(guard.endpoint()),
            }
        {
            let result = Ok((first.expect("picked"), conn));
            let tried = attempts.tried;
            return self.routed_with(call, Held::default(), Routed { sid, tried, result });
        }
        let pools = self.pools.clone().with_pool(pool);
        let delayed = delay.is_some();
        let mut routing: RouteFuture =
            Box::pin(route(pools, sid, service, attempts, first, deadline, delay));
        // Polled once here, without a waker: a pooled connection is leased without waiting.
        // Pending, it is polled again by the connection's task, which registers its own.
        let waker = &mut Context::from_waker(Waker::noop());
        let (abort, registration) = match routing.as_mut().poll(waker) {
            Poll::Ready(routed) => return self.routed_with(call, Held::default(), routed),
            Poll::Pending => AbortHandle::new_pair(),
        };
        // A call waiting for a connection counts against its service's circuit breaker.
        let pending = if delayed {
            None
        } else {
            match self.calls.pending(call.destination()) {
                Ok(p) => p,
                Err(status) => {
                    self.answer(sid, &status);
                    call.end(&self.calls, Some(&status));
                    return;
                }
            }
        };
        self.routing.push(Abortable::new(routing, registration));
        let held = Held::default();
        let w = Waiting {
            call,
            abort,
            held,
            _pending: pending,
        };
        self.waiting.insert(sid, w);
    }

    /// A waiting call was routed (unless the client reset it meanwhile).
    fn routed(&mut self, routed: Result<Routed, Aborted>) {
        let Ok(routed) = routed else {
            return;
        };
        if let Some(w) = self.waiting.remove(&routed.sid) {
            self.routed_with(w.call, w.held, routed);
        }
    }

    /// Sends the call to the endpoint chosen, or answers the client with the status routing
    /// ended with.
    fn routed_with(&mut self, call: Routing, held: Held, routed: Routed) {
        let Routed { sid, tried, result } = routed;
        let (guard, upconn) = match result {
            Ok(picked) => picked,
            Err(status) => {
                // The request DATA held is going nowhere: its window goes back.
                self.conn.lock().credit(sid, held.data.len());
                self.answer(sid, &status);
                call.end(&self.calls, Some(&status));
                return;
            }
        };
        let mut call = match call {
            Routing::New(admitted) => admitted.sent(self.calls.clone(), guard),
            Routing::Replay(mut call) => {
                call.resent(guard);
                call
            }
        };
        if let Some(r) = call.replay.as_mut() {
            r.tried = tried;
        }
        self.attach(sid, &upconn, call, held);
    }

    /// Opens the call's stream on `upconn` and links it to the client's stream `sid`: the
    /// request headers (with the time left as `grpc-timeout`), the request DATA kept for a
    /// replay, if any, then what was held while the call waited for its connection.
    fn attach(&mut self, sid: u32, upconn: &Arc<Conn>, mut call: Box<Call>, held: Held) {
        {
            let mut st = self.conn.lock();
            if !st.streams.contains_key(&sid) {
                // The client reset it while the call was being routed.
                st.credit(sid, held.data.len());
                drop(st);
                call.finish(End::Cancelled);
                return;
            }
        }
        let r = call
            .replay
            .take()
            .expect("a call is attached with its request");
        // The call's deadline, or its attempt's own (a retry policy's per-try timeout), when
        // the proxy ends the attempt; the endpoint is told the call's (as Envoy does: an
        // endpoint that ended the attempt itself would answer a status the policy may not
        // retry, CANCELLED from tonic).
        let deadline = call.attempt_deadline();
        let up_sid;
        {
            let mut up = upconn.lock();
            up_sid = up.next_sid;
            up.next_sid += 2;
            let mut s = Stream::new(
                Some(Link {
                    conn: self.conn.clone(),
                    sid,
                }),
                up.peer_initial_window,
                up.stream_recv_target,
            );
            // Kept DATA was granted back to the client on its first way out.
            s.no_credit = r.data.len();
            s.call = Some(call);
            up.streams.insert(up_sid, s);
            let headers_end = r.complete && r.data.is_empty();
            match r.deadline {
                // The endpoint gets the time left, as the proxy counts it.
                Some(d) => {
                    let left = call::deadline_field(d, Instant::now());
                    let fields = r.fields.iter().map(|(n, v)| {
                        if n == b"grpc-timeout" {
                            (n, left.as_bytes())
                        } else {
                            (n, v)
                        }
                    });
                    up.send_headers(up_sid, fields, headers_end);
                }
                None => up.send_headers(up_sid, r.fields.iter(), headers_end),
            }
            if !r.data.is_empty() {
                up.send_data(up_sid, &r.data, r.complete, &mut self.credits);
            }
            // Held DATA ends the request unless trailers do.
            let data_end = held.end && held.trailers.is_none();
            if !held.data.is_empty() || data_end {
                up.send_data(up_sid, &held.data, data_end, &mut self.credits);
            }
            if let Some(t) = &held.trailers {
                up.send_trailers(up_sid, t, &mut self.credits);
            }
            if let Some(c) = up.streams.get_mut(&up_sid).and_then(|s| s.call.as_mut()) {
                c.replay = Some(r);
                if !held.data.is_empty() || held.end {
                    c.request_data(&held.data, held.end);
                }
                if held.trailers.is_some() {
                    c.request_trailers();
                }
            }
        }
        apply(&mut self.credits);
        let mut st = self.conn.lock();
        let Some(s) = st.streams.get_mut(&sid) else {
            return;
        };
        s.link = Some(Link {
            conn: upconn.clone(),
            sid: up_sid,
        });
        if let Some(d) = deadline {
            // Calls that ended before their deadline leave their entry behind: drop those
            // once they outnumber the live streams, so the heap stays bounded by them.
            if self.deadlines.len() > 2 * st.streams.len() + 64 {
                self.deadlines
                    .retain(|Reverse((_, id))| st.streams.contains_key(id));
            }
            self.deadlines.push(Reverse((d, sid)));
        }
    }

    /// Sends a call an endpoint refused unprocessed, or that the call layer retries, to
    /// another endpoint, with the request kept so far, unless the call layer says it cannot
    /// be (request too large, deadline passed); dropped if the client went away meanwhile.
    fn replay(&mut self, Replayed { sid, call }: Replayed) {
        if !self.conn.lock().streams.contains_key(&sid) {
            call.finish(End::Cancelled);
            return;
        }
        if let Some(status) = call.replay_refusal(Instant::now()) {
            return self.fail_call(sid, call, &status);
        }
        let last = call.guard.endpoint().addr;
        // A retry (the call layer set when it may leave) did not fail for want of an endpoint.
        let refused = call
            .retry_at()
            .is_none()
            .then_some(AttemptError::Refused(last));
        debug!(endpoint = %last, retry = refused.is_none(), "replaying the call on another endpoint");
        self.route(sid, Routing::Replay(call), refused);
    }

    /// Ends client stream `sid` with the proxy's own status and records its call.
    fn fail_call(&mut self, sid: u32, call: Box<Call>, status: &Status) {
        self.answer(sid, status);
        call.finish(End::Status(&(status.code as u16).to_string()));
    }

    /// Ends the calls whose deadline passed with DEADLINE_EXCEEDED and cancels them on their
    /// endpoints.
    fn expire(&mut self) {
        let now = Instant::now();
        while let Some(&Reverse((d, sid))) = self.deadlines.peek() {
            if d > now {
                break;
            }
            self.deadlines.pop();
            let Some(link) = self
                .conn
                .lock()
                .streams
                .get(&sid)
                .and_then(|s| s.link.clone())
            else {
                continue;
            };
            // What passed: the call's deadline, its attempt's own (a per-try timeout), or
            // nothing (the entry of an earlier attempt).
            let expiry = link
                .conn
                .lock()
                .streams
                .get(&link.sid)
                .and_then(|s| s.call.as_ref())
                .map(|c| c.expiry(now));
            if expiry == Some(Expiry::None) {
                continue;
            }
            let taken = link.conn.lock().reset(link.sid, Reason::CANCEL);
            // Request DATA that waited there for the endpoint's window is owed to the client.
            if let Some(c) = taken.as_ref().and_then(Stream::uncredited) {
                self.credits.push(c);
            }
            let mut call = taken.and_then(|s| s.call);
            if expiry == Some(Expiry::Attempt)
                && let Some(c) = call.as_mut()
                && c.retry(Outcome::TryTimeout, None, now)
            {
                // Tried again: the client's stream waits for the next attempt.
                if let Some(s) = self.conn.lock().streams.get_mut(&sid) {
                    s.link = None;
                }
                apply(&mut self.credits);
                let call = call.take().expect("checked");
                self.replay(Replayed { sid, call });
                continue;
            }
            let service = call.as_ref().map_or("", |c| &*c.service.name);
            let status = if expiry == Some(Expiry::Attempt) {
                Status::deadline(format!(
                    "per-try timeout (retries.per_try_timeout) exceeded in the proxy on a call \
                     to service {service}, and the call is not tried again"
                ))
            } else {
                call::deadline_status(service, "on a call to")
            };
            fail_stream(&mut self.conn.lock(), sid, &status, &mut self.credits);
            if let Some(call) = call {
                call.finish(End::Status("4"));
            }
            apply(&mut self.credits);
        }
    }

    /// Answers stream `sid` with the proxy's own status (unless the client reset it
    /// meanwhile); the caller records the call.
    fn answer(&mut self, sid: u32, status: &Status) {
        debug!(code = ?status.code, message = %status.message, "call failed in the proxy");
        fail_stream(&mut self.conn.lock(), sid, status, &mut self.credits);
        apply(&mut self.credits);
    }

    fn reset(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        read::rst_reason(payload)?;
        if head.stream == 0 || head.stream > self.last_sid {
            return Err(ConnError::new(
                Reason::PROTOCOL_ERROR,
                "RST_STREAM on a stream not opened",
            ));
        }
        let Some(stream) = self.forget(head.stream, None) else {
            return Ok(());
        };
        if stream.headers_sent {
            self.resets = self.resets.saturating_sub(1);
        } else {
            self.resets += 1;
        }
        unlink(stream, Reason::CANCEL, End::Cancelled);
        if self.resets > self.limits.max_pending_accept_reset_streams {
            return Err(ConnError::new(
                Reason::ENHANCE_YOUR_CALM,
                "too many streams reset by the client before their response (rapid reset)",
            ));
        }
        Ok(())
    }

    /// The connection is gone: cancel its calls on the endpoints, and those waiting for a
    /// replay.
    fn close(&mut self) {
        let (streams, replays): (Vec<Stream>, Vec<Replayed>) = {
            let mut st = self.conn.lock();
            st.closed = true;
            st.held = 0;
            let streams = st.streams.drain().map(|(_, s)| s).collect();
            (streams, std::mem::take(&mut st.replays))
        };
        for s in streams {
            unlink(s, Reason::CANCEL, End::Cancelled);
        }
        for r in replays {
            r.call.finish(End::Cancelled);
        }
        // Calls waiting for a connection: their routing is dropped with this task.
        let waiting: Vec<Waiting> = self.waiting.drain().map(|(_, w)| w).collect();
        for w in waiting {
            self.cancel(w.call);
        }
    }

    /// Records a call the client cancelled before it had an endpoint.
    fn cancel(&self, call: Routing) {
        call.end(&self.calls, None);
    }
}

/// Routes the call of client stream `sid` (see [`pick`]), starting with endpoint `first` if
/// one was picked already, after its `delay` if it has one (then, for a fault's abort, the
/// abort is the outcome).
async fn route(
    pools: up::Leases,
    sid: u32,
    service: Destination,
    mut attempts: Attempts,
    first: Option<CallGuard>,
    deadline: Option<Instant>,
    delay: Option<Delay>,
) -> Routed {
    let result = match delay {
        Some(Delay { until, .. }) if deadline.is_some_and(|d| d <= until) => {
            tokio::time::sleep_until(deadline.expect("checked")).await;
            Err(call::deadline_status(
                &service.service.name,
                "on the way to",
            ))
        }
        Some(Delay { until, abort }) => {
            tokio::time::sleep_until(until).await;
            match abort {
                Some(status) => Err(status),
                None => pick(&pools, &service, &mut attempts, first, deadline).await,
            }
        }
        None => pick(&pools, &service, &mut attempts, first, deadline).await,
    };
    let tried = attempts.tried;
    Routed { sid, tried, result }
}

/// Leases a connection to the endpoint the call layer picks next: an endpoint that cannot be
/// reached, or whose connections are all at its stream limit, is skipped for another (no byte
/// of the call left the proxy) while [`Attempts`] allows; then the call layer's answer.
async fn pick(
    pools: &up::Leases,
    service: &Destination,
    attempts: &mut Attempts,
    mut first: Option<CallGuard>,
    deadline: Option<Instant>,
) -> Result<(CallGuard, Arc<Conn>), Status> {
    loop {
        let Some(guard) = first.take().or_else(|| attempts.next(service)) else {
            return Err(attempts.exhausted(service));
        };
        let ep = guard.endpoint().clone();
        let leased = match deadline {
            Some(d) => tokio::time::timeout_at(d, pools.lease(&ep)).await,
            None => Ok(pools.lease(&ep).await),
        };
        let Ok(leased) = leased else {
            return Err(call::deadline_status(
                &service.service.name,
                "on the way to",
            ));
        };
        match leased {
            Ok(c) => return Ok((guard, c)),
            Err(e @ up::LeaseError::Full(_)) => {
                debug!(endpoint = %ep.addr, "endpoint's connections are full; trying another");
                attempts.record(e.into());
            }
            Err(e @ up::LeaseError::Connect(_)) => {
                ep.stats.connect_failed();
                debug!(endpoint = %ep.addr, error = %e, "endpoint failed before the call was sent");
                attempts.record(e.into());
            }
        }
    }
}

/// Feeds `chunks` of client bytes (the preface first) to a client connection in memory, as a
/// fuzzer does, and checks after each chunk what must hold whatever a client sends: no panic,
/// flow-control windows that the client cannot push below zero, no more streams than the
/// limit, DATA held for the streams accounted exactly, and a write buffer that grows by a
/// bounded factor of what was read (the client "reads" everything between chunks). Every
/// request is answered by the proxy itself: the store is empty, so nothing leaves the process.
/// Returns whether the connection was closed for a connection error.
#[doc(hidden)]
pub fn feed_client_bytes(chunks: &[&[u8]]) -> bool {
    use crate::{config::PoolConfig, metrics::Metrics, state::Store};
    let store = Store::new(PoolConfig::default());
    let metrics = Metrics::new(store.clone(), 10);
    let calls = Calls::new(store, metrics, crate::config::Limits::default());
    let target = Arc::new(Target::Authority { default: None });
    let peer = SocketAddr::from(([127, 0, 0, 1], 40000));
    let info = calls.registry.open_connection(peer, peer, &target);
    let pools = up::Leases::new(Pools::new(PoolConfig::default(), 1), None);
    let mut down = Down::new(calls.clone(), pools, target, info);
    let max_streams = calls.limits().max_concurrent_streams as usize;
    let mut rbuf = BytesMut::new();
    let mut preface = false;
    let mut failed = false;
    for chunk in chunks {
        rbuf.extend_from_slice(chunk);
        if !preface {
            if rbuf.len() < frame::PREFACE.len() {
                continue;
            }
            if &rbuf[..frame::PREFACE.len()] != frame::PREFACE {
                break;
            }
            rbuf.advance(frame::PREFACE.len());
            preface = true;
        }
        let result = down.frames(&mut rbuf);
        let mut st = down.conn.lock();
        assert!(st.recv_window >= 0, "connection window below zero");
        assert!(
            st.streams.len() <= max_streams,
            "more streams than the limit"
        );
        let pending: usize = st.streams.values().map(|s| s.pending.len()).sum();
        assert_eq!(st.held, pending, "held DATA accounted wrong");
        for s in st.streams.values() {
            assert!(s.recv_window >= 0, "stream window below zero");
        }
        // An answer (trailers-only HEADERS, RST_STREAM, PING ACK, WINDOW_UPDATE, SETTINGS
        // ACK) per frame read, the smallest frame 9 bytes: a bounded factor.
        assert!(
            st.out.len() <= 64 * chunk.len() + 64 * 1024,
            "{} bytes queued for {} bytes read",
            st.out.len(),
            chunk.len()
        );
        st.out.clear();
        drop(st);
        if result.is_err() {
            failed = true;
            break;
        }
    }
    down.close();
    assert_eq!(
        calls.active(),
        0,
        "calls left in flight after the connection closed"
    );
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's bytes: the preface, an empty SETTINGS, then `frames`.
    fn client(frames: &[(u8, u8, u32, &[u8])]) -> Vec<u8> {
        let mut b = BytesMut::from(frame::PREFACE);
        frame::settings(&mut b, &[]);
        for &(kind, flags, sid, payload) in frames {
            Head::write(&mut b, payload.len(), kind, flags, sid);
            b.extend_from_slice(payload);
        }
        b.to_vec()
    }

    fn request_block() -> Vec<u8> {
        let mut enc = hpack::Encoder::default();
        let mut block = BytesMut::new();
        enc.begin(&mut block);
        for (n, v) in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/helloworld.Greeter/SayHello"),
            (":authority", "greeter:50051"),
            ("te", "trailers"),
        ] {
            enc.field(n.as_bytes(), v.as_bytes(), &mut block);
        }
        block.to_vec()
    }

    #[test]
    fn requests_in_memory_are_answered_and_leave_nothing_in_flight() {
        let block = request_block();
        let end = flag::END_HEADERS | flag::END_STREAM;
        let bytes = client(&[
            (kind::HEADERS, end, 1, &block),
            (kind::PING, 0, 0, &[1; 8]),
            (kind::WINDOW_UPDATE, 0, 0, &[0, 0, 1, 0]),
        ]);
        // Whole, and byte by byte: the same outcome.
        assert!(!feed_client_bytes(&[&bytes]));
        let bytes_one_by_one: Vec<&[u8]> = bytes.chunks(1).collect();
        assert!(!feed_client_bytes(&bytes_one_by_one));
    }

    #[test]
    fn a_connection_error_in_memory_is_reported() {
        // DATA on stream 0.
        let bytes = client(&[(kind::DATA, 0, 0, b"x")]);
        assert!(feed_client_bytes(&[&bytes]));
    }
}
