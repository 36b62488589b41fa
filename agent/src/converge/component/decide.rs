//! The engine's decisions, as pure functions of records, specs and step
//! results: what to do with a component at a reconcile ([`plan`]), what
//! follows a step's result ([`after_step`]: next phase, retry time, stay,
//! roll back or fail, with the events and the metric to emit), and what a
//! rollback does ([`rollback_plan`]). No I/O here: the engine in `mod.rs`
//! only executes what these return, and they are tested exhaustively below.

use std::path::Path;

use super::machine::{ArtifactState, Change, FileState, Installed, Phase, Record, same_slot};
use nodekeeper_proto::component::phase;

/// What a reconcile does with one component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// A change is in flight: drive it on.
    Resume,
    /// The node should be at the installed version: check it for drift.
    /// `at_target`: the installed version is the desired spec (a failed
    /// spec keeps the version it rolled back to, which is repaired too).
    CheckDrift { at_target: bool },
    /// Waiting to retry a spec whose preparation failed: keep what is
    /// installed intact meanwhile.
    WaitForRetry,
    /// Nothing to do (a spec that failed on a node with nothing installed).
    Skip,
    /// Start a change to the desired spec (after checking it once more).
    Start,
}

/// What to do with `rec` for a desired spec hashing to `spec_hash`, at Unix
/// time `now`.
pub fn plan(rec: &Record, spec_hash: &str, now: u64) -> Plan {
    if rec.change.is_some() {
        return Plan::Resume;
    }
    let at_target = rec.installed.as_ref().is_some_and(|i| i.spec_hash == spec_hash);
    let failed = rec.failed_hash == spec_hash;
    if at_target || (failed && rec.installed.is_some()) {
        return Plan::CheckDrift { at_target };
    }
    if failed {
        return Plan::Skip;
    }
    if rec.retry_hash == spec_hash && now < rec.retry_at {
        return Plan::WaitForRetry;
    }
    Plan::Start
}

/// An event to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emit {
    pub severity: &'static str,
    pub reason: &'static str,
    pub message: String,
}

/// What the engine does after a step: the record is already updated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    pub events: Vec<Emit>,
    /// `nodekeeper_agent_component_changes_total{result}` to count, if the
    /// change ended.
    pub result: Option<&'static str>,
}

/// The clock and the retry delay, given to [`after_step`] so it stays pure.
#[derive(Debug, Clone)]
pub struct Now {
    pub rfc3339: String,
    pub unix: u64,
    /// Seconds to wait before retrying a failed preparation (the jittered
    /// backoff for the record's attempt count, plus one interval).
    pub retry_wait: u64,
}

/// Why a step failed. A refusal is the node's own artifact policy saying no
/// (no signature, one that does not verify, a URL outside
/// `converge.allowedArtifactUrls`): reported with the reason
/// [`ARTIFACT_REFUSED`](nodekeeper_proto::component::ARTIFACT_REFUSED) so
/// the hub audits it; anything else is an ordinary failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepError {
    Failed(String),
    Refused(String),
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepError::Failed(m) | StepError::Refused(m) => f.write_str(m),
        }
    }
}

impl From<String> for StepError {
    fn from(m: String) -> StepError {
        StepError::Failed(m)
    }
}

impl From<&str> for StepError {
    fn from(m: &str) -> StepError {
        StepError::Failed(m.to_string())
    }
}

