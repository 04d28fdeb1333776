//! The node session: every agent projects the cluster onto its node, claims
//! the IPs the status gives it (lock, then claims Lease), renews and
//! withdraws them, and hands the result to the agent.
//!
//! Three tasks, so that work growing with the cluster never delays a
//! renewal or a withdrawal:
//! - the projection ([`project_task`]): the node's watches, the desired
//!   state and the [`Observation`] the session needs, computed on the
//!   blocking pool whenever a watch changes;
//! - the session ([`run_session`]): the [`Session`] state machine and the
//!   executor of its actions. It owns the renewal and fence timers; its
//!   requests run as tasks of their own and report back, so that neither a
//!   slow lock request nor a projection holds up a renewal;
//! - the subnet publisher ([`publish_subnets_task`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kube::{Api, Client, ResourceExt, api::DynamicObject, runtime::watcher};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tracing::{debug, info, warn};

use super::{
    AbortOnDrop, ControllerLink, Desired, Error, Options, election,
    leases::{self, ClaimWriter, RequestError, acquire_lock, fresh_claims, release_lock},
    publish_subnets,
    watches::{ClusterWatches, namespaces_by_name, node_infos, ready, reflect, role},
};
use crate::{
    claims::{self, ClaimTracker, VersionClock},
    crd::EgressIP,
    decode::{self, Decoder},
    facts::{EgressSubnet, PodInfo},
    leaving::leaving,
    project::{self, Projection},
    report,
    session::{self, Action, Fresh, Input, LockSeen, Observation, Session, SessionConfig},
};

/// Where the claims of other nodes and the IP locks are judged: shared by
/// the projection (watched objects) and the session's fresh reads, so that
/// both use one clock per Lease.
struct Clocks {
    claims: Mutex<ClaimTracker>,
    locks: Mutex<VersionClock>,
}

/// What the projection task hands the session.
#[derive(Debug, PartialEq)]
struct Projected {
    observation: Observation,
    /// Egress IP -> the EgressIP listing it in status (for fresh reads).
    listed_in: BTreeMap<Ipv4Addr, String>,
}

/// The agent's desired state: the latest projection restricted to the IPs
/// the session lets it use. Either side updates its part and sends; the
/// lock orders them, so that a projection never goes out with a stale
/// `active` nor the reverse.
struct DesiredOut {
    parts: Mutex<(Option<Projection>, Option<BTreeSet<Ipv4Addr>>)>,
    tx: watch::Sender<Option<Desired>>,
    node: String,
}

impl DesiredOut {
    /// From the projection task, for every new projection.
    fn set_projection(&self, p: Projection) {
        let mut parts = self.parts.lock().expect("desired state poisoned");
        parts.0 = Some(p);
        self.send(&parts);
    }

    /// From the session, when the IPs it lets the agent use change.
    fn set_active(&self, active: BTreeSet<Ipv4Addr>) {
        let mut parts = self.parts.lock().expect("desired state poisoned");
        parts.1 = Some(active);
        self.send(&parts);
    }

    /// Nothing goes out before the session has said what may be used.
    fn send(&self, parts: &(Option<Projection>, Option<BTreeSet<Ipv4Addr>>)) {
        let (Some(p), Some(active)) = parts else {
            return;
        };
        let p = restrict(p, active);
        let next = Desired {
            state: p.state,
            claims: p.claims,
            local_pods: p.local_pods,
        };
        self.tx.send_if_modified(|cur| {
            if cur.as_ref() == Some(&next) {
                return false;
            }
            debug!(node = %self.node, policies = next.state.policies.len(), pods = next.state.pods.len(), claims = next.claims.len(), "desired state changed");
            *cur = Some(next.clone());
            true
        });
    }
}

