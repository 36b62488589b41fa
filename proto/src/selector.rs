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

/// Parses kubectl's label-selector syntax: comma-separated `k=v` (or `k==v`),
/// `k!=v`, `k` (exists) and `!k` (does not exist).
pub fn parse(s: &str) -> Result<LabelSelector, crate::ResourceError> {
    let mut sel = LabelSelector::default();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let req = |key: &str, op: &str, values: Vec<String>| LabelSelectorRequirement {
            key: key.trim().to_string(),
            operator: op.into(),
            values,
        };
        if let Some((k, v)) = part.split_once("!=") {
            sel.match_expressions.push(req(k, "NotIn", vec![v.trim().to_string()]));
        } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            sel.match_labels.insert(k.trim().to_string(), v.trim().to_string());
        } else if let Some(k) = part.strip_prefix('!') {
            sel.match_expressions.push(req(k, "DoesNotExist", vec![]));
        } else {
            sel.match_expressions.push(req(part, "Exists", vec![]));
        }
    }
    crate::validate::selector("labelSelector", &sel)?;
    Ok(sel)
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn kubectl_selector_syntax_parses() {
        let sel = parse("zone=a, tier!=db,gpu,!drain").expect("valid");
        let l = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert!(sel.matches(&l(&[("zone", "a"), ("tier", "web"), ("gpu", "1")])));
        assert!(!sel.matches(&l(&[("zone", "a"), ("tier", "db"), ("gpu", "1")])));
        assert!(!sel.matches(&l(&[("zone", "a"), ("gpu", "1"), ("drain", "")])));
        assert!(!sel.matches(&l(&[("zone", "b"), ("gpu", "1")])));
        assert!(parse("bad key!=x y").is_err());
        assert!(parse("").expect("empty").matches(&l(&[])));
    }
}
