//! Locality tiers and their spill (`min(1, 1.4 h / t)` of the calls to a tier with `h` of its
//! `t` endpoints taking calls, the rest to the next tier).

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use super::{Balancer, Endpoint, Health, Place, Policy, Settings};
use crate::config::{Balancing, Distribute, LocalityLb, TrafficDistribution};

/// Endpoints at `places` (node, zone), `10.0.0.1:80`.. in order.
fn at(places: &[(&str, &str)]) -> Vec<Arc<Endpoint>> {
    places
        .iter()
        .enumerate()
        .map(|(i, (node, zone))| {
            let e = Endpoint::new(format!("10.0.0.{}:80", i + 1).parse().unwrap());
            e.set_place(Place::new(Some(node), Some(zone)));
            e
        })
        .collect()
}

/// A p2c-ewma balancer on node-1 in zone-a.
fn balancer(eps: &[Arc<Endpoint>], balancing: Balancing) -> Balancer {
    let settings = Settings {
        balancing,
        local: Place::new(Some("node-1"), Some("zone-a")),
        ..Settings::default()
    };
    Balancer::new(Policy::P2cEwma, eps.to_vec(), settings)
}

fn prefer(td: TrafficDistribution) -> Balancing {
    Balancing {
        traffic_distribution: td,
        ..Balancing::default()
    }
}

/// Calls per endpoint (its last address byte) over `n` picks.
fn picks(b: &Balancer, n: usize) -> BTreeMap<u8, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let g = b.pick(&[]).expect("an endpoint");
        let SocketAddr::V4(a) = g.endpoint().addr else {
            unreachable!()
        };
        *counts.entry(a.ip().octets()[3]).or_default() += 1;
    }
    counts
}

const NODE_ZONE: [(&str, &str); 5] = [
    ("node-1", "zone-a"),
    ("node-1", "zone-a"),
    ("node-2", "zone-a"),
    ("node-3", "zone-b"),
    ("node-4", "zone-b"),
];

#[test]
fn prefer_same_node_tiers_are_disjoint() {
    let eps = at(&NODE_ZONE);
    let b = balancer(&eps, prefer(TrafficDistribution::PreferSameNode));
    let members: Vec<Vec<u32>> = b
        .tiers
        .iter()
        .map(|t| t.groups.iter().flat_map(|g| g.members.clone()).collect())
        .collect();
    assert_eq!(members, vec![vec![0, 1], vec![2], vec![3, 4]]);
}

#[test]
fn a_tier_with_every_endpoint_up_takes_every_call() {
    let eps = at(&NODE_ZONE);
    let b = balancer(&eps, prefer(TrafficDistribution::PreferSameNode));
    let counts = picks(&b, 2000);
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        [1, 2],
        "{counts:?}"
    );
}

#[test]
fn a_tier_above_1_over_1_4_healthy_still_takes_every_call() {
    // 3 of 4 up on the node: 1.4 x 3/4 = 1.05, capped at 1.
    let places = [
        ("node-1", "zone-a"),
        ("node-1", "zone-a"),
        ("node-1", "zone-a"),
        ("node-1", "zone-a"),
        ("node-2", "zone-a"),
    ];
    let eps = at(&places);
    eps[0].stats.set_health(Health::NotServing);
    let b = balancer(&eps, prefer(TrafficDistribution::PreferSameNode));
    let counts = picks(&b, 2000);
    assert_eq!(counts.get(&5), None, "{counts:?}");
    assert_eq!(counts.get(&1), None, "{counts:?}");
}

#[test]
fn half_a_tier_up_keeps_70_percent_and_spills_the_rest_to_the_next_tier() {
    let eps = at(&NODE_ZONE);
    eps[0].stats.set_health(Health::NotServing);
    let b = balancer(&eps, prefer(TrafficDistribution::PreferSameNode));
    let n = 10_000;
    let counts = picks(&b, n);
    let share = |k: u8| counts.get(&k).copied().unwrap_or_default() as f64 / n as f64;
    // Node: 1.4 x 1/2 = 0.7; the zone's other endpoint (1 of 1 up) takes the 0.3 left.
    assert!((0.67..=0.73).contains(&share(2)), "{counts:?}");
    assert!((0.27..=0.33).contains(&share(3)), "{counts:?}");
    assert_eq!(share(1) + share(4) + share(5), 0.0, "{counts:?}");
}

#[test]
fn a_tier_with_nothing_up_sends_everything_to_the_next_one() {
    let eps = at(&NODE_ZONE);
    eps[0].stats.set_health(Health::NotServing);
    eps[1].stats.set_health(Health::NotServing);
    let b = balancer(&eps, prefer(TrafficDistribution::PreferSameNode));
    assert_eq!(picks(&b, 1000), BTreeMap::from([(3, 1000)]));

    // The zone too: the other zone, evenly (p2c-ewma among equals).
    eps[2].stats.set_health(Health::NotServing);
    let counts = picks(&b, 1000);
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        [4, 5],
        "{counts:?}"
    );
}

#[test]
fn spill_with_nowhere_to_go_stays_in_the_tier() {
    // Node 1 of 2 up, nothing else up: the 30% that would spill has nowhere to go.
    let eps = at(&NODE_ZONE);
    for e in &eps[2..] {
        e.stats.set_health(Health::NotServing);
    }
    eps[0].stats.set_health(Health::NotServing);
    let b = balancer(&eps, prefer(TrafficDistribution::PreferSameNode));
    assert_eq!(picks(&b, 1000), BTreeMap::from([(2, 1000)]));
}

#[test]
fn never_a_dead_end_while_any_endpoint_is_up() {
    let eps = at(&NODE_ZONE);
    for e in &eps[..4] {
        e.stats.set_health(Health::NotServing);
    }
    let b = balancer(&eps, prefer(TrafficDistribution::PreferSameNode));
    assert_eq!(picks(&b, 500), BTreeMap::from([(5, 500)]));
}

#[test]
fn prefer_same_zone_spills_by_the_zones_health() {
    let eps = at(&NODE_ZONE);
    // 1 of 3 up in zone-a: 1.4 x 1/3 = 0.467 stays.
    eps[0].stats.set_health(Health::NotServing);
    eps[1].stats.set_health(Health::NotServing);
    let b = balancer(&eps, prefer(TrafficDistribution::PreferSameZone));
    let n = 10_000;
    let counts = picks(&b, n);
    let local = counts.get(&3).copied().unwrap_or_default() as f64 / n as f64;
    assert!((0.44..=0.50).contains(&local), "{counts:?}");
}

#[test]
fn distribute_splits_by_zone_weight() {
    let eps = at(&NODE_ZONE);
    let balancing = Balancing {
        locality_lb: LocalityLb {
            distribute: vec![Distribute {
                from: "zone-a".into(),
                to: BTreeMap::from([("zone-a".into(), 80), ("zone-b".into(), 20)]),
            }],
            failover: Vec::new(),
        },
        ..Balancing::default()
    };
    let b = balancer(&eps, balancing);
    let n = 10_000;
    let counts = picks(&b, n);
    let zone_b = (counts.get(&4).copied().unwrap_or_default()
        + counts.get(&5).copied().unwrap_or_default()) as f64
        / n as f64;
    assert!((0.17..=0.23).contains(&zone_b), "{counts:?}");
}
