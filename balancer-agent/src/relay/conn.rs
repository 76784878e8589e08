//! One HTTP/2 connection's shared state: what is queued to write to its socket, its send
//! windows and HPACK encoder, and its streams. The task that owns the socket reads and flushes;
//! the task of the connection at the other end of a call writes into it (frames for its
//! streams) and wakes it.
//!
//! Locking: a task holds at most one connection's lock at a time, and never across an await.
//! Every connection of a call runs on the same worker thread (`crate::workers`), so the locks
//! are never contended; they are there to keep the types `Send`.
//!
//! Flow control, end to end: DATA received on one connection is written into the other only as
//! far as that one's send windows allow; the rest waits in the stream's `pending` buffer, and
//! the receive window is returned to the sender ([`Credit`]) only for the bytes written on. So
//! a stream holds at most the window the proxy granted its sender, and a slow reader stops the
//! writer at the other end.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    task::Waker,
};

use bytes::{Buf, BytesMut};
use foldhash::{HashMap, HashMapExt};
use tokio::time::Instant;

use crate::{
    call::{Call, End},
    wire::{
        frame::{self, Reason},
        hpack,
        message::Fields,
    },
};

use super::read::ConnError;

/// A connection, shared between the task that owns its socket and the tasks of the
/// connections its calls are relayed to.
#[derive(Debug)]
pub struct Conn {
    state: Mutex<State>,
}

impl Conn {
    /// A connection with `state`.
    pub fn new(state: State) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(state),
        })
    }

    /// Its state (never contended: see the module's note on locking).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The other end of a relayed stream: a connection and the stream's id on it.
#[derive(Debug, Clone)]
pub struct Link {
    /// The other connection.
    pub conn: Arc<Conn>,
    /// The stream's id there.
    pub sid: u32,
}

/// Bytes of stream `sid` of `conn` that were written on: their receive window goes back.
#[derive(Debug)]
pub struct Credit {
    /// The connection that received the bytes.
    pub conn: Arc<Conn>,
    /// Their stream there.
    pub sid: u32,
    /// How many.
    pub n: usize,
}

/// Which end of HTTP/2 the proxy plays on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A client's connection to the proxy.
    Server,
    /// The proxy's connection to an endpoint.
    Client,
}

/// One stream of a connection.
#[derive(Debug)]
pub struct Stream {
    /// The same call's stream on the other connection, once there is one.
    pub link: Option<Link>,
    /// Our send window (the peer's grant).
    pub send_window: i64,
    /// DATA waiting for window.
    pub pending: BytesMut,
    /// END_STREAM follows `pending` (or the trailers do).
    pub pending_end: bool,
    /// Trailers to send once `pending` is written.
    pub trailers: Option<Fields>,
    /// We sent HEADERS on it.
    pub headers_sent: bool,
    /// We sent END_STREAM on it.
    pub send_done: bool,
    /// The peer's send window, as we granted it.
    pub recv_window: i64,
    /// Received and written on, not yet granted back.
    pub recv_owed: i64,
    /// The peer sent END_STREAM on it.
    pub recv_done: bool,
    /// The call, on the endpoint side of it.
    pub call: Option<Box<Call>>,
    /// Leading bytes of the DATA still to send that the sender was already granted back: a
    /// replayed request resends bytes credited on their first way out.
    pub no_credit: usize,
    /// Request DATA still due by the client's `content-length` (client streams).
    pub content_left: Option<u64>,
}

impl Stream {
    /// A stream linked to `link`, with our send window and the peer's receive window.
    pub fn new(link: Option<Link>, send_window: i64, recv_window: i64) -> Self {
        Self {
            link,
            send_window,
            pending: BytesMut::new(),
            pending_end: false,
            trailers: None,
            headers_sent: false,
            send_done: false,
            recv_window,
            recv_owed: 0,
            recv_done: false,
            call: None,
            no_credit: 0,
            content_left: None,
        }
    }

    /// `n` bytes of this stream's DATA were written: their window goes back to the sender (the
    /// link), less the `no_credit` bytes they start with.
    fn written(&mut self, n: usize, credits: &mut Vec<Credit>) {
        let skip = n.min(self.no_credit);
        self.no_credit -= skip;
        if n > skip
            && let Some(l) = &self.link
        {
            credits.push(Credit {
                conn: l.conn.clone(),
                sid: l.sid,
                n: n - skip,
            });
        }
    }

