//! Holds on new pod interfaces (Kubernetes mode): which interfaces to hold,
//! for how long, and when a hold has lapsed. The datapath side is
//! `egress_ebpf::hold`; the maps are `held_ifaces` and `local_pods_v4`.
//!
//! A pod's interface appears before its Pod object reaches the agent. Held,
//! the interface lets out only sources the agent knows (any pod of this
//! node, selected or not) and, for the others, only traffic to excluded
//! destinations, so a pod an EgressIP selects never leaves with the node's
//! address while the agent waits for its Pod. The hold ends by itself at
//! its deadline (the datapath compares it with its clock); the agent then
//! removes the entry.

use std::{collections::BTreeMap, time::Duration};

/// The holds this agent placed: ifindex -> (interface, end of the hold on
/// the datapath's CLOCK_MONOTONIC).
#[derive(Debug, Default)]
pub struct Holds {
    duration: Option<Duration>,
    active: BTreeMap<u32, (String, u64)>,
}

impl Holds {
    /// Holds of `duration` (`None` or zero: new interfaces are not held).
    pub fn new(duration: Option<Duration>) -> Self {
        Self {
            duration: duration.filter(|d| !d.is_zero()),
            active: BTreeMap::new(),
        }
    }

    /// Whether new interfaces are held at all.
    pub fn enabled(&self) -> bool {
        self.duration.is_some()
    }

    /// Records a hold on `ifindex` starting at `now_ns`; returns its end,
    /// the value for `held_ifaces`, or `None` when holds are off.
    pub fn place(&mut self, ifindex: u32, interface: &str, now_ns: u64) -> Option<u64> {
        let duration = self.duration?;
        let until = now_ns.saturating_add(u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX));
        self.active.insert(ifindex, (interface.to_string(), until));
        Some(until)
    }

    /// Adopts holds found in the pinned map at start-up: those still running
    /// on an interface that is there (`present` says which ifindexes are);
    /// returns the ifindexes whose entries must go.
    pub fn adopt(
        &mut self,
        pinned: &BTreeMap<u32, u64>,
        present: &BTreeMap<u32, String>,
        now_ns: u64,
    ) -> Vec<u32> {
        let mut stale = Vec::new();
        for (ifindex, until) in pinned {
            match present.get(ifindex) {
                Some(name) if *until > now_ns => {
                    self.active.insert(*ifindex, (name.clone(), *until));
                }
                _ => stale.push(*ifindex),
            }
        }
        stale
    }

    /// Forgets the hold on `ifindex` (its interface is gone); whether there was one.
    pub fn forget(&mut self, ifindex: u32) -> bool {
        self.active.remove(&ifindex).is_some()
    }

    /// Removes and returns the holds that have ended by `now_ns`.
    pub fn lapsed(&mut self, now_ns: u64) -> Vec<(u32, String)> {
        let ended: Vec<u32> = self
            .active
            .iter()
            .filter(|(_, (_, until))| *until <= now_ns)
            .map(|(i, _)| *i)
            .collect();
        ended
            .into_iter()
            .filter_map(|i| self.active.remove(&i).map(|(name, _)| (i, name)))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn no_duration_holds_nothing() {
        for off in [None, Some(Duration::ZERO)] {
            let mut holds = Holds::new(off);
            assert!(!holds.enabled());
            assert_eq!(holds.place(7, "veth7", SEC), None);
            assert!(holds.is_empty());
        }
    }

    #[test]
    fn a_hold_ends_at_its_deadline_and_not_before() {
        let mut holds = Holds::new(Some(Duration::from_secs(10)));
        assert_eq!(holds.place(7, "veth7", SEC), Some(11 * SEC));
        assert!(holds.lapsed(11 * SEC - 1).is_empty());
        assert_eq!(holds.lapsed(11 * SEC), vec![(7, "veth7".to_string())]);
        assert!(holds.is_empty());
        assert!(holds.lapsed(12 * SEC).is_empty());
    }

    #[test]
    fn a_gone_interface_forgets_its_hold() {
        let mut holds = Holds::new(Some(Duration::from_secs(10)));
        holds.place(7, "veth7", 0);
        assert!(holds.forget(7));
        assert!(!holds.forget(7));
        assert!(holds.lapsed(u64::MAX).is_empty());
    }

    #[test]
    fn start_up_adopts_running_holds_on_present_interfaces_only() {
        let mut holds = Holds::new(Some(Duration::from_secs(10)));
        let pinned = BTreeMap::from([(1, 5 * SEC), (2, 50 * SEC), (3, 50 * SEC)]);
        let present = BTreeMap::from([(1, "veth1".to_string()), (2, "veth2".to_string())]);
        // 1 has ended, 3's interface is gone (its ifindex may be reused).
        assert_eq!(holds.adopt(&pinned, &present, 10 * SEC), vec![1, 3]);
        assert_eq!(holds.lapsed(50 * SEC), vec![(2, "veth2".to_string())]);
    }
}
