//! Istio's `VirtualService` and `DestinationRule` (`networking.istio.io` `v1`, `v1beta1` and
//! `v1alpha3`: one schema), as users apply them, translated into the call layer's policy model
//! (`call::route`).
//!
//! The structs hold the fields the agent uses (routes, subsets, balancing, and the resilience
//! settings of `call::retry`, `call::fault` and `call::breaker`: retries, faults, connection
//! pools, outlier detection); every field is optional and unknown fields are ignored, so no
//! object is refused for what it adds. What the agent cannot do and would change where a call
//! goes or what it carries (a redirect, a direct response, a rewrite, a delegate, response
//! header changes) refuses the object with a reason (`translate_http`), rather than being
//! silently skipped.
//!
//! Hosts are resolved by [`super::policy::Ctx`]; which `VirtualService` wins a host and how
//! `DestinationRule`s merge is [`super::policy`]'s business.
#![forbid(unsafe_code)]

use std::{collections::BTreeMap, time::Duration};

use serde::Deserialize;

use super::policy::{Ctx, ServiceRef, parse_duration, restrict_to_namespaces};
use crate::{
    call::{
        grpc::Code,
        route::{
            Backend, BalancingOverride, ConnectionPool, FailureCodes, FaultAbort, FaultDelay,
            FaultPolicy, HeaderMatch, HeaderMutations, OutlierDetection, Percent, Resilience,
            RetryOn, RetryPolicy, Route, RouteAction, RouteMatch, RouteSource, SourceMatch,
            StringMatch,
        },
    },
    config::{Distribute, Failover, LocalityLb, Policy},
};

/// The `gateways` value that names the sidecars (here: the agent).
pub const MESH_GATEWAY: &str = "mesh";

/// `spec` of a `VirtualService`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct VirtualService {
    /// The hosts it routes (short names resolve against its namespace).
    pub hosts: Vec<String>,
    /// Where it applies: empty or with `mesh`, the sidecars (the agent); else gateways only.
    pub gateways: Vec<String>,
    /// HTTP routes, in order (gRPC is HTTP/2).
    pub http: Vec<HttpRoute>,
    /// Namespaces that see it: empty or `*` for all, `.` for its own.
    pub export_to: Vec<String>,
}

impl VirtualService {
    /// Whether it applies to the sidecars (the agent), not only to gateways.
    pub fn for_mesh(&self) -> bool {
        self.gateways.is_empty() || self.gateways.iter().any(|g| g == MESH_GATEWAY)
    }
}

/// One `http[]` route.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct HttpRoute {
    /// Its name, for logs and `inspect`.
    pub name: Option<String>,
    /// It takes a request when any of these holds; none: every request.
    #[serde(rename = "match")]
    pub matches: Vec<HttpMatch>,
    /// Weighted destinations.
    pub route: Vec<HttpRouteDestination>,
    /// The request's timeout (`10s`, `1.5s`, `500ms`; `0s`: none).
    pub timeout: Option<String>,
    /// Retries on gRPC statuses (`call::retry`).
    pub retries: Option<HttpRetry>,
    /// Header changes.
    pub headers: Option<Headers>,
    /// Delays and aborts injected (`call::fault`).
    pub fault: Option<HttpFault>,
    /// Mirroring (shadow traffic): accepted and not applied; it never changes a call's answer.
    pub mirror: Option<serde_json::Value>,
    /// More mirrors (accepted, not applied).
    pub mirrors: Option<serde_json::Value>,
    /// A redirect: refused (the agent forwards calls, it does not answer redirects).
    pub redirect: Option<serde_json::Value>,
    /// A direct response: refused.
    pub direct_response: Option<serde_json::Value>,
    /// A delegate `VirtualService`: refused (only for gateways in Istio).
    pub delegate: Option<serde_json::Value>,
    /// A path or authority rewrite: refused.
    pub rewrite: Option<serde_json::Value>,
}

/// An `http[].match[]` entry: every condition set must hold.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct HttpMatch {
    /// The `:path`: `/package.Service/Method` for gRPC.
    pub uri: Option<IstioStringMatch>,
    /// `http` only for the agent's calls.
    pub scheme: Option<IstioStringMatch>,
    /// `POST` for every gRPC call.
    pub method: Option<IstioStringMatch>,
    /// Refused: not supported yet.
    pub authority: Option<IstioStringMatch>,
    /// Request headers by name; `{}`: the header is present.
    pub headers: BTreeMap<String, IstioStringMatch>,
    /// Headers that must not match (absent, with `{}`).
    pub without_headers: BTreeMap<String, IstioStringMatch>,
    /// The port of the host addressed.
    pub port: Option<u16>,
    /// The calling pod's labels.
    pub source_labels: BTreeMap<String, String>,
    /// The calling pod's namespace.
    pub source_namespace: Option<String>,
    /// Where the match applies (as the `VirtualService`'s `gateways`).
    pub gateways: Vec<String>,
    /// Query parameters: a gRPC path has none, refused.
    pub query_params: BTreeMap<String, IstioStringMatch>,
    /// `uri` compared without case.
    pub ignore_uri_case: bool,
}

