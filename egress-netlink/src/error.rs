//! The crate's error type, naming the interface, address or file involved.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::InterfaceAddress;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything this crate can fail with. Each variant names the interface,
/// address or file involved so that an agent log line is actionable alone.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open a NETLINK_ROUTE socket: {source}")]
    Connect {
        #[source]
        source: std::io::Error,
    },

    /// A request the kernel (or the netlink connection) refused. `op` says
    /// what was being done to which interface/address.
    #[error("netlink: {op}: {source}")]
    Request {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },

    #[error("invalid interface name {name:?}: {why}")]
    InvalidName { name: String, why: &'static str },

    #[error("interface {name:?} does not exist")]
    NoSuchLink { name: String },

    #[error(
        "link {name:?} exists but is not an external (collect-metadata) VXLAN device with dstport {port}: it is {found}"
    )]
    VxlanMismatch {
        name: String,
        port: u16,
        found: String,
    },

    #[error(
        "cannot create external VXLAN {name:?}: dstport {port} is taken by {}: {source}",
        holder.as_deref().map_or("another external VXLAN device".to_owned(), |h| format!("external VXLAN device {h:?}"))
    )]
    VxlanPortInUse {
        name: String,
        port: u16,
        /// The device already using the port, if it could be identified.
        holder: Option<String>,
        #[source]
        source: rtnetlink::Error,
    },

    #[error(
        "no interface has an IPv4 subnet containing {ip}; set `interface` explicitly. IPv4 subnets present: {}",
        AddrList(candidates)
    )]
    NoSubnetFor {
        ip: Ipv4Addr,
        candidates: Vec<InterfaceAddress>,
    },

    #[error(
        "{ip} falls into equally specific subnets of several interfaces: {}; set `interface` to choose",
        AddrList(matches)
    )]
    AmbiguousSubnet {
        ip: Ipv4Addr,
        matches: Vec<InterfaceAddress>,
    },

    #[error(
        "{ip} is already assigned to several interfaces: {}; set `interface` to choose",
        AddrList(holders)
    )]
    HeldByMany {
        ip: Ipv4Addr,
        holders: Vec<InterfaceAddress>,
    },

    #[error("{ip} is already assigned to {holder}, not to the requested interface {requested}")]
    HeldElsewhere {
        ip: Ipv4Addr,
        requested: String,
        holder: String,
    },

    #[error("{ip} is the network or broadcast address of {subnet} on {interface}")]
    UnusableAddress {
        ip: Ipv4Addr,
        subnet: ipnet::Ipv4Net,
        interface: String,
    },

    #[error("claim ledger {}: cannot {op}: {source}", path.display())]
    LedgerIo {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("claim ledger {} is not valid: {source}", path.display())]
    LedgerCorrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// The positive errno the kernel answered with, if this is a refused
    /// request (e.g. `libc::EEXIST`).
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Request { source, .. } | Error::VxlanPortInUse { source, .. } => {
                errno_of(source)
            }
            _ => None,
        }
    }

    pub(crate) fn request(op: impl Into<String>, source: rtnetlink::Error) -> Self {
        Error::Request {
            op: op.into(),
            source,
        }
    }
}

pub(crate) fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| c.get().abs()),
        _ => None,
    }
}

struct AddrList<'a>(&'a [InterfaceAddress]);

impl fmt::Display for AddrList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(none)");
        }
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{} {}", a.ifname, a.addr)?;
        }
        Ok(())
    }
}
