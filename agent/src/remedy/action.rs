//! The actions a remedy step takes. Each is safe to run again (a job killed
//! mid-action runs it again at the next start) and ends with a result the
//! job records: Ok(what was done) or Err(why not).

use std::path::Path;
use std::time::{Duration, SystemTime};

use nodekeeper_proto::v1::RemedyStep;

use crate::converge::component::systemd;

/// Where the actions act (tests point them at a prepared tree or a
/// stand-in reboot command).
#[derive(Debug, Clone)]
pub struct Env {
    /// `/proc` (killProcess, dropCaches).
    pub proc_root: std::path::PathBuf,
    /// The cgroup root (killProcess by cgroup).
    pub cgroup_root: std::path::PathBuf,
    /// What `reboot` runs (argv).
    pub reboot_command: Vec<String>,
}

impl Default for Env {
    fn default() -> Self {
        Env {
            proc_root: "/proc".into(),
            cgroup_root: "/sys/fs/cgroup".into(),
            reboot_command: vec!["systemctl".into(), "reboot".into()],
        }
    }
}

/// Runs `step`'s action: the blocking ones off the async threads.
pub async fn run(env: Env, step: RemedyStep) -> Result<String, String> {
    let blocking = |env: Env, step: RemedyStep| async move {
        tokio::task::spawn_blocking(move || run_blocking(&env, &step))
            .await
            .map_err(|e| format!("the action's thread failed: {e}"))?
    };
    match step.action.as_str() {
        "runScript" => run_script(&step).await,
        "cleanDisk" => {
            let mut done = Vec::new();
            if step.params.contains_key("paths") {
                done.push(blocking(env, step.clone()).await?);
            }
            if step.params.contains_key("images") {
                done.push(clean_images(&step).await?);
            }
            Ok(done.join("; "))
        }
        _ => blocking(env, step).await,
    }
}

/// `cleanDisk`'s `images: unused`, through containerd's API.
async fn clean_images(step: &RemedyStep) -> Result<String, String> {
    let p = |k: &str| step.params.get(k).map(|v| v.trim().to_string()).unwrap_or_default();
    let ns = p("namespace");
    let c = crate::containerd::remove_unused_images(
        &p("address"),
        &ns,
        nodekeeper_proto::remedy::image_min_age(step),
        Duration::from_secs(60),
    )
    .await?;
    Ok(format!(
        "deleted {} unused container image(s) in {}{}; kept {}",
        c.deleted.len(),
        crate::containerd::namespace(&ns),
        if c.deleted.is_empty() {
            String::new()
        } else {
            format!(" ({})", c.deleted.join(", "))
        },
        c.kept
    ))
}

/// Runs `step`'s action, blocking; `runScript` and cleanDisk's images
/// are async ([`run`]).
fn run_blocking(env: &Env, step: &RemedyStep) -> Result<String, String> {
    let p = |k: &str| step.params.get(k).map(|v| v.trim().to_string()).unwrap_or_default();
    match step.action.as_str() {
        "restartUnit" => {
            let unit = p("unit");
            systemd::restart(&unit).map(|_| format!("restarted {unit}"))
        }
        "restartContainerRuntime" => {
            let unit = Some(p("unit"))
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| "containerd.service".into());
            systemd::restart(&unit).map(|_| format!("restarted the container runtime ({unit})"))
        }
        "killProcess" => kill_process(env, &p("name"), &p("cgroup"), &p("signal")),
        "dropCaches" => drop_caches(env, &p("level")),
        "cleanDisk" => clean_disk(&p("paths"), SystemTime::now()),
        "reboot" => {
            let (prog, args) = env
                .reboot_command
                .split_first()
                .ok_or_else(|| "remedy.rebootCommand is empty".to_string())?;
            let mut cmd = std::process::Command::new(prog);
            cmd.args(args);
            crate::exec::run_for(&mut cmd, "the reboot command", Duration::from_secs(60))
                .map(|_| format!("asked for a reboot ({})", env.reboot_command.join(" ")))
        }
        other => Err(format!("{other:?} is not an action this agent runs")),
    }
}

/// `runScript`: the program through the check shim, so a hung script and
/// everything it started is killed at `timeoutSeconds`.
async fn run_script(step: &RemedyStep) -> Result<String, String> {
    let path = step.params.get("path").cloned().unwrap_or_default();
    let mut argv = vec![path.clone()];
    if let Some(a) = step.params.get("args") {
        argv.extend(a.split_whitespace().map(String::from));
    }
    let timeout = nodekeeper_proto::remedy::script_timeout(step);
    let r = crate::detect::checks::run::run(&argv, timeout).await;
    if let Some(e) = r.start_error.filter(|_| !r.timed_out) {
        return Err(format!("{path}: {e}"));
    }
    if r.timed_out {
        return Err(format!(
            "{path} did not finish within {} s; it and everything it started were killed",
            timeout.as_secs()
        ));
    }
    match r.exit_code {
        Some(0) => Ok(format!("{path} exited 0: {}", r.stdout.trim())),
        Some(c) => Err(format!("{path} exited {c}: {}", r.stderr.trim())),
        None => Err(format!("{path} was killed by a signal")),
    }
}

