//! Fault detection from logs: node-problem-detector's rule files and kernel
//! fixtures through the agent's matcher (`nodekeeper-agent test-rules`).

use std::path::PathBuf;
use std::process::Command;

use nodekeeper_e2e::{TempDir, bin};

/// `nodekeeper-agent test-rules -o json` over `input` with `rules`; it must succeed.
fn test_rules_json(input: &std::path::Path, rules: &[PathBuf]) -> serde_json::Value {
    let out = Command::new(bin("nodekeeper-agent"))
        .args(["test-rules", "-o", "json", "--input"])
        .arg(input)
        .arg("--rules")
        .args(rules)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("json")
}

fn npd() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/npd")
}

#[test]
fn test_rules_finds_every_npd_kernel_fixture_problem() {
    let tmp = TempDir::new("testrules");
    // Every fixture, with ordinary lines between them.
    let mut log = String::new();
    let mut dir: Vec<_> = std::fs::read_dir(npd().join("kernel-log-problems"))
        .expect("fixtures")
        .flatten()
        .collect();
    dir.sort_by_key(|e| e.file_name());
    for e in dir {
        log.push_str("IPv6: ADDRCONF(NETDEV_CHANGE): veth1: link becomes ready\n");
        log.push_str(&std::fs::read_to_string(e.path()).expect("fixture"));
        if !log.ends_with('\n') {
            log.push('\n');
        }
    }
    let input = tmp.path().join("kmsg.log");
    std::fs::write(&input, &log).expect("write");
    let v = test_rules_json(
        &input,
        &[
            npd().join("config/kernel-monitor.json"),
            npd().join("config/readonly-monitor.json"),
        ],
    );
    let counts = &v["counts"];
    for (reason, n) in [
        ("OOMKilling", 1),
        ("TaskHung", 2),
        ("KernelOops", 2),
        ("DockerHung", 1),
        ("FilesystemIsReadOnly", 1),
        ("UnregisterNetDevice", 1),
    ] {
        assert_eq!(counts[reason], n, "{reason} in {counts}");
    }
    let docker = v["matches"]
        .as_array()
        .expect("matches")
        .iter()
        .find(|m| m["reason"] == "DockerHung")
        .expect("DockerHung");
    assert_eq!(docker["type"], "permanent");
    assert_eq!(docker["condition"], "KernelDeadlock");
    assert!(docker["line"].as_u64() > Some(1));
    assert_eq!(v["lines"].as_u64(), Some(log.lines().count() as u64));

    // The table form names the same problems.
    let out = Command::new(bin("nodekeeper-agent"))
        .args(["test-rules", "--input"])
        .arg(&input)
        .arg("--rules")
        .arg(npd().join("config/kernel-monitor.json"))
        .output()
        .expect("run");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("OOMKilling") && table.contains("KernelDeadlock"),
        "{table}"
    );
}

#[test]
fn test_rules_refuses_a_bad_rule_file_naming_file_rule_and_reason() {
    let tmp = TempDir::new("badrules");
    let rules = tmp.path().join("bad.json");
    std::fs::write(
        &rules,
        r#"{"plugin": "kmsg", "source": "s", "conditions": [], "rules": [
             {"type": "temporary", "reason": "Fine", "pattern": "ok"},
             {"type": "permanent", "condition": "Nope", "reason": "X", "pattern": "boom"}]}"#,
    )
    .expect("write");
    let input = tmp.path().join("in.log");
    std::fs::write(&input, "boom\n").expect("write");
    let out = Command::new(bin("nodekeeper-agent"))
        .args(["test-rules", "--input"])
        .arg(&input)
        .arg("--rules")
        .arg(&rules)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.json") && err.contains("rules[1].condition") && err.contains("\"Nope\""),
        "{err}"
    );
}

/// Writes one line to the real /dev/kmsg (one open per line: the device
/// rate-limits each open descriptor).
fn kmsg(line: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .expect("open /dev/kmsg (tests run as root)");
    f.write_all(format!("<3>{line}\n").as_bytes()).expect("write /dev/kmsg");
}

