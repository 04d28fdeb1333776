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
use egress_common::{DropReason, NEXT_HOP_STAMP_SHIFT, NEXT_HOP_TTL_NS, NextHopV4};

const AF_INET: u8 = 2;
const ETH_HLEN: u32 = 14;

/// Where the FIB sends a packet.
#[derive(Clone, Copy)]
pub struct NextHop {
    pub ifindex: u32,
    /// Destination then source MAC; `None` when the neighbour is not
    /// resolved yet (the kernel resolves it in `bpf_redirect_neigh`).
    pub macs: Option<[u8; 12]>,
    /// The gateway (or the destination itself), network order.
    pub ipv4_nh: u32,
    /// The egress device's MTU.
    pub mtu: u16,
}

/// Why the FIB gave no next hop.
#[derive(Clone, Copy)]
pub struct NoHop {
    pub reason: DropReason,
    /// The egress device's MTU when the packet exceeds it (`MtuExceeded`).
    pub mtu: u16,
}

impl NoHop {
    #[inline(always)]
    const fn drop(reason: DropReason) -> Self {
        Self { reason, mtu: 0 }
    }
}

impl From<NoHop> for DropReason {
    #[inline(always)]
    fn from(e: NoHop) -> Self {
        e.reason
    }
}

/// Routes the packet from `src` to `dst` as if it had arrived on `ifindex`.
#[inline(always)]
pub fn lookup(ctx: &TcContext, src: [u8; 4], dst: [u8; 4], ifindex: u32) -> Result<NextHop, NoHop> {
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
    // SAFETY: reading the union members the lookup filled for AF_INET.
    let (ipv4_nh, mtu) = unsafe {
        (
            params.__bindgen_anon_4.ipv4_dst,
            params.__bindgen_anon_1.mtu_result,
        )
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let mut macs = [0u8; 12];
            macs[..6].copy_from_slice(&params.dmac);
            macs[6..].copy_from_slice(&params.smac);
            Ok(NextHop {
                ifindex: params.ifindex,
                macs: Some(macs),
                ipv4_nh,
                mtu,
            })
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => Ok(NextHop {
            ifindex: params.ifindex,
            macs: None,
            ipv4_nh,
            mtu,
        }),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(NoHop {
            reason: DropReason::MtuExceeded,
            mtu,
        }),
        _ => Err(NoHop::drop(DropReason::FibLookupFailed)),
    }
}

/// A flow entry's next-hop cache, and the time (`conntrack::now`) the packet
/// was seen.
#[derive(Clone, Copy)]
pub struct HopCache {
    pub slot: *mut NextHopV4,
    pub now_ns: u64,
}

/// `lookup`, answered from a flow's `cache` while the cached answer is
/// younger than `NEXT_HOP_TTL_NS` and the packet fits the device without
/// GSO (bigger ones get the kernel's own MTU check); refills the cache
/// after a complete lookup.
///
/// The cache is written without a lock: two CPUs refreshing it at the same
/// moment could mix two answers for a packet, which only matters if the
/// route changed in between, and then only for that packet.
#[inline(always)]
pub fn cached_lookup(
    ctx: &TcContext,
    cache: &HopCache,
    src: [u8; 4],
    dst: [u8; 4],
    ifindex: u32,
) -> Result<NextHop, NoHop> {
    let now = ((cache.now_ns >> NEXT_HOP_STAMP_SHIFT) as u32) | 1;
    // SAFETY: the caller's pointer comes from a successful map lookup and
    // stays valid for this program run; the value is plain data.
    let cached = unsafe { *cache.slot };
    // SAFETY: reading fields of the context the kernel handed us.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if cached.stamp != 0
        && now.wrapping_sub(cached.stamp) < (NEXT_HOP_TTL_NS >> NEXT_HOP_STAMP_SHIFT) as u32
        && gso_size == 0
        && ctx.len() <= cached.mtu as u32 + ETH_HLEN
    {
        return Ok(NextHop {
            ifindex: cached.ifindex,
            macs: Some(cached.macs),
            ipv4_nh: 0,
            mtu: cached.mtu,
        });
    }
    let hop = lookup(ctx, src, dst, ifindex)?;
    if let Some(macs) = hop.macs {
        // SAFETY: as above.
        unsafe {
            *cache.slot = NextHopV4 {
                macs,
                mtu: hop.mtu,
                _pad: 0,
                ifindex: hop.ifindex,
                stamp: now,
            }
        };
    }
    Ok(hop)
}

/// Sends the packet to `hop`; its MACs must already be in the frame when
/// the neighbour was known.
#[inline(always)]
pub fn send(hop: &NextHop) -> i32 {
    if hop.macs.is_some() {
        // SAFETY: helper without pointer arguments.
        return unsafe { bpf_redirect(hop.ifindex, 0) } as i32;
    }
    // The kernel resolves the next hop and queues the packet meanwhile.
    let mut nh = bpf_redir_neigh {
        nh_family: AF_INET as u32,
        __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 {
            ipv4_nh: hop.ipv4_nh,
        },
    };
    // SAFETY: nh is a valid bpf_redir_neigh of the size we pass.
    (unsafe { bpf_redirect_neigh(hop.ifindex, &mut nh, size_of::<bpf_redir_neigh>() as i32, 0) })
        as i32
}

/// Routes the packet from `src` to `dst` as if it had arrived on `ifindex`,
/// fills in the Ethernet addresses and redirects it to the egress device.
#[inline(always)]
pub fn redirect(
    ctx: &TcContext,
    src: [u8; 4],
    dst: [u8; 4],
    ifindex: u32,
) -> Result<i32, DropReason> {
    let hop = lookup(ctx, src, dst, ifindex)?;
    if let Some(macs) = hop.macs {
        ctx.store(0, &macs, 0)
            .map_err(|_| DropReason::RewriteFailed)?;
    }
    Ok(send(&hop))
}
