//! The Component resource's rules, shared by the hub (checked on apply) and
//! the agent (checked again on receipt): validation with field paths, the
//! template engine and its context, and the phases a change goes through.

use std::collections::BTreeMap;

use crate::resource::ResourceError;
use crate::v1::{
    Component, ComponentSpec, DesiredComponent, HealthCheck, ManagedFile, NodeFacts, NodeSet, PackageArtifact,
};

/// Phases of a component change on a node, in order. A change walks them
/// forward; a failure goes to `RollingBack` and ends in `Failed` (after
/// restoring the previous version) or stays where it failed with
/// `onHealthFailure: stay`.
pub mod phase {
    pub const PENDING: &str = "Pending";
    pub const DOWNLOADING: &str = "Downloading";
    pub const VERIFYING: &str = "Verifying";
    pub const STAGING: &str = "Staging";
    pub const INSTALLING: &str = "Installing";
    pub const WRITING_FILES: &str = "WritingFiles";
    pub const RESTARTING: &str = "Restarting";
    pub const HEALTH_CHECK: &str = "HealthCheck";
    pub const DONE: &str = "Done";
    pub const ROLLING_BACK: &str = "RollingBack";
    pub const FAILED: &str = "Failed";
    /// Reported once when a component no longer selects the node; the agent
    /// leaves what is installed in place (removal is an explicit act).
    pub const REMOVED: &str = "Removed";
}

/// `NodeComponent.reason` when the agent's artifact policy (signatures,
/// allowed URLs) refused an artifact before anything was touched: a
/// security event the hub puts in its audit log.
pub const ARTIFACT_REFUSED: &str = "ArtifactRefused";

/// `onHealthFailure` values.
pub const ON_HEALTH_FAILURE: &[&str] = &["rollback", "stay"];
/// `updateStrategy.type` values.
pub const UPDATE_STRATEGIES: &[&str] = &[ROLLING_UPDATE, ALL_AT_ONCE];
/// Batch by batch, NodeSet by NodeSet (the default).
pub const ROLLING_UPDATE: &str = "RollingUpdate";
/// Every selected node at once (still within the defender's budgets).
pub const ALL_AT_ONCE: &str = "AllAtOnce";

fn update_strategy(at: &str, u: &crate::v1::UpdateStrategy) -> Result<(), ResourceError> {
    if !u.r#type.is_empty() && !UPDATE_STRATEGIES.contains(&u.r#type.as_str()) {
        return Err(err(
            format!("{at}.type"),
            format!("{:?}: one of {}", u.r#type, UPDATE_STRATEGIES.join(", ")),
        ));
    }
    let Some(r) = &u.rolling_update else { return Ok(()) };
    let f = format!("{at}.rollingUpdate");
    if u.r#type == ALL_AT_ONCE {
        return Err(err(
            f,
            "rollingUpdate applies to type RollingUpdate only; remove it or change the type",
        ));
    }
    for (i, n) in r.node_set_order.iter().enumerate() {
        crate::validate::dns_subdomain(&format!("{f}.nodeSetOrder[{i}]"), n)?;
        if r.node_set_order[..i].contains(n) {
            return Err(err(format!("{f}.nodeSetOrder[{i}]"), format!("{n:?} is listed twice")));
        }
    }
    if !r.others.is_empty() && r.others != "include" && r.others != "exclude" {
        return Err(err(
            format!("{f}.others"),
            format!("{:?}: include or exclude", r.others),
        ));
    }
    crate::count::check(&format!("{f}.maxUnavailable"), &r.max_unavailable)?;
    if crate::count::Count::parse(&r.max_unavailable).is_ok_and(|c| c.of(u64::MAX) == 0) {
        return Err(err(
            format!("{f}.maxUnavailable"),
            "0 would never change a node; use spec.paused to hold a rollout",
        ));
    }
    crate::count::check(&format!("{f}.partition"), &r.partition)?;
    crate::count::check(&format!("{f}.failureThreshold"), &r.failure_threshold)?;
    if let Some(c) = &r.canary {
        crate::count::check(&format!("{f}.canary.nodes"), &c.nodes)?;
    }
    crate::window::check(&format!("{f}.windows"), &r.windows)
}

/// The part of a spec a revision is made of: everything but how and
/// whether it rolls out (`updateStrategy`, `paused`). Changing only those
/// starts no rollout, and agents never see them.
pub fn template(spec: &ComponentSpec) -> ComponentSpec {
    let mut t = spec.clone();
    t.update_strategy = None;
    t.paused = false;
    t
}