fn tagged(node: &serde_json::Value, reason: &str, tag: &str) -> u64 {
    node["status"]["recentEvents"]
        .as_array()
        .map(|es| {
            es.iter()
                .filter(|e| e["reason"] == reason && e["message"].as_str().is_some_and(|m| m.contains(tag)))
                .map(|e| e["count"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn kernel_log_problems_from_real_kmsg_reach_socket_hub_and_metrics_without_replay() {
    use nodekeeper_e2e::{Agent, Hub, http_unix, wait_for};
    let _lock = nodekeeper_e2e::KmsgLock::take();
    use std::time::Duration;
    const T: Duration = Duration::from_secs(30);
    let tmp = TempDir::new("kmsg");
    let tag = format!("nk-e2e-kmsg-{}", std::process::id());
    let hub = Hub::start(tmp.path(), "");
    let rules = format!(
        "detectors:\n  defaultRules: false\n  logMonitors:\n  - {}\n  - {}\n",
        npd().join("config/kernel-monitor.json").display(),
        npd().join("config/readonly-monitor.json").display()
    );
    let mut agent = Agent::start(tmp.path(), "node-kmsg", Some(&hub.grpc_url()), &rules);
    wait_for("node Ready", T, || {
        hub.node("node-kmsg").filter(|n| nodekeeper_e2e::ready(n) == "True")
    });

    // NPD's own kernel fixtures, unchanged but for a unique tag in front.
    for f in ["oom_kill", "readonly_filesystem", "docker_hung"] {
        for line in std::fs::read_to_string(npd().join("kernel-log-problems").join(f))
            .expect("fixture")
            .lines()
        {
            if !line.trim().is_empty() {
                kmsg(&format!("{tag}: {line}"));
            }
        }
    }
    let node = wait_for("problems at the hub", T, || {
        hub.node("node-kmsg").filter(|n| {
            let conds = n["status"]["conditions"].as_array().cloned().unwrap_or_default();
            let ro = conds
                .iter()
                .any(|c| c["type"] == "ReadonlyFilesystem" && c["status"] == "True");
            let dl = conds
                .iter()
                .any(|c| c["type"] == "KernelDeadlock" && c["status"] == "True");
            ro && dl && tagged(n, "OOMKilling", &tag) == 1
        })
    });
    assert!(
        tagged(&node, "TaskHung", &tag) >= 1,
        "{}",
        node["status"]["recentEvents"]
    );

    // The node's own socket and metrics.
    let (_, body) = http_unix(&agent.socket, "GET", "/v1/conditions", "").expect("conditions");
    let conds: serde_json::Value = serde_json::from_str(&body).expect("json");
    let ro = conds["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|c| c["type"] == "ReadonlyFilesystem")
        .expect("ReadonlyFilesystem")
        .clone();
    assert_eq!(ro["status"], "True");
    assert_eq!(ro["reason"], "FilesystemIsReadOnly");
    let (_, metrics) = http_unix(&agent.socket, "GET", "/metrics", "").expect("metrics");
    assert!(metrics.contains("problem_counter{reason=\"OOMKilling\"}"), "{metrics}");
    assert!(
        metrics.contains("problem_gauge{type=\"ReadonlyFilesystem\",reason=\"FilesystemIsReadOnly\"} 1"),
        "{metrics}"
    );
    let desc = String::from_utf8_lossy(&hub.nkctl(&["describe", "node", "node-kmsg"]).stdout).into_owned();
    assert!(
        desc.contains("ReadonlyFilesystem") && desc.contains("OOMKilling"),
        "{desc}"
    );
    // problem_counter as NPD exports it: a counter under its exact name, every
    // reason of the loaded rules present from the start (at 0 until seen), and
    // only problems counted (not the agent's own lifecycle events).
    assert!(metrics.contains("# TYPE problem_counter counter\n"), "{metrics}");
    // Every reason of NPD's two rule files is exported, seen or not (lines of
    // other tests within the lookback may have counted some already).
    for f in ["config/kernel-monitor.json", "config/readonly-monitor.json"] {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(npd().join(f)).expect("rules")).expect("json");
        for r in v["rules"].as_array().expect("rules") {
            let series = format!(
                "problem_counter{{reason=\"{}\"}} ",
                r["reason"].as_str().expect("reason")
            );
            assert!(metrics.contains(&series), "{series}: {metrics}");
        }
    }
    assert!(!metrics.contains("reason=\"AgentStarted\""), "{metrics}");
    assert!(!metrics.contains("problem_counter_total"), "{metrics}");

    // A second filesystem goes read-only while the condition is True: NPD
    // drops it; nodekeeper counts it and keeps the latest occurrence.
    let second = format!("{tag}: EXT4-fs (sdz9): Remounting filesystem read-only");
    kmsg(&second);
    let repeated = |c: &serde_json::Value| {
        // At least 2: lines of earlier runs within the rules' lookback count too.
        c["type"] == "ReadonlyFilesystem"
            && c["count"].as_u64().is_some_and(|n| n >= 2)
            && c["latestMessage"] == second.as_str()
    };
    wait_for("the repeat counted at the hub", T, || {
        hub.node("node-kmsg").filter(|n| {
            n["status"]["conditions"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(repeated))
        })
    });
    let (_, body) = http_unix(&agent.socket, "GET", "/v1/conditions", "").expect("conditions");
    let conds: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert!(
        conds["items"].as_array().is_some_and(|cs| cs.iter().any(repeated)),
        "{body}"
    );
    let desc = String::from_utf8_lossy(&hub.nkctl(&["describe", "node", "node-kmsg"]).stdout).into_owned();
    assert!(desc.contains(" times; latest ") && desc.contains("sdz9"), "{desc}");

    // Restart: a line written while the agent is down is read (no gap), the
    // ones before are not read again (no replay), conditions stay True.
    assert!(agent.terminate().success());
    kmsg(&format!(
        "{tag}: Killed process 4242 (gap-check) total-vm:1kB, anon-rss:1kB, file-rss:1kB, shmem-rss:0kB"
    ));
    agent.restart();
    let (_, body) = http_unix(&agent.socket, "GET", "/v1/conditions", "").expect("conditions");
    assert!(
        body.contains("\"status\":\"True\""),
        "conditions restored after restart: {body}"
    );
    let (_, metrics) = http_unix(&agent.socket, "GET", "/metrics", "").expect("metrics");
    assert!(
        metrics.contains("problem_gauge{type=\"ReadonlyFilesystem\",reason=\"FilesystemIsReadOnly\"} 1"),
        "a restored condition keeps its gauge: {metrics}"
    );
    let node = wait_for("the line written while down", T, || {
        hub.node("node-kmsg").filter(|n| {
            n["status"]["recentEvents"].as_array().is_some_and(|es| {
                es.iter()
                    .any(|e| e["message"].as_str().is_some_and(|m| m.contains("gap-check")))
            })
        })
    });
    assert_eq!(
        tagged(&node, "OOMKilling", &tag),
        2,
        "the first OOM line was not replayed, the new one arrived"
    );
}

fn boom_count(node: &serde_json::Value, message: &str) -> u64 {
    node["status"]["recentEvents"]
        .as_array()
        .map(|es| {
            es.iter()
                .filter(|e| e["message"] == message)
                .map(|e| e["count"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

fn rss_kib(agent_config: &std::path::Path) -> u64 {
    // The agent's pid is not in its status document; find it by its config path.
    let out = Command::new("pgrep")
        .arg("-f")
        .arg(agent_config)
        .output()
        .expect("pgrep");
    let pid = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("0")
        .trim()
        .to_string();
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn file_log_survives_rotation_both_ways_restart_and_a_flood() {
    use nodekeeper_e2e::{Agent, Hub, wait_for};
    use std::io::Write;
    use std::time::Duration;
    const T: Duration = Duration::from_secs(60);
    let tmp = TempDir::new("filelog");
    let log = tmp.path().join("app.log");
    std::fs::write(&log, "old line before the agent started: Boom 0\n").expect("log");
    let rules = tmp.path().join("app-rules.yaml");
    std::fs::write(
        &rules,
        format!(
            "plugin: filelog\nlogPath: {}\nsource: app-monitor\nbufferSize: 1\nconditions: []\nrules:\n- {{type: temporary, reason: AppBoom, pattern: 'Boom \\w+'}}\n",
            log.display()
        ),
    )
    .expect("rules");
    let hub = Hub::start(tmp.path(), "");
    let cfg = format!(
        "detectors:\n  defaultRules: false\n  logMonitors: [{}]\n",
        rules.display()
    );
    let mut agent = Agent::start(tmp.path(), "node-file", Some(&hub.grpc_url()), &cfg);
    let append = |text: &str| {
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).expect("append");
        f.write_all(text.as_bytes()).expect("write");
    };
    let seen = |msg: &str, n: u64| {
        wait_for(&format!("{msg} x{n} at the hub"), T, || {
            hub.node("node-file").filter(|node| boom_count(node, msg) == n)
        })
    };
    // Written by the agent's own start? No: the file existed before; without
    // timestamps the first start reads from the end, so Boom 0 is not seen.
    append("Boom 1\n");
    seen("Boom 1", 1);

    // Rotation by rename: the old file is finished, the new one read from its start.
    append("Boom 2\n");
    std::fs::rename(&log, tmp.path().join("app.log.1")).expect("rename");
    std::fs::write(&log, "Boom 3\n").expect("new file");
    seen("Boom 2", 1);
    seen("Boom 3", 1);

    // Rotation by copytruncate.
    std::fs::copy(&log, tmp.path().join("app.log.2")).expect("copy");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .expect("open")
        .set_len(0)
        .expect("truncate");
    std::thread::sleep(Duration::from_millis(500));
    append("Boom 4\n");
    seen("Boom 4", 1);

    // Restart: a line written while the agent is down arrives once; nothing is replayed.
    assert!(agent.terminate().success());
    append("Boom 5\n");
    agent.restart();
    seen("Boom 5", 1);

    // A flood of a million identical lines: aggregated, memory bounded, and
    // detection keeps working.
    let flood = "Boom flood\n".repeat(1_000_000);
    append(&flood);
    append("Boom after\n");
    seen("Boom after", 1);
    let node = seen("Boom flood", 1_000_000);
    let received = node["status"]["reportsReceived"].as_u64().unwrap_or(0);
    assert!(
        received < 100,
        "a flood must not become an event storm: {received} reports"
    );
    let rss = rss_kib(&agent.config);
    assert!(rss > 0 && rss < 200 * 1024, "agent RSS {rss} KiB after the flood");
    for m in ["Boom 0", "Boom 1", "Boom 2", "Boom 3", "Boom 4", "Boom 5"] {
        assert!(boom_count(&node, m) <= 1, "{m} counted twice");
    }
    assert_eq!(
        boom_count(&node, "Boom 0"),
        0,
        "lines before the first start are not read without timestamps"
    );
}

/// Appends entries to a journal file with the real systemd-journal-remote
/// (LAB.md: journal files without a daemon); the agent follows them with libsystemd's reader.
fn journal_append(dir: &std::path::Path, identifier: &str, messages: &[&str], mono_base: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let mut export = String::new();
    for (i, m) in messages.iter().enumerate() {
        export.push_str(&format!(
            "__REALTIME_TIMESTAMP={}\n__MONOTONIC_TIMESTAMP={}\n_BOOT_ID=0123456789abcdef0123456789abcdef\nSYSLOG_IDENTIFIER={identifier}\nMESSAGE={m}\n\n",
            now + i as u64,
            mono_base + i as u64
        ));
    }
    let mut child = Command::new("/lib/systemd/systemd-journal-remote")
        .arg("-o")
        .arg(dir.join("test.journal"))
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("systemd-journal-remote (apt-get install systemd-journal-remote)");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(export.as_bytes())
        .expect("write");
    assert!(child.wait().expect("wait").success());
}

#[test]
fn journald_problems_are_found_and_the_cursor_survives_a_restart() {
    use nodekeeper_e2e::{Agent, Hub, wait_for};
    use std::time::Duration;
    const T: Duration = Duration::from_secs(30);
    let tmp = TempDir::new("journald");
    let journal = tmp.path().join("journal");
    std::fs::create_dir_all(&journal).expect("dir");
    journal_append(
        &journal,
        "containerd",
        &["level=info msg=\"starting containerd\""],
        1000,
    );
    let rules = tmp.path().join("containerd.yaml");
    std::fs::write(
        &rules,
        format!(
            "plugin: journald\npluginConfig: {{source: containerd}}\nlogPath: {}\nsource: containerd-monitor\nconditions: [{{type: ContainerRuntimeUnhealthy, reason: ContainerdIsHealthy, message: ok}}]\nrules:\n- {{type: temporary, reason: ContainerdShimFailed, pattern: 'failed to start shim: .*'}}\n- {{type: permanent, condition: ContainerRuntimeUnhealthy, reason: ContainerdDeadlock, pattern: 'containerd is stuck: .*'}}\n",
            journal.display()
        ),
    )
    .expect("rules");
    // A second journald monitor, of another identifier: both are served by
    // one in-process reader (no journalctl), and each sees only its own entries.
    let kubelet_rules = tmp.path().join("kubelet.yaml");
    std::fs::write(
        &kubelet_rules,
        format!(
            "plugin: journald\npluginConfig: {{source: kubelet}}\nlogPath: {}\nsource: kubelet-monitor\nconditions: []\nrules:\n- {{type: temporary, reason: KubeletSawShim, pattern: 'failed to start shim: .*'}}\n",
            journal.display()
        ),
    )
    .expect("rules");
    let hub = Hub::start(tmp.path(), "");
    let cfg = format!(
        "detectors:\n  defaultRules: false\n  logMonitors: [{}, {}]\n",
        rules.display(),
        kubelet_rules.display()
    );
    let mut agent = Agent::start(tmp.path(), "node-jd", Some(&hub.grpc_url()), &cfg);
    // The journal is read by the agent itself: libsystemd mapped into its
    // process, no helper process at all.
    let pid = agent.pid().expect("agent pid");
    wait_for("libsystemd loaded by the agent", T, || {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        maps.contains("libsystemd.so.0").then_some(())
    });
    assert!(
        agent.children().is_empty(),
        "no helper process reads the journal: {:?}",
        agent.children()
    );
    journal_append(
        &journal,
        "containerd",
        &[
            "failed to start shim: exec: runc: not found",
            "containerd is stuck: grpc deadline",
        ],
        2000,
    );
    journal_append(
        &journal,
        "kubelet",
        &["failed to start shim: not containerd's line"],
        3000,
    );
    let shim = |n: &serde_json::Value| boom_count(n, "failed to start shim: exec: runc: not found");
    wait_for("journal problems at the hub", T, || {
        hub.node("node-jd").filter(|n| {
            shim(n) == 1
                && n["status"]["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "ContainerRuntimeUnhealthy" && c["status"] == "True")
                })
        })
    });
    let kubelet_saw = |n: &serde_json::Value| {
        n["status"]["recentEvents"].as_array().is_some_and(|es| {
            es.iter().any(|e| {
                e["reason"] == "KubeletSawShim" && e["message"] == "failed to start shim: not containerd's line"
            })
        })
    };
    let node = wait_for("the kubelet monitor's own entry", T, || {
        hub.node("node-jd").filter(|n| kubelet_saw(n))
    });
    assert_eq!(
        boom_count(&node, "failed to start shim: not containerd's line"),
        1,
        "the kubelet entry reaches the kubelet monitor only, not the containerd one"
    );
    assert!(
        !node["status"]["recentEvents"].as_array().is_some_and(|es| es
            .iter()
            .any(|e| e["reason"] == "KubeletSawShim" && e["message"] == "failed to start shim: exec: runc: not found")),
        "the containerd entry does not reach the kubelet monitor"
    );

    assert!(agent.terminate().success());
    journal_append(
        &journal,
        "containerd",
        &["failed to start shim: while the agent was down"],
        4000,
    );
    agent.restart();
    let node = wait_for("the entry written while down", T, || {
        hub.node("node-jd")
            .filter(|n| boom_count(n, "failed to start shim: while the agent was down") == 1)
    });
    assert_eq!(shim(&node), 1, "nothing replayed after the restart");
}

/// Samples for every rule of the built-in kernel rules: (reason, kernel era or
/// architecture, line in that kernel's wording, from its printk format string).
/// Each reason has samples of at least two eras.
const KERNEL_SAMPLES: &[(&str, &str, &str)] = &[
    (
        "OOMKilling",
        "3.10",
        "Killed process 2592 (java) total-vm:7466184kB, anon-rss:5624044kB, file-rss:0kB",
    ),
    (
        "OOMKilling",
        "5.x",
        "Out of memory: Killed process 1012 (heapster) total-vm:327128kB, anon-rss:306328kB, file-rss:11132kB, shmem-rss:0kB, UID:0 pgtables:700kB oom_score_adj:0",
    ),
    (
        "OOMKilling",
        "6.x memcg",
        "Memory cgroup out of memory: Killed process 3521 (python3) total-vm:1928404kB, anon-rss:1040328kB, file-rss:9216kB, shmem-rss:0kB, UID:1000 pgtables:2224kB oom_score_adj:999",
    ),
    (
        "TaskHung",
        "3.10",
        "INFO: task jbd2/sda1-8:312 blocked for more than 120 seconds.",
    ),
    (
        "TaskHung",
        "6.x",
        "INFO: task kworker/u16:3:2843 blocked for more than 122 seconds.",
    ),
    (
        "DockerHung",
        "3.10",
        "INFO: task docker:20744 blocked for more than 120 seconds.",
    ),
    (
        "DockerHung",
        "5.x",
        "INFO: task docker:3156 blocked for more than 241 seconds.",
    ),
    (
        "ContainerdHung",
        "4.x",
        "INFO: task containerd:1234 blocked for more than 120 seconds.",
    ),
    (
        "ContainerdHung",
        "6.x",
        "INFO: task containerd:8812 blocked for more than 245 seconds.",
    ),
    (
        "SoftLockup",
        "3.10",
        "BUG: soft lockup - CPU#3 stuck for 22s! [kworker/3:1:123]",
    ),
    (
        "SoftLockup",
        "5.x",
        "watchdog: BUG: soft lockup - CPU#12 stuck for 23s! [containerd-shim:41321]",
    ),
    ("HardLockup", "3.10", "Watchdog detected hard LOCKUP on cpu 3"),
    (
        "HardLockup",
        "5.x arm64",
        "watchdog: Watchdog detected hard LOCKUP on cpu 5",
    ),
    (
        "RCUStall",
        "3.10",
        "INFO: rcu_sched self-detected stall on CPU { 3}  (t=60000 jiffies g=1234 c=1233 q=88)",
    ),
    (
        "RCUStall",
        "4.x",
        "INFO: rcu_preempt detected stalls on CPUs/tasks: { 2} (detected by 0, t=21002 jiffies, g=4460, c=4459, q=37)",
    ),
    ("RCUStall", "5.x", "rcu: INFO: rcu_sched self-detected stall on CPU"),
    (
        "RCUStall",
        "6.x",
        "rcu: INFO: rcu_preempt detected expedited stalls on CPUs/tasks: { 7-... } 21 jiffies s: 1957 root: 0x1/.",
    ),
    (
        "UnregisterNetDevice",
        "4.x",
        "unregister_netdevice: waiting for lo to become free. Usage count = 1",
    ),
    (
        "UnregisterNetDevice",
        "6.x",
        "unregister_netdevice: waiting for eth0 to become free. Usage count = 2",
    ),
    (
        "KernelOops",
        "4.x x86",
        "BUG: unable to handle kernel NULL pointer dereference at 0000000000000008",
    ),
    (
        "KernelOops",
        "4.x x86",
        "BUG: unable to handle kernel paging request at ffffffffc0a1b2c0",
    ),
    (
        "KernelOops",
        "5.x x86",
        "BUG: kernel NULL pointer dereference, address: 0000000000000010",
    ),
    (
        "KernelOops",
        "5.x x86",
        "BUG: unable to handle page fault for address: ffffb4e1c1a2f000",
    ),
    (
        "KernelOops",
        "5.x ppc64le",
        "BUG: Kernel NULL pointer dereference on read at 0x00000000",
    ),
    (
        "KernelOops",
        "5.x ppc64le",
        "BUG: Unable to handle kernel data access on write at 0xc00000000ab00000",
    ),
    (
        "KernelOops",
        "5.x arm64",
        "Unable to handle kernel NULL pointer dereference at virtual address 0000000000000008",
    ),
    (
        "KernelOops",
        "4.x arm64",
        "Unable to handle kernel paging request at virtual address ffff000008f4d000",
    ),
    (
        "KernelOops",
        "4.x ppc64le",
        "Unable to handle kernel paging request for data at address 0x00000008",
    ),
    ("KernelOops", "3.10", "divide error: 0000 [#1] SMP"),
    ("KernelOops", "4.x", "general protection fault: 0000 [#1] SMP PTI"),
    (
        "KernelOops",
        "5.x",
        "general protection fault, probably for non-canonical address 0xdead000000000100: 0000 [#1] SMP NOPTI",
    ),
    ("KernelOops", "5.x", "invalid opcode: 0000 [#1] PREEMPT SMP NOPTI"),
    (
        "KernelOops",
        "5.x arm64",
        "Internal error: Oops: 96000005 [#1] PREEMPT SMP",
    ),
    (
        "KernelOops",
        "4.x ppc64le",
        "Oops: Kernel access of bad area, sig: 11 [#1]",
    ),
    ("KernelBug", "3.10", "kernel BUG at fs/ext4/inode.c:2645!"),
    ("KernelBug", "6.x", "kernel BUG at mm/filemap.c:1530!"),
    (
        "MachineCheck",
        "4.x",
        "mce: [Hardware Error]: Machine check events logged",
    ),
    (
        "MachineCheck",
        "3.10",
        "[Hardware Error]: CPU 0: Machine Check Exception: 4 Bank 5: be00000000800400",
    ),
    (
        "MachineCheck",
        "5.x",
        "mce: [Hardware Error]: CPU 3: Machine Check: 0 Bank 7: cc00008000010090",
    ),
    (
        "MachineCheck",
        "6.x",
        "mce: [Hardware Error]: CPU 12: Machine Check Exception: 5 Bank 4: b200000000070f0f",
    ),
    (
        "MachineCheck",
        "5.x ppc64le",
        "Severe Machine check interrupt [Not recovered]",
    ),
    (
        "MachineCheck",
        "5.x arm64",
        "SError Interrupt on CPU3, code 0xbe000011 -- SError",
    ),
    (
        "CperHardwareErrorCorrected",
        "4.x",
        "{1}[Hardware Error]: event severity: corrected",
    ),
    (
        "CperHardwareErrorCorrected",
        "6.x arm64",
        "[Firmware Warn]: GHES: {2}[Hardware Error]: event severity: corrected",
    ),
    (
        "CperHardwareErrorRecoverable",
        "4.x",
        "{2}[Hardware Error]: event severity: recoverable",
    ),
    (
        "CperHardwareErrorRecoverable",
        "6.x",
        "{3}[Hardware Error]: event severity: recoverable",
    ),
    (
        "CperHardwareErrorFatal",
        "4.x",
        "{1}[Hardware Error]: event severity: fatal",
    ),
    (
        "CperHardwareErrorFatal",
        "6.x",
        "[Hardware Error]: event severity: fatal",
    ),
    (
        "MemoryCorrectableError",
        "3.10",
        "EDAC MC0: 1 CE error on CPU#0Channel#1_DIMM#0 (channel:1 slot:0 page:0x0 offset:0x0 grain:8 syndrome:0x0)",
    ),
    (
        "MemoryCorrectableError",
        "5.x",
        "EDAC MC1: 1 CE memory read error on CPU_SrcID#1_MC#0_Chan#2_DIMM#0 (channel:2 slot:0 page:0x1e3f4c offset:0x0 grain:32 syndrome:0x0)",
    ),
    (
        "MemoryUncorrectableError",
        "3.10",
        "EDAC MC0: 1 UE error on CPU#0Channel#0_DIMM#1 (channel:0 slot:1 page:0x0 offset:0x0 grain:8)",
    ),
    (
        "MemoryUncorrectableError",
        "5.x",
        "EDAC MC0: 1 UE memory read error on CPU_SrcID#0_MC#1_Chan#0_DIMM#0 (channel:0 slot:0 page:0x3f2ab offset:0x0 grain:32)",
    ),
    (
        "MemoryReadError",
        "4.x",
        "CE memory read error on CPU_SrcID#0_Ha#0_Chan#1_DIMM#0 (channel:1 slot:0)",
    ),
    (
        "MemoryReadError",
        "5.x",
        "CE memory read error on CPU_SrcID#1_MC#0_Chan#2_DIMM#0 (channel:2 slot:0 page:0x1)",
    ),
    ("NVMeTimeout", "4.x", "nvme nvme0: I/O 123 QID 4 timeout, aborting"),
    (
        "NVMeTimeout",
        "5.x",
        "nvme nvme1: I/O 881 QID 2 timeout, reset controller",
    ),
    (
        "NVMeTimeout",
        "6.x",
        "nvme nvme0: I/O tag 321 (0141) opcode 0x2 (I/O Cmd) QID 7 timeout, aborting req_op:READ(0) size:4096",
    ),
    (
        "NVMeControllerDown",
        "4.x",
        "nvme nvme0: controller is down; will reset: CSTS=0xffffffff, PCI_STATUS=0xffff",
    ),
    (
        "NVMeControllerDown",
        "6.x",
        "nvme nvme2: Device not ready; aborting reset, CSTS=0x1",
    ),
    (
        "SCSITimeout",
        "3.10",
        "sd 0:0:0:0: [sda] Result: hostbyte=DID_TIME_OUT driverbyte=DRIVER_OK",
    ),
    (
        "SCSITimeout",
        "5.x",
        "sd 2:0:0:0: [sdb] tag#12 FAILED Result: hostbyte=DID_TIME_OUT driverbyte=DRIVER_OK cmd_age=30s",
    ),
    (
        "SCSITimeout",
        "4.x",
        "sd 1:0:0:0: [sdc] tag#3 timing out command, waited 180s",
    ),
    ("IOError", "3.10", "end_request: I/O error, dev sda, sector 8923488"),
    (
        "IOError",
        "4.x",
        "blk_update_request: I/O error, dev sdb, sector 2048 op 0x1:(WRITE) flags 0x800 phys_seg 1 prio class 0",
    ),
    (
        "IOError",
        "5.x",
        "print_req_error: I/O error, dev nvme0n1, sector 12345",
    ),
    (
        "IOError",
        "6.x",
        "I/O error, dev sda, sector 209715200 op 0x0:(READ) flags 0x80700 phys_seg 1 prio class 2",
    ),
    (
        "IOError",
        "6.x",
        "critical medium error, dev sdc, sector 1234567 op 0x0:(READ) flags 0x0 phys_seg 1 prio class 0",
    ),
    ("IOError", "3.10", "Buffer I/O error on device sda1, logical block 1234"),
    (
        "IOError",
        "5.x",
        "Buffer I/O error on dev dm-0, logical block 0, async page read",
    ),
    (
        "Ext4Error",
        "3.10",
        "EXT4-fs error (device sda1): ext4_lookup:1437: inode #2: comm ls: deleted inode referenced: 12",
    ),
    (
        "Ext4Error",
        "6.x",
        "EXT4-fs error (device nvme0n1p1): ext4_validate_block_bitmap:390: comm kworker/u64:2: bg 3: bad block bitmap checksum",
    ),
    (
        "Ext4Warning",
        "4.x",
        "EXT4-fs warning (device sda1): ext4_end_bio:323: I/O error 10 writing to inode 1234 (offset 0 size 4096 starting block 5678)",
    ),
    (
        "Ext4Warning",
        "6.x",
        "EXT4-fs warning (device dm-1): ext4_dx_add_entry:2461: Directory (ino: 2) index full, reach max htree level :2",
    ),
    ("JournalAborted", "3.10", "Aborting journal on device sda1-8."),
    ("JournalAborted", "6.x", "Aborting journal on device dm-0-8."),
    (
        "XfsError",
        "3.10",
        "XFS (sdb1): metadata I/O error: block 0x1e8480 (\"xfs_trans_read_buf_map\") error 5 numblks 8",
    ),
    (
        "XfsError",
        "5.x",
        "XFS (dm-0): Metadata corruption detected at xfs_dinode_verify+0xa5/0x560 [xfs], inode 0x805 dinode",
    ),
    (
        "XfsError",
        "6.x",
        "XFS (sda1): Corruption detected. Unmount and run xfs_repair",
    ),
    (
        "XfsHasShutdown",
        "3.10",
        "XFS (sdb1): Log I/O Error Detected.  Shutting down filesystem",
    ),
    (
        "XfsHasShutdown",
        "6.x",
        "XFS (sda1): Corruption of in-memory data (0x8) detected at xfs_trans_cancel+0x14a/0x170 [xfs] (fs/xfs/xfs_trans.c:1097).  Shutting down filesystem.",
    ),
    (
        "XfsHasShutdown",
        "6.x",
        "XFS (dm-3): Filesystem has been shut down due to log error (0x2).",
    ),
    (
        "BtrfsError",
        "4.x",
        "BTRFS error (device sda1): bad tree block start, want 12345 have 0",
    ),
    (
        "BtrfsError",
        "6.x",
        "BTRFS error (device nvme0n1p2 state EA): parent transid verify failed on logical 30408704 mirror 1 wanted 14 found 12",
    ),
    (
        "BtrfsError",
        "3.10",
        "BTRFS: error (device sdb) in btrfs_commit_transaction:2024: errno=-5 IO failure",
    ),
    (
        "FilesystemIsReadOnly",
        "3.10",
        "EXT4-fs (sda1): Remounting filesystem read-only",
    ),
    (
        "FilesystemIsReadOnly",
        "3.10 ext3",
        "EXT3-fs (sdb1): error: remounting filesystem read-only",
    ),
    (
        "FilesystemIsReadOnly",
        "6.x",
        "FAT-fs (sdc1): Filesystem has been set read-only",
    ),
    (
        "FilesystemIsReadOnly",
        "6.x btrfs",
        "BTRFS info (device sda1 state EA): forced readonly",
    ),
    (
        "FilesystemIsReadOnly",
        "4.x btrfs",
        "BTRFS info (device sdb): forced readonly",
    ),
    (
        "NICTransmitTimeout",
        "3.10",
        "NETDEV WATCHDOG: eth0 (e1000e): transmit queue 0 timed out",
    ),
    (
        "NICTransmitTimeout",
        "6.1",
        "NETDEV WATCHDOG: ens5 (ena): transmit queue 3 timed out 5120 ms",
    ),
    (
        "NICTransmitTimeout",
        "6.8",
        "mlx5_core 0000:3b:00.0 ens1f0np0: NETDEV WATCHDOG: CPU: 12: transmit queue 7 timed out 8192 ms",
    ),
    (
        "GPUXidError",
        "470 driver",
        "NVRM: Xid (PCI:0000:3b:00): 13, pid=1234, Graphics SM Warp Exception on (GPC 0, TPC 0)",
    ),
    (
        "GPUXidError",
        "535 driver",
        "NVRM: Xid (PCI:0000:af:00): 31, pid=4321, name=python3, Ch 00000008, intr 10000000. MMU Fault",
    ),
    (
        "GPUCriticalXid",
        "470 driver",
        "NVRM: Xid (PCI:0000:3b:00): 79, pid=0, GPU has fallen off the bus.",
    ),
    (
        "GPUCriticalXid",
        "535 driver",
        "NVRM: Xid (PCI:0000:18:00): 48, pid=0, name=, An uncorrectable double bit error (DBE) has been detected on GPU in the framebuffer at partition 6, subpartition 0.",
    ),
];

#[test]
fn ordinary_lines_of_a_busy_node_raise_nothing() {
    let decoys = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/kernel/decoys.log");
    let n = std::fs::read_to_string(&decoys).expect("decoys").lines().count();
    assert!(n >= 100, "at least 100 decoys, {n} found");
    let v = test_rules_json(
        &decoys,
        &[PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../agent/rules/kernel.yaml")],
    );
    assert_eq!(v["lines"], n);
    assert_eq!(v["matches"].as_array().map(Vec::len), Some(0), "{}", v["matches"]);
}

#[test]
fn every_built_in_kernel_rule_fires_on_its_sample_through_real_kmsg() {
    use nodekeeper_e2e::{Agent, Hub, wait_for};
    let _lock = nodekeeper_e2e::KmsgLock::take();
    use std::collections::BTreeSet;
    use std::time::Duration;
    let tmp = TempDir::new("defaults");
    let rules_file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../agent/rules/kernel.yaml");
    let rules_text = std::fs::read_to_string(&rules_file).expect("kernel.yaml");
    // Every rule has a sample (reasons read from the shipped file itself).
    let reasons: BTreeSet<String> = rules_text
        .lines()
        .filter(|l| l.starts_with("- {type: temporary") || l.starts_with("- {type: permanent"))
        .filter_map(|l| l.split("reason: ").nth(1)?.split(',').next().map(String::from))
        .collect();
    let sampled: BTreeSet<String> = KERNEL_SAMPLES.iter().map(|(r, _, _)| r.to_string()).collect();
    assert_eq!(reasons, sampled, "each built-in kernel rule needs a sample here");
    for r in &reasons {
        let eras: BTreeSet<&str> = KERNEL_SAMPLES
            .iter()
            .filter(|(x, _, _)| x == r)
            .map(|(_, e, _)| *e)
            .collect();
        assert!(
            eras.len() >= 2,
            "{r} needs samples of at least two kernel eras: {eras:?}"
        );
    }

    // Offline, through test-rules: each sample, alone (a permanent rule's
    // condition changes once), raises its reason.
    let input = tmp.path().join("sample.log");
    for (reason, era, line) in KERNEL_SAMPLES {
        std::fs::write(&input, format!("{line}\n")).expect("write");
        let v = test_rules_json(&input, std::slice::from_ref(&rules_file));
        let hit = v["matches"]
            .as_array()
            .is_some_and(|ms| ms.iter().any(|m| m["reason"] == *reason));
        assert!(hit, "({era}) should raise {reason}: {line}: {}", v["matches"]);
    }

    // Through the real /dev/kmsg to a running agent with its built-in rules.
    let tag = format!("nk-e2e-defaults-{}", std::process::id());
    let hub = Hub::start(tmp.path(), "");
    let _agent = Agent::start(
        tmp.path(),
        "node-def",
        Some(&hub.grpc_url()),
        "detectors: {defaultRules: true}\n",
    );
    wait_for("node Ready", Duration::from_secs(30), || {
        hub.node("node-def").filter(|n| nodekeeper_e2e::ready(n) == "True")
    });
    std::thread::sleep(Duration::from_millis(300));
    // One sample per reason (the hub keeps the node's last 50 events; every
    // sample was tried above).
    let mut sent = BTreeSet::new();
    for (reason, _, line) in KERNEL_SAMPLES {
        if sent.insert(*reason) {
            kmsg(&format!("{tag}: {line}"));
        }
    }
    // Temporary rules give an event per line; a permanent rule gives one only
    // when its condition changes (it may already be True from an earlier
    // line within the rules' 5-minute lookback), so those are checked by
    // their conditions below.
    let permanent = [
        "DockerHung",
        "ContainerdHung",
        "CperHardwareErrorFatal",
        "MemoryUncorrectableError",
        "XfsHasShutdown",
        "FilesystemIsReadOnly",
        "GPUCriticalXid",
    ];
    let temporary: Vec<&String> = sampled.iter().filter(|r| !permanent.contains(&r.as_str())).collect();
    let wanted = [
        ("ReadonlyFilesystem", "FilesystemIsReadOnly"),
        ("KernelDeadlock", "ContainerdHung"),
        ("GPUUnhealthy", "GPUCriticalXid"),
        ("MemoryUncorrectableError", "MemoryUncorrectableError"),
        ("XfsShutdown", "XfsHasShutdown"),
        ("CperHardwareErrorFatal", "CperHardwareErrorFatal"),
    ];
    let has_conditions = |n: &serde_json::Value| {
        let conds = n["status"]["conditions"].as_array().cloned().unwrap_or_default();
        wanted.iter().all(|(t, r)| {
            conds
                .iter()
                .any(|c| c["type"] == *t && c["status"] == "True" && c["reason"] == *r)
        })
    };
    wait_for(
        "every temporary reason and every condition at the hub",
        Duration::from_secs(30),
        || {
            hub.node("node-def")
                .filter(|n| temporary.iter().all(|r| tagged(n, r, &tag) >= 1) && has_conditions(n))
        },
    );
}

/// Sequence numbers of the oldest and newest records in the kernel ring buffer.
fn kmsg_seq_range() -> (u64, u64) {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .expect("open /dev/kmsg");
    let mut buf = vec![0u8; 16384];
    let (mut first, mut last) = (None, 0);
    loop {
        match f.read(&mut buf) {
            Ok(n) if n > 0 => {
                let seq = String::from_utf8_lossy(&buf[..n])
                    .split(',')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                first.get_or_insert(seq);
                last = seq;
            }
            Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => continue,
            _ => break,
        }
    }
    (first.unwrap_or(0), last)
}

#[test]
fn a_kernel_log_overrun_while_the_agent_is_down_is_counted_and_reported() {
    use nodekeeper_e2e::{Agent, Hub, http_unix, wait_for};
    use std::time::Duration;
    let _lock = nodekeeper_e2e::KmsgLock::take();
    let tmp = TempDir::new("overrun");
    let tag = format!("nk-e2e-overrun-{}", std::process::id());
    let rules = tmp.path().join("k.yaml");
    std::fs::write(&rules, format!("plugin: kmsg\nsource: k\nconditions: []\nrules:\n- {{type: temporary, reason: Marker, pattern: '{tag}: marker.*'}}\n")).expect("rules");
    let hub = Hub::start(tmp.path(), "");
    let cfg = format!(
        "detectors:\n  defaultRules: false\n  logMonitors: [{}]\n",
        rules.display()
    );
    let mut agent = Agent::start(tmp.path(), "node-ovr", Some(&hub.grpc_url()), &cfg);
    std::thread::sleep(Duration::from_millis(300));
    kmsg(&format!("{tag}: marker one"));
    wait_for("the marker", Duration::from_secs(30), || {
        hub.node("node-ovr").filter(|n| tagged(n, "Marker", &tag) == 1)
    });
    assert!(agent.terminate().success());

    // Overwrite everything after the agent's position: the oldest record left
    // is newer than the newest one the agent read.
    let (_, newest) = kmsg_seq_range();
    let filler = "x".repeat(900);
    let mut written = 0;
    while kmsg_seq_range().0 <= newest + 1 {
        for _ in 0..200 {
            kmsg(&format!("{tag}: filler {filler}"));
        }
        written += 200;
        assert!(written < 100_000, "the ring buffer did not wrap");
    }
    kmsg(&format!("{tag}: marker two"));
    agent.restart();
    let node = wait_for("the overrun reported", Duration::from_secs(30), || {
        hub.node("node-ovr").filter(|n| {
            tagged(n, "Marker", &tag) == 2
                && n["status"]["recentEvents"]
                    .as_array()
                    .is_some_and(|es| es.iter().any(|e| e["reason"] == "LogOverrun"))
        })
    });
    let ev = node["status"]["recentEvents"]
        .as_array()
        .expect("events")
        .iter()
        .find(|e| e["reason"] == "LogOverrun")
        .expect("overrun")
        .clone();
    assert!(ev["message"].as_str().unwrap_or("").contains("overwritten"), "{ev}");
    let (_, metrics) = http_unix(&agent.socket, "GET", "/metrics", "").expect("metrics");
    let lost: u64 = metrics
        .lines()
        .find(|l| l.starts_with("nodekeeper_agent_log_lost_total{source=\"kmsg\"}"))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or(0);
    assert!(lost > 0, "lost records counted: {metrics}");
}

#[test]
fn a_failing_source_says_so_and_recovers_by_itself() {
    use nodekeeper_e2e::{Agent, Hub, wait_for};
    use std::time::Duration;
    const T: Duration = Duration::from_secs(60);
    let tmp = TempDir::new("srcfail");
    let log = tmp.path().join("later.log");
    let rules = tmp.path().join("r.yaml");
    std::fs::write(
        &rules,
        format!("plugin: filelog\nlogPath: {}\nsource: later\nconditions: []\nrules:\n- {{type: temporary, reason: LaterBoom, pattern: 'Boom .*'}}\n", log.display()),
    )
    .expect("rules");
    let hub = Hub::start(tmp.path(), "");
    let cfg = format!(
        "detectors:\n  defaultRules: false\n  logMonitors: [{}]\n",
        rules.display()
    );
    let _agent = Agent::start(tmp.path(), "node-srcfail", Some(&hub.grpc_url()), &cfg);
    let has = |n: &serde_json::Value, reason: &str| {
        n["status"]["recentEvents"]
            .as_array()
            .is_some_and(|es| es.iter().any(|e| e["reason"] == reason))
    };
    let node = wait_for("the failure reported", T, || {
        hub.node("node-srcfail").filter(|n| has(n, "LogSourceFailed"))
    });
    assert!(node.to_string().contains("later.log"), "the event names the source");
    std::fs::write(&log, "").expect("create");
    wait_for("recovered", T, || {
        hub.node("node-srcfail").filter(|n| has(n, "LogSourceRecovered"))
    });
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&log, "Boom after recovery\n").expect("write");
    wait_for("detection works again", T, || {
        hub.node("node-srcfail")
            .filter(|n| boom_count(n, "Boom after recovery") == 1)
    });
}

#[test]
fn a_detector_set_applied_at_the_hub_runs_on_the_nodes_it_selects() {
    use nodekeeper_e2e::{Agent, Hub, nkctl, wait_for};
    use std::time::Duration;
    const T: Duration = Duration::from_secs(30);
    let tmp = TempDir::new("detectorset");
    let log = tmp.path().join("web.log");
    std::fs::write(&log, "").expect("log");
    let hub = Hub::start(tmp.path(), "");
    let web = Agent::start(tmp.path(), "node-web", Some(&hub.grpc_url()), "labels: {role: web}\n");
    let _db = Agent::start(tmp.path(), "node-db", Some(&hub.grpc_url()), "labels: {role: db}\n");
    let set = format!(
        "apiVersion: nodekeeper.io/v1\nkind: DetectorSet\nmetadata: {{name: web-app}}\nspec:\n  nodeSelector: {{matchLabels: {{role: web}}}}\n  logMonitors:\n  - plugin: filelog\n    logPath: {}\n    source: web-app\n    conditions: [{{type: WebStuck, reason: WebFine, message: ok}}]\n    rules:\n    - {{type: temporary, reason: WebBoom, pattern: 'Boom .*'}}\n    - {{type: permanent, condition: WebStuck, reason: WebHung, pattern: 'web hung'}}\n",
        log.display()
    );
    // A bad one first: refused with the field, nothing stored.
    let bad = set.replace(
        "condition: WebStuck, reason: WebHung",
        "condition: Nope, reason: WebHung",
    );
    let out = nkctl(&hub.http_url(), None, &["apply", "-f", "-"], Some(&bad));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("spec.logMonitors[0].rules[1].condition"));
    let out = nkctl(&hub.http_url(), None, &["apply", "-f", "-"], Some(&set));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    wait_for("both nodes in sync", T, || {
        (hub.summary()["nodes"]["inSync"] == 2).then_some(())
    });
    let ds = hub.get("/v1/detectorsets/web-app").expect("detectorset");
    assert_eq!(ds["status"]["selectedNodes"], 1);
    let st = web.status().expect("status");
    assert_eq!(st["settings"]["detectorSets"][0], "web-app");
    std::thread::sleep(Duration::from_millis(800));
    std::fs::write(&log, "Boom from web\nweb hung\n").expect("write");
    let node = wait_for("the web node detects with the hub's rules", T, || {
        hub.node("node-web").filter(|n| {
            boom_count(n, "Boom from web") == 1
                && n["status"]["conditions"]
                    .as_array()
                    .is_some_and(|cs| cs.iter().any(|c| c["type"] == "WebStuck" && c["status"] == "True"))
        })
    });
    assert_eq!(node["status"]["settings"]["detectorSets"][0], "web-app");
    let db = hub.node("node-db").expect("db");
    assert_eq!(boom_count(&db, "Boom from web"), 0, "the db node is not selected");
    let desc = String::from_utf8_lossy(&hub.nkctl(&["describe", "node", "node-web"]).stdout).into_owned();
    assert!(
        desc.contains("detectorSets=[web-app] logMonitors=1") && desc.contains("WebStuck"),
        "{desc}"
    );
    let table = String::from_utf8_lossy(&hub.nkctl(&["get", "detectorsets"]).stdout).into_owned();
    assert!(table.contains("web-app") && table.contains("role=web"), "{table}");

    // Deleting it stops the monitor on the node.
    assert!(hub.nkctl(&["delete", "ds", "web-app"]).status.success());
    wait_for("the node drops the set", T, || {
        web.status()
            .filter(|s| s["settings"]["detectorSets"].as_array().is_none_or(Vec::is_empty))
    });
    std::thread::sleep(Duration::from_millis(800));
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).expect("append");
    std::io::Write::write_all(&mut f, b"Boom after delete\n").expect("write");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(boom_count(&hub.node("node-web").expect("node"), "Boom after delete"), 0);
}
