//! Backoff: how long to wait before the next delivery attempt.
//!
//! Three strategies (the seed's): exponential `base * multiplier^(attempt-1)`,
//! linear `base * attempt`, constant `base`; every delay is capped by
//! `max_interval`. Jitter spreads retries of many items apart: the seed's
//! proportional jitter (±`jitter` of the delay) or full jitter (uniform in
//! `[0, delay]`). The arithmetic saturates: no attempt count, however large,
//! overflows, schedules into the past, or (with jitter) goes past the cap.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::item::QueueItem;

/// The seed's default retry interval (base delay).
pub const DEFAULT_BASE: Duration = Duration::from_secs(5 * 60);
/// Default cap on one delay: 48 hours.
pub const DEFAULT_MAX_INTERVAL: Duration = Duration::from_secs(48 * 3600);
/// Default proportional jitter: ±10 %.
pub const DEFAULT_JITTER: f64 = 0.1;

/// How the delay grows with the attempt count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackoffStrategy {
    /// `base * multiplier^(attempt-1)`.
    #[default]
    Exponential,
    /// `base * attempt`.
    Linear,
    /// `base`.
    Constant,
}

/// How jitter is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JitterMode {
    /// The seed's: the delay varies by ±`jitter` of itself.
    #[default]
    Proportional,
    /// Uniform in `[0, delay]` ("full jitter"); `jitter` is ignored.
    Full,
}

/// A backoff configuration that was refused, naming the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid backoff {field}: {reason}")]
pub struct BackoffError {
    /// The offending field.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

/// Retry timing (the seed's `BackoffConfig`). Build with [`BackoffConfig::new`]
/// or deserialize and call [`BackoffConfig::validate`]. Its serde form is
/// the `[backoff]` section of a config file, the cap spelled `max`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackoffConfig {
    /// How the delay grows.
    pub strategy: BackoffStrategy,
    /// The first delay.
    #[serde(with = "humantime_serde")]
    pub base: Duration,
    /// The cap on any one delay.
    #[serde(with = "humantime_serde", rename = "max")]
    pub max_interval: Duration,
    /// Growth factor for exponential backoff (at least 1).
    pub multiplier: f64,
    /// Proportional jitter fraction, in `[0, 1]`.
    pub jitter: f64,
    /// How jitter is applied.
    pub jitter_mode: JitterMode,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            strategy: BackoffStrategy::Exponential,
            base: DEFAULT_BASE,
            max_interval: DEFAULT_MAX_INTERVAL,
            multiplier: 2.0,
            jitter: DEFAULT_JITTER,
            jitter_mode: JitterMode::Proportional,
        }
    }
}

impl BackoffConfig {
    /// A validated configuration with the default multiplier and jitter.
    pub fn new(
        strategy: BackoffStrategy,
        base: Duration,
        max_interval: Duration,
    ) -> Result<Self, BackoffError> {
        let config = BackoffConfig {
            strategy,
            base,
            max_interval,
            ..BackoffConfig::default()
        };
        config.validate()?;
        Ok(config)
    }

    /// Sets the jitter fraction, validated.
    pub fn with_jitter(mut self, jitter: f64) -> Result<Self, BackoffError> {
        self.jitter = jitter;
        self.validate()?;
        Ok(self)
    }

    /// Sets the jitter mode.
    pub fn with_jitter_mode(mut self, mode: JitterMode) -> Self {
        self.jitter_mode = mode;
        self
    }

    /// Sets the exponential multiplier, validated.
    pub fn with_multiplier(mut self, multiplier: f64) -> Result<Self, BackoffError> {
        self.multiplier = multiplier;
        self.validate()?;
        Ok(self)
    }

    /// Checks the laws a configuration must keep.
    pub fn validate(&self) -> Result<(), BackoffError> {
        if self.base.is_zero() {
            return Err(BackoffError {
                field: "base",
                reason: "must be greater than zero".into(),
            });
        }
        if self.max_interval < self.base {
            return Err(BackoffError {
                field: "max",
                reason: format!(
                    "{} is below base {}",
                    humantime::format_duration(self.max_interval),
                    humantime::format_duration(self.base)
                ),
            });
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err(BackoffError {
                field: "multiplier",
                reason: format!("{} is not a finite number of at least 1", self.multiplier),
            });
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(BackoffError {
                field: "jitter",
                reason: format!("{} is outside 0..=1", self.jitter),
            });
        }
        Ok(())
    }

    /// The delay after `attempt` failed attempts, without jitter, capped.
    /// Attempt 0 is treated as 1.
    pub fn delay(&self, attempt: u32) -> Duration {
        let attempt = attempt.max(1);
        let base = self.base.as_secs_f64();
        let secs = match self.strategy {
            BackoffStrategy::Constant => base,
            BackoffStrategy::Linear => base * f64::from(attempt),
            BackoffStrategy::Exponential => {
                // powi saturates to +inf for huge exponents; the cap handles it.
                let exp = i32::try_from(attempt - 1).unwrap_or(i32::MAX);
                base * self.multiplier.powi(exp)
            }
        };
        self.cap(secs)
    }

