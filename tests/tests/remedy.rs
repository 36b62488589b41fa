//! Self-healing end to end: real agents (TLS link to a real hub, the real
//! permit protocol), real probes setting the conditions, real programs as
//! the actions. A reboot cannot happen here: the reboot step runs a stand-in
//! command and the agent is restarted with another boot id (its
//! `remedy.bootIdFile`), which is what a real reboot looks like to it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nodekeeper_e2e::lab::run;
use nodekeeper_e2e::{Agent, Hub, TempDir, http_unix, wait_for};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn script(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("script");
    run(Command::new("chmod").arg("+x").arg(&p));
    p.display().to_string()
}

fn jobs(a: &Agent) -> Vec<Value> {
    http_unix(&a.socket, "GET", "/v1/remedies", "")
        .ok()
        .and_then(|(_, b)| serde_json::from_str::<Value>(&b).ok())
        .and_then(|v| v["items"].as_array().cloned())
        .unwrap_or_default()
}

fn job_of(a: &Agent, rule: &str, phase: &str) -> Value {
    wait_for(&format!("a {rule} job {phase}"), T, || {
        jobs(a).into_iter().find(|j| j["rule"] == rule && j["phase"] == phase)
    })
}

/// An exec probe: `<Name>Unhealthy` True while `marker` exists.
fn marker_probe(dir: &Path, name: &str, marker: &Path) -> String {
    let check = script(
        dir,
        &format!("check-{name}.sh"),
        &format!("test ! -e {}", marker.display()),
    );
    format!(
        "  - {{name: {name}, periodSeconds: 1, timeoutSeconds: 1, failureThreshold: 1, exec: {{command: [{check}]}}}}\n"
    )
}

/// Processes whose name is `comm`.
fn processes_named(comm: &str) -> usize {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == comm))
        .count()
}

