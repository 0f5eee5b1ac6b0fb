//! The pause between two `SET NX` attempts on a key held elsewhere.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with full jitter: each pause is uniformly random in `[0, ceiling]`
/// and the ceiling doubles up to `max`. The jitter spreads the pollers of different
/// processes apart, so after a release they do not all hit Redis in the same millisecond.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    ceiling: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self {
            ceiling: initial.min(max),
            max,
        }
    }

    pub(crate) fn next_pause(&mut self) -> Duration {
        let ceiling_us = u64::try_from(self.ceiling.as_micros()).unwrap_or(u64::MAX);
        let pause = Duration::from_micros(rand::rng().random_range(0..=ceiling_us));
        self.ceiling = self.ceiling.saturating_mul(2).min(self.max);
        pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_stay_under_a_ceiling_that_doubles_up_to_the_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(2), Duration::from_millis(25));
        let ceilings = [2, 4, 8, 16, 25, 25, 25];
        for ceiling in ceilings {
            assert!(backoff.next_pause() <= Duration::from_millis(ceiling));
        }
    }

    #[test]
    fn an_initial_pause_above_the_cap_is_capped() {
        let mut backoff = Backoff::new(Duration::from_secs(5), Duration::from_millis(10));
        assert!(backoff.next_pause() <= Duration::from_millis(10));
    }
}
