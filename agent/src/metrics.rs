//! Prometheus metrics of the agent (`nodekeeper_agent_*`).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// All agent metrics; cheap to clone.
#[derive(Clone, Default)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub outbox_pending: Gauge,
    pub outbox_dropped: Counter,
    pub reports_sent: Counter,
    pub link_connected: Gauge,
    pub link_sessions: Counter,
    pub link_failures: Counter,
    pub applied_revision: Gauge,
    pub events_recorded: Counter,
    /// NPD's `problem_counter{reason}`: problems seen, a counter as in NPD,
    /// served under NPD's exact name (see [`Metrics::encode`]).
    pub problems: Family<ReasonLabel, Counter>,
    /// NPD's `problem_gauge{type,reason}`: 1 while a condition is True.
    pub problem_gauge: Family<ConditionLabel, Gauge>,
    pub log_lines: Family<SourceLabel, Counter>,
    pub log_lost: Family<SourceLabel, Counter>,
    /// Reconcile passes of the converge engine and the time they took.
    pub reconciles: Counter,
    pub reconcile_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Component changes by how they ended (done, rolled_back, failed).
    pub component_changes: Family<ResultLabel, Counter>,
    pub component_drift: Counter,
    /// 1 while a converge step runs past its budget.
    pub converge_stuck: Gauge,
    /// Label values seen in `problem_counter` and `problem_gauge`: reasons
    /// come from rules and from anyone who may POST to the socket, so their
    /// number is capped ([`MAX_PROBLEM_SERIES`]) rather than left to grow.
    problem_series: Arc<std::sync::Mutex<std::collections::HashSet<(String, String)>>>,
    pub series_dropped: Counter,
    /// Check runs (probes, plugins, resource and hardware checks) by check
    /// and result (healthy, unhealthy, unknown, error).
    pub check_runs: Family<CheckLabel, Counter>,
    /// Time the check runs took, by check.
    pub check_seconds: Family<CheckNameLabel, Counter<f64, std::sync::atomic::AtomicU64>>,
    /// Plugin outputs cut at max_output_length, by source.
    pub plugin_output_truncated: Family<SourceLabel, Counter>,
    /// Descendants a check program left running, killed by the shim.
    pub check_leftovers_killed: Counter,
    /// Remedy jobs ended, by rule and result.
    pub remedy_jobs: Family<RuleResultLabel, Counter>,
    /// Remedy steps run, by action and result (ok, failed).
    pub remedy_steps: Family<ActionResultLabel, Counter>,
    /// Seconds from a condition turning True to its remedy succeeding.
    pub remedy_time_to_heal: HealHistogram,
}

/// Seconds to heal, buckets 1 s to about 4.5 h.
#[derive(Clone)]
pub struct HealHistogram(pub prometheus_client::metrics::histogram::Histogram);

