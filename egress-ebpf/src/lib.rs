//! The egress datapath: TC programs that classify pod traffic, check that
//! it may use the egress IP (pod identity, tunnel trust, held interfaces),
//! steer it to the egress node through VXLAN, SNAT it to the egress IP with
//! our own conntrack, reverse-translate the replies, and leave alone the
//! connections a client outside the cluster opened to a pod.
//!
//! One module per concern, in the spirit of cilium's `bpf/lib`; the binaries
//! under `src/bin/` are thin entry points, one per attach point:
//! `pod_ingress` and `pod_egress` on the pods' host-side interfaces,
//! `tunnel_ingress` on our VXLAN device, `uplink_ingress` on the uplink.
#![no_std]
// BPF atomic add: the bpf target lacks CAS, so core::sync::atomic has no RMW.
// (The library also builds on the host, as the agent's build dependency.)
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(
    target_arch = "bpf",
    expect(
        internal_features,
        reason = "atomic_xadd is the only way to emit a BPF atomic add"
    )
)]

pub mod arp;
pub mod classify;
pub mod conntrack;
pub mod csum;
pub mod fib;
pub mod flows;
pub mod hold;
pub mod icmp;
pub mod inbound;
pub mod maps;
pub mod mss;
pub mod nat;
pub mod parse;
pub mod stats;
pub mod steer;
pub mod trust;
pub mod tunnel;

/// What every program binary under `src/bin/` needs besides its entry
/// point, invoked once at the binary's root: on the bpf target the license
/// section the kernel checks for GPL-only helpers and the panic handler
/// (the verifier rejects any path that could reach it), and on the host a
/// `main` that says how the binary is really built (the host build exists
/// only because egress-agent's build.rs depends on this crate).
#[macro_export]
macro_rules! program_glue {
    () => {
        #[cfg(target_arch = "bpf")]
        #[unsafe(link_section = "license")]
        #[unsafe(no_mangle)]
        static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

        #[cfg(target_arch = "bpf")]
        #[panic_handler]
        fn panic(_info: &core::panic::PanicInfo) -> ! {
            loop {}
        }

        #[cfg(not(target_arch = "bpf"))]
        fn main() {
            eprintln!(
                "{} is an eBPF program: build it with `cargo xtask build-ebpf`",
                env!("CARGO_BIN_NAME")
            );
            std::process::exit(1);
        }
    };
}

/// TC verdicts (linux/pkt_cls.h).
pub mod action {
    /// `TC_ACT_UNSPEC`, TCX's "next": traffic that is not ours goes on to
    /// the programs attached after ours and to classic tc filters, which
    /// `TC_ACT_OK` (0) would skip. Our own verdicts are drop and redirect.
    pub const PASS: i32 = -1;
    pub const SHOT: i32 = 2;
    pub const REDIRECT: i32 = 7;
}

use egress_common::DropReason;

/// A packet to drop, and the policy whose counter records it (0: none).
pub struct Dropped {
    pub policy_id: u32,
    pub reason: DropReason,
}

/// Attributes a failure to a policy.
pub trait Blame<T> {
    fn blame(self, policy_id: u32) -> Result<T, Dropped>;
}

impl<T> Blame<T> for Result<T, DropReason> {
    #[inline(always)]
    fn blame(self, policy_id: u32) -> Result<T, Dropped> {
        self.map_err(|reason| Dropped { policy_id, reason })
    }
}

/// Turns a program's outcome into a TC verdict, counting drops.
#[inline(always)]
pub fn verdict(outcome: Result<i32, Dropped>) -> i32 {
    match outcome {
        Ok(action) => action,
        Err(Dropped { policy_id, reason }) => {
            stats::count_drop(policy_id, reason);
            action::SHOT
        }
    }
}
