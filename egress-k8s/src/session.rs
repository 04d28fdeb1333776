//! The node session as a pure state machine: which egress IPs this node
//! claims, locks, publishes, renews, withdraws and hands over, and until
//! when the agent may use them.
//!
//! [`Session::step`] takes one [`Input`] (what the watches show, what the
//! agent holds, the outcome of a write, a fresh read or a lock request, a
//! shutdown request, or only the clock moving) and the current time, and
//! returns the [`Action`]s to perform. It does no I/O and reads no clock:
//! `controller::node` performs the actions and feeds their outcomes back,
//! and every fault is a unit test below (a sequence of inputs and clock
//! readings, and the actions expected).
//!
//! The rules, in the order a claim lives:
//! - **Claim.** An IP the projection gives this node is first confirmed
//!   with fresh reads (the status still names us, no other node's claim on
//!   it is live: our watches may lag), then its lock is taken (create or
//!   version-conditioned replace), then it is published in our claims
//!   Lease. Only once a write that lists it has succeeded is it *active*:
//!   handed to the agent to put on an interface and translate for.
//! - **Renew.** The claims Lease is rewritten every `renew` while it lists
//!   anything, paced from when the last write was sent.
//! - **Fence.** Others may take our IPs once they have seen our Lease
//!   unchanged for its lifetime, which starts no earlier than when we sent
//!   the write. So the agent may use them until `sent + lifetime - renew`
//!   (the fence, [`Action::Program`]); at that instant, if no later write
//!   has succeeded, the session withdraws everything by itself, and IPs
//!   must be confirmed and locked again before they are used again (the
//!   lock may have changed hands meanwhile).
//! - **Lose.** An IP whose lock the watch shows in another node's name (not
//!   the version we replaced) is withdrawn at once and no longer published.
//! - **Leave.** An IP the projection no longer gives us is withdrawn at
//!   once, but stays published until the agent reports its address gone;
//!   then a write drops it, then its lock is released.
//! - **Stop.** On shutdown, a node that is being drained or deleted hands
//!   its IPs over (`draining` in the Lease: the assigner moves them; then
//!   they leave as above, within `drain_timeout`). Any other stop is a
//!   restart: the Lease is rewritten with a restart grace, during which the
//!   others treat the claims as live and the assigner keeps the IPs here;
//!   the fence extends to the end of the grace, so that the datapath and
//!   addresses the agent leaves in place keep serving.
//! - **Report.** The agent's datapath report (the policy ids its maps hold,
//!   the policies it failed to program: [`crate::report`]) rides in the
//!   claims writes; a new report makes the session write, with exactly the
//!   claims it would publish anyway. Never a write of its own beside the
//!   session's: the others take any change of the Lease for a renewal, so
//!   a report written after the fence would revive a lapsed claim.
//! - **Adopt.** A new session (a successor agent of the same node) adopts
//!   the IPs its node's claims Lease lists and the projection still gives
//!   it, once the status confirms them and their lock still names this
//!   node: nothing is released, moved or announced again. Until adoption is
//!   settled and the first write is done, nothing is programmed (the agent
//!   keeps what the previous one left, under the previous fence).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use crate::report::DatapathReport;

/// Timings of the session (see [`crate::Options`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// This node's name: locks naming it are ours.
    pub node: String,
    /// How long others treat a claim as live after it last changed.
    pub claim_ttl: Duration,
    /// How often the claims Lease is rewritten; also the safety margin of
    /// the fence and the retry period of failed reads.
    pub claim_renew: Duration,
    /// How long a restarting node's claims stay live without renewal
    /// (zero: every stop hands the IPs over).
    pub restart_grace: Duration,
    /// How long a hand-over waits for the assigner to move the IPs.
    pub drain_timeout: Duration,
}

/// What the watches show this node (computed by the projection task).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observation {
    /// The IPs the projection gives this node: the status names it, the IP
    /// is valid, and no other node's claim on it is live in our view.
    pub wanted: BTreeSet<Ipv4Addr>,
    /// The IP locks as the watch shows them.
    pub locks: BTreeMap<Ipv4Addr, LockSeen>,
    /// What this node's own claims Lease lists: what a previous agent of
    /// this node held (read at start for adoption).
    pub own_claims: BTreeSet<Ipv4Addr>,
    /// Why this node is being drained or deleted, if it is (see
    /// [`crate::leaving`]).
    pub leaving: Option<String>,
}