    /// DATA waiting here whose window the sender has not had back: it is owed to the link
    /// when the stream is forgotten with it.
    pub fn uncredited(&self) -> Option<Credit> {
        let n = self.pending.len().saturating_sub(self.no_credit);
        let l = self.link.as_ref()?;
        (n > 0).then(|| Credit {
            conn: l.conn.clone(),
            sid: l.sid,
            n,
        })
    }
}

/// A call whose endpoint refused its stream unprocessed, handed back to the client's
/// connection to be sent to another endpoint (`super::down`).
#[derive(Debug)]
pub struct Replayed {
    /// The client's stream.
    pub sid: u32,
    /// The call, with its request as kept so far.
    pub call: Box<Call>,
}

/// The shared state of a connection.
#[derive(Debug)]
pub struct State {
    /// Which end the proxy plays.
    pub role: Role,
    /// Bytes to write to the socket.
    pub out: BytesMut,
    waker: Option<Waker>,
    /// No more frames may be queued (the connection is gone).
    pub closed: bool,
    /// No new streams (GOAWAY received or sent).
    pub going_away: bool,
    /// The HPACK encoder of what the proxy sends.
    pub enc: hpack::Encoder,
    block: BytesMut,
    /// Connection-level send window.
    pub send_window: i64,
    /// The peer's SETTINGS_INITIAL_WINDOW_SIZE.
    pub peer_initial_window: i64,
    /// The peer's SETTINGS_MAX_FRAME_SIZE.
    pub peer_max_frame: usize,
    /// The peer's SETTINGS_MAX_CONCURRENT_STREAMS.
    pub peer_max_streams: usize,
    /// Connection-level receive window, as granted.
    pub recv_window: i64,
    recv_owed: i64,
    /// What we grant a connection and a stream when the window is back to full.
    pub recv_target: i64,
    /// The same for a stream.
    pub stream_recv_target: i64,
    /// Its open streams.
    pub streams: HashMap<u32, Stream>,
    /// Next stream id to open (client role).
    pub next_sid: u32,
    /// Out of its pool (too old, too many calls, idle): it closes once its streams are done.
    pub retired: bool,
    /// When it was opened.
    pub created: Instant,
    /// Calls to send to another endpoint (server role).
    pub replays: Vec<Replayed>,
    /// The write buffer's bound for DATA: beyond it, DATA waits in its stream (whose window
    /// the sender does not get back meanwhile) and, once control frames push the buffer past
    /// it, the connection's task stops reading its peer until the peer reads.
    pub max_out: usize,
    /// DATA waits because the write buffer reached `max_out`: drained once it is half empty.
    pub out_full: bool,
    /// DATA waiting in the streams' `pending` buffers, bytes.
    pub held: usize,
    /// Above this much `held`, the connection's peer is not reading what it asked for and
    /// loses the connection (client connections; `limits.max_connection_buffer`).
    pub max_held: usize,
    /// Streams this side reset or refused lately, newest last (at most [`RESET_MEMORY`]):
    /// frames the peer sent on them before it saw the reset are ignored, frames on other
    /// closed streams are a protocol error (RFC 9113 §5.1).
    recent_resets: VecDeque<u32>,
    /// Streams the proxy reset with no response from the endpoint (its clients reset them),
    /// in the current second (see [`State::note_early_cancel`]).
    early_cancels: (Instant, u32),
}

/// Streams remembered as reset by this side, per connection.
const RESET_MEMORY: usize = 128;

/// The bound of a connection's write buffer for DATA unless configured (endpoint connections).
pub const DEFAULT_MAX_OUT: usize = 1024 * 1024;

/// An endpoint connection that had this many streams cancelled before the endpoint answered
/// them within a second takes no more calls. A server library counts such streams against a
/// rapid-reset limit (the h2 crate: 20 pending at once) and closes the connection when it is
/// passed, which would fail every other call on it; the proxy moves new calls to another
/// connection long before that.
pub const EARLY_CANCEL_RETIRE: u32 = 10;

/// How young an unanswered stream must be for its cancel to count as early.
const EARLY_CANCEL_AGE: std::time::Duration = std::time::Duration::from_secs(1);

