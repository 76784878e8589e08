//! A client connection of the relay fed arbitrary bytes, in memory: the preface, then
//! whatever frames the input holds, cut into reads as the input says. The connection runs with
//! the default limits over an empty store, so every request is answered by the proxy itself
//! and nothing leaves the process. `relay::down::feed_client_bytes` checks, after each read,
//! that nothing panicked, that no flow-control window went below zero, that no more streams
//! are open than the limit, that the DATA held for the streams is accounted exactly, that what
//! the proxy queued to write is bounded by what it read, and, at the end, that no call is left
//! in flight.
//!
//! Input: pieces (a 2-byte big-endian length and its bytes), each one read from the socket;
//! the preface is sent first, whole.
#![no_main]

use balancer_agent::{relay::down::feed_client_bytes, wire::frame::PREFACE};
use balancer_fuzz::pieces;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut reads: Vec<&[u8]> = vec![PREFACE];
    reads.extend(pieces(data).take(256));
    feed_client_bytes(&reads);
});
