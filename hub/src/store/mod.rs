//! The hub's embedded store: SQLite in WAL mode behind one writer thread.
//!
//! Every write goes through [`Store::submit`]; the writer takes everything
//! queued, coalesces node writes (only the newest snapshot of a node is
//! written), commits the batch in one transaction and then runs each batch
//! member's completion callback (acks to agents are sent from there, so an
//! acknowledged report is always on disk). Reads never touch SQLite after
//! start-up: the fleet keeps an in-memory index rebuilt from [`Store::load`].
//! This is the one narrow interface a shared store (PostgreSQL) will implement.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use nodekeeper_proto::v1::Node;
use prost::Message;
use rusqlite::{Connection, params};

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
    DeleteResource {
        kind: String,
        name: String,
    },
    /// Insert or replace a node; coalesced per name within a batch.
    PutNode(Box<Node>),
    /// Set a counter (resource version, revision).
    Counter {
        key: &'static str,
        value: u64,
    },
}

/// Called once the writes it came with are committed (`Ok`) or failed.
pub type Done = Box<dyn FnOnce(Result<(), String>) + Send>;

struct Op {
    writes: Vec<Write>,
    done: Option<Done>,
}

/// What start-up reads back.
#[derive(Default)]
pub struct Loaded {
    /// (kind, JSON body)
    pub resources: Vec<(String, String)>,
    pub nodes: Vec<Node>,
    pub counters: HashMap<String, u64>,
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Op>,
}

/// Largest number of queued operations committed in one transaction.
const MAX_BATCH: usize = 8192;

fn open_conn(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: a commit (and so an ack to an agent) survives power loss, not only a crash.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "busy_timeout", 5000)?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS resources (
            kind TEXT NOT NULL, name TEXT NOT NULL, body TEXT NOT NULL,
            PRIMARY KEY (kind, name)) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS nodes (name TEXT PRIMARY KEY, body BLOB NOT NULL) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;",
    )?;
    Ok(conn)
}

impl Store {
    /// Opens (creating if needed) the SQLite store at `path`, reads everything
    /// back and starts the writer thread.
    pub fn open(path: &Path, metrics: Metrics) -> Result<(Store, Loaded), StoreError> {
        let err = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = open_conn(path).map_err(err)?;
        let loaded = load(&conn, path)?;
        let (tx, rx) = mpsc::channel::<Op>();
        let p = path.to_path_buf();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer(conn, rx, p, metrics))
            .map_err(|e| StoreError::Corrupt {
                path: path.to_path_buf(),
                row: "-".into(),
                reason: format!("cannot start writer thread: {e}"),
            })?;
        Ok((Store { tx }, loaded))
    }

    /// Queues writes; `done` runs after they are committed.
    pub fn submit(&self, writes: Vec<Write>, done: Option<Done>) {
        if let Err(mpsc::SendError(Op { done: Some(d), .. })) = self.tx.send(Op { writes, done }) {
            d(Err(StoreError::Stopped.to_string()));
        }
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

fn load(conn: &Connection, path: &Path) -> Result<Loaded, StoreError> {
    let err = |source| StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let mut out = Loaded::default();
    let mut stmt = conn
        .prepare("SELECT kind, body FROM resources ORDER BY kind, name")
        .map_err(err)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .map_err(err)?;
    for row in rows {
        out.resources.push(row.map_err(err)?);
    }
    let mut stmt = conn.prepare("SELECT name, body FROM nodes").map_err(err)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))
        .map_err(err)?;
    for row in rows {
        let (name, body) = row.map_err(err)?;
        let node = Node::decode(body.as_slice()).map_err(|e| StoreError::Corrupt {
            path: path.to_path_buf(),
            row: format!("nodes/{name}"),
            reason: e.to_string(),
        })?;
        out.nodes.push(node);
    }
    let mut stmt = conn.prepare("SELECT key, value FROM counters").map_err(err)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .map_err(err)?;
    for row in rows {
        let (k, v) = row.map_err(err)?;
        out.counters.insert(k, v.max(0) as u64);
    }
    Ok(out)
}

fn writer(mut conn: Connection, rx: mpsc::Receiver<Op>, path: PathBuf, metrics: Metrics) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let result = commit_batch(&mut conn, &mut batch, &metrics).map_err(|e| {
            tracing::error!(store = %path.display(), error = %e, "store commit failed; writes in this batch are not acknowledged");
            e.to_string()
        });
        metrics.store_commit_seconds.observe(started.elapsed().as_secs_f64());
        metrics.store_batches.inc();
        for op in batch {
            if let Some(done) = op.done {
                done(result.clone());
            }
        }
    }
}

fn commit_batch(conn: &mut Connection, batch: &mut [Op], metrics: &Metrics) -> rusqlite::Result<()> {
    // Coalesce node snapshots: only the last one per node in this batch is written.
    let mut last_node: HashMap<&str, (usize, usize)> = HashMap::new();
    for (i, op) in batch.iter().enumerate() {
        for (j, w) in op.writes.iter().enumerate() {
            if let Write::PutNode(n) = w {
                let name = n.metadata.as_ref().map(|m| m.name.as_str()).unwrap_or_default();
                last_node.insert(name, (i, j));
            }
        }
    }
    let tx = conn.transaction()?;
    let mut written = 0u64;
    {
        let mut put_res =
            tx.prepare_cached("INSERT OR REPLACE INTO resources (kind, name, body) VALUES (?1, ?2, ?3)")?;
        let mut del_res = tx.prepare_cached("DELETE FROM resources WHERE kind = ?1 AND name = ?2")?;
        let mut put_node = tx.prepare_cached("INSERT OR REPLACE INTO nodes (name, body) VALUES (?1, ?2)")?;
        let mut put_counter = tx.prepare_cached("INSERT OR REPLACE INTO counters (key, value) VALUES (?1, ?2)")?;
        let mut buf = Vec::with_capacity(4096);
        for (i, op) in batch.iter().enumerate() {
            for (j, w) in op.writes.iter().enumerate() {
                match w {
                    Write::PutResource { kind, name, body } => {
                        put_res.execute(params![kind, name, body])?;
                    }
                    Write::DeleteResource { kind, name } => {
                        del_res.execute(params![kind, name])?;
                    }
                    Write::PutNode(n) => {
                        let name = n.metadata.as_ref().map(|m| m.name.as_str()).unwrap_or_default();
                        if last_node.get(name) != Some(&(i, j)) {
                            continue;
                        }
                        buf.clear();
                        n.encode(&mut buf)
                            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
                        put_node.execute(params![name, &buf])?;
                    }
                    Write::Counter { key, value } => {
                        put_counter.execute(params![key, *value as i64])?;
                    }
                }
                written += 1;
            }
        }
    }
    tx.commit()?;
    metrics.store_writes.inc_by(written);
    Ok(())
}
