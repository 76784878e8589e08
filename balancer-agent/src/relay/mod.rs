//! The frame relay: the HTTP/2 data plane of our own (`limits.engine: relay`).
//!
//! Where the default engine (`crate::proxy`, on the h2 crate) turns every call into request and
//! response objects, a task and two pumps, the relay moves frames: a HEADERS frame from a
//! client is decoded once (HPACK), routed, and encoded once onto a pooled endpoint connection;
//! DATA is copied from one connection's read buffer into the other's write buffer under both
//! flow-control windows; the response comes back the same way. One task per connection, none
//! per call, no header map: what the h2 engine spends per call on the crate's stream store,
//! header maps and per-stream tasks, the relay does not.
//!
//! - [`conn`]: a connection's shared state (write buffer, windows, streams) and the send side.
//! - [`down`]: client connections (the proxy is the server).
//! - [`up`]: endpoint connections (the proxy is the client) and their pool.
//! - [`read`]: what both do with the frames they read.
//! - [`call`]: the call record that ends in the metrics.
#![forbid(unsafe_code)]

pub mod call;
pub mod conn;
pub mod down;
pub mod read;
pub mod up;

use std::{
    future::poll_fn,
    io,
    task::{Context, Poll},
};

use bytes::{Buf, BytesMut};
use tokio::net::TcpStream;

use conn::Conn;

pub use down::serve;

/// Read buffer space kept free before each read.
const READ_RESERVE: usize = 16 * 1024;

/// Flushes what is queued for `sock`, then waits until it has bytes to read; returns how many
/// were read (0: the peer closed). Queued frames are flushed whenever the task is woken.
pub async fn read_more(conn: &Conn, sock: &TcpStream, rbuf: &mut BytesMut) -> io::Result<usize> {
    poll_fn(|cx| poll_io(conn, sock, rbuf, cx)).await
}

fn poll_io(
    conn: &Conn,
    sock: &TcpStream,
    rbuf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    loop {
        let mut st = conn.lock();
        st.register(cx.waker());
        let blocked = match write_out(&mut st.out, sock) {
            Ok(written) => !written,
            Err(e) => return Poll::Ready(Err(e)),
        };
        drop(st);
        if blocked {
            match sock.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        match sock.poll_read_ready(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {}
        }
        rbuf.reserve(READ_RESERVE);
        match sock.try_read_buf(rbuf) {
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

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