/// Moves `rec` on after step `ch.phase` of change `ch` ended with `result`.
pub fn after_step(name: &str, rec: &mut Record, mut ch: Change, result: Result<(), StepError>, now: &Now) -> Effects {
    let ph = ch.phase;
    let mut fx = Effects::default();
    let mut emit = |severity, reason, message: String| {
        fx.events.push(Emit {
            severity,
            reason,
            message,
        })
    };
    match result {
        Ok(()) if ph == Phase::RollingBack => {
            let to = ch
                .previous
                .as_ref()
                .map_or("its state before nodekeeper", |p| p.version.as_str());
            emit(
                "Warning",
                "ComponentRolledBack",
                format!("component {name}: {}; rolled back to {to}", ch.error),
            );
            fx.result = Some("rolled_back");
            give_up(rec, ch.previous, ch.target_hash, ch.error, now);
        }
        Ok(()) => match ph.next() {
            Some(next) => {
                if ph == Phase::Verifying {
                    // The artifact passed the node's policy.
                    rec.reason.clear();
                }
                ch.phase = next;
                rec.phase = next.name().into();
                rec.change = Some(ch);
            }
            None => {
                let staged = ch.staged.take();
                let version = staged.as_ref().map(|s| s.version.clone()).unwrap_or_default();
                if ch.reason == "update" {
                    emit(
                        "Info",
                        "ComponentUpdated",
                        format!("component {name} is at version {version}"),
                    );
                }
                fx.result = Some("done");
                rec.installed = staged;
                rec.phase = phase::DONE.into();
                rec.reported_generation = ch.target.generation;
                rec.last_error.clear();
                rec.reason.clear();
                rec.failed_hash.clear();
                rec.retry_hash.clear();
                rec.attempts = 0;
                rec.last_change_time = now.rfc3339.clone();
                rec.change = None;
            }
        },
        Err(e) => {
            let refused = matches!(e, StepError::Refused(_));
            let e = format!("{}: {e}", ph.name());
            if ph == Phase::RollingBack {
                let msg = format!("{}; rollback failed: {e}", ch.error);
                emit("Error", "ComponentRollbackFailed", format!("component {name}: {msg}"));
                fx.result = Some("failed");
                give_up(rec, ch.previous, ch.target_hash, msg, now);
            } else if !ph.touches_node() {
                fx.result = Some("failed");
                rec.attempts += 1;
                rec.retry_hash = ch.target_hash;
                rec.retry_at = now.unix + now.retry_wait;
                rec.phase = phase::FAILED.into();
                rec.last_error = format!("{e}; nothing on the node was changed");
                rec.reason = if refused {
                    nodekeeper_proto::component::ARTIFACT_REFUSED.into()
                } else {
                    String::new()
                };
                emit(
                    "Warning",
                    "ComponentChangeFailed",
                    format!("component {name}: {}", rec.last_error),
                );
                rec.change = None;
            } else if ph == Phase::HealthCheck && ch.target.spec.as_ref().is_some_and(|s| s.on_health_failure == "stay")
            {
                fx.result = Some("failed");
                emit(
                    "Warning",
                    "ComponentUnhealthy",
                    format!("component {name}: {e}; staying at the new version (onHealthFailure: stay)"),
                );
                give_up(rec, ch.staged, ch.target_hash, e, now);
            } else {
                ch.error = e;
                ch.phase = Phase::RollingBack;
                rec.phase = Phase::RollingBack.name().into();
                rec.change = Some(ch);
            }
        }
    }
    fx
}

/// Ends a change as Failed with the node at `installed`; the spec hashing
/// to `target_hash` is not tried again until it changes.
fn give_up(rec: &mut Record, installed: Option<Installed>, target_hash: String, error: String, now: &Now) {
    rec.installed = installed;
    rec.failed_hash = target_hash;
    rec.phase = phase::FAILED.into();
    rec.last_error = error;
    rec.reason.clear();
    rec.last_change_time = now.rfc3339.clone();
    rec.change = None;
}

/// One action of a rollback, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Undo {
    /// Put back what the node had before nodekeeper managed this artifact's
    /// slot (a package's prior version or none, a link's prior target).
    RestorePriorArtifact(ArtifactState),
    /// Install the previous version's artifact again.
    ApplyArtifact(ArtifactState),
    /// Write back a file as it was before nodekeeper managed it.
    RestoreFile(FileState),
    /// Remove a file nodekeeper created.
    RemoveFile(String),
    /// Write the previous version's files.
    WriteFiles,
    /// The previous version has a unit: reload and restart it.
    RestartPrevious,
    /// The change added a unit the node did not have: reload, stop it.
    ReloadAndStop(String),
    /// The change touched a unit that was there before: reload, restart it.
    ReloadAndRestart(String),
}

