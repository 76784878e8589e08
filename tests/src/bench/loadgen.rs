//! The load generator: a raw HTTP/2 client (h2) that keeps N unary `SayHello` calls in flight
//! over one connection (or one connection per backend for the direct baseline), and records
//! when each call ended and how long it took.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::{BufMut, Bytes, BytesMut};
use h2::client::SendRequest;
use http::{Request, Uri, header::CONTENT_TYPE};
use prost::Message;
use tokio::net::TcpStream;

use crate::pb::HelloRequest;

const PATH: &str = "/helloworld.Greeter/SayHello";

/// One gRPC message frame: the 5-byte prefix and a `HelloRequest`.
fn request_body() -> Bytes {
    let msg = HelloRequest {
        name: "bench".into(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.put_slice(&msg);
    b.freeze()
}

/// An HTTP/2 connection, driven by a task of its own.
async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Bytes>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .handshake::<_, Bytes>(tcp)
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// Why a call failed.
#[derive(Debug)]
enum CallError {
    /// The connection cannot take streams any more.
    Connection(String),
    /// The call got an answer other than OK, or its stream failed.
    Call(String),
}

async fn call(
    send: &SendRequest<Bytes>,
    uri: &Uri,
    headers: &[(&'static str, &'static str)],
    body: &Bytes,
) -> Result<(), CallError> {
    let mut send = send
        .clone()
        .ready()
        .await
        .map_err(|e| CallError::Connection(e.to_string()))?;
    let mut req = Request::post(uri.clone())
        .header(CONTENT_TYPE, "application/grpc")
        .header("te", "trailers");
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let req = req.body(()).expect("a valid request");
    let (response, mut stream) = send
        .send_request(req, false)
        .map_err(|e| CallError::Connection(e.to_string()))?;
    stream
        .send_data(body.clone(), true)
        .map_err(|e| CallError::Call(e.to_string()))?;
    let response = response.await.map_err(|e| CallError::Call(e.to_string()))?;
    if response.status() != 200 {
        return Err(CallError::Call(format!("HTTP {}", response.status())));
    }
    let (parts, mut body) = response.into_parts();
    if let Some(s) = parts.headers.get("grpc-status") {
        // Trailers-only: never OK for SayHello.
        return Err(CallError::Call(format!(
            "grpc-status {s:?} (trailers-only)"
        )));
    }
    let mut got = 0;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| CallError::Call(e.to_string()))?;
        got += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body
        .trailers()
        .await
        .map_err(|e| CallError::Call(e.to_string()))?;
    match trailers.as_ref().and_then(|t| t.get("grpc-status")) {
        Some(s) if s == "0" && got > 5 => Ok(()),
        other => Err(CallError::Call(format!(
            "grpc-status {other:?}, {got} body bytes"
        ))),
    }
}

/// What one run measured.
#[derive(Debug, Default)]
pub struct Samples {
    /// (end of the call, latency) of each successful call.
    pub calls: Vec<(Instant, Duration)>,
    /// Failed calls, with the first few messages.
    pub errors: u64,
    /// The first error messages.
    pub first_errors: Vec<String>,
}

/// Keeps `concurrency` calls in flight until `until`, over one connection to each address
/// (calls spread round robin over the connections by their worker index), each call with
/// `headers` too.
pub async fn run(
    addrs: &[SocketAddr],
    authority: &str,
    headers: &'static [(&'static str, &'static str)],
    concurrency: usize,
    until: Instant,
) -> anyhow::Result<Samples> {
    let mut conns = Vec::new();
    for a in addrs {
        conns.push(connect(*a).await?);
    }
    let body = request_body();
    let uri: Uri = format!("http://{authority}{PATH}").parse()?;
    let mut tasks = Vec::with_capacity(concurrency);
    for i in 0..concurrency {
        let send = conns[i % conns.len()].clone();
        let body = body.clone();
        let uri = uri.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = Samples::default();
            while Instant::now() < until {
                let start = Instant::now();
                match call(&send, &uri, headers, &body).await {
                    Ok(()) => {
                        let end = Instant::now();
                        s.calls.push((end, end - start));
                    }
                    Err(e) => {
                        s.errors += 1;
                        let (broken, message) = match e {
                            CallError::Connection(m) => (true, format!("connection: {m}")),
                            CallError::Call(m) => (false, m),
                        };
                        if s.first_errors.len() < 3 {
                            s.first_errors.push(message);
                        }
                        if broken {
                            // Broken connection: stop this worker rather than spin.
                            break;
                        }
                    }
                }
            }
            s
        }));
    }
    let mut all = Samples::default();
    for t in tasks {
        let s = t.await?;
        all.calls.extend(s.calls);
        all.errors += s.errors;
        for e in s.first_errors {
            if all.first_errors.len() < 3 {
                all.first_errors.push(e);
            }
        }
    }
    Ok(all)
}
