//! The agent's Kubernetes desired-state source (`egress-agent run
//! --kubernetes`): everything the agent does with the Kubernetes API goes
//! through here, so that the agent itself never builds a client.
//!
//! [`KubernetesSource::start`] connects, builds the controller's [`Options`]
//! from the `[kubernetes]` section and the node's settings, and spawns
//! [`crate::run`]. The agent then waits on [`KubernetesSource::next`] and
//! applies what it says: a new fence (on its own, at once), a new desired
//! state (again every second while the last apply left policies
//! unprogrammed), or the controller's end. It reports back what it applied
//! ([`KubernetesSource::report_applied`]), the egress IPs present on its
//! interfaces ([`KubernetesSource::report_held`]) and its interface
//! addresses, from which this source publishes the egress subnets when they
//! change ([`KubernetesSource::addresses_changed`]). On SIGTERM
//! [`KubernetesSource::stop`] asks the controller to hand the node's IPs
//! over or keep them for a successor, and `next` ends once it has, or once
//! the drain timeout (plus 5 s) has passed.
//!
//! [`node_object_address`] is the Node object's address, one of the
//! candidates the agent weighs for its own address before it starts.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use egress_config::{KubernetesConfig, interface_matches};
use egress_model::AddressClaim;
use ipnet::Ipv4Net;
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    AgentLink, Desired, Error,
    controller::{Options, sleep_until},
    facts::EgressSubnet,
    report::DatapathReport,
};

/// What the source takes from the agent's configuration and its set-up.
#[derive(Debug)]
pub struct NodeSettings {
    /// The Node object's name.
    pub node_name: String,
    /// This node's address, as the agent chose it.
    pub node_addr: Option<Ipv4Addr>,
    /// The size of this node's policy array: the assigner keeps policy ids
    /// below it (cluster-wide).
    pub max_policies: u32,
    /// Destinations never translated, beyond the cluster and service
    /// networks (`[cluster] excluded_cidrs`).
    pub excluded_cidrs: Vec<Ipv4Net>,
    /// Interfaces whose addresses are not offered for egress IPs unless
    /// `egress_interfaces` names them: the pod, upstream and tunnel
    /// interfaces (patterns, a trailing `*` matches a prefix).
    pub not_egress: Vec<String>,
}

/// What the source says next.
#[derive(Debug)]
pub enum Update {
    /// A new fence ([`KubernetesSource::latest_fence`]): applied on its
    /// own, at once (one map write and the addresses' lifetimes), without a
    /// reconcile.
    Fence,
    /// A new desired state, or the latest one again after an incomplete
    /// apply: apply the latest fence, then
    /// [`KubernetesSource::take_desired`].
    Desired,
    /// The controller has ended: `Ok` after [`KubernetesSource::stop`]
    /// (handed over, kept for a successor, or the wait timed out), an error
    /// when it stopped on its own. Either way its last fence stands.
    Ended(Result<(), Error>),
}

/// The controller's task and the agent's end of its link.
pub struct KubernetesSource {
    link: AgentLink,
    controller: Option<JoinHandle<Result<(), Error>>>,
    fence: ControllerFence,
    config: KubernetesConfig,
    settings: NodeSettings,
    /// The last apply left policies unprogrammed (or had no state): retried.
    incomplete: bool,
    /// Some apply has been complete.
    applied_whole: bool,
    retry: tokio::time::Interval,
    /// Set once the agent asked the controller to stop.
    stop_deadline: Option<Instant>,
}

/// How often an incomplete apply is retried.
const RETRY: Duration = Duration::from_secs(1);
/// How long the agent waits for the controller beyond its drain timeout.
const STOP_MARGIN: Duration = Duration::from_secs(5);

impl KubernetesSource {
    /// Starts the controller for this node; `addresses` are the node's
    /// interface addresses (name, address with prefix), `own` the egress IPs
    /// the agent added itself.
    pub async fn start(
        config: &KubernetesConfig,
        settings: NodeSettings,
        addresses: &[(String, Ipv4Net)],
        own: &BTreeSet<Ipv4Addr>,
    ) -> Result<Self, Error> {
        let subnets = offered_subnets(config, &settings.not_egress, addresses, own);
        let mut options = Options::new(config.clone(), subnets)?;
        options.node_addr = settings.node_addr;
        // Policy ids index this node's policy array: the assigner keeps
        // them below the (cluster-wide) max_policies.
        options.plan.max_policies = settings.max_policies;
        options
            .global_excluded
            .extend(settings.excluded_cidrs.iter().map(|n| n.trunc()));
        let client = kube::Client::try_default().await.map_err(Error::Connect)?;
        let (controller_link, link) = crate::link();
        let node_name = settings.node_name.clone();
        tracing::info!(node = %node_name, address = ?settings.node_addr, "Kubernetes mode: waiting for the watches to sync");
        let controller = tokio::spawn(crate::run(client, node_name, options, controller_link));
        Ok(Self {
            link,
            controller: Some(controller),
            fence: ControllerFence::default(),
            config: config.clone(),
            settings,
            incomplete: false,
            applied_whole: false,
            retry: tokio::time::interval(RETRY),
            stop_deadline: None,
        })
    }

