//! Permits from the hub's defender: asked for before a disruptive action,
//! renewed at a third of their TTL while the work goes on, given back when
//! it ends. Without a hub session the agent follows `defender.offline`; a
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
/// is up.
pub struct Permits {
    node: String,
    standalone: bool,
    offline: Mutex<Offline>,
    ttl_seconds: Mutex<u32>,
    client: Mutex<Option<AgentLinkClient<Channel>>>,
}

/// Why a permit was not had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoPermit {
    /// The defender said no (the reason names the budget or the freeze).
    Denied(String),
    /// The hub cannot be asked and `defender.offline` is `deny`.
    Offline(String),
}

impl std::fmt::Display for NoPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoPermit::Denied(w) => write!(f, "the hub's defender denied the permit: {w}"),
            NoPermit::Offline(w) => write!(
                f,
                "no permit: the hub cannot be asked ({w}) and defender.offline is deny"
            ),
        }
    }
}

/// A permit held; renewed until [`Permit::release`] (or drop).
pub struct Permit {
    /// The hub's id (empty for a local permit: standalone, or offline allow).
    pub id: String,
    pub action: String,
    renewer: Option<tokio::task::JoinHandle<()>>,
    permits: Option<Arc<Permits>>,
}

impl Permit {
    /// Gives the permit back (at once, so the budget frees up).
    pub async fn release(mut self) {
        if let Some(r) = self.renewer.take() {
            r.abort();
        }
        if let Some(p) = self.permits.take()
            && !self.id.is_empty()
        {
            let req = PermitRequest {
                op: "release".into(),
                permit_id: self.id.clone(),
                node_name: p.node.clone(),
                ..Default::default()
            };
            if let Err(e) = p.call(req).await {
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
    }
}

impl Permits {
    pub fn new(node: &str, standalone: bool) -> Permits {
        Permits {
            node: node.to_string(),
            standalone,
            offline: Mutex::new(Offline::Deny),
            ttl_seconds: Mutex::new(60),
            client: Mutex::new(None),
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

    async fn call(&self, req: PermitRequest) -> Result<nodekeeper_proto::v1::PermitDecision, String> {
        let mut c = self.client().ok_or_else(|| "no hub session".to_string())?;
        match tokio::time::timeout(CALL_TIMEOUT, c.permit(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(format!("hub: {}", s.message())),
            Err(_) => Err(format!("no answer within {} s", CALL_TIMEOUT.as_secs())),
        }
    }

    /// Asks for a permit for `action` (`component/kubelet`). `must_finish`:
    /// the node is already half changed (a change interrupted by a
    /// restart), so with the hub unreachable the work goes on regardless —
    /// a half-applied node is worse than an unbudgeted one.
    pub async fn acquire(self: &Arc<Self>, action: &str, reason: &str, must_finish: bool) -> Result<Permit, NoPermit> {
        let local = |why: &str| {
            tracing::warn!(action, why, "going ahead without the hub's permit");
            Permit {
                id: String::new(),
                action: action.to_string(),
                renewer: None,
                permits: None,
            }
        };
        if self.standalone {
            return Ok(Permit {
                id: String::new(),
                action: action.to_string(),
                renewer: None,
                permits: None,
            });
        }
        let ttl = *self.ttl_seconds.lock().unwrap_or_else(|p| p.into_inner());
        let req = PermitRequest {
            op: "acquire".into(),
            action: action.into(),
            reason: reason.into(),
            ttl_seconds: ttl,
            node_name: self.node.clone(),
            ..Default::default()
        };
        match self.call(req).await {
            Ok(d) if d.granted => {
                let every = Duration::from_secs(u64::from(d.ttl_seconds.max(3)) / 3);
                let me = self.clone();
                let id = d.permit_id.clone();
                let renewer = tokio::spawn(async move { me.renew_loop(id, every, ttl).await });
                Ok(Permit {
                    id: d.permit_id,
                    action: action.to_string(),
                    renewer: Some(renewer),
                    permits: Some(self.clone()),
                })
            }
            Ok(d) => Err(NoPermit::Denied(d.reason)),
            Err(e) => {
                let offline = *self.offline.lock().unwrap_or_else(|p| p.into_inner());
                if offline == Offline::Allow {
                    Ok(local("defender.offline is allow"))
                } else if must_finish {
                    Ok(local("finishing a change a restart interrupted"))
                } else {
                    Err(NoPermit::Offline(e))
                }
            }
        }
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
