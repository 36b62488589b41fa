//! Label selectors with Kubernetes semantics.

use std::collections::BTreeMap;

use crate::v1::{LabelSelector, LabelSelectorRequirement};

/// Operators a `matchExpressions` requirement may use.
pub const OPERATORS: &[&str] = &["In", "NotIn", "Exists", "DoesNotExist"];

impl LabelSelector {
    /// Whether `labels` satisfy every `matchLabels` entry and every
    /// `matchExpressions` requirement. An empty selector selects everything.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

impl LabelSelectorRequirement {
    /// Whether `labels` satisfy this requirement. Unknown operators never match
    /// (validation refuses them before they are stored).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator.as_str() {
            "In" => value.is_some_and(|v| self.values.contains(v)),
            "NotIn" => value.is_none_or(|v| !self.values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    }
}

/// Whether an optional selector selects `labels` (absent selects everything).
pub fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    selector.is_none_or(|s| s.matches(labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn req(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn empty_selector_selects_everything() {
        assert!(LabelSelector::default().matches(&labels(&[])));
        assert!(selects(None, &labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_and_expressions_all_must_hold() {
        let sel = LabelSelector {
            match_labels: labels(&[("zone", "a")]),
            match_expressions: vec![
                req("gpu", "Exists", &[]),
                req("tier", "In", &["web", "db"]),
                req("drain", "DoesNotExist", &[]),
                req("arch", "NotIn", &["arm64"]),
            ],
        };
        assert!(sel.matches(&labels(&[("zone", "a"), ("gpu", "x"), ("tier", "db")])));
        assert!(!sel.matches(&labels(&[("zone", "b"), ("gpu", "x"), ("tier", "db")])));
        assert!(!sel.matches(&labels(&[("zone", "a"), ("tier", "db")])));
        assert!(!sel.matches(&labels(&[("zone", "a"), ("gpu", "x"), ("tier", "ml")])));
        assert!(!sel.matches(&labels(&[("zone", "a"), ("gpu", "x"), ("tier", "db"), ("drain", "")])));
        assert!(!sel.matches(&labels(&[
            ("zone", "a"),
            ("gpu", "x"),
            ("tier", "db"),
            ("arch", "arm64")
        ])));
    }
}
