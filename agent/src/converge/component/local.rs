//! A standalone agent's components: Component documents (and the NodeSets
//! their `nodeSetParams` name) read from local files, selected and resolved
//! against the node's own labels exactly as the hub would.

use std::collections::BTreeMap;
use std::path::PathBuf;

use nodekeeper_proto::Resource;
use nodekeeper_proto::v1::{Component, DesiredComponent, NodeSet};

/// Reads every file; the first problem names the file, the document and the
/// field, and nothing is used.
pub fn load(files: &[PathBuf], labels: &BTreeMap<String, String>) -> Result<Vec<DesiredComponent>, String> {
    let mut components: BTreeMap<String, Component> = BTreeMap::new();
    let mut node_sets: BTreeMap<String, NodeSet> = BTreeMap::new();
    for (i, f) in files.iter().enumerate() {
        let at = format!("converge.components[{i}] {}", f.display());
        let text = std::fs::read_to_string(f).map_err(|e| format!("{at}: {e}"))?;
        let docs = nodekeeper_proto::document::parse_resources(&text).map_err(|e| format!("{at}: {e}"))?;
        for r in docs {
            let name = r.name().to_string();
            let dup = match r {
                Resource::Component(c) => components.insert(name.clone(), *c).is_some(),
                Resource::NodeSet(ns) => node_sets.insert(name.clone(), ns).is_some(),
                other => {
                    return Err(format!(
                        "{at}: {} {name:?}: only Component and NodeSet documents belong here",
                        other.kind().name()
                    ));
                }
            };
            if dup {
                return Err(format!("{at}: {name:?} is defined twice"));
            }
        }
    }
    let mut claimed: BTreeMap<String, String> = BTreeMap::new();
    for (name, c) in &components {
        for (field, key) in c
            .spec
            .as_ref()
            .map(nodekeeper_proto::component::claims)
            .unwrap_or_default()
        {
            if let Some(other) = claimed.insert(key.clone(), name.clone()) {
                return Err(format!(
                    "Component {name:?} {field}: {key} is already managed by Component {other:?}"
                ));
            }
        }
    }
    let sets: BTreeMap<&str, &NodeSet> = node_sets.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = nodekeeper_proto::component::for_node(labels, components.values(), &sets);
    for d in &mut out {
        d.generation = d.generation.max(1);
    }
    Ok(out)
}
