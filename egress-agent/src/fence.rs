//! The node side of claim fencing: from the controller's fence (until when
//! this node may hold its claimed egress IPs) to the datapath's stamp and
//! the claimed addresses' kernel lifetime, so that a stopped or cut-off
//! agent stops translating and answering for its IPs without its own help.

use std::{
    num::NonZeroU32,
    time::{Duration, Instant},
};

use egress_netlink::Lifetime;
use tokio::sync::watch;

/// The controller's fences as the agent may apply them: none before the
/// controller has sent its first (see `egress_k8s::AgentLink::fence`).
///
/// The channel starts out `None`, which is not the controller's word: until
/// the session has synced and settled adoption it sends nothing, and the
/// stamp and lifetimes the previous agent left are the claims' true terms.
/// Applied, that initial `None` would mean "holds nothing" and cut them (a
/// successor stopped before adopting, or whose controller failed at start,
/// would stop its node's translation while the restart grace still runs).
///
/// Both ways of reading the channel go through here, since either marks a
/// send seen: waiting for the next fence ([`Self::changed`]) and taking the
/// latest ([`Self::latest`]).
#[derive(Debug, Default)]
pub struct ControllerFence {
    /// The controller has sent a fence (possibly `None`) at least once.
    heard: bool,
}

impl ControllerFence {
    /// Waits for the controller's next fence (then [`Self::latest`] has it);
    /// an error once the controller has dropped its end.
    pub async fn changed(
        &mut self,
        rx: &mut watch::Receiver<Option<Instant>>,
    ) -> Result<(), watch::error::RecvError> {
        rx.changed().await?;
        self.heard = true;
        Ok(())
    }

    /// The controller's latest fence once it has sent one (`Some(None)`:
    /// the node holds nothing); `None` while it has sent none, then the
    /// previous terms stand. Marks the value seen. Works after the
    /// controller has gone too: its last fence is still there to apply.
    pub fn latest(&mut self, rx: &mut watch::Receiver<Option<Instant>>) -> Option<Option<Instant>> {
        let value = rx.borrow_and_update();
        self.heard |= value.has_changed();
        self.heard.then_some(*value)
    }
}

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

    #[test]
    fn nothing_is_applied_before_the_controller_sends_a_fence() {
        let (tx, mut rx) = watch::channel(None);
        let mut fence = ControllerFence::default();
        // The channel's initial `None` is not "holds nothing".
        assert_eq!(fence.latest(&mut rx), None);
        assert_eq!(fence.latest(&mut rx), None);
        let at = Instant::now() + Duration::from_secs(30);
        tx.send(Some(at)).unwrap();
        assert_eq!(fence.latest(&mut rx), Some(Some(at)));
        // Once heard, the latest word stands, unchanged or not.
        assert_eq!(fence.latest(&mut rx), Some(Some(at)));
        tx.send(None).unwrap();
        assert_eq!(fence.latest(&mut rx), Some(None));
    }

    #[test]
    fn a_fence_sent_before_the_controller_ended_is_still_applied() {
        let (tx, mut rx) = watch::channel(None);
        let mut fence = ControllerFence::default();
        let at = Instant::now();
        tx.send(Some(at)).unwrap();
        drop(tx);
        assert_eq!(fence.latest(&mut rx), Some(Some(at)));
        // A controller that ended without a word leaves nothing to apply.
        let (tx, mut rx) = watch::channel::<Option<Instant>>(None);
        drop(tx);
        assert_eq!(ControllerFence::default().latest(&mut rx), None);
    }

    #[tokio::test]
    async fn a_fence_waited_for_is_heard() {
        let (tx, mut rx) = watch::channel(None);
        let mut fence = ControllerFence::default();
        let at = Instant::now();
        tx.send(Some(at)).unwrap();
        // Waiting marks the send seen: it must count as heard all the same.
        fence.changed(&mut rx).await.unwrap();
        assert_eq!(fence.latest(&mut rx), Some(Some(at)));
        drop(tx);
        assert!(fence.changed(&mut rx).await.is_err());
        assert_eq!(
            fence.latest(&mut rx),
            Some(Some(at)),
            "the last word stands"
        );
    }

    #[test]
    fn a_none_the_controller_sends_is_heard() {
        // `send` notifies even when the value is equal: the session's
        // first word may well be "nothing held".
        let (tx, mut rx) = watch::channel(None);
        let mut fence = ControllerFence::default();
        tx.send_replace(None);
        assert_eq!(fence.latest(&mut rx), Some(None));
    }

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
