//! The delivery core's shared types: the worker's configuration (with
//! its one `validate`), its counters, the events it emits and its errors.
//! The configuration types are the `[worker]` and `[circuit]` sections of
//! a config file as they are (`crate::config` adds only the layering).
//! The actors and the `RetryWorker` handle both use them; neither owns
//! them, so neither imports the other. `crate::worker` re-exports them
//! under their seed names.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::backoff::BackoffConfig;
use crate::clock::{system_clock, SharedClock};
use crate::delivery::CircuitState;
use crate::error::QueueError;

/// The `[circuit]` section: when delivery stops for an upstream outage and for how long.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitConfig {
    /// Consecutive retryable failures (across items) that open the circuit;
    /// 0 disables the breaker.
    pub threshold: u32,
    /// How long the circuit stays open before one probe is let through.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// Each failed probe doubles the cool-down, up to this.
    #[serde(with = "humantime_serde")]
    pub max_cooldown: Duration,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        CircuitConfig {
            threshold: 5,
            cooldown: Duration::from_secs(60),
            max_cooldown: Duration::from_secs(5 * 60),
        }
    }
}

impl CircuitConfig {
    /// Checks the settings, naming the first bad field. A `max_cooldown`
    /// below `cooldown` is allowed: the breaker keeps the cool-down as its
    /// own cap then.
    pub fn validate(&self) -> Result<(), WorkerError> {
        if self.cooldown.is_zero() {
            return Err(WorkerError::config(
                "circuit.cooldown",
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

/// How the worker delivers (the seed's fields plus what the actors need).
///
/// Its serde form is the `[worker]` section: the worker's own knobs.
/// `backoff` and `circuit` are sections of their own in a config file
/// (`[backoff]`, `[circuit]`), so they are not repeated inside it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryWorkerConfig {
    /// Safety poll: the longest the scheduler sleeps even when nothing is due.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Items claimed per cycle.
    pub batch_size: usize,
    /// Attempts for items enqueued through the worker without their own.
    pub max_attempts: u32,
    /// Items older than this are expired by the janitor.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Retry timing (the `[backoff]` section).
    #[serde(skip)]
    pub backoff: BackoffConfig,
    /// Pushes in flight at once, each on its own call thread.
    pub concurrency: usize,
    /// How long a claimed item stays leased before it returns to pending.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Deadline of one transport call.
    #[serde(with = "humantime_serde")]
    pub push_timeout: Duration,
    /// How often the scheduler looks for items written by other processes.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Circuit breaker (the `[circuit]` section).
    #[serde(skip)]
    pub circuit: CircuitConfig,
    /// Cap on an upstream's Retry-After.
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
    /// While paused by an unauthorized answer, how often one probe is tried.
    #[serde(with = "humantime_serde")]
    pub unauthorized_probe_interval: Duration,
    /// How often the janitor runs.
    #[serde(with = "humantime_serde")]
    pub janitor_interval: Duration,
    /// Where "now" comes from (tests inject a manual clock).
    #[serde(skip, default = "system_clock")]
    pub clock: SharedClock,
}

impl Default for RetryWorkerConfig {
    fn default() -> Self {
        RetryWorkerConfig {
            interval: Duration::from_secs(5 * 60),
            batch_size: 10,
            max_attempts: crate::item::DEFAULT_MAX_ATTEMPTS,
            ttl: Duration::from_secs(7 * 24 * 3600),
            backoff: BackoffConfig::default(),
            concurrency: 4,
            lease: Duration::from_secs(5 * 60),
            push_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_millis(500),
            circuit: CircuitConfig::default(),
            max_retry_after: Duration::from_secs(3600),
            unauthorized_probe_interval: Duration::from_secs(60),
            janitor_interval: Duration::from_secs(60),
            clock: system_clock(),
        }
    }
}

/// Equal when every setting is: where "now" comes from is not a setting.
impl PartialEq for RetryWorkerConfig {
    fn eq(&self, other: &Self) -> bool {
        let RetryWorkerConfig {
            interval,
            batch_size,
            max_attempts,
            ttl,
            backoff,
            concurrency,
            lease,
            push_timeout,
            poll_interval,
            circuit,
            max_retry_after,
            unauthorized_probe_interval,
            janitor_interval,
            clock: _,
        } = self;
        *interval == other.interval
            && *batch_size == other.batch_size
            && *max_attempts == other.max_attempts
            && *ttl == other.ttl
            && *backoff == other.backoff
            && *concurrency == other.concurrency
            && *lease == other.lease
            && *push_timeout == other.push_timeout
            && *poll_interval == other.poll_interval
            && *circuit == other.circuit
            && *max_retry_after == other.max_retry_after
            && *unauthorized_probe_interval == other.unauthorized_probe_interval
            && *janitor_interval == other.janitor_interval
    }
}

impl RetryWorkerConfig {
    /// Checks the configuration, naming the first bad field: its own
    /// (`lease`), or `backoff.FIELD` / `circuit.FIELD`. `RetryWorker::new`
    /// and `retryq config check` both call this, so a configuration one
    /// accepts the other does too.
    pub fn validate(&self) -> Result<(), WorkerError> {
        for (field, n) in [
            ("batch_size", self.batch_size),
            ("concurrency", self.concurrency),
            ("max_attempts", self.max_attempts as usize),
        ] {
            if n == 0 {
                return Err(WorkerError::config(field, "must be at least 1"));
            }
        }
        for (field, d) in [
            ("interval", self.interval),
            ("poll_interval", self.poll_interval),
            ("janitor_interval", self.janitor_interval),
            ("push_timeout", self.push_timeout),
            ("ttl", self.ttl),
            ("max_retry_after", self.max_retry_after),
            (
                "unauthorized_probe_interval",
                self.unauthorized_probe_interval,
            ),
        ] {
            if d.is_zero() {
                return Err(WorkerError::config(field, "must be greater than zero"));
            }
        }
        if self.lease <= self.push_timeout {
            return Err(WorkerError::config(
                "lease",
                format!(
                    "{} must be longer than push_timeout {} (or items are claimed twice)",
                    humantime::format_duration(self.lease),
                    humantime::format_duration(self.push_timeout)
                ),
            ));
        }
        self.circuit.validate()?;
        self.backoff
            .validate()
            .map_err(|e| WorkerError::config(format!("backoff.{}", e.field), e.reason))
    }
}

/// Counters (the seed's `WorkerStats`, plus state).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStats {
    /// Items whose attempt finished, any outcome.
    pub total_processed: u64,
    /// Delivered or skipped.
    pub total_succeeded: u64,
    /// Failed attempts (retried, dead-lettered, exhausted).
    pub total_failed: u64,
    /// Failed attempts rescheduled.
    pub total_retried: u64,
    /// Items that ran out of attempts.
    pub total_exhausted: u64,
    /// Items the upstream already had (fingerprint check).
    pub total_skipped: u64,
    /// Items released without an attempt (unauthorized, checker failure).
    pub total_released: u64,
    /// Items expired by the janitor.
    pub total_expired: u64,
    /// Items evicted by the janitor to fit the limits.
    pub total_evicted: u64,
    /// Times the circuit opened.
    pub circuit_opened: u64,
    /// Actor restarts by supervisors.
    pub actor_restarts: u64,
    /// End of the last cycle that processed something.
    pub last_run: Option<DateTime<Utc>>,
    /// Whether the worker runs.
    pub is_running: bool,
    /// Paused by the host or by an unauthorized answer.
    pub paused: bool,
    /// Why delivery is paused, e.g. "paused by the operator" or "upstream
    /// answered 401: ..."; `None` while not paused.
    #[serde(default)]
    pub pause_reason: Option<String>,
    /// Since when delivery is paused.
    #[serde(default)]
    pub paused_since: Option<DateTime<Utc>>,
    /// The breaker's state when `stats` was taken.
    pub circuit_state: CircuitState,
    /// While the store refuses writes (a full disk, an I/O error): the
    /// last error, and delivery backs off until a write succeeds again.
    #[serde(default)]
    pub store_error: Option<String>,
    /// Since when the store refuses writes.
    #[serde(default)]
    pub store_failing_since: Option<DateTime<Utc>>,
}

/// What happened to an item in a cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Acknowledged by the upstream and deleted.
    Delivered,
    /// The upstream already had its fingerprint; deleted without upload.
    Skipped,
    /// Failed, rescheduled.
    Retried,
    /// Refused for good; a dead letter.
    DeadLettered,
    /// Out of attempts; a dead letter.
    Exhausted,
    /// Credentials refused: released, delivery paused.
    Paused,
    /// Released without an attempt (the fingerprint check failed).
    Released,
}

impl EventKind {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Delivered => "delivered",
            EventKind::Skipped => "skipped",
            EventKind::Retried => "retried",
            EventKind::DeadLettered => "dead_lettered",
            EventKind::Exhausted => "exhausted",
            EventKind::Paused => "paused",
            EventKind::Released => "released",
        }
    }
}

