//! Whether the converge thread is making progress. The thread marks each
//! step it starts with a budget (the step's own deadlines plus a margin) and
//! beats while idle; a monitor on the async runtime checks both. A stuck
//! step shows in `nodekeeper_agent_converge_stuck`, is reported once as a
//! `ConvergeStuck` event, and withholds the systemd watchdog pings, so
//! systemd restarts the agent (the step then resumes from its record).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long the idle loop may go without a beat: a reconcile pass that
/// hashes large files takes seconds, not minutes.
pub const IDLE_BUDGET: Duration = Duration::from_secs(600);

#[derive(Debug)]
struct Busy {
    what: String,
    since: Instant,
    budget: Duration,
}

/// Shared between the converge thread and its monitor.
#[derive(Debug)]
pub struct Liveness {
    busy: Mutex<Option<Busy>>,
    beat: Mutex<Instant>,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            busy: Mutex::new(None),
            beat: Mutex::new(Instant::now()),
        }
    }
}

/// A stuck converge thread: what it is doing and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stuck {
    pub what: String,
    pub for_: Duration,
    pub budget: Duration,
}

impl Liveness {
    /// The thread starts `what`, which should end within `budget`.
    pub fn begin(&self, what: impl Into<String>, budget: Duration) {
        *self.busy.lock().unwrap_or_else(|p| p.into_inner()) = Some(Busy {
            what: what.into(),
            since: Instant::now(),
            budget,
        });
        self.beat();
    }

    /// The step ended.
    pub fn end(&self) {
        *self.busy.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.beat();
    }

    /// The idle loop turned.
    pub fn beat(&self) {
        *self.beat.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// `Some` when a step runs past its budget or the idle loop stopped.
    pub fn stuck(&self) -> Option<Stuck> {
        self.stuck_at(Instant::now())
    }

    fn stuck_at(&self, now: Instant) -> Option<Stuck> {
        if let Some(b) = self.busy.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let for_ = now.saturating_duration_since(b.since);
            return (for_ > b.budget).then(|| Stuck {
                what: b.what.clone(),
                for_,
                budget: b.budget,
            });
        }
        let quiet = now.saturating_duration_since(*self.beat.lock().unwrap_or_else(|p| p.into_inner()));
        (quiet > IDLE_BUDGET).then(|| Stuck {
            what: "the reconcile loop".into(),
            for_: quiet,
            budget: IDLE_BUDGET,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_past_its_budget_is_stuck_and_one_that_ended_is_not() {
        let l = Liveness::default();
        let t0 = Instant::now();
        assert_eq!(l.stuck_at(t0), None);
        l.begin("demo: Installing", Duration::from_secs(10));
        assert_eq!(l.stuck_at(Instant::now() + Duration::from_secs(5)), None);
        let s = l.stuck_at(Instant::now() + Duration::from_secs(11)).expect("stuck");
        assert_eq!(s.what, "demo: Installing");
        assert_eq!(s.budget, Duration::from_secs(10));
        l.end();
        assert_eq!(l.stuck_at(Instant::now() + Duration::from_secs(11)), None);
        // The idle loop stopping is stuck too.
        let s = l
            .stuck_at(Instant::now() + IDLE_BUDGET + Duration::from_secs(1))
            .expect("idle stuck");
        assert_eq!(s.what, "the reconcile loop");
    }
}
