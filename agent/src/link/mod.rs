//! The hub link: one `AgentLink.Session` stream at a time, Hello first, then
//! heartbeats, reports from the outbox and acknowledgements of applied
//! desired state; reconnects with exponential backoff and full jitter.

use std::sync::Arc;
use std::time::Duration;

use nodekeeper_proto::time::now_rfc3339;
use nodekeeper_proto::v1::agent_link_client::AgentLinkClient;
use nodekeeper_proto::v1::{AgentMessage, Applied, Heartbeat, HubMessage, ReportBatch, agent_message, hub_message};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::converge;
use crate::retry::Backoff;
use crate::runtime::Agent;

pub mod identity;
pub mod permit;

use identity::{Credentials, JoinError};

/// Where the link goes and how it proves who it is.
#[derive(Clone)]
pub enum Target {
    /// Plaintext, no identity (`hub.insecure: true`).
    Plain(Endpoint),
    /// TLS with the node's certificate, joining first if it has none.
    Tls {
        endpoint: Endpoint,
        creds: Arc<Credentials>,
    },
}

/// Aborts a task when dropped (the renewal task lives as long as its session).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reports per batch message.
const BATCH: usize = 500;
/// Reports sent but not yet acknowledged before the link waits for acks.
const MAX_IN_FLIGHT: u64 = 5_000;

/// Link tunables.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub connect_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// See [`nodekeeper_proto::daemon::detect_dead_peer`].
    pub dead_peer: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            connect_timeout: Duration::from_secs(5),
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(30),
            dead_peer: nodekeeper_proto::daemon::DEAD_PEER_DEFAULT,
        }
    }
}

/// Why a session ended.
enum End {
    Shutdown,
    /// The session was up, then closed.
    Closed(String),
}

/// Why a session could not be established.
enum Failure {
    /// The hub could not be reached or the stream broke (normal while it
    /// restarts).
    Unreachable(String),
    /// The hub refused the session, or this agent refused the hub: an
    /// operator must act. `retry_after` is the hub's hint (admission
    /// control); without one the agent waits its longest backoff.
    Refused { why: String, retry_after: Option<Duration> },
}

impl Failure {
    fn from_status(s: &tonic::Status) -> Failure {
        let why = format!("hub refused the session: {}", s.message());
        let hint = s
            .metadata()
            .get(nodekeeper_proto::RETRY_AFTER_MS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis);
        match s.code() {
            // Admission control says when to come back; any other
            // Unavailable (a broken connection, a store hiccup) is retried
            // with the usual backoff.
            tonic::Code::Unavailable if hint.is_some() => Failure::Refused { why, retry_after: hint },
            tonic::Code::Unavailable => Failure::Unreachable(why),
            tonic::Code::FailedPrecondition
            | tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
            | tonic::Code::InvalidArgument
            | tonic::Code::AlreadyExists => Failure::Refused { why, retry_after: None },
            _ => Failure::Unreachable(why),
        }
    }
}

impl From<String> for Failure {
    fn from(s: String) -> Failure {
        Failure::Unreachable(s)
    }
}

/// Builds the endpoint for a hub address (`https://host:port`, or
/// `http://` on an insecure hub).
pub fn endpoint(address: &str, cfg: &LinkConfig) -> Result<Endpoint, String> {
    Endpoint::from_shared(address.to_string())
        .map(|e| {
            // No HTTP/2 PINGs: the connector's sockets find a dead hub in
            // the kernel (`tcp`).
            e.connect_timeout(cfg.connect_timeout)
        })
        .map_err(|e| format!("hub.address {address:?}: {e}"))
}

/// Dials the hub: TCP without Nagle's delay, with the kernel watching for a
/// dead peer ([`nodekeeper_proto::daemon::detect_dead_peer`]).
pub(crate) async fn tcp(
    uri: &tonic::codegen::http::Uri,
    dead_peer: Duration,
) -> std::io::Result<tokio::net::TcpStream> {
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("http") { 80 } else { 443 });
    let tcp = tokio::net::TcpStream::connect((host, port)).await?;
    tcp.set_nodelay(true)?;
    nodekeeper_proto::daemon::detect_dead_peer(&tcp, dead_peer)?;
    Ok(tcp)
}