/// Keeps only the claims the session lets the agent use; others lose their
/// egress node here (they become live once their write succeeded).
fn restrict(p: &Projection, active: &BTreeSet<Ipv4Addr>) -> Projection {
    let mut p = p.clone();
    p.claims.retain(|c| active.contains(&c.ip));
    let me = p.state.node_addr;
    for policy in p.state.policies.values_mut() {
        if me.is_some() && policy.egress_node == me && !active.contains(&policy.egress_ip) {
            policy.egress_node = None;
        }
    }
    p
}

/// Runs this node's session until it exits (see [`crate::AgentLink::shutdown`]).
pub(super) async fn run_session(
    client: Client,
    node_name: String,
    options: Options,
    link: ControllerLink,
    candidate: watch::Sender<Option<bool>>,
) -> Result<(), Error> {
    let ControllerLink {
        desired,
        fence,
        mut held,
        mut applied,
        subnets,
        down: _,
        mut shutdown,
    } = link;
    let clocks = Arc::new(Clocks {
        claims: Mutex::new(ClaimTracker::new(options.kubernetes.claim_ttl)),
        locks: Mutex::default(),
    });
    let out = Arc::new(DesiredOut {
        parts: Mutex::default(),
        tx: desired,
        node: node_name.clone(),
    });
    let (projected_tx, mut projected) = watch::channel(None);
    let _projection = AbortOnDrop(Some(tokio::spawn(project_task(
        client.clone(),
        node_name.clone(),
        options.clone(),
        clocks.clone(),
        out.clone(),
        projected_tx,
        candidate,
    ))));
    let _subnets = AbortOnDrop(Some(tokio::spawn(publish_subnets_task(
        client.clone(),
        node_name.clone(),
        options.subnets.clone(),
        subnets,
    ))));

    let lease_api: Api<Lease> = Api::namespaced(client.clone(), &options.kubernetes.namespace);
    let mut exec = Executor {
        eip_api: Api::all(client.clone()),
        writer: ClaimWriter {
            api: lease_api.clone(),
            namespace: options.kubernetes.namespace.clone(),
            node: node_name.clone(),
            ttl: options.kubernetes.claim_ttl,
            timeout: options.kubernetes.claim_renew / 2,
            assigner: options.kubernetes.assigner,
        },
        lease_api,
        node: node_name.clone(),
        options: options.clone(),
        clocks,
        lock_slots: Arc::new(Semaphore::new(16)),
        releases: Vec::new(),
    };
    let mut session = Session::new(SessionConfig {
        node: node_name.clone(),
        claim_ttl: options.kubernetes.claim_ttl,
        claim_renew: options.kubernetes.claim_renew,
        restart_grace: options.kubernetes.restart_grace,
        drain_timeout: options.kubernetes.drain_timeout,
    });
    let (results_tx, mut results) = mpsc::unbounded_channel::<Input>();
    let mut current: Option<Arc<Projected>> = None;
    let mut active: Option<BTreeSet<Ipv4Addr>> = None;
    let mut renewals = RenewalLog::default();
    loop {
        let deadline = session.deadline(Instant::now());
        let input = tokio::select! {
            // The session's own events first: a renewal must not wait
            // behind a burst of projections.
            biased;
            Some(input) = results.recv() => input,
            _ = sleep_until(deadline) => Input::Tick,
            r = shutdown.changed() => {
                // A dropped sender: the agent is gone, nobody applies
                // anything any more.
                if r.is_err() {
                    return Ok(());
                }
                if *shutdown.borrow_and_update() {
                    info!(node = %node_name, "stopping: handing egress IPs over or keeping them for a successor");
                    // Drain or restart, decided on a fresh read of the Node:
                    // the watch may lag behind a drain that just began.
                    exec.read_leaving(&results_tx);
                }
                continue;
            }
            r = held.changed() => {
                if r.is_err() {
                    return Ok(());
                }
                Input::Held(held.borrow_and_update().clone())
            }
            // Published with the next claims write, which the session
            // makes for it (never a write of its own, see `crate::session`).
            r = applied.changed() => {
                if r.is_err() {
                    return Ok(());
                }
                let Some(report) = applied.borrow_and_update().clone() else { continue };
                Input::Applied(report)
            }
            r = projected.changed() => {
                if r.is_err() {
                    return Err(Error::Stopped("the node's projection task ended"));
                }
                let Some(p) = projected.borrow_and_update().clone() else { continue };
                let unchanged = current.as_ref().is_some_and(|c| c.observation == p.observation);
                current = Some(p.clone());
                if unchanged {
                    continue;
                }
                Input::Observed(p.observation.clone())
            }
        };
        let now = Instant::now();
        let actions = session.step(input.clone(), now);
        // Logged before the actions: a new write's due time replaces this
        // one's, and the last write (a restart grace) comes with `Exit`.
        if let Input::Written { write, sent, ok } = &input {
            renewals.written(&node_name, write, *sent, *ok, now);
        }
        for action in actions {
            match action {
                Action::Write(w) => {
                    renewals.note_due(&session, now);
                    exec.write(w, &results_tx);
                }
                Action::Check(ips) => exec.check(ips, current.clone(), &results_tx),
                Action::Lock { ip, adopt } => exec.lock(ip, adopt, &results_tx),
                Action::Release(ip) => exec.release(ip),
                Action::Program {
                    active: next,
                    fence: f,
                } => {
                    // The fence first: the agent gives addresses it adds
                    // for `desired` the lifetime of the fence in place. The
                    // first is sent even if it equals the channel's initial
                    // `None`: until it comes the agent keeps the previous
                    // agent's terms (see `AgentLink::fence`).
                    let first = active.is_none();
                    fence.send_if_modified(|cur| {
                        let changed = first || *cur != f;
                        *cur = f;
                        changed
                    });
                    if active.as_ref() != Some(&next) {
                        log_program(&node_name, &next, f, now, &options);
                        out.set_active(next.clone());
                        active = Some(next);
                    }
                }
                Action::Exit => {
                    exec.finish_releases().await;
                    info!(node = %node_name, "session over");
                    return Ok(());
                }
            }
        }
    }
}

