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
use nodekeeper_proto::v1::{
    AgentMessage, HubMessage, JoinRequest, JoinResponse, PermitDecision, PermitRequest, RenewRequest, ReportAck,
    agent_message, hub_message,
};
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::auth::audit::Record;
use crate::auth::{Auth, Refusal};
use crate::fleet::{Fleet, FleetError, SessionHandles};

/// AsyncRead and AsyncWrite for a connection type by its stream field.
macro_rules! delegate_io {
    ($t:ty, $field:ident) => {
        impl tokio::io::AsyncRead for $t {
            fn poll_read(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.$field).poll_read(cx, buf)
            }
        }
        impl tokio::io::AsyncWrite for $t {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.$field).poll_write(cx, buf)
            }
            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.$field).poll_flush(cx)
            }
            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.$field).poll_shutdown(cx)
            }
            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.$field).poll_write_vectored(cx, bufs)
            }
            fn is_write_vectored(&self) -> bool {
                self.$field.is_write_vectored()
            }
        }
    };
}

pub mod admission;
pub mod tls;

use admission::{Admission, ConnInfo};

/// How long an agent has to say Hello after opening the stream.
const HELLO_TIMEOUT: Duration = Duration::from_secs(15);

/// The gRPC service.
pub struct LinkService {
    fleet: Arc<Fleet>,
    admission: Arc<Admission>,
    auth: Arc<Auth>,
}

impl LinkService {
    pub fn new(fleet: Arc<Fleet>, admission: Arc<Admission>, auth: Arc<Auth>) -> LinkService {
        LinkService { fleet, admission, auth }
    }

    /// Audits a refusal and turns it into the status the agent sees.
    fn refuse(&self, r: Record, why: Refusal) -> Status {
        tracing::warn!(actor = %r.actor, action = %r.action, resource = %r.resource, source = %r.source, "refused: {why}");
        self.fleet.metrics.sessions_rejected.inc();
        self.auth.record(r.refused(&why));
        match why {
            Refusal::Unauthenticated(m) => Status::unauthenticated(m),
            Refusal::PermissionDenied(m) => Status::permission_denied(m),
            Refusal::AlreadyExists(m) => Status::already_exists(m),
            Refusal::Invalid(m) => Status::invalid_argument(m),
            Refusal::Unavailable(m) => Status::unavailable(m),
        }
    }
}

fn source_of<T>(r: &Request<T>) -> String {
    r.extensions()
        .get::<ConnInfo>()
        .and_then(|i| i.remote)
        .map(|a| a.to_string())
        .unwrap_or_default()
}

