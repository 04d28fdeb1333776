//! The traffic the invariants are judged on: every pod sends numbered UDP
//! datagrams to the server, some pods hold long-lived TCP connections that
//! carry a record both ways every few hundred milliseconds, and the server
//! logs each record's source and echoes it back to its sender only.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{
    judge::{Arrival, OwnFlows, Proto},
    wire::{self, FROM_POD, FROM_SERVER, RECORD_LEN},
};
use crate::{
    error::{Result, io_err},
    netns,
    spec::PodRef,
};

/// Stops and joins a probe's threads when dropped.
pub(super) struct Threads {
    pub stop: Arc<AtomicBool>,
    handles: Vec<(String, JoinHandle<Result<()>>)>,
}

impl Threads {
    pub fn new() -> Self {
        Self {
            stop: Arc::new(AtomicBool::new(false)),
            handles: Vec::new(),
        }
    }

    pub fn push(&mut self, ns: &str, handle: JoinHandle<Result<()>>) {
        self.handles.push((ns.to_owned(), handle));
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for (ns, h) in self.handles.drain(..) {
            if let Err(e) = netns::join(h, &ns) {
                tracing::warn!(ns, "chaos probe thread: {e}");
            }
        }
    }
}

/// The server's side: a UDP echo and a TCP echo that log every pod
/// record's source.
pub struct ChaosServer {
    pub arrivals: Arc<Mutex<Vec<Arrival>>>,
    threads: Threads,
}

impl ChaosServer {
    pub fn start(ns: &str, udp: SocketAddrV4, tcp: SocketAddrV4) -> Result<Self> {
        let arrivals: Arc<Mutex<Vec<Arrival>>> = Arc::default();
        let mut threads = Threads::new();
        let (socket, listener) = netns::in_netns(ns, move || {
            let s = UdpSocket::bind(udp).map_err(io_err(format!("binding {udp}")))?;
            let l = TcpListener::bind(tcp).map_err(io_err(format!("binding {tcp}")))?;
            Ok((s, l))
        })?;
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(io_err("UDP read timeout"))?;
        let (stop, log) = (threads.stop.clone(), arrivals.clone());
        threads.push(
            ns,
            netns::spawn_in_netns(ns, "chaos-udp-server", move || {
                let mut buf = [0u8; 256];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((len, SocketAddr::V4(from))) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let Some((FROM_POD, pod, seq)) = wire::parse_record(&buf[..len]) else {
                        continue;
                    };
                    log.lock().expect("arrivals").push(Arrival {
                        at: Instant::now(),
                        from,
                        pod,
                        seq,
                        proto: Proto::Udp,
                    });
                    let _ = socket.send_to(&wire::record(FROM_SERVER, pod, seq), from);
                }
                Ok(())
            })?,
        );
        listener
            .set_nonblocking(true)
            .map_err(io_err("TCP listener non-blocking"))?;
        let (stop, log) = (threads.stop.clone(), arrivals.clone());
        threads.push(
            ns,
            netns::spawn_in_netns(ns, "chaos-tcp-server", move || {
                let mut conns: Vec<JoinHandle<()>> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, SocketAddr::V4(from))) => {
                            let (stop, log) = (stop.clone(), log.clone());
                            conns.push(thread::spawn(move || echo_tcp(stream, from, &stop, &log)));
                        }
                        Ok(_) => {}
                        Err(_) => thread::sleep(Duration::from_millis(20)),
                    }
                    conns.retain(|c| !c.is_finished());
                }
                for c in conns {
                    let _ = c.join();
                }
                Ok(())
            })?,
        );
        Ok(Self { arrivals, threads })
    }

    pub fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals.lock().expect("arrivals").clone()
    }

    pub fn stop(self) {
        drop(self.threads);
    }
}

/// One TCP connection at the server: logs its first record (whose pod it
/// is, and the source it came from) and echoes every record.
fn echo_tcp(mut s: TcpStream, from: SocketAddrV4, stop: &AtomicBool, log: &Mutex<Vec<Arrival>>) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; RECORD_LEN];
    let mut have = 0;
    let mut first = true;
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf[have..]) {
            Ok(0) => return,
            Ok(n) => have += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
        if have < RECORD_LEN {
            continue;
        }
        have = 0;
        let Some((FROM_POD, pod, seq)) = wire::parse_record(&buf) else {
            return;
        };
        if first {
            first = false;
            log.lock().expect("arrivals").push(Arrival {
                at: Instant::now(),
                from,
                pod,
                seq,
                proto: Proto::Tcp,
            });
        }
        if s.write_all(&wire::record(FROM_SERVER, pod, seq)).is_err() {
            return;
        }
    }
    let _ = s.shutdown(Shutdown::Both);
}

/// What a pod's flows are, shared between its senders and its capture.
pub type SharedFlows = Arc<Mutex<OwnFlows>>;

/// A pod's numbered datagrams, one every `interval`; can pause (a pod
/// being deleted does not send).
pub struct PodSender {
    pub pod: PodRef,
    pub paused: Arc<AtomicBool>,
    pub sent: Arc<AtomicU64>,
    threads: Threads,
}

