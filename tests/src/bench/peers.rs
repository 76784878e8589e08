//! What the benchmark runs: the four greeter backends (in this process), and the three proxies
//! in front of them, each a child process pinned with `taskset` to the proxy CPUs, with its own
//! configuration in a temporary directory.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{agent::TempDir, free_port, greeter};
use anyhow::{Context, bail};
use tokio::net::TcpListener;

use super::procfs;

/// How the proxies run: the CPUs they may use and their worker threads or processes.
#[derive(Clone, Debug)]
pub struct Placement {
    /// `taskset -c` list for every proxy, e.g. `1`.
    pub proxy_cpus: String,
    /// Worker threads (agent, haproxy) or worker processes (nginx).
    pub workers: usize,
    /// Every proxy that can checks its backends actively: the agent with `grpc.health.v1`
    /// (`Watch`, one stream per backend), haproxy with its own `check` every second; nginx
    /// (open source) has no active checks and runs as it is.
    pub health_checks: bool,
    /// Every proxy has retries configured, never needed (the backends do not fail): the agent
    /// a route with 3 retries on UNAVAILABLE, haproxy `retries 3` with `retry-on`, nginx
    /// `grpc_next_upstream` with 4 tries. Without the routes scenario only.
    pub retries: bool,
}

/// The most streams a backend accepts on one connection: high, so that no proxy (nor the
/// direct baseline) is held back by the backends.
const BACKEND_STREAMS: u32 = 10_000;

/// Starts `n` greeter backends on loopback, served by a runtime of their own on a new thread.
pub fn spawn_backends(n: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("bench-backends".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the backends");
            rt.block_on(async move {
                let mut addrs = Vec::new();
                for i in 0..n {
                    let l = TcpListener::bind("127.0.0.1:0").await.expect("binding");
                    addrs.push(l.local_addr().expect("an address"));
                    tokio::spawn(serve_backend(l, format!("backend-{}", i + 1)));
                }
                let _ = tx.send(addrs);
                std::future::pending::<()>().await;
            });
        })
        .context("starting the backend thread")?;
    rx.recv_timeout(Duration::from_secs(10))
        .context("waiting for the backends")
}

async fn serve_backend(listener: TcpListener, name: String) {
    use futures_util::StreamExt;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
        s.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    });
    let stats = Arc::new(greeter::Stats::default());
    // Always there (it costs nothing unless asked): the agent's health checks ask it.
    let health =
        crate::health_pb::health_server::HealthServer::new(greeter::HealthControl::new(true));
    let _ = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(BACKEND_STREAMS))
        .add_service(greeter::service(&name, stats))
        .add_service(health)
        .serve_with_incoming(incoming)
        .await;
}

/// A running proxy process (tree).
pub struct Proxy {
    /// `agent`, `nginx`, `haproxy`.
    pub name: &'static str,
    /// Where clients connect.
    pub addr: SocketAddr,
    child: Child,
    /// The process and its descendants (measured together).
    pub pids: Vec<u32>,
    _dir: TempDir,
}

impl Proxy {
    /// Peak resident memory since start, KiB.
    pub fn hwm_kib(&self) -> u64 {
        procfs::hwm_kib(&self.pids)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // SIGTERM to the top process (nginx's master stops its workers), then SIGKILL.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        for _ in 0..300 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `taskset -c CPUS program`, output to files in `dir`.
fn pinned(placement: &Placement, program: &Path, dir: &Path) -> anyhow::Result<Command> {
    let mut cmd = Command::new("taskset");
    cmd.arg("-c")
        .arg(&placement.proxy_cpus)
        .arg(program)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("stdout.log"))?)
        .stderr(std::fs::File::create(dir.join("stderr.log"))?);
    Ok(cmd)
}

