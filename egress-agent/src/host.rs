//! What this node's own network stack says, beyond the desired state:
//! which host-side interface each local selected pod sits behind, which
//! interfaces are upstream devices, and every address the node holds.
//!
//! The datapath drops a selected pod's packet that arrives on any other
//! interface than the pod's own (`invalid_source`), so a pod whose
//! interface cannot be found is refused, never silently unselected: the
//! agent says why in its log and retries every reconcile tick.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use egress_netlink::{FdbEntry, Neighbour, Netlink, bridge_port};
use ipnet::Ipv4Net;

/// The facts the datapath image needs from this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// Local selected pod -> its host-side interface (those resolved).
    pub pod_interfaces: BTreeMap<Ipv4Addr, u32>,
    /// Upstream devices (e.g. OVS `tun0`): they carry many pods' packets.
    pub upstream: BTreeSet<u32>,
    /// Every address of every interface of this node but loopback's
    /// 127.0.0.0/8: pods' traffic to them is local, never translated.
    pub local_addrs: BTreeSet<Ipv4Addr>,
}

/// The interfaces the datapath is attached to, by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interfaces {
    /// Host-side pod interfaces: ifindex -> name.
    pub pods: BTreeMap<u32, String>,
    /// Upstream devices: ifindex -> name.
    pub upstream: BTreeMap<u32, String>,
}

impl Interfaces {
    fn name(&self, ifindex: u32) -> Option<&str> {
        self.pods
            .get(&ifindex)
            .or_else(|| self.upstream.get(&ifindex))
            .map(String::as_str)
    }
}

/// Where the route to a pod leads, as the kernel answers `ip route get`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Unreachable,
    Via(u32),
}

/// The pod's interface from the route to it: the route's device when it is
/// a pod interface or an upstream device (routed CNIs such as Calico and
/// Cilium give each pod a /32 via its host-side veth; openshift-sdn routes
/// pods through `tun0`). Otherwise the route's device may be a bridge
/// (bridge CNIs: flannel's cni0, the bridge plugin): then the pod's port on
/// it, from the neighbour table and the bridge's forwarding database, which
/// know the pod once it has sent its first frame (its ARP for the gateway).
pub fn interface_of(
    pod: Ipv4Addr,
    route: Route,
    interfaces: &Interfaces,
    neighbours: &[Neighbour],
    fdb: &[FdbEntry],
) -> Result<u32, String> {
    let Route::Via(oif) = route else {
        return Err("no route to it".into());
    };
    if interfaces.name(oif).is_some() {
        return Ok(oif);
    }
    match bridge_port(pod, oif, neighbours, fdb) {
        Some(port) if interfaces.pods.contains_key(&port) => Ok(port),
        Some(port) => Err(format!(
            "it sits behind port {port} of bridge {oif}, which is not a pod interface (node.pod_interfaces)"
        )),
        None => Err(format!(
            "the route to it leaves through ifindex {oif}, which is not a pod interface \
             (node.pod_interfaces) nor a bridge port where it has been seen yet"
        )),
    }
}

/// Finds the host-side interfaces of `pods`. Neighbours and the forwarding
/// database are read once, and only when some route does not end on a pod
/// interface.
pub async fn resolve_pods(
    netlink: &Netlink,
    pods: &BTreeSet<Ipv4Addr>,
    interfaces: &Interfaces,
) -> anyhow::Result<BTreeMap<Ipv4Addr, Result<u32, String>>> {
    let mut routes = BTreeMap::new();
    for pod in pods {
        let route = match netlink.route_oif(*pod).await? {
            Some(oif) => Route::Via(oif),
            None => Route::Unreachable,
        };
        routes.insert(*pod, route);
    }
    let bridged = routes
        .values()
        .any(|r| matches!(r, Route::Via(oif) if interfaces.name(*oif).is_none()));
    let (neighbours, fdb) = if bridged {
        (
            netlink.ipv4_neighbours().await?,
            netlink.bridge_fdb().await?,
        )
    } else {
        (Vec::new(), Vec::new())
    };
    Ok(routes
        .into_iter()
        .map(|(pod, route)| (pod, interface_of(pod, route, interfaces, &neighbours, &fdb)))
        .collect())
}

/// Every address of this node but loopback's.
pub async fn local_addresses(netlink: &Netlink) -> anyhow::Result<BTreeSet<Ipv4Addr>> {
    Ok(netlink
        .ipv4_addresses()
        .await?
        .into_iter()
        .map(|a| a.addr.addr())
        .filter(|a| !a.is_loopback())
        .collect())
}

