//! HPACK (`wire::hpack`): arbitrary header blocks, table size updates among them, through one
//! decoder (its dynamic table carries over from block to block, as on a connection); then a
//! round trip: what the encoder writes for the fields decoded, a decoder reads back identically.
//!
//! Input: byte 0 chooses the decoder's table limit (bits 0-1) and the header list size limit
//! (bits 2-3); with bit 4 the encoder follows a smaller peer table, of the size in bytes 1-2
//! (big endian), and with bit 5 it switches between that size and 4096 at every block; then
//! the header blocks, each a 2-byte big-endian length and its bytes. With bit 6 the round trip
//! also takes fields as they come, with any bytes (endpoints' response fields are relayed
//! unchecked): each block is then also read as names and values, each a 2-byte length and its
//! bytes.
#![no_main]

use balancer_agent::wire::hpack::{Decoder, Encoder, Error};
use balancer_fuzz::{FieldVec, pieces};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&[mode, hi, lo], rest)) = data.split_first_chunk::<3>() else {
        return;
    };
    let limit = [4096, 256, 0, 65_536][usize::from(mode & 3)];
    let max_list = [1 << 20, 16_384, 256, 64][usize::from(mode >> 2 & 3)];
    let mut dec = Decoder::new(limit);
    let mut blocks = Vec::new();
    for block in pieces(rest) {
        let mut fields = FieldVec::new();
        let mut size = 0;
        let decoded = dec.decode(block, max_list, &mut |n, v| {
            size += n.len() + v.len() + 32;
            fields.push((n.to_vec(), v.to_vec()));
        });
        // The fields handed out never pass the limit, whatever the outcome.
        assert!(size <= max_list, "{size} > {max_list}");
        if mode & 0x40 != 0 {
            let mut raw = pieces(block);
            blocks.push(
                std::iter::from_fn(|| Some((raw.next()?.to_vec(), raw.next()?.to_vec()))).collect(),
            );
        }
        match decoded {
            Ok(()) => blocks.push(fields),
            // A stream error: the connection, and its decoder, go on.
            Err(Error::ListTooLarge(n)) => assert_eq!(n, max_list),
            // A connection error: nothing more is decoded on this connection.
            Err(_) => break,
        }
    }

    let mut enc = Encoder::default();
    let smaller = usize::from(u16::from_be_bytes([hi, lo]));
    if mode & 0x10 != 0 {
        enc.set_max(smaller);
    }
    let mut dec = Decoder::default();
    for (i, fields) in blocks.iter().enumerate() {
        if mode & 0x20 != 0 {
            enc.set_max(if i % 2 == 0 { smaller } else { 4096 });
        }
        let mut block = BytesMut::new();
        enc.begin(&mut block);
        for (n, v) in fields {
            enc.field(n, v, &mut block);
        }
        let mut back = FieldVec::new();
        dec.decode(&block, usize::MAX, &mut |n, v| {
            back.push((n.to_vec(), v.to_vec()))
        })
        .expect("the decoder reads what the encoder writes");
        assert_eq!(&back, fields, "block {i} did not come back as it was");
    }
});
