//! The controller: watches feed the pure functions; one elected agent writes
//! status; every agent publishes its subnets (again whenever an address comes
//! or goes) and claims, and emits its node's desired state.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    hash::Hash,
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use egress_model::{AddressClaim, NodeState};
use futures::StreamExt;
use ipnet::Ipv4Net;
use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{Namespace, Node, Pod},
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    runtime::{
        WatchStreamExt,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::{
    claims::{self, ClaimTracker},
    crd::{EgressIP, EgressIPStatus, condition},
    facts::{EgressSubnet, NodeInfo, PodInfo, SUBNETS_ANNOTATION, subnets_annotation_value},
    heartbeat::{self, HeartbeatConfig},
    plan::{self, PlanConfig},
    project::{self, Projection},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("invalid options: {0}")]
    Options(String),
    #[error("heartbeat responder on {addr}: {source}")]
    Heartbeat {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Settings of the Kubernetes mode.
#[derive(Clone, Debug)]
pub struct Options {
    /// The agent's namespace: claims and leader Leases live there.
    pub namespace: String,
    pub plan: PlanConfig,
    /// Cluster and service networks, never translated.
    pub global_excluded: BTreeSet<Ipv4Net>,
    /// Overrides the node address found in the Node object.
    pub node_addr: Option<Ipv4Addr>,
    /// This node's egress-capable interface addresses, published in the
    /// Node annotation.
    pub subnets: Vec<EgressSubnet>,
    /// How long a claim stays valid without renewal. Bounds failover time
    /// (a new holder waits for the old claim to expire unless it was
    /// released). A node that cannot renew withdraws its IPs after
    /// `claim_ttl - claim_renew` (at most half a renewal period later), so
    /// before anyone else may claim them.
    pub claim_ttl: Duration,
    pub claim_renew: Duration,
    /// Take part in the assigner election.
    pub assigner: bool,
    pub leader_lease: String,
    pub leader_ttl: Duration,
    pub leader_renew: Duration,
    /// How long shutdown waits for the IPs to be handed over.
    pub drain_timeout: Duration,
    /// Direct liveness probes (the assigner probes, every agent answers);
    /// `None` relies on Node readiness and [`AgentLink::down`] only.
    pub heartbeat: Option<HeartbeatConfig>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            namespace: "egress-system".into(),
            plan: PlanConfig::default(),
            global_excluded: BTreeSet::new(),
            node_addr: None,
            subnets: Vec::new(),
            claim_ttl: Duration::from_millis(1500),
            claim_renew: Duration::from_millis(300),
            assigner: true,
            leader_lease: "egress-assigner".into(),
            leader_ttl: Duration::from_secs(15),
            leader_renew: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(20),
            heartbeat: Some(HeartbeatConfig::default()),
        }
    }
}

impl Options {
    pub fn validate(&self) -> Result<(), Error> {
        if self.claim_renew.is_zero() || self.claim_renew * 2 > self.claim_ttl {
            return Err(Error::Options(format!(
                "claim renew interval {:?} must be non-zero and at most half the claim lifetime {:?}",
                self.claim_renew, self.claim_ttl
            )));
        }
        if self.leader_renew.is_zero() || self.leader_renew * 2 > self.leader_ttl {
            return Err(Error::Options(format!(
                "leader renew interval {:?} must be non-zero and at most half the leader lease {:?}",
                self.leader_renew, self.leader_ttl
            )));
        }
        if let Some(hb) = &self.heartbeat {
            hb.validate().map_err(Error::Options)?;
        }
        if self.namespace.is_empty() {
            return Err(Error::Options("namespace must not be empty".into()));
        }
        Ok(())
    }
}

/// What the agent must program.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub state: NodeState,
    /// Addresses to hold (put on the interface, then announce with GARP).
    /// Each was published as claimed before it appears here.
    pub claims: Vec<AddressClaim>,
}

/// The controller's end of the link with the agent.
pub struct ControllerLink {
    desired: watch::Sender<Option<Desired>>,
    fence: watch::Sender<Option<Instant>>,
    held: watch::Receiver<BTreeSet<Ipv4Addr>>,
    subnets: watch::Receiver<Option<Vec<EgressSubnet>>>,
    down: watch::Receiver<BTreeSet<String>>,
    shutdown: watch::Receiver<bool>,
}

/// The agent's end of the link.
pub struct AgentLink {
    /// `None` until every watch has synced: the agent must neither program
    /// nor announce anything before (after a restart it would GARP stale
    /// state). Then every change.
    pub desired: watch::Receiver<Option<Desired>>,
    /// Until when this node may hold and translate for the egress IPs it
    /// claims: past this instant others may take them over, so the
    /// datapath and the addresses must have let go by then without the
    /// agent's help. Moves forward with every claim renewal; `None` while
    /// the node holds nothing.
    pub fence: watch::Receiver<Option<Instant>>,
    /// The agent reports the egress IPs actually present on its interfaces
    /// after applying `claims`; a claim is released only once its address
    /// is gone from here.
    pub held: watch::Sender<BTreeSet<Ipv4Addr>>,
    /// This node's egress-capable subnets when they change after start
    /// (`None`: still [`Options::subnets`]); republished on the Node.
    pub subnets: watch::Sender<Option<Vec<EgressSubnet>>>,
    /// Node names that failed direct probes (heartbeats): the assigner moves
    /// their IPs away.
    pub down: watch::Sender<BTreeSet<String>>,
    /// Set to true to hand the IPs over and make [`run`] return.
    pub shutdown: watch::Sender<bool>,
}

pub fn link() -> (ControllerLink, AgentLink) {
    let (desired_tx, desired_rx) = watch::channel(None);
    let (fence_tx, fence_rx) = watch::channel(None);
    let (held_tx, held_rx) = watch::channel(BTreeSet::new());
    let (subnets_tx, subnets_rx) = watch::channel(None);
    let (down_tx, down_rx) = watch::channel(BTreeSet::new());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    (
        ControllerLink {
            desired: desired_tx,
            fence: fence_tx,
            held: held_rx,
            subnets: subnets_rx,
            down: down_rx,
            shutdown: shutdown_rx,
        },
        AgentLink {
            desired: desired_rx,
            fence: fence_rx,
            held: held_tx,
            subnets: subnets_tx,
            down: down_tx,
            shutdown: shutdown_tx,
        },
    )
}

/// A reflector's store, and its task: dropping this stops the watch, so
/// that dropping [`run`]'s future stops everything it started.
struct Reflected<K: Resource + Clone + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    store: Store<K>,
    _task: AbortOnDrop,
}

