//! The `sk_msg` same-node shortcut's self-test.
//!
//! sockmap acceleration has a history of kernel bugs (Cilium removed theirs, dae too), so the
//! shortcut is used only if it proves itself on this kernel at start: two connected sockets of
//! the agent's own are put in the socket map, a message written on one must arrive intact on
//! the other, and the sender's `tcp_info` must show that TCP carried no data segment (the
//! message took the shortcut). Correctness never depends on the shortcut: without it the same
//! connections flow over TCP.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use aya::maps::{MapData, SockHash};
use balancer_common::SockTuple;

/// The tuple of a socket as `sock_ops` keys it: local end first, network byte order.
pub fn tuple_of(local: SocketAddr, remote: SocketAddr) -> Option<SockTuple> {
    let (SocketAddr::V4(l), SocketAddr::V4(r)) = (local, remote) else {
        return None;
    };
    Some(SockTuple {
        src_ip4: u32::from(*l.ip()).to_be(),
        dst_ip4: u32::from(*r.ip()).to_be(),
        src_port: l.port().to_be(),
        dst_port: r.port().to_be(),
    })
}

/// Data segments the socket has sent over TCP (`tcp_info.tcpi_data_segs_out`).
#[allow(unsafe_code)] // getsockopt(TCP_INFO): libc has no safe wrapper.
pub fn data_segs_out(sock: &impl AsRawFd) -> std::io::Result<u32> {
    // SAFETY: tcp_info is plain old data; zeroed is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info.tcpi_data_segs_out)
}

/// Proves the shortcut moves data correctly on this kernel, or says why not.
pub fn self_test(map: &mut SockHash<MapData, SockTuple>) -> Result<(), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let client = TcpStream::connect(listener.local_addr().map_err(|e| e.to_string())?)
        .map_err(|e| format!("connect: {e}"))?;
    let (server, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    let keys = [
        tuple_of(client.local_addr().unwrap(), client.peer_addr().unwrap()),
        tuple_of(server.local_addr().unwrap(), server.peer_addr().unwrap()),
    ];
    let [Some(ck), Some(sk)] = keys else {
        return Err("not IPv4 sockets".into());
    };
    map.insert(ck, client.as_raw_fd(), 0)
        .map_err(|e| format!("inserting a socket in the map: {e}"))?;
    map.insert(sk, server.as_raw_fd(), 0)
        .map_err(|e| format!("inserting a socket in the map: {e}"))?;
    let result = exchange(&client, &server);
    let _ = map.remove(&ck);
    let _ = map.remove(&sk);
    result
}

fn exchange(mut client: &TcpStream, mut server: &TcpStream) -> Result<(), String> {
    let message: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    client
        .write_all(&message)
        .map_err(|e| format!("write: {e}"))?;
    server
        .set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut got = Vec::with_capacity(message.len());
    let mut buf = [0u8; 8192];
    while got.len() < message.len() {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {} bytes arrived within 2s",
                got.len(),
                message.len()
            ));
        }
        match server.read(&mut buf) {
            Ok(0) => return Err("the peer closed".into()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            // With sockmap, a blocking read may return EAGAIN spuriously: retry.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    if got != message {
        return Err("the data arrived corrupted".into());
    }
    let segs = data_segs_out(client).map_err(|e| format!("TCP_INFO: {e}"))?;
    if segs != 0 {
        return Err(format!(
            "the data went over TCP ({segs} data segments): sk_msg did not redirect it"
        ));
    }
    Ok(())
}
