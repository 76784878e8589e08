//! A simulated Kubernetes node for datapath tests: pods as network namespaces with veths into
//! the node, one cgroup (v2) per pod holding the pod's processes.
#![forbid(unsafe_code)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use balancer_agent::ebpf::cgroup;

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
