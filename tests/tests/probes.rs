//! Detection beyond logs with real parts: NPD custom-plugin files run with
//! test scripts (the programs they name are the user's), a plugin that hangs
//! and forks, HTTP/TCP/exec probes (an HTTP server stands in for kubelet,
//! which cannot run here), real containerd, real systemd in a container, a
//! real tmpfs filled and remounted, a real veth losing its carrier, real
//! memory pressure from stress-ng, and a prepared sysfs/procfs tree where
//! the device cannot exist here (no EDAC on these machines).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use nodekeeper_e2e::lab::{repo, run};
use nodekeeper_e2e::{Agent, Hub, TempDir, http_unix, nkctl, wait_for};
use serde_json::Value;

const T: Duration = Duration::from_secs(40);

fn conditions(a: &Agent) -> Vec<Value> {
    http_unix(&a.socket, "GET", "/v1/conditions", "")
        .ok()
        .and_then(|(_, b)| serde_json::from_str::<Value>(&b).ok())
        .and_then(|v| v["items"].as_array().cloned())
        .unwrap_or_default()
}

/// A condition's or event's message.
fn message(v: &Value) -> &str {
    v["message"].as_str().unwrap_or_default()
}

fn events(a: &Agent) -> Vec<Value> {
    http_unix(&a.socket, "GET", "/v1/events", "")
        .ok()
        .and_then(|(_, b)| serde_json::from_str::<Value>(&b).ok())
        .and_then(|v| v["items"].as_array().cloned())
        .unwrap_or_default()
}

/// Waits until the condition `kind` from `source` has `status`.
fn wait_cond(a: &Agent, kind: &str, source: &str, status: &str) -> Value {
    wait_cond_for(a, kind, source, status, T)
}

