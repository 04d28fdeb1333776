//! ICMP errors (destination unreachable incl. fragmentation needed, time
//! exceeded, parameter problem) about translated flows: the outer address
//! and the quoted header are translated together (RFC 5508), so path-MTU
//! discovery works through the egress IP.
//!
//! The quoted transport checksum is left alone: the quote may be truncated,
//! and receivers do not verify it.

use aya_ebpf::programs::TcContext;
use egress_common::{DropReason, FlowKeyV4, NatEntryV4, RevNatEntryV4, proto};

use crate::{
    csum::{L4Csum, csum_replace4, set_ipv4_addr, set_payload_u16, set_payload_u32},
    maps::{NAT_FWD_V4, NAT_REV_V4},
    parse::{ICMP_ID, IP_CSUM, IP_DST, IP_SRC, Ipv4, icmp_type},
};

/// The header an ICMP error quotes.
struct Quoted {
    ip_off: usize,
    src: [u8; 4],
    dst: [u8; 4],
    check: [u8; 2],
    proto: u8,
    /// Offset of the quoted source port (or echo identifier).
    sport_off: usize,
    /// Offset of the quoted destination port; unused for echo.
    dport_off: usize,
    sport: u16,
    dport: u16,
    /// The quote is an echo request (`Some(true)`) or reply (`Some(false)`).
    echo: Option<bool>,
}

#[inline(always)]
fn quoted(ctx: &TcContext, ip: &Ipv4) -> Result<Quoted, DropReason> {
    let ip_off = ip.l4_off + 8;
    let hdr: [u8; 20] = ctx.load(ip_off).map_err(|_| DropReason::Malformed)?;
    let ihl = ((hdr[0] & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(DropReason::Malformed);
    }
    let l4_off = ip_off + ihl;
    let l4: [u8; 8] = ctx.load(l4_off).map_err(|_| DropReason::Malformed)?;
    let mut q = Quoted {
        ip_off,
        src: [hdr[12], hdr[13], hdr[14], hdr[15]],
        dst: [hdr[16], hdr[17], hdr[18], hdr[19]],
        check: [hdr[10], hdr[11]],
        proto: hdr[9],
        sport_off: l4_off,
        dport_off: l4_off + 2,
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        echo: None,
    };
    match q.proto {
        proto::TCP | proto::UDP => Ok(q),
        proto::ICMP if l4[0] == icmp_type::ECHO_REQUEST || l4[0] == icmp_type::ECHO_REPLY => {
            q.echo = Some(l4[0] == icmp_type::ECHO_REQUEST);
            q.sport_off = l4_off + ICMP_ID;
            q.sport = u16::from_be_bytes([l4[4], l4[5]]);
            q.dport = 0;
            Ok(q)
        }
        _ => Err(DropReason::UnsupportedProtocol),
    }
}

/// Rewrites one address of the quoted header and its header checksum.
#[inline(always)]
fn set_quoted_addr(
    ctx: &TcContext,
    q: &Quoted,
    field: usize,
    old: [u8; 4],
    new: [u8; 4],
    icmp: L4Csum,
) -> Result<(), DropReason> {
    set_payload_u32(ctx, q.ip_off + field, old, new, icmp)?;
    let check = csum_replace4(u16::from_be_bytes(q.check), old, new).to_be_bytes();
    set_payload_u16(ctx, q.ip_off + IP_CSUM, q.check, check, icmp)
}

/// An error from the outside about a packet we translated (it quotes
/// `egress IP:nat port -> server`): restore the pod in the outer destination
/// and in the quote. Returns the translation, or `Ok(None)` if the error is
/// not about one of our flows.
#[inline(always)]
pub fn translate_inbound(ctx: &TcContext, ip: &Ipv4) -> Result<Option<RevNatEntryV4>, DropReason> {
    let q = quoted(ctx, ip)?;
    let key = match q.echo {
        Some(true) => FlowKeyV4::new(q.dst, q.src, 0, q.sport, q.proto),
        Some(false) => return Ok(None),
        None => FlowKeyV4::new(q.dst, q.src, q.dport, q.sport, q.proto),
    };
    let Some(rev) = NAT_REV_V4.get_ptr(key) else {
        return Ok(None);
    };
    // SAFETY: pointer from a successful lookup.
    let rev = unsafe { *rev };
    let icmp = L4Csum::for_proto(proto::ICMP, ip.l4_off);
    set_payload_u16(
        ctx,
        q.sport_off,
        q.sport.to_be_bytes(),
        rev.orig_port.to_be_bytes(),
        icmp,
    )?;
    set_quoted_addr(ctx, &q, IP_SRC, q.src, rev.orig_addr, icmp)?;
    set_ipv4_addr(ctx, IP_DST, ip.dst, rev.orig_addr, Some(icmp))?;
    Ok(Some(rev))
}

/// An error a selected pod sends about a reply it received (it quotes
/// `server -> pod`): make it come from the egress IP, in the outer source and
/// in the quote. Returns the flow's translation, or `Ok(None)` if the error is
/// not about a translated flow.
#[inline(always)]
pub fn translate_outbound(ctx: &TcContext, ip: &Ipv4) -> Result<Option<NatEntryV4>, DropReason> {
    let q = quoted(ctx, ip)?;
    if q.echo.is_some() {
        return Ok(None);
    }
    let key = FlowKeyV4::new(q.dst, q.src, q.dport, q.sport, q.proto);
    let Some(nat) = NAT_FWD_V4.get_ptr(key) else {
        return Ok(None);
    };
    // SAFETY: pointer from a successful lookup.
    let nat = unsafe { *nat };
    let icmp = L4Csum::for_proto(proto::ICMP, ip.l4_off);
    set_payload_u16(
        ctx,
        q.dport_off,
        q.dport.to_be_bytes(),
        nat.nat_port.to_be_bytes(),
        icmp,
    )?;
    set_quoted_addr(ctx, &q, IP_DST, q.dst, nat.nat_addr, icmp)?;
    set_ipv4_addr(ctx, IP_SRC, ip.src, nat.nat_addr, Some(icmp))?;
    Ok(Some(nat))
}
