//! The assigner: the elected agent places the EgressIPs' IPs on nodes,
//! allocates policy ids and writes status and events. Standbys run it too,
//! without writing, so that a new leader acts at once (see
//! [`super::election`]).
//!
//! Failure detection has no single observer. A node is unavailable for
//! egress IPs when:
//! - its claims Lease lists IPs but has not changed for its lifetime (it
//!   stopped renewing while holding: dead, stopped, or cut off from the API
//!   server, and then it has withdrawn by itself): the Lease alone says so;
//! - or it does not answer heartbeats and it is not renewing either (its
//!   Lease missed two renewals, or it holds nothing and does not renew), so
//!   that the assigner's own lost UDP port cannot move any IP whose holder
//!   still renews, and a dead holder is seen after the heartbeat timeout
//!   rather than only when its claim lapses;
//! - or it is draining (hand-over on shutdown), not Ready, or cordoned.
//!
//! Anything new in that set is confirmed with a fresh read of the Leases
//! before it is acted on, so that the assigner's own lagging watch cannot
//! fail the cluster over either. Moving an IP in status early is safe: the
//! new holder still waits for the old claim to lapse (see [`crate::claims`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{api::coordination::v1::Lease, jiff::Timestamp};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DynamicObject, Patch, PatchParams},
    runtime::{
        events::{Event, EventType, Recorder, Reporter},
        watcher,
    },
};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use super::{
    AbortOnDrop, Options,
    leases::list_claims,
    watches::{ClusterWatches, namespaces_by_name, nodes_info},
};
use crate::{
    claims::{ClaimTracker, ClaimView},
    crd::{EgressIP, EgressIPStatus, condition},
    decode,
    facts::{NodeInfo, PodInfo},
    heartbeat::{self, Target},
    ids, plan, report,
};

/// The status as a merge patch: absent fields are explicitly cleared.
fn status_patch(status: &EgressIPStatus) -> serde_json::Value {
    let mut v = serde_json::to_value(status).expect("status serializes");
    let obj = v.as_object_mut().expect("status is an object");
    for key in ["items", "ips", "conditions", "observedGeneration"] {
        obj.entry(key).or_insert(serde_json::Value::Null);
    }
    serde_json::json!({ "status": v })
}

fn condition_is(
    status: Option<&EgressIPStatus>,
    ip: &str,
    type_: &str,
) -> Option<(String, String, String)> {
    status?
        .ips
        .iter()
        .find(|s| s.egress_ip == ip)?
        .conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
        .map(|c| (c.reason.clone(), c.message.clone(), c.type_.clone()))
}

/// Events for what changed between two statuses of one resource.
fn events_for(old: Option<&EgressIPStatus>, new: &EgressIPStatus) -> Vec<Event> {
    let mut out = Vec::new();
    for c in new.conditions.iter().filter(|c| c.status == "True") {
        let was = old.is_some_and(|o| {
            o.conditions
                .iter()
                .any(|p| p.type_ == c.type_ && p.status == "True" && p.reason == c.reason)
        });
        if !was {
            out.push(Event {
                type_: EventType::Warning,
                reason: c.reason.clone(),
                note: Some(c.message.clone()),
                action: "Validate".into(),
                secondary: None,
            });
        }
    }
    for ip in &new.ips {
        let before = old.and_then(|o| o.ips.iter().find(|s| s.egress_ip == ip.egress_ip));
        let old_node = before.and_then(|b| b.node.clone());
        if ip.node != old_node
            && let Some(n) = &ip.node
        {
            // Distinct reasons: the recorder folds events with the same
            // reason into one series and keeps the first note.
            let (reason, note) = match &old_node {
                Some(o) => (
                    "Moved",
                    format!("{} moved from node {o} to node {n}", ip.egress_ip),
                ),
                None => ("Assigned", format!("{} assigned to node {n}", ip.egress_ip)),
            };
            out.push(Event {
                type_: EventType::Normal,
                reason: reason.into(),
                note: Some(note),
                action: "Assign".into(),
                secondary: None,
            });
        }
        if let Some(c) = ip
            .conditions
            .iter()
            .find(|c| c.type_ == condition::APPLIED && c.reason == "ApplyFailed")
            && before.is_none_or(|b| {
                !b.conditions
                    .iter()
                    .any(|o| o.type_ == c.type_ && o.message == c.message)
            })
        {
            out.push(Event {
                type_: EventType::Warning,
                reason: c.reason.clone(),
                note: Some(c.message.clone()),
                action: "Apply".into(),
                secondary: None,
            });
        }
        for t in [condition::CONFLICT, condition::INVALID] {
            if let Some((reason, message, _)) = condition_is(Some(new), &ip.egress_ip, t)
                && condition_is(old, &ip.egress_ip, t).is_none_or(|(r, _, _)| r != reason)
            {
                out.push(Event {
                    type_: EventType::Warning,
                    reason,
                    note: Some(message),
                    action: "Validate".into(),
                    secondary: None,
                });
            }
        }
        if ip.node.is_none()
            && let Some(c) = ip.conditions.iter().find(|c| {
                c.type_ == condition::ASSIGNED
                    && c.status == "False"
                    && (c.reason == "NoAvailableNode" || c.reason == "NoPolicyId")
            })
            && before.is_none_or(|b| {
                !b.conditions
                    .iter()
                    .any(|o| o.type_ == c.type_ && o.reason == c.reason)
            })
        {
            out.push(Event {
                type_: EventType::Warning,
                reason: c.reason.clone(),
                note: Some(c.message.clone()),
                action: "Assign".into(),
                secondary: None,
            });
        }
    }
    out
}

