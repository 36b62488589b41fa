//! A store in memory, for unit tests of the fleet: the same writes with the
//! same meaning as SQLite, committed atomically per batch, readable back as
//! a [`Loaded`] (a "restart"), and able to fail on demand (a broken disk).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nodekeeper_proto::v1::Node;
use prost::Message;

use super::{Backend, Loaded, LoadedNode, NodeRevisions, Write};

/// What the memory store holds.
#[derive(Default, Clone)]
struct Data {
    resources: BTreeMap<(String, String), String>,
    revisions: BTreeMap<(String, String, i64), String>,
    nodes: BTreeMap<String, Vec<u8>>,
    node_revisions: BTreeMap<String, NodeRevisions>,
    counters: HashMap<String, u64>,
    records: BTreeMap<(String, String), String>,
    audit: BTreeMap<u64, String>,
}

/// The memory backend; clones share the same data.
#[derive(Clone, Default)]
pub struct Memory {
    data: Arc<Mutex<Data>>,
    fail: Arc<AtomicBool>,
}

impl Memory {
    pub fn new() -> Memory {
        Memory::default()
    }

    /// While true, every commit fails and changes nothing.
    pub fn set_failing(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }

    /// Everything committed so far, as start-up would read it back.
    pub fn load(&self) -> Loaded {
        let d = self.data.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut out = Loaded {
            resources: d.resources.iter().map(|((k, _), b)| (k.clone(), b.clone())).collect(),
            counters: d.counters.clone(),
            revisions: d
                .revisions
                .iter()
                .map(|((k, n, g), b)| (k.clone(), n.clone(), *g, b.clone()))
                .collect(),
            nodes: Vec::new(),
            records: d
                .records
                .iter()
                .map(|((k, key), b)| (k.clone(), key.clone(), b.clone()))
                .collect(),
            audit: d.audit.iter().map(|(i, b)| (*i, b.clone())).collect(),
        };
        for (name, body) in &d.nodes {
            let Ok(mut node) = Node::decode(body.as_slice()) else {
                continue;
            };
            let revs = d.node_revisions.get(name).cloned().unwrap_or_default();
            let status = node.status.get_or_insert_with(Default::default);
            status.desired_revision = revs.desired;
            status.applied_revision = revs.applied;
            status.settings = None;
            out.nodes.push(LoadedNode {
                node,
                settings: revs.settings,
            });
        }
        out
    }
}

impl Backend for Memory {
    fn commit(&mut self, batch: &[&[Write]]) -> Result<u64, String> {
        if self.fail.load(Ordering::SeqCst) {
            return Err("memory store set to fail".into());
        }
        let mut d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for w in batch.iter().flat_map(|ws| ws.iter()) {
            n += 1;
            match w {
                Write::PutResource { kind, name, body } => {
                    d.resources.insert((kind.clone(), name.clone()), body.clone());
                }
                Write::DeleteResource { kind, name } => {
                    d.resources.remove(&(kind.clone(), name.clone()));
                    d.revisions.retain(|(k, nm, _), _| !(k == kind && nm == name));
                }
                Write::PutRevision {
                    kind,
                    name,
                    generation,
                    body,
                } => {
                    d.revisions
                        .insert((kind.clone(), name.clone(), *generation), body.clone());
                }
                Write::DeleteRevisionsUpTo { kind, name, generation } => {
                    d.revisions
                        .retain(|(k, nm, g), _| !(k == kind && nm == name && g <= generation));
                }
                Write::PutNode { name, body, revisions } => {
                    d.nodes.insert(name.clone(), body.clone());
                    d.node_revisions.insert(name.clone(), revisions.clone());
                }
                Write::NodeRevisions { name, revisions } => {
                    d.node_revisions.insert(name.clone(), revisions.clone());
                }
                Write::DeleteNode { name } => {
                    d.nodes.remove(name);
                    d.node_revisions.remove(name);
                }
                Write::Counter { key, value } => {
                    d.counters.insert((*key).to_string(), *value);
                }
                Write::PutRecord { kind, key, body } => {
                    d.records.insert(((*kind).to_string(), key.clone()), body.clone());
                }
                Write::DeleteRecord { kind, key } => {
                    d.records.remove(&((*kind).to_string(), key.clone()));
                }
                Write::AppendAudit { id, body } => {
                    d.audit.insert(*id, body.clone());
                }
                Write::PruneAudit { through } => {
                    d.audit.retain(|i, _| i > through);
                }
            }
        }
        Ok(n)
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}
