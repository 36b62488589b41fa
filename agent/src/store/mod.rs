//! The agent's durable state in SQLite (`<stateDir>/agent.db`): the report
//! outbox and small key/value records (the cached desired state, the applied
//! revision, the last report sequence number).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use nodekeeper_proto::v1::Report;
use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};

/// Errors of the agent store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("agent store {path}: {source}; check that stateDir is writable and not on a full disk")]
    Sqlite { path: PathBuf, source: rusqlite::Error },
    #[error("agent store {path}: record {key}: {reason}")]
    Corrupt { path: PathBuf, key: String, reason: String },
}

/// Keys of the key/value table.
pub mod keys {
    pub const DESIRED: &str = "desired_state";
    pub const APPLIED_REVISION: &str = "applied_revision";
    pub const LAST_SEQUENCE: &str = "last_report_sequence";
    pub const DROPPED_PENDING: &str = "dropped_pending";
    /// Detector conditions (JSON).
    pub const CONDITIONS: &str = "conditions";
    /// Prefix of each component's record (`component:<name>`, JSON).
    pub const COMPONENT_PREFIX: &str = "component:";
}

/// The agent store; every call is one short transaction.
pub struct AgentStore {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl AgentStore {
    /// Opens or creates the store.
    pub fn open(path: &Path) -> Result<AgentStore, StoreError> {
        let err = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, body BLOB NOT NULL);",
        )
        .map_err(err)?;
        Ok(AgentStore {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Reads a value.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.conn()
            .query_row("SELECT value FROM kv WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Reads a number (0 when absent).
    pub fn get_u64(&self, key: &str) -> Result<u64, StoreError> {
        match self.get(key)? {
            None => Ok(0),
            Some(b) => {
                let arr: [u8; 8] = b.as_slice().try_into().map_err(|_| StoreError::Corrupt {
                    path: self.path.clone(),
                    key: key.into(),
                    reason: format!("expected 8 bytes, found {}", b.len()),
                })?;
                Ok(u64::from_be_bytes(arr))
            }
        }
    }

    /// Writes several values in one transaction.
    pub fn put_all(&self, values: &[(&str, Vec<u8>)]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        for (k, v) in values {
            tx.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?1, ?2)", params![k, v])
                .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Every key with `prefix` and its value, in key order.
    pub fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT key, value FROM kv WHERE substr(key, 1, length(?1)) = ?1 ORDER BY key")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([prefix], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Deletes a key.
    pub fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM kv WHERE key = ?1", [key])
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Every pending report, in sequence order.
    pub fn outbox_load(&self) -> Result<Vec<Report>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT seq, body FROM outbox ORDER BY seq")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, body) = row.map_err(|e| self.err(e))?;
            match Report::decode(body.as_slice()) {
                Ok(r) => out.push(r),
                // One unreadable row must not stop the agent: skip it, say so.
                Err(e) => {
                    tracing::error!(store = %self.path.display(), seq, error = %e, "skipping unreadable outbox record")
                }
            }
        }
        Ok(out)
    }

    /// Stores new reports, drops evicted ones (`seq <= evict_upto`), records
    /// the sequence counters and writes `kv`, all in one transaction.
    pub fn outbox_push(&self, reports: &[Report], evict_upto: u64, kv: &[(&str, Vec<u8>)]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        for report in reports {
            tx.execute(
                "INSERT OR REPLACE INTO outbox (seq, body) VALUES (?1, ?2)",
                params![report.sequence as i64, report.encode_to_vec()],
            )
            .map_err(|e| self.err(e))?;
        }
        if evict_upto > 0 {
            tx.execute("DELETE FROM outbox WHERE seq <= ?1", [evict_upto as i64])
                .map_err(|e| self.err(e))?;
        }
        if let Some(last) = reports.last() {
            tx.execute(
                "INSERT OR REPLACE INTO kv (key, value) VALUES (?1, ?2), (?3, ?4)",
                params![
                    keys::LAST_SEQUENCE,
                    last.sequence.to_be_bytes().to_vec(),
                    keys::DROPPED_PENDING,
                    0u64.to_be_bytes().to_vec()
                ],
            )
            .map_err(|e| self.err(e))?;
        }
        for (k, v) in kv {
            tx.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?1, ?2)", params![k, v])
                .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Deletes acknowledged reports.
    pub fn outbox_ack(&self, upto: u64) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM outbox WHERE seq <= ?1", [upto as i64])
            .map(|_| ())
            .map_err(|e| self.err(e))
    }
}