/// [`wait_cond`] with its own patience (signals that build up slowly on a
/// busy machine).
fn wait_cond_for(a: &Agent, kind: &str, source: &str, status: &str, patience: Duration) -> Value {
    let start = std::time::Instant::now();
    loop {
        let all = conditions(a);
        if let Some(c) = all
            .iter()
            .find(|c| c["type"] == kind && c["source"] == source && c["status"] == status)
        {
            return c.clone();
        }
        assert!(
            start.elapsed() < patience,
            "timed out waiting for {kind} from {source} {status}; conditions: {all:#?}\nlog: {}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn script(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("script");
    run(Command::new("chmod").arg("+x").arg(&p));
    p.display().to_string()
}

/// Processes whose name is `comm`, zombies included.
fn processes_named(comm: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(s) = std::fs::read_to_string(e.path().join("stat"))
            && let (Some(o), Some(c)) = (s.find('('), s.rfind(')'))
            && &s[o + 1..c] == comm
        {
            out.push(s);
        }
    }
    out
}

/// An HTTP server answering every request with the status in `code`
/// (kubelet's healthz stands in here: there is no kubelet binary).
fn health_server() -> (String, Arc<AtomicU16>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let code = Arc::new(AtomicU16::new(200));
    let c = code.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let status = c.load(Ordering::Relaxed);
            let body = if status == 200 { "ok" } else { "kubelet is broken" };
            let _ = write!(
                s,
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (addr, code)
}

#[test]
fn npd_plugins_and_probes_report_to_socket_hub_and_metrics_and_hung_plugins_leave_nothing() {
    let tmp = TempDir::new("probes");
    let d = tmp.path();
    let flag = d.join("ntp-down");
    let ntp = script(
        d,
        "check_ntp.sh",
        &format!(
            "if [ -e {} ]; then echo 'ntp service is down'; exit 1; fi\necho ok",
            flag.display()
        ),
    );
    let health = script(d, "health-checker", "echo 'kubelet:10248 refused'; exit 1");
    std::fs::copy("/bin/sleep", d.join("nk-hang-sleep")).expect("sleep copy");
    let s = d.join("nk-hang-sleep").display().to_string();
    // Children in the group, one that leaves it (setsid), one orphaned.
    let hang = script(
        d,
        "hang.sh",
        &format!("{s} 1000 &\nsetsid {s} 1001 &\n( {s} 1002 & )\nexec {s} 1003"),
    );
    let long = script(d, "long.sh", &format!("echo {}; exit 1", "x".repeat(200)));

    // NPD's own files, unchanged but for the programs' paths and, for test
    // speed, the interval.
    let npd = repo().join("tests/fixtures/npd/config");
    let mut files = Vec::new();
    // Every custom-plugin file NPD ships; those without a flag-driven script
    // get one that finds their problem (exit 1, a message naming the reason).
    let mut expect: Vec<(String, String, bool)> = Vec::new(); // (source, type or reason, permanent)
    for f in [
        "custom-plugin-monitor.json",
        "health-checker-kubelet.json",
        "health-checker-containerd.json",
        "health-checker-docker.json",
        "network-problem-monitor.json",
        "iptables-mode-monitor.json",
    ] {
        let mut v: Value =
            serde_json::from_str(&std::fs::read_to_string(npd.join(f)).expect("npd file")).expect("json");
        v["pluginConfig"]["invoke_interval"] = "1s".into();
        let source = v["source"].as_str().unwrap_or_default().to_string();
        for r in v["rules"].as_array_mut().expect("rules") {
            let reason = r["reason"].as_str().unwrap_or_default().to_string();
            let prog = match f {
                "custom-plugin-monitor.json" => ntp.clone(),
                "health-checker-kubelet.json" => health.clone(),
                _ => script(
                    d,
                    &format!("{reason}-{}.sh", files.len()),
                    &format!("echo '{reason} found'; exit 1"),
                ),
            };
            if f != "custom-plugin-monitor.json" {
                if r["type"] == "permanent" {
                    expect.push((
                        source.clone(),
                        r["condition"].as_str().unwrap_or_default().to_string(),
                        true,
                    ));
                } else {
                    expect.push((source.clone(), reason.clone(), false));
                }
            }
            r["path"] = prog.into();
        }
        let p = d.join(f);
        std::fs::write(&p, v.to_string()).expect("write");
        files.push(p.display().to_string());
    }
    let own = d.join("own.yaml");
    std::fs::write(
        &own,
        format!(
            "plugin: custom\npluginConfig: {{invoke_interval: 1s, timeout: 2s, max_output_length: 80, concurrency: 2}}\nsource: own\nconditions:\n- {{type: Hung, reason: NotHung, message: fine}}\n- {{type: Long, reason: Short, message: fine}}\nrules:\n- {{type: permanent, condition: Hung, reason: IsHung, path: {hang}, timeout: 1s, invoke_interval: 1h}}\n- {{type: permanent, condition: Long, reason: IsLong, path: {long}}}\n"
        ),
    )
    .expect("own");
    files.push(own.display().to_string());
    // concurrency: one program at a time, or two; skip_initial_status: no
    // condition before the first result.
    let order = d.join("order.log");
    let step = script(
        d,
        "step.sh",
        &format!(
            "echo \"start $1\" >> {o}; sleep 1; echo \"end $1\" >> {o}",
            o = order.display()
        ),
    );
    let order2 = d.join("order2.log");
    let step2 = script(
        d,
        "step2.sh",
        &format!(
            "echo \"start $1\" >> {o}; sleep 1; echo \"end $1\" >> {o}",
            o = order2.display()
        ),
    );
    let slow = script(d, "slow.sh", "sleep 4; echo fine");
    for (name, body) in [
        (
            "serial.yaml",
            format!(
                "plugin: custom\npluginConfig: {{invoke_interval: 1h, timeout: 10s, concurrency: 1}}\nsource: serial\nconditions: []\nrules:\n- {{type: temporary, reason: A, path: {step}, args: [a]}}\n- {{type: temporary, reason: B, path: {step}, args: [b]}}\n"
            ),
        ),
        (
            "parallel.yaml",
            format!(
                "plugin: custom\npluginConfig: {{invoke_interval: 1h, timeout: 10s, concurrency: 2}}\nsource: parallel\nconditions: []\nrules:\n- {{type: temporary, reason: A, path: {step2}, args: [a]}}\n- {{type: temporary, reason: B, path: {step2}, args: [b]}}\n"
            ),
        ),
        (
            "quiet.yaml",
            format!(
                "plugin: custom\npluginConfig: {{invoke_interval: 1h, timeout: 10s, skip_initial_status: true}}\nsource: quiet\nconditions: [{{type: Quiet, reason: QuietFine, message: fine}}]\nrules:\n- {{type: permanent, condition: Quiet, reason: Loud, path: {slow}}}\n"
            ),
        ),
    ] {
        let p = d.join(name);
        std::fs::write(&p, body).expect("monitor");
        files.push(p.display().to_string());
    }

    let (addr, code) = health_server();
    let hub = Hub::start(d, "");
    let cfg = format!(
        "detectors:\n  defaultRules: false\n  customPluginMonitors: [{}]\n  probes:\n  - {{name: kubelet, periodSeconds: 1, timeoutSeconds: 1, failureThreshold: 2, http: {{url: 'http://{addr}/healthz'}}}}\n  - {{name: port, periodSeconds: 1, timeoutSeconds: 1, failureThreshold: 1, tcp: {{address: '127.0.0.1:1'}}}}\n  - {{name: missing, periodSeconds: 1, timeoutSeconds: 1, exec: {{command: [{}/no-such-program]}}}}\n",
        files.join(", "),
        d.display()
    );
    let agent = Agent::start(d, "node-probe", Some(&hub.grpc_url()), &cfg);

    // NPD's custom plugin: False, True with the output, False again.
    let c = wait_cond(&agent, "NTPProblem", "ntp-custom-plugin-monitor", "False");
    assert_eq!(c["reason"], "NTPIsUp");
    // skip_initial_status: nothing until the slow program has answered.
    assert!(
        !conditions(&agent).iter().any(|c| c["source"] == "quiet"),
        "no initial status with skip_initial_status"
    );
    let c = wait_cond(&agent, "Quiet", "quiet", "False");
    assert_eq!(c["reason"], "QuietFine");
    // concurrency 1: one program after the other; 2: both at once.
    let lines = |p: &Path| -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    };
    wait_for("both serial runs", T, || (lines(&order).len() == 4).then_some(()));
    let l = lines(&order);
    assert!(
        l[0].starts_with("start") && l[1].starts_with("end") && l[2].starts_with("start"),
        "{l:?}"
    );
    wait_for("both parallel runs", T, || (lines(&order2).len() == 4).then_some(()));
    let l = lines(&order2);
    assert!(l[0].starts_with("start") && l[1].starts_with("start"), "{l:?}");
    std::fs::write(&flag, "").expect("flag");
    let c = wait_cond(&agent, "NTPProblem", "ntp-custom-plugin-monitor", "True");
    assert_eq!(
        (c["reason"].as_str(), c["message"].as_str()),
        (Some("NTPIsDown"), Some("ntp service is down"))
    );
    std::fs::remove_file(&flag).expect("unflag");
    let c = wait_cond(&agent, "NTPProblem", "ntp-custom-plugin-monitor", "False");
    assert_eq!(
        c["message"], "ntp service is up",
        "the default message comes back, as in NPD"
    );
    assert!(
        events(&agent)
            .iter()
            .any(|e| e["reason"] == "NTPIsDown" && e["source"] == "ntp-custom-plugin-monitor"),
        "the temporary rule raised an event"
    );
    let c = wait_cond(&agent, "KubeletUnhealthy", "health-checker", "True");
    assert_eq!(c["message"], "kubelet:10248 refused");
    for (source, what, permanent) in &expect {
        if *permanent {
            wait_cond(&agent, what, source, "True");
        } else {
            wait_for(&format!("{what} from {source}"), T, || {
                events(&agent)
                    .into_iter()
                    .find(|e| e["reason"] == *what && e["source"] == *source)
            });
        }
    }

    // A plugin that hangs is Unknown at its timeout, and nothing it started
    // is left, not even a zombie (it runs once: its interval is an hour).
    let c = wait_cond(&agent, "Hung", "own", "Unknown");
    assert!(message(&c).starts_with("Timeout when running plugin"), "{c}");
    wait_for(
        "every process the hung plugin started is gone",
        Duration::from_secs(5),
        || processes_named("nk-hang-sleep").is_empty().then_some(()),
    );
    // A long output is cut with a marker and counted.
    let c = wait_cond(&agent, "Long", "own", "True");
    let m = message(&c);
    assert!(
        m.starts_with(&"x".repeat(80)) && m.contains("[cut at max_output_length 80: 120 bytes more]"),
        "{m}"
    );

    // Probes: an HTTP endpoint turning 500 and back (two failures in a row).
    let c = wait_cond(&agent, "KubeletUnhealthy", "probe/kubelet", "False");
    assert_eq!(c["reason"], "KubeletIsHealthy");
    code.store(500, Ordering::Relaxed);
    let c = wait_cond(&agent, "KubeletUnhealthy", "probe/kubelet", "True");
    assert!(message(&c).contains("HTTP 500 kubelet is broken"), "{c}");
    code.store(200, Ordering::Relaxed);
    wait_cond(&agent, "KubeletUnhealthy", "probe/kubelet", "False");
    // A TCP port nobody listens on.
    wait_cond(&agent, "PortUnhealthy", "probe/port", "True");
    // A probe that cannot run says so once and reports nothing unhealthy.
    let failed = wait_for("ProbeFailed", T, || {
        events(&agent)
            .into_iter()
            .find(|e| e["reason"] == "ProbeFailed" && e["source"] == "probe/missing")
    });
    assert!(message(&failed).contains("no-such-program"), "{failed}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        events(&agent)
            .iter()
            .filter(|e| e["reason"] == "ProbeFailed")
            .map(|e| e["count"].as_u64().unwrap_or(1))
            .sum::<u64>(),
        1,
        "said once"
    );
    assert!(
        !conditions(&agent).iter().any(|c| c["source"] == "probe/missing"),
        "no condition from a probe that cannot run"
    );

    // Metrics.
    let (_, metrics) = http_unix(&agent.socket, "GET", "/metrics", "").expect("metrics");
    assert!(
        metrics.contains("nodekeeper_agent_plugin_output_truncated_total{source=\"own\"}"),
        "{metrics}"
    );
    // The health-checker plugin's condition is True: its gauge reads 1.
    assert!(
        metrics.contains("problem_gauge{type=\"KubeletUnhealthy\",reason=\"KubeletUnhealthy\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nodekeeper_agent_check_runs_total{check=\"probe/kubelet\",result=\"unhealthy\"}"),
        "{metrics}"
    );

    // At the hub, and a probe from a DetectorSet; a bad one is refused with
    // its field.
    wait_for("conditions at the hub", T, || {
        hub.node("node-probe").filter(|n| {
            n["status"]["conditions"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Hung" && c["status"] == "Unknown"))
        })
    });
    let set = format!(
        "apiVersion: nodekeeper.io/v1\nkind: DetectorSet\nmetadata: {{name: edge}}\nspec:\n  probes:\n  - {{name: edge, periodSeconds: 1, timeoutSeconds: 1, failureThreshold: 1, http: {{url: 'http://{addr}/'}}}}\n"
    );
    let bad = set.replace(
        "periodSeconds: 1, timeoutSeconds: 1",
        "periodSeconds: 1, timeoutSeconds: 5",
    );
    let out = nkctl(&hub.http_url(), None, &["apply", "-f", "-"], Some(&bad));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spec.probes[0].timeoutSeconds"),
        "{out:?}"
    );
    let out = nkctl(&hub.http_url(), None, &["apply", "-f", "-"], Some(&set));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_cond(&agent, "EdgeUnhealthy", "probe/edge", "False");
    code.store(503, Ordering::Relaxed);
    wait_for("the hub's probe at the hub", T, || {
        hub.node("node-probe").filter(|n| {
            n["status"]["conditions"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["type"] == "EdgeUnhealthy" && c["status"] == "True"))
        })
    });
    let desc = String::from_utf8_lossy(&hub.nkctl(&["describe", "node", "node-probe"]).stdout).into_owned();
    assert!(desc.contains("EdgeUnhealthy") && desc.contains("NTPProblem"), "{desc}");
    code.store(200, Ordering::Relaxed);

    // The DetectorSet deleted: its probe stops and its condition is retired,
    // on the node and at the hub, instead of staying True forever.
    let out = nkctl(&hub.http_url(), None, &["delete", "detectorset", "edge"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("the probe's condition retired on the node", T, || {
        (!conditions(&agent).iter().any(|c| c["source"] == "probe/edge")).then_some(())
    });
    wait_for("and at the hub", T, || {
        hub.node("node-probe").filter(|n| {
            n["status"]["conditions"]
                .as_array()
                .is_some_and(|cs| !cs.iter().any(|c| c["type"] == "EdgeUnhealthy"))
        })
    });
    assert!(
        conditions(&agent).iter().any(|c| c["type"] == "NTPProblem"),
        "the local checks' conditions stay"
    );
}

/// stress-ng in its own process group, killed with its workers (and only
/// them: other tests run their own) when dropped.
struct Stress(std::process::Child);

impl Stress {
    fn start(args: &[&str]) -> Stress {
        use std::os::unix::process::CommandExt;
        let mut a: Vec<&str> = args.to_vec();
        a.push("--quiet");
        Stress(
            Command::new("stress-ng")
                .args(a)
                .process_group(0)
                .spawn()
                .expect("stress-ng (apt-get install stress-ng)"),
        )
    }
}

impl Drop for Stress {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

fn meminfo_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next().and_then(|k| k.parse::<u64>().ok()))
        .unwrap_or(0)
        * 1024
}

/// adjtimex read another way (python's ctypes): (TIME_ERROR or STA_UNSYNC).
fn unsynced_by_python() -> bool {
    let out = run(Command::new("python3").args([
        "-c",
        // struct timex on LP64: modes, pad, offset, freq, maxerror, esterror, status.
        "import ctypes, struct\nbuf = ctypes.create_string_buffer(512)\nr = ctypes.CDLL(None).adjtimex(buf)\nstatus, = struct.unpack_from('i', buf.raw, 40)\nprint(int(r == 5 or (status & 0x40) != 0))",
    ]));
    String::from_utf8_lossy(&out.stdout).trim() == "1"
}

#[test]
fn resources_and_system_checks_follow_a_real_tmpfs_veth_and_memory_pressure() {
    let tmp = TempDir::new("resources");
    let d = tmp.path();
    let fs = d.join("fs");
    std::fs::create_dir_all(&fs).expect("mount point");
    run(Command::new("mount").args(["-t", "tmpfs", "-o", "size=4m", "nk-test", &fs.display().to_string()]));
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
            let _ = Command::new("ip").args(["link", "del", "nkp0"]).status();
        }
    }
    let _c = Cleanup(fs.display().to_string());
    let _ = Command::new("ip").args(["link", "del", "nkp0"]).status();
    run(Command::new("ip").args(["link", "add", "nkp0", "type", "veth", "peer", "name", "nkp1"]));
    run(Command::new("ip").args(["link", "set", "nkp0", "up"]));
    // MemoryPressure when 1 GiB less than now is available (kubelet's
    // threshold is 100Mi; this machine has far more).
    let enter = meminfo_available().saturating_sub(1 << 30);
    let cfg = format!(
        "detectors:\n  defaultRules: false\n  resources:\n    periodSeconds: 1\n    memory: {{available: {{enter: '{enter}'}}, timing: {{clearSeconds: 0}}}}\n    disk: {{mounts: ['{fs}'], available: {{enter: 50%, exit: 60%}}, timing: {{clearSeconds: 0}}}}\n    pids: {{timing: {{disabled: true}}}}\n    cpu: {{timing: {{disabled: true}}}}\n    io: {{timing: {{disabled: true}}}}\n    load: {{timing: {{disabled: true}}}}\n  hardware:\n    periodSeconds: 1\n    nic: {{interfaces: [nkp0], maxFlaps: 3}}\n    taint: {{disabled: true}}\n    stuckTasks: {{disabled: true}}\n",
        fs = fs.display()
    );
    let mut agent = Agent::start(d, "node-res", None, &cfg);
    // One DiskPressure for every mount, as kubelet has one.
    let disk = "resources";
    wait_cond(&agent, "DiskPressure", disk, "False");
    wait_cond(&agent, "MemoryPressure", "resources", "False");

    // A small tmpfs filled (ENOSPC) and emptied.
    let _ = Command::new("dd")
        .args(["if=/dev/zero", &format!("of={}/fill", fs.display()), "bs=64k"])
        .output();
    let c = wait_cond(&agent, "DiskPressure", disk, "True");
    assert_eq!(c["reason"], "InsufficientDiskSpace");
    assert!(message(&c).contains(&fs.display().to_string()), "{c}");
    std::fs::remove_file(fs.join("fill")).expect("empty");
    wait_cond(&agent, "DiskPressure", disk, "False");

    // Remounted read-only and back.
    run(Command::new("mount").args(["-o", "remount,ro", &fs.display().to_string()]));
    let c = wait_cond(&agent, "ReadonlyFilesystem", "hardware/mounts", "True");
    assert!(message(&c).contains(&fs.display().to_string()), "{c}");
    run(Command::new("mount").args(["-o", "remount,rw", &fs.display().to_string()]));
    wait_cond(&agent, "ReadonlyFilesystem", "hardware/mounts", "False");

    // A veth whose peer is down has no carrier; up again, then flapping.
    let c = wait_cond(&agent, "NetworkInterfaceDown", "hardware/nic", "True");
    assert!(message(&c).contains("no carrier"), "{c}");
    run(Command::new("ip").args(["link", "set", "nkp1", "up"]));
    wait_cond(&agent, "NetworkInterfaceDown", "hardware/nic", "False");
    for _ in 0..3 {
        run(Command::new("ip").args(["link", "set", "nkp1", "down"]));
        std::thread::sleep(Duration::from_millis(300));
        run(Command::new("ip").args(["link", "set", "nkp1", "up"]));
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_cond(&agent, "FrequentNetworkInterfaceFlap", "hardware/nic", "True");

    // The clock as adjtimex says, read another way.
    let clock = wait_for("ClockUnsynchronized", T, || {
        conditions(&agent)
            .into_iter()
            .find(|c| c["type"] == "ClockUnsynchronized")
    });
    assert_eq!(clock["status"] == "True", unsynced_by_python(), "{clock}");
    // No EDAC here: said once, not a fault.
    let e = wait_for("EDAC not applicable", T, || {
        events(&agent)
            .into_iter()
            .find(|e| e["reason"] == "CheckNotApplicable" && e["source"] == "hardware/edac")
    });
    assert_eq!(e["severity"], "Info");
    assert!(!conditions(&agent).iter().any(|c| c["source"] == "hardware/edac"));

    // Real memory pressure: stress-ng holds 4 GiB, far past the threshold
    // whatever the tests beside this one free meanwhile.
    let stress = Stress::start(&["--vm", "1", "--vm-bytes", "4g", "--vm-keep", "--timeout", "60s"]);
    let c = wait_cond(&agent, "MemoryPressure", "resources", "True");
    drop(stress);
    assert_eq!(c["reason"], "InsufficientMemory");
    wait_cond(&agent, "MemoryPressure", "resources", "False");

    // The memory signal switched off (the rest of the section kept): its
    // condition is retired at the next start, DiskPressure stays.
    agent.terminate();
    let text = std::fs::read_to_string(&agent.config).expect("config");
    let memory = text
        .lines()
        .find(|l| l.trim_start().starts_with("memory:"))
        .expect("memory line")
        .to_string();
    std::fs::write(
        &agent.config,
        text.replace(&memory, "    memory: {timing: {disabled: true}}"),
    )
    .expect("config");
    agent.restart();
    wait_for("MemoryPressure retired", T, || {
        (!conditions(&agent).iter().any(|c| c["type"] == "MemoryPressure")).then_some(())
    });
    assert!(
        conditions(&agent).iter().any(|c| c["type"] == "DiskPressure"),
        "DiskPressure kept"
    );
}

