//! Log sources the log monitors read, each a small component behind one
//! trait: the kernel log (/dev/kmsg), the systemd journal, and files (tail
//! with rotation).

pub mod file;
pub mod journald;
pub mod kmsg;

use std::time::{Duration, SystemTime};

/// One log line.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub time: SystemTime,
    pub message: Vec<u8>,
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
    /// `wait` when there are none. Returns how many lines were lost before
    /// they could be read (a ring-buffer overrun).
    fn read(&mut self, out: &mut Vec<Line>, max: usize, wait: Duration) -> std::io::Result<u64>;
    /// Where to resume after the lines returned so far.
    fn cursor(&self) -> Option<String>;
    /// Whether a stored cursor belongs to an earlier boot (then conditions
    /// this source sets are reset).
    fn earlier_boot(&self, _cursor: &str) -> bool {
        false
    }
}
