//! Operations on every item in a status, shared by the API
//! (`POST /v1/items/retry-failed`, `DELETE /v1/items?status=S`) and the CLI
//! when it opens the store itself, so both paths count the same way.

use crate::error::{QueueError, QueueResult};
use crate::item::{ItemId, ItemStatus};
use crate::store::{ListFilter, RetryQueue};

/// Brings every dead letter back to pending, due now (attempts reset), and
/// returns the IDs revived. An item that was deleted or changed status
/// between the listing and its revival (a concurrent purge, say) is skipped:
/// it is no dead letter any more.
pub fn revive_failed(queue: &dyn RetryQueue) -> QueueResult<Vec<ItemId>> {
    let failed = queue.list(&ListFilter {
        status: Some(ItemStatus::Failed),
        ..ListFilter::default()
    })?;
    let mut revived = Vec::with_capacity(failed.len());
    for item in failed {
        match queue.revive(&item.id) {
            Ok(item) => revived.push(item.id),
            Err(QueueError::ItemNotFound { .. } | QueueError::WrongState { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(revived)
}

/// Deletes every item in `status` and returns how many went. One that is
/// gone meanwhile (delivered, expired) is not counted.
pub fn purge_status(queue: &dyn RetryQueue, status: ItemStatus) -> QueueResult<usize> {
    let items = queue.list(&ListFilter {
        status: Some(status),
        ..ListFilter::default()
    })?;
    let mut purged = 0;
    for item in &items {
        match queue.delete(&item.id) {
            Ok(()) => purged += 1,
            Err(QueueError::ItemNotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(purged)
}
