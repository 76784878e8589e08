//! Gateway API `GRPCRoute` (`gateway.networking.k8s.io` `v1`, and `v1alpha2` on older
//! installations: one schema) bound to Services (GAMMA, GEP-1294: a `parentRef` of kind
//! `Service`), translated into the call layer's policy model (`call::route`).
//!
//! A route whose parents are all Gateways is not the agent's (a gateway serves it) and is
//! skipped. Each `matches[]` entry becomes a route of its own, so that the routes of all the
//! `GRPCRoute`s of a Service can be ordered as the specification orders matches
//! ([`Precedence`]); which routes apply to which callers (producer and consumer routes) is
//! [`super::policy`]'s business.
#![forbid(unsafe_code)]

use std::cmp::Reverse;

use serde::Deserialize;

use super::policy::{Ctx, ServiceRef};
use crate::call::route::{
    Backend, HeaderMatch, HeaderMutations, Route, RouteAction, RouteMatch, RouteSource, StringMatch,
};

/// `spec` of a `GRPCRoute`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct GrpcRoute {
    /// What it attaches to: Services (the mesh, the agent) or Gateways (not the agent's).
    pub parent_refs: Vec<ParentRef>,
    /// Not used in a mesh (GEP-1294: implementations SHOULD NOT infer anything from them).
    pub hostnames: Vec<String>,
    /// Rules, in order.
    pub rules: Vec<GrpcRouteRule>,
}

/// A `parentRefs[]` entry.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct ParentRef {
    /// `""` for a Service (the API's default is `gateway.networking.k8s.io`).
    pub group: Option<String>,
    /// `Service` (the API's default is `Gateway`).
    pub kind: Option<String>,
    /// Default: the route's namespace.
    pub namespace: Option<String>,
    /// The Service's name.
    pub name: String,
    /// For a Service: the name of one of its ports.
    pub section_name: Option<String>,
    /// For a Service: one of its ports.
    pub port: Option<u16>,
}

impl ParentRef {
    /// A Service (group `""`, or left out as users often do, and kind `Service`).
    pub fn is_service(&self) -> bool {
        self.kind.as_deref() == Some("Service")
            && matches!(self.group.as_deref(), None | Some("") | Some("core"))
    }
}

/// A `rules[]` entry.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct GrpcRouteRule {
    /// Its name.
    pub name: Option<String>,
    /// It takes a call when any holds; none: every call.
    pub matches: Vec<GrpcRouteMatch>,
    /// Request processing.
    pub filters: Vec<GrpcRouteFilter>,
    /// Weighted backends.
    pub backend_refs: Vec<GrpcBackendRef>,
}

/// A `matches[]` entry: all its conditions.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct GrpcRouteMatch {
    /// The gRPC service and method.
    pub method: Option<GrpcMethodMatch>,
    /// Request headers.
    pub headers: Vec<GrpcHeaderMatch>,
}

/// `method`: `type` `Exact` (default) or `RegularExpression`, over `service` and `method`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct GrpcMethodMatch {
    /// `Exact` or `RegularExpression`.
    #[serde(rename = "type")]
    pub type_: Option<String>,
    /// `package.Service`.
    pub service: Option<String>,
    /// `Method`.
    pub method: Option<String>,
}

/// A `headers[]` match.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct GrpcHeaderMatch {
    /// `Exact` or `RegularExpression`.
    #[serde(rename = "type")]
    pub type_: Option<String>,
    /// The header.
    pub name: String,
    /// Its value.
    pub value: String,
}

/// A `filters[]` entry.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct GrpcRouteFilter {
    /// `RequestHeaderModifier`, `ResponseHeaderModifier`, `RequestMirror`, `ExtensionRef`.
    #[serde(rename = "type")]
    pub type_: String,
    /// For `RequestHeaderModifier`.
    pub request_header_modifier: Option<HeaderFilter>,
}

