//! What a node should run: the pure computation of its desired agent
//! settings from the AgentProfiles that select it.

use std::collections::BTreeMap;

use nodekeeper_proto::selector::selects;
use nodekeeper_proto::v1::{AgentProfile, AgentSettings, Component, NodeSet};

/// Log level when no AgentProfile sets one.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Heartbeat interval when no AgentProfile sets one.
pub const DEFAULT_HEARTBEAT_SECONDS: u32 = 10;

/// Merges every AgentProfile whose selector matches `labels`, in name order:
/// a later profile's `logLevel`/`heartbeatSeconds` win, labels accumulate
/// (later wins per key). Selection uses the node's own labels (agent config
/// and operator labels), never labels a profile adds, so profiles cannot
/// select each other in circles.
pub fn settings<'a>(
    labels: &BTreeMap<String, String>,
    profiles: impl Iterator<Item = &'a AgentProfile>,
) -> AgentSettings {
    let mut out = AgentSettings {
        log_level: DEFAULT_LOG_LEVEL.to_string(),
        heartbeat_seconds: DEFAULT_HEARTBEAT_SECONDS,
        ..Default::default()
    };
    for p in profiles {
        let Some(spec) = p.spec.as_ref() else {
            continue;
        };
        if !selects(spec.node_selector.as_ref(), labels) {
            continue;
        }
        if let Some(l) = &spec.log_level {
            out.log_level = l.clone();
        }
        if let Some(h) = spec.heartbeat_seconds {
            out.heartbeat_seconds = h;
        }
        out.labels
            .extend(spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        out.profiles
            .push(p.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default());
    }
    out
}

/// Adds the log monitors of every DetectorSet whose selector matches
/// `labels`, in name order.
pub fn add_detectors<'a>(
    settings: &mut AgentSettings,
    labels: &BTreeMap<String, String>,
    sets: impl Iterator<Item = &'a nodekeeper_proto::v1::DetectorSet>,
) {
    for d in sets {
        let Some(spec) = d.spec.as_ref() else { continue };
        if !selects(spec.node_selector.as_ref(), labels) {
            continue;
        }
        settings.log_monitors.extend(spec.log_monitors.iter().cloned());
        settings
            .custom_plugin_monitors
            .extend(spec.custom_plugin_monitors.iter().cloned());
        // Probe names are the conditions' sources: a later set's probe of
        // the same name replaces an earlier one.
        for p in &spec.probes {
            settings.probes.retain(|q| q.name != p.name);
            settings.probes.push(p.clone());
        }
        if spec.resources.is_some() {
            settings.resources = spec.resources.clone();
        }
        if spec.hardware.is_some() {
            settings.hardware = spec.hardware.clone();
        }
        settings
            .detector_sets
            .push(d.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default());
    }
}

/// Adds every RemedyRule whose selector matches `labels`, in name order,
/// without its status (the agent runs the rule; the hub keeps the counts).
pub fn add_remedies<'a>(
    settings: &mut AgentSettings,
    labels: &BTreeMap<String, String>,
    rules: impl Iterator<Item = &'a nodekeeper_proto::v1::RemedyRule>,
) {
    for r in rules {
        let Some(spec) = r.spec.as_ref() else { continue };
        if !selects(spec.node_selector.as_ref(), labels) {
            continue;
        }
        settings.remedy_rules.push(nodekeeper_proto::v1::RemedyRule {
            status: None,
            ..r.clone()
        });
    }
}

