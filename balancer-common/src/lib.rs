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
pub mod maps {
    /// `HashMap<ServiceKey, ServiceValue>`: the gRPC Service VIP:ports that are redirected.
    /// Written by the agent (discovery), read by `connect4`.
    pub const SERVICES: &str = "BLB_SERVICES";
    /// `HashMap<u64, u32>`: cgroup ids of opted-in pods (a pod cgroup covers its containers).
    /// Written by the agent, read by `connect4`.
    pub const OPTED_IN_CGROUPS: &str = "BLB_OPTED_IN";
    /// `LruHashMap<u64, OrigDst>`: socket cookie to the destination the pod asked for.
    /// Written by `connect4`, consumed (and deleted) by `sock_ops` once the connection is up.
    pub const ORIG_DST_BY_COOKIE: &str = "BLB_ORIG_COOKIE";
    /// `LruHashMap<SockTuple, OrigDst>`: the client side 4-tuple of a redirected connection to
    /// its original destination. Written by `sock_ops`, read by the agent at accept, deleted by
    /// `sock_ops` when the connection closes.
    pub const ORIG_DST_BY_TUPLE: &str = "BLB_ORIG_TUPLE";
    /// `Array<AgentState>` of one element: the proxy's address and the agent's liveness lease.
    /// Written by the agent, read by `connect4`.
    pub const AGENT_STATE: &str = "BLB_AGENT";
    /// `PerCpuArray<u64>` indexed by [`Counter`](crate::Counter). Written by every program.
    pub const COUNTERS: &str = "BLB_COUNTERS";
    /// `SockHash<SockTuple>`: established redirected sockets, for the `sk_msg` shortcut.
    /// Written by `sock_ops` (and by the agent's self-test), read by `sk_msg`.
    pub const SOCKETS: &str = "BLB_SOCKETS";
}

/// Names of the programs in the eBPF object.
pub mod programs {
    /// `cgroup/connect4`: rewrites connects to Service VIPs into the node proxy.
    pub const CONNECT4: &str = "blb_connect4";
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

/// The agent's state as the kernel sees it: where the proxy listens and until when the agent
/// is known to be alive. `connect4` redirects only while `alive_until_ns` is in the future, so
/// an agent that dies or hangs stops redirecting by itself (fail open).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AgentState {
    /// `CLOCK_MONOTONIC` nanoseconds (as `bpf_ktime_get_ns`) until which the agent is alive.
    pub alive_until_ns: u64,
    /// The proxy's IPv4 address, network byte order.
    pub proxy_ip4: u32,
    /// The proxy's port, network byte order.
    pub proxy_port: u16,
    /// Explicit padding; always zero.
    pub _pad: u16,
    /// [`AGENT_FLAG_REDIRECT`] and friends.
    pub flags: u32,
    /// Explicit padding; always zero.
    pub _pad2: u32,
}

/// [`AgentState::flags`]: redirect connects at all (cleared while the agent drains).
pub const AGENT_FLAG_REDIRECT: u32 = 1;
/// [`AgentState::flags`]: insert sockets in [`maps::SOCKETS`] for the `sk_msg` shortcut.
pub const AGENT_FLAG_SHORTCUT: u32 = 2;

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
}

/// Number of counters in [`maps::COUNTERS`].
pub const COUNTER_COUNT: u32 = 9;

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
        }
    }
}

// The kernel and userspace must agree on these sizes; a change here is an ABI change.
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 8);
const _: () = assert!(core::mem::size_of::<OrigDst>() == 16);
const _: () = assert!(core::mem::size_of::<SockTuple>() == 12);
const _: () = assert!(core::mem::size_of::<AgentState>() == 24);
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
}
