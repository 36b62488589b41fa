//! The rollout controller's executor: once a second it gathers what the
//! nodes of each Component look like, asks the pure machine
//! ([`crate::rollout::next`]) what to do, stores the new state and the
//! releases, and only then streams the released nodes their new desired
//! state. Also the operator's verbs: pause, resume, undo.

use std::collections::BTreeMap;

use nodekeeper_proto::component::template;
use nodekeeper_proto::v1::{Component, ComponentSpec, NodeSet, RolloutStatus};
use nodekeeper_proto::{Kind, Resource, ResourceError};

use super::nodes::ready_status;
use super::{Fleet, FleetError, State, push};
use crate::rollout::{self, NodeObs, OTHERS};
use crate::store::Write;

/// Store record kinds of the rollout controller.
pub(crate) const RECORD_ROLLOUT: &str = "rollout";
pub(crate) const RECORD_RELEASE: &str = "release";

fn release_key(component: &str, node: &str) -> String {
    format!("{component}/{node}")
}

/// A Component's template (the revision's content) as JSON, for telling
/// whether an apply changed what nodes run or only how it rolls out.
pub(super) fn template_value(c: &Component) -> serde_json::Value {
    c.spec
        .as_ref()
        .map(|s| serde_json::to_value(template(s)).unwrap_or_default())
        .unwrap_or_default()
}

/// Parses a kept revision body.
pub(super) fn revision_component(body: &serde_json::Value) -> Option<Component> {
    nodekeeper_proto::resource::typed::<Component>(body.clone()).ok()
}

impl State {
    /// The newest kept revision of a Component (its update revision).
    pub(super) fn update_revision(&self, name: &str) -> Option<i64> {
        self.revisions
            .get(&(Kind::Component, name.to_string()))
            .and_then(|r| r.keys().next_back().copied())
    }

    /// The Components a node runs, each at the revision its rollout gives
    /// it: the one released to it, else the current one (none before a
    /// first rollout reaches it).
    pub(super) fn node_components(
        &self,
        labels: &BTreeMap<String, String>,
        released: &BTreeMap<String, i64>,
    ) -> Vec<Component> {
        let mut out = Vec::new();
        for r in self.resources.values() {
            let Resource::Component(c) = r else { continue };
            let Some(spec) = c.spec.as_ref() else { continue };
            if !nodekeeper_proto::selector::selects(spec.node_selector.as_ref(), labels) {
                continue;
            }
            let name = r.name();
            let kept = self.revisions.get(&(Kind::Component, name.to_string()));
            let current = self.rollouts.get(name).map_or(0, |s| s.current_revision);
            let rev = released
                .get(name)
                .copied()
                .filter(|r| kept.is_some_and(|k| k.contains_key(r)))
                .unwrap_or(current);
            let Some(body) = kept.and_then(|k| k.get(&rev)) else {
                continue;
            };
            let Some(mut at) = revision_component(body) else {
                continue;
            };
            // The selector is today's (a node the Component no longer selects
            // keeps nothing), the content the revision's.
            let meta = at.metadata.get_or_insert_with(Default::default);
            meta.generation = rev;
            if let Some(s) = at.spec.as_mut() {
                s.node_selector = spec.node_selector.clone();
            }
            out.push(at);
        }
        out
    }
}

impl Fleet {
    /// The clock of the controllers (tests may move it, see
    /// [`crate::failpoint::now`]).
    pub fn now(&self) -> std::time::SystemTime {
        crate::failpoint::now()
    }

