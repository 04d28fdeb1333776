//! What watching every pod of the cluster costs a node's agent: the memory
//! of its pod store (full Pod objects, and the `PodInfo`s a slim store
//! keeps) and the time of one round of the node loop over all of them (the
//! `PodInfo` list, then the projection of the node's state).
//!
//! `cargo run --release -p egress-k8s --example pod_store_cost -- [PODS] [EGRESSIPS]`
//! (defaults: 200000 pods on 200 nodes in 1000 namespaces, 20 EgressIPs
//! each selecting one namespace's `app=web` pods through two IPs).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::atomic::{AtomicUsize, Ordering},
    time::Instant,
};

use egress_k8s::{
    crd::EgressIP,
    facts::{self, NodeInfo, PodInfo},
    plan::PlanConfig,
    project::{self, ProjectInput},
};
use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::json;

/// Counts live heap bytes.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const NODES: usize = 200;
const NAMESPACES: usize = 1000;

/// A Deployment's pod as a kind cluster serves it (managed fields, one
/// container with probes, a projected token volume, conditions, status).
fn pod_json(i: usize) -> serde_json::Value {
    let ns = format!("ns-{}", i % NAMESPACES);
    let node = format!("node-{}", i % NODES);
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i as u32 + 1);
    let app = if i.is_multiple_of(4) { "web" } else { "worker" };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("{app}-7d9c6b5f4-{i:06}"), "namespace": ns,
            "uid": format!("0b6f2c1e-5d4a-4c3b-9a8e-{i:012}"),
            "resourceVersion": format!("{}", 100000 + i),
            "creationTimestamp": "2026-01-10T08:30:00Z",
            "generateName": format!("{app}-7d9c6b5f4-"),
            "labels": {"app": app, "pod-template-hash": "7d9c6b5f4", "team": "payments"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-10T08:29:58Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": format!("{app}-7d9c6b5f4"), "uid": "5c1d2e3f-4a5b-6c7d-8e9f-0a1b2c3d4e5f",
                "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [
                {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                 "time": "2026-01-10T08:30:00Z", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {}, "f:pod-template-hash": {}},
                   "f:ownerReferences": {".": {}, "k:{\"uid\":\"5c1d2e3f\"}": {}}},
                   "f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {".": {}, "f:image": {}, "f:imagePullPolicy": {}, "f:name": {},
                     "f:ports": {".": {}, "k:{\"containerPort\":8080,\"protocol\":\"TCP\"}": {}}, "f:resources": {}}},
                     "f:dnsPolicy": {}, "f:enableServiceLinks": {}, "f:restartPolicy": {}, "f:schedulerName": {}}}},
                {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "subresource": "status",
                 "time": "2026-01-10T08:30:02Z", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {}, "f:hostIP": {}, "f:phase": {},
                   "f:podIP": {}, "f:podIPs": {".": {}, "k:{\"ip\":\"10.128.0.1\"}": {}}, "f:startTime": {}}}}
            ]
        },
        "spec": {
            "nodeName": node,
            "containers": [{
                "name": "app", "image": "registry.example.com/payments/app:1.42.0",
                "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                "env": [{"name": "MODE", "value": "production"}, {"name": "LOG_LEVEL", "value": "info"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"}, "periodSeconds": 10},
                "volumeMounts": [{"name": "kube-api-access-x7k2p", "readOnly": true,
                    "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent"
            }],
            "volumes": [{"name": "kube-api-access-x7k2p", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}}],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default", "serviceAccount": "default", "securityContext": {},
            "schedulerName": "default-scheduler", "priority": 0, "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]
        },
        "status": {
            "phase": "Running", "hostIP": "172.18.0.11", "hostIPs": [{"ip": "172.18.0.11"}],
            "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
            "startTime": "2026-01-10T08:30:01Z", "qosClass": "Burstable",
            "conditions": [
                {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": "2026-01-10T08:30:02Z"},
                {"type": "Initialized", "status": "True", "lastTransitionTime": "2026-01-10T08:30:01Z"},
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-10T08:30:05Z"},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-01-10T08:30:05Z"},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-01-10T08:30:00Z"}],
            "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "started": true,
                "image": "registry.example.com/payments/app:1.42.0",
                "imageID": "registry.example.com/payments/app@sha256:3b1f0c2d9e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c",
                "containerID": "containerd://9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0",
                "state": {"running": {"startedAt": "2026-01-10T08:30:03Z"}}}]
        }
    })
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let pods: usize = args.next().map_or(200_000, |a| a.parse().expect("PODS"));
    let eips: usize = args.next().map_or(20, |a| a.parse().expect("EGRESSIPS"));

    let base = LIVE.load(Ordering::Relaxed);
    let full: Vec<Pod> = (0..pods)
        .map(|i| serde_json::from_value(pod_json(i)).expect("pod"))
        .collect();
    let full_bytes = LIVE.load(Ordering::Relaxed) - base;
    drop(full);

    let base = LIVE.load(Ordering::Relaxed);
    let infos: Vec<PodInfo> = (0..pods)
        .filter_map(|i| {
            let p: Pod = serde_json::from_value(pod_json(i)).expect("pod");
            PodInfo::from_pod(&p)
        })
        .collect();
    let info_bytes = LIVE.load(Ordering::Relaxed) - base;

    let nodes: Vec<NodeInfo> = (0..NODES)
        .map(|n| {
            let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 18, 0, 10)) + n as u32);
            let node: Node = serde_json::from_value(json!({
                "metadata": {"name": format!("node-{n}"),
                    "labels": {facts::DEFAULT_ASSIGNABLE_LABEL: ""},
                    "annotations": {facts::SUBNETS_ANNOTATION: format!("[{{\"interface\":\"eth0\",\"address\":\"{addr}/16\"}}]")}},
                "status": {"addresses": [{"type": "InternalIP", "address": addr.to_string()}],
                    "conditions": [{"type": "Ready", "status": "True"}]}
            }))
            .expect("node");
            NodeInfo::from_node(&node).expect("named node")
        })
        .collect();
    let namespaces: BTreeMap<String, BTreeMap<String, String>> = (0..NAMESPACES)
        .map(|i| {
            let name = format!("ns-{i}");
            (
                name.clone(),
                BTreeMap::from([("kubernetes.io/metadata.name".to_string(), name)]),
            )
        })
        .collect();
    let egress_ips: Vec<EgressIP> = (0..eips)
        .map(|e| {
            let ips = [
                Ipv4Addr::new(172, 18, 128, (2 * e + 1) as u8),
                Ipv4Addr::new(172, 18, 128, (2 * e + 2) as u8),
            ];
            serde_json::from_value(json!({
                "apiVersion": "egress.example.dev/v1", "kind": "EgressIP",
                "metadata": {"name": format!("eip-{e}"), "creationTimestamp": "2026-01-01T00:00:00Z"},
                "spec": {"egressIPs": ips.map(|i| i.to_string()),
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": format!("ns-{e}")}},
                    "podSelector": {"matchLabels": {"app": "web"}}},
                "status": {"items": [], "ips": ips.iter().enumerate().map(|(k, ip)| json!({
                    "egressIP": ip.to_string(), "policyId": 2 * e + k + 1,
                    "node": format!("node-{}", (2 * e + k) % NODES), "conditions": []})).collect::<Vec<_>>()}
            }))
            .expect("EgressIP")
        })
        .collect();
    let claims: BTreeMap<Ipv4Addr, BTreeSet<String>> = egress_ips
        .iter()
        .flat_map(|e| e.status.as_ref().expect("status").ips.clone())
        .filter_map(|s| Some((s.egress_ip.parse().ok()?, BTreeSet::from([s.node?]))))
        .collect();
    let excluded = BTreeSet::new();
    let config = PlanConfig::default();

    // What the node loop does on every round: facts from the store, then
    // the projection.
    let rounds = 5;
    let mut remote = 0;
    let mut policies = 0;
    let (mut facts_time, mut project_time) = (Default::default(), Default::default());
    for _ in 0..rounds {
        let start = Instant::now();
        // A slim store hands the loop a copy of its PodInfos each round.
        let infos: Vec<PodInfo> = infos.clone();
        facts_time += start.elapsed();
        let start = Instant::now();
        let p = project::project(&ProjectInput {
            node_name: "node-0",
            node_addr: None,
            eips: &egress_ips,
            nodes: &nodes,
            namespaces: &namespaces,
            pods: &infos,
            claims: &claims,
            may_hold: true,
            global_excluded: &excluded,
            config: &config,
        });
        project_time += start.elapsed();
        remote = p.state.remote_pods.len();
        policies = p.state.policies.len();
    }
    let facts_time: std::time::Duration = facts_time;
    let project_time: std::time::Duration = project_time;

    println!(
        "pods: {pods} on {NODES} nodes in {NAMESPACES} namespaces; EgressIPs: {eips} (2 IPs each)"
    );
    println!(
        "Pod store, full objects:    {:8.1} MiB ({} bytes per pod)",
        mib(full_bytes),
        full_bytes / pods.max(1)
    );
    println!(
        "PodInfos (a slim store):    {:8.1} MiB ({} bytes per pod)",
        mib(info_bytes),
        info_bytes / pods.max(1)
    );
    println!("policies: {policies}; selected pods of other nodes known to node-0: {remote}");
    println!(
        "one node-loop round: copy of the PodInfos {:?} + projection {:?}",
        facts_time / rounds,
        project_time / rounds
    );
}
