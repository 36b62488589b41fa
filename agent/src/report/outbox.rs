//! The durable outbox: every report gets the next per-node sequence number
//! and is stored before it is sent; it is deleted only when the hub
//! acknowledges it, and replayed after a reconnect.
//!
//! Memory and disk are bounded by `cap`. When the outbox is full (the hub has
//! been unreachable for long), the oldest report is dropped; the count of
//! dropped reports travels with the next report (`droppedBefore`) so the hub
//! shows it in the node's status, and `nodekeeper_agent_outbox_dropped_total`
//! counts it on the node.

use std::collections::VecDeque;
use std::sync::Arc;

use nodekeeper_proto::time::now_rfc3339;
use nodekeeper_proto::v1::{Report, report};

use crate::store::{AgentStore, StoreError, keys};

/// The outbox (not thread-safe by itself; the agent keeps it in a mutex).
pub struct Outbox {
    pending: VecDeque<Report>,
    last_seq: u64,
    acked: u64,
    cap: usize,
    dropped_total: u64,
    /// Dropped and not yet announced to the hub.
    dropped_pending: u64,
    store: Option<Arc<AgentStore>>,
}

impl Outbox {
    /// An outbox in memory only (hollow agents).
    pub fn in_memory(cap: usize) -> Outbox {
        Outbox {
            pending: VecDeque::new(),
            last_seq: 0,
            acked: 0,
            cap: cap.max(1),
            dropped_total: 0,
            dropped_pending: 0,
            store: None,
        }
    }

    /// An outbox backed by the agent store, with what it held at the last stop.
    pub fn open(store: Arc<AgentStore>, cap: usize) -> Result<Outbox, StoreError> {
        let mut pending: VecDeque<Report> = store.outbox_load()?.into();
        let last_seq = store
            .get_u64(keys::LAST_SEQUENCE)?
            .max(pending.back().map_or(0, |r| r.sequence));
        let mut dropped_pending = store.get_u64(keys::DROPPED_PENDING)?;
        // A smaller cap than last time: drop the oldest now, and say so.
        while pending.len() > cap.max(1) {
            if let Some(r) = pending.pop_front() {
                dropped_pending += 1 + r.dropped_before;
            }
        }
        let acked = pending.front().map_or(last_seq, |r| r.sequence.saturating_sub(1));
        Ok(Outbox {
            pending,
            last_seq,
            acked,
            cap: cap.max(1),
            dropped_total: 0,
            dropped_pending,
            store: Some(store),
        })
    }

    /// Appends a report and returns its sequence number. With a store, the
    /// report is on disk when this returns.
    pub fn push(&mut self, body: report::Body) -> Result<u64, StoreError> {
        let seqs = self.push_with(vec![body], &[])?;
        Ok(seqs.last().copied().unwrap_or(self.last_seq))
    }

    /// Appends several reports and writes `kv` (other agent records, such as
    /// a log source's position) in the same transaction, so they are on
    /// disk together or not at all. Returns the reports' sequence numbers.
    pub fn push_with(&mut self, bodies: Vec<report::Body>, kv: &[(&str, Vec<u8>)]) -> Result<Vec<u64>, StoreError> {
        let mut evict_upto = 0;
        let mut dropped_pending = self.dropped_pending;
        let mut evicted = 0usize;
        let mut dropped_new = 0u64;
        let mut reports = Vec::with_capacity(bodies.len());
        for (i, body) in bodies.into_iter().enumerate() {
            // Room for this report: the oldest pending ones go first, then
            // (more new reports than the cap) the oldest new ones.
            while self.pending.len() - evicted + reports.len() >= self.cap {
                if let Some(r) = self.pending.get(evicted) {
                    evict_upto = r.sequence;
                    dropped_pending += 1 + r.dropped_before;
                    evicted += 1;
                } else if !reports.is_empty() {
                    let r: Report = reports.remove(0);
                    dropped_pending += 1 + r.dropped_before;
                    dropped_new += 1;
                } else {
                    break;
                }
            }
            reports.push(Report {
                sequence: self.last_seq + 1 + i as u64,
                time: now_rfc3339(),
                body: Some(body),
                dropped_before: std::mem::take(&mut dropped_pending),
            });
        }
        if let Some(s) = &self.store {
            s.outbox_push(&reports, evict_upto, kv)?;
        }
        // Only now, with the write done, change memory.
        for _ in 0..evicted {
            self.pending.pop_front();
        }
        self.dropped_total += evicted as u64 + dropped_new;
        if evicted > 0 {
            tracing::warn!(
                dropped = evicted,
                cap = self.cap,
                "outbox full: dropped the oldest reports"
            );
        }
        self.dropped_pending = dropped_pending;
        let seqs: Vec<u64> = reports.iter().map(|r| r.sequence).collect();
        if let Some(last) = seqs.last() {
            self.last_seq = self.last_seq.max(*last);
        }
        self.pending.extend(reports);
        Ok(seqs)
    }

