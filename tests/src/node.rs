//! A simulated Kubernetes node for datapath tests: pods as network namespaces with veths into
//! the node, one cgroup (v2) per pod holding the pod's processes.
#![forbid(unsafe_code)]

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering::Relaxed},
};

use balancer_agent::ebpf::cgroup;
use tokio::net::{TcpListener, TcpStream};

/// A cgroup v2 directory made by a test, removed (after its processes) on drop.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `<cgroup2 mount>/balancer-test-<name>-<pid>`.
    pub fn create(name: &str) -> std::io::Result<Self> {
        let root = cgroup::v2_mount()?;
        Self::create_at(&root.join(format!("balancer-test-{name}-{}", std::process::id())))
    }

    /// Creates the cgroup at `path`.
    pub fn create_at(path: &Path) -> std::io::Result<Self> {
        if path.exists() {
            kill_all(path);
            let _ = std::fs::remove_dir(path);
        }
        std::fs::create_dir_all(path)?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// A child cgroup.
    pub fn child(&self, name: &str) -> std::io::Result<Self> {
        Self::create_at(&self.path.join(name))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its id (what the datapath's opted-in map holds).
    pub fn id(&self) -> u64 {
        cgroup::id(&self.path).expect("cgroup id")
    }

    /// A command that runs `program args` inside this cgroup: a shell moves itself in, then
    /// execs the program.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("echo $$ > \"$0\"/cgroup.procs && exec \"$@\"")
            .arg(&self.path)
            .arg(program)
            .args(args);
        c
    }
}

/// Kills every process left in a cgroup tree (children first).
fn kill_all(path: &Path) {
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                kill_all(&e.path());
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
    if let Ok(procs) = std::fs::read_to_string(path.join("cgroup.procs")) {
        for pid in procs.split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        kill_all(&self.path);
        for _ in 0..100 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

static NEXT_NODE: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> std::io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// A pod: a network namespace with a veth into the node's bridge, and a cgroup.
#[derive(Debug)]
pub struct Pod {
    /// Its name.
    pub name: String,
    /// Its network namespace (under /run/netns).
    pub netns: String,
    /// Its IP on the node's pod network.
    pub ip: Ipv4Addr,
    /// Its IPv6 address on the node's pod network (dual stack).
    pub ip6: Ipv6Addr,
    /// Its cgroup (a child of the node's cgroup).
    pub cgroup: Cgroup,
    host_veth: String,
}

impl Pod {
    /// A command running `program args` in this pod: in its cgroup, then in its network
    /// namespace (`nsenter --net`, which, unlike `ip netns exec`, keeps /sys as it is).
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let netns = format!("--net=/run/netns/{}", self.netns);
        let mut full = vec![netns.as_str(), program];
        full.extend_from_slice(args);
        let mut c = self.cgroup.command("nsenter", &full);
        c.stdin(Stdio::null());
        c
    }

    /// The cgroup path relative to `root` (what the agent's `opted_in_cgroups` lists).
    pub fn cgroup_relative_to(&self, root: &Path) -> String {
        self.cgroup
            .path()
            .strip_prefix(root)
            .expect("pod cgroups live under the node's")
            .display()
            .to_string()
    }
}

/// A simulated Kubernetes node: a bridge for the pod network that also holds the Service VIPs
/// (so that a packet to a VIP is delivered locally and never leaves the machine), a cgroup
/// the datapath attaches at, and pods. Everything is removed on drop.
#[derive(Debug)]
pub struct SimNode {
    id: String,
    bridge: String,
    /// The node's address on the pod network (the pods' default gateway).
    pub gateway: Ipv4Addr,
    /// The node's IPv6 address on the pod network (the pods' IPv6 default gateway).
    pub gateway6: Ipv6Addr,
    /// The cgroup the datapath attaches at; pods and the agent live below it.
    pub cgroup: Cgroup,
    pods: Vec<Pod>,
    subnet: [u8; 3],
}

impl SimNode {
    /// Builds an empty node. Needs root.
    pub fn new() -> std::io::Result<Self> {
        let n = NEXT_NODE.fetch_add(1, Relaxed);
        let pid = std::process::id();
        let id = format!("{:x}{n:x}", pid & 0xfff);
        let subnet = [10, 200 + (pid % 50) as u8, (n % 250) as u8];
        let gateway = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 1);
        let gateway6 = ip6_of(subnet, 1);
        let bridge = format!("blbbr{id}");
        let cgroup = Cgroup::create(&format!("node{id}"))?;
        let node = Self {
            id,
            bridge,
            gateway,
            gateway6,
            cgroup,
            pods: Vec::new(),
            subnet,
        };
        ip(&["link", "add", &node.bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{gateway}/24"), "dev", &node.bridge])?;
        // No duplicate address detection: the addresses are usable at once.
        let gw6 = format!("{gateway6}/64");
        ip(&["-6", "addr", "add", &gw6, "dev", &node.bridge, "nodad"])?;
        ip(&["link", "set", &node.bridge, "up"])?;
        Ok(node)
    }

    /// Adds a pod named `name`, its cgroup `<node cgroup>/<name>`.
    pub fn add_pod(&mut self, name: &str) -> std::io::Result<&Pod> {
        self.add_pod_in_cgroup(name, name)
    }

    /// Adds a pod named `name` whose processes run in the cgroup at `cgroup` (relative to the
    /// node's, e.g. laid out as the kubelet lays out a pod's container). Parent directories
    /// are created here and removed with the node's cgroup.
    pub fn add_pod_in_cgroup(&mut self, name: &str, cgroup: &str) -> std::io::Result<&Pod> {
        let n = self.pods.len() + 1;
        let netns = format!("blb{}p{n}", self.id);
        let host_veth = format!("blbv{}p{n}", self.id);
        let peer = format!("blbq{}p{n}", self.id);
        let [a, b, c] = self.subnet;
        let ip4 = Ipv4Addr::new(a, b, c, 10 + n as u8);
        let ip6 = ip6_of(self.subnet, 10 + n as u16);
        ip(&["netns", "add", &netns])?;
        ip(&[
            "link", "add", &host_veth, "type", "veth", "peer", "name", &peer,
        ])?;
        ip(&["link", "set", &peer, "netns", &netns])?;
        ip(&["-n", &netns, "link", "set", &peer, "name", "eth0"])?;
        ip(&["link", "set", &host_veth, "master", &self.bridge, "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ip4}/24"),
            "dev",
            "eth0",
        ])?;
        let with_prefix = format!("{ip6}/64");
        ip(&[
            "-n",
            &netns,
            "-6",
            "addr",
            "add",
            &with_prefix,
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &self.gateway.to_string(),
        ])?;
        ip(&[
            "-n",
            &netns,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &self.gateway6.to_string(),
        ])?;
        let cgroup = self.cgroup.child(cgroup)?;
        self.pods.push(Pod {
            name: name.into(),
            netns,
            ip: ip4,
            ip6,
            cgroup,
            host_veth,
        });
        Ok(self.pods.last().expect("just pushed"))
    }

    /// The pod named `name`.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Makes `vip` an address of the node (a /32 on the bridge): a packet to it from a pod is
    /// delivered to the node itself, and nothing ever leaves the machine.
    pub fn add_vip(&self, vip: Ipv4Addr) -> std::io::Result<()> {
        ip(&["addr", "add", &format!("{vip}/32"), "dev", &self.bridge])
    }

    /// Makes the IPv6 `vip` an address of the node (a /128 on the bridge), as [`SimNode::add_vip`].
    pub fn add_vip6(&self, vip: Ipv6Addr) -> std::io::Result<()> {
        let a = format!("{vip}/128");
        ip(&["-6", "addr", "add", &a, "dev", &self.bridge, "nodad"])
    }

    /// A cgroup for the agent under the node's, so the proxy's sockets are seen by sock_ops.
    pub fn agent_cgroup(&self) -> std::io::Result<Cgroup> {
        self.cgroup.child("agent")
    }

    /// A unique name for things this node owns (pins).
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        for p in self.pods.drain(..) {
            drop(p.cgroup);
            let _ = ip(&["link", "del", &p.host_veth]);
            let _ = ip(&["netns", "del", &p.netns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// The IPv6 address `host` of a node's pod network (`fd00:<b>:<c>::<host>` for the IPv4
/// subnet `10.<b>.<c>.0/24`).
fn ip6_of(subnet: [u8; 3], host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, subnet[1].into(), subnet[2].into(), 0, 0, 0, 0, host)
}

/// A stand-in for kube-proxy: connections to `vip` (an address of the node) are forwarded to
/// one of `backends`, per connection, in turn — what a Kubernetes Service does without
/// balancer. Runs until the runtime stops.
pub async fn kube_proxy_stand_in(
    vip: SocketAddr,
    backends: Vec<SocketAddr>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(vip).await?;
    tokio::spawn(async move {
        let mut next = 0;
        while let Ok((mut client, _)) = listener.accept().await {
            let backend = backends[next % backends.len()];
            next += 1;
            tokio::spawn(async move {
                if let Ok(mut upstream) = TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    Ok(())
}

/// Waits for a child and returns its stdout, panicking with its stderr on failure.
pub fn output_of(child: Child) -> String {
    let out = child.wait_with_output().expect("waiting for a pod process");
    assert!(
        out.status.success(),
        "pod process failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `balancer-pod` binary (next to the agent's).
pub fn pod_bin() -> PathBuf {
    crate::agent::agent_bin().with_file_name("balancer-pod")
}

/// A node with backend pods serving the greeter, a client pod and an outsider pod, ready for
/// an agent: the scenario of the datapath tests and the demo.
#[derive(Debug)]
pub struct Scenario {
    /// The node.
    pub node: SimNode,
    /// Backend names and their pod addresses (port 50051).
    pub backends: Vec<(String, SocketAddr)>,
    /// The backend processes.
    pub children: Vec<Child>,
}

/// The port backend pods serve on.
pub const BACKEND_PORT: u16 = 50051;

impl Scenario {
    /// Builds the node with `backends` greeter pods (`backend-1`...), a `client` pod and an
    /// `outsider` pod, and waits until every backend answers.
    pub async fn new(backends: usize) -> std::io::Result<Self> {
        let mut node = SimNode::new()?;
        let mut list = Vec::new();
        let mut children = Vec::new();
        for i in 1..=backends {
            let name = format!("backend-{i}");
            let pod = node.add_pod(&name)?;
            let listen = format!("0.0.0.0:{BACKEND_PORT}");
            let child = pod
                .command(
                    pod_bin().to_str().expect("UTF-8 path"),
                    &["serve", "--name", &name, "--listen", &listen],
                )
                .spawn()?;
            children.push(child);
            list.push((name, SocketAddr::from((pod.ip, BACKEND_PORT))));
        }
        node.add_pod("client")?;
        node.add_pod("outsider")?;
        for (name, addr) in &list {
            let addr = *addr;
            crate::wait_until_async(
                &format!("{name} serving on {addr}"),
                std::time::Duration::from_secs(10),
                || async move { TcpStream::connect(addr).await.is_ok() },
            )
            .await;
        }
        Ok(Self {
            node,
            backends: list,
            children,
        })
    }

    /// The agent configuration for this node: one service `greeter` on `vip` over every
    /// backend, the datapath attached at the node's cgroup, the client pod opted in.
    pub fn agent_config(&self, vip: SocketAddr, admin: SocketAddr, shortcut: &str) -> String {
        self.config_with_services(&self.greeter_service(&[vip], false), admin, shortcut)
    }

    /// The `services:` entry of `greeter`: round-robin over every backend, selected by `vips`
    /// (and, when `headless`, by its endpoints' addresses).
    pub fn greeter_service(&self, vips: &[SocketAddr], headless: bool) -> String {
        let eps: String = self
            .backends
            .iter()
            .map(|(_, a)| format!("      - address: {a}\n"))
            .collect();
        let vips: Vec<String> = vips.iter().map(|v| format!("\"{v}\"")).collect();
        let headless = if headless { "    headless: true\n" } else { "" };
        format!(
            "  - name: greeter\n    vips: [{}]\n{headless}    policy: round-robin\n    endpoints:\n{eps}",
            vips.join(", ")
        )
    }

    /// The agent configuration with the given `services:` entries, the client pod opted in.
    pub fn config_with_services(
        &self,
        services: &str,
        admin: SocketAddr,
        shortcut: &str,
    ) -> String {
        let client = self
            .node
            .pod("client")
            .cgroup_relative_to(self.node.cgroup.path());
        format!(
            "{}  opted_in_cgroups: [\"{client}\"]\nservices:\n{services}",
            self.kubernetes_config(admin, shortcut)
        )
    }

    /// The agent configuration with no services and no opted-in cgroups (both to come from
    /// Kubernetes): the listener, the admin server and the datapath attached at the node's
    /// cgroup, its `datapath:` section last.
    pub fn kubernetes_config(&self, admin: SocketAddr, shortcut: &str) -> String {
        format!(
            r#"listeners:
  - address: {gw}:15001
admin:
  address: {admin}
datapath:
  enabled: true
  cgroup_root: {root}
  proxy_address: {gw}:15001
  shortcut: {shortcut}
  pin_path: {pins}
"#,
            gw = self.node.gateway,
            root = self.node.cgroup.path().display(),
            pins = self.pin_path(),
        )
    }

    /// [`Scenario::config_with_services`] with an IPv6 listener too, and the datapath sending
    /// pods' connects to IPv6 VIPs to it (`datapath.proxy_address_v6`).
    pub fn dual_stack_config(&self, services: &str, admin: SocketAddr, shortcut: &str) -> String {
        let v6 = SocketAddr::from((self.node.gateway6, 15001));
        self.config_with_services(services, admin, shortcut)
            .replacen(
                "listeners:\n",
                &format!("listeners:\n  - address: \"{v6}\"\n"),
                1,
            )
            .replacen(
                "datapath:\n",
                &format!("datapath:\n  proxy_address_v6: \"{v6}\"\n"),
                1,
            )
    }

    /// Runs `balancer-pod call` in `pod` against `target`; returns its JSON summary.
    pub async fn call(&self, pod: &str, target: SocketAddr, calls: usize) -> serde_json::Value {
        let out = self.call_output(pod, target, calls, false).await;
        serde_json::from_str(out.lines().last().unwrap_or("")).expect("the client's JSON summary")
    }

    /// Runs `balancer-pod call` in `pod` against `target`; returns all it printed (with
    /// `print`, one `#n - Greeting: ...` line per call, then the JSON summary).
    pub async fn call_output(
        &self,
        pod: &str,
        target: SocketAddr,
        calls: usize,
        print: bool,
    ) -> String {
        let (target, calls) = (target.to_string(), calls.to_string());
        let mut args = vec!["call", "--target", &target, "--calls", &calls];
        if print {
            args.push("--print");
        }
        let child = self
            .node
            .pod(pod)
            .command(pod_bin().to_str().expect("UTF-8 path"), &args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the client");
        tokio::task::spawn_blocking(move || output_of(child))
            .await
            .expect("joining")
    }

    /// Where the agent pins its maps for this node (removed with the scenario).
    pub fn pin_path(&self) -> String {
        format!("/sys/fs/bpf/balancer-test-{}", self.node.id())
    }

    /// Like [`Scenario::call`], giving up after `timeout`: `None` if the call failed.
    pub async fn try_call(
        &self,
        pod: &str,
        target: SocketAddr,
        timeout: std::time::Duration,
    ) -> Option<serde_json::Value> {
        let mut child = tokio::process::Command::from(self.node.pod(pod).command(
            pod_bin().to_str().expect("UTF-8 path"),
            &["call", "--target", &target.to_string(), "--calls", "1"],
        ));
        child
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(timeout, child.output())
            .await
            .ok()?
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last()?).ok()
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // An agent that was killed leaves its pins behind; a clean one removed them.
        let _ = std::fs::remove_dir_all(self.pin_path());
    }
}
