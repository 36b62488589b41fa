//! Runs the log monitors of the kernel log: a thread reads /dev/kmsg, feeds
//! every record to each monitor, and hands problems to the agent (conditions
//! stored and reported at once, events aggregated), storing where it stopped
//! so a restart neither replays nor misses records. If the source fails it
//! says so and restarts itself with backoff.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use nodekeeper_proto::time::rfc3339;
use nodekeeper_proto::v1::Event;

use super::aggregate::Aggregator;
use super::monitor::{Monitor, Problem};
use super::source::kmsg::Kmsg;
use crate::metrics::SourceLabel;
use crate::runtime::Agent;
use crate::store::keys;

/// Identical events within this window are reported once with a count.
const AGGREGATION_WINDOW: Duration = Duration::from_secs(10);
/// Records read per batch (a flood is processed in batches this big).
const BATCH: usize = 4096;

/// The kmsg source and its monitors.
pub struct KmsgPipeline {
    pub path: PathBuf,
    pub monitors: Vec<Monitor>,
}

fn source_event(reason: &str, message: String, severity: &str) -> Event {
    Event {
        time: rfc3339(SystemTime::now()),
        severity: severity.into(),
        reason: reason.into(),
        message,
        source: "kmsg".into(),
        count: 1,
        first_time: String::new(),
    }
}

impl KmsgPipeline {
    /// Starts the reader thread; it stops when `stop` is set.
    pub fn spawn(self, agent: Arc<Agent>, stop: Arc<AtomicBool>) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("detect-kmsg".into())
            .spawn(move || self.run(&agent, &stop))
    }

    fn run(mut self, agent: &Agent, stop: &AtomicBool) {
        let boot_id = agent.facts.boot_id.clone();
        let saved = agent.load_conditions().unwrap_or_default();
        for m in self.monitors.iter_mut() {
            m.restore(&saved);
        }
        let cursor = agent
            .store
            .as_ref()
            .and_then(|s| s.get(keys::KMSG_CURSOR).ok().flatten())
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let mut problems = Vec::new();
        let (mut after, mut not_before) = (None, None);
        match cursor.as_deref().and_then(|c| c.split_once(' ')) {
            Some((b, seq)) if b == boot_id => after = seq.parse::<u64>().ok(),
            Some(_) => {
                // A new boot: the kernel that had the problems is gone.
                let now = SystemTime::now();
                for m in self.monitors.iter_mut() {
                    m.new_boot(now, &mut problems);
                }
            }
            None => {
                // First start: honour the rule files' lookback (none: from now).
                let lookback = self
                    .monitors
                    .iter()
                    .filter_map(|m| m.config.lookback)
                    .max()
                    .unwrap_or_default();
                not_before = SystemTime::now().checked_sub(lookback);
            }
        }
        let mut agg = Aggregator::new(AGGREGATION_WINDOW);
        let mut events = Vec::new();
        self.deliver(agent, &mut problems, &mut agg, &mut events);
        let label = SourceLabel { source: "kmsg".into() };
        let mut backoff = Duration::from_secs(1);
        let mut failed = false;
        while !stop.load(Ordering::Relaxed) {
            let mut kmsg = match Kmsg::open(&self.path, after, not_before) {
                Ok(k) => k,
                Err(e) => {
                    if !failed {
                        tracing::error!(path = %self.path.display(), error = %e, "cannot open the kernel log; retrying");
                        let _ = agent.record_event(source_event(
                            "LogSourceFailed",
                            format!("cannot open {}: {e}; retrying", self.path.display()),
                            "Warning",
                        ));
                        failed = true;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            if failed {
                let _ = agent.record_event(source_event(
                    "LogSourceRecovered",
                    format!("reading {} again", self.path.display()),
                    "Info",
                ));
                failed = false;
            }
            backoff = Duration::from_secs(1);
            let mut records = Vec::with_capacity(BATCH);
            let mut last_flush = SystemTime::now();
            while !stop.load(Ordering::Relaxed) {
                records.clear();
                let info = match kmsg.read(&mut records, BATCH, Duration::from_millis(500)) {
                    Ok(i) => i,
                    Err(e) => {
                        tracing::error!(error = %e, "reading the kernel log failed; reopening");
                        let _ = agent.record_event(source_event(
                            "LogSourceFailed",
                            format!("reading {}: {e}; reopening", self.path.display()),
                            "Warning",
                        ));
                        failed = true;
                        break;
                    }
                };
                if info.lost > 0 {
                    agent.metrics.log_lost.get_or_create(&label).inc_by(info.lost);
                    let e = source_event(
                        "KernelLogOverrun",
                        format!(
                            "{} kernel log records were overwritten before they could be read",
                            info.lost
                        ),
                        "Warning",
                    );
                    agg.add(e, SystemTime::now(), &mut events);
                }
                agent
                    .metrics
                    .log_lines
                    .get_or_create(&label)
                    .inc_by(records.len() as u64);
                for r in &records {
                    for m in self.monitors.iter_mut() {
                        m.process(&r.message, r.time, &mut problems);
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
                if let Some(seq) = kmsg.last_seq()
                    && after != Some(seq)
                {
                    after = Some(seq);
                    not_before = None;
                    if let Some(s) = &agent.store
                        && let Err(e) = s.put_all(&[(keys::KMSG_CURSOR, format!("{boot_id} {seq}").into_bytes())])
                    {
                        tracing::warn!(error = %e, "cannot store the kernel log position");
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
