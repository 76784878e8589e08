//! HTTP/2 messages (RFC 9113 §8.1-§8.3): a decoded header list ([`Fields`]), and what makes a
//! request's header list or its trailers malformed. A malformed request is answered by the proxy with a stream error
//! (RST_STREAM PROTOCOL_ERROR) and never reaches an endpoint: a shared endpoint connection must
//! not pay for one client's mistake (an endpoint that sees an uppercase header name may close
//! the whole connection with GOAWAY).
//!
//! The checks walk the decoded fields once, with a table per byte; they allocate nothing.

use std::fmt;

/// A decoded header list, owned (trailers wait in it until the DATA before them is written).
#[derive(Debug, Default, Clone)]
pub struct Fields {
    buf: Vec<u8>,
    /// (name start, value start, end) in `buf`.
    spans: Vec<(u32, u32, u32)>,
}

impl Fields {
    /// Empties it.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.spans.clear();
    }

    /// Adds a field.
    pub fn push(&mut self, name: &[u8], value: &[u8]) {
        let a = self.buf.len() as u32;
        self.buf.extend_from_slice(name);
        let b = self.buf.len() as u32;
        self.buf.extend_from_slice(value);
        self.spans.push((a, b, self.buf.len() as u32));
    }

    /// The fields, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.spans.iter().map(|&(a, b, c)| {
            (
                &self.buf[a as usize..b as usize],
                &self.buf[b as usize..c as usize],
            )
        })
    }

    /// The first value of `name`.
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

/// Why a header list is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// A field name with an uppercase letter or a byte outside `token` (§8.2.1).
    BadName,
    /// A field value with NUL, CR or LF, or that starts or ends with whitespace (§8.2.1).
    BadValue,
    /// A connection-specific field: `connection`, `keep-alive`, `proxy-connection`,
    /// `transfer-encoding`, `upgrade` (§8.2.2).
    ConnectionSpecific,
    /// `te` with a value other than `trailers` (§8.2.2).
    BadTe,
    /// A pseudo-header that requests do not have (`:status`, or unknown) (§8.3).
    UnknownPseudo,
    /// A pseudo-header after a regular field (§8.3).
    PseudoAfterRegular,
    /// A pseudo-header twice (§8.3.1).
    DuplicatePseudo,
    /// `:method`, `:scheme` or `:path` missing, or `:path` empty (§8.3.1).
    MissingPseudo,
    /// A CONNECT request with `:scheme` or `:path`, or without `:authority` (§8.5).
    BadConnect,
    /// A pseudo-header in trailers (§8.1).
    PseudoInTrailers,
    /// `content-length` not a number, or two different values (§8.1.1).
    BadContentLength,
    /// The DATA received does not add up to `content-length` (§8.1.1).
    ContentLengthMismatch,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BadName => "a header name with an uppercase letter or an invalid character",
            Self::BadValue => {
                "a header value with NUL, CR or LF, or leading or trailing whitespace"
            }
            Self::ConnectionSpecific => {
                "a connection-specific header (connection, keep-alive, \
                 proxy-connection, transfer-encoding, upgrade)"
            }
            Self::BadTe => "te with a value other than \"trailers\"",
            Self::UnknownPseudo => "a pseudo-header requests do not have",
            Self::PseudoAfterRegular => "a pseudo-header after a regular header",
            Self::DuplicatePseudo => "a pseudo-header twice",
            Self::MissingPseudo => ":method, :scheme or :path missing, or :path empty",
            Self::BadConnect => "a CONNECT request with :scheme or :path, or without :authority",
            Self::PseudoInTrailers => "a pseudo-header in trailers",
            Self::BadContentLength => "content-length not a number, or twice with two values",
            Self::ContentLengthMismatch => "DATA that does not add up to content-length",
        })
    }
}

impl Malformed {
    /// A short name for metric labels and logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::BadName => "bad_name",
            Self::BadValue => "bad_value",
            Self::ConnectionSpecific => "connection_specific",
            Self::BadTe => "bad_te",
            Self::UnknownPseudo => "unknown_pseudo",
            Self::PseudoAfterRegular => "pseudo_after_regular",
            Self::DuplicatePseudo => "duplicate_pseudo",
            Self::MissingPseudo => "missing_pseudo",
            Self::BadConnect => "bad_connect",
            Self::PseudoInTrailers => "pseudo_in_trailers",
            Self::BadContentLength => "bad_content_length",
            Self::ContentLengthMismatch => "content_length_mismatch",
        }
    }
}