impl PodSender {
    pub fn start(
        ns: &str,
        pod: PodRef,
        to: SocketAddrV4,
        interval: Duration,
        flows: SharedFlows,
    ) -> Result<Self> {
        let mut threads = Threads::new();
        let paused = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (stop, paused2, sent2) = (threads.stop.clone(), paused.clone(), sent.clone());
        threads.push(
            ns,
            netns::spawn_in_netns(ns, "chaos-pod-sender", move || {
                let socket = UdpSocket::bind("0.0.0.0:0").map_err(io_err("pod sender socket"))?;
                let port = socket
                    .local_addr()
                    .map_err(io_err("pod sender address"))?
                    .port();
                flows.lock().expect("flows").udp_ports.insert(port);
                socket
                    .set_nonblocking(true)
                    .map_err(io_err("pod sender non-blocking"))?;
                let mut next = Instant::now();
                let mut seq = 0u64;
                let mut drain = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    // The echoes are judged by the pod's capture; here they
                    // are only read so that the buffer never fills.
                    while socket.recv(&mut drain).is_ok() {}
                    if !paused2.load(Ordering::Relaxed) {
                        // Unreachable errors are expected while a path is down.
                        let _ = socket.send_to(&wire::record(FROM_POD, pod, seq), to);
                        seq += 1;
                        sent2.store(seq, Ordering::Relaxed);
                    }
                    next += interval;
                    let now = Instant::now();
                    if next < now {
                        next = now;
                    }
                    thread::sleep(next - now);
                }
                Ok(())
            })?,
        );
        Ok(Self {
            pod,
            paused,
            sent,
            threads,
        })
    }

    pub fn stop(self) {
        drop(self.threads);
    }
}

/// Something that happened to a held TCP connection.
#[derive(Clone, Debug, Serialize)]
pub struct TcpEvent {
    #[serde(skip)]
    pub at: Instant,
    pub at_ms: u64,
    pub pod: String,
    pub local_port: u16,
    /// `connected`, `reset`, `closed`, `stalled` (no echo for
    /// [`STALL_LIMIT`]), `connect-failed`.
    pub what: String,
    /// Records echoed on this connection so far.
    pub echoed: u64,
}

/// A connection that has echoed nothing for this long is given up.
pub const STALL_LIMIT: Duration = Duration::from_secs(15);
const RECORD_EVERY: Duration = Duration::from_millis(200);

/// A long-lived TCP connection from a pod: a record every 200 ms, each
/// echoed. A connection that breaks is recorded and replaced.
pub struct TcpHolder {
    pub pod: PodRef,
    pub events: Arc<Mutex<Vec<TcpEvent>>>,
    /// Records echoed, over every connection.
    pub echoed: Arc<AtomicU64>,
    threads: Threads,
}

impl TcpHolder {
    pub fn start(ns: &str, pod: PodRef, to: SocketAddrV4, flows: SharedFlows) -> Result<Self> {
        let mut threads = Threads::new();
        let events: Arc<Mutex<Vec<TcpEvent>>> = Arc::default();
        let echoed = Arc::new(AtomicU64::new(0));
        let (stop, events2, echoed2) = (threads.stop.clone(), events.clone(), echoed.clone());
        threads.push(
            ns,
            netns::spawn_in_netns(ns, "chaos-tcp-holder", move || {
                let event = |port: u16, what: &str, n: u64| {
                    events2.lock().expect("tcp events").push(TcpEvent {
                        at: Instant::now(),
                        at_ms: 0,
                        pod: pod.to_string(),
                        local_port: port,
                        what: what.into(),
                        echoed: n,
                    });
                };
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // The port is registered before the SYN leaves: the
                    // capture judges the SYN-ACK, which arrives before
                    // connect() returns.
                    let socket =
                        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                            .map_err(io_err("TCP holder socket"))?;
                    socket
                        .bind(&SocketAddr::from(([0, 0, 0, 0], 0)).into())
                        .map_err(io_err("binding the TCP holder socket"))?;
                    let port = socket
                        .local_addr()
                        .ok()
                        .and_then(|a| a.as_socket())
                        .map_or(0, |a| a.port());
                    flows.lock().expect("flows").tcp_ports.insert(port);
                    let target = SocketAddr::from(to).into();
                    let mut s: TcpStream =
                        match socket.connect_timeout(&target, Duration::from_secs(3)) {
                            Ok(()) => socket.into(),
                            Err(_) => {
                                event(port, "connect-failed", 0);
                                thread::sleep(Duration::from_millis(500));
                                continue;
                            }
                        };
                    let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
                    let _ = s.set_nodelay(true);
                    event(port, "connected", 0);
                    let (mut n, mut last_echo, mut next_send) =
                        (0u64, Instant::now(), Instant::now());
                    let mut buf = [0u8; RECORD_LEN];
                    let mut have = 0;
                    let why = loop {
                        if stop.load(Ordering::Relaxed) {
                            let _ = s.shutdown(Shutdown::Both);
                            return Ok(());
                        }
                        if Instant::now() >= next_send {
                            if let Err(e) = s.write_all(&wire::record(FROM_POD, pod, seq)) {
                                break if e.kind() == ErrorKind::ConnectionReset {
                                    "reset"
                                } else {
                                    "closed"
                                };
                            }
                            seq += 1;
                            next_send += RECORD_EVERY;
                        }
                        match s.read(&mut buf[have..]) {
                            Ok(0) => break "closed",
                            Ok(k) => {
                                have += k;
                                if have == RECORD_LEN {
                                    have = 0;
                                    n += 1;
                                    echoed2.fetch_add(1, Ordering::Relaxed);
                                    last_echo = Instant::now();
                                }
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    ErrorKind::WouldBlock | ErrorKind::TimedOut
                                ) => {}
                            Err(e) if e.kind() == ErrorKind::ConnectionReset => break "reset",
                            Err(_) => break "closed",
                        }
                        if last_echo.elapsed() > STALL_LIMIT {
                            break "stalled";
                        }
                    };
                    event(port, why, n);
                    thread::sleep(Duration::from_millis(500));
                }
                Ok(())
            })?,
        );
        Ok(Self {
            pod,
            events,
            echoed,
            threads,
        })
    }

    pub fn events(&self) -> Vec<TcpEvent> {
        self.events.lock().expect("tcp events").clone()
    }

    pub fn stop(self) {
        drop(self.threads);
    }
}
