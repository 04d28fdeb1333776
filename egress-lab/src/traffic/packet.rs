//! Packets built and parsed byte by byte, for raw sockets: ICMP echo
//! requests and the parser of what a raw ICMP socket reads, VXLAN frames,
//! IPv4/UDP packets, ICMP errors and bare TCP segments, all with valid
//! checksums. Nothing here touches a socket.

use std::net::{Ipv4Addr, SocketAddrV4};

pub(super) const ICMP_ECHO_REPLY: u8 = 0;
pub(super) const ICMP_ECHO_REQUEST: u8 = 8;

pub(super) struct IcmpHeader {
    pub(super) src: Ipv4Addr,
    pub(super) icmp_type: u8,
    pub(super) ident: u16,
    pub(super) seq: u16,
    /// First eight payload bytes: the token of an [`echo_request`], or 0.
    pub(super) token: u64,
}

/// Parses an IPv4 packet carrying ICMP, as a raw socket delivers it.
pub(super) fn parse_icmp(packet: &[u8]) -> Option<IcmpHeader> {
    if packet.len() < 20 || packet[0] >> 4 != 4 || packet[9] != 1 {
        return None;
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let icmp = packet.get(ihl..ihl + 8)?;
    Some(IcmpHeader {
        src: Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
        icmp_type: icmp[0],
        ident: u16::from_be_bytes([icmp[4], icmp[5]]),
        seq: u16::from_be_bytes([icmp[6], icmp[7]]),
        token: packet.get(ihl + 8..ihl + 16).map_or(0, |b| {
            u64::from_be_bytes(b.try_into().expect("eight bytes"))
        }),
    })
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub(super) fn echo_request(ident: u16, seq: u16, token: u64) -> Vec<u8> {
    let mut msg = vec![ICMP_ECHO_REQUEST, 0, 0, 0];
    msg.extend_from_slice(&ident.to_be_bytes());
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend_from_slice(&token.to_be_bytes());
    msg.extend_from_slice(b"egress-lab echo payload.");
    let sum = internet_checksum(&msg);
    msg[2..4].copy_from_slice(&sum.to_be_bytes());
    msg
}

/// An inner IPv4/UDP packet wrapped in Ethernet, as a VXLAN payload.
#[derive(Clone, Debug)]
pub struct InnerUdp {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub payload: Vec<u8>,
}

/// The UDP payload of a VXLAN packet (RFC 7348 header + inner frame).
pub fn vxlan_payload(vni: u32, inner: &InnerUdp) -> Vec<u8> {
    vxlan_frame(
        vni,
        inner.src_mac,
        inner.dst_mac,
        &ipv4_udp(inner.src, inner.dst, &inner.payload),
    )
}

/// The UDP payload of a VXLAN packet carrying the IPv4 packet `ip`.
pub fn vxlan_frame(vni: u32, src_mac: [u8; 6], dst_mac: [u8; 6], ip: &[u8]) -> Vec<u8> {
    let mut out = vec![0x08, 0, 0, 0];
    out.extend_from_slice(&(vni << 8).to_be_bytes());
    out.extend_from_slice(&dst_mac);
    out.extend_from_slice(&src_mac);
    out.extend_from_slice(&0x0800u16.to_be_bytes());
    out.extend_from_slice(ip);
    out
}

/// An ICMP "port unreachable" from `src` to `dst` quoting the first 28
/// bytes (IPv4 header and 8 transport bytes) of `quoted`, with valid
/// checksums.
pub fn ipv4_port_unreachable(src: Ipv4Addr, dst: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    let quote = &quoted[..quoted.len().min(28)];
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(quote);
    let sum = internet_checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let total_len = 20 + icmp.len();
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(total_len as u16).to_be_bytes());
    ip.extend_from_slice(&[0x43, 0x21, 0, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = internet_checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&icmp);
    ip
}

/// An IPv4 packet carrying a UDP datagram, with valid checksums.
pub fn ipv4_udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let total_len = 20 + udp_len;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(total_len as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, 17, 0, 0]);
    ip.extend_from_slice(&src.ip().octets());
    ip.extend_from_slice(&dst.ip().octets());
    let sum = internet_checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());

    let mut udp = Vec::with_capacity(udp_len);
    udp.extend_from_slice(&src.port().to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(12 + udp_len);
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
    pseudo.extend_from_slice(&udp);
    let csum = match internet_checksum(&pseudo) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&csum.to_be_bytes());
    ip.extend_from_slice(&udp);
    ip
}

