//! The defender's executor: permit requests decided in batches against a
//! snapshot of the budgets (see [`crate::defender`]), stored before they are
//! answered, renewed, released and expired; the fleet freeze.

use std::time::{Duration, SystemTime};

use nodekeeper_proto::Resource;
use nodekeeper_proto::time::rfc3339;
use nodekeeper_proto::v1::{Event, Permit, PermitDecision, PermitRequest};
use tokio::sync::oneshot;

use super::nodes::{add_event, ready_status};
use super::{Fleet, FleetError, State};
use crate::defender::{self, Freeze, Held, NodeView, Snapshot, Verdict, unix_ms};
use crate::store::{Write, node_write};

/// Store record kinds of the defender.
pub(crate) const RECORD_PERMIT: &str = "permit";
pub(crate) const RECORD_GRANT: &str = "grant";
pub(crate) const RECORD_FREEZE: &str = "freeze";
const FREEZE_KEY: &str = "fleet";

/// A queued acquire.
pub(crate) struct Pending {
    node: String,
    req: PermitRequest,
    reply: oneshot::Sender<PermitDecision>,
}

pub(super) fn held_view(h: &Held) -> Permit {
    Permit {
        id: h.id.clone(),
        node: h.node.clone(),
        action: h.action.clone(),
        reason: h.reason.clone(),
        granted_time: rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(h.granted_ms)),
        expire_time: rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(h.expires_ms)),
    }
}

fn denied(reason: String) -> PermitDecision {
    PermitDecision {
        granted: false,
        reason,
        ..Default::default()
    }
}

/// A refusal asking again will not change.
fn denied_for_good(reason: String) -> PermitDecision {
    PermitDecision {
        terminal: true,
        ..denied(reason)
    }
}

pub(super) fn event(reason: &str, severity: &str, message: String) -> Event {
    Event {
        time: nodekeeper_proto::time::now_rfc3339(),
        severity: severity.into(),
        reason: reason.into(),
        message,
        source: "defender".into(),
        count: 1,
        ..Default::default()
    }
}

impl State {
    /// Whether a node counts against budgets: NotReady/Unknown, holding a
    /// permit, or with a failed component.
    fn unavailable(&self, name: &str) -> bool {
        let Some(e) = self.nodes.get(name) else { return false };
        ready_status(&e.node) != "True"
            || self.permits.contains_key(name)
            || e.node.status.as_ref().is_some_and(|s| {
                s.components
                    .iter()
                    .any(|c| c.phase == nodekeeper_proto::component::phase::FAILED)
            })
    }

    fn budgets(&self) -> Vec<&nodekeeper_proto::v1::DisruptionBudget> {
        self.resources
            .values()
            .filter_map(|r| match r {
                Resource::DisruptionBudget(b) => Some(b),
                _ => None,
            })
            .collect()
    }

    fn selects_node(
        b: &nodekeeper_proto::v1::DisruptionBudget,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> bool {
        nodekeeper_proto::selector::selects(b.spec.as_ref().and_then(|s| s.node_selector.as_ref()), labels)
    }

    pub(super) fn labels_of(&self, name: &str) -> Option<&std::collections::BTreeMap<String, String>> {
        self.nodes
            .get(name)
            .and_then(|e| e.node.metadata.as_ref())
            .map(|m| &m.labels)
    }

    /// The budget counts at `now_ms`.
    pub(super) fn snapshot(&self, now_ms: u64) -> Snapshot {
        let budgets = self.budgets();
        let empty = std::collections::BTreeMap::new();
        Snapshot::new(
            &budgets,
            || self.nodes.keys(),
            |n| NodeView {
                unavailable: self.unavailable(n),
            },
            |b, n| Self::selects_node(b, self.labels_of(n).unwrap_or(&empty)),
            |b| {
                self.grants
                    .0
                    .iter()
                    .filter(|(ms, n, _)| {
                        *ms + 3_600_000 > now_ms && self.labels_of(n).is_some_and(|l| Self::selects_node(b, l))
                    })
                    .count() as u64
            },
            Some(self.freeze.clone()),
        )
    }

    fn node_budgets(&self, name: &str) -> Vec<usize> {
        let empty = std::collections::BTreeMap::new();
        let labels = self.labels_of(name).unwrap_or(&empty);
        self.budgets()
            .iter()
            .enumerate()
            .filter(|(_, b)| Self::selects_node(b, labels))
            .map(|(i, _)| i)
            .collect()
    }

    /// Adds a defender event to a node; the write that stores it.
    ///
    /// A denial repeating the node's latest event (a waiting agent asks
    /// every few seconds) only counts up in memory, stored with the node's
    /// next write: ten thousand nodes waiting out a freeze do not rewrite
    /// ten thousand rows every few seconds.
    pub(super) fn node_event(&mut self, name: &str, ev: Event) -> Option<Write> {
        let e = self.nodes.get_mut(name)?;
        let status = e.node.status.get_or_insert_with(Default::default);
        let repeat = ev.reason == "PermitDenied"
            && status
                .recent_events
                .last()
                .is_some_and(|l| l.reason == ev.reason && l.message == ev.message && l.source == ev.source);
        let _ = add_event(status, ev);
        (!repeat).then(|| node_write(&e.node, e.settings.as_ref()))
    }
}

impl Fleet {
    /// Answers a node's permit request (`acquire`, `renew`, `release`).
    /// `node` is the caller's authenticated name.
    pub async fn permit(&self, node: &str, req: PermitRequest) -> Result<PermitDecision, FleetError> {
        match req.op.as_str() {
            "acquire" => {
                let (tx, rx) = oneshot::channel();
                self.permit_queue
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Pending {
                        node: node.to_string(),
                        req,
                        reply: tx,
                    });
                {
                    // Whoever holds the leader lock decides everything queued
                    // so far: requests that arrive during a batch form the next.
                    let _leader = self.permit_leader.lock().await;
                    let batch = std::mem::take(&mut *self.permit_queue.lock().unwrap_or_else(|p| p.into_inner()));
                    if !batch.is_empty() {
                        self.decide_batch(batch).await;
                    }
                }
                rx.await
                    .map_err(|_| FleetError::Store("the permit decision was lost; ask again".into()))
            }
            "renew" => self.renew_permit(node, &req).await,
            "release" => self.release_permit(node, &req.permit_id).await,
            other => Err(FleetError::Invalid(nodekeeper_proto::ResourceError::new(
                "op",
                format!("{other:?}: one of acquire, renew, release"),
            ))),
        }
    }

