//! Traffic generators and their servers. Each runs as its own process, pinned
//! with `taskset` inside a benchmark namespace, and prints one JSON object on
//! stdout that the orchestrator parses.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Request and response sizes of the connection-rate and RR workloads: small
/// enough to fit one segment, so the figures measure per-packet and
/// per-connection work rather than copying.
pub const REQUEST_LEN: usize = 64;
pub const RESPONSE_LEN: usize = 128;

#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    #[arg(long, default_value = "0.0.0.0")]
    pub addr: Ipv4Addr,
    /// First TCP port; `--ports` consecutive ports are served.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    #[arg(long, default_value_t = 8)]
    pub ports: u16,
    /// The server exits by itself after this long, so a crashed orchestrator
    /// never leaves it running.
    #[arg(long, default_value_t = 3600)]
    pub max_secs: u64,
}

pub fn serve(args: &ServeArgs) -> Result<()> {
    block_on(async {
        let mut listeners = Vec::new();
        for p in args.port..args.port + args.ports {
            let sock = TcpSocket::new_v4()?;
            sock.set_reuseaddr(true)?;
            sock.bind(SocketAddr::V4(SocketAddrV4::new(args.addr, p)))
                .with_context(|| format!("bind {}:{p}", args.addr))?;
            // A deep backlog: at tens of thousands of connections per second
            // a short accept queue drops SYNs and measures the server, not NAT.
            listeners.push(sock.listen(4096)?);
        }
        for l in listeners {
            tokio::spawn(accept_loop(l));
        }
        tokio::time::sleep(Duration::from_secs(args.max_secs)).await;
        anyhow::Ok(())
    })
}

async fn accept_loop(listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_conn(stream));
            }
            // EMFILE and friends: back off instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

async fn serve_conn(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut req = [0u8; REQUEST_LEN];
    let mut resp = [b'r'; RESPONSE_LEN];
    // The response starts with the source address the server saw, so the
    // orchestrator can prove that a system translated (or did not).
    if let Ok(SocketAddr::V4(peer)) = stream.peer_addr() {
        resp[..4].copy_from_slice(&peer.ip().octets());
    }
    while stream.read_exact(&mut req).await.is_ok() {
        if stream.write_all(&resp).await.is_err() {
            return;
        }
    }
}

/// Where the clients connect from and to.
#[derive(Clone, Debug, clap::Args)]
pub struct Endpoints {
    #[arg(long)]
    pub server: Ipv4Addr,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    #[arg(long, default_value_t = 8)]
    pub ports: u16,
    /// Source addresses are `src_base + src_first ..= src_base + src_first + src_count - 1`;
    /// each stands for one selected pod, so the spread over policies is chosen here.
    #[arg(long)]
    pub src_base: Ipv4Addr,
    #[arg(long, default_value_t = 0)]
    pub src_first: u32,
    #[arg(long, default_value_t = 1)]
    pub src_count: u32,
}

impl Endpoints {
    fn source(&self, i: u64) -> Ipv4Addr {
        let off = self.src_first + (i % u64::from(self.src_count.max(1))) as u32;
        Ipv4Addr::from(u32::from(self.src_base) + off)
    }

    fn dest(&self, i: u64) -> SocketAddr {
        let p = self.port + (i % u64::from(self.ports.max(1))) as u16;
        SocketAddr::V4(SocketAddrV4::new(self.server, p))
    }
}

#[derive(Clone, Debug, clap::Args)]
pub struct CrrArgs {
    #[command(flatten)]
    pub ep: Endpoints,
    /// Concurrent client loops, each with one connection in flight.
    #[arg(long, default_value_t = 32)]
    pub concurrency: u32,
    #[arg(long, default_value_t = 2.0)]
    pub warmup_secs: f64,
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    /// Give up on one connection after this long (counted as an error).
    #[arg(long, default_value_t = 3000)]
    pub timeout_ms: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CrrResult {
    pub connections: u64,
    pub errors: u64,
    pub secs: f64,
    pub cps: f64,
    pub connect_p50_us: f64,
    pub connect_p99_us: f64,
    /// Whole transaction: connect, request, response, close.
    pub txn_p50_us: f64,
    pub txn_p99_us: f64,
    pub first_error: Option<String>,
}

fn new_hist() -> Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds are valid")
}

