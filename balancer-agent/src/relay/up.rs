//! The relay's connections to endpoints (the proxy is the HTTP/2 client), and their pool.
//!
//! The pool is per worker thread (every call of a client connection runs on its worker, see
//! `crate::workers`): a call takes the first open connection to its endpoint with a free
//! stream slot (below the endpoint's SETTINGS_MAX_CONCURRENT_STREAMS), or opens one. A
//! connection's task reads the endpoint's frames and writes them on to the clients' streams;
//! when the connection is lost, every call on it ends with UNAVAILABLE at once.

use std::{cell::RefCell, collections::HashMap, net::SocketAddr, sync::Arc};

use bytes::{Buf, BytesMut};
use tokio::net::TcpStream;
use tracing::debug;

use super::{
    call::End,
    conn::{Conn, Credit, Fields, Role, State, apply, unlink},
    down::fail_stream,
    read::{ConnError, HeaderBlock, connection_frame, unpad},
    read_more,
};
use crate::{
    proxy::grpc::Status,
    state::Endpoint,
    wire::{
        frame::{self, Head, Reason, flag, kind, setting},
        hpack,
    },
};

thread_local! {
    static POOL: RefCell<HashMap<SocketAddr, Vec<Arc<Conn>>>> = RefCell::new(HashMap::new());
}

/// Stream ids are 31 bits: a connection near the end of them takes no more calls.
const LAST_SID: u32 = (1 << 31) - 1024;

/// A connection to `ep` with room for one more call.
pub async fn lease(ep: &Arc<Endpoint>) -> Result<Arc<Conn>, String> {
    let found = POOL.with_borrow_mut(|pool| {
        let conns = pool.entry(ep.addr).or_default();
        let mut found = None;
        conns.retain(|c| {
            let st = c.lock();
            if found.is_none()
                && !st.closed
                && !st.going_away
                && st.streams.len() < st.peer_max_streams
                && st.next_sid < LAST_SID
            {
                found = Some(c.clone());
            }
            !st.closed
        });
        found
    });
    if let Some(c) = found {
        return Ok(c);
    }
    let conn = connect(ep).await?;
    POOL.with_borrow_mut(|pool| pool.entry(ep.addr).or_default().push(conn.clone()));
    Ok(conn)
}

/// Opens a connection to `ep`: TCP, the preface and our SETTINGS. The endpoint's SETTINGS
/// arrive on the connection's task; until then its defaults apply (RFC 9113 §6.5).
async fn connect(ep: &Arc<Endpoint>) -> Result<Arc<Conn>, String> {
    let cfg = ep.pool.config();
    let timeout = ep.pool.connect_timeout();
    let sock = match tokio::time::timeout(timeout, TcpStream::connect(ep.addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("endpoint {}: connect failed: {e}", ep.addr)),
        Err(_) => {
            return Err(format!(
                "endpoint {}: connect timed out after {timeout:?}",
                ep.addr
            ));
        }
    };
    let _ = sock.set_nodelay(true);
    let conn_window = i64::from(cfg.initial_connection_window);
    let mut st = State::new(
        Role::Client,
        conn_window,
        i64::from(cfg.initial_stream_window),
    );
    st.out.extend_from_slice(frame::PREFACE);
    frame::settings(
        &mut st.out,
        &[
            (setting::ENABLE_PUSH, 0),
            (setting::INITIAL_WINDOW_SIZE, cfg.initial_stream_window),
        ],
    );
    if conn_window > frame::DEFAULT_WINDOW {
        frame::window_update(&mut st.out, 0, (conn_window - frame::DEFAULT_WINDOW) as u32);
        st.recv_window = conn_window;
    }
    let conn = Conn::new(st);
    let addr = ep.addr;
    let task_conn = conn.clone();
    tokio::spawn(async move {
        let mut up = Up {
            conn: task_conn,
            dec: hpack::Decoder::default(),
            fields: Fields::default(),
            block: HeaderBlock::default(),
            max_block: 1 << 20,
            credits: Vec::new(),
        };
        let why = up.run(&sock).await;
        debug!(endpoint = %addr, reason = %why, "endpoint connection closed");
        up.lost(&format!("endpoint {addr}: connection lost: {why}"));
    });
    Ok(conn)
}

