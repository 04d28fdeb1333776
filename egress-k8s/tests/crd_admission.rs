//! Admission of EgressIP manifests against the generated CRD, offline: the
//! structural schema (types, required fields, enums, bounds, unknown fields
//! as `kubectl`'s default strict field validation reports them, list-type
//! sets) with a JSON-schema validator, and every `x-kubernetes-validations`
//! rule evaluated with CEL where the API server would evaluate it.

mod k8s_cel;

use serde_json::{Value, json};

fn crd() -> Value {
    serde_yaml::from_str(&egress_k8s::crd_yaml()).unwrap()
}

fn openapi_schema() -> Value {
    crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// The Kubernetes structural schema as a JSON schema (draft 4, which
/// OpenAPI v3's schema objects extend): `nullable` becomes a `null` type,
/// a `set` list needs unique items, an object with declared properties and
/// no `additionalProperties` refuses others, and the Kubernetes extensions
/// are left for [`cel_errors`].
fn to_json_schema(k: &Value) -> Value {
    let Value::Object(map) = k else {
        return k.clone();
    };
    let mut out = serde_json::Map::new();
    for (key, v) in map {
        match key.as_str() {
            "properties" => {
                let props = v
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(name, s)| (name.clone(), to_json_schema(s)))
                    .collect();
                out.insert(key.clone(), Value::Object(props));
            }
            "items" | "additionalProperties" if v.is_object() => {
                out.insert(key.clone(), to_json_schema(v));
            }
            "nullable" | "default" | "description" | "format" | "title" => {
                if key == "format" {
                    out.insert(key.clone(), v.clone());
                }
            }
            k if k.starts_with("x-kubernetes-") => {}
            _ => {
                out.insert(key.clone(), v.clone());
            }
        }
    }
    if map.get("x-kubernetes-list-type") == Some(&json!("set")) {
        out.insert("uniqueItems".into(), json!(true));
    }
    if map.contains_key("properties") && !map.contains_key("additionalProperties") {
        out.insert("additionalProperties".into(), json!(false));
    }
    if map.get("nullable") == Some(&json!(true))
        && let Some(t) = out.get("type").cloned()
    {
        out.insert("type".into(), json!([t, "null"]));
    }
    Value::Object(out)
}

/// Evaluates every rule whose schema node is present in `value`, with
/// `self` bound to that node.
fn cel_errors(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    if value.is_null() {
        return;
    }
    for rule in schema["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let expr = rule["rule"].as_str().unwrap();
        match k8s_cel::eval(expr, &[("self", value)]) {
            Ok(true) => {}
            Ok(false) => errors.push(format!(
                "{path}: Invalid value: {value}: {}",
                rule["message"].as_str().unwrap_or(expr)
            )),
            Err(e) => errors.push(format!("{path}: rule error: {e}")),
        }
    }
    match value {
        Value::Object(o) => {
            for (k, v) in o {
                if let Some(s) = schema["properties"].get(k) {
                    cel_errors(s, v, &format!("{path}.{k}"), errors);
                } else if schema["additionalProperties"].is_object() {
                    cel_errors(
                        &schema["additionalProperties"],
                        v,
                        &format!("{path}.{k}"),
                        errors,
                    );
                }
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                cel_errors(&schema["items"], v, &format!("{path}[{i}]"), errors);
            }
        }
        _ => {}
    }
}