/// Istio's `StringMatch`: one of `exact`, `prefix`, `regex` (RE2); none: any value (presence).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct IstioStringMatch {
    /// The whole value.
    pub exact: Option<String>,
    /// Its start.
    pub prefix: Option<String>,
    /// A regular expression over the whole value.
    pub regex: Option<String>,
}

/// One weighted destination of a route.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct HttpRouteDestination {
    /// Where.
    pub destination: Destination,
    /// Its share; with one destination, all of it.
    pub weight: Option<i64>,
    /// Header changes for the calls it takes.
    pub headers: Option<Headers>,
}

/// A service (and subset, port) calls go to.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct Destination {
    /// A service's host (short names resolve against the object's namespace).
    pub host: String,
    /// A subset a `DestinationRule` of that host defines.
    pub subset: Option<String>,
    /// The service port.
    pub port: Option<PortSelector>,
}

/// `port: {number: N}`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct PortSelector {
    /// The port.
    pub number: Option<u16>,
}

/// Header changes of requests and responses.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Headers {
    /// Before the request is sent on.
    pub request: Option<HeaderOperations>,
    /// Before the response is returned: refused, not supported yet.
    pub response: Option<HeaderOperations>,
}

/// `set`, `add`, `remove`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct HeaderOperations {
    /// Replaced or added.
    pub set: BTreeMap<String, String>,
    /// Added beside any value there.
    pub add: BTreeMap<String, String>,
    /// Removed.
    pub remove: Vec<String>,
}

impl HeaderOperations {
    fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// `retries`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct HttpRetry {
    /// Attempts beyond the first.
    pub attempts: Option<i64>,
    /// Each try's timeout.
    pub per_try_timeout: Option<String>,
    /// Which failures are retried (`cancelled,deadline-exceeded,...`).
    pub retry_on: Option<String>,
    /// Retry in other localities.
    pub retry_remote_localities: Option<bool>,
}

impl HttpRetry {
    /// As the call layer has it: `attempts` (0 or none: no retry), `perTryTimeout`, `retryOn`
    /// (Istio's default when not set; HTTP-only conditions are ignored, unknown ones refused).
    fn policy(&self, place: &str) -> Result<RetryPolicy, String> {
        let attempts = self.attempts.unwrap_or(0);
        Ok(RetryPolicy {
            attempts: u32::try_from(attempts)
                .map_err(|_| format!("{place}.attempts: {attempts} is negative"))?,
            per_try_timeout: match &self.per_try_timeout {
                Some(t) => {
                    Some(parse_duration(t).map_err(|e| format!("{place}.perTryTimeout: {e}"))?)
                        .filter(|d| !d.is_zero())
                }
                None => None,
            },
            retry_on: RetryOn::parse(
                self.retry_on.as_deref().unwrap_or(RetryOn::ISTIO_DEFAULT),
                true,
            )
            .map_err(|e| format!("{place}.retryOn: {e}"))?,
        })
    }
}

/// `fault`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct HttpFault {
    /// Calls held before they are routed.
    pub delay: Option<FaultInjectionDelay>,
    /// Calls answered by the proxy.
    pub abort: Option<FaultInjectionAbort>,
}

/// `fault.delay`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct FaultInjectionDelay {
    /// How long.
    pub fixed_delay: Option<String>,
    /// For this share of calls (default: all).
    pub percentage: Option<IstioPercent>,
    /// The old integer share.
    pub percent: Option<i64>,
}

/// `fault.abort`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct FaultInjectionAbort {
    /// The HTTP status: the gRPC status it maps to (gRPC's HTTP to gRPC mapping).
    pub http_status: Option<i64>,
    /// The gRPC status, by name (`UNAVAILABLE`).
    pub grpc_status: Option<String>,
    /// An HTTP/2 reset: refused, not supported.
    pub http2_error: Option<String>,
    /// For this share of calls (default: all).
    pub percentage: Option<IstioPercent>,
}

/// `percentage: {value: 12.5}`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct IstioPercent {
    /// Percent, 0 to 100.
    pub value: f64,
}

fn share(
    percentage: &Option<IstioPercent>,
    percent: Option<i64>,
    place: &str,
) -> Result<Percent, String> {
    let p = match (percentage, percent) {
        (Some(p), _) => p.value,
        (None, Some(p)) => p as f64,
        (None, None) => return Ok(Percent::ALL),
    };
    Percent::new(p).ok_or_else(|| format!("{place}.percentage: {p} is not within 0-100"))
}

