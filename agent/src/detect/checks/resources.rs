//! Resource pressure with hysteresis: MemoryPressure (MemAvailable and PSI
//! memory), DiskPressure per filesystem (space and inodes), PIDPressure,
//! CPUPressure and IOPressure (PSI) and HighLoad. A signal enters its
//! condition past `enter` held for `forSeconds` and leaves it back past
//! `exit` held for `clearSeconds`; the defaults are kubelet's eviction
//! thresholds and its 5-minute pressure transition period, so the
//! conditions agree with what kubelet does.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nodekeeper_proto::checks::timing;
use nodekeeper_proto::quantity::Quantity;
use nodekeeper_proto::v1::{ResourceChecks, SignalTiming, Threshold};

use super::tracker::{Group, Tracker};
use super::{Once, commit};
use crate::runtime::Agent;

/// enter and exit with defaults; `exit` defaults to `enter`.
fn limits(t: &Option<Threshold>, default: &str) -> (Quantity, Quantity) {
    let enter = t
        .as_ref()
        .map(|t| t.enter.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or(default);
    let exit = t
        .as_ref()
        .map(|t| t.exit.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or(enter);
    let q = |s: &str| Quantity::parse(s).unwrap_or(Quantity::Amount(0.0));
    (q(enter), q(exit))
}

/// `key` in /proc/meminfo, bytes.
pub fn meminfo(text: &str, key: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        let kb: f64 = rest.split_whitespace().next()?.parse().ok()?;
        Some(kb * 1024.0)
    })
}

/// `avg10` of the `some` or `full` line of a /proc/pressure file.
pub fn psi(text: &str, line: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line))?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))?
        .parse()
        .ok()
}

/// What a signal measures.
#[derive(Debug, Clone, PartialEq)]
enum Measure {
    Memory,
    Disk(String),
    Pids,
    Cpu,
    Io,
    Load,
}

struct Signal {
    measure: Measure,
    tracker: Tracker,
    /// (enter, exit) of the first and second threshold.
    first: (Quantity, Quantity),
    second: Option<(Quantity, Quantity)>,
    missing: Once,
}

/// A reading: the "bad" values are checked against the limits by
/// [`Signal::judge`]; None when the source does not exist here.
struct Reading {
    /// (value, total) of the first threshold: below enter is bad.
    first: (f64, f64),
    second: Option<(f64, f64)>,
    /// Bad when above (PSI, load) rather than below (free space), for the
    /// first and the second threshold.
    above: bool,
    second_above: bool,
}

impl Signal {
    /// The trouble in a reading; `active` says which side of the
    /// hysteresis applies.
    fn judge(&self, r: &Reading, active: bool) -> Option<(String, String)> {
        let past = |(v, total): (f64, f64), (enter, exit): (Quantity, Quantity), above: bool| {
            let limit = if active { exit } else { enter }.of(total);
            if above { v > limit } else { v < limit }
        };
        let (r1, r2) = reasons(&self.measure);
        let fmt = |v: f64, total: f64| match self.measure {
            Measure::Memory | Measure::Disk(_) if r.above => format!("{v:.1}%"),
            Measure::Memory | Measure::Disk(_) => format!("{} of {}", bytes(v), bytes(total)),
            Measure::Pids => format!("{v:.0} of {total:.0} free"),
            Measure::Cpu | Measure::Io => format!("{v:.1}% stalled (avg10)"),
            Measure::Load => format!("{v:.2} per CPU"),
        };
        if past(r.first, self.first, r.above) {
            return Some((
                r1.to_string(),
                format!("{}: {}", what(&self.measure), fmt(r.first.0, r.first.1)),
            ));
        }
        if let (Some(v), Some(l)) = (r.second, self.second)
            && past(v, l, r.second_above)
        {
            let m = match self.measure {
                Measure::Memory => format!("memory: {:.1}% of time fully stalled (PSI avg10)", v.0),
                Measure::Disk(ref d) => format!("{d}: {:.0} of {:.0} inodes free", v.0, v.1),
                _ => fmt(v.0, v.1),
            };
            return Some((r2.to_string(), m));
        }
        None
    }
}

fn bytes(v: f64) -> String {
    const MI: f64 = 1024.0 * 1024.0;
    if v >= 1024.0 * MI {
        format!("{:.1}Gi", v / 1024.0 / MI)
    } else {
        format!("{:.0}Mi", v / MI)
    }
}

fn what(m: &Measure) -> String {
    match m {
        Measure::Memory => "memory available".into(),
        Measure::Disk(d) => format!("{d}: space available"),
        Measure::Pids => "process ids".into(),
        Measure::Cpu => "cpu".into(),
        Measure::Io => "io".into(),
        Measure::Load => "1-minute load".into(),
    }
}

