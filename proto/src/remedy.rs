//! RemedyRules: what the hub checks at apply and the agent checks again on
//! every desired state, and the small facts both sides share (which actions
//! exist, which disrupt the node, what a rule's offline policy says).

use std::time::Duration;

use crate::resource::ResourceError;
use crate::v1::{Condition, RemedyRuleSpec, RemedyStep, RemedyTrigger};

/// The actions a step may take.
pub const ACTIONS: &[&str] = &[
    "restartUnit",
    "killProcess",
    "dropCaches",
    "cleanDisk",
    "restartContainerRuntime",
    "runScript",
    "reboot",
];

/// The `action` of a permit for `rule`.
pub fn permit_action(rule: &str) -> String {
    format!("remedy/{rule}")
}

/// Whether an action disrupts the node's workloads, so it needs the
/// defender's permit. Dropping caches and deleting old files do not.
pub fn disruptive(action: &str) -> bool {
    !matches!(action, "dropCaches" | "cleanDisk")
}

/// When no `rebootWindow` is set.
pub const DEFAULT_REBOOT_WINDOW: Duration = Duration::from_secs(3600);
/// Longest `runScript` timeout.
pub const MAX_SCRIPT_TIMEOUT: Duration = Duration::from_secs(3600);
/// `cleanDisk`'s `imageMinAge` when none is given (kubelet's image GC
/// minimum age): an image pulled for a pod that has not started is kept.
pub const DEFAULT_IMAGE_MIN_AGE: Duration = Duration::from_secs(120);

/// `cleanDisk`'s `imageMinAge`.
pub fn image_min_age(s: &RemedyStep) -> Duration {
    s.params
        .get("imageMinAge")
        .and_then(|a| duration(a))
        .unwrap_or(DEFAULT_IMAGE_MIN_AGE)
}

/// `runScript` timeout when none is given.
pub const DEFAULT_SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

/// `rebootWindow` as a duration (empty: [`DEFAULT_REBOOT_WINDOW`]).
pub fn reboot_window(spec: &RemedyRuleSpec) -> Duration {
    duration(&spec.reboot_window).unwrap_or(DEFAULT_REBOOT_WINDOW)
}

/// `24h`, `90m` or plain seconds.
fn duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if let Ok(n) = s.parse::<u64>() {
        return Some(Duration::from_secs(n));
    }
    humantime::parse_duration(s).ok()
}

/// What a rule says about an action with the hub unreachable: `Some(true)`
/// allow, `Some(false)` deny, `None` the agent's own `defender.offline`
/// (reboot: deny).
pub fn offline_allows(spec: &RemedyRuleSpec, action: &str) -> Option<bool> {
    let v = spec.offline.get(action).or_else(|| {
        if action == "reboot" {
            None
        } else {
            spec.offline.get("*")
        }
    });
    match v.map(String::as_str) {
        Some("allow") => Some(true),
        Some(_) => Some(false),
        None if action == "reboot" => Some(false),
        None => None,
    }
}

/// The trigger's status (empty: True).
pub fn trigger_status(t: &RemedyTrigger) -> &str {
    if t.status.is_empty() { "True" } else { &t.status }
}

/// The condition among `conditions` that `t` is about, if it is at the
/// trigger's status.
pub fn raised<'a>(t: &RemedyTrigger, conditions: &'a [Condition]) -> Option<&'a Condition> {
    conditions
        .iter()
        .find(|c| c.r#type == t.r#type && c.status == trigger_status(t))
}

/// Whether a rule wants manual approval.
pub fn manual(spec: &RemedyRuleSpec) -> bool {
    spec.approval == "manual"
}

