//! The audit log: every mutation and every refusal, who did it, what, when,
//! the result and the resource's new resourceVersion. Appended to the store
//! (one row per entry) and kept in memory for queries, pruned by age and
//! count (`audit.retention`, `audit.maxEntries`).

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// One entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    /// Increasing sequence number (the `continue` token of pages).
    pub id: u64,
    /// RFC 3339.
    pub time: String,
    /// An API token's name, `node:NAME`, `join-token:ID`, or
    /// `unauthenticated` (with `source`).
    pub actor: String,
    /// `apply`, `delete`, `join`, `session`, `token.create`, ...
    pub action: String,
    /// `components/web`, `nodes/node-a`, `tokens/abcdef`, a request path.
    pub resource: String,
    /// `ok`, or `refused: why` / `failed: why`.
    pub result: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource_version: String,
    /// The client's address, when known.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
}

/// What is about to be recorded (the log assigns id and time).
#[derive(Debug, Clone, Default)]
pub struct Record {
    pub actor: String,
    pub action: String,
    pub resource: String,
    pub result: String,
    pub resource_version: String,
    pub source: String,
}

impl Record {
    pub fn new(actor: impl Into<String>, action: impl Into<String>, resource: impl Into<String>) -> Record {
        Record {
            actor: actor.into(),
            action: action.into(),
            resource: resource.into(),
            result: "ok".into(),
            ..Default::default()
        }
    }

    pub fn refused(mut self, why: impl std::fmt::Display) -> Record {
        self.result = format!("refused: {why}");
        self
    }

    pub fn failed(mut self, why: impl std::fmt::Display) -> Record {
        self.result = format!("failed: {why}");
        self
    }

    pub fn version(mut self, rv: impl Into<String>) -> Record {
        self.resource_version = rv.into();
        self
    }

    pub fn source(mut self, s: impl Into<String>) -> Record {
        self.source = s.into();
        self
    }
}

/// A query: entries after `after`, in [since, until], of `actor`.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
    pub actor: Option<String>,
    pub action: Option<String>,
    pub after: u64,
    pub limit: usize,
}

/// The in-memory part of the log.
#[derive(Default)]
pub struct Log {
    entries: VecDeque<AuditEntry>,
    next: u64,
}

impl Log {
    /// From what the store loaded, oldest first.
    pub fn load(rows: Vec<(u64, String)>) -> Log {
        let mut log = Log::default();
        for (id, body) in rows {
            // A row that does not parse is skipped, not fatal: the log is
            // evidence, and the rest of it must stay readable.
            if let Ok(e) = serde_json::from_str::<AuditEntry>(&body) {
                log.entries.push_back(e);
            } else {
                tracing::warn!(id, "audit row does not parse; skipped");
            }
            log.next = log.next.max(id);
        }
        log
    }

    /// Appends; returns the entry and its JSON for the store.
    pub fn append(&mut self, r: Record, now: SystemTime) -> (AuditEntry, String) {
        self.next += 1;
        let e = AuditEntry {
            id: self.next,
            time: nodekeeper_proto::time::rfc3339(now),
            actor: r.actor,
            action: r.action,
            resource: r.resource,
            result: r.result,
            resource_version: r.resource_version,
            source: r.source,
        };
        let body = serde_json::to_string(&e).unwrap_or_default();
        self.entries.push_back(e.clone());
        (e, body)
    }

    /// Drops entries older than `retention` or beyond `max`; the highest id
    /// dropped, for the store.
    pub fn prune(&mut self, now: SystemTime, retention: Duration, max: usize) -> Option<u64> {
        let cutoff = now.checked_sub(retention);
        let mut through = None;
        while let Some(front) = self.entries.front() {
            let old = cutoff.is_some_and(|c| nodekeeper_proto::time::parse_rfc3339(&front.time).is_none_or(|t| t < c));
            if !old && self.entries.len() <= max {
                break;
            }
            through = Some(front.id);
            self.entries.pop_front();
        }
        through
    }

    /// Matching entries, oldest first, and whether more follow.
    pub fn query(&self, q: &Query) -> (Vec<AuditEntry>, bool) {
        let start = self.entries.partition_point(|e| e.id <= q.after);
        let mut out = Vec::new();
        for e in self.entries.iter().skip(start) {
            let t = nodekeeper_proto::time::parse_rfc3339(&e.time);
            if q.since.is_some_and(|s| t.is_none_or(|t| t < s))
                || q.until.is_some_and(|u| t.is_none_or(|t| t > u))
                || q.actor.as_ref().is_some_and(|a| &e.actor != a)
                || q.action.as_ref().is_some_and(|a| !e.action.starts_with(a.as_str()))
            {
                continue;
            }
            if out.len() == q.limit {
                return (out, true);
            }
            out.push(e.clone());
        }
        (out, false)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_filtered_paged_and_pruned_by_age_and_count() {
        let mut log = Log::default();
        let t0 = SystemTime::now() - Duration::from_secs(3600);
        for i in 0..10u64 {
            let actor = if i % 2 == 0 { "admin" } else { "node:a" };
            log.append(
                Record::new(actor, "apply", format!("components/c{i}")),
                t0 + Duration::from_secs(i * 60),
            );
        }
        let q = Query {
            actor: Some("admin".into()),
            limit: 2,
            ..Default::default()
        };
        let (page, more) = log.query(&q);
        assert_eq!(page.iter().map(|e| e.id).collect::<Vec<_>>(), vec![1, 3]);
        assert!(more);
        let (page, more) = log.query(&Query { after: 3, ..q.clone() });
        assert_eq!(page.iter().map(|e| e.id).collect::<Vec<_>>(), vec![5, 7]);
        assert!(more);
        let since = Query {
            since: Some(t0 + Duration::from_secs(8 * 60 - 1)),
            limit: 100,
            ..Default::default()
        };
        assert_eq!(log.query(&since).0.len(), 2);
        // Older than 55 minutes: the first five (at 0..4 minutes past t0).
        let through = log.prune(t0 + Duration::from_secs(3600), Duration::from_secs(55 * 60 + 1), 100);
        assert_eq!(through, Some(5));
        assert_eq!(log.prune(SystemTime::now(), Duration::from_secs(86_400), 3), Some(7));
        assert_eq!(log.len(), 3);
        // Reloaded, numbering continues.
        let rows = log
            .entries
            .iter()
            .map(|e| (e.id, serde_json::to_string(e).expect("json")))
            .collect();
        let mut again = Log::load(rows);
        assert_eq!(again.append(Record::new("x", "y", "z"), SystemTime::now()).0.id, 11);
    }
}
