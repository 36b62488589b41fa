//! Remedies: a condition held long enough starts a job that climbs its
//! RemedyRule's ladder of actions, each verified before the next, under the
//! defender's permits. [`job`] is the job's lifecycle as a pure state
//! machine; this module is its thin executor: it watches the conditions,
//! persists every job after each transition (before carrying out the
//! effects), asks for permits, runs the actions ([`action`]) off the async
//! threads, and reports each job to the hub and the socket.

pub mod action;
pub mod job;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use nodekeeper_proto::remedy as rules;
use nodekeeper_proto::time::{parse_rfc3339, rfc3339};
use nodekeeper_proto::v1::{Condition, Event, RemedyJob, RemedyRule, RemedyRuleSpec, RemedyStepRecord, report};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::link::permit::{Ask, NoPermit, Permit};
use crate::runtime::Agent;
use job::{Effect, Input, Phase, StepShape};

/// Store key of the remedy state (JSON).
pub const STORE_KEY: &str = "remedies";
/// Ended jobs kept for `/v1/remedies` and the per-node limits.
const KEEP_ENDED: usize = 100;
/// How long a job waits before asking again after a refusal for now.
const RETRY: Duration = Duration::from_secs(5);
/// Condition type raised when a job gives up.
pub const REMEDY_FAILED: &str = "RemedyFailed";

/// A job as stored: the report form, the machine's phase, and the rule's
/// spec as it was when the job started (a rule changed mid-job does not
/// change the ladder under it).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rec {
    job: RemedyJob,
    phase: Phase,
    spec: RemedyRuleSpec,
    start_ms: u64,
    #[serde(default)]
    end_ms: u64,
    /// Unix seconds before which a refused permit is not asked for again.
    #[serde(default)]
    retry_at: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Saved {
    jobs: Vec<Rec>,
    /// When this node last asked for a reboot (Unix ms), for rebootWindow.
    last_reboot_ms: u64,
}

/// How the executor carries out a step.
#[derive(Debug, Clone)]
pub enum Actions {
    /// On this node: systemd, /proc, the reboot command.
    Real(action::Env),
    /// Hollow agents (scale drills): a step takes `took`, touches nothing,
    /// and then heals the job's condition, as a step that helped would —
    /// unless the condition's type is in `unhealed` (a fault that is not the
    /// node's own, which no local step clears). Everything else — the job
    /// machine, permits, reports — is the real code.
    Simulated { took: Duration, unhealed: Unhealed },
}

/// Condition types of faults no simulated step heals (shared by a hollow fleet).
pub type Unhealed = Arc<Mutex<HashSet<String>>>;

impl Default for Actions {
    fn default() -> Self {
        Actions::Real(action::Env::default())
    }
}

/// Configuration of the executor.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Rules of the agent's own configuration (standalone healing).
    pub local_rules: Vec<RemedyRule>,
    pub actions: Actions,
    /// The boot id (from /proc unless a test gives another).
    pub boot_id: String,
}

/// What finished in the background.
enum Msg {
    Permit(String, Result<Permit, NoPermit>),
    /// A permit asked for again after a restart, for a job already past
    /// its permit step.
    Regained(String, Result<Permit, NoPermit>),
    Done(String, Result<String, String>),
}

/// The jobs, shared with the status socket.
#[derive(Default)]
pub struct Jobs(Mutex<Vec<RemedyJob>>);

impl Jobs {
    /// Every job the agent keeps, newest first.
    pub fn list(&self) -> Vec<RemedyJob> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn at(ms: u64) -> String {
    rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
}

fn shapes(spec: &RemedyRuleSpec) -> Vec<StepShape> {
    spec.steps
        .iter()
        .map(|s| StepShape {
            disruptive: rules::disruptive(&s.action),
            reboot: s.action == "reboot",
            verify_seconds: u64::from(s.verify_seconds),
        })
        .collect()
}

/// The phase's name in reports.
pub fn phase_name(p: &Phase) -> &'static str {
    match p {
        Phase::AwaitingPermit { .. } => "AwaitingPermit",
        Phase::Acting { .. } => "Acting",
        Phase::Rebooting { .. } => "Rebooting",
        Phase::Verifying { .. } => "Verifying",
        Phase::Succeeded { .. } => "Succeeded",
        Phase::Failed { .. } => "Failed",
        Phase::Denied { .. } => "Denied",
        Phase::DryRun => "DryRun",
    }
}

