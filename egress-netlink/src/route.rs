//! Routes: the default route's interface and the output interface towards
//! an address.

use std::net::Ipv4Addr;

use futures_util::TryStreamExt;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::route::{RouteAttribute, RouteHeader, RouteMessage};

use crate::{Error, Netlink, Result};

/// What the agent needs of an IPv4 route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DefaultRoute {
    ifindex: u32,
    metric: u32,
}

fn default_route_of(msg: &RouteMessage) -> Option<DefaultRoute> {
    let table = msg
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table));
    if msg.header.destination_prefix_length != 0 || table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let mut ifindex = None;
    let mut metric = 0;
    for a in &msg.attributes {
        match a {
            RouteAttribute::Oif(i) => ifindex = Some(*i),
            RouteAttribute::Priority(p) => metric = *p,
            _ => {}
        }
    }
    Some(DefaultRoute {
        ifindex: ifindex?,
        metric,
    })
}

impl Netlink {
    /// The interface of the main table's IPv4 default route with the lowest
    /// metric (`ip -4 route show default`), if there is one.
    pub async fn default_route_ifindex(&self) -> Result<Option<u32>> {
        let request = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let routes: Vec<RouteMessage> = self
            .handle()
            .route()
            .get(request)
            .execute()
            .try_collect()
            .await
            .map_err(|e| Error::request("dump IPv4 routes", e))?;
        Ok(routes
            .iter()
            .filter_map(default_route_of)
            .min_by_key(|r| r.metric)
            .map(|r| r.ifindex))
    }
}

impl Netlink {
    /// The interface the kernel routes `dst` out of, as `ip route get DST`
    /// answers it (policy rules included); `Ok(None)` when `dst` is
    /// unreachable.
    pub async fn route_oif(&self, dst: Ipv4Addr) -> Result<Option<u32>> {
        let request = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, 32)
            .build();
        let answer = self
            .handle()
            .route()
            .get(request)
            .execute()
            .try_next()
            .await;
        match answer {
            Ok(msg) => Ok(msg.and_then(|m| {
                m.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                })
            })),
            Err(e)
                if matches!(
                    crate::error::errno_of(&e),
                    Some(libc::ENETUNREACH | libc::EHOSTUNREACH)
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(Error::request(format!("route get {dst}"), e)),
        }
    }
}
