//! The agent link: the `AgentLink.Session` gRPC stream. The handler waits for
//! the agent's Hello, opens the session, and answers with one stream composed
//! of the welcome, the node's desired state (latest value wins) and report
//! acknowledgements (cumulative, after commit); the connection task polls it
//! directly, with no task or queue per session in between. One task reads
//! what the agent sends.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt, stream};
use nodekeeper_proto::v1::agent_link_server::AgentLink;
use nodekeeper_proto::v1::{AgentMessage, HubMessage, ReportAck, agent_message, hub_message};
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::fleet::{Fleet, FleetError, SessionHandles};

pub mod admission;

use admission::{Admission, ConnInfo};

/// How long an agent has to say Hello after opening the stream.
const HELLO_TIMEOUT: Duration = Duration::from_secs(15);

/// The gRPC service.
pub struct LinkService {
    fleet: Arc<Fleet>,
    admission: Arc<Admission>,
}

impl LinkService {
    pub fn new(fleet: Arc<Fleet>, admission: Arc<Admission>) -> LinkService {
        LinkService { fleet, admission }
    }
}

/// `Unavailable` with the retry hint agents honour.
fn throttled(why: String, retry_after: Duration) -> Status {
    let mut s = Status::unavailable(format!("{why}; retry in {} s", retry_after.as_secs()));
    if let Ok(v) = retry_after.as_millis().to_string().parse() {
        s.metadata_mut().insert(nodekeeper_proto::RETRY_AFTER_MS, v);
    }
    s
}

type Outbound = Pin<Box<dyn Stream<Item = Result<HubMessage, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AgentLink for LinkService {
    type SessionStream = Outbound;

    async fn session(&self, request: Request<Streaming<AgentMessage>>) -> Result<Response<Outbound>, Status> {
        let info = request.extensions().get::<ConnInfo>().cloned();
        let peer = info.as_ref().and_then(|i| i.remote);
        let sessions = self.fleet.metrics.sessions_active.get().max(0) as usize;
        if let Err(why) = self.admission.check_session(info.as_ref(), sessions) {
            return Err(throttled(why, self.admission.limits().retry_after));
        }
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(AgentMessage {
                body: Some(agent_message::Body::Hello(h)),
            }))) => h,
            Ok(Ok(Some(_))) => return Err(Status::invalid_argument("the first message of a session must be Hello")),
            Ok(Ok(None)) => return Err(Status::cancelled("stream ended before Hello")),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Status::deadline_exceeded("no Hello within 15 s")),
        };
        if let Err(why) = nodekeeper_proto::check_link_protocol("the agent", hello.protocol) {
            self.fleet.metrics.sessions_rejected.inc();
            tracing::warn!(?peer, node = %hello.node_name, protocol = hello.protocol, "refused agent session: {why}");
            return Err(Status::failed_precondition(why));
        }
        // Room for this session's revision, waited for here rather than
        // under the fleet lock.
        self.fleet.ensure_reserved(1).await;
        let handles = self.fleet.open_session(hello).map_err(|e| {
            tracing::warn!(?peer, error = %e, "refused agent session");
            status_of(e)
        })?;
        let span = tracing::info_span!("node", node = %handles.node, session = handles.id);
        tokio::spawn(read_agent(self.fleet.clone(), inbound, handles.node.clone(), handles.id).instrument(span));
        Ok(Response::new(outbound(handles)))
    }
}

fn status_of(e: FleetError) -> Status {
    match e {
        FleetError::Invalid(e) => Status::invalid_argument(e.to_string()),
        FleetError::Conflict { .. } => Status::already_exists(e.to_string()),
        FleetError::NotFound { .. } => Status::not_found(e.to_string()),
        FleetError::Store(_) => Status::unavailable(e.to_string()),
    }
}

/// Reads heartbeats, reports and acknowledgements until the agent goes away.
async fn read_agent(fleet: Arc<Fleet>, mut inbound: Streaming<AgentMessage>, node: String, id: u64) {
    tracing::debug!("session open");
    loop {
        match inbound.message().await {
            Ok(Some(AgentMessage { body: Some(body) })) => match body {
                agent_message::Body::Heartbeat(hb) => fleet.heartbeat(&node, id, hb.applied_revision),
                agent_message::Body::Reports(batch) => fleet.ingest(&node, id, batch.reports).await,
                agent_message::Body::Applied(a) => fleet.applied(&node, id, a.revision, &a.error),
                agent_message::Body::Hello(_) => tracing::warn!("ignoring a second Hello in one session"),
            },
            Ok(Some(AgentMessage { body: None })) => {}
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, "session stream error");
                break;
            }
        }
    }
    fleet.close_session(&node, id);
    tracing::debug!("session closed");
}

/// What the hub sends: Welcome, then desired states and acknowledgements as
/// they change, until a newer session of the node replaces this one.
fn outbound(h: SessionHandles) -> Outbound {
    let msg = |body| HubMessage { body: Some(body) };
    let welcome = stream::once(std::future::ready(msg(hub_message::Body::Welcome(h.welcome))));
    // The current desired state first (if any), then every change.
    let desired = WatchStream::new(h.desired)
        .filter(|d| std::future::ready(d.revision > 0))
        .map(move |d| msg(hub_message::Body::Desired(d.message())));
    let acks =
        WatchStream::from_changes(h.acks).map(move |s| msg(hub_message::Body::ReportAck(ReportAck { sequence: s })));
    let replaced = stream::once(async move {
        let _ = h.replaced.await;
        Err(Status::aborted(
            "session replaced by a newer one of the same node, or closed",
        ))
    });
    // tonic ends the response at the first error, so `replaced` ends it.
    Box::pin(
        welcome
            .map(Ok)
            .chain(stream::select(stream::select(desired, acks).map(Ok), replaced)),
    )
}