/// What rolling `ch` back does, in order; `unit_dir` is where unit files go.
pub fn rollback_plan(ch: &Change, unit_dir: &Path) -> Vec<Undo> {
    let mut plan = Vec::new();
    let Some(staged) = ch.staged.as_ref() else {
        return plan; // nothing was staged, so nothing was touched
    };
    let prev = ch.previous.as_ref();
    let prev_artifact = prev.and_then(|p| p.artifact.as_ref());
    if let Some(s) = &staged.artifact
        && !prev_artifact.is_some_and(|p| same_slot(p, s))
    {
        plan.push(Undo::RestorePriorArtifact(s.clone()));
    }
    if let Some(p) = prev_artifact {
        plan.push(Undo::ApplyArtifact(p.clone()));
    }
    for f in &staged.files {
        if prev.and_then(|p| p.file(&f.path)).is_some() {
            continue;
        }
        match ch.prior.files.get(&f.path) {
            Some(Some(before)) => plan.push(Undo::RestoreFile(before.clone())),
            Some(None) => plan.push(Undo::RemoveFile(f.path.clone())),
            None => {}
        }
    }
    if prev.is_some() {
        plan.push(Undo::WriteFiles);
    }
    match (prev, &staged.unit) {
        (Some(p), _) if p.unit.is_some() => plan.push(Undo::RestartPrevious),
        (_, Some(unit)) => {
            let created =
                unit_file(staged, unit_dir).is_some_and(|f| matches!(ch.prior.files.get(&f.path), Some(None)));
            plan.push(if created {
                Undo::ReloadAndStop(unit.clone())
            } else {
                Undo::ReloadAndRestart(unit.clone())
            });
        }
        _ => {}
    }
    plan
}

/// The unit file a version ships, if any.
pub fn unit_file<'a>(i: &'a Installed, unit_dir: &Path) -> Option<&'a FileState> {
    let unit = i.unit.as_ref()?;
    i.file(&unit_dir.join(unit).to_string_lossy())
}

#[cfg(test)]
mod tests {
    use super::super::machine::{Manager, Prior};
    use super::*;
    use nodekeeper_proto::v1::{ComponentSpec, DesiredComponent};

    fn installed(version: &str, hash: &str) -> Installed {
        Installed {
            version: version.into(),
            generation: 1,
            spec_hash: hash.into(),
            artifact: None,
            files: vec![],
            unit: None,
            restart_on_change: true,
        }
    }

    fn change(phase: Phase, previous: Option<Installed>, staged: Option<Installed>) -> Change {
        Change {
            target: DesiredComponent {
                name: "c".into(),
                generation: 2,
                spec: Some(ComponentSpec {
                    version: "2".into(),
                    ..Default::default()
                }),
            },
            target_hash: "h2".into(),
            reason: "update".into(),
            phase,
            staged,
            previous,
            prior: Prior::default(),
            error: String::new(),
        }
    }

    fn now() -> Now {
        Now {
            rfc3339: "2026-01-01T00:00:00Z".into(),
            unix: 1000,
            retry_wait: 60,
        }
    }

    #[test]
    fn plan_covers_every_record_state() {
        let mut rec = Record::new("c");
        assert_eq!(plan(&rec, "h", 0), Plan::Start, "nothing installed");
        rec.installed = Some(installed("1", "h"));
        assert_eq!(plan(&rec, "h", 0), Plan::CheckDrift { at_target: true });
        assert_eq!(plan(&rec, "h2", 0), Plan::Start, "a new spec");
        rec.failed_hash = "h2".into();
        assert_eq!(
            plan(&rec, "h2", 0),
            Plan::CheckDrift { at_target: false },
            "failed, rolled back"
        );
        rec.installed = None;
        assert_eq!(plan(&rec, "h2", 0), Plan::Skip, "failed with nothing installed");
        rec.failed_hash.clear();
        rec.retry_hash = "h2".into();
        rec.retry_at = 100;
        assert_eq!(plan(&rec, "h2", 99), Plan::WaitForRetry);
        assert_eq!(plan(&rec, "h2", 100), Plan::Start, "retry time reached");
        assert_eq!(plan(&rec, "h3", 99), Plan::Start, "another spec does not wait");
        rec.change = Some(change(Phase::Installing, None, None));
        assert_eq!(plan(&rec, "h2", 0), Plan::Resume, "a change in flight goes first");
    }

