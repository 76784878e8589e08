//! The agent's configuration: one [`Config`], read from a YAML file, validated as a whole, and
//! typed: addresses are `SocketAddr`s, policies and modes enums, times `Duration`s. The rest of
//! the agent reads the typed values and parses nothing again.
//!
//! Loading never stops at the first problem: [`Config::from_yaml`] returns every problem it
//! finds, each with its place in the file (a YAML line and column for syntax errors, a field
//! path such as `services[1].endpoints[0].address` for invalid values). It reads the file in
//! two steps for that: first as written (`raw`: strings where the typed configuration has
//! addresses and enums, so that no wrong value stops the reading), then into the typed
//! [`Config`], field by field, listing each value that does not convert. A caller that already
//! runs a configuration keeps it when a new one is refused (see `discovery::file`), and a
//! reload puts in force only the sections that can change live ([`Config::reload`],
//! [`Section::live`]).
//!
//! The typed configuration serializes to the same field names and shapes as the file
//! (addresses as `IP:port` strings, times as `*_ms` integers): that is `/config_dump`, and it
//! loads again as the same configuration.
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    path::PathBuf,
    time::Duration,
};

use serde::{Deserialize, Serialize, Serializer};

pub mod resilience;
pub mod routes;
pub use routes::RoutesConfig;
pub mod balancing;
pub use balancing::{
    Balancing, Distribute, Failover, HealthCheck, LocalityConfig, LocalityLb, TrafficDistribution,
};

/// Every problem found in a configuration file.
#[derive(Debug, thiserror::Error)]
pub struct Error {
    /// Where the configuration came from (a file path, or `<inline>`).
    pub source_name: String,
    /// One entry per problem: `place: what is wrong`.
    pub problems: Vec<String>,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} problem{}",
            self.source_name,
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// The whole configuration, validated. Every field of the file has a default, so an empty
/// section (or file) takes the defaults; a file needs at least one listener.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Config {
    /// Where client connections are accepted.
    pub listeners: Vec<ListenerConfig>,
    /// The services and their endpoints, when they come from this file.
    pub services: Vec<ServiceConfig>,
    /// Traffic policy: per service, its subsets and routes ([`routes`]).
    pub routes: Vec<RoutesConfig>,
    /// The admin server (readiness, metrics, config dump, inspect API).
    pub admin: AdminConfig,
    /// Limits on what one client connection may do.
    pub limits: Limits,
    /// Connections to endpoints.
    pub pool: PoolConfig,
    /// The eBPF datapath (transparent redirect). Off unless enabled.
    pub datapath: DatapathConfig,
    /// Where this agent runs, for the services that prefer endpoints by locality.
    pub locality: LocalityConfig,
}

/// A listening socket for client connections.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ListenerConfig {
    /// A name for logs and metrics. Default `outbound`.
    pub name: String,
    /// Where to listen. Default `127.0.0.1:15001`.
    pub address: SocketAddr,
    /// The service for connections and calls that match no VIP and no authority.
    pub default_service: Option<String>,
}

/// A field the agent no longer has. It reads any value, so that loading can refuse it with the
/// reason, where serde's unknown-field error would only list the fields there are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// The file names the field.
    pub set: bool,
}

impl<'de> Deserialize<'de> for Removed {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d)?;
        Ok(Self { set: true })
    }
}

/// A gRPC service: the names and addresses that mean it, and where its calls go.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ServiceConfig {
    /// Unique name, e.g. `greeter.default`.
    pub name: String,
    /// `:authority` values (host, or host:port) that select this service.
    pub authorities: Vec<String>,
    /// `VIP:port` pairs that select this service (the original destination of a redirected
    /// connection).
    pub vips: Vec<SocketAddr>,
    /// How its calls are balanced. Default `p2c-ewma`.
    pub policy: Policy,
    /// The endpoints.
    pub endpoints: Vec<EndpointConfig>,
    /// A headless Service balanced per call: a connect to one of its endpoints' addresses from
    /// an opted-in pod is redirected like a connect to a VIP. Default false.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub headless: bool,
    /// Hash header, locality, warm-up, health checks ([`Balancing`]).
    #[serde(flatten)]
    pub balancing: Balancing,
}

impl ServiceConfig {
    /// The addresses whose connects select this service: its VIPs, and for a headless service
    /// its endpoints' addresses.
    pub fn selecting_addresses(&self) -> Vec<SocketAddr> {
        let mut all = self.vips.clone();
        if self.headless {
            all.extend(self.endpoints.iter().map(|e| e.address));
        }
        all
    }
}

/// One endpoint of a service.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct EndpointConfig {
    /// Where it listens.
    pub address: SocketAddr,
    /// Topology zone, informational.
    pub zone: Option<String>,
    /// Node name, informational.
    pub node: Option<String>,
    /// A name for logs (e.g. the pod name).
    pub name: Option<String>,
    /// Labels, for subsets to select it by (`routes[].subsets[].labels`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// The admin server.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct AdminConfig {
    /// Where it listens. Default `127.0.0.1:15000`. Must be a loopback address.
    pub address: SocketAddr,
}

