//! Moving one item to `corrupt/` by ID, for damage found above the backend
//! (a sealed payload that fails authentication, [`crate::seal`]): the same
//! move, naming and fsyncs as a record the open found unreadable.

use super::fs::with_path as io_ctx;
use super::{FileRetryQueue, Inner};
use crate::error::{QueueError, QueueResult};

impl FileRetryQueue {
    pub(super) fn quarantine_in(
        &self,
        inner: &mut Inner,
        id: &str,
        reason: &str,
    ) -> QueueResult<()> {
        let op = "quarantine";
        let file = inner.index.get(id)?.file.clone();
        let stamp = self.now().timestamp_nanos_opt().unwrap_or(0);
        // Prefixed by the time so the oldest sorts first; never overwrite
        // an earlier quarantined record.
        let mut target = format!("{stamp}_{file}");
        let mut n = 1;
        while inner.quarantine.contains(&target) {
            target = format!("{stamp}_{n}_{file}");
            n += 1;
        }
        let from = self.dir.join(&file);
        self.fs
            .rename(&from, &self.quarantine_dir.join(&target))
            .map_err(|e| QueueError::storage(op, io_ctx(&from, e)))?;
        // The item is gone from the index whatever the syncs say: its file
        // is no longer where the index would look for it.
        inner.index.remove(id);
        inner.quarantine.insert(target.clone());
        tracing::warn!(item_id = id, quarantined_as = %target, reason, "quarantined a queue item");
        self.fs
            .sync_dir(&self.quarantine_dir)
            .and_then(|_| self.fs.sync_dir(&self.dir))
            .map_err(|e| QueueError::storage(op, io_ctx(&self.dir, e)))
    }
}
