//! `egress-agent run`: bring the datapath up, keep it equal to the desired
//! state, attach to pod interfaces as they appear, keep the claimed
//! addresses and the datapath within the claim's fence, and on SIGTERM
//! leave everything in place for the next agent (only `egress-agent reset`
//! removes it).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use egress_common::{VXLAN_OVERHEAD, maps::programs};
use egress_config::{AgentConfig, Mode, interface_matches};
use egress_k8s::{AgentLink, facts::EgressSubnet};
use egress_model::{AddressClaim, NodeState};
use egress_netlink::{
    AddressEvent, AddressEvents, ClaimLedger, InterfaceAddress, Lifetime, Link, LinkEvent, Netlink,
    RouteEvent,
};
use futures_util::StreamExt as _;
use ipnet::Ipv4Net;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    fence::{ControllerFence, Terms},
    gc::{self, monotonic_ns},
    hold::Holds,
    host::{self, HostFacts, Interfaces, PodInterfaces},
    identity::{self, Candidate, Source},
    image::{DatapathImage, Environment},
    loader::{self, Datapath},
    maps::{ApplyOutcome, Maps, PinLayout},
};

pub struct Options {
    pub config: PathBuf,
    pub ready_file: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// Take policies and nodes from the Kubernetes API instead of the file.
    pub kubernetes: Option<KubeOptions>,
}

/// Node identity in Kubernetes mode, where one file serves every node.
pub struct KubeOptions {
    /// The Node object's name (the downward API's `spec.nodeName`).
    pub node_name: Option<String>,
    /// This node's address (the downward API's `status.hostIP`).
    pub node_address: Option<Ipv4Addr>,
}

/// IPv4 (20) + TCP (20) headers between the MTU and the MSS.
const IP_TCP_HEADERS: u32 = 40;
/// How often ended holds on new pod interfaces are removed from the map:
/// housekeeping only, the datapath ignores an ended hold by itself.
const HOLD_SWEEP: Duration = Duration::from_secs(1);

struct Agent {
    config: AgentConfig,
    config_mtime: Option<SystemTime>,
    options: Options,
    layout: PinLayout,
    netlink: Netlink,
    datapath: Datapath,
    maps: Maps,
    env: Environment,
    uplink: String,
    tunnel: String,
    /// Interfaces carrying pod_ingress and pod_egress, by name -> ifindex.
    attached: BTreeMap<String, u32>,
    /// Host-side interfaces of the local selected pods.
    pod_interfaces: PodInterfaces,
    /// This node's own addresses (all interfaces, loopback's 127/8 aside),
    /// followed through address notifications: global exclusions.
    local_addrs: BTreeSet<Ipv4Addr>,
    /// The desired state last applied, reconciled again when the node's
    /// interfaces, routes or addresses change.
    desired: Option<NodeState>,
    ledger: ClaimLedger,
    collector: gc::Background,
    /// The lifetime new claims get: that of the latest fence.
    lifetime: Lifetime,
    /// Kubernetes mode: the controller's desired state and our reports.
    kube: Option<AgentLink>,
    /// Gratuitous ARP bursts under way, aborted when their IP is released.
    announcing: BTreeMap<Ipv4Addr, tokio::task::AbortHandle>,
    /// Whether the controller has sent a fence yet (none applied before).
    fence: ControllerFence,
    /// Holds on new pod interfaces (Kubernetes mode).
    holds: Holds,
    /// Whether interfaces that appear from now on are new pods' (false
    /// during the start-up listing: those are running pods).
    hold_new: bool,
}

/// Where an instance keeps what `egress-agent reset` needs besides the pins.
pub fn state_dir_of(state_dir: &std::path::Path, instance: &str) -> PathBuf {
    state_dir.join(instance)
}

/// The file naming the tunnel device the agent set up (for reset).
const TUNNEL_FILE: &str = "tunnel-interface";
const LEDGER_FILE: &str = "claims.json";

