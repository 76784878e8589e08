//! gRPC on the wire, as far as the proxy must know it: status codes, the proxy's own failures
//! (`Status`, which the relay answers as trailers-only responses), `grpc-timeout`, and the
//! message count of a stream.
#![forbid(unsafe_code)]

use std::time::Duration;

use http::HeaderValue;

use crate::config::resilience::{GRPC_STATUS_NAMES, grpc_status};

/// gRPC status codes (every one: fault injection aborts with any, retry conditions name
/// several).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Code {
    /// 0
    Ok = 0,
    /// 1
    Cancelled = 1,
    /// 2
    Unknown = 2,
    /// 3
    InvalidArgument = 3,
    /// 4
    DeadlineExceeded = 4,
    /// 5
    NotFound = 5,
    /// 6
    AlreadyExists = 6,
    /// 7
    PermissionDenied = 7,
    /// 8
    ResourceExhausted = 8,
    /// 9
    FailedPrecondition = 9,
    /// 10
    Aborted = 10,
    /// 11
    OutOfRange = 11,
    /// 12
    Unimplemented = 12,
    /// 13
    Internal = 13,
    /// 14
    Unavailable = 14,
    /// 15
    DataLoss = 15,
    /// 16
    Unauthenticated = 16,
}

impl Code {
    /// Every code, by number.
    pub const ALL: [Code; 17] = [
        Code::Ok,
        Code::Cancelled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];

    /// The code numbered `n`.
    pub fn from_u32(n: u32) -> Option<Self> {
        Self::ALL.get(n as usize).copied()
    }

    /// The code of a `grpc-status` value (`"14"`); `None` for anything else.
    pub fn from_status(v: &[u8]) -> Option<Self> {
        if v.is_empty() || v.len() > 2 || !v.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Self::from_u32(v.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
    }

    /// Its canonical name, as gRPC and Istio write it: `UNAVAILABLE`.
    pub fn name(self) -> &'static str {
        GRPC_STATUS_NAMES[self as usize]
    }

    /// The code named `name` (`UNAVAILABLE`, any case), or numbered (`14`).
    pub fn parse(name: &str) -> Option<Self> {
        grpc_status(name).and_then(Self::from_u32)
    }
}

impl serde::Serialize for Code {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// A failure the proxy itself met on a call, as the client will see it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct Status {
    /// The gRPC status.
    pub code: Code,
    /// What a person can act on.
    pub message: String,
}

impl Status {
    /// UNAVAILABLE with a message.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            code: Code::Unavailable,
            message: message.into(),
        }
    }

    /// DEADLINE_EXCEEDED with a message.
    pub fn deadline(message: impl Into<String>) -> Self {
        Self {
            code: Code::DeadlineExceeded,
            message: message.into(),
        }
    }

    /// RESOURCE_EXHAUSTED with a message.
    pub fn exhausted(message: impl Into<String>) -> Self {
        Self {
            code: Code::ResourceExhausted,
            message: message.into(),
        }
    }
}

/// Percent-encodes a `grpc-message` as the gRPC HTTP/2 protocol asks: bytes outside
/// printable ASCII, and `%`, become `%XX`.
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parses a `grpc-timeout` value: at most 8 digits and a unit (`H M S m u n`).
pub fn parse_timeout(v: &[u8]) -> Option<Duration> {
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats a remaining deadline as `grpc-timeout`, rounded up, in the finest unit that fits
/// in 8 digits.
pub fn format_timeout(d: Duration) -> HeaderValue {
    let ns = d.as_nanos().max(1);
    let units: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    for (per, unit) in units {
        let n = ns.div_ceil(per);
        if n < 100_000_000 {
            return HeaderValue::from_str(&format!("{n}{unit}")).expect("ASCII");
        }
    }
    HeaderValue::from_static("99999999H")
}

/// Counts gRPC messages in a byte stream: each is a 1-byte flag and a 4-byte big-endian length,
/// then that many bytes. Chunks may split a prefix or a message anywhere.
#[derive(Debug, Default, Clone, Copy)]
pub struct MessageCounter {
    /// Messages whose prefix was seen.
    pub count: u64,
    /// Prefix bytes still to read (0 means: inside a message body, or at a boundary).
    prefix_seen: u8,
    prefix: [u8; 5],
    /// Body bytes of the current message still to skip.
    remaining: u64,
}

impl MessageCounter {
    /// Feeds the next chunk of the stream.
    pub fn feed(&mut self, mut b: &[u8]) {
        while !b.is_empty() {
            if self.remaining > 0 {
                let n = (self.remaining as usize).min(b.len());
                self.remaining -= n as u64;
                b = &b[n..];
                continue;
            }
            let want = 5 - self.prefix_seen as usize;
            let n = want.min(b.len());
            self.prefix[self.prefix_seen as usize..self.prefix_seen as usize + n]
                .copy_from_slice(&b[..n]);
            self.prefix_seen += n as u8;
            b = &b[n..];
            if self.prefix_seen == 5 {
                self.count += 1;
                self.prefix_seen = 0;
                let p = self.prefix;
                self.remaining = u64::from(u32::from_be_bytes([p[1], p[2], p[3], p[4]]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_and_format() {
        assert_eq!(parse_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout(b"5n"), Some(Duration::from_nanos(5)));
        for bad in [&b""[..], b"m", b"123456789m", b"10x", b"-1S", b"1.5S"] {
            assert_eq!(parse_timeout(bad), None, "{bad:?}");
        }
        for d in [
            Duration::from_nanos(7),
            Duration::from_millis(1500),
            Duration::from_secs(10),
            Duration::from_secs(86_400 * 365),
        ] {
            let v = format_timeout(d);
            let back = parse_timeout(v.as_bytes()).unwrap();
            assert!(back >= d, "{d:?} -> {v:?} -> {back:?}");
        }
    }

    #[test]
    fn codes_read_by_name_number_and_status_value() {
        assert_eq!(Code::parse("UNAVAILABLE"), Some(Code::Unavailable));
        assert_eq!(
            Code::parse("resource_exhausted"),
            Some(Code::ResourceExhausted)
        );
        assert_eq!(Code::parse("16"), Some(Code::Unauthenticated));
        assert_eq!(Code::parse("17"), None);
        assert_eq!(Code::parse("NOPE"), None);
        assert_eq!(Code::from_status(b"14"), Some(Code::Unavailable));
        for bad in [&b""[..], b"-1", b"017", b"x", b"99"] {
            assert_eq!(Code::from_status(bad), None, "{bad:?}");
        }
        for c in Code::ALL {
            assert_eq!(Code::parse(c.name()), Some(c));
            assert_eq!(Code::from_u32(c as u32), Some(c));
        }
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(
            percent_encode("endpoint 10.0.0.1:80: connection refused 100%"),
            "endpoint 10.0.0.1:80: connection refused 100%25"
        );
        assert_eq!(percent_encode("é\n"), "%C3%A9%0A");
    }

    fn frame(len: u32) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&len.to_be_bytes());
        v.extend(std::iter::repeat_n(7u8, len as usize));
        v
    }

    #[test]
    fn counts_messages_across_any_split() {
        let stream: Vec<u8> = [frame(0), frame(3), frame(70_000), frame(1)].concat();
        for chunk in [1, 2, 3, 5, 7, 4096, stream.len()] {
            let mut c = MessageCounter::default();
            for part in stream.chunks(chunk) {
                c.feed(part);
            }
            assert_eq!(c.count, 4, "chunk size {chunk}");
        }
    }
}
