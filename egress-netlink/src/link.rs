//! Interfaces: looking them up, listing them, interface-name validation,
//! and our external-mode VXLAN device (created, checked, or deleted).

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVxlan};
use tracing::{debug, info};

use crate::error::errno_of;
use crate::{Error, Netlink, Result};

/// A network interface as the agent needs to see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
    /// Administratively up (IFF_UP), whatever the carrier says.
    pub up: bool,
    /// `IFLA_INFO_KIND` ("veth", "vxlan", ...); `None` for plain hardware
    /// devices and loopback.
    pub kind: Option<String>,
}

impl Link {
    /// `None` for a message without a name, which the kernel never sends
    /// for a real device but a decoder must not trust blindly.
    pub(crate) fn from_message(msg: &LinkMessage) -> Option<Link> {
        let mut name = None;
        let mut mtu = 0;
        let mut kind = None;
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::Mtu(m) => mtu = *m,
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(k) = info {
                            kind = Some(k.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        Some(Link {
            name: name?,
            index: msg.header.index,
            mtu,
            up: msg.header.flags.contains(LinkFlags::Up),
            kind,
        })
    }
}

/// Linux's own rules (`dev_valid_name`), checked here so that a bad config
/// value is reported as such rather than as an opaque EINVAL.
pub(crate) fn validate_name(name: &str) -> Result<()> {
    let why = if name.is_empty() {
        Some("empty")
    } else if name.len() > 15 {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("reserved")
    } else if name.contains(['/', ':']) || name.chars().any(char::is_whitespace) {
        Some("contains '/', ':' or whitespace")
    } else {
        None
    };
    match why {
        Some(why) => Err(Error::InvalidName {
            name: name.to_owned(),
            why,
        }),
        None => Ok(()),
    }
}

/// What an existing device is, in the words of the mismatch error; `None`
/// when it is exactly the external VXLAN with `port` we want.
fn vxlan_mismatch(msg: &LinkMessage, port: u16) -> Option<String> {
    let mut kind = None;
    let mut data = None;
    for attr in &msg.attributes {
        if let LinkAttribute::LinkInfo(infos) = attr {
            for info in infos {
                match info {
                    LinkInfo::Kind(k) => kind = Some(k),
                    LinkInfo::Data(InfoData::Vxlan(d)) => data = Some(d),
                    _ => {}
                }
            }
        }
    }
    match kind {
        None => return Some("a device without a link kind".into()),
        Some(InfoKind::Vxlan) => {}
        Some(k) => return Some(format!("of kind {k}")),
    }
    let data = data.map(Vec::as_slice).unwrap_or_default();
    let external = data
        .iter()
        .any(|d| matches!(d, InfoVxlan::CollectMetadata(true)));
    let actual_port = data.iter().find_map(|d| match d {
        InfoVxlan::Port(p) => Some(*p),
        _ => None,
    });
    let mut problems = Vec::new();
    if !external {
        let vni = data.iter().find_map(|d| match d {
            InfoVxlan::Id(v) => Some(*v),
            _ => None,
        });
        problems.push(match vni {
            Some(v) => format!("a VXLAN with fixed VNI {v}, not external"),
            None => "a VXLAN without external (collect_metadata) mode".into(),
        });
    }
    if actual_port != Some(port) {
        problems.push(match actual_port {
            Some(p) => format!("a VXLAN with dstport {p}"),
            None => "a VXLAN without a dstport".into(),
        });
    }
    if problems.is_empty() {
        None
    } else {
        Some(problems.join(" and "))
    }
}

impl Netlink {
    async fn link_message_by_name(&self, name: &str) -> Result<Option<LinkMessage>> {
        validate_name(name)?;
        let mut stream = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match stream.try_next().await {
            Ok(msg) => Ok(msg),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(Error::request(format!("get link {name:?}"), e)),
        }
    }

    /// `Ok(None)` when no interface has that name.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<Link>> {
        Ok(self
            .link_message_by_name(name)
            .await?
            .as_ref()
            .and_then(Link::from_message))
    }

    pub(crate) async fn require_link(&self, name: &str) -> Result<Link> {
        self.link_by_name(name)
            .await?
            .ok_or_else(|| Error::NoSuchLink {
                name: name.to_owned(),
            })
    }

    async fn link_messages(&self) -> Result<Vec<LinkMessage>> {
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| Error::request("dump links", e))
    }

    /// Every interface of this namespace, in ifindex order.
    pub async fn links(&self) -> Result<Vec<Link>> {
        let msgs = self.link_messages().await?;
        let mut links: Vec<Link> = msgs.iter().filter_map(Link::from_message).collect();
        links.sort_by_key(|l| l.index);
        Ok(links)
    }

