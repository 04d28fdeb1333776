//! Pod-side senders: TCP and UDP clients that learn which source the
//! server saw, ICMP echo, path-MTU and traceroute probes, many concurrent
//! connections, and raw senders of forged packets (built by
//! [`super::packet`]). Each runs in a thread that joined the pod's
//! namespace, so its sockets live there.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::AsyncWriteExt;

use super::{
    packet::{ICMP_ECHO_REPLY, echo_request, parse_icmp, tcp_segment},
    parse_peer, raise_nofile_limit, raw_icmp_socket, set_no_check, traffic_err, v4,
};
use crate::{error::Result, netns::in_netns};

/// Result of [`icmp_echo`]: which sequence numbers were answered.
#[derive(Clone, Debug)]
pub struct EchoResult {
    pub sent: u16,
    pub answered: Vec<u16>,
    /// Carried in every request's payload; see [`super::IcmpObserver::seen_of`].
    pub token: u64,
}

/// A token no other [`icmp_echo`] call of any process on this machine uses.
fn next_echo_token() -> u64 {
    static CALLS: AtomicU32 = AtomicU32::new(1);
    (u64::from(std::process::id()) << 32) | u64::from(CALLS.fetch_add(1, Ordering::Relaxed))
}

/// Sends `count` echo requests with identifier `ident` from `ns` to `dst`,
/// one per 100 ms, and collects replies that carry the same identifier (a
/// reply with a translated identifier does not count).
pub fn icmp_echo(
    ns: &str,
    dst: Ipv4Addr,
    ident: u16,
    count: u16,
    timeout: Duration,
) -> Result<EchoResult> {
    let ns_name = ns.to_owned();
    let token = next_echo_token();
    in_netns(ns, move || {
        let socket = raw_icmp_socket()?;
        let target = SockAddr::from(SocketAddrV4::new(dst, 0));
        let mut answered = Vec::new();
        let deadline = Instant::now() + timeout;
        let mut next_seq = 1u16;
        let mut next_send = Instant::now();
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline && answered.len() < usize::from(count) {
            if next_seq <= count && Instant::now() >= next_send {
                socket
                    .send_to(&echo_request(ident, next_seq, token), &target)
                    .map_err(|e| {
                        traffic_err(format!("ICMP echo from `{ns_name}` to {dst}: send: {e}"))
                    })?;
                next_seq += 1;
                next_send = Instant::now() + Duration::from_millis(100);
            }
            match (&socket).read(&mut buf) {
                Ok(n) => {
                    if let Some(icmp) = parse_icmp(&buf[..n])
                        && icmp.icmp_type == ICMP_ECHO_REPLY
                        && icmp.src == dst
                        && icmp.ident == ident
                        && !answered.contains(&icmp.seq)
                    {
                        answered.push(icmp.seq);
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => {
                    return Err(traffic_err(format!(
                        "ICMP echo from `{ns_name}` to {dst}: receive: {e}"
                    )));
                }
            }
        }
        Ok(EchoResult {
            sent: next_seq - 1,
            answered,
            token,
        })
    })
}

/// Options of the TCP and UDP clients.
#[derive(Clone, Copy, Debug)]
pub struct ClientOpts {
    /// Bind this source port instead of an ephemeral one.
    pub local_port: Option<u16>,
    /// Deadline of each step (connect, each read or write).
    pub timeout: Duration,
    /// UDP only: send datagrams with a zero checksum (`SO_NO_CHECK`), which
    /// IPv4 allows and a NAT must not turn into a wrong one.
    pub zero_udp_checksum: bool,
}

impl Default for ClientOpts {
    fn default() -> Self {
        Self {
            local_port: None,
            timeout: Duration::from_secs(5),
            zero_udp_checksum: false,
        }
    }
}

/// One exchange: the client's own address and what the server saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub local: SocketAddrV4,
    pub observed: SocketAddrV4,
}

/// An open TCP connection to a [`TcpServer`], created in a pod's namespace.
pub struct TcpConn {
    stream: TcpStream,
    pub local: SocketAddrV4,
    pub observed: SocketAddrV4,
    pub server: SocketAddrV4,
    ns: String,
    timeout: Duration,
    progress: Arc<AtomicU64>,
}

fn read_line_sync(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte)? {
            0 => {
                return Err(std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed after `{}` without a newline",
                        String::from_utf8_lossy(&line)
                    ),
                ));
            }
            _ if byte[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            _ => line.push(byte[0]),
        }
    }
}

