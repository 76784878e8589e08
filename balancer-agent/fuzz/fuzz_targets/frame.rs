//! Frames as the relay reads them: a stream of arbitrary bytes cut into frames by
//! `wire::frame::Head::parse`, each payload through the parsers of `relay::read` (`unpad`,
//! `HeaderBlock::check`/`frame` over HEADERS and CONTINUATION, `rst_reason`, `check_priority`,
//! `check_connection_frame`), with an oracle written from RFC 9113 for each; then what the
//! frame writers make of a block or of DATA reads back as it was.
//!
//! Input: byte 0 chooses the header block limit (bits 0-1) and the frame size the writers
//! use (bits 2-7, plus one); then the frames, as on the wire (no preface). A connection error
//! starts a new header block, as a new connection would.
#![no_main]

use balancer_agent::{
    relay::read::{HeaderBlock, check_connection_frame, check_priority, rst_reason, unpad},
    wire::frame::{self, HEADER_LEN, Head, Reason, flag, kind},
};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

/// RFC 9113 §6.1, §6.2: the pad length byte, then the data, then that much padding.
fn expected_unpad(flags: u8, payload: &[u8]) -> Option<&[u8]> {
    if flags & flag::PADDED == 0 {
        return Some(payload);
    }
    let (&pad, rest) = payload.split_first()?;
    rest.len()
        .checked_sub(usize::from(pad))
        .map(|end| &rest[..end])
}

/// Cuts what the writers wrote back into frames.
fn frames(mut b: &[u8]) -> Vec<(Head, &[u8])> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let head = Head::parse(b);
        let (payload, rest) = b[HEADER_LEN..].split_at(head.len);
        out.push((head, payload));
        b = rest;
    }
    out
}

/// A complete header block written with `frame::headers` reads back as the same block.
fn rewrite_block(block: &HeaderBlock, max_frame: usize) {
    let mut out = BytesMut::new();
    frame::headers(
        &mut out,
        block.sid,
        &block.block,
        block.end_stream,
        max_frame,
    );
    let mut back = HeaderBlock::default();
    let frames = frames(&out);
    for (i, (head, payload)) in frames.iter().enumerate() {
        assert!(head.len <= max_frame);
        back.check(head.kind)
            .expect("a CONTINUATION inside its block");
        let done = back
            .frame(*head, payload, usize::MAX)
            .expect("a well-formed block");
        assert_eq!(done, i + 1 == frames.len());
    }
    assert_eq!(
        (&back.block, back.sid, back.end_stream, back.self_dependent),
        (&block.block, block.sid, block.end_stream, false)
    );
}

/// DATA written with `frame::data` reads back as the same bytes, END_STREAM on the last frame.
fn rewrite_data(stream: u32, data: &[u8], end: bool, max_frame: usize) {
    let mut out = BytesMut::new();
    frame::data(&mut out, stream, data, end, max_frame);
    let frames = frames(&out);
    let mut back = Vec::new();
    for (i, (head, payload)) in frames.iter().enumerate() {
        assert_eq!((head.kind, head.stream), (kind::DATA, stream));
        assert!(head.len <= max_frame);
        let last = i + 1 == frames.len();
        assert_eq!(head.flags, if end && last { flag::END_STREAM } else { 0 });
        back.extend_from_slice(unpad(head.flags, payload).expect("no padding"));
    }
    assert_eq!(back, data);
    assert_eq!(frames.is_empty(), data.is_empty() && !end);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let max_block = [16_384, 64, 0, 1 << 20][usize::from(mode & 3)];
    let max_frame = usize::from(mode >> 2) + 1;
    let mut block = HeaderBlock::default();
    // The block as RFC 9113 §6.2 and §6.10 assemble it.
    let mut expected = Vec::new();
    while rest.len() >= HEADER_LEN {
        let head = Head::parse(rest);
        // The header writes back as it was read, the reserved bit cleared.
        let mut written = BytesMut::new();
        Head::write(&mut written, head.len, head.kind, head.flags, head.stream);
        let mut read = rest[..HEADER_LEN].to_vec();
        read[5] &= 0x7f;
        assert_eq!(&written[..], &read[..]);

        let body = &rest[HEADER_LEN..];
        let payload = &body[..head.len.min(body.len())];
        rest = &body[payload.len()..];

        let on_stream = head.stream != 0;
        let connection_frame = matches!(head.kind, kind::SETTINGS | kind::PING | kind::GOAWAY);
        assert_eq!(
            check_connection_frame(head).is_err(),
            connection_frame && on_stream
        );
        if block.check(head.kind).is_err() {
            assert_ne!(head.kind, kind::CONTINUATION);
            block = HeaderBlock::default();
            continue;
        }
        match head.kind {
            kind::DATA => {
                let unpadded = unpad(head.flags, payload).ok();
                assert_eq!(unpadded, expected_unpad(head.flags, payload));
                if let Some(d) = unpadded {
                    rewrite_data(
                        head.stream,
                        d,
                        head.flags & flag::END_STREAM != 0,
                        max_frame,
                    );
                }
            }
            kind::HEADERS | kind::CONTINUATION => {
                if head.kind == kind::HEADERS {
                    let fragment = expected_unpad(head.flags, payload).and_then(|p| {
                        if head.flags & flag::PRIORITY == 0 {
                            Some(p)
                        } else {
                            p.get(5..)
                        }
                    });
                    expected = fragment.unwrap_or_default().to_vec();
                } else {
                    expected.extend_from_slice(payload);
                }
                match block.frame(head, payload, max_block) {
                    Ok(done) => {
                        assert_eq!(block.block, expected);
                        assert!(block.block.len() <= max_block);
                        assert_eq!(done, head.flags & flag::END_HEADERS != 0);
                        if done {
                            rewrite_block(&block, max_frame);
                        }
                    }
                    Err(e) => {
                        let _ = e.reason.to_string();
                        block = HeaderBlock::default();
                    }
                }
            }
            kind::RST_STREAM => {
                let expected = <[u8; 4]>::try_from(payload).ok().map(u32::from_be_bytes);
                match rst_reason(payload) {
                    Ok(r) => assert_eq!(Some(r.0), expected),
                    Err(e) => {
                        assert!(expected.is_none());
                        assert_eq!(e.reason, Reason::FRAME_SIZE_ERROR);
                    }
                }
            }
            kind::PRIORITY => match check_priority(head, payload) {
                Err(e) => {
                    assert!(!on_stream);
                    assert_eq!(e.reason, Reason::PROTOCOL_ERROR);
                }
                Ok(stream_error) => {
                    assert!(on_stream);
                    let expected = match <&[u8; 5]>::try_from(payload) {
                        Err(_) => Some(Reason::FRAME_SIZE_ERROR),
                        Ok(p) => (u32::from_be_bytes([p[0] & 0x7f, p[1], p[2], p[3]])
                            == head.stream)
                            .then_some(Reason::PROTOCOL_ERROR),
                    };
                    assert_eq!(stream_error, expected);
                }
            },
            _ => {}
        }
    }
});
