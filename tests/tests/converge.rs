//! Components at their declared versions, with real parts: .deb packages
//! built with dpkg-deb and installed by the host's real dpkg, rpm packages
//! in an `rpm --root`, archives and files served over HTTP, real hub and
//! agent processes, and SIGKILL at every step of a change.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nodekeeper_e2e::artifacts::{FileServer, build_deb, build_rpm, build_tar_gz, sha256};
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

/// `dpkg -i` as an operator would, waiting while another test's agent holds
/// the dpkg lock.
fn dpkg_by_hand(deb: &Path) {
    wait_for("dpkg -i by hand", T, || {
        let out = Command::new("dpkg").arg("-i").arg(deb).output().expect("dpkg");
        out.status.success().then_some(())
    });
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

/// Text that does not compress away (hex of a simple generator).
fn noise(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = String::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push_str(&format!("{x:016x}"));
    }
    out
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
    let secret = d.join("etc/widget/token");
    let healthy = d.join("healthy");
    std::fs::write(&healthy, "").expect("flag");

    let mut hub = Hub::start(d, "");
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
  - path: {secret}
    mode: "0600"
    owner: "nobody:nogroup"
    template: "token for {{{{ node.name }}}}\n"
  health:
    exec: ["/bin/sh", "-c", "test -f {health}"]
    periodSeconds: 1
    gracePeriodSeconds: 3
"#,
            url = server.url(deb),
            sha = sha256(deb),
            conf = conf.display(),
            secret = secret.display(),
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
    use std::os::unix::fs::MetadataExt;
    let nobody = nix::unistd::User::from_name("nobody").expect("passwd").expect("nobody");
    let meta = std::fs::metadata(&secret).expect("token");
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (nobody.uid.as_raw(), 0o600));
    assert_eq!(read(&secret), "token for deb-node\n");
    // At the hub: the node's status and the Component's counts.
    wait_for("the hub sees widget 1.0 on the node", T, || {
        let n = hub.node("deb-node")?;
        let cs = n["status"]["components"].as_array()?.clone();
        cs.iter()
            .any(|c| c["name"] == "widget" && c["observedVersion"] == "1.0" && c["phase"] == "Done")
            .then_some(())
    });
    let st = component_status(&hub, "widget");
    assert_eq!(st["selectedNodes"], 1);
    assert_eq!(st["updatedNodes"], 1);
    assert_eq!(st["versions"]["1.0"], 1);
    assert_eq!(st["consistencyPercent"], 100.0);
    let metrics = hub.request("GET", "/metrics", "").expect("metrics").1;
    for line in [
        "nodekeeper_hub_component_updated_nodes{component=\"widget\"} 1",
        "nodekeeper_hub_component_nodes{component=\"widget\",phase=\"Done\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    // Node lists name the node's components without repeating their specs.
    let listed = hub.get("/v1/nodes").expect("nodes")["items"][0]["status"]["settings"]["components"][0].clone();
    assert_eq!(
        (listed["name"].as_str(), listed["spec"].is_null()),
        (Some("widget"), true),
        "{listed}"
    );
    let table = stdout(&hub.nkctl(&["get", "components"]));
    assert!(
        table.contains("widget") && table.contains("100%") && table.contains("deb"),
        "{table}"
    );

    // 2. Version 2.0 fails its health gate: dpkg and the file go back to 1.0.
    std::fs::remove_file(&healthy).expect("unhealthy");
    apply(&hub, &component("2.0", &deb2, &healthy));
    let c = wait_phase(&agent, "widget", "Failed", 2);
    assert_eq!(c["observedVersion"], "1.0", "{c}");
    assert!(
        c["lastError"]
            .as_str()
            .unwrap_or_default()
            .contains("health check failed"),
        "{c}"
    );
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
    wait_for("the edited file restored", T, || {
        read(&conf).contains("version=2.0").then_some(())
    });
    nix::unistd::chown(&secret, Some(nix::unistd::Uid::from_raw(0)), None).expect("chown");
    wait_for("the owner restored", T, || {
        (std::fs::metadata(&secret).ok()?.uid() == nobody.uid.as_raw()).then_some(())
    });
    dpkg_by_hand(&deb1);
    wait_for("the package back at 2.0-1", T, || {
        (dpkg_version(&pkg).as_deref() == Some("2.0-1")).then_some(())
    });
    wait_for("two ComponentDrift events at the hub", T, || {
        (event_count(&hub.node("deb-node")?, "ComponentDrift") >= 2).then_some(())
    });
    let log = agent.log();
    assert!(
        log.contains("component drifted"),
        "agent log should say it restored drift"
    );
    let c = agent.component("widget").expect("widget");
    assert_eq!(c["phase"], "Done");
    assert_eq!(c["observedVersion"], "2.0");
    let local = nkctl(&hub.http_url(), Some(&agent.socket), &["node", "components"], None);
    let local = stdout(&local);
    assert!(
        local.contains("widget") && local.contains("2.0") && local.contains("Done"),
        "{local}"
    );

    // 5. A bad Component is refused at the hub with the field named; nothing changes.
    let bad = component("3.0", &deb2, &healthy2).replace("mode: \"0640\"", "mode: \"0999\"");
    let out = nkctl(&hub.http_url(), None, &["apply", "-f", "-"], Some(&bad));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spec.files[0].mode"), "{err}");
    assert_eq!(
        hub.get("/v1/components/widget").expect("widget")["spec"]["version"],
        "2.0"
    );
    // Two components may not manage one file: they would undo each other.
    let thief = format!(
        "apiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {{name: thief}}\nspec:\n  version: \"1\"\n  files:\n  - {{path: {}, template: x}}\n",
        conf.display()
    );
    let out = nkctl(&hub.http_url(), None, &["apply", "-f", "-"], Some(&thief));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("spec.files[0].path") && err.contains("\"widget\""),
        "{err}"
    );

    // 6. The hub keeps every revision and the counts across a restart.
    hub.terminate();
    hub.restart();
    let revs = hub.get("/v1/components/widget/revisions").expect("revisions");
    assert_eq!(revs["items"].as_array().map(Vec::len), Some(3));
    wait_for("the node's component state back at the hub", T, || {
        let st = component_status(&hub, "widget");
        (st["updatedNodes"] == 1 && st["versions"]["2.0"] == 1).then_some(())
    });
}

