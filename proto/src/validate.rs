//! Validation of resources, with errors that name the field. The hub runs it
//! on every apply; nkctl could run it before sending.

use std::collections::BTreeMap;

use crate::resource::{Resource, ResourceError};
use crate::selector::OPERATORS;
use crate::v1::{AgentProfileSpec, LabelSelector, ObjectMeta};

/// Log levels an AgentProfile may set.
pub const LOG_LEVELS: &[&str] = &["error", "warn", "info", "debug", "trace"];

/// Heartbeat interval bounds in seconds.
pub const HEARTBEAT_RANGE: std::ops::RangeInclusive<u32> = 1..=3600;

/// Validates a whole resource.
pub fn resource(r: &Resource) -> Result<(), ResourceError> {
    metadata(r.metadata())?;
    match r {
        Resource::NodeSet(ns) => {
            let spec = ns.spec.as_ref().ok_or_else(|| ResourceError::new("spec", "missing"))?;
            if let Some(sel) = &spec.selector {
                selector("spec.selector", sel)?;
            }
            Ok(())
        }
        Resource::DetectorSet(ds) => {
            let spec = ds.spec.as_ref().ok_or_else(|| ResourceError::new("spec", "missing"))?;
            if let Some(sel) = &spec.node_selector {
                selector("spec.nodeSelector", sel)?;
            }
            for (i, m) in spec.log_monitors.iter().enumerate() {
                crate::rules::check(m).map_err(|e| {
                    let at = if e.field.is_empty() {
                        String::new()
                    } else {
                        format!(".{}", e.field)
                    };
                    ResourceError::new(format!("spec.logMonitors[{i}]{at}"), e.message)
                })?;
            }
            crate::checks::check_detectors(
                "spec",
                &spec.custom_plugin_monitors,
                &spec.probes,
                spec.resources.as_ref(),
                spec.hardware.as_ref(),
            )
        }
        Resource::Component(c) => {
            let spec = c.spec.as_ref().ok_or_else(|| ResourceError::new("spec", "missing"))?;
            crate::component::check("spec", spec)
        }
        Resource::AgentProfile(ap) => {
            let spec = ap.spec.as_ref().ok_or_else(|| ResourceError::new("spec", "missing"))?;
            agent_profile_spec(spec)
        }
        Resource::DisruptionBudget(b) => {
            let spec = b.spec.as_ref().ok_or_else(|| ResourceError::new("spec", "missing"))?;
            if let Some(sel) = &spec.node_selector {
                selector("spec.nodeSelector", sel)?;
            }
            if spec.max_unavailable.trim().is_empty() {
                return Err(ResourceError::new(
                    "spec.maxUnavailable",
                    "missing: how many selected nodes may be unavailable at once (`1`, `10%`)",
                ));
            }
            crate::count::check("spec.maxUnavailable", &spec.max_unavailable)
        }
        Resource::RemedyRule(r) => {
            let spec = r.spec.as_ref().ok_or_else(|| ResourceError::new("spec", "missing"))?;
            crate::remedy::check("spec", spec)
        }
    }
}

fn metadata(m: &ObjectMeta) -> Result<(), ResourceError> {
    if m.name.is_empty() {
        return Err(ResourceError::new("metadata.name", "missing"));
    }
    dns_subdomain("metadata.name", &m.name)?;
    labels("metadata.labels", &m.labels)
}

fn agent_profile_spec(spec: &AgentProfileSpec) -> Result<(), ResourceError> {
    if let Some(sel) = &spec.node_selector {
        selector("spec.nodeSelector", sel)?;
    }
    if let Some(level) = &spec.log_level
        && !LOG_LEVELS.contains(&level.as_str())
    {
        return Err(ResourceError::new(
            "spec.logLevel",
            format!("{level:?} is not a log level; one of {}", LOG_LEVELS.join(", ")),
        ));
    }
    if let Some(hb) = spec.heartbeat_seconds
        && !HEARTBEAT_RANGE.contains(&hb)
    {
        return Err(ResourceError::new(
            "spec.heartbeatSeconds",
            format!(
                "{hb} is out of range {}..={}",
                HEARTBEAT_RANGE.start(),
                HEARTBEAT_RANGE.end()
            ),
        ));
    }
    labels("spec.labels", &spec.labels)
}

/// Validates a label selector at `field`.
pub fn selector(field: &str, sel: &LabelSelector) -> Result<(), ResourceError> {
    labels(&format!("{field}.matchLabels"), &sel.match_labels)?;
    for (i, r) in sel.match_expressions.iter().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        label_key(&format!("{f}.key"), &r.key)?;
        if !OPERATORS.contains(&r.operator.as_str()) {
            return Err(ResourceError::new(
                format!("{f}.operator"),
                format!("{:?} is not an operator; one of {}", r.operator, OPERATORS.join(", ")),
            ));
        }
        let needs_values = matches!(r.operator.as_str(), "In" | "NotIn");
        if needs_values && r.values.is_empty() {
            return Err(ResourceError::new(
                format!("{f}.values"),
                format!("{} needs at least one value", r.operator),
            ));
        }
        if !needs_values && !r.values.is_empty() {
            return Err(ResourceError::new(
                format!("{f}.values"),
                format!("{} takes no values", r.operator),
            ));
        }
        for (j, v) in r.values.iter().enumerate() {
            label_value(&format!("{f}.values[{j}]"), v)?;
        }
    }
    Ok(())
}

/// Validates a label map at `field` (Kubernetes rules for keys and values).
pub fn labels(field: &str, labels: &BTreeMap<String, String>) -> Result<(), ResourceError> {
    for (k, v) in labels {
        label_key(&format!("{field}[{k:?}]"), k)?;
        label_value(&format!("{field}[{k:?}]"), v)?;
    }
    Ok(())
}

/// Validates one label key.
pub fn label_key(field: &str, key: &str) -> Result<(), ResourceError> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        dns_subdomain(field, p).map_err(|e| ResourceError::new(field, format!("label key prefix: {}", e.message)))?;
    }
    if name.is_empty() || name.len() > 63 || !label_chars(name) {
        return Err(ResourceError::new(
            field,
            format!(
                "label key {key:?} must be at most 63 characters of [A-Za-z0-9._-], starting and ending alphanumeric (an optional DNS prefix and '/' before it)"
            ),
        ));
    }
    Ok(())
}

fn label_value(field: &str, v: &str) -> Result<(), ResourceError> {
    if v.len() > 63 || (!v.is_empty() && !label_chars(v)) {
        return Err(ResourceError::new(
            field,
            format!(
                "label value {v:?} must be empty or at most 63 characters of [A-Za-z0-9._-], starting and ending alphanumeric"
            ),
        ));
    }
    Ok(())
}

fn label_chars(s: &str) -> bool {
    let b = s.as_bytes();
    b.iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// Validates a DNS-1123 subdomain (resource and node names).
pub fn dns_subdomain(field: &str, s: &str) -> Result<(), ResourceError> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        });
    if ok {
        Ok(())
    } else {
        Err(ResourceError::new(
            field,
            format!(
                "{s:?} must be a DNS-1123 subdomain: lower-case letters, digits, '-' and '.', at most 253 characters, starting and ending alphanumeric"
            ),
        ))
    }
}
