//! The store as delivery sees it: healthy, or refusing writes (a full
//! disk, an I/O error). While it refuses, delivery backs off instead of
//! retrying at once, logs the failure at most once per interval with a
//! count, and resumes by itself at the first write that succeeds.
//!
//! Without this a full disk turned the scheduler into a busy loop: each
//! failed claim re-armed the timer for the overdue items at once, about
//! 240 cycles and ERROR lines a second.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::backoff::{add_saturating, BackoffConfig, BackoffStrategy};

/// The delay after `failures` store failures in a row: 100 ms, doubling
/// per failure, up to 5 s (the items' own backoff, with these bounds).
fn store_backoff(failures: u64) -> Duration {
    let schedule = BackoffConfig {
        strategy: BackoffStrategy::Exponential,
        base: Duration::from_millis(100),
        max_interval: Duration::from_secs(5),
        ..BackoffConfig::default()
    };
    schedule.delay(u32::try_from(failures).unwrap_or(u32::MAX))
}

/// A run of store failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreFailure {
    /// When the first failure of the run happened.
    pub since: DateTime<Utc>,
    /// The last error.
    pub error: String,
    /// Failures in a row.
    pub count: u64,
    /// Failures not logged since the last log line.
    unlogged: u64,
    /// When the last log line about this run was written.
    logged_at: DateTime<Utc>,
}

/// What the caller should log after recording an outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreHealthLog {
    /// The first failure of a run.
    Failing {
        /// The store's message, logged once at the start of the run.
        error: String,
    },
    /// The run goes on: `count` failures so far, `unlogged` of them since
    /// the last line.
    StillFailing {
        /// The last error.
        error: String,
        /// Failures in a row.
        count: u64,
        /// Failures since the last line.
        unlogged: u64,
    },
    /// A write succeeded after `count` failures.
    Recovered {
        /// Failures the run had.
        count: u64,
        /// How long it lasted.
        lasted: Duration,
    },
}

/// Whether the store currently refuses writes, and the backoff that
/// follows from it.
#[derive(Debug, Clone, Default)]
pub struct StoreHealth {
    failure: Option<StoreFailure>,
}

impl StoreHealth {
    /// The current run of failures, if the store is failing.
    pub fn failure(&self) -> Option<&StoreFailure> {
        self.failure.as_ref()
    }

    /// True while the store refuses writes.
    pub fn is_failing(&self) -> bool {
        self.failure.is_some()
    }

    /// Records a store failure at `now`. Returns a line to log, at most one
    /// per `log_every` while the run goes on.
    pub fn record_failure(
        &mut self,
        error: String,
        now: DateTime<Utc>,
        log_every: Duration,
    ) -> Option<StoreHealthLog> {
        match &mut self.failure {
            None => {
                self.failure = Some(StoreFailure {
                    since: now,
                    error: error.clone(),
                    count: 1,
                    unlogged: 0,
                    logged_at: now,
                });
                Some(StoreHealthLog::Failing { error })
            }
            Some(run) => {
                run.count = run.count.saturating_add(1);
                run.unlogged = run.unlogged.saturating_add(1);
                run.error = error;
                if now < add_saturating(run.logged_at, log_every) {
                    return None;
                }
                let line = StoreHealthLog::StillFailing {
                    error: run.error.clone(),
                    count: run.count,
                    unlogged: run.unlogged,
                };
                run.unlogged = 0;
                run.logged_at = now;
                Some(line)
            }
        }
    }

    /// Records a successful store call; ends a run of failures.
    pub fn record_success(&mut self, now: DateTime<Utc>) -> Option<StoreHealthLog> {
        self.failure.take().map(|run| StoreHealthLog::Recovered {
            count: run.count,
            lasted: (now - run.since).to_std().unwrap_or_default(),
        })
    }

    /// How long to wait before the next try: nothing while healthy, then
    /// 100 ms doubling per failure in a row, up to 5 s.
    pub fn backoff(&self) -> Option<Duration> {
        self.failure.as_ref().map(|run| store_backoff(run.count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    fn ms(n: i64) -> chrono::Duration {
        chrono::Duration::milliseconds(n)
    }

    #[test]
    fn healthy_store_has_no_backoff() {
        let health = StoreHealth::default();
        assert!(!health.is_failing());
        assert_eq!(health.backoff(), None);
    }

    #[test]
    fn backoff_doubles_per_failure_up_to_five_seconds() {
        let mut health = StoreHealth::default();
        let mut seen = Vec::new();
        for n in 0..10 {
            health.record_failure("disk is full".into(), t0() + ms(n), Duration::from_secs(1));
            seen.push(health.backoff().unwrap().as_millis());
        }
        assert_eq!(
            seen,
            vec![100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000]
        );
    }

    #[test]
    fn repeats_are_logged_at_most_once_per_interval_with_a_count() {
        let mut health = StoreHealth::default();
        let every = Duration::from_secs(1);
        assert!(matches!(
            health.record_failure("full".into(), t0(), every),
            Some(StoreHealthLog::Failing { .. })
        ));
        // 240 failures within the same second: silent.
        for n in 1..=240 {
            assert_eq!(
                health.record_failure("full".into(), t0() + ms(n * 4), every),
                None
            );
        }
        assert_eq!(
            health.record_failure("full".into(), t0() + ms(1000), every),
            Some(StoreHealthLog::StillFailing {
                error: "full".into(),
                count: 242,
                unlogged: 241
            })
        );
        assert_eq!(
            health.record_failure("full".into(), t0() + ms(1500), every),
            None
        );
        let recovered = health.record_success(t0() + ms(3000));
        assert_eq!(
            recovered,
            Some(StoreHealthLog::Recovered {
                count: 243,
                lasted: Duration::from_secs(3)
            })
        );
        assert!(!health.is_failing());
        assert_eq!(health.record_success(t0() + ms(4000)), None, "once");
    }
}
