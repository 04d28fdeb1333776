//! Leader election with a `coordination.k8s.io` Lease among a few warm
//! candidates; the leader's assigner writes status.
//!
//! A dead assigner must not hold up failover: a standby takes the Lease
//! once it has not changed for `leader_ttl` (1 s by default, judged with
//! the standby's own clock), and acts at once because it has been running
//! the assigner all along without writing (watches synced, heartbeats
//! probed, claims judged with its own clock, see [`super::assigner`]).
//! Only [`standbys`] take part (the first `assigner_candidates` of the
//! Ready, schedulable nodes whose agents offer to, by a hash of their
//! name), so the election's requests and the assigner's cluster-wide
//! watches cost a fixed number of agents, not every node. A leader that is
//! no longer among them keeps leading until it stops.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, ResourceExt, api::PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{AbortOnDrop, Options, assigner::assign_loop, leases::release_lease};
use crate::{claims, facts::NodeInfo};

/// Annotation on the leader Lease: its lifetime in milliseconds
/// (`leaseDurationSeconds` cannot say 1.5 s).
pub const LEADER_TTL_ANNOTATION: &str = "egress.example.dev/lease-ttl-ms";

/// The nodes that stand by as assigner candidates: among the Ready,
/// schedulable nodes whose claims Lease says their agent takes part, the
/// `count` first by a stable hash of their name (so that the set does not
/// move when unrelated nodes come and go, and every agent computes the same
/// set from the same objects).
pub fn standbys(nodes: &[NodeInfo], leases: &[&Lease], count: usize) -> BTreeSet<String> {
    let offered: BTreeSet<&str> = leases
        .iter()
        .filter(|l| {
            l.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(claims::ASSIGNER_ANNOTATION))
                .is_some_and(|v| v == "true")
        })
        .filter_map(|l| claims::lock_holder(l))
        .collect();
    let mut ranked: Vec<&NodeInfo> = nodes
        .iter()
        .filter(|n| n.ready && !n.unschedulable && offered.contains(n.name.as_str()))
        .collect();
    ranked.sort_by_key(|n| (fnv1a(n.name.as_bytes()), n.name.as_str()));
    ranked
        .into_iter()
        .take(count)
        .map(|n| n.name.clone())
        .collect()
}

/// FNV-1a, 64 bits: stable across builds and platforms (unlike std's
/// hasher), which agents of different versions must agree on.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Takes part in the election while this node is a candidate (or leads):
/// runs the assigner warm, and lets it write while holding the Lease.
pub(super) async fn elect(
    client: Client,
    me: String,
    options: Options,
    down: watch::Receiver<BTreeSet<String>>,
    mut candidate: watch::Receiver<Option<bool>>,
) {
    let api: Api<Lease> = Api::namespaced(client.clone(), &options.kubernetes.namespace);
    let mut observed: Option<(String, Instant)> = None;
    let mut last_renew: Option<Instant> = None;
    // Until when the assigner may write status (`None`: standing by).
    let (lead_tx, _) = watch::channel(None::<Instant>);
    // Dropping the guard aborts the assigner (also when this future is dropped).
    let mut assigner: Option<AbortOnDrop> = None;
    let mut candidate_open = true;
    loop {
        let standing = candidate.borrow_and_update().unwrap_or(false);
        let leading = last_renew.is_some_and(|t| t.elapsed() < options.kubernetes.leader_ttl);
        if !standing && !leading {
            if assigner.take().is_some() {
                info!(identity = %me, "no longer an assigner candidate");
            }
            lead_tx.send_replace(None);
            (observed, last_renew) = (None, None);
            if !candidate_open || candidate.changed().await.is_err() {
                candidate_open = false;
                std::future::pending::<()>().await;
            }
            continue;
        }
        if assigner.is_none() {
            info!(identity = %me, "standing by as assigner candidate");
            let (client, options, down) = (client.clone(), options.clone(), down.clone());
            let (me, lead) = (me.clone(), lead_tx.subscribe());
            assigner = Some(AbortOnDrop(Some(tokio::spawn(async move {
                assign_loop(client, me, options, down, lead).await
            }))));
        }
        let attempt = Instant::now();
        match tokio::time::timeout(
            options.kubernetes.leader_renew,
            try_lead(&api, &me, &options, &mut observed),
        )
        .await
        {
            Ok(Ok(true)) => last_renew = Some(attempt),
            Ok(Ok(false)) => last_renew = None,
            Ok(Err(e)) => warn!(error = %e, "leader election"),
            Err(_) => {
                warn!(timeout = ?options.kubernetes.leader_renew, "leader election: no answer")
            }
        }
        // Others may take over `leader_ttl` after they saw our last renewal,
        // which is no earlier than when we sent it: stop writing a renewal
        // period before.
        let until = last_renew
            .map(|t| {
                t + options
                    .kubernetes
                    .leader_ttl
                    .saturating_sub(options.kubernetes.leader_renew)
            })
            .filter(|u| *u > Instant::now());
        lead_tx.send_if_modified(|cur| {
            match (cur.is_some(), until.is_some()) {
                (false, true) => info!(identity = %me, "elected assigner"),
                (true, false) => warn!(identity = %me, "lost the assigner lease"),
                _ => {}
            }
            let changed = *cur != until;
            *cur = until;
            changed
        });
        tokio::select! {
            _ = tokio::time::sleep(options.kubernetes.leader_renew) => {}
            r = candidate.changed(), if candidate_open => candidate_open = r.is_ok(),
        }
    }
}