impl<K: Resource + Clone + 'static> std::ops::Deref for Reflected<K>
where
    K::DynamicType: Eq + Hash + Clone,
{
    type Target = Store<K>;
    fn deref(&self) -> &Store<K> {
        &self.store
    }
}

/// A reflector whose changes wake `notify`.
fn reflect<K>(api: Api<K>, config: watcher::Config, notify: Arc<Notify>) -> Reflected<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
    let task = tokio::spawn(async move {
        stream
            .for_each(|ev| {
                if let Err(e) = ev {
                    warn!(kind, error = %e, "watch failed; retrying with backoff");
                }
                notify.notify_one();
                futures::future::ready(())
            })
            .await;
    });
    Reflected {
        store: reader,
        _task: AbortOnDrop(Some(task)),
    }
}

async fn ready<K>(store: &Store<K>)
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    // The writer lives as long as the reflector task, which outlives this wait.
    let _ = store.wait_until_ready().await;
}

fn namespaces_by_name(store: &Store<Namespace>) -> BTreeMap<String, BTreeMap<String, String>> {
    store
        .state()
        .iter()
        .map(|n| (n.name_any(), n.labels().clone()))
        .collect()
}

fn nodes_info(store: &Store<Node>) -> Vec<NodeInfo> {
    let mut v: Vec<NodeInfo> = store
        .state()
        .iter()
        .filter_map(|n| NodeInfo::from_node(n))
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

fn eips_of(store: &Store<EgressIP>) -> Vec<EgressIP> {
    store.state().iter().map(|e| (**e).clone()).collect()
}

/// Runs the Kubernetes mode for `node_name` until `shutdown` is set (then
/// hands this node's IPs over) or a fatal error.
///
/// The agent reads [`AgentLink::desired`], applies it with its reconciler,
/// reports what it holds in [`AgentLink::held`], and feeds its heartbeat
/// verdicts into [`AgentLink::down`].
pub async fn run(
    client: Client,
    node_name: String,
    options: Options,
    link: ControllerLink,
) -> Result<(), Error> {
    options.validate()?;
    let responder = match &options.heartbeat {
        Some(hb) => {
            let socket =
                heartbeat::bind_responder(hb)
                    .await
                    .map_err(|source| Error::Heartbeat {
                        addr: std::net::SocketAddr::new(hb.bind, hb.port),
                        source,
                    })?;
            Some(tokio::spawn(async move {
                if let Err(e) = heartbeat::respond(socket).await {
                    warn!(error = %e, "heartbeat responder stopped");
                }
            }))
        }
        None => None,
    };
    publish_subnets(&client, &node_name, &options.subnets).await?;

    let elector = options.assigner.then(|| {
        let client = client.clone();
        let options = options.clone();
        let node_name = node_name.clone();
        let down = link.down.clone();
        tokio::spawn(async move { elect(client, node_name, options, down).await })
    });
    // Dropped (so aborted) when this future ends or is dropped.
    let elector = AbortOnDrop(elector);
    let _responder = AbortOnDrop(responder);
    let result = node_agent(client.clone(), node_name.clone(), options.clone(), link).await;
    if result.is_ok() && options.assigner {
        drop(elector);
        // Let another agent take over at once instead of after the lease.
        if let Err(e) = release_leadership(&client, &node_name, &options).await {
            warn!(error = %e, "cannot release the assigner lease");
        }
    }
    result
}

/// Publishes this node's egress-capable subnets on its Node.
pub async fn publish_subnets(
    client: &Client,
    node_name: &str,
    subnets: &[EgressSubnet],
) -> Result<(), Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let patch = serde_json::json!({
        "metadata": {"annotations": {SUBNETS_ANNOTATION: subnets_annotation_value(subnets)}}
    });
    nodes
        .patch(node_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    info!(node = node_name, ?subnets, "published egress subnets");
    Ok(())
}

#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error(transparent)]
    Kube(kube::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

struct ClaimWriter {
    api: Api<Lease>,
    namespace: String,
    node: String,
    ttl: Duration,
    renew: Duration,
    timeout: Duration,
    published: Option<BTreeSet<Ipv4Addr>>,
    draining: bool,
    last_renew: Option<Instant>,
}

impl ClaimWriter {
    /// Writes the claims Lease; `Ok` means the claims are visible to others.
    /// Bounded by the renewal period: kube retries unavailable servers with
    /// backoff, and a write stuck that long must count as a failed renewal
    /// rather than stall the loop that withdraws our IPs.
    async fn write(
        &mut self,
        ips: &BTreeSet<Ipv4Addr>,
        draining: bool,
    ) -> Result<(), RequestError> {
        let limit = self.timeout;
        tokio::time::timeout(limit, self.write_unbounded(ips, draining))
            .await
            .map_err(|_| RequestError::Timeout(limit))?
            .map_err(RequestError::Kube)
    }

    async fn write_unbounded(
        &mut self,
        ips: &BTreeSet<Ipv4Addr>,
        draining: bool,
    ) -> Result<(), kube::Error> {
        let name = claims::lease_name(&self.node);
        let now = MicroTime(Timestamp::now());
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    claims::ROLE_LABEL.into(),
                    claims::ROLE_CLAIMS.into(),
                )])),
                annotations: Some(BTreeMap::from([
                    (
                        claims::CLAIMED_ANNOTATION.into(),
                        claims::format_claims(ips),
                    ),
                    (claims::DRAINING_ANNOTATION.into(), draining.to_string()),
                    (
                        claims::CLAIM_TTL_ANNOTATION.into(),
                        self.ttl.as_millis().to_string(),
                    ),
                ])),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.node.clone()),
                lease_duration_seconds: Some(self.ttl.as_secs_f64().ceil() as i32),
                renew_time: Some(now),
                ..Default::default()
            }),
        };
        let started = Instant::now();
        match self
            .api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&lease))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {
                self.api.create(&PostParams::default(), &lease).await?;
            }
            Err(e) => return Err(e),
        }
        // The renewal counts from when it was sent: the server may have
        // applied it at any point since.
        self.last_renew = Some(started);
        if self.published.as_ref() != Some(ips) || self.draining != draining {
            info!(node = %self.node, claims = %claims::format_claims(ips), draining, "published claims");
        }
        self.published = Some(ips.clone());
        self.draining = draining;
        Ok(())
    }

    /// Others may take our IPs `ttl` after they last saw our Lease change,
    /// which is no earlier than when we sent the renewal. We give up one
    /// renewal period before that, so that the agent has time to remove the
    /// addresses before anyone else can claim them.
    fn withdraw_at(&self) -> Option<Instant> {
        self.last_renew
            .map(|t| t + self.ttl.saturating_sub(self.renew))
    }

    /// Nothing claimed and not draining: there is nothing to keep live, so
    /// the Lease is not renewed (on a large cluster only the few nodes that
    /// hold IPs write every renewal period).
    fn idle(&self) -> bool {
        !self.draining && self.published.as_ref().is_some_and(BTreeSet::is_empty)
    }

    fn may_hold(&self, now: Instant) -> bool {
        self.idle() || self.withdraw_at().is_some_and(|deadline| now < deadline)
    }

    /// How long until the next renewal is due; a failed renewal is retried
    /// after a quarter period rather than at once.
    fn until_renewal(&self, now: Instant) -> Duration {
        if self.idle() {
            return Duration::MAX;
        }
        self.last_renew
            .map_or(Duration::ZERO, |t| {
                (t + self.renew).saturating_duration_since(now)
            })
            .max(self.renew / 4)
    }
}

