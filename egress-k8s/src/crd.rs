//! The `EgressIP` custom resource.
//!
//! The spec is a superset of OVN-Kubernetes' `k8s.ovn.org/v1 EgressIP`, so an
//! OVN-K manifest migrates by changing `apiVersion`: `egressIPs`,
//! `namespaceSelector` and `podSelector` mean the same thing here. Our
//! extensions are optional and default to OVN-K's behaviour, except
//! `failurePolicy`, which defaults to fail-closed (OVN-K leaks the node IP).

use k8s_openapi::{
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector},
};
use kube::{CustomResource, CustomResourceExt};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// API group of our resources, annotations and labels.
pub const GROUP: &str = "egress.example.dev";

/// Admission bounds. Every list has a `maxItems` and every string a CEL
/// rule reads has a `maxLength`: the API server refuses a CRD whose rules'
/// worst-case cost it cannot bound, and an object too large to place or
/// program is better refused than half applied.
pub mod limits {
    /// `spec.egressIPs` (each needs its own node) and the per-IP status lists.
    pub const EGRESS_IPS: u64 = 64;
    /// `spec.excludedCIDRs`; each becomes one LPM entry per policy.
    pub const EXCLUDED_CIDRS: u64 = 64;
    /// `matchExpressions` of a label selector, and `values` of one.
    pub const SELECTOR_EXPRESSIONS: u64 = 32;
    pub const SELECTOR_VALUES: u64 = 64;
    /// Conditions of the resource or of one IP (we write at most 5 types).
    pub const CONDITIONS: u64 = 8;
    /// The longest textual IP address (IPv6 with an embedded IPv4 tail),
    /// so that the IPv6 support of issue 11 needs no schema change here.
    pub const IP_TEXT: u64 = 45;
    /// The same plus `/128`.
    pub const CIDR_TEXT: u64 = 49;
    /// Linux interface names (IFNAMSIZ - 1).
    pub const INTERFACE_NAME: u64 = 15;
    /// A node name (DNS subdomain).
    pub const NODE_NAME: u64 = 253;
}

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
    /// The egress IPs, IPv4 dotted quads, each listed once. Each is held by
    /// a different node; a selected pod uses one of them. The API server
    /// refuses malformed and IPv6 entries; what only the cluster can judge
    /// (a node's address, another EgressIP's IP, no node with a subnet for
    /// it) is reported in `status.ips[].conditions`.
    #[serde(rename = "egressIPs")]
    #[schemars(schema_with = "egress_ips_schema")]
    pub egress_ips: Vec<String>,
    /// Namespaces whose pods are selected. Required, as in OVN-K; `{}`
    /// selects every namespace.
    #[schemars(transform = bound_selector)]
    pub namespace_selector: LabelSelector,
    /// Narrows the selection to pods with these labels (ANDed with
    /// `namespaceSelector`). Absent or `{}` selects every pod of the namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = bound_selector)]
    pub pod_selector: Option<LabelSelector>,
    /// Extension: destinations (CIDRs) this EgressIP never translates, beyond
    /// the cluster and service networks the agents always exclude.
    #[serde(
        default,
        rename = "excludedCIDRs",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(schema_with = "excluded_cidrs_schema")]
    pub excluded_cidrs: Vec<String>,
    /// Extension: only nodes that also match this selector may hold the IPs
    /// (they must carry the egress-assignable label as well).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = bound_selector)]
    pub node_selector: Option<LabelSelector>,
    /// Extension: the interface the IPs are put on. By default, the
    /// interface whose subnet contains the IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "interface_schema")]
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
    #[schemars(length(max = limits::EGRESS_IPS))]
    pub items: Vec<EgressIPStatusItem>,
    /// Per-IP detail: the datapath policy id and the conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = limits::EGRESS_IPS))]
    pub ips: Vec<EgressIPAddressStatus>,
    /// Conditions about the resource as a whole: `Invalid` (malformed
    /// selector or CIDR: nothing applied) and `Conflict` (some selected pods
    /// use an older EgressIP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = limits::CONDITIONS))]
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
    /// The datapath policy id (and tunnel VNI), unique in the cluster and
    /// kept for the IP's lifetime so that every node agrees. It indexes the
    /// nodes' policy arrays: at most `[datapath] max_policies - 1` (the
    /// schema's maximum is that of the shipped configuration, see
    /// [`crd`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub policy_id: Option<u32>,
    /// The node chosen to hold the IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = limits::NODE_NAME))]
    pub node: Option<String>,
    /// `Assigned`, `Announced`, `Conflict`, `Invalid`, `Applied`.
    #[serde(default)]
    #[schemars(length(max = limits::CONDITIONS))]
    pub conditions: Vec<Condition>,
}

