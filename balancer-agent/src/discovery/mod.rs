//! What feeds the store: the configuration file today (`file`), the Kubernetes API next.
//! Every source speaks in `state::Update`s, so the store behaves the same whatever feeds it.
#![forbid(unsafe_code)]

pub mod file;

/// The Kubernetes resources the agent watches: (API group, resource). The deployed
/// ClusterRole grants get/list/watch on exactly these (a test in `tests` checks it).
pub const WATCHED_RESOURCES: &[(&str, &str)] = &[
    ("", "services"),
    ("discovery.k8s.io", "endpointslices"),
    ("", "namespaces"),
    ("", "pods"),
];
