//! The Kubernetes source as the agent applies it. The Kubernetes work
//! itself (the client, the controller, fences, subnet publishing, the
//! hand-over on SIGTERM, the Node-object lookup) is
//! `egress_k8s::agent_source`; here is what the node does with it:
//!
//! - at start, before the watches have synced, nothing is programmed or
//!   announced: the pinned state of a previous run stays, only this node's
//!   own settings are refreshed, and new pod interfaces are held from now
//!   on;
//! - a fence is applied on its own, at once; addresses the kernel removed
//!   while the claim still holds are put back;
//! - a desired state is applied after the latest fence, then this node's
//!   pods are recorded for held interfaces, and what the datapath holds and
//!   which egress IPs are on the interfaces are reported back;
//! - a controller that stops unexpectedly leaves everything fenced by its
//!   last word, and the agent fails.

use std::{collections::BTreeSet, net::Ipv4Addr, path::Path};

use anyhow::bail;
use egress_config::{AgentConfig, Mode};
use egress_k8s::agent_source::{self, KubernetesSource, NodeSettings, Update};
use egress_netlink::{AddressEvent, Netlink};
use ipnet::Ipv4Net;

use super::{Flow, Source};
use crate::{agent::Agent, node_address};

/// Node identity in Kubernetes mode, where one file serves every node.
pub struct KubeOptions {
    /// The Node object's name (the downward API's `spec.nodeName`).
    pub node_name: Option<String>,
    /// This node's address (the downward API's `status.hostIP`).
    pub node_address: Option<Ipv4Addr>,
}

/// The Kubernetes-mode file, with this node's name and address from the
/// command line or the environment (one file serves every node).
pub fn load(path: &Path, node: &KubeOptions) -> anyhow::Result<AgentConfig> {
    let mut config = AgentConfig::load_for(path, Mode::Kubernetes)?;
    if let Some(name) = &node.node_name {
        config.node.name.clone_from(name);
    }
    if node.node_address.is_some() {
        config.node.address = node.node_address;
    }
    if config.node.name.is_empty() {
        bail!("node.name: not set; set NODE_NAME (the DaemonSet does), --node-name or node.name");
    }
    Ok(config)
}

/// This node's address: the explicit one if set (it must be local), else
/// the first local one of the Node object's, the host name's and the
/// default-route interface's.
pub async fn node_address(netlink: &Netlink, config: &AgentConfig) -> anyhow::Result<Ipv4Addr> {
    let choice = node_address::node_address(
        netlink,
        config.node.address,
        agent_source::node_object_address(&config.node.name),
    )
    .await?;
    tracing::info!(address = %choice.addr, source = %choice.source, passed_over = ?choice.passed_over, "node address");
    Ok(choice.addr)
}

pub struct Kubernetes {
    source: KubernetesSource,
}

impl Kubernetes {
    /// Holds new pod interfaces from now on, refreshes this node's own
    /// settings, and starts the controller.
    pub async fn start(config: &AgentConfig, agent: &mut Agent) -> anyhow::Result<Self> {
        // Interfaces from now on are new pods'.
        agent.start_holding(config.kubernetes.new_pod_hold)?;
        // Until the watches have synced nothing is programmed or announced:
        // the pinned state of a previous run stays as it is. Only this
        // node's own settings (tunnel device, port range) are refreshed.
        agent.reconcile_settings().await?;
        let node = &config.node;
        let settings = NodeSettings {
            node_name: node.name.clone(),
            node_addr: node.address,
            max_policies: config.datapath.max_policies,
            excluded_cidrs: config.cluster.excluded_cidrs.clone(),
            not_egress: node
                .pod_interfaces
                .iter()
                .chain(&node.upstream_interfaces)
                .chain(std::iter::once(&agent.tunnel))
                .cloned()
                .collect(),
        };
        let addresses = interface_addresses(agent).await?;
        let source = KubernetesSource::start(
            &config.kubernetes,
            settings,
            &addresses,
            &agent.egress_ips(),
        )
        .await?;
        agent.claim_validity = Some(source.claim_validity());
        Ok(Self { source })
    }

    /// Applies the controller's latest fence, if it has sent one (before
    /// that the previous agent's terms stand); true when a claimed address
    /// must be put back (see [`Agent::apply_fence`]).
    async fn apply_fence(&mut self, agent: &mut Agent) -> bool {
        match self.source.latest_fence() {
            Some(fence) => agent.apply_fence(fence).await,
            None => false,
        }
    }

