//! What feeds the store: the configuration file (`file`) and the Kubernetes API (`kube`, with
//! the pods of this node and their cgroups in `pods`). Every source speaks in
//! `state::Update`s, so the store behaves the same whatever feeds it; each source's updates are
//! kept apart (`state::Source`), so one source's reset never removes another's services.
//!
//! Traffic policy from the cluster: `policy` (which kinds are installed, precedence, refusals,
//! the last good policy) over `istio` (`VirtualService`, `DestinationRule`) and `gateway`
//! (`GRPCRoute` bound to Services), all translated into the call layer's model.
#![forbid(unsafe_code)]

pub mod file;
pub mod gateway;
pub mod istio;
pub mod kube;
pub mod pods;
pub mod policy;

/// The Kubernetes resources the agent watches: (API group, resource). The deployed
/// ClusterRole grants get/list/watch on exactly these (a test in `tests` checks it). The
/// policy kinds are watched only when the cluster serves them (`policy::discover`); pods are
/// watched twice: this node's whole, and every pod's metadata (the labels of endpoints).
pub const WATCHED_RESOURCES: &[(&str, &str)] = &[
    ("", "services"),
    ("discovery.k8s.io", "endpointslices"),
    ("", "namespaces"),
    ("", "pods"),
    ("networking.istio.io", "virtualservices"),
    ("networking.istio.io", "destinationrules"),
    ("gateway.networking.k8s.io", "grpcroutes"),
];
