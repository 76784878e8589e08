//! A call in flight through the relay: what its metrics and its endpoint's statistics need
//! when it ends. It lives on the endpoint side of the call (the endpoint's answer ends it).

use std::{net::SocketAddr, sync::Arc};

use bytes::BytesMut;
use tokio::time::Instant;

use super::conn::Fields;
use crate::{
    balance::CallGuard,
    proxy::{Proxy, grpc::MessageCounter, registry::CallHandle},
    state::Service,
};

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End<'a> {
    /// With this grpc-status (the endpoint's, or the proxy's own).
    Status(&'a str),
    /// The client went away or reset the stream.
    Cancelled,
    /// The endpoint reset the stream; the reset went to the client.
    Reset,
    /// The endpoint's connection was lost: UNAVAILABLE, and a failure of the endpoint.
    Lost,
}

#[derive(Debug)]
pub struct Call {
    pub proxy: Arc<Proxy>,
    pub service: Arc<Service>,
    pub path: http::uri::PathAndQuery,
    pub start: Instant,
    pub guard: CallGuard,
    pub registration: CallHandle,
    /// gRPC messages of the request and of the response.
    pub messages: [MessageCounter; 2],
    pub responded: bool,
    /// What it takes to send the call to another endpoint, until the response starts or the
    /// request outgrows [`REPLAY_LIMIT`].
    pub replay: Option<Box<Replay>>,
}

/// Request bodies up to this size are kept until the response starts, to replay the call on
/// another endpoint if the first one refused the stream unprocessed (REFUSED_STREAM, or above
/// a GOAWAY's last stream id).
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// A call's request as the client sent it so far, kept for a replay.
#[derive(Debug)]
pub struct Replay {
    /// The request headers.
    pub fields: Fields,
    /// The request DATA so far.
    pub data: BytesMut,
    /// The client ended the request.
    pub complete: bool,
    /// The call's deadline (`grpc-timeout`).
    pub deadline: Option<Instant>,
    /// Endpoints tried, in order.
    pub tried: Vec<SocketAddr>,
}

impl Call {
    /// Request DATA from the client: counted, and kept for a replay while it is small.
    pub fn request_data(&mut self, data: &[u8], end: bool) {
        self.messages[0].feed(data);
        if let Some(r) = self.replay.as_mut() {
            if r.data.len() + data.len() > REPLAY_LIMIT {
                self.replay = None;
            } else {
                r.data.extend_from_slice(data);
                r.complete = end;
            }
        }
    }

    /// Records the end of the call in the metrics and the endpoint's statistics.
    pub fn finish(self: Box<Self>, end: End<'_>) {
        let status = match end {
            End::Status(s) => {
                self.guard.answered(Some(s.as_bytes()));
                s
            }
            End::Cancelled => "1",
            End::Reset => "reset",
            End::Lost => {
                self.guard.failed();
                "14"
            }
        };
        self.proxy.metrics.record_call(
            Some(&self.service),
            self.path.path(),
            status,
            self.start.elapsed(),
            (self.messages[0].count, self.messages[1].count),
        );
        self.proxy.call_ended();
    }
}
