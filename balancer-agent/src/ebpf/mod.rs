//! Loading, attaching and talking to the kernel programs of `balancer-ebpf`.
//!
//! [`Datapath::load`] loads the object embedded at build time, attaches `connect4`,
//! `connect6` and `sock_ops` at a cgroup (v2) root, and takes typed handles on the maps. Links are owned by
//! this process: if the agent exits, even by SIGKILL, the kernel detaches its programs. While it
//! runs, [`Datapath::heartbeat`] keeps its liveness lease fresh; the programs stop redirecting
//! by themselves when no lease is live (an agent that hangs), so pods always reach their
//! Services (fail open).
//!
//! # Agents side by side (handover)
//!
//! Two agents can run on a node at once, an old one and its replacement during a rollout:
//!
//! - **Shared maps.** The maps of [`SHARED_MAPS`] (services, opted-in cgroups, original
//!   destinations, agent slots, counters) are pinned by name under the pin directory. The
//!   first agent creates and pins them; a later one *adopts* the pinned maps (after checking
//!   their layout: a map of another ABI is neither adopted nor touched, the start fails) instead
//!   of making its own. Pins are never removed at load. Without a pin directory nothing is
//!   shared.
//! - **Slots.** `BLB_AGENT` has [`MAX_AGENTS`] slots. An agent claims a free one (lease
//!   expired) at start, before loading, and renews only its own; `connect4`/`connect6`
//!   redirect while *any* slot has a live lease with the redirect flag, to that slot's proxy
//!   address (every agent of the node listens on the same address, with SO_REUSEPORT).
//! - **Programs side by side.** Each agent attaches its own programs beside any other's (a
//!   bpf_link attachment always runs beside the others, as `BPF_F_ALLOW_MULTI`; that flag is
//!   passed on kernels before 5.7); the kernel runs them in attach order over the same socket
//!   address: the first rewrites the VIP to the proxy address, the second sees the proxy
//!   address, which is no VIP, and leaves it. Likewise the first `sock_ops` consumes the
//!   cookie entry and the second finds none (`root_two_agents_share_the_pinned_maps_...`
//!   checks one redirect per connect). Per-connect counters other than `*_redirected`
//!   (`connect4_calls`, ...) therefore count twice while two agents run.
//! - **The shortcut** (`BLB_SOCKETS`, `sk_msg`) stays per agent; see [`maps::SOCKETS`] for why
//!   a second agent's failed insert is harmless.
//! - **Protocol.** A new agent loads with [`Options::redirect_at_start`] off: its slot is
//!   live but does not redirect, and it writes nothing into the shared services and opted-in
//!   maps (its store may still be empty: the old agent's view stands). Once its listeners and
//!   discovery are ready it calls [`Datapath::set_redirect`]`(true)`, which writes its view of
//!   the services and pods and starts taking connections; the old agent sees it in
//!   [`Datapath::others_serving`], calls `set_redirect(false)` and drains. An agent exits
//!   through [`Datapath::unpin`] (also on drop): it clears its slot ([`Datapath::release`])
//!   and removes the pins only if no other slot holds a live lease, so an agent that fails to
//!   start, or stops, never removes the pins of one that runs.
//!
//! Errors name what is missing: the hook, the kernel option, the path.
//!
//! This is one of the two modules allowed `unsafe` (the clock and socket options), each block
//! with a `SAFETY:` line.

pub mod cgroup;
pub mod pinned;
pub mod shortcut;
pub mod sync;

use std::{
    collections::HashSet,
    fs::File,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapType, PerCpuArray, SockHash},
    programs::{CgroupAttachMode, CgroupSockAddr, SkMsg, SockOps},
};
use balancer_common::{
    AGENT_FLAG_REDIRECT, AgentState, COUNTER_COUNT, Counter, LOCAL_FLAG_SHORTCUT, MAX_AGENTS,
    MapKind, MapLayout, OrigDst, OrigDst6, SHARED_MAPS, ServiceKey, ServiceKey6, ServiceValue,
    SockTuple, SockTuple6, maps, programs,
};
use tracing::{info, warn};

use crate::{
    config::Shortcut,
    proxy::{self, OrigDstLookup},
};

/// The eBPF object, built by `build.rs` (empty when built as a stub).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/balancer"));

/// How long the agent's lease lasts; the agent renews it several times per lease.
pub const LEASE: Duration = Duration::from_millis(750);
/// How often the agent renews its lease.
pub const HEARTBEAT: Duration = Duration::from_millis(200);