/// What the proxy keeps of a well-formed request head.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestHead {
    /// The `content-length` the client declared.
    pub content_length: Option<u64>,
}

/// Checks a request's header list; `end_stream`: the HEADERS frame ended the stream (then a
/// `content-length` must be 0).
pub fn check_request<'a>(
    fields: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    end_stream: bool,
) -> Result<RequestHead, Malformed> {
    // Bits of the pseudo-headers seen.
    const METHOD: u8 = 1;
    const SCHEME: u8 = 2;
    const PATH: u8 = 4;
    const AUTHORITY: u8 = 8;
    let mut seen = 0u8;
    let mut regular = false;
    let mut connect = false;
    let mut head = RequestHead::default();
    for (name, value) in fields {
        if let Some(pseudo) = name.strip_prefix(b":") {
            if regular {
                return Err(Malformed::PseudoAfterRegular);
            }
            let bit = match pseudo {
                b"method" => {
                    connect = value == b"CONNECT";
                    METHOD
                }
                b"scheme" => SCHEME,
                b"path" => {
                    if value.is_empty() {
                        return Err(Malformed::MissingPseudo);
                    }
                    PATH
                }
                b"authority" => AUTHORITY,
                _ => return Err(Malformed::UnknownPseudo),
            };
            if seen & bit != 0 {
                return Err(Malformed::DuplicatePseudo);
            }
            seen |= bit;
            check_value(value)?;
            continue;
        }
        regular = true;
        check_field(name, value)?;
        if name == b"content-length" {
            let n = parse_length(value)?;
            if head.content_length.is_some_and(|m| m != n) {
                return Err(Malformed::BadContentLength);
            }
            head.content_length = Some(n);
        }
    }
    if connect {
        if seen & (SCHEME | PATH) != 0 || seen & AUTHORITY == 0 {
            return Err(Malformed::BadConnect);
        }
    } else if seen & (METHOD | SCHEME | PATH) != METHOD | SCHEME | PATH {
        return Err(Malformed::MissingPseudo);
    }
    if end_stream && head.content_length.is_some_and(|n| n != 0) {
        return Err(Malformed::ContentLengthMismatch);
    }
    Ok(head)
}

/// Checks a trailer section (a request's or a response's).
pub fn check_trailers<'a>(
    fields: impl Iterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<(), Malformed> {
    for (name, value) in fields {
        if name.starts_with(b":") {
            return Err(Malformed::PseudoInTrailers);
        }
        check_field(name, value)?;
    }
    Ok(())
}

/// A regular field: its name, its value, and the fields HTTP/2 forbids.
fn check_field(name: &[u8], value: &[u8]) -> Result<(), Malformed> {
    if name.is_empty() || !name.iter().all(|&b| NAME[usize::from(b)]) {
        return Err(Malformed::BadName);
    }
    check_value(value)?;
    match name {
        b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding" | b"upgrade" => {
            Err(Malformed::ConnectionSpecific)
        }
        b"te" if value != b"trailers" => Err(Malformed::BadTe),
        _ => Ok(()),
    }
}

fn check_value(value: &[u8]) -> Result<(), Malformed> {
    let ws = |b: &u8| *b == b' ' || *b == b'\t';
    if value.first().is_some_and(ws)
        || value.last().is_some_and(ws)
        || value.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n')
    {
        return Err(Malformed::BadValue);
    }
    Ok(())
}

