//! Permits from the hub's defender: asked for before a disruptive action,
//! renewed at a third of their TTL while the work goes on, given back when
//! it ends. Without a hub session the agent follows `defender.offline` (or a
//! remedy rule's own offline policy); a
//! standalone agent (no hub at all) is its own authority.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nodekeeper_proto::v1::PermitRequest;
use nodekeeper_proto::v1::agent_link_client::AgentLinkClient;
use tonic::transport::Channel;

use crate::config::Offline;

/// How long one permit call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's permit client; the link hands it a channel while a session
/// is up. It also keeps the node to one disruptive action at a time on its
/// own (a component change and a remedy never overlap, also standalone or
/// with the hub unreachable).
pub struct Permits {
    node: String,
    standalone: bool,
    offline: Mutex<Offline>,
    ttl_seconds: Mutex<u32>,
    client: Mutex<Option<AgentLinkClient<Channel>>>,
    /// The action holding the node now, if any.
    busy: Mutex<Option<String>>,
}

/// Why a permit was not had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoPermit {
    /// The defender said no (the reason names the budget or the freeze);
    /// `terminal`: asking again will not help.
    Denied { reason: String, terminal: bool },
    /// The hub cannot be asked and the offline policy is deny (`by_rule`:
    /// a remedy rule's own `offline`, otherwise `defender.offline`).
    Offline { why: String, by_rule: bool },
    /// Another disruptive action holds the node.
    Busy(String),
}

impl NoPermit {
    /// Whether asking again cannot help.
    pub fn terminal(&self) -> bool {
        matches!(self, NoPermit::Denied { terminal: true, .. })
    }
}

impl std::fmt::Display for NoPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoPermit::Denied { reason, .. } => write!(f, "the hub's defender denied the permit: {reason}"),
            NoPermit::Offline { why, by_rule: false } => write!(
                f,
                "no permit: the hub cannot be asked ({why}) and defender.offline is deny"
            ),
            NoPermit::Offline { why, by_rule: true } => write!(
                f,
                "no permit: the hub cannot be asked ({why}) and the rule's offline policy for this action is deny"
            ),
            NoPermit::Busy(a) => write!(f, "the node is busy with {a}; one disruptive action at a time"),
        }
    }
}

/// A permit held; renewed until [`Permit::release`] (or drop).
pub struct Permit {
    /// The hub's id (empty for a local permit: standalone, or offline allow).
    pub id: String,
    pub action: String,
    renewer: Option<tokio::task::JoinHandle<()>>,
    owner: Arc<Permits>,
}

impl Permit {
    /// Gives the permit back (at once, so the budget frees up).
    pub async fn release(mut self) {
        if let Some(r) = self.renewer.take() {
            r.abort();
        }
        self.owner.unbusy(&self.action);
        if !self.id.is_empty() {
            let req = PermitRequest {
                op: "release".into(),
                permit_id: self.id.clone(),
                node_name: self.owner.node.clone(),
                ..Default::default()
            };
            if let Err(e) = self.owner.call(req).await {
                // It runs out at its TTL anyway.
                tracing::warn!(permit = %self.id, error = %e, "cannot release the permit; it expires at its TTL");
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(r) = self.renewer.take() {
            r.abort();
        }
        self.owner.unbusy(&self.action);
    }
}

/// What an acquire asks for.
#[derive(Debug, Clone, Default)]
pub struct Ask<'a> {
    /// `component/<name>`, `remedy/<rule>`.
    pub action: &'a str,
    pub reason: &'a str,
    /// The remedy job asking (for the hub's approval queue).
    pub job: &'a str,
    /// The node is already half changed (a change interrupted by a
    /// restart): with the hub unreachable the work goes on regardless.
    pub must_finish: bool,
    /// With the hub unreachable: allow (`Some(true)`), deny, or the agent's
    /// `defender.offline` (`None`).
    pub offline: Option<bool>,
}

impl Permits {
    pub fn new(node: &str, standalone: bool) -> Permits {
        Permits {
            node: node.to_string(),
            standalone,
            offline: Mutex::new(Offline::Deny),
            ttl_seconds: Mutex::new(60),
            client: Mutex::new(None),
            busy: Mutex::new(None),
        }
    }

    /// Applies `defender` settings.
    pub fn configure(&self, offline: Offline, ttl_seconds: u32) {
        *self.offline.lock().unwrap_or_else(|p| p.into_inner()) = offline;
        *self.ttl_seconds.lock().unwrap_or_else(|p| p.into_inner()) = ttl_seconds.max(10);
    }

