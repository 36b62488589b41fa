//! The defender: fleet-wide risk control. Every disruptive action on a node
//! (a component change from Installing on, a remedy step) asks it for a
//! permit first; it grants one only while every DisruptionBudget selecting
//! the node stays within `maxUnavailable` and `maxPerHour`, and the fleet is
//! not frozen. A permit has a TTL its agent renews while working, so a dead
//! agent's permit runs out on its own.
//!
//! This module is the pure part: [`Snapshot`] counts each budget's nodes once
//! per batch of requests, and [`Snapshot::decide`] answers one request and
//! updates the counts, so a batch never overshoots a budget. The executor
//! (`fleet/permits.rs`) builds the snapshot under the fleet lock, stores the
//! decisions and answers the agents.

pub mod remedy;

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use nodekeeper_proto::count::Count;
use nodekeeper_proto::v1::DisruptionBudget;
use serde::{Deserialize, Serialize};

/// Shortest and longest permit TTL the hub grants.
pub const MIN_TTL: Duration = Duration::from_secs(10);
pub const MAX_TTL: Duration = Duration::from_secs(600);
/// TTL when the agent asks for none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);

/// A permit a node holds (stored as JSON, keyed by node).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Held {
    pub id: String,
    pub node: String,
    pub action: String,
    pub reason: String,
    /// Unix milliseconds.
    pub granted_ms: u64,
    pub expires_ms: u64,
}

/// The fleet freeze (stored as JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Freeze {
    pub frozen: bool,
    pub reason: String,
    pub actor: String,
    pub since: String,
}

/// What the defender says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Granted,
    Denied(String),
}

/// One budget's counts within a batch.
#[derive(Debug, Clone)]
pub struct BudgetCount {
    pub name: String,
    pub selected: u64,
    pub unavailable: u64,
    pub allowed: u64,
    pub max_per_hour: u32,
    pub granted_last_hour: u64,
}

/// A node as the defender sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeView {
    /// NotReady/Unknown, holding a permit, or failed.
    pub unavailable: bool,
}

/// The counts a batch of decisions works from.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub budgets: Vec<BudgetCount>,
    pub freeze: Option<Freeze>,
}

impl Snapshot {
    /// Counts `budgets` over `nodes` — for each node whether it is
    /// unavailable and which budgets select it (`selects(budget, node)`) —
    /// and the grants of the last hour (`grants`: node indices).
    pub fn new<N, I: IntoIterator<Item = N>>(
        budgets: &[&DisruptionBudget],
        nodes: impl Fn() -> I,
        view: impl Fn(&N) -> NodeView,
        selects: impl Fn(&DisruptionBudget, &N) -> bool,
        recent_grants: impl Fn(&DisruptionBudget) -> u64,
        freeze: Option<Freeze>,
    ) -> Snapshot {
        let counts = budgets
            .iter()
            .map(|b| {
                let (mut selected, mut unavailable) = (0u64, 0u64);
                for n in nodes() {
                    if selects(b, &n) {
                        selected += 1;
                        if view(&n).unavailable {
                            unavailable += 1;
                        }
                    }
                }
                let spec = b.spec.clone().unwrap_or_default();
                BudgetCount {
                    name: b.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
                    selected,
                    unavailable,
                    allowed: Count::resolve(&spec.max_unavailable, selected, 0),
                    max_per_hour: spec.max_per_hour,
                    granted_last_hour: recent_grants(b),
                }
            })
            .collect();
        Snapshot {
            budgets: counts,
            freeze: freeze.filter(|f| f.frozen),
        }
    }

    /// Decides one request of a node that `in_budgets` (indices into
    /// `budgets`) select and that is `already_unavailable` or not. A grant
    /// is counted at once, so the next request of the batch sees it.
    pub fn decide(&mut self, in_budgets: &[usize], already_unavailable: bool) -> Verdict {
        if let Some(f) = &self.freeze {
            return Verdict::Denied(format!(
                "the fleet is frozen ({}; by {} since {}): no new permits until `nkctl freeze off`",
                f.reason, f.actor, f.since
            ));
        }
        for &i in in_budgets {
            let Some(b) = self.budgets.get(i) else { continue };
            if !already_unavailable && b.unavailable + 1 > b.allowed {
                return Verdict::Denied(format!(
                    "DisruptionBudget {}: {} of {} nodes unavailable, maxUnavailable allows {}",
                    b.name, b.unavailable, b.selected, b.allowed
                ));
            }
            if b.max_per_hour > 0 && b.granted_last_hour >= u64::from(b.max_per_hour) {
                return Verdict::Denied(format!(
                    "DisruptionBudget {}: {} permits in the last hour, maxPerHour is {}",
                    b.name, b.granted_last_hour, b.max_per_hour
                ));
            }
        }
        for &i in in_budgets {
            if let Some(b) = self.budgets.get_mut(i) {
                if !already_unavailable {
                    b.unavailable += 1;
                }
                b.granted_last_hour += 1;
            }
        }
        Verdict::Granted
    }
}

