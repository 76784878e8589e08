//! The agent's configuration: one [`Config`], read from a YAML file, validated as a whole.
//!
//! Loading never stops at the first problem: [`Config::from_yaml`] returns every problem it
//! finds, each with its place in the file (a YAML line and column for syntax errors, a field
//! path such as `services[1].endpoints[0].address` for invalid values). A caller that already
//! runs a configuration keeps it when a new one is refused (see `discovery::file`).
#![forbid(unsafe_code)]

use std::{collections::HashSet, fmt, net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};

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

/// The whole configuration. Every field has a default, so an empty file is valid (and serves
/// nothing).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where client connections are accepted.
    pub listeners: Vec<ListenerConfig>,
    /// The services and their endpoints, when they come from this file.
    pub services: Vec<ServiceConfig>,
    /// The admin server (readiness, metrics, config dump, inspect API).
    pub admin: AdminConfig,
    /// Limits on what one client connection may do.
    pub limits: Limits,
    /// Connections to endpoints.
    pub pool: PoolConfig,
    /// The eBPF datapath (transparent redirect). Off unless enabled.
    pub datapath: DatapathConfig,
}

/// A listening socket for client connections.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerConfig {
    /// A name for logs and metrics. Default `outbound`.
    pub name: String,
    /// `IP:port` to listen on. Default `127.0.0.1:15001`.
    pub address: String,
    /// The service for connections and calls that match no VIP and no authority.
    pub default_service: Option<String>,
    /// Removed with the h2 engine: the frame relay is the only engine. Refused when set.
    #[serde(skip_serializing)]
    pub engine: Removed,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            name: "outbound".into(),
            address: "127.0.0.1:15001".into(),
            default_service: None,
            engine: Removed::default(),
        }
    }
}

/// A field the agent no longer has. It reads any value, so that [`Config::problems`] can refuse
/// it with the reason, where serde's unknown-field error would only list the fields there are.
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
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// Unique name, e.g. `greeter.default`.
    pub name: String,
    /// `:authority` values (host, or host:port) that select this service.
    pub authorities: Vec<String>,
    /// `VIP:port` pairs that select this service (the original destination of a redirected
    /// connection).
    pub vips: Vec<String>,
    /// `p2c-ewma` (default), `least-request` or `round-robin`.
    pub policy: Option<String>,
    /// The endpoints.
    pub endpoints: Vec<EndpointConfig>,
}

/// One endpoint of a service.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointConfig {
    /// `IP:port`.
    pub address: String,
    /// Topology zone, informational.
    pub zone: Option<String>,
    /// Node name, informational.
    pub node: Option<String>,
    /// A name for logs (e.g. the pod name).
    pub name: Option<String>,
}

/// The admin server.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// `IP:port`. Default `127.0.0.1:15000`. Must be a loopback address.
    pub address: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            address: "127.0.0.1:15000".into(),
        }
    }
}

/// Limits against abusive or broken clients. Each is enforced per client connection unless
/// it says otherwise.
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
    /// Interval of keepalive PINGs to idle clients, ms; 0 disables. Default 20000.
    pub keepalive_interval_ms: u64,
    /// A PING unanswered this long closes the connection, ms. Default 10000.
    pub keepalive_timeout_ms: u64,
    /// Time a new connection has to show whether it speaks HTTP/2, ms. A connection silent for
    /// this long is forwarded as plain TCP. Default 1000.
    pub protocol_detect_timeout_ms: u64,
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
            keepalive_interval_ms: 20_000,
            keepalive_timeout_ms: 10_000,
            protocol_detect_timeout_ms: 1_000,
            max_methods_per_service: 200,
        }
    }
}

