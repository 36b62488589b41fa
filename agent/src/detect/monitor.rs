//! A log monitor: one rule file's rules applied to one log stream, with
//! node-problem-detector's semantics — temporary rules give events, permanent
//! rules set conditions (declared in `conditions`, which give the defaults),
//! `skipList` drops lines, `patternGeneratedMessageSuffix` is appended — and
//! nodekeeper's additions: conditions survive restarts (the caller stores
//! and restores them), a permanent condition clears after `clearAfter`
//! without a new match, and kernel conditions reset on a new boot.

use std::collections::HashMap;
use std::time::SystemTime;

use nodekeeper_proto::time::rfc3339;
use nodekeeper_proto::v1::{Condition, Event};

use super::matcher::{Hit, Matcher, Window};
use super::rules::{LogCondition, LogMonitor};

/// What a line (or the passage of time) produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Problem {
    /// A temporary problem, or the event that accompanies a condition change.
    Event(Event),
    /// A condition changed status or reason.
    Condition(Condition),
    /// A permanent problem seen again while its condition is True (with the
    /// count and latest occurrence updated): NPD raises nothing for it.
    Repeat(Condition),
}

/// One rule file at work.
#[derive(Debug)]
pub struct Monitor {
    pub config: LogMonitor,
    matcher: Matcher,
    window: Window,
    conditions: Vec<Condition>,
    /// Last time each permanent condition's pattern matched (for clearAfter).
    last_match: HashMap<String, SystemTime>,
    /// Whether skipList applies to the lines this monitor sees (not for
    /// filelog, whose source applies it to the raw line).
    skip_here: bool,
    candidates: Vec<usize>,
    found: Vec<usize>,
    hits: Vec<Hit>,
}

fn default_condition(c: &LogCondition, source: &str, now: SystemTime) -> Condition {
    Condition {
        r#type: c.r#type.clone(),
        status: "False".into(),
        reason: c.reason.clone(),
        message: c.message.clone(),
        last_transition_time: rfc3339(now),
        last_heartbeat_time: String::new(),
        source: source.into(),
        ..Default::default()
    }
}

impl Monitor {
    /// Compiles a checked rule file.
    pub fn new(config: LogMonitor) -> Result<Monitor, String> {
        let matcher = Matcher::new(config.rules.iter().map(|r| r.pattern.as_str()))
            .map_err(|(i, e)| format!("rules[{i}].pattern: {e}"))?;
        let now = SystemTime::now();
        let conditions = config
            .conditions
            .iter()
            .map(|c| default_condition(c, &config.source, now))
            .collect();
        Ok(Monitor {
            window: Window::new(config.window()),
            skip_here: config.plugin_kind() != Some(super::rules::Plugin::Filelog),
            matcher,
            conditions,
            last_match: HashMap::new(),
            candidates: Vec::new(),
            found: Vec::new(),
            hits: Vec::new(),
            config,
        })
    }

    /// The monitor's conditions now.
    pub fn conditions(&self) -> &[Condition] {
        &self.conditions
    }

