//! The embedded store: SQLite in WAL mode, `synchronous=FULL` (a commit,
//! and so an ack to an agent, survives power loss).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nodekeeper_proto::v1::{AgentSettings, Node};
use prost::Message;
use rusqlite::{Connection, params};

use super::{Backend, Loaded, LoadedNode, NodeRevisions, SharedSettings, StoreError, Write, hex};

/// The SQLite backend.
pub struct Sqlite {
    conn: Connection,
    path: PathBuf,
}

impl Sqlite {
    /// Opens (creating if needed) the store at `path` and reads it back.
    pub fn open(path: &Path) -> Result<(Sqlite, Loaded), StoreError> {
        let err = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = open_conn(path).map_err(err)?;
        let loaded = load(&conn, path)?;
        Ok((
            Sqlite {
                conn,
                path: path.to_path_buf(),
            },
            loaded,
        ))
    }
}

impl Backend for Sqlite {
    fn commit(&mut self, batch: &[&[Write]]) -> Result<u64, String> {
        commit_batch(&mut self.conn, batch).map_err(|e| format!("store {}: {e}", self.path.display()))
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

pub(super) fn open_conn(path: &Path) -> rusqlite::Result<Connection> {
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
         -- Small rows that change on every fan-out and acknowledgement: kept
         -- apart so those writes touch a few pages, not every node's page.
         CREATE TABLE IF NOT EXISTS node_revisions (
            name TEXT PRIMARY KEY, desired INTEGER NOT NULL, applied INTEGER NOT NULL,
            settings BLOB NOT NULL) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS settings_blobs (hash BLOB PRIMARY KEY, body BLOB NOT NULL) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS resource_revisions (
            kind TEXT NOT NULL, name TEXT NOT NULL, generation INTEGER NOT NULL, body TEXT NOT NULL,
            PRIMARY KEY (kind, name, generation)) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS records (
            kind TEXT NOT NULL, key TEXT NOT NULL, body TEXT NOT NULL,
            PRIMARY KEY (kind, key)) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY, body TEXT NOT NULL);",
    )?;
    // Stores written before settings were shared keep theirs inline in
    // node_revisions.settings; they are read as before and rewritten shared.
    if conn
        .prepare("SELECT settings_hash FROM node_revisions LIMIT 0")
        .is_err()
    {
        conn.execute_batch("ALTER TABLE node_revisions ADD COLUMN settings_hash BLOB")?;
    }
    // Settings no node refers to any more.
    conn.execute_batch(
        "DELETE FROM settings_blobs WHERE hash NOT IN
           (SELECT settings_hash FROM node_revisions WHERE settings_hash IS NOT NULL)",
    )?;
    Ok(conn)
}

