//! Traffic generators and observers that run inside the lab's namespaces.
//!
//! Every socket is created by a thread that first joined the namespace (see
//! [`crate::netns`]); a socket stays in the namespace it was created in, so
//! connections can be handed back to the caller's thread afterwards.
//!
//! The TCP and UDP servers tell each client the address they saw it come
//! from, so the client learns which source the server observed; the servers
//! also record every peer for checks on the server side.
//!
//! TCP protocol: on accept the server writes `<peer ip>:<port>\n`, then reads
//! until the client shuts down its sending side and answers with the number
//! of bytes it received, `<n>\n`. UDP: every datagram is answered with
//! `<peer ip>:<port>\n`.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    error::{LabError, Result},
    netns::{in_netns, join, spawn_in_netns},
};

fn traffic_err(msg: impl Into<String>) -> LabError {
    LabError::Traffic(msg.into())
}

fn v4(addr: SocketAddr) -> Result<SocketAddrV4> {
    match addr {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(a) => Err(traffic_err(format!("unexpected IPv6 address {a}"))),
    }
}

fn parse_peer(line: &str) -> Result<SocketAddrV4> {
    SocketAddrV4::from_str(line.trim())
        .map_err(|e| traffic_err(format!("server sent `{}`, not ip:port: {e}", line.trim())))
}

/// Raises the open-file limit: thousands of concurrent connections need as
/// many descriptors in each of client and server, which often share this
/// process. Root may go past the hard limit (up to `fs.nr_open`); anyone
/// else gets the hard limit.
pub fn raise_nofile_limit() -> Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    const WANTED: u64 = 1 << 18;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(|e| traffic_err(format!("getrlimit(RLIMIT_NOFILE): {e}")))?;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    let target = WANTED.min(nr_open).max(hard);
    if soft >= target {
        return Ok(soft);
    }
    if setrlimit(Resource::RLIMIT_NOFILE, target, target).is_ok() {
        return Ok(target);
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
        .map_err(|e| traffic_err(format!("setrlimit(RLIMIT_NOFILE, {hard}): {e}")))?;
    Ok(hard)
}

/// Retries `check` until it succeeds or `timeout` passes; the error carries
/// `what` and the last failure.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> std::result::Result<T, String>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(last) if Instant::now() >= deadline => {
                return Err(traffic_err(format!(
                    "{what}: still not true after {timeout:?}; last observation: {last}"
                )));
            }
            Err(_) => thread::sleep(Duration::from_millis(200)),
        }
    }
}

// ---------------------------------------------------------------- servers

/// What a server saw of one client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub peer: SocketAddrV4,
    pub at: Instant,
}

type SeenLog = Arc<Mutex<Vec<Seen>>>;

fn record(log: &SeenLog, peer: SocketAddrV4) {
    log.lock().expect("observer log poisoned").push(Seen {
        peer,
        at: Instant::now(),
    });
}

/// TCP observer (see the module docs for its protocol). Stops on drop.
pub struct TcpServer {
    addr: SocketAddrV4,
    ns: String,
    seen: SeenLog,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl TcpServer {
    pub fn start(ns: &str, addr: SocketAddrV4) -> Result<Self> {
        let seen: SeenLog = Arc::default();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let log = seen.clone();
        let thread = spawn_in_netns(ns, "tcp-server", move || {
            raise_nofile_limit()?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| traffic_err(format!("tokio runtime: {e}")))?;
            rt.block_on(async move {
                let listener = match tcp_listener(addr) {
                    Ok(l) => {
                        let _ = ready_tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return Ok(());
                    }
                };
                let mut stop_rx = stop_rx;
                loop {
                    tokio::select! {
                        _ = &mut stop_rx => break,
                        accepted = listener.accept() => match accepted {
                            Ok((stream, peer)) => {
                                let Ok(peer) = v4(peer) else { continue };
                                record(&log, peer);
                                tokio::spawn(serve_tcp(stream, peer));
                            }
                            Err(e) => {
                                // EMFILE and friends: back off instead of spinning.
                                tracing::warn!(error = %e, "accept failed");
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                    }
                }
                Ok(())
            })
        })?;
        let mut server = Self {
            addr,
            ns: ns.to_owned(),
            seen,
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(server),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(server.shutdown().err().unwrap_or_else(|| {
                traffic_err(format!("TCP server in `{ns}` on {addr} did not start"))
            })),
        }
    }

    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// Every connection accepted so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("observer log poisoned").clone()
    }

    pub fn seen_from(&self, ip: Ipv4Addr) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| *s.peer.ip() == ip)
            .collect()
    }

    /// Whether the server accepted a connection from `peer` (exact ip:port).
    pub fn saw(&self, peer: SocketAddrV4) -> bool {
        self.seen().iter().any(|s| s.peer == peer)
    }

    pub fn clear(&self) {
        self.seen.lock().expect("observer log poisoned").clear();
    }

    fn shutdown(&mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(t) => join(t, &self.ns),
            None => Ok(()),
        }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %e, "TCP server ended with an error");
        }
    }
}

