//! Expectations that other work on the datapath is about to change, each in
//! one small named place so that a merge updates one line, not every test.
//!
//! - dp-core (landed): pass-through is `TC_ACT_UNSPEC` (-1); [`Verdict::Pass`]
//!   also accepts `TC_ACT_OK` (0). A selected pod's TTL ≤ 1 stays the
//!   stack's to answer ([`pod_ttl_expired`]); a length that disagrees with
//!   the frame is `bad_length` ([`pod_bad_length`]); a lone TCP ACK opens an
//!   unreplied flow ([`first_ack_state`]); an egress IP's packet without a
//!   flow is `no_flow` ([`uplink_no_flow`]).
//! - dp-identity (landed): steered flows enter the flow table without a
//!   reverse twin, flagged STEERED ([`needs_reverse_twin`],
//!   [`steered_flow_entries`]); a pod's packet with another pod's address is
//!   dropped ([`spoofed_source_invariant`]); tunnel arrivals are checked
//!   against the sender's pods and live flows ([`tunnel_unsolicited_to_pod`],
//!   [`tunnel_foreign_inner_source`]); a selected pod's TCP SYN-ACK without a
//!   flow passes untranslated only when pod_egress recorded its SYN, which
//!   the harness never runs ([`pod_syn_ack_passes`]). No known hole is left
//!   ([`known_hole`]).

use egress_common::{CtState, DropReason, NatEntryV4, ct_flags};

/// linux/pkt_cls.h
pub const TC_ACT_UNSPEC: i32 = -1;
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_REDIRECT: i32 = 7;

/// What a TC program decided, in the terms the tests care about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// Left to the kernel (and to the next TCX program): `TC_ACT_OK` today,
    /// `TC_ACT_UNSPEC` once dp-core lands. Both mean "not ours".
    Pass,
    Drop,
    Redirect,
    Other(i32),
}

impl Verdict {
    pub fn from_retval(retval: u32) -> Self {
        match retval as i32 {
            TC_ACT_UNSPEC | TC_ACT_OK => Self::Pass,
            TC_ACT_SHOT => Self::Drop,
            TC_ACT_REDIRECT => Self::Redirect,
            other => Self::Other(other),
        }
    }

    /// The packet goes on, to the kernel or to another device.
    pub fn leaves(self) -> bool {
        matches!(self, Self::Pass | Self::Redirect)
    }

    pub fn name(self) -> String {
        match self {
            Self::Pass => "pass".into(),
            Self::Drop => "drop".into(),
            Self::Redirect => "redirect".into(),
            Self::Other(v) => format!("retval {v}"),
        }
    }
}

/// Whether a forward entry must have its reply-direction twin in
/// `nat_rev_v4`: every entry but a steered one (the egress node translates
/// it, this node only remembers it to accept its replies).
pub fn needs_reverse_twin(entry: &NatEntryV4) -> bool {
    entry.flags & ct_flags::STEERED == 0
}

/// Whether a selected pod's TCP SYN-ACK that matches no flow passes
/// untranslated by itself. It does not: only when pod_egress recorded the
/// client's SYN (`inbound_v4`), else any pod could get packets out
/// untranslated by setting both flags.
pub fn pod_syn_ack_passes() -> bool {
    false
}

/// A selected pod's packet with TTL ≤ 1 to a server: passed to the stack,
/// which answers "time exceeded" as the router it is (tunnel arrivals and
/// replies get the datapath's own answer, `ttl_exceeded`).
pub fn pod_ttl_expired() -> Option<DropReason> {
    None
}

/// A selected pod's packet whose IP total length exceeds the frame.
pub fn pod_bad_length() -> Option<DropReason> {
    Some(DropReason::BadLength)
}

/// State of a flow whose first packet is a lone ACK: unreplied, with the
/// short unreplied timeout, until the server answers.
pub fn first_ack_state() -> CtState {
    CtState::Unreplied
}

/// A pod sending with a selected neighbour's address on its own interface
/// (issue 7, "same-node source spoofing") is dropped as `invalid_source`:
/// a packet that leaves with the neighbour's egress IP breaks the credential.
pub fn spoofed_source_invariant() -> &'static str {
    "credential"
}

/// Invariants whose violations are known holes that pending work closes:
/// reported, but they do not fail a run. dp-identity closed the last ones
/// (`spoofed_source`, `tunnel_spoof`, `tunnel_unsolicited`).
pub fn known_hole(_invariant: &str) -> bool {
    false
}

/// A cluster node's tunnel arrival that is not its selected pod under its
/// policy's VNI (issue 7, "tunnel spoofing") is dropped (`pod_not_selected`):
/// leaving with the egress IP breaks the credential.
pub fn tunnel_spoof_invariant() -> &'static str {
    "credential"
}

/// A cluster node's tunnel packet to a local selected pod without a live
/// steered flow of the pod's from that node is dropped (`no_flow`,
/// `wrong_tunnel_peer`): delivering it breaks the credential.
pub fn tunnel_unsolicited_invariant() -> &'static str {
    "credential"
}

/// A packet from outside to an egress IP held here that matches no flow:
/// dropped unless configured otherwise.
pub fn uplink_no_flow() -> (Verdict, Option<DropReason>) {
    (Verdict::Drop, Some(DropReason::NoFlow))
}

/// A tunnel packet from a cluster node to a local selected pod that matches
/// no flow of that pod (issue 7): dropped.
pub fn tunnel_unsolicited_to_pod() -> (Verdict, Option<DropReason>) {
    (Verdict::Drop, Some(DropReason::NoFlow))
}

/// A tunnel arrival whose inner source is not a selected pod of the sending
/// node (issue 7; the world's `NodeState` says which pods node2 hosts in
/// `remote_pods` and `pod_cidrs`): dropped.
pub fn tunnel_foreign_inner_source() -> (Verdict, Option<DropReason>) {
    (Verdict::Drop, Some(DropReason::PodNotSelected))
}

/// Flow entries a steered packet leaves on the pod's node: its STEERED
/// entry (one, without a reverse twin).
pub fn steered_flow_entries() -> usize {
    1
}
