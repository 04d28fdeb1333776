//! The `EgressIP` custom resource.
//!
//! The spec is a superset of OVN-Kubernetes' `k8s.ovn.org/v1 EgressIP`, so an
//! OVN-K manifest migrates by changing `apiVersion`: `egressIPs`,
//! `namespaceSelector` and `podSelector` mean the same thing here. Our
//! extensions are optional and default to OVN-K's behaviour, except
//! `failurePolicy`, which defaults to fail-closed (OVN-K leaks the node IP).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of our resources, annotations and labels.
pub const GROUP: &str = "egress.example.dev";

/// Selects pods (by namespace and pod labels) whose external traffic leaves
/// the cluster with one of `egressIPs` as its source address.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "egress.example.dev",
    version = "v1",
    kind = "EgressIP",
    plural = "egressips",
    singular = "egressip",
    shortname = "eip",
    status = "EgressIPStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"EgressIPs","type":"string","jsonPath":".spec.egressIPs"}"#,
    printcolumn = r#"{"name":"Assigned Node","type":"string","jsonPath":".status.items[*].node"}"#,
    printcolumn = r#"{"name":"Assigned EgressIPs","type":"string","jsonPath":".status.items[*].egressIP"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct EgressIPSpec {
    /// The egress IPs, IPv4 dotted quads. Each is held by a different node;
    /// a selected pod uses one of them. Malformed entries are reported in
    /// `status.ips[].conditions` (type `Invalid`) rather than rejected, so
    /// that one typo does not block the others' diagnosis.
    #[serde(rename = "egressIPs")]
    pub egress_ips: Vec<String>,
    /// Namespaces whose pods are selected. Required, as in OVN-K; `{}`
    /// selects every namespace.
    pub namespace_selector: LabelSelector,
    /// Narrows the selection to pods with these labels (ANDed with
    /// `namespaceSelector`). Absent or `{}` selects every pod of the namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Extension: destinations (CIDRs) this EgressIP never translates, beyond
    /// the cluster and service networks the agents always exclude.
    #[serde(
        default,
        rename = "excludedCIDRs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub excluded_cidrs: Vec<String>,
    /// Extension: only nodes that also match this selector may hold the IPs
    /// (they must carry the egress-assignable label as well).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// Extension: the interface the IPs are put on. By default, the
    /// interface whose subnet contains the IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// Extension: what selected pods' external traffic does while no node
    /// holds the IP.
    #[serde(default)]
    pub failure_policy: FailurePolicySpec,
}

/// `spec.failurePolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum FailurePolicySpec {
    /// Drop it: neither the pod's nor its node's address ever leaks.
    #[default]
    FailClosed,
    /// Let it leave with the node's address.
    FailOpen,
}

impl From<FailurePolicySpec> for egress_model::FailurePolicy {
    fn from(p: FailurePolicySpec) -> Self {
        match p {
            FailurePolicySpec::FailClosed => Self::FailClosed,
            FailurePolicySpec::FailOpen => Self::FailOpen,
        }
    }
}

/// Written by the elected assigner only.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressIPStatus {
    /// OVN-K compatible: one entry per assigned IP.
    #[serde(default)]
    pub items: Vec<EgressIPStatusItem>,
    /// Per-IP detail: the datapath policy id and the conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<EgressIPAddressStatus>,
    /// Conditions about the resource as a whole: `Invalid` (malformed
    /// selector or CIDR: nothing applied) and `Conflict` (some selected pods
    /// use an older EgressIP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// `status.items[]`, as in OVN-K.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressIPStatusItem {
    pub node: String,
    #[serde(rename = "egressIP")]
    pub egress_ip: String,
}

/// `status.ips[]`: one per entry of `spec.egressIPs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressIPAddressStatus {
    /// As written in the spec.
    #[serde(rename = "egressIP")]
    pub egress_ip: String,
    /// The datapath policy id (and tunnel VNI), 1..=16777215, unique in the
    /// cluster and kept for the IP's lifetime so that every node agrees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_id: Option<u32>,
    /// The node chosen to hold the IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `Assigned`, `Announced`, `Conflict`, `Invalid`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// Condition types.
pub mod condition {
    /// A node was chosen to hold the IP.
    pub const ASSIGNED: &str = "Assigned";
    /// The chosen node claims the IP: it holds it and has announced it.
    pub const ANNOUNCED: &str = "Announced";
    /// Another resource or a node already uses the IP, or (resource level)
    /// an older EgressIP selects some of the same pods.
    pub const CONFLICT: &str = "Conflict";
    /// Malformed input: nothing of it is applied.
    pub const INVALID: &str = "Invalid";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ovn_kubernetes_manifest_deserializes_unchanged_but_for_api_version() {
        // The example from OVN-K's documentation, with only apiVersion changed.
        let yaml = r#"
apiVersion: egress.example.dev/v1
kind: EgressIP
metadata:
  name: egressip-prod
spec:
  egressIPs:
  - 172.18.0.33
  - 172.18.0.44
  namespaceSelector:
    matchExpressions:
    - key: environment
      operator: NotIn
      values:
      - development
  podSelector:
    matchLabels:
      app: web
"#;
        let eip: EgressIP = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(eip.spec.egress_ips, ["172.18.0.33", "172.18.0.44"]);
        assert_eq!(eip.spec.failure_policy, FailurePolicySpec::FailClosed);
        assert!(eip.spec.node_selector.is_none());
        let exprs = eip.spec.namespace_selector.match_expressions.unwrap();
        assert_eq!(exprs[0].operator, "NotIn");
    }

    #[test]
    fn ovn_kubernetes_status_deserializes() {
        let status: EgressIPStatus = serde_json::from_value(serde_json::json!({
            "items": [{"node": "node1", "egressIP": "172.18.0.33"}]
        }))
        .unwrap();
        assert_eq!(status.items[0].node, "node1");
        assert!(status.ips.is_empty());
    }

    #[test]
    fn missing_namespace_selector_is_rejected() {
        let r: Result<EgressIPSpec, _> =
            serde_json::from_value(serde_json::json!({"egressIPs": ["172.18.0.33"]}));
        assert!(r.is_err());
    }
}
