//! The state machine of one component change, persisted after every step:
//!
//! ```text
//! Downloading → Verifying → Staging → Installing → WritingFiles → Restarting → HealthCheck → Done
//!      └──────────┴───────────┴─→ Failed (nothing on the node was touched)
//!                                      └────────────┴──────────────┴────────────┴─→ RollingBack → Failed
//! ```
//!
//! Steps up to Staging only prepare (download, verify, render, unpack beside
//! the running version); from Installing on the node changes. Every step is
//! idempotent, so an agent killed at any point resumes the recorded step
//! after a restart and the node ends at the old or the new version. What the
//! node looked like before the change (the previous version's state, and for
//! paths nodekeeper did not manage before, their original content) is
//! recorded before anything is touched, so a rollback needs no network.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nodekeeper_proto::component::phase;
use nodekeeper_proto::v1::DesiredComponent;
use serde::{Deserialize, Serialize};

use super::archive;

/// A step of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Downloading,
    Verifying,
    Staging,
    Installing,
    WritingFiles,
    Restarting,
    HealthCheck,
    RollingBack,
}

impl Phase {
    /// Every phase, in order (the crash test walks them).
    pub const ALL: &[Phase] = &[
        Phase::Downloading,
        Phase::Verifying,
        Phase::Staging,
        Phase::Installing,
        Phase::WritingFiles,
        Phase::Restarting,
        Phase::HealthCheck,
        Phase::RollingBack,
    ];

    /// The name reported to the hub.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Downloading => phase::DOWNLOADING,
            Phase::Verifying => phase::VERIFYING,
            Phase::Staging => phase::STAGING,
            Phase::Installing => phase::INSTALLING,
            Phase::WritingFiles => phase::WRITING_FILES,
            Phase::Restarting => phase::RESTARTING,
            Phase::HealthCheck => phase::HEALTH_CHECK,
            Phase::RollingBack => phase::ROLLING_BACK,
        }
    }

    /// The step after this one on the way forward (`None`: done).
    pub fn next(self) -> Option<Phase> {
        match self {
            Phase::Downloading => Some(Phase::Verifying),
            Phase::Verifying => Some(Phase::Staging),
            Phase::Staging => Some(Phase::Installing),
            Phase::Installing => Some(Phase::WritingFiles),
            Phase::WritingFiles => Some(Phase::Restarting),
            Phase::Restarting => Some(Phase::HealthCheck),
            Phase::HealthCheck | Phase::RollingBack => None,
        }
    }

    /// Whether the node may have been changed once this step started.
    pub fn touches_node(self) -> bool {
        !matches!(self, Phase::Downloading | Phase::Verifying | Phase::Staging)
    }
}

/// Which package manager a package belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Manager {
    Deb,
    Rpm,
}

/// The artifact of an installed version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum ArtifactState {
    /// A package; `sha256` names the verified package file in the cache
    /// (none when it came from the host's repositories).
    Package {
        manager: Manager,
        package: String,
        version: String,
        sha256: Option<String>,
    },
    /// An archive unpacked in `dir`, made current by `<installDir>/current`.
    Archive {
        install_dir: String,
        dir: String,
        sha256: String,
        strip: u32,
        manifest: Vec<archive::Entry>,
    },
    /// A single file.
    File { path: String, sha256: String, mode: u32 },
}

/// A managed file as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileState {
    pub path: String,
    /// The content, kept in the content store under this hash.
    pub sha256: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Everything a version of a component consists of on the node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Installed {
    pub version: String,
    pub generation: i64,
    /// Hash of the desired spec it came from (with the node's parameters).
    pub spec_hash: String,
    pub artifact: Option<ArtifactState>,
    pub files: Vec<FileState>,
    /// The component's unit, if any.
    pub unit: Option<String>,
    pub restart_on_change: bool,
}

impl Installed {
    pub fn file(&self, path: &str) -> Option<&FileState> {
        self.files.iter().find(|f| f.path == path)
    }
}

/// What the node had before nodekeeper managed a path or package: restored
/// when the first change that touched it is rolled back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Prior {
    /// Path → its content (kept in the content store), mode and owner
    /// (`None`: did not exist).
    pub files: BTreeMap<String, Option<FileState>>,
    /// Package name → the version installed before (`None`: not installed).
    pub packages: BTreeMap<String, Option<String>>,
    /// Archive `current` link → its target before (`None`: no link).
    pub links: BTreeMap<String, Option<PathBuf>>,
}

/// One change in flight.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Change {
    /// What the node should run (the spec with the node's parameters).
    pub target: DesiredComponent,
    pub target_hash: String,
    /// Why: `update` (a new spec) or `drift` (restoring the same spec).
    pub reason: String,
    pub phase: Phase,
    /// The target as it will be on the node, known from Staging on.
    pub staged: Option<Installed>,
    /// The version the change started from.
    pub previous: Option<Installed>,
    pub prior: Prior,
    /// Why the change is being rolled back.
    pub error: String,
}