#[test]
fn archive_and_file_artifacts_resume_downloads_switch_atomically_refuse_bad_hashes_and_repair_drift() {
    let tmp = TempDir::new("conv-archive");
    let d = tmp.path();
    let www = d.join("www");
    std::fs::create_dir_all(&www).expect("www");
    // A big enough archive that a download cut in the middle is visible.
    let filler = noise(1, 512 * 1024);
    let tgz1 = build_tar_gz(
        &www,
        "tool-1.0",
        "tool-1.0",
        &[
            ("bin/tool", "#!/bin/sh\necho tool 1.0\n", 0o755),
            ("share/blob", &filler, 0o644),
        ],
    );
    let filler2 = noise(2, 512 * 1024);
    let tgz2 = build_tar_gz(
        &www,
        "tool-2.0",
        "tool-2.0",
        &[
            ("bin/tool", "#!/bin/sh\necho tool 2.0\n", 0o755),
            ("share/blob", &filler2, 0o644),
        ],
    );
    // An HTTP health endpoint: the stand-in for kubelet's :10248/healthz,
    // since no kubelet binary can run here (a file the server has: 200).
    let probe = www.join("healthz");
    std::fs::write(&probe, "ok").expect("healthz");
    let helper = www.join("helper-1");
    std::fs::write(&helper, "#!/bin/sh\necho helper 1\n").expect("helper");
    let server = FileServer::start(&www);
    let install_dir = d.join("opt/tool");
    let helper_path = d.join("usr/local/bin/helper");

    let hub = Hub::start(d, "");
    let agent = Agent::start(d, "arc-node", Some(&hub.grpc_url()), "converge: {intervalSeconds: 1}\n");
    let tool = |version: &str, tgz: &Path, sha: &str| {
        format!(
            "apiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {{name: tool}}\nspec:\n  version: \"{version}\"\n  artifact:\n    archive: {{url: \"{}\", sha256: \"{sha}\", stripComponents: 1, installDir: \"{}\"}}\n  health: {{http: \"{}\", periodSeconds: 1, gracePeriodSeconds: 3}}\n",
            server.url(tgz),
            install_dir.display(),
            server.url(&probe)
        )
    };
    let current = install_dir.join("current");
    let run_tool = || {
        stdout(&run(&mut Command::new(current.join("bin/tool"))))
            .trim()
            .to_string()
    };

    // 1. Version 1.0; its download is cut in the middle once and resumed with a range request.
    server.cut_next(&tgz1, 100 * 1024);
    apply(&hub, &tool("1.0", &tgz1, &sha256(&tgz1)));
    wait_phase(&agent, "tool", "Done", 1);
    assert_eq!(run_tool(), "tool 1.0");
    assert_eq!(
        std::fs::read_link(&current).expect("current link"),
        install_dir.join("versions/1.0")
    );
    let reqs = server.requests();
    assert!(
        reqs.iter()
            .any(|r| r.path.ends_with("tool-1.0.tar.gz") && r.range.is_some()),
        "the interrupted download should resume with a Range request: {reqs:?}"
    );

    // 2. A wrong sha256 is refused: nothing unpacked, the link unchanged.
    let wrong = sha256(&helper); // the hash of some other file
    apply(&hub, &tool("2.0", &tgz2, &wrong));
    let c = wait_phase(&agent, "tool", "Failed", 2);
    let err = c["lastError"].as_str().unwrap_or_default();
    assert!(err.contains("sha256 mismatch") && err.contains("nothing"), "{err}");
    assert_eq!(c["observedVersion"], "1.0");
    assert_eq!(run_tool(), "tool 1.0");
    assert!(
        !install_dir.join("versions/2.0").exists(),
        "nothing of 2.0 may be unpacked"
    );
    let cached: Vec<String> = std::fs::read_dir(d.join("arc-node/state/artifacts"))
        .expect("cache")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(cached, [sha256(&tgz1)], "only verified artifacts stay in the cache");

    // 3. The right hash: 2.0 goes in by switching the link; 1.0 is cleaned up.
    apply(&hub, &tool("2.0", &tgz2, &sha256(&tgz2)));
    wait_phase(&agent, "tool", "Done", 3);
    assert_eq!(run_tool(), "tool 2.0");
    wait_for("the old version removed", T, || {
        (!install_dir.join("versions/1.0").exists()).then_some(())
    });

    // 4. Drift: a replaced binary inside the current version is put back.
    std::fs::write(current.join("bin/tool"), "#!/bin/sh\necho tampered\n").expect("tamper");
    wait_for("the binary restored", T, || (run_tool() == "tool 2.0").then_some(()));

    // 5. A file artifact, installed and repaired the same way.
    let helper_yaml = format!(
        "apiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {{name: helper}}\nspec:\n  version: \"1\"\n  artifact:\n    file: {{url: \"{}\", sha256: \"{}\", path: \"{}\", mode: \"0750\"}}\n",
        server.url(&helper),
        sha256(&helper),
        helper_path.display()
    );
    apply(&hub, &helper_yaml);
    wait_phase(&agent, "helper", "Done", 1);
    assert_eq!(stdout(&run(&mut Command::new(&helper_path))).trim(), "helper 1");
    std::fs::write(&helper_path, "#!/bin/sh\necho replaced\n").expect("replace");
    wait_for("the helper restored", T, || {
        (read(&helper_path).contains("helper 1")).then_some(())
    });
    wait_for("ComponentDrift events at the hub", T, || {
        (event_count(&hub.node("arc-node")?, "ComponentDrift") >= 2).then_some(())
    });
    let st = component_status(&hub, "tool");
    assert_eq!(st["versions"]["2.0"], 1, "{st}");

    // 6. A template that cannot render on the node (an undefined parameter)
    // fails the change before anything is touched, naming file and reason.
    let bad_conf = d.join("etc/bad.conf");
    let bad = format!(
        "apiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {{name: badtmpl}}\nspec:\n  version: \"1\"\n  files:\n  - {{path: {}, template: \"x={{{{ params.missing }}}}\"}}\n",
        bad_conf.display()
    );
    apply(&hub, &bad);
    let c = wait_phase(&agent, "badtmpl", "Failed", 1);
    let err = c["lastError"].as_str().unwrap_or_default();
    assert!(
        err.contains("Staging") && err.contains("bad.conf") && err.contains("undefined") && err.contains("nothing"),
        "{err}"
    );
    assert!(!bad_conf.exists());
    assert!(agent.status().is_some(), "the agent keeps running");
    // An HTTP health probe that fails (404) rolls the archive back.
    std::fs::remove_file(&probe).expect("unhealthy");
    apply(&hub, &tool("1.0", &tgz1, &sha256(&tgz1)));
    let c = wait_phase(&agent, "tool", "Failed", 4);
    assert!(c["lastError"].as_str().unwrap_or_default().contains("HTTP 404"), "{c}");
    assert_eq!(run_tool(), "tool 2.0");

    // 7. A component no longer selecting the node stays installed, unmanaged.
    let del = hub.nkctl(&["delete", "component", "helper"]);
    assert!(del.status.success(), "{}", String::from_utf8_lossy(&del.stderr));
    wait_for("helper no longer reported", T, || {
        agent.component("helper").is_none().then_some(())
    });
    assert!(helper_path.exists());
    wait_for("the hub drops helper from the node", T, || {
        let n = hub.node("arc-node")?;
        (!n["status"]["components"]
            .as_array()?
            .iter()
            .any(|c| c["name"] == "helper"))
        .then_some(())
    });
}