/// Limits against abusive or broken clients. Each is enforced per client connection unless
/// it says otherwise. A reload puts them in force for connections accepted from then on
/// (a connection keeps the limits it was accepted under: its SETTINGS told the client so);
/// `max_active_calls`, `max_connections` and `max_methods_per_service` apply at once.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// SETTINGS_MAX_CONCURRENT_STREAMS advertised to clients. Default 1000.
    pub max_concurrent_streams: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE, bytes. Default 16 KiB.
    pub max_header_list_size: u32,
    /// SETTINGS_MAX_FRAME_SIZE, bytes. Default 16 KiB (the protocol minimum).
    pub max_frame_size: u32,
    /// Initial stream flow-control window, bytes. Default 1 MiB.
    pub initial_stream_window: u32,
    /// Initial connection flow-control window, bytes. Default 4 MiB.
    pub initial_connection_window: u32,
    /// The client connection's write buffer, bytes: DATA beyond it waits (its sender gets no
    /// window back), and a client that makes the proxy write past it without reading is not
    /// read until it reads. Default 1 MiB.
    pub max_send_buffer: usize,
    /// Response bytes the proxy holds for one client connection, waiting for the client's
    /// windows or its reading, across all its streams; a client that leaves more unread loses
    /// its connection (ENHANCE_YOUR_CALM). Each stream holds at most `pool.initial_stream_window`
    /// (its endpoint gets no window back meanwhile). Default 32 MiB.
    pub max_connection_buffer: usize,
    /// Streams a client may reset before they are accepted (rapid-reset protection). Default 20.
    pub max_pending_accept_reset_streams: usize,
    /// Stream errors a client may cause before its connection is closed. Default 1024.
    pub max_local_error_reset_streams: usize,
    /// Removed with the h2 engine, its only user. Refused when set.
    #[serde(skip_serializing)]
    pub max_concurrent_reset_streams: Removed,
    /// Calls in flight across all clients; above it, RESOURCE_EXHAUSTED. Default 100000.
    pub max_active_calls: usize,
    /// Client connections at once; above it, new ones are closed. Default 20000.
    pub max_connections: usize,
    /// Interval of keepalive PINGs to idle clients (`keepalive_interval_ms`); zero disables.
    /// Default 20 s.
    #[serde(rename = "keepalive_interval_ms", with = "millis")]
    pub keepalive_interval: Duration,
    /// A PING unanswered this long closes the connection (`keepalive_timeout_ms`). Default
    /// 10 s.
    #[serde(rename = "keepalive_timeout_ms", with = "millis")]
    pub keepalive_timeout: Duration,
    /// Time a new connection has to show whether it speaks HTTP/2
    /// (`protocol_detect_timeout_ms`). A connection silent for this long is forwarded as plain
    /// TCP. Default 1 s.
    #[serde(rename = "protocol_detect_timeout_ms", with = "millis")]
    pub protocol_detect_timeout: Duration,
    /// Distinct method labels per service in metrics; more are counted as `other`. Default 200.
    pub max_methods_per_service: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 1000,
            max_header_list_size: 16 * 1024,
            max_frame_size: 16 * 1024,
            initial_stream_window: 1024 * 1024,
            initial_connection_window: 4 * 1024 * 1024,
            max_send_buffer: 1024 * 1024,
            max_connection_buffer: 32 * 1024 * 1024,
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 1024,
            max_concurrent_reset_streams: Removed::default(),
            max_active_calls: 100_000,
            max_connections: 20_000,
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            protocol_detect_timeout: Duration::from_secs(1),
            max_methods_per_service: 200,
        }
    }
}

/// Upstream connection pools, one per endpoint. A reload puts them in force at once for
/// leases (connections per endpoint, age, calls per connection) and balancing (backoff,
/// outlier detection); what is fixed per connection (windows, keepalive, idle timeout) applies
/// to connections opened from then on.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// TCP connect plus HTTP/2 handshake timeout (`connect_timeout_ms`). Default 1 s.
    #[serde(rename = "connect_timeout_ms", with = "millis")]
    pub connect_timeout: Duration,
    /// A connection without calls for this long is closed (`idle_timeout_ms`); zero: never.
    /// Default 60 s.
    #[serde(rename = "idle_timeout_ms", with = "millis")]
    pub idle_timeout: Duration,
    /// A connection older than this takes no new calls (`max_connection_age_ms`); zero
    /// disables. Default 300 s, so long-lived connections never pin the load.
    #[serde(rename = "max_connection_age_ms", with = "millis")]
    pub max_connection_age: Duration,
    /// A connection that carried this many calls takes no new ones; 0 disables. Default 0.
    pub max_calls_per_connection: u64,
    /// Connections per endpoint at most, for each data-plane worker (each keeps its own pool
    /// shard). Default 8.
    pub max_connections_per_endpoint: usize,
    /// Interval of keepalive PINGs on pooled connections (`keepalive_interval_ms`); zero
    /// disables. Default 30 s.
    #[serde(rename = "keepalive_interval_ms", with = "millis")]
    pub keepalive_interval: Duration,
    /// A PING unanswered this long closes the pooled connection (`keepalive_timeout_ms`).
    /// Default 10 s.
    #[serde(rename = "keepalive_timeout_ms", with = "millis")]
    pub keepalive_timeout: Duration,
    /// An endpoint that refused a connection is avoided for this long (`failure_backoff_ms`).
    /// Default 1 s.
    #[serde(rename = "failure_backoff_ms", with = "millis")]
    pub failure_backoff: Duration,
    /// Initial stream window towards endpoints, bytes. Default 1 MiB.
    pub initial_stream_window: u32,
    /// Initial connection window towards endpoints, bytes. Default 4 MiB.
    pub initial_connection_window: u32,
    /// Ejection of endpoints whose calls keep failing.
    pub outlier_detection: OutlierDetection,
}

/// Outlier detection (linkerd's failure accrual, Istio's `outlierDetection`): an endpoint whose
/// last calls all failed with a transport failure or a gRPC status that says the server is
/// broken (UNKNOWN, INTERNAL, UNAVAILABLE, DATA_LOSS) takes no new calls for a while.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierDetection {
    /// Calls in a row that must fail to eject an endpoint; 0 disables. Default 7.
    pub consecutive_failures: u32,
    /// How long the first ejection lasts (`base_ejection_ms`); each ejection in a row (no
    /// success between) doubles it. Default 1 s.
    #[serde(rename = "base_ejection_ms", with = "millis")]
    pub base_ejection: Duration,
    /// The longest ejection (`max_ejection_ms`). Default 60 s.
    #[serde(rename = "max_ejection_ms", with = "millis")]
    pub max_ejection: Duration,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_failures: 7,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(60),
        }
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            max_connection_age: Duration::from_secs(300),
            max_calls_per_connection: 0,
            max_connections_per_endpoint: 8,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            failure_backoff: Duration::from_secs(1),
            initial_stream_window: 1024 * 1024,
            initial_connection_window: 4 * 1024 * 1024,
            outlier_detection: OutlierDetection::default(),
        }
    }
}

