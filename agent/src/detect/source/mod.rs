//! Log sources the log monitors read, each a small component behind one
//! trait: the kernel log (/dev/kmsg), the systemd journal, and files (tail
//! with rotation).

pub mod file;
pub mod journald;
pub mod kmsg;
pub mod sd_journal;

use std::time::{Duration, SystemTime};

use super::stop::Stop;

/// One log line.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub time: SystemTime,
    pub message: Vec<u8>,
    /// Which of the source's streams the line belongs to (bit i: stream i);
    /// a journal reader serves several filters. [`ALL_STREAMS`] elsewhere.
    pub streams: u64,
}

/// A line every monitor of its source sees.
pub const ALL_STREAMS: u64 = u64::MAX;

/// The kernel log as NPD's kmsg watcher hands it on: an empty message is
/// dropped, any other is trimmed (so a message of spaces becomes "").
pub fn kmsg_message(raw: &[u8]) -> Option<&[u8]> {
    if raw.is_empty() { None } else { Some(raw.trim_ascii()) }
}

/// A journal MESSAGE as NPD's journald watcher hands it on: trimmed.
pub fn journal_message(raw: &[u8]) -> &[u8] {
    raw.trim_ascii()
}

/// A log source. Reading blocks the calling thread (each source runs on its
/// own thread), and a source resumes from the cursor it hands out, so a
/// restart neither replays nor misses lines.
pub trait LogSource: Send {
    /// Stable name: metrics label, event source, stored-cursor key.
    fn name(&self) -> &str;
    /// Opens or reopens the source, resuming after `cursor` (from
    /// [`LogSource::cursor`]); without one, skips lines older than `not_before`.
    fn open(&mut self, cursor: Option<&str>, not_before: Option<SystemTime>) -> std::io::Result<()>;
    /// Reads the lines available now into `out` (at most `max`), waiting up to
    /// `wait` when there are none (less when `stop` is set). Returns how many
    /// lines were lost before they could be read (a ring-buffer overrun).
    fn read(&mut self, out: &mut Vec<Line>, max: usize, wait: Duration, stop: &Stop) -> std::io::Result<u64>;
    /// Where to resume after the lines returned so far.
    fn cursor(&self) -> Option<String>;
    /// Whether a stored cursor belongs to an earlier boot (then conditions
    /// this source sets are reset).
    fn earlier_boot(&self, _cursor: &str) -> bool {
        false
    }
}