/// The node's widget, as one consistent version: the package, the binary it
/// installs and the rendered config must all say the same version.
fn widget_version(pkg: &str, bin_path: &Path, conf: &Path) -> String {
    let pkg_v = dpkg_version(pkg).unwrap_or_default();
    let bin_v = stdout(&run(&mut Command::new(bin_path))).trim().to_string();
    let conf_v = read(conf).trim().to_string();
    let v = pkg_v.trim_end_matches("-1").to_string();
    assert_eq!(
        (bin_v.as_str(), conf_v.as_str()),
        (format!("widget {v}").as_str(), format!("version={v}").as_str()),
        "the node is between versions: package {pkg_v}, binary {bin_v:?}, config {conf_v:?}"
    );
    v
}

/// Kills the agent with SIGKILL before and after every step of a change
/// (a failpoint per run), restarts it, and checks that the change finished
/// (or, for a failing health gate, rolled back) and that `version` reads one
/// consistent version off the node. Versions alternate between `spec(0, _)`
/// and `spec(1, _)`; the second argument is the health-check file.
fn crash_at_every_step(
    d: &Path,
    hub: &Hub,
    agent: &mut Agent,
    name: &str,
    spec: &dyn Fn(usize, &str) -> String,
    version: &dyn Fn() -> String,
) {
    let healthy = d.join("healthy");
    std::fs::write(&healthy, "").expect("flag");
    let ok = healthy.display().to_string();
    let sick = d.join("missing").display().to_string();
    apply(hub, &spec(0, &ok));
    wait_phase(agent, name, "Done", 1);
    assert_eq!(version(), "1.0");
    let forward = [
        "Downloading",
        "Verifying",
        "Staging",
        "Installing",
        "WritingFiles",
        "Restarting",
        "HealthCheck",
    ];
    let mut cases: Vec<(String, bool)> = Vec::new();
    for p in forward {
        for at in ["before", "after"] {
            cases.push((format!("{p}:{at}"), true));
        }
    }
    // A change whose health gate fails, killed while rolling back.
    cases.push(("RollingBack:before".into(), false));
    cases.push(("RollingBack:after".into(), false));

    let mut generation = 1;
    let mut current = 0usize;
    for (n, (failpoint, passes)) in cases.into_iter().enumerate() {
        let target = 1 - current;
        agent.terminate();
        agent.set_env(&[("NODEKEEPER_FAILPOINT", &failpoint)]);
        agent.restart();
        generation += 1;
        // Each failing spec differs: a spec that failed once is not retried.
        let sick_now = format!("{sick}-{generation}");
        apply(hub, &spec(target, if passes { &ok } else { &sick_now }));
        let status = agent
            .wait_exit(T)
            .unwrap_or_else(|| panic!("the agent did not reach failpoint {failpoint}"));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "{failpoint}: the agent must die of SIGKILL");
        agent.set_env(&[]);
        agent.restart();
        let (phase, expect) = if passes { ("Done", target) } else { ("Failed", current) };
        let c = wait_phase(agent, name, phase, generation);
        assert_eq!(
            version(),
            ["1.0", "2.0"][expect],
            "after SIGKILL at {failpoint} the change should end at {phase}: {c}"
        );
        assert_eq!(c["observedVersion"], ["1.0", "2.0"][expect], "{failpoint}: {c}");
        let resumed = agent
            .log()
            .matches("resuming a change interrupted by a restart")
            .count();
        assert_eq!(
            resumed,
            n + 1,
            "{failpoint}: the restarted agent should resume the change"
        );
        current = expect;
    }
}

#[test]
fn sigkill_at_every_step_of_a_package_change_leaves_the_old_or_the_new_version() {
    let tmp = TempDir::new("conv-crash");
    let d = tmp.path();
    let pkg = format!("nk-e2e-crash-{}", std::process::id());
    let _purge = Purge(pkg.clone());
    let bin_path = d.join("opt/crash/bin/widget");
    let bin_s = bin_path.to_string_lossy().into_owned();
    let www = d.join("www");
    std::fs::create_dir_all(&www).expect("www");
    let debs = [
        build_deb(&www, &pkg, "1.0-1", &[(&bin_s, "#!/bin/sh\necho widget 1.0\n", 0o755)]),
        build_deb(&www, &pkg, "2.0-1", &[(&bin_s, "#!/bin/sh\necho widget 2.0\n", 0o755)]),
    ];
    let server = FileServer::start(&www);
    let conf = d.join("etc/crash/widget.conf");
    let hub = Hub::start(d, "");
    let mut agent = Agent::start(
        d,
        "crash-node",
        Some(&hub.grpc_url()),
        "converge: {intervalSeconds: 1}\n",
    );
    let spec = |i: usize, health: &str| {
        let version = ["1.0", "2.0"][i];
        format!(
            "apiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {{name: widget}}\nspec:\n  version: \"{version}\"\n  artifact:\n    deb: {{url: \"{}\", sha256: \"{}\"}}\n  files:\n  - path: {}\n    template: \"version={{{{ component.version }}}}\\n\"\n  health:\n    exec: [\"/bin/sh\", \"-c\", \"test -f {health}\"]\n    periodSeconds: 1\n    gracePeriodSeconds: 2\n",
            server.url(&debs[i]),
            sha256(&debs[i]),
            conf.display()
        )
    };
    crash_at_every_step(d, &hub, &mut agent, "widget", &spec, &|| {
        widget_version(&pkg, &bin_path, &conf)
    });
}

