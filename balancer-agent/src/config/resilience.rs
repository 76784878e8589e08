//! The file's resilience settings, as written: per rule `retries` and `fault`, per service
//! (`routes[]`) `connection_pool`, `outlier_detection` and `retry_budget`. Checked whole here
//! (every problem with its place); the call layer builds its model from the checked values
//! (`call::retry`, `call::fault`, `call::breaker`). A setting left out keeps the node-wide
//! default (`pool`, `limits`).

use serde::{Deserialize, Serialize};

/// The retry conditions a `retry_on` may name, as Istio's `retryOn` spells them; the call
/// layer's `RetryOn` gives each its meaning (bit `i` is `RETRY_CONDITIONS[i]`).
pub const RETRY_CONDITIONS: [&str; 11] = [
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
    "unknown",
    "connect-failure",
    "refused-stream",
    "reset",
    "5xx",
    "gateway-error",
];

/// The gRPC status names, by code (`GRPC_STATUS_NAMES[14]` is `UNAVAILABLE`).
pub const GRPC_STATUS_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A gRPC status by name (any case) or number: its code.
pub fn grpc_status(name: &str) -> Option<u32> {
    if let Ok(n) = name.parse::<u32>() {
        return (n < 17).then_some(n);
    }
    GRPC_STATUS_NAMES
        .iter()
        .position(|s| s.eq_ignore_ascii_case(name))
        .map(|i| i as u32)
}

/// The unknown conditions of a comma-separated `retry_on` (spaces allowed).
pub fn unknown_retry_conditions(retry_on: &str) -> Vec<&str> {
    retry_on
        .split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .filter(|w| !RETRY_CONDITIONS.iter().any(|c| c.eq_ignore_ascii_case(w)))
        .collect()
}

/// A rule's retries.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RetriesConfig {
    /// Attempts after the first. Default 0 (none).
    pub attempts: u32,
    /// Each attempt's timeout, within the call's (`per_try_timeout_ms`); 0: none. Default 0.
    pub per_try_timeout_ms: u64,
    /// The failures retried, comma-separated, as Istio's `retryOn`: `cancelled`,
    /// `deadline-exceeded`, `internal`, `resource-exhausted`, `unavailable`, `unknown`,
    /// `reset`, `connect-failure`, `refused-stream`, `5xx`, `gateway-error`. Default
    /// `unavailable`.
    pub retry_on: Option<String>,
}

/// A rule's injected faults.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FaultConfig {
    /// A delay before calls are sent on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelayConfig>,
    /// An answer from the proxy instead of the endpoint's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbortConfig>,
}

/// `fault.delay`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FaultDelayConfig {
    /// How long, ms.
    pub fixed_delay_ms: u64,
    /// The share of calls delayed, percent (0-100). Default 100.
    pub percent: Option<f64>,
}

/// `fault.abort`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FaultAbortConfig {
    /// The gRPC status answered, by name (`UNAVAILABLE`) or number (`14`).
    pub grpc_status: String,
    /// The share of calls aborted, percent (0-100). Default 100.
    pub percent: Option<f64>,
}

/// A service's circuit breaker and connection pool settings; each left out keeps the
/// node-wide value.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionPoolConfig {
    /// Calls in flight to the service at most; more fail at once (RESOURCE_EXHAUSTED).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Calls waiting for an endpoint connection at most; more fail at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Calls retrying at once at most; more are not retried.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// Connections per endpoint (each worker's pool), instead of
    /// `pool.max_connections_per_endpoint`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Calls per connection before it is retired, instead of `pool.max_calls_per_connection`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u64>,
    /// Instead of `pool.connect_timeout_ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
    /// Instead of `pool.idle_timeout_ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    /// Instead of `pool.max_connection_age_ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connection_age_ms: Option<u64>,
}