/// The gRPC status a proxy's HTTP status means to a gRPC client (gRPC's "HTTP to gRPC Status
/// Code Mapping").
fn grpc_code_of_http(status: i64) -> Code {
    match status {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502..=504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

impl HttpFault {
    /// As the call layer has it.
    fn policy(&self, place: &str) -> Result<FaultPolicy, String> {
        let delay = match &self.delay {
            Some(d) => {
                let fixed = d
                    .fixed_delay
                    .as_deref()
                    .ok_or_else(|| format!("{place}.delay.fixedDelay: missing"))?;
                Some(FaultDelay {
                    fixed: parse_duration(fixed)
                        .map_err(|e| format!("{place}.delay.fixedDelay: {e}"))?,
                    percent: share(&d.percentage, d.percent, &format!("{place}.delay"))?,
                })
            }
            None => None,
        };
        let abort = match &self.abort {
            Some(a) => {
                let code = match (&a.grpc_status, a.http_status, &a.http2_error) {
                    (Some(g), _, _) => Code::parse(g).ok_or_else(|| {
                        format!("{place}.abort.grpcStatus: {g:?} is not a gRPC status")
                    })?,
                    (None, Some(h), _) if (200..=599).contains(&h) => grpc_code_of_http(h),
                    (None, Some(h), _) => {
                        return Err(format!(
                            "{place}.abort.httpStatus: {h} is not an HTTP status (200-599)"
                        ));
                    }
                    (None, None, Some(_)) => {
                        return Err(format!("{place}.abort.http2Error: not supported"));
                    }
                    (None, None, None) => {
                        return Err(format!("{place}.abort: no status"));
                    }
                };
                Some(FaultAbort {
                    code,
                    percent: share(&a.percentage, None, &format!("{place}.abort"))?,
                })
            }
            None => None,
        };
        Ok(FaultPolicy { delay, abort })
    }
}

/// `spec` of a `DestinationRule`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct DestinationRule {
    /// The host it applies to (short names resolve against its namespace).
    pub host: String,
    /// For all its endpoints.
    pub traffic_policy: Option<TrafficPolicy>,
    /// Named subsets of its endpoints, by label.
    pub subsets: Vec<IstioSubset>,
    /// Namespaces that see it.
    pub export_to: Vec<String>,
    /// The client workloads it applies to (not applied: the agent serves every pod).
    pub workload_selector: Option<serde_json::Value>,
}

/// `trafficPolicy`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct TrafficPolicy {
    /// How endpoints are chosen.
    pub load_balancer: Option<LoadBalancerSettings>,
    /// Circuit breaker and connection pool limits.
    pub connection_pool: Option<ConnectionPoolSettings>,
    /// Ejection of failing endpoints.
    pub outlier_detection: Option<IstioOutlierDetection>,
    /// TLS to the endpoints (kept, not applied).
    pub tls: Option<serde_json::Value>,
    /// Per service port.
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

/// A `portLevelSettings[]` entry.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    /// The service port.
    pub port: Option<PortSelector>,
    /// How endpoints are chosen on it.
    pub load_balancer: Option<LoadBalancerSettings>,
    /// Connection limits on it.
    pub connection_pool: Option<ConnectionPoolSettings>,
    /// Outlier detection on it.
    pub outlier_detection: Option<IstioOutlierDetection>,
}

/// `loadBalancer`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct LoadBalancerSettings {
    /// `ROUND_ROBIN`, `LEAST_REQUEST` (`LEAST_CONN`), `RANDOM`, `PASSTHROUGH`, `UNSPECIFIED`.
    pub simple: Option<String>,
    /// Consistent hashing: `httpHeaderName` is applied (ring-hash on that header); the other
    /// keys (cookie, source IP, query parameter) are not, and keep the service's policy.
    pub consistent_hash: Option<ConsistentHash>,
    /// Locality weights and failover, applied over zones.
    pub locality_lb_setting: Option<LocalityLbSetting>,
}

/// `loadBalancer.consistentHash`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct ConsistentHash {
    /// Hash this request header.
    pub http_header_name: Option<String>,
}

/// `loadBalancer.localityLbSetting`. Istio names localities `region/zone/subzone`; the agent
/// knows endpoints by zone (the EndpointSlice's), so an entry applies by its zone part, and
/// an entry that names a region only (`us-west`, a region-level `failover`) is not applied.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct LocalityLbSetting {
    /// `false` turns it off.
    pub enabled: Option<bool>,
    /// `from` locality to weights over `to` localities.
    pub distribute: Vec<LocalityDistribute>,
    /// Where a locality's calls go when it has no endpoint.
    pub failover: Vec<LocalityFailover>,
}

/// A `distribute` entry.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct LocalityDistribute {
    /// The calling locality.
    pub from: String,
    /// Localities and their weights.
    pub to: BTreeMap<String, u32>,
}

/// A `failover` entry.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct LocalityFailover {
    /// The locality that fails over.
    pub from: String,
    /// Where to.
    pub to: String,
}

/// The zone of an Istio locality (`region/zone/subzone`, `*` anywhere): its zone part, `*`
/// for `*`; `None` for a region alone.
fn zone_of(locality: &str) -> Option<String> {
    let mut parts = locality.split('/');
    let region = parts.next()?;
    match parts.next() {
        Some(zone) if !zone.is_empty() => Some(zone.to_string()),
        _ if region == "*" => Some("*".into()),
        _ => None,
    }
}

impl LoadBalancerSettings {
    /// What it sets over the service's balancing: the hash header, the locality weights.
    pub fn overrides(&self) -> BalancingOverride {
        let locality_lb = self
            .locality_lb_setting
            .as_ref()
            .filter(|l| l.enabled != Some(false))
            .map(|l| LocalityLb {
                distribute: l
                    .distribute
                    .iter()
                    .filter_map(|d| {
                        Some(Distribute {
                            from: zone_of(&d.from)?,
                            to: d
                                .to
                                .iter()
                                .filter_map(|(to, w)| Some((zone_of(to)?, *w)))
                                .collect(),
                        })
                    })
                    .filter(|d| !d.to.is_empty())
                    .collect(),
                failover: l
                    .failover
                    .iter()
                    .filter_map(|f| {
                        Some(Failover {
                            from: zone_of(&f.from)?,
                            to: zone_of(&f.to)?,
                        })
                    })
                    .collect(),
            })
            .filter(|l| !(l.distribute.is_empty() && l.failover.is_empty()));
        BalancingOverride {
            hash_header: self
                .consistent_hash
                .as_ref()
                .and_then(|c| c.http_header_name.clone())
                .filter(|h| !h.is_empty()),
            locality_lb,
        }
    }
}

