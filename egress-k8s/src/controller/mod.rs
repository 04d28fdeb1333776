//! The controller: watches feed the pure functions; one elected agent writes
//! status; every agent publishes its subnets (again whenever an address comes
//! or goes) and claims, and emits its node's desired state.
//!
//! One module per role:
//! - `watches`: reflectors and the views of their stores;
//! - `election`: leader election among a few warm candidates (the leader's
//!   assigner writes, the standbys' keep up);
//! - `assigner`: placement, failure detection, policy ids, status and events;
//! - `node`: the node session: its projection task, and the executor of
//!   the [`crate::session`] state machine (claims, locks, renewals, fence);
//! - `leases`: the claims Lease writer, the per-IP locks and their release.

mod assigner;
mod election;
mod leases;
mod node;
mod watches;

pub(crate) use node::sleep_until;

use std::{collections::BTreeSet, net::Ipv4Addr, time::Instant};

use egress_config::KubernetesConfig;
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
    heartbeat,
    plan::PlanConfig,
    report::DatapathReport,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("connecting to the Kubernetes API (in-cluster service account or KUBECONFIG): {0}")]
    Connect(kube::Error),
    #[error("invalid options: {0}")]
    Options(String),
    #[error("{0}")]
    Stopped(&'static str),
    #[error("heartbeat responder on {addr}: {source}")]
    Heartbeat {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Settings of the Kubernetes mode: the `[kubernetes]` section of the
/// agent's file as it is, and what the agent adds from the rest of the file
/// and from the node.
#[derive(Clone, Debug)]
pub struct Options {
    /// Namespace, timings, election, heartbeat.
    pub kubernetes: KubernetesConfig,
    pub plan: PlanConfig,
    /// Cluster and service networks, never translated.
    pub global_excluded: BTreeSet<Ipv4Net>,
    /// Overrides the node address found in the Node object.
    pub node_addr: Option<Ipv4Addr>,
    /// This node's egress-capable interface addresses, published in the
    /// Node annotation.
    pub subnets: Vec<EgressSubnet>,
}

impl Default for Options {
    fn default() -> Self {
        Self::from_section(KubernetesConfig::default(), Vec::new())
    }
}

impl Options {
    /// The options of `kubernetes`, checked; `subnets` from
    /// [`crate::facts::egress_subnets`].
    pub fn new(kubernetes: KubernetesConfig, subnets: Vec<EgressSubnet>) -> Result<Self, Error> {
        let options = Self::from_section(kubernetes, subnets);
        options.validate()?;
        Ok(options)
    }

    fn from_section(kubernetes: KubernetesConfig, subnets: Vec<EgressSubnet>) -> Self {
        Self {
            plan: PlanConfig {
                assignable_label: kubernetes.assignable_label.clone(),
                ..PlanConfig::default()
            },
            global_excluded: kubernetes.cluster_networks().collect(),
            node_addr: None,
            subnets,
            kubernetes,
        }
    }

    pub fn validate(&self) -> Result<(), Error> {
        self.kubernetes.validate().map_err(Error::Options)
    }
}

/// What the agent must program.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub state: NodeState,
    /// Addresses to hold (put on the interface, then announce with GARP).
    /// Each was published as claimed before it appears here.
    pub claims: Vec<AddressClaim>,
    /// Every pod of this node with an IPv4 address, selected or not.
    pub local_pods: BTreeSet<Ipv4Addr>,
}

/// The controller's end of the link with the agent.
pub struct ControllerLink {
    desired: watch::Sender<Option<Desired>>,
    fence: watch::Sender<Option<Instant>>,
    held: watch::Receiver<BTreeSet<Ipv4Addr>>,
    applied: watch::Receiver<Option<DatapathReport>>,
    subnets: watch::Receiver<Option<Vec<EgressSubnet>>>,
    down: watch::Receiver<BTreeSet<String>>,
    shutdown: watch::Receiver<bool>,
}

/// The agent's end of the link: what the agent must do with each channel.
pub struct AgentLink {
    /// `None` until every watch has synced and this node's own claims are
    /// settled (after a restart: adopted or given up): the agent must
    /// neither program nor announce anything before (it would GARP stale
    /// state, or remove addresses its successor session is about to keep).
    /// Then every change. Its `claims` are the addresses to hold: each was
    /// locked and published before it appears here.
    pub desired: watch::Receiver<Option<Desired>>,
    /// Until when this node may hold and translate for the egress IPs in
    /// `desired.claims`: after this instant others may take them over, so
    /// the datapath (`DatapathConfig::claims_valid_until_ns`) and the
    /// addresses (their valid lifetime) must have let go by then without
    /// the agent's help. It is the last successful claims write's send time
    /// plus its lifetime (the claim lifetime, or the restart grace when
    /// stopping for a restart) minus one renewal period of safety margin.
    /// Moves forward with every renewal; `None` while the node holds
    /// nothing. Apply it at once when it changes, and the last value again
    /// when exiting. The controller sends its first fence (`None` too) just
    /// before the first `desired`, once adoption is settled; the channel's
    /// initial `None` is not its word: until the first send the terms in
    /// place are the previous agent's, keep them, at exit as well (do not
    /// treat that `None` as "holds nothing", which would cut the claims a
    /// successor stopped early, or whose controller failed at start, was
    /// about to adopt).
    pub fence: watch::Receiver<Option<Instant>>,
    /// The agent reports the egress IPs actually present on its interfaces
    /// after applying `desired`; a claim is written away and its lock
    /// released only once its address is gone from here.
    pub held: watch::Sender<BTreeSet<Ipv4Addr>>,
    /// The agent reports what its datapath holds after each apply, and the
    /// policies it failed to program; published in the claims Lease for the
    /// assigner (policy-id quarantine, `Applied` conditions). A change is
    /// written with the session's next claims write, never on its own (see
    /// [`crate::session::ClaimsWrite::report`]).
    pub applied: watch::Sender<Option<DatapathReport>>,
    /// This node's egress-capable subnets when they change after start
    /// (`None`: still [`Options::subnets`]); republished on the Node.
    pub subnets: watch::Sender<Option<Vec<EgressSubnet>>>,
    /// Node names that failed the agent's own direct probes, if it has any:
    /// counted like missed heartbeats (a node is down only if its claims
    /// Lease is not live either).
    pub down: watch::Sender<BTreeSet<String>>,
    /// Set to true when the agent stops (SIGTERM). The controller then ends
    /// its session and [`run`] returns `Ok` once:
    /// - the node is being drained or deleted ([`crate::leaving`]), or the
    ///   restart grace is zero: the IPs are handed over (the assigner moves
    ///   them; `desired` loses their claims; [`AgentLink::held`] must report
    ///   them gone) or [`Options::drain_timeout`] passed;
    /// - otherwise (a restart): the restart grace is published on the
    ///   node's claims Lease and `fence` moved to its end; `desired` keeps
    ///   the claims.
    ///
    /// Either way the agent then exits leaving its programs, pins and
    /// addresses in place, after applying the last `fence`: a successor
    /// agent adopts what is still valid, and what is not lapses by itself.
    pub shutdown: watch::Sender<bool>,
}

pub fn link() -> (ControllerLink, AgentLink) {
    let (desired_tx, desired_rx) = watch::channel(None);
    let (fence_tx, fence_rx) = watch::channel(None);
    let (held_tx, held_rx) = watch::channel(BTreeSet::new());
    let (applied_tx, applied_rx) = watch::channel(None);
    let (subnets_tx, subnets_rx) = watch::channel(None);
    let (down_tx, down_rx) = watch::channel(BTreeSet::new());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    (
        ControllerLink {
            desired: desired_tx,
            fence: fence_tx,
            held: held_rx,
            applied: applied_rx,
            subnets: subnets_rx,
            down: down_rx,
            shutdown: shutdown_rx,
        },
        AgentLink {
            desired: desired_rx,
            fence: fence_rx,
            held: held_tx,
            applied: applied_tx,
            subnets: subnets_tx,
            down: down_tx,
            shutdown: shutdown_tx,
        },
    )
}

/// Runs the Kubernetes mode for `node_name` until `shutdown` is set (then
/// hands this node's IPs over or keeps them for a successor, see
/// [`AgentLink::shutdown`]) or a fatal error.
///
/// The agent reads [`AgentLink::desired`] and [`AgentLink::fence`], applies
/// them, and reports what it holds in [`AgentLink::held`].
///
/// Tasks of their own, each with its own timers, so that none waits for
/// another: the heartbeat responder; the node session (claim writes and
/// renewals, lock requests, withdrawal at the fence), which never computes
/// anything that grows with the cluster; the node's projection (watches
/// and the desired state, on the blocking pool); the subnet publisher; and
/// on assigner candidates the election and the assigner. The agent runs
/// them on a multi-threaded runtime.
pub async fn run(
    client: Client,
    node_name: String,
    options: Options,
    link: ControllerLink,
) -> Result<(), Error> {
    options.validate()?;
    let responder = match &options.kubernetes.heartbeat {
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
    let (candidate_tx, candidate_rx) = watch::channel(None);
    let elector = options.kubernetes.assigner.then(|| {
        let client = client.clone();
        let options = options.clone();
        let node_name = node_name.clone();
        let down = link.down.clone();
        tokio::spawn(async move {
            election::elect(client, node_name, options, down, candidate_rx).await
        })
    });
    // Dropped (so aborted) when this future ends or is dropped.
    let elector = AbortOnDrop(elector);
    let _responder = AbortOnDrop(responder);
    let result = node::run_session(
        client.clone(),
        node_name.clone(),
        options.clone(),
        link,
        candidate_tx,
    )
    .await;
    if result.is_ok() && options.kubernetes.assigner {
        drop(elector);
        // Let a standby take over at once instead of after the lease.
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
    fn options_are_the_checked_section() {
        Options::default().validate().unwrap();
        let section = KubernetesConfig {
            assignable_label: "example.com/egress".into(),
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            ..Default::default()
        };
        let o = Options::new(section.clone(), Vec::new()).unwrap();
        assert_eq!(o.plan.assignable_label, "example.com/egress");
        assert_eq!(o.global_excluded.len(), 1);
        assert_eq!(o.kubernetes, section);
        let bad = KubernetesConfig {
            assigner_candidates: 0,
            ..Default::default()
        };
        let e = Options::new(bad, Vec::new()).unwrap_err().to_string();
        assert!(e.starts_with("invalid options: "), "{e}");
        assert!(e.contains("candidates"), "{e}");
    }
}