#[test]
fn sigkill_at_every_step_of_an_archive_change_leaves_the_old_or_the_new_version() {
    let tmp = TempDir::new("conv-crash-arc");
    let d = tmp.path();
    let www = d.join("www");
    std::fs::create_dir_all(&www).expect("www");
    let tgz = [
        build_tar_gz(
            &www,
            "t-1.0",
            "t-1.0",
            &[("bin/tool", "#!/bin/sh\necho tool 1.0\n", 0o755)],
        ),
        build_tar_gz(
            &www,
            "t-2.0",
            "t-2.0",
            &[("bin/tool", "#!/bin/sh\necho tool 2.0\n", 0o755)],
        ),
    ];
    let server = FileServer::start(&www);
    let install_dir = d.join("opt/tool");
    let conf = d.join("etc/tool.conf");
    let hub = Hub::start(d, "");
    let mut agent = Agent::start(
        d,
        "crash-arc",
        Some(&hub.grpc_url()),
        "converge: {intervalSeconds: 1}\n",
    );
    let spec = |i: usize, health: &str| {
        let version = ["1.0", "2.0"][i];
        format!(
            "apiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {{name: tool}}\nspec:\n  version: \"{version}\"\n  artifact:\n    archive: {{url: \"{}\", sha256: \"{}\", stripComponents: 1, installDir: {}}}\n  files:\n  - path: {}\n    template: \"version={{{{ component.version }}}}\\n\"\n  health:\n    exec: [\"/bin/sh\", \"-c\", \"test -f {health}\"]\n    periodSeconds: 1\n    gracePeriodSeconds: 2\n",
            server.url(&tgz[i]),
            sha256(&tgz[i]),
            install_dir.display(),
            conf.display()
        )
    };
    // One consistent version: the link, the binary it reaches and the config.
    let version = || {
        let link = std::fs::read_link(install_dir.join("current")).expect("current link");
        let link_v = link
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bin_v = stdout(&run(&mut Command::new(install_dir.join("current/bin/tool"))))
            .trim()
            .to_string();
        let conf_v = read(&conf).trim().to_string();
        assert_eq!(
            (bin_v.clone(), conf_v.clone()),
            (format!("tool {link_v}"), format!("version={link_v}")),
            "the node is between versions: link {link_v}, binary {bin_v:?}, config {conf_v:?}"
        );
        link_v
    };
    crash_at_every_step(d, &hub, &mut agent, "tool", &spec, &version);
}

/// rpm cannot manage this Debian host's own packages, so the rpm path runs
/// against a private rpm database and root (`converge.rpmRoot`, i.e.
/// `rpm --root`): as far as rpm allows here. Packages are built with the
/// real rpmbuild and installed, upgraded and rolled back by the real rpm.
#[test]
fn rpm_component_installs_upgrades_and_rolls_back_in_an_rpm_root() {
    let tmp = TempDir::new("conv-rpm");
    let d = tmp.path();
    let root = d.join("rpmroot");
    std::fs::create_dir_all(&root).expect("root");
    run(Command::new("rpm").arg("--root").arg(&root).arg("--initdb"));
    let www = d.join("www");
    std::fs::create_dir_all(&www).expect("www");
    let name = "nk-e2e-gizmo";
    let rpm1 = build_rpm(&www, name, "1.0", &[("/opt/gizmo/VERSION", "1.0\n", 0o644)]);
    let rpm2 = build_rpm(&www, name, "2.0", &[("/opt/gizmo/VERSION", "2.0\n", 0o644)]);
    let server = FileServer::start(&www);
    let hub = Hub::start(d, "");
    let agent = Agent::start(
        d,
        "rpm-node",
        Some(&hub.grpc_url()),
        &format!("converge: {{intervalSeconds: 1, rpmRoot: \"{}\"}}\n", root.display()),
    );
    let rpm_q = || {
        let out = Command::new("rpm")
            .arg("--root")
            .arg(&root)
            .args(["-q", "--qf", "%{VERSION}-%{RELEASE}", name])
            .output()
            .expect("rpm -q");
        stdout(&out)
    };
    let flag = d.join("healthy");
    std::fs::write(&flag, "").expect("flag");
    let spec = |version: &str, rpm: &Path, health: &Path| {
        format!(
            "apiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {{name: gizmo}}\nspec:\n  version: \"{version}\"\n  artifact:\n    rpm: {{url: \"{}\", sha256: \"{}\"}}\n  health: {{exec: [\"/bin/sh\", \"-c\", \"test -f {}\"], periodSeconds: 1, gracePeriodSeconds: 2}}\n",
            server.url(rpm),
            sha256(rpm),
            health.display()
        )
    };
    apply(&hub, &spec("1.0", &rpm1, &flag));
    wait_phase(&agent, "gizmo", "Done", 1);
    assert_eq!(rpm_q(), "1.0-1");
    assert_eq!(read(&root.join("opt/gizmo/VERSION")), "1.0\n");
    apply(&hub, &spec("2.0", &rpm2, &d.join("missing")));
    let c = wait_phase(&agent, "gizmo", "Failed", 2);
    assert_eq!(rpm_q(), "1.0-1", "rolled back with rpm -U --oldpackage: {c}");
    assert_eq!(read(&root.join("opt/gizmo/VERSION")), "1.0\n");
    apply(&hub, &spec("2.0", &rpm2, &flag));
    wait_phase(&agent, "gizmo", "Done", 3);
    assert_eq!(rpm_q(), "2.0-1");
    // Drift: an older package installed by hand is replaced again.
    run(Command::new("rpm")
        .arg("--root")
        .arg(&root)
        .args(["-U", "--oldpackage"])
        .arg(&rpm1));
    wait_for("gizmo back at 2.0-1", T, || (rpm_q() == "2.0-1").then_some(()));
}

/// Waits until the hub shows `name` on `node` in `phase` for `generation`.
fn wait_hub_phase(hub: &Hub, node: &str, name: &str, phase: &str, generation: i64) -> Value {
    wait_for(
        &format!("{node}/{name} {phase} at generation {generation} at the hub"),
        T,
        || {
            let n = hub.node(node)?;
            n["status"]["components"]
                .as_array()?
                .iter()
                .find(|c| c["name"] == name && c["phase"] == phase && c["generation"] == generation)
                .cloned()
        },
    )
}