#[test]
fn real_containerd_stopped_is_unhealthy_and_clears_when_it_is_back() {
    let tmp = TempDir::new("containerd");
    let d = tmp.path();
    let cd = d.join("containerd");
    std::fs::create_dir_all(&cd).expect("dir");
    let mut containerd = nodekeeper_e2e::lab::containerd(&cd);
    let sock = cd.join("containerd.sock");
    let cfg = format!(
        "detectors:\n  defaultRules: false\n  probes:\n  - {{name: containerd, condition: ContainerRuntimeUnhealthy, periodSeconds: 1, timeoutSeconds: 1, failureThreshold: 2, containerd: {{address: '{}', namespace: k8s.io}}}}\n",
        sock.display()
    );
    let agent = Agent::start(d, "node-cri", None, &cfg);
    let c = wait_cond(&agent, "ContainerRuntimeUnhealthy", "probe/containerd", "False");
    assert_eq!(c["reason"], "ContainerRuntimeIsHealthy");
    let (_, metrics) = http_unix(&agent.socket, "GET", "/metrics", "").expect("metrics");
    assert!(
        metrics.contains("check_runs_total{check=\"probe/containerd\",result=\"healthy\"}"),
        "{metrics}"
    );
    containerd.kill();
    let c = wait_cond(&agent, "ContainerRuntimeUnhealthy", "probe/containerd", "True");
    assert!(message(&c).contains("containerd"), "{c}");
    let mut containerd = nodekeeper_e2e::lab::containerd(&cd);
    wait_cond(&agent, "ContainerRuntimeUnhealthy", "probe/containerd", "False");
    // Back: an event says the condition cleared.
    let ev = events(&agent);
    assert!(
        ev.iter()
            .any(|e| e["source"] == "probe/containerd" && e["severity"] == "Info"),
        "a clearing event: {ev:?}"
    );
    containerd.kill();
}