/// Sleeps until `deadline`; forever without one.
pub(crate) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

fn log_program(
    node: &str,
    active: &BTreeSet<Ipv4Addr>,
    fence: Option<Instant>,
    now: Instant,
    options: &Options,
) {
    let until = fence.map(|f| f.saturating_duration_since(now));
    if active.is_empty() {
        info!(node, "holding no egress IP");
    } else if until.is_some_and(|u| u > options.kubernetes.claim_ttl) {
        info!(node, ips = %claims::format_claims(active), valid_for = ?until, "egress IPs kept for a successor under the restart grace");
    } else {
        debug!(node, ips = %claims::format_claims(active), valid_for = ?until, "egress IPs held");
    }
}

/// Logs every claims write under the target `egress_k8s::renewal`: how
/// late it was sent against when it was due (`late_ms`: the renewal jitter)
/// and how long the server took. `RUST_LOG=egress_k8s::renewal=debug`.
#[derive(Default)]
struct RenewalLog {
    due: Option<Instant>,
    published: Option<session::ClaimsWrite>,
}

impl RenewalLog {
    fn note_due(&mut self, session: &Session, now: Instant) {
        // The session writes when due or when something changed: a write
        // earlier than due is a change, not a late renewal.
        self.due = session.renewal_due().filter(|d| *d <= now);
    }

