//! The agent's one retry policy: exponential backoff with full jitter (a
//! uniformly random delay between zero and the exponential ceiling). Every
//! retry uses it — hub reconnects, downloads, log sources that fail, and
//! converge retries — so 10,000 nodes that lost the same hub or repository
//! do not come back in one wave.

use std::time::Duration;

/// Backoff state for one link.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff { base, cap, attempt: 0 }
    }

    /// The ceiling for the current attempt: `min(cap, base * 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay, drawn uniformly from `[0, ceiling]`; advances the attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ms = ceiling.as_millis() as u64;
        Duration::from_millis(if ms == 0 { 0 } else { rand::random_range(0..=ms) })
    }

    /// The longest delay this backoff ever gives (its cap).
    pub fn max_delay(&self) -> Duration {
        self.cap
    }

    /// A jittered delay for attempt `attempt` (0-based) without keeping
    /// state: for retries whose attempt count is persisted elsewhere.
    pub fn delay_for(base: Duration, cap: Duration, attempt: u32) -> Duration {
        let mut b = Backoff::new(base, cap);
        b.attempt = attempt;
        b.next_delay()
    }

    /// Sleeps the next delay on this thread (for blocking workers).
    pub fn sleep(&mut self) {
        std::thread::sleep(self.next_delay());
    }

    /// A session got through: start over.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_up_to_the_cap_and_delays_stay_below_it() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            let c = b.ceiling();
            let d = b.next_delay();
            assert!(d <= c, "{d:?} > {c:?}");
            ceilings.push(c.as_millis());
        }
        assert_eq!(&ceilings[..7], &[500, 1000, 2000, 4000, 8000, 16000, 30000]);
        assert_eq!(ceilings[9], 30000);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(500));
    }

    #[test]
    fn stateless_delays_follow_the_same_ceiling() {
        for attempt in 0..12 {
            let d = Backoff::delay_for(Duration::from_secs(1), Duration::from_secs(60), attempt);
            let ceiling = Duration::from_secs(1u64 << attempt.min(20)).min(Duration::from_secs(60));
            assert!(d <= ceiling, "{attempt}: {d:?} > {ceiling:?}");
        }
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
        let delays: std::collections::BTreeSet<u128> = (0..50).map(|_| b.next_delay().as_millis()).collect();
        assert!(delays.len() > 25, "full jitter should spread delays, got {delays:?}");
    }
}
