//! Which pods of this node opted in, and where their cgroups are.
//!
//! A pod opts in through its namespace (label `balancer.dev/enabled=true`) unless the pod says
//! `balancer.dev/enabled=false`, or carries an Istio sidecar (whose own redirect must not be
//! fought). The datapath knows a pod by the id of its pod-level cgroup (the inode of the
//! directory; the kernel programs check ancestors, so the pod level covers every container).
//!
//! The kubelet lays pod cgroups out in one of two ways (cgroup v2):
//!
//! ```text
//! systemd driver:  kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with _>.slice/cri-containerd-<id>.scope
//!                  kubepods.slice/kubepods-pod<uid with _>.slice/...            (Guaranteed QoS)
//! cgroupfs driver: kubepods/burstable/pod<uid>/<container id>
//!                  kubepods/pod<uid>/<container id>                              (Guaranteed QoS)
//! ```
//!
//! [`pod_cgroup`] tries those paths first, then searches a few levels down (a kubelet started
//! with another `--cgroup-root`, a node in a container as kind runs them), then looks for a
//! directory named after one of the pod's container ids and takes its parent. It only reads
//! the tree: it never creates, moves or writes a cgroup.
#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Serialize;

use crate::call::route::SourceIdentity;

/// The namespace label that opts a namespace's pods in (value `true`), and the pod label that
/// opts one pod out (value `false`).
pub const ENABLED_LABEL: &str = "balancer.dev/enabled";
/// An annotation the Istio injector puts on pods with a sidecar.
pub const ISTIO_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// The name of Istio's sidecar container.
pub const ISTIO_PROXY_CONTAINER: &str = "istio-proxy";

/// What discovery needs of a pod on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `status.qosClass`: `Guaranteed`, `Burstable`, `BestEffort` (empty if not yet known).
    pub qos: String,
    /// Container ids from the status, without their `containerd://` style prefix.
    pub container_ids: Vec<String>,
    /// The pod's label `balancer.dev/enabled` is `false`.
    pub opted_out: bool,
    /// It has an Istio sidecar.
    pub istio: bool,
    /// It has ended (`Succeeded` or `Failed`): its cgroup is gone.
    pub finished: bool,
    /// `status.podIPs`: how the agent knows a client connection's pod.
    pub ips: Vec<IpAddr>,
    /// Its labels (route rules on the caller match them).
    pub labels: BTreeMap<String, String>,
}

impl PodInfo {
    /// The facts the agent needs from a pod object.
    pub fn from_pod(pod: &k8s_openapi::api::core::v1::Pod) -> Self {
        let meta = &pod.metadata;
        let labels = meta.labels.as_ref();
        let status = pod.status.as_ref();
        let istio = meta
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(ISTIO_STATUS_ANNOTATION))
            || pod.spec.as_ref().is_some_and(|s| {
                s.containers
                    .iter()
                    .chain(s.init_containers.iter().flatten())
                    .any(|c| c.name == ISTIO_PROXY_CONTAINER)
            });
        let container_ids = status
            .into_iter()
            .flat_map(|s| {
                s.container_statuses
                    .iter()
                    .flatten()
                    .chain(s.init_container_statuses.iter().flatten())
            })
            .filter_map(|c| c.container_id.as_deref())
            .map(|id| id.rsplit_once("://").map_or(id, |(_, id)| id).to_string())
            .filter(|id| !id.is_empty())
            .collect();
        Self {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            uid: meta.uid.clone().unwrap_or_default(),
            qos: status.and_then(|s| s.qos_class.clone()).unwrap_or_default(),
            container_ids,
            opted_out: labels
                .and_then(|l| l.get(ENABLED_LABEL))
                .is_some_and(|v| v == "false"),
            istio,
            finished: status
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|p| p == "Succeeded" || p == "Failed"),
            ips: status
                .into_iter()
                .flat_map(|s| {
                    s.pod_ips
                        .iter()
                        .flatten()
                        .map(|p| p.ip.as_str())
                        .chain(s.pod_ip.as_deref())
                })
                .filter_map(|ip| ip.parse().ok())
                .fold(Vec::new(), |mut ips, ip| {
                    if !ips.contains(&ip) {
                        ips.push(ip);
                    }
                    ips
                }),
            labels: labels.cloned().unwrap_or_default().into_iter().collect(),
        }
    }

    /// Whether the pod opts in, given whether its namespace does.
    pub fn opted_in(&self, namespace_enabled: bool) -> bool {
        namespace_enabled && !self.opted_out && !self.istio && !self.finished
    }
}