    /// One pass of the rollout controller over every Component.
    pub async fn rollout_pass(&self) {
        let _guard = self.apply_lock.lock().await;
        let started = std::time::Instant::now();
        let now = self.now();
        let mut plans = Vec::new();
        {
            let dirty = self.rollout_dirty.swap(false, std::sync::atomic::Ordering::AcqRel);
            let st = self.lock();
            // Soaks and windows move with the clock; a finished rollout only
            // with its inputs.
            let moving = st.resources.iter().any(|((k, name), _)| {
                *k == Kind::Component
                    && st.rollouts.get(name).is_none_or(|s| {
                        s.phase != rollout::rollout_phase::COMPLETE
                            || Some(s.update_revision) != st.update_revision(name)
                    })
            });
            if !dirty && !moving {
                return;
            }
            let node_sets: BTreeMap<&str, &NodeSet> = st
                .resources
                .iter()
                .filter_map(|((_, name), r)| match r {
                    Resource::NodeSet(ns) => Some((name.as_str(), ns)),
                    _ => None,
                })
                .collect();
            let labels: Vec<(&String, &BTreeMap<String, String>)> =
                st.nodes.iter().map(|(n, e)| (n, &e.base)).collect();
            for r in st.resources.values() {
                let Resource::Component(c) = r else { continue };
                let Some(spec) = c.spec.as_ref() else { continue };
                let name = r.name();
                let Some(update) = st.update_revision(name) else {
                    continue;
                };
                let order: Vec<String> = spec
                    .update_strategy
                    .as_ref()
                    .and_then(|u| u.rolling_update.as_ref())
                    .map(|r| r.node_set_order.clone())
                    .unwrap_or_default();
                let exclude = spec
                    .update_strategy
                    .as_ref()
                    .and_then(|u| u.rolling_update.as_ref())
                    .is_some_and(|r| r.others == "exclude");
                let mut groups = order.clone();
                if !exclude {
                    groups.push(OTHERS.to_string());
                }
                let mut obs = Vec::new();
                for (node, l) in &labels {
                    if !nodekeeper_proto::selector::selects(spec.node_selector.as_ref(), l) {
                        continue;
                    }
                    let Some(e) = st.nodes.get(*node) else { continue };
                    let group = order
                        .iter()
                        .position(|ns| {
                            node_sets
                                .get(ns.as_str())
                                .and_then(|s| s.spec.as_ref())
                                .is_some_and(|s| nodekeeper_proto::selector::selects(s.selector.as_ref(), l))
                        })
                        .or(if exclude { None } else { Some(order.len()) });
                    let status = e.node.status.as_ref();
                    let reported = status.and_then(|s| s.components.iter().find(|x| x.name == name));
                    obs.push(NodeObs {
                        name: node.as_str(),
                        group,
                        ready: ready_status(&e.node) == "True",
                        released: status.and_then(|s| s.released.get(name)).copied().unwrap_or(0),
                        reported_generation: reported.map_or(0, |x| x.generation),
                        reported_phase: reported.map_or("", |x| x.phase.as_str()),
                    });
                }
                let d = rollout::next(spec, update, &groups, &obs, st.rollouts.get(name), now);
                plans.push((name.to_string(), d));
            }
        }
        // Store the state and the releases first: a node is never told of a
        // revision the store does not know was released to it.
        let mut writes = Vec::new();
        let mut released = 0u64;
        {
            let st = self.lock();
            for (name, d) in &plans {
                if st.rollouts.get(name) != Some(&d.state) {
                    writes.push(Write::PutRecord {
                        kind: RECORD_ROLLOUT,
                        key: name.clone(),
                        body: serde_json::to_string(&d.state).unwrap_or_default(),
                    });
                }
                for node in &d.release {
                    released += 1;
                    writes.push(Write::PutRecord {
                        kind: RECORD_RELEASE,
                        key: release_key(name, node),
                        body: d.state.update_revision.to_string(),
                    });
                }
                for (reason, message) in &d.events {
                    tracing::info!(component = %name, reason = %reason, "{message}");
                }
            }
        }
        if !writes.is_empty()
            && let Err(e) = self.store.commit(writes).await
        {
            tracing::error!(error = %e, "cannot store the rollout's decisions; retrying next pass");
            return;
        }
        if released > 0 {
            self.ensure_reserved(released).await;
        }
        let mut pushes = Vec::new();
        {
            let mut st = self.lock();
            let mut cache = std::mem::take(&mut st.settings_cache);
            for (name, d) in plans {
                let current_changed =
                    st.rollouts.get(&name).map(|s| s.current_revision) != Some(d.state.current_revision);
                for node in &d.release {
                    if let Some(e) = st.nodes.get_mut(node) {
                        e.node
                            .status
                            .get_or_insert_with(Default::default)
                            .released
                            .insert(name.clone(), d.state.update_revision);
                    }
                }
                let rev = d.state.update_revision;
                st.rollouts.insert(name.clone(), d.state);
                st.rollout_status.insert(name.clone(), d.status);
                if current_changed {
                    // Nodes that run the current revision change with it.
                    cache.clear();
                    let all: Vec<String> = st.nodes.keys().cloned().collect();
                    self.reserve_revisions(&mut st, all.len() as u64);
                    for n in all {
                        pushes.extend(st.recompute(&n, &mut cache));
                    }
                } else if !d.release.is_empty() {
                    self.reserve_revisions(&mut st, d.release.len() as u64);
                    for n in &d.release {
                        pushes.extend(st.recompute(n, &mut cache));
                    }
                    tracing::info!(component = %name, revision = rev, nodes = d.release.len(), "released nodes");
                }
            }
            st.settings_cache = cache;
        }
        self.metrics.rollout_released.inc_by(released);
        self.metrics.desired_pushed.inc_by(pushes.len() as u64);
        for (tx, d) in pushes {
            push(&tx, d);
        }
        self.metrics.rollout_seconds.inc_by(started.elapsed().as_secs_f64());
    }