#[test]
fn hardware_checks_read_edac_taint_and_stuck_tasks_from_a_prepared_tree() {
    // There is no EDAC memory controller on these machines: the tree has the
    // kernel's layout (drivers/edac/edac_mc_sysfs.c), /proc/sys/kernel/tainted
    // and a /proc/PID/stat of a user task in D state.
    let tmp = TempDir::new("hwtree");
    let d = tmp.path();
    let root = d.join("root");
    let mc = root.join("sys/devices/system/edac/mc/mc0");
    let dimm = mc.join("dimm0");
    std::fs::create_dir_all(&dimm).expect("edac");
    let put = |p: &Path, v: &str| std::fs::write(p, format!("{v}\n")).expect("write");
    put(&mc.join("ce_count"), "0");
    put(&mc.join("ue_count"), "0");
    put(&dimm.join("dimm_ce_count"), "0");
    put(&dimm.join("dimm_ue_count"), "0");
    put(&dimm.join("dimm_label"), "CPU_SrcID#0_Ha#0_Chan#0_DIMM#0");
    std::fs::create_dir_all(root.join("proc/sys/kernel")).expect("proc");
    put(&root.join("proc/sys/kernel/tainted"), "0");
    let task = root.join("proc/4242");
    std::fs::create_dir_all(&task).expect("task");
    // pid (comm) state ppid pgrp session tty tpgid flags ... starttime(22nd).
    let mut fields = vec!["4242 (nk-stuck) D 1 4242 4242 0 -1 4194560".to_string()];
    fields.extend((0..12).map(|_| "0".to_string()));
    fields.push("987654".into());
    fields.extend((0..30).map(|_| "0".to_string()));
    put(&task.join("stat"), &fields.join(" "));
    // There are no disks smartctl can read and no GPUs here either: the
    // tools are stand-ins printing smartctl's JSON and nvidia-smi's XML as
    // smartmontools 7.3 and driver 535 print them.
    let bad_disk = d.join("disk-failing");
    let bad_gpu = d.join("gpu-pending");
    let smartctl = script(
        d,
        "smartctl",
        &format!(
            "case \"$*\" in *--scan*) echo '{{\"json_format_version\":[1,0],\"smartctl\":{{\"version\":[7,3],\"exit_status\":0}},\"devices\":[{{\"name\":\"/dev/sda\",\"info_name\":\"/dev/sda [SAT]\",\"type\":\"sat\",\"protocol\":\"ATA\"}}]}}'; exit 0;; esac\n\
             p=true; [ -e {} ] && p=false\n\
             echo '{{\"smartctl\":{{\"version\":[7,3],\"exit_status\":0}},\"device\":{{\"name\":\"/dev/sda\",\"type\":\"sat\",\"protocol\":\"ATA\"}},\"model_name\":\"ST4000NM0035\",\"smart_status\":{{\"passed\":'$p'}},\"ata_smart_attributes\":{{\"revision\":10,\"table\":[]}}}}'",
            bad_disk.display()
        ),
    );
    let nvidia_smi = script(
        d,
        "nvidia-smi",
        &format!(
            "p=No; [ -e {} ] && p=Yes\n\
             printf '<?xml version=\"1.0\" ?>\\n<nvidia_smi_log><driver_version>535.129.03</driver_version><attached_gpus>1</attached_gpus><gpu id=\"00000000:3B:00.0\"><product_name>NVIDIA A100-SXM4-80GB</product_name><ecc_errors><volatile><dram_uncorrectable>0</dram_uncorrectable></volatile></ecc_errors><remapped_rows><remapped_row_pending>%s</remapped_row_pending><remapped_row_failure>No</remapped_row_failure></remapped_rows></gpu></nvidia_smi_log>\\n' $p",
            bad_gpu.display()
        ),
    );
    let cfg = format!(
        "detectors:\n  defaultRules: false\n  hardware:\n    root: {}\n    periodSeconds: 1\n    edac: {{maxCorrectedPerHour: 100}}\n    clock: {{disabled: true}}\n    stuckTasks: {{seconds: 2}}\n    smart: {{command: '{smartctl}', periodSeconds: 1}}\n    gpu: {{command: '{nvidia_smi}', periodSeconds: 1}}\n",
        root.display()
    );
    let mut agent = Agent::start(d, "node-hw", None, &cfg);
    wait_cond(&agent, "DiskUnhealthy", "hardware/smart", "False");
    std::fs::write(&bad_disk, "").expect("flag");
    let c = wait_cond(&agent, "DiskUnhealthy", "hardware/smart", "True");
    assert_eq!(c["reason"], "SmartFailing");
    wait_cond(&agent, "GPUUnhealthy", "hardware/gpu", "False");
    std::fs::write(&bad_gpu, "").expect("flag");
    let c = wait_cond(&agent, "GPUUnhealthy", "hardware/gpu", "True");
    assert_eq!(c["reason"], "RowRemapPending");
    std::fs::remove_file(&bad_gpu).expect("unflag");
    wait_cond(&agent, "GPUUnhealthy", "hardware/gpu", "False");
    wait_cond(&agent, "CorrectableMemoryErrors", "hardware/edac", "False");
    wait_cond(&agent, "KernelTainted", "hardware/taint", "False");
    // 150 corrected errors within the hour on one DIMM.
    put(&mc.join("ce_count"), "150");
    put(&dimm.join("dimm_ce_count"), "150");
    let c = wait_cond(&agent, "CorrectableMemoryErrors", "hardware/edac", "True");
    assert!(
        message(&c).contains("mc0/dimm0 (CPU_SrcID#0_Ha#0_Chan#0_DIMM#0): 150 corrected"),
        "{c}"
    );
    put(&mc.join("ue_count"), "1");
    put(&dimm.join("dimm_ue_count"), "1");
    let c = wait_cond(&agent, "UncorrectableMemoryErrors", "hardware/edac", "True");
    assert!(message(&c).contains("dimm0"), "{c}");
    // Stored: after a restart the condition is True from the start, with
    // its first transition time, and no new transition is reported.
    agent.terminate();
    agent.restart();
    let again = conditions(&agent)
        .into_iter()
        .find(|x| x["type"] == "UncorrectableMemoryErrors")
        .expect("restored at once");
    assert_eq!(
        (&again["status"], &again["lastTransitionTime"]),
        (&c["status"], &c["lastTransitionTime"])
    );
    std::thread::sleep(Duration::from_secs(2));
    let c2 = wait_cond(&agent, "UncorrectableMemoryErrors", "hardware/edac", "True");
    assert_eq!(
        c2["lastTransitionTime"], c["lastTransitionTime"],
        "not raised again after the restart"
    );
    // Died (oops) and out-of-tree: D is watched, O is not.
    put(
        &root.join("proc/sys/kernel/tainted"),
        &((1u64 << 7) | (1 << 12)).to_string(),
    );
    let c = wait_cond(&agent, "KernelTainted", "hardware/taint", "True");
    assert!(message(&c).contains("tainted DO (watched: D"), "{c}");
    // The task has been in D state past 2 s; it leaves and the condition clears.
    let c = wait_cond(&agent, "TasksStuckInDState", "hardware/tasks", "True");
    assert!(message(&c).contains("nk-stuck[4242]"), "{c}");
    std::fs::remove_dir_all(&task).expect("task gone");
    wait_cond(&agent, "TasksStuckInDState", "hardware/tasks", "False");
    // NICs and mounts are not in the tree: said once, no fault.
    wait_for("no NICs said once", T, || {
        events(&agent)
            .into_iter()
            .find(|e| e["reason"] == "CheckNotApplicable" && e["source"] == "hardware/nic")
    });
}

