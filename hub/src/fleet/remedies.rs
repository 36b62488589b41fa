//! Remedies at the hub: the RemedyRules' limits in the defender's permit
//! decisions (see [`crate::defender::remedy`]), the breakers evaluated every
//! second, the manual approval queue, and the jobs agents report (stored,
//! served at `/v1/remedies`). Everything is in the store, so another hub
//! sharing it decides the same way.

use std::collections::{BTreeMap, VecDeque};

use nodekeeper_proto::Resource;
use nodekeeper_proto::count::Count;
use nodekeeper_proto::time::parse_rfc3339;
use nodekeeper_proto::v1::{Event, PermitRequest, RemedyJob, RemedyRule, RemedyRuleSpec, RemedyRuleStatus};

use super::{Fleet, FleetError, State};
use crate::defender::remedy::{
    Approval, Breaker, BreakerChange, RuleVerdict, RuleView, breaker_next, breaker_reset, rule_verdict,
};
use crate::defender::unix_ms;
use crate::store::Write;

pub(crate) const RECORD_JOB: &str = "remedyjob";
pub(crate) const RECORD_APPROVAL: &str = "approval";
pub(crate) const RECORD_BREAKER: &str = "breaker";
pub(crate) const RECORD_INCIDENT: &str = "incident";
/// FleetIncidents kept.
pub const MAX_INCIDENTS: usize = 1000;

/// Jobs the hub keeps; the oldest ended ones go first.
pub const MAX_JOBS: usize = 20_000;

/// Phases after which a job does not change.
pub fn job_final(phase: &str) -> bool {
    matches!(phase, "Succeeded" | "Failed" | "Denied" | "DryRun")
}

/// The hub's remedy state, part of the fleet state.
#[derive(Default)]
pub(crate) struct Remedies {
    pub jobs: BTreeMap<String, RemedyJob>,
    pub approvals: BTreeMap<String, Approval>,
    pub breakers: BTreeMap<String, Breaker>,
    /// Grants per rule in the last hour (Unix ms), for the rule's maxPerHour.
    pub grants: BTreeMap<String, VecDeque<u64>>,
    /// FleetIncident events, oldest first, with their store keys.
    pub incidents: VecDeque<(String, Event)>,
}

fn json_write<T: serde::Serialize>(kind: &'static str, key: &str, v: &T) -> Write {
    Write::PutRecord {
        kind,
        key: key.to_string(),
        body: serde_json::to_string(v).unwrap_or_default(),
    }
}

fn job_write(j: &RemedyJob) -> Write {
    json_write(RECORD_JOB, &j.id, j)
}

impl State {
    fn remedy_rule(&self, name: &str) -> Option<&RemedyRule> {
        match self
            .resources
            .get(&(nodekeeper_proto::Kind::RemedyRule, name.to_string()))
        {
            Some(Resource::RemedyRule(r)) => Some(r),
            _ => None,
        }
    }

    fn remedy_rules(&self) -> impl Iterator<Item = &RemedyRule> {
        self.resources.values().filter_map(|r| match r {
            Resource::RemedyRule(r) => Some(r),
            _ => None,
        })
    }

    /// Nodes the rule selects, and those of them that raised one of its
    /// conditions since `since_ms` (and still have it).
    fn rule_counts(&self, spec: &RemedyRuleSpec, since_ms: u64) -> (u64, u64) {
        let (mut selected, mut raised) = (0u64, 0u64);
        for e in self.nodes.values() {
            let Some(labels) = e.node.metadata.as_ref().map(|m| &m.labels) else {
                continue;
            };
            if !nodekeeper_proto::selector::selects(spec.node_selector.as_ref(), labels) {
                continue;
            }
            selected += 1;
            let Some(status) = e.node.status.as_ref() else { continue };
            let hit = spec.conditions.iter().any(|t| {
                nodekeeper_proto::remedy::raised(t, &status.conditions)
                    .is_some_and(|c| parse_rfc3339(&c.last_transition_time).is_some_and(|at| unix_ms(at) >= since_ms))
            });
            if hit {
                raised += 1;
            }
        }
        (selected, raised)
    }

