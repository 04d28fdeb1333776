//! Failover end to end against the in-test API server, with real heartbeats
//! on loopback: a dead egress node (also when it is the elected assigner),
//! a node that cannot renew, heartbeats lost at the assigner only, and
//! forged heartbeat replies.

mod common;

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use common::*;
use egress_fake_api::FakeApi;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_egress_node_is_detected_and_its_ip_moves_after_its_claim_expires() {
    trace();
    let api = FakeApi::start().await;
    let port = free_port();
    seed(&api, 2);
    // node2 runs the assigner; node1 is only a candidate egress node.
    let agent2 = Agent::start(&api, "node2", options(2, port, true));
    let agent1 = Agent::start(&api, "node1", options(1, port, false));
    all_ready(&api, &[("node1", &agent1), ("node2", &agent2)]).await;
    // Only node1 may hold it at first, so that the placement is
    // deterministic whatever the assigner has seen of node2 yet.
    egress_ip_on(&api, &["node1"]);
    eventually("node1 holds", || {
        agent1.claims().contains(&EGRESS_IP).then_some(())
    })
    .await;
    announced_by(&api, "node1").await;
    // node2 becomes eligible too (relabel): nothing moves, assignments are sticky.
    make_eligible(&api, "node2");
    // Healthy for a while: heartbeats and renewals keep node1, nothing moves.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(holder(&api).unwrap().0, "node1");

    // node1's agent dies: no release, no more renewals or heartbeats.
    let killed = agent1.kill();

    let moved = eventually("status moved to node2", || {
        (holder(&api)?.0 == "node2").then(Instant::now)
    })
    .await;
    let claimed = eventually("node2 holds", || {
        agent2.claims().contains(&EGRESS_IP).then(Instant::now)
    })
    .await;
    let (detect, takeover) = (moved - killed, claimed - killed);
    println!("failover: reassigned after {detect:?}, claimed after {takeover:?}");
    // Not a speed check (that is `cargo xtask failover`): the move must not
    // come before the heartbeat timeout, and must come at all.
    assert!(
        detect >= Duration::from_millis(700) && detect < Duration::from_secs(15),
        "detection took {detect:?}"
    );
    let d2 = agent2.link.desired.borrow().clone().unwrap();
    assert_eq!(d2.state.policies[&1].egress_node, Some(node_addr(2)));
    assert_eq!(d2.state.pods.get(&"10.244.9.4".parse().unwrap()), Some(&1));
    fenced_handover(&api, "node1", "node2");
}

/// node2's first claim on the IP was written at least a claim lifetime
/// after `from`'s claims Lease last changed, and the IP's lock went from
/// `from` to `to` before `to` published its claim.
fn fenced_handover(api: &FakeApi, from: &str, to: &str) {
    let last_from = lease_history(api, &format!("egress-claims-{from}"))
        .last()
        .unwrap()
        .0;
    let first_to = first_claim(api, to, last_from).expect("the new holder's claim");
    let gap = first_to.duration_since(last_from);
    assert!(
        gap >= CLAIM_TTL,
        "{to} claimed {gap:?} after {from}'s last renewal"
    );
    let lock: Vec<(Instant, String)> = lease_history(api, LOCK)
        .into_iter()
        .filter_map(|(at, l)| Some((at, l["spec"]["holderIdentity"].as_str()?.to_string())))
        .collect();
    let holders: Vec<&str> = lock.iter().map(|(_, h)| h.as_str()).collect();
    assert_eq!(holders, [from, to], "lock history");
    assert!(lock[1].0 <= first_to);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_renew_its_claim_withdraws_and_reclaims_when_back() {
    trace();
    let api = FakeApi::start().await;
    seed(&api, 1);
    let mut opts = options(1, 0, true);
    opts.kubernetes.heartbeat = None;
    let agent = Agent::start(&api, "node1", opts);
    eventually("synced", || agent.synced().then_some(())).await;
    egress_ip_on(&api, &["node1"]);
    eventually("node1 holds", || {
        agent.claims().contains(&EGRESS_IP).then_some(())
    })
    .await;

    // The node's claim renewals fail (its API access is gone).
    api.cut("/leases/egress-claims-node1");
    let cut = Instant::now();
    let (after, withdrawn) = eventually("withdrawn", || {
        let d = agent.link.desired.borrow().clone()?;
        d.claims.is_empty().then(|| (cut.elapsed(), d))
    })
    .await;
    // Withdrawn before anyone else may claim: the claim lifetime minus one
    // renewal period after the last renewal, which was at most one period
    // before the cut.
    assert!(
        after >= CLAIM_TTL - 2 * CLAIM_RENEW && after < CLAIM_TTL,
        "withdrew after {after:?}"
    );
    assert_eq!(
        withdrawn.state.policies[&1].egress_node, None,
        "the datapath no longer treats it as local"
    );
    assert_eq!(*agent.link.fence.borrow(), None);

    // Access is back: nobody else can hold it, so it comes back here.
    api.restore();
    eventually("reclaimed", || {
        agent.claims().contains(&EGRESS_IP).then_some(())
    })
    .await;
}

/// The elected assigner holds the IP and dies: a warm standby takes the
/// leader Lease and moves the IP as for any other holder, fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_assigner_dying_while_holding_fails_over_like_any_holder() {
    trace();
    let api = FakeApi::start().await;
    let port = free_port();
    seed(&api, 3);
    // node1 first, so that it is elected.
    let agent1 = Agent::start(&api, "node1", options(1, port, true));
    eventually("node1 elected", || {
        let l = api.get(LEASES, Some(NS), "egress-assigner")?;
        (l["spec"]["holderIdentity"] == "node1").then_some(())
    })
    .await;
    let agent2 = Agent::start(&api, "node2", options(2, port, true));
    let agent3 = Agent::start(&api, "node3", options(3, port, true));
    all_ready(
        &api,
        &[("node1", &agent1), ("node2", &agent2), ("node3", &agent3)],
    )
    .await;
    egress_ip_on(&api, &["node1"]);
    announced_by(&api, "node1").await;
    make_eligible(&api, "node2");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(holder(&api).unwrap().0, "node1");

    let killed = agent1.kill();
    let elected = eventually("a standby takes the leader Lease", || {
        let l = api.get(LEASES, Some(NS), "egress-assigner")?;
        let h = l["spec"]["holderIdentity"].as_str()?.to_string();
        (h == "node2" || h == "node3").then(Instant::now)
    })
    .await;
    announced_by(&api, "node2").await;
    let announced = Instant::now();
    println!(
        "assigner failover: new leader after {:?}, announced by node2 after {:?}",
        elected - killed,
        announced - killed
    );
    // Announced once node2's claim is stored; its agent gets the address
    // when the write's answer is back.
    eventually("node2 holds", || {
        agent2.claims().contains(&EGRESS_IP).then_some(())
    })
    .await;
    assert!(agent3.claims().is_empty());
    fenced_handover(&api, "node1", "node2");
}

