//! IPv4 addresses: listing them, claiming an egress IP on the interface
//! whose subnet holds it (or a named one), optionally with a kernel
//! lifetime, refreshing lifetimes and releasing claims, and the
//! ledger-tracked variants whose claims a restarted agent can undo exactly.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage, CacheInfo};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::error::errno_of;
use crate::{ClaimLedger, Error, LedgerEntry, Link, Netlink, Result};

/// One IPv4 address of an interface, with its prefix (the subnet it makes
/// on-link).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceAddress {
    pub ifindex: u32,
    pub ifname: String,
    pub addr: Ipv4Net,
}

/// How long the kernel keeps an address the agent adds.
///
/// The kernel counts lifetimes in whole seconds from the moment they are
/// set (`ifa_tstamp`), and its IPv4 expiry check (`check_lifetime` in
/// `net/ipv4/devinet.c`) runs when an address is added or its lifetime
/// replaced, then again at the earliest expiry, rounded up to a whole
/// second when that is less than 250 ms later and never sooner than a
/// second after the previous check; it removes addresses whose age is
/// within 20 ms of their valid lifetime. So an address given `Seconds(n)`
/// at `t` disappears between `t + n - 20 ms` and `t + n + 250 ms` (plus
/// workqueue latency), unless its lifetime is set again before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Permanent (`IFA_F_PERMANENT`): until removed.
    Forever,
    /// Valid and preferred for this many seconds from now (at least 1: the
    /// kernel rejects a valid lifetime of 0).
    Seconds(std::num::NonZeroU32),
}

impl Lifetime {
    /// The latest the kernel removes an address after its lifetime ends.
    pub const EXPIRY_LATENESS: std::time::Duration = std::time::Duration::from_millis(250);

    /// IFA_CACHEINFO for it: the preferred lifetime equals the valid one
    /// (the kernel schedules no expiry check for a finite valid lifetime
    /// whose preferred lifetime is infinite).
    fn cache_info(self) -> CacheInfo {
        let secs = match self {
            Lifetime::Forever => u32::MAX,
            Lifetime::Seconds(n) => n.get(),
        };
        let mut info = CacheInfo::default();
        info.ifa_preferred = secs;
        info.ifa_valid = secs;
        info
    }
}

/// Where an egress IP landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub interface: String,
    pub prefix_len: u8,
    /// `true` if this call added the address; `false` if it was already
    /// there (put there by us earlier, or by somebody else).
    pub added: bool,
}

/// What `claim` is going to do, decided from one snapshot of the addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub ifindex: u32,
    pub ifname: String,
    pub prefix_len: u8,
    pub present: bool,
}