fn err(field: impl Into<String>, msg: impl Into<String>) -> ResourceError {
    ResourceError::new(field, msg)
}

/// Validates a Component spec; `at` is the path prefix (`spec`).
pub fn check(at: &str, spec: &ComponentSpec) -> Result<(), ResourceError> {
    if let Some(sel) = &spec.node_selector {
        crate::validate::selector(&format!("{at}.nodeSelector"), sel)?;
    }
    version(&format!("{at}.version"), &spec.version)?;
    if let Some(a) = &spec.artifact {
        let set = [a.deb.is_some(), a.rpm.is_some(), a.archive.is_some(), a.file.is_some()];
        if set.iter().filter(|s| **s).count() != 1 {
            return Err(err(
                format!("{at}.artifact"),
                "set exactly one of deb, rpm, archive, file (or leave artifact out for a component of files only)",
            ));
        }
        if let Some(p) = &a.deb {
            package(&format!("{at}.artifact.deb"), p)?;
        }
        if let Some(p) = &a.rpm {
            package(&format!("{at}.artifact.rpm"), p)?;
        }
        if let Some(ar) = &a.archive {
            let f = format!("{at}.artifact.archive");
            url(&format!("{f}.url"), &ar.url)?;
            sha256(&format!("{f}.sha256"), &ar.sha256)?;
            abs_path(&format!("{f}.installDir"), &ar.install_dir)?;
            if ar.strip_components > 16 {
                return Err(err(format!("{f}.stripComponents"), "at most 16"));
            }
        }
        if let Some(fa) = &a.file {
            let f = format!("{at}.artifact.file");
            url(&format!("{f}.url"), &fa.url)?;
            sha256(&format!("{f}.sha256"), &fa.sha256)?;
            abs_path(&format!("{f}.path"), &fa.path)?;
            mode(&format!("{f}.mode"), &fa.mode)?;
        }
    }
    for k in spec.params.keys() {
        param_name(&format!("{at}.params[{k:?}]"), k)?;
    }
    for (i, o) in spec.node_set_params.iter().enumerate() {
        let f = format!("{at}.nodeSetParams[{i}]");
        crate::validate::dns_subdomain(&format!("{f}.nodeSet"), &o.node_set)?;
        for k in o.params.keys() {
            param_name(&format!("{f}.params[{k:?}]"), k)?;
        }
    }
    let mut paths = Vec::new();
    if let Some(fa) = spec.artifact.as_ref().and_then(|a| a.file.as_ref()) {
        paths.push(fa.path.as_str());
    }
    for (i, file) in spec.files.iter().enumerate() {
        managed_file(&format!("{at}.files[{i}]"), file)?;
        if paths.contains(&file.path.as_str()) {
            return Err(err(
                format!("{at}.files[{i}].path"),
                format!("{} is managed twice in this component", file.path),
            ));
        }
        paths.push(&file.path);
    }
    if let Some(s) = &spec.service {
        unit_name(&format!("{at}.service.unit"), &s.unit)?;
    }
    if let Some(h) = &spec.health {
        health(&format!("{at}.health"), h)?;
    }
    if !spec.on_health_failure.is_empty() && !ON_HEALTH_FAILURE.contains(&spec.on_health_failure.as_str()) {
        return Err(err(
            format!("{at}.onHealthFailure"),
            format!("{:?}: one of {}", spec.on_health_failure, ON_HEALTH_FAILURE.join(", ")),
        ));
    }
    if let Some(u) = &spec.update_strategy {
        update_strategy(&format!("{at}.updateStrategy"), u)?;
    }
    Ok(())
}

/// The Components whose selector matches `labels`, in the order given,
/// each with the parameter overrides of the NodeSets that select the node
/// merged into `params` (in the order the Component lists them; later wins).
/// The hub computes every node's components with it, and a standalone agent
/// its own from local files.
pub fn for_node<'a>(
    labels: &BTreeMap<String, String>,
    components: impl Iterator<Item = &'a Component>,
    node_sets: &BTreeMap<&str, &NodeSet>,
) -> Vec<DesiredComponent> {
    let mut out = Vec::new();
    for c in components {
        let Some(spec) = c.spec.as_ref() else { continue };
        if !crate::selector::selects(spec.node_selector.as_ref(), labels) {
            continue;
        }
        let mut spec = template(spec);
        for o in std::mem::take(&mut spec.node_set_params) {
            let selected = node_sets
                .get(o.node_set.as_str())
                .and_then(|ns| ns.spec.as_ref())
                .is_some_and(|s| crate::selector::selects(s.selector.as_ref(), labels));
            if selected {
                spec.params.extend(o.params);
            }
        }
        let meta = c.metadata.clone().unwrap_or_default();
        out.push(DesiredComponent {
            name: meta.name,
            generation: meta.generation,
            spec: Some(spec),
        });
    }
    out
}