#[test]
fn systemd_component_in_a_booted_container_ships_its_unit_restarts_on_change_and_rolls_back() {
    let tmp = TempDir::new("conv-systemd");
    let d = tmp.path();
    let www = d.join("www");
    std::fs::create_dir_all(&www).expect("www");
    let scripts: Vec<_> = ["1", "2"]
        .iter()
        .map(|v| {
            let p = www.join(format!("nk-demo-{v}"));
            std::fs::write(&p, format!("#!/bin/sh\necho \"nk-demo {v} up\"\nexec sleep infinity\n")).expect("script");
            p
        })
        .collect();
    let server = FileServer::start(&www);
    let hub = Hub::start(d, "");
    let agent_bin = nodekeeper_e2e::bin("nodekeeper-agent");
    // The container shares the host's network: the agent inside reaches the
    // hub and the file server on the host's loopback.
    let m = nodekeeper_e2e::lab::Machine::boot_with(
        "conv",
        &[(agent_bin.as_path(), "/usr/local/sbin/nodekeeper-agent")],
        false,
    );
    std::fs::create_dir_all(m.root.join("etc/nk-test")).expect("config dir");
    std::fs::write(
        m.root.join("etc/nk-test/agent.yaml"),
        format!(
            "nodeName: sd-node\n{}stateDir: /var/lib/nk-test\nsocket: /var/lib/nk-test/agent.sock\nconverge: {{intervalSeconds: 1}}\ndetectors: {{defaultRules: false}}\ndeadlines: {{systemctlSeconds: 5}}\n",
            nodekeeper_e2e::hub_config(&hub.grpc_url())
        ),
    )
    .expect("agent config");
    m.exec(&[
        "systemd-run",
        "--unit=nk-agent",
        "/usr/local/sbin/nodekeeper-agent",
        "--config",
        "/etc/nk-test/agent.yaml",
    ]);
    let unit_file = |exec: &str| {
        format!(
            "[Unit]\\nDescription=nodekeeper demo\\n[Service]\\nExecStart={exec}\\n[Install]\\nWantedBy=multi-user.target\\n"
        )
    };
    let spec = |version: &str, script: &Path, exec: &str| {
        format!(
            "apiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {{name: demo}}\nspec:\n  version: \"{version}\"\n  artifact:\n    file: {{url: \"{}\", sha256: \"{}\", path: /usr/local/bin/nk-demo}}\n  files:\n  - path: /etc/nk-demo/demo.conf\n    template: \"node={{{{ node.name }}}} version={{{{ component.version }}}}\\n\"\n  service:\n    unit: nk-demo.service\n    unitFile: \"{}\"\n  health: {{unitActive: nk-demo.service, periodSeconds: 1, successThreshold: 3, gracePeriodSeconds: 6}}\n",
            server.url(script),
            sha256(script),
            unit_file(exec)
        )
    };
    let main_pid = || m.prop("nk-demo.service", "MainPID");

    // 1. First install: unit file written, daemon-reload, enabled, started.
    apply(&hub, &spec("1", &scripts[0], "/usr/local/bin/nk-demo"));
    wait_hub_phase(&hub, "sd-node", "demo", "Done", 1);
    assert_eq!(m.prop("nk-demo.service", "ActiveState"), "active");
    assert_eq!(m.prop("nk-demo.service", "UnitFileState"), "enabled");
    assert_eq!(m.sh("cat /etc/nk-demo/demo.conf"), "node=sd-node version=1\n");
    let pid1 = main_pid();

    // 2. A new version restarts the service on the new binary.
    apply(&hub, &spec("2", &scripts[1], "/usr/local/bin/nk-demo"));
    wait_hub_phase(&hub, "sd-node", "demo", "Done", 2);
    let pid2 = main_pid();
    assert_ne!(pid1, pid2, "the service should have been restarted");
    assert!(
        m.sh("journalctl -u nk-demo.service --no-pager -o cat")
            .contains("nk-demo 2 up")
    );

    // 3. A unit that dies after starting fails the health gate: the old unit
    // file and binary come back and the service runs again.
    apply(&hub, &spec("3", &scripts[0], "/bin/sh -c 'sleep 1; exit 3'"));
    let c = wait_hub_phase(&hub, "sd-node", "demo", "Failed", 3);
    assert_eq!(c["observedVersion"], "2", "{c}");
    assert!(
        c["lastError"].as_str().unwrap_or_default().contains("not active"),
        "{c}"
    );
    assert_eq!(m.prop("nk-demo.service", "ActiveState"), "active");
    assert!(
        m.prop("nk-demo.service", "ExecStart")
            .contains("/usr/local/bin/nk-demo")
    );
    assert!(m.sh("cat /usr/local/bin/nk-demo").contains("nk-demo 2 up"));
    assert_eq!(m.sh("cat /etc/nk-demo/demo.conf"), "node=sd-node version=2\n");

    // 4. Drift: an edited config is restored and the service restarted.
    let before = main_pid();
    m.sh("echo edited > /etc/nk-demo/demo.conf");
    wait_for("demo.conf restored", T, || {
        (m.sh("cat /etc/nk-demo/demo.conf") == "node=sd-node version=2\n").then_some(())
    });
    wait_for("the service restarted after the repair", T, || {
        (main_pid() != before).then_some(())
    });
    let journal = m.sh("journalctl -u nk-agent.service --no-pager -o cat");
    assert!(journal.contains("component drifted"), "{journal}");

    // 5. A unit whose start never finishes (Type=notify that never notifies,
    // TimeoutStartSec=infinity): the restart job is given up at its
    // deadline (canceled over D-Bus; systemctl would be killed), the change
    // rolls back and the old unit runs again.
    let hung_unit = "[Unit]\\nDescription=nodekeeper demo\\n[Service]\\nType=notify\\nTimeoutStartSec=infinity\\nExecStart=/usr/local/bin/nk-demo\\n[Install]\\nWantedBy=multi-user.target\\n";
    let hung =
        spec("5", &scripts[0], "/usr/local/bin/nk-demo").replace(&unit_file("/usr/local/bin/nk-demo"), hung_unit);
    assert!(hung.contains("TimeoutStartSec=infinity"), "{hung}");
    apply(&hub, &hung);
    // Generation 4: the fourth spec of this Component.
    let c = wait_hub_phase(&hub, "sd-node", "demo", "Failed", 4);
    let err = c["lastError"].as_str().unwrap_or_default();
    assert!(
        err.contains("Restarting") && err.contains("nk-demo.service") && err.contains("deadline of 5s"),
        "{c}"
    );
    assert_eq!(c["observedVersion"], "2", "{c}");
    wait_for("the old unit runs again", T, || {
        (m.prop("nk-demo.service", "ActiveState") == "active").then_some(())
    });
    assert_eq!(m.prop("nk-demo.service", "Type"), "simple");
    assert!(m.sh("cat /usr/local/bin/nk-demo").contains("nk-demo 2 up"));
    let node = hub.node("sd-node").expect("node");
    assert_eq!(nodekeeper_e2e::ready(&node), "True", "the agent stayed connected");

    // 6. Over D-Bus a job's result is the error: a oneshot unit whose start
    // fails ends its restart job with result "failed".
    let failing_unit = "[Unit]\\nDescription=nodekeeper demo\\n[Service]\\nType=oneshot\\nExecStart=/bin/false\\n[Install]\\nWantedBy=multi-user.target\\n";
    let failing =
        spec("6", &scripts[0], "/usr/local/bin/nk-demo").replace(&unit_file("/usr/local/bin/nk-demo"), failing_unit);
    apply(&hub, &failing);
    let c = wait_hub_phase(&hub, "sd-node", "demo", "Failed", 5);
    let err = c["lastError"].as_str().unwrap_or_default();
    assert!(
        err.contains("RestartUnit nk-demo.service") && err.contains("result \"failed\""),
        "{c}"
    );
    wait_for("the old unit runs again", T, || {
        (m.prop("nk-demo.service", "ActiveState") == "active").then_some(())
    });

    // The agent drove systemd over D-Bus, and said so; its view of a unit
    // matches systemctl's, over D-Bus and over the systemctl fallback.
    let journal = m.sh("journalctl -u nk-agent.service --no-pager -o cat");
    assert!(journal.contains("systemd control: D-Bus"), "{journal}");
    for (env, via) in [
        ("", "D-Bus"),
        ("DBUS_SYSTEM_BUS_ADDRESS=unix:path=/nonexistent ", "systemctl"),
    ] {
        let out = m.sh(&format!(
            "{env}/usr/local/sbin/nodekeeper-agent unit status nk-demo.service"
        ));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(v["via"], via, "{v}");
        assert_eq!(v["activeState"], m.prop("nk-demo.service", "ActiveState"), "{v}");
        assert_eq!(v["subState"], m.prop("nk-demo.service", "SubState"), "{v}");
        assert_eq!(
            v["nRestarts"].to_string(),
            m.prop("nk-demo.service", "NRestarts"),
            "{v}"
        );
        assert!(v["activeEnterTimestamp"].as_u64() > Some(0), "{v}");
    }
    // Jobs over D-Bus and their results: done, failed, and dependency (a
    // unit whose requirement fails to start).
    let unit = |args: &[&str]| {
        let mut a = vec!["/usr/local/sbin/nodekeeper-agent", "unit"];
        a.extend_from_slice(args);
        let out = m.command(&a).output().expect("run nodekeeper-agent unit");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, out) = unit(&["stop", "nk-demo.service"]);
    assert!(ok && out.contains("done (via D-Bus)"), "{out}");
    assert_eq!(m.prop("nk-demo.service", "ActiveState"), "inactive");
    let (ok, out) = unit(&["start", "nk-demo.service"]);
    assert!(ok && out.contains("done (via D-Bus)"), "{out}");
    assert_eq!(m.prop("nk-demo.service", "ActiveState"), "active");
    m.sh("printf '[Service]\\nType=oneshot\\nExecStart=/bin/false\\n' > /etc/systemd/system/nk-broken.service");
    m.sh("printf '[Unit]\\nRequires=nk-broken.service\\nAfter=nk-broken.service\\n[Service]\\nExecStart=/bin/sleep infinity\\n' > /etc/systemd/system/nk-needs-broken.service");
    m.exec(&["systemctl", "daemon-reload"]);
    let (ok, out) = unit(&["start", "nk-needs-broken.service"]);
    assert!(!ok && out.contains("result \"dependency\""), "{out}");
    let (ok, out) = unit(&["start", "nk-broken.service"]);
    assert!(!ok && out.contains("result \"failed\""), "{out}");
    m.exec(&["systemctl", "stop", "nk-agent.service"]);
}