impl TcpConn {
    /// Connects from `ns` and reads the address the server saw.
    pub fn open(ns: &str, server: SocketAddrV4, opts: ClientOpts) -> Result<Self> {
        let ns_name = ns.to_owned();
        let ns_owned = ns.to_owned();
        let ctx = move |what: &str, e: &dyn std::fmt::Display| {
            let port = opts
                .local_port
                .map(|p| format!(" from port {p}"))
                .unwrap_or_default();
            traffic_err(format!(
                "TCP from `{ns_name}`{port} to {server}: {what}: {e}"
            ))
        };
        in_netns(ns, move || {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
                .map_err(|e| ctx("socket", &e))?;
            if let Some(port) = opts.local_port {
                socket
                    .set_reuse_address(true)
                    .map_err(|e| ctx("SO_REUSEADDR", &e))?;
                socket
                    .bind(&SockAddr::from(SocketAddrV4::new(
                        Ipv4Addr::UNSPECIFIED,
                        port,
                    )))
                    .map_err(|e| ctx("bind", &e))?;
            }
            socket
                .connect_timeout(&SockAddr::from(server), opts.timeout)
                .map_err(|e| ctx("connect", &e))?;
            let mut stream: TcpStream = socket.into();
            stream
                .set_read_timeout(Some(opts.timeout))
                .and_then(|()| stream.set_write_timeout(Some(opts.timeout)))
                .map_err(|e| ctx("timeouts", &e))?;
            let local = v4(stream.local_addr().map_err(|e| ctx("local address", &e))?)?;
            let line = read_line_sync(&mut stream).map_err(|e| ctx("reading greeting", &e))?;
            let observed = parse_peer(&line)?;
            Ok(Self {
                stream,
                local,
                observed,
                server,
                ns: ns_owned,
                timeout: opts.timeout,
                progress: Arc::default(),
            })
        })
    }

    /// Bytes handed to the kernel so far by [`TcpConn::finish`] or [`TcpConn::transfer`].
    pub fn progress(&self) -> Arc<AtomicU64> {
        self.progress.clone()
    }

    /// Sends `bytes` (evenly over `duration` when given), closes the sending
    /// side and checks that the server counted exactly `bytes`.
    pub fn transfer(self, bytes: u64, duration: Option<Duration>) -> Result<Transfer> {
        let rate = duration.map(|d| (bytes, d));
        self.send(rate, |sent| sent < bytes, Some(bytes))
    }

    /// Sends `bytes_per_sec` until `stop` is set, then closes the sending
    /// side and checks that the server counted every byte sent: a stream
    /// that must keep flowing for as long as something else takes.
    pub fn stream_until(self, bytes_per_sec: u64, stop: Arc<AtomicBool>) -> Result<Transfer> {
        let rate = Some((bytes_per_sec, Duration::from_secs(1)));
        self.send(rate, |_| !stop.load(Ordering::Relaxed), None)
    }

    /// Writes while `more(sent)` holds, paced to `rate` (bytes per period)
    /// when given, then shuts the sending side down and compares the
    /// server's count with what was sent (`total`, when known up front).
    fn send(
        mut self,
        rate: Option<(u64, Duration)>,
        more: impl Fn(u64) -> bool,
        total: Option<u64>,
    ) -> Result<Transfer> {
        let started = Instant::now();
        let chunk = vec![0x5au8; 64 * 1024];
        let mut sent: u64 = 0;
        let of = total.map(|b| format!(" of {b}")).unwrap_or_default();
        let fail = |what: String, sent: u64, e: &dyn std::fmt::Display| {
            traffic_err(format!(
                "TCP transfer {} -> {} (from `{}`, seen as {}): {what} after {sent}{of} bytes, {:?} in: {e}",
                self.local,
                self.server,
                self.ns,
                self.observed,
                started.elapsed()
            ))
        };
        while more(sent) {
            let n =
                total.map_or(chunk.len() as u64, |b| (b - sent).min(chunk.len() as u64)) as usize;
            self.stream
                .write_all(&chunk[..n])
                .map_err(|e| fail("write stalled or failed".into(), sent, &e))?;
            sent += n as u64;
            self.progress.store(sent, Ordering::Relaxed);
            if let Some((bytes, period)) = rate {
                let due = period.mul_f64(sent as f64 / bytes as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    thread::sleep(wait);
                }
            }
        }
        self.stream
            .shutdown(Shutdown::Write)
            .map_err(|e| fail("shutdown".into(), sent, &e))?;
        // The server answers once everything arrived, which can trail the
        // last write by a full socket buffer.
        self.stream
            .set_read_timeout(Some(self.timeout.max(Duration::from_secs(30))))
            .map_err(|e| fail("timeout".into(), sent, &e))?;
        let line = read_line_sync(&mut self.stream)
            .map_err(|e| fail("waiting for the server's byte count".into(), sent, &e))?;
        let received: u64 = line
            .trim()
            .parse()
            .map_err(|e| fail(format!("server answered `{line}`"), sent, &e))?;
        if received != sent {
            return Err(fail(
                format!("server received {received} bytes"),
                sent,
                &"byte count mismatch",
            ));
        }
        Ok(Transfer {
            local: self.local,
            observed: self.observed,
            bytes: received,
            elapsed: started.elapsed(),
        })
    }

