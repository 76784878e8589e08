//! The file's `routes` section: per service, its subsets and its rules (the traffic policy
//! model of `call::route`, as YAML). Values are kept as written (strings, maps) and checked
//! whole: every problem is listed with its place (`routes[0].rules[1].match[0].headers[0]`),
//! regular expressions compiled once to be checked. The call layer builds its model from the
//! checked section.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::{
    Policy,
    resilience::{
        self, ConnectionPoolConfig, FaultConfig, OutlierConfig, RetriesConfig, RetryBudgetConfig,
    },
};

/// The traffic policy of one service (the one whose calls its rules take).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RoutesConfig {
    /// The service whose calls the rules take: a `services[].name`, or a Kubernetes service
    /// (`name.namespace:port`).
    pub service: String,
    /// How calls to all its endpoints are balanced, instead of its own `policy`:
    /// `p2c-ewma`, `least-request` or `round-robin`. Default: its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<String>,
    /// Named groups of its endpoints, by labels, for backends to name.
    pub subsets: Vec<SubsetConfig>,
    /// Tried in order; the first that matches takes the call. None matches: all endpoints.
    pub rules: Vec<RuleConfig>,
    /// Its circuit breaker and connection pool settings ([`super::resilience`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPoolConfig>,
    /// Its outlier detection, instead of `pool.outlier_detection`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierConfig>,
    /// What retries may add to its calls. Default: 20% + 10/s over 10 s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudgetConfig>,
}

/// A subset of a service's endpoints.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SubsetConfig {
    /// Its name (`v1`), unique in the service.
    pub name: String,
    /// An endpoint belongs to it when it has each of these (`services[].endpoints[].labels`).
    pub labels: BTreeMap<String, String>,
    /// How its calls are balanced. Default: as the service's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

/// One route.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RuleConfig {
    /// Its name, unique in the service; a metric label. Default `rules[N]`.
    pub name: String,
    /// It takes a call when any of these holds. Empty: every call.
    #[serde(rename = "match")]
    pub matches: Vec<MatchConfig>,
    /// Where the calls go, by weight. At least one.
    pub backends: Vec<BackendConfig>,
    /// Changes to the request headers.
    pub request_headers: HeaderMutationsConfig,
    /// The call's deadline (`timeout_ms`), if sooner than the client's; 0: none. Default 0.
    pub timeout_ms: u64,
    /// Retries of its calls ([`super::resilience`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetriesConfig>,
    /// Faults injected into its calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultConfig>,
}

/// Conditions that all must hold.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MatchConfig {
    /// The whole `:path` (`/package.Service/Method`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<StringMatchConfig>,
    /// The gRPC service (`package.Service`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<StringMatchConfig>,
    /// The gRPC method (`Method`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<StringMatchConfig>,
    /// Request headers (gRPC metadata), by lowercase name: each has a value that matches
    /// (an empty match `{}`: it is there, whatever its value).
    pub headers: BTreeMap<String, StringMatchConfig>,
    /// Request headers that must not match (`{}`: the header is absent).
    pub without_headers: BTreeMap<String, StringMatchConfig>,
    /// The calling pod (needs the datapath to know it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceMatchConfig>,
}

/// Exactly one of `exact`, `prefix`, `regex` (RE2 syntax, matching the whole value); for a
/// header, none is allowed too (the header is there).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StringMatchConfig {
    /// The whole value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// The value's start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// A regular expression the whole value matches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// A condition on the calling pod.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SourceMatchConfig {
    /// Its namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels it has.
    pub labels: BTreeMap<String, String>,
}

/// A backend of a rule.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BackendConfig {
    /// The service the calls go to. Default: the one the rule is for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// A subset of its endpoints, declared under the `routes` entry of that service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Its share against the other backends' weights; 0 takes none. Default 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// Changes to the request headers.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HeaderMutationsConfig {
    /// Replaced, or added when absent.
    pub set: BTreeMap<String, String>,
    /// Added beside any value already there.
    pub add: BTreeMap<String, String>,
    /// Removed.
    pub remove: Vec<String>,
}

/// A header name a policy may change: lowercase, a valid field name, not a pseudo-header and
/// not one whose change would make the request malformed or that the proxy relies on (RFC
/// 9113 §8.2.2). Every policy source checks its names with it.
pub fn mutable_header(name: &str) -> Result<(), String> {
    let token =
        |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.!#$%&'*+^`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(format!(
            "{name:?} is not a lowercase header name (letters, digits, -_.)"
        ));
    }
    if matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "upgrade"
            | "te"
            | "host"
            | "content-length"
            | "content-type"
            | "grpc-timeout"
    ) {
        return Err(format!(
            "{name:?} is kept as the client sent it (the proxy relies on it)"
        ));
    }
    Ok(())
}

/// A header value a policy may write: no NUL, CR or LF, no whitespace at either end.
pub fn header_value(value: &str) -> Result<(), String> {
    let b = value.as_bytes();
    let blank = |c: Option<&u8>| c.is_some_and(|c| matches!(c, b' ' | b'\t'));
    if b.iter().any(|&c| matches!(c, 0 | b'\r' | b'\n')) || blank(b.first()) || blank(b.last()) {
        return Err(format!(
            "{value:?} has NUL, CR, LF, or whitespace at an end"
        ));
    }
    Ok(())
}