impl State {
    /// A connection's state: `recv_target` and `stream_recv_target` are the windows the proxy
    /// grants its peer.
    pub fn new(role: Role, recv_target: i64, stream_recv_target: i64) -> Self {
        Self {
            role,
            out: BytesMut::with_capacity(16 * 1024),
            waker: None,
            closed: false,
            going_away: false,
            enc: hpack::Encoder::default(),
            block: BytesMut::new(),
            send_window: frame::DEFAULT_WINDOW,
            peer_initial_window: frame::DEFAULT_WINDOW,
            peer_max_frame: frame::DEFAULT_MAX_FRAME as usize,
            peer_max_streams: 100,
            recv_window: frame::DEFAULT_WINDOW,
            recv_owed: 0,
            recv_target,
            stream_recv_target,
            streams: HashMap::new(),
            next_sid: 1,
            retired: false,
            created: Instant::now(),
            replays: Vec::new(),
            max_out: DEFAULT_MAX_OUT,
            out_full: false,
            held: 0,
            max_held: usize::MAX,
            recent_resets: VecDeque::new(),
            early_cancels: (Instant::now(), 0),
        }
    }

    /// This side reset (or refused) stream `sid`: remembered a while, see `recent_resets`.
    pub fn note_reset(&mut self, sid: u32) {
        if self.recent_resets.len() == RESET_MEMORY {
            self.recent_resets.pop_front();
        }
        self.recent_resets.push_back(sid);
    }

    /// This side reset stream `sid` lately: frames the peer sent before it knew are expected.
    pub fn reset_lately(&self, sid: u32) -> bool {
        self.recent_resets.contains(&sid)
    }

    /// Writes a RST_STREAM for a stream that is not (or no longer) in `streams`.
    pub fn refuse(&mut self, sid: u32, reason: Reason) {
        frame::rst_stream(&mut self.out, sid, reason);
        self.note_reset(sid);
        self.wake();
    }

    /// An endpoint stream was cancelled before the endpoint answered it: past
    /// [`EARLY_CANCEL_RETIRE`] in a second the connection is retired from its pool.
    pub fn note_early_cancel(&mut self) {
        let now = Instant::now();
        let (since, n) = &mut self.early_cancels;
        if now.duration_since(*since) >= std::time::Duration::from_secs(1) {
            *since = now;
            *n = 0;
        }
        *n += 1;
        if *n >= EARLY_CANCEL_RETIRE && !self.retired {
            self.retired = true;
            self.wake();
        }
    }

    /// The task that owns the socket has something to do besides reading: calls to replay,
    /// or, on an endpoint connection no longer in use or a drained client connection, closing
    /// it.
    pub fn has_work(&self) -> bool {
        !self.replays.is_empty() || self.finished() || self.drained() || self.overloaded()
    }

    /// A client connection past its last GOAWAY (`going_away`, set by the drain's second step)
    /// with no stream left: it closes.
    pub fn drained(&self) -> bool {
        self.role == Role::Server && self.going_away && self.streams.is_empty()
    }

    /// More DATA waits here than the peer may leave unread (`max_held`).
    pub fn overloaded(&self) -> bool {
        self.held > self.max_held
    }

    /// Takes stream `sid` out of the connection.
    pub fn remove(&mut self, sid: u32) -> Option<Stream> {
        let s = self.streams.remove(&sid)?;
        self.held -= s.pending.len();
        Some(s)
    }

    /// An endpoint connection that takes no more calls and has none left.
    pub fn finished(&self) -> bool {
        self.role == Role::Client && (self.going_away || self.retired) && self.streams.is_empty()
    }

    /// The task that owns the socket: woken when something is queued.
    pub fn register(&mut self, waker: &Waker) {
        match &self.waker {
            Some(w) if w.will_wake(waker) => {}
            _ => self.waker = Some(waker.clone()),
        }
    }

    /// Wakes the task that owns the socket: something was queued.
    pub fn wake(&mut self) {
        if let Some(w) = &self.waker {
            w.wake_by_ref();
        }
    }