impl LoadBalancerSettings {
    /// The agent's balancing policy for `simple`: `ROUND_ROBIN` round-robin; `LEAST_REQUEST`
    /// and its old name `LEAST_CONN` least-request; `RANDOM` the power of two random choices
    /// (p2c-ewma: random, and better); anything else (`UNSPECIFIED`, `PASSTHROUGH`, none)
    /// keeps the service's own.
    pub fn policy(&self) -> Option<Policy> {
        match self.simple.as_deref()? {
            "ROUND_ROBIN" => Some(Policy::RoundRobin),
            "LEAST_REQUEST" | "LEAST_CONN" => Some(Policy::LeastRequest),
            "RANDOM" => Some(Policy::P2cEwma),
            _ => None,
        }
    }
}

/// `connectionPool`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct ConnectionPoolSettings {
    /// TCP settings.
    pub tcp: Option<TcpSettings>,
    /// HTTP settings.
    pub http: Option<HttpSettings>,
}

/// `connectionPool.tcp`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct TcpSettings {
    /// Connections per endpoint.
    pub max_connections: Option<i64>,
    /// Connect timeout.
    pub connect_timeout: Option<String>,
    /// Longest life of a connection.
    pub max_connection_duration: Option<String>,
    /// Idle timeout.
    pub idle_timeout: Option<String>,
}

/// `connectionPool.http`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct HttpSettings {
    /// Pending HTTP/1 requests.
    pub http1_max_pending_requests: Option<i64>,
    /// Concurrent requests to an endpoint.
    pub http2_max_requests: Option<i64>,
    /// Requests per connection before it is retired.
    pub max_requests_per_connection: Option<i64>,
    /// Concurrent retries.
    pub max_retries: Option<i64>,
    /// Idle timeout.
    pub idle_timeout: Option<String>,
    /// Streams per connection.
    pub max_concurrent_streams: Option<i64>,
}

/// `outlierDetection`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct IstioOutlierDetection {
    /// Deprecated name of `consecutive5xxErrors`.
    pub consecutive_errors: Option<i64>,
    /// Consecutive 5xx (gRPC: UNAVAILABLE and such) before an ejection.
    #[serde(rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<i64>,
    /// Consecutive gateway errors before an ejection.
    pub consecutive_gateway_errors: Option<i64>,
    /// Consecutive local failures (connect) before an ejection.
    pub consecutive_local_origin_failures: Option<i64>,
    /// Between ejection sweeps.
    pub interval: Option<String>,
    /// How long an ejection lasts at first.
    pub base_ejection_time: Option<String>,
    /// At most this share of endpoints ejected.
    pub max_ejection_percent: Option<i64>,
    /// Ejection stops below this share of healthy endpoints.
    pub min_health_percent: Option<i64>,
}

/// A `subsets[]` entry.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct IstioSubset {
    /// Its name (`v1`).
    pub name: String,
    /// The endpoints with these labels.
    pub labels: BTreeMap<String, String>,
    /// Its own traffic policy.
    pub traffic_policy: Option<TrafficPolicy>,
}

impl DestinationRule {
    /// The problems that make it unusable on its own: an unnamed or twice-named subset, a
    /// resilience setting that does not read (a duration).
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::BTreeSet::new();
        for (i, s) in self.subsets.iter().enumerate() {
            if s.name.is_empty() {
                return Err(format!("subsets[{i}].name is empty"));
            }
            if !seen.insert(s.name.as_str()) {
                return Err(format!("subsets[{i}].name: {:?} is defined twice", s.name));
            }
        }
        if let Some(tp) = &self.traffic_policy {
            resilience(
                tp.connection_pool.as_ref(),
                tp.outlier_detection.as_ref(),
                "trafficPolicy",
            )?;
            for (i, p) in tp.port_level_settings.iter().enumerate() {
                resilience(
                    p.connection_pool.as_ref(),
                    p.outlier_detection.as_ref(),
                    &format!("trafficPolicy.portLevelSettings[{i}]"),
                )?;
            }
        }
        Ok(())
    }

    /// The circuit breaker and outlier detection it sets for calls on `port` (each of
    /// `connectionPool` and `outlierDetection` from the port's settings when they have it).
    /// A setting that does not read is left out ([`DestinationRule::validate`] refuses it).
    pub fn resilience_for_port(&self, port: u16) -> Resilience {
        let Some(tp) = &self.traffic_policy else {
            return Resilience::default();
        };
        let at_port = tp
            .port_level_settings
            .iter()
            .find(|p| p.port.as_ref().and_then(|p| p.number) == Some(port));
        let pool = at_port
            .and_then(|p| p.connection_pool.as_ref())
            .or(tp.connection_pool.as_ref());
        let outlier = at_port
            .and_then(|p| p.outlier_detection.as_ref())
            .or(tp.outlier_detection.as_ref());
        resilience(pool, outlier, "").unwrap_or_default()
    }

    /// The balancing policy it sets for calls on `port` (port-level settings first).
    pub fn policy_for_port(&self, port: u16) -> Option<Policy> {
        self.traffic_policy.as_ref()?.policy_for_port(port)
    }

    /// The hash header and locality weights it sets for calls on `port` (port-level settings
    /// first).
    pub fn balancing_for_port(&self, port: u16) -> BalancingOverride {
        let Some(tp) = self.traffic_policy.as_ref() else {
            return BalancingOverride::default();
        };
        tp.port_level_settings
            .iter()
            .find(|p| p.port.as_ref().and_then(|p| p.number) == Some(port))
            .and_then(|p| p.load_balancer.as_ref())
            .or(tp.load_balancer.as_ref())
            .map(LoadBalancerSettings::overrides)
            .unwrap_or_default()
    }
}