/// One lock Lease as seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LockSeen {
    pub holder: Option<String>,
    pub version: Option<String>,
}

/// The claims Lease as one write leaves it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClaimsWrite {
    pub ips: BTreeSet<Ipv4Addr>,
    /// The node is handing its IPs over.
    pub draining: bool,
    /// The node is restarting: its claims stay live this long.
    pub restart_grace: Option<Duration>,
    /// The agent's latest datapath report (`None` until it has applied
    /// something: the Lease then keeps the previous agent's, which
    /// describes the datapath it left in place).
    pub report: Option<DatapathReport>,
}

/// Fresh reads from the API server for IPs about to be claimed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fresh {
    /// Those the current status assigns to this node.
    pub assigned: BTreeSet<Ipv4Addr>,
    /// Those another node's claim is live on (judged with our clock).
    pub claimed_elsewhere: BTreeSet<Ipv4Addr>,
}

/// The outcome of a lock request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockOutcome {
    /// Ours; `replaced` is the version we replaced when taking it over (the
    /// watch may show it for a while: that is not a loss).
    Acquired { replaced: Option<String> },
    /// Another node holds it (or, when adopting, it no longer names us).
    Refused,
    /// No answer or an error.
    Failed,
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// The watches synced, or changed.
    Observed(Observation),
    /// The agent reports the egress IPs on its interfaces.
    Held(BTreeSet<Ipv4Addr>),
    /// The agent reports what its datapath holds after an apply.
    Applied(DatapathReport),
    /// The agent is stopping (SIGTERM). `leaving`: why the node is being
    /// drained or deleted according to a fresh read of its Node object
    /// (the watch may lag behind a drain that just began); `None` when it
    /// is not, or when the read failed (then the watched Node decides).
    Shutdown { leaving: Option<String> },
    /// A write asked for with [`Action::Write`] ended; `sent` is when it
    /// was sent (the server may have applied it at any point since).
    Written {
        write: ClaimsWrite,
        sent: Instant,
        ok: bool,
    },
    /// The fresh reads asked for with [`Action::Check`]; `None`: failed.
    Checked {
        ips: BTreeSet<Ipv4Addr>,
        fresh: Option<Fresh>,
    },
    /// A lock request asked for with [`Action::Lock`] ended.
    Locked { ip: Ipv4Addr, outcome: LockOutcome },
    /// Only time passed (the deadline of [`Session::deadline`]).
    Tick,
}

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Write the claims Lease; answer with [`Input::Written`].
    Write(ClaimsWrite),
    /// Read the status of these IPs and the others' claims afresh; answer
    /// with [`Input::Checked`].
    Check(BTreeSet<Ipv4Addr>),
    /// Take the IP's lock (`adopt`: only confirm that it names us, never
    /// create or take it over); answer with [`Input::Locked`].
    Lock { ip: Ipv4Addr, adopt: bool },
    /// Clear our name from the IP's lock (best effort, no answer).
    Release(Ipv4Addr),
    /// Hand the agent the IPs it may hold (`active`) and until when
    /// (`fence`; `None` when it holds nothing).
    Program {
        active: BTreeSet<Ipv4Addr>,
        fence: Option<Instant>,
    },
    /// The session is over: the IPs are handed over, or kept for a
    /// successor under the restart grace.
    Exit,
}

