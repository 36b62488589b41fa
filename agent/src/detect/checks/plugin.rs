//! node-problem-detector's custom-plugin monitor: each rule's program runs
//! every `invoke_interval` (rules grouped by interval, at most
//! `concurrency` at once); exit 0 / 1 / anything else (or a timeout) means
//! OK / problem / unknown; stdout is the message. Temporary rules raise an
//! event on a problem or unknown; permanent rules move their condition with
//! NPD's exact update rules (pkg/custompluginmonitor). Unlike NPD, a message
//! longer than `max_output_length` is cut with a visible marker and counted,
//! and a program that hangs is killed with everything it started.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use nodekeeper_proto::time::rfc3339;
use nodekeeper_proto::v1::{Condition, CustomPluginMonitor, CustomPluginRule, Event};
use tokio::sync::Semaphore;

use super::run::RunResult;
use crate::runtime::Agent;

/// A plugin's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    NonOk,
    Unknown,
}

impl Status {
    fn condition_status(self) -> &'static str {
        match self {
            Status::Ok => "False",
            Status::NonOk => "True",
            Status::Unknown => "Unknown",
        }
    }
}

/// Cuts `s` to `max` bytes (at a character boundary) with a marker saying
/// how much was cut; returns whether it cut.
pub fn cut(s: &str, max: usize) -> (String, bool) {
    if s.len() <= max {
        return (s.to_string(), false);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    (
        format!(
            "{}… [cut at max_output_length {max}: {} bytes more]",
            &s[..end],
            s.len() - end
        ),
        true,
    )
}

/// What a run means in NPD's terms: the status and the message.
pub fn verdict(program: &str, r: &RunResult, max_output: usize) -> (Status, String, bool) {
    let out = r.stdout.trim();
    let mut message = if r.timed_out {
        format!("Timeout when running plugin {program:?}: killed after its timeout. output - {out:?}")
    } else if let Some(e) = &r.start_error {
        format!("Error in starting plugin {program:?}: {e}")
    } else {
        out.to_string()
    };
    if r.stdout_dropped > 0 {
        message.push_str(&format!(
            " [{} bytes of output beyond 4096 were discarded]",
            r.stdout_dropped
        ));
    }
    let (message, cut_) = cut(&message, max_output);
    let status = match (r.timed_out, r.exit_code) {
        (false, Some(0)) => Status::Ok,
        (false, Some(1)) => Status::NonOk,
        _ => Status::Unknown,
    };
    (status, message, cut_)
}

/// A monitor's conditions, moved by results as NPD moves them.
#[derive(Debug)]
pub struct State {
    pub config: CustomPluginMonitor,
    pub conditions: Vec<Condition>,
    /// Whether the conditions were sent once (NPD sends them with every
    /// status; with skip_initial_status the first goes with the first
    /// result).
    pub published: bool,
}

impl State {
    /// The declared conditions at their defaults (False), or as stored.
    pub fn new(config: CustomPluginMonitor, stored: &[Condition]) -> State {
        let now = rfc3339(SystemTime::now());
        let conditions = config
            .conditions
            .iter()
            .map(|d| {
                stored
                    .iter()
                    .find(|c| c.r#type == d.r#type && c.source == config.source)
                    .cloned()
                    .unwrap_or_else(|| Condition {
                        r#type: d.r#type.clone(),
                        status: "False".into(),
                        reason: d.reason.clone(),
                        message: d.message.clone(),
                        last_transition_time: now.clone(),
                        source: config.source.clone(),
                        ..Default::default()
                    })
            })
            .collect();
        State {
            config,
            conditions,
            published: false,
        }
    }

    /// NPD's generateStatus for one result: the conditions that changed and
    /// the events to send.
    pub fn result(
        &mut self,
        rule: &CustomPluginRule,
        status: Status,
        message: &str,
        now: SystemTime,
    ) -> (Vec<Condition>, Vec<Event>) {
        let event = |severity: &str, reason: &str, message: &str| Event {
            time: rfc3339(now),
            severity: severity.into(),
            reason: reason.into(),
            message: message.into(),
            source: self.config.source.clone(),
            count: 1,
            first_time: String::new(),
        };
        if !rule.is_permanent() {
            if status != Status::Ok {
                return (Vec::new(), vec![event("Warning", &rule.reason, message)]);
            }
            return (Vec::new(), Vec::new());
        }
        let Some(default) = self
            .config
            .conditions
            .iter()
            .find(|d| d.r#type == rule.condition)
            .cloned()
        else {
            return (Vec::new(), Vec::new());
        };
        let by_message = self.config.message_change_updates();
        let Some(c) = self.conditions.iter_mut().find(|c| c.r#type == rule.condition) else {
            return (Vec::new(), Vec::new());
        };
        let new = status.condition_status();
        let (reason, msg) = if c.status == "True" && new != "True" {
            (
                default.reason.clone(),
                if new == "False" {
                    default.message.clone()
                } else {
                    message.to_string()
                },
            )
        } else if c.status != "True" && new == "True" {
            (rule.reason.clone(), message.to_string())
        } else if c.status != new {
            (
                default.reason.clone(),
                if new == "False" {
                    default.message.clone()
                } else {
                    message.to_string()
                },
            )
        } else if c.status == "True"
            && new == "True"
            && (c.reason != rule.reason || (by_message && c.message != message))
        {
            (rule.reason.clone(), message.to_string())
        } else {
            return (Vec::new(), Vec::new());
        };
        c.last_transition_time = rfc3339(now);
        c.status = new.into();
        c.reason = reason.clone();
        c.message = msg.clone();
        c.count = u64::from(new == "True");
        let severity = if new == "True" { "Warning" } else { "Info" };
        let changed = c.clone();
        (vec![changed], vec![event(severity, &reason, &msg)])
    }
}

/// Runs one monitor until aborted.
pub async fn run(agent: Arc<Agent>, label: String, config: CustomPluginMonitor) {
    let source = config.source.clone();
    let state = Arc::new(Mutex::new(State::new(
        config.clone(),
        &super::restored(&agent, &source),
    )));
    if !config.skip_initial_status() {
        let initial: Vec<Condition> = {
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            s.published = true;
            let stored = super::restored(&agent, &source);
            s.conditions.iter().filter(|c| !stored.contains(c)).cloned().collect()
        };
        super::commit(&agent, initial, Vec::new());
    }
    for r in &config.rules {
        agent.metrics.problem_counter(&r.reason, 0);
    }
    tracing::info!(source = %source, from = %label, rules = config.rules.len(), "custom-plugin monitor started");
    let slots = Arc::new(Semaphore::new(config.concurrency()));
    // NPD runs every rule once at start, then each interval group on its
    // own ticker.
    let mut groups: Vec<(Duration, Vec<CustomPluginRule>)> = Vec::new();
    for r in &config.rules {
        let iv = config.rule_interval(r);
        match groups.iter_mut().find(|(i, _)| *i == iv) {
            Some((_, rules)) => rules.push(r.clone()),
            None => groups.push((iv, vec![r.clone()])),
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (interval, rules) in groups {
        let (agent, state, slots, config) = (agent.clone(), state.clone(), slots.clone(), config.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let mut runs = tokio::task::JoinSet::new();
                for rule in rules.iter().cloned() {
                    let (agent, state, slots, config) = (agent.clone(), state.clone(), slots.clone(), config.clone());
                    runs.spawn(async move {
                        let Ok(_slot) = slots.acquire().await else { return };
                        let mut argv = vec![rule.path.clone()];
                        argv.extend(rule.args.iter().cloned());
                        let r = super::run::run(&argv, config.rule_timeout(&rule)).await;
                        record(&agent, &state, &config, &rule, &r);
                    });
                }
                while runs.join_next().await.is_some() {}
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

fn record(agent: &Agent, state: &Mutex<State>, config: &CustomPluginMonitor, rule: &CustomPluginRule, r: &RunResult) {
    let (status, message, was_cut) = verdict(&rule.path, r, config.max_output_length());
    let check = format!("plugin/{}", config.source);
    let result = match status {
        Status::Ok => "healthy",
        Status::NonOk => "unhealthy",
        Status::Unknown => "unknown",
    };
    agent.metrics.check_run(&check, result, r.duration_ms as f64 / 1000.0);
    if was_cut {
        agent
            .metrics
            .plugin_output_truncated
            .get_or_create(&crate::metrics::SourceLabel {
                source: config.source.clone(),
            })
            .inc();
    }
    if r.leftovers_killed > 0 {
        agent
            .metrics
            .check_leftovers_killed
            .inc_by(u64::from(r.leftovers_killed));
        tracing::warn!(plugin = %rule.path, killed = r.leftovers_killed, "the plugin left processes running; killed them");
    }
    if !r.stderr.trim().is_empty() {
        tracing::debug!(plugin = %rule.path, stderr = %r.stderr.trim(), "plugin stderr");
    }
    let (conditions, events) = {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        let (mut changed, events) = s.result(rule, status, &message, SystemTime::now());
        if !std::mem::replace(&mut s.published, true) {
            changed = s.conditions.clone();
        }
        (changed, events)
    };
    super::commit(agent, conditions, events);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn monitor(message_change: bool) -> CustomPluginMonitor {
        nodekeeper_proto::checks::parse_custom_plugin(&format!(
            r#"{{"plugin": "custom", "pluginConfig": {{"enable_message_change_based_condition_update": {message_change}}},
               "source": "ntp", "conditions": [{{"type": "NTPProblem", "reason": "NTPIsUp", "message": "ntp service is up"}}],
               "rules": [{{"type": "temporary", "reason": "NTPIsDown", "path": "/x"}},
                         {{"type": "permanent", "condition": "NTPProblem", "reason": "NTPIsDown", "path": "/x"}},
                         {{"type": "permanent", "condition": "NTPProblem", "reason": "NTPIsWeird", "path": "/y"}}]}}"#
        ))
        .expect("valid")
    }

    #[test]
    fn conditions_move_as_npd_moves_them() {
        let m = monitor(false);
        let (temp, perm, other) = (m.rules[0].clone(), m.rules[1].clone(), m.rules[2].clone());
        let mut s = State::new(m, &[]);
        let now = SystemTime::now();
        assert_eq!(s.conditions[0].status, "False");
        // Temporary: an event on NonOK and on Unknown, none on OK.
        assert_eq!(s.result(&temp, Status::NonOk, "down", now).1.len(), 1);
        assert_eq!(s.result(&temp, Status::Unknown, "?", now).1.len(), 1);
        assert!(s.result(&temp, Status::Ok, "", now).1.is_empty());
        // Permanent: False -> True with the rule's reason and the output.
        let (c, e) = s.result(&perm, Status::NonOk, "ntp is down", now);
        assert_eq!(
            (c[0].status.as_str(), c[0].reason.as_str(), c[0].message.as_str()),
            ("True", "NTPIsDown", "ntp is down")
        );
        assert_eq!(e[0].severity, "Warning");
        // Same status and reason, new message: nothing without the switch.
        assert!(s.result(&perm, Status::NonOk, "still down", now).0.is_empty());
        // Another rule of the condition with another reason: updated.
        let (c, _) = s.result(&other, Status::NonOk, "weird", now);
        assert_eq!(c[0].reason, "NTPIsWeird");
        // True -> Unknown: the default reason with the output.
        let (c, _) = s.result(&perm, Status::Unknown, "timed out", now);
        assert_eq!(
            (c[0].status.as_str(), c[0].reason.as_str(), c[0].message.as_str()),
            ("Unknown", "NTPIsUp", "timed out")
        );
        // Unknown -> False: the default reason and message.
        let (c, e) = s.result(&perm, Status::Ok, "fine", now);
        assert_eq!(
            (c[0].status.as_str(), c[0].message.as_str()),
            ("False", "ntp service is up")
        );
        assert_eq!(e[0].severity, "Info");
        assert!(
            s.result(&perm, Status::Ok, "fine", now).0.is_empty(),
            "no change, no update"
        );

        let m = monitor(true);
        let perm = m.rules[1].clone();
        let mut s = State::new(m, &[]);
        s.result(&perm, Status::NonOk, "a", now);
        assert_eq!(
            s.result(&perm, Status::NonOk, "b", now).0[0].message,
            "b",
            "message-change updates on"
        );
    }

    #[test]
    fn exit_codes_timeouts_and_long_outputs() {
        let r = |code: Option<i32>, out: &str, timed_out: bool| RunResult {
            exit_code: code,
            stdout: out.into(),
            timed_out,
            ..Default::default()
        };
        assert_eq!(verdict("/p", &r(Some(0), " ok \n", false), 80).0, Status::Ok);
        assert_eq!(
            verdict("/p", &r(Some(0), " ok \n", false), 80).1,
            "ok",
            "trimmed as NPD does"
        );
        assert_eq!(verdict("/p", &r(Some(1), "bad", false), 80).0, Status::NonOk);
        assert_eq!(verdict("/p", &r(Some(2), "?", false), 80).0, Status::Unknown);
        assert_eq!(
            verdict("/p", &r(Some(0), "", true), 80).0,
            Status::Unknown,
            "a timeout is unknown"
        );
        assert!(
            verdict("/p", &r(None, "", true), 200)
                .1
                .starts_with("Timeout when running plugin \"/p\"")
        );
        let long = "x".repeat(100);
        let (_, m, was_cut) = verdict("/p", &r(Some(1), &long, false), 80);
        assert!(was_cut);
        assert!(
            m.starts_with(&"x".repeat(80)) && m.contains("[cut at max_output_length 80: 20 bytes more]"),
            "{m}"
        );
        let (m, _) = cut("ééé", 3);
        assert!(
            m.starts_with('é') && !m.starts_with("éé"),
            "cut at a character boundary: {m}"
        );
    }
}
