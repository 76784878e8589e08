//! balancer-agent: the node agent of balancer.
//!
//! One module per concern (see ARCHITECTURE.md for the picture):
//! - [`config`]: the configuration file, its validation and defaults.
//! - [`state`]: the service/endpoint store (specs and statistics, no sockets); immutable
//!   snapshots swapped atomically.
//! - [`discovery`]: what feeds the store (the static file, the Kubernetes API).
//! - [`balance`]: per-call endpoint choice (P2C over peak-EWMA, least-request, round-robin)
//!   over the endpoints and their statistics.
//! - [`call`]: every rule about a call, without I/O (service, admission, pick, replay,
//!   deadline, the proxy's own gRPC answers, accounting), gRPC statuses and timeouts, the
//!   registry of connections and calls.
//! - [`relay`]: the HTTP/2 engine, a frame relay that sends each call to its own endpoint and
//!   asks [`call`] what to do with it, and the endpoint pools (one shard per endpoint and
//!   worker); [`wire`]: the HTTP/2 frames, HPACK and message rules.
//! - [`proxy`]: the front door: listeners, protocol detection, plain TCP relay, draining.
//! - [`metrics`]: Prometheus metrics; [`admin`]: the localhost admin server.
//! - [`ebpf`]: loading, attaching and talking to the kernel programs.
//! - [`workers`]: the data plane's single-threaded runtimes, one per core.
//! - [`netns`]: network namespaces: endpoint connections made from the client pod's address.
//! - [`app`]: wiring it all together; [`cli`]: the command line; [`inspect`]: the CLI client
//!   of the admin API.
pub mod admin;
pub mod app;
pub mod balance;
pub mod call;
pub mod cli;
pub mod config;
pub mod discovery;
pub mod ebpf;
pub mod health;
pub mod inspect;
pub mod metrics;
pub mod netns;
pub mod proxy;
pub mod relay;
pub mod state;
pub mod wire;
pub mod workers;
