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
//!
//! Reading the others' claims and then writing ours is not atomic: two nodes
//! that both saw an IP unclaimed (after the status flipped between them)
//! could both publish it. So each IP also has a lock: a Lease of its own
//! (`egress-ip-<ip>`) naming its holder, taken only by create or by a replace
//! conditioned on the resourceVersion that was judged free. The API server
//! lets exactly one of two racing nodes win; a node publishes a claim only
//! while it holds the IP's lock, and drops the claim when it sees the lock
//! name someone else.

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
/// Annotation on a claims Lease: its holder's claim lifetime in
/// milliseconds. `leaseDurationSeconds` (whole seconds) says the same for
/// operators but would round a 1.5 s lifetime up to 2 s.
pub const CLAIM_TTL_ANNOTATION: &str = "egress.example.dev/claim-ttl-ms";
/// Annotation on a claims Lease: set by an agent that stops for a restart
/// (not a drain) while holding IPs: the restart grace in milliseconds.
/// Everyone treats the claims as live that long after they saw this version
/// (no clock of the writer is read), and the assigner keeps the IPs on the
/// node meanwhile; the successor's first renewal removes it.
pub const RESTART_GRACE_ANNOTATION: &str = "egress.example.dev/restart-grace-ms";
/// Annotation on a claims Lease: `"true"` when the node's agent takes part
/// in the assigner election (see `controller::election`).
pub const ASSIGNER_ANNOTATION: &str = "egress.example.dev/assigner";
/// Label selecting the claims Leases.
pub const ROLE_LABEL: &str = "egress.example.dev/role";
pub const ROLE_CLAIMS: &str = "claims";

pub fn lease_name(node: &str) -> String {
    format!("egress-claims-{node}")
}

/// Label value of the per-IP lock Leases.
pub const ROLE_IP_LOCK: &str = "ip-lock";
/// Annotation on a lock Lease: the egress IP it guards (for operators).
pub const LOCKED_IP_ANNOTATION: &str = "egress.example.dev/egress-ip";

/// Name of the lock Lease of `ip`: `egress-ip-10-0-0-12`.
pub fn lock_name(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("egress-ip-{a}-{b}-{c}-{d}")
}

/// The holder a Lease names, if any (lock, claims or leader Lease alike).
pub fn lock_holder(lock: &Lease) -> Option<&str> {
    lock.spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty())
}

/// What a node that wants an IP does with the IP's lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockStep {
    /// No lock yet: create it naming us (fails if someone else just did).
    Create,
    /// Ours already.
    Held,
    /// Free (released, or its holder's claim on the IP is no longer live):
    /// replace it naming us, on condition that it is still this version.
    Take { resource_version: String },
    /// Another node holds it with a live claim.
    Busy { holder: String },
}

/// Decides, from the lock as last read and the live claims (judged with our
/// own clock, see [`ClaimTracker`]), how `me` may take the lock.
///
/// A holder whose claim on the IP is not live still keeps the lock while the
/// lock changed within the claim lifetime (`changed_recently`): it may have
/// just taken it and not yet published its claim.
pub fn lock_step(
    lock: Option<&Lease>,
    me: &str,
    live_holders: Option<&BTreeSet<String>>,
    changed_recently: bool,
) -> LockStep {
    let Some(lock) = lock else {
        return LockStep::Create;
    };
    match lock_holder(lock) {
        Some(h) if h == me => LockStep::Held,
        Some(h) if changed_recently || live_holders.is_some_and(|l| l.contains(h)) => {
            LockStep::Busy {
                holder: h.to_string(),
            }
        }
        // A lock without a version cannot be replaced safely: treat it as busy.
        _ => match &lock.metadata.resource_version {
            Some(rv) => LockStep::Take {
                resource_version: rv.clone(),
            },
            None => LockStep::Busy {
                holder: lock_holder(lock).unwrap_or_default().to_string(),
            },
        },
    }
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
    /// Nodes whose Lease changed within its lifetime: they renew (or
    /// restart within their grace).
    pub live_nodes: BTreeSet<String>,
    /// Live nodes whose Lease changed within the tracker's `stale_after`
    /// (a holder renews every period: one that missed two is late), or
    /// that restart within their grace.
    pub renewing: BTreeSet<String>,
    /// Nodes whose Lease lists IPs but has not changed for its lifetime:
    /// they stopped renewing while holding, so they have withdrawn (alive
    /// but cut off from the API server) or are dead. A Lease-based signal
    /// that the node is down, needing no other observer.
    pub lapsed: BTreeSet<String>,
    /// Live nodes under a restart grace.
    pub restarting: BTreeSet<String>,
}