#[test]
fn units_in_a_booted_systemd_flap_and_stop_and_come_back() {
    let m = nodekeeper_e2e::lab::Machine::boot("probes-sd", &[]);
    m.sh(
        "cat > /etc/systemd/system/flappy.service <<'E'\n[Unit]\nStartLimitIntervalSec=0\n[Service]\nExecStart=/bin/sh -c 'sleep 0.3; exit 1'\nRestart=always\nRestartSec=200ms\nE\n\
         cat > /etc/systemd/system/kubelike.service <<'E'\n[Service]\nExecStart=/bin/sleep infinity\nE\n\
         systemctl daemon-reload && systemctl start kubelike.service",
    );
    let tmp = TempDir::new("probes-sd");
    let bus = format!("unix:path=/proc/{}/root/run/dbus/system_bus_socket", m.pid1());
    let cfg = "detectors:\n  defaultRules: false\n  probes:\n  - {name: flappy, periodSeconds: 1, timeoutSeconds: 1, systemdUnit: {unit: flappy.service, maxRestarts: 3, restartWindowSeconds: 8}}\n  - {name: kubelet, condition: KubeletUnhealthy, periodSeconds: 1, timeoutSeconds: 1, failureThreshold: 1, systemdUnit: {unit: kubelike.service}}\n  - {name: absent, periodSeconds: 1, timeoutSeconds: 1, requiresUnit: nothere.service, tcp: {address: '127.0.0.1:1'}}\n";
    let agent = Agent::start_env(tmp.path(), "node-sd", None, cfg, &[("DBUS_SYSTEM_BUS_ADDRESS", &bus)]);
    wait_cond(&agent, "FrequentFlappyRestart", "probe/flappy", "False");
    wait_cond(&agent, "KubeletUnhealthy", "probe/kubelet", "False");
    // Flapping: restarted by systemd again and again.
    m.exec(&["systemctl", "start", "flappy.service"]);
    let c = wait_cond(&agent, "FrequentFlappyRestart", "probe/flappy", "True");
    assert!(message(&c).contains("flappy.service restarted"), "{c}");
    m.exec(&["systemctl", "stop", "flappy.service"]);
    // Back once the restarts are out of the 8 s window.
    wait_cond(&agent, "FrequentFlappyRestart", "probe/flappy", "False");
    // A kubelet-like unit stopped and started.
    m.exec(&["systemctl", "stop", "kubelike.service"]);
    let c = wait_cond(&agent, "KubeletUnhealthy", "probe/kubelet", "True");
    assert!(message(&c).contains("kubelike.service is inactive"), "{c}");
    m.exec(&["systemctl", "start", "kubelike.service"]);
    wait_cond(&agent, "KubeletUnhealthy", "probe/kubelet", "False");
    // A probe of a unit the node does not have: said once, never a fault.
    let e = wait_for("not applicable", T, || {
        events(&agent)
            .into_iter()
            .find(|e| e["reason"] == "CheckNotApplicable" && e["source"] == "probe/absent")
    });
    assert!(message(&e).contains("nothere.service is not installed"), "{e}");
    assert!(!conditions(&agent).iter().any(|c| c["source"] == "probe/absent"));
}

