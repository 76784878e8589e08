//! Moves one direction of an HTTP/2 stream (DATA frames, then trailers) from a receiving
//! stream to a sending stream, with end-to-end flow control.
//!
//! The pump is a poll-based state machine rather than an `async fn` on purpose: its state (the
//! chunk being forwarded) lives in the struct, so the future that polls it can be dropped and
//! recreated at any point (in a `select!` loop) without losing a byte.
//!
//! Flow control: a chunk's receive window is released only once the chunk has been handed to
//! the sending stream, and the sending stream accepts data only as its peer's window and h2's
//! send buffer allow. A slow reader on one side therefore stops the writer on the other side;
//! the proxy holds at most one chunk per direction per stream plus h2's bounded send buffer.
#![forbid(unsafe_code)]

use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::HeaderValue;

/// The first DATA chunk of a stream, up to this size, is handed to h2 before the stream has
/// send capacity; h2 keeps it until the window allows. 16 KiB is HTTP/2's default maximum
/// frame size, so a chunk read from a peer is rarely larger.
const FIRST_CHUNK_AHEAD: usize = 16 * 1024;

/// How a pump failed.
#[derive(Debug)]
pub enum PumpError {
    /// The receiving side failed (its peer reset the stream, or its connection broke).
    Recv(h2::Error),
    /// The sending side failed (its peer reset the stream, or its connection broke).
    Send(h2::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Data,
    Trailers,
    Done,
}

/// One direction of a stream.
#[derive(Debug)]
pub struct Pump {
    state: State,
    chunk: Option<Bytes>,
    /// The chunk being forwarded is the last of the stream (no trailers follow): its last part
    /// carries END_STREAM, which saves an empty DATA frame.
    last: bool,
    /// `grpc-status` of the trailers forwarded, if any.
    pub grpc_status: Option<HeaderValue>,
    /// Bytes forwarded.
    pub bytes: u64,
    /// Whether the stream ended with trailers.
    pub had_trailers: bool,
    /// gRPC messages seen (length-prefixed frames), for the message-count metrics.
    pub messages: MessageCounter,
}

/// Counts gRPC messages in a byte stream: each is a 1-byte flag and a 4-byte big-endian length,
/// then that many bytes. Chunks may split a prefix or a message anywhere.
#[derive(Debug, Default, Clone, Copy)]
pub struct MessageCounter {
    /// Messages whose prefix was seen.
    pub count: u64,
    /// Prefix bytes still to read (0 means: inside a message body, or at a boundary).
    prefix_seen: u8,
    prefix: [u8; 5],
    /// Body bytes of the current message still to skip.
    remaining: u64,
}

impl MessageCounter {
    /// Feeds the next chunk of the stream.
    pub fn feed(&mut self, mut b: &[u8]) {
        while !b.is_empty() {
            if self.remaining > 0 {
                let n = (self.remaining as usize).min(b.len());
                self.remaining -= n as u64;
                b = &b[n..];
                continue;
            }
            let want = 5 - self.prefix_seen as usize;
            let n = want.min(b.len());
            self.prefix[self.prefix_seen as usize..self.prefix_seen as usize + n]
                .copy_from_slice(&b[..n]);
            self.prefix_seen += n as u8;
            b = &b[n..];
            if self.prefix_seen == 5 {
                self.count += 1;
                self.prefix_seen = 0;
                let p = self.prefix;
                self.remaining = u64::from(u32::from_be_bytes([p[1], p[2], p[3], p[4]]));
            }
        }
    }
}

impl Pump {
    /// A pump for a stream whose sender has more to send, or (`ended`) none.
    pub fn new(ended: bool) -> Self {
        Self {
            state: if ended { State::Done } else { State::Data },
            chunk: None,
            last: false,
            grpc_status: None,
            bytes: 0,
            had_trailers: false,
            messages: MessageCounter::default(),
        }
    }

    /// Drops the chunk being forwarded, if any, and releases its receive window: the caller
    /// sends it again itself (a replay of a refused stream resends every chunk received).
    pub fn discard_pending(&mut self, from: &mut RecvStream) {
        if let Some(c) = self.chunk.take() {
            let _ = from.flow_control().release_capacity(c.len());
        }
    }

    /// Stops forwarding (the sending side's peer no longer reads); keeps the counts.
    pub fn finish(&mut self) {
        self.state = State::Done;
        self.chunk = None;
    }

