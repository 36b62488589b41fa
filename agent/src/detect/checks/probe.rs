//! Health probes: HTTP (kubelet's `:10248/healthz`), TCP, exec, a systemd
//! unit over D-Bus (its ActiveState and its restarts in a window, which
//! replaces NPD's log-counter), and containerd over its gRPC API. A probe
//! that cannot run at all (no systemd to ask, a program that does not
//! exist) says so once with a ProbeFailed event and leaves its condition
//! alone; a node without the probed unit reports that once and is not
//! unhealthy.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nodekeeper_proto::checks::ProbeKind;
use nodekeeper_proto::v1::Probe;

use super::tracker::Tracker;
use super::{Once, commit};
use crate::converge::component::systemd::{self, UnitStatus};
use crate::runtime::Agent;

/// How often a probe whose unit is not installed looks again.
const ABSENT_RECHECK: Duration = Duration::from_secs(60);

/// What one probe found.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Healthy(String),
    Unhealthy(String),
    /// The probe could not ask (a ProbeFailed event, the condition kept).
    CannotRun(String),
    /// What it probes does not exist on this node (said once).
    Absent(String),
}

/// NPD's healthy reasons: `KubeletUnhealthy` → `KubeletIsHealthy`,
/// `FrequentKubeletRestart` → `NoFrequentKubeletRestart`.
pub fn healthy_reason(condition: &str) -> String {
    match condition.strip_suffix("Unhealthy") {
        Some(p) if !p.is_empty() => format!("{p}IsHealthy"),
        _ => format!("No{condition}"),
    }
}

async fn unit_status(unit: &str) -> Result<UnitStatus, String> {
    let u = unit.to_string();
    tokio::task::spawn_blocking(move || systemd::select().status(&u))
        .await
        .map_err(|e| format!("asking systemd: {e}"))?
}

fn installed(s: &UnitStatus) -> bool {
    !matches!(s.load_state.as_str(), "not-found" | "")
}

/// One HTTP probe.
async fn http(url: &str, expect: &[u32], timeout: Duration) -> Outcome {
    let (url, expect) = (url.to_string(), expect.to_vec());
    let r = tokio::task::spawn_blocking(move || {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build();
        let agent = ureq::Agent::new_with_config(config);
        match agent.get(&url).call() {
            Ok(resp) => {
                let status = u32::from(resp.status().as_u16());
                let ok = if expect.is_empty() {
                    (200..400).contains(&status)
                } else {
                    expect.contains(&status)
                };
                let mut body = String::new();
                let _ = std::io::Read::read_to_string(
                    &mut std::io::Read::take(resp.into_body().into_reader(), 256),
                    &mut body,
                );
                let msg = format!("GET {url}: HTTP {status} {}", body.trim());
                if ok {
                    Outcome::Healthy(msg)
                } else {
                    Outcome::Unhealthy(msg)
                }
            }
            Err(e) => Outcome::Unhealthy(format!("GET {url}: {e}")),
        }
    })
    .await;
    r.unwrap_or_else(|e| Outcome::CannotRun(format!("HTTP probe: {e}")))
}

async fn tcp(address: &str, timeout: Duration) -> Outcome {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address)).await {
        Ok(Ok(_)) => Outcome::Healthy(format!("{address} accepts connections")),
        Ok(Err(e)) => Outcome::Unhealthy(format!("connecting to {address}: {e}")),
        Err(_) => Outcome::Unhealthy(format!(
            "connecting to {address}: no answer within {} s",
            timeout.as_secs()
        )),
    }
}

async fn exec(command: &[String], timeout: Duration) -> Outcome {
    let r = super::run::run(command, timeout).await;
    let prog = command.first().cloned().unwrap_or_default();
    let out = super::plugin::cut(r.stdout.trim(), 200).0;
    if let Some(e) = &r.start_error
        && !r.timed_out
        && r.exit_code.is_none()
    {
        return Outcome::CannotRun(e.clone());
    }
    match (r.timed_out, r.exit_code) {
        (true, _) => Outcome::Unhealthy(format!(
            "{prog} did not finish within {} s and was killed",
            timeout.as_secs()
        )),
        (false, Some(0)) => Outcome::Healthy(out),
        (false, code) => Outcome::Unhealthy(format!(
            "{prog} exited with {}: {out}",
            code.map_or("a signal".to_string(), |c| c.to_string())
        )),
    }
}