/// What a component takes charge of on a node, as (field path, key): its
/// files, its file artifact's path, its archive's install directory, its
/// unit, a repository package's name. Two components claiming one key would
/// undo each other's work on every reconcile, so the hub refuses that.
pub fn claims(spec: &ComponentSpec) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, f) in spec.files.iter().enumerate() {
        out.push((format!("spec.files[{i}].path"), format!("path {}", f.path)));
    }
    if let Some(a) = &spec.artifact {
        if let Some(f) = &a.file {
            out.push(("spec.artifact.file.path".into(), format!("path {}", f.path)));
        }
        if let Some(ar) = &a.archive {
            out.push((
                "spec.artifact.archive.installDir".into(),
                format!("install directory {}", ar.install_dir),
            ));
        }
        for (kind, p) in [("deb", &a.deb), ("rpm", &a.rpm)] {
            if let Some(p) = p
                && !p.package.is_empty()
            {
                out.push((
                    format!("spec.artifact.{kind}.package"),
                    format!("package {}", p.package),
                ));
            }
        }
    }
    if let Some(s) = &spec.service
        && !s.unit.is_empty()
    {
        out.push(("spec.service.unit".into(), format!("unit {}", s.unit)));
    }
    out
}

/// A version becomes a directory name, so it is kept to safe characters.
fn version(field: &str, v: &str) -> Result<(), ResourceError> {
    let ok = !v.is_empty()
        && v.len() <= 128
        && !v.starts_with('.')
        && v.chars().all(|c| c.is_ascii_alphanumeric() || "._+~-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(err(
            field,
            format!("{v:?} must be 1-128 characters of [A-Za-z0-9._+~-], not starting with '.'"),
        ))
    }
}

fn package(f: &str, p: &PackageArtifact) -> Result<(), ResourceError> {
    let by_url = !p.url.is_empty() || !p.sha256.is_empty();
    let by_name = !p.package.is_empty() || !p.version.is_empty();
    match (by_url, by_name) {
        (true, false) => {
            url(&format!("{f}.url"), &p.url)?;
            sha256(&format!("{f}.sha256"), &p.sha256)
        }
        (false, true) => {
            let name_ok = !p.package.is_empty()
                && p.package.len() <= 128
                && p.package
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-._".contains(c));
            if !name_ok {
                return Err(err(
                    format!("{f}.package"),
                    format!("{:?} is not a package name", p.package),
                ));
            }
            let v_ok = !p.version.is_empty()
                && p.version.len() <= 128
                && p.version
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".+~-:_".contains(c));
            if !v_ok {
                return Err(err(
                    format!("{f}.version"),
                    format!("{:?} is not a package version", p.version),
                ));
            }
            Ok(())
        }
        _ => Err(err(
            f,
            "give either url and sha256 (a package file) or package and version (from the host's repositories)",
        )),
    }
}

fn url(field: &str, u: &str) -> Result<(), ResourceError> {
    let ok = (u.starts_with("http://") || u.starts_with("https://")) && u.len() > 8 && !u.contains(char::is_whitespace);
    if ok {
        Ok(())
    } else {
        Err(err(field, format!("{u:?} must be an http:// or https:// URL")))
    }
}

fn sha256(field: &str, s: &str) -> Result<(), ResourceError> {
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(err(field, format!("{s:?} must be 64 lower-case hex digits")))
    }
}

fn abs_path(field: &str, p: &str) -> Result<(), ResourceError> {
    let path = std::path::Path::new(p);
    let ok = path.is_absolute()
        && p.len() > 1
        && !p.ends_with('/')
        && path.components().all(|c| !matches!(c, std::path::Component::ParentDir))
        && !p.contains('\0');
    if ok {
        Ok(())
    } else {
        Err(err(field, format!("{p:?} must be an absolute path without '..'")))
    }
}

/// Parses an octal mode (`0644`); empty gives `default`.
pub fn parse_mode(s: &str, default: u32) -> Option<u32> {
    if s.is_empty() {
        return Some(default);
    }
    u32::from_str_radix(s, 8).ok().filter(|m| *m <= 0o7777)
}