/// The eBPF datapath. An empty string in the file is `None` here, and `None` is written back
/// as an empty string.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DatapathConfig {
    /// Load and attach the kernel programs. Default false (standalone proxy).
    pub enabled: bool,
    /// The cgroup v2 directory to attach at; `None` (empty): the cgroup v2 mount point.
    #[serde(serialize_with = "empty_if_none")]
    pub cgroup_root: Option<PathBuf>,
    /// The node address pods are redirected to (an IPv4 `IP:port` of a listener reachable
    /// from pods); needed when enabled.
    #[serde(serialize_with = "empty_if_none")]
    pub proxy_address: Option<SocketAddrV4>,
    /// The node address pods' connects to IPv6 VIPs are redirected to (an IPv6 `[IP]:port` of
    /// a listener); `None` (empty, the default): IPv6 VIPs are left alone.
    #[serde(serialize_with = "empty_if_none")]
    pub proxy_address_v6: Option<SocketAddrV6>,
    /// The same-node `sk_msg` shortcut. Default `auto`.
    pub shortcut: Shortcut,
    /// Directory under the bpffs where maps are pinned; `None` (empty): nothing is pinned.
    /// Default `/sys/fs/bpf/balancer`.
    #[serde(serialize_with = "empty_if_none")]
    pub pin_path: Option<PathBuf>,
    /// Cgroup paths (relative to `cgroup_root`) of pods that opted in, when not from Kubernetes.
    pub opted_in_cgroups: Vec<String>,
    /// The source address of the agent's connections to endpoints for redirected calls.
    /// Default `pod`.
    pub source_address: SourceAddress,
    /// Where the host's processes are (`/proc`, or the host's `/proc` mounted in the agent's
    /// container): the client pod's network namespace is found there. Default `/proc`.
    pub proc_root: PathBuf,
}

/// The source address of the agent's connections to endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceAddress {
    /// The client pod's address: connections are made in the pod's network namespace, pooled
    /// per client pod (NetworkPolicies and backends see the real client). The node's address
    /// where the pod's namespace cannot be had (say so in the log).
    #[default]
    Pod,
    /// The node's address: connections are pooled per endpoint, shared by every client.
    Node,
}

impl SourceAddress {
    /// Parses the configuration spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pod" => Some(Self::Pod),
            "node" => Some(Self::Node),
            _ => None,
        }
    }
}

/// The same-node `sk_msg` shortcut of the datapath.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shortcut {
    /// On if the self-test at load passes.
    #[default]
    Auto,
    /// On even if the self-test fails.
    On,
    /// Off.
    Off,
}

impl Shortcut {
    /// Parses the configuration spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "on" => Some(Self::On),
            "off" => Some(Self::Off),
            _ => None,
        }
    }
}

/// Balancing policy of a service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Power of two choices over peak-EWMA latency times outstanding calls.
    #[default]
    P2cEwma,
    /// The endpoint with the fewest calls in flight.
    LeastRequest,
    /// Each endpoint in turn.
    RoundRobin,
    /// Consistent hashing of a request header (`hash_header`) over a ring of the endpoints.
    RingHash,
}

impl Policy {
    /// Parses the configuration spelling (also that of the `balancer.dev/policy` annotation).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "p2c-ewma" | "p2c" => Some(Self::P2cEwma),
            "least-request" => Some(Self::LeastRequest),
            "round-robin" => Some(Self::RoundRobin),
            "ring-hash" => Some(Self::RingHash),
            _ => None,
        }
    }

    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::P2cEwma => "p2c-ewma",
            Self::LeastRequest => "least-request",
            Self::RoundRobin => "round-robin",
            Self::RingHash => "ring-hash",
        }
    }
}

impl Config {
    /// Parses and validates YAML text. `source_name` names it in errors. `${VAR}` is replaced
    /// by the environment variable VAR first (a DaemonSet passes the node's IP that way); an
    /// unset variable is a problem.
    pub fn from_yaml(text: &str, source_name: &str) -> Result<Self, Error> {
        let fail = |problems| Error {
            source_name: source_name.to_string(),
            problems,
        };
        let text = &expand_env(text, |v| std::env::var(v).ok()).map_err(fail)?;
        let file: raw::Config = if text.trim().is_empty() {
            raw::Config::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| {
                let place = e
                    .location()
                    .map(|l| format!("line {}, column {}", l.line(), l.column()))
                    .unwrap_or_else(|| "document".into());
                fail(vec![format!("{place}: {e}")])
            })?
        };
        file.typed().map_err(fail)
    }

    /// Reads, parses and validates a file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error {
            source_name: path.display().to_string(),
            problems: vec![format!("cannot read the file: {e}")],
        })?;
        Self::from_yaml(&text, &path.display().to_string())
    }

    /// Every problem of this configuration, each with the path of the field, as if it were
    /// written to a file and loaded: none for one that [`Config::from_yaml`] returned. For a
    /// configuration put together in code (a reload's sections, tests).
    pub fn problems(&self) -> Vec<String> {
        match serde_json::to_value(self).and_then(raw::Config::deserialize) {
            Ok(file) => file.typed().err().unwrap_or_default(),
            Err(e) => vec![format!("document: {e}")],
        }
    }

    /// What reloading `file` (valid on its own) does over this configuration, the one in
    /// force: the file's sections that can change live are put in force; a section that needs
    /// a restart and changed keeps the value in force and is listed, so that the configuration
    /// returned is exactly what runs. Refused, with the problems, when the file's sections do
    /// not fit the ones kept (a listener in force whose `default_service` the file removed).
    pub fn reload(&self, file: Config) -> Result<Reload, Vec<String>> {
        let mut in_force = file;
        let mut applied = Vec::new();
        let mut restart_required = Vec::new();
        for section in Section::ALL {
            if !section.differs(self, &in_force) {
                continue;
            }
            if section.live() {
                applied.push(section);
            } else {
                section.keep(self, &mut in_force);
                restart_required.push(section);
            }
        }
        let problems = in_force.problems();
        if !problems.is_empty() {
            let kept = Section::join(&restart_required);
            return Err(problems
                .into_iter()
                .map(|p| format!("{p} (with the {kept} in force until a restart)"))
                .collect());
        }
        Ok(Reload {
            in_force,
            applied,
            restart_required,
        })
    }
}

