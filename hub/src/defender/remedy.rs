//! The defender's limits for remedies, on top of the DisruptionBudgets every
//! permit counts against: per RemedyRule `maxConcurrent`, `maxPerHour`,
//! time windows, the manual approval queue, and the circuit breaker for
//! correlated faults. Pure: the executor (`fleet/remedies.rs`) gathers the
//! counts under the fleet lock and stores what changes.

use serde::{Deserialize, Serialize};

/// A rule's circuit breaker (stored as JSON, keyed by rule).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Breaker {
    pub open: bool,
    pub reason: String,
    /// Unix ms it opened at.
    pub opened_ms: u64,
    /// Unix ms since which the count has been at or under the threshold
    /// while open (0: it is not).
    pub under_since_ms: u64,
    /// Unix ms of the last operator reset: raises before it are not counted
    /// again, so a reset is not undone by the storm it was about.
    pub reset_ms: u64,
    pub reset_by: String,
}

/// What a breaker evaluation changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BreakerChange {
    /// It opened: fire one `FleetIncident`.
    Opened,
    /// It closed by itself after its cooldown.
    Closed,
}

/// The breaker's next state, given `raised` nodes in the window against
/// `allowed` (the threshold resolved over the rule's nodes) at `now_ms`.
/// More than `allowed` opens it; open, it closes after `cooldown_s` with the
/// count back at or under the threshold (never when `cooldown_s` is 0).
pub fn breaker_next(
    b: &Breaker,
    raised: u64,
    allowed: u64,
    now_ms: u64,
    cooldown_s: u32,
) -> (Breaker, Option<BreakerChange>) {
    let mut n = b.clone();
    if !b.open {
        if raised > allowed {
            n.open = true;
            n.opened_ms = now_ms;
            n.under_since_ms = 0;
            n.reason = format!(
                "{raised} nodes raised the condition within the window, more than the threshold of {allowed}: the fault is not the nodes' own"
            );
            return (n, Some(BreakerChange::Opened));
        }
        return (n, None);
    }
    if raised > allowed {
        n.under_since_ms = 0;
        return (n, None);
    }
    if n.under_since_ms == 0 {
        n.under_since_ms = now_ms;
    }
    if cooldown_s > 0 && now_ms >= n.under_since_ms + u64::from(cooldown_s) * 1000 {
        n.open = false;
        n.under_since_ms = 0;
        n.reason = format!("closed after {cooldown_s} s under the threshold");
        return (n, Some(BreakerChange::Closed));
    }
    (n, None)
}

/// An operator's reset: closed, and raises so far no longer counted.
pub fn breaker_reset(b: &Breaker, actor: &str, now_ms: u64) -> Breaker {
    Breaker {
        open: false,
        reason: format!("reset by {actor}"),
        opened_ms: b.opened_ms,
        under_since_ms: 0,
        reset_ms: now_ms,
        reset_by: actor.to_string(),
    }
}

/// A job's place in the manual approval queue (stored, keyed by job).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Approval {
    pub job: String,
    pub node: String,
    pub rule: String,
    /// Pending, Approved or Denied.
    pub state: String,
    pub actor: String,
    /// Unix ms asked (Pending) or decided.
    pub ms: u64,
}

/// What the rule-level checks know about one request.
#[derive(Debug, Clone, Default)]
pub struct RuleView {
    pub rule: String,
    pub breaker_open: bool,
    pub breaker_reason: String,
    pub manual: bool,
    /// The job's approval, if it has one.
    pub approval: Option<String>,
    pub approval_actor: String,
    pub in_window: bool,
    /// Nodes holding a permit of this rule now, and how many may.
    pub remediating: u64,
    /// None: no maxConcurrent.
    pub max_concurrent: Option<u64>,
    pub granted_last_hour: u64,
    pub max_per_hour: u32,
}

/// The rule's verdict: `Ok` to go on to the budgets, or why not and whether
/// the refusal is for good (`terminal`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleVerdict {
    Go,
    /// The job must wait for an approval it does not have yet: queue it.
    Queue,
    No {
        reason: String,
        terminal: bool,
    },
}

