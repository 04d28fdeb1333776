//! Forwarding translated packets ourselves: a FIB lookup and a redirect,
//! so they never pass through the node's netfilter (no masquerade, no host
//! conntrack entry that could later call the flow INVALID).

use core::mem;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup, bpf_redir_neigh,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use egress_common::DropReason;

const AF_INET: u8 = 2;

/// Routes the packet from `src` to `dst` as if it had arrived on `ifindex`,
/// fills in the Ethernet addresses and redirects it to the egress device.
#[inline(always)]
pub fn redirect(
    ctx: &TcContext,
    src: [u8; 4],
    dst: [u8; 4],
    ifindex: u32,
) -> Result<i32, DropReason> {
    // SAFETY: plain C struct; all-zero is its documented initial state.
    let mut params: bpf_fib_lookup = unsafe { mem::zeroed() };
    params.family = AF_INET;
    params.ifindex = ifindex;
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // tot_len stays 0: the kernel then checks the skb itself against the
    // egress MTU, which is right for GSO packets too.
    // SAFETY: params is a valid bpf_fib_lookup of the size we pass.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            &mut params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let macs: [u8; 12] = {
                let mut m = [0u8; 12];
                m[..6].copy_from_slice(&params.dmac);
                m[6..].copy_from_slice(&params.smac);
                m
            };
            ctx.store(0, &macs, 0)
                .map_err(|_| DropReason::RewriteFailed)?;
            // SAFETY: helper without pointer arguments.
            Ok(unsafe { bpf_redirect(params.ifindex, 0) } as i32)
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            // The kernel resolves the next hop and queues the packet meanwhile.
            let mut nh = bpf_redir_neigh {
                nh_family: AF_INET as u32,
                // SAFETY: reading the union member the lookup filled for AF_INET.
                __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 {
                    ipv4_nh: unsafe { params.__bindgen_anon_4.ipv4_dst },
                },
            };
            // SAFETY: nh is a valid bpf_redir_neigh of the size we pass.
            Ok(unsafe {
                bpf_redirect_neigh(
                    params.ifindex,
                    &mut nh,
                    size_of::<bpf_redir_neigh>() as i32,
                    0,
                )
            } as i32)
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(DropReason::MtuExceeded),
        _ => Err(DropReason::FibLookupFailed),
    }
}
