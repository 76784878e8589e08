//! cgroup v2 paths and ids.
//!
//! The datapath identifies pods by cgroup id, which on cgroup v2 is the inode number of the
//! cgroup's directory. The v2 hierarchy is found from /proc/mounts: `/sys/fs/cgroup` on most
//! Kubernetes nodes, `/sys/fs/cgroup/unified` on hybrid hosts.
#![forbid(unsafe_code)]

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// The mount point of the cgroup v2 hierarchy.
pub fn v2_mount() -> std::io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, path, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(path))
        })
        .next()
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no cgroup2 filesystem in /proc/mounts (the datapath needs cgroup v2)",
            )
        })
}

/// The id of the cgroup at `path` (a directory of the v2 hierarchy).
pub fn id(path: &Path) -> std::io::Result<u64> {
    Ok(std::fs::metadata(path)?.ino())
}