    /// Waits for the controller's next word. Never again once it has ended.
    pub async fn next(&mut self) -> Update {
        tokio::select! {
            _ = sleep_until(self.stop_deadline) => {
                tracing::warn!("the Kubernetes controller did not stop in time; exiting anyway");
                self.stop_deadline = None;
                self.controller = None;
                Update::Ended(Ok(()))
            }
            update = from_controller(&mut self.link, &mut self.fence) => update,
            _ = self.retry.tick(), if self.incomplete => Update::Desired,
            outcome = finished(&mut self.controller) => {
                match &outcome {
                    Ok(()) => tracing::info!("Kubernetes controller finished"),
                    Err(e) => tracing::error!(error = %e, "Kubernetes controller failed"),
                }
                if self.stop_deadline.take().is_some() {
                    Update::Ended(Ok(()))
                } else {
                    Update::Ended(Err(Error::Stopped("the Kubernetes controller stopped unexpectedly")))
                }
            }
        }
    }

    /// The controller's latest fence once it has sent one (`Some(None)`: the
    /// node holds nothing); `None` while it has sent none: the previous
    /// agent's terms stand. See [`ControllerFence`].
    pub fn latest_fence(&mut self) -> Option<Option<Instant>> {
        self.fence.latest(&mut self.link.fence)
    }

    /// The claim's validity as it moves, for gratuitous ARP bursts: a burst
    /// announces only while it is in the future.
    pub fn claim_validity(&self) -> watch::Receiver<Option<Instant>> {
        self.link.fence.clone()
    }

    /// The latest desired state, marked seen; `None` before the watches
    /// have synced.
    pub fn take_desired(&mut self) -> Option<Desired> {
        self.link.desired.borrow_and_update().clone()
    }

    /// The claims of the latest desired state, leaving it unseen.
    pub fn current_claims(&self) -> Option<Vec<AddressClaim>> {
        self.link
            .desired
            .borrow()
            .as_ref()
            .map(|d| d.claims.clone())
    }

    /// What the datapath holds after an apply, `None` when the apply failed
    /// or there was nothing to apply; an apply that is not complete is
    /// retried. True when it was complete.
    pub fn report_applied(&mut self, report: Option<DatapathReport>) -> bool {
        let complete = report.as_ref().is_some_and(|r| r.failed.is_empty());
        if let Some(report) = report {
            self.link.applied.send_replace(Some(report));
        }
        self.incomplete = !complete;
        self.applied_whole |= complete;
        complete
    }

    /// Whether a desired state has been applied whole (the agent is ready
    /// then, not before: the DaemonSet's startup probe).
    pub fn applied_whole(&self) -> bool {
        self.applied_whole
    }

    /// The egress IPs present on the node's interfaces: a claim is written
    /// away and its lock released only once its address is gone from here.
    pub fn report_held(&self, held: BTreeSet<Ipv4Addr>) {
        let _ = self.link.held.send(held);
    }

    /// Publishes the node's egress subnets again if `addresses` (the node's
    /// interface addresses now) change them.
    pub fn addresses_changed(&self, addresses: &[(String, Ipv4Net)], own: &BTreeSet<Ipv4Addr>) {
        let subnets = offered_subnets(&self.config, &self.settings.not_egress, addresses, own);
        self.link.subnets.send_if_modified(|cur| {
            if cur.as_ref() == Some(&subnets) {
                false
            } else {
                tracing::info!(?subnets, "egress subnets");
                *cur = Some(subnets);
                true
            }
        });
    }

    /// Asks the controller to stop: it decides whether the node's IPs are
    /// handed over or kept through a restart grace. [`Self::next`] ends
    /// once it has, or after the drain timeout and a margin.
    pub fn stop(&mut self) {
        tracing::info!("stopping: waiting for the Kubernetes controller");
        let _ = self.link.shutdown.send(true);
        let timeout = self.config.drain_timeout + STOP_MARGIN;
        self.stop_deadline
            .get_or_insert_with(|| Instant::now() + timeout);
    }
}