    fn written(
        &mut self,
        node: &str,
        w: &session::ClaimsWrite,
        sent: Instant,
        ok: bool,
        now: Instant,
    ) {
        let late_ms = self
            .due
            .take()
            .map(|d| sent.saturating_duration_since(d).as_secs_f64() * 1e3);
        let took_ms = now.saturating_duration_since(sent).as_secs_f64() * 1e3;
        debug!(target: "egress_k8s::renewal", node, ok, late_ms, took_ms, ips = w.ips.len(), "claims lease written");
        if !ok {
            warn!(node, "cannot publish claims");
            return;
        }
        let before = self.published.replace(w.clone());
        let claims_changed = before.as_ref().is_none_or(|b| {
            (&b.ips, b.draining, b.restart_grace) != (&w.ips, w.draining, w.restart_grace)
        });
        if claims_changed {
            info!(node, claims = %claims::format_claims(&w.ips), draining = w.draining, restart_grace = ?w.restart_grace, "published claims");
        }
        if let Some(r) = &w.report
            && before.as_ref().is_none_or(|b| b.report.as_ref() != Some(r))
        {
            info!(node, policy_ids = %report::format_ids(&r.present), failed = r.failed.len(), "published the datapath report");
        }
    }
}

/// Performs the session's requests, each as a task of its own that reports
/// its outcome back.
struct Executor {
    eip_api: Api<EgressIP>,
    lease_api: Api<Lease>,
    writer: ClaimWriter,
    node: String,
    options: Options,
    clocks: Arc<Clocks>,
    lock_slots: Arc<Semaphore>,
    releases: Vec<tokio::task::JoinHandle<()>>,
}

impl Executor {
    fn write(&self, w: session::ClaimsWrite, results: &mpsc::UnboundedSender<Input>) {
        let (writer, results) = (self.writer.clone(), results.clone());
        tokio::spawn(async move {
            let sent = Instant::now();
            let outcome = writer.write(&w).await;
            if let Err(e) = &outcome {
                debug!(node = %writer.node, error = %e, "claims write failed");
            }
            let _ = results.send(Input::Written {
                write: w,
                sent,
                ok: outcome.is_ok(),
            });
        });
    }

    fn check(
        &self,
        ips: BTreeSet<Ipv4Addr>,
        projected: Option<Arc<Projected>>,
        results: &mpsc::UnboundedSender<Input>,
    ) {
        let eip_api = self.eip_api.clone();
        let lease_api = self.lease_api.clone();
        let node = self.node.clone();
        let limit = self.options.kubernetes.claim_renew;
        let clocks = self.clocks.clone();
        let results = results.clone();
        tokio::spawn(async move {
            let names: BTreeSet<String> = ips
                .iter()
                .filter_map(|ip| projected.as_ref()?.listed_in.get(ip).cloned())
                .collect();
            let assigned = confirm_assigned(&eip_api, &names, &node, &ips, limit).await;
            let elsewhere = fresh_claims(&lease_api, &node, &clocks.claims, limit).await;
            let fresh = match (assigned, elsewhere) {
                (Ok(assigned), Ok(view)) => Some(Fresh {
                    assigned,
                    claimed_elsewhere: ips
                        .iter()
                        .filter(|ip| view.live.contains_key(ip))
                        .copied()
                        .collect(),
                }),
                (Err(e), _) | (_, Err(e)) => {
                    warn!(node = %node, error = %e, "cannot confirm claims; not claiming new IPs yet");
                    None
                }
            };
            let _ = results.send(Input::Checked { ips, fresh });
        });
    }

    fn lock(&self, ip: Ipv4Addr, adopt: bool, results: &mpsc::UnboundedSender<Input>) {
        let api = self.lease_api.clone();
        let (namespace, node) = (self.options.kubernetes.namespace.clone(), self.node.clone());
        let (ttl, limit) = (
            self.options.kubernetes.claim_ttl,
            self.options.kubernetes.claim_renew,
        );
        let (clocks, slots, results) = (
            self.clocks.clone(),
            self.lock_slots.clone(),
            results.clone(),
        );
        tokio::spawn(async move {
            let _slot = slots.acquire_owned().await;
            let attempt = leases::bounded(
                limit,
                acquire_lock(&api, &namespace, &node, ip, &clocks.locks, ttl, adopt),
            )
            .await;
            let outcome = match attempt {
                Ok(leases::LockOutcome::Acquired { replaced }) => {
                    if adopt {
                        info!(node, %ip, "adopted the claim of the previous agent");
                    }
                    session::LockOutcome::Acquired { replaced }
                }
                Ok(leases::LockOutcome::Refused(why)) => {
                    info!(node, %ip, why, "not claiming: the IP's lock is not ours");
                    session::LockOutcome::Refused
                }
                Err(e) => {
                    warn!(node, %ip, error = %e, "cannot take the IP's lock; not claiming it yet");
                    session::LockOutcome::Failed
                }
            };
            let _ = results.send(Input::Locked { ip, outcome });
        });
    }