/// A regular expression as policies take it: anchored (the whole value), RE2 syntax, bounded.
pub fn regex(pattern: &str) -> Result<regex::bytes::Regex, regex::Error> {
    regex::bytes::RegexBuilder::new(&format!("^(?:{pattern})$"))
        // Bounded memory for what a policy author writes: a pattern that would compile to more
        // is refused, not built.
        .size_limit(1 << 20)
        .build()
}

/// A policy name (`load_balancer`, a subset's `policy`) at `at`, or a problem.
fn policy(at: &str, text: &Option<String>, p: &mut Vec<String>) {
    if let Some(t) = text
        && Policy::parse(t).is_none()
    {
        p.push(format!(
            "{at}: {t:?} is not one of p2c-ewma, least-request, round-robin"
        ));
    }
}

/// A string match at `at`: exactly one of its kinds, or none when `may_be_empty`.
fn string_match(at: &str, m: &StringMatchConfig, may_be_empty: bool, p: &mut Vec<String>) {
    let set = [&m.exact, &m.prefix, &m.regex]
        .iter()
        .filter(|v| v.is_some())
        .count();
    if set > 1 || (set == 0 && !may_be_empty) {
        let what = if may_be_empty { "at most" } else { "exactly" };
        p.push(format!(
            "{at}: {what} one of exact, prefix, regex is needed"
        ));
    }
    if let Some(r) = &m.regex
        && let Err(e) = regex(r)
    {
        p.push(format!(
            "{at}.regex: {r:?} is not a valid regular expression: {e}"
        ));
    }
}

