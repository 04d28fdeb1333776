//! Running external commands (`ip`, `iptables`, `bpftool`, the agent's CLI)
//! with a deadline, checking their exit status and keeping their stderr for
//! the error message; and background processes ([`Process`]) that cannot
//! outlive their handle.

use std::{
    fs::File,
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{
    error::{LabError, Result, io_err},
    netns,
};

/// Deadline for setup commands; generous because two cores are shared by
/// concurrently running tests.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// The command line as a shell user would type it, for error messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion (killing it at `timeout`), feeding it `stdin`,
/// and returns its output whatever its exit status.
pub fn run_unchecked(cmd: &mut Command, stdin: Option<&str>, timeout: Duration) -> Result<Output> {
    let desc = describe(cmd);
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Spawn {
            cmd: desc.clone(),
            source,
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let input = input.to_owned();
        // A separate writer keeps a large batch from deadlocking against a
        // child that fills its stdout pipe before reading all of stdin.
        thread::spawn(move || {
            let _ = pipe.write_all(input.as_bytes());
        });
    }
    let mut out_pipe = child.stdout.take().expect("stdout is piped");
    let mut err_pipe = child.stderr.take().expect("stderr is piped");
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });
    let status = match wait_until(
        &mut child,
        Instant::now() + timeout,
        Duration::from_millis(5),
    ) {
        Ok(Some(status)) => status,
        Ok(None) => {
            let stderr = err_reader.join().unwrap_or_default();
            return Err(LabError::CommandTimeout {
                cmd: desc,
                timeout,
                stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
            });
        }
        Err(source) => return Err(LabError::Spawn { cmd: desc, source }),
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

/// Polls `child` every `poll` until it exits (its status) or `deadline`
/// passes (`None`, after killing and reaping it).
fn wait_until(
    child: &mut Child,
    deadline: Instant,
    poll: Duration,
) -> std::io::Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        thread::sleep(poll);
    }
}

/// Like [`run_unchecked`], but a non-zero exit is an error carrying stderr.
pub fn run(cmd: &mut Command, stdin: Option<&str>, timeout: Duration) -> Result<Output> {
    let out = run_unchecked(cmd, stdin, timeout)?;
    if out.status.success() {
        Ok(out)
    } else {
        let mut stderr = out.stderr.trim().to_owned();
        if stderr.is_empty() {
            stderr = out.stdout.trim().to_owned();
        }
        if let Some(input) = stdin {
            // Enough to find a line an `ip -batch` error names; a batch of
            // thousands of lines would bury the message.
            const SHOWN: usize = 40;
            let lines = input.lines().count();
            if lines > SHOWN {
                stderr.push_str(&format!("\ninput was ({SHOWN} first of {lines} lines):\n"));
            } else {
                stderr.push_str("\ninput was:\n");
            }
            for line in input.lines().take(SHOWN) {
                stderr.push_str(line);
                stderr.push('\n');
            }
        }
        Err(LabError::Command {
            cmd: describe(cmd),
            status: out.status.to_string(),
            stderr,
        })
    }
}

/// Runs `program args..` inside network namespace `ns` and checks its status.
pub fn exec_in(ns: &str, program: &str, args: &[&str]) -> Result<Output> {
    exec_in_timeout(ns, program, args, DEFAULT_TIMEOUT)
}

pub fn exec_in_timeout(
    ns: &str,
    program: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<Output> {
    let mut cmd = netns::command_in(ns, program)?;
    cmd.args(args);
    run(&mut cmd, None, timeout)
}

/// Runs `program args..` inside `ns` with `input` on its stdin (`nft -f -`,
/// `iptables-restore`) and checks its status.
pub fn exec_in_with_input(
    ns: &str,
    program: &str,
    args: &[&str],
    input: &str,
    timeout: Duration,
) -> Result<Output> {
    let mut cmd = netns::command_in(ns, program)?;
    cmd.args(args);
    run(&mut cmd, Some(input), timeout)
}

/// Runs `program args..` in the caller's namespaces and checks its status.
pub fn exec(program: &str, args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    run(&mut cmd, None, DEFAULT_TIMEOUT)
}

/// Applies `lines` with one `ip -batch` process, in `ns` or the root namespace.
/// `-force` is deliberately absent: the first failing line stops the batch
/// and its message names the line number, which the error carries along with
/// the whole batch.
pub fn ip_batch(ns: Option<&str>, lines: &[String]) -> Result<()> {
    ip_batch_timeout(ns, lines, DEFAULT_TIMEOUT)
}

/// [`ip_batch`] with its own deadline, for batches whose length grows with
/// a caller's parameter (thousands of addresses).
pub fn ip_batch_timeout(ns: Option<&str>, lines: &[String], timeout: Duration) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-batch", "-"]);
    let mut input = lines.join("\n");
    input.push('\n');
    run(&mut cmd, Some(&input), timeout).map(drop)
}

