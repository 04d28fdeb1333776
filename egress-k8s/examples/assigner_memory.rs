//! `cargo xtask assigner-memory [--pods N]`: what the assigner's pod watch
//! keeps in memory at N pods, with full Pod objects (the reflector the
//! controller used before) and with the slim [`PodStore`].
//!
//! This process serves N realistic Pod objects (as a Deployment's pods look
//! in `kubectl get pod -o json`: managed fields, owner reference, a
//! container with env, ports, probes and mounts, volumes, tolerations,
//! conditions and container statuses) from egress-fake-api, then runs each
//! variant in a fresh child process, which reports, once its store has
//! synced and the assigner's per-round `PodInfo` list is built:
//! - the live heap it allocated since before the watch started (a counting
//!   allocator: what the store retains), and
//! - its resident set size before and after (includes allocator slack and
//!   the transient peak of parsing the list).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use egress_fake_api::FakeApi;
use egress_k8s::{facts::PodInfo, pods::PodStore};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::{Value, json};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: delegates to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn pod(i: usize) -> Value {
    let ns = format!("team-{}", i % 200);
    let app = format!("svc-{}", i % 1000);
    let name = format!("{app}-7d9f8c6b5d-{i:05x}");
    let node = format!("worker-{}", i % 100);
    let ip = format!("10.{}.{}.{}", 64 + i / 65536, (i / 256) % 256, i % 256);
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": ns, "uid": format!("6f1c2a8e-0000-4000-8000-{i:012}"),
            "generateName": format!("{app}-7d9f8c6b5d-"),
            "creationTimestamp": "2026-11-02T08:30:00Z",
            "labels": {"app": app, "pod-template-hash": "7d9f8c6b5d", "team": ns, "tier": "backend",
                       "app.kubernetes.io/name": app, "app.kubernetes.io/version": "1.42.0"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-02T08:29:58Z",
                            "prometheus.io/scrape": "true", "prometheus.io/port": "9090"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-7d9f8c6b5d"),
                                 "uid": "0d7c7f5e-1111-4222-8333-444455556666", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [
                {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "time": "2026-11-02T08:30:00Z",
                 "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {}, "f:pod-template-hash": {}},
                   "f:ownerReferences": {".": {}, "k:{\"uid\":\"0d7c7f5e-1111-4222-8333-444455556666\"}": {}}},
                   "f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {".": {}, "f:env": {}, "f:image": {}, "f:imagePullPolicy": {},
                     "f:livenessProbe": {}, "f:name": {}, "f:ports": {}, "f:readinessProbe": {}, "f:resources": {}, "f:volumeMounts": {}}},
                     "f:dnsPolicy": {}, "f:enableServiceLinks": {}, "f:restartPolicy": {}, "f:schedulerName": {}, "f:securityContext": {},
                     "f:terminationGracePeriodSeconds": {}, "f:volumes": {}}}},
                {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": "2026-11-02T08:30:05Z", "subresource": "status",
                 "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {}, "f:hostIP": {},
                   "f:hostIPs": {}, "f:phase": {}, "f:podIP": {}, "f:podIPs": {}, "f:startTime": {}}}}
            ]
        },
        "spec": {
            "nodeName": node,
            "containers": [{
                "name": "app", "image": format!("registry.example.com/{app}:1.42.0"), "imagePullPolicy": "IfNotPresent",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}, {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
                "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "DB_HOST", "value": "db.example.internal"},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP"}, "periodSeconds": 10,
                                  "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"}, "periodSeconds": 5,
                                   "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
                "volumeMounts": [{"name": "config", "mountPath": "/etc/app", "readOnly": true},
                                 {"name": "kube-api-access-x7k2p", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
                "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File"
            }],
            "volumes": [{"name": "config", "configMap": {"name": format!("{app}-config"), "defaultMode": 420}},
                        {"name": "kube-api-access-x7k2p", "projected": {"defaultMode": 420, "sources": [
                            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}}],
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default", "serviceAccount": "default", "securityContext": {},
            "schedulerName": "default-scheduler", "priority": 0, "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": {
            "phase": "Running", "hostIP": "172.18.0.11", "hostIPs": [{"ip": "172.18.0.11"}],
            "podIP": ip, "podIPs": [{"ip": ip}], "startTime": "2026-11-02T08:30:01Z", "qosClass": "Burstable",
            "conditions": [
                {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": "2026-11-02T08:30:03Z"},
                {"type": "Initialized", "status": "True", "lastTransitionTime": "2026-11-02T08:30:01Z"},
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-02T08:30:05Z"},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-11-02T08:30:05Z"},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-11-02T08:30:00Z"}],
            "containerStatuses": [{"name": "app", "ready": true, "started": true, "restartCount": 0,
                "image": format!("registry.example.com/{app}:1.42.0"),
                "imageID": "registry.example.com/app@sha256:4c1e9f0d2b3a5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d",
                "containerID": format!("containerd://{i:064x}"),
                "state": {"running": {"startedAt": "2026-11-02T08:30:04Z"}}, "lastState": {}}]
        }
    })
}

