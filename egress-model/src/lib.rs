//! The desired datapath state of one node.
//!
//! Both sources of truth, the static configuration file and the Kubernetes
//! API, are turned into a [`NodeState`] by pure functions. The agent does
//! not program a `NodeState` directly: it renders it, with this node's own
//! facts, into the exact contents of the control maps (egress-agent's
//! `image::DatapathImage`), and its reconciler (`maps::reconcile`) writes
//! only the difference between that image and what the maps hold, so
//! unrelated changes never disturb established connections.
//!
//! [`NodeState::diff`] compares two states entry by entry: what tests of
//! the Kubernetes projection use to show that a change moves only what it
//! should. The agent does not use it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Identifies a policy in the datapath. It indexes the policy and counter
/// arrays and is the VNI that steers a policy's traffic to its egress node,
/// so every node of a cluster must agree on it.
pub type PolicyId = u32;

/// The largest id a policy can have: ids are 24-bit VNIs.
pub const MAX_POLICY_ID: PolicyId = (1 << 24) - 1;

/// The reserved policy slot for selected pods whose EgressIP has no usable
/// IP yet (no status, no eligible node, invalid or conflicting IPs) and
/// whose failure policy is FailClosed: active, with no egress IP and no
/// egress node, so the datapath drops their external traffic (counted as
/// `no_egress_node` of policy 0) and lets excluded destinations through.
/// Assigned ids start at 1, so this slot never collides with a real policy,
/// and it is never a tunnel VNI.
pub const NO_USABLE_IP: PolicyId = 0;

/// What to do with a selected pod's traffic while no live node holds the egress IP.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// Drop it (counted): the pod's own or its node's address never leaks.
    #[default]
    FailClosed,
    /// Let it leave with the node's address.
    FailOpen,
}

/// One egress policy as the datapath sees it: one egress IP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyState {
    /// Human name for logs and the CLI (`<EgressIP name>/<ip>` in Kubernetes mode).
    pub name: String,
    pub egress_ip: Ipv4Addr,
    /// Node address of the node holding `egress_ip`; `None` while no live node does.
    pub egress_node: Option<Ipv4Addr>,
    pub failure_policy: FailurePolicy,
    /// Destinations this policy never translates, beyond the global exclusions.
    pub excluded: BTreeSet<Ipv4Net>,
}

impl PolicyState {
    /// The [`NO_USABLE_IP`] slot.
    pub fn no_usable_ip() -> Self {
        Self {
            name: "no usable egress IP".into(),
            egress_ip: Ipv4Addr::UNSPECIFIED,
            egress_node: None,
            failure_policy: FailurePolicy::FailClosed,
            excluded: BTreeSet::new(),
        }
    }
}

/// An address this node must hold on one of its interfaces.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AddressClaim {
    pub ip: Ipv4Addr,
    /// The interface to put it on; `None` means the one whose subnet contains it.
    pub interface: Option<String>,
}

/// A selected pod of another node, as the egress node must know it to
/// accept the pod's steered traffic only from the node that hosts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RemotePod {
    pub policy: PolicyId,
    /// Address of the node the pod runs on.
    pub node: Ipv4Addr,
}

