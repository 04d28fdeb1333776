//! Gratuitous ARP, sent natively over a raw `AF_PACKET` socket (no `arping`).
//!
//! Switches and routers differ in which form they honour, so every round
//! sends both (as OVN, openshift-sdn and keepalived do):
//!
//! - **request** (RFC 5227 announcement): opcode 1, sender = target = the IP,
//!   target hardware address zero;
//! - **reply** (`arping -A` style): opcode 2, sender = target = the IP,
//!   target hardware address broadcast.
//!
//! Both go to the Ethernet broadcast address. A burst of rounds (by default
//! at 0, 0.5, 1 and 2 s) survives a lost frame and a switch port that comes
//! up late after a link change.

use std::{
    ffi::CString,
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use tracing::debug;

pub const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
/// Ethernet header + ARP for IPv4 over Ethernet.
pub const ARP_FRAME_LEN: usize = 14 + 28;
/// Shortest Ethernet frame without FCS: shorter ones are padded.
pub const MIN_FRAME_LEN: usize = 60;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("interface {0:?} not found")]
    NoSuchInterface(String),
    #[error("interface {interface:?}: cannot read its MAC address: {source}")]
    Mac {
        interface: String,
        source: io::Error,
    },
    #[error("interface {interface:?}: {what}: {source}")]
    Socket {
        interface: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("empty GARP schedule")]
    EmptySchedule,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GarpKind {
    Request,
    Reply,
}

impl GarpKind {
    pub fn opcode(self) -> u16 {
        match self {
            Self::Request => 1,
            Self::Reply => 2,
        }
    }
}

/// When to send, as offsets from the claim, and which forms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GarpConfig {
    pub schedule: Vec<Duration>,
    pub kinds: Vec<GarpKind>,
}

impl Default for GarpConfig {
    fn default() -> Self {
        Self {
            schedule: [0, 500, 1000, 2000]
                .into_iter()
                .map(Duration::from_millis)
                .collect(),
            kinds: vec![GarpKind::Request, GarpKind::Reply],
        }
    }
}

/// The Ethernet frame of one gratuitous ARP, padded to the minimum length.
pub fn garp_frame(kind: GarpKind, mac: [u8; 6], ip: Ipv4Addr) -> [u8; MIN_FRAME_LEN] {
    let mut f = [0u8; MIN_FRAME_LEN];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    let arp = &mut f[14..ARP_FRAME_LEN];
    arp[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    arp[2..4].copy_from_slice(&ETH_P_IP.to_be_bytes());
    arp[4] = 6;
    arp[5] = 4;
    arp[6..8].copy_from_slice(&kind.opcode().to_be_bytes());
    arp[8..14].copy_from_slice(&mac);
    arp[14..18].copy_from_slice(&ip.octets());
    let tha = match kind {
        GarpKind::Request => [0; 6],
        GarpKind::Reply => [0xff; 6],
    };
    arp[18..24].copy_from_slice(&tha);
    arp[24..28].copy_from_slice(&ip.octets());
    f
}

/// A parsed ARP frame (for tests and diagnostics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArpFrame {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub opcode: u16,
    pub sender_mac: [u8; 6],
    pub sender_ip: Ipv4Addr,
    pub target_mac: [u8; 6],
    pub target_ip: Ipv4Addr,
}

impl ArpFrame {
    pub fn parse(f: &[u8]) -> Option<Self> {
        if f.len() < ARP_FRAME_LEN || f[12..14] != ETH_P_ARP.to_be_bytes() {
            return None;
        }
        let a = &f[14..];
        if a[0..2] != [0, 1] || a[2..4] != ETH_P_IP.to_be_bytes() || a[4] != 6 || a[5] != 4 {
            return None;
        }
        let mac = |s: &[u8]| <[u8; 6]>::try_from(s).expect("6 bytes");
        let ip = |s: &[u8]| Ipv4Addr::new(s[0], s[1], s[2], s[3]);
        Some(Self {
            eth_dst: mac(&f[0..6]),
            eth_src: mac(&f[6..12]),
            opcode: u16::from_be_bytes([a[6], a[7]]),
            sender_mac: mac(&a[8..14]),
            sender_ip: ip(&a[14..18]),
            target_mac: mac(&a[18..24]),
            target_ip: ip(&a[24..28]),
        })
    }

    pub fn is_gratuitous(&self) -> bool {
        self.sender_ip == self.target_ip
    }
}

pub fn ifindex(interface: &str) -> Result<u32, Error> {
    let name = CString::new(interface).map_err(|_| Error::NoSuchInterface(interface.into()))?;
    // SAFETY: `name` is a valid NUL-terminated string for the call's duration.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(Error::NoSuchInterface(interface.into()));
    }
    Ok(index)
}

/// The interface's MAC address, asked of the kernel with `SIOCGIFHWADDR` in
/// the caller's network namespace (sysfs shows the namespace it was mounted
/// from, not necessarily ours).
pub fn mac_address(interface: &str) -> Result<[u8; 6], Error> {
    ArpSocket::open(interface)?.mac()
}

/// A raw packet socket bound to one interface, for ARP frames.
pub struct ArpSocket {
    fd: OwnedFd,
    ifindex: u32,
    interface: String,
}

fn sockaddr(ifindex: u32, dst: [u8; 6]) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = ETH_P_ARP.to_be();
    sa.sll_ifindex = ifindex as i32;
    sa.sll_halen = 6;
    sa.sll_addr[..6].copy_from_slice(&dst);
    sa
}

