//! Conntrack garbage collection: removes translations idle for longer than
//! their state's timeout, removes reverse entries left without their forward
//! half, reconciles the flow counts (global and per pod) with the entries
//! that exist, and expires the records of connections opened from outside
//! (`inbound_v4`). The maps are read and deleted from in batches
//! (`egress_bpf::lookup_all`, `delete_all`); a forward entry and its
//! reverse half are paired with the keys of egress-common
//! (`FlowKeyV4::reply_after_nat`, `forward_before_nat`), as the datapath
//! pairs them.
//!
//! Reconciliation, so that the counts can never drift: the datapath adds to
//! `created` once a flow's entries are in the table and to `reclaimed` once
//! it deleted a flow (early drop); the collector reads `created` before its
//! walk and `reclaimed` after it, and sets `released` so that
//! `created - reclaimed - released` equals the live entries it found. A flow
//! created during the walk is then counted in `created` and perhaps in the
//! walk too, a flow reclaimed during the walk perhaps in neither: either way
//! a transient over-count that the next sweep removes, never an under-count
//! that would let the table overfill. (The one exception is a reclaim whose
//! delete lands before the walk reaches the entry and whose count lands after
//! the walk ends: two consecutive instructions of one program run.)

use std::{
    collections::{HashMap, HashSet},
    os::fd::AsFd,
    sync::mpsc,
    thread::{self, JoinHandle},
    time::Duration,
};

use aya::maps::{IterableMap, MapError};
use egress_common::{
    CtState, FlowKeyV4, NatEntryV4, PodFlowsV4, RevNatEntryV4, ct_flags, maps as names,
};
use egress_config::Timeouts;

use crate::maps::{Maps, MapsError, PinLayout};