/// Everything one node's datapath should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// This node's address on the node network.
    pub node_addr: Option<Ipv4Addr>,
    /// Every node allowed to send us tunnel traffic (including this one).
    pub nodes: BTreeSet<Ipv4Addr>,
    pub policies: BTreeMap<PolicyId, PolicyState>,
    /// Policies that are several egress IPs of one EgressIP: policy -> the
    /// lowest id of its resource. A policy absent here is a group of its
    /// own. Flows stay on the IP they started with within a group.
    #[serde(default)]
    pub groups: BTreeMap<PolicyId, PolicyId>,
    /// Local pod IP -> policy.
    pub pods: BTreeMap<Ipv4Addr, PolicyId>,
    /// Selected pods of the other nodes, whose steered traffic this node
    /// accepts when it holds their egress IP.
    #[serde(default)]
    pub remote_pods: BTreeMap<Ipv4Addr, RemotePod>,
    /// Pod CIDR -> the address of the node it belongs to: what a policy
    /// that selects by mark or extra VNI (chosen on the pod's own node)
    /// accepts from each node.
    #[serde(default)]
    pub pod_cidrs: BTreeMap<Ipv4Net, Ipv4Addr>,
    /// `skb->mark` -> policy.
    pub marks: BTreeMap<u32, PolicyId>,
    /// Extra tunnel VNIs -> policy (each policy's own id always steers to it).
    pub vnis: BTreeMap<u32, PolicyId>,
    /// Destinations no policy translates (cluster and service networks).
    pub global_excluded: BTreeSet<Ipv4Net>,
}

impl NodeState {
    /// Egress IPs this node holds: the claims the address reconciler applies.
    pub fn claims(&self) -> BTreeSet<Ipv4Addr> {
        let Some(me) = self.node_addr else {
            return BTreeSet::new();
        };
        self.policies
            .values()
            .filter(|p| p.egress_node == Some(me))
            .map(|p| p.egress_ip)
            .collect()
    }

    /// Whether `policy` is translated on this node.
    pub fn is_local(&self, policy: &PolicyState) -> bool {
        self.node_addr.is_some() && policy.egress_node == self.node_addr
    }

    /// The group (EgressIP) policy `id` belongs to: its lowest policy id.
    pub fn group_of(&self, id: PolicyId) -> PolicyId {
        self.groups.get(&id).copied().unwrap_or(id)
    }

    /// Whether policy `id` selects pods on their own node (by mark or by an
    /// extra VNI), so that the egress node cannot list them.
    pub fn selected_by_node(&self, id: PolicyId) -> bool {
        self.marks
            .values()
            .chain(self.vnis.values())
            .any(|p| *p == id)
    }

    /// The changes that turn `self` (what is programmed) into `desired`.
    pub fn diff(&self, desired: &Self) -> StateDiff {
        StateDiff {
            node_addr_changed: self.node_addr != desired.node_addr,
            nodes: diff_sets(&self.nodes, &desired.nodes),
            policies: diff_maps(&self.policies, &desired.policies),
            groups: diff_maps(&self.groups, &desired.groups),
            pods: diff_maps(&self.pods, &desired.pods),
            remote_pods: diff_maps(&self.remote_pods, &desired.remote_pods),
            pod_cidrs: diff_maps(&self.pod_cidrs, &desired.pod_cidrs),
            marks: diff_maps(&self.marks, &desired.marks),
            vnis: diff_maps(&self.vnis, &desired.vnis),
            global_excluded: diff_sets(&self.global_excluded, &desired.global_excluded),
        }
    }
}

/// Entries to put (added or changed) and to remove.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapDiff<K, V> {
    pub upsert: Vec<(K, V)>,
    pub remove: Vec<K>,
}

impl<K, V> MapDiff<K, V> {
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.remove.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetDiff<T> {
    pub add: Vec<T>,
    pub remove: Vec<T>,
}

impl<T> SetDiff<T> {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
}

/// What changed between two [`NodeState`]s, field by field (see
/// [`NodeState::diff`]). The agent's reconciler works on map images, not on
/// this.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateDiff {
    pub node_addr_changed: bool,
    pub nodes: SetDiff<Ipv4Addr>,
    pub policies: MapDiff<PolicyId, PolicyState>,
    pub groups: MapDiff<PolicyId, PolicyId>,
    pub pods: MapDiff<Ipv4Addr, PolicyId>,
    pub remote_pods: MapDiff<Ipv4Addr, RemotePod>,
    pub pod_cidrs: MapDiff<Ipv4Net, Ipv4Addr>,
    pub marks: MapDiff<u32, PolicyId>,
    pub vnis: MapDiff<u32, PolicyId>,
    pub global_excluded: SetDiff<Ipv4Net>,
}

