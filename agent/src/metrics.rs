//! Prometheus metrics of the agent (`nodekeeper_agent_*`).

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
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
}

impl Metrics {
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
        Metrics {
            registry: Arc::new(r),
            ..m
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        nodekeeper_proto::daemon::encode_metrics(&self.registry)
    }
}
