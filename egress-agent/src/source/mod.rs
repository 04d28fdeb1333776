//! Where the node's desired state comes from: the static configuration file
//! ([`file`]) or the Kubernetes API ([`kubernetes`], over
//! `egress_k8s::agent_source`). Both are a [`Source`]: the agent's loop
//! ([`crate::run`]) waits for what the source says next and lets it apply
//! that to the node, and hands it the node's address changes, SIGTERM and
//! the exit. The differences between the two live here, not in the loop.

pub mod file;
pub mod kubernetes;

use std::path::Path;

use egress_config::{AgentConfig, Mode};
use egress_netlink::{AddressEvent, Netlink};

use crate::agent::{Agent, PinnedFence};
use kubernetes::KubeOptions;

/// A desired-state source, as the agent's loop drives it.
#[expect(
    async_fn_in_trait,
    reason = "generic only (the loop is monomorphised per source, never `dyn`) and driven on the runtime's `block_on`: no `Send` bound is needed"
)]
pub trait Source {
    /// What the source says next.
    type Update;

    /// Waits for the source's next word.
    async fn next(&mut self) -> Self::Update;

    /// Applies `update` to the node and reports back what the source wants
    /// to know (held IPs, what the datapath holds). An error ends the agent.
    async fn apply(&mut self, update: Self::Update, agent: &mut Agent) -> anyhow::Result<Flow>;

    /// Whether the source's state has been applied whole: the agent is ready
    /// once it has (and its programs are attached), not before.
    fn applied_whole(&self) -> bool;

    /// A node address came, went or was refreshed (before the agent updates
    /// its own exclusions).
    async fn on_address_event(&mut self, event: &AddressEvent, agent: &Agent);

    /// SIGTERM or SIGINT: true when the agent must go on until the source
    /// ends ([`Flow::End`]), false when it exits at once.
    fn stop(&mut self) -> bool;

    /// Just before the agent exits: leaves the node on the source's last
    /// word.
    async fn exit(&mut self, agent: &mut Agent);
}

/// What the loop does after an update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The source has ended: the agent exits.
    End,
}

/// Which source the command line chose, and what differs before it starts.
#[derive(Clone, Copy)]
pub enum Kind<'a> {
    File,
    Kubernetes(&'a KubeOptions),
}

impl Kind<'_> {
    /// The configuration file, checked whole for this source.
    pub fn load(&self, path: &Path) -> anyhow::Result<AgentConfig> {
        match self {
            Kind::File => Ok(AgentConfig::load_for(path, Mode::Static)?),
            Kind::Kubernetes(node) => kubernetes::load(path, node),
        }
    }

    /// Sets `config.node.address` to this node's address: as configured
    /// for the file, chosen among candidates in Kubernetes mode.
    pub async fn choose_node_address(
        &self,
        netlink: &Netlink,
        config: &mut AgentConfig,
    ) -> anyhow::Result<()> {
        match self {
            Kind::File => Ok(()),
            Kind::Kubernetes(_) => {
                config.node.address = Some(kubernetes::node_address(netlink, config).await?);
                Ok(())
            }
        }
    }

    /// What the previous agent's claim-validity stamp is worth.
    pub fn pinned_fence(&self) -> PinnedFence {
        match self {
            Kind::File => PinnedFence::Unfenced,
            Kind::Kubernetes(_) => PinnedFence::Keep,
        }
    }
}
