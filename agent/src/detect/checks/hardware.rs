//! Hardware and system checks, read from sysfs and procfs under a root
//! (`hardware.root`, default /) so a prepared tree with the kernel's real
//! layout can stand in where the device cannot exist: EDAC memory errors,
//! NIC carrier and flaps, clock synchronisation (adjtimex), filesystems
//! turned read-only, kernel taint, and tasks stuck in D state. A check whose
//! source does not exist on the node says so once and is not a fault.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nodekeeper_proto::v1::{Condition, Event, HardwareChecks};

use super::tracker::{Group, Tracker};
use super::{Once, commit, under};
use crate::runtime::Agent;

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

fn num(p: &Path) -> Option<u64> {
    read(p)?.parse().ok()
}

/// EDAC counters of one memory controller or DIMM.
#[derive(Debug, Clone, PartialEq)]
pub struct EdacCount {
    /// `mc0` or `mc0/dimm2 (CPU_SrcID#0_Ha#0_Chan#1_DIMM#0)`.
    pub name: String,
    pub ce: u64,
    pub ue: u64,
}

/// The subdirectories of `dir` whose names start with one of `prefixes`,
/// sorted, with their names.
fn subdirs(dir: &Path, prefixes: &[&str]) -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .filter(|(n, _)| prefixes.iter().any(|p| n.starts_with(p)))
        .collect();
    out.sort();
    out
}

/// Reads every controller and DIMM (or csrow rank) under `edac/mc`.
pub fn edac(root: &Path) -> Option<Vec<EdacCount>> {
    let dir = under(root, "/sys/devices/system/edac/mc");
    if !dir.is_dir() {
        return None;
    }
    let mut out = Vec::new();
    for (mcname, mc) in subdirs(&dir, &["mc"]) {
        out.push(EdacCount {
            name: mcname.clone(),
            ce: num(&mc.join("ce_count")).unwrap_or(0),
            ue: num(&mc.join("ue_count")).unwrap_or(0),
        });
        for (dn, d) in subdirs(&mc, &["dimm", "rank"]) {
            let label = read(&d.join("dimm_label")).filter(|l| !l.is_empty());
            out.push(EdacCount {
                name: match label {
                    Some(l) => format!("{mcname}/{dn} ({l})"),
                    None => format!("{mcname}/{dn}"),
                },
                ce: num(&d.join("dimm_ce_count")).unwrap_or(0),
                ue: num(&d.join("dimm_ue_count")).unwrap_or(0),
            });
        }
    }
    Some(out)
}

/// Mounts from a mountinfo text: (mount point, mount options, fstype,
/// super options).
pub fn mountinfo(text: &str) -> Vec<(String, String, String, String)> {
    text.lines()
        .filter_map(|l| {
            let (a, b) = l.split_once(" - ")?;
            let f: Vec<&str> = a.split(' ').collect();
            let g: Vec<&str> = b.split(' ').collect();
            Some((
                unescape(f.get(4)?),
                f.get(5)?.to_string(),
                g.first()?.to_string(),
                g.get(2).copied().unwrap_or_default().to_string(),
            ))
        })
        .collect()
}

/// mountinfo escapes spaces and such as `\040`.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v as char);
            i += 4;
            continue;
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

/// Filesystems that are read-only by nature or not storage.
const NOT_STORAGE: &[&str] = &[
    "proc",
    "sysfs",
    "cgroup",
    "cgroup2",
    "devpts",
    "mqueue",
    "debugfs",
    "tracefs",
    "securityfs",
    "pstore",
    "bpf",
    "configfs",
    "fusectl",
    "hugetlbfs",
    "autofs",
    "binfmt_misc",
    "squashfs",
    "iso9660",
    "erofs",
    "nsfs",
    "efivarfs",
    "rpc_pipefs",
    "selinuxfs",
];

fn has(opts: &str, o: &str) -> bool {
    opts.split(',').any(|x| x == o)
}

/// The kernel's taint letters (kernel/panic.c), bit by bit.
pub fn taint_letters(mask: u64) -> String {
    nodekeeper_proto::checks::TAINT_FLAGS
        .chars()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, c)| c)
        .collect()
}

