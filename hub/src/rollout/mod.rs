//! Component rollouts, NodeSet by NodeSet: the pure state machine.
//!
//! [`next`] takes a Component's strategy, its revisions, what the nodes it
//! selects look like now and the time, and returns the rollout's new state,
//! the nodes to release to the update revision and the status to show. It
//! does no I/O; the executor (`fleet/rollouts.rs`) gathers the observations
//! under the fleet lock, persists the state and the releases in the store
//! and streams the released nodes their new desired state. Everything it
//! needs to resume lives in [`State`] (stored) and in the nodes' `released`
//! revisions (stored with the nodes), so a hub killed at any point resumes
//! the rollout where it stood, and a second hub on the same store would
//! compute the same decisions.
//!
//! ```text
//!            ┌────── spec.paused / failureThreshold ─────┐
//!            ▼                                            │
//! new revision → Progressing: canary → soak → NodeSet 1 → soak → … → others → Complete
//!                                                                   (keeps releasing stragglers)
//! ```
//!
//! Budgets: the strategy's `maxUnavailable` bounds how many nodes of a
//! NodeSet are being changed at once; the defender's DisruptionBudgets bound
//! how many nodes are unavailable for any reason, NotReady ones included.
//! A node that is NotReady before the rollout reaches it is skipped and
//! listed (it takes no slot, so it cannot stall the rollout, Kubernetes
//! #117204) and is released once it is Ready again.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nodekeeper_proto::component::{ALL_AT_ONCE, phase};
use nodekeeper_proto::count::Count;
use nodekeeper_proto::v1::{ComponentSpec, NodeSetRollout, RollingUpdate, RolloutStatus};
use serde::{Deserialize, Serialize};

/// Rollout phases (`status.rollout.phase`).
pub mod rollout_phase {
    pub const PROGRESSING: &str = "Progressing";
    pub const PAUSED: &str = "Paused";
    pub const COMPLETE: &str = "Complete";
    pub const FAILED: &str = "Failed";
}

/// Phases of one NodeSet within a rollout.
pub mod set_phase {
    pub const PENDING: &str = "Pending";
    pub const PROGRESSING: &str = "Progressing";
    pub const SOAKING: &str = "Soaking";
    pub const COMPLETE: &str = "Complete";
}

/// The name of the canary group in the status.
pub const CANARY: &str = "canary";
/// The group of nodes in none of the ordered NodeSets.
pub const OTHERS: &str = "others";
/// Skipped nodes listed in the status.
const MAX_LISTED: usize = 100;

/// What the rollout keeps between decisions (stored as JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct State {
    /// The revision being rolled out.
    pub update_revision: i64,
    /// The revision nodes had before (0: none; they get nothing until released).
    pub current_revision: i64,
    pub phase: String,
    pub reason: String,
    /// Unix seconds.
    pub started_at: u64,
    pub phase_since: u64,
    /// Canary nodes, chosen when the rollout started.
    pub canary: Vec<String>,
    /// Group name → when it completed (Unix seconds): the soak clock.
    pub completed_at: BTreeMap<String, u64>,
    /// Group name → its phase and since when (Unix seconds).
    pub group_phase: BTreeMap<String, (String, u64)>,
    /// Failed nodes accepted by `rollout resume`.
    pub failures_accepted: u64,
    /// Paused because failures reached the threshold (until a resume).
    pub failure_paused: bool,
    /// Nodes skipped because they were NotReady when the rollout reached them.
    pub skipped: BTreeSet<String>,
}

/// One node the Component selects, as the executor saw it.
#[derive(Debug, Clone)]
pub struct NodeObs<'a> {
    pub name: &'a str,
    /// Index into the rollout's groups (NodeSet order, then others);
    /// `None`: excluded (`others: exclude`).
    pub group: Option<usize>,
    /// Ready is True.
    pub ready: bool,
    /// The revision released to it (0: none).
    pub released: i64,
    /// The generation and phase its agent last reported for the component.
    pub reported_generation: i64,
    pub reported_phase: &'a str,
}

impl NodeObs<'_> {
    fn updated(&self, rev: i64) -> bool {
        self.reported_generation == rev && self.reported_phase == phase::DONE
    }
    fn failed(&self, rev: i64) -> bool {
        self.reported_generation == rev && self.reported_phase == phase::FAILED
    }
    fn in_progress(&self, rev: i64) -> bool {
        self.released == rev && !self.updated(rev) && !self.failed(rev)
    }
}

/// What the controller must do.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decisions {
    pub state: State,
    /// Nodes to release to `state.update_revision` now.
    pub release: Vec<String>,
    pub status: RolloutStatus,
    /// Events worth telling (phase changes), as (reason, message).
    pub events: Vec<(String, String)>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn rfc3339(secs: u64) -> String {
    nodekeeper_proto::time::rfc3339(UNIX_EPOCH + Duration::from_secs(secs))
}

/// Per-group counts of one decision.
#[derive(Default, Clone)]
struct Group {
    name: String,
    members: Vec<usize>,
    updated: u64,
    failed: u64,
    in_progress: u64,
    not_ready: u64,
    partitioned: u64,
    skipped: u64,
    /// Members still to change (not partitioned, not updated or failed).
    remaining: u64,
}

