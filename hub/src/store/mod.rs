//! The hub's embedded store: SQLite in WAL mode behind one writer thread.
//!
//! Every write goes through [`Store::submit`]; the writer takes everything
//! queued, coalesces node writes (only the newest snapshot of a node is
//! written), commits the batch in one transaction and then runs each batch
//! member's completion callback (acks to agents are sent from there, so an
//! acknowledged report is always on disk). Reads never touch SQLite after
//! start-up: the fleet keeps an in-memory index rebuilt from [`Store::load`].
//! This is the one narrow interface a shared store (PostgreSQL) will implement.

pub mod memory;
pub mod sqlite;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use nodekeeper_proto::v1::{AgentSettings, Node};
use prost::Message;

use crate::metrics::Metrics;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Sqlite { path: PathBuf, source: rusqlite::Error },
    #[error("store {path}: row {row}: {reason}")]
    Corrupt { path: PathBuf, row: String, reason: String },
    #[error("store writer has stopped")]
    Stopped,
}

/// One write.
pub enum Write {
    /// Insert or replace a resource (JSON body).
    PutResource {
        kind: String,
        name: String,
        body: String,
    },
    /// Deletes a resource and every revision kept of it.
    DeleteResource {
        kind: String,
        name: String,
    },
    /// Keeps one revision (generation) of a resource's spec, for history and
    /// rollback.
    PutRevision {
        kind: String,
        name: String,
        generation: i64,
        body: String,
    },
    /// Insert or replace a node (protobuf-encoded `Node`); coalesced per name
    /// within a batch. Encoded by the caller: one buffer instead of a deep clone.
    PutNode {
        name: String,
        body: Vec<u8>,
        revisions: NodeRevisions,
    },
    /// Only a node's revisions: the small write of a fan-out or an agent's
    /// acknowledgement. Coalesced with the node's other writes in a batch.
    NodeRevisions {
        name: String,
        revisions: NodeRevisions,
    },
    /// Deletes a node and its revisions row.
    DeleteNode {
        name: String,
    },
    /// Deletes a resource's kept revisions up to and including `generation`
    /// (the history limit).
    DeleteRevisionsUpTo {
        kind: String,
        name: String,
        generation: i64,
    },
    /// Set a counter (resource version, revision).
    Counter {
        key: &'static str,
        value: u64,
    },
    /// Insert or replace a small record (JSON): tokens, node identities.
    PutRecord {
        kind: &'static str,
        key: String,
        body: String,
    },
    DeleteRecord {
        kind: &'static str,
        key: String,
    },
    /// Appends an audit entry (JSON) under its sequence number.
    AppendAudit {
        id: u64,
        body: String,
    },
    /// Deletes audit entries up to and including `through` (retention).
    PruneAudit {
        through: u64,
    },
}

/// A node's desired/applied revisions and desired settings, kept in their
/// own small rows so they can change without rewriting the node.
#[derive(Debug, Clone, Default)]
pub struct NodeRevisions {
    pub desired: u64,
    pub applied: u64,
    pub settings: Option<Arc<SharedSettings>>,
}

/// Desired settings shared by every node that resolves to the same ones (in
/// a fleet, nodes come in a few label sets): computed, encoded and hashed
/// once, held once in memory, and stored once (`settings_blobs`, keyed by
/// hash) however many nodes refer to them. A Component's templates and unit
/// file make settings kilobytes large; per node they would dominate the
/// hub's memory, store size and write volume.
#[derive(Debug, PartialEq)]
pub struct SharedSettings {
    pub value: AgentSettings,
    /// SHA-256 of `encoded`.
    pub hash: [u8; 32],
    pub encoded: Vec<u8>,
}

impl SharedSettings {
    pub fn new(value: AgentSettings) -> Arc<SharedSettings> {
        use sha2::Digest;
        let encoded = value.encode_to_vec();
        let hash = sha2::Sha256::digest(&encoded).into();
        Arc::new(SharedSettings { value, hash, encoded })
    }
}