    /// The hub persisted everything up to `upto`.
    pub fn ack(&mut self, upto: u64) -> Result<(), StoreError> {
        if upto <= self.acked {
            return Ok(());
        }
        if let Some(s) = &self.store {
            s.outbox_ack(upto)?;
        }
        while self.pending.front().is_some_and(|r| r.sequence <= upto) {
            self.pending.pop_front();
        }
        self.acked = upto.min(self.last_seq);
        Ok(())
    }

    /// Up to `limit` reports after sequence `after`, in order.
    pub fn after(&self, after: u64, limit: usize) -> Vec<Report> {
        let start = self.pending.partition_point(|r| r.sequence <= after);
        self.pending.range(start..).take(limit).cloned().collect()
    }

    /// The highest sequence number assigned.
    pub fn last_sequence(&self) -> u64 {
        self.last_seq
    }

    /// Reports waiting for an acknowledgement.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Reports dropped since start because the outbox was full.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total
    }

    /// The capacity.
    /// Whether pushes and acks write to disk (fsync): callers on an async
    /// runtime then run them off its workers.
    pub fn is_durable(&self) -> bool {
        self.store.is_some()
    }

    pub fn cap(&self) -> usize {
        self.cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekeeper_proto::v1::Event;

    fn ev(reason: &str) -> report::Body {
        report::Body::Event(Event {
            reason: reason.into(),
            ..Default::default()
        })
    }

    fn temp_store() -> (tempdir::Dir, Arc<AgentStore>) {
        let d = tempdir::Dir::new();
        let s = Arc::new(AgentStore::open(&d.0.join("agent.db")).expect("open"));
        (d, s)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                let p =
                    std::env::temp_dir().join(format!("nk-outbox-{}-{}", std::process::id(), rand::random::<u64>()));
                std::fs::create_dir_all(&p).expect("mkdir");
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn sequence_ack_and_replay_survive_reopen() {
        let (_d, store) = temp_store();
        let mut o = Outbox::open(store.clone(), 100).expect("open");
        for i in 0..5 {
            assert_eq!(o.push(ev(&format!("R{i}"))).expect("push"), i + 1);
        }
        o.ack(2).expect("ack");
        assert_eq!(o.pending(), 3);
        assert_eq!(
            o.after(3, 10).iter().map(|r| r.sequence).collect::<Vec<_>>(),
            vec![4, 5]
        );
        drop(o);
        let mut o = Outbox::open(store, 100).expect("reopen");
        assert_eq!(o.last_sequence(), 5);
        assert_eq!(
            o.after(0, 10).iter().map(|r| r.sequence).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(o.push(ev("R5")).expect("push"), 6);
    }

    #[test]
    fn sequence_continues_after_everything_was_acked() {
        let (_d, store) = temp_store();
        let mut o = Outbox::open(store.clone(), 100).expect("open");
        o.push(ev("A")).expect("push");
        o.push(ev("B")).expect("push");
        o.ack(2).expect("ack");
        drop(o);
        let mut o = Outbox::open(store, 100).expect("reopen");
        assert_eq!(o.pending(), 0);
        assert_eq!(o.push(ev("C")).expect("push"), 3, "sequence numbers never repeat");
    }

    #[test]
    fn full_outbox_drops_oldest_and_announces_the_count() {
        let (_d, store) = temp_store();
        let mut o = Outbox::open(store.clone(), 3).expect("open");
        for i in 0..5 {
            o.push(ev(&format!("R{i}"))).expect("push");
        }
        let seqs: Vec<u64> = o.after(0, 10).iter().map(|r| r.sequence).collect();
        assert_eq!(seqs, vec![3, 4, 5]);
        assert_eq!(o.dropped_total(), 2);
        // Each eviction is carried by the next report: 4 carries one, 5 carries one.
        let carried: u64 = o.after(0, 10).iter().map(|r| r.dropped_before).sum();
        assert_eq!(carried, 2);
        drop(o);
        let o = Outbox::open(store, 3).expect("reopen");
        assert_eq!(o.pending(), 3);
    }

    #[test]
    fn in_memory_outbox_has_the_same_logic() {
        let mut o = Outbox::in_memory(2);
        o.push(ev("A")).expect("push");
        o.push(ev("B")).expect("push");
        o.push(ev("C")).expect("push");
        assert_eq!(o.dropped_total(), 1);
        o.ack(3).expect("ack");
        assert_eq!(o.pending(), 0);
        assert!(o.after(0, 10).is_empty());
    }
}
