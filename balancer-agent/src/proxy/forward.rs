//! One gRPC call, forwarded on its own.
//!
//! The path of a call (see ARCHITECTURE.md):
//! 1. resolve the service (connection target, `:authority`, listener default);
//! 2. pick an endpoint (the service's balancer) and lease a pooled connection to it; an
//!    endpoint that refuses the connection is avoided and another is picked, since no byte of
//!    the call has left the proxy yet;
//! 3. send the request headers (with `grpc-timeout` set to the time left), then pump the
//!    request body while waiting for the response headers;
//! 4. forward the response headers, then pump the response body and trailers while the
//!    request body keeps flowing (bidirectional streaming);
//! 5. at any point: the client resetting the stream cancels the upstream stream; the endpoint
//!    resetting it resets the client's with the same reason; the deadline ending answers
//!    DEADLINE_EXCEEDED; a lost endpoint connection answers UNAVAILABLE.
//!
//! A stream the endpoint refused without processing it (REFUSED_STREAM, or above a GOAWAY's
//! last stream id) is replayed on another endpoint when the request body received so far is
//! still held (at most [`REPLAY_LIMIT`] bytes, complete or not: a streaming call goes on
//! streaming after the replay), so an endpoint shutting down fails no call it had not
//! accepted.
//!
//! Failures the proxy meets itself are answered as trailers-only gRPC responses with a message
//! a person can act on (`grpc::Status`).
#![forbid(unsafe_code)]

use std::{future::poll_fn, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use h2::{RecvStream, SendStream, server::SendResponse};
use http::{HeaderValue, Request, Response};
use tokio::time::Instant;
use tracing::debug;

use super::{
    Proxy, Target,
    grpc::{self, Status},
    pump::{Pump, PumpError},
    registry::ConnInfo,
};
use crate::{balance::CallGuard, proxy::pool::Lease, state::Service};

/// Request bodies up to this size are kept until the response starts, to replay the call on
/// another endpoint if the first one refused the stream unprocessed.
pub const REPLAY_LIMIT: usize = 64 * 1024;
/// Endpoints tried for one call at most.
const MAX_ATTEMPTS: usize = 3;

/// How a call ended, for metrics.
enum End {
    /// The endpoint's (or the proxy's) grpc-status.
    Status(HeaderValue),
    /// The client went away or reset the stream.
    ClientCancelled,
    /// The endpoint reset the stream; the reset was passed to the client.
    Reset,
}

/// Serves one call. Never panics on client input; every exit answers or resets the stream.
pub async fn call(
    proxy: Arc<Proxy>,
    target: Arc<Target>,
    conn: Arc<ConnInfo>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let start = Instant::now();
    let registration = conn.start_call(request.uri().path_and_query());
    let active = proxy
        .active_calls
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    proxy.metrics.active_calls.inc();
    let snapshot = proxy.store.snapshot();
    let authority = request.uri().authority().map(|a| a.as_str());
    let service = target.resolve(&snapshot, authority).cloned();
    // A cheap clone (shared bytes), kept for the metrics once the request is consumed.
    let uri = request.uri().clone();
    let mut messages = (0, 0);

    let end = if active >= proxy.limits.max_active_calls {
        reply(
            &mut respond,
            Status::exhausted(format!(
                "proxy overloaded: {active} calls in flight (limits.max_active_calls)"
            )),
        )
    } else if let Some(service) = &service {
        let c = Call {
            service,
            call: &registration,
            messages: Default::default(),
        };
        let end = c.run(request, &mut respond).await;
        messages = (
            c.messages[0].load(std::sync::atomic::Ordering::Relaxed),
            c.messages[1].load(std::sync::atomic::Ordering::Relaxed),
        );
        end
    } else {
        let what = match (&*target, authority) {
            (Target::Vip(vip), _) => format!("no service has VIP {vip}"),
            (_, Some(a)) => format!("no service for authority {a:?} and no default service"),
            (_, None) => "no :authority and no default service".into(),
        };
        reply(&mut respond, Status::unavailable(what))
    };

    let status = match &end {
        End::Status(s) => s.to_str().unwrap_or("2"),
        End::ClientCancelled => "1",
        End::Reset => "reset",
    };
    proxy.metrics.record_call(
        service.as_deref(),
        uri.path(),
        status,
        start.elapsed(),
        messages,
    );
    proxy.metrics.active_calls.dec();
    proxy
        .active_calls
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
}

/// Answers the call with the proxy's own status, trailers-only.
fn reply(respond: &mut SendResponse<Bytes>, status: Status) -> End {
    debug!(code = ?status.code, message = %status.message, "call failed in the proxy");
    let _ = respond.send_response(status.trailers_only(), true);
    End::Status(status.code.header())
}

struct Call<'a> {
    service: &'a Arc<Service>,
    call: &'a super::registry::CallHandle,
    /// gRPC messages of the request and of the response, known when the call ends.
    messages: [std::sync::atomic::AtomicU64; 2],
}