    /// Writes a header block for `sid`.
    pub fn send_headers<'a>(
        &mut self,
        sid: u32,
        fields: impl Iterator<Item = (&'a [u8], &'a [u8])>,
        end: bool,
    ) {
        self.block.clear();
        self.enc.begin(&mut self.block);
        for (n, v) in fields {
            self.enc.field(n, v, &mut self.block);
        }
        frame::headers(&mut self.out, sid, &self.block, end, self.peer_max_frame);
        if let Some(s) = self.streams.get_mut(&sid) {
            s.headers_sent = true;
        }
        if end {
            self.sent_end(sid);
        }
        self.wake();
    }

    /// Sends DATA on `sid`: as much as the windows allow now, the rest when they open. The
    /// bytes written on are credited to the stream's link. Returns false if there is no such
    /// stream (the caller then credits the bytes itself).
    pub fn send_data(
        &mut self,
        sid: u32,
        data: &[u8],
        end: bool,
        credits: &mut Vec<Credit>,
    ) -> bool {
        let Some(s) = self.streams.get_mut(&sid) else {
            return false;
        };
        if s.send_done {
            return false;
        }
        if s.pending.is_empty() && s.trailers.is_none() {
            let mut w = Writer {
                out: &mut self.out,
                conn_window: &mut self.send_window,
                max_frame: self.peer_max_frame,
                max_out: self.max_out,
                full: &mut self.out_full,
            };
            let n = w.data(sid, &mut s.send_window, data, end);
            s.written(n, credits);
            let all = n == data.len();
            if !all {
                s.pending.extend_from_slice(&data[n..]);
                s.pending_end = end;
                self.held += data.len() - n;
            } else if end {
                self.sent_end(sid);
            }
            self.wake();
        } else {
            s.pending.extend_from_slice(data);
            s.pending_end |= end;
            self.held += data.len();
            self.drain(sid, credits);
            if self.overloaded() {
                self.wake();
            }
        }
        true
    }

    /// Sends trailers on `sid` after the DATA still pending, ending the stream.
    pub fn send_trailers(&mut self, sid: u32, fields: &Fields, credits: &mut Vec<Credit>) {
        let Some(s) = self.streams.get_mut(&sid) else {
            return;
        };
        if s.send_done {
            return;
        }
        if s.pending.is_empty() {
            self.send_headers(sid, fields.iter(), true);
        } else {
            s.trailers = Some(fields.clone());
            self.drain(sid, credits);
        }
    }

    /// Writes what the windows now allow of `sid`'s pending DATA (and its trailers after it).
    pub fn drain(&mut self, sid: u32, credits: &mut Vec<Credit>) {
        let Some(s) = self.streams.get_mut(&sid).filter(|s| !s.send_done) else {
            return;
        };
        let end = s.pending_end && s.trailers.is_none();
        let mut w = Writer {
            out: &mut self.out,
            conn_window: &mut self.send_window,
            max_frame: self.peer_max_frame,
            max_out: self.max_out,
            full: &mut self.out_full,
        };
        let n = w.data(sid, &mut s.send_window, &s.pending, end);
        s.written(n, credits);
        let all = n == s.pending.len();
        if n == 0 && !all {
            return;
        }
        s.pending.advance(n);
        self.held -= n;
        let end = all && end;
        if all {
            s.pending = BytesMut::new();
            if let Some(t) = s.trailers.take() {
                self.send_headers(sid, t.iter(), true);
                return;
            }
        }
        if end {
            self.sent_end(sid);
        }
        self.wake();
    }

    /// Drains every stream with pending DATA (a window opened).
    pub fn drain_all(&mut self, credits: &mut Vec<Credit>) {
        let waiting: Vec<u32> = self
            .streams
            .iter()
            .filter(|(_, s)| !s.pending.is_empty() || s.trailers.is_some())
            .map(|(id, _)| *id)
            .collect();
        for sid in waiting {
            if self.send_window <= 0 || self.out_full {
                break;
            }
            self.drain(sid, credits);
        }
    }

    /// We sent END_STREAM on `sid`. A stream done both ways is forgotten; a client's stream whose
    /// response is complete while the request still flows is reset with NO_ERROR (RFC 9113
    /// §8.1: the rest of the request is not needed).
    fn sent_end(&mut self, sid: u32) {
        let Some(s) = self.streams.get_mut(&sid) else {
            return;
        };
        s.send_done = true;
        if s.recv_done {
            self.remove(sid);
        } else if self.role == Role::Server {
            self.remove(sid);
            self.refuse(sid, Reason::NO_ERROR);
        }
    }

    /// The peer sent END_STREAM on `sid`. An endpoint's stream whose response is complete while
    /// the request still flows is cancelled: the endpoint no longer wants it, and the window of
    /// the request DATA that waited for it goes back to the client (`credits`).
    pub fn received_end(&mut self, sid: u32, credits: &mut Vec<Credit>) {
        let Some(s) = self.streams.get_mut(&sid) else {
            return;
        };
        s.recv_done = true;
        if s.send_done {
            self.remove(sid);
        } else if self.role == Role::Client {
            frame::rst_stream(&mut self.out, sid, Reason::CANCEL);
            if let Some(c) = self.remove(sid).and_then(|s| s.uncredited()) {
                credits.push(c);
            }
            self.wake();
        }
    }

    /// Resets `sid` and forgets it; returns the stream if it was there.
    pub fn reset(&mut self, sid: u32, reason: Reason) -> Option<Stream> {
        let s = self.remove(sid)?;
        if !self.closed {
            // A stream cancelled within a second of its HEADERS, unanswered: what a server
            // library counts as a reset before it accepted the stream.
            let early = |c: &Call| !c.responded && c.start.elapsed() < EARLY_CANCEL_AGE;
            if self.role == Role::Client && s.call.as_deref().is_some_and(early) {
                self.note_early_cancel();
            }
            self.refuse(sid, reason);
        }
        Some(s)
    }

    /// `n` bytes received on `sid` (0: on no stream) were written on: grant them back, in
    /// batches of half a window so that small messages do not each cost a WINDOW_UPDATE.
    pub fn credit(&mut self, sid: u32, n: usize) {
        if self.closed {
            return;
        }
        let n = n as i64;
        // An endpoint connection's window was granted back when the DATA arrived
        // ([`State::credit_connection`]).
        let mut wrote = self.role == Role::Server
            && owe(
                &mut self.out,
                0,
                n,
                &mut self.recv_owed,
                &mut self.recv_window,
                self.recv_target,
            );
        if let Some(s) = self.streams.get_mut(&sid)
            && !s.recv_done
        {
            wrote |= owe(
                &mut self.out,
                sid,
                n,
                &mut s.recv_owed,
                &mut s.recv_window,
                self.stream_recv_target,
            );
        }
        if wrote {
            self.wake();
        }
    }

    /// Grants back `n` bytes of an endpoint connection's window as soon as they arrived. Only
    /// the stream's window waits for the client to take the bytes: a client that does not
    /// read holds up its own streams, never the connection other clients' calls share (its
    /// unread bytes are bounded by `max_held` on its own connection).
    pub fn credit_connection(&mut self, n: usize) {
        if !self.closed
            && owe(
                &mut self.out,
                0,
                n as i64,
                &mut self.recv_owed,
                &mut self.recv_window,
                self.recv_target,
            )
        {
            self.wake();
        }
    }

    /// Accounts `n` bytes received on `sid` against the receive windows; a peer that sent more
    /// than it was granted broke flow control.
    pub fn received(&mut self, sid: u32, n: usize) -> Result<(), ConnError> {
        let n = n as i64;
        self.recv_window -= n;
        let stream_over = self.streams.get_mut(&sid).is_some_and(|s| {
            s.recv_window -= n;
            s.recv_window < 0
        });
        if self.recv_window < 0 || stream_over {
            return Err(ConnError::new(
                Reason::FLOW_CONTROL_ERROR,
                "DATA beyond the window granted",
            ));
        }
        Ok(())
    }

    /// The peer's new SETTINGS_INITIAL_WINDOW_SIZE: every stream's window moves by the change;
    /// one pushed past 2^31-1 is a connection error (RFC 9113 §6.9.2).
    pub fn set_peer_initial_window(
        &mut self,
        w: i64,
        credits: &mut Vec<Credit>,
    ) -> Result<(), ConnError> {
        let delta = w - self.peer_initial_window;
        self.peer_initial_window = w;
        let mut over = false;
        for s in self.streams.values_mut() {
            s.send_window += delta;
            over |= s.send_window > frame::MAX_WINDOW;
        }
        if over {
            return Err(ConnError::new(
                Reason::FLOW_CONTROL_ERROR,
                "SETTINGS_INITIAL_WINDOW_SIZE pushed a stream window above 2^31-1",
            ));
        }
        if delta > 0 {
            self.drain_all(credits);
        }
        Ok(())
    }
}

