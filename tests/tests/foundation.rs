//! The foundation slice, end to end with the real binaries: an agent
//! registers with a hub, desired state flows down, reports flow up exactly
//! once across crashes of either side, and bad input is refused clearly.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use nix::sys::signal::Signal;
use nodekeeper_e2e::{Agent, Hub, TempDir, event_count, http, nkctl, ready, wait_for};

const T: Duration = Duration::from_secs(30);

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn agent_registers_and_node_is_visible_over_http_and_in_nkctl() {
    let tmp = TempDir::new("register");
    let hub = Hub::start(tmp.path(), "");
    let agent = Agent::start(
        tmp.path(),
        "node-reg",
        Some(&hub.grpc_url()),
        "labels: {zone: z1, rack: r7}\n",
    );

    let node = wait_for("node Ready at the hub", T, || {
        hub.node("node-reg").filter(|n| ready(n) == "True")
    });
    let facts = &node["status"]["facts"];
    assert_eq!(facts["bootId"].as_str().map(str::len), Some(36), "{facts}");
    assert!(facts["cpus"].as_u64().unwrap_or(0) >= 1);
    assert!(!facts["kernel"].as_str().unwrap_or("").is_empty());
    assert!(!facts["machineId"].as_str().unwrap_or("").is_empty());
    assert_eq!(facts["agentVersion"], env!("CARGO_PKG_VERSION"));
    assert_eq!(node["metadata"]["labels"]["zone"], "z1");
    assert_eq!(node["status"]["connected"], true);

    let list = hub.get("/v1/nodes").expect("list");
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1));
    let s = hub.summary();
    assert_eq!(
        (s["nodes"]["total"].as_u64(), s["nodes"]["ready"].as_u64()),
        (Some(1), Some(1))
    );

    let out = hub.nkctl(&["get", "nodes"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    let row = table
        .lines()
        .find(|l| l.starts_with("node-reg"))
        .unwrap_or_else(|| panic!("no row in:\n{table}"));
    assert!(row.split_whitespace().nth(1) == Some("Ready"), "{row}");

    // Label selectors, kubectl style.
    assert!(stdout(&hub.nkctl(&["get", "nodes", "-l", "zone=z1,rack"])).contains("node-reg"));
    let none = hub.nkctl(&["get", "nodes", "-l", "zone=elsewhere"]);
    assert!(stdout(&none).is_empty() && stderr(&none).contains("No resources found"));
    let (code, body) = hub
        .request("GET", "/v1/nodes?labelSelector=bad%20key", "")
        .expect("get");
    assert_eq!(code, 422, "{body}");
    let wide = stdout(&hub.nkctl(&["get", "nodes", "-o", "wide"]));
    assert!(wide.contains("KERNEL") && wide.contains("zone=z1"), "{wide}");
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&hub.nkctl(&["get", "node", "node-reg", "-o", "json"]))).expect("json");
    assert_eq!(json["metadata"]["name"], "node-reg");
    let yaml = stdout(&hub.nkctl(&["get", "node", "node-reg", "-o", "yaml"]));
    assert!(yaml.contains("name: node-reg"), "{yaml}");
    let desc = stdout(&hub.nkctl(&["describe", "node", "node-reg"]));
    assert!(
        desc.contains("Status:            Ready") && desc.contains("AgentStarted"),
        "{desc}"
    );
    // `nkctl ... | head` whose reader has gone: nkctl ends quietly (no panic,
    // no backtrace), as Unix tools do.
    for args in [&["describe", "node", "node-reg"][..], &["get", "nodes", "-o", "wide"]] {
        let c = hub.creds.clone().expect("secure hub");
        let mut child = std::process::Command::new(nodekeeper_e2e::bin("nkctl"))
            .args(["--hub", &hub.http_url(), "--token", &c.admin_token, "--ca"])
            .arg(&c.ca)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn nkctl");
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("nkctl");
        assert_eq!(stderr(&out), "", "nkctl {args:?} into a closed pipe");
        assert!(
            out.status.success() || std::os::unix::process::ExitStatusExt::signal(&out.status) == Some(13),
            "{:?}",
            out.status
        );
    }

    // The status socket: mode 0660, answers locally, also through nkctl.
    let mode = std::fs::metadata(&agent.socket).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let st = agent.status().expect("status");
    assert_eq!(st["nodeName"], "node-reg");
    assert_eq!(st["hub"]["connected"], true);
    let out = nkctl(&hub.http_url(), Some(&agent.socket), &["node", "status"], None);
    assert!(stdout(&out).contains("(connected)"), "{}", stdout(&out));
}