/// The subnets this node offers for egress IPs, from its interface
/// addresses (those `egress_interfaces` names, or by default every
/// interface but `not_egress`), minus addresses in the cluster and service
/// networks and the egress IPs the agent added itself (`own`: those are not
/// node addresses, and publishing them would make their EgressIPs invalid).
pub fn offered_subnets(
    config: &KubernetesConfig,
    not_egress: &[String],
    addresses: &[(String, Ipv4Net)],
    own: &BTreeSet<Ipv4Addr>,
) -> Vec<EgressSubnet> {
    let cluster: Vec<Ipv4Net> = config
        .cluster_cidrs
        .iter()
        .chain(&config.service_cidrs)
        .copied()
        .collect();
    let candidates: Vec<(String, Ipv4Net)> = addresses
        .iter()
        .filter(|(_, a)| !own.contains(&a.addr()))
        .filter(|(_, a)| !cluster.iter().any(|c| c.contains(&a.addr())))
        .filter(|(name, _)| {
            !config.egress_interfaces.is_empty() || !interface_matches(not_egress, name)
        })
        .cloned()
        .collect();
    crate::facts::egress_subnets(config, &candidates)
}

/// How long the Node-object lookup may take.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The Node object's first IPv4 `InternalIP`, else `ExternalIP`; why not
/// otherwise (no client, no answer within [`LOOKUP_TIMEOUT`], no such
/// address).
pub async fn node_object_address(node_name: &str) -> Result<Ipv4Addr, String> {
    use k8s_openapi::api::core::v1::Node;
    let lookup = async {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| format!("no Kubernetes client: {e}"))?;
        let node = kube::Api::<Node>::all(client)
            .get(node_name)
            .await
            .map_err(|e| format!("reading Node {node_name:?}: {e}"))?;
        let addresses = node.status.and_then(|s| s.addresses).unwrap_or_default();
        ["InternalIP", "ExternalIP"]
            .iter()
            .find_map(|kind| {
                addresses
                    .iter()
                    .filter(|a| a.type_ == *kind)
                    .find_map(|a| a.address.parse().ok())
            })
            .ok_or_else(|| format!("Node {node_name:?} has no IPv4 InternalIP or ExternalIP"))
    };
    tokio::time::timeout(LOOKUP_TIMEOUT, lookup)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {LOOKUP_TIMEOUT:?}")))
}

/// Waits for the controller's next fence or desired state; never once the
/// controller is gone (its last fence stands).
async fn from_controller(link: &mut AgentLink, fence: &mut ControllerFence) -> Update {
    let event = tokio::select! {
        biased;
        r = fence.changed(&mut link.fence) => r.map(|()| Update::Fence),
        r = link.desired.changed() => r.map(|()| Update::Desired),
    };
    match event {
        Ok(e) => e,
        // The controller dropped its end: it has stopped.
        Err(_) => std::future::pending().await,
    }
}

