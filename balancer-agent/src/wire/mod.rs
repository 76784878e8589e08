//! HTTP/2 on the wire, without I/O: frames ([`frame`]), header compression ([`hpack`],
//! [`huffman`]) and the rules of a well-formed message ([`message`]). The frame relay
//! (`relay`, a layer above) is built on it.
#![forbid(unsafe_code)]

pub mod frame;
pub mod hpack;
pub mod huffman;
pub mod message;

/// Bytes from hex as the RFCs print them (`"f1e3 c2e5"`).
#[cfg(test)]
pub(crate) fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}
