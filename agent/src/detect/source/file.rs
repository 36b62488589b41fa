//! A log file, tailed: survives rotation by rename (finishes the old file,
//! then reads the new one from its start) and by copytruncate (the file
//! shrinks: read again from its start), resumable by (inode, offset). Lines
//! go through node-problem-detector's filelog translator: `message` regex
//! (first capture group is the message; lines it does not match are
//! skipped), `timestamp` regex and Go `timestampFormat`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use regex::bytes::Regex;

use super::{Line, LogSource};
use crate::detect::stop::Stop;

/// How often a file at its end is looked at again (NPD polls every 500 ms).
const POLL: Duration = Duration::from_millis(200);
use crate::detect::rules::LogPluginConfig;

/// NPD's filelog watcher and translator: `skipList` drops a raw line that
/// contains any of its strings; the `message` and `timestamp` regexes take
/// their **last** submatch (the whole match when they have no group); a line
/// either regex does not match, or whose timestamp does not parse with
/// `timestampFormat`, is skipped. nodekeeper also accepts a filelog monitor
/// without `pluginConfig`: the whole line is the message, seen now.
#[derive(Debug, Clone, Default)]
pub struct Translator {
    timestamp: Option<Regex>,
    message: Option<Regex>,
    format: Option<String>,
    skip: Vec<Vec<u8>>,
}

/// The last submatch of `re` in `raw`, as Go's `FindSubmatch(...)[len-1]`
/// (an unmatched group gives an empty string).
fn last_submatch<'a>(re: &Regex, raw: &'a [u8]) -> Option<&'a [u8]> {
    let caps = re.captures(raw)?;
    Some(caps.get(caps.len() - 1).map_or(&[][..], |m| m.as_bytes()))
}

impl Translator {
    /// From a checked rule file's `pluginConfig` and `skipList`.
    pub fn new(c: &LogPluginConfig, skip_list: &[String]) -> Result<Translator, regex::Error> {
        Ok(Translator {
            timestamp: c.timestamp.as_deref().map(Regex::new).transpose()?,
            message: c.message.as_deref().map(Regex::new).transpose()?,
            format: c.timestamp_format.clone(),
            skip: skip_list
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| s.as_bytes().to_vec())
                .collect(),
        })
    }

    /// The line as the monitors see it, or `None` when NPD would skip it.
    pub fn translate(&self, raw: &[u8], now: SystemTime) -> Option<Line> {
        if self.skip.iter().any(|s| memchr::memmem::find(raw, s).is_some()) {
            return None;
        }
        let time = match &self.timestamp {
            None => now,
            Some(re) => {
                let ts = std::str::from_utf8(last_submatch(re, raw)?).ok()?;
                match self.format.as_deref() {
                    Some(f) => parse_go_time(f, ts, now)?,
                    None => now,
                }
            }
        };
        let message = match &self.message {
            None => raw.to_vec(),
            Some(re) => last_submatch(re, raw)?.to_vec(),
        };
        Some(Line {
            time,
            message,
            streams: super::ALL_STREAMS,
        })
    }
}

