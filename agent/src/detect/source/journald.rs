//! The systemd journal, followed through `journalctl -o json -f` (the
//! journal's own reader, so every journal format and file layout it supports
//! works), resumable by journal cursor. One reader serves every journald
//! monitor of a journal directory: its filters — by syslog identifier (NPD's
//! `pluginConfig.source`) or by unit — are ORed into one `journalctl`, and
//! each entry is handed to the monitors whose filter it passes.

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use super::{Line, LogSource};
use crate::detect::stop::Stop;

/// At most this many filters share one reader (a line's streams are a u64).
pub const MAX_FILTERS: usize = 64;

/// Which entries a journald monitor reads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Filter {
    /// `SYSLOG_IDENTIFIER=<id>` (NPD's `pluginConfig.source`).
    Identifier(String),
    /// A unit's own messages (`_SYSTEMD_UNIT`) and systemd's about it
    /// (`UNIT` from PID 1), as `journalctl --unit` reads them.
    Unit(String),
    /// The whole journal.
    All,
}

impl Filter {
    /// From a monitor's `pluginConfig`: `source`, else `unit`, else all.
    pub fn new(identifier: Option<&str>, unit: Option<&str>) -> Filter {
        match (identifier.filter(|s| !s.is_empty()), unit.filter(|s| !s.is_empty())) {
            (Some(id), _) => Filter::Identifier(id.to_string()),
            (None, Some(u)) if u.contains('.') => Filter::Unit(u.to_string()),
            (None, Some(u)) => Filter::Unit(format!("{u}.service")),
            (None, None) => Filter::All,
        }
    }

    /// journalctl match terms (one disjunction term).
    fn terms(&self) -> Vec<Vec<String>> {
        match self {
            Filter::Identifier(id) => vec![vec![format!("SYSLOG_IDENTIFIER={id}")]],
            Filter::Unit(u) => vec![
                vec![format!("_SYSTEMD_UNIT={u}")],
                vec![format!("UNIT={u}"), "_PID=1".into()],
            ],
            Filter::All => Vec::new(),
        }
    }

    fn passes(&self, e: &Entry) -> bool {
        match self {
            Filter::Identifier(id) => has(&e.identifier, id),
            Filter::Unit(u) => has(&e.systemd_unit, u) || (has(&e.unit, u) && has(&e.pid, "1")),
            Filter::All => true,
        }
    }
}

/// Whether a journal field (a string, or an array when repeated) holds `v`.
fn has(field: &serde_json::Value, v: &str) -> bool {
    match field {
        serde_json::Value::String(s) => s == v,
        serde_json::Value::Array(a) => a.iter().any(|x| x.as_str() == Some(v)),
        _ => false,
    }
}

/// A followed journal.
pub struct JournalSource {
    name: String,
    /// Journal directory (`--directory`); `None`: the system journal.
    directory: Option<PathBuf>,
    filters: Vec<Filter>,
    child: Option<Child>,
    stdout: Option<std::process::ChildStdout>,
    /// Bytes read from journalctl, up to the last whole line.
    buf: Vec<u8>,
    cursor: Option<String>,
}

/// One journal entry as `journalctl -o json` prints it.
#[derive(serde::Deserialize)]
struct Entry {
    #[serde(rename = "MESSAGE", default)]
    message: serde_json::Value,
    #[serde(rename = "__CURSOR")]
    cursor: String,
    #[serde(rename = "__REALTIME_TIMESTAMP", default)]
    realtime: Option<String>,
    #[serde(rename = "SYSLOG_IDENTIFIER", default)]
    identifier: serde_json::Value,
    #[serde(rename = "_SYSTEMD_UNIT", default)]
    systemd_unit: serde_json::Value,
    #[serde(rename = "UNIT", default)]
    unit: serde_json::Value,
    #[serde(rename = "_PID", default)]
    pid: serde_json::Value,
}

/// Parses one line of `journalctl -o json` for readers with `filters`: the
/// entry's line (streams: the filters it passes; MESSAGE trimmed, as NPD's
/// journald watcher does) and cursor, or `None` for a line that is not a
/// journal entry (skipped, never fatal).
pub fn parse_line(line: &str, filters: &[Filter]) -> Option<(Line, String)> {
    let e = serde_json::from_str::<Entry>(line).ok()?;
    let time = e
        .realtime
        .as_deref()
        .and_then(|t| t.parse::<u64>().ok())
        .and_then(|us| SystemTime::UNIX_EPOCH.checked_add(Duration::from_micros(us)))
        .unwrap_or_else(SystemTime::now);
    let streams = filters
        .iter()
        .enumerate()
        .filter(|(_, f)| f.passes(&e))
        .fold(0u64, |acc, (i, _)| acc | (1 << i));
    let message = message_bytes(&e.message);
    Some((
        Line {
            time,
            message: super::journal_message(&message).to_vec(),
            streams,
        },
        e.cursor,
    ))
}

