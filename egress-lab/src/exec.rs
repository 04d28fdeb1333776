//! Running external commands (`ip`, `iptables`, `bpftool`, the agent's CLI)
//! with a deadline, checking their exit status and keeping their stderr for
//! the error message.

use std::{
    io::{Read, Write},
    process::{Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{
    error::{LabError, Result},
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
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = err_reader.join().unwrap_or_default();
                return Err(LabError::CommandTimeout {
                    cmd: desc,
                    timeout,
                    stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
                });
            }
            Ok(None) => thread::sleep(Duration::from_millis(5)),
            Err(source) => {
                return Err(LabError::Spawn { cmd: desc, source });
            }
        }
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
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
            stderr.push_str("\ninput was:\n");
            stderr.push_str(input);
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
    run(&mut cmd, Some(&input), DEFAULT_TIMEOUT).map(drop)
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
    fn stdin_reaches_the_child() {
        let mut cmd = Command::new("cat");
        let out = run(&mut cmd, Some("hello\n"), Duration::from_secs(10)).unwrap();
        assert_eq!(out.stdout, "hello\n");
    }
}
