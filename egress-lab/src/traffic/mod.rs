//! Traffic that runs inside the lab's namespaces, by role:
//! - [`observer`]: server-side listeners and captures that record what
//!   reached them and from which source (one generic [`Observer`]);
//! - [`client`]: pod-side senders, from TCP connections to forged packets;
//! - [`packet`]: raw packets built and parsed byte by byte.
//!
//! Every socket is created by a thread that first joined the namespace (see
//! [`crate::netns`]); a socket stays in the namespace it was created in, so
//! connections can be handed back to the caller's thread afterwards.
//!
//! The TCP and UDP servers tell each client the address they saw it come
//! from, so the client learns which source the server observed; the servers
//! also record every peer for checks on the server side.

pub mod client;
pub mod observer;
pub mod packet;

pub use client::*;
pub use observer::*;
pub use packet::*;

use std::{
    net::{SocketAddr, SocketAddrV4},
    str::FromStr,
    thread,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::error::{LabError, Result};

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

/// A raw ICMP socket whose reads give up after 50 ms, so that loops
/// reading it can check their deadline or stop flag.
fn raw_icmp_socket() -> Result<Socket> {
    let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
        .map_err(|e| traffic_err(format!("raw ICMP socket: {e}")))?;
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| traffic_err(format!("raw ICMP socket timeout: {e}")))?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

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