    async fn decide_batch(&self, batch: Vec<Pending>) {
        let now = self.now();
        let now_ms = unix_ms(now);
        let mut answers = Vec::with_capacity(batch.len());
        let mut writes = Vec::new();
        let mut granted_new = Vec::new();
        let started;
        {
            let mut st = self.lock();
            // Deciding, not waiting for the lock, is what the metric counts.
            started = std::time::Instant::now();
            let mut snap: Option<Snapshot> = None;
            let mut remedy_batch = std::collections::BTreeMap::new();
            for p in batch {
                let ttl = defender::ttl(p.req.ttl_seconds);
                if !st.nodes.contains_key(&p.node) {
                    answers.push((p.reply, denied(format!("node {:?} is not registered", p.node)), None));
                    continue;
                }
                // The same action asked again (an agent that restarted) gets
                // the permit it holds, renewed.
                if let Some(h) = st.permits.get_mut(&p.node) {
                    if h.action == p.req.action {
                        h.expires_ms = now_ms + ttl.as_millis() as u64;
                        let h = h.clone();
                        writes.push(permit_write(&h));
                        let d = PermitDecision {
                            granted: true,
                            permit_id: h.id.clone(),
                            ttl_seconds: ttl.as_secs() as u32,
                            reason: "the node already holds this permit".into(),
                            terminal: false,
                        };
                        answers.push((p.reply, d, None));
                    } else {
                        let why = format!(
                            "the node holds a permit for {} ({}); one disruptive action at a time",
                            h.action, h.reason
                        );
                        self.metrics.permit(&p.req.action, "denied");
                        let w = st.node_event(
                            &p.node,
                            event("PermitDenied", "Warning", format!("{}: {why}", p.req.action)),
                        );
                        writes.extend(w);
                        answers.push((p.reply, denied(why), None));
                    }
                    continue;
                }
                if p.req.action.starts_with("remedy/")
                    && let Err((why, terminal)) =
                        st.remedy_check(&p.node, &p.req, now_ms, &mut remedy_batch, &mut writes, &self.metrics)
                {
                    self.metrics.permit(&p.req.action, "denied");
                    let w = st.node_event(
                        &p.node,
                        event("PermitDenied", "Warning", format!("{}: {why}", p.req.action)),
                    );
                    writes.extend(w);
                    let d = if terminal { denied_for_good(why) } else { denied(why) };
                    answers.push((p.reply, d, None));
                    continue;
                }
                let snap = snap.get_or_insert_with(|| st.snapshot(now_ms));
                let in_budgets = st.node_budgets(&p.node);
                let already = st.unavailable(&p.node);
                match snap.decide(&in_budgets, already) {
                    Verdict::Granted => {
                        st.next_permit += 1;
                        let h = Held {
                            id: format!("p{}-{}", now_ms, st.next_permit),
                            node: p.node.clone(),
                            action: p.req.action.clone(),
                            reason: p.req.reason.clone(),
                            granted_ms: now_ms,
                            expires_ms: now_ms + ttl.as_millis() as u64,
                        };
                        st.permits.insert(p.node.clone(), h.clone());
                        st.grants.0.push_back((now_ms, p.node.clone(), h.id.clone()));
                        st.remedy_granted(&h.action, now_ms);
                        writes.push(permit_write(&h));
                        writes.push(Write::PutRecord {
                            kind: RECORD_GRANT,
                            key: h.id.clone(),
                            body: serde_json::json!({"node": h.node, "ms": now_ms, "action": h.action}).to_string(),
                        });
                        let w = st.node_event(
                            &p.node,
                            event(
                                "PermitGranted",
                                "Info",
                                format!("{}: {} (ttl {} s)", h.action, h.reason, ttl.as_secs()),
                            ),
                        );
                        writes.extend(w);
                        let d = PermitDecision {
                            granted: true,
                            permit_id: h.id.clone(),
                            ttl_seconds: ttl.as_secs() as u32,
                            reason: String::new(),
                            terminal: false,
                        };
                        granted_new.push(p.node.clone());
                        answers.push((p.reply, d, Some(h)));
                    }
                    Verdict::Denied(why) => {
                        self.metrics.permit(&p.req.action, "denied");
                        let w = st.node_event(
                            &p.node,
                            event("PermitDenied", "Warning", format!("{}: {why}", p.req.action)),
                        );
                        writes.extend(w);
                        answers.push((p.reply, denied(why), None));
                    }
                }
                st.recount(&p.node);
            }
            self.metrics.permits_held.set(st.permits.len() as i64);
        }
        self.metrics
            .permit_decide_seconds
            .inc_by(started.elapsed().as_secs_f64());
        // Stored before anyone hears of it: a hub that dies now never
        // granted what it did not store.
        let committed = if writes.is_empty() {
            Ok(())
        } else {
            self.store.commit(writes).await
        };
        if let Err(e) = &committed {
            let mut st = self.lock();
            for n in &granted_new {
                if let Some(h) = st.permits.remove(n) {
                    // Not granted after all: not in the hour's count either.
                    st.grants.0.retain(|(_, _, id)| *id != h.id);
                    st.remedy_withdrawn(&h.action, h.granted_ms);
                }
                st.recount(n);
            }
            tracing::error!(error = %e, "cannot store permit decisions; the grants are withdrawn");
        }
        for (reply, d, held) in answers {
            let d = match (&committed, held) {
                (Err(e), Some(_)) => denied(format!("the hub could not store the permit ({e}); ask again")),
                (_, held) => {
                    if let Some(h) = &held {
                        self.metrics.permit(&h.action, "granted");
                        tracing::info!(node = %h.node, action = %h.action, permit = %h.id, "permit granted");
                    } else if !d.granted {
                        tracing::debug!(reason = %d.reason, "permit denied");
                    }
                    d
                }
            };
            let _ = reply.send(d);
        }
    }