/// The TTL granted for an asked one (0: the default), within bounds.
pub fn ttl(asked_seconds: u32) -> Duration {
    if asked_seconds == 0 {
        return DEFAULT_TTL;
    }
    Duration::from_secs(u64::from(asked_seconds)).clamp(MIN_TTL, MAX_TTL)
}

/// The `action` label of the permit metric: the part before `/`.
pub fn action_kind(action: &str) -> &str {
    action.split('/').next().unwrap_or(action)
}

/// Grants of the last hour, oldest first (Unix ms, node, permit id), for
/// `maxPerHour`.
#[derive(Debug, Clone, Default)]
pub struct Grants(pub VecDeque<(u64, String, String)>);

impl Grants {
    /// Drops grants older than an hour before `now_ms`; what was dropped.
    pub fn prune(&mut self, now_ms: u64) -> Vec<(u64, String, String)> {
        let mut out = Vec::new();
        while let Some((t, _, _)) = self.0.front() {
            if *t + 3_600_000 > now_ms {
                break;
            }
            if let Some(x) = self.0.pop_front() {
                out.push(x);
            }
        }
        out
    }
}

/// Unix milliseconds of `t`.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekeeper_proto::v1::{DisruptionBudgetSpec, ObjectMeta};

    fn budget(name: &str, max: &str, per_hour: u32) -> DisruptionBudget {
        DisruptionBudget {
            metadata: Some(ObjectMeta {
                name: name.into(),
                ..Default::default()
            }),
            spec: Some(DisruptionBudgetSpec {
                node_selector: None,
                max_unavailable: max.into(),
                max_per_hour: per_hour,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn budgets_count_unavailable_nodes_and_grants_within_a_batch() {
        // 10 nodes, one already NotReady; 20% allows 2 unavailable.
        let nodes: Vec<bool> = (0..10).map(|i| i == 3).collect();
        let b = budget("all", "20%", 0);
        let mut s = Snapshot::new(
            &[&b],
            || nodes.iter(),
            |u| NodeView { unavailable: **u },
            |_, _| true,
            |_| 0,
            None,
        );
        assert_eq!(
            (s.budgets[0].selected, s.budgets[0].unavailable, s.budgets[0].allowed),
            (10, 1, 2)
        );
        assert_eq!(s.decide(&[0], false), Verdict::Granted);
        match s.decide(&[0], false) {
            Verdict::Denied(why) => assert!(
                why.contains("2 of 10 nodes unavailable, maxUnavailable allows 2"),
                "{why}"
            ),
            v => panic!("{v:?}"),
        }
        // The NotReady node itself may be changed: it is unavailable already.
        assert_eq!(s.decide(&[0], true), Verdict::Granted);
        // A node no budget selects is only subject to the freeze.
        assert_eq!(s.decide(&[], false), Verdict::Granted);
    }

    #[test]
    fn max_per_hour_and_the_freeze_deny() {
        let b = budget("hourly", "100%", 2);
        let nodes = [false; 5];
        let mut s = Snapshot::new(
            &[&b],
            || nodes.iter(),
            |u| NodeView { unavailable: **u },
            |_, _| true,
            |_| 1,
            None,
        );
        assert_eq!(s.decide(&[0], false), Verdict::Granted);
        assert!(matches!(s.decide(&[0], false), Verdict::Denied(w) if w.contains("maxPerHour is 2")));
        let frozen = Freeze {
            frozen: true,
            reason: "incident 42".into(),
            actor: "admin".into(),
            since: "now".into(),
        };
        let mut s = Snapshot::new(
            &[],
            || nodes.iter(),
            |u| NodeView { unavailable: **u },
            |_, _| true,
            |_| 0,
            Some(frozen),
        );
        assert!(matches!(s.decide(&[], false), Verdict::Denied(w) if w.contains("incident 42")));
        let mut grants = Grants::default();
        grants.0.push_back((1_000, "a".into(), "p1".into()));
        grants.0.push_back((3_000_000, "b".into(), "p2".into()));
        assert_eq!(grants.prune(3_601_000).len(), 1);
        assert_eq!(grants.0.len(), 1);
        assert_eq!(ttl(0), DEFAULT_TTL);
        assert_eq!(ttl(1), MIN_TTL);
        assert_eq!(ttl(100_000), MAX_TTL);
        assert_eq!(action_kind("component/kubelet"), "component");
    }
}
