//! Direct node liveness probes: every agent answers UDP heartbeats; the
//! assigner (and its warm standbys) probe the nodes that can hold egress IPs
//! and report the ones that stopped answering. This detects a dead node or a
//! cut link within about a second, without waiting for the kubelet's Node
//! status (40 s by default) or for the API server at all.
//!
//! Silence alone never moves an IP that its holder still renews (see
//! `controller::assigner`): a lost heartbeat port at the assigner cannot
//! fail the cluster over. Replies are authenticated all the same, so that a
//! forged reply cannot keep a dead node eligible: each probe carries a fresh
//! 128-bit random nonce, a reply counts only if it echoes the nonce of a
//! probe sent to that node within the timeout, and only if it comes from
//! one of the node's own addresses (the one probed, or another it reports
//! or publishes: a multi-homed node may answer from another interface). An
//! off-path sender cannot guess a nonce; a replayed reply is spent.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use tokio::{net::UdpSocket, sync::watch, time::Instant};
use tracing::{info, warn};

const MAGIC: &[u8; 4] = b"EGHB";
/// Version 2: a 16-byte nonce. Version 1 (an 8-byte sequence number) is
/// still answered, for the probers of agents not upgraded yet.
const VERSION: u8 = 2;
const VERSION_1: u8 = 1;
const PROBE: u8 = 0;
const REPLY: u8 = 1;
const LEN: usize = 24;
const LEN_1: usize = 16;

pub type Nonce = [u8; 16];

/// The `[kubernetes.heartbeat]` section of the agent's file.
pub use egress_config::HeartbeatConfig;

fn message(kind: u8, nonce: &Nonce) -> [u8; LEN] {
    let mut m = [0u8; LEN];
    m[0..4].copy_from_slice(MAGIC);
    m[4] = VERSION;
    m[5] = kind;
    m[8..24].copy_from_slice(nonce);
    m
}

fn parse(buf: &[u8], kind: u8) -> Option<Nonce> {
    (buf.len() == LEN && &buf[0..4] == MAGIC && buf[4] == VERSION && buf[5] == kind)
        .then(|| buf[8..24].try_into().expect("16 bytes"))
}

/// The answer to a probe of either version, if `buf` is one.
fn answer(buf: &[u8]) -> Option<Vec<u8>> {
    if let Some(nonce) = parse(buf, PROBE) {
        return Some(message(REPLY, &nonce).to_vec());
    }
    (buf.len() == LEN_1 && &buf[0..4] == MAGIC && buf[4] == VERSION_1 && buf[5] == PROBE).then(
        || {
            let mut reply = buf.to_vec();
            reply[5] = REPLY;
            reply
        },
    )
}

fn nonce() -> io::Result<Nonce> {
    let mut n = [0u8; 16];
    getrandom::fill(&mut n).map_err(|e| io::Error::other(e.to_string()))?;
    Ok(n)
}

/// Binds the responder socket (so that a taken port fails at start-up).
pub async fn bind_responder(config: &HeartbeatConfig) -> io::Result<UdpSocket> {
    UdpSocket::bind(SocketAddr::new(config.bind, config.port)).await
}

/// Answers every well-formed probe by echoing its nonce; ignores
/// everything else.
pub async fn respond(socket: UdpSocket) -> io::Result<()> {
    let mut buf = [0u8; 64];
    loop {
        let (n, from) = socket.recv_from(&mut buf).await?;
        if let Some(reply) = answer(&buf[..n])
            && let Err(e) = socket.send_to(&reply, from).await
        {
            warn!(%from, error = %e, "cannot answer heartbeat");
        }
    }
}

/// One node to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Where its responder listens.
    pub addr: SocketAddr,
    /// The addresses its replies may come from (`addr`'s always may).
    pub sources: BTreeSet<IpAddr>,
}