impl JournalSource {
    /// `log_path` as NPD writes it: "/var/log/journal" (or empty) means the
    /// system journal; anything else is a journal directory. Line streams are
    /// indexes into `filters` (at most [`MAX_FILTERS`]).
    pub fn new(log_path: &str, filters: Vec<Filter>) -> JournalSource {
        let directory = match log_path {
            "" | "/var/log/journal" => None,
            p => Some(Path::new(p).to_path_buf()),
        };
        let name = match &directory {
            None => "journald".to_string(),
            Some(d) => format!("journald:{}", d.display()),
        };
        JournalSource {
            name,
            directory,
            filters,
            child: None,
            stdout: None,
            buf: Vec::new(),
            cursor: None,
        }
    }

    fn stop_child(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stdout = None;
        self.buf.clear();
    }
}

impl Drop for JournalSource {
    fn drop(&mut self) {
        self.stop_child();
    }
}

/// A journal MESSAGE: a string, or an array of bytes for binary messages.
fn message_bytes(v: &serde_json::Value) -> Vec<u8> {
    match v {
        serde_json::Value::String(s) => s.as_bytes().to_vec(),
        serde_json::Value::Array(a) => a.iter().filter_map(|b| b.as_u64().map(|b| b as u8)).collect(),
        _ => Vec::new(),
    }
}

impl LogSource for JournalSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn open(&mut self, cursor: Option<&str>, not_before: Option<SystemTime>) -> std::io::Result<()> {
        self.stop_child();
        let cursor = cursor.map(String::from).or_else(|| self.cursor.clone());
        // journalctl must be able to read the journal at all, within its
        // start deadline: a hung or failing journalctl is an error here (the
        // pipeline reports LogSourceFailed and retries), not a silent source.
        let mut check = Command::new("journalctl");
        check.args(["--lines=0", "--no-pager", "--quiet"]);
        if let Some(d) = &self.directory {
            check.arg(format!("--directory={}", d.display()));
        }
        crate::exec::run(&mut check, "journalctl", crate::exec::Kind::JournalctlStart)
            .map_err(std::io::Error::other)?;
        let mut cmd = Command::new("journalctl");
        cmd.args(["-o", "json", "--follow", "--no-pager", "--lines=all", "--quiet"]);
        if let Some(d) = &self.directory {
            cmd.arg(format!("--directory={}", d.display()));
        }
        match (&cursor, not_before) {
            (Some(c), _) => {
                cmd.arg(format!("--after-cursor={c}"));
            }
            (None, Some(t)) => {
                let secs = t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                cmd.arg(format!("--since=@{secs}"));
            }
            (None, None) => {
                cmd.arg("--since=now");
            }
        }
        // One term per filter, ORed ("+"); a filter for the whole journal
        // means no match at all.
        if !self.filters.contains(&Filter::All) {
            let terms: Vec<Vec<String>> = self.filters.iter().flat_map(Filter::terms).collect();
            for (i, t) in terms.iter().enumerate() {
                if i > 0 {
                    cmd.arg("+");
                }
                cmd.args(t);
            }
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("journalctl has no stdout"))?;
        // Read without blocking, after poll says there is something: the
        // thread waits on the pipe and the stop signal, with no reader
        // thread and no timer.
        nix::fcntl::fcntl(&stdout, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))
            .map_err(std::io::Error::from)?;
        self.child = Some(child);
        self.stdout = Some(stdout);
        self.cursor = cursor;
        Ok(())
    }

    fn read(&mut self, out: &mut Vec<Line>, max: usize, wait: Duration, stop: &Stop) -> std::io::Result<u64> {
        let stdout = self
            .stdout
            .as_mut()
            .ok_or_else(|| std::io::Error::other("journal is not open"))?;
        let mut chunk = [0u8; 64 * 1024];
        let mut waited = false;
        let mut eof = false;
        // Take what the pipe holds now (waiting once when it is empty), up
        // to a bound; lines are split below.
        loop {
            match stdout.read(&mut chunk) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if waited || self.buf.contains(&b'\n') {
                        break;
                    }
                    waited = true;
                    if !stop.wait_readable(stdout.as_fd(), wait) {
                        break;
                    }
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if self.buf.len() >= 4 << 20 {
                break;
            }
        }
        // Whole lines only; a partial one waits for the rest.
        let mut start = 0;
        for nl in memchr::memchr_iter(b'\n', &self.buf) {
            if out.len() >= max {
                break;
            }
            let line = String::from_utf8_lossy(&self.buf[start..nl]);
            start = nl + 1;
            if let Some((l, cursor)) = parse_line(&line, &self.filters) {
                out.push(l);
                self.cursor = Some(cursor);
            }
        }
        self.buf.drain(..start);
        if eof && out.is_empty() {
            return Err(std::io::Error::other("journalctl stopped"));
        }
        Ok(0)
    }

    fn cursor(&self) -> Option<String> {
        self.cursor.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_and_text_messages_decode() {
        assert_eq!(message_bytes(&serde_json::json!("hi")), b"hi");
        assert_eq!(message_bytes(&serde_json::json!([104, 105])), b"hi");
        assert!(message_bytes(&serde_json::Value::Null).is_empty());
    }
}