    /// The rollout status of a Component (as the last pass computed it).
    pub fn rollout_status(&self, name: &str) -> Option<RolloutStatus> {
        self.lock().rollout_status.get(name).cloned()
    }

    /// `nkctl rollout pause|resume`: sets `spec.paused` (a spec change that
    /// is not a new revision). Resume also accepts the failures that paused
    /// the rollout, so it goes on until `failureThreshold` more fail.
    pub async fn set_paused(&self, name: &str, paused: bool) -> Result<serde_json::Value, FleetError> {
        let Resource::Component(mut c) = self.resource(Kind::Component, name)? else {
            return Err(not_component(name));
        };
        let spec = c.spec.get_or_insert_with(Default::default);
        spec.paused = paused;
        if let Some(m) = c.metadata.as_mut() {
            m.resource_version.clear();
        }
        if !paused {
            // Serialized with the controller's passes, so none overwrites it.
            let _guard = self.apply_lock.lock().await;
            let body = {
                let mut st = self.lock();
                let failed: u64 = st
                    .rollout_status
                    .get(name)
                    .map_or(0, |s| s.node_sets.iter().map(|g| g.failed).sum());
                st.rollouts.get_mut(name).map(|state| {
                    rollout::resume(state, failed);
                    serde_json::to_string(state).unwrap_or_default()
                })
            };
            if let Some(body) = body {
                self.store
                    .commit(vec![Write::PutRecord {
                        kind: RECORD_ROLLOUT,
                        key: name.to_string(),
                        body,
                    }])
                    .await
                    .map_err(FleetError::Store)?;
            }
        }
        let mut out = self.apply(vec![Resource::Component(c)]).await?;
        Ok(out.pop().map(|r| r.resource).unwrap_or_default())
    }

    /// `nkctl rollout undo [--to-revision N]`: applies revision N's content
    /// (by default the one before the update revision) as a new revision,
    /// which rolls out with the Component's strategy and budgets.
    pub async fn undo(&self, name: &str, to: Option<i64>) -> Result<serde_json::Value, FleetError> {
        let Resource::Component(cur) = self.resource(Kind::Component, name)? else {
            return Err(not_component(name));
        };
        let (target, update) = {
            let st = self.lock();
            let kept = st.revisions.get(&(Kind::Component, name.to_string()));
            let update = st.update_revision(name).unwrap_or(0);
            let rev = match to {
                Some(n) => n,
                None => kept
                    .and_then(|k| k.range(..update).next_back().map(|(g, _)| *g))
                    .ok_or_else(|| FleetError::Conflict {
                        field: "toRevision".into(),
                        message: format!("component {name:?} has no revision before {update} to go back to"),
                    })?,
            };
            let body = kept.and_then(|k| k.get(&rev)).ok_or_else(|| FleetError::Conflict {
                field: "toRevision".into(),
                message: format!(
                    "revision {rev} of component {name:?} is not kept (kept: {:?}); see nkctl rollout history",
                    kept.map(|k| k.keys().copied().collect::<Vec<_>>()).unwrap_or_default()
                ),
            })?;
            (revision_component(body), update)
        };
        let target = target
            .and_then(|t| t.spec)
            .ok_or_else(|| FleetError::Store("a kept revision does not parse".into()))?;
        let spec = cur.spec.clone().unwrap_or_default();
        let new_spec = ComponentSpec {
            update_strategy: spec.update_strategy.clone(),
            paused: spec.paused,
            ..template(&target)
        };
        if template(&new_spec) == template(&spec) {
            return Err(FleetError::Conflict {
                field: "toRevision".into(),
                message: format!("component {name:?} already runs that content (revision {update})"),
            });
        }
        let mut c = (*cur).clone();
        c.spec = Some(new_spec);
        if let Some(m) = c.metadata.as_mut() {
            m.resource_version.clear();
        }
        let mut out = self.apply(vec![Resource::Component(Box::new(c))]).await?;
        Ok(out.pop().map(|r| r.resource).unwrap_or_default())
    }