pub(super) fn load(conn: &Connection, path: &Path) -> Result<Loaded, StoreError> {
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
    let mut shared: HashMap<Vec<u8>, Arc<SharedSettings>> = HashMap::new();
    let mut stmt = conn.prepare("SELECT hash, body FROM settings_blobs").map_err(err)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?)))
        .map_err(err)?;
    for row in rows {
        let (hash, body) = row.map_err(err)?;
        let value = AgentSettings::decode(body.as_slice()).map_err(|e| StoreError::Corrupt {
            path: path.to_path_buf(),
            row: format!("settings_blobs/{}", hex(&hash)),
            reason: e.to_string(),
        })?;
        shared.insert(hash, SharedSettings::new(value));
    }
    let mut stmt = conn
        .prepare(
            "SELECT n.name, n.body, coalesce(r.desired, 0), coalesce(r.applied, 0), coalesce(r.settings, x''),
                    coalesce(r.settings_hash, x'')
             FROM nodes n LEFT JOIN node_revisions r ON r.name = n.name",
        )
        .map_err(err)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Vec<u8>>(4)?,
                r.get::<_, Vec<u8>>(5)?,
            ))
        })
        .map_err(err)?;
    for row in rows {
        let (name, body, desired, applied, inline, hash) = row.map_err(err)?;
        let corrupt = |reason: String| StoreError::Corrupt {
            path: path.to_path_buf(),
            row: format!("nodes/{name}"),
            reason,
        };
        let mut node = Node::decode(body.as_slice()).map_err(|e| corrupt(e.to_string()))?;
        // The columns are newer than the body when only revisions changed.
        let status = node.status.get_or_insert_with(Default::default);
        status.desired_revision = desired.max(0) as u64;
        status.applied_revision = applied.max(0) as u64;
        let settings = if !hash.is_empty() {
            Some(
                shared
                    .get(&hash)
                    .cloned()
                    .ok_or_else(|| corrupt(format!("settings {} are missing", hex(&hash))))?,
            )
        } else if !inline.is_empty() {
            let value = AgentSettings::decode(inline.as_slice()).map_err(|e| corrupt(e.to_string()))?;
            Some(SharedSettings::new(value))
        } else {
            status.settings.take().map(SharedSettings::new)
        };
        // Settings live beside the node, never inside its body.
        status.settings = None;
        out.nodes.push(LoadedNode { node, settings });
    }
    let mut stmt = conn
        .prepare("SELECT kind, name, generation, body FROM resource_revisions ORDER BY kind, name, generation")
        .map_err(err)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .map_err(err)?;
    for row in rows {
        out.revisions.push(row.map_err(err)?);
    }
    let mut stmt = conn
        .prepare("SELECT kind, key, body FROM records ORDER BY kind, key")
        .map_err(err)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .map_err(err)?;
    for row in rows {
        out.records.push(row.map_err(err)?);
    }
    let mut stmt = conn.prepare("SELECT id, body FROM audit ORDER BY id").map_err(err)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
        .map_err(err)?;
    for row in rows {
        let (id, body) = row.map_err(err)?;
        out.audit.push((id.max(0) as u64, body));
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

fn commit_batch(conn: &mut Connection, batch: &[&[Write]]) -> rusqlite::Result<u64> {
    // Coalesce per node: only the last snapshot is written, and a revisions
    // write only when no later write of the node carries newer values.
    let mut last_put: HashMap<&str, usize> = HashMap::new();
    let mut last_any: HashMap<&str, usize> = HashMap::new();
    let mut pos = 0usize;
    for writes in batch.iter() {
        for w in writes.iter() {
            match w {
                Write::PutNode { name, .. } => {
                    last_put.insert(name.as_str(), pos);
                    last_any.insert(name.as_str(), pos);
                }
                Write::NodeRevisions { name, .. } => {
                    last_any.insert(name.as_str(), pos);
                }
                Write::DeleteNode { name } => {
                    // Nothing queued before a delete may bring the node back.
                    last_put.insert(name.as_str(), pos);
                    last_any.insert(name.as_str(), pos);
                }
                _ => {}
            }
            pos += 1;
        }
    }
    let tx = conn.transaction()?;
    let mut written = 0u64;
    {
        let mut put_res =
            tx.prepare_cached("INSERT OR REPLACE INTO resources (kind, name, body) VALUES (?1, ?2, ?3)")?;
        let mut del_res = tx.prepare_cached("DELETE FROM resources WHERE kind = ?1 AND name = ?2")?;
        let mut put_node = tx.prepare_cached("INSERT OR REPLACE INTO nodes (name, body) VALUES (?1, ?2)")?;
        let mut put_revisions = tx.prepare_cached(
            "INSERT OR REPLACE INTO node_revisions (name, desired, applied, settings, settings_hash)
             VALUES (?1, ?2, ?3, x'', ?4)",
        )?;
        let mut put_blob = tx.prepare_cached("INSERT OR IGNORE INTO settings_blobs (hash, body) VALUES (?1, ?2)")?;
        let mut blobs_seen: std::collections::HashSet<[u8; 32]> = std::collections::HashSet::new();
        let mut put_revs = |name: &str, r: &NodeRevisions| -> rusqlite::Result<()> {
            let hash = match &r.settings {
                Some(s) => {
                    if blobs_seen.insert(s.hash) {
                        put_blob.execute(params![&s.hash[..], &s.encoded])?;
                    }
                    Some(&s.hash[..])
                }
                None => None,
            };
            put_revisions.execute(params![name, r.desired as i64, r.applied as i64, hash])?;
            Ok(())
        };
        let mut pos = 0usize;
        let mut put_counter = tx.prepare_cached("INSERT OR REPLACE INTO counters (key, value) VALUES (?1, ?2)")?;
        for writes in batch.iter() {
            for w in writes.iter() {
                pos += 1;
                let here = pos - 1;
                match w {
                    Write::PutResource { kind, name, body } => {
                        put_res.execute(params![kind, name, body])?;
                    }
                    Write::DeleteResource { kind, name } => {
                        del_res.execute(params![kind, name])?;
                        tx.prepare_cached("DELETE FROM resource_revisions WHERE kind = ?1 AND name = ?2")?
                            .execute(params![kind, name])?;
                    }
                    Write::PutRevision {
                        kind,
                        name,
                        generation,
                        body,
                    } => {
                        tx.prepare_cached(
                            "INSERT OR REPLACE INTO resource_revisions (kind, name, generation, body) VALUES (?1, ?2, ?3, ?4)",
                        )?
                        .execute(params![kind, name, generation, body])?;
                    }
                    Write::PutNode {
                        name,
                        body,
                        revisions: r,
                    } => {
                        if last_put.get(name.as_str()) != Some(&here) {
                            continue;
                        }
                        put_node.execute(params![name, body])?;
                        put_revs(name, r)?;
                    }
                    Write::NodeRevisions { name, revisions: r } => {
                        if last_any.get(name.as_str()) != Some(&here) {
                            continue;
                        }
                        put_revs(name, r)?;
                    }
                    Write::DeleteNode { name } => {
                        tx.prepare_cached("DELETE FROM nodes WHERE name = ?1")?
                            .execute(params![name])?;
                        tx.prepare_cached("DELETE FROM node_revisions WHERE name = ?1")?
                            .execute(params![name])?;
                    }
                    Write::DeleteRevisionsUpTo { kind, name, generation } => {
                        tx.prepare_cached(
                            "DELETE FROM resource_revisions WHERE kind = ?1 AND name = ?2 AND generation <= ?3",
                        )?
                        .execute(params![kind, name, generation])?;
                    }
                    Write::Counter { key, value } => {
                        put_counter.execute(params![key, *value as i64])?;
                    }
                    Write::PutRecord { kind, key, body } => {
                        tx.prepare_cached("INSERT OR REPLACE INTO records (kind, key, body) VALUES (?1, ?2, ?3)")?
                            .execute(params![kind, key, body])?;
                    }
                    Write::DeleteRecord { kind, key } => {
                        tx.prepare_cached("DELETE FROM records WHERE kind = ?1 AND key = ?2")?
                            .execute(params![kind, key])?;
                    }
                    Write::AppendAudit { id, body } => {
                        tx.prepare_cached("INSERT OR REPLACE INTO audit (id, body) VALUES (?1, ?2)")?
                            .execute(params![*id as i64, body])?;
                    }
                    Write::PruneAudit { through } => {
                        tx.prepare_cached("DELETE FROM audit WHERE id <= ?1")?
                            .execute(params![*through as i64])?;
                    }
                }
                written += 1;
            }
        }
    }
    tx.commit()?;
    Ok(written)
}
