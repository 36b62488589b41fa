//! The kernel log: records read from /dev/kmsg (`prio,seq,usec,flags;message`
//! plus continuation lines), resumable by (boot id, sequence number) so a
//! restarted agent neither replays nor misses records. A ring-buffer overrun
//! (EPIPE) is counted and reported, never a silent stop.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::detect::stop::Stop;

/// One kernel log record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub seq: u64,
    pub time: SystemTime,
    pub message: Vec<u8>,
}

/// What one read produced besides records.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ReadInfo {
    /// Records lost to ring-buffer overruns in this read (EPIPE or a gap in
    /// sequence numbers).
    pub lost: u64,
}

/// Parses one record as /dev/kmsg returns it.
pub fn parse_record(raw: &[u8], boot_time: SystemTime) -> Option<Record> {
    let semi = memchr::memchr(b';', raw)?;
    let mut fields = raw[..semi].split(|&b| b == b',');
    let _prio = fields.next()?;
    let seq = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
    let usec: u64 = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
    let rest = &raw[semi + 1..];
    let end = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
    Some(Record {
        seq,
        time: boot_time + Duration::from_micros(usec),
        message: rest[..end].to_vec(),
    })
}

/// Boot time on the wall clock: now minus the monotonic clock, which is what
/// kmsg timestamps count (to the microsecond; /proc/stat's `btime` is whole
/// seconds, too coarse to tell "before start" from "just after").
pub fn boot_time() -> SystemTime {
    let now = SystemTime::now();
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => {
            let up = Duration::new(ts.tv_sec().max(0) as u64, ts.tv_nsec().max(0) as u32);
            now.checked_sub(up).unwrap_or(SystemTime::UNIX_EPOCH)
        }
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

/// An open /dev/kmsg.
pub struct Kmsg {
    file: File,
    boot_time: SystemTime,
    /// Skip records at or below this sequence number (already processed).
    after: Option<u64>,
    /// Skip records older than this (first start's lookback).
    not_before: Option<SystemTime>,
    last_seq: Option<u64>,
    buf: Vec<u8>,
}

impl Kmsg {
    /// Opens the device at the start of its ring buffer. `after` resumes past
    /// a sequence number of this boot; `not_before` applies a lookback.
    pub fn open(path: &Path, after: Option<u64>, not_before: Option<SystemTime>) -> std::io::Result<Kmsg> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(path)?;
        Ok(Kmsg {
            file,
            boot_time: boot_time(),
            after,
            not_before,
            last_seq: after,
            buf: vec![0u8; 16384],
        })
    }

    /// Reads every record available now into `out` (up to `max`); waits up
    /// to `wait` for one when none is. Returns overrun information.
    pub fn read(
        &mut self,
        out: &mut Vec<Record>,
        max: usize,
        wait: Duration,
        stop: &Stop,
    ) -> std::io::Result<ReadInfo> {
        let mut info = ReadInfo::default();
        let mut waited = false;
        while out.len() < max {
            match self.file.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => {
                    let Some(r) = parse_record(&self.buf[..n], self.boot_time) else {
                        continue;
                    };
                    if self.after.is_some_and(|a| r.seq <= a) {
                        continue;
                    }
                    // A gap after what we had read: records overwritten meanwhile.
                    if let Some(last) = self.last_seq
                        && r.seq > last + 1
                    {
                        info.lost += r.seq - last - 1;
                    }
                    self.last_seq = Some(r.seq);
                    if self.not_before.is_some_and(|t| r.time < t) {
                        continue;
                    }
                    out.push(r);
                }
                Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => {
                    // The record we were about to read was overwritten; the next
                    // read continues with the oldest one still there.
                    info.lost += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if !out.is_empty() || waited {
                        break;
                    }
                    waited = true;
                    if !stop.wait_readable(self.file.as_fd(), wait) {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(info)
    }

    /// The last sequence number read.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }
}

/// /dev/kmsg as a [`super::LogSource`]; the cursor is "<boot id> <sequence>".
pub struct KmsgSource {
    path: std::path::PathBuf,
    boot_id: String,
    open: Option<Kmsg>,
    records: Vec<Record>,
}

impl KmsgSource {
    pub fn new(path: &Path, boot_id: &str) -> KmsgSource {
        KmsgSource {
            path: path.to_path_buf(),
            boot_id: boot_id.to_string(),
            open: None,
            records: Vec::new(),
        }
    }
}

impl super::LogSource for KmsgSource {
    fn name(&self) -> &str {
        "kmsg"
    }

    fn open(&mut self, cursor: Option<&str>, not_before: Option<SystemTime>) -> std::io::Result<()> {
        let after = cursor
            .and_then(|c| c.split_once(' '))
            .filter(|(b, _)| *b == self.boot_id)
            .and_then(|(_, s)| s.parse::<u64>().ok());
        let not_before = if cursor.is_some() { None } else { not_before };
        let after = after.or_else(|| self.open.as_ref().and_then(Kmsg::last_seq));
        self.open = Some(Kmsg::open(&self.path, after, not_before)?);
        Ok(())
    }

    fn read(&mut self, out: &mut Vec<super::Line>, max: usize, wait: Duration, stop: &Stop) -> std::io::Result<u64> {
        let k = self
            .open
            .as_mut()
            .ok_or_else(|| std::io::Error::other("kmsg is not open"))?;
        self.records.clear();
        let info = k.read(&mut self.records, max, wait, stop)?;
        out.extend(self.records.drain(..).filter_map(|r| {
            Some(super::Line {
                time: r.time,
                message: super::kmsg_message(&r.message)?.to_vec(),
                streams: super::ALL_STREAMS,
            })
        }));
        Ok(info.lost)
    }

    fn cursor(&self) -> Option<String> {
        let seq = self.open.as_ref()?.last_seq()?;
        Some(format!("{} {seq}", self.boot_id))
    }

    fn earlier_boot(&self, cursor: &str) -> bool {
        cursor.split_once(' ').is_some_and(|(b, _)| b != self.boot_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_parse_with_continuation_lines() {
        let bt = SystemTime::UNIX_EPOCH;
        let r = parse_record(
            b"6,1234,5000000,-;usb 1-1: new device\n SUBSYSTEM=usb\n DEVICE=c189:1\n",
            bt,
        )
        .expect("record");
        assert_eq!(r.seq, 1234);
        assert_eq!(r.time, bt + Duration::from_secs(5));
        assert_eq!(r.message, b"usb 1-1: new device");
        assert!(parse_record(b"garbage", bt).is_none());
        assert!(parse_record(b"6,x,1,-;m", bt).is_none());
    }

    #[test]
    fn the_real_device_reads_a_line_written_to_it() {
        // The end-to-end overrun test floods the ring buffer; not meanwhile.
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/tmp/nodekeeper-kmsg-test.lock")
            .expect("lock file");
        #[allow(deprecated)]
        nix::fcntl::flock(
            std::os::fd::AsRawFd::as_raw_fd(&lock),
            nix::fcntl::FlockArg::LockExclusive,
        )
        .expect("flock");
        let tag = format!("nk-kmsg-unit-{}", std::process::id());
        let Ok(mut k) = Kmsg::open(Path::new("/dev/kmsg"), None, None) else {
            eprintln!("skipped: /dev/kmsg cannot be opened here (not root?)");
            return;
        };
        std::fs::write("/dev/kmsg", format!("<3>{tag}: hello\n")).expect("write /dev/kmsg (root)");
        let mut found = false;
        for _ in 0..50 {
            let mut out = Vec::new();
            let stop = Stop::new().expect("eventfd");
            k.read(&mut out, 100_000, Duration::from_millis(100), &stop)
                .expect("read");
            if out.iter().any(|r| String::from_utf8_lossy(&r.message).contains(&tag)) {
                found = true;
                break;
            }
        }
        assert!(found, "line written to /dev/kmsg came back");
    }
}
