//! The systemd journal, followed through `journalctl -o json -f` (the
//! journal's own reader, so every journal format and file layout it supports
//! works), filtered by syslog identifier (NPD's `pluginConfig.source`) or by
//! unit, resumable by journal cursor.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use super::{Line, LogSource};

/// A followed journal.
pub struct JournalSource {
    name: String,
    /// Journal directory (`--directory`); `None`: the system journal.
    directory: Option<PathBuf>,
    identifier: Option<String>,
    unit: Option<String>,
    child: Option<Child>,
    lines: Option<mpsc::Receiver<std::io::Result<String>>>,
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
}

/// Parses one line of `journalctl -o json`: the entry's line and cursor, or
/// `None` for a line that is not a journal entry (skipped, never fatal).
pub fn parse_line(line: &str) -> Option<(Line, String)> {
    let e = serde_json::from_str::<Entry>(line).ok()?;
    let time = e
        .realtime
        .and_then(|t| t.parse::<u64>().ok())
        .and_then(|us| SystemTime::UNIX_EPOCH.checked_add(Duration::from_micros(us)))
        .unwrap_or_else(SystemTime::now);
    Some((
        Line {
            time,
            message: message_bytes(&e.message),
        },
        e.cursor,
    ))
}

impl JournalSource {
    /// `log_path` as NPD writes it: "/var/log/journal" (or empty) means the
    /// system journal; anything else is a journal directory.
    pub fn new(log_path: &str, identifier: Option<&str>, unit: Option<&str>) -> JournalSource {
        let directory = match log_path {
            "" | "/var/log/journal" => None,
            p => Some(Path::new(p).to_path_buf()),
        };
        let what = identifier.or(unit).unwrap_or("all");
        JournalSource {
            name: format!("journald:{what}"),
            directory,
            identifier: identifier.map(String::from),
            unit: unit.map(String::from),
            child: None,
            lines: None,
            cursor: None,
        }
    }

    fn stop_child(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.lines = None;
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
        if let Some(id) = &self.identifier {
            cmd.arg(format!("SYSLOG_IDENTIFIER={id}"));
        }
        if let Some(u) = &self.unit {
            cmd.arg(format!("--unit={u}"));
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
        let (tx, rx) = mpsc::sync_channel(16_384);
        std::thread::Builder::new()
            .name("journalctl-reader".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let end = line.is_err();
                    if tx.send(line).is_err() || end {
                        break;
                    }
                }
            })?;
        self.child = Some(child);
        self.lines = Some(rx);
        self.cursor = cursor;
        Ok(())
    }

    fn read(&mut self, out: &mut Vec<Line>, max: usize, wait: Duration) -> std::io::Result<u64> {
        let rx = self
            .lines
            .as_ref()
            .ok_or_else(|| std::io::Error::other("journal is not open"))?;
        let mut first = match rx.recv_timeout(wait) {
            Ok(l) => Some(l),
            Err(mpsc::RecvTimeoutError::Timeout) => return Ok(0),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(std::io::Error::other("journalctl stopped"));
            }
        };
        while out.len() < max {
            let line = match first.take() {
                Some(l) => l,
                None => match rx.try_recv() {
                    Ok(l) => l,
                    Err(_) => break,
                },
            }?;
            let Some((l, cursor)) = parse_line(&line) else {
                continue;
            };
            out.push(l);
            self.cursor = Some(cursor);
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