    async fn renew_permit(&self, node: &str, req: &PermitRequest) -> Result<PermitDecision, FleetError> {
        let now_ms = unix_ms(self.now());
        let ttl = defender::ttl(req.ttl_seconds);
        let h = {
            let mut st = self.lock();
            match st.permits.get_mut(node) {
                Some(h) if h.id == req.permit_id => {
                    h.expires_ms = now_ms + ttl.as_millis() as u64;
                    h.clone()
                }
                _ => {
                    return Ok(denied(format!(
                        "permit {:?} is not held by {node:?} (it expired or was released); ask for a new one",
                        req.permit_id
                    )));
                }
            }
        };
        self.store
            .commit(vec![permit_write(&h)])
            .await
            .map_err(FleetError::Store)?;
        Ok(PermitDecision {
            granted: true,
            permit_id: h.id,
            ttl_seconds: ttl.as_secs() as u32,
            reason: String::new(),
            terminal: false,
        })
    }

    async fn release_permit(&self, node: &str, id: &str) -> Result<PermitDecision, FleetError> {
        let writes = {
            let mut st = self.lock();
            match st.permits.get(node) {
                Some(h) if h.id == id => {
                    let action = h.action.clone();
                    st.permits.remove(node);
                    st.recount(node);
                    self.metrics.permit(&action, "released");
                    self.metrics.permits_held.set(st.permits.len() as i64);
                    vec![Write::DeleteRecord {
                        kind: RECORD_PERMIT,
                        key: node.to_string(),
                    }]
                }
                _ => Vec::new(),
            }
        };
        if !writes.is_empty() {
            self.store.commit(writes).await.map_err(FleetError::Store)?;
        }
        Ok(PermitDecision {
            granted: false,
            permit_id: id.to_string(),
            ttl_seconds: 0,
            reason: "released".into(),
            terminal: false,
        })
    }

