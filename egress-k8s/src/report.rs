//! What each node's datapath holds, as its agent reports it: the policy ids
//! present in its maps and the policies it failed to program.
//!
//! The agent hands its [`DatapathReport`] to the controller after every
//! apply ([`crate::AgentLink::applied`]); the node session publishes it in
//! the node's claims Lease (two annotations, rewritten only when the report
//! changes); the assigner reads every node's report from the claims Leases
//! it watches anyway, to
//! - keep a released policy id out of reuse until no node holds it
//!   ([`crate::ids`]), and
//! - fold each node's failures into the `Applied` condition of the IP whose
//!   policy it could not program.

use std::collections::{BTreeMap, BTreeSet};

use egress_model::PolicyId;
use k8s_openapi::api::coordination::v1::Lease;

use crate::facts::NodeInfo;

/// Claims Lease annotation: the policy ids present in the node's datapath,
/// as ranges (`1-4,7`).
pub const PRESENT_ANNOTATION: &str = "egress.example.dev/policy-ids";
/// Claims Lease annotation: JSON object, policy id -> why the node could
/// not program it (`{}` when none failed).
pub const FAILED_ANNOTATION: &str = "egress.example.dev/policy-errors";

/// One node's datapath after its last apply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathReport {
    /// Policy ids the datapath may hold (written, or failed to be removed).
    pub present: BTreeSet<PolicyId>,
    /// Policies the datapath refused, with the error. The others were
    /// applied.
    pub failed: BTreeMap<PolicyId, String>,
}

impl DatapathReport {
    /// The annotations that carry this report.
    pub fn annotations(&self) -> [(String, String); 2] {
        [
            (PRESENT_ANNOTATION.into(), format_ids(&self.present)),
            (
                FAILED_ANNOTATION.into(),
                serde_json::to_string(&self.failed).expect("map of strings serializes"),
            ),
        ]
    }

    /// The report in a claims Lease; `None` when the Lease carries none (an
    /// agent that has not applied anything yet) or a malformed one.
    pub fn from_lease(lease: &Lease) -> Option<Self> {
        let annotations = lease.metadata.annotations.as_ref()?;
        let present = parse_ids(annotations.get(PRESENT_ANNOTATION)?)?;
        let failed = match annotations.get(FAILED_ANNOTATION) {
            Some(raw) => serde_json::from_str(raw).ok()?,
            None => BTreeMap::new(),
        };
        Some(Self { present, failed })
    }

    pub fn fully_applied(&self) -> bool {
        self.failed.is_empty()
    }
}

/// `1-4,7`: compact for the common case of a contiguous allocation.
pub fn format_ids(ids: &BTreeSet<PolicyId>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut iter = ids.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end += 1;
            iter.next();
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    out.join(",")
}

pub fn parse_ids(raw: &str) -> Option<BTreeSet<PolicyId>> {
    let mut out = BTreeSet::new();
    for part in raw.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (PolicyId, PolicyId) = (a.parse().ok()?, b.parse().ok()?);
                if a > b || b - a > egress_model::MAX_POLICY_ID {
                    return None;
                }
                out.extend(a..=b);
            }
            None => {
                out.insert(part.parse().ok()?);
            }
        }
    }
    Some(out)
}

/// Every node's report, from the claims Leases of nodes that exist: a Lease
/// left behind by a deleted Node does not hold ids hostage.
pub fn node_reports(leases: &[&Lease], nodes: &[NodeInfo]) -> BTreeMap<String, DatapathReport> {
    let existing: BTreeSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    leases
        .iter()
        .filter_map(|l| {
            let holder = l.spec.as_ref()?.holder_identity.as_deref()?;
            if !existing.contains(holder) {
                return None;
            }
            Some((holder.to_string(), DatapathReport::from_lease(l)?))
        })
        .collect()
}

/// Ids some node's datapath may still hold: present or failed (a failed
/// write may have left part of it).
pub fn held_ids(reports: &BTreeMap<String, DatapathReport>) -> BTreeSet<PolicyId> {
    reports
        .values()
        .flat_map(|r| r.present.iter().chain(r.failed.keys()))
        .copied()
        .collect()
}

/// Policy id -> (node, error) for every node that failed to program it.
pub fn failures(
    reports: &BTreeMap<String, DatapathReport>,
) -> BTreeMap<PolicyId, Vec<(String, String)>> {
    let mut out: BTreeMap<PolicyId, Vec<(String, String)>> = BTreeMap::new();
    for (node, r) in reports {
        for (id, e) in &r.failed {
            out.entry(*id).or_default().push((node.clone(), e.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::fixtures;

    #[test]
    fn ids_round_trip_as_ranges() {
        let ids = BTreeSet::from([1, 2, 3, 4, 7, 9, 10]);
        assert_eq!(format_ids(&ids), "1-4,7,9-10");
        assert_eq!(parse_ids("1-4,7,9-10"), Some(ids));
        assert_eq!(parse_ids(""), Some(BTreeSet::new()));
        assert_eq!(parse_ids("4-1"), None);
        assert_eq!(parse_ids("x"), None);
        assert_eq!(parse_ids("1-99999999999"), None);
    }

    fn lease(holder: &str, present: &str, failed: &str) -> Lease {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("egress-claims-{holder}"), "namespace": "egress-system",
                "annotations": {PRESENT_ANNOTATION: present, FAILED_ANNOTATION: failed}},
            "spec": {"holderIdentity": holder}
        }))
        .unwrap()
    }

    #[test]
    fn reports_come_from_leases_of_existing_nodes() {
        let nodes: Vec<NodeInfo> = ["node1", "node2"]
            .iter()
            .map(|n| NodeInfo::from_node(&fixtures::node(n, "172.18.0.11", &[], &[])).unwrap())
            .collect();
        let l1 = lease(
            "node1",
            "1-3",
            r#"{"5":"map policies_v4: index out of bounds"}"#,
        );
        let l2 = lease("node2", "2", "{}");
        let gone = lease("node9", "8", "{}");
        let reports = node_reports(&[&l1, &l2, &gone], &nodes);
        assert_eq!(reports.len(), 2, "node9 no longer exists");
        assert_eq!(held_ids(&reports), BTreeSet::from([1, 2, 3, 5]));
        assert_eq!(
            failures(&reports)[&5],
            [(
                "node1".to_string(),
                "map policies_v4: index out of bounds".to_string()
            )]
        );
        let r = DatapathReport {
            present: BTreeSet::from([1, 2]),
            failed: BTreeMap::from([(3, "boom".into())]),
        };
        let mut l: Lease = lease("node1", "", "");
        l.metadata.annotations = Some(r.annotations().into_iter().collect());
        assert_eq!(DatapathReport::from_lease(&l), Some(r));
    }
}