/// When each Lease was first seen at its current resourceVersion, by the
/// local monotonic clock.
#[derive(Debug, Default)]
pub struct VersionClock {
    /// Lease name -> (resourceVersion last seen, when it was first seen).
    seen: HashMap<String, (String, Instant)>,
}

impl VersionClock {
    /// Notes `lease` as seen at `now`; returns when it was first seen at its
    /// current version (`None` for a Lease without name or version).
    pub fn note(&mut self, lease: &Lease, now: Instant) -> Option<Instant> {
        let (Some(name), Some(rv)) = (&lease.metadata.name, &lease.metadata.resource_version)
        else {
            return None;
        };
        let entry = self
            .seen
            .entry(name.clone())
            .or_insert_with(|| (rv.clone(), now));
        if &entry.0 != rv {
            *entry = (rv.clone(), now);
        }
        Some(entry.1)
    }

    /// Forgets Leases not in `present`.
    pub fn retain(&mut self, present: &BTreeSet<String>) {
        self.seen.retain(|k, _| present.contains(k));
    }

    fn first_seen(&self, name: &str) -> Option<Instant> {
        self.seen.get(name).map(|(_, t)| *t)
    }
}

#[derive(Debug)]
pub struct ClaimTracker {
    ttl: Duration,
    /// See [`ClaimView::renewing`]; each Lease's lifetime unless set.
    stale_after: Option<Duration>,
    seen: VersionClock,
    /// Lease name -> the lifetime its claims are judged by.
    lifetimes: HashMap<String, Duration>,
}

/// The lifetime of the claims in `lease`: the longest of ours, the one its
/// holder declares (agents of a rollout may be configured differently) and
/// its restart grace.
fn lifetime(lease: &Lease, ours: Duration) -> Duration {
    ours.max(declared_lifetime(lease))
        .max(restart_grace(lease).unwrap_or_default())
}

/// The restart grace a claims Lease declares.
pub fn restart_grace(lease: &Lease) -> Option<Duration> {
    lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(RESTART_GRACE_ANNOTATION))
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis)
}

fn declared_lifetime(lease: &Lease) -> Duration {
    let declared_ms = lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CLAIM_TTL_ANNOTATION))
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis);
    declared_ms.unwrap_or_else(|| {
        lease
            .spec
            .as_ref()
            .and_then(|s| s.lease_duration_seconds)
            .map(|s| Duration::from_secs(s.max(0) as u64))
            .unwrap_or_default()
    })
}

