//! Offline schema check of `deploy/`: every document deserializes into its
//! k8s-openapi type (required fields present, right types) and serializes
//! back to exactly what was written, so that a misspelt or misplaced field
//! (which the API server would silently drop) fails here. Then the
//! properties the agent depends on are checked.

use std::{collections::BTreeSet, path::PathBuf};

use egress_config::KubernetesConfig;
use egress_k8s::{Options, crd::EgressIP};
use k8s_openapi::{
    api::{
        admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding},
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Namespace, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn documents(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(deploy_dir().join(file)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// Deserializes strictly: the typed value must serialize back to the input.
fn strict<T: DeserializeOwned + Serialize>(file: &str, doc: &Value) -> T {
    let typed: T = serde_json::from_value(doc.clone()).unwrap_or_err(file, doc);
    let back = serde_json::to_value(&typed).unwrap();
    if let Some(path) = first_difference(doc, &back, String::new()) {
        panic!(
            "{file}: {} {:?}: field {path} is unknown or has the wrong shape",
            doc["kind"], doc["metadata"]["name"]
        );
    }
    typed
}

trait UnwrapOrErr<T> {
    fn unwrap_or_err(self, file: &str, doc: &Value) -> T;
}

impl<T> UnwrapOrErr<T> for Result<T, serde_json::Error> {
    fn unwrap_or_err(self, file: &str, doc: &Value) -> T {
        self.unwrap_or_else(|e| {
            panic!("{file}: {} {:?}: {e}", doc["kind"], doc["metadata"]["name"])
        })
    }
}

fn first_difference(a: &Value, b: &Value, path: String) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                let p = format!("{path}.{k}");
                match y.get(k) {
                    None => return Some(p),
                    Some(w) => {
                        if let Some(d) = first_difference(v, w, p) {
                            return Some(d);
                        }
                    }
                }
            }
            None
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (v, w))| first_difference(v, w, format!("{path}[{i}]"))),
        (x, y) if x == y => None,
        // YAML `1.0` vs an integer field and similar: compare as numbers.
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => None,
        _ => Some(path),
    }
}

#[test]
fn strictness_catches_a_misspelt_field() {
    let doc: Value = serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "x", "namespace": "y", "lables": {"a": "b"}}
    });
    let r = std::panic::catch_unwind(|| strict::<ServiceAccount>("inline", &doc));
    assert!(r.is_err());
}

#[test]
fn every_manifest_is_schema_valid() {
    let kustomization = documents("kustomization.yaml");
    let listed: Vec<String> = kustomization[0]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    let mut on_disk: Vec<String> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    on_disk.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(
        sorted, on_disk,
        "kustomization.yaml must list every manifest"
    );

    let mut kinds = BTreeSet::new();
    for file in &listed {
        for doc in documents(file) {
            let kind = doc["kind"].as_str().unwrap().to_string();
            match kind.as_str() {
                "Namespace" => drop(strict::<Namespace>(file, &doc)),
                "ServiceAccount" => drop(strict::<ServiceAccount>(file, &doc)),
                "ClusterRole" => drop(strict::<ClusterRole>(file, &doc)),
                "ClusterRoleBinding" => drop(strict::<ClusterRoleBinding>(file, &doc)),
                "Role" => drop(strict::<Role>(file, &doc)),
                "RoleBinding" => drop(strict::<RoleBinding>(file, &doc)),
                "ConfigMap" => drop(strict::<ConfigMap>(file, &doc)),
                "DaemonSet" => drop(strict::<DaemonSet>(file, &doc)),
                "CustomResourceDefinition" => drop(strict::<CustomResourceDefinition>(file, &doc)),
                "ValidatingAdmissionPolicy" => {
                    drop(strict::<ValidatingAdmissionPolicy>(file, &doc))
                }
                "ValidatingAdmissionPolicyBinding" => {
                    drop(strict::<ValidatingAdmissionPolicyBinding>(file, &doc))
                }
                other => panic!("{file}: unexpected kind {other}"),
            }
            kinds.insert(kind);
        }
    }
    assert_eq!(kinds.len(), 11, "{kinds:?}");
}

fn one<T: DeserializeOwned + Serialize>(file: &str, kind: &str) -> T {
    let doc = documents(file)
        .into_iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {file}"));
    strict(file, &doc)
}

fn allows(rules: &[PolicyRule], group: &str, resource: &str, verb: &str) -> bool {
    rules.iter().any(|r| {
        r.api_groups
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|g| g == group)
            && r.resources
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|x| x == resource)
            && r.verbs.iter().any(|v| v == verb)
    })
}

