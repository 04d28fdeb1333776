//! Frames as pods, servers and attackers send them, built with etherparse:
//! headers with valid checksums by default, and the knobs the scenarios and
//! the fuzz target turn (IP and TCP options, fragments, TTL, zero UDP
//! checksums, ICMP errors quoting another frame, truncation).

use std::net::Ipv4Addr;

use etherparse::{
    EtherType, Ethernet2Header, IcmpEchoHeader, Icmpv4Header, Icmpv4Type, IpFragOffset, IpNumber,
    Ipv4Header, Ipv4Options, TcpHeader, TcpOptionElement, UdpHeader,
};

/// TCP flag bits as in the header's 13th byte.
pub mod tcp {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
}

#[derive(Clone, Debug)]
pub enum Transport {
    Tcp(TcpHeader),
    /// `checksum: false` sends zero ("no checksum", legal for UDP over IPv4).
    Udp {
        sport: u16,
        dport: u16,
        checksum: bool,
    },
    Icmp(Icmpv4Type),
    /// Any other protocol: its bytes are the payload.
    Other(u8),
}

/// A frame to build: Ethernet, IPv4 (with options), a transport header and payload.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub ip: Ipv4Header,
    pub transport: Transport,
    pub payload: Vec<u8>,
}

const SOME_SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];
const SOME_DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xbb];
pub const DEFAULT_TTL: u8 = 64;

impl Frame {
    fn new(src: Ipv4Addr, dst: Ipv4Addr, proto: IpNumber, transport: Transport) -> Self {
        let mut ip = Ipv4Header::new(0, DEFAULT_TTL, proto, src.octets(), dst.octets())
            .expect("an empty payload fits");
        ip.identification = 0x1234;
        Self {
            src_mac: SOME_SRC_MAC,
            dst_mac: SOME_DST_MAC,
            ip,
            transport,
            payload: Vec::new(),
        }
    }

    /// A TCP segment with `flags` (see [`tcp`]).
    pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Self {
        let mut h = TcpHeader::new(sport, dport, 1000, 64240);
        set_tcp_flags(&mut h, flags);
        if flags & tcp::ACK != 0 {
            h.acknowledgment_number = 2000;
        }
        Self::new(src, dst, IpNumber::TCP, Transport::Tcp(h))
    }

    pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self::new(
            src,
            dst,
            IpNumber::UDP,
            Transport::Udp {
                sport,
                dport,
                checksum: true,
            },
        )
        .payload(b"datagram")
    }

    pub fn echo_request(src: Ipv4Addr, dst: Ipv4Addr, id: u16) -> Self {
        Self::new(
            src,
            dst,
            IpNumber::ICMP,
            Transport::Icmp(Icmpv4Type::EchoRequest(IcmpEchoHeader { id, seq: 1 })),
        )
        .payload(b"ping")
    }

    pub fn echo_reply(src: Ipv4Addr, dst: Ipv4Addr, id: u16) -> Self {
        Self::new(
            src,
            dst,
            IpNumber::ICMP,
            Transport::Icmp(Icmpv4Type::EchoReply(IcmpEchoHeader { id, seq: 1 })),
        )
        .payload(b"ping")
    }

    /// An ICMP error from `src` about `about` (a whole frame, Ethernet
    /// included): it quotes `about`'s IP header and the first `quote_l4`
    /// bytes after it, as routers do (RFC 792: at least 8).
    pub fn icmp_error(
        src: Ipv4Addr,
        dst: Ipv4Addr,
        kind: Icmpv4Type,
        about: &[u8],
        quote_l4: usize,
    ) -> Self {
        Self::new(src, dst, IpNumber::ICMP, Transport::Icmp(kind)).payload(&quote(about, quote_l4))
    }

    /// "Fragmentation needed" with the next hop's MTU.
    pub fn frag_needed(src: Ipv4Addr, dst: Ipv4Addr, mtu: u16, about: &[u8]) -> Self {
        Self::icmp_error(
            src,
            dst,
            Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: mtu,
                },
            ),
            about,
            8,
        )
    }

    /// Another IP protocol (e.g. 47, GRE) with `body` as its bytes.
    pub fn other(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, body: &[u8]) -> Self {
        Self::new(src, dst, IpNumber(proto), Transport::Other(proto)).payload(body)
    }

    pub fn payload(mut self, bytes: &[u8]) -> Self {
        self.payload = bytes.to_vec();
        self
    }

    pub fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ip.time_to_live = ttl;
        self
    }

    /// IP options (padded to a multiple of 4 bytes with End of Options).
    pub fn ip_options(mut self, options: &[u8]) -> Self {
        let mut padded = options.to_vec();
        padded.resize(options.len().next_multiple_of(4), 0);
        self.ip.options =
            Ipv4Options::try_from(&padded[..]).expect("at most 40 bytes of IP options");
        self
    }

    /// A fragment: `more` sets MF, `offset` is in 8-byte units.
    pub fn fragment(mut self, more: bool, offset: u16) -> Self {
        self.ip.more_fragments = more;
        self.ip.dont_fragment = false;
        self.ip.fragment_offset = IpFragOffset::try_new(offset).expect("a 13-bit offset");
        self
    }

    pub fn tcp_options(mut self, options: &[TcpOptionElement]) -> Self {
        if let Transport::Tcp(h) = &mut self.transport {
            h.set_options(options).expect("TCP options fit");
        }
        self
    }

    /// A SYN's MSS option.
    pub fn mss(self, mss: u16) -> Self {
        self.tcp_options(&[TcpOptionElement::MaximumSegmentSize(mss)])
    }

    /// UDP without a checksum (zero on the wire).
    pub fn no_udp_checksum(mut self) -> Self {
        if let Transport::Udp { checksum, .. } = &mut self.transport {
            *checksum = false;
        }
        self
    }

    /// The transport header and payload, with a valid checksum.
    fn l4_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match &self.transport {
            Transport::Tcp(h) => {
                let mut h = h.clone();
                h.checksum = h
                    .calc_checksum_ipv4(&self.ip, &self.payload)
                    .expect("a segment that fits");
                out.extend_from_slice(&h.to_bytes());
            }
            Transport::Udp {
                sport,
                dport,
                checksum,
            } => {
                let mut h = UdpHeader::with_ipv4_checksum(*sport, *dport, &self.ip, &self.payload)
                    .expect("a datagram that fits");
                if !checksum {
                    h.checksum = 0;
                }
                out.extend_from_slice(&h.to_bytes());
            }
            Transport::Icmp(kind) => {
                out.extend_from_slice(
                    &Icmpv4Header::with_checksum(kind.clone(), &self.payload).to_bytes(),
                );
            }
            Transport::Other(_) => {}
        }
        out.extend_from_slice(&self.payload);
        out
    }

    /// The frame's bytes: lengths and checksums as a correct sender writes them.
    pub fn build(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let mut ip = self.ip.clone();
        ip.set_payload_len(l4.len()).expect("a packet that fits");
        ip.header_checksum = ip.calc_header_checksum();
        let mut out = Vec::with_capacity(14 + ip.header_len() + l4.len());
        Ethernet2Header {
            source: self.src_mac,
            destination: self.dst_mac,
            ether_type: EtherType::IPV4,
        }
        .write(&mut out)
        .expect("writing to a Vec");
        ip.write_raw(&mut out).expect("writing to a Vec");
        out.extend_from_slice(&l4);
        out
    }
}