/// Ends when the node's newest certificate expires (never on an insecure
/// hub): a renewal moves the end without a reconnect. Revocation and
/// deletion end the session at once through the fleet.
async fn identity_end(auth: Arc<Auth>, node: String) {
    if auth.insecure() {
        return std::future::pending().await;
    }
    loop {
        let Some(t) = auth.not_after(&node) else { return };
        let Ok(left) = t.duration_since(std::time::SystemTime::now()) else {
            return;
        };
        tokio::time::sleep(left + Duration::from_millis(10)).await;
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
        let source = peer.map(|a| a.to_string()).unwrap_or_default();
        // The node's name comes from its certificate, never from its Hello.
        let identity = if self.auth.insecure() {
            None
        } else {
            let Some(cert) = info.as_ref().and_then(|i| i.peer.clone()) else {
                return Err(self.refuse(
                    Record::new("unauthenticated", "session", "nodes").source(source),
                    Refusal::Unauthenticated(
                        "a client certificate is required; join with a bootstrap token first (hub.bootstrapToken)"
                            .into(),
                    ),
                ));
            };
            let actor = format!("node:{}", cert.common_name);
            match self.auth.session_identity(&cert) {
                Ok(i) => Some(i),
                Err(why) => {
                    let r = Record::new(actor, "session", format!("nodes/{}", cert.common_name)).source(source);
                    return Err(self.refuse(r, why));
                }
            }
        };
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
        if let Some(i) = &identity
            && hello.node_name != i.node
        {
            let r = Record::new(
                format!("node:{}", i.node),
                "session",
                format!("nodes/{}", hello.node_name),
            )
            .source(source);
            return Err(self.refuse(
                r,
                Refusal::PermissionDenied(format!(
                    "the certificate of node {:?} cannot speak for node {:?}; a node speaks only for itself",
                    i.node, hello.node_name
                )),
            ));
        }
        let claimed: Vec<&String> = hello.labels.keys().filter(|k| self.auth.protected(k)).collect();
        if !claimed.is_empty() {
            let keys = claimed.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ");
            let why = format!(
                "labels {keys} are protected: only the join token and operators set them; the agent's claim is ignored"
            );
            tracing::warn!(node = %hello.node_name, "{why}");
            self.auth.record(
                Record::new(
                    format!("node:{}", hello.node_name),
                    "labels.claim",
                    format!("nodes/{}", hello.node_name),
                )
                .refused(why)
                .source(source.clone()),
            );
        }
        if let Err(why) = nodekeeper_proto::check_link_protocol("the agent", hello.protocol) {
            self.fleet.metrics.sessions_rejected.inc();
            tracing::warn!(?peer, node = %hello.node_name, protocol = hello.protocol, "refused agent session: {why}");
            return Err(Status::failed_precondition(why));
        }
        // Room for this session's revision, waited for here rather than
        // under the fleet lock.
        self.fleet.ensure_reserved(1).await;
        let join_labels = identity.map(|i| i.labels);
        let handles = self.fleet.open_session(*hello, join_labels).map_err(|e| {
            tracing::warn!(?peer, error = %e, "refused agent session");
            status_of(e)
        })?;
        let span = tracing::info_span!("node", node = %handles.node, session = handles.id);
        tokio::spawn(
            read_agent(
                self.fleet.clone(),
                self.auth.clone(),
                inbound,
                handles.node.clone(),
                handles.id,
            )
            .instrument(span),
        );
        let end = identity_end(self.auth.clone(), handles.node.clone());
        Ok(Response::new(outbound(handles, end)))
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let source = source_of(&request);
        let req = request.into_inner();
        let token_id = nodekeeper_proto::token::parse(&req.token).map_or("malformed", |(id, _)| id);
        let actor = format!("join-token:{token_id}");
        match self.auth.join(&req.token, &req.csr).await {
            Ok((identity, certificate_pem, ca_pem)) => {
                tracing::info!(node = %identity.node, token = %identity.token, %source, "node joined");
                self.auth
                    .record(Record::new(actor, "join", format!("nodes/{}", identity.node)).source(source));
                Ok(Response::new(JoinResponse {
                    certificate_pem,
                    ca_pem,
                }))
            }
            Err(why) => Err(self.refuse(Record::new(actor, "join", "nodes").source(source), why)),
        }
    }

    async fn renew(&self, request: Request<RenewRequest>) -> Result<Response<JoinResponse>, Status> {
        let source = source_of(&request);
        let peer = request.extensions().get::<ConnInfo>().and_then(|i| i.peer.clone());
        let Some(peer) = peer else {
            return Err(self.refuse(
                Record::new("unauthenticated", "certificate.renew", "nodes").source(source),
                Refusal::Unauthenticated("renewal needs the node's current client certificate".into()),
            ));
        };
        let r = Record::new(
            format!("node:{}", peer.common_name),
            "certificate.renew",
            format!("nodes/{}", peer.common_name),
        )
        .source(source);
        match self.auth.renew(&peer, &request.into_inner().csr).await {
            Ok((certificate_pem, ca_pem)) => {
                tracing::info!(node = %peer.common_name, "node certificate renewed");
                self.auth.record(r);
                Ok(Response::new(JoinResponse {
                    certificate_pem,
                    ca_pem,
                }))
            }
            Err(why) => Err(self.refuse(r, why)),
        }
    }

    async fn permit(&self, request: Request<PermitRequest>) -> Result<Response<PermitDecision>, Status> {
        let source = source_of(&request);
        // The node is the certificate's; on an insecure hub, the request's.
        let node = if self.auth.insecure() {
            request.get_ref().node_name.clone()
        } else {
            let Some(cert) = request.extensions().get::<ConnInfo>().and_then(|i| i.peer.clone()) else {
                return Err(self.refuse(
                    Record::new("unauthenticated", "permit", "nodes").source(source),
                    Refusal::Unauthenticated("a permit needs the node's client certificate".into()),
                ));
            };
            match self.auth.session_identity(&cert) {
                Ok(i) => i.node,
                Err(why) => {
                    let r = Record::new(
                        format!("node:{}", cert.common_name),
                        "permit",
                        format!("nodes/{}", cert.common_name),
                    )
                    .source(source);
                    return Err(self.refuse(r, why));
                }
            }
        };
        let req = request.into_inner();
        if !self.auth.insecure() && !req.node_name.is_empty() && req.node_name != node {
            let r = Record::new(format!("node:{node}"), "permit", format!("nodes/{}", req.node_name)).source(source);
            return Err(self.refuse(
                r,
                Refusal::PermissionDenied(format!(
                    "node {node:?} cannot ask for a permit for node {:?}; a node speaks only for itself",
                    req.node_name
                )),
            ));
        }
        self.fleet
            .permit(&node, req)
            .await
            .map(Response::new)
            .map_err(status_of)
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

/// Reads heartbeats, reports and acknowledgements until the agent goes away;
/// what the reports show that the audit log must keep goes there.
async fn read_agent(fleet: Arc<Fleet>, auth: Arc<Auth>, mut inbound: Streaming<AgentMessage>, node: String, id: u64) {
    tracing::debug!("session open");
    loop {
        match inbound.message().await {
            Ok(Some(AgentMessage { body: Some(body) })) => match body {
                agent_message::Body::Heartbeat(hb) => fleet.heartbeat(&node, id, hb.applied_revision),
                agent_message::Body::Reports(batch) => {
                    for r in fleet.ingest(&node, id, batch.reports).await {
                        auth.record(r);
                    }
                }
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
fn outbound(h: SessionHandles, end: impl std::future::Future<Output = ()> + Send + 'static) -> Outbound {
    let msg = |body| HubMessage { body: Some(body) };
    let welcome = stream::once(std::future::ready(msg(hub_message::Body::Welcome(h.welcome))));
    // The current desired state first (if any), then every change.
    let desired = WatchStream::new(h.desired)
        .filter(|d| std::future::ready(d.revision > 0))
        .map(move |d| msg(hub_message::Body::Desired(Box::new(d.message()))));
    let acks =
        WatchStream::from_changes(h.acks).map(move |s| msg(hub_message::Body::ReportAck(ReportAck { sequence: s })));
    let replaced = stream::once(async move {
        tokio::select! {
            _ = h.replaced => Err(Status::aborted(
                "session replaced by a newer one of the same node, or closed",
            )),
            _ = end => Err(Status::unauthenticated(
                "the node's certificate expired or was revoked; renew or join again",
            )),
        }
    });
    // tonic ends the response at the first error, so `replaced` ends it.
    Box::pin(
        welcome
            .map(Ok)
            .chain(stream::select(stream::select(desired, acks).map(Ok), replaced)),
    )
}
