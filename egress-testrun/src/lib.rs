//! `BPF_PROG_TEST_RUN` suite and fuzz target of the egress datapath.
//!
//! - [`harness`]: the three programs with maps of their own, programmed the
//!   way the agent programs them, run on crafted frames in a test namespace.
//! - [`world`]: the node, pods, servers and policies of every scenario.
//! - [`packet`] and [`check`]: frames built and verified with etherparse.
//! - [`expect`]: expectations that pending datapath work changes.
//! - [`invariants`] and [`fuzz`]: the mutational fuzz target and what must
//!   hold after every packet.

pub mod check;
pub mod expect;
pub mod fuzz;
pub mod harness;
pub mod invariants;
pub mod netns;
pub mod packet;
pub mod world;

pub use harness::{Flows, Harness, Outcome, Program};
