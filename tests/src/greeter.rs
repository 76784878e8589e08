//! A real tonic greeter backend that reports which backend served each call.
//!
//! Knobs in the request (`sleep_ms`, `fail_code`, `count`, `payload`) make it slow, failing,
//! streaming or large. Request metadata named `x-echo-*` is echoed back in the response
//! headers, and, for failed calls, in the trailers. A unary call that carried a `grpc-timeout`
//! gets it back as `x-received-grpc-timeout` in the response headers, so tests can see what
//! deadline reached the backend.
//!
//! Per-backend [`Options`] (a delay on every call, a cap on concurrent streams, a share of
//! calls failed with a status and maybe `grpc-retry-pushback-ms`) and a graceful shutdown
//! ([`Handle::shutdown`]) shape a backend as a whole. A client-streaming call fails with the
//! `fail_code` of any of its messages once it read them all.
#![forbid(unsafe_code)]

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use futures_util::{Stream, StreamExt};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, Streaming, metadata::MetadataMap};

use crate::health_pb::{
    HealthCheckRequest, HealthCheckResponse,
    health_check_response::ServingStatus,
    health_server::{Health, HealthServer},
};
use crate::pb::{
    HelloReply, HelloRequest,
    greeter_server::{Greeter, GreeterServer},
};

/// The largest message the tests send (the issue asks for at least 4 MiB).
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// What a backend has seen.
#[derive(Debug, Default)]
pub struct Stats {
    /// Calls started.
    pub calls: AtomicU64,
    /// Calls in progress.
    pub in_flight: AtomicU64,
    /// Calls whose handler was dropped before it finished (the client cancelled).
    pub cancelled: AtomicU64,
    /// Messages of server-streaming and bidirectional calls handed to the transport.
    pub sent: AtomicU64,
    /// TCP connections accepted (by [`serve_with`] and [`spawn_with`]).
    pub connections: AtomicU64,
    /// When each unary call arrived, with its `grpc-previous-rpc-attempts` (0 if none).
    pub arrivals: std::sync::Mutex<Vec<(std::time::Instant, u32)>>,
    /// Unary calls failed by [`Options::fail_percent`].
    pub failed: AtomicU64,
}

/// The service.
#[derive(Debug, Clone)]
pub struct Backend {
    name: Arc<str>,
    stats: Arc<Stats>,
    delay: Duration,
    fail_code: i32,
    fail_percent: u32,
    pushback_ms: Option<String>,
}

/// How a whole backend behaves, set when it is spawned.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Every call waits this long before it is handled (a slow backend), ms.
    pub delay_ms: u64,
    /// SETTINGS_MAX_CONCURRENT_STREAMS the backend advertises; `None` for tonic's default.
    pub max_concurrent_streams: Option<u32>,
    /// Non-zero: every unary call fails at once with this gRPC status (a broken pod).
    pub fail_code: i32,
    /// A `grpc.health.v1.Health` service beside the greeter, switched by the test.
    pub health: Option<HealthControl>,
    /// With `fail_code`: only this share of unary calls fail, percent, drawn for each call
    /// (0: every call).
    pub fail_percent: u32,
    /// With `fail_code`: the failures carry `grpc-retry-pushback-ms` with this value.
    pub pushback_ms: Option<String>,
}

/// A `grpc.health.v1.Health` service whose answer the test switches
/// ([`HealthControl::set_serving`]), counting the `Watch` streams open and the `Check`s.
/// Clones share one state.
#[derive(Debug, Clone)]
pub struct HealthControl {
    inner: Arc<HealthInner>,
}

#[derive(Debug)]
struct HealthInner {
    status: tokio::sync::watch::Sender<i32>,
    watch: bool,
    watches_open: AtomicU64,
    watches_opened: AtomicU64,
    checks: AtomicU64,
}

