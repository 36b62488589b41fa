//! The systemd journal, read in-process with libsystemd's own reader
//! ([`super::sd_journal`]), resumable by journal cursor. One reader serves
//! every journald monitor of a journal directory: its filters — by syslog
//! identifier (NPD's `pluginConfig.source`) or by unit — are ORed into one
//! set of journal matches, and each entry is handed to the monitors whose
//! filter it passes.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::sd_journal::Journal;
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

    /// Journal match terms (one alternative each, as journalctl's
    /// `A B + C` arguments).
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
}

/// What one entry's fields say, gathered while they are enumerated (their
/// bytes are valid only during that). Public for the fuzz target: the fields
/// are outside input.
#[derive(Default)]
pub struct Fields {
    message: Vec<u8>,
    /// Filters the entry's `SYSLOG_IDENTIFIER` or `_SYSTEMD_UNIT` passes.
    own: u64,
    /// Unit filters named by the entry's `UNIT` (they count only from PID 1).
    about_unit: u64,
    from_pid1: bool,
}

impl Fields {
    /// Takes one `FIELD=value` of the entry (anything else is ignored).
    pub fn add(&mut self, field: &[u8], filters: &[Filter]) {
        let Some(eq) = memchr::memchr(b'=', field) else { return };
        let value = &field[eq + 1..];
        let bits = |pick: &dyn Fn(&Filter) -> bool| {
            filters
                .iter()
                .enumerate()
                .filter(|(_, f)| pick(f))
                .fold(0u64, |acc, (i, _)| acc | (1 << i))
        };
        match &field[..eq] {
            b"MESSAGE" => self.message = value.to_vec(),
            b"SYSLOG_IDENTIFIER" => {
                self.own |= bits(&|f| matches!(f, Filter::Identifier(id) if id.as_bytes() == value));
            }
            b"_SYSTEMD_UNIT" => self.own |= bits(&|f| matches!(f, Filter::Unit(u) if u.as_bytes() == value)),
            b"UNIT" => self.about_unit |= bits(&|f| matches!(f, Filter::Unit(u) if u.as_bytes() == value)),
            b"_PID" => self.from_pid1 |= value == b"1",
            _ => {}
        }
    }

    /// The streams (indexes into `filters`) whose filter the entry passes.
    pub fn streams(&self, filters: &[Filter]) -> u64 {
        let all = filters
            .iter()
            .enumerate()
            .filter(|(_, f)| **f == Filter::All)
            .fold(0u64, |acc, (i, _)| acc | (1 << i));
        self.own | all | if self.from_pid1 { self.about_unit } else { 0 }
    }

    /// MESSAGE as NPD's journald watcher hands it on: trimmed.
    pub fn message(&self) -> &[u8] {
        super::journal_message(&self.message)
    }
}

/// A followed journal.
pub struct JournalSource {
    name: String,
    /// Journal directory; `None`: the system journal.
    directory: Option<PathBuf>,
    filters: Vec<Filter>,
    /// Opened, read and closed on the reader thread only (see [`Journal`]).
    journal: Option<Journal>,
    /// The entry the journal is positioned on has not been handed out yet
    /// (a stored cursor's entry was gone and the seek landed on a later one).
    unread: bool,
    cursor: Option<String>,
    /// Entries skipped because their fields could not be read.
    unreadable: u64,
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
            journal: None,
            unread: false,
            cursor: None,
            unreadable: 0,
        }
    }

    /// The current entry as a line (MESSAGE trimmed, as NPD's journald
    /// watcher does), and its cursor.
    fn entry(journal: &mut Journal, filters: &[Filter]) -> std::io::Result<(Line, String)> {
        let mut fields = Fields::default();
        journal.for_each_field(|f| fields.add(f, filters))?;
        let time = SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_micros(journal.realtime()?))
            .unwrap_or_else(SystemTime::now);
        let line = Line {
            time,
            message: fields.message().to_vec(),
            streams: fields.streams(filters),
        };
        Ok((line, journal.cursor()?))
    }
}

