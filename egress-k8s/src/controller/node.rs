//! The node session: every agent projects the cluster onto its node,
//! claims the IPs the status gives it (lock, then claims Lease), renews and
//! withdraws them, and hands the result to the agent.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Namespace, Node, Pod},
};
use kube::{Api, Client, ResourceExt, runtime::watcher};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::{
    ControllerLink, Desired, Error, Options,
    leases::{ClaimWriter, LockOutcome, acquire_lock, fresh_claims, lost_locks, release_lock},
    publish_subnets,
    watches::{eips_of, namespaces_by_name, nodes_info, ready, reflect},
};
use crate::{
    claims::{self, ClaimTracker},
    crd::EgressIP,
    facts::PodInfo,
    project::{self, Projection},
};

/// Which of `ips` the API server's current status assigns to `me` (a fresh
/// read of the EgressIPs that list them in our cached view).
async fn confirm_assigned(
    api: &Api<EgressIP>,
    cached: &[EgressIP],
    me: &str,
    ips: &[Ipv4Addr],
    limit: Duration,
) -> BTreeSet<Ipv4Addr> {
    let names: BTreeSet<String> = cached
        .iter()
        .filter(|e| {
            e.status.as_ref().is_some_and(|s| {
                s.ips.iter().any(|i| {
                    i.egress_ip
                        .parse()
                        .is_ok_and(|ip: Ipv4Addr| ips.contains(&ip))
                })
            })
        })
        .map(|e| e.name_any())
        .collect();
    let mut out = BTreeSet::new();
    for name in names {
        match tokio::time::timeout(limit, api.get(&name)).await {
            Ok(Ok(eip)) => {
                for s in eip.status.iter().flat_map(|s| &s.ips) {
                    if s.node.as_deref() == Some(me)
                        && let Ok(ip) = s.egress_ip.parse::<Ipv4Addr>()
                        && ips.contains(&ip)
                    {
                        out.insert(ip);
                    }
                }
            }
            Ok(Err(e)) => warn!(egressip = %name, error = %e, "cannot confirm the assignment"),
            Err(_) => warn!(egressip = %name, "cannot confirm the assignment: no answer"),
        }
    }
    out
}

/// Keeps only the claims that are published; others lose their egress node
/// here (they become live on the next round, once the write succeeded).
fn restrict(mut p: Projection, published: &BTreeSet<Ipv4Addr>) -> Projection {
    p.claims.retain(|c| published.contains(&c.ip));
    let me = p.state.node_addr;
    for policy in p.state.policies.values_mut() {
        if me.is_some() && policy.egress_node == me && !published.contains(&policy.egress_ip) {
            policy.egress_node = None;
        }
    }
    p
}