/// `set`, `add`, `remove`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct HeaderFilter {
    /// Replaced or added.
    pub set: Vec<NameValue>,
    /// Added.
    pub add: Vec<NameValue>,
    /// Removed.
    pub remove: Vec<String>,
}

/// A header and its value.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct NameValue {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// A `backendRefs[]` entry.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct GrpcBackendRef {
    /// `""` (default) for a Service.
    pub group: Option<String>,
    /// `Service` (default).
    pub kind: Option<String>,
    /// The Service.
    pub name: String,
    /// Default: the route's namespace.
    pub namespace: Option<String>,
    /// The Service port.
    pub port: Option<u16>,
    /// Its share (default 1).
    pub weight: Option<i64>,
    /// Filters for the calls it takes.
    pub filters: Vec<GrpcRouteFilter>,
}

/// The order of a match among all those of a Service's `GRPCRoute`s (GRPCRoute spec, `rules`
/// field: the most characters in a matching service, then in a matching method, then the most
/// header matches; then the oldest route, then `namespace/name`; then the order within the
/// route). A regular expression counts as no characters: any exact name is more specific.
/// Smaller sorts first.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Precedence {
    specificity: (Reverse<usize>, Reverse<usize>, Reverse<usize>),
    /// Rule, then match, within the route.
    place: (usize, usize),
}

impl Precedence {
    /// The specificity part, then the route's age and name (`older`), then the place.
    pub fn key<'a, T: Ord>(&'a self, older: &'a T) -> impl Ord + 'a {
        (&self.specificity, older, &self.place)
    }
}

/// The routes of a `GRPCRoute` for calls to `service` on `port`, each with its precedence.
/// `Err` names the first problem and its place (`rules[0].backendRefs[1]: ...`): the route is
/// refused for this service.
pub fn translate(
    route: &GrpcRoute,
    source: &RouteSource,
    namespace: &str,
    service: &ServiceRef,
    port: u16,
    ctx: &Ctx<'_>,
) -> Result<Vec<(Precedence, Route)>, String> {
    let object = match source {
        RouteSource::GrpcRoute { name, .. } => name.as_str(),
        _ => "",
    };
    let mut out = Vec::new();
    for (i, rule) in route.rules.iter().enumerate() {
        let place = format!("rules[{i}]");
        let action = rule_action(rule, &place, namespace, service, port, ctx)?;
        let rule_name = rule.name.clone().unwrap_or_else(|| place.clone());
        if rule.matches.is_empty() {
            out.push((
                Precedence {
                    specificity: (Reverse(0), Reverse(0), Reverse(0)),
                    place: (i, 0),
                },
                Route {
                    name: format!("{object}/{rule_name}"),
                    source: source.clone(),
                    matches: Vec::new(),
                    action,
                },
            ));
            continue;
        }
        for (j, m) in rule.matches.iter().enumerate() {
            let (rm, specificity) = translate_match(m, &format!("{place}.matches[{j}]"))?;
            let name = if rule.matches.len() == 1 {
                format!("{object}/{rule_name}")
            } else {
                format!("{object}/{rule_name}.matches[{j}]")
            };
            out.push((
                Precedence {
                    specificity,
                    place: (i, j),
                },
                Route {
                    name,
                    source: source.clone(),
                    matches: vec![rm],
                    action: action.clone(),
                },
            ));
        }
    }
    Ok(out)
}

type Specificity = (Reverse<usize>, Reverse<usize>, Reverse<usize>);

