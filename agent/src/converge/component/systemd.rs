//! systemd, driven over its D-Bus API (org.freedesktop.systemd1) where a
//! system bus exists, with `systemctl` as the fallback where none does (a
//! minimal container, early boot). Both implement [`Units`]; the agent picks
//! one at start ([`select`]) and logs which. Over D-Bus a start, stop or
//! restart waits for its job and reports the job's result (done, failed,
//! timeout, dependency, canceled, skipped), and unit properties come
//! straight from the manager: the probes and remedies build on these.

use std::process::Command;
use std::sync::OnceLock;

use futures::StreamExt;
use serde::Serialize;
use zbus::zvariant::OwnedObjectPath;

use crate::exec::{self, Kind};

/// The state of a unit as systemd reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UnitStatus {
    pub name: String,
    /// loaded, not-found, bad-setting, error, masked.
    pub load_state: String,
    /// active, reloading, inactive, failed, activating, deactivating.
    pub active_state: String,
    pub sub_state: String,
    /// Automatic restarts of a service (0 for other unit types).
    pub n_restarts: u32,
    /// Exit status of the service's main process.
    pub exec_main_status: i32,
    /// When the unit last became active, microseconds since the epoch (0: never).
    pub active_enter_timestamp: u64,
}

/// What the agent needs from systemd.
pub trait Units: Send + Sync {
    /// Which implementation this is, for the log.
    fn name(&self) -> &'static str;
    fn daemon_reload(&self) -> Result<(), String>;
    /// Starts `unit` and waits for the job.
    fn start(&self, unit: &str) -> Result<(), String>;
    /// Restarts (or starts) `unit` and waits for the job.
    fn restart(&self, unit: &str) -> Result<(), String>;
    /// Stops `unit` and waits for the job.
    fn stop(&self, unit: &str) -> Result<(), String>;
    /// Enables `unit`'s unit file, so it comes back after a reboot.
    fn enable(&self, unit: &str) -> Result<(), String>;
    fn status(&self, unit: &str) -> Result<UnitStatus, String>;
}

/// systemd over D-Bus.
pub struct DBus {
    conn: zbus::Connection,
    /// The connection's own runtime, one worker that sleeps until the bus
    /// has something: callers are plain threads (the engine, `unit`), and
    /// an idle agent must not wake for nothing (async-io's `blocking` pool
    /// woke twice a second forever).
    rt: tokio::runtime::Runtime,
}

const DEST: &str = "org.freedesktop.systemd1";
const MANAGER_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";

