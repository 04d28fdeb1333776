//! Server-side observers: what reached the server namespace, from which
//! source. Each runs in its own thread inside the namespace (see
//! [`crate::netns`]) and records what it sees until it is dropped; the
//! skeleton they share is [`Observer`].
//!
//! TCP protocol: on accept the server writes `<peer ip>:<port>\n`, then reads
//! until the client shuts down its sending side and answers with the number
//! of bytes it received, `<n>\n`. UDP: every datagram is answered with
//! `<peer ip>:<port>\n`.

use std::{
    io::{ErrorKind, Read},
    marker::PhantomData,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    ops::Deref,
    os::fd::AsRawFd,
    sync::{Arc, Mutex, mpsc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::watch,
};

use super::{
    EchoResult, ICMP_ECHO_REQUEST, parse_icmp, raise_nofile_limit, raw_icmp_socket, set_no_check,
    traffic_err, v4,
};
use crate::{
    error::Result,
    netns::{join, spawn_in_netns},
};

/// How long an observer gets to open its socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A thread in a namespace that records what it observes (`T`) until the
/// handle is dropped. [`Observer::start`] opens the socket first, so that a
/// started observer is listening: a failure to open it is `start`'s error.
pub struct Observer<T> {
    what: String,
    ns: String,
    seen: Arc<Mutex<Vec<T>>>,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<Result<()>>>,
}

/// The observing loop's side of an [`Observer`]: where it records, and
/// whether it must stop.
pub struct Recorder<T> {
    seen: Arc<Mutex<Vec<T>>>,
    stop: watch::Receiver<bool>,
}

impl<T> Recorder<T> {
    pub fn record(&self, item: T) {
        self.seen.lock().expect("observer log poisoned").push(item);
    }

    /// For loops that poll: whether the observer is being dropped.
    pub fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// For async loops: resolves when the observer is being dropped.
    pub async fn stopped(&mut self) {
        // An error means the handle is gone: stop as well.
        let _ = self.stop.wait_for(|stop| *stop).await;
    }
}

impl<T: Clone + Send + 'static> Observer<T> {
    /// Runs `open` and then `observe` in a thread named `name` inside `ns`;
    /// returns once `open` succeeded (or with its error). `what` names the
    /// observer in messages ("TCP server on 198.51.100.10:8080").
    pub fn start<S, Open, Observe>(
        ns: &str,
        name: &str,
        what: String,
        open: Open,
        observe: Observe,
    ) -> Result<Self>
    where
        Open: FnOnce() -> Result<S> + Send + 'static,
        Observe: FnOnce(S, Recorder<T>) -> Result<()> + Send + 'static,
    {
        let seen: Arc<Mutex<Vec<T>>> = Arc::default();
        let (stop, stop_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let recorder = Recorder {
            seen: seen.clone(),
            stop: stop_rx,
        };
        let thread = spawn_in_netns(ns, name, move || match open() {
            Ok(socket) => {
                let _ = ready_tx.send(Ok(()));
                observe(socket, recorder)
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                Ok(())
            }
        })?;
        let mut observer = Self {
            what,
            ns: ns.to_owned(),
            seen,
            stop,
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(())) => Ok(observer),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(observer.shutdown().err().unwrap_or_else(|| {
                traffic_err(format!("{} in `{ns}` did not start", observer.what))
            })),
        }
    }

    /// Everything observed so far, in order.
    pub fn seen(&self) -> Vec<T> {
        self.seen.lock().expect("observer log poisoned").clone()
    }

    pub fn clear(&self) {
        self.seen.lock().expect("observer log poisoned").clear();
    }

    fn shutdown(&mut self) -> Result<()> {
        self.stop.send_replace(true);
        match self.thread.take() {
            Some(t) => join(t, &self.ns),
            None => Ok(()),
        }
    }
}

impl<T> Drop for Observer<T> {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        if let Some(t) = self.thread.take()
            && let Err(e) = join(t, &self.ns)
        {
            tracing::warn!(error = %e, "{} ended with an error", self.what);
        }
    }
}

/// What a server saw of one client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub peer: SocketAddrV4,
    pub at: Instant,
}

impl Seen {
    fn now(peer: SocketAddrV4) -> Self {
        Self {
            peer,
            at: Instant::now(),
        }
    }
}

impl Observer<Seen> {
    pub fn seen_from(&self, ip: Ipv4Addr) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| *s.peer.ip() == ip)
            .collect()
    }

    /// Whether a client came from `peer` (exact ip:port).
    pub fn saw(&self, peer: SocketAddrV4) -> bool {
        self.seen().iter().any(|s| s.peer == peer)
    }
}

/// A server listening on `addr` that tells each client which source it
/// saw: an [`Observer`] of clients. Stops on drop. `P` is its protocol,
/// [`Tcp`] or [`Udp`] (see the module docs).
pub struct Server<P> {
    addr: SocketAddrV4,
    observer: Observer<Seen>,
    protocol: PhantomData<P>,
}

/// [`Server`]'s protocol marker: TCP (accepted connections are recorded).
pub struct Tcp;
/// [`Server`]'s protocol marker: UDP (every datagram is recorded).
pub struct Udp;

pub type TcpServer = Server<Tcp>;
pub type UdpServer = Server<Udp>;