impl HealthControl {
    /// SERVING at first; `watch: false` answers `Watch` with UNIMPLEMENTED (as servers that
    /// only have `Check` do).
    pub fn new(watch: bool) -> Self {
        Self {
            inner: Arc::new(HealthInner {
                status: tokio::sync::watch::Sender::new(ServingStatus::Serving as i32),
                watch,
                watches_open: AtomicU64::new(0),
                watches_opened: AtomicU64::new(0),
                checks: AtomicU64::new(0),
            }),
        }
    }

    /// Answers SERVING (`true`) or NOT_SERVING from now on; open `Watch` streams are told.
    pub fn set_serving(&self, serving: bool) {
        let s = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.inner.status.send_replace(s as i32);
    }

    /// `Watch` streams open now.
    pub fn watches_open(&self) -> u64 {
        self.inner.watches_open.load(Relaxed)
    }

    /// `Watch` streams opened so far.
    pub fn watches_opened(&self) -> u64 {
        self.inner.watches_opened.load(Relaxed)
    }

    /// `Check` calls so far.
    pub fn checks(&self) -> u64 {
        self.inner.checks.load(Relaxed)
    }
}

/// Counts a `Watch` stream open until dropped.
struct OpenWatch(Arc<HealthInner>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.watches_open.fetch_sub(1, Relaxed);
    }
}

type HealthStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for HealthControl {
    async fn check(
        &self,
        _req: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.checks.fetch_add(1, Relaxed);
        let status = *self.inner.status.borrow();
        Ok(Response::new(HealthCheckResponse { status }))
    }

    type WatchStream = HealthStream;

    async fn watch(
        &self,
        _req: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        if !self.inner.watch {
            return Err(Status::unimplemented("Watch"));
        }
        self.inner.watches_open.fetch_add(1, Relaxed);
        self.inner.watches_opened.fetch_add(1, Relaxed);
        let open = OpenWatch(self.inner.clone());
        let rx = self.inner.status.subscribe();
        let stream =
            futures_util::stream::unfold((rx, true, open), |(mut rx, first, open)| async move {
                if !first && rx.changed().await.is_err() {
                    return None;
                }
                let status = *rx.borrow_and_update();
                Some((Ok(HealthCheckResponse { status }), (rx, false, open)))
            });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Counts a call in flight, and as cancelled if dropped before [`CallGuard::done`].
struct CallGuard {
    stats: Arc<Stats>,
    done: bool,
}

impl CallGuard {
    fn new(stats: &Arc<Stats>) -> Self {
        stats.calls.fetch_add(1, Relaxed);
        stats.in_flight.fetch_add(1, Relaxed);
        Self {
            stats: stats.clone(),
            done: false,
        }
    }

    fn done(mut self) {
        self.done = true;
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Relaxed);
        if !self.done {
            self.stats.cancelled.fetch_add(1, Relaxed);
        }
    }
}

fn echo(from: &MetadataMap) -> MetadataMap {
    let mut out = MetadataMap::new();
    for kv in from.iter() {
        match kv {
            tonic::metadata::KeyAndValueRef::Ascii(k, v) if k.as_str().starts_with("x-echo-") => {
                out.insert(k.clone(), v.clone());
            }
            tonic::metadata::KeyAndValueRef::Binary(k, v) if k.as_str().starts_with("x-echo-") => {
                out.insert_bin(k.clone(), v.clone());
            }
            _ => {}
        }
    }
    out
}

impl Backend {
    /// Whether this unary call is one of those the backend fails (see [`Options`]).
    fn fails(&self) -> bool {
        if self.fail_code == 0 {
            return false;
        }
        if self.fail_percent == 0 {
            return true;
        }
        // splitmix64 over a process-wide counter: an even, independent draw per call.
        static DRAWS: AtomicU64 = AtomicU64::new(0);
        let n = DRAWS.fetch_add(1, Relaxed);
        let mut z = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        z % 100 < u64::from(self.fail_percent)
    }

    async fn delay(&self) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }

    fn reply(&self, req: &HelloRequest, index: u32) -> HelloReply {
        HelloReply {
            message: format!("Hello {} from {}", req.name, self.name),
            backend: self.name.to_string(),
            payload: req.payload.clone(),
            index,
        }
    }

    fn failure(req: &HelloRequest, md: &MetadataMap) -> Option<Status> {
        (req.fail_code != 0).then(|| {
            let mut s = Status::new(req.fail_code.into(), req.fail_message.clone());
            *s.metadata_mut() = echo(md);
            s
        })
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<HelloReply, Status>> + Send>>;

#[tonic::async_trait]
impl Greeter for Backend {
    async fn say_hello(&self, req: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        let guard = CallGuard::new(&self.stats);
        let previous = req
            .metadata()
            .get("grpc-previous-rpc-attempts")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        self.stats
            .arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((std::time::Instant::now(), previous));
        self.delay().await;
        let md = req.metadata().clone();
        let req = req.into_inner();
        if req.sleep_ms > 0 {
            tokio::time::sleep(Duration::from_millis(req.sleep_ms.into())).await;
        }
        guard.done();
        if self.fails() {
            self.stats.failed.fetch_add(1, Relaxed);
            let mut status = Status::new(self.fail_code.into(), format!("{} is broken", self.name));
            if let Some(ms) = &self.pushback_ms
                && let Ok(v) = ms.parse()
            {
                status.metadata_mut().insert("grpc-retry-pushback-ms", v);
            }
            return Err(status);
        }
        if let Some(s) = Self::failure(&req, &md) {
            return Err(s);
        }
        let mut resp = Response::new(self.reply(&req, 0));
        *resp.metadata_mut() = echo(&md);
        if let Some(t) = md.get("grpc-timeout") {
            resp.metadata_mut()
                .insert("x-received-grpc-timeout", t.clone());
        }
        Ok(resp)
    }

    type SayHelloStreamStream = ReplyStream;

    async fn say_hello_stream(
        &self,
        req: Request<HelloRequest>,
    ) -> Result<Response<Self::SayHelloStreamStream>, Status> {
        let guard = CallGuard::new(&self.stats);
        self.delay().await;
        let md = req.metadata().clone();
        let req = req.into_inner();
        let me = self.clone();
        let stream = async_stream(move |tx| async move {
            for i in 0..req.count {
                if req.sleep_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(req.sleep_ms.into())).await;
                }
                if tx.send(Ok(me.reply(&req, i))).await.is_err() {
                    return;
                }
                me.stats.sent.fetch_add(1, Relaxed);
            }
            if let Some(s) = Self::failure(&req, &md) {
                let _ = tx.send(Err(s)).await;
            }
            guard.done();
        });
        Ok(Response::new(stream))
    }

    async fn collect_hellos(
        &self,
        req: Request<Streaming<HelloRequest>>,
    ) -> Result<Response<HelloReply>, Status> {
        let guard = CallGuard::new(&self.stats);
        self.delay().await;
        let mut stream = req.into_inner();
        let mut names = Vec::new();
        let mut bytes = 0;
        let mut fail = 0;
        while let Some(m) = stream.next().await {
            let m = m?;
            bytes += m.payload.len();
            names.push(m.name);
            if m.fail_code != 0 {
                fail = m.fail_code;
            }
        }
        guard.done();
        if fail != 0 {
            return Err(Status::new(fail.into(), format!("{} failed it", self.name)));
        }
        Ok(Response::new(HelloReply {
            message: format!(
                "Hello {} from {} ({bytes} bytes)",
                names.join(","),
                self.name
            ),
            backend: self.name.to_string(),
            payload: Vec::new(),
            index: names.len() as u32,
        }))
    }

    type ChatStream = ReplyStream;

    async fn chat(
        &self,
        req: Request<Streaming<HelloRequest>>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        let guard = CallGuard::new(&self.stats);
        self.delay().await;
        let mut input = req.into_inner();
        let me = self.clone();
        let stream = async_stream(move |tx| async move {
            let mut i = 0;
            while let Some(m) = input.next().await {
                match m {
                    Ok(m) => {
                        if tx.send(Ok(me.reply(&m, i))).await.is_err() {
                            return;
                        }
                        me.stats.sent.fetch_add(1, Relaxed);
                        i += 1;
                    }
                    Err(_) => return,
                }
            }
            guard.done();
        });
        Ok(Response::new(stream))
    }
}

