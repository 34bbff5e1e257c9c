//! The circuit breaker: stops pushing to an upstream that looks down, and
//! lets one probe through at a time until it answers again.
//!
//! - **Closed.** Every push may go. `threshold` consecutive retryable
//!   failures (across items) open the circuit for `cooldown`.
//! - **Open.** Nothing is pushed until the cool-down ends.
//! - **Half-open.** The cool-down is over: the next cycle pushes one item
//!   (a probe). Success closes the circuit. A failed probe opens it again
//!   for twice the last cool-down, up to `max_cooldown`, so an hour-long
//!   outage costs the upstream a handful of probes.
//!
//! Only a probe's failure extends an open circuit. Pushes that were already
//! in flight when the circuit opened report their failures afterwards;
//! counting them as failed probes doubled the cool-down once per item, so
//! a batch of 20 failures pushed a 2 s cool-down to the 5-minute cap and
//! the daemon sent nothing for minutes after the upstream came back.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::backoff::add_saturating;

/// The circuit breaker's state, as reported to the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    /// Delivering normally.
    #[default]
    Closed,
    /// Not delivering until the cool-down ends.
    Open,
    /// Cool-down over: the next cycle sends one probe.
    HalfOpen,
}

/// What a recorded outcome did to the circuit, for logs and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitTransition {
    /// The circuit opened after this many consecutive failures.
    Opened {
        /// Consecutive failures that opened it.
        failures: u32,
        /// How long it stays open.
        cooldown: Duration,
    },
    /// A probe failed: open again for a longer cool-down.
    Reopened {
        /// The doubled cool-down, capped by `max_cooldown`.
        cooldown: Duration,
    },
    /// A success closed an open or half-open circuit.
    Closed,
}

/// The breaker's settings (see [`crate::delivery::types::CircuitConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitPolicy {
    /// Consecutive failures that open the circuit; 0 disables it.
    pub threshold: u32,
    /// The cool-down after the circuit first opens; each failed probe doubles it.
    pub cooldown: Duration,
    /// The longest cool-down a run of failed probes reaches.
    pub max_cooldown: Duration,
}

/// A circuit breaker's state. Plain data: the caller supplies the time.
#[derive(Debug, Clone, Default)]
pub struct CircuitBreaker {
    consecutive_failures: u32,
    open_until: Option<DateTime<Utc>>,
    cooldown: Option<Duration>,
}

impl CircuitBreaker {
    /// The state at `now`.
    pub fn state(&self, now: DateTime<Utc>) -> CircuitState {
        match self.open_until {
            None => CircuitState::Closed,
            Some(until) if now < until => CircuitState::Open,
            Some(_) => CircuitState::HalfOpen,
        }
    }

    /// When the open circuit lets its next probe through.
    pub fn probe_at(&self) -> Option<DateTime<Utc>> {
        self.open_until
    }

    /// Consecutive retryable failures counted so far.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Records a push that the upstream answered (delivered, or refused
    /// for good: either way it is up).
    pub fn record_success(&mut self) -> Option<CircuitTransition> {
        self.consecutive_failures = 0;
        self.cooldown = None;
        self.open_until.take().map(|_| CircuitTransition::Closed)
    }

    /// Records a retryable failure at `now`. `probe` says whether the push
    /// was the probe of a half-open circuit.
    pub fn record_failure(
        &mut self,
        policy: &CircuitPolicy,
        probe: bool,
        now: DateTime<Utc>,
    ) -> Option<CircuitTransition> {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        if policy.threshold == 0 {
            return None;
        }
        if self.open_until.is_some() {
            if !probe {
                // In flight when the circuit opened: already accounted for.
                return None;
            }
            let cooldown = self
                .cooldown
                .unwrap_or(policy.cooldown)
                .saturating_mul(2)
                .min(policy.max_cooldown.max(policy.cooldown));
            self.cooldown = Some(cooldown);
            self.open_until = Some(add_saturating(now, cooldown));
            return Some(CircuitTransition::Reopened { cooldown });
        }
        if self.consecutive_failures < policy.threshold {
            return None;
        }
        self.cooldown = Some(policy.cooldown);
        self.open_until = Some(add_saturating(now, policy.cooldown));
        Some(CircuitTransition::Opened {
            failures: self.consecutive_failures,
            cooldown: policy.cooldown,
        })
    }

