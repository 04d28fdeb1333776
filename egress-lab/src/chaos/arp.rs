//! ARP on the node network, from the router's bridge: a request for each
//! egress IP at a steady rate (each one opens a probe window), and every
//! ARP frame whose sender IP is an egress IP recorded with the window it
//! fell in: replies to our requests or to anyone's, gratuitous
//! announcements, and requests a node sends from the address.

use std::{
    net::Ipv4Addr,
    sync::{Arc, Mutex, atomic::Ordering},
    thread,
    time::{Duration, Instant},
};

use super::{
    judge::ArpSeen,
    packet::{ETH_P_ARP, PACKET_OUTGOING, PacketSocket},
    stream::Threads,
    wire,
};
use crate::{
    error::{LabError, Result},
    netns, spec,
};

pub struct ArpWatch {
    pub seen: Arc<Mutex<Vec<ArpSeen>>>,
    pub probes: Arc<std::sync::atomic::AtomicU64>,
    threads: Threads,
}

impl ArpWatch {
    /// Probes `ips` every `interval` from `dev` (whose MAC is `mac`) in
    /// `ns`, the router.
    pub fn start(
        ns: &str,
        dev: &'static str,
        mac: [u8; 6],
        ips: Vec<Ipv4Addr>,
        interval: Duration,
    ) -> Result<Self> {
        let seen: Arc<Mutex<Vec<ArpSeen>>> = Arc::default();
        let probes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut threads = Threads::new();
        let (stop, log, rounds) = (threads.stop.clone(), seen.clone(), probes.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        threads.push(
            ns,
            netns::spawn_in_netns(ns, "chaos-arp", move || {
                let sock = match PacketSocket::open(dev, ETH_P_ARP, false, Duration::from_millis(5))
                {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return Ok(());
                    }
                };
                let mut buf = [0u8; 128];
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    if Instant::now() >= next {
                        // A new window: replies from here on answer these.
                        let round = rounds.fetch_add(1, Ordering::Relaxed) + 1;
                        let _ = round;
                        for ip in &ips {
                            let _ = sock.send(&wire::arp_request(mac, spec::ROUTER_NODE_ADDR, *ip));
                        }
                        next += interval;
                        if next < Instant::now() {
                            next = Instant::now() + interval;
                        }
                    }
                    let Ok(Some((len, kind))) = sock.recv(&mut buf) else {
                        continue;
                    };
                    if kind == PACKET_OUTGOING {
                        continue;
                    }
                    let Some(arp) = wire::parse_arp(&buf[..len]) else {
                        continue;
                    };
                    if arp.sender_mac == mac || !ips.contains(&arp.sender_ip) {
                        continue;
                    }
                    log.lock().expect("arp log").push(ArpSeen {
                        at: Instant::now(),
                        ip: arp.sender_ip,
                        mac: arp.sender_mac,
                        round: rounds.load(Ordering::Relaxed),
                        op: arp.op,
                    });
                }
                Ok(())
            })?,
        );
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(LabError::Traffic(format!("ARP probe socket on {dev}: {e}"))),
            Err(_) => return Err(LabError::Traffic("ARP probe did not start".into())),
        }
        thread::yield_now();
        Ok(Self {
            seen,
            probes,
            threads,
        })
    }

    pub fn seen(&self) -> Vec<ArpSeen> {
        self.seen.lock().expect("arp log").clone()
    }

    pub fn stop(self) {
        drop(self.threads);
    }
}
