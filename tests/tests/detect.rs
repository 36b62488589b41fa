//! Fault detection from logs: node-problem-detector's rule files and kernel
//! fixtures through the agent's matcher (`nodekeeper-agent test-rules`).

use std::path::PathBuf;
use std::process::Command;

use nodekeeper_e2e::{TempDir, bin};

fn npd() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/peers/npd")
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
    let out = Command::new(bin("nodekeeper-agent"))
        .args(["test-rules", "-o", "json", "--input"])
        .arg(&input)
        .arg("--rules")
        .arg(npd().join("config/kernel-monitor.json"))
        .arg(npd().join("config/readonly-monitor.json"))
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
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
