//! Per-service balancing settings beside `policy`: the header a `ring-hash` service hashes,
//! where endpoints are preferred by locality (Kubernetes `trafficDistribution`, Istio's
//! `localityLbSetting`), slow start (`warmup_ms`, Istio's `warmupDurationSecs`) and active gRPC
//! health checks (`health_check`). The same fields in the file, in a Service's annotations
//! (`discovery::kube`) and in the typed configuration; and the agent's own place
//! (`locality:` at the top of the file).

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use super::millis;

/// How a service's calls prefer endpoints by where they run (Kubernetes
/// `spec.trafficDistribution`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrafficDistribution {
    /// Every endpoint alike (the default).
    #[default]
    Any,
    /// Endpoints in this node's zone first (`PreferClose` is read as this, as Kubernetes
    /// 1.33 defines it).
    PreferSameZone,
    /// Endpoints on this node first, then in this node's zone, then the rest.
    PreferSameNode,
}

impl TrafficDistribution {
    /// Parses the Kubernetes spelling; `None` for an unknown value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "" | "Any" => Some(Self::Any),
            "PreferClose" | "PreferSameZone" => Some(Self::PreferSameZone),
            "PreferSameNode" => Some(Self::PreferSameNode),
            _ => None,
        }
    }
}

/// Istio's `localityLbSetting`, over zones (the only locality an EndpointSlice carries).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalityLb {
    /// Calls from a zone split over zones by weight (`distribute`). The first entry whose
    /// `from` is this node's zone (or `*`) applies; the rest is ignored.
    pub distribute: Vec<Distribute>,
    /// Where calls go when this node's zone has no endpoint that takes calls (`failover`):
    /// the `to` zones of the entries whose `from` is this node's zone, in order, then any.
    pub failover: Vec<Failover>,
}

/// One `distribute` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Distribute {
    /// The zone of the calling node, or `*`.
    pub from: String,
    /// Zone (or `*` for the others) to weight; the weights are relative.
    pub to: BTreeMap<String, u32>,
}

/// One `failover` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Failover {
    /// The zone of the calling node.
    pub from: String,
    /// The zone its calls go to when its own has nothing to take them.
    pub to: String,
}

/// Active gRPC health checks of a service's endpoints (`grpc.health.v1.Health`), once per node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheck {
    /// The service name asked about (`HealthCheckRequest.service`); empty: the whole server.
    /// Default empty.
    pub service: String,
    /// Between two `Check`s, and the longest a failed `Watch` waits before it is opened again
    /// (`interval_ms`). Default 1 s.
    #[serde(rename = "interval_ms", with = "millis")]
    pub interval: Duration,
    /// An answer later than this is a failed check (`timeout_ms`). Default 1 s.
    #[serde(rename = "timeout_ms", with = "millis")]
    pub timeout: Duration,
    /// Failed checks in a row (no answer, an error) that take an endpoint out. Default 2. An
    /// endpoint that answers NOT_SERVING is out at once.
    pub unhealthy_threshold: u32,
    /// SERVING answers in a row (with `Watch`: intervals that it stays SERVING) that bring an
    /// endpoint back. Default 2.
    pub healthy_threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            service: String::new(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            unhealthy_threshold: 2,
            healthy_threshold: 2,
        }
    }
}

/// A service's balancing settings beside its policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Balancing {
    /// The request header whose value `ring-hash` hashes (lowercase); none: calls without a key
    /// go to a random point of the ring.
    pub hash_header: Option<String>,
    /// Which endpoints are preferred by locality.
    #[serde(serialize_with = "traffic_distribution")]
    pub traffic_distribution: TrafficDistribution,
    /// Istio's locality weights and failover, over zones.
    pub locality_lb: LocalityLb,
    /// A new endpoint's share ramps up over this long (`warmup_ms`); zero: at once.
    #[serde(rename = "warmup_ms", with = "millis")]
    pub warmup: Duration,
    /// Active health checks; none: off (the default).
    pub health_check: Option<HealthCheck>,
}