/// Restarts of a unit seen over time.
#[derive(Debug, Default)]
pub struct Restarts {
    last: Option<(u32, u64)>,
    seen: VecDeque<(Instant, u32)>,
}

impl Restarts {
    /// Adds a sample (NRestarts, ActiveEnterTimestamp) taken at `now`;
    /// returns the restarts within `window`. A start not counted by
    /// NRestarts (by hand, or after NRestarts was reset) counts once.
    pub fn sample(&mut self, n_restarts: u32, entered: u64, now: Instant, window: Duration) -> u32 {
        if let Some((n, t)) = self.last {
            let by_counter = n_restarts.saturating_sub(n);
            let new_start = u32::from(entered != t && entered != 0);
            let k = by_counter.max(new_start);
            if k > 0 {
                self.seen.push_back((now, k));
            }
        }
        self.last = Some((n_restarts, entered));
        while self.seen.front().is_some_and(|(t, _)| now.duration_since(*t) > window) {
            self.seen.pop_front();
        }
        self.seen.iter().map(|(_, k)| k).sum()
    }
}

/// Runs one probe until aborted.
pub async fn run(agent: Arc<Agent>, p: Probe) {
    let source = format!("probe/{}", p.name);
    let check = source.clone();
    let stored = super::restored(&agent, &source);
    let mut health = p.condition_type().map(|c| {
        Tracker::new(
            &c,
            &source,
            &healthy_reason(&c),
            &format!("probe {} passes", p.name),
            &stored,
        )
        .counts(p.failure_threshold(), p.success_threshold())
    });
    let unit = p.systemd_unit.clone().unwrap_or_default();
    let window = Duration::from_secs(u64::from(if unit.restart_window_seconds == 0 {
        1200
    } else {
        unit.restart_window_seconds
    }));
    let max_restarts = if unit.max_restarts == 0 { 5 } else { unit.max_restarts };
    let mut restarts_tracker = p.restart_condition().map(|c| {
        Tracker::new(
            &c,
            &source,
            &healthy_reason(&c),
            &format!(
                "{} restarts less than {max_restarts} times in {} s",
                unit.unit,
                window.as_secs()
            ),
            &stored,
        )
        // Clears only once a whole window passed quietly: a restarted agent
        // has no history, which is not the same as no restarts.
        .durations(Duration::ZERO, window)
    });
    let mut restarts = Restarts::default();
    let mut failed = Once::default();
    let mut absent = Once::default();
    let mut started = false;
    let kind = p.kind();
    let mut tick = tokio::time::interval(p.period());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_absent_check = Instant::now();
    loop {
        tick.tick().await;
        // What is not installed is looked for again once a minute, not
        // every period.
        if Instant::now() < next_absent_check {
            continue;
        }
        let t0 = Instant::now();
        let mut events = Vec::new();
        let mut conditions = Vec::new();
        // Only where the unit it needs is installed.
        let mut outcome = None;
        if !p.requires_unit.is_empty() {
            match unit_status(&p.requires_unit).await {
                Ok(s) if installed(&s) => {}
                Ok(_) => {
                    outcome = Some(Outcome::Absent(format!(
                        "{} is not installed on this node",
                        p.requires_unit
                    )))
                }
                Err(e) => {
                    outcome = Some(Outcome::Absent(format!(
                        "cannot tell whether {} is installed: {e}",
                        p.requires_unit
                    )))
                }
            }
        }
        let outcome = match outcome {
            Some(o) => o,
            None => match kind {
                Some(ProbeKind::Http) => {
                    let h = p.http.clone().unwrap_or_default();
                    http(&h.url, &h.expect_status, p.timeout()).await
                }
                Some(ProbeKind::Tcp) => tcp(&p.tcp.clone().unwrap_or_default().address, p.timeout()).await,
                Some(ProbeKind::Exec) => exec(&p.exec.clone().unwrap_or_default().command, p.timeout()).await,
                Some(ProbeKind::Containerd) => {
                    let c = p.containerd.clone().unwrap_or_default();
                    match crate::containerd::ask(&c.address, &c.namespace, p.timeout()).await {
                        Ok(a) => Outcome::Healthy(format!(
                            "containerd {} lists {} containers in {}",
                            a.version,
                            a.containers,
                            if c.namespace.is_empty() { "k8s.io" } else { &c.namespace }
                        )),
                        Err(e) => Outcome::Unhealthy(e),
                    }
                }
                Some(ProbeKind::SystemdUnit) => match unit_status(&unit.unit).await {
                    // A node not run by systemd has no units to watch (sd_booted:
                    // /run/systemd/system exists only under systemd).
                    Err(e) if !std::path::Path::new("/run/systemd/system").exists() => {
                        Outcome::Absent(format!("this node is not run by systemd ({e})"))
                    }
                    Err(e) => Outcome::CannotRun(format!("cannot ask systemd about {}: {e}", unit.unit)),
                    Ok(s) if !installed(&s) => Outcome::Absent(format!("{} is not installed on this node", unit.unit)),
                    Ok(s) => {
                        let n = restarts.sample(s.n_restarts, s.active_enter_timestamp, Instant::now(), window);
                        if let Some(t) = restarts_tracker.as_mut() {
                            let msg = format!(
                                "{} restarted {n} times in the last {} s (NRestarts {}, {} {})",
                                unit.unit,
                                window.as_secs(),
                                s.n_restarts,
                                s.active_state,
                                s.sub_state
                            );
                            let reason = t.condition.r#type.clone();
                            conditions.extend(t.observe(
                                (n >= max_restarts).then_some((reason.as_str(), msg.as_str())),
                                SystemTime::now(),
                            ));
                        }
                        let healthy: Vec<&str> = if unit.healthy_states.is_empty() {
                            vec!["active"]
                        } else {
                            unit.healthy_states.iter().map(String::as_str).collect()
                        };
                        let msg = format!("{} is {} ({})", unit.unit, s.active_state, s.sub_state);
                        if healthy.contains(&s.active_state.as_str()) {
                            Outcome::Healthy(msg)
                        } else {
                            Outcome::Unhealthy(msg)
                        }
                    }
                },
                None => Outcome::CannotRun("no probe kind".into()),
            },
        };
        let result = match &outcome {
            Outcome::Healthy(_) => "healthy",
            Outcome::Unhealthy(_) => "unhealthy",
            Outcome::CannotRun(_) => "error",
            Outcome::Absent(_) => "absent",
        };
        agent.metrics.check_run(&check, result, t0.elapsed().as_secs_f64());
        let now = SystemTime::now();
        match outcome {
            Outcome::Absent(msg) => {
                next_absent_check = Instant::now() + ABSENT_RECHECK;
                events.extend(absent.say(
                    &source,
                    "CheckNotApplicable",
                    "Info",
                    format!("probe {}: {msg}; not probing until it is", p.name),
                ));
            }
            Outcome::CannotRun(msg) => {
                // Logged with the event, once per reason, not every period.
                if let Some(e) = failed.say(
                    &source,
                    "ProbeFailed",
                    "Warning",
                    format!("probe {} cannot run: {msg}", p.name),
                ) {
                    tracing::warn!(probe = %p.name, error = %msg, "probe cannot run");
                    events.push(e);
                }
            }
            o => {
                absent.clear();
                failed.clear();
                if !started {
                    started = true;
                    for t in health.iter_mut().chain(restarts_tracker.iter_mut()) {
                        conditions.extend(t.initial());
                    }
                }
                if let Some(t) = health.as_mut() {
                    let reason = p.unhealthy_reason();
                    let bad = match &o {
                        Outcome::Unhealthy(m) => Some(m.clone()),
                        _ => None,
                    };
                    conditions.extend(t.observe(bad.as_deref().map(|m| (reason.as_str(), m)), now));
                }
            }
        }
        events.extend(conditions.iter().map(super::transition_event));
        commit(&agent, conditions, events);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_are_counted_in_a_sliding_window() {
        let mut r = Restarts::default();
        let t0 = Instant::now();
        let w = Duration::from_secs(60);
        let s = |secs| t0 + Duration::from_secs(secs);
        assert_eq!(r.sample(0, 100, s(0), w), 0, "the first sample is the baseline");
        assert_eq!(r.sample(3, 200, s(10), w), 3, "three automatic restarts");
        assert_eq!(r.sample(3, 300, s(20), w), 4, "a start by hand counts once");
        assert_eq!(r.sample(0, 400, s(30), w), 5, "NRestarts reset: the new start counts");
        assert_eq!(r.sample(0, 400, s(75), w), 2, "the first three left the window");
        assert_eq!(r.sample(0, 400, s(85), w), 1);
        assert_eq!(r.sample(0, 400, s(100), w), 0);
        assert_eq!(healthy_reason("KubeletUnhealthy"), "KubeletIsHealthy");
        assert_eq!(healthy_reason("FrequentKubeletRestart"), "NoFrequentKubeletRestart");
    }
}