    /// Reads this node's Node afresh and reports the stop with whether it
    /// is leaving.
    fn read_leaving(&self, results: &mpsc::UnboundedSender<Input>) {
        let api: Api<Node> = Api::all(self.lease_api.clone().into_client());
        let node = self.node.clone();
        let limit = self.options.kubernetes.claim_renew;
        let results = results.clone();
        tokio::spawn(async move {
            let leaving = match leases::bounded(limit, api.get_opt(&node)).await {
                Ok(n) => n.as_ref().and_then(leaving),
                Err(e) => {
                    warn!(node, error = %e, "cannot read the Node at shutdown; deciding on the watched one");
                    None
                }
            };
            match &leaving {
                Some(why) => info!(
                    node,
                    why, "the node is leaving: handing its egress IPs over"
                ),
                None => info!(
                    node,
                    "not leaving: keeping the egress IPs for the next agent"
                ),
            }
            let _ = results.send(Input::Shutdown { leaving });
        });
    }

    fn release(&mut self, ip: Ipv4Addr) {
        let api = self.lease_api.clone();
        let node = self.node.clone();
        let limit = self.options.kubernetes.claim_renew;
        self.releases.retain(|t| !t.is_finished());
        self.releases.push(tokio::spawn(async move {
            match leases::bounded(limit, release_lock(&api, &node, ip)).await {
                Ok(()) => debug!(node, %ip, "released the IP's lock"),
                Err(e) => warn!(node, %ip, error = %e, "cannot release the IP's lock (it is free anyway once our claim is gone)"),
            }
        }));
    }

    /// Lets the last lock releases through before the session ends (each is
    /// bounded): the next holder then finds the locks free.
    async fn finish_releases(&mut self) {
        for t in self.releases.drain(..) {
            let _ = t.await;
        }
    }
}

/// Which of `ips` the API server's current status assigns to `me`: a fresh
/// read of the EgressIPs (`names`) that list them in our cached view.
async fn confirm_assigned(
    api: &Api<EgressIP>,
    names: &BTreeSet<String>,
    me: &str,
    ips: &BTreeSet<Ipv4Addr>,
    limit: Duration,
) -> Result<BTreeSet<Ipv4Addr>, RequestError> {
    let mut out = BTreeSet::new();
    for name in names {
        let Some(eip) = leases::bounded(limit, api.get_opt(name)).await? else {
            continue;
        };
        for s in eip.status.iter().flat_map(|s| &s.ips) {
            if s.node.as_deref() == Some(me)
                && let Ok(ip) = s.egress_ip.parse::<Ipv4Addr>()
                && ips.contains(&ip)
            {
                out.insert(ip);
            }
        }
    }
    Ok(out)
}

/// Publishes this node's subnets at start (retrying until it succeeds) and
/// again whenever the agent reports new ones.
async fn publish_subnets_task(
    client: Client,
    node: String,
    initial: Vec<EgressSubnet>,
    mut updates: watch::Receiver<Option<Vec<EgressSubnet>>>,
) {
    let mut wanted = initial;
    let mut published: Option<Vec<EgressSubnet>> = None;
    loop {
        if let Some(s) = updates.borrow_and_update().clone() {
            wanted = s;
        }
        if published.as_ref() != Some(&wanted) {
            match publish_subnets(&client, &node, &wanted).await {
                Ok(()) => published = Some(wanted.clone()),
                Err(e) => warn!(node, error = %e, "cannot publish egress subnets; retrying"),
            }
        }
        let retry = published.as_ref() != Some(&wanted);
        tokio::select! {
            r = updates.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(1)), if retry => {}
        }
    }
}

