//! Log-monitor rule files: node-problem-detector's format as the
//! [`LogMonitor`] message, so NPD's JSON files, the same rules in YAML and the
//! `DetectorSet` resource share one definition and one set of checks. Unlike
//! NPD, a rule that names an undeclared condition or has a bad regex refuses
//! the whole file, naming the rule and the reason.

use std::time::Duration;

use crate::resource::{ResourceError, typed};
use crate::v1::{LogMonitor, LogRule};

/// Where a log monitor reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plugin {
    Kmsg,
    Journald,
    Filelog,
}

/// Longest window a rule file may ask for.
pub const MAX_BUFFER: u32 = 1000;
/// NPD's `bufferSize` when a rule file leaves it out.
pub const DEFAULT_BUFFER: usize = 10;

fn duration(field: &str, s: &str) -> Result<Option<Duration>, ResourceError> {
    if s.is_empty() {
        return Ok(None);
    }
    humantime::parse_duration(s)
        .map(Some)
        .map_err(|e| ResourceError::new(field, format!("{s:?} is not a duration like 5m or 30s: {e}")))
}

impl LogMonitor {
    /// The plugin (checked by [`check`]).
    pub fn plugin_kind(&self) -> Option<Plugin> {
        match self.plugin.as_str() {
            "kmsg" => Some(Plugin::Kmsg),
            "journald" => Some(Plugin::Journald),
            "filelog" => Some(Plugin::Filelog),
            _ => None,
        }
    }

    /// How far back to read on the first start.
    pub fn lookback_duration(&self) -> Option<Duration> {
        duration("lookback", &self.lookback).ok().flatten()
    }

    /// How many recent lines a pattern sees: `bufferSize`, or NPD's default
    /// of 10 when it is omitted (0).
    pub fn window(&self) -> usize {
        if self.buffer_size == 0 {
            DEFAULT_BUFFER
        } else {
            self.buffer_size as usize
        }
    }
}

impl LogRule {
    /// Permanent rules set a condition; temporary ones give events.
    pub fn is_permanent(&self) -> bool {
        self.r#type == "permanent"
    }

    /// When a permanent condition clears without a new match.
    pub fn clear_after_duration(&self) -> Option<Duration> {
        duration("clearAfter", &self.clear_after).ok().flatten()
    }
}

/// An NPD config file (JSON as NPD writes it, or YAML) as a JSON value,
/// when its `plugin` is one of `plugins`: a plugin NPD has but that is not
/// the kind the caller reads deserves a clear word (`expected`, `what`).
pub(crate) fn npd_file(
    text: &str,
    plugins: &[&str],
    expected: &str,
    what: &str,
) -> Result<serde_json::Value, ResourceError> {
    let value: serde_json::Value =
        serde_norway::from_str(text).map_err(|e| ResourceError::new("", format!("not valid JSON or YAML: {e}")))?;
    let plugin = value.get("plugin").and_then(|p| p.as_str());
    if !plugin.is_some_and(|p| plugins.contains(&p)) {
        return Err(ResourceError::new(
            "plugin",
            format!(
                "{} is not {expected}; this is not {what}",
                plugin.map_or("missing".to_string(), |p| format!("{p:?}"))
            ),
        ));
    }
    Ok(value)
}

/// Parses rule-file text (JSON as NPD writes it, or YAML) and checks it.
/// Errors name the field (`rules[3].condition`).
pub fn parse(text: &str) -> Result<LogMonitor, ResourceError> {
    let value = npd_file(
        text,
        &["kmsg", "journald", "filelog"],
        "a log monitor plugin (kmsg, journald or filelog)",
        "a log-monitor rule file",
    )?;
    let m: LogMonitor = typed(value)?;
    check(&m)?;
    Ok(m)
}

/// Checks a log monitor; field names are relative to it.
pub fn check(m: &LogMonitor) -> Result<(), ResourceError> {
    let plugin = m.plugin_kind().ok_or_else(|| {
        ResourceError::new(
            "plugin",
            format!("{:?} is not a log monitor plugin (kmsg, journald or filelog)", m.plugin),
        )
    })?;
    if m.buffer_size > MAX_BUFFER {
        return Err(ResourceError::new(
            "bufferSize",
            format!("{} must be at most {MAX_BUFFER}", m.buffer_size),
        ));
    }
    if plugin == Plugin::Filelog && m.log_path.is_empty() {
        return Err(ResourceError::new(
            "logPath",
            "a filelog monitor needs the file to read",
        ));
    }
    duration("lookback", &m.lookback)?;
    if let Some(pc) = &m.plugin_config {
        for (re, field) in [
            (&pc.timestamp, "pluginConfig.timestamp"),
            (&pc.message, "pluginConfig.message"),
        ] {
            if let Some(re) = re {
                regex::Regex::new(re).map_err(|e| ResourceError::new(field, format!("bad regex: {e}")))?;
            }
        }
    }
    for (i, c) in m.conditions.iter().enumerate() {
        if c.r#type.is_empty() {
            return Err(ResourceError::new(format!("conditions[{i}].type"), "missing"));
        }
    }
    for (i, r) in m.rules.iter().enumerate() {
        let at = |f: &str| format!("rules[{i}].{f}");
        if !matches!(r.r#type.as_str(), "temporary" | "permanent") {
            return Err(ResourceError::new(
                at("type"),
                format!("{:?}: temporary or permanent", r.r#type),
            ));
        }
        regex::Regex::new(&r.pattern).map_err(|e| ResourceError::new(at("pattern"), format!("bad regex: {e}")))?;
        duration(&at("clearAfter"), &r.clear_after)?;
        if r.is_permanent() {
            if !m.conditions.iter().any(|c| c.r#type == r.condition) {
                let declared: Vec<&str> = m.conditions.iter().map(|c| c.r#type.as_str()).collect();
                return Err(ResourceError::new(
                    at("condition"),
                    format!(
                        "{:?} is not declared in `conditions` (declared: {}); a permanent rule must name one",
                        r.condition,
                        if declared.is_empty() {
                            "none".to_string()
                        } else {
                            declared.join(", ")
                        }
                    ),
                ));
            }
        } else if !r.clear_after.is_empty() {
            return Err(ResourceError::new(
                at("clearAfter"),
                "only permanent rules set a condition that can clear",
            ));
        }
    }
    Ok(())
}
