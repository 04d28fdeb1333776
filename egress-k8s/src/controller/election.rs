//! Leader election with a `coordination.k8s.io` Lease; the leader runs the
//! assigner.

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

/// Leader election with a `coordination.k8s.io` Lease; the leader runs the
/// assigner.
pub(super) async fn elect(
    client: Client,
    me: String,
    options: Options,
    down: watch::Receiver<BTreeSet<String>>,
) {
    let api: Api<Lease> = Api::namespaced(client.clone(), &options.namespace);
    let mut observed: Option<(String, Instant)> = None;
    let mut last_renew: Option<Instant> = None;
    // Dropping the guard aborts the assigner (also when this future is dropped).
    let mut assigner: Option<AbortOnDrop> = None;
    loop {
        let attempt = Instant::now();
        match tokio::time::timeout(
            options.leader_renew,
            try_lead(&api, &me, &options, &mut observed),
        )
        .await
        {
            Ok(Ok(true)) => last_renew = Some(attempt),
            Ok(Ok(false)) => last_renew = None,
            Ok(Err(e)) => warn!(error = %e, "leader election"),
            Err(_) => warn!(timeout = ?options.leader_renew, "leader election: no answer"),
        }
        let leading = last_renew.is_some_and(|t| t.elapsed() < options.leader_ttl);
        match (&assigner, leading) {
            (None, true) => {
                info!(identity = %me, "elected assigner");
                let (client, options, down) = (client.clone(), options.clone(), down.clone());
                let me = me.clone();
                assigner = Some(AbortOnDrop(Some(tokio::spawn(async move {
                    assign_loop(client, me, options, down).await
                }))));
            }
            (Some(_), false) => {
                warn!(identity = %me, "lost the assigner lease");
                assigner = None;
            }
            _ => {}
        }
        tokio::time::sleep(options.leader_renew).await;
    }
}

pub(super) async fn release_leadership(
    client: &Client,
    me: &str,
    options: &Options,
) -> Result<(), kube::Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &options.namespace);
    if release_lease(&api, &options.leader_lease, me).await? {
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
    let duration = options.leader_ttl.as_secs().max(1) as i32;
    let Some(mut lease) = api.get_opt(&options.leader_lease).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(options.leader_lease.clone()),
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
    let spec = lease.spec.get_or_insert_with(Default::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder != me {
        let changed = observed.as_ref().is_none_or(|(r, _)| *r != rv);
        if changed {
            *observed = Some((rv.clone(), Instant::now()));
        }
        let ttl =
            Duration::from_secs(spec.lease_duration_seconds.unwrap_or(duration).max(0) as u64);
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
        .replace(&options.leader_lease, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
