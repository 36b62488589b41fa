//! Log-monitor rule files: node-problem-detector's JSON format, loaded
//! unchanged (the same rules can be written in YAML). Unlike NPD, a rule that
//! names an undeclared condition or has a bad regex refuses the whole file,
//! with the file, the rule index and the reason.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A rule file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("rule file {path}: {location}{reason}")]
pub struct RuleError {
    pub path: PathBuf,
    /// `rules[3]: `, `lookback: ` or empty.
    pub location: String,
    pub reason: String,
}

impl RuleError {
    fn new(path: &Path, location: impl Into<String>, reason: impl Into<String>) -> RuleError {
        let location = location.into();
        let location = if location.is_empty() {
            location
        } else {
            format!("{location}: ")
        };
        RuleError {
            path: path.to_path_buf(),
            location,
            reason: reason.into(),
        }
    }
}

/// Where a log monitor reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Plugin {
    Kmsg,
    Journald,
    Filelog,
}

/// NPD's `pluginConfig`: the filelog translator (`timestamp`, `message`,
/// `timestampFormat`) or the journald selector (`source`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginConfig {
    pub timestamp: Option<String>,
    pub message: Option<String>,
    pub timestamp_format: Option<String>,
    /// journald: the syslog identifier to follow.
    pub source: Option<String>,
    /// journald: the unit to follow (a nodekeeper extension).
    pub unit: Option<String>,
}

/// A default condition (status False) a monitor owns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConditionDefault {
    #[serde(rename = "type")]
    pub kind: String,
    pub reason: String,
    pub message: String,
}

/// temporary: an event; permanent: sets a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleType {
    Temporary,
    Permanent,
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(rename = "type")]
    pub kind: RuleType,
    /// For permanent rules: the condition they set.
    #[serde(default)]
    pub condition: String,
    pub reason: String,
    pub pattern: String,
    /// Appended to the generated message (`"<lines>; <suffix>"`).
    #[serde(default)]
    pub pattern_generated_message_suffix: String,
    /// nodekeeper extension: a permanent condition clears (status False, the
    /// default reason) after this long without the pattern matching again.
    #[serde(default, with = "opt_duration")]
    pub clear_after: Option<Duration>,
}

/// A log monitor: NPD's log-monitor config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogMonitorConfig {
    pub plugin: Plugin,
    #[serde(default)]
    pub plugin_config: PluginConfig,
    #[serde(default)]
    pub log_path: String,
    /// How far back to read on the very first start.
    #[serde(default, with = "opt_duration")]
    pub lookback: Option<Duration>,
    /// How many recent lines a pattern may span.
    #[serde(default = "one")]
    pub buffer_size: usize,
    pub source: String,
    /// NPD's switch for problem metrics; nodekeeper always exports them.
    #[serde(default)]
    pub metrics_reporting: bool,
    /// Lines containing one of these are skipped.
    #[serde(default)]
    pub skip_list: Vec<String>,
    #[serde(default)]
    pub conditions: Vec<ConditionDefault>,
    pub rules: Vec<Rule>,
}

fn one() -> usize {
    1
}

/// Durations as NPD writes them (`5m`, `10h`, `30s`).
mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        match s.as_deref() {
            None | Some("") => Ok(None),
            Some(s) => humantime::parse_duration(s)
                .map(Some)
                .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration like 5m or 30s: {e}"))),
        }
    }
}

impl LogMonitorConfig {
    /// Reads and checks a rule file (JSON as NPD writes it, or YAML).
    pub fn load(path: &Path) -> Result<LogMonitorConfig, RuleError> {
        let text = std::fs::read_to_string(path).map_err(|e| RuleError::new(path, "", format!("cannot read: {e}")))?;
        Self::parse(path, &text)
    }

