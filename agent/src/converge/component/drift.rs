//! Drift: a component already at its spec is checked every pass (package
//! version, archive link and files, binary, config files with mode and
//! owner) and put back with a `ComponentDrift` event; kept contents and
//! cached artifacts no record needs are collected.

use std::path::{Path, PathBuf};

use nodekeeper_proto::v1::DesiredComponent;

use super::files::Owner;
use super::machine::{self, ArtifactState, Installed};
use super::steps::artifact_url;
use super::{Engine, archive};

impl Engine {
    /// What differs on the node from an installed version.
    pub(super) fn drift(&self, i: &Installed) -> Vec<String> {
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
    pub(super) fn check_drift(&mut self, name: &str, d: &DesiredComponent, at_target: bool) {
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
    pub(super) fn gc(&self) {
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