#[test]
fn rbac_grants_what_the_controller_uses_and_no_more() {
    let cluster: ClusterRole = one("rbac.yaml", "ClusterRole");
    let rules = cluster.rules.unwrap();
    let needed = [
        (
            "egress.example.dev",
            "egressips",
            &["get", "list", "watch"][..],
        ),
        ("egress.example.dev", "egressips/status", &["patch"][..]),
        ("", "nodes", &["get", "list", "watch", "patch"][..]),
        ("", "namespaces", &["list", "watch"][..]),
        ("", "pods", &["list", "watch"][..]),
        ("events.k8s.io", "events", &["create", "patch"][..]),
    ];
    for (g, r, verbs) in needed {
        for v in verbs {
            assert!(allows(&rules, g, r, v), "ClusterRole lacks {v} {g}/{r}");
        }
    }
    for rule in &rules {
        let all = |xs: &[String]| xs.iter().any(|x| x == "*");
        assert!(
            !all(&rule.verbs) && !all(rule.resources.as_deref().unwrap_or_default()),
            "wildcard in {rule:?}"
        );
        for v in &rule.verbs {
            assert!(
                ![
                    "delete",
                    "deletecollection",
                    "escalate",
                    "bind",
                    "impersonate"
                ]
                .contains(&v.as_str()),
                "{rule:?}"
            );
        }
        assert!(
            !rule
                .resources
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|r| r == "secrets"
                    || r == "egressips"
                        && rule
                            .verbs
                            .iter()
                            .any(|v| v != "get" && v != "list" && v != "watch"))
        );
    }
    // Leases only through the namespaced Role.
    assert!(!rules.iter().any(|r| {
        r.resources
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|x| x == "leases")
    }));
    let role: Role = one("rbac.yaml", "Role");
    assert_eq!(role.metadata.namespace.as_deref(), Some("egress-system"));
    for v in ["get", "list", "watch", "create", "update", "patch"] {
        assert!(
            allows(
                role.rules.as_deref().unwrap(),
                "coordination.k8s.io",
                "leases",
                v
            ),
            "Role lacks {v} leases"
        );
    }
    let sa: ServiceAccount = one("rbac.yaml", "ServiceAccount");
    for binding in [
        one::<RoleBinding>("rbac.yaml", "RoleBinding").subjects,
        one::<ClusterRoleBinding>("rbac.yaml", "ClusterRoleBinding").subjects,
    ] {
        let s = &binding.unwrap()[0];
        assert_eq!(
            (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref()),
            (
                "ServiceAccount",
                "egress-agent",
                sa.metadata.namespace.as_deref()
            )
        );
    }
}

#[test]
fn daemonset_has_what_the_agent_needs() {
    let ds: DaemonSet = one("daemonset.yaml", "DaemonSet");
    let spec = ds.spec.unwrap();
    let pod = spec.template.spec.unwrap();
    let labels = spec.template.metadata.unwrap().labels.unwrap();
    for (k, v) in spec.selector.match_labels.unwrap() {
        assert_eq!(labels.get(&k), Some(&v), "selector must match the template");
    }
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("egress-agent"));
    assert!(
        pod.tolerations
            .unwrap()
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none())
    );
    let grace = pod.termination_grace_period_seconds.unwrap();
    let config_map: ConfigMap = one("configmap.yaml", "ConfigMap");
    let toml_text = &config_map.data.unwrap()["config.toml"];
    let table: toml::Table = toml::from_str(toml_text).unwrap();
    let k8s: KubernetesConfig = table["kubernetes"].clone().try_into().unwrap();
    let options = Options::new(k8s, Vec::new()).unwrap();
    assert!(
        options.kubernetes.drain_timeout.as_secs() < grace as u64,
        "grace period must outlast the drain"
    );

    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added: BTreeSet<&str> = caps
        .add
        .as_deref()
        .unwrap()
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(
        added,
        BTreeSet::from(["NET_ADMIN", "NET_RAW", "BPF", "PERFMON", "SYS_RESOURCE"])
    );
    assert!(c.readiness_probe.is_some() && c.liveness_probe.is_some());
    let env = c.env.as_deref().unwrap();
    let node_name = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "spec.nodeName"
    );
    let node_ip = env.iter().find(|e| e.name == "NODE_IP").unwrap();
    assert_eq!(
        node_ip
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "status.hostIP"
    );
    let mounts = c.volume_mounts.as_deref().unwrap();
    let volumes = pod.volumes.unwrap();
    let bpffs = mounts
        .iter()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("/sys/fs/bpf mounted");
    let vol = volumes.iter().find(|v| v.name == bpffs.name).unwrap();
    assert_eq!(vol.host_path.as_ref().unwrap().path, "/sys/fs/bpf");
    for m in mounts {
        assert!(
            volumes.iter().any(|v| v.name == m.name),
            "mount {} has no volume",
            m.name
        );
    }
    let port = c
        .ports
        .as_deref()
        .unwrap()
        .iter()
        .find(|p| p.name.as_deref() == Some("heartbeat"))
        .unwrap();
    assert_eq!(
        port.container_port as u16,
        options.kubernetes.heartbeat.unwrap().port
    );
    assert_eq!(port.protocol.as_deref(), Some("UDP"));
}

