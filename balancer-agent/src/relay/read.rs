//! What both kinds of connection do with the frames they read: connection errors, padding,
//! header blocks split over CONTINUATION frames, SETTINGS, WINDOW_UPDATE and PING.

use super::conn::{Conn, Credit, Role, apply, unlink};
use crate::{
    call::End,
    wire::frame::{self, Head, Reason, flag, kind, setting},
};

/// A connection error: GOAWAY with this reason, then close.
#[derive(Debug)]
pub struct ConnError {
    /// The GOAWAY's error code.
    pub reason: Reason,
    /// What was wrong, for the GOAWAY's debug data and the log.
    pub message: String,
}

impl ConnError {
    /// A connection error with `reason`, saying `message`.
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// Strips the padding of a DATA or HEADERS payload.
pub fn unpad(flags: u8, payload: &[u8]) -> Result<&[u8], ConnError> {
    if flags & flag::PADDED == 0 {
        return Ok(payload);
    }
    let pad = *payload
        .first()
        .ok_or_else(|| ConnError::new(Reason::PROTOCOL_ERROR, "padded frame without pad length"))?
        as usize;
    if pad >= payload.len() {
        return Err(ConnError::new(
            Reason::PROTOCOL_ERROR,
            "padding longer than the frame",
        ));
    }
    Ok(&payload[1..payload.len() - pad])
}

/// A header block being assembled from a HEADERS frame and its CONTINUATION frames.
#[derive(Debug, Default)]
pub struct HeaderBlock {
    /// The block so far.
    pub block: Vec<u8>,
    /// Its stream.
    pub sid: u32,
    /// The HEADERS frame ended the stream.
    pub end_stream: bool,
    /// Its priority names the stream itself as its parent: a stream error (RFC 9113 §5.3.1).
    pub self_dependent: bool,
    open: bool,
}

impl HeaderBlock {
    /// Checks that a frame of `kind` may come now: nothing but CONTINUATION inside a block.
    pub fn check(&self, kind: u8) -> Result<(), ConnError> {
        if self.open && kind != kind::CONTINUATION {
            return Err(ConnError::new(
                Reason::PROTOCOL_ERROR,
                "frame inside a header block",
            ));
        }
        Ok(())
    }