struct Up {
    conn: Arc<Conn>,
    dec: hpack::Decoder,
    fields: Fields,
    block: HeaderBlock,
    /// The largest header block accepted.
    max_block: usize,
    credits: Vec<Credit>,
}

impl Up {
    /// Reads the endpoint's frames until the connection ends; returns why it ended.
    async fn run(&mut self, sock: &TcpStream) -> String {
        let mut rbuf = BytesMut::with_capacity(32 * 1024);
        loop {
            match read_more(&self.conn, sock, &mut rbuf).await {
                Ok(0) => return "closed by the endpoint".into(),
                Ok(_) => {}
                Err(e) => return e.to_string(),
            }
            while rbuf.len() >= frame::HEADER_LEN {
                let head = Head::parse(&rbuf);
                // We advertise no SETTINGS_MAX_FRAME_SIZE to endpoints: the default holds.
                if head.len > frame::DEFAULT_MAX_FRAME as usize {
                    return format!("frame of {} bytes", head.len);
                }
                let total = frame::HEADER_LEN + head.len;
                if rbuf.len() < total {
                    rbuf.reserve(total - rbuf.len());
                    break;
                }
                if let Err(e) = self.frame(head, &rbuf[frame::HEADER_LEN..total]) {
                    {
                        let mut st = self.conn.lock();
                        frame::goaway(&mut st.out, 0, e.reason, e.message.as_bytes());
                    }
                    let _ = super::flush(&self.conn, sock).await;
                    return format!("{}: {}", e.reason, e.message);
                }
                rbuf.advance(total);
            }
            let done = {
                let st = self.conn.lock();
                st.going_away && st.streams.is_empty()
            };
            if done {
                return "drained after GOAWAY".into();
            }
        }
    }

    fn frame(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        self.block.check(head.kind)?;
        match head.kind {
            kind::DATA => self.data(head, payload),
            kind::HEADERS | kind::CONTINUATION => {
                if self.block.frame(head, payload, self.max_block)? {
                    self.headers()
                } else {
                    Ok(())
                }
            }
            kind::RST_STREAM => {
                if payload.len() != 4 {
                    return Err(ConnError::new(
                        Reason::FRAME_SIZE_ERROR,
                        "RST_STREAM not 4 bytes",
                    ));
                }
                let reason = Reason(u32::from_be_bytes(payload.try_into().expect("4 bytes")));
                self.reset(head.stream, reason);
                Ok(())
            }
            kind::GOAWAY => {
                if payload.len() < 8 {
                    return Err(ConnError::new(Reason::FRAME_SIZE_ERROR, "short GOAWAY"));
                }
                let last =
                    u32::from_be_bytes(payload[..4].try_into().expect("4 bytes")) & 0x7fff_ffff;
                let reason = Reason(u32::from_be_bytes(
                    payload[4..8].try_into().expect("4 bytes"),
                ));
                debug!(%reason, debug = %String::from_utf8_lossy(&payload[8..]), last, "GOAWAY from the endpoint");
                self.goaway(last);
                Ok(())
            }
            _ => connection_frame(&self.conn, head, payload, &mut self.credits).map(drop),
        }
    }

