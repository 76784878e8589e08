//! The first kernel test: the embedded eBPF object loads into this kernel, its programs attach
//! to a cgroup made by the test, and a process in that cgroup that connects to a Service VIP is
//! redirected to the proxy address, with the original destination recorded for the proxy.
//! Needs root; skipped loudly without it.

use std::{
    collections::HashSet,
    net::{SocketAddr, SocketAddrV4, TcpListener},
    process::Command,
    time::Duration,
};

use balancer_agent::{
    config::Shortcut,
    ebpf::{self, Datapath},
    proxy::OrigDstLookup,
};
use balancer_tests::{node::Cgroup, require_root};

fn counter(dp: &Datapath, name: &str) -> u64 {
    dp.counters()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no counter {name}"))
}

#[test]
fn root_connect4_redirects_a_cgroup_member_and_records_the_original_destination() {
    require_root!();
    let cg = Cgroup::create("kernel-test").expect("creating a cgroup");
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = match proxy.local_addr().unwrap() {
        SocketAddr::V4(a) => a,
        _ => unreachable!(),
    };
    let dp = Datapath::load(ebpf::Options {
        cgroup_root: cg.path().to_path_buf(),
        proxy: proxy_addr,
        proxy6: None,
        pin_dir: None,
        shortcut: Shortcut::Off,
        redirect_at_start: true,
    })
    .expect("loading and attaching the eBPF programs");
    let vip: SocketAddrV4 = "127.77.0.1:8080".parse().unwrap();
    dp.sync_services(&[(vip.into(), 7)]).unwrap();
    dp.sync_opted_in(&HashSet::from([cg.id()])).unwrap();
    let before = counter(&dp, "connect4_calls");

    // A process in the cgroup dials the VIP, which nothing answers (a loopback-range address,
    // so that nothing ever leaves the machine even if the redirect failed).
    let mut child = cg
        .command(
            "bash",
            &[
                "-c",
                &format!("exec 3<>/dev/tcp/{}/{}; sleep 5", vip.ip(), vip.port()),
            ],
        )
        .spawn()
        .expect("spawning a process in the cgroup");
    proxy.set_nonblocking(false).unwrap();
    let (conn, peer) = accept_within(&proxy, Duration::from_secs(5));
    let local = conn.local_addr().unwrap();
    let orig = dp
        .lookup(peer, local)
        .expect("original destination recorded by sock_ops");
    assert_eq!(orig.addr, SocketAddr::V4(vip));
    assert!(counter(&dp, "connect4_calls") > before, "connect4 ran");
    assert_eq!(counter(&dp, "connect4_redirected"), 1);
    assert_eq!(counter(&dp, "sock_ops_tracked"), 1);
    let _ = child.kill();
    let _ = child.wait();
    drop(conn);

    // A process outside the cgroup is not redirected: its connect is refused (nothing listens
    // on the VIP) rather than reaching the proxy.
    let status = Command::new("bash")
        .args([
            "-c",
            &format!(
                "timeout 2 bash -c 'exec 3<>/dev/tcp/{}/{}'",
                vip.ip(),
                vip.port()
            ),
        ])
        .status()
        .unwrap();
    assert!(
        !status.success(),
        "an unrelated process must not be redirected"
    );
    assert_eq!(counter(&dp, "connect4_redirected"), 1);
}

fn accept_within(l: &TcpListener, timeout: Duration) -> (std::net::TcpStream, SocketAddr) {
    l.set_nonblocking(true).unwrap();
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match l.accept() {
            Ok(a) => {
                a.0.set_nonblocking(false).unwrap();
                return a;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no redirected connection arrived"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}
