//! The agent's configuration file, one set of types for everyone who reads
//! or writes it: the agent, the lab and xtask.
//!
//! - [`file`]: the whole file ([`AgentConfig`]), `[node]`, `[cluster]`,
//!   `[[policies]]`, its validation per [`Mode`] and its projection to the
//!   desired datapath state of a static-mode node.
//! - [`datapath`]: `[datapath]`, with the flow timeouts.
//! - [`kubernetes`]: `[kubernetes]`, taken as it is by the controller.
//! - [`interface`]: interface-name patterns (`veth*`).
//!
//! Every type serializes and deserializes, so tools build values and write
//! them as TOML instead of re-declaring the schema. Durations are
//! [`std::time::Duration`] in Rust and keep their keys' units in the file
//! (`claim_ttl_ms`, `gc_interval_secs`, seconds in `[datapath.timeouts]`).

pub mod datapath;
pub mod file;
pub mod interface;
pub mod kubernetes;

pub use datapath::{DEFAULT_MAX_FLOWS_PER_POD, DatapathSettings, Timeouts};
pub use file::{
    AgentConfig, ClusterConfig, ClusterNode, ConfigError, Mode, NodeConfig, NodeWithPods,
    PolicyConfig,
};
pub use interface::interface_matches;
pub use kubernetes::{
    DEFAULT_ASSIGNABLE_LABEL, DEFAULT_LEADER_LEASE, DEFAULT_NEW_POD_HOLD, HeartbeatConfig,
    KubernetesConfig,
};
