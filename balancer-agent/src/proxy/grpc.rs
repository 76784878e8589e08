//! gRPC on the wire, as far as the proxy must know it: status codes, `grpc-timeout`, and the
//! trailers-only responses that carry the proxy's own failures to the client.
#![forbid(unsafe_code)]

use std::time::Duration;

use http::{HeaderMap, HeaderValue, Response, StatusCode, header::CONTENT_TYPE};

/// gRPC status codes the proxy produces or labels metrics with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    /// 0
    Ok = 0,
    /// 1
    Cancelled = 1,
    /// 2
    Unknown = 2,
    /// 4
    DeadlineExceeded = 4,
    /// 8
    ResourceExhausted = 8,
    /// 13
    Internal = 13,
    /// 14
    Unavailable = 14,
}

impl Code {
    /// The code as a `grpc-status` value.
    pub fn header(self) -> HeaderValue {
        HeaderValue::from(self as u16)
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

    /// `grpc-status` and `grpc-message` as trailers.
    pub fn trailers(&self) -> HeaderMap {
        let mut h = HeaderMap::with_capacity(2);
        self.write(&mut h);
        h
    }

    fn write(&self, h: &mut HeaderMap) {
        h.insert("grpc-status", self.code.header());
        if let Ok(v) = HeaderValue::from_str(&percent_encode(&self.message)) {
            h.insert("grpc-message", v);
        }
    }

    /// A trailers-only response: HTTP 200 whose single HEADERS frame ends the stream.
    pub fn trailers_only(&self) -> Response<()> {
        let mut r = Response::new(());
        *r.status_mut() = StatusCode::OK;
        let h = r.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        self.write(h);
        r
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

/// The `grpc-status` of a header block, if it carries one.
pub fn status_of(h: &HeaderMap) -> Option<&str> {
    h.get("grpc-status").and_then(|v| v.to_str().ok())
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
    fn trailers_only_carries_status_and_message() {
        let r =
            Status::unavailable("endpoint 10.0.0.1:80: connection refused 100%").trailers_only();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(
            r.headers()["grpc-message"],
            "endpoint 10.0.0.1:80: connection refused 100%25"
        );
    }
}
