//! Field rewrites with incremental checksum updates.
//!
//! The kernel helpers are used rather than hand-written arithmetic because
//! they also keep `skb->csum` right for CHECKSUM_COMPLETE packets and handle
//! CHECKSUM_PARTIAL ones (pods on veth usually send those), where only the
//! pseudo-header sum sits in the L4 checksum field.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use egress_common::{DropReason, proto};

use crate::parse::{ICMP_CSUM, IP_CSUM, IP_OFF, IP_TTL, TCP_CSUM, UDP_CSUM};

/// Where a packet's transport checksum lives and how it is updated.
#[derive(Clone, Copy)]
pub struct L4Csum {
    /// Offset of the checksum field from the start of the frame.
    pub off: usize,
    /// Whether the checksum covers the IP pseudo-header (TCP, UDP; not ICMP).
    pub pseudo: bool,
    /// UDP: a zero checksum means "none" and must stay zero.
    pub zero_means_none: bool,
}

impl L4Csum {
    #[inline(always)]
    pub fn for_proto(proto: u8, l4_off: usize) -> Self {
        match proto {
            proto::TCP => Self {
                off: l4_off + TCP_CSUM,
                pseudo: true,
                zero_means_none: false,
            },
            proto::UDP => Self {
                off: l4_off + UDP_CSUM,
                pseudo: true,
                zero_means_none: true,
            },
            _ => Self {
                off: l4_off + ICMP_CSUM,
                pseudo: false,
                zero_means_none: false,
            },
        }
    }

    #[inline(always)]
    fn flags(&self, size: u64, covers_field: bool) -> u64 {
        let mut flags = size;
        if covers_field && self.pseudo {
            flags |= BPF_F_PSEUDO_HDR as u64;
        }
        if self.zero_means_none {
            flags |= BPF_F_MARK_MANGLED_0 as u64;
        }
        flags
    }
}

#[inline(always)]
fn fail<T>(r: Result<T, i64>) -> Result<T, DropReason> {
    r.map_err(|_| DropReason::RewriteFailed)
}

/// Rewrites the IPv4 address at `IP_OFF + field` (IP_SRC or IP_DST), fixing
/// the IP header checksum and, through the pseudo-header, the transport one.
#[inline(always)]
pub fn set_ipv4_addr(
    ctx: &TcContext,
    field: usize,
    old: [u8; 4],
    new: [u8; 4],
    l4: Option<L4Csum>,
) -> Result<(), DropReason> {
    let (from, to) = (
        u32::from_ne_bytes(old) as u64,
        u32::from_ne_bytes(new) as u64,
    );
    if let Some(l4) = l4
        && l4.pseudo
    {
        fail(ctx.l4_csum_replace(l4.off, from, to, l4.flags(4, true)))?;
    }
    fail(ctx.l3_csum_replace(IP_OFF + IP_CSUM, from, to, 4))?;
    fail(ctx.store(IP_OFF + field, &new, 0))
}

/// Rewrites a 16-bit transport field (a port or ICMP identifier) at `off`,
/// fixing the transport checksum.
#[inline(always)]
pub fn set_l4_u16(
    ctx: &TcContext,
    off: usize,
    old: u16,
    new: u16,
    l4: L4Csum,
) -> Result<(), DropReason> {
    if old == new {
        return Ok(());
    }
    let (old_be, new_be) = (old.to_be_bytes(), new.to_be_bytes());
    let (from, to) = (
        u16::from_ne_bytes(old_be) as u64,
        u16::from_ne_bytes(new_be) as u64,
    );
    fail(ctx.l4_csum_replace(l4.off, from, to, l4.flags(2, false)))?;
    fail(ctx.store(off, &new_be, 0))
}

/// Rewrites 4 bytes at `off` that lie inside the transport payload (an ICMP
/// error's quoted header), fixing the transport checksum only.
#[inline(always)]
pub fn set_payload_u32(
    ctx: &TcContext,
    off: usize,
    old: [u8; 4],
    new: [u8; 4],
    l4: L4Csum,
) -> Result<(), DropReason> {
    let (from, to) = (
        u32::from_ne_bytes(old) as u64,
        u32::from_ne_bytes(new) as u64,
    );
    fail(ctx.l4_csum_replace(l4.off, from, to, l4.flags(4, false)))?;
    fail(ctx.store(off, &new, 0))
}

/// Rewrites 2 bytes at `off` inside the transport payload, fixing the transport checksum only.
#[inline(always)]
pub fn set_payload_u16(
    ctx: &TcContext,
    off: usize,
    old: [u8; 2],
    new: [u8; 2],
    l4: L4Csum,
) -> Result<(), DropReason> {
    let (from, to) = (
        u16::from_ne_bytes(old) as u64,
        u16::from_ne_bytes(new) as u64,
    );
    fail(ctx.l4_csum_replace(l4.off, from, to, l4.flags(2, false)))?;
    fail(ctx.store(off, &new, 0))
}

/// Decrements the TTL as a router would; the caller has checked it is above 1.
#[inline(always)]
pub fn decrement_ttl(ctx: &TcContext, ttl: u8, proto: u8) -> Result<(), DropReason> {
    // The checksum covers TTL and protocol as one 16-bit word.
    let old = u16::from_ne_bytes([ttl, proto]) as u64;
    let new = u16::from_ne_bytes([ttl - 1, proto]) as u64;
    fail(ctx.l3_csum_replace(IP_OFF + IP_CSUM, old, new, 2))?;
    fail(ctx.store(IP_OFF + IP_TTL, &(ttl - 1), 0))
}

/// RFC 1624 incremental update of a 16-bit ones'-complement checksum for a
/// 32-bit field change, for checksums the helpers cannot reach (the IP header
/// quoted inside an ICMP error).
#[inline(always)]
pub fn csum_replace4(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let mut sum: u32 = (!check) as u32;
    sum += (!u16::from_be_bytes([old[0], old[1]])) as u32;
    sum += (!u16::from_be_bytes([old[2], old[3]])) as u32;
    sum += u16::from_be_bytes([new[0], new[1]]) as u32;
    sum += u16::from_be_bytes([new[2], new[3]]) as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
