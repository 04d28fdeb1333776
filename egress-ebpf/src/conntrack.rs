//! Connection tracking of translated flows: TCP state from the flags seen in
//! each direction, and last-seen times for the agent's timeouts.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use egress_common::{CtState, LAST_SEEN_GRANULARITY_NS, NatEntryV4, ct_flags, proto};

use crate::parse::tcp_flags::{ACK, FIN, RST, SYN};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Pod towards the server.
    Original,
    /// Server towards the pod.
    Reply,
}

/// CLOCK_MONOTONIC at tick resolution (`bpf_ktime_get_coarse_ns`): no
/// clocksource read, which makes it several times cheaper than
/// `bpf_ktime_get_ns` (an indirect call to read the TSC, behind a retpoline
/// on this kind of host). A tick (≤ 10 ms) is nothing next to second-granular
/// timeouts, and the agent compares against CLOCK_MONOTONIC either way.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// State of a flow created by its first packet.
#[inline(always)]
pub fn initial_state(protocol: u8, flags: u8) -> CtState {
    if protocol != proto::TCP {
        CtState::Open
    } else if flags & RST != 0 {
        CtState::Reset
    } else if flags & SYN != 0 && flags & ACK == 0 {
        CtState::SynSent
    } else {
        // Picked up mid-stream (the policy was applied to a live pod, or a
        // stray or forged segment): Established only once the server answers,
        // so that lone segments cannot pin entries for hours.
        CtState::Unreplied
    }
}

/// The state and flags after a packet, as a pure function so that it can be
/// reasoned about (and written back only when it changes).
#[inline(always)]
pub fn next(state: u8, flags: u8, protocol: u8, dir: Direction, tcp: u8) -> (u8, u8) {
    let mut flags = flags;
    if dir == Direction::Reply {
        flags |= ct_flags::SEEN_REPLY;
    }
    if protocol != proto::TCP {
        return (state, flags);
    }
    let mut state = CtState::from_u8(state);
    if tcp & RST != 0 {
        return (CtState::Reset as u8, flags);
    }
    if dir == Direction::Original && tcp & SYN != 0 && tcp & ACK == 0 {
        // The pod reuses the tuple for a new connection.
        if matches!(state, CtState::Closed | CtState::Reset | CtState::Closing) {
            let kind = ct_flags::REMOTE_ORIGIN | ct_flags::STEERED;
            return (CtState::SynSent as u8, flags & kind);
        }
    }
    if tcp & FIN != 0 {
        flags |= match dir {
            Direction::Original => ct_flags::FIN_ORIGINAL,
            Direction::Reply => ct_flags::FIN_REPLY,
        };
    }
    let both_fins = ct_flags::FIN_ORIGINAL | ct_flags::FIN_REPLY;
    state = if flags & both_fins == both_fins {
        CtState::Closed
    } else if flags & both_fins != 0 {
        CtState::Closing
    } else if matches!(state, CtState::SynSent | CtState::Unreplied) && dir == Direction::Reply {
        CtState::Established
    } else {
        state
    };
    (state as u8, flags)
}

/// Applies a packet to a live entry; writes only what changed.
///
/// `entry` lives in a shared map: other CPUs may update it concurrently. The
/// races are benign, each write is a whole field.
#[inline(always)]
pub fn update(entry: &mut NatEntryV4, protocol: u8, dir: Direction, tcp: u8, now: u64) {
    let (state, flags) = next(entry.state, entry.flags, protocol, dir, tcp);
    if state != entry.state {
        entry.state = state;
    }
    if flags != entry.flags {
        entry.flags = flags;
    }
    if now.wrapping_sub(entry.last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
        entry.last_seen_ns = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: u8 = proto::TCP;

    #[test]
    fn a_flow_picked_up_mid_stream_is_established_only_by_a_reply() {
        let s = initial_state(TCP, ACK);
        assert_eq!(s, CtState::Unreplied);
        let (s, f) = next(s as u8, 0, TCP, Direction::Original, ACK);
        assert_eq!((CtState::from_u8(s), f), (CtState::Unreplied, 0));
        let (s, f) = next(s, f, TCP, Direction::Reply, ACK);
        assert_eq!(CtState::from_u8(s), CtState::Established);
        assert_eq!(f & ct_flags::SEEN_REPLY, ct_flags::SEEN_REPLY);
    }

    #[test]
    fn a_syn_waits_for_the_answer() {
        assert_eq!(initial_state(TCP, SYN), CtState::SynSent);
        let (s, _) = next(CtState::SynSent as u8, 0, TCP, Direction::Original, SYN);
        assert_eq!(CtState::from_u8(s), CtState::SynSent);
        let (s, _) = next(s, 0, TCP, Direction::Reply, SYN | ACK);
        assert_eq!(CtState::from_u8(s), CtState::Established);
        assert_eq!(initial_state(TCP, RST | ACK), CtState::Reset);
        assert_eq!(initial_state(proto::UDP, 0), CtState::Open);
    }
}
