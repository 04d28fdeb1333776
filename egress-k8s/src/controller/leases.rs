//! The Lease requests of the node session: this node's claims Lease, the
//! per-IP locks (taken with a create or a version-conditioned replace,
//! released by their holder), and fresh reads of the other nodes' claims.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
};

use crate::{
    claims::{self, ClaimTracker},
    session::ClaimsWrite,
};

#[derive(Debug, thiserror::Error)]
pub(super) enum RequestError {
    #[error(transparent)]
    Kube(kube::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Runs `request` for at most `limit`: kube retries unavailable servers with
/// backoff, and a request stuck that long must count as failed rather than
/// hold up what depends on it.
pub(super) async fn bounded<T>(
    limit: Duration,
    request: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, RequestError> {
    tokio::time::timeout(limit, request)
        .await
        .map_err(|_| RequestError::Timeout(limit))?
        .map_err(RequestError::Kube)
}

/// Writes this node's claims Lease.
#[derive(Clone)]
pub(super) struct ClaimWriter {
    pub(super) api: Api<Lease>,
    pub(super) namespace: String,
    pub(super) node: String,
    pub(super) ttl: Duration,
    /// Bounds each write (half a renewal period: a stuck write delays the
    /// next attempt by at most that much).
    pub(super) timeout: Duration,
    /// This agent takes part in the assigner election.
    pub(super) assigner: bool,
}

impl ClaimWriter {
    /// Writes the claims Lease as `w` says; `Ok` means the claims are
    /// visible to others. Their lifetime counts from when this was called:
    /// the server may have applied it at any point since.
    pub(super) async fn write(&self, w: &ClaimsWrite) -> Result<(), RequestError> {
        bounded(self.timeout, self.write_unbounded(w)).await
    }

    fn annotations(&self, w: &ClaimsWrite) -> BTreeMap<String, Option<String>> {
        let mut out = BTreeMap::from([
            (
                claims::CLAIMED_ANNOTATION.into(),
                Some(claims::format_claims(&w.ips)),
            ),
            (
                claims::DRAINING_ANNOTATION.into(),
                Some(w.draining.to_string()),
            ),
            (
                claims::CLAIM_TTL_ANNOTATION.into(),
                Some(self.ttl.as_millis().to_string()),
            ),
            (
                claims::RESTART_GRACE_ANNOTATION.into(),
                w.restart_grace.map(|g| g.as_millis().to_string()),
            ),
            (
                claims::ASSIGNER_ANNOTATION.into(),
                Some(self.assigner.to_string()),
            ),
        ]);
        // No report yet: the previous agent's stays, it describes the
        // datapath that agent left in place.
        if let Some(r) = &w.report {
            out.extend(r.annotations().map(|(k, v)| (k, Some(v))));
        }
        out
    }

    async fn write_unbounded(&self, w: &ClaimsWrite) -> Result<(), kube::Error> {
        let name = claims::lease_name(&self.node);
        let annotations = self.annotations(w);
        let spec = LeaseSpec {
            holder_identity: Some(self.node.clone()),
            lease_duration_seconds: Some(self.ttl.as_secs_f64().ceil() as i32),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..Default::default()
        };
        // A merge patch, so that an absent annotation (no restart grace) is
        // removed: `null` in the patch.
        let patch = serde_json::json!({
            "metadata": {
                "labels": {claims::ROLE_LABEL: claims::ROLE_CLAIMS},
                "annotations": annotations,
            },
            "spec": spec,
        });
        match self
            .api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name),
                        namespace: Some(self.namespace.clone()),
                        labels: Some(BTreeMap::from([(
                            claims::ROLE_LABEL.into(),
                            claims::ROLE_CLAIMS.into(),
                        )])),
                        annotations: Some(
                            annotations
                                .into_iter()
                                .filter_map(|(k, v)| Some((k, v?)))
                                .collect(),
                        ),
                        ..Default::default()
                    },
                    spec: Some(spec),
                };
                self.api
                    .create(&PostParams::default(), &lease)
                    .await
                    .map(drop)
            }
            Err(e) => Err(e),
        }
    }
}

