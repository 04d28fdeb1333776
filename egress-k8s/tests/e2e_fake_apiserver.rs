//! kube-rs end to end against an in-test API server: two node agents, one
//! elected assigner. Create an EgressIP, see the status and events written,
//! see each node's desired state change, then fail a node over with fencing.

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

mod common;

use common::eventually;
use egress_fake_api::FakeApi;
use egress_k8s::{
    AgentLink, Desired, Options,
    facts::{DEFAULT_ASSIGNABLE_LABEL, EgressSubnet, SUBNETS_ANNOTATION},
};
use serde_json::{Value, json};

const NODES: &str = "/api/v1/nodes";
const NAMESPACES: &str = "/api/v1/namespaces";
const PODS: &str = "/api/v1/pods";
const EIPS: &str = "/apis/egress.example.dev/v1/egressips";
const LEASES: &str = "/apis/coordination.k8s.io/v1/leases";
const EVENTS: &str = "/apis/events.k8s.io/v1/events";

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn node(name: &str, addr: &str) -> Value {
    json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, DEFAULT_ASSIGNABLE_LABEL: ""}},
        "spec": {"podCIDR": "10.244.1.0/24"},
        "status": {
            "addresses": [{"type": "InternalIP", "address": addr}, {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                "lastHeartbeatTime": "2026-01-10T09:00:00Z", "lastTransitionTime": "2026-01-10T08:00:10Z"}]
        }
    })
}

fn pod(name: &str, node: &str, addr: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": "web"}},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}]},
        "status": {"phase": "Running", "podIP": addr, "podIPs": [{"ip": addr}]}
    })
}

fn options(addr: &str) -> Options {
    Options {
        global_excluded: BTreeSet::from(["10.244.0.0/16".parse().unwrap()]),
        ..common::unprobed_options(addr)
    }
}

/// Plays the agent: applies the claims at once and reports them held.
fn fake_agent(mut link: AgentLink) -> (tokio::sync::watch::Receiver<Option<Desired>>, AgentLink) {
    let seen = link.desired.clone();
    let mut desired = link.desired.clone();
    let held = link.held.clone();
    tokio::spawn(async move {
        while desired.changed().await.is_ok() {
            let claims: BTreeSet<Ipv4Addr> = desired
                .borrow()
                .as_ref()
                .map(|d| d.claims.iter().map(|c| c.ip).collect())
                .unwrap_or_default();
            held.send_replace(claims);
        }
    });
    link.desired = seen.clone();
    (seen, link)
}