/// The node's watches and its projection, recomputed on every change (and
/// when a claim it depends on expires).
async fn project_task(
    client: Client,
    node_name: String,
    options: Options,
    clocks: Arc<Clocks>,
    desired: Arc<DesiredOut>,
    out: watch::Sender<Option<Arc<Projected>>>,
    candidate: watch::Sender<Option<bool>>,
) {
    let notify = Arc::new(Notify::new());
    // Every node's pods, not only ours (kept slim in the PodStore): as an
    // egress node we accept a pod's steered traffic only from the node that
    // hosts it and only while a policy it steers to selects it (project.rs).
    let watches = ClusterWatches::start(
        &client,
        &options.kubernetes.namespace,
        watcher::Config::default(),
        &notify,
    );
    let locks = reflect(
        Api::<Lease>::namespaced(client.clone(), &options.kubernetes.namespace),
        role(claims::ROLE_IP_LOCK),
        notify.clone(),
    );
    watches.ready().await;
    ready(&locks).await;
    info!(node = %node_name, "watches synced");
    let own_lease = claims::lease_name(&node_name);
    // Moved into each computation and handed back: it remembers each
    // EgressIP's verdict, so that an unchanged one is decoded (and a bad
    // one logged) once.
    let mut decoder = Some(Decoder::default());
    loop {
        let now = Instant::now();
        let lease_objs = watches.claims.state();
        let lock_objs = locks.state();
        let (view, next_expiry) = {
            let mut lock_clock = clocks.locks.lock().expect("lock clock poisoned");
            for lock in &lock_objs {
                lock_clock.note(lock, now);
            }
            lock_clock.retain(&lock_objs.iter().map(|l| l.name_any()).collect());
            drop(lock_clock);
            let others: Vec<&Lease> = lease_objs
                .iter()
                .map(|l| &**l)
                .filter(|l| l.metadata.name.as_deref() != Some(own_lease.as_str()))
                .collect();
            let mut tracker = clocks.claims.lock().expect("claim tracker poisoned");
            (tracker.view(&others, now), tracker.next_expiry(now))
        };
        let input = ProjectionInput {
            node_name: node_name.clone(),
            options: options.clone(),
            eips: watches.eips.state(),
            decoder: decoder.take().unwrap_or_default(),
            nodes: watches.nodes.state(),
            namespaces: namespaces_by_name(&watches.namespaces),
            pods: watches.pods.snapshot(),
            leases: lease_objs,
            locks: lock_objs,
            claims: view.live,
        };
        // Grows with the cluster: on the blocking pool, off the workers
        // that run the session.
        let desired = desired.clone();
        let computed = tokio::task::spawn_blocking(move || {
            let (projection, projected, is_candidate, used) = input.compute();
            desired.set_projection(projection);
            (projected, is_candidate, used)
        });
        let Ok((projected, is_candidate, used)) = computed.await else {
            warn!(node = %node_name, "projection failed; retrying on the next change");
            notify.notified().await;
            continue;
        };
        decoder = Some(used);
        out.send_if_modified(|cur| {
            if cur.as_deref() == Some(&projected) {
                return false;
            }
            *cur = Some(Arc::new(projected));
            true
        });
        candidate.send_if_modified(|cur| {
            let changed = *cur != Some(is_candidate);
            *cur = Some(is_candidate);
            changed
        });
        let wake = next_expiry
            .unwrap_or(Duration::MAX)
            .min(Duration::from_secs(60));
        tokio::select! {
            _ = notify.notified() => {}
            _ = tokio::time::sleep(wake) => {}
        }
    }
}

