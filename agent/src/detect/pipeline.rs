//! Runs the log monitors of one log source: a thread reads the source, feeds
//! every line to each monitor, and hands problems to the agent (conditions
//! stored and reported at once, events aggregated), storing where it stopped
//! so a restart neither replays nor misses lines. If the source fails it
//! says so and restarts itself with backoff.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nodekeeper_proto::v1::Event;

use super::aggregate::Aggregator;
use super::monitor::{Monitor, Problem};
use super::source::{Line, LogSource};
use super::stop::Stop;
use crate::metrics::SourceLabel;
use crate::runtime::Agent;

/// Identical events within this window are reported once with a count.
const AGGREGATION_WINDOW: Duration = Duration::from_secs(10);
/// Lines read per batch (a flood is processed in batches this big).
const BATCH: usize = 4096;
/// A source's position is stored with the findings it produced; without
/// findings, at most this often (and at shutdown): a flood of ordinary lines
/// costs next to no disk I/O, and a crash replays at most this much of
/// lines that raised nothing.
const POSITION_INTERVAL: Duration = Duration::from_secs(10);
/// Repeats of a True condition are reported at most this often.
const REPEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait for a line when nothing is due sooner.
const IDLE_WAIT: Duration = Duration::from_secs(30);

/// A log source and its monitors.
pub struct Pipeline {
    pub source: Box<dyn LogSource>,
    pub monitors: Vec<Monitor>,
    /// For each monitor, the source streams it reads (a line goes to the
    /// monitors whose mask shares a bit with the line's streams).
    pub streams: Vec<u64>,
}

impl Pipeline {
    /// Starts the reader thread; it stops when `stop` is set.
    pub fn spawn(self, agent: Arc<Agent>, stop: Arc<Stop>) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("detect-kmsg".into())
            .spawn(move || self.run(&agent, &stop))
    }

    fn run(mut self, agent: &Agent, stop: &Stop) {
        let name = self.source.name().to_string();
        let key = format!("cursor:{name}");
        let saved = agent.load_conditions().unwrap_or_default();
        for m in self.monitors.iter_mut() {
            m.restore(&saved);
        }
        let mut cursor = agent
            .store
            .as_ref()
            .and_then(|s| s.get(&key).ok().flatten())
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let mut problems = Vec::new();
        let mut not_before = None;
        match &cursor {
            Some(c) if self.source.earlier_boot(c) => {
                // A new boot: the kernel that had the problems is gone.
                let now = SystemTime::now();
                for m in self.monitors.iter_mut() {
                    m.new_boot(now, &mut problems);
                }
                cursor = None;
            }
            Some(_) => {}
            None => {
                // First start: honour the rule files' lookback (none: from now).
                let lookback = self
                    .monitors
                    .iter()
                    .filter_map(|m| m.config.lookback_duration())
                    .max()
                    .unwrap_or_default();
                not_before = SystemTime::now().checked_sub(lookback);
            }
        }
        let mut agg = Aggregator::new(AGGREGATION_WINDOW);
        let mut out = Findings::default();
        // Every reason of the loaded rules is exported from the start, at 0
        // (as NPD does), so an alert on increase() sees the first problem.
        for m in &self.monitors {
            for r in &m.config.rules {
                agent.metrics.problem_counter(&r.reason, 0);
                if r.is_permanent() {
                    agent.metrics.set_problem_gauge(&nodekeeper_proto::v1::Condition {
                        r#type: r.condition.clone(),
                        reason: r.reason.clone(),
                        status: "False".into(),
                        ..Default::default()
                    });
                }
            }
            // A condition restored True keeps its gauge at 1.
            for c in m.conditions().iter().filter(|c| c.status == "True") {
                agent.metrics.set_problem_gauge(c);
            }
        }
        out.take(agent, &mut problems, &mut agg);
        self.commit(agent, &mut out, None);
        let label = SourceLabel { source: name.clone() };
        let mut backoff = crate::retry::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let mut failed = false;
        let mut lines: Vec<Line> = Vec::with_capacity(BATCH);
        let mut stored = cursor.clone();
        let mut stored_at = SystemTime::now();
        while !stop.is_set() {
            if let Err(e) = self.source.open(cursor.as_deref(), not_before) {
                if !failed {
                    tracing::error!(source = %name, error = %e, "cannot open the log source; retrying");
                    let msg = format!("cannot open {name}: {e}; retrying");
                    let _ = agent.record_event(super::event(&name, "LogSourceFailed", "Warning", msg));
                    failed = true;
                }
                stop.sleep(backoff.next_delay());
                continue;
            }
            if failed {
                let msg = format!("reading {name} again");
                let _ = agent.record_event(super::event(&name, "LogSourceRecovered", "Info", msg));
                failed = false;
            }
            backoff.reset();
            let mut last_flush = SystemTime::now();
            while !stop.is_set() {
                lines.clear();
                // Wait for lines as long as nothing else is due: an idle agent
                // does not wake on a short timer.
                let wait = if agg.holds_unreported() || !out.repeats.is_empty() || stored != cursor {
                    Duration::from_millis(500)
                } else if self.monitors.iter().any(Monitor::clears_later) {
                    Duration::from_secs(1)
                } else {
                    IDLE_WAIT
                };
                let lost = match self.source.read(&mut lines, BATCH, wait, stop) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(source = %name, error = %e, "reading the log source failed; reopening");
                        let msg = format!("reading {name}: {e}; reopening");
                        let _ = agent.record_event(super::event(&name, "LogSourceFailed", "Warning", msg));
                        failed = true;
                        break;
                    }
                };
                if lost > 0 {
                    agent.metrics.log_lost.get_or_create(&label).inc_by(lost);
                    let msg = format!("{lost} log lines were overwritten before they could be read");
                    agg.add(
                        super::event(&name, "LogOverrun", "Warning", msg),
                        SystemTime::now(),
                        &mut out.events,
                    );
                }
                agent.metrics.log_lines.get_or_create(&label).inc_by(lines.len() as u64);
                for l in &lines {
                    for (m, mask) in self.monitors.iter_mut().zip(&self.streams) {
                        if l.streams & mask != 0 {
                            m.process(&l.message, l.time, &mut problems);
                        }
                    }
                }
                let now = SystemTime::now();
                let flush = now.duration_since(last_flush).unwrap_or_default() >= REPEAT_INTERVAL;
                if flush {
                    for m in self.monitors.iter_mut() {
                        m.tick(now, &mut problems);
                    }
                    agg.flush(now, false, &mut out.events);
                    last_flush = now;
                }
                out.take(agent, &mut problems, &mut agg);
                if flush {
                    out.release_repeats();
                }
                let c = self.source.cursor();
                if c.is_some() && c != cursor {
                    cursor = c;
                    not_before = None;
                }
                // The position goes with the findings it produced, unless
                // counted repeats are still held back (then it waits for them).
                let due = now.duration_since(stored_at).unwrap_or_default() >= POSITION_INTERVAL;
                let position = (cursor != stored && !agg.holds_unreported() && (out.any() || due))
                    .then(|| cursor.clone())
                    .flatten();
                if out.any() || position.is_some() {
                    self.commit(agent, &mut out, position.as_deref().map(|c| (key.as_str(), c)));
                    if position.is_some() {
                        stored = position;
                        stored_at = now;
                    }
                }
            }
        }
        agg.flush(SystemTime::now(), true, &mut out.events);
        out.take(agent, &mut problems, &mut agg);
        out.release_repeats();
        let position = (cursor != stored).then(|| cursor.clone()).flatten();
        self.commit(agent, &mut out, position.as_deref().map(|c| (key.as_str(), c)));
    }

    /// Stores and reports what was found, with the source position.
    fn commit(&self, agent: &Agent, out: &mut Findings, position: Option<(&str, &str)>) {
        let conditions = std::mem::take(&mut out.conditions);
        let events = std::mem::take(&mut out.events);
        if let Err(e) = agent.record_findings(conditions, events, position.map(|(k, c)| (k, c.as_bytes().to_vec()))) {
            tracing::error!(source = self.source.name(), error = %e, "cannot store findings or the log position");
        }
    }
}