fn mode(field: &str, m: &str) -> Result<(), ResourceError> {
    parse_mode(m, 0)
        .map(|_| ())
        .ok_or_else(|| err(field, format!("{m:?} must be an octal mode such as 0644")))
}

fn param_name(field: &str, k: &str) -> Result<(), ResourceError> {
    let ok = !k.is_empty()
        && k.len() <= 63
        && k.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(err(
            field,
            format!("{k:?} must be an identifier ([A-Za-z_][A-Za-z0-9_]*)"),
        ))
    }
}

fn managed_file(f: &str, file: &ManagedFile) -> Result<(), ResourceError> {
    abs_path(&format!("{f}.path"), &file.path)?;
    mode(&format!("{f}.mode"), &file.mode)?;
    if !file.owner.is_empty() {
        let ok = file.owner.split(':').count() <= 2
            && file.owner.split(':').all(|p| {
                !p.is_empty() && p.len() <= 32 && p.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            });
        if !ok {
            return Err(err(
                format!("{f}.owner"),
                format!("{:?} must be user or user:group", file.owner),
            ));
        }
    }
    template_env()
        .template_from_str(&file.template)
        .map(|_| ())
        .map_err(|e| err(format!("{f}.template"), format!("template does not parse: {e}")))
}

fn unit_name(field: &str, u: &str) -> Result<(), ResourceError> {
    let ok = u.len() <= 255
        && u.rsplit_once('.').is_some_and(|(n, suffix)| {
            !n.is_empty()
                && matches!(suffix, "service" | "socket" | "timer" | "target" | "mount" | "path")
                && n.chars().all(|c| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c))
        });
    if ok {
        Ok(())
    } else {
        Err(err(
            field,
            format!("{u:?} is not a systemd unit name (such as kubelet.service)"),
        ))
    }
}

fn health(f: &str, h: &HealthCheck) -> Result<(), ResourceError> {
    let kinds = [!h.exec.is_empty(), !h.http.is_empty(), !h.unit_active.is_empty()];
    if kinds.iter().filter(|k| **k).count() != 1 {
        return Err(err(f, "set exactly one of exec, http, unitActive"));
    }
    if let Some(first) = h.exec.first()
        && !first.starts_with('/')
    {
        return Err(err(
            format!("{f}.exec[0]"),
            format!("{first:?} must be an absolute path (no shell, no PATH lookup)"),
        ));
    }
    if !h.http.is_empty() {
        url(&format!("{f}.http"), &h.http)?;
    }
    if !h.unit_active.is_empty() {
        unit_name(&format!("{f}.unitActive"), &h.unit_active)?;
    }
    for (name, v, max) in [
        ("timeoutSeconds", h.timeout_seconds, 300),
        ("periodSeconds", h.period_seconds, 300),
        ("gracePeriodSeconds", h.grace_period_seconds, 3600),
        ("successThreshold", h.success_threshold, 100),
    ] {
        if v > max {
            return Err(err(format!("{f}.{name}"), format!("{v} is more than {max}")));
        }
    }
    Ok(())
}

/// The template environment: strict about undefined variables, so a typo
/// in a template fails the change instead of writing an empty value.
pub fn template_env() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    env
}