/// The rollout's decisions for one Component.
///
/// `groups` are the group names in order (the ordered NodeSets, then
/// [`OTHERS`]); `nodes` are the nodes the Component selects; `previous` is
/// the stored state (None: the Component never rolled out).
pub fn next(
    spec: &ComponentSpec,
    update_revision: i64,
    groups: &[String],
    nodes: &[NodeObs<'_>],
    previous: Option<&State>,
    now: SystemTime,
) -> Decisions {
    let t = unix(now);
    let strategy = spec.update_strategy.clone().unwrap_or_default();
    let all_at_once = strategy.r#type == ALL_AT_ONCE;
    let ru: RollingUpdate = strategy.rolling_update.unwrap_or_default();
    let u = update_revision;
    let mut events = Vec::new();

    // A new revision starts a new rollout from where the nodes are.
    let mut st = match previous {
        Some(p) if p.update_revision == u => p.clone(),
        p => {
            let current = match p {
                Some(p) if p.phase == rollout_phase::COMPLETE => p.update_revision,
                Some(p) => p.current_revision,
                None => 0,
            };
            events.push((
                "RolloutStarted".to_string(),
                format!("revision {u} starts rolling out (current revision {current})"),
            ));
            State {
                update_revision: u,
                current_revision: current,
                phase: rollout_phase::PROGRESSING.into(),
                started_at: t,
                phase_since: t,
                ..Default::default()
            }
        }
    };

    // Rollout order: canary, then group order, by name within a group.
    let mut order: Vec<usize> = (0..nodes.len()).filter(|&i| nodes[i].group.is_some()).collect();
    order.sort_by(|&a, &b| (nodes[a].group, nodes[a].name).cmp(&(nodes[b].group, nodes[b].name)));
    let total = order.len() as u64;
    let partition = Count::resolve(&ru.partition, total, 0) as usize;
    let in_partition: BTreeSet<usize> = if all_at_once {
        BTreeSet::new()
    } else {
        order.iter().rev().take(partition).copied().collect()
    };
    if !all_at_once && st.started_at == t && st.canary.is_empty() {
        let k = ru.canary.as_ref().map_or(0, |c| Count::resolve(&c.nodes, total, 0)) as usize;
        st.canary = order
            .iter()
            .filter(|i| !in_partition.contains(i) && nodes[**i].ready)
            .take(k)
            .map(|&i| nodes[i].name.to_string())
            .collect();
    }
    let canary: BTreeSet<&str> = st.canary.iter().map(String::as_str).collect();

    // Count per group; the canary is group 0 of the status when it exists.
    let mut gs: Vec<Group> = Vec::new();
    if !canary.is_empty() {
        gs.push(Group {
            name: CANARY.into(),
            ..Default::default()
        });
    }
    let base = gs.len();
    for g in groups {
        gs.push(Group {
            name: g.clone(),
            ..Default::default()
        });
    }
    let mut skipped_now = BTreeSet::new();
    for &i in &order {
        let n = &nodes[i];
        let gi = if canary.contains(n.name) {
            0
        } else {
            base + n.group.unwrap_or(0)
        };
        let Some(g) = gs.get_mut(gi) else { continue };
        g.members.push(i);
        if !n.ready {
            g.not_ready += 1;
        }
        if in_partition.contains(&i) {
            g.partitioned += 1;
        } else if n.updated(u) {
            g.updated += 1;
        } else if n.failed(u) {
            g.failed += 1;
        } else {
            if n.in_progress(u) {
                g.in_progress += 1;
            } else if !n.ready {
                g.skipped += 1;
                skipped_now.insert(n.name.to_string());
            }
            g.remaining += 1;
        }
    }
    st.skipped = skipped_now;
    let failed: u64 = gs.iter().map(|g| g.failed).sum();
    let threshold = Count::resolve(&ru.failure_threshold, total, 1).max(1);

    // Pauses: the operator's, then the failure threshold's.
    let mut phase_now = rollout_phase::PROGRESSING;
    let mut reason = String::new();
    if failed.saturating_sub(st.failures_accepted) >= threshold && !st.failure_paused {
        st.failure_paused = true;
        events.push((
            "RolloutPaused".into(),
            format!(
                "{failed} nodes failed to change to revision {u} (failureThreshold {threshold}); the rest wait: fix the version and apply, `nkctl rollout undo`, or `nkctl rollout resume` to accept the failures"
            ),
        ));
    }
    let updated_any = gs.iter().any(|g| g.updated > 0);
    if st.failure_paused && !updated_any {
        // Not one node took it: the version itself is bad, not a few nodes.
        phase_now = rollout_phase::FAILED;
        reason = format!(
            "every node that tried revision {u} failed ({failed}; failureThreshold {threshold}); fix the version and apply, or undo"
        );
    } else if st.failure_paused {
        phase_now = rollout_phase::PAUSED;
        reason = format!(
            "{failed} nodes failed (failureThreshold {threshold}); undo, fix and apply, or resume to accept them"
        );
    } else if spec.paused {
        phase_now = rollout_phase::PAUSED;
        reason = "spec.paused is true (nkctl rollout resume)".into();
    }
    let window_open = nodekeeper_proto::window::open(&ru.windows, now);
    let releasing = phase_now == rollout_phase::PROGRESSING && (window_open || all_at_once);
    if phase_now == rollout_phase::PROGRESSING && !window_open && !all_at_once {
        reason = "outside every time window; changes start in the next one".into();
    }

    // Which groups may release, and how many each.
    let max_unavailable = |size: u64| Count::resolve(&ru.max_unavailable, size, 1).max(1);
    let mut release = Vec::new();
    let mut gate_open = true; // every earlier group complete and soaked
    let mut all_complete = true;
    for (gi, g) in gs.iter().enumerate() {
        let complete = g.remaining == g.skipped && g.in_progress == 0;
        let soak = if g.name == CANARY {
            ru.canary.as_ref().map_or(0, |c| c.soak_seconds)
        } else {
            ru.soak_seconds
        };
        let mut gphase = set_phase::PENDING;
        if complete {
            let done_at = *st.completed_at.entry(g.name.clone()).or_insert(t);
            // The canaries must stay healthy through their soak.
            let healthy = g.name != CANARY || g.not_ready == 0;
            if !healthy {
                st.completed_at.insert(g.name.clone(), t);
            }
            let is_last = gi + 1 == gs.len();
            // The clock has whole seconds: a group done at 10.9 s has
            // soaked 3 s only once the clock reads 14, not 13.
            let soaked = soak == 0 || t > done_at + u64::from(soak);
            gphase = if is_last || soaked && healthy {
                set_phase::COMPLETE
            } else {
                set_phase::SOAKING
            };
        } else {
            st.completed_at.remove(&g.name);
            all_complete = false;
            if gate_open || all_at_once {
                gphase = set_phase::PROGRESSING;
            }
        }
        // Stragglers (a node Ready again, a new node) are released in any
        // group whose turn has come, also after it completed.
        let turn = gate_open || all_at_once;
        if releasing && turn {
            let room = if all_at_once {
                u64::MAX
            } else {
                max_unavailable(g.members.len() as u64).saturating_sub(g.in_progress)
            };
            let ready_only = !all_at_once;
            let candidates = g.members.iter().filter(|&&i| {
                let n = &nodes[i];
                !in_partition.contains(&i)
                    && !n.updated(u)
                    && !n.failed(u)
                    && n.released != u
                    && (n.ready || !ready_only)
            });
            for &i in candidates.take(room.min(usize::MAX as u64) as usize) {
                release.push(nodes[i].name.to_string());
            }
        }
        if gphase != set_phase::COMPLETE {
            gate_open = false;
        }
        let entry = st
            .group_phase
            .entry(g.name.clone())
            .or_insert_with(|| (gphase.to_string(), t));
        if entry.0 != gphase {
            *entry = (gphase.to_string(), t);
        }
    }
    if all_complete && phase_now == rollout_phase::PROGRESSING {
        phase_now = rollout_phase::COMPLETE;
        reason = if st.skipped.is_empty() {
            String::new()
        } else {
            format!(
                "{} nodes skipped while NotReady; they update when Ready",
                st.skipped.len()
            )
        };
    }
    if st.phase != phase_now {
        if phase_now == rollout_phase::COMPLETE {
            events.push((
                "RolloutComplete".into(),
                format!("revision {u} is on every selected node it may reach"),
            ));
        }
        st.phase = phase_now.into();
        st.phase_since = t;
    }
    st.reason = reason;
    if st.phase == rollout_phase::COMPLETE {
        st.current_revision = u;
    }

    let status = RolloutStatus {
        phase: st.phase.clone(),
        reason: st.reason.clone(),
        current_revision: st.current_revision,
        update_revision: u,
        node_sets: gs
            .iter()
            // An empty "others" group is noise; an empty ordered NodeSet is
            // shown (a typo in nodeSetOrder shows as 0 selected).
            .filter(|g| g.name != OTHERS || !g.members.is_empty())
            .map(|g| {
                let (gphase, since) = st.group_phase.get(&g.name).cloned().unwrap_or_default();
                NodeSetRollout {
                    name: g.name.clone(),
                    selected: g.members.len() as u64,
                    updated: g.updated,
                    unavailable: g.in_progress + g.skipped,
                    failed: g.failed,
                    phase: gphase,
                    in_progress: g.in_progress,
                    partitioned: g.partitioned,
                    skipped: g.skipped,
                    phase_time: rfc3339(since),
                }
            })
            .collect(),
        start_time: rfc3339(st.started_at),
        phase_time: rfc3339(st.phase_since),
        skipped_nodes: st.skipped.iter().take(MAX_LISTED).cloned().collect(),
        failures_accepted: st.failures_accepted,
    };
    Decisions {
        state: st,
        release,
        status,
        events,
    }
}

/// `rollout resume`: clears a failure pause, accepting the failures so far.
pub fn resume(state: &mut State, failed_now: u64) {
    state.failure_paused = false;
    state.failures_accepted = failed_now;
}

#[cfg(test)]
mod tests;
