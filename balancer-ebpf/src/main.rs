//! balancer's kernel programs.
//!
//! - `blb_connect4` (cgroup `connect4`): a pod that opted in connects to a gRPC Service
//!   VIP:port; while some agent's lease is fresh the connect is rewritten to the node proxy and
//!   the original destination is recorded by socket cookie.
//! - `blb_connect6` (cgroup `connect6`): the same for AF_INET6 sockets: to an IPv4-mapped VIP
//!   (`::ffff:a.b.c.d`, how gRPC's C-core dials IPv4) exactly as `connect4`, to an IPv6 VIP
//!   towards the proxy's IPv6 address.
//! - `blb_sock_ops` (`sockops`): once such a connection is established, its original
//!   destination is re-keyed by the client's 4-tuple (what the proxy sees at accept; IPv4 for
//!   an IPv4-mapped socket) and removed again when the socket closes; with the shortcut on,
//!   both ends go into this agent's socket map.
//! - `blb_sk_msg` (`sk_msg`): the optional same-node shortcut; a message written on one end is
//!   put straight on the peer socket's receive queue, bypassing TCP.
//!
//! Several agents may have these programs attached at once (a rollout): they share every map
//! but the socket map and `BLB_LOCAL`, and behave the same, so whichever runs first does the
//! work and the others find nothing left to do (see the agent's `ebpf` module).
//!
//! These programs never drop or refuse a connection: every error path lets the connect proceed
//! untouched (fail open). All addresses and ports are kept in network byte order.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE, sk_action::SK_PASS,
    },
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_pid_tgid, bpf_get_socket_cookie,
        bpf_ktime_get_ns,
    },
    macros::{cgroup_sock_addr, map, sk_msg, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkMsgContext, SockAddrContext, SockOpsContext},
};
use balancer_common::{
    AGENT_FLAG_REDIRECT, AgentState, COUNTER_COUNT, Counter, LOCAL_FLAG_SHORTCUT, MAX_AGENTS,
    MAX_CGROUP_DEPTH, MAX_OPTED_IN_CGROUPS, MAX_SERVICES, MAX_SOCKETS, MAX_TRACKED_CONNECTIONS,
    OrigDst, OrigDst6, ServiceKey, ServiceKey6, ServiceValue, SockTuple, SockTuple6,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
/// A cgroup sock_addr program allows the operation by returning 1.
const ALLOW: i32 = 1;

#[map(name = "BLB_SERVICES")]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map(name = "BLB_OPTED_IN")]
static OPTED_IN: HashMap<u64, u32> = HashMap::with_max_entries(MAX_OPTED_IN_CGROUPS, 0);

#[map(name = "BLB_ORIG_COOKIE")]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> =
    LruHashMap::with_max_entries(MAX_TRACKED_CONNECTIONS, 0);

#[map(name = "BLB_ORIG_TUPLE")]
static ORIG_BY_TUPLE: LruHashMap<SockTuple, OrigDst> =
    LruHashMap::with_max_entries(MAX_TRACKED_CONNECTIONS, 0);

#[map(name = "BLB_SERVICES6")]
static SERVICES6: HashMap<ServiceKey6, ServiceValue> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map(name = "BLB_ORIG_COOKIE6")]
static ORIG_BY_COOKIE6: LruHashMap<u64, OrigDst6> =
    LruHashMap::with_max_entries(MAX_TRACKED_CONNECTIONS, 0);

#[map(name = "BLB_ORIG_TUPLE6")]
static ORIG_BY_TUPLE6: LruHashMap<SockTuple6, OrigDst6> =
    LruHashMap::with_max_entries(MAX_TRACKED_CONNECTIONS, 0);

#[map(name = "BLB_AGENT")]
static AGENT: Array<AgentState> = Array::with_max_entries(MAX_AGENTS, 0);

#[map(name = "BLB_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

#[map(name = "BLB_SOCKETS")]
static SOCKETS: SockHash<SockTuple> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map(name = "BLB_LOCAL")]
static LOCAL: Array<u32> = Array::with_max_entries(1, 0);

/// Per-CPU counters: there is no atomic fetch_add on bpfel with this toolchain, and per-CPU
/// slots need none.
#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer comes from the map lookup and is this CPU's slot.
        unsafe { *slot += 1 };
    }
}