    fn resource(&self, kind: Kind, name: &str) -> Result<Resource, FleetError> {
        self.lock()
            .resources
            .get(&(kind, name.to_string()))
            .cloned()
            .ok_or_else(|| FleetError::NotFound {
                kind: kind.name().into(),
                name: name.into(),
            })
    }

    /// The writes that forget a deleted Component's rollout and releases.
    pub(super) fn forget_rollout_writes(st: &State, name: &str) -> Vec<Write> {
        let mut writes = vec![Write::DeleteRecord {
            kind: RECORD_ROLLOUT,
            key: name.to_string(),
        }];
        for (node, e) in &st.nodes {
            if e.node.status.as_ref().is_some_and(|s| s.released.contains_key(name)) {
                writes.push(Write::DeleteRecord {
                    kind: RECORD_RELEASE,
                    key: release_key(name, node),
                });
            }
        }
        writes
    }

    /// Forgets a deleted Component's rollout in memory (after the store did).
    pub(super) fn forget_rollout(st: &mut State, name: &str) {
        st.rollouts.remove(name);
        st.rollout_status.remove(name);
        for e in st.nodes.values_mut() {
            if let Some(s) = e.node.status.as_mut() {
                s.released.remove(name);
            }
        }
    }
}

fn not_component(name: &str) -> FleetError {
    FleetError::Invalid(ResourceError::new(
        "metadata.name",
        format!("{name:?} is not a Component"),
    ))
}

/// Loads the controller's records at start. Components that have revisions
/// but no rollout state (applied before rollouts existed) count as rolled
/// out: every node keeps what it runs.
pub(super) fn load(st: &mut State, records: &[(String, String, String)]) {
    for (kind, key, body) in records {
        match kind.as_str() {
            RECORD_ROLLOUT => match serde_json::from_str::<rollout::State>(body) {
                Ok(s) => {
                    st.rollouts.insert(key.clone(), s);
                }
                Err(e) => {
                    tracing::error!(component = %key, error = %e, "stored rollout state does not parse; the rollout starts over")
                }
            },
            RECORD_RELEASE => {
                let Some((component, node)) = key.split_once('/') else {
                    continue;
                };
                let Ok(rev) = body.parse::<i64>() else { continue };
                if let Some(e) = st.nodes.get_mut(node) {
                    e.node
                        .status
                        .get_or_insert_with(Default::default)
                        .released
                        .insert(component.to_string(), rev);
                }
            }
            _ => {}
        }
    }
    let names: Vec<String> = st
        .resources
        .keys()
        .filter(|(k, _)| *k == Kind::Component)
        .map(|(_, n)| n.clone())
        .collect();
    for name in names {
        if st.rollouts.contains_key(&name) {
            continue;
        }
        if let Some(rev) = st.update_revision(&name) {
            st.rollouts.insert(
                name,
                rollout::State {
                    update_revision: rev,
                    current_revision: rev,
                    phase: rollout::rollout_phase::COMPLETE.into(),
                    ..Default::default()
                },
            );
        }
    }
}
