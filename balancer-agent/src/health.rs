//! Active gRPC health checks (`grpc.health.v1.Health`) of the endpoints of the services that
//! ask for them (`health_check` in the file, `balancer.dev/health-check: grpc` on a Service),
//! once per node: one checker per endpoint address, whatever the number of clients, each on
//! its own HTTP/2 connection (written with `wire`, no per-call machinery).
//!
//! A checker opens the streaming `Watch` and keeps it: the endpoint's answer is known the
//! instant it changes. Where `Watch` is UNIMPLEMENTED it polls `Check` every `interval`. What
//! it learns goes into the endpoint's statistics (`balance::Health`), which every pick reads:
//!
//! - NOT_SERVING (or SERVICE_UNKNOWN, UNKNOWN): out at once: no new call; calls in flight go on;
//! - no answer within `timeout`, a refused connection, an error status: one failed check;
//!   `unhealthy_threshold` in a row take it out (a `Watch` that breaks is opened again after
//!   `interval`, each failure counted);
//! - SERVING: back after `healthy_threshold` SERVING answers in a row (with `Watch`, after it
//!   stayed SERVING `healthy_threshold - 1` intervals), then warms up (slow start) if the
//!   service has a warm-up.
//!
//! An endpoint that no service checks any more is `Unchecked` again (takes calls). When two
//! services with checks share an endpoint address, the first by name sets its check.
//!
//! It never touches a client's connection or call: it only writes the endpoint's health.
#![forbid(unsafe_code)]

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use bytes::{Buf, BufMut, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};
use tracing::{debug, info};

use crate::{
    balance::{Endpoint, Health},
    config::HealthCheck,
    state::Store,
    wire::{
        frame::{self, Head, flag, kind, setting},
        hpack,
    },
};

/// Runs the checks the store's services ask for, following every change, until dropped.
pub async fn run(store: Arc<Store>) {
    let mut changed = store.subscribe();
    let mut checks: HashMap<SocketAddr, Checker> = HashMap::new();
    loop {
        let snap = store.snapshot();
        let mut wanted: HashMap<SocketAddr, (Arc<Endpoint>, HealthCheck)> = HashMap::new();
        for s in snap.services.values() {
            let Some(hc) = &s.spec.balancing.health_check else {
                continue;
            };
            for e in &s.endpoints {
                wanted
                    .entry(e.endpoint.addr)
                    .or_insert_with(|| (e.endpoint.clone(), hc.clone()));
            }
        }
        checks.retain(|addr, c| {
            let keep = wanted
                .get(addr)
                .is_some_and(|(e, hc)| Arc::ptr_eq(e, &c.endpoint) && *hc == c.check);
            if !keep {
                c.task.abort();
                c.endpoint.stats.set_health(Health::Unchecked);
            }
            keep
        });
        for (addr, (endpoint, check)) in wanted {
            checks.entry(addr).or_insert_with(|| {
                let task = tokio::spawn(check_endpoint(endpoint.clone(), check.clone()));
                Checker {
                    endpoint,
                    check,
                    task,
                }
            });
        }
        if changed.changed().await.is_err() {
            return;
        }
    }
}

