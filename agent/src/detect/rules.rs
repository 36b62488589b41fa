//! Log-monitor rule files on disk: node-problem-detector's format (see
//! [`nodekeeper_proto::rules`], which defines and checks it), read from a
//! file so errors name the file as well as the rule and the reason.

use std::path::{Path, PathBuf};

pub use nodekeeper_proto::rules::{Plugin, check};
pub use nodekeeper_proto::v1::{LogCondition, LogMonitor, LogPluginConfig, LogRule};

/// A rule file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("rule file {path}: {location}{reason}")]
pub struct RuleError {
    pub path: PathBuf,
    /// `rules[3].condition: ` or empty.
    pub location: String,
    pub reason: String,
}

/// Reads and checks a rule file (JSON as NPD writes it, or YAML).
pub fn load(path: &Path) -> Result<LogMonitor, RuleError> {
    let text = std::fs::read_to_string(path).map_err(|e| RuleError {
        path: path.to_path_buf(),
        location: String::new(),
        reason: format!("cannot read: {e}"),
    })?;
    parse(path, &text)
}

/// Parses and checks rule-file text; `path` is used in errors.
pub fn parse(path: &Path, text: &str) -> Result<LogMonitor, RuleError> {
    nodekeeper_proto::rules::parse(text).map_err(|e| RuleError {
        path: path.to_path_buf(),
        location: if e.field.is_empty() {
            String::new()
        } else {
            format!("{}: ", e.field)
        },
        reason: e.message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/npd/config")
    }

    #[test]
    fn every_npd_log_monitor_file_loads_unchanged() {
        let mut loaded = 0;
        for entry in std::fs::read_dir(peers()).expect("peers dir") {
            let path = entry.expect("entry").path();
            let text = std::fs::read_to_string(&path).expect("read");
            let v: serde_json::Value = serde_json::from_str(&text).expect("json");
            let plugin = v["plugin"].as_str().unwrap_or_default();
            let result = load(&path);
            if matches!(plugin, "kmsg" | "journald" | "filelog") {
                let cfg = result.unwrap_or_else(|e| panic!("{e}"));
                assert!(
                    !cfg.rules.is_empty() || cfg.plugin_kind() == Some(Plugin::Journald),
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
        parse(Path::new("/etc/x.json"), text).expect_err("refused").to_string()
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
        let e = refuse(&format!(r#"{{{base}, "bufferSize": 5000, "rules": []}}"#));
        assert!(e.contains("bufferSize"), "{e}");
    }

    #[test]
    fn the_same_rules_load_from_yaml_with_clear_after() {
        let cfg = parse(
            Path::new("x.yaml"),
            "plugin: kmsg\nsource: k\nbufferSize: 5\nconditions: [{type: RO, reason: Fine, message: ok}]\nrules:\n- {type: permanent, condition: RO, reason: Bad, pattern: 'Remounting filesystem read-only', clearAfter: 10m}\n",
        )
        .expect("valid");
        assert_eq!(
            cfg.rules[0].clear_after_duration(),
            Some(std::time::Duration::from_secs(600))
        );
        assert_eq!(cfg.window(), 5);
    }
}