    /// The delay after `attempt` failed attempts with jitter from `unit`, a
    /// sample uniform in `[0, 1)`; never past the cap.
    pub fn delay_with_sample(&self, attempt: u32, unit: f64) -> Duration {
        let d = self.delay(attempt).as_secs_f64();
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.5
        };
        let secs = match self.jitter_mode {
            JitterMode::Full => d * unit,
            JitterMode::Proportional => d * (1.0 + self.jitter * (2.0 * unit - 1.0)),
        };
        self.cap(secs)
    }

    /// The delay after `attempt` failed attempts, with random jitter.
    pub fn jittered_delay(&self, attempt: u32) -> Duration {
        self.delay_with_sample(attempt, fastrand::f64())
    }

    /// When to try again after `attempt` failed attempts, counted from now.
    pub fn next_retry(&self, attempt: u32) -> DateTime<Utc> {
        self.next_retry_from(attempt, Utc::now())
    }

    /// When to try again after `attempt` failed attempts, counted from `from`.
    pub fn next_retry_from(&self, attempt: u32, from: DateTime<Utc>) -> DateTime<Utc> {
        add_saturating(from, self.jittered_delay(attempt))
    }

    /// The delays (without jitter) before each retry of an item allowed
    /// `max_attempts` attempts: one entry after each failed attempt that
    /// still leaves an attempt, so `max_attempts - 1` entries.
    pub fn retry_schedule(&self, max_attempts: u32) -> Vec<Duration> {
        (1..max_attempts).map(|a| self.delay(a)).collect()
    }

    /// The sum of [`retry_schedule`](Self::retry_schedule): how long an item
    /// that always fails waits in all before it becomes a dead letter.
    pub fn total_backoff_time(&self, max_attempts: u32) -> Duration {
        self.retry_schedule(max_attempts)
            .into_iter()
            .fold(Duration::ZERO, Duration::saturating_add)
    }

    fn cap(&self, secs: f64) -> Duration {
        let max = self.max_interval.as_secs_f64();
        if !secs.is_finite() || secs >= max {
            return self.max_interval;
        }
        if secs <= 0.0 {
            return Duration::ZERO;
        }
        Duration::try_from_secs_f64(secs)
            .unwrap_or(self.max_interval)
            .min(self.max_interval)
    }
}

/// `from + delay`, saturating at the largest representable time.
pub fn add_saturating(from: DateTime<Utc>, delay: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(delay)
        .ok()
        .and_then(|d| from.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The seed's `CalculateNextRetry`: when to try again after `attempt` failed
/// attempts, counted from `from`.
pub fn calculate_next_retry(
    config: &BackoffConfig,
    attempt: u32,
    from: DateTime<Utc>,
) -> DateTime<Utc> {
    config.next_retry_from(attempt, from)
}

/// The seed's `IsReadyForRetry`: the item is pending and due at `now`.
pub fn is_ready_for_retry(item: &QueueItem, now: DateTime<Utc>) -> bool {
    item.is_ready_for_retry(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn strategies_follow_their_formulas() {
        let exp = BackoffConfig::new(BackoffStrategy::Exponential, secs(10), secs(1000)).unwrap();
        assert_eq!(exp.delay(1), secs(10));
        assert_eq!(exp.delay(2), secs(20));
        assert_eq!(exp.delay(4), secs(80));
        assert_eq!(exp.delay(20), secs(1000));
        let lin = BackoffConfig::new(BackoffStrategy::Linear, secs(10), secs(1000)).unwrap();
        assert_eq!(lin.delay(3), secs(30));
        let con = BackoffConfig::new(BackoffStrategy::Constant, secs(10), secs(1000)).unwrap();
        assert_eq!(con.delay(7), secs(10));
    }

    #[test]
    fn nonsense_is_refused_naming_the_field() {
        let e = BackoffConfig::new(BackoffStrategy::Linear, Duration::ZERO, secs(1)).unwrap_err();
        assert_eq!(e.field, "base");
        let e = BackoffConfig::new(BackoffStrategy::Linear, secs(10), secs(1)).unwrap_err();
        assert_eq!(e.field, "max");
        let ok = BackoffConfig::default();
        assert_eq!(ok.clone().with_jitter(1.5).unwrap_err().field, "jitter");
        assert_eq!(ok.clone().with_jitter(-0.1).unwrap_err().field, "jitter");
        assert_eq!(ok.with_multiplier(0.5).unwrap_err().field, "multiplier");
    }

    #[test]
    fn schedule_and_total() {
        let c = BackoffConfig::new(BackoffStrategy::Exponential, secs(1), secs(100)).unwrap();
        assert_eq!(c.retry_schedule(4), vec![secs(1), secs(2), secs(4)]);
        assert_eq!(c.total_backoff_time(4), secs(7));
        assert!(c.retry_schedule(0).is_empty());
    }
}