/// An upstream stream that carries the call.
struct Upstream {
    guard: CallGuard,
    lease: Lease,
    response: h2::client::ResponseFuture,
    send: SendStream<Bytes>,
}

/// What the wait for the response headers produced.
enum Phase1 {
    Response(Response<RecvStream>),
    Done(End),
    /// The endpoint refused the stream unprocessed; the request may be replayed.
    Refused(h2::Error),
}

/// The request body seen so far, kept for a replay while it is small.
#[derive(Default)]
struct Replay {
    chunks: Vec<Bytes>,
    bytes: usize,
    overflowed: bool,
}

impl Replay {
    fn keep(&mut self, b: &Bytes) {
        if self.overflowed {
            return;
        }
        self.bytes += b.len();
        if self.bytes > REPLAY_LIMIT {
            self.overflowed = true;
            self.chunks = Vec::new();
        } else {
            self.chunks.push(b.clone());
        }
    }

    /// Sends the kept body on a new stream, ending it with the last chunk when `complete`. At
    /// most [`REPLAY_LIMIT`] bytes, which h2 buffers until the endpoint's window takes them.
    fn resend(&self, send: &mut SendStream<Bytes>, complete: bool) -> Result<(), h2::Error> {
        let n = self.chunks.len();
        for (i, c) in self.chunks.iter().enumerate() {
            send.send_data(c.clone(), complete && i + 1 == n)?;
        }
        Ok(())
    }
}