/// The first agent slot with a live lease that takes redirected connections. Every agent of
/// the node listens on the same proxy address (SO_REUSEPORT), so which one is found matters
/// only for the address.
#[inline(always)]
fn serving_agent() -> Option<AgentState> {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut i = 0;
    while i < MAX_AGENTS {
        if let Some(state) = AGENT.get(i)
            && state.alive_until_ns > now
            && state.flags & AGENT_FLAG_REDIRECT != 0
        {
            return Some(*state);
        }
        i += 1;
    }
    None
}

/// Whether `ip:port` (network byte order) is the proxy address of an agent with a live lease.
#[inline(always)]
fn is_proxy_address(ip4: u32, port: u16) -> bool {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut i = 0;
    while i < MAX_AGENTS {
        if let Some(state) = AGENT.get(i)
            && state.alive_until_ns > now
            && state.proxy_ip4 == ip4
            && state.proxy_port == port
        {
            return true;
        }
        i += 1;
    }
    false
}

/// The id of the process that is connecting: its tgid, in the initial pid namespace.
#[inline(always)]
fn current_pid() -> u32 {
    // SAFETY: a helper without arguments. The upper half is the tgid.
    (unsafe { bpf_get_current_pid_tgid() } >> 32) as u32
}

/// Whether the current task's cgroup, or one of its ancestors, opted in. Pods are opted in by
/// their pod-level cgroup, which covers every container cgroup below it.
#[inline(always)]
fn cgroup_opted_in() -> bool {
    let mut level = 1;
    while level <= MAX_CGROUP_DEPTH {
        // SAFETY: a helper taking a plain integer.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            // Deeper than the current cgroup.
            return false;
        }
        if OPTED_IN.get_ptr(id).is_some() {
            return true;
        }
        level += 1;
    }
    false
}

/// The counters of one connect program.
struct ConnectCounters {
    redirected: Counter,
    not_opted_in: Counter,
    agent_down: Counter,
}

const CONNECT4: ConnectCounters = ConnectCounters {
    redirected: Counter::Connect4Redirected,
    not_opted_in: Counter::Connect4NotOptedIn,
    agent_down: Counter::Connect4AgentDown,
};

const CONNECT6: ConnectCounters = ConnectCounters {
    redirected: Counter::Connect6Redirected,
    not_opted_in: Counter::Connect6NotOptedIn,
    agent_down: Counter::Connect6AgentDown,
};

/// Whether a connect to a Service VIP is taken: `agent` serves, and the connecting cgroup
/// opted in. Counts why not.
#[inline(always)]
fn take(c: &ConnectCounters, agent: Option<AgentState>) -> Option<AgentState> {
    let Some(agent) = agent else {
        count(c.agent_down);
        return None;
    };
    if !cgroup_opted_in() {
        count(c.not_opted_in);
        return None;
    }
    Some(agent)
}

