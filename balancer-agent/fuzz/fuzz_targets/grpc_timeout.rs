//! `grpc-timeout` (`proxy::grpc::parse_timeout`, `format_timeout`). The parser must not panic
//! and accepts only 1 to 8 ASCII digits and a unit (`H M S m u n`). A duration formats as the
//! finest unit whose count fits in 8 digits, rounded up (at least 1 of it, so zero becomes
//! `1n`); above 99999999 hours it is capped there. So a value the parser accepts formats back
//! to a value that parses to the same duration or one rounded up by less than its unit, and
//! formatting that again changes nothing.
//!
//! Input: the whole input is a header value; if it is 12 bytes or more, its first 8 and next 4
//! bytes are also a duration's seconds and nanoseconds (modulo 10^9) to format.
#![no_main]

use std::time::Duration;

use balancer_agent::call::grpc::{format_timeout, parse_timeout};
use libfuzzer_sys::fuzz_target;

const UNITS: [(u8, u128); 6] = [
    (b'n', 1),
    (b'u', 1_000),
    (b'm', 1_000_000),
    (b'S', 1_000_000_000),
    (b'M', 60_000_000_000),
    (b'H', 3_600_000_000_000),
];

/// Formats `d` and checks the value against the rules above; returns what it parses to.
fn formats(d: Duration) -> Duration {
    let v = format_timeout(d);
    let v = v.as_bytes();
    let back = parse_timeout(v).unwrap_or_else(|| panic!("{d:?} formats as {v:?}"));
    let (&unit, digits) = v.split_last().unwrap();
    let at = UNITS.iter().position(|&(u, _)| u == unit).unwrap();
    let per = UNITS[at].1;
    let n: u128 = std::str::from_utf8(digits).unwrap().parse().unwrap();
    assert!(n >= 1, "{d:?} formats as {v:?}");
    assert_eq!(back.as_nanos(), n * per);
    // What is rounded up: at least a nanosecond.
    let ns = d.as_nanos().max(1);
    if v == b"99999999H" && ns > back.as_nanos() {
        return back;
    }
    assert!(back.as_nanos() >= ns, "{d:?} formats as {v:?}, less");
    assert!(
        back.as_nanos() - ns < per,
        "{d:?} as {v:?}: rounded up by a unit or more"
    );
    if at > 0 {
        let finer = UNITS[at - 1].1;
        assert!(
            ns.div_ceil(finer) >= 100_000_000,
            "{d:?} as {v:?}: a finer unit fits"
        );
    }
    back
}

fuzz_target!(|data: &[u8]| {
    if let Some(d) = parse_timeout(data) {
        let (&unit, digits) = data.split_last().unwrap();
        assert!(UNITS.iter().any(|&(u, _)| u == unit));
        assert!((1..=8).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit));
        let back = formats(d);
        // Formatting is stable: the value read back formats as itself.
        assert_eq!(format_timeout(back), format_timeout(d));
    }
    if let Some((secs, rest)) = data.split_first_chunk::<8>()
        && let Some((nanos, _)) = rest.split_first_chunk::<4>()
    {
        let d = Duration::new(
            u64::from_be_bytes(*secs),
            u32::from_be_bytes(*nanos) % 1_000_000_000,
        );
        formats(d);
    }
});