fn signal(s: &str) -> nix::sys::signal::Signal {
    use nix::sys::signal::Signal;
    match s.trim_start_matches("SIG") {
        "KILL" => Signal::SIGKILL,
        "HUP" => Signal::SIGHUP,
        "INT" => Signal::SIGINT,
        _ => Signal::SIGTERM,
    }
}

fn kill_process(env: &Env, name: &str, cgroup: &str, sig: &str) -> Result<String, String> {
    let mut pids: Vec<i32> = Vec::new();
    if !cgroup.is_empty() {
        let rel = cgroup.trim_start_matches('/');
        let file = env.cgroup_root.join(rel).join("cgroup.procs");
        let text = std::fs::read_to_string(&file).map_err(|e| format!("reading {}: {e}", file.display()))?;
        pids.extend(text.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
    }
    if !name.is_empty() {
        let dir = std::fs::read_dir(&env.proc_root).map_err(|e| format!("reading {}: {e}", env.proc_root.display()))?;
        for d in dir.flatten() {
            let Some(pid) = d.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid == std::process::id() as i32 {
                continue;
            }
            if std::fs::read_to_string(d.path().join("comm")).is_ok_and(|c| c.trim() == name) {
                pids.push(pid);
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    let sig = signal(sig);
    let mut killed = 0;
    for pid in &pids {
        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), sig).is_ok() {
            killed += 1;
        }
    }
    let what = if name.is_empty() {
        format!("cgroup {cgroup}")
    } else {
        format!("name {name:?}")
    };
    Ok(format!("sent {sig} to {killed} process(es) by {what}"))
}

fn drop_caches(env: &Env, level: &str) -> Result<String, String> {
    let level = if level.is_empty() { "3" } else { level };
    nix::unistd::sync();
    let file = env.proc_root.join("sys/vm/drop_caches");
    std::fs::write(&file, level).map_err(|e| format!("writing {level} to {}: {e}", file.display()))?;
    Ok(format!("dropped caches (level {level})"))
}

/// Deletes regular files older than each path's age under it (not
/// following symlinks, not leaving the file system of the directory).
pub fn clean_disk(paths: &str, now: SystemTime) -> Result<String, String> {
    let list = nodekeeper_proto::remedy::clean_paths(paths)?;
    let (mut files, mut bytes) = (0u64, 0u64);
    for (dir, age) in list {
        let root = Path::new(&dir);
        let dev = match std::fs::symlink_metadata(root) {
            Ok(m) if m.is_dir() => std::os::unix::fs::MetadataExt::dev(&m),
            Ok(_) => return Err(format!("{dir} is not a directory")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("{dir}: {e}")),
        };
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else { continue };
            for e in rd.flatten() {
                let Ok(m) = std::fs::symlink_metadata(e.path()) else {
                    continue;
                };
                if std::os::unix::fs::MetadataExt::dev(&m) != dev {
                    continue;
                }
                if m.is_dir() {
                    stack.push(e.path());
                } else if m.is_file() {
                    let old = m
                        .modified()
                        .ok()
                        .and_then(|t| now.duration_since(t).ok())
                        .is_some_and(|d| d >= age);
                    if old && std::fs::remove_file(e.path()).is_ok() {
                        files += 1;
                        bytes += m.len();
                    }
                }
            }
        }
    }
    Ok(format!("deleted {files} old file(s), {bytes} bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_disk_deletes_only_old_files_and_keeps_directories() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("app");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join("old.log"), b"0123456789").unwrap();
        std::fs::write(dir.path().join("new.log"), b"x").unwrap();
        let later = SystemTime::now() + Duration::from_secs(7200);
        // As of two hours from now, with an age of 3 h: nothing is old enough.
        let spec = format!("{}:3h", dir.path().display());
        assert_eq!(clean_disk(&spec, later).unwrap(), "deleted 0 old file(s), 0 bytes");
        let spec = format!("{}:1h", dir.path().display());
        assert_eq!(clean_disk(&spec, later).unwrap(), "deleted 2 old file(s), 11 bytes");
        assert!(sub.is_dir(), "directories stay");
        assert!(
            clean_disk("/nonexistent-nk:1h", later).is_ok(),
            "a missing directory is nothing to clean"
        );
    }

    #[test]
    fn kill_process_by_name_signals_the_processes_named_so() {
        // A copy of sleep under a name nothing else has.
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("nkkilltest");
        std::fs::copy("/bin/sleep", &exe).unwrap();
        let mut child = std::process::Command::new(&exe).arg("300").spawn().unwrap();
        let env = Env::default();
        let out = kill_process(&env, "nkkilltest", "", "KILL").unwrap();
        assert_eq!(out, "sent SIGKILL to 1 process(es) by name \"nkkilltest\"");
        let st = child.wait().unwrap();
        assert!(!st.success());
        let out = kill_process(&env, "nkkilltest", "", "TERM").unwrap();
        assert!(out.contains("to 0 process(es)"), "{out}");
    }
}