/// An opted-in pod and its cgroup, as `/api/opted_in` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OptedInPod {
    /// `namespace/name`.
    pub pod: String,
    /// `metadata.uid`.
    pub uid: String,
    /// The pod-level cgroup directory, when found.
    pub cgroup: Option<PathBuf>,
    /// Its cgroup id (the directory's inode), when found.
    pub cgroup_id: Option<u64>,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
    /// Its namespace and labels: who it is to route and authorization rules.
    #[serde(skip)]
    pub identity: Arc<SourceIdentity>,
}

/// The opted-in pods of this node, as discovery last computed them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OptedIn {
    /// Every pod watch has synced at least once: the set is complete.
    pub synced: bool,
    /// By `namespace/name`.
    pub pods: BTreeMap<String, OptedInPod>,
}

impl OptedIn {
    /// The cgroup ids to put in the datapath's opted-in map.
    pub fn cgroup_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.pods.values().filter_map(|p| p.cgroup_id)
    }

    /// Who each address of these pods is: the proxy knows a client connection's pod by its
    /// peer address.
    pub fn identities(&self) -> foldhash::HashMap<IpAddr, Arc<SourceIdentity>> {
        self.pods
            .values()
            .flat_map(|p| p.ips.iter().map(|ip| (*ip, p.identity.clone())))
            .collect()
    }
}

/// How deep [`pod_cgroup`] searches below the root when the usual paths are not there.
const SEARCH_DEPTH: usize = 5;

/// The pod-level cgroup directory of the pod `uid` below `root` (the cgroup v2 mount), or
/// `None` if it is not there (yet).
pub fn pod_cgroup(root: &Path, uid: &str, qos: &str, container_ids: &[String]) -> Option<PathBuf> {
    if uid.is_empty() {
        return None;
    }
    let systemd_uid = uid.replace('-', "_");
    let qos = qos.to_ascii_lowercase();
    let mut candidates = Vec::new();
    // The QoS class is in the status; when it is not known yet, try all three.
    let classes: &[&str] = match qos.as_str() {
        "guaranteed" => &[""],
        "burstable" | "besteffort" => &[qos.as_str()],
        _ => &["burstable", "besteffort", ""],
    };
    for class in classes {
        if class.is_empty() {
            candidates.push(format!("kubepods.slice/kubepods-pod{systemd_uid}.slice"));
            candidates.push(format!("kubepods/pod{uid}"));
        } else {
            candidates.push(format!(
                "kubepods.slice/kubepods-{class}.slice/kubepods-{class}-pod{systemd_uid}.slice"
            ));
            candidates.push(format!("kubepods/{class}/pod{uid}"));
        }
    }
    if let Some(p) = candidates.iter().map(|c| root.join(c)).find(|p| p.is_dir()) {
        return Some(p);
    }
    let by_name = |name: &str| {
        name == format!("pod{uid}")
            || (name.ends_with(&format!("pod{systemd_uid}.slice")) && name.contains("kubepods"))
    };
    if let Some(p) = search(root, SEARCH_DEPTH, &by_name) {
        return Some(p);
    }
    // A container's cgroup is named after its id (`cri-containerd-<id>.scope`, `crio-<id>.scope`,
    // `docker-<id>.scope`, or `<id>`); its parent is the pod's.
    container_ids
        .iter()
        .filter(|id| id.len() >= 12)
        .find_map(|id| {
            let by_id = |name: &str| {
                name == id
                    || name
                        .strip_suffix(".scope")
                        .and_then(|n| n.rsplit_once('-'))
                        .is_some_and(|(_, n)| n == id)
            };
            search(root, SEARCH_DEPTH + 1, &by_id).and_then(|p| p.parent().map(Path::to_path_buf))
        })
}

