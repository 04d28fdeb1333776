//! kube-rs end to end against the in-test API server: bad objects and bad
//! states stay contained.
//! - An EgressIP that does not deserialize, present from the first list on,
//!   does not keep the watches from syncing: the good EgressIPs are assigned
//!   and programmed, the bad one gets an `Invalid` condition and a Warning
//!   Event.
//! - A node that fails to program a policy reports it: the IP's `Applied`
//!   condition names the node and the error.
//! - Policy ids stay within `max_policies`, and a released id is not reused
//!   while a node still holds it; `NoPolicyId` says why an IP has none.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Duration,
};

use egress_fake_api::FakeApi;
use egress_k8s::{
    AgentLink, Desired, Options, facts::DEFAULT_ASSIGNABLE_LABEL, report::DatapathReport,
};
use serde_json::{Value, json};

const NODES: &str = "/api/v1/nodes";
const NAMESPACES: &str = "/api/v1/namespaces";
const PODS: &str = "/api/v1/pods";
const EIPS: &str = "/apis/egress.example.dev/v1/egressips";
const EVENTS: &str = "/apis/events.k8s.io/v1/events";

fn node(name: &str, addr: &str) -> Value {
    json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, DEFAULT_ASSIGNABLE_LABEL: ""}},
        "status": {
            "addresses": [{"type": "InternalIP", "address": addr}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                "lastHeartbeatTime": "2026-01-10T09:00:00Z", "lastTransitionTime": "2026-01-10T08:00:10Z"}]
        }
    })
}

fn options(addr: &str, max_policies: u32) -> Options {
    let mut o = common::unprobed_options(addr);
    o.plan.max_policies = max_policies;
    o
}

/// What a fake agent reports after "applying": by default every desired
/// policy present, none failed; a test may override it.
type Reporter = Arc<Mutex<Option<DatapathReport>>>;

/// Plays the agent: holds the claimed IPs at once and reports its datapath.
fn fake_agent(link: &AgentLink, fixed: Reporter) -> tokio::sync::watch::Receiver<Option<Desired>> {
    let seen = link.desired.clone();
    let mut desired = link.desired.clone();
    let held = link.held.clone();
    let applied = link.applied.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                r = desired.changed() => if r.is_err() { return },
                _ = tick.tick() => {}
            }
            let Some(d) = desired.borrow().clone() else {
                continue;
            };
            held.send_replace(d.claims.iter().map(|c| c.ip).collect());
            let report = fixed
                .lock()
                .unwrap()
                .clone()
                .unwrap_or_else(|| DatapathReport {
                    present: d.state.policies.keys().copied().collect(),
                    failed: BTreeMap::new(),
                });
            applied.send_if_modified(|cur| {
                let changed = cur.as_ref() != Some(&report);
                *cur = Some(report);
                changed
            });
        }
    });
    seen
}

async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ip_condition<'a>(eip: &'a Value, i: usize, t: &str) -> &'a Value {
    eip["status"]["ips"][i]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == t))
        .unwrap_or(&Value::Null)
}

struct Cluster {
    api: FakeApi,
    agents: Vec<AgentLink>,
    views: Vec<tokio::sync::watch::Receiver<Option<Desired>>>,
    reporters: Vec<Reporter>,
    _tasks: Vec<tokio::task::JoinHandle<Result<(), egress_k8s::Error>>>,
}

fn cluster_objects(api: &FakeApi) {
    api.create(NODES, node("node1", "172.18.0.11"));
    api.create(NODES, node("node2", "172.18.0.12"));
    api.create(
        NAMESPACES,
        json!({"metadata": {"name": "shop", "labels": {"team": "a"}}}),
    );
    api.create(PODS, json!({
        "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {"nodeName": "node1", "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}]},
        "status": {"phase": "Running", "podIP": "10.244.1.4", "podIPs": [{"ip": "10.244.1.4"}]}
    }));
}

