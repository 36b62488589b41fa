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