/// A section of the configuration file, as a reload sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// `listeners`: bound at start.
    Listeners,
    /// `services`: live.
    Services,
    /// `routes`: live.
    Routes,
    /// `admin`: bound at start.
    Admin,
    /// `limits`: live, for connections accepted from then on.
    Limits,
    /// `pool`: live (see [`PoolConfig`]).
    Pool,
    /// `datapath`: loaded at start.
    Datapath,
    /// `locality`: live.
    Locality,
}

impl Section {
    /// Every section, in the file's order.
    pub const ALL: [Self; 8] = [
        Self::Listeners,
        Self::Services,
        Self::Routes,
        Self::Admin,
        Self::Limits,
        Self::Pool,
        Self::Datapath,
        Self::Locality,
    ];

    /// Its name in the file.
    pub fn name(self) -> &'static str {
        match self {
            Self::Listeners => "listeners",
            Self::Services => "services",
            Self::Routes => "routes",
            Self::Admin => "admin",
            Self::Limits => "limits",
            Self::Pool => "pool",
            Self::Datapath => "datapath",
            Self::Locality => "locality",
        }
    }

    /// Section names joined for a log line: `listeners, admin`.
    pub fn join(sections: &[Self]) -> String {
        sections
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A reload puts it in force (true); otherwise it is used once at start (sockets bound,
    /// kernel programs loaded), and a change waits for a restart.
    pub fn live(self) -> bool {
        matches!(
            self,
            Self::Services | Self::Routes | Self::Limits | Self::Pool | Self::Locality
        )
    }

    fn differs(self, a: &Config, b: &Config) -> bool {
        match self {
            Self::Listeners => a.listeners != b.listeners,
            Self::Services => a.services != b.services,
            Self::Routes => a.routes != b.routes,
            Self::Admin => a.admin != b.admin,
            Self::Limits => a.limits != b.limits,
            Self::Pool => a.pool != b.pool,
            Self::Datapath => a.datapath != b.datapath,
            Self::Locality => a.locality != b.locality,
        }
    }

    /// Copies this section of `from` into `into`.
    fn keep(self, from: &Config, into: &mut Config) {
        match self {
            Self::Listeners => into.listeners = from.listeners.clone(),
            Self::Services => into.services = from.services.clone(),
            Self::Routes => into.routes = from.routes.clone(),
            Self::Admin => into.admin = from.admin.clone(),
            Self::Limits => into.limits = from.limits.clone(),
            Self::Pool => into.pool = from.pool.clone(),
            Self::Datapath => into.datapath = from.datapath.clone(),
            Self::Locality => into.locality = from.locality.clone(),
        }
    }
}

/// What a reload does ([`Config::reload`]).
#[derive(Debug)]
pub struct Reload {
    /// The configuration in force from now on: the file's live sections, and the sections
    /// that need a restart as they were.
    pub in_force: Config,
    /// Live sections the file changed, now in force.
    pub applied: Vec<Section>,
    /// Sections the file changed that wait for a restart: their file values are not in force.
    pub restart_required: Vec<Section>,
}

/// The file as written, before it is typed: strings where [`Config`] has addresses, policies
/// and enums, so that reading never stops at a wrong value and [`Config::from_yaml`] can name
/// each one with its place. The same defaults as the typed configuration.
mod raw {
    use serde::Deserialize;

    use super::{Limits, PoolConfig, Removed, RoutesConfig};

    #[derive(Debug, Default, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub(super) struct Config {
        pub(super) listeners: Vec<Listener>,
        pub(super) services: Vec<Service>,
        pub(super) routes: Vec<RoutesConfig>,
        pub(super) admin: Admin,
        pub(super) limits: Limits,
        pub(super) pool: PoolConfig,
        pub(super) datapath: Datapath,
        pub(super) locality: super::LocalityConfig,
    }

    #[derive(Debug, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub(super) struct Listener {
        pub(super) name: String,
        pub(super) address: String,
        pub(super) default_service: Option<String>,
        /// Removed with the h2 engine: the frame relay is the only engine. Refused when set.
        pub(super) engine: Removed,
    }

    impl Default for Listener {
        fn default() -> Self {
            Self {
                name: "outbound".into(),
                address: "127.0.0.1:15001".into(),
                default_service: None,
                engine: Removed::default(),
            }
        }
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub(super) struct Service {
        pub(super) name: String,
        pub(super) authorities: Vec<String>,
        pub(super) vips: Vec<String>,
        pub(super) policy: Option<String>,
        pub(super) endpoints: Vec<Endpoint>,
        pub(super) headless: bool,
        pub(super) hash_header: Option<String>,
        pub(super) traffic_distribution: Option<String>,
        pub(super) locality_lb: super::LocalityLb,
        pub(super) warmup_ms: u64,
        pub(super) health_check: Option<super::HealthCheck>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub(super) struct Endpoint {
        pub(super) address: String,
        pub(super) zone: Option<String>,
        pub(super) node: Option<String>,
        pub(super) name: Option<String>,
        pub(super) labels: std::collections::BTreeMap<String, String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub(super) struct Admin {
        pub(super) address: String,
    }

    impl Default for Admin {
        fn default() -> Self {
            Self {
                address: "127.0.0.1:15000".into(),
            }
        }
    }

    #[derive(Debug, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub(super) struct Datapath {
        pub(super) enabled: bool,
        pub(super) cgroup_root: String,
        pub(super) proxy_address: String,
        pub(super) proxy_address_v6: String,
        pub(super) shortcut: String,
        pub(super) pin_path: String,
        pub(super) opted_in_cgroups: Vec<String>,
        pub(super) source_address: String,
        pub(super) proc_root: String,
    }

    impl Default for Datapath {
        fn default() -> Self {
            Self {
                enabled: false,
                cgroup_root: String::new(),
                proxy_address: String::new(),
                proxy_address_v6: String::new(),
                shortcut: "auto".into(),
                pin_path: "/sys/fs/bpf/balancer".into(),
                opted_in_cgroups: Vec::new(),
                source_address: "pod".into(),
                proc_root: "/proc".into(),
            }
        }
    }
}

/// `text` as an `IP:port`; otherwise a problem at `at`.
fn socket_addr(at: &str, text: &str, p: &mut Vec<String>) -> Option<SocketAddr> {
    let addr = text.parse().ok();
    if addr.is_none() {
        p.push(format!("{at}: {text:?} is not an IP:port"));
    }
    addr
}

/// A path; empty is `None`.
fn path(text: String) -> Option<PathBuf> {
    (!text.is_empty()).then(|| PathBuf::from(text))
}

/// Where a value the file got wrong stands while the rest is read: a configuration with a
/// problem is never returned.
const NOWHERE: SocketAddr = SocketAddr::V4(SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0));

