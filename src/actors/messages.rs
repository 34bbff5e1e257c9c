//! Every message the actors exchange, in one place, so the protocol between
//! them reads as one table.
//!
//! | to        | message            | answer                                   |
//! |-----------|--------------------|------------------------------------------|
//! | store     | `Apply`            | per-op results, after one durable commit |
//! | store     | `Claim`            | the items now leased to the caller       |
//! | store     | `NextDue`          | when something next becomes actionable   |
//! | store     | `ProbeWritable`    | whether a durable write goes through now |
//! | store     | `Maintain`         | cleanup + limits + lease recovery report |
//! | pusher    | `Push`             | the transport's outcome and latency      |
//! | checker   | `CheckFingerprints`| existing / missing, or why it failed     |
//! | scheduler | `Wake`, `DeliverClaimed`, `Pause`, `Resume`, `Shutdown` | see each |
//! | janitor   | `Tick`             | runs one maintenance pass                |

use std::time::Duration;

use actix::Message;
use chrono::{DateTime, Utc};
use retryq_plugin::{CheckError, CheckResult, PushOutcome};

use crate::error::QueueResult;
use crate::item::QueueItem;
pub use crate::store::maintenance::MaintenanceReport;
use crate::store::{WriteOp, WriteOutcome};

/// Apply state changes in the store's next group commit.
#[derive(Debug, Message)]
#[rtype(result = "QueueResult<Vec<QueueResult<WriteOutcome>>>")]
pub struct Apply(pub Vec<WriteOp>);

/// Lease up to `limit` ready items.
#[derive(Debug, Message)]
#[rtype(result = "QueueResult<Vec<QueueItem>>")]
pub struct Claim {
    /// Most items.
    pub limit: usize,
    /// Lease length.
    pub lease: Duration,
}

/// When the next item is due or the next lease expires.
#[derive(Debug, Message)]
#[rtype(result = "QueueResult<Option<DateTime<Utc>>>")]
pub struct NextDue;

/// Prove that the store takes a durable write now (see
/// [`crate::store::RetryQueue::probe_writable`]).
#[derive(Debug, Message)]
#[rtype(result = "QueueResult<bool>")]
pub struct ProbeWritable;

/// One maintenance pass: expire by TTL, enforce limits, recover leases.
#[derive(Debug, Message)]
#[rtype(result = "QueueResult<MaintenanceReport>")]
pub struct Maintain {
    /// Items older than this expire.
    pub ttl: Duration,
}

/// Deliver one item through the transport.
#[derive(Debug, Message)]
#[rtype(result = "PushReport")]
pub struct Push(pub QueueItem);

/// The transport's answer for one item.
#[derive(Debug, Clone)]
pub struct PushReport {
    /// The item pushed.
    pub item: QueueItem,
    /// What the upstream said (a contained panic is `Retryable`).
    pub outcome: PushOutcome,
    /// How long the call took.
    pub latency: Duration,
}

/// Ask the upstream which fingerprints it already has.
#[derive(Debug, Message)]
#[rtype(result = "Result<CheckResult, CheckError>")]
pub struct CheckFingerprints(pub Vec<String>);

/// Something may be due: run a delivery cycle now.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Wake;

/// Items an enqueue stored already claimed (the outbox path): deliver
/// them now, without claiming them back.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct DeliverClaimed(pub Vec<QueueItem>);

/// Stop claiming until `Resume`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Pause;

/// Resume claiming after `Pause` or an unauthorized pause.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Resume;

/// Stop claiming for good and report when no delivery is in flight.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Shutdown;

/// The janitor's periodic pass.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Tick;