/// Waits until `addr` accepts a TCP connection and `ready` holds (bounded).
fn wait_listening(
    name: &str,
    child: &mut Child,
    addr: SocketAddr,
    dir: &Path,
    ready: impl Fn() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let err = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
            bail!("{name} exited at start ({status}):\n{err}");
        }
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            && ready()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{name} is not listening on {addr} after 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn finish(
    name: &'static str,
    mut child: Child,
    addr: SocketAddr,
    dir: TempDir,
    ready: impl Fn() -> bool,
) -> anyhow::Result<Proxy> {
    if let Err(e) = wait_listening(name, &mut child, addr, &dir.0, ready) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    // nginx forks its worker after binding: give it a moment, then take the process tree.
    std::thread::sleep(Duration::from_millis(300));
    let pids = procfs::tree(child.id());
    Ok(Proxy {
        name,
        addr,
        child,
        pids,
        _dir: dir,
    })
}

/// balancer-agent, standalone (a static file, no datapath), P2C over peak-EWMA; with `routes`,
/// the ten routes of [`super::routes`]. Its data-plane runtime gets `placement.workers` workers
/// (`--workers`).
pub fn start_agent(
    placement: &Placement,
    backends: &[SocketAddr],
    routes: bool,
) -> anyhow::Result<Proxy> {
    let dir = TempDir::new("balancer-bench-agent");
    let port = free_port();
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let (endpoints, routes) = if routes {
        super::routes::agent(backends)
    } else {
        let endpoints = backends
            .iter()
            .map(|b| format!("      - address: {b}\n"))
            .collect();
        (endpoints, String::new())
    };
    let config = format!(
        "listeners:\n  - address: {addr}\n    default_service: greeter\n\
         admin:\n  address: {admin}\n\
         services:\n  - name: greeter\n    authorities: [greeter.bench]\n    policy: p2c-ewma\n{health}    endpoints:\n{endpoints}{routes}",
        health = if placement.health_checks {
            "    health_check:\n      interval_ms: 1000\n"
        } else {
            ""
        },
    );
    let config = if placement.retries && routes.is_empty() {
        config
            + "routes:\n  - service: greeter\n    rules:\n      - name: retried\n        backends: [{}]\n        retries: {attempts: 3, retry_on: unavailable}\n"
    } else {
        config
    };
    let path = dir.0.join("config.yaml");
    std::fs::write(&path, config)?;
    let bin = crate::agent::agent_bin();
    let mut cmd = pinned(placement, &bin, &dir.0)?;
    cmd.args(["run", "--config"])
        .arg(&path)
        // The file is not changed during the run: poll it rarely.
        .args(["--reload-interval-ms", "60000", "--drain-timeout-ms", "500"])
        .env("BALANCER_LOG", "warn")
        .args(["--workers", &placement.workers.to_string()]);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    finish("agent", child, addr, dir, || {
        matches!(crate::agent::http_get(admin, "/ready"), Ok((200, _)))
    })
}

/// nginx with `grpc_pass` to an upstream of the four backends (round robin), HTTP/2 on the
/// listener, in the foreground with its own prefix: `daemon off; master_process on;
/// worker_processes <workers>`. Upstream connections are kept alive and reused (nginx carries
/// one call per upstream connection at a time, so it opens up to one per concurrent call). With
/// `routes`, the ten routes of [`super::routes`].
pub fn start_nginx(
    placement: &Placement,
    backends: &[SocketAddr],
    routes: bool,
) -> anyhow::Result<Proxy> {
    nginx_at(
        placement,
        backends,
        ([127, 0, 0, 1], free_port()).into(),
        routes,
    )
}

/// [`start_nginx`] listening on `addr`, without routes.
pub fn start_nginx_at(
    placement: &Placement,
    backends: &[SocketAddr],
    addr: SocketAddr,
) -> anyhow::Result<Proxy> {
    nginx_at(placement, backends, addr, false)
}

