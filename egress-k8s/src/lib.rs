//! The Kubernetes control plane of the egress agent.
//!
//! - [`crd`]: the `EgressIP` resource (OVN-Kubernetes compatible spec).
//! - [`selector`], [`facts`], [`plan`], [`project`], [`claims`],
//!   [`leaving`]: pure functions from cluster objects to decisions
//!   (validation, placement, policy ids, status, claim liveness, drain or
//!   restart) and to one node's [`egress_model::NodeState`].
//! - [`session`]: the node session's pure state machine (claims, locks,
//!   renewals, fence, hand-over, restart grace, adoption).
//! - [`controller`]: the I/O around them, one module per role (watches,
//!   leader election, assigner, node session, leases); [`run`] is the entry
//!   point of the agent's Kubernetes mode.
//! - [`heartbeat`]: direct UDP liveness probes between agents, with
//!   per-probe nonces.

pub mod claims;
pub mod config;
pub mod controller;
pub mod crd;
pub mod facts;
pub mod heartbeat;
pub mod leaving;
pub mod plan;
pub mod project;
pub mod selector;
pub mod session;

pub use config::KubernetesConfig;
pub use controller::{AgentLink, Desired, Error, Options, link, run};

/// The CRD manifest generated from the Rust types (`deploy/crd.yaml`).
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let header = "# Generated from egress-k8s/src/crd.rs by `cargo run -p egress-k8s --bin egress-crdgen > deploy/crd.yaml`.\n# Do not edit: the egress-k8s tests fail when this file is stale.\n";
    format!(
        "{header}{}",
        serde_yaml::to_string(&crd::EgressIP::crd()).expect("CRD serializes")
    )
}