/// Which of `ips` the API server's current status assigns to `me` (a fresh
/// read of the EgressIPs that list them in our cached view).
async fn confirm_assigned(
    api: &Api<EgressIP>,
    cached: &[EgressIP],
    me: &str,
    ips: &[Ipv4Addr],
    limit: Duration,
) -> BTreeSet<Ipv4Addr> {
    let names: BTreeSet<String> = cached
        .iter()
        .filter(|e| {
            e.status.as_ref().is_some_and(|s| {
                s.ips.iter().any(|i| {
                    i.egress_ip
                        .parse()
                        .is_ok_and(|ip: Ipv4Addr| ips.contains(&ip))
                })
            })
        })
        .map(|e| e.name_any())
        .collect();
    let mut out = BTreeSet::new();
    for name in names {
        match tokio::time::timeout(limit, api.get(&name)).await {
            Ok(Ok(eip)) => {
                for s in eip.status.iter().flat_map(|s| &s.ips) {
                    if s.node.as_deref() == Some(me)
                        && let Ok(ip) = s.egress_ip.parse::<Ipv4Addr>()
                        && ips.contains(&ip)
                    {
                        out.insert(ip);
                    }
                }
            }
            Ok(Err(e)) => warn!(egressip = %name, error = %e, "cannot confirm the assignment"),
            Err(_) => warn!(egressip = %name, "cannot confirm the assignment: no answer"),
        }
    }
    out
}

/// The other nodes' claims, read from the API server rather than the cache.
async fn fresh_claims(
    api: &Api<Lease>,
    me: &str,
    tracker: &mut ClaimTracker,
    limit: Duration,
) -> Result<claims::ClaimView, RequestError> {
    let params = kube::api::ListParams::default().labels(&format!(
        "{}={}",
        claims::ROLE_LABEL,
        claims::ROLE_CLAIMS
    ));
    let list = tokio::time::timeout(limit, api.list(&params))
        .await
        .map_err(|_| RequestError::Timeout(limit))?
        .map_err(RequestError::Kube)?;
    let mine = claims::lease_name(me);
    let others: Vec<&Lease> = list
        .items
        .iter()
        .filter(|l| l.metadata.name.as_deref() != Some(mine.as_str()))
        .collect();
    Ok(tracker.view(&others, Instant::now()))
}

/// Whether this node got an IP's lock.
#[derive(Debug)]
enum LockOutcome {
    /// Ours; `replaced` is the lock version we replaced, if we took it over
    /// (our watch may still show that version for a while: it is not a loss).
    Acquired {
        replaced: Option<String>,
    },
    Refused(String),
}

fn lock_lease(namespace: &str, me: &str, ip: Ipv4Addr, previous: Option<&Lease>) -> Lease {
    let transitions = previous
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.lease_transitions)
        .unwrap_or(0);
    Lease {
        metadata: ObjectMeta {
            name: Some(claims::lock_name(ip)),
            namespace: Some(namespace.to_string()),
            resource_version: previous.and_then(|l| l.metadata.resource_version.clone()),
            labels: Some(BTreeMap::from([(
                claims::ROLE_LABEL.into(),
                claims::ROLE_IP_LOCK.into(),
            )])),
            annotations: Some(BTreeMap::from([(
                claims::LOCKED_IP_ANNOTATION.into(),
                ip.to_string(),
            )])),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(me.to_string()),
            acquire_time: Some(MicroTime(Timestamp::now())),
            lease_transitions: Some(transitions + i32::from(previous.is_some())),
            ..Default::default()
        }),
    }
}

/// Takes the lock Lease of `ip` for `me` with a create or a
/// version-conditioned replace, so that of two nodes racing for one IP
/// exactly one wins (see [`claims`]).
async fn acquire_lock(
    api: &Api<Lease>,
    namespace: &str,
    me: &str,
    ip: Ipv4Addr,
    clock: &mut claims::VersionClock,
    ttl: Duration,
) -> Result<LockOutcome, kube::Error> {
    let current = api.get_opt(&claims::lock_name(ip)).await?;
    let now = Instant::now();
    let changed_recently = current
        .as_ref()
        .and_then(|l| clock.note(l, now))
        .is_some_and(|t| now.saturating_duration_since(t) < ttl);
    let pp = PostParams::default();
    // The caller only asks for IPs nobody else has a live claim on.
    match claims::lock_step(current.as_ref(), me, None, changed_recently) {
        claims::LockStep::Held => Ok(LockOutcome::Acquired { replaced: None }),
        claims::LockStep::Busy { holder } => {
            Ok(LockOutcome::Refused(format!("its lock names {holder}")))
        }
        claims::LockStep::Create => {
            match api.create(&pp, &lock_lease(namespace, me, ip, None)).await {
                Ok(_) => Ok(LockOutcome::Acquired { replaced: None }),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(LockOutcome::Refused(
                    "another node created its lock first".into(),
                )),
                Err(e) => Err(e),
            }
        }
        claims::LockStep::Take { resource_version } => {
            let lease = lock_lease(namespace, me, ip, current.as_ref());
            match api.replace(&claims::lock_name(ip), &pp, &lease).await {
                Ok(_) => Ok(LockOutcome::Acquired {
                    replaced: Some(resource_version),
                }),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(LockOutcome::Refused(
                    "another node took its lock first".into(),
                )),
                Err(e) => Err(e),
            }
        }
    }
}

