//! This node's address in Kubernetes mode, where one file serves every
//! node: the candidates looked up in order of authority (the explicit one,
//! the Node object's, the host name's, the default-route interface's) and
//! chosen by [`identity::choose`].

use std::{net::Ipv4Addr, time::Duration};

use egress_netlink::{InterfaceAddress, Netlink};

use crate::identity::{self, Candidate, Source};

/// How long the host-name lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// This node's address: the explicit one if set (it must be local), else the
/// first local one of the Node object's, the host name's, and the
/// default-route interface's.
///
/// `node_object` looks the Node object up; it runs only when no address
/// was given.
pub async fn node_address(
    netlink: &Netlink,
    explicit: Option<Ipv4Addr>,
    node_object: impl Future<Output = Result<Ipv4Addr, String>>,
) -> anyhow::Result<identity::Choice> {
    let addresses = netlink.ipv4_addresses().await?;
    let local: Vec<Ipv4Addr> = addresses
        .iter()
        .map(|a| a.addr.addr())
        .filter(|a| !a.is_loopback())
        .collect();
    let mut candidates = vec![Candidate {
        source: Source::Explicit,
        found: explicit.ok_or_else(|| "not set".to_string()),
    }];
    if explicit.is_none() {
        candidates.push(Candidate {
            source: Source::NodeObject,
            found: node_object.await,
        });
        candidates.push(Candidate {
            source: Source::Hostname,
            found: hostname_address().await,
        });
        candidates.push(Candidate {
            source: Source::DefaultRoute,
            found: default_route_address(netlink, &addresses).await,
        });
    }
    Ok(identity::choose(&candidates, &local)?)
}

async fn hostname_address() -> Result<Ipv4Addr, String> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_err(|e| format!("reading the host name: {e}"))?
        .trim()
        .to_string();
    let resolved =
        tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((host.as_str(), 0)))
            .await
            .map_err(|_| format!("{host:?}: no answer within {LOOKUP_TIMEOUT:?}"))?
            .map_err(|e| format!("{host:?} does not resolve: {e}"))?;
    resolved
        .filter_map(|a| match a.ip() {
            std::net::IpAddr::V4(v4) if !v4.is_loopback() => Some(v4),
            _ => None,
        })
        .next()
        .ok_or_else(|| format!("{host:?} resolves to no IPv4 address but loopback"))
}

async fn default_route_address(
    netlink: &Netlink,
    addresses: &[InterfaceAddress],
) -> Result<Ipv4Addr, String> {
    let ifindex = netlink
        .default_route_ifindex()
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "no IPv4 default route".to_string())?;
    addresses
        .iter()
        .find(|a| a.ifindex == ifindex)
        .map(|a| a.addr.addr())
        .ok_or_else(|| {
            format!("the default-route interface (ifindex {ifindex}) has no IPv4 address")
        })
}