/// (condition, healthy reason, first bad reason, second bad reason).
fn names(m: &Measure) -> (&'static str, &'static str) {
    match m {
        Measure::Memory => ("MemoryPressure", "SufficientMemory"),
        Measure::Disk(_) => ("DiskPressure", "SufficientDisk"),
        Measure::Pids => ("PIDPressure", "SufficientPIDs"),
        Measure::Cpu => ("CPUPressure", "NoCPUPressure"),
        Measure::Io => ("IOPressure", "NoIOPressure"),
        Measure::Load => ("HighLoad", "NormalLoad"),
    }
}

fn reasons(m: &Measure) -> (&'static str, &'static str) {
    match m {
        Measure::Memory => ("InsufficientMemory", "MemoryStalled"),
        Measure::Disk(_) => ("InsufficientDiskSpace", "InsufficientInodes"),
        Measure::Pids => ("InsufficientPIDs", "InsufficientPIDs"),
        Measure::Cpu => ("CPUStalled", "CPUStalled"),
        Measure::Io => ("IOStalled", "IOStalled"),
        Measure::Load => ("HighLoadAverage", "HighLoadAverage"),
    }
}

/// Every resource condition's source (one DiskPressure for all mounts, as
/// kubelet has one).
fn source(_: &Measure) -> String {
    "resources".into()
}

fn read(m: &Measure) -> Result<Reading, String> {
    let file = |p: &str| std::fs::read_to_string(p).map_err(|e| format!("{p}: {e}"));
    match m {
        Measure::Memory => {
            let t = file("/proc/meminfo")?;
            let avail = meminfo(&t, "MemAvailable").ok_or("/proc/meminfo has no MemAvailable")?;
            let total = meminfo(&t, "MemTotal").unwrap_or(avail);
            let stall = std::fs::read_to_string("/proc/pressure/memory")
                .ok()
                .and_then(|p| psi(&p, "full"));
            Ok(Reading {
                first: (avail, total),
                second: stall.map(|s| (s, 100.0)),
                above: false,
                second_above: true,
            })
        }
        Measure::Disk(d) => {
            let s = nix::sys::statvfs::statvfs(Path::new(d)).map_err(|e| format!("{d}: {e}"))?;
            let frag = s.fragment_size() as f64;
            let inodes = s.files() as f64;
            Ok(Reading {
                first: (s.blocks_available() as f64 * frag, s.blocks() as f64 * frag),
                second: (inodes > 0.0).then(|| (s.files_available() as f64, inodes)),
                above: false,
                second_above: false,
            })
        }
        Measure::Pids => {
            let max: f64 = file("/proc/sys/kernel/pid_max")?
                .trim()
                .parse()
                .map_err(|_| "pid_max unreadable")?;
            let load = file("/proc/loadavg")?;
            let threads: f64 = load
                .split_whitespace()
                .nth(3)
                .and_then(|f| f.split('/').nth(1))
                .and_then(|n| n.parse().ok())
                .ok_or("/proc/loadavg unreadable")?;
            Ok(Reading {
                first: (max - threads, max),
                second: None,
                above: false,
                second_above: false,
            })
        }
        Measure::Cpu | Measure::Io => {
            let (p, line) = if *m == Measure::Cpu {
                ("/proc/pressure/cpu", "some")
            } else {
                ("/proc/pressure/io", "full")
            };
            let t = file(p).map_err(|e| format!("{e} (a kernel without PSI)"))?;
            let v = psi(&t, line).ok_or_else(|| format!("{p} has no {line} line"))?;
            Ok(Reading {
                first: (v, 100.0),
                second: None,
                above: true,
                second_above: false,
            })
        }
        Measure::Load => {
            let t = file("/proc/loadavg")?;
            let l: f64 = t
                .split_whitespace()
                .next()
                .and_then(|f| f.parse().ok())
                .ok_or("/proc/loadavg unreadable")?;
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            Ok(Reading {
                first: (l / cpus, f64::MAX),
                second: None,
                above: true,
                second_above: false,
            })
        }
    }
}

/// kubelet's filesystems: the root, kubelet's and containerd's, one each.
fn default_mounts() -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for m in ["/", "/var/lib/kubelet", "/var/lib/containerd"] {
        if let Ok(md) = std::fs::metadata(m)
            && !seen.contains(&md.dev())
        {
            seen.push(md.dev());
            out.push(m.to_string());
        }
    }
    out
}