/// Every problem of the `routes` section, each with its place.
pub(super) fn problems(routes: &[RoutesConfig], p: &mut Vec<String>) {
    let mut services = HashSet::new();
    // The subsets declared for each service, for backends to name.
    let subsets: HashMap<&str, HashSet<&str>> = routes
        .iter()
        .map(|r| {
            let names = r.subsets.iter().map(|s| s.name.as_str()).collect();
            (r.service.as_str(), names)
        })
        .collect();
    for (i, r) in routes.iter().enumerate() {
        let at = format!("routes[{i}]");
        if r.service.is_empty() {
            p.push(format!("{at}.service: must not be empty"));
        } else if !services.insert(r.service.as_str()) {
            p.push(format!(
                "{at}.service: {:?} has another routes entry; one per service",
                r.service
            ));
        }
        policy(&format!("{at}.load_balancer"), &r.load_balancer, p);
        resilience::service_problems(
            &at,
            r.connection_pool.as_ref(),
            r.outlier_detection.as_ref(),
            r.retry_budget.as_ref(),
            p,
        );
        let mut names = HashSet::new();
        for (j, s) in r.subsets.iter().enumerate() {
            let at = format!("{at}.subsets[{j}]");
            if s.name.is_empty() {
                p.push(format!("{at}.name: must not be empty"));
            } else if !names.insert(s.name.as_str()) {
                p.push(format!("{at}.name: {:?} is defined twice", s.name));
            }
            policy(&format!("{at}.policy"), &s.policy, p);
        }
        let mut rules = HashSet::new();
        for (j, rule) in r.rules.iter().enumerate() {
            let at = format!("{at}.rules[{j}]");
            if !rule.name.is_empty() && !rules.insert(rule.name.as_str()) {
                p.push(format!(
                    "{at}.name: {:?} is used twice in this service",
                    rule.name
                ));
            }
            for (k, m) in rule.matches.iter().enumerate() {
                let at = format!("{at}.match[{k}]");
                for (field, v) in [
                    ("path", &m.path),
                    ("service", &m.service),
                    ("method", &m.method),
                ] {
                    if let Some(v) = v {
                        string_match(&format!("{at}.{field}"), v, false, p);
                    }
                }
                for (field, headers) in [
                    ("headers", &m.headers),
                    ("without_headers", &m.without_headers),
                ] {
                    for (name, h) in headers {
                        let at = format!("{at}.{field}.{name}");
                        if name.is_empty() || name.bytes().any(|b| b.is_ascii_uppercase()) {
                            p.push(format!("{at}: {name:?} is not a lowercase header name"));
                        }
                        string_match(&at, h, true, p);
                    }
                }
            }
            if rule.backends.is_empty() {
                p.push(format!("{at}.backends: at least one backend is needed"));
            }
            let mut total = 0u64;
            for (k, b) in rule.backends.iter().enumerate() {
                let at = format!("{at}.backends[{k}]");
                let service = b.service.as_deref().unwrap_or(&r.service);
                if b.service.as_deref() == Some("") {
                    p.push(format!("{at}.service: must not be empty"));
                }
                if let Some(s) = &b.subset
                    && !subsets
                        .get(service)
                        .is_some_and(|names| names.contains(s.as_str()))
                {
                    p.push(format!(
                        "{at}.subset: {s:?} is not among the subsets of the routes entry of service {service:?}"
                    ));
                }
                total += u64::from(b.weight.unwrap_or(1));
            }
            if !rule.backends.is_empty() && total == 0 {
                p.push(format!(
                    "{at}.backends: every weight is 0; at least one must take calls"
                ));
            }
            if total > u64::from(u32::MAX) {
                p.push(format!(
                    "{at}.backends: the weights add up to more than {}",
                    u32::MAX
                ));
            }
            resilience::rule_problems(
                &at,
                rule.retries.as_ref(),
                rule.fault.as_ref(),
                rule.timeout_ms,
                p,
            );
            let h = &rule.request_headers;
            for (name, value) in h.set.iter().chain(&h.add) {
                if let Err(e) = mutable_header(name).and_then(|()| header_value(value)) {
                    p.push(format!("{at}.request_headers: {e}"));
                }
            }
            for name in &h.remove {
                if let Err(e) = mutable_header(name) {
                    p.push(format!("{at}.request_headers.remove: {e}"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const ROUTES: &str = r#"
listeners:
  - address: 127.0.0.1:15001
services:
  - name: payment
    endpoints:
      - address: 127.0.0.1:50051
        labels: {version: v1}
      - address: 127.0.0.1:50052
        labels: {version: v2}
routes:
  - service: payment
    load_balancer: round-robin
    subsets:
      - {name: v1, labels: {version: v1}}
      - {name: v2, labels: {version: v2}, policy: least-request}
    rules:
      - name: process-production
        match:
          - path: {exact: /payment.PaymentService/ProcessPayment}
            headers: {x-environment: {exact: production}}
        backends: [{subset: v1}]
        timeout_ms: 15000
      - name: testing
        match:
          - service: {exact: payment.PaymentService}
            method: {regex: "Process.*"}
            headers: {x-environment: {exact: testing}, x-trace: {}}
            without_headers: {x-debug: {}}
        backends: [{subset: v2}]
        request_headers: {set: {x-routed: testing}, remove: [x-debug]}
      - name: split
        backends: [{subset: v1, weight: 80}, {subset: v2, weight: 20}]
"#;

    #[test]
    fn a_routes_section_is_read_and_round_trips() {
        let c = Config::from_yaml(ROUTES, "routes.yaml").unwrap();
        assert_eq!(c.routes[0].rules.len(), 3);
        assert_eq!(c.services[0].endpoints[1].labels["version"], "v2");
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        // The dump loads again as the same configuration.
        let dump = serde_yaml::to_string(&c).unwrap();
        assert_eq!(Config::from_yaml(&dump, "dump").unwrap(), c);
    }

    #[test]
    fn every_problem_of_the_routes_section_is_listed_with_its_place() {
        let bad = r#"
listeners:
  - address: 127.0.0.1:15001
routes:
  - service: a
    load_balancer: fastest
    subsets: [{name: v1}, {name: v1}]
    rules:
      - name: r
        match:
          - path: {exact: /x, prefix: /y}
            method: {regex: "(unclosed"}
            headers: {X-Env: {exact: a}, x-b: {exact: a, prefix: b}}
        backends: [{subset: v9}, {service: b, subset: v1, weight: 0}]
        request_headers: {set: {te: x}, remove: [":path"]}
      - name: r
        backends: [{weight: 0}]
      - name: empty
  - service: a
"#;
        let e = Config::from_yaml(bad, "bad.yaml").unwrap_err();
        let want = [
            r#"routes[0].load_balancer: "fastest" is not one of p2c-ewma, least-request, round-robin"#,
            r#"routes[0].subsets[1].name: "v1" is defined twice"#,
            "routes[0].rules[0].match[0].path: exactly one of exact, prefix, regex is needed",
            r#"routes[0].rules[0].match[0].headers.X-Env: "X-Env" is not a lowercase header name"#,
            "routes[0].rules[0].match[0].headers.x-b: at most one of exact, prefix, regex is needed",
            r#"routes[0].rules[0].backends[0].subset: "v9" is not among the subsets of the routes entry of service "a""#,
            r#"routes[0].rules[0].backends[1].subset: "v1" is not among the subsets of the routes entry of service "b""#,
            r#"routes[0].rules[0].request_headers: "te" is kept as the client sent it (the proxy relies on it)"#,
            r#"routes[0].rules[0].request_headers.remove: ":path" is not a lowercase header name (letters, digits, -_.)"#,
            r#"routes[0].rules[1].name: "r" is used twice in this service"#,
            "routes[0].rules[1].backends: every weight is 0; at least one must take calls",
            "routes[0].rules[2].backends: at least one backend is needed",
            r#"routes[1].service: "a" has another routes entry; one per service"#,
        ];
        for w in want {
            assert!(
                e.problems.iter().any(|p| p == w),
                "missing {w:?} in {:#?}",
                e.problems
            );
        }
        assert!(
            e.problems
                .iter()
                .any(|p| p.starts_with(r#"routes[0].rules[0].match[0].method.regex: "(unclosed" is not a valid regular expression"#)),
            "{:#?}",
            e.problems
        );
        assert_eq!(e.problems.len(), want.len() + 1, "{:#?}", e.problems);
    }
}