    /// Takes a HEADERS or CONTINUATION frame; true once the block is complete. A block may not
    /// grow past `max` bytes.
    pub fn frame(&mut self, head: Head, payload: &[u8], max: usize) -> Result<bool, ConnError> {
        if head.kind == kind::HEADERS {
            let mut p = unpad(head.flags, payload)?;
            self.self_dependent = false;
            if head.flags & flag::PRIORITY != 0 {
                let Some((priority, rest)) = p.split_first_chunk::<5>() else {
                    return Err(ConnError::new(
                        Reason::FRAME_SIZE_ERROR,
                        "short HEADERS priority",
                    ));
                };
                self.self_dependent = dependency(priority) == head.stream;
                p = rest;
            }
            self.block.clear();
            self.block.extend_from_slice(p);
            self.sid = head.stream;
            self.end_stream = head.flags & flag::END_STREAM != 0;
        } else {
            if !self.open || head.stream != self.sid {
                return Err(ConnError::new(
                    Reason::PROTOCOL_ERROR,
                    "CONTINUATION without its HEADERS",
                ));
            }
            self.block.extend_from_slice(payload);
        }
        if self.block.len() > max {
            return Err(ConnError::new(
                Reason::ENHANCE_YOUR_CALM,
                "header block larger than the header list limit",
            ));
        }
        self.open = head.flags & flag::END_HEADERS == 0;
        Ok(!self.open)
    }
}

/// The stream a priority block (5 bytes: exclusive bit and stream, weight) depends on.
pub fn dependency(priority: &[u8; 5]) -> u32 {
    u32::from_be_bytes([priority[0], priority[1], priority[2], priority[3]]) & 0x7fff_ffff
}

/// Frames that belong to the connection, not a stream (SETTINGS, PING, GOAWAY), on a stream:
/// a connection error (RFC 9113 §6.5, §6.7, §6.8).
pub fn check_connection_frame(head: Head) -> Result<(), ConnError> {
    if matches!(head.kind, kind::SETTINGS | kind::PING | kind::GOAWAY) && head.stream != 0 {
        return Err(ConnError::new(
            Reason::PROTOCOL_ERROR,
            "SETTINGS, PING or GOAWAY on a stream",
        ));
    }
    Ok(())
}

/// Checks a PRIORITY frame (RFC 9113 §6.3; the signal itself is deprecated and ignored):
/// `Ok(Some(reason))` is a stream error.
pub fn check_priority(head: Head, payload: &[u8]) -> Result<Option<Reason>, ConnError> {
    if head.stream == 0 {
        return Err(ConnError::new(
            Reason::PROTOCOL_ERROR,
            "PRIORITY on stream 0",
        ));
    }
    let Ok(priority) = <&[u8; 5]>::try_from(payload) else {
        return Ok(Some(Reason::FRAME_SIZE_ERROR));
    };
    Ok((dependency(priority) == head.stream).then_some(Reason::PROTOCOL_ERROR))
}

/// Handles the frames both kinds of connection treat alike (SETTINGS, PING, WINDOW_UPDATE,
/// PUSH_PROMISE, which the proxy never allows); false for any other kind.
pub fn connection_frame(
    conn: &Conn,
    head: Head,
    payload: &[u8],
    credits: &mut Vec<Credit>,
) -> Result<bool, ConnError> {
    check_connection_frame(head)?;
    match head.kind {
        kind::SETTINGS if head.flags & flag::ACK != 0 => {
            if !payload.is_empty() {
                return Err(ConnError::new(
                    Reason::FRAME_SIZE_ERROR,
                    "SETTINGS ACK with a payload",
                ));
            }
        }
        kind::SETTINGS => apply_settings(conn, payload, credits)?,
        kind::PING => ping(conn, head, payload)?,
        kind::WINDOW_UPDATE => window_update(conn, head, payload, credits)?,
        kind::PUSH_PROMISE => {
            return Err(ConnError::new(
                Reason::PROTOCOL_ERROR,
                "PUSH_PROMISE (server push is not allowed here)",
            ));
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// The error code of a RST_STREAM frame's payload.
pub fn rst_reason(payload: &[u8]) -> Result<Reason, ConnError> {
    let Ok(code) = <[u8; 4]>::try_from(payload) else {
        return Err(ConnError::new(
            Reason::FRAME_SIZE_ERROR,
            "RST_STREAM not 4 bytes",
        ));
    };
    Ok(Reason(u32::from_be_bytes(code)))
}

/// Answers a PING.
fn ping(conn: &Conn, head: Head, payload: &[u8]) -> Result<(), ConnError> {
    let Ok(payload) = <[u8; 8]>::try_from(payload) else {
        return Err(ConnError::new(Reason::FRAME_SIZE_ERROR, "PING not 8 bytes"));
    };
    if head.flags & flag::ACK == 0 {
        let mut st = conn.lock();
        frame::ping(&mut st.out, true, payload);
        st.wake();
    }
    Ok(())
}

/// Applies a SETTINGS frame from the peer of `conn` and acknowledges it.
fn apply_settings(conn: &Conn, payload: &[u8], credits: &mut Vec<Credit>) -> Result<(), ConnError> {
    if !payload.len().is_multiple_of(6) {
        return Err(ConnError::new(
            Reason::FRAME_SIZE_ERROR,
            "SETTINGS length not a multiple of 6",
        ));
    }
    let mut st = conn.lock();
    for s in payload.chunks_exact(6) {
        let id = u16::from_be_bytes([s[0], s[1]]);
        let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
        match id {
            setting::HEADER_TABLE_SIZE => st.enc.set_max(v as usize),
            setting::ENABLE_PUSH if v > 1 => {
                return Err(ConnError::new(
                    Reason::PROTOCOL_ERROR,
                    "SETTINGS_ENABLE_PUSH neither 0 nor 1",
                ));
            }
            setting::MAX_CONCURRENT_STREAMS => st.peer_max_streams = v as usize,
            setting::INITIAL_WINDOW_SIZE => {
                if i64::from(v) > frame::MAX_WINDOW {
                    return Err(ConnError::new(
                        Reason::FLOW_CONTROL_ERROR,
                        "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1",
                    ));
                }
                st.set_peer_initial_window(i64::from(v), credits)?;
            }
            setting::MAX_FRAME_SIZE => {
                if !(frame::DEFAULT_MAX_FRAME..=(1 << 24) - 1).contains(&v) {
                    return Err(ConnError::new(
                        Reason::PROTOCOL_ERROR,
                        "SETTINGS_MAX_FRAME_SIZE out of range",
                    ));
                }
                st.peer_max_frame = v as usize;
            }
            _ => {}
        }
    }
    frame::settings_ack(&mut st.out);
    st.wake();
    drop(st);
    apply(credits);
    Ok(())
}

/// Applies a WINDOW_UPDATE from the peer of `conn`: writes what waited for it. A stream whose
/// window overflows is reset, and its call cancelled at the other end.
fn window_update(
    conn: &Conn,
    head: Head,
    payload: &[u8],
    credits: &mut Vec<Credit>,
) -> Result<(), ConnError> {
    if payload.len() != 4 {
        return Err(ConnError::new(
            Reason::FRAME_SIZE_ERROR,
            "WINDOW_UPDATE not 4 bytes",
        ));
    }
    let inc = i64::from(u32::from_be_bytes(payload.try_into().expect("4 bytes")) & 0x7fff_ffff);
    let mut st = conn.lock();
    let mut overflowed = None;
    if head.stream == 0 {
        if inc == 0 {
            return Err(ConnError::new(Reason::PROTOCOL_ERROR, "WINDOW_UPDATE of 0"));
        }
        st.send_window += inc;
        if st.send_window > frame::MAX_WINDOW {
            return Err(ConnError::new(
                Reason::FLOW_CONTROL_ERROR,
                "connection window above 2^31-1",
            ));
        }
        st.drain_all(credits);
    } else if let Some(s) = st.streams.get_mut(&head.stream) {
        s.send_window += inc;
        // A stream error: PROTOCOL_ERROR for an increment of 0, FLOW_CONTROL_ERROR for a
        // window past 2^31-1 (RFC 9113 §6.9, §6.9.1).
        let error = if inc == 0 {
            Some(Reason::PROTOCOL_ERROR)
        } else {
            (s.send_window > frame::MAX_WINDOW).then_some(Reason::FLOW_CONTROL_ERROR)
        };
        if let Some(reason) = error {
            let end = match st.role {
                Role::Server => End::Cancelled,
                Role::Client => End::Reset,
            };
            overflowed = st.reset(head.stream, reason).map(|s| (s, end));
        } else {
            st.drain(head.stream, credits);
        }
    }
    drop(st);
    if let Some((stream, end)) = overflowed {
        unlink(stream, Reason::CANCEL, end);
    }
    apply(credits);
    Ok(())
}