/// Decides a remedy permit at the rule level (before the budgets).
pub fn rule_verdict(v: &RuleView) -> RuleVerdict {
    let no = |reason: String, terminal| RuleVerdict::No { reason, terminal };
    if v.breaker_open {
        return no(
            format!(
                "RemedyRule {}: its breaker is open ({}); `nkctl remedy breaker reset {}` once the cause is fixed",
                v.rule, v.breaker_reason, v.rule
            ),
            true,
        );
    }
    if v.manual {
        match v.approval.as_deref() {
            None => return RuleVerdict::Queue,
            Some("Pending") => {
                return no(
                    format!(
                        "RemedyRule {}: waiting for approval (nkctl remedy approve|deny JOB)",
                        v.rule
                    ),
                    false,
                );
            }
            Some("Denied") => return no(format!("RemedyRule {}: denied by {}", v.rule, v.approval_actor), true),
            Some(_) => {}
        }
    }
    if !v.in_window {
        return no(format!("RemedyRule {}: outside its windows", v.rule), false);
    }
    if let Some(max) = v.max_concurrent
        && v.remediating >= max
    {
        return no(
            format!(
                "RemedyRule {}: {} nodes remediating, maxConcurrent allows {max}",
                v.rule, v.remediating
            ),
            false,
        );
    }
    if v.max_per_hour > 0 && v.granted_last_hour >= u64::from(v.max_per_hour) {
        return no(
            format!(
                "RemedyRule {}: {} permits in the last hour, maxPerHour is {}",
                v.rule, v.granted_last_hour, v.max_per_hour
            ),
            false,
        );
    }
    RuleVerdict::Go
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_once_stays_open_and_closes_after_its_cooldown_under_the_threshold() {
        let b = Breaker::default();
        let (b, c) = breaker_next(&b, 3, 3, 1_000, 60);
        assert_eq!(c, None, "at the threshold it stays closed: more than it opens");
        let (b, c) = breaker_next(&b, 4, 3, 2_000, 60);
        assert_eq!(c, Some(BreakerChange::Opened));
        assert!(b.open && b.reason.contains("4 nodes"), "{b:?}");
        let (b, c) = breaker_next(&b, 40, 3, 3_000, 60);
        assert_eq!(c, None, "an open breaker fires once");
        let (b, c) = breaker_next(&b, 2, 3, 10_000, 60);
        assert_eq!((c, b.under_since_ms), (None, 10_000));
        let (b, c) = breaker_next(&b, 5, 3, 20_000, 60);
        assert_eq!((c, b.under_since_ms), (None, 0), "back over: the cooldown starts again");
        let (b, _) = breaker_next(&b, 1, 3, 30_000, 60);
        let (b, c) = breaker_next(&b, 1, 3, 89_999, 60);
        assert!(c.is_none() && b.open);
        let (b, c) = breaker_next(&b, 1, 3, 90_000, 60);
        assert_eq!(c, Some(BreakerChange::Closed));
        assert!(!b.open);
        // Cooldown 0: only an operator closes it.
        let (b, _) = breaker_next(&Breaker::default(), 9, 3, 0, 0);
        let (b, c) = breaker_next(&b, 0, 3, 999_999_999, 0);
        assert!(b.open && c.is_none());
        let r = breaker_reset(&b, "alice", 5_000);
        assert!(!r.open && r.reset_ms == 5_000 && r.reset_by == "alice");
    }

    #[test]
    fn rule_limits_in_order_breaker_approval_window_concurrency_hour() {
        let base = RuleView {
            rule: "kubelet".into(),
            in_window: true,
            max_concurrent: Some(2),
            ..Default::default()
        };
        assert_eq!(rule_verdict(&base), RuleVerdict::Go);
        let v = RuleView {
            breaker_open: true,
            breaker_reason: "storm".into(),
            ..base.clone()
        };
        assert!(
            matches!(rule_verdict(&v), RuleVerdict::No { terminal: true, reason } if reason.contains("breaker reset kubelet"))
        );
        let v = RuleView {
            manual: true,
            ..base.clone()
        };
        assert_eq!(rule_verdict(&v), RuleVerdict::Queue);
        let v = RuleView {
            manual: true,
            approval: Some("Pending".into()),
            ..base.clone()
        };
        assert!(matches!(rule_verdict(&v), RuleVerdict::No { terminal: false, .. }));
        let v = RuleView {
            manual: true,
            approval: Some("Denied".into()),
            approval_actor: "bob".into(),
            ..base.clone()
        };
        assert!(matches!(rule_verdict(&v), RuleVerdict::No { terminal: true, reason } if reason.contains("bob")));
        let v = RuleView {
            manual: true,
            approval: Some("Approved".into()),
            ..base.clone()
        };
        assert_eq!(rule_verdict(&v), RuleVerdict::Go);
        let v = RuleView {
            in_window: false,
            ..base.clone()
        };
        assert!(matches!(rule_verdict(&v), RuleVerdict::No { terminal: false, reason } if reason.contains("windows")));
        let v = RuleView {
            remediating: 2,
            ..base.clone()
        };
        assert!(
            matches!(rule_verdict(&v), RuleVerdict::No { terminal: false, reason } if reason.contains("maxConcurrent allows 2"))
        );
        let v = RuleView {
            max_per_hour: 5,
            granted_last_hour: 5,
            ..base.clone()
        };
        assert!(
            matches!(rule_verdict(&v), RuleVerdict::No { terminal: false, reason } if reason.contains("maxPerHour is 5"))
        );
    }
}