    /// Closes the connection after checking that data still flows both ways.
    pub fn finish(self) -> Result<Transfer> {
        self.transfer(1024, None)
    }
}

/// Outcome of a completed [`TcpConn::transfer`].
#[derive(Clone, Copy, Debug)]
pub struct Transfer {
    pub local: SocketAddrV4,
    pub observed: SocketAddrV4,
    pub bytes: u64,
    pub elapsed: Duration,
}

/// Connects, learns the observed source, sends a little and closes.
pub fn tcp_probe(ns: &str, server: SocketAddrV4, opts: ClientOpts) -> Result<Probe> {
    let conn = TcpConn::open(ns, server, opts)?;
    let t = conn.finish()?;
    Ok(Probe {
        local: t.local,
        observed: t.observed,
    })
}

/// Sends `bytes` over one connection (see [`TcpConn::transfer`]).
pub fn tcp_bulk(
    ns: &str,
    server: SocketAddrV4,
    bytes: u64,
    duration: Option<Duration>,
    opts: ClientOpts,
) -> Result<Transfer> {
    TcpConn::open(ns, server, opts)?.transfer(bytes, duration)
}

/// Sends a datagram from `ns` (retrying up to five times) until the server
/// answers with the source it saw.
pub fn udp_probe(ns: &str, server: SocketAddrV4, opts: ClientOpts) -> Result<Probe> {
    let ns_name = ns.to_owned();
    in_netns(ns, move || {
        let port = opts
            .local_port
            .map(|p| format!(" from port {p}"))
            .unwrap_or_default();
        let ctx = |what: &str, e: &dyn std::fmt::Display| {
            traffic_err(format!(
                "UDP from `{ns_name}`{port} to {server}: {what}: {e}"
            ))
        };
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
            .map_err(|e| ctx("socket", &e))?;
        socket
            .set_reuse_address(true)
            .map_err(|e| ctx("SO_REUSEADDR", &e))?;
        if opts.zero_udp_checksum {
            set_no_check(socket.as_raw_fd()).map_err(|e| ctx("SO_NO_CHECK", &e))?;
        }
        socket
            .bind(&SockAddr::from(SocketAddrV4::new(
                Ipv4Addr::UNSPECIFIED,
                opts.local_port.unwrap_or(0),
            )))
            .map_err(|e| ctx("bind", &e))?;
        socket
            .connect(&SockAddr::from(server))
            .map_err(|e| ctx("connect", &e))?;
        let socket: UdpSocket = socket.into();
        let attempts = 5u32;
        socket
            .set_read_timeout(Some(opts.timeout / attempts))
            .map_err(|e| ctx("timeout", &e))?;
        let local = v4(socket.local_addr().map_err(|e| ctx("local address", &e))?)?;
        let mut buf = [0u8; 256];
        let mut last = String::from("no answer");
        for _ in 0..attempts {
            socket
                .send(b"egress-lab udp probe")
                .map_err(|e| ctx("send", &e))?;
            match socket.recv(&mut buf) {
                Ok(n) => {
                    let observed = parse_peer(&String::from_utf8_lossy(&buf[..n]))?;
                    return Ok(Probe { local, observed });
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(ctx(
            &format!(
                "no answer to {attempts} datagrams within {:?}",
                opts.timeout
            ),
            &last,
        ))
    })
}

/// Sends a `payload`-byte UDP datagram with DF set from `ns` (path-MTU
/// discovery on) and returns the path MTU the kernel then believes, after
/// giving an ICMP fragmentation-needed up to `wait` to come back.
pub fn udp_path_mtu(ns: &str, server: SocketAddrV4, payload: usize, wait: Duration) -> Result<u32> {
    let ns_name = ns.to_owned();
    in_netns(ns, move || {
        let ctx = |what: &str, e: &dyn std::fmt::Display| {
            traffic_err(format!(
                "UDP path-MTU probe from `{ns_name}` to {server}: {what}: {e}"
            ))
        };
        let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| ctx("bind", &e))?;
        socket.connect(server).map_err(|e| ctx("connect", &e))?;
        let fd = socket.as_raw_fd();
        let do_pmtud: libc::c_int = libc::IP_PMTUDISC_DO;
        // SAFETY: fd is a live socket owned by `socket`; the option value is a
        // c_int whose size is passed along.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                (&do_pmtud as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(ctx("IP_MTU_DISCOVER", &std::io::Error::last_os_error()));
        }
        let path_mtu = || -> Result<u32> {
            let mut mtu: libc::c_int = 0;
            let mut len = size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: as above; `mtu` and `len` outlive the call.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::IPPROTO_IP,
                    libc::IP_MTU,
                    (&mut mtu as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            if rc != 0 {
                return Err(ctx("IP_MTU", &std::io::Error::last_os_error()));
            }
            Ok(mtu as u32)
        };
        let initial = path_mtu()?;
        let datagram = vec![0xa5u8; payload];
        let deadline = Instant::now() + wait;
        let mut next_send = Instant::now();
        while Instant::now() < deadline {
            if Instant::now() >= next_send {
                match socket.send(&datagram) {
                    Ok(_) => {}
                    // The kernel already knows the datagram cannot fit.
                    Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {}
                    Err(e) => return Err(ctx("send", &e)),
                }
                next_send = Instant::now() + Duration::from_millis(300);
            }
            let mtu = path_mtu()?;
            if mtu < initial {
                return Ok(mtu);
            }
            thread::sleep(Duration::from_millis(20));
        }
        path_mtu()
    })
}

/// What one probe of [`udp_trace`] brought back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    /// An ICMP time-exceeded from this address.
    TimeExceeded(Ipv4Addr),
    /// Another ICMP error (type, code) from this address.
    IcmpError {
        from: Ipv4Addr,
        icmp_type: u8,
        code: u8,
    },
    /// The UDP server answered; it saw this source.
    Reached(SocketAddrV4),
    /// Nothing within the deadline.
    Silent,
}

/// Traceroute with UDP towards a [`UdpServer`]: one datagram per TTL from 1
/// to `max_ttl`, reading ICMP errors from the socket's error queue (so an
/// error only counts if it quotes this socket's own address and port, i.e.
/// if it was translated back). Stops at the first answer from the server.
pub fn udp_trace(
    ns: &str,
    server: SocketAddrV4,
    max_ttl: u8,
    per_hop: Duration,
) -> Result<Vec<Hop>> {
    use std::{io::IoSliceMut, os::fd::AsFd};

    use nix::{
        cmsg_space,
        sys::socket::{ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg, setsockopt, sockopt},
    };
    let ns_name = ns.to_owned();
    in_netns(ns, move || {
        let ctx = |what: &str, e: &dyn std::fmt::Display| {
            traffic_err(format!(
                "UDP trace from `{ns_name}` to {server}: {what}: {e}"
            ))
        };
        let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| ctx("bind", &e))?;
        socket.connect(server).map_err(|e| ctx("connect", &e))?;
        socket
            .set_nonblocking(true)
            .map_err(|e| ctx("O_NONBLOCK", &e))?;
        setsockopt(&socket.as_fd(), sockopt::Ipv4RecvErr, &true)
            .map_err(|e| ctx("IP_RECVERR", &e))?;
        let mut hops = Vec::new();
        let mut buf = [0u8; 512];
        for ttl in 1..=max_ttl {
            socket
                .set_ttl(u32::from(ttl))
                .map_err(|e| ctx("IP_TTL", &e))?;
            match socket.send(format!("trace ttl {ttl}").as_bytes()) {
                Ok(_) => {}
                // A pending error from the previous hop's ICMP; the error
                // queue has the details.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EHOSTUNREACH | libc::ECONNREFUSED | libc::ENETUNREACH)
                    ) => {}
                Err(e) => return Err(ctx("send", &e)),
            }
            let deadline = Instant::now() + per_hop;
            let hop = loop {
                let mut iov = [IoSliceMut::new(&mut buf)];
                let mut cmsg = cmsg_space!(libc::sock_extended_err, libc::sockaddr_in);
                let from_queue = recvmsg::<SockaddrIn>(
                    socket.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_ERRQUEUE,
                );
                if let Ok(msg) = from_queue {
                    let mut found = None;
                    for c in msg.cmsgs().map_err(|e| ctx("control messages", &e))? {
                        if let ControlMessageOwned::Ipv4RecvErr(ee, Some(offender)) = c
                            && ee.ee_origin == libc::SO_EE_ORIGIN_ICMP
                        {
                            let from = Ipv4Addr::from(u32::from_be(offender.sin_addr.s_addr));
                            found = Some(if ee.ee_type == 11 {
                                Hop::TimeExceeded(from)
                            } else {
                                Hop::IcmpError {
                                    from,
                                    icmp_type: ee.ee_type,
                                    code: ee.ee_code,
                                }
                            });
                        }
                    }
                    if let Some(hop) = found {
                        break hop;
                    }
                    continue;
                }
                match socket.recv(&mut buf) {
                    Ok(n) => break Hop::Reached(parse_peer(&String::from_utf8_lossy(&buf[..n]))?),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    // Pending ICMP error surfacing here; read it from the queue.
                    Err(_) => continue,
                }
                if Instant::now() >= deadline {
                    break Hop::Silent;
                }
                thread::sleep(Duration::from_millis(10));
            };
            hops.push(hop);
            if matches!(hop, Hop::Reached(_)) {
                break;
            }
        }
        Ok(hops)
    })
}