fn signals(stored: &[nodekeeper_proto::v1::Condition], r: &ResourceChecks) -> Vec<Signal> {
    let mut out = Vec::new();
    let mut add = |measure: Measure, t: &Option<SignalTiming>, default_for: u64, first, second| {
        let (on, for_, clear) = timing(t);
        if !on {
            return;
        }
        let for_ = if t.as_ref().is_some_and(|t| t.for_seconds > 0) {
            for_
        } else {
            Duration::from_secs(default_for)
        };
        let (kind, healthy) = names(&measure);
        let src = source(&measure);
        let tracker =
            Tracker::new(kind, &src, healthy, &format!("{} is fine", what(&measure)), stored).durations(for_, clear);
        out.push(Signal {
            measure,
            tracker,
            first,
            second,
            missing: Once::default(),
        });
    };
    let m = r.memory.clone().unwrap_or_default();
    add(
        Measure::Memory,
        &m.timing,
        0,
        limits(&m.available, "100Mi"),
        Some(limits(&m.psi_full_avg10, "10")),
    );
    let d = r.disk.clone().unwrap_or_default();
    let mounts = if d.mounts.is_empty() {
        default_mounts()
    } else {
        d.mounts.clone()
    };
    for mount in mounts {
        add(
            Measure::Disk(mount),
            &d.timing,
            0,
            limits(&d.available, "10%"),
            Some(limits(&d.inodes_free, "5%")),
        );
    }
    let p = r.pids.clone().unwrap_or_default();
    add(Measure::Pids, &p.timing, 0, limits(&p.available, "5%"), None);
    let c = r.cpu.clone().unwrap_or_default();
    add(Measure::Cpu, &c.timing, 60, limits(&c.avg10, "90"), None);
    let i = r.io.clone().unwrap_or_default();
    add(Measure::Io, &i.timing, 60, limits(&i.avg10, "50"), None);
    let l = r.load.clone().unwrap_or_default();
    add(Measure::Load, &l.timing, 300, limits(&l.per_cpu, "4"), None);
    out
}