impl LogSource for JournalSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn open(&mut self, cursor: Option<&str>, not_before: Option<SystemTime>) -> std::io::Result<()> {
        self.journal = None;
        self.unread = false;
        let cursor = cursor.map(String::from).or_else(|| self.cursor.clone());
        let mut journal = Journal::open(self.directory.as_deref())?;
        // One alternative per filter term, ORed; a filter for the whole
        // journal means no match at all.
        if !self.filters.contains(&Filter::All) {
            for (i, term) in self.filters.iter().flat_map(Filter::terms).enumerate() {
                if i > 0 {
                    journal.add_disjunction()?;
                }
                for m in term {
                    journal.add_match(&m)?;
                }
            }
        }
        match &cursor {
            Some(c) => {
                // Resume after the cursor's entry; when that entry is gone
                // (vacuumed), the seek lands on the next one, which is unread.
                journal.seek_cursor(c)?;
                if journal.step()? {
                    self.unread = !journal.test_cursor(c)?;
                }
            }
            None => {
                let t = not_before.unwrap_or_else(SystemTime::now);
                let usec = t
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as u64);
                journal.seek_realtime(usec)?;
            }
        }
        self.journal = Some(journal);
        self.cursor = cursor;
        Ok(())
    }

    fn read(&mut self, out: &mut Vec<Line>, max: usize, wait: Duration, stop: &Stop) -> std::io::Result<u64> {
        let journal = self
            .journal
            .as_mut()
            .ok_or_else(|| std::io::Error::other("journal is not open"))?;
        let mut waited = false;
        // Take the entries there are now (waiting once when there are none),
        // up to `max`.
        while out.len() < max {
            let here = std::mem::take(&mut self.unread) || journal.step()?;
            if !here {
                if waited || !out.is_empty() {
                    break;
                }
                waited = true;
                journal.wait(wait, stop)?;
                continue;
            }
            match Self::entry(journal, &self.filters) {
                Ok((line, cursor)) => {
                    out.push(line);
                    self.cursor = Some(cursor);
                }
                Err(e) => {
                    // A damaged entry is skipped, not retried forever: the
                    // source would reopen at it again and again.
                    self.unreadable += 1;
                    if self.unreadable == 1 {
                        tracing::warn!(source = %self.name, error = %e, "skipping a journal entry that cannot be read");
                    } else {
                        tracing::debug!(source = %self.name, error = %e, skipped = self.unreadable, "skipping a journal entry that cannot be read");
                    }
                    if let Ok(c) = journal.cursor() {
                        self.cursor = Some(c);
                    }
                }
            }
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

    fn streams(fields: &[&str], filters: &[Filter]) -> u64 {
        let mut f = Fields::default();
        for x in fields {
            f.add(x.as_bytes(), filters);
        }
        f.streams(filters)
    }

    #[test]
    fn an_entry_goes_to_the_monitors_whose_filter_it_passes() {
        let filters = [
            Filter::Identifier("containerd".into()),
            Filter::Unit("kubelet.service".into()),
            Filter::All,
        ];
        assert_eq!(streams(&["SYSLOG_IDENTIFIER=containerd", "_PID=42"], &filters), 0b101);
        assert_eq!(
            streams(&["_SYSTEMD_UNIT=kubelet.service", "MESSAGE=x"], &filters),
            0b110
        );
        // systemd's own message about the unit counts; another process's does not.
        assert_eq!(streams(&["UNIT=kubelet.service", "_PID=1"], &filters), 0b110);
        assert_eq!(streams(&["_PID=7", "UNIT=kubelet.service"], &filters), 0b100);
        // A repeated field: each of its values counts.
        assert_eq!(
            streams(&["SYSLOG_IDENTIFIER=other", "SYSLOG_IDENTIFIER=containerd"], &filters),
            0b101
        );
        assert_eq!(streams(&["SYSLOG_IDENTIFIER=containerdX"], &filters[..2]), 0);
    }

    #[test]
    fn a_message_keeps_equals_signs_and_any_bytes() {
        let mut f = Fields::default();
        f.add(b"MESSAGE=a=b\x00\xff", &[]);
        assert_eq!(f.message, b"a=b\x00\xff");
        f.add(b"NOT A FIELD", &[]);
        assert_eq!(f.message, b"a=b\x00\xff");
    }

    /// Writes entries (identifier, message, realtime µs) to a journal file
    /// in `dir` with the real systemd-journal-remote.
    fn write_journal(dir: &Path, file: &str, entries: &[(&str, &str, u64)]) {
        let mut export = String::new();
        for (id, msg, t) in entries {
            export.push_str(&format!(
                "__REALTIME_TIMESTAMP={t}\n__MONOTONIC_TIMESTAMP={t}\n_BOOT_ID=0123456789abcdef0123456789abcdef\nSYSLOG_IDENTIFIER={id}\nMESSAGE={msg}\n\n"
            ));
        }
        let mut child = std::process::Command::new("/lib/systemd/systemd-journal-remote")
            .arg("-o")
            .arg(dir.join(file))
            .arg("-")
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("systemd-journal-remote (apt-get install systemd-journal-remote)");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(export.as_bytes())
            .expect("write");
        assert!(child.wait().expect("wait").success());
    }

    fn read_all(src: &mut JournalSource) -> Vec<String> {
        let stop = Stop::new().expect("stop");
        let mut out = Vec::new();
        src.read(&mut out, 100, Duration::from_millis(10), &stop).expect("read");
        out.iter()
            .map(|l| String::from_utf8_lossy(&l.message).into_owned())
            .collect()
    }

    #[test]
    fn the_real_journal_is_read_filtered_and_resumed_after_its_cursor_even_when_that_entry_is_gone() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir_all(&a).expect("dir");
        std::fs::create_dir_all(&b).expect("dir");
        let t = 1_700_000_000_000_000u64;
        write_journal(
            &a,
            "a.journal",
            &[
                ("kubelet", " one ", t),
                ("sshd", "other", t + 1),
                ("kubelet", "two", t + 2),
                ("kubelet", "three", t + 3),
            ],
        );
        let filters = vec![Filter::Identifier("kubelet".into())];
        let mut src = JournalSource::new(&a.display().to_string(), filters.clone());
        src.open(None, Some(SystemTime::UNIX_EPOCH)).expect("open");
        assert_eq!(read_all(&mut src), ["one", "two", "three"], "only kubelet's, trimmed");
        // Reopened, a source resumes after what it handed out.
        src.open(None, Some(SystemTime::UNIX_EPOCH)).expect("reopen");
        assert!(read_all(&mut src).is_empty(), "nothing replayed on reopen");
        // Resume after "one": the next two, nothing replayed.
        let mut src2 = JournalSource::new(&a.display().to_string(), filters.clone());
        let mut src = JournalSource::new(&a.display().to_string(), filters.clone());
        src.open(None, Some(SystemTime::UNIX_EPOCH)).expect("open");
        let stop = Stop::new().expect("stop");
        let mut first = Vec::new();
        src.read(&mut first, 1, Duration::from_millis(10), &stop).expect("read");
        let after_one = src.cursor().expect("cursor");
        src2.open(Some(&after_one), None).expect("open at cursor");
        assert_eq!(read_all(&mut src2), ["two", "three"]);
        // The same entries, but the one of the cursor is gone (vacuumed):
        // the seek lands on the next one, which is handed out, not skipped.
        write_journal(&b, "b.journal", &[("kubelet", "one", t), ("kubelet", "three", t + 3)]);
        let mut src = JournalSource::new(&a.display().to_string(), filters.clone());
        src.open(None, Some(SystemTime::UNIX_EPOCH)).expect("open");
        let mut two = Vec::new();
        src.read(&mut two, 2, Duration::from_millis(10), &stop).expect("read");
        let after_two = src.cursor().expect("cursor");
        let mut gone = JournalSource::new(&b.display().to_string(), filters);
        gone.open(Some(&after_two), None).expect("open at a vanished cursor");
        assert_eq!(read_all(&mut gone), ["three"]);
        // An empty read waits (bounded) and returns nothing.
        assert!(read_all(&mut gone).is_empty());
    }
}
