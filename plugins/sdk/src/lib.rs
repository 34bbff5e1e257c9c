//! `retryq-plugin`: what a retryq transport implements.
//!
//! A transport delivers one queued item to an upstream ([`Pusher`]) and,
//! optionally, asks the upstream which fingerprints it already has
//! ([`FingerprintChecker`]). The same traits serve an in-process transport
//! (a host hands a `Box<dyn Pusher>` to the worker) and a dynamic plugin (a
//! shared library exporting the C ABI in [`abi`] through the export macro),
//! so the two are interchangeable.
//!
//! Types here are plain data with no dependency on the host crate.

#![deny(missing_docs)]

pub mod abi;
pub mod export;
#[cfg(feature = "host")]
pub mod host;
#[cfg(feature = "host")]
pub mod sandbox;
#[cfg(feature = "host")]
pub mod testing;

pub use export::host_log;
#[doc(hidden)]
pub use serde_json;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What a transport learns about the item it delivers (everything but the
/// payload, which crosses as raw bytes). Crosses the C ABI as JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemMeta {
    /// Item ID; send it as an idempotency key so the upstream can drop
    /// duplicates of at-least-once delivery.
    pub id: String,
    /// Report type (`findings`, `assets`, `heartbeat`, ...).
    #[serde(rename = "type")]
    pub item_type: String,
    /// Content fingerprint.
    pub fingerprint: String,
    /// Attempts made before this one.
    pub attempts: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// Producing agent.
    #[serde(default)]
    pub agent_id: String,
    /// Producing scanner.
    #[serde(default)]
    pub scanner_name: String,
    /// What was scanned.
    #[serde(default)]
    pub target_path: String,
    /// Free-form attributes set by the producer.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// The upstream's answer to one push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// The upstream acknowledged the item; it will be deleted.
    Delivered,
    /// A transient failure (network, timeout, 408, 429, 5xx...): try again
    /// later, not before `retry_after` if given.
    Retryable {
        /// What failed.
        message: String,
        /// The upstream's Retry-After, if any.
        retry_after: Option<Duration>,
    },
    /// The upstream refuses this item for good (400, 422...): dead-letter it.
    Permanent {
        /// Why.
        message: String,
    },
    /// Credentials were refused (401, 403): pause all delivery.
    Unauthorized {
        /// Why.
        message: String,
    },
}

impl PushOutcome {
    /// A retryable outcome without Retry-After.
    pub fn retryable(message: impl Into<String>) -> Self {
        PushOutcome::Retryable {
            message: message.into(),
            retry_after: None,
        }
    }

    /// A permanent outcome.
    pub fn permanent(message: impl Into<String>) -> Self {
        PushOutcome::Permanent {
            message: message.into(),
        }
    }

    /// An unauthorized outcome.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        PushOutcome::Unauthorized {
            message: message.into(),
        }
    }

    /// A short stable name: `delivered`, `retryable`, `permanent`, `unauthorized`.
    pub fn kind(&self) -> &'static str {
        match self {
            PushOutcome::Delivered => "delivered",
            PushOutcome::Retryable { .. } => "retryable",
            PushOutcome::Permanent { .. } => "permanent",
            PushOutcome::Unauthorized { .. } => "unauthorized",
        }
    }
}

/// Per-call context: the deadline the host gives the call.
#[derive(Debug, Clone, Copy)]
pub struct CallContext {
    deadline: Instant,
    /// The whole budget, kept so a timeout can be reported as the deadline
    /// it was given (what is left is zero by then).
    timeout: Duration,
}

impl CallContext {
    /// A context whose deadline is `timeout` from now.
    pub fn with_timeout(timeout: Duration) -> Self {
        CallContext {
            deadline: Instant::now() + timeout,
            timeout,
        }
    }

    /// A context with this deadline.
    pub fn with_deadline(deadline: Instant) -> Self {
        CallContext {
            deadline,
            timeout: deadline.saturating_duration_since(Instant::now()),
        }
    }

    /// The budget the call was given when the context was made (e.g. the
    /// configured push timeout), as opposed to what is [`remaining`](Self::remaining).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// When the host stops waiting for the call.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Time left before the deadline (zero once past).
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// True once the deadline has passed.
    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.deadline
    }
}

/// The upstream's answer to a fingerprint check.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    /// Fingerprints the upstream already has: skip their upload.
    #[serde(default)]
    pub existing: Vec<String>,
    /// Fingerprints the upstream does not have.
    #[serde(default)]
    pub missing: Vec<String>,
}

/// Why a fingerprint check could not be answered; the host treats it as the
/// upstream being unreachable (retryable), never as an item failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckError {
    /// A transient failure.
    Unavailable(String),
    /// Credentials were refused.
    Unauthorized(String),
}

impl std::fmt::Display for CheckError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckError::Unavailable(m) => write!(f, "fingerprint check unavailable: {m}"),
            CheckError::Unauthorized(m) => write!(f, "fingerprint check unauthorized: {m}"),
        }
    }
}

impl std::error::Error for CheckError {}

/// Delivers one item to the upstream.
///
/// Called from a pool of blocking threads: blocking I/O is fine. A call
/// should return by `ctx.deadline()`; the host treats a late call as a
/// retryable failure of that item. A panic is contained and counted as a
/// retryable failure; the instance is recreated.
pub trait Pusher: Send + Sync {
    /// Pushes `payload` (compact JSON bytes) described by `item`.
    fn push(&self, item: &ItemMeta, payload: &[u8], ctx: &CallContext) -> PushOutcome;
}

/// Asks the upstream which fingerprints it already has.
pub trait FingerprintChecker: Send + Sync {
    /// Splits `fingerprints` into existing and missing.
    fn check(&self, fingerprints: &[String], ctx: &CallContext) -> Result<CheckResult, CheckError>;
}

impl<T: Pusher + ?Sized> Pusher for Box<T> {
    fn push(&self, item: &ItemMeta, payload: &[u8], ctx: &CallContext) -> PushOutcome {
        (**self).push(item, payload, ctx)
    }
}

impl<T: Pusher + ?Sized> Pusher for std::sync::Arc<T> {
    fn push(&self, item: &ItemMeta, payload: &[u8], ctx: &CallContext) -> PushOutcome {
        (**self).push(item, payload, ctx)
    }
}

impl<T: FingerprintChecker + ?Sized> FingerprintChecker for Box<T> {
    fn check(&self, fingerprints: &[String], ctx: &CallContext) -> Result<CheckResult, CheckError> {
        (**self).check(fingerprints, ctx)
    }
}

impl<T: FingerprintChecker + ?Sized> FingerprintChecker for std::sync::Arc<T> {
    fn check(&self, fingerprints: &[String], ctx: &CallContext) -> Result<CheckResult, CheckError> {
        (**self).check(fingerprints, ctx)
    }
}
