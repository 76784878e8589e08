//! HPACK's Huffman code (`wire::huffman::decode`) on arbitrary bytes. There is no encoder (the
//! agent sends strings raw), so no round trip: the decoder must not panic, must append to what
//! the output held, must produce as many octets as the input's bits allow (every code is 5 to
//! 30 bits, padding under 8), and the HPACK decoder must read a Huffman-coded name and value
//! (two scratch buffers) as the same octets.
#![no_main]

use balancer_agent::wire::{hpack::Decoder, huffman};
use libfuzzer_sys::fuzz_target;

/// An HPACK string literal, Huffman-coded (RFC 7541 §5.1, §5.2).
fn huffman_literal(block: &mut Vec<u8>, coded: &[u8]) {
    let mut n = coded.len();
    if n < 127 {
        block.push(0x80 | n as u8);
    } else {
        block.push(0xff);
        n -= 127;
        while n >= 0x80 {
            block.push(n as u8 | 0x80);
            n >>= 7;
        }
        block.push(n as u8);
    }
    block.extend_from_slice(coded);
}

fuzz_target!(|data: &[u8]| {
    let mut out = b"kept".to_vec();
    let decoded = huffman::decode(data, &mut out);
    assert!(out.starts_with(b"kept"), "the output was overwritten");
    let octets = &out[4..];
    if decoded.is_ok() {
        assert!(
            octets.len() * 5 <= data.len() * 8,
            "codes shorter than 5 bits"
        );
        assert!(data.len() * 8 <= octets.len() * 30 + 7, "bits left unread");
    }

    // A literal field without indexing, new name: both strings are `data`, Huffman-coded.
    let mut block = vec![0x00];
    huffman_literal(&mut block, data);
    huffman_literal(&mut block, data);
    let mut fields = Vec::new();
    let read = Decoder::default().decode(&block, usize::MAX, &mut |n, v| {
        fields.push((n.to_vec(), v.to_vec()))
    });
    assert_eq!(read.is_ok(), decoded.is_ok());
    if read.is_ok() {
        assert_eq!(fields, [(octets.to_vec(), octets.to_vec())]);
    }
});