impl raw::Config {
    /// The typed configuration, or every problem, each with the path of its field.
    fn typed(self) -> Result<Config, Vec<String>> {
        let mut p = Vec::new();
        let mut names = HashSet::new();
        let mut vips = HashSet::new();
        let mut authorities = HashSet::new();
        let mut services = Vec::with_capacity(self.services.len());
        for (i, s) in self.services.into_iter().enumerate() {
            let at = format!("services[{i}]");
            if s.name.is_empty() {
                p.push(format!("{at}.name: must not be empty"));
            } else if !names.insert(s.name.clone()) {
                p.push(format!("{at}.name: {:?} is defined twice", s.name));
            }
            let policy = match s.policy.as_deref().map(|t| (t, Policy::parse(t))) {
                None => Policy::default(),
                Some((_, Some(policy))) => policy,
                Some((t, None)) => {
                    p.push(format!(
                        "{at}.policy: {t:?} is not one of p2c-ewma, least-request, round-robin, ring-hash"
                    ));
                    Policy::default()
                }
            };
            let mut typed_vips = Vec::with_capacity(s.vips.len());
            for (j, v) in s.vips.iter().enumerate() {
                let Some(addr) = socket_addr(&format!("{at}.vips[{j}]"), v, &mut p) else {
                    continue;
                };
                if !vips.insert(addr) {
                    p.push(format!(
                        "{at}.vips[{j}]: {v} belongs to another service too"
                    ));
                }
                typed_vips.push(addr);
            }
            for (j, a) in s.authorities.iter().enumerate() {
                if a.is_empty() || a.contains(['/', ' ']) {
                    p.push(format!(
                        "{at}.authorities[{j}]: {a:?} is not a host or host:port"
                    ));
                } else if !authorities.insert(a.to_ascii_lowercase()) {
                    p.push(format!(
                        "{at}.authorities[{j}]: {a:?} belongs to another service too"
                    ));
                }
            }
            let mut endpoints = Vec::with_capacity(s.endpoints.len());
            for (j, e) in s.endpoints.into_iter().enumerate() {
                let at = format!("{at}.endpoints[{j}].address");
                if let Some(address) = socket_addr(&at, &e.address, &mut p) {
                    endpoints.push(EndpointConfig {
                        address,
                        zone: e.zone,
                        node: e.node,
                        name: e.name,
                        labels: e.labels,
                    });
                }
            }
            let balancing = balancing::RawBalancing {
                hash_header: s.hash_header,
                traffic_distribution: s.traffic_distribution,
                locality_lb: s.locality_lb,
                warmup_ms: s.warmup_ms,
                health_check: s.health_check,
            }
            .typed(&at, &mut p);
            services.push(ServiceConfig {
                balancing,
                name: s.name,
                authorities: s.authorities,
                vips: typed_vips,
                policy,
                endpoints,
                headless: s.headless,
            });
        }
        routes::problems(&self.routes, &mut p);
        if self.listeners.is_empty() {
            p.push("listeners: at least one listener is needed".into());
        }
        let mut listen = HashSet::new();
        let mut listeners = Vec::with_capacity(self.listeners.len());
        for (i, l) in self.listeners.into_iter().enumerate() {
            let at = format!("listeners[{i}]");
            let address = socket_addr(&format!("{at}.address"), &l.address, &mut p);
            if let Some(a) = address
                && !listen.insert(a)
            {
                p.push(format!("{at}.address: {} is used twice", l.address));
            }
            if let Some(d) = &l.default_service
                && !names.contains(d)
            {
                p.push(format!("{at}.default_service: no service is named {d:?}"));
            }
            if l.engine.set {
                p.push(format!(
                    "{at}.engine: the h2 engine was removed; the frame relay is the only engine, delete this field"
                ));
            }
            listeners.push(ListenerConfig {
                name: l.name,
                address: address.unwrap_or(NOWHERE),
                default_service: l.default_service,
            });
        }
        let admin = socket_addr("admin.address", &self.admin.address, &mut p);
        if let Some(a) = admin
            && !a.ip().is_loopback()
        {
            p.push(format!(
                "admin.address: {a} is not a loopback address; the admin API stays on the node"
            ));
        }
        let l = &self.limits;
        if l.max_concurrent_reset_streams.set {
            p.push(
                "limits.max_concurrent_reset_streams: only the h2 engine used it and the h2 engine was removed; delete this field".into(),
            );
        }
        if !(16_384..=16_777_215).contains(&l.max_frame_size) {
            p.push(format!(
                "limits.max_frame_size: {} is outside 16384..=16777215",
                l.max_frame_size
            ));
        }
        if l.initial_stream_window == 0 || l.initial_stream_window > i32::MAX as u32 {
            p.push(format!(
                "limits.initial_stream_window: {} is outside 1..=2147483647",
                l.initial_stream_window
            ));
        }
        if l.max_concurrent_streams == 0 {
            p.push("limits.max_concurrent_streams: must be at least 1".into());
        }
        if self.pool.max_connections_per_endpoint == 0 {
            p.push("pool.max_connections_per_endpoint: must be at least 1".into());
        }
        let o = &self.pool.outlier_detection;
        if o.consecutive_failures > 0 && o.base_ejection.is_zero() {
            p.push("pool.outlier_detection.base_ejection_ms: must be at least 1 (or set consecutive_failures to 0 to disable)".into());
        }
        if o.consecutive_failures > 0 && o.max_ejection < o.base_ejection {
            p.push(format!(
                "pool.outlier_detection.max_ejection_ms: {} is below base_ejection_ms {}",
                o.max_ejection.as_millis(),
                o.base_ejection.as_millis()
            ));
        }
        if self.pool.connect_timeout.is_zero() {
            p.push("pool.connect_timeout_ms: must be at least 1".into());
        }
        let d = self.datapath;
        let shortcut = Shortcut::parse(&d.shortcut).unwrap_or_else(|| {
            p.push(format!(
                "datapath.shortcut: {:?} is not one of auto, on, off",
                d.shortcut
            ));
            Shortcut::default()
        });
        let source_address = SourceAddress::parse(&d.source_address).unwrap_or_else(|| {
            p.push(format!(
                "datapath.source_address: {:?} is not one of pod, node",
                d.source_address
            ));
            SourceAddress::default()
        });
        let proxy_address = match d.proxy_address.parse() {
            Ok(SocketAddr::V4(a)) => Some(a),
            _ if d.enabled => {
                p.push(format!(
                    "datapath.proxy_address: {:?} is not an IPv4 IP:port (needed when datapath.enabled)",
                    d.proxy_address
                ));
                None
            }
            _ if d.proxy_address.is_empty() => None,
            _ => {
                p.push(format!(
                    "datapath.proxy_address: {:?} is not an IPv4 IP:port",
                    d.proxy_address
                ));
                None
            }
        };
        let proxy_address_v6 = match d.proxy_address_v6.parse() {
            Ok(SocketAddr::V6(a)) => Some(a),
            _ if d.proxy_address_v6.is_empty() => None,
            _ => {
                p.push(format!(
                    "datapath.proxy_address_v6: {:?} is not an IPv6 [IP]:port",
                    d.proxy_address_v6
                ));
                None
            }
        };
        if !p.is_empty() {
            return Err(p);
        }
        Ok(Config {
            listeners,
            services,
            routes: self.routes,
            admin: AdminConfig {
                address: admin.unwrap_or(NOWHERE),
            },
            limits: self.limits,
            pool: self.pool,
            datapath: DatapathConfig {
                enabled: d.enabled,
                cgroup_root: path(d.cgroup_root),
                proxy_address,
                proxy_address_v6,
                shortcut,
                pin_path: path(d.pin_path),
                opted_in_cgroups: d.opted_in_cgroups,
                source_address,
                proc_root: PathBuf::from(d.proc_root),
            },
            locality: self.locality,
        })
    }
}

