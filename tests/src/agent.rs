//! A real `balancer-agent` process for the tests, demo and benchmarks.
#![forbid(unsafe_code)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

/// The agent binary: `$BALANCER_AGENT_BIN`, else next to the running test's target directory.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BALANCER_AGENT_BIN") {
        return p.into();
    }
    let bin = workspace_bin("balancer-agent");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build -p balancer-agent`; `cargo xtask test` does)",
        bin.display()
    );
    bin
}

/// Where a binary of this workspace named `name` sits beside the running test or binary:
/// `target/<profile>/<name>` (tests run from `target/<profile>/deps/`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    /// Its admin address.
    pub admin: SocketAddr,
    /// Its configuration file.
    pub config_path: PathBuf,
    _dir: TempDir,
}

/// A directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new empty directory under the system temp dir.
    pub fn new(prefix: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            crate::free_port()
        ));
        std::fs::create_dir_all(&p).expect("creating a temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Agent {
    /// Starts the agent with this configuration (its `admin.address` is read from it) and
    /// waits until it reports ready.
    pub async fn start(config_yaml: &str, admin: SocketAddr) -> Self {
        Self::start_with(config_yaml, admin, |_| {}).await
    }

    /// Like [`Agent::start`], letting the caller adjust the command (environment, output).
    pub async fn start_with(
        config_yaml: &str,
        admin: SocketAddr,
        adjust: impl FnOnce(&mut Command),
    ) -> Self {
        Self::launch(config_yaml, admin, None, adjust).await
    }

    /// Like [`Agent::start`], with the agent's process in the cgroup at `cgroup` (the shell
    /// that starts it moves itself in, then execs the agent, keeping the pid).
    pub async fn start_in_cgroup(config_yaml: &str, admin: SocketAddr, cgroup: &Path) -> Self {
        Self::launch(config_yaml, admin, Some(cgroup), |_| {}).await
    }

    /// [`Agent::start_in_cgroup`] and [`Agent::start_with`] together.
    pub async fn start_in_cgroup_with(
        config_yaml: &str,
        admin: SocketAddr,
        cgroup: &Path,
        adjust: impl FnOnce(&mut Command),
    ) -> Self {
        Self::launch(config_yaml, admin, Some(cgroup), adjust).await
    }

    async fn launch(
        config_yaml: &str,
        admin: SocketAddr,
        cgroup: Option<&Path>,
        adjust: impl FnOnce(&mut Command),
    ) -> Self {
        let dir = TempDir::new("balancer-agent");
        let config_path = dir.0.join("config.yaml");
        std::fs::write(&config_path, config_yaml).expect("writing the config");
        let mut cmd = match cgroup {
            Some(cg) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg("echo $$ > \"$0\"/cgroup.procs && exec \"$@\"")
                    .arg(cg)
                    .arg(agent_bin());
                c
            }
            None => Command::new(agent_bin()),
        };
        cmd.args(["run", "--config"])
            .arg(&config_path)
            .args(["--reload-interval-ms", "100", "--drain-timeout-ms", "2000"])
            .env(
                "BALANCER_LOG",
                std::env::var("BALANCER_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null());
        adjust(&mut cmd);
        let child = cmd.spawn().expect("starting balancer-agent");
        let mut agent = Self {
            child,
            admin,
            config_path,
            _dir: dir,
        };
        agent.wait_ready(Duration::from_secs(20)).await;
        agent
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `/ready` answers 200; panics if the agent exits or the time runs out.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("balancer-agent exited before it was ready: {status}");
            }
            if matches!(self.get("/ready"), Ok((200, _))) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "balancer-agent not ready after {timeout:?}: {:?}",
                    self.get("/ready")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// GET on the admin API: (status, body).
    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(self.admin, path)
    }

    /// A counter of the datapath's programs (`/api/bpf`), e.g. `connect4_redirected`.
    pub fn bpf_counter(&self, name: &str) -> u64 {
        self.json("/api/bpf")["counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// A JSON document from the admin API.
    pub fn json(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.get(path).expect("admin API reachable");
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).expect("JSON")
    }

    /// The Prometheus text.
    pub fn metrics(&self) -> String {
        self.get("/metrics").expect("admin API reachable").1
    }

    /// Replaces the configuration file (the agent reloads it).
    pub fn rewrite_config(&self, yaml: &str) {
        let tmp = self.config_path.with_extension("tmp");
        std::fs::write(&tmp, yaml).expect("writing");
        std::fs::rename(&tmp, &self.config_path).expect("renaming");
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to the agent.
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status();
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and wait (bounded) for a clean exit.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..500 {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
        None
    }
}

impl Agent {
    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, as the kubelet stops a pod, without waiting.
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Waits (without blocking the runtime) until the process exits, at most `timeout`; `None`
    /// if it is still running then.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A minimal HTTP/1.0 GET: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// The value of a Prometheus sample whose name and labels contain all of `needles`, summed.
pub fn metric(text: &str, name: &str, needles: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Whether a path exists (for pins and cgroups).
pub fn exists(p: &Path) -> bool {
    p.exists()
}