/// Writes DATA under a connection's and a stream's send windows, and the write buffer's bound.
struct Writer<'a> {
    out: &'a mut BytesMut,
    conn_window: &'a mut i64,
    max_frame: usize,
    max_out: usize,
    /// Set when the write buffer's bound cut the DATA short.
    full: &'a mut bool,
}

impl Writer<'_> {
    /// Writes as much of `data` as both windows and the write buffer's bound allow (END_STREAM
    /// with its last byte if `end` and all of it fits, an empty DATA if `data` is empty) and
    /// takes it from the windows. Returns the bytes written.
    fn data(&mut self, sid: u32, stream_window: &mut i64, data: &[u8], end: bool) -> usize {
        let windows = ((*self.conn_window).min(*stream_window).max(0) as usize).min(data.len());
        let room = self.max_out.saturating_sub(self.out.len());
        if room < windows {
            if !*self.full {
                crate::metrics::WRITE_BUFFER_FULL.inc();
            }
            *self.full = true;
        }
        let n = windows.min(room);
        let all = n == data.len();
        if n == 0 && !(all && end) {
            return 0;
        }
        frame::data(self.out, sid, &data[..n], end && all, self.max_frame);
        *self.conn_window -= n as i64;
        *stream_window -= n as i64;
        n
    }
}