#[test]
fn example_egressip_is_valid() {
    let doc = documents("examples/egressip.yaml").remove(0);
    let eip: EgressIP = strict("examples/egressip.yaml", &doc);
    assert_eq!(eip.spec.egress_ips.len(), 2);
    assert!(eip.spec.node_selector.is_some());
}

fn daemonset_pod() -> k8s_openapi::api::core::v1::PodSpec {
    let ds: DaemonSet = one("daemonset.yaml", "DaemonSet");
    ds.spec.unwrap().template.spec.unwrap()
}

/// Server-side apply merges `env` by name and rejects a list with the same
/// name twice (`duplicate entries for key [name="NODE_IP"]`); client-side
/// apply silently keeps the last one.
#[test]
fn daemonset_env_keys_are_unique() {
    let pod = daemonset_pod();
    let containers = pod.init_containers.iter().flatten().chain(&pod.containers);
    for c in containers {
        let mut seen = BTreeSet::new();
        for e in c.env.iter().flatten() {
            assert!(
                seen.insert(e.name.as_str()),
                "container {}: env {} is set twice",
                c.name,
                e.name
            );
        }
        let mut mounts = BTreeSet::new();
        for m in c.volume_mounts.iter().flatten() {
            assert!(
                mounts.insert(m.mount_path.as_str()),
                "container {}: {} mounted twice",
                c.name,
                m.mount_path
            );
        }
    }
}

/// The runtimes' default AppArmor profiles deny what pinning under
/// /sys/fs/bpf needs; the agent runs Unconfined (as Cilium's agent does).
#[test]
fn agent_runs_without_the_default_apparmor_profile() {
    let pod = daemonset_pod();
    let agent = &pod.containers[0];
    let profile = agent
        .security_context
        .as_ref()
        .and_then(|s| s.app_armor_profile.as_ref())
        .or(pod
            .security_context
            .as_ref()
            .and_then(|s| s.app_armor_profile.as_ref()))
        .expect("an AppArmor profile for the agent");
    assert_eq!(profile.type_, "Unconfined");
}

/// The pins must be in the host's bpffs: either the host mounts it, or an
/// init container that may mount (privileged, which Bidirectional
/// propagation requires) mounts it and propagates the mount to the host.
#[test]
fn bpffs_is_the_hosts_and_an_init_container_mounts_it_if_needed() {
    let pod = daemonset_pod();
    let volumes = pod.volumes.as_deref().unwrap();
    let bpffs = volumes
        .iter()
        .find(|v| {
            v.host_path
                .as_ref()
                .is_some_and(|h| h.path == "/sys/fs/bpf")
        })
        .expect("a hostPath volume for /sys/fs/bpf");
    let mounts_of = |c: &k8s_openapi::api::core::v1::Container| {
        c.volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == bpffs.name)
            .cloned()
    };
    let agent = &pod.containers[0];
    let agent_mount = mounts_of(agent).expect("the agent mounts bpffs");
    assert_eq!(agent_mount.mount_path, "/sys/fs/bpf");
    assert_ne!(agent_mount.read_only, Some(true), "the agent pins there");
    assert_eq!(
        agent_mount.mount_propagation.as_deref(),
        Some("HostToContainer"),
        "the agent must see a bpffs the host or the init container mounted"
    );
    let init = pod
        .init_containers
        .iter()
        .flatten()
        .find(|c| mounts_of(c).is_some())
        .expect("an init container that mounts bpffs");
    let init_mount = mounts_of(init).unwrap();
    assert_eq!(init_mount.mount_path, "/sys/fs/bpf");
    assert_eq!(
        init_mount.mount_propagation.as_deref(),
        Some("Bidirectional"),
        "the mount must reach the host"
    );
    let sc = init.security_context.as_ref().unwrap();
    assert_eq!(
        sc.privileged,
        Some(true),
        "Bidirectional propagation is allowed only in privileged containers"
    );
    let script = init
        .command
        .iter()
        .flatten()
        .cloned()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        script.contains("mount -t bpf bpf /sys/fs/bpf") && script.contains("/proc/self/mounts"),
        "mounts bpffs only when it is not mounted yet: {script}"
    );
    // The agent itself stays unprivileged.
    assert_eq!(
        agent.security_context.as_ref().unwrap().privileged,
        Some(false)
    );
}

/// `status.ips[].policyId` indexes the nodes' policy arrays: the shipped
/// CRD's maximum is what the shipped `[datapath] max_policies` holds.
#[test]
fn crd_policy_id_bound_matches_the_shipped_max_policies() {
    let config_map: ConfigMap = one("configmap.yaml", "ConfigMap");
    let table: toml::Table = toml::from_str(&config_map.data.unwrap()["config.toml"]).unwrap();
    let max_policies = table["datapath"]["max_policies"].as_integer().unwrap();
    let crd = documents("crd.yaml").remove(0);
    let id = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
        ["ips"]["items"]["properties"]["policyId"];
    assert_eq!(
        id["maximum"].as_f64(),
        Some((max_policies - 1) as f64),
        "regenerate deploy/crd.yaml with `egress-crdgen --max-policies {max_policies}`"
    );
}
