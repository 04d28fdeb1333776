//! `deploy/crd.yaml` must be what the Rust types generate.

use std::path::PathBuf;

#[test]
fn checked_in_crd_matches_the_rust_types() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/crd.yaml");
    let generated = egress_k8s::crd_yaml();
    if std::env::var_os("EGRESS_UPDATE_CRD").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert!(
        on_disk == generated,
        "{} is stale: regenerate it with `cargo run -p egress-k8s --bin egress-crdgen > deploy/crd.yaml` \
         (or run this test with EGRESS_UPDATE_CRD=1)",
        path.display()
    );
}

#[test]
fn crd_is_cluster_scoped_with_status_subresource_and_required_fields() {
    let crd: serde_json::Value = serde_yaml::from_str(&egress_k8s::crd_yaml()).unwrap();
    assert_eq!(crd["spec"]["scope"], "Cluster");
    assert_eq!(crd["spec"]["group"], "egress.example.dev");
    let v = &crd["spec"]["versions"][0];
    assert_eq!(v["name"], "v1");
    assert!(v["subresources"]["status"].is_object());
    let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let required: Vec<&str> = spec["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert!(required.contains(&"egressIPs"));
    assert!(required.contains(&"namespaceSelector"));
    assert_eq!(
        spec["properties"]["failurePolicy"]["enum"],
        serde_json::json!(["FailClosed", "FailOpen"])
    );
}
