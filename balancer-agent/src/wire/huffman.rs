//! HPACK's Huffman code (RFC 7541 §5.2, Appendix B): decoding, which every peer may use, and
//! nothing else (the encoder sends strings raw).
//!
//! The code is canonical: a symbol's code follows from the code lengths alone (codes of one
//! length are consecutive, in symbol order, and each length starts where the previous one ended,
//! shifted left). So the table below is the 257 code lengths of the RFC, and [`CODE`] is built
//! from them at compile time; a test checks it against codes printed in the RFC.
//!
//! Decoding reads the longest code (30 bits) ahead and finds the symbol's length by comparing
//! against the first code past each length: at most 26 comparisons, 1 to 4 for the symbols
//! that fill gRPC headers.

/// Code length of every symbol (0..=255, then EOS = 256), from RFC 7541 Appendix B.
const LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, //
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, //
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, //
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, //
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, //
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, //
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, //
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, //
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, //
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, //
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, //
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, //
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, //
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, //
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, //
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, //
    30,
];

const EOS: u16 = 256;
const MIN_LEN: u32 = 5;
const MAX_LEN: u32 = 30;

/// The canonical code, arranged for decoding.
struct Code {
    /// `limit[l]`: the first code of length `l` past the codes of that length (as an `l`-bit
    /// number). A code read as `l` bits is a symbol of length `l` iff it is below this.
    limit: [u32; 31],
    /// `first[l]`: the first code of length `l`.
    first: [u32; 31],
    /// Where the symbols of length `l` start in `symbols`.
    offset: [u16; 31],
    /// Symbols sorted by (length, symbol).
    symbols: [u16; 257],
}

const CODE: Code = build();

const fn build() -> Code {
    let mut count = [0u32; 31];
    let mut s = 0;
    while s < 257 {
        count[LENGTHS[s] as usize] += 1;
        s += 1;
    }
    let mut first = [0u32; 31];
    let mut limit = [0u32; 31];
    let mut offset = [0u16; 31];
    let mut code = 0u32;
    let mut placed = 0u16;
    let mut l = 1;
    while l <= MAX_LEN as usize {
        first[l] = code;
        limit[l] = code + count[l];
        offset[l] = placed;
        placed += count[l] as u16;
        code = (code + count[l]) << 1;
        l += 1;
    }
    let mut symbols = [0u16; 257];
    let mut next = offset;
    let mut s = 0;
    while s < 257 {
        let l = LENGTHS[s] as usize;
        symbols[next[l] as usize] = s as u16;
        next[l] += 1;
        s += 1;
    }
    Code {
        limit,
        first,
        offset,
        symbols,
    }
}

/// Why a Huffman string did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The string holds the EOS symbol, or padding that is not a prefix of EOS or is 8 bits or
    /// longer (RFC 7541 §5.2).
    #[error("invalid Huffman-coded string")]
    Invalid,
}

/// Decodes `src`, appending the octets to `out`.
pub fn decode(src: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
    let mut acc: u64 = 0;
    let mut bits: u32 = 0;
    let mut i = 0;
    loop {
        while bits <= 56 && i < src.len() {
            acc = (acc << 8) | u64::from(src[i]);
            bits += 8;
            i += 1;
        }
        if bits == 0 {
            return Ok(());
        }
        let mut len = MIN_LEN;
        let found = loop {
            if len > bits || len > MAX_LEN {
                break None;
            }
            let code = ((acc >> (bits - len)) & ((1u64 << len) - 1)) as u32;
            let l = len as usize;
            if code < CODE.limit[l] {
                break Some(CODE.symbols[(CODE.offset[l] as u32 + code - CODE.first[l]) as usize]);
            }
            len += 1;
        };
        match found {
            Some(EOS) => return Err(Error::Invalid),
            Some(sym) => {
                out.push(sym as u8);
                bits -= len;
                acc &= (1u64 << bits) - 1;
            }
            // What is left must be padding: fewer than 8 bits, all ones (EOS's prefix).
            None if i == src.len() && bits < 8 && acc == (1u64 << bits) - 1 => return Ok(()),
            None => return Err(Error::Invalid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::unhex;

    fn code_of(sym: usize) -> (u32, u8) {
        let l = LENGTHS[sym] as usize;
        let rank = CODE.symbols[CODE.offset[l] as usize..]
            .iter()
            .position(|&s| s as usize == sym)
            .unwrap() as u32;
        (CODE.first[l] + rank, l as u8)
    }

    #[test]
    fn the_canonical_code_is_the_rfcs() {
        // A few codes as printed in RFC 7541 Appendix B.
        assert_eq!(code_of(b'0' as usize), (0x0, 5));
        assert_eq!(code_of(b'a' as usize), (0x3, 5));
        assert_eq!(code_of(b' ' as usize), (0x14, 6));
        assert_eq!(code_of(b'z' as usize), (0x7b, 7));
        assert_eq!(code_of(0), (0x1ff8, 13));
        assert_eq!(code_of(255), (0x3ffffee, 26));
        assert_eq!(code_of(256), (0x3fff_ffff, 30));
    }

    #[test]
    fn decodes_the_rfc_examples() {
        // RFC 7541 C.4 and C.6.
        for (hex, text) in [
            ("f1e3 c2e5 f23a 6ba0 ab90 f4ff", "www.example.com"),
            ("a8eb 1064 9cbf", "no-cache"),
            ("25a8 49e9 5ba9 7d7f", "custom-key"),
            ("25a8 49e9 5bb8 e8b4 bf", "custom-value"),
            ("6402", "302"),
            ("aec3 771a 4b", "private"),
            (
                "d07a be94 1054 d444 a820 0595 040b 8166 e082 a62d 1bff",
                "Mon, 21 Oct 2013 20:13:21 GMT",
            ),
            (
                "9d29 ad17 1863 c78f 0b97 c8e9 ae82 ae43 d3",
                "https://www.example.com",
            ),
        ] {
            let mut out = Vec::new();
            decode(&unhex(hex), &mut out).unwrap();
            assert_eq!(out, text.as_bytes(), "{hex}");
        }
    }

    #[test]
    fn rejects_bad_padding_and_eos() {
        let mut out = Vec::new();
        // '0' (00000) then 3 zero bits: padding must be ones.
        assert_eq!(decode(&[0b0000_0000], &mut out), Err(Error::Invalid));
        // A whole byte of ones is 8 bits of padding.
        assert_eq!(decode(&[0xff], &mut out), Err(Error::Invalid));
        // EOS itself (30 ones) followed by padding.
        assert_eq!(
            decode(&[0xff, 0xff, 0xff, 0xff], &mut out),
            Err(Error::Invalid)
        );
        // The empty string.
        out.clear();
        decode(&[], &mut out).unwrap();
        assert!(out.is_empty());
    }
}
