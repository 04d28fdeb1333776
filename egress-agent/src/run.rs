//! `egress-agent run`: load the configuration, bring the datapath up and
//! attach it, then one loop applying what the desired-state source says
//! ([`crate::source`]: the static file or the Kubernetes API) while
//! following the node (pod interfaces as they appear, routes, addresses).
//! On SIGTERM everything is left in place for the next agent (only
//! `egress-agent reset` removes it), fenced by the source's last word.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use egress_netlink::{AddressEvent, AddressEvents, Netlink};
use futures_util::StreamExt as _;
use tokio::signal::unix::{SignalKind, signal};

pub use crate::source::kubernetes::KubeOptions;
use crate::{
    agent::{Agent, HostEvents},
    source::{
        Flow, Kind, Source,
        file::{self, FileSource},
        kubernetes::Kubernetes,
    },
};

pub struct Options {
    pub config: PathBuf,
    pub ready_file: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// Take policies and nodes from the Kubernetes API instead of the file.
    pub kubernetes: Option<KubeOptions>,
}

/// How often ended holds on new pod interfaces are removed from the map:
/// housekeeping only, the datapath ignores an ended hold by itself.
const HOLD_SWEEP: Duration = Duration::from_secs(1);

pub async fn run(options: Options) -> anyhow::Result<()> {
    let kind = match &options.kubernetes {
        None => Kind::File,
        Some(node) => Kind::Kubernetes(node),
    };
    // Everything that can be wrong with the file is found before anything is touched.
    let mut config = kind.load(&options.config)?;
    // A ready file left by the previous agent (it lives on the host) must
    // not pass this one's startup probe before it has applied anything.
    if let Some(ready) = &options.ready_file {
        match std::fs::remove_file(ready) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", ready.display())),
        }
    }
    let config_mtime = file::modified(&options.config);
    tracing::info!(instance = %config.instance, node = %config.node.name, address = ?config.node.address, "starting");

    let netlink = Netlink::connect().context("opening rtnetlink")?;
    kind.choose_node_address(&netlink, &mut config).await?;
    let (mut agent, events) =
        Agent::bring_up(&config, netlink, &options.state_dir, kind.pinned_fence()).await?;
    // The pod interfaces first: resolving pods needs to know them. A
    // previous agent's links get the new programs, whose pod entries the
    // source's first state (or, in Kubernetes mode, `reconcile_settings`)
    // fills.
    agent.sync_pod_interfaces().await?;
    let ready = Readiness::new(options.ready_file);
    match kind {
        Kind::File => {
            let source =
                FileSource::start(&options.config, config, config_mtime, &mut agent).await?;
            serve(agent, events, source, ready).await
        }
        Kind::Kubernetes(_) => {
            let source = Kubernetes::start(&config, &mut agent).await?;
            serve(agent, events, source, ready).await
        }
    }
}

/// Attaches the uplink and tunnel programs, then applies what `source`
/// says and follows the node until the source ends or a signal stops the
/// agent.
async fn serve<S: Source>(
    mut agent: Agent,
    mut events: HostEvents,
    mut source: S,
    mut ready: Readiness,
) -> anyhow::Result<()> {
    agent.attach_uplink_and_tunnel()?;
    agent
        .check_mtu(&agent.desired.clone().unwrap_or_default())
        .await;
    // Ready once the source's state is applied whole (at start for the
    // file; in Kubernetes mode once the synced watches' state is), not
    // before (the DaemonSet's startup probe).
    if source.applied_whole() {
        ready.mark()?;
    }

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
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
    loop {
        tokio::select! {
            _ = sigterm.recv() => if !source.stop() { break },
            _ = sigint.recv() => if !source.stop() { break },
            event = events.links.next() => {
                let event = event.context("link notifications ended")?;
                if let Err(e) = agent.on_link_event(event).await {
                    tracing::error!(error = %format!("{e:#}"), "attaching to pod interfaces");
                }
                agent.follow_host().await;
            }
            event = next_address_event(&mut events.addresses) => {
                source.on_address_event(&event, &agent).await;
                agent.on_address_event(&event).await;
            }
            event = events.routes.next() => {
                let event = event.context("route notifications ended")?;
                agent.on_route_event(&event);
                agent.follow_host().await;
            }
            _ = retry_unresolved.tick() => {
                if agent.pod_interfaces.has_unresolved() {
                    agent.follow_host().await;
                }
            }
            _ = hold_sweep.tick(), if !agent.holds.is_empty() => agent.end_lapsed_holds(),
            update = source.next() => {
                let flow = source.apply(update, &mut agent).await?;
                if source.applied_whole() {
                    ready.mark()?;
                }
                if flow == Flow::End {
                    break;
                }
            }
        }
    }
    source.exit(&mut agent).await;
    tracing::info!(
        "exiting; datapath, pinned state and egress IPs kept for the next agent \
         (`egress-agent reset` removes them)"
    );
    Ok(())
}

/// The ready file, written once.
struct Readiness {
    file: Option<PathBuf>,
    pending: bool,
}

impl Readiness {
    fn new(file: Option<PathBuf>) -> Self {
        Self {
            file,
            pending: true,
        }
    }

    /// Writes the ready file, if one was asked for, the first time.
    fn mark(&mut self) -> anyhow::Result<()> {
        if !self.pending {
            return Ok(());
        }
        if let Some(ready) = &self.file {
            std::fs::write(ready, b"ready\n")
                .with_context(|| format!("writing {}", ready.display()))?;
        }
        tracing::info!("datapath ready");
        self.pending = false;
        Ok(())
    }
}

/// The next address notification; never once they have ended.
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