fn step_of(p: &Phase) -> usize {
    match p {
        Phase::AwaitingPermit { step, .. }
        | Phase::Acting { step, .. }
        | Phase::Rebooting { step, .. }
        | Phase::Verifying { step, .. }
        | Phase::Succeeded { step }
        | Phase::Failed { step, .. }
        | Phase::Denied { step, .. } => *step,
        Phase::DryRun => 0,
    }
}

/// A simulated step that helped: the job's condition leaves the status
/// that triggered it.
fn heal(agent: &Agent, condition: &str, trigger_status: &str) {
    let healed: Vec<Condition> = agent
        .conditions()
        .into_iter()
        .filter(|c| c.r#type == condition && c.status == trigger_status)
        .map(|c| Condition {
            status: if trigger_status == "True" { "False" } else { "True" }.into(),
            reason: "SimulatedRemedy".into(),
            message: "healed by a simulated remedy step".into(),
            last_transition_time: nodekeeper_proto::time::now_rfc3339(),
            ..c
        })
        .collect();
    if let Err(e) = agent.record_findings(healed, Vec::new(), None) {
        tracing::warn!(node = %agent.name, error = %e, "cannot record the simulated heal");
    }
}

/// The executor.
pub struct Engine {
    agent: Arc<Agent>,
    cfg: Config,
    saved: Saved,
    held: HashMap<String, Permit>,
    asking: HashSet<String>,
    tx: mpsc::UnboundedSender<Msg>,
    rx: mpsc::UnboundedReceiver<Msg>,
    jobs: Arc<Jobs>,
    next_id: u64,
}

impl Engine {
    /// Loads the stored jobs; [`Engine::run`] resumes them.
    pub fn new(agent: Arc<Agent>, cfg: Config, jobs: Arc<Jobs>) -> Engine {
        let saved = agent
            .store
            .as_ref()
            .and_then(|s| match s.get(STORE_KEY) {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the stored remedy jobs; starting without them");
                    None
                }
            })
            .and_then(|b| match serde_json::from_slice::<Saved>(&b) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!(error = %e, "the stored remedy jobs do not parse; starting without them");
                    None
                }
            })
            .unwrap_or_default();
        let (tx, rx) = mpsc::unbounded_channel();
        Engine {
            agent,
            cfg,
            saved,
            held: HashMap::new(),
            asking: HashSet::new(),
            tx,
            rx,
            jobs,
            next_id: 0,
        }
    }

    /// Runs until `stop` turns true.
    pub async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) {
        // Resume: every job that had not ended hears that the agent started.
        let ids: Vec<String> = self
            .saved
            .jobs
            .iter()
            .filter(|r| !r.phase.is_final())
            .map(|r| r.job.id.clone())
            .collect();
        for id in ids {
            tracing::info!(job = %id, "resuming a remedy job");
            let boot = self.cfg.boot_id.clone();
            self.input(&id, Input::Started { boot_id: boot });
            self.regain(&id);
        }
        self.publish();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.tick(),
                Some(m) = self.rx.recv() => self.message(m),
                _ = stop.wait_for(|s| *s) => break,
            }
        }
    }

    fn rules(&self) -> Vec<RemedyRule> {
        let mut out = self.cfg.local_rules.clone();
        let from_hub = self.agent.remedy_rules();
        for r in from_hub {
            let name = r.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default();
            out.retain(|x| x.metadata.as_ref().is_none_or(|m| m.name != name));
            out.push(r);
        }
        out
    }

    fn rec(&mut self, id: &str) -> Option<&mut Rec> {
        self.saved.jobs.iter_mut().find(|r| r.job.id == id)
    }

    fn tick(&mut self) {
        let now = now_ms();
        let conds = self.agent.conditions();
        // Active jobs: cleared, or the clock moved.
        let active: Vec<(String, bool)> = self
            .saved
            .jobs
            .iter()
            .filter(|r| !r.phase.is_final())
            .map(|r| {
                let held = r
                    .spec
                    .conditions
                    .iter()
                    .filter(|t| t.r#type == r.job.condition)
                    .any(|t| rules::raised(t, &conds).is_some());
                (r.job.id.clone(), held)
            })
            .collect();
        for (id, held) in &active {
            self.input(id, if *held { Input::Tick } else { Input::Cleared });
            let retry = self
                .rec(id)
                .is_some_and(|r| matches!(r.phase, Phase::AwaitingPermit { .. }) && r.retry_at <= now / 1000);
            if retry
                && !self.asking.contains(id)
                && let Some(step) = self.rec(id).map(|r| step_of(&r.phase))
            {
                self.ask(id, step);
            }
        }
        // New jobs.
        for rule in self.rules() {
            let name = rule.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default();
            let Some(spec) = rule.spec.clone() else { continue };
            if !nodekeeper_proto::selector::selects(spec.node_selector.as_ref(), &self.agent.labels) {
                continue;
            }
            if self
                .saved
                .jobs
                .iter()
                .any(|r| r.job.rule == name && !r.phase.is_final())
            {
                continue;
            }
            let hit = spec.conditions.iter().find_map(|t| {
                let c = rules::raised(t, &conds)?;
                let since = parse_rfc3339(&c.last_transition_time).unwrap_or(SystemTime::UNIX_EPOCH);
                let held = SystemTime::now().duration_since(since).unwrap_or_default();
                (held >= Duration::from_secs(u64::from(t.for_seconds))).then(|| (c.clone(), since))
            });
            let Some((cond, since)) = hit else { continue };
            if let Some(why) = self.held_back(&name, &spec, &cond, now) {
                tracing::debug!(rule = %name, why, "remedy not started");
                continue;
            }
            self.start(&name, spec, &cond, since, now);
        }
        self.retire_failed(&conds);
    }

    /// The node's own limits: why a job of `rule` may not start now.
    fn held_back(&self, rule: &str, spec: &RemedyRuleSpec, cond: &Condition, now: u64) -> Option<String> {
        let of_rule: Vec<&Rec> = self.saved.jobs.iter().filter(|r| r.job.rule == rule).collect();
        // One job per episode of the condition; only a refused one is tried
        // again (after the cooldown), so a ladder that did not help is not
        // climbed forever.
        if let Some(last) = of_rule.iter().max_by_key(|r| r.start_ms)
            && last.job.condition_time == cond.last_transition_time
            && last.job.condition == cond.r#type
            && !matches!(last.phase, Phase::Denied { .. })
        {
            return Some("this episode of the condition already had its job".into());
        }
        if let Some(end) = of_rule.iter().map(|r| r.end_ms).max()
            && now < end + u64::from(spec.cooldown_seconds.max(1)) * 1000
        {
            return Some(format!("cooldownSeconds {} since the last job", spec.cooldown_seconds));
        }
        let in_hour = of_rule.iter().filter(|r| r.start_ms + 3_600_000 > now).count() as u32;
        if spec.max_jobs_per_hour > 0 && in_hour >= spec.max_jobs_per_hour {
            return Some(format!("maxJobsPerHour {} reached", spec.max_jobs_per_hour));
        }
        None
    }

    fn start(&mut self, rule: &str, spec: RemedyRuleSpec, cond: &Condition, since: SystemTime, now: u64) {
        self.next_id += 1;
        let id = format!(
            "{}-{rule}-{now}{}",
            self.agent.name,
            if self.next_id > 1 {
                format!("-{}", self.next_id)
            } else {
                String::new()
            }
        );
        let steps = shapes(&spec);
        let (phase, effects) = job::start(&steps, spec.dry_run, now / 1000);
        let mut job = RemedyJob {
            id: id.clone(),
            node: self.agent.name.clone(),
            rule: rule.to_string(),
            condition: cond.r#type.clone(),
            condition_time: rfc3339(since),
            start_time: at(now),
            dry_run: spec.dry_run,
            ..Default::default()
        };
        if spec.dry_run {
            let plan: Vec<String> = spec
                .steps
                .iter()
                .map(|s| {
                    let p: Vec<String> = s.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    format!("{}({})", s.action, p.join(", "))
                })
                .collect();
            job.reason = format!("dry run: would run {}", plan.join(" then "));
        }
        tracing::info!(job = %id, rule, condition = %cond.r#type, "remedy job started");
        let _ = self.agent.record_event(Event {
            severity: "Warning".into(),
            reason: "RemedyStarted".into(),
            message: format!("RemedyRule {rule}: {} is {} ; job {id}", cond.r#type, cond.status),
            source: "remedy".into(),
            ..Default::default()
        });
        self.saved.jobs.push(Rec {
            job,
            phase: Phase::DryRun,
            spec,
            start_ms: now,
            end_ms: 0,
            retry_at: 0,
        });
        self.transition(&id, phase, effects);
    }

    /// Feeds `input` to job `id`'s machine.
    fn input(&mut self, id: &str, input: Input) {
        let boot = self.cfg.boot_id.clone();
        let Some(r) = self.rec(id) else { return };
        let steps = shapes(&r.spec);
        let (phase, effects) = job::next(&r.phase, &input, &steps, now_ms() / 1000, &boot);
        if phase == r.phase && effects.is_empty() {
            return;
        }
        self.transition(id, phase, effects);
    }

    /// Records the new phase (stored and reported first), then carries out
    /// the effects.
    fn transition(&mut self, id: &str, phase: Phase, effects: Vec<Effect>) {
        let now = now_ms();
        let Some(r) = self.rec(id) else { return };
        let before = r.phase.clone();
        let step = step_of(&phase);
        r.job.phase = phase_name(&phase).to_string();
        r.job.step = step as u32;
        r.job.action = r.spec.steps.get(step).map(|s| s.action.clone()).unwrap_or_default();
        r.job.update_time = at(now);
        // The step records.
        let entered_action = matches!(phase, Phase::Acting { .. } | Phase::Rebooting { .. })
            && !matches!(before, Phase::Acting { step: s, .. } | Phase::Rebooting { step: s, .. } if s == step);
        if entered_action
            && !r
                .job
                .steps
                .iter()
                .any(|s| s.step as usize == step && s.end_time.is_empty())
        {
            r.job.steps.push(RemedyStepRecord {
                step: step as u32,
                action: r.job.action.clone(),
                start_time: at(now),
                permit_id: r.job.permit_id.clone(),
                ..Default::default()
            });
        }
        let left_verify = matches!(before, Phase::Verifying { step: s, .. } if s != step || !matches!(phase, Phase::Verifying { .. }));
        if left_verify && let Some(s) = r.job.steps.last_mut() {
            let cleared = matches!(phase, Phase::Succeeded { .. });
            s.result = if cleared { "ok" } else { "notHelped" }.into();
            if s.end_time.is_empty() {
                s.end_time = at(now);
            }
        }
        match &phase {
            Phase::Failed { reason, .. } | Phase::Denied { reason, .. } => r.job.reason = reason.clone(),
            Phase::Succeeded { .. } => r.job.reason = "the condition cleared".into(),
            _ => {}
        }
        if phase.is_final() {
            r.end_ms = now;
            r.job.end_time = at(now);
        }
        r.phase = phase;
        self.save();
        let job = self.rec(id).map(|r| r.job.clone());
        if let Some(j) = job
            && let Err(e) = self.agent.report(report::Body::Remedy(j))
        {
            tracing::error!(job = id, error = %e, "cannot queue the remedy job's report");
        }
        for e in effects {
            match e {
                Effect::RequestPermit { step } => self.ask(id, step),
                Effect::Run { step } => self.run_step(id, step),
                Effect::ReleasePermit => {
                    if let Some(p) = self.held.remove(id) {
                        tokio::spawn(p.release());
                    }
                }
                Effect::Ended => self.ended(id),
            }
        }
        self.publish();
    }

    fn ask(&mut self, id: &str, step: usize) {
        let Some(r) = self.rec(id) else { return };
        let Some(s) = r.spec.steps.get(step).cloned() else {
            return;
        };
        let reason = format!(
            "remedy job {id}: step {} {} for {}",
            step + 1,
            s.action,
            r.job.condition
        );
        let offline = rules::offline_allows(&r.spec, &s.action);
        let rule = r.job.rule.clone();
        self.asking.insert(id.to_string());
        self.spawn_ask(id, &rule, reason, false, offline, Msg::Permit);
    }

    /// Asks for the job's permit in the background; the answer comes back
    /// as `msg`.
    fn spawn_ask(
        &self,
        id: &str,
        rule: &str,
        reason: String,
        must_finish: bool,
        offline: Option<bool>,
        msg: fn(String, Result<Permit, NoPermit>) -> Msg,
    ) {
        let action = rules::permit_action(rule);
        let permits = self.agent.permits.clone();
        let tx = self.tx.clone();
        let job = id.to_string();
        tokio::spawn(async move {
            let res = permits
                .ask(Ask {
                    action: &action,
                    reason: &reason,
                    job: &job,
                    must_finish,
                    offline,
                })
                .await;
            let _ = tx.send(msg(job, res));
        });
    }

    /// After a restart: a job past its permit step asks for it again (the
    /// hub hands back the one the node holds, renewed).
    fn regain(&mut self, id: &str) {
        let Some(r) = self.rec(id) else { return };
        let step = step_of(&r.phase);
        let past = matches!(
            r.phase,
            Phase::Acting { .. } | Phase::Rebooting { .. } | Phase::Verifying { .. }
        );
        if !past || !r.spec.steps.get(step).is_some_and(|s| rules::disruptive(&s.action)) {
            return;
        }
        let rule = r.job.rule.clone();
        let reason = format!("remedy job {id}: resumed after a restart");
        self.spawn_ask(id, &rule, reason, true, None, Msg::Regained);
    }

    fn run_step(&mut self, id: &str, step: usize) {
        let now = now_ms();
        let window = self.rec(id).map(|r| rules::reboot_window(&r.spec)).unwrap_or_default();
        let last_reboot = self.saved.last_reboot_ms;
        let tx = self.tx.clone();
        let actions = self.cfg.actions.clone();
        let agent = self.agent.clone();
        let Some(r) = self.rec(id) else { return };
        let Some(s) = r.spec.steps.get(step).cloned() else {
            return;
        };
        let job = id.to_string();
        let env = match actions {
            Actions::Real(env) => env,
            Actions::Simulated { took, unhealed } => {
                let condition = r.job.condition.clone();
                let status = r
                    .spec
                    .conditions
                    .iter()
                    .find(|t| t.r#type == condition)
                    .map(|t| rules::trigger_status(t).to_string())
                    .unwrap_or_default();
                tokio::spawn(async move {
                    tokio::time::sleep(took).await;
                    if !unhealed.lock().unwrap_or_else(|p| p.into_inner()).contains(&condition) {
                        heal(&agent, &condition, &status);
                    }
                    let _ = tx.send(Msg::Done(job, Ok(format!("simulated {} (hollow agent)", s.action))));
                });
                return;
            }
        };
        if s.action == "reboot" {
            // Asked in this job before (the same boot after a restart): ask again.
            let ours = r.job.steps.iter().filter(|x| x.action == "reboot").count() > 1
                || matches!(r.phase, Phase::Rebooting { since, .. } if since * 1000 <= last_reboot);
            if !ours && last_reboot > 0 && now < last_reboot + window.as_millis() as u64 {
                let msg = format!(
                    "this node asked for a reboot at {}; rebootWindow allows one per {} s",
                    at(last_reboot),
                    window.as_secs()
                );
                let _ = tx.send(Msg::Done(job, Err(msg)));
                return;
            }
            self.saved.last_reboot_ms = now;
            self.save();
        }
        tokio::spawn(async move {
            let res = action::run(env, s).await;
            let _ = tx.send(Msg::Done(job, res));
        });
    }

    fn message(&mut self, m: Msg) {
        match m {
            Msg::Permit(id, res) => {
                self.asking.remove(&id);
                match res {
                    Ok(p) => {
                        if self
                            .rec(&id)
                            .is_none_or(|r| !matches!(r.phase, Phase::AwaitingPermit { .. }))
                        {
                            // The job moved on (cleared) meanwhile: give it back.
                            tokio::spawn(p.release());
                            return;
                        }
                        if let Some(r) = self.rec(&id) {
                            r.job.permit_id = p.id.clone();
                            r.job.reason.clear();
                        }
                        self.held.insert(id.clone(), p);
                        self.input(&id, Input::PermitGranted);
                    }
                    Err(why) => {
                        let terminal = why.terminal();
                        let reason = why.to_string();
                        let changed = self.rec(&id).is_some_and(|r| r.job.reason != reason);
                        if let Some(r) = self.rec(&id) {
                            r.retry_at = now_ms() / 1000 + RETRY.as_secs();
                            r.job.reason = reason.clone();
                        }
                        if terminal {
                            self.input(&id, Input::PermitRefused { reason, final_: true });
                        } else if changed {
                            tracing::info!(job = %id, %reason, "remedy waits for a permit");
                            self.save();
                            if let Some(j) = self.rec(&id).map(|r| r.job.clone()) {
                                let _ = self.agent.report(report::Body::Remedy(j));
                            }
                            self.publish();
                        }
                    }
                }
            }
            Msg::Regained(id, res) => match res {
                Ok(p) if self.rec(&id).is_some_and(|r| !r.phase.is_final()) => {
                    self.held.insert(id, p);
                }
                Ok(p) => {
                    tokio::spawn(p.release());
                }
                Err(e) => tracing::warn!(job = %id, error = %e, "cannot get the resumed job's permit back; it goes on"),
            },
            Msg::Done(id, res) => {
                let ok = res.is_ok();
                let message = match res {
                    Ok(m) | Err(m) => m,
                };
                let action = self.rec(&id).map(|r| r.job.action.clone()).unwrap_or_default();
                self.agent
                    .metrics
                    .remedy_step(&action, if ok { "ok" } else { "failed" });
                if let Some(r) = self.rec(&id)
                    && let Some(s) = r.job.steps.last_mut()
                {
                    s.message = message.clone();
                    if !ok {
                        s.result = "failed".into();
                        s.end_time = at(now_ms());
                    }
                }
                tracing::info!(job = %id, action, ok, %message, "remedy step done");
                let _ = self.agent.record_event(Event {
                    severity: if ok { "Info" } else { "Warning" }.into(),
                    reason: "RemedyStep".into(),
                    message: format!("job {id}: {action}: {message}"),
                    source: "remedy".into(),
                    ..Default::default()
                });
                self.input(&id, Input::ActionDone { ok, message });
            }
        }
    }

    fn ended(&mut self, id: &str) {
        let Some(r) = self.rec(id).cloned() else { return };
        let result = r.job.phase.clone();
        self.agent.metrics.remedy_job(&r.job.rule, &result);
        if result == "Succeeded"
            && let (Some(from), Some(to)) = (parse_rfc3339(&r.job.condition_time), parse_rfc3339(&r.job.end_time))
            && let Ok(d) = to.duration_since(from)
        {
            self.agent.metrics.remedy_time_to_heal.0.observe(d.as_secs_f64());
        }
        let (severity, reason) = match result.as_str() {
            "Succeeded" => ("Info", "RemedySucceeded"),
            "Failed" => ("Error", "RemedyFailed"),
            "Denied" => ("Warning", "RemedyDenied"),
            _ => ("Info", "RemedyDryRun"),
        };
        tracing::info!(job = id, rule = %r.job.rule, result, reason = %r.job.reason, "remedy job ended");
        let _ = self.agent.record_event(Event {
            severity: severity.into(),
            reason: reason.into(),
            message: format!("RemedyRule {} job {id}: {}", r.job.rule, r.job.reason),
            source: "remedy".into(),
            ..Default::default()
        });
        if result == "Failed" {
            let c = Condition {
                r#type: REMEDY_FAILED.into(),
                status: "True".into(),
                reason: r.job.rule.clone(),
                message: format!(
                    "RemedyRule {}: {} is still {} after {} step(s): {}",
                    r.job.rule,
                    r.job.condition,
                    rules::trigger_status(
                        r.spec
                            .conditions
                            .iter()
                            .find(|t| t.r#type == r.job.condition)
                            .unwrap_or(&Default::default())
                    ),
                    r.job.step + 1,
                    r.job.reason
                ),
                last_transition_time: r.job.end_time.clone(),
                source: "remedy".into(),
                count: 1,
                ..Default::default()
            };
            if let Err(e) = self.agent.record_findings(vec![c], Vec::new(), None) {
                tracing::error!(error = %e, "cannot record RemedyFailed");
            }
        }
        // Keep the newest ended jobs.
        let mut ended: Vec<(u64, String)> = self
            .saved
            .jobs
            .iter()
            .filter(|r| r.phase.is_final())
            .map(|r| (r.end_ms, r.job.id.clone()))
            .collect();
        if ended.len() > KEEP_ENDED {
            ended.sort();
            let drop: HashSet<String> = ended[..ended.len() - KEEP_ENDED]
                .iter()
                .map(|(_, i)| i.clone())
                .collect();
            self.saved.jobs.retain(|r| !drop.contains(&r.job.id));
            self.save();
        }
    }

    /// RemedyFailed turns False once no failed job's condition is still there.
    fn retire_failed(&mut self, conds: &[Condition]) {
        let Some(c) = conds.iter().find(|c| c.r#type == REMEDY_FAILED && c.status == "True") else {
            return;
        };
        let still = self.saved.jobs.iter().any(|r| {
            matches!(r.phase, Phase::Failed { .. })
                && r.spec
                    .conditions
                    .iter()
                    .filter(|t| t.r#type == r.job.condition)
                    .any(|t| rules::raised(t, conds).is_some_and(|x| x.last_transition_time == r.job.condition_time))
        });
        if still {
            return;
        }
        let c = Condition {
            status: "False".into(),
            message: "the conditions the failed remedies were about cleared".into(),
            last_transition_time: nodekeeper_proto::time::now_rfc3339(),
            count: 0,
            ..c.clone()
        };
        if let Err(e) = self.agent.record_findings(vec![c], Vec::new(), None) {
            tracing::error!(error = %e, "cannot clear RemedyFailed");
        }
    }

    fn save(&self) {
        if let Some(store) = &self.agent.store {
            let body = serde_json::to_vec(&self.saved).unwrap_or_default();
            if let Err(e) = store.put_all(&[(STORE_KEY, body)]) {
                tracing::error!(error = %e, "cannot store the remedy jobs");
            }
        }
    }

    fn publish(&self) {
        let mut list: Vec<RemedyJob> = self.saved.jobs.iter().map(|r| r.job.clone()).collect();
        list.sort_by(|a, b| b.start_time.cmp(&a.start_time));
        *self.jobs.0.lock().unwrap_or_else(|p| p.into_inner()) = list;
    }
}
