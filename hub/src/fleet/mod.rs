//! The fleet: the hub's in-memory index of nodes and resources, kept in step
//! with the store, and every operation the API and the agent link perform on
//! it. Nothing here knows about HTTP or gRPC, so both front ends (and the
//! planned `Fleet` gRPC service) call the same code.

pub mod desired;
mod nodes;
mod permits;
mod remedies;
mod resources;
mod rollouts;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use nodekeeper_proto::v1::{DesiredState, Node};
use nodekeeper_proto::{Kind, Resource, ResourceError};
use tokio::sync::{oneshot, watch};

use crate::metrics::Metrics;
use crate::store::{Loaded, SharedSettings, Store, StoreError, Write};

pub use nodes::SessionHandles;
pub use remedies::JobFilter;
pub use resources::{ApplyAction, ApplyResult};

/// Errors of fleet operations, mapped to status codes by each front end.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{0}")]
    Invalid(#[from] ResourceError),
    #[error("{kind} {name:?} not found")]
    NotFound { kind: String, name: String },
    #[error("{field}: {message}")]
    Conflict { field: String, message: String },
    #[error("store: {0}; nothing was applied, retry when the store is healthy")]
    Store(String),
}

impl FleetError {
    /// The field the error is about, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            FleetError::Invalid(e) => Some(&e.field),
            FleetError::Conflict { field, .. } => Some(field),
            FleetError::NotFound { .. } => Some("metadata.name"),
            FleetError::Store(_) => None,
        }
    }
}

/// Tunables of the fleet.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// How long a node may go without heartbeats before Ready turns Unknown
    /// (at least three of the node's own heartbeat intervals).
    pub grace: Duration,
    /// Revisions of a resource's spec kept for history and undo; older
    /// ones are deleted as new ones are applied.
    pub revision_history_limit: usize,
    /// Label keys only join tokens and operators may set; an agent's claim
    /// of one (or of any `nodekeeper.io/` key) is ignored.
    pub protected_label_keys: Vec<String>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            grace: Duration::from_secs(40),
            revision_history_limit: DEFAULT_REVISION_HISTORY_LIMIT,
            protected_label_keys: Vec::new(),
        }
    }
}

/// Default of `revisionHistoryLimit`.
pub const DEFAULT_REVISION_HISTORY_LIMIT: usize = 50;

pub use nodekeeper_proto::api::{NodeCounts, Summary};

/// What a node contributes to the fleet counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Flags {
    exists: bool,
    /// "True", "False" or anything else as Unknown.
    ready: Ready,
    in_sync: bool,
    connected: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Ready {
    True,
    False,
    #[default]
    Unknown,
}

/// Adds (`sign` 1) or removes (-1) what one node contributes to the counts.
fn count(counts: &mut NodeCounts, f: Flags, sign: i64) {
    if !f.exists {
        return;
    }
    let add = |n: &mut u64| *n = n.wrapping_add_signed(sign);
    add(&mut counts.total);
    match f.ready {
        Ready::True => add(&mut counts.ready),
        Ready::False => add(&mut counts.not_ready),
        Ready::Unknown => add(&mut counts.unknown),
    }
    if f.in_sync {
        add(&mut counts.in_sync);
    }
    if f.connected {
        add(&mut counts.connected);
    }
}

pub(crate) struct NodeEntry {
    /// The persisted form.
    node: Node,
    /// What this node last contributed to `State::counts`.
    counted: Flags,
    last_heartbeat: Instant,
    last_seen: SystemTime,
    /// Id of the open session, if any.
    session: Option<u64>,
    /// Dropping it ends the open session's outbound stream.
    kill: Option<oneshot::Sender<()>>,
    /// Latest desired state; sessions subscribe.
    desired_tx: Arc<watch::Sender<Desired>>,
    /// The node's desired settings, shared with every node that has the
    /// same (never copied per node; `status.settings` stays empty in memory).
    settings: Option<Arc<SharedSettings>>,
    /// Highest report sequence committed to the store; sessions subscribe.
    ack_tx: Arc<watch::Sender<u64>>,
    /// The labels selectors see, as of the last recomputation (the rollout
    /// controller reads them without rebuilding them every pass).
    base: BTreeMap<String, String>,
}

