//! The agent link: the `AgentLink.Session` gRPC stream. One task reads what
//! the agent sends; one writes the welcome, desired state (latest value wins)
//! and report acknowledgements (cumulative, after commit).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use nodekeeper_proto::v1::agent_link_server::AgentLink;
use nodekeeper_proto::v1::{AgentMessage, HubMessage, ReportAck, agent_message, hub_message};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::fleet::{Fleet, FleetError, SessionHandles};

/// How long an agent has to say Hello after opening the stream.
const HELLO_TIMEOUT: Duration = Duration::from_secs(15);

/// The gRPC service.
pub struct LinkService {
    fleet: Arc<Fleet>,
}

impl LinkService {
    pub fn new(fleet: Arc<Fleet>) -> LinkService {
        LinkService { fleet }
    }
}

type Outbound = mpsc::Sender<Result<HubMessage, Status>>;

#[tonic::async_trait]
impl AgentLink for LinkService {
    type SessionStream = Pin<Box<dyn Stream<Item = Result<HubMessage, Status>> + Send + 'static>>;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = request.remote_addr();
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let fleet = self.fleet.clone();
        tokio::spawn(run_session(fleet, inbound, tx).instrument(tracing::info_span!("session", ?peer)));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
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

async fn run_session(fleet: Arc<Fleet>, mut inbound: Streaming<AgentMessage>, tx: Outbound) {
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(AgentMessage {
            body: Some(agent_message::Body::Hello(h)),
        }))) => h,
        Ok(Ok(Some(_))) => {
            let _ = tx
                .send(Err(Status::invalid_argument(
                    "the first message of a session must be Hello",
                )))
                .await;
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "session ended before hello");
            return;
        }
        Err(_) => {
            let _ = tx.send(Err(Status::deadline_exceeded("no Hello within 15 s"))).await;
            return;
        }
    };
    let handles = match fleet.open_session(hello) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "refused agent session");
            let _ = tx.send(Err(status_of(e))).await;
            return;
        }
    };
    let (node, id) = (handles.node.clone(), handles.id);
    let span = tracing::info_span!("node", node = %node, session = id);
    async {
        tracing::debug!("session open");
        let writer = tokio::spawn(outbound(handles, tx).in_current_span());
        loop {
            match inbound.message().await {
                Ok(Some(AgentMessage { body: Some(body) })) => match body {
                    agent_message::Body::Heartbeat(hb) => fleet.heartbeat(&node, id, hb.applied_revision),
                    agent_message::Body::Reports(batch) => fleet.ingest(&node, id, batch.reports),
                    agent_message::Body::Applied(a) => fleet.applied(&node, id, a.revision, &a.error),
                    agent_message::Body::Hello(_) => {
                        tracing::warn!("ignoring a second Hello in one session")
                    }
                },
                Ok(Some(AgentMessage { body: None })) => {}
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "session stream error");
                    break;
                }
            }
        }
        writer.abort();
        fleet.close_session(&node, id);
        tracing::debug!("session closed");
    }
    .instrument(span)
    .await
}

async fn outbound(mut h: SessionHandles, tx: Outbound) {
    let send = |body| HubMessage { body: Some(body) };
    if tx
        .send(Ok(send(hub_message::Body::Welcome(h.welcome.clone()))))
        .await
        .is_err()
    {
        return;
    }
    let first = h.desired.borrow_and_update().clone();
    if first.revision > 0 && tx.send(Ok(send(hub_message::Body::Desired(first)))).await.is_err() {
        return;
    }
    h.acks.borrow_and_update();
    loop {
        let msg = tokio::select! {
            r = h.desired.changed() => {
                if r.is_err() { return; }
                hub_message::Body::Desired(h.desired.borrow_and_update().clone())
            }
            r = h.acks.changed() => {
                if r.is_err() { return; }
                hub_message::Body::ReportAck(ReportAck { sequence: *h.acks.borrow_and_update() })
            }
            _ = &mut h.replaced => {
                let _ = tx.send(Err(Status::aborted("replaced by a newer session of the same node"))).await;
                return;
            }
            _ = tx.closed() => return,
        };
        if tx.send(Ok(send(msg))).await.is_err() {
            return;
        }
    }
}
