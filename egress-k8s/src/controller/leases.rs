//! The Lease writes: this node's claims Lease, the per-IP locks (taken with
//! a create or a version-conditioned replace, released by their holder),
//! and fresh reads of the other nodes' claims.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams, PostParams},
};
use tracing::info;

use crate::claims::{self, ClaimTracker};

#[derive(Debug, thiserror::Error)]
pub(super) enum RequestError {
    #[error(transparent)]
    Kube(kube::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

pub(super) struct ClaimWriter {
    pub(super) api: Api<Lease>,
    pub(super) namespace: String,
    pub(super) node: String,
    pub(super) ttl: Duration,
    pub(super) renew: Duration,
    pub(super) timeout: Duration,
    pub(super) published: Option<BTreeSet<Ipv4Addr>>,
    pub(super) draining: bool,
    pub(super) last_renew: Option<Instant>,
}

impl ClaimWriter {
    /// Writes the claims Lease; `Ok` means the claims are visible to others.
    /// Bounded by the renewal period: kube retries unavailable servers with
    /// backoff, and a write stuck that long must count as a failed renewal
    /// rather than stall the loop that withdraws our IPs.
    pub(super) async fn write(
        &mut self,
        ips: &BTreeSet<Ipv4Addr>,
        draining: bool,
    ) -> Result<(), RequestError> {
        let limit = self.timeout;
        tokio::time::timeout(limit, self.write_unbounded(ips, draining))
            .await
            .map_err(|_| RequestError::Timeout(limit))?
            .map_err(RequestError::Kube)
    }

    async fn write_unbounded(
        &mut self,
        ips: &BTreeSet<Ipv4Addr>,
        draining: bool,
    ) -> Result<(), kube::Error> {
        let name = claims::lease_name(&self.node);
        let now = MicroTime(Timestamp::now());
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    claims::ROLE_LABEL.into(),
                    claims::ROLE_CLAIMS.into(),
                )])),
                annotations: Some(BTreeMap::from([
                    (
                        claims::CLAIMED_ANNOTATION.into(),
                        claims::format_claims(ips),
                    ),
                    (claims::DRAINING_ANNOTATION.into(), draining.to_string()),
                    (
                        claims::CLAIM_TTL_ANNOTATION.into(),
                        self.ttl.as_millis().to_string(),
                    ),
                ])),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.node.clone()),
                lease_duration_seconds: Some(self.ttl.as_secs_f64().ceil() as i32),
                renew_time: Some(now),
                ..Default::default()
            }),
        };
        let started = Instant::now();
        match self
            .api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&lease))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {
                self.api.create(&PostParams::default(), &lease).await?;
            }
            Err(e) => return Err(e),
        }
        // The renewal counts from when it was sent: the server may have
        // applied it at any point since.
        self.last_renew = Some(started);
        if self.published.as_ref() != Some(ips) || self.draining != draining {
            info!(node = %self.node, claims = %claims::format_claims(ips), draining, "published claims");
        }
        self.published = Some(ips.clone());
        self.draining = draining;
        Ok(())
    }

    /// Others may take our IPs `ttl` after they last saw our Lease change,
    /// which is no earlier than when we sent the renewal. We give up one
    /// renewal period before that, so that the agent has time to remove the
    /// addresses before anyone else can claim them.
    pub(super) fn withdraw_at(&self) -> Option<Instant> {
        self.last_renew
            .map(|t| t + self.ttl.saturating_sub(self.renew))
    }

    /// Nothing claimed and not draining: there is nothing to keep live, so
    /// the Lease is not renewed (on a large cluster only the few nodes that
    /// hold IPs write every renewal period).
    pub(super) fn idle(&self) -> bool {
        !self.draining && self.published.as_ref().is_some_and(BTreeSet::is_empty)
    }

    pub(super) fn may_hold(&self, now: Instant) -> bool {
        self.idle() || self.withdraw_at().is_some_and(|deadline| now < deadline)
    }

    /// How long until the next renewal is due; a failed renewal is retried
    /// after a quarter period rather than at once.
    pub(super) fn until_renewal(&self, now: Instant) -> Duration {
        if self.idle() {
            return Duration::MAX;
        }
        self.last_renew
            .map_or(Duration::ZERO, |t| {
                (t + self.renew).saturating_duration_since(now)
            })
            .max(self.renew / 4)
    }
}