/// `spec.egressIPs`: a set of IPv4 addresses. `isIP` refuses leading zeros,
/// zones and IPv4-mapped IPv6, as the datapath would; the family is a rule of
/// its own so that IPv6 support (issue 11) only has to drop it.
fn egress_ips_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": limits::EGRESS_IPS,
        "x-kubernetes-list-type": "set",
        "items": {
            "type": "string",
            "maxLength": limits::IP_TEXT,
            "x-kubernetes-validations": [
                {"rule": "isIP(self)",
                 "message": "must be an IP address, e.g. 172.18.0.100 (no leading zeros)"},
                {"rule": "!isIP(self) || ip(self).family() == 4",
                 "message": "must be an IPv4 address: IPv6 egress IPs are not supported yet"}
            ]
        }
    })
}

/// `spec.excludedCIDRs`: a set of IPv4 CIDRs.
fn excluded_cidrs_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": limits::EXCLUDED_CIDRS,
        "x-kubernetes-list-type": "set",
        "items": {
            "type": "string",
            "maxLength": limits::CIDR_TEXT,
            "x-kubernetes-validations": [
                {"rule": "isCIDR(self)",
                 "message": "must be a CIDR, e.g. 192.0.2.0/24 (a single address is 192.0.2.1/32)"},
                {"rule": "!isCIDR(self) || cidr(self).ip().family() == 4",
                 "message": "must be an IPv4 CIDR: IPv6 is not supported yet"}
            ]
        }
    })
}

/// `spec.interface`: a Linux interface name.
fn interface_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "nullable": true,
        "minLength": 1,
        "maxLength": limits::INTERFACE_NAME,
        "pattern": "^[^/:\\s]+$",
        "x-kubernetes-validations": [
            {"rule": "self != '.' && self != '..'", "message": "must be an interface name"}
        ]
    })
}

/// Bounds a label selector's lists and names its operators.
fn bound_selector(schema: &mut Schema) {
    let Some(props) = schema.get_mut("properties").and_then(|p| p.as_object_mut()) else {
        return;
    };
    if let Some(exprs) = props.get_mut("matchExpressions") {
        exprs["maxItems"] = limits::SELECTOR_EXPRESSIONS.into();
        let item = &mut exprs["items"]["properties"];
        item["values"]["maxItems"] = limits::SELECTOR_VALUES.into();
        item["operator"]["enum"] = serde_json::json!(["In", "NotIn", "Exists", "DoesNotExist"]);
    }
}

/// The CRD, with `status.ips[].policyId` bounded by what a node's policy
/// array holds under `max_policies` (ids index it; 0 is reserved).
///
/// The CRD is cluster-wide and static while `[datapath] max_policies` is a
/// setting, so `deploy/crd.yaml` is generated for the shipped configuration
/// (`deploy/configmap.yaml`, a test checks they agree); an operator who
/// raises `max_policies` regenerates it with `egress-crdgen --max-policies N`.
/// The assigner enforces the configured bound itself in any case: the
/// schema is the backstop against a hand-written status.
pub fn crd(max_policies: u32) -> CustomResourceDefinition {
    let mut crd = EgressIP::crd();
    for version in &mut crd.spec.versions {
        let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        else {
            continue;
        };
        let policy_id = schema
            .properties
            .as_mut()
            .and_then(|p| p.get_mut("status"))
            .and_then(|s| s.properties.as_mut())
            .and_then(|p| p.get_mut("ips"))
            .and_then(|ips| ips.items.as_mut())
            .and_then(|items| match items {
                k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(s) => Some(s),
                _ => None,
            })
            .and_then(|item| item.properties.as_mut())
            .and_then(|p| p.get_mut("policyId"))
            .expect("status.ips[].policyId is in the schema");
        policy_id.maximum = Some(f64::from(max_policies.saturating_sub(1)));
    }
    crd
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
    /// Every node programmed the IP's policy (`False` names the nodes whose
    /// datapath refused it, and their error).
    pub const APPLIED: &str = "Applied";
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