pub async fn run(options: Options) -> anyhow::Result<()> {
    // Everything that can be wrong with the file is found before anything is touched.
    let mode = if options.kubernetes.is_some() {
        Mode::Kubernetes
    } else {
        Mode::Static
    };
    let mut config = AgentConfig::load_for(&options.config, mode)?;
    if let Some(k) = &options.kubernetes {
        if let Some(name) = &k.node_name {
            config.node.name.clone_from(name);
        }
        if k.node_address.is_some() {
            config.node.address = k.node_address;
        }
        if config.node.name.is_empty() {
            bail!(
                "node.name: not set; set NODE_NAME (the DaemonSet does), --node-name or node.name"
            );
        }
    }
    // A ready file left by the previous agent (it lives on the host) must
    // not pass this one's startup probe before it has applied anything.
    if let Some(ready) = &options.ready_file {
        match std::fs::remove_file(ready) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", ready.display())),
        }
    }
    let config_mtime = std::fs::metadata(&options.config)
        .and_then(|m| m.modified())
        .ok();
    let layout = PinLayout::for_instance(&config.instance);
    tracing::info!(instance = %config.instance, node = %config.node.name, address = ?config.node.address, "starting");

    let netlink = Netlink::connect().context("opening rtnetlink")?;
    if mode == Mode::Kubernetes {
        let choice = node_address(&netlink, &config.node.name, config.node.address).await?;
        tracing::info!(address = %choice.addr, source = %choice.source, passed_over = ?choice.passed_over, "node address");
        config.node.address = Some(choice.addr);
    }
    let uplink_name = match (&config.node.uplink, config.node.address) {
        (Some(name), _) => name.clone(),
        (None, Some(address)) => {
            let holder = netlink
                .ipv4_addresses()
                .await?
                .into_iter()
                .find(|a| a.addr.addr() == address);
            let holder = holder.with_context(|| {
                format!("node.uplink: not set, and no interface holds the node address {address}")
            })?;
            tracing::info!(uplink = %holder.ifname, %address, "uplink: the interface holding the node address");
            holder.ifname
        }
        (None, None) => bail!(
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
    let env = Environment::new(
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
    let mut env = env;
    if mode == Mode::Kubernetes {
        // Until the controller says otherwise, the previous agent's last
        // fence stands: a restart never extends (nor cuts) a claim.
        env.claims_valid_until_ns = maps.read_image()?.config.claims_valid_until_ns;
    }
    let state_dir = state_dir_of(&options.state_dir, &config.instance);
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
    let mut link_events = netlink
        .link_events()
        .context("subscribing to link notifications")?;
    // Every address of the node is a global exclusion (and, in Kubernetes
    // mode, may change the egress subnets); routes lead to the pods'
    // interfaces.
    let mut address_events = Some(
        netlink
            .address_events()
            .context("subscribing to address notifications")?,
    );
    let mut route_events = netlink
        .route_events()
        .context("subscribing to route notifications")?;
    let local_addrs = host::local_addresses(&netlink).await?;

    let mut agent = Agent {
        config,
        config_mtime,
        options,
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
        kube: None,
        announcing: BTreeMap::new(),
        fence: ControllerFence::default(),
        holds: Holds::default(),
        hold_new: false,
    };
    let mut controller = None;
    // The pod interfaces first: resolving pods needs to know them. A
    // previous agent's links get the new programs, whose pod entries the
    // reconcile below (or, in Kubernetes mode, `reconcile_settings`) fills.
    agent.sync_pod_interfaces().await?;
    if mode == Mode::Kubernetes {
        // Interfaces from now on are new pods'.
        agent.start_holding()?;
    }
    let desired = match mode {
        Mode::Static => {
            let desired = agent.config.node_state();
            agent
                .apply(&desired, &static_claims(&desired))
                .await?
                .all_applied()?;
            desired
        }
        Mode::Kubernetes => {
            // Until the watches have synced nothing is programmed or announced:
            // the pinned state of a previous run stays as it is. Only this
            // node's own settings (tunnel device, port range) are refreshed.
            agent.reconcile_settings().await?;
            let (task, link) = agent.start_controller().await?;
            controller = Some(task);
            agent.kube = Some(link);
            NodeState::default()
        }
    };
    agent
        .datapath
        .attach(programs::UPLINK_INGRESS, &agent.uplink)?;
    agent
        .datapath
        .attach(programs::TUNNEL_INGRESS, &agent.tunnel)?;
    agent.check_mtu(&desired).await;
    // In Kubernetes mode the agent is ready once it has applied the state of
    // the synced watches, not before (the DaemonSet's startup probe).
    let mut ready_pending = true;
    // Kubernetes mode: the last apply left policies unprogrammed; retried
    // every second, and the agent is not ready until none is.
    let mut apply_incomplete = false;
    if mode == Mode::Static {
        agent.mark_ready()?;
        ready_pending = false;
    }

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    // The static file is re-read when it changes (its mtime, once a second).
    let mut reload = tokio::time::interval(Duration::from_secs(1));
    // A Kubernetes-mode apply that left policies unprogrammed is retried.
    let mut retry = tokio::time::interval(Duration::from_secs(1));
    // Ended holds on new pod interfaces leave the map.
    let mut hold_sweep = tokio::time::interval(HOLD_SWEEP);
    // Pods whose interface is still unknown are looked up again every
    // second, and only those: behind a bridge a pod's port shows up in the
    // forwarding database when it sends its first frame, which no route or
    // link notification announces. A resolved pod is looked up again only
    // when a route to it or an interface changes (never by polling: a bridge
    // learns a MAC wherever frames claiming it come from, and a periodic
    // look-up would let a pod forging its neighbour's MAC take over the
    // neighbour's identity).
    let mut retry_unresolved = tokio::time::interval(Duration::from_secs(1));
    // Set once SIGTERM asked the controller to stop (in Kubernetes mode).
    let mut stopping: Option<tokio::time::Instant> = None;
    let stop_timeout = agent.config.kubernetes.drain_timeout + Duration::from_secs(5);
    loop {
        let stop_deadline = stopping.map(|t| t + stop_timeout);
        tokio::select! {
            _ = sigterm.recv() => {
                if agent.begin_stop() { stopping.get_or_insert_with(tokio::time::Instant::now); } else { break }
            }
            _ = sigint.recv() => {
                if agent.begin_stop() { stopping.get_or_insert_with(tokio::time::Instant::now); } else { break }
            }
            event = link_events.next() => {
                let event = event.context("link notifications ended")?;
                if let Err(e) = agent.on_link_event(event).await {
                    tracing::error!(error = %format!("{e:#}"), "attaching to pod interfaces");
                }
                agent.follow_host().await;
            }
            event = next_address_event(&mut address_events) => {
                if mode == Mode::Kubernetes && agent.changes_subnets(&event) {
                    agent.refresh_subnets().await;
                }
                agent.on_address_event(&event).await;
            }
            event = route_events.next() => {
                let event = event.context("route notifications ended")?;
                agent.on_route_event(&event);
                agent.follow_host().await;
            }
            _ = retry_unresolved.tick() => {
                if agent.pod_interfaces.has_unresolved() {
                    agent.follow_host().await;
                }
            }
            _ = reload.tick(), if mode == Mode::Static => agent.reload_if_changed().await,
            _ = hold_sweep.tick(), if !agent.holds.is_empty() => agent.end_lapsed_holds(),
            _ = retry.tick(), if apply_incomplete => {
                apply_incomplete = !agent.apply_kubernetes().await;
                if ready_pending && !apply_incomplete {
                    agent.mark_ready()?;
                    ready_pending = false;
                }
            }
            _ = sleep_until(stop_deadline) => {
                tracing::warn!("the Kubernetes controller did not stop in time; exiting anyway");
                break;
            }
            event = from_controller(&mut agent.kube, &mut agent.fence) => match event {
                FromController::Fence => {
                    if agent.apply_fence().await {
                        agent.restore_addresses().await;
                    }
                }
                FromController::Desired => {
                    apply_incomplete = !agent.apply_kubernetes().await;
                    if ready_pending && !apply_incomplete {
                        agent.mark_ready()?;
                        ready_pending = false;
                    }
                }
            },
            outcome = finished(&mut controller) => {
                match outcome {
                    Ok(()) => tracing::info!("Kubernetes controller finished"),
                    Err(e) => tracing::error!(error = %e, "Kubernetes controller failed"),
                }
                if stopping.is_none() {
                    // What is programmed and claimed stays, fenced by the
                    // last renewal: it lapses by itself unless a new agent
                    // renews it.
                    agent.apply_fence().await;
                    anyhow::bail!("the Kubernetes controller stopped unexpectedly");
                }
                break;
            }
        }
    }
    agent.exit().await;
    Ok(())
}

/// Sleeps until `deadline`; forever without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The next address notification; never in static mode.
async fn next_address_event(events: &mut Option<AddressEvents>) -> AddressEvent {
    match events {
        Some(e) => match e.next().await {
            Some(ev) => ev,
            None => {
                tracing::error!(
                    "address notifications ended; egress subnets and local addresses are no longer followed"
                );
                *events = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

enum FromController {
    /// A new fence: applied on its own, at once (one map write and the
    /// addresses' lifetimes), without a reconcile.
    Fence,
    Desired,
}

/// Waits for the controller's next fence or desired state; never in static
/// mode, nor once the controller is gone (its last fence stands).
async fn from_controller(
    kube: &mut Option<AgentLink>,
    fence: &mut ControllerFence,
) -> FromController {
    let Some(link) = kube else {
        return std::future::pending().await;
    };
    let event = tokio::select! {
        biased;
        r = fence.changed(&mut link.fence) => r.map(|()| FromController::Fence),
        r = link.desired.changed() => r.map(|()| FromController::Desired),
    };
    match event {
        Ok(e) => e,
        // The controller dropped its end: it has stopped.
        Err(_) => std::future::pending().await,
    }
}

/// `egress-agent reset`: everything `run` leaves in place, removed. Each
/// step runs even if an earlier one found nothing; the first error is
/// returned after all were tried. Returns what was removed.
pub async fn reset(instance: &str, state_dir: &std::path::Path) -> anyhow::Result<String> {
    let layout = PinLayout::for_instance(instance);
    let mut done = Vec::new();
    let mut first_error: Option<anyhow::Error> = None;
    match loader::remove_all(&layout) {
        Ok(()) => done.push(format!("removed {}", layout.root.display())),
        Err(e) => first_error = Some(e.into()),
    }
    let dir = state_dir_of(state_dir, instance);
    let netlink = Netlink::connect().context("opening rtnetlink")?;
    let ledger_path = dir.join(LEDGER_FILE);
    let released = async {
        let mut ledger = ClaimLedger::open(&ledger_path)?;
        let ips: BTreeSet<Ipv4Addr> = ledger.entries().iter().map(|e| e.ip).collect();
        let mut released = Vec::new();
        for ip in ips {
            if !netlink.release_tracked(&mut ledger, ip).await?.is_empty() {
                released.push(ip);
            }
        }
        anyhow::Ok(released)
    }
    .await;
    match released {
        Ok(ips) if !ips.is_empty() => done.push(format!("released {ips:?}")),
        Ok(_) => {}
        Err(e) => {
            first_error.get_or_insert(e.context(format!(
                "releasing the addresses of {}",
                ledger_path.display()
            )));
        }
    }
    let tunnel_file = dir.join(TUNNEL_FILE);
    match std::fs::read_to_string(&tunnel_file) {
        Ok(tunnel) => match netlink.delete_link(tunnel.trim()).await {
            Ok(true) => done.push(format!("deleted {}", tunnel.trim())),
            Ok(false) => {}
            Err(e) => {
                first_error.get_or_insert(
                    anyhow::Error::from(e).context(format!("deleting {}", tunnel.trim())),
                );
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            first_error.get_or_insert(
                anyhow::Error::from(e).context(format!("reading {}", tunnel_file.display())),
            );
        }
    }
    if first_error.is_none() && dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        done.push(format!("removed {}", dir.display()));
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(done.join("; ")),
    }
}

/// This node's address: the explicit one if set (it must be local), else the
/// first local one of the Node object's, the host name's, and the
/// default-route interface's.
async fn node_address(
    netlink: &Netlink,
    node_name: &str,
    explicit: Option<Ipv4Addr>,
) -> anyhow::Result<identity::Choice> {
    let addresses = netlink.ipv4_addresses().await?;
    let local: Vec<Ipv4Addr> = addresses
        .iter()
        .map(|a| a.addr.addr())
        .filter(|a| !a.is_loopback())
        .collect();
    let mut candidates = vec![Candidate {
        source: Source::Explicit,
        found: explicit.ok_or_else(|| "not set".to_string()),
    }];
    if explicit.is_none() {
        candidates.push(Candidate {
            source: Source::NodeObject,
            found: node_object_address(node_name).await,
        });
        candidates.push(Candidate {
            source: Source::Hostname,
            found: hostname_address().await,
        });
        candidates.push(Candidate {
            source: Source::DefaultRoute,
            found: default_route_address(netlink, &addresses).await,
        });
    }
    Ok(identity::choose(&candidates, &local)?)
}

const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

async fn node_object_address(node_name: &str) -> Result<Ipv4Addr, String> {
    use k8s_openapi::api::core::v1::Node;
    let lookup = async {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| format!("no Kubernetes client: {e}"))?;
        let node = kube::Api::<Node>::all(client)
            .get(node_name)
            .await
            .map_err(|e| format!("reading Node {node_name:?}: {e}"))?;
        let addresses = node.status.and_then(|s| s.addresses).unwrap_or_default();
        ["InternalIP", "ExternalIP"]
            .iter()
            .find_map(|kind| {
                addresses
                    .iter()
                    .filter(|a| a.type_ == *kind)
                    .find_map(|a| a.address.parse().ok())
            })
            .ok_or_else(|| format!("Node {node_name:?} has no IPv4 InternalIP or ExternalIP"))
    };
    tokio::time::timeout(LOOKUP_TIMEOUT, lookup)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {LOOKUP_TIMEOUT:?}")))
}

async fn hostname_address() -> Result<Ipv4Addr, String> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_err(|e| format!("reading the host name: {e}"))?
        .trim()
        .to_string();
    let resolved =
        tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((host.as_str(), 0)))
            .await
            .map_err(|_| format!("{host:?}: no answer within {LOOKUP_TIMEOUT:?}"))?
            .map_err(|e| format!("{host:?} does not resolve: {e}"))?;
    resolved
        .filter_map(|a| match a.ip() {
            std::net::IpAddr::V4(v4) if !v4.is_loopback() => Some(v4),
            _ => None,
        })
        .next()
        .ok_or_else(|| format!("{host:?} resolves to no IPv4 address but loopback"))
}

async fn default_route_address(
    netlink: &Netlink,
    addresses: &[InterfaceAddress],
) -> Result<Ipv4Addr, String> {
    let ifindex = netlink
        .default_route_ifindex()
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "no IPv4 default route".to_string())?;
    addresses
        .iter()
        .find(|a| a.ifindex == ifindex)
        .map(|a| a.addr.addr())
        .ok_or_else(|| {
            format!("the default-route interface (ifindex {ifindex}) has no IPv4 address")
        })
}

/// The addresses a static configuration makes this node hold.
fn static_claims(desired: &NodeState) -> Vec<AddressClaim> {
    desired
        .claims()
        .into_iter()
        .map(|ip| AddressClaim {
            ip,
            interface: None,
        })
        .collect()
}

/// Waits for the controller task to end; never in static mode.
async fn finished(
    controller: &mut Option<tokio::task::JoinHandle<Result<(), egress_k8s::Error>>>,
) -> anyhow::Result<()> {
    match controller {
        Some(task) => {
            let outcome = task.await;
            *controller = None;
            Ok(outcome??)
        }
        None => std::future::pending().await,
    }
}

impl Agent {
    /// Makes the maps equal to the image of `desired` and of what this
    /// node's stack says (pod interfaces, local addresses).
    async fn reconcile(&mut self, desired: &NodeState) -> anyhow::Result<ApplyOutcome> {
        let host = self.host_facts(desired, false).await?;
        // Map dumps and writes are blocking system calls, thousands of them
        // at scale: off the runtime's worker, so the controller's renewals
        // keep running on the others meanwhile.
        let (maps, env) = (&mut self.maps, &self.env);
        let outcome = tokio::task::block_in_place(|| {
            let current = maps.read_image()?;
            let image = DatapathImage::from_state(desired, env, &host);
            maps.apply(&current, &image)
        })?;
        if !outcome.report.is_empty() {
            tracing::info!(
                written = outcome.report.written,
                removed = outcome.report.removed,
                "datapath maps reconciled"
            );
        }
        for (id, error) in &outcome.failed {
            tracing::error!(policy = id, %error, "policy not programmed (the others are)");
        }
        self.desired = Some(desired.clone());
        Ok(outcome)
    }

    /// The interfaces the datapath is attached to, pod-side and upstream.
    fn interfaces(&self) -> Interfaces {
        let upstream_patterns = &self.config.node.upstream_interfaces;
        let mut out = Interfaces::default();
        for (name, index) in &self.attached {
            if interface_matches(upstream_patterns, name) {
                out.upstream.insert(*index, name.clone());
            } else {
                out.pods.insert(*index, name.clone());
            }
        }
        out
    }

    /// Resolves the interfaces of `desired`'s local pods (all of them with
    /// `all`, else those not known yet).
    async fn host_facts(&mut self, desired: &NodeState, all: bool) -> anyhow::Result<HostFacts> {
        let interfaces = self.interfaces();
        let wanted: BTreeSet<Ipv4Addr> = desired.pods.keys().copied().collect();
        self.pod_interfaces
            .refresh(&self.netlink, &wanted, &interfaces, all)
            .await?;
        Ok(HostFacts {
            pod_interfaces: self.pod_interfaces.resolved().clone(),
            upstream: interfaces.upstream.keys().copied().collect(),
            local_addrs: self.local_addrs.clone(),
        })
    }

    /// Follows the node's stack between desired-state changes: looks up the
    /// pods whose interface is unknown (every pod after interfaces came or
    /// went, those within a changed route), and reconciles again when one
    /// changed.
    async fn follow_host(&mut self) {
        let Some(desired) = self.desired.clone() else {
            return;
        };
        let before = self.pod_interfaces.resolved().clone();
        let outcome = async {
            let host = self.host_facts(&desired, false).await?;
            if host.pod_interfaces != before {
                self.reconcile(&desired).await?;
            }
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = outcome {
            tracing::error!(error = %format!("{e:#}"), "following the pods' interfaces");
        }
    }

    /// A route to a resolved pod changed: look it up again.
    fn on_route_event(&mut self, event: &RouteEvent) {
        match event {
            RouteEvent::Changed { dst } => self.pod_interfaces.forget_within(dst),
            RouteEvent::Overrun => self.pod_interfaces.invalidate(),
        }
    }

    /// Keeps the node's addresses (global exclusions) current.
    async fn on_address_event(&mut self, event: &AddressEvent) {
        let mut addrs = self.local_addrs.clone();
        match event {
            AddressEvent::Added { addr, .. } if !addr.addr().is_loopback() => {
                addrs.insert(addr.addr());
            }
            AddressEvent::Removed { addr, .. } => {
                addrs.remove(&addr.addr());
            }
            AddressEvent::Added { .. } => {}
            AddressEvent::Overrun => match host::local_addresses(&self.netlink).await {
                Ok(now) => addrs = now,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "listing the node's addresses");
                    return;
                }
            },
        }
        if addrs == self.local_addrs {
            return;
        }
        self.local_addrs = addrs;
        if let Some(desired) = self.desired.clone()
            && let Err(e) = self.reconcile(&desired).await
        {
            tracing::error!(error = %format!("{e:#}"), "excluding the node's addresses");
        }
    }

    /// Makes the datapath and the node's addresses match `desired`.
    /// Addresses first: a policy becomes local only once its IP is here.
    async fn apply(
        &mut self,
        desired: &NodeState,
        claims: &[AddressClaim],
    ) -> anyhow::Result<ApplyOutcome> {
        self.claim(claims).await?;
        self.reconcile(desired).await
    }

    /// Writes only this node's own settings (the `config` entry) and the
    /// interfaces of the pods already programmed (a previous agent's
    /// entries may predate the interface check, or the interfaces may have
    /// been recreated meanwhile), leaving policies, pods and flows as they
    /// are.
    async fn reconcile_settings(&mut self) -> anyhow::Result<()> {
        let current = self.maps.read_image()?;
        let pinned = NodeState {
            node_addr: self.config.node.address,
            pods: current
                .pods
                .iter()
                .map(|(ip, p)| (Ipv4Addr::from(*ip), p.policy_id))
                .collect(),
            ..Default::default()
        };
        let host = self.host_facts(&pinned, true).await?;
        let fresh = DatapathImage::from_state(&pinned, &self.env, &host);
        let desired = DatapathImage {
            config: fresh.config,
            pods: fresh.pods,
            upstream: fresh.upstream,
            ..current.clone()
        };
        self.maps.apply(&current, &desired)?;
        Ok(())
    }

    /// Puts the egress IPs this node holds on the interface whose subnet
    /// contains them (or the one the claim names), announces new ones with
    /// gratuitous ARP, and removes those it added but no longer holds.
    async fn claim(&mut self, claims: &[AddressClaim]) -> anyhow::Result<()> {
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
                let fence = self.kube.as_ref().map(|k| k.fence.clone());
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
        for ip in stale {
            let from = self.netlink.release_tracked(&mut self.ledger, ip).await?;
            tracing::info!(%ip, interfaces = ?from, "egress IP released");
        }
        Ok(())
    }

    /// Starts the Kubernetes controller for this node.
    async fn start_controller(
        &self,
    ) -> anyhow::Result<(
        tokio::task::JoinHandle<Result<(), egress_k8s::Error>>,
        AgentLink,
    )> {
        let subnets = self.egress_subnets().await?;
        let mut options = egress_k8s::Options::new(self.config.kubernetes.clone(), subnets)?;
        options.node_addr = self.config.node.address;
        // Policy ids index this node's policy array: the assigner keeps
        // them below the (cluster-wide) max_policies.
        options.plan.max_policies = self.config.datapath.max_policies;
        options
            .global_excluded
            .extend(self.config.cluster.excluded_cidrs.iter().map(|n| n.trunc()));
        let client = kube::Client::try_default().await.context(
            "connecting to the Kubernetes API (in-cluster service account or KUBECONFIG)",
        )?;
        let (controller_link, agent_link) = egress_k8s::link();
        let node_name = self.config.node.name.clone();
        tracing::info!(node = %node_name, address = ?self.config.node.address, "Kubernetes mode: waiting for the watches to sync");
        let task = tokio::spawn(egress_k8s::run(client, node_name, options, controller_link));
        Ok((task, agent_link))
    }

    /// The subnets this node offers for egress IPs, from its interface
    /// addresses (those `egress_interfaces` names, or by default every
    /// interface but the tunnel and the pod interfaces), minus addresses in
    /// the cluster and service networks and the egress IPs the agent added
    /// itself (those are not node addresses, and publishing them would make
    /// their EgressIPs invalid).
    async fn egress_subnets(&self) -> anyhow::Result<Vec<EgressSubnet>> {
        let ours: BTreeSet<Ipv4Addr> = self.ledger.entries().iter().map(|e| e.ip).collect();
        let k8s = &self.config.kubernetes;
        let node = &self.config.node;
        let cluster: Vec<Ipv4Net> = k8s
            .cluster_cidrs
            .iter()
            .chain(&k8s.service_cidrs)
            .copied()
            .collect();
        let not_egress: Vec<String> = node
            .pod_interfaces
            .iter()
            .chain(&node.upstream_interfaces)
            .chain(std::iter::once(&self.tunnel))
            .cloned()
            .collect();
        let addresses: Vec<(String, Ipv4Net)> = self
            .netlink
            .ipv4_addresses()
            .await?
            .into_iter()
            .filter(|a| !ours.contains(&a.addr.addr()))
            .filter(|a| !cluster.iter().any(|c| c.contains(&a.addr.addr())))
            .filter(|a| {
                !k8s.egress_interfaces.is_empty() || !interface_matches(&not_egress, &a.ifname)
            })
            .map(|a| (a.ifname, a.addr))
            .collect();
        Ok(egress_k8s::facts::egress_subnets(k8s, &addresses))
    }

    /// Hands the controller this node's subnets when an address was added
    /// or removed since it last published them.
    async fn refresh_subnets(&self) {
        let Some(link) = &self.kube else { return };
        match self.egress_subnets().await {
            Ok(subnets) => {
                link.subnets.send_if_modified(|cur| {
                    if cur.as_ref() == Some(&subnets) {
                        false
                    } else {
                        tracing::info!(?subnets, "egress subnets");
                        *cur = Some(subnets);
                        true
                    }
                });
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "listing addresses for the egress subnets")
            }
        }
    }

    /// Writes the ready file, if one was asked for.
    fn mark_ready(&self) -> anyhow::Result<()> {
        if let Some(ready) = &self.options.ready_file {
            std::fs::write(ready, b"ready\n")
                .with_context(|| format!("writing {}", ready.display()))?;
        }
        tracing::info!("datapath ready");
        Ok(())
    }

    /// Applies the controller's latest fence: the datapath's claim-validity
    /// stamp (one map write) and the lifetime of the claimed addresses.
    /// Nothing before the controller has sent one: the previous agent's
    /// terms stand (see [`ControllerFence`]).
    ///
    /// True when the fence is still ahead but a claimed address is missing
    /// (see [`Self::restore_addresses`]).
    async fn apply_fence(&mut self) -> bool {
        let Some(k) = self.kube.as_mut() else {
            return false;
        };
        let Some(fence) = self.fence.latest(&mut k.fence) else {
            return false;
        };
        let remaining = fence.map(|f| f.saturating_duration_since(std::time::Instant::now()));
        let refreshed = self.apply_terms(Terms::of(remaining, monotonic_ns())).await;
        remaining.is_some_and(|r| !r.is_zero())
            && refreshed.is_some_and(|n| n < self.ledger.entries().len())
    }

    /// Puts back the claimed addresses the kernel removed while the claim
    /// still holds, and announces them.
    ///
    /// An address's lifetime is whole seconds ending before the fence, so
    /// the kernel may remove it up to a second and a quarter before the
    /// fence: a renewal that comes that late (a short link cut, a stall or
    /// SIGSTOP of the agent) extends the claim but finds the address gone,
    /// and the desired state, unchanged, never claims it again: the status
    /// kept naming this node while its IP carried no traffic (chaos). Re-
    /// adding is safe under the new fence: the session sends the fence
    /// before the desired state, and a fence that moves from one instant to
    /// a later one never comes with fewer active IPs (withdrawals go out on
    /// their own, with the fence they had, or with no fence at all after a
    /// lapse), so every claim of the desired state read now is valid under
    /// it.
    async fn restore_addresses(&mut self) {
        let Some(claims) = self
            .kube
            .as_ref()
            .and_then(|k| k.desired.borrow().as_ref().map(|d| d.claims.clone()))
        else {
            return;
        };
        if let Err(e) = self.claim(&claims).await {
            tracing::error!(error = %format!("{e:#}"), "putting back expired egress IPs");
        }
        let held = self.held_addresses(&claims).await;
        if let Some(k) = &self.kube {
            let _ = k.held.send(held);
        }
    }

    /// Applies `terms`; how many claimed addresses got the new lifetime
    /// (`None` when none was to be set, or on error).
    async fn apply_terms(&mut self, terms: Terms) -> Option<usize> {
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

    /// Applies the controller's latest desired state and reports what we
    /// hold and what the datapath holds; true once every policy is applied.
    async fn apply_kubernetes(&mut self) -> bool {
        // The fence of this state first: new claims get its lifetime, and
        // LOCAL policies appear with a valid stamp.
        self.apply_fence().await;
        let Some(desired) = self
            .kube
            .as_mut()
            .and_then(|k| k.desired.borrow_and_update().clone())
        else {
            return false;
        };
        let outcome = self.apply(&desired.state, &desired.claims).await;
        let complete = match outcome {
            Ok(outcome) => {
                // After the pods' policy entries: a selected pod is never
                // known here before its policy is.
                let local_pods = desired.local_pods.iter().map(|ip| ip.octets()).collect();
                if let Err(e) = self.maps.set_local_pods(&local_pods) {
                    tracing::error!(error = %e, "recording this node's pods for held interfaces");
                }
                let complete = outcome.failed.is_empty();
                if let Some(k) = &self.kube {
                    k.applied.send_replace(Some(outcome.into()));
                }
                complete
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "applying the desired state from Kubernetes");
                false
            }
        };
        let held = self.held_addresses(&desired.claims).await;
        if let Some(k) = &self.kube {
            let _ = k.held.send(held);
        }
        complete
    }

    /// Which of the claimed or recorded egress IPs are on our interfaces now.
    async fn held_addresses(&self, claims: &[AddressClaim]) -> BTreeSet<Ipv4Addr> {
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

    /// Asks the controller to stop (it decides whether the node's IPs are
    /// handed over or kept through a restart grace); false in static mode,
    /// where there is nothing to wait for.
    fn begin_stop(&mut self) -> bool {
        match &self.kube {
            Some(k) => {
                tracing::info!("stopping: waiting for the Kubernetes controller");
                let _ = k.shutdown.send(true);
                true
            }
            None => false,
        }
    }

    /// Whether `event` may change the subnets this node offers: our own
    /// egress IPs come and go (and are refreshed) without changing them.
    fn changes_subnets(&self, event: &AddressEvent) -> bool {
        match event {
            AddressEvent::Added { addr, .. } | AddressEvent::Removed { addr, .. } => {
                !self.ledger.entries().iter().any(|e| e.ip == addr.addr())
            }
            AddressEvent::Overrun => true,
        }
    }

    fn pod_interface_patterns(&self) -> Vec<String> {
        let node = &self.config.node;
        node.pod_interfaces
            .iter()
            .chain(&node.upstream_interfaces)
            .cloned()
            .collect()
    }

    /// Follows one link notification: attach pod_ingress to a new matching
    /// interface at once, forget one that is gone, re-list after a loss.
    async fn on_link_event(&mut self, event: LinkEvent) -> anyhow::Result<()> {
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

    fn pod_link_added(&mut self, link: &Link) -> anyhow::Result<()> {
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
    fn attach_pod_interface(&mut self, name: &str, index: u32) -> anyhow::Result<()> {
        if self.hold_new && interface_matches(&self.config.node.pod_interfaces, name) {
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
    fn hold(&mut self, name: &str, index: u32) -> anyhow::Result<()> {
        if let Some(until) = self.holds.place(index, name, monotonic_ns()) {
            self.maps
                .hold_interface(index, until)
                .with_context(|| format!("holding new pod interface {name}"))?;
            tracing::debug!(interface = %name, "new pod interface held until its Pod is known");
        }
        Ok(())
    }

    fn pod_link_gone(&mut self, name: &str) -> anyhow::Result<()> {
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

    /// From now on new pod interfaces are held (Kubernetes mode, unless
    /// `new_pod_hold_ms` is 0); holds a previous run left are adopted or
    /// removed.
    fn start_holding(&mut self) -> anyhow::Result<()> {
        self.holds = Holds::new(Some(self.config.kubernetes.new_pod_hold));
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
    fn end_lapsed_holds(&mut self) {
        for (index, name) in self.holds.lapsed(monotonic_ns()) {
            match self.maps.release_interface(index) {
                Ok(()) => tracing::debug!(interface = %name, "hold on new pod interface ended"),
                Err(e) => tracing::warn!(interface = %name, error = %e, "removing an ended hold"),
            }
        }
    }

    /// Attaches pod_ingress and pod_egress to new interfaces matching the
    /// patterns and forgets links of interfaces that disappeared.
    async fn sync_pod_interfaces(&mut self) -> anyhow::Result<()> {
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

    /// Says clearly when the tunnel cannot carry what pods send.
    async fn check_mtu(&self, desired: &NodeState) {
        let steers = desired
            .policies
            .values()
            .any(|p| !desired.is_local(p) && p.egress_node.is_some());
        if !steers {
            return;
        }
        let tunnel_mtu = u32::from(self.env.tunnel_mss) + IP_TCP_HEADERS;
        let Ok(links) = self.netlink.links().await else {
            return;
        };
        for link in links.iter().filter(|l| self.attached.contains_key(&l.name)) {
            if link.mtu > tunnel_mtu {
                tracing::warn!(
                    interface = %link.name,
                    mtu = link.mtu,
                    tunnel_mtu,
                    "pod MTU exceeds what the VXLAN tunnel to the egress node carries (uplink MTU - 50): \
                     TCP is made to fit by MSS clamping ({}), but UDP/ICMP packets larger than {tunnel_mtu} \
                     bytes are fragmented by the tunnel; lower the pod MTU to {tunnel_mtu} to avoid that",
                    self.env.tunnel_mss
                );
            }
        }
    }

    /// Applies an edited configuration file, or says why it was rejected and
    /// keeps the running state.
    async fn reload_if_changed(&mut self) {
        let mtime = std::fs::metadata(&self.options.config)
            .and_then(|m| m.modified())
            .ok();
        if mtime == self.config_mtime {
            return;
        }
        self.config_mtime = mtime;
        let new = match AgentConfig::load(&self.options.config) {
            Ok(new) => new,
            Err(e) => {
                tracing::error!(error = %e, "configuration rejected; keeping the running one");
                return;
            }
        };
        if new == self.config {
            return;
        }
        if let Err(e) = self.check_reloadable(&new) {
            tracing::error!(error = %e, "configuration rejected; keeping the running one");
            return;
        }
        let desired = new.node_state();
        let env = self.env;
        self.env = env.with_settings(&new.datapath);
        let outcome = self
            .apply(&desired, &static_claims(&desired))
            .await
            .and_then(|o| Ok(o.all_applied()?));
        match outcome {
            Ok(()) => {
                tracing::info!(policies = new.policies.len(), "configuration reloaded");
                self.collector
                    .update(new.datapath.timeouts.clone(), new.datapath.gc_interval);
                self.config = new;
            }
            Err(e) => {
                self.env = env;
                tracing::error!(error = %format!("{e:#}"), "applying the reloaded configuration failed")
            }
        }
    }

    /// Sections fixed at start: changing them needs a restart.
    fn check_reloadable(&self, new: &AgentConfig) -> anyhow::Result<()> {
        if new.instance != self.config.instance {
            bail!("instance: changing it needs a restart");
        }
        if new.node != self.config.node {
            bail!("node: changing this section needs a restart");
        }
        if new.datapath.max_flows != self.config.datapath.max_flows
            || new.datapath.max_policies != self.config.datapath.max_policies
            || new.datapath.max_pods != self.config.datapath.max_pods
        {
            bail!(
                "datapath: map sizes (max_flows, max_policies, max_pods) change only with a restart"
            );
        }
        Ok(())
    }

    /// Leaves the programs, pins and addresses for the next agent, fenced
    /// by the controller's last word in Kubernetes mode (a restart grace,
    /// or nothing held after a hand-over); `egress-agent reset` is the
    /// uninstall.
    async fn exit(mut self) {
        self.apply_fence().await;
        tracing::info!(
            "exiting; datapath, pinned state and egress IPs kept for the next agent \
             (`egress-agent reset` removes them)"
        );
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
    fence: Option<tokio::sync::watch::Receiver<Option<std::time::Instant>>>,
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
            fence.as_ref().is_none_or(|f| {
                f.borrow()
                    .is_some_and(|until| until > std::time::Instant::now())
            })
        };
        match egress_arp::announce_while(&interface, ip, &config, valid).await {
            Ok(()) => tracing::debug!(%ip, %interface, "gratuitous ARP sent"),
            Err(e) => tracing::warn!(%ip, %interface, error = %e, "gratuitous ARP failed"),
        }
    })
    .abort_handle()
}
