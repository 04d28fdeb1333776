//! The lab's TCP observer in a process of its own, for tests whose client
//! side alone needs as many descriptors as one process may hold.
//!
//! Usage: `egress-tcp-observer <netns> <ip:port>`. Prints `ready`, then one
//! line per accepted connection with the peer address; exits when its
//! standard input closes.

use std::{
    io::{BufRead, Write},
    net::SocketAddrV4,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use egress_lab::{TcpServer, traffic::raise_nofile_limit};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, ns, addr] = args.as_slice() else {
        return Err(format!("usage: {} <netns> <ip:port>", args[0]).into());
    };
    let addr: SocketAddrV4 = addr
        .parse()
        .map_err(|e| format!("listen address `{addr}`: {e}"))?;
    raise_nofile_limit()?;
    let server = TcpServer::start(ns, addr)?;
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            if line.is_err() {
                break;
            }
        }
        done2.store(true, Ordering::Relaxed);
    });
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    let mut reported = 0;
    loop {
        let finished = done.load(Ordering::Relaxed);
        let seen = server.seen();
        for s in &seen[reported..] {
            writeln!(out, "{}", s.peer)?;
        }
        reported = seen.len();
        out.flush()?;
        if finished {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(100));
    }
}