/// The journald monitors against a live journald: a booted systemd's own
/// journal, written while the agent (on the host, through the container's
/// root) follows it in-process with libsystemd's reader.
#[test]
fn journald_monitors_follow_a_live_journald_by_identifier_and_by_unit() {
    let m = nodekeeper_e2e::lab::Machine::boot("journal-live", &[]);
    m.sh(
        "cat > /etc/systemd/system/kubelike.service <<'E'\n[Service]\nExecStart=/bin/sleep infinity\nE\n\
         cat > /etc/systemd/system/other.service <<'E'\n[Service]\nExecStart=/bin/sleep infinity\nE\n\
         systemctl daemon-reload && systemctl start kubelike.service other.service",
    );
    // Persistent or volatile, wherever this journald writes.
    let dir = m.sh(
        "journalctl --flush >/dev/null 2>&1; for d in /var/log/journal /run/log/journal; do \
         ls $d/*/*.journal >/dev/null 2>&1 && echo $d && break; done",
    );
    let dir = format!("/proc/{}/root{}", m.pid1(), dir.trim());
    assert!(dir.ends_with("journal"), "the container's journal: {dir}");
    let tmp = TempDir::new("journal-live");
    let by_id = tmp.path().join("kubelet.yaml");
    std::fs::write(
        &by_id,
        format!(
            "plugin: journald\npluginConfig: {{source: kubelet}}\nlogPath: {dir}\nsource: kubelet-monitor\nconditions: [{{type: KubeletStuck, reason: KubeletIsFine, message: ok}}]\nrules:\n- {{type: permanent, condition: KubeletStuck, reason: PLEGUnhealthy, pattern: 'PLEG is not healthy: .*'}}\n"
        ),
    )
    .expect("rules");
    let by_unit = tmp.path().join("kubelike.yaml");
    std::fs::write(
        &by_unit,
        format!(
            "plugin: journald\npluginConfig: {{unit: kubelike}}\nlogPath: {dir}\nsource: kubelike-monitor\nconditions: []\nrules:\n- {{type: temporary, reason: UnitStopped, pattern: 'Stopped .*'}}\n"
        ),
    )
    .expect("rules");
    let cfg = format!(
        "detectors:\n  defaultRules: false\n  logMonitors: [{}, {}]\n",
        by_id.display(),
        by_unit.display()
    );
    let agent = Agent::start(tmp.path(), "node-journal-live", None, &cfg);
    let pid = agent.pid().expect("agent pid");
    wait_for("libsystemd loaded by the agent", T, || {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        maps.contains("libsystemd.so.0").then_some(())
    });
    // The reader seeks to the journal's end right after loading the library.
    std::thread::sleep(Duration::from_secs(1));
    // A line logged under the identifier; another identifier's is not read.
    m.exec(&[
        "systemd-cat",
        "-t",
        "kubelet",
        "echo",
        "PLEG is not healthy: pleg was last seen active 3m0s ago",
    ]);
    m.exec(&[
        "systemd-cat",
        "-t",
        "notkubelet",
        "echo",
        "Stopped kubelike.service by hand",
    ]);
    let c = wait_cond(&agent, "KubeletStuck", "kubelet-monitor", "True");
    assert!(message(&c).contains("pleg was last seen active"), "{c}");
    // systemd's own messages about the unit (PID 1, UNIT=) reach the unit's
    // monitor; those about another unit do not.
    m.exec(&["systemctl", "stop", "other.service"]);
    m.exec(&["systemctl", "stop", "kubelike.service"]);
    let stopped = wait_for("the unit's stop seen by its monitor", T, || {
        events(&agent)
            .into_iter()
            .find(|e| e["reason"] == "UnitStopped" && message(e).contains("kubelike"))
    });
    assert_eq!(stopped["source"], "kubelike-monitor", "{stopped}");
    // The other lines were written before kubelike's stop and are read in
    // journal order: had they reached the unit's monitor, they are here now.
    let unit_events: Vec<Value> = events(&agent)
        .into_iter()
        .filter(|e| e["reason"] == "UnitStopped")
        .collect();
    assert!(
        unit_events
            .iter()
            .all(|e| !message(e).contains("other") && !message(e).contains("by hand")),
        "only kubelike.service's own entries reach its monitor: {unit_events:?}"
    );
    assert!(agent.children().is_empty(), "no journal helper: {:?}", agent.children());
}

