//! Components at their declared versions, with real parts: .deb packages
//! built with dpkg-deb and installed by the host's real dpkg, rpm packages
//! in an `rpm --root`, archives and files served over HTTP, real hub and
//! agent processes, and SIGKILL at every step of a change.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nodekeeper_e2e::artifacts::{FileServer, build_deb, sha256};
use nodekeeper_e2e::lab::{run, stdout};
use nodekeeper_e2e::{Agent, Hub, TempDir, event_count, nkctl, wait_for};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn apply(hub: &Hub, yaml: &str) {
    let out = nkctl(&hub.http_url(), None, &["apply", "-f", "-"], Some(yaml));
    assert!(
        out.status.success(),
        "apply failed: {}\n{yaml}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until the agent reports `name` in `phase` for `generation`.
fn wait_phase(agent: &Agent, name: &str, phase: &str, generation: i64) -> Value {
    wait_for(&format!("{name} {phase} at generation {generation}"), T, || {
        agent
            .component(name)
            .filter(|c| c["phase"] == phase && c["generation"] == generation)
    })
}

fn dpkg_version(pkg: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${db:Status-Abbrev}|${Version}", pkg])
        .output()
        .expect("dpkg-query");
    let s = stdout(&out);
    s.strip_prefix("ii |").map(str::to_string)
}

/// Removes a test package from the host's dpkg database when the test ends.
struct Purge(String);

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["-P", &self.0]).output();
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn component_status(hub: &Hub, name: &str) -> Value {
    hub.get(&format!("/v1/components/{name}")).expect("component")["status"].clone()
}

#[test]
fn deb_component_installs_upgrades_rolls_back_on_failed_health_and_repairs_drift() {
    let tmp = TempDir::new("conv-deb");
    let d = tmp.path();
    let pkg = format!("nk-e2e-widget-{}", std::process::id());
    let _purge = Purge(pkg.clone());
    let bin_path = d.join("opt/widget/bin/widget");
    let bin_s = bin_path.to_string_lossy().into_owned();
    let www = d.join("www");
    std::fs::create_dir_all(&www).expect("www");
    let deb1 = build_deb(&www, &pkg, "1.0-1", &[(&bin_s, "#!/bin/sh\necho widget 1.0\n", 0o755)]);
    let deb2 = build_deb(&www, &pkg, "2.0-1", &[(&bin_s, "#!/bin/sh\necho widget 2.0\n", 0o755)]);
    let server = FileServer::start(&www);
    let conf = d.join("etc/widget/widget.conf");
    let healthy = d.join("healthy");
    std::fs::write(&healthy, "").expect("flag");

    let hub = Hub::start(d, "");
    let agent = Agent::start(
        d,
        "deb-node",
        Some(&hub.grpc_url()),
        "labels: {zone: z1}\nconverge: {intervalSeconds: 1}\n",
    );
    let component = |gen_version: &str, deb: &Path, health_file: &Path| {
        format!(
            r#"apiVersion: nodekeeper.io/v1
kind: NodeSet
metadata: {{name: zone-z1}}
spec: {{selector: {{matchLabels: {{zone: z1}}}}}}
---
apiVersion: nodekeeper.io/v1
kind: Component
metadata: {{name: widget}}
spec:
  nodeSelector: {{matchLabels: {{zone: z1}}}}
  version: "{gen_version}"
  artifact:
    deb: {{url: "{url}", sha256: "{sha}"}}
  params: {{level: "info", port: "8080"}}
  nodeSetParams:
  - nodeSet: zone-z1
    params: {{level: "debug"}}
  files:
  - path: {conf}
    mode: "0640"
    template: |
      node={{{{ node.name }}}} zone={{{{ node.labels.zone }}}} cpus={{{{ node.facts.cpus }}}}
      level={{{{ params.level }}}} port={{{{ params.port }}}} version={{{{ component.version }}}}
  health:
    exec: ["/bin/sh", "-c", "test -f {health}"]
    periodSeconds: 1
    gracePeriodSeconds: 3
"#,
            url = server.url(deb),
            sha = sha256(deb),
            conf = conf.display(),
            health = health_file.display(),
        )
    };

    // 1. First install: the package from the local HTTP server, the file
    // rendered with node facts, labels and the NodeSet's parameter override.
    apply(&hub, &component("1.0", &deb1, &healthy));
    let c = wait_phase(&agent, "widget", "Done", 1);
    assert_eq!(c["observedVersion"], "1.0");
    assert_eq!(c["declaredVersion"], "1.0");
    assert_eq!(dpkg_version(&pkg).as_deref(), Some("1.0-1"));
    let text = read(&conf);
    assert!(
        text.starts_with("node=deb-node zone=z1 cpus=") && text.contains("level=debug port=8080 version=1.0"),
        "{text}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&conf).expect("conf").permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640);
    // At the hub: the node's status and the Component's counts.
    wait_for("the hub sees widget 1.0 on the node", T, || {
        let n = hub.node("deb-node")?;
        let cs = n["status"]["components"].as_array()?.clone();
        cs.iter().any(|c| c["name"] == "widget" && c["observedVersion"] == "1.0" && c["phase"] == "Done").then_some(())
    });
    let st = component_status(&hub, "widget");
    assert_eq!(st["selectedNodes"], 1);
    assert_eq!(st["updatedNodes"], 1);
    assert_eq!(st["versions"]["1.0"], 1);
    assert_eq!(st["consistencyPercent"], 100.0);
    let table = stdout(&hub.nkctl(&["get", "components"]));
    assert!(table.contains("widget") && table.contains("100%") && table.contains("deb"), "{table}");

    // 2. Version 2.0 fails its health gate: dpkg and the file go back to 1.0.
    std::fs::remove_file(&healthy).expect("unhealthy");
    apply(&hub, &component("2.0", &deb2, &healthy));
    let c = wait_phase(&agent, "widget", "Failed", 2);
    assert_eq!(c["observedVersion"], "1.0", "{c}");
    assert!(c["lastError"].as_str().unwrap_or_default().contains("health check failed"), "{c}");
    assert_eq!(dpkg_version(&pkg).as_deref(), Some("1.0-1"));
    assert!(read(&conf).contains("version=1.0"), "{}", read(&conf));
    let out = stdout(&run(&mut Command::new(&bin_path)));
    assert_eq!(out.trim(), "widget 1.0");
    wait_for("the hub counts the failed node", T, || {
        let st = component_status(&hub, "widget");
        (st["failedNodes"] == 1 && st["updatedNodes"] == 0).then_some(())
    });
    wait_for("a ComponentRolledBack event at the hub", T, || {
        (event_count(&hub.node("deb-node")?, "ComponentRolledBack") >= 1).then_some(())
    });
    let describe = stdout(&hub.nkctl(&["describe", "component", "widget"]));
    assert!(
        describe.contains("deb-node") && describe.contains("Failed") && describe.contains("Revisions:         1, 2"),
        "{describe}"
    );

    // 3. With a passing health check 2.0 goes in; every revision is kept.
    let healthy2 = d.join("healthy2");
    std::fs::write(&healthy2, "").expect("flag");
    apply(&hub, &component("2.0", &deb2, &healthy2));
    let c = wait_phase(&agent, "widget", "Done", 3);
    assert_eq!(c["observedVersion"], "2.0");
    assert_eq!(dpkg_version(&pkg).as_deref(), Some("2.0-1"));
    assert!(read(&conf).contains("version=2.0"));
    let revs = hub.get("/v1/components/widget/revisions").expect("revisions");
    let versions: Vec<&str> = revs["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|r| r["spec"]["version"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(versions, ["1.0", "2.0", "2.0"]);

    // 4. Drift: a hand-edited file and a hand-installed older package are put back.
    std::fs::write(&conf, "edited by hand\n").expect("edit");
    wait_for("the edited file restored", T, || read(&conf).contains("version=2.0").then_some(()));
    run(Command::new("dpkg").arg("-i").arg(&deb1));
    wait_for("the package back at 2.0-1", T, || {
        (dpkg_version(&pkg).as_deref() == Some("2.0-1")).then_some(())
    });
    wait_for("two ComponentDrift events at the hub", T, || {
        (event_count(&hub.node("deb-node")?, "ComponentDrift") >= 2).then_some(())
    });
    let events = agent.log();
    assert!(events.contains("component drifted"), "agent log should say it restored drift");
    let c = agent.component("widget").expect("widget");
    assert_eq!(c["phase"], "Done");
    assert_eq!(c["observedVersion"], "2.0");
}
