//! Header parsing with bounds checks the verifier accepts.
//!
//! Parsing copies what later stages need into plain structs, because every
//! rewrite helper invalidates packet pointers.

use aya_ebpf::programs::TcContext;
use egress_common::{DropReason, proto};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

pub const ETH_LEN: usize = EthHdr::LEN;
pub const IP_OFF: usize = ETH_LEN;
/// Offsets inside the IPv4 header.
pub const IP_CSUM: usize = 10;
pub const IP_SRC: usize = 12;
pub const IP_DST: usize = 16;
pub const IP_TTL: usize = 8;

const ETH_P_IP: u16 = 0x0800;
/// Enough linear data for Ethernet, an IPv4 header with options and a TCP header.
const LINEAR_HEADROOM: u32 = (ETH_LEN + 60 + 20) as u32;

/// Returns a pointer to a `T` at `offset`, or `None` if it is not within the
/// linear packet data.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// The parts of an IPv4 header the datapath uses.
#[derive(Clone, Copy)]
pub struct Ipv4 {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub proto: u8,
    pub ttl: u8,
    /// Offset of the transport header from the start of the frame.
    pub l4_off: usize,
    /// Any fragment: first (MF set) or later (offset non-zero).
    pub fragment: bool,
    /// A fragment other than the first: it carries no transport header.
    pub later_fragment: bool,
    /// Don't Fragment: an oversized packet gets "fragmentation needed" back.
    pub dont_fragment: bool,
    /// The header's total length (0 in BIG TCP super-packets).
    pub tot_len: u16,
}

impl Ipv4 {
    /// Drops packets whose total length disagrees with the frame: longer
    /// than what arrived, or shorter than its own header. (A frame longer
    /// than the packet is Ethernet padding.) GSO super-packets above 64 KiB
    /// (BIG TCP) carry 0 and are left alone.
    #[inline(always)]
    pub fn check_length(&self, ctx: &TcContext) -> Result<(), DropReason> {
        let tot_len = self.tot_len as usize;
        if tot_len == 0 {
            // SAFETY: reading a field of the context the kernel handed us.
            let gso_size = unsafe { (*ctx.skb.skb).gso_size };
            if gso_size != 0 {
                return Ok(());
            }
        }
        if tot_len < self.l4_off - IP_OFF || tot_len + IP_OFF > ctx.len() as usize {
            return Err(DropReason::BadLength);
        }
        Ok(())
    }
}

/// Makes sure the headers are in the linear area, then parses Ethernet and
/// IPv4. `Ok(None)` for anything that is not IPv4.
#[inline(always)]
pub fn ipv4(ctx: &TcContext) -> Result<Option<Ipv4>, DropReason> {
    // Pull only when headers really lie beyond the linear area: the pull
    // makes the skb writable, which copies the head of cloned skbs (TCP
    // keeps a clone of everything it sends).
    let len = ctx.len();
    let want = if len < LINEAR_HEADROOM {
        len
    } else {
        LINEAR_HEADROOM
    };
    if ctx.data() + want as usize > ctx.data_end() {
        // A failure leaves the packet as it was; the bounds checks below decide.
        let _ = ctx.pull_data(want);
    }
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(DropReason::Malformed)?;
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Ok(None);
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, IP_OFF).ok_or(DropReason::Malformed)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ihl < Ipv4Hdr::LEN || ip.vihl >> 4 != 4 {
        return Err(DropReason::Malformed);
    }
    let frag = u16::from_be_bytes(ip.frags);
    Ok(Some(Ipv4 {
        src: ip.src_addr,
        dst: ip.dst_addr,
        proto: ip.proto,
        ttl: ip.ttl,
        l4_off: IP_OFF + ihl,
        fragment: frag & 0x3fff != 0,
        later_fragment: frag & 0x1fff != 0,
        dont_fragment: frag & 0x4000 != 0,
        tot_len: u16::from_be_bytes(ip.tot_len),
    }))
}

/// TCP flag bits in byte 13 of the TCP header.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// ICMP types the datapath handles.
pub mod icmp_type {
    pub const ECHO_REPLY: u8 = 0;
    pub const DEST_UNREACH: u8 = 3;
    pub const ECHO_REQUEST: u8 = 8;
    pub const TIME_EXCEEDED: u8 = 11;
    pub const PARAMETER_PROBLEM: u8 = 12;
}

/// What a transport header contributes to the flow key and to conntrack.
#[derive(Clone, Copy)]
pub enum L4 {
    /// TCP or UDP. Ports in host order.
    Ports {
        sport: u16,
        dport: u16,
        tcp_flags: u8,
    },
    /// ICMP echo request or reply.
    Echo { request: bool, id: u16 },
    /// ICMP error quoting another packet.
    IcmpError,
}

/// Offsets inside transport headers.
pub const TCP_CSUM: usize = 16;
pub const UDP_CSUM: usize = 6;
pub const ICMP_CSUM: usize = 2;
pub const ICMP_ID: usize = 4;

#[inline(always)]
pub fn l4(ctx: &TcContext, ip: &Ipv4) -> Result<L4, DropReason> {
    match ip.proto {
        proto::TCP | proto::UDP => {
            // The whole fixed header must be there, checksum included: a
            // header cut short after the flags would make a flow whose
            // rewrite then fails.
            let fixed = if ip.proto == proto::TCP { 20 } else { 8 };
            if ctx.data() + ip.l4_off + fixed > ctx.data_end() {
                return Err(DropReason::Malformed);
            }
            // Ports are the first four bytes of both headers; TCP flags at 13.
            let ports: *const [u8; 4] = ptr_at(ctx, ip.l4_off).ok_or(DropReason::Malformed)?;
            // SAFETY: bounds checked by ptr_at.
            let ports = unsafe { *ports };
            let tcp_flags = if ip.proto == proto::TCP {
                let flags: *const u8 = ptr_at(ctx, ip.l4_off + 13).ok_or(DropReason::Malformed)?;
                // SAFETY: bounds checked by ptr_at.
                unsafe { *flags }
            } else {
                0
            };
            Ok(L4::Ports {
                sport: u16::from_be_bytes([ports[0], ports[1]]),
                dport: u16::from_be_bytes([ports[2], ports[3]]),
                tcp_flags,
            })
        }
        proto::ICMP => {
            let hdr: *const [u8; 8] = ptr_at(ctx, ip.l4_off).ok_or(DropReason::Malformed)?;
            // SAFETY: bounds checked by ptr_at.
            let hdr = unsafe { *hdr };
            match hdr[0] {
                icmp_type::ECHO_REQUEST | icmp_type::ECHO_REPLY => Ok(L4::Echo {
                    request: hdr[0] == icmp_type::ECHO_REQUEST,
                    id: u16::from_be_bytes([hdr[4], hdr[5]]),
                }),
                icmp_type::DEST_UNREACH
                | icmp_type::TIME_EXCEEDED
                | icmp_type::PARAMETER_PROBLEM => Ok(L4::IcmpError),
                _ => Err(DropReason::UnsupportedProtocol),
            }
        }
        _ => Err(DropReason::UnsupportedProtocol),
    }
}