/// Parses `s` with a Go time layout (the reference time Mon Jan 2 15:04:05
/// MST 2006). Supports the tokens log files use: Jan, January, _2, 02, 2, 15,
/// 04, 05, 2006, 01, fractional seconds, Z07:00, -0700, MST. Without a year,
/// the current year (UTC) is taken; without a zone, UTC.
pub fn parse_go_time(layout: &str, s: &str, now: SystemTime) -> Option<SystemTime> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (mut year, mut month, mut day, mut hour, mut min, mut sec, mut nanos, mut offset) =
        (None, 1u32, 1u32, 0u32, 0u32, 0u32, 0u32, 0i64);
    let (mut l, mut v) = (layout, s);
    fn num(v: &mut &str, max_digits: usize) -> Option<u32> {
        let n = v.bytes().take(max_digits).take_while(u8::is_ascii_digit).count();
        let (d, rest) = v.split_at(n);
        *v = rest;
        d.parse().ok()
    }
    while !l.is_empty() {
        if let Some(rest) = l.strip_prefix("January") {
            let m = MONTHS.iter().position(|m| v.starts_with(m))?;
            v = v.trim_start_matches(|c: char| c.is_ascii_alphabetic());
            month = m as u32 + 1;
            l = rest;
        } else if let Some(rest) = l.strip_prefix("Jan") {
            month = MONTHS.iter().position(|m| v.starts_with(m))? as u32 + 1;
            v = &v[3..];
            l = rest;
        } else if let Some(rest) = l.strip_prefix("2006") {
            year = Some(num(&mut v, 4)? as i64);
            l = rest;
        } else if let Some(rest) = l.strip_prefix("_2") {
            v = v.trim_start_matches(' ');
            day = num(&mut v, 2)?;
            l = rest;
        } else if let Some(rest) = l.strip_prefix("01") {
            month = num(&mut v, 2)?;
            l = rest;
        } else if let Some(rest) = l.strip_prefix("02") {
            day = num(&mut v, 2)?;
            l = rest;
        } else if let Some(rest) = l.strip_prefix("15") {
            hour = num(&mut v, 2)?;
            l = rest;
        } else if let Some(rest) = l.strip_prefix("04") {
            min = num(&mut v, 2)?;
            l = rest;
        } else if let Some(rest) = l.strip_prefix("05") {
            sec = num(&mut v, 2)?;
            l = rest;
        } else if l.starts_with(".000") || l.starts_with(".999") || l.starts_with(",000") {
            let width = 1 + l[1..].bytes().take_while(|b| *b == b'0' || *b == b'9').count();
            l = &l[width..];
            if let Some(rest) = v.strip_prefix('.').or_else(|| v.strip_prefix(',')) {
                let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
                let frac = &rest[..digits];
                nanos = format!("{frac:0<9}")[..9].parse().ok()?;
                v = &rest[digits..];
            }
        } else if let Some(rest) = l
            .strip_prefix("Z07:00")
            .or_else(|| l.strip_prefix("-07:00"))
            .or_else(|| l.strip_prefix("-0700"))
        {
            if let Some(r) = v.strip_prefix('Z') {
                v = r;
            } else {
                let sign = if v.starts_with('-') { -1 } else { 1 };
                v = v.get(1..)?;
                let h = num(&mut v, 2)? as i64;
                v = v.strip_prefix(':').unwrap_or(v);
                let m = num(&mut v, 2)? as i64;
                offset = sign * (h * 3600 + m * 60);
            }
            l = rest;
        } else if let Some(rest) = l.strip_prefix("MST") {
            v = v.trim_start_matches(|c: char| c.is_ascii_alphabetic());
            l = rest;
        } else if let Some(rest) = l.strip_prefix('2') {
            day = num(&mut v, 2)?;
            l = rest;
        } else {
            let c = l.chars().next()?;
            v = v.strip_prefix(c)?;
            l = &l[c.len_utf8()..];
        }
    }
    let year = year.unwrap_or_else(|| civil_year(now));
    let days = days_from_civil(year, month, day)?;
    let secs = days * 86_400 + i64::from(hour) * 3600 + i64::from(min) * 60 + i64::from(sec) - offset;
    let secs = u64::try_from(secs).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> Option<i64> {
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

fn civil_year(t: SystemTime) -> i64 {
    let days = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Inverse of days_from_civil, year only.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    yoe + era * 400 + i64::from(m <= 2)
}

/// Longest line kept whole; longer ones are handed out in pieces.
const MAX_LINE: usize = 1 << 20;

/// A tailed file.
pub struct FileSource {
    name: String,
    path: PathBuf,
    translator: Translator,
    file: Option<File>,
    ino: u64,
    /// Offset just past the last complete line handed out.
    offset: u64,
    partial: Vec<u8>,
    buf: Vec<u8>,
    not_before: Option<SystemTime>,
}

impl FileSource {
    pub fn new(path: &Path, translator: Translator) -> FileSource {
        FileSource {
            name: format!("file:{}", path.display()),
            path: path.to_path_buf(),
            translator,
            file: None,
            ino: 0,
            offset: 0,
            partial: Vec::new(),
            buf: vec![0u8; 1 << 20],
            not_before: None,
        }
    }

    fn reopen_at(&mut self, offset: u64) -> std::io::Result<()> {
        let mut f = File::open(&self.path)?;
        let meta = f.metadata()?;
        let offset = if offset > meta.len() { 0 } else { offset };
        f.seek(SeekFrom::Start(offset))?;
        self.ino = meta.ino();
        self.offset = offset;
        self.partial.clear();
        self.file = Some(f);
        Ok(())
    }

    fn emit(&mut self, data_len: usize, out: &mut Vec<Line>, now: SystemTime) {
        let buf = std::mem::take(&mut self.buf);
        let mut start = 0;
        for nl in memchr::memchr_iter(b'\n', &buf[..data_len]) {
            self.partial.extend_from_slice(&buf[start..nl]);
            self.offset += self.partial.len() as u64 + 1;
            self.hand_out(out, now);
            start = nl + 1;
        }
        // An unfinished last line waits for its newline (the cursor stays
        // before it); a monstrous one is handed out as it is.
        self.partial.extend_from_slice(&buf[start..data_len]);
        self.buf = buf;
        if self.partial.len() > MAX_LINE {
            self.offset += self.partial.len() as u64;
            self.hand_out(out, now);
        }
    }

    fn hand_out(&mut self, out: &mut Vec<Line>, now: SystemTime) {
        if let Some(line) = self.translator.translate(&self.partial, now)
            && self.not_before.is_none_or(|t| line.time >= t)
        {
            out.push(line);
        }
        self.partial.clear();
    }
}

impl LogSource for FileSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn open(&mut self, cursor: Option<&str>, not_before: Option<SystemTime>) -> std::io::Result<()> {
        let saved = cursor
            .and_then(|c| c.split_once(' '))
            .and_then(|(i, o)| Some((i.parse::<u64>().ok()?, o.parse::<u64>().ok()?)));
        let ino_now = std::fs::metadata(&self.path)?.ino();
        match saved {
            // Same file: continue where we stopped (from 0 if it was truncated).
            Some((ino, off)) if ino == ino_now => self.reopen_at(off)?,
            // Rotated while we were away: the new file from its start.
            Some(_) => self.reopen_at(0)?,
            None if self.file.is_some() => {
                let off = self.offset;
                self.reopen_at(off)?
            }
            None => {
                // First start: read it all, keeping only lines within the
                // lookback (by their timestamps; from now without them).
                self.not_before = not_before;
                if self.translator.timestamp.is_some() {
                    self.reopen_at(0)?;
                } else {
                    let len = std::fs::metadata(&self.path)?.len();
                    self.reopen_at(len)?;
                }
            }
        }
        Ok(())
    }

    fn read(&mut self, out: &mut Vec<Line>, max: usize, wait: Duration, stop: &Stop) -> std::io::Result<u64> {
        let now = SystemTime::now();
        let mut got_data = false;
        while out.len() < max {
            let f = self
                .file
                .as_mut()
                .ok_or_else(|| std::io::Error::other("file is not open"))?;
            let n = f.read(&mut self.buf)?;
            if n == 0 {
                break;
            }
            got_data = true;
            self.emit(n, out, now);
        }
        if got_data {
            return Ok(0);
        }
        // At the end: rotated or truncated?
        match std::fs::metadata(&self.path) {
            Ok(meta) if meta.ino() != self.ino => {
                tracing::info!(path = %self.path.display(), "log file rotated (renamed); reading the new file");
                self.reopen_at(0)?;
                self.not_before = None;
            }
            Ok(meta) if meta.len() < self.offset + self.partial.len() as u64 => {
                tracing::info!(path = %self.path.display(), "log file truncated (copytruncate); reading it from the start");
                self.reopen_at(0)?;
                self.not_before = None;
            }
            Ok(_) => stop.sleep(wait.min(POLL)),
            // Between a rename and the new file's creation.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => stop.sleep(wait.min(POLL)),
            Err(e) => return Err(e),
        }
        Ok(0)
    }

    fn cursor(&self) -> Option<String> {
        self.file.as_ref()?;
        Some(format!("{} {}", self.ino, self.offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(layout: &str, s: &str) -> Option<u64> {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000); // 2026-11
        parse_go_time(layout, s, now).map(|t| t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()))
    }

    #[test]
    fn go_layouts_parse() {
        assert_eq!(
            t("2006-01-02T15:04:05Z07:00", "2026-11-21T10:00:00Z"),
            Some(1_795_255_200)
        );
        assert_eq!(
            t("2006-01-02T15:04:05.999999999Z07:00", "2026-11-21T12:00:00.5+02:00"),
            Some(1_795_255_200)
        );
        assert_eq!(t("Jan _2 15:04:05", "Nov 21 10:00:00"), Some(1_795_255_200));
        assert_eq!(
            t("Jan _2 15:04:05", "Nov  1 10:00:00"),
            Some(1_795_255_200 - 20 * 86_400)
        );
        assert_eq!(t("Jan _2 15:04:05", "garbage"), None);
    }

    #[test]
    fn translator_takes_the_message_group_and_skips_other_lines() {
        let tr = Translator::new(
            &LogPluginConfig {
                timestamp: Some("^.{15}".into()),
                message: Some("kernel: \\[.*\\] (.*)".into()),
                timestamp_format: Some("Jan _2 15:04:05".into()),
                ..Default::default()
            },
            &["sshd".to_string()],
        )
        .expect("translator");
        let now = SystemTime::now();
        let l = tr
            .translate(b"Nov 21 10:00:00 host kernel: [  12.5] EXT4-fs error (sda1)", now)
            .expect("line");
        assert_eq!(l.message, b"EXT4-fs error (sda1)");
        assert!(tr.translate(b"Nov 21 10:00:00 host sshd[1]: accepted", now).is_none());
        // skipList looks at the raw line, timestamp included (NPD's filelog).
        let tr2 = Translator::new(
            &LogPluginConfig {
                timestamp: Some("^(host )?(.{15})".into()),
                message: Some("kernel: (\\[.*\\] )?(.*)".into()),
                timestamp_format: Some("Jan _2 15:04:05".into()),
                ..Default::default()
            },
            &["Nov 22".to_string()],
        )
        .expect("translator");
        assert!(
            tr2.translate(b"Nov 22 10:00:00 host kernel: [1.0] EXT4-fs error", now)
                .is_none()
        );
        // The last submatch is taken, for the timestamp and the message alike.
        let l = tr2
            .translate(b"Nov 21 10:00:00 host kernel: [1.0] EXT4-fs error", now)
            .expect("line");
        assert_eq!(l.message, b"EXT4-fs error");
        // A timestamp that does not parse: NPD skips the line.
        assert!(
            tr2.translate(b"Xyz 99 10:00:00 host kernel: EXT4-fs error", now)
                .is_none()
        );
        // No group: the whole match is the message.
        let whole = Translator::new(
            &LogPluginConfig {
                message: Some("EXT4-fs .*".into()),
                ..Default::default()
            },
            &[],
        )
        .expect("translator");
        assert_eq!(
            whole.translate(b"x EXT4-fs error", now).expect("line").message,
            b"EXT4-fs error"
        );
    }
}
