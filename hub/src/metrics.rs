//! Prometheus metrics of the hub (conventional names: `nodekeeper_hub_*`,
//! counters end in `_total`).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// All hub metrics; cheap to clone (shared handles).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub reports_received: Counter,
    pub reports_duplicate: Counter,
    pub heartbeats: Counter,
    pub sessions_opened: Counter,
    pub sessions_rejected: Counter,
    pub sessions_active: Gauge,
    /// Parts of agent reports dropped by a cap, by what was capped.
    pub reports_capped: Family<CapLabel, Counter>,
    pub nodes_deleted: Counter,
    /// Admission control of the agent listener.
    pub agent_connections: Gauge,
    pub connections_shed: Counter,
    pub accept_errors: Counter,
    pub sessions_throttled: Counter,
    pub desired_pushed: Counter,
    pub store_batches: Counter,
    pub store_writes: Counter,
    pub store_commit_seconds: Histogram,
    /// Operations queued for the store writer now.
    pub store_queued: Gauge,
    pub nodes: Gauge,
    pub nodes_ready: Gauge,
    pub nodes_in_sync: Gauge,
    /// Per Component: selected nodes by phase, and the updated ones (set at
    /// scrape time from the nodes' reports).
    pub component_nodes: Family<ComponentPhase, Gauge>,
    pub component_updated: Family<ComponentLabel, Gauge>,
    pub component_selected: Family<ComponentLabel, Gauge>,
    /// Defender decisions by action kind and result (granted, denied,
    /// expired, released).
    pub permits: Family<PermitLabels, Counter>,
    pub permits_held: Gauge,
    /// Seconds spent deciding batches of permit requests.
    pub permit_decide_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Seconds the rollout controller spent in its passes.
    pub rollout_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Nodes released to a new revision by rollouts.
    pub rollout_released: Counter,
    /// Remedy jobs agents reported ended, by rule and result.
    pub remedy_jobs: Family<RemedyLabels, Counter>,
    /// Seconds from a condition turning True to its remedy job succeeding:
    /// the fleet's time to heal.
    pub time_to_heal: Histogram,
    /// FleetIncidents (a remedy breaker opening), by rule.
    pub fleet_incidents: Family<RuleLabel, Counter>,
    /// 1 while a rule's breaker is open.
    pub breakers_open: Family<RuleLabel, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RemedyLabels {
    pub rule: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabel {
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PermitLabels {
    /// `component`, `remedy`.
    pub action: String,
    /// `granted`, `denied`, `expired`, `released`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ComponentPhase {
    pub component: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CapLabel {
    /// `conditions`, `components`, `field_length`, `labels`.
    pub cap: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ComponentLabel {
    pub component: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::default();
        let m = Metrics {
            registry: Arc::new(Registry::default()),
            reports_received: Counter::default(),
            reports_duplicate: Counter::default(),
            heartbeats: Counter::default(),
            sessions_opened: Counter::default(),
            sessions_rejected: Counter::default(),
            sessions_active: Gauge::default(),
            reports_capped: Family::default(),
            nodes_deleted: Counter::default(),
            agent_connections: Gauge::default(),
            connections_shed: Counter::default(),
            accept_errors: Counter::default(),
            sessions_throttled: Counter::default(),
            desired_pushed: Counter::default(),
            store_batches: Counter::default(),
            store_writes: Counter::default(),
            store_commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            store_queued: Gauge::default(),
            nodes: Gauge::default(),
            nodes_ready: Gauge::default(),
            nodes_in_sync: Gauge::default(),
            component_nodes: Family::default(),
            component_updated: Family::default(),
            component_selected: Family::default(),
            permits: Family::default(),
            permits_held: Gauge::default(),
            permit_decide_seconds: Counter::default(),
            rollout_seconds: Counter::default(),
            rollout_released: Counter::default(),
            remedy_jobs: Family::default(),
            time_to_heal: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            fleet_incidents: Family::default(),
            breakers_open: Family::default(),
        };
        r.register(
            "nodekeeper_hub_remedy_jobs",
            "Remedy jobs ended, by rule and result (Succeeded, Failed, Denied, DryRun)",
            m.remedy_jobs.clone(),
        );
        r.register(
            "nodekeeper_hub_remedy_time_to_heal_seconds",
            "Time from a condition turning True to its remedy job succeeding",
            m.time_to_heal.clone(),
        );
        r.register(
            "nodekeeper_hub_fleet_incidents",
            "Remedy breakers opened (correlated faults), by rule",
            m.fleet_incidents.clone(),
        );
        r.register(
            "nodekeeper_hub_remedy_breaker_open",
            "1 while a RemedyRule's breaker is open",
            m.breakers_open.clone(),
        );
        r.register(
            "nodekeeper_hub_reports_received",
            "Reports accepted from agents (each sequence number once)",
            m.reports_received.clone(),
        );
        r.register(
            "nodekeeper_hub_reports_duplicate",
            "Reports ignored because their sequence number was already persisted",
            m.reports_duplicate.clone(),
        );
        r.register("nodekeeper_hub_heartbeats", "Heartbeats received", m.heartbeats.clone());
        r.register(
            "nodekeeper_hub_sessions_opened",
            "Agent sessions accepted",
            m.sessions_opened.clone(),
        );
        r.register(
            "nodekeeper_hub_sessions_rejected",
            "Agent sessions refused (bad hello, name conflict)",
            m.sessions_rejected.clone(),
        );
        r.register(
            "nodekeeper_hub_sessions_active",
            "Agent sessions open now",
            m.sessions_active.clone(),
        );
        r.register(
            "nodekeeper_hub_reports_capped",
            "Report contents dropped because a per-node cap was reached (conditions, components, field lengths, labels)",
            m.reports_capped.clone(),
        );
        r.register(
            "nodekeeper_hub_nodes_deleted",
            "Nodes deleted by operators",
            m.nodes_deleted.clone(),
        );
        r.register(
            "nodekeeper_hub_agent_connections",
            "Open connections on the agent listener",
            m.agent_connections.clone(),
        );
        r.register(
            "nodekeeper_hub_agent_connections_shed",
            "Agent connections closed at once, past the refusal margin of the connection limit",
            m.connections_shed.clone(),
        );
        r.register(
            "nodekeeper_hub_accept_errors",
            "Failed accepts on the agent listener (at the open-files limit, waited out with a pause)",
            m.accept_errors.clone(),
        );
        r.register(
            "nodekeeper_hub_sessions_throttled",
            "Agent sessions refused with Unavailable and a retry hint (connection, source or session limit)",
            m.sessions_throttled.clone(),
        );
        r.register(
            "nodekeeper_hub_desired_pushed",
            "Desired-state revisions computed for nodes",
            m.desired_pushed.clone(),
        );
        r.register(
            "nodekeeper_hub_store_batches",
            "Store transactions committed",
            m.store_batches.clone(),
        );
        r.register(
            "nodekeeper_hub_store_writes",
            "Rows written to the store",
            m.store_writes.clone(),
        );
        r.register(
            "nodekeeper_hub_store_commit_seconds",
            "Time to commit one store batch",
            m.store_commit_seconds.clone(),
        );
        r.register(
            "nodekeeper_hub_store_queued",
            "Operations waiting for the store writer (bounded by store.maxQueuedWrites for report ingest)",
            m.store_queued.clone(),
        );
        r.register("nodekeeper_hub_nodes", "Registered nodes", m.nodes.clone());
        r.register(
            "nodekeeper_hub_nodes_ready",
            "Nodes whose Ready condition is True",
            m.nodes_ready.clone(),
        );
        r.register(
            "nodekeeper_hub_nodes_in_sync",
            "Nodes whose applied revision equals the desired revision",
            m.nodes_in_sync.clone(),
        );
        r.register(
            "nodekeeper_hub_component_nodes",
            "Nodes a Component selects, by the phase they report",
            m.component_nodes.clone(),
        );
        r.register(
            "nodekeeper_hub_component_updated_nodes",
            "Nodes running a Component's declared version and spec, done",
            m.component_updated.clone(),
        );
        r.register(
            "nodekeeper_hub_component_selected_nodes",
            "Nodes a Component selects",
            m.component_selected.clone(),
        );
        r.register(
            "nodekeeper_hub_permits",
            "Defender decisions on permits, by action kind and result",
            m.permits.clone(),
        );
        r.register(
            "nodekeeper_hub_permits_held",
            "Permits held now",
            m.permits_held.clone(),
        );
        r.register(
            "nodekeeper_hub_permit_decide_seconds",
            "CPU time spent deciding permit requests",
            m.permit_decide_seconds.clone(),
        );
        r.register(
            "nodekeeper_hub_rollout_seconds",
            "Time the rollout controller spent in its passes",
            m.rollout_seconds.clone(),
        );
        r.register(
            "nodekeeper_hub_rollout_released_nodes",
            "Nodes released to a new Component revision by rollouts",
            m.rollout_released.clone(),
        );
        Metrics {
            registry: Arc::new(r),
            ..m
        }
    }

    /// Counts a capped part of a report.
    pub fn capped(&self, cap: &'static str) {
        self.reports_capped.get_or_create(&CapLabel { cap }).inc();
    }

    /// Counts a defender decision.
    pub fn remedy_job(&self, rule: &str, result: &str) {
        self.remedy_jobs
            .get_or_create(&RemedyLabels {
                rule: rule.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    pub fn fleet_incident(&self, rule: &str) {
        self.fleet_incidents
            .get_or_create(&RuleLabel { rule: rule.to_string() })
            .inc();
    }

    pub fn breaker_open(&self, rule: &str, open: bool) {
        self.breakers_open
            .get_or_create(&RuleLabel { rule: rule.to_string() })
            .set(i64::from(open));
    }

    pub fn permit(&self, action: &str, result: &'static str) {
        self.permits
            .get_or_create(&PermitLabels {
                action: crate::defender::action_kind(action).to_string(),
                result,
            })
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        nodekeeper_proto::daemon::encode_metrics(&self.registry)
    }
}