    /// Evaluates the breaker of `rule` at `now_ms`: the writes and events
    /// of a change, and the nodes the rule selects (counted on the way; None
    /// when the rule has no breaker).
    fn evaluate_breaker(
        &mut self,
        rule: &str,
        now_ms: u64,
        metrics: &crate::metrics::Metrics,
    ) -> (Vec<Write>, Option<u64>) {
        let Some(spec) = self.remedy_rule(rule).and_then(|r| r.spec.clone()) else {
            return (Vec::new(), None);
        };
        let Some(cfg) = spec.breaker.as_ref() else {
            return (Vec::new(), None);
        };
        let cur = self.remedies.breakers.get(rule).cloned().unwrap_or_default();
        let since = now_ms
            .saturating_sub(u64::from(cfg.window_seconds) * 1000)
            .max(cur.reset_ms);
        let (selected, raised) = self.rule_counts(&spec, since);
        let allowed = Count::resolve(&cfg.threshold, selected, 0);
        let (next, change) = breaker_next(&cur, raised, allowed, now_ms, cfg.cooldown_seconds);
        if next == cur {
            return (Vec::new(), Some(selected));
        }
        self.remedies.breakers.insert(rule.to_string(), next.clone());
        let mut writes = vec![json_write(RECORD_BREAKER, rule, &next)];
        match change {
            Some(BreakerChange::Opened) => {
                metrics.fleet_incident(rule);
                metrics.breaker_open(rule, true);
                tracing::error!(
                    rule,
                    raised,
                    allowed,
                    selected,
                    "FleetIncident: the remedy breaker opened; the rule grants nothing until it is reset or cools down"
                );
                writes.extend(self.incident(
                    rule,
                    now_ms,
                    super::permits::event(
                        "FleetIncident",
                        "Error",
                        format!("RemedyRule {rule}: breaker open: {}", next.reason),
                    ),
                ));
            }
            Some(BreakerChange::Closed) => {
                metrics.breaker_open(rule, false);
                tracing::warn!(rule, "the remedy breaker closed after its cooldown");
            }
            None => {}
        }
        (writes, Some(selected))
    }

    /// Records a fleet-level event (kept with the last [`MAX_INCIDENTS`]).
    fn incident(&mut self, rule: &str, now_ms: u64, mut ev: Event) -> Vec<Write> {
        ev.source = format!("remedyrule/{rule}");
        let key = format!("{now_ms}-{rule}");
        let mut writes = vec![json_write(RECORD_INCIDENT, &key, &ev)];
        self.remedies.incidents.push_back((key, ev));
        while self.remedies.incidents.len() > MAX_INCIDENTS {
            if let Some((k, _)) = self.remedies.incidents.pop_front() {
                writes.push(Write::DeleteRecord {
                    kind: RECORD_INCIDENT,
                    key: k,
                });
            }
        }
        writes
    }

    /// What the rule's limits see for `req`, its maxConcurrent resolved
    /// against `selected` nodes.
    fn rule_view(
        &self,
        rule: &str,
        spec: &RemedyRuleSpec,
        req: &PermitRequest,
        now_ms: u64,
        selected: u64,
    ) -> RuleView {
        let breaker = self.remedies.breakers.get(rule).cloned().unwrap_or_default();
        let approval = self.remedies.approvals.get(&req.job);
        RuleView {
            rule: rule.to_string(),
            breaker_open: breaker.open,
            breaker_reason: breaker.reason,
            manual: nodekeeper_proto::remedy::manual(spec),
            approval: approval.map(|a| a.state.clone()),
            approval_actor: approval.map(|a| a.actor.clone()).unwrap_or_default(),
            in_window: nodekeeper_proto::window::open(
                &spec.windows,
                std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(now_ms),
            ),
            remediating: self.remediating(&req.action),
            max_concurrent: (!spec.max_concurrent.trim().is_empty())
                .then(|| Count::resolve(&spec.max_concurrent, selected, 0)),
            granted_last_hour: self.granted_last_hour(rule, now_ms),
            max_per_hour: spec.max_per_hour,
        }
    }