impl TrafficPolicy {
    /// The balancing policy for calls on `port` (port-level settings first).
    pub fn policy_for_port(&self, port: u16) -> Option<Policy> {
        self.port_level_settings
            .iter()
            .find(|p| p.port.as_ref().and_then(|p| p.number) == Some(port))
            .and_then(|p| p.load_balancer.as_ref())
            .or(self.load_balancer.as_ref())
            .and_then(LoadBalancerSettings::policy)
    }
}

/// A count Istio writes as an int32 where 0 or less means "not set" (the default applies).
fn count<T: TryFrom<i64>>(v: Option<i64>) -> Option<T> {
    v.filter(|n| *n > 0).and_then(|n| T::try_from(n).ok())
}

fn duration(v: &Option<String>, place: &str) -> Result<Option<Duration>, String> {
    v.as_deref()
        .map(|d| parse_duration(d).map_err(|e| format!("{place}: {e}")))
        .transpose()
}

/// `connectionPool` and `outlierDetection` as the call layer has them (`call::breaker`).
fn resilience(
    pool: Option<&ConnectionPoolSettings>,
    outlier: Option<&IstioOutlierDetection>,
    place: &str,
) -> Result<Resilience, String> {
    let connection_pool = match pool {
        Some(p) => {
            let (tcp, http) = (
                p.tcp.clone().unwrap_or_default(),
                p.http.clone().unwrap_or_default(),
            );
            let at = |f: &str| format!("{place}.connectionPool.{f}");
            Some(ConnectionPool {
                max_requests: count(http.http2_max_requests),
                max_pending_requests: count(http.http1_max_pending_requests),
                max_retries: count(http.max_retries),
                max_connections: count(tcp.max_connections),
                max_requests_per_connection: count(http.max_requests_per_connection),
                connect_timeout: duration(&tcp.connect_timeout, &at("tcp.connectTimeout"))?,
                idle_timeout: match duration(&http.idle_timeout, &at("http.idleTimeout"))? {
                    Some(t) => Some(t),
                    None => duration(&tcp.idle_timeout, &at("tcp.idleTimeout"))?,
                },
                max_connection_age: duration(
                    &tcp.max_connection_duration,
                    &at("tcp.maxConnectionDuration"),
                )?,
            })
        }
        None => None,
    };
    let outlier_detection = match outlier {
        Some(o) => {
            let at = |f: &str| format!("{place}.outlierDetection.{f}");
            // One threshold and its statuses: 5xx (the server's errors) first, as Istio's
            // default; gateway errors (UNAVAILABLE) when only they are set.
            let (errors, codes) = match (
                o.consecutive_5xx_errors.or(o.consecutive_errors),
                o.consecutive_gateway_errors,
            ) {
                (Some(n), _) => (n, FailureCodes::ServerErrors),
                (None, Some(n)) => (n, FailureCodes::GatewayErrors),
                (None, None) => (5, FailureCodes::ServerErrors),
            };
            Some(OutlierDetection {
                consecutive_errors: u32::try_from(errors.max(0)).unwrap_or(u32::MAX),
                codes,
                interval: duration(&o.interval, &at("interval"))?,
                base_ejection: duration(&o.base_ejection_time, &at("baseEjectionTime"))?,
                // Istio's default is 10%.
                max_ejection_percent: o.max_ejection_percent.map_or(10, |p| p.clamp(0, 100)) as u32,
            })
        }
        None => None,
    };
    Ok(Resilience {
        connection_pool,
        outlier_detection,
        retry_budget: None,
    })
}

impl IstioStringMatch {
    /// As the policy model has it; `None`: any value. `ignore_case` (`ignoreUriCase`) turns an
    /// exact or prefix match into a case-insensitive regular expression.
    fn to_model(&self, place: &str, ignore_case: bool) -> Result<Option<StringMatch>, String> {
        let set = [&self.exact, &self.prefix, &self.regex]
            .iter()
            .filter(|v| v.is_some())
            .count();
        if set > 1 {
            return Err(format!("{place}: one of exact, prefix, regex"));
        }
        let regex = |p: &str| {
            StringMatch::regex(p).map_err(|e| format!("{place}.regex: {p:?} is not valid: {e}"))
        };
        Ok(Some(match (&self.exact, &self.prefix, &self.regex) {
            (Some(e), _, _) if ignore_case => regex(&format!("(?i){}", regex::escape(e)))?,
            (_, Some(p), _) if ignore_case => regex(&format!("(?i){}.*", regex::escape(p)))?,
            (Some(e), _, _) => StringMatch::Exact(e.clone()),
            (_, Some(p), _) => StringMatch::Prefix(p.clone()),
            (_, _, Some(r)) => regex(r)?,
            _ => return Ok(None),
        }))
    }