#[test]
fn a_probe_condition_climbs_the_ladder_a_hung_script_is_killed_and_the_last_step_heals_it() {
    let tmp = TempDir::new("remedy-ladder");
    let d = tmp.path();
    let broken = d.join("broken");
    std::fs::write(&broken, "x").expect("marker");
    // A hung step: a uniquely named sleep that would run for 5 minutes.
    std::fs::copy("/bin/sleep", d.join("nkhangsleep")).expect("sleep copy");
    let hang = script(
        d,
        "hang.sh",
        &format!("{}/nkhangsleep 300 &\n{}/nkhangsleep 300", d.display(), d.display()),
    );
    let noop = script(d, "noop.sh", "echo did nothing");
    let fix = script(d, "fix.sh", &format!("rm -f {}\necho fixed", broken.display()));
    let hub = Hub::start(d, "");
    let cfg = format!(
        "detectors:\n  defaultRules: false\n  probes:\n{}",
        marker_probe(d, "widget", &broken)
    );
    let agent = Agent::start(d, "node-heal", Some(&hub.grpc_url()), &cfg);
    let rule = format!(
        "apiVersion: nodekeeper.io/v1\nkind: RemedyRule\nmetadata: {{name: widget}}\nspec:\n  conditions: [{{type: WidgetUnhealthy, forSeconds: 1}}]\n  steps:\n  - {{action: runScript, params: {{path: {hang}, timeoutSeconds: '2'}}, verifySeconds: 2}}\n  - {{action: runScript, params: {{path: {noop}}}, verifySeconds: 3}}\n  - {{action: runScript, params: {{path: {fix}}}, verifySeconds: 20}}\n  maxConcurrent: 1\n"
    );
    let (code, body) = hub.request("POST", "/v1/apply", &rule).expect("apply");
    assert_eq!(code, 200, "{body}");

    let done = job_of(&agent, "widget", "Succeeded");
    let steps = done["steps"].as_array().cloned().unwrap_or_default();
    let results: Vec<(&str, &str)> = steps
        .iter()
        .map(|s| (s["action"].as_str().unwrap_or(""), s["result"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(
        results,
        [("runScript", "failed"), ("runScript", "notHelped"), ("runScript", "ok")],
        "the hung step failed, the no-op did not help, the fix did: {done:#}"
    );
    assert!(
        steps[0]["message"]
            .as_str()
            .unwrap_or("")
            .contains("did not finish within 2 s"),
        "{done:#}"
    );
    assert_eq!(
        processes_named("nkhangsleep"),
        0,
        "the hung script and its child were killed"
    );
    assert!(!broken.exists());
    assert_eq!(done["step"], 2);
    assert!(
        done["permitId"].as_str().is_some_and(|p| !p.is_empty()),
        "each step ran under a hub permit: {done:#}"
    );

    // The hub has the job, and the permit is given back.
    let id = done["id"].as_str().expect("id").to_string();
    let at_hub = wait_for("the job at the hub", T, || {
        hub.get(&format!("/v1/remedies/{id}"))
            .filter(|j| j["phase"] == "Succeeded")
    });
    assert_eq!(at_hub["node"], "node-heal");
    wait_for("the permit released", T, || {
        hub.get("/v1/permits")
            .filter(|v| v["items"].as_array().is_some_and(|a| a.is_empty()))
    });
    let out = hub.nkctl(&["get", "remedies"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&id) && text.contains("Succeeded"), "{text}");
    let out = hub.nkctl(&["describe", "remedy", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("notHelped") && text.contains("did not finish within 2 s"),
        "{text}"
    );
    let out = hub.nkctl(&["get", "rr"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("widget") && text.contains("runScript>runScript>runScript"),
        "{text}"
    );
    let metrics = http_unix(&agent.socket, "GET", "/metrics", "").expect("metrics").1;
    assert!(
        metrics.contains("nodekeeper_agent_remedy_jobs_total{rule=\"widget\",result=\"Succeeded\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("nodekeeper_agent_remedy_steps_total{action=\"runScript\",result=\"failed\"} 1"));
    let hub_metrics = hub.request("GET", "/metrics", "").expect("hub metrics").1;
    assert!(
        hub_metrics.contains("nodekeeper_hub_remedy_time_to_heal_seconds_count 1"),
        "{hub_metrics}"
    );

    // The same episode does not start another job.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(jobs(&agent).len(), 1, "{:#?}", jobs(&agent));
}

#[test]
fn a_job_killed_mid_action_resumes_a_reboot_completes_in_a_new_boot_dry_run_changes_nothing_and_a_dead_agents_permit_expires()
 {
    let tmp = TempDir::new("remedy-resume");
    let d = tmp.path();
    let slow_marker = d.join("slow-broken");
    let boot_marker = d.join("boot-broken");
    let dry_marker = d.join("dry-broken");
    let runs = d.join("runs");
    let slow = script(
        d,
        "slow.sh",
        &format!(
            "echo start >> {}\nsleep 4\nrm -f {}",
            runs.display(),
            slow_marker.display()
        ),
    );
    let untouched = script(d, "untouched.sh", &format!("rm -f {}", dry_marker.display()));
    let reboot = script(
        d,
        "reboot.sh",
        &format!(
            "echo reboot >> {}\nrm -f {}",
            d.join("reboots").display(),
            boot_marker.display()
        ),
    );
    let boot_id = d.join("boot_id");
    std::fs::write(&boot_id, "boot-one\n").expect("boot id");
    let hub = Hub::start(d, "");
    let cfg = format!(
        "defender: {{permitTtlSeconds: 10}}\nremedy:\n  rebootCommand: [{reboot}]\n  bootIdFile: {}\ndetectors:\n  defaultRules: false\n  probes:\n{}{}{}",
        boot_id.display(),
        marker_probe(d, "slow", &slow_marker),
        marker_probe(d, "boot", &boot_marker),
        marker_probe(d, "dry", &dry_marker),
    );
    let mut agent = Agent::start(d, "node-resume", Some(&hub.grpc_url()), &cfg);
    let rules = format!(
        "apiVersion: nodekeeper.io/v1\nkind: RemedyRule\nmetadata: {{name: slow}}\nspec:\n  conditions: [{{type: SlowUnhealthy}}]\n  steps: [{{action: runScript, params: {{path: {slow}}}, verifySeconds: 20}}]\n---\napiVersion: nodekeeper.io/v1\nkind: RemedyRule\nmetadata: {{name: boot}}\nspec:\n  conditions: [{{type: BootUnhealthy}}]\n  steps: [{{action: reboot, verifySeconds: 20}}]\n---\napiVersion: nodekeeper.io/v1\nkind: RemedyRule\nmetadata: {{name: dry}}\nspec:\n  dryRun: true\n  conditions: [{{type: DryUnhealthy}}]\n  steps: [{{action: runScript, params: {{path: {untouched}}}}}]\n"
    );
    let (code, body) = hub.request("POST", "/v1/apply", &rules).expect("apply");
    assert_eq!(code, 200, "{body}");

    // Dry run: recorded, nothing run.
    std::fs::write(&dry_marker, "x").expect("marker");
    let dry = job_of(&agent, "dry", "DryRun");
    assert!(
        dry["reason"]
            .as_str()
            .unwrap_or("")
            .contains("would run runScript(path="),
        "{dry:#}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(dry_marker.exists(), "a dry run changes nothing");
    std::fs::remove_file(&dry_marker).expect("rm");

    // Killed with SIGKILL mid-action: the job resumes after the restart.
    std::fs::write(&slow_marker, "x").expect("marker");
    let acting = job_of(&agent, "slow", "Acting");
    agent.kill9();
    agent.restart();
    let done = job_of(&agent, "slow", "Succeeded");
    assert_eq!(done["id"], acting["id"], "the same job resumed: {done:#}");
    let starts = std::fs::read_to_string(&runs).unwrap_or_default().lines().count();
    assert_eq!(starts, 2, "the action was run again after the restart");
    assert_eq!(done["steps"].as_array().map(Vec::len), Some(1), "{done:#}");

    // A reboot: the intent is recorded, the command runs, and the job
    // completes only when the agent comes back in another boot.
    std::fs::write(&boot_marker, "x").expect("marker");
    let rebooting = job_of(&agent, "boot", "Rebooting");
    wait_for("the reboot command", T, || d.join("reboots").exists().then_some(()));
    std::thread::sleep(Duration::from_secs(3));
    let still = jobs(&agent)
        .into_iter()
        .find(|j| j["id"] == rebooting["id"])
        .expect("job");
    assert_eq!(still["phase"], "Rebooting", "the same boot: not done yet ({still:#})");
    agent.kill9();
    std::fs::write(&boot_id, "boot-two\n").expect("boot id");
    agent.restart();
    let done = job_of(&agent, "boot", "Succeeded");
    assert_eq!(done["id"], rebooting["id"]);
    assert_eq!(
        std::fs::read_to_string(d.join("reboots"))
            .unwrap_or_default()
            .lines()
            .count(),
        1,
        "one reboot asked for"
    );

    // An agent that dies holding a permit and does not come back: the
    // permit expires at its TTL and the budget is free again.
    std::fs::write(&slow_marker, "x").expect("marker");
    std::fs::write(&runs, "").expect("reset runs");
    wait_for("a second slow job acting", T, || {
        jobs(&agent)
            .into_iter()
            .find(|j| j["rule"] == "slow" && j["phase"] == "Acting" && j["id"] != acting["id"])
    });
    let held = wait_for("the hub's permit", T, || {
        hub.get("/v1/permits").and_then(|v| {
            v["items"]
                .as_array()
                .and_then(|a| a.iter().find(|p| p["action"] == "remedy/slow").cloned())
        })
    });
    assert_eq!(held["node"], "node-resume");
    agent.kill9();
    wait_for("the dead agent's permit expired", Duration::from_secs(40), || {
        hub.get("/v1/permits")
            .filter(|v| v["items"].as_array().is_some_and(|a| a.is_empty()))
    });
}

/// The first case with real systemd (booted in a container, asked
/// over its D-Bus): a unit probe raises KubeletUnhealthy (a kubelet-like
/// unit: there is no kubelet binary here), a standalone agent's own rule
/// restarts the wrong unit first (it does not help), then the right one,
/// and the condition clears.
#[test]
fn a_stopped_unit_in_booted_systemd_is_restarted_by_a_standalone_rule_after_a_step_that_did_not_help() {
    let m = nodekeeper_e2e::lab::Machine::boot("remedy-sd", &[]);
    m.sh(
        "cat > /etc/systemd/system/kubelike.service <<'E'\n[Service]\nExecStart=/bin/sleep infinity\nE\n\
         cat > /etc/systemd/system/bystander.service <<'E'\n[Service]\nExecStart=/bin/sleep infinity\nE\n\
         systemctl daemon-reload && systemctl start kubelike.service bystander.service",
    );
    let tmp = TempDir::new("remedy-sd");
    let bus = format!("unix:path=/proc/{}/root/run/dbus/system_bus_socket", m.pid1());
    let cfg = "detectors:\n  defaultRules: false\n  probes:\n  - {name: kubelet, condition: KubeletUnhealthy, periodSeconds: 1, timeoutSeconds: 1, failureThreshold: 1, systemdUnit: {unit: kubelike.service}}\n\
        remedy:\n  rules:\n  - metadata: {name: kubelet}\n    spec:\n      conditions: [{type: KubeletUnhealthy, forSeconds: 1}]\n      steps:\n      - {action: restartUnit, params: {unit: bystander.service}, verifySeconds: 3}\n      - {action: restartUnit, params: {unit: kubelike.service}, verifySeconds: 20}\n";
    let agent = Agent::start_env(tmp.path(), "node-sd", None, cfg, &[("DBUS_SYSTEM_BUS_ADDRESS", &bus)]);
    let before = m.prop("bystander.service", "ExecMainPID");
    m.exec(&["systemctl", "stop", "kubelike.service"]);
    let done = job_of(&agent, "kubelet", "Succeeded");
    let steps: Vec<(String, String)> = done["steps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|s| {
            (
                s["message"].as_str().unwrap_or("").to_string(),
                s["result"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        steps,
        [
            ("restarted bystander.service".to_string(), "notHelped".to_string()),
            ("restarted kubelike.service".to_string(), "ok".to_string())
        ],
        "{done:#}"
    );
    assert_eq!(m.prop("kubelike.service", "ActiveState"), "active");
    assert_ne!(
        m.prop("bystander.service", "ExecMainPID"),
        before,
        "the first step really restarted its unit"
    );
    assert_eq!(done["permitId"], "", "standalone: the agent is its own authority");
}

/// Hub permits of `action` held now (`creds`: the hub's CA and admin token).
fn held(addr: &str, creds: &nodekeeper_e2e::HubCreds, action: &str) -> Option<usize> {
    let (code, body) =
        nodekeeper_e2e::https(addr, &creds.ca, Some(&creds.admin_token), "GET", "/v1/permits", "").ok()?;
    let v: Value = serde_json::from_str(&body).ok().filter(|_| code == 200)?;
    Some(v["items"].as_array()?.iter().filter(|p| p["action"] == action).count())
}

fn ended(job: &Value) -> bool {
    matches!(
        job["phase"].as_str(),
        Some("Succeeded" | "Failed" | "Denied" | "DryRun")
    )
}

/// Most step intervals (permit held from a step's start to its end, as
/// the jobs recorded them) overlapping at one moment.
fn most_overlapping(jobs: &[Value]) -> usize {
    let mut edges: Vec<(std::time::SystemTime, i32)> = Vec::new();
    for j in jobs {
        for s in j["steps"].as_array().into_iter().flatten() {
            let t = |k: &str| s[k].as_str().and_then(nodekeeper_proto::time::parse_rfc3339);
            if let (Some(a), Some(b)) = (t("startTime"), t("endTime")) {
                edges.push((a, 1));
                edges.push((b, -1));
            }
        }
    }
    // Ends before starts at the same instant: a permit released and
    // granted in one decision batch is not an overlap.
    edges.sort();
    let (mut cur, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        cur += d;
        most = most.max(cur);
    }
    most as usize
}

/// The storm drill, scaled for CI (`scripts/bench/remedy-storm.sh` runs it
/// with 10,000 hollow agents and records its figures; here 500, and alone:
/// see .config/nextest.toml): hollow agents run the
/// real remedy executor and permit client over TLS, with simulated steps
/// (2 s; nothing on this machine is touched). A correlated fault — one no
/// local step heals, as a bad push — raised by 30 % of the nodes within
/// 20 s: the rule never has more nodes remediating than its budget, the
/// breaker opens, exactly one FleetIncident; the fault fixed and the
/// breaker reset, the rule heals nodes again.
#[test]
fn storm_drill_30_percent_raise_a_correlated_fault_the_breaker_opens_within_budget_once_and_after_reset_the_rule_heals_again()
 {
    use nodekeeper_e2e::Hollow;
    const N: usize = 500;
    const BUDGET: usize = 15; // maxConcurrent 3 %
    const STORM: usize = 150; // 30 %
    let tmp = TempDir::new("storm");
    let hub = Hub::start(tmp.path(), "");
    let hollow = Hollow::start_with(
        tmp.path(),
        &hub.grpc_url(),
        N,
        &["--remedy-seconds", "2s", "--component-seconds", "0s"],
    );
    wait_for("every hollow node Ready", Duration::from_secs(300), || {
        (hub.summary()["nodes"]["ready"] == N as u64).then_some(())
    });
    let yaml = "apiVersion: nodekeeper.io/v1\nkind: DisruptionBudget\nmetadata: {name: fleet}\nspec: {nodeSelector: {matchLabels: {hollow: 'true'}}, maxUnavailable: 10%}\n---\napiVersion: nodekeeper.io/v1\nkind: RemedyRule\nmetadata: {name: storm}\nspec:\n  nodeSelector: {matchLabels: {hollow: 'true'}}\n  conditions: [{type: HollowFault, status: 'True', forSeconds: 2}]\n  steps: [{action: restartUnit, params: {unit: hollow-runtime.service}, verifySeconds: 3}]\n  cooldownSeconds: 600\n  maxConcurrent: 3%\n  breaker: {threshold: 10%, windowSeconds: 120, cooldownSeconds: 3600}\n";
    let rev0 = hub.summary()["revision"].as_u64().expect("revision");
    let out = nodekeeper_e2e::nkctl(&hub.http_url(), None, &["apply", "-f", "-"], Some(yaml));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Each node's desired state gets a new revision with the rule in it.
    wait_for("every node has the rule", T, || {
        Some(hub.summary())
            .filter(|s| s["nodes"]["inSync"] == N as u64 && s["revision"].as_u64() >= Some(rev0 + N as u64))
    });

    // Sample the rule's permits while the storm runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, addr, creds) = (stop.clone(), hub.http.clone(), hub.creds.clone().expect("a TLS hub"));
        std::thread::spawn(move || {
            let (mut most, mut samples) = (0usize, 0usize);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(n) = held(&addr, &creds, "remedy/storm") {
                    most = most.max(n);
                    samples += 1;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (most, samples)
        })
    };
    let raised = hollow.raise(&format!(
        "condition=HollowFault&count={STORM}&spreadSeconds=20&correlated=true"
    ));
    assert_eq!(raised.len(), STORM);
    let rule = wait_for("the breaker open", Duration::from_secs(120), || {
        hub.get("/v1/remedyrules/storm")
            .filter(|r| r["status"]["breakerOpen"] == true)
    });
    assert!(
        rule["status"]["breakerReason"].as_str().is_some_and(|r| !r.is_empty()),
        "{rule}"
    );
    // Every raised node's job ends: the ones granted before the breaker
    // opened fail (their step does not help a fault that is not theirs),
    // the rest are refused for good.
    wait_for("every storm job ended", Duration::from_secs(120), || {
        let all = hub.get("/v1/remedies?rule=storm")?;
        let items = all["items"].as_array()?;
        let nodes: std::collections::BTreeSet<&str> = items.iter().filter_map(|j| j["node"].as_str()).collect();
        (nodes.len() == STORM && items.iter().all(ended)).then_some(())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (most, samples) = sampler.join().expect("sampler");
    let jobs = hub.get("/v1/remedies?rule=storm").expect("jobs")["items"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let granted = jobs
        .iter()
        .filter(|j| !j["steps"].as_array().is_none_or(|s| s.is_empty()))
        .count();
    let denied = jobs.iter().filter(|j| j["phase"] == "Denied").count();
    let overlap = most_overlapping(&jobs);
    eprintln!(
        "storm: {granted} jobs granted a step before the breaker opened, {denied} denied; at most {most} permits held in {samples} samples, {overlap} steps at once"
    );
    assert!(samples > 50, "the sampler ran: {samples}");
    assert!(most <= BUDGET && overlap <= BUDGET, "{most} / {overlap} > {BUDGET}");
    assert!(
        most > 0 && granted > 0,
        "some nodes were remediated before the breaker opened"
    );
    assert!(
        granted < STORM && denied > 0,
        "the breaker stopped the rest: {granted} granted"
    );
    assert!(
        jobs.iter()
            .filter(|j| j["phase"] == "Denied")
            .all(|j| j["reason"].as_str().is_some_and(|r| r.contains("breaker"))),
        "denials name the breaker"
    );
    let incidents = |hub: &Hub| -> usize {
        hub.get("/v1/incidents")
            .and_then(|v| v["items"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter(|e| e["source"] == "remedyrule/storm")
            .count()
    };
    assert_eq!(incidents(&hub), 1, "one FleetIncident");
    let metrics = hub.request("GET", "/metrics", "").expect("metrics").1;
    assert!(
        metrics.contains("nodekeeper_hub_fleet_incidents_total{rule=\"storm\"} 1"),
        "{metrics}"
    );

    // The cause is fixed; the operator closes the breaker.
    assert_eq!(hollow.clear("HollowFault"), STORM as u64);
    let out = hub.nkctl(&["remedy", "breaker", "reset", "storm"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("the breaker closed", T, || {
        hub.get("/v1/remedyrules/storm")
            .filter(|r| r["status"]["breakerOpen"] == false)
    });

    // A node's own fault now: healed by the rule again.
    let healthy = hollow.raise(&format!("condition=HollowFault&count=10&skip={STORM}&spreadSeconds=2"));
    wait_for("the new faults healed", T, || {
        let jobs = hub.get("/v1/remedies?rule=storm&phase=Succeeded")?;
        let done: Vec<&str> = jobs["items"]
            .as_array()?
            .iter()
            .filter_map(|j| j["node"].as_str())
            .collect();
        healthy.iter().all(|n| done.contains(&n.as_str())).then_some(())
    });
    let r = hub.get("/v1/remedyrules/storm").expect("rule");
    assert_eq!(r["status"]["breakerOpen"], false, "{r}");
    assert_eq!(incidents(&hub), 1, "still one FleetIncident");
    drop(hollow);
}

/// cleanDisk against a real containerd (its gRPC API, no ctr in the
/// agent): the images no container uses are deleted, every name of a used
/// image's content and a pinned image are kept; old files of a path go too.
/// The trigger is an exec probe that sees the unused image.
#[test]
fn clean_disk_deletes_unused_container_images_through_containerds_api_and_keeps_used_and_pinned_ones() {
    let tmp = TempDir::new("remedy-images");
    let d = tmp.path();
    let cd = d.join("containerd");
    std::fs::create_dir_all(&cd).expect("dir");
    let mut containerd = nodekeeper_e2e::lab::containerd(&cd);
    let sock = cd.join("containerd.sock");
    let ctr = |args: &[&str]| {
        let mut c = Command::new("ctr");
        c.arg("-a").arg(&sock).args(["-n", "k8s.io"]).args(args);
        nodekeeper_e2e::lab::stdout(&run(&mut c))
    };
    for (name, content) in [
        ("nk.test/used:1", "used"),
        ("nk.test/unused:1", "unused"),
        ("nk.test/pause:1", "pause"),
    ] {
        let tar = nodekeeper_e2e::lab::oci_image(d, name, content);
        ctr(&["image", "import", &tar.display().to_string()]);
    }
    ctr(&["image", "label", "nk.test/pause:1", "io.cri-containerd.pinned=pinned"]);
    ctr(&["container", "create", "nk.test/used:1", "workload"]);
    let names = || -> Vec<String> { ctr(&["image", "ls", "-q"]).lines().map(String::from).collect() };
    let before = names();
    assert!(before.len() >= 3, "{before:?}");
    // An old file in a log directory, and a new one.
    let logs = d.join("logs");
    std::fs::create_dir_all(&logs).expect("logs");
    std::fs::write(logs.join("old.log"), "x").expect("old");
    std::fs::write(logs.join("new.log"), "y").expect("new");
    run(Command::new("touch")
        .args(["-d", "2 days ago"])
        .arg(logs.join("old.log")));
    let check = script(
        d,
        "check-images.sh",
        &format!(
            "ctr -a {} -n k8s.io image ls -q | grep -qx 'nk.test/unused:1' && exit 1; exit 0",
            sock.display()
        ),
    );
    std::thread::sleep(Duration::from_secs(1)); // older than imageMinAge
    let cfg = format!(
        "detectors:\n  defaultRules: false\n  probes:\n  - {{name: images, condition: ImageGarbage, periodSeconds: 1, timeoutSeconds: 1, failureThreshold: 1, exec: {{command: [{check}]}}}}\n\
         remedy:\n  rules:\n  - metadata: {{name: images}}\n    spec:\n      conditions: [{{type: ImageGarbage, forSeconds: 1}}]\n      steps:\n      - {{action: cleanDisk, params: {{images: unused, imageMinAge: 1s, namespace: k8s.io, address: '{}', paths: '{}:1d'}}, verifySeconds: 10}}\n",
        sock.display(),
        logs.display()
    );
    let agent = Agent::start(d, "node-images", None, &cfg);
    let done = job_of(&agent, "images", "Succeeded");
    let msg = done["steps"][0]["message"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains("deleted 1 old file(s)"), "{msg}");
    assert!(msg.contains("nk.test/unused:1"), "{msg}");
    assert_eq!(done["permitId"], "", "cleanDisk is not disruptive: no permit");
    let after = names();
    assert!(after.contains(&"nk.test/used:1".to_string()), "{after:?}");
    assert!(
        after.contains(&"nk.test/pause:1".to_string()),
        "pinned stays: {after:?}"
    );
    assert!(!after.contains(&"nk.test/unused:1".to_string()), "{after:?}");
    // Every other name of the used and pinned images' content stays too:
    // only the unused image's names went.
    let gone: Vec<&String> = before.iter().filter(|n| !after.contains(n)).collect();
    let said: usize = msg
        .split("deleted ")
        .nth(2)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("a count of deleted images");
    assert_eq!(gone.len(), said, "{gone:?} / {msg}");
    assert!(
        gone.iter()
            .all(|n| *n == "nk.test/unused:1" || n.starts_with("sha256:")),
        "{gone:?}"
    );
    assert!(logs.join("new.log").exists() && !logs.join("old.log").exists());
    drop(agent);
    containerd.kill();
}