fn pids_available() -> u64 {
    let max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let threads: u64 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(3)
                .and_then(|f| f.split('/').nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0);
    max - threads
}

#[test]
fn pid_cpu_and_io_pressure_and_load_from_real_processes() {
    let tmp = TempDir::new("pids");
    let d = tmp.path();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load: f64 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|l| l.parse().ok()))
        .unwrap_or(0.0);
    // PIDPressure when 400 fewer ids than now are free (the default is 5 %
    // of pid_max, far from anything a test may take); HighLoad past the load
    // now plus 0.5 per CPU; CPUPressure past 50 % stalled.
    let enter_pids = pids_available().saturating_sub(400);
    let enter_load = load / cpus as f64 + 0.5;
    let cfg = format!(
        "detectors:\n  defaultRules: false\n  resources:\n    periodSeconds: 1\n    memory: {{timing: {{disabled: true}}}}\n    disk: {{timing: {{disabled: true}}}}\n    io: {{avg10: {{enter: 5}}, timing: {{forSeconds: 1, clearSeconds: 0}}}}\n    pids: {{available: {{enter: '{enter_pids}'}}, timing: {{clearSeconds: 0}}}}\n    cpu: {{avg10: {{enter: 50}}, timing: {{forSeconds: 1, clearSeconds: 0}}}}\n    load: {{perCpu: {{enter: '{enter_load:.2}'}}, timing: {{forSeconds: 1}}}}\n"
    );
    let agent = Agent::start(d, "node-pids", None, &cfg);
    wait_cond(&agent, "PIDPressure", "resources", "False");
    let mut kids: Vec<std::process::Child> = (0..600)
        .map(|_| Command::new("sleep").arg("60").spawn().expect("sleep"))
        .collect();
    let c = wait_cond(&agent, "PIDPressure", "resources", "True");
    assert_eq!(c["reason"], "InsufficientPIDs");
    for k in kids.iter_mut() {
        let _ = k.kill();
        let _ = k.wait();
    }
    wait_cond(&agent, "PIDPressure", "resources", "False");

    // Eight CPU hogs per CPU: tasks wait for a CPU (PSI) and the load rises.
    // First the machine must be calm, which under the whole suite's load
    // (containers booting next to this test) can take longer than usual.
    wait_cond_for(&agent, "CPUPressure", "resources", "False", Duration::from_secs(180));
    let hogs = (8 * cpus).to_string();
    let stress = Stress::start(&["--cpu", &hogs, "--timeout", "90s"]);
    let c = wait_cond(&agent, "CPUPressure", "resources", "True");
    assert_eq!(c["reason"], "CPUStalled");
    let c = wait_cond(&agent, "HighLoad", "resources", "True");
    assert!(message(&c).contains("per CPU"), "{c}");
    drop(stress);

    // Writers syncing to disk: tasks stall on I/O (PSI io full).
    let tmpdir = d.display().to_string();
    // Synchronous writes: each waits for the disk.
    let stress = Stress::start(&[
        "--hdd",
        "2",
        "--hdd-opts",
        "sync,wr-seq",
        "--hdd-bytes",
        "64m",
        "--temp-path",
        &tmpdir,
        "--timeout",
        "120s",
    ]);
    let c = wait_cond_for(&agent, "IOPressure", "resources", "True", Duration::from_secs(100));
    drop(stress);
    assert_eq!(c["reason"], "IOStalled");
}
