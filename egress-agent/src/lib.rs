//! The agent's library: the desired map image, the
//! reconciler, the loader, the conntrack collector and the inspection CLI.
//! `main.rs` is the `egress-agent` binary on top of it; the
//! `BPF_PROG_TEST_RUN` suite (egress-testrun) loads and programs the
//! datapath through the same code.

pub mod batch;
pub mod fence;
pub mod gc;
pub mod hold;
pub mod host;
pub mod identity;
pub mod image;
pub mod inspect;
pub mod loader;
pub mod maps;
pub mod run;
