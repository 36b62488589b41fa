//! Node components at their declared versions: the converge engine.
//!
//! One thread owns every component. A new desired state starts a reconcile
//! at once; otherwise it runs every `converge.intervalSeconds`. A component
//! whose spec changed goes through one change (see [`machine`]), persisted
//! after every step in the agent store; a component already at its spec is
//! checked for drift (a hand-edited file, a replaced binary, another package
//! version) and put back, with a `ComponentDrift` event.

pub mod archive;
pub mod artifact;
pub mod decide;
mod drift;
pub mod files;
pub mod health;
pub mod local;
pub mod machine;
pub mod package;
pub mod signature;
mod steps;
pub mod systemd;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest sleep of the idle engine loop (its liveness beat).
const IDLE_WAKE: Duration = Duration::from_secs(60);

use nodekeeper_proto::component::{self as spec_rules, phase};
use nodekeeper_proto::time::now_rfc3339;
use nodekeeper_proto::v1::{DesiredComponent, Event, NodeComponent, report};

use self::artifact::{Cache, Limits};
use self::files::ContentStore;
use self::machine::{Change, Phase, Prior, Record};
use crate::config::ConvergeConfig;
use crate::converge::liveness::Liveness;
use crate::runtime::Agent;
use crate::store::{AgentStore, keys};

/// Environment variable naming a step boundary (`Installing:after`) at
/// which the agent kills itself with SIGKILL: the crash-consistency test's
/// hook. Unset in production.
pub const FAILPOINT_ENV: &str = "NODEKEEPER_FAILPOINT";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The engine; owned by its thread.
pub struct Engine {
    agent: Arc<Agent>,
    store: Arc<AgentStore>,
    cache: Cache,
    content: ContentStore,
    cfg: ConvergeConfig,
    records: BTreeMap<String, Record>,
    failpoint: Option<String>,
    observer: files::Observer,
    /// The components the node should run now (shared with each pass, so a
    /// pass does not copy every spec).
    desired: Arc<[DesiredComponent]>,
    /// A record changed since the last garbage collection.
    dirty: bool,
    /// Progress of this thread, watched from the async runtime.
    liveness: Arc<Liveness>,
    /// The runtime permit calls run on (the engine is a plain thread).
    rt: tokio::runtime::Handle,
    /// Permits held by changes under way, by component.
    held: BTreeMap<String, crate::link::permit::Permit>,
    /// Components whose change a restart interrupted after it touched the node.
    resumed: std::collections::BTreeSet<String>,
    /// When to ask again for a permit that was denied.
    permit_retry: Option<std::time::Instant>,
}

/// Seconds before asking again for a denied permit (jittered, so waiting
/// nodes do not ask in lockstep).
fn permit_retry_delay() -> Duration {
    Duration::from_millis(2000 + rand::random::<u64>() % 3000)
}

/// Starts the engine thread. It first finishes (or rolls back) any change a
/// crash interrupted, then reconciles. `local` replaces the hub's components
/// (a standalone agent's own, from `converge.components`).
pub fn spawn(
    agent: Arc<Agent>,
    store: Arc<AgentStore>,
    cfg: ConvergeConfig,
    state_dir: &Path,
    local: Option<Vec<DesiredComponent>>,
    stop: Arc<AtomicBool>,
    liveness: Arc<Liveness>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let (tx, rx) = mpsc::channel();
    if local.is_none() {
        agent.set_component_updates(tx);
    }
    let desired: Arc<[DesiredComponent]> = local.unwrap_or_else(|| agent.settings().components).into();
    let mut engine = Engine {
        cache: Cache::new(
            state_dir.join("artifacts"),
            Limits {
                attempts: cfg.download_attempts,
                deadline: std::time::Duration::from_secs(cfg.download_timeout_seconds),
                max_bytes: cfg.max_artifact_bytes,
            },
        ),
        content: ContentStore::new(state_dir.join("content")),
        agent,
        store,
        cfg,
        records: BTreeMap::new(),
        failpoint: std::env::var(FAILPOINT_ENV).ok().filter(|s| !s.is_empty()),
        observer: files::Observer::default(),
        desired,
        dirty: true,
        liveness,
        rt: tokio::runtime::Handle::current(),
        held: BTreeMap::new(),
        resumed: Default::default(),
        permit_retry: None,
    };
    std::thread::Builder::new()
        .name("converge".into())
        .spawn(move || engine.run(rx, stop))
}

