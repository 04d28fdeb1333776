//! The egress IPs this node holds: put on the interface whose subnet
//! contains them (recorded in the claim ledger, so that only what the agent
//! added is ever removed), announced with gratuitous ARP, released when no
//! longer claimed; and the fence's terms applied to them and to the
//! datapath's claim-validity stamp.

use std::{collections::BTreeSet, net::Ipv4Addr, time::Instant};

use anyhow::Context as _;
use egress_model::AddressClaim;

use crate::{agent::Agent, fence::Terms, gc::monotonic_ns};

impl Agent {
    /// Puts the egress IPs this node holds on the interface whose subnet
    /// contains them (or the one the claim names), announces new ones with
    /// gratuitous ARP, and removes those it added but no longer holds.
    pub async fn claim(&mut self, claims: &[AddressClaim]) -> anyhow::Result<()> {
        let wanted: BTreeSet<Ipv4Addr> = claims.iter().map(|c| c.ip).collect();
        let requests: Vec<(Ipv4Addr, Option<String>)> =
            claims.iter().map(|c| (c.ip, c.interface.clone())).collect();
        let done = self
            .netlink
            .claim_all_tracked_for(&mut self.ledger, &requests, self.lifetime)
            .await
            .context("claiming egress IPs")?;
        for (c, claim) in claims.iter().zip(done) {
            if claim.added {
                tracing::info!(ip = %c.ip, interface = %claim.interface, prefix = claim.prefix_len, "egress IP claimed");
                let fence = self.claim_validity.clone();
                if let Some(old) = self
                    .announcing
                    .insert(c.ip, announce(claim.interface, c.ip, fence))
                {
                    old.abort();
                }
            }
        }
        let stale: BTreeSet<Ipv4Addr> = self
            .ledger
            .entries()
            .iter()
            .map(|e| e.ip)
            .filter(|ip| !wanted.contains(ip))
            .collect();
        self.announcing.retain(|ip, burst| {
            // A released IP is announced no more; a finished burst is forgotten.
            if !wanted.contains(ip) {
                burst.abort();
            }
            wanted.contains(ip) && !burst.is_finished()
        });
        let stale: Vec<Ipv4Addr> = stale.into_iter().collect();
        for (ip, from) in self
            .netlink
            .release_all_tracked(&mut self.ledger, &stale)
            .await?
        {
            tracing::info!(%ip, interfaces = ?from, "egress IP released");
        }
        Ok(())
    }

    /// Which of the claimed or recorded egress IPs are on our interfaces now.
    pub async fn held_addresses(&self, claims: &[AddressClaim]) -> BTreeSet<Ipv4Addr> {
        let ours: BTreeSet<Ipv4Addr> = claims
            .iter()
            .map(|c| c.ip)
            .chain(self.ledger.entries().iter().map(|e| e.ip))
            .collect();
        match self.netlink.ipv4_addresses().await {
            Ok(addresses) => addresses
                .into_iter()
                .map(|a| a.addr.addr())
                .filter(|ip| ours.contains(ip))
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "listing addresses");
                ours
            }
        }
    }

    /// Applies `terms`; how many claimed addresses got the new lifetime
    /// (`None` when none was to be set, or on error).
    pub async fn apply_terms(&mut self, terms: Terms) -> Option<usize> {
        if terms.valid_until_ns != self.env.claims_valid_until_ns {
            // Shrinking or growing, it is the controller's latest word:
            // written at once, and remembered so that reconciling writes
            // the same value.
            match self.maps.set_claims_valid_until(terms.valid_until_ns) {
                Ok(()) => self.env.claims_valid_until_ns = terms.valid_until_ns,
                Err(e) => tracing::error!(error = %e, "writing the claim-validity stamp"),
            }
        }
        let lifetime = terms.lifetime?;
        self.lifetime = lifetime;
        match self.netlink.refresh_lifetimes(&self.ledger, lifetime).await {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::error!(error = %e, "refreshing the egress IPs' lifetimes");
                None
            }
        }
    }

    /// Applies a fence of the controller's (`None`: the node holds
    /// nothing): the datapath's claim-validity stamp (one map write) and
    /// the lifetime of the claimed addresses.
    ///
    /// True when the fence is still ahead but a claimed address is missing:
    /// the kernel removed it as its lifetime ended before a late renewal
    /// (see the Kubernetes source's restore).
    pub async fn apply_fence(&mut self, fence: Option<Instant>) -> bool {
        let remaining = fence.map(|f| f.saturating_duration_since(Instant::now()));
        let refreshed = self.apply_terms(Terms::of(remaining, monotonic_ns())).await;
        remaining.is_some_and(|r| !r.is_zero())
            && refreshed.is_some_and(|n| n < self.ledger.entries().len())
    }

    /// The egress IPs this agent added to the node's interfaces.
    pub fn egress_ips(&self) -> BTreeSet<Ipv4Addr> {
        self.ledger.entries().iter().map(|e| e.ip).collect()
    }
}

/// Announces `ip` on `interface` with a burst of gratuitous ARP, in the
/// background: the burst lasts seconds and must not hold up reconciling.
/// Bursts run at most `MAX_ANNOUNCING` at a time, each with its own socket,
/// so that claiming thousands of IPs at once cannot exhaust descriptors.
/// In Kubernetes mode each round is sent only while `fence` (the claim's
/// validity) is in the future: a burst must not announce an IP the node
/// may no longer hold (found by `cargo xtask chaos`: an agent resumed
/// after SIGSTOP sent the rest of its burst before it noticed that its
/// claim had lapsed, and a released IP was still announced).
fn announce(
    interface: String,
    ip: Ipv4Addr,
    fence: Option<tokio::sync::watch::Receiver<Option<Instant>>>,
) -> tokio::task::AbortHandle {
    const MAX_ANNOUNCING: usize = 64;
    static SLOTS: std::sync::OnceLock<std::sync::Arc<tokio::sync::Semaphore>> =
        std::sync::OnceLock::new();
    let slots = SLOTS
        .get_or_init(|| std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_ANNOUNCING)))
        .clone();
    tokio::spawn(async move {
        let Ok(_slot) = slots.acquire_owned().await else {
            return;
        };
        let config = egress_arp::GarpConfig::default();
        let valid = || {
            fence
                .as_ref()
                .is_none_or(|f| f.borrow().is_some_and(|until| until > Instant::now()))
        };
        match egress_arp::announce_while(&interface, ip, &config, valid).await {
            Ok(()) => tracing::debug!(%ip, %interface, "gratuitous ARP sent"),
            Err(e) => tracing::warn!(%ip, %interface, error = %e, "gratuitous ARP failed"),
        }
    })
    .abort_handle()
}
