//! Capped exponential backoff with jitter, for reconnecting links and retrying transactions.

use std::time::Duration;

use rand::Rng;

/// Delays that double from `min` up to `max`, each drawn at random from its upper half
/// ("equal jitter"), so that many brokers retrying one peer do not retry in lock step.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    /// Consecutive failures so far.
    failures: u32,
}

impl Backoff {
    /// A backoff between `min` and `max` (`max` is raised to `min` if smaller).
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            failures: 0,
        }
    }

    /// Records a failure and returns how long to wait before the next attempt.
    pub fn fail(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let half = ceiling / 2;
        let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(rand::thread_rng().gen_range(0..=jitter_ms))
    }

    /// The upper bound of the next delay: `min * 2^failures`, capped at `max`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(30)).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let mut last_ceiling = Duration::ZERO;
        for _ in 0..10 {
            let ceiling = b.ceiling();
            assert!(ceiling >= last_ceiling);
            let d = b.fail();
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "{d:?} outside {ceiling:?}"
            );
            last_ceiling = ceiling;
        }
        assert_eq!(b.ceiling(), Duration::from_millis(1000));
        assert_eq!(b.failures(), 10);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }
}