/// Chooses the interface and prefix for `ip`.
///
/// Without `target`, the interface is the one whose subnet contains `ip`,
/// the most specific subnet winning (as routing would pick it); equally
/// specific subnets on different interfaces are ambiguous. The address gets
/// that subnet's prefix length so the kernel files it as a secondary of the
/// interface's primary and never picks it as the node's own source.
///
/// With `target`, that interface is used even if none of its subnets
/// contains `ip`; then the address goes in as a /32, which the kernel also
/// never prefers as a source for other destinations, since the interface's
/// older primary address comes first.
pub(crate) fn plan_claim(
    ip: Ipv4Addr,
    target: Option<&Link>,
    addrs: &[InterfaceAddress],
) -> Result<Plan> {
    let holders: Vec<&InterfaceAddress> = addrs.iter().filter(|a| a.addr.addr() == ip).collect();
    let present = |h: &InterfaceAddress| Plan {
        ifindex: h.ifindex,
        ifname: h.ifname.clone(),
        prefix_len: h.addr.prefix_len(),
        present: true,
    };

    let (ifindex, ifname, subnet) = match target {
        Some(link) => {
            if let Some(h) = holders.iter().find(|h| h.ifindex == link.index) {
                return Ok(present(h));
            }
            if let Some(h) = holders.first() {
                return Err(Error::HeldElsewhere {
                    ip,
                    requested: link.name.clone(),
                    holder: h.ifname.clone(),
                });
            }
            let subnet = addrs
                .iter()
                .filter(|a| a.ifindex == link.index && a.addr.contains(&ip))
                .max_by_key(|a| a.addr.prefix_len())
                .map(|a| a.addr.trunc());
            (link.index, link.name.clone(), subnet)
        }
        None => {
            match holders.as_slice() {
                [] => {}
                [h] => return Ok(present(h)),
                many => {
                    return Err(Error::HeldByMany {
                        ip,
                        holders: many.iter().map(|h| (*h).clone()).collect(),
                    });
                }
            }
            let matching: Vec<&InterfaceAddress> =
                addrs.iter().filter(|a| a.addr.contains(&ip)).collect();
            let Some(best_len) = matching.iter().map(|a| a.addr.prefix_len()).max() else {
                return Err(Error::NoSubnetFor {
                    ip,
                    candidates: addrs.to_vec(),
                });
            };
            let best: Vec<&InterfaceAddress> = matching
                .into_iter()
                .filter(|a| a.addr.prefix_len() == best_len)
                .collect();
            let first = best[0];
            if best.iter().any(|a| a.ifindex != first.ifindex) {
                return Err(Error::AmbiguousSubnet {
                    ip,
                    matches: best.into_iter().cloned().collect(),
                });
            }
            (
                first.ifindex,
                first.ifname.clone(),
                Some(first.addr.trunc()),
            )
        }
    };

    let prefix_len = match subnet {
        Some(net) => {
            // Host-wide subnets (/31, /32) have no network/broadcast address.
            if net.prefix_len() < 31 && (ip == net.network() || ip == net.broadcast()) {
                return Err(Error::UnusableAddress {
                    ip,
                    subnet: net,
                    interface: ifname,
                });
            }
            net.prefix_len()
        }
        None => 32,
    };
    Ok(Plan {
        ifindex,
        ifname,
        prefix_len,
        present: false,
    })
}

pub(crate) fn ipv4_of(msg: &AddressMessage) -> Option<Ipv4Addr> {
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS differs from it
    // only on point-to-point links, where it is the peer's.
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(IpAddr::V4(a)) => return Some(*a),
            AddressAttribute::Address(IpAddr::V4(a)) => address = Some(*a),
            _ => {}
        }
    }
    address
}