/// What the API server would answer: `Ok` or the reasons for refusing.
/// `metadata`, `apiVersion` and `kind` are the API server's own business.
fn admit(manifest: &Value) -> Result<(), Vec<String>> {
    let schema = openapi_schema();
    let mut body = manifest.clone();
    for k in ["apiVersion", "kind", "metadata"] {
        body.as_object_mut().unwrap().remove(k);
    }
    let validator = jsonschema::draft4::options()
        .should_validate_formats(true)
        .build(&to_json_schema(&schema))
        .unwrap();
    let mut errors: Vec<String> = validator
        .iter_errors(&body)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    // Like the API server, rules run only on structurally valid objects.
    if errors.is_empty() {
        cel_errors(&schema, &body, "", &mut errors);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn eip(spec: Value) -> Value {
    json!({"apiVersion": "egress.example.dev/v1", "kind": "EgressIP",
           "metadata": {"name": "team-a"}, "spec": spec})
}

fn spec_with(field: &str, value: Value) -> Value {
    let mut spec = json!({"egressIPs": ["172.18.0.100"],
                          "namespaceSelector": {"matchLabels": {"team": "a"}}});
    spec[field] = value;
    eip(spec)
}

#[track_caller]
fn refused(manifest: &Value, because: &str) {
    let errors = admit(manifest).expect_err(&format!("{manifest} must be refused"));
    assert!(
        errors.iter().any(|e| e.contains(because)),
        "{manifest}: expected an error containing {because:?}, got {errors:?}"
    );
}

#[test]
fn the_cel_harness_follows_the_kubernetes_reference() {
    k8s_cel::check_library_against_the_reference();
}

#[test]
fn good_manifests_are_admitted() {
    let example: Value = serde_yaml::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/examples/egressip.yaml"
        ))
        .unwrap(),
    )
    .unwrap();
    admit(&example).unwrap();
    let full = eip(json!({
        "egressIPs": ["172.18.0.100", "192.168.50.7"],
        "namespaceSelector": {"matchExpressions": [
            {"key": "environment", "operator": "NotIn", "values": ["development"]},
            {"key": "team", "operator": "Exists"}]},
        "podSelector": {"matchLabels": {"app": "web"}},
        "nodeSelector": {"matchLabels": {"egress": "yes"}},
        "excludedCIDRs": ["192.0.2.0/24", "198.51.100.7/32", "0.0.0.0/0"],
        "interface": "eth1",
        "failurePolicy": "FailOpen"
    }));
    admit(&full).unwrap();
    let mut with_status = full.clone();
    with_status["status"] = json!({
        "items": [{"node": "worker-1", "egressIP": "172.18.0.100"}],
        "ips": [{"egressIP": "172.18.0.100", "policyId": 4095, "node": "worker-1",
                 "conditions": [{"type": "Assigned", "status": "True", "reason": "Assigned",
                                 "message": "", "lastTransitionTime": "2026-05-01T12:00:00Z"}]}],
        "conditions": [{"type": "Invalid", "status": "False", "reason": "Valid",
                        "message": "", "lastTransitionTime": "2026-05-01T12:00:00Z"}],
        "observedGeneration": 3
    });
    admit(&with_status).unwrap();
    // OVN-Kubernetes' own example, apiVersion changed.
    admit(&eip(json!({"egressIPs": ["172.18.0.33", "172.18.0.44"],
        "namespaceSelector": {"matchExpressions": [{"key": "environment", "operator": "NotIn", "values": ["development"]}]},
        "podSelector": {"matchLabels": {"app": "web"}}}))).unwrap();
}

#[test]
fn malformed_or_foreign_family_egress_ips_are_refused() {
    let ips = |v: Value| spec_with("egressIPs", v);
    refused(&ips(json!(["172.18.0.300"])), "must be an IP address");
    refused(&ips(json!(["172.18.0.1000"])), "must be an IP address");
    refused(&ips(json!(["010.18.0.1"])), "must be an IP address");
    refused(&ips(json!(["172.18.0"])), "must be an IP address");
    refused(&ips(json!(["egress.example.com"])), "must be an IP address");
    refused(&ips(json!(["172.18.0.100/32"])), "must be an IP address");
    refused(
        &ips(json!(["::ffff:172.18.0.100"])),
        "must be an IP address",
    );
    refused(&ips(json!(["fd00::100"])), "must be an IPv4 address");
    refused(&ips(json!(["172.18.0.100", "172.18.0.100"])), "unique");
    let many: Vec<String> = (0..65)
        .map(|i| format!("10.0.{}.{}", i / 200, i % 200 + 1))
        .collect();
    refused(&ips(json!(many)), "more than 64 items");
    refused(&ips(json!([" 172.18.0.100"])), "must be an IP address");
    refused(&ips(json!([172])), "is not of type");
}

