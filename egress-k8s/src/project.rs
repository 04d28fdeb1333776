//! The projection from cluster objects to one node's desired datapath state.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use egress_model::{
    AddressClaim, FailurePolicy, NO_USABLE_IP, NodeState, PolicyId, PolicyState, RemotePod,
};
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
    /// Every pod of this node with an IPv4 address, selected or not: the
    /// sources a held new pod interface lets out.
    pub local_pods: BTreeSet<Ipv4Addr>,
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

    // The IPs of one resource are one group: a flow keeps the IP it started
    // on while the pod's choice moves among them.
    for ids in resource_policies.values() {
        if let Some(first) = ids.iter().min() {
            for id in ids.iter().filter(|id| *id != first) {
                state.groups.insert(*id, *first);
            }
        }
    }

    // Every node's selected pods: this node's are steered or translated
    // here, the others' are accepted through the tunnel from their node only.
    let node_of: BTreeMap<Ipv4Addr, &str> = input
        .pods
        .iter()
        .filter_map(|p| Some((p.ip, p.node.as_deref()?)))
        .collect();
    let selection = plan::select_pods(&checked, input.namespaces, input.pods);
    for (pod_ip, ci) in selection.winner {
        let here = node_of.get(&pod_ip) == Some(&input.node_name);
        let Some(ids) = resource_policies.get(&ci) else {
            // The winning resource has no usable IP yet (no status, no
            // eligible node, invalid or conflicting IPs): its pods never
            // fall through to a younger resource, so precedence does not
            // depend on timing, and its failure policy applies to them.
            // FailClosed maps them to the reserved slot, which drops their
            // external traffic; FailOpen leaves them unmapped: they leave
            // with the node's address.
            if here && checked[ci].failure_policy == FailurePolicy::FailClosed {
                state
                    .policies
                    .entry(NO_USABLE_IP)
                    .or_insert_with(PolicyState::no_usable_ip);
                state.pods.insert(pod_ip, NO_USABLE_IP);
            }
            continue;
        };
        let Some(id) = pick_policy(pod_ip, ids, &state.policies) else {
            continue;
        };
        match node_of.get(&pod_ip) {
            _ if here => {
                state.pods.insert(pod_ip, id);
            }
            Some(n) => {
                // A node without an address cannot send tunnel traffic.
                if let Some(node) = by_name.get(n).and_then(|info| info.address) {
                    state
                        .remote_pods
                        .insert(pod_ip, RemotePod { policy: id, node });
                }
            }
            None => {}
        }
    }
    claims.sort();
    Projection {
        state,
        claims,
        local_pods: node_of
            .iter()
            .filter(|(_, node)| **node == input.node_name)
            .map(|(ip, _)| *ip)
            .collect(),
    }
}

/// A pod of a resource with several IPs uses one of those held by a live
/// node (any of them while none is), chosen by rendezvous (highest random
/// weight) hashing of the pod's address with each egress IP: deterministic
/// on every node, spread evenly, and when one IP lapses only the pods that
/// used it move (each pod's ranking of the other IPs does not change).
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
    pool.iter().copied().max_by_key(|id| {
        (
            rendezvous_weight(pod_ip, policies[id].egress_ip),
            Reverse(*id),
        )
    })
}

