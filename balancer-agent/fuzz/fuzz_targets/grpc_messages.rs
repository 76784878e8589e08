//! gRPC length-prefixed messages (`proxy::grpc::MessageCounter`): the count is the same
//! whatever the chunks a stream arrives in, and is the count of complete 5-byte prefixes found
//! by walking the whole stream.
//!
//! Input: bytes 0-1 seed the chunk sizes (0 to 31 bytes, empty chunks included); the rest is
//! the stream.
#![no_main]

use balancer_agent::call::grpc::MessageCounter;
use libfuzzer_sys::fuzz_target;

/// Messages whose 5-byte prefix (flag, big-endian length) is in `b`.
fn walk(mut b: &[u8]) -> u64 {
    let mut n = 0;
    while let Some((prefix, rest)) = b.split_first_chunk::<5>() {
        n += 1;
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
        b = rest.get(len as usize..).unwrap_or_default();
    }
    n
}

fn count<'a>(chunks: impl Iterator<Item = &'a [u8]>) -> u64 {
    let mut c = MessageCounter::default();
    for chunk in chunks {
        c.feed(chunk);
    }
    c.count
}

fuzz_target!(|data: &[u8]| {
    let Some((seed, stream)) = data.split_first_chunk::<2>() else {
        return;
    };
    let expected = walk(stream);
    assert_eq!(count(std::iter::once(stream)), expected, "whole");
    assert_eq!(count(stream.chunks(1)), expected, "byte by byte");
    // xorshift16: chunk sizes that follow from the input.
    let mut x = u16::from_be_bytes(*seed) | 1;
    let mut rest = stream;
    let chunks = std::iter::from_fn(|| {
        if rest.is_empty() {
            return None;
        }
        x ^= x << 7;
        x ^= x >> 9;
        x ^= x << 8;
        let (chunk, tail) = rest.split_at(usize::from(x % 32).min(rest.len()));
        rest = tail;
        Some(chunk)
    });
    assert_eq!(count(chunks), expected, "seed {seed:?}");
});