/// What went wrong with the datapath.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The binary carries the stub object.
    #[error(
        "this balancer-agent was built without its eBPF programs (stub object): install the BPF \
         toolchain with `cargo xtask setup` and rebuild, then run again"
    )]
    Stub,
    /// The object did not load.
    #[error("loading the eBPF object failed: {source}; {hint}")]
    Load {
        /// The cause.
        source: Box<aya::EbpfError>,
        /// What to check.
        hint: &'static str,
    },
    /// A program did not load or attach.
    #[error("{what} of program {program} ({hook}) failed: {source}; {hint}")]
    Program {
        /// load or attach.
        what: &'static str,
        /// Program name.
        program: &'static str,
        /// The kernel hook.
        hook: &'static str,
        /// The cause.
        source: Box<aya::programs::ProgramError>,
        /// What to check.
        hint: &'static str,
    },
    /// A map is missing or of the wrong type.
    #[error("map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// The cause.
        source: Box<aya::maps::MapError>,
    },
    /// A map is missing from the object.
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    /// The cgroup root could not be opened.
    #[error("cgroup root {path}: {source}")]
    Cgroup {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Pinning failed.
    #[error(
        "pinning maps under {path}: {reason}; is the bpffs mounted (mount -t bpf bpf /sys/fs/bpf)?"
    )]
    Pin {
        /// The directory.
        path: PathBuf,
        /// The cause.
        reason: String,
    },
    /// A pinned map has another layout than this agent's: another version of balancer made
    /// it. It is left as it is.
    #[error(
        "the pinned map {path} has another layout than this agent's ({found}; this agent wants \
         {wanted}): another version of balancer made it, and it is left in place. Run this agent \
         with another datapath.pin_path, or remove the pins once no agent of that version runs"
    )]
    IncompatiblePin {
        /// The pin.
        path: PathBuf,
        /// What the pinned map is.
        found: String,
        /// What this agent needs.
        wanted: String,
    },
    /// Every agent slot holds a live lease.
    #[error(
        "all {MAX_AGENTS} agent slots under {path} hold a live lease (pids {pids:?}): too many \
         agents on this node"
    )]
    NoFreeSlot {
        /// The pin directory.
        path: PathBuf,
        /// The agents holding the slots.
        pids: Vec<u32>,
    },
}

const HINT_LOAD: &str = "the kernel needs CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF and BTF, and the agent CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (or root)";
const HINT_CGROUP: &str =
    "the kernel needs CONFIG_CGROUP_BPF and a cgroup v2 directory to attach at";
const HINT_SOCKMAP: &str = "the kernel needs CONFIG_BPF_STREAM_PARSER (sockmap) for sk_msg";

/// How the datapath is set up.
#[derive(Clone, Debug)]
pub struct Options {
    /// The cgroup v2 directory the programs attach at (all pods below it are seen).
    pub cgroup_root: PathBuf,
    /// Where pods are sent: a node address and the proxy's port.
    pub proxy: SocketAddrV4,
    /// Where pods' connects to IPv6 VIPs are sent; `None`: IPv6 VIPs are left alone.
    pub proxy6: Option<SocketAddrV6>,
    /// Where the shared maps are pinned (for the CLI, and for the node's other agents to
    /// adopt); `None` to pin and share nothing.
    pub pin_dir: Option<PathBuf>,
    /// The `sk_msg` shortcut.
    pub shortcut: Shortcut,
    /// Whether this agent's slot redirects from the start (a lone agent), or only once
    /// [`Datapath::set_redirect`] turns it on (a new agent taking over from a running one).
    pub redirect_at_start: bool,
}

/// Whether the same-node shortcut is in use, and why.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ShortcutState {
    /// In use.
    pub enabled: bool,
    /// Why (or why not).
    pub reason: String,
}

/// The loaded, attached datapath.
pub struct Datapath {
    /// Owns the programs and their links: dropping it detaches them.
    _ebpf: Ebpf,
    services: Mutex<HashMap<MapData, ServiceKey, ServiceValue>>,
    services6: Mutex<HashMap<MapData, ServiceKey6, ServiceValue>>,
    opted_in: Mutex<HashMap<MapData, u64, u32>>,
    agent: Mutex<Array<MapData, AgentState>>,
    orig_by_tuple: HashMap<MapData, SockTuple, OrigDst>,
    orig_by_cookie: HashMap<MapData, u64, OrigDst>,
    orig_by_tuple6: HashMap<MapData, SockTuple6, OrigDst6>,
    orig_by_cookie6: HashMap<MapData, u64, OrigDst6>,
    counters: PerCpuArray<MapData, u64>,
    sockets: Mutex<SockHash<MapData, SockTuple>>,
    proxy: SocketAddrV4,
    proxy6: Option<SocketAddrV6>,
    cgroup_root: PathBuf,
    pin_dir: Option<PathBuf>,
    shortcut: ShortcutState,
    /// This agent's slot in `BLB_AGENT`.
    slot: AtomicUsize,
    /// This agent's redirect flag.
    redirect: AtomicBool,
    /// The slot was given up: the heartbeat no longer renews it.
    released: AtomicBool,
    /// What the shared services and opted-in maps should hold in this agent's view, written
    /// while it redirects.
    wanted: Mutex<Wanted>,
    pid: u32,
}

#[derive(Default)]
struct Wanted {
    services: Option<std::collections::HashMap<ServiceKey, ServiceValue>>,
    services6: Option<std::collections::HashMap<ServiceKey6, ServiceValue>>,
    opted_in: Option<HashSet<u64>>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("proxy", &self.proxy)
            .field("cgroup_root", &self.cgroup_root)
            .field("shortcut", &self.shortcut)
            .field("slot", &self.slot())
            .finish_non_exhaustive()
    }
}