fn translate_match(m: &GrpcRouteMatch, place: &str) -> Result<(RouteMatch, Specificity), String> {
    let mut rm = RouteMatch::default();
    let (mut service_chars, mut method_chars) = (0, 0);
    if let Some(mm) = &m.method {
        let service = mm.service.as_deref().filter(|s| !s.is_empty());
        let method = mm.method.as_deref().filter(|s| !s.is_empty());
        if service.is_none() && method.is_none() {
            return Err(format!(
                "{place}.method: one of service and method is needed"
            ));
        }
        match mm.type_.as_deref().unwrap_or("Exact") {
            "Exact" => {
                for (field, v) in [("service", service), ("method", method)] {
                    if v.is_some_and(|v| v.contains('/')) {
                        return Err(format!("{place}.method.{field}: an exact name has no '/'"));
                    }
                }
                service_chars = service.map_or(0, str::len);
                method_chars = method.map_or(0, str::len);
                rm.service = service.map(|s| StringMatch::Exact(s.into()));
                rm.method = method.map(|s| StringMatch::Exact(s.into()));
            }
            "RegularExpression" => {
                let re = |field: &str, p: &str| {
                    StringMatch::regex(p)
                        .map_err(|e| format!("{place}.method.{field}: {p:?} is not valid: {e}"))
                };
                rm.service = service.map(|s| re("service", s)).transpose()?;
                rm.method = method.map(|s| re("method", s)).transpose()?;
            }
            other => return Err(format!("{place}.method.type: {other:?} is not supported")),
        }
    }
    let mut seen = Vec::new();
    for (k, h) in m.headers.iter().enumerate() {
        let name = h.name.to_ascii_lowercase();
        // Only the first of equivalent names counts (GRPCHeaderMatch.name).
        if seen.contains(&name) {
            continue;
        }
        seen.push(name.clone());
        let value = match h.type_.as_deref().unwrap_or("Exact") {
            "Exact" => StringMatch::Exact(h.value.clone()),
            "RegularExpression" => StringMatch::regex(&h.value).map_err(|e| {
                format!(
                    "{place}.headers[{k}].value: {:?} is not valid: {e}",
                    h.value
                )
            })?,
            other => {
                return Err(format!(
                    "{place}.headers[{k}].type: {other:?} is not supported"
                ));
            }
        };
        rm.headers.push(HeaderMatch {
            name,
            value: Some(value),
            invert: false,
        });
    }
    let specificity = (
        Reverse(service_chars),
        Reverse(method_chars),
        Reverse(rm.headers.len()),
    );
    Ok((rm, specificity))
}

/// `filters` into header changes; every other filter type is refused.
fn filters(fs: &[GrpcRouteFilter], place: &str, into: &mut HeaderMutations) -> Result<(), String> {
    for (k, f) in fs.iter().enumerate() {
        match (f.type_.as_str(), &f.request_header_modifier) {
            ("RequestHeaderModifier", Some(m)) => {
                let pair = |nv: &NameValue| (nv.name.to_ascii_lowercase(), nv.value.clone());
                into.set.extend(m.set.iter().map(pair));
                into.add.extend(m.add.iter().map(pair));
                into.remove
                    .extend(m.remove.iter().map(|h| h.to_ascii_lowercase()));
            }
            ("RequestHeaderModifier", None) => {
                return Err(format!(
                    "{place}.filters[{k}].requestHeaderModifier: missing"
                ));
            }
            (other, _) => {
                return Err(format!(
                    "{place}.filters[{k}].type: {other} is not supported"
                ));
            }
        }
    }
    Ok(())
}

