//! Security end to end: node identity over mutual TLS, bootstrap tokens, a
//! node speaking only for itself, protected labels, operator tokens and
//! roles, artifact signatures, certificate renewal — one test per refusal,
//! each refusal also found in the hub's audit log.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use nodekeeper_e2e::artifacts::{FileServer, sha256};
use nodekeeper_e2e::{Agent, Hub, TempDir, nkctl, nkctl_as, wait_for};
use ring::signature::KeyPair;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn creds(hub: &Hub) -> nodekeeper_e2e::HubCreds {
    hub.creds.clone().expect("a secure hub")
}

/// Creates a token through the API as admin; (token, body).
fn token(hub: &Hub, body: &str) -> (String, Value) {
    let (code, resp) = hub.request("POST", "/v1/tokens", body).expect("create token");
    assert_eq!(code, 200, "{resp}");
    let v: Value = serde_json::from_str(&resp).expect("json");
    (v["token"].as_str().expect("token").to_string(), v)
}

/// The audit entries matching a query (`action=join` ...).
fn audit(hub: &Hub, query: &str) -> Vec<Value> {
    let v = hub.get(&format!("/v1/audit?{query}")).expect("audit");
    v["items"].as_array().cloned().unwrap_or_default()
}

fn refused(entries: &[Value], actor: &str, why: &str) -> bool {
    entries.iter().any(|e| {
        e["actor"] == actor
            && e["result"]
                .as_str()
                .is_some_and(|r| r.starts_with("refused") && r.contains(why))
    })
}

/// An agent's hub section joining with `token` (and this hub's CA pin).
fn joining(hub: &Hub, token: &str, pin: &str) -> String {
    format!(
        "hub: {{address: \"{}\", bootstrapToken: \"{token}\", caCertHash: \"{pin}\"}}\n",
        hub.grpc_url()
    )
}

fn last_error(a: &Agent) -> String {
    a.status()
        .and_then(|s| s["hub"]["lastError"].as_str().map(String::from))
        .unwrap_or_default()
}