/// Runs the link until `shutdown` turns true.
pub async fn run(agent: Arc<Agent>, target: Target, cfg: LinkConfig, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Backoff::new(cfg.backoff_base, cfg.backoff_cap);
    loop {
        let result = tokio::select! {
            r = session(&agent, &target, &cfg, &mut backoff) => r,
            _ = shutdown.wait_for(|s| *s) => Ok(End::Shutdown),
        };
        agent.set_link(|l| l.connected = false);
        agent.permits.set_channel(None);
        match result {
            Ok(End::Shutdown) => return,
            Ok(End::Closed(why)) => {
                tracing::warn!(reason = %why, "hub session closed; reconnecting");
                agent.set_link(|l| l.last_error = Some(why));
            }
            Err(Failure::Unreachable(e)) => {
                tracing::debug!(error = %e, "cannot reach hub");
                agent.set_link(|l| l.last_error = Some(e));
            }
            Err(Failure::Refused { why, retry_after }) => {
                // Needs an operator (or, with a hint, patience): said at warn.
                tracing::warn!(error = %why, retry_after_ms = retry_after.map(|d| d.as_millis() as u64), "no hub session");
                agent.set_link(|l| l.last_error = Some(why));
                agent.metrics.link_failures.inc();
                // The hub's hint, spread by jitter so a refused crowd does not
                // return at once; without one, the longest backoff.
                let delay = match retry_after {
                    Some(hint) => hint + backoff.next_delay().min(hint),
                    None => backoff.max_delay(),
                };
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                continue;
            }
        }
        agent.metrics.link_failures.inc();
        let delay = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

fn msg(body: agent_message::Body) -> AgentMessage {
    AgentMessage { body: Some(body) }
}

/// A channel to the hub: over TLS with the node certificate (joining first
/// when there is none valid), or plaintext on an insecure hub. With TLS,
/// also the task that renews the certificate while the session lasts.
async fn connect(target: &Target, dead_peer: Duration) -> Result<(Channel, Option<AbortOnDrop>), Failure> {
    match target {
        Target::Plain(endpoint) => {
            let connector = tower::service_fn(move |uri: tonic::codegen::http::Uri| async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tcp(&uri, dead_peer).await?))
            });
            let channel = endpoint
                .connect_with_connector(connector)
                .await
                .map_err(|e| format!("connect: {}", identity::error_chain(&e)))?;
            Ok((channel, None))
        }
        Target::Tls { endpoint, creds } => {
            if !creds.usable() {
                creds.join(endpoint, dead_peer).await.map_err(|e| match e {
                    JoinError::Refused(why) => Failure::Refused { why, retry_after: None },
                    JoinError::Unreachable(why) => Failure::Unreachable(why),
                })?;
            }
            let (channel, _) = creds
                .channel(endpoint, true, dead_peer)
                .await
                .map_err(Failure::Unreachable)?;
            let renewer = tokio::spawn(identity::renewer(creds.clone(), channel.clone()));
            Ok((channel, Some(AbortOnDrop(renewer))))
        }
    }
}

