//! Neighbours and the bridge forwarding database: which bridge port a host
//! on a bridge sits behind (`ip neigh` + `bridge fdb`), for CNIs that put
//! pods on a bridge instead of routing each one to its own interface.

use std::net::Ipv4Addr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::{
    AddressFamily,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage},
};

use crate::{Error, Netlink, Result};

/// An IPv4 neighbour entry with its link-layer address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
}

/// A bridge forwarding-database entry: `mac` is reached through `port`
/// of bridge `bridge`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdbEntry {
    pub port: u32,
    pub bridge: Option<u32>,
    pub mac: [u8; 6],
}

fn mac_of(msg: &NeighbourMessage) -> Option<[u8; 6]> {
    msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) => b.as_slice().try_into().ok(),
        _ => None,
    })
}

impl Netlink {
    async fn neighbour_dump(&self, family: AddressFamily) -> Result<Vec<NeighbourMessage>> {
        self.handle()
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(|e| Error::request("dump neighbours", e))
    }

    /// Every IPv4 neighbour that has a link-layer address (`ip -4 neigh`).
    pub async fn ipv4_neighbours(&self) -> Result<Vec<Neighbour>> {
        Ok(self
            .neighbour_dump(AddressFamily::Inet)
            .await?
            .iter()
            .filter_map(|m| {
                let ip = m.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                    _ => None,
                })?;
                Some(Neighbour {
                    ifindex: m.header.ifindex,
                    ip,
                    mac: mac_of(m)?,
                })
            })
            .collect())
    }

    /// The bridges' forwarding databases (`bridge fdb`).
    pub async fn bridge_fdb(&self) -> Result<Vec<FdbEntry>> {
        Ok(self
            .neighbour_dump(AddressFamily::Bridge)
            .await?
            .iter()
            .filter_map(|m| {
                Some(FdbEntry {
                    port: m.header.ifindex,
                    bridge: m.attributes.iter().find_map(|a| match a {
                        NeighbourAttribute::Controller(b) => Some(*b),
                        _ => None,
                    }),
                    mac: mac_of(m)?,
                })
            })
            .collect())
    }
}

/// The port of `bridge` behind which `ip` sits: its MAC from the
/// neighbour table, that MAC's port from the forwarding database.
pub fn bridge_port(
    ip: Ipv4Addr,
    bridge: u32,
    neighbours: &[Neighbour],
    fdb: &[FdbEntry],
) -> Option<u32> {
    let mac = neighbours
        .iter()
        .find(|n| n.ip == ip && n.ifindex == bridge)?
        .mac;
    fdb.iter()
        .find(|e| e.mac == mac && e.bridge == Some(bridge) && e.port != bridge)
        .map(|e| e.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_on_a_bridge_is_found_behind_its_port() {
        let pod = Ipv4Addr::new(10, 244, 1, 5);
        let mac = [2, 0, 0, 0, 0, 5];
        let neighbours = [
            Neighbour {
                ifindex: 9,
                ip: Ipv4Addr::new(10, 244, 1, 6),
                mac: [2, 0, 0, 0, 0, 6],
            },
            Neighbour {
                ifindex: 3,
                ip: pod,
                mac,
            },
        ];
        let fdb = [
            // The bridge's own address, reported on the bridge itself.
            FdbEntry {
                port: 3,
                bridge: Some(3),
                mac,
            },
            FdbEntry {
                port: 11,
                bridge: Some(4),
                mac,
            },
            FdbEntry {
                port: 12,
                bridge: Some(3),
                mac,
            },
        ];
        assert_eq!(bridge_port(pod, 3, &neighbours, &fdb), Some(12));
        // Not on that bridge, or no neighbour entry yet: unknown.
        assert_eq!(bridge_port(pod, 9, &neighbours, &fdb), None);
        assert_eq!(
            bridge_port(Ipv4Addr::new(10, 244, 1, 7), 3, &neighbours, &fdb),
            None
        );
    }
}