    /// The rule-level verdict for a remedy permit request, queuing a manual
    /// job for approval. `batch`: per rule seen in this batch of decisions,
    /// the nodes it selects (its breaker evaluated once per batch, its nodes
    /// counted once).
    pub(super) fn remedy_check(
        &mut self,
        node: &str,
        req: &PermitRequest,
        now_ms: u64,
        batch: &mut BTreeMap<String, u64>,
        writes: &mut Vec<Write>,
        metrics: &crate::metrics::Metrics,
    ) -> Result<(), (String, bool)> {
        let rule = req.action.strip_prefix("remedy/").unwrap_or_default().to_string();
        let Some(spec) = self.remedy_rule(&rule).and_then(|r| r.spec.clone()) else {
            return Err((
                format!("there is no RemedyRule {rule:?} (deleted?); the job ends"),
                true,
            ));
        };
        let labels = self.labels_of(node).cloned().unwrap_or_default();
        if !nodekeeper_proto::selector::selects(spec.node_selector.as_ref(), &labels) {
            return Err((format!("RemedyRule {rule} does not select node {node}"), true));
        }
        // Refusals that hold whatever the exact counts are need no scan of
        // the fleet: the breaker already open (it closes only by a reset or
        // at the every-second tick), and limits that refuse even counted
        // against every node (maxConcurrent only grows with the count). So a
        // storm's refusals are cheap; a request that may be granted has its
        // breaker evaluated first, once per batch.
        let bound = self.rule_view(&rule, &spec, req, now_ms, self.nodes.len() as u64);
        let verdict = match rule_verdict(&bound) {
            no @ RuleVerdict::No { .. } => no,
            _ => {
                let selected = match batch.get(&rule) {
                    Some(n) => *n,
                    None => {
                        let (w, counted) = self.evaluate_breaker(&rule, now_ms, metrics);
                        writes.extend(w);
                        let n = counted.unwrap_or_else(|| self.rule_counts(&spec, u64::MAX).0);
                        batch.insert(rule.clone(), n);
                        n
                    }
                };
                rule_verdict(&self.rule_view(&rule, &spec, req, now_ms, selected))
            }
        };
        match verdict {
            RuleVerdict::Go => Ok(()),
            RuleVerdict::Queue => {
                if req.job.is_empty() {
                    return Err((
                        format!("RemedyRule {rule} needs manual approval and the request names no job"),
                        true,
                    ));
                }
                let a = Approval {
                    job: req.job.clone(),
                    node: node.to_string(),
                    rule: rule.clone(),
                    state: "Pending".into(),
                    actor: String::new(),
                    ms: now_ms,
                };
                writes.push(json_write(RECORD_APPROVAL, &a.job, &a));
                self.remedies.approvals.insert(a.job.clone(), a);
                tracing::info!(node, rule, job = %req.job, "remedy job queued for manual approval");
                Err((
                    format!(
                        "RemedyRule {rule}: waiting for approval (nkctl remedy approve {} | deny {})",
                        req.job, req.job
                    ),
                    false,
                ))
            }
            RuleVerdict::No { reason, terminal } => Err((reason, terminal)),
        }
    }

    /// Counts a granted remedy permit for its rule's maxPerHour.
    pub(super) fn remedy_granted(&mut self, action: &str, now_ms: u64) {
        if let Some(rule) = action.strip_prefix("remedy/") {
            self.remedies
                .grants
                .entry(rule.to_string())
                .or_default()
                .push_back(now_ms);
        }
    }

