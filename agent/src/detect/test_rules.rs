//! `nodekeeper-agent test-rules`: runs the agent's matcher over a log file
//! and prints what each matching line would raise, so a rule file can be
//! tried before it ships. Each line goes through its monitor's watcher as
//! NPD's would: kmsg messages trimmed (empty ones dropped), journal messages
//! trimmed, and a filelog monitor's skipList and translator (`pluginConfig`
//! timestamp and message regexes) applied to the raw line.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use anyhow::Context;
use serde_json::json;

use super::monitor::{Monitor, Problem};
use super::rules::{LogMonitor, Plugin};
use super::source::file::Translator;
use super::source::{journal_message, kmsg_message};

/// Options of `test-rules`.
#[derive(Debug, Clone, clap::Args)]
pub struct TestRulesArgs {
    /// Rule files (NPD JSON or YAML).
    #[arg(long, num_args = 1.., required = true)]
    pub rules: Vec<PathBuf>,
    /// Log file, one message per line.
    #[arg(long)]
    pub input: PathBuf,
    /// table or json.
    #[arg(short = 'o', long, default_value = "table")]
    pub output: String,
}

struct Found {
    line: u64,
    kind: &'static str,
    reason: String,
    condition: String,
    message: String,
}

/// A monitor with its watcher's handling of a raw line, so `test-rules`
/// sees what the running agent's source would hand on.
struct Tried {
    monitor: Monitor,
    watcher: Watcher,
}

/// How NPD's watcher of each plugin hands a raw line on.
enum Watcher {
    /// Empty messages dropped, the rest trimmed.
    Kmsg,
    /// MESSAGE trimmed.
    Journald,
    /// skipList on the raw line, then the translator.
    Filelog(Translator),
}

impl Watcher {
    fn of(cfg: &LogMonitor) -> anyhow::Result<Watcher> {
        Ok(match cfg.plugin_kind() {
            Some(Plugin::Filelog) => Watcher::Filelog(Translator::new(
                &cfg.plugin_config.clone().unwrap_or_default(),
                &cfg.skip_list,
            )?),
            Some(Plugin::Journald) => Watcher::Journald,
            _ => Watcher::Kmsg,
        })
    }
}

fn feed(
    tried: &mut [Tried],
    line: &[u8],
    n: u64,
    now: SystemTime,
    problems: &mut Vec<Problem>,
    found: &mut Vec<Found>,
) {
    for t in tried.iter_mut() {
        match &t.watcher {
            Watcher::Kmsg => match kmsg_message(line) {
                Some(m) => t.monitor.process(m, now, problems),
                None => continue,
            },
            Watcher::Journald => t.monitor.process(journal_message(line), now, problems),
            Watcher::Filelog(tr) => match tr.translate(line, now) {
                Some(l) => t.monitor.process(&l.message, l.time, problems),
                None => continue,
            },
        }
    }
    for p in problems.drain(..) {
        found.push(match p {
            Problem::Event(e) => Found {
                line: n,
                kind: "temporary",
                reason: e.reason,
                condition: String::new(),
                message: e.message,
            },
            Problem::Condition(c) => Found {
                line: n,
                kind: "permanent",
                reason: c.reason,
                condition: c.r#type,
                message: c.message,
            },
            // NPD raises nothing for a repeat; test-rules prints what NPD would.
            Problem::Repeat(_) => continue,
        });
    }
}

/// Runs the command; prints matches and counts on stdout, speed on stderr.
pub fn run(args: TestRulesArgs) -> anyhow::Result<()> {
    if !matches!(args.output.as_str(), "table" | "json") {
        anyhow::bail!("-o {}: one of table, json", args.output);
    }
    let mut monitors = Vec::new();
    for path in &args.rules {
        let cfg = super::rules::load(path)?;
        let watcher = Watcher::of(&cfg).with_context(|| format!("{}: pluginConfig", path.display()))?;
        monitors.push(Tried {
            monitor: Monitor::new(cfg).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
            watcher,
        });
    }
    let mut file = std::fs::File::open(&args.input).with_context(|| format!("opening {}", args.input.display()))?;
    let mut problems = Vec::new();
    let mut found = Vec::new();
    let mut lines = 0u64;
    let now = SystemTime::now();
    let started = Instant::now();
    // Large reads split with SIMD memchr: reading must not be the bottleneck.
    let mut buf = vec![0u8; 4 << 20];
    let mut filled = 0usize;
    let mut eof = false;
    while !eof || filled > 0 {
        if !eof && filled < buf.len() {
            let n = file
                .read(&mut buf[filled..])
                .with_context(|| format!("reading {}", args.input.display()))?;
            if n == 0 {
                eof = true;
            }
            filled += n;
        }
        let mut start = 0;
        for nl in memchr::memchr_iter(b'\n', &buf[..filled]) {
            lines += 1;
            feed(&mut monitors, &buf[start..nl], lines, now, &mut problems, &mut found);
            start = nl + 1;
        }
        if eof && start < filled {
            // A last line without a newline.
            lines += 1;
            feed(
                &mut monitors,
                &buf[start..filled],
                lines,
                now,
                &mut problems,
                &mut found,
            );
            start = filled;
        }
        buf.copy_within(start..filled, 0);
        filled -= start;
        if filled == buf.len() {
            // A line longer than the buffer: take it as it is.
            lines += 1;
            feed(&mut monitors, &buf[..filled], lines, now, &mut problems, &mut found);
            filled = 0;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    // A permanent match also yields its condition-change event: count it once.
    let shown: Vec<&Found> = found
        .iter()
        .filter(|f| {
            f.kind == "permanent"
                || !found
                    .iter()
                    .any(|g| g.kind == "permanent" && g.line == f.line && g.reason == f.reason)
        })
        .collect();
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    for f in &shown {
        *counts.entry(f.reason.as_str()).or_default() += 1;
    }
    let rate = if secs > 0.0 { lines as f64 / secs } else { 0.0 };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.output == "json" {
        let matches: Vec<_> = shown
            .iter()
            .map(|f| json!({"line": f.line, "type": f.kind, "reason": f.reason, "condition": f.condition, "message": f.message}))
            .collect();
        let doc =
            json!({"lines": lines, "seconds": secs, "linesPerSecond": rate, "matches": matches, "counts": counts});
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
    } else {
        writeln!(
            out,
            "{:<8}  {:<9}  {:<28}  {:<24}  MESSAGE",
            "LINE", "TYPE", "REASON", "CONDITION"
        )?;
        for f in &shown {
            let msg = f.message.replace('\n', "\\n");
            writeln!(
                out,
                "{:<8}  {:<9}  {:<28}  {:<24}  {msg}",
                f.line, f.kind, f.reason, f.condition
            )?;
        }
        writeln!(out)?;
        writeln!(out, "{:<28}  COUNT", "REASON")?;
        for (r, n) in &counts {
            writeln!(out, "{r:<28}  {n}")?;
        }
    }
    eprintln!("{lines} lines in {secs:.3} s ({rate:.0} lines/s)");
    Ok(())
}
