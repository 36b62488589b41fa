//! Keeps the log-monitor pipelines running: the local rule files (built-in
//! and configured) plus the ones the hub sends in the desired state
//! (DetectorSets). When the hub's set changes, every pipeline stops and a new
//! set starts; each source resumes from its stored cursor, and conditions
//! are restored, so nothing is replayed, missed or falsely cleared.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context;

use super::monitor::Monitor;
use super::pipeline::Pipeline;
use super::rules::{LogMonitor, Plugin};
use super::source::LogSource;
use super::source::file::{FileSource, Translator};
use super::source::journald::JournalSource;
use super::source::kmsg::KmsgSource;
use crate::runtime::Agent;

/// Groups monitors by the source they read (one reader per source).
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
    let mut out: Vec<(String, Pipeline)> = Vec::new();
    for (label, rules) in all {
        let (key, source): (String, Box<dyn LogSource>) = match rules.plugin_kind() {
            Some(Plugin::Kmsg) => {
                let path = if rules.log_path.is_empty() {
                    "/dev/kmsg"
                } else {
                    rules.log_path.as_str()
                };
                (
                    format!("kmsg:{path}"),
                    Box::new(KmsgSource::new(std::path::Path::new(path), boot_id)),
                )
            }
            Some(Plugin::Filelog) => {
                let tr =
                    Translator::new(&rules.plugin_config.clone().unwrap_or_default()).with_context(|| label.clone())?;
                (
                    format!("file:{}", rules.log_path),
                    Box::new(FileSource::new(std::path::Path::new(&rules.log_path), tr)),
                )
            }
            Some(Plugin::Journald) => {
                let pc = rules.plugin_config.clone().unwrap_or_default();
                let src = JournalSource::new(&rules.log_path, pc.source.as_deref(), pc.unit.as_deref());
                (
                    format!("journald:{}:{:?}:{:?}", rules.log_path, pc.source, pc.unit),
                    Box::new(src),
                )
            }
            None => anyhow::bail!("{label}: plugin {:?} is not a log monitor", rules.plugin),
        };
        let monitor = Monitor::new(rules).map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some((_, p)) => p.monitors.push(monitor),
            None => out.push((
                key,
                Pipeline {
                    source,
                    monitors: vec![monitor],
                },
            )),
        }
    }
    Ok(out.into_iter().map(|(_, p)| p).collect())
}

/// The running manager.
pub struct Manager {
    thread: std::thread::JoinHandle<()>,
}

impl Manager {
    /// Waits for every pipeline to stop (after the stop flag was set).
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

/// Starts the pipelines and the thread that swaps them when the hub's log
/// monitors change (sent by converge through the agent).
pub fn spawn(agent: Arc<Agent>, local: Vec<(String, LogMonitor)>, stop: Arc<AtomicBool>) -> std::io::Result<Manager> {
    let (tx, rx) = mpsc::channel::<Vec<LogMonitor>>();
    agent.set_detector_updates(tx);
    let thread = std::thread::Builder::new()
        .name("detect-manager".into())
        .spawn(move || {
            let boot_id = agent.facts.boot_id.clone();
            let mut remote = agent.settings().log_monitors;
            loop {
                let generation = Arc::new(AtomicBool::new(false));
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
                    if stop.load(Ordering::Relaxed) {
                        break None;
                    }
                    match rx.recv_timeout(Duration::from_millis(300)) {
                        Ok(m) if m != remote => break Some(m),
                        Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => break None,
                    }
                };
                generation.store(true, Ordering::Relaxed);
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
    Ok(Manager { thread })
}