/// How often a [`Process`] is polled while waiting for it.
const PROCESS_POLL: Duration = Duration::from_millis(20);

/// A background process (a server, a load generator, an agent of the
/// benchmark) whose output goes to a log file. Dropping the handle kills
/// and reaps it, so a panic or an early return never leaves it running.
pub struct Process {
    name: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Process {
    /// Starts `cmd` (for instance from [`netns::command_in`]) with stdout and
    /// stderr both written to `log`; `name` names it in errors.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let file = File::create(log).map_err(io_err(format!("creating {}", log.display())))?;
        let stderr = file
            .try_clone()
            .map_err(io_err(format!("duplicating {}", log.display())))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .spawn()
            .map_err(|source| LabError::Spawn {
                cmd: describe(&cmd),
                source,
            })?;
        Ok(Self {
            name: name.to_owned(),
            log: log.to_owned(),
            child: Some(child),
        })
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Fails if the process already exited: a server that died on start-up
    /// must not turn into a run of connection refusals.
    pub fn check_alive(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Err(LabError::Traffic(format!(
                "{} was already stopped",
                self.name
            )));
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(LabError::Traffic(format!(
                "{} exited early: {status}",
                self.name
            ))),
            Err(e) => Err(io_err(format!("waiting for {}", self.name))(e)),
        }
    }

    /// Sends SIGTERM and waits up to `grace` for a clean exit (an agent
    /// detaches and unpins on SIGTERM), then SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        // Past the grace period wait_until kills it.
        if wait_until(&mut child, Instant::now() + grace, PROCESS_POLL).is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits up to `limit` for the process to end by itself and returns its
    /// log; a non-zero exit is an error carrying the log, and a process
    /// still running at `limit` is killed.
    pub fn wait_output(mut self, limit: Duration) -> Result<String> {
        let mut child = self.child.take().expect("only stop() takes the child");
        let status = wait_until(&mut child, Instant::now() + limit, PROCESS_POLL)
            .map_err(io_err(format!("waiting for {}", self.name)))?
            .ok_or_else(|| {
                LabError::Traffic(format!("{} did not finish within {limit:?}", self.name))
            })?;
        let out = std::fs::read_to_string(&self.log)
            .map_err(io_err(format!("reading {}", self.log.display())))?;
        if status.success() {
            Ok(out)
        } else {
            Err(LabError::Command {
                cmd: self.name.clone(),
                status: status.to_string(),
                stderr: out.trim().to_owned(),
            })
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_command_reports_stderr_and_status() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo boom >&2; exit 3"]);
        let err = run(&mut cmd, None, Duration::from_secs(10)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("boom"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.contains("sh -c"), "{msg}");
    }

    #[test]
    fn slow_command_times_out() {
        let mut cmd = Command::new("sleep");
        cmd.arg("5");
        let started = Instant::now();
        let err = run(&mut cmd, None, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, LabError::CommandTimeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn process_output_and_early_exit_are_reported() {
        let dir = std::env::temp_dir().join(format!("egress-lab-process-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo done"]);
        let p = Process::spawn("echo", cmd, &dir.join("echo.log")).unwrap();
        assert_eq!(p.wait_output(Duration::from_secs(10)).unwrap(), "done\n");

        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo broken >&2; exit 4"]);
        let mut p = Process::spawn("broken", cmd, &dir.join("broken.log")).unwrap();
        let started = Instant::now();
        while p.check_alive().is_ok() && started.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(10));
        }
        let err = p.check_alive().unwrap_err().to_string();
        assert!(err.contains("broken exited early"), "{err}");
        let err = p
            .wait_output(Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("broken") && err.contains("exit status: 4"),
            "{err}"
        );

        let mut sleep = Command::new("sleep");
        sleep.arg("30");
        let mut p = Process::spawn("sleeper", sleep, &dir.join("sleeper.log")).unwrap();
        p.check_alive().unwrap();
        p.stop(Duration::from_secs(10));
        assert!(p.check_alive().is_err(), "a stopped process is not alive");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stdin_reaches_the_child() {
        let mut cmd = Command::new("cat");
        let out = run(&mut cmd, Some("hello\n"), Duration::from_secs(10)).unwrap();
        assert_eq!(out.stdout, "hello\n");
    }
}