/// A node as start-up reads it back, with its desired settings.
pub struct LoadedNode {
    pub node: Node,
    pub settings: Option<Arc<SharedSettings>>,
}

/// Called once the writes it came with are committed (`Ok`) or failed.
pub type Done = Box<dyn FnOnce(Result<(), String>) + Send>;

struct Op {
    writes: Vec<Write>,
    done: Option<Done>,
    /// Released when the operation is committed (or failed).
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// What start-up reads back.
#[derive(Default)]
pub struct Loaded {
    /// (kind, JSON body)
    pub resources: Vec<(String, String)>,
    pub nodes: Vec<LoadedNode>,
    pub counters: HashMap<String, u64>,
    /// (kind, name, generation, JSON body), oldest first per resource.
    pub revisions: Vec<(String, String, i64, String)>,
    /// (kind, key, JSON body) of small records.
    pub records: Vec<(String, String, String)>,
    /// (sequence, JSON body) of the audit log, oldest first.
    pub audit: Vec<(u64, String)>,
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Op>,
    /// One permit per queued operation. Ingest waits for one
    /// ([`Store::reserve`]), so when the disk stalls report ingest slows
    /// down (acks wait, agents' streams fill, HTTP/2 flow control pushes
    /// back) instead of the queue growing in memory.
    queue: Arc<tokio::sync::Semaphore>,
    metrics: Metrics,
}

/// Room for one queued operation, reserved with [`Store::reserve`].
pub struct Room(Option<tokio::sync::OwnedSemaphorePermit>);

/// Default bound on queued store operations (`store.maxQueuedWrites`).
pub const DEFAULT_MAX_QUEUED: usize = 16_384;

/// Debug builds only: test hooks named in `NODEKEEPER_FAILPOINT` (a comma
/// separated list). `store-stall=PATH` makes the writer wait before each
/// commit while PATH exists, as a stalled disk would.
#[cfg(debug_assertions)]
fn stall_file() -> Option<PathBuf> {
    std::env::var("NODEKEEPER_FAILPOINT")
        .ok()?
        .split(',')
        .find_map(|f| f.strip_prefix("store-stall=").map(PathBuf::from))
}

/// How long the writer waits after the first queued write before committing.
const LINGER: std::time::Duration = std::time::Duration::from_millis(5);

/// Largest number of queued operations committed in one transaction.
const MAX_BATCH: usize = 8192;

/// Where committed writes go. One writer thread calls it with a batch of
/// operations (each a list of writes, in order); it commits all of them
/// atomically or none. Two implementations: SQLite ([`sqlite::Sqlite`]) and
/// memory ([`memory::Memory`], for unit tests of the fleet); a shared
/// PostgreSQL store is the third this seam is for.
pub trait Backend: Send + 'static {
    /// Commits the batch; the number of rows written.
    fn commit(&mut self, batch: &[&[Write]]) -> Result<u64, String>;
    /// Names the store in logs.
    fn describe(&self) -> String;
}

impl Store {
    /// Opens (creating if needed) the SQLite store at `path`, reads everything
    /// back and starts the writer thread.
    pub fn open(path: &Path, metrics: Metrics) -> Result<(Store, Loaded), StoreError> {
        Store::open_bounded(path, metrics, DEFAULT_MAX_QUEUED)
    }

    /// [`Store::open`] with at most `max_queued` operations waiting for the
    /// writer before [`Store::reserve`] waits.
    pub fn open_bounded(path: &Path, metrics: Metrics, max_queued: usize) -> Result<(Store, Loaded), StoreError> {
        let (backend, loaded) = sqlite::Sqlite::open(path)?;
        let store =
            Store::with_backend(Box::new(backend), metrics, max_queued).map_err(|reason| StoreError::Corrupt {
                path: path.to_path_buf(),
                row: "-".into(),
                reason,
            })?;
        Ok((store, loaded))
    }