    /// Whether everything was forwarded.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Forwards what can be forwarded now. `on_chunk` sees every DATA chunk received (for replay
    /// buffers). Ready(Ok) once the end of stream (with or without trailers) was forwarded.
    pub fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut RecvStream,
        to: &mut SendStream<Bytes>,
        on_chunk: &mut dyn FnMut(&Bytes),
    ) -> Poll<Result<(), PumpError>> {
        loop {
            match self.state {
                State::Done => return Poll::Ready(Ok(())),
                State::Trailers => {
                    let trailers = match from.poll_trailers(cx) {
                        Poll::Ready(r) => r.map_err(PumpError::Recv)?,
                        Poll::Pending => return self.pending_unless_reset(cx, to),
                    };
                    match trailers {
                        Some(t) => {
                            self.grpc_status = t.get("grpc-status").cloned();
                            self.had_trailers = true;
                            to.send_trailers(t).map_err(PumpError::Send)?;
                        }
                        None => to.send_data(Bytes::new(), true).map_err(PumpError::Send)?,
                    }
                    self.state = State::Done;
                }
                State::Data => {
                    let Some(chunk) = self.chunk.as_mut() else {
                        match from.poll_data(cx) {
                            Poll::Ready(Some(Ok(b))) => {
                                if !b.is_empty() {
                                    self.messages.feed(&b);
                                    on_chunk(&b);
                                    self.chunk = Some(b);
                                    self.last = from.is_end_stream();
                                }
                            }
                            Poll::Ready(Some(Err(e))) => {
                                return Poll::Ready(Err(PumpError::Recv(e)));
                            }
                            Poll::Ready(None) => self.state = State::Trailers,
                            Poll::Pending => return self.pending_unless_reset(cx, to),
                        }
                        continue;
                    };
                    // The first chunk goes now, capacity or not: a stream that is still
                    // opening gets none until its HEADERS were written, and waiting for it
                    // would split HEADERS and DATA into two writes. h2 holds the chunk until
                    // the window allows; the bound per stream is unchanged (one chunk).
                    let ahead = self.bytes == 0 && chunk.len() <= FIRST_CHUNK_AHEAD;
                    if !ahead {
                        to.reserve_capacity(chunk.len());
                        if to.capacity() == 0 {
                            match ready!(to.poll_capacity(cx)) {
                                Some(Ok(_)) => continue,
                                Some(Err(e)) => return Poll::Ready(Err(PumpError::Send(e))),
                                None => {
                                    // The sending stream closed under us: its peer reset it.
                                    return Poll::Ready(Err(PumpError::Send(
                                        h2::Reason::CANCEL.into(),
                                    )));
                                }
                            }
                        }
                    }
                    let n = if ahead {
                        chunk.len()
                    } else {
                        to.capacity().min(chunk.len())
                    };
                    let part = chunk.split_to(n);
                    let end = chunk.is_empty() && self.last;
                    if chunk.is_empty() {
                        self.chunk = None;
                    }
                    to.send_data(part, end).map_err(PumpError::Send)?;
                    self.bytes += n as u64;
                    from.flow_control()
                        .release_capacity(n)
                        .map_err(PumpError::Recv)?;
                    if end {
                        self.state = State::Done;
                    }
                }
            }
        }
    }

    /// Nothing to read: still notice if the sending side's peer resets the stream, so a
    /// cancelled call does not wait on an idle sender.
    fn pending_unless_reset(
        &mut self,
        cx: &mut Context<'_>,
        to: &mut SendStream<Bytes>,
    ) -> Poll<Result<(), PumpError>> {
        match to.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => Poll::Ready(Err(PumpError::Send(reason.into()))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(PumpError::Send(e))),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::MessageCounter;

    fn frame(len: u32) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&len.to_be_bytes());
        v.extend(std::iter::repeat_n(7u8, len as usize));
        v
    }

    #[test]
    fn counts_messages_across_any_split() {
        let stream: Vec<u8> = [frame(0), frame(3), frame(70_000), frame(1)].concat();
        for chunk in [1, 2, 3, 5, 7, 4096, stream.len()] {
            let mut c = MessageCounter::default();
            for part in stream.chunks(chunk) {
                c.feed(part);
            }
            assert_eq!(c.count, 4, "chunk size {chunk}");
        }
    }
}
