//! Every fault of the node session as a sequence of inputs and clock
//! readings, and the actions expected.

use super::*;

const ME: &str = "node1";
const TTL: u64 = 1500;
const RENEW: u64 = 300;
const GRACE: u64 = 10_000;
const DRAIN: u64 = 2_000;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn x() -> Ipv4Addr {
    ip("172.18.0.100")
}

fn set(ips: &[Ipv4Addr]) -> BTreeSet<Ipv4Addr> {
    ips.iter().copied().collect()
}

/// A session and a clock in milliseconds from `t0`.
struct Harness {
    s: Session,
    t0: Instant,
}

impl Harness {
    /// On the thread's base instant, so that `written` and `at` agree.
    fn fresh(grace: u64) -> Self {
        Self {
            s: Session::new(SessionConfig {
                node: ME.into(),
                claim_ttl: Duration::from_millis(TTL),
                claim_renew: Duration::from_millis(RENEW),
                restart_grace: Duration::from_millis(grace),
                drain_timeout: Duration::from_millis(DRAIN),
            }),
            t0: SENT_BASE.with(|b| *b),
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn step(&mut self, input: Input, ms: u64) -> Vec<Action> {
        let now = self.at(ms);
        self.s.step(input, now)
    }

    fn program(&self, ips: &[Ipv4Addr], fence_ms: Option<u64>) -> Action {
        Action::Program {
            active: set(ips),
            fence: fence_ms.map(|ms| self.at(ms)),
        }
    }
}

fn observed(wanted: &[Ipv4Addr]) -> Input {
    Input::Observed(Observation {
        wanted: set(wanted),
        ..Default::default()
    })
}

fn claims(ips: &[Ipv4Addr]) -> ClaimsWrite {
    ClaimsWrite {
        ips: set(ips),
        ..Default::default()
    }
}

fn write(ips: &[Ipv4Addr]) -> Action {
    Action::Write(claims(ips))
}

fn written_as(h: &Harness, w: ClaimsWrite, sent_ms: u64, ok: bool) -> Input {
    Input::Written {
        write: w,
        sent: h.at(sent_ms),
        ok,
    }
}

/// A write of `ips` sent `sent_ms` after the harness's start.
fn written(ips: &[Ipv4Addr], sent_ms: u64, ok: bool) -> Input {
    Input::Written {
        write: claims(ips),
        sent: SENT_BASE.with(|b| *b) + Duration::from_millis(sent_ms),
        ok,
    }
}

thread_local! {
    /// The harnesses' start: `written` needs it without a harness.
    static SENT_BASE: Instant = Instant::now();
}

fn checked(ips: &[Ipv4Addr], assigned: &[Ipv4Addr], elsewhere: &[Ipv4Addr]) -> Input {
    Input::Checked {
        ips: set(ips),
        fresh: Some(Fresh {
            assigned: set(assigned),
            claimed_elsewhere: set(elsewhere),
        }),
    }
}

fn locked(ip: Ipv4Addr, replaced: Option<&str>) -> Input {
    Input::Locked {
        ip,
        outcome: LockOutcome::Acquired {
            replaced: replaced.map(str::to_string),
        },
    }
}

/// An observation with `x()` wanted and its lock held by `holder` at
/// `version`; `own`: `x()` is also among this node's claims.
fn locked_by(holder: &str, version: &str, own: bool) -> Observation {
    let mut o = Observation {
        wanted: set(&[x()]),
        own_claims: if own { set(&[x()]) } else { BTreeSet::new() },
        ..Default::default()
    };
    o.locks.insert(
        x(),
        LockSeen {
            holder: Some(holder.into()),
            version: Some(version.into()),
        },
    );
    o
}

fn actives(out: &[Action]) -> Vec<BTreeSet<Ipv4Addr>> {
    out.iter()
        .filter_map(|a| match a {
            Action::Program { active, .. } => Some(active.clone()),
            _ => None,
        })
        .collect()
}

fn harness() -> Harness {
    Harness::fresh(GRACE)
}

/// Synced at 0 with X wanted; holds X from a write sent at 20 (fence
/// 20 + 1500 - 300 = 1220), and the agent reports it on its interface.
fn holding() -> Harness {
    let mut h = harness();
    h.step(observed(&[x()]), 0);
    h.step(written(&[], 0, true), 5);
    h.step(checked(&[x()], &[x()], &[]), 10);
    assert_eq!(h.step(locked(x(), None), 20), [write(&[x()])]);
    let out = h.step(written(&[x()], 20, true), 25);
    assert_eq!(out, [h.program(&[x()], Some(1220))]);
    h.step(Input::Held(set(&[x()])), 30);
    h
}

#[test]
fn an_ip_is_confirmed_then_locked_then_published_and_used_only_after_the_write() {
    let mut h = harness();
    // Synced: the fresh reads are asked for, and the Lease announced.
    assert_eq!(
        h.step(observed(&[x()]), 0),
        [Action::Check(set(&[x()])), write(&[])]
    );
    // The agent gets the cluster's state, without the IP yet.
    assert_eq!(h.step(written(&[], 0, true), 5), [h.program(&[], None)]);
    assert_eq!(
        h.step(checked(&[x()], &[x()], &[]), 10),
        [Action::Lock {
            ip: x(),
            adopt: false
        }]
    );
    // Locked: published, but not used before the write succeeded.
    assert_eq!(h.step(locked(x(), None), 20), [write(&[x()])]);
    assert_eq!(h.step(Input::Tick, 22), []);
    assert_eq!(
        h.step(written(&[x()], 20, true), 25),
        [h.program(&[x()], Some(1220))]
    );
    // Renewals are paced from the last one sent; each moves the fence.
    assert_eq!(h.s.deadline(h.at(25)), Some(h.at(320)));
    assert_eq!(h.step(Input::Tick, 320), [write(&[x()])]);
    assert_eq!(
        h.step(written(&[x()], 320, true), 330),
        [h.program(&[x()], Some(1520))]
    );
    assert_eq!(h.s.deadline(h.at(330)), Some(h.at(620)));
}

#[test]
fn api_unreachable_withdraws_at_the_fence_and_confirms_and_locks_again_before_reuse() {
    let mut h = holding();
    // Every renewal fails from now on; retried a quarter period later.
    assert_eq!(h.step(Input::Tick, 320), [write(&[x()])]);
    assert_eq!(h.step(written(&[x()], 320, false), 470), []);
    assert_eq!(h.s.deadline(h.at(470)), Some(h.at(545)));
    assert_eq!(h.step(Input::Tick, 545), [write(&[x()])]);
    assert_eq!(h.step(written(&[x()], 545, false), 700), []);
    assert_eq!(h.step(Input::Tick, 775), [write(&[x()])]);
    assert_eq!(h.step(written(&[x()], 775, false), 925), []);
    assert_eq!(h.step(Input::Tick, 1000), [write(&[x()])]);
    assert_eq!(h.step(written(&[x()], 1000, false), 1150), []);
    assert_eq!(h.s.deadline(h.at(1150)), Some(h.at(1220)));
    // The fence: withdrawn by the session itself, before anyone may take it.
    let out = h.step(Input::Tick, 1220);
    assert_eq!(out, [Action::Check(set(&[x()])), h.program(&[], None)]);
    assert_eq!(h.step(Input::Tick, 1225), [write(&[])]);
    // The API server is back: a write alone never brings the IP back.
    assert_eq!(h.step(written(&[], 1225, true), 1300), []);
    assert_eq!(
        h.step(checked(&[x()], &[x()], &[]), 1310),
        [Action::Lock {
            ip: x(),
            adopt: false
        }]
    );
    assert_eq!(h.step(locked(x(), None), 1320), [write(&[x()])]);
    assert_eq!(
        h.step(written(&[x()], 1320, true), 1330),
        [h.program(&[x()], Some(2520))]
    );
}

#[test]
fn a_renewal_that_succeeds_late_counts_from_when_it_was_sent() {
    let mut h = holding();
    assert_eq!(h.step(Input::Tick, 320), [write(&[x()])]);
    // The server applied it, but the answer took 1.3 s (its fence: 1520).
    let out = h.step(written(&[x()], 320, true), 1600);
    assert_eq!(actives(&out), [set(&[])], "{out:?}");
    assert!(out.contains(&Action::Check(set(&[x()]))), "{out:?}");
}

#[test]
fn a_stalled_process_withdraws_first_thing_when_it_runs_again() {
    let mut h = holding();
    // SIGSTOP at 100 (a renewal in flight), SIGCONT at 5000: the timer fires late.
    assert_eq!(h.step(Input::Tick, 320), [write(&[x()])]);
    let out = h.step(Input::Tick, 5000);
    assert_eq!(
        out,
        [Action::Check(set(&[x()])), h.program(&[], None)],
        "withdrawn, and to be confirmed again"
    );
    // The renewal sent before the stop answers now: too old to count.
    let out = h.step(written(&[x()], 320, true), 5001);
    assert_eq!(out, [write(&[])]);
    // Its lock went to node2 meanwhile: never used again.
    assert_eq!(
        h.step(
            Input::Locked {
                ip: x(),
                outcome: LockOutcome::Refused
            },
            5002
        ),
        []
    );
}

#[test]
fn a_status_that_moved_away_behind_our_watch_is_not_claimed() {
    let mut h = harness();
    h.step(observed(&[x()]), 0);
    h.step(written(&[], 0, true), 5);
    // The fresh read says the status names someone else now.
    assert_eq!(h.step(checked(&[x()], &[], &[]), 10), []);
    assert_eq!(h.s.deadline(h.at(10)), None);
}

#[test]
fn a_claim_elsewhere_behind_our_watch_delays_the_lock() {
    let mut h = harness();
    h.step(observed(&[x()]), 0);
    h.step(written(&[], 0, true), 5);
    assert_eq!(h.step(checked(&[x()], &[x()], &[x()]), 10), []);
    assert_eq!(h.s.deadline(h.at(10)), Some(h.at(310)));
    assert_eq!(h.step(Input::Tick, 310), [Action::Check(set(&[x()]))]);
    assert_eq!(
        h.step(checked(&[x()], &[x()], &[]), 320),
        [Action::Lock {
            ip: x(),
            adopt: false
        }]
    );
}

#[test]
fn a_lock_lost_to_another_node_is_withdrawn_and_not_published_nor_released() {
    let mut h = holding();
    let o = locked_by("node2", "9", false);
    // Withdrawn and written away; still wanted, so asked for again.
    let out = h.step(Input::Observed(o.clone()), 100);
    assert_eq!(
        out,
        [Action::Check(set(&[x()])), write(&[]), h.program(&[], None)]
    );
    assert!(!out.iter().any(|a| matches!(a, Action::Release(_))));
    // While node2 holds its lock, the IP is asked for again but not used.
    let out = h.step(written(&[], 100, true), 110);
    assert!(!out.iter().any(|a| matches!(a, Action::Program { .. })));
}

#[test]
fn the_version_we_replaced_is_not_a_loss() {
    let mut h = harness();
    h.step(observed(&[x()]), 0);
    h.step(written(&[], 0, true), 5);
    h.step(checked(&[x()], &[x()], &[]), 10);
    h.step(locked(x(), Some("4")), 20);
    h.step(written(&[x()], 20, true), 25);
    // The watch still shows node2's lock at the version we replaced.
    let o = locked_by("node2", "4", false);
    assert_eq!(h.step(Input::Observed(o), 30), []);
    assert_eq!(h.s.programmed().unwrap().0, set(&[x()]));
}

#[test]
fn a_moved_ip_is_withdrawn_published_until_its_address_is_gone_then_released() {
    let mut h = holding();
    // The status moved it: withdrawn at once.
    assert_eq!(h.step(observed(&[]), 100), [h.program(&[], None)]);
    // Still on the interface: still claimed (renewed), not released.
    assert_eq!(h.step(Input::Tick, 320), [write(&[x()])]);
    h.step(written(&[x()], 320, true), 330);
    // Gone: written away, then the lock is handed back.
    assert_eq!(h.step(Input::Held(set(&[])), 400), [write(&[])]);
    assert_eq!(h.step(written(&[], 400, true), 410), [Action::Release(x())]);
    // Idle: no more renewals.
    assert_eq!(h.s.deadline(h.at(410)), None);
    assert_eq!(h.step(Input::Tick, 5000), []);
}

#[test]
fn a_lock_granted_after_the_ip_stopped_being_wanted_is_given_back() {
    let mut h = harness();
    h.step(observed(&[x()]), 0);
    h.step(written(&[], 0, true), 5);
    h.step(checked(&[x()], &[x()], &[]), 10);
    assert_eq!(h.step(observed(&[]), 15), []);
    assert_eq!(h.step(locked(x(), None), 20), [Action::Release(x())]);
}

#[test]
fn drain_hands_the_ips_over_and_exits_once_they_are_gone() {
    let mut h = holding();
    let leaving = |wanted: &[Ipv4Addr]| {
        Input::Observed(Observation {
            wanted: set(wanted),
            leaving: Some("spec.unschedulable".into()),
            ..Default::default()
        })
    };
    h.step(leaving(&[x()]), 50);
    let draining = ClaimsWrite {
        ips: set(&[x()]),
        draining: true,
        restart_grace: None,
        report: None,
    };
    assert_eq!(
        h.step(Input::Shutdown { leaving: None }, 100),
        [Action::Write(draining.clone())]
    );
    assert_eq!(
        h.step(written_as(&h, draining, 100, true), 110),
        [h.program(&[x()], Some(1300))]
    );
    // The assigner moved it: withdrawn, then published away once gone.
    assert_eq!(h.step(leaving(&[]), 350), [h.program(&[], None)]);
    let last = ClaimsWrite {
        ips: set(&[]),
        draining: true,
        restart_grace: None,
        report: None,
    };
    assert_eq!(
        h.step(Input::Held(set(&[])), 360),
        [Action::Write(last.clone())]
    );
    assert_eq!(
        h.step(written_as(&h, last, 360, true), 370),
        [Action::Release(x()), Action::Exit]
    );
    assert_eq!(h.step(Input::Tick, 500), []);
}

#[test]
fn a_drain_the_assigner_does_not_answer_lets_go_after_the_drain_timeout() {
    let mut h = holding();
    // The watch has not shown the taint yet; the fresh read at the stop has.
    let out = h.step(
        Input::Shutdown {
            leaving: Some("taint ToBeDeletedByClusterAutoscaler".into()),
        },
        100,
    );
    assert!(
        matches!(&out[..], [Action::Write(w)] if w.draining),
        "{out:?}"
    );
    let draining = |ips: &[Ipv4Addr]| ClaimsWrite {
        ips: set(ips),
        draining: true,
        restart_grace: None,
        report: None,
    };
    h.step(written_as(&h, draining(&[x()]), 100, true), 110);
    // Renewed while waiting, still used.
    for t in (400..2100).step_by(RENEW as usize) {
        assert_eq!(h.step(Input::Tick, t), [Action::Write(draining(&[x()]))]);
        let out = h.step(written_as(&h, draining(&[x()]), t, true), t + 10);
        assert_eq!(out, [h.program(&[x()], Some(t + TTL - RENEW))]);
    }
    assert_eq!(h.s.deadline(h.at(1910)), Some(h.at(2100)));
    assert_eq!(h.step(Input::Tick, 2100), [h.program(&[], None)]);
    assert_eq!(
        h.step(Input::Held(set(&[])), 2150),
        [Action::Write(draining(&[]))]
    );
    assert_eq!(
        h.step(written_as(&h, draining(&[]), 2150, true), 2160),
        [Action::Release(x()), Action::Exit]
    );
}

#[test]
fn a_restart_keeps_the_ips_under_a_grace_and_extends_the_fence_to_its_end() {
    let mut h = holding();
    let grace = ClaimsWrite {
        ips: set(&[x()]),
        draining: false,
        restart_grace: Some(Duration::from_millis(GRACE)),
        report: None,
    };
    assert_eq!(
        h.step(Input::Shutdown { leaving: None }, 100),
        [Action::Write(grace.clone())]
    );
    // Until the grace is published the fence stays the renewal's.
    assert_eq!(h.s.programmed().unwrap().1, Some(h.at(1220)));
    assert_eq!(
        h.step(written_as(&h, grace, 100, true), 110),
        [h.program(&[x()], Some(100 + GRACE - RENEW)), Action::Exit]
    );
}

#[test]
fn a_restart_whose_grace_cannot_be_written_lets_go_at_the_fence() {
    let mut h = holding();
    let grace = ClaimsWrite {
        ips: set(&[x()]),
        draining: false,
        restart_grace: Some(Duration::from_millis(GRACE)),
        report: None,
    };
    h.step(Input::Shutdown { leaving: None }, 100);
    assert_eq!(h.step(written_as(&h, grace.clone(), 100, false), 250), []);
    assert_eq!(h.step(Input::Tick, 325), [Action::Write(grace.clone())]);
    assert_eq!(h.step(written_as(&h, grace, 325, false), 475), []);
    let out = h.step(Input::Tick, 1220);
    assert_eq!(out, [h.program(&[], None), Action::Exit]);
}

#[test]
fn without_a_grace_every_stop_hands_over() {
    let mut h = Harness::fresh(0);
    h.step(observed(&[]), 0);
    h.step(written(&[], 0, true), 5);
    assert_eq!(
        h.step(Input::Shutdown { leaving: None }, 10),
        [Action::Write(ClaimsWrite {
            ips: set(&[]),
            draining: true,
            restart_grace: None,
            report: None,
        })]
    );
}

#[test]
fn a_restart_holding_nothing_exits_at_once_and_a_stop_before_sync_too() {
    let mut h = harness();
    h.step(observed(&[]), 0);
    h.step(written(&[], 0, true), 5);
    assert_eq!(
        h.step(Input::Shutdown { leaving: None }, 10),
        [Action::Exit]
    );
    let mut h = harness();
    assert_eq!(
        h.step(Input::Shutdown { leaving: None }, 10),
        [Action::Exit]
    );
}

#[test]
fn a_successor_adopts_its_nodes_live_claims_without_release_nor_new_lock() {
    let mut h = harness();
    let o = locked_by(ME, "7", true);
    // Nothing is written (that would drop the claim) nor programmed
    // (that would remove the address) before the claim is confirmed ours.
    assert_eq!(h.step(Input::Observed(o), 0), [Action::Check(set(&[x()]))]);
    // A cold view of the others' claims is not a reason to let go: the
    // lock still naming us excludes any other claim.
    assert_eq!(
        h.step(checked(&[x()], &[x()], &[x()]), 10),
        [Action::Lock {
            ip: x(),
            adopt: true
        }]
    );
    assert_eq!(h.step(locked(x(), None), 20), [write(&[x()])]);
    let out = h.step(written(&[x()], 20, true), 25);
    assert_eq!(out, [h.program(&[x()], Some(1220))]);
}

#[test]
fn a_successor_whose_lock_changed_hands_claims_anew() {
    let mut h = harness();
    h.step(
        Input::Observed(Observation {
            wanted: set(&[x()]),
            own_claims: set(&[x()]),
            ..Default::default()
        }),
        0,
    );
    h.step(checked(&[x()], &[x()], &[]), 10);
    // The lock names node2 now (our grace ran out): not adopted.
    let out = h.step(
        Input::Locked {
            ip: x(),
            outcome: LockOutcome::Refused,
        },
        20,
    );
    assert_eq!(out, [write(&[])]);
    let out = h.step(written(&[], 20, true), 25);
    assert_eq!(out, [h.program(&[], None)]);
}

#[test]
fn a_successor_lets_go_of_listed_ips_the_status_gave_away_once_their_address_is_gone() {
    let mut h = harness();
    let y = ip("172.18.0.101");
    h.step(
        Input::Observed(Observation {
            wanted: set(&[]),
            own_claims: set(&[y]),
            ..Default::default()
        }),
        0,
    );
    // Kept in the Lease until the agent has reported.
    h.step(written(&[y], 0, true), 5);
    assert_eq!(h.s.programmed().unwrap().0, set(&[]));
    assert_eq!(h.step(Input::Held(set(&[])), 10), [write(&[])]);
    assert_eq!(h.step(written(&[], 10, true), 20), [Action::Release(y)]);
}

fn report(ids: &[u32]) -> DatapathReport {
    DatapathReport {
        present: ids.iter().copied().collect(),
        failed: BTreeMap::new(),
    }
}

fn reporting(ips: &[Ipv4Addr], r: &DatapathReport) -> ClaimsWrite {
    ClaimsWrite {
        report: Some(r.clone()),
        ..claims(ips)
    }
}

#[test]
fn a_new_datapath_report_is_published_by_the_sessions_next_write() {
    let mut h = holding();
    let r = report(&[1, 2]);
    // A new report is written at once, with the claims as they stand: a
    // renewal that carries it.
    assert_eq!(
        h.step(Input::Applied(r.clone()), 100),
        [Action::Write(reporting(&[x()], &r))]
    );
    assert_eq!(
        h.step(written_as(&h, reporting(&[x()], &r), 100, true), 110),
        [h.program(&[x()], Some(100 + TTL - RENEW))]
    );
    // The same report again is no reason to write; renewals keep carrying it.
    assert_eq!(h.step(Input::Applied(r.clone()), 150), []);
    assert_eq!(
        h.step(Input::Tick, 400),
        [Action::Write(reporting(&[x()], &r))]
    );
    // One that changes while a write is in flight goes out right after it.
    let r2 = report(&[1]);
    assert_eq!(h.step(Input::Applied(r2.clone()), 405), []);
    assert_eq!(
        h.step(written_as(&h, reporting(&[x()], &r), 400, true), 410),
        [
            Action::Write(reporting(&[x()], &r2)),
            h.program(&[x()], Some(400 + TTL - RENEW))
        ]
    );
}

#[test]
fn a_report_after_the_fence_never_publishes_the_lapsed_claim_again() {
    let mut h = holding();
    // SIGSTOP after the write sent at 20 (fence 1220); at SIGCONT the
    // agent's report is the first thing the session hears. Written on its
    // own it would renew the Lease that still lists X, and the others
    // would take the lapsed claim for live again: the session withdraws
    // first, and the write that carries the report lists nothing.
    let r = report(&[1]);
    let out = h.step(Input::Applied(r.clone()), 5000);
    assert_eq!(
        out,
        [
            Action::Check(set(&[x()])),
            Action::Write(reporting(&[], &r)),
            h.program(&[], None)
        ]
    );
}

#[test]
fn a_report_waits_for_adoption_and_is_not_written_for_a_restart_holding_nothing() {
    let mut h = harness();
    let o = locked_by(ME, "7", true);
    h.step(Input::Observed(o), 0);
    // Writing before adoption settles would drop the previous agent's claim.
    let r = report(&[3]);
    assert_eq!(h.step(Input::Applied(r.clone()), 5), []);
    h.step(checked(&[x()], &[x()], &[]), 10);
    assert_eq!(
        h.step(locked(x(), None), 20),
        [Action::Write(reporting(&[x()], &r))]
    );

    // Stopping for a restart with nothing to keep: the Lease stays as the
    // last write left it, report included.
    let mut h = harness();
    h.step(observed(&[]), 0);
    h.step(written(&[], 0, true), 5);
    assert_eq!(
        h.step(Input::Shutdown { leaving: None }, 10),
        [Action::Exit]
    );
    assert_eq!(h.step(Input::Applied(r), 20), []);
}

#[test]
fn a_node_holding_nothing_writes_a_new_report_once_and_does_not_renew_it() {
    let mut h = harness();
    h.step(observed(&[]), 0);
    h.step(written(&[], 0, true), 5);
    assert_eq!(h.s.deadline(h.at(5)), None);
    let r = report(&[]);
    assert_eq!(
        h.step(Input::Applied(r.clone()), 50),
        [Action::Write(reporting(&[], &r))]
    );
    assert_eq!(h.step(written_as(&h, reporting(&[], &r), 50, true), 60), []);
    assert_eq!(h.s.deadline(h.at(60)), None);
}
