//! Nodes: agent sessions, heartbeats and the Ready condition, report ingest
//! with per-node sequence numbers, and applied revisions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nodekeeper_proto::component::{ARTIFACT_REFUSED, phase};
use nodekeeper_proto::time::{now_rfc3339, rfc3339};
use nodekeeper_proto::v1::{
    Condition, ConditionChange, Event, Hello, Node, NodeComponent, NodeStatus, ObjectMeta, Report, Welcome, report,
};
use nodekeeper_proto::{API_VERSION, validate};
use tokio::sync::{oneshot, watch};

use super::{Desired, Flags, Fleet, FleetError, NodeCounts, NodeEntry, Ready, SettingsCache, State, desired};
use crate::auth::audit::Record as AuditRecord;
use crate::store::{SharedSettings, node_write, revisions_write};

/// Recent events kept per node (identical events are aggregated).
const RECENT_EVENTS: usize = 50;

/// What a new session gets: its id, the welcome, and subscriptions to the
/// node's desired state and committed report sequence.
pub struct SessionHandles {
    pub id: u64,
    pub node: String,
    pub welcome: Welcome,
    pub desired: watch::Receiver<Desired>,
    pub acks: watch::Receiver<u64>,
    /// Resolves when a newer session of the same node replaces this one.
    pub replaced: oneshot::Receiver<()>,
}

pub(super) fn ready_status(node: &Node) -> &str {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.r#type == "Ready"))
        .map(|c| c.status.as_str())
        .unwrap_or("Unknown")
}

pub(super) fn in_sync(node: &Node) -> bool {
    node.status
        .as_ref()
        .is_some_and(|s| s.desired_revision == s.applied_revision)
}

/// Sets the Ready condition; true when its status or reason changed.
fn set_ready(status: &mut NodeStatus, value: &str, reason: &str, message: &str) -> bool {
    if let Some(c) = status.conditions.iter_mut().find(|c| c.r#type == "Ready") {
        if c.status == value && c.reason == reason {
            return false;
        }
        let now = now_rfc3339();
        if c.status != value {
            c.last_transition_time = now.clone();
        }
        c.status = value.into();
        c.reason = reason.into();
        c.message = message.into();
        c.last_heartbeat_time = now;
        return true;
    }
    let now = now_rfc3339();
    status.conditions.insert(
        0,
        Condition {
            r#type: "Ready".into(),
            status: value.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: now.clone(),
            last_heartbeat_time: now,
            source: "hub".into(),
            ..Default::default()
        },
    );
    true
}

/// Longest message kept from an agent report; longer ones are cut, so one
/// node cannot bloat the hub's memory.
const MAX_MESSAGE: usize = 1024;

fn truncate(s: &mut String) {
    if s.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
}

/// Conditions kept per node besides Ready (NPD's defaults declare about ten); a report
/// of a new type beyond it is dropped and counted.
pub(super) const MAX_CONDITIONS: usize = 64;
/// Components kept per node.
pub(super) const MAX_COMPONENTS: usize = 256;
/// Longest identifier (condition type, reason, source, component name) kept
/// from a report; a report with a longer one is dropped and counted.
pub(super) const MAX_NAME: usize = 256;
/// Labels an agent may claim in its Hello.
pub(super) const MAX_LABELS: usize = 128;

/// Why a report was dropped by a cap (the metric's `cap` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Capped {
    Conditions,
    Components,
    FieldLength,
}

impl Capped {
    pub(super) fn label(self) -> &'static str {
        match self {
            Capped::Conditions => "conditions",
            Capped::Components => "components",
            Capped::FieldLength => "field_length",
        }
    }
}

fn too_long(fields: &[&str]) -> bool {
    fields.iter().any(|f| f.len() > MAX_NAME)
}

