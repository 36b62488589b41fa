//! Aggregating identical events: under a flood, the first occurrence is
//! reported at once and the rest are counted and reported as one event with
//! a count per window, instead of an event storm to the hub.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use nodekeeper_proto::time::rfc3339;
use nodekeeper_proto::v1::Event;

/// Keys kept at most; the stalest are flushed first past this.
const MAX_KEYS: usize = 1024;

struct Pending {
    event: Event,
    first: SystemTime,
    window_start: SystemTime,
    /// Occurrences not yet reported.
    unreported: u64,
}

/// The aggregator of one source.
pub struct Aggregator {
    window: Duration,
    pending: HashMap<(String, String, String), Pending>,
}

impl Aggregator {
    pub fn new(window: Duration) -> Aggregator {
        Aggregator {
            window,
            pending: HashMap::new(),
        }
    }

    /// Takes an event; returns what to report now (the first occurrence of a
    /// key in a window, with count 1).
    pub fn add(&mut self, e: Event, now: SystemTime, out: &mut Vec<Event>) {
        let key = (e.source.clone(), e.reason.clone(), e.message.clone());
        match self.pending.get_mut(&key) {
            Some(p) => {
                p.unreported += 1;
                p.event.time = e.time;
            }
            None => {
                if self.pending.len() >= MAX_KEYS {
                    self.flush(now, true, out);
                }
                let mut first = e.clone();
                first.count = 1;
                first.first_time = first.time.clone();
                out.push(first);
                self.pending.insert(
                    key,
                    Pending {
                        event: e,
                        first: now,
                        window_start: now,
                        unreported: 0,
                    },
                );
            }
        }
    }

    /// Whether counted repeats wait to be reported (a position past them
    /// must not be stored before they are).
    pub fn holds_unreported(&self) -> bool {
        self.pending.values().any(|p| p.unreported > 0)
    }

    /// Reports counted repeats whose window has passed (all with `all`),
    /// and forgets keys that stayed quiet for a whole window.
    pub fn flush(&mut self, now: SystemTime, all: bool, out: &mut Vec<Event>) {
        let window = self.window;
        self.pending.retain(|_, p| {
            let due = all || now.duration_since(p.window_start).unwrap_or_default() >= window;
            if !due {
                return true;
            }
            if p.unreported == 0 {
                return false;
            }
            let mut e = p.event.clone();
            e.count = p.unreported;
            e.first_time = rfc3339(p.first);
            out.push(e);
            p.unreported = 0;
            p.window_start = now;
            !all
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(reason: &str) -> Event {
        Event {
            reason: reason.into(),
            message: "m".into(),
            source: "s".into(),
            time: "t".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_flood_becomes_one_event_with_a_count_per_window() {
        let mut a = Aggregator::new(Duration::from_secs(10));
        let t = SystemTime::now();
        let mut out = Vec::new();
        for _ in 0..1_000_000 {
            a.add(ev("OOMKilling"), t, &mut out);
        }
        a.add(ev("Other"), t, &mut out);
        assert_eq!(out.len(), 2, "first occurrences only");
        out.clear();
        a.flush(t + Duration::from_secs(5), false, &mut out);
        assert!(out.is_empty());
        a.flush(t + Duration::from_secs(10), false, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].count, 999_999);
        assert_eq!(out[0].reason, "OOMKilling");
        out.clear();
        a.flush(t + Duration::from_secs(30), false, &mut out);
        assert!(out.is_empty(), "quiet keys are forgotten");
    }
}