/// What a template sees.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TemplateContext<'a> {
    pub node: NodeContext<'a>,
    pub params: &'a BTreeMap<String, String>,
    pub component: ComponentContext<'a>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeContext<'a> {
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub facts: &'a NodeFacts,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ComponentContext<'a> {
    pub name: &'a str,
    pub version: &'a str,
}

/// Renders one template.
pub fn render(template: &str, ctx: &TemplateContext<'_>) -> Result<String, String> {
    let env = template_env();
    let t = env.template_from_str(template).map_err(|e| e.to_string())?;
    t.render(ctx).map_err(|e| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        msg
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{Artifact, FileArtifact};

    fn spec() -> ComponentSpec {
        ComponentSpec {
            version: "1.2.3".into(),
            files: vec![ManagedFile {
                path: "/etc/x.conf".into(),
                template: "name={{ node.name }} level={{ params.level }}\n".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_good_spec_passes_and_bad_fields_are_named() {
        check("spec", &spec()).expect("valid");
        let mut s = spec();
        s.version = "../etc".into();
        assert_eq!(check("spec", &s).unwrap_err().field, "spec.version");
        let mut s = spec();
        s.files[0].template = "{{ unclosed".into();
        assert_eq!(check("spec", &s).unwrap_err().field, "spec.files[0].template");
        let mut s = spec();
        s.artifact = Some(Artifact {
            file: Some(FileArtifact {
                url: "http://x/y".into(),
                sha256: "AB".into(),
                path: "/usr/bin/y".into(),
                mode: String::new(),
                size: 0,
                signature: String::new(),
            }),
            ..Default::default()
        });
        assert_eq!(check("spec", &s).unwrap_err().field, "spec.artifact.file.sha256");
        let mut s = spec();
        s.artifact = Some(Artifact {
            deb: Some(PackageArtifact {
                url: "http://x/y.deb".into(),
                package: "y".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(check("spec", &s).unwrap_err().field, "spec.artifact.deb");
        let mut s = spec();
        s.health = Some(HealthCheck {
            exec: vec!["true".into()],
            ..Default::default()
        });
        assert_eq!(check("spec", &s).unwrap_err().field, "spec.health.exec[0]");
        let mut s = spec();
        s.update_strategy = Some(crate::v1::UpdateStrategy {
            r#type: "Canary".into(),
            rolling_update: None,
        });
        assert_eq!(check("spec", &s).unwrap_err().field, "spec.updateStrategy.type");
        let rolling = |r: crate::v1::RollingUpdate| {
            let mut s = spec();
            s.update_strategy = Some(crate::v1::UpdateStrategy {
                r#type: String::new(),
                rolling_update: Some(r),
            });
            check("spec", &s).map_err(|e| e.field)
        };
        use crate::v1::RollingUpdate;
        assert_eq!(
            rolling(RollingUpdate {
                max_unavailable: "10%".into(),
                partition: "3".into(),
                node_set_order: vec!["a".into(), "b".into()],
                ..Default::default()
            }),
            Ok(())
        );
        let bad = |r: RollingUpdate| rolling(r).unwrap_err();
        let prefix = "spec.updateStrategy.rollingUpdate";
        assert_eq!(
            bad(RollingUpdate {
                max_unavailable: "0".into(),
                ..Default::default()
            }),
            format!("{prefix}.maxUnavailable")
        );
        assert_eq!(
            bad(RollingUpdate {
                partition: "x%".into(),
                ..Default::default()
            }),
            format!("{prefix}.partition")
        );
        assert_eq!(
            bad(RollingUpdate {
                node_set_order: vec!["a".into(), "a".into()],
                ..Default::default()
            }),
            format!("{prefix}.nodeSetOrder[1]")
        );
        assert_eq!(
            bad(RollingUpdate {
                others: "sometimes".into(),
                ..Default::default()
            }),
            format!("{prefix}.others")
        );
        assert_eq!(
            bad(RollingUpdate {
                canary: Some(crate::v1::Canary {
                    nodes: "200%".into(),
                    soak_seconds: 0
                }),
                ..Default::default()
            }),
            format!("{prefix}.canary.nodes")
        );
    }

    #[test]
    fn counts_load_from_yaml_integers_and_strings() {
        let doc = "apiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {name: k}\nspec:\n  version: '1'\n  updateStrategy:\n    rollingUpdate: {maxUnavailable: 2, partition: '10%'}\n";
        let r = crate::document::parse_resources(doc).expect("parse");
        let crate::Resource::Component(c) = &r[0] else {
            panic!("component")
        };
        let ru = c
            .spec
            .as_ref()
            .and_then(|s| s.update_strategy.as_ref())
            .and_then(|u| u.rolling_update.as_ref())
            .expect("ru");
        assert_eq!((ru.max_unavailable.as_str(), ru.partition.as_str()), ("2", "10%"));
    }

    #[test]
    fn templates_render_node_and_params_and_refuse_undefined_names() {
        let labels = BTreeMap::from([("zone".to_string(), "a".to_string())]);
        let params = BTreeMap::from([("level".to_string(), "2".to_string())]);
        let facts = NodeFacts {
            cpus: 4,
            ..Default::default()
        };
        let ctx = TemplateContext {
            node: NodeContext {
                name: "n1",
                labels: &labels,
                facts: &facts,
            },
            params: &params,
            component: ComponentContext {
                name: "c",
                version: "1",
            },
        };
        let out = render(
            "{{ node.name }} {{ node.labels.zone }} {{ node.facts.cpus }} {{ params.level }}\n",
            &ctx,
        )
        .expect("renders");
        assert_eq!(out, "n1 a 4 2\n");
        let e = render("{{ params.missing }}", &ctx).unwrap_err();
        assert!(e.contains("undefined"), "{e}");
    }
}
