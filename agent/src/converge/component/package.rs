//! Package managers: dpkg/apt and rpm/dnf behind one small trait, so the
//! engine installs, upgrades, downgrades (for rollback) and observes a
//! package the same way on either family.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::exec::{self, Kind};

/// A package transaction with the package deadline.
fn run(cmd: &mut Command, what: &str) -> Result<String, String> {
    exec::run(cmd, what, Kind::Package)
}

/// A package query with the (shorter) query deadline.
fn query(cmd: &mut Command, what: &str) -> Result<exec::Output, String> {
    exec::output(cmd, what, exec::deadline(Kind::Query)).map_err(|e| e.to_string())
}

/// What the engine needs from a host's package manager.
pub trait PackageManager {
    /// Name and version inside a package file.
    fn identify(&self, file: &Path) -> Result<(String, String), String>;
    /// The installed version of `name`, if it is fully installed.
    fn installed_version(&self, name: &str) -> Result<Option<String>, String>;
    /// Installs a package file (upgrade or downgrade).
    fn install_file(&self, file: &Path) -> Result<(), String>;
    /// Installs `name` at `version` from the host's repositories.
    fn install_repo(&self, name: &str, version: &str) -> Result<(), String>;
    /// Removes `name`.
    fn remove(&self, name: &str) -> Result<(), String>;
}

/// Debian's dpkg (files) and apt (repositories).
pub struct Dpkg;

/// How long to wait for another dpkg (unattended-upgrades, an operator) to
/// release its lock.
const LOCK_WAIT: Duration = Duration::from_secs(120);

fn dpkg_locked(err: &str) -> bool {
    err.contains("lock") && (err.contains("dpkg") || err.contains("apt"))
}

/// Runs a dpkg/apt command, waiting while another process holds the lock.
fn run_dpkg(mut make: impl FnMut() -> Command, what: &str) -> Result<String, String> {
    let start = Instant::now();
    loop {
        match run(&mut make(), what) {
            Err(e) if dpkg_locked(&e) && start.elapsed() < LOCK_WAIT => {
                tracing::info!(what, "dpkg is locked by another process; waiting");
                std::thread::sleep(Duration::from_millis(500));
            }
            other => return other,
        }
    }
}

fn apt_env(c: &mut Command) -> &mut Command {
    c.env("DEBIAN_FRONTEND", "noninteractive")
}

impl PackageManager for Dpkg {
    fn identify(&self, file: &Path) -> Result<(String, String), String> {
        let out = exec::run(
            Command::new("dpkg-deb")
                .arg("-f")
                .arg(file)
                .args(["Package", "Version"]),
            "dpkg-deb -f",
            Kind::Query,
        )?;
        let field = |name: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(|v| v.trim().to_string()))
                .ok_or_else(|| format!("{}: no {name} field in the package", file.display()))
        };
        Ok((field("Package")?, field("Version")?))
    }

    fn installed_version(&self, name: &str) -> Result<Option<String>, String> {
        let out = query(
            Command::new("dpkg-query").args(["-W", "-f", "${db:Status-Abbrev}|${Version}", name]),
            "dpkg-query",
        )?;
        if !out.status.success() {
            return Ok(None);
        }
        let s = out.stdout;
        match s.split_once('|') {
            Some((status, version)) if status.trim() == "ii" => Ok(Some(version.trim().to_string())),
            _ => Ok(None),
        }
    }

    fn install_file(&self, file: &Path) -> Result<(), String> {
        run_dpkg(
            || {
                let mut c = Command::new("dpkg");
                apt_env(&mut c)
                    .args(["--force-confdef", "--force-confold", "-i"])
                    .arg(file);
                c
            },
            "dpkg -i",
        )
        .map(drop)
    }

    fn install_repo(&self, name: &str, version: &str) -> Result<(), String> {
        let install = || {
            run_dpkg(
                || {
                    let mut c = Command::new("apt-get");
                    apt_env(&mut c).args([
                        "install",
                        "-y",
                        "--allow-downgrades",
                        "-o",
                        "Dpkg::Options::=--force-confold",
                        &format!("{name}={version}"),
                    ]);
                    c
                },
                "apt-get install",
            )
        };
        match install() {
            // The package lists predate the version: refresh them once.
            Err(e) if e.contains("not found") || e.contains("Unable to locate") => {
                tracing::info!(
                    package = name,
                    version,
                    "version not in the package lists; running apt-get update"
                );
                run_dpkg(
                    || {
                        let mut c = Command::new("apt-get");
                        apt_env(&mut c).args(["update", "-q"]);
                        c
                    },
                    "apt-get update",
                )?;
                install().map(drop)
            }
            other => other.map(drop),
        }
    }

    fn remove(&self, name: &str) -> Result<(), String> {
        run_dpkg(
            || {
                let mut c = Command::new("dpkg");
                apt_env(&mut c).args(["-r", name]);
                c
            },
            "dpkg -r",
        )
        .map(drop)
    }
}

/// rpm (files) and dnf (repositories), optionally on another root.
pub struct Rpm {
    pub root: PathBuf,
}

impl Rpm {
    fn rpm(&self) -> Command {
        let mut c = Command::new("rpm");
        if self.root != Path::new("/") {
            c.arg("--root").arg(&self.root);
        }
        c
    }
}

impl PackageManager for Rpm {
    fn identify(&self, file: &Path) -> Result<(String, String), String> {
        let out = exec::run(
            Command::new("rpm")
                .args(["-qp", "--qf", "%{NAME}\\n%{VERSION}-%{RELEASE}\\n"])
                .arg(file),
            "rpm -qp",
            Kind::Query,
        )?;
        let mut lines = out.lines();
        match (lines.next(), lines.next()) {
            (Some(n), Some(v)) if !n.is_empty() => Ok((n.to_string(), v.to_string())),
            _ => Err(format!("{}: rpm -qp gave no name and version", file.display())),
        }
    }

    fn installed_version(&self, name: &str) -> Result<Option<String>, String> {
        let out = query(self.rpm().args(["-q", "--qf", "%{VERSION}-%{RELEASE}", name]), "rpm -q")?;
        if !out.status.success() {
            return Ok(None);
        }
        Ok(Some(out.stdout.trim().to_string()))
    }

    fn install_file(&self, file: &Path) -> Result<(), String> {
        run(
            self.rpm().args(["-U", "--oldpackage", "--replacepkgs"]).arg(file),
            "rpm -U",
        )
        .map(drop)
    }

    fn install_repo(&self, name: &str, version: &str) -> Result<(), String> {
        let mut c = Command::new("dnf");
        c.args(["-y", "install", "--allowerasing"]);
        if self.root != Path::new("/") {
            c.arg(format!("--installroot={}", self.root.display()));
        }
        run(c.arg(format!("{name}-{version}")), "dnf install").map(drop)
    }

    fn remove(&self, name: &str) -> Result<(), String> {
        run(self.rpm().args(["-e", name]), "rpm -e").map(drop)
    }
}
