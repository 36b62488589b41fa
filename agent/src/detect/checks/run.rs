//! Running a check's program (a custom plugin, an exec probe) so that it
//! can never leave anything behind. The agent starts a small shim — itself,
//! as `nodekeeper-agent run-check` — which becomes a child subreaper, runs
//! the program in its own process group, kills that group at the timeout,
//! then kills and reaps every descendant still alive (also those that left
//! the group), and prints one JSON result. The agent itself never adopts
//! orphans, so other children (dpkg, systemctl) are never reaped by mistake.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// NPD reads at most this much of a plugin's stdout (and stderr).
pub const MAX_CAPTURE: usize = 4096;
/// What the agent keeps of a tool's output (smartctl, nvidia-smi).
pub const MAX_TOOL_OUTPUT: usize = 4 << 20;

/// How a run ended, as the shim reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunResult {
    /// The exit code (None: killed by a signal or could not start).
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    /// Why the program could not start.
    pub start_error: Option<String>,
    /// At most the run's capture limit of stdout, [`MAX_CAPTURE`] of stderr.
    pub stdout: String,
    pub stderr: String,
    /// Bytes of stdout beyond what was kept.
    pub stdout_dropped: u64,
    /// Descendants killed after the program ended (left running by it).
    pub leftovers_killed: u32,
    pub duration_ms: u64,
}

fn capture(mut r: impl Read + Send + 'static, limit: usize) -> std::thread::JoinHandle<(Vec<u8>, u64)> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut dropped = 0u64;
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = limit.saturating_sub(kept.len()).min(n);
                    kept.extend_from_slice(&buf[..room]);
                    dropped += (n - room) as u64;
                }
            }
        }
        (kept, dropped)
    })
}

/// This process's children (the shim's: adopted orphans included).
fn children() -> Vec<Pid> {
    let me = std::process::id();
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{me}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse().ok()).map(Pid::from_raw));
            }
        }
    }
    out
}

/// The shim: runs `argv` with `timeout` and returns the result (the caller
/// prints it). Only ever called in a process of its own.
pub fn shim(timeout: Duration, max_output: usize, argv: &[String]) -> RunResult {
    let started = Instant::now();
    let mut res = RunResult::default();
    // Orphans of the program become our children, so we can reap them.
    let _ = nix::sys::prctl::set_child_subreaper(true);
    let Some((prog, args)) = argv.split_first() else {
        res.start_error = Some("no program given".into());
        return res;
    };
    let mut child = match Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            res.start_error = Some(format!("cannot start {prog}: {e}"));
            return res;
        }
    };
    let pgid = Pid::from_raw(child.id() as i32);
    let out = child.stdout.take().map(|o| capture(o, max_output));
    let err = child.stderr.take().map(|e| capture(e, MAX_CAPTURE));
    let deadline = started + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => {
                res.timed_out = true;
                let _ = killpg(pgid, Signal::SIGKILL);
                break child.wait().ok();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => break None,
        }
    };
    // Whatever the program left: first its group, then every descendant
    // (adopted by us as the subreaper), until none is left.
    let _ = killpg(pgid, Signal::SIGKILL);
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let left = children();
        if left.is_empty() || Instant::now() >= until {
            break;
        }
        for p in &left {
            if kill(*p, Signal::SIGKILL).is_ok() {
                res.leftovers_killed += 1;
            }
        }
        // Reap what has died; adopted ones are ours to wait for.
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Some(s) = status {
        res.exit_code = s.code();
        if res.exit_code.is_none() && !res.timed_out {
            res.start_error = s.signal().map(|n| format!("killed by signal {n}"));
        }
    }
    // The pipes close once every holder is gone.
    if let Some((o, dropped)) = out.and_then(|h| h.join().ok()) {
        res.stdout = String::from_utf8_lossy(&o).into_owned();
        res.stdout_dropped = dropped;
    }
    if let Some((e, _)) = err.and_then(|h| h.join().ok()) {
        res.stderr = String::from_utf8_lossy(&e).into_owned();
    }
    res.duration_ms = started.elapsed().as_millis() as u64;
    res
}

/// Runs `argv` through the shim with `timeout`, keeping NPD's 4 KiB of its
/// output; never blocks past the timeout plus a few seconds, whatever the
/// program does.
pub async fn run(argv: &[String], timeout: Duration) -> RunResult {
    run_capturing(argv, timeout, MAX_CAPTURE).await
}

/// [`run`], keeping up to `max_output` bytes of stdout.
pub async fn run_capturing(argv: &[String], timeout: Duration, max_output: usize) -> RunResult {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            return RunResult {
                start_error: Some(format!("cannot find the agent's own binary for the check shim: {e}")),
                ..Default::default()
            };
        }
    };
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("run-check")
        .arg("--timeout-ms")
        .arg(timeout.as_millis().to_string())
        .arg("--max-output")
        .arg(max_output.to_string())
        .arg("--")
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return RunResult {
                start_error: Some(format!("cannot start the check shim: {e}")),
                ..Default::default()
            };
        }
    };
    match tokio::time::timeout(timeout + Duration::from_secs(10), child.wait_with_output()).await {
        Ok(Ok(o)) => serde_json::from_slice(&o.stdout).unwrap_or_else(|e| RunResult {
            start_error: Some(format!("the check shim's answer is unreadable: {e}")),
            ..Default::default()
        }),
        Ok(Err(e)) => RunResult {
            start_error: Some(format!("waiting for the check shim: {e}")),
            ..Default::default()
        },
        Err(_) => RunResult {
            timed_out: true,
            start_error: Some("the check shim did not finish; it was killed".into()),
            ..Default::default()
        },
    }
}