/// The claims Leases as the API server has them now (not the cache).
pub(super) async fn list_claims(
    api: &Api<Lease>,
    limit: Duration,
) -> Result<Vec<Lease>, RequestError> {
    let params =
        ListParams::default().labels(&format!("{}={}", claims::ROLE_LABEL, claims::ROLE_CLAIMS));
    bounded(limit, api.list(&params)).await.map(|l| l.items)
}

/// The other nodes' claims, read from the API server rather than the cache
/// and judged with `tracker` (the clock that judges the watched ones).
pub(super) async fn fresh_claims(
    api: &Api<Lease>,
    me: &str,
    tracker: &Mutex<ClaimTracker>,
    limit: Duration,
) -> Result<claims::ClaimView, RequestError> {
    let items = list_claims(api, limit).await?;
    let mine = claims::lease_name(me);
    let others: Vec<&Lease> = items
        .iter()
        .filter(|l| l.metadata.name.as_deref() != Some(mine.as_str()))
        .collect();
    let mut tracker = tracker.lock().expect("claim tracker poisoned");
    Ok(tracker.view(&others, Instant::now()))
}

/// Whether this node got an IP's lock.
#[derive(Debug)]
pub(super) enum LockOutcome {
    /// Ours; `replaced` is the lock version we replaced, if we took it over
    /// (our watch may still show that version for a while: it is not a loss).
    Acquired {
        replaced: Option<String>,
    },
    Refused(String),
}

fn lock_lease(namespace: &str, me: &str, ip: Ipv4Addr, previous: Option<&Lease>) -> Lease {
    let transitions = previous
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.lease_transitions)
        .unwrap_or(0);
    Lease {
        metadata: ObjectMeta {
            name: Some(claims::lock_name(ip)),
            namespace: Some(namespace.to_string()),
            resource_version: previous.and_then(|l| l.metadata.resource_version.clone()),
            labels: Some(BTreeMap::from([(
                claims::ROLE_LABEL.into(),
                claims::ROLE_IP_LOCK.into(),
            )])),
            annotations: Some(BTreeMap::from([(
                claims::LOCKED_IP_ANNOTATION.into(),
                ip.to_string(),
            )])),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(me.to_string()),
            acquire_time: Some(MicroTime(Timestamp::now())),
            lease_transitions: Some(transitions + i32::from(previous.is_some())),
            ..Default::default()
        }),
    }
}

/// Takes the lock Lease of `ip` for `me` with a create or a
/// version-conditioned replace, so that of two nodes racing for one IP
/// exactly one wins (see [`claims`]). `adopt` only confirms that the lock
/// already names us (a successor agent keeping its node's IPs): it never
/// creates nor takes one over.
pub(super) async fn acquire_lock(
    api: &Api<Lease>,
    namespace: &str,
    me: &str,
    ip: Ipv4Addr,
    clock: &Mutex<claims::VersionClock>,
    ttl: Duration,
    adopt: bool,
) -> Result<LockOutcome, kube::Error> {
    let current = api.get_opt(&claims::lock_name(ip)).await?;
    let now = Instant::now();
    let changed_recently = current
        .as_ref()
        .and_then(|l| clock.lock().expect("lock clock poisoned").note(l, now))
        .is_some_and(|t| now.saturating_duration_since(t) < ttl);
    let pp = PostParams::default();
    // The caller only asks for IPs nobody else has a live claim on.
    match claims::lock_step(current.as_ref(), me, None, changed_recently) {
        claims::LockStep::Held => Ok(LockOutcome::Acquired { replaced: None }),
        _ if adopt => Ok(LockOutcome::Refused(format!(
            "its lock no longer names {me}"
        ))),
        claims::LockStep::Busy { holder } => {
            Ok(LockOutcome::Refused(format!("its lock names {holder}")))
        }
        claims::LockStep::Create => {
            match api.create(&pp, &lock_lease(namespace, me, ip, None)).await {
                Ok(_) => Ok(LockOutcome::Acquired { replaced: None }),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(LockOutcome::Refused(
                    "another node created its lock first".into(),
                )),
                Err(e) => Err(e),
            }
        }
        claims::LockStep::Take { resource_version } => {
            let lease = lock_lease(namespace, me, ip, current.as_ref());
            match api.replace(&claims::lock_name(ip), &pp, &lease).await {
                Ok(_) => Ok(LockOutcome::Acquired {
                    replaced: Some(resource_version),
                }),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(LockOutcome::Refused(
                    "another node took its lock first".into(),
                )),
                Err(e) => Err(e),
            }
        }
    }
}