fn nginx_at(
    placement: &Placement,
    backends: &[SocketAddr],
    addr: SocketAddr,
    routes: bool,
) -> anyhow::Result<Proxy> {
    let dir = TempDir::new("balancer-bench-nginx");
    let keepalive = "        keepalive 2048;\n        keepalive_requests 100000000;\n        keepalive_timeout 300s;\n";
    let (upstreams, locations) = if routes {
        super::routes::nginx(backends, keepalive)
    } else {
        let servers: String = backends
            .iter()
            .map(|b| format!("        server {b};\n"))
            .collect();
        (
            format!("    upstream greeter {{\n{servers}{keepalive}    }}\n"),
            if placement.retries {
                "        location / {\n            grpc_pass grpc://greeter;\n            grpc_next_upstream error timeout http_503;\n            grpc_next_upstream_tries 4;\n        }\n".into()
            } else {
                "        location / {\n            grpc_pass grpc://greeter;\n        }\n".into()
            },
        )
    };
    let d = dir.0.display();
    let config = format!(
        r#"daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 16384;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
{upstreams}    server {{
        listen {addr} http2;
        http2_max_concurrent_streams 2000;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
{locations}    }}
}}
"#,
        workers = placement.workers,
    );
    let path = dir.0.join("nginx.conf");
    std::fs::write(&path, config)?;
    let mut cmd = pinned(placement, Path::new("nginx"), &dir.0)?;
    cmd.arg("-p")
        .arg(&dir.0)
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(dir.0.join("error.log"));
    let child = cmd.spawn().context("starting nginx")?;
    finish("nginx", child, addr, dir, || true)
}

/// HAProxy in HTTP mode, HTTP/2 on the bind line and towards every server, round robin, in the
/// foreground (`-db`), `nbthread <workers>`. With `routes`, the ten routes of
/// [`super::routes`] as ACLs.
pub fn start_haproxy(
    placement: &Placement,
    backends: &[SocketAddr],
    routes: bool,
) -> anyhow::Result<Proxy> {
    haproxy_at(
        placement,
        backends,
        ([127, 0, 0, 1], free_port()).into(),
        routes,
    )
}

/// [`start_haproxy`] listening on `addr`, without routes.
pub fn start_haproxy_at(
    placement: &Placement,
    backends: &[SocketAddr],
    addr: SocketAddr,
) -> anyhow::Result<Proxy> {
    haproxy_at(placement, backends, addr, false)
}

fn haproxy_at(
    placement: &Placement,
    backends: &[SocketAddr],
    addr: SocketAddr,
    routes: bool,
) -> anyhow::Result<Proxy> {
    let dir = TempDir::new("balancer-bench-haproxy");
    let rest = if routes {
        super::routes::haproxy(backends)
    } else {
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, b)| format!("    server b{} {b} proto h2\n", i + 1))
            .collect();
        let retries = if placement.retries {
            "    retries 3\n    retry-on conn-failure empty-response response-timeout 503\n"
        } else {
            ""
        };
        format!(
            "    default_backend greeter\n\nbackend greeter\n    balance roundrobin\n{retries}{servers}"
        )
    };
    let config = format!(
        r#"global
    nbthread {workers}
    maxconn 8000
    tune.h2.max-concurrent-streams 2000

defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s

frontend grpc
    bind {addr} proto h2
{rest}"#,
        workers = placement.workers,
    );
    // Its own active checks: a TCP connect to each server every second.
    let config = if placement.health_checks {
        config
            .lines()
            .map(|l| match l.trim_start().starts_with("server ") {
                true => format!("{l} check inter 1s\n"),
                false => format!("{l}\n"),
            })
            .collect()
    } else {
        config
    };
    let path = dir.0.join("haproxy.cfg");
    std::fs::write(&path, config)?;
    let mut cmd = pinned(placement, Path::new("haproxy"), &dir.0)?;
    cmd.arg("-db").arg("-f").arg(&path);
    let child = cmd.spawn().context("starting haproxy")?;
    finish("haproxy", child, addr, dir, || true)
}
