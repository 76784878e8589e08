//! A call in flight through the relay: what its metrics and its endpoint's statistics need
//! when it ends. It lives on the endpoint side of the call (the endpoint's answer ends it).

use std::sync::Arc;

use tokio::time::Instant;

use crate::{
    balance::CallGuard,
    proxy::{Proxy, pump::MessageCounter, registry::CallHandle},
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
}

impl Call {
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
