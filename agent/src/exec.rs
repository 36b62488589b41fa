//! Every subprocess the agent starts runs with a deadline. A child gets its
//! own process group; when the deadline passes, the whole group is killed
//! with SIGKILL and the child reaped, and the error names the command and
//! the deadline. Its stderr (and stdout) are kept as evidence, up to a cap,
//! read on their own threads so a chatty child cannot block on a full pipe
//! and a daemon it left behind holding the pipe cannot block the agent.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Deadlines per kind of command (`deadlines` in agent.yaml).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Deadlines {
    /// systemctl calls (start, restart, enable, daemon-reload, is-active).
    pub systemctl_seconds: u64,
    /// dpkg, apt-get, rpm, dnf: one package transaction.
    pub package_seconds: u64,
    /// Quick package queries (dpkg-query, dpkg-deb -f, rpm -q).
    pub query_seconds: u64,
    /// No longer used: the journal is read in-process, not by a
    /// `journalctl` child. Accepted so that existing configurations load.
    pub journalctl_start_seconds: u64,
    /// Scripts (remedies, plugins) without a timeout of their own.
    pub script_seconds: u64,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            systemctl_seconds: 120,
            package_seconds: 900,
            query_seconds: 60,
            journalctl_start_seconds: 30,
            script_seconds: 300,
        }
    }
}

impl Deadlines {
    /// The first deadline that is 0 (invalid), as its key.
    pub fn invalid_key(&self) -> Option<&'static str> {
        [
            ("deadlines.systemctlSeconds", self.systemctl_seconds),
            ("deadlines.packageSeconds", self.package_seconds),
            ("deadlines.querySeconds", self.query_seconds),
            ("deadlines.scriptSeconds", self.script_seconds),
        ]
        .into_iter()
        .find(|(_, v)| *v == 0)
        .map(|(k, _)| k)
    }
}

/// What kind of command a subprocess is, for its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Systemctl,
    Package,
    Query,
    Script,
}

static DEADLINES: OnceLock<Deadlines> = OnceLock::new();

/// Sets the deadlines once at start (later calls are ignored).
pub fn set_deadlines(d: Deadlines) {
    let _ = DEADLINES.set(d);
}

/// The deadline for `kind`.
pub fn deadline(kind: Kind) -> Duration {
    let d = DEADLINES.get().copied().unwrap_or_default();
    Duration::from_secs(match kind {
        Kind::Systemctl => d.systemctl_seconds,
        Kind::Package => d.package_seconds,
        Kind::Query => d.query_seconds,
        Kind::Script => d.script_seconds,
    })
}

/// Output kept per stream.
const KEEP: usize = 256 * 1024;

/// How a finished command ended.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Why a command did not give an exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// It could not be started.
    Spawn(String),
    /// It outlived its deadline; its process group was killed.
    Timeout(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Spawn(m) | Error::Timeout(m) => f.write_str(m),
        }
    }
}

/// A stream being read on its own thread: what was read so far, and a
/// signal when it ended.
struct Reader {
    kept: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    done: mpsc::Receiver<()>,
}

impl Reader {
    /// What was read, after waiting up to `wait` for the stream to end.
    fn take(self, wait: Duration) -> String {
        let _ = self.done.recv_timeout(wait);
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&kept).into_owned()
    }
}

fn reader(mut r: impl Read + Send + 'static) -> Reader {
    let (tx, done) = mpsc::channel();
    let kept = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let k = kept.clone();
    let _ = std::thread::Builder::new().name("exec-output".into()).spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut kept = k.lock().unwrap_or_else(|p| p.into_inner());
                    kept.extend_from_slice(&buf[..n]);
                    if kept.len() > KEEP {
                        // Keep the end: the error is usually last.
                        let cut = kept.len() - KEEP;
                        kept.drain(..cut);
                    }
                }
            }
        }
        let _ = tx.send(());
    });
    Reader { kept, done }
}