fn start(api: FakeApi, max_policies: u32) -> Cluster {
    let mut c = Cluster {
        api,
        agents: Vec::new(),
        views: Vec::new(),
        reporters: Vec::new(),
        _tasks: Vec::new(),
    };
    for (name, addr) in [("node1", "172.18.0.11"), ("node2", "172.18.0.12")] {
        let (ctl, agent) = egress_k8s::link();
        let reporter: Reporter = Arc::default();
        c.views.push(fake_agent(&agent, reporter.clone()));
        c.reporters.push(reporter);
        c._tasks.push(tokio::spawn(egress_k8s::run(
            c.api.client(),
            name.to_string(),
            options(addr, max_policies),
            ctl,
        )));
        c.agents.push(agent);
    }
    c
}

fn eip(name: &str, ips: &[&str]) -> Value {
    json!({"metadata": {"name": name},
           "spec": {"egressIPs": ips, "namespaceSelector": {"matchLabels": {"team": "a"}}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_egressip_does_not_keep_the_others_from_syncing() {
    let api = FakeApi::start().await;
    cluster_objects(&api);
    // Present from the first list on, as after a CRD without our schema or
    // an upgrade that tightened a field: a typed list would fail whole.
    api.create(
        EIPS,
        json!({"metadata": {"name": "broken"},
        "spec": {"egressIPs": "172.18.0.99", "namespaceSelector": {}}}),
    );
    api.create(EIPS, eip("team-a", &["172.18.0.100"]));
    // What a typed kube-rs watch would do with this list: fail it whole.
    let typed: kube::Api<egress_k8s::crd::EgressIP> = kube::Api::all(api.client());
    let err = typed.list(&Default::default()).await.unwrap_err();
    assert!(err.to_string().contains("invalid type"), "{err}");
    let c = start(api, 4096);

    // The good one is assigned, claimed and in the nodes' desired state.
    let good = eventually("team-a announced", || {
        let e = c.api.get(EIPS, None, "team-a")?;
        (ip_condition(&e, 0, "Announced")["status"] == "True").then_some(e)
    })
    .await;
    let id = good["status"]["ips"][0]["policyId"].as_u64().unwrap() as u32;
    for view in &c.views {
        let view = view.clone();
        eventually("policy programmed on every node", || {
            view.borrow()
                .as_ref()?
                .state
                .policies
                .get(&id)
                .filter(|p| p.egress_ip == "172.18.0.100".parse::<Ipv4Addr>().unwrap())
                .map(drop)
        })
        .await;
    }
    let pods = c.views[0].borrow().as_ref().unwrap().state.pods.clone();
    assert_eq!(pods.get(&"10.244.1.4".parse().unwrap()), Some(&id));

    // The bad one: Invalid, with the field at fault, and nothing assigned.
    let broken = eventually("broken marked invalid", || {
        let e = c.api.get(EIPS, None, "broken")?;
        e["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Invalid" && c["status"] == "True")
            .then_some(e)
    })
    .await;
    let cond = &broken["status"]["conditions"][0];
    assert_eq!(cond["reason"], "Malformed");
    assert!(
        cond["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.egressIPs: "),
        "{cond}"
    );
    assert_eq!(broken["status"]["items"], json!([]));
    let ev = eventually("Malformed warning event", || {
        c.api
            .list(EVENTS)
            .into_iter()
            .find(|e| e["reason"] == "Malformed")
    })
    .await;
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["regarding"]["name"], "broken");
    assert_eq!(ev["regarding"]["kind"], "EgressIP");

    // A fix is picked up like any change.
    c.api.patch(
        EIPS,
        None,
        "broken",
        json!({"spec": {"egressIPs": ["172.18.0.99"], "namespaceSelector": {"matchLabels": {"team": "b"}}}}),
    );
    eventually("fixed object assigned", || {
        let e = c.api.get(EIPS, None, "broken")?;
        (ip_condition(&e, 0, "Assigned")["status"] == "True").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_failures_are_reported_and_released_ids_wait_for_every_node() {
    let api = FakeApi::start().await;
    cluster_objects(&api);
    // max_policies = 3: ids 1 and 2 only.
    let c = start(api, 3);
    for v in &c.views {
        let v = v.clone();
        eventually("synced", || v.borrow().clone()).await;
    }
    c.api.create(EIPS, eip("team-a", &["172.18.0.100"]));
    let a = eventually("team-a has an id", || {
        let e = c.api.get(EIPS, None, "team-a")?;
        e["status"]["ips"][0]["policyId"].as_u64().map(|_| e)
    })
    .await;
    assert_eq!(a["status"]["ips"][0]["policyId"], 1);

    // node2's datapath refuses policy 1.
    *c.reporters[1].lock().unwrap() = Some(DatapathReport {
        present: BTreeSet::new(),
        failed: BTreeMap::from([(
            1,
            "map policies_v4: the index is 1 but `max_entries` is 1".into(),
        )]),
    });
    let failed = eventually("Applied=False naming node2", || {
        let e = c.api.get(EIPS, None, "team-a")?;
        let cond = ip_condition(&e, 0, "Applied");
        (cond["status"] == "False").then(|| cond.clone())
    })
    .await;
    assert_eq!(failed["reason"], "ApplyFailed");
    let message = failed["message"].as_str().unwrap();
    assert!(message.contains("node node2: map policies_v4"), "{message}");
    eventually("ApplyFailed warning event", || {
        c.api
            .list(EVENTS)
            .into_iter()
            .find(|e| e["reason"] == "ApplyFailed" && e["type"] == "Warning")
    })
    .await;

    // node2 applies it after all; then team-a goes away, but node2 has not
    // applied the release yet: its datapath still holds 1.
    *c.reporters[1].lock().unwrap() = Some(DatapathReport {
        present: BTreeSet::from([1]),
        failed: BTreeMap::new(),
    });
    eventually("Applied=True", || {
        let e = c.api.get(EIPS, None, "team-a")?;
        (ip_condition(&e, 0, "Applied")["status"] == "True").then_some(())
    })
    .await;
    c.api.delete(EIPS, None, "team-a");
    c.api.create(EIPS, eip("team-b", &["172.18.0.101"]));
    let b = eventually("team-b has an id", || {
        let e = c.api.get(EIPS, None, "team-b")?;
        e["status"]["ips"][0]["policyId"].as_u64().map(|_| e)
    })
    .await;
    assert_eq!(b["status"]["ips"][0]["policyId"], 2, "1 is in quarantine");

    // The space is exhausted: team-c waits, and says why.
    c.api.create(EIPS, eip("team-c", &["172.18.0.102"]));
    let waiting = eventually("team-c NoPolicyId", || {
        let e = c.api.get(EIPS, None, "team-c")?;
        let cond = ip_condition(&e, 0, "Assigned");
        (cond["reason"] == "NoPolicyId").then(|| e.clone())
    })
    .await;
    let message = ip_condition(&waiting, 0, "Assigned")["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("max_policies = 3"), "{message}");
    assert!(
        message.contains("still held by some node's datapath: 1"),
        "{message}"
    );
    assert!(waiting["status"]["ips"][0]["node"].is_null());
    // Whatever the nodes do meanwhile, id 1 is not handed out.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(c.api.get(EIPS, None, "team-c").unwrap()["status"]["ips"][0]["policyId"].is_null());

    // node2 applies the release: 1 is free, and team-c gets it.
    *c.reporters[1].lock().unwrap() = None;
    let got = eventually("team-c gets id 1", || {
        let e = c.api.get(EIPS, None, "team-c")?;
        e["status"]["ips"][0]["policyId"].as_u64()
    })
    .await;
    assert_eq!(got, 1);
    // Node reports travel in the claims Leases.
    let lease = c
        .api
        .get(
            "/apis/coordination.k8s.io/v1/leases",
            Some("egress-system"),
            "egress-claims-node2",
        )
        .unwrap();
    assert!(lease["metadata"]["annotations"][egress_k8s::report::PRESENT_ANNOTATION].is_string());
    drop(c.agents);
}