pub(super) async fn release_leadership(
    client: &Client,
    me: &str,
    options: &Options,
) -> Result<(), kube::Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &options.kubernetes.namespace);
    if release_lease(&api, &options.kubernetes.leader_lease, me).await? {
        info!(identity = %me, "released the assigner lease");
    }
    Ok(())
}

/// One acquire-or-renew round. Ownership changes hands only through a
/// write conditioned on the resourceVersion we read.
async fn try_lead(
    api: &Api<Lease>,
    me: &str,
    options: &Options,
    observed: &mut Option<(String, Instant)>,
) -> Result<bool, kube::Error> {
    let now = MicroTime(Timestamp::now());
    let duration = options.kubernetes.leader_ttl.as_secs_f64().ceil().max(1.0) as i32;
    let ttl_ms = options.kubernetes.leader_ttl.as_millis().to_string();
    let Some(mut lease) = api.get_opt(&options.kubernetes.leader_lease).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(options.kubernetes.leader_lease.clone()),
                annotations: Some([(LEADER_TTL_ANNOTATION.to_string(), ttl_ms)].into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(me.to_string()),
                lease_duration_seconds: Some(duration),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let rv = lease.resource_version().unwrap_or_default();
    let declared_ms = lease
        .annotations()
        .get(LEADER_TTL_ANNOTATION)
        .and_then(|v| v.parse::<u64>().ok());
    lease
        .annotations_mut()
        .insert(LEADER_TTL_ANNOTATION.into(), ttl_ms);
    let spec = lease.spec.get_or_insert_with(Default::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder != me {
        let changed = observed.as_ref().is_none_or(|(r, _)| *r != rv);
        if changed {
            *observed = Some((rv.clone(), Instant::now()));
        }
        let ttl = declared_ms.map(Duration::from_millis).unwrap_or_else(|| {
            Duration::from_secs(spec.lease_duration_seconds.unwrap_or(duration).max(0) as u64)
        });
        let expired = observed.as_ref().is_some_and(|(_, t)| t.elapsed() >= ttl);
        if !holder.is_empty() && !expired {
            return Ok(false);
        }
        spec.holder_identity = Some(me.to_string());
        spec.acquire_time = Some(now.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(now);
    spec.lease_duration_seconds = Some(duration);
    match api
        .replace(
            &options.kubernetes.leader_lease,
            &PostParams::default(),
            &lease,
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::fixtures;

    fn lease(node: &str, assigner: bool) -> Lease {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": claims::lease_name(node), "resourceVersion": "1",
                "annotations": {claims::ASSIGNER_ANNOTATION: assigner.to_string()}},
            "spec": {"holderIdentity": node}
        }))
        .unwrap()
    }

    fn node(name: &str) -> NodeInfo {
        NodeInfo::from_node(&fixtures::node(name, "172.18.0.11", &[], &[])).unwrap()
    }

    #[test]
    fn standbys_are_a_few_ready_volunteers_chosen_by_a_stable_hash() {
        let nodes: Vec<NodeInfo> = (1..=10).map(|i| node(&format!("node{i}"))).collect();
        let leases: Vec<Lease> = (1..=10)
            .map(|i| lease(&format!("node{i}"), i != 4))
            .collect();
        let refs: Vec<&Lease> = leases.iter().collect();
        let three = standbys(&nodes, &refs, 3);
        assert_eq!(three.len(), 3);
        assert!(!three.contains("node4"), "node4's agent does not take part");
        // The same from any agent, whatever the order it sees objects in.
        let mut reversed = refs.clone();
        reversed.reverse();
        assert_eq!(standbys(&nodes, &reversed, 3), three);
        // A node that is not among them coming or going changes nothing.
        let outsider = nodes
            .iter()
            .find(|n| !three.contains(&n.name) && n.name != "node4")
            .unwrap()
            .name
            .clone();
        let fewer: Vec<NodeInfo> = nodes
            .iter()
            .filter(|n| n.name != outsider)
            .cloned()
            .collect();
        assert_eq!(standbys(&fewer, &refs, 3), three);
        // A standby that is cordoned or not Ready is replaced.
        let gone = three.iter().next().unwrap().clone();
        let mut changed = nodes.clone();
        changed
            .iter_mut()
            .find(|n| n.name == gone)
            .unwrap()
            .unschedulable = true;
        let next = standbys(&changed, &refs, 3);
        assert_eq!(next.len(), 3);
        assert!(!next.contains(&gone));
        assert_eq!(next.intersection(&three).count(), 2);
        // Everyone when there are fewer volunteers than wanted.
        assert_eq!(standbys(&nodes[..2], &refs, 3).len(), 2);
    }
}