/// A task in D state: (pid, start time, comm); kernel threads excluded.
pub fn d_state_tasks(root: &Path) -> Option<Vec<(u32, u64, String)>> {
    let dir = std::fs::read_dir(under(root, "/proc")).ok()?;
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Some(stat) = read(&e.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // After the comm: state(0) ppid(1) ... flags(6) ... starttime(19).
        let flags: u64 = f.get(6).and_then(|x| x.parse().ok()).unwrap_or(0);
        const PF_KTHREAD: u64 = 0x0020_0000;
        if f.first() == Some(&"D") && flags & PF_KTHREAD == 0 {
            out.push((pid, f.get(19).and_then(|x| x.parse().ok()).unwrap_or(0), comm));
        }
    }
    Some(out)
}

/// The kernel clock's state: (synchronised, offset in microseconds).
pub fn clock() -> Result<(bool, f64), String> {
    // SAFETY: adjtimex with modes 0 only reads the kernel's clock state
    // into the zeroed struct it is given; nothing else is touched.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    if state < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    const STA_UNSYNC: i32 = 0x0040;
    const STA_NANO: i32 = 0x2000;
    let offset_us = if tx.status & STA_NANO != 0 {
        tx.offset as f64 / 1000.0
    } else {
        tx.offset as f64
    };
    Ok((state != libc::TIME_ERROR && tx.status & STA_UNSYNC == 0, offset_us))
}

/// Counts increases of a counter within a window.
#[derive(Debug, Default)]
struct Rate {
    last: Option<u64>,
    seen: VecDeque<(Instant, u64)>,
}

impl Rate {
    fn add(&mut self, v: u64, now: Instant, window: Duration) -> u64 {
        if let Some(l) = self.last
            && v > l
        {
            self.seen.push_back((now, v - l));
        }
        self.last = Some(v);
        while self.seen.front().is_some_and(|(t, _)| now.duration_since(*t) > window) {
            self.seen.pop_front();
        }
        self.seen.iter().map(|(_, k)| k).sum()
    }
}

struct State {
    root: PathBuf,
    cfg: HardwareChecks,
    conds: BTreeMap<String, Tracker>,
    /// Conditions new to this node, committed once (False) without an event.
    fresh: Vec<Condition>,
    absent: BTreeMap<&'static str, Once>,
    ce_rate: BTreeMap<String, Rate>,
    flaps: BTreeMap<String, Rate>,
    seen_rw: BTreeSet<String>,
    d_since: BTreeMap<(u32, u64), (Instant, String)>,
    groups: BTreeMap<&'static str, Group>,
}

impl State {
    /// Observes one condition (created on first use).
    fn observe(
        &mut self,
        agent: &Agent,
        kind: &str,
        source: &str,
        healthy: &str,
        bad: Option<(&str, String)>,
        out: &mut Vec<Condition>,
    ) {
        self.observe_for(agent, kind, source, healthy, bad, Duration::ZERO, out)
    }

    /// [`State::observe`] for a rate: it clears only after `clear_after`
    /// of good readings (a restart forgets the counts it had seen, and must
    /// not clear the condition for that).
    #[allow(clippy::too_many_arguments)]
    fn observe_for(
        &mut self,
        agent: &Agent,
        kind: &str,
        source: &str,
        healthy: &str,
        bad: Option<(&str, String)>,
        clear_after: Duration,
        out: &mut Vec<Condition>,
    ) {
        let key = format!("{kind}|{source}");
        let t = self.conds.entry(key).or_insert_with(|| {
            let message = format!("{kind}: no problem found");
            Tracker::new(kind, source, healthy, &message, &super::restored(agent, source))
                .durations(Duration::ZERO, clear_after)
        });
        let initial = t.initial();
        match t.observe(bad.as_ref().map(|(r, m)| (*r, m.as_str())), SystemTime::now()) {
            Some(c) => out.push(c),
            None => self.fresh.extend(initial),
        }
    }

    /// Observes one instance of a condition shared by many (NICs).
    #[allow(clippy::too_many_arguments)]
    fn member(
        &mut self,
        agent: &Agent,
        kind: &'static str,
        source: &str,
        healthy: &str,
        clear_after: Duration,
        member: &str,
        bad: Option<(&str, String)>,
    ) {
        let g = self.groups.entry(kind).or_insert_with(|| {
            Group::new(
                kind,
                source,
                healthy,
                &format!("{kind}: no problem found"),
                (Duration::ZERO, clear_after),
                &super::restored(agent, source),
            )
        });
        g.observe(member, bad.as_ref().map(|(r, m)| (*r, m.as_str())), SystemTime::now());
    }

