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

use crate::parse::{
    ICMP_CSUM, ICMP_ID, IP_CSUM, IP_DST, IP_OFF, IP_SRC, IP_TTL, Ipv4, TCP_CSUM, UDP_CSUM, ptr_at,
};

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

/// RFC 1624 update of a 16-bit field, as `csum_replace4`.
#[inline(always)]
pub fn csum_replace2(check: u16, old: u16, new: u16) -> u16 {
    let mut sum: u32 = (!check) as u32 + (!old) as u32 + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Everything a translation changes in one packet's headers.
#[derive(Clone, Copy)]
pub struct HeaderEdit {
    /// `IP_SRC` or `IP_DST`, and the address it gets (unchanged when equal).
    pub addr_field: usize,
    pub old_addr: [u8; 4],
    pub new_addr: [u8; 4],
    /// A 16-bit transport field (port or ICMP identifier): its offset from
    /// the transport header (0, 2 or `ICMP_ID`), old and new value
    /// (unchanged when equal).
    pub port_off: usize,
    pub old_port: u16,
    pub new_port: u16,
    /// Forwarding as a router: TTL minus one (the caller checked it is above 1).
    pub decrement_ttl: bool,
    /// Destination then source MAC, from the FIB lookup.
    pub macs: Option<[u8; 12]>,
}

/// What the fused rewrite covers: Ethernet, an option-less IPv4 header and
/// the first six bytes of the transport header (ports; ICMP type, code,
/// checksum and identifier).
const HEAD_LEN: usize = L4_AT + 6;
/// The transport header's offset after an option-less IPv4 header.
const L4_AT: usize = IP_OFF + 20;

/// Applies `edit` with as few helper calls as the checksum rules allow.
///
/// The IPv4 header checksum is ours to compute (it does not depend on
/// `skb->ip_summed`), so MACs, TTL, the address, the port and the IP checksum
/// go out in one `bpf_skb_store_bytes` of a copy of the head. The transport
/// checksum stays with `bpf_l4_csum_replace`, which alone knows whether the
/// skb is CHECKSUM_PARTIAL (veth pods) and keeps `skb->csum` right; the
/// address and port need separate calls because only the former is part of
/// the pseudo-header. Direct packet writes are avoided on purpose: they would
/// make the verifier unclone every cloned skb on program entry, including the
/// traffic we pass untouched. Headers with options take the field-by-field path.
#[inline(always)]
pub fn apply(ctx: &TcContext, ip: &Ipv4, edit: &HeaderEdit) -> Result<(), DropReason> {
    let l4 = L4Csum::for_proto(ip.proto, ip.l4_off);
    let Some(head) = (if ip.l4_off == L4_AT {
        ptr_at::<[u8; HEAD_LEN]>(ctx, 0)
    } else {
        None
    }) else {
        return apply_by_field(ctx, ip, edit, l4);
    };
    // SAFETY: bounds checked by ptr_at.
    let mut head = unsafe { *head };
    let ip_csum_at = IP_OFF + IP_CSUM;
    let mut check = u16::from_be_bytes([head[ip_csum_at], head[ip_csum_at + 1]]);
    if edit.old_addr != edit.new_addr {
        check = csum_replace4(check, edit.old_addr, edit.new_addr);
        // Constant indices only: a computed one would bring in a panic path.
        if edit.addr_field == IP_SRC {
            head[IP_OFF + IP_SRC..IP_OFF + IP_SRC + 4].copy_from_slice(&edit.new_addr);
        } else {
            head[IP_OFF + IP_DST..IP_OFF + IP_DST + 4].copy_from_slice(&edit.new_addr);
        }
    }
    if edit.decrement_ttl {
        // The checksum covers TTL and protocol as one 16-bit word.
        let ttl = ip.ttl;
        check = csum_replace2(
            check,
            u16::from_be_bytes([ttl, ip.proto]),
            u16::from_be_bytes([ttl - 1, ip.proto]),
        );
        head[IP_OFF + IP_TTL] = ttl - 1;
    }
    head[ip_csum_at..ip_csum_at + 2].copy_from_slice(&check.to_be_bytes());
    if edit.old_port != edit.new_port {
        let new = edit.new_port.to_be_bytes();
        match edit.port_off {
            0 => head[L4_AT..L4_AT + 2].copy_from_slice(&new),
            2 => head[L4_AT + 2..L4_AT + 4].copy_from_slice(&new),
            ICMP_ID => head[L4_AT + ICMP_ID..L4_AT + ICMP_ID + 2].copy_from_slice(&new),
            // Not in the head; written alone below.
            _ => {}
        }
    }
    if let Some(macs) = edit.macs {
        head[..12].copy_from_slice(&macs);
    }
    // Before the checksum updates: the head holds the ICMP checksum field.
    fail(ctx.store(0, &head, 0))?;
    if edit.old_addr != edit.new_addr && l4.pseudo {
        let (from, to) = (
            u32::from_ne_bytes(edit.old_addr) as u64,
            u32::from_ne_bytes(edit.new_addr) as u64,
        );
        fail(ctx.l4_csum_replace(l4.off, from, to, l4.flags(4, true)))?;
    }
    if edit.old_port != edit.new_port {
        let (old, new) = (edit.old_port, edit.new_port);
        if !matches!(edit.port_off, 0 | 2 | ICMP_ID) {
            return set_l4_u16(ctx, ip.l4_off + edit.port_off, old, new, l4);
        }
        let (from, to) = (
            u16::from_ne_bytes(old.to_be_bytes()) as u64,
            u16::from_ne_bytes(new.to_be_bytes()) as u64,
        );
        fail(ctx.l4_csum_replace(l4.off, from, to, l4.flags(2, false)))?;
    }
    Ok(())
}

/// `apply` for headers with IP options: one helper pair per field.
#[inline(always)]
fn apply_by_field(
    ctx: &TcContext,
    ip: &Ipv4,
    edit: &HeaderEdit,
    l4: L4Csum,
) -> Result<(), DropReason> {
    set_l4_u16(
        ctx,
        ip.l4_off + edit.port_off,
        edit.old_port,
        edit.new_port,
        l4,
    )?;
    if edit.old_addr != edit.new_addr {
        set_ipv4_addr(ctx, edit.addr_field, edit.old_addr, edit.new_addr, Some(l4))?;
    }
    if edit.decrement_ttl {
        decrement_ttl(ctx, ip.ttl, ip.proto)?;
    }
    if let Some(macs) = edit.macs {
        fail(ctx.store(0, &macs, 0))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The IPv4 header checksum computed from scratch, as a sender would.
    fn full(header: &[u8; 20]) -> u16 {
        let mut sum: u32 = 0;
        for (i, pair) in header.chunks(2).enumerate() {
            if i != 5 {
                sum += u16::from_be_bytes([pair[0], pair[1]]) as u32;
            }
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn incremental_updates_match_a_full_recomputation() {
        let mut h: [u8; 20] = [
            0x45, 0, 0, 84, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 244, 64, 2, 172, 18, 0, 1,
        ];
        let check = full(&h);
        h[10..12].copy_from_slice(&check.to_be_bytes());
        // The datapath's edit: new source address and TTL - 1.
        let (old, new) = ([10, 244, 64, 2], [172, 18, 128, 2]);
        let mut c = csum_replace4(check, old, new);
        c = csum_replace2(c, u16::from_be_bytes([64, 6]), u16::from_be_bytes([63, 6]));
        h[12..16].copy_from_slice(&new);
        h[8] = 63;
        assert_eq!(c, full(&h));
    }
}