struct Checker {
    endpoint: Arc<Endpoint>,
    check: HealthCheck,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `grpc.health.v1.HealthCheckResponse.ServingStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Serving {
    Serving,
    NotServing,
}

/// The counts behind an endpoint's health.
struct Tally<'a> {
    endpoint: &'a Endpoint,
    check: &'a HealthCheck,
    failures: u32,
    servings: u32,
}

impl Tally<'_> {
    fn set(&self, h: Health) {
        let before = self.endpoint.stats.health();
        if before != h {
            info!(endpoint = %self.endpoint.addr, from = before.as_str(), to = h.as_str(), "health check");
            self.endpoint.stats.set_health(h);
        }
    }

    fn answer(&mut self, s: Serving) {
        self.failures = 0;
        match s {
            Serving::NotServing => {
                self.servings = 0;
                self.set(Health::NotServing);
            }
            Serving::Serving => {
                self.servings += 1;
                // An endpoint never seen out needs no threshold to be counted in.
                if self.servings >= self.check.healthy_threshold
                    || self.endpoint.stats.health() != Health::NotServing
                {
                    self.set(Health::Serving);
                }
            }
        }
    }

    fn failed(&mut self, why: &str) {
        self.servings = 0;
        self.failures += 1;
        debug!(endpoint = %self.endpoint.addr, failures = self.failures, "health check failed: {why}");
        if self.failures >= self.check.unhealthy_threshold {
            self.set(Health::NotServing);
        }
    }
}

/// Checks one endpoint for as long as the task lives.
async fn check_endpoint(endpoint: Arc<Endpoint>, check: HealthCheck) {
    let mut t = Tally {
        endpoint: &endpoint,
        check: &check,
        failures: 0,
        servings: 0,
    };
    let mut watch = true;
    loop {
        let started = Instant::now();
        if watch {
            match watch_once(&mut t).await {
                Ok(()) => {}
                Err(Ended::Unimplemented) => {
                    debug!(endpoint = %endpoint.addr, "Watch is unimplemented: polling Check");
                    watch = false;
                    continue;
                }
                Err(Ended::Failed(why)) => t.failed(&why),
            }
        } else {
            match check_once(&endpoint, &check).await {
                Ok(s) => t.answer(s),
                Err(Ended::Unimplemented) => t.failed("Check is unimplemented"),
                Err(Ended::Failed(why)) => t.failed(&why),
            }
        }
        tokio::time::sleep_until(started + check.interval).await;
    }
}

/// Why a health call ended without an answer.
enum Ended {
    Unimplemented,
    Failed(String),
}

/// Opens `Watch` and follows it until it breaks. A SERVING answer counts once, then once more
/// for each interval it stays so, up to the healthy threshold.
async fn watch_once(t: &mut Tally<'_>) -> Result<(), Ended> {
    let check = t.check;
    let mut conn = Conn::open(t.endpoint.addr, check.timeout).await?;
    let sid = conn.request("/grpc.health.v1.Health/Watch", &check.service)?;
    let mut current = None;
    let mut deadline = Instant::now() + check.timeout;
    loop {
        let next = match current {
            // Waiting for the first answer: within the timeout.
            None => timeout_at_or(deadline, conn.next(sid)).await,
            // SERVING and not yet counted in: one more count per interval.
            Some(Serving::Serving) if t.servings < check.healthy_threshold => {
                match tokio::time::timeout(check.interval, conn.next(sid)).await {
                    Ok(r) => r,
                    Err(_) => {
                        t.answer(Serving::Serving);
                        continue;
                    }
                }
            }
            Some(_) => conn.next(sid).await,
        };
        match next? {
            Some(s) => {
                current = Some(s);
                t.answer(s);
                deadline = Instant::now() + check.timeout;
            }
            None => return Err(Ended::Failed("the Watch stream ended".into())),
        }
    }
}

async fn timeout_at_or<T>(
    deadline: Instant,
    f: impl Future<Output = Result<T, Ended>>,
) -> Result<T, Ended> {
    tokio::time::timeout_at(deadline, f)
        .await
        .unwrap_or_else(|_| Err(Ended::Failed("no answer within the timeout".into())))
}

/// One `Check`.
async fn check_once(endpoint: &Endpoint, check: &HealthCheck) -> Result<Serving, Ended> {
    let deadline = Instant::now() + check.timeout;
    timeout_at_or(deadline, async {
        let mut conn = Conn::open(endpoint.addr, check.timeout).await?;
        let sid = conn.request("/grpc.health.v1.Health/Check", &check.service)?;
        conn.next(sid)
            .await?
            .ok_or_else(|| Ended::Failed("Check ended without an answer".into()))
    })
    .await
}

/// A minimal HTTP/2 client connection for health calls: one stream at a time, windows
/// granted back as DATA arrives.
struct Conn {
    io: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    decoder: hpack::Decoder,
    encoder: hpack::Encoder,
    authority: String,
    /// gRPC message bytes of the current stream not yet whole.
    message: BytesMut,
    /// A header block in assembly (HEADERS then CONTINUATION).
    block: Option<(BytesMut, bool)>,
}

const MAX_FRAME: usize = frame::DEFAULT_MAX_FRAME as usize;
const TABLE: usize = 4096;

impl Conn {
    async fn open(addr: SocketAddr, within: Duration) -> Result<Self, Ended> {
        let io = tokio::time::timeout(within, TcpStream::connect(addr))
            .await
            .map_err(|_| Ended::Failed(format!("connect timed out after {within:?}")))?
            .map_err(|e| Ended::Failed(format!("connect: {e}")))?;
        let _ = io.set_nodelay(true);
        let mut wbuf = BytesMut::with_capacity(256);
        wbuf.put_slice(frame::PREFACE);
        frame::settings(&mut wbuf, &[(setting::ENABLE_PUSH, 0)]);
        Ok(Self {
            io,
            rbuf: BytesMut::with_capacity(MAX_FRAME + frame::HEADER_LEN),
            wbuf,
            decoder: hpack::Decoder::new(TABLE),
            encoder: hpack::Encoder::new(TABLE),
            authority: addr.to_string(),
            message: BytesMut::new(),
            block: None,
        })
    }

    /// Sends a unary-request call to `path` asking about `service`; returns its stream id.
    fn request(&mut self, path: &str, service: &str) -> Result<u32, Ended> {
        let sid = 1;
        let mut block = BytesMut::with_capacity(128);
        self.encoder.begin(&mut block);
        for (n, v) in [
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", path.as_bytes()),
            (b":authority", self.authority.as_bytes()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ] {
            self.encoder.field(n, v, &mut block);
        }
        frame::headers(&mut self.wbuf, sid, &block, false, MAX_FRAME);
        let mut msg = BytesMut::with_capacity(8 + service.len());
        // HealthCheckRequest { string service = 1; }, in a gRPC message frame.
        let mut body = BytesMut::new();
        if !service.is_empty() {
            body.put_u8(0x0a);
            put_varint(&mut body, service.len() as u64);
            body.put_slice(service.as_bytes());
        }
        msg.put_u8(0);
        msg.put_u32(body.len() as u32);
        msg.put_slice(&body);
        frame::data(&mut self.wbuf, sid, &msg, true, MAX_FRAME);
        Ok(sid)
    }

    async fn flush(&mut self) -> Result<(), Ended> {
        if !self.wbuf.is_empty() {
            self.io
                .write_all(&self.wbuf)
                .await
                .map_err(|e| Ended::Failed(format!("write: {e}")))?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// The next answer on stream `sid`; `None` when the stream ended OK without one more.
    async fn next(&mut self, sid: u32) -> Result<Option<Serving>, Ended> {
        loop {
            if let Some(s) = self.take_message()? {
                return Ok(Some(s));
            }
            self.flush().await?;
            while self.rbuf.len() < frame::HEADER_LEN
                || self.rbuf.len() < frame::HEADER_LEN + Head::parse(&self.rbuf).len
            {
                if self.rbuf.len() >= frame::HEADER_LEN && Head::parse(&self.rbuf).len > MAX_FRAME {
                    return Err(Ended::Failed("a frame over the maximum size".into()));
                }
                let n = self
                    .io
                    .read_buf(&mut self.rbuf)
                    .await
                    .map_err(|e| Ended::Failed(format!("read: {e}")))?;
                if n == 0 {
                    return Err(Ended::Failed("the endpoint closed the connection".into()));
                }
            }
            let head = Head::parse(&self.rbuf);
            self.rbuf.advance(frame::HEADER_LEN);
            let payload = self.rbuf.split_to(head.len);
            if let Some(end) = self.frame(head, &payload, sid)? {
                return end;
            }
        }
    }

    /// Handles one frame; `Some` when the stream ended.
    #[allow(clippy::type_complexity)]
    fn frame(
        &mut self,
        head: Head,
        payload: &[u8],
        sid: u32,
    ) -> Result<Option<Result<Option<Serving>, Ended>>, Ended> {
        match head.kind {
            kind::SETTINGS if head.flags & flag::ACK == 0 => frame::settings_ack(&mut self.wbuf),
            kind::PING if head.flags & flag::ACK == 0 && payload.len() == 8 => {
                let mut p = [0u8; 8];
                p.copy_from_slice(payload);
                frame::ping(&mut self.wbuf, true, p);
            }
            kind::GOAWAY => return Err(Ended::Failed("the endpoint sent GOAWAY".into())),
            kind::RST_STREAM if head.stream == sid => {
                return Err(Ended::Failed("the endpoint reset the health call".into()));
            }
            kind::DATA if head.stream == sid => {
                let data = unpadded(head.flags, payload)?;
                self.message.extend_from_slice(data);
                if !payload.is_empty() {
                    frame::window_update(&mut self.wbuf, 0, payload.len() as u32);
                    frame::window_update(&mut self.wbuf, sid, payload.len() as u32);
                }
                if head.flags & flag::END_STREAM != 0 {
                    return Ok(Some(Err(Ended::Failed(
                        "the health call ended without a status".into(),
                    ))));
                }
            }
            kind::HEADERS | kind::CONTINUATION if head.stream == sid => {
                let (mut block, end_stream) = if head.kind == kind::HEADERS {
                    let mut data = unpadded(head.flags, payload)?;
                    if head.flags & flag::PRIORITY != 0 {
                        data = data.get(5..).ok_or_else(|| bad("HEADERS"))?;
                    }
                    (BytesMut::from(data), head.flags & flag::END_STREAM != 0)
                } else {
                    let (mut b, e) = self.block.take().ok_or_else(|| bad("CONTINUATION"))?;
                    b.extend_from_slice(payload);
                    (b, e)
                };
                if head.flags & flag::END_HEADERS == 0 {
                    self.block = Some((block, end_stream));
                    return Ok(None);
                }
                let mut status = None;
                let mut http = None;
                self.decoder
                    .decode(&block.split(), 16 * 1024, &mut |n, v| match n {
                        b"grpc-status" => status = std::str::from_utf8(v).ok().map(str::to_owned),
                        b":status" => http = Some(v.to_vec()),
                        _ => {}
                    })
                    .map_err(|e| Ended::Failed(format!("HPACK: {e}")))?;
                if http.as_deref().is_some_and(|s| s != b"200") {
                    return Err(Ended::Failed(format!(
                        "HTTP status {}",
                        String::from_utf8_lossy(http.as_deref().unwrap_or_default())
                    )));
                }
                if let Some(s) = status {
                    return Ok(Some(match s.as_str() {
                        "0" => match self.take_message()? {
                            Some(answer) => Ok(Some(answer)),
                            None => Ok(None),
                        },
                        "12" => Err(Ended::Unimplemented),
                        // NOT_FOUND: the server does not know the service asked about.
                        "5" => Ok(Some(Serving::NotServing)),
                        other => Err(Ended::Failed(format!("grpc-status {other}"))),
                    }));
                }
                if end_stream {
                    return Ok(Some(Err(Ended::Failed("no grpc-status".into()))));
                }
            }
            _ => {}
        }
        Ok(None)
    }

    /// A whole `HealthCheckResponse` from the stream's DATA, if one is there.
    fn take_message(&mut self) -> Result<Option<Serving>, Ended> {
        if self.message.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([
            self.message[1],
            self.message[2],
            self.message[3],
            self.message[4],
        ]) as usize;
        if self.message[0] != 0 {
            return Err(Ended::Failed("a compressed health answer".into()));
        }
        if len > 1024 {
            return Err(Ended::Failed("a health answer over 1 KiB".into()));
        }
        if self.message.len() < 5 + len {
            return Ok(None);
        }
        self.message.advance(5);
        let body = self.message.split_to(len);
        Ok(Some(serving(&body)))
    }
}

fn bad(what: &str) -> Ended {
    Ended::Failed(format!("a malformed {what} frame"))
}

fn unpadded(flags: u8, payload: &[u8]) -> Result<&[u8], Ended> {
    if flags & flag::PADDED == 0 {
        return Ok(payload);
    }
    let pad = usize::from(*payload.first().ok_or_else(|| bad("padded"))?);
    payload
        .get(
            1..payload
                .len()
                .checked_sub(pad)
                .ok_or_else(|| bad("padded"))?,
        )
        .ok_or_else(|| bad("padded"))
}

/// `HealthCheckResponse { ServingStatus status = 1; }`: SERVING is 1; UNKNOWN (0, or no
/// field), NOT_SERVING (2) and SERVICE_UNKNOWN (3) take the endpoint out.
fn serving(body: &[u8]) -> Serving {
    let mut pos = 0;
    let mut status = 0;
    while pos < body.len() {
        let Some(tag) = varint(body, &mut pos) else {
            break;
        };
        match (tag >> 3, tag & 7) {
            (1, 0) => match varint(body, &mut pos) {
                Some(v) => status = v,
                None => break,
            },
            (_, 0) => {
                if varint(body, &mut pos).is_none() {
                    break;
                }
            }
            (_, 2) => match varint(body, &mut pos) {
                Some(l) => pos = pos.saturating_add(l as usize),
                None => break,
            },
            _ => break,
        }
    }
    if status == 1 {
        Serving::Serving
    } else {
        Serving::NotServing
    }
}

fn varint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos)?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn put_varint(dst: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        dst.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    dst.put_u8(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_status_is_read_from_the_message() {
        assert_eq!(serving(&[0x08, 0x01]), Serving::Serving);
        assert_eq!(serving(&[0x08, 0x02]), Serving::NotServing);
        assert_eq!(serving(&[]), Serving::NotServing, "UNKNOWN");
        // An unknown field first.
        assert_eq!(serving(&[0x12, 0x01, 0x41, 0x08, 0x01]), Serving::Serving);
        let mut b = BytesMut::new();
        put_varint(&mut b, 300);
        let mut pos = 0;
        assert_eq!(varint(&b, &mut pos), Some(300));
    }
}