/// Sends one datagram from `from` (an address of `ns`) to `to`.
pub fn udp_send(ns: &str, from: SocketAddrV4, to: SocketAddrV4, payload: Vec<u8>) -> Result<()> {
    in_netns(ns, move || {
        let socket = UdpSocket::bind(from)
            .map_err(|e| traffic_err(format!("UDP send: bind {from}: {e}")))?;
        socket
            .send_to(&payload, to)
            .map_err(|e| traffic_err(format!("UDP send {from} -> {to}: {e}")))?;
        Ok(())
    })
}

/// Sends `packet`, a whole IPv4 packet whatever its source says, from `ns`
/// through a raw socket (`IPPROTO_RAW`, header included), as a process
/// with CAP_NET_RAW can: the kernel routes it by its destination.
pub fn raw_ipv4_send(ns: &str, packet: Vec<u8>) -> Result<()> {
    let ns_name = ns.to_owned();
    in_netns(ns, move || {
        let ctx = |what: &str, e: &dyn std::fmt::Display| {
            traffic_err(format!("raw IPv4 send from `{ns_name}`: {what}: {e}"))
        };
        let dst = packet
            .get(16..20)
            .map(|d| Ipv4Addr::new(d[0], d[1], d[2], d[3]))
            .ok_or_else(|| ctx("packet", &"shorter than an IPv4 header"))?;
        let socket = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )
        .map_err(|e| ctx("socket", &e))?;
        socket
            .send_to(&packet, &SockAddr::from(SocketAddrV4::new(dst, 0)))
            .map_err(|e| ctx("send", &e))?;
        Ok(())
    })
}