    /// Closes the circuit and forgets the failures (an operator's resume).
    pub fn reset(&mut self) {
        *self = CircuitBreaker::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> CircuitPolicy {
        CircuitPolicy {
            threshold: 5,
            cooldown: Duration::from_secs(2),
            max_cooldown: Duration::from_secs(300),
        }
    }

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    fn secs(n: i64) -> chrono::Duration {
        chrono::Duration::seconds(n)
    }

    #[test]
    fn opens_after_threshold_consecutive_failures() {
        let mut c = CircuitBreaker::default();
        for _ in 0..4 {
            assert_eq!(c.record_failure(&policy(), false, t0()), None);
        }
        assert_eq!(c.state(t0()), CircuitState::Closed);
        assert_eq!(
            c.record_failure(&policy(), false, t0()),
            Some(CircuitTransition::Opened {
                failures: 5,
                cooldown: Duration::from_secs(2)
            })
        );
        assert_eq!(c.state(t0()), CircuitState::Open);
        assert_eq!(c.state(t0() + secs(2)), CircuitState::HalfOpen);
    }

    #[test]
    fn a_success_between_failures_resets_the_count() {
        let mut c = CircuitBreaker::default();
        for _ in 0..4 {
            c.record_failure(&policy(), false, t0());
        }
        assert_eq!(c.record_success(), None, "closed circuit: no transition");
        for _ in 0..4 {
            assert_eq!(c.record_failure(&policy(), false, t0()), None);
        }
        assert_eq!(c.state(t0()), CircuitState::Closed);
    }

    /// The outage bug: a batch of 20 failures reported after the circuit
    /// opened must not stretch the cool-down; the probe is due when the
    /// first cool-down ends.
    #[test]
    fn failures_in_flight_when_it_opened_do_not_extend_the_cooldown() {
        let mut c = CircuitBreaker::default();
        for _ in 0..20 {
            c.record_failure(&policy(), false, t0());
        }
        assert_eq!(c.probe_at(), Some(t0() + secs(2)));
        // Even if they trickle in later.
        assert_eq!(c.record_failure(&policy(), false, t0() + secs(1)), None);
        assert_eq!(c.probe_at(), Some(t0() + secs(2)));
        assert_eq!(c.state(t0() + secs(2)), CircuitState::HalfOpen);
    }

    #[test]
    fn failed_probes_double_the_cooldown_up_to_the_cap_and_success_closes() {
        let mut c = CircuitBreaker::default();
        for _ in 0..5 {
            c.record_failure(&policy(), false, t0());
        }
        let mut now = t0();
        let mut expected = 2;
        for _ in 0..10 {
            now = c.probe_at().unwrap();
            assert_eq!(c.state(now), CircuitState::HalfOpen);
            expected = (expected * 2).min(300);
            assert_eq!(
                c.record_failure(&policy(), true, now),
                Some(CircuitTransition::Reopened {
                    cooldown: Duration::from_secs(expected)
                })
            );
            assert_eq!(c.probe_at(), Some(now + secs(expected as i64)));
        }
        assert_eq!(expected, 300, "capped at max_cooldown");
        assert_eq!(c.record_success(), Some(CircuitTransition::Closed));
        assert_eq!(c.state(now), CircuitState::Closed);
        // Closed again: the next opening starts from the first cool-down.
        for _ in 0..5 {
            c.record_failure(&policy(), false, now);
        }
        assert_eq!(c.probe_at(), Some(now + secs(2)));
    }

    #[test]
    fn threshold_zero_never_opens() {
        let mut c = CircuitBreaker::default();
        let p = CircuitPolicy {
            threshold: 0,
            ..policy()
        };
        for _ in 0..100 {
            assert_eq!(c.record_failure(&p, false, t0()), None);
        }
        assert_eq!(c.state(t0()), CircuitState::Closed);
    }

    #[test]
    fn max_cooldown_below_cooldown_keeps_the_cooldown() {
        let mut c = CircuitBreaker::default();
        let p = CircuitPolicy {
            threshold: 1,
            cooldown: Duration::from_secs(60),
            max_cooldown: Duration::from_secs(10),
        };
        c.record_failure(&p, false, t0());
        let now = c.probe_at().unwrap();
        assert_eq!(
            c.record_failure(&p, true, now),
            Some(CircuitTransition::Reopened {
                cooldown: Duration::from_secs(60)
            })
        );
    }
}
