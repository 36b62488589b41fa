//! The JSON documents of the operator API and the agent socket that are not
//! resources: lists with paging, the fleet summary, apply results, errors
//! and the agent's status. The hub, the agent and nkctl all use these types,
//! so a renamed field fails to compile rather than printing an empty column.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::v1::{AgentSettings, NodeFacts, ObjectMeta};

/// A list (`{"items": [...], "metadata": {"continue": "..."}}`). With
/// `?limit=N` the server returns at most N items and, when more remain, a
/// `continue` token to pass back (`?continue=TOKEN`), as the Kubernetes API
/// does; an empty token means the list is complete.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(bound(deserialize = "T: serde::de::DeserializeOwned"))]
pub struct List<T> {
    pub items: Vec<T>,
    #[serde(default)]
    pub metadata: ListMeta,
}

/// Paging state of a list.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListMeta {
    /// Where the next page starts; empty when this page is the last.
    #[serde(rename = "continue", default, skip_serializing_if = "String::is_empty")]
    pub continue_token: String,
}

/// Largest page a list request may ask for.
pub const MAX_PAGE: usize = 5000;

/// One page of a list: at most `limit` of `items` (already in name order and
/// past the previous page's token), and the next page's token: the name of
/// the last item returned, or empty when nothing is left.
pub fn page<T>(items: impl Iterator<Item = T>, limit: usize, name: impl Fn(&T) -> String) -> (Vec<T>, String) {
    let mut out = Vec::new();
    for item in items {
        if out.len() == limit {
            let next = out.last().map(&name).unwrap_or_default();
            return (out, next);
        }
        out.push(item);
    }
    (out, String::new())
}

/// Node counts of the fleet summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeCounts {
    pub total: u64,
    pub ready: u64,
    pub not_ready: u64,
    pub unknown: u64,
    /// appliedRevision == desiredRevision.
    pub in_sync: u64,
    pub connected: u64,
}

/// `GET /v1/fleet/summary`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub nodes: NodeCounts,
    /// Resources per kind (plural name).
    pub resources: BTreeMap<String, u64>,
    /// The newest desired-state revision the hub has computed.
    pub revision: u64,
}

/// What an apply did with one document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyAction {
    Created,
    Configured,
    Unchanged,
}

impl ApplyAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyAction::Created => "created",
            ApplyAction::Configured => "configured",
            ApplyAction::Unchanged => "unchanged",
        }
    }
}

/// The outcome for one applied document (`POST /v1/apply` answers a
/// `List<ApplyResult>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyResult {
    pub action: ApplyAction,
    /// The resource as stored, with its status.
    pub resource: serde_json::Value,
}

/// Kind and metadata of any resource document.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
}

/// An error answer of the API or the socket.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// The agent's link to its hub, in [`AgentStatus`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubLink {
    pub address: String,
    pub connected: bool,
    pub last_connected: Option<String>,
    pub last_error: Option<String>,
    pub sessions: u64,
}

/// The agent's outbox, in [`AgentStatus`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxStatus {
    pub pending: u64,
    pub last_sequence: u64,
    pub dropped: u64,
    pub capacity: u64,
}

/// `GET /v1/status` on the agent socket.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub node_name: String,
    pub version: String,
    /// `hub` or `standalone`.
    pub mode: String,
    pub started: String,
    pub labels: BTreeMap<String, String>,
    pub facts: NodeFacts,
    pub applied_revision: u64,
    pub applied_at: Option<String>,
    pub settings: AgentSettings,
    pub hub: Option<HubLink>,
    pub outbox: OutboxStatus,
}

/// `POST /v1/events` on the agent socket answers this.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EventRecorded {
    /// The report's sequence number (none in standalone mode).
    pub sequence: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_ends_with_the_token_of_its_last_item_only_when_more_remain() {
        let name = |s: &&str| s.to_string();
        assert_eq!(
            page(["a", "b", "c"].into_iter(), 2, name),
            (vec!["a", "b"], "b".to_string())
        );
        assert_eq!(page(["a", "b"].into_iter(), 2, name), (vec!["a", "b"], String::new()));
        assert_eq!(page(["a"].into_iter(), usize::MAX, name), (vec!["a"], String::new()));
        assert_eq!(page(std::iter::empty::<&str>(), 3, name), (vec![], String::new()));
    }

    #[test]
    fn list_paging_token_is_named_continue_and_absent_when_done() {
        let l = List {
            items: vec![1, 2],
            metadata: ListMeta {
                continue_token: "b".into(),
            },
        };
        let v = serde_json::to_value(&l).expect("json");
        assert_eq!(v["metadata"]["continue"], "b");
        let done: List<u8> = serde_json::from_str(r#"{"items": [3]}"#).expect("parse");
        assert!(done.metadata.continue_token.is_empty());
        let v = serde_json::to_value(List::<u8> {
            items: vec![],
            metadata: ListMeta::default(),
        })
        .expect("json");
        assert!(v["metadata"].get("continue").is_none());
    }
}