impl ArpSocket {
    /// Opens a socket on `interface` in the caller's network namespace.
    /// Needs `CAP_NET_RAW`.
    pub fn open(interface: &str) -> Result<Self, Error> {
        let ifindex = ifindex(interface)?;
        let err = |what, source| Error::Socket {
            interface: interface.into(),
            what,
            source,
        };
        // SAFETY: plain socket(2) call; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ARP.to_be()),
            )
        };
        if raw < 0 {
            return Err(err("socket(AF_PACKET)", io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let sa = sockaddr(ifindex, [0; 6]);
        // SAFETY: `sa` is a valid sockaddr_ll and the length matches it.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(err("bind", io::Error::last_os_error()));
        }
        Ok(Self {
            fd,
            ifindex,
            interface: interface.into(),
        })
    }

    pub fn send(&self, frame: &[u8]) -> Result<(), Error> {
        let dst: [u8; 6] = frame[0..6].try_into().expect("frame has a header");
        let sa = sockaddr(self.ifindex, dst);
        // SAFETY: the buffer and address are valid for the call; lengths match.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sa as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(Error::Socket {
                interface: self.interface.clone(),
                what: "sendto",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    pub fn mac(&self) -> Result<[u8; 6], Error> {
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(self.interface.bytes()) {
            *dst = src as libc::c_char;
        }
        // SAFETY: `req` is a valid ifreq with a NUL-terminated name (the
        // name is at most 15 bytes, checked by if_nametoindex in `open`).
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) };
        if rc < 0 {
            return Err(Error::Mac {
                interface: self.interface.clone(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: SIOCGIFHWADDR filled the hwaddr member of the union.
        let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
        let mut mac = [0u8; 6];
        for (dst, src) in mac.iter_mut().zip(hw.sa_data.iter()) {
            *dst = *src as u8;
        }
        Ok(mac)
    }

    /// Receives one ARP frame, waiting at most `timeout`.
    pub fn recv(&self, timeout: Duration) -> Result<Option<Vec<u8>>, Error> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        let err = |what| Error::Socket {
            interface: self.interface.clone(),
            what,
            source: io::Error::last_os_error(),
        };
        if rc < 0 {
            return Err(err("poll"));
        }
        if rc == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; 1514];
        // SAFETY: `buf` is writable for its full length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(err("recv"));
        }
        buf.truncate(n as usize);
        Ok(Some(buf))
    }
}

/// Announces `ip` on `interface`: every form in `config.kinds`, at every
/// offset of `config.schedule`. The socket is opened up front, so a bad
/// interface fails before anything is sent.
pub async fn announce(interface: &str, ip: Ipv4Addr, config: &GarpConfig) -> Result<(), Error> {
    announce_while(interface, ip, config, || true).await
}

/// [`announce`], but each round of the schedule is sent only while
/// `valid()` says the node may still answer for `ip` (its claim holds):
/// a burst outlives neither a release nor a lapsed claim, e.g. after the
/// agent was stopped (SIGSTOP) past its fence and resumes with the rest of
/// the burst overdue. Returns at the first round it may not send.
pub async fn announce_while(
    interface: &str,
    ip: Ipv4Addr,
    config: &GarpConfig,
    valid: impl Fn() -> bool,
) -> Result<(), Error> {
    if config.schedule.is_empty() || config.kinds.is_empty() {
        return Err(Error::EmptySchedule);
    }
    let socket = ArpSocket::open(interface)?;
    let mac = socket.mac()?;
    let frames: Vec<[u8; MIN_FRAME_LEN]> = config
        .kinds
        .iter()
        .map(|k| garp_frame(*k, mac, ip))
        .collect();
    let start = tokio::time::Instant::now();
    let mut offsets = config.schedule.clone();
    offsets.sort();
    for offset in offsets {
        tokio::time::sleep_until(start + offset).await;
        if !valid() {
            debug!(%ip, interface, ?offset, "gratuitous ARP burst ends: the claim no longer holds");
            return Ok(());
        }
        for f in &frames {
            socket.send(f)?;
        }
        debug!(%ip, interface, ?offset, "sent gratuitous ARP");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0x42, 0xac, 0x12, 0x00, 0x0b];

    #[test]
    fn request_frame_layout() {
        let f = garp_frame(GarpKind::Request, MAC, Ipv4Addr::new(172, 18, 0, 100));
        assert_eq!(f.len(), 60);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &MAC);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        // htype 1, ptype 0x0800, hlen 6, plen 4, opcode 1
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&f[22..28], &MAC);
        assert_eq!(&f[28..32], &[172, 18, 0, 100]);
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &[172, 18, 0, 100]);
        assert!(f[42..].iter().all(|b| *b == 0));
    }

    #[test]
    fn reply_frame_parses_back() {
        let ip = Ipv4Addr::new(192, 168, 50, 100);
        let f = ArpFrame::parse(&garp_frame(GarpKind::Reply, MAC, ip)).unwrap();
        assert_eq!(f.opcode, 2);
        assert_eq!(f.sender_mac, MAC);
        assert_eq!(f.target_mac, [0xff; 6]);
        assert_eq!((f.sender_ip, f.target_ip), (ip, ip));
        assert!(f.is_gratuitous());
    }

    #[test]
    fn non_arp_frames_do_not_parse() {
        let mut f = garp_frame(GarpKind::Reply, MAC, Ipv4Addr::LOCALHOST);
        f[13] = 0x00;
        assert!(ArpFrame::parse(&f).is_none());
        assert!(ArpFrame::parse(&f[..30]).is_none());
    }

    #[test]
    fn missing_interface_is_named() {
        let e = ArpSocket::open("no-such-if0").err().unwrap();
        assert_eq!(e.to_string(), "interface \"no-such-if0\" not found");
        assert!(mac_address("../etc").is_err());
        let lo = ArpSocket::open("lo").unwrap();
        assert_eq!(lo.mac().unwrap(), [0; 6]);
    }
}
