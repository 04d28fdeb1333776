//! Conntrack garbage collection: removes translations idle for longer than
//! their state's timeout, releases them from the flow count, and removes
//! reverse entries left without their forward half.

use std::{collections::HashSet, time::Duration};

use aya::maps::MapError;
use egress_common::{CtState, FlowKeyV4};

use crate::{
    config::Timeouts,
    maps::{Maps, MapsError, forward_key, reverse_key},
};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub scanned: usize,
    pub expired: usize,
    pub orphans_removed: usize,
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

fn tolerate_missing(r: Result<(), MapError>) -> Result<bool, MapError> {
    match r {
        Ok(()) => Ok(true),
        Err(MapError::KeyNotFound) => Ok(false),
        Err(e) => Err(e),
    }
}

impl Collector {
    pub fn sweep(
        &mut self,
        maps: &mut Maps,
        timeouts: &Timeouts,
        now_ns: u64,
    ) -> Result<SweepReport, MapsError> {
        let map_err = |name| move |source| MapsError::Map { name, source };
        let mut report = SweepReport::default();
        // Collect first: deleting while walking a hash map restarts the walk.
        let flows: Vec<_> = maps
            .nat_fwd
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(egress_common::maps::NAT_FWD_V4))?;
        report.scanned = flows.len();
        for (key, entry) in &flows {
            if !expired(
                timeouts,
                key.proto,
                CtState::from_u8(entry.state),
                entry.last_seen_ns,
                now_ns,
            ) {
                continue;
            }
            let removed = tolerate_missing(maps.nat_fwd.remove(key))
                .map_err(map_err(egress_common::maps::NAT_FWD_V4))?;
            tolerate_missing(maps.nat_rev.remove(&reverse_key(key, entry)))
                .map_err(map_err(egress_common::maps::NAT_REV_V4))?;
            if removed {
                report.expired += 1;
            }
        }
        if report.expired > 0 {
            maps.add_released(report.expired as u64)?;
        }

        let replies: Vec<_> = maps
            .nat_rev
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(egress_common::maps::NAT_REV_V4))?;
        let mut orphans = HashSet::new();
        for (reply, rev) in &replies {
            match maps.nat_fwd.get(&forward_key(reply, rev), 0) {
                Ok(_) => {}
                Err(MapError::KeyNotFound) => {
                    if self.suspected_orphans.contains(reply) {
                        if tolerate_missing(maps.nat_rev.remove(reply))
                            .map_err(map_err(egress_common::maps::NAT_REV_V4))?
                        {
                            report.orphans_removed += 1;
                        }
                    } else {
                        orphans.insert(*reply);
                    }
                }
                Err(e) => return Err(map_err(egress_common::maps::NAT_FWD_V4)(e)),
            }
        }
        self.suspected_orphans = orphans;
        Ok(report)
    }
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
}