    /// Makes `name` an up, external-mode VXLAN device on UDP `dstport`
    /// (`ip link add NAME type vxlan external dstport PORT`), with `mtu` if
    /// given. An existing device of that name is kept (and brought up, its
    /// MTU corrected) when it is such a device; anything else under that
    /// name is an error, never replaced: it may be somebody else's.
    pub async fn ensure_vxlan(&self, name: &str, dstport: u16, mtu: Option<u32>) -> Result<Link> {
        validate_name(name)?;
        if self.link_message_by_name(name).await?.is_none() {
            let mut builder = LinkMessageBuilder::<LinkVxlan>::new(name)
                .port(dstport)
                .collect_metadata(true)
                // iproute2 turns learning off for `external`: with
                // per-packet tunnel keys the FDB would only fill with
                // entries nothing looks up.
                .learning(false)
                .up();
            if let Some(mtu) = mtu {
                builder = builder.mtu(mtu);
            }
            match self.handle.link().add(builder.build()).execute().await {
                Ok(()) => info!(name, dstport, ?mtu, "created external VXLAN device"),
                // Either someone created `name` since our look-up (then it
                // is checked below like any existing link), or the kernel
                // refuses a second external VXLAN on the same port.
                Err(e) if errno_of(&e) == Some(libc::EEXIST) => {
                    if self.link_message_by_name(name).await?.is_none() {
                        let holder = self
                            .link_messages()
                            .await?
                            .iter()
                            .find(|m| vxlan_mismatch(m, dstport).is_none())
                            .and_then(Link::from_message)
                            .map(|l| l.name);
                        return Err(Error::VxlanPortInUse {
                            name: name.to_owned(),
                            port: dstport,
                            holder,
                            source: e,
                        });
                    }
                    debug!(name, "VXLAN device appeared concurrently");
                }
                Err(e) => {
                    return Err(Error::request(
                        format!("create external VXLAN {name:?} dstport {dstport}"),
                        e,
                    ));
                }
            }
        }

        // Re-read even after creating it: a kernel that does not know an
        // attribute ignores it, and only the dump says what we really got.
        let msg = self
            .link_message_by_name(name)
            .await?
            .ok_or_else(|| Error::NoSuchLink {
                name: name.to_owned(),
            })?;
        if let Some(found) = vxlan_mismatch(&msg, dstport) {
            return Err(Error::VxlanMismatch {
                name: name.to_owned(),
                port: dstport,
                found,
            });
        }
        let mut link = Link::from_message(&msg).ok_or_else(|| Error::NoSuchLink {
            name: name.to_owned(),
        })?;
        let want_mtu = mtu.filter(|m| *m != link.mtu);
        if !link.up || want_mtu.is_some() {
            let mut builder = LinkUnspec::new_with_index(link.index).up();
            if let Some(m) = want_mtu {
                builder = builder.mtu(m);
            }
            self.handle
                .link()
                .set(builder.build())
                .execute()
                .await
                .map_err(|e| Error::request(format!("set {name:?} up (mtu {want_mtu:?})"), e))?;
            info!(name, mtu = ?want_mtu, "brought existing VXLAN device up to spec");
            link.up = true;
            if let Some(m) = want_mtu {
                link.mtu = m;
            }
        }
        Ok(link)
    }

    /// Deletes the interface; `Ok(false)` if it did not exist.
    pub async fn delete_link(&self, name: &str) -> Result<bool> {
        let Some(link) = self.link_by_name(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => {
                info!(name, index = link.index, "deleted link");
                Ok(true)
            }
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(Error::request(
                format!("delete link {name:?} (index {})", link.index),
                e,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_kernel_rules() {
        for ok in ["eth0", "egress-vxlan", "veth1234567890a", "a"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "veth1234567890ab", ".", "..", "a/b", "eth0:1", "a b"] {
            let err = validate_name(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidName { .. }), "{bad:?}: {err}");
        }
    }

    fn vxlan_msg(data: Vec<InfoVxlan>) -> LinkMessage {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName("vx".into()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vxlan),
            LinkInfo::Data(InfoData::Vxlan(data)),
        ]));
        msg
    }

    #[test]
    fn vxlan_mismatch_describes_the_difference() {
        let good = vxlan_msg(vec![
            InfoVxlan::CollectMetadata(true),
            InfoVxlan::Port(4789),
        ]);
        assert_eq!(vxlan_mismatch(&good, 4789), None);
        assert_eq!(
            vxlan_mismatch(&good, 8472).as_deref(),
            Some("a VXLAN with dstport 4789")
        );
        let fixed = vxlan_msg(vec![
            InfoVxlan::Id(42),
            InfoVxlan::CollectMetadata(false),
            InfoVxlan::Port(4789),
        ]);
        assert_eq!(
            vxlan_mismatch(&fixed, 4789).as_deref(),
            Some("a VXLAN with fixed VNI 42, not external")
        );
    }
}