#[test]
fn tokens_that_are_expired_used_up_deleted_or_forged_are_refused_and_audited() {
    let tmp = TempDir::new("sec-tokens");
    let hub = Hub::start(tmp.path(), "");
    let pin = creds(&hub).ca_cert_hash;
    let (expired, _) = token(&hub, r#"{"type":"join","ttl":"1s"}"#);
    let (single, _) = token(&hub, r#"{"type":"join","uses":1}"#);
    let (deleted, _) = token(&hub, r#"{"type":"join"}"#);
    let id = |t: &str| t.split('.').next().expect("id").to_string();
    let (code, body) = hub
        .request("DELETE", &format!("/v1/tokens/{}", id(&deleted)), "")
        .expect("delete");
    assert_eq!(code, 200, "{body}");
    // The right id with a secret nobody was given.
    let forged = format!("{}.{}", id(&single), "0".repeat(16));
    std::thread::sleep(Duration::from_millis(1500));

    let first = Agent::start(tmp.path(), "first", None, &joining(&hub, &single, &pin));
    wait_for("the single-use token joins one node", T, || {
        hub.node("first").filter(|n| n["status"]["connected"] == true)
    });
    let cases = [
        ("late", &expired, "expired"),
        ("second", &single, "was used 1 times"),
        ("gone", &deleted, "is not known"),
        ("forger", &forged, "secret does not match"),
    ];
    let agents: Vec<Agent> = cases
        .iter()
        .map(|(name, t, _)| Agent::start(tmp.path(), name, None, &joining(&hub, t, &pin)))
        .collect();
    for ((name, t, why), a) in cases.iter().zip(&agents) {
        wait_for(&format!("{name} refused: {why}"), T, || {
            last_error(a).contains(why).then_some(())
        });
        assert!(hub.node(name).is_none(), "{name} must not be registered");
        let entries = audit(&hub, "action=join");
        assert!(
            refused(&entries, &format!("join-token:{}", id(t)), why),
            "{name}: no refused join in the audit log: {entries:?}"
        );
    }
    let joined = audit(&hub, "action=join");
    assert!(
        joined
            .iter()
            .any(|e| e["resource"] == "nodes/first" && e["result"] == "ok"),
        "{joined:?}"
    );
    // Later starts need no token: the certificate is in the state dir.
    let state = first.dir.join("state");
    for f in ["node.crt", "node.key", "ca.crt"] {
        assert!(state.join(f).is_file(), "{f}");
    }
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(state.join("node.key")).expect("key").permissions());
    assert_eq!(mode & 0o777, 0o600);
    drop(agents);
    let mut first = first;
    first.kill9();
    // The token is used up, yet the node comes back with its certificate.
    first.restart();
    wait_for("first reconnects with its certificate", T, || {
        first.status().filter(|s| s["hub"]["connected"] == true)
    });
}

/// A hand-made agent link as `node`, with the certificate its state `dir`
/// holds, joining first with `token` when given: for saying what a real
/// agent never says.
async fn link_client(
    hub: &Hub,
    node: &str,
    dir: &Path,
    token: Option<&str>,
    pin: &str,
) -> nodekeeper_proto::v1::agent_link_client::AgentLinkClient<tonic::transport::Channel> {
    use nodekeeper_agent::link::identity::{Credentials, IdentityConfig};
    let cfg = IdentityConfig {
        node: node.into(),
        dir: Some(dir.to_path_buf()),
        bootstrap_token: token.map(String::from),
        ca_cert_hash: Some(pin.into()),
        ca_file: None,
        renew_fraction: 0.66,
    };
    let creds = Credentials::new(cfg, &hub.grpc_url()).expect("credentials");
    let ep = tonic::transport::Endpoint::from_shared(hub.grpc_url()).expect("endpoint");
    let dead_peer = nodekeeper_proto::daemon::DEAD_PEER_DEFAULT;
    if token.is_some() {
        creds.join(&ep, dead_peer).await.expect("joins");
    }
    let (channel, _) = creds
        .channel(&ep, true, dead_peer)
        .await
        .expect("TLS with the node's certificate");
    nodekeeper_proto::v1::agent_link_client::AgentLinkClient::new(channel)
}

#[test]
fn a_node_speaks_only_for_itself_and_a_revoked_node_must_join_with_a_new_token() {
    let tmp = TempDir::new("sec-node");
    let hub = Hub::start(tmp.path(), "");
    let c = creds(&hub);
    let mut a = Agent::start(tmp.path(), "node-a", Some(&hub.grpc_url()), "");
    wait_for("node-a connected", T, || {
        hub.node("node-a").filter(|n| n["status"]["connected"] == true)
    });

    // node-a's certificate and key, presented while claiming to be node-b.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let err = rt.block_on(async {
        let mut client = link_client(&hub, "node-a", &a.dir.join("state"), None, &c.ca_cert_hash).await;
        let hello = nodekeeper_proto::v1::AgentMessage {
            body: Some(nodekeeper_proto::v1::agent_message::Body::Hello(Box::new(
                nodekeeper_proto::v1::Hello {
                    node_name: "node-b".into(),
                    protocol: nodekeeper_proto::LINK_PROTOCOL,
                    ..Default::default()
                },
            ))),
        };
        let r = client
            .session(futures::stream::iter([hello]).chain(futures::stream::pending()))
            .await;
        match r {
            Ok(mut s) => s.get_mut().message().await.expect_err("refused"),
            Err(e) => e,
        }
    });
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(hub.node("node-b").is_none());
    assert!(refused(
        &audit(&hub, "actor=node:node-a"),
        "node:node-a",
        "cannot speak for node \"node-b\""
    ));

    // A node that joined properly may still neither ask the defender for a
    // permit for another node nor report another node's remedy job.
    let (m_token, _) = token(&hub, r#"{"type":"join","uses":1}"#);
    let m_dir = tmp.path().join("mallory");
    std::fs::create_dir_all(&m_dir).expect("dir");
    let permit_err = rt.block_on(async {
        use nodekeeper_proto::v1::{agent_message, hub_message, report};
        let mut client = link_client(&hub, "mallory", &m_dir, Some(&m_token), &c.ca_cert_hash).await;
        let permit_err = client
            .permit(nodekeeper_proto::v1::PermitRequest {
                op: "acquire".into(),
                action: "remedy/reboot".into(),
                node_name: "node-a".into(),
                ttl_seconds: 60,
                ..Default::default()
            })
            .await
            .expect_err("a permit for another node");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let hello = nodekeeper_proto::v1::Hello {
            node_name: "mallory".into(),
            protocol: nodekeeper_proto::LINK_PROTOCOL,
            ..Default::default()
        };
        let send = |body| nodekeeper_proto::v1::AgentMessage { body: Some(body) };
        tx.send(send(agent_message::Body::Hello(Box::new(hello))))
            .await
            .expect("send");
        let mut inbound = client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("mallory's own session")
            .into_inner();
        let sequence = loop {
            match inbound.message().await.expect("welcome").and_then(|m| m.body) {
                Some(hub_message::Body::Welcome(w)) => break w.report_sequence + 1,
                Some(_) => continue,
                None => panic!("the session ended before its welcome"),
            }
        };
        let forged = nodekeeper_proto::v1::Report {
            sequence,
            time: nodekeeper_proto::time::now_rfc3339(),
            body: Some(report::Body::Remedy(nodekeeper_proto::v1::RemedyJob {
                id: "forged-job".into(),
                node: "node-a".into(),
                rule: "reboot".into(),
                phase: "Succeeded".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let batch = nodekeeper_proto::v1::ReportBatch { reports: vec![forged] };
        tx.send(send(agent_message::Body::Reports(batch))).await.expect("send");
        // Acknowledged (resending cannot help), not taken.
        loop {
            match inbound.message().await.expect("ack").and_then(|m| m.body) {
                Some(hub_message::Body::ReportAck(a)) if a.sequence >= sequence => break,
                Some(_) => continue,
                None => panic!("the session ended before the report's ack"),
            }
        }
        permit_err
    });
    assert_eq!(permit_err.code(), tonic::Code::PermissionDenied, "{permit_err:?}");
    let mallory = audit(&hub, "actor=node:mallory");
    assert!(
        refused(&mallory, "node:mallory", "cannot ask for a permit for node \"node-a\""),
        "{mallory:?}"
    );
    assert!(
        refused(
            &mallory,
            "node:mallory",
            "cannot report remedy job \"forged-job\" of node \"node-a\""
        ),
        "{mallory:?}"
    );
    let jobs = hub.get("/v1/remedies").expect("remedies");
    assert!(
        !jobs.to_string().contains("forged-job"),
        "another node's job must not be taken: {jobs}"
    );

    // Another machine (another key) with a valid token cannot take the name.
    let thief_dir = tmp.path().join("other");
    std::fs::create_dir_all(&thief_dir).expect("dir");
    let thief = Agent::start(&thief_dir, "node-a", Some(&hub.grpc_url()), "");
    wait_for("the name is not taken over", T, || {
        last_error(&thief)
            .contains("already joined with another key")
            .then_some(())
    });
    drop(thief);

    // Revoked: the session ends, the certificate is refused, and the token
    // that joined the node cannot join it again.
    let out = hub.nkctl(&["node", "revoke", "node-a"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("node-a refused after revocation", T, || {
        let e = last_error(&a);
        (e.contains("revoked") || e.contains("join with a new token")).then_some(())
    });
    wait_for("node-a disconnected", T, || {
        hub.node("node-a").filter(|n| n["status"]["connected"] == false)
    });
    let entries = audit(&hub, "");
    assert!(
        entries.iter().any(|e| e["action"] == "revoke" && e["result"] == "ok"),
        "{entries:?}"
    );
    assert!(
        refused(&entries, "node:node-a", "revoked")
            || refused(
                &entries,
                &format!("join-token:{}", c.join_token.split('.').next().unwrap_or_default()),
                "revoked"
            ),
        "{entries:?}"
    );
    // With a new token it joins again.
    let (fresh, _) = token(&hub, r#"{"type":"join","uses":1}"#);
    a.terminate();
    std::fs::write(
        &a.config,
        std::fs::read_to_string(&a.config)
            .expect("config")
            .replace(&c.join_token, &fresh),
    )
    .expect("config");
    a.restart();
    wait_for("node-a joined again with a new token", T, || {
        hub.node("node-a").filter(|n| n["status"]["connected"] == true)
    });

    // Deleted by an operator, the name is free: another machine, with
    // another key, joins as node-a.
    a.terminate();
    let out = hub.nkctl(&["delete", "node", "node-a", "--force"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key_of = |dir: &Path| {
        let der = nodekeeper_proto::tls::read_certs(&dir.join("state/node.crt")).expect("node.crt");
        nodekeeper_proto::tls::cert_facts(&der[0]).expect("facts").spki_sha256
    };
    let heir_dir = tmp.path().join("heir");
    std::fs::create_dir_all(&heir_dir).expect("dir");
    let heir = Agent::start(&heir_dir, "node-a", Some(&hub.grpc_url()), "");
    wait_for("another machine joined as node-a after the delete", T, || {
        hub.node("node-a").filter(|n| n["status"]["connected"] == true)
    });
    assert_ne!(key_of(&heir.dir), key_of(&a.dir), "the heir joined with its own key");
}

use futures::StreamExt;

/// A Component is root code on every node it selects: the thing a viewer
/// must never push.
const COMPONENT: &str = "apiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {name: web}\nspec:\n  version: \"1\"\n  files: [{path: /etc/web.conf, template: x}]\n";

#[test]
fn the_operator_api_needs_a_token_with_a_role_and_every_mutation_is_audited() {
    let tmp = TempDir::new("sec-api");
    let hub = Hub::start(tmp.path(), "");
    let (code, body) = hub.request_as(None, "GET", "/v1/nodes", "").expect("request");
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("\"error\""), "{body}");
    let (code, body) = hub
        .request_as(Some("abcdef.0123456789abcdef"), "GET", "/v1/nodes", "")
        .expect("request");
    assert_eq!(code, 401, "{body}");
    let (viewer, _) = token(&hub, r#"{"type":"api","role":"viewer","name":"dash"}"#);
    let (operator, _) = token(&hub, r#"{"type":"api","role":"operator","name":"ci"}"#);
    assert_eq!(
        hub.request_as(Some(&viewer), "GET", "/v1/nodes", "").expect("get").0,
        200
    );
    let (code, body) = hub
        .request_as(Some(&viewer), "POST", "/v1/apply", COMPONENT)
        .expect("apply");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("needs operator"), "{body}");
    let (code, _) = hub
        .request_as(Some(&viewer), "GET", "/v1/components/web", "")
        .expect("get");
    assert_eq!(code, 404, "the viewer's Component must not exist");
    let (code, body) = hub
        .request_as(Some(&operator), "POST", "/v1/apply", COMPONENT)
        .expect("apply");
    assert_eq!(code, 200, "{body}");
    let (code, _) = hub
        .request_as(Some(&operator), "GET", "/v1/tokens", "")
        .expect("tokens");
    assert_eq!(code, 403, "tokens are for admins");
    assert_eq!(
        hub.request_as(Some(&viewer), "GET", "/v1/audit", "").expect("audit").0,
        403
    );

    let all = audit(&hub, "");
    assert!(refused(&all, "unauthenticated", "no Authorization header"), "{all:?}");
    assert!(refused(&all, "unauthenticated", "is not known"), "{all:?}");
    assert!(refused(&all, "dash", "needs operator"), "{all:?}");
    let applied = audit(&hub, "actor=ci");
    let e = applied
        .iter()
        .find(|e| e["resource"] == "components/web")
        .expect("the apply is audited");
    assert_eq!(e["result"], "ok");
    assert!(!e["resourceVersion"].as_str().unwrap_or_default().is_empty(), "{e}");
    assert!(!e["time"].as_str().unwrap_or_default().is_empty(), "{e}");
    // nkctl reads the same log, filtered by actor.
    let out = hub.nkctl(&["get", "audit", "--actor", "ci", "--since", "1h"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("components/web") && !text.contains("dash"),
        "{text}"
    );
    // Tokens are listed without secrets.
    let out = hub.nkctl(&["token", "list", "-o", "json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"dash\"") && !text.contains(viewer.split('.').nth(1).expect("secret")),
        "{text}"
    );
    assert!(!text.contains("secretSha256"), "{text}");
}

#[test]
fn the_agent_checks_the_hub_ca_before_its_token_and_tls_ports_refuse_plaintext() {
    let tmp = TempDir::new("sec-tls");
    let hub = Hub::start(tmp.path(), "");
    let wrong_pin = format!("sha256:{}", "0".repeat(64));
    let (t, _) = token(&hub, r#"{"type":"join"}"#);
    let a = Agent::start(tmp.path(), "pinned", None, &joining(&hub, &t, &wrong_pin));
    wait_for("the agent refuses a hub whose CA is not the pinned one", T, || {
        last_error(&a).contains("caCertHash").then_some(())
    });
    let id = t.split('.').next().expect("id");
    assert!(
        audit(&hub, "action=join")
            .iter()
            .all(|e| e["actor"] != format!("join-token:{id}")),
        "the token never reached the hub"
    );
    // What the hub saw of it: a handshake the client broke off with an alert.
    let handshakes = |listener: &str, alert: bool| {
        audit(&hub, "action=tls.handshake").into_iter().any(|x| {
            x["resource"] == listener
                && x["result"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("refused") && r.contains("alert") == alert)
        })
    };
    wait_for("the agent's refusal of the hub's CA in the audit log", T, || {
        handshakes("listen.grpc", true).then_some(())
    });
    // Plaintext on both TLS ports.
    let plain = nodekeeper_e2e::http(&hub.http, "GET", "/v1/nodes", "");
    assert!(!matches!(plain, Ok((200, _))), "{plain:?}");
    let insecure = Agent::start(
        tmp.path(),
        "plain",
        None,
        &format!("hub: {{address: \"http://{}\", insecure: true}}\n", hub.grpc),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(insecure.status().is_some_and(|s| s["hub"]["connected"] == false));
    assert!(hub.node("plain").is_none());
    wait_for("plaintext refused on both listeners in the audit log", T, || {
        (handshakes("listen.http", false) && handshakes("listen.grpc", false)).then_some(())
    });
    // An agent refuses an http:// hub unless told it is insecure.
    let cfg = tmp.path().join("plain.yaml");
    std::fs::write(
        &cfg,
        format!(
            "nodeName: x\nstateDir: {}\nhub: {{address: \"http://{}\"}}\n",
            tmp.path().join("x").display(),
            hub.grpc
        ),
    )
    .expect("config");
    let out = std::process::Command::new(nodekeeper_e2e::bin("nodekeeper-agent"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("agent");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("hub.address") && err.contains("refuses an http:// hub"),
        "{err}"
    );
}

#[test]
fn protected_labels_come_only_from_the_join_token_and_operators() {
    let tmp = TempDir::new("sec-labels");
    let hub = Hub::start(tmp.path(), "protectedLabelKeys: [role]\n");
    let pin = creds(&hub).ca_cert_hash;
    let (t, _) = token(
        &hub,
        r#"{"type":"join","labels":{"role":"db","nodekeeper.io/pool":"p1"}}"#,
    );
    let _a = Agent::start(
        tmp.path(),
        "lab-node",
        None,
        &format!(
            "labels: {{role: web, nodekeeper.io/tier: gold, zone: a}}\n{}",
            joining(&hub, &t, &pin)
        ),
    );
    let node = wait_for("lab-node registered", T, || hub.node("lab-node"));
    let labels = &node["metadata"]["labels"];
    assert_eq!(labels["role"], "db", "{labels}");
    assert_eq!(labels["nodekeeper.io/pool"], "p1", "{labels}");
    assert_eq!(labels["zone"], "a", "{labels}");
    assert!(labels.get("nodekeeper.io/tier").is_none(), "{labels}");
    // Still reported as the agent's own claim.
    assert_eq!(node["status"]["agentLabels"]["role"], "web");
    let entries = audit(&hub, "action=labels.claim");
    assert!(refused(&entries, "node:lab-node", "role"), "{entries:?}");
    assert!(refused(&entries, "node:lab-node", "nodekeeper.io/tier"), "{entries:?}");
}

/// A minisign key (public key line) and a signer over BLAKE2b-512 of a file.
struct Minisign {
    kp: ring::signature::Ed25519KeyPair,
    id: [u8; 8],
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

impl Minisign {
    fn new() -> Minisign {
        let rng = ring::rand::SystemRandom::new();
        let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
        let kp = ring::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).expect("key");
        Minisign { kp, id: *b"nktestk1" }
    }

    fn public(&self) -> String {
        let mut v = b"Ed".to_vec();
        v.extend_from_slice(&self.id);
        v.extend_from_slice(self.kp.public_key().as_ref());
        b64(&v)
    }

    /// A minisign signature file (prehashed, as minisign makes by default).
    fn sign(&self, file: &Path) -> String {
        use blake2::Digest;
        let data = std::fs::read(file).expect("read");
        let hash = blake2::Blake2b512::digest(&data);
        let sig = self.kp.sign(&hash);
        let mut line = b"ED".to_vec();
        line.extend_from_slice(&self.id);
        line.extend_from_slice(sig.as_ref());
        let trusted = "timestamp:0\tfile:artifact";
        let mut global = sig.as_ref().to_vec();
        global.extend_from_slice(trusted.as_bytes());
        let g = self.kp.sign(&global);
        format!(
            "untrusted comment: signature from a test key\n{}\ntrusted comment: {trusted}\n{}\n",
            b64(&line),
            b64(g.as_ref())
        )
    }
}

#[test]
fn artifacts_without_a_valid_signature_or_from_elsewhere_are_refused_before_anything_changes() {
    let tmp = TempDir::new("sec-sign");
    let d = tmp.path();
    let www = d.join("www");
    std::fs::create_dir_all(&www).expect("www");
    let server = FileServer::start(&www);
    let hub = Hub::start(d, "");
    let mini = Minisign::new();
    let rng = ring::rand::SystemRandom::new();
    let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("key");
    let plain = ring::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).expect("key");
    let other = Minisign::new();
    let allowed = server.url(&www.join("x")).trim_end_matches('x').to_string();
    let agent = Agent::start(
        d,
        "signed",
        Some(&hub.grpc_url()),
        &format!(
            "converge: {{intervalSeconds: 1, requireSignatures: true, trustedKeys: [\"{}\", \"{}\"], allowedArtifactUrls: [\"{allowed}\"]}}\n",
            mini.public(),
            b64(plain.public_key().as_ref())
        ),
    );
    let out_dir = d.join("installed");
    let component = |name: &str, file: &Path, url: String, signature: Option<String>| {
        let sig = signature
            .map(|s| format!(", signature: {}", serde_json::to_string(&s).expect("json")))
            .unwrap_or_default();
        format!(
            "apiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {{name: {name}}}\nspec:\n  version: \"1\"\n  artifact:\n    file: {{url: \"{url}\", sha256: \"{}\", path: \"{}\"{sig}}}\n",
            sha256(file),
            out_dir.join(name).display()
        )
    };
    let file = |name: &str| {
        let p = www.join(name);
        std::fs::write(&p, format!("#!/bin/sh\necho {name}\n")).expect("write");
        p
    };
    let apply = |yaml: &str| {
        let out = nkctl(&hub.http_url(), None, &["apply", "-f", "-"], Some(yaml));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let cases: Vec<(&str, String, &str)> = {
        let unsigned = file("unsigned");
        let forged = file("forged");
        let mini_ok = file("mini-ok");
        let plain_ok = file("plain-ok");
        let elsewhere = file("elsewhere");
        let foreign_url = server.url(&elsewhere).replace("127.0.0.1", "localhost");
        vec![
            (
                "unsigned",
                component("unsigned", &unsigned, server.url(&unsigned), None),
                "has no signature",
            ),
            (
                "forged",
                component("forged", &forged, server.url(&forged), Some(other.sign(&forged))),
                "does not verify",
            ),
            (
                "mini-ok",
                component("mini-ok", &mini_ok, server.url(&mini_ok), Some(mini.sign(&mini_ok))),
                "",
            ),
            (
                "plain-ok",
                component(
                    "plain-ok",
                    &plain_ok,
                    server.url(&plain_ok),
                    Some(b64(plain.sign(&std::fs::read(&plain_ok).expect("read")).as_ref())),
                ),
                "",
            ),
            (
                "elsewhere",
                component("elsewhere", &elsewhere, foreign_url, Some(mini.sign(&elsewhere))),
                "allowedArtifactUrls",
            ),
        ]
    };
    for (_, yaml, _) in &cases {
        apply(yaml);
    }
    for (name, _, why) in &cases {
        let c = wait_for(&format!("{name} settled"), T, || {
            agent
                .component(name)
                .filter(|c| c["phase"] == "Done" || c["phase"] == "Failed")
        });
        if why.is_empty() {
            assert_eq!(c["phase"], "Done", "{c}");
            assert!(out_dir.join(name).is_file(), "{name} installed");
        } else {
            assert_eq!(c["phase"], "Failed", "{c}");
            assert_eq!(c["reason"], "ArtifactRefused", "{c}");
            assert!(c.to_string().contains(why), "{name}: {c}");
            assert!(!out_dir.join(name).exists(), "{name} must not be installed");
        }
    }
    // Each refusal reaches the hub's audit log as the node's, once: the
    // agent retries a failed preparation, and a retry refused again for the
    // same reason is not a new entry.
    let refusals = |name: &str| {
        audit(&hub, "action=artifact&actor=node:signed")
            .into_iter()
            .filter(|e| e["resource"] == format!("components/{name}"))
            .collect::<Vec<_>>()
    };
    for (name, _, why) in &cases {
        if why.is_empty() {
            continue;
        }
        wait_for(&format!("{name}'s refusal in the audit log"), T, || {
            refused(&refusals(name), "node:signed", why).then_some(())
        });
    }
    wait_for("the unsigned artifact refused again by a retry", T, || {
        let (_, body) = nodekeeper_e2e::http_unix(&agent.socket, "GET", "/v1/events", "").ok()?;
        let events: Value = serde_json::from_str(&body).ok()?;
        events["items"]
            .as_array()?
            .iter()
            .any(|e| {
                e["message"].as_str().is_some_and(|m| m.contains("component unsigned:"))
                    && e["count"].as_u64().is_some_and(|n| n >= 2)
            })
            .then_some(())
    });
    wait_for("the hub has the agent's reports up to the retry", T, || {
        let seq = agent.status()?["outbox"]["lastSequence"].as_u64()?;
        hub.node("signed")
            .filter(|n| n["status"]["reportSequence"].as_u64() >= Some(seq))
    });
    for (name, _, why) in &cases {
        let n = refusals(name).len();
        assert_eq!(n, usize::from(!why.is_empty()), "{name}: {:?}", refusals(name));
    }
}

#[test]
fn certificates_are_renewed_while_the_agent_stays_connected_and_no_report_is_lost() {
    let tmp = TempDir::new("sec-renew");
    let hub = Hub::start(tmp.path(), "tls: {nodeCertificateTtl: 12s}\n");
    let agent = Agent::start(tmp.path(), "renewing", Some(&hub.grpc_url()), "");
    wait_for("connected", T, || {
        agent.status().filter(|s| s["hub"]["connected"] == true)
    });
    let crt = agent.dir.join("state/node.crt");
    let serial = |p: &Path| {
        let der = nodekeeper_proto::tls::read_certs(p).expect("cert");
        nodekeeper_proto::tls::cert_facts(&der[0]).expect("facts")
    };
    let first = serial(&crt);
    let mut last = 0;
    // Reports keep flowing through two renewals and past the first
    // certificate's expiry.
    let until = first.not_after + Duration::from_secs(4);
    while std::time::SystemTime::now() < until {
        last = agent.event("RenewProbe", "while renewing");
        std::thread::sleep(Duration::from_millis(250));
    }
    let now = serial(&crt);
    assert_ne!(now.serial, first.serial, "renewed");
    assert_eq!(now.spki_sha256, first.spki_sha256, "same key");
    let st = agent.status().expect("status");
    assert_eq!(st["hub"]["sessions"], 1, "renewal needs no reconnect: {st}");
    assert_eq!(st["hub"]["connected"], true);
    wait_for("every report at the hub", T, || {
        hub.node("renewing")
            .filter(|n| n["status"]["reportSequence"].as_u64() >= Some(last))
    });
    let entries = audit(&hub, "action=certificate.renew");
    assert!(
        entries.iter().filter(|e| e["result"] == "ok").count() >= 1,
        "{entries:?}"
    );
}

/// Runs openssl with `args` and no input; (success, stdout and stderr).
fn openssl(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl (scripts/test.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text.into_owned())
}

/// A CA and a serving certificate made the way an operator makes them:
/// with the openssl command line, P-256 keys in PKCS#8.
fn operator_pki(dir: &Path) {
    std::fs::create_dir_all(dir).expect("pki dir");
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n",
    )
    .expect("ext");
    let key = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
    for cmd in [
        format!(
            "req -x509 {key} -keyout ca.key -out ca.crt -days 30 -subj /CN=operator-CA -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
        ),
        format!("req {key} -keyout hub.key -out hub.csr -subj /CN=operator-hub"),
        "x509 -req -in hub.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 -extfile ext.cnf -out hub.crt".into(),
    ] {
        // Every file name is relative to `dir`.
        let args: Vec<String> = cmd
            .split_whitespace()
            .map(|a| match a {
                "ca.key" | "ca.crt" | "hub.key" | "hub.csr" | "hub.crt" | "ext.cnf" => {
                    dir.join(a).display().to_string()
                }
                _ => a.to_string(),
            })
            .collect();
        let (ok, text) = openssl(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(ok, "openssl {cmd}: {text}");
    }
}

#[test]
fn the_hub_serves_an_operators_certificates_over_tls_1_3_only_and_agents_trust_a_ca_file() {
    let tmp = TempDir::new("sec-pki");
    let pki = tmp.path().join("pki");
    operator_pki(&pki);
    // The harness reads the CA from stateDir/ca.crt, so the operator's CA
    // file is put there; the key, the serving certificate and its key stay
    // in the operator's directory.
    let state = tmp.path().join("hub/state");
    std::fs::create_dir_all(&state).expect("state");
    std::fs::copy(pki.join("ca.crt"), state.join("ca.crt")).expect("ca");
    let tls = format!(
        "tls: {{caFile: \"{}\", certFile: \"{}\", keyFile: \"{}\", caKeyFile: \"{}\"}}\n",
        state.join("ca.crt").display(),
        pki.join("hub.crt").display(),
        pki.join("hub.key").display(),
        pki.join("ca.key").display()
    );
    let mut hub = Hub::start(tmp.path(), &tls);
    let c = creds(&hub);
    let ca = nodekeeper_proto::tls::read_certs(&pki.join("ca.crt")).expect("ca");
    assert_eq!(
        c.ca_cert_hash,
        nodekeeper_proto::tls::spki_pin(&ca[0]).expect("pin"),
        "the hub's pin is the operator's CA"
    );
    for made in ["ca.key", "hub.crt", "hub.key"] {
        assert!(!state.join(made).exists(), "the hub made its own {made}");
    }
    // A real OpenSSL client: the operator's serving certificate over TLS
    // 1.3 on both listeners, and no TLS 1.2 at all.
    let ca_path = pki.join("ca.crt").display().to_string();
    for addr in [&hub.http, &hub.grpc] {
        let (ok, text) = openssl(&[
            "s_client",
            "-connect",
            addr,
            "-tls1_3",
            "-CAfile",
            &ca_path,
            "-verify_return_error",
            "-brief",
        ]);
        assert!(ok, "{addr}: {text}");
        assert!(
            text.contains("TLSv1.3") && text.contains("operator-hub"),
            "{addr}: {text}"
        );
        let (ok, text) = openssl(&["s_client", "-connect", addr, "-tls1_2", "-CAfile", &ca_path, "-brief"]);
        assert!(!ok, "{addr} accepted TLS 1.2: {text}");
        assert!(text.contains("alert protocol version"), "{addr}: {text}");
    }

    // An agent trusting the CA file and reading its token from a file joins
    // with a certificate the operator's CA signed.
    let token_file = tmp.path().join("join.token");
    std::fs::write(&token_file, format!("{}\n", c.join_token)).expect("token file");
    let agent = Agent::start(
        tmp.path(),
        "by-file",
        None,
        &format!(
            "hub: {{address: \"{}\", bootstrapTokenFile: \"{}\", caFile: \"{ca_path}\"}}\n",
            hub.grpc_url(),
            token_file.display()
        ),
    );
    wait_for("by-file connected", T, || {
        hub.node("by-file").filter(|n| n["status"]["connected"] == true)
    });
    let node_crt = agent.dir.join("state/node.crt").display().to_string();
    let (ok, text) = openssl(&["verify", "-CAfile", &ca_path, &node_crt]);
    assert!(ok, "{text}");

    // Without the CA key the hub still serves, and the nodes it has keep
    // their sessions, but it cannot sign: joining is refused, saying why.
    hub.terminate();
    let config = std::fs::read_to_string(&hub.config).expect("config");
    let without_key = config.replace(&format!(", caKeyFile: \"{}\"", pki.join("ca.key").display()), "");
    assert_ne!(config, without_key);
    std::fs::write(&hub.config, without_key).expect("config");
    hub.restart();
    wait_for("by-file back on its certificate", T, || {
        hub.node("by-file").filter(|n| n["status"]["connected"] == true)
    });
    let (t, _) = token(&hub, r#"{"type":"join"}"#);
    let late = Agent::start(tmp.path(), "late", None, &joining(&hub, &t, &c.ca_cert_hash));
    wait_for("joining refused without the CA key", T, || {
        last_error(&late).contains("tls.caKeyFile").then_some(())
    });
    assert!(hub.node("late").is_none());
}

/// The value after `key:` in nkctl's created-token output.
fn field(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {key} in {text}"))
}

#[test]
fn nkctl_creates_lists_and_deletes_tokens_and_finds_its_credentials_in_flags_env_or_its_config_file() {
    let tmp = TempDir::new("sec-nkctl");
    let hub = Hub::start(tmp.path(), "");
    let c = creds(&hub);
    let ok = |out: &std::process::Output| {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // A join token with every flag: printed once with the CA's pin.
    let text = ok(&hub.nkctl(&[
        "token",
        "create",
        "join",
        "--ttl",
        "2h",
        "--uses",
        "1",
        "--labels",
        "pool=gpu,zone=b",
        "--description",
        "rack 7",
    ]));
    let join = field(&text, "token:");
    let (id, secret) = join.split_once('.').expect("<id>.<secret>");
    let lower_alnum = |s: &str| s.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit());
    assert!(
        id.len() == 6 && secret.len() == 16 && lower_alnum(id) && lower_alnum(secret),
        "{join}"
    );
    let pin = field(&text, "caCertHash:");
    assert_eq!(pin, c.ca_cert_hash);
    let hex = pin.strip_prefix("sha256:").expect("sha256:");
    assert!(hex.len() == 64 && hex.chars().all(|ch| ch.is_ascii_hexdigit()), "{pin}");
    let row = |list: &str, id: &str| {
        list.lines()
            .find(|l| l.starts_with(id))
            .map(String::from)
            .unwrap_or_default()
    };
    let list = ok(&hub.nkctl(&["token", "list"]));
    let r = row(&list, id);
    assert!(
        r.contains("join") && r.contains("rack 7") && r.contains("pool=gpu") && r.contains("0/1"),
        "{list}"
    );
    assert!(!list.contains(secret), "a secret listed: {list}");

    // The node that joins with it has the token's labels; the token is used up.
    let _a = Agent::start(tmp.path(), "gpu-1", None, &joining(&hub, &join, &pin));
    wait_for("gpu-1 joined with the token's labels", T, || {
        hub.node("gpu-1")
            .filter(|n| n["metadata"]["labels"]["pool"] == "gpu" && n["metadata"]["labels"]["zone"] == "b")
    });
    assert!(row(&ok(&hub.nkctl(&["token", "list"])), id).contains("1/1"));

    // An API token, used by flag, by environment and from the config file.
    let text = ok(&hub.nkctl(&[
        "token", "create", "api", "--role", "viewer", "--name", "dash", "--ttl", "1h",
    ]));
    let viewer = field(&text, "token:");
    assert_eq!(field(&text, "role:"), "viewer");
    let (ca, url) = (c.ca.display().to_string(), hub.http_url());
    let by_flag = nkctl_as(
        &[],
        &["--hub", &url, "--token", &viewer, "--ca", &ca, "get", "nodes"],
        None,
    );
    assert!(ok(&by_flag).contains("gpu-1"));
    let env = [("NODEKEEPER_TOKEN", viewer.as_str()), ("NODEKEEPER_CA", ca.as_str())];
    assert!(ok(&nkctl_as(&env, &["--hub", &url, "get", "nodes"], None)).contains("gpu-1"));
    let refused = nkctl_as(&env, &["--hub", &url, "apply", "-f", "-"], Some(COMPONENT));
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("needs operator"),
        "{refused:?}"
    );
    let cfg_dir = tmp.path().join("home");
    std::fs::create_dir_all(&cfg_dir).expect("dir");
    let token_file = cfg_dir.join("viewer.token");
    std::fs::write(&token_file, format!("{viewer}\n")).expect("token");
    let cfg = cfg_dir.join("nkctl.yaml");
    std::fs::write(
        &cfg,
        format!(
            "hub: {}\ntokenFile: {}\nca: {ca}\n",
            hub.http_url(),
            token_file.display()
        ),
    )
    .expect("config");
    let cfg_env = [("NKCTL_CONFIG", cfg.to_str().expect("path"))];
    assert!(ok(&nkctl_as(&cfg_env, &["get", "nodes"], None)).contains("gpu-1"));
    // Without any of them: a clear refusal, not a crash.
    let bare = nkctl_as(
        &[("NODEKEEPER_CA", ca.as_str())],
        &["--hub", &url, "get", "nodes"],
        None,
    );
    assert!(!bare.status.success());
    assert!(
        String::from_utf8_lossy(&bare.stderr).contains("no Authorization header"),
        "{bare:?}"
    );

    // Deleted tokens are gone: the viewer is refused, the join token unlisted.
    let viewer_id = viewer.split('.').next().expect("id");
    for t in [viewer_id, id] {
        assert!(ok(&hub.nkctl(&["token", "delete", t])).contains(&format!("token/{t} deleted")));
    }
    let after = nkctl_as(&cfg_env, &["get", "nodes"], None);
    assert!(!after.status.success());
    let why = String::from_utf8_lossy(&after.stderr);
    assert!(why.contains(&format!("token {viewer_id} is not known")), "{why}");
    let list = ok(&hub.nkctl(&["token", "list"]));
    assert!(row(&list, id).is_empty() && row(&list, viewer_id).is_empty(), "{list}");
}

#[test]
fn plaintext_mode_is_warned_about_at_every_start_of_hub_and_agent() {
    let tmp = TempDir::new("sec-insecure");
    let hub_warning = "insecure: true — plaintext listeners and NO authentication";
    let agent_warning = "hub.insecure: plaintext link without identity; for labs only";
    let mut hub = Hub::start(tmp.path(), "insecure: true\n");
    let mut a = Agent::start(tmp.path(), "lab", Some(&hub.grpc_url()), "");
    wait_for("lab connected", T, || {
        hub.node("lab").filter(|n| n["status"]["connected"] == true)
    });
    assert!(hub.log().contains(hub_warning), "{}", hub.log());
    hub.terminate();
    a.terminate();
    hub.restart();
    a.restart();
    wait_for("lab connected again", T, || {
        hub.node("lab").filter(|n| n["status"]["connected"] == true)
    });
    assert!(hub.log().contains(hub_warning), "the second start: {}", hub.log());
    assert_eq!(a.log().matches(agent_warning).count(), 2, "{}", a.log());
    // A hub serving TLS says nothing of the kind.
    let secure = Hub::start(&tmp.path().join("secure"), "");
    assert!(!secure.log().contains(hub_warning), "{}", secure.log());
}
