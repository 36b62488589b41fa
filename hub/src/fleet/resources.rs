//! Operator resources: apply with optimistic concurrency and generations,
//! list/get with computed status, delete; every change recomputes the
//! desired state of the nodes and streams what changed.

use nodekeeper_proto::component::phase;
use nodekeeper_proto::time::now_rfc3339;
use nodekeeper_proto::v1::{AgentProfileStatus, ComponentStatus, DetectorSetStatus, NodeSetStatus};
use nodekeeper_proto::{Kind, Resource};

use super::nodes::{base_labels, in_sync, ready_status};
use super::{COUNTER_RESOURCE_VERSION, Fleet, FleetError, SettingsCache, State, push};
use crate::store::Write;

pub use nodekeeper_proto::api::{ApplyAction, ApplyResult};

impl State {
    fn with_status(&self, r: &Resource) -> Resource {
        let mut r = r.clone();
        match &mut r {
            Resource::NodeSet(ns) => {
                let sel = ns.spec.as_ref().and_then(|s| s.selector.as_ref());
                let mut st = NodeSetStatus::default();
                for e in self.nodes.values() {
                    if nodekeeper_proto::selector::selects(sel, &base_labels(&e.node, &self.protected_label_keys)) {
                        st.nodes += 1;
                        if ready_status(&e.node) == "True" {
                            st.ready += 1;
                        }
                    }
                }
                ns.status = Some(st);
            }
            Resource::AgentProfile(ap) => {
                let name = ap.metadata.as_ref().map(|m| m.name.as_str()).unwrap_or_default();
                let mut st = AgentProfileStatus::default();
                for e in self.nodes.values() {
                    let selected = e
                        .settings
                        .as_ref()
                        .map(|s| &s.value)
                        .is_some_and(|s| s.profiles.iter().any(|p| p == name));
                    if selected {
                        st.selected_nodes += 1;
                        if in_sync(&e.node) {
                            st.in_sync_nodes += 1;
                        }
                    }
                }
                ap.status = Some(st);
            }
            Resource::DetectorSet(ds) => {
                let name = ds.metadata.as_ref().map(|m| m.name.as_str()).unwrap_or_default();
                let selected = self
                    .nodes
                    .values()
                    .filter(|e| {
                        e.settings
                            .as_ref()
                            .map(|s| &s.value)
                            .is_some_and(|s| s.detector_sets.iter().any(|d| d == name))
                    })
                    .count() as u64;
                ds.status = Some(DetectorSetStatus {
                    selected_nodes: selected,
                });
            }
            Resource::DisruptionBudget(b) => {
                let name = b.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default();
                b.status = Some(Fleet::budget_status(self, &name));
            }
            Resource::RemedyRule(r) => {
                let name = r.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default();
                r.status = Some(self.remedy_status(&name, crate::defender::unix_ms(crate::failpoint::now())));
            }
            Resource::Component(c) => {
                let meta = c.metadata.clone().unwrap_or_default();
                let version = c.spec.as_ref().map(|s| s.version.as_str()).unwrap_or_default();
                let update = self.update_revision(&meta.name).unwrap_or(meta.generation);
                let mut st = ComponentStatus::default();
                for e in self.nodes.values() {
                    let Some(status) = e.node.status.as_ref() else { continue };
                    let selected = e
                        .settings
                        .as_ref()
                        .is_some_and(|s| s.value.components.iter().any(|d| d.name == meta.name));
                    if !selected {
                        continue;
                    }
                    st.selected_nodes += 1;
                    let reported = status.components.iter().find(|x| x.name == meta.name);
                    let (observed, ph) = match reported {
                        Some(x) if !x.observed_version.is_empty() => (x.observed_version.as_str(), x.phase.as_str()),
                        Some(x) => ("none", x.phase.as_str()),
                        None => ("none", phase::PENDING),
                    };
                    *st.versions.entry(observed.to_string()).or_default() += 1;
                    *st.phases.entry(ph.to_string()).or_default() += 1;
                    let current = reported.is_some_and(|x| x.generation == update);
                    if current && ph == phase::DONE && observed == version {
                        st.updated_nodes += 1;
                    }
                    if current && ph == phase::FAILED {
                        st.failed_nodes += 1;
                    }
                }
                if st.selected_nodes > 0 {
                    st.consistency_percent =
                        (st.updated_nodes as f64 * 10000.0 / st.selected_nodes as f64).round() / 100.0;
                }
                st.revisions = self
                    .revisions
                    .get(&(Kind::Component, meta.name.clone()))
                    .map(|r| r.keys().copied().collect())
                    .unwrap_or_default();
                st.rollout = self.rollout_status.get(&meta.name).cloned();
                c.status = Some(st);
            }
        }
        r
    }
}