fn condition<'a>(eip: &'a Value, ip_idx: usize, t: &str) -> &'a Value {
    eip["status"]["ips"][ip_idx]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == t))
        .unwrap_or(&Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egressip_lifecycle_against_a_fake_api_server() {
    let api = FakeApi::start().await;
    api.create(NODES, node("node1", "172.18.0.11"));
    api.create(NODES, node("node2", "172.18.0.12"));
    api.create(NAMESPACES, json!({"metadata": {"name": "shop", "labels": {"kubernetes.io/metadata.name": "shop", "team": "a"}}}));
    api.create(NAMESPACES, json!({"metadata": {"name": "egress-system", "labels": {"kubernetes.io/metadata.name": "egress-system"}}}));
    api.create(PODS, pod("web-1", "node1", "10.244.1.4"));
    api.create(PODS, pod("web-2", "node2", "10.244.2.4"));

    let mut agents = Vec::new();
    let mut views = Vec::new();
    for (name, addr) in [("node1", "172.18.0.11"), ("node2", "172.18.0.12")] {
        let (ctl, agent) = egress_k8s::link();
        let (view, agent) = fake_agent(agent);
        let client = api.client();
        let task = tokio::spawn(egress_k8s::run(
            client,
            name.to_string(),
            options(addr),
            ctl,
        ));
        agents.push((agent, task));
        views.push(view);
    }

    // Synced: an empty desired state, and the subnets published on the Node.
    for v in &views {
        let v = v.clone();
        eventually("initial desired state", || v.borrow().clone()).await;
    }
    for n in ["node1", "node2"] {
        eventually("subnets published", || {
            api.get(NODES, None, n)?["metadata"]["annotations"][SUBNETS_ANNOTATION]
                .as_str()
                .map(|_| ())
        })
        .await;
    }
    let n1 = api.get(NODES, None, "node1").unwrap();
    assert_eq!(
        n1["metadata"]["annotations"][SUBNETS_ANNOTATION],
        r#"[{"interface":"eth0","address":"172.18.0.11/16"}]"#
    );
    // An address added later (the agent reports it) is republished.
    let grown = vec![
        EgressSubnet {
            interface: "eth0".into(),
            address: "172.18.0.11/16".parse().unwrap(),
        },
        EgressSubnet {
            interface: "eth1".into(),
            address: "10.0.5.11/24".parse().unwrap(),
        },
    ];
    agents[0].0.subnets.send_replace(Some(grown));
    eventually("subnets republished", || {
        let n1 = api.get(NODES, None, "node1")?;
        n1["metadata"]["annotations"][SUBNETS_ANNOTATION]
            .as_str()?
            .contains("10.0.5.11/24")
            .then_some(())
    })
    .await;
    assert!(
        views[0]
            .borrow()
            .as_ref()
            .unwrap()
            .state
            .policies
            .is_empty()
    );

    // Create the EgressIP.
    api.patch(
        NODES,
        None,
        "node1",
        json!({"metadata": {"labels": {"egress": "yes"}}}),
    );
    api.create(EIPS, json!({
        "metadata": {"name": "team-a"},
        "spec": {"egressIPs": ["172.18.0.100"], "namespaceSelector": {"matchLabels": {"team": "a"}},
                 "podSelector": {"matchLabels": {"app": "web"}},
                 // Only node1 at first: watches are separate streams, so the
                 // assigner may not have seen node2's subnets yet, or may
                 // have; this keeps the first placement deterministic.
                 "nodeSelector": {"matchLabels": {"egress": "yes"}}}
    }));

    // The assigner writes status: node1, policy id 1; node1 claims it, and the status says so.
    let eip = eventually("status Announced", || {
        let e = api.get(EIPS, None, "team-a")?;
        (condition(&e, 0, "Announced")["status"] == "True").then_some(e)
    })
    .await;
    assert_eq!(
        eip["status"]["items"],
        json!([{"node": "node1", "egressIP": "172.18.0.100"}])
    );
    assert_eq!(eip["status"]["ips"][0]["policyId"], 1);
    assert_eq!(condition(&eip, 0, "Assigned")["reason"], "Assigned");
    assert_eq!(eip["status"]["observedGeneration"], 1);

    let lease = api
        .get(LEASES, Some("egress-system"), "egress-claims-node1")
        .unwrap();
    assert_eq!(
        lease["metadata"]["annotations"]["egress.example.dev/claimed-ips"],
        "172.18.0.100"
    );
    let leader = api
        .get(LEASES, Some("egress-system"), "egress-assigner")
        .unwrap();
    assert!(["node1", "node2"].contains(&leader["spec"]["holderIdentity"].as_str().unwrap()));

    // Events: Assigned, on the EgressIP.
    let ev = eventually("Assigned event", || {
        api.list(EVENTS)
            .into_iter()
            .find(|e| e["reason"] == "Assigned")
    })
    .await;
    assert_eq!(ev["regarding"]["name"], "team-a");
    assert_eq!(ev["regarding"]["kind"], "EgressIP");
    assert_eq!(ev["type"], "Normal");
    assert!(
        ev["note"]
            .as_str()
            .unwrap()
            .contains("172.18.0.100 assigned to node node1")
    );

    // Desired states: node1 holds it and maps its pod; node2 steers its pod to node1.
    let d1 = eventually("node1 holds", || {
        views[0]
            .borrow()
            .clone()
            .filter(|d| !d.claims.is_empty() && !d.state.pods.is_empty())
    })
    .await;
    assert_eq!(d1.claims[0].ip, ip("172.18.0.100"));
    assert_eq!(d1.state.policies[&1].egress_node, Some(ip("172.18.0.11")));
    assert_eq!(d1.state.pods.get(&ip("10.244.1.4")), Some(&1));
    assert!(
        d1.state
            .global_excluded
            .contains(&"10.244.0.0/16".parse().unwrap())
    );
    let d2 = eventually("node2 steers", || {
        views[1].borrow().clone().filter(|d| {
            d.state
                .policies
                .get(&1)
                .is_some_and(|p| p.egress_node.is_some())
        })
    })
    .await;
    assert_eq!(d2.state.policies[&1].egress_node, Some(ip("172.18.0.11")));
    assert_eq!(d2.state.pods.get(&ip("10.244.2.4")), Some(&1));
    assert!(d2.claims.is_empty());

    // Namespace relabel: pods are no longer selected anywhere.
    api.patch(
        NAMESPACES,
        None,
        "shop",
        json!({"metadata": {"labels": {"team": "b"}}}),
    );
    eventually("pods unselected", || {
        views[0]
            .borrow()
            .as_ref()
            .is_some_and(|d| d.state.pods.is_empty())
            .then_some(())
    })
    .await;
    api.patch(
        NAMESPACES,
        None,
        "shop",
        json!({"metadata": {"labels": {"team": "a"}}}),
    );
    eventually("pods selected again", || {
        views[0]
            .borrow()
            .as_ref()
            .is_some_and(|d| !d.state.pods.is_empty())
            .then_some(())
    })
    .await;

    // node2 becomes eligible too: nothing moves (sticky).
    api.patch(
        NODES,
        None,
        "node2",
        json!({"metadata": {"labels": {"egress": "yes"}}}),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        api.get(EIPS, None, "team-a").unwrap()["status"]["ips"][0]["node"],
        "node1"
    );

    // node1 is cordoned: the assigner moves the IP, node1 releases it, and
    // node2 claims it only then.
    api.patch(
        NODES,
        None,
        "node1",
        json!({"spec": {"unschedulable": true}}),
    );
    let eip = eventually("moved and announced by node2", || {
        let e = api.get(EIPS, None, "team-a")?;
        (e["status"]["ips"][0]["node"] == "node2"
            && condition(&e, 0, "Announced")["status"] == "True")
            .then_some(e)
    })
    .await;
    assert_eq!(
        eip["status"]["ips"][0]["policyId"], 1,
        "the policy id survives the move"
    );
    let d2 = eventually("node2 holds", || {
        views[1].borrow().clone().filter(|d| !d.claims.is_empty())
    })
    .await;
    assert_eq!(d2.state.policies[&1].egress_node, Some(ip("172.18.0.12")));
    let d1 = views[0].borrow().clone().unwrap();
    assert!(d1.claims.is_empty());
    let l1 = api
        .get(LEASES, Some("egress-system"), "egress-claims-node1")
        .unwrap();
    assert_eq!(
        l1["metadata"]["annotations"]["egress.example.dev/claimed-ips"],
        ""
    );
    eventually("Moved event", || {
        api.list(EVENTS).into_iter().find(|e| {
            e["reason"] == "Moved"
                && e["note"]
                    .as_str()
                    .unwrap()
                    .contains("moved from node node1 to node node2")
        })
    })
    .await;

    // An invalid EgressIP: rejected with a condition, nothing applied.
    api.create(
        EIPS,
        json!({
            "metadata": {"name": "typo"},
            "spec": {"egressIPs": ["172.18.0.12", "172.18.0.300"], "namespaceSelector": {}}
        }),
    );
    let bad = eventually("typo status", || {
        let e = api.get(EIPS, None, "typo")?;
        e["status"]["ips"]
            .as_array()
            .is_some_and(|a| a.len() == 2)
            .then_some(e)
    })
    .await;
    assert_eq!(condition(&bad, 0, "Conflict")["reason"], "NodeAddress");
    assert_eq!(condition(&bad, 1, "Invalid")["reason"], "MalformedIP");
    assert_eq!(bad["status"]["items"], json!([]));
    eventually("warning event", || {
        api.list(EVENTS)
            .into_iter()
            .find(|e| e["reason"] == "NodeAddress" && e["type"] == "Warning")
    })
    .await;
    assert_eq!(views[1].borrow().as_ref().unwrap().state.policies.len(), 1);

    // node1 is back: no failback.
    api.patch(
        NODES,
        None,
        "node1",
        json!({"spec": {"unschedulable": null}}),
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        api.get(EIPS, None, "team-a").unwrap()["status"]["ips"][0]["node"],
        "node2"
    );

    // node2 is about to be deleted (the autoscaler's taint, which placement
    // alone ignores) and its agent stops: it marks itself draining, the
    // assigner moves the IP to node1, node2 releases it, node1 claims it,
    // and node2's run returns.
    api.patch(
        NODES,
        None,
        "node2",
        json!({"spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}]}}),
    );
    let (agent2, task2) = agents.pop().unwrap();
    agent2.shutdown.send_replace(true);
    let returned = tokio::time::timeout(Duration::from_secs(15), task2).await;
    assert!(matches!(returned, Ok(Ok(Ok(())))), "{returned:?}");
    let d1 = eventually("node1 holds again", || {
        views[0].borrow().clone().filter(|d| !d.claims.is_empty())
    })
    .await;
    assert_eq!(d1.state.policies[&1].egress_node, Some(ip("172.18.0.11")));

    // Fencing, checked over the whole run: at no point did two nodes' claims
    // name the same IP.
    let mut claims: std::collections::BTreeMap<String, String> = Default::default();
    let mut handovers = 0;
    for ev in api.history().iter().filter(|e| e.collection == LEASES) {
        let o = &ev.object;
        let Some(c) = o["metadata"]["annotations"]["egress.example.dev/claimed-ips"].as_str()
        else {
            continue;
        };
        let holder = o["spec"]["holderIdentity"].as_str().unwrap().to_string();
        if claims.get(&holder).map(String::as_str) != Some(c) && !c.is_empty() {
            handovers += 1;
        }
        claims.insert(holder, c.to_string());
        let holders: Vec<&String> = claims
            .iter()
            .filter(|(_, v)| v.contains("172.18.0.100"))
            .map(|(k, _)| k)
            .collect();
        assert!(
            holders.len() <= 1,
            "two nodes claimed 172.18.0.100 at rv {}: {holders:?}",
            ev.rv
        );
    }
    assert_eq!(handovers, 3, "claimed by node1, node2, then node1 again");

    for (agent, task) in agents {
        drop(agent);
        task.abort();
    }
}