/// One slot of `BLB_AGENT`, as [`Datapath::slots`] and `inspect bpf` show it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Slot {
    /// Its index.
    pub slot: usize,
    /// The agent's process id (0: never used).
    pub pid: u32,
    /// Its lease is live.
    pub live: bool,
    /// It takes redirected connections.
    pub redirect: bool,
    /// Milliseconds left on its lease.
    pub lease_remaining_ms: u64,
    /// Its proxy address.
    pub proxy_address: String,
    /// Its IPv6 proxy address, if it has one.
    pub proxy_address_v6: Option<String>,
}

impl Slot {
    fn of(slot: usize, s: &AgentState, now: u64) -> Self {
        Self {
            slot,
            pid: s.pid,
            live: s.alive_until_ns > now,
            redirect: s.flags & AGENT_FLAG_REDIRECT != 0,
            lease_remaining_ms: s.alive_until_ns.saturating_sub(now) / 1_000_000,
            proxy_address: SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(s.proxy_ip4)),
                u16::from_be(s.proxy_port),
            )
            .to_string(),
            proxy_address_v6: (s.proxy6_port != 0).then(|| {
                SocketAddrV6::new(ip6_of(s.proxy_ip6), u16::from_be(s.proxy6_port), 0, 0)
                    .to_string()
            }),
        }
    }
}

