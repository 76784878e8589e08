//! The kernel/userspace ABI of balancer.
//!
//! Everything that crosses the boundary between the eBPF programs (`balancer-ebpf`) and the
//! agent (`balancer-agent`) is defined here, once: map names and capacities, and the layout of
//! every key and value. Each type is `#[repr(C)]` with explicit padding so that the kernel and
//! userspace agree byte for byte, and each carries a compile-time size assertion.
//!
//! Addresses and ports are stored in **network byte order**, exactly as the kernel hands them to
//! the programs (`bpf_sock_addr.user_ip4`, `bpf_sock_ops.remote_ip4`), so the hot kernel path
//! never swaps bytes. Userspace converts at the edge (see `balancer-agent`'s `ebpf` module).
//!
//! This crate must stay `no_std` and free of dependencies on the kernel side.
#![no_std]

/// Names of the maps in the eBPF object, as the loader looks them up (at most 15 bytes: the
/// kernel keeps 15 characters of a map name).
///
/// Every map but [`SOCKETS`](maps::SOCKETS) and [`LOCAL`](maps::LOCAL) is **shared by the
/// agents of a node** ([`SHARED_MAPS`]): pinned by name under the agent's pin directory and
/// adopted, not created, by an agent that finds it there, so that two agents (an old and a new
/// one during a rollout) see the same services, opted-in pods, original destinations and
/// liveness slots.
pub mod maps {
    /// `HashMap<ServiceKey, ServiceValue>`: the gRPC Service VIP:ports that are redirected.
    /// Written by the agent (discovery), read by `connect4` and `connect6` (IPv4-mapped).
    pub const SERVICES: &str = "BLB_SERVICES";
    /// `HashMap<ServiceKey6, ServiceValue>`: the IPv6 Service VIP:ports that are redirected.
    /// Written by the agent, read by `connect6`.
    pub const SERVICES6: &str = "BLB_SERVICES6";
    /// `HashMap<u64, u32>`: cgroup ids of opted-in pods (a pod cgroup covers its containers).
    /// Written by the agent, read by `connect4` and `connect6`.
    pub const OPTED_IN_CGROUPS: &str = "BLB_OPTED_IN";
    /// `LruHashMap<u64, OrigDst>`: socket cookie to the IPv4 destination the pod asked for.
    /// Written by `connect4` and `connect6` (IPv4-mapped), consumed (and deleted) by
    /// `sock_ops` once the connection is up.
    pub const ORIG_DST_BY_COOKIE: &str = "BLB_ORIG_COOKIE";
    /// `LruHashMap<SockTuple, OrigDst>`: the client side IPv4 4-tuple of a redirected
    /// connection (an IPv4-mapped one as IPv4) to its original destination. Written by
    /// `sock_ops`, read by the agent at accept, deleted by `sock_ops` when the connection
    /// closes.
    pub const ORIG_DST_BY_TUPLE: &str = "BLB_ORIG_TUPLE";
    /// `LruHashMap<u64, OrigDst6>`: socket cookie to the IPv6 destination the pod asked for.
    /// Written by `connect6`, consumed by `sock_ops`.
    pub const ORIG_DST_BY_COOKIE6: &str = "BLB_ORIG_COOKIE6";
    /// `LruHashMap<SockTuple6, OrigDst6>`: [`ORIG_DST_BY_TUPLE`] for native IPv6 connections.
    pub const ORIG_DST_BY_TUPLE6: &str = "BLB_ORIG_TUPLE6";
    /// `Array<AgentState>` of [`MAX_AGENTS`](crate::MAX_AGENTS) slots: each running agent's
    /// proxy address, liveness lease and flags. Each agent writes only its own slot; the
    /// programs redirect while any slot holds a live lease with [`AGENT_FLAG_REDIRECT`](crate::AGENT_FLAG_REDIRECT).
    pub const AGENT_STATE: &str = "BLB_AGENT";
    /// `PerCpuArray<u64>` indexed by [`Counter`](crate::Counter). Written by every program.
    pub const COUNTERS: &str = "BLB_COUNTERS";
    /// `SockHash<SockTuple>`: established redirected sockets, for the `sk_msg` shortcut.
    /// Written by `sock_ops` (and by the agent's self-test), read by `sk_msg`. One per agent,
    /// never pinned: an `sk_msg` program is attached to a socket map, and a socket can be in
    /// only one map that has one; a second agent's insert of a socket already in the first
    /// agent's map fails (`EBUSY`), which is harmless: the message then goes by the first
    /// agent's map, or by TCP.
    pub const SOCKETS: &str = "BLB_SOCKETS";
    /// `Array<u32>` of one element: this agent's own flags ([`LOCAL_FLAG_SHORTCUT`](crate::LOCAL_FLAG_SHORTCUT)),
    /// for the programs it loaded. One per agent, never pinned.
    pub const LOCAL: &str = "BLB_LOCAL";
}

