//! A client's connection to the relay: the proxy is the HTTP/2 server.
//!
//! Every request HEADERS is decoded, its call routed (service, endpoint) and its headers
//! encoded onto a pooled endpoint connection ([`super::up`]); DATA, trailers and resets follow
//! the link between the two streams. A client that breaks the protocol or a limit gets a GOAWAY
//! and loses its connection; its calls are cancelled on the endpoints; no other connection is
//! touched.

use std::{cmp::Reverse, collections::BinaryHeap, net::SocketAddr, sync::Arc};

use bytes::{Buf, BytesMut};
use tokio::{net::TcpStream, time::Instant};
use tracing::debug;

use super::{
    call::{Call, End},
    conn::{Conn, Credit, Fields, Link, Role, State, Stream, apply, unlink},
    flush,
    read::{ConnError, HeaderBlock, connection_frame, unpad},
    read_more, up,
};
use crate::{
    proxy::{
        Proxy, Target,
        grpc::{self, Status},
        registry::ConnInfo,
    },
    wire::{
        frame::{self, Head, Reason, flag, kind, setting},
        hpack,
    },
};

/// The fields of a gRPC status the proxy answers itself: trailers-only when nothing was sent on
/// the stream yet, trailers otherwise.
pub fn status_fields(status: &Status, trailers_only: bool) -> Fields {
    let mut f = Fields::default();
    if trailers_only {
        f.push(b":status", b"200");
        f.push(b"content-type", b"application/grpc");
    }
    f.push(b"grpc-status", (status.code as u16).to_string().as_bytes());
    f.push(
        b"grpc-message",
        crate::proxy::grpc::percent_encode(&status.message).as_bytes(),
    );
    f
}

/// Ends stream `sid` of `st` with the proxy's own status, if it is still open to send.
pub fn fail_stream(st: &mut State, sid: u32, status: &Status, credits: &mut Vec<Credit>) {
    let Some(s) = st.streams.get(&sid) else {
        return;
    };
    if s.send_done || s.trailers.is_some() {
        return;
    }
    let fields = status_fields(status, !s.headers_sent);
    if s.headers_sent {
        st.send_trailers(sid, &fields, credits);
    } else {
        st.send_headers(sid, fields.iter(), true);
    }
}

struct Down {
    proxy: Arc<Proxy>,
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
}

/// Serves one client connection whose first bytes are the HTTP/2 preface.
pub async fn serve(
    proxy: Arc<Proxy>,
    sock: TcpStream,
    target: Arc<Target>,
    info: Arc<ConnInfo>,
) -> Result<(), String> {
    let l = proxy.limits.clone();
    let conn_window = i64::from(l.initial_connection_window);
    let mut state = State::new(
        Role::Server,
        conn_window,
        i64::from(l.initial_stream_window),
    );
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
    let conn = Conn::new(state);
    let mut down = Down {
        proxy,
        target,
        info,
        conn: conn.clone(),
        dec: hpack::Decoder::default(),
        fields: Fields::default(),
        block: HeaderBlock::default(),
        max_block: 2 * l.max_header_list_size as usize,
        last_sid: 0,
        credits: Vec::new(),
        resets: 0,
        refused: 0,
        deadlines: BinaryHeap::new(),
    };
    let mut rbuf = BytesMut::with_capacity(32 * 1024);
    let mut drain = down.proxy.drain_signal();
    let mut draining = false;
    let mut preface = false;
    // Armed at the soonest deadline while there is one.
    let mut timer = Box::pin(tokio::time::sleep_until(Instant::now()));
    let result = loop {
        if let Some(Reverse((d, _))) = down.deadlines.peek()
            && timer.deadline() != *d
        {
            timer.as_mut().reset(*d);
        }
        let n = tokio::select! {
            r = read_more(&conn, &sock, &mut rbuf) => r,
            () = &mut timer, if !down.deadlines.is_empty() => {
                down.expire();
                continue;
            }
            () = crate::proxy::drained(&mut drain), if !draining => {
                draining = true;
                let mut st = conn.lock();
                st.going_away = true;
                frame::goaway(&mut st.out, down.last_sid, Reason::NO_ERROR, b"");
                st.wake();
                continue;
            }
        };
        match n {
            Ok(0) => break Ok(()),
            Ok(_) => {}
            Err(e) => break Err(format!("client connection: {e}")),
        }
        if !preface {
            if rbuf.len() < frame::PREFACE.len() {
                continue;
            }
            if &rbuf[..frame::PREFACE.len()] != frame::PREFACE {
                break Err("client connection: bad HTTP/2 preface".into());
            }
            rbuf.advance(frame::PREFACE.len());
            preface = true;
        }
        if let Err(e) = down.frames(&mut rbuf).await {
            down.proxy
                .metrics
                .client_connection_errors
                .with_label_values(&["protocol"])
                .inc();
            {
                let mut st = conn.lock();
                frame::goaway(&mut st.out, down.last_sid, e.reason, e.message.as_bytes());
            }
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(1), flush(&conn, &sock)).await;
            break Err(format!("client connection: {}: {}", e.reason, e.message));
        }
        if draining && conn.lock().streams.is_empty() {
            let _ = flush(&conn, &sock).await;
            break Ok(());
        }
    };
    down.close();
    result
}