    #[test]
    fn a_successful_step_advances_and_the_last_one_finishes() {
        for (i, ph) in Phase::ALL.iter().enumerate().filter(|(_, p)| **p != Phase::RollingBack) {
            let mut rec = Record::new("c");
            let fx = after_step(
                "c",
                &mut rec,
                change(*ph, None, Some(installed("2", "h2"))),
                Ok(()),
                &now(),
            );
            match ph.next() {
                Some(next) => {
                    assert_eq!(rec.change.as_ref().map(|c| c.phase), Some(next), "{i}");
                    assert_eq!(rec.phase, next.name());
                    assert_eq!(fx, Effects::default());
                }
                None => {
                    assert!(rec.change.is_none());
                    assert_eq!(rec.phase, phase::DONE);
                    assert_eq!(rec.installed.as_ref().map(|i| i.version.as_str()), Some("2"));
                    assert_eq!(fx.result, Some("done"));
                    assert_eq!(fx.events[0].reason, "ComponentUpdated");
                }
            }
        }
        // A drift repair finishes without an update event.
        let mut rec = Record::new("c");
        let mut ch = change(Phase::HealthCheck, None, Some(installed("2", "h2")));
        ch.reason = "drift".into();
        let fx = after_step("c", &mut rec, ch, Ok(()), &now());
        assert!(fx.events.is_empty() && fx.result == Some("done"));
    }

    #[test]
    fn a_failed_step_retries_rolls_back_stays_or_fails_by_phase() {
        for ph in Phase::ALL {
            let mut rec = Record::new("c");
            rec.attempts = 2;
            let prev = Some(installed("1", "h1"));
            let fx = after_step(
                "c",
                &mut rec,
                change(*ph, prev.clone(), Some(installed("2", "h2"))),
                Err("boom".into()),
                &now(),
            );
            match ph {
                Phase::Downloading | Phase::Verifying | Phase::Staging => {
                    assert!(rec.change.is_none());
                    assert_eq!((rec.retry_hash.as_str(), rec.retry_at, rec.attempts), ("h2", 1060, 3));
                    assert!(rec.last_error.contains("nothing on the node was changed"));
                    assert_eq!(fx.events[0].reason, "ComponentChangeFailed");
                    assert!(rec.failed_hash.is_empty(), "retried, not given up");
                }
                Phase::RollingBack => {
                    assert!(rec.change.is_none());
                    assert_eq!(rec.failed_hash, "h2");
                    assert_eq!(rec.installed, prev);
                    assert_eq!(fx.events[0].reason, "ComponentRollbackFailed");
                    assert_eq!(fx.result, Some("failed"));
                }
                _ => {
                    let ch = rec.change.as_ref().expect("rolling back");
                    assert_eq!(ch.phase, Phase::RollingBack);
                    assert!(ch.error.contains(ph.name()) && ch.error.contains("boom"));
                    assert!(fx.events.is_empty() && fx.result.is_none());
                }
            }
        }
        // A refusal by the artifact policy is a failure like any other
        // preparation failure, marked for the hub's audit log; the mark
        // stays through the retry's first step and goes once the artifact
        // passes.
        let mut rec = Record::new("c");
        let refusal = StepError::Refused("artifact x has no signature".into());
        after_step(
            "c",
            &mut rec,
            change(Phase::Downloading, None, None),
            Err(refusal),
            &now(),
        );
        assert_eq!(
            (rec.phase.as_str(), rec.reason.as_str()),
            (phase::FAILED, nodekeeper_proto::component::ARTIFACT_REFUSED)
        );
        assert!(rec.last_error.contains("has no signature"), "{}", rec.last_error);
        after_step("c", &mut rec, change(Phase::Downloading, None, None), Ok(()), &now());
        assert_eq!(rec.reason, nodekeeper_proto::component::ARTIFACT_REFUSED);
        after_step("c", &mut rec, change(Phase::Verifying, None, None), Ok(()), &now());
        assert_eq!(rec.reason, "");
        // An ordinary failure is not a refusal.
        after_step(
            "c",
            &mut rec,
            change(Phase::Verifying, None, None),
            Err("sha256 mismatch".into()),
            &now(),
        );
        assert_eq!((rec.phase.as_str(), rec.reason.as_str()), (phase::FAILED, ""));

        // onHealthFailure: stay keeps the new version.
        let mut rec = Record::new("c");
        let mut ch = change(
            Phase::HealthCheck,
            Some(installed("1", "h1")),
            Some(installed("2", "h2")),
        );
        if let Some(s) = ch.target.spec.as_mut() {
            s.on_health_failure = "stay".into();
        }
        let fx = after_step("c", &mut rec, ch, Err("unhealthy".into()), &now());
        assert_eq!(rec.installed.as_ref().map(|i| i.version.as_str()), Some("2"));
        assert_eq!(rec.failed_hash, "h2");
        assert_eq!(fx.events[0].reason, "ComponentUnhealthy");
        // A finished rollback records the previous version and the error.
        let mut rec = Record::new("c");
        let mut ch = change(
            Phase::RollingBack,
            Some(installed("1", "h1")),
            Some(installed("2", "h2")),
        );
        ch.error = "HealthCheck: down".into();
        let fx = after_step("c", &mut rec, ch, Ok(()), &now());
        assert_eq!(rec.installed.as_ref().map(|i| i.version.as_str()), Some("1"));
        assert_eq!(
            (rec.phase.as_str(), rec.last_error.as_str()),
            (phase::FAILED, "HealthCheck: down")
        );
        assert!(fx.events[0].message.contains("rolled back to 1"));
        assert_eq!(fx.result, Some("rolled_back"));
    }

