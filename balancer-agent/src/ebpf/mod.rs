//! Loading, attaching and talking to the kernel programs of `balancer-ebpf`.
//!
//! [`Datapath::load`] loads the object embedded at build time, attaches `connect4` and
//! `sock_ops` at a cgroup (v2) root, takes typed handles on the maps, and pins them under the
//! bpffs for `balancer-agent inspect bpf`. Links are owned by this process: if the agent exits,
//! even by SIGKILL, the kernel detaches the programs. While it runs, [`Datapath::heartbeat`]
//! keeps a liveness lease fresh; `connect4` stops redirecting by itself when the lease runs out
//! (an agent that hangs), so pods always reach their Services (fail open).
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
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, SockHash},
    programs::{CgroupAttachMode, CgroupSockAddr, SkMsg, SockOps},
};
use balancer_common::{
    AGENT_FLAG_REDIRECT, AGENT_FLAG_SHORTCUT, AgentState, COUNTER_COUNT, Counter, OrigDst,
    ServiceKey, ServiceValue, SockTuple, maps, programs,
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
    /// Where maps are pinned for the CLI; `None` to pin nothing.
    pub pin_dir: Option<PathBuf>,
    /// The `sk_msg` shortcut.
    pub shortcut: Shortcut,
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
    opted_in: Mutex<HashMap<MapData, u64, u32>>,
    agent: Mutex<Array<MapData, AgentState>>,
    orig_by_tuple: HashMap<MapData, SockTuple, OrigDst>,
    orig_by_cookie: HashMap<MapData, u64, OrigDst>,
    counters: PerCpuArray<MapData, u64>,
    sockets: Mutex<SockHash<MapData, SockTuple>>,
    proxy: SocketAddrV4,
    cgroup_root: PathBuf,
    pin_dir: Option<PathBuf>,
    shortcut: ShortcutState,
    flags: std::sync::atomic::AtomicU32,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("proxy", &self.proxy)
            .field("cgroup_root", &self.cgroup_root)
            .field("shortcut", &self.shortcut)
            .finish_non_exhaustive()
    }
}

/// Takes a map out of the object as a typed handle, pinning it under `pin_dir` first.
fn take<T>(ebpf: &mut Ebpf, name: &'static str, pin_dir: Option<&Path>) -> Result<T, Error>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
    if let Some(dir) = pin_dir {
        map.pin(dir.join(name)).map_err(|e| Error::Pin {
            path: dir.to_path_buf(),
            reason: format!("{name}: {e}"),
        })?;
    }
    T::try_from(map).map_err(|source| Error::Map {
        name,
        source: Box::new(source),
    })
}