pub(super) async fn node_agent(
    client: Client,
    node_name: String,
    options: Options,
    mut link: ControllerLink,
) -> Result<(), Error> {
    let notify = Arc::new(Notify::new());
    let eip_api: Api<EgressIP> = Api::all(client.clone());
    let eips = reflect(eip_api.clone(), watcher::Config::default(), notify.clone());
    let nodes = reflect(
        Api::<Node>::all(client.clone()),
        watcher::Config::default(),
        notify.clone(),
    );
    let namespaces = reflect(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
        notify.clone(),
    );
    let pods = reflect(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={node_name}")),
        notify.clone(),
    );
    let lease_api: Api<Lease> = Api::namespaced(client.clone(), &options.namespace);
    let leases = reflect(
        lease_api.clone(),
        watcher::Config::default().labels(&format!(
            "{}={}",
            claims::ROLE_LABEL,
            claims::ROLE_CLAIMS
        )),
        notify.clone(),
    );
    ready(&eips).await;
    ready(&nodes).await;
    ready(&namespaces).await;
    ready(&pods).await;
    ready(&leases).await;
    info!(node = %node_name, "watches synced");

    let mut tracker = ClaimTracker::new(options.claim_ttl);
    let mut writer = ClaimWriter {
        api: lease_api,
        namespace: options.namespace.clone(),
        node: node_name.clone(),
        renew: options.claim_renew,
        // Half a period, so that a stuck write delays withdrawal by at most
        // that much (see `withdraw_at`).
        timeout: options.claim_renew / 2,
        ttl: options.claim_ttl,
        published: None,
        draining: false,
        last_renew: None,
    };
    let locks = reflect(
        writer.api.clone(),
        watcher::Config::default().labels(&format!(
            "{}={}",
            claims::ROLE_LABEL,
            claims::ROLE_IP_LOCK
        )),
        notify.clone(),
    );
    ready(&locks).await;
    // IP -> the lock version we replaced to get it (None: created or ours).
    let mut held_locks: BTreeMap<Ipv4Addr, Option<String>> = BTreeMap::new();
    let mut lock_clock = claims::VersionClock::default();
    let mut shutting_down_since: Option<Instant> = None;
    let mut was_holding = true;
    let mut subnets_published = options.subnets.clone();
    loop {
        let now = Instant::now();
        if *link.shutdown.borrow() && shutting_down_since.is_none() {
            info!(node = %node_name, "shutting down: handing egress IPs over");
            shutting_down_since = Some(now);
        }
        let lease_objs = leases.state();
        let others: Vec<&Lease> = lease_objs
            .iter()
            .map(|l| &**l)
            .filter(|l| l.metadata.name.as_deref() != Some(claims::lease_name(&node_name).as_str()))
            .collect();
        let view = tracker.view(&others, now);
        let eip_list = eips_of(&eips);
        let node_list = nodes_info(&nodes);
        let ns = namespaces_by_name(&namespaces);
        let pod_list: Vec<PodInfo> = pods
            .state()
            .iter()
            .filter_map(|p| PodInfo::from_pod(p))
            .collect();
        let draining = shutting_down_since.is_some();
        let project = |may_hold: bool| {
            project::project(&project::ProjectInput {
                node_name: &node_name,
                node_addr: options.node_addr,
                eips: &eip_list,
                nodes: &node_list,
                namespaces: &ns,
                pods: &pod_list,
                claims: &view.live,
                may_hold,
                global_excluded: &options.global_excluded,
                config: &options.plan,
            })
        };
        // While draining, hold on until the assigner has moved the IPs (the
        // status no longer names us) or the drain times out.
        let drain_expired =
            shutting_down_since.is_some_and(|t| now.duration_since(t) >= options.drain_timeout);
        let projection = project(!drain_expired);
        let wanted: BTreeSet<Ipv4Addr> = projection.claims.iter().map(|c| c.ip).collect();
        let held = link.held.borrow().clone();
        // Claim what we want, and keep claiming what is still on an
        // interface until the agent reports it gone.
        let mut to_publish: BTreeSet<Ipv4Addr> = wanted.union(&held).copied().collect();
        let subnets = link.subnets.borrow().clone();
        if let Some(subnets) = subnets
            && subnets != subnets_published
        {
            // A failure is retried on the next round (at most a renewal
            // period away).
            match publish_subnets(&client, &node_name, &subnets).await {
                Ok(()) => subnets_published = subnets,
                Err(e) => warn!(node = %node_name, error = %e, "cannot republish egress subnets"),
            }
        }
        let lock_objs = locks.state();
        for lock in &lock_objs {
            lock_clock.note(lock, now);
        }
        lock_clock.retain(&lock_objs.iter().map(|l| l.name_any()).collect());
        for (ip, holder) in lost_locks(&lock_objs, &node_name, &held_locks) {
            warn!(node = %node_name, %ip, %holder, "the IP's lock names another node: withdrawing it");
            held_locks.remove(&ip);
            to_publish.remove(&ip);
        }
        let published = writer.published.clone().unwrap_or_default();
        let new_claims: Vec<Ipv4Addr> = to_publish.difference(&published).copied().collect();
        if !new_claims.is_empty() {
            // Our watch of the other nodes' claims may lag behind the status
            // that names us: confirm with a fresh read before claiming.
            // Likewise our watch of the status may lag behind a move away
            // from us: confirm that the status still names us.
            let confirmed = confirm_assigned(
                &eip_api,
                &eip_list,
                &node_name,
                &new_claims,
                options.claim_renew,
            )
            .await;
            match fresh_claims(&writer.api, &node_name, &mut tracker, options.claim_renew).await {
                Ok(fresh) => {
                    for ip in new_claims {
                        if let Some(holders) = fresh.live.get(&ip) {
                            info!(node = %node_name, %ip, ?holders, "not claiming yet: still claimed elsewhere");
                            to_publish.remove(&ip);
                            continue;
                        }
                        if !confirmed.contains(&ip) && !held.contains(&ip) {
                            info!(node = %node_name, %ip, "not claiming: the status no longer names this node");
                            to_publish.remove(&ip);
                            continue;
                        }
                        let attempt = tokio::time::timeout(
                            options.claim_renew,
                            acquire_lock(
                                &writer.api,
                                &options.namespace,
                                &node_name,
                                ip,
                                &mut lock_clock,
                                options.claim_ttl,
                            ),
                        )
                        .await;
                        match attempt {
                            Ok(Ok(LockOutcome::Acquired { replaced })) => {
                                held_locks.insert(ip, replaced);
                            }
                            Ok(Ok(LockOutcome::Refused(why))) => {
                                info!(node = %node_name, %ip, why, "not claiming: lost the IP's lock");
                                to_publish.remove(&ip);
                            }
                            Ok(Err(e)) => {
                                warn!(node = %node_name, %ip, error = %e, "cannot take the IP's lock; not claiming it");
                                to_publish.remove(&ip);
                            }
                            Err(_) => {
                                warn!(node = %node_name, %ip, "cannot take the IP's lock: no answer; not claiming it");
                                to_publish.remove(&ip);
                            }
                        }
                    }
                }
                Err(e) => {
                    warn!(node = %node_name, error = %e, "cannot confirm claims; not claiming new IPs");
                    for ip in new_claims {
                        to_publish.remove(&ip);
                    }
                }
            }
        }
        let renew_due = !writer.idle()
            && writer
                .last_renew
                .is_none_or(|t| now.saturating_duration_since(t) >= options.claim_renew);
        if (writer.published.as_ref() != Some(&to_publish)
            || writer.draining != draining
            || renew_due)
            && let Err(e) = writer.write(&to_publish, draining).await
        {
            warn!(node = %node_name, error = %e, "cannot publish claims");
        }
        // Locks of IPs whose claim we have withdrawn (address gone, claims
        // Lease written without them) are handed back.
        let withdrawn: Vec<Ipv4Addr> = held_locks
            .keys()
            .filter(|ip| {
                !to_publish.contains(ip)
                    && writer.published.as_ref().is_some_and(|p| !p.contains(ip))
            })
            .copied()
            .collect();
        for ip in withdrawn {
            held_locks.remove(&ip);
            match tokio::time::timeout(
                options.claim_renew,
                release_lock(&writer.api, &node_name, ip),
            )
            .await
            {
                Ok(Ok(())) => debug!(node = %node_name, %ip, "released the IP's lock"),
                Ok(Err(e)) => {
                    warn!(node = %node_name, %ip, error = %e, "cannot release the IP's lock (it is free anyway once our claim is gone)")
                }
                Err(_) => warn!(node = %node_name, %ip, "cannot release the IP's lock: no answer"),
            }
        }
        let now = Instant::now();
        let may_hold = writer.may_hold(now);
        if may_hold != was_holding {
            if may_hold {
                info!(node = %node_name, "claims renewed: may hold egress IPs");
            } else {
                warn!(node = %node_name, ttl = ?options.claim_ttl, "claims not renewed within their lifetime: withdrawing every egress IP");
            }
            was_holding = may_hold;
        }
        let projection = if may_hold && !drain_expired {
            let published = writer.published.clone().unwrap_or_default();
            restrict(projection, &published)
        } else {
            project(false)
        };
        let desired = Desired {
            state: projection.state,
            claims: projection.claims,
        };
        let fence = (may_hold && !drain_expired && !desired.claims.is_empty())
            .then(|| writer.withdraw_at())
            .flatten();
        link.fence.send_if_modified(|cur| {
            let changed = *cur != fence;
            *cur = fence;
            changed
        });
        link.desired.send_if_modified(|cur| {
            if cur.as_ref() == Some(&desired) {
                false
            } else {
                debug!(node = %node_name, policies = desired.state.policies.len(), pods = desired.state.pods.len(), claims = desired.claims.len(), "desired state changed");
                *cur = Some(desired.clone());
                true
            }
        });
        if draining && (desired.claims.is_empty() && link.held.borrow().is_empty()) {
            if let Err(e) = writer.write(&BTreeSet::new(), true).await {
                warn!(node = %node_name, error = %e, "cannot publish the final release");
            }
            info!(node = %node_name, "egress IPs handed over");
            return Ok(());
        }

        let until_withdrawal = writer
            .withdraw_at()
            .filter(|_| !writer.idle())
            .map(|d| d.saturating_duration_since(now))
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::MAX);
        // Renewals are paced from the last one, not from whenever the loop
        // last woke up, so that they do not drift towards twice the period.
        let wake = writer
            .until_renewal(now)
            .min(tracker.next_expiry(now).unwrap_or(Duration::MAX))
            .min(until_withdrawal)
            .min(Duration::from_secs(60));
        tokio::select! {
            _ = notify.notified() => {}
            r = link.held.changed() => { if r.is_err() { return Ok(()); } }
            r = link.subnets.changed() => { if r.is_err() { return Ok(()); } }
            r = link.shutdown.changed() => { if r.is_err() { return Ok(()); } }
            _ = tokio::time::sleep(wake) => {}
        }
    }
}
