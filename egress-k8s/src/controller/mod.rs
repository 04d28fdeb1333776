//! The controller: watches feed the pure functions; one elected agent writes
//! status; every agent publishes its subnets (again whenever an address comes
//! or goes) and claims, and emits its node's desired state.

//!
//! One module per role:
//! - [`watches`]: reflectors and the views of their stores;
//! - [`election`]: leader election (the leader runs the assigner);
//! - [`assigner`]: placement, policy ids, status and events;
//! - [`node`]: the node session (projection, claims, renewals, withdrawal);
//! - [`leases`]: the claims Lease writer, the per-IP locks and their release.

mod assigner;
mod election;
mod leases;
mod node;
mod watches;

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use egress_model::{AddressClaim, NodeState};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    facts::{EgressSubnet, SUBNETS_ANNOTATION, subnets_annotation_value},
    heartbeat::{self, HeartbeatConfig},
    plan::PlanConfig,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("invalid options: {0}")]
    Options(String),
    #[error("heartbeat responder on {addr}: {source}")]
    Heartbeat {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Settings of the Kubernetes mode.
#[derive(Clone, Debug)]
pub struct Options {
    /// The agent's namespace: claims and leader Leases live there.
    pub namespace: String,
    pub plan: PlanConfig,
    /// Cluster and service networks, never translated.
    pub global_excluded: BTreeSet<Ipv4Net>,
    /// Overrides the node address found in the Node object.
    pub node_addr: Option<Ipv4Addr>,
    /// This node's egress-capable interface addresses, published in the
    /// Node annotation.
    pub subnets: Vec<EgressSubnet>,
    /// How long a claim stays valid without renewal. Bounds failover time
    /// (a new holder waits for the old claim to expire unless it was
    /// released). A node that cannot renew withdraws its IPs after
    /// `claim_ttl - claim_renew` (at most half a renewal period later), so
    /// before anyone else may claim them.
    pub claim_ttl: Duration,
    pub claim_renew: Duration,
    /// Take part in the assigner election.
    pub assigner: bool,
    pub leader_lease: String,
    pub leader_ttl: Duration,
    pub leader_renew: Duration,
    /// How long shutdown waits for the IPs to be handed over.
    pub drain_timeout: Duration,
    /// Direct liveness probes (the assigner probes, every agent answers);
    /// `None` relies on Node readiness and [`AgentLink::down`] only.
    pub heartbeat: Option<HeartbeatConfig>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            namespace: "egress-system".into(),
            plan: PlanConfig::default(),
            global_excluded: BTreeSet::new(),
            node_addr: None,
            subnets: Vec::new(),
            claim_ttl: Duration::from_millis(1500),
            claim_renew: Duration::from_millis(300),
            assigner: true,
            leader_lease: "egress-assigner".into(),
            leader_ttl: Duration::from_secs(15),
            leader_renew: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(20),
            heartbeat: Some(HeartbeatConfig::default()),
        }
    }
}

impl Options {
    pub fn validate(&self) -> Result<(), Error> {
        if self.claim_renew.is_zero() || self.claim_renew * 2 > self.claim_ttl {
            return Err(Error::Options(format!(
                "claim renew interval {:?} must be non-zero and at most half the claim lifetime {:?}",
                self.claim_renew, self.claim_ttl
            )));
        }
        if self.leader_renew.is_zero() || self.leader_renew * 2 > self.leader_ttl {
            return Err(Error::Options(format!(
                "leader renew interval {:?} must be non-zero and at most half the leader lease {:?}",
                self.leader_renew, self.leader_ttl
            )));
        }
        if let Some(hb) = &self.heartbeat {
            hb.validate().map_err(Error::Options)?;
        }
        if self.namespace.is_empty() {
            return Err(Error::Options("namespace must not be empty".into()));
        }
        Ok(())
    }
}

/// What the agent must program.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub state: NodeState,
    /// Addresses to hold (put on the interface, then announce with GARP).
    /// Each was published as claimed before it appears here.
    pub claims: Vec<AddressClaim>,
}

/// The controller's end of the link with the agent.
pub struct ControllerLink {
    desired: watch::Sender<Option<Desired>>,
    fence: watch::Sender<Option<Instant>>,
    held: watch::Receiver<BTreeSet<Ipv4Addr>>,
    subnets: watch::Receiver<Option<Vec<EgressSubnet>>>,
    down: watch::Receiver<BTreeSet<String>>,
    shutdown: watch::Receiver<bool>,
}

