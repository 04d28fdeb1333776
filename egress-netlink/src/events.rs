//! Notifications as streams: interfaces appearing and disappearing
//! (`RTNLGRP_LINK`), IPv4 addresses added and removed
//! (`RTNLGRP_IPV4_IFADDR`), and IPv4 route changes (`RTNLGRP_IPV4_ROUTE`).

use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_channel::mpsc::UnboundedReceiver;
use futures_util::Stream;
use ipnet::Ipv4Net;
use nix::sys::socket::{setsockopt, sockopt};
use rtnetlink::MulticastGroup;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::AsyncSocket;
use rtnetlink::sys::SocketAddr;
use tokio::task::JoinHandle;
use tracing::{trace, warn};

use crate::{Error, Link, Netlink, Result};

/// A change to the set of interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// An interface appeared, got a new name, or was seen for the first
    /// time since subscribing (the kernel announces new devices and state
    /// changes of old ones with the same message, so a consumer must treat
    /// this as "exists now" and act idempotently).
    Added(Link),
    Removed {
        name: String,
        index: u32,
    },
    /// The kernel dropped notifications because the socket buffer was full:
    /// the consumer must re-list interfaces ([`Netlink::links`]) to catch up.
    Overrun,
}

/// Socket buffer for notifications: a burst of pod starts announces many
/// veths (several messages each) while the agent may be busy attaching.
const RCVBUF: usize = 4 << 20;

/// Stream of [`LinkEvent`]s from the RTNLGRP_LINK multicast group of the
/// namespace it was created in. Dropping it closes the socket.
pub struct LinkEvents {
    rx: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
    task: JoinHandle<()>,
    /// Name by ifindex of every link announced so far: the kernel repeats
    /// RTM_NEWLINK for every flag or MTU change, and only a new index or a
    /// rename is news to the consumer.
    known: HashMap<u32, String>,
}

impl Drop for LinkEvents {
    fn drop(&mut self) {
        // The connection task only notices a dropped receiver when the next
        // notification arrives, which may be never.
        self.task.abort();
    }
}

impl LinkEvents {
    fn translate(&mut self, msg: NetlinkMessage<RouteNetlinkMessage>) -> Option<LinkEvent> {
        match msg.payload {
            // The bridge reports port changes in the same group with
            // AF_BRIDGE, including an RTM_DELLINK when a port merely leaves
            // its bridge: only AF_UNSPEC speaks of devices themselves.
            NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewLink(ref m) | RouteNetlinkMessage::DelLink(ref m),
            ) if m.header.interface_family != AddressFamily::Unspec => {
                trace!(family = ?m.header.interface_family, "ignoring per-family link notification");
                None
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => {
                let link = Link::from_message(&m)?;
                if self.known.get(&link.index) == Some(&link.name) {
                    trace!(name = %link.name, "link changed, already announced");
                    return None;
                }
                self.known.insert(link.index, link.name.clone());
                Some(LinkEvent::Added(link))
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) => {
                let index = m.header.index;
                let known = self.known.remove(&index);
                let name = name_of(&m).or(known)?;
                Some(LinkEvent::Removed { name, index })
            }
            NetlinkPayload::Overrun(_) => {
                warn!("link notifications lost (socket buffer overrun); consumer must resync");
                // Names known before the loss may be stale now.
                self.known.clear();
                Some(LinkEvent::Overrun)
            }
            other => {
                trace!(?other, "ignoring notification");
                None
            }
        }
    }
}

fn name_of(m: &LinkMessage) -> Option<String> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