/// A stream fed by a task; the task ends when the receiver is dropped.
fn async_stream<F, Fut>(f: F) -> ReplyStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<HelloReply, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let task = tokio::spawn(f(tx));
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    // Abort the producer when the client goes away, so cancellation is observed.
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let guard = AbortOnDrop(task);
    Box::pin(stream.map(move |item| {
        let _ = &guard;
        item
    }))
}

/// A running in-process backend.
#[derive(Debug)]
pub struct Handle {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its name.
    pub name: String,
    /// What it has seen.
    pub stats: Arc<Stats>,
    /// Its health service, if it has one.
    pub health: Option<HealthControl>,
    task: tokio::task::JoinHandle<()>,
    shutdown: Arc<tokio::sync::Notify>,
}

impl Handle {
    /// Stops accepting new connections (existing ones are left to tonic).
    pub fn stop(&self) {
        self.task.abort();
    }

    /// Shuts down gracefully, as a pod does on SIGTERM: stops accepting, sends GOAWAY on every
    /// connection, lets the calls it accepted finish. Returns at once; [`Handle::is_finished`]
    /// tells when it is done.
    pub fn shutdown(&self) {
        self.shutdown.notify_one();
    }

    /// Whether the server has stopped.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The tonic service for a backend named `name`.
pub fn service(name: &str, stats: Arc<Stats>) -> GreeterServer<Backend> {
    service_with(name, stats, &Options::default())
}

/// The tonic service for a backend named `name` with `options`.
pub fn service_with(name: &str, stats: Arc<Stats>, options: &Options) -> GreeterServer<Backend> {
    GreeterServer::new(Backend {
        name: name.into(),
        stats,
        delay: Duration::from_millis(options.delay_ms),
        fail_code: options.fail_code,
        fail_percent: options.fail_percent,
        pushback_ms: options.pushback_ms.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE)
}

/// Serves a backend on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, name: String, stats: Arc<Stats>) {
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let _ = tonic::transport::Server::builder()
        .add_service(service(&name, stats))
        .serve_with_incoming(incoming)
        .await;
}

/// Serves a backend with `options` on `listener` until `shutdown` is notified (then
/// gracefully) or the task is dropped.
pub async fn serve_with(
    listener: TcpListener,
    name: String,
    stats: Arc<Stats>,
    options: Options,
    shutdown: Arc<tokio::sync::Notify>,
) {
    let counted = stats.clone();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).inspect(move |c| {
        if c.is_ok() {
            counted.connections.fetch_add(1, Relaxed);
        }
    });
    let _ = tonic::transport::Server::builder()
        .max_concurrent_streams(options.max_concurrent_streams)
        .add_optional_service(options.health.clone().map(HealthServer::new))
        .add_service(service_with(&name, stats, &options))
        .serve_with_incoming_shutdown(incoming, async move { shutdown.notified().await })
        .await;
}

/// Starts a backend named `name` on `addr` (use port 0 for any).
pub async fn spawn(addr: &str, name: &str) -> Handle {
    spawn_with(addr, name, Options::default()).await
}

/// Starts a backend named `name` on `addr` with `options`.
pub async fn spawn_with(addr: &str, name: &str, options: Options) -> Handle {
    let listener = TcpListener::bind(addr).await.expect("binding a backend");
    let addr = listener.local_addr().expect("local addr");
    let stats = Arc::new(Stats::default());
    let shutdown = Arc::new(tokio::sync::Notify::new());
    let health = options.health.clone();
    let task = tokio::spawn(serve_with(
        listener,
        name.to_string(),
        stats.clone(),
        options,
        shutdown.clone(),
    ));
    Handle {
        addr,
        name: name.into(),
        stats,
        health,
        task,
        shutdown,
    }
}