/// Clears `me` as the holder of the Lease `name`, with a replace conditioned
/// on the version read, so that a Lease someone else took meanwhile is left
/// alone. `Ok(true)` when we released it.
async fn release_lease(api: &Api<Lease>, name: &str, me: &str) -> Result<bool, kube::Error> {
    let Some(mut lease) = api.get_opt(name).await? else {
        return Ok(false);
    };
    if claims::lock_holder(&lease) != Some(me) {
        return Ok(false);
    }
    if let Some(spec) = lease.spec.as_mut() {
        spec.holder_identity = None;
    }
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        // Someone else took it meanwhile: nothing to release.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Clears our name from the lock of `ip` (after its address is gone and our
/// claim withdrawn), so that operators and the next holder see it free.
/// Best effort: a lock whose holder no longer claims the IP is free anyway.
async fn release_lock(api: &Api<Lease>, me: &str, ip: Ipv4Addr) -> Result<(), kube::Error> {
    release_lease(api, &claims::lock_name(ip), me)
        .await
        .map(drop)
}

/// The locks we hold that our watch shows in someone else's name, ignoring
/// the version we replaced when we took a lock over (the watch may lag).
fn lost_locks(
    locks: &[Arc<Lease>],
    me: &str,
    held: &BTreeMap<Ipv4Addr, Option<String>>,
) -> Vec<(Ipv4Addr, String)> {
    locks
        .iter()
        .filter_map(|lock| {
            let ip: Ipv4Addr = lock
                .annotations()
                .get(claims::LOCKED_IP_ANNOTATION)?
                .parse()
                .ok()?;
            let replaced = held.get(&ip)?;
            let holder = claims::lock_holder(lock)?;
            let stale = replaced.is_some() && lock.metadata.resource_version == *replaced;
            (holder != me && !stale).then(|| (ip, holder.to_string()))
        })
        .collect()
}

/// Keeps only the claims that are published; others lose their egress node
/// here (they become live on the next round, once the write succeeded).
fn restrict(mut p: Projection, published: &BTreeSet<Ipv4Addr>) -> Projection {
    p.claims.retain(|c| published.contains(&c.ip));
    let me = p.state.node_addr;
    for policy in p.state.policies.values_mut() {
        if me.is_some() && policy.egress_node == me && !published.contains(&policy.egress_ip) {
            policy.egress_node = None;
        }
    }
    p
}

async fn node_agent(
    client: Client,
    node_name: String,
    options: Options,
    mut link: ControllerLink,
) -> Result<(), Error> {
    let notify = Arc::new(Notify::new());
    let eip_api: Api<EgressIP> = Api::all(client.clone());
    let eips = reflect(eip_api.clone(), watcher::Config::default(), notify.clone());
    let nodes = reflect(
        Api::<Node>::all(client.clone()),
        watcher::Config::default(),
        notify.clone(),
    );
    let namespaces = reflect(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
        notify.clone(),
    );
    // Every node's pods, not only ours: as an egress node we accept a pod's
    // steered traffic only from the node that hosts it (project.rs).
    let pods = reflect(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default(),
        notify.clone(),
    );
    let lease_api: Api<Lease> = Api::namespaced(client.clone(), &options.namespace);
    let leases = reflect(
        lease_api.clone(),
        watcher::Config::default().labels(&format!(
            "{}={}",
            claims::ROLE_LABEL,
            claims::ROLE_CLAIMS
        )),
        notify.clone(),
    );
    ready(&eips).await;
    ready(&nodes).await;
    ready(&namespaces).await;
    ready(&pods).await;
    ready(&leases).await;
    info!(node = %node_name, "watches synced");

    let mut tracker = ClaimTracker::new(options.claim_ttl);
    let mut writer = ClaimWriter {
        api: lease_api,
        namespace: options.namespace.clone(),
        node: node_name.clone(),
        renew: options.claim_renew,
        // Half a period, so that a stuck write delays withdrawal by at most
        // that much (see `withdraw_at`).
        timeout: options.claim_renew / 2,
        ttl: options.claim_ttl,
        published: None,
        draining: false,
        last_renew: None,
    };
    let locks = reflect(
        writer.api.clone(),
        watcher::Config::default().labels(&format!(
            "{}={}",
            claims::ROLE_LABEL,
            claims::ROLE_IP_LOCK
        )),
        notify.clone(),
    );
    ready(&locks).await;
    // IP -> the lock version we replaced to get it (None: created or ours).
    let mut held_locks: BTreeMap<Ipv4Addr, Option<String>> = BTreeMap::new();
    let mut lock_clock = claims::VersionClock::default();
    let mut shutting_down_since: Option<Instant> = None;
    let mut was_holding = true;
    let mut subnets_published = options.subnets.clone();
    loop {
        let now = Instant::now();
        if *link.shutdown.borrow() && shutting_down_since.is_none() {
            info!(node = %node_name, "shutting down: handing egress IPs over");
            shutting_down_since = Some(now);
        }
        let lease_objs = leases.state();
        let others: Vec<&Lease> = lease_objs
            .iter()
            .map(|l| &**l)
            .filter(|l| l.metadata.name.as_deref() != Some(claims::lease_name(&node_name).as_str()))
            .collect();
        let view = tracker.view(&others, now);
        let eip_list = eips_of(&eips);
        let node_list = nodes_info(&nodes);
        let ns = namespaces_by_name(&namespaces);
        let pod_list: Vec<PodInfo> = pods
            .state()
            .iter()
            .filter_map(|p| PodInfo::from_pod(p))
            .collect();
        let draining = shutting_down_since.is_some();
        let project = |may_hold: bool| {
            project::project(&project::ProjectInput {
                node_name: &node_name,
                node_addr: options.node_addr,
                eips: &eip_list,
                nodes: &node_list,
                namespaces: &ns,
                pods: &pod_list,
                claims: &view.live,
                may_hold,
                global_excluded: &options.global_excluded,
                config: &options.plan,
            })
        };
        // While draining, hold on until the assigner has moved the IPs (the
        // status no longer names us) or the drain times out.
        let drain_expired =
            shutting_down_since.is_some_and(|t| now.duration_since(t) >= options.drain_timeout);
        let projection = project(!drain_expired);
        let wanted: BTreeSet<Ipv4Addr> = projection.claims.iter().map(|c| c.ip).collect();
        let held = link.held.borrow().clone();
        // Claim what we want, and keep claiming what is still on an
        // interface until the agent reports it gone.
        let mut to_publish: BTreeSet<Ipv4Addr> = wanted.union(&held).copied().collect();
        let subnets = link.subnets.borrow().clone();
        if let Some(subnets) = subnets
            && subnets != subnets_published
        {
            // A failure is retried on the next round (at most a renewal
            // period away).
            match publish_subnets(&client, &node_name, &subnets).await {
                Ok(()) => subnets_published = subnets,
                Err(e) => warn!(node = %node_name, error = %e, "cannot republish egress subnets"),
            }
        }
        let lock_objs = locks.state();
        for lock in &lock_objs {
            lock_clock.note(lock, now);
        }
        lock_clock.retain(&lock_objs.iter().map(|l| l.name_any()).collect());
        for (ip, holder) in lost_locks(&lock_objs, &node_name, &held_locks) {
            warn!(node = %node_name, %ip, %holder, "the IP's lock names another node: withdrawing it");
            held_locks.remove(&ip);
            to_publish.remove(&ip);
        }
        let published = writer.published.clone().unwrap_or_default();
        let new_claims: Vec<Ipv4Addr> = to_publish.difference(&published).copied().collect();
        if !new_claims.is_empty() {
            // Our watch of the other nodes' claims may lag behind the status
            // that names us: confirm with a fresh read before claiming.
            // Likewise our watch of the status may lag behind a move away
            // from us: confirm that the status still names us.
            let confirmed = confirm_assigned(
                &eip_api,
                &eip_list,
                &node_name,
                &new_claims,
                options.claim_renew,
            )
            .await;
            match fresh_claims(&writer.api, &node_name, &mut tracker, options.claim_renew).await {
                Ok(fresh) => {
                    for ip in new_claims {
                        if let Some(holders) = fresh.live.get(&ip) {
                            info!(node = %node_name, %ip, ?holders, "not claiming yet: still claimed elsewhere");
                            to_publish.remove(&ip);
                            continue;
                        }
                        if !confirmed.contains(&ip) && !held.contains(&ip) {
                            info!(node = %node_name, %ip, "not claiming: the status no longer names this node");
                            to_publish.remove(&ip);
                            continue;
                        }
                        let attempt = tokio::time::timeout(
                            options.claim_renew,
                            acquire_lock(
                                &writer.api,
                                &options.namespace,
                                &node_name,
                                ip,
                                &mut lock_clock,
                                options.claim_ttl,
                            ),
                        )
                        .await;
                        match attempt {
                            Ok(Ok(LockOutcome::Acquired { replaced })) => {
                                held_locks.insert(ip, replaced);
                            }
                            Ok(Ok(LockOutcome::Refused(why))) => {
                                info!(node = %node_name, %ip, why, "not claiming: lost the IP's lock");
                                to_publish.remove(&ip);
                            }
                            Ok(Err(e)) => {
                                warn!(node = %node_name, %ip, error = %e, "cannot take the IP's lock; not claiming it");
                                to_publish.remove(&ip);
                            }
                            Err(_) => {
                                warn!(node = %node_name, %ip, "cannot take the IP's lock: no answer; not claiming it");
                                to_publish.remove(&ip);
                            }
                        }
                    }
                }
                Err(e) => {
                    warn!(node = %node_name, error = %e, "cannot confirm claims; not claiming new IPs");
                    for ip in new_claims {
                        to_publish.remove(&ip);
                    }
                }
            }
        }
        let renew_due = !writer.idle()
            && writer
                .last_renew
                .is_none_or(|t| now.saturating_duration_since(t) >= options.claim_renew);
        if (writer.published.as_ref() != Some(&to_publish)
            || writer.draining != draining
            || renew_due)
            && let Err(e) = writer.write(&to_publish, draining).await
        {
            warn!(node = %node_name, error = %e, "cannot publish claims");
        }
        // Locks of IPs whose claim we have withdrawn (address gone, claims
        // Lease written without them) are handed back.
        let withdrawn: Vec<Ipv4Addr> = held_locks
            .keys()
            .filter(|ip| {
                !to_publish.contains(ip)
                    && writer.published.as_ref().is_some_and(|p| !p.contains(ip))
            })
            .copied()
            .collect();
        for ip in withdrawn {
            held_locks.remove(&ip);
            match tokio::time::timeout(
                options.claim_renew,
                release_lock(&writer.api, &node_name, ip),
            )
            .await
            {
                Ok(Ok(())) => debug!(node = %node_name, %ip, "released the IP's lock"),
                Ok(Err(e)) => {
                    warn!(node = %node_name, %ip, error = %e, "cannot release the IP's lock (it is free anyway once our claim is gone)")
                }
                Err(_) => warn!(node = %node_name, %ip, "cannot release the IP's lock: no answer"),
            }
        }
        let now = Instant::now();
        let may_hold = writer.may_hold(now);
        if may_hold != was_holding {
            if may_hold {
                info!(node = %node_name, "claims renewed: may hold egress IPs");
            } else {
                warn!(node = %node_name, ttl = ?options.claim_ttl, "claims not renewed within their lifetime: withdrawing every egress IP");
            }
            was_holding = may_hold;
        }
        let projection = if may_hold && !drain_expired {
            let published = writer.published.clone().unwrap_or_default();
            restrict(projection, &published)
        } else {
            project(false)
        };
        let desired = Desired {
            state: projection.state,
            claims: projection.claims,
        };
        let fence = (may_hold && !drain_expired && !desired.claims.is_empty())
            .then(|| writer.withdraw_at())
            .flatten();
        link.fence.send_if_modified(|cur| {
            let changed = *cur != fence;
            *cur = fence;
            changed
        });
        link.desired.send_if_modified(|cur| {
            if cur.as_ref() == Some(&desired) {
                false
            } else {
                debug!(node = %node_name, policies = desired.state.policies.len(), pods = desired.state.pods.len(), claims = desired.claims.len(), "desired state changed");
                *cur = Some(desired.clone());
                true
            }
        });
        if draining && (desired.claims.is_empty() && link.held.borrow().is_empty()) {
            if let Err(e) = writer.write(&BTreeSet::new(), true).await {
                warn!(node = %node_name, error = %e, "cannot publish the final release");
            }
            info!(node = %node_name, "egress IPs handed over");
            return Ok(());
        }

        let until_withdrawal = writer
            .withdraw_at()
            .filter(|_| !writer.idle())
            .map(|d| d.saturating_duration_since(now))
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::MAX);
        // Renewals are paced from the last one, not from whenever the loop
        // last woke up, so that they do not drift towards twice the period.
        let wake = writer
            .until_renewal(now)
            .min(tracker.next_expiry(now).unwrap_or(Duration::MAX))
            .min(until_withdrawal)
            .min(Duration::from_secs(60));
        tokio::select! {
            _ = notify.notified() => {}
            r = link.held.changed() => { if r.is_err() { return Ok(()); } }
            r = link.subnets.changed() => { if r.is_err() { return Ok(()); } }
            r = link.shutdown.changed() => { if r.is_err() { return Ok(()); } }
            _ = tokio::time::sleep(wake) => {}
        }
    }
}

