//! Installing like a real host service: the .deb and .rpm packages, the
//! systemd units, and both services running under a real systemd booted in a
//! container (systemd-nspawn).

use std::process::Command;
use std::time::Duration;

use std::path::Path;

use nodekeeper_e2e::lab::{Machine, build_packages, build_packages_env, repo, run, stdout};
use nodekeeper_e2e::{TempDir, wait_for};

const T: Duration = Duration::from_secs(60);

#[test]
fn units_verify_and_packages_carry_their_files_metadata_and_scripts() {
    let tmp = TempDir::new("pkgmeta");
    // systemd-analyze verify needs the ExecStart binary to exist: point the
    // units at the built binaries, nothing else changes.
    let units = tmp.path().join("units");
    std::fs::create_dir_all(&units).expect("dir");
    let bin = nodekeeper_e2e::bin("nodekeeper-agent")
        .parent()
        .expect("bin dir")
        .join("");
    for u in ["nodekeeper-agent.service", "nodekeeper-hub.service"] {
        let text = std::fs::read_to_string(repo().join("systemd").join(u)).expect("unit");
        assert!(text.contains("Type=notify") && text.contains("WatchdogSec=") && text.contains("Restart=always"));
        if u == "nodekeeper-hub.service" {
            // Enough descriptors for 100,000 agent connections and the reserve.
            let nofile: u64 = text
                .lines()
                .find_map(|l| l.strip_prefix("LimitNOFILE="))
                .and_then(|v| v.trim().parse().ok())
                .expect("LimitNOFILE in the hub unit");
            assert!(nofile >= 110_000, "LimitNOFILE={nofile}");
        }
        std::fs::write(units.join(u), text.replace("/usr/bin/", &bin.to_string_lossy())).expect("write");
    }
    run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(units.join("nodekeeper-agent.service"))
        .arg(units.join("nodekeeper-hub.service")));
    let sec = stdout(&run(Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(units.join("nodekeeper-hub.service"))));
    assert!(
        sec.contains("Overall exposure level for nodekeeper-hub.service"),
        "{sec}"
    );
    assert!(sec.contains("OK"), "the hub should be strictly sandboxed:\n{sec}");

    // Packaging uses cargo's own target directory, wherever that is: here a
    // CARGO_TARGET_DIR by another path to the same build (no rebuild).
    let target = tmp.path().join("cargo-target");
    let real = nodekeeper_e2e::bin("nodekeeper-agent");
    let real_target = real.parent().and_then(Path::parent).expect("target dir");
    std::os::unix::fs::symlink(real_target, &target).expect("symlink");
    let dist = tmp.path().join("dist");
    let pkgs = build_packages_env(&dist, "0.1.0", &[("CARGO_TARGET_DIR", &target)]);
    let find = |needle: &str| {
        pkgs.iter()
            .find(|p| p.to_string_lossy().contains(needle))
            .expect(needle)
            .clone()
    };
    let agent_deb = find("nodekeeper-agent_0.1.0-1_");
    let hub_deb = find("nodekeeper-hub_0.1.0-1_");
    let agent_rpm = find("nodekeeper-agent-0.1.0-1.");
    let hub_rpm = find("nodekeeper-hub-0.1.0-1.");

    let info = stdout(&run(Command::new("dpkg-deb").arg("-I").arg(&agent_deb)));
    assert!(
        info.contains("Package: nodekeeper-agent") && info.contains("Version: 0.1.0-1"),
        "{info}"
    );
    assert!(
        info.contains("postinst") && info.contains("prerm") && info.contains("postrm") && info.contains("conffiles")
    );
    let files = stdout(&run(Command::new("dpkg-deb").arg("-c").arg(&agent_deb)));
    for f in [
        "./usr/bin/nodekeeper-agent",
        "./usr/bin/nkctl",
        "./usr/lib/systemd/system/nodekeeper-agent.service",
        "./usr/lib/sysusers.d/nodekeeper.conf",
        "./etc/nodekeeper/agent.yaml",
    ] {
        assert!(files.contains(f), "{f} missing from the agent .deb:\n{files}");
    }
    for (deb, conf) in [
        (&agent_deb, "/etc/nodekeeper/agent.yaml"),
        (&hub_deb, "/etc/nodekeeper/hub.yaml"),
    ] {
        let ctl = tmp.path().join("ctl");
        let _ = std::fs::remove_dir_all(&ctl);
        run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&ctl));
        assert_eq!(
            std::fs::read_to_string(ctl.join("conffiles"))
                .expect("conffiles")
                .trim(),
            conf
        );
    }

    let rinfo = stdout(&run(Command::new("rpm").arg("-qip").arg(&hub_rpm)));
    assert!(rinfo.contains("nodekeeper-hub") && rinfo.contains("0.1.0"), "{rinfo}");
    let rfiles = stdout(&run(Command::new("rpm").arg("-qlp").arg(&hub_rpm)));
    assert!(
        rfiles.contains("/usr/bin/nodekeeper-hub") && rfiles.contains("/usr/lib/systemd/system/nodekeeper-hub.service")
    );
    let rconf = stdout(&run(Command::new("rpm")
        .arg("-qp")
        .arg("--configfiles")
        .arg(&agent_rpm)));
    assert!(rconf.contains("/etc/nodekeeper/agent.yaml"), "{rconf}");
    let scripts = stdout(&run(Command::new("rpm").arg("-qp").arg("--scripts").arg(&agent_rpm)));
    assert!(
        scripts.contains("postinstall scriptlet") && scripts.contains("preuninstall scriptlet"),
        "{scripts}"
    );

    // Install the rpm into an rpm --root: files land, the database knows it.
    let root = tmp.path().join("rpmroot");
    run(Command::new("rpm").arg("--root").arg(&root).arg("--initdb"));
    run(Command::new("rpm")
        .arg("--root")
        .arg(&root)
        .args(["-i", "--nodeps", "--noscripts"])
        .arg(&agent_rpm));
    assert!(root.join("usr/bin/nodekeeper-agent").exists());
    assert!(root.join("etc/nodekeeper/agent.yaml").exists());
    let q = stdout(&run(Command::new("rpm")
        .arg("--root")
        .arg(&root)
        .args(["-q", "nodekeeper-agent"])));
    assert!(q.starts_with("nodekeeper-agent-0.1.0-1"), "{q}");
}