fn rule_action(
    rule: &GrpcRouteRule,
    place: &str,
    namespace: &str,
    service: &ServiceRef,
    port: u16,
    ctx: &Ctx<'_>,
) -> Result<RouteAction, String> {
    let mut action = RouteAction::default();
    filters(&rule.filters, place, &mut action.request_headers)?;
    let single = rule.backend_refs.len() == 1;
    for (k, b) in rule.backend_refs.iter().enumerate() {
        let bplace = format!("{place}.backendRefs[{k}]");
        if !matches!(b.group.as_deref(), None | Some("") | Some("core"))
            || b.kind.as_deref().is_some_and(|k| k != "Service")
        {
            return Err(format!(
                "{bplace}: only Services are supported as backends, not {}/{}",
                b.group.as_deref().unwrap_or(""),
                b.kind.as_deref().unwrap_or("")
            ));
        }
        if !b.filters.is_empty() {
            if !single {
                return Err(format!(
                    "{bplace}.filters: filters per backend need a single backend"
                ));
            }
            filters(&b.filters, &bplace, &mut action.request_headers)?;
        }
        let target = ServiceRef::new(b.namespace.as_deref().unwrap_or(namespace), &b.name);
        if !ctx.has_service(&target) {
            return Err(format!("{bplace}: Service {target} not found"));
        }
        let bport = ctx
            .backend_port(&target, b.port, (service, port))
            .map_err(|e| format!("{bplace}.port: {e}"))?;
        let weight = b.weight.unwrap_or(1);
        action.backends.push(Backend {
            service: target.store_name(bport),
            subset: None,
            weight: u32::try_from(weight)
                .map_err(|_| format!("{bplace}.weight: {weight} is negative"))?,
        });
    }
    Ok(action)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(json: serde_json::Value) -> GrpcRouteMatch {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn method_and_header_matches() {
        let (rm, spec) = translate_match(
            &m(serde_json::json!({
                "method": {"service": "payment.PaymentService", "method": "ProcessPayment"},
                "headers": [{"name": "X-Environment", "value": "production"},
                            {"name": "x-environment", "value": "ignored: second of its name"}]
            })),
            "m",
        )
        .unwrap();
        assert_eq!(
            rm.service,
            Some(StringMatch::Exact("payment.PaymentService".into()))
        );
        assert_eq!(rm.method, Some(StringMatch::Exact("ProcessPayment".into())));
        assert_eq!(rm.headers.len(), 1);
        assert_eq!(rm.headers[0].name, "x-environment");
        assert_eq!(spec.0, Reverse(22));
        let (rm, spec) = translate_match(
            &m(serde_json::json!({"method": {"type": "RegularExpression", "service": "pay.*"}})),
            "m",
        )
        .unwrap();
        assert!(rm.service.unwrap().matches(b"payment.PaymentService"));
        assert_eq!(
            spec.0,
            Reverse(0),
            "a regular expression counts no characters"
        );
        for bad in [
            serde_json::json!({"method": {}}),
            serde_json::json!({"method": {"service": "a/b"}}),
            serde_json::json!({"method": {"type": "Prefix", "service": "a"}}),
            serde_json::json!({"headers": [{"name": "a", "value": "(", "type": "RegularExpression"}]}),
        ] {
            assert!(translate_match(&m(bad.clone()), "m").is_err(), "{bad}");
        }
    }

    #[test]
    fn precedence_orders_by_specificity_then_age_then_place() {
        let p = |s, me, h, place| Precedence {
            specificity: (Reverse(s), Reverse(me), Reverse(h)),
            place,
        };
        let mut v = [
            (p(0, 0, 0, (0, 0)), 1, "catch-all"),
            (p(10, 0, 1, (0, 1)), 2, "service+header, newer"),
            (p(10, 0, 1, (1, 0)), 1, "service+header, older"),
            (p(10, 6, 0, (2, 0)), 2, "service+method"),
        ];
        v.sort_by(|a, b| a.0.key(&a.1).cmp(&b.0.key(&b.1)));
        let order: Vec<&str> = v.iter().map(|x| x.2).collect();
        assert_eq!(
            order,
            [
                "service+method",
                "service+header, older",
                "service+header, newer",
                "catch-all"
            ]
        );
    }

    #[test]
    fn parents_of_kind_service() {
        let p: ParentRef = serde_json::from_value(
            serde_json::json!({"group": "", "kind": "Service", "name": "a"}),
        )
        .unwrap();
        assert!(p.is_service());
        let p: ParentRef = serde_json::from_value(serde_json::json!({"name": "gw"})).unwrap();
        assert!(!p.is_service(), "the API's default kind is Gateway");
        let p: ParentRef = serde_json::from_value(serde_json::json!({
            "group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw"
        }))
        .unwrap();
        assert!(!p.is_service());
    }
}