/// Upstream connection pools, one per endpoint.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// TCP connect plus HTTP/2 handshake timeout, ms. Default 1000.
    pub connect_timeout_ms: u64,
    /// A connection without calls for this long is closed, ms. Default 60000.
    pub idle_timeout_ms: u64,
    /// A connection older than this takes no new calls, ms; 0 disables. Default 300000, so
    /// long-lived connections never pin the load.
    pub max_connection_age_ms: u64,
    /// A connection that carried this many calls takes no new ones; 0 disables. Default 0.
    pub max_calls_per_connection: u64,
    /// Connections per endpoint at most, for each data-plane worker (each keeps its own pool
    /// shard). Default 8.
    pub max_connections_per_endpoint: usize,
    /// Interval of keepalive PINGs on pooled connections, ms; 0 disables. Default 30000.
    pub keepalive_interval_ms: u64,
    /// A PING unanswered this long closes the pooled connection, ms. Default 10000.
    pub keepalive_timeout_ms: u64,
    /// An endpoint that refused a connection is avoided for this long, ms. Default 1000.
    pub failure_backoff_ms: u64,
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
    /// How long the first ejection lasts, ms; each ejection in a row (no success between)
    /// doubles it. Default 1000.
    pub base_ejection_ms: u64,
    /// The longest ejection, ms. Default 60000.
    pub max_ejection_ms: u64,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_failures: 7,
            base_ejection_ms: 1_000,
            max_ejection_ms: 60_000,
        }
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 1_000,
            idle_timeout_ms: 60_000,
            max_connection_age_ms: 300_000,
            max_calls_per_connection: 0,
            max_connections_per_endpoint: 8,
            keepalive_interval_ms: 30_000,
            keepalive_timeout_ms: 10_000,
            failure_backoff_ms: 1_000,
            initial_stream_window: 1024 * 1024,
            initial_connection_window: 4 * 1024 * 1024,
            outlier_detection: OutlierDetection::default(),
        }
    }
}

/// The eBPF datapath.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DatapathConfig {
    /// Load and attach the kernel programs. Default false (standalone proxy).
    pub enabled: bool,
    /// The cgroup v2 directory to attach at; empty means the cgroup v2 mount point.
    pub cgroup_root: String,
    /// The node address pods are redirected to (`IP:port` of a listener reachable from pods).
    pub proxy_address: String,
    /// The same-node `sk_msg` shortcut: `auto` (on if the self-test passes), `on`, `off`.
    pub shortcut: String,
    /// Directory under the bpffs where maps are pinned. Default `/sys/fs/bpf/balancer`.
    pub pin_path: String,
    /// Cgroup paths (relative to `cgroup_root`) of pods that opted in, when not from Kubernetes.
    pub opted_in_cgroups: Vec<String>,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            cgroup_root: String::new(),
            proxy_address: String::new(),
            shortcut: "auto".into(),
            pin_path: "/sys/fs/bpf/balancer".into(),
            opted_in_cgroups: Vec::new(),
        }
    }
}

/// Balancing policy of a service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Power of two choices over peak-EWMA latency times outstanding calls.
    #[default]
    P2cEwma,
    /// The endpoint with the fewest calls in flight.
    LeastRequest,
    /// Each endpoint in turn.
    RoundRobin,
}