/// Leader election with a `coordination.k8s.io` Lease; the leader runs the
/// assigner.
async fn elect(
    client: Client,
    me: String,
    options: Options,
    down: watch::Receiver<BTreeSet<String>>,
) {
    let api: Api<Lease> = Api::namespaced(client.clone(), &options.namespace);
    let mut observed: Option<(String, Instant)> = None;
    let mut last_renew: Option<Instant> = None;
    // Dropping the guard aborts the assigner (also when this future is dropped).
    let mut assigner: Option<AbortOnDrop> = None;
    loop {
        let attempt = Instant::now();
        match tokio::time::timeout(
            options.leader_renew,
            try_lead(&api, &me, &options, &mut observed),
        )
        .await
        {
            Ok(Ok(true)) => last_renew = Some(attempt),
            Ok(Ok(false)) => last_renew = None,
            Ok(Err(e)) => warn!(error = %e, "leader election"),
            Err(_) => warn!(timeout = ?options.leader_renew, "leader election: no answer"),
        }
        let leading = last_renew.is_some_and(|t| t.elapsed() < options.leader_ttl);
        match (&assigner, leading) {
            (None, true) => {
                info!(identity = %me, "elected assigner");
                let (client, options, down) = (client.clone(), options.clone(), down.clone());
                let me = me.clone();
                assigner = Some(AbortOnDrop(Some(tokio::spawn(async move {
                    assign_loop(client, me, options, down).await
                }))));
            }
            (Some(_), false) => {
                warn!(identity = %me, "lost the assigner lease");
                assigner = None;
            }
            _ => {}
        }
        tokio::time::sleep(options.leader_renew).await;
    }
}

