//! `deploy/admission-policy.yaml`, evaluated offline as the API server
//! evaluates a ValidatingAdmissionPolicy: match constraints, match
//! conditions, variables in order, then every validation (false or an
//! evaluation error denies: `failurePolicy: Fail`), against admission
//! requests shaped like those the agents send, from the node the token is
//! bound to. Each rule has requests that must pass and requests that must be
//! denied for that rule's reason.

mod k8s_cel;

use std::collections::HashMap;

use cel::{Value as Cel, objects::Key};
use egress_k8s::claims;
use serde_json::{Value, json};

const AGENT: &str = "system:serviceaccount:egress-system:egress-agent";
const SUBNETS: &str = "egress.example.dev/egress-subnets";

fn documents() -> Vec<Value> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/admission-policy.yaml"
    ))
    .unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn policy(name: &str) -> (Value, Value) {
    let docs = documents();
    let find = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
            .clone()
    };
    (
        find("ValidatingAdmissionPolicy"),
        find("ValidatingAdmissionPolicyBinding"),
    )
}

/// One admission request.
#[derive(Clone)]
struct Request {
    user: String,
    node: Option<String>,
    operation: &'static str,
    group: &'static str,
    resource: &'static str,
    sub_resource: &'static str,
    namespace: &'static str,
    object: Value,
    old_object: Value,
}

impl Request {
    fn json(&self) -> Value {
        let mut user = json!({"username": self.user,
            "groups": ["system:serviceaccounts", "system:serviceaccounts:egress-system", "system:authenticated"]});
        if let Some(n) = &self.node {
            user["extra"] = json!({
                "authentication.kubernetes.io/node-name": [n],
                "authentication.kubernetes.io/node-uid": [format!("uid-{n}")],
                "authentication.kubernetes.io/pod-name": [format!("egress-agent-{n}")],
            });
        }
        let name = if self.object.is_null() {
            &self.old_object["metadata"]["name"]
        } else {
            &self.object["metadata"]["name"]
        };
        json!({
            "operation": self.operation,
            "userInfo": user,
            "resource": {"group": self.group, "version": "v1", "resource": self.resource},
            "subResource": self.sub_resource,
            "name": name,
            "namespace": self.namespace,
        })
    }
}

#[derive(Debug, PartialEq)]
enum Verdict {
    /// The policy does not apply to the request.
    NotMatched,
    Allowed,
    Denied(Vec<String>),
}

fn matches_rules(policy: &Value, req: &Request) -> bool {
    let resource = if req.sub_resource.is_empty() {
        req.resource.to_string()
    } else {
        format!("{}/{}", req.resource, req.sub_resource)
    };
    policy["spec"]["matchConstraints"]["resourceRules"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| {
            let has = |field: &str, v: &str| {
                r[field]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x == v || x == "*")
            };
            has("apiGroups", req.group)
                && has("resources", &resource)
                && has("operations", req.operation)
        })
}