    /// Nodes holding a permit for `action` now.
    fn remediating(&self, action: &str) -> u64 {
        self.permits.values().filter(|h| h.action == action).count() as u64
    }

    /// Permits granted for `rule` in the hour before `now_ms`.
    fn granted_last_hour(&self, rule: &str, now_ms: u64) -> u64 {
        self.remedies
            .grants
            .get(rule)
            .map(|g| g.iter().filter(|ms| **ms + 3_600_000 > now_ms).count() as u64)
            .unwrap_or(0)
    }

    /// Takes back a grant the store did not take.
    pub(super) fn remedy_withdrawn(&mut self, action: &str, ms: u64) {
        if let Some(g) = action
            .strip_prefix("remedy/")
            .and_then(|r| self.remedies.grants.get_mut(r))
            && let Some(i) = g.iter().rposition(|x| *x == ms)
        {
            g.remove(i);
        }
    }

    /// The status of a RemedyRule.
    pub(super) fn remedy_status(&self, name: &str, now_ms: u64) -> RemedyRuleStatus {
        let Some(spec) = self.remedy_rule(name).and_then(|r| r.spec.clone()) else {
            return RemedyRuleStatus::default();
        };
        let b = self.remedies.breakers.get(name).cloned().unwrap_or_default();
        let window = spec.breaker.as_ref().map(|c| c.window_seconds).unwrap_or(0);
        let since = now_ms.saturating_sub(u64::from(window) * 1000).max(b.reset_ms);
        let (selected, raised) = self.rule_counts(&spec, since);
        let action = nodekeeper_proto::remedy::permit_action(name);
        RemedyRuleStatus {
            selected_nodes: selected,
            remediating_nodes: self.remediating(&action),
            granted_last_hour: self.granted_last_hour(name, now_ms),
            raised_in_window: if spec.breaker.is_some() { raised } else { 0 },
            breaker_open: b.open,
            breaker_reason: b.reason.clone(),
            breaker_opened_time: if b.opened_ms > 0 {
                nodekeeper_proto::time::rfc3339(
                    std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(b.opened_ms),
                )
            } else {
                String::new()
            },
            pending_approvals: self
                .remedies
                .approvals
                .values()
                .filter(|a| a.rule == name && a.state == "Pending")
                .count() as u64,
        }
    }

    /// Takes in a job a node reported; the writes that store it.
    pub(super) fn remedy_reported(
        &mut self,
        node: &str,
        mut job: RemedyJob,
        metrics: &crate::metrics::Metrics,
    ) -> Vec<Write> {
        // A job that names no node is the reporter's (ingest refuses one
        // that names another node).
        job.node = node.to_string();
        if job.id.is_empty() || job.id.len() > 200 {
            return Vec::new();
        }
        let mut writes = Vec::new();
        if let Some(a) = self.remedies.approvals.get(&job.id)
            && a.state == "Approved"
        {
            job.approved_by = a.actor.clone();
        }
        let was_final = self.remedies.jobs.get(&job.id).is_some_and(|j| job_final(&j.phase));
        if job_final(&job.phase) && !was_final {
            metrics.remedy_job(&job.rule, &job.phase);
            if job.phase == "Succeeded"
                && let (Some(from), Some(to)) = (parse_rfc3339(&job.condition_time), parse_rfc3339(&job.end_time))
                && let Ok(d) = to.duration_since(from)
            {
                metrics.time_to_heal.observe(d.as_secs_f64());
            }
            if self.remedies.approvals.remove(&job.id).is_some() {
                writes.push(Write::DeleteRecord {
                    kind: RECORD_APPROVAL,
                    key: job.id.clone(),
                });
            }
        }
        writes.push(job_write(&job));
        self.remedies.jobs.insert(job.id.clone(), job);
        if self.remedies.jobs.len() > MAX_JOBS
            && let Some(oldest) = self
                .remedies
                .jobs
                .values()
                .filter(|j| job_final(&j.phase))
                .min_by(|a, b| a.end_time.cmp(&b.end_time))
                .map(|j| j.id.clone())
        {
            self.remedies.jobs.remove(&oldest);
            writes.push(Write::DeleteRecord {
                kind: RECORD_JOB,
                key: oldest,
            });
        }
        writes
    }