impl Policy {
    /// Parses the configuration spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "p2c-ewma" | "p2c" => Some(Self::P2cEwma),
            "least-request" => Some(Self::LeastRequest),
            "round-robin" => Some(Self::RoundRobin),
            _ => None,
        }
    }

    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::P2cEwma => "p2c-ewma",
            Self::LeastRequest => "least-request",
            Self::RoundRobin => "round-robin",
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
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| {
                let place = e
                    .location()
                    .map(|l| format!("line {}, column {}", l.line(), l.column()))
                    .unwrap_or_else(|| "document".into());
                fail(vec![format!("{place}: {e}")])
            })?
        };
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(fail(problems))
        }
    }

    /// Reads, parses and validates a file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error {
            source_name: path.display().to_string(),
            problems: vec![format!("cannot read the file: {e}")],
        })?;
        Self::from_yaml(&text, &path.display().to_string())
    }

    /// Every semantic problem, each with the path of the field.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let mut names = HashSet::new();
        let mut vips = HashSet::new();
        let mut authorities = HashSet::new();
        for (i, s) in self.services.iter().enumerate() {
            let at = format!("services[{i}]");
            if s.name.is_empty() {
                p.push(format!("{at}.name: must not be empty"));
            } else if !names.insert(s.name.as_str()) {
                p.push(format!("{at}.name: {:?} is defined twice", s.name));
            }
            if let Some(policy) = &s.policy
                && Policy::parse(policy).is_none()
            {
                p.push(format!(
                    "{at}.policy: {policy:?} is not one of p2c-ewma, least-request, round-robin"
                ));
            }
            for (j, v) in s.vips.iter().enumerate() {
                match v.parse::<SocketAddr>() {
                    Ok(addr) if !vips.insert(addr) => p.push(format!(
                        "{at}.vips[{j}]: {v} belongs to another service too"
                    )),
                    Ok(_) => {}
                    Err(_) => p.push(format!("{at}.vips[{j}]: {v:?} is not an IP:port")),
                }
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
            for (j, e) in s.endpoints.iter().enumerate() {
                if e.address.parse::<SocketAddr>().is_err() {
                    p.push(format!(
                        "{at}.endpoints[{j}].address: {:?} is not an IP:port",
                        e.address
                    ));
                }
            }
        }
        if self.listeners.is_empty() {
            p.push("listeners: at least one listener is needed".into());
        }
        let mut listen = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let at = format!("listeners[{i}]");
            match l.address.parse::<SocketAddr>() {
                Ok(a) if !listen.insert(a) => {
                    p.push(format!("{at}.address: {} is used twice", l.address))
                }
                Ok(_) => {}
                Err(_) => p.push(format!("{at}.address: {:?} is not an IP:port", l.address)),
            }
            if let Some(d) = &l.default_service
                && !names.contains(d.as_str())
            {
                p.push(format!("{at}.default_service: no service is named {d:?}"));
            }
            if l.engine.set {
                p.push(format!(
                    "{at}.engine: the h2 engine was removed; the frame relay is the only engine, delete this field"
                ));
            }
        }
        match self.admin.address.parse::<SocketAddr>() {
            Ok(a) if !a.ip().is_loopback() => p.push(format!(
                "admin.address: {} is not a loopback address; the admin API stays on the node",
                self.admin.address
            )),
            Ok(_) => {}
            Err(_) => p.push(format!(
                "admin.address: {:?} is not an IP:port",
                self.admin.address
            )),
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
        if o.consecutive_failures > 0 && o.base_ejection_ms == 0 {
            p.push("pool.outlier_detection.base_ejection_ms: must be at least 1 (or set consecutive_failures to 0 to disable)".into());
        }
        if o.consecutive_failures > 0 && o.max_ejection_ms < o.base_ejection_ms {
            p.push(format!(
                "pool.outlier_detection.max_ejection_ms: {} is below base_ejection_ms {}",
                o.max_ejection_ms, o.base_ejection_ms
            ));
        }
        if self.pool.connect_timeout_ms == 0 {
            p.push("pool.connect_timeout_ms: must be at least 1".into());
        }
        let d = &self.datapath;
        if !["auto", "on", "off"].contains(&d.shortcut.as_str()) {
            p.push(format!(
                "datapath.shortcut: {:?} is not one of auto, on, off",
                d.shortcut
            ));
        }
        if d.enabled {
            match d.proxy_address.parse::<SocketAddr>() {
                Ok(SocketAddr::V4(_)) => {}
                _ => p.push(format!(
                    "datapath.proxy_address: {:?} is not an IPv4 IP:port (needed when datapath.enabled)",
                    d.proxy_address
                )),
            }
        }
        p
    }
}

impl ServiceConfig {
    /// The policy, defaulted. Only valid on a validated configuration.
    pub fn policy(&self) -> Policy {
        self.policy
            .as_deref()
            .and_then(Policy::parse)
            .unwrap_or_default()
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

/// Milliseconds as a [`Duration`]; configuration fields are plain integers for readability.
pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
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

    #[test]
    fn parses_a_good_file() {
        let c = Config::from_yaml(GOOD, "good.yaml").unwrap();
        assert_eq!(c.services[0].policy(), Policy::RoundRobin);
        assert_eq!(c.services[0].endpoints.len(), 2);
        assert_eq!(c.limits, Limits::default());
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