impl Call<'_> {
    async fn run(&self, request: Request<RecvStream>, respond: &mut SendResponse<Bytes>) -> End {
        let (parts, mut body) = request.into_parts();
        let deadline = parts
            .headers
            .get("grpc-timeout")
            .and_then(|v| grpc::parse_timeout(v.as_bytes()))
            .map(|t| Instant::now() + t);
        let mut head = Request::from_parts(parts, ());
        let mut pump = Pump::new(body.is_end_stream());
        let mut replay = Replay::default();
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last_error = String::new();

        loop {
            if tried.len() >= MAX_ATTEMPTS {
                return reply(respond, self.all_failed(&tried, &last_error));
            }
            let Some(guard) = self.service.balancer.pick(&tried) else {
                let status = if tried.is_empty() {
                    Status::unavailable(format!(
                        "service {} has no ready endpoint",
                        self.service.name
                    ))
                } else {
                    self.all_failed(&tried, &last_error)
                };
                return reply(respond, status);
            };
            let addr = guard.endpoint().addr;
            tried.push(addr);
            self.call.routed(&self.service.name, addr);
            if let Some(d) = deadline {
                head.headers_mut()
                    .insert("grpc-timeout", grpc::format_timeout(d - Instant::now()));
            }
            // The request body is either still to be streamed (first attempt, or a retry
            // before any byte went out), or kept for a replay (complete, or its start).
            let end_of_stream = pump.is_done() && replay.chunks.is_empty();
            let opening = async {
                match deadline {
                    Some(d) => tokio::time::timeout_at(d, self.open(guard, &head, end_of_stream))
                        .await
                        .unwrap_or(Err(OpenError::Deadline)),
                    None => self.open(guard, &head, end_of_stream).await,
                }
            };
            // A new connection's handshake can take a while: a client that resets the stream
            // meanwhile ends the call now, and the request DATA it sent goes back to its window.
            let opened = tokio::select! {
                opened = opening => opened,
                _ = poll_fn(|cx| respond.poll_reset(cx)) => return End::ClientCancelled,
            };
            let mut up = match opened {
                Ok(up) => up,
                Err(OpenError::Deadline) => {
                    return reply(respond, Status::deadline(self.deadline_message()));
                }
                Err(OpenError::Endpoint(e)) => {
                    debug!(endpoint = %addr, error = %e, "endpoint failed before the call was sent");
                    last_error = e;
                    continue;
                }
            };
            if !replay.chunks.is_empty()
                && let Err(e) = replay.resend(&mut up.send, pump.is_done())
            {
                up.lease.broken();
                last_error = format!("endpoint {addr}: cannot replay the call: {e}");
                continue;
            }

            let response = match self
                .phase1(
                    &mut up,
                    &mut body,
                    &mut pump,
                    &mut replay,
                    respond,
                    deadline,
                )
                .await
            {
                Phase1::Response(r) => r,
                Phase1::Done(end) => {
                    self.count_messages(&pump, None);
                    return end;
                }
                Phase1::Refused(e) => {
                    up.lease.broken();
                    // The endpoint processed nothing, so the call may go elsewhere if every
                    // byte sent so far can be sent again: nothing was sent, or the body so far
                    // is kept. It need not be complete: a streaming call whose first messages
                    // went to a refusing endpoint (one draining, say) replays them on the next
                    // and streams on from there, instead of failing.
                    let kept = !replay.overflowed && !pump.had_trailers;
                    if kept {
                        // The replay resends the chunk the pump was forwarding, whole.
                        pump.discard_pending(&mut body);
                    }
                    if kept || pump.bytes == 0 && !pump.is_done() {
                        debug!(endpoint = %addr, error = %e, "stream refused; replaying the call");
                        last_error = format!("endpoint {addr} refused the call: {e}");
                        continue;
                    }
                    return reply(
                        respond,
                        Status::unavailable(format!(
                            "endpoint {addr} refused the call after part of it was sent: {e}"
                        )),
                    );
                }
            };
            return self
                .phase2(up, response, body, pump, respond, deadline)
                .await;
        }
    }

    fn count_messages(&self, request: &Pump, response: Option<&Pump>) {
        use std::sync::atomic::Ordering::Relaxed;
        self.messages[0].store(request.messages.count, Relaxed);
        self.messages[1].store(response.map_or(0, |p| p.messages.count), Relaxed);
    }

    fn all_failed(&self, tried: &[SocketAddr], last_error: &str) -> Status {
        Status::unavailable(format!(
            "service {}: {} endpoint(s) tried, none took the call; last error: {last_error}",
            self.service.name,
            tried.len()
        ))
    }

    fn deadline_message(&self) -> String {
        format!(
            "deadline (grpc-timeout) exceeded in the proxy on the way to service {}",
            self.service.name
        )
    }

    /// Leases a connection to the picked endpoint and sends the request headers on it.
    async fn open(
        &self,
        guard: CallGuard,
        head: &Request<()>,
        end_of_stream: bool,
    ) -> Result<Upstream, OpenError> {
        let endpoint = guard.endpoint().clone();
        let lease = endpoint.pool.lease().await.map_err(|e| {
            endpoint.stats.connect_failed();
            OpenError::Endpoint(e.to_string())
        })?;
        let mut sender = lease.sender();
        let fail = |lease: &Lease, what: &str, e: h2::Error| {
            lease.broken();
            OpenError::Endpoint(format!("endpoint {}: {what}: {e}", endpoint.addr))
        };
        sender = match sender.ready().await {
            Ok(s) => s,
            Err(e) => return Err(fail(&lease, "connection unusable", e)),
        };
        let mut req = Request::new(());
        *req.method_mut() = head.method().clone();
        *req.uri_mut() = head.uri().clone();
        *req.headers_mut() = head.headers().clone();
        let (response, send) = match sender.send_request(req, end_of_stream) {
            Ok(r) => r,
            Err(e) => return Err(fail(&lease, "cannot open a stream", e)),
        };
        let mut guard = guard;
        guard.sent();
        Ok(Upstream {
            guard,
            lease,
            response,
            send,
        })
    }

    /// Pumps the request body until the response headers arrive.
    #[allow(clippy::too_many_arguments)]
    async fn phase1(
        &self,
        up: &mut Upstream,
        body: &mut RecvStream,
        pump: &mut Pump,
        replay: &mut Replay,
        respond: &mut SendResponse<Bytes>,
        deadline: Option<Instant>,
    ) -> Phase1 {
        let sleep = deadline.map(tokio::time::sleep_until);
        tokio::pin!(sleep);
        let addr = up.guard.endpoint().addr;
        loop {
            tokio::select! {
                biased;
                _ = poll_fn(|cx| respond.poll_reset(cx)) => return Phase1::Done(End::ClientCancelled),
                _ = async { sleep.as_mut().as_pin_mut().expect("guarded").await }, if deadline.is_some() => {
                    return Phase1::Done(reply(respond, Status::deadline(self.deadline_message())));
                }
                r = &mut up.response => match r {
                    Ok(response) => return Phase1::Response(response),
                    Err(e) if refused_unprocessed(&e) => return Phase1::Refused(e),
                    Err(e) => {
                        if let (Some(reason), true) = (e.reason(), e.is_reset() && e.is_remote()) {
                            respond.send_reset(reason);
                            return Phase1::Done(End::Reset);
                        }
                        up.lease.broken();
                        up.guard.failed();
                        return Phase1::Done(reply(respond, Status::unavailable(format!(
                            "endpoint {addr}: connection lost before the response: {e}"
                        ))));
                    }
                },
                r = poll_fn(|cx| pump.poll(cx, body, &mut up.send, &mut |b| replay.keep(b))), if !pump.is_done() => {
                    match r {
                        Ok(()) => {}
                        Err(PumpError::Recv(_)) => return Phase1::Done(End::ClientCancelled),
                        // The endpoint stopped reading the request: its response says why.
                        Err(PumpError::Send(_)) => {}
                    }
                }
            }
        }
    }

    /// Forwards the response while the request keeps flowing.
    async fn phase2(
        &self,
        mut up: Upstream,
        response: Response<RecvStream>,
        mut body: RecvStream,
        mut req_pump: Pump,
        respond: &mut SendResponse<Bytes>,
        deadline: Option<Instant>,
    ) -> End {
        up.guard.first_byte();
        let addr = up.guard.endpoint().addr;
        let (parts, mut up_body) = response.into_parts();
        let ended = up_body.is_end_stream();
        let headers_status = ended.then(|| parts.headers.get("grpc-status").cloned());
        let mut client = match respond.send_response(Response::from_parts(parts, ()), ended) {
            Ok(s) => s,
            Err(_) => {
                self.count_messages(&req_pump, None);
                return End::ClientCancelled;
            }
        };
        if let Some(status) = headers_status {
            self.count_messages(&req_pump, None);
            up.guard
                .answered(status.as_ref().map(HeaderValue::as_bytes));
            return End::Status(status.unwrap_or_else(|| HeaderValue::from_static("2")));
        }
        let mut resp_pump = Pump::new(false);
        let sleep = deadline.map(tokio::time::sleep_until);
        tokio::pin!(sleep);
        let end = loop {
            tokio::select! {
                biased;
                _ = async { sleep.as_mut().as_pin_mut().expect("guarded").await }, if deadline.is_some() => {
                    let status = Status::deadline(self.deadline_message());
                    let _ = client.send_trailers(status.trailers());
                    break End::Status(status.code.header());
                }
                r = poll_fn(|cx| resp_pump.poll(cx, &mut up_body, &mut client, &mut |_| {})) => match r {
                    Ok(()) => {
                        up.guard.answered(resp_pump.grpc_status.as_ref().map(HeaderValue::as_bytes));
                        break End::Status(
                            resp_pump.grpc_status.clone().unwrap_or_else(|| HeaderValue::from_static("0")),
                        );
                    }
                    Err(PumpError::Send(_)) => break End::ClientCancelled,
                    Err(PumpError::Recv(e)) => {
                        if let (Some(reason), true) = (e.reason(), e.is_reset() && e.is_remote()) {
                            client.send_reset(reason);
                            break End::Reset;
                        }
                        up.lease.broken();
                        up.guard.failed();
                        let status = Status::unavailable(format!(
                            "endpoint {addr}: connection lost during the response: {e}"
                        ));
                        let _ = client.send_trailers(status.trailers());
                        break End::Status(status.code.header());
                    }
                },
                r = poll_fn(|cx| req_pump.poll(cx, &mut body, &mut up.send, &mut |_| {})), if !req_pump.is_done() => {
                    match r {
                        Ok(()) => {}
                        Err(PumpError::Recv(_)) => break End::ClientCancelled,
                        Err(PumpError::Send(_)) => {
                            // The endpoint no longer reads the request; its response goes on.
                            req_pump.finish();
                        }
                    }
                }
            }
        };
        self.count_messages(&req_pump, Some(&resp_pump));
        end
    }
}

enum OpenError {
    Deadline,
    Endpoint(String),
}

/// The stream was refused before the endpoint processed it: RST_STREAM(REFUSED_STREAM), or a
/// GOAWAY whose last stream id is below this stream.
fn refused_unprocessed(e: &h2::Error) -> bool {
    e.reason() == Some(h2::Reason::REFUSED_STREAM) && e.is_remote()
        || e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR)
}
