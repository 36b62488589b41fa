//! A remedy job's lifecycle as one explicit state machine: a pure
//! transition function (no I/O, unit-tested here) and the effects it asks
//! the executor to carry out. The executor persists the job after every
//! transition, before carrying out the effects, so an agent killed at any
//! point resumes the job from its record (and a reboot step is confirmed by
//! the new boot id the agent comes back with).
//!
//! The ladder: for each step, ask the defender for a permit (disruptive
//! actions), run the action, then watch the condition for `verifySeconds`;
//! cleared: Succeeded; still there (or the action failed): the next step;
//! after the last step: Failed (the executor raises `RemedyFailed`).

use serde::{Deserialize, Serialize};

/// Where a job is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "camelCase")]
pub enum Phase {
    /// Waiting for the defender's permit for `step` (asked at `since`).
    AwaitingPermit { step: usize, since: u64 },
    /// The action of `step` is running (started at `since`).
    Acting { step: usize, since: u64 },
    /// A reboot was asked for in boot `boot_id`; it is done when the agent
    /// runs in another boot.
    Rebooting { step: usize, boot_id: String, since: u64 },
    /// The action of `step` ran; the condition has until `until` to clear.
    Verifying { step: usize, until: u64 },
    /// The condition cleared after `step`.
    Succeeded { step: usize },
    /// Every step ran and the condition is still there, or a step failed.
    Failed { step: usize, reason: String },
    /// The defender refused (or the offline policy denied) and the job gave up.
    Denied { step: usize, reason: String },
    /// dryRun: what would have been done was recorded; nothing ran.
    DryRun,
}

impl Phase {
    /// Whether the job has ended.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Phase::Succeeded { .. } | Phase::Failed { .. } | Phase::Denied { .. } | Phase::DryRun
        )
    }
}

/// What a step needs from the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepShape {
    /// Needs a permit (everything that disrupts the node's workloads).
    pub disruptive: bool,
    /// A reboot: done only in a new boot.
    pub reboot: bool,
    pub verify_seconds: u64,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The clock moved (the executor ticks jobs at least every second).
    Tick,
    PermitGranted,
    /// The defender said no: for good (`final_`: the breaker is open, a
    /// manual approval was denied, the rule is gone), or for now (budget
    /// full, outside the window, the hub unreachable with the offline policy
    /// deny: the job keeps waiting).
    PermitRefused {
        reason: String,
        final_: bool,
    },
    /// The step's action finished.
    ActionDone {
        ok: bool,
        message: String,
    },
    /// The triggering condition is no longer True.
    Cleared,
    /// The agent started (again), in boot `boot_id`.
    Started {
        boot_id: String,
    },
}

/// What the executor must do after a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    RequestPermit {
        step: usize,
    },
    /// Run the step's action (for a reboot: after the intent was persisted).
    Run {
        step: usize,
    },
    ReleasePermit,
    /// The job ended: record it, raise RemedyFailed on Failed.
    Ended,
}

/// The first phase of a job.
pub fn start(steps: &[StepShape], dry_run: bool, now: u64) -> (Phase, Vec<Effect>) {
    if dry_run || steps.is_empty() {
        return (Phase::DryRun, vec![Effect::Ended]);
    }
    enter(steps, 0, now)
}

/// Enters `step`: ask for a permit, or run at once when it needs none.
fn enter(steps: &[StepShape], step: usize, now: u64) -> (Phase, Vec<Effect>) {
    if steps[step].disruptive {
        (
            Phase::AwaitingPermit { step, since: now },
            vec![Effect::RequestPermit { step }],
        )
    } else {
        (Phase::Acting { step, since: now }, vec![Effect::Run { step }])
    }
}