/// Adds every Component whose selector matches `labels` (see
/// [`nodekeeper_proto::component::for_node`]).
pub fn add_components<'a>(
    settings: &mut AgentSettings,
    labels: &BTreeMap<String, String>,
    components: impl Iterator<Item = &'a Component>,
    node_sets: &BTreeMap<&str, &NodeSet>,
) {
    settings
        .components
        .extend(nodekeeper_proto::component::for_node(labels, components, node_sets));
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekeeper_proto::v1::{AgentProfileSpec, LabelSelector, ObjectMeta};

    fn profile(
        name: &str,
        sel: &[(&str, &str)],
        level: Option<&str>,
        hb: Option<u32>,
        labels: &[(&str, &str)],
    ) -> AgentProfile {
        AgentProfile {
            metadata: Some(ObjectMeta {
                name: name.into(),
                ..Default::default()
            }),
            spec: Some(AgentProfileSpec {
                node_selector: Some(LabelSelector {
                    match_labels: sel.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                    match_expressions: vec![],
                }),
                log_level: level.map(String::from),
                heartbeat_seconds: hb,
                labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn components_get_the_params_of_the_node_sets_that_select_the_node() {
        use nodekeeper_proto::v1::{ComponentSpec, NodeSetParams, NodeSetSpec};
        let sel = |k: &str, v: &str| LabelSelector {
            match_labels: [(k.to_string(), v.to_string())].into(),
            match_expressions: vec![],
        };
        let ns = |name: &str, k: &str, v: &str| NodeSet {
            metadata: Some(ObjectMeta {
                name: name.into(),
                ..Default::default()
            }),
            spec: Some(NodeSetSpec {
                selector: Some(sel(k, v)),
            }),
            ..Default::default()
        };
        let sets = [ns("east", "zone", "east"), ns("gpu", "gpu", "yes")];
        let node_sets: BTreeMap<&str, &NodeSet> = [("east", &sets[0]), ("gpu", &sets[1])].into();
        let comp = Component {
            metadata: Some(ObjectMeta {
                name: "kubelet".into(),
                generation: 4,
                ..Default::default()
            }),
            spec: Some(ComponentSpec {
                node_selector: Some(sel("role", "worker")),
                version: "1.29".into(),
                params: [
                    ("maxPods".to_string(), "110".to_string()),
                    ("a".to_string(), "1".to_string()),
                ]
                .into(),
                node_set_params: vec![
                    NodeSetParams {
                        node_set: "east".into(),
                        params: [("maxPods".to_string(), "250".to_string())].into(),
                    },
                    NodeSetParams {
                        node_set: "gpu".into(),
                        params: [("a".to_string(), "2".to_string())].into(),
                    },
                ],
                ..Default::default()
            }),
            ..Default::default()
        };
        let labels: BTreeMap<String, String> = [
            ("role".to_string(), "worker".to_string()),
            ("zone".to_string(), "east".to_string()),
        ]
        .into();
        let mut s = AgentSettings::default();
        add_components(&mut s, &labels, std::iter::once(&comp), &node_sets);
        assert_eq!(s.components.len(), 1);
        let d = &s.components[0];
        assert_eq!((d.name.as_str(), d.generation), ("kubelet", 4));
        let spec = d.spec.as_ref().expect("spec");
        assert_eq!(spec.params["maxPods"], "250");
        assert_eq!(spec.params["a"], "1", "the gpu NodeSet does not select this node");
        assert!(spec.node_set_params.is_empty(), "overrides are resolved at the hub");
        let mut other = AgentSettings::default();
        add_components(&mut other, &BTreeMap::new(), std::iter::once(&comp), &node_sets);
        assert!(other.components.is_empty());
    }

    #[test]
    fn defaults_without_profiles() {
        let s = settings(&BTreeMap::new(), std::iter::empty());
        assert_eq!(s.log_level, "info");
        assert_eq!(s.heartbeat_seconds, 10);
        assert!(s.profiles.is_empty());
    }

    #[test]
    fn matching_profiles_merge_in_order_and_others_are_ignored() {
        let ps = [
            profile("a-all", &[], Some("warn"), Some(30), &[("team", "infra")]),
            profile(
                "b-gpu",
                &[("gpu", "yes")],
                Some("debug"),
                None,
                &[("team", "ml"), ("x", "1")],
            ),
            profile("c-arm", &[("arch", "arm64")], Some("trace"), Some(5), &[]),
        ];
        let labels: BTreeMap<String, String> = [("gpu".to_string(), "yes".to_string())].into();
        let s = settings(&labels, ps.iter());
        assert_eq!(s.log_level, "debug");
        assert_eq!(s.heartbeat_seconds, 30);
        assert_eq!(s.labels.get("team").map(String::as_str), Some("ml"));
        assert_eq!(s.labels.get("x").map(String::as_str), Some("1"));
        assert_eq!(s.profiles, vec!["a-all", "b-gpu"]);
    }
}
