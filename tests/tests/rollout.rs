//! Rollouts and the defender at scale, with hollow agents: the real hub and
//! the real link and permit code; only the component changes are simulated
//! (`nodekeeper-agent hollow --component-seconds`, a deterministic share of
//! nodes failing a new version). The same properties with real agents,
//! real packages and real dpkg are in `rollout_real.rs`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nodekeeper_e2e::{Hollow, Hub, TempDir, https, nkctl, wait_for};
use serde_json::Value;

const T: Duration = Duration::from_secs(180);

fn apply(hub: &Hub, yaml: &str) {
    let out = nkctl(&hub.http_url(), None, &["apply", "-f", "-"], Some(yaml));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn rollout(hub: &Hub, name: &str) -> Value {
    hub.get(&format!("/v1/components/{name}"))
        .map(|c| c["status"]["rollout"].clone())
        .unwrap_or(Value::Null)
}

fn node_sets(zones: usize) -> String {
    (0..zones)
        .map(|z| {
            format!(
                "apiVersion: nodekeeper.io/v1\nkind: NodeSet\nmetadata: {{name: z{z}}}\nspec: {{selector: {{matchLabels: {{zone: z{z}}}}}}}\n---\n"
            )
        })
        .collect()
}

fn component(version: &str, strategy: &str) -> String {
    format!(
        "apiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {{name: kubelet}}\nspec:\n  nodeSelector: {{matchLabels: {{hollow: 'true'}}}}\n  version: '{version}'\n  files: [{{path: /etc/hollow/kubelet.conf, template: 'v{version}'}}]\n{strategy}"
    )
}

/// One node as sampled: zone, and the component's reported phase,
/// generation and observed version.
#[derive(Debug, Clone, Default)]
struct Seen {
    zone: String,
    phase: String,
    generation: i64,
    observed: String,
}

fn sample(addr: &str, ca: &std::path::Path, token: &str) -> Option<BTreeMap<String, Seen>> {
    let (code, body) = https(addr, ca, Some(token), "GET", "/v1/nodes?limit=5000", "").ok()?;
    if code != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    let mut out = BTreeMap::new();
    for n in v["items"].as_array()? {
        let name = n["metadata"]["name"].as_str()?.to_string();
        let comp = n["status"]["components"]
            .as_array()
            .and_then(|c| c.iter().find(|x| x["name"] == "kubelet"))
            .cloned()
            .unwrap_or(Value::Null);
        out.insert(
            name,
            Seen {
                zone: n["metadata"]["labels"]["zone"].as_str().unwrap_or_default().to_string(),
                phase: comp["phase"].as_str().unwrap_or_default().to_string(),
                generation: comp["generation"].as_i64().unwrap_or(0),
                observed: comp["observedVersion"].as_str().unwrap_or_default().to_string(),
            },
        );
    }
    Some(out)
}

/// Samples the nodes' phases in the background: the most nodes being
/// changed at once (Installing or RollingBack), overall and per zone, and
/// when each node was first seen changing (sample index).
struct Sampler {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Samples>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default, Debug)]
struct Samples {
    n: u64,
    max_changing: usize,
    max_changing_per_zone: BTreeMap<String, usize>,
    first_changing: BTreeMap<String, u64>,
    last: BTreeMap<String, Seen>,
}