/// The nodes that may not hold egress IPs now (see the module's doc):
/// `silent` failed heartbeats.
pub(super) fn unavailable(view: &ClaimView, silent: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = silent
        .iter()
        .filter(|n| !view.renewing.contains(*n))
        .cloned()
        .collect();
    out.extend(view.lapsed.iter().cloned());
    out.extend(view.draining.iter().cloned());
    out
}

/// Runs the assigner; it writes only while `lead` says until when this
/// agent holds the leader Lease.
pub(super) async fn assign_loop(
    client: Client,
    me: String,
    options: Options,
    down: watch::Receiver<BTreeSet<String>>,
    mut lead: watch::Receiver<Option<Instant>>,
) {
    let notify = Arc::new(Notify::new());
    let eip_api: Api<EgressIP> = Api::all(client.clone());
    let raw_eip_api: Api<DynamicObject> = Api::all_with(client.clone(), &decode::api_resource());
    let mut decoder = decode::Decoder::default();
    let lease_api = Api::<Lease>::namespaced(client.clone(), &options.kubernetes.namespace);
    let watches = ClusterWatches::start(
        &client,
        &options.kubernetes.namespace,
        watcher::Config::default(),
        &notify,
    );
    watches.ready().await;
    info!(identity = %me, "assigner synced");
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "egress-assigner".into(),
            instance: Some(me.clone()),
        },
    );
    // A holder renews every period: two missed ones make it late.
    let mut tracker = ClaimTracker::new(options.kubernetes.claim_ttl)
        .with_stale_after(options.kubernetes.claim_renew * 2);
    let mut down = down;
    let (targets_tx, targets_rx) = watch::channel(BTreeMap::new());
    let (probe_down_tx, mut probe_down) = watch::channel(BTreeSet::new());
    let prober = options.kubernetes.heartbeat.clone().map(|hb| {
        tokio::spawn(async move {
            if let Err(e) = heartbeat::probe(hb, targets_rx, probe_down_tx).await {
                warn!(error = %e, "heartbeat prober stopped");
            }
        })
    });
    // Aborting the assigner task drops this guard and stops the prober.
    let _prober = AbortOnDrop(prober);
    // Unavailable nodes already confirmed with a fresh read.
    let mut confirmed: BTreeSet<String> = BTreeSet::new();
    // A closed channel stays "changed" forever: stop selecting on it.
    let (mut down_open, mut probe_open, mut lead_open) = (true, true, true);
    loop {
        let now = Instant::now();
        let decoded = decode::snapshot(&mut decoder, &watches.eips.state());
        let eip_list = decoded.good;
        let node_list = nodes_info(&watches.nodes);
        let lease_objs = watches.claims.state();
        let lease_refs: Vec<&Lease> = lease_objs.iter().map(|l| &**l).collect();
        let mut view = tracker.view(&lease_refs, now);
        let mut silent = down.borrow().clone();
        silent.extend(probe_down.borrow_and_update().iter().cloned());
        let mut away = unavailable(&view, &silent);
        if !away.is_subset(&confirmed) {
            // Our watch may lag behind their renewals: ask the server.
            match list_claims(&lease_api, options.kubernetes.claim_renew).await {
                Ok(fresh) => {
                    let refs: Vec<&Lease> = fresh.iter().collect();
                    view = tracker.view(&refs, Instant::now());
                    away = unavailable(&view, &silent);
                    for n in away.difference(&confirmed) {
                        let why = if view.lapsed.contains(n) {
                            "stopped renewing its claims"
                        } else if view.draining.contains(n) {
                            "is draining"
                        } else {
                            "answers no heartbeat and does not renew"
                        };
                        warn!(node = %n, why, "node unavailable: its egress IPs move");
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot confirm unavailable nodes with a fresh read; not acting on them yet");
                    away.retain(|n| confirmed.contains(n));
                }
            }
        }
        confirmed.clone_from(&away);
        if let Some(hb) = &options.kubernetes.heartbeat {
            let targets: BTreeMap<String, Target> = node_list
                .iter()
                .filter(|n| n.labels.contains_key(&options.plan.assignable_label))
                .filter_map(|n| {
                    Some((
                        n.name.clone(),
                        Target {
                            addr: std::net::SocketAddr::new(n.address?.into(), hb.port),
                            sources: n.addresses.iter().map(|a| (*a).into()).collect(),
                        },
                    ))
                })
                .collect();
            targets_tx.send_if_modified(|cur| {
                let changed = *cur != targets;
                *cur = targets;
                changed
            });
        }
        let lead_until = *lead.borrow_and_update();
        let leading = lead_until.is_some_and(|u| Instant::now() < u);
        if leading {
            let pod_list: Vec<PodInfo> = watches.pods.snapshot();
            write_statuses(
                &eip_api,
                &recorder,
                &eip_list,
                &node_list,
                &pod_list,
                &namespaces_by_name(&watches.namespaces),
                &lease_refs,
                &view,
                &away,
                &options,
            )
            .await;
            decode::report_malformed(&raw_eip_api, &recorder, &decoded.bad).await;
        }
        let until_lead_ends = lead_until.filter(|_| leading).map_or(Duration::MAX, |u| {
            u.saturating_duration_since(Instant::now())
        });
        let wake = Duration::from_secs(1)
            .min(tracker.next_expiry(Instant::now()).unwrap_or(Duration::MAX))
            .min(until_lead_ends);
        tokio::select! {
            _ = notify.notified() => {}
            r = down.changed(), if down_open => down_open = r.is_ok(),
            r = probe_down.changed(), if probe_open => probe_open = r.is_ok(),
            r = lead.changed(), if lead_open => lead_open = r.is_ok(),
            _ = tokio::time::sleep(wake) => {}
        }
    }
}

