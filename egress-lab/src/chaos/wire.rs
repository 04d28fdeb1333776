//! What the chaos probes put on the wire: tagged records, so that whoever
//! receives a packet (the server, or a pod's capture) can tell whose it is
//! and who sent it whatever its addresses say, and the raw frames the ARP
//! probe and the attacker build.

use std::net::{Ipv4Addr, SocketAddrV4};

use crate::{
    spec::PodRef,
    traffic::{InnerUdp, vxlan_payload},
};

/// A pod's datagram or TCP record to the server.
pub const FROM_POD: [u8; 4] = *b"EGC1";
/// The server's echo of a pod's record (only ever for that pod).
pub const FROM_SERVER: [u8; 4] = *b"EGC2";
/// A forged packet from the attacker: never to be delivered to a pod.
pub const FROM_ATTACKER: [u8; 4] = *b"EGCX";
/// Length of every record.
pub const RECORD_LEN: usize = 16;

/// `magic | node | index | 0 | 0 | seq (8, big-endian)`.
pub fn record(magic: [u8; 4], pod: PodRef, seq: u64) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[..4].copy_from_slice(&magic);
    r[4] = pod.node;
    r[5] = pod.index;
    r[8..].copy_from_slice(&seq.to_be_bytes());
    r
}

/// The magic, pod and sequence number of a record.
pub fn parse_record(buf: &[u8]) -> Option<([u8; 4], PodRef, u64)> {
    if buf.len() < RECORD_LEN {
        return None;
    }
    let magic: [u8; 4] = buf[..4].try_into().ok()?;
    if ![FROM_POD, FROM_SERVER, FROM_ATTACKER].contains(&magic) {
        return None;
    }
    let seq = u64::from_be_bytes(buf[8..16].try_into().ok()?);
    Some((magic, PodRef::new(buf[4], buf[5]), seq))
}

/// An IPv4/UDP packet (header checksums filled in), for a raw socket with
/// `IP_HDRINCL`: any source address.
pub fn ipv4_udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    // vxlan_payload builds VXLAN header (8) + Ethernet (14) + IPv4/UDP.
    let framed = vxlan_payload(
        0,
        &InnerUdp {
            src_mac: [0; 6],
            dst_mac: [0; 6],
            src,
            dst,
            payload: payload.to_vec(),
        },
    );
    framed[8 + 14..].to_vec()
}

/// A VXLAN packet as IPv4/UDP from `outer_src` to `outer_dst`'s tunnel
/// port, carrying `inner` under `vni`.
pub fn ipv4_vxlan(
    outer_src: Ipv4Addr,
    outer_dst: SocketAddrV4,
    vni: u32,
    inner: &InnerUdp,
) -> Vec<u8> {
    ipv4_udp(
        SocketAddrV4::new(outer_src, 47_000),
        outer_dst,
        &vxlan_payload(vni, inner),
    )
}

pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;
const ETH_P_ARP: u16 = 0x0806;

/// A broadcast ARP request for `target` from `mac`/`ip`.
pub fn arp_request(mac: [u8; 6], ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    f.extend_from_slice(&ARP_REQUEST.to_be_bytes());
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// The fields of an Ethernet/ARP (IPv4) frame the ARP probe judges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arp {
    pub op: u16,
    pub sender_mac: [u8; 6],
    pub sender_ip: Ipv4Addr,
    pub target_ip: Ipv4Addr,
}

pub fn parse_arp(frame: &[u8]) -> Option<Arp> {
    if frame.len() < 42 || frame[12..14] != ETH_P_ARP.to_be_bytes() {
        return None;
    }
    let a = &frame[14..];
    if a[..6] != [0, 1, 8, 0, 6, 4] {
        return None;
    }
    Some(Arp {
        op: u16::from_be_bytes([a[6], a[7]]),
        sender_mac: a[8..14].try_into().ok()?,
        sender_ip: Ipv4Addr::new(a[14], a[15], a[16], a[17]),
        target_ip: Ipv4Addr::new(a[24], a[25], a[26], a[27]),
    })
}

pub fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).ok())
        .collect::<Option<_>>()?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_foreign_bytes_are_not_records() {
        let pod = PodRef::new(2, 3);
        let r = record(FROM_SERVER, pod, 77);
        assert_eq!(parse_record(&r), Some((FROM_SERVER, pod, 77)));
        assert_eq!(parse_record(b"EGC9xxxxxxxxxxxxxxx"), None);
        assert_eq!(parse_record(&r[..8]), None);
    }

    #[test]
    fn an_arp_request_parses_back() {
        let mac = [2, 0, 0, 0, 0, 9];
        let f = arp_request(
            mac,
            Ipv4Addr::new(172, 18, 0, 1),
            Ipv4Addr::new(172, 18, 0, 100),
        );
        assert_eq!(
            parse_arp(&f),
            Some(Arp {
                op: ARP_REQUEST,
                sender_mac: mac,
                sender_ip: Ipv4Addr::new(172, 18, 0, 1),
                target_ip: Ipv4Addr::new(172, 18, 0, 100),
            })
        );
        assert_eq!(parse_mac(&mac_string(mac)), Some(mac));
    }

    #[test]
    fn raw_udp_has_a_valid_header() {
        let p = ipv4_udp(
            "198.51.100.10:8095".parse().unwrap(),
            "172.18.0.100:1234".parse().unwrap(),
            &[1, 2, 3],
        );
        assert_eq!(p.len(), 20 + 8 + 3);
        assert_eq!(p[9], 17);
        assert_eq!(crate::traffic::internet_checksum(&p[..20]), 0);
        assert_eq!(&p[12..16], &[198, 51, 100, 10]);
    }
}