impl Sampler {
    fn start(hub: &Hub) -> Sampler {
        let creds = hub.creds.clone().expect("a secure hub");
        let addr = hub.http.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Samples::default()));
        let (s, out) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(nodes) = sample(&addr, &creds.ca, &creds.admin_token) {
                    let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
                    o.n += 1;
                    let n = o.n;
                    let mut per_zone: BTreeMap<String, usize> = BTreeMap::new();
                    let mut total = 0;
                    for (name, x) in &nodes {
                        if x.phase == "Installing" || x.phase == "RollingBack" {
                            total += 1;
                            *per_zone.entry(x.zone.clone()).or_default() += 1;
                            o.first_changing.entry(name.clone()).or_insert(n);
                        }
                    }
                    o.max_changing = o.max_changing.max(total);
                    for (z, c) in per_zone {
                        let m = o.max_changing_per_zone.entry(z).or_default();
                        *m = (*m).max(c);
                    }
                    o.last = nodes;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Sampler {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// Stops sampling and hands over what was seen.
    fn finish(mut self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Every node as the hub shows it now (None while the hub does not answer).
fn nodes_of(hub: &Hub) -> Option<BTreeMap<String, Seen>> {
    let c = hub.creds.as_ref().expect("a secure hub");
    sample(&hub.http, &c.ca, &c.admin_token)
}

/// How many nodes report `version` as observed.
fn on_version(hub: &Hub, version: &str) -> usize {
    nodes_of(hub).map_or(0, |n| n.values().filter(|x| x.observed == version).count())
}

/// Waits until the rollout of the Component's newest revision is in `phase`.
fn wait_phase(hub: &Hub, name: &str, phase: &str) -> Value {
    let generation = hub
        .get(&format!("/v1/components/{name}"))
        .and_then(|c| c["status"]["revisions"].as_array()?.last()?.as_i64())
        .expect("the newest revision");
    wait_for(&format!("rollout of {name} revision {generation} {phase}"), T, || {
        Some(rollout(hub, name)).filter(|r| r["phase"] == phase && r["updateRevision"] == generation)
    })
}

fn metric(hub: &Hub, name: &str, labels: &str) -> f64 {
    let (_, body) = hub.request("GET", "/metrics", "").expect("metrics");
    body.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// 1,000 hollow nodes in 4 zones: a first version everywhere at once, then
/// a rolling update canary first and zone by zone within a budget, some
/// nodes failing it; a bad version pausing at its failure threshold with
/// those nodes back on the old version; undo bringing every node back.
#[test]
fn a_thousand_nodes_roll_canary_first_zone_by_zone_within_budgets_pause_on_failures_and_undo() {
    const N: usize = 1000;
    let tmp = TempDir::new("rollout-scale");
    let hub = Hub::start(tmp.path(), "");
    let _hollow = Hollow::start_with(
        tmp.path(),
        &hub.grpc_url(),
        N,
        &[
            "--zones",
            "4",
            "--component-seconds",
            "500ms",
            "--component-failure-percent",
            "3",
        ],
    );
    wait_for("all Ready", T, || {
        Some(hub.summary()).filter(|s| s["nodes"]["ready"] == N as u64)
    });
    apply(&hub, &node_sets(4));

    // Version 1 everywhere at once (a first install never fails in the simulation).
    apply(&hub, &component("1.0", "  updateStrategy: {type: AllAtOnce}\n"));
    wait_phase(&hub, "kubelet", "Complete");
    let c = hub.get("/v1/components/kubelet").expect("component");
    assert_eq!(c["status"]["updatedNodes"], N as u64, "{c}");

    // Version 2, rolling: 10 canaries, then z0..z3 with 20% of a zone at
    // once (50 of 250), 1 s of silence after each, within a budget of 80
    // unavailable nodes (failed ones count, so the budget binds too).
    apply(
        &hub,
        "apiVersion: nodekeeper.io/v1\nkind: DisruptionBudget\nmetadata: {name: fleet}\nspec: {nodeSelector: {matchLabels: {hollow: 'true'}}, maxUnavailable: 80}\n",
    );
    let strategy = "  updateStrategy:\n    rollingUpdate:\n      nodeSetOrder: [z0, z1, z2, z3]\n      canary: {nodes: 10, soakSeconds: 2}\n      maxUnavailable: 20%\n      soakSeconds: 1\n      failureThreshold: 10%\n";
    let sampler = Sampler::start(&hub);
    apply(&hub, &component("2.0", strategy));
    let done = wait_phase(&hub, "kubelet", "Complete");
    let s = sampler.finish();
    assert!(s.n > 20, "sampled often enough: {}", s.n);
    assert!(s.max_changing <= 80, "the DisruptionBudget was exceeded: {s:?}");
    for (z, m) in &s.max_changing_per_zone {
        assert!(*m <= 50, "zone {z}: {m} nodes changing at once; maxUnavailable is 50");
    }
    assert_eq!(done["nodeSets"][0]["name"], "canary", "{done}");
    assert_eq!(done["nodeSets"][0]["selected"], 10, "{done}");
    // Order: the canaries (the first nodes of z0) first, then each zone only
    // after every node of the one before changed.
    let span = |zone: &str| -> (u64, u64) {
        let idx: Vec<u64> = s
            .first_changing
            .iter()
            .filter(|(n, _)| s.last.get(*n).is_some_and(|x| x.zone == zone))
            .map(|(_, i)| *i)
            .collect();
        (
            idx.iter().copied().min().unwrap_or(0),
            idx.iter().copied().max().unwrap_or(0),
        )
    };
    let spans: Vec<(u64, u64)> = (0..4).map(|z| span(&format!("z{z}"))).collect();
    for z in 1..4 {
        assert!(
            spans[z].0 > spans[z - 1].1,
            "zone z{z} started (sample {}) before z{} finished starting (sample {}): {spans:?}",
            spans[z].0,
            z - 1,
            spans[z - 1].1
        );
    }
    let failed = s.last.values().filter(|x| x.phase == "Failed").count();
    assert!(failed > 0 && failed < 100, "3% of nodes fail version 2: {failed}");
    for x in s.last.values().filter(|x| x.phase == "Failed") {
        assert_eq!(x.observed, "1.0", "a failed node rolled back to the old version");
    }
    let c = hub.get("/v1/components/kubelet").expect("component");
    assert_eq!(c["status"]["rollout"]["phase"], "Complete");
    assert_eq!(c["status"]["updatedNodes"].as_u64(), Some((N - failed) as u64), "{c}");
    // nkctl shows the rollout.
    let out = hub.nkctl(&["get", "components"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Complete"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let described = hub.nkctl(&["describe", "component", "kubelet"]);
    let d = String::from_utf8_lossy(&described.stdout);
    assert!(d.contains("Rollout:           Complete"), "{d}");
    let out = hub.nkctl(&["rollout", "status", "component/kubelet"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for g in ["canary", "z0", "z1", "z2", "z3"] {
        assert!(text.contains(g), "{text}");
    }
    assert!(metric(&hub, "nodekeeper_hub_permits_total", "result=\"granted\"") >= N as f64);

    // Version 3 is bad for 3% too; with a threshold of 5 failures it pauses.
    let strict = strategy.replace("failureThreshold: 10%", "failureThreshold: 5");
    apply(&hub, &component("3.0", &strict));
    let paused = wait_phase(&hub, "kubelet", "Paused");
    assert!(
        paused["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("failureThreshold 5"),
        "{paused}"
    );
    std::thread::sleep(Duration::from_secs(3));
    let nodes = nodes_of(&hub).expect("nodes");
    let on3 = nodes.values().filter(|x| x.observed == "3.0").count();
    assert!(on3 < N / 4, "a paused rollout stops releasing: {on3} nodes on 3.0");
    for x in nodes
        .values()
        .filter(|x| x.phase == "Failed" && x.generation == paused["updateRevision"].as_i64().unwrap_or(0))
    {
        assert_ne!(x.observed, "3.0", "failed nodes are back on their old version");
    }
    let out = hub.nkctl(&["rollout", "status", "component/kubelet", "-w"]);
    assert_eq!(out.status.code(), Some(1), "status -w ends with 1 on a paused rollout");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("paused"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Undo to revision 1 (1.0, which every node ran), with the same
    // strategy and budgets: every node ends on 1.0.
    let out = hub.nkctl(&["rollout", "undo", "component/kubelet", "--to-revision", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_phase(&hub, "kubelet", "Complete");
    let nodes = nodes_of(&hub).expect("nodes");
    assert_eq!(
        nodes.values().filter(|x| x.observed == "1.0").count(),
        N,
        "undo brought every node back"
    );
    let history = hub.nkctl(&["rollout", "history", "component/kubelet"]);
    let h = String::from_utf8_lossy(&history.stdout);
    assert!(h.contains("3.0") && h.contains("2.0") && h.contains("update"), "{h}");
}

/// A hub killed with SIGKILL mid-rollout resumes it without exceeding a
/// budget; nodes NotReady beforehand are skipped, listed and do not stall
/// it; a permit whose agent died expires; a freeze stops new changes at once.
#[test]
fn a_killed_hub_resumes_within_budget_not_ready_nodes_are_skipped_dead_permits_expire_and_freeze_stops_changes() {
    let tmp = TempDir::new("rollout-crash");
    let mut hub = Hub::start(tmp.path(), "");
    let hollow = Hollow::start_with(
        tmp.path(),
        &hub.grpc_url(),
        290,
        &["--prefix", "live", "--component-seconds", "1s"],
    );
    let mut gone = Hollow::start_with(tmp.path(), &hub.grpc_url(), 10, &["--prefix", "gone"]);
    wait_for("all Ready", T, || {
        Some(hub.summary()).filter(|s| s["nodes"]["ready"] == 300)
    });
    apply(&hub, &component("1.0", "  updateStrategy: {type: AllAtOnce}\n"));
    wait_phase(&hub, "kubelet", "Complete");
    // Ten nodes go away before the rollout: they count against the budget
    // (30 unavailable at most: 10 gone + 20 being changed).
    gone.kill9();
    wait_for("the gone nodes are Unknown", T, || {
        Some(hub.summary()).filter(|s| s["nodes"]["ready"] == 290)
    });
    apply(
        &hub,
        "apiVersion: nodekeeper.io/v1\nkind: DisruptionBudget\nmetadata: {name: fleet}\nspec: {maxUnavailable: 10%}\n",
    );
    let sampler = Sampler::start(&hub);
    apply(
        &hub,
        &component("2.0", "  updateStrategy:\n    rollingUpdate: {maxUnavailable: 50}\n"),
    );
    wait_for("a third updated", T, || {
        let r = rollout(&hub, "kubelet");
        (r["nodeSets"][0]["updated"].as_u64() >= Some(100)).then_some(())
    });
    hub.kill9();
    hub.restart();
    let done = wait_phase(&hub, "kubelet", "Complete");
    let s = sampler.finish();
    assert!(
        s.max_changing <= 20,
        "budget: 10% of 300 = 30, 10 already down; seen {}",
        s.max_changing
    );
    assert!(
        s.max_changing >= 10,
        "the budget, not the strategy, bounded it: {}",
        s.max_changing
    );
    let skipped: Vec<&str> = done["skippedNodes"]
        .as_array()
        .expect("skipped")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(skipped.len(), 10, "{done}");
    assert!(skipped.iter().all(|n| n.starts_with("gone-")), "{skipped:?}");
    let nodes = nodes_of(&hub).expect("nodes");
    assert_eq!(
        nodes
            .iter()
            .filter(|(n, x)| n.starts_with("live-") && x.observed == "2.0")
            .count(),
        290,
        "every live node updated across the hub restart"
    );
    // No permit is left behind: each is released after its node's last
    // report (which may reach the hub after the one that completed the
    // rollout), or, when its release was lost while the hub was down, expires
    // at its TTL (the hollow agents' 60 s).
    let start = std::time::Instant::now();
    while !hub
        .get("/v1/permits")
        .is_some_and(|p| p["items"].as_array().is_some_and(Vec::is_empty))
    {
        assert!(
            start.elapsed() < Duration::from_secs(75),
            "permits left 75 s after the rollout completed (their TTL is 60 s): {}",
            hub.get("/v1/permits").unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let budget = hub.get("/v1/disruptionbudgets/fleet").expect("budget");
    assert_eq!(budget["status"]["selectedNodes"], 300, "{budget}");
    assert_eq!(budget["status"]["unavailableNodes"], 10, "{budget}");
    assert_eq!(budget["status"]["allowedUnavailable"], 30, "{budget}");

    // A permit whose agent dies is released when its TTL runs out.
    let mut stuck = Hollow::start_with(
        tmp.path(),
        &hub.grpc_url(),
        1,
        &["--prefix", "stuck", "--component-seconds", "1h", "--permit-ttl", "10s"],
    );
    wait_for("the stuck node holds a permit", T, || {
        hub.get("/v1/permits").filter(|p| {
            p["items"]
                .as_array()
                .is_some_and(|i| i.iter().any(|x| x["node"] == "stuck-00000"))
        })
    });
    let held = hub.node("stuck-00000").expect("node");
    assert_eq!(held["status"]["permit"]["action"], "component/kubelet", "{held}");
    let described = hub.nkctl(&["describe", "node", "stuck-00000"]);
    assert!(
        String::from_utf8_lossy(&described.stdout).contains("Permit:            component/kubelet"),
        "{}",
        String::from_utf8_lossy(&described.stdout)
    );
    stuck.kill9();
    wait_for("its permit expired", Duration::from_secs(40), || {
        hub.get("/v1/permits").filter(|p| {
            p["items"]
                .as_array()
                .is_some_and(|i| i.iter().all(|x| x["node"] != "stuck-00000"))
        })
    });
    assert!(metric(&hub, "nodekeeper_hub_permits_total", "result=\"expired\"") >= 1.0);
    let node = hub.node("stuck-00000").expect("node");
    assert!(
        node["status"]["recentEvents"]
            .as_array()
            .is_some_and(|e| e.iter().any(|x| x["reason"] == "PermitExpired")),
        "{node}"
    );

    // The freeze stops new changes at once and is audited; off lets them go.
    let out = hub.nkctl(&["freeze", "on", "--reason", "incident drill"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    apply(
        &hub,
        &component("3.0", "  updateStrategy:\n    rollingUpdate: {maxUnavailable: 50}\n"),
    );
    std::thread::sleep(Duration::from_secs(5));
    let nodes = nodes_of(&hub).expect("nodes");
    assert_eq!(
        nodes
            .iter()
            .filter(|(n, x)| n.starts_with("live-") && (x.phase == "Installing" || x.observed == "3.0"))
            .count(),
        0,
        "nothing changes while frozen"
    );
    let waiting = nodes
        .iter()
        .filter(|(n, x)| n.starts_with("live-") && x.phase == "Staging")
        .count();
    assert!(waiting > 0, "released nodes wait for a permit");
    assert!(metric(&hub, "nodekeeper_hub_permits_total", "result=\"denied\"") >= 1.0);
    let audit = hub.get("/v1/audit?limit=500").expect("audit");
    assert!(
        audit["items"].as_array().is_some_and(|a| a.iter().any(|e| e["action"]
            .as_str()
            .is_some_and(|x| x.contains("freeze on (incident drill)")))),
        "{audit}"
    );
    let out = hub.nkctl(&["freeze", "off"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_phase(&hub, "kubelet", "Complete");
    drop(hollow);
}

/// Windows with the hub's clock moved by the test (the debug build's
/// `clock=` failpoint), `partition`, `others: exclude`, and AllAtOnce
/// still bounded by a budget.
#[test]
fn windows_partition_excluded_nodes_and_all_at_once_within_a_budget() {
    let tmp = TempDir::new("rollout-window");
    let mut hub = Hub::start(tmp.path(), "");
    let clock = tmp.path().join("clock");
    // Tuesday 2026-12-01 08:00 UTC, an hour before the window opens.
    std::fs::write(&clock, "2026-12-01T08:00:00Z").expect("clock");
    hub.kill9();
    hub.set_env(&[("NODEKEEPER_FAILPOINT", &format!("clock={}", clock.display()))]);
    hub.restart();
    let _hollow = Hollow::start_with(
        tmp.path(),
        &hub.grpc_url(),
        40,
        &["--zones", "2", "--component-seconds", "300ms"],
    );
    wait_for("all Ready", T, || {
        Some(hub.summary()).filter(|s| s["nodes"]["ready"] == 40)
    });
    apply(&hub, &node_sets(2));
    apply(&hub, &component("1.0", "  updateStrategy: {type: AllAtOnce}\n"));
    wait_phase(&hub, "kubelet", "Complete");
    let strategy = "  updateStrategy:\n    rollingUpdate:\n      nodeSetOrder: [z0]\n      others: exclude\n      partition: 5\n      maxUnavailable: 100%\n      windows: [{days: [Tue], start: '09:00', end: '10:00', timeZone: UTC}]\n";
    apply(&hub, &component("2.0", strategy));
    std::thread::sleep(Duration::from_secs(3));
    let r = rollout(&hub, "kubelet");
    assert!(r["reason"].as_str().unwrap_or_default().contains("window"), "{r}");
    assert_eq!(r["nodeSets"][0]["updated"], 0, "nothing starts outside the window: {r}");
    std::fs::write(&clock, "2026-12-01T09:30:00Z").expect("clock");
    let done = wait_phase(&hub, "kubelet", "Complete");
    let z0 = &done["nodeSets"][0];
    assert_eq!(
        (z0["name"].as_str(), z0["selected"].as_u64()),
        (Some("z0"), Some(20)),
        "{done}"
    );
    assert_eq!(
        (z0["updated"].as_u64(), z0["partitioned"].as_u64()),
        (Some(15), Some(5)),
        "{done}"
    );
    assert_eq!(
        done["nodeSets"].as_array().map(Vec::len),
        Some(1),
        "others are excluded: {done}"
    );
    let nodes = nodes_of(&hub).expect("nodes");
    assert_eq!(nodes.values().filter(|x| x.observed == "2.0").count(), 15);
    assert!(
        nodes.values().filter(|x| x.zone == "z1").all(|x| x.observed == "1.0"),
        "z1 excluded"
    );

    // Pause holds a rollout (no more nodes released), resume lets it go on;
    // neither is a new revision.
    let one_by_one = "  updateStrategy:\n    rollingUpdate: {maxUnavailable: 1}\n";
    apply(&hub, &component("2.5", one_by_one));
    wait_for("a node released", T, || {
        let r = rollout(&hub, "kubelet");
        (r["nodeSets"].as_array().is_some_and(|g| {
            g.iter()
                .any(|g| g["inProgress"] == 1 || g["updated"].as_u64() > Some(0))
        }))
        .then_some(())
    });
    let out = hub.nkctl(&["rollout", "pause", "component/kubelet"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let paused = wait_phase(&hub, "kubelet", "Paused");
    assert!(
        paused["reason"].as_str().unwrap_or_default().contains("spec.paused"),
        "{paused}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let held = on_version(&hub, "2.5");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(on_version(&hub, "2.5"), held, "a paused rollout releases no more nodes");
    assert!(held < 40);
    let out = hub.nkctl(&["rollout", "resume", "component/kubelet"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_phase(&hub, "kubelet", "Complete");
    assert_eq!(on_version(&hub, "2.5"), 40);
    let history = String::from_utf8_lossy(&hub.nkctl(&["rollout", "history", "component/kubelet"]).stdout).into_owned();
    assert_eq!(
        history.matches("2.5").count(),
        1,
        "pause and resume made no revision: {history}"
    );

    // maxPerHour: a budget that allows 3 permits an hour denies the fourth
    // (two hours later, so the grants above are out of its hour).
    std::fs::write(&clock, "2026-12-01T12:00:00Z").expect("clock");
    apply(
        &hub,
        "apiVersion: nodekeeper.io/v1\nkind: DisruptionBudget\nmetadata: {name: hourly}\nspec: {maxUnavailable: 100%, maxPerHour: 3}\n",
    );
    apply(
        &hub,
        &component("2.6", "  updateStrategy:\n    rollingUpdate: {maxUnavailable: 100%}\n"),
    );
    wait_for("three changed, the rest denied", T, || {
        let n = nodes_of(&hub)?;
        let done = n.values().filter(|x| x.observed == "2.6").count();
        (done == 3 && metric(&hub, "nodekeeper_hub_permits_total", "result=\"denied\"") > 0.0).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(on_version(&hub, "2.6"), 3, "no more than maxPerHour");
    let b = hub.get("/v1/disruptionbudgets/hourly").expect("budget");
    assert_eq!(b["status"]["grantedLastHour"], 3, "{b}");
    let out = hub.nkctl(&["delete", "disruptionbudget", "hourly"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_phase(&hub, "kubelet", "Complete");

    // AllAtOnce releases every node, and a budget of 4 still bounds them.
    apply(
        &hub,
        "apiVersion: nodekeeper.io/v1\nkind: DisruptionBudget\nmetadata: {name: four}\nspec: {maxUnavailable: 4}\n",
    );
    let sampler = Sampler::start(&hub);
    apply(&hub, &component("3.0", "  updateStrategy: {type: AllAtOnce}\n"));
    let done = wait_phase(&hub, "kubelet", "Complete");
    let s = sampler.finish();
    assert!(s.max_changing <= 4 && s.max_changing > 0, "{}", s.max_changing);
    assert_eq!(done["nodeSets"][0]["updated"], 40, "{done}");
}