/// A snapshot of the node's watches.
struct ProjectionInput {
    node_name: String,
    options: Options,
    /// Raw, decoded with `decoder` (see [`crate::decode`]).
    eips: Vec<Arc<DynamicObject>>,
    decoder: Decoder,
    nodes: Vec<Arc<Node>>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pods: Vec<PodInfo>,
    leases: Vec<Arc<Lease>>,
    locks: Vec<Arc<Lease>>,
    claims: BTreeMap<Ipv4Addr, BTreeSet<String>>,
}

impl ProjectionInput {
    /// The projection, what the session needs of it, whether this node
    /// stands by as assigner, and the decoder to use next time.
    fn compute(mut self) -> (Projection, Projected, bool, Decoder) {
        let node_list = node_infos(&self.nodes);
        let eips: Vec<EgressIP> = decode::snapshot(&mut self.decoder, &self.eips).good;
        // Another node's claim on an IP whose lock names this node is stale
        // (a node claims only while it holds the lock; one that took it from
        // us did so after our claim lapsed, and then we have withdrawn and
        // must lock again anyway). Judged live by a cold clock, such a claim
        // (a dead former holder's Lease still listing the IP) would
        // otherwise make a restarted agent give up the IPs it adopts.
        let mut others = self.claims;
        others.retain(|ip, _| {
            !self.locks.iter().any(|l| {
                locked_ip(l) == Some(*ip) && claims::lock_holder(l) == Some(&self.node_name)
            })
        });
        let projection = project::project(&project::ProjectInput {
            node_name: &self.node_name,
            node_addr: self.options.node_addr,
            eips: &eips,
            nodes: &node_list,
            namespaces: &self.namespaces,
            pods: &self.pods,
            claims: &others,
            may_hold: true,
            global_excluded: &self.options.global_excluded,
            config: &self.options.plan,
        });
        let own_lease = claims::lease_name(&self.node_name);
        let own_claims = self
            .leases
            .iter()
            .find(|l| l.metadata.name.as_deref() == Some(own_lease.as_str()))
            .and_then(|l| l.annotations().get(claims::CLAIMED_ANNOTATION).cloned())
            .map(|raw| claims::parse_claims(&raw))
            .unwrap_or_default();
        let locks = self
            .locks
            .iter()
            .filter_map(|lock| {
                let ip = locked_ip(lock)?;
                Some((
                    ip,
                    LockSeen {
                        holder: claims::lock_holder(lock).map(str::to_string),
                        version: lock.metadata.resource_version.clone(),
                    },
                ))
            })
            .collect();
        let me = self
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(self.node_name.as_str()));
        let observation = Observation {
            wanted: projection.claims.iter().map(|c| c.ip).collect(),
            locks,
            own_claims,
            leaving: me.and_then(|n| leaving(n)),
        };
        let listed_in = eips
            .iter()
            .flat_map(|e| {
                let name = e.name_any();
                e.status
                    .iter()
                    .flat_map(|s| &s.ips)
                    .filter_map(move |s| Some((s.egress_ip.parse().ok()?, name.clone())))
            })
            .collect();
        let lease_refs: Vec<&Lease> = self.leases.iter().map(|l| &**l).collect();
        let is_candidate = election::standbys(
            &node_list,
            &lease_refs,
            self.options.kubernetes.assigner_candidates,
        )
        .contains(&self.node_name);
        (
            projection,
            Projected {
                observation,
                listed_in,
            },
            is_candidate,
            self.decoder,
        )
    }
}

/// The egress IP a lock Lease guards.
fn locked_ip(lock: &Lease) -> Option<Ipv4Addr> {
    lock.annotations()
        .get(claims::LOCKED_IP_ANNOTATION)?
        .parse()
        .ok()
}