/// Runs `cmd` to its end or its deadline (`what` names it in errors).
pub fn output(cmd: &mut Command, what: &str, limit: Duration) -> Result<Output, Error> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::Spawn(format!("{what}: cannot run: {e}")))?;
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let out = child.stdout.take().map(reader);
    let err = child.stderr.take().map(reader);
    let start = Instant::now();
    let mut pause = Duration::from_millis(2);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if start.elapsed() >= limit => break None,
            Ok(None) => {
                std::thread::sleep(pause.min(limit.saturating_sub(start.elapsed())));
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(e) => return Err(Error::Spawn(format!("{what}: waiting for it: {e}"))),
        }
    };
    // Output still held open by something the child left behind (a daemon a
    // maintainer script started) is not waited for long.
    let collect = |r: Option<Reader>| r.map(|r| r.take(Duration::from_secs(2))).unwrap_or_default();
    let Some(status) = status else {
        // Past the deadline the whole group goes: the child and whatever it
        // started and is waiting for. After a normal exit the group is left
        // alone (a package's maintainer script may have started a service).
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
        let stderr = collect(err);
        let tail = stderr.trim();
        return Err(Error::Timeout(format!(
            "{what}: did not finish within its deadline of {limit:?}; its process group was killed{}",
            if tail.is_empty() {
                String::new()
            } else {
                format!(" (stderr: {})", last_line(tail))
            }
        )));
    };
    Ok(Output {
        status,
        stdout: collect(out),
        stderr: collect(err),
    })
}

fn last_line(s: &str) -> &str {
    s.lines().last().unwrap_or(s)
}

/// Runs `cmd` with the deadline of its kind; its stdout when it succeeds,
/// else an error with its exit status and stderr (or stdout).
pub fn run(cmd: &mut Command, what: &str, kind: Kind) -> Result<String, String> {
    run_for(cmd, what, deadline(kind))
}

/// [`run`] with an explicit deadline.
pub fn run_for(cmd: &mut Command, what: &str, limit: Duration) -> Result<String, String> {
    let out = output(cmd, what, limit).map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        let mut msg = out.stderr.trim().to_string();
        if msg.is_empty() {
            msg = out.stdout.trim().to_string();
        }
        Err(format!("{what} failed ({}): {msg}", out.status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_status_and_stderr_are_kept() {
        let ok = run_for(
            Command::new("sh").args(["-c", "echo hi"]),
            "echo",
            Duration::from_secs(10),
        )
        .expect("ok");
        assert_eq!(ok, "hi\n");
        let e = run_for(
            Command::new("sh").args(["-c", "echo broken >&2; exit 3"]),
            "broken",
            Duration::from_secs(10),
        )
        .unwrap_err();
        assert!(
            e.contains("broken failed") && e.contains("broken") && e.contains('3'),
            "{e}"
        );
        let e = run_for(&mut Command::new("/nonexistent/x"), "missing", Duration::from_secs(1)).unwrap_err();
        assert!(e.contains("missing: cannot run"), "{e}");
    }

    #[test]
    fn what_a_finished_command_started_is_left_alone() {
        let dir = std::env::temp_dir().join(format!("nk-exec-bg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let pid = dir.join("pid");
        // Like a maintainer script starting a daemon that keeps the pipe open.
        let script = format!("sleep 30 & echo $! > {}; echo done", pid.display());
        let start = Instant::now();
        let out = run_for(
            Command::new("sh").args(["-c", &script]),
            "starter",
            Duration::from_secs(20),
        )
        .expect("ok");
        assert_eq!(out, "done\n", "what was printed is kept");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "returned while the daemon holds the pipe"
        );
        let bg = std::fs::read_to_string(&pid).expect("pid");
        let bg = bg.trim();
        let state = std::fs::read_to_string(format!("/proc/{bg}/stat")).unwrap_or_default();
        assert!(
            state
                .rsplit_once(')')
                .is_some_and(|(_, r)| !r.trim_start().starts_with('Z')),
            "the daemon survives: {state}"
        );
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(bg.parse().expect("pid")),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_command_past_its_deadline_is_killed_with_its_whole_group() {
        let dir = std::env::temp_dir().join(format!("nk-exec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let pids = dir.join("pids");
        // A parent that starts two grandchildren and then hangs, all holding stdout.
        let script = format!(
            "sleep 300 & echo $! >> {p}; sleep 300 & echo $! >> {p}; echo started >&2; sleep 300",
            p = pids.display()
        );
        let e = output(
            Command::new("sh").args(["-c", &script]),
            "hung tool",
            Duration::from_millis(500),
        )
        .unwrap_err();
        let Error::Timeout(msg) = e else { panic!("{e:?}") };
        assert!(
            msg.contains("hung tool") && msg.contains("deadline of 500ms") && msg.contains("started"),
            "{msg}"
        );
        std::thread::sleep(Duration::from_millis(200));
        for pid in std::fs::read_to_string(&pids).expect("pids").split_whitespace() {
            let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| !s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')))
                .unwrap_or(false);
            assert!(!alive, "grandchild {pid} survived the deadline");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
