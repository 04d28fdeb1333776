//! ICMP errors (destination unreachable incl. fragmentation needed, time
//! exceeded, parameter problem) about translated flows: the outer address
//! and the quoted header are translated together (RFC 5508), so path-MTU
//! discovery works through the egress IP.
//!
//! The quoted transport checksum is left alone: the quote may be truncated,
//! and receivers do not verify it.
//!
//! The datapath also sends errors of its own (`into_error`): fragmentation
//! needed for a pod's packet that does not fit the egress device, and time
//! exceeded for tunnel arrivals and replies whose TTL runs out.

use aya_ebpf::{
    bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_NET,
    helpers::{bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes},
    programs::TcContext,
};
use egress_common::{DropReason, FlowKeyV4, NatEntryV4, RevNatEntryV4, proto};

use crate::{
    csum::{L4Csum, csum_replace4, set_ipv4_addr, set_payload_u16, set_payload_u32},
    maps::{ICMP_SCRATCH, NAT_FWD_V4, NAT_REV_V4},
    parse::{ETH_LEN, ICMP_ID, IP_CSUM, IP_DST, IP_OFF, IP_SRC, Ipv4, icmp_type},
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

/// The forward key (`pod -> server`, as `nat::forward_key` makes it) of
/// the packet an error arriving for a pod quotes: the pod's own packet,
/// untranslated. `None` when the quote is not a packet the pod sent to the
/// error's destination, or not one a flow is kept for.
#[inline(always)]
pub fn quoted_forward_key(ctx: &TcContext, ip: &Ipv4) -> Result<Option<FlowKeyV4>, DropReason> {
    let q = quoted(ctx, ip)?;
    if q.src != ip.dst {
        return Ok(None);
    }
    Ok(match q.echo {
        Some(true) => Some(FlowKeyV4::new(q.src, q.dst, q.sport, 0, q.proto)),
        Some(false) => None,
        None => Some(FlowKeyV4::new(q.src, q.dst, q.sport, q.dport, q.proto)),
    })
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

/// An ICMP error the datapath sends about a packet it will not forward.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ErrorKind {
    /// Destination unreachable, fragmentation needed (type 3, code 4), with
    /// the next-hop MTU.
    FragNeeded { mtu: u16 },
    /// Time exceeded in transit (type 11, code 0).
    TimeExceeded,
}

const ICMP_HDR_LEN: usize = 8;
/// Bytes of the offending packet's transport header quoted after its IP
/// header: what RFC 792 asks for and what the kernel needs to find the
/// socket (ports; TCP's sequence number).
const QUOTED_L4_LEN: usize = 8;
/// Frame offset of the quoted transport header.
const QUOTE_L4_AT: usize = ETH_LEN + 20 + ICMP_HDR_LEN + 20;
/// The packet is cut to Ethernet, its IP header and 20 bytes of transport
/// before the new headers go in front: enough to keep a TCP checksum field
/// in place, which the kernel requires of CHECKSUM_PARTIAL packets.
const TRIMMED_LEN: usize = ETH_LEN + 20 + 20;
/// Room inserted in front of the original IP header: new IP and ICMP headers.
const INSERTED: usize = 20 + ICMP_HDR_LEN;
/// The whole frame after the conversion.
pub const ERROR_FRAME_LEN: usize = TRIMMED_LEN + INSERTED;
/// IP total length of the error: the rest of the frame (the tail of the
/// transport header beyond the quote) is padding the receiver trims.
const ERROR_IP_LEN: usize = 20 + ICMP_HDR_LEN + 20 + QUOTED_L4_LEN;

const ETH_P_IP: [u8; 2] = [0x08, 0x00];
const ERROR_TTL: u8 = 64;
/// IPTOS_PREC_INTERNETCONTROL, what Linux puts on its ICMP errors.
const ERROR_TOS: u8 = 0xc0;

/// The ones'-complement sum of `data` (16-bit big-endian words), folded.
#[inline(always)]
pub fn ones_sum<const N: usize>(data: &[u8; N], start: usize, end: usize) -> u16 {
    let mut sum: u32 = 0;
    let mut i = start;
    while i + 1 < end && i + 1 < N {
        sum += u16::from_be_bytes([data[i], data[i + 1]]) as u32;
        i += 2;
    }
    if i < end && i < N {
        sum += (data[i] as u32) << 8;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The 16-bit value `f` for a checksum field that a pending checksum
/// offload (CHECKSUM_PARTIAL) over a region leaves unchanged: the device
/// writes `~(rest + f)`, so `f = ~(rest + f)`, i.e. `2f = ~rest` in ones'
/// complement arithmetic, where halving is a rotation right by one bit.
#[inline(always)]
pub fn offload_fixed_point(rest: u16) -> u16 {
    (!rest).rotate_right(1)
}

/// Where the offending frame's first `TRIMMED_LEN` bytes are loaded into
/// the buffer: its IP header and transport then already sit where the quote
/// goes.
pub const OFFENDING_AT: usize = ERROR_FRAME_LEN - TRIMMED_LEN;

/// Builds, in `f`, the frame of an ICMP error (`kind`, from `from`) about
/// the frame whose first `TRIMMED_LEN` bytes (Ethernet, an option-less IPv4
/// header, 20 bytes of transport) the caller put at `f[OFFENDING_AT..]`.
/// Sent back to where the frame came from: MACs swapped, to the packet's
/// source, quoting its IP header as received. In place, because the BPF
/// stack has no room for two frames.
pub fn build_error(f: &mut [u8; ERROR_FRAME_LEN], kind: ErrorKind, from: [u8; 4]) {
    const O: usize = OFFENDING_AT;
    // Ethernet: back to the sender (read before the headers overwrite them).
    let (orig_dst, orig_src) = (
        [f[O], f[O + 1], f[O + 2], f[O + 3], f[O + 4], f[O + 5]],
        [f[O + 6], f[O + 7], f[O + 8], f[O + 9], f[O + 10], f[O + 11]],
    );
    f[0..6].copy_from_slice(&orig_src);
    f[6..12].copy_from_slice(&orig_dst);
    f[12..14].copy_from_slice(&ETH_P_IP);
    // IP header; the quote (original IP header and transport, and the tail
    // after it) is already in place.
    let ip = ETH_LEN;
    let quote = ETH_LEN + INSERTED;
    f[ip] = 0x45;
    f[ip + 1] = ERROR_TOS;
    f[ip + 2..ip + 4].copy_from_slice(&(ERROR_IP_LEN as u16).to_be_bytes());
    f[ip + 4..ip + 8].copy_from_slice(&[0; 4]);
    f[ip + 8] = ERROR_TTL;
    f[ip + 9] = proto::ICMP;
    f[ip + 10..ip + 12].copy_from_slice(&[0; 2]);
    f[ip + 12..ip + 16].copy_from_slice(&from);
    let to = [f[quote + 12], f[quote + 13], f[quote + 14], f[quote + 15]];
    f[ip + 16..ip + 20].copy_from_slice(&to);
    let check = !ones_sum(f, ip, ip + 20);
    f[ip + 10..ip + 12].copy_from_slice(&check.to_be_bytes());
    // ICMP header.
    let icmp = ip + 20;
    f[icmp..icmp + 8].copy_from_slice(&[0; 8]);
    match kind {
        ErrorKind::FragNeeded { mtu } => {
            f[icmp] = icmp_type::DEST_UNREACH;
            f[icmp + 1] = 4;
            f[icmp + 6..icmp + 8].copy_from_slice(&mtu.to_be_bytes());
        }
        ErrorKind::TimeExceeded => f[icmp] = icmp_type::TIME_EXCEEDED,
    }
    // A UDP packet sent with its checksum left to the device (CHECKSUM_PARTIAL,
    // as veth pods send) still has that offload pending, over the quoted UDP
    // header and what follows it: give the quoted checksum field the value
    // the offload would write, so that the ICMP checksum holds whether or not
    // a device later completes it. Receivers do not verify quoted checksums.
    if f[quote + 9] == proto::UDP {
        let field = QUOTE_L4_AT + 6;
        f[field] = 0;
        f[field + 1] = 0;
        let fixed = offload_fixed_point(ones_sum(f, QUOTE_L4_AT, ERROR_FRAME_LEN));
        f[field..field + 2].copy_from_slice(&fixed.to_be_bytes());
    }
    let check = !ones_sum(f, icmp, ETH_LEN + ERROR_IP_LEN);
    f[icmp + 2..icmp + 4].copy_from_slice(&check.to_be_bytes());
}

/// Turns the packet in place into an ICMP error about itself, addressed to
/// its source and sent from `from`; the caller redirects it back. Packets
/// with IP options are not answered (`Err`).
///
/// The kernel cannot allocate a packet for us here, so the offending one is
/// cut and the new headers are inserted in front of its IP header: it keeps
/// its skb metadata, including a pending checksum offload, which
/// `build_error` makes harmless. The frame is built in a per-CPU scratch
/// buffer (the BPF stack is too small for it next to the rest).
#[inline(always)]
pub fn into_error(
    ctx: &TcContext,
    ip: &Ipv4,
    kind: ErrorKind,
    from: [u8; 4],
) -> Result<(), DropReason> {
    if ip.l4_off != IP_OFF + 20 {
        return Err(DropReason::Malformed);
    }
    let buf = ICMP_SCRATCH
        .get_ptr_mut(0)
        .ok_or(DropReason::RewriteFailed)?;
    // SAFETY: helper on the context the kernel handed us; it only resizes
    // the packet (growing zero-fills), and no packet pointer is held across it.
    let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb, TRIMMED_LEN as u32, 0) };
    if rc != 0 {
        return Err(DropReason::RewriteFailed);
    }
    // SAFETY: the per-CPU slot is ours for this program run, and holds
    // ERROR_FRAME_LEN bytes of which we fill the last TRIMMED_LEN.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            0,
            (*buf).as_mut_ptr().add(OFFENDING_AT).cast(),
            TRIMMED_LEN as u32,
        )
    };
    if rc != 0 {
        return Err(DropReason::RewriteFailed);
    }
    ctx.adjust_room(INSERTED as i32, BPF_ADJ_ROOM_NET, 0)
        .map_err(|_| DropReason::RewriteFailed)?;
    // SAFETY: as above.
    let frame = unsafe { &mut *buf };
    build_error(frame, kind, from);
    // SAFETY: the source is the scratch slot of ERROR_FRAME_LEN bytes.
    let rc = unsafe {
        bpf_skb_store_bytes(
            ctx.skb.skb.cast(),
            0,
            frame.as_ptr().cast(),
            ERROR_FRAME_LEN as u32,
            0,
        )
    };
    if rc != 0 {
        return Err(DropReason::RewriteFailed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as a pod sends it: Ethernet, IPv4 without options, and the
    /// start of a UDP or TCP header with some payload.
    fn offending(proto: u8) -> [u8; TRIMMED_LEN] {
        let mut f = [0u8; TRIMMED_LEN];
        f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]); // to the gateway
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]); // from the pod
        f[12..14].copy_from_slice(&ETH_P_IP);
        let ip = &mut f[14..34];
        ip.copy_from_slice(&[
            0x45, 0, 0x05, 0xdc, 0x12, 0x34, 0x40, 0, 63, proto, 0, 0, 10, 244, 1, 11, 198, 51,
            100, 10,
        ]);
        let check = !ones_sum(&f, 14, 34);
        f[24..26].copy_from_slice(&check.to_be_bytes());
        for (i, b) in f[34..].iter_mut().enumerate() {
            *b = 0x31 + i as u8;
        }
        f
    }

    /// What a device completing a CHECKSUM_PARTIAL offload over
    /// `frame[start..]` writes at `start + offset` (as skb_checksum_help).
    fn complete_offload(frame: &mut [u8; ERROR_FRAME_LEN], start: usize, offset: usize) {
        let folded = ones_sum(frame, start, ERROR_FRAME_LEN);
        frame[start + offset..start + offset + 2].copy_from_slice(&(!folded).to_be_bytes());
    }

    fn error_frame(
        orig: &[u8; TRIMMED_LEN],
        kind: ErrorKind,
        from: [u8; 4],
    ) -> [u8; ERROR_FRAME_LEN] {
        // Whatever a previous packet left in the scratch buffer.
        let mut f = [0xa5u8; ERROR_FRAME_LEN];
        f[OFFENDING_AT..].copy_from_slice(orig);
        build_error(&mut f, kind, from);
        f
    }

    fn icmp_checksum_holds(f: &[u8; ERROR_FRAME_LEN]) -> bool {
        ones_sum(f, ETH_LEN + 20, ETH_LEN + ERROR_IP_LEN) == 0xffff
    }

    #[test]
    fn frag_needed_is_addressed_back_and_quotes_the_packet() {
        let orig = offending(proto::TCP);
        let f = error_frame(&orig, ErrorKind::FragNeeded { mtu: 1400 }, [172, 18, 0, 11]);
        assert_eq!(&f[0..6], &orig[6..12], "back to the pod's MAC");
        assert_eq!(&f[6..12], &orig[0..6]);
        assert_eq!(f[14], 0x45);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]) as usize, ERROR_IP_LEN);
        assert_eq!(f[23], proto::ICMP);
        assert_eq!(&f[26..30], &[172, 18, 0, 11]);
        assert_eq!(&f[30..34], &[10, 244, 1, 11]);
        assert_eq!(ones_sum(&f, 14, 34), 0xffff, "IP header checksum");
        assert_eq!((f[34], f[35]), (3, 4));
        assert_eq!(u16::from_be_bytes([f[40], f[41]]), 1400);
        assert_eq!(&f[42..70], &orig[14..42], "quote: IP header and 8 bytes");
        assert!(icmp_checksum_holds(&f));
    }

    #[test]
    fn time_exceeded_has_type_11() {
        let f = error_frame(
            &offending(proto::TCP),
            ErrorKind::TimeExceeded,
            [1, 2, 3, 4],
        );
        assert_eq!((f[34], f[35]), (11, 0));
        assert_eq!(&f[38..42], &[0; 4]);
        assert!(icmp_checksum_holds(&f));
    }

    #[test]
    fn a_pending_checksum_offload_cannot_break_the_error() {
        // TCP: the offload writes past the end of the IP packet.
        let mut tcp = error_frame(&offending(proto::TCP), ErrorKind::TimeExceeded, [1; 4]);
        complete_offload(&mut tcp, QUOTE_L4_AT, 16);
        assert!(icmp_checksum_holds(&tcp));
        // UDP: into the quoted header, whose checksum is the fixed point.
        for seed in 0..2000u32 {
            let mut orig = offending(proto::UDP);
            for (i, b) in orig[34..].iter_mut().enumerate() {
                *b = (seed.wrapping_mul(2_654_435_761).rotate_left(i as u32) >> 7) as u8;
            }
            let mut udp = error_frame(&orig, ErrorKind::TimeExceeded, [1; 4]);
            assert!(icmp_checksum_holds(&udp), "seed {seed}");
            // The field keeps its value, or swaps 0x0000 and 0xffff (both
            // zero in ones' complement) when the rest sums to zero.
            complete_offload(&mut udp, QUOTE_L4_AT, 6);
            assert!(icmp_checksum_holds(&udp), "seed {seed}: after the offload");
        }
    }
}