#[test]
fn excluded_cidrs_must_be_ipv4_cidrs() {
    let cidrs = |v: Value| spec_with("excludedCIDRs", v);
    refused(&cidrs(json!(["192.0.2.0/33"])), "must be a CIDR");
    refused(&cidrs(json!(["192.0.2.7"])), "must be a CIDR");
    refused(&cidrs(json!(["192.0.2.0/024"])), "must be a CIDR");
    refused(&cidrs(json!(["192.0.2.0/-1"])), "must be a CIDR");
    refused(&cidrs(json!(["2001:db8::/32"])), "must be an IPv4 CIDR");
    refused(&cidrs(json!(["192.0.2.0/24", "192.0.2.0/24"])), "unique");
    let many: Vec<String> = (0..65).map(|i| format!("10.{i}.0.0/16")).collect();
    refused(&cidrs(json!(many)), "more than 64 items");
}

#[test]
fn failure_policy_interface_and_selectors_are_checked() {
    refused(
        &spec_with("failurePolicy", json!("FailSafe")),
        "is not one of",
    );
    refused(&spec_with("interface", json!("eth0/1")), "does not match");
    refused(
        &spec_with("interface", json!("a-much-too-long-name")),
        "longer than 15",
    );
    refused(
        &spec_with("interface", json!("..")),
        "must be an interface name",
    );
    refused(&spec_with("interface", json!("")), "shorter than 1");
    refused(
        &spec_with(
            "podSelector",
            json!({"matchExpressions": [{"key": "app", "operator": "Like", "values": ["web"]}]}),
        ),
        "is not one of",
    );
    let many: Vec<Value> = (0..33)
        .map(|i| json!({"key": format!("k{i}"), "operator": "Exists"}))
        .collect();
    refused(
        &spec_with("namespaceSelector", json!({"matchExpressions": many})),
        "more than 32 items",
    );
    refused(
        &eip(json!({"egressIPs": ["172.18.0.100"]})),
        "\"namespaceSelector\" is a required property",
    );
    // A misspelt field is refused as `kubectl apply` (strict field
    // validation) refuses it, instead of being dropped silently.
    refused(
        &spec_with("failurepolicy", json!("FailOpen")),
        "Additional properties are not allowed",
    );
}

#[test]
fn policy_ids_beyond_the_datapath_are_refused_in_status() {
    let with_id = |id: Value| {
        let mut m = spec_with("egressIPs", json!(["172.18.0.100"]));
        m["status"] = json!({"ips": [{"egressIP": "172.18.0.100", "policyId": id}]});
        m
    };
    admit(&with_id(json!(1))).unwrap();
    admit(&with_id(json!(4095))).unwrap();
    refused(&with_id(json!(4096)), "maximum of 4095");
    refused(&with_id(json!(0)), "minimum of 1");
}

/// The bound follows `max_policies`: ids index a policy array of that size.
#[test]
fn the_policy_id_maximum_follows_max_policies() {
    let crd: Value = serde_yaml::from_str(&egress_k8s::crd_yaml_for(256)).unwrap();
    let id = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
        ["ips"]["items"]["properties"]["policyId"];
    assert_eq!(id["maximum"], json!(255.0));
}

/// The API server refuses a CRD whose CEL cost it cannot bound, and an
/// unbounded list is an unbounded object: every list has `maxItems`, and
/// every string a rule reads has `maxLength`.
#[test]
fn every_list_is_bounded_and_every_string_a_rule_reads_too() {
    fn walk(s: &Value, path: &str, out: &mut Vec<String>) {
        if s["type"] == "array" && s["maxItems"].is_null() {
            out.push(format!("{path}: list without maxItems"));
        }
        if s["type"] == "string"
            && s["x-kubernetes-validations"].is_array()
            && s["maxLength"].is_null()
        {
            out.push(format!("{path}: string read by a rule without maxLength"));
        }
        for (k, v) in s["properties"].as_object().into_iter().flatten() {
            walk(v, &format!("{path}.{k}"), out);
        }
        if s["items"].is_object() {
            walk(&s["items"], &format!("{path}[]"), out);
        }
        if s["additionalProperties"].is_object() {
            walk(&s["additionalProperties"], &format!("{path}{{}}"), out);
        }
    }
    let mut unbounded = Vec::new();
    walk(&openapi_schema(), "", &mut unbounded);
    assert!(unbounded.is_empty(), "{unbounded:#?}");
}
