//! The running agent's shared state: identity, applied desired state, the
//! outbox, recent events and the link's status. The link, the status socket
//! and converge all work on one `Agent`; hollow agents are many of them in one
//! process, without a store.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use nodekeeper_proto::daemon::LogLevel;
use nodekeeper_proto::time::{now_rfc3339, rfc3339};
use nodekeeper_proto::v1::{
    AgentSettings, Condition, ConditionChange, DesiredComponent, DesiredState, Event, Hello, NodeComponent, NodeFacts,
    report,
};
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::report::outbox::Outbox;
use crate::store::{AgentStore, StoreError};
use nodekeeper_proto::api::{AgentStatus, HubLink, OutboxStatus};

/// Recent events kept for the socket's `/v1/events`.
const RECENT_EVENTS: usize = 100;

/// What the link knows about the hub connection.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkStatus {
    pub connected: bool,
    pub last_connected: Option<String>,
    pub last_error: Option<String>,
    pub sessions: u64,
}

/// One agent.
pub struct Agent {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub facts: NodeFacts,
    /// Hub address; `None` in standalone mode.
    pub hub: Option<String>,
    pub started: SystemTime,
    pub metrics: Metrics,
    pub(crate) store: Option<Arc<AgentStore>>,
    pub(crate) log: Option<LogLevel>,
    pub(crate) desired: Mutex<DesiredState>,
    /// When the applied desired state was applied (for `/v1/status` and the
    /// hollow agents' fan-out latency).
    pub(crate) applied_at: Mutex<Option<SystemTime>>,
    outbox: Mutex<Outbox>,
    /// Woken when a report is added to the outbox.
    pub outbox_changed: Notify,
    /// Woken when new settings are applied (the checks rebuild if theirs
    /// changed).
    pub checks_changed: Notify,
    events: Mutex<VecDeque<Event>>,
    /// Conditions set by detectors (stored, so they survive restarts).
    conditions: Mutex<Vec<Condition>>,
    /// Where converge sends the hub's log monitors (none: hollow agents).
    detector_updates: Mutex<Option<std::sync::mpsc::Sender<crate::detect::manager::Control>>>,
    /// Where converge sends the hub's components (none: hollow agents).
    component_updates: Mutex<Option<std::sync::mpsc::Sender<Vec<DesiredComponent>>>>,
    /// Each component's state, for `/v1/components`.
    components: Mutex<BTreeMap<String, NodeComponent>>,
    link: Mutex<LinkStatus>,
    /// Permits from the hub's defender (converge and remedies ask).
    pub permits: Arc<crate::link::permit::Permits>,
    /// Remedy jobs, for `/v1/remedies`.
    pub remedies: Arc<crate::remedy::Jobs>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Built-in settings before any desired state arrives.
pub fn default_settings() -> AgentSettings {
    AgentSettings {
        log_level: "info".into(),
        heartbeat_seconds: 10,
        ..Default::default()
    }
}

/// Parts of a new [`Agent`].
pub struct AgentParts {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub facts: NodeFacts,
    pub hub: Option<String>,
    pub outbox: Outbox,
    pub store: Option<Arc<AgentStore>>,
    pub log: Option<LogLevel>,
    pub metrics: Metrics,
}

impl Agent {
    pub fn new(p: AgentParts) -> Agent {
        let permits = Arc::new(crate::link::permit::Permits::new(&p.name, p.hub.is_none()));
        Agent {
            permits,
            remedies: Arc::default(),
            name: p.name,
            labels: p.labels,
            facts: p.facts,
            hub: p.hub,
            started: SystemTime::now(),
            metrics: p.metrics,
            store: p.store,
            log: p.log,
            desired: Mutex::new(DesiredState {
                revision: 0,
                settings: Some(default_settings()),
            }),
            applied_at: Mutex::new(None),
            outbox: Mutex::new(p.outbox),
            outbox_changed: Notify::new(),
            checks_changed: Notify::new(),
            events: Mutex::new(VecDeque::new()),
            conditions: Mutex::new(Vec::new()),
            detector_updates: Mutex::new(None),
            component_updates: Mutex::new(None),
            components: Mutex::new(BTreeMap::new()),
            link: Mutex::new(LinkStatus::default()),
        }
    }

