//! What feeds the store: the configuration file (`file`) and the Kubernetes API (`kube`, with
//! the pods of this node and their cgroups in `pods`). Every source speaks in
//! `state::Update`s, so the store behaves the same whatever feeds it; each source's updates are
//! kept apart (`state::Source`), so one source's reset never removes another's services.
#![forbid(unsafe_code)]

pub mod file;
pub mod kube;
pub mod pods;

/// The Kubernetes resources the agent watches: (API group, resource). The deployed
/// ClusterRole grants get/list/watch on exactly these (a test in `tests` checks it).
pub const WATCHED_RESOURCES: &[(&str, &str)] = &[
    ("", "services"),
    ("discovery.k8s.io", "endpointslices"),
    ("", "namespaces"),
    ("", "pods"),
];
