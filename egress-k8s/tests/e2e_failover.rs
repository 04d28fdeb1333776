//! Failover end to end against the in-test API server, with real heartbeats
//! on loopback: the egress node's agent dies without releasing anything; the
//! assigner notices through missed heartbeats and moves the IP; the new node
//! claims it only once the dead node's claim has expired.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use egress_fake_api::FakeApi;
use egress_k8s::{
    Options,
    facts::{DEFAULT_ASSIGNABLE_LABEL, EgressSubnet},
    heartbeat::HeartbeatConfig,
};
use serde_json::{Value, json};

const NODES: &str = "/api/v1/nodes";
const NAMESPACES: &str = "/api/v1/namespaces";
const PODS: &str = "/api/v1/pods";
const EIPS: &str = "/apis/egress.example.dev/v1/egressips";
const LEASES: &str = "/apis/coordination.k8s.io/v1/leases";

const CLAIM_TTL: Duration = Duration::from_secs(2);

/// Node addresses on loopback so that heartbeats really flow; the egress
/// subnet is published separately.
fn node(name: &str, addr: &str) -> Value {
    json!({
        "metadata": {"name": name, "labels": {DEFAULT_ASSIGNABLE_LABEL: ""}},
        "status": {
            "addresses": [{"type": "InternalIP", "address": addr}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                "lastHeartbeatTime": "2026-01-10T09:00:00Z", "lastTransitionTime": "2026-01-10T08:00:10Z"}]
        }
    })
}

