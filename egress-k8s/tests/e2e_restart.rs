//! Restart versus drain, end to end against the in-test API server: an
//! agent that stops for a restart keeps its node's IPs under a restart
//! grace and its successor adopts them (nothing moves, no lock changes
//! hands); without a successor they fail over once the grace is over; a
//! node that is being drained hands them over.

mod common;

use std::time::{Duration, Instant};

use common::*;
use egress_fake_api::FakeApi;
use egress_k8s::Options;
use serde_json::json;

const GRACE: Duration = Duration::from_secs(5);

fn with_grace(mut o: Options, grace: Duration) -> Options {
    o.kubernetes.restart_grace = grace;
    o
}

/// node1 holds the IP (node2 could too); node2 runs the assigner.
async fn held_by_node1(api: &FakeApi, port: u16, grace: Duration) -> (Agent, Agent) {
    seed(api, 2);
    let agent1 = Agent::start(api, "node1", with_grace(options(1, port, false), grace));
    let agent2 = Agent::start(api, "node2", options(2, port, true));
    all_ready(api, &[("node1", &agent1), ("node2", &agent2)]).await;
    egress_ip_on(api, &["node1"]);
    announced_by(api, "node1").await;
    make_eligible(api, "node2");
    (agent1, agent2)
}

/// Stops `agent` as SIGTERM does and waits for its controller to return.
async fn stop(agent: &mut Agent) {
    agent.link.shutdown.send_replace(true);
    let returned = tokio::time::timeout(Duration::from_secs(15), &mut agent.task).await;
    assert!(matches!(returned, Ok(Ok(Ok(())))), "{returned:?}");
}

fn grace_annotation(lease: &serde_json::Value) -> Option<&str> {
    lease["metadata"]["annotations"]["egress.example.dev/restart-grace-ms"].as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_within_the_grace_keeps_the_ips_where_they_are() {
    trace();
    let api = FakeApi::start().await;
    let port = free_port();
    let (mut agent1, _agent2) = held_by_node1(&api, port, GRACE).await;
    // A former holder's claims Lease still lists the IP (its agent died
    // long ago): the successor, which judges it with a fresh clock, must not
    // take it for a live claim on an IP whose lock names node1.
    api.create(
        LEASES,
        json!({"metadata": {"name": "egress-claims-node9", "namespace": NS,
                "labels": {"egress.example.dev/role": "claims"},
                "annotations": {"egress.example.dev/claimed-ips": EGRESS_IP.to_string(),
                                "egress.example.dev/claim-ttl-ms": "2000"}},
               "spec": {"holderIdentity": "node9"}}),
    );
    let stopping = Instant::now();
    stop(&mut agent1).await;
    // The agent keeps serving until the end of the grace: the fence it was
    // last given reaches past what a renewal gives.
    let fence = agent1.link.fence.borrow().expect("a fence while holding");
    assert!(
        fence > stopping + CLAIM_TTL,
        "fence only {:?} ahead",
        fence.saturating_duration_since(stopping)
    );
    assert!(agent1.claims().contains(&EGRESS_IP), "the claim is kept");
    let lease = api.get(LEASES, Some(NS), "egress-claims-node1").unwrap();
    assert_eq!(grace_annotation(&lease), Some("5000"));
    assert_eq!(claimed_ips(&lease), EGRESS_IP.to_string());

    // Down longer than the heartbeat timeout and the claim lifetime.
    tokio::time::sleep(CLAIM_TTL + Duration::from_millis(500)).await;
    let successor = Agent::start(&api, "node1", with_grace(options(1, port, false), GRACE));
    eventually("the successor holds", || {
        successor.claims().contains(&EGRESS_IP).then_some(())
    })
    .await;
    // It never told its agent to let go (no address removed, no GARP).
    let told = successor.history.lock().unwrap().clone();
    assert!(
        told.iter()
            .all(|d| d.claims.iter().any(|c| c.ip == EGRESS_IP)),
        "{told:?}"
    );
    // Renewed without the grace.
    eventually("renewed without the grace", || {
        let l = api.get(LEASES, Some(NS), "egress-claims-node1")?;
        grace_annotation(&l).is_none().then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(holder(&api), Some(("node1".to_string(), true)));
    // Nothing moved, and the lock never changed hands.
    let history = api.history();
    let moved = history.iter().any(|e| {
        e.collection == EIPS && e.at > stopping && e.object["status"]["ips"][0]["node"] != "node1"
    });
    assert!(!moved, "the status moved the IP during the restart");
    let lock_writes = history
        .iter()
        .filter(|e| {
            e.collection == LEASES && e.object["metadata"]["name"] == LOCK && e.at > stopping
        })
        .count();
    assert_eq!(lock_writes, 0, "the lock was written during the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_without_a_successor_fails_over_when_the_grace_ends() {
    trace();
    let api = FakeApi::start().await;
    let grace = Duration::from_secs(3);
    let (mut agent1, agent2) = held_by_node1(&api, free_port(), grace).await;
    stop(&mut agent1).await;
    let grace_written = lease_history(&api, "egress-claims-node1")
        .into_iter()
        .rfind(|(_, l)| grace_annotation(l).is_some())
        .expect("the grace was published")
        .0;
    announced_by(&api, "node2").await;
    eventually("node2 holds", || {
        agent2.claims().contains(&EGRESS_IP).then_some(())
    })
    .await;
    // Neither the move nor the new claim came before the grace was over.
    let moved = api
        .history()
        .into_iter()
        .find(|e| e.collection == EIPS && e.object["status"]["ips"][0]["node"] == "node2")
        .unwrap()
        .at;
    let claimed = first_claim(&api, "node2", grace_written).unwrap();
    assert!(
        moved.duration_since(grace_written) >= grace,
        "moved {:?} after the grace was published",
        moved.duration_since(grace_written)
    );
    assert!(claimed.duration_since(grace_written) >= grace);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_hands_its_ips_over_when_its_agent_stops() {
    trace();
    let api = FakeApi::start().await;
    let (mut agent1, agent2) = held_by_node1(&api, free_port(), GRACE).await;
    // The autoscaler is about to delete node1 (placement alone ignores
    // this taint: only the stop hands the IP over).
    api.patch(
        NODES,
        None,
        "node1",
        json!({"spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}]}}),
    );
    let stopping = Instant::now();
    stop(&mut agent1).await;
    assert!(agent1.claims().is_empty(), "node1 let go before returning");
    assert_eq!(*agent1.link.fence.borrow(), None);
    announced_by(&api, "node2").await;
    eventually("node2 holds", || {
        agent2.claims().contains(&EGRESS_IP).then_some(())
    })
    .await;
    // node1 said it was draining, then released the IP, before node2
    // claimed it; it never asked for a restart grace.
    let node1 = lease_history(&api, "egress-claims-node1");
    let released = node1
        .iter()
        .find(|(at, l)| {
            *at > stopping
                && l["metadata"]["annotations"]["egress.example.dev/draining"] == "true"
                && claimed_ips(l).is_empty()
        })
        .expect("a draining release")
        .0;
    assert!(node1.iter().all(|(_, l)| grace_annotation(l).is_none()));
    assert!(first_claim(&api, "node2", stopping).unwrap() > released);
}