/// A 20-byte TCP header (no options) from `src` to `dst` with `flags`,
/// sequence number `seq`, a fixed acknowledgement number and window, and a
/// valid checksum: a segment of no connection.
pub fn tcp_segment(src: SocketAddrV4, dst: SocketAddrV4, seq: u32, flags: u8) -> [u8; 20] {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&0x2000_0000u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&512u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    tcp[16..18].copy_from_slice(&internet_checksum(&pseudo).to_be_bytes());
    tcp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_rfc1071_example() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(internet_checksum(&data), !0xddf2);
    }

    #[test]
    fn echo_request_checksums_to_zero() {
        assert_eq!(
            internet_checksum(&echo_request(0x1234, 7, 0x0102_0304_0506_0708)),
            0
        );
    }

    #[test]
    fn vxlan_payload_layout() {
        let inner = InnerUdp {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src: "10.244.2.11:40000".parse().unwrap(),
            dst: "198.51.100.10:8081".parse().unwrap(),
            payload: b"hello".to_vec(),
        };
        let p = vxlan_payload(0x00abcd, &inner);
        assert_eq!(&p[..8], &[0x08, 0, 0, 0, 0x00, 0xab, 0xcd, 0]);
        assert_eq!(&p[20..22], &[0x08, 0x00]);
        let ip = &p[22..42];
        assert_eq!(internet_checksum(ip), 0);
        assert_eq!(&ip[12..16], &[10, 244, 2, 11]);
        let udp = &p[42..];
        assert_eq!(udp.len(), 13);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&ip[12..20]);
        pseudo.extend_from_slice(&[0, 17, 0, 13]);
        pseudo.extend_from_slice(udp);
        assert_eq!(internet_checksum(&pseudo), 0);
    }

    #[test]
    fn icmp_parser_reads_ip_and_icmp_fields() {
        let mut pkt = vec![
            0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0, 10, 244, 1, 11, 198, 51, 100, 10,
        ];
        let request = echo_request(0xbeef, 3, 0x0a0b_0c0d_0e0f_1011);
        pkt.extend_from_slice(&request[..8]);
        let h = parse_icmp(&pkt).unwrap();
        assert_eq!(h.src, Ipv4Addr::new(10, 244, 1, 11));
        assert_eq!(
            (h.icmp_type, h.ident, h.seq, h.token),
            (ICMP_ECHO_REQUEST, 0xbeef, 3, 0),
            "a header without payload has no token"
        );
        pkt.extend_from_slice(&request[8..]);
        assert_eq!(parse_icmp(&pkt).unwrap().token, 0x0a0b_0c0d_0e0f_1011);
        assert!(parse_icmp(&pkt[..20]).is_none());
    }

    #[test]
    fn tcp_segment_layout_and_checksum() {
        let src: SocketAddrV4 = "10.244.1.11:40000".parse().unwrap();
        let dst: SocketAddrV4 = "198.51.100.10:8080".parse().unwrap();
        let tcp = tcp_segment(src, dst, 0x1000_0007, 0x10);
        assert_eq!(&tcp[..4], &[0x9c, 0x40, 0x1f, 0x90]);
        assert_eq!(&tcp[4..8], &0x1000_0007u32.to_be_bytes());
        assert_eq!((tcp[12], tcp[13]), (5 << 4, 0x10));
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src.ip().octets());
        pseudo.extend_from_slice(&dst.ip().octets());
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        pseudo.extend_from_slice(&tcp);
        assert_eq!(internet_checksum(&pseudo), 0);
    }
}
