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
use nodekeeper_proto::v1::{
    AgentMessage, Hello, HubMessage, JoinRequest, JoinResponse, RenewRequest, Welcome, agent_message, hub_message,
};
use tonic::{Request, Response, Status, Streaming};

const T: Duration = Duration::from_secs(30);

fn hello(name: &str, protocol: u32) -> AgentMessage {
    AgentMessage {
        body: Some(agent_message::Body::Hello(Box::new(Hello {
            node_name: name.into(),
            protocol,
            ..Default::default()
        }))),
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
    // A hand-made client speaks the protocol here: plaintext, no identity.
    let hub = Hub::start(tmp.path(), "insecure: true\n");
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
    async fn join(&self, _r: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        Err(Status::unimplemented("this stand-in hub is insecure"))
    }
    async fn renew(&self, _r: Request<RenewRequest>) -> Result<Response<JoinResponse>, Status> {
        Err(Status::unimplemented("this stand-in hub is insecure"))
    }
    async fn permit(
        &self,
        _r: Request<nodekeeper_proto::v1::PermitRequest>,
    ) -> Result<Response<nodekeeper_proto::v1::PermitDecision>, Status> {
        Err(Status::unimplemented("this stand-in hub grants nothing"))
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

/// A session that sends `reports` after its Hello and waits for their ack.
async fn report(url: String, name: &str, reports: Vec<nodekeeper_proto::v1::Report>) -> Result<u64, Status> {
    let last = reports.last().map_or(0, |r| r.sequence);
    let mut client = AgentLinkClient::connect(url)
        .await
        .map_err(|e| Status::unknown(e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let _ = tx.send(hello(name, nodekeeper_proto::LINK_PROTOCOL)).await;
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let _ = tx
        .send(AgentMessage {
            body: Some(agent_message::Body::Reports(nodekeeper_proto::v1::ReportBatch {
                reports,
            })),
        })
        .await;
    loop {
        match inbound.message().await? {
            Some(HubMessage {
                body: Some(hub_message::Body::ReportAck(a)),
            }) if a.sequence >= last => return Ok(a.sequence),
            Some(_) => {}
            None => return Err(Status::unknown("closed before the ack")),
        }
    }
}

#[test]
fn one_node_cannot_grow_the_hub_without_bound() {
    use nodekeeper_proto::v1::{Condition, ConditionChange, Event, Report, report};
    let tmp = TempDir::new("caps");
    // A hand-made client sends the reports: plaintext, no identity.
    let hub = Hub::start(tmp.path(), "insecure: true\n");
    let mut reports = Vec::new();
    // 100 distinct condition types: 64 are kept, the rest dropped and counted.
    for i in 0..100u64 {
        reports.push(Report {
            sequence: i + 1,
            body: Some(report::Body::Condition(ConditionChange {
                condition: Some(Condition {
                    r#type: format!("Problem{i}"),
                    status: "True".into(),
                    reason: "Flood".into(),
                    ..Default::default()
                }),
                removed: false,
            })),
            ..Default::default()
        });
    }
    // An event whose reason is 10 KiB long.
    reports.push(Report {
        sequence: 101,
        body: Some(report::Body::Event(Event {
            reason: "R".repeat(10_000),
            message: "m".into(),
            severity: "Info".into(),
            ..Default::default()
        })),
        ..Default::default()
    });
    let acked = rt()
        .block_on(report(hub.grpc_url(), "node-greedy", reports))
        .expect("acked");
    assert_eq!(
        acked, 101,
        "capped reports are still acknowledged (resending cannot help)"
    );
    let node = hub.node("node-greedy").expect("node");
    let conditions = node["status"]["conditions"].as_array().expect("conditions");
    let problems = conditions
        .iter()
        .filter(|c| c["type"].as_str().is_some_and(|t| t.starts_with("Problem")))
        .count();
    assert_eq!(problems, 64, "conditions per node are capped");
    assert!(!node.to_string().contains(&"R".repeat(300)), "over-long reason dropped");
    let (_, metrics) = hub.request("GET", "/metrics", "").expect("metrics");
    assert!(
        metrics.contains("nodekeeper_hub_reports_capped_total{cap=\"conditions\"} 36"),
        "{metrics}"
    );
    assert!(metrics.contains("nodekeeper_hub_reports_capped_total{cap=\"field_length\"} 1"));

    // Too many labels in a Hello: refused with the field.
    let mut h = hello("node-labels", nodekeeper_proto::LINK_PROTOCOL);
    if let Some(agent_message::Body::Hello(h)) = h.body.as_mut() {
        for i in 0..200 {
            h.labels.insert(format!("k{i}"), "v".into());
        }
    }
    let err = rt().block_on(open(hub.grpc_url(), h)).expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("hello.labels") && err.message().contains("at most 128"),
        "{}",
        err.message()
    );
}

#[test]
fn nodes_can_be_deleted_and_a_connected_one_only_with_force() {
    let tmp = TempDir::new("delnode");
    let mut hub = Hub::start(tmp.path(), "");
    let mut a = Agent::start(tmp.path(), "node-del", Some(&hub.grpc_url()), "");
    let _b = Agent::start(tmp.path(), "node-keep", Some(&hub.grpc_url()), "");
    wait_for("both Ready", T, || (hub.summary()["nodes"]["ready"] == 2).then_some(()));

    let out = hub.nkctl(&["delete", "node", "node-del"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("connected agent") && err.contains("--force"), "{err}");
    assert!(hub.node("node-del").is_some(), "refused delete changed nothing");

    // --force closes the session too; the running agent registers again.
    let sessions = a.status().expect("status")["hub"]["sessions"].as_u64().unwrap_or(0);
    let out = hub.nkctl(&["delete", "node", "node-del", "--force"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("node/node-del deleted"));
    wait_for("agent reconnects after its session was closed", T, || {
        a.status()
            .filter(|s| s["hub"]["sessions"].as_u64() > Some(sessions) && s["hub"]["connected"] == true)
    });

    // A stopped agent's node is deleted for good: from the list, the counts
    // and the store.
    assert!(a.terminate().success());
    wait_for("node-del disconnected", T, || {
        hub.node("node-del").filter(|n| n["status"]["connected"] == false)
    });
    let out = hub.nkctl(&["delete", "node", "node-del"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(hub.node("node-del").is_none());
    assert_eq!(hub.summary()["nodes"]["total"], 1);
    let (code, body) = hub.request("DELETE", "/v1/nodes/node-del", "").expect("delete");
    assert_eq!(code, 404, "{body}");
    hub.kill9();
    hub.restart();
    assert!(hub.node("node-del").is_none(), "deleted in the store too");
    assert!(hub.node("node-keep").is_some());
    assert_eq!(hub.summary()["nodes"]["total"], 1);
}

#[test]
fn resource_revisions_are_kept_up_to_the_history_limit() {
    let tmp = TempDir::new("revlimit");
    let mut hub = Hub::start(tmp.path(), "revisionHistoryLimit: 3\n");
    for v in 1..=6 {
        let doc = format!(
            "apiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {{name: tool}}\nspec:\n  version: \"{v}\"\n  files:\n  - {{path: /tmp/nk-revlimit-tool.conf, template: \"v{v}\"}}\n"
        );
        let out = nodekeeper_e2e::nkctl(&hub.http_url(), None, &["apply", "-f", "-"], Some(&doc));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let gens = |hub: &Hub| -> Vec<u64> {
        hub.get("/v1/components/tool/revisions").expect("revisions")["items"]
            .as_array()
            .expect("items")
            .iter()
            .filter_map(|r| r["metadata"]["generation"].as_u64())
            .collect()
    };
    assert_eq!(gens(&hub), vec![4, 5, 6]);
    hub.kill9();
    hub.restart();
    assert_eq!(gens(&hub), vec![4, 5, 6], "pruned in the store as well");
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0);
    ticks / 100.0
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn at_its_open_files_limit_the_hub_refuses_agents_and_keeps_serving_operators() {
    let tmp = TempDir::new("fdlimit");
    // 256 descriptors: 192 agent connections, 32 more refused with a hint,
    // the rest kept for the API, the store and health checks.
    let hub = Hub::start_with_nofile(tmp.path(), "limits: {retryAfterSeconds: 2}\n", 256);
    let hollow = nodekeeper_e2e::Hollow::start(tmp.path(), &hub.grpc_url(), 300);
    wait_for("the hub fills up to its connection limit", T, || {
        (hub.summary()["nodes"]["connected"] == 192).then_some(())
    });
    // Also a flood of raw TCP connections that never speak HTTP/2.
    let flood: Vec<std::net::TcpStream> = (0..300)
        .filter_map(|_| std::net::TcpStream::connect(&hub.grpc).ok())
        .collect();
    assert!(flood.len() > 100, "opened {}", flood.len());
    std::thread::sleep(Duration::from_millis(500));

    // The operator API answers throughout, and the hub does not spin.
    let pid = hub.pid().expect("pid");
    let cpu0 = cpu_seconds(pid);
    for _ in 0..20 {
        let (code, _) = hub
            .request("GET", "/v1/fleet/summary", "")
            .expect("API answers at the limit");
        assert_eq!(code, 200);
        std::thread::sleep(Duration::from_millis(100));
    }
    let used = cpu_seconds(pid) - cpu0;
    assert!(
        used < 1.0,
        "the hub used {used:.2} CPU seconds in 2 s at its limit: it spins"
    );
    let s = hub.summary();
    assert_eq!(s["nodes"]["connected"], 192, "no more sessions than the limit: {s}");
    let (_, m) = hub.request("GET", "/metrics", "").expect("metrics");
    assert!(metric(&m, "nodekeeper_hub_sessions_throttled_total") >= 1.0, "{m}");
    assert!(metric(&m, "nodekeeper_hub_agent_connections_shed_total") >= 1.0, "{m}");
    let log = hub.log();
    // Logged once per episode, not per connection (hollow agents join on
    // a connection of their own first, so the count dips and an episode
    // may end and begin again a few times; over a hundred connections were
    // refused, so ten lines at most still means per episode).
    let logged = log.matches("refusing new agent sessions").count();
    assert!(
        (1..=10).contains(&logged),
        "the limit is logged per episode ({logged}):\n{log}"
    );
    // When the flood goes away, the waiting agents come in on their retry hint.
    drop(flood);
    drop(hollow);
    wait_for("the hub notices the agents are gone", T, || {
        (hub.summary()["nodes"]["connected"] == 0).then_some(())
    });
    let _again = nodekeeper_e2e::Hollow::start(tmp.path(), &hub.grpc_url(), 20);
    wait_for("new agents are admitted again", T, || {
        (hub.summary()["nodes"]["connected"] == 20).then_some(())
    });
}

#[test]
fn a_refused_agent_waits_for_the_hubs_retry_hint() {
    let tmp = TempDir::new("retryhint");
    let hub = Hub::start(tmp.path(), "limits: {maxSessions: 1, retryAfterSeconds: 3}\n");
    let _first = Agent::start(tmp.path(), "node-first", Some(&hub.grpc_url()), "");
    wait_for("first connected", T, || {
        hub.node("node-first").filter(|n| n["status"]["connected"] == true)
    });
    let second = Agent::start(tmp.path(), "node-second", Some(&hub.grpc_url()), "");
    let st = wait_for("second refused with the hint", T, || {
        second.status().filter(|s| {
            s["hub"]["lastError"]
                .as_str()
                .is_some_and(|e| e.contains("session limit") && e.contains("retry in 3 s"))
        })
    });
    assert_eq!(st["hub"]["connected"], false);
    let (_, m0) = hub.request("GET", "/metrics", "").expect("metrics");
    let before = metric(&m0, "nodekeeper_hub_sessions_throttled_total");
    std::thread::sleep(Duration::from_secs(6));
    let (_, m1) = hub.request("GET", "/metrics", "").expect("metrics");
    let refusals = metric(&m1, "nodekeeper_hub_sessions_throttled_total") - before;
    // Honouring a 3 s hint (plus up to 3 s of jitter) means at most 2 tries
    // in 6 s; the agent's own backoff would have tried about 6 times.
    assert!(refusals <= 2.0, "{refusals} refusals in 6 s despite a 3 s hint");
    assert!(second.log().contains("retry_after_ms=3000"), "{}", second.log());
    assert!(hub.node("node-second").is_none(), "a throttled agent registers nothing");
}

/// A node's cable is cut: nothing tells either end's sockets. With
/// `deadPeerSeconds: 3` on both sides, the kernel's keepalive and user
/// timeout make the hub drop the silent session and the agent give up the
/// dead connection within seconds (HTTP/2 PINGs, before, took 50 s);
/// mended, the agent reconnects by itself.
#[test]
fn a_cut_cable_is_noticed_by_both_ends_within_dead_peer_seconds_and_the_agent_comes_back() {
    use nodekeeper_e2e::lab::{HUB_ADDR, Hosts};
    let tmp = TempDir::new("dead-peer");
    let d = tmp.path();
    let hosts = Hosts::create("dp", 1);
    hosts.enter_hub();
    let hub = Hub::start_on(
        d,
        &format!("limits: {{deadPeerSeconds: 3}}\ntls: {{serverNames: [\"{HUB_ADDR}\"]}}\n"),
        "0.0.0.0",
    );
    let link = nodekeeper_e2e::hub_config(&hub.grpc_url_at(HUB_ADDR));
    let link = link.trim_end().strip_suffix('}').expect("hub: {...}").to_string() + ", deadPeerSeconds: 3}\n";
    let agent = Agent::start_wrapped(d, "host1", None, &link, hosts.wrap(0, &[]));
    let connected = |want: u64| Some(hub.summary()).filter(|s| s["nodes"]["connected"] == want);
    wait_for("the agent connected", T, || connected(1));
    let sessions = agent.status().expect("status")["hub"]["sessions"].as_u64().unwrap_or(0);

    hosts.cable(0, false);
    // Both well within the 50 s that HTTP/2 keepalive took.
    let within = Duration::from_secs(25);
    wait_for("the hub drops the silent session", within, || connected(0));
    wait_for("the agent gives up the dead connection", within, || {
        agent.status().filter(|s| s["hub"]["connected"] == false)
    });

    hosts.cable(0, true);
    let st = wait_for("the agent reconnects", Duration::from_secs(60), || {
        agent.status().filter(|s| s["hub"]["connected"] == true)
    });
    assert!(st["hub"]["sessions"].as_u64() > Some(sessions), "a new session: {st}");
    wait_for("the hub sees it again", T, || connected(1));
}