/// Durations written as whole milliseconds (the `*_ms` fields): plain integers read best in a
/// file.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// `None` written as an empty string, as the file says "none" (see [`DatapathConfig`]).
fn empty_if_none<T: Serialize, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => v.serialize(s),
        None => s.serialize_str(""),
    }
}

/// Replaces every `${NAME}` with `lookup(NAME)`; lists every unset name.
fn expand_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, Vec<String>> {
    let mut out = String::with_capacity(text.len());
    let mut problems = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let name = &after[..end];
        let line = text[..text.len() - rest.len() + start]
            .matches('\n')
            .count()
            + 1;
        match lookup(name) {
            Some(v) => out.push_str(&v),
            None => problems.push(format!(
                "line {line}: environment variable {name} (written ${{{name}}}) is not set"
            )),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listeners:
  - address: 127.0.0.1:15001
    default_service: greeter
services:
  - name: greeter
    authorities: [greeter.default.svc.cluster.local]
    vips: ["10.96.0.10:50051"]
    policy: round-robin
    endpoints:
      - address: 127.0.0.1:50051
      - address: 127.0.0.1:50052
"#;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_a_good_file() {
        let c = Config::from_yaml(GOOD, "good.yaml").unwrap();
        assert_eq!(c.services[0].policy, Policy::RoundRobin);
        assert_eq!(c.services[0].endpoints.len(), 2);
        assert_eq!(c.limits, Limits::default());
    }

    #[test]
    fn values_are_typed_once_with_their_defaults() {
        let c = Config::from_yaml(
            &format!(
                "{GOOD}  - name: other\n    endpoints:\n      - address: \"[::1]:9000\"\n        zone: z1\n\
                 pool:\n  connect_timeout_ms: 250\n  outlier_detection:\n    max_ejection_ms: 5000\n\
                 limits:\n  keepalive_interval_ms: 0\n\
                 datapath:\n  proxy_address: 10.0.0.5:15001\n  shortcut: \"off\"\n  pin_path: \"\"\n"
            ),
            "typed.yaml",
        )
        .unwrap();
        assert_eq!(c.listeners[0].address, addr("127.0.0.1:15001"));
        assert_eq!(c.listeners[0].name, "outbound");
        assert_eq!(c.admin.address, addr("127.0.0.1:15000"));
        let greeter = &c.services[0];
        assert_eq!(greeter.vips, [addr("10.96.0.10:50051")]);
        assert_eq!(greeter.endpoints[1].address, addr("127.0.0.1:50052"));
        let other = &c.services[1];
        assert_eq!(other.policy, Policy::P2cEwma, "the default policy");
        assert_eq!(other.endpoints[0].address, addr("[::1]:9000"));
        assert_eq!(other.endpoints[0].zone.as_deref(), Some("z1"));
        assert_eq!(c.pool.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.pool.idle_timeout, Duration::from_secs(60));
        assert_eq!(
            c.pool.outlier_detection.max_ejection,
            Duration::from_secs(5)
        );
        assert!(c.limits.keepalive_interval.is_zero());
        let d = &c.datapath;
        assert_eq!(d.proxy_address, Some("10.0.0.5:15001".parse().unwrap()));
        assert_eq!((d.shortcut, d.cgroup_root.as_ref()), (Shortcut::Off, None));
        assert_eq!(d.pin_path, None, "empty: nothing pinned");
        let default = Config::from_yaml("listeners: [{}]\n", "d.yaml").unwrap();
        assert_eq!(default.datapath.shortcut, Shortcut::Auto);
        assert_eq!(
            default.datapath.pin_path,
            Some(PathBuf::from("/sys/fs/bpf/balancer"))
        );
        assert_eq!(default.datapath.proxy_address, None);
    }

    #[test]
    fn the_dump_has_the_files_names_and_shapes_and_loads_again() {
        let c = Config::from_yaml(
            &format!("{GOOD}datapath:\n  cgroup_root: /sys/fs/cgroup/pods\n"),
            "good.yaml",
        )
        .unwrap();
        let dump = serde_json::to_value(&c).unwrap();
        assert_eq!(dump["listeners"][0]["address"], "127.0.0.1:15001");
        assert_eq!(dump["services"][0]["vips"][0], "10.96.0.10:50051");
        assert_eq!(
            dump["services"][0]["endpoints"][0]["address"],
            "127.0.0.1:50051"
        );
        assert_eq!(dump["services"][0]["policy"], "round-robin");
        assert_eq!(dump["admin"]["address"], "127.0.0.1:15000");
        assert_eq!(dump["pool"]["connect_timeout_ms"], 1000);
        assert_eq!(dump["pool"]["outlier_detection"]["base_ejection_ms"], 1000);
        assert_eq!(dump["limits"]["protocol_detect_timeout_ms"], 1000);
        assert_eq!(dump["datapath"]["proxy_address"], "");
        assert_eq!(dump["datapath"]["shortcut"], "auto");
        assert_eq!(dump["datapath"]["cgroup_root"], "/sys/fs/cgroup/pods");
        let yaml = serde_yaml::to_string(&c).unwrap();
        assert_eq!(Config::from_yaml(&yaml, "again.yaml").unwrap(), c);
        assert!(c.problems().is_empty());
    }

    #[test]
    fn lists_every_problem_with_its_place() {
        let bad = r#"
listeners:
  - address: nowhere
    default_service: missing
services:
  - name: a
    policy: random
    vips: ["10.0.0.1"]
    endpoints:
      - address: 1.2.3.4
  - name: a
admin:
  address: 0.0.0.0:15000
"#;
        let e = Config::from_yaml(bad, "bad.yaml").unwrap_err();
        let all = e.to_string();
        for needle in [
            "listeners[0].address: \"nowhere\"",
            "listeners[0].default_service: no service is named \"missing\"",
            "services[0].policy: \"random\"",
            "services[0].vips[0]: \"10.0.0.1\"",
            "services[0].endpoints[0].address: \"1.2.3.4\"",
            "services[1].name: \"a\" is defined twice",
            "admin.address: 0.0.0.0:15000 is not a loopback address",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert_eq!(e.problems.len(), 7, "{all}");
    }

    #[test]
    fn wrong_values_of_every_typed_field_are_named() {
        let e = Config::from_yaml(
            "listeners:\n  - address: 127.0.0.1:1\n  - address: 127.0.0.1:1\n\
             services:\n  - name: s\n    vips: [\"10.0.0.1:80\"]\n    endpoints:\n      - address: 10.0.0.2:80\n      - address: x\n\
             \x20 - name: t\n    vips: [\"10.0.0.1:80\"]\n\
             admin:\n  address: localhost:15000\n\
             datapath:\n  shortcut: maybe\n  proxy_address: \"[::1]:15001\"\n",
            "bad.yaml",
        )
        .unwrap_err();
        assert_eq!(
            e.problems,
            [
                "services[0].endpoints[1].address: \"x\" is not an IP:port",
                "services[1].vips[0]: 10.0.0.1:80 belongs to another service too",
                "listeners[1].address: 127.0.0.1:1 is used twice",
                "admin.address: \"localhost:15000\" is not an IP:port",
                "datapath.shortcut: \"maybe\" is not one of auto, on, off",
                "datapath.proxy_address: \"[::1]:15001\" is not an IPv4 IP:port",
            ]
        );
        let e = Config::from_yaml("listeners: [{}]\ndatapath:\n  enabled: true\n", "dp.yaml")
            .unwrap_err();
        assert_eq!(
            e.problems,
            ["datapath.proxy_address: \"\" is not an IPv4 IP:port (needed when datapath.enabled)"]
        );
    }

    #[test]
    fn outlier_detection_settings_are_checked() {
        let e = Config::from_yaml(
            "listeners:\n  - address: 127.0.0.1:15001\npool:\n  outlier_detection:\n    base_ejection_ms: 0\n",
            "a.yaml",
        )
        .unwrap_err();
        assert_eq!(
            e.problems,
            [
                "pool.outlier_detection.base_ejection_ms: must be at least 1 (or set consecutive_failures to 0 to disable)"
            ]
        );
        let e = Config::from_yaml(
            "listeners:\n  - address: 127.0.0.1:15001\npool:\n  outlier_detection:\n    base_ejection_ms: 5000\n    max_ejection_ms: 1000\n",
            "b.yaml",
        )
        .unwrap_err();
        assert_eq!(
            e.problems,
            ["pool.outlier_detection.max_ejection_ms: 1000 is below base_ejection_ms 5000"]
        );
        // Disabled, the times are not used and not checked.
        Config::from_yaml(
            "listeners:\n  - address: 127.0.0.1:15001\npool:\n  outlier_detection:\n    consecutive_failures: 0\n    base_ejection_ms: 0\n",
            "c.yaml",
        )
        .unwrap();
    }

    #[test]
    fn fields_of_the_removed_h2_engine_are_refused_with_the_reason() {
        for engine in ["relay", "h2", "~"] {
            let e = Config::from_yaml(
                &format!("listeners:\n  - address: 127.0.0.1:15001\n  - address: 127.0.0.1:15002\n    engine: {engine}\n"),
                "a.yaml",
            )
            .unwrap_err();
            assert_eq!(
                e.problems,
                [
                    "listeners[1].engine: the h2 engine was removed; the frame relay is the only engine, delete this field"
                ],
                "engine: {engine}"
            );
        }
        let e = Config::from_yaml(
            "listeners:\n  - address: 127.0.0.1:15001\nlimits:\n  max_concurrent_reset_streams: 50\n",
            "b.yaml",
        )
        .unwrap_err();
        assert_eq!(
            e.problems,
            [
                "limits.max_concurrent_reset_streams: only the h2 engine used it and the h2 engine was removed; delete this field"
            ]
        );
        // Not in the configuration dump either.
        let dump = serde_json::to_string(&Config::from_yaml(GOOD, "good.yaml").unwrap()).unwrap();
        assert!(!dump.contains("engine"), "{dump}");
        assert!(!dump.contains("max_concurrent_reset_streams"), "{dump}");
    }

    #[test]
    fn a_reload_applies_the_live_sections_and_keeps_the_others_in_force() {
        let running = Config::from_yaml(GOOD, "running.yaml").unwrap();
        assert!(
            Section::ALL
                .iter()
                .filter(|s| s.live())
                .map(|s| s.name())
                .eq(["services", "routes", "limits", "pool", "locality"])
        );

        // Nothing changed.
        let r = running.reload(running.clone()).unwrap();
        assert!(r.applied.is_empty() && r.restart_required.is_empty());
        assert_eq!(r.in_force, running);

        // Live sections only: the file is in force as it is.
        let live = Config::from_yaml(
            &format!(
                "{GOOD}      - address: 127.0.0.1:50053\nlimits:\n  max_active_calls: 5\npool:\n  max_connections_per_endpoint: 2\n"
            ),
            "live.yaml",
        )
        .unwrap();
        let r = running.reload(live.clone()).unwrap();
        assert_eq!(
            r.applied,
            [Section::Services, Section::Limits, Section::Pool]
        );
        assert!(r.restart_required.is_empty());
        assert_eq!(r.in_force, live);

        // Sections that need a restart, beside a live one: those keep the running values.
        let mut file = live.clone();
        file.listeners[0].address = addr("127.0.0.1:16001");
        file.admin.address = addr("127.0.0.1:16000");
        file.datapath.shortcut = Shortcut::Off;
        let r = running.reload(file).unwrap();
        assert_eq!(
            r.applied,
            [Section::Services, Section::Limits, Section::Pool]
        );
        assert_eq!(
            r.restart_required,
            [Section::Listeners, Section::Admin, Section::Datapath]
        );
        assert_eq!(
            Section::join(&r.restart_required),
            "listeners, admin, datapath"
        );
        assert_eq!(r.in_force.listeners, running.listeners);
        assert_eq!(r.in_force.admin, running.admin);
        assert_eq!(r.in_force.datapath, running.datapath);
        assert_eq!(r.in_force.services, live.services);
        assert_eq!(r.in_force.limits.max_active_calls, 5);
        assert_eq!(r.in_force.pool.max_connections_per_endpoint, 2);

        // Reverting the file to the values in force leaves nothing waiting.
        let r = running.reload(live.clone()).unwrap();
        assert!(r.restart_required.is_empty());
    }

    #[test]
    fn a_reload_whose_services_do_not_fit_the_listeners_kept_is_refused() {
        let running = Config::from_yaml(GOOD, "running.yaml").unwrap();
        // The file renames the default service and points its listener at the new name: the
        // listener needs a restart, and the one in force would name no service.
        let file = Config::from_yaml(
            "listeners:\n  - address: 127.0.0.1:15002\n    default_service: renamed\n\
             services:\n  - name: renamed\n",
            "renamed.yaml",
        )
        .unwrap();
        let problems = running.reload(file).unwrap_err();
        assert_eq!(
            problems,
            [
                "listeners[0].default_service: no service is named \"greeter\" (with the listeners in force until a restart)"
            ]
        );
    }

    #[test]
    fn environment_variables_expand() {
        let env = |v: &str| (v == "NODE_IP").then(|| "10.0.0.5".to_string());
        assert_eq!(
            expand_env("proxy_address: ${NODE_IP}:15001", env).unwrap(),
            "proxy_address: 10.0.0.5:15001"
        );
        let e = expand_env("a: 1\nb: ${NOPE}\n", env).unwrap_err();
        assert_eq!(
            e,
            vec!["line 2: environment variable NOPE (written ${NOPE}) is not set"]
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = Config::from_yaml("listeners:\n  - address: [\n", "x.yaml").unwrap_err();
        assert!(e.problems[0].starts_with("line "), "{e}");
        let e = Config::from_yaml("listners: []\n", "x.yaml").unwrap_err();
        assert!(e.to_string().contains("unknown field `listners`"), "{e}");
    }
}
