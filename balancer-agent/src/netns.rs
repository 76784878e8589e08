//! Network namespaces: opening a client pod's, and making sockets in it.
//!
//! The agent keeps the client pod's address as the source of its connections to endpoints, so
//! that NetworkPolicies written for pod selectors and the backends' own logs and allow lists
//! see the real client. It does so the way ztunnel's in-pod mode does, without a transparent
//! bind and the policy routing that would need: the upstream socket is made *inside the client
//! pod's network namespace* and bound to the pod's address, so the kernel routes it, and its
//! answers, exactly like a connection the pod opened itself. The socket's cgroup is still the
//! agent's (cgroup hooks follow the creating task's cgroup, not the namespace), so the
//! datapath never redirects it.
//!
//! A socket belongs to the namespace its creator was in when it was made; a thread can change
//! its own namespace with `setns(2)`. [`Netns::tcp_socket`] makes each socket on a short-lived
//! thread that enters the namespace, makes the socket and ends, so no thread of the agent ever
//! runs in a pod's namespace afterwards (a pooled blocking thread would). It runs once per new
//! endpoint connection, which is pooled, never per call.
//!
//! The namespace of a connection's client is found from the process that connected: the
//! datapath records its id, and `/proc/<pid>/ns/net` names its namespace (the agent needs the
//! host's process ids: `hostPID`, and CAP_SYS_PTRACE to open another user's namespace; setns
//! needs CAP_SYS_ADMIN, which loading the datapath already needs).
//!
//! This is one of the modules allowed `unsafe` (`setns`), the block with a `SAFETY:` line.

use std::{
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::Path,
};

use tokio::net::TcpSocket;

/// An open network namespace. Holding it keeps the namespace alive.
#[derive(Debug)]
pub struct Netns {
    file: File,
    /// The namespace's inode number: the same namespace opened twice has the same.
    ino: u64,
}

impl Netns {
    /// The network namespace of process `pid`, as `<proc_root>/<pid>/ns/net`.
    pub fn of_pid(proc_root: &Path, pid: u32) -> io::Result<Self> {
        Self::open(&proc_root.join(pid.to_string()).join("ns/net"))
    }

    /// The network namespace at `path` (`/proc/<pid>/ns/net`, a bind mount under
    /// `/var/run/netns/`, ...).
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let ino = file.metadata()?.ino();
        Ok(Self { file, ino })
    }

    /// The namespace's identity (its inode number).
    pub fn id(&self) -> u64 {
        self.ino
    }

    /// A TCP socket of `addr`'s family made inside this namespace and bound to `addr`
    /// (port 0 for any). Fails with `AddrNotAvailable` if `addr` is not an address of this
    /// namespace: that is how a caller tells that the namespace is not the one it expected.
    pub fn tcp_socket(&self, addr: SocketAddr) -> io::Result<TcpSocket> {
        let fd = self.file.as_raw_fd();
        let v6 = addr.is_ipv6();
        let socket = std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("balancer-netns".into())
                .spawn_scoped(scope, move || {
                    enter(fd)?;
                    if v6 {
                        TcpSocket::new_v6()
                    } else {
                        TcpSocket::new_v4()
                    }
                })?
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
        })?;
        socket.bind(addr)?;
        Ok(socket)
    }
}

/// Moves the calling thread into the network namespace `fd`. The thread stays there: call it
/// only on a thread that ends right after.
#[allow(unsafe_code)] // setns(2): libc has no safe wrapper.
fn enter(fd: std::os::fd::RawFd) -> io::Result<()> {
    // SAFETY: setns only reads its two integer arguments; `fd` is an open namespace file that
    // the caller holds for the duration of the call.
    let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Where a pod's connections to endpoints come from: its address, in its namespace.
#[derive(Debug)]
pub struct Source {
    /// The pod's address (the client connection's peer address).
    pub ip: IpAddr,
    /// The pod's network namespace.
    pub netns: Netns,
}

impl Source {
    /// A key that tells sources apart (namespace and address): endpoint connections are
    /// pooled per source.
    pub fn key(&self) -> (u64, IpAddr) {
        (self.netns.id(), self.ip)
    }

    /// A TCP socket in the pod's namespace, bound to its address.
    pub fn tcp_socket(&self) -> io::Result<TcpSocket> {
        self.netns.tcp_socket(SocketAddr::new(self.ip, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_own_namespace_makes_sockets_bound_to_its_addresses() {
        let ns = Netns::of_pid(Path::new("/proc"), std::process::id()).expect("own netns");
        let again = Netns::open(Path::new("/proc/self/ns/net")).expect("self netns");
        assert_eq!(ns.id(), again.id(), "one namespace, one identity");
        // Without CAP_SYS_ADMIN setns fails even for the own namespace: then say so.
        match ns.tcp_socket("127.0.0.1:0".parse().unwrap()) {
            Ok(s) => {
                let local = s.local_addr().expect("bound");
                assert_eq!(local.ip(), IpAddr::from([127, 0, 0, 1]));
            }
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                eprintln!("SKIPPED: setns needs CAP_SYS_ADMIN ({e})");
            }
            Err(e) => panic!("making a socket in the own namespace: {e}"),
        }
        let err = ns
            .tcp_socket("192.0.2.1:0".parse().unwrap())
            .expect_err("192.0.2.1 is no address of this namespace");
        assert!(
            err.kind() == io::ErrorKind::AddrNotAvailable
                || err.raw_os_error() == Some(libc::EPERM),
            "{err}"
        );
    }
}