/// The resolved pod interfaces, kept between reconciles, with what could
/// not be resolved and why (logged once per reason).
#[derive(Debug, Default)]
pub struct PodInterfaces {
    resolved: BTreeMap<Ipv4Addr, u32>,
    failed: BTreeMap<Ipv4Addr, String>,
}

impl PodInterfaces {
    pub fn resolved(&self) -> &BTreeMap<Ipv4Addr, u32> {
        &self.resolved
    }

    /// Forgets every answer: interfaces came or went.
    pub fn invalidate(&mut self) {
        self.resolved.clear();
    }

    /// Forgets the answers for the pods within `dst`, whose route changed.
    pub fn forget_within(&mut self, dst: &Ipv4Net) {
        self.resolved
            .retain(|pod, _| !dst.contains(pod) || dst.prefix_len() == 0);
    }

    /// Whether some wanted pod has no interface yet.
    pub fn has_unresolved(&self) -> bool {
        !self.failed.is_empty()
    }

    /// Resolves the `wanted` pods not resolved yet (all of them with
    /// `all`). Returns whether any pod's interface changed.
    pub async fn refresh(
        &mut self,
        netlink: &Netlink,
        wanted: &BTreeSet<Ipv4Addr>,
        interfaces: &Interfaces,
        all: bool,
    ) -> anyhow::Result<bool> {
        let before = self.resolved.clone();
        self.resolved.retain(|pod, _| wanted.contains(pod));
        self.failed.retain(|pod, _| wanted.contains(pod));
        let todo: BTreeSet<Ipv4Addr> = wanted
            .iter()
            .filter(|p| all || !self.resolved.contains_key(*p))
            .copied()
            .collect();
        if !todo.is_empty() {
            for (pod, outcome) in resolve_pods(netlink, &todo, interfaces).await? {
                self.record(pod, outcome, interfaces);
            }
        }
        Ok(self.resolved != before)
    }

    fn record(&mut self, pod: Ipv4Addr, outcome: Result<u32, String>, interfaces: &Interfaces) {
        match outcome {
            Ok(ifindex) => {
                if self.failed.remove(&pod).is_some() {
                    tracing::info!(%pod, ifindex, interface = interfaces.name(ifindex), "pod interface resolved; its traffic is selected again");
                }
                self.resolved.insert(pod, ifindex);
            }
            Err(why) => {
                self.resolved.remove(&pod);
                if self.failed.get(&pod) != Some(&why) {
                    tracing::warn!(%pod, reason = %why, "cannot find the selected pod's host-side interface: its traffic is dropped (invalid_source) until it is found");
                    self.failed.insert(pod, why);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interfaces() -> Interfaces {
        Interfaces {
            pods: BTreeMap::from([(5, "veth1".into()), (6, "veth2".into())]),
            upstream: BTreeMap::from([(9, "tun0".into())]),
        }
    }

    const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);

    #[test]
    fn a_route_to_a_pod_or_upstream_interface_names_it() {
        let i = interfaces();
        assert_eq!(interface_of(POD, Route::Via(5), &i, &[], &[]), Ok(5));
        assert_eq!(interface_of(POD, Route::Via(9), &i, &[], &[]), Ok(9));
    }

    #[test]
    fn anything_else_is_unresolved_and_says_why() {
        let i = interfaces();
        let why = interface_of(POD, Route::Via(2), &i, &[], &[]).unwrap_err();
        assert!(why.contains("ifindex 2"), "{why}");
        assert!(interface_of(POD, Route::Unreachable, &i, &[], &[]).is_err());
    }

    #[test]
    fn behind_a_bridge_the_pod_port_is_found_through_the_fdb() {
        let i = interfaces();
        let mac = [2, 0, 0, 0, 0, 0x11];
        let neighbours = [Neighbour {
            ifindex: 3,
            ip: POD,
            mac,
        }];
        let fdb = [FdbEntry {
            port: 6,
            bridge: Some(3),
            mac,
        }];
        assert_eq!(
            interface_of(POD, Route::Via(3), &i, &neighbours, &fdb),
            Ok(6)
        );
        // A port that is not a pod interface is not the pod's.
        let fdb = [FdbEntry {
            port: 7,
            bridge: Some(3),
            mac,
        }];
        assert!(interface_of(POD, Route::Via(3), &i, &neighbours, &fdb).is_err());
    }
}
