//! The running agent's hold on this node: the datapath it loaded, its maps,
//! the interfaces, addresses and claims it follows, and how it comes up
//! ([`Agent::bring_up`]). What it does with them is spread by concern:
//! [`crate::reconcile`] (desired state to maps), [`crate::pod_links`]
//! (attaching to pod interfaces, holds on new ones), [`crate::claims`]
//! (egress IPs, fences, gratuitous ARP). [`crate::run`] drives it from a
//! desired-state source ([`crate::source`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::Path,
    time::Instant,
};

use anyhow::Context as _;
use egress_common::VXLAN_OVERHEAD;
use egress_config::{AgentConfig, NodeConfig};
use egress_model::NodeState;
use egress_netlink::{AddressEvents, ClaimLedger, Lifetime, LinkEvents, Netlink, RouteEvents};
use tokio::sync::watch;

use crate::{
    gc,
    hold::Holds,
    host::{self, PodInterfaces},
    image::Environment,
    loader::{self, Datapath},
    maps::{Maps, PinLayout},
    reset::{LEDGER_FILE, TUNNEL_FILE, state_dir_of},
};

/// IPv4 (20) + TCP (20) headers between the MTU and the MSS.
pub(crate) const IP_TCP_HEADERS: u32 = 40;

pub struct Agent {
    /// The `[node]` section: interfaces and this node's address.
    pub(crate) node: NodeConfig,
    pub(crate) layout: PinLayout,
    pub(crate) netlink: Netlink,
    pub(crate) datapath: Datapath,
    pub(crate) maps: Maps,
    pub(crate) env: Environment,
    pub(crate) uplink: String,
    pub(crate) tunnel: String,
    /// Interfaces carrying pod_ingress and pod_egress, by name -> ifindex.
    pub(crate) attached: BTreeMap<String, u32>,
    /// Host-side interfaces of the local selected pods.
    pub(crate) pod_interfaces: PodInterfaces,
    /// This node's own addresses (all interfaces, loopback's 127/8 aside),
    /// followed through address notifications: global exclusions.
    pub(crate) local_addrs: BTreeSet<Ipv4Addr>,
    /// The desired state last applied, reconciled again when the node's
    /// interfaces, routes or addresses change.
    pub(crate) desired: Option<NodeState>,
    pub(crate) ledger: ClaimLedger,
    pub(crate) collector: gc::Background,
    /// The lifetime new claims get: that of the latest fence.
    pub(crate) lifetime: Lifetime,
    /// Until when the claims are valid, as it moves (Kubernetes mode):
    /// gratuitous ARP bursts announce only while it is ahead. `None`: claims
    /// are not fenced (static mode).
    pub(crate) claim_validity: Option<watch::Receiver<Option<Instant>>>,
    /// Gratuitous ARP bursts under way, aborted when their IP is released.
    pub(crate) announcing: BTreeMap<Ipv4Addr, tokio::task::AbortHandle>,
    /// Holds on new pod interfaces (Kubernetes mode).
    pub(crate) holds: Holds,
    /// Whether interfaces that appear from now on are new pods' (false
    /// during the start-up listing: those are running pods).
    pub(crate) hold_new: bool,
}

/// The node's notifications the agent follows.
pub struct HostEvents {
    pub links: LinkEvents,
    /// `None` once they ended (logged; the loop goes on without them).
    pub addresses: Option<AddressEvents>,
    pub routes: RouteEvents,
}

/// What the previous agent's claim-validity stamp is worth at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinnedFence {
    /// It stands until the source says otherwise: a restart never extends
    /// (nor cuts) a claim (Kubernetes mode).
    Keep,
    /// Claims are not fenced: the settings' stamp applies (static mode).
    Unfenced,
}