/// A package from the host's repositories (`deb: {package, version}`): a
/// local flat apt repository built with dpkg-scanpackages, used through the
/// real apt-get (pointed at it with APT_CONFIG, so the host's own sources
/// are not touched) and installed into the host's real dpkg database.
#[test]
fn repository_package_installs_with_apt_and_rolls_back_by_downgrading() {
    let tmp = TempDir::new("conv-apt");
    let d = tmp.path();
    let pkg = format!("nk-e2e-gadget-{}", std::process::id());
    let _purge = Purge(pkg.clone());
    let repo = d.join("repo");
    std::fs::create_dir_all(&repo).expect("repo");
    let file = d.join("opt/gadget/VERSION");
    let file_s = file.to_string_lossy().into_owned();
    build_deb(&repo, &pkg, "1.0-1", &[(&file_s, "1.0\n", 0o644)]);
    build_deb(&repo, &pkg, "2.0-1", &[(&file_s, "2.0\n", 0o644)]);
    for sub in ["deb-", "tree-"] {
        for e in std::fs::read_dir(&repo).expect("repo").flatten() {
            if e.file_name().to_string_lossy().starts_with(sub) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let packages = run(Command::new("dpkg-scanpackages").args(["-m", "."]).current_dir(&repo));
    std::fs::write(repo.join("Packages"), &packages.stdout).expect("Packages");
    for dir in ["lists/partial", "cache/archives/partial", "sources.d"] {
        std::fs::create_dir_all(d.join("apt").join(dir)).expect("apt dirs");
    }
    std::fs::write(
        d.join("apt/sources.list"),
        format!("deb [trusted=yes] file:{} ./\n", repo.display()),
    )
    .expect("sources");
    let apt_conf = d.join("apt/apt.conf");
    std::fs::write(
        &apt_conf,
        format!(
            "Dir::Etc::SourceList \"{a}/sources.list\";\nDir::Etc::SourceParts \"{a}/sources.d\";\nDir::State::Lists \"{a}/lists\";\nDir::Cache \"{a}/cache\";\n",
            a = d.join("apt").display()
        ),
    )
    .expect("apt.conf");
    let hub = Hub::start(d, "");
    let apt_env = apt_conf.to_string_lossy().into_owned();
    let agent = Agent::start_env(
        d,
        "apt-node",
        Some(&hub.grpc_url()),
        "converge: {intervalSeconds: 1}\n",
        &[("APT_CONFIG", &apt_env)],
    );
    let flag = d.join("healthy");
    std::fs::write(&flag, "").expect("flag");
    let spec = |version: &str, health: &Path| {
        format!(
            "apiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {{name: gadget}}\nspec:\n  version: \"{version}\"\n  artifact:\n    deb: {{package: {pkg}, version: \"{version}-1\"}}\n  health: {{exec: [\"/bin/sh\", \"-c\", \"test -f {}\"], periodSeconds: 1, gracePeriodSeconds: 2}}\n",
            health.display()
        )
    };
    // The lists are empty at first: the agent runs apt-get update by itself.
    apply(&hub, &spec("1.0", &flag));
    let c = wait_phase(&agent, "gadget", "Done", 1);
    assert_eq!(dpkg_version(&pkg).as_deref(), Some("1.0-1"), "{c}");
    apply(&hub, &spec("2.0", &d.join("missing")));
    let c = wait_phase(&agent, "gadget", "Failed", 2);
    assert_eq!(
        dpkg_version(&pkg).as_deref(),
        Some("1.0-1"),
        "downgraded back with apt: {c}"
    );
    assert_eq!(read(&file), "1.0\n");
    apply(&hub, &spec("2.0", &flag));
    wait_phase(&agent, "gadget", "Done", 3);
    assert_eq!(dpkg_version(&pkg).as_deref(), Some("2.0-1"));
}

#[test]
fn a_standalone_agent_keeps_components_from_local_files() {
    let tmp = TempDir::new("conv-local");
    let d = tmp.path();
    let conf = d.join("etc/local/app.conf");
    let comps = d.join("components.yaml");
    std::fs::write(
        &comps,
        format!(
            "apiVersion: nodekeeper.io/v1\nkind: NodeSet\nmetadata: {{name: rack7}}\nspec: {{selector: {{matchLabels: {{rack: \"7\"}}}}}}\n---\napiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {{name: app}}\nspec:\n  version: \"3\"\n  params: {{mode: plain}}\n  nodeSetParams: [{{nodeSet: rack7, params: {{mode: rack7}}}}]\n  files:\n  - {{path: {}, template: \"mode={{{{ params.mode }}}}\\n\"}}\n---\napiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {{name: elsewhere}}\nspec:\n  nodeSelector: {{matchLabels: {{rack: \"9\"}}}}\n  version: \"1\"\n",
            conf.display()
        ),
    )
    .expect("components file");
    let extra = format!(
        "labels: {{rack: \"7\"}}\nconverge: {{intervalSeconds: 1, components: [\"{}\"]}}\n",
        comps.display()
    );
    let agent = Agent::start(d, "solo", None, &extra);
    let c = wait_phase(&agent, "app", "Done", 1);
    assert_eq!(c["observedVersion"], "3");
    assert_eq!(read(&conf), "mode=rack7\n");
    assert!(
        agent.component("elsewhere").is_none(),
        "not selected by this node's labels"
    );
    std::fs::write(&conf, "mode=edited\n").expect("edit");
    wait_for("restored without a hub", T, || {
        (read(&conf) == "mode=rack7\n").then_some(())
    });
    drop(agent);

    // A bad file stops the agent at start, naming the file, document and field.
    std::fs::write(
        &comps,
        "apiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {name: app}\nspec: {version: \"../x\"}\n",
    )
    .expect("bad file");
    let cfg = d.join("solo/agent.yaml");
    let out = Command::new(nodekeeper_e2e::bin("nodekeeper-agent"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("run agent");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("components.yaml") && err.contains("document 1") && err.contains("spec.version"),
        "{err}"
    );
}

/// A server that answers every request with `head` and then `body()` bytes
/// as slowly as `pause` between chunks (forever when `body` never ends).
fn bad_server(head: &'static str, chunk: usize, pause: Duration, chunks: usize) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf);
                if c.write_all(head.as_bytes()).is_err() {
                    return;
                }
                let data = vec![b'x'; chunk];
                for _ in 0..chunks {
                    if c.write_all(&data).is_err() {
                        return;
                    }
                    std::thread::sleep(pause);
                }
            });
        }
    });
    format!("http://{addr}")
}