/// One session: `Err` when it never got established.
async fn session(agent: &Agent, target: &Target, cfg: &LinkConfig, backoff: &mut Backoff) -> Result<End, Failure> {
    let (channel, _renewer) = connect(target, cfg.dead_peer).await?;
    let refused = |s: &tonic::Status| {
        // The hub no longer takes this certificate (revoked, deleted,
        // replaced): join again (with the token) next time.
        if s.code() == tonic::Code::Unauthenticated
            && let Target::Tls { creds, .. } = target
        {
            creds.invalidate();
            // Joining again is the next step, at the usual pace; a refused
            // join waits the longest backoff.
            return Failure::Unreachable(format!("hub refused the certificate: {}", s.message()));
        }
        Failure::from_status(s)
    };
    let mut client = AgentLinkClient::new(channel.clone());
    let (tx, rx) = mpsc::channel::<AgentMessage>(64);
    tx.send(msg(agent_message::Body::Hello(Box::new(agent.hello()))))
        .await
        .map_err(|_| "session closed before hello".to_string())?;
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .map_err(|s| refused(&s))?
        .into_inner();
    let welcome = match inbound.message().await {
        Ok(Some(HubMessage {
            body: Some(hub_message::Body::Welcome(w)),
        })) => w,
        Ok(Some(_)) => return Err("hub did not start with Welcome".to_string().into()),
        Ok(None) => return Err("hub closed the session".to_string().into()),
        Err(s) => return Err(refused(&s)),
    };
    if let Err(why) = nodekeeper_proto::check_link_protocol("the hub", welcome.protocol) {
        return Err(Failure::Refused {
            why: format!("refusing the hub's session: {why}"),
            retry_after: None,
        });
    }
    backoff.reset();
    agent.permits.set_channel(Some(channel));
    agent.metrics.link_sessions.inc();
    agent.set_link(|l| {
        l.connected = true;
        l.last_connected = Some(now_rfc3339());
        l.last_error = None;
        l.sessions += 1;
    });
    tracing::info!(hub_version = %welcome.hub_version, hub_sequence = welcome.report_sequence, "hub session open");

    // Everything up to what the hub has is done; replay the rest.
    agent
        .ack_reports(welcome.report_sequence)
        .map_err(|e| Failure::Unreachable(e.to_string()))?;
    let mut sent = welcome.report_sequence;
    let mut acked = welcome.report_sequence;
    // One timer for the whole session, reset when it fires or the interval
    // shortens (re-arming a timer on every loop turn is measurable at scale).
    let heartbeat = tokio::time::sleep(heartbeat_interval(agent));
    tokio::pin!(heartbeat);

    loop {
        // Send what is pending, within the in-flight window.
        while sent.saturating_sub(acked) < MAX_IN_FLIGHT {
            let batch = agent.with_outbox(|o| o.after(sent, BATCH));
            let Some(last) = batch.last().map(|r| r.sequence) else {
                break;
            };
            let n = batch.len() as u64;
            if tx
                .send(msg(agent_message::Body::Reports(ReportBatch { reports: batch })))
                .await
                .is_err()
            {
                return Ok(End::Closed("hub stream closed".into()));
            }
            agent.metrics.reports_sent.inc_by(n);
            sent = last;
        }
        let unsent = agent.with_outbox(|o| o.last_sequence()) > sent;
        tokio::select! {
            _ = agent.outbox_changed.notified(), if !unsent => {}
            _ = &mut heartbeat => {
                let hb = Heartbeat { applied_revision: agent.applied_revision() };
                if tx.send(msg(agent_message::Body::Heartbeat(hb))).await.is_err() {
                    return Ok(End::Closed("hub stream closed".into()));
                }
                heartbeat.as_mut().reset(Instant::now() + heartbeat_interval(agent));
            }
            m = inbound.message() => match m {
                Ok(Some(HubMessage { body: Some(body) })) => match body {
                    hub_message::Body::Desired(d) => {
                        let revision = d.revision;
                        let error = converge::settings::apply(agent, *d).err().unwrap_or_default();
                        if !error.is_empty() {
                            tracing::error!(revision, %error, "refused desired state from hub");
                        }
                        let applied = Applied { revision, error };
                        if tx.send(msg(agent_message::Body::Applied(applied))).await.is_err() {
                            return Ok(End::Closed("hub stream closed".into()));
                        }
                        let sooner = Instant::now() + heartbeat_interval(agent);
                        if sooner < heartbeat.deadline() {
                            heartbeat.as_mut().reset(sooner);
                        }
                    }
                    hub_message::Body::ReportAck(a) => {
                        agent.ack_reports(a.sequence).map_err(|e| Failure::Unreachable(e.to_string()))?;
                        acked = acked.max(a.sequence);
                    }
                    hub_message::Body::Welcome(_) => tracing::warn!("ignoring a second Welcome"),
                },
                Ok(Some(HubMessage { body: None })) => {}
                Ok(None) => return Ok(End::Closed("hub ended the session".into())),
                Err(s) => {
                    let _ = refused(&s);
                    return Ok(End::Closed(format!("hub stream error: {}", s.message())));
                }
            },
        }
    }
}

fn heartbeat_interval(agent: &Agent) -> Duration {
    Duration::from_secs(u64::from(agent.with_settings(|s| s.heartbeat_seconds).max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_told_from_outages_and_the_hint_is_read() {
        let mut s = tonic::Status::unavailable("at the limit");
        s.metadata_mut()
            .insert(nodekeeper_proto::RETRY_AFTER_MS, "2500".parse().expect("value"));
        match Failure::from_status(&s) {
            Failure::Refused { retry_after, why } => {
                assert_eq!(retry_after, Some(Duration::from_millis(2500)));
                assert!(why.contains("at the limit"));
            }
            Failure::Unreachable(w) => panic!("a hinted refusal: {w}"),
        }
        // Unavailable without a hint is a broken connection: normal backoff.
        assert!(matches!(
            Failure::from_status(&tonic::Status::unavailable("connection reset")),
            Failure::Unreachable(_)
        ));
        assert!(matches!(
            Failure::from_status(&tonic::Status::failed_precondition("protocol")),
            Failure::Refused { retry_after: None, .. }
        ));
        assert!(matches!(
            Failure::from_status(&tonic::Status::internal("oops")),
            Failure::Unreachable(_)
        ));
    }
}
