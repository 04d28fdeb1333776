//! A cluster in network namespaces for testing the egress dataplane with
//! real traffic: a router with a bridge for the node network and a
//! small-MTU link to an external server, nodes with pods behind veths and
//! CNI-style masquerade, one `egress-agent` per node, and traffic helpers
//! that report what the server saw.
//!
//! Everything a [`Lab`] creates carries its unique prefix and is removed when
//! it is dropped, so tests run concurrently and clean up after panics.

pub mod agent;
pub mod bench_topology;
pub mod chaos;
pub mod error;
pub mod exec;
pub mod failover;
pub mod kubernetes;
pub mod namespaces;
pub mod netns;
pub mod spec;
pub mod topology;
pub mod traffic;
pub mod window;

pub use agent::{Agent, Stats, agent_binary, workspace_root};
pub use error::{LabError, Result};
pub use exec::{exec_in, exec_in_timeout};
pub use spec::{KubernetesSpec, LabSpec, PodRef, PolicySpec};
pub use topology::{Lab, Topology, cleanup_prefix};
pub use traffic::{
    ClientOpts, IcmpObserver, Probe, TcpConn, TcpServer, UdpServer, icmp_echo, tcp_bulk, tcp_many,
    tcp_probe, udp_path_mtu, udp_probe,
};

/// Where `lab up` writes its description.
pub fn topology_json_path() -> std::path::PathBuf {
    workspace_root().join("target/lab/topology.json")
}