/// The collector on a thread of its own with its own map handles: a sweep
/// of a full NAT map takes a while, and the agent's reconciling and the
/// Kubernetes controller's claim renewals must not wait for it.
pub struct Background {
    settings: Option<mpsc::Sender<(Timeouts, Duration)>>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    /// Sweeps every `interval` until dropped.
    pub fn start(
        layout: &PinLayout,
        timeouts: Timeouts,
        interval: Duration,
    ) -> Result<Self, MapsError> {
        let mut maps = Maps::open(layout)?;
        let (tx, rx) = mpsc::channel::<(Timeouts, Duration)>();
        let thread = thread::Builder::new()
            .name("egress-gc".into())
            .spawn(move || {
                let mut collector = Collector::default();
                let (mut timeouts, mut interval) = (timeouts, interval);
                loop {
                    match rx.recv_timeout(interval) {
                        Ok(new) => (timeouts, interval) = new,
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            match collector.sweep(&mut maps, &timeouts, monotonic_ns()) {
                                Ok(r) if r.expired > 0 || r.orphans_removed > 0 => {
                                    tracing::debug!(
                                        scanned = r.scanned,
                                        expired = r.expired,
                                        orphans = r.orphans_removed,
                                        "conntrack swept"
                                    )
                                }
                                Ok(_) => {}
                                Err(e) => tracing::error!(error = %e, "conntrack sweep failed"),
                            }
                        }
                    }
                }
            })
            .map_err(|source| MapsError::Thread { source })?;
        Ok(Self {
            settings: Some(tx),
            thread: Some(thread),
        })
    }

    /// New timeouts or interval (a reloaded configuration).
    pub fn update(&self, timeouts: Timeouts, interval: Duration) {
        if let Some(tx) = &self.settings {
            let _ = tx.send((timeouts, interval));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        // Closing the channel ends the thread after its current sweep.
        drop(self.settings.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub scanned: usize,
    pub expired: usize,
    pub orphans_removed: usize,
    /// Live flows after the sweep, as now counted.
    pub live: u64,
    /// How far the count was from the entries before this sweep corrected
    /// it (positive: it counted flows that do not exist).
    pub drift: i64,
    /// Pods whose counters were written or removed.
    pub pods_written: usize,
    /// Records of connections opened from outside, idle past their timeout.
    pub inbound_expired: usize,
}

/// Keeps what one sweep must remember for the next.
#[derive(Default)]
pub struct Collector {
    /// Reverse entries without a forward entry last time. The datapath inserts
    /// the reverse half first, so one sighting may be a flow being born; two
    /// sightings a sweep apart are an orphan.
    suspected_orphans: HashSet<FlowKeyV4>,
    /// Each pod's `created` counter at the previous sweep: a pod's counters
    /// are removed only once it has had no flow and created none for a whole
    /// sweep interval.
    pod_created: HashMap<[u8; 4], u64>,
}

/// The monotonic clock `bpf_ktime_get_ns()` reads.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// Whether a flow last seen at `last_seen_ns` has timed out at `now_ns`.
pub fn expired(
    timeouts: &Timeouts,
    proto: u8,
    state: CtState,
    flags: u8,
    last_seen_ns: u64,
    now_ns: u64,
) -> bool {
    Duration::from_nanos(now_ns.saturating_sub(last_seen_ns))
        > timeouts.for_flow(proto, state, flags)
}

/// The `released` count that makes `created - reclaimed - released` equal
/// `live`, from `created` read before the walk and `reclaimed` after it.
pub fn released_for(created_before: u64, reclaimed_after: u64, live: u64) -> u64 {
    created_before
        .wrapping_sub(reclaimed_after)
        .wrapping_sub(live)
}

/// What the collector writes to the per-pod counters.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PodPlan {
    /// `pod_released_v4` values to write.
    pub write: Vec<([u8; 4], u64)>,
    /// Pods without flows whose counters go (released entry, then counters).
    pub remove: Vec<[u8; 4]>,
}

/// Plans the per-pod counters: `before` and `after` are `pod_flows_v4`
/// read before and after the walk, `live` the flows found per pod,
/// `released` the current `pod_released_v4`, `previous` each pod's `created`
/// at the last sweep.
pub fn plan_pods(
    before: &HashMap<[u8; 4], PodFlowsV4>,
    after: &HashMap<[u8; 4], PodFlowsV4>,
    live: &HashMap<[u8; 4], u64>,
    released: &HashMap<[u8; 4], u64>,
    previous: &HashMap<[u8; 4], u64>,
) -> PodPlan {
    let mut plan = PodPlan::default();
    let pods: HashSet<[u8; 4]> = before
        .keys()
        .chain(live.keys())
        .chain(released.keys())
        .copied()
        .collect();
    let mut pods: Vec<[u8; 4]> = pods.into_iter().collect();
    pods.sort_unstable();
    for pod in pods {
        let created = before.get(&pod).map_or(0, |c| c.created);
        let now = after.get(&pod).copied().unwrap_or_default();
        let n = live.get(&pod).copied().unwrap_or(0);
        let quiet = n == 0 && now.created == created && previous.get(&pod) == Some(&created);
        if quiet || (n == 0 && !before.contains_key(&pod) && !after.contains_key(&pod)) {
            plan.remove.push(pod);
            continue;
        }
        let want = released_for(created, now.reclaimed, n);
        if released.get(&pod) != Some(&want) {
            plan.write.push((pod, want));
        }
    }
    plan
}

impl Collector {
    /// One pass over the conntrack maps with batched reads and deletes (a
    /// handful of bpf(2) calls per few thousand flows), then the counts.
    pub fn sweep(
        &mut self,
        maps: &mut Maps,
        timeouts: &Timeouts,
        now_ns: u64,
    ) -> Result<SweepReport, MapsError> {
        let batch_err = |name, op| move |source| MapsError::Batch { name, op, source };
        let dup_err = |name| move |source| MapsError::Descriptor { name, source };
        // Own copies of the descriptors, so that `maps` stays free for the
        // flow-count update in between.
        let fwd = IterableMap::map(&maps.nat_fwd)
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(dup_err(names::NAT_FWD_V4))?;
        let rev = IterableMap::map(&maps.nat_rev)
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(dup_err(names::NAT_REV_V4))?;
        let pod_fd = IterableMap::map(&maps.pod_flows)
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(dup_err(names::POD_FLOWS_V4))?;
        let (fwd_fd, rev_fd) = (fwd.as_fd(), rev.as_fd());
        let per_pod = maps
            .config
            .get(&0, 0)
            .map_err(|source| MapsError::Map {
                name: names::CONFIG,
                source,
            })?
            .max_flows_per_pod
            != 0;
        let mut report = SweepReport::default();

        // Counters before the walk.
        let before = maps.flow_counts()?;
        let pods_before: HashMap<[u8; 4], PodFlowsV4> = if per_pod {
            egress_bpf::lookup_all(pod_fd.as_fd())
                .map_err(batch_err(names::POD_FLOWS_V4, "lookup"))?
                .into_iter()
                .collect()
        } else {
            HashMap::new()
        };

        let flows: Vec<(FlowKeyV4, NatEntryV4)> =
            egress_bpf::lookup_all(fwd_fd).map_err(batch_err(names::NAT_FWD_V4, "lookup"))?;
        report.scanned = flows.len();
        let (expired_flows, live): (Vec<_>, Vec<_>) = flows.iter().partition(|(key, entry)| {
            expired(
                timeouts,
                key.proto,
                CtState::from_u8(entry.state),
                entry.flags,
                entry.last_seen_ns,
                now_ns,
            )
        });
        let forward: Vec<FlowKeyV4> = expired_flows.iter().map(|(k, _)| *k).collect();
        // Steered flows (the pod's node's half) have no reverse entry.
        let reverse: Vec<FlowKeyV4> = expired_flows
            .iter()
            .filter(|(_, e)| e.flags & ct_flags::STEERED == 0)
            .map(|(k, e)| k.reply_after_nat(e.nat_addr, e.nat_port))
            .collect();
        report.expired = egress_bpf::delete_all(fwd_fd, &forward)
            .map_err(batch_err(names::NAT_FWD_V4, "delete"))?;
        egress_bpf::delete_all(rev_fd, &reverse).map_err(batch_err(names::NAT_REV_V4, "delete"))?;

        // Orphans: reverse entries whose forward half is not among the live
        // flows just read. A flow being born gets its reverse half first, so
        // only a second sighting, a sweep later, counts.
        let live_keys: HashSet<FlowKeyV4> = live.iter().map(|(k, _)| *k).collect();
        let replies: Vec<(FlowKeyV4, RevNatEntryV4)> =
            egress_bpf::lookup_all(rev_fd).map_err(batch_err(names::NAT_REV_V4, "lookup"))?;
        let (orphans, suspects) = find_orphans(&live_keys, &replies, &self.suspected_orphans);
        report.orphans_removed = egress_bpf::delete_all(rev_fd, &orphans)
            .map_err(batch_err(names::NAT_REV_V4, "delete"))?;
        self.suspected_orphans = suspects;

        // Counts: whatever expired is gone, by our delete or by the datapath's
        // (whose reclaim then counts it), so the live flows are the rest.
        let found = live.len() as u64;
        let reclaimed = maps.flow_counts()?.reclaimed;
        report.drift = before
            .created
            .wrapping_sub(reclaimed)
            .wrapping_sub(before.released)
            .wrapping_sub(found)
            .wrapping_sub(report.expired as u64) as i64;
        maps.set_released(released_for(before.created, reclaimed, found))?;
        report.live = found;

        if per_pod {
            let after: HashMap<[u8; 4], PodFlowsV4> = egress_bpf::lookup_all(pod_fd.as_fd())
                .map_err(batch_err(names::POD_FLOWS_V4, "lookup"))?
                .into_iter()
                .collect();
            let mut per: HashMap<[u8; 4], u64> = HashMap::new();
            for (key, _) in &live {
                *per.entry(key.src_addr).or_default() += 1;
            }
            let released: HashMap<[u8; 4], u64> = maps
                .pod_released
                .iter()
                .collect::<Result<_, _>>()
                .map_err(|source| MapsError::Map {
                    name: names::POD_RELEASED_V4,
                    source,
                })?;
            let plan = plan_pods(&pods_before, &after, &per, &released, &self.pod_created);
            report.pods_written = plan.write.len() + plan.remove.len();
            self.apply_pods(maps, &plan)?;
            self.pod_created = pods_before
                .iter()
                .filter(|(pod, _)| !plan.remove.contains(pod))
                .map(|(pod, c)| (*pod, c.created))
                .collect();
        }

        let inbound = IterableMap::map(&maps.inbound)
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(dup_err(names::INBOUND_V4))?;
        let records: Vec<(FlowKeyV4, u64)> = egress_bpf::lookup_all(inbound.as_fd())
            .map_err(batch_err(names::INBOUND_V4, "lookup"))?;
        let idle: Vec<FlowKeyV4> = records
            .iter()
            .filter(|(key, seen)| inbound_expired(timeouts, key.proto, *seen, now_ns))
            .map(|(key, _)| *key)
            .collect();
        report.inbound_expired = egress_bpf::delete_all(inbound.as_fd(), &idle)
            .map_err(batch_err(names::INBOUND_V4, "delete"))?;
        Ok(report)
    }

    fn apply_pods(&self, maps: &mut Maps, plan: &PodPlan) -> Result<(), MapsError> {
        let gone = |r: Result<(), MapError>, name| match r {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(MapsError::Map { name, source }),
        };
        for (pod, released) in &plan.write {
            maps.pod_released
                .insert(pod, released, 0)
                .map_err(|source| MapsError::Map {
                    name: names::POD_RELEASED_V4,
                    source,
                })?;
        }
        // The released entry first: in between, the pod counts its old flows
        // (an over-count), never fewer than it has.
        for pod in &plan.remove {
            gone(maps.pod_released.remove(pod), names::POD_RELEASED_V4)?;
            gone(maps.pod_flows.remove(pod), names::POD_FLOWS_V4)?;
        }
        Ok(())
    }
}

/// Whether a connection opened from outside, last seen at `last_seen_ns`,
/// has been idle longer than an established flow of its protocol may be.
fn inbound_expired(timeouts: &Timeouts, proto: u8, last_seen_ns: u64, now_ns: u64) -> bool {
    let state = if proto == egress_common::proto::TCP {
        CtState::Established
    } else {
        CtState::Open
    };
    let answered = ct_flags::SEEN_REPLY;
    expired(timeouts, proto, state, answered, last_seen_ns, now_ns)
}

/// Splits the reverse entries without a live forward half into orphans (also
/// suspected last sweep) and new suspects.
fn find_orphans(
    live: &HashSet<FlowKeyV4>,
    replies: &[(FlowKeyV4, RevNatEntryV4)],
    suspected: &HashSet<FlowKeyV4>,
) -> (Vec<FlowKeyV4>, HashSet<FlowKeyV4>) {
    let mut orphans = Vec::new();
    let mut suspects = HashSet::new();
    for (reply, rev) in replies {
        if live.contains(&reply.forward_before_nat(rev)) {
            continue;
        }
        if suspected.contains(reply) {
            orphans.push(*reply);
        } else {
            suspects.insert(*reply);
        }
    }
    (orphans, suspects)
}

#[cfg(test)]
mod tests {
    use egress_common::proto;

    use super::*;

    #[test]
    fn expiry_uses_the_state_timeout() {
        let t = Timeouts {
            tcp_established: Duration::from_secs(10),
            tcp_syn_sent: Duration::from_secs(2),
            udp: Duration::from_secs(3),
            ..Default::default()
        };
        let s = 1_000_000_000;
        let r = ct_flags::SEEN_REPLY;
        assert!(!expired(&t, proto::TCP, CtState::Established, r, 0, 10 * s));
        assert!(expired(
            &t,
            proto::TCP,
            CtState::Established,
            r,
            0,
            10 * s + 1
        ));
        assert!(expired(&t, proto::TCP, CtState::SynSent, 0, 0, 3 * s));
        assert!(expired(&t, proto::UDP, CtState::Open, r, s, 5 * s));
        // A clock that has not reached last_seen (entry refreshed meanwhile) is not expiry.
        assert!(!expired(&t, proto::UDP, CtState::Open, r, 9 * s, 5 * s));
        // Without a reply, the unreplied timeout (30 s by default) caps any state.
        assert!(expired(&t, proto::TCP, CtState::Unreplied, 0, 0, 31 * s));
    }

    #[test]
    fn released_makes_the_count_equal_what_was_found() {
        // 10 created before the walk, 2 reclaimed by the end, 5 found.
        let released = released_for(10, 2, 5);
        assert_eq!(10 - 2 - released, 5);
        // A pod the collector found flows of before its counters existed.
        let released = released_for(0, 0, 3);
        assert_eq!(0u64.wrapping_sub(0).wrapping_sub(released), 3);
    }

    #[test]
    fn pod_counters_follow_the_entries_and_go_when_quiet() {
        let (a, b, c) = ([10, 244, 1, 11], [10, 244, 1, 12], [10, 244, 2, 11]);
        let pf = |created, reclaimed| PodFlowsV4 { created, reclaimed };
        let before = HashMap::from([(a, pf(7, 1)), (b, pf(4, 0))]);
        // a created one more flow during the walk; b none.
        let after = HashMap::from([(a, pf(8, 2)), (b, pf(4, 0))]);
        // a: 3 live entries found; b: none; c: a steered pod without counters.
        let live = HashMap::from([(a, 3), (c, 1)]);
        let released = HashMap::from([(a, 1), (b, 4)]);
        // b created nothing since the last sweep either.
        let previous = HashMap::from([(a, 6), (b, 4)]);
        let plan = plan_pods(&before, &after, &live, &released, &previous);
        assert_eq!(
            plan.write,
            vec![(a, released_for(7, 2, 3)), (c, released_for(0, 0, 1))]
        );
        assert_eq!(plan.remove, vec![b]);
        // a's count after the write: its flow made during the walk is counted
        // (8 created), maybe also found: an over-count by at most that one.
        assert_eq!(8u64.wrapping_sub(2).wrapping_sub(released_for(7, 2, 3)), 4);

        // A pod without flows that created one in the last interval stays.
        let previous = HashMap::from([(b, 3)]);
        let plan = plan_pods(&before, &after, &live, &released, &previous);
        assert!(!plan.remove.contains(&b));
    }

    #[test]
    fn inbound_records_live_as_long_as_an_established_flow() {
        let t = Timeouts {
            tcp_established: Duration::from_secs(100),
            udp: Duration::from_secs(3),
            ..Default::default()
        };
        let s = 1_000_000_000;
        assert!(!inbound_expired(&t, proto::TCP, 0, 100 * s));
        assert!(inbound_expired(&t, proto::TCP, 0, 101 * s));
        assert!(inbound_expired(&t, proto::UDP, 0, 4 * s));
    }

    #[test]
    fn reverse_entries_without_forward_half_are_orphans_on_the_second_sighting() {
        let flow = |port: u16| {
            let key = FlowKeyV4::new([10, 244, 1, 11], [198, 51, 100, 10], port, 8080, proto::TCP);
            let entry = NatEntryV4 {
                nat_addr: [172, 18, 0, 100],
                nat_port: port,
                ..Default::default()
            };
            let reply = key.reply_after_nat(entry.nat_addr, entry.nat_port);
            let rev = RevNatEntryV4 {
                orig_addr: key.src_addr,
                orig_port: key.src_port,
                ..Default::default()
            };
            assert_eq!(reply.forward_before_nat(&rev), key);
            (key, reply, rev)
        };
        let (live_key, live_reply, live_rev) = flow(40000);
        let (_, lone_reply, lone_rev) = flow(40001);
        let live = HashSet::from([live_key]);
        let replies = [(live_reply, live_rev), (lone_reply, lone_rev)];

        let (orphans, suspects) = find_orphans(&live, &replies, &HashSet::new());
        assert!(
            orphans.is_empty(),
            "a first sighting may be a flow being born"
        );
        assert_eq!(suspects, HashSet::from([lone_reply]));
        let (orphans, suspects) = find_orphans(&live, &replies, &suspects);
        assert_eq!(orphans, vec![lone_reply]);
        assert!(suspects.is_empty());
    }
}