/// Checks a RemedyRule's spec; errors name the field under `at`.
pub fn check(at: &str, spec: &RemedyRuleSpec) -> Result<(), ResourceError> {
    if let Some(sel) = &spec.node_selector {
        crate::validate::selector(&format!("{at}.nodeSelector"), sel)?;
    }
    if spec.conditions.is_empty() {
        return Err(ResourceError::new(
            format!("{at}.conditions"),
            "missing: at least one {type, status, forSeconds} that starts a job",
        ));
    }
    for (i, t) in spec.conditions.iter().enumerate() {
        let f = format!("{at}.conditions[{i}]");
        if t.r#type.trim().is_empty() {
            return Err(ResourceError::new(format!("{f}.type"), "missing: the condition type"));
        }
        if !matches!(trigger_status(t), "True" | "False" | "Unknown") {
            return Err(ResourceError::new(
                format!("{f}.status"),
                format!("{:?}: one of True, False, Unknown", t.status),
            ));
        }
    }
    if spec.steps.is_empty() {
        return Err(ResourceError::new(
            format!("{at}.steps"),
            "missing: at least one {action, params, verifySeconds}",
        ));
    }
    for (i, s) in spec.steps.iter().enumerate() {
        step(&format!("{at}.steps[{i}]"), s)?;
    }
    if !spec.reboot_window.trim().is_empty() && duration(&spec.reboot_window).is_none() {
        return Err(ResourceError::new(
            format!("{at}.rebootWindow"),
            format!("{:?} is not a duration like 24h, 90m or 3600", spec.reboot_window),
        ));
    }
    if !matches!(spec.approval.as_str(), "" | "auto" | "manual") {
        return Err(ResourceError::new(
            format!("{at}.approval"),
            format!("{:?}: auto or manual", spec.approval),
        ));
    }
    for (k, v) in &spec.offline {
        if k != "*" && !ACTIONS.contains(&k.as_str()) {
            return Err(ResourceError::new(
                format!("{at}.offline.{k}"),
                format!("not an action; one of *, {}", ACTIONS.join(", ")),
            ));
        }
        if !matches!(v.as_str(), "allow" | "deny") {
            return Err(ResourceError::new(
                format!("{at}.offline.{k}"),
                format!("{v:?}: allow or deny"),
            ));
        }
    }
    if !spec.max_concurrent.trim().is_empty() {
        crate::count::check(&format!("{at}.maxConcurrent"), &spec.max_concurrent)?;
    }
    crate::window::check(&format!("{at}.windows"), &spec.windows)?;
    if let Some(b) = &spec.breaker {
        if b.threshold.trim().is_empty() {
            return Err(ResourceError::new(
                format!("{at}.breaker.threshold"),
                "missing: how many nodes (count or percent) raising the condition at once is not the nodes' fault",
            ));
        }
        crate::count::check(&format!("{at}.breaker.threshold"), &b.threshold)?;
        if b.window_seconds == 0 {
            return Err(ResourceError::new(
                format!("{at}.breaker.windowSeconds"),
                "missing: the window (seconds) the threshold counts over",
            ));
        }
    }
    Ok(())
}

fn need<'a>(at: &str, s: &'a RemedyStep, key: &str, what: &str) -> Result<&'a str, ResourceError> {
    match s.params.get(key).map(|v| v.trim()) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(ResourceError::new(
            format!("{at}.params.{key}"),
            format!("missing: {what}"),
        )),
    }
}

fn known_params(at: &str, s: &RemedyStep, keys: &[&str]) -> Result<(), ResourceError> {
    for k in s.params.keys() {
        if !keys.contains(&k.as_str()) {
            return Err(ResourceError::new(
                format!("{at}.params.{k}"),
                format!(
                    "not a parameter of {}; {}",
                    s.action,
                    if keys.is_empty() {
                        "it takes none".to_string()
                    } else {
                        format!("one of {}", keys.join(", "))
                    }
                ),
            ));
        }
    }
    Ok(())
}

/// `cleanDisk`'s `paths`: `DIR:AGE` entries, comma-separated.
pub fn clean_paths(s: &str) -> Result<Vec<(String, Duration)>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (dir, age) = part
            .rsplit_once(':')
            .ok_or_else(|| format!("{part:?}: DIR:AGE, e.g. /var/log/app:7d"))?;
        if !dir.starts_with('/') || dir == "/" {
            return Err(format!("{dir:?}: an absolute directory other than /"));
        }
        let age = duration(age).ok_or_else(|| format!("{age:?} is not an age like 7d or 12h"))?;
        out.push((dir.to_string(), age));
    }
    Ok(out)
}

/// `runScript`'s `timeoutSeconds` (default [`DEFAULT_SCRIPT_TIMEOUT`]).
pub fn script_timeout(s: &RemedyStep) -> Duration {
    s.params
        .get("timeoutSeconds")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_SCRIPT_TIMEOUT)
        .min(MAX_SCRIPT_TIMEOUT)
}

