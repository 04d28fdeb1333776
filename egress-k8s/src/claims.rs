//! Address claims: each node's record of the egress IPs it holds, and the
//! observer-side judgement of whether another node's record is still live.
//!
//! A node publishes its claims in a `coordination.k8s.io/v1` Lease of its own
//! (`egress-claims-<node>` in the agent namespace) and renews it while it can.
//! Other nodes never compare timestamps written by someone else's clock: like
//! client-go's leader election they note, with their own monotonic clock, when
//! they last saw the lease change, and treat the claim as expired once it has
//! not changed for the claim lifetime. So clock skew cannot make two nodes
//! hold one IP; a holder that cannot renew for that long withdraws by itself.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use k8s_openapi::api::coordination::v1::Lease;

/// Annotation on a claims Lease: the comma-separated egress IPs its node holds.
pub const CLAIMED_ANNOTATION: &str = "egress.example.dev/claimed-ips";
/// Annotation on a claims Lease: `"true"` while the node shuts down and hands
/// its IPs over; the assigner moves them away.
pub const DRAINING_ANNOTATION: &str = "egress.example.dev/draining";
/// Label selecting the claims Leases.
pub const ROLE_LABEL: &str = "egress.example.dev/role";
pub const ROLE_CLAIMS: &str = "claims";

pub fn lease_name(node: &str) -> String {
    format!("egress-claims-{node}")
}

pub fn format_claims(ips: &BTreeSet<Ipv4Addr>) -> String {
    ips.iter()
        .map(|ip| ip.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

pub fn parse_claims(raw: &str) -> BTreeSet<Ipv4Addr> {
    raw.split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// What the claims Leases say, judged live or not with the local clock.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClaimView {
    /// IP -> nodes whose claim on it is live.
    pub live: BTreeMap<Ipv4Addr, BTreeSet<String>>,
    /// Nodes that announced they are shutting down.
    pub draining: BTreeSet<String>,
}

#[derive(Debug)]
pub struct ClaimTracker {
    ttl: Duration,
    /// Lease name -> (resourceVersion last seen, when it was first seen).
    seen: HashMap<String, (String, Instant)>,
}

impl ClaimTracker {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            seen: HashMap::new(),
        }
    }

    /// Judges the claims in `leases` at `now`.
    pub fn view(&mut self, leases: &[&Lease], now: Instant) -> ClaimView {
        let mut view = ClaimView::default();
        let mut present = BTreeSet::new();
        for lease in leases {
            let (Some(name), Some(rv)) = (&lease.metadata.name, &lease.metadata.resource_version)
            else {
                continue;
            };
            present.insert(name.clone());
            let entry = self
                .seen
                .entry(name.clone())
                .or_insert_with(|| (rv.clone(), now));
            if &entry.0 != rv {
                *entry = (rv.clone(), now);
            }
            let spec = lease.spec.as_ref();
            let declared = spec
                .and_then(|s| s.lease_duration_seconds)
                .map(|s| Duration::from_secs(s.max(0) as u64))
                .unwrap_or_default();
            let ttl = self.ttl.max(declared);
            let Some(holder) = spec.and_then(|s| s.holder_identity.clone()) else {
                continue;
            };
            if now.saturating_duration_since(entry.1) >= ttl {
                continue;
            }
            let annotations = lease.metadata.annotations.as_ref();
            if annotations
                .and_then(|a| a.get(DRAINING_ANNOTATION))
                .is_some_and(|v| v == "true")
            {
                view.draining.insert(holder.clone());
            }
            for ip in annotations
                .and_then(|a| a.get(CLAIMED_ANNOTATION))
                .map(|raw| parse_claims(raw))
                .unwrap_or_default()
            {
                view.live.entry(ip).or_default().insert(holder.clone());
            }
        }
        self.seen.retain(|k, _| present.contains(k));
        view
    }

    /// When the next live claim would expire if nothing changes: the caller
    /// re-evaluates then.
    pub fn next_expiry(&self, now: Instant) -> Option<Duration> {
        self.seen
            .values()
            .map(|(_, t)| (*t + self.ttl).saturating_duration_since(now))
            .filter(|d| !d.is_zero())
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(node: &str, rv: &str, ips: &str, draining: bool) -> Lease {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": lease_name(node),
                "namespace": "egress-system",
                "resourceVersion": rv,
                "labels": {ROLE_LABEL: ROLE_CLAIMS},
                "annotations": {CLAIMED_ANNOTATION: ips, DRAINING_ANNOTATION: draining.to_string()}
            },
            "spec": {
                "holderIdentity": node,
                "leaseDurationSeconds": 1,
                // Written by a clock far in the future: never read.
                "renewTime": "2099-01-01T00:00:00.000000Z"
            }
        }))
        .unwrap()
    }

    #[test]
    fn claims_live_while_renewed_and_expire_by_the_local_clock() {
        let mut t = ClaimTracker::new(Duration::from_secs(2));
        let t0 = Instant::now();
        let a = lease("node1", "10", "172.18.0.100,172.18.0.101", false);
        let v = t.view(&[&a], t0);
        assert_eq!(v.live.len(), 2);
        assert_eq!(
            v.live[&"172.18.0.100".parse().unwrap()],
            BTreeSet::from(["node1".to_string()])
        );
        // Unchanged for 1.5 s: still live. Renewed at 1.5 s: live until 3.5 s.
        assert_eq!(
            t.view(&[&a], t0 + Duration::from_millis(1500)).live.len(),
            2
        );
        let a2 = lease("node1", "11", "172.18.0.100,172.18.0.101", false);
        assert_eq!(
            t.view(&[&a2], t0 + Duration::from_millis(1500)).live.len(),
            2
        );
        assert_eq!(
            t.view(&[&a2], t0 + Duration::from_millis(3400)).live.len(),
            2
        );
        assert_eq!(
            t.next_expiry(t0 + Duration::from_millis(3400)),
            Some(Duration::from_millis(100))
        );
        assert!(
            t.view(&[&a2], t0 + Duration::from_millis(3500))
                .live
                .is_empty()
        );
    }

    #[test]
    fn released_and_draining_claims() {
        let mut t = ClaimTracker::new(Duration::from_secs(2));
        let now = Instant::now();
        let v = t.view(
            &[
                &lease("node1", "1", "", true),
                &lease("node2", "1", "172.18.0.110", false),
            ],
            now,
        );
        assert_eq!(v.draining, BTreeSet::from(["node1".to_string()]));
        assert_eq!(v.live.len(), 1);
        assert_eq!(
            parse_claims(" 172.18.0.1, bogus,172.18.0.2"),
            BTreeSet::from(["172.18.0.1".parse().unwrap(), "172.18.0.2".parse().unwrap()])
        );
    }
}
