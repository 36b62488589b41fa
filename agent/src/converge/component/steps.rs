//! The executor of each step of a change (see [`super::machine`]): what
//! Downloading, Verifying, Staging, Installing, WritingFiles, Restarting,
//! HealthCheck and RollingBack do on the node. The decisions about which
//! step comes next live in [`super::decide`].

use std::path::{Path, PathBuf};

use nodekeeper_proto::component::{self as spec_rules};
use nodekeeper_proto::v1::{ComponentSpec, DesiredComponent};

use super::decide::{self, StepError, Undo};
use super::files::{self, Owner};
use super::machine::{self, ArtifactState, Change, FileState, Installed, Manager, Phase, Prior};
use super::package::{Dpkg, PackageManager, Rpm};
use super::{Engine, archive, health, signature, systemd};

impl Engine {
    /// Performs one step.
    pub(super) fn step(&self, ch: &mut Change) -> Result<(), StepError> {
        let spec = ch.target.spec.clone().unwrap_or_default();
        match ch.phase {
            Phase::Downloading => {
                if let Some((url, sha, size)) = artifact_url(&spec) {
                    if !signature::url_allowed(url, &self.cfg.allowed_artifact_urls) {
                        return Err(StepError::Refused(format!(
                            "artifact {url} is not under converge.allowedArtifactUrls ({}); nothing was downloaded or changed",
                            self.cfg.allowed_artifact_urls.join(", ")
                        )));
                    }
                    if self.cfg.require_signatures && artifact_signature(&spec).is_empty() {
                        return Err(StepError::Refused(format!(
                            "artifact {url} has no signature and converge.requireSignatures is set; nothing was changed"
                        )));
                    }
                    self.cache.fetch(url, sha, size)?;
                }
                Ok(())
            }
            Phase::Verifying => {
                if let Some((url, sha, _)) = artifact_url(&spec) {
                    let path = self.cache.verify(sha)?;
                    let sig = artifact_signature(&spec);
                    if !sig.is_empty() || self.cfg.require_signatures {
                        let keys: Vec<signature::Key> = self
                            .cfg
                            .trusted_keys
                            .iter()
                            .filter_map(|k| signature::parse_key(k).ok())
                            .collect();
                        signature::verify(&path, sig, &keys)
                            .map_err(|e| StepError::Refused(format!("artifact {url}: {e}; nothing was changed")))?;
                    }
                }
                Ok(())
            }
            Phase::Staging => {
                let staged = self.stage(&ch.target, &ch.target_hash, ch.previous.as_ref(), &mut ch.prior)?;
                ch.staged = Some(staged);
                Ok(())
            }
            Phase::Installing => match staged(ch)?.artifact.as_ref() {
                Some(a) => Ok(self.apply_artifact(a)?),
                None => Ok(()),
            },
            Phase::WritingFiles => Ok(self.write_files(staged(ch)?, ch.previous.as_ref())?),
            Phase::Restarting => Ok(self.restart(staged(ch)?, ch.previous.as_ref(), ch.reason == "drift")?),
            Phase::HealthCheck => match &spec.health {
                Some(h) => Ok(health::gate(h)?),
                None => Ok(()),
            },
            Phase::RollingBack => Ok(self.rollback(ch)?),
        }
    }

    pub(super) fn pm(&self, m: Manager) -> Box<dyn PackageManager> {
        match m {
            Manager::Deb => Box::new(Dpkg),
            Manager::Rpm => Box::new(Rpm {
                root: self.cfg.rpm_root.clone(),
            }),
        }
    }

    /// Renders files, identifies or unpacks the artifact, and records what
    /// the node has now where the change will write.
    pub(super) fn stage(
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
    pub(super) fn apply_artifact(&self, a: &ArtifactState) -> Result<(), String> {
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

    pub(super) fn write_file(&self, f: &FileState) -> Result<(), String> {
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
    pub(super) fn write_files(&self, target: &Installed, previous: Option<&Installed>) -> Result<(), String> {
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

    pub(super) fn unit_file<'a>(&self, i: &'a Installed) -> Option<&'a FileState> {
        decide::unit_file(i, &self.cfg.unit_dir)
    }

    /// daemon-reload when the unit file changed, restart when anything did.
    pub(super) fn restart(&self, target: &Installed, previous: Option<&Installed>, force: bool) -> Result<(), String> {
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
    pub(super) fn rollback(&self, ch: &Change) -> Result<(), String> {
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

    pub(super) fn restore_prior_artifact(&self, a: &ArtifactState, prior: &Prior) -> Result<(), String> {
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
}

pub(super) fn staged(ch: &Change) -> Result<&Installed, String> {
    ch.staged
        .as_ref()
        .ok_or_else(|| "the change was not staged".to_string())
}

/// The URL and hash of a downloaded artifact, if the spec has one.
/// The detached signature of the artifact's file (empty: none).
pub(super) fn artifact_signature(spec: &ComponentSpec) -> &str {
    let Some(a) = spec.artifact.as_ref() else { return "" };
    fn pkg(p: &Option<nodekeeper_proto::v1::PackageArtifact>) -> Option<&str> {
        p.as_ref().filter(|p| !p.url.is_empty()).map(|p| p.signature.as_str())
    }
    pkg(&a.deb)
        .or_else(|| pkg(&a.rpm))
        .or_else(|| a.archive.as_ref().map(|x| x.signature.as_str()))
        .or_else(|| a.file.as_ref().map(|x| x.signature.as_str()))
        .unwrap_or("")
}

pub(super) fn artifact_url(spec: &ComponentSpec) -> Option<(&str, &str, u64)> {
    let a = spec.artifact.as_ref()?;
    pub(super) fn pick(p: &nodekeeper_proto::v1::PackageArtifact) -> Option<(&str, &str, u64)> {
        (!p.url.is_empty()).then_some((p.url.as_str(), p.sha256.as_str(), p.size))
    }
    a.deb
        .as_ref()
        .and_then(pick)
        .or_else(|| a.rpm.as_ref().and_then(pick))
        .or_else(|| a.archive.as_ref().map(|x| (x.url.as_str(), x.sha256.as_str(), x.size)))
        .or_else(|| a.file.as_ref().map(|x| (x.url.as_str(), x.sha256.as_str(), x.size)))
}
