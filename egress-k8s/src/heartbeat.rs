//! Direct node liveness probes: every agent answers UDP heartbeats; the
//! assigner probes the nodes that can hold egress IPs and reports the ones
//! that stopped answering. This detects a dead node or a cut link within
//! about a second, without waiting for the kubelet's Node status (40 s by
//! default) or for the API server at all.
//!
//! Probes are not authenticated: the node network is trusted. A forged reply
//! can only delay a failover, never cause two holders (claims are fenced).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use tokio::{net::UdpSocket, sync::watch, time::Instant};
use tracing::{info, warn};

const MAGIC: &[u8; 4] = b"EGHB";
const VERSION: u8 = 1;
const PROBE: u8 = 0;
const REPLY: u8 = 1;
const LEN: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatConfig {
    /// Address the responder listens on.
    pub bind: IpAddr,
    pub port: u16,
    /// How often each node is probed.
    pub interval: Duration,
    /// A node that has not answered for this long is down.
    pub timeout: Duration,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        Self {
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: 9471,
            interval: Duration::from_millis(200),
            timeout: Duration::from_millis(1000),
        }
    }
}

impl HeartbeatConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.interval.is_zero() || self.interval * 2 > self.timeout {
            return Err(format!(
                "heartbeat interval {:?} must be non-zero and at most half the timeout {:?}",
                self.interval, self.timeout
            ));
        }
        Ok(())
    }
}

fn message(kind: u8, seq: u64) -> [u8; LEN] {
    let mut m = [0u8; LEN];
    m[0..4].copy_from_slice(MAGIC);
    m[4] = VERSION;
    m[5] = kind;
    m[8..16].copy_from_slice(&seq.to_be_bytes());
    m
}

fn parse(buf: &[u8], kind: u8) -> Option<u64> {
    (buf.len() == LEN && &buf[0..4] == MAGIC && buf[4] == VERSION && buf[5] == kind)
        .then(|| u64::from_be_bytes(buf[8..16].try_into().expect("8 bytes")))
}

/// Binds the responder socket (so that a taken port fails at start-up).
pub async fn bind_responder(config: &HeartbeatConfig) -> io::Result<UdpSocket> {
    UdpSocket::bind(SocketAddr::new(config.bind, config.port)).await
}

/// Answers every well-formed probe; ignores everything else.
pub async fn respond(socket: UdpSocket) -> io::Result<()> {
    let mut buf = [0u8; 64];
    loop {
        let (n, from) = socket.recv_from(&mut buf).await?;
        if let Some(seq) = parse(&buf[..n], PROBE)
            && let Err(e) = socket.send_to(&message(REPLY, seq), from).await
        {
            warn!(%from, error = %e, "cannot answer heartbeat");
        }
    }
}

/// Probes `targets` (node name -> heartbeat address) and publishes the names
/// of those that stopped answering. A new target gets `timeout` to answer
/// before it can be declared down.
pub async fn probe(
    config: HeartbeatConfig,
    mut targets: watch::Receiver<BTreeMap<String, SocketAddr>>,
    down: watch::Sender<BTreeSet<String>>,
) -> io::Result<()> {
    let socket = UdpSocket::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)).await?;
    // Each target gets a token that its answers echo: answers are matched by
    // token, not by source address, which a multi-homed node may pick
    // differently from the address we probed.
    let mut tokens: HashMap<String, u64> = HashMap::new();
    let mut next_token: u64 = 1;
    let mut last_seen: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = [0u8; 64];
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = Instant::now();
                let current = targets.borrow_and_update().clone();
                last_seen.retain(|name, _| current.contains_key(name));
                tokens.retain(|name, _| current.contains_key(name));
                for (name, addr) in &current {
                    last_seen.entry(name.clone()).or_insert(now);
                    let token = *tokens.entry(name.clone()).or_insert_with(|| {
                        next_token += 1;
                        next_token
                    });
                    // A send error (no route: the link is cut) counts as a
                    // missed answer.
                    let _ = socket.send_to(&message(PROBE, token), addr).await;
                }
                let dead: BTreeSet<String> = last_seen
                    .iter()
                    .filter(|(_, t)| now.duration_since(**t) >= config.timeout)
                    .map(|(n, _)| n.clone())
                    .collect();
                down.send_if_modified(|cur| {
                    if *cur == dead {
                        return false;
                    }
                    for n in dead.difference(cur) {
                        warn!(node = %n, timeout = ?config.timeout, "node stopped answering heartbeats");
                    }
                    for n in cur.difference(&dead) {
                        info!(node = %n, "node answers heartbeats again");
                    }
                    *cur = dead;
                    true
                });
            }
            r = socket.recv_from(&mut buf) => {
                let Ok((n, _from)) = r else { continue };
                let Some(token) = parse(&buf[..n], REPLY) else { continue };
                if let Some((name, _)) = tokens.iter().find(|(_, t)| **t == token) {
                    last_seen.insert(name.clone(), Instant::now());
                }
            }
            r = targets.changed() => {
                if r.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_reject_garbage() {
        assert_eq!(parse(&message(PROBE, 42), PROBE), Some(42));
        assert_eq!(parse(&message(PROBE, 42), REPLY), None);
        assert_eq!(parse(b"EGHB", PROBE), None);
        let mut m = message(REPLY, 1);
        m[4] = 9;
        assert_eq!(parse(&m, REPLY), None);
    }

    #[test]
    fn config_is_checked() {
        assert!(HeartbeatConfig::default().validate().is_ok());
        let bad = HeartbeatConfig {
            interval: Duration::from_millis(800),
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("at most half"));
    }

    #[tokio::test]
    async fn a_silent_node_is_down_within_the_timeout_and_back_when_it_answers() {
        let config = HeartbeatConfig {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(500),
        };
        let a = bind_responder(&config).await.unwrap();
        let a_addr = a.local_addr().unwrap();
        let a_task = tokio::spawn(respond(a));
        // `b` is bound but never answers: a node whose agent hangs.
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b_addr = b.local_addr().unwrap();
        let (targets_tx, targets_rx) = watch::channel(BTreeMap::from([
            ("node-a".to_string(), a_addr),
            ("node-b".to_string(), b_addr),
        ]));
        let (down_tx, mut down_rx) = watch::channel(BTreeSet::new());
        let prober = tokio::spawn(probe(config.clone(), targets_rx, down_tx));

        let started = Instant::now();
        down_rx.wait_for(|d| d.contains("node-b")).await.unwrap();
        let took = started.elapsed();
        // Never before the timeout; the upper bound only says "at all" (a
        // loaded CI machine delays timers; speed is `cargo xtask failover`'s).
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_secs(10),
            "{took:?}"
        );
        assert!(!down_rx.borrow().contains("node-a"));

        // node-a's agent dies.
        a_task.abort();
        let cut = Instant::now();
        down_rx.wait_for(|d| d.contains("node-a")).await.unwrap();
        let detect = cut.elapsed();
        assert!(detect < Duration::from_secs(10), "{detect:?}");

        // It comes back on the same address: up again after one answer.
        let a = UdpSocket::bind(a_addr).await.unwrap();
        let a_task = tokio::spawn(respond(a));
        down_rx.wait_for(|d| !d.contains("node-a")).await.unwrap();

        // Targets that leave are forgotten.
        targets_tx.send_replace(BTreeMap::from([("node-a".to_string(), a_addr)]));
        down_rx.wait_for(|d| d.is_empty()).await.unwrap();
        prober.abort();
        a_task.abort();
        drop(b);
    }
}