    /// The shared conditions that changed, with an event when their status
    /// did.
    fn publish(&mut self, out: &mut Vec<Condition>, events: &mut Vec<Event>) {
        for g in self.groups.values_mut() {
            let before = g.published.status.clone();
            let initial = g.initial();
            match g.publish(SystemTime::now()) {
                Some(c) => {
                    if c.status != before {
                        events.push(super::transition_event(&c));
                    }
                    out.push(c);
                }
                None => self.fresh.extend(initial),
            }
        }
    }

    fn missing(&mut self, check: &'static str, message: String, events: &mut Vec<Event>) {
        events.extend(self.absent.entry(check).or_default().say(
            &format!("hardware/{check}"),
            "CheckNotApplicable",
            "Info",
            message,
        ));
    }

    fn pass(&mut self, agent: &Agent, out: &mut Vec<Condition>, events: &mut Vec<Event>) {
        let now = Instant::now();
        let root = self.root.clone();
        let on = |d: Option<bool>| !d.unwrap_or(false);
        // EDAC.
        if on(self.cfg.edac.as_ref().map(|e| e.disabled)) {
            match edac(&root) {
                None => self.missing(
                    "edac",
                    "no EDAC memory controllers on this node (/sys/devices/system/edac/mc)".into(),
                    events,
                ),
                Some(counts) => {
                    let max = self.cfg.edac.as_ref().map_or(0, |e| e.max_corrected_per_hour);
                    let max = u64::from(if max == 0 { 100 } else { max });
                    let hour = Duration::from_secs(3600);
                    let mut ue = Vec::new();
                    let mut hits = Vec::new();
                    for c in &counts {
                        if c.ue > 0
                            && (c.name.contains('/')
                                || !counts
                                    .iter()
                                    .any(|d| d.ue > 0 && d.name.starts_with(&format!("{}/", c.name))))
                        {
                            ue.push(format!("{}: {} uncorrected", c.name, c.ue));
                        }
                        let n = self.ce_rate.entry(c.name.clone()).or_default().add(c.ce, now, hour);
                        if n >= max {
                            hits.push((c.name.clone(), n));
                        }
                    }
                    // Name the DIMMs where the driver knows them.
                    let ce: Vec<String> = hits
                        .iter()
                        .filter(|(name, _)| {
                            name.contains('/') || !hits.iter().any(|(o, _)| o.starts_with(&format!("{name}/")))
                        })
                        .map(|(name, n)| format!("{name}: {n} corrected in the last hour"))
                        .collect();
                    let ue_bad = (!ue.is_empty()).then(|| ("UncorrectableMemoryError", ue.join("; ")));
                    self.observe(
                        agent,
                        "UncorrectableMemoryErrors",
                        "hardware/edac",
                        "NoUncorrectableMemoryErrors",
                        ue_bad,
                        out,
                    );
                    let ce_bad = (!ce.is_empty()).then(|| ("CorrectableMemoryErrorRate", ce.join("; ")));
                    self.observe_for(
                        agent,
                        "CorrectableMemoryErrors",
                        "hardware/edac",
                        "NoCorrectableMemoryErrors",
                        ce_bad,
                        hour,
                        out,
                    );
                }
            }
        }
        // NICs.
        if on(self.cfg.nic.as_ref().map(|n| n.disabled)) {
            let nic = self.cfg.nic.clone().unwrap_or_default();
            let net = under(&root, "/sys/class/net");
            let names: Vec<String> = if nic.interfaces.is_empty() {
                let mut v: Vec<String> = std::fs::read_dir(&net)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.path().join("device").exists())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                v.sort();
                v
            } else {
                nic.interfaces.clone()
            };
            if names.is_empty() {
                self.missing(
                    "nic",
                    format!("no physical network interfaces under {}", net.display()),
                    events,
                );
            }
            let window = Duration::from_secs(u64::from(if nic.flap_window_seconds == 0 {
                600
            } else {
                nic.flap_window_seconds
            }));
            let max_flaps = u64::from(if nic.max_flaps == 0 { 5 } else { nic.max_flaps });
            for n in names {
                let d = net.join(&n);
                if !d.exists() {
                    self.missing("nic", format!("interface {n} does not exist"), events);
                    continue;
                }
                let up = read(&d.join("flags"))
                    .and_then(|f| u64::from_str_radix(f.trim_start_matches("0x"), 16).ok())
                    .is_some_and(|f| f & 1 != 0);
                let carrier = read(&d.join("carrier")).as_deref() == Some("1");
                let down = (up && !carrier).then(|| ("NoCarrier", format!("{n} is up but has no carrier (link down)")));
                self.member(
                    agent,
                    "NetworkInterfaceDown",
                    "hardware/nic",
                    "CarrierUp",
                    Duration::ZERO,
                    &n,
                    down,
                );
                if let Some(changes) = num(&d.join("carrier_changes")) {
                    let k = self.flaps.entry(n.clone()).or_default().add(changes, now, window);
                    let flap = (k >= max_flaps).then(|| {
                        (
                            "LinkFlapping",
                            format!("{n} lost or regained carrier {k} times in {} s", window.as_secs()),
                        )
                    });
                    self.member(
                        agent,
                        "FrequentNetworkInterfaceFlap",
                        "hardware/nic",
                        "LinkStable",
                        window,
                        &n,
                        flap,
                    );
                }
            }
        }
        // Clock.
        if on(self.cfg.clock.as_ref().map(|c| c.disabled)) {
            let max_ms = self.cfg.clock.as_ref().map_or(0, |c| c.max_offset_millis);
            let max_ms = if max_ms == 0 { 500.0 } else { f64::from(max_ms) };
            match clock() {
                Err(e) => self.missing("clock", format!("adjtimex: {e}"), events),
                Ok((synced, offset_us)) => {
                    let bad = if !synced {
                        Some((
                            "ClockNotSynchronized",
                            "the kernel clock is not synchronised (adjtimex: no time service is disciplining it)"
                                .to_string(),
                        ))
                    } else if offset_us.abs() / 1000.0 > max_ms {
                        Some((
                            "ClockOffsetTooLarge",
                            format!(
                                "the clock is off by {:.0} ms (more than {max_ms:.0} ms)",
                                offset_us / 1000.0
                            ),
                        ))
                    } else {
                        None
                    };
                    self.observe(
                        agent,
                        "ClockUnsynchronized",
                        "hardware/clock",
                        "ClockSynchronized",
                        bad,
                        out,
                    );
                }
            }
        }
        // Read-only filesystems.
        if on(self.cfg.read_only.as_ref().map(|r| r.disabled)) {
            let must: Vec<String> = self
                .cfg
                .read_only
                .as_ref()
                .map(|r| r.mounts.clone())
                .unwrap_or_default();
            match read(&under(&root, "/proc/self/mountinfo")) {
                None => self.missing("mounts", "no /proc/self/mountinfo".into(), events),
                Some(text) => {
                    let mut ro = Vec::new();
                    let mut present = BTreeSet::new();
                    for (mp, mopts, fstype, sopts) in mountinfo(&text) {
                        if NOT_STORAGE.contains(&fstype.as_str()) {
                            continue;
                        }
                        present.insert(mp.clone());
                        let mount_rw = has(&mopts, "rw");
                        if mount_rw && has(&sopts, "ro") {
                            ro.push(format!("{mp} ({fstype}) was remounted read-only by the kernel"));
                        } else if !mount_rw && (self.seen_rw.contains(&mp) || must.contains(&mp)) {
                            ro.push(format!("{mp} ({fstype}) is read-only"));
                        } else if mount_rw {
                            self.seen_rw.insert(mp);
                        }
                    }
                    self.seen_rw.retain(|m| present.contains(m));
                    let bad = (!ro.is_empty()).then(|| ("FilesystemIsReadOnly", ro.join("; ")));
                    self.observe(
                        agent,
                        "ReadonlyFilesystem",
                        "hardware/mounts",
                        "FilesystemIsNotReadOnly",
                        bad,
                        out,
                    );
                }
            }
        }
        // Kernel taint.
        if on(self.cfg.taint.as_ref().map(|t| t.disabled)) {
            match num(&under(&root, "/proc/sys/kernel/tainted")) {
                None => self.missing("taint", "no /proc/sys/kernel/tainted".into(), events),
                Some(mask) => {
                    let watch = self
                        .cfg
                        .taint
                        .as_ref()
                        .map(|t| t.flags.clone())
                        .filter(|f| !f.is_empty())
                        .unwrap_or_else(|| "BDLM".into());
                    let letters = taint_letters(mask);
                    let hit: String = letters.chars().filter(|c| watch.contains(*c)).collect();
                    let bad = (!hit.is_empty()).then(|| {
                        (
                            "KernelTainted",
                            format!("the kernel is tainted {letters} (watched: {hit}; value {mask})"),
                        )
                    });
                    self.observe(agent, "KernelTainted", "hardware/taint", "KernelNotTainted", bad, out);
                }
            }
        }
        // Tasks stuck in D state.
        if on(self.cfg.stuck_tasks.as_ref().map(|s| s.disabled)) {
            let limit = self.cfg.stuck_tasks.as_ref().map_or(0, |s| s.seconds);
            let limit = Duration::from_secs(u64::from(if limit == 0 { 120 } else { limit }));
            match d_state_tasks(&root) {
                None => self.missing("tasks", "no /proc".into(), events),
                Some(tasks) => {
                    let now_keys: BTreeSet<(u32, u64)> = tasks.iter().map(|(p, s, _)| (*p, *s)).collect();
                    self.d_since.retain(|k, _| now_keys.contains(k));
                    for (p, s, comm) in tasks {
                        self.d_since.entry((p, s)).or_insert((now, comm));
                    }
                    let stuck: Vec<String> = self
                        .d_since
                        .iter()
                        .filter(|(_, (t, _))| now.duration_since(*t) >= limit)
                        .map(|((p, _), (t, c))| format!("{c}[{p}] for {} s", now.duration_since(*t).as_secs()))
                        .collect();
                    let bad = (!stuck.is_empty()).then(|| {
                        (
                            "TasksInUninterruptibleSleep",
                            format!("in D state past {} s: {}", limit.as_secs(), stuck.join(", ")),
                        )
                    });
                    self.observe(agent, "TasksStuckInDState", "hardware/tasks", "NoStuckTasks", bad, out);
                }
            }
        }
    }
}