    /// The applied desired state.
    pub fn desired(&self) -> DesiredState {
        lock(&self.desired).clone()
    }

    /// The RemedyRules of the applied settings (without copying the rest:
    /// the remedy executor reads them every second).
    pub fn remedy_rules(&self) -> Vec<nodekeeper_proto::v1::RemedyRule> {
        lock(&self.desired)
            .settings
            .as_ref()
            .map(|s| s.remedy_rules.clone())
            .unwrap_or_default()
    }

    /// The applied revision.
    pub fn applied_revision(&self) -> u64 {
        lock(&self.desired).revision
    }

    /// Records a newly applied desired state; true when the settings changed.
    pub(crate) fn set_applied(&self, d: DesiredState) -> bool {
        let mut cur = lock(&self.desired);
        let changed = cur.settings != d.settings;
        *cur = d;
        drop(cur);
        *lock(&self.applied_at) = Some(SystemTime::now());
        changed
    }

    /// When the applied desired state was applied in this process.
    pub fn applied_at(&self) -> Option<SystemTime> {
        *lock(&self.applied_at)
    }

    /// The settings in force.
    pub fn settings(&self) -> AgentSettings {
        lock(&self.desired).settings.clone().unwrap_or_else(default_settings)
    }

    /// Reads the settings in force without copying them (the link reads
    /// the heartbeat interval after every desired state).
    pub fn with_settings<R>(&self, f: impl FnOnce(&AgentSettings) -> R) -> R {
        match &lock(&self.desired).settings {
            Some(s) => f(s),
            None => f(&default_settings()),
        }
    }

    /// The Hello that opens a session.
    pub fn hello(&self) -> Hello {
        Hello {
            node_name: self.name.clone(),
            facts: Some(self.facts.clone()),
            labels: self.labels.clone(),
            applied_revision: self.applied_revision(),
            last_report_sequence: self.with_outbox(|o| o.last_sequence()),
            protocol: nodekeeper_proto::LINK_PROTOCOL,
        }
    }

    /// Runs `f` on the outbox.
    pub fn with_outbox<T>(&self, f: impl FnOnce(&mut Outbox) -> T) -> T {
        let mut o = lock(&self.outbox);
        let before = o.dropped_total();
        let out = f(&mut o);
        self.metrics.outbox_pending.set(o.pending() as i64);
        self.metrics.outbox_dropped.inc_by(o.dropped_total() - before);
        out
    }

    /// Acknowledges reports up to `upto` (deleted from the outbox). A
    /// durable outbox deletes with an fsync; on the async runtime that runs
    /// off its workers, so heartbeats and other sessions are not held up.
    pub fn ack_reports(&self, upto: u64) -> Result<(), StoreError> {
        let durable = lock(&self.outbox).is_durable();
        let ack = || self.with_outbox(|o| o.ack(upto));
        if durable {
            nodekeeper_proto::daemon::off_runtime(ack)
        } else {
            ack()
        }
    }

    /// Queues a report for the hub (stored first) and wakes the link.
    /// In standalone mode there is no hub and nothing is queued.
    pub fn report(&self, body: report::Body) -> Result<Option<u64>, StoreError> {
        if self.hub.is_none() {
            return Ok(None);
        }
        let seq = self.with_outbox(|o| o.push(body))?;
        self.outbox_changed.notify_one();
        Ok(Some(seq))
    }

    /// Records an event: kept for `/v1/events` (identical events aggregated)
    /// and reported to the hub.
    pub fn record_event(&self, mut ev: Event) -> Result<Option<u64>, StoreError> {
        if ev.time.is_empty() {
            ev.time = now_rfc3339();
        }
        let seq = self.report(report::Body::Event(ev.clone()))?;
        self.remember_event(ev);
        Ok(seq)
    }