fn step(at: &str, s: &RemedyStep) -> Result<(), ResourceError> {
    match s.action.as_str() {
        "restartUnit" => {
            known_params(at, s, &["unit"])?;
            need(at, s, "unit", "the systemd unit to restart (kubelet.service)")?;
        }
        "restartContainerRuntime" => known_params(at, s, &["unit"])?,
        "killProcess" => {
            known_params(at, s, &["name", "cgroup", "signal"])?;
            if !s.params.contains_key("name") && !s.params.contains_key("cgroup") {
                return Err(ResourceError::new(
                    format!("{at}.params"),
                    "killProcess needs name (the process name, as in /proc/PID/comm) or cgroup (a path under /sys/fs/cgroup)",
                ));
            }
            if let Some(sig) = s.params.get("signal")
                && !matches!(
                    sig.as_str(),
                    "TERM" | "KILL" | "SIGTERM" | "SIGKILL" | "HUP" | "SIGHUP" | "INT" | "SIGINT"
                )
            {
                return Err(ResourceError::new(
                    format!("{at}.params.signal"),
                    format!("{sig:?}: one of TERM, KILL, HUP, INT"),
                ));
            }
        }
        "dropCaches" => {
            known_params(at, s, &["level"])?;
            if let Some(l) = s.params.get("level")
                && !matches!(l.as_str(), "1" | "2" | "3")
            {
                return Err(ResourceError::new(
                    format!("{at}.params.level"),
                    format!("{l:?}: 1 (page cache), 2 (dentries and inodes) or 3 (both)"),
                ));
            }
        }
        "cleanDisk" => {
            known_params(at, s, &["paths", "images", "imageMinAge", "namespace", "address"])?;
            if let Some(p) = s.params.get("paths") {
                clean_paths(p).map_err(|e| ResourceError::new(format!("{at}.params.paths"), e))?;
            }
            match s.params.get("images").map(|v| v.trim()) {
                None => {
                    if let Some(k) = ["imageMinAge", "namespace", "address"]
                        .into_iter()
                        .find(|k| s.params.contains_key(*k))
                    {
                        return Err(ResourceError::new(
                            format!("{at}.params.{k}"),
                            "only with images: unused",
                        ));
                    }
                }
                Some("unused") => {}
                Some(v) => {
                    return Err(ResourceError::new(
                        format!("{at}.params.images"),
                        format!("{v:?}: unused (the images no container uses) is the one choice"),
                    ));
                }
            }
            if let Some(a) = s.params.get("imageMinAge")
                && duration(a).is_none()
            {
                return Err(ResourceError::new(
                    format!("{at}.params.imageMinAge"),
                    format!("{a:?} is not an age like 2m or 1h"),
                ));
            }
            if let Some(a) = s.params.get("address")
                && !a.starts_with('/')
            {
                return Err(ResourceError::new(
                    format!("{at}.params.address"),
                    format!("{a:?}: containerd's socket, an absolute path"),
                ));
            }
            if !s.params.contains_key("paths") && !s.params.contains_key("images") {
                return Err(ResourceError::new(
                    format!("{at}.params"),
                    "cleanDisk needs paths (DIR:AGE,..., files older than AGE) or images: unused (container images no container uses), or both",
                ));
            }
        }
        "runScript" => {
            known_params(at, s, &["path", "args", "timeoutSeconds"])?;
            let p = need(at, s, "path", "the program to run (an absolute path)")?;
            if !p.starts_with('/') {
                return Err(ResourceError::new(
                    format!("{at}.params.path"),
                    format!("{p:?}: an absolute path"),
                ));
            }
            if let Some(t) = s.params.get("timeoutSeconds") {
                match t.trim().parse::<u64>() {
                    Ok(n) if n >= 1 && Duration::from_secs(n) <= MAX_SCRIPT_TIMEOUT => {}
                    _ => {
                        return Err(ResourceError::new(
                            format!("{at}.params.timeoutSeconds"),
                            format!("{t:?}: whole seconds from 1 to {}", MAX_SCRIPT_TIMEOUT.as_secs()),
                        ));
                    }
                }
            }
        }
        "reboot" => known_params(at, s, &[])?,
        other => {
            return Err(ResourceError::new(
                format!("{at}.action"),
                format!("{other:?} is not an action; one of {}", ACTIONS.join(", ")),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::RemedyBreaker;

    fn spec() -> RemedyRuleSpec {
        RemedyRuleSpec {
            conditions: vec![RemedyTrigger {
                r#type: "KubeletUnhealthy".into(),
                status: String::new(),
                for_seconds: 30,
            }],
            steps: vec![RemedyStep {
                action: "restartUnit".into(),
                params: [("unit".to_string(), "kubelet.service".to_string())].into(),
                verify_seconds: 60,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn rules_are_checked_field_by_field() {
        assert_eq!(check("spec", &spec()), Ok(()));
        let err = |f: fn(&mut RemedyRuleSpec)| {
            let mut s = spec();
            f(&mut s);
            check("spec", &s).expect_err("must be refused").field
        };
        assert_eq!(err(|s| s.conditions.clear()), "spec.conditions");
        assert_eq!(
            err(|s| s.conditions[0].status = "true".into()),
            "spec.conditions[0].status"
        );
        assert_eq!(err(|s| s.steps[0].action = "format".into()), "spec.steps[0].action");
        assert_eq!(
            err(|s| {
                s.steps[0].params.clear();
            }),
            "spec.steps[0].params.unit"
        );
        assert_eq!(
            err(|s| {
                s.steps[0].params.insert("signal".into(), "KILL".into());
            }),
            "spec.steps[0].params.signal"
        );
        assert_eq!(err(|s| s.reboot_window = "soon".into()), "spec.rebootWindow");
        assert_eq!(err(|s| s.approval = "yes".into()), "spec.approval");
        assert_eq!(
            err(|s| {
                s.offline.insert("reboot".into(), "maybe".into());
            }),
            "spec.offline.reboot"
        );
        assert_eq!(err(|s| s.max_concurrent = "lots".into()), "spec.maxConcurrent");
        assert_eq!(
            err(|s| s.breaker = Some(RemedyBreaker {
                threshold: "10%".into(),
                window_seconds: 0,
                cooldown_seconds: 0
            })),
            "spec.breaker.windowSeconds"
        );
        assert_eq!(
            err(|s| s.steps[0] = RemedyStep {
                action: "runScript".into(),
                params: [("path".to_string(), "fix.sh".to_string())].into(),
                verify_seconds: 0
            }),
            "spec.steps[0].params.path"
        );
        assert_eq!(
            err(|s| s.steps[0] = RemedyStep {
                action: "cleanDisk".into(),
                params: [("paths".to_string(), "/var/log:soon".to_string())].into(),
                verify_seconds: 0
            }),
            "spec.steps[0].params.paths"
        );
        let clean = |kv: &[(&str, &str)]| {
            let mut sp = spec();
            sp.steps[0] = RemedyStep {
                action: "cleanDisk".into(),
                params: kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                verify_seconds: 0,
            };
            check("spec", &sp).map_err(|e| e.field)
        };
        assert_eq!(clean(&[("images", "unused")]), Ok(()));
        assert_eq!(
            clean(&[
                ("images", "unused"),
                ("imageMinAge", "10m"),
                ("namespace", "k8s.io"),
                ("address", "/run/c.sock"),
                ("paths", "/var/log/app:7d")
            ]),
            Ok(())
        );
        assert_eq!(clean(&[("images", "all")]), Err("spec.steps[0].params.images".into()));
        assert_eq!(
            clean(&[("images", "unused"), ("imageMinAge", "soon")]),
            Err("spec.steps[0].params.imageMinAge".into())
        );
        assert_eq!(
            clean(&[("images", "unused"), ("address", "run/c.sock")]),
            Err("spec.steps[0].params.address".into())
        );
        assert_eq!(
            clean(&[("paths", "/var/log/app:7d"), ("namespace", "k8s.io")]),
            Err("spec.steps[0].params.namespace".into())
        );
        assert_eq!(clean(&[]), Err("spec.steps[0].params".into()));
    }

    #[test]
    fn offline_policy_and_shared_facts() {
        let mut s = spec();
        assert_eq!(offline_allows(&s, "restartUnit"), None);
        assert_eq!(
            offline_allows(&s, "reboot"),
            Some(false),
            "reboot is denied offline by default"
        );
        s.offline.insert("*".into(), "allow".into());
        assert_eq!(offline_allows(&s, "restartUnit"), Some(true));
        assert_eq!(offline_allows(&s, "reboot"), Some(false), "* does not cover reboot");
        s.offline.insert("reboot".into(), "allow".into());
        assert_eq!(offline_allows(&s, "reboot"), Some(true));
        assert_eq!(reboot_window(&s), DEFAULT_REBOOT_WINDOW);
        s.reboot_window = "24h".into();
        assert_eq!(reboot_window(&s), Duration::from_secs(86_400));
        assert_eq!(
            clean_paths("/var/log/app:7d, /tmp/x:3600").unwrap(),
            vec![
                ("/var/log/app".to_string(), Duration::from_secs(7 * 86_400)),
                ("/tmp/x".to_string(), Duration::from_secs(3600))
            ]
        );
        assert!(clean_paths("/:1d").is_err());
        assert!(disruptive("restartUnit") && disruptive("reboot") && !disruptive("dropCaches"));
    }
}