/// The kind of a map, for the check an agent makes before adopting a pinned map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    /// `BPF_MAP_TYPE_HASH`.
    Hash,
    /// `BPF_MAP_TYPE_LRU_HASH`.
    LruHash,
    /// `BPF_MAP_TYPE_ARRAY`.
    Array,
    /// `BPF_MAP_TYPE_PERCPU_ARRAY`.
    PerCpuArray,
}

/// A shared map's layout: what an agent checks of a pinned map before it adopts it. A map
/// pinned by an agent whose layout differs (another ABI) is never adopted nor removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    /// The map's name (and pin file name).
    pub name: &'static str,
    /// Its type.
    pub kind: MapKind,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes (per CPU for a per-CPU map).
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
}

const fn layout(
    name: &'static str,
    kind: MapKind,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
) -> MapLayout {
    MapLayout {
        name,
        kind,
        key_size: key_size as u32,
        value_size: value_size as u32,
        max_entries,
    }
}

/// The maps the agents of a node share through pins, with their layouts.
#[rustfmt::skip]
pub const SHARED_MAPS: [MapLayout; 9] = {
    use core::mem::size_of;
    use MapKind::*;
    [
        layout(maps::SERVICES, Hash, size_of::<ServiceKey>(), size_of::<ServiceValue>(), MAX_SERVICES),
        layout(maps::SERVICES6, Hash, size_of::<ServiceKey6>(), size_of::<ServiceValue>(), MAX_SERVICES),
        layout(maps::OPTED_IN_CGROUPS, Hash, 8, 4, MAX_OPTED_IN_CGROUPS),
        layout(maps::ORIG_DST_BY_COOKIE, LruHash, 8, size_of::<OrigDst>(), MAX_TRACKED_CONNECTIONS),
        layout(maps::ORIG_DST_BY_TUPLE, LruHash, size_of::<SockTuple>(), size_of::<OrigDst>(), MAX_TRACKED_CONNECTIONS),
        layout(maps::ORIG_DST_BY_COOKIE6, LruHash, 8, size_of::<OrigDst6>(), MAX_TRACKED_CONNECTIONS),
        layout(maps::ORIG_DST_BY_TUPLE6, LruHash, size_of::<SockTuple6>(), size_of::<OrigDst6>(), MAX_TRACKED_CONNECTIONS),
        layout(maps::AGENT_STATE, Array, 4, size_of::<AgentState>(), MAX_AGENTS),
        layout(maps::COUNTERS, PerCpuArray, 4, 8, COUNTER_COUNT),
    ]
};

/// Names of the programs in the eBPF object.
pub mod programs {
    /// `cgroup/connect4`: rewrites connects to Service VIPs into the node proxy.
    pub const CONNECT4: &str = "blb_connect4";
    /// `cgroup/connect6`: the same for AF_INET6 sockets (IPv4-mapped and IPv6 VIPs).
    pub const CONNECT6: &str = "blb_connect6";
    /// `sockops`: records original destinations by 4-tuple and fills the socket map.
    pub const SOCK_OPS: &str = "blb_sock_ops";
    /// `sk_msg`: the same-node shortcut between a pod's socket and the proxy's socket.
    pub const SK_MSG: &str = "blb_sk_msg";
}

/// Capacity of [`maps::SERVICES`]: Service VIP:port pairs.
pub const MAX_SERVICES: u32 = 65_536;
/// Capacity of [`maps::OPTED_IN_CGROUPS`]: pods on one node (with room for containers).
pub const MAX_OPTED_IN_CGROUPS: u32 = 16_384;
/// Capacity of the original-destination maps: concurrent redirected connections per node.
pub const MAX_TRACKED_CONNECTIONS: u32 = 65_536;
/// Capacity of [`maps::SOCKETS`].
pub const MAX_SOCKETS: u32 = 65_536;
/// Slots of [`maps::AGENT_STATE`]: agents that can run side by side on a node (an old and a
/// new one during a rollout, with room to spare).
pub const MAX_AGENTS: u32 = 4;
/// How many cgroup ancestors `connect4` checks against [`maps::OPTED_IN_CGROUPS`]: a container's
/// cgroup sits a few levels below its pod's (kubepods/burstable/pod<uid>/<container>).
pub const MAX_CGROUP_DEPTH: u32 = 12;