impl<P> Server<P> {
    fn start_observer<S, Open, Observe>(
        ns: &str,
        addr: SocketAddrV4,
        name: &str,
        open: Open,
        observe: Observe,
    ) -> Result<Self>
    where
        Open: FnOnce() -> Result<S> + Send + 'static,
        Observe: FnOnce(S, Recorder<Seen>) -> Result<()> + Send + 'static,
    {
        let what = format!("{} on {addr}", name.replace('-', " "));
        let observer = Observer::start(ns, name, what, open, observe)?;
        Ok(Self {
            addr,
            observer,
            protocol: PhantomData,
        })
    }

    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }
}

impl<P> Deref for Server<P> {
    type Target = Observer<Seen>;

    fn deref(&self) -> &Observer<Seen> {
        &self.observer
    }
}

impl Server<Tcp> {
    pub fn start(ns: &str, addr: SocketAddrV4) -> Result<Self> {
        let open = move || {
            raise_nofile_limit()?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| traffic_err(format!("tokio runtime: {e}")))?;
            let listener = {
                let _in_runtime = rt.enter();
                tcp_listener(addr)?
            };
            Ok((rt, listener))
        };
        let observe = |(rt, listener): (tokio::runtime::Runtime, tokio::net::TcpListener),
                       mut log: Recorder<Seen>| {
            rt.block_on(async move {
                loop {
                    tokio::select! {
                        () = log.stopped() => break,
                        accepted = listener.accept() => match accepted {
                            Ok((stream, peer)) => {
                                let Ok(peer) = v4(peer) else { continue };
                                log.record(Seen::now(peer));
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
        };
        Self::start_observer(ns, addr, "tcp-server", open, observe)
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

impl Server<Udp> {
    pub fn start(ns: &str, addr: SocketAddrV4) -> Result<Self> {
        Self::start_with(ns, addr, false)
    }

    /// With `zero_checksum`, the answers carry a zero UDP checksum.
    pub fn start_with(ns: &str, addr: SocketAddrV4, zero_checksum: bool) -> Result<Self> {
        let open = move || {
            let socket = UdpSocket::bind(addr)
                .map_err(|e| traffic_err(format!("UDP server: bind {addr}: {e}")))?;
            socket
                .set_read_timeout(Some(POLL))
                .map_err(|e| traffic_err(format!("UDP server {addr}: timeout: {e}")))?;
            if zero_checksum {
                set_no_check(socket.as_raw_fd())
                    .map_err(|e| traffic_err(format!("UDP server {addr}: SO_NO_CHECK: {e}")))?;
            }
            Ok(socket)
        };
        let observe = |socket: UdpSocket, log: Recorder<Seen>| {
            let mut buf = vec![0u8; 65536];
            while !log.stopping() {
                match socket.recv_from(&mut buf) {
                    Ok((_, peer)) => {
                        let Ok(peer) = v4(peer) else { continue };
                        log.record(Seen::now(peer));
                        let _ = socket.send_to(format!("{peer}\n").as_bytes(), peer);
                    }
                    Err(e) if is_timeout(&e) => {}
                    Err(e) => tracing::debug!(error = %e, "UDP server receive error"),
                }
            }
            Ok(())
        };
        Self::start_observer(ns, addr, "udp-server", open, observe)
    }
}

/// How often a polling observer checks whether it must stop.
const POLL: Duration = Duration::from_millis(50);

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// An ICMP echo request as the observer saw it arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EchoSeen {
    pub src: Ipv4Addr,
    pub ident: u16,
    pub seq: u16,
    /// The [`EchoResult::token`] of the [`super::icmp_echo`] call that sent
    /// it, so a request still in flight from an earlier call is told apart.
    pub token: u64,
}

/// Records the sources of ICMP echo requests reaching a namespace (the kernel
/// still answers them itself): an [`Observer`] of echo requests.
pub struct IcmpObserver {
    observer: Observer<EchoSeen>,
}

impl IcmpObserver {
    pub fn start(ns: &str) -> Result<Self> {
        let observe = |socket: Socket, log: Recorder<EchoSeen>| {
            let mut buf = [0u8; 2048];
            while !log.stopping() {
                match (&socket).read(&mut buf) {
                    Ok(n) => {
                        if let Some(icmp) = parse_icmp(&buf[..n])
                            && icmp.icmp_type == ICMP_ECHO_REQUEST
                        {
                            log.record(EchoSeen {
                                src: icmp.src,
                                ident: icmp.ident,
                                seq: icmp.seq,
                                token: icmp.token,
                            });
                        }
                    }
                    Err(e) if is_timeout(&e) => {}
                    Err(e) => tracing::debug!(error = %e, "ICMP observer receive error"),
                }
            }
            Ok(())
        };
        let observer = Observer::start(
            ns,
            "icmp-observer",
            "ICMP observer".to_owned(),
            raw_icmp_socket,
            observe,
        )?;
        Ok(Self { observer })
    }

    /// The requests sent by the [`super::icmp_echo`] call that returned `echo`.
    pub fn seen_of(&self, echo: &EchoResult) -> Vec<EchoSeen> {
        self.seen()
            .into_iter()
            .filter(|s| s.token == echo.token)
            .collect()
    }
}

impl Deref for IcmpObserver {
    type Target = Observer<EchoSeen>;

    fn deref(&self) -> &Observer<EchoSeen> {
        &self.observer
    }
}