    /// A store over `backend`, with its writer thread.
    pub fn with_backend(backend: Box<dyn Backend>, metrics: Metrics, max_queued: usize) -> Result<Store, String> {
        let (tx, rx) = mpsc::channel::<Op>();
        let m = metrics.clone();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer(backend, rx, m))
            .map_err(|e| format!("cannot start the store writer thread: {e}"))?;
        let queue = Arc::new(tokio::sync::Semaphore::new(max_queued.max(1)));
        Ok(Store { tx, queue, metrics })
    }

    /// Queues writes; `done` runs after they are committed. Never waits:
    /// for writers whose number the fleet bounds (a node's own state
    /// changes, resources). Counted against the queue while room is left.
    pub fn submit(&self, writes: Vec<Write>, done: Option<Done>) {
        let permit = self.queue.clone().try_acquire_owned().ok();
        self.send(writes, done, permit);
    }

    /// Waits until the queue has room for one operation: for the writers
    /// the outside drives (report ingest). Submit with [`Store::submit_reserved`].
    pub async fn reserve(&self) -> Room {
        Room(self.queue.clone().acquire_owned().await.ok())
    }

    /// Queues writes in the room reserved for them.
    pub fn submit_reserved(&self, room: Room, writes: Vec<Write>, done: Option<Done>) {
        self.send(writes, done, room.0);
    }

    fn send(&self, writes: Vec<Write>, done: Option<Done>, permit: Option<tokio::sync::OwnedSemaphorePermit>) {
        self.metrics.store_queued.inc();
        let op = Op {
            writes,
            done,
            _permit: permit,
        };
        if let Err(mpsc::SendError(op)) = self.tx.send(op) {
            self.metrics.store_queued.dec();
            if let Some(d) = op.done {
                d(Err(StoreError::Stopped.to_string()));
            }
        }
    }

    /// Queues writes and blocks the calling thread until they are committed
    /// (start-up only).
    pub fn commit_blocking(&self, writes: Vec<Write>) -> Result<(), String> {
        let (tx, rx) = mpsc::channel();
        self.submit(
            writes,
            Some(Box::new(move |r| {
                let _ = tx.send(r);
            })),
        );
        rx.recv().map_err(|_| StoreError::Stopped.to_string())?
    }

    /// Queues writes and waits until they are committed.
    pub async fn commit(&self, writes: Vec<Write>) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(
            writes,
            Some(Box::new(move |r| {
                let _ = tx.send(r);
            })),
        );
        rx.await.map_err(|_| StoreError::Stopped.to_string())?
    }
}

