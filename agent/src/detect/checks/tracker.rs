//! One condition a check owns, with hysteresis: it turns True after
//! `enter_count` bad observations in a row that span at least `enter_for`,
//! and False after `exit_count` good ones spanning `exit_for`. Pure: the
//! caller observes and commits what it returns.

use std::time::{Duration, SystemTime};

use nodekeeper_proto::time::rfc3339;
use nodekeeper_proto::v1::Condition;

#[derive(Debug, Clone)]
pub struct Tracker {
    pub condition: Condition,
    healthy_reason: String,
    healthy_message: String,
    enter_count: u32,
    exit_count: u32,
    enter_for: Duration,
    exit_for: Duration,
    bad: u32,
    good: u32,
    bad_since: Option<SystemTime>,
    good_since: Option<SystemTime>,
    /// Whether the condition came from the store (else it is new and is
    /// committed once as it starts).
    restored: bool,
}

impl Tracker {
    /// A condition of `kind` from `source`, False with the healthy reason,
    /// or as stored before a restart.
    pub fn new(kind: &str, source: &str, healthy_reason: &str, healthy_message: &str, stored: &[Condition]) -> Tracker {
        let found = stored.iter().find(|c| c.r#type == kind && c.source == source).cloned();
        Tracker {
            restored: found.is_some(),
            condition: found.unwrap_or_else(|| Condition {
                r#type: kind.into(),
                status: "False".into(),
                reason: healthy_reason.into(),
                message: healthy_message.into(),
                last_transition_time: rfc3339(SystemTime::now()),
                source: source.into(),
                ..Default::default()
            }),
            healthy_reason: healthy_reason.into(),
            healthy_message: healthy_message.into(),
            enter_count: 1,
            exit_count: 1,
            enter_for: Duration::ZERO,
            exit_for: Duration::ZERO,
            bad: 0,
            good: 0,
            bad_since: None,
            good_since: None,
        }
    }

    /// Observations in a row needed to enter and to leave.
    pub fn counts(mut self, enter: u32, exit: u32) -> Tracker {
        self.enter_count = enter.max(1);
        self.exit_count = exit.max(1);
        self
    }

    /// How long a bad (good) spell must last before the condition turns
    /// True (False).
    pub fn durations(mut self, enter: Duration, exit: Duration) -> Tracker {
        self.enter_for = enter;
        self.exit_for = exit;
        self
    }

    pub fn active(&self) -> bool {
        self.condition.status == "True"
    }

    /// The condition to commit at start when it was not stored.
    pub fn initial(&mut self) -> Option<Condition> {
        (!std::mem::replace(&mut self.restored, true)).then(|| self.condition.clone())
    }

    /// One observation: `Some((reason, message))` when bad. Returns the
    /// condition when it changed.
    pub fn observe(&mut self, bad: Option<(&str, &str)>, now: SystemTime) -> Option<Condition> {
        let lasted = |since: Option<SystemTime>| since.and_then(|s| now.duration_since(s).ok()).unwrap_or_default();
        match bad {
            Some((reason, message)) => {
                self.good = 0;
                self.good_since = None;
                self.bad += 1;
                let since = *self.bad_since.get_or_insert(now);
                let enter = self.bad >= self.enter_count && lasted(Some(since)) >= self.enter_for;
                if (!self.active() && enter) || (self.active() && self.condition.reason != reason) {
                    return Some(self.set("True", reason, message, now));
                }
            }
            None => {
                self.bad = 0;
                self.bad_since = None;
                self.good += 1;
                let since = *self.good_since.get_or_insert(now);
                let exit = self.good >= self.exit_count && lasted(Some(since)) >= self.exit_for;
                if self.condition.status != "False" && exit {
                    let (r, m) = (self.healthy_reason.clone(), self.healthy_message.clone());
                    return Some(self.set("False", &r, &m, now));
                }
            }
        }
        None
    }

    /// The check cannot tell (a plugin's Unknown): the condition says so at
    /// once, keeping nothing of the streaks.
    pub fn unknown(&mut self, message: &str, now: SystemTime) -> Option<Condition> {
        self.bad = 0;
        self.good = 0;
        self.bad_since = None;
        self.good_since = None;
        if self.condition.status == "Unknown" && self.condition.message == message {
            return None;
        }
        let r = self.healthy_reason.clone();
        Some(self.set("Unknown", &r, message, now))
    }

    fn set(&mut self, status: &str, reason: &str, message: &str, now: SystemTime) -> Condition {
        let c = &mut self.condition;
        if c.status != status {
            c.last_transition_time = rfc3339(now);
        }
        c.status = status.into();
        c.reason = reason.into();
        c.message = message.into();
        c.count = u64::from(status == "True");
        c.latest_time = String::new();
        c.latest_message = String::new();
        c.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s)
    }

