//! The agent's library: the desired map image, the
//! reconciler, the loader, the conntrack collector and the inspection CLI.
//! `run` is the agent's loop over a desired-state source (`source`: the
//! static file or Kubernetes); what it does to the node is in `agent`
//! (bring-up), `reconcile`, `pod_links`, `claims` and `node_address`;
//! `reset` is the uninstall.
//! `main.rs` is the `egress-agent` binary on top of it; the
//! `BPF_PROG_TEST_RUN` suite (egress-testrun) loads and programs the
//! datapath through the same code.

pub mod agent;
pub mod claims;
pub mod fence;
pub mod gc;
pub mod hold;
pub mod host;
pub mod identity;
pub mod image;
pub mod inspect;
pub mod loader;
pub mod maps;
pub mod node_address;
pub mod pod_links;
pub mod reconcile;
pub mod reset;
pub mod run;
pub mod source;