/// The agent's end of the link.
pub struct AgentLink {
    /// `None` until every watch has synced: the agent must neither program
    /// nor announce anything before (after a restart it would GARP stale
    /// state). Then every change.
    pub desired: watch::Receiver<Option<Desired>>,
    /// Until when this node may hold and translate for the egress IPs it
    /// claims: past this instant others may take them over, so the
    /// datapath and the addresses must have let go by then without the
    /// agent's help. Moves forward with every claim renewal; `None` while
    /// the node holds nothing.
    pub fence: watch::Receiver<Option<Instant>>,
    /// The agent reports the egress IPs actually present on its interfaces
    /// after applying `claims`; a claim is released only once its address
    /// is gone from here.
    pub held: watch::Sender<BTreeSet<Ipv4Addr>>,
    /// This node's egress-capable subnets when they change after start
    /// (`None`: still [`Options::subnets`]); republished on the Node.
    pub subnets: watch::Sender<Option<Vec<EgressSubnet>>>,
    /// Node names that failed direct probes (heartbeats): the assigner moves
    /// their IPs away.
    pub down: watch::Sender<BTreeSet<String>>,
    /// Set to true to hand the IPs over and make [`run`] return.
    pub shutdown: watch::Sender<bool>,
}

pub fn link() -> (ControllerLink, AgentLink) {
    let (desired_tx, desired_rx) = watch::channel(None);
    let (fence_tx, fence_rx) = watch::channel(None);
    let (held_tx, held_rx) = watch::channel(BTreeSet::new());
    let (subnets_tx, subnets_rx) = watch::channel(None);
    let (down_tx, down_rx) = watch::channel(BTreeSet::new());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    (
        ControllerLink {
            desired: desired_tx,
            fence: fence_tx,
            held: held_rx,
            subnets: subnets_rx,
            down: down_rx,
            shutdown: shutdown_rx,
        },
        AgentLink {
            desired: desired_rx,
            fence: fence_rx,
            held: held_tx,
            subnets: subnets_tx,
            down: down_tx,
            shutdown: shutdown_tx,
        },
    )
}

/// Runs the Kubernetes mode for `node_name` until `shutdown` is set (then
/// hands this node's IPs over) or a fatal error.
///
/// The agent reads [`AgentLink::desired`], applies it with its reconciler,
/// reports what it holds in [`AgentLink::held`], and feeds its heartbeat
/// verdicts into [`AgentLink::down`].
pub async fn run(
    client: Client,
    node_name: String,
    options: Options,
    link: ControllerLink,
) -> Result<(), Error> {
    options.validate()?;
    let responder = match &options.heartbeat {
        Some(hb) => {
            let socket =
                heartbeat::bind_responder(hb)
                    .await
                    .map_err(|source| Error::Heartbeat {
                        addr: std::net::SocketAddr::new(hb.bind, hb.port),
                        source,
                    })?;
            Some(tokio::spawn(async move {
                if let Err(e) = heartbeat::respond(socket).await {
                    warn!(error = %e, "heartbeat responder stopped");
                }
            }))
        }
        None => None,
    };
    publish_subnets(&client, &node_name, &options.subnets).await?;

    let elector = options.assigner.then(|| {
        let client = client.clone();
        let options = options.clone();
        let node_name = node_name.clone();
        let down = link.down.clone();
        tokio::spawn(async move { election::elect(client, node_name, options, down).await })
    });
    // Dropped (so aborted) when this future ends or is dropped.
    let elector = AbortOnDrop(elector);
    let _responder = AbortOnDrop(responder);
    let result = node::node_agent(client.clone(), node_name.clone(), options.clone(), link).await;
    if result.is_ok() && options.assigner {
        drop(elector);
        // Let another agent take over at once instead of after the lease.
        if let Err(e) = election::release_leadership(&client, &node_name, &options).await {
            warn!(error = %e, "cannot release the assigner lease");
        }
    }
    result
}

/// Publishes this node's egress-capable subnets on its Node.
pub async fn publish_subnets(
    client: &Client,
    node_name: &str,
    subnets: &[EgressSubnet],
) -> Result<(), Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let patch = serde_json::json!({
        "metadata": {"annotations": {SUBNETS_ANNOTATION: subnets_annotation_value(subnets)}}
    });
    nodes
        .patch(node_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    info!(node = node_name, ?subnets, "published egress subnets");
    Ok(())
}

pub(crate) struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked() {
        Options::default().validate().unwrap();
        let bad = Options {
            claim_renew: Duration::from_secs(2),
            ..Options::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("claim renew")
        );
    }
}