/// The other nodes' claims, read from the API server rather than the cache.
pub(super) async fn fresh_claims(
    api: &Api<Lease>,
    me: &str,
    tracker: &mut ClaimTracker,
    limit: Duration,
) -> Result<claims::ClaimView, RequestError> {
    let params = kube::api::ListParams::default().labels(&format!(
        "{}={}",
        claims::ROLE_LABEL,
        claims::ROLE_CLAIMS
    ));
    let list = tokio::time::timeout(limit, api.list(&params))
        .await
        .map_err(|_| RequestError::Timeout(limit))?
        .map_err(RequestError::Kube)?;
    let mine = claims::lease_name(me);
    let others: Vec<&Lease> = list
        .items
        .iter()
        .filter(|l| l.metadata.name.as_deref() != Some(mine.as_str()))
        .collect();
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
/// exactly one wins (see [`claims`]).
pub(super) async fn acquire_lock(
    api: &Api<Lease>,
    namespace: &str,
    me: &str,
    ip: Ipv4Addr,
    clock: &mut claims::VersionClock,
    ttl: Duration,
) -> Result<LockOutcome, kube::Error> {
    let current = api.get_opt(&claims::lock_name(ip)).await?;
    let now = Instant::now();
    let changed_recently = current
        .as_ref()
        .and_then(|l| clock.note(l, now))
        .is_some_and(|t| now.saturating_duration_since(t) < ttl);
    let pp = PostParams::default();
    // The caller only asks for IPs nobody else has a live claim on.
    match claims::lock_step(current.as_ref(), me, None, changed_recently) {
        claims::LockStep::Held => Ok(LockOutcome::Acquired { replaced: None }),
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

/// The locks we hold that our watch shows in someone else's name, ignoring
/// the version we replaced when we took a lock over (the watch may lag).
pub(super) fn lost_locks(
    locks: &[Arc<Lease>],
    me: &str,
    held: &BTreeMap<Ipv4Addr, Option<String>>,
) -> Vec<(Ipv4Addr, String)> {
    locks
        .iter()
        .filter_map(|lock| {
            let ip: Ipv4Addr = lock
                .annotations()
                .get(claims::LOCKED_IP_ANNOTATION)?
                .parse()
                .ok()?;
            let replaced = held.get(&ip)?;
            let holder = claims::lock_holder(lock)?;
            let stale = replaced.is_some() && lock.metadata.resource_version == *replaced;
            (holder != me && !stale).then(|| (ip, holder.to_string()))
        })
        .collect()
}

/// Racing nodes against one API server: however the requests interleave,
/// exactly one ends up holding the IP's lock.
#[cfg(test)]
mod tests {
    use super::*;
    use egress_fake_api::FakeApi;

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
                tokio::spawn(async move {
                    let me = format!("node{i}");
                    let got = acquire_lock(&api, NS, &me, ip, &mut clock, TTL)
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

    #[test]
    fn a_lock_in_another_name_is_lost_unless_it_is_the_version_we_replaced() {
        let lock = |holder: &str, rv: &str, ip: &str| {
            Arc::new(
                serde_json::from_value::<Lease>(serde_json::json!({
                    "metadata": {
                        "name": claims::lock_name(ip.parse().unwrap()),
                        "resourceVersion": rv,
                        "annotations": {claims::LOCKED_IP_ANNOTATION: ip}
                    },
                    "spec": {"holderIdentity": holder}
                }))
                .unwrap(),
            )
        };
        let a: Ipv4Addr = "10.0.0.12".parse().unwrap();
        let b: Ipv4Addr = "10.0.0.13".parse().unwrap();
        let held = BTreeMap::from([(a, Some("4".to_string())), (b, None)]);
        // Still showing the version we replaced: the watch lags.
        assert!(lost_locks(&[lock("node2", "4", "10.0.0.12")], "node1", &held).is_empty());
        assert_eq!(
            lost_locks(&[lock("node2", "9", "10.0.0.12")], "node1", &held),
            vec![(a, "node2".to_string())]
        );
        assert_eq!(
            lost_locks(&[lock("node3", "2", "10.0.0.13")], "node1", &held),
            vec![(b, "node3".to_string())]
        );
        // Ours, released, or not one we hold: nothing lost.
        assert!(
            lost_locks(
                &[
                    lock("node1", "9", "10.0.0.12"),
                    lock("", "3", "10.0.0.13"),
                    lock("node2", "1", "10.0.0.14"),
                ],
                "node1",
                &held
            )
            .is_empty()
        );
    }
}
