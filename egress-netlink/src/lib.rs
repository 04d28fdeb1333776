//! rtnetlink for the egress agent: interfaces, our external-mode VXLAN
//! device, egress-IP claims (with a ledger of what the agent itself added),
//! link, address and route notifications, and where a pod's address leads
//! (route, neighbour, bridge forwarding database).
//!
//! Every socket opened here belongs to the network namespace of the thread
//! that opened it, for its whole life: open it from the namespace you mean.
//!
//! ```no_run
//! use egress_netlink::{ClaimLedger, LinkEvent, Netlink};
//! use futures_util::StreamExt;
//!
//! # async fn agent() -> Result<(), egress_netlink::Error> {
//! let nl = Netlink::connect()?;
//! // Subscribe before listing, so that no interface falls in between.
//! let mut events = nl.link_events()?;
//! let tunnel = nl.ensure_vxlan("egress-vxlan", 4789, None).await?;
//! let mut ledger = ClaimLedger::open("/var/lib/egress/claims.json")?;
//! let claim = nl
//!     .claim_tracked(&mut ledger, "172.18.0.100".parse().unwrap(), None)
//!     .await?;
//! println!("tunnel ifindex {}, egress IP on {}", tunnel.index, claim.interface);
//! for link in nl.links().await? { /* attach to matching interfaces */ }
//! while let Some(event) = events.next().await {
//!     match event {
//!         LinkEvent::Added(link) => { /* attach (idempotently) */ }
//!         LinkEvent::Removed { name, .. } => { /* forget */ }
//!         LinkEvent::Overrun => { /* re-list with nl.links() */ }
//!     }
//! }
//! # Ok(())
//! # }
//! ```

mod addr;
mod error;
mod events;
mod ledger;
mod link;
mod neigh;
mod route;

pub use addr::{Claim, InterfaceAddress, Lifetime};
pub use error::{Error, Result};
pub use events::{AddressEvent, AddressEvents, LinkEvent, LinkEvents, RouteEvent, RouteEvents};
pub use ledger::{ClaimLedger, LedgerEntry};
pub use link::Link;
pub use neigh::{FdbEntry, Neighbour, bridge_port};

/// A NETLINK_ROUTE connection. Cheap to clone: clones share the socket and
/// its connection task, which ends when the last clone is dropped.
#[derive(Clone)]
pub struct Netlink {
    handle: rtnetlink::Handle,
}

impl Netlink {
    /// Opens the socket and spawns its connection task on the current tokio
    /// runtime (panics outside one, like `tokio::spawn`).
    pub fn connect() -> Result<Self> {
        let (connection, handle, unsolicited) =
            rtnetlink::new_connection().map_err(|source| Error::Connect { source })?;
        // Nobody listens for unsolicited messages on this socket (it joins
        // no multicast group); dropping the receiver lets the connection
        // task end once every handle is gone instead of queueing forever.
        drop(unsolicited);
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    /// The underlying rtnetlink handle, for requests this crate does not wrap.
    pub fn handle(&self) -> &rtnetlink::Handle {
        &self.handle
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    // The agent drives these from a multi-threaded runtime and may spawn
    // them: a non-Send future would only show up there, as a puzzling
    // compile error far from its cause.
    #[allow(dead_code)]
    fn futures_are_send(nl: &Netlink, ledger: &mut ClaimLedger) {
        fn send<T: Send>(_: T) {}
        let ip = Ipv4Addr::LOCALHOST;
        send(nl.link_by_name("x"));
        send(nl.links());
        send(nl.ensure_vxlan("x", 1, None));
        send(nl.delete_link("x"));
        send(nl.ipv4_addresses());
        send(nl.claim(ip, None));
        send(nl.release(ip, "x"));
        send(nl.claim_tracked(ledger, ip, None));
        send(nl.release_tracked(ledger, ip));
        send(nl.link_events());
        send(nl.route_oif(ip));
        send(nl.ipv4_neighbours());
        send(nl.bridge_fdb());
        send(nl.address_events());
        send(nl.route_events());
        send(nl.refresh_lifetimes(ledger, Lifetime::Forever));
        send(nl.clone());
    }
}
