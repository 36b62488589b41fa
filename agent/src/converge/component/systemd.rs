//! systemd through systemctl (its real interface; on a node the agent runs
//! beside the system manager, so no bus address is needed).

use std::process::Command;

use crate::exec::{self, Kind};

/// `systemctl daemon-reload`.
pub fn daemon_reload() -> Result<(), String> {
    exec::run(
        Command::new("systemctl").arg("daemon-reload"),
        "systemctl daemon-reload",
        Kind::Systemctl,
    )
    .map(drop)
}

/// `systemctl restart UNIT` (waits for the job, so a unit that fails to start
/// is an error here).
pub fn restart(unit: &str) -> Result<(), String> {
    exec::run(
        Command::new("systemctl").args(["restart", unit]),
        "systemctl restart",
        Kind::Systemctl,
    )
    .map(drop)
}

/// `systemctl enable UNIT`, so the component comes back after a reboot.
pub fn enable(unit: &str) -> Result<(), String> {
    exec::run(
        Command::new("systemctl").args(["enable", unit]),
        "systemctl enable",
        Kind::Systemctl,
    )
    .map(drop)
}

/// Whether the unit is active.
pub fn is_active(unit: &str) -> Result<bool, String> {
    let out = exec::output(
        Command::new("systemctl").args(["is-active", unit]),
        "systemctl is-active",
        exec::deadline(Kind::Systemctl),
    )
    .map_err(|e| e.to_string())?;
    Ok(out.status.success())
}