fn upsert_condition(status: &mut NodeStatus, mut c: Condition) -> Result<(), Capped> {
    if too_long(&[&c.r#type, &c.reason, &c.source]) {
        return Err(Capped::FieldLength);
    }
    truncate(&mut c.message);
    truncate(&mut c.latest_message);
    if too_long(&[&c.latest_time]) {
        return Err(Capped::FieldLength);
    }
    if c.r#type == "Ready" {
        return Ok(()); // owned by the hub
    }
    // Ready is the hub's own and does not count.
    let full = status.conditions.iter().filter(|x| x.r#type != "Ready").count() >= MAX_CONDITIONS;
    match status.conditions.iter_mut().find(|x| x.r#type == c.r#type) {
        Some(x) => *x = c,
        None if full => return Err(Capped::Conditions),
        None => status.conditions.push(c),
    }
    Ok(())
}

pub(super) fn add_event(status: &mut NodeStatus, mut e: Event) -> Result<(), Capped> {
    if too_long(&[&e.reason, &e.source, &e.severity]) {
        return Err(Capped::FieldLength);
    }
    truncate(&mut e.message);
    let count = e.count.max(1);
    if let Some(i) = status
        .recent_events
        .iter()
        .position(|x| x.reason == e.reason && x.message == e.message && x.source == e.source)
    {
        let mut x = status.recent_events.remove(i);
        x.count += count;
        x.time = e.time;
        x.severity = e.severity;
        status.recent_events.push(x);
    } else {
        e.count = count;
        if e.first_time.is_empty() {
            e.first_time = e.time.clone();
        }
        status.recent_events.push(e);
        if status.recent_events.len() > RECENT_EVENTS {
            status.recent_events.remove(0);
        }
    }
    Ok(())
}

/// What a batch of reports comes to: the writes to commit, the node's ack
/// channel, the sequence to acknowledge after the commit, and the entries
/// for the audit log.
struct Ingested {
    writes: Vec<crate::store::Write>,
    ack: Arc<watch::Sender<u64>>,
    seq: u64,
    audits: Vec<AuditRecord>,
}

/// Whether `c` reports an artifact refusal the hub has not audited yet: the
/// node's stored entry does not already carry the same refusal (the agent
/// keeps reason and error through its retries, so a retry refused again is
/// not a new entry; another version or another reason is).
fn refused_anew(status: &NodeStatus, c: &NodeComponent) -> bool {
    c.phase == phase::FAILED
        && c.reason == ARTIFACT_REFUSED
        && !status.components.iter().any(|p| {
            p.name == c.name
                && p.reason == c.reason
                && p.last_error == c.last_error
                && p.declared_version == c.declared_version
        })
}

/// Records a component's status on the node; `Removed` drops it.
fn upsert_component(status: &mut NodeStatus, mut c: NodeComponent) -> Result<(), Capped> {
    if too_long(&[&c.name, &c.phase, &c.declared_version, &c.observed_version, &c.reason]) {
        return Err(Capped::FieldLength);
    }
    truncate(&mut c.last_error);
    let i = status.components.iter().position(|x| x.name == c.name);
    match (i, c.phase == nodekeeper_proto::component::phase::REMOVED) {
        (Some(i), true) => {
            status.components.remove(i);
        }
        (None, true) => {}
        (Some(i), false) => status.components[i] = c,
        (None, false) if status.components.len() >= MAX_COMPONENTS => return Err(Capped::Components),
        (None, false) => {
            status.components.push(c);
            status.components.sort_by(|a, b| a.name.cmp(&b.name));
        }
    }
    Ok(())
}

/// The labels selectors see: the agent's own (without protected keys, which
/// only the join token and operators may set), the join token's, then the
/// operator's.
pub(super) fn base_labels(node: &Node, protected: &[String]) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = node
        .status
        .as_ref()
        .map(|s| {
            s.agent_labels
                .iter()
                .filter(|(k, _)| !k.starts_with(crate::auth::PROTECTED_PREFIX) && !protected.contains(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    if let Some(status) = &node.status {
        labels.extend(status.join_labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    if let Some(spec) = &node.spec {
        labels.extend(spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    labels
}

/// A node's `metadata.labels`: its base labels and those its desired
/// settings (AgentProfiles) add. Derived, never stored on its own, so a hub
/// that restarted shows what one that never restarted would.
pub(super) fn node_labels(mut base: BTreeMap<String, String>, settings: &SharedSettings) -> BTreeMap<String, String> {
    base.extend(settings.value.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    base
}

fn flags(e: &NodeEntry) -> Flags {
    Flags {
        exists: true,
        ready: match ready_status(&e.node) {
            "True" => Ready::True,
            "False" => Ready::False,
            _ => Ready::Unknown,
        },
        in_sync: in_sync(&e.node),
        connected: e.session.is_some(),
    }
}

/// [`State::recount`] for an entry already at hand (a lookup by name is a
/// walk of the node map, measurable per acknowledgement at 10,000 nodes).
fn recount_entry(counts: &mut NodeCounts, e: &mut NodeEntry) {
    let now = flags(e);
    if now != e.counted {
        super::count(counts, e.counted, -1);
        super::count(counts, now, 1);
        e.counted = now;
    }
}

impl State {
    /// Brings the fleet counts up to date with one node's current state.
    /// Every method that changes a node calls it before releasing the lock.
    pub(super) fn recount(&mut self, name: &str) {
        if let Some(e) = self.nodes.get_mut(name) {
            recount_entry(&mut self.counts, e);
        }
    }

    /// Recounts every node from scratch (at start and once a second, so a
    /// missed `recount` can never leave the summary wrong for long).
    pub(super) fn recount_all(&mut self) {
        let mut counts = NodeCounts::default();
        for e in self.nodes.values_mut() {
            e.counted = flags(e);
            super::count(&mut counts, e.counted, 1);
        }
        if counts != self.counts {
            tracing::debug!(?counts, was = ?self.counts, "fleet counts corrected by recount");
        }
        self.counts = counts;
    }

    /// Recomputes one node's desired settings; on a change bumps the revision
    /// and returns the push to make after commit.
    /// Nodes with the same labels share one computation through `cache`.
    pub(super) fn recompute(
        &mut self,
        name: &str,
        cache: &mut SettingsCache,
    ) -> Option<(Arc<watch::Sender<Desired>>, Desired)> {
        static NONE_RELEASED: BTreeMap<String, i64> = BTreeMap::new();
        let node = &self.nodes.get(name)?.node;
        let base = base_labels(node, &self.protected_label_keys);
        let released = node.status.as_ref().map(|s| &s.released).unwrap_or(&NONE_RELEASED);
        let settings = match cache.get(&base, released) {
            Some(s) => s.clone(),
            None => {
                let released = released.clone();
                let profiles = self.resources.values().filter_map(|r| match r {
                    nodekeeper_proto::Resource::AgentProfile(p) => Some(p),
                    _ => None,
                });
                let mut s = desired::settings(&base, profiles);
                let sets = self.resources.values().filter_map(|r| match r {
                    nodekeeper_proto::Resource::DetectorSet(d) => Some(d),
                    _ => None,
                });
                desired::add_detectors(&mut s, &base, sets);
                let rules = self.resources.values().filter_map(|r| match r {
                    nodekeeper_proto::Resource::RemedyRule(r) => Some(r),
                    _ => None,
                });
                desired::add_remedies(&mut s, &base, rules);
                let node_sets: BTreeMap<&str, &nodekeeper_proto::v1::NodeSet> = self
                    .resources
                    .iter()
                    .filter_map(|((_, name), r)| match r {
                        nodekeeper_proto::Resource::NodeSet(ns) => Some((name.as_str(), ns)),
                        _ => None,
                    })
                    .collect();
                let components = self.node_components(&base, &released);
                desired::add_components(&mut s, &base, components.iter(), &node_sets);
                let shared = SharedSettings::new(s);
                cache.insert(&base, &released, shared.clone());
                shared
            }
        };
        let entry = self.nodes.get_mut(name)?;
        if entry.base != base {
            entry.base = base.clone();
        }
        // The labels are derived on every call, also when the settings did
        // not change: the agent's own labels may have (a new Hello), and a
        // node loaded from the store carries the labels of its last full
        // write, which fan-outs (revisions-only writes) do not refresh.
        entry.node.metadata.get_or_insert_with(Default::default).labels = node_labels(base, &settings);
        let status = entry.node.status.get_or_insert_with(Default::default);
        if entry.settings.as_ref().is_some_and(|s| s.hash == settings.hash) && status.desired_revision > 0 {
            return None;
        }
        self.revision += 1;
        status.desired_revision = self.revision;
        entry.settings = Some(settings.clone());
        let tx = entry.desired_tx.clone();
        recount_entry(&mut self.counts, entry);
        Some((
            tx,
            Desired {
                revision: self.revision,
                settings: Some(settings),
            },
        ))
    }
}

impl Fleet {
    /// Opens a session for an agent's Hello: registers or updates the node,
    /// computes its desired state, and returns the session's subscriptions.
    /// `join_labels` are the labels of the token that joined the node (none
    /// on an insecure hub).
    pub fn open_session(
        &self,
        hello: Hello,
        join_labels: Option<BTreeMap<String, String>>,
    ) -> Result<SessionHandles, FleetError> {
        validate::dns_subdomain("hello.nodeName", &hello.node_name)?;
        validate::labels("hello.labels", &hello.labels)?;
        if hello.labels.len() > MAX_LABELS {
            self.metrics.capped("labels");
            return Err(FleetError::Invalid(nodekeeper_proto::ResourceError::new(
                "hello.labels",
                format!(
                    "{} labels; at most {MAX_LABELS} are accepted per node",
                    hello.labels.len()
                ),
            )));
        }
        let facts = hello.facts.unwrap_or_default();
        let mut st = self.lock();
        st.next_session += 1;
        let id = st.next_session;
        let name = hello.node_name.clone();
        if let Some(e) = st.nodes.get(&name) {
            let known = e
                .node
                .status
                .as_ref()
                .and_then(|s| s.facts.as_ref())
                .map(|f| f.machine_id.as_str());
            if e.session.is_some() && known.is_some_and(|m| !m.is_empty() && m != facts.machine_id) {
                self.metrics.sessions_rejected.inc();
                return Err(FleetError::Conflict {
                    field: "hello.nodeName".into(),
                    message: format!(
                        "node {name:?} is connected from another machine (machine-id {}); give this agent a unique nodeName",
                        known.unwrap_or_default()
                    ),
                });
            }
        }
        let now = Instant::now();
        let entry = st.nodes.entry(name.clone()).or_insert_with(|| NodeEntry {
            node: Node {
                api_version: API_VERSION.into(),
                kind: "Node".into(),
                metadata: Some(ObjectMeta {
                    name: name.clone(),
                    creation_timestamp: now_rfc3339(),
                    ..Default::default()
                }),
                spec: Some(Default::default()),
                status: Some(Default::default()),
            },
            last_heartbeat: now,
            last_seen: SystemTime::now(),
            counted: Flags::default(),
            session: None,
            kill: None,
            desired_tx: Arc::new(watch::channel(Desired::default()).0),
            settings: None,
            ack_tx: Arc::new(watch::channel(0).0),
            base: BTreeMap::new(),
        });
        let (kill_tx, replaced) = oneshot::channel();
        entry.kill = Some(kill_tx); // drops (and so ends) any previous session
        entry.session = Some(id);
        entry.last_heartbeat = now;
        entry.last_seen = SystemTime::now();
        let status = entry.node.status.get_or_insert_with(Default::default);
        status.facts = Some(facts);
        status.agent_labels = hello.labels;
        if let Some(j) = join_labels {
            status.join_labels = j;
        }
        status.applied_revision = hello.applied_revision;
        status.last_seen = rfc3339(entry.last_seen);
        set_ready(status, "True", "AgentConnected", "agent link is up and heartbeating");
        let acks = entry.ack_tx.subscribe();
        let report_sequence = *acks.borrow();
        self.reserve_revisions(&mut st, 1);
        // Sessions share one computation per label set until resources
        // change: a reconnect storm after a hub restart computes each
        // distinct settings once, not once per node.
        let mut cache = std::mem::take(&mut st.settings_cache);
        let push = st.recompute(&name, &mut cache);
        st.settings_cache = cache;
        if push.is_some() {
            self.metrics.desired_pushed.inc();
        }
        st.recount(&name);
        let entry = st
            .nodes
            .get(&name)
            .ok_or_else(|| FleetError::Store("node vanished".into()))?;
        let write = node_write(&entry.node, entry.settings.as_ref());
        let desired = entry.desired_tx.subscribe();
        drop(st);
        // Revisions are never reused (see `reserve_revisions`), so the push need
        // not wait for the node's row to be committed.
        if let Some((tx, d)) = push {
            super::push(&tx, d);
        }
        self.store.submit(vec![write], None);
        self.rollouts_changed();
        self.metrics.sessions_opened.inc();
        self.metrics.sessions_active.inc();
        Ok(SessionHandles {
            id,
            node: name,
            welcome: Welcome {
                report_sequence,
                hub_version: nodekeeper_proto::VERSION.into(),
                protocol: nodekeeper_proto::LINK_PROTOCOL,
            },
            desired,
            acks,
            replaced,
        })
    }

    /// Ends a node's open session (its certificate was revoked); the agent
    /// sees its stream end.
    pub fn end_session(&self, name: &str) {
        if let Some(e) = self.lock().nodes.get_mut(name) {
            e.kill = None;
        }
    }

    /// Closes a session. Ready turns Unknown at once (the link is gone), unless
    /// a newer session of the node already replaced this one.
    pub fn close_session(&self, name: &str, id: u64) {
        self.metrics.sessions_active.dec();
        let mut st = self.lock();
        let Some(e) = st.nodes.get_mut(name) else {
            return;
        };
        if e.session != Some(id) {
            return;
        }
        e.session = None;
        e.kill = None;
        let status = e.node.status.get_or_insert_with(Default::default);
        status.last_seen = rfc3339(e.last_seen);
        let changed = set_ready(status, "Unknown", "AgentDisconnected", "agent link closed");
        self.rollouts_changed();
        let write = changed.then(|| node_write(&e.node, e.settings.as_ref()));
        st.recount(name);
        drop(st);
        if let Some(w) = write {
            self.store.submit(vec![w], None);
        }
    }

    /// A heartbeat: refreshes liveness in memory; writes only on a change
    /// (Ready transition or a new applied revision), like a node lease.
    pub fn heartbeat(&self, name: &str, id: u64, applied_revision: u64) {
        self.metrics.heartbeats.inc();
        let mut st = self.lock();
        let Some(e) = st.nodes.get_mut(name) else {
            return;
        };
        if e.session != Some(id) {
            return;
        }
        e.last_heartbeat = Instant::now();
        e.last_seen = SystemTime::now();
        let status = e.node.status.get_or_insert_with(Default::default);
        let ready_changed = set_ready(status, "True", "AgentConnected", "agent link is up and heartbeating");
        if ready_changed {
            self.rollouts_changed();
        }
        let applied_changed = status.applied_revision != applied_revision;
        status.applied_revision = applied_revision;
        if ready_changed || applied_changed {
            status.last_seen = rfc3339(e.last_seen);
            let write = if ready_changed {
                node_write(&e.node, e.settings.as_ref())
            } else {
                revisions_write(&e.node, e.settings.as_ref())
            };
            st.recount(name);
            drop(st);
            self.store.submit(vec![write], None);
        }
    }

    /// The agent applied a desired revision.
    pub fn applied(&self, name: &str, id: u64, revision: u64, error: &str) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let Some(e) = st.nodes.get_mut(name) else {
            return;
        };
        if e.session != Some(id) {
            return;
        }
        if !error.is_empty() {
            tracing::warn!(node = name, revision, error, "agent could not apply desired state");
            return;
        }
        let status = e.node.status.get_or_insert_with(Default::default);
        if status.applied_revision == revision {
            return;
        }
        status.applied_revision = revision;
        let write = revisions_write(&e.node, e.settings.as_ref());
        recount_entry(&mut st.counts, e);
        drop(guard);
        self.store.submit(vec![write], None);
    }

    /// Ingests reports in sequence order. A sequence number at or below the
    /// node's highest one is a replay and is ignored. The acknowledgement goes
    /// out only after the node's new state is committed.
    ///
    /// Waits while the store's queue is full, so a stalled disk slows ingest
    /// down (and, through the link's flow control, the agents) instead of
    /// growing the queue.
    ///
    /// Returns what the node did that the audit log must show: an artifact
    /// its own policy refused (once per refusal, not per retry), a report
    /// that named another node (refused: a node speaks only for itself).
    pub async fn ingest(&self, name: &str, id: u64, reports: Vec<Report>) -> Vec<AuditRecord> {
        // Room in the queue first, then the snapshot: what is written is
        // never older than what another writer queued meanwhile.
        let room = self.store.reserve().await;
        let Some(Ingested {
            writes,
            ack,
            seq,
            audits,
        }) = self.ingest_now(name, id, reports)
        else {
            return Vec::new();
        };
        crate::failpoint::kill_if("ingest-before-commit");
        self.store.submit_reserved(
            room,
            writes,
            Some(Box::new(move |r| {
                if r.is_ok() {
                    ack.send_if_modified(|cur| {
                        let newer = seq > *cur;
                        if newer {
                            *cur = seq;
                        }
                        newer
                    });
                }
            })),
        );
        audits
    }

    /// The in-memory half of [`Fleet::ingest`].
    fn ingest_now(&self, name: &str, id: u64, reports: Vec<Report>) -> Option<Ingested> {
        let mut st = self.lock();
        let mut jobs = Vec::new();
        let mut audits = Vec::new();
        let e = st.nodes.get_mut(name)?;
        if e.session != Some(id) {
            return None;
        }
        let status = e.node.status.get_or_insert_with(Default::default);
        let (mut accepted, mut dups) = (0u64, 0u64);
        let mut capped = Vec::new();
        let mut component_news = false;
        let mut component_reported = false;
        for r in reports {
            if r.sequence <= status.report_sequence {
                dups += 1;
                continue;
            }
            status.report_sequence = r.sequence;
            status.reports_received += 1;
            status.reports_dropped += r.dropped_before;
            accepted += 1;
            let applied = match r.body {
                Some(report::Body::Condition(ConditionChange {
                    condition: Some(c),
                    removed: true,
                })) => {
                    status
                        .conditions
                        .retain(|x| !(x.r#type == c.r#type && x.source == c.source));
                    Ok(())
                }
                Some(report::Body::Condition(c)) => c.condition.map_or(Ok(()), |c| upsert_condition(status, c)),
                Some(report::Body::Event(ev)) => add_event(status, ev),
                Some(report::Body::Component(mut c)) => {
                    component_news |= c.phase == phase::DONE || c.phase == phase::FAILED;
                    component_reported = true;
                    truncate(&mut c.last_error);
                    if refused_anew(status, &c) {
                        audits.push(
                            AuditRecord::new(format!("node:{name}"), "artifact", format!("components/{}", c.name))
                                .refused(&c.last_error),
                        );
                    }
                    upsert_component(status, c)
                }
                // A node speaks only for itself: a job of another node is
                // refused (still acknowledged: resending cannot help).
                Some(report::Body::Remedy(j)) if !j.node.is_empty() && j.node != name => {
                    let why = format!(
                        "node {name:?} cannot report remedy job {:?} of node {:?}; a node speaks only for itself",
                        j.id, j.node
                    );
                    tracing::warn!(node = name, "{why}");
                    audits.push(
                        AuditRecord::new(format!("node:{name}"), "report", format!("nodes/{}", j.node)).refused(why),
                    );
                    Ok(())
                }
                Some(report::Body::Remedy(j)) => {
                    jobs.push(j);
                    Ok(())
                }
                None => Ok(()),
            };
            // Still acknowledged (it is the agent's, resending cannot help);
            // counted, and warned about once per batch.
            if let Err(cap) = applied {
                capped.push(cap);
            }
        }
        for cap in &capped {
            self.metrics.capped(cap.label());
        }
        if let Some(cap) = capped.first() {
            tracing::warn!(
                node = name,
                dropped = capped.len(),
                cap = cap.label(),
                "reports dropped by a per-node cap"
            );
        }
        self.metrics.reports_received.inc_by(accepted);
        self.metrics.reports_duplicate.inc_by(dups);
        if component_reported {
            self.rollouts_changed();
        }
        if component_news {
            self.rollout_nudge.notify_one();
        }
        if accepted == 0 {
            return None;
        }
        let seq = status.report_sequence;
        let mut writes = vec![node_write(&e.node, e.settings.as_ref())];
        let ack = e.ack_tx.clone();
        for j in jobs {
            writes.extend(st.remedy_reported(name, j, &self.metrics));
        }
        Some(Ingested {
            writes,
            ack,
            seq,
            audits,
        })
    }

    /// Turns Ready to Unknown for nodes whose heartbeats stopped for longer
    /// than the grace period (at least three of their heartbeat intervals),
    /// and refreshes the fleet gauges. Run about once a second.
    pub fn tick(&self) {
        self.tick_at(Instant::now());
    }

    /// [`Fleet::tick`] as of `now` (tests move the clock).
    pub fn tick_at(&self, now: Instant) {
        let mut writes = Vec::new();
        let mut st = self.lock();
        for e in st.nodes.values_mut() {
            let hb = e
                .settings
                .as_ref()
                .map(|s| s.value.heartbeat_seconds)
                .unwrap_or(desired::DEFAULT_HEARTBEAT_SECONDS);
            let status = e.node.status.get_or_insert_with(Default::default);
            let grace = self.config.grace.max(Duration::from_secs(u64::from(hb) * 3));
            if now.duration_since(e.last_heartbeat) > grace
                && set_ready(
                    status,
                    "Unknown",
                    "NodeStatusUnknown",
                    "agent stopped posting heartbeats",
                )
            {
                status.last_seen = rfc3339(e.last_seen);
                writes.push(node_write(&e.node, e.settings.as_ref()));
            }
        }
        st.recount_all();
        let c = st.counts.clone();
        drop(st);
        if !writes.is_empty() {
            self.rollouts_changed();
        }
        self.metrics.nodes.set(c.total as i64);
        self.metrics.nodes_ready.set(c.ready as i64);
        self.metrics.nodes_in_sync.set(c.in_sync as i64);
        if !writes.is_empty() {
            self.store.submit(writes, None);
        }
    }

    /// Deletes a node: its entry, its row in the store, its place in the
    /// counts. Refused while its agent is connected (it would register again
    /// at once) unless `force`, which also closes the session.
    pub async fn delete_node(&self, name: &str, force: bool) -> Result<Node, FleetError> {
        let (tx, rx) = oneshot::channel();
        let removed = {
            let mut st = self.lock();
            let Some(e) = st.nodes.get(name) else {
                return Err(FleetError::NotFound {
                    kind: "Node".into(),
                    name: name.into(),
                });
            };
            if e.session.is_some() && !force {
                return Err(FleetError::Conflict {
                    field: "metadata.name".into(),
                    message: format!(
                        "node {name:?} has a connected agent, which would register it again; stop the agent first, or delete with force (nkctl delete node {name} --force) to also close its session"
                    ),
                });
            }
            let view = Self::view(e);
            let mut entry = st.nodes.remove(name);
            if let Some(e) = entry.as_mut() {
                super::count(&mut st.counts, e.counted, -1);
                e.counted = Flags::default();
                // Ends its session's outbound stream.
                e.kill = None;
                e.session = None;
            }
            // Queued under the lock, so a session that registers the node
            // again right after is written after the delete.
            self.store.submit(
                vec![crate::store::Write::DeleteNode { name: name.into() }],
                Some(Box::new(move |r| {
                    let _ = tx.send(r);
                })),
            );
            (view, entry)
        };
        let (removed, entry) = removed;
        let committed = rx.await.unwrap_or_else(|_| Err("store writer stopped".into()));
        if let Err(e) = committed {
            // Nothing half-done: the node is back as it was (without its
            // session, which was closed), unless it registered again meanwhile.
            let mut st = self.lock();
            if let Some(entry) = entry
                && !st.nodes.contains_key(name)
            {
                st.nodes.insert(name.to_string(), entry);
                st.recount(name);
            }
            return Err(FleetError::Store(e));
        }
        self.metrics.nodes_deleted.inc();
        self.rollouts_changed();
        tracing::info!(node = name, force, "node deleted");
        Ok(removed)
    }

    fn view(e: &NodeEntry) -> Node {
        let mut n = e.node.clone();
        let status = n.status.get_or_insert_with(Default::default);
        status.settings = e.settings.as_ref().map(|s| s.value.clone());
        status.connected = e.session.is_some();
        status.last_seen = rfc3339(e.last_seen);
        if e.session.is_some()
            && let Some(c) = status.conditions.iter_mut().find(|c| c.r#type == "Ready")
        {
            c.last_heartbeat_time = rfc3339(e.last_seen);
        }
        n
    }

    /// A page of nodes in name order: at most `limit` of those `selector`
    /// selects, starting after the node named `after` (the previous page's
    /// `continue` token; empty for the first page). Returns the page and the
    /// token of the next one (empty when this is the last). Only the page is
    /// copied out of the fleet, so paging through 10,000 nodes costs no more
    /// memory than one page.
    pub fn list_nodes_page(
        &self,
        selector: Option<&nodekeeper_proto::v1::LabelSelector>,
        after: &str,
        limit: usize,
    ) -> (Vec<Node>, String) {
        use std::ops::Bound;
        let st = self.lock();
        let start = if after.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(after)
        };
        let selected = st.nodes.range::<str, _>((start, Bound::Unbounded)).filter(|(_, e)| {
            let labels = e.node.metadata.as_ref().map(|m| &m.labels);
            nodekeeper_proto::selector::selects(selector, labels.unwrap_or(&BTreeMap::new()))
        });
        let (page, next) = nodekeeper_proto::api::page(selected, limit, |(name, _)| (*name).clone());
        // The specs of a node's desired components are left out (name and
        // generation stay): they are the Components' own, and repeated per
        // node they would make a fleet listing megabytes large. `get_node`
        // has them.
        let page = page
            .into_iter()
            .map(|(name, e)| {
                let mut n = Self::view(e);
                if let Some(s) = n.status.as_mut() {
                    s.permit = st.permits.get(name.as_str()).map(super::permits::held_view);
                }
                if let Some(s) = n.status.as_mut().and_then(|s| s.settings.as_mut()) {
                    for c in &mut s.components {
                        c.spec = None;
                    }
                }
                n
            })
            .collect();
        (page, next)
    }

    /// One node.
    pub fn get_node(&self, name: &str) -> Result<Node, FleetError> {
        let st = self.lock();
        let mut n = st.nodes.get(name).map(Self::view).ok_or_else(|| FleetError::NotFound {
            kind: "Node".into(),
            name: name.into(),
        })?;
        if let Some(s) = n.status.as_mut() {
            s.permit = st.permits.get(name).map(super::permits::held_view);
        }
        Ok(n)
    }
}