#[test]
fn downloads_are_capped_in_size_and_time_and_touch_nothing() {
    let tmp = TempDir::new("conv-caps");
    let d = tmp.path();
    let www = d.join("www");
    std::fs::create_dir_all(&www).expect("www");
    let big = www.join("big.bin");
    std::fs::write(&big, noise(7, 256 * 1024)).expect("big");
    let server = FileServer::start(&www);
    // Endless body without a length; a body that trickles.
    let endless = bad_server(
        "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
        64 * 1024,
        Duration::ZERO,
        usize::MAX,
    );
    let trickle = bad_server(
        "HTTP/1.1 200 OK\r\nContent-Length: 50000\r\n\r\n",
        16,
        Duration::from_millis(200),
        usize::MAX,
    );
    let sha = "ab".repeat(32);
    let comp = |name: &str, url: &str, sha: &str, size: &str| {
        let path = d.join(format!("bin/{name}"));
        format!(
            "apiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {{name: {name}}}\nspec:\n  version: \"1\"\n  artifact: {{file: {{url: \"{url}\", sha256: \"{sha}\", path: \"{}\"{size}}}}}\n",
            path.display()
        )
    };
    let docs = [
        // Declared size smaller than what the server sends: cut off.
        comp("declared", &server.url(&big), &sha256(&big), ", size: 1000"),
        // No size: the configured maximum (100 KiB here) applies.
        comp("nosize", &server.url(&big), &sha256(&big), ""),
        comp("endless", &endless, &sha, ""),
        // Within the size, but slower than the download deadline.
        comp("slow", &trickle, &sha, ""),
    ]
    .join("---\n");
    let comps = d.join("components.yaml");
    std::fs::write(&comps, docs).expect("components");
    let extra = format!(
        "converge: {{intervalSeconds: 1, maxArtifactBytes: 102400, downloadTimeoutSeconds: 3, downloadAttempts: 2, components: [\"{}\"]}}\n",
        comps.display()
    );
    let agent = Agent::start(d, "caps", None, &extra);
    for (name, want) in [
        ("declared", "larger than 1000 bytes"),
        ("nosize", "larger than 102400 bytes"),
        ("endless", "larger than 102400 bytes"),
        ("slow", "downloadTimeoutSeconds"),
    ] {
        let c = wait_phase(&agent, name, "Failed", 1);
        let err = c["lastError"].as_str().unwrap_or_default();
        assert!(err.contains(want), "{name}: {err}");
        assert!(err.contains("nothing on the node was changed"), "{name}: {err}");
        assert!(!d.join(format!("bin/{name}")).exists(), "{name}: nothing installed");
    }
    // Nothing oversized stays in the cache, partial or whole.
    let cache = d.join("caps/state/artifacts");
    let kept: u64 = std::fs::read_dir(&cache)
        .map(|rd| rd.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0);
    assert!(kept <= 102_400 + 16 * 64, "cache holds {kept} bytes");
}