/// Places the IPs, allocates ids, and writes every status that changed
/// (with its events). `claims` are the claims Leases: the datapath reports
/// they carry keep released ids out of reuse and give `Applied`.
#[allow(clippy::too_many_arguments)]
async fn write_statuses(
    eip_api: &Api<EgressIP>,
    recorder: &Recorder,
    eip_list: &[EgressIP],
    node_list: &[NodeInfo],
    pod_list: &[PodInfo],
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    claims: &[&Lease],
    view: &ClaimView,
    unavailable: &BTreeSet<String>,
    options: &Options,
) {
    let checked = plan::check_all(eip_list, node_list, &options.plan);
    let (prev_nodes, prev_ids) = plan::previous_from_status(eip_list);
    let assignments = plan::assign(&checked, node_list, &prev_nodes, unavailable, &options.plan);
    // What every node's datapath holds: released ids stay out of reuse
    // until no node holds them, and failures go into `Applied`.
    let reports = report::node_reports(claims, node_list);
    let space = ids::IdSpace::new(options.plan.max_policies, report::held_ids(&reports));
    let ids = plan::allocate_ids(&checked, &prev_ids, &space);
    let wanted = checked.iter().map(|c| c.valid_ips().count()).sum::<usize>();
    let shortage = (ids.len() < wanted).then(|| ids::shortage(&ids, &space));
    let apply_failures = report::failures(&reports);
    let selection = plan::select_pods(&checked, namespaces, pod_list);
    let stamp = Timestamp::now();
    for c in &checked {
        let Some(eip) = eip_list.iter().find(|e| e.name_any() == c.name) else {
            continue;
        };
        let status = plan::build_status(&plan::StatusInput {
            checked: c,
            assignments: &assignments,
            ids: &ids,
            claims: &view.live,
            selection: &selection,
            previous: eip.status.as_ref(),
            now: stamp,
            shortage: shortage.as_ref(),
            apply_failures: &apply_failures,
        });
        if eip.status.as_ref() == Some(&status) {
            continue;
        }
        match eip_api
            .patch_status(
                &c.name,
                &PatchParams::default(),
                &Patch::Merge(status_patch(&status)),
            )
            .await
        {
            Ok(_) => {
                debug!(egressip = %c.name, "status written");
                let reference = eip.object_ref(&());
                for ev in events_for(eip.status.as_ref(), &status) {
                    if let Err(e) = recorder.publish(&ev, &reference).await {
                        warn!(egressip = %c.name, error = %e, "cannot publish event");
                    }
                }
            }
            Err(e) => warn!(egressip = %c.name, error = %e, "cannot write status"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(v: serde_json::Value) -> EgressIPStatus {
        serde_json::from_value(v).unwrap()
    }

    fn cond(t: &str, st: &str, reason: &str) -> serde_json::Value {
        serde_json::json!({"type": t, "status": st, "reason": reason, "message": format!("{reason} details"),
            "lastTransitionTime": "2026-05-01T12:00:00Z"})
    }

    #[test]
    fn events_report_assignments_moves_and_new_problems_once() {
        let assigned = status(
            serde_json::json!({"ips": [{"egressIP": "172.18.0.100", "node": "node1", "policyId": 1,
            "conditions": [cond("Assigned", "True", "Assigned")]}]}),
        );
        let reasons = |evs: Vec<Event>| {
            evs.into_iter()
                .map(|e| (e.reason, e.note.unwrap()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            reasons(events_for(None, &assigned)),
            [(
                "Assigned".to_string(),
                "172.18.0.100 assigned to node node1".to_string()
            )]
        );
        assert!(events_for(Some(&assigned), &assigned).is_empty());
        let moved = status(
            serde_json::json!({"ips": [{"egressIP": "172.18.0.100", "node": "node2", "policyId": 1,
            "conditions": [cond("Assigned", "True", "Assigned")]}]}),
        );
        assert_eq!(reasons(events_for(Some(&assigned), &moved))[0].0, "Moved");

        let bad = status(serde_json::json!({
            "conditions": [cond("Conflict", "True", "PodsSelectedByOlderEgressIP")],
            "ips": [{"egressIP": "172.18.0.11", "conditions": [cond("Conflict", "True", "NodeAddress"), cond("Invalid", "False", "Valid")]},
                    {"egressIP": "172.18.0.101", "conditions": [cond("Assigned", "False", "NoAvailableNode")]}]}));
        let r = reasons(events_for(None, &bad));
        let names: Vec<&str> = r.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "PodsSelectedByOlderEgressIP",
                "NodeAddress",
                "NoAvailableNode"
            ]
        );
        assert!(events_for(Some(&bad), &bad).is_empty());
    }

    #[test]
    fn events_report_exhausted_ids_and_apply_failures_once_per_message() {
        let failed = |msg: &str| {
            status(serde_json::json!({"ips": [
                {"egressIP": "172.18.0.100", "node": "node1", "policyId": 1,
                 "conditions": [cond("Assigned", "True", "Assigned"),
                    {"type": "Applied", "status": "False", "reason": "ApplyFailed", "message": msg,
                     "lastTransitionTime": "2026-05-01T12:00:00Z"}]},
                {"egressIP": "172.18.0.101",
                 "conditions": [cond("Assigned", "False", "NoPolicyId")]}]}))
        };
        let first = failed("node2: map full");
        let reasons: Vec<String> = events_for(None, &first)
            .into_iter()
            .map(|e| e.reason)
            .collect();
        assert_eq!(reasons, ["Assigned", "ApplyFailed", "NoPolicyId"]);
        assert!(events_for(Some(&first), &first).is_empty());
        // Another failure message is news; the id shortage is not.
        let other = failed("node3: map full");
        let reasons: Vec<String> = events_for(Some(&first), &other)
            .into_iter()
            .map(|e| e.reason)
            .collect();
        assert_eq!(reasons, ["ApplyFailed"]);
    }

    #[test]
    fn status_patch_clears_absent_fields() {
        let p = status_patch(&EgressIPStatus::default());
        assert_eq!(p["status"]["ips"], serde_json::Value::Null);
        assert!(p["status"].as_object().unwrap().contains_key("ips"));
        assert!(p["status"].as_object().unwrap().contains_key("conditions"));
        assert_eq!(p["status"]["items"], serde_json::json!([]));
    }

    fn view(renewing: &[&str], lapsed: &[&str], draining: &[&str]) -> ClaimView {
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        ClaimView {
            live_nodes: set(renewing),
            renewing: set(renewing),
            lapsed: set(lapsed),
            draining: set(draining),
            ..ClaimView::default()
        }
    }

    #[test]
    fn silence_alone_never_takes_ips_from_a_node_that_renews() {
        let all_silent: BTreeSet<String> = ["node1", "node2", "node3"].map(String::from).into();
        // The assigner's own heartbeat port is dead: every node is silent.
        // node1 and node2 renew their claims: they keep their IPs; node3
        // holds nothing and says nothing: no new IP goes to it.
        let v = view(&["node1", "node2"], &[], &[]);
        assert_eq!(
            unavailable(&v, &all_silent),
            BTreeSet::from(["node3".to_string()])
        );
    }

    #[test]
    fn a_lapsed_holder_is_down_even_if_something_answers_for_it() {
        let v = view(&["node2"], &["node1"], &["node3"]);
        assert_eq!(
            unavailable(&v, &BTreeSet::new()),
            BTreeSet::from(["node1".to_string(), "node3".to_string()])
        );
    }
}
