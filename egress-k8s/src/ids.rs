//! Policy ids: which id each egress IP's policy gets, within what the
//! nodes' datapaths hold, and when a released id may mean something else.
//!
//! An id indexes every node's policy array (`[datapath] max_policies`
//! slots, slot 0 reserved) and is the VNI that steers a policy's traffic to
//! its egress node, so all nodes must agree on what it means. Two rules
//! follow:
//!
//! - **Bounded.** Ids are `1..=max_policies - 1`. When every id is taken
//!   the IPs left without one are not assigned, with the condition
//!   `Assigned=False, reason NoPolicyId` naming the bound and the ids in
//!   quarantine, instead of an id the nodes cannot hold.
//! - **Quarantined until released everywhere.** An id whose IP went away
//!   (EgressIP deleted, IP removed or invalid) is not handed to another IP
//!   while any node reports it still present in its datapath (or failed to
//!   program or remove it): each agent publishes the ids its datapath holds
//!   after every apply ([`crate::report`]). Otherwise a node that has not
//!   applied the release yet would steer the old IP's pods with the id
//!   while a node that has applied the reuse translates it as the new IP:
//!   another pod's traffic out with that address.
//!
//! Nodes count while their Node object exists: a deleted node cannot hold
//! anything hostage, a node that is down keeps its ids in quarantine until
//! it comes back and applies, or is deleted.
//!
//! Limit: a node reports what it *holds*, not what its watch has seen. A
//! node whose view of the EgressIPs lags behind the whole life of an id's
//! old meaning (it never programmed it) reports nothing for it, and could
//! program that meaning late, after the id was reused. That window is the
//! watch lag of one node during the release and the reuse, and reuse takes
//! the lowest free id only once the id space has no fresh one below it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use egress_model::PolicyId;

use crate::plan::{Checked, Problem};

/// The ids the assigner may hand out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdSpace {
    /// The largest id the nodes' policy arrays hold: `max_policies - 1`.
    pub max: PolicyId,
    /// Ids some node reports its datapath may still hold.
    pub held: BTreeSet<PolicyId>,
}

impl IdSpace {
    pub fn new(max_policies: u32, held: BTreeSet<PolicyId>) -> Self {
        Self {
            max: max_policies
                .saturating_sub(1)
                .min(egress_model::MAX_POLICY_ID),
            held,
        }
    }

    fn contains(&self, id: PolicyId) -> bool {
        (1..=self.max).contains(&id)
    }
}

/// Keeps every valid IP's policy id from `previous` (resource name, IP)
/// while it is within the space, and gives new IPs the lowest id that is
/// neither taken nor held by a node. Ids of IPs that are no longer valid are
/// released. Duplicates in `previous` (hand-edited status) go to the
/// resource first in precedence order; the other gets a new id. IPs left
/// without an id when the space is exhausted are absent from the result.
pub fn allocate(
    checked: &[Checked],
    previous: &BTreeMap<(String, Ipv4Addr), PolicyId>,
    space: &IdSpace,
) -> BTreeMap<Ipv4Addr, PolicyId> {
    let mut taken: BTreeSet<PolicyId> = BTreeSet::new();
    let mut out = BTreeMap::new();
    for c in checked {
        for ip in c.valid_ips() {
            if let Some(&id) = previous.get(&(c.name.clone(), ip))
                && space.contains(id)
                && taken.insert(id)
            {
                out.insert(ip, id);
            }
        }
    }
    let mut next: PolicyId = 1;
    for c in checked {
        for ip in c.valid_ips() {
            if out.contains_key(&ip) {
                continue;
            }
            while taken.contains(&next) || space.held.contains(&next) {
                next += 1;
            }
            if next > space.max {
                return out;
            }
            taken.insert(next);
            out.insert(ip, next);
        }
    }
    out
}