    /// Called by the link as a session opens (`Some`) and ends (`None`).
    pub fn set_channel(&self, channel: Option<Channel>) {
        *self.client.lock().unwrap_or_else(|p| p.into_inner()) = channel.map(AgentLinkClient::new);
    }

    fn client(&self) -> Option<AgentLinkClient<Channel>> {
        self.client.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The action holding the node, if any.
    pub fn busy(&self) -> Option<String> {
        self.busy.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn unbusy(&self, action: &str) {
        let mut b = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if b.as_deref() == Some(action) {
            *b = None;
        }
    }

    async fn call(&self, req: PermitRequest) -> Result<nodekeeper_proto::v1::PermitDecision, String> {
        let mut c = self.client().ok_or_else(|| "no hub session".to_string())?;
        match tokio::time::timeout(CALL_TIMEOUT, c.permit(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(format!("hub: {}", s.message())),
            Err(_) => Err(format!("no answer within {} s", CALL_TIMEOUT.as_secs())),
        }
    }

    /// Asks for a permit for `action` (`component/kubelet`); see [`Ask`].
    pub async fn acquire(self: &Arc<Self>, action: &str, reason: &str, must_finish: bool) -> Result<Permit, NoPermit> {
        self.ask(Ask {
            action,
            reason,
            must_finish,
            ..Default::default()
        })
        .await
    }

    /// Asks for a permit.
    pub async fn ask(self: &Arc<Self>, a: Ask<'_>) -> Result<Permit, NoPermit> {
        {
            let mut b = self.busy.lock().unwrap_or_else(|p| p.into_inner());
            match b.as_deref() {
                Some(other) if other != a.action => return Err(NoPermit::Busy(other.to_string())),
                _ => *b = Some(a.action.to_string()),
            }
        }
        let local = |why: &str| {
            if !why.is_empty() {
                tracing::warn!(action = a.action, why, "going ahead without the hub's permit");
            }
            Permit {
                id: String::new(),
                action: a.action.to_string(),
                renewer: None,
                owner: self.clone(),
            }
        };
        if self.standalone {
            return Ok(local(""));
        }
        let ttl = *self.ttl_seconds.lock().unwrap_or_else(|p| p.into_inner());
        let req = PermitRequest {
            op: "acquire".into(),
            action: a.action.into(),
            reason: a.reason.into(),
            ttl_seconds: ttl,
            node_name: self.node.clone(),
            job: a.job.into(),
            ..Default::default()
        };
        let out = match self.call(req).await {
            Ok(d) if d.granted => {
                let every = Duration::from_secs(u64::from(d.ttl_seconds.max(3)) / 3);
                let me = self.clone();
                let id = d.permit_id.clone();
                let renewer = tokio::spawn(async move { me.renew_loop(id, every, ttl).await });
                Ok(Permit {
                    id: d.permit_id,
                    action: a.action.to_string(),
                    renewer: Some(renewer),
                    owner: self.clone(),
                })
            }
            Ok(d) => Err(NoPermit::Denied {
                reason: d.reason,
                terminal: d.terminal,
            }),
            Err(e) => {
                let allow = a
                    .offline
                    .unwrap_or(*self.offline.lock().unwrap_or_else(|p| p.into_inner()) == Offline::Allow);
                if allow {
                    Ok(local("the offline policy is allow"))
                } else if a.must_finish {
                    Ok(local("finishing a change a restart interrupted"))
                } else {
                    Err(NoPermit::Offline {
                        why: e,
                        by_rule: a.offline.is_some(),
                    })
                }
            }
        };
        if out.is_err() {
            self.unbusy(a.action);
        }
        out
    }

    async fn renew_loop(self: Arc<Self>, id: String, every: Duration, ttl: u32) {
        loop {
            tokio::time::sleep(every).await;
            let req = PermitRequest {
                op: "renew".into(),
                permit_id: id.clone(),
                ttl_seconds: ttl,
                node_name: self.node.clone(),
                ..Default::default()
            };
            match self.call(req).await {
                Ok(d) if d.granted => {}
                Ok(d) => {
                    tracing::error!(permit = %id, reason = %d.reason, "the hub no longer holds this node's permit; the work under way finishes");
                    return;
                }
                Err(e) => tracing::warn!(permit = %id, error = %e, "cannot renew the permit; retrying"),
            }
        }
    }
}
