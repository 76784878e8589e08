//! Reads the datapath's pinned maps from the bpffs, for `balancer-agent inspect bpf`: the
//! operator sees what the kernel holds, whether or not the agent answers.
#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4, SocketAddrV6},
    path::Path,
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use balancer_common::{
    AgentState, OrigDst, ServiceKey, ServiceKey6, ServiceValue, SockTuple, maps,
};
use serde_json::{Value, json};

fn open(dir: &Path, name: &str) -> Result<MapData, String> {
    let path = dir.join(name);
    MapData::from_pin(&path).map_err(|e| format!("{}: {e}", path.display()))
}

fn addr(ip_be: u32, port_be: u16) -> String {
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(ip_be)), u16::from_be(port_be)).to_string()
}

/// Everything the pinned maps under `dir` hold, as JSON.
pub fn read(dir: &Path) -> Result<Value, String> {
    if !dir.is_dir() {
        return Err(format!(
            "no pinned maps at {}: is the agent running on this node with datapath.enabled \
             (and datapath.pin_path = {})? is the bpffs mounted at /sys/fs/bpf?",
            dir.display(),
            dir.display()
        ));
    }
    let services: HashMap<_, ServiceKey, ServiceValue> =
        HashMap::try_from(Map::HashMap(open(dir, maps::SERVICES)?)).map_err(|e| e.to_string())?;
    let mut services: Vec<Value> = services
        .iter()
        .filter_map(Result::ok)
        .map(|(k, v)| json!({"vip": addr(k.ip4, k.port), "service_id": v.service_id}))
        .collect();
    // IPv6 VIPs (absent from the pins of an agent before them).
    if let Ok(data) = open(dir, maps::SERVICES6) {
        let v6: HashMap<_, ServiceKey6, ServiceValue> =
            HashMap::try_from(Map::HashMap(data)).map_err(|e| e.to_string())?;
        services.extend(v6.iter().filter_map(Result::ok).map(|(k, v)| {
            let vip = SocketAddrV6::new(super::ip6_of(k.ip6), u16::from_be(k.port), 0, 0);
            json!({"vip": vip.to_string(), "service_id": v.service_id})
        }));
    }
    let opted: HashMap<_, u64, u32> =
        HashMap::try_from(Map::HashMap(open(dir, maps::OPTED_IN_CGROUPS)?))
            .map_err(|e| e.to_string())?;
    let opted: Vec<u64> = opted.keys().filter_map(Result::ok).collect();
    let tuples: HashMap<_, SockTuple, OrigDst> =
        HashMap::try_from(Map::LruHashMap(open(dir, maps::ORIG_DST_BY_TUPLE)?))
            .map_err(|e| e.to_string())?;
    let tuples: Vec<Value> = tuples
        .iter()
        .filter_map(Result::ok)
        .take(1000)
        .map(|(k, v)| {
            json!({
                "client": addr(k.src_ip4, k.src_port),
                "proxy": addr(k.dst_ip4, k.dst_port),
                "original_destination": addr(v.ip4, v.port),
                "service_id": v.service_id,
            })
        })
        .collect();
    let cookies: HashMap<_, u64, OrigDst> =
        HashMap::try_from(Map::LruHashMap(open(dir, maps::ORIG_DST_BY_COOKIE)?))
            .map_err(|e| e.to_string())?;
    let cookies = cookies.keys().count();
    let counters: PerCpuArray<_, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(open(dir, maps::COUNTERS)?))
            .map_err(|e| e.to_string())?;
    let counters: BTreeMap<_, _> = super::read_counters(&counters).into_iter().collect();
    let agents: Array<_, AgentState> =
        Array::try_from(Map::Array(open(dir, maps::AGENT_STATE)?)).map_err(|e| e.to_string())?;
    let slots = super::read_slots(&agents);
    // The agent that takes connections (the programs use the first serving slot), else the
    // first live one, else slot 0.
    let main = slots
        .iter()
        .find(|s| s.live && s.redirect)
        .or_else(|| slots.iter().find(|s| s.live))
        .unwrap_or(&slots[0]);
    // The kernel's id of each pinned map: the same id later means the same map.
    let map_ids: BTreeMap<&str, u32> = balancer_common::SHARED_MAPS
        .iter()
        .filter_map(|m| {
            let info = open(dir, m.name).ok()?.info().ok()?;
            Some((m.name, info.id()))
        })
        .collect();
    Ok(json!({
        "pin_path": dir.display().to_string(),
        "map_ids": map_ids,
        "agent": {
            "alive": main.live,
            "lease_remaining_ms": main.lease_remaining_ms,
            "proxy_address": main.proxy_address,
            "redirect": main.live && main.redirect,
            "serving": slots.iter().filter(|s| s.live && s.redirect).count(),
            "slots": slots,
        },
        "services": services,
        "opted_in_cgroups": opted,
        "orig_dst_by_tuple": tuples,
        "orig_dst_by_cookie": cookies,
        "counters": counters,
    }))
}
