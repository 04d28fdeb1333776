//! Running code inside a named network namespace.
//!
//! Only the network namespace is switched, never the mount namespace: unlike
//! `ip netns exec`, which gives its child a private `/sys`, code and commands
//! run this way see the host's `/sys/fs/bpf`, where the agents pin their maps.
//! That is what lets a restarted agent, `bpftool` and the agent's CLI find the
//! pinned state.

use std::{
    fs::File,
    path::PathBuf,
    process::Command,
    thread::{self, JoinHandle},
};

use nix::sched::{CloneFlags, setns};

use crate::error::{LabError, Result};

/// Where `ip netns add` puts the namespace's handle.
pub fn netns_path(ns: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(ns)
}

fn open_netns(ns: &str) -> Result<File> {
    File::open(netns_path(ns)).map_err(|e| LabError::Netns {
        ns: ns.to_owned(),
        reason: format!("cannot open {}: {e}", netns_path(ns).display()),
    })
}

/// Spawns a thread that joins `ns` before running `f`. Sockets created by `f`
/// belong to `ns` for their whole life, whichever thread uses them later.
pub fn spawn_in_netns<T, F>(ns: &str, name: &str, f: F) -> Result<JoinHandle<Result<T>>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let handle = open_netns(ns)?;
    let ns_name = ns.to_owned();
    thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            setns(&handle, CloneFlags::CLONE_NEWNET).map_err(|e| LabError::Netns {
                ns: ns_name,
                reason: format!("setns: {e}"),
            })?;
            drop(handle);
            f()
        })
        .map_err(|e| LabError::Io {
            context: format!("spawning thread `{name}`"),
            source: e,
        })
}

/// Runs `f` inside `ns` and waits for it.
pub fn in_netns<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    join(spawn_in_netns(ns, &format!("netns-{ns}"), f)?, ns)
}

/// Waits for a thread started by [`spawn_in_netns`], turning a panic into an error.
pub fn join<T>(handle: JoinHandle<Result<T>>, ns: &str) -> Result<T> {
    handle.join().unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("non-string panic");
        Err(LabError::Traffic(format!(
            "thread running in namespace `{ns}` panicked: {msg}"
        )))
    })
}

/// A `Command` whose child joins `ns` (network namespace only) before exec.
pub fn command_in(ns: &str, program: &str) -> Result<Command> {
    let handle = open_netns(ns)?;
    let mut cmd = Command::new(program);
    // SAFETY: the hook runs in the forked child before exec and only makes
    // the setns(2) system call, which is async-signal-safe; it allocates
    // nothing and touches no lock.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            setns(&handle, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
        });
    }
    Ok(cmd)
}

/// Writes a `/proc/sys` value from inside `ns` (network sysctls are per namespace).
pub fn sysctls(ns: &str, settings: &[(&str, &str)]) -> Result<()> {
    let settings: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let ns_name = ns.to_owned();
    in_netns(ns, move || {
        for (key, value) in settings {
            let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
            std::fs::write(&path, &value).map_err(|e| LabError::Netns {
                ns: ns_name.clone(),
                reason: format!("sysctl {key}={value}: {e}"),
            })?;
        }
        Ok(())
    })
}