/// Clears `me` as the holder of the Lease `name`, with a replace conditioned
/// on the version read, so that a Lease someone else took meanwhile is left
/// alone. `Ok(true)` when we released it.
pub(super) async fn release_lease(
    api: &Api<Lease>,
    name: &str,
    me: &str,
) -> Result<bool, kube::Error> {
    let Some(mut lease) = api.get_opt(name).await? else {
        return Ok(false);
    };
    if claims::lock_holder(&lease) != Some(me) {
        return Ok(false);
    }
    if let Some(spec) = lease.spec.as_mut() {
        spec.holder_identity = None;
    }
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        // Someone else took it meanwhile: nothing to release.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Clears our name from the lock of `ip` (after its address is gone and our
/// claim withdrawn), so that operators and the next holder see it free.
/// Best effort: a lock whose holder no longer claims the IP is free anyway.
pub(super) async fn release_lock(
    api: &Api<Lease>,
    me: &str,
    ip: Ipv4Addr,
) -> Result<(), kube::Error> {
    release_lease(api, &claims::lock_name(ip), me)
        .await
        .map(drop)
}

/// Racing nodes against one API server: however the requests interleave,
/// exactly one ends up holding the IP's lock.
#[cfg(test)]
mod tests {
    use super::*;
    use egress_fake_api::FakeApi;
    use std::sync::Mutex;

    const NS: &str = "egress-system";

    const TTL: Duration = Duration::from_secs(10);

    /// `nodes` agents ask for the lock at once; those that knew `seen`
    /// (the lock as it was) for longer than the claim lifetime treat it
    /// as old. Returns the winners.
    async fn race(
        api: &Api<Lease>,
        ip: Ipv4Addr,
        nodes: usize,
        seen: Option<&Lease>,
    ) -> Vec<String> {
        let tasks: Vec<_> = (0..nodes)
            .map(|i| {
                let api = api.clone();
                let mut clock = claims::VersionClock::default();
                if let Some(lock) = seen {
                    clock.note(lock, Instant::now() - 2 * TTL);
                }
                let clock = Mutex::new(clock);
                tokio::spawn(async move {
                    let me = format!("node{i}");
                    let got = acquire_lock(&api, NS, &me, ip, &clock, TTL, false)
                        .await
                        .unwrap();
                    matches!(got, LockOutcome::Acquired { .. }).then_some(me)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for t in tasks {
            winners.extend(t.await.unwrap());
        }
        winners
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_winner_when_creating_and_when_taking_over() {
        let fake = FakeApi::start().await;
        let api: Api<Lease> = Api::namespaced(fake.client(), NS);
        let ip: Ipv4Addr = "10.0.0.12".parse().unwrap();

        let winners = race(&api, ip, 8, None).await;
        assert_eq!(winners.len(), 1, "creators that won: {winners:?}");
        let lock = api.get(&claims::lock_name(ip)).await.unwrap();
        assert_eq!(claims::lock_holder(&lock), Some(winners[0].as_str()));

        // A lock taken just now is respected even though its holder has
        // not published a claim yet.
        let late = race(&api, ip, 8, None).await;
        assert_eq!(late, winners, "only the holder itself holds it");

        // The holder's claim is gone (no live holders are passed) and the
        // lock is old: everyone races to take it over; the version
        // precondition lets exactly one other node through.
        let old = lock.clone();
        let takers: Vec<String> = race(&api, ip, 8, Some(&old))
            .await
            .into_iter()
            .filter(|w| *w != winners[0])
            .collect();
        assert_eq!(takers.len(), 1, "takers that won: {takers:?}");
        let lock = api.get(&claims::lock_name(ip)).await.unwrap();
        assert_eq!(claims::lock_holder(&lock), Some(takers[0].as_str()));
        assert_eq!(lock.spec.as_ref().unwrap().lease_transitions, Some(1));

        // Only the holder can release it; a released lock is free at once.
        release_lock(&api, &winners[0], ip).await.unwrap();
        assert_eq!(
            claims::lock_holder(&api.get(&claims::lock_name(ip)).await.unwrap()),
            Some(takers[0].as_str())
        );
        release_lock(&api, &takers[0], ip).await.unwrap();
        let lock = api.get(&claims::lock_name(ip)).await.unwrap();
        assert_eq!(claims::lock_holder(&lock), None);
        let after_release = race(&api, ip, 8, None).await;
        assert_eq!(after_release.len(), 1, "{after_release:?}");
    }

    /// The datapath report goes out in the claims writes; a write without
    /// one (a new agent that has not applied anything yet) keeps the one
    /// the Lease carries, which describes the datapath left in place.
    #[tokio::test]
    async fn claims_writes_carry_the_datapath_report() {
        use crate::report::{DatapathReport, FAILED_ANNOTATION, PRESENT_ANNOTATION};
        let fake = FakeApi::start().await;
        let api: Api<Lease> = Api::namespaced(fake.client(), NS);
        let writer = ClaimWriter {
            api: api.clone(),
            namespace: NS.into(),
            node: "node1".into(),
            ttl: TTL,
            timeout: TTL,
            assigner: false,
        };
        let ip: Ipv4Addr = "10.0.0.14".parse().unwrap();
        let report = DatapathReport {
            present: [1, 2, 3].into(),
            failed: BTreeMap::from([(4, "map full".to_string())]),
        };
        let w = ClaimsWrite {
            ips: [ip].into(),
            report: Some(report.clone()),
            ..Default::default()
        };
        writer.write(&w).await.unwrap();
        let lease = api.get(&claims::lease_name("node1")).await.unwrap();
        assert_eq!(DatapathReport::from_lease(&lease), Some(report.clone()));
        let annotations = lease.metadata.annotations.unwrap();
        assert_eq!(annotations[PRESENT_ANNOTATION], "1-3");
        assert_eq!(annotations[FAILED_ANNOTATION], r#"{"4":"map full"}"#);

        writer
            .write(&ClaimsWrite {
                report: None,
                ..w.clone()
            })
            .await
            .unwrap();
        let lease = api.get(&claims::lease_name("node1")).await.unwrap();
        assert_eq!(DatapathReport::from_lease(&lease), Some(report));

        let applied = DatapathReport {
            present: [1].into(),
            failed: BTreeMap::new(),
        };
        writer
            .write(&ClaimsWrite {
                report: Some(applied.clone()),
                ..w
            })
            .await
            .unwrap();
        let lease = api.get(&claims::lease_name("node1")).await.unwrap();
        assert_eq!(DatapathReport::from_lease(&lease), Some(applied));
    }

    /// Adopting only confirms: a lock in our name is ours, anything else
    /// (free, missing, another node's) is refused and left as it is.
    #[tokio::test]
    async fn adopting_never_creates_nor_takes_a_lock() {
        let fake = FakeApi::start().await;
        let api: Api<Lease> = Api::namespaced(fake.client(), NS);
        let ip: Ipv4Addr = "10.0.0.13".parse().unwrap();
        let clock = Mutex::new(claims::VersionClock::default());
        let adopt = |me: &'static str| {
            let (api, clock) = (api.clone(), &clock);
            async move {
                acquire_lock(&api, NS, me, ip, clock, TTL, true)
                    .await
                    .unwrap()
            }
        };
        assert!(matches!(adopt("node1").await, LockOutcome::Refused(_)));
        assert!(api.get_opt(&claims::lock_name(ip)).await.unwrap().is_none());
        let got = acquire_lock(&api, NS, "node1", ip, &clock, TTL, false)
            .await
            .unwrap();
        assert!(matches!(got, LockOutcome::Acquired { replaced: None }));
        let version = api
            .get(&claims::lock_name(ip))
            .await
            .unwrap()
            .metadata
            .resource_version;
        assert!(matches!(
            adopt("node1").await,
            LockOutcome::Acquired { replaced: None }
        ));
        assert!(matches!(adopt("node2").await, LockOutcome::Refused(_)));
        let after = api.get(&claims::lock_name(ip)).await.unwrap();
        assert_eq!(
            after.metadata.resource_version, version,
            "the lock is untouched"
        );
    }
}