fn tcp_listener(addr: SocketAddrV4) -> Result<tokio::net::TcpListener> {
    let err =
        |what: &str, e: std::io::Error| traffic_err(format!("TCP server {addr}: {what}: {e}"));
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| err("socket", e))?;
    socket
        .set_reuse_address(true)
        .map_err(|e| err("SO_REUSEADDR", e))?;
    socket
        .bind(&SockAddr::from(addr))
        .map_err(|e| err("bind", e))?;
    // Room for thousands of simultaneous handshakes (somaxconn is raised in
    // the server namespace to match).
    socket.listen(65535).map_err(|e| err("listen", e))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| err("O_NONBLOCK", e))?;
    tokio::net::TcpListener::from_std(socket.into()).map_err(|e| err("tokio", e))
}

async fn serve_tcp(mut stream: tokio::net::TcpStream, peer: SocketAddrV4) {
    let result: std::io::Result<()> = async {
        stream.write_all(format!("{peer}\n").as_bytes()).await?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut total: u64 = 0;
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        stream.write_all(format!("{total}\n").as_bytes()).await?;
        stream.shutdown().await
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "TCP connection ended with an error");
    }
}

/// UDP observer: answers each datagram with the peer address it saw.
pub struct UdpServer {
    addr: SocketAddrV4,
    ns: String,
    seen: SeenLog,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

/// Makes a UDP socket send zero checksums.
fn set_no_check(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `fd` is a live socket of the caller; the option value is a
    // c_int whose size is passed along.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_NO_CHECK,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl UdpServer {
    pub fn start(ns: &str, addr: SocketAddrV4) -> Result<Self> {
        Self::start_with(ns, addr, false)
    }

    /// With `zero_checksum`, the answers carry a zero UDP checksum.
    pub fn start_with(ns: &str, addr: SocketAddrV4, zero_checksum: bool) -> Result<Self> {
        let seen: SeenLog = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let (log, stop2) = (seen.clone(), stop.clone());
        let thread = spawn_in_netns(ns, "udp-server", move || {
            let socket = match UdpSocket::bind(addr) {
                Ok(s) => s,
                Err(e) => {
                    let _ =
                        ready_tx.send(Err(traffic_err(format!("UDP server: bind {addr}: {e}"))));
                    return Ok(());
                }
            };
            socket
                .set_read_timeout(Some(Duration::from_millis(50)))
                .map_err(|e| traffic_err(format!("UDP server {addr}: timeout: {e}")))?;
            if zero_checksum {
                set_no_check(socket.as_raw_fd())
                    .map_err(|e| traffic_err(format!("UDP server {addr}: SO_NO_CHECK: {e}")))?;
            }
            let _ = ready_tx.send(Ok(()));
            let mut buf = vec![0u8; 65536];
            while !stop2.load(Ordering::Relaxed) {
                match socket.recv_from(&mut buf) {
                    Ok((_, peer)) => {
                        let Ok(peer) = v4(peer) else { continue };
                        record(&log, peer);
                        let _ = socket.send_to(format!("{peer}\n").as_bytes(), peer);
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => tracing::debug!(error = %e, "UDP server receive error"),
                }
            }
            Ok(())
        })?;
        let mut server = Self {
            addr,
            ns: ns.to_owned(),
            seen,
            stop,
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(server),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(server.shutdown().err().unwrap_or_else(|| {
                traffic_err(format!("UDP server in `{ns}` on {addr} did not start"))
            })),
        }
    }

    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("observer log poisoned").clone()
    }

    pub fn seen_from(&self, ip: Ipv4Addr) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| *s.peer.ip() == ip)
            .collect()
    }

    pub fn clear(&self) {
        self.seen.lock().expect("observer log poisoned").clear();
    }

    fn shutdown(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => join(t, &self.ns),
            None => Ok(()),
        }
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %e, "UDP server ended with an error");
        }
    }
}

/// An ICMP echo request as the observer saw it arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EchoSeen {
    pub src: Ipv4Addr,
    pub ident: u16,
    pub seq: u16,
    /// The [`EchoResult::token`] of the [`icmp_echo`] call that sent it, so
    /// a request still in flight from an earlier call is told apart.
    pub token: u64,
}