/// A Service VIP and port, in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// IPv4 address, network byte order.
    pub ip4: u32,
    /// TCP port, network byte order, in the low 16 bits as `bpf_sock_addr.user_port` holds it.
    pub port: u16,
    /// Explicit padding; always zero.
    pub _pad: u16,
}

/// What the datapath knows of a redirected Service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// The agent's id for the service (index into its store); reported back in counters.
    pub service_id: u32,
    /// Reserved flags; zero today.
    pub flags: u32,
}

/// An original destination, in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// IPv4 address the pod dialed, network byte order.
    pub ip4: u32,
    /// Port the pod dialed, network byte order.
    pub port: u16,
    /// Explicit padding; always zero.
    pub _pad: u16,
    /// The [`ServiceValue::service_id`] that matched.
    pub service_id: u32,
    /// The id (tgid, in the initial pid namespace) of the process that connected: the agent
    /// finds the client pod's network namespace through it. Zero if unknown.
    pub pid: u32,
}

/// A TCP 4-tuple as seen from the pod's socket: `src` is the pod, `dst` the proxy.
/// Also used, with the ends swapped, as the key of the proxy's accepted socket in
/// [`maps::SOCKETS`]. All fields are in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockTuple {
    /// Source IPv4 address.
    pub src_ip4: u32,
    /// Destination IPv4 address.
    pub dst_ip4: u32,
    /// Source port, network byte order.
    pub src_port: u16,
    /// Destination port, network byte order.
    pub dst_port: u16,
}

/// An IPv6 Service VIP and port, in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey6 {
    /// IPv6 address as `bpf_sock_addr.user_ip6` holds it: four words, network byte order.
    pub ip6: [u32; 4],
    /// TCP port, network byte order.
    pub port: u16,
    /// Explicit padding; always zero.
    pub _pad: u16,
}

/// An original IPv6 destination, in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst6 {
    /// IPv6 address the pod dialed.
    pub ip6: [u32; 4],
    /// Port the pod dialed.
    pub port: u16,
    /// Explicit padding; always zero.
    pub _pad: u16,
    /// The [`ServiceValue::service_id`] that matched.
    pub service_id: u32,
    /// As [`OrigDst::pid`].
    pub pid: u32,
}

/// [`SockTuple`] for IPv6: the pod's end first.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockTuple6 {
    /// Source IPv6 address.
    pub src_ip6: [u32; 4],
    /// Destination IPv6 address.
    pub dst_ip6: [u32; 4],
    /// Source port, network byte order.
    pub src_port: u16,
    /// Destination port, network byte order.
    pub dst_port: u16,
}

/// One agent's slot in [`maps::AGENT_STATE`]: where its proxy listens and until when it is
/// known to be alive. The programs redirect only while some slot's `alive_until_ns` is in the
/// future with [`AGENT_FLAG_REDIRECT`], so an agent that dies or hangs stops redirecting by
/// itself (fail open). Every layout of this type starts with `alive_until_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AgentState {
    /// `CLOCK_MONOTONIC` nanoseconds (as `bpf_ktime_get_ns`) until which the agent is alive;
    /// zero for a free slot.
    pub alive_until_ns: u64,
    /// The proxy's IPv4 address, network byte order.
    pub proxy_ip4: u32,
    /// The proxy's IPv4 port, network byte order.
    pub proxy_port: u16,
    /// The proxy's IPv6 port, network byte order; zero when the agent has no IPv6 proxy
    /// address (native IPv6 VIPs are then left alone).
    pub proxy6_port: u16,
    /// [`AGENT_FLAG_REDIRECT`].
    pub flags: u32,
    /// The agent's process id, for `inspect bpf` and for an agent to tell its slot was taken.
    pub pid: u32,
    /// The proxy's IPv6 address, network byte order (as `bpf_sock_addr.user_ip6`).
    pub proxy_ip6: [u32; 4],
}

/// [`AgentState::flags`]: this agent takes redirected connections (off while a new agent
/// gets ready, and while an old one drains).
pub const AGENT_FLAG_REDIRECT: u32 = 1;
/// [`maps::LOCAL`]'s flag: insert sockets in this agent's [`maps::SOCKETS`] for the `sk_msg`
/// shortcut (its self-test passed).
pub const LOCAL_FLAG_SHORTCUT: u32 = 2;