/// The socket cookie of a connect.
#[inline(always)]
fn cookie_of(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the sock_addr context is a valid argument for bpf_get_socket_cookie.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

/// A connect to IPv4 `ip4:port` (network byte order; from `connect4`, or `connect6` for an
/// IPv4-mapped address): if it is a Service VIP to redirect, records the original destination
/// by socket cookie and returns the agent to send it to.
#[inline(always)]
fn redirect_v4(
    ctx: &SockAddrContext,
    ip4: u32,
    port: u16,
    c: &ConnectCounters,
) -> Option<AgentState> {
    let key = ServiceKey { ip4, port, _pad: 0 };
    // SAFETY: the value is copied out at once.
    let service = *unsafe { SERVICES.get(&key) }?;
    let agent = take(c, serving_agent())?;
    let orig = OrigDst {
        ip4,
        port,
        _pad: 0,
        service_id: service.service_id,
        pid: current_pid(),
    };
    if ORIG_BY_COOKIE.insert(&cookie_of(ctx), &orig, 0).is_err() {
        // Without a record the proxy could not tell the service: leave the connect alone.
        count(Counter::MapUpdateFailed);
        return None;
    }
    Some(agent)
}

#[cgroup_sock_addr(connect4)]
pub fn blb_connect4(ctx: SockAddrContext) -> i32 {
    count(Counter::Connect4Calls);
    let _ = try_connect4(&ctx);
    ALLOW
}

fn try_connect4(ctx: &SockAddrContext) -> Result<(), ()> {
    let addr = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the whole program; reads are of 4-byte fields.
    let (family, sock_type, ip4, port) = unsafe {
        (
            (*addr).user_family,
            (*addr).type_,
            (*addr).user_ip4,
            (*addr).user_port,
        )
    };
    if family != AF_INET || sock_type != SOCK_STREAM {
        return Ok(());
    }
    let agent = redirect_v4(ctx, ip4, port as u16, &CONNECT4).ok_or(())?;
    // SAFETY: writes of 4-byte context fields, each on its own: LLVM may otherwise merge the
    // two stores into one 8-byte store, which the verifier refuses for this context.
    unsafe {
        core::ptr::write_volatile(&raw mut (*addr).user_ip4, agent.proxy_ip4);
        core::ptr::write_volatile(&raw mut (*addr).user_port, u32::from(agent.proxy_port));
    }
    count(CONNECT4.redirected);
    Ok(())
}

/// The third word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), as the kernel holds it.
const V4_MAPPED_WORD: u32 = 0x0000_ffff_u32.to_be();

/// The IPv4 address inside an IPv4-mapped IPv6 address (four words, network byte order).
#[inline(always)]
fn v4_mapped(ip6: &[u32; 4]) -> Option<u32> {
    (ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_WORD).then_some(ip6[3])
}

/// Reads four 4-byte context words one by one (the verifier refuses wider reads of some).
///
/// # Safety
/// `p` points to four readable `u32` words of a program context.
#[inline(always)]
unsafe fn read_ip6(p: *const u32) -> [u32; 4] {
    // SAFETY: the caller promises four readable words.
    unsafe {
        [
            core::ptr::read_volatile(p),
            core::ptr::read_volatile(p.add(1)),
            core::ptr::read_volatile(p.add(2)),
            core::ptr::read_volatile(p.add(3)),
        ]
    }
}

/// Writes four 4-byte context words one by one.
///
/// # Safety
/// `p` points to four writable `u32` words of a program context.
#[inline(always)]
unsafe fn write_ip6(p: *mut u32, ip6: [u32; 4]) {
    // SAFETY: the caller promises four writable words.
    unsafe {
        core::ptr::write_volatile(p, ip6[0]);
        core::ptr::write_volatile(p.add(1), ip6[1]);
        core::ptr::write_volatile(p.add(2), ip6[2]);
        core::ptr::write_volatile(p.add(3), ip6[3]);
    }
}

/// The first slot with a live lease that takes redirected connections and has an IPv6 proxy
/// address.
#[inline(always)]
fn serving_agent6() -> Option<AgentState> {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut i = 0;
    while i < MAX_AGENTS {
        if let Some(state) = AGENT.get(i)
            && state.alive_until_ns > now
            && state.flags & AGENT_FLAG_REDIRECT != 0
            && state.proxy6_port != 0
        {
            return Some(*state);
        }
        i += 1;
    }
    None
}

/// `connect6`: an AF_INET6 stream socket connects. gRPC's C-core (Python, C++, Ruby, PHP)
/// dials IPv4 targets through AF_INET6 sockets whenever the host has IPv6, to `::ffff:VIP`:
/// such a connect to an IPv4 VIP is sent to `::ffff:<proxy IPv4>` exactly as `connect4`
/// would, and its original destination recorded as IPv4, so the proxy, which accepts it on
/// its IPv4 listener, finds it by the IPv4 4-tuple. A connect to an IPv6 VIP goes to the
/// proxy's IPv6 address, its original destination in the IPv6 maps.
#[cgroup_sock_addr(connect6)]
pub fn blb_connect6(ctx: SockAddrContext) -> i32 {
    count(Counter::Connect6Calls);
    let _ = try_connect6(&ctx);
    ALLOW
}

fn try_connect6(ctx: &SockAddrContext) -> Result<(), ()> {
    let addr = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the whole program; reads are of 4-byte fields.
    let (family, sock_type, ip6, port) = unsafe {
        (
            (*addr).user_family,
            (*addr).type_,
            read_ip6((&raw const (*addr).user_ip6).cast()),
            (*addr).user_port,
        )
    };
    if family != AF_INET6 || sock_type != SOCK_STREAM {
        return Ok(());
    }
    let port = port as u16;
    let (to, to_port) = match v4_mapped(&ip6) {
        Some(ip4) => {
            let agent = redirect_v4(ctx, ip4, port, &CONNECT6).ok_or(())?;
            ([0, 0, V4_MAPPED_WORD, agent.proxy_ip4], agent.proxy_port)
        }
        None => {
            let key = ServiceKey6 { ip6, port, _pad: 0 };
            // SAFETY: the value is copied out at once.
            let service = *unsafe { SERVICES6.get(&key) }.ok_or(())?;
            let agent = take(&CONNECT6, serving_agent6()).ok_or(())?;
            let orig = OrigDst6 {
                ip6,
                port,
                _pad: 0,
                service_id: service.service_id,
                pid: current_pid(),
            };
            if ORIG_BY_COOKIE6.insert(&cookie_of(ctx), &orig, 0).is_err() {
                count(Counter::MapUpdateFailed);
                return Err(());
            }
            (agent.proxy_ip6, agent.proxy6_port)
        }
    };
    // SAFETY: 4-byte writes of context fields, each on its own.
    unsafe {
        write_ip6((&raw mut (*addr).user_ip6).cast(), to);
        core::ptr::write_volatile(&raw mut (*addr).user_port, u32::from(to_port));
    }
    count(CONNECT6.redirected);
    Ok(())
}

/// The port of a `bpf_sock_ops`/`sk_msg_md` `remote_port` field in network byte order: the
/// kernel stores the big-endian port in the upper half of the word on little-endian hosts
/// (`sock_ops_convert_ctx_access`, net/core/filter.c).
#[inline(always)]
fn remote_port_be(remote_port: u32) -> u16 {
    (remote_port >> 16) as u16
}

/// `local_port` of `bpf_sock_ops`/`sk_msg_md` is in host byte order.
#[inline(always)]
fn local_port_be(local_port: u32) -> u16 {
    (local_port as u16).to_be()
}

#[sock_ops]
pub fn blb_sock_ops(ctx: SockOpsContext) -> u32 {
    let _ = try_sock_ops(&ctx);
    0
}

/// A socket's addresses as `sock_ops` sees them: IPv4 (an AF_INET socket, or an AF_INET6
/// one whose both ends are IPv4-mapped: a C-core gRPC client's), or native IPv6.
enum Tuple {
    V4(SockTuple),
    V6(SockTuple6),
}

fn tuple_of(ctx: &SockOpsContext) -> Option<Tuple> {
    let ops = ctx.ops;
    let src_port = local_port_be(ctx.local_port());
    let dst_port = remote_port_be(ctx.remote_port());
    match ctx.family() {
        AF_INET => Some(Tuple::V4(SockTuple {
            src_ip4: ctx.local_ip4(),
            dst_ip4: ctx.remote_ip4(),
            src_port,
            dst_port,
        })),
        AF_INET6 => {
            // SAFETY: the context pointer is valid for the whole program; 4-byte reads.
            let (local, remote) = unsafe {
                (
                    read_ip6((&raw const (*ops).local_ip6).cast()),
                    read_ip6((&raw const (*ops).remote_ip6).cast()),
                )
            };
            Some(match (v4_mapped(&local), v4_mapped(&remote)) {
                (Some(src_ip4), Some(dst_ip4)) => Tuple::V4(SockTuple {
                    src_ip4,
                    dst_ip4,
                    src_port,
                    dst_port,
                }),
                _ => Tuple::V6(SockTuple6 {
                    src_ip6: local,
                    dst_ip6: remote,
                    src_port,
                    dst_port,
                }),
            })
        }
        _ => None,
    }
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), ()> {
    // The tuple as this socket sees it: src is the local end.
    match tuple_of(ctx).ok_or(())? {
        Tuple::V4(tuple) => sock_ops_v4(ctx, tuple),
        Tuple::V6(tuple) => sock_ops_v6(ctx, tuple),
    }
}

/// Asks for state callbacks so that the socket's entry goes when it closes.
#[inline(always)]
fn track_close(ctx: &SockOpsContext) {
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

#[inline(always)]
fn cookie_of_sock(ctx: &SockOpsContext) -> u64 {
    // SAFETY: the sock_ops context is a valid argument for bpf_get_socket_cookie.
    unsafe { bpf_get_socket_cookie(ctx.ops.cast()) }
}

fn sock_ops_v4(ctx: &SockOpsContext, tuple: SockTuple) -> Result<(), ()> {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let cookie = cookie_of_sock(ctx);
            // SAFETY: the value is copied out at once.
            let orig = *unsafe { ORIG_BY_COOKIE.get(&cookie) }.ok_or(())?;
            let _ = ORIG_BY_COOKIE.remove(&cookie);
            if ORIG_BY_TUPLE.insert(&tuple, &orig, 0).is_err() {
                count(Counter::MapUpdateFailed);
                return Err(());
            }
            count(Counter::SockOpsTracked);
            track_close(ctx);
            insert_socket(ctx, tuple);
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            // The proxy's end of a redirected connection: only its listening address matters.
            if is_proxy_address(tuple.src_ip4, tuple.src_port) {
                insert_socket(ctx, tuple);
            }
        }
        BPF_SOCK_OPS_STATE_CB => {
            if ctx.arg(1) == BPF_TCP_CLOSE && ORIG_BY_TUPLE.remove(&tuple).is_ok() {
                count(Counter::SockOpsClosed);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Native IPv6: the original destination is re-keyed by the 4-tuple as for IPv4; the
/// shortcut is not used (its socket map is keyed by IPv4 tuples; TCP carries the data).
fn sock_ops_v6(ctx: &SockOpsContext, tuple: SockTuple6) -> Result<(), ()> {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let cookie = cookie_of_sock(ctx);
            // SAFETY: the value is copied out at once.
            let orig = *unsafe { ORIG_BY_COOKIE6.get(&cookie) }.ok_or(())?;
            let _ = ORIG_BY_COOKIE6.remove(&cookie);
            if ORIG_BY_TUPLE6.insert(&tuple, &orig, 0).is_err() {
                count(Counter::MapUpdateFailed);
                return Err(());
            }
            count(Counter::SockOpsTracked);
            track_close(ctx);
        }
        BPF_SOCK_OPS_STATE_CB => {
            if ctx.arg(1) == BPF_TCP_CLOSE && ORIG_BY_TUPLE6.remove(&tuple).is_ok() {
                count(Counter::SockOpsClosed);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Puts an established socket in this agent's shortcut map when its self-test passed.
///
/// With two agents on the node both `sock_ops` programs run for every socket, in the order
/// they were attached, each inserting into its own map: the first succeeds, and the second
/// fails with EBUSY (a socket is in at most one map that has an `sk_msg` program), which is
/// counted and harmless. Both ends of a connection therefore land in the first agent's map
/// whose shortcut is on; if they did not (flags changed in between), `sk_msg` finds no peer
/// and TCP carries the data: correctness never depends on the shortcut.
#[inline(always)]
fn insert_socket(ctx: &SockOpsContext, mut tuple: SockTuple) {
    match LOCAL.get(0) {
        Some(flags) if flags & LOCAL_FLAG_SHORTCUT != 0 => {}
        _ => return,
    }
    // SAFETY: the context pointer is the kernel's bpf_sock_ops for this callback.
    if SOCKETS
        .update(&mut tuple, unsafe { &mut *ctx.ops }, 0)
        .is_err()
    {
        count(Counter::ShortcutInsertFailed);
    }
}

#[sk_msg]
pub fn blb_sk_msg(ctx: SkMsgContext) -> u32 {
    let md = ctx.msg;
    // SAFETY: the context pointer is valid for the whole program; 4-byte field reads.
    let (family, local_port, remote_port) =
        unsafe { ((*md).family, (*md).local_port, (*md).remote_port) };
    let ends = match family {
        // SAFETY: as above.
        AF_INET => unsafe { Some(((*md).local_ip4, (*md).remote_ip4)) },
        AF_INET6 => {
            // SAFETY: as above; a client's AF_INET6 socket with IPv4-mapped ends.
            let (local, remote) = unsafe {
                (
                    read_ip6((&raw const (*md).local_ip6).cast()),
                    read_ip6((&raw const (*md).remote_ip6).cast()),
                )
            };
            v4_mapped(&local).zip(v4_mapped(&remote))
        }
        _ => None,
    };
    let Some((local_ip4, remote_ip4)) = ends else {
        return SK_PASS;
    };
    // The peer socket sees this connection from the other end.
    let mut peer = SockTuple {
        src_ip4: remote_ip4,
        dst_ip4: local_ip4,
        src_port: remote_port_be(remote_port),
        dst_port: local_port_be(local_port),
    };
    let verdict = SOCKETS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS));
    if verdict == i64::from(SK_PASS) {
        count(Counter::SkMsgRedirected);
    } else {
        // No peer in the map: let TCP carry it.
        count(Counter::SkMsgPassed);
    }
    SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