#[derive(Default)]
pub(crate) struct State {
    /// Label keys agents may not claim (besides `nodekeeper.io/`).
    protected_label_keys: Arc<[String]>,
    nodes: BTreeMap<String, NodeEntry>,
    resources: BTreeMap<(Kind, String), Resource>,
    /// Every kept revision of a resource's spec (Components), by generation.
    revisions: BTreeMap<(Kind, String), BTreeMap<i64, serde_json::Value>>,
    resource_version: u64,
    /// Fleet counts, kept current on every node change (so the summary is
    /// O(1) however often dashboards poll it) and recounted by `tick`.
    counts: NodeCounts,
    /// The newest revision handed out.
    revision: u64,
    /// Revisions up to this are reserved (a write is queued or committed).
    revision_reserved: u64,
    next_session: u64,
    /// Settings computed since resources last changed, by label set and
    /// released revisions.
    settings_cache: SettingsCache,
    /// Rollout state per Component (stored) and the status its last pass
    /// computed.
    rollouts: BTreeMap<String, crate::rollout::State>,
    rollout_status: BTreeMap<String, nodekeeper_proto::v1::RolloutStatus>,
    /// Permits held, by node (stored).
    permits: BTreeMap<String, crate::defender::Held>,
    /// Grants of the last hour, for maxPerHour (stored).
    grants: crate::defender::Grants,
    freeze: crate::defender::Freeze,
    next_permit: u64,
    /// Jobs, approvals, breakers and rule grants (stored).
    remedies: remedies::Remedies,
}

/// The fleet; shared by every front end behind an `Arc`.
pub struct Fleet {
    state: Mutex<State>,
    /// Serializes resource writers (apply/delete) across their store commit.
    apply_lock: tokio::sync::Mutex<()>,
    store: Store,
    pub metrics: Metrics,
    config: FleetConfig,
    /// Revisions up to this are reserved durably.
    revision_durable: Arc<AtomicU64>,
    /// Permit requests waiting for the next batch decision.
    permit_queue: Mutex<Vec<permits::Pending>>,
    /// Held by whoever decides a batch of permit requests.
    permit_leader: tokio::sync::Mutex<()>,
    /// Woken when a node reports a component's progress, so the rollout
    /// controller's next pass comes at once rather than at its next tick.
    pub rollout_nudge: tokio::sync::Notify,
    /// Something a rollout depends on changed (resources, nodes, readiness,
    /// reports) since the last pass; with every rollout complete and nothing
    /// changed, a pass is skipped.
    rollout_dirty: AtomicBool,
}

pub(crate) const COUNTER_RESOURCE_VERSION: &str = "resource_version";
/// The highest desired-state revision the hub may hand out (see
/// [`Fleet::reserve_revisions`]).
pub(crate) const COUNTER_REVISION_RESERVED: &str = "revision_reserved";
/// Revisions reserved per durable write.
const REVISION_BLOCK: u64 = 1_000_000;

/// What a node's desired settings depend on: its labels and the Component
/// revisions released to it.
type CacheKey = (BTreeMap<String, String>, BTreeMap<String, i64>);

/// Desired settings per distinct key, within one recomputation. Looked up
/// by reference (a fan-out looks up every node's key; only the first node
/// of a label set pays for copying it).
#[derive(Default)]
pub(crate) struct SettingsCache(std::collections::HashMap<u64, Vec<(CacheKey, Arc<SharedSettings>)>>);

impl SettingsCache {
    fn hash(labels: &BTreeMap<String, String>, released: &BTreeMap<String, i64>) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        labels.hash(&mut h);
        released.hash(&mut h);
        h.finish()
    }

    pub(crate) fn get(
        &self,
        labels: &BTreeMap<String, String>,
        released: &BTreeMap<String, i64>,
    ) -> Option<&Arc<SharedSettings>> {
        self.0
            .get(&Self::hash(labels, released))?
            .iter()
            .find(|((l, r), _)| l == labels && r == released)
            .map(|(_, s)| s)
    }

    pub(crate) fn insert(
        &mut self,
        labels: &BTreeMap<String, String>,
        released: &BTreeMap<String, i64>,
        settings: Arc<SharedSettings>,
    ) {
        let slot = self.0.entry(Self::hash(labels, released)).or_default();
        slot.retain(|((l, r), _)| !(l == labels && r == released));
        slot.push(((labels.clone(), released.clone()), settings));
    }

    pub(crate) fn clear(&mut self) {
        self.0.clear();
    }
}

/// A node's desired state as its sessions see it: the revision and the
/// shared settings (turned into a `DesiredState` message only when sent).
#[derive(Debug, Clone, Default)]
pub struct Desired {
    pub revision: u64,
    pub settings: Option<Arc<SharedSettings>>,
}