#[test]
fn a_package_tool_that_never_exits_is_killed_at_its_deadline_and_the_change_rolls_back() {
    let tmp = TempDir::new("conv-hang");
    let d = tmp.path();
    let pkg = format!("nk-e2e-hang-{}", std::process::id());
    let _purge = Purge(pkg.clone());
    let bin_path = d.join("opt/hang/bin/hang");
    let bin_s = bin_path.to_string_lossy().into_owned();
    let www = d.join("www");
    std::fs::create_dir_all(&www).expect("www");
    let deb1 = build_deb(&www, &pkg, "1.0-1", &[(&bin_s, "#!/bin/sh\necho hang 1.0\n", 0o755)]);
    let deb2 = build_deb(&www, &pkg, "2.0-1", &[(&bin_s, "#!/bin/sh\necho hang 2.0\n", 0o755)]);
    let server = FileServer::start(&www);
    // A stand-in first on PATH for dpkg: it installs version 1 through the
    // real dpkg, and hangs (with a child, in its process group) on version 2,
    // as a dpkg stuck in a maintainer script would.
    let fake = d.join("fakebin");
    std::fs::create_dir_all(&fake).expect("fakebin");
    let pids = d.join("hang-pids");
    std::fs::write(
        fake.join("dpkg"),
        format!(
            "#!/bin/sh\nfor a; do last=$a; done\nif [ \"$(/usr/bin/dpkg-deb -f \"$last\" Version 2>/dev/null)\" = 2.0-1 ]; then sleep 1000 & echo $! >> {p}; echo $$ >> {p}; echo stuck in postinst >&2; sleep 1000; fi\nexec /usr/bin/dpkg \"$@\"\n",
            p = pids.display()
        ),
    )
    .expect("fake dpkg");
    std::fs::set_permissions(fake.join("dpkg"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let path = format!("{}:{}", fake.display(), std::env::var("PATH").unwrap_or_default());
    let hub = Hub::start(d, "");
    let agent = Agent::start_env(
        d,
        "hang-node",
        Some(&hub.grpc_url()),
        "converge: {intervalSeconds: 1}\ndeadlines: {packageSeconds: 3}\n",
        &[("PATH", &path)],
    );
    let comp = |v: &str, deb: &Path| {
        format!(
            "apiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {{name: hang}}\nspec:\n  version: \"{v}\"\n  artifact: {{deb: {{url: \"{}\", sha256: \"{}\"}}}}\n",
            server.url(deb),
            sha256(deb)
        )
    };
    apply(&hub, &comp("1", &deb1));
    wait_phase(&agent, "hang", "Done", 1);
    assert_eq!(dpkg_version(&pkg).as_deref(), Some("1.0-1"));

    apply(&hub, &comp("2", &deb2));
    // While dpkg hangs the agent answers and stays connected.
    wait_for("the change is installing", T, || {
        agent.component("hang").filter(|c| c["phase"] == "Installing")
    });
    let st = agent.status().expect("the socket answers while dpkg hangs");
    assert_eq!(st["hub"]["connected"], true);
    let c = wait_phase(&agent, "hang", "Failed", 2);
    let err = c["lastError"].as_str().unwrap_or_default();
    assert!(
        err.contains("dpkg -i") && err.contains("deadline of 3s") && err.contains("stuck in postinst"),
        "{err}"
    );
    assert_eq!(c["observedVersion"], "1", "rolled back: {c}");
    assert_eq!(dpkg_version(&pkg).as_deref(), Some("1.0-1"));
    let node = wait_for("rollback reported", T, || {
        hub.node("hang-node")
            .filter(|n| event_count(n, "ComponentRolledBack") >= 1)
    });
    assert_eq!(node["status"]["conditions"][0]["status"], "True", "still Ready");
    // The stuck dpkg and the child it started are gone.
    for pid in read(&pids).split_whitespace() {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let alive = state
            .rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'));
        assert!(!alive, "process {pid} of the stuck dpkg survived: {state}");
    }
}

#[test]
fn a_stuck_converge_step_shows_in_a_metric_and_an_event_and_stops_the_watchdog() {
    // The sd_notify protocol without systemd: a datagram socket stands in for
    // systemd's notify socket. The step hangs through a debug-build failpoint
    // (a call without a deadline would look the same).
    let tmp = TempDir::new("conv-stuck");
    let d = tmp.path();
    let sock_path = d.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("bind notify socket");
    let comps = d.join("components.yaml");
    std::fs::write(
        &comps,
        format!(
            "apiVersion: nodekeeper.io/v1\nkind: Component\nmetadata: {{name: stuck}}\nspec:\n  version: \"1\"\n  files:\n  - {{path: {}, template: \"x\\n\"}}\n",
            d.join("stuck.conf").display()
        ),
    )
    .expect("components");
    let agent = Agent::start_env(
        d,
        "stuck-node",
        None,
        &format!(
            "converge: {{intervalSeconds: 1, stuckAfterSeconds: 2, components: [\"{}\"]}}\n",
            comps.display()
        ),
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().expect("utf8")),
            ("WATCHDOG_USEC", "200000"),
            ("NODEKEEPER_FAILPOINT", "Staging:hang"),
        ],
    );
    // Every notification, with when it came (read all the time, as systemd does).
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<std::time::Instant>::new()));
    {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n) = sock.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
                    seen.lock().expect("lock").push(std::time::Instant::now());
                }
            }
        });
    }
    let ev = wait_for("ConvergeStuck event", T, || {
        let (_, body) = nodekeeper_e2e::http_unix(&agent.socket, "GET", "/v1/events", "").ok()?;
        body.contains("ConvergeStuck").then_some(body)
    });
    let noticed = std::time::Instant::now();
    assert!(ev.contains("component stuck: Staging"), "{ev}");
    let (_, metrics) = nodekeeper_e2e::http_unix(&agent.socket, "GET", "/metrics", "").expect("metrics");
    assert!(metrics.contains("nodekeeper_agent_converge_stuck 1"), "{metrics}");
    std::thread::sleep(Duration::from_millis(1500));
    let pings = seen.lock().expect("lock").clone();
    assert!(pings.len() >= 3, "pings while the step was young: {}", pings.len());
    let late = pings
        .iter()
        .filter(|t| **t > noticed + Duration::from_millis(300))
        .count();
    assert_eq!(late, 0, "watchdog pings must stop while the converge thread is stuck");
    assert!(agent.status().is_some(), "the socket still answers");
    assert!(agent.log().contains("withholding watchdog pings"), "{}", agent.log());
}
