//! The reconcile: the desired state, with what this node's stack says (pod
//! interfaces, local addresses), turned into a [`DatapathImage`] and
//! written to the maps by difference ([`Maps::apply`]); the node's
//! addresses claimed first ([`Agent::apply`]). Also reconciled again when
//! the stack changes under an unchanged desired state: a pod's interface
//! found or moved, a route changed, a node address came or went.

use std::{collections::BTreeSet, net::Ipv4Addr};

use egress_config::interface_matches;
use egress_model::{AddressClaim, NodeState};
use egress_netlink::{AddressEvent, RouteEvent};

use crate::{
    agent::{Agent, IP_TCP_HEADERS},
    host::{self, HostFacts, Interfaces},
    image::DatapathImage,
    maps::ApplyOutcome,
};

impl Agent {
    /// Makes the maps equal to the image of `desired` and of what this
    /// node's stack says (pod interfaces, local addresses).
    pub async fn reconcile(&mut self, desired: &NodeState) -> anyhow::Result<ApplyOutcome> {
        let host = self.host_facts(desired, false).await?;
        // Map dumps and writes are blocking system calls, thousands of them
        // at scale: off the runtime's worker, so the controller's renewals
        // keep running on the others meanwhile.
        let (maps, env) = (&mut self.maps, &self.env);
        let outcome = tokio::task::block_in_place(|| {
            let current = maps.read_image()?;
            let image = DatapathImage::from_state(desired, env, &host);
            maps.apply(&current, &image)
        })?;
        if !outcome.report.is_empty() {
            tracing::info!(
                written = outcome.report.written,
                removed = outcome.report.removed,
                "datapath maps reconciled"
            );
        }
        for (id, error) in &outcome.failed {
            tracing::error!(policy = id, %error, "policy not programmed (the others are)");
        }
        self.desired = Some(desired.clone());
        Ok(outcome)
    }

    /// The interfaces the datapath is attached to, pod-side and upstream.
    pub fn interfaces(&self) -> Interfaces {
        let upstream_patterns = &self.node.upstream_interfaces;
        let mut out = Interfaces::default();
        for (name, index) in &self.attached {
            if interface_matches(upstream_patterns, name) {
                out.upstream.insert(*index, name.clone());
            } else {
                out.pods.insert(*index, name.clone());
            }
        }
        out
    }

    /// Resolves the interfaces of `desired`'s local pods (all of them with
    /// `all`, else those not known yet).
    pub async fn host_facts(
        &mut self,
        desired: &NodeState,
        all: bool,
    ) -> anyhow::Result<HostFacts> {
        let interfaces = self.interfaces();
        let wanted: BTreeSet<Ipv4Addr> = desired.pods.keys().copied().collect();
        self.pod_interfaces
            .refresh(&self.netlink, &wanted, &interfaces, all)
            .await?;
        Ok(HostFacts {
            pod_interfaces: self.pod_interfaces.resolved().clone(),
            upstream: interfaces.upstream.keys().copied().collect(),
            local_addrs: self.local_addrs.clone(),
        })
    }

    /// Follows the node's stack between desired-state changes: looks up the
    /// pods whose interface is unknown (every pod after interfaces came or
    /// went, those within a changed route), and reconciles again when one
    /// changed.
    pub async fn follow_host(&mut self) {
        let Some(desired) = self.desired.clone() else {
            return;
        };
        let before = self.pod_interfaces.resolved().clone();
        let outcome = async {
            let host = self.host_facts(&desired, false).await?;
            if host.pod_interfaces != before {
                self.reconcile(&desired).await?;
            }
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = outcome {
            tracing::error!(error = %format!("{e:#}"), "following the pods' interfaces");
        }
    }

    /// A route to a resolved pod changed: look it up again.
    pub fn on_route_event(&mut self, event: &RouteEvent) {
        match event {
            RouteEvent::Changed { dst } => self.pod_interfaces.forget_within(dst),
            RouteEvent::Overrun => self.pod_interfaces.invalidate(),
        }
    }

    /// Keeps the node's addresses (global exclusions) current.
    pub async fn on_address_event(&mut self, event: &AddressEvent) {
        let mut addrs = self.local_addrs.clone();
        match event {
            AddressEvent::Added { addr, .. } if !addr.addr().is_loopback() => {
                addrs.insert(addr.addr());
            }
            AddressEvent::Removed { addr, .. } => {
                addrs.remove(&addr.addr());
            }
            AddressEvent::Added { .. } => {}
            AddressEvent::Overrun => match host::local_addresses(&self.netlink).await {
                Ok(now) => addrs = now,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "listing the node's addresses");
                    return;
                }
            },
        }
        if addrs == self.local_addrs {
            return;
        }
        self.local_addrs = addrs;
        if let Some(desired) = self.desired.clone()
            && let Err(e) = self.reconcile(&desired).await
        {
            tracing::error!(error = %format!("{e:#}"), "excluding the node's addresses");
        }
    }

    /// Makes the datapath and the node's addresses match `desired`.
    /// Addresses first: a policy becomes local only once its IP is here.
    pub async fn apply(
        &mut self,
        desired: &NodeState,
        claims: &[AddressClaim],
    ) -> anyhow::Result<ApplyOutcome> {
        self.claim(claims).await?;
        self.reconcile(desired).await
    }

    /// Writes only this node's own settings (the `config` entry) and the
    /// interfaces of the pods already programmed (a previous agent's
    /// entries may predate the interface check, or the interfaces may have
    /// been recreated meanwhile), leaving policies, pods and flows as they
    /// are.
    pub async fn reconcile_settings(&mut self) -> anyhow::Result<()> {
        let current = self.maps.read_image()?;
        let pinned = NodeState {
            node_addr: self.node.address,
            pods: current
                .pods
                .iter()
                .map(|(ip, p)| (Ipv4Addr::from(*ip), p.policy_id))
                .collect(),
            ..Default::default()
        };
        let host = self.host_facts(&pinned, true).await?;
        let fresh = DatapathImage::from_state(&pinned, &self.env, &host);
        let desired = DatapathImage {
            config: fresh.config,
            pods: fresh.pods,
            upstream: fresh.upstream,
            ..current.clone()
        };
        self.maps.apply(&current, &desired)?;
        Ok(())
    }

    /// Says clearly when the tunnel cannot carry what pods send.
    pub async fn check_mtu(&self, desired: &NodeState) {
        let steers = desired
            .policies
            .values()
            .any(|p| !desired.is_local(p) && p.egress_node.is_some());
        if !steers {
            return;
        }
        let tunnel_mtu = u32::from(self.env.tunnel_mss) + IP_TCP_HEADERS;
        let Ok(links) = self.netlink.links().await else {
            return;
        };
        for link in links.iter().filter(|l| self.attached.contains_key(&l.name)) {
            if link.mtu > tunnel_mtu {
                tracing::warn!(
                    interface = %link.name,
                    mtu = link.mtu,
                    tunnel_mtu,
                    "pod MTU exceeds what the VXLAN tunnel to the egress node carries (uplink MTU - 50): \
                     TCP is made to fit by MSS clamping ({}), but UDP/ICMP packets larger than {tunnel_mtu} \
                     bytes are fragmented by the tunnel; lower the pod MTU to {tunnel_mtu} to avoid that",
                    self.env.tunnel_mss
                );
            }
        }
    }
}