/// Refuses an apply after which two Components would claim the same file,
/// install directory, unit or package.
fn check_claims(st: &State, planned: &[(ApplyAction, Resource)]) -> Result<(), FleetError> {
    let planned_names: Vec<&str> = planned
        .iter()
        .filter(|(_, r)| r.kind() == Kind::Component)
        .map(|(_, r)| r.name())
        .collect();
    let mut owners: std::collections::HashMap<String, &str> = std::collections::HashMap::new();
    for ((kind, name), r) in &st.resources {
        if *kind != Kind::Component || planned_names.contains(&name.as_str()) {
            continue;
        }
        if let Resource::Component(c) = r
            && let Some(spec) = &c.spec
        {
            for (_, key) in nodekeeper_proto::component::claims(spec) {
                owners.insert(key, name);
            }
        }
    }
    for (i, (_, r)) in planned.iter().enumerate() {
        let Resource::Component(c) = r else { continue };
        let Some(spec) = &c.spec else { continue };
        for (field, key) in nodekeeper_proto::component::claims(spec) {
            match owners.get(&key) {
                Some(other) if *other != r.name() => {
                    return Err(FleetError::Conflict {
                        field,
                        message: format!(
                            "document {}: {key} is already managed by Component {other:?}; one component owns it",
                            i + 1
                        ),
                    });
                }
                _ => {
                    owners.insert(key, r.name());
                }
            }
        }
    }
    Ok(())
}

/// Kinds whose every spec change is kept as a revision (for history and
/// `rollout undo`).
fn keeps_revisions(kind: Kind) -> bool {
    kind == Kind::Component
}

fn not_found(kind: Kind, name: &str) -> FleetError {
    FleetError::NotFound {
        kind: kind.name().into(),
        name: name.into(),
    }
}

impl Fleet {
    /// Whether `r` (a Component) changes what nodes run compared with its
    /// newest kept revision; a change of `updateStrategy` or `paused` alone
    /// is no new revision, so it starts no rollout.
    fn template_changed(&self, r: &Resource) -> bool {
        let Resource::Component(c) = r else { return true };
        let st = self.lock();
        let latest = st
            .revisions
            .get(&(Kind::Component, r.name().to_string()))
            .and_then(|k| k.values().next_back())
            .and_then(super::rollouts::revision_component);
        latest.is_none_or(|l| super::rollouts::template_value(&l) != super::rollouts::template_value(c))
    }