async fn release_leadership(
    client: &Client,
    me: &str,
    options: &Options,
) -> Result<(), kube::Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &options.namespace);
    if release_lease(&api, &options.leader_lease, me).await? {
        info!(identity = %me, "released the assigner lease");
    }
    Ok(())
}

/// One acquire-or-renew round. Ownership changes hands only through a
/// write conditioned on the resourceVersion we read.
async fn try_lead(
    api: &Api<Lease>,
    me: &str,
    options: &Options,
    observed: &mut Option<(String, Instant)>,
) -> Result<bool, kube::Error> {
    let now = MicroTime(Timestamp::now());
    let duration = options.leader_ttl.as_secs().max(1) as i32;
    let Some(mut lease) = api.get_opt(&options.leader_lease).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(options.leader_lease.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(me.to_string()),
                lease_duration_seconds: Some(duration),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let rv = lease.resource_version().unwrap_or_default();
    let spec = lease.spec.get_or_insert_with(Default::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder != me {
        let changed = observed.as_ref().is_none_or(|(r, _)| *r != rv);
        if changed {
            *observed = Some((rv.clone(), Instant::now()));
        }
        let ttl =
            Duration::from_secs(spec.lease_duration_seconds.unwrap_or(duration).max(0) as u64);
        let expired = observed.as_ref().is_some_and(|(_, t)| t.elapsed() >= ttl);
        if !holder.is_empty() && !expired {
            return Ok(false);
        }
        spec.holder_identity = Some(me.to_string());
        spec.acquire_time = Some(now.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(now);
    spec.lease_duration_seconds = Some(duration);
    match api
        .replace(&options.leader_lease, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// The status as a merge patch: absent fields are explicitly cleared.
fn status_patch(status: &EgressIPStatus) -> serde_json::Value {
    let mut v = serde_json::to_value(status).expect("status serializes");
    let obj = v.as_object_mut().expect("status is an object");
    for key in ["items", "ips", "conditions", "observedGeneration"] {
        obj.entry(key).or_insert(serde_json::Value::Null);
    }
    serde_json::json!({ "status": v })
}

fn condition_is(
    status: Option<&EgressIPStatus>,
    ip: &str,
    type_: &str,
) -> Option<(String, String, String)> {
    status?
        .ips
        .iter()
        .find(|s| s.egress_ip == ip)?
        .conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
        .map(|c| (c.reason.clone(), c.message.clone(), c.type_.clone()))
}

/// Events for what changed between two statuses of one resource.
fn events_for(old: Option<&EgressIPStatus>, new: &EgressIPStatus) -> Vec<Event> {
    let mut out = Vec::new();
    for c in new.conditions.iter().filter(|c| c.status == "True") {
        let was = old.is_some_and(|o| {
            o.conditions
                .iter()
                .any(|p| p.type_ == c.type_ && p.status == "True" && p.reason == c.reason)
        });
        if !was {
            out.push(Event {
                type_: EventType::Warning,
                reason: c.reason.clone(),
                note: Some(c.message.clone()),
                action: "Validate".into(),
                secondary: None,
            });
        }
    }
    for ip in &new.ips {
        let before = old.and_then(|o| o.ips.iter().find(|s| s.egress_ip == ip.egress_ip));
        let old_node = before.and_then(|b| b.node.clone());
        if ip.node != old_node
            && let Some(n) = &ip.node
        {
            // Distinct reasons: the recorder folds events with the same
            // reason into one series and keeps the first note.
            let (reason, note) = match &old_node {
                Some(o) => (
                    "Moved",
                    format!("{} moved from node {o} to node {n}", ip.egress_ip),
                ),
                None => ("Assigned", format!("{} assigned to node {n}", ip.egress_ip)),
            };
            out.push(Event {
                type_: EventType::Normal,
                reason: reason.into(),
                note: Some(note),
                action: "Assign".into(),
                secondary: None,
            });
        }
        for t in [condition::CONFLICT, condition::INVALID] {
            if let Some((reason, message, _)) = condition_is(Some(new), &ip.egress_ip, t)
                && condition_is(old, &ip.egress_ip, t).is_none_or(|(r, _, _)| r != reason)
            {
                out.push(Event {
                    type_: EventType::Warning,
                    reason,
                    note: Some(message),
                    action: "Validate".into(),
                    secondary: None,
                });
            }
        }
        if ip.node.is_none()
            && let Some(c) = ip.conditions.iter().find(|c| {
                c.type_ == condition::ASSIGNED
                    && c.status == "False"
                    && c.reason == "NoAvailableNode"
            })
            && before.is_none_or(|b| {
                !b.conditions
                    .iter()
                    .any(|o| o.type_ == c.type_ && o.reason == c.reason)
            })
        {
            out.push(Event {
                type_: EventType::Warning,
                reason: c.reason.clone(),
                note: Some(c.message.clone()),
                action: "Assign".into(),
                secondary: None,
            });
        }
    }
    out
}

async fn assign_loop(
    client: Client,
    me: String,
    options: Options,
    down: watch::Receiver<BTreeSet<String>>,
) {
    let notify = Arc::new(Notify::new());
    let eip_api: Api<EgressIP> = Api::all(client.clone());
    let eips = reflect(eip_api.clone(), watcher::Config::default(), notify.clone());
    let nodes = reflect(
        Api::<Node>::all(client.clone()),
        watcher::Config::default(),
        notify.clone(),
    );
    let namespaces = reflect(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
        notify.clone(),
    );
    let pods = reflect(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default(),
        notify.clone(),
    );
    let leases = reflect(
        Api::<Lease>::namespaced(client.clone(), &options.namespace),
        watcher::Config::default().labels(&format!(
            "{}={}",
            claims::ROLE_LABEL,
            claims::ROLE_CLAIMS
        )),
        notify.clone(),
    );
    ready(&eips).await;
    ready(&nodes).await;
    ready(&namespaces).await;
    ready(&pods).await;
    ready(&leases).await;
    info!(identity = %me, "assigner synced");
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "egress-assigner".into(),
            instance: Some(me.clone()),
        },
    );
    let mut tracker = ClaimTracker::new(options.claim_ttl);
    let mut down = down;
    let (targets_tx, targets_rx) = watch::channel(BTreeMap::new());
    let (probe_down_tx, mut probe_down) = watch::channel(BTreeSet::new());
    let prober = options.heartbeat.clone().map(|hb| {
        tokio::spawn(async move {
            if let Err(e) = heartbeat::probe(hb, targets_rx, probe_down_tx).await {
                warn!(error = %e, "heartbeat prober stopped");
            }
        })
    });
    // Aborting the assigner task drops this guard and stops the prober.
    let _prober = AbortOnDrop(prober);
    // A closed channel stays "changed" forever: stop selecting on it.
    let (mut down_open, mut probe_open) = (true, true);
    loop {
        let now = Instant::now();
        let eip_list = eips_of(&eips);
        let node_list = nodes_info(&nodes);
        let lease_objs = leases.state();
        let lease_refs: Vec<&Lease> = lease_objs.iter().map(|l| &**l).collect();
        let view = tracker.view(&lease_refs, now);
        if let Some(hb) = &options.heartbeat {
            let targets: BTreeMap<String, std::net::SocketAddr> = node_list
                .iter()
                .filter(|n| n.labels.contains_key(&options.plan.assignable_label))
                .filter_map(|n| {
                    Some((
                        n.name.clone(),
                        std::net::SocketAddr::new(n.address?.into(), hb.port),
                    ))
                })
                .collect();
            targets_tx.send_if_modified(|cur| {
                let changed = *cur != targets;
                *cur = targets;
                changed
            });
        }
        let mut unavailable = down.borrow().clone();
        unavailable.extend(probe_down.borrow_and_update().iter().cloned());
        unavailable.extend(view.draining.iter().cloned());
        let pod_list: Vec<PodInfo> = pods
            .state()
            .iter()
            .filter_map(|p| PodInfo::from_pod(p))
            .collect();
        let checked = plan::check_all(&eip_list, &node_list, &options.plan);
        let (prev_nodes, prev_ids) = plan::previous_from_status(&eip_list);
        let assignments = plan::assign(
            &checked,
            &node_list,
            &prev_nodes,
            &unavailable,
            &options.plan,
        );
        let ids = plan::allocate_ids(&checked, &prev_ids);
        let selection = plan::select_pods(&checked, &namespaces_by_name(&namespaces), &pod_list);
        let stamp = Timestamp::now();
        for c in &checked {
            let Some(eip) = eip_list.iter().find(|e| e.name_any() == c.name) else {
                continue;
            };
            let status = plan::build_status(&plan::StatusInput {
                checked: c,
                assignments: &assignments,
                ids: &ids,
                claims: &view.live,
                selection: &selection,
                previous: eip.status.as_ref(),
                now: stamp,
            });
            if eip.status.as_ref() == Some(&status) {
                continue;
            }
            match eip_api
                .patch_status(
                    &c.name,
                    &PatchParams::default(),
                    &Patch::Merge(status_patch(&status)),
                )
                .await
            {
                Ok(_) => {
                    debug!(egressip = %c.name, "status written");
                    let reference = eip.object_ref(&());
                    for ev in events_for(eip.status.as_ref(), &status) {
                        if let Err(e) = recorder.publish(&ev, &reference).await {
                            warn!(egressip = %c.name, error = %e, "cannot publish event");
                        }
                    }
                }
                Err(e) => warn!(egressip = %c.name, error = %e, "cannot write status"),
            }
        }
        let wake = Duration::from_secs(1)
            .min(tracker.next_expiry(Instant::now()).unwrap_or(Duration::MAX));
        tokio::select! {
            _ = notify.notified() => {}
            r = down.changed(), if down_open => down_open = r.is_ok(),
            r = probe_down.changed(), if probe_open => probe_open = r.is_ok(),
            _ = tokio::time::sleep(wake) => {}
        }
    }
}

struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(v: serde_json::Value) -> EgressIPStatus {
        serde_json::from_value(v).unwrap()
    }

    fn cond(t: &str, st: &str, reason: &str) -> serde_json::Value {
        serde_json::json!({"type": t, "status": st, "reason": reason, "message": format!("{reason} details"),
            "lastTransitionTime": "2026-05-01T12:00:00Z"})
    }

    #[test]
    fn events_report_assignments_moves_and_new_problems_once() {
        let assigned = status(
            serde_json::json!({"ips": [{"egressIP": "172.18.0.100", "node": "node1", "policyId": 1,
            "conditions": [cond("Assigned", "True", "Assigned")]}]}),
        );
        let reasons = |evs: Vec<Event>| {
            evs.into_iter()
                .map(|e| (e.reason, e.note.unwrap()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            reasons(events_for(None, &assigned)),
            [(
                "Assigned".to_string(),
                "172.18.0.100 assigned to node node1".to_string()
            )]
        );
        assert!(events_for(Some(&assigned), &assigned).is_empty());
        let moved = status(
            serde_json::json!({"ips": [{"egressIP": "172.18.0.100", "node": "node2", "policyId": 1,
            "conditions": [cond("Assigned", "True", "Assigned")]}]}),
        );
        assert_eq!(reasons(events_for(Some(&assigned), &moved))[0].0, "Moved");

        let bad = status(serde_json::json!({
            "conditions": [cond("Conflict", "True", "PodsSelectedByOlderEgressIP")],
            "ips": [{"egressIP": "172.18.0.11", "conditions": [cond("Conflict", "True", "NodeAddress"), cond("Invalid", "False", "Valid")]},
                    {"egressIP": "172.18.0.101", "conditions": [cond("Assigned", "False", "NoAvailableNode")]}]}));
        let r = reasons(events_for(None, &bad));
        let names: Vec<&str> = r.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "PodsSelectedByOlderEgressIP",
                "NodeAddress",
                "NoAvailableNode"
            ]
        );
        assert!(events_for(Some(&bad), &bad).is_empty());
    }

    #[test]
    fn status_patch_clears_absent_fields() {
        let p = status_patch(&EgressIPStatus::default());
        assert_eq!(p["status"]["ips"], serde_json::Value::Null);
        assert!(p["status"].as_object().unwrap().contains_key("ips"));
        assert!(p["status"].as_object().unwrap().contains_key("conditions"));
        assert_eq!(p["status"]["items"], serde_json::json!([]));
    }

    #[test]
    fn options_are_checked() {
        Options::default().validate().unwrap();
        let bad = Options {
            claim_renew: Duration::from_secs(2),
            ..Options::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("claim renew")
        );
    }

    /// Racing nodes against one API server: however the requests
    /// interleave, exactly one ends up holding the IP's lock.
    mod locks {
        use super::super::*;
        use egress_fake_api::FakeApi;

        const NS: &str = "egress-system";

        const TTL: Duration = Duration::from_secs(10);

        /// `nodes` agents ask for the lock at once; those that knew `seen`
        /// (the lock as it was) for longer than the claim lifetime treat it
        /// as old. Returns the winners.
        async fn race(
            api: &Api<Lease>,
            ip: Ipv4Addr,
            nodes: usize,
            seen: Option<&Lease>,
        ) -> Vec<String> {
            let tasks: Vec<_> = (0..nodes)
                .map(|i| {
                    let api = api.clone();
                    let mut clock = claims::VersionClock::default();
                    if let Some(lock) = seen {
                        clock.note(lock, Instant::now() - 2 * TTL);
                    }
                    tokio::spawn(async move {
                        let me = format!("node{i}");
                        let got = acquire_lock(&api, NS, &me, ip, &mut clock, TTL)
                            .await
                            .unwrap();
                        matches!(got, LockOutcome::Acquired { .. }).then_some(me)
                    })
                })
                .collect();
            let mut winners = Vec::new();
            for t in tasks {
                winners.extend(t.await.unwrap());
            }
            winners
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn one_winner_when_creating_and_when_taking_over() {
            let fake = FakeApi::start().await;
            let api: Api<Lease> = Api::namespaced(fake.client(), NS);
            let ip: Ipv4Addr = "10.0.0.12".parse().unwrap();

            let winners = race(&api, ip, 8, None).await;
            assert_eq!(winners.len(), 1, "creators that won: {winners:?}");
            let lock = api.get(&claims::lock_name(ip)).await.unwrap();
            assert_eq!(claims::lock_holder(&lock), Some(winners[0].as_str()));

            // A lock taken just now is respected even though its holder has
            // not published a claim yet.
            let late = race(&api, ip, 8, None).await;
            assert_eq!(late, winners, "only the holder itself holds it");

            // The holder's claim is gone (no live holders are passed) and the
            // lock is old: everyone races to take it over; the version
            // precondition lets exactly one other node through.
            let old = lock.clone();
            let takers: Vec<String> = race(&api, ip, 8, Some(&old))
                .await
                .into_iter()
                .filter(|w| *w != winners[0])
                .collect();
            assert_eq!(takers.len(), 1, "takers that won: {takers:?}");
            let lock = api.get(&claims::lock_name(ip)).await.unwrap();
            assert_eq!(claims::lock_holder(&lock), Some(takers[0].as_str()));
            assert_eq!(lock.spec.as_ref().unwrap().lease_transitions, Some(1));

            // Only the holder can release it; a released lock is free at once.
            release_lock(&api, &winners[0], ip).await.unwrap();
            assert_eq!(
                claims::lock_holder(&api.get(&claims::lock_name(ip)).await.unwrap()),
                Some(takers[0].as_str())
            );
            release_lock(&api, &takers[0], ip).await.unwrap();
            let lock = api.get(&claims::lock_name(ip)).await.unwrap();
            assert_eq!(claims::lock_holder(&lock), None);
            let after_release = race(&api, ip, 8, None).await;
            assert_eq!(after_release.len(), 1, "{after_release:?}");
        }

        #[test]
        fn a_lock_in_another_name_is_lost_unless_it_is_the_version_we_replaced() {
            let lock = |holder: &str, rv: &str, ip: &str| {
                Arc::new(
                    serde_json::from_value::<Lease>(serde_json::json!({
                        "metadata": {
                            "name": claims::lock_name(ip.parse().unwrap()),
                            "resourceVersion": rv,
                            "annotations": {claims::LOCKED_IP_ANNOTATION: ip}
                        },
                        "spec": {"holderIdentity": holder}
                    }))
                    .unwrap(),
                )
            };
            let a: Ipv4Addr = "10.0.0.12".parse().unwrap();
            let b: Ipv4Addr = "10.0.0.13".parse().unwrap();
            let held = BTreeMap::from([(a, Some("4".to_string())), (b, None)]);
            // Still showing the version we replaced: the watch lags.
            assert!(lost_locks(&[lock("node2", "4", "10.0.0.12")], "node1", &held).is_empty());
            assert_eq!(
                lost_locks(&[lock("node2", "9", "10.0.0.12")], "node1", &held),
                vec![(a, "node2".to_string())]
            );
            assert_eq!(
                lost_locks(&[lock("node3", "2", "10.0.0.13")], "node1", &held),
                vec![(b, "node3".to_string())]
            );
            // Ours, released, or not one we hold: nothing lost.
            assert!(
                lost_locks(
                    &[
                        lock("node1", "9", "10.0.0.12"),
                        lock("", "3", "10.0.0.13"),
                        lock("node2", "1", "10.0.0.14"),
                    ],
                    "node1",
                    &held
                )
                .is_empty()
            );
        }
    }
}