/// Everything the agent keeps about one component (one store record).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    /// The version on the node (the last one that passed, or the one rolled
    /// back to).
    pub installed: Option<Installed>,
    pub change: Option<Change>,
    /// Reported phase (a change's step, or Done / Failed).
    pub phase: String,
    pub last_error: String,
    /// `ArtifactRefused` while the last failure was the artifact policy's
    /// refusal (kept through a retry, like `last_error`); empty otherwise.
    #[serde(default)]
    pub reason: String,
    pub last_change_time: String,
    /// A spec whose change touched the node and failed: not retried until the
    /// spec changes (retrying would restart a failing service over and over).
    pub failed_hash: String,
    /// A spec whose preparation failed (download, verify, render): retried
    /// after `retry_at` (Unix seconds) with growing backoff.
    pub retry_hash: String,
    pub retry_at: u64,
    pub attempts: u32,
    /// The desired generation last reported for the installed version: a
    /// new revision with the same content (a rollout's undo) is reported
    /// done without a change.
    #[serde(default)]
    pub reported_generation: i64,
}

impl Record {
    pub fn new(name: &str) -> Record {
        Record {
            name: name.to_string(),
            phase: phase::PENDING.into(),
            ..Default::default()
        }
    }

    /// Every version the record refers to: installed, and a change's
    /// staged and previous ones.
    pub fn versions(&self) -> impl Iterator<Item = &Installed> {
        self.installed.iter().chain(
            self.change
                .iter()
                .flat_map(|c| c.staged.iter().chain(c.previous.iter())),
        )
    }

    /// The version the node runs now, for reports.
    pub fn observed_version(&self) -> String {
        self.installed.as_ref().map(|i| i.version.clone()).unwrap_or_default()
    }
}

/// Hash of a desired component: equal hashes need no change.
pub fn spec_hash(d: &DesiredComponent) -> String {
    let v = serde_json::to_vec(&d.spec).unwrap_or_default();
    super::files::sha256_bytes(&v)
}

/// The artifact identity two versions share when one can replace the other
/// in place (same package, same install directory, same path).
pub fn same_slot(a: &ArtifactState, b: &ArtifactState) -> bool {
    match (a, b) {
        (
            ArtifactState::Package {
                manager: m1,
                package: p1,
                ..
            },
            ArtifactState::Package {
                manager: m2,
                package: p2,
                ..
            },
        ) => m1 == m2 && p1 == p2,
        (ArtifactState::Archive { install_dir: a, .. }, ArtifactState::Archive { install_dir: b, .. }) => a == b,
        (ArtifactState::File { path: a, .. }, ArtifactState::File { path: b, .. }) => a == b,
        _ => false,
    }
}

/// The archive directories and cached artifacts a version needs.
pub fn artifact_sha(i: &Installed) -> Option<&str> {
    match i.artifact.as_ref()? {
        ArtifactState::Package { sha256, .. } => sha256.as_deref(),
        ArtifactState::Archive { sha256, .. } | ArtifactState::File { sha256, .. } => Some(sha256),
    }
}

/// The directory of an archive version, if the artifact is an archive.
pub fn archive_dir(i: &Installed) -> Option<&Path> {
    match i.artifact.as_ref()? {
        ArtifactState::Archive { dir, .. } => Some(Path::new(dir)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_run_in_order_and_only_later_ones_touch_the_node() {
        let mut p = Phase::Downloading;
        let mut seen = vec![p];
        while let Some(n) = p.next() {
            seen.push(n);
            p = n;
        }
        assert_eq!(seen, &Phase::ALL[..7]);
        assert_eq!(Phase::RollingBack.next(), None);
        let touching: Vec<_> = Phase::ALL
            .iter()
            .filter(|p| p.touches_node())
            .map(|p| p.name())
            .collect();
        assert_eq!(
            touching,
            ["Installing", "WritingFiles", "Restarting", "HealthCheck", "RollingBack"]
        );
    }

    #[test]
    fn a_record_survives_its_json_form() {
        let mut r = Record::new("kubelet");
        r.installed = Some(Installed {
            version: "1.29.4".into(),
            generation: 3,
            spec_hash: "h".into(),
            artifact: Some(ArtifactState::Package {
                manager: Manager::Deb,
                package: "kubelet".into(),
                version: "1.29.4-1.1".into(),
                sha256: None,
            }),
            files: vec![],
            unit: Some("kubelet.service".into()),
            restart_on_change: true,
        });
        let back: Record = serde_json::from_slice(&serde_json::to_vec(&r).expect("json")).expect("parse");
        assert_eq!(back.installed, r.installed);
        assert_eq!(back.observed_version(), "1.29.4");
        // Every artifact kind survives it (an archive's manifest included).
        let mut i = r.installed.clone().expect("installed");
        i.artifact = Some(ArtifactState::Archive {
            install_dir: "/opt/x".into(),
            dir: "/opt/x/versions/1".into(),
            sha256: "a".repeat(64),
            strip: 1,
            manifest: vec![archive::Entry {
                path: "bin/x".into(),
                sha256: "b".repeat(64),
                size: 10,
                mtime_ns: 1_763_779_200_123_456_789,
            }],
        });
        r.change = Some(Change {
            target: DesiredComponent::default(),
            target_hash: "h".into(),
            reason: "update".into(),
            phase: Phase::Installing,
            staged: Some(i.clone()),
            previous: r.installed.clone(),
            prior: Prior::default(),
            error: String::new(),
        });
        let back: Record = serde_json::from_slice(&serde_json::to_vec(&r).expect("json")).expect("parse");
        assert_eq!(back.change.and_then(|c| c.staged), Some(i));
    }
}