    /// A job as the API shows it: one waiting for approval says so.
    fn job_view(&self, j: &RemedyJob) -> RemedyJob {
        let mut j = j.clone();
        if let Some(a) = self.remedies.approvals.get(&j.id) {
            match a.state.as_str() {
                "Pending" if j.phase == "AwaitingPermit" => j.phase = "AwaitingApproval".into(),
                "Approved" => j.approved_by = a.actor.clone(),
                _ => {}
            }
        }
        j
    }
}

/// Loads the remedy records at start.
pub(super) fn load(st: &mut State, records: &[(String, String, String)]) {
    for (kind, key, body) in records {
        match kind.as_str() {
            RECORD_JOB => match serde_json::from_str::<RemedyJob>(body) {
                Ok(j) => {
                    st.remedies.jobs.insert(key.clone(), j);
                }
                Err(e) => tracing::error!(job = %key, error = %e, "stored remedy job does not parse; it is dropped"),
            },
            RECORD_APPROVAL => match serde_json::from_str::<Approval>(body) {
                Ok(a) => {
                    st.remedies.approvals.insert(key.clone(), a);
                }
                Err(e) => tracing::error!(job = %key, error = %e, "stored approval does not parse; the job asks again"),
            },
            RECORD_BREAKER => match serde_json::from_str::<Breaker>(body) {
                Ok(b) => {
                    st.remedies.breakers.insert(key.clone(), b);
                }
                Err(e) => {
                    tracing::error!(rule = %key, error = %e, "stored breaker does not parse; it starts open to be safe (nkctl remedy breaker reset)");
                    st.remedies.breakers.insert(
                        key.clone(),
                        Breaker {
                            open: true,
                            reason: format!("the stored breaker record did not parse: {e}"),
                            ..Default::default()
                        },
                    );
                }
            },
            RECORD_INCIDENT => {
                if let Ok(ev) = serde_json::from_str::<Event>(body) {
                    st.remedies.incidents.push_back((key.clone(), ev));
                }
            }
            super::permits::RECORD_GRANT => {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(body)
                    && let Some(rule) = v["action"].as_str().and_then(|a| a.strip_prefix("remedy/"))
                {
                    let ms = v["ms"].as_u64().unwrap_or(0);
                    st.remedies.grants.entry(rule.to_string()).or_default().push_back(ms);
                }
            }
            _ => {}
        }
    }
    for g in st.remedies.grants.values_mut() {
        g.make_contiguous().sort();
    }
    st.remedies.incidents.make_contiguous().sort_by(|a, b| a.0.cmp(&b.0));
}

/// Query filters of `/v1/remedies`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct JobFilter {
    pub node: Option<String>,
    pub rule: Option<String>,
    pub phase: Option<String>,
    /// Only jobs that have not ended.
    pub active: bool,
}

impl Fleet {
    /// Evaluates every breaker and forgets rule grants older than an hour.
    /// Run about once a second.
    pub fn tick_remedies(&self) {
        let now_ms = unix_ms(self.now());
        let mut st = self.lock();
        let rules: Vec<String> = st
            .remedy_rules()
            .filter(|r| r.spec.as_ref().is_some_and(|s| s.breaker.is_some()))
            .filter_map(|r| r.metadata.as_ref().map(|m| m.name.clone()))
            .collect();
        let mut writes = Vec::new();
        for r in rules {
            writes.extend(st.evaluate_breaker(&r, now_ms, &self.metrics).0);
        }
        for g in st.remedies.grants.values_mut() {
            while g.front().is_some_and(|ms| *ms + 3_600_000 <= now_ms) {
                g.pop_front();
            }
        }
        drop(st);
        if !writes.is_empty() {
            self.store.submit(writes, None);
        }
    }

