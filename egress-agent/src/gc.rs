//! Conntrack garbage collection: removes translations idle for longer than
//! their state's timeout, releases them from the flow count, and removes
//! reverse entries left without their forward half.

use std::{collections::HashSet, os::fd::AsFd, time::Duration};

use aya::maps::IterableMap;
use egress_common::{CtState, FlowKeyV4, NatEntryV4, RevNatEntryV4, maps as names};

use crate::{
    batch,
    config::Timeouts,
    maps::{Maps, MapsError, forward_key, reverse_key},
};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub scanned: usize,
    pub expired: usize,
    pub orphans_removed: usize,
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
    last_seen_ns: u64,
    now_ns: u64,
) -> bool {
    Duration::from_nanos(now_ns.saturating_sub(last_seen_ns)) > timeouts.for_flow(proto, state)
}

impl Collector {
    /// One pass over the conntrack maps with batched reads and deletes (a
    /// handful of bpf(2) calls per few thousand flows).
    pub fn sweep(
        &mut self,
        maps: &mut Maps,
        timeouts: &Timeouts,
        now_ns: u64,
    ) -> Result<SweepReport, MapsError> {
        let batch_err = |name, op| move |source| MapsError::Batch { name, op, source };
        // Own copies of the descriptors, so that `maps` stays free for the
        // flow-count update in between.
        let fwd = IterableMap::map(&maps.nat_fwd)
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(batch_err(names::NAT_FWD_V4, "dup"))?;
        let rev = IterableMap::map(&maps.nat_rev)
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(batch_err(names::NAT_REV_V4, "dup"))?;
        let (fwd_fd, rev_fd) = (fwd.as_fd(), rev.as_fd());
        let mut report = SweepReport::default();
        let flows: Vec<(FlowKeyV4, NatEntryV4)> =
            batch::lookup_all(fwd_fd).map_err(batch_err(names::NAT_FWD_V4, "lookup"))?;
        report.scanned = flows.len();
        let (expired_flows, live): (Vec<_>, Vec<_>) = flows.iter().partition(|(key, entry)| {
            expired(
                timeouts,
                key.proto,
                CtState::from_u8(entry.state),
                entry.last_seen_ns,
                now_ns,
            )
        });
        let forward: Vec<FlowKeyV4> = expired_flows.iter().map(|(k, _)| *k).collect();
        let reverse: Vec<FlowKeyV4> = expired_flows
            .iter()
            .map(|(k, e)| reverse_key(k, e))
            .collect();
        report.expired =
            batch::delete_all(fwd_fd, &forward).map_err(batch_err(names::NAT_FWD_V4, "delete"))?;
        if report.expired > 0 {
            maps.add_released(report.expired as u64)?;
        }
        batch::delete_all(rev_fd, &reverse).map_err(batch_err(names::NAT_REV_V4, "delete"))?;

        // Orphans: reverse entries whose forward half is not among the live
        // flows just read. A flow being born gets its reverse half first, so
        // only a second sighting, a sweep later, counts.
        let live: HashSet<FlowKeyV4> = live.iter().map(|(k, _)| *k).collect();
        let replies: Vec<(FlowKeyV4, RevNatEntryV4)> =
            batch::lookup_all(rev_fd).map_err(batch_err(names::NAT_REV_V4, "lookup"))?;
        let (orphans, suspects) = find_orphans(&live, &replies, &self.suspected_orphans);
        report.orphans_removed =
            batch::delete_all(rev_fd, &orphans).map_err(batch_err(names::NAT_REV_V4, "delete"))?;
        self.suspected_orphans = suspects;

        let inbound = IterableMap::map(&maps.inbound)
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(batch_err(names::INBOUND_V4, "dup"))?;
        let records: Vec<(FlowKeyV4, u64)> =
            batch::lookup_all(inbound.as_fd()).map_err(batch_err(names::INBOUND_V4, "lookup"))?;
        let idle: Vec<FlowKeyV4> = records
            .iter()
            .filter(|(key, seen)| inbound_expired(timeouts, key.proto, *seen, now_ns))
            .map(|(key, _)| *key)
            .collect();
        report.inbound_expired = batch::delete_all(inbound.as_fd(), &idle)
            .map_err(batch_err(names::INBOUND_V4, "delete"))?;
        Ok(report)
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
    expired(timeouts, proto, state, last_seen_ns, now_ns)
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
        if live.contains(&forward_key(reply, rev)) {
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
            tcp_established: 10,
            tcp_syn_sent: 2,
            udp: 3,
            ..Default::default()
        };
        let s = 1_000_000_000;
        assert!(!expired(&t, proto::TCP, CtState::Established, 0, 10 * s));
        assert!(expired(&t, proto::TCP, CtState::Established, 0, 10 * s + 1));
        assert!(expired(&t, proto::TCP, CtState::SynSent, 0, 3 * s));
        assert!(expired(&t, proto::UDP, CtState::Open, s, 5 * s));
        // A clock that has not reached last_seen (entry refreshed meanwhile) is not expiry.
        assert!(!expired(&t, proto::UDP, CtState::Open, 9 * s, 5 * s));
    }

    #[test]
    fn inbound_records_live_as_long_as_an_established_flow() {
        let t = Timeouts {
            tcp_established: 100,
            udp: 3,
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
            let reply = reverse_key(&key, &entry);
            let rev = RevNatEntryV4 {
                orig_addr: key.src_addr,
                orig_port: key.src_port,
                ..Default::default()
            };
            assert_eq!(forward_key(&reply, &rev), key);
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