/// The assigner's own heartbeat port is dead (here: it probes a port
/// nobody answers on): every node looks silent to it, but the holder keeps
/// renewing its claims, so nothing moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_lost_at_the_assigner_only_move_nothing() {
    trace();
    let api = FakeApi::start().await;
    seed(&api, 2);
    let agent1 = Agent::start(&api, "node1", options(1, free_port(), false));
    let agent2 = Agent::start(&api, "node2", options(2, free_port(), true));
    all_ready(&api, &[("node1", &agent1), ("node2", &agent2)]).await;
    egress_ip_on(&api, &["node1", "node2"]);
    announced_by(&api, "node1").await;
    let since = Instant::now();

    // Heartbeat timeout (1 s) and claim lifetime (2 s) well passed.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(holder(&api), Some(("node1".to_string(), true)));
    let moved = api.history().into_iter().any(|e| {
        e.collection == EIPS && e.at > since && e.object["status"]["ips"][0]["node"] != "node1"
    });
    assert!(!moved, "the status moved the IP away from its live holder");
    assert!(
        agent2
            .history
            .lock()
            .unwrap()
            .iter()
            .all(|d| d.claims.is_empty())
    );
    assert!(agent1.claims().contains(&EGRESS_IP));
}

/// node1's agent is dead; someone who sees the probes sent to it answers
/// them, from another address with the right nonce, and from node1's
/// address with guessed nonces. The assigner does not take node1 for alive:
/// a new IP goes to node2, not to node1 (which placement prefers by name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_heartbeat_reply_does_not_keep_a_dead_node_eligible() {
    trace();
    let api = FakeApi::start().await;
    let port = free_port();
    seed(&api, 2);
    let agent1 = Agent::start(&api, "node1", options(1, port, false));
    let agent2 = Agent::start(&api, "node2", options(2, port, true));
    all_ready(&api, &[("node1", &agent1), ("node2", &agent2)]).await;
    agent1.kill();

    // The forger takes over node1's heartbeat port once the dead agent's
    // socket is gone.
    let probes = eventually("node1's heartbeat port free", || {
        std::net::UdpSocket::bind((node_addr(1), port)).ok()
    })
    .await;
    let probes = tokio::net::UdpSocket::from_std({
        probes.set_nonblocking(true).unwrap();
        probes
    })
    .unwrap();
    let elsewhere = tokio::net::UdpSocket::bind("127.0.0.66:0").await.unwrap();
    let node1_other_port = tokio::net::UdpSocket::bind((node_addr(1), 0))
        .await
        .unwrap();
    let forged = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = forged.clone();
    let forger = tokio::spawn(async move {
        let mut buf = [0u8; 64];
        loop {
            let (n, prober) = probes.recv_from(&mut buf).await.unwrap();
            // A probe: "EGHB", version 2, kind 0 (probe), 2 bytes of
            // padding, a 16-byte nonce. The reply is the same with kind 1.
            if n != 24 || &buf[..4] != b"EGHB" || buf[4] != 2 || buf[5] != 0 {
                continue;
            }
            let mut reply = buf[..24].to_vec();
            reply[5] = 1;
            elsewhere.send_to(&reply, prober).await.unwrap();
            reply[8] ^= 0xff;
            node1_other_port.send_to(&reply, prober).await.unwrap();
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    // Long enough for node1 to be declared silent (1 s) and for its idle
    // claims Lease to be old (2 s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        forged.load(std::sync::atomic::Ordering::Relaxed) > 5,
        "the forger saw no probes"
    );
    egress_ip_on(&api, &["node1", "node2"]);
    announced_by(&api, "node2").await;
    eventually("node2 holds", || {
        (agent2.claims() == BTreeSet::from([EGRESS_IP])).then_some(())
    })
    .await;
    forger.abort();
}