/// Waits for the controller task to end; never once it has.
async fn finished(controller: &mut Option<JoinHandle<Result<(), Error>>>) -> Result<(), String> {
    match controller {
        Some(task) => {
            let outcome = task.await;
            *controller = None;
            match outcome {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
        None => std::future::pending().await,
    }
}

/// The controller's fences as the agent may apply them: none before the
/// controller has sent its first (see [`AgentLink::fence`]).
///
/// The channel starts out `None`, which is not the controller's word: until
/// the session has synced and settled adoption it sends nothing, and the
/// stamp and lifetimes the previous agent left are the claims' true terms.
/// Applied, that initial `None` would mean "holds nothing" and cut them (a
/// successor stopped before adopting, or whose controller failed at start,
/// would stop its node's translation while the restart grace still runs).
///
/// Both ways of reading the channel go through here, since either marks a
/// send seen: waiting for the next fence ([`Self::changed`]) and taking the
/// latest ([`Self::latest`]).
#[derive(Debug, Default)]
pub struct ControllerFence {
    /// The controller has sent a fence (possibly `None`) at least once.
    heard: bool,
}

impl ControllerFence {
    /// Waits for the controller's next fence (then [`Self::latest`] has it);
    /// an error once the controller has dropped its end.
    pub async fn changed(
        &mut self,
        rx: &mut watch::Receiver<Option<Instant>>,
    ) -> Result<(), watch::error::RecvError> {
        rx.changed().await?;
        self.heard = true;
        Ok(())
    }

    /// The controller's latest fence once it has sent one (`Some(None)`:
    /// the node holds nothing); `None` while it has sent none, then the
    /// previous terms stand. Marks the value seen. Works after the
    /// controller has gone too: its last fence is still there to apply.
    pub fn latest(&mut self, rx: &mut watch::Receiver<Option<Instant>>) -> Option<Option<Instant>> {
        let value = rx.borrow_and_update();
        self.heard |= value.has_changed();
        self.heard.then_some(*value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_applied_before_the_controller_sends_a_fence() {
        let (tx, mut rx) = watch::channel(None);
        let mut fence = ControllerFence::default();
        // The channel's initial `None` is not "holds nothing".
        assert_eq!(fence.latest(&mut rx), None);
        assert_eq!(fence.latest(&mut rx), None);
        let at = Instant::now() + Duration::from_secs(30);
        tx.send(Some(at)).unwrap();
        assert_eq!(fence.latest(&mut rx), Some(Some(at)));
        // Once heard, the latest word stands, unchanged or not.
        assert_eq!(fence.latest(&mut rx), Some(Some(at)));
        tx.send(None).unwrap();
        assert_eq!(fence.latest(&mut rx), Some(None));
    }

    #[test]
    fn a_fence_sent_before_the_controller_ended_is_still_applied() {
        let (tx, mut rx) = watch::channel(None);
        let mut fence = ControllerFence::default();
        let at = Instant::now();
        tx.send(Some(at)).unwrap();
        drop(tx);
        assert_eq!(fence.latest(&mut rx), Some(Some(at)));
        // A controller that ended without a word leaves nothing to apply.
        let (tx, mut rx) = watch::channel::<Option<Instant>>(None);
        drop(tx);
        assert_eq!(ControllerFence::default().latest(&mut rx), None);
    }

    #[tokio::test]
    async fn a_fence_waited_for_is_heard() {
        let (tx, mut rx) = watch::channel(None);
        let mut fence = ControllerFence::default();
        let at = Instant::now();
        tx.send(Some(at)).unwrap();
        // Waiting marks the send seen: it must count as heard all the same.
        fence.changed(&mut rx).await.unwrap();
        assert_eq!(fence.latest(&mut rx), Some(Some(at)));
        drop(tx);
        assert!(fence.changed(&mut rx).await.is_err());
        assert_eq!(
            fence.latest(&mut rx),
            Some(Some(at)),
            "the last word stands"
        );
    }

    #[test]
    fn a_none_the_controller_sends_is_heard() {
        // `send` notifies even when the value is equal: the session's
        // first word may well be "nothing held".
        let (tx, mut rx) = watch::channel(None);
        let mut fence = ControllerFence::default();
        tx.send_replace(None);
        assert_eq!(fence.latest(&mut rx), Some(None));
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn addresses() -> Vec<(String, Ipv4Net)> {
        [
            ("eth0", "172.18.0.11/16"),
            // An egress IP the agent added: not a node address.
            ("eth0", "172.18.0.100/16"),
            ("eth1", "192.168.50.11/24"),
            // An address in the cluster network (an OVS gateway, say).
            ("ovn-k8s-mp0", "10.244.1.2/24"),
            ("veth1", "192.168.77.1/24"),
            ("egress-vxlan", "192.168.99.1/24"),
        ]
        .iter()
        .map(|(n, a)| ((*n).to_string(), net(a)))
        .collect()
    }

    #[test]
    fn offered_subnets_leave_out_own_egress_ips_cluster_networks_and_pod_and_tunnel_interfaces() {
        let config = KubernetesConfig {
            cluster_cidrs: vec![net("10.244.0.0/16")],
            ..Default::default()
        };
        let not_egress = vec!["veth*".to_string(), "egress-vxlan".to_string()];
        let own = BTreeSet::from([Ipv4Addr::new(172, 18, 0, 100)]);
        let offered = offered_subnets(&config, &not_egress, &addresses(), &own);
        assert_eq!(
            offered
                .iter()
                .map(|s| (s.interface.as_str(), s.address))
                .collect::<Vec<_>>(),
            [
                ("eth0", net("172.18.0.11/16")),
                ("eth1", net("192.168.50.11/24"))
            ]
        );
        // Named interfaces are offered whatever the defaults leave out.
        let named = KubernetesConfig {
            egress_interfaces: vec!["veth*".into()],
            ..config
        };
        let offered = offered_subnets(&named, &not_egress, &addresses(), &own);
        assert_eq!(
            offered
                .iter()
                .map(|s| s.interface.as_str())
                .collect::<Vec<_>>(),
            ["veth1"]
        );
    }
}