fn evaluate(name: &str, req: &Request, params: Option<Value>) -> Verdict {
    let (policy, binding) = policy(name);
    if !matches_rules(&policy, req) {
        return Verdict::NotMatched;
    }
    let mut vars: Vec<(&str, Cel)> = vec![
        ("request", k8s_cel::to_cel(&req.json())),
        ("object", k8s_cel::to_cel(&req.object)),
        ("oldObject", k8s_cel::to_cel(&req.old_object)),
    ];
    for c in policy["spec"]["matchConditions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let expr = c["expression"].as_str().unwrap();
        match k8s_cel::eval_value(expr, &vars) {
            Ok(Cel::Bool(true)) => {}
            Ok(Cel::Bool(false)) => return Verdict::NotMatched,
            other => panic!("match condition {expr}: {other:?}"),
        }
    }
    if policy["spec"]["paramKind"].is_object() {
        let not_found = &binding["spec"]["paramRef"]["parameterNotFoundAction"];
        match params {
            Some(p) => vars.push(("params", k8s_cel::to_cel(&p))),
            None if not_found == "Deny" => {
                return Verdict::Denied(vec!["parameter not found".into()]);
            }
            None => return Verdict::Allowed,
        }
    }
    let mut variables: HashMap<Key, Cel> = HashMap::new();
    for v in policy["spec"]["variables"].as_array().into_iter().flatten() {
        let expr = v["expression"].as_str().unwrap();
        let mut scope = vars.clone();
        scope.push(("variables", Cel::from(variables.clone())));
        // Our variables are written never to fail, so that evaluating them
        // eagerly here is the same as the API server's lazy evaluation.
        let value = k8s_cel::eval_value(expr, &scope)
            .unwrap_or_else(|e| panic!("variable {}: {e}", v["name"]));
        variables.insert(Key::from(v["name"].as_str().unwrap().to_string()), value);
    }
    vars.push(("variables", Cel::from(variables)));
    let mut denied = Vec::new();
    for v in policy["spec"]["validations"].as_array().unwrap() {
        let expr = v["expression"].as_str().unwrap();
        let message = v["message"].as_str().unwrap().to_string();
        match k8s_cel::eval_value(expr, &vars) {
            Ok(Cel::Bool(true)) => {}
            Ok(Cel::Bool(false)) => denied.push(message),
            other => denied.push(format!("{message} (evaluation: {other:?})")),
        }
    }
    if denied.is_empty() {
        Verdict::Allowed
    } else {
        Verdict::Denied(denied)
    }
}

#[track_caller]
fn allowed(name: &str, req: &Request, params: Option<Value>) {
    assert_eq!(evaluate(name, req, params), Verdict::Allowed);
}

#[track_caller]
fn denied(name: &str, req: &Request, params: Option<Value>, because: &str) {
    match evaluate(name, req, params) {
        Verdict::Denied(why) => assert!(
            why.iter().any(|w| w.contains(because)),
            "denied, but not because {because:?}: {why:?}"
        ),
        other => panic!("expected a denial because {because:?}, got {other:?}"),
    }
}

const NODE_SCOPE: &str = "egress-agent-node-scope";
const STATUS: &str = "egress-assigner-status";

fn node_object(name: &str, annotations: Value, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "resourceVersion": "7", "labels": labels, "annotations": annotations},
        "spec": {"podCIDR": "10.244.1.0/24"},
        "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.11"}]}})
}

fn node_update(by: &str, before: Value, after: Value) -> Request {
    Request {
        user: AGENT.into(),
        node: Some(by.into()),
        operation: "UPDATE",
        group: "",
        resource: "nodes",
        sub_resource: "",
        namespace: "",
        object: after,
        old_object: before,
    }
}

fn lease(name: &str, holder: Option<&str>, annotations: Value) -> Value {
    let mut l = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "namespace": "egress-system", "resourceVersion": "11",
                     "annotations": annotations},
        "spec": {"leaseTransitions": 0}});
    if let Some(h) = holder {
        l["spec"]["holderIdentity"] = json!(h);
    }
    l
}

fn lease_write(by: &str, operation: &'static str, old: Value, new: Value) -> Request {
    Request {
        user: AGENT.into(),
        node: Some(by.into()),
        operation,
        group: "coordination.k8s.io",
        resource: "leases",
        sub_resource: "",
        namespace: "egress-system",
        object: new,
        old_object: old,
    }
}

fn claims_lease(node: &str, holder: &str) -> Value {
    let mut l = lease(
        &claims::lease_name(node),
        Some(holder),
        json!({claims::CLAIMED_ANNOTATION: "172.18.0.100", claims::DRAINING_ANNOTATION: "false"}),
    );
    l["metadata"]["labels"] = json!({claims::ROLE_LABEL: claims::ROLE_CLAIMS});
    l
}

