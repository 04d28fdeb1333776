//! The node side of claim fencing: from the controller's fence (until when
//! this node may hold its claimed egress IPs) to the datapath's stamp and
//! the claimed addresses' kernel lifetime, so that a stopped or cut-off
//! agent stops translating and answering for its IPs without its own help.
//! Which fence is the controller's word is the Kubernetes source's business
//! (`egress_k8s::agent_source::ControllerFence`).

use std::{num::NonZeroU32, time::Duration};

use egress_netlink::Lifetime;

/// What the node applies for one fence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Terms {
    /// `DatapathConfig::claims_valid_until_ns`: LOCAL policies translate
    /// while the datapath's coarse monotonic clock is below it.
    pub valid_until_ns: u64,
    /// The lifetime to give the claimed addresses; `None`: leave them as
    /// they are (the node holds nothing, its addresses are being released).
    pub lifetime: Option<Lifetime>,
}

impl Terms {
    /// The terms of a fence `remaining` from now (`None`: no fence, the node
    /// holds nothing), with `now_ns` the CLOCK_MONOTONIC reading of now.
    ///
    /// The stamp is exact: CLOCK_MONOTONIC is the clock of `Instant` and of
    /// `bpf_ktime_get_coarse_ns`, whose coarse reading lags by at most one
    /// tick (1-4 ms), so the datapath stops translating at most a tick after
    /// the fence, well inside the `claim_renew` margin between the fence and
    /// the earliest moment another node may take an IP over.
    ///
    /// The address lifetime is whole seconds, and the kernel removes an
    /// address up to [`Lifetime::EXPIRY_LATENESS`] after it ends: it is the
    /// whole seconds that end that much before the fence, and at least one
    /// second (the kernel's minimum). With one second the address goes at
    /// most 1.25 s after this refresh; claim lifetimes of 1.5 s or more
    /// therefore see it gone before another node may claim the IP.
    pub fn of(remaining: Option<Duration>, now_ns: u64) -> Terms {
        let Some(remaining) = remaining else {
            return Terms {
                valid_until_ns: 0,
                lifetime: None,
            };
        };
        let valid_until_ns =
            now_ns.saturating_add(u64::try_from(remaining.as_nanos()).unwrap_or(u64::MAX));
        let whole = remaining
            .saturating_sub(Lifetime::EXPIRY_LATENESS)
            .as_secs()
            .clamp(1, u64::from(u32::MAX - 1)) as u32;
        Terms {
            valid_until_ns,
            lifetime: Some(Lifetime::Seconds(
                NonZeroU32::new(whole).expect("clamped to at least 1"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u32) -> Option<Lifetime> {
        Some(Lifetime::Seconds(NonZeroU32::new(n).unwrap()))
    }

    #[test]
    fn no_fence_means_no_valid_claim() {
        let t = Terms::of(None, 5_000);
        assert_eq!(t.valid_until_ns, 0);
        assert_eq!(t.lifetime, None);
    }

    #[test]
    fn the_stamp_is_the_fence_on_the_monotonic_clock() {
        let t = Terms::of(Some(Duration::from_millis(1200)), 10_000_000_000);
        assert_eq!(t.valid_until_ns, 11_200_000_000);
        // 1.2 s minus the kernel's lateness leaves no whole second: the
        // minimum, one second, applies.
        assert_eq!(t.lifetime, secs(1));
    }

    #[test]
    fn the_lifetime_ends_early_enough_for_the_kernel_to_remove_it_by_the_fence() {
        // A restart grace of 30 s: 29 whole seconds end 750 ms before it.
        assert_eq!(
            Terms::of(Some(Duration::from_secs(30)), 0).lifetime,
            secs(29)
        );
        assert_eq!(
            Terms::of(Some(Duration::from_millis(3249)), 0).lifetime,
            secs(2)
        );
        assert_eq!(
            Terms::of(Some(Duration::from_millis(3250)), 0).lifetime,
            secs(3)
        );
    }

    #[test]
    fn a_passed_fence_stops_translation_now() {
        let t = Terms::of(Some(Duration::ZERO), 42);
        assert_eq!(t.valid_until_ns, 42);
        assert_eq!(t.lifetime, secs(1));
        assert_eq!(
            Terms::of(Some(Duration::MAX), 1).valid_until_ns,
            u64::MAX,
            "saturates"
        );
    }
}
