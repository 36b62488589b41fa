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
pub mod files;
pub mod health;
pub mod local;
pub mod machine;
pub mod package;
pub mod systemd;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nodekeeper_proto::component::{self as spec_rules, phase};
use nodekeeper_proto::time::now_rfc3339;
use nodekeeper_proto::v1::{ComponentSpec, DesiredComponent, Event, NodeComponent, report};

use self::artifact::{Cache, Limits};
use self::decide::Undo;
use self::files::{ContentStore, Owner};
use self::machine::{ArtifactState, Change, FileState, Installed, Manager, Phase, Prior, Record};
use self::package::{Dpkg, PackageManager, Rpm};
use crate::config::ConvergeConfig;
use crate::converge::liveness::Liveness;
use crate::runtime::Agent;
use crate::store::{AgentStore, keys};

/// Runs a command; its stdout, or an error with its stderr.
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
            if self.records.get(&name).is_some_and(|r| r.change.is_some()) {
                tracing::info!(component = %name, "resuming a change interrupted by a restart");
                self.drive(&name);
            }
        }
        let interval = Duration::from_secs(self.cfg.interval_seconds);
        let mut next = std::time::Instant::now();
        while !stop.load(Ordering::Relaxed) {
            self.liveness.beat();
            if std::time::Instant::now() >= next {
                self.reconcile();
                next = std::time::Instant::now() + interval;
            }
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(d) => {
                    self.desired = d.into();
                    while let Ok(d) = rx.try_recv() {
                        self.desired = d.into();
                    }
                    next = std::time::Instant::now();
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                // A standalone agent's components never change.
                Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(Duration::from_millis(500)),
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
            decide::Plan::CheckDrift { at_target } => self.check_drift(&name, d, at_target),
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
                return;
            }
        }
    }

    /// Performs one step.
    fn step(&self, ch: &mut Change) -> Result<(), String> {
        let spec = ch.target.spec.clone().unwrap_or_default();
        match ch.phase {
            Phase::Downloading => {
                if let Some((url, sha, size)) = artifact_url(&spec) {
                    self.cache.fetch(url, sha, size)?;
                }
                Ok(())
            }
            Phase::Verifying => {
                if let Some((_, sha, _)) = artifact_url(&spec) {
                    self.cache.verify(sha)?;
                }
                Ok(())
            }
            Phase::Staging => {
                let staged = self.stage(&ch.target, &ch.target_hash, ch.previous.as_ref(), &mut ch.prior)?;
                ch.staged = Some(staged);
                Ok(())
            }
            Phase::Installing => match staged(ch)?.artifact.as_ref() {
                Some(a) => self.apply_artifact(a),
                None => Ok(()),
            },
            Phase::WritingFiles => self.write_files(staged(ch)?, ch.previous.as_ref()),
            Phase::Restarting => self.restart(staged(ch)?, ch.previous.as_ref(), ch.reason == "drift"),
            Phase::HealthCheck => match &spec.health {
                Some(h) => health::gate(h),
                None => Ok(()),
            },
            Phase::RollingBack => self.rollback(ch),
        }
    }

    fn pm(&self, m: Manager) -> Box<dyn PackageManager> {
        match m {
            Manager::Deb => Box::new(Dpkg),
            Manager::Rpm => Box::new(Rpm {
                root: self.cfg.rpm_root.clone(),
            }),
        }
    }

    /// Renders files, identifies or unpacks the artifact, and records what
    /// the node has now where the change will write.
    fn stage(
        &self,
        target: &DesiredComponent,
        hash: &str,
        previous: Option<&Installed>,
        prior: &mut Prior,
    ) -> Result<Installed, String> {
        let spec = target.spec.clone().unwrap_or_default();
        let mut labels = self.agent.labels.clone();
        labels.extend(self.agent.settings().labels);
        let ctx = spec_rules::TemplateContext {
            node: spec_rules::NodeContext {
                name: &self.agent.name,
                labels: &labels,
                facts: &self.agent.facts,
            },
            params: &spec.params,
            component: spec_rules::ComponentContext {
                name: &target.name,
                version: &spec.version,
            },
        };
        let mut files = Vec::new();
        for (i, f) in spec.files.iter().enumerate() {
            let text = spec_rules::render(&f.template, &ctx).map_err(|e| format!("files[{i}] {}: {e}", f.path))?;
            let sha = self
                .content
                .put(text.as_bytes())
                .map_err(|e| format!("keeping {}: {e}", f.path))?;
            let owner = files::resolve_owner(&f.owner).map_err(|e| format!("files[{i}] {}: {e}", f.path))?;
            files.push(FileState {
                path: f.path.clone(),
                sha256: sha,
                mode: spec_rules::parse_mode(&f.mode, 0o644).unwrap_or(0o644),
                uid: owner.uid,
                gid: owner.gid,
            });
        }
        let service = spec.service.clone().unwrap_or_default();
        if !service.unit_file.is_empty() {
            let sha = self
                .content
                .put(service.unit_file.as_bytes())
                .map_err(|e| format!("keeping the unit file: {e}"))?;
            files.push(FileState {
                path: self.cfg.unit_dir.join(&service.unit).to_string_lossy().into_owned(),
                sha256: sha,
                mode: 0o644,
                uid: 0,
                gid: 0,
            });
        }
        let artifact = match spec.artifact.as_ref() {
            None => None,
            Some(a) => Some(
                if let Some((m, p)) = a
                    .deb
                    .as_ref()
                    .map(|p| (Manager::Deb, p))
                    .or(a.rpm.as_ref().map(|p| (Manager::Rpm, p)))
                {
                    if p.url.is_empty() {
                        ArtifactState::Package {
                            manager: m,
                            package: p.package.clone(),
                            version: p.version.clone(),
                            sha256: None,
                        }
                    } else {
                        // Only its name and version are read here (Verifying
                        // hashed it; Installing hashes it again before use).
                        let (package, version) = self.pm(m).identify(&self.cache.path(&p.sha256))?;
                        ArtifactState::Package {
                            manager: m,
                            package,
                            version,
                            sha256: Some(p.sha256.clone()),
                        }
                    }
                } else if let Some(ar) = &a.archive {
                    let install_dir = PathBuf::from(&ar.install_dir);
                    let dir = archive::versions_dir(&install_dir).join(&spec.version);
                    let intact = previous
                        .and_then(|p| match &p.artifact {
                            Some(ArtifactState::Archive { dir: d, manifest, .. }) if Path::new(d) == dir => {
                                Some(manifest)
                            }
                            _ => None,
                        })
                        .filter(|m| archive::check(&dir, m).is_empty())
                        .cloned();
                    let manifest = match intact {
                        Some(m) => m,
                        None => archive::unpack(&self.cache.verify(&ar.sha256)?, &dir, ar.strip_components)?,
                    };
                    ArtifactState::Archive {
                        install_dir: ar.install_dir.clone(),
                        dir: dir.to_string_lossy().into_owned(),
                        sha256: ar.sha256.clone(),
                        strip: ar.strip_components,
                        manifest,
                    }
                } else if let Some(f) = &a.file {
                    ArtifactState::File {
                        path: f.path.clone(),
                        sha256: f.sha256.clone(),
                        mode: spec_rules::parse_mode(&f.mode, 0o755).unwrap_or(0o755),
                    }
                } else {
                    return Err("artifact has no kind".into());
                },
            ),
        };
        // What the node has where this change writes and the previous version
        // did not: restored if the change is rolled back.
        let managed_before = |path: &str| {
            previous.is_some_and(|p| {
                p.file(path).is_some() || matches!(&p.artifact, Some(ArtifactState::File { path: q, .. }) if q == path)
            })
        };
        let mut paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        if let Some(ArtifactState::File { path, .. }) = &artifact {
            paths.push(path);
        }
        for path in paths {
            if !managed_before(path) && !prior.files.contains_key(path) {
                let before = match self
                    .observer
                    .observe(Path::new(path))
                    .map_err(|e| format!("{path}: {e}"))?
                {
                    None => None,
                    Some(o) => {
                        let sha = self
                            .content
                            .keep_file(Path::new(path))?
                            .ok_or_else(|| format!("{path} vanished while being kept"))?;
                        Some(FileState {
                            path: path.into(),
                            sha256: sha,
                            mode: o.mode,
                            uid: o.owner.uid,
                            gid: o.owner.gid,
                        })
                    }
                };
                prior.files.insert(path.into(), before);
            }
        }
        if let Some(a) = &artifact {
            let slot_before = previous
                .and_then(|p| p.artifact.as_ref())
                .is_some_and(|p| machine::same_slot(p, a));
            if !slot_before {
                match a {
                    ArtifactState::Package { manager, package, .. } => {
                        if !prior.packages.contains_key(package) {
                            let v = self.pm(*manager).installed_version(package)?;
                            prior.packages.insert(package.clone(), v);
                        }
                    }
                    ArtifactState::Archive { install_dir, .. } => {
                        let link = archive::current_link(Path::new(install_dir));
                        let key = link.to_string_lossy().into_owned();
                        prior.links.entry(key).or_insert_with(|| std::fs::read_link(&link).ok());
                    }
                    ArtifactState::File { .. } => {}
                }
            }
        }
        Ok(Installed {
            version: spec.version.clone(),
            generation: target.generation,
            spec_hash: hash.to_string(),
            artifact,
            files,
            unit: (!service.unit.is_empty()).then(|| service.unit.clone()),
            restart_on_change: service.restart_on_change.unwrap_or(true),
        })
    }

    /// Puts an artifact in place (a no-op when it already is). Only verified
    /// artifacts from the cache are used.
    fn apply_artifact(&self, a: &ArtifactState) -> Result<(), String> {
        match a {
            ArtifactState::Package {
                manager,
                package,
                version,
                sha256,
            } => {
                let pm = self.pm(*manager);
                if pm.installed_version(package)?.as_deref() == Some(version.as_str()) {
                    return Ok(());
                }
                match sha256 {
                    Some(sha) => pm.install_file(&self.cache.verify(sha)?)?,
                    None => pm.install_repo(package, version)?,
                }
                match pm.installed_version(package)? {
                    Some(v) if &v == version => Ok(()),
                    other => Err(format!(
                        "after installing, {package} is at {}, not {version}",
                        other.as_deref().unwrap_or("nothing")
                    )),
                }
            }
            ArtifactState::Archive {
                install_dir,
                dir,
                sha256,
                strip,
                manifest,
            } => {
                let dir = Path::new(dir);
                if !archive::check(dir, manifest).is_empty() {
                    let fresh = archive::unpack(&self.cache.verify(sha256)?, dir, *strip)?;
                    if &fresh != manifest {
                        return Err(format!("{} unpacked differently than when staged", dir.display()));
                    }
                }
                let link = archive::current_link(Path::new(install_dir));
                if std::fs::read_link(&link).ok().as_deref() != Some(dir) {
                    files::switch_symlink(&link, dir).map_err(|e| format!("switching {}: {e}", link.display()))?;
                }
                Ok(())
            }
            ArtifactState::File { path, sha256, mode } => {
                let p = Path::new(path);
                let now = self.observer.observe(p).map_err(|e| format!("{path}: {e}"))?;
                if now.as_ref().is_some_and(|o| &o.sha256 == sha256 && o.mode == *mode) {
                    return Ok(());
                }
                files::copy_atomic(&self.cache.verify(sha256)?, p, *mode, Owner { uid: 0, gid: 0 })
                    .map_err(|e| format!("installing {path}: {e}"))
            }
        }
    }

    fn write_file(&self, f: &FileState) -> Result<(), String> {
        let p = Path::new(&f.path);
        let want = files::Observed {
            sha256: f.sha256.clone(),
            mode: f.mode,
            owner: Owner { uid: f.uid, gid: f.gid },
        };
        if self
            .observer
            .observe(p)
            .map_err(|e| format!("{}: {e}", f.path))?
            .as_ref()
            == Some(&want)
        {
            return Ok(());
        }
        let content = self.content.get(&f.sha256)?;
        files::write_atomic(p, &content, f.mode, want.owner).map_err(|e| format!("writing {}: {e}", f.path))
    }

    /// Writes the target's files; removes files the previous version managed
    /// and the target does not.
    fn write_files(&self, target: &Installed, previous: Option<&Installed>) -> Result<(), String> {
        for f in &target.files {
            self.write_file(f)?;
        }
        for f in previous.map(|p| p.files.as_slice()).unwrap_or_default() {
            if target.file(&f.path).is_none() {
                files::remove_if_exists(Path::new(&f.path)).map_err(|e| format!("removing {}: {e}", f.path))?;
            }
        }
        Ok(())
    }

    fn unit_file<'a>(&self, i: &'a Installed) -> Option<&'a FileState> {
        decide::unit_file(i, &self.cfg.unit_dir)
    }

    /// daemon-reload when the unit file changed, restart when anything did.
    fn restart(&self, target: &Installed, previous: Option<&Installed>, force: bool) -> Result<(), String> {
        let Some(unit) = &target.unit else { return Ok(()) };
        let unit_before = previous.and_then(|p| self.unit_file(p));
        let unit_now = self.unit_file(target);
        if unit_now != unit_before || force {
            systemd::daemon_reload()?;
        }
        if unit_now.is_some() && unit_before.is_none() {
            systemd::enable(unit)?;
        }
        let changed = force
            || previous
                .is_none_or(|p| p.artifact != target.artifact || p.files != target.files || p.unit != target.unit);
        if changed && target.restart_on_change {
            systemd::restart(unit)?;
        }
        Ok(())
    }

    /// Puts the node back as it was before the change.
    fn rollback(&self, ch: &Change) -> Result<(), String> {
        let (Some(staged), prev) = (ch.staged.as_ref(), ch.previous.as_ref()) else {
            return Ok(()); // nothing was staged, so nothing was touched
        };
        for undo in decide::rollback_plan(ch, &self.cfg.unit_dir) {
            match undo {
                Undo::RestorePriorArtifact(s) => self.restore_prior_artifact(&s, &ch.prior)?,
                Undo::ApplyArtifact(p) => self.apply_artifact(&p)?,
                Undo::RestoreFile(before) => self.write_file(&before)?,
                Undo::RemoveFile(path) => {
                    files::remove_if_exists(Path::new(&path)).map_err(|e| format!("removing {path}: {e}"))?
                }
                Undo::WriteFiles => {
                    if let Some(p) = prev {
                        self.write_files(p, None)?;
                    }
                }
                Undo::RestartPrevious => {
                    if let Some(p) = prev {
                        self.restart(p, Some(staged), true)?;
                    }
                }
                Undo::ReloadAndStop(unit) => {
                    systemd::daemon_reload()?;
                    systemd::stop(&unit)?;
                }
                Undo::ReloadAndRestart(unit) => {
                    systemd::daemon_reload()?;
                    systemd::restart(&unit)?;
                }
            }
        }
        Ok(())
    }

    fn restore_prior_artifact(&self, a: &ArtifactState, prior: &Prior) -> Result<(), String> {
        match a {
            ArtifactState::Package { manager, package, .. } => {
                let pm = self.pm(*manager);
                match prior.packages.get(package) {
                    Some(None) => {
                        if pm.installed_version(package)?.is_some() {
                            pm.remove(package)?;
                        }
                        Ok(())
                    }
                    Some(Some(v)) => {
                        if pm.installed_version(package)?.as_deref() != Some(v.as_str()) {
                            pm.install_repo(package, v)
                                .map_err(|e| format!("putting {package} back at {v} (its version before): {e}"))?;
                        }
                        Ok(())
                    }
                    None => Ok(()),
                }
            }
            ArtifactState::Archive { install_dir, .. } => {
                let link = archive::current_link(Path::new(install_dir));
                match prior.links.get(&*link.to_string_lossy()) {
                    Some(Some(t)) => files::switch_symlink(&link, t).map_err(|e| format!("{}: {e}", link.display())),
                    Some(None) => files::remove_if_exists(&link).map_err(|e| format!("{}: {e}", link.display())),
                    None => Ok(()),
                }
            }
            ArtifactState::File { path, .. } => match prior.files.get(path) {
                Some(Some(before)) => self.write_file(before),
                Some(None) => files::remove_if_exists(Path::new(path)).map_err(|e| format!("removing {path}: {e}")),
                None => Ok(()),
            },
        }
    }

    /// What differs on the node from an installed version.
    fn drift(&self, i: &Installed) -> Vec<String> {
        let mut out = Vec::new();
        match &i.artifact {
            Some(ArtifactState::Package {
                manager,
                package,
                version,
                ..
            }) => match self.pm(*manager).installed_version(package) {
                Ok(Some(v)) if &v == version => {}
                Ok(v) => out.push(format!(
                    "package {package} is at {}, not {version}",
                    v.as_deref().unwrap_or("nothing (not installed)")
                )),
                Err(e) => out.push(e),
            },
            Some(ArtifactState::Archive {
                install_dir,
                dir,
                manifest,
                ..
            }) => {
                let link = archive::current_link(Path::new(install_dir));
                if std::fs::read_link(&link).ok().as_deref() != Some(Path::new(dir)) {
                    out.push(format!("{} does not point at {dir}", link.display()));
                }
                out.extend(archive::check(Path::new(dir), manifest));
            }
            Some(ArtifactState::File { path, sha256, mode }) => match self.observer.observe(Path::new(path)) {
                Ok(Some(o)) if &o.sha256 == sha256 && o.mode == *mode => {}
                Ok(Some(_)) => out.push(format!("{path} was changed")),
                Ok(None) => out.push(format!("{path} is missing")),
                Err(e) => out.push(format!("{path}: {e}")),
            },
            None => {}
        }
        for f in &i.files {
            match self.observer.observe(Path::new(&f.path)) {
                Ok(Some(o))
                    if o.sha256 == f.sha256 && o.mode == f.mode && o.owner == (Owner { uid: f.uid, gid: f.gid }) => {}
                Ok(Some(o)) if o.sha256 == f.sha256 => out.push(format!("{} has other mode or owner", f.path)),
                Ok(Some(_)) => out.push(format!("{} was edited", f.path)),
                Ok(None) => out.push(format!("{} is missing", f.path)),
                Err(e) => out.push(format!("{}: {e}", f.path)),
            }
        }
        out
    }

    /// Puts the installed version back where the node drifted from it.
    fn check_drift(&mut self, name: &str, d: &DesiredComponent, at_target: bool) {
        let Some(installed) = self.records.get(name).and_then(|r| r.installed.as_ref()) else {
            return;
        };
        let found = self.drift(installed);
        if found.is_empty() {
            return;
        }
        let inst = installed.clone();
        let what = found.join("; ");
        self.agent.metrics.component_drift.inc();
        self.event(
            "Warning",
            "ComponentDrift",
            format!("component {name}: {what}; restoring version {}", inst.version),
        );
        tracing::warn!(component = %name, drift = %what, "component drifted; restoring");
        let repaired = inst
            .artifact
            .as_ref()
            .map_or(Ok(()), |a| self.apply_artifact(a))
            .and_then(|()| self.write_files(&inst, None))
            .and_then(|()| self.restart(&inst, Some(&inst), true));
        match repaired {
            Ok(()) => {}
            Err(e) if at_target => {
                // Repair from the cache failed (say the artifact is gone): go
                // through a whole change of the same spec.
                tracing::warn!(component = %name, error = %e, "repair failed; running a full change");
                self.start(name, d.clone(), inst.spec_hash.clone(), "drift");
            }
            Err(e) => {
                if let Some(r) = self.records.get_mut(name) {
                    r.last_error = format!("restoring after drift: {e}");
                    let r = r.clone();
                    let _ = self.save(&r);
                }
            }
        }
    }

    /// Drops cached artifacts and archive versions no record needs.
    fn gc(&self) {
        let mut keep: Vec<&str> = Vec::new();
        let mut contents: Vec<&str> = Vec::new();
        let mut dirs: Vec<&Path> = Vec::new();
        let mut install_dirs: Vec<PathBuf> = Vec::new();
        for r in self.records.values() {
            for i in r.versions() {
                keep.extend(machine::artifact_sha(i));
                dirs.extend(machine::archive_dir(i));
                contents.extend(i.files.iter().map(|f| f.sha256.as_str()));
                if let Some(ArtifactState::Archive { install_dir, .. }) = &i.artifact {
                    install_dirs.push(PathBuf::from(install_dir));
                }
            }
            if let Some(c) = &r.change {
                contents.extend(c.prior.files.values().flatten().map(|f| f.sha256.as_str()));
                keep.extend(c.target.spec.as_ref().and_then(artifact_url).map(|(_, sha, _)| sha));
            }
        }
        self.cache.retain(&keep);
        self.content.retain(&contents);
        install_dirs.sort();
        install_dirs.dedup();
        for d in install_dirs {
            let Ok(rd) = std::fs::read_dir(archive::versions_dir(&d)) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                if !dirs.contains(&p.as_path()) {
                    let _ = std::fs::remove_dir_all(&p);
                }
            }
        }
    }
}

fn staged(ch: &Change) -> Result<&Installed, String> {
    ch.staged
        .as_ref()
        .ok_or_else(|| "the change was not staged".to_string())
}

/// The URL and hash of a downloaded artifact, if the spec has one.
fn artifact_url(spec: &ComponentSpec) -> Option<(&str, &str, u64)> {
    let a = spec.artifact.as_ref()?;
    fn pick(p: &nodekeeper_proto::v1::PackageArtifact) -> Option<(&str, &str, u64)> {
        (!p.url.is_empty()).then_some((p.url.as_str(), p.sha256.as_str(), p.size))
    }
    a.deb
        .as_ref()
        .and_then(pick)
        .or_else(|| a.rpm.as_ref().and_then(pick))
        .or_else(|| a.archive.as_ref().map(|x| (x.url.as_str(), x.sha256.as_str(), x.size)))
        .or_else(|| a.file.as_ref().map(|x| (x.url.as_str(), x.sha256.as_str(), x.size)))
}