#[test]
fn debs_in_a_booted_systemd_run_register_restart_upgrade_and_purge() {
    let tmp = TempDir::new("pkgboot");
    let v1 = tmp.path().join("v1");
    let v2 = tmp.path().join("v2");
    build_packages(&v1, "0.1.0");
    build_packages(&v2, "0.1.1");
    let m = Machine::boot("pkg", &[(&v1, "/dist1"), (&v2, "/dist2")]);

    // Install both: enabled, started, active.
    m.sh("dpkg -i /dist1/nodekeeper-hub_0.1.0-1_*.deb /dist1/nodekeeper-agent_0.1.0-1_*.deb");
    for unit in ["nodekeeper-hub.service", "nodekeeper-agent.service"] {
        wait_for(&format!("{unit} active"), T, || {
            (m.prop(unit, "ActiveState") == "active").then_some(())
        });
        assert_eq!(m.prop(unit, "UnitFileState"), "enabled", "{unit}");
    }
    assert_eq!(m.prop("nodekeeper-hub.service", "SubState"), "running");

    // The packaged hub created its PKI and an admin token on first start.
    // The README's join flow: nkctl configured with the admin token and CA,
    // a join token, and the agent pointed at the hub with it (an
    // operator's edit of the conffile).
    assert_eq!(
        m.sh("stat -c '%a' /var/lib/nodekeeper-hub/ca.key /var/lib/nodekeeper-hub/admin.token")
            .trim(),
        "600\n600"
    );
    m.sh("mkdir -p /root/.config/nodekeeper && printf 'hub: https://127.0.0.1:7080\\ntokenFile: /var/lib/nodekeeper-hub/admin.token\\nca: /var/lib/nodekeeper-hub/ca.crt\\n' > /root/.config/nodekeeper/nkctl.yaml");
    let join: serde_json::Value =
        serde_json::from_str(&m.sh("nkctl token create join --ttl 1h -o json")).expect("token json");
    m.sh(&format!(
        "printf 'labels: {{site: lab}}\\nhub: {{address: \"https://127.0.0.1:7443\", bootstrapToken: \"{}\", caCertHash: \"{}\"}}\\n' >> /etc/nodekeeper/agent.yaml",
        join["token"].as_str().expect("token"),
        join["caCertHash"].as_str().expect("hash")
    ));
    m.exec(&["systemctl", "restart", "nodekeeper-agent.service"]);
    let host = m.sh("hostname").trim().to_ascii_lowercase();
    wait_for("the agent registered and Ready at the hub", T, || {
        let out = m.exec_unchecked(&["nkctl", "get", "nodes"]);
        stdout(&out)
            .lines()
            .any(|l| l.starts_with(&host) && l.split_whitespace().nth(1) == Some("Ready"))
            .then_some(())
    });

    // The built-in containerd rules read the real journald of the booted system.
    m.sh("logger -t containerd 'level=error msg=\"failed to start shim: nk-packaging-test\"'");
    wait_for("a containerd problem from journald at the hub", T, || {
        let out = m.exec_unchecked(&["nkctl", "describe", "node", &host]);
        stdout(&out).contains("ContainerdShimFailed").then_some(())
    });

    // The socket answers members of the nodekeeper group, and only them.
    m.sh("useradd -m -G nodekeeper alice && useradd -m bob");
    let status = m.sh("runuser -u alice -- nkctl node status");
    assert!(status.contains("(connected)"), "{status}");
    let bob = m.exec_unchecked(&["runuser", "-u", "bob", "--", "nkctl", "node", "status"]);
    assert!(
        !bob.status.success(),
        "a user outside the group must not reach the socket"
    );
    assert!(
        String::from_utf8_lossy(&bob.stderr).contains("ermission denied"),
        "{}",
        String::from_utf8_lossy(&bob.stderr)
    );
    let mode = m.sh("stat -c '%a %G' /run/nodekeeper/agent.sock");
    assert_eq!(mode.trim(), "660 nodekeeper");

    // Logs in the journal.
    let journal = m.sh("journalctl -u nodekeeper-agent.service --no-pager -o cat");
    assert!(
        journal.contains("agent ready") && journal.contains("hub session open"),
        "{journal}"
    );
    let hub_journal = m.sh("journalctl -u nodekeeper-hub.service --no-pager -o cat");
    assert!(hub_journal.contains("hub listening"), "{hub_journal}");
    // The hub runs as a dynamic, unprivileged user.
    let user = m.sh("ps -o user= -p $(systemctl show -p MainPID --value nodekeeper-hub.service)");
    assert_ne!(user.trim(), "root");

    // The watchdog restarts a hung agent (a short WatchdogSec for the test).
    m.sh("mkdir -p /etc/systemd/system/nodekeeper-agent.service.d && printf '[Service]\\nWatchdogSec=2s\\n' > /etc/systemd/system/nodekeeper-agent.service.d/watchdog.conf && systemctl daemon-reload && systemctl restart nodekeeper-agent.service");
    wait_for("agent active", T, || {
        (m.prop("nodekeeper-agent.service", "ActiveState") == "active").then_some(())
    });
    let pid = m.prop("nodekeeper-agent.service", "MainPID");
    let restarts: u32 = m.prop("nodekeeper-agent.service", "NRestarts").parse().unwrap_or(0);
    m.exec(&["kill", "-STOP", &pid]);
    wait_for("watchdog restart", T, || {
        let now = m.prop("nodekeeper-agent.service", "MainPID");
        let n: u32 = m.prop("nodekeeper-agent.service", "NRestarts").parse().unwrap_or(0);
        (now != pid && now != "0" && n > restarts && m.prop("nodekeeper-agent.service", "ActiveState") == "active")
            .then_some(())
    });
    let journal = m.sh("journalctl -u nodekeeper-agent.service --no-pager");
    assert!(journal.contains("Watchdog timeout"), "{journal}");
    m.sh("rm -r /etc/systemd/system/nodekeeper-agent.service.d && systemctl daemon-reload");

    // Upgrade: the edited conffile is kept, the agent is restarted on the new version.
    let before = m.prop("nodekeeper-agent.service", "MainPID");
    m.sh("dpkg -i /dist2/nodekeeper-agent_0.1.1-1_*.deb");
    assert!(
        m.sh("cat /etc/nodekeeper/agent.yaml").contains("127.0.0.1:7443"),
        "local edit kept on upgrade"
    );
    assert!(
        m.sh("dpkg-query -W -f '${Version}' nodekeeper-agent")
            .starts_with("0.1.1")
    );
    wait_for("restarted after upgrade", T, || {
        let now = m.prop("nodekeeper-agent.service", "MainPID");
        (now != before && now != "0" && m.prop("nodekeeper-agent.service", "ActiveState") == "active").then_some(())
    });
    wait_for("back at the hub", T, || {
        let out = m.exec_unchecked(&["nkctl", "--socket", "/run/nodekeeper/agent.sock", "node", "status"]);
        stdout(&out).contains("(connected)").then_some(())
    });

    // Remove: stopped, state and config kept. Purge: both gone.
    m.sh("dpkg -r nodekeeper-agent");
    assert_eq!(m.prop("nodekeeper-agent.service", "ActiveState"), "inactive");
    assert!(
        m.sh("test -f /var/lib/nodekeeper/agent.db && echo kept")
            .contains("kept")
    );
    assert!(m.sh("test -f /etc/nodekeeper/agent.yaml && echo kept").contains("kept"));
    m.sh("dpkg -P nodekeeper-agent");
    assert!(m.sh("test -e /var/lib/nodekeeper || echo gone").contains("gone"));
    assert!(m.sh("test -e /etc/nodekeeper/agent.yaml || echo gone").contains("gone"));
    m.sh("dpkg -P nodekeeper-hub");
    assert!(
        m.sh("test -e /var/lib/private/nodekeeper-hub || echo gone")
            .contains("gone")
    );
}