/// The first directory below `dir` (breadth first, at most `depth` levels) whose name matches.
fn search(dir: &Path, depth: usize, matches: &dyn Fn(&str) -> bool) -> Option<PathBuf> {
    let mut level = vec![dir.to_path_buf()];
    for _ in 0..depth {
        let mut next = Vec::new();
        for d in &level {
            let Ok(entries) = std::fs::read_dir(d) else {
                continue;
            };
            for e in entries.flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                if e.file_name().to_str().is_some_and(matches) {
                    return Some(e.path());
                }
                next.push(e.path());
            }
        }
        level = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ebpf::cgroup;

    /// A directory tree removed on drop.
    struct Tree(PathBuf);

    impl Tree {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "balancer-pods-{name}-{}-{}",
                std::process::id(),
                fastrand::u64(..)
            ));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }

        fn mk(&self, rel: &str) -> PathBuf {
            let p = self.0.join(rel);
            std::fs::create_dir_all(&p).unwrap();
            p
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const UID: &str = "0f6c1b2a-3d4e-4f50-8a9b-0c1d2e3f4a5b";
    const CID: &str = "4e8f2d0c6b1a3957e8d2c4b6a0f1e3d5c7b9a8f6e4d2c0b1a3957e8d2c4b6a0f";

    #[test]
    fn systemd_driver_burstable_and_guaranteed() {
        let t = Tree::new("systemd");
        let pod = t.mk(&format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            UID.replace('-', "_")
        ));
        t.mk(&format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope",
            UID.replace('-', "_")
        ));
        t.mk("kubepods.slice/kubepods-besteffort.slice");
        assert_eq!(pod_cgroup(&t.0, UID, "Burstable", &[]), Some(pod.clone()));
        // QoS not known yet: still found.
        assert_eq!(pod_cgroup(&t.0, UID, "", &[]), Some(pod.clone()));
        assert_eq!(
            cgroup::id(&pod_cgroup(&t.0, UID, "Burstable", &[]).unwrap()).unwrap(),
            cgroup::id(&pod).unwrap()
        );
        let g = "11111111-2222-3333-4444-555555555555";
        let gpod = t.mk(&format!(
            "kubepods.slice/kubepods-pod{}.slice",
            g.replace('-', "_")
        ));
        assert_eq!(pod_cgroup(&t.0, g, "Guaranteed", &[]), Some(gpod));
        assert_eq!(pod_cgroup(&t.0, "no-such-uid", "", &[]), None);
    }

    #[test]
    fn cgroupfs_driver_besteffort_and_guaranteed() {
        let t = Tree::new("cgroupfs");
        let pod = t.mk(&format!("kubepods/besteffort/pod{UID}"));
        t.mk(&format!("kubepods/besteffort/pod{UID}/{CID}"));
        assert_eq!(pod_cgroup(&t.0, UID, "BestEffort", &[]), Some(pod));
        let g = "11111111-2222-3333-4444-555555555555";
        let gpod = t.mk(&format!("kubepods/pod{g}"));
        assert_eq!(pod_cgroup(&t.0, g, "Guaranteed", &[]), Some(gpod));
    }

    #[test]
    fn a_nested_kubelet_root_is_searched() {
        // kind: the node's kubelet runs with --cgroup-root=/kubelet.
        let t = Tree::new("nested");
        let pod = t.mk(&format!(
            "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{}.slice",
            UID.replace('-', "_")
        ));
        // The QoS class says Burstable (wrong on purpose): the search does not depend on it.
        assert_eq!(pod_cgroup(&t.0, UID, "Burstable", &[]), Some(pod));
    }

    #[test]
    fn a_container_id_finds_its_pod_in_an_unknown_layout() {
        let t = Tree::new("by-container");
        let pod = t.mk("custom/some-pod-dir");
        t.mk(&format!("custom/some-pod-dir/cri-containerd-{CID}.scope"));
        assert_eq!(
            pod_cgroup(&t.0, UID, "", &[CID.to_string()]),
            Some(pod.clone())
        );
        let t2 = Tree::new("by-container-cgroupfs");
        let pod2 = t2.mk("custom/p");
        t2.mk(&format!("custom/p/{CID}"));
        assert_eq!(pod_cgroup(&t2.0, UID, "", &[CID.to_string()]), Some(pod2));
    }

    fn pod(json: serde_json::Value) -> PodInfo {
        PodInfo::from_pod(&serde_json::from_value(json).unwrap())
    }

    #[test]
    fn opt_in_rules() {
        let plain = pod(serde_json::json!({
            "metadata": {"name": "a", "namespace": "ns", "uid": UID},
            "spec": {"containers": [{"name": "app"}]},
            "status": {"phase": "Running", "qosClass": "Burstable",
                       "containerStatuses": [{"name": "app", "containerID": format!("containerd://{CID}"),
                         "image": "x", "imageID": "", "ready": true, "restartCount": 0}]}
        }));
        assert_eq!(plain.container_ids, vec![CID.to_string()]);
        assert_eq!(plain.qos, "Burstable");
        assert!(plain.opted_in(true));
        assert!(!plain.opted_in(false));
        let out = pod(serde_json::json!({
            "metadata": {"name": "b", "namespace": "ns", "labels": {ENABLED_LABEL: "false"}},
        }));
        assert!(!out.opted_in(true));
        let istio_annotated = pod(serde_json::json!({
            "metadata": {"name": "c", "namespace": "ns", "annotations": {ISTIO_STATUS_ANNOTATION: "{}"}},
        }));
        assert!(!istio_annotated.opted_in(true));
        let istio_container = pod(serde_json::json!({
            "metadata": {"name": "d", "namespace": "ns"},
            "spec": {"containers": [{"name": "app"}, {"name": ISTIO_PROXY_CONTAINER}]},
        }));
        assert!(!istio_container.opted_in(true));
        let done = pod(serde_json::json!({
            "metadata": {"name": "e", "namespace": "ns"}, "status": {"phase": "Succeeded"}
        }));
        assert!(!done.opted_in(true));
    }
}
