//! HTTP/2 frames (RFC 9113 §4, §6): the 9-byte frame header, and writing the frames the relay
//! sends. Payloads are parsed where they are used (the frame relay), straight from the read
//! buffer.

use bytes::{BufMut, BytesMut};

/// Length of a frame header.
pub const HEADER_LEN: usize = 9;
/// The client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The default and minimum SETTINGS_MAX_FRAME_SIZE.
pub const DEFAULT_MAX_FRAME: u32 = 16_384;
/// The largest flow-control window.
pub const MAX_WINDOW: i64 = (1 << 31) - 1;
/// The initial window of every stream and connection until SETTINGS say otherwise.
pub const DEFAULT_WINDOW: i64 = 65_535;

/// Frame types.
pub mod kind {
    /// `DATA` (RFC 9113 §6).
    pub const DATA: u8 = 0;
    /// `HEADERS` (RFC 9113 §6).
    pub const HEADERS: u8 = 1;
    /// `PRIORITY` (RFC 9113 §6).
    pub const PRIORITY: u8 = 2;
    /// `RST_STREAM` (RFC 9113 §6).
    pub const RST_STREAM: u8 = 3;
    /// `SETTINGS` (RFC 9113 §6).
    pub const SETTINGS: u8 = 4;
    /// `PUSH_PROMISE` (RFC 9113 §6).
    pub const PUSH_PROMISE: u8 = 5;
    /// `PING` (RFC 9113 §6).
    pub const PING: u8 = 6;
    /// `GOAWAY` (RFC 9113 §6).
    pub const GOAWAY: u8 = 7;
    /// `WINDOW_UPDATE` (RFC 9113 §6).
    pub const WINDOW_UPDATE: u8 = 8;
    /// `CONTINUATION` (RFC 9113 §6).
    pub const CONTINUATION: u8 = 9;
}

/// Frame flags.
pub mod flag {
    /// The `END_STREAM` flag.
    pub const END_STREAM: u8 = 0x1;
    /// The `ACK` flag.
    pub const ACK: u8 = 0x1;
    /// The `END_HEADERS` flag.
    pub const END_HEADERS: u8 = 0x4;
    /// The `PADDED` flag.
    pub const PADDED: u8 = 0x8;
    /// The `PRIORITY` flag.
    pub const PRIORITY: u8 = 0x20;
}