fn options(addr: Ipv4Addr, port: u16, subnet: &str, assigner: bool) -> Options {
    Options {
        subnets: vec![EgressSubnet {
            interface: "eth0".into(),
            address: subnet.parse().unwrap(),
        }],
        claim_ttl: CLAIM_TTL,
        claim_renew: Duration::from_millis(400),
        assigner,
        leader_ttl: Duration::from_secs(2),
        leader_renew: Duration::from_millis(200),
        heartbeat: Some(HeartbeatConfig {
            bind: IpAddr::V4(addr),
            port,
            interval: Duration::from_millis(200),
            timeout: Duration::from_millis(1000),
        }),
        ..Options::default()
    }
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
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_egress_node_is_detected_and_its_ip_moves_after_its_claim_expires() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("egress_k8s=debug")
        .with_test_writer()
        .try_init();
    let api = FakeApi::start().await;
    let (a1, a2) = (Ipv4Addr::new(127, 0, 0, 11), Ipv4Addr::new(127, 0, 0, 12));
    // A free UDP port, shared by both responders on their own addresses.
    let port = std::net::UdpSocket::bind("127.0.0.11:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    api.create(NODES, node("node1", "127.0.0.11"));
    api.create(NODES, node("node2", "127.0.0.12"));
    api.create(
        NAMESPACES,
        json!({"metadata": {"name": "shop", "labels": {"team": "a"}}}),
    );
    api.create(PODS, json!({
        "metadata": {"name": "web-2", "namespace": "shop"},
        "spec": {"nodeName": "node2", "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}]},
        "status": {"phase": "Running", "podIP": "10.244.2.4", "podIPs": [{"ip": "10.244.2.4"}]}
    }));

    // node2 runs the assigner; node1 is only a candidate egress node.
    let start = |name: &str, addr, subnet, assigner| {
        let (ctl, agent) = egress_k8s::link();
        let task = tokio::spawn(egress_k8s::run(
            api.client(),
            name.to_string(),
            options(addr, port, subnet, assigner),
            ctl,
        ));
        let mut desired = agent.desired.clone();
        let held = agent.held.clone();
        // The agent applies claims at once.
        tokio::spawn(async move {
            while desired.changed().await.is_ok() {
                let ips = desired
                    .borrow()
                    .as_ref()
                    .map(|d| d.claims.iter().map(|c| c.ip).collect())
                    .unwrap_or_default();
                held.send_replace(ips);
            }
        });
        (agent, task)
    };
    let (agent2, _task2) = start("node2", a2, "172.18.0.12/16", true);
    let (agent1, task1) = start("node1", a1, "172.18.0.11/16", false);

    // Both agents synced and node1's subnets published before the EgressIP
    // exists, so that the first placement is deterministic (node1, by name).
    for agent in [&agent1, &agent2] {
        let desired = agent.desired.clone();
        eventually("synced", || desired.borrow().as_ref().map(|_| ())).await;
    }
    for n in ["node1", "node2"] {
        eventually("subnets published", || {
            api.get(NODES, None, n)?["metadata"]["annotations"]["egress.example.dev/egress-subnets"]
                .as_str()
                .map(|_| ())
        })
        .await;
    }
    // Watches are separate streams, so the assigner may see the EgressIP
    // before node1's subnets: only node1 matches the nodeSelector at first,
    // which makes the first placement deterministic either way.
    api.patch(
        NODES,
        None,
        "node1",
        json!({"metadata": {"labels": {"egress": "yes"}}}),
    );
    api.create(EIPS, json!({
        "metadata": {"name": "team-a"},
        "spec": {"egressIPs": ["172.18.0.100"], "namespaceSelector": {"matchLabels": {"team": "a"}},
                 "nodeSelector": {"matchLabels": {"egress": "yes"}}}
    }));
    eventually("node1 holds", || {
        agent1
            .desired
            .borrow()
            .as_ref()
            .filter(|d| !d.claims.is_empty())
            .map(|_| ())
    })
    .await;
    eventually("status announced by node1", || {
        let e = api.get(EIPS, None, "team-a")?;
        (e["status"]["ips"][0]["node"] == "node1"
            && e["status"]["ips"][0]["conditions"]
                .as_array()?
                .iter()
                .any(|c| c["type"] == "Announced" && c["status"] == "True"))
        .then_some(())
    })
    .await;
    // node2 becomes eligible too (relabel): nothing moves, assignments are sticky.
    api.patch(
        NODES,
        None,
        "node2",
        json!({"metadata": {"labels": {"egress": "yes"}}}),
    );
    // Healthy for a while: heartbeats keep node1 up, nothing moves.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        api.get(EIPS, None, "team-a").unwrap()["status"]["ips"][0]["node"],
        "node1"
    );

    // node1's agent dies: no release, no more renewals or heartbeats.
    task1.abort();
    let killed = Instant::now();
    drop(agent1);

    let moved = eventually("status moved to node2", || {
        let e = api.get(EIPS, None, "team-a")?;
        (e["status"]["ips"][0]["node"] == "node2").then(Instant::now)
    })
    .await;
    let d2 = eventually("node2 holds", || {
        agent2
            .desired
            .borrow()
            .as_ref()
            .filter(|d| !d.claims.is_empty())
            .map(|d| (Instant::now(), d.clone()))
    })
    .await;
    let detect = moved - killed;
    let takeover = d2.0 - killed;
    println!("failover: reassigned after {detect:?}, claimed after {takeover:?}");
    // Not a speed check (that is `cargo xtask failover`): detection must not
    // come before the heartbeat timeout, and must come at all.
    assert!(
        detect >= Duration::from_millis(700) && detect < Duration::from_secs(10),
        "detection took {detect:?}"
    );
    assert!(
        takeover < Duration::from_secs(15),
        "take-over took {takeover:?}"
    );
    assert_eq!(d2.1.state.policies[&1].egress_node, Some(a2));
    assert_eq!(
        d2.1.state.pods.get(&"10.244.2.4".parse().unwrap()),
        Some(&1)
    );

    // Fencing: node2's first claim on the IP was written at least a claim
    // lifetime after node1's claims Lease last changed.
    let history = api.history();
    let leases: Vec<_> = history.iter().filter(|e| e.collection == LEASES).collect();
    let last_node1 = leases
        .iter()
        .rev()
        .find(|e| e.object["metadata"]["name"] == "egress-claims-node1")
        .unwrap()
        .at;
    let first_node2 = leases
        .iter()
        .find(|e| {
            e.object["metadata"]["name"] == "egress-claims-node2"
                && e.object["metadata"]["annotations"]["egress.example.dev/claimed-ips"]
                    == "172.18.0.100"
        })
        .unwrap()
        .at;
    let gap = first_node2.duration_since(last_node1);
    assert!(
        gap >= CLAIM_TTL,
        "node2 claimed {gap:?} after node1's last renewal"
    );
    // The IP's lock went from node1 to node2, taken over before node2
    // published its claim.
    let lock_holders: Vec<(&str, Instant)> = leases
        .iter()
        .filter(|e| e.object["metadata"]["name"] == "egress-ip-172-18-0-100")
        .filter_map(|e| Some((e.object["spec"]["holderIdentity"].as_str()?, e.at)))
        .collect();
    let holders: Vec<&str> = lock_holders.iter().map(|(h, _)| *h).collect();
    assert_eq!(holders, ["node1", "node2"], "lock history");
    assert!(lock_holders[1].1 <= first_node2);

    // The (fake) agent applied it.
    eventually("node2 reports it held", || {
        let held: BTreeSet<Ipv4Addr> = agent2.held.borrow().clone();
        held.contains(&Ipv4Addr::new(172, 18, 0, 100)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_renew_its_claim_withdraws_and_reclaims_when_back() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("egress_k8s=debug")
        .with_test_writer()
        .try_init();
    let api = FakeApi::start().await;
    api.create(NODES, node("node1", "127.0.0.21"));
    api.create(
        NAMESPACES,
        json!({"metadata": {"name": "shop", "labels": {"team": "a"}}}),
    );
    let (ctl, agent) = egress_k8s::link();
    let mut opts = options(Ipv4Addr::new(127, 0, 0, 21), 0, "172.18.0.11/16", true);
    opts.heartbeat = None;
    let _task = tokio::spawn(egress_k8s::run(api.client(), "node1".into(), opts, ctl));
    let desired = agent.desired.clone();
    let held = agent.held.clone();
    tokio::spawn({
        let mut desired = desired.clone();
        async move {
            while desired.changed().await.is_ok() {
                let ips = desired
                    .borrow()
                    .as_ref()
                    .map(|d| d.claims.iter().map(|c| c.ip).collect())
                    .unwrap_or_default();
                held.send_replace(ips);
            }
        }
    });
    eventually("synced", || desired.borrow().as_ref().map(|_| ())).await;
    // Watches are separate streams, so the assigner may see the EgressIP
    // before node1's subnets: only node1 matches the nodeSelector at first,
    // which makes the first placement deterministic either way.
    api.patch(
        NODES,
        None,
        "node1",
        json!({"metadata": {"labels": {"egress": "yes"}}}),
    );
    api.create(EIPS, json!({
        "metadata": {"name": "team-a"},
        "spec": {"egressIPs": ["172.18.0.100"], "namespaceSelector": {"matchLabels": {"team": "a"}},
                 "nodeSelector": {"matchLabels": {"egress": "yes"}}}
    }));
    eventually("node1 holds", || {
        desired
            .borrow()
            .as_ref()
            .filter(|d| !d.claims.is_empty())
            .map(|_| ())
    })
    .await;

    // The node's claim renewals fail (its API access is gone).
    api.cut("/leases/egress-claims-node1");
    let cut = Instant::now();
    let withdrawn = eventually("withdrawn", || {
        desired
            .borrow()
            .as_ref()
            .filter(|d| d.claims.is_empty())
            .map(|d| (Instant::now(), d.clone()))
    })
    .await;
    let after = withdrawn.0 - cut;
    // Withdrawn before anyone else may claim: the claim lifetime minus one
    // renewal period after the last renewal, which was at most one period
    // before the cut.
    let renew = Duration::from_millis(400);
    assert!(
        after >= CLAIM_TTL - 2 * renew && after < CLAIM_TTL,
        "withdrew after {after:?}"
    );
    assert_eq!(
        withdrawn.1.state.policies[&1].egress_node, None,
        "the datapath no longer treats it as local"
    );

    // Access is back: the status still names node1 and nobody else claims
    // the IP, so it takes it again.
    api.restore();
    eventually("reclaimed", || {
        desired
            .borrow()
            .as_ref()
            .filter(|d| !d.claims.is_empty())
            .map(|_| ())
    })
    .await;
}