/// Probes `targets` (node name -> where and from where) and publishes the
/// names of those that stopped answering. A new target gets `timeout` to
/// answer before it can be declared down.
pub async fn probe(
    config: HeartbeatConfig,
    mut targets: watch::Receiver<BTreeMap<String, Target>>,
    down: watch::Sender<BTreeSet<String>>,
) -> io::Result<()> {
    let socket = UdpSocket::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)).await?;
    // Nonce -> (node, when sent); spent by the first valid reply, forgotten
    // after the timeout.
    let mut outstanding: HashMap<Nonce, (String, Instant)> = HashMap::new();
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
                outstanding.retain(|_, (name, sent)| {
                    current.contains_key(name) && now.duration_since(*sent) < config.timeout
                });
                for (name, target) in &current {
                    last_seen.entry(name.clone()).or_insert(now);
                    let n = nonce()?;
                    outstanding.insert(n, (name.clone(), now));
                    // A send error (no route: the link is cut) counts as a
                    // missed answer.
                    let _ = socket.send_to(&message(PROBE, &n), target.addr).await;
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
                let Ok((n, from)) = r else { continue };
                let Some(nonce) = parse(&buf[..n], REPLY) else { continue };
                let Some((name, _)) = outstanding.get(&nonce) else { continue };
                let genuine = targets.borrow().get(name).is_some_and(|t| {
                    t.addr.ip() == from.ip() || t.sources.contains(&from.ip())
                });
                if genuine {
                    let (name, _) = outstanding.remove(&nonce).expect("just found");
                    last_seen.insert(name, Instant::now());
                } else {
                    warn!(node = %name, %from, "heartbeat reply from an address that is not the node's: ignored");
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
    use std::time::Duration;

    use super::*;

    #[test]
    fn messages_round_trip_and_reject_garbage() {
        let n = [7u8; 16];
        assert_eq!(parse(&message(PROBE, &n), PROBE), Some(n));
        assert_eq!(parse(&message(PROBE, &n), REPLY), None);
        assert_eq!(parse(b"EGHB", PROBE), None);
        let mut m = message(REPLY, &n);
        m[4] = 9;
        assert_eq!(parse(&m, REPLY), None);
        assert_eq!(
            answer(&message(PROBE, &n)),
            Some(message(REPLY, &n).to_vec())
        );
        assert_eq!(answer(&message(REPLY, &n)), None);
        // Version 1 probes (an older prober) are still answered.
        let mut v1 = [0u8; LEN_1];
        v1[0..4].copy_from_slice(MAGIC);
        v1[4] = VERSION_1;
        v1[8..].copy_from_slice(&42u64.to_be_bytes());
        let reply = answer(&v1).unwrap();
        assert_eq!((reply[5], &reply[8..]), (REPLY, &42u64.to_be_bytes()[..]));
        assert_ne!(nonce().unwrap(), nonce().unwrap());
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
            ("node-a".to_string(), target(a_addr)),
            ("node-b".to_string(), target(b_addr)),
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
        targets_tx.send_replace(BTreeMap::from([("node-a".to_string(), target(a_addr))]));
        down_rx.wait_for(|d| d.is_empty()).await.unwrap();
        prober.abort();
        a_task.abort();
        drop(b);
    }

    fn target(addr: SocketAddr) -> Target {
        Target {
            addr,
            sources: BTreeSet::new(),
        }
    }

    /// node-b's agent is dead; an attacker who sees its probes answers them
    /// from another address, and from node-b's address with guessed nonces.
    /// Neither keeps node-b up; the genuine answer does.
    #[tokio::test]
    async fn forged_replies_do_not_keep_a_silent_node_up() {
        let config = HeartbeatConfig {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(500),
        };
        // Where node-b's responder would listen: the attacker reads the probes.
        let b = UdpSocket::bind("127.0.0.12:0").await.unwrap();
        let b_addr = b.local_addr().unwrap();
        let elsewhere = UdpSocket::bind("127.0.0.66:0").await.unwrap();
        let b_other_port = UdpSocket::bind("127.0.0.12:0").await.unwrap();
        let (_targets_tx, targets_rx) =
            watch::channel(BTreeMap::from([("node-b".to_string(), target(b_addr))]));
        let (down_tx, mut down_rx) = watch::channel(BTreeSet::new());
        let prober = tokio::spawn(probe(config, targets_rx, down_tx));
        let forger = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                let (n, prober) = b.recv_from(&mut buf).await.unwrap();
                let nonce = parse(&buf[..n], PROBE).unwrap();
                // The right nonce from the wrong address.
                elsewhere
                    .send_to(&message(REPLY, &nonce), prober)
                    .await
                    .unwrap();
                // The right address, a guessed nonce.
                let mut guess = nonce;
                guess[0] ^= 1;
                b_other_port
                    .send_to(&message(REPLY, &guess), prober)
                    .await
                    .unwrap();
            }
        });
        // Not a speed bound: a forged reply that counted would keep node-b
        // up forever.
        tokio::time::timeout(
            Duration::from_secs(10),
            down_rx.wait_for(|d| d.contains("node-b")),
        )
        .await
        .expect("node-b kept up by forged replies")
        .unwrap();
        forger.abort();
        let _ = forger.await;

        // The genuine responder comes back on node-b's address: up again.
        let b = UdpSocket::bind(b_addr).await.unwrap();
        let responder = tokio::spawn(respond(b));
        down_rx.wait_for(|d| d.is_empty()).await.unwrap();
        prober.abort();
        responder.abort();
    }
}
