//! Steering through our external-mode VXLAN device.

use core::mem;

use aya_ebpf::{
    bindings::bpf_tunnel_key,
    helpers::{bpf_redirect, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key},
    programs::TcContext,
};
use egress_common::DropReason;

const TUNNEL_TTL: u8 = 64;

/// Encapsulates towards `remote` with `vni` and hands the packet to the
/// tunnel device.
#[inline(always)]
pub fn redirect(
    ctx: &TcContext,
    remote: [u8; 4],
    vni: u32,
    tunnel_ifindex: u32,
) -> Result<i32, DropReason> {
    // SAFETY: plain C struct; zero is the neutral value of every field.
    let mut key: bpf_tunnel_key = unsafe { mem::zeroed() };
    key.tunnel_id = vni;
    // The helper takes the remote address in host order.
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(remote);
    key.tunnel_ttl = TUNNEL_TTL;
    // SAFETY: key is a valid bpf_tunnel_key of the size we pass.
    let rc = unsafe {
        bpf_skb_set_tunnel_key(ctx.skb.skb, &mut key, size_of::<bpf_tunnel_key>() as u32, 0)
    };
    if rc != 0 {
        return Err(DropReason::RewriteFailed);
    }
    // SAFETY: helper without pointer arguments.
    Ok(unsafe { bpf_redirect(tunnel_ifindex, 0) } as i32)
}

/// The outer header of a packet received on the tunnel device.
#[derive(Clone, Copy)]
pub struct Arrival {
    /// Outer source: the sending node.
    pub remote: [u8; 4],
    /// Outer destination: which of this node's addresses it was sent to.
    pub local: [u8; 4],
    pub vni: u32,
}

/// The outer addresses and VNI of a packet received on the tunnel device.
#[inline(always)]
pub fn arrival(ctx: &TcContext) -> Option<Arrival> {
    // SAFETY: as above.
    let mut key: bpf_tunnel_key = unsafe { mem::zeroed() };
    // SAFETY: key is a valid bpf_tunnel_key of the size we pass; the
    // kernel fills local_ipv4 for a key of this size (Linux ≥ 5.19).
    let rc = unsafe {
        bpf_skb_get_tunnel_key(ctx.skb.skb, &mut key, size_of::<bpf_tunnel_key>() as u32, 0)
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: IPv4 tunnel: the v4 members are the ones the kernel filled.
    let (remote, local) = unsafe {
        (
            key.__bindgen_anon_1.remote_ipv4,
            key.__bindgen_anon_3.local_ipv4,
        )
    };
    Some(Arrival {
        remote: remote.to_be_bytes(),
        local: local.to_be_bytes(),
        vni: key.tunnel_id,
    })
}