    /// Whether every value `v` matches (a match that cannot fail for the agent's calls).
    fn accepts(&self, v: &str) -> bool {
        self.exact.as_deref().is_none_or(|e| e == v)
            && self.prefix.as_deref().is_none_or(|p| v.starts_with(p))
            && self.regex.is_none()
    }
}

/// The route matches of one `http[].match[]` entry for calls on `port`: `None` when it cannot
/// hold for them (another port, gateways only).
fn translate_match(m: &HttpMatch, place: &str, port: u16) -> Result<Option<RouteMatch>, String> {
    if m.port.is_some_and(|p| p != port)
        || (!m.gateways.is_empty() && !m.gateways.iter().any(|g| g == MESH_GATEWAY))
    {
        return Ok(None);
    }
    if m.authority.is_some() {
        return Err(format!("{place}.authority: not supported"));
    }
    if !m.query_params.is_empty() {
        return Err(format!(
            "{place}.queryParams: not supported (a gRPC path has no query)"
        ));
    }
    // Every gRPC call is a POST over http: these hold for all of them or for none.
    if m.method.as_ref().is_some_and(|s| !s.accepts("POST"))
        || m.scheme.as_ref().is_some_and(|s| !s.accepts("http"))
    {
        return Err(format!(
            "{place}: a method other than POST or a scheme other than http matches no gRPC call"
        ));
    }
    let path = match &m.uri {
        Some(u) => u.to_model(&format!("{place}.uri"), m.ignore_uri_case)?,
        None => None,
    };
    let mut headers = Vec::new();
    for (maps, invert, field) in [
        (&m.headers, false, "headers"),
        (&m.without_headers, true, "withoutHeaders"),
    ] {
        for (name, v) in maps {
            let name = name.to_ascii_lowercase();
            // Istio ignores these keys among headers.
            if ["uri", "scheme", "method", "authority"].contains(&name.as_str()) {
                continue;
            }
            headers.push(HeaderMatch {
                value: v.to_model(&format!("{place}.{field}.{name}"), false)?,
                name,
                invert,
            });
        }
    }
    let source =
        (m.source_namespace.is_some() || !m.source_labels.is_empty()).then(|| SourceMatch {
            namespace: m.source_namespace.clone(),
            labels: m.source_labels.clone(),
        });
    Ok(Some(RouteMatch {
        path,
        service: None,
        method: None,
        headers,
        source,
    }))
}

fn mutations(ops: &HeaderOperations, into: &mut HeaderMutations) {
    let lower = |(k, v): (&String, &String)| (k.to_ascii_lowercase(), v.clone());
    into.set.extend(ops.set.iter().map(lower));
    into.add.extend(ops.add.iter().map(lower));
    into.remove
        .extend(ops.remove.iter().map(|h| h.to_ascii_lowercase()));
}

/// `headers` of a route or destination into `into`; response changes are refused.
fn request_headers(
    h: &Option<Headers>,
    place: &str,
    into: &mut HeaderMutations,
) -> Result<(), String> {
    let Some(h) = h else { return Ok(()) };
    if h.response.as_ref().is_some_and(|r| !r.is_empty()) {
        return Err(format!("{place}.headers.response: not supported yet"));
    }
    if let Some(r) = &h.request {
        mutations(r, into);
    }
    Ok(())
}

/// The routes of a `VirtualService` for the calls to `service` on `port`, in its order.
/// `Err` names the first problem and its place (`http[1].route[0].destination.subset: ...`):
/// the object is refused for this service.
pub fn translate(
    vs: &VirtualService,
    source: &RouteSource,
    namespace: &str,
    service: &ServiceRef,
    port: u16,
    ctx: &Ctx<'_>,
) -> Result<Vec<Route>, String> {
    let object = match source {
        RouteSource::VirtualService { name, .. } => name.as_str(),
        _ => "",
    };
    let export: Option<Vec<String>> = export_namespaces(&vs.export_to, namespace);
    let mut routes = Vec::new();
    for (i, http) in vs.http.iter().enumerate() {
        let place = format!("http[{i}]");
        let Some(route) = translate_http(http, &place, namespace, service, port, ctx)? else {
            continue;
        };
        let matches = match &export {
            Some(namespaces) => {
                let m = restrict_to_namespaces(route.0, namespaces);
                if m.is_empty() {
                    continue;
                }
                m
            }
            None => route.0,
        };
        routes.push(Route {
            name: format!(
                "{object}/{}",
                http.name.clone().unwrap_or_else(|| place.clone())
            ),
            source: source.clone(),
            matches,
            action: route.1,
        });
    }
    Ok(routes)
}