    /// Keeps an event for `/v1/events` (identical events aggregated).
    fn remember_event(&self, mut ev: Event) {
        self.metrics.events_recorded.inc();
        let n = ev.count.max(1);
        let mut events = lock(&self.events);
        if let Some(i) = events
            .iter()
            .position(|e| e.reason == ev.reason && e.message == ev.message && e.source == ev.source)
        {
            let mut e = events.remove(i).unwrap_or_default();
            e.count += n;
            e.time = ev.time;
            events.push_back(e);
        } else {
            ev.count = n;
            if ev.first_time.is_empty() {
                ev.first_time = ev.time.clone();
            }
            events.push_back(ev);
            if events.len() > RECENT_EVENTS {
                events.pop_front();
            }
        }
    }

    /// Records what a log source found — condition changes and events —
    /// and the source's position (`position`: its key and value) in one
    /// store transaction, so after a crash both are on disk or neither is:
    /// a restart neither loses nor repeats a finding.
    pub fn record_findings(
        &self,
        conditions: Vec<Condition>,
        events: Vec<Event>,
        position: Option<(&str, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        self.record(conditions, false, events, position)
    }

    /// Drops the conditions given as (type, source) (their checks were
    /// removed from the configuration), here and at the hub, so none stays
    /// True forever.
    pub fn retire_conditions(&self, which: &std::collections::BTreeSet<(String, String)>) -> Result<(), StoreError> {
        let gone: Vec<Condition> = lock(&self.conditions)
            .iter()
            .filter(|c| which.contains(&(c.r#type.clone(), c.source.clone())))
            .cloned()
            .collect();
        if gone.is_empty() {
            return Ok(());
        }
        for c in &gone {
            tracing::info!(condition = %c.r#type, source = %c.source, "retiring a condition: its check was removed");
            self.metrics.set_problem_gauge(&Condition {
                status: "False".into(),
                ..c.clone()
            });
        }
        self.record(gone, true, Vec::new(), None)
    }

    /// Stores and reports condition changes (or removals) and events.
    fn record(
        &self,
        conditions: Vec<Condition>,
        removed: bool,
        mut events: Vec<Event>,
        position: Option<(&str, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        let mut kv: Vec<(&str, Vec<u8>)> = Vec::new();
        if !conditions.is_empty() {
            let mut all = lock(&self.conditions);
            for c in &conditions {
                let at = all.iter().position(|x| x.r#type == c.r#type && x.source == c.source);
                match at {
                    Some(i) if removed => {
                        all.remove(i);
                    }
                    Some(i) => all[i] = c.clone(),
                    None if removed => {}
                    None => all.push(c.clone()),
                }
            }
            kv.push((
                crate::store::keys::CONDITIONS,
                serde_json::to_vec(&*all).unwrap_or_default(),
            ));
        }
        kv.extend(position);
        for ev in events.iter_mut() {
            if ev.time.is_empty() {
                ev.time = now_rfc3339();
            }
        }
        // With a durable outbox the reports carry the records in their
        // transaction; otherwise the records go alone.
        let mut kv_written = false;
        if self.hub.is_some() {
            let bodies = conditions
                .iter()
                .map(|c| {
                    report::Body::Condition(ConditionChange {
                        condition: Some(c.clone()),
                        removed,
                    })
                })
                .chain(events.iter().map(|e| report::Body::Event(e.clone())))
                .collect::<Vec<_>>();
            if !bodies.is_empty() {
                kv_written = self.with_outbox(|o| {
                    let durable = o.is_durable();
                    o.push_with(bodies, if durable { &kv } else { &[] }).map(|_| durable)
                })?;
                self.outbox_changed.notify_one();
            }
        }
        if !kv_written
            && !kv.is_empty()
            && let Some(store) = &self.store
        {
            store.put_all(&kv)?;
        }
        if !removed {
            for c in &conditions {
                self.metrics.set_problem_gauge(c);
            }
        }
        for e in events {
            self.remember_event(e);
        }
        Ok(())
    }

    /// Loads the detector conditions stored before a restart.
    pub fn load_conditions(&self) -> Result<Vec<Condition>, StoreError> {
        let Some(store) = &self.store else {
            return Ok(Vec::new());
        };
        let saved: Vec<Condition> = match store.get(crate::store::keys::CONDITIONS)? {
            Some(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::error!(error = %e, "stored conditions are unreadable; starting from the defaults");
                Vec::new()
            }),
            None => Vec::new(),
        };
        *lock(&self.conditions) = saved.clone();
        for c in &saved {
            self.metrics.set_problem_gauge(c);
        }
        Ok(saved)
    }

    /// Connects converge to the detector manager.
    pub fn set_detector_updates(&self, tx: std::sync::mpsc::Sender<crate::detect::manager::Control>) {
        *lock(&self.detector_updates) = Some(tx);
    }

    /// Hands the hub's log monitors to the detector manager, if there is one.
    pub fn update_detectors(&self, monitors: Vec<nodekeeper_proto::v1::LogMonitor>) {
        if let Some(tx) = lock(&self.detector_updates).as_ref() {
            let _ = tx.send(crate::detect::manager::Control::Monitors(monitors));
        }
    }

    /// Connects converge to the component engine.
    pub fn set_component_updates(&self, tx: std::sync::mpsc::Sender<Vec<DesiredComponent>>) {
        *lock(&self.component_updates) = Some(tx);
    }

    /// Hands the hub's components to the engine, if there is one.
    pub fn update_components(&self, components: Vec<DesiredComponent>) {
        if let Some(tx) = lock(&self.component_updates).as_ref() {
            let _ = tx.send(components);
        }
    }

    /// Records a component's state for the socket.
    pub fn set_component(&self, c: NodeComponent) {
        lock(&self.components).insert(c.name.clone(), c);
    }

    /// Forgets a component no longer managed.
    pub fn remove_component(&self, name: &str) {
        lock(&self.components).remove(name);
    }

    /// Every managed component's state, by name.
    pub fn components(&self) -> Vec<NodeComponent> {
        lock(&self.components).values().cloned().collect()
    }

    /// Detector conditions now.
    pub fn conditions(&self) -> Vec<Condition> {
        lock(&self.conditions).clone()
    }

    /// Recent events, oldest first.
    pub fn events(&self) -> Vec<Event> {
        lock(&self.events).iter().cloned().collect()
    }

    /// Updates the link status.
    pub fn set_link(&self, f: impl FnOnce(&mut LinkStatus)) {
        let mut l = lock(&self.link);
        f(&mut l);
        self.metrics.link_connected.set(i64::from(l.connected));
    }

    /// The link status.
    pub fn link(&self) -> LinkStatus {
        lock(&self.link).clone()
    }

    /// The document `/v1/status` serves.
    pub fn status(&self) -> AgentStatus {
        let d = self.desired();
        let (pending, last_seq, dropped, cap) =
            self.with_outbox(|o| (o.pending(), o.last_sequence(), o.dropped_total(), o.cap()));
        AgentStatus {
            node_name: self.name.clone(),
            version: nodekeeper_proto::VERSION.into(),
            mode: if self.hub.is_some() { "hub" } else { "standalone" }.into(),
            started: rfc3339(self.started),
            labels: self.labels.clone(),
            facts: self.facts.clone(),
            applied_revision: d.revision,
            applied_at: self.applied_at().map(rfc3339),
            settings: d.settings.unwrap_or_else(default_settings),
            hub: self.hub.as_ref().map(|a| {
                let l = self.link();
                HubLink {
                    address: a.clone(),
                    connected: l.connected,
                    last_connected: l.last_connected,
                    last_error: l.last_error,
                    sessions: l.sessions,
                }
            }),
            outbox: OutboxStatus {
                pending: pending as u64,
                last_sequence: last_seq,
                dropped,
                capacity: cap as u64,
            },
        }
    }
}
