//! Detection by asking rather than reading logs: node-problem-detector's
//! custom-plugin monitors, health probes (kubelet, containerd, systemd
//! units, endpoints), resource pressure and hardware checks. Each check is a
//! small task on the agent's runtime; what it finds flows the way log
//! findings do (stored, reported through the outbox, on the socket, as
//! metrics). The set is the built-in checks (with `defaultRules`), the
//! local `detectors:` and the hub's DetectorSets; it is rebuilt when the
//! hub's part changes, and conditions carry over.

pub mod hardware;
pub mod plugin;
pub mod probe;
pub mod resources;
pub mod run;
pub mod tools;
pub mod tracker;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use nodekeeper_proto::v1::{
    Condition, CustomPluginMonitor, DetectorSetSpec, Event, HardwareChecks, Probe, ResourceChecks,
};
use tokio::task::JoinSet;

use crate::config::Detectors;
use crate::runtime::Agent;

/// The built-in checks (a DetectorSet spec), used with `defaultRules`.
pub const BUILTIN: &str = include_str!("../../../rules/checks.yaml");

/// Every check a node runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CheckSet {
    /// (where it came from, the monitor).
    pub plugins: Vec<(String, CustomPluginMonitor)>,
    pub probes: Vec<Probe>,
    pub resources: Option<ResourceChecks>,
    pub hardware: Option<HardwareChecks>,
}

impl CheckSet {
    /// Adds `other` over this set: plugins are added, a probe replaces one
    /// of the same name, resources and hardware replace these.
    fn overlay(&mut self, other: CheckSet) {
        self.plugins.extend(other.plugins);
        for p in other.probes {
            self.probes.retain(|q| q.name != p.name);
            self.probes.push(p);
        }
        if other.resources.is_some() {
            self.resources = other.resources;
        }
        if other.hardware.is_some() {
            self.hardware = other.hardware;
        }
    }

