//! The health gate after a change: probes (exec, HTTP, unit active) every
//! `periodSeconds`; the change passes after `successThreshold` passing
//! probes in a row and fails when that did not happen within
//! `gracePeriodSeconds`.

use std::process::Command;
use std::time::{Duration, Instant};

use nodekeeper_proto::v1::HealthCheck;

use super::systemd;

const DEFAULT_TIMEOUT: u32 = 5;
const DEFAULT_PERIOD: u32 = 2;
const DEFAULT_GRACE: u32 = 30;

fn secs(v: u32, default: u32) -> Duration {
    Duration::from_secs(u64::from(if v == 0 { default } else { v }))
}

/// One probe.
pub fn probe(h: &HealthCheck) -> Result<(), String> {
    let timeout = secs(h.timeout_seconds, DEFAULT_TIMEOUT);
    if let Some((prog, args)) = h.exec.split_first() {
        return exec(prog, args, timeout);
    }
    if !h.http.is_empty() {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build();
        let agent = ureq::Agent::new_with_config(config);
        let resp = agent.get(&h.http).call().map_err(|e| format!("GET {}: {e}", h.http))?;
        let status = resp.status().as_u16();
        return if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(format!("GET {}: HTTP {status}", h.http))
        };
    }
    if !h.unit_active.is_empty() {
        return if systemd::is_active(&h.unit_active)? {
            Ok(())
        } else {
            Err(format!("{} is not active", h.unit_active))
        };
    }
    Ok(())
}

fn exec(prog: &str, args: &[String], timeout: Duration) -> Result<(), String> {
    let out = crate::exec::output(Command::new(prog).args(args), prog, timeout).map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{prog} exited with {}: {}", out.status, out.stderr.trim()))
    }
}

/// Probes until `successThreshold` probes in a row pass, or fails when the
/// grace period is over first.
pub fn gate(h: &HealthCheck) -> Result<(), String> {
    let grace = secs(h.grace_period_seconds, DEFAULT_GRACE);
    let period = secs(h.period_seconds, DEFAULT_PERIOD);
    let needed = h.success_threshold.max(1);
    let start = Instant::now();
    let mut passed = 0;
    let mut last = String::from("no probe passed");
    loop {
        match probe(h) {
            Ok(()) => {
                passed += 1;
                if passed >= needed {
                    return Ok(());
                }
            }
            Err(e) => {
                passed = 0;
                last = e;
            }
        }
        if start.elapsed() + period > grace {
            return Err(format!(
                "health check failed for {grace:?} ({needed} passing probes in a row needed): {last}"
            ));
        }
        std::thread::sleep(period);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_pass_fail_and_time_out() {
        let h = |exec: &[&str], timeout| HealthCheck {
            exec: exec.iter().map(|s| s.to_string()).collect(),
            timeout_seconds: timeout,
            ..Default::default()
        };
        assert!(probe(&h(&["/bin/true"], 1)).is_ok());
        let e = probe(&h(&["/bin/sh", "-c", "echo broken >&2; exit 3"], 1)).unwrap_err();
        assert!(e.contains("broken") && e.contains('3'), "{e}");
        let e = probe(&h(&["/bin/sleep", "5"], 1)).unwrap_err();
        assert!(e.contains("did not finish"), "{e}");
        // The gate wants successThreshold passes in a row within the grace period.
        let failing = HealthCheck {
            exec: vec!["/bin/false".into()],
            period_seconds: 1,
            grace_period_seconds: 1,
            ..Default::default()
        };
        assert!(gate(&failing).unwrap_err().contains("1 passing probes in a row"));
    }
}
