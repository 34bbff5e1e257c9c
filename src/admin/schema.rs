//! The bodies the API answers and accepts, as OpenAPI schemas: what the
//! handlers build, described once so that the handlers' annotations and
//! the document (`super::openapi`) name the same types. The item,
//! statistics and plugin schemas are the library's own types.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use crate::item::{ItemStatus, QueueItem};
use crate::store::QueueStats;

/// Every error: a kind and a message (`existing_id` on a 409 duplicate).
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Machine-readable kind, e.g. `invalid_request`, `not_found`, `queue_full`.
    pub error: String,
    /// What went wrong, for a person.
    pub message: String,
    /// The item that already holds this ID or fingerprint (409 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub existing_id: Option<String>,
}

/// `GET /healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// `GET /readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: String,
    /// The store answers.
    pub store_open: bool,
    /// The store accepts writes.
    pub store_writable: bool,
    /// Why it does not, while it does not.
    pub store_error: Option<String>,
    /// The worker runs.
    pub worker_running: bool,
}

/// `POST /v1/items` (201).
#[derive(Debug, Serialize, ToSchema)]
pub struct Created {
    /// The new item's ID.
    pub id: String,
}

/// An item as the API shows it: the stored item, with `report` only when
/// asked for, and its size.
#[derive(Debug, Serialize, ToSchema)]
pub struct ItemView {
    /// The stored item's fields, flattened into the view.
    #[serde(flatten)]
    pub item: QueueItem,
    /// Bytes it accounts for against `max_bytes`.
    pub size_bytes: u64,
}

/// `GET /v1/items`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ItemPage {
    /// The items (no payloads).
    pub items: Vec<ItemView>,
    /// How many are in this page.
    pub count: usize,
    /// The page size used (after the cap).
    pub limit: Option<usize>,
    /// Items skipped.
    pub offset: usize,
}

/// `GET /v1/stats`: the queue's statistics and the worker's.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatsView {
    /// The store's counts and sizes, flattened into the view.
    #[serde(flatten)]
    pub queue: QueueStats,
    /// The worker's statistics (`paused`, `pause_reason`, `paused_since`,
    /// `circuit_state`, totals...); null when no worker runs.
    pub worker: Option<serde_json::Value>,
}

/// `POST /v1/process-now`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProcessNowResult {
    /// Items processed in the round.
    pub processed: usize,
    /// How many of each outcome (`delivered`, `retried`, ...).
    pub by_kind: BTreeMap<String, usize>,
    /// One result per item (`item_id`, `kind`, `attempts`, `error`, `next_retry`).
    pub results: Vec<serde_json::Value>,
}

/// `POST /v1/pause` and `POST /v1/resume`: the gates after the call.
#[derive(Debug, Serialize, ToSchema)]
pub struct PauseState {
    /// Delivery is paused.
    pub paused: bool,
    /// The operator's reason or the upstream's refusal; `null` while not paused.
    pub pause_reason: Option<String>,
    /// When the pause began; `null` while not paused.
    pub paused_since: Option<DateTime<Utc>>,
    /// `closed`, `open` or `half_open`.
    pub circuit_state: String,
}

/// The optional body of `POST /v1/pause`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PauseRequest {
    /// Shown in `stats` and the console (default "paused by an operator").
    #[schema(min_length = 1, max_length = 500, pattern = "\\S")]
    pub reason: Option<String>,
}

/// `POST /v1/cleanup`.
#[derive(Debug, Serialize, ToSchema)]
pub struct CleanupResult {
    /// Pending or processing items older than the TTL.
    pub expired: usize,
    /// Dead letters older than the dead-letter TTL.
    pub dead_letters_expired: usize,
    /// Quarantined records removed beyond the cap.
    pub quarantine_trimmed: usize,
    /// Items removed in all.
    pub removed: usize,
}

/// `POST /v1/items/retry-failed`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Revived {
    /// How many dead letters are pending again.
    pub revived: usize,
    /// The IDs of the revived items, in the order revived.
    pub ids: Vec<String>,
}

/// `DELETE /v1/items?status=S`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Purged {
    /// How many items were removed.
    pub purged: usize,
    /// The status purged.
    pub status: ItemStatus,
}

/// `order_by` of `GET /v1/items`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OrderByParam {
    /// Oldest first (or newest with `desc`).
    CreatedAt,
    /// Soonest due first.
    NextRetry,
    /// Fewest attempts first.
    Attempts,
}