impl DBus {
    /// Connects to the system bus at `address` (default: the standard
    /// system bus) and checks that systemd answers there.
    pub fn connect(address: Option<&str>) -> Result<DBus, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("dbus")
            .enable_all()
            .build()
            .map_err(|e| format!("starting the D-Bus runtime: {e}"))?;
        let conn = rt.block_on(async {
            let b = match address {
                Some(a) => zbus::connection::Builder::address(a).map_err(|e| e.to_string())?,
                None => zbus::connection::Builder::system().map_err(|e| e.to_string())?,
            };
            let conn = b
                .method_timeout(exec::deadline(Kind::Systemctl))
                .build()
                .await
                .map_err(|e| format!("connecting to the system bus: {e}"))?;
            Ok::<_, String>(conn)
        })?;
        let d = DBus { conn, rt };
        d.rt.block_on(async {
            let m = d.manager().await?;
            let _: String = m
                .get_property("Version")
                .await
                .map_err(|e| format!("systemd does not answer on the system bus: {e}"))?;
            // JobRemoved signals are sent only to subscribed clients.
            m.call::<_, _, ()>("Subscribe", &())
                .await
                .map_err(|e| format!("Subscribe: {e}"))
        })?;
        Ok(d)
    }

    async fn proxy(&self, path: &str, iface: &'static str) -> Result<zbus::Proxy<'static>, String> {
        zbus::proxy::Builder::new(&self.conn)
            .destination(DEST)
            .and_then(|b| b.path(path.to_string()))
            .and_then(|b| b.interface(iface))
            .map_err(|e| e.to_string())?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(|e| e.to_string())
    }

    async fn manager(&self) -> Result<zbus::Proxy<'static>, String> {
        self.proxy(MANAGER_PATH, MANAGER).await
    }

    /// Calls a job-creating Manager method and waits for the job to be
    /// removed, within the systemctl deadline; Ok only for result "done".
    fn job(&self, method: &'static str, unit: &str) -> Result<(), String> {
        let limit = exec::deadline(Kind::Systemctl);
        let what = format!("systemd {method} {unit}");
        self.rt.block_on(async {
            let m = self.manager().await?;
            // Listen before the call, so a fast job's signal is not missed.
            let mut removed = m
                .receive_signal("JobRemoved")
                .await
                .map_err(|e| format!("{what}: {e}"))?;
            let job: OwnedObjectPath = m
                .call(method, &(unit, "replace"))
                .await
                .map_err(|e| format!("{what}: {e}"))?;
            let wait = async {
                while let Some(msg) = removed.next().await {
                    let Ok((_, path, _, result)) = msg.body().deserialize::<(u32, OwnedObjectPath, String, String)>()
                    else {
                        continue;
                    };
                    if path == job {
                        return Some(result);
                    }
                }
                None
            };
            let timer = async {
                tokio::time::sleep(limit).await;
                None
            };
            match futures::future::select(Box::pin(wait), Box::pin(timer))
                .await
                .factor_first()
                .0
            {
                Some(r) if r == "done" => Ok(()),
                Some(r) => Err(format!("{what}: the job ended with result {r:?}")),
                None => {
                    // Give up on the job, so it does not linger in systemd.
                    if let Ok(j) = self.proxy(job.as_str(), "org.freedesktop.systemd1.Job").await {
                        let _ = j.call::<_, _, ()>("Cancel", &()).await;
                    }
                    Err(format!(
                        "{what}: did not finish within its deadline of {limit:?}; the job was canceled"
                    ))
                }
            }
        })
    }
}

impl Units for DBus {
    fn name(&self) -> &'static str {
        "D-Bus"
    }

    fn daemon_reload(&self) -> Result<(), String> {
        self.rt.block_on(async {
            self.manager()
                .await?
                .call::<_, _, ()>("Reload", &())
                .await
                .map_err(|e| format!("systemd Reload: {e}"))
        })
    }

    fn start(&self, unit: &str) -> Result<(), String> {
        self.job("StartUnit", unit)
    }

    fn restart(&self, unit: &str) -> Result<(), String> {
        self.job("RestartUnit", unit)
    }

    fn stop(&self, unit: &str) -> Result<(), String> {
        self.job("StopUnit", unit)
    }

    fn enable(&self, unit: &str) -> Result<(), String> {
        self.rt.block_on(async {
            self.manager()
                .await?
                .call::<_, _, (bool, Vec<(String, String, String)>)>("EnableUnitFiles", &(vec![unit], false, true))
                .await
                .map(drop)
                .map_err(|e| format!("systemd EnableUnitFiles {unit}: {e}"))
        })
    }

    fn status(&self, unit: &str) -> Result<UnitStatus, String> {
        self.rt.block_on(async {
            let path: OwnedObjectPath = self
                .manager()
                .await?
                .call("LoadUnit", &(unit,))
                .await
                .map_err(|e| format!("systemd LoadUnit {unit}: {e}"))?;
            let u = self.proxy(path.as_str(), "org.freedesktop.systemd1.Unit").await?;
            let get = |name: &'static str| {
                let u = &u;
                async move {
                    u.get_property::<String>(name)
                        .await
                        .map_err(|e| format!("{unit} {name}: {e}"))
                }
            };
            let mut s = UnitStatus {
                name: unit.to_string(),
                load_state: get("LoadState").await?,
                active_state: get("ActiveState").await?,
                sub_state: get("SubState").await?,
                active_enter_timestamp: u
                    .get_property::<u64>("ActiveEnterTimestamp")
                    .await
                    .map_err(|e| format!("{unit} ActiveEnterTimestamp: {e}"))?,
                ..Default::default()
            };
            if unit.ends_with(".service") {
                let svc = self.proxy(path.as_str(), "org.freedesktop.systemd1.Service").await?;
                s.n_restarts = svc.get_property::<u32>("NRestarts").await.unwrap_or(0);
                s.exec_main_status = svc.get_property::<i32>("ExecMainStatus").await.unwrap_or(0);
            }
            Ok(s)
        })
    }
}

