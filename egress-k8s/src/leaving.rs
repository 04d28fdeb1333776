//! Whether a node is going away (drained, deleted, shut down) or only its
//! agent is restarting: on SIGTERM the first hands its egress IPs over, the
//! second keeps them for its successor under a restart grace.
//!
//! A node is leaving when its Node object says so in one of the ways the
//! cluster's tools do:
//! - `spec.unschedulable` (`kubectl cordon` / `drain`, cluster upgrades);
//! - `metadata.deletionTimestamp` (the Node is being deleted);
//! - a taint `node.kubernetes.io/unschedulable` (the node lifecycle
//!   controller's mirror of cordoning), `node.kubernetes.io/out-of-service`
//!   (non-graceful node shutdown, set by an operator or a fencing agent),
//!   or `ToBeDeletedByClusterAutoscaler` (scale-down);
//! - a `Ready` condition that is not `True` and whose message says the
//!   node is shutting down (the kubelet's graceful node shutdown).
//!
//! Anything else (a DaemonSet rolling update, a crash, a restart by hand) is
//! a restart. Deliberately not leaving: `NotReady` for other reasons (a
//! kubelet or network hiccup is no reason to move IPs whose holder is still
//! renewing), and the cluster autoscaler's soft `DeletionCandidateOf...`
//! taint (a candidate may stay).

use k8s_openapi::api::core::v1::Node;

/// Taints that mean the node is going away.
pub const LEAVING_TAINTS: [&str; 3] = [
    "node.kubernetes.io/unschedulable",
    "node.kubernetes.io/out-of-service",
    "ToBeDeletedByClusterAutoscaler",
];

/// What the kubelet's graceful shutdown writes in the `Ready` condition.
const SHUTTING_DOWN: &str = "node is shutting down";

/// Why `node` is leaving, or `None` when it is not.
pub fn leaving(node: &Node) -> Option<String> {
    if node.metadata.deletion_timestamp.is_some() {
        return Some("the Node is being deleted".into());
    }
    let spec = node.spec.as_ref();
    if spec.and_then(|s| s.unschedulable).unwrap_or(false) {
        return Some("the Node is cordoned (spec.unschedulable)".into());
    }
    if let Some(t) = spec
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .find(|t| LEAVING_TAINTS.contains(&t.key.as_str()))
    {
        return Some(format!("the Node has the taint {}", t.key));
    }
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .find(|c| {
            c.type_ == "Ready"
                && c.status != "True"
                && c.message
                    .as_deref()
                    .is_some_and(|m| m.contains(SHUTTING_DOWN))
        })
        .map(|_| "the kubelet reports the node shutting down".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::fixtures;

    fn patched(patch: serde_json::Value) -> Node {
        let mut v = serde_json::to_value(fixtures::node("node1", "172.18.0.11", &[], &[])).unwrap();
        json_merge(&mut v, &patch);
        serde_json::from_value(v).unwrap()
    }

    fn json_merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
        match (target, patch) {
            (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
                for (k, v) in p {
                    json_merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                }
            }
            (t, p) => *t = p.clone(),
        }
    }

    #[test]
    fn a_ready_schedulable_node_is_restarting_not_leaving() {
        assert_eq!(leaving(&patched(serde_json::json!({}))), None);
        // NotReady for another reason, and a soft autoscaler taint: staying.
        let n = patched(serde_json::json!({
            "spec": {"taints": [{"key": "DeletionCandidateOfClusterAutoscaler", "value": "1700000000", "effect": "PreferNoSchedule"}]},
            "status": {"conditions": [{"type": "Ready", "status": "False", "reason": "KubeletNotReady",
                "message": "container runtime network not ready: NetworkReady=false",
                "lastHeartbeatTime": "2026-01-10T09:00:00Z", "lastTransitionTime": "2026-01-10T09:00:00Z"}]}
        }));
        assert_eq!(leaving(&n), None);
    }

    #[test]
    fn drained_deleted_tainted_and_shutting_down_nodes_are_leaving() {
        let cases = [
            serde_json::json!({"spec": {"unschedulable": true}}),
            serde_json::json!({"metadata": {"deletionTimestamp": "2026-01-10T09:30:00Z"}}),
            serde_json::json!({"spec": {"taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}}),
            serde_json::json!({"spec": {"taints": [{"key": "node.kubernetes.io/out-of-service", "value": "nodeshutdown", "effect": "NoExecute"}]}}),
            serde_json::json!({"spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}]}}),
            serde_json::json!({"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "KubeletNotReady",
                "message": "node is shutting down", "lastHeartbeatTime": "2026-01-10T09:00:00Z",
                "lastTransitionTime": "2026-01-10T09:00:00Z"}]}}),
        ];
        for c in cases {
            assert!(leaving(&patched(c.clone())).is_some(), "{c}");
        }
    }
}
