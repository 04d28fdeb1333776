//! Every bpf(2) command the workspace issues itself, in one place: aya
//! covers loading, attaching and element access of the agent's own maps,
//! but not these.
//!
//! - Batched walks and deletes of hash maps ([`lookup_all`],
//!   [`delete_all`]): the agent's conntrack collector reads every flow each
//!   sweep, a few bpf(2) calls per few thousand entries instead of two per
//!   flow.
//! - Object get and element operations on pinned maps ([`obj_get`],
//!   [`lookup`], [`update`], [`delete`]): the benchmark times control-plane
//!   changes without a process start in the measurement.
//! - `BPF_PROG_TEST_RUN` ([`test_run`], [`test_run_skb`], with
//!   [`TunnelInjector`] for tunnel metadata): the benchmark's per-packet
//!   figures and the egress-testrun suite (aya has no test-run API).
//!
//! Commands are named by [`Cmd`]; errors are [`Error`], naming the command
//! that failed.

mod map;
mod prog;
mod sys;

pub use map::{
    MapType, bytes_of, delete, delete_all, lookup, lookup_all, map_create, possible_cpus, update,
};
pub use prog::{
    INJECTOR_SET_KEY_FAILED, INJECTOR_TAIL_CALL_FAILED, SkbContext, SkbRun, TestRun,
    TunnelInjector, load_sched_cls, test_run, test_run_skb,
};
pub use sys::{Cmd, Error, Result, obj_get};