/// Where one IP is in its life on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// Wanted; to be confirmed with fresh reads (not before `retry`).
    Wanted {
        adopt: bool,
        retry: Option<Instant>,
    },
    Checking {
        adopt: bool,
    },
    Locking {
        adopt: bool,
    },
    /// Our lock (since `at`); active once a write listing it succeeds.
    Locked {
        replaced: Option<String>,
        at: Instant,
    },
    /// No longer ours to use: withdrawn, published until the agent reports
    /// its address gone, then its lock is released.
    Leaving,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StopKind {
    /// Drained or deleted node: hand the IPs over.
    HandOver,
    /// Anything else: keep them for a successor during the grace.
    Restart,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stop {
    kind: StopKind,
    since: Instant,
}

#[derive(Debug)]
pub struct Session {
    cfg: SessionConfig,
    /// `None` until the watches have synced.
    observed: Option<Observation>,
    /// `None` until the agent first reports.
    held: Option<BTreeSet<Ipv4Addr>>,
    /// The agent's latest datapath report, to publish.
    report: Option<DatapathReport>,
    ips: BTreeMap<Ipv4Addr, Phase>,
    /// The last successful write and when it was sent.
    published: Option<(ClaimsWrite, Instant)>,
    /// A write in flight.
    writing: Option<ClaimsWrite>,
    /// A write has ended (either way) since the session started.
    wrote_once: bool,
    /// A failed write is retried then, not at once.
    write_retry: Option<Instant>,
    /// A check in flight.
    checking: bool,
    stop: Option<Stop>,
    /// What the agent was last given.
    programmed: Option<(BTreeSet<Ipv4Addr>, Option<Instant>)>,
    exited: bool,
}

impl Session {
    pub fn new(cfg: SessionConfig) -> Self {
        Self {
            cfg,
            observed: None,
            held: None,
            report: None,
            ips: BTreeMap::new(),
            published: None,
            writing: None,
            wrote_once: false,
            write_retry: None,
            checking: false,
            stop: None,
            programmed: None,
            exited: false,
        }
    }

    /// Takes `input` at `now` and returns what to do.
    pub fn step(&mut self, input: Input, now: Instant) -> Vec<Action> {
        if self.exited {
            return Vec::new();
        }
        let mut out = Vec::new();
        match input {
            Input::Observed(o) => self.observe(o),
            Input::Held(h) => self.held = Some(h),
            Input::Applied(r) => self.report = Some(r),
            Input::Shutdown { leaving } => self.begin_stop(leaving, now),
            Input::Written { write, sent, ok } => {
                self.writing = None;
                self.wrote_once = true;
                if ok {
                    self.published = Some((write, sent));
                    self.write_retry = None;
                } else {
                    self.write_retry = Some(now + self.cfg.claim_renew / 4);
                }
            }
            Input::Checked { ips, fresh } => self.checked(&ips, fresh, now, &mut out),
            Input::Locked { ip, outcome } => self.locked(ip, outcome, now, &mut out),
            Input::Tick => {}
        }
        self.advance(now, &mut out);
        out
    }

    /// When [`Input::Tick`] is due if nothing else happens first.
    pub fn deadline(&self, now: Instant) -> Option<Instant> {
        if self.exited {
            return None;
        }
        let mut at: Vec<Instant> = Vec::new();
        if let Some((w, sent)) = &self.published {
            if !self.idle() && self.writing.is_none() {
                at.push(*sent + self.cfg.claim_renew);
            }
            let fence = *sent + self.lifetime(w).saturating_sub(self.cfg.claim_renew);
            let using = self.ips.values().any(|p| matches!(p, Phase::Locked { .. }));
            if using && now < fence {
                at.push(fence);
            }
        }
        at.extend(self.write_retry);
        at.extend(self.ips.values().filter_map(|p| match p {
            Phase::Wanted { retry, .. } => *retry,
            _ => None,
        }));
        if let Some(s) = self.stop
            && s.kind == StopKind::HandOver
        {
            at.push(s.since + self.cfg.drain_timeout);
        }
        at.into_iter().filter(|t| *t > now).min()
    }

    /// When the next renewal is due (`None` while idle or not published).
    pub fn renewal_due(&self) -> Option<Instant> {
        let (_, sent) = self.published.as_ref()?;
        (!self.idle()).then(|| *sent + self.cfg.claim_renew)
    }

    /// The IPs the agent may use now, and until when.
    pub fn programmed(&self) -> Option<&(BTreeSet<Ipv4Addr>, Option<Instant>)> {
        self.programmed.as_ref()
    }

    fn lifetime(&self, w: &ClaimsWrite) -> Duration {
        w.restart_grace.unwrap_or_default().max(self.cfg.claim_ttl)
    }

    /// Until when the last successful write lets us use what it lists.
    fn fence(&self) -> Option<Instant> {
        self.published
            .as_ref()
            .map(|(w, sent)| *sent + self.lifetime(w).saturating_sub(self.cfg.claim_renew))
    }

    fn lapsed(&self, now: Instant) -> bool {
        self.fence().is_some_and(|f| now >= f)
    }

    /// Nothing published and nothing to say: no renewals (on a large
    /// cluster only the nodes that hold IPs write every period).
    fn idle(&self) -> bool {
        self.published
            .as_ref()
            .is_some_and(|(w, _)| w.ips.is_empty() && !w.draining && w.restart_grace.is_none())
    }

    fn observe(&mut self, o: Observation) {
        let first = self.observed.is_none();
        if first {
            // Adoption: what our node's Lease lists and the status still
            // gives us is confirmed and kept rather than claimed anew.
            for ip in o.own_claims.intersection(&o.wanted) {
                self.ips.insert(
                    *ip,
                    Phase::Wanted {
                        adopt: true,
                        retry: None,
                    },
                );
            }
            // Listed but no longer ours: published until the agent reports
            // the address (a previous agent's) gone.
            for ip in o.own_claims.difference(&o.wanted) {
                self.ips.insert(*ip, Phase::Leaving);
            }
        }
        let me = self.cfg.node.as_str();
        let ips = std::mem::take(&mut self.ips);
        for (ip, phase) in ips {
            let lost = o.locks.get(&ip).is_some_and(|l| {
                let stale =
                    |replaced: &Option<String>| replaced.is_some() && l.version == *replaced;
                l.holder.as_deref().is_some_and(|h| h != me)
                    && match &phase {
                        Phase::Locked { replaced, .. } => !stale(replaced),
                        Phase::Leaving => true,
                        _ => false,
                    }
            });
            if lost {
                // Another node's now: neither used nor published, nor released.
                continue;
            }
            let keep = if o.wanted.contains(&ip) {
                Some(phase)
            } else {
                match phase {
                    Phase::Locked { .. } | Phase::Leaving => Some(Phase::Leaving),
                    // A lock request in flight for it is released on its answer.
                    _ => None,
                }
            };
            if let Some(p) = keep {
                self.ips.insert(ip, p);
            }
        }
        if self.stop.is_none() {
            for ip in &o.wanted {
                self.ips.entry(*ip).or_insert(Phase::Wanted {
                    adopt: false,
                    retry: None,
                });
            }
        }
        self.observed = Some(o);
    }

    fn begin_stop(&mut self, leaving: Option<String>, now: Instant) {
        if self.stop.is_some() {
            return;
        }
        let watched = self.observed.as_ref().and_then(|o| o.leaving.as_ref());
        let kind = if leaving.is_some() || watched.is_some() || self.cfg.restart_grace.is_zero() {
            StopKind::HandOver
        } else {
            StopKind::Restart
        };
        self.stop = Some(Stop { kind, since: now });
        // Nothing new is claimed from now on.
        self.ips.retain(|_, p| {
            !matches!(
                p,
                Phase::Wanted { .. } | Phase::Checking { .. } | Phase::Locking { .. }
            )
        });
    }

    fn checked(
        &mut self,
        ips: &BTreeSet<Ipv4Addr>,
        fresh: Option<Fresh>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        self.checking = false;
        let retry = Some(now + self.cfg.claim_renew);
        for ip in ips {
            let Some(Phase::Checking { adopt }) = self.ips.get(ip).cloned() else {
                continue;
            };
            let next = match &fresh {
                None => Some(Phase::Wanted { adopt, retry }),
                // Our watch of the status lags behind a move away from us.
                // Its address may still be here (a previous agent's, when
                // adopting): published until the agent reports it gone.
                Some(f) if !f.assigned.contains(ip) => (adopt
                    || self.held.as_ref().is_some_and(|h| h.contains(ip)))
                .then_some(Phase::Leaving),
                // Our watch of the others' claims lags behind theirs. A lock
                // that still names us (adoption) excludes any other claim.
                Some(f) if f.claimed_elsewhere.contains(ip) && !adopt => Some(Phase::Wanted {
                    adopt: false,
                    retry,
                }),
                Some(_) => Some(Phase::Locking { adopt }),
            };
            if let Some(Phase::Locking { adopt }) = next {
                out.push(Action::Lock { ip: *ip, adopt });
            }
            match next {
                Some(p) => self.ips.insert(*ip, p),
                None => self.ips.remove(ip),
            };
        }
    }

    fn locked(&mut self, ip: Ipv4Addr, outcome: LockOutcome, now: Instant, out: &mut Vec<Action>) {
        let requested = matches!(self.ips.get(&ip), Some(Phase::Locking { .. }));
        match outcome {
            LockOutcome::Acquired { replaced } if requested => {
                self.ips.insert(ip, Phase::Locked { replaced, at: now });
            }
            // Wanted no more (or stopping) by the time it came: give it back.
            LockOutcome::Acquired { .. } => out.push(Action::Release(ip)),
            LockOutcome::Refused | LockOutcome::Failed if requested => {
                self.ips.insert(
                    ip,
                    Phase::Wanted {
                        adopt: false,
                        retry: Some(now + self.cfg.claim_renew),
                    },
                );
            }
            LockOutcome::Refused | LockOutcome::Failed => {}
        }
    }

    /// What the claims Lease must list now: the IPs whose lock we hold, and
    /// those leaving while their address may still be on an interface.
    fn to_publish(&self) -> BTreeSet<Ipv4Addr> {
        self.ips
            .iter()
            .filter(|(ip, p)| match p {
                Phase::Locked { .. } => true,
                Phase::Leaving => self.held.as_ref().is_none_or(|h| h.contains(ip)),
                _ => false,
            })
            .map(|(ip, _)| *ip)
            .collect()
    }

    fn adopting(&self) -> bool {
        self.ips.values().any(|p| {
            matches!(
                p,
                Phase::Wanted { adopt: true, .. }
                    | Phase::Checking { adopt: true }
                    | Phase::Locking { adopt: true }
            )
        })
    }

    fn advance(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.observed.is_none() {
            // Not synced: nothing is known, nothing is done; a stop now
            // leaves the previous state under its own fence.
            if self.stop.is_some() {
                self.exited = true;
                out.push(Action::Exit);
            }
            return;
        }
        if self.lapsed(now) {
            self.on_lapse();
        }
        if let Some(s) = self.stop
            && s.kind == StopKind::HandOver
            && now >= s.since + self.cfg.drain_timeout
        {
            // The assigner did not move them in time: let go anyway.
            for p in self.ips.values_mut() {
                if matches!(p, Phase::Locked { .. }) {
                    *p = Phase::Leaving;
                }
            }
        }
        self.request_checks(now, out);
        self.release_unpublished(out);
        let write = self.next_write(now);
        if let Some(w) = write {
            self.writing = Some(w.clone());
            out.push(Action::Write(w));
        }
        if !self.adopting() {
            if self.wrote_once {
                self.program(now, out);
            }
            self.maybe_exit(now, out);
        }
    }

    /// The last write's lifetime is over (writes failed or came too late,
    /// or the process was stopped): everything is withdrawn (see
    /// [`Self::active`]), and confirmed and locked again before it is used
    /// again.
    fn on_lapse(&mut self) {
        let fence = self.fence().expect("lapsed implies published");
        let stopping = self.stop.is_some();
        // Locks taken since the lapse are kept: the next write publishes them.
        self.ips.retain(|_, p| match p {
            Phase::Locked { at, .. } if *at < fence => {
                if !stopping {
                    *p = Phase::Wanted {
                        adopt: false,
                        retry: None,
                    };
                }
                !stopping
            }
            // Others may take it now; its lock is old and free to take over.
            Phase::Leaving => false,
            _ => true,
        });
    }

    fn request_checks(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.checking || self.stop.is_some() {
            return;
        }
        let due: BTreeSet<Ipv4Addr> = self
            .ips
            .iter()
            .filter(
                |(_, p)| matches!(p, Phase::Wanted { retry, .. } if retry.is_none_or(|r| now >= r)),
            )
            .map(|(ip, _)| *ip)
            .collect();
        if due.is_empty() {
            return;
        }
        for ip in &due {
            if let Some(Phase::Wanted { adopt, .. }) = self.ips.get(ip).cloned() {
                self.ips.insert(*ip, Phase::Checking { adopt });
            }
        }
        self.checking = true;
        out.push(Action::Check(due));
    }

    /// Leaving IPs that the last successful write no longer lists are free
    /// for others: their locks go back.
    fn release_unpublished(&mut self, out: &mut Vec<Action>) {
        let published: BTreeSet<Ipv4Addr> = self
            .published
            .as_ref()
            .map(|(w, _)| w.ips.clone())
            .unwrap_or_default();
        let pending = self.to_publish();
        let gone: Vec<Ipv4Addr> = self
            .ips
            .iter()
            .filter(|(ip, p)| {
                **p == Phase::Leaving
                    && !pending.contains(ip)
                    && !published.contains(ip)
                    && self.writing.as_ref().is_none_or(|w| !w.ips.contains(ip))
            })
            .map(|(ip, _)| *ip)
            .collect();
        for ip in gone {
            self.ips.remove(&ip);
            out.push(Action::Release(ip));
        }
    }

    fn wanted_write(&self) -> ClaimsWrite {
        let stop = self.stop.map(|s| s.kind);
        let ips = self.to_publish();
        ClaimsWrite {
            draining: stop == Some(StopKind::HandOver),
            restart_grace: (stop == Some(StopKind::Restart) && !ips.is_empty())
                .then_some(self.cfg.restart_grace),
            ips,
            report: self.report.clone(),
        }
    }

    fn next_write(&self, now: Instant) -> Option<ClaimsWrite> {
        if self.writing.is_some() || self.write_retry.is_some_and(|r| now < r) {
            return None;
        }
        // Until adoption is settled, writing would drop the previous
        // agent's claims before they are confirmed ours.
        if self.adopting() {
            return None;
        }
        let w = self.wanted_write();
        if self.stop.is_some_and(|s| s.kind == StopKind::Restart) && w.ips.is_empty() {
            // Nothing to keep: the Lease stays as it is for a successor.
            return None;
        }
        let due = match &self.published {
            None => true,
            Some((p, sent)) => *p != w || (!self.idle() && now >= *sent + self.cfg.claim_renew),
        };
        due.then_some(w)
    }

    fn active(&self, now: Instant) -> BTreeSet<Ipv4Addr> {
        if self.lapsed(now) {
            return BTreeSet::new();
        }
        let Some((w, sent)) = &self.published else {
            return BTreeSet::new();
        };
        self.ips
            .iter()
            .filter(|(ip, p)| {
                matches!(p, Phase::Locked { at, .. } if at <= sent) && w.ips.contains(ip)
            })
            .map(|(ip, _)| *ip)
            .collect()
    }

    fn program(&mut self, now: Instant, out: &mut Vec<Action>) {
        let active = self.active(now);
        let fence = if active.is_empty() {
            None
        } else {
            self.fence()
        };
        let next = (active, fence);
        if self.programmed.as_ref() != Some(&next) {
            out.push(Action::Program {
                active: next.0.clone(),
                fence: next.1,
            });
            self.programmed = Some(next);
        }
    }

    fn maybe_exit(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(stop) = self.stop else { return };
        if self.writing.is_some() {
            return;
        }
        let done = match stop.kind {
            // Kept for a successor once the grace is published (or lost
            // anyway once lapsed, or nothing to keep).
            StopKind::Restart => {
                let keep = self.to_publish();
                keep.is_empty()
                    || self.lapsed(now)
                    || self
                        .published
                        .as_ref()
                        .is_some_and(|(w, _)| w.restart_grace.is_some() && w.ips == keep)
            }
            // Handed over once nothing is held, locked or published.
            StopKind::HandOver => {
                self.ips.is_empty()
                    && self.held.as_ref().is_none_or(BTreeSet::is_empty)
                    && self
                        .published
                        .as_ref()
                        .is_some_and(|(w, _)| w.ips.is_empty() && w.draining)
            }
        };
        // A hand-over that cannot write its final release still ends once
        // nothing is held: its claims lapse by themselves.
        let stuck = stop.kind == StopKind::HandOver
            && self.ips.is_empty()
            && self.held.as_ref().is_none_or(BTreeSet::is_empty)
            && self.lapsed(now);
        if done || stuck {
            self.exited = true;
            out.push(Action::Exit);
        }
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
