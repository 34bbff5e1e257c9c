//! Group commit (module doc, "Group commit"): the ops of one
//! `apply_batch` run one after the other against the index, their file
//! changes are held back, and the whole group is committed at the end with
//! one directory fsync, or undone, index included.

use std::collections::HashMap;
use std::time::Duration;

use super::commit::{Change, Saved};
use super::index::Index;
use super::record::parse_file_name;
use super::{FileRetryQueue, Inner};
use crate::error::{QueueError, QueueResult};
use crate::item::{ItemId, NewItem, QueueItem};
use crate::store::apply::{ApplyOps, ItemUpdate};

/// The changes of one `apply_batch` group, held back while its ops run and
/// committed together when the last one has: one directory fsync for the
/// group instead of one per op.
#[derive(Debug, Default)]
pub(super) struct Group {
    /// One change per file, in first-touch order: `new` is the file's last
    /// content in the group, `old` its item before the group.
    pub(super) changes: Vec<Change>,
    /// Where each file's change is in `changes`.
    pub(super) by_file: HashMap<String, usize>,
    /// The index entries the group's ops replaced, as they were before it
    /// (`None`: absent), in the order first touched; undone in reverse if
    /// the commit fails.
    pub(super) before: Vec<(String, Option<Saved>)>,
    /// `Inner::evicted` before the group.
    pub(super) evicted: u64,
}

impl Group {
    /// Folds `changes` into the group, noting what the index held before.
    pub(super) fn add(&mut self, index: &Index, changes: &[Change]) {
        for change in changes {
            if let Some(&at) = self.by_file.get(&change.file) {
                self.changes[at].new = change.new.clone();
                continue;
            }
            let id = match &change.old {
                Some(old) => old.id.as_str(),
                // Our own file names always parse (the ID was validated).
                None => parse_file_name(&change.file).unwrap_or_default(),
            };
            let before = index
                .entries
                .get(id)
                .map(|e| (e.item.clone(), e.file.clone(), e.disk_len));
            self.before.push((id.to_owned(), before));
            self.by_file.insert(change.file.clone(), self.changes.len());
            self.changes.push(change.clone());
        }
    }
}

/// The store's state inside an open group: the context each op of
/// `apply_batch` runs in, as it would alone.
pub(super) struct InGroup<'a> {
    pub(super) queue: &'a FileRetryQueue,
    pub(super) inner: &'a mut Inner,
}

impl InGroup<'_> {
    fn store_one(
        &mut self,
        op: &'static str,
        item: NewItem,
        lease: Option<Duration>,
    ) -> QueueResult<QueueItem> {
        self.queue
            .store_new_in(self.inner, op, vec![item], lease)?
            .pop()
            .unwrap_or_else(|| Err(QueueError::storage(op, "no result for the item")))
    }
}

impl ApplyOps for InGroup<'_> {
    fn enqueue(&mut self, item: NewItem) -> QueueResult<ItemId> {
        self.store_one("enqueue", item, None).map(|item| item.id)
    }

    fn enqueue_claimed(&mut self, item: NewItem, lease: Duration) -> QueueResult<QueueItem> {
        self.store_one("enqueue_claimed", item, Some(lease))
    }

    fn delete(&mut self, id: &ItemId) -> QueueResult<()> {
        self.queue.delete_in(self.inner, id)
    }

    fn change(&mut self, update: ItemUpdate<'_>) -> QueueResult<QueueItem> {
        let ItemUpdate { op, id, apply } = update;
        self.queue.change_one_in(self.inner, op, id, apply)
    }

    fn release(&mut self, id: &ItemId) -> QueueResult<()> {
        self.queue.release_in(self.inner, id)
    }
}

impl FileRetryQueue {
    /// Commits the open group (see [`Group`]): every file written and
    /// synced, the renames and unlinks done, then one directory fsync. On
    /// failure the disk is undone as for any commit and the index goes
    /// back to where it was before the group.
    pub(super) fn commit_group(&self, inner: &mut Inner) -> QueueResult<()> {
        let Some(group) = inner.group.take() else {
            return Ok(());
        };
        // A file created and removed within the group never reaches the disk.
        let changes: Vec<Change> = group
            .changes
            .into_iter()
            .filter(|c| c.new.is_some() || c.old.is_some())
            .collect();
        if changes.is_empty() {
            return Ok(());
        }
        let committed = self.commit(inner, "apply_batch", &changes);
        if committed.is_err() {
            for (id, before) in group.before.into_iter().rev() {
                inner.index.remove(&id);
                if let Some((item, file, len)) = before {
                    inner.index.insert(item, file, len);
                }
            }
            inner.evicted = group.evicted;
        }
        committed
    }
}