/// Outcome of [`tcp_many`].
#[derive(Clone, Debug)]
pub struct Many {
    /// Sources the server reported, one per successful connection.
    pub observed: Vec<SocketAddrV4>,
    /// How many were open at the same time (all successful ones).
    pub concurrent: usize,
    /// Failures as `(connection index, error)`.
    pub failures: Vec<(usize, String)>,
    pub elapsed: Duration,
}

/// Opens `count` connections from `ns` (at most `in_flight` handshakes at a
/// time), holds every successful one open until all have been tried, then
/// closes them cleanly. Each connection has `timeout` for its handshake and
/// greeting.
pub fn tcp_many(
    ns: &str,
    server: SocketAddrV4,
    count: usize,
    in_flight: usize,
    timeout: Duration,
) -> Result<Many> {
    in_netns(ns, move || {
        raise_nofile_limit()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| traffic_err(format!("tokio runtime: {e}")))?;
        rt.block_on(many(server, count, in_flight.max(1), timeout))
    })
}

async fn many(
    server: SocketAddrV4,
    count: usize,
    in_flight: usize,
    timeout: Duration,
) -> Result<Many> {
    use tokio::{
        io::AsyncBufReadExt,
        sync::{Semaphore, mpsc as tmpsc, watch},
    };
    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(in_flight));
    let (release_tx, release_rx) = watch::channel(false);
    let (report_tx, mut report_rx) =
        tmpsc::unbounded_channel::<(usize, Result<SocketAddrV4, String>)>();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let permits = permits.clone();
        let report = report_tx.clone();
        let mut release = release_rx.clone();
        tasks.spawn(async move {
            let permit = permits.acquire_owned().await;
            let opened = tokio::time::timeout(timeout, async {
                let stream = tokio::net::TcpStream::connect(server)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                let mut reader = tokio::io::BufReader::new(stream);
                let mut line = String::new();
                reader
                    .read_line(&mut line)
                    .await
                    .map_err(|e| format!("greeting: {e}"))?;
                let peer = SocketAddrV4::from_str(line.trim())
                    .map_err(|e| format!("greeting `{}`: {e}", line.trim()))?;
                Ok::<_, String>((reader, peer))
            })
            .await
            .unwrap_or_else(|_| Err(format!("no greeting within {timeout:?}")));
            drop(permit);
            let (mut reader, peer) = match opened {
                Ok(v) => v,
                Err(e) => {
                    let _ = report.send((i, Err(e)));
                    return Ok(());
                }
            };
            let _ = report.send((i, Ok(peer)));
            drop(report);
            let _ = release.wait_for(|go| *go).await;
            tokio::time::timeout(Duration::from_secs(60), async {
                reader.get_mut().shutdown().await?;
                let mut line = String::new();
                reader.read_line(&mut line).await?;
                if line.trim() == "0" {
                    Ok(())
                } else {
                    Err(std::io::Error::other(format!(
                        "server answered `{}`",
                        line.trim()
                    )))
                }
            })
            .await
            .map_err(|_| format!("connection {i}: close timed out"))?
            .map_err(|e| format!("connection {i}: close: {e}"))
        });
    }
    drop(report_tx);
    let mut observed = Vec::with_capacity(count);
    let mut failures = Vec::new();
    // Count the reports rather than waiting for the channel to close: the
    // tasks that succeeded hold their sender until they are released.
    for _ in 0..count {
        let Some((i, result)) = report_rx.recv().await else {
            break;
        };
        match result {
            Ok(peer) => observed.push(peer),
            Err(e) => failures.push((i, e)),
        }
    }
    let concurrent = observed.len();
    let _ = release_tx.send(true);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push((usize::MAX, e)),
            Err(e) => failures.push((usize::MAX, format!("task: {e}"))),
        }
    }
    Ok(Many {
        observed,
        concurrent,
        failures,
        elapsed: started.elapsed(),
    })
}

/// Sends `count` bare TCP segments with `flags` (e.g. a lone ACK, 0x10) from
/// `src.ip()`, source ports `src.port()` onwards (one per segment), to
/// `dst`, through a raw socket in `ns`: segments of no connection, as a
/// scanner or a broken client sends them.
pub fn tcp_raw_segments(
    ns: &str,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    flags: u8,
    count: u16,
) -> Result<()> {
    in_netns(ns, move || {
        let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))
            .map_err(|e| traffic_err(format!("raw TCP socket: {e}")))?;
        for i in 0..count {
            let from = SocketAddrV4::new(*src.ip(), src.port().wrapping_add(i));
            let tcp = tcp_segment(from, dst, 0x1000_0000u32 + u32::from(i), flags);
            let to = SockAddr::from(SocketAddrV4::new(*dst.ip(), 0));
            socket
                .send_to(&tcp, &to)
                .map_err(|e| traffic_err(format!("raw TCP segment {src} -> {dst}: {e}")))?;
        }
        Ok(())
    })
}