/// One variant, in this (fresh) process.
async fn measure(variant: &str, server: &str) {
    let config = kube::Config::new(server.parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let (rss_before, heap_before) = (rss_kib(), LIVE.load(Ordering::Relaxed));
    let started = Instant::now();
    let notify = Arc::new(tokio::sync::Notify::new());
    let (count, infos, keep): (usize, Vec<PodInfo>, Box<dyn std::any::Any>) = match variant {
        "full" => {
            // The controller's reflector of Pod objects before pods.rs.
            let (reader, writer) = reflector::store::<Pod>();
            let stream = reflector(
                writer,
                watcher(kube::Api::<Pod>::all(client), watcher::Config::default())
                    .default_backoff(),
            );
            let task = tokio::spawn(futures::StreamExt::for_each(stream, |_| async {}));
            reader.wait_until_ready().await.unwrap();
            let infos: Vec<PodInfo> = reader
                .state()
                .iter()
                .filter_map(|p| PodInfo::from_pod(p))
                .collect();
            (reader.state().len(), infos, Box::new((reader, task)))
        }
        _ => {
            let store = PodStore::watch(client, watcher::Config::default(), notify);
            store.ready().await;
            let infos = store.snapshot();
            (store.len(), infos, Box::new(store))
        }
    };
    let synced = started.elapsed();
    // What stays: the store. The assigner rebuilds its PodInfo list every
    // round and drops it.
    let selected = infos.len();
    drop(infos);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let heap = LIVE.load(Ordering::Relaxed).saturating_sub(heap_before);
    println!(
        "{}",
        json!({"variant": variant, "pods": count, "selected_facts": selected,
               "heap_bytes": heap, "rss_before_kib": rss_before, "rss_after_kib": rss_kib(),
               "sync_ms": synced.as_millis() as u64})
    );
    drop(keep);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if let (Some(variant), Some(server)) = (arg("--measure"), arg("--server")) {
        rt.block_on(measure(&variant, &server));
        return;
    }
    let n: usize = arg("--pods").map_or(20_000, |n| n.parse().expect("--pods N"));
    rt.block_on(async {
        let api = FakeApi::start().await;
        let bytes: usize = (0..n)
            .map(|i| {
                let p = pod(i);
                let len = p.to_string().len();
                api.create("/api/v1/pods", p);
                len
            })
            .sum();
        println!(
            "{n} pods served by egress-fake-api, {} bytes of JSON each on average",
            bytes / n.max(1)
        );
        let server = format!("http://{}", api.addr);
        let mut rows = Vec::new();
        for variant in ["full", "slim"] {
            let exe = std::env::current_exe().unwrap();
            let server = server.clone();
            let out = tokio::task::spawn_blocking(move || {
                Command::new(exe)
                    .args(["--measure", variant, "--server", &server])
                    .output()
                    .unwrap()
            })
            .await
            .unwrap();
            assert!(
                out.status.success(),
                "{variant}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let line = String::from_utf8(out.stdout).unwrap();
            let v: Value = serde_json::from_str(line.trim()).unwrap();
            assert_eq!(v["pods"].as_u64(), Some(n as u64), "{v}");
            rows.push(v);
        }
        println!(
            "store                      pods  retained heap  per pod  RSS before -> after  sync"
        );
        for v in &rows {
            let heap = v["heap_bytes"].as_u64().unwrap();
            println!(
                "{:<24} {:>6}  {:>10.1} MiB  {:>5} B  {:>6.1} -> {:>6.1} MiB  {:>5} ms",
                if v["variant"] == "full" {
                    "full Pod objects (before)"
                } else {
                    "PodInfo (pods.rs)"
                },
                v["pods"],
                heap as f64 / 1048576.0,
                heap / n.max(1) as u64,
                v["rss_before_kib"].as_u64().unwrap() as f64 / 1024.0,
                v["rss_after_kib"].as_u64().unwrap() as f64 / 1024.0,
                v["sync_ms"]
            );
        }
    });
}