/// A service's outlier detection, instead of `pool.outlier_detection`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierConfig {
    /// Calls in a row that must fail to eject an endpoint; 0 disables. Default 5 (Istio's).
    pub consecutive_errors: u32,
    /// What counts as a failure: `server` (UNKNOWN, INTERNAL, UNAVAILABLE, DATA_LOSS, lost
    /// connections; the default) or `gateway` (UNAVAILABLE and lost connections).
    pub errors: String,
    /// Istio's sweep interval, ms: shown, not needed (an endpoint is ejected at the failure
    /// that crosses the threshold). Default 0.
    pub interval_ms: u64,
    /// The first ejection, ms; each in a row doubles it. Default: `pool.outlier_detection`'s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_ejection_ms: Option<u64>,
    /// At most this share of the service's endpoints ejected at once, percent. Default 100.
    pub max_ejection_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_errors: 5,
            errors: "server".into(),
            interval_ms: 0,
            base_ejection_ms: None,
            max_ejection_percent: 100,
        }
    }
}

/// A service's retry budget: retries within `ttl_ms` may add up to `percent` of the calls plus
/// `min_retries_per_second` for each second of it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RetryBudgetConfig {
    /// Default 20.
    pub percent: f64,
    /// Default 10.
    pub min_retries_per_second: u32,
    /// Default 10000.
    pub ttl_ms: u64,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        Self {
            percent: 20.0,
            min_retries_per_second: 10,
            ttl_ms: 10_000,
        }
    }
}

/// A percentage at `at`, or a problem.
fn percent(at: &str, v: Option<f64>, p: &mut Vec<String>) {
    if let Some(v) = v
        && !(0.0..=100.0).contains(&v)
    {
        p.push(format!("{at}: {v} is outside 0..=100"));
    }
}

/// Every problem of a rule's `retries` and `fault` (`at`: the rule's place).
pub(super) fn rule_problems(
    at: &str,
    retries: Option<&RetriesConfig>,
    fault: Option<&FaultConfig>,
    timeout_ms: u64,
    p: &mut Vec<String>,
) {
    if let Some(r) = retries {
        if let Some(on) = &r.retry_on {
            let unknown = unknown_retry_conditions(on);
            if !unknown.is_empty() {
                p.push(format!(
                    "{at}.retries.retry_on: unknown condition(s) {unknown:?}; known: {}",
                    RETRY_CONDITIONS.join(", ")
                ));
            }
        }
        if timeout_ms > 0 && r.per_try_timeout_ms > timeout_ms {
            p.push(format!(
                "{at}.retries.per_try_timeout_ms: {} is above the rule's timeout_ms {timeout_ms}",
                r.per_try_timeout_ms
            ));
        }
    }
    if let Some(f) = fault {
        if let Some(d) = &f.delay {
            percent(&format!("{at}.fault.delay.percent"), d.percent, p);
            if d.fixed_delay_ms == 0 {
                p.push(format!(
                    "{at}.fault.delay.fixed_delay_ms: must be at least 1"
                ));
            }
        }
        if let Some(a) = &f.abort {
            percent(&format!("{at}.fault.abort.percent"), a.percent, p);
            if grpc_status(&a.grpc_status).is_none() {
                p.push(format!(
                    "{at}.fault.abort.grpc_status: {:?} is not a gRPC status name (UNAVAILABLE) or number (0-16)",
                    a.grpc_status
                ));
            }
        }
        if f.delay.is_none() && f.abort.is_none() {
            p.push(format!("{at}.fault: needs a delay, an abort, or both"));
        }
    }
}

