//! A SQLite store as the source of `retryq migrate --from FILE` (typically
//! into a PostgreSQL store, when one daemon's queue joins a fleet).
//!
//! The source is opened as an admin client (no write at open) and read in
//! pages in a total order (creation time, then ID); it is never changed.
//! A daemon that owns it would change it under the pages, so that is
//! refused: stop the daemon first. Rows that fail their checks are the
//! source's to quarantine; only what it reads back intact is imported.

use std::path::Path;

use anyhow::{bail, Context};
use retryq::store::owner::{owner_lock_path, OwnerLock};
use retryq::store::{ListFilter, OrderBy};
use retryq::{QueueItem, RetryQueue, SqliteRetryQueue, StoreOptions};

/// One batch as read: each item's ID and the item.
pub(super) type ItemBatch = Vec<(String, Result<QueueItem, String>)>;

/// A SQLite store opened for reading.
pub(super) struct SqliteSource {
    queue: SqliteRetryQueue,
    total: usize,
    /// Items read so far.
    read: usize,
}

impl SqliteSource {
    /// Opens the SQLite database `path`, refusing one a daemon owns.
    pub(super) fn open(path: &Path) -> anyhow::Result<SqliteSource> {
        let lock = owner_lock_path(path, false);
        if let Some(holder) =
            OwnerLock::holder(&lock).context("cannot check who owns the source")?
        {
            bail!(
                "the source store {} is owned by a running retryq daemon ({}): stop it first, \
                 so that nothing changes while it is read",
                path.display(),
                holder.describe()
            );
        }
        let options = StoreOptions {
            // Nothing of the source's is limited or deduplicated by reading it.
            max_items: usize::MAX,
            max_bytes: u64::MAX,
            dedupe: false,
            ..StoreOptions::default()
        };
        let queue = SqliteRetryQueue::open_as_client(path, options)
            .with_context(|| format!("cannot open the SQLite store {}", path.display()))?;
        let total = queue
            .size()
            .with_context(|| format!("cannot count the items of {}", path.display()))?;
        Ok(SqliteSource {
            queue,
            total,
            read: 0,
        })
    }

    /// Items in the source.
    pub(super) fn total(&self) -> usize {
        self.total
    }

    /// The next batch of at most `size` items, in creation order; None
    /// once the source is read.
    pub(super) fn next_batch(&mut self, size: usize) -> anyhow::Result<Option<ItemBatch>> {
        let filter = ListFilter {
            order_by: OrderBy::CreatedAt,
            offset: self.read,
            limit: Some(size),
            ..ListFilter::default()
        };
        let items = self
            .queue
            .list(&filter)
            .with_context(|| format!("cannot read the source's items from the {}th", self.read))?;
        if items.is_empty() {
            return Ok(None);
        }
        self.read += items.len();
        Ok(Some(
            items
                .into_iter()
                .map(|i| (i.id.to_string(), Ok(i)))
                .collect(),
        ))
    }
}

impl Drop for SqliteSource {
    fn drop(&mut self) {
        let _ = self.queue.close();
    }
}