    fn data(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        let sid = head.stream;
        let end = head.flags & flag::END_STREAM != 0;
        let data = unpad(head.flags, payload)?;
        let mut st = self.conn.lock();
        if !st.received(sid, payload.len()) {
            return Err(ConnError::new(
                Reason::FLOW_CONTROL_ERROR,
                "DATA beyond the window granted",
            ));
        }
        let Some(s) = st.streams.get_mut(&sid).filter(|s| !s.recv_done) else {
            st.credit(sid, payload.len());
            return Ok(());
        };
        let link = s.link.clone();
        let mut call = None;
        if let Some(c) = s.call.as_mut() {
            c.messages[1].feed(data);
            if end {
                call = s.call.take();
            }
        }
        let padding = payload.len() - data.len();
        if padding > 0 {
            st.credit(sid, padding);
        }
        if end {
            st.received_end(sid);
        }
        drop(st);
        let taken = match &link {
            Some(l) => l.conn.lock().send_data(l.sid, data, end, &mut self.credits),
            None => false,
        };
        if !taken {
            self.conn.lock().credit(sid, data.len());
        }
        apply(&mut self.credits);
        if let Some(c) = call {
            // A response that ends without trailers has no grpc-status.
            c.finish(End::Status("0"));
        }
        Ok(())
    }

    fn headers(&mut self) -> Result<(), ConnError> {
        let sid = self.block.sid;
        let end = self.block.end_stream;
        self.fields.clear();
        let fields = &mut self.fields;
        self.dec
            .decode(&self.block.block, usize::MAX, &mut |n, v| fields.push(n, v))
            .map_err(|e| ConnError::new(Reason::COMPRESSION_ERROR, e.to_string()))?;
        let mut st = self.conn.lock();
        let Some(s) = st.streams.get_mut(&sid).filter(|s| !s.recv_done) else {
            return Ok(());
        };
        let link = s.link.clone();
        let mut first = false;
        let mut call = None;
        if let Some(c) = s.call.as_mut() {
            if !c.responded {
                c.responded = true;
                c.guard.first_byte();
                first = true;
            }
            if end {
                call = s.call.take();
            }
        }
        if end {
            st.received_end(sid);
        }
        drop(st);
        if let Some(l) = &link {
            let mut down = l.conn.lock();
            if first {
                down.send_headers(l.sid, self.fields.iter(), end);
            } else {
                down.send_trailers(l.sid, &self.fields, &mut self.credits);
            }
        }
        apply(&mut self.credits);
        if let Some(c) = call {
            let status = self
                .fields
                .get(b"grpc-status")
                .map(|s| String::from_utf8_lossy(s));
            let status = status.as_deref().unwrap_or(if first { "2" } else { "0" });
            c.finish(End::Status(status));
        }
        Ok(())
    }

    /// The endpoint reset a stream: pass the reset to the client.
    fn reset(&mut self, sid: u32, reason: Reason) {
        let removed = self.conn.lock().streams.remove(&sid);
        if let Some(s) = removed {
            unlink(s, reason, End::Reset);
        }
    }

    /// The endpoint is going away: streams above `last` were not processed.
    fn goaway(&mut self, last: u32) {
        let refused: Vec<_> = {
            let mut st = self.conn.lock();
            st.going_away = true;
            let ids: Vec<u32> = st.streams.keys().copied().filter(|&id| id > last).collect();
            ids.into_iter()
                .filter_map(|id| st.streams.remove(&id))
                .collect()
        };
        for s in refused {
            let status =
                Status::unavailable("endpoint is shutting down: it refused the call unprocessed");
            if let Some(l) = s.link {
                fail_stream(&mut l.conn.lock(), l.sid, &status, &mut self.credits);
            }
            if let Some(c) = s.call {
                c.finish(End::Status("14"));
            }
        }
        apply(&mut self.credits);
    }

    /// The connection is gone: every call on it ends with UNAVAILABLE.
    fn lost(&mut self, why: &str) {
        let streams: Vec<_> = {
            let mut st = self.conn.lock();
            st.closed = true;
            st.streams.drain().map(|(_, s)| s).collect()
        };
        let status = Status::unavailable(why);
        for s in streams {
            if let Some(l) = s.link {
                fail_stream(&mut l.conn.lock(), l.sid, &status, &mut self.credits);
            }
            if let Some(c) = s.call {
                c.finish(End::Lost);
            }
        }
        apply(&mut self.credits);
    }
}
