//! Gratuitous ARP captured in a peer network namespace: opcode, sender and
//! target fields, timing of the burst, and the peer's ARP cache following a
//! move. Needs root (network namespaces); every namespace is created here
//! with a unique name and removed on drop, even on panic.

use std::{
    fs::File,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use egress_arp::{ArpFrame, ArpSocket, GarpConfig, GarpKind, announce, mac_address};

fn sh(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sh_out(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Two namespaces joined by a veth pair: `a` (the egress node) and `b` (a
/// peer on the same segment, e.g. the router).
struct Pair {
    a: String,
    b: String,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Pair {
    fn new() -> Self {
        let id = format!(
            "{}{}",
            std::process::id() % 100_000,
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let pair = Self {
            a: format!("egarp-a{id}"),
            b: format!("egarp-b{id}"),
        };
        sh(&["netns", "add", &pair.a]);
        sh(&["netns", "add", &pair.b]);
        sh(&[
            "-n", &pair.a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns",
            &pair.b,
        ]);
        sh(&["-n", &pair.a, "addr", "add", "198.18.7.1/24", "dev", "va"]);
        sh(&["-n", &pair.b, "addr", "add", "198.18.7.2/24", "dev", "vb"]);
        sh(&["-n", &pair.a, "link", "set", "va", "up"]);
        sh(&["-n", &pair.b, "link", "set", "vb", "up"]);
        pair
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` on a thread that has entered network namespace `ns`.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: a valid namespace fd; setns only affects this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

fn capture(
    ns: &str,
    ifname: &'static str,
    want: usize,
    within: Duration,
) -> std::thread::JoinHandle<Vec<(Instant, ArpFrame)>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let h = in_netns(ns, move || {
        let sock = ArpSocket::open(ifname).unwrap();
        ready_tx.send(()).unwrap();
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        while got.len() < want && Instant::now() < deadline {
            if let Some(f) = sock.recv(deadline - Instant::now()).unwrap()
                && let Some(arp) = ArpFrame::parse(&f)
                && arp.is_gratuitous()
            {
                got.push((Instant::now(), arp));
            }
        }
        got
    });
    ready_rx.recv().unwrap();
    h
}

fn send(
    ns: &str,
    ifname: &'static str,
    ip: Ipv4Addr,
    cfg: GarpConfig,
) -> std::thread::JoinHandle<[u8; 6]> {
    in_netns(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(announce(ifname, ip, &cfg)).unwrap();
        mac_address(ifname).unwrap()
    })
}

#[test]
fn burst_of_requests_and_replies_reaches_the_peer_on_schedule() {
    let pair = Pair::new();
    let ip = Ipv4Addr::new(198, 18, 7, 100);
    let cap = capture(&pair.b, "vb", 8, Duration::from_secs(5));
    let mac = send(&pair.a, "va", ip, GarpConfig::default())
        .join()
        .unwrap();
    let frames = cap.join().unwrap();
    assert_eq!(frames.len(), 8, "{frames:?}");
    let t0 = frames[0].0;
    let expected_ms = [0u64, 0, 500, 500, 1000, 1000, 2000, 2000];
    for (i, ((at, f), want)) in frames.iter().zip(expected_ms).enumerate() {
        let kind = if i % 2 == 0 {
            GarpKind::Request
        } else {
            GarpKind::Reply
        };
        assert_eq!(f.opcode, kind.opcode(), "frame {i}");
        assert_eq!(f.eth_dst, [0xff; 6]);
        assert_eq!(f.eth_src, mac);
        assert_eq!(f.sender_mac, mac);
        assert_eq!((f.sender_ip, f.target_ip), (ip, ip));
        assert_eq!(
            f.target_mac,
            if kind == GarpKind::Request {
                [0; 6]
            } else {
                [0xff; 6]
            }
        );
        let ms = at.duration_since(t0).as_millis() as u64;
        assert!(
            ms + 20 >= want && ms <= want + 150,
            "frame {i} at {ms} ms, expected {want} ms"
        );
    }
}

#[test]
fn configurable_schedule_and_forms() {
    let pair = Pair::new();
    let ip = Ipv4Addr::new(198, 18, 7, 101);
    let cfg = GarpConfig {
        schedule: vec![Duration::ZERO, Duration::from_millis(300)],
        kinds: vec![GarpKind::Reply],
    };
    let cap = capture(&pair.b, "vb", 3, Duration::from_secs(2));
    send(&pair.a, "va", ip, cfg).join().unwrap();
    let frames = cap.join().unwrap();
    assert_eq!(
        frames.len(),
        2,
        "only the two scheduled replies: {frames:?}"
    );
    assert!(frames.iter().all(|(_, f)| f.opcode == 2));
    let gap = frames[1].0.duration_since(frames[0].0).as_millis();
    assert!((280..=450).contains(&gap), "gap {gap} ms");
}

#[test]
fn peer_arp_cache_follows_a_move() {
    let pair = Pair::new();
    let ip = "198.18.7.100";
    // The peer still maps the egress IP to the previous holder's MAC.
    sh(&[
        "-n",
        &pair.b,
        "neigh",
        "replace",
        ip,
        "lladdr",
        "02:00:5e:00:53:01",
        "dev",
        "vb",
        "nud",
        "stale",
    ]);
    let cfg = GarpConfig {
        schedule: vec![Duration::ZERO],
        kinds: vec![GarpKind::Request, GarpKind::Reply],
    };
    let mac = send(&pair.a, "va", ip.parse().unwrap(), cfg)
        .join()
        .unwrap();
    let mac_text = mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let neigh = sh_out(&["-n", &pair.b, "neigh", "show", ip, "dev", "vb"]);
        if neigh.contains(&mac_text) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "peer cache not updated: {neigh:?}, want {mac_text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