/// Indices of [`maps::COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// `connect4` ran.
    Connect4Calls = 0,
    /// `connect4` rewrote a connect to the proxy.
    Connect4Redirected = 1,
    /// `connect4` saw a Service VIP from a cgroup that is not opted in.
    Connect4NotOptedIn = 2,
    /// `connect4` saw a Service VIP while the agent's lease had expired (fail open).
    Connect4AgentDown = 3,
    /// `sock_ops` recorded an original destination by 4-tuple.
    SockOpsTracked = 4,
    /// `sock_ops` removed a closed connection's entry.
    SockOpsClosed = 5,
    /// `sk_msg` redirected a message to its peer socket.
    SkMsgRedirected = 6,
    /// `sk_msg` passed a message to TCP (no peer in the map).
    SkMsgPassed = 7,
    /// A map update failed (full map or a kernel error).
    MapUpdateFailed = 8,
    /// `connect6` ran.
    Connect6Calls = 9,
    /// `connect6` rewrote a connect to the proxy (IPv4-mapped or IPv6 VIP).
    Connect6Redirected = 10,
    /// `connect6` saw a Service VIP from a cgroup that is not opted in.
    Connect6NotOptedIn = 11,
    /// `connect6` saw a Service VIP while no agent's lease was live (fail open).
    Connect6AgentDown = 12,
    /// A socket could not go into this agent's shortcut map (typically: it is already in
    /// another agent's, during a rollout); the shortcut is skipped, TCP carries the data.
    ShortcutInsertFailed = 13,
}

/// Number of counters in [`maps::COUNTERS`].
pub const COUNTER_COUNT: u32 = 14;

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::Connect4Calls,
        Counter::Connect4Redirected,
        Counter::Connect4NotOptedIn,
        Counter::Connect4AgentDown,
        Counter::SockOpsTracked,
        Counter::SockOpsClosed,
        Counter::SkMsgRedirected,
        Counter::SkMsgPassed,
        Counter::MapUpdateFailed,
        Counter::Connect6Calls,
        Counter::Connect6Redirected,
        Counter::Connect6NotOptedIn,
        Counter::Connect6AgentDown,
        Counter::ShortcutInsertFailed,
    ];

    /// A stable snake_case name, used in metrics and `inspect bpf`.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Connect4Calls => "connect4_calls",
            Counter::Connect4Redirected => "connect4_redirected",
            Counter::Connect4NotOptedIn => "connect4_not_opted_in",
            Counter::Connect4AgentDown => "connect4_agent_down",
            Counter::SockOpsTracked => "sock_ops_tracked",
            Counter::SockOpsClosed => "sock_ops_closed",
            Counter::SkMsgRedirected => "sk_msg_redirected",
            Counter::SkMsgPassed => "sk_msg_passed",
            Counter::MapUpdateFailed => "map_update_failed",
            Counter::Connect6Calls => "connect6_calls",
            Counter::Connect6Redirected => "connect6_redirected",
            Counter::Connect6NotOptedIn => "connect6_not_opted_in",
            Counter::Connect6AgentDown => "connect6_agent_down",
            Counter::ShortcutInsertFailed => "shortcut_insert_failed",
        }
    }
}

// The kernel and userspace must agree on these sizes; a change here is an ABI change.
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 8);
const _: () = assert!(core::mem::size_of::<OrigDst>() == 16);
const _: () = assert!(core::mem::size_of::<SockTuple>() == 12);
const _: () = assert!(core::mem::size_of::<AgentState>() == 40);
const _: () = assert!(core::mem::size_of::<ServiceKey6>() == 20);
const _: () = assert!(core::mem::size_of::<OrigDst6>() == 28);
const _: () = assert!(core::mem::size_of::<SockTuple6>() == 36);
const _: () = assert!(Counter::ALL.len() == COUNTER_COUNT as usize);

#[cfg(feature = "user")]
#[allow(unsafe_code)] // `aya::Pod` is an unsafe trait: its impls promise plain old data.
mod pod {
    // SAFETY: every type below is `#[repr(C)]`, `Copy`, made only of integers, and has its
    // padding spelled out as fields, so any byte pattern is a valid value.
    unsafe impl aya::Pod for super::ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockTuple {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AgentState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceKey6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockTuple6 {}
}