impl Stream for LinkEvents {
    type Item = LinkEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<LinkEvent>> {
        let this = self.get_mut();
        loop {
            match Pin::new(&mut this.rx).poll_next(cx) {
                Poll::Ready(Some((msg, _))) => {
                    if let Some(ev) = this.translate(msg) {
                        return Poll::Ready(Some(ev));
                    }
                }
                // The socket failed and the connection task ended.
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A change to the IPv4 addresses of this namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressEvent {
    /// An address was added or changed (a lifetime refresh announces the
    /// address again).
    Added {
        ifindex: u32,
        addr: Ipv4Net,
    },
    Removed {
        ifindex: u32,
        addr: Ipv4Net,
    },
    /// Notifications were lost: re-list with [`Netlink::ipv4_addresses`].
    Overrun,
}

/// Stream of [`AddressEvent`]s from the RTNLGRP_IPV4_IFADDR multicast group
/// of the namespace it was created in. Dropping it closes the socket.
pub struct AddressEvents {
    rx: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
    task: JoinHandle<()>,
}

impl Drop for AddressEvents {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn address_event(msg: NetlinkMessage<RouteNetlinkMessage>) -> Option<AddressEvent> {
    let (m, added) = match msg.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(m)) => (m, true),
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelAddress(m)) => (m, false),
        NetlinkPayload::Overrun(_) => {
            warn!("address notifications lost (socket buffer overrun); consumer must resync");
            return Some(AddressEvent::Overrun);
        }
        _ => return None,
    };
    if m.header.family != AddressFamily::Inet {
        return None;
    }
    let ip = crate::addr::ipv4_of(&m)?;
    let addr = Ipv4Net::new(ip, m.header.prefix_len).ok()?;
    let ifindex = m.header.index;
    Some(if added {
        AddressEvent::Added { ifindex, addr }
    } else {
        AddressEvent::Removed { ifindex, addr }
    })
}

impl Stream for AddressEvents {
    type Item = AddressEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<AddressEvent>> {
        let this = self.get_mut();
        loop {
            match Pin::new(&mut this.rx).poll_next(cx) {
                Poll::Ready(Some((msg, _))) => {
                    if let Some(ev) = address_event(msg) {
                        return Poll::Ready(Some(ev));
                    }
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A change to the IPv4 routing tables: which destination, so that a
/// consumer following particular hosts (pods behind /32 routes) knows
/// whether it concerns them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteEvent {
    Changed {
        dst: Ipv4Net,
    },
    /// Notifications were lost: look again at whatever depends on routes.
    Overrun,
}

/// Stream of [`RouteEvent`]s from the RTNLGRP_IPV4_ROUTE multicast group of
/// the namespace it was created in. Dropping it closes the socket.
pub struct RouteEvents {
    rx: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
    task: JoinHandle<()>,
}

impl Drop for RouteEvents {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn route_event(msg: NetlinkMessage<RouteNetlinkMessage>) -> Option<RouteEvent> {
    let m = match msg.payload {
        NetlinkPayload::InnerMessage(
            RouteNetlinkMessage::NewRoute(m) | RouteNetlinkMessage::DelRoute(m),
        ) => m,
        NetlinkPayload::Overrun(_) => {
            warn!("route notifications lost (socket buffer overrun); consumer must resync");
            return Some(RouteEvent::Overrun);
        }
        _ => return None,
    };
    if m.header.address_family != AddressFamily::Inet {
        return None;
    }
    let dst = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
            _ => None,
        })
        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
    let dst = Ipv4Net::new(dst, m.header.destination_prefix_length).ok()?;
    Some(RouteEvent::Changed { dst })
}

impl Stream for RouteEvents {
    type Item = RouteEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<RouteEvent>> {
        let this = self.get_mut();
        loop {
            match Pin::new(&mut this.rx).poll_next(cx) {
                Poll::Ready(Some((msg, _))) => {
                    if let Some(ev) = route_event(msg) {
                        return Poll::Ready(Some(ev));
                    }
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

type Notifications = (
    UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
    JoinHandle<()>,
);

/// A socket of its own joined to `group`, with an enlarged receive buffer,
/// and its connection task.
fn subscribe(group: MulticastGroup) -> Result<Notifications> {
    let (mut connection, _handle, rx) = rtnetlink::new_multicast_connection(&[group])
        .map_err(|source| Error::Connect { source })?;
    let socket = connection.socket_mut().socket_mut();
    // The forced size may exceed net.core.rmem_max but needs
    // CAP_NET_ADMIN; without it, take what rmem_max allows. Either way
    // only headroom is at stake: overruns are still reported.
    if let Err(forced) = setsockopt(&*socket, sockopt::RcvBufForce, &RCVBUF)
        && let Err(e) = socket.set_rx_buf_sz(RCVBUF as libc::c_int)
    {
        warn!(%forced, error = %e, "could not enlarge the notification socket buffer");
    }
    Ok((rx, tokio::spawn(connection)))
}

impl Netlink {
    /// Subscribes to link notifications on a socket of its own, in the
    /// network namespace of the calling thread. Only changes after this call
    /// are reported: subscribe first, then list with [`Netlink::links`], and
    /// nothing falls in between. Must be called inside a tokio runtime.
    pub fn link_events(&self) -> Result<LinkEvents> {
        let (rx, task) = subscribe(MulticastGroup::Link)?;
        Ok(LinkEvents {
            rx,
            task,
            known: HashMap::new(),
        })
    }

    /// Subscribes to IPv4 address notifications, like
    /// [`Netlink::link_events`]: subscribe first, then list with
    /// [`Netlink::ipv4_addresses`].
    pub fn address_events(&self) -> Result<AddressEvents> {
        let (rx, task) = subscribe(MulticastGroup::Ipv4Ifaddr)?;
        Ok(AddressEvents { rx, task })
    }

    /// Subscribes to IPv4 route notifications (every table), like
    /// [`Netlink::link_events`].
    pub fn route_events(&self) -> Result<RouteEvents> {
        let (rx, task) = subscribe(MulticastGroup::Ipv4Route)?;
        Ok(RouteEvents { rx, task })
    }
}