impl StateDiff {
    pub fn is_empty(&self) -> bool {
        !self.node_addr_changed
            && self.nodes.is_empty()
            && self.policies.is_empty()
            && self.groups.is_empty()
            && self.pods.is_empty()
            && self.remote_pods.is_empty()
            && self.pod_cidrs.is_empty()
            && self.marks.is_empty()
            && self.vnis.is_empty()
            && self.global_excluded.is_empty()
    }
}

fn diff_maps<K: Ord + Clone, V: PartialEq + Clone>(
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> MapDiff<K, V> {
    MapDiff {
        upsert: desired
            .iter()
            .filter(|(k, v)| current.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        remove: current
            .keys()
            .filter(|k| !desired.contains_key(*k))
            .cloned()
            .collect(),
    }
}

fn diff_sets<T: Ord + Clone>(current: &BTreeSet<T>, desired: &BTreeSet<T>) -> SetDiff<T> {
    SetDiff {
        add: desired.difference(current).cloned().collect(),
        remove: current.difference(desired).cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(ip: [u8; 4], node: Option<[u8; 4]>) -> PolicyState {
        PolicyState {
            name: "p".into(),
            egress_ip: ip.into(),
            egress_node: node.map(Into::into),
            failure_policy: FailurePolicy::FailClosed,
            excluded: BTreeSet::new(),
        }
    }

    fn state() -> NodeState {
        let mut s = NodeState {
            node_addr: Some([172, 18, 0, 11].into()),
            ..Default::default()
        };
        s.nodes.insert([172, 18, 0, 11].into());
        s.nodes.insert([172, 18, 0, 12].into());
        s.policies
            .insert(1, policy([172, 18, 0, 100], Some([172, 18, 0, 11])));
        s.policies
            .insert(2, policy([172, 18, 0, 101], Some([172, 18, 0, 12])));
        s.pods.insert([10, 244, 1, 2].into(), 1);
        s
    }

    #[test]
    fn identical_states_have_an_empty_diff() {
        assert!(state().diff(&state()).is_empty());
    }

    #[test]
    fn diff_lists_only_what_changed() {
        let current = state();
        let mut desired = state();
        desired.pods.insert([10, 244, 1, 3].into(), 2);
        desired.policies.get_mut(&2).unwrap().egress_node = None;
        desired.nodes.remove(&Ipv4Addr::new(172, 18, 0, 12));
        let d = current.diff(&desired);
        assert_eq!(d.pods.upsert, vec![(Ipv4Addr::new(10, 244, 1, 3), 2)]);
        assert!(d.pods.remove.is_empty());
        assert_eq!(d.policies.upsert.len(), 1);
        assert_eq!(d.policies.upsert[0].0, 2);
        assert_eq!(d.nodes.remove, vec![Ipv4Addr::new(172, 18, 0, 12)]);
        assert!(d.nodes.add.is_empty());
        assert!(!d.node_addr_changed);
    }

    #[test]
    fn groups_default_to_the_policy_itself_and_marks_select_on_the_node() {
        let mut s = state();
        assert_eq!(s.group_of(2), 2);
        s.groups.insert(2, 1);
        assert_eq!(s.group_of(2), 1);
        assert!(!s.selected_by_node(1));
        s.marks.insert(0x2ec40e, 1);
        assert!(s.selected_by_node(1));
        s.vnis.insert(5000, 2);
        assert!(s.selected_by_node(2));
    }

    #[test]
    fn claims_are_the_egress_ips_held_here() {
        assert_eq!(
            state().claims(),
            BTreeSet::from([Ipv4Addr::new(172, 18, 0, 100)])
        );
        let s = NodeState {
            node_addr: None,
            ..state()
        };
        assert!(s.claims().is_empty());
    }
}