fn parse_length(value: &[u8]) -> Result<u64, Malformed> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return Err(Malformed::BadContentLength);
    }
    Ok(value.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// The bytes a field name may hold: RFC 9110 `tchar`, without uppercase letters (RFC 9113
/// §8.2.1).
static NAME: [bool; 256] = {
    let mut t = [false; 256];
    let extra = b"!#$%&'*+-.^_`|~";
    let mut i = 0;
    while i < extra.len() {
        t[extra[i] as usize] = true;
        i += 1;
    }
    let mut c = b'a';
    while c <= b'z' {
        t[c as usize] = true;
        c += 1;
    }
    let mut d = b'0';
    while d <= b'9' {
        t[d as usize] = true;
        d += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use super::*;

    fn request(extra: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/helloworld.Greeter/SayHello"),
            (":authority", "greeter:50051"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        .iter()
        .chain(extra)
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
    }

    fn check(fields: &[(Vec<u8>, Vec<u8>)], end: bool) -> Result<RequestHead, Malformed> {
        check_request(fields.iter().map(|(n, v)| (&n[..], &v[..])), end)
    }

    #[test]
    fn a_grpc_request_is_well_formed() {
        assert_eq!(check(&request(&[]), false), Ok(RequestHead::default()));
        let head = check(&request(&[("content-length", "42")]), false).unwrap();
        assert_eq!(head.content_length, Some(42));
    }

    #[test]
    fn each_rule_of_section_8_is_enforced() {
        let cases: &[(&[(&str, &str)], Malformed)] = &[
            (&[("X-Upper", "1")], Malformed::BadName),
            (&[("bad name", "1")], Malformed::BadName),
            (&[("x", "a\r\nb")], Malformed::BadValue),
            (&[("x", " padded")], Malformed::BadValue),
            (&[("x", "nul\0")], Malformed::BadValue),
            (&[("connection", "close")], Malformed::ConnectionSpecific),
            (&[("keep-alive", "1")], Malformed::ConnectionSpecific),
            (&[("proxy-connection", "1")], Malformed::ConnectionSpecific),
            (
                &[("transfer-encoding", "chunked")],
                Malformed::ConnectionSpecific,
            ),
            (&[("upgrade", "h2c")], Malformed::ConnectionSpecific),
            (&[("te", "gzip")], Malformed::BadTe),
            (&[(":status", "200")], Malformed::PseudoAfterRegular),
            (&[("content-length", "x")], Malformed::BadContentLength),
            (
                &[("content-length", "1"), ("content-length", "2")],
                Malformed::BadContentLength,
            ),
        ];
        for (extra, want) in cases {
            assert_eq!(check(&request(extra), false), Err(*want), "{extra:?}");
        }
    }

    #[test]
    fn pseudo_headers_are_checked() {
        let mut r = request(&[]);
        r.insert(0, (b":status".to_vec(), b"200".to_vec()));
        assert_eq!(check(&r, false), Err(Malformed::UnknownPseudo));
        let mut r = request(&[]);
        r.insert(0, (b":path".to_vec(), b"/x".to_vec()));
        assert_eq!(check(&r, false), Err(Malformed::DuplicatePseudo));
        for missing in [":method", ":scheme", ":path"] {
            let r: Vec<_> = request(&[])
                .into_iter()
                .filter(|(n, _)| n != missing.as_bytes())
                .collect();
            assert_eq!(check(&r, false), Err(Malformed::MissingPseudo), "{missing}");
        }
        let mut r = request(&[]);
        r[2].1.clear();
        assert_eq!(check(&r, false), Err(Malformed::MissingPseudo));
        let connect = vec![
            (b":method".to_vec(), b"CONNECT".to_vec()),
            (b":authority".to_vec(), b"a:1".to_vec()),
        ];
        assert_eq!(check(&connect, false), Ok(RequestHead::default()));
        let mut c = connect.clone();
        c.push((b":path".to_vec(), b"/".to_vec()));
        assert_eq!(check(&c, false), Err(Malformed::BadConnect));
    }

    #[test]
    fn a_request_ended_by_its_headers_declares_no_body() {
        let r = request(&[("content-length", "5")]);
        assert_eq!(check(&r, true), Err(Malformed::ContentLengthMismatch));
        let r = request(&[("content-length", "0")]);
        assert!(check(&r, true).is_ok());
    }

    #[test]
    fn trailers_carry_no_pseudo_header() {
        let ok: [(&[u8], &[u8]); 1] = [(b"grpc-status", b"0")];
        assert_eq!(check_trailers(ok.into_iter()), Ok(()));
        let bad: [(&[u8], &[u8]); 1] = [(b":path", b"/")];
        assert_eq!(
            check_trailers(bad.into_iter()),
            Err(Malformed::PseudoInTrailers)
        );
        let bad: [(&[u8], &[u8]); 1] = [(b"Grpc-Status", b"0")];
        assert_eq!(check_trailers(bad.into_iter()), Err(Malformed::BadName));
    }
}
