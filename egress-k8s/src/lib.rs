//! The Kubernetes control plane of the egress agent.
//!
//! - [`crd`]: the `EgressIP` resource (OVN-Kubernetes compatible spec).
//! - [`selector`], [`facts`], [`plan`], [`project`], [`claims`],
//!   [`leaving`]: pure functions from cluster objects to decisions
//!   (validation, placement, policy ids, status, claim liveness, drain or
//!   restart) and to one node's [`egress_model::NodeState`].
//! - [`session`]: the node session's pure state machine (claims, locks,
//!   renewals, fence, hand-over, restart grace, adoption, the datapath
//!   report carried in the claims writes).
//! - [`controller`]: the I/O around them, one module per role (watches,
//!   leader election, assigner, node session, leases); [`run`] is the
//!   controller's entry point.
//! - [`agent_source`]: the agent's Kubernetes desired-state source: starts
//!   the controller, delivers its fences and desired states, publishes the
//!   node's subnets, takes the agent's reports and stops on SIGTERM; also
//!   the Node-object address lookup. The agent holds no client of its own.
//! - [`decode`], [`pods`]: EgressIPs decoded one object at a time (a bad one
//!   does not stop the watch), and pods kept as the few fields the
//!   controller needs.
//! - [`heartbeat`]: direct UDP liveness probes between agents, with
//!   per-probe nonces.
//! - [`ids`], [`report`]: policy ids bounded by what the datapath holds and
//!   quarantined until every node released them; what each node's datapath
//!   holds and failed to program.

pub mod agent_source;
pub mod claims;
pub mod controller;
pub mod crd;
pub mod decode;
pub mod facts;
pub mod heartbeat;
pub mod ids;
pub mod leaving;
pub mod plan;
pub mod pods;
pub mod project;
pub mod report;
pub mod selector;
pub mod session;

pub use controller::{AgentLink, Desired, Error, Options, link, run};

/// The CRD manifest generated from the Rust types for the default
/// `max_policies` (`deploy/crd.yaml`).
pub fn crd_yaml() -> String {
    crd_yaml_for(egress_common::maps::DEFAULT_MAX_POLICIES)
}

/// The CRD manifest for nodes whose `[datapath] max_policies` is `max_policies`.
pub fn crd_yaml_for(max_policies: u32) -> String {
    let header = "# Generated from egress-k8s/src/crd.rs by `cargo run -p egress-k8s --bin egress-crdgen > deploy/crd.yaml`.\n# Do not edit: the egress-k8s tests fail when this file is stale.\n";
    format!(
        "{header}{}",
        serde_yaml::to_string(&crd::crd(max_policies)).expect("CRD serializes")
    )
}