pub fn set_tcp_flags(h: &mut TcpHeader, flags: u8) {
    h.fin = flags & tcp::FIN != 0;
    h.syn = flags & tcp::SYN != 0;
    h.rst = flags & tcp::RST != 0;
    h.psh = flags & tcp::PSH != 0;
    h.ack = flags & tcp::ACK != 0;
    h.urg = flags & tcp::URG != 0;
}

/// What an ICMP error quotes of `frame`: its IP header and `l4_bytes` after it.
pub fn quote(frame: &[u8], l4_bytes: usize) -> Vec<u8> {
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    ip[..(ihl + l4_bytes).min(ip.len())].to_vec()
}

/// Offsets and raw edits of built frames, for what a correct sender would
/// never write (the fuzz target's mutations and the malformed scenarios).
pub mod raw {
    pub const IP: usize = 14;
    pub const IP_TOTAL_LEN: usize = IP + 2;
    pub const IP_TTL: usize = IP + 8;
    pub const IP_PROTO: usize = IP + 9;
    pub const IP_CSUM: usize = IP + 10;
    /// `BPF_PROG_TEST_RUN` refuses (EINVAL) an IPv4 frame shorter than an
    /// Ethernet and a minimal IPv4 header: shorter frames cannot be tested.
    pub const MIN_TEST_RUN_IPV4: usize = IP + 20;

    /// The IPv4 header's length from its IHL.
    pub fn ihl_bytes(frame: &[u8]) -> usize {
        usize::from(frame[IP] & 0x0f) * 4
    }

    /// Recomputes the IPv4 header checksum over `ihl` bytes (as far as the frame has them).
    pub fn fix_ip_checksum(frame: &mut [u8]) {
        let end = (IP + ihl_bytes(frame).max(20)).min(frame.len());
        if end < IP + 20 {
            return;
        }
        frame[IP_CSUM..IP_CSUM + 2].copy_from_slice(&[0, 0]);
        // etherparse sums native-endian words: its result is in native order.
        let sum = etherparse::checksum::Sum16BitWords::new()
            .add_slice(&frame[IP..end])
            .ones_complement();
        frame[IP_CSUM..IP_CSUM + 2].copy_from_slice(&sum.to_ne_bytes());
    }

    pub fn set_total_len(frame: &mut [u8], len: u16) {
        frame[IP_TOTAL_LEN..IP_TOTAL_LEN + 2].copy_from_slice(&len.to_be_bytes());
        fix_ip_checksum(frame);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check;

    #[test]
    fn built_frames_have_valid_checksums() {
        let (a, b) = (
            Ipv4Addr::new(10, 244, 1, 11),
            Ipv4Addr::new(198, 51, 100, 10),
        );
        for frame in [
            Frame::tcp(a, 40000, b, 80, tcp::SYN).mss(1460).build(),
            Frame::udp(a, 5000, b, 53)
                .ip_options(&[7, 7, 4, 0, 0, 0, 0])
                .build(),
            Frame::udp(a, 5000, b, 53).no_udp_checksum().build(),
            Frame::echo_request(a, b, 7).build(),
        ] {
            check::all_checksums_ok(&frame).unwrap();
        }
        let about = Frame::udp(a, 5000, b, 53).build();
        check::all_checksums_ok(&Frame::frag_needed(b, a, 1400, &about).build()).unwrap();
    }

    #[test]
    fn raw_checksum_fix_matches_a_correct_sender() {
        let good = Frame::tcp(
            Ipv4Addr::new(10, 244, 1, 11),
            1,
            Ipv4Addr::new(198, 51, 100, 10),
            2,
            tcp::ACK,
        )
        .build();
        let mut frame = good.clone();
        frame[raw::IP_CSUM] ^= 0xff;
        raw::fix_ip_checksum(&mut frame);
        assert_eq!(frame, good);
    }
}