/// systemd through `systemctl`, for hosts without a system bus.
pub struct Systemctl;

fn systemctl(args: &[&str]) -> Result<String, String> {
    exec::run(
        Command::new("systemctl").args(args),
        &format!("systemctl {}", args.first().copied().unwrap_or_default()),
        Kind::Systemctl,
    )
}

impl Units for Systemctl {
    fn name(&self) -> &'static str {
        "systemctl"
    }

    fn daemon_reload(&self) -> Result<(), String> {
        systemctl(&["daemon-reload"]).map(drop)
    }

    fn start(&self, unit: &str) -> Result<(), String> {
        systemctl(&["start", unit]).map(drop)
    }

    fn restart(&self, unit: &str) -> Result<(), String> {
        systemctl(&["restart", unit]).map(drop)
    }

    fn stop(&self, unit: &str) -> Result<(), String> {
        systemctl(&["stop", unit]).map(drop)
    }

    fn enable(&self, unit: &str) -> Result<(), String> {
        systemctl(&["enable", unit]).map(drop)
    }

    fn status(&self, unit: &str) -> Result<UnitStatus, String> {
        let out = systemctl(&[
            "show",
            unit,
            "--property=LoadState,ActiveState,SubState,NRestarts,ExecMainStatus,ActiveEnterTimestampMonotonic,ActiveEnterTimestamp",
            "--timestamp=unix",
        ])?;
        let mut s = UnitStatus {
            name: unit.to_string(),
            ..Default::default()
        };
        for line in out.lines() {
            let Some((k, v)) = line.split_once('=') else { continue };
            match k {
                "LoadState" => s.load_state = v.into(),
                "ActiveState" => s.active_state = v.into(),
                "SubState" => s.sub_state = v.into(),
                "NRestarts" => s.n_restarts = v.parse().unwrap_or(0),
                "ExecMainStatus" => s.exec_main_status = v.parse().unwrap_or(0),
                // `--timestamp=unix` prints "@<seconds>".
                "ActiveEnterTimestamp" => {
                    s.active_enter_timestamp = v
                        .trim_start_matches('@')
                        .parse::<u64>()
                        .map(|secs| secs * 1_000_000)
                        .unwrap_or(0)
                }
                _ => {}
            }
        }
        Ok(s)
    }
}

static UNITS: OnceLock<Box<dyn Units>> = OnceLock::new();

/// Picks D-Bus when systemd answers on the system bus, else systemctl, and
/// logs the choice. `DBUS_SYSTEM_BUS_ADDRESS` names another bus. Called
/// once at start; later calls return the first choice.
pub fn select() -> &'static dyn Units {
    UNITS
        .get_or_init(|| {
            let address = std::env::var("DBUS_SYSTEM_BUS_ADDRESS").ok();
            match DBus::connect(address.as_deref()) {
                Ok(d) => {
                    tracing::info!("systemd control: D-Bus (org.freedesktop.systemd1)");
                    Box::new(d)
                }
                Err(e) => {
                    tracing::info!(reason = %e, "systemd control: systemctl (no usable system bus)");
                    Box::new(Systemctl)
                }
            }
        })
        .as_ref()
}

/// `systemctl daemon-reload`.
pub fn daemon_reload() -> Result<(), String> {
    select().daemon_reload()
}

/// Restarts `unit`, waiting for the job (a unit that fails to start is an
/// error here, with the job's result).
pub fn restart(unit: &str) -> Result<(), String> {
    select().restart(unit)
}

/// Stops `unit`, waiting for the job.
pub fn stop(unit: &str) -> Result<(), String> {
    select().stop(unit)
}

/// Enables `unit`, so the component comes back after a reboot.
pub fn enable(unit: &str) -> Result<(), String> {
    select().enable(unit)
}

/// Whether the unit is active.
pub fn is_active(unit: &str) -> Result<bool, String> {
    Ok(select().status(unit)?.active_state == "active")
}

/// The unit's state.
pub fn status(unit: &str) -> Result<UnitStatus, String> {
    select().status(unit)
}