impl Down {
    /// Handles every complete frame in `rbuf`.
    async fn frames(&mut self, rbuf: &mut BytesMut) -> Result<(), ConnError> {
        let max_frame = self.proxy.limits.max_frame_size as usize;
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
            self.frame(head, &rbuf[frame::HEADER_LEN..total]).await?;
            rbuf.advance(total);
        }
        Ok(())
    }

    async fn frame(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        self.block.check(head.kind)?;
        match head.kind {
            kind::DATA => self.data(head, payload),
            kind::HEADERS | kind::CONTINUATION => {
                if self.block.frame(head, payload, self.max_block)? {
                    self.headers().await
                } else {
                    Ok(())
                }
            }
            kind::RST_STREAM => self.reset(head, payload),
            // PRIORITY, GOAWAY (the client opens no more streams; it closes when done) and
            // unknown types are ignored.
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
        if !st.received(sid, payload.len()) {
            return Err(ConnError::new(
                Reason::FLOW_CONTROL_ERROR,
                "DATA beyond the window granted",
            ));
        }
        let link = match st.streams.get(&sid) {
            Some(s) if !s.recv_done => s.link.clone(),
            // A closed stream (reset, or its call answered): the window goes back at once.
            _ => None,
        };
        let padding = payload.len() - data.len();
        if end {
            st.received_end(sid);
        }
        let Some(link) = link else {
            st.credit(sid, payload.len());
            return Ok(());
        };
        if padding > 0 {
            st.credit(sid, padding);
        }
        drop(st);
        let mut up = link.conn.lock();
        if let Some(c) = up.streams.get_mut(&link.sid).and_then(|s| s.call.as_mut()) {
            c.messages[0].feed(data);
        }
        let taken = up.send_data(link.sid, data, end, &mut self.credits);
        drop(up);
        if !taken {
            self.conn.lock().credit(sid, data.len());
        }
        apply(&mut self.credits);
        Ok(())
    }

    async fn headers(&mut self) -> Result<(), ConnError> {
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
            self.proxy.limits.max_header_list_size as usize,
            &mut |n, v| fields.push(n, v),
        );
        let too_large = match decoded {
            Ok(()) => false,
            Err(hpack::Error::ListTooLarge(_)) => true,
            Err(e) => return Err(ConnError::new(Reason::COMPRESSION_ERROR, e.to_string())),
        };
        if sid <= self.last_sid {
            return self.trailers(sid, end);
        }
        self.last_sid = sid;
        let limits = &self.proxy.limits;
        {
            let mut st = self.conn.lock();
            if st.going_away
                || too_large
                || st.streams.len() >= limits.max_concurrent_streams as usize
            {
                let reason = if too_large {
                    Reason::PROTOCOL_ERROR
                } else {
                    Reason::REFUSED_STREAM
                };
                frame::rst_stream(&mut st.out, sid, reason);
                st.wake();
                self.refused += 1;
                if self.refused > limits.max_local_error_reset_streams {
                    return Err(ConnError::new(
                        Reason::ENHANCE_YOUR_CALM,
                        "too many streams refused",
                    ));
                }
                return Ok(());
            }
            let mut s = Stream::new(
                None,
                st.peer_initial_window,
                i64::from(limits.initial_stream_window),
            );
            s.recv_done = end;
            st.streams.insert(sid, s);
        }
        self.open(sid, end).await;
        Ok(())
    }

    /// Trailers from the client (a request that ends with them).
    fn trailers(&mut self, sid: u32, end: bool) -> Result<(), ConnError> {
        if !end {
            return Err(ConnError::new(
                Reason::PROTOCOL_ERROR,
                "second HEADERS without END_STREAM",
            ));
        }
        let mut st = self.conn.lock();
        let link = match st.streams.get(&sid) {
            Some(s) if !s.recv_done => s.link.clone(),
            _ => None,
        };
        st.received_end(sid);
        drop(st);
        if let Some(link) = link {
            link.conn
                .lock()
                .send_trailers(link.sid, &self.fields, &mut self.credits);
            apply(&mut self.credits);
        }
        Ok(())
    }

    /// Routes the call of new stream `sid` and sends its headers to the endpoint chosen.
    async fn open(&mut self, sid: u32, end: bool) {
        let start = Instant::now();
        let deadline = self
            .fields
            .get(b"grpc-timeout")
            .and_then(grpc::parse_timeout)
            .map(|t| start + t);
        let proxy = self.proxy.clone();
        let path_bytes = self.fields.get(b":path").unwrap_or(b"/");
        let path = http::uri::PathAndQuery::try_from(path_bytes)
            .unwrap_or_else(|_| http::uri::PathAndQuery::from_static("/"));
        let registration = self.info.start_call(Some(&path));
        let active = proxy.call_started();
        let snapshot = proxy.store.snapshot();
        let authority = self
            .fields
            .get(b":authority")
            .and_then(|a| std::str::from_utf8(a).ok());
        let service = self.target.resolve(&snapshot, authority).cloned();
        let Some(service) = service else {
            let what = match (&*self.target, authority) {
                (Target::Vip(vip), _) => format!("no service has VIP {vip}"),
                (_, Some(a)) => format!("no service for authority {a:?} and no default service"),
                (_, None) => "no :authority and no default service".into(),
            };
            self.answer(sid, None, &path, start, Status::unavailable(what));
            return;
        };
        if active >= proxy.limits.max_active_calls {
            let status = Status::exhausted(format!(
                "proxy overloaded: {active} calls in flight (limits.max_active_calls)"
            ));
            self.answer(sid, Some(&service), &path, start, status);
            return;
        }
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last_error = String::new();
        let (mut guard, upconn) = loop {
            let Some(guard) = service.balancer.pick(&tried) else {
                let status = if tried.is_empty() {
                    Status::unavailable(format!("service {} has no ready endpoint", service.name))
                } else {
                    Status::unavailable(format!(
                        "service {}: {} endpoint(s) tried, none took the call; last error: \
                         {last_error}",
                        service.name,
                        tried.len()
                    ))
                };
                self.answer(sid, Some(&service), &path, start, status);
                return;
            };
            let ep = guard.endpoint().clone();
            tried.push(ep.addr);
            let leased = match deadline {
                Some(d) => tokio::time::timeout_at(d, up::lease(&ep)).await,
                None => Ok(up::lease(&ep).await),
            };
            let Ok(leased) = leased else {
                let status = Status::deadline(format!(
                    "deadline (grpc-timeout) exceeded in the proxy on the way to service {}",
                    service.name
                ));
                self.answer(sid, Some(&service), &path, start, status);
                return;
            };
            match leased {
                Ok(c) => break (guard, c),
                Err(e) => {
                    ep.stats.connect_failed();
                    debug!(endpoint = %ep.addr, error = %e, "endpoint failed before the call was sent");
                    last_error = e;
                }
            }
        };
        registration.routed(&service.name, guard.endpoint().addr);
        guard.sent();
        let call = Box::new(Call {
            proxy,
            service,
            path,
            start,
            guard,
            registration,
            messages: Default::default(),
            responded: false,
        });
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
            s.call = Some(call);
            up.streams.insert(up_sid, s);
            match deadline {
                // The endpoint gets the time left, as the proxy counts it.
                Some(d) => {
                    let left = grpc::format_timeout(d.saturating_duration_since(Instant::now()));
                    let fields = self.fields.iter().map(|(n, v)| {
                        if n == b"grpc-timeout" {
                            (n, left.as_bytes())
                        } else {
                            (n, v)
                        }
                    });
                    up.send_headers(up_sid, fields, end);
                }
                None => up.send_headers(up_sid, self.fields.iter(), end),
            }
        }
        if let Some(s) = self.conn.lock().streams.get_mut(&sid) {
            s.link = Some(Link {
                conn: upconn,
                sid: up_sid,
            });
        }
        if let Some(d) = deadline {
            // Calls that ended before their deadline leave their entry behind: drop those
            // once they outnumber the live streams, so the heap stays bounded by them.
            let live = self.conn.lock().streams.len();
            if self.deadlines.len() > 2 * live + 64 {
                let st = self.conn.lock();
                self.deadlines
                    .retain(|Reverse((_, id))| st.streams.contains_key(id));
            }
            self.deadlines.push(Reverse((d, sid)));
        }
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
            let taken = link.conn.lock().reset(link.sid, Reason::CANCEL);
            let call = taken.and_then(|s| s.call);
            let service = call.as_ref().map_or("", |c| &*c.service.name);
            let status = Status::deadline(format!(
                "deadline (grpc-timeout) exceeded in the proxy on a call to service {service}"
            ));
            fail_stream(&mut self.conn.lock(), sid, &status, &mut self.credits);
            if let Some(call) = call {
                call.finish(End::Status("4"));
            }
            apply(&mut self.credits);
        }
    }

    /// Answers stream `sid` with the proxy's own status and records the call.
    fn answer(
        &mut self,
        sid: u32,
        service: Option<&crate::state::Service>,
        path: &http::uri::PathAndQuery,
        start: Instant,
        status: Status,
    ) {
        debug!(code = ?status.code, message = %status.message, "call failed in the proxy");
        let fields = status_fields(&status, true);
        self.conn.lock().send_headers(sid, fields.iter(), true);
        let code = (status.code as u16).to_string();
        self.proxy
            .metrics
            .record_call(service, path.path(), &code, start.elapsed(), (0, 0));
        self.proxy.call_ended();
    }

    fn reset(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if payload.len() != 4 {
            return Err(ConnError::new(
                Reason::FRAME_SIZE_ERROR,
                "RST_STREAM not 4 bytes",
            ));
        }
        if head.stream == 0 || head.stream > self.last_sid {
            return Err(ConnError::new(
                Reason::PROTOCOL_ERROR,
                "RST_STREAM on a stream not opened",
            ));
        }
        let removed = self.conn.lock().streams.remove(&head.stream);
        let Some(stream) = removed else {
            return Ok(());
        };
        if stream.headers_sent {
            self.resets = self.resets.saturating_sub(1);
        } else {
            self.resets += 1;
        }
        unlink(stream, Reason::CANCEL, End::Cancelled);
        if self.resets > self.proxy.limits.max_pending_accept_reset_streams {
            return Err(ConnError::new(
                Reason::ENHANCE_YOUR_CALM,
                "too many streams reset by the client before their response (rapid reset)",
            ));
        }
        Ok(())
    }

    /// The connection is gone: cancel its calls on the endpoints.
    fn close(&mut self) {
        let streams: Vec<Stream> = {
            let mut st = self.conn.lock();
            st.closed = true;
            st.streams.drain().map(|(_, s)| s).collect()
        };
        for s in streams {
            unlink(s, Reason::CANCEL, End::Cancelled);
        }
    }
}