/// An IPv6 address as the kernel's four network-order words.
pub fn ip6_words(ip: &Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// The IPv6 address of four network-order words.
pub fn ip6_of(words: [u32; 4]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

/// Every slot of an agent map.
fn read_slots(map: &Array<MapData, AgentState>) -> Vec<Slot> {
    let now = monotonic_ns();
    (0..MAX_AGENTS)
        .map(|i| Slot::of(i as usize, &map.get(&i, 0).unwrap_or_default(), now))
        .collect()
}

/// Takes a map out of the object as a typed handle.
fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
    T::try_from(map).map_err(|source| Error::Map {
        name,
        source: Box::new(source),
    })
}

fn pin_error(dir: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Pin {
        path: dir.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Checks the layout of every shared map pinned under `dir`, before any is adopted.
fn check_pins(dir: &Path) -> Result<(), Error> {
    for want in &SHARED_MAPS {
        let path = dir.join(want.name);
        if !path.exists() {
            continue;
        }
        let map =
            MapData::from_pin(&path).map_err(|e| pin_error(dir, format!("{}: {e}", want.name)))?;
        let info = map
            .info()
            .map_err(|e| pin_error(dir, format!("{}: {e}", want.name)))?;
        let kind = match info.map_type() {
            Ok(MapType::Hash) => Some(MapKind::Hash),
            Ok(MapType::LruHash) => Some(MapKind::LruHash),
            Ok(MapType::Array) => Some(MapKind::Array),
            Ok(MapType::PerCpuArray) => Some(MapKind::PerCpuArray),
            _ => None,
        };
        let found = MapLayout {
            name: want.name,
            kind: kind.unwrap_or(MapKind::Hash),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
        };
        if kind.is_none() || found != *want {
            if any_live_lease(dir) == Some(false) {
                // Left by an agent of another version that is gone (killed: no clean exit
                // removed them): nothing uses them; they are replaced.
                warn!(
                    pin_dir = %dir.display(),
                    map = want.name,
                    "pinned maps of another layout and no live agent: removing them"
                );
                remove_pins(dir);
                return Ok(());
            }
            let show = |l: &MapLayout| {
                format!(
                    "{:?}, key {} B, value {} B, {} entries",
                    l.kind, l.key_size, l.value_size, l.max_entries
                )
            };
            return Err(Error::IncompatiblePin {
                path,
                found: match kind {
                    Some(_) => show(&found),
                    None => format!("{:?}", info.map_type()),
                },
                wanted: show(want),
            });
        }
    }
    Ok(())
}

/// Whether a slot of the agent map pinned under `dir` holds a live lease, read without
/// assuming this agent's layout (every layout of [`AgentState`] starts with
/// `alive_until_ns`): `Some(false)` when no agent map is pinned, `None` when it cannot be read.
fn any_live_lease(dir: &Path) -> Option<bool> {
    let path = dir.join(maps::AGENT_STATE);
    if !path.exists() {
        return Some(false);
    }
    let map = MapData::from_pin(&path).ok()?;
    let info = map.info().ok()?;
    if !matches!(info.map_type(), Ok(MapType::Array))
        || info.key_size() != 4
        || info.value_size() < 8
    {
        return None;
    }
    let now = monotonic_ns();
    let mut value = vec![0u8; info.value_size() as usize];
    for slot in 0..info.max_entries() {
        raw::lookup(map.fd().as_fd(), slot, &mut value).ok()?;
        let until = u64::from_ne_bytes(value[..8].try_into().ok()?);
        if until > now {
            return Some(true);
        }
    }
    Some(false)
}

/// Removes the pins of the shared maps under `dir`, and `dir` if that leaves it empty.
fn remove_pins(dir: &Path) {
    for m in &SHARED_MAPS {
        let _ = std::fs::remove_file(dir.join(m.name));
    }
    // Only if empty: the directory may hold what others put there.
    let _ = std::fs::remove_dir(dir);
}

/// The `bpf(2)` commands aya does not offer for a map of a layout it was not told.
#[allow(unsafe_code)] // the bpf syscall: libc has no wrapper.
mod raw {
    use std::os::fd::{AsRawFd, BorrowedFd};

    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;

    /// `bpf_attr` for the element commands.
    #[repr(C)]
    pub(super) struct ElemAttr {
        pub(super) map_fd: u32,
        pub(super) _pad: u32,
        pub(super) key: u64,
        pub(super) value: u64,
        pub(super) flags: u64,
    }

    /// Reads element `key` of an array map into `value` (exactly its value size).
    pub(super) fn lookup(fd: BorrowedFd<'_>, key: u32, value: &mut [u8]) -> std::io::Result<()> {
        let attr = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: (&raw const key) as u64,
            value: value.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the attribute points to a live key of the map's key size (4) and a buffer
        // of its value size, which the kernel writes at most; both outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_ELEM,
                &raw const attr,
                std::mem::size_of::<ElemAttr>(),
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The agent map pinned under `dir`, if there is one.
fn pinned_agents(dir: &Path) -> Option<Array<MapData, AgentState>> {
    let data = MapData::from_pin(dir.join(maps::AGENT_STATE)).ok()?;
    Array::try_from(Map::Array(data)).ok()
}

/// Claims a free slot in the pinned agent map (if any) with a lease that does not redirect
/// yet, so that an agent exiting meanwhile keeps the pins. Slot 0 when nothing is pinned.
fn claim_slot(dir: Option<&Path>, pid: u32, opts: &Options) -> Result<usize, Error> {
    let Some(dir) = dir else { return Ok(0) };
    let Some(mut map) = pinned_agents(dir) else {
        return Ok(0);
    };
    let slots = read_slots(&map);
    let Some(free) = slots.iter().find(|s| !s.live) else {
        return Err(Error::NoFreeSlot {
            path: dir.to_path_buf(),
            pids: slots.iter().map(|s| s.pid).collect(),
        });
    };
    let state = slot_state(pid, opts, 0);
    map.set(free.slot as u32, state, 0)
        .map_err(|e| pin_error(dir, format!("claiming slot {}: {e}", free.slot)))?;
    Ok(free.slot)
}

fn slot_state(pid: u32, opts: &Options, flags: u32) -> AgentState {
    AgentState {
        alive_until_ns: monotonic_ns() + LEASE.as_nanos() as u64,
        proxy_ip4: u32::from(*opts.proxy.ip()).to_be(),
        proxy_port: opts.proxy.port().to_be(),
        proxy6_port: opts.proxy6.map_or(0, |a| a.port().to_be()),
        flags,
        pid,
        proxy_ip6: opts.proxy6.map_or([0; 4], |a| ip6_words(a.ip())),
    }
}

/// Gives up `slot` of the agent map pinned under `dir` if `pid` still holds it, then removes
/// the pins if no slot holds a live lease any more: the last agent out cleans up.
fn leave(dir: &Path, slot: usize, pid: u32) {
    if let Some(mut map) = pinned_agents(dir) {
        if map.get(&(slot as u32), 0).is_ok_and(|s| s.pid == pid) {
            let _ = map.set(slot as u32, AgentState::default(), 0);
        }
        let live: Vec<u32> = read_slots(&map)
            .into_iter()
            .filter(|s| s.live)
            .map(|s| s.pid)
            .collect();
        if !live.is_empty() {
            info!(pin_dir = %dir.display(), agents = ?live, "other agents run: pins kept");
            return;
        }
    }
    remove_pins(dir);
}

impl Datapath {
    /// Loads and attaches the programs, adopting the maps pinned under the pin directory or
    /// creating and pinning them. This agent's slot is live at once; it redirects if
    /// `opts.redirect_at_start`. On failure the slot is given up and nothing pinned is
    /// removed while another agent's lease is live.
    pub fn load(opts: Options) -> Result<Self, Error> {
        if OBJECT.is_empty() {
            return Err(Error::Stub);
        }
        raise_memlock();
        let pid = std::process::id();
        let pin_dir = opts.pin_dir.clone();
        if let Some(dir) = &pin_dir {
            std::fs::create_dir_all(dir).map_err(|e| pin_error(dir, e))?;
            check_pins(dir)?;
        }
        let slot = claim_slot(pin_dir.as_deref(), pid, &opts)?;
        let result = Self::load_at(opts, slot, pid);
        if let (Err(_), Some(dir)) = (&result, &pin_dir) {
            leave(dir, slot, pid);
        }
        result
    }

    fn load_at(opts: Options, slot: usize, pid: u32) -> Result<Self, Error> {
        let mut loader = EbpfLoader::new();
        let pins: Vec<(&'static str, PathBuf)> = match &opts.pin_dir {
            Some(dir) => SHARED_MAPS
                .iter()
                .map(|m| (m.name, dir.join(m.name)))
                .collect(),
            None => Vec::new(),
        };
        for (name, path) in &pins {
            // Adopted if pinned there already, else created and pinned.
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).map_err(|source| Error::Load {
            source: Box::new(source),
            hint: HINT_LOAD,
        })?;
        let cgroup = File::open(&opts.cgroup_root).map_err(|source| Error::Cgroup {
            path: opts.cgroup_root.clone(),
            source,
        })?;
        let program_error = |what, program, hook, hint| {
            move |source| Error::Program {
                what,
                program,
                hook,
                source: Box::new(source),
                hint,
            }
        };
        // Attached beside any other agent's: see the module doc.
        let mode = attach_mode();
        for (program, hook) in [
            (programs::CONNECT4, "cgroup/connect4"),
            (programs::CONNECT6, "cgroup/connect6"),
        ] {
            let p: &mut CgroupSockAddr = ebpf
                .program_mut(program)
                .expect("the connect programs are in the object")
                .try_into()
                .expect("a connect program is a cgroup sock_addr program");
            p.load()
                .map_err(program_error("load", program, hook, HINT_LOAD))?;
            p.attach(&cgroup, mode)
                .map_err(program_error("attach", program, hook, HINT_CGROUP))?;
        }
        {
            let p: &mut SockOps = ebpf
                .program_mut(programs::SOCK_OPS)
                .expect("sock_ops is in the object")
                .try_into()
                .expect("sock_ops is a sock_ops program");
            p.load().map_err(program_error(
                "load",
                programs::SOCK_OPS,
                "sockops",
                HINT_LOAD,
            ))?;
            p.attach(&cgroup, mode).map_err(program_error(
                "attach",
                programs::SOCK_OPS,
                "sockops",
                HINT_CGROUP,
            ))?;
        }
        let mut sockets: SockHash<MapData, SockTuple> = take(&mut ebpf, maps::SOCKETS)?;
        {
            let p: &mut SkMsg = ebpf
                .program_mut(programs::SK_MSG)
                .expect("sk_msg is in the object")
                .try_into()
                .expect("sk_msg is an sk_msg program");
            p.load().map_err(program_error(
                "load",
                programs::SK_MSG,
                "sk_msg",
                HINT_SOCKMAP,
            ))?;
            p.attach(sockets.fd()).map_err(program_error(
                "attach",
                programs::SK_MSG,
                "sk_msg",
                HINT_SOCKMAP,
            ))?;
        }
        let shortcut = match opts.shortcut {
            Shortcut::Off => ShortcutState {
                enabled: false,
                reason: "turned off by configuration (datapath.shortcut: off)".into(),
            },
            mode => match shortcut::self_test(&mut sockets) {
                Ok(()) => ShortcutState {
                    enabled: true,
                    reason: "self-test passed: data moved intact between sockets without TCP"
                        .into(),
                },
                Err(e) if mode == Shortcut::On => {
                    warn!(error = %e, "sk_msg shortcut self-test failed; shortcut forced on");
                    ShortcutState {
                        enabled: true,
                        reason: format!(
                            "forced on (datapath.shortcut: on) though the self-test failed: {e}"
                        ),
                    }
                }
                Err(e) => ShortcutState {
                    enabled: false,
                    reason: format!("self-test failed: {e}"),
                },
            },
        };
        let mut local: Array<MapData, u32> = take(&mut ebpf, maps::LOCAL)?;
        let local_flags = if shortcut.enabled {
            LOCAL_FLAG_SHORTCUT
        } else {
            0
        };
        local.set(0, local_flags, 0).map_err(|source| Error::Map {
            name: maps::LOCAL,
            source: Box::new(source),
        })?;
        let dp = Self {
            services: Mutex::new(take(&mut ebpf, maps::SERVICES)?),
            services6: Mutex::new(take(&mut ebpf, maps::SERVICES6)?),
            orig_by_tuple6: take(&mut ebpf, maps::ORIG_DST_BY_TUPLE6)?,
            orig_by_cookie6: take(&mut ebpf, maps::ORIG_DST_BY_COOKIE6)?,
            opted_in: Mutex::new(take(&mut ebpf, maps::OPTED_IN_CGROUPS)?),
            agent: Mutex::new(take(&mut ebpf, maps::AGENT_STATE)?),
            orig_by_tuple: take(&mut ebpf, maps::ORIG_DST_BY_TUPLE)?,
            orig_by_cookie: take(&mut ebpf, maps::ORIG_DST_BY_COOKIE)?,
            counters: take(&mut ebpf, maps::COUNTERS)?,
            sockets: Mutex::new(sockets),
            _ebpf: ebpf,
            proxy: opts.proxy,
            proxy6: opts.proxy6,
            cgroup_root: opts.cgroup_root.clone(),
            pin_dir: opts.pin_dir.clone(),
            shortcut,
            slot: AtomicUsize::new(slot),
            redirect: AtomicBool::new(opts.redirect_at_start),
            released: AtomicBool::new(false),
            wanted: Mutex::default(),
            pid,
        };
        dp.heartbeat();
        info!(
            cgroup_root = %opts.cgroup_root.display(),
            proxy = %opts.proxy,
            slot,
            redirect = opts.redirect_at_start,
            shortcut = dp.shortcut.enabled,
            reason = %dp.shortcut.reason,
            "datapath attached"
        );
        Ok(dp)
    }

    /// Renews this agent's lease in its slot. Call it every [`HEARTBEAT`]. If another agent
    /// took the slot (this one hung past its lease meanwhile), it moves to a free one.
    pub fn heartbeat(&self) {
        if self.released.load(Relaxed) {
            return;
        }
        let mut map = self.agent.lock().unwrap_or_else(|p| p.into_inner());
        let mut slot = self.slot.load(Relaxed);
        let now = monotonic_ns();
        if let Ok(s) = map.get(&(slot as u32), 0)
            && s.pid != self.pid
            && s.alive_until_ns > now
        {
            match read_slots(&map).into_iter().find(|s| !s.live) {
                Some(free) => {
                    warn!(
                        slot,
                        other = s.pid,
                        new_slot = free.slot,
                        "another agent took this agent's slot (its lease had run out); moving"
                    );
                    slot = free.slot;
                    self.slot.store(slot, Relaxed);
                }
                None => {
                    warn!(
                        slot,
                        other = s.pid,
                        "another agent took this agent's slot and none is free"
                    );
                    return;
                }
            }
        }
        let flags = if self.redirect.load(Relaxed) {
            AGENT_FLAG_REDIRECT
        } else {
            0
        };
        let opts = self.slot_options();
        if let Err(e) = map.set(slot as u32, slot_state(self.pid, &opts, flags), 0) {
            warn!(error = %e, "renewing the datapath lease failed");
        }
    }

    /// Turns this agent's redirect flag on or off, in force at once. Turning it on first writes
    /// this agent's view of the services and opted-in pods into the shared maps.
    pub fn set_redirect(&self, on: bool) {
        if on {
            self.redirect.store(true, Relaxed);
            if let Err(e) = self.write_wanted() {
                tracing::error!("datapath: writing this agent's services and pods: {e}");
            }
        } else {
            self.redirect.store(false, Relaxed);
        }
        self.heartbeat();
    }

    /// Stops redirecting new connections (drain) without unloading: `set_redirect(false)`.
    pub fn stop_redirecting(&self) {
        self.set_redirect(false);
    }

    /// Whether this agent's redirect flag is on.
    pub fn redirecting(&self) -> bool {
        self.redirect.load(Relaxed)
    }

    /// Gives up this agent's slot now (its lease ends; the heartbeat stops renewing it).
    pub fn release(&self) {
        self.released.store(true, Relaxed);
        let mut map = self.agent.lock().unwrap_or_else(|p| p.into_inner());
        let slot = self.slot.load(Relaxed) as u32;
        if map.get(&slot, 0).is_ok_and(|s| s.pid == self.pid) {
            let _ = map.set(slot, AgentState::default(), 0);
        }
    }

    /// How many other agents have a live lease and take redirected connections.
    pub fn others_serving(&self) -> usize {
        let slot = self.slot();
        self.slots()
            .iter()
            .filter(|s| s.slot != slot && s.live && s.redirect)
            .count()
    }

    /// This agent's slot.
    pub fn slot(&self) -> usize {
        self.slot.load(Relaxed)
    }

    /// Every slot of the agent map.
    pub fn slots(&self) -> Vec<Slot> {
        read_slots(&self.agent.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The shortcut's state.
    pub fn shortcut(&self) -> &ShortcutState {
        &self.shortcut
    }

    /// The cgroup the programs are attached at.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// Where the maps are pinned.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// The proxy address pods are sent to.
    pub fn proxy(&self) -> SocketAddrV4 {
        self.proxy
    }

    /// Makes the services maps hold exactly `vips` (VIP:port to service id; IPv4 and
    /// IPv4-mapped in one, IPv6 in the other). The maps are shared by the node's agents: they
    /// are written only while this agent redirects, else when it starts to
    /// ([`Datapath::set_redirect`]).
    pub fn sync_services(&self, vips: &[(SocketAddr, u32)]) -> Result<(), Error> {
        let mut v4 = std::collections::HashMap::new();
        let mut v6 = std::collections::HashMap::new();
        for (a, id) in vips {
            let value = ServiceValue {
                service_id: *id,
                flags: 0,
            };
            match a {
                SocketAddr::V4(a) => {
                    v4.insert(service_key(*a), value);
                }
                SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
                    Some(ip) => {
                        v4.insert(service_key(SocketAddrV4::new(ip, a.port())), value);
                    }
                    None => {
                        v6.insert(service_key6(*a), value);
                    }
                },
            }
        }
        let mut wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        wanted.services = Some(v4);
        wanted.services6 = Some(v6);
        drop(wanted);
        self.write_wanted_if_redirecting()
    }

    /// Makes the opted-in map hold exactly these cgroup ids; shared, written as
    /// [`Datapath::sync_services`] says.
    pub fn sync_opted_in(&self, ids: &HashSet<u64>) -> Result<(), Error> {
        self.wanted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .opted_in = Some(ids.clone());
        self.write_wanted_if_redirecting()
    }

    fn write_wanted_if_redirecting(&self) -> Result<(), Error> {
        if self.redirecting() {
            self.write_wanted()
        } else {
            Ok(())
        }
    }

    /// Writes this agent's view into the shared services and opted-in maps.
    fn write_wanted(&self) -> Result<(), Error> {
        let wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(want) = &wanted.services {
            let mut map = self.services.lock().unwrap_or_else(|p| p.into_inner());
            sync_map(&mut map, want, maps::SERVICES)?;
        }
        if let Some(want) = &wanted.services6 {
            let mut map = self.services6.lock().unwrap_or_else(|p| p.into_inner());
            sync_map(&mut map, want, maps::SERVICES6)?;
        }
        if let Some(ids) = &wanted.opted_in {
            let want = ids.iter().map(|id| (*id, 1)).collect();
            let mut map = self.opted_in.lock().unwrap_or_else(|p| p.into_inner());
            sync_map(&mut map, &want, maps::OPTED_IN_CGROUPS)?;
        }
        Ok(())
    }

    /// The counters, summed over CPUs.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        read_counters(&self.counters)
    }

    /// Entries in the original-destination maps (by tuple, by cookie), IPv4 and IPv6.
    pub fn tracked(&self) -> (usize, usize) {
        (
            self.orig_by_tuple.keys().count() + self.orig_by_tuple6.keys().count(),
            self.orig_by_cookie.keys().count() + self.orig_by_cookie6.keys().count(),
        )
    }

    /// The IPv6 proxy address pods are sent to, if any.
    pub fn proxy6(&self) -> Option<SocketAddrV6> {
        self.proxy6
    }

    /// What this agent's slot says of it (the parts of [`Options`] it holds).
    fn slot_options(&self) -> Options {
        Options {
            cgroup_root: PathBuf::new(),
            proxy: self.proxy,
            proxy6: self.proxy6,
            pin_dir: None,
            shortcut: Shortcut::Off,
            redirect_at_start: false,
        }
    }

    /// Sockets in the shortcut's map.
    pub fn shortcut_sockets(&self) -> usize {
        self.sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .count()
    }

    /// Leaves the node: gives up this agent's slot and removes the pins if no other agent
    /// holds a live lease (the programs detach when this value is dropped).
    pub fn unpin(&self) {
        self.release();
        if let Some(dir) = &self.pin_dir {
            leave(dir, self.slot(), self.pid);
        }
    }
}

/// How the cgroup programs attach so that another agent's can attach beside them. From 5.7
/// aya attaches through a bpf_link, and the kernel runs link attachments as
/// `BPF_F_ALLOW_MULTI` always (it refuses the flag itself on a link: EINVAL); before that the
/// flag is passed to `BPF_PROG_ATTACH`.
fn attach_mode() -> CgroupAttachMode {
    match aya::util::KernelVersion::current() {
        Ok(v) if v >= aya::util::KernelVersion::new(5, 7, 0) => CgroupAttachMode::Single,
        _ => CgroupAttachMode::AllowMultiple,
    }
}

/// Makes a hash map hold exactly `want`.
fn sync_map<K, V>(
    map: &mut HashMap<MapData, K, V>,
    want: &std::collections::HashMap<K, V>,
    name: &'static str,
) -> Result<(), Error>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod + PartialEq,
{
    let err = |source| Error::Map {
        name,
        source: Box::new(source),
    };
    let have: Vec<K> = map.keys().filter_map(Result::ok).collect();
    for k in have {
        if !want.contains_key(&k) {
            map.remove(&k).map_err(err)?;
        }
    }
    for (k, v) in want {
        if map.get(k, 0).ok().as_ref() != Some(v) {
            map.insert(k, v, 0).map_err(err)?;
        }
    }
    Ok(())
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.unpin();
    }
}

impl OrigDstLookup for Datapath {
    fn lookup(&self, client: SocketAddr, local: SocketAddr) -> Option<proxy::OrigDst> {
        // A dual-stack listener sees an IPv4 client as IPv4-mapped: the IPv4 tuple.
        let v4 = |a: SocketAddr| match a {
            SocketAddr::V4(a) => Some(a),
            SocketAddr::V6(a) => Some(SocketAddrV4::new(a.ip().to_ipv4_mapped()?, a.port())),
        };
        if let (Some(client), Some(local)) = (v4(client), v4(local)) {
            let key = SockTuple {
                src_ip4: u32::from(*client.ip()).to_be(),
                dst_ip4: u32::from(*local.ip()).to_be(),
                src_port: client.port().to_be(),
                dst_port: local.port().to_be(),
            };
            let orig = self.orig_by_tuple.get(&key, 0).ok()?;
            return Some(proxy::OrigDst {
                addr: SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(orig.ip4)),
                    u16::from_be(orig.port),
                )),
                pid: (orig.pid != 0).then_some(orig.pid),
            });
        }
        let (SocketAddr::V6(client), SocketAddr::V6(local)) = (client, local) else {
            return None;
        };
        let key = SockTuple6 {
            src_ip6: ip6_words(client.ip()),
            dst_ip6: ip6_words(local.ip()),
            src_port: client.port().to_be(),
            dst_port: local.port().to_be(),
        };
        let orig = self.orig_by_tuple6.get(&key, 0).ok()?;
        Some(proxy::OrigDst {
            addr: SocketAddr::V6(SocketAddrV6::new(
                ip6_of(orig.ip6),
                u16::from_be(orig.port),
                0,
                0,
            )),
            pid: (orig.pid != 0).then_some(orig.pid),
        })
    }
}

/// The services map key of a VIP.
pub fn service_key(a: SocketAddrV4) -> ServiceKey {
    ServiceKey {
        ip4: u32::from(*a.ip()).to_be(),
        port: a.port().to_be(),
        _pad: 0,
    }
}

/// The IPv6 services map key of a VIP.
pub fn service_key6(a: SocketAddrV6) -> ServiceKey6 {
    ServiceKey6 {
        ip6: ip6_words(a.ip()),
        port: a.port().to_be(),
        _pad: 0,
    }
}

/// Sums a per-CPU counters map.
pub fn read_counters(map: &PerCpuArray<MapData, u64>) -> Vec<(&'static str, u64)> {
    debug_assert_eq!(Counter::ALL.len(), COUNTER_COUNT as usize);
    Counter::ALL
        .iter()
        .map(|c| {
            let v = map
                .get(&(*c as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
            (c.name(), v)
        })
        .collect()
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
#[allow(unsafe_code)] // clock_gettime: std's Instant does not expose the raw value.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "CLOCK_MONOTONIC is always available");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; lift it where we may.
#[allow(unsafe_code)] // setrlimit: libc has no safe wrapper.
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads one rlimit from a valid pointer.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if rc != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; fine on kernels with memcg accounting");
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use super::*;

    /// An array map of `value_size`-byte values pinned at `path`, as another version of the
    /// agent would have left its agent map, its first slot's lease running until `until`.
    #[allow(unsafe_code)] // the bpf syscall, to make a map of a layout aya was not told.
    fn pin_foreign_agent_map(path: &Path, value_size: u32, until: u64) {
        #[repr(C)]
        struct CreateAttr {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
        }
        #[repr(C)]
        struct PinAttr {
            pathname: u64,
            bpf_fd: u32,
            file_flags: u32,
        }
        let bpf = |cmd: libc::c_long, attr: *const u8, size: usize| {
            // SAFETY: each attribute below is a valid prefix of `bpf_attr` for its command,
            // pointing to buffers that outlive the call.
            let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
            assert!(rc >= 0, "bpf({cmd}): {}", std::io::Error::last_os_error());
            rc
        };
        let create = CreateAttr {
            map_type: 2, // BPF_MAP_TYPE_ARRAY
            key_size: 4,
            value_size,
            max_entries: 1,
        };
        let fd = bpf(0, (&raw const create).cast(), size_of::<CreateAttr>());
        // SAFETY: the kernel just returned this descriptor to us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut value = vec![0u8; value_size as usize];
        value[..8].copy_from_slice(&until.to_ne_bytes());
        let key = 0u32;
        let update = raw::ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            key: (&raw const key) as u64,
            value: value.as_ptr() as u64,
            flags: 0,
        };
        bpf(2, (&raw const update).cast(), size_of::<raw::ElemAttr>());
        let name = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        let pin = PinAttr {
            pathname: name.as_ptr() as u64,
            bpf_fd: fd.as_raw_fd() as u32,
            file_flags: 0,
        };
        bpf(6, (&raw const pin).cast(), size_of::<PinAttr>());
    }

    #[test]
    fn root_pins_of_another_layout_are_replaced_only_when_no_agent_is_alive() {
        // SAFETY: geteuid has no preconditions.
        #[allow(unsafe_code)]
        let root = unsafe { libc::geteuid() } == 0;
        if !root || !Path::new("/sys/fs/bpf").is_dir() {
            eprintln!("SKIPPED: needs root and the bpffs");
            return;
        }
        let dir = PathBuf::from(format!("/sys/fs/bpf/balancer-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let agent = dir.join(maps::AGENT_STATE);
        // An agent of the layout before slots (24-byte values, one entry) still runs.
        pin_foreign_agent_map(&agent, 24, monotonic_ns() + 60_000_000_000);
        let err = check_pins(&dir).expect_err("a live agent's maps of another layout");
        assert!(matches!(err, Error::IncompatiblePin { .. }), "{err}");
        assert!(agent.exists(), "left in place");
        // It was killed: its lease ran out, its pins are stale and replaced.
        std::fs::remove_file(&agent).unwrap();
        pin_foreign_agent_map(&agent, 24, monotonic_ns().saturating_sub(1));
        check_pins(&dir).expect("stale pins of another layout are no obstacle");
        assert!(!agent.exists(), "removed");
        let _ = std::fs::remove_dir(&dir);
    }
}