fn lock(holder: Option<&str>, ip: &str) -> Value {
    let mut l = lease(
        &claims::lock_name(ip.parse().unwrap()),
        holder,
        json!({claims::LOCKED_IP_ANNOTATION: ip}),
    );
    l["metadata"]["labels"] = json!({claims::ROLE_LABEL: claims::ROLE_IP_LOCK});
    l
}

#[test]
fn an_agent_changes_only_the_subnets_annotation_of_its_own_node() {
    let before = node_object(
        "node1",
        json!({"node.alpha.kubernetes.io/ttl": "0", SUBNETS: "[]"}),
        json!({"kubernetes.io/hostname": "node1"}),
    );
    let mut after = before.clone();
    after["metadata"]["annotations"][SUBNETS] =
        json!(r#"[{"interface":"eth0","address":"172.18.0.11/16"}]"#);
    allowed(
        NODE_SCOPE,
        &node_update("node1", before.clone(), after.clone()),
        None,
    );
    // First publication: the annotation did not exist yet.
    let mut bare = before.clone();
    bare["metadata"]["annotations"] = json!({"node.alpha.kubernetes.io/ttl": "0"});
    allowed(
        NODE_SCOPE,
        &node_update("node1", bare.clone(), after.clone()),
        None,
    );
    let mut none = before.clone();
    none["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    let mut first = none.clone();
    first["metadata"]["annotations"] = json!({SUBNETS: "[]"});
    allowed(NODE_SCOPE, &node_update("node1", none, first), None);

    // Another node's Node.
    let other_before = node_object("node2", json!({SUBNETS: "[]"}), json!({}));
    let mut other_after = other_before.clone();
    other_after["metadata"]["annotations"][SUBNETS] = json!("[]x");
    denied(
        NODE_SCOPE,
        &node_update("node1", other_before, other_after),
        None,
        "only its own Node",
    );
    let changes_more_than_the_subnets = |changed: Value| {
        denied(
            NODE_SCOPE,
            &node_update("node1", before.clone(), changed),
            None,
            "only the egress.example.dev/egress-subnets annotation",
        )
    };
    // Its own, but a label (the assignable label would make it eligible).
    let mut relabelled = before.clone();
    relabelled["metadata"]["labels"]["k8s.ovn.org/egress-assignable"] = json!("");
    changes_more_than_the_subnets(relabelled);
    // Another annotation, added or removed.
    let mut annotated = after.clone();
    annotated["metadata"]["annotations"]["example.com/x"] = json!("y");
    changes_more_than_the_subnets(annotated);
    let mut stripped = before.clone();
    stripped["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("node.alpha.kubernetes.io/ttl");
    changes_more_than_the_subnets(stripped);
    // Its spec (uncordoning itself, taints).
    let mut uncordoned = before.clone();
    uncordoned["spec"]["unschedulable"] = json!(false);
    changes_more_than_the_subnets(uncordoned);
    // Creating or deleting Nodes.
    let mut create = node_update("node1", Value::Null, after.clone());
    create.operation = "CREATE";
    denied(NODE_SCOPE, &create, None, "only its own Node");
    // A token not bound to a node (e.g. a long-lived Secret token).
    let mut unbound = node_update("node1", before.clone(), after.clone());
    unbound.node = None;
    denied(NODE_SCOPE, &unbound, None, "bound to a node");
    // Administrators are not restricted.
    let mut admin = node_update("node1", before, relabelled_admin());
    admin.user = "kubernetes-admin".into();
    admin.node = None;
    assert_eq!(evaluate(NODE_SCOPE, &admin, None), Verdict::NotMatched);
}

fn relabelled_admin() -> Value {
    node_object("node1", json!({}), json!({"team": "infra"}))
}

#[test]
fn an_agent_writes_only_its_own_claims_lease() {
    allowed(
        NODE_SCOPE,
        &lease_write(
            "node1",
            "CREATE",
            Value::Null,
            claims_lease("node1", "node1"),
        ),
        None,
    );
    allowed(
        NODE_SCOPE,
        &lease_write(
            "node1",
            "UPDATE",
            claims_lease("node1", "node1"),
            claims_lease("node1", "node1"),
        ),
        None,
    );
    // Writing another node's claims (e.g. emptying them, or claiming in its name).
    denied(
        NODE_SCOPE,
        &lease_write(
            "node1",
            "UPDATE",
            claims_lease("node2", "node2"),
            claims_lease("node2", "node2"),
        ),
        None,
        "only its own claims Lease",
    );
    denied(
        NODE_SCOPE,
        &lease_write(
            "node1",
            "CREATE",
            Value::Null,
            claims_lease("node1", "node2"),
        ),
        None,
        "only its own claims Lease",
    );
    denied(
        NODE_SCOPE,
        &lease_write(
            "node1",
            "DELETE",
            claims_lease("node1", "node1"),
            Value::Null,
        ),
        None,
        "never delete",
    );
    let mut elsewhere = lease_write(
        "node1",
        "CREATE",
        Value::Null,
        claims_lease("node1", "node1"),
    );
    elsewhere.namespace = "kube-system";
    denied(NODE_SCOPE, &elsewhere, None, "only in egress-system");
    denied(
        NODE_SCOPE,
        &lease_write(
            "node1",
            "CREATE",
            Value::Null,
            lease("kube-controller-manager", Some("node1"), json!({})),
        ),
        None,
        "only claims, IP-lock and assigner Leases",
    );
}

#[test]
fn an_agent_takes_ip_locks_only_for_itself_and_releases_only_its_own() {
    let ip = "172.18.0.100";
    // Create, renew the same, take a released one.
    allowed(
        NODE_SCOPE,
        &lease_write("node1", "CREATE", Value::Null, lock(Some("node1"), ip)),
        None,
    );
    allowed(
        NODE_SCOPE,
        &lease_write("node1", "UPDATE", lock(None, ip), lock(Some("node1"), ip)),
        None,
    );
    // Take over a lock whose holder crashed: CEL cannot tell it from a live
    // one (no claims, no clock), so it stays the protocol's judgement.
    allowed(
        NODE_SCOPE,
        &lease_write(
            "node1",
            "UPDATE",
            lock(Some("node2"), ip),
            lock(Some("node1"), ip),
        ),
        None,
    );
    // Release its own.
    allowed(
        NODE_SCOPE,
        &lease_write("node1", "UPDATE", lock(Some("node1"), ip), lock(None, ip)),
        None,
    );
    // Create one in another node's name, hand its own over, clear another's.
    denied(
        NODE_SCOPE,
        &lease_write("node1", "CREATE", Value::Null, lock(Some("node2"), ip)),
        None,
        "take an IP lock only for itself",
    );
    denied(
        NODE_SCOPE,
        &lease_write(
            "node1",
            "UPDATE",
            lock(Some("node1"), ip),
            lock(Some("node2"), ip),
        ),
        None,
        "take an IP lock only for itself",
    );
    denied(
        NODE_SCOPE,
        &lease_write("node1", "UPDATE", lock(Some("node2"), ip), lock(None, ip)),
        None,
        "release only its own",
    );
    // Re-point a lock at another IP.
    let mut moved = lock(Some("node1"), ip);
    moved["metadata"]["annotations"][claims::LOCKED_IP_ANNOTATION] = json!("172.18.0.101");
    denied(
        NODE_SCOPE,
        &lease_write("node1", "UPDATE", lock(Some("node1"), ip), moved),
        None,
        "keeps the IP it guards",
    );
    denied(
        NODE_SCOPE,
        &lease_write("node1", "DELETE", lock(Some("node1"), ip), Value::Null),
        None,
        "never delete",
    );
}

#[test]
fn the_assigner_lease_is_taken_only_for_oneself() {
    let leader = |h: Option<&str>| lease("egress-assigner", h, json!({}));
    allowed(
        NODE_SCOPE,
        &lease_write("node1", "CREATE", Value::Null, leader(Some("node1"))),
        None,
    );
    allowed(
        NODE_SCOPE,
        &lease_write(
            "node1",
            "UPDATE",
            leader(Some("node2")),
            leader(Some("node1")),
        ),
        None,
    );
    allowed(
        NODE_SCOPE,
        &lease_write("node1", "UPDATE", leader(Some("node1")), leader(None)),
        None,
    );
    denied(
        NODE_SCOPE,
        &lease_write(
            "node1",
            "UPDATE",
            leader(Some("node1")),
            leader(Some("node3")),
        ),
        None,
        "assigner Lease only for itself",
    );
    denied(
        NODE_SCOPE,
        &lease_write("node1", "UPDATE", leader(Some("node2")), leader(None)),
        None,
        "release only its own",
    );
}

#[test]
fn only_the_elected_assigner_writes_egressip_status() {
    let status_write = |by: &str| Request {
        user: AGENT.into(),
        node: Some(by.into()),
        operation: "UPDATE",
        group: "egress.example.dev",
        resource: "egressips",
        sub_resource: "status",
        namespace: "",
        object: json!({"apiVersion": "egress.example.dev/v1", "kind": "EgressIP",
            "metadata": {"name": "team-a"},
            "spec": {"egressIPs": ["172.18.0.100"], "namespaceSelector": {}},
            "status": {"items": [{"node": by, "egressIP": "172.18.0.100"}]}}),
        old_object: json!({"apiVersion": "egress.example.dev/v1", "kind": "EgressIP",
            "metadata": {"name": "team-a"},
            "spec": {"egressIPs": ["172.18.0.100"], "namespaceSelector": {}}}),
    };
    let leader = lease("egress-assigner", Some("node1"), json!({}));
    allowed(STATUS, &status_write("node1"), Some(leader.clone()));
    denied(
        STATUS,
        &status_write("node2"),
        Some(leader.clone()),
        "only the elected assigner",
    );
    denied(
        STATUS,
        &status_write("node1"),
        Some(lease("egress-assigner", None, json!({}))),
        "only the elected assigner",
    );
    // Before any election nothing may write status.
    denied(STATUS, &status_write("node1"), None, "parameter not found");
    let mut unbound = status_write("node1");
    unbound.node = None;
    denied(
        STATUS,
        &unbound,
        Some(leader.clone()),
        "only the elected assigner",
    );
    // The spec and other resources are not this policy's business (RBAC
    // grants no spec writes at all).
    let mut spec_write = status_write("node2");
    spec_write.sub_resource = "";
    assert_eq!(
        evaluate(STATUS, &spec_write, Some(leader)),
        Verdict::NotMatched
    );
}

/// The names the policies hard-code are those the agents use.
#[test]
fn the_policies_name_what_the_agents_write() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/admission-policy.yaml"
    ))
    .unwrap();
    let defaults = egress_config::KubernetesConfig::default();
    assert!(text.contains(&format!("'{}'", defaults.leader_lease)));
    assert!(text.contains(&format!("name: {}", defaults.leader_lease)));
    assert!(text.contains(&format!("namespace: {}", defaults.namespace)));
    assert!(text.contains(&format!("'{}'", egress_k8s::facts::SUBNETS_ANNOTATION)));
    assert!(text.contains(&format!("'{}'", claims::LOCKED_IP_ANNOTATION)));
    assert!(claims::lease_name("n").starts_with("egress-claims-"));
    assert!(claims::lock_name("10.0.0.1".parse().unwrap()).starts_with("egress-ip-"));
    assert!(text.contains(&format!(
        "system:serviceaccount:{}:egress-agent",
        defaults.namespace
    )));
}
