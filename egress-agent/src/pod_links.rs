//! Pod interfaces: pod_ingress and pod_egress attached to every interface
//! matching `pod_interfaces` or `upstream_interfaces` as it appears
//! (link notifications, a full listing at start and after lost
//! notifications), detached when it goes; in Kubernetes mode a new pod's
//! interface is held until its Pod reaches the agent ([`crate::hold`]).

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context as _;
use egress_common::maps::programs;
use egress_config::interface_matches;
use egress_netlink::{Link, LinkEvent};

use crate::{agent::Agent, gc::monotonic_ns, hold::Holds, loader};

impl Agent {
    pub fn pod_interface_patterns(&self) -> Vec<String> {
        let node = &self.node;
        node.pod_interfaces
            .iter()
            .chain(&node.upstream_interfaces)
            .cloned()
            .collect()
    }

    /// Follows one link notification: attach pod_ingress to a new matching
    /// interface at once, forget one that is gone, re-list after a loss.
    pub async fn on_link_event(&mut self, event: LinkEvent) -> anyhow::Result<()> {
        match event {
            LinkEvent::Added(link) => self.pod_link_added(&link),
            LinkEvent::Removed { name, index } => {
                if self.attached.get(&name) == Some(&index) {
                    self.pod_link_gone(&name)?;
                }
                Ok(())
            }
            LinkEvent::Overrun => self.sync_pod_interfaces().await,
        }
    }

    pub fn pod_link_added(&mut self, link: &Link) -> anyhow::Result<()> {
        // A renamed interface: the old name's pin goes.
        let renamed: Vec<String> = self
            .attached
            .iter()
            .filter(|(n, i)| **i == link.index && **n != link.name)
            .map(|(n, _)| n.clone())
            .collect();
        for name in renamed {
            self.pod_link_gone(&name)?;
        }
        if !interface_matches(&self.pod_interface_patterns(), &link.name)
            || self.attached.get(&link.name) == Some(&link.index)
        {
            return Ok(());
        }
        self.attach_pod_interface(&link.name, link.index)
    }

    /// Attaches pod_ingress to `name`, held first when it is a new pod's.
    pub fn attach_pod_interface(&mut self, name: &str, index: u32) -> anyhow::Result<()> {
        if self.hold_new && interface_matches(&self.node.pod_interfaces, name) {
            self.hold(name, index)?;
        }
        self.datapath.attach(programs::POD_INGRESS, name)?;
        self.datapath.attach(programs::POD_EGRESS, name)?;
        tracing::info!(interface = %name, "pod_ingress and pod_egress attached");
        self.attached.insert(name.to_string(), index);
        self.pod_interfaces.invalidate();
        Ok(())
    }

    /// Holds a new pod interface before pod_ingress sees its first packet.
    pub fn hold(&mut self, name: &str, index: u32) -> anyhow::Result<()> {
        if let Some(until) = self.holds.place(index, name, monotonic_ns()) {
            self.maps
                .hold_interface(index, until)
                .with_context(|| format!("holding new pod interface {name}"))?;
            tracing::debug!(interface = %name, "new pod interface held until its Pod is known");
        }
        Ok(())
    }

    pub fn pod_link_gone(&mut self, name: &str) -> anyhow::Result<()> {
        loader::detach(&self.layout, programs::POD_INGRESS, name)?;
        loader::detach(&self.layout, programs::POD_EGRESS, name)?;
        if let Some(index) = self.attached.remove(name)
            && self.holds.forget(index)
        {
            self.maps.release_interface(index)?;
        }
        self.pod_interfaces.invalidate();
        tracing::info!(interface = %name, "pod interface gone");
        Ok(())
    }

    /// From now on new pod interfaces are held for `hold` (Kubernetes mode,
    /// unless `new_pod_hold_ms` is 0); holds a previous run left are adopted
    /// or removed.
    pub fn start_holding(&mut self, hold: Duration) -> anyhow::Result<()> {
        self.holds = Holds::new(Some(hold));
        let present: BTreeMap<u32, String> = self
            .attached
            .iter()
            .map(|(name, index)| (*index, name.clone()))
            .collect();
        let pinned = self.maps.held_interfaces()?;
        for stale in self.holds.adopt(&pinned, &present, monotonic_ns()) {
            self.maps.release_interface(stale)?;
        }
        self.hold_new = self.holds.enabled();
        Ok(())
    }

    /// Removes the entries of holds that have ended (the datapath already
    /// ignores them).
    pub fn end_lapsed_holds(&mut self) {
        for (index, name) in self.holds.lapsed(monotonic_ns()) {
            match self.maps.release_interface(index) {
                Ok(()) => tracing::debug!(interface = %name, "hold on new pod interface ended"),
                Err(e) => tracing::warn!(interface = %name, error = %e, "removing an ended hold"),
            }
        }
    }

    /// Attaches pod_ingress and pod_egress to new interfaces matching the
    /// patterns and forgets links of interfaces that disappeared.
    pub async fn sync_pod_interfaces(&mut self) -> anyhow::Result<()> {
        let patterns = self.pod_interface_patterns();
        let links = self.netlink.links().await?;
        let present: BTreeMap<String, u32> = links
            .into_iter()
            .filter(|l| interface_matches(&patterns, &l.name))
            .map(|l| (l.name, l.index))
            .collect();
        for (name, index) in &present {
            if self.attached.get(name) != Some(index) {
                self.attach_pod_interface(name, *index)?;
            }
        }
        let gone: Vec<String> = self
            .attached
            .keys()
            .filter(|n| !present.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            self.pod_link_gone(&name)?;
        }
        Ok(())
    }
}