    /// Parses and checks rule-file text; `path` is used in errors.
    pub fn parse(path: &Path, text: &str) -> Result<LogMonitorConfig, RuleError> {
        // A plugin NPD has but that is not a log monitor deserves a clear word.
        if let Ok(v) = serde_norway::from_str::<serde_json::Value>(text) {
            let plugin = v.get("plugin").and_then(|p| p.as_str());
            if !plugin.is_some_and(|p| matches!(p, "kmsg" | "journald" | "filelog")) {
                return Err(RuleError::new(
                    path,
                    "plugin",
                    format!(
                        "{} is not a log monitor plugin (kmsg, journald or filelog); this is not a log-monitor rule file",
                        plugin.map_or("missing".to_string(), |p| format!("{p:?}"))
                    ),
                ));
            }
        }
        let de = serde_norway::Deserializer::from_str(text);
        let cfg: LogMonitorConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let at = e.path().to_string();
            RuleError::new(
                path,
                if at == "." { String::new() } else { at },
                e.into_inner().to_string(),
            )
        })?;
        cfg.check(path)?;
        Ok(cfg)
    }

    fn check(&self, path: &Path) -> Result<(), RuleError> {
        if self.buffer_size == 0 || self.buffer_size > 1000 {
            return Err(RuleError::new(
                path,
                "bufferSize",
                format!("{} must be 1..=1000", self.buffer_size),
            ));
        }
        if self.source.is_empty() {
            return Err(RuleError::new(path, "source", "missing"));
        }
        if self.plugin == Plugin::Filelog && self.log_path.is_empty() {
            return Err(RuleError::new(
                path,
                "logPath",
                "a filelog monitor needs the file to read",
            ));
        }
        for (k, field) in [
            (&self.plugin_config.timestamp, "pluginConfig.timestamp"),
            (&self.plugin_config.message, "pluginConfig.message"),
        ] {
            if let Some(re) = k {
                regex::Regex::new(re).map_err(|e| RuleError::new(path, field, format!("bad regex: {e}")))?;
            }
        }
        for (i, c) in self.conditions.iter().enumerate() {
            if c.kind.is_empty() {
                return Err(RuleError::new(path, format!("conditions[{i}].type"), "missing"));
            }
        }
        for (i, r) in self.rules.iter().enumerate() {
            let at = format!("rules[{i}]");
            if r.reason.is_empty() {
                return Err(RuleError::new(path, format!("{at}.reason"), "missing"));
            }
            if r.pattern.is_empty() {
                return Err(RuleError::new(path, format!("{at}.pattern"), "missing"));
            }
            regex::Regex::new(&r.pattern)
                .map_err(|e| RuleError::new(path, format!("{at}.pattern"), format!("bad regex: {e}")))?;
            match r.kind {
                RuleType::Permanent => {
                    if !self.conditions.iter().any(|c| c.kind == r.condition) {
                        let declared: Vec<&str> = self.conditions.iter().map(|c| c.kind.as_str()).collect();
                        return Err(RuleError::new(
                            path,
                            format!("{at}.condition"),
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
                }
                RuleType::Temporary => {
                    if r.clear_after.is_some() {
                        return Err(RuleError::new(
                            path,
                            format!("{at}.clearAfter"),
                            "only permanent rules set a condition that can clear",
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/peers/npd/config")
    }

    #[test]
    fn every_npd_log_monitor_file_loads_unchanged() {
        let mut loaded = 0;
        for entry in std::fs::read_dir(peers()).expect("peers dir") {
            let path = entry.expect("entry").path();
            let text = std::fs::read_to_string(&path).expect("read");
            let v: serde_json::Value = serde_json::from_str(&text).expect("json");
            let plugin = v["plugin"].as_str().unwrap_or_default();
            let result = LogMonitorConfig::load(&path);
            if matches!(plugin, "kmsg" | "journald" | "filelog") {
                let cfg = result.unwrap_or_else(|e| panic!("{e}"));
                assert!(
                    !cfg.rules.is_empty() || cfg.plugin == Plugin::Journald,
                    "{}",
                    path.display()
                );
                loaded += 1;
            } else {
                let e = result.expect_err("not a log monitor");
                assert!(e.to_string().contains("not a log monitor plugin"), "{e}");
            }
        }
        assert!(loaded >= 8, "loaded {loaded} log-monitor files");
    }

    fn refuse(text: &str) -> String {
        LogMonitorConfig::parse(Path::new("/etc/x.json"), text)
            .expect_err("refused")
            .to_string()
    }

    #[test]
    fn bad_rules_are_refused_with_file_index_and_reason() {
        let base = r#""plugin": "kmsg", "source": "s", "conditions": [{"type": "A", "reason": "r", "message": "m"}]"#;
        let e = refuse(&format!(
            r#"{{{base}, "rules": [{{"type": "temporary", "reason": "x", "pattern": "ok"}}, {{"type": "permanent", "condition": "B", "reason": "y", "pattern": "z"}}]}}"#
        ));
        assert!(
            e.contains("/etc/x.json") && e.contains("rules[1].condition") && e.contains("\"B\" is not declared"),
            "{e}"
        );
        let e = refuse(&format!(
            r#"{{{base}, "rules": [{{"type": "temporary", "reason": "x", "pattern": "(unclosed"}}]}}"#
        ));
        assert!(e.contains("rules[0].pattern") && e.contains("bad regex"), "{e}");
        let e = refuse(&format!(
            r#"{{{base}, "rules": [{{"type": "sometimes", "reason": "x", "pattern": "p"}}]}}"#
        ));
        assert!(e.contains("rules[0].type"), "{e}");
        let e = refuse(&format!(r#"{{{base}, "lookback": "soon", "rules": []}}"#));
        assert!(e.contains("lookback"), "{e}");
        let e = refuse(&format!(r#"{{{base}, "rulez": []}}"#));
        assert!(e.contains("rulez"), "{e}");
        let e = refuse(r#"{"plugin": "custom", "source": "s", "rules": []}"#);
        assert!(e.contains("not a log monitor plugin"), "{e}");
        let e = refuse(&format!(r#"{{{base}, "bufferSize": 0, "rules": []}}"#));
        assert!(e.contains("bufferSize"), "{e}");
    }

    #[test]
    fn the_same_rules_load_from_yaml_with_clear_after() {
        let cfg = LogMonitorConfig::parse(
            Path::new("x.yaml"),
            "plugin: kmsg\nsource: k\nbufferSize: 5\nconditions: [{type: RO, reason: Fine, message: ok}]\nrules:\n- {type: permanent, condition: RO, reason: Bad, pattern: 'Remounting filesystem read-only', clearAfter: 10m}\n",
        )
        .expect("valid");
        assert_eq!(cfg.rules[0].clear_after, Some(Duration::from_secs(600)));
        assert_eq!(cfg.buffer_size, 5);
    }
}