fn traffic_distribution<S: serde::Serializer>(
    t: &TrafficDistribution,
    s: S,
) -> Result<S::Ok, S::Error> {
    match t {
        TrafficDistribution::Any => s.serialize_none(),
        other => other.serialize(s),
    }
}

/// The balancing fields of a service as written in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawBalancing {
    pub(super) hash_header: Option<String>,
    pub(super) traffic_distribution: Option<String>,
    pub(super) locality_lb: LocalityLb,
    pub(super) warmup_ms: u64,
    pub(super) health_check: Option<HealthCheck>,
}

impl RawBalancing {
    /// Typed, with every problem at `at` (`services[2]`) listed in `p`.
    pub(super) fn typed(self, at: &str, p: &mut Vec<String>) -> Balancing {
        let traffic_distribution = match self.traffic_distribution.as_deref() {
            None => TrafficDistribution::Any,
            Some(t) => TrafficDistribution::parse(t).unwrap_or_else(|| {
                p.push(format!(
                    "{at}.traffic_distribution: {t:?} is not one of PreferClose, \
                     PreferSameZone, PreferSameNode"
                ));
                TrafficDistribution::Any
            }),
        };
        let hash_header = self.hash_header.filter(|h| !h.is_empty()).map(|h| {
            if !h
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                p.push(format!("{at}.hash_header: {h:?} is not a header name"));
            }
            h.to_ascii_lowercase()
        });
        for (i, d) in self.locality_lb.distribute.iter().enumerate() {
            if d.to.values().all(|w| *w == 0) {
                p.push(format!(
                    "{at}.locality_lb.distribute[{i}].to: needs a zone with a weight above 0"
                ));
            }
        }
        if let Some(h) = &self.health_check {
            if h.interval.is_zero() {
                p.push(format!("{at}.health_check.interval_ms: must be at least 1"));
            }
            if h.timeout.is_zero() {
                p.push(format!("{at}.health_check.timeout_ms: must be at least 1"));
            }
            if h.unhealthy_threshold == 0 || h.healthy_threshold == 0 {
                p.push(format!(
                    "{at}.health_check: unhealthy_threshold and healthy_threshold must be at \
                     least 1"
                ));
            }
        }
        Balancing {
            hash_header,
            traffic_distribution,
            locality_lb: self.locality_lb,
            warmup: Duration::from_millis(self.warmup_ms),
            health_check: self.health_check,
        }
    }
}

/// Where this agent runs, for locality (`locality:` at the top of the file). Empty fields are
/// taken from elsewhere: the node from `--node-name` (NODE_NAME), the zone from the endpoints
/// Kubernetes reports on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalityConfig {
    /// This node's name. Default: `--node-name`.
    pub node: String,
    /// This node's zone (`topology.kubernetes.io/zone`). Default: the zone of the endpoints
    /// on this node.
    pub zone: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_with_problems_named() {
        let raw = RawBalancing {
            hash_header: Some("X-User".into()),
            traffic_distribution: Some("PreferClose".into()),
            warmup_ms: 5000,
            health_check: Some(HealthCheck::default()),
            ..Default::default()
        };
        let mut p = Vec::new();
        let b = raw.typed("services[0]", &mut p);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(b.hash_header.as_deref(), Some("x-user"));
        assert_eq!(b.traffic_distribution, TrafficDistribution::PreferSameZone);
        assert_eq!(b.warmup, Duration::from_secs(5));
        let bad = RawBalancing {
            hash_header: Some("x user".into()),
            traffic_distribution: Some("Nearby".into()),
            health_check: Some(HealthCheck {
                interval: Duration::ZERO,
                ..HealthCheck::default()
            }),
            ..Default::default()
        };
        bad.typed("services[1]", &mut p);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(
            p[0].starts_with("services[1].traffic_distribution"),
            "{p:?}"
        );
    }
}