/// The transition function: the next phase and the effects to carry out.
pub fn next(phase: &Phase, input: &Input, steps: &[StepShape], now: u64, boot_id: &str) -> (Phase, Vec<Effect>) {
    use Input::*;
    use Phase::*;
    let unchanged = (phase.clone(), Vec::new());
    match (phase, input) {
        (p, _) if p.is_final() => unchanged,
        // The condition cleared before anything ran: nothing to do.
        (AwaitingPermit { step, .. }, Cleared) => (Succeeded { step: *step }, vec![Effect::Ended]),
        (AwaitingPermit { step, .. }, PermitGranted) => {
            if steps[*step].reboot {
                (
                    Rebooting {
                        step: *step,
                        boot_id: boot_id.to_string(),
                        since: now,
                    },
                    vec![Effect::Run { step: *step }],
                )
            } else {
                (
                    Acting {
                        step: *step,
                        since: now,
                    },
                    vec![Effect::Run { step: *step }],
                )
            }
        }
        (AwaitingPermit { step, .. }, PermitRefused { reason, final_: true }) => (
            Denied {
                step: *step,
                reason: reason.clone(),
            },
            vec![Effect::Ended],
        ),
        (Acting { step, .. }, ActionDone { ok: true, .. }) => verify(steps, *step, now),
        // An action that failed did not help either: the next step, or
        // the job fails with the action's error.
        (Acting { step, .. } | Rebooting { step, .. }, ActionDone { ok: false, message }) => {
            escalate(steps, *step, now, message.clone())
        }
        // Killed mid-action: the action is run again (every action is
        // safe to repeat: restart, kill, clean, drop caches).
        (Acting { step, .. }, Started { .. }) => (
            Acting {
                step: *step,
                since: now,
            },
            vec![Effect::Run { step: *step }],
        ),
        (AwaitingPermit { step, .. }, Started { .. }) => (
            AwaitingPermit {
                step: *step,
                since: now,
            },
            vec![Effect::RequestPermit { step: *step }],
        ),
        (
            Rebooting {
                step, boot_id: before, ..
            },
            Started { boot_id: now_boot },
        ) if now_boot != before => verify(steps, *step, now),
        // Same boot after a restart: the reboot has not happened yet.
        (Rebooting { step, .. }, Started { .. }) => (phase.clone(), vec![Effect::Run { step: *step }]),
        (Verifying { step, .. }, Cleared) => (Succeeded { step: *step }, vec![Effect::ReleasePermit, Effect::Ended]),
        (Verifying { step, until }, Tick) if now >= *until => escalate(
            steps,
            *step,
            now,
            format!(
                "the condition is still there after the last step ({} steps)",
                steps.len()
            ),
        ),
        _ => unchanged,
    }
}

/// The next step after `step` (its permit given back first), or the job
/// fails with `reason` after the last one.
fn escalate(steps: &[StepShape], step: usize, now: u64, reason: String) -> (Phase, Vec<Effect>) {
    if step + 1 < steps.len() {
        let (p, mut e) = enter(steps, step + 1, now);
        e.insert(0, Effect::ReleasePermit);
        (p, e)
    } else {
        (
            Phase::Failed { step, reason },
            vec![Effect::ReleasePermit, Effect::Ended],
        )
    }
}