/// The weight of `egress_ip` for `pod_ip`: a fixed 64-bit mix (SplitMix64's
/// finalizer) of both addresses, so that every node and every version of
/// the agent ranks the IPs the same way.
fn rendezvous_weight(pod_ip: Ipv4Addr, egress_ip: Ipv4Addr) -> u64 {
    let mut z = (u64::from(u32::from(pod_ip)) << 32 | u64::from(u32::from(egress_ip)))
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::{DEFAULT_ASSIGNABLE_LABEL as EA, eip_fixtures::eip, fixtures};
    use serde_json::json;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn nodes() -> Vec<NodeInfo> {
        [
            fixtures::node(
                "node1",
                "172.18.0.11",
                &[(EA, "")],
                &[("eth0", "172.18.0.11/16")],
            ),
            fixtures::node(
                "node2",
                "172.18.0.12",
                &[(EA, "")],
                &[("eth0", "172.18.0.12/16")],
            ),
            fixtures::node("node3", "172.18.0.13", &[], &[]),
        ]
        .iter()
        .map(|n| NodeInfo::from_node(n).unwrap())
        .collect()
    }

    /// `team-a` selects namespace `shop`'s `app=web` pods through two IPs,
    /// assigned by the assigner to node1 (.100, id 1) and node2 (.101, id 2).
    fn team_a(status_nodes: [Option<&str>; 2]) -> EgressIP {
        let mut e = eip(
            "team-a",
            "2026-01-01T00:00:00Z",
            json!({"egressIPs": ["172.18.0.100", "172.18.0.101"],
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "shop"}},
                "podSelector": {"matchLabels": {"app": "web"}},
                "excludedCIDRs": ["192.0.2.0/24"],
                "failurePolicy": "FailOpen",
                "interface": "eth0"}),
        );
        let ips: Vec<serde_json::Value> = ["172.18.0.100", "172.18.0.101"]
            .iter()
            .zip(status_nodes)
            .enumerate()
            .map(|(i, (ip, n))| json!({"egressIP": ip, "policyId": i + 1, "node": n, "conditions": []}))
            .collect();
        e.status = Some(serde_json::from_value(json!({"items": [], "ips": ips})).unwrap());
        e
    }

    fn namespaces(shop_labels: &[(&str, &str)]) -> BTreeMap<String, BTreeMap<String, String>> {
        let mut l: BTreeMap<String, String> = shop_labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        l.insert("kubernetes.io/metadata.name".into(), "shop".into());
        BTreeMap::from([("shop".to_string(), l)])
    }

    fn pods() -> Vec<PodInfo> {
        [
            fixtures::pod("shop", "web-1", "node1", "10.244.1.4", &[("app", "web")]),
            fixtures::pod("shop", "web-2", "node1", "10.244.1.5", &[("app", "web")]),
            fixtures::pod("shop", "db-0", "node1", "10.244.1.6", &[("app", "db")]),
            fixtures::pod("shop", "web-3", "node2", "10.244.2.4", &[("app", "web")]),
        ]
        .iter()
        .filter_map(PodInfo::from_pod)
        .collect()
    }

    fn claims(pairs: &[(&str, &str)]) -> BTreeMap<Ipv4Addr, BTreeSet<String>> {
        let mut m: BTreeMap<Ipv4Addr, BTreeSet<String>> = BTreeMap::new();
        for (i, n) in pairs {
            m.entry(ip(i)).or_default().insert(n.to_string());
        }
        m
    }

    struct World {
        eips: Vec<EgressIP>,
        nodes: Vec<NodeInfo>,
        namespaces: BTreeMap<String, BTreeMap<String, String>>,
        pods: Vec<PodInfo>,
        claims: BTreeMap<Ipv4Addr, BTreeSet<String>>,
        may_hold: bool,
        excluded: BTreeSet<Ipv4Net>,
        cfg: PlanConfig,
    }

    impl World {
        fn new() -> Self {
            Self {
                eips: vec![team_a([Some("node1"), Some("node2")])],
                nodes: nodes(),
                namespaces: namespaces(&[]),
                pods: pods(),
                claims: claims(&[("172.18.0.100", "node1"), ("172.18.0.101", "node2")]),
                may_hold: true,
                excluded: BTreeSet::from([
                    "10.244.0.0/16".parse().unwrap(),
                    "10.96.0.0/12".parse().unwrap(),
                ]),
                cfg: PlanConfig::default(),
            }
        }

        fn project(&self, node: &str) -> Projection {
            project(&ProjectInput {
                node_name: node,
                node_addr: None,
                eips: &self.eips,
                nodes: &self.nodes,
                namespaces: &self.namespaces,
                pods: &self.pods,
                claims: &self.claims,
                may_hold: self.may_hold,
                global_excluded: &self.excluded,
                config: &self.cfg,
            })
        }
    }

    #[test]
    fn every_local_pod_is_known_selected_or_not_and_no_other_node_s() {
        let p = World::new().project("node1");
        // db-0 is selected by nothing, web-3 lives on node2.
        assert_eq!(
            p.local_pods,
            BTreeSet::from([ip("10.244.1.4"), ip("10.244.1.5"), ip("10.244.1.6")])
        );
        assert_eq!(
            World::new().project("node2").local_pods,
            BTreeSet::from([ip("10.244.2.4")])
        );
    }

    #[test]
    fn steady_state_on_the_egress_node() {
        let p = World::new().project("node1");
        let s = &p.state;
        assert_eq!(s.node_addr, Some(ip("172.18.0.11")));
        assert_eq!(
            s.nodes,
            BTreeSet::from([ip("172.18.0.11"), ip("172.18.0.12"), ip("172.18.0.13")])
        );
        assert_eq!(s.policies.len(), 2);
        let p1 = &s.policies[&1];
        assert_eq!(p1.name, "team-a/172.18.0.100");
        assert_eq!(p1.egress_node, Some(ip("172.18.0.11")));
        assert_eq!(p1.failure_policy, FailurePolicy::FailOpen);
        assert_eq!(
            p1.excluded,
            BTreeSet::from(["192.0.2.0/24".parse().unwrap()])
        );
        assert_eq!(s.policies[&2].egress_node, Some(ip("172.18.0.12")));
        // Only local, selected pods; spread over both IPs by address.
        assert_eq!(
            s.pods,
            BTreeMap::from([(ip("10.244.1.4"), 1), (ip("10.244.1.5"), 2)])
        );
        assert_eq!(s.global_excluded.len(), 2);
        assert_eq!(s.claims(), BTreeSet::from([ip("172.18.0.100")]));
        assert_eq!(
            p.claims,
            [AddressClaim {
                ip: ip("172.18.0.100"),
                interface: Some("eth0".into())
            }]
        );
    }

    #[test]
    fn other_nodes_see_the_same_policies_and_their_own_pods() {
        let w = World::new();
        let p1 = w.project("node1");
        let p2 = w.project("node2");
        assert_eq!(p1.state.policies, p2.state.policies);
        assert_eq!(p2.state.pods, BTreeMap::from([(ip("10.244.2.4"), 1)]));
        let p3 = w.project("node3");
        assert!(p3.claims.is_empty());
        assert!(p3.state.pods.is_empty());
    }

    #[test]
    fn every_node_knows_the_other_nodes_selected_pods_and_where_they_run() {
        let w = World::new();
        let remote = |node: &str| w.project(node).state.remote_pods;
        let on = |policy, node: &str| RemotePod {
            policy,
            node: ip(node),
        };
        assert_eq!(
            remote("node1"),
            BTreeMap::from([(ip("10.244.2.4"), on(1, "172.18.0.12"))])
        );
        assert_eq!(
            remote("node2"),
            BTreeMap::from([
                (ip("10.244.1.4"), on(1, "172.18.0.11")),
                (ip("10.244.1.5"), on(2, "172.18.0.11")),
            ])
        );
        // The unselected db-0 is nobody's; node3 knows all three.
        assert_eq!(remote("node3").len(), 3);
        assert!(!remote("node3").contains_key(&ip("10.244.1.6")));
    }

    #[test]
    fn the_ips_of_one_egress_ip_form_one_group() {
        let mut w = World::new();
        let s = w.project("node1").state;
        assert_eq!(s.groups, BTreeMap::from([(2, 1)]));
        assert_eq!((s.group_of(1), s.group_of(2)), (1, 1));
        // A second resource is a group of its own.
        let mut other = eip(
            "team-b",
            "2026-01-02T00:00:00Z",
            json!({"egressIPs": ["172.18.0.110"], "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "none"}}}),
        );
        other.status = Some(serde_json::from_value(json!({"items": [], "ips": [{"egressIP": "172.18.0.110", "policyId": 7, "node": "node1", "conditions": []}]})).unwrap());
        w.eips.push(other);
        w.claims
            .entry(ip("172.18.0.110"))
            .or_default()
            .insert("node1".into());
        let s = w.project("node1").state;
        assert_eq!(s.group_of(7), 7);
        assert_eq!(s.group_of(2), 1);
    }

    #[test]
    fn fencing_waits_for_the_previous_holder() {
        let mut w = World::new();
        // The assigner moved .100 from node2 to node1, but node2 still claims it.
        w.claims = claims(&[("172.18.0.100", "node2"), ("172.18.0.101", "node2")]);
        let p = w.project("node1");
        assert_eq!(p.state.policies[&1].egress_node, None);
        assert!(p.claims.is_empty());
        // Everyone else steers nowhere until node1 claims it.
        assert_eq!(w.project("node3").state.policies[&1].egress_node, None);
        // node2 sees status no longer names it: it must let go.
        assert!(
            w.project("node2")
                .claims
                .iter()
                .all(|c| c.ip != ip("172.18.0.100"))
        );

        // node2's claim is released (or expired): node1 may claim.
        w.claims = claims(&[("172.18.0.101", "node2")]);
        let p = w.project("node1");
        assert_eq!(p.state.policies[&1].egress_node, Some(ip("172.18.0.11")));
        // node3 follows only once node1's claim shows up.
        assert_eq!(w.project("node3").state.policies[&1].egress_node, None);
        w.claims = claims(&[("172.18.0.100", "node1"), ("172.18.0.101", "node2")]);
        assert_eq!(
            w.project("node3").state.policies[&1].egress_node,
            Some(ip("172.18.0.11"))
        );
    }

    #[test]
    fn a_node_that_cannot_renew_withdraws() {
        let mut w = World::new();
        w.may_hold = false;
        let p = w.project("node1");
        assert!(p.claims.is_empty());
        assert_eq!(p.state.policies[&1].egress_node, None);
        // Its pods now all use the IP still held elsewhere.
        assert_eq!(
            p.state.pods.values().copied().collect::<BTreeSet<_>>(),
            BTreeSet::from([2])
        );
    }

    #[test]
    fn pods_of_a_failed_ip_move_to_the_remaining_one_and_only_they_do() {
        let mut w = World::new();
        let before = w.project("node1").state;
        w.eips = vec![team_a([Some("node1"), None])];
        w.claims = claims(&[("172.18.0.100", "node1")]);
        let after = w.project("node1").state;
        assert_eq!(after.policies[&2].egress_node, None);
        assert_eq!(
            after.pods,
            BTreeMap::from([(ip("10.244.1.4"), 1), (ip("10.244.1.5"), 1)])
        );
        let d = before.diff(&after);
        assert_eq!(d.pods.upsert, [(ip("10.244.1.5"), 1)]);
        assert!(d.pods.remove.is_empty());
    }

    #[test]
    fn with_no_ip_held_pods_keep_a_policy_so_the_failure_policy_applies() {
        let mut w = World::new();
        w.claims = BTreeMap::new();
        let s = w.project("node3").state;
        assert!(s.policies.values().all(|p| p.egress_node.is_none()));
        let s = w.project("node2").state;
        assert_eq!(s.pods.len(), 1);
    }

    #[test]
    fn pod_churn_relabel_and_ip_change_converge() {
        let mut w = World::new();
        w.pods.retain(|p| p.name != "web-1");
        w.pods.push(
            PodInfo::from_pod(&fixtures::pod(
                "shop",
                "web-4",
                "node1",
                "10.244.1.9",
                &[("app", "web")],
            ))
            .unwrap(),
        );
        w.pods
            .iter_mut()
            .find(|p| p.name == "db-0")
            .unwrap()
            .labels
            .insert("app".into(), "web".into());
        w.pods.iter_mut().find(|p| p.name == "web-2").unwrap().ip = ip("10.244.1.20");
        let s = w.project("node1").state;
        assert_eq!(
            s.pods.keys().copied().collect::<Vec<_>>(),
            [ip("10.244.1.6"), ip("10.244.1.9"), ip("10.244.1.20")]
        );
        // The namespace loses its match: nothing selected any more.
        w.namespaces.clear();
        w.namespaces.insert(
            "shop".into(),
            BTreeMap::from([("kubernetes.io/metadata.name".into(), "other".into())]),
        );
        assert!(w.project("node1").state.pods.is_empty());
    }

    #[test]
    fn ips_without_a_policy_id_or_no_longer_in_spec_are_not_applied() {
        let mut w = World::new();
        let e = &mut w.eips[0];
        e.spec.egress_ips.pop();
        e.status.as_mut().unwrap().ips[0].policy_id = None;
        let s = w.project("node1").state;
        assert!(s.policies.is_empty());
        assert!(s.pods.is_empty());
    }

    #[test]
    fn invalid_resources_and_younger_duplicates_apply_nothing() {
        let mut w = World::new();
        let mut dup = eip(
            "z-dup",
            "2026-02-01T00:00:00Z",
            json!({"egressIPs": ["172.18.0.100"], "namespaceSelector": {}}),
        );
        // A stale or hand-written status naming an id must not make it apply.
        dup.status = Some(serde_json::from_value(json!({"ips": [{"egressIP": "172.18.0.100", "policyId": 9, "node": "node2", "conditions": []}]})).unwrap());
        w.eips.push(dup);
        let s = w.project("node1").state;
        // The duplicate's only IP conflicts: the pods it wins (db-0, which
        // team-a does not select) are held closed by its failure policy.
        assert_eq!(
            s.policies.keys().copied().collect::<Vec<_>>(),
            [NO_USABLE_IP, 1, 2]
        );
        assert_eq!(s.pods[&ip("10.244.1.6")], NO_USABLE_IP);
        w.eips[0].spec.namespace_selector.match_expressions = Some(vec![
            serde_json::from_value(json!({"key": "x", "operator": "Exists", "values": ["y"]}))
                .unwrap(),
        ]);
        // team-a is now invalid: its policies go; the younger duplicate takes .100.
        let s = w.project("node1").state;
        assert_eq!(s.policies.keys().copied().collect::<Vec<_>>(), [9]);
        assert!(s.pods.keys().all(|p| s.pods[p] == 9));
    }

    /// `spread` selects namespace `shop`'s `app=web` pods through three IPs
    /// (ids 1..=3) held by the given nodes.
    fn spread(holders: [Option<&str>; 3]) -> EgressIP {
        let addrs = ["172.18.0.100", "172.18.0.101", "172.18.0.102"];
        let mut e = eip(
            "spread",
            "2026-01-01T00:00:00Z",
            json!({"egressIPs": addrs,
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "shop"}},
                "podSelector": {"matchLabels": {"app": "web"}}}),
        );
        let ips: Vec<serde_json::Value> = addrs
            .iter()
            .zip(holders)
            .enumerate()
            .map(|(i, (ip, n))| json!({"egressIP": ip, "policyId": i + 1, "node": n, "conditions": []}))
            .collect();
        e.status = Some(serde_json::from_value(json!({"items": [], "ips": ips})).unwrap());
        e
    }

    #[test]
    fn with_three_ips_a_lapsed_ip_moves_only_its_own_pods() {
        let mut w = World::new();
        w.eips = vec![spread([Some("node1"), Some("node2"), Some("node1")])];
        w.claims = claims(&[
            ("172.18.0.100", "node1"),
            ("172.18.0.101", "node2"),
            ("172.18.0.102", "node1"),
        ]);
        w.pods = (0..60)
            .map(|i| {
                let ip = format!("10.244.1.{}", 10 + i);
                PodInfo::from_pod(&fixtures::pod(
                    "shop",
                    &format!("web-{i}"),
                    "node1",
                    &ip,
                    &[("app", "web")],
                ))
                .unwrap()
            })
            .collect();
        let before = w.project("node1").state.pods;
        assert_eq!(before.len(), 60);
        for id in 1..=3 {
            let n = before.values().filter(|p| **p == id).count();
            assert!(n >= 10, "IP {id} got {n} of 60 pods: {before:?}");
        }
        // node2's claim on .101 (id 2) lapses.
        w.claims = claims(&[("172.18.0.100", "node1"), ("172.18.0.102", "node1")]);
        let after = w.project("node1").state.pods;
        for (pod, id) in &before {
            if *id == 2 {
                assert_ne!(after[pod], 2, "{pod} still uses the lapsed IP");
            } else {
                assert_eq!(after[pod], *id, "{pod} moved although its IP is healthy");
            }
        }
        // Both remaining IPs take some of the moved pods.
        let moved: BTreeSet<PolicyId> = before
            .iter()
            .filter(|(_, id)| **id == 2)
            .map(|(pod, _)| after[pod])
            .collect();
        assert_eq!(moved, BTreeSet::from([1, 3]));
        // The choice does not depend on the order of the ids.
        let ids = [3, 2, 1];
        let policies = w.project("node1").state.policies;
        for pod in before.keys() {
            assert_eq!(pick_policy(*pod, &ids, &policies), Some(after[pod]));
        }
    }

    #[test]
    fn pods_of_a_fail_closed_egress_ip_without_usable_ip_are_held_closed() {
        let mut w = World::new();
        let mut e = team_a([Some("node1"), Some("node2")]);
        e.status = None;
        e.spec.failure_policy = crate::crd::FailurePolicySpec::FailClosed;
        w.eips = vec![e];
        let s = w.project("node1").state;
        assert_eq!(
            s.pods,
            BTreeMap::from([
                (ip("10.244.1.4"), NO_USABLE_IP),
                (ip("10.244.1.5"), NO_USABLE_IP)
            ])
        );
        assert_eq!(
            s.policies.keys().copied().collect::<Vec<_>>(),
            [NO_USABLE_IP]
        );
        let slot = &s.policies[&NO_USABLE_IP];
        assert_eq!(slot.egress_node, None);
        assert_eq!(slot.failure_policy, FailurePolicy::FailClosed);
        assert!(s.claims().is_empty());

        // The same resource with FailOpen lets them out with the node address.
        w.eips[0].spec.failure_policy = crate::crd::FailurePolicySpec::FailOpen;
        let s = w.project("node1").state;
        assert!(s.pods.is_empty());
        assert!(s.policies.is_empty());
    }

    #[test]
    fn invalid_or_conflicting_ips_hold_fail_closed_pods_closed_too() {
        let mut w = World::new();
        // node1's own address: a conflict; a malformed entry: invalid.
        let mut e = eip(
            "bad-ips",
            "2026-01-01T00:00:00Z",
            json!({"egressIPs": ["172.18.0.11", "300.1.2.3"],
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "shop"}},
                "podSelector": {"matchLabels": {"app": "web"}},
                "failurePolicy": "FailClosed"}),
        );
        e.status = Some(
            serde_json::from_value(json!({"items": [], "ips": [
            {"egressIP": "172.18.0.11", "policyId": 4, "node": "node1", "conditions": []}]}))
            .unwrap(),
        );
        w.eips = vec![e];
        let s = w.project("node1").state;
        assert!(
            s.pods.values().all(|id| *id == NO_USABLE_IP),
            "{:?}",
            s.pods
        );
        assert_eq!(s.pods.len(), 2);
        assert!(!s.policies.contains_key(&4));
        // A pod no resource selects is not held.
        assert!(!s.pods.contains_key(&ip("10.244.1.6")));
    }
}