/// SETTINGS identifiers.
pub mod setting {
    /// `SETTINGS_HEADER_TABLE_SIZE` (RFC 9113 §6.5.2).
    pub const HEADER_TABLE_SIZE: u16 = 1;
    /// `SETTINGS_ENABLE_PUSH` (RFC 9113 §6.5.2).
    pub const ENABLE_PUSH: u16 = 2;
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` (RFC 9113 §6.5.2).
    pub const MAX_CONCURRENT_STREAMS: u16 = 3;
    /// `SETTINGS_INITIAL_WINDOW_SIZE` (RFC 9113 §6.5.2).
    pub const INITIAL_WINDOW_SIZE: u16 = 4;
    /// `SETTINGS_MAX_FRAME_SIZE` (RFC 9113 §6.5.2).
    pub const MAX_FRAME_SIZE: u16 = 5;
    /// `SETTINGS_MAX_HEADER_LIST_SIZE` (RFC 9113 §6.5.2).
    pub const MAX_HEADER_LIST_SIZE: u16 = 6;
}

/// Error codes (RFC 9113 §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reason(pub u32);

impl Reason {
    /// `NO_ERROR`.
    pub const NO_ERROR: Reason = Reason(0);
    /// `PROTOCOL_ERROR`.
    pub const PROTOCOL_ERROR: Reason = Reason(1);
    /// `INTERNAL_ERROR`.
    pub const INTERNAL_ERROR: Reason = Reason(2);
    /// `FLOW_CONTROL_ERROR`.
    pub const FLOW_CONTROL_ERROR: Reason = Reason(3);
    /// `STREAM_CLOSED`.
    pub const STREAM_CLOSED: Reason = Reason(5);
    /// `FRAME_SIZE_ERROR`.
    pub const FRAME_SIZE_ERROR: Reason = Reason(6);
    /// `REFUSED_STREAM`.
    pub const REFUSED_STREAM: Reason = Reason(7);
    /// `CANCEL`.
    pub const CANCEL: Reason = Reason(8);
    /// `COMPRESSION_ERROR`.
    pub const COMPRESSION_ERROR: Reason = Reason(9);
    /// `ENHANCE_YOUR_CALM`.
    pub const ENHANCE_YOUR_CALM: Reason = Reason(11);
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.0 {
            0 => "NO_ERROR",
            1 => "PROTOCOL_ERROR",
            2 => "INTERNAL_ERROR",
            3 => "FLOW_CONTROL_ERROR",
            4 => "SETTINGS_TIMEOUT",
            5 => "STREAM_CLOSED",
            6 => "FRAME_SIZE_ERROR",
            7 => "REFUSED_STREAM",
            8 => "CANCEL",
            9 => "COMPRESSION_ERROR",
            10 => "CONNECT_ERROR",
            11 => "ENHANCE_YOUR_CALM",
            12 => "INADEQUATE_SECURITY",
            13 => "HTTP_1_1_REQUIRED",
            n => return write!(f, "error code {n:#x}"),
        };
        f.write_str(name)
    }
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// The payload's length.
    pub len: usize,
    /// The frame type ([`kind`]).
    pub kind: u8,
    /// Its flags ([`flag`]).
    pub flags: u8,
    /// The stream id, reserved bit cleared.
    pub stream: u32,
}

impl Head {
    /// Parses the first 9 bytes of `b`.
    pub fn parse(b: &[u8]) -> Head {
        Head {
            len: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    /// Writes a frame header.
    pub fn write(dst: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
        debug_assert!(len < 1 << 24);
        dst.put_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
        dst.put_u32(stream);
    }
}

/// Writes a SETTINGS frame with `values`.
pub fn settings(dst: &mut BytesMut, values: &[(u16, u32)]) {
    Head::write(dst, values.len() * 6, kind::SETTINGS, 0, 0);
    for (id, v) in values {
        dst.put_u16(*id);
        dst.put_u32(*v);
    }
}

/// Writes a SETTINGS acknowledgement.
pub fn settings_ack(dst: &mut BytesMut) {
    Head::write(dst, 0, kind::SETTINGS, flag::ACK, 0);
}

/// Writes a WINDOW_UPDATE.
pub fn window_update(dst: &mut BytesMut, stream: u32, increment: u32) {
    Head::write(dst, 4, kind::WINDOW_UPDATE, 0, stream);
    dst.put_u32(increment);
}

/// Writes a RST_STREAM.
pub fn rst_stream(dst: &mut BytesMut, stream: u32, reason: Reason) {
    Head::write(dst, 4, kind::RST_STREAM, 0, stream);
    dst.put_u32(reason.0);
}

/// Writes a PING (or its ACK).
pub fn ping(dst: &mut BytesMut, ack: bool, payload: [u8; 8]) {
    Head::write(dst, 8, kind::PING, if ack { flag::ACK } else { 0 }, 0);
    dst.put_slice(&payload);
}

/// Writes a GOAWAY.
pub fn goaway(dst: &mut BytesMut, last_stream: u32, reason: Reason, debug: &[u8]) {
    Head::write(dst, 8 + debug.len(), kind::GOAWAY, 0, 0);
    dst.put_u32(last_stream);
    dst.put_u32(reason.0);
    dst.put_slice(debug);
}

/// Writes DATA frames carrying `data` (split at `max_frame`), the last with END_STREAM if
/// `end`. An empty `data` with `end` writes one empty frame.
pub fn data(dst: &mut BytesMut, stream: u32, data: &[u8], end: bool, max_frame: usize) {
    if data.is_empty() {
        if end {
            Head::write(dst, 0, kind::DATA, flag::END_STREAM, stream);
        }
        return;
    }
    let mut chunks = data.chunks(max_frame).peekable();
    while let Some(c) = chunks.next() {
        let f = if end && chunks.peek().is_none() {
            flag::END_STREAM
        } else {
            0
        };
        Head::write(dst, c.len(), kind::DATA, f, stream);
        dst.put_slice(c);
    }
}

/// Writes a header block already encoded in `block` as HEADERS (and CONTINUATION frames when it
/// is larger than `max_frame`).
pub fn headers(dst: &mut BytesMut, stream: u32, block: &[u8], end_stream: bool, max_frame: usize) {
    let mut chunks = block.chunks(max_frame.max(1)).peekable();
    let mut kind = kind::HEADERS;
    let mut flags = if end_stream { flag::END_STREAM } else { 0 };
    loop {
        let c = chunks.next().unwrap_or(&[]);
        if chunks.peek().is_none() {
            flags |= flag::END_HEADERS;
        }
        Head::write(dst, c.len(), kind, flags, stream);
        dst.put_slice(c);
        if flags & flag::END_HEADERS != 0 {
            return;
        }
        kind = kind::CONTINUATION;
        flags = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_round_trip_and_the_reserved_bit_is_ignored() {
        let mut b = BytesMut::new();
        Head::write(&mut b, 70_000, kind::DATA, flag::END_STREAM, 7);
        assert_eq!(
            Head::parse(&b),
            Head {
                len: 70_000,
                kind: kind::DATA,
                flags: flag::END_STREAM,
                stream: 7
            }
        );
        b[5] |= 0x80;
        assert_eq!(Head::parse(&b).stream, 7);
    }

    #[test]
    fn large_blocks_and_data_are_split_at_the_frame_size() {
        let mut b = BytesMut::new();
        headers(&mut b, 1, &[0u8; 25], true, 10);
        let kinds: Vec<_> = std::iter::successors(Some(0usize), |&at| {
            let h = Head::parse(&b[at..]);
            Some(at + HEADER_LEN + h.len).filter(|&n| n < b.len())
        })
        .map(|at| {
            let h = Head::parse(&b[at..]);
            (h.kind, h.flags, h.len)
        })
        .collect();
        assert_eq!(
            kinds,
            [
                (kind::HEADERS, flag::END_STREAM, 10),
                (kind::CONTINUATION, 0, 10),
                (kind::CONTINUATION, flag::END_HEADERS, 5)
            ]
        );
        let mut b = BytesMut::new();
        data(&mut b, 3, &[1u8; 20], true, 16);
        assert_eq!(Head::parse(&b).flags, 0);
        assert_eq!(Head::parse(&b[25..]).flags, flag::END_STREAM);
        assert_eq!(b.len(), 2 * HEADER_LEN + 20);
    }
}