    /// Applies validated resources as one unit: every document is checked
    /// (resourceVersion conflicts) before any is written, and all writes are
    /// committed in one transaction. Applying the same document twice changes
    /// nothing.
    pub async fn apply(&self, docs: Vec<Resource>) -> Result<Vec<ApplyResult>, FleetError> {
        let _guard = self.apply_lock.lock().await;
        // 1. Plan against the current state.
        let mut planned: Vec<(ApplyAction, Resource)> = Vec::new();
        let mut rv;
        {
            let st = self.lock();
            rv = st.resource_version;
            for (i, mut doc) in docs.into_iter().enumerate() {
                let key = (doc.kind(), doc.name().to_string());
                if planned
                    .iter()
                    .any(|(_, p)| (p.kind(), p.name()) == (key.0, key.1.as_str()))
                {
                    return Err(FleetError::Conflict {
                        field: "metadata.name".into(),
                        message: format!(
                            "document {}: {} {:?} appears twice in one apply",
                            i + 1,
                            key.0.name(),
                            key.1
                        ),
                    });
                }
                doc.normalize_envelope();
                let sent_rv = doc.metadata().resource_version.clone();
                let existing = st.resources.get(&key);
                match existing {
                    None if !sent_rv.is_empty() => {
                        return Err(FleetError::Conflict {
                            field: "metadata.resourceVersion".into(),
                            message: format!(
                                "document {}: {} {:?} does not exist; remove metadata.resourceVersion to create it",
                                i + 1,
                                key.0.name(),
                                key.1
                            ),
                        });
                    }
                    Some(cur) if !sent_rv.is_empty() && sent_rv != cur.metadata().resource_version => {
                        return Err(FleetError::Conflict {
                            field: "metadata.resourceVersion".into(),
                            message: format!(
                                "document {}: {} {:?} was changed since it was read (resourceVersion {} is stale, current {}); get it again and reapply",
                                i + 1,
                                key.0.name(),
                                key.1,
                                sent_rv,
                                cur.metadata().resource_version
                            ),
                        });
                    }
                    _ => {}
                }
                let action = match existing {
                    None => {
                        rv += 1;
                        let m = doc.metadata_mut();
                        m.generation = 1;
                        m.creation_timestamp = now_rfc3339();
                        m.resource_version = rv.to_string();
                        ApplyAction::Created
                    }
                    Some(cur) => {
                        let spec_changed = cur.spec_value() != doc.spec_value();
                        let labels_changed = cur.metadata().labels != doc.metadata().labels;
                        let cm = cur.metadata().clone();
                        let m = doc.metadata_mut();
                        m.creation_timestamp = cm.creation_timestamp;
                        if !spec_changed && !labels_changed {
                            m.generation = cm.generation;
                            m.resource_version = cm.resource_version;
                            ApplyAction::Unchanged
                        } else {
                            rv += 1;
                            m.generation = cm.generation + u64::from(spec_changed) as i64;
                            m.resource_version = rv.to_string();
                            ApplyAction::Configured
                        }
                    }
                };
                planned.push((action, doc));
            }
        }
        {
            let st = self.lock();
            check_claims(&st, &planned)?;
        }
        // 2. Commit the resources.
        let mut writes: Vec<Write> = Vec::new();
        let mut new_revisions = Vec::new();
        for (a, r) in &planned {
            if *a == ApplyAction::Unchanged {
                continue;
            }
            let body = r.to_value();
            writes.push(Write::PutResource {
                kind: r.kind().name().into(),
                name: r.name().into(),
                body: body.to_string(),
            });
            if keeps_revisions(r.kind()) && self.template_changed(r) {
                let generation = r.metadata().generation;
                writes.push(Write::PutRevision {
                    kind: r.kind().name().into(),
                    name: r.name().into(),
                    generation,
                    body: body.to_string(),
                });
                new_revisions.push(((r.kind(), r.name().to_string()), generation, body));
                let limit = self.config.revision_history_limit as i64;
                if generation > limit {
                    writes.push(Write::DeleteRevisionsUpTo {
                        kind: r.kind().name().into(),
                        name: r.name().into(),
                        generation: generation - limit,
                    });
                }
            }
        }
        if !writes.is_empty() {
            writes.push(Write::Counter {
                key: COUNTER_RESOURCE_VERSION,
                value: rv,
            });
            self.store.commit(writes).await.map_err(FleetError::Store)?;
        }
        // 3. Install in memory, stream the nodes' new desired state, then
        // answer with the resources' status (which counts the nodes).
        {
            let mut st = self.lock();
            st.resource_version = rv;
            for (a, r) in &planned {
                if *a != ApplyAction::Unchanged {
                    st.resources.insert((r.kind(), r.name().to_string()), r.clone());
                }
            }
            let limit = self.config.revision_history_limit as i64;
            for (key, generation, body) in new_revisions {
                let kept = st.revisions.entry(key).or_default();
                kept.insert(generation, body);
                kept.retain(|g, _| *g > generation - limit);
            }
            st.settings_cache.clear();
        }
        if planned.iter().any(|(a, _)| *a != ApplyAction::Unchanged) {
            let nodes = self.lock().nodes.len() as u64;
            self.ensure_reserved(nodes).await;
            // The fan-out takes CPU for the whole fleet: off the runtime's workers.
            nodekeeper_proto::daemon::off_runtime(|| self.fan_out());
            self.rollouts_changed();
        }
        let st = self.lock();
        let results = planned
            .iter()
            .map(|(a, r)| ApplyResult {
                action: *a,
                resource: st.with_status(r).to_value(),
            })
            .collect();
        Ok(results)
    }