impl Datapath {
    /// Loads and attaches the programs. The agent's lease starts running at once.
    pub fn load(opts: Options) -> Result<Self, Error> {
        if OBJECT.is_empty() {
            return Err(Error::Stub);
        }
        raise_memlock();
        let mut ebpf = EbpfLoader::new()
            .load(OBJECT)
            .map_err(|source| Error::Load {
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
        {
            let p: &mut CgroupSockAddr = ebpf
                .program_mut(programs::CONNECT4)
                .expect("connect4 is in the object")
                .try_into()
                .expect("connect4 is a cgroup sock_addr program");
            p.load().map_err(program_error(
                "load",
                programs::CONNECT4,
                "cgroup/connect4",
                HINT_LOAD,
            ))?;
            p.attach(&cgroup, CgroupAttachMode::Single)
                .map_err(program_error(
                    "attach",
                    programs::CONNECT4,
                    "cgroup/connect4",
                    HINT_CGROUP,
                ))?;
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
            p.attach(&cgroup, CgroupAttachMode::Single)
                .map_err(program_error(
                    "attach",
                    programs::SOCK_OPS,
                    "sockops",
                    HINT_CGROUP,
                ))?;
        }
        let pin_dir = opts.pin_dir.as_deref();
        if let Some(dir) = pin_dir {
            // A previous agent's pins (one that was killed) are replaced.
            let _ = std::fs::remove_dir_all(dir);
            std::fs::create_dir_all(dir).map_err(|e| Error::Pin {
                path: dir.to_path_buf(),
                reason: e.to_string(),
            })?;
        }
        let mut sockets: SockHash<MapData, SockTuple> = take(&mut ebpf, maps::SOCKETS, None)?;
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
        let flags = AGENT_FLAG_REDIRECT
            | if shortcut.enabled {
                AGENT_FLAG_SHORTCUT
            } else {
                0
            };
        let dp = Self {
            services: Mutex::new(take(&mut ebpf, maps::SERVICES, pin_dir)?),
            opted_in: Mutex::new(take(&mut ebpf, maps::OPTED_IN_CGROUPS, pin_dir)?),
            agent: Mutex::new(take(&mut ebpf, maps::AGENT_STATE, pin_dir)?),
            orig_by_tuple: take(&mut ebpf, maps::ORIG_DST_BY_TUPLE, pin_dir)?,
            orig_by_cookie: take(&mut ebpf, maps::ORIG_DST_BY_COOKIE, pin_dir)?,
            counters: take(&mut ebpf, maps::COUNTERS, pin_dir)?,
            sockets: Mutex::new(sockets),
            _ebpf: ebpf,
            proxy: opts.proxy,
            cgroup_root: opts.cgroup_root.clone(),
            pin_dir: opts.pin_dir.clone(),
            shortcut,
            flags: std::sync::atomic::AtomicU32::new(flags),
        };
        dp.heartbeat();
        info!(
            cgroup_root = %opts.cgroup_root.display(),
            proxy = %opts.proxy,
            shortcut = dp.shortcut.enabled,
            reason = %dp.shortcut.reason,
            "datapath attached"
        );
        Ok(dp)
    }

    /// Renews the liveness lease. Call it every [`HEARTBEAT`].
    pub fn heartbeat(&self) {
        let state = AgentState {
            alive_until_ns: monotonic_ns() + LEASE.as_nanos() as u64,
            proxy_ip4: u32::from(*self.proxy.ip()).to_be(),
            proxy_port: self.proxy.port().to_be(),
            _pad: 0,
            flags: self.flags.load(std::sync::atomic::Ordering::Relaxed),
            _pad2: 0,
        };
        if let Err(e) = self.agent.lock().expect("lock").set(0, state, 0) {
            warn!(error = %e, "renewing the datapath lease failed");
        }
    }

    /// Stops redirecting new connections (drain) without unloading.
    pub fn stop_redirecting(&self) {
        self.flags.store(0, std::sync::atomic::Ordering::Relaxed);
        self.heartbeat();
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

    /// Makes the services map hold exactly `vips` (VIP:port to service id).
    pub fn sync_services(&self, vips: &[(SocketAddrV4, u32)]) -> Result<(), Error> {
        let mut map = self.services.lock().expect("lock");
        let want: std::collections::HashMap<ServiceKey, ServiceValue> = vips
            .iter()
            .map(|(a, id)| {
                (
                    service_key(*a),
                    ServiceValue {
                        service_id: *id,
                        flags: 0,
                    },
                )
            })
            .collect();
        let have: Vec<ServiceKey> = map.keys().filter_map(Result::ok).collect();
        let err = |source| Error::Map {
            name: maps::SERVICES,
            source: Box::new(source),
        };
        for k in have {
            if !want.contains_key(&k) {
                map.remove(&k).map_err(err)?;
            }
        }
        for (k, v) in want {
            if map.get(&k, 0).ok() != Some(v) {
                map.insert(k, v, 0).map_err(err)?;
            }
        }
        Ok(())
    }

    /// Makes the opted-in map hold exactly these cgroup ids.
    pub fn sync_opted_in(&self, ids: &HashSet<u64>) -> Result<(), Error> {
        let mut map = self.opted_in.lock().expect("lock");
        let have: Vec<u64> = map.keys().filter_map(Result::ok).collect();
        let err = |source| Error::Map {
            name: maps::OPTED_IN_CGROUPS,
            source: Box::new(source),
        };
        for k in &have {
            if !ids.contains(k) {
                map.remove(k).map_err(err)?;
            }
        }
        for id in ids {
            if !have.contains(id) {
                map.insert(id, 1, 0).map_err(err)?;
            }
        }
        Ok(())
    }

    /// The counters, summed over CPUs.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        read_counters(&self.counters)
    }

    /// Entries in the original-destination maps (by tuple, by cookie).
    pub fn tracked(&self) -> (usize, usize) {
        (
            self.orig_by_tuple.keys().count(),
            self.orig_by_cookie.keys().count(),
        )
    }

    /// Sockets in the shortcut's map.
    pub fn shortcut_sockets(&self) -> usize {
        self.sockets.lock().expect("lock").keys().count()
    }

    /// Removes the pins (the programs detach when this value is dropped).
    pub fn unpin(&self) {
        if let Some(dir) = &self.pin_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.unpin();
    }
}

impl OrigDstLookup for Datapath {
    fn lookup(&self, client: SocketAddr, local: SocketAddr) -> Option<proxy::OrigDst> {
        let (SocketAddr::V4(client), SocketAddr::V4(local)) = (client, local) else {
            return None;
        };
        let key = SockTuple {
            src_ip4: u32::from(*client.ip()).to_be(),
            dst_ip4: u32::from(*local.ip()).to_be(),
            src_port: client.port().to_be(),
            dst_port: local.port().to_be(),
        };
        let orig = self.orig_by_tuple.get(&key, 0).ok()?;
        Some(proxy::OrigDst {
            addr: SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(orig.ip4)),
                u16::from_be(orig.port),
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