fn revisions_of(node: &Node, settings: Option<&Arc<SharedSettings>>) -> NodeRevisions {
    let status = node.status.as_ref();
    NodeRevisions {
        desired: status.map_or(0, |s| s.desired_revision),
        applied: status.map_or(0, |s| s.applied_revision),
        settings: settings.cloned(),
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn node_name(node: &Node) -> String {
    node.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default()
}

/// The write that stores a whole node snapshot (its settings beside it).
pub fn node_write(node: &Node, settings: Option<&Arc<SharedSettings>>) -> Write {
    Write::PutNode {
        name: node_name(node),
        body: node.encode_to_vec(),
        revisions: revisions_of(node, settings),
    }
}

/// The write that stores only a node's revisions and desired settings.
pub fn revisions_write(node: &Node, settings: Option<&Arc<SharedSettings>>) -> Write {
    Write::NodeRevisions {
        name: node_name(node),
        revisions: revisions_of(node, settings),
    }
}

fn writer(mut backend: Box<dyn Backend>, rx: mpsc::Receiver<Op>, metrics: Metrics) {
    while let Ok(first) = rx.recv() {
        // Group commit: let writers that arrive within LINGER join this
        // transaction (one fsync, coalesced node rows) instead of waking the
        // writer one by one.
        std::thread::sleep(LINGER);
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        #[cfg(debug_assertions)]
        if let Some(f) = stall_file() {
            while f.exists() {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        let started = Instant::now();
        let writes: Vec<&[Write]> = batch.iter().map(|op| op.writes.as_slice()).collect();
        let result = backend
            .commit(&writes)
            .map(|n| {
                metrics.store_writes.inc_by(n);
            })
            .map_err(|e| {
            tracing::error!(store = %backend.describe(), error = %e, "store commit failed; writes in this batch are not acknowledged");
            e
        });
        drop(writes);
        metrics.store_commit_seconds.observe(started.elapsed().as_secs_f64());
        metrics.store_batches.inc();
        metrics.store_queued.dec_by(batch.len() as i64);
        for op in batch {
            if let Some(done) = op.done {
                done(result.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekeeper_proto::v1::{NodeStatus, ObjectMeta};

    fn node(name: &str, desired: u64, applied: u64) -> Node {
        Node {
            metadata: Some(ObjectMeta {
                name: name.into(),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                desired_revision: desired,
                applied_revision: applied,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn level(l: &str) -> Arc<SharedSettings> {
        SharedSettings::new(AgentSettings {
            log_level: l.into(),
            ..Default::default()
        })
    }

    fn reopen(path: &Path) -> Loaded {
        let conn = sqlite::open_conn(path).expect("open");
        sqlite::load(&conn, path).expect("load")
    }

    #[test]
    fn coalesced_batch_keeps_the_newest_values_of_each_node() {
        let dir = std::env::temp_dir().join(format!("nk-store-{}-{}", std::process::id(), line!()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("hub.db");
        let (store, _) = Store::open(&path, Metrics::new()).expect("open");
        // One batch: a snapshot, a newer revisions write, an older snapshot of
        // another node followed by its newer snapshot, then revisions that a
        // later snapshot supersedes.
        store
            .commit_blocking(vec![
                node_write(&node("a", 1, 0), Some(&level("info"))),
                revisions_write(&node("a", 2, 2), Some(&level("debug"))),
                node_write(&node("b", 1, 1), Some(&level("old"))),
                node_write(&node("b", 3, 1), Some(&level("new"))),
                revisions_write(&node("c", 9, 9), Some(&level("lost"))),
                node_write(&node("c", 4, 4), Some(&level("kept"))),
                node_write(&node("d", 1, 1), Some(&level("kept"))),
                Write::Counter { key: "k", value: 7 },
            ])
            .expect("commit");
        drop(store);
        let loaded = reopen(&path);
        let by_name = |n: &str| {
            let x = loaded
                .nodes
                .iter()
                .find(|x| x.node.metadata.as_ref().is_some_and(|m| m.name == n))
                .expect("node");
            let st = x.node.status.clone().expect("status");
            let level = x.settings.as_ref().map(|s| s.value.log_level.clone());
            (st.desired_revision, st.applied_revision, level, x.settings.clone())
        };
        let a = by_name("a");
        assert_eq!((a.0, a.1, a.2.as_deref()), (2, 2, Some("debug")));
        let b = by_name("b");
        assert_eq!((b.0, b.2.as_deref()), (3, Some("new")));
        let c = by_name("c");
        assert_eq!((c.0, c.2.as_deref()), (4, Some("kept")));
        // Nodes with equal settings share one stored copy, loaded once.
        let d = by_name("d");
        assert!(Arc::ptr_eq(c.3.as_ref().expect("c"), d.3.as_ref().expect("d")));
        let conn = sqlite::open_conn(&path).expect("open");
        let blobs: i64 = conn
            .query_row("SELECT count(*) FROM settings_blobs", [], |r| r.get(0))
            .expect("count");
        assert_eq!(blobs, 3, "debug, new and kept are referenced; the rest were collected");
        assert_eq!(loaded.counters.get("k"), Some(&7));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