/// The result of processing one item (the seed's `RetryResult`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryResult {
    /// ID of the item it concerns.
    pub item_id: String,
    /// The outcome, which also picks the callback that hears of it.
    pub kind: EventKind,
    /// Attempts after this one.
    pub attempts: u32,
    /// The failure, if any.
    pub error: Option<String>,
    /// When it is tried next, if rescheduled.
    pub next_retry: Option<DateTime<Utc>>,
}

/// One outcome, as seen by callbacks and subscribers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkerEvent {
    /// ID of the item it concerns.
    pub item_id: String,
    /// The outcome, which also picks the callback that hears of it.
    pub kind: EventKind,
    /// Attempts after this one.
    pub attempts: u32,
    /// The failure, if any.
    pub error: Option<String>,
    /// Transport latency, when a push was made.
    pub latency: Option<Duration>,
    /// When it happened, by the worker's clock.
    pub at: DateTime<Utc>,
}

/// Why a worker call failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// `start` on a running worker.
    #[error("the worker is already running")]
    AlreadyRunning,
    /// A configuration field is invalid.
    #[error("invalid worker {field}: {reason}")]
    Config {
        /// The field at fault, as a path in [`RetryWorkerConfig`]
        /// (`lease`, `backoff.max`, `circuit.cooldown`).
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// The actor system could not be started.
    #[error("could not start the worker: {0}")]
    Start(String),
    /// The store's own error, kept whole.
    #[error(transparent)]
    Queue(#[from] QueueError),
}

impl WorkerError {
    fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        WorkerError::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(config: &RetryWorkerConfig) -> String {
        match config.validate() {
            Err(WorkerError::Config { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    /// The serde form is the `[worker]` section: the worker's own knobs,
    /// nothing of the sections beside it, no clock.
    #[test]
    fn serde_form_is_the_worker_section() {
        let v = serde_json::to_value(RetryWorkerConfig::default()).unwrap();
        for absent in ["backoff", "circuit", "clock"] {
            assert!(v.get(absent).is_none(), "{absent} in {v}");
        }
        assert_eq!(v["lease"], "5m");
        let back: RetryWorkerConfig = serde_json::from_value(v).unwrap();
        assert_eq!(back, RetryWorkerConfig::default());
        let nested = serde_json::json!({ "backoff": { "base": "1s" } });
        assert!(serde_json::from_value::<RetryWorkerConfig>(nested).is_err());
    }

    #[test]
    fn validate_names_the_field_at_fault() {
        let ok = RetryWorkerConfig::default();
        ok.validate().unwrap();
        let lease_equal = RetryWorkerConfig {
            lease: Duration::from_secs(30),
            push_timeout: Duration::from_secs(30),
            ..ok.clone()
        };
        assert_eq!(field_of(&lease_equal), "lease");
        let backoff = RetryWorkerConfig {
            backoff: BackoffConfig {
                base: Duration::from_secs(10),
                max_interval: Duration::from_secs(1),
                ..BackoffConfig::default()
            },
            ..ok.clone()
        };
        assert_eq!(field_of(&backoff), "backoff.max");
        let cooldown = RetryWorkerConfig {
            circuit: CircuitConfig {
                cooldown: Duration::ZERO,
                ..CircuitConfig::default()
            },
            ..ok.clone()
        };
        assert_eq!(field_of(&cooldown), "circuit.cooldown");
        let no_batch = RetryWorkerConfig {
            batch_size: 0,
            ..ok.clone()
        };
        assert_eq!(field_of(&no_batch), "batch_size");
        // A cool-down above its cap is the breaker's to clamp, not an error.
        let long_cooldown = RetryWorkerConfig {
            circuit: CircuitConfig {
                cooldown: Duration::from_secs(600),
                ..CircuitConfig::default()
            },
            ..ok
        };
        long_cooldown.validate().unwrap();
    }
}
