//! rtnetlink for the egress agent: interfaces, our external-mode VXLAN
//! device, egress-IP claims (with a ledger of what the agent itself added),
//! and link notifications.
//!
//! Every socket opened here belongs to the network namespace of the thread
//! that opened it, for its whole life: open it from the namespace you mean.

mod addr;
mod error;
mod events;
mod ledger;
mod link;

pub use addr::{Claim, InterfaceAddress};
pub use error::{Error, Result};
pub use events::{LinkEvent, LinkEvents};
pub use ledger::{ClaimLedger, LedgerEntry};
pub use link::Link;

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