    fn file(path: &str) -> FileState {
        FileState {
            path: path.into(),
            sha256: "s".into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        }
    }

    fn pkg(name: &str, v: &str) -> ArtifactState {
        ArtifactState::Package {
            manager: Manager::Deb,
            package: name.into(),
            version: v.into(),
            sha256: None,
        }
    }

    #[test]
    fn rollback_plans() {
        let dir = Path::new("/etc/systemd/system");
        // Nothing staged: nothing to undo.
        assert!(rollback_plan(&change(Phase::RollingBack, None, None), dir).is_empty());
        // A first install of a package with a new config file and a new unit.
        let mut staged = installed("2", "h2");
        staged.artifact = Some(pkg("kubelet", "2"));
        staged.files = vec![file("/etc/k.conf"), file("/etc/systemd/system/k.service")];
        staged.unit = Some("k.service".into());
        let mut ch = change(Phase::RollingBack, None, Some(staged.clone()));
        ch.prior.files.insert("/etc/k.conf".into(), Some(file("/etc/k.conf")));
        ch.prior.files.insert("/etc/systemd/system/k.service".into(), None);
        assert_eq!(
            rollback_plan(&ch, dir),
            vec![
                Undo::RestorePriorArtifact(pkg("kubelet", "2")),
                Undo::RestoreFile(file("/etc/k.conf")),
                Undo::RemoveFile("/etc/systemd/system/k.service".into()),
                Undo::ReloadAndStop("k.service".into()),
            ]
        );
        // An upgrade of the same package and unit: the previous version back.
        let mut prev = installed("1", "h1");
        prev.artifact = Some(pkg("kubelet", "1"));
        prev.files = staged.files.clone();
        prev.unit = Some("k.service".into());
        let ch = change(Phase::RollingBack, Some(prev), Some(staged.clone()));
        assert_eq!(
            rollback_plan(&ch, dir),
            vec![
                Undo::ApplyArtifact(pkg("kubelet", "1")),
                Undo::WriteFiles,
                Undo::RestartPrevious
            ]
        );
        // Another package replaced the previous one: the new one's slot is
        // restored first; a unit that was there before is restarted.
        let mut prev = installed("1", "h1");
        prev.artifact = Some(pkg("old-kubelet", "1"));
        let mut ch = change(Phase::RollingBack, Some(prev), Some(staged));
        ch.prior.files.insert(
            "/etc/systemd/system/k.service".into(),
            Some(file("/etc/systemd/system/k.service")),
        );
        assert_eq!(
            rollback_plan(&ch, dir),
            vec![
                Undo::RestorePriorArtifact(pkg("kubelet", "2")),
                Undo::ApplyArtifact(pkg("old-kubelet", "1")),
                Undo::RestoreFile(file("/etc/systemd/system/k.service")),
                Undo::WriteFiles,
                Undo::ReloadAndRestart("k.service".into()),
            ]
        );
    }
}