    /// Expires permits whose TTL ran out (their agent stopped renewing)
    /// and forgets grants older than an hour. Run about once a second.
    pub fn expire_permits(&self) {
        let now_ms = unix_ms(self.now());
        let mut writes = Vec::new();
        let mut st = self.lock();
        let expired: Vec<Held> = st
            .permits
            .values()
            .filter(|h| h.expires_ms <= now_ms)
            .cloned()
            .collect();
        for h in expired {
            st.permits.remove(&h.node);
            st.recount(&h.node);
            self.metrics.permit(&h.action, "expired");
            tracing::warn!(node = %h.node, action = %h.action, permit = %h.id, "permit expired: its agent stopped renewing it");
            writes.push(Write::DeleteRecord {
                kind: RECORD_PERMIT,
                key: h.node.clone(),
            });
            writes.extend(st.node_event(
                &h.node,
                event(
                    "PermitExpired",
                    "Warning",
                    format!("{}: not renewed in time; released ({})", h.action, h.reason),
                ),
            ));
        }
        for (_, _, id) in st.grants.prune(now_ms) {
            writes.push(Write::DeleteRecord {
                kind: RECORD_GRANT,
                key: id,
            });
        }
        self.metrics.permits_held.set(st.permits.len() as i64);
        drop(st);
        if !writes.is_empty() {
            self.store.submit(writes, None);
        }
    }

    /// Every permit held now, by node name.
    pub fn permits(&self) -> Vec<Permit> {
        self.lock().permits.values().map(held_view).collect()
    }

    /// The fleet freeze.
    pub fn freeze_state(&self) -> Freeze {
        self.lock().freeze.clone()
    }

    /// Turns the fleet freeze on or off; while on, no new permits.
    pub async fn set_freeze(&self, frozen: bool, reason: &str, actor: &str) -> Result<Freeze, FleetError> {
        let f = Freeze {
            frozen,
            reason: reason.to_string(),
            actor: actor.to_string(),
            since: nodekeeper_proto::time::now_rfc3339(),
        };
        let body = serde_json::to_string(&f).map_err(|e| FleetError::Store(e.to_string()))?;
        self.store
            .commit(vec![Write::PutRecord {
                kind: RECORD_FREEZE,
                key: FREEZE_KEY.into(),
                body,
            }])
            .await
            .map_err(FleetError::Store)?;
        // Taken after any batch being decided, so nothing is granted after
        // the freeze is acknowledged.
        let _leader = self.permit_leader.lock().await;
        self.lock().freeze = f.clone();
        tracing::warn!(frozen, reason, actor, "fleet freeze changed");
        Ok(f)
    }

    /// Per-budget status (selected, unavailable, allowed, grants in the hour).
    pub(super) fn budget_status(st: &State, name: &str) -> nodekeeper_proto::v1::DisruptionBudgetStatus {
        let snap = st.snapshot(unix_ms(crate::failpoint::now()));
        snap.budgets
            .iter()
            .find(|b| b.name == name)
            .map(|b| nodekeeper_proto::v1::DisruptionBudgetStatus {
                selected_nodes: b.selected,
                unavailable_nodes: b.unavailable,
                allowed_unavailable: b.allowed,
                granted_last_hour: b.granted_last_hour,
            })
            .unwrap_or_default()
    }
}

fn permit_write(h: &Held) -> Write {
    Write::PutRecord {
        kind: RECORD_PERMIT,
        key: h.node.clone(),
        body: serde_json::to_string(h).unwrap_or_default(),
    }
}

/// Loads the defender's records at start.
pub(super) fn load(st: &mut State, records: &[(String, String, String)]) {
    for (kind, key, body) in records {
        match kind.as_str() {
            RECORD_PERMIT => match serde_json::from_str::<Held>(body) {
                Ok(h) => {
                    st.permits.insert(key.clone(), h);
                }
                Err(e) => tracing::error!(node = %key, error = %e, "stored permit does not parse; it is dropped"),
            },
            RECORD_GRANT => {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(body) {
                    let ms = v["ms"].as_u64().unwrap_or(0);
                    let node = v["node"].as_str().unwrap_or_default().to_string();
                    st.grants.0.push_back((ms, node, key.clone()));
                }
            }
            RECORD_FREEZE => match serde_json::from_str::<Freeze>(body) {
                Ok(f) => st.freeze = f,
                Err(e) => {
                    tracing::error!(error = %e, "stored freeze does not parse; the fleet starts frozen to be safe (nkctl freeze off)");
                    st.freeze = Freeze {
                        frozen: true,
                        reason: format!("the stored freeze record did not parse: {e}"),
                        actor: "hub".into(),
                        since: nodekeeper_proto::time::now_rfc3339(),
                    };
                }
            },
            _ => {}
        }
    }
    st.grants.0.make_contiguous().sort();
}