/// The namespaces `exportTo` limits an object to (`.`: its own); `None`: every namespace.
fn export_namespaces(export_to: &[String], own: &str) -> Option<Vec<String>> {
    if export_to.is_empty() || export_to.iter().any(|e| e == "*") {
        return None;
    }
    Some(
        export_to
            .iter()
            .filter(|e| *e != "~")
            .map(|e| if e == "." { own.to_string() } else { e.clone() })
            .collect(),
    )
}

/// One `http[]` route for calls on `port`: `None` when none of its matches applies to them.
fn translate_http(
    http: &HttpRoute,
    place: &str,
    namespace: &str,
    service: &ServiceRef,
    port: u16,
    ctx: &Ctx<'_>,
) -> Result<Option<(Vec<RouteMatch>, RouteAction)>, String> {
    for (field, set) in [
        ("redirect", http.redirect.is_some()),
        ("directResponse", http.direct_response.is_some()),
        ("delegate", http.delegate.is_some()),
        ("rewrite", http.rewrite.is_some()),
    ] {
        if set {
            return Err(format!("{place}.{field}: not supported"));
        }
    }
    let mut matches = Vec::new();
    for (j, m) in http.matches.iter().enumerate() {
        if let Some(m) = translate_match(m, &format!("{place}.match[{j}]"), port)? {
            matches.push(m);
        }
    }
    if !http.matches.is_empty() && matches.is_empty() {
        return Ok(None);
    }
    if http.route.is_empty() {
        return Err(format!("{place}.route: no destination"));
    }
    let mut action = RouteAction {
        timeout: match http.timeout.as_deref() {
            Some(t) => Some(parse_duration(t).map_err(|e| format!("{place}.timeout: {e}"))?)
                .filter(|d| *d > Duration::ZERO),
            None => None,
        },
        ..Default::default()
    };
    request_headers(&http.headers, place, &mut action.request_headers)?;
    if let Some(r) = &http.retries {
        action.retries = Some(r.policy(&format!("{place}.retries"))?);
    }
    if let Some(f) = &http.fault {
        action.fault = Some(f.policy(&format!("{place}.fault"))?);
    }
    let single = http.route.len() == 1;
    for (k, d) in http.route.iter().enumerate() {
        let dplace = format!("{place}.route[{k}]");
        if d.headers.is_some() && !single {
            return Err(format!(
                "{dplace}.headers: header changes per destination need a single destination"
            ));
        }
        request_headers(&d.headers, &dplace, &mut action.request_headers)?;
        let weight = match (single, d.weight) {
            (true, _) => 100,
            (false, w) => u32::try_from(w.unwrap_or(0))
                .map_err(|_| format!("{dplace}.weight: {} is negative", w.unwrap_or(0)))?,
        };
        let dest = &d.destination;
        let target = ctx.resolve_host(&dest.host, namespace).ok_or_else(|| {
            format!(
                "{dplace}.destination.host: {:?} names no Service of the cluster",
                dest.host
            )
        })?;
        let routed = (service, port);
        let dport = ctx
            .backend_port(&target, dest.port.as_ref().and_then(|p| p.number), routed)
            .map_err(|e| format!("{dplace}.destination.port: {e}"))?;
        let subset = match &dest.subset {
            Some(name) => Some(
                ctx.subset(&target, name, dport)
                    .map_err(|e| format!("{dplace}.destination.subset: {e}"))?,
            ),
            None => None,
        };
        action.backends.push(Backend {
            service: target.store_name(dport),
            subset,
            weight,
        });
    }
    if action.backends.iter().all(|b| b.weight == 0) {
        return Err(format!("{place}.route: the weights add up to 0"));
    }
    Ok(Some((matches, action)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sm(json: serde_json::Value) -> IstioStringMatch {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn string_matches() {
        let m = sm(serde_json::json!({"prefix": "/a.B/"}))
            .to_model("x", false)
            .unwrap();
        assert_eq!(m, Some(StringMatch::Prefix("/a.B/".into())));
        let m = sm(serde_json::json!({"exact": "/a.B/M"}))
            .to_model("x", true)
            .unwrap()
            .unwrap();
        assert!(m.matches(b"/A.b/m") && !m.matches(b"/a.B/Mx"));
        let m = sm(serde_json::json!({"prefix": "/a.B/"}))
            .to_model("x", true)
            .unwrap()
            .unwrap();
        assert!(m.matches(b"/A.b/Anything"));
        assert_eq!(
            sm(serde_json::json!({})).to_model("x", false).unwrap(),
            None
        );
        let e = sm(serde_json::json!({"regex": "("}))
            .to_model("match[0].uri", false)
            .unwrap_err();
        assert!(
            e.starts_with("match[0].uri.regex: \"(\" is not valid"),
            "{e}"
        );
        assert!(
            sm(serde_json::json!({"exact": "a", "prefix": "b"}))
                .to_model("x", false)
                .is_err()
        );
    }

    #[test]
    fn matches_on_another_port_or_gateway_do_not_apply() {
        let m: HttpMatch = serde_json::from_value(serde_json::json!({"port": 80})).unwrap();
        assert_eq!(translate_match(&m, "m", 50051).unwrap(), None);
        let m: HttpMatch =
            serde_json::from_value(serde_json::json!({"gateways": ["ingress"]})).unwrap();
        assert_eq!(translate_match(&m, "m", 50051).unwrap(), None);
        let m: HttpMatch = serde_json::from_value(serde_json::json!({
            "method": {"exact": "POST"}, "scheme": {"exact": "http"},
            "headers": {"X-Env": {"exact": "prod"}, "x-any": {}, "uri": {"exact": "ignored"}},
            "withoutHeaders": {"x-debug": {}},
            "sourceNamespace": "apps", "sourceLabels": {"app": "a"}
        }))
        .unwrap();
        let rm = translate_match(&m, "m", 50051).unwrap().unwrap();
        assert_eq!(rm.headers.len(), 3, "{rm:?}");
        assert!(rm.headers.iter().any(|h| h.name == "x-env"
            && h.value == Some(StringMatch::Exact("prod".into()))
            && !h.invert));
        assert!(
            rm.headers
                .iter()
                .any(|h| h.name == "x-any" && h.value.is_none() && !h.invert)
        );
        assert!(
            rm.headers
                .iter()
                .any(|h| h.name == "x-debug" && h.value.is_none() && h.invert)
        );
        let src = rm.source.unwrap();
        assert_eq!(src.namespace.as_deref(), Some("apps"));
        assert_eq!(src.labels["app"], "a");
        let m: HttpMatch =
            serde_json::from_value(serde_json::json!({"method": {"exact": "GET"}})).unwrap();
        assert!(translate_match(&m, "m", 1).is_err());
        let m: HttpMatch =
            serde_json::from_value(serde_json::json!({"queryParams": {"a": {"exact": "b"}}}))
                .unwrap();
        assert!(translate_match(&m, "m", 1).is_err());
    }

    #[test]
    fn consistent_hash_and_seed_004s_locality_weights_are_applied_over_zones() {
        let dr: DestinationRule = serde_json::from_value(serde_json::json!({
            "host": "g",
            "trafficPolicy": {
                "loadBalancer": {
                    "consistentHash": {"httpHeaderName": "x-user"},
                    // Seed 004's, as written.
                    "localityLbSetting": {"enabled": true, "distribute": [{
                        "from": "us-west/zone1/*",
                        "to": {"us-west/zone1/*": 80, "us-west/zone2/*": 20}
                    }], "failover": [
                        {"from": "us-west/zone1", "to": "us-west/zone3"},
                        {"from": "us-west", "to": "us-east"}
                    ]}
                },
                "portLevelSettings": [{"port": {"number": 9000},
                                       "loadBalancer": {"simple": "ROUND_ROBIN"}}]
            }
        }))
        .unwrap();
        let o = dr.balancing_for_port(50051);
        assert_eq!(o.hash_header.as_deref(), Some("x-user"));
        let l = o.locality_lb.expect("locality weights");
        assert_eq!(
            l.distribute,
            [Distribute {
                from: "zone1".into(),
                to: BTreeMap::from([("zone1".into(), 80), ("zone2".into(), 20)]),
            }]
        );
        // The region-level entry names no zone: not applied.
        assert_eq!(
            l.failover,
            [Failover {
                from: "zone1".into(),
                to: "zone3".into(),
            }]
        );
        // The port's own settings replace the top level's.
        assert!(dr.balancing_for_port(9000).is_empty());
        let off: LoadBalancerSettings = serde_json::from_value(serde_json::json!({
            "localityLbSetting": {"enabled": false, "distribute": [{"from": "*", "to": {"*": 1}}]}
        }))
        .unwrap();
        assert!(off.overrides().is_empty());
    }

    #[test]
    fn load_balancer_modes_and_port_level_settings() {
        let dr: DestinationRule = serde_json::from_value(serde_json::json!({
            "host": "g",
            "trafficPolicy": {
                "loadBalancer": {"simple": "LEAST_CONN"},
                "connectionPool": {"http": {"http2MaxRequests": 1000, "maxRequestsPerConnection": 100}},
                "outlierDetection": {"consecutiveErrors": 5, "interval": "30s",
                                     "baseEjectionTime": "30s", "maxEjectionPercent": 100},
                "portLevelSettings": [{"port": {"number": 9000},
                                       "loadBalancer": {"simple": "ROUND_ROBIN"}}]
            },
            "subsets": [{"name": "v1", "labels": {"version": "v1"}}],
            "someFutureField": {"kept": "ignored"}
        }))
        .unwrap();
        assert_eq!(dr.policy_for_port(50051), Some(Policy::LeastRequest));
        assert_eq!(dr.policy_for_port(9000), Some(Policy::RoundRobin));
        let tp = dr.traffic_policy.as_ref().unwrap();
        assert_eq!(
            tp.connection_pool
                .as_ref()
                .unwrap()
                .http
                .as_ref()
                .unwrap()
                .http2_max_requests,
            Some(1000)
        );
        assert_eq!(
            tp.outlier_detection.as_ref().unwrap().consecutive_errors,
            Some(5)
        );
        assert!(dr.validate().is_ok());
        let twice: DestinationRule = serde_json::from_value(serde_json::json!({
            "host": "g", "subsets": [{"name": "v1"}, {"name": "v1"}]
        }))
        .unwrap();
        assert!(twice.validate().unwrap_err().contains("defined twice"));
    }
}
