//! From a header block to a call's fields: arbitrary HPACK blocks decoded as the client side
//! of the relay decodes them, each checked as a request (`wire::message::check_request`) and as
//! trailers (`check_trailers`). Nothing may panic, and what is accepted must really be
//! well-formed, by an oracle written from RFC 9113 §8 (a request has `:method`, and `:scheme`
//! and a non-empty `:path` unless it is a CONNECT, which has `:authority` and neither). An
//! accepted request, encoded again (`hpack::Encoder`) and decoded, is accepted the same.
//!
//! Input: byte 0's bit `i % 8` says whether block `i` ended its stream; then the header
//! blocks, each a 2-byte big-endian length and its bytes, through one decoder.
#![no_main]

use balancer_agent::wire::{
    hpack::{Decoder, Encoder, Error},
    message::{RequestHead, check_request, check_trailers},
};
use balancer_fuzz::{FieldVec, borrowed, pieces};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

/// The relay's default `limits.max_header_list_size`.
const MAX_LIST: usize = 16 * 1024;

fn token(name: &[u8]) -> bool {
    !name.is_empty()
        && name
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(b))
}

fn clean(value: &[u8]) -> bool {
    let ws = [b' ', b'\t'];
    !value.first().is_some_and(|b| ws.contains(b))
        && !value.last().is_some_and(|b| ws.contains(b))
        && !value.iter().any(|b| b"\0\r\n".contains(b))
}

/// Regular fields that are well-formed (RFC 9113 §8.2).
fn regular_ok(fields: &[(Vec<u8>, Vec<u8>)]) {
    for (n, v) in fields {
        assert!(token(n), "accepted name {n:?}");
        assert!(clean(v), "accepted value {v:?}");
        assert!(
            ![
                &b"connection"[..],
                b"keep-alive",
                b"proxy-connection",
                b"transfer-encoding",
                b"upgrade"
            ]
            .contains(&&n[..]),
            "accepted a connection-specific field {n:?}"
        );
        assert!(n != b"te" || v == b"trailers", "accepted te: {v:?}");
    }
}

fn accepted_request(fields: &FieldVec, end_stream: bool, head: RequestHead) {
    let pseudo = fields
        .iter()
        .take_while(|(n, _)| n.starts_with(b":"))
        .count();
    let (pseudo, regular) = fields.split_at(pseudo);
    assert!(
        regular.iter().all(|(n, _)| !n.starts_with(b":")),
        "pseudo after regular"
    );
    regular_ok(regular);
    let get = |name: &[u8]| {
        let mut found = pseudo.iter().filter(|(n, _)| n == name);
        let v = found.next().map(|(_, v)| v.as_slice());
        assert!(found.next().is_none(), "{name:?} twice");
        v
    };
    let method = get(b":method").expect(":method");
    let (scheme, path, authority) = (get(b":scheme"), get(b":path"), get(b":authority"));
    assert_eq!(
        pseudo.len(),
        1 + [scheme, path, authority].iter().flatten().count(),
        "an unknown pseudo-header"
    );
    assert!(pseudo.iter().all(|(_, v)| clean(v)));
    if method == b"CONNECT" {
        assert!(authority.is_some() && scheme.is_none() && path.is_none());
    } else {
        assert!(scheme.is_some(), "no :scheme");
        assert!(path.is_some_and(|p| !p.is_empty()), "no :path");
    }
    let lengths: Vec<u64> = regular
        .iter()
        .filter(|(n, _)| n == b"content-length")
        .map(|(_, v)| std::str::from_utf8(v).unwrap().parse().unwrap())
        .collect();
    assert!(lengths.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(head.content_length, lengths.first().copied());
    assert!(!end_stream || head.content_length.unwrap_or(0) == 0);
}

fuzz_target!(|data: &[u8]| {
    let Some((&ends, rest)) = data.split_first() else {
        return;
    };
    let mut dec = Decoder::default();
    let mut enc = Encoder::default();
    let mut again = Decoder::default();
    for (i, block) in pieces(rest).enumerate() {
        let end_stream = ends >> (i % 8) & 1 != 0;
        let mut fields = FieldVec::new();
        match dec.decode(block, MAX_LIST, &mut |n, v| {
            fields.push((n.to_vec(), v.to_vec()))
        }) {
            Ok(()) => {}
            Err(Error::ListTooLarge(_)) => continue,
            Err(_) => return,
        }
        if check_trailers(borrowed(&fields)).is_ok() {
            assert!(fields.iter().all(|(n, _)| !n.starts_with(b":")));
            regular_ok(&fields);
        }
        let Ok(head) = check_request(borrowed(&fields), end_stream) else {
            continue;
        };
        accepted_request(&fields, end_stream, head);

        let mut out = BytesMut::new();
        enc.begin(&mut out);
        for (n, v) in &fields {
            enc.field(n, v, &mut out);
        }
        let mut back = FieldVec::new();
        again
            .decode(&out, usize::MAX, &mut |n, v| {
                back.push((n.to_vec(), v.to_vec()))
            })
            .expect("the decoder reads what the encoder writes");
        assert_eq!(check_request(borrowed(&back), end_stream), Ok(head));
    }
});
