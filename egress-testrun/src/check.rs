//! Reading and verifying output frames: addresses, ports, and every
//! checksum a receiver would verify (IPv4 header, TCP, UDP unless zero,
//! ICMP, and the IP header an ICMP error quotes).

use std::net::Ipv4Addr;

use etherparse::{Ipv4HeaderSlice, TcpHeaderSlice, UdpHeaderSlice, checksum::Sum16BitWords};

use crate::packet::raw;

/// The parts of an IPv4 frame the tests look at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub ttl: u8,
    /// Ports for TCP and UDP; (identifier, 0) for ICMP echo.
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    /// The IP total length equals the frame's IP part and this is no fragment.
    pub complete: bool,
}

/// Parses an IPv4 frame (Ethernet, IPv4, the start of TCP/UDP/ICMP).
pub fn view(frame: &[u8]) -> Result<View, String> {
    let ip = Ipv4HeaderSlice::from_slice(frame.get(raw::IP..).ok_or("no IP header")?)
        .map_err(|e| format!("IPv4 header: {e}"))?;
    let l4 = &frame[raw::IP + ip.slice().len()..];
    let complete = usize::from(ip.total_len()) == frame.len() - raw::IP
        && !ip.more_fragments()
        && ip.fragments_offset().value() == 0;
    let (mut sport, mut dport, mut tcp_flags) = (0, 0, 0);
    match ip.protocol().0 {
        6 | 17 if l4.len() >= 4 => {
            sport = u16::from_be_bytes([l4[0], l4[1]]);
            dport = u16::from_be_bytes([l4[2], l4[3]]);
            if ip.protocol().0 == 6 && l4.len() >= 14 {
                tcp_flags = l4[13];
            }
        }
        1 if l4.len() >= 8 && (l4[0] == 0 || l4[0] == 8) => {
            sport = u16::from_be_bytes([l4[4], l4[5]]);
        }
        _ => {}
    }
    Ok(View {
        src_mac: frame[6..12].try_into().expect("6 bytes"),
        dst_mac: frame[0..6].try_into().expect("6 bytes"),
        src: ip.source_addr(),
        dst: ip.destination_addr(),
        proto: ip.protocol().0,
        ttl: ip.ttl(),
        sport,
        dport,
        tcp_flags,
        complete,
    })
}

fn folds_to_zero(sum: Sum16BitWords) -> bool {
    sum.ones_complement() == 0
}

/// Whether the IPv4 header checksum verifies (the frame must hold the header).
pub fn ip_checksum_ok(frame: &[u8]) -> Option<bool> {
    let ihl = raw::ihl_bytes(frame);
    let header = frame.get(raw::IP..raw::IP + ihl)?;
    (ihl >= 20).then(|| folds_to_zero(Sum16BitWords::new().add_slice(header)))
}

fn pseudo(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> Sum16BitWords {
    Sum16BitWords::new()
        .add_slice(&src)
        .add_slice(&dst)
        .add_2bytes([0, proto])
        .add_2bytes((len as u16).to_be_bytes())
}

/// Whether the transport checksum verifies: `None` when the frame is not a
/// complete TCP, UDP or ICMP packet (a fragment, a truncated frame, a length
/// that disagrees with the frame), or for UDP without a checksum.
pub fn l4_checksum_ok(frame: &[u8]) -> Option<bool> {
    let ip = Ipv4HeaderSlice::from_slice(frame.get(raw::IP..)?).ok()?;
    let v = view(frame).ok()?;
    if !v.complete {
        return None;
    }
    let segment = &frame[raw::IP + ip.slice().len()..];
    let (src, dst) = (ip.source(), ip.destination());
    match v.proto {
        6 => {
            TcpHeaderSlice::from_slice(segment).ok()?;
            Some(folds_to_zero(
                pseudo(src, dst, 6, segment.len()).add_slice(segment),
            ))
        }
        17 => {
            let udp = UdpHeaderSlice::from_slice(segment).ok()?;
            if udp.checksum() == 0 {
                return None;
            }
            Some(folds_to_zero(
                pseudo(src, dst, 17, segment.len()).add_slice(segment),
            ))
        }
        1 if segment.len() >= 8 => Some(folds_to_zero(Sum16BitWords::new().add_slice(segment))),
        _ => None,
    }
}

/// The IP header an ICMP error quotes, if the frame is one and quotes a whole header.
pub fn quoted_ip(frame: &[u8]) -> Option<&[u8]> {
    let v = view(frame).ok()?;
    if v.proto != 1 {
        return None;
    }
    let l4 = raw::IP + raw::ihl_bytes(frame);
    let kind = *frame.get(l4)?;
    if !matches!(kind, 3 | 11 | 12) {
        return None;
    }
    let quote = frame.get(l4 + 8..)?;
    let ihl = usize::from(quote.first()? & 0x0f) * 4;
    quote.get(..ihl).filter(|_| ihl >= 20)
}

/// The quoted header's checksum verifies (`None`: no whole quoted header).
pub fn quoted_ip_checksum_ok(frame: &[u8]) -> Option<bool> {
    quoted_ip(frame).map(|h| folds_to_zero(Sum16BitWords::new().add_slice(h)))
}

/// The quoted header's (source, destination, source port, destination port).
pub fn quoted_tuple(frame: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, u16, u16)> {
    let h = quoted_ip(frame)?;
    let l4 = raw::IP + raw::ihl_bytes(frame) + 8 + h.len();
    let ports = frame.get(l4..l4 + 8)?;
    let (sport, dport) = if h[9] == 1 {
        (u16::from_be_bytes([ports[4], ports[5]]), 0)
    } else {
        (
            u16::from_be_bytes([ports[0], ports[1]]),
            u16::from_be_bytes([ports[2], ports[3]]),
        )
    };
    Some((
        Ipv4Addr::new(h[12], h[13], h[14], h[15]),
        Ipv4Addr::new(h[16], h[17], h[18], h[19]),
        sport,
        dport,
    ))
}

/// Every checksum a receiver verifies must verify. For tests: the frame
/// must be a complete, correct IPv4 packet.
pub fn all_checksums_ok(frame: &[u8]) -> Result<(), String> {
    if ip_checksum_ok(frame) != Some(true) {
        return Err(format!(
            "IPv4 header checksum does not verify: {}",
            hex(frame)
        ));
    }
    match l4_checksum_ok(frame) {
        Some(true) => {}
        Some(false) => {
            return Err(format!(
                "transport checksum does not verify: {}",
                hex(frame)
            ));
        }
        None => {
            let v = view(frame)?;
            // Zero-checksum UDP is the one complete packet without one.
            let zero_udp = v.proto == 17 && frame.len() >= raw::IP + raw::ihl_bytes(frame) + 8;
            if !v.complete || !zero_udp {
                return Err(format!(
                    "not a complete TCP/UDP/ICMP packet: {}",
                    hex(frame)
                ));
            }
        }
    }
    if quoted_ip_checksum_ok(frame) == Some(false) {
        return Err(format!(
            "quoted IP header checksum does not verify: {}",
            hex(frame)
        ));
    }
    Ok(())
}

pub fn hex(frame: &[u8]) -> String {
    frame.iter().map(|b| format!("{b:02x}")).collect()
}
