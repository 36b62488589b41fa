//! A rollout with real agents on separate hosts: six agents, each in its own
//! network namespace and with its own dpkg database and install directory
//! (overlays in a private mount namespace), installing a real .deb with the
//! real dpkg, fetched from a file server and told by a real hub that they
//! reach over veth links. Canary first, then NodeSets in order with the
//! silent period, maxUnavailable never exceeded (the nodes' phases sampled
//! throughout), a bad version paused at failureThreshold with those nodes
//! back on the old version, undo bringing every node back, and a partition
//! left alone.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nodekeeper_e2e::artifacts::{FileServer, build_deb, sha256};
use nodekeeper_e2e::lab::{HUB_ADDR, Hosts};
use nodekeeper_e2e::{Agent, Hub, TempDir, https, nkctl, wait_for};
use serde_json::Value;

const T: Duration = Duration::from_secs(120);
const NODES: usize = 6;

fn apply(hub: &Hub, yaml: &str) {
    let out = nkctl(&hub.http_url(), None, &["apply", "-f", "-"], Some(yaml));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn rollout(hub: &Hub) -> Value {
    hub.get("/v1/components/widget")
        .map(|c| c["status"]["rollout"].clone())
        .unwrap_or(Value::Null)
}

fn wait_phase(hub: &Hub, phase: &str) -> Value {
    let generation = hub
        .get("/v1/components/widget")
        .and_then(|c| c["status"]["revisions"].as_array()?.last()?.as_i64())
        .expect("the newest revision");
    wait_for(&format!("rollout revision {generation} {phase}"), T, || {
        Some(rollout(hub)).filter(|r| r["phase"] == phase && r["updateRevision"] == generation)
    })
}

/// The package version dpkg has on the node the agent runs on.
fn dpkg_version(agent: &Agent, pkg: &str) -> String {
    let pid = agent.pid().expect("agent running").to_string();
    let out = Command::new("nsenter")
        .args(["-t", &pid, "-m", "--", "dpkg-query", "-W", "-f", "${Version}", pkg])
        .output()
        .expect("nsenter");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Nodes' reported phases, sampled with wall-clock times.
#[derive(Default, Debug)]
struct Samples {
    /// (time, node, phase, generation)
    changes: Vec<(Instant, String, String, i64)>,
    max_changing_per_zone: BTreeMap<String, usize>,
}

fn start_sampler(
    hub: &Hub,
    zones: BTreeMap<String, String>,
) -> (Arc<AtomicBool>, Arc<Mutex<Samples>>, std::thread::JoinHandle<()>) {
    let creds = hub.creds.clone().expect("secure hub");
    let addr = hub.http.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let out = Arc::new(Mutex::new(Samples::default()));
    let (s, o) = (stop.clone(), out.clone());
    // Threads started from the test thread are in the hub's namespace too.
    let t = std::thread::spawn(move || {
        let mut last: BTreeMap<String, (String, i64)> = BTreeMap::new();
        while !s.load(Ordering::Relaxed) {
            if let Ok((200, body)) = https(&addr, &creds.ca, Some(&creds.admin_token), "GET", "/v1/nodes", "")
                && let Ok(v) = serde_json::from_str::<Value>(&body)
            {
                let now = Instant::now();
                let mut per_zone: BTreeMap<String, usize> = BTreeMap::new();
                let mut o = o.lock().unwrap_or_else(|p| p.into_inner());
                for n in v["items"].as_array().into_iter().flatten() {
                    let name = n["metadata"]["name"].as_str().unwrap_or_default().to_string();
                    let c = n["status"]["components"]
                        .as_array()
                        .and_then(|c| c.iter().find(|x| x["name"] == "widget"))
                        .cloned()
                        .unwrap_or(Value::Null);
                    let ph = c["phase"].as_str().unwrap_or_default().to_string();
                    let generation = c["generation"].as_i64().unwrap_or(0);
                    if ["Installing", "WritingFiles", "Restarting", "HealthCheck", "RollingBack"].contains(&ph.as_str())
                    {
                        *per_zone
                            .entry(zones.get(&name).cloned().unwrap_or_default())
                            .or_default() += 1;
                    }
                    if last.get(&name) != Some(&(ph.clone(), generation)) {
                        o.changes.push((now, name.clone(), ph.clone(), generation));
                        last.insert(name, (ph, generation));
                    }
                }
                for (z, c) in per_zone {
                    let m = o.max_changing_per_zone.entry(z).or_default();
                    *m = (*m).max(c);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    (stop, out, t)
}

#[test]
fn real_agents_on_separate_hosts_roll_a_deb_canary_first_zone_by_zone_pause_on_failures_undo_and_keep_a_partition() {
    let tmp = TempDir::new("rollout-real");
    let d = tmp.path();
    let hosts = Hosts::create("ro", NODES);
    hosts.enter_hub();

    // The package installs into one directory that every node overlays with
    // its own; its check script is the health gate.
    let shared = d.join("opt-widget");
    std::fs::create_dir_all(&shared).expect("install dir");
    let www = d.join("www");
    std::fs::create_dir_all(&www).expect("www");
    let pkg = format!("nk-roll-widget-{}", std::process::id());
    let bin = shared.join("bin/widget").to_string_lossy().into_owned();
    let check = shared.join("bin/check").to_string_lossy().into_owned();
    let deb = |v: &str, healthy: bool| {
        build_deb(
            &www,
            &pkg,
            &format!("{v}-1"),
            &[
                (&bin, &format!("#!/bin/sh\necho widget {v}\n"), 0o755),
                (
                    &check,
                    if healthy {
                        "#!/bin/sh\nexit 0\n"
                    } else {
                        "#!/bin/sh\necho broken >&2\nexit 1\n"
                    },
                    0o755,
                ),
            ],
        )
    };
    let debs = [deb("1.0", true), deb("2.0", true), deb("3.0", false), deb("4.0", true)];
    let server = FileServer::start_on(&www, "0.0.0.0");
    let hub = Hub::start_on(d, &format!("tls: {{serverNames: [\"{HUB_ADDR}\"]}}\n"), "0.0.0.0");
    let url = hub.grpc_url_at(HUB_ADDR);

    // Zone a: nodes 1-3, zone b: nodes 4-6.
    let mut agents = Vec::new();
    let mut zones = BTreeMap::new();
    for k in 0..NODES {
        let name = format!("host{}", k + 1);
        let zone = if k < 3 { "a" } else { "b" };
        zones.insert(name.clone(), zone.to_string());
        let node_dir = d.join(format!("overlay-{k}"));
        let wrap = hosts.wrap(
            k,
            &[
                (&node_dir.join("dpkg"), "/var/lib/dpkg"),
                (&node_dir.join("opt"), &shared.to_string_lossy()),
            ],
        );
        agents.push(Agent::start_wrapped(
            d,
            &name,
            Some(&url),
            &format!("labels: {{zone: {zone}, role: widget}}\nconverge: {{intervalSeconds: 1}}\n"),
            wrap,
        ));
    }
    wait_for("all six Ready", T, || {
        Some(hub.summary()).filter(|s| s["nodes"]["ready"] == NODES as u64)
    });

    let component = |version: &str, deb: &Path, strategy: &str| {
        format!(
            "apiVersion: nodekeeper.io/v1\nkind: NodeSet\nmetadata: {{name: a}}\nspec: {{selector: {{matchLabels: {{zone: a}}}}}}\n---\napiVersion: nodekeeper.io/v1\nkind: NodeSet\nmetadata: {{name: b}}\nspec: {{selector: {{matchLabels: {{zone: b}}}}}}\n---\napiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {{name: widget}}\nspec:\n  nodeSelector: {{matchLabels: {{role: widget}}}}\n  version: '{version}'\n  artifact:\n    deb: {{url: '{}', sha256: '{}'}}\n  health: {{exec: ['{check}'], periodSeconds: 1, gracePeriodSeconds: 2, timeoutSeconds: 2}}\n{strategy}",
            server.url_at(HUB_ADDR, deb),
            sha256(deb),
        )
    };

    // 1.0 everywhere at once.
    apply(
        &hub,
        &component("1.0", &debs[0], "  updateStrategy: {type: AllAtOnce}\n"),
    );
    wait_phase(&hub, "Complete");
    for a in &agents {
        assert_eq!(dpkg_version(a, &pkg), "1.0-1", "{}: its own dpkg has 1.0", a.name);
    }
    // The hosts' dpkg databases are their own: the machine's has no trace.
    let host_dpkg = Command::new("dpkg-query")
        .args(["-W", &pkg])
        .output()
        .expect("dpkg-query");
    assert!(!host_dpkg.status.success(), "the test machine's dpkg is untouched");

    // 2.0 rolling: one canary, zone a, 3 s of silence, zone b; one at a time.
    let rolling = "  updateStrategy:\n    rollingUpdate:\n      nodeSetOrder: [a, b]\n      canary: {nodes: 1, soakSeconds: 2}\n      maxUnavailable: 1\n      soakSeconds: 3\n      failureThreshold: 2\n";
    let (stop, samples, t) = start_sampler(&hub, zones.clone());
    apply(&hub, &component("2.0", &debs[1], rolling));
    let done = wait_phase(&hub, "Complete");
    stop.store(true, Ordering::Relaxed);
    let _ = t.join();
    let s = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
    for a in &agents {
        assert_eq!(dpkg_version(a, &pkg), "2.0-1", "{}", a.name);
    }
    assert_eq!(done["nodeSets"][0]["name"], "canary", "{done}");
    for (z, m) in &s.max_changing_per_zone {
        assert!(
            *m <= 1,
            "zone {z}: {m} nodes changing at once with maxUnavailable 1: {s:?}"
        );
    }
    let generation = done["updateRevision"].as_i64().expect("revision");
    let first_install = |node: &str| {
        s.changes
            .iter()
            .find(|(_, n, p, g)| n == node && p == "Installing" && *g == generation)
            .map(|x| x.0)
    };
    let done_at = |node: &str| {
        s.changes
            .iter()
            .find(|(_, n, p, g)| n == node && p == "Done" && *g == generation)
            .map(|x| x.0)
    };
    let starts: BTreeMap<String, Instant> = zones
        .keys()
        .filter_map(|n| Some((n.clone(), first_install(n)?)))
        .collect();
    assert_eq!(starts.len(), NODES, "every node seen installing: {s:?}");
    let canary = starts
        .iter()
        .min_by_key(|(_, t)| **t)
        .map(|(n, _)| n.clone())
        .expect("first");
    assert_eq!(canary, "host1", "the canary is the first node in order");
    let last_a = ["host1", "host2", "host3"]
        .iter()
        .filter_map(|n| done_at(n))
        .max()
        .expect("a done");
    let first_b = ["host4", "host5", "host6"]
        .iter()
        .filter_map(|n| starts.get(*n))
        .min()
        .expect("b started");
    assert!(
        *first_b >= last_a + Duration::from_millis(2500),
        "zone b waited the 3 s silent period after zone a: {:?}",
        first_b.duration_since(last_a)
    );
    let canary_done = done_at("host1").expect("canary done");
    let second = ["host2", "host3"]
        .iter()
        .filter_map(|n| starts.get(*n))
        .min()
        .expect("a started");
    assert!(
        *second >= canary_done + Duration::from_millis(1500),
        "the canary soaked 2 s first"
    );

    // 3.0 fails its health gate: after two failures the rollout stops
    // (Failed: no node took it) and those nodes are back on 2.0 in dpkg.
    apply(&hub, &component("3.0", &debs[2], rolling));
    let stopped = wait_phase(&hub, "Failed");
    assert!(
        stopped["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("failureThreshold 2"),
        "{stopped}"
    );
    let out = hub.nkctl(&["rollout", "status", "component/widget", "-w"]);
    assert_eq!(out.status.code(), Some(1), "status -w ends with 1 on a failed rollout");
    std::thread::sleep(Duration::from_secs(3));
    let mut failed = 0;
    for a in &agents {
        let v = dpkg_version(a, &pkg);
        assert_ne!(v, "3.0-1", "{}: no node stays on the bad version", a.name);
        assert_eq!(v, "2.0-1", "{}", a.name);
        if a.component("widget").is_some_and(|c| c["phase"] == "Failed") {
            failed += 1;
        }
    }
    assert_eq!(failed, 2, "two nodes failed and rolled back, the rest never started");

    // Undo: the previous revision (2.0) with the same strategy; every node
    // reports it done (the failed ones run it already).
    let out = hub.nkctl(&["rollout", "undo", "component/widget"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_phase(&hub, "Complete");
    for a in &agents {
        assert_eq!(dpkg_version(a, &pkg), "2.0-1", "{}", a.name);
        let c = a.component("widget").expect("component");
        assert_eq!(
            (c["phase"].as_str(), c["observedVersion"].as_str()),
            (Some("Done"), Some("2.0")),
            "{c}"
        );
    }

    // 4.0 with a partition of 2: the last two in order (host5, host6) stay.
    let partitioned = rolling.replace("failureThreshold: 2\n", "failureThreshold: 2\n      partition: 2\n");
    apply(&hub, &component("4.0", &debs[3], &partitioned));
    let done = wait_phase(&hub, "Complete");
    for a in &agents {
        let want = if a.name == "host5" || a.name == "host6" {
            "2.0-1"
        } else {
            "4.0-1"
        };
        assert_eq!(dpkg_version(a, &pkg), want, "{}: {done}", a.name);
    }
    let kept: u64 = done["nodeSets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| g["partitioned"].as_u64())
        .sum();
    assert_eq!(kept, 2, "{done}");
    // Each node asked the defender before it installed.
    let node = hub.node("host3").expect("node");
    assert!(
        node["status"]["recentEvents"]
            .as_array()
            .is_some_and(|e| e.iter().any(|x| x["reason"] == "PermitGranted")),
        "{node}"
    );
    drop(agents);
}

/// The defender's offline policy with real agents: a change waits for a
/// permit (frozen fleet), then with the hub gone the agent with
/// `defender.offline: deny` (the default) still makes no change while the
/// one with `allow` goes ahead; back online and unfrozen, the first one
/// changes too.
#[test]
fn without_the_hub_an_agent_makes_no_disruptive_change_unless_its_config_allows_it() {
    let tmp = TempDir::new("defender-offline");
    let d = tmp.path();
    let www = d.join("www");
    std::fs::create_dir_all(&www).expect("www");
    let artifact = www.join("tool-1.0");
    std::fs::write(&artifact, "#!/bin/sh\necho tool 1.0\n").expect("artifact");
    let server = FileServer::start(&www);
    let mut hub = Hub::start(d, "");
    let mut agents = Vec::new();
    for policy in ["deny", "allow"] {
        let extra = format!(
            "labels: {{policy: {policy}}}\nconverge: {{intervalSeconds: 1}}\n{}",
            if policy == "allow" {
                "defender: {offline: allow}\n"
            } else {
                ""
            }
        );
        agents.push(Agent::start(
            d,
            &format!("{policy}-node"),
            Some(&hub.grpc_url()),
            &extra,
        ));
    }
    wait_for("both Ready", T, || {
        Some(hub.summary()).filter(|s| s["nodes"]["ready"] == 2)
    });
    let out = hub.nkctl(&["freeze", "on", "--reason", "offline drill"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let target = |policy: &str| d.join(format!("{policy}-tool"));
    for policy in ["deny", "allow"] {
        apply(
            &hub,
            &format!(
                "apiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {{name: tool-{policy}}}\nspec:\n  nodeSelector: {{matchLabels: {{policy: {policy}}}}}\n  version: '1.0'\n  artifact: {{file: {{url: '{}', sha256: '{}', path: '{}'}}}}\n",
                server.url(&artifact),
                sha256(&artifact),
                target(policy).display()
            ),
        );
    }
    for (a, policy) in agents.iter().zip(["deny", "allow"]) {
        let c = wait_for("waiting for a permit", T, || {
            a.component(&format!("tool-{policy}")).filter(|c| {
                c["lastError"]
                    .as_str()
                    .is_some_and(|e| e.contains("waiting for a permit"))
            })
        });
        assert!(c["lastError"].as_str().unwrap_or_default().contains("frozen"), "{c}");
    }
    assert!(
        !target("deny").exists() && !target("allow").exists(),
        "nothing installed while frozen"
    );

    hub.kill9();
    wait_for("the allow node goes ahead without the hub", T, || {
        target("allow").exists().then_some(())
    });
    let c = wait_for("the deny node says why it waits", T, || {
        agents[0].component("tool-deny").filter(|c| {
            c["lastError"]
                .as_str()
                .is_some_and(|e| e.contains("defender.offline is deny"))
        })
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(!target("deny").exists(), "no permit, no change: {c}");
    assert_eq!(agents[1].component("tool-allow").expect("component")["phase"], "Done");

    hub.restart();
    std::thread::sleep(Duration::from_secs(2));
    assert!(!target("deny").exists(), "the freeze survived the hub restart");
    let out = hub.nkctl(&["freeze", "off"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("the deny node changed once permitted", T, || {
        target("deny").exists().then_some(())
    });
    wait_for("done", T, || {
        agents[0].component("tool-deny").filter(|c| c["phase"] == "Done")
    });
}