impl Desired {
    /// The wire message.
    pub fn message(&self) -> DesiredState {
        DesiredState {
            revision: self.revision,
            settings: self.settings.as_ref().map(|s| s.value.clone()),
        }
    }
}

impl Fleet {
    /// Rebuilds the fleet from what the store loaded.
    pub fn new(store: Store, loaded: Loaded, metrics: Metrics, config: FleetConfig) -> Result<Arc<Fleet>, StoreError> {
        let mut state = State {
            resource_version: loaded.counters.get(COUNTER_RESOURCE_VERSION).copied().unwrap_or(0),
            // Start past everything an earlier run may have handed out.
            revision: loaded.counters.get(COUNTER_REVISION_RESERVED).copied().unwrap_or(0),
            protected_label_keys: config.protected_label_keys.clone().into(),
            ..Default::default()
        };
        for (kind, body) in loaded.resources {
            let value: serde_json::Value = serde_json::from_str(&body).map_err(|e| StoreError::Corrupt {
                path: "resources".into(),
                row: kind.clone(),
                reason: e.to_string(),
            })?;
            let r = Resource::from_value(value).map_err(|e| StoreError::Corrupt {
                path: "resources".into(),
                row: kind.clone(),
                reason: e.to_string(),
            })?;
            state.resources.insert((r.kind(), r.name().to_string()), r);
        }
        for (kind, name, generation, body) in loaded.revisions {
            let Some(k) = Kind::parse(&kind) else { continue };
            let value: serde_json::Value = serde_json::from_str(&body).map_err(|e| StoreError::Corrupt {
                path: "resource_revisions".into(),
                row: format!("{kind}/{name}/{generation}"),
                reason: e.to_string(),
            })?;
            state.revisions.entry((k, name)).or_default().insert(generation, value);
        }
        // A lowered revisionHistoryLimit applies at once; the store's copies
        // go with the next apply of each resource.
        for kept in state.revisions.values_mut() {
            while kept.len() > config.revision_history_limit {
                kept.pop_first();
            }
        }
        let now = Instant::now();
        for crate::store::LoadedNode { node, settings } in loaded.nodes {
            let Some(name) = node.metadata.as_ref().map(|m| m.name.clone()) else {
                continue;
            };
            let status = node.status.clone().unwrap_or_default();
            let desired = Desired {
                revision: status.desired_revision,
                settings: settings.clone(),
            };
            let last_seen = nodekeeper_proto::time::parse_rfc3339(&status.last_seen).unwrap_or(SystemTime::UNIX_EPOCH);
            state.nodes.insert(
                name,
                NodeEntry {
                    node,
                    // The grace period starts when the hub starts, as Kubernetes' node
                    // lifecycle controller does after a restart.
                    counted: Flags::default(),
                    last_heartbeat: now,
                    last_seen,
                    session: None,
                    kill: None,
                    desired_tx: Arc::new(watch::channel(desired).0),
                    settings,
                    ack_tx: Arc::new(watch::channel(status.report_sequence).0),
                    base: BTreeMap::new(),
                },
            );
        }
        rollouts::load(&mut state, &loaded.records);
        permits::load(&mut state, &loaded.records);
        remedies::load(&mut state, &loaded.records);
        // Every node's desired settings from the resources as stored: a
        // fan-out the previous run streamed but had not committed when it
        // died is computed again here, so every derived field (labels,
        // settings, revisions) is what a hub that never restarted shows.
        let names: Vec<String> = state.nodes.keys().cloned().collect();
        let mut cache = SettingsCache::default();
        let mut writes = Vec::new();
        for name in &names {
            if let Some((tx, d)) = state.recompute(name, &mut cache)
                && let Some(e) = state.nodes.get(name)
            {
                push(&tx, d);
                writes.push(crate::store::revisions_write(&e.node, e.settings.as_ref()));
            }
        }
        if !writes.is_empty() {
            tracing::info!(
                nodes = writes.len(),
                "desired state recomputed at start for nodes whose last change was not stored"
            );
        }
        state.settings_cache = cache;
        state.revision_reserved = state.revision + REVISION_BLOCK;
        writes.push(Write::Counter {
            key: COUNTER_REVISION_RESERVED,
            value: state.revision_reserved,
        });
        store.commit_blocking(writes).map_err(|e| StoreError::Corrupt {
            path: "counters".into(),
            row: COUNTER_REVISION_RESERVED.into(),
            reason: e,
        })?;
        state.recount_all();
        let revision_durable = Arc::new(AtomicU64::new(state.revision_reserved));
        Ok(Arc::new(Fleet {
            state: Mutex::new(state),
            apply_lock: tokio::sync::Mutex::new(()),
            store,
            metrics,
            config,
            revision_durable,
            permit_queue: Mutex::new(Vec::new()),
            permit_leader: tokio::sync::Mutex::new(()),
            rollout_nudge: tokio::sync::Notify::new(),
            rollout_dirty: AtomicBool::new(true),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; keep serving rather than
        // poisoning every later request.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fleet summary.
    pub fn summary(&self) -> Summary {
        let st = self.lock();
        let mut s = Summary {
            revision: st.revision,
            nodes: st.counts.clone(),
            ..Default::default()
        };
        for k in Kind::ALL {
            s.resources.insert(k.plural().to_string(), 0);
        }
        for (k, _) in st.resources.keys() {
            *s.resources.entry(k.plural().to_string()).or_default() += 1;
        }
        s
    }

    /// Keeps desired-state revisions safe to stream before the nodes' rows are
    /// committed: revisions are handed out from a block whose upper bound is
    /// stored first, and a restarted hub starts above it. So a revision an
    /// agent has seen is never handed out again for other content, even when
    /// the hub crashed before committing it. Call with the lock held before
    /// handing out up to `needed` revisions; it extends the reservation early
    /// (without waiting) and blocks only when the durable bound is too low.
    fn reserve_revisions(&self, st: &mut State, needed: u64) {
        let want = st.revision + needed;
        if want + REVISION_BLOCK / 2 >= st.revision_reserved {
            st.revision_reserved = want + REVISION_BLOCK;
            let (tx, rx) = std::sync::mpsc::channel();
            self.store_reservation(st.revision_reserved, move |_| {
                let _ = tx.send(());
            });
            if want > self.revision_durable.load(Ordering::SeqCst) {
                let _ = rx.recv_timeout(Duration::from_secs(10));
            }
        }
    }
}

impl Fleet {
    /// Marks the rollouts' inputs changed (see `rollout_dirty`).
    pub(crate) fn rollouts_changed(&self) {
        self.rollout_dirty.store(true, Ordering::Release);
    }

    /// Stores the reservation bound `value`; once committed, revisions up to
    /// it count as durable. `done` learns whether the commit succeeded.
    fn store_reservation(&self, value: u64, done: impl FnOnce(bool) + Send + 'static) {
        let durable = self.revision_durable.clone();
        self.store.submit(
            vec![Write::Counter {
                key: COUNTER_REVISION_RESERVED,
                value,
            }],
            Some(Box::new(move |r| {
                if r.is_ok() {
                    durable.fetch_max(value, Ordering::SeqCst);
                }
                done(r.is_ok());
            })),
        );
    }

    /// Makes sure `needed` more revisions can be handed out without waiting
    /// for the store: extends the durable reservation and waits for it here,
    /// in the async caller, without the fleet lock, so that the reservation
    /// under the lock ([`Fleet::reserve_revisions`]) never has to block.
    pub async fn ensure_reserved(&self, needed: u64) {
        // A store that stays down fails the caller's own writes; after a
        // while the reservation under the lock (bounded) takes over.
        for _ in 0..20 {
            let (tx, rx) = tokio::sync::oneshot::channel();
            {
                let mut st = self.lock();
                let want = st.revision + needed;
                if want + REVISION_BLOCK / 2 < self.revision_durable.load(Ordering::SeqCst) {
                    return;
                }
                if want + REVISION_BLOCK / 2 >= st.revision_reserved {
                    st.revision_reserved = want + REVISION_BLOCK;
                }
                self.store_reservation(st.revision_reserved, move |ok| {
                    let _ = tx.send(ok);
                });
            }
            // A failed store is retried (the caller's own write would fail too).
            match tokio::time::timeout(Duration::from_secs(10), rx).await {
                Ok(Ok(true)) => {}
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

/// Streams a desired state to the node's sessions (latest value wins; an
/// older revision never replaces a newer one).
fn push(tx: &watch::Sender<Desired>, d: Desired) {
    tx.send_if_modified(|cur| {
        if d.revision > cur.revision {
            *cur = d;
            true
        } else {
            false
        }
    });
}

#[cfg(test)]
mod tests;