fn set_bind_no_port(sock: &TcpSocket) -> Result<()> {
    // Defers the source-port choice to connect(), where the kernel picks a
    // port unique for the 4-tuple. Without it, bind() to a fixed address
    // reserves ports per address and runs out far below the real limit.
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!(
            "setsockopt(IP_BIND_ADDRESS_NO_PORT): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

async fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    set_bind_no_port(&sock)?;
    sock.bind(SocketAddr::V4(SocketAddrV4::new(src, 0)))
        .with_context(|| format!("bind {src}"))?;
    let s = sock
        .connect(dst)
        .await
        .with_context(|| format!("connect {src} -> {dst}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Each load generator is one process driving one current-thread runtime.
fn block_on<F: Future<Output = Result<T>>, T>(f: F) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

/// What a generator's tasks share: whether the measured window is open,
/// when to stop, and a counter that spreads them over sources and ports.
#[derive(Default)]
struct Shared {
    measuring: AtomicBool,
    stop: AtomicBool,
    counter: AtomicU64,
}

impl Shared {
    /// Lets the tasks warm up, opens the measured window for `secs`, then
    /// stops them; returns the window's actual length in seconds.
    async fn measure(&self, warmup_secs: f64, secs: f64) -> f64 {
        tokio::time::sleep(Duration::from_secs_f64(warmup_secs)).await;
        self.measuring.store(true, Ordering::Relaxed);
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        self.measuring.store(false, Ordering::Relaxed);
        let secs = start.elapsed().as_secs_f64();
        self.stop.store(true, Ordering::Relaxed);
        secs
    }
}

pub fn crr(args: &CrrArgs) -> Result<CrrResult> {
    block_on(crr_async(args.clone()))
}

async fn crr_async(args: CrrArgs) -> Result<CrrResult> {
    let shared = Arc::new(Shared::default());
    let ep = Arc::new(args.ep.clone());
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let shared = shared.clone();
        let ep = ep.clone();
        tasks.push(tokio::spawn(async move {
            let mut connect_h = new_hist();
            let mut txn_h = new_hist();
            let mut ok = 0u64;
            let mut errors = 0u64;
            let mut first_error = None;
            let req = [b'q'; REQUEST_LEN];
            let mut resp = [0u8; RESPONSE_LEN];
            while !shared.stop.load(Ordering::Relaxed) {
                let i = shared.counter.fetch_add(1, Ordering::Relaxed);
                let (src, dst) = (ep.source(i), ep.dest(i));
                let t0 = Instant::now();
                let outcome = tokio::time::timeout(timeout, async {
                    let mut s = connect_from(src, dst).await?;
                    let connected = t0.elapsed();
                    s.write_all(&req).await?;
                    s.read_exact(&mut resp).await?;
                    // Client closes first, as an HTTP/1.0 client would, so
                    // TIME_WAIT lands on the pod side as on a real node.
                    drop(s);
                    anyhow::Ok(connected)
                })
                .await;
                let measuring = shared.measuring.load(Ordering::Relaxed);
                match outcome {
                    Ok(Ok(connected)) => {
                        if measuring {
                            ok += 1;
                            let _ = connect_h.record(connected.as_micros().max(1) as u64);
                            let _ = txn_h.record(t0.elapsed().as_micros().max(1) as u64);
                        }
                    }
                    Ok(Err(e)) => {
                        if measuring {
                            errors += 1;
                            first_error.get_or_insert_with(|| format!("{e:#}"));
                        }
                        // Do not hammer a refusing stack in a tight loop.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err(_) => {
                        if measuring {
                            errors += 1;
                            first_error.get_or_insert_with(|| format!("timeout {src} -> {dst}"));
                        }
                    }
                }
            }
            (connect_h, txn_h, ok, errors, first_error)
        }));
    }
    let secs = shared.measure(args.warmup_secs, args.secs).await;

    let mut connect_h = new_hist();
    let mut txn_h = new_hist();
    let mut res = CrrResult {
        secs,
        ..Default::default()
    };
    for t in tasks {
        let (c, x, ok, errors, fe) = t.await?;
        connect_h.add(&c)?;
        txn_h.add(&x)?;
        res.connections += ok;
        res.errors += errors;
        if res.first_error.is_none() {
            res.first_error = fe;
        }
    }
    res.cps = res.connections as f64 / secs;
    res.connect_p50_us = connect_h.value_at_quantile(0.50) as f64;
    res.connect_p99_us = connect_h.value_at_quantile(0.99) as f64;
    res.txn_p50_us = txn_h.value_at_quantile(0.50) as f64;
    res.txn_p99_us = txn_h.value_at_quantile(0.99) as f64;
    Ok(res)
}

#[derive(Clone, Debug, clap::Args)]
pub struct WhoamiArgs {
    #[command(flatten)]
    pub ep: Endpoints,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WhoamiResult {
    pub source: Ipv4Addr,
    pub seen: Ipv4Addr,
}

/// One transaction from the first source address; reports the address the
/// server saw.
pub fn whoami(args: &WhoamiArgs) -> Result<WhoamiResult> {
    block_on(async {
        let (src, dst) = (args.ep.source(0), args.ep.dest(0));
        let mut s = tokio::time::timeout(Duration::from_secs(5), connect_from(src, dst))
            .await
            .with_context(|| format!("connect {src} -> {dst} timed out"))??;
        s.write_all(&[b'q'; REQUEST_LEN]).await?;
        let mut resp = [0u8; RESPONSE_LEN];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut resp))
            .await
            .context("no response within 5 s")??;
        Ok(WhoamiResult {
            source: src,
            seen: Ipv4Addr::new(resp[0], resp[1], resp[2], resp[3]),
        })
    })
}

#[derive(Clone, Debug, clap::Args)]
pub struct RrArgs {
    #[command(flatten)]
    pub ep: Endpoints,
    /// Persistent connections, each with one transaction in flight.
    #[arg(long, default_value_t = 1)]
    pub connections: u32,
    #[arg(long, default_value_t = 2.0)]
    pub warmup_secs: f64,
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RrResult {
    pub transactions: u64,
    pub secs: f64,
    pub tps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

pub fn rr(args: &RrArgs) -> Result<RrResult> {
    block_on(rr_async(args.clone()))
}

async fn rr_async(args: RrArgs) -> Result<RrResult> {
    let shared = Arc::new(Shared::default());
    let mut tasks = Vec::new();
    for i in 0..u64::from(args.connections) {
        // Connect up front so that a broken datapath fails here, loudly,
        // instead of producing an empty histogram.
        let mut s = connect_from(args.ep.source(i), args.ep.dest(i)).await?;
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = new_hist();
            let req = [b'q'; REQUEST_LEN];
            let mut resp = [0u8; RESPONSE_LEN];
            while !shared.stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                s.write_all(&req).await?;
                s.read_exact(&mut resp).await?;
                if shared.measuring.load(Ordering::Relaxed) {
                    // Nanosecond resolution: RTTs on veth are tens of µs.
                    let _ = h.record(t0.elapsed().as_nanos().max(1) as u64);
                }
            }
            anyhow::Ok(h)
        }));
    }
    let secs = shared.measure(args.warmup_secs, args.secs).await;
    let mut h = Histogram::<u64>::new(3)?;
    for t in tasks {
        h.add(&t.await??)?;
    }
    if h.is_empty() {
        bail!("no transaction completed");
    }
    Ok(RrResult {
        transactions: h.len(),
        secs,
        tps: h.len() as f64 / secs,
        p50_us: h.value_at_quantile(0.50) as f64 / 1e3,
        p99_us: h.value_at_quantile(0.99) as f64 / 1e3,
        p999_us: h.value_at_quantile(0.999) as f64 / 1e3,
    })
}