impl Default for HealHistogram {
    fn default() -> Self {
        HealHistogram(prometheus_client::metrics::histogram::Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 14),
        ))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleResultLabel {
    pub rule: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionResultLabel {
    pub action: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabel {
    pub check: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckNameLabel {
    pub check: String,
}

/// Distinct `problem_counter`/`problem_gauge` series kept; updates of new
/// ones beyond it are dropped and counted in
/// `nodekeeper_agent_metric_series_dropped_total`.
pub const MAX_PROBLEM_SERIES: usize = 1000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabel {
    pub r#type: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

impl Metrics {
    pub fn remedy_job(&self, rule: &str, result: &str) {
        self.remedy_jobs
            .get_or_create(&RuleResultLabel {
                rule: rule.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    pub fn remedy_step(&self, action: &str, result: &str) {
        self.remedy_steps
            .get_or_create(&ActionResultLabel {
                action: action.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    /// Metrics registered for exposition.
    pub fn new() -> Metrics {
        let m = Metrics::default();
        let mut r = Registry::default();
        r.register(
            "nodekeeper_agent_outbox_pending",
            "Reports waiting for the hub's acknowledgement",
            m.outbox_pending.clone(),
        );
        r.register(
            "nodekeeper_agent_outbox_dropped",
            "Reports dropped because the outbox was full",
            m.outbox_dropped.clone(),
        );
        r.register(
            "nodekeeper_agent_reports_sent",
            "Reports sent to the hub (replays included)",
            m.reports_sent.clone(),
        );
        r.register(
            "nodekeeper_agent_link_connected",
            "1 while a session with the hub is open",
            m.link_connected.clone(),
        );
        r.register(
            "nodekeeper_agent_link_sessions",
            "Sessions opened with the hub",
            m.link_sessions.clone(),
        );
        r.register(
            "nodekeeper_agent_link_failures",
            "Failed connection attempts or broken sessions",
            m.link_failures.clone(),
        );
        r.register(
            "nodekeeper_agent_applied_revision",
            "Desired-state revision applied",
            m.applied_revision.clone(),
        );
        r.register(
            "nodekeeper_agent_events_recorded",
            "Events recorded on this node",
            m.events_recorded.clone(),
        );
        r.register(
            "nodekeeper_agent_remedy_jobs",
            "Remedy jobs ended, by rule and result (Succeeded, Failed, Denied, DryRun)",
            m.remedy_jobs.clone(),
        );
        r.register(
            "nodekeeper_agent_remedy_steps",
            "Remedy steps run, by action and result",
            m.remedy_steps.clone(),
        );
        r.register(
            "nodekeeper_agent_remedy_time_to_heal_seconds",
            "Time from a condition turning True to its remedy job succeeding",
            m.remedy_time_to_heal.0.clone(),
        );
        r.register(
            "problem_counter",
            "Problems seen, by reason (node-problem-detector's name)",
            m.problems.clone(),
        );
        r.register(
            "problem_gauge",
            "1 while a condition is True, by type and reason (node-problem-detector's name)",
            m.problem_gauge.clone(),
        );
        r.register(
            "nodekeeper_agent_log_lines",
            "Log lines read, by source",
            m.log_lines.clone(),
        );
        r.register(
            "nodekeeper_agent_log_lost",
            "Log lines lost before they could be read (ring-buffer overruns), by source",
            m.log_lost.clone(),
        );
        r.register(
            "nodekeeper_agent_converge_reconciles",
            "Reconcile passes over the node's components (drift checks included)",
            m.reconciles.clone(),
        );
        r.register(
            "nodekeeper_agent_converge_reconcile_seconds",
            "Time spent in reconcile passes, changes included",
            m.reconcile_seconds.clone(),
        );
        r.register(
            "nodekeeper_agent_component_changes",
            "Component changes by result (done, rolled_back, failed)",
            m.component_changes.clone(),
        );
        r.register(
            "nodekeeper_agent_component_drift",
            "Components found drifted and restored",
            m.component_drift.clone(),
        );
        r.register(
            "nodekeeper_agent_converge_stuck",
            "1 while a converge step runs past its budget (watchdog pings are withheld)",
            m.converge_stuck.clone(),
        );
        r.register(
            "nodekeeper_agent_metric_series_dropped",
            "Metric updates dropped because a family reached its series cap (distinct reasons)",
            m.series_dropped.clone(),
        );
        r.register(
            "nodekeeper_agent_check_runs",
            "Check runs (probes, plugins, resource and hardware checks) by check and result",
            m.check_runs.clone(),
        );
        r.register(
            "nodekeeper_agent_check_seconds",
            "Time spent running checks, by check",
            m.check_seconds.clone(),
        );
        r.register(
            "nodekeeper_agent_plugin_output_truncated",
            "Custom-plugin outputs cut at max_output_length, by source",
            m.plugin_output_truncated.clone(),
        );
        r.register(
            "nodekeeper_agent_check_leftovers_killed",
            "Processes a check program left running, killed after it ended",
            m.check_leftovers_killed.clone(),
        );
        Metrics {
            registry: Arc::new(r),
            ..m
        }
    }

    /// Whether the series (`kind`, `key`) may be updated: known ones always,
    /// new ones while fewer than [`MAX_PROBLEM_SERIES`] exist.
    fn admit(&self, kind: &str, key: &str) -> bool {
        let mut seen = self.problem_series.lock().unwrap_or_else(|p| p.into_inner());
        let k = (kind.to_string(), key.to_string());
        if seen.contains(&k) {
            return true;
        }
        if seen.len() >= MAX_PROBLEM_SERIES {
            drop(seen);
            self.series_dropped.inc();
            return false;
        }
        seen.insert(k);
        true
    }

    /// Counts a check run and its time.
    pub fn check_run(&self, check: &str, result: &str, seconds: f64) {
        if !self.admit("check", check) {
            return;
        }
        self.check_runs
            .get_or_create(&CheckLabel {
                check: check.into(),
                result: result.into(),
            })
            .inc();
        self.check_seconds
            .get_or_create(&CheckNameLabel { check: check.into() })
            .inc_by(seconds);
    }

    /// Counts a finished component change.
    pub fn component_change(&self, result: &str) {
        self.component_changes
            .get_or_create(&ResultLabel { result: result.into() })
            .inc();
    }

    /// Counts `n` problems with `reason`.
    pub fn problem_counter(&self, reason: &str, n: u64) {
        if !self.admit("counter", reason) {
            return;
        }
        self.problems
            .get_or_create(&ReasonLabel { reason: reason.into() })
            .inc_by(n);
    }

    /// Mirrors a condition into `problem_gauge`: its reasons read 0 except the
    /// current one while True.
    pub fn set_problem_gauge(&self, c: &nodekeeper_proto::v1::Condition) {
        let v = i64::from(c.status == "True");
        if !self.admit(&c.r#type, &c.reason) {
            return;
        }
        self.problem_gauge
            .get_or_create(&ConditionLabel {
                r#type: c.r#type.clone(),
                reason: c.reason.clone(),
            })
            .set(v);
    }

    /// The classic Prometheus text format: OpenMetrics would force `_total`
    /// onto `problem_counter`, and NPD's dashboards and alerts use its name.
    pub fn encode(&self) -> String {
        nodekeeper_proto::daemon::openmetrics_to_classic(
            &nodekeeper_proto::daemon::encode_metrics(&self.registry),
            &["problem_counter"],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_reasons_are_capped_and_the_rest_counted() {
        let m = Metrics::new();
        for i in 0..MAX_PROBLEM_SERIES + 250 {
            m.problem_counter(&format!("Reason{i}"), 1);
        }
        // Known series keep counting after the cap.
        m.problem_counter("Reason0", 1);
        let text = m.encode();
        let series = text.lines().filter(|l| l.starts_with("problem_counter{")).count();
        assert_eq!(series, MAX_PROBLEM_SERIES);
        assert!(text.contains("problem_counter{reason=\"Reason0\"} 2"), "{text}");
        assert!(text.contains("# TYPE problem_counter counter\n"), "{text}");
        assert!(
            !text.contains("problem_counter_total") && !text.contains("# EOF"),
            "{text}"
        );
        // Other counters keep the conventional `_total`, family and samples alike.
        assert!(
            text.contains("# TYPE nodekeeper_agent_metric_series_dropped_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("nodekeeper_agent_metric_series_dropped_total 250"),
            "{text}"
        );
    }
}