    /// Applies the controller's latest desired state and reports what we
    /// hold and what the datapath holds.
    async fn apply_desired(&mut self, agent: &mut Agent) {
        // The fence of this state first: new claims get its lifetime, and
        // LOCAL policies appear with a valid stamp.
        self.apply_fence(agent).await;
        let Some(desired) = self.source.take_desired() else {
            self.source.report_applied(None);
            return;
        };
        let local_pods: BTreeSet<[u8; 4]> =
            desired.local_pods.iter().map(|ip| ip.octets()).collect();
        // Before the pods' policy entries: a pod that goes is unknown here
        // before it is unselected (a held interface reusing its address
        // would otherwise get out as the node in between).
        if let Err(e) = agent.maps.forget_local_pods_except(&local_pods) {
            tracing::error!(error = %e, "forgetting this node's deleted pods for held interfaces");
        }
        let report = match agent.apply(&desired.state, &desired.claims).await {
            Ok(outcome) => {
                // After the pods' policy entries: a selected pod is never
                // known here before its policy is.
                if let Err(e) = agent.maps.add_local_pods(&local_pods) {
                    tracing::error!(error = %e, "recording this node's pods for held interfaces");
                }
                Some(outcome.into())
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "applying the desired state from Kubernetes");
                None
            }
        };
        self.source.report_applied(report);
        let held = agent.held_addresses(&desired.claims).await;
        self.source.report_held(held);
    }

    /// Puts back the claimed addresses the kernel removed while the claim
    /// still holds, and announces them.
    ///
    /// An address's lifetime is whole seconds ending before the fence, so
    /// the kernel may remove it up to a second and a quarter before the
    /// fence: a renewal that comes that late (a short link cut, a stall or
    /// SIGSTOP of the agent) extends the claim but finds the address gone,
    /// and the desired state, unchanged, never claims it again: the status
    /// kept naming this node while its IP carried no traffic (chaos). Re-
    /// adding is safe under the new fence: the session sends the fence
    /// before the desired state, and a fence that moves from one instant to
    /// a later one never comes with fewer active IPs (withdrawals go out on
    /// their own, with the fence they had, or with no fence at all after a
    /// lapse), so every claim of the desired state read now is valid under
    /// it.
    async fn restore_addresses(&mut self, agent: &mut Agent) {
        let Some(claims) = self.source.current_claims() else {
            return;
        };
        if let Err(e) = agent.claim(&claims).await {
            tracing::error!(error = %format!("{e:#}"), "putting back expired egress IPs");
        }
        let held = agent.held_addresses(&claims).await;
        self.source.report_held(held);
    }
}

impl Source for Kubernetes {
    type Update = Update;

    async fn next(&mut self) -> Update {
        self.source.next().await
    }

    async fn apply(&mut self, update: Update, agent: &mut Agent) -> anyhow::Result<Flow> {
        match update {
            Update::Fence => {
                if self.apply_fence(agent).await {
                    self.restore_addresses(agent).await;
                }
            }
            Update::Desired => self.apply_desired(agent).await,
            Update::Ended(Ok(())) => return Ok(Flow::End),
            Update::Ended(Err(e)) => {
                // What is programmed and claimed stays, fenced by the last
                // renewal: it lapses by itself unless a new agent renews it.
                self.apply_fence(agent).await;
                return Err(e.into());
            }
        }
        Ok(Flow::Continue)
    }

    fn applied_whole(&self) -> bool {
        self.source.applied_whole()
    }

    /// Publishes the egress subnets again when a node address (not one of
    /// our own egress IPs, which come, go and are refreshed without
    /// changing them) came or went.
    async fn on_address_event(&mut self, event: &AddressEvent, agent: &Agent) {
        let changes_subnets = match event {
            AddressEvent::Added { addr, .. } | AddressEvent::Removed { addr, .. } => {
                !agent.egress_ips().contains(&addr.addr())
            }
            AddressEvent::Overrun => true,
        };
        if !changes_subnets {
            return;
        }
        match interface_addresses(agent).await {
            Ok(addresses) => self
                .source
                .addresses_changed(&addresses, &agent.egress_ips()),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "listing addresses for the egress subnets")
            }
        }
    }

    fn stop(&mut self) -> bool {
        self.source.stop();
        true
    }

    /// Leaves the programs, pins and addresses fenced by the controller's
    /// last word (a restart grace, or nothing held after a hand-over).
    async fn exit(&mut self, agent: &mut Agent) {
        self.apply_fence(agent).await;
    }
}

/// The node's interface addresses: name, address with prefix.
async fn interface_addresses(agent: &Agent) -> anyhow::Result<Vec<(String, Ipv4Net)>> {
    Ok(agent
        .netlink
        .ipv4_addresses()
        .await?
        .into_iter()
        .map(|a| (a.ifname, a.addr))
        .collect())
}
