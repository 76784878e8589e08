//! What feeds the store: the configuration file today (`file`), the Kubernetes API next.
//! Every source speaks in `state::Update`s, so the store behaves the same whatever feeds it.
#![forbid(unsafe_code)]

pub mod file;
