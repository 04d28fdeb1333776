//! The projection from cluster objects to one node's desired datapath state.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use egress_model::{AddressClaim, NodeState, PolicyId, PolicyState};
use ipnet::Ipv4Net;

use crate::{
    crd::EgressIP,
    facts::{NodeInfo, PodInfo},
    plan::{self, IpVerdict, PlanConfig},
};

/// What one node's agent knows about the cluster.
pub struct ProjectInput<'a> {
    pub node_name: &'a str,
    /// Overrides the node address found in the Node object.
    pub node_addr: Option<Ipv4Addr>,
    pub eips: &'a [EgressIP],
    pub nodes: &'a [NodeInfo],
    /// Namespace name -> labels.
    pub namespaces: &'a BTreeMap<String, BTreeMap<String, String>>,
    pub pods: &'a [PodInfo],
    /// IP -> nodes whose claim on it is live (judged with this node's clock).
    pub claims: &'a BTreeMap<Ipv4Addr, BTreeSet<String>>,
    /// False once this node has failed to renew its own claim for longer than
    /// the claim lifetime: it must then hold nothing.
    pub may_hold: bool,
    /// Cluster and service networks.
    pub global_excluded: &'a BTreeSet<Ipv4Net>,
    pub config: &'a PlanConfig,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Projection {
    pub state: NodeState,
    /// The addresses this node must hold, with the interface requested by
    /// the resource (`None`: the one whose subnet contains the IP).
    pub claims: Vec<AddressClaim>,
}

/// Computes this node's [`NodeState`].
///
/// Policies are the valid IPs that the assigner gave a policy id in status.
/// A policy's egress node is the node status names, once that node claims
/// the IP (so traffic is never steered to a node that does not hold it yet);
/// for this node itself, as soon as no other node still claims it: that is
/// the fencing rule, and the caller publishes the claim before acting on it.
pub fn project(input: &ProjectInput<'_>) -> Projection {
    let by_name: BTreeMap<&str, &NodeInfo> =
        input.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let me = by_name.get(input.node_name);
    let node_addr = input.node_addr.or_else(|| me.and_then(|n| n.address));
    let mut state = NodeState {
        node_addr,
        nodes: input.nodes.iter().filter_map(|n| n.address).collect(),
        global_excluded: input.global_excluded.clone(),
        ..Default::default()
    };
    if let Some(a) = node_addr {
        state.nodes.insert(a);
    }
    let checked = plan::check_all(input.eips, input.nodes, input.config);
    let by_eip_name: BTreeMap<&str, &EgressIP> = input
        .eips
        .iter()
        .filter_map(|e| Some((e.metadata.name.as_deref()?, e)))
        .collect();

    let mut claims = Vec::new();
    // Resource index -> its policies, in spec order.
    let mut resource_policies: BTreeMap<usize, Vec<PolicyId>> = BTreeMap::new();
    for (ci, c) in checked.iter().enumerate() {
        let Some(status) = by_eip_name
            .get(c.name.as_str())
            .and_then(|e| e.status.as_ref())
        else {
            continue;
        };
        for entry in &c.ips {
            let IpVerdict::Valid(ip) = entry.verdict else {
                continue;
            };
            let Some(s) = status.ips.iter().find(|s| s.egress_ip == entry.raw) else {
                continue;
            };
            let Some(id) = s
                .policy_id
                .filter(|id| (1..=egress_model::MAX_POLICY_ID).contains(id))
            else {
                continue;
            };
            if state.policies.contains_key(&id) {
                // Hand-edited status with a duplicate id: the first resource
                // in precedence order keeps it.
                continue;
            }
            let live = input.claims.get(&ip);
            let egress_node = match s.node.as_deref() {
                Some(n) if n == input.node_name => {
                    let others = live.is_some_and(|l| l.iter().any(|h| h != input.node_name));
                    (input.may_hold && !others).then_some(node_addr).flatten()
                }
                Some(n) if live.is_some_and(|l| l.contains(n)) => {
                    by_name.get(n).and_then(|info| info.address)
                }
                _ => None,
            };
            if egress_node.is_some() && egress_node == node_addr {
                claims.push(AddressClaim {
                    ip,
                    interface: c.interface.clone(),
                });
            }
            state.policies.insert(
                id,
                PolicyState {
                    name: format!("{}/{ip}", c.name),
                    egress_ip: ip,
                    egress_node,
                    failure_policy: c.failure_policy,
                    excluded: c.excluded.clone(),
                },
            );
            resource_policies.entry(ci).or_default().push(id);
        }
    }

    let local_pods: Vec<PodInfo> = input
        .pods
        .iter()
        .filter(|p| p.node.as_deref() == Some(input.node_name))
        .cloned()
        .collect();
    let selection = plan::select_pods(&checked, input.namespaces, &local_pods);
    for (pod_ip, ci) in selection.winner {
        let Some(ids) = resource_policies.get(&ci) else {
            // The winning resource has no usable IP yet: its pods stay
            // unmapped rather than falling through to a younger resource, so
            // precedence never depends on timing.
            continue;
        };
        if let Some(id) = pick_policy(pod_ip, ids, &state.policies) {
            state.pods.insert(pod_ip, id);
        }
    }
    claims.sort();
    Projection { state, claims }
}

/// A pod of a resource with several IPs uses one of those held by a live
/// node (all of them while none is), chosen by its address: deterministic,
/// spread across the IPs, and only pods of a failed IP move.
fn pick_policy(
    pod_ip: Ipv4Addr,
    ids: &[PolicyId],
    policies: &BTreeMap<PolicyId, PolicyState>,
) -> Option<PolicyId> {
    let held: Vec<PolicyId> = ids
        .iter()
        .copied()
        .filter(|id| policies[id].egress_node.is_some())
        .collect();
    let pool = if held.is_empty() { ids } else { &held };
    if pool.is_empty() {
        return None;
    }
    Some(pool[(u32::from(pod_ip) as usize) % pool.len()])
}