/// Watches every resource signal until aborted.
pub async fn run(agent: Arc<Agent>, r: ResourceChecks) {
    let period = Duration::from_secs(u64::from(if r.period_seconds == 0 { 10 } else { r.period_seconds }));
    let mut sigs = signals(&super::restored(&agent, "resources"), &r);
    // The mounts share one DiskPressure; each has its own hysteresis.
    let d = r.disk.clone().unwrap_or_default();
    let (_, _, clear) = timing(&d.timing);
    let enter = Duration::from_secs(u64::from(d.timing.map_or(0, |t| t.for_seconds)));
    let mut disk = Group::new(
        "DiskPressure",
        "resources",
        "SufficientDisk",
        "every filesystem has room",
        (enter, clear),
        &super::restored(&agent, "resources"),
    );
    let mut initial: Vec<_> = sigs
        .iter_mut()
        .filter(|s| !matches!(s.measure, Measure::Disk(_)))
        .filter_map(|s| s.tracker.initial())
        .collect();
    if sigs.iter().any(|s| matches!(s.measure, Measure::Disk(_))) {
        initial.extend(disk.initial());
    }
    commit(&agent, initial, Vec::new());
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let t0 = Instant::now();
        let now = SystemTime::now();
        let mut conditions = Vec::new();
        let mut events = Vec::new();
        for s in sigs.iter_mut() {
            match read(&s.measure) {
                Ok(reading) => {
                    s.missing.clear();
                    if let Measure::Disk(mount) = &s.measure {
                        let bad = s.judge(&reading, disk.active(mount));
                        disk.observe(mount, bad.as_ref().map(|(r, m)| (r.as_str(), m.as_str())), now);
                        continue;
                    }
                    let bad = s.judge(&reading, s.tracker.active());
                    conditions.extend(
                        s.tracker
                            .observe(bad.as_ref().map(|(r, m)| (r.as_str(), m.as_str())), now),
                    );
                }
                Err(e) => events.extend(s.missing.say(
                    &source(&s.measure),
                    "CheckNotApplicable",
                    "Info",
                    format!("{} cannot be measured here: {e}", what(&s.measure)),
                )),
            }
        }
        agent.metrics.check_run("resources", "done", t0.elapsed().as_secs_f64());
        events.extend(conditions.iter().map(super::transition_event));
        let before = disk.published.status.clone();
        if let Some(c) = disk.publish(now) {
            if c.status != before {
                events.push(super::transition_event(&c));
            }
            conditions.push(c);
        }
        commit(&agent, conditions, events);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        let m = "MemTotal:        8000000 kB\nMemFree:  10 kB\nMemAvailable:    102400 kB\n";
        assert_eq!(meminfo(m, "MemAvailable"), Some(102_400.0 * 1024.0));
        assert_eq!(meminfo(m, "MemTotal"), Some(8_000_000.0 * 1024.0));
        assert_eq!(meminfo(m, "Mem"), None);
        let p = "some avg10=12.50 avg60=3.00 avg300=1.00 total=123\nfull avg10=4.25 avg60=1.00 avg300=0.50 total=99\n";
        assert_eq!(psi(p, "some"), Some(12.5));
        assert_eq!(psi(p, "full"), Some(4.25));
    }

    #[test]
    fn the_defaults_are_kubelets_eviction_thresholds() {
        let sigs = signals(&[], &ResourceChecks::default());
        let find = |m: fn(&Measure) -> bool| sigs.iter().find(|s| m(&s.measure)).expect("signal");
        let below = |v: f64, total: f64| Reading {
            first: (v, total),
            second: None,
            above: false,
            second_above: false,
        };
        const MI: f64 = 1024.0 * 1024.0;
        // memory.available < 100Mi
        let mem = find(|m| *m == Measure::Memory);
        assert!(mem.judge(&below(99.0 * MI, 8e9), false).is_some());
        assert!(mem.judge(&below(101.0 * MI, 8e9), false).is_none());
        // nodefs.available < 10%, nodefs.inodesFree < 5% (the root filesystem
        // is always among the default mounts).
        let disk = sigs
            .iter()
            .find(|s| s.measure == Measure::Disk("/".into()))
            .expect("/ is watched by default");
        assert!(disk.judge(&below(9.9, 100.0), false).is_some());
        assert!(disk.judge(&below(10.1, 100.0), false).is_none());
        let inodes = |free: f64| Reading {
            first: (50.0, 100.0),
            second: Some((free, 100.0)),
            above: false,
            second_above: false,
        };
        assert_eq!(
            disk.judge(&inodes(4.9), false).map(|b| b.0),
            Some("InsufficientInodes".into())
        );
        assert!(disk.judge(&inodes(5.1), false).is_none());
        // kubelet's pressure transition period: 5 minutes before clearing.
        assert_eq!(timing(&None).2, Duration::from_secs(300));
    }

    #[test]
    fn thresholds_have_hysteresis() {
        let mut s = Signal {
            measure: Measure::Disk("/data".into()),
            tracker: Tracker::new("DiskPressure", "resources/disk:/data", "SufficientDisk", "ok", &[]),
            first: limits(
                &Some(Threshold {
                    enter: "10%".into(),
                    exit: "15%".into(),
                }),
                "10%",
            ),
            second: Some(limits(&None, "5%")),
            missing: Once::default(),
        };
        let r = |free: f64, inodes: f64| Reading {
            first: (free, 100.0),
            second: Some((inodes, 100.0)),
            above: false,
            second_above: false,
        };
        let now = SystemTime::now();
        assert_eq!(s.judge(&r(12.0, 50.0), s.tracker.active()), None);
        let bad = s.judge(&r(9.0, 50.0), s.tracker.active()).expect("below 10%");
        assert_eq!(bad.0, "InsufficientDiskSpace");
        assert!(bad.1.contains("/data"), "{bad:?}");
        s.tracker.observe(Some((&bad.0, &bad.1)), now);
        assert!(
            s.judge(&r(12.0, 50.0), s.tracker.active()).is_some(),
            "active until back above 15%"
        );
        assert_eq!(s.judge(&r(16.0, 50.0), s.tracker.active()), None);
        assert_eq!(
            s.judge(&r(50.0, 4.0), s.tracker.active()).map(|b| b.0),
            Some("InsufficientInodes".into())
        );

        // Memory: little available is bad, much stall is bad, not the reverse.
        let m = Signal {
            measure: Measure::Memory,
            tracker: Tracker::new("MemoryPressure", "resources", "SufficientMemory", "ok", &[]),
            first: limits(&None, "100Mi"),
            second: Some(limits(&None, "10")),
            missing: Once::default(),
        };
        let mem = |avail: f64, stall: f64| Reading {
            first: (avail, 8e9),
            second: Some((stall, 100.0)),
            above: false,
            second_above: true,
        };
        assert_eq!(m.judge(&mem(4e9, 0.0), false), None);
        assert_eq!(
            m.judge(&mem(50e6, 0.0), false).map(|b| b.0),
            Some("InsufficientMemory".into())
        );
        assert_eq!(
            m.judge(&mem(4e9, 25.0), false).map(|b| b.0),
            Some("MemoryStalled".into())
        );
    }
}