impl Engine {
    fn run(&mut self, rx: mpsc::Receiver<Vec<DesiredComponent>>, stop: Arc<AtomicBool>) {
        if let Err(e) = self.load() {
            tracing::error!(error = %e, "cannot read component records; converge is off until the agent restarts");
            return;
        }
        let names: Vec<String> = self.records.keys().cloned().collect();
        for name in names {
            if let Some(ch) = self.records.get(&name).and_then(|r| r.change.as_ref()) {
                if ch.phase.touches_node() {
                    self.resumed.insert(name.clone());
                }
                tracing::info!(component = %name, "resuming a change interrupted by a restart");
                self.drive(&name);
            }
        }
        let interval = Duration::from_secs(self.cfg.interval_seconds);
        let mut next = std::time::Instant::now();
        while !stop.load(Ordering::Relaxed) {
            self.liveness.beat();
            let retry_due = self.permit_retry.is_some_and(|t| std::time::Instant::now() >= t);
            if std::time::Instant::now() >= next || retry_due {
                self.permit_retry = None;
                self.reconcile();
                next = std::time::Instant::now() + interval;
            }
            let wake = self.permit_retry.map_or(next, |t| t.min(next));
            // Sleep until the next drift check or a new desired state (a beat
            // at least every minute keeps the idle loop's liveness fresh); no
            // short timer wakes an idle agent.
            let wait = wake
                .saturating_duration_since(std::time::Instant::now())
                .clamp(Duration::from_millis(10), IDLE_WAKE);
            match rx.recv_timeout(wait) {
                Ok(d) => {
                    self.desired = d.into();
                    while let Ok(d) = rx.try_recv() {
                        self.desired = d.into();
                    }
                    next = std::time::Instant::now();
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                // A standalone agent's components never change.
                Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(wait),
            }
        }
    }

    fn load(&mut self) -> Result<(), String> {
        for (key, value) in self.store.scan(keys::COMPONENT_PREFIX).map_err(|e| e.to_string())? {
            match serde_json::from_slice::<Record>(&value) {
                Ok(r) => {
                    self.agent.set_component(self.node_component(&r));
                    self.records.insert(r.name.clone(), r);
                }
                Err(e) => {
                    tracing::error!(key, error = %e, "unreadable component record; the component starts over");
                    self.event(
                        "Warning",
                        "ComponentRecordUnreadable",
                        format!(
                            "{key}: {e}; what was installed is unknown, so the next change treats the node's current state as the state to roll back to"
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    fn persist(&self, rec: &Record) -> Result<(), String> {
        let body = serde_json::to_vec(rec).map_err(|e| e.to_string())?;
        self.store
            .put_all(&[(&format!("{}{}", keys::COMPONENT_PREFIX, rec.name), body)])
            .map_err(|e| e.to_string())
    }

    fn node_component(&self, r: &Record) -> NodeComponent {
        let (declared, generation) = match &r.change {
            Some(c) => (
                c.target.spec.as_ref().map(|s| s.version.clone()).unwrap_or_default(),
                c.target.generation,
            ),
            None => self
                .desired
                .iter()
                .find(|d| d.name == r.name)
                .map(|d| {
                    (
                        d.spec.as_ref().map(|s| s.version.clone()).unwrap_or_default(),
                        d.generation,
                    )
                })
                .unwrap_or_default(),
        };
        NodeComponent {
            name: r.name.clone(),
            declared_version: declared,
            observed_version: r.observed_version(),
            phase: r.phase.clone(),
            last_error: r.last_error.clone(),
            last_change_time: r.last_change_time.clone(),
            generation,
            reason: r.reason.clone(),
        }
    }

    /// Stores the record, then tells the socket and the hub.
    fn save(&mut self, rec: &Record) -> Result<(), String> {
        self.dirty = true;
        self.persist(rec)?;
        let nc = self.node_component(rec);
        self.agent.set_component(nc.clone());
        if let Err(e) = self.agent.report(report::Body::Component(nc)) {
            tracing::error!(component = %rec.name, error = %e, "cannot queue the component report");
        }
        Ok(())
    }

    fn event(&self, severity: &str, reason: &str, message: String) {
        let ev = Event {
            severity: severity.into(),
            reason: reason.into(),
            message,
            source: "converge".into(),
            ..Default::default()
        };
        if let Err(e) = self.agent.record_event(ev) {
            tracing::error!(error = %e, "cannot record a converge event");
        }
    }

    /// How long step `ph` of `ch` may take before the thread counts as
    /// stuck: the deadlines of what the step runs, with a margin.
    fn budget(&self, ph: Phase, ch: &Change) -> Duration {
        use crate::exec::{Kind, deadline};
        if self.cfg.stuck_after_seconds > 0 {
            return Duration::from_secs(self.cfg.stuck_after_seconds);
        }
        let margin = Duration::from_secs(60);
        let health = ch
            .target
            .spec
            .as_ref()
            .and_then(|s| s.health.as_ref())
            .map_or(Duration::ZERO, |h| {
                Duration::from_secs(
                    u64::from(h.grace_period_seconds.max(60)) + u64::from(h.timeout_seconds.max(10)) * 2,
                )
            });
        // dpkg may first wait up to two minutes for another holder's lock,
        // and apt may update its lists before installing.
        let package = deadline(Kind::Package) * 3 + Duration::from_secs(120);
        let systemctl = deadline(Kind::Systemctl) * 4;
        margin
            + match ph {
                Phase::Downloading => Duration::from_secs(self.cfg.download_timeout_seconds),
                Phase::Verifying | Phase::Staging | Phase::WritingFiles => Duration::from_secs(600),
                Phase::Installing => package,
                Phase::Restarting => systemctl,
                Phase::HealthCheck => health,
                Phase::RollingBack => package + systemctl,
            }
    }

    fn failpoint(&self, at: &str) {
        let hang = self.failpoint.as_deref().and_then(|f| f.strip_suffix(":hang"));
        if hang.is_some() && hang == at.strip_suffix(":during") {
            // A step that never returns (a call without a deadline): the
            // liveness test's hook.
            tracing::warn!(at, "failpoint: this step hangs");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        if self.failpoint.as_deref() == Some(at) {
            tracing::warn!(at, "failpoint: killing the agent with SIGKILL");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// One pass over the desired components.
    pub fn reconcile(&mut self) {
        let started = std::time::Instant::now();
        let desired = Arc::clone(&self.desired);
        self.reconcile_all(&desired);
        self.agent.metrics.reconciles.inc();
        self.agent
            .metrics
            .reconcile_seconds
            .inc_by(started.elapsed().as_secs_f64());
    }

    fn reconcile_all(&mut self, desired: &[DesiredComponent]) {
        for d in desired {
            let _span = tracing::info_span!("component", name = %d.name).entered();
            self.reconcile_one(d);
        }
        let gone: Vec<String> = self
            .records
            .keys()
            .filter(|n| !desired.iter().any(|d| &d.name == *n))
            .cloned()
            .collect();
        for name in gone {
            if self.records.get(&name).is_some_and(|r| r.change.is_some()) {
                // Finish what was started first; it stops being managed after.
                self.drive(&name);
            }
            if let Some(mut r) = self.records.remove(&name) {
                tracing::info!(component = %name, "component no longer selects this node; leaving it installed, unmanaged");
                r.phase = phase::REMOVED.into();
                let _ = self.store.delete(&format!("{}{name}", keys::COMPONENT_PREFIX));
                self.dirty = true;
                let nc = self.node_component(&r);
                self.agent.remove_component(&name);
                let _ = self.agent.report(report::Body::Component(nc));
            }
        }
        // Only a change or a removal can leave artifacts, contents or archive
        // versions behind; a pass that only checked drift reads no directory.
        if std::mem::take(&mut self.dirty) {
            self.gc();
        }
    }

    fn reconcile_one(&mut self, d: &DesiredComponent) {
        let name = d.name.clone();
        let rec = self.records.entry(name.clone()).or_insert_with(|| Record::new(&name));
        if rec.change.is_some() {
            self.drive(&name);
        }
        let Some(spec) = d.spec.as_ref() else { return };
        let hash = machine::spec_hash(d);
        let Some(rec) = self.records.get(&name) else {
            return;
        };
        match decide::plan(rec, &hash, unix_now()) {
            // Driven above; what is left of it waits for the next pass.
            decide::Plan::Resume | decide::Plan::Skip => {}
            decide::Plan::CheckDrift { at_target } => {
                if at_target {
                    self.at_revision(&name, d.generation);
                }
                self.check_drift(&name, d, at_target)
            }
            // Keep what is installed intact while waiting to retry.
            decide::Plan::WaitForRetry => self.check_drift(&name, d, false),
            decide::Plan::Start => {
                // Checked when it arrived; checked again before it may touch
                // the node (a spec already installed or already failed is not
                // compiled again).
                if let Err(e) = spec_rules::check("spec", spec) {
                    let msg = format!("the desired spec is invalid, nothing was changed: {e}");
                    if let Some(rec) = self.records.get_mut(&name)
                        && rec.last_error != msg
                    {
                        rec.phase = phase::FAILED.into();
                        rec.last_error = msg;
                        rec.reason.clear();
                        let rec = rec.clone();
                        let _ = self.save(&rec);
                    }
                    return;
                }
                self.start(&name, d.clone(), hash, "update");
            }
        }
    }

    fn start(&mut self, name: &str, target: DesiredComponent, hash: String, reason: &str) {
        let Some(rec) = self.records.get_mut(name) else { return };
        tracing::info!(
            component = %name,
            version = %target.spec.as_ref().map(|s| s.version.as_str()).unwrap_or_default(),
            reason,
            "starting a component change"
        );
        rec.change = Some(Change {
            target,
            target_hash: hash,
            reason: reason.into(),
            phase: Phase::Downloading,
            staged: None,
            previous: rec.installed.clone(),
            prior: Prior::default(),
            error: String::new(),
        });
        rec.phase = Phase::Downloading.name().into();
        rec.last_change_time = now_rfc3339();
        let snapshot = rec.clone();
        if let Err(e) = self.save(&snapshot) {
            tracing::error!(component = %name, error = %e, "cannot record the change; not starting it");
            if let Some(r) = self.records.get_mut(name) {
                r.change = None;
            }
            return;
        }
        self.drive(name);
    }

    /// Runs the change of `name` from its recorded step to its end.
    fn drive(&mut self, name: &str) {
        loop {
            let Some(mut rec) = self.records.get(name).cloned() else {
                return;
            };
            let Some(mut ch) = rec.change.take() else { return };
            let ph = ch.phase;
            if ph.touches_node() && !self.held.contains_key(name) && !self.ask_permit(name, &ch) {
                return;
            }
            let _span = tracing::info_span!("step", component = %name, phase = ph.name()).entered();
            self.failpoint(&format!("{}:before", ph.name()));
            self.liveness
                .begin(format!("component {name}: {}", ph.name()), self.budget(ph, &ch));
            self.failpoint(&format!("{}:during", ph.name()));
            let result = self.step(&mut ch);
            self.liveness.end();
            self.failpoint(&format!("{}:after", ph.name()));
            if let Err(e) = &result {
                tracing::warn!(component = %name, error = %e, "component change step failed");
            }
            // One interval, then the jittered backoff: nodes that failed on
            // the same repository outage do not come back to it in lockstep.
            let retry_wait = self.cfg.interval_seconds
                + crate::retry::Backoff::delay_for(
                    Duration::from_secs(self.cfg.interval_seconds.max(1)),
                    Duration::from_secs(3600),
                    rec.attempts + 1,
                )
                .as_secs();
            let now = decide::Now {
                rfc3339: now_rfc3339(),
                unix: unix_now(),
                retry_wait,
            };
            let fx = decide::after_step(name, &mut rec, ch, result, &now);
            for e in fx.events {
                self.event(e.severity, e.reason, e.message);
            }
            if let Some(r) = fx.result {
                self.agent.metrics.component_change(r);
            }
            if let Err(e) = self.save(&rec) {
                // Without a record of the step the node must not change further.
                tracing::error!(component = %name, error = %e, "cannot record the component's step; pausing it");
                return;
            }
            let done = rec.change.is_none();
            self.records.insert(name.to_string(), rec);
            if done {
                self.resumed.remove(name);
                if let Some(p) = self.held.remove(name) {
                    self.rt.block_on(p.release());
                }
                return;
            }
        }
    }

    /// The node already runs the desired content: a new generation of it
    /// (a rollout's undo to what the node runs) is done without a change.
    fn at_revision(&mut self, name: &str, generation: i64) {
        let Some(rec) = self.records.get_mut(name) else { return };
        if rec.reported_generation == generation && rec.phase == phase::DONE {
            return;
        }
        rec.reported_generation = generation;
        rec.phase = phase::DONE.into();
        rec.last_error.clear();
        rec.reason.clear();
        rec.failed_hash.clear();
        let rec = rec.clone();
        if let Err(e) = self.save(&rec) {
            tracing::error!(component = %name, error = %e, "cannot record the component's revision");
        }
    }

    /// Asks the defender before the first step that touches the node;
    /// `false` (the change waits, its record untouched) when there is no
    /// permit, with the reason in the component's `lastError`.
    fn ask_permit(&mut self, name: &str, ch: &Change) -> bool {
        let version = ch.target.spec.as_ref().map(|s| s.version.as_str()).unwrap_or_default();
        let reason = format!("{} component {name} to {version} ({})", ch.reason, ch.phase.name());
        let must_finish = self.resumed.contains(name);
        let permits = self.agent.permits.clone();
        let action = format!("component/{name}");
        match self.rt.block_on(permits.acquire(&action, &reason, must_finish)) {
            Ok(p) => {
                tracing::info!(component = %name, permit = %p.id, "permit granted");
                self.held.insert(name.to_string(), p);
                if let Some(rec) = self.records.get_mut(name)
                    && rec.last_error.starts_with(WAITING_FOR_PERMIT)
                {
                    rec.last_error.clear();
                    let rec = rec.clone();
                    let _ = self.save(&rec);
                }
                true
            }
            Err(why) => {
                let msg = format!("{WAITING_FOR_PERMIT}: {why}");
                tracing::info!(component = %name, %why, "waiting for a permit");
                self.permit_retry = Some(std::time::Instant::now() + permit_retry_delay());
                if let Some(rec) = self.records.get_mut(name)
                    && rec.last_error != msg
                {
                    rec.last_error = msg;
                    let rec = rec.clone();
                    let _ = self.save(&rec);
                }
                false
            }
        }
    }
}

/// How `lastError` starts while a change waits for the defender.
pub const WAITING_FOR_PERMIT: &str = "waiting for a permit";