#[derive(Clone, Debug, clap::Args)]
pub struct UdpSendArgs {
    #[command(flatten)]
    pub ep: Endpoints,
    /// Distinct flows: sockets with their own source address/port, each
    /// sent to in turn, so every flow needs its own NAT binding.
    #[arg(long, default_value_t = 1024)]
    pub flows: u32,
    #[arg(long, default_value_t = 18)]
    pub payload: usize,
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UdpSendResult {
    pub sent: u64,
    pub send_errors: u64,
    pub secs: f64,
}

pub fn udp_send(args: &UdpSendArgs) -> Result<UdpSendResult> {
    let mut socks = Vec::new();
    for i in 0..u64::from(args.flows) {
        let s = UdpSocket::bind(SocketAddrV4::new(args.ep.source(i), 0))
            .with_context(|| format!("bind {}", args.ep.source(i)))?;
        s.connect(args.ep.dest(i))?;
        socks.push(s);
    }
    let buf = vec![b'u'; args.payload];
    let mut res = UdpSendResult::default();
    let start = Instant::now();
    let dur = Duration::from_secs_f64(args.secs);
    'outer: loop {
        for s in &socks {
            match s.send(&buf) {
                Ok(_) => res.sent += 1,
                // ENOBUFS/EAGAIN under overload: the rate is what arrives.
                Err(_) => res.send_errors += 1,
            }
            if res.sent % 4096 == 0 && start.elapsed() >= dur {
                break 'outer;
            }
        }
    }
    res.secs = start.elapsed().as_secs_f64();
    Ok(res)
}