fn verify(steps: &[StepShape], step: usize, now: u64) -> (Phase, Vec<Effect>) {
    (
        Phase::Verifying {
            step,
            until: now + steps[step].verify_seconds,
        },
        Vec::new(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps() -> Vec<StepShape> {
        vec![
            StepShape {
                disruptive: true,
                reboot: false,
                verify_seconds: 30,
            },
            StepShape {
                disruptive: true,
                reboot: true,
                verify_seconds: 60,
            },
        ]
    }

    #[test]
    fn a_step_that_does_not_help_escalates_and_the_last_one_fails() {
        let s = steps();
        let (p, e) = start(&s, false, 0);
        assert_eq!(e, [Effect::RequestPermit { step: 0 }]);
        let (p, e) = next(&p, &Input::PermitGranted, &s, 1, "b1");
        assert_eq!(e, [Effect::Run { step: 0 }]);
        let (p, _) = next(
            &p,
            &Input::ActionDone {
                ok: true,
                message: String::new(),
            },
            &s,
            2,
            "b1",
        );
        assert_eq!(p, Phase::Verifying { step: 0, until: 32 });
        let (p, e) = next(&p, &Input::Tick, &s, 31, "b1");
        assert!(e.is_empty(), "not before verifySeconds");
        let (p, e) = next(&p, &Input::Tick, &s, 32, "b1");
        assert_eq!(e, [Effect::ReleasePermit, Effect::RequestPermit { step: 1 }]);
        let (p, e) = next(&p, &Input::PermitGranted, &s, 33, "b1");
        assert!(matches!(p, Phase::Rebooting { step: 1, .. }));
        assert_eq!(e, [Effect::Run { step: 1 }]);
        // The agent is back in the same boot: the reboot is asked again.
        let (p, e) = next(&p, &Input::Started { boot_id: "b1".into() }, &s, 40, "b1");
        assert_eq!(e, [Effect::Run { step: 1 }]);
        let (p, e) = next(&p, &Input::Started { boot_id: "b2".into() }, &s, 100, "b2");
        assert!(e.is_empty());
        assert_eq!(p, Phase::Verifying { step: 1, until: 160 });
        let (p, e) = next(&p, &Input::Tick, &s, 160, "b2");
        assert!(matches!(p, Phase::Failed { step: 1, .. }));
        assert_eq!(e, [Effect::ReleasePermit, Effect::Ended]);
    }

    #[test]
    fn a_failed_action_escalates_and_on_the_last_step_fails_the_job() {
        let s = steps();
        let (p, _) = start(&s, false, 0);
        let (p, _) = next(&p, &Input::PermitGranted, &s, 1, "b");
        let failed = Input::ActionDone {
            ok: false,
            message: "timed out".into(),
        };
        let (p, e) = next(&p, &failed, &s, 2, "b");
        assert_eq!(p, Phase::AwaitingPermit { step: 1, since: 2 });
        assert_eq!(e, [Effect::ReleasePermit, Effect::RequestPermit { step: 1 }]);
        let (p, _) = next(&p, &Input::PermitGranted, &s, 3, "b");
        let (p, e) = next(&p, &failed, &s, 4, "b");
        assert_eq!(
            p,
            Phase::Failed {
                step: 1,
                reason: "timed out".into()
            }
        );
        assert_eq!(e, [Effect::ReleasePermit, Effect::Ended]);
    }

    #[test]
    fn a_cleared_condition_ends_the_job_and_final_phases_stay() {
        let s = steps();
        let (p, _) = start(&s, false, 0);
        let (p, _) = next(&p, &Input::PermitGranted, &s, 1, "b");
        let (p, _) = next(
            &p,
            &Input::ActionDone {
                ok: true,
                message: String::new(),
            },
            &s,
            2,
            "b",
        );
        let (p, e) = next(&p, &Input::Cleared, &s, 3, "b");
        assert_eq!(p, Phase::Succeeded { step: 0 });
        assert_eq!(e, [Effect::ReleasePermit, Effect::Ended]);
        assert_eq!(next(&p, &Input::Tick, &s, 999, "b").0, p);
        assert_eq!(start(&s, true, 0), (Phase::DryRun, vec![Effect::Ended]));
    }

    #[test]
    fn killed_mid_action_the_action_runs_again_and_a_refusal_ends_the_job() {
        let s = steps();
        let (p, _) = start(&s, false, 0);
        let (p, _) = next(&p, &Input::PermitGranted, &s, 1, "b");
        let (p, e) = next(&p, &Input::Started { boot_id: "b".into() }, &s, 5, "b");
        assert_eq!(p, Phase::Acting { step: 0, since: 5 });
        assert_eq!(e, [Effect::Run { step: 0 }]);
        let (p, _) = start(&s, false, 0);
        let refused = Input::PermitRefused {
            reason: "breaker open".into(),
            final_: true,
        };
        assert!(matches!(next(&p, &refused, &s, 1, "b").0, Phase::Denied { .. }));
        let waiting = Input::PermitRefused {
            reason: "budget".into(),
            final_: false,
        };
        assert_eq!(
            next(&p, &waiting, &s, 1, "b").0,
            p,
            "a refusal for now keeps the job waiting"
        );
    }
}
