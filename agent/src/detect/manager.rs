//! Keeps the log-monitor pipelines running: the local rule files (built-in
//! and configured) plus the ones the hub sends in the desired state
//! (DetectorSets). When the hub's set changes, every pipeline stops and a new
//! set starts; each source resumes from its stored cursor, and conditions
//! are restored, so nothing is replayed, missed or falsely cleared.

use std::sync::Arc;
use std::sync::mpsc;

use anyhow::Context;

use super::monitor::Monitor;
use super::pipeline::Pipeline;
use super::rules::{LogMonitor, Plugin};
use super::source::file::{FileSource, Translator};
use super::source::journald::{self, Filter, JournalSource};
use super::source::kmsg::KmsgSource;
use super::source::{ALL_STREAMS, LogSource};
use super::stop::Stop;
use crate::runtime::Agent;

/// Groups monitors by the source they read: one reader per kernel log, per
/// journal directory (every journald monitor's filter in one reader), and
/// per file with the same translator and skipList.
pub fn pipelines(
    local: &[(String, LogMonitor)],
    remote: &[LogMonitor],
    boot_id: &str,
) -> anyhow::Result<Vec<Pipeline>> {
    let all = local.iter().cloned().chain(
        remote
            .iter()
            .enumerate()
            .map(|(i, m)| (format!("desired state logMonitors[{i}]"), m.clone())),
    );
    struct Group {
        key: String,
        source: Option<Box<dyn LogSource>>,
        /// A journal reader's filters (its streams).
        filters: Vec<Filter>,
        log_path: String,
        monitors: Vec<Monitor>,
        streams: Vec<u64>,
    }
    let mut groups: Vec<Group> = Vec::new();
    for (label, rules) in all {
        let monitor = |rules: LogMonitor| Monitor::new(rules).map_err(|e| anyhow::anyhow!("{label}: {e}"));
        match rules.plugin_kind() {
            Some(Plugin::Journald) => {
                let pc = rules.plugin_config.clone().unwrap_or_default();
                let filter = Filter::new(pc.source.as_deref(), pc.unit.as_deref());
                let dir = rules.log_path.clone();
                let g = match groups.iter_mut().position(|g| {
                    g.key == format!("journald:{dir}")
                        && (g.filters.contains(&filter) || g.filters.len() < journald::MAX_FILTERS)
                }) {
                    Some(i) => &mut groups[i],
                    None => {
                        groups.push(Group {
                            key: format!("journald:{dir}"),
                            source: None,
                            filters: Vec::new(),
                            log_path: dir,
                            monitors: Vec::new(),
                            streams: Vec::new(),
                        });
                        groups.last_mut().ok_or_else(|| anyhow::anyhow!("{label}: no group"))?
                    }
                };
                let i = match g.filters.iter().position(|f| *f == filter) {
                    Some(i) => i,
                    None => {
                        g.filters.push(filter);
                        g.filters.len() - 1
                    }
                };
                g.monitors.push(monitor(rules)?);
                g.streams.push(1 << i);
            }
            Some(Plugin::Kmsg) | Some(Plugin::Filelog) => {
                let (key, source): (String, Box<dyn LogSource>) = if rules.plugin_kind() == Some(Plugin::Kmsg) {
                    let path = if rules.log_path.is_empty() {
                        "/dev/kmsg"
                    } else {
                        rules.log_path.as_str()
                    };
                    (
                        format!("kmsg:{path}"),
                        Box::new(KmsgSource::new(std::path::Path::new(path), boot_id)),
                    )
                } else {
                    let pc = rules.plugin_config.clone().unwrap_or_default();
                    let tr = Translator::new(&pc, &rules.skip_list).with_context(|| label.clone())?;
                    // The translator and skipList are applied by the source: one
                    // reader per file and translation.
                    let how = serde_json::to_string(&(&pc, &rules.skip_list)).unwrap_or_default();
                    (
                        format!("file:{}:{how}", rules.log_path),
                        Box::new(FileSource::new(std::path::Path::new(&rules.log_path), tr)),
                    )
                };
                let m = monitor(rules)?;
                match groups.iter_mut().find(|g| g.key == key) {
                    Some(g) => {
                        g.monitors.push(m);
                        g.streams.push(ALL_STREAMS);
                    }
                    None => groups.push(Group {
                        key,
                        source: Some(source),
                        filters: Vec::new(),
                        log_path: String::new(),
                        monitors: vec![m],
                        streams: vec![ALL_STREAMS],
                    }),
                }
            }
            None => anyhow::bail!("{label}: plugin {:?} is not a log monitor", rules.plugin),
        }
    }
    Ok(groups
        .into_iter()
        .map(|g| Pipeline {
            source: g
                .source
                .unwrap_or_else(|| Box::new(JournalSource::new(&g.log_path, g.filters))),
            monitors: g.monitors,
            streams: g.streams,
        })
        .collect())
}

/// What the manager is told.
pub enum Control {
    /// The hub's log monitors (from the desired state).
    Monitors(Vec<LogMonitor>),
    /// Stop every pipeline and return.
    Stop,
}

/// The running manager.
pub struct Manager {
    thread: std::thread::JoinHandle<()>,
    control: mpsc::Sender<Control>,
}

impl Manager {
    /// Stops every pipeline and waits for them.
    pub fn stop_and_join(self) {
        let _ = self.control.send(Control::Stop);
        let _ = self.thread.join();
    }
}

/// Starts the pipelines and the thread that swaps them when the hub's log
/// monitors change (sent by converge through the agent). It sleeps until
/// told something: no timer.
pub fn spawn(agent: Arc<Agent>, local: Vec<(String, LogMonitor)>) -> std::io::Result<Manager> {
    let (tx, rx) = mpsc::channel::<Control>();
    agent.set_detector_updates(tx.clone());
    let thread = std::thread::Builder::new()
        .name("detect-manager".into())
        .spawn(move || {
            let boot_id = agent.facts.boot_id.clone();
            let mut remote = agent.settings().log_monitors;
            loop {
                let generation = match Stop::new() {
                    Ok(s) => Arc::new(s),
                    Err(e) => {
                        tracing::error!(error = %e, "log monitors not started: cannot create their stop signal");
                        return;
                    }
                };
                let mut threads = Vec::new();
                match pipelines(&local, &remote, &boot_id) {
                    Ok(ps) => {
                        for p in ps {
                            tracing::info!(
                                source = p.source.name(),
                                monitors = p.monitors.len(),
                                "starting log monitors"
                            );
                            match p.spawn(agent.clone(), generation.clone()) {
                                Ok(t) => threads.push(t),
                                Err(e) => tracing::error!(error = %e, "cannot start a log source thread"),
                            }
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "log monitors not started"),
                }
                // Wait for a change or the stop.
                let next = loop {
                    match rx.recv() {
                        Ok(Control::Monitors(m)) if m != remote => break Some(m),
                        Ok(Control::Monitors(_)) => {}
                        Ok(Control::Stop) | Err(_) => break None,
                    }
                };
                generation.set();
                for t in threads {
                    let _ = t.join();
                }
                match next {
                    Some(m) => {
                        tracing::info!(
                            monitors = m.len(),
                            "log monitors from the hub changed; restarting the pipelines"
                        );
                        remote = m;
                    }
                    None => return,
                }
            }
        })?;
    Ok(Manager { thread, control: tx })
}