/// Records the sources of ICMP echo requests reaching a namespace (the kernel
/// still answers them itself).
pub struct IcmpObserver {
    ns: String,
    seen: Arc<Mutex<Vec<EchoSeen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl IcmpObserver {
    pub fn start(ns: &str) -> Result<Self> {
        let seen: Arc<Mutex<Vec<EchoSeen>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let (log, stop2) = (seen.clone(), stop.clone());
        let thread = spawn_in_netns(ns, "icmp-observer", move || {
            let socket = match raw_icmp_socket() {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(());
                }
            };
            let _ = ready_tx.send(Ok(()));
            let mut buf = [0u8; 2048];
            while !stop2.load(Ordering::Relaxed) {
                match (&socket).read(&mut buf) {
                    Ok(n) => {
                        if let Some(icmp) = parse_icmp(&buf[..n])
                            && icmp.icmp_type == ICMP_ECHO_REQUEST
                        {
                            log.lock().expect("observer log poisoned").push(EchoSeen {
                                src: icmp.src,
                                ident: icmp.ident,
                                seq: icmp.seq,
                                token: icmp.token,
                            });
                        }
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) => tracing::debug!(error = %e, "ICMP observer receive error"),
                }
            }
            Ok(())
        })?;
        let mut observer = Self {
            ns: ns.to_owned(),
            seen,
            stop,
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(observer),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(observer
                .shutdown()
                .err()
                .unwrap_or_else(|| traffic_err(format!("ICMP observer in `{ns}` did not start")))),
        }
    }

    pub fn seen(&self) -> Vec<EchoSeen> {
        self.seen.lock().expect("observer log poisoned").clone()
    }

    /// The requests sent by the [`icmp_echo`] call that returned `echo`.
    pub fn seen_of(&self, echo: &EchoResult) -> Vec<EchoSeen> {
        self.seen()
            .into_iter()
            .filter(|s| s.token == echo.token)
            .collect()
    }

    pub fn clear(&self) {
        self.seen.lock().expect("observer log poisoned").clear();
    }

    fn shutdown(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => join(t, &self.ns),
            None => Ok(()),
        }
    }
}

impl Drop for IcmpObserver {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %e, "ICMP observer ended with an error");
        }
    }
}

// ---------------------------------------------------------------- ICMP

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;

fn raw_icmp_socket() -> Result<Socket> {
    let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
        .map_err(|e| traffic_err(format!("raw ICMP socket: {e}")))?;
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| traffic_err(format!("raw ICMP socket timeout: {e}")))?;
    Ok(socket)
}

struct IcmpHeader {
    src: Ipv4Addr,
    icmp_type: u8,
    ident: u16,
    seq: u16,
    /// First eight payload bytes: the token of an [`echo_request`], or 0.
    token: u64,
}

/// Parses an IPv4 packet carrying ICMP, as a raw socket delivers it.
fn parse_icmp(packet: &[u8]) -> Option<IcmpHeader> {
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

fn echo_request(ident: u16, seq: u16, token: u64) -> Vec<u8> {
    let mut msg = vec![ICMP_ECHO_REQUEST, 0, 0, 0];
    msg.extend_from_slice(&ident.to_be_bytes());
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend_from_slice(&token.to_be_bytes());
    msg.extend_from_slice(b"egress-lab echo payload.");
    let sum = internet_checksum(&msg);
    msg[2..4].copy_from_slice(&sum.to_be_bytes());
    msg
}

/// Result of [`icmp_echo`]: which sequence numbers were answered.
#[derive(Clone, Debug)]
pub struct EchoResult {
    pub sent: u16,
    pub answered: Vec<u16>,
    /// Carried in every request's payload; see [`IcmpObserver::seen_of`].
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

// ---------------------------------------------------------------- clients

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
            let sport = src.port().wrapping_add(i);
            let mut tcp = [0u8; 20];
            tcp[0..2].copy_from_slice(&sport.to_be_bytes());
            tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
            tcp[4..8].copy_from_slice(&(0x1000_0000u32 + u32::from(i)).to_be_bytes());
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
            let to = SockAddr::from(SocketAddrV4::new(*dst.ip(), 0));
            socket
                .send_to(&tcp, &to)
                .map_err(|e| traffic_err(format!("raw TCP segment {src} -> {dst}: {e}")))?;
        }
        Ok(())
    })
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
    fn wait_for_reports_the_last_observation() {
        let mut n = 0;
        let err = wait_for("counter reaches 100", Duration::from_millis(300), || {
            n += 1;
            Err::<(), _>(format!("counter is {n}"))
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("counter reaches 100"), "{err}");
        assert!(err.contains("counter is"), "{err}");
    }
}