/// A stream forgotten on one connection: its other end is reset with `reason`, and its call
/// (on whichever side holds it) ends as `end`. DATA that waited in either for window is
/// granted back to its sender.
pub fn unlink(stream: Stream, reason: Reason, end: End<'_>) {
    let owed = stream.uncredited();
    let mut call = stream.call;
    if let Some(l) = stream.link {
        let mut st = l.conn.lock();
        let taken = st.reset(l.sid, reason);
        if let Some(c) = owed {
            st.credit(c.sid, c.n);
        }
        drop(st);
        if let Some(t) = taken {
            if let Some(c) = t.uncredited() {
                c.conn.lock().credit(c.sid, c.n);
            }
            call = call.or(t.call);
        }
    }
    if let Some(c) = call {
        c.finish(end);
    }
}

/// Adds `n` to what is owed on a window; grants it (WINDOW_UPDATE) once it is half the
/// `target`. True if a frame was written.
fn owe(
    out: &mut BytesMut,
    sid: u32,
    n: i64,
    owed: &mut i64,
    window: &mut i64,
    target: i64,
) -> bool {
    *owed += n;
    if *owed < target / 2 {
        return false;
    }
    frame::window_update(out, sid, *owed as u32);
    *window += *owed;
    *owed = 0;
    true
}