    /// Recomputes every node's desired state and streams each change at
    /// once, so delivery overlaps the rest of the computation. The fleet lock
    /// is taken per chunk of nodes, so acknowledgements and heartbeats are
    /// served in between. Revisions are reserved for every node first, so
    /// pushes need not wait for a commit. Nothing is written per node here: a
    /// node's revisions are stored when it acknowledges them, and a restarted
    /// hub recomputes every node from the stored resources anyway (a node that
    /// had not acknowledged simply gets a newer revision). Callers hold
    /// `apply_lock`, so resources do not change meanwhile.
    fn fan_out(&self) {
        const CHUNK: usize = 512;
        let names: Vec<String> = self.lock().nodes.keys().cloned().collect();
        let mut cache = SettingsCache::default();
        let mut changed = 0u64;
        for chunk in names.chunks(CHUNK) {
            let mut st = self.lock();
            self.reserve_revisions(&mut st, chunk.len() as u64);
            for name in chunk {
                if let Some((tx, d)) = st.recompute(name, &mut cache) {
                    push(&tx, d);
                    changed += 1;
                }
            }
        }
        self.metrics.desired_pushed.inc_by(changed);
        // Valid until resources change again (apply and delete clear it).
        self.lock().settings_cache = cache;
    }

    /// Every resource of a kind, sorted by name, with computed status.
    pub fn list(&self, kind: Kind) -> Vec<serde_json::Value> {
        let st = self.lock();
        st.resources
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|(_, r)| st.with_status(r).to_value())
            .collect()
    }

    /// One resource with computed status.
    pub fn get(&self, kind: Kind, name: &str) -> Result<serde_json::Value, FleetError> {
        let st = self.lock();
        st.resources
            .get(&(kind, name.to_string()))
            .map(|r| st.with_status(r).to_value())
            .ok_or_else(|| not_found(kind, name))
    }

    /// Sets the per-Component gauges from the nodes' reports (at scrape
    /// time; the same counts as the Components' status).
    pub fn refresh_component_metrics(&self) {
        let st = self.lock();
        let m = &self.metrics;
        m.component_nodes.clear();
        m.component_updated.clear();
        m.component_selected.clear();
        for ((kind, name), r) in &st.resources {
            if *kind != Kind::Component {
                continue;
            }
            let Resource::Component(c) = st.with_status(r) else {
                continue;
            };
            let status = c.status.unwrap_or_default();
            let label = crate::metrics::ComponentLabel {
                component: name.clone(),
            };
            m.component_selected
                .get_or_create(&label)
                .set(status.selected_nodes as i64);
            m.component_updated
                .get_or_create(&label)
                .set(status.updated_nodes as i64);
            for (phase, n) in status.phases {
                m.component_nodes
                    .get_or_create(&crate::metrics::ComponentPhase {
                        component: name.clone(),
                        phase,
                    })
                    .set(n as i64);
            }
        }
    }

    /// Every kept revision of a resource, oldest first (`{"items": [...]}`
    /// of whole resources as they were applied).
    pub fn revisions(&self, kind: Kind, name: &str) -> Result<Vec<serde_json::Value>, FleetError> {
        let st = self.lock();
        if !st.resources.contains_key(&(kind, name.to_string())) {
            return Err(not_found(kind, name));
        }
        Ok(st
            .revisions
            .get(&(kind, name.to_string()))
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default())
    }

    /// Deletes a resource and recomputes the nodes it affected.
    pub async fn delete(&self, kind: Kind, name: &str) -> Result<serde_json::Value, FleetError> {
        let _guard = self.apply_lock.lock().await;
        let existing = self.get(kind, name)?;
        let mut writes = vec![Write::DeleteResource {
            kind: kind.name().into(),
            name: name.into(),
        }];
        if kind == Kind::Component {
            writes.extend(Self::forget_rollout_writes(&self.lock(), name));
        }
        self.store.commit(writes).await.map_err(FleetError::Store)?;
        {
            let mut st = self.lock();
            if kind == Kind::Component {
                Self::forget_rollout(&mut st, name);
            }
            st.resources.remove(&(kind, name.to_string()));
            st.revisions.remove(&(kind, name.to_string()));
            st.settings_cache.clear();
        }
        let nodes = self.lock().nodes.len() as u64;
        self.ensure_reserved(nodes).await;
        // The fan-out takes CPU for the whole fleet: off the runtime's workers.
        nodekeeper_proto::daemon::off_runtime(|| self.fan_out());
        self.rollouts_changed();
        Ok(existing)
    }
}
