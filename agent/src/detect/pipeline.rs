//! Runs the log monitors of one log source: a thread reads the source, feeds
//! every line to each monitor, and hands problems to the agent (conditions
//! stored and reported at once, events aggregated), storing where it stopped
//! so a restart neither replays nor misses lines. If the source fails it
//! says so and restarts itself with backoff.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use nodekeeper_proto::time::rfc3339;
use nodekeeper_proto::v1::Event;

use super::aggregate::Aggregator;
use super::monitor::{Monitor, Problem};
use super::source::{Line, LogSource};
use crate::metrics::SourceLabel;
use crate::runtime::Agent;

/// Identical events within this window are reported once with a count.
const AGGREGATION_WINDOW: Duration = Duration::from_secs(10);
/// Lines read per batch (a flood is processed in batches this big).
const BATCH: usize = 4096;

/// A log source and its monitors.
pub struct Pipeline {
    pub source: Box<dyn LogSource>,
    pub monitors: Vec<Monitor>,
}

fn source_event(source: &str, reason: &str, message: String, severity: &str) -> Event {
    Event {
        time: rfc3339(SystemTime::now()),
        severity: severity.into(),
        reason: reason.into(),
        message,
        source: source.into(),
        count: 1,
        first_time: String::new(),
    }
}

impl Pipeline {
    /// Starts the reader thread; it stops when `stop` is set.
    pub fn spawn(self, agent: Arc<Agent>, stop: Arc<AtomicBool>) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("detect-kmsg".into())
            .spawn(move || self.run(&agent, &stop))
    }

    fn run(mut self, agent: &Agent, stop: &AtomicBool) {
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
        let mut events = Vec::new();
        self.deliver(agent, &mut problems, &mut agg, &mut events);
        let label = SourceLabel { source: name.clone() };
        let mut backoff = crate::retry::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let mut failed = false;
        let mut lines: Vec<Line> = Vec::with_capacity(BATCH);
        while !stop.load(Ordering::Relaxed) {
            if let Err(e) = self.source.open(cursor.as_deref(), not_before) {
                if !failed {
                    tracing::error!(source = %name, error = %e, "cannot open the log source; retrying");
                    let msg = format!("cannot open {name}: {e}; retrying");
                    let _ = agent.record_event(source_event(&name, "LogSourceFailed", msg, "Warning"));
                    failed = true;
                }
                backoff.sleep();
                continue;
            }
            if failed {
                let msg = format!("reading {name} again");
                let _ = agent.record_event(source_event(&name, "LogSourceRecovered", msg, "Info"));
                failed = false;
            }
            backoff.reset();
            let mut last_flush = SystemTime::now();
            while !stop.load(Ordering::Relaxed) {
                lines.clear();
                let lost = match self.source.read(&mut lines, BATCH, Duration::from_millis(500)) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(source = %name, error = %e, "reading the log source failed; reopening");
                        let msg = format!("reading {name}: {e}; reopening");
                        let _ = agent.record_event(source_event(&name, "LogSourceFailed", msg, "Warning"));
                        failed = true;
                        break;
                    }
                };
                if lost > 0 {
                    agent.metrics.log_lost.get_or_create(&label).inc_by(lost);
                    let msg = format!("{lost} log lines were overwritten before they could be read");
                    agg.add(
                        source_event(&name, "LogOverrun", msg, "Warning"),
                        SystemTime::now(),
                        &mut events,
                    );
                }
                agent.metrics.log_lines.get_or_create(&label).inc_by(lines.len() as u64);
                for l in &lines {
                    for m in self.monitors.iter_mut() {
                        m.process(&l.message, l.time, &mut problems);
                    }
                }
                let now = SystemTime::now();
                if now.duration_since(last_flush).unwrap_or_default() >= Duration::from_secs(1) {
                    for m in self.monitors.iter_mut() {
                        m.tick(now, &mut problems);
                    }
                    agg.flush(now, false, &mut events);
                    last_flush = now;
                }
                self.deliver(agent, &mut problems, &mut agg, &mut events);
                let c = self.source.cursor();
                if c.is_some() && c != cursor {
                    cursor = c;
                    not_before = None;
                    if let (Some(s), Some(c)) = (&agent.store, &cursor)
                        && let Err(e) = s.put_all(&[(key.as_str(), c.clone().into_bytes())])
                    {
                        tracing::warn!(source = %name, error = %e, "cannot store the log position");
                    }
                }
            }
        }
        agg.flush(SystemTime::now(), true, &mut events);
        self.deliver(agent, &mut problems, &mut agg, &mut events);
    }

    fn deliver(&self, agent: &Agent, problems: &mut Vec<Problem>, agg: &mut Aggregator, events: &mut Vec<Event>) {
        let now = SystemTime::now();
        for p in problems.drain(..) {
            match p {
                Problem::Condition(c) => {
                    if let Err(e) = agent.set_condition(c) {
                        tracing::error!(error = %e, "cannot store a condition");
                    }
                }
                Problem::Event(e) => agg.add(e, now, events),
            }
        }
        for e in events.drain(..) {
            if let Err(err) = agent.record_event(e) {
                tracing::error!(error = %err, "cannot store an event");
            }
        }
    }
}