    #[test]
    fn counts_and_durations_hold_back_both_transitions() {
        let mut t = Tracker::new("KubeletUnhealthy", "probe/kubelet", "KubeletIsHealthy", "ok", &[]).counts(3, 2);
        assert_eq!(t.initial().map(|c| c.status), Some("False".into()));
        assert_eq!(t.initial(), None, "committed once");
        assert_eq!(t.observe(Some(("KubeletUnhealthy", "500")), at(0)), None);
        assert_eq!(t.observe(Some(("KubeletUnhealthy", "500")), at(1)), None);
        assert_eq!(t.observe(None, at(2)), None, "a success resets the streak");
        for s in 3..5 {
            assert_eq!(t.observe(Some(("KubeletUnhealthy", "500")), at(s)), None);
        }
        let c = t
            .observe(Some(("KubeletUnhealthy", "500")), at(5))
            .expect("third failure in a row");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str(), c.message.as_str()),
            ("True", "KubeletUnhealthy", "500")
        );
        assert_eq!(
            t.observe(Some(("KubeletUnhealthy", "503")), at(6)),
            None,
            "no report per period"
        );
        assert_eq!(t.observe(None, at(7)), None);
        let c = t.observe(None, at(8)).expect("two successes");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "KubeletIsHealthy"));

        let mut t = Tracker::new("DiskPressure", "resources", "Fine", "ok", &[])
            .durations(Duration::from_secs(10), Duration::from_secs(30));
        assert_eq!(t.observe(Some(("LowDisk", "5%")), at(0)), None);
        assert_eq!(t.observe(Some(("LowDisk", "5%")), at(9)), None);
        assert!(
            t.observe(Some(("LowDisk", "5%")), at(10)).is_some(),
            "10 s past the threshold"
        );
        assert_eq!(t.observe(None, at(11)), None);
        assert_eq!(t.observe(None, at(40)), None, "29 s back");
        assert_eq!(t.observe(None, at(41)).map(|c| c.status), Some("False".into()));
    }

    #[test]
    fn a_stored_condition_is_kept_and_unknown_is_immediate() {
        let stored = vec![Condition {
            r#type: "C".into(),
            status: "True".into(),
            reason: "Bad".into(),
            source: "s".into(),
            ..Default::default()
        }];
        let mut t = Tracker::new("C", "s", "Good", "ok", &stored);
        assert!(t.active());
        assert_eq!(t.initial(), None, "nothing to commit: it was stored");
        let c = t.unknown("timed out", at(0)).expect("unknown");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("Unknown", "Good"));
        assert_eq!(t.unknown("timed out", at(1)), None);
    }
}

/// One node condition for many instances (filesystems, NICs, disks,
/// GPUs): each instance has its own hysteresis, and the node's condition —
/// one per type, as the hub and Kubernetes key them — is True while any
/// instance is, naming them. It changes only when its status or the set of
/// instances in trouble (and their reasons) changes, not with every value.
#[derive(Debug, Clone)]
pub struct Group {
    pub published: Condition,
    healthy_reason: String,
    healthy_message: String,
    enter_after: Duration,
    clear_after: Duration,
    members: std::collections::BTreeMap<String, Tracker>,
    key: String,
    restored: bool,
}

impl Group {
    /// `enter_after` / `clear_after`: how long an instance must be bad to
    /// enter, good to leave.
    pub fn new(
        kind: &str,
        source: &str,
        healthy_reason: &str,
        healthy_message: &str,
        (enter_after, clear_after): (Duration, Duration),
        stored: &[Condition],
    ) -> Group {
        let t = Tracker::new(kind, source, healthy_reason, healthy_message, stored);
        Group {
            restored: t.restored,
            published: t.condition,
            healthy_reason: healthy_reason.into(),
            healthy_message: healthy_message.into(),
            enter_after,
            clear_after,
            members: std::collections::BTreeMap::new(),
            key: String::new(),
        }
    }

    /// The condition to commit at start when it was not stored.
    pub fn initial(&mut self) -> Option<Condition> {
        (!std::mem::replace(&mut self.restored, true)).then(|| self.published.clone())
    }

