//! The agent link's compatibility and admission rules, spoken over real gRPC:
//! a raw client stands in for an agent of another protocol version, a small
//! test server for a hub of another version (both are the real wire
//! messages; only the version numbers are foreign).

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use nodekeeper_e2e::{Agent, Hub, TempDir, free_port, wait_for};
use nodekeeper_proto::v1::agent_link_client::AgentLinkClient;
use nodekeeper_proto::v1::agent_link_server::{AgentLink, AgentLinkServer};
use nodekeeper_proto::v1::{AgentMessage, Hello, HubMessage, Welcome, agent_message, hub_message};
use tonic::{Request, Response, Status, Streaming};

const T: Duration = Duration::from_secs(30);

fn hello(name: &str, protocol: u32) -> AgentMessage {
    AgentMessage {
        body: Some(agent_message::Body::Hello(Hello {
            node_name: name.into(),
            protocol,
            ..Default::default()
        })),
    }
}

/// Opens a session with one Hello and returns the hub's first answer.
async fn open(url: String, first: AgentMessage) -> Result<HubMessage, Status> {
    let mut client = AgentLinkClient::connect(url)
        .await
        .map_err(|e| Status::unknown(e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(first).await.map_err(|_| Status::unknown("send"))?;
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let m = inbound.message().await?;
    drop(tx);
    m.ok_or_else(|| Status::unknown("no answer"))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn hub_refuses_an_agent_protocol_it_does_not_speak_and_says_why() {
    let tmp = TempDir::new("proto-hub");
    let hub = Hub::start(tmp.path(), "");
    let rt = rt();
    let err = rt
        .block_on(open(hub.grpc_url(), hello("node-future", 99)))
        .expect_err("protocol 99 must be refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("link protocol 99") && err.message().contains("upgrade"),
        "{}",
        err.message()
    );
    // Nothing was registered for the refused agent.
    assert!(hub.node("node-future").is_none());
    // The protocol this build speaks is welcomed, with the hub's protocol.
    let ok = rt
        .block_on(open(hub.grpc_url(), hello("node-now", nodekeeper_proto::LINK_PROTOCOL)))
        .expect("current protocol accepted");
    match ok.body {
        Some(hub_message::Body::Welcome(w)) => assert_eq!(w.protocol, nodekeeper_proto::LINK_PROTOCOL),
        other => panic!("expected Welcome, got {other:?}"),
    }
}

/// A hub that welcomes every agent with protocol 99.
struct FutureHub;

type Out = Pin<Box<dyn Stream<Item = Result<HubMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentLink for FutureHub {
    type SessionStream = Out;
    async fn session(&self, _r: Request<Streaming<AgentMessage>>) -> Result<Response<Out>, Status> {
        let welcome = HubMessage {
            body: Some(hub_message::Body::Welcome(Welcome {
                protocol: 99,
                hub_version: "99.0.0".into(),
                ..Default::default()
            })),
        };
        let s = futures::stream::iter([Ok(welcome)]).chain(futures::stream::pending());
        Ok(Response::new(Box::pin(s)))
    }
}

use futures::StreamExt;

#[test]
fn agent_refuses_a_hub_protocol_it_does_not_speak_and_logs_why() {
    let tmp = TempDir::new("proto-agent");
    let port = free_port();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(AgentLinkServer::new(FutureHub))
            .serve(addr),
    );
    let agent = Agent::start(tmp.path(), "node-old", Some(&format!("http://{addr}")), "");
    let st = wait_for("agent refuses the hub", T, || {
        agent.status().filter(|s| {
            s["hub"]["lastError"]
                .as_str()
                .is_some_and(|e| e.contains("link protocol 99"))
        })
    });
    assert_eq!(st["hub"]["connected"], false, "{st}");
    assert_eq!(st["hub"]["sessions"], 0, "a refused hub never counts as a session");
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("link protocol 99")),
        "the refusal is logged at warn:\n{log}"
    );
}