/// Why valid IPs got no id: for their `Assigned` condition.
pub fn shortage(ids: &BTreeMap<Ipv4Addr, PolicyId>, space: &IdSpace) -> Problem {
    let quarantined: Vec<PolicyId> = space
        .held
        .iter()
        .copied()
        .filter(|id| space.contains(*id) && !ids.values().any(|v| v == id))
        .collect();
    let sample: Vec<String> = quarantined.iter().take(10).map(|i| i.to_string()).collect();
    Problem {
        reason: "NoPolicyId",
        message: format!(
            "every policy id the datapath holds is taken: ids 1..={} ([datapath] max_policies = {}), {} in use by egress IPs, {} released but still held by some node's datapath{}{}; raise max_policies on every node (and regenerate the CRD), or remove EgressIPs",
            space.max,
            space.max + 1,
            ids.len(),
            quarantined.len(),
            if sample.is_empty() { "" } else { ": " },
            sample.join(", ")
                + if quarantined.len() > sample.len() {
                    ", ..."
                } else {
                    ""
                },
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        facts::{DEFAULT_ASSIGNABLE_LABEL as EA, NodeInfo, eip_fixtures::eip, fixtures},
        plan::{PlanConfig, check_all},
    };

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn checked(ips: &[(&str, &[&str])]) -> Vec<Checked> {
        let nodes = vec![
            NodeInfo::from_node(&fixtures::node(
                "node1",
                "172.18.0.11",
                &[(EA, "")],
                &[("eth0", "172.18.0.11/16")],
            ))
            .unwrap(),
        ];
        let eips: Vec<_> = ips
            .iter()
            .enumerate()
            .map(|(i, (name, list))| {
                eip(
                    name,
                    &format!("2026-01-0{}T00:00:00Z", i + 1),
                    serde_json::json!({"egressIPs": list, "namespaceSelector": {}}),
                )
            })
            .collect();
        check_all(&eips, &nodes, &PlanConfig::default())
    }

    #[test]
    fn ids_stay_within_max_policies_and_the_shortage_is_explained() {
        let c = checked(&[("a", &["172.18.0.100", "172.18.0.101", "172.18.0.102"])]);
        // max_policies = 3: slots 1 and 2.
        let space = IdSpace::new(3, BTreeSet::new());
        let ids = allocate(&c, &BTreeMap::new(), &space);
        assert_eq!(
            ids,
            BTreeMap::from([(ip("172.18.0.100"), 1), (ip("172.18.0.101"), 2)])
        );
        let p = shortage(&ids, &space);
        assert_eq!(p.reason, "NoPolicyId");
        assert!(p.message.contains("ids 1..=2"), "{}", p.message);
        assert!(p.message.contains("max_policies = 3"), "{}", p.message);
        // A previous id beyond the bound (max_policies lowered) is replaced.
        let prev = BTreeMap::from([(("a".to_string(), ip("172.18.0.102")), 7)]);
        let ids = allocate(&c, &prev, &IdSpace::new(4, BTreeSet::new()));
        assert_eq!(
            ids.values().copied().collect::<BTreeSet<_>>(),
            BTreeSet::from([1, 2, 3])
        );
    }

    #[test]
    fn a_released_id_waits_until_no_node_holds_it() {
        // a had 172.18.0.100 with id 1; a is gone, b is new.
        let c = checked(&[("b", &["172.18.0.110"])]);
        let prev = BTreeMap::new();
        // node2 has not applied the release: id 1 is still in its datapath.
        let space = IdSpace::new(4096, BTreeSet::from([1]));
        assert_eq!(allocate(&c, &prev, &space)[&ip("172.18.0.110")], 2);
        // Every node has applied it: id 1 is free again.
        let space = IdSpace::new(4096, BTreeSet::new());
        assert_eq!(allocate(&c, &prev, &space)[&ip("172.18.0.110")], 1);
        // An IP keeps its own id even though nodes hold it (they do: it is live).
        let prev = BTreeMap::from([(("b".to_string(), ip("172.18.0.110")), 1)]);
        let space = IdSpace::new(4096, BTreeSet::from([1]));
        assert_eq!(allocate(&c, &prev, &space)[&ip("172.18.0.110")], 1);
    }

    #[test]
    fn quarantine_can_exhaust_the_space_and_says_so() {
        let c = checked(&[("b", &["172.18.0.110"])]);
        let space = IdSpace::new(3, BTreeSet::from([1, 2]));
        let ids = allocate(&c, &BTreeMap::new(), &space);
        assert!(ids.is_empty());
        let p = shortage(&ids, &space);
        assert!(
            p.message
                .contains("2 released but still held by some node's datapath: 1, 2"),
            "{}",
            p.message
        );
    }
}