/// Runs the hardware checks until aborted.
pub async fn run(agent: Arc<Agent>, cfg: HardwareChecks) {
    let period = Duration::from_secs(u64::from(if cfg.period_seconds == 0 {
        30
    } else {
        cfg.period_seconds
    }));
    let root = PathBuf::from(if cfg.root.is_empty() { "/" } else { cfg.root.as_str() });
    let mut st = State {
        root,
        cfg,
        conds: BTreeMap::new(),
        fresh: Vec::new(),
        absent: BTreeMap::new(),
        ce_rate: BTreeMap::new(),
        flaps: BTreeMap::new(),
        seen_rw: BTreeSet::new(),
        d_since: BTreeMap::new(),
        groups: BTreeMap::new(),
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let t0 = Instant::now();
        // A pass reads sysfs and every /proc/PID/stat: off the async
        // workers, so a node with many processes does not stall them.
        let a = agent.clone();
        let done = tokio::task::spawn_blocking(move || {
            let mut conditions = Vec::new();
            let mut events = Vec::new();
            st.pass(&a, &mut conditions, &mut events);
            (st, conditions, events)
        })
        .await;
        let Ok((back, mut conditions, mut events)) = done else {
            tracing::error!("the hardware checks' pass panicked; they stop");
            return;
        };
        st = back;
        events.extend(conditions.iter().map(super::transition_event));
        st.publish(&mut conditions, &mut events);
        conditions.append(&mut st.fresh);
        agent.metrics.check_run("hardware", "done", t0.elapsed().as_secs_f64());
        commit(&agent, conditions, events);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_taint_and_proc_parse() {
        let m = "36 35 98:0 /mnt1 /mnt/my\\040disk rw,noatime master:1 - ext3 /dev/root ro,errors=continue\n\
                 37 35 0:5 / /proc rw,nosuid - proc proc rw\n";
        let v = mountinfo(m);
        assert_eq!(
            v[0],
            (
                "/mnt/my disk".into(),
                "rw,noatime".into(),
                "ext3".into(),
                "ro,errors=continue".into()
            )
        );
        assert_eq!(v[1].2, "proc");
        assert_eq!(taint_letters(0), "");
        assert_eq!(taint_letters((1 << 7) | (1 << 12) | 1), "PDO");
    }
}
