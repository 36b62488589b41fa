//! The rule files shipped inside the agent (`agent/rules/`), used unless
//! `detectors.defaultRules` is false.

use std::path::Path;

use super::rules::{LogMonitor, RuleError, parse};

/// (name, text) of every built-in rule file.
pub const FILES: &[(&str, &str)] = &[
    ("builtin/kernel.yaml", include_str!("../../rules/kernel.yaml")),
    ("builtin/containerd.yaml", include_str!("../../rules/containerd.yaml")),
    ("builtin/kubelet.yaml", include_str!("../../rules/kubelet.yaml")),
];

/// The built-in rule files, parsed and checked.
pub fn load() -> Result<Vec<LogMonitor>, RuleError> {
    FILES.iter().map(|(name, text)| parse(Path::new(name), text)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_rules_load() {
        let all = load().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(all.len(), 3);
        assert!(all[0].rules.len() >= 30);
    }
}