impl Agent {
    /// Sets up the uplink and tunnel, loads (or takes over) the datapath,
    /// opens the claim ledger, starts the collector and subscribes to the
    /// node's notifications. Nothing is attached nor programmed yet.
    /// `config.node.address` is this node's address as chosen.
    pub async fn bring_up(
        config: &AgentConfig,
        netlink: Netlink,
        state_dir: &Path,
        pinned_fence: PinnedFence,
    ) -> anyhow::Result<(Agent, HostEvents)> {
        let layout = PinLayout::for_instance(&config.instance);
        let uplink_name = match (&config.node.uplink, config.node.address) {
            (Some(name), _) => name.clone(),
            (None, Some(address)) => {
                let holder = netlink
                    .ipv4_addresses()
                    .await?
                    .into_iter()
                    .find(|a| a.addr.addr() == address);
                let holder = holder.with_context(|| {
                    format!(
                        "node.uplink: not set, and no interface holds the node address {address}"
                    )
                })?;
                tracing::info!(uplink = %holder.ifname, %address, "uplink: the interface holding the node address");
                holder.ifname
            }
            (None, None) => anyhow::bail!(
                "node.uplink: not set, and no node address to find it by (set NODE_IP or node.uplink)"
            ),
        };
        let uplink = netlink
            .link_by_name(&uplink_name)
            .await?
            .with_context(|| format!("node.uplink: interface {uplink_name:?} does not exist"))?;
        let tunnel = netlink
            .ensure_vxlan(&config.node.tunnel_interface, config.node.tunnel_port, None)
            .await
            .with_context(|| format!("node.tunnel_interface {:?}", config.node.tunnel_interface))?;
        let tunnel_mtu = uplink.mtu.saturating_sub(u32::from(VXLAN_OVERHEAD));
        let mut env = Environment::new(
            &config.datapath,
            tunnel.index,
            tunnel_mtu
                .saturating_sub(IP_TCP_HEADERS)
                .min(u32::from(u16::MAX)) as u16,
            config.node.tunnel_port,
        );
        tracing::info!(uplink = %uplink.name, uplink_mtu = uplink.mtu, tunnel = %tunnel.name, tunnel_mss = env.tunnel_mss, "interfaces");

        loader::ensure_bpffs()?;
        let datapath = Datapath::load(&layout, &config.datapath)?;
        let maps = Maps::open(&layout)?;
        if pinned_fence == PinnedFence::Keep {
            env.claims_valid_until_ns = maps.read_image()?.config.claims_valid_until_ns;
        }
        let state_dir = state_dir_of(state_dir, &config.instance);
        std::fs::create_dir_all(&state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let tunnel_file = state_dir.join(TUNNEL_FILE);
        std::fs::write(&tunnel_file, &tunnel.name)
            .with_context(|| format!("writing {}", tunnel_file.display()))?;
        let ledger = ClaimLedger::open(state_dir.join(LEDGER_FILE))?;
        let collector = gc::Background::start(
            &layout,
            config.datapath.timeouts.clone(),
            config.datapath.gc_interval,
        )?;
        // Subscribed before the first listing, so that no interface or address
        // falls in between.
        let links = netlink
            .link_events()
            .context("subscribing to link notifications")?;
        // Every address of the node is a global exclusion (and, in Kubernetes
        // mode, may change the egress subnets); routes lead to the pods'
        // interfaces.
        let addresses = Some(
            netlink
                .address_events()
                .context("subscribing to address notifications")?,
        );
        let routes = netlink
            .route_events()
            .context("subscribing to route notifications")?;
        let local_addrs = host::local_addresses(&netlink).await?;

        let agent = Agent {
            node: config.node.clone(),
            layout,
            netlink,
            datapath,
            maps,
            env,
            uplink: uplink.name.clone(),
            tunnel: tunnel.name.clone(),
            attached: BTreeMap::new(),
            pod_interfaces: PodInterfaces::default(),
            local_addrs,
            desired: None,
            ledger,
            collector,
            lifetime: Lifetime::Forever,
            claim_validity: None,
            announcing: BTreeMap::new(),
            holds: Holds::default(),
            hold_new: false,
        };
        Ok((
            agent,
            HostEvents {
                links,
                addresses,
                routes,
            },
        ))
    }

    /// Attaches uplink_ingress and tunnel_ingress: from now on replies and
    /// steered traffic are translated.
    pub fn attach_uplink_and_tunnel(&mut self) -> anyhow::Result<()> {
        use egress_common::maps::programs;
        self.datapath
            .attach(programs::UPLINK_INGRESS, &self.uplink)?;
        self.datapath
            .attach(programs::TUNNEL_INGRESS, &self.tunnel)?;
        Ok(())
    }
}