    /// Jobs matching `f`, newest first.
    pub fn remedy_jobs(&self, f: &JobFilter) -> Vec<RemedyJob> {
        let st = self.lock();
        let mut out: Vec<RemedyJob> = st
            .remedies
            .jobs
            .values()
            .filter(|j| f.node.as_ref().is_none_or(|n| &j.node == n))
            .filter(|j| f.rule.as_ref().is_none_or(|r| &j.rule == r))
            .filter(|j| !f.active || !job_final(&j.phase))
            .map(|j| st.job_view(j))
            .filter(|j| f.phase.as_ref().is_none_or(|p| &j.phase == p))
            .collect();
        out.sort_by(|a, b| b.start_time.cmp(&a.start_time).then_with(|| a.id.cmp(&b.id)));
        out
    }

    /// One job.
    pub fn remedy_job(&self, id: &str) -> Result<RemedyJob, FleetError> {
        let st = self.lock();
        st.remedies
            .jobs
            .get(id)
            .map(|j| st.job_view(j))
            .ok_or_else(|| FleetError::NotFound {
                kind: "remedy job".into(),
                name: id.into(),
            })
    }

    /// Approves (`true`) or denies a job waiting in the approval queue.
    pub async fn decide_approval(&self, id: &str, approve: bool, actor: &str) -> Result<Approval, FleetError> {
        let a = {
            let st = self.lock();
            let Some(a) = st.remedies.approvals.get(id) else {
                return Err(FleetError::NotFound {
                    kind: "remedy job waiting for approval".into(),
                    name: id.into(),
                });
            };
            if a.state != "Pending" {
                return Err(FleetError::Conflict {
                    field: "job".into(),
                    message: format!("job {id} was already {} by {}", a.state.to_lowercase(), a.actor),
                });
            }
            Approval {
                state: if approve { "Approved" } else { "Denied" }.into(),
                actor: actor.to_string(),
                ms: unix_ms(self.now()),
                ..a.clone()
            }
        };
        self.store
            .commit(vec![json_write(RECORD_APPROVAL, id, &a)])
            .await
            .map_err(FleetError::Store)?;
        let _leader = self.permit_leader.lock().await;
        self.lock().remedies.approvals.insert(id.to_string(), a.clone());
        tracing::info!(job = id, node = %a.node, rule = %a.rule, state = %a.state, actor, "remedy approval decided");
        Ok(a)
    }

    /// Closes a rule's breaker (an operator fixed the cause).
    pub async fn reset_breaker(&self, rule: &str, actor: &str) -> Result<Breaker, FleetError> {
        let b = {
            let st = self.lock();
            if st.remedy_rule(rule).is_none() {
                return Err(FleetError::NotFound {
                    kind: "RemedyRule".into(),
                    name: rule.into(),
                });
            }
            breaker_reset(
                &st.remedies.breakers.get(rule).cloned().unwrap_or_default(),
                actor,
                unix_ms(self.now()),
            )
        };
        self.store
            .commit(vec![json_write(RECORD_BREAKER, rule, &b)])
            .await
            .map_err(FleetError::Store)?;
        let _leader = self.permit_leader.lock().await;
        self.lock().remedies.breakers.insert(rule.to_string(), b.clone());
        self.metrics.breaker_open(rule, false);
        tracing::warn!(rule, actor, "remedy breaker reset");
        Ok(b)
    }

    /// Every rule's breaker.
    pub fn breakers(&self) -> BTreeMap<String, Breaker> {
        self.lock().remedies.breakers.clone()
    }

    /// FleetIncident events, newest first.
    pub fn incidents(&self) -> Vec<Event> {
        self.lock()
            .remedies
            .incidents
            .iter()
            .rev()
            .map(|(_, e)| e.clone())
            .collect()
    }
}