/// Grants back the receive windows of bytes written on.
pub fn apply(credits: &mut Vec<Credit>) {
    for c in credits.drain(..) {
        c.conn.lock().credit(c.sid, c.n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::{HEADER_LEN, Head, kind};

    /// A server-side connection with stream 1 linked to stream 3 of `peer`, our send window
    /// on stream 1 at `window`.
    fn linked(window: i64) -> (State, Arc<Conn>) {
        let peer = Conn::new(State::new(Role::Client, 1 << 20, 1 << 20));
        let mut st = State::new(Role::Server, 1 << 20, 1 << 20);
        let link = Link {
            conn: peer.clone(),
            sid: 3,
        };
        st.streams
            .insert(1, Stream::new(Some(link), window, 1 << 20));
        (st, peer)
    }

    /// The DATA frames in `out`: (stream, payload length, END_STREAM).
    fn data_frames(out: &[u8]) -> Vec<(u32, usize, bool)> {
        let mut at = 0;
        let mut frames = Vec::new();
        while at + HEADER_LEN <= out.len() {
            let h = Head::parse(&out[at..]);
            if h.kind == kind::DATA {
                frames.push((h.stream, h.len, h.flags & frame::flag::END_STREAM != 0));
            }
            at += HEADER_LEN + h.len;
        }
        frames
    }

    fn credited(credits: &[Credit]) -> usize {
        credits.iter().map(|c| c.n).sum()
    }

    #[test]
    fn data_waits_for_window_and_its_sender_is_credited_as_it_is_written() {
        let (mut st, _peer) = linked(10);
        let mut credits = Vec::new();
        assert!(st.send_data(1, &[7; 25], true, &mut credits));
        assert_eq!(data_frames(&st.out), [(1, 10, false)]);
        assert_eq!(credited(&credits), 10, "only what was written goes back");
        assert_eq!((st.held, st.send_window), (15, frame::DEFAULT_WINDOW - 10));
        st.out.clear();
        credits.clear();
        // The peer opens the stream's window: the rest goes, with END_STREAM.
        st.streams.get_mut(&1).unwrap().send_window += 100;
        st.drain(1, &mut credits);
        assert_eq!(data_frames(&st.out), [(1, 15, true)]);
        assert_eq!(credited(&credits), 15);
        assert_eq!(st.held, 0);
    }

    #[test]
    fn the_write_buffer_bound_holds_data_back_until_the_peer_reads() {
        let (mut st, _peer) = linked(1 << 20);
        st.max_out = 1000;
        let mut credits = Vec::new();
        st.send_data(1, &[1; 5000], false, &mut credits);
        assert!(st.out_full);
        assert!(st.out.len() <= 1000 + HEADER_LEN, "{}", st.out.len());
        let written: usize = data_frames(&st.out).iter().map(|f| f.1).sum();
        assert_eq!(credited(&credits), written);
        assert_eq!(st.held, 5000 - written);
        // The peer read everything: what waited goes, up to the bound again.
        st.out.clear();
        st.out_full = false;
        st.drain_all(&mut credits);
        let more: usize = data_frames(&st.out).iter().map(|f| f.1).sum();
        assert_eq!(more, 1000);
        assert_eq!(st.held, 5000 - written - more);
    }

    #[test]
    fn a_reset_stream_gives_the_window_of_what_waited_back_to_its_sender() {
        let (mut st, peer) = linked(0);
        let mut credits = Vec::new();
        st.send_data(1, &[1; 300], false, &mut credits);
        assert_eq!((credited(&credits), st.held), (0, 300));
        let s = st.reset(1, Reason::CANCEL).unwrap();
        assert_eq!(st.held, 0);
        let owed = s.uncredited().unwrap();
        assert_eq!((owed.sid, owed.n), (3, 300));
        assert!(Arc::ptr_eq(&owed.conn, &peer));
        assert!(st.reset_lately(1));
    }

    #[test]
    fn receive_windows_are_granted_back_in_halves_and_cannot_be_overrun() {
        let mut st = State::new(Role::Server, 1000, 1000);
        st.recv_window = 1000;
        st.streams
            .insert(1, Stream::new(None, frame::DEFAULT_WINDOW, 1000));
        st.received(1, 400).unwrap();
        st.credit(1, 400);
        assert!(
            st.out.is_empty(),
            "less than half a window: no WINDOW_UPDATE yet"
        );
        st.received(1, 200).unwrap();
        st.credit(1, 200);
        // Connection and stream: one WINDOW_UPDATE each, for the 600 bytes owed.
        let mut at = 0;
        let mut updates = Vec::new();
        while at < st.out.len() {
            let h = Head::parse(&st.out[at..]);
            let p = &st.out[at + HEADER_LEN..at + HEADER_LEN + h.len];
            updates.push((h.stream, u32::from_be_bytes(p.try_into().unwrap())));
            at += HEADER_LEN + h.len;
        }
        assert_eq!(updates, [(0, 600), (1, 600)]);
        assert_eq!(st.recv_window, 1000);
        // More than granted is a FLOW_CONTROL_ERROR.
        let e = st.received(1, 1001).unwrap_err();
        assert_eq!(e.reason, Reason::FLOW_CONTROL_ERROR);
    }

    #[test]
    fn an_endpoint_connection_grants_its_window_back_on_arrival() {
        let mut st = State::new(Role::Client, 1000, 1000);
        st.recv_window = 1000;
        st.streams.insert(1, Stream::new(None, 1000, 1000));
        st.received(1, 600).unwrap();
        st.credit_connection(600);
        assert_eq!(
            st.recv_window, 1000,
            "the connection window is back at once"
        );
        // The stream's window waits for the client: credit() grants only the stream's.
        st.out.clear();
        st.credit(1, 600);
        assert_eq!(Head::parse(&st.out).stream, 1);
        assert_eq!(st.out.len(), HEADER_LEN + 4);
    }

    #[test]
    fn a_new_initial_window_moves_every_stream_and_may_not_overflow_one() {
        let (mut st, _peer) = linked(100);
        let mut credits = Vec::new();
        st.set_peer_initial_window(frame::DEFAULT_WINDOW + 50, &mut credits)
            .unwrap();
        assert_eq!(st.streams[&1].send_window, 150);
        st.streams.get_mut(&1).unwrap().send_window = frame::MAX_WINDOW;
        let e = st
            .set_peer_initial_window(frame::DEFAULT_WINDOW + 51, &mut credits)
            .unwrap_err();
        assert_eq!(e.reason, Reason::FLOW_CONTROL_ERROR);
    }
}