impl Netlink {
    async fn ipv4_address_messages(&self, ifindex: Option<u32>) -> Result<Vec<AddressMessage>> {
        let mut req = self.handle.address().get();
        // The family in the request makes the kernel dump IPv4 only.
        req.message_mut().header.family = AddressFamily::Inet;
        if let Some(index) = ifindex {
            req = req.set_link_index_filter(index);
        }
        let msgs: Vec<AddressMessage> = req
            .execute()
            .try_collect()
            .await
            .map_err(|e| Error::request("dump IPv4 addresses", e))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.family == AddressFamily::Inet)
            .collect())
    }

    /// Every IPv4 address of every interface of this namespace.
    pub async fn ipv4_addresses(&self) -> Result<Vec<InterfaceAddress>> {
        let names: HashMap<u32, String> = self
            .links()
            .await?
            .into_iter()
            .map(|l| (l.index, l.name))
            .collect();
        let mut out = Vec::new();
        for msg in self.ipv4_address_messages(None).await? {
            let Some(ip) = ipv4_of(&msg) else { continue };
            let Ok(addr) = Ipv4Net::new(ip, msg.header.prefix_len) else {
                warn!(%ip, prefix_len = msg.header.prefix_len, "kernel reported an invalid prefix length");
                continue;
            };
            // An interface deleted between the two dumps: its addresses are
            // gone too, so leave them out rather than report them nameless.
            let Some(ifname) = names.get(&msg.header.index) else {
                continue;
            };
            out.push(InterfaceAddress {
                ifindex: msg.header.index,
                ifname: ifname.clone(),
                addr,
            });
        }
        Ok(out)
    }

    pub(crate) async fn plan(&self, ip: Ipv4Addr, interface: Option<&str>) -> Result<Plan> {
        let target = match interface {
            Some(name) => Some(self.require_link(name).await?),
            None => None,
        };
        let addrs = self.ipv4_addresses().await?;
        plan_claim(ip, target.as_ref(), &addrs)
    }

    /// Adds what `plan` decided; `Ok(false)` if the address turned up in
    /// the meantime (then it is not ours).
    async fn add_planned(&self, ip: Ipv4Addr, plan: &Plan, lifetime: Lifetime) -> Result<bool> {
        let mut req = self
            .handle
            .address()
            .add(plan.ifindex, IpAddr::V4(ip), plan.prefix_len);
        if lifetime != Lifetime::Forever {
            req.message_mut()
                .attributes
                .push(AddressAttribute::CacheInfo(lifetime.cache_info()));
        }
        match req.execute().await {
            Ok(()) => {
                info!(%ip, prefix_len = plan.prefix_len, interface = %plan.ifname, "claimed address");
                Ok(true)
            }
            Err(e) if errno_of(&e) == Some(libc::EEXIST) => {
                debug!(%ip, interface = %plan.ifname, "address appeared concurrently");
                Ok(false)
            }
            Err(e) => Err(Error::request(
                format!("add {ip}/{} to {}", plan.prefix_len, plan.ifname),
                e,
            )),
        }
    }

    /// Puts `ip` on the interface whose subnet contains it (or on
    /// `interface`, which must exist). Idempotent: an address already there
    /// is reported with `added: false` and left alone.
    ///
    /// This does not remember anything; an agent that must later tell its
    /// own addresses from an admin's uses [`Netlink::claim_tracked`].
    pub async fn claim(&self, ip: Ipv4Addr, interface: Option<&str>) -> Result<Claim> {
        let plan = self.plan(ip, interface).await?;
        let added = !plan.present && self.add_planned(ip, &plan, Lifetime::Forever).await?;
        Ok(Claim {
            interface: plan.ifname,
            prefix_len: plan.prefix_len,
            added,
        })
    }

    /// Deletes one address of `interface`; `Ok(false)` if it had gone
    /// already.
    async fn delete_address(
        &self,
        msg: AddressMessage,
        ip: Ipv4Addr,
        interface: &str,
    ) -> Result<bool> {
        let prefix_len = msg.header.prefix_len;
        match self.handle.address().del(msg).execute().await {
            Ok(()) => {
                info!(%ip, prefix_len, interface, "released address");
                Ok(true)
            }
            Err(e) if errno_of(&e) == Some(libc::EADDRNOTAVAIL) => Ok(false),
            Err(e) => Err(Error::request(
                format!("delete {ip}/{prefix_len} from {interface}"),
                e,
            )),
        }
    }

    /// Removes `ip` from `interface`; `Ok(false)` if it was not there (or
    /// the interface is gone, which took its addresses with it).
    pub async fn release(&self, ip: Ipv4Addr, interface: &str) -> Result<bool> {
        let Some(link) = self.link_by_name(interface).await? else {
            debug!(%ip, interface, "release: interface is gone");
            return Ok(false);
        };
        let mut removed = false;
        for msg in self.ipv4_address_messages(Some(link.index)).await? {
            if ipv4_of(&msg) == Some(ip) {
                removed |= self.delete_address(msg, ip, interface).await?;
            }
        }
        Ok(removed)
    }

    /// [`Netlink::claim`], recording in `ledger` what this call adds.
    ///
    /// The entry is written before the address is added, so a crash in
    /// between leaves an entry for an absent address (harmless, completed by
    /// the next claim) rather than an address nobody knows is ours. An
    /// address that was already present is not recorded: it is an admin's,
    /// unless the ledger already says it is ours from an earlier run.
    pub async fn claim_tracked(
        &self,
        ledger: &mut ClaimLedger,
        ip: Ipv4Addr,
        interface: Option<&str>,
    ) -> Result<Claim> {
        let plan = self.plan(ip, interface).await?;
        self.execute_tracked(ledger, ip, plan, Lifetime::Forever)
            .await
    }

    /// [`Netlink::claim_tracked`] for many addresses against one dump of
    /// the addresses: a dump per claim made claiming ten thousand egress IPs
    /// quadratic (minutes). Stops at the first failure.
    pub async fn claim_all_tracked(
        &self,
        ledger: &mut ClaimLedger,
        claims: &[(Ipv4Addr, Option<String>)],
    ) -> Result<Vec<Claim>> {
        self.claim_all_tracked_for(ledger, claims, Lifetime::Forever)
            .await
    }

    /// [`Netlink::claim_all_tracked`], adding the missing addresses with
    /// `lifetime` (those already present keep theirs: see
    /// [`Netlink::refresh_lifetimes`]).
    ///
    /// The ledger is written once before the addresses are added and once
    /// after, for those that turned out not to be ours: a write per address
    /// made ten thousand claims take minutes. A crash in between leaves
    /// entries for absent addresses, which the next claim completes (see
    /// [`Netlink::claim_tracked`]).
    pub async fn claim_all_tracked_for(
        &self,
        ledger: &mut ClaimLedger,
        claims: &[(Ipv4Addr, Option<String>)],
        lifetime: Lifetime,
    ) -> Result<Vec<Claim>> {
        let mut addrs = self.ipv4_addresses().await?;
        let mut plans = Vec::with_capacity(claims.len());
        let mut plan_error = None;
        for (ip, interface) in claims {
            let planned = match interface {
                Some(name) => self
                    .require_link(name)
                    .await
                    .and_then(|link| plan_claim(*ip, Some(&link), &addrs)),
                None => plan_claim(*ip, None, &addrs),
            };
            let plan = match planned {
                Ok(plan) => plan,
                Err(e) => {
                    // The claims before it are still made, as one at a
                    // time would have made them.
                    plan_error = Some(e);
                    break;
                }
            };
            if !plan.present {
                // Later plans must see it, as a fresh dump would.
                let addr =
                    Ipv4Net::new(*ip, plan.prefix_len).map_err(|_| Error::UnusableAddress {
                        ip: *ip,
                        subnet: Ipv4Net::from(*ip),
                        interface: plan.ifname.clone(),
                    })?;
                addrs.push(InterfaceAddress {
                    ifindex: plan.ifindex,
                    ifname: plan.ifname.clone(),
                    addr,
                });
            }
            plans.push((*ip, plan));
        }

        let to_record: Vec<LedgerEntry> = plans
            .iter()
            .filter(|(_, plan)| !plan.present)
            .map(|(ip, plan)| LedgerEntry {
                ip: *ip,
                interface: plan.ifname.clone(),
                prefix_len: plan.prefix_len,
            })
            .collect();
        let mut newly_recorded = ledger.record_all(&to_record)?.into_iter();

        let mut done = Vec::with_capacity(plans.len());
        // Entries to drop afterwards: addresses that someone else's turned
        // out to be, and on a failure those this call recorded but did not add.
        let mut not_ours: Vec<(Ipv4Addr, &str)> = Vec::new();
        let mut add_error = None;
        for (ip, plan) in &plans {
            if plan.present {
                done.push(Claim {
                    interface: plan.ifname.clone(),
                    prefix_len: plan.prefix_len,
                    added: false,
                });
                continue;
            }
            let new = newly_recorded.next().unwrap_or(false);
            if add_error.is_some() {
                if new {
                    not_ours.push((*ip, &plan.ifname));
                }
                continue;
            }
            match self.add_planned(*ip, plan, lifetime).await {
                Ok(added) => {
                    if !added {
                        // EEXIST: someone else's address sits there now. The
                        // entry must go, or a later release would remove it.
                        not_ours.push((*ip, &plan.ifname));
                    }
                    done.push(Claim {
                        interface: plan.ifname.clone(),
                        prefix_len: plan.prefix_len,
                        added,
                    });
                }
                Err(e) => {
                    // The address is absent; undo only what this call wrote.
                    if new {
                        not_ours.push((*ip, &plan.ifname));
                    }
                    add_error = Some(e);
                }
            }
        }
        let forgotten = ledger.forget_all(&not_ours);
        if let Some(e) = add_error.or(plan_error) {
            if let Err(forget) = forgotten {
                warn!(error = %forget, "could not drop the ledger entries of failed claims");
            }
            return Err(e);
        }
        // If the entries of addresses that are not ours cannot be dropped,
        // say so rather than report success.
        forgotten?;
        Ok(done)
    }

    /// Carries out a claim `plan` and keeps `ledger` in step (see
    /// [`Netlink::claim_tracked`]).
    async fn execute_tracked(
        &self,
        ledger: &mut ClaimLedger,
        ip: Ipv4Addr,
        plan: Plan,
        lifetime: Lifetime,
    ) -> Result<Claim> {
        if plan.present {
            return Ok(Claim {
                interface: plan.ifname,
                prefix_len: plan.prefix_len,
                added: false,
            });
        }
        let newly_recorded = ledger.record(ip, &plan.ifname, plan.prefix_len)?;
        let added = match self.add_planned(ip, &plan, lifetime).await {
            Ok(true) => true,
            Ok(false) => {
                // EEXIST: someone else's address sits there now. The entry
                // must go, or a later release would remove it; if the ledger
                // cannot be fixed, say so rather than report success.
                ledger.forget(ip, &plan.ifname)?;
                false
            }
            Err(e) => {
                // The address is absent; undo only what this call wrote.
                if newly_recorded && let Err(forget) = ledger.forget(ip, &plan.ifname) {
                    warn!(%ip, interface = %plan.ifname, error = %forget, "could not drop ledger entry of a failed claim");
                }
                return Err(e);
            }
        };
        Ok(Claim {
            interface: plan.ifname,
            prefix_len: plan.prefix_len,
            added,
        })
    }

    /// Sets `lifetime` on every address of `ledger` that is present on its
    /// interface now (an RTM_NEWADDR replace of each; one dump first, so
    /// that an address that expired or was removed is not re-created here:
    /// re-adding is a claim's business, with its announcement). Returns how
    /// many addresses it set.
    pub async fn refresh_lifetimes(
        &self,
        ledger: &ClaimLedger,
        lifetime: Lifetime,
    ) -> Result<usize> {
        if ledger.entries().is_empty() {
            return Ok(0);
        }
        let present: Vec<AddressMessage> = self.ipv4_address_messages(None).await?;
        let names: HashMap<String, u32> = self
            .links()
            .await?
            .into_iter()
            .map(|l| (l.name, l.index))
            .collect();
        let mut set = 0;
        for entry in ledger.entries() {
            let Some(&ifindex) = names.get(&entry.interface) else {
                continue;
            };
            let Some(msg) = present
                .iter()
                .find(|m| m.header.index == ifindex && ipv4_of(m) == Some(entry.ip))
            else {
                continue;
            };
            let mut req = self
                .handle
                .address()
                .add(ifindex, IpAddr::V4(entry.ip), msg.header.prefix_len)
                .replace();
            req.message_mut()
                .attributes
                .push(AddressAttribute::CacheInfo(lifetime.cache_info()));
            req.execute().await.map_err(|e| {
                Error::request(
                    format!(
                        "set the lifetime of {}/{} on {} to {lifetime:?}",
                        entry.ip, msg.header.prefix_len, entry.interface
                    ),
                    e,
                )
            })?;
            set += 1;
        }
        Ok(set)
    }

    /// Removes `ip` from every interface the ledger says the agent put it
    /// on, and forgets those entries. An address the ledger does not list
    /// is never touched. Returns the interfaces it was actually removed from.
    pub async fn release_tracked(
        &self,
        ledger: &mut ClaimLedger,
        ip: Ipv4Addr,
    ) -> Result<Vec<String>> {
        let mut released = self.release_all_tracked(ledger, &[ip]).await?;
        Ok(released.pop().map(|(_, from)| from).unwrap_or_default())
    }

    /// [`Netlink::release_tracked`] for many addresses against one dump of
    /// the addresses and with one write of the ledger (a dump and a write
    /// per address made releasing ten thousand quadratic). Returns, for each
    /// address the ledger listed, the interfaces it was removed from. On a
    /// failure, the entries of the addresses removed so far are forgotten
    /// before the error is returned.
    pub async fn release_all_tracked(
        &self,
        ledger: &mut ClaimLedger,
        ips: &[Ipv4Addr],
    ) -> Result<Vec<(Ipv4Addr, Vec<String>)>> {
        let wanted: HashSet<Ipv4Addr> = ips.iter().copied().collect();
        let ours: Vec<LedgerEntry> = ledger
            .entries()
            .iter()
            .filter(|e| wanted.contains(&e.ip))
            .cloned()
            .collect();
        if ours.is_empty() {
            return Ok(Vec::new());
        }
        let indexes: HashMap<String, u32> = self
            .links()
            .await?
            .into_iter()
            .map(|l| (l.name, l.index))
            .collect();
        let mut present: HashMap<(u32, Ipv4Addr), Vec<AddressMessage>> = HashMap::new();
        for msg in self.ipv4_address_messages(None).await? {
            if let Some(ip) = ipv4_of(&msg) {
                present.entry((msg.header.index, ip)).or_default().push(msg);
            }
        }
        let mut released: Vec<(Ipv4Addr, Vec<String>)> = Vec::new();
        let mut forget: Vec<(Ipv4Addr, &str)> = Vec::with_capacity(ours.len());
        let mut failure = None;
        'entries: for entry in &ours {
            let (ip, interface) = (entry.ip, entry.interface.as_str());
            // An interface that is gone took its addresses with it.
            let msgs = indexes
                .get(interface)
                .and_then(|index| present.remove(&(*index, ip)))
                .unwrap_or_default();
            let mut removed = false;
            for msg in msgs {
                match self.delete_address(msg, ip, interface).await {
                    Ok(gone) => removed |= gone,
                    Err(e) => {
                        failure = Some(e);
                        break 'entries;
                    }
                }
            }
            forget.push((ip, interface));
            match released.last_mut() {
                Some((last, from)) if *last == ip => {
                    if removed {
                        from.push(interface.to_owned());
                    }
                }
                _ => released.push((
                    ip,
                    if removed {
                        vec![interface.to_owned()]
                    } else {
                        Vec::new()
                    },
                )),
            }
        }
        let forgotten = ledger.forget_all(&forget);
        if let Some(e) = failure {
            if let Err(forget) = forgotten {
                warn!(error = %forget, "could not drop the ledger entries of released addresses");
            }
            return Err(e);
        }
        forgotten?;
        Ok(released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(ifindex: u32, ifname: &str, addr: &str) -> InterfaceAddress {
        InterfaceAddress {
            ifindex,
            ifname: ifname.into(),
            addr: addr.parse().unwrap(),
        }
    }

    fn link(index: u32, name: &str) -> Link {
        Link {
            name: name.into(),
            index,
            mtu: 1500,
            up: true,
            kind: None,
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn host() -> Vec<InterfaceAddress> {
        vec![
            a(1, "lo", "127.0.0.1/8"),
            a(2, "eth0", "172.18.0.11/16"),
            a(3, "eth1", "192.168.7.2/24"),
        ]
    }

    #[test]
    fn picks_the_interface_whose_subnet_holds_the_ip() {
        let p = plan_claim(ip("192.168.7.50"), None, &host()).unwrap();
        assert_eq!(
            (p.ifindex, p.ifname.as_str(), p.prefix_len),
            (3, "eth1", 24)
        );
        assert!(!p.present);
        let p = plan_claim(ip("172.18.0.100"), None, &host()).unwrap();
        assert_eq!((p.ifname.as_str(), p.prefix_len), ("eth0", 16));
    }

    #[test]
    fn most_specific_subnet_wins_and_ties_are_ambiguous() {
        let mut addrs = host();
        addrs.push(a(4, "eth2", "172.18.5.1/24"));
        let p = plan_claim(ip("172.18.5.9"), None, &addrs).unwrap();
        assert_eq!((p.ifname.as_str(), p.prefix_len), ("eth2", 24));

        addrs.push(a(5, "eth3", "172.18.5.2/24"));
        let err = plan_claim(ip("172.18.5.9"), None, &addrs).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::AmbiguousSubnet { .. }), "{msg}");
        assert!(
            msg.contains("eth2 172.18.5.1/24") && msg.contains("eth3 172.18.5.2/24"),
            "{msg}"
        );

        // Two addresses of one interface in the same subnet are no ambiguity.
        let mut same = host();
        same.push(a(3, "eth1", "192.168.7.3/24"));
        assert_eq!(
            plan_claim(ip("192.168.7.9"), None, &same).unwrap().ifname,
            "eth1"
        );
    }

    #[test]
    fn no_subnet_lists_candidates() {
        let err = plan_claim(ip("10.9.9.9"), None, &host()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::NoSubnetFor { .. }), "{msg}");
        assert!(
            msg.contains("10.9.9.9") && msg.contains("eth0 172.18.0.11/16"),
            "{msg}"
        );
    }

    #[test]
    fn present_address_is_idempotent_and_never_duplicated() {
        let mut addrs = host();
        addrs.push(a(2, "eth0", "172.18.0.100/16"));
        let p = plan_claim(ip("172.18.0.100"), None, &addrs).unwrap();
        assert!(p.present);
        assert_eq!(p.ifname, "eth0");
        let p = plan_claim(ip("172.18.0.100"), Some(&link(2, "eth0")), &addrs).unwrap();
        assert!(p.present);
        let err = plan_claim(ip("172.18.0.100"), Some(&link(3, "eth1")), &addrs).unwrap_err();
        assert!(matches!(err, Error::HeldElsewhere { .. }), "{err}");
        addrs.push(a(3, "eth1", "172.18.0.100/32"));
        let err = plan_claim(ip("172.18.0.100"), None, &addrs).unwrap_err();
        assert!(matches!(err, Error::HeldByMany { .. }), "{err}");
    }

    #[test]
    fn override_uses_its_subnet_or_a_host_route() {
        let p = plan_claim(ip("172.18.0.100"), Some(&link(3, "eth1")), &host()).unwrap();
        assert_eq!((p.ifname.as_str(), p.prefix_len), ("eth1", 32));
        let p = plan_claim(ip("192.168.7.77"), Some(&link(3, "eth1")), &host()).unwrap();
        assert_eq!(p.prefix_len, 24);
        // An interface without any IPv4 address is a valid override target.
        let p = plan_claim(ip("10.1.1.1"), Some(&link(9, "dummy0")), &host()).unwrap();
        assert_eq!((p.ifindex, p.prefix_len), (9, 32));
    }

    #[test]
    fn network_and_broadcast_addresses_are_refused() {
        for bad in ["192.168.7.0", "192.168.7.255"] {
            let err = plan_claim(ip(bad), None, &host()).unwrap_err();
            assert!(matches!(err, Error::UnusableAddress { .. }), "{bad}: {err}");
        }
    }
}
