//! systemd through systemctl (its real interface; on a node the agent runs
//! beside the system manager, so no bus address is needed).

use std::process::Command;

use super::run;

/// `systemctl daemon-reload`.
pub fn daemon_reload() -> Result<(), String> {
    run(
        Command::new("systemctl").arg("daemon-reload"),
        "systemctl daemon-reload",
    )
    .map(drop)
}

/// `systemctl restart UNIT` (waits for the job, so a unit that fails to start
/// is an error here).
pub fn restart(unit: &str) -> Result<(), String> {
    run(Command::new("systemctl").args(["restart", unit]), "systemctl restart").map(drop)
}

/// `systemctl enable UNIT`, so the component comes back after a reboot.
pub fn enable(unit: &str) -> Result<(), String> {
    run(Command::new("systemctl").args(["enable", unit]), "systemctl enable").map(drop)
}

/// Whether the unit is active.
pub fn is_active(unit: &str) -> Result<bool, String> {
    let out = Command::new("systemctl")
        .args(["is-active", unit])
        .output()
        .map_err(|e| format!("running systemctl is-active: {e}"))?;
    Ok(out.status.success())
}