const PROFILE: &str = "apiVersion: nodekeeper.io/v1
kind: AgentProfile
metadata: {name: verbose}
spec:
  nodeSelector: {matchLabels: {zone: z1}}
  logLevel: debug
  heartbeatSeconds: 2
  labels: {team: storage}
---
apiVersion: nodekeeper.io/v1
kind: NodeSet
metadata: {name: zone-one}
spec:
  selector: {matchLabels: {zone: z1}}
";

#[test]
fn agent_profile_applied_reaches_the_agent_and_the_hub_shows_in_sync() {
    let tmp = TempDir::new("profile");
    let hub = Hub::start(tmp.path(), "");
    let a1 = Agent::start(tmp.path(), "node-p1", Some(&hub.grpc_url()), "labels: {zone: z1}\n");
    let a2 = Agent::start(tmp.path(), "node-p2", Some(&hub.grpc_url()), "labels: {zone: z2}\n");
    wait_for("both Ready", T, || (hub.summary()["nodes"]["ready"] == 2).then_some(()));

    let out = nkctl(&hub.http_url(), None, &["apply", "-f", "-"], Some(PROFILE));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("agentprofile/verbose created"),
        "{}",
        stdout(&out)
    );

    let st = wait_for("agent applies the profile", T, || {
        a1.status().filter(|s| s["settings"]["logLevel"] == "debug")
    });
    assert_eq!(st["settings"]["heartbeatSeconds"], 2);
    assert_eq!(st["settings"]["labels"]["team"], "storage");
    let rev = st["appliedRevision"].as_u64().expect("revision");
    // The other node is not selected and keeps the defaults.
    assert_eq!(a2.status().expect("status")["settings"]["logLevel"], "info");

    let node = wait_for("hub sees the applied revision", T, || {
        hub.node("node-p1")
            .filter(|n| n["status"]["appliedRevision"] == rev && n["status"]["desiredRevision"] == rev)
    });
    assert_eq!(node["metadata"]["labels"]["team"], "storage");
    let s = wait_for("summary inSync", T, || {
        Some(hub.summary()).filter(|s| s["nodes"]["inSync"] == 2)
    });
    assert_eq!(s["nodes"]["total"], 2);
    // Paging with a selector: pages fill with selected nodes only.
    let p1 = hub.get("/v1/nodes?labelSelector=zone&limit=1").expect("page 1");
    assert_eq!(p1["items"][0]["metadata"]["name"], "node-p1");
    assert_eq!(p1["metadata"]["continue"], "node-p1");
    let p2 = hub
        .get("/v1/nodes?labelSelector=zone&limit=1&continue=node-p1")
        .expect("page 2");
    assert_eq!(p2["items"][0]["metadata"]["name"], "node-p2");
    assert!(p2["metadata"].get("continue").is_none(), "{p2}");
    let sel = hub.get("/v1/nodes?labelSelector=zone%3Dz2&limit=1").expect("selected");
    assert_eq!(sel["items"].as_array().map(Vec::len), Some(1));
    assert!(sel["metadata"].get("continue").is_none(), "{sel}");
    let ap = hub.get("/v1/agentprofiles/verbose").expect("profile");
    assert_eq!(ap["status"]["selectedNodes"], 1);
    assert_eq!(ap["metadata"]["generation"], 1);
    let ns = hub.get("/v1/nodesets/zone-one").expect("nodeset");
    assert_eq!(ns["status"]["nodes"], 1);

    // The same document again changes nothing.
    let out = nkctl(&hub.http_url(), None, &["apply", "-f", "-"], Some(PROFILE));
    assert!(
        stdout(&out).contains("agentprofile/verbose unchanged"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        hub.get("/v1/agentprofiles/verbose").expect("profile")["metadata"]["resourceVersion"],
        ap["metadata"]["resourceVersion"]
    );

    // A stale resourceVersion is refused; a current one is accepted and bumps generation.
    let rv = ap["metadata"]["resourceVersion"].as_str().expect("rv").to_string();
    let edit = |level: &str, rv: &str| {
        format!(
            "apiVersion: nodekeeper.io/v1\nkind: AgentProfile\nmetadata: {{name: verbose, resourceVersion: '{rv}'}}\nspec:\n  nodeSelector: {{matchLabels: {{zone: z1}}}}\n  logLevel: {level}\n  heartbeatSeconds: 2\n"
        )
    };
    let (code, body) = hub
        .request("POST", "/v1/agentprofiles", &edit("warn", &rv))
        .expect("post");
    assert_eq!(code, 200, "{body}");
    let (code, body) = hub
        .request("POST", "/v1/agentprofiles", &edit("trace", &rv))
        .expect("post");
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("metadata.resourceVersion"), "{body}");
    assert_eq!(
        hub.get("/v1/agentprofiles/verbose").expect("profile")["metadata"]["generation"],
        2
    );
    wait_for("agent applies warn", T, || {
        a1.status().filter(|s| s["settings"]["logLevel"] == "warn")
    });

    // Deleting the profile returns the node to the defaults.
    let out = hub.nkctl(&["delete", "agentprofile", "verbose"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("agent back to defaults", T, || {
        a1.status().filter(|s| s["settings"]["logLevel"] == "info")
    });
    wait_for("summary inSync after delete", T, || {
        (hub.summary()["nodes"]["inSync"] == 2).then_some(())
    });
}

#[test]
fn cached_desired_state_is_applied_at_start_when_the_hub_is_unreachable() {
    let tmp = TempDir::new("cached");
    let mut hub = Hub::start(tmp.path(), "");
    let mut agent = Agent::start(tmp.path(), "node-c", Some(&hub.grpc_url()), "labels: {zone: z1}\n");
    let out = nkctl(&hub.http_url(), None, &["apply", "-f", "-"], Some(PROFILE));
    assert!(out.status.success(), "{}", stderr(&out));
    let rev = wait_for("applied", T, || {
        agent.status().filter(|s| s["settings"]["logLevel"] == "debug")
    })["appliedRevision"]
        .clone();

    hub.kill9();
    agent.kill9();
    agent.restart();
    let st = agent.status().expect("status");
    assert_eq!(st["hub"]["connected"], false);
    assert_eq!(
        st["settings"]["logLevel"], "debug",
        "cached desired state applied without the hub"
    );
    assert_eq!(st["appliedRevision"], rev);
}

#[test]
fn hub_sigkill_and_restart_brings_the_agent_back_with_every_report_exactly_once() {
    let tmp = TempDir::new("hubkill");
    let mut hub = Hub::start(tmp.path(), "");
    let agent = Agent::start(tmp.path(), "node-h", Some(&hub.grpc_url()), "");
    wait_for("Ready", T, || hub.node("node-h").filter(|n| ready(n) == "True"));

    for _ in 0..20 {
        agent.event("BeforeCrash", "x");
    }
    wait_for("first reports at the hub", T, || {
        hub.node("node-h").filter(|n| event_count(n, "BeforeCrash") == 20)
    });
    // Acknowledged means committed at the hub.
    wait_for("first reports acknowledged", T, || {
        agent.status().filter(|s| s["outbox"]["pending"] == 0)
    });

    hub.kill9();
    wait_for("agent notices", T, || {
        agent.status().filter(|s| s["hub"]["connected"] == false)
    });
    let mut last = 0;
    for _ in 0..15 {
        last = agent.event("WhileDown", "y");
    }
    assert_eq!(agent.status().expect("status")["outbox"]["pending"], 15);

    hub.restart();
    let node = wait_for("agent back, Ready, all reports in", T, || {
        hub.node("node-h")
            .filter(|n| ready(n) == "True" && n["status"]["reportSequence"] == last)
    });
    assert_eq!(event_count(&node, "BeforeCrash"), 20, "no report counted twice");
    assert_eq!(event_count(&node, "WhileDown"), 15);
    assert_eq!(
        node["status"]["reportsReceived"], last,
        "each sequence number counted once"
    );
    wait_for("outbox drained", T, || {
        agent.status().filter(|s| s["outbox"]["pending"] == 0)
    });
    assert!(agent.status().expect("status")["hub"]["sessions"].as_u64() >= Some(2));
}

#[test]
fn agent_sigkill_while_hub_is_down_delivers_pending_reports_exactly_once() {
    let tmp = TempDir::new("agentkill");
    let mut hub = Hub::start(tmp.path(), "");
    let mut agent = Agent::start(tmp.path(), "node-k", Some(&hub.grpc_url()), "");
    wait_for("Ready", T, || hub.node("node-k").filter(|n| ready(n) == "True"));
    let acked = agent.event("Early", "e");
    wait_for("early report", T, || {
        hub.node("node-k").filter(|n| n["status"]["reportSequence"] == acked)
    });

    hub.kill9();
    let mut last = 0;
    for _ in 0..25 {
        last = agent.event("Pending", "p");
    }
    agent.kill9();
    hub.restart();
    agent.restart();

    let node = wait_for("pending reports arrive", T, || {
        hub.node("node-k")
            .filter(|n| n["status"]["reportSequence"].as_u64() > Some(last))
    });
    // The restart adds one AgentStarted report after `last`.
    assert_eq!(event_count(&node, "Pending"), 25, "every pending report exactly once");
    assert_eq!(event_count(&node, "Early"), 1);
    assert_eq!(event_count(&node, "AgentStarted"), 2);
    assert_eq!(node["status"]["reportsReceived"], node["status"]["reportSequence"]);
}

#[test]
fn ready_turns_unknown_without_heartbeats_and_back_when_they_resume() {
    let tmp = TempDir::new("ready");
    let hub = Hub::start(tmp.path(), "nodeMonitorGracePeriodSeconds: 1\n");
    let mut agent = Agent::start(tmp.path(), "node-r", Some(&hub.grpc_url()), "");
    wait_for("Ready", T, || hub.node("node-r").filter(|n| ready(n) == "True"));
    let profile =
        "apiVersion: nodekeeper.io/v1\nkind: AgentProfile\nmetadata: {name: fast}\nspec: {heartbeatSeconds: 1}\n";
    let out = nkctl(&hub.http_url(), None, &["apply", "-f", "-"], Some(profile));
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("fast heartbeats", T, || {
        agent.status().filter(|s| s["settings"]["heartbeatSeconds"] == 1)
    });

    // A frozen agent keeps its TCP connection open but stops heartbeating.
    agent.signal(Signal::SIGSTOP);
    let n = wait_for("Unknown after the grace period", T, || {
        hub.node("node-r").filter(|n| ready(n) == "Unknown")
    });
    let reason = n["status"]["conditions"][0]["reason"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert_eq!(reason, "NodeStatusUnknown");
    agent.signal(Signal::SIGCONT);
    wait_for("Ready again", T, || hub.node("node-r").filter(|n| ready(n) == "True"));

    // A stopped agent closes its link: Unknown at once.
    assert!(agent.terminate().success(), "agent exits 0 on SIGTERM");
    assert!(!agent.socket.exists(), "socket removed on clean shutdown");
    let n = wait_for("Unknown after disconnect", T, || {
        hub.node("node-r").filter(|n| ready(n) == "Unknown")
    });
    assert_eq!(n["status"]["connected"], false);
}

#[test]
fn standalone_agent_serves_its_socket_without_a_hub() {
    let tmp = TempDir::new("standalone");
    let mut agent = Agent::start(tmp.path(), "node-s", None, "");
    let st = agent.status().expect("status");
    assert_eq!(st["mode"], "standalone");
    assert!(st["hub"].is_null());
    agent.event("LocalOnly", "kept here");
    let out = nkctl("http://127.0.0.1:1", Some(&agent.socket), &["node", "events"], None);
    assert!(stdout(&out).contains("LocalOnly"), "{}", stdout(&out));
    assert_eq!(
        agent.status().expect("status")["outbox"]["pending"],
        0,
        "standalone queues nothing for a hub"
    );
    assert!(agent.terminate().success());
}

#[test]
fn bad_config_stops_each_daemon_at_start_naming_file_key_and_reason() {
    let tmp = TempDir::new("badconfig");
    let cases: &[(&str, &str, &str)] = &[
        ("nodekeeper-agent", "hub:\n  adress: http://x:1\n", "hub.adress"),
        ("nodekeeper-agent", "outbox: {maxReports: lots}\n", "outbox.maxReports"),
        ("nodekeeper-agent", "hub: {address: 'x:1'}\n", "hub.address"),
        ("nodekeeper-agent", "logLevel: chatty\n", "logLevel"),
        ("nodekeeper-agent", "stateDirr: /tmp\n", "stateDirr"),
        ("nodekeeper-hub", "listen: {grpc: nowhere}\n", "listen.grpc"),
        ("nodekeeper-hub", "store: {driver: etcd}\n", "store.driver"),
        (
            "nodekeeper-hub",
            "nodeMonitorGracePeriodSeconds: -1\n",
            "nodeMonitorGracePeriodSeconds",
        ),
    ];
    for (i, (program, text, key)) in cases.iter().enumerate() {
        let state = tmp.path().join(format!("state-{i}"));
        let cfg = tmp.path().join(format!("bad-{i}.yaml"));
        std::fs::write(&cfg, format!("stateDir: {}\n{text}", state.display())).expect("write");
        let out = std::process::Command::new(nodekeeper_e2e::bin(program))
            .arg("--config")
            .arg(&cfg)
            .output()
            .expect("run");
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{program} with {text:?}: {err}");
        assert!(
            err.contains(&cfg.display().to_string()) && err.contains(key),
            "{program} with {text:?}: {err}"
        );
        assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
        assert!(!state.exists(), "nothing created for a bad config");
    }
    // An explicitly named config that does not exist is an error too.
    let out = std::process::Command::new(nodekeeper_e2e::bin("nodekeeper-hub"))
        .args(["--config", "/nonexistent/hub.yaml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("/nonexistent/hub.yaml"));
}

#[test]
fn bad_resource_documents_are_refused_with_the_field_and_nothing_is_stored() {
    let tmp = TempDir::new("baddocs");
    let mut hub = Hub::start(tmp.path(), "");
    let good = "apiVersion: nodekeeper.io/v1\nkind: NodeSet\nmetadata: {name: fine}\nspec: {}\n";
    let cases: &[(&str, &str)] = &[
        (
            "apiVersion: nodekeeper.io/v1\nkind: AgentProfile\nmetadata: {name: p}\nspec: {heartbeatSeconds: 0}\n",
            "spec.heartbeatSeconds",
        ),
        (
            "apiVersion: nodekeeper.io/v1\nkind: AgentProfile\nmetadata: {name: p}\nspec: {logLvl: debug}\n",
            "spec.logLvl",
        ),
        (
            "apiVersion: nodekeeper.io/v1\nkind: NodeSet\nmetadata: {name: UPPER}\nspec: {}\n",
            "metadata.name",
        ),
        (
            "apiVersion: nodekeeper.io/v1\nkind: NodeSet\nmetadata: {name: s}\nspec: {selector: {matchExpressions: [{key: a, operator: Has}]}}\n",
            "spec.selector.matchExpressions[0].operator",
        ),
        (
            "apiVersion: nodekeeper.io/v2\nkind: NodeSet\nmetadata: {name: s}\nspec: {}\n",
            "apiVersion",
        ),
        ("kind: [oops\n", ""),
    ];
    for (doc, field) in cases {
        // Through nkctl: a good document followed by the bad one; the whole file is refused.
        let file = tmp.path().join("doc.yaml");
        std::fs::write(&file, format!("{good}---\n{doc}")).expect("write");
        let out = hub.nkctl(&["apply", "-f", file.to_str().expect("utf8")]);
        let err = stderr(&out);
        assert!(!out.status.success(), "{doc}");
        assert!(
            err.contains("doc.yaml") && err.contains("document 2") && err.contains(field),
            "{doc}: {err}"
        );
        // Straight to the API: 422 with the field.
        let (code, body) = hub
            .request("POST", "/v1/apply", &format!("{good}---\n{doc}"))
            .expect("post");
        assert_eq!(code, 422, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json error");
        assert_eq!(v["field"], *field, "{body}");
    }
    // A kind posted to another kind's path is refused too.
    let (code, body) = hub.request("POST", "/v1/agentprofiles", good).expect("post");
    assert_eq!(code, 422, "{body}");
    let (code, _) = hub.request("GET", "/v1/widgets", "").expect("get");
    assert_eq!(code, 404);

    let s = hub.summary();
    assert_eq!(s["resources"]["nodesets"], 0, "nothing half-applied: {s}");
    assert_eq!(s["resources"]["agentprofiles"], 0);
    // Nothing reached the store either.
    hub.kill9();
    hub.restart();
    assert_eq!(hub.summary()["resources"]["nodesets"], 0);
    let (code, _) = hub.request("GET", "/v1/nodesets/fine", "").expect("get");
    assert_eq!(code, 404);
}

#[test]
fn resources_survive_a_hub_restart_and_sigterm_exits_cleanly() {
    let tmp = TempDir::new("persist");
    let mut hub = Hub::start(tmp.path(), "");
    let out = nkctl(&hub.http_url(), None, &["apply", "-f", "-"], Some(PROFILE));
    assert!(out.status.success(), "{}", stderr(&out));
    let before = hub.get("/v1/agentprofiles/verbose").expect("profile");
    assert!(hub.terminate().success(), "hub exits 0 on SIGTERM");
    hub.restart();
    let after = hub.get("/v1/agentprofiles/verbose").expect("profile after restart");
    assert_eq!(before["metadata"], after["metadata"]);
    assert_eq!(before["spec"], after["spec"]);
    let table = stdout(&hub.nkctl(&["get", "nodesets"]));
    assert!(table.contains("zone-one") && table.contains("zone=z1"), "{table}");
}

#[test]
fn agent_tells_systemd_it_is_ready_and_pings_the_watchdog() {
    // The sd_notify protocol itself, without systemd: a datagram socket stands
    // in for systemd's notify socket (the booted-systemd test is in the
    // packaging suite).
    let tmp = TempDir::new("notify");
    let sock_path = tmp.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let path = sock_path.to_str().expect("utf8");
    let agent = Agent::start_env(
        tmp.path(),
        "node-n",
        None,
        "",
        &[("NOTIFY_SOCKET", path), ("WATCHDOG_USEC", "200000")],
    );
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !(seen.iter().any(|m: &String| m.contains("READY=1"))
        && seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2)
    {
        let n = sock.recv(&mut buf).expect("a notification from the agent");
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(agent.status().is_some());
}

#[test]
fn labels_an_agent_profile_adds_survive_a_hub_sigkill() {
    let tmp = TempDir::new("labels-restart");
    let mut hub = Hub::start(tmp.path(), "");
    let agent = Agent::start(tmp.path(), "node-l", Some(&hub.grpc_url()), "labels: {zone: z1}\n");
    wait_for("Ready", T, || hub.node("node-l").filter(|n| ready(n) == "True"));
    let out = nkctl(&hub.http_url(), None, &["apply", "-f", "-"], Some(PROFILE));
    assert!(out.status.success(), "{}", stderr(&out));
    let before = wait_for("profile applied and in sync", T, || {
        hub.node("node-l").filter(|n| {
            n["metadata"]["labels"]["team"] == "storage"
                && n["status"]["appliedRevision"] == n["status"]["desiredRevision"]
                && agent.status().is_some_and(|s| s["settings"]["logLevel"] == "debug")
        })
    });

    hub.kill9();
    hub.restart();
    // Straight from the store, before the agent is back: every derived field
    // is what a hub that never restarted shows.
    let loaded = hub.node("node-l").expect("node after restart");
    assert_eq!(
        loaded["metadata"], before["metadata"],
        "labels and metadata after restart"
    );
    assert_eq!(loaded["status"]["settings"], before["status"]["settings"]);
    // The revision may be a new one (when the fan-out's write had not been
    // committed before the SIGKILL, the settings are computed again at start
    // and revisions are never reused), but never an older one.
    assert!(loaded["status"]["desiredRevision"].as_u64() >= before["status"]["desiredRevision"].as_u64());
    let table = stdout(&hub.nkctl(&["get", "nodes", "-l", "team=storage"]));
    assert!(table.contains("node-l"), "{table}");
    // And once the agent reconnected.
    let back = wait_for("agent back", T, || {
        hub.node("node-l")
            .filter(|n| n["status"]["connected"] == true && ready(n) == "True")
    });
    assert_eq!(back["metadata"], before["metadata"]);
    let synced = wait_for("in sync again", T, || {
        hub.node("node-l")
            .filter(|n| n["status"]["appliedRevision"] == n["status"]["desiredRevision"])
    });
    assert_eq!(synced["status"]["settings"], before["status"]["settings"]);
    assert_eq!(synced["metadata"], before["metadata"]);
}

#[test]
fn metrics_listen_serves_metrics_and_health_only() {
    let tmp = TempDir::new("metrics-listen");
    let port = nodekeeper_e2e::free_port();
    let addr = format!("127.0.0.1:{port}");
    let agent = Agent::start(tmp.path(), "node-m", None, &format!("metrics: {{listen: '{addr}'}}\n"));
    let (code, body) = wait_for("metrics over TCP", T, || http(&addr, "GET", "/metrics", "").ok());
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("nodekeeper_agent"), "{body}");
    assert_eq!(http(&addr, "GET", "/healthz", "").expect("healthz").0, 200);
    // Nothing that reads node details or changes state is reachable over TCP.
    let event = r#"{"reason":"FromTheNetwork","message":"x"}"#;
    let (code, _) = http(&addr, "POST", "/v1/events", event).expect("post");
    assert_eq!(code, 404, "POST /v1/events must not be served on metrics.listen");
    for path in ["/v1/status", "/v1/events", "/v1/conditions", "/v1/components"] {
        assert_eq!(http(&addr, "GET", path, "").expect("get").0, 404, "{path}");
    }
    // The socket still serves them, and the refused POST recorded nothing.
    assert!(agent.status().is_some());
    let (code, events) = nodekeeper_e2e::http_unix(&agent.socket, "GET", "/v1/events", "").expect("events");
    assert_eq!(code, 200);
    assert!(
        events.contains("AgentStarted") && !events.contains("FromTheNetwork"),
        "{events}"
    );
}

#[test]
fn hub_killed_between_receiving_reports_and_committing_them_loses_and_doubles_nothing() {
    let tmp = TempDir::new("ackcommit");
    let mut hub = Hub::start(tmp.path(), "");
    let agent = Agent::start(tmp.path(), "node-ac", Some(&hub.grpc_url()), "");
    wait_for("Ready", T, || hub.node("node-ac").filter(|n| ready(n) == "True"));
    wait_for("start-up report acknowledged", T, || {
        agent.status().filter(|s| s["outbox"]["pending"] == 0)
    });
    hub.kill9();
    let mut last = 0;
    for _ in 0..10 {
        last = agent.event("InFlight", "sent to a hub that dies before committing");
    }
    // The next hub dies (SIGKILL, debug-build failpoint) after taking the
    // batch into memory and before its commit: no ack may have gone out.
    hub.set_env(&[("NODEKEEPER_FAILPOINT", "ingest-before-commit")]);
    hub.spawn();
    let status = hub
        .wait_exit(T)
        .expect("the failpoint kills the hub on the first batch");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "{status:?}"
    );
    assert!(hub.log().contains("failpoint"), "{}", hub.log());
    let st = agent.status().expect("status");
    assert_eq!(st["outbox"]["pending"], 10, "nothing was acknowledged: {st}");

    hub.set_env(&[]);
    hub.restart();
    let node = wait_for("every report in after the restart", T, || {
        hub.node("node-ac").filter(|n| n["status"]["reportSequence"] == last)
    });
    assert_eq!(event_count(&node, "InFlight"), 10, "resent once, counted once");
    assert_eq!(node["status"]["reportsReceived"], node["status"]["reportSequence"]);
    wait_for("outbox drained", T, || {
        agent.status().filter(|s| s["outbox"]["pending"] == 0)
    });
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn a_stalled_store_slows_ingest_down_instead_of_queueing_without_bound() {
    let tmp = TempDir::new("stall");
    let stall = tmp.path().join("stall");
    let mut hub = Hub::start(tmp.path(), "store: {maxQueuedWrites: 4}\n");
    hub.kill9();
    hub.set_env(&[("NODEKEEPER_FAILPOINT", &format!("store-stall={}", stall.display()))]);
    hub.restart();
    let hollow = nodekeeper_e2e::Hollow::start(tmp.path(), &hub.grpc_url(), 40);
    wait_for("all registered", T, || {
        (hub.summary()["nodes"]["connected"] == 40).then_some(())
    });
    wait_for("start-up reports acknowledged", T, || {
        (hollow.stats()["outboxPending"] == 0).then_some(())
    });
    // The disk stalls; 40 agents send 20 reports each, one batch at a time
    // (unbounded, that would queue 800 operations).
    std::fs::write(&stall, "").expect("stall");
    let mut max_queued = 0.0f64;
    for i in 0..40 {
        if i < 20 {
            hollow.burst(1);
        }
        std::thread::sleep(Duration::from_millis(50));
        let (_, m) = hub
            .request("GET", "/metrics", "")
            .expect("metrics answer while the store stalls");
        max_queued = max_queued.max(metric(&m, "nodekeeper_hub_store_queued").expect("gauge"));
    }
    let pending = hollow.stats()["outboxPending"].as_u64().expect("pending");
    assert!(pending > 0, "acks wait for the stalled store");
    // An apply waits for the stalled store without holding the fleet:
    // operators keep reading while it waits.
    let hub_url = hub.http_url();
    let applying = std::thread::spawn(move || nkctl(&hub_url, None, &["apply", "-f", "-"], Some(PROFILE)));
    std::thread::sleep(Duration::from_millis(300));
    for path in ["/v1/fleet/summary", "/v1/nodes?limit=5", "/v1/agentprofiles"] {
        let (code, _) = hub
            .request("GET", path, "")
            .expect("API answers while the store stalls");
        assert_eq!(code, 200, "{path}");
    }
    assert!(
        !applying.is_finished(),
        "the apply is committed only when the disk recovers"
    );
    // The bound holds for ingest; the few writes the hub itself makes
    // (Ready changes, sessions) are counted but bounded by the fleet size.
    assert!(max_queued <= 4.0 + 40.0, "queue grew to {max_queued}");
    // The disk recovers: everything arrives, exactly once.
    std::fs::remove_file(&stall).expect("unstall");
    let out = applying.join().expect("apply");
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("every report acknowledged", T, || {
        (hollow.stats()["outboxPending"] == 0).then_some(())
    });
    let nodes = hub.get("/v1/nodes").expect("nodes");
    for n in nodes["items"].as_array().expect("items") {
        assert_eq!(n["status"]["reportsReceived"], n["status"]["reportSequence"]);
    }
    assert_eq!(
        nodes["items"].as_array().map(|i| i
            .iter()
            .map(|n| n["status"]["reportsReceived"].as_u64().unwrap_or(0))
            .sum::<u64>()),
        hollow.stats()["reportsAssigned"].as_u64()
    );
}