impl ClaimTracker {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            stale_after: None,
            seen: VersionClock::default(),
            lifetimes: HashMap::new(),
        }
    }

    /// Judges a live node as no longer renewing once its Lease has not
    /// changed for `d` (see [`ClaimView::renewing`]).
    pub fn with_stale_after(mut self, d: Duration) -> Self {
        self.stale_after = Some(d);
        self
    }

    /// Judges the claims in `leases` at `now`.
    pub fn view(&mut self, leases: &[&Lease], now: Instant) -> ClaimView {
        let mut view = ClaimView::default();
        let mut present = BTreeSet::new();
        for lease in leases {
            let Some(changed_at) = self.seen.note(lease, now) else {
                continue;
            };
            let Some(name) = lease.metadata.name.clone() else {
                continue;
            };
            let ttl = lifetime(lease, self.ttl);
            self.lifetimes.insert(name.clone(), ttl);
            present.insert(name);
            let spec = lease.spec.as_ref();
            let Some(holder) = spec.and_then(|s| s.holder_identity.clone()) else {
                continue;
            };
            let annotations = lease.metadata.annotations.as_ref();
            let claimed = annotations
                .and_then(|a| a.get(CLAIMED_ANNOTATION))
                .map(|raw| parse_claims(raw))
                .unwrap_or_default();
            if now.saturating_duration_since(changed_at) >= ttl {
                if !claimed.is_empty() {
                    view.lapsed.insert(holder);
                }
                continue;
            }
            view.live_nodes.insert(holder.clone());
            let restarting = restart_grace(lease).is_some();
            if restarting {
                view.restarting.insert(holder.clone());
            }
            if restarting
                || now.saturating_duration_since(changed_at) < self.stale_after.unwrap_or(ttl)
            {
                view.renewing.insert(holder.clone());
            }
            if annotations
                .and_then(|a| a.get(DRAINING_ANNOTATION))
                .is_some_and(|v| v == "true")
            {
                view.draining.insert(holder.clone());
            }
            for ip in claimed {
                view.live.entry(ip).or_default().insert(holder.clone());
            }
        }
        self.seen.retain(&present);
        self.lifetimes.retain(|k, _| present.contains(k));
        view
    }

    /// When the next live claim would expire (or turn stale) if nothing
    /// changes: the caller re-evaluates then.
    pub fn next_expiry(&self, now: Instant) -> Option<Duration> {
        self.lifetimes
            .iter()
            .filter_map(|(name, ttl)| Some((self.seen.first_seen(name)?, *ttl)))
            .flat_map(|(seen, ttl)| [Some(seen + ttl), self.stale_after.map(|d| seen + d)])
            .flatten()
            .map(|t| t.saturating_duration_since(now))
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

    fn lock(holder: Option<&str>, rv: &str) -> Lease {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": lock_name("10.0.0.12".parse().unwrap()), "resourceVersion": rv},
            "spec": {"holderIdentity": holder}
        }))
        .unwrap()
    }

    #[test]
    fn lock_steps() {
        let live = BTreeSet::from(["node2".to_string()]);
        assert_eq!(
            lock_name("10.0.0.12".parse().unwrap()),
            "egress-ip-10-0-0-12"
        );
        assert_eq!(lock_step(None, "node1", None, false), LockStep::Create);
        assert_eq!(
            lock_step(Some(&lock(Some("node1"), "5")), "node1", Some(&live), true),
            LockStep::Held
        );
        let busy = LockStep::Busy {
            holder: "node2".into(),
        };
        assert_eq!(
            lock_step(Some(&lock(Some("node2"), "5")), "node1", Some(&live), false),
            busy
        );
        // node2 took the lock moments ago and has not published its claim yet.
        assert_eq!(
            lock_step(Some(&lock(Some("node2"), "5")), "node1", None, true),
            busy
        );
        // node2 no longer claims the IP (expired or released) and the lock is
        // old: take it, but only if nobody changed the lock since we read it.
        assert_eq!(
            lock_step(Some(&lock(Some("node2"), "5")), "node1", None, false),
            LockStep::Take {
                resource_version: "5".into()
            }
        );
        // Released locks are free at once, even if released just now.
        assert_eq!(
            lock_step(Some(&lock(None, "7")), "node1", Some(&live), true),
            LockStep::Take {
                resource_version: "7".into()
            }
        );
        assert_eq!(
            lock_step(Some(&lock(Some(""), "8")), "node1", None, true),
            LockStep::Take {
                resource_version: "8".into()
            }
        );
    }

    #[test]
    fn a_declared_lifetime_in_milliseconds_is_used_exactly_and_drives_the_next_wake_up() {
        let mut t = ClaimTracker::new(Duration::from_secs(1));
        let t0 = Instant::now();
        let mut a = lease("node1", "1", "172.18.0.100", false);
        // leaseDurationSeconds would say 2 (rounded up); the annotation says 1.5 s.
        a.spec.as_mut().unwrap().lease_duration_seconds = Some(2);
        a.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(CLAIM_TTL_ANNOTATION.into(), "1500".into());
        assert_eq!(t.view(&[&a], t0).live.len(), 1);
        assert_eq!(
            t.next_expiry(t0 + Duration::from_millis(1000)),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            t.view(&[&a], t0 + Duration::from_millis(1499)).live.len(),
            1
        );
        assert!(
            t.view(&[&a], t0 + Duration::from_millis(1500))
                .live
                .is_empty()
        );
        // Without the annotation the whole seconds count.
        let mut t = ClaimTracker::new(Duration::from_secs(1));
        let b = lease("node2", "1", "172.18.0.101", false);
        let mut b2 = b.clone();
        b2.spec.as_mut().unwrap().lease_duration_seconds = Some(3);
        t.view(&[&b2], t0);
        assert_eq!(t.next_expiry(t0), Some(Duration::from_secs(3)));
    }

    #[test]
    fn a_holder_that_stops_renewing_lapses_an_idle_one_does_not_and_a_restart_grace_keeps_it_live()
    {
        let mut t = ClaimTracker::new(Duration::from_secs(2));
        let t0 = Instant::now();
        let holder = lease("node1", "1", "172.18.0.100", false);
        let idle = lease("node2", "1", "", false);
        let mut restarting = lease("node3", "1", "172.18.0.101", false);
        restarting
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(RESTART_GRACE_ANNOTATION.into(), "10000".into());
        let all = [&holder, &idle, &restarting];
        let v = t.view(&all, t0);
        assert_eq!(v.live_nodes.len(), 3);
        assert_eq!(v.renewing.len(), 3);
        assert_eq!(v.restarting, BTreeSet::from(["node3".to_string()]));
        assert!(v.lapsed.is_empty());
        let v = t.view(&all, t0 + Duration::from_secs(2));
        assert_eq!(v.lapsed, BTreeSet::from(["node1".to_string()]));
        assert_eq!(v.live_nodes, BTreeSet::from(["node3".to_string()]));
        assert!(v.live.contains_key(&"172.18.0.101".parse().unwrap()));
        assert_eq!(
            t.next_expiry(t0 + Duration::from_secs(2)),
            Some(Duration::from_secs(8))
        );
        let v = t.view(&all, t0 + Duration::from_secs(10));
        assert_eq!(
            v.lapsed,
            BTreeSet::from(["node1".to_string(), "node3".to_string()])
        );
        assert!(v.live.is_empty());
    }

    #[test]
    fn a_holder_that_missed_renewals_is_no_longer_renewing_before_its_claim_lapses() {
        let mut t = ClaimTracker::new(Duration::from_millis(1500))
            .with_stale_after(Duration::from_millis(600));
        let t0 = Instant::now();
        let a = lease("node1", "1", "172.18.0.100", false);
        t.view(&[&a], t0);
        let a2 = lease("node1", "2", "172.18.0.100", false);
        let v = t.view(&[&a2], t0 + Duration::from_millis(300));
        assert!(v.renewing.contains("node1"));
        assert_eq!(
            t.next_expiry(t0 + Duration::from_millis(300)),
            Some(Duration::from_millis(600))
        );
        let v = t.view(&[&a2], t0 + Duration::from_millis(900));
        assert!(v.live_nodes.contains("node1") && !v.renewing.contains("node1"));
        assert!(v.lapsed.is_empty());
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
