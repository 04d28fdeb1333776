use std::{io, path::PathBuf, time::Duration};

/// Everything that can go wrong while building a lab, driving its agents or
/// sending traffic through it. Messages name the command, namespace or file
/// involved so that a failing test says what broke without a rerun.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("`{cmd}` did not finish within {timeout:?}; stderr so far: {stderr}")]
    CommandTimeout {
        cmd: String,
        timeout: Duration,
        stderr: String,
    },
    #[error("cannot start `{cmd}`: {source}")]
    Spawn { cmd: String, source: io::Error },
    #[error("network namespace `{ns}`: {reason}")]
    Netns { ns: String, reason: String },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error(
        "agent binary {path} does not exist: run `cargo xtask build` or point EGRESS_AGENT_BIN at it"
    )]
    AgentBinaryMissing { path: PathBuf },
    #[error(
        "agent of node {node} (instance `{instance}`) {what}; last lines of {log}:\n{tail}",
        log = log.display()
    )]
    Agent {
        node: u8,
        instance: String,
        what: String,
        log: PathBuf,
        tail: String,
    },
    #[error("invalid lab specification: {0}")]
    Spec(String),
    #[error("{0}")]
    Traffic(String),
    #[error("output of `{cmd}` is not what the lab understands ({reason}): {output}")]
    UnexpectedOutput {
        cmd: String,
        reason: String,
        output: String,
    },
}

pub type Result<T, E = LabError> = std::result::Result<T, E>;

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> LabError {
    let context = context.into();
    move |source| LabError::Io { context, source }
}