    /// The conditions, as (type, source), this set's checks may set.
    pub fn conditions(&self) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        let mut add = |t: &str, s: &str| {
            out.insert((t.to_string(), s.to_string()));
        };
        for (_, m) in &self.plugins {
            for c in &m.conditions {
                add(&c.r#type, &m.source);
            }
        }
        for p in &self.probes {
            let s = format!("probe/{}", p.name);
            for t in p.condition_type().into_iter().chain(p.restart_condition()) {
                add(&t, &s);
            }
        }
        if let Some(r) = &self.resources {
            let on = |t: &Option<nodekeeper_proto::v1::SignalTiming>| !t.is_some_and(|t| t.disabled);
            for (t, enabled) in [
                ("MemoryPressure", on(&r.memory.as_ref().and_then(|m| m.timing))),
                ("DiskPressure", on(&r.disk.as_ref().and_then(|m| m.timing))),
                ("PIDPressure", on(&r.pids.as_ref().and_then(|m| m.timing))),
                ("CPUPressure", on(&r.cpu.as_ref().and_then(|m| m.timing))),
                ("IOPressure", on(&r.io.as_ref().and_then(|m| m.timing))),
                ("HighLoad", on(&r.load.as_ref().and_then(|m| m.timing))),
            ] {
                if enabled {
                    add(t, "resources");
                }
            }
        }
        if let Some(h) = &self.hardware {
            let off = |d: Option<bool>| d.unwrap_or(false);
            for (name, disabled, types) in [
                (
                    "edac",
                    off(h.edac.as_ref().map(|x| x.disabled)),
                    &["CorrectableMemoryErrors", "UncorrectableMemoryErrors"][..],
                ),
                (
                    "nic",
                    off(h.nic.as_ref().map(|x| x.disabled)),
                    &["NetworkInterfaceDown", "FrequentNetworkInterfaceFlap"][..],
                ),
                (
                    "clock",
                    off(h.clock.as_ref().map(|x| x.disabled)),
                    &["ClockUnsynchronized"][..],
                ),
                (
                    "mounts",
                    off(h.read_only.as_ref().map(|x| x.disabled)),
                    &["ReadonlyFilesystem"][..],
                ),
                (
                    "taint",
                    off(h.taint.as_ref().map(|x| x.disabled)),
                    &["KernelTainted"][..],
                ),
                (
                    "tasks",
                    off(h.stuck_tasks.as_ref().map(|x| x.disabled)),
                    &["TasksStuckInDState"][..],
                ),
                (
                    "smart",
                    off(h.smart.as_ref().map(|x| x.disabled)),
                    &["DiskUnhealthy"][..],
                ),
                ("gpu", off(h.gpu.as_ref().map(|x| x.disabled)), &["GPUUnhealthy"][..]),
            ] {
                if !disabled {
                    for t in types {
                        add(t, &format!("hardware/{name}"));
                    }
                }
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty() && self.probes.is_empty() && self.resources.is_none() && self.hardware.is_none()
    }
}

/// The built-in checks, parsed and checked.
pub fn builtin() -> anyhow::Result<CheckSet> {
    let spec: DetectorSetSpec = serde_norway::from_str(BUILTIN).context("built-in checks (agent/rules/checks.yaml)")?;
    nodekeeper_proto::checks::check_detectors(
        "builtin",
        &spec.custom_plugin_monitors,
        &spec.probes,
        spec.resources.as_ref(),
        spec.hardware.as_ref(),
    )
    .map_err(|e| anyhow::anyhow!("built-in checks: {e}"))?;
    Ok(CheckSet {
        plugins: Vec::new(),
        probes: spec.probes,
        resources: spec.resources,
        hardware: spec.hardware,
    })
}

/// Reads a custom-plugin file; errors name the file, field and reason.
pub fn load_plugin(path: &Path) -> anyhow::Result<CustomPluginMonitor> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    nodekeeper_proto::checks::parse_custom_plugin(&text).map_err(|e| {
        let at = if e.field.is_empty() {
            String::new()
        } else {
            format!("{}: ", e.field)
        };
        anyhow::anyhow!("custom-plugin file {}: {at}{}", path.display(), e.message)
    })
}

/// The local checks of the agent's config (built-in ones first), checked:
/// a bad file or field stops the agent at start, naming it.
pub fn local(cfg: &Detectors, config_path: &Path) -> anyhow::Result<CheckSet> {
    let mut set = if cfg.default_rules {
        builtin()?
    } else {
        CheckSet::default()
    };
    let mut mine = CheckSet {
        probes: cfg.probes.clone(),
        resources: cfg.resources.clone(),
        hardware: cfg.hardware.clone(),
        ..Default::default()
    };
    for (i, f) in cfg.custom_plugin_monitors.iter().enumerate() {
        let m = load_plugin(f)
            .with_context(|| format!("{}: detectors.customPluginMonitors[{i}]", config_path.display()))?;
        mine.plugins
            .push((format!("detectors.customPluginMonitors[{i}]: {}", f.display()), m));
    }
    let plugins: Vec<CustomPluginMonitor> = mine.plugins.iter().map(|(_, m)| m.clone()).collect();
    nodekeeper_proto::checks::check_detectors(
        "detectors",
        &plugins,
        &mine.probes,
        mine.resources.as_ref(),
        mine.hardware.as_ref(),
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", config_path.display()))?;
    set.overlay(mine);
    Ok(set)
}

/// The hub's part, from the applied settings.
fn remote(agent: &Agent) -> CheckSet {
    let s = agent.settings();
    CheckSet {
        plugins: s
            .custom_plugin_monitors
            .into_iter()
            .enumerate()
            .map(|(i, m)| (format!("desired state customPluginMonitors[{i}]"), m))
            .collect(),
        probes: s.probes,
        resources: s.resources,
        hardware: s.hardware,
    }
}

/// An event for a condition that changed, as NPD sends one.
pub fn transition_event(c: &Condition) -> Event {
    Event {
        time: c.last_transition_time.clone(),
        severity: if c.status == "True" { "Warning" } else { "Info" }.into(),
        reason: c.reason.clone(),
        message: if c.status == "True" {
            c.message.clone()
        } else {
            format!("{} is {}: {}", c.r#type, c.status, c.message)
        },
        source: c.source.clone(),
        count: 1,
        first_time: String::new(),
    }
}

pub use super::event;

/// Stores and reports what a check found.
pub fn commit(agent: &Agent, conditions: Vec<Condition>, events: Vec<Event>) {
    if conditions.is_empty() && events.is_empty() {
        return;
    }
    for e in &events {
        if e.severity != "Info" {
            agent.metrics.problem_counter(&e.reason, 1);
        }
    }
    if let Err(e) = agent.record_findings(conditions, events, None) {
        tracing::error!(error = %e, "cannot store what a check found");
    }
}

/// Says once per distinct reason that a check cannot run (or has no source
/// on this node), and again after it ran.
#[derive(Debug, Default)]
pub struct Once {
    last: Option<String>,
}

impl Once {
    /// The event to record, if `message` is new.
    pub fn say(&mut self, source: &str, reason: &str, severity: &str, message: String) -> Option<Event> {
        if self.last.as_deref() == Some(message.as_str()) {
            return None;
        }
        self.last = Some(message.clone());
        Some(event(source, reason, severity, message))
    }

    /// The check ran: a later failure is said again.
    pub fn clear(&mut self) {
        self.last = None;
    }
}

/// Conditions restored for `source` (stored before a restart).
pub fn restored(agent: &Agent, source: &str) -> Vec<Condition> {
    agent.conditions().into_iter().filter(|c| c.source == source).collect()
}

/// Where the conditions of the running check set are kept.
const OWNED: &str = "checks:conditions";

/// Retires the conditions of checks that the new set no longer has (kept
/// across restarts, so a check removed while the agent was down goes too).
fn retire_removed(agent: &Agent, set: &CheckSet) {
    let Some(store) = &agent.store else { return };
    let now = set.conditions();
    let before: BTreeSet<(String, String)> = store
        .get(OWNED)
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let gone: BTreeSet<(String, String)> = before.difference(&now).cloned().collect();
    if let Err(e) = agent.retire_conditions(&gone) {
        tracing::error!(error = %e, "cannot retire the conditions of removed checks");
        return;
    }
    if before != now
        && let Err(e) = store.put_all(&[(OWNED, serde_json::to_vec(&now).unwrap_or_default())])
    {
        tracing::error!(error = %e, "cannot store which checks run");
    }
}

/// Starts the checks and rebuilds them when the hub's part changes.
pub fn spawn(
    agent: Arc<Agent>,
    local: CheckSet,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = agent.load_conditions() {
            tracing::error!(error = %e, "cannot load stored conditions for the checks");
        }
        let mut current: Option<CheckSet> = None;
        let mut tasks: JoinSet<()> = JoinSet::new();
        loop {
            let mut set = local.clone();
            set.overlay(remote(&agent));
            if current.as_ref() != Some(&set) {
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                tracing::info!(
                    plugins = set.plugins.len(),
                    probes = set.probes.len(),
                    resources = set.resources.is_some(),
                    hardware = set.hardware.is_some(),
                    "starting checks"
                );
                retire_removed(&agent, &set);
                start(&agent, &set, &mut tasks);
                current = Some(set);
            }
            tokio::select! {
                _ = agent.checks_changed.notified() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    })
}

fn start(agent: &Arc<Agent>, set: &CheckSet, tasks: &mut JoinSet<()>) {
    for (label, m) in &set.plugins {
        tasks.spawn(plugin::run(agent.clone(), label.clone(), m.clone()));
    }
    for p in &set.probes {
        tasks.spawn(probe::run(agent.clone(), p.clone()));
    }
    if let Some(r) = &set.resources {
        tasks.spawn(resources::run(agent.clone(), r.clone()));
    }
    if let Some(h) = &set.hardware {
        tasks.spawn(hardware::run(agent.clone(), h.clone()));
        let smart = h.smart.clone().unwrap_or_default();
        if !smart.disabled {
            tasks.spawn(tools::run_smart(agent.clone(), smart));
        }
        let gpu = h.gpu.clone().unwrap_or_default();
        if !gpu.disabled {
            tasks.spawn(tools::run_gpu(agent.clone(), gpu));
        }
    }
}

/// `root` joined with an absolute path (`/proc/meminfo` under `/tmp/tree`).
pub fn under(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}