    /// Takes back conditions saved before a restart (only types this monitor
    /// declares), so a restart never reports a false "healthy".
    pub fn restore(&mut self, saved: &[Condition]) {
        for c in self.conditions.iter_mut() {
            if let Some(s) = saved.iter().find(|s| s.r#type == c.r#type && s.source == c.source) {
                *c = s.clone();
                if c.status == "True"
                    && let Some(t) = nodekeeper_proto::time::parse_rfc3339(&s.last_heartbeat_time)
                        .or_else(|| nodekeeper_proto::time::parse_rfc3339(&s.last_transition_time))
                {
                    self.last_match.insert(c.r#type.clone(), t);
                }
            }
        }
    }

    /// Feeds one line seen at `time`; problems go to `out`.
    pub fn process(&mut self, line: &[u8], time: SystemTime, out: &mut Vec<Problem>) {
        // NPD applies skipList in its filelog watcher only, to the raw line
        // (nodekeeper's file source does the same); for the kernel log and
        // the journal nodekeeper also applies it, to the message (a
        // deliberate difference, in README).
        if self.skip_here && self.config.skip_list.iter().any(|s| memfind(line, s.as_bytes())) {
            return;
        }
        self.matcher.push_and_match(
            line,
            &mut self.window,
            &mut self.candidates,
            &mut self.found,
            &mut self.hits,
        );
        if self.hits.is_empty() {
            return;
        }
        for h in std::mem::take(&mut self.hits) {
            let rule = &self.config.rules[h.rule];
            // NPD's message: the matched lines joined by "\n", as they are.
            let mut message = if h.lines <= 1 {
                String::from_utf8_lossy(line).into_owned()
            } else {
                self.window
                    .last(h.lines)
                    .map(|l| String::from_utf8_lossy(l).into_owned())
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            if !rule.pattern_generated_message_suffix.is_empty() {
                message = format!("{message}; {}", rule.pattern_generated_message_suffix);
            }
            let event = Event {
                time: rfc3339(time),
                severity: "Warning".into(),
                reason: rule.reason.clone(),
                message,
                source: self.config.source.clone(),
                count: 1,
                first_time: String::new(),
            };
            if !rule.is_permanent() {
                out.push(Problem::Event(event));
                continue;
            }
            // A permanent rule: the condition changes (with an event) only when
            // its status or reason does, as in NPD; a repeat is counted.
            self.last_match.insert(rule.condition.clone(), time);
            if let Some(c) = self.conditions.iter_mut().find(|c| c.r#type == rule.condition) {
                c.last_heartbeat_time = rfc3339(time);
                c.latest_time = rfc3339(time);
                c.latest_message = event.message.clone();
                if c.status != "True" || c.reason != rule.reason {
                    c.status = "True".into();
                    c.reason = rule.reason.clone();
                    c.message = event.message.clone();
                    c.last_transition_time = rfc3339(time);
                    c.count = 1;
                    out.push(Problem::Condition(c.clone()));
                    out.push(Problem::Event(event));
                } else {
                    c.count += 1;
                    out.push(Problem::Repeat(c.clone()));
                }
            }
        }
    }

    /// Whether a True condition will clear by `clearAfter` (so the monitor
    /// must be ticked while no line comes).
    pub fn clears_later(&self) -> bool {
        !self.last_match.is_empty() && self.config.rules.iter().any(|r| !r.clear_after.is_empty())
    }

    /// Clears permanent conditions whose rules set `clearAfter` and have not
    /// matched for that long.
    pub fn tick(&mut self, now: SystemTime, out: &mut Vec<Problem>) {
        for rule in &self.config.rules {
            let Some(after) = rule.clear_after_duration() else {
                continue;
            };
            let Some(last) = self.last_match.get(&rule.condition) else {
                continue;
            };
            if now.duration_since(*last).unwrap_or_default() < after {
                continue;
            }
            let Some(def) = self.config.conditions.iter().find(|c| c.r#type == rule.condition) else {
                continue;
            };
            if let Some(c) = self
                .conditions
                .iter_mut()
                .find(|c| c.r#type == rule.condition && c.reason == rule.reason && c.status == "True")
            {
                *c = default_condition(def, &self.config.source, now);
                c.message = format!(
                    "{} (cleared: no match for {})",
                    def.message,
                    humantime::format_duration(after)
                );
                out.push(Problem::Condition(c.clone()));
            }
        }
    }

    /// A new boot: the window is stale and every condition of this monitor
    /// returns to its default (the kernel that had the problem is gone).
    pub fn new_boot(&mut self, now: SystemTime, out: &mut Vec<Problem>) {
        self.window.clear();
        self.last_match.clear();
        for (c, def) in self.conditions.iter_mut().zip(&self.config.conditions) {
            if c.status != "False" {
                *c = default_condition(def, &self.config.source, now);
                c.message = format!("{} (reset on a new boot)", def.message);
                out.push(Problem::Condition(c.clone()));
            }
        }
    }
}

/// Whether `needle` occurs in `hay`.
fn memfind(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Duration;

    fn monitor(yaml: &str) -> Monitor {
        Monitor::new(super::super::rules::parse(Path::new("t.yaml"), yaml).expect("rules")).expect("compile")
    }

    const RULES: &str = "plugin: kmsg\nsource: kernel-monitor\nbufferSize: 3\nskipList: [' audit:']\nconditions: [{type: ReadonlyFilesystem, reason: FilesystemIsNotReadOnly, message: fine}]\nrules:\n- {type: temporary, reason: OOMKilling, pattern: 'Killed process \\d+ .*', patternGeneratedMessageSuffix: 'see dmesg'}\n- {type: permanent, condition: ReadonlyFilesystem, reason: FilesystemIsReadOnly, pattern: 'Remounting filesystem read-only', clearAfter: 1m}\n";

    #[test]
    fn temporary_rules_give_events_and_permanent_rules_set_conditions_once() {
        let mut m = monitor(RULES);
        let t = SystemTime::now();
        let mut out = Vec::new();
        m.process(b"Killed process 12 (x) total-vm:1kB", t, &mut out);
        m.process(b"type=1400 audit: Killed process 13 skipped", t, &mut out);
        assert_eq!(out.len(), 1);
        match &out[0] {
            Problem::Event(e) => {
                assert_eq!(e.reason, "OOMKilling");
                assert_eq!(e.message, "Killed process 12 (x) total-vm:1kB; see dmesg");
                assert_eq!(e.source, "kernel-monitor");
            }
            p => panic!("{p:?}"),
        }
        out.clear();
        m.process(b"EXT4-fs (sda1): Remounting filesystem read-only", t, &mut out);
        m.process(b"EXT4-fs (sda1): Remounting filesystem read-only", t, &mut out);
        let changes: Vec<_> = out.iter().filter(|p| matches!(p, Problem::Condition(_))).collect();
        assert_eq!(changes.len(), 1, "a condition changes once, not on every match");
        assert_eq!(m.conditions()[0].status, "True");
        assert_eq!(m.conditions()[0].reason, "FilesystemIsReadOnly");
    }

    #[test]
    fn a_permanent_problem_seen_again_is_counted_not_silent() {
        let mut m = monitor(RULES);
        let t = SystemTime::now();
        let mut out = Vec::new();
        m.process(b"EXT4-fs (sda1): Remounting filesystem read-only", t, &mut out);
        out.clear();
        let later = t + Duration::from_secs(5);
        m.process(b"EXT4-fs (sdb1): Remounting filesystem read-only", later, &mut out);
        // NPD raises nothing here; nodekeeper reports a repeat, not a change.
        assert_eq!(out.len(), 1);
        let Problem::Repeat(c) = &out[0] else { panic!("{out:?}") };
        assert_eq!(c.count, 2);
        assert_eq!(c.latest_message, "EXT4-fs (sdb1): Remounting filesystem read-only");
        assert_eq!(c.latest_time, rfc3339(later));
        assert_eq!(
            c.message, "EXT4-fs (sda1): Remounting filesystem read-only",
            "the message stays the transition's, as in NPD"
        );
        assert_eq!(m.conditions()[0].count, 2);
    }

    #[test]
    fn messages_are_npds_matched_lines_untrimmed_and_the_window_defaults_to_ten() {
        let m = monitor(
            "plugin: kmsg\nconditions: []\nrules:\n- {type: temporary, reason: Two, pattern: 'first\\n  second  '}\n",
        );
        assert_eq!(m.config.window(), 10, "NPD's default bufferSize");
        assert_eq!(m.config.source, "", "no source: NPD's default, empty");
        let mut m = m;
        let mut out = Vec::new();
        m.process(b"first", SystemTime::now(), &mut out);
        m.process(b"  second  ", SystemTime::now(), &mut out);
        match &out[..] {
            [Problem::Event(e)] => assert_eq!(e.message, "first\n  second  "),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn conditions_clear_after_quiet_time_and_on_a_new_boot_and_survive_restore() {
        let mut m = monitor(RULES);
        let t = SystemTime::now();
        let mut out = Vec::new();
        m.process(b"Remounting filesystem read-only", t, &mut out);
        let saved = m.conditions().to_vec();

        out.clear();
        m.tick(t + Duration::from_secs(30), &mut out);
        assert!(out.is_empty());
        m.tick(t + Duration::from_secs(61), &mut out);
        assert_eq!(m.conditions()[0].status, "False");
        assert_eq!(out.len(), 1);

        // A restarted agent restores the condition instead of reporting healthy.
        let mut again = monitor(RULES);
        again.restore(&saved);
        assert_eq!(again.conditions()[0].status, "True");
        out.clear();
        again.new_boot(t, &mut out);
        assert_eq!(again.conditions()[0].status, "False");
        assert_eq!(out.len(), 1);
    }
}
