//! The maintenance pass, written once for every caller (the janitor's
//! timer through the store actor, and `RetryWorker::trigger_cleanup`
//! directly): expire by TTL, fit the limits, return expired leases.
//!
//! The order matters: expiry first, so the limits never evict an item
//! that was going to expire anyway; lease recovery last, so an item whose
//! lease ran out is pending again for the next claim.

use std::time::Duration;

use serde::Serialize;

use super::{CleanupReport, QueueResult, RetryQueue};

/// What a maintenance pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MaintenanceReport {
    /// TTL cleanup.
    pub cleanup: CleanupReport,
    /// Items evicted to fit the limits.
    pub evicted: usize,
    /// Expired leases returned to pending.
    pub leases_released: usize,
}

impl MaintenanceReport {
    /// Whether the pass changed anything.
    pub fn changed_anything(&self) -> bool {
        self.cleanup.removed() + self.evicted + self.leases_released > 0
    }
}

/// Runs one maintenance pass on `queue`, items older than `ttl` expiring.
pub fn run_maintenance(queue: &dyn RetryQueue, ttl: Duration) -> QueueResult<MaintenanceReport> {
    Ok(MaintenanceReport {
        cleanup: queue.cleanup(ttl)?,
        evicted: queue.enforce_limits()?,
        leases_released: queue.release_expired_leases()?,
    })
}