/// What a batch of lines produced, waiting to be committed.
#[derive(Default)]
struct Findings {
    conditions: Vec<nodekeeper_proto::v1::Condition>,
    events: Vec<Event>,
    /// Repeats of True conditions, the latest per condition, held until the
    /// next [`REPEAT_INTERVAL`].
    repeats: Vec<nodekeeper_proto::v1::Condition>,
}

/// Puts `c` in `list`, replacing the entry of the same condition.
fn upsert(list: &mut Vec<nodekeeper_proto::v1::Condition>, c: nodekeeper_proto::v1::Condition) {
    list.retain(|r| !(r.r#type == c.r#type && r.source == c.source));
    list.push(c);
}

impl Findings {
    fn any(&self) -> bool {
        !self.conditions.is_empty() || !self.events.is_empty()
    }

    /// Sorts the monitors' problems: condition changes at once, events
    /// through the aggregator (each problem counted in `problem_counter`),
    /// repeats held back.
    fn take(&mut self, agent: &Agent, problems: &mut Vec<Problem>, agg: &mut Aggregator) {
        let now = SystemTime::now();
        for p in problems.drain(..) {
            match p {
                Problem::Condition(c) => {
                    self.repeats.retain(|r| !(r.r#type == c.r#type && r.source == c.source));
                    upsert(&mut self.conditions, c);
                }
                Problem::Repeat(c) => upsert(&mut self.repeats, c),
                Problem::Event(e) => {
                    agent.metrics.problem_counter(&e.reason, 1);
                    agg.add(e, now, &mut self.events);
                }
            }
        }
    }

    /// Held repeats become condition updates to commit.
    fn release_repeats(&mut self) {
        for c in std::mem::take(&mut self.repeats) {
            upsert(&mut self.conditions, c);
        }
    }
}