    /// One observation of `member`. A member new since a restart starts in
    /// trouble when the stored condition named it, so it must be seen good
    /// for `clear_after` before it leaves.
    pub fn observe(&mut self, member: &str, bad: Option<(&str, &str)>, now: SystemTime) {
        let (kind, source) = (self.published.r#type.clone(), self.published.source.clone());
        let was = (self.published.status == "True" && self.published.message.contains(member)).then(|| Condition {
            r#type: kind.clone(),
            source: source.clone(),
            status: "True".into(),
            reason: self.published.reason.clone(),
            ..Default::default()
        });
        let t = self.members.entry(member.to_string()).or_insert_with(|| {
            Tracker::new(&kind, &source, &self.healthy_reason, "", was.as_slice())
                .durations(self.enter_after, self.clear_after)
        });
        t.observe(bad, now);
        if let Some((_, m)) = bad
            && t.active()
        {
            t.condition.message = m.to_string();
        }
    }

    /// Whether `member` is in trouble.
    pub fn active(&self, member: &str) -> bool {
        self.members.get(member).is_some_and(Tracker::active)
    }

    /// Members no longer present are dropped.
    pub fn retain(&mut self, present: &std::collections::BTreeSet<String>) {
        self.members.retain(|m, _| present.contains(m));
    }

    /// The node's condition, when it changed.
    pub fn publish(&mut self, now: SystemTime) -> Option<Condition> {
        let active: Vec<&Tracker> = self.members.values().filter(|t| t.active()).collect();
        let key: String = self
            .members
            .iter()
            .filter(|(_, t)| t.active())
            .map(|(m, t)| format!("{m}={};", t.condition.reason))
            .collect();
        let status = if active.is_empty() { "False" } else { "True" };
        if key == self.key && status == self.published.status {
            return None;
        }
        self.key = key;
        let c = &mut self.published;
        if c.status != status {
            c.last_transition_time = rfc3339(now);
        }
        c.status = status.into();
        if let Some(first) = active.first() {
            c.reason = first.condition.reason.clone();
            c.message = active
                .iter()
                .map(|t| t.condition.message.as_str())
                .collect::<Vec<_>>()
                .join("; ");
        } else {
            c.reason = self.healthy_reason.clone();
            c.message = self.healthy_message.clone();
        }
        c.count = u64::from(status == "True");
        Some(c.clone())
    }
}

#[cfg(test)]
mod group_tests {
    use super::*;

    #[test]
    fn one_condition_for_many_instances_changes_with_the_set_in_trouble() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut g = Group::new(
            "DiskPressure",
            "resources",
            "SufficientDisk",
            "ok",
            (Duration::ZERO, Duration::ZERO),
            &[],
        );
        assert_eq!(g.initial().map(|c| c.status), Some("False".into()));
        g.observe("/", None, now);
        g.observe("/var", None, now);
        assert_eq!(g.publish(now), None, "False already");
        g.observe("/var", Some(("InsufficientDiskSpace", "/var: 1Gi of 100Gi")), now);
        let c = g.publish(now).expect("True");
        assert_eq!((c.status.as_str(), c.message.as_str()), ("True", "/var: 1Gi of 100Gi"));
        g.observe("/var", Some(("InsufficientDiskSpace", "/var: 0.9Gi of 100Gi")), now);
        assert_eq!(g.publish(now), None, "a new value alone is no change");
        g.observe("/", Some(("InsufficientInodes", "/: 10 of 1000 inodes free")), now);
        let c = g.publish(now).expect("another mount");
        assert!(
            c.message.contains("/: 10 of 1000") && c.message.contains("/var: 0.9Gi"),
            "{c:?}"
        );
        g.observe("/", None, now);
        g.observe("/var", None, now);
        assert_eq!(g.publish(now).map(|c| c.status), Some("False".into()));

        // Restored True naming /var: /var stays in trouble until seen good
        // for the clear window.
        let stored = vec![Condition {
            r#type: "NetworkInterfaceDown".into(),
            source: "hardware/nic".into(),
            status: "True".into(),
            reason: "NoCarrier".into(),
            message: "eth1 is up but has no carrier".into(),
            ..Default::default()
        }];
        let mut g = Group::new(
            "NetworkInterfaceDown",
            "hardware/nic",
            "CarrierUp",
            "ok",
            (Duration::ZERO, Duration::from_secs(60)),
            &stored,
        );
        assert_eq!(g.initial(), None);
        g.observe("eth1", None, now);
        g.observe("eth0", None, now);
        assert_eq!(
            g.publish(now).map(|c| c.status),
            Some("True".into()),
            "still in trouble after a restart"
        );
        g.observe("eth1", None, now + Duration::from_secs(61));
        assert_eq!(g.publish(now).map(|c| c.status), Some("False".into()));
    }
}