#[derive(Clone, Debug, clap::Args)]
pub struct UdpSinkArgs {
    #[arg(long, default_value = "0.0.0.0")]
    pub addr: Ipv4Addr,
    #[arg(long, default_value_t = 9000)]
    pub port: u16,
    #[arg(long, default_value_t = 8)]
    pub ports: u16,
    /// Counting starts at the first packet and lasts this long.
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    /// Exit with zero packets after this long without any.
    #[arg(long, default_value_t = 30.0)]
    pub idle_secs: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UdpSinkResult {
    pub received: u64,
    pub secs: f64,
    pub pps: f64,
}

pub fn udp_sink(args: &UdpSinkArgs) -> Result<UdpSinkResult> {
    let socks: Vec<UdpSocket> = (args.port..args.port + args.ports)
        .map(|p| {
            let s = UdpSocket::bind(SocketAddrV4::new(args.addr, p))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect::<Result<_>>()?;
    let mut buf = [0u8; 2048];
    let mut received = 0u64;
    let mut first: Option<Instant> = None;
    let begun = Instant::now();
    loop {
        let mut got = false;
        for s in &socks {
            while s.recv(&mut buf).is_ok() {
                got = true;
                received += 1;
                first.get_or_insert_with(Instant::now);
            }
        }
        match first {
            Some(t) if t.elapsed().as_secs_f64() >= args.secs => {
                let secs = t.elapsed().as_secs_f64();
                return Ok(UdpSinkResult {
                    received,
                    secs,
                    pps: received as f64 / secs,
                });
            }
            None if begun.elapsed().as_secs_f64() >= args.idle_secs => {
                return Ok(UdpSinkResult::default());
            }
            _ => {}
        }
        if !got {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_rotate_sources_and_ports() {
        let ep = Endpoints {
            server: Ipv4Addr::new(172, 18, 0, 1),
            port: 8000,
            ports: 3,
            src_base: Ipv4Addr::new(10, 244, 64, 1),
            src_first: 2,
            src_count: 2,
        };
        let srcs: Vec<Ipv4Addr> = (0..4).map(|i| ep.source(i)).collect();
        assert_eq!(
            srcs,
            [
                [10, 244, 64, 3],
                [10, 244, 64, 4],
                [10, 244, 64, 3],
                [10, 244, 64, 4]
            ]
            .map(Ipv4Addr::from)
        );
        let ports: Vec<u16> = (0..4).map(|i| ep.dest(i).port()).collect();
        assert_eq!(ports, [8000, 8001, 8002, 8000]);
    }
}