/// Every problem of a service's resilience settings (`at`: its `routes[]` place).
pub(super) fn service_problems(
    at: &str,
    pool: Option<&ConnectionPoolConfig>,
    outlier: Option<&OutlierConfig>,
    budget: Option<&RetryBudgetConfig>,
    p: &mut Vec<String>,
) {
    if let Some(c) = pool {
        for (field, v) in [
            ("max_connections", c.max_connections),
            ("max_requests", c.max_requests),
        ] {
            if v == Some(0) {
                p.push(format!(
                    "{at}.connection_pool.{field}: must be at least 1 (leave it out for no limit)"
                ));
            }
        }
        if c.connect_timeout_ms == Some(0) {
            p.push(format!(
                "{at}.connection_pool.connect_timeout_ms: must be at least 1"
            ));
        }
    }
    if let Some(o) = outlier {
        if !matches!(o.errors.as_str(), "server" | "gateway") {
            p.push(format!(
                "{at}.outlier_detection.errors: {:?} is not one of server, gateway",
                o.errors
            ));
        }
        if o.max_ejection_percent > 100 {
            p.push(format!(
                "{at}.outlier_detection.max_ejection_percent: {} is above 100",
                o.max_ejection_percent
            ));
        }
        if o.base_ejection_ms == Some(0) {
            p.push(format!(
                "{at}.outlier_detection.base_ejection_ms: must be at least 1"
            ));
        }
    }
    if let Some(b) = budget {
        percent(&format!("{at}.retry_budget.percent"), Some(b.percent), p);
        if b.ttl_ms < 1000 {
            p.push(format!(
                "{at}.retry_budget.ttl_ms: {} is below 1000",
                b.ttl_ms
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn every_problem_of_the_resilience_settings_is_listed_with_its_place() {
        let bad = r#"
listeners:
  - address: 127.0.0.1:15001
routes:
  - service: a
    connection_pool: {max_requests: 0, connect_timeout_ms: 0}
    outlier_detection: {errors: some, max_ejection_percent: 101}
    retry_budget: {percent: 120, ttl_ms: 10}
    rules:
      - name: r
        backends: [{}]
        timeout_ms: 100
        retries: {attempts: 2, per_try_timeout_ms: 200, retry_on: "unavailable,sometimes"}
        fault: {delay: {fixed_delay_ms: 0, percent: 101}, abort: {grpc_status: NOPE}}
      - name: empty
        backends: [{}]
        fault: {}
"#;
        let e = Config::from_yaml(bad, "bad.yaml").unwrap_err();
        let want = [
            "routes[0].connection_pool.max_requests: must be at least 1 (leave it out for no limit)",
            "routes[0].connection_pool.connect_timeout_ms: must be at least 1",
            r#"routes[0].outlier_detection.errors: "some" is not one of server, gateway"#,
            "routes[0].outlier_detection.max_ejection_percent: 101 is above 100",
            "routes[0].retry_budget.percent: 120 is outside 0..=100",
            "routes[0].retry_budget.ttl_ms: 10 is below 1000",
            r#"routes[0].rules[0].retries.retry_on: unknown condition(s) ["sometimes"]; known: cancelled, deadline-exceeded, internal, resource-exhausted, unavailable, unknown, connect-failure, refused-stream, reset, 5xx, gateway-error"#,
            "routes[0].rules[0].retries.per_try_timeout_ms: 200 is above the rule's timeout_ms 100",
            "routes[0].rules[0].fault.delay.percent: 101 is outside 0..=100",
            "routes[0].rules[0].fault.delay.fixed_delay_ms: must be at least 1",
            r#"routes[0].rules[0].fault.abort.grpc_status: "NOPE" is not a gRPC status name (UNAVAILABLE) or number (0-16)"#,
            "routes[0].rules[1].fault: needs a delay, an abort, or both",
        ];
        for w in want {
            assert!(
                e.problems.iter().any(|p| p == w),
                "missing {w:?} in {:#?}",
                e.problems
            );
        }
        assert_eq!(e.problems.len(), want.len(), "{:#?}", e.problems);
    }

    #[test]
    fn resilience_settings_round_trip_through_the_dump() {
        let good = r#"
listeners:
  - address: 127.0.0.1:15001
routes:
  - service: a
    connection_pool: {max_requests: 100, max_retries: 3, idle_timeout_ms: 5000}
    outlier_detection: {consecutive_errors: 3, errors: gateway, base_ejection_ms: 30000}
    retry_budget: {percent: 25, min_retries_per_second: 5}
    rules:
      - backends: [{}]
        retries: {attempts: 3, per_try_timeout_ms: 2000, retry_on: "cancelled,deadline-exceeded"}
        fault: {delay: {fixed_delay_ms: 100, percent: 50}, abort: {grpc_status: "14", percent: 0.5}}
"#;
        let c = Config::from_yaml(good, "good.yaml").unwrap();
        let dump = serde_yaml::to_string(&c).unwrap();
        assert_eq!(Config::from_yaml(&dump, "dump").unwrap(), c);
    }
}
