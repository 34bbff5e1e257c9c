//! The commit protocol (module doc, "Commit protocol"): a set of file
//! changes made durable together with one directory fsync, or undone; and
//! the state changes built on it, which update the index only once their
//! commit succeeded.

use std::io;
use std::path::PathBuf;

use chrono::{DateTime, Utc};

use super::fs::with_path as io_ctx;
use super::record::{encode, TMP_SUFFIX};
use super::{FileRetryQueue, Inner};
use crate::error::{QueueError, QueueResult};
use crate::item::QueueItem;

/// One file change of a commit: `new` content, or removal when `None`.
/// `old` is the item the file held before (for undo), `None` if it is new.
#[derive(Debug, Clone)]
pub(super) struct Change {
    pub(super) file: String,
    pub(super) new: Option<Vec<u8>>,
    pub(super) old: Option<QueueItem>,
}

/// An index entry as saved for undo: item, file name, size on disk.
pub(super) type Saved = (QueueItem, String, u64);

impl FileRetryQueue {
    pub(super) fn encode(op: &'static str, item: &QueueItem) -> QueueResult<Vec<u8>> {
        encode(item).map_err(|e| QueueError::storage(op, e))
    }

    /// Applies the steps of the write protocol; on error returns how many
    /// changes were already made visible (renamed or unlinked).
    pub(super) fn apply(&self, changes: &[Change]) -> Result<(), (usize, io::Error)> {
        let tmp = |c: &Change| self.dir.join(format!("{}{TMP_SUFFIX}", c.file));
        let mut written = 0;
        let staged: io::Result<()> = (|| {
            for change in changes {
                if let Some(data) = &change.new {
                    let path = tmp(change);
                    written += 1;
                    self.fs
                        .write_file(&path, data)
                        .map_err(|e| io_ctx(&path, e))?;
                }
            }
            let temps: Vec<PathBuf> = changes
                .iter()
                .filter(|c| c.new.is_some())
                .map(tmp)
                .collect();
            self.fs.sync_files(&temps)
        })();
        if let Err(e) = staged {
            for change in changes.iter().filter(|c| c.new.is_some()).take(written) {
                let _ = self.fs.remove_file(&tmp(change));
            }
            return Err((0, e));
        }
        let mut visible = 0;
        for change in changes {
            let target = self.dir.join(&change.file);
            let done = match change.new {
                Some(_) => self.fs.rename(&tmp(change), &target),
                None => self.fs.remove_file(&target),
            };
            if let Err(e) = done {
                for later in changes[visible..].iter().filter(|c| c.new.is_some()) {
                    let _ = self.fs.remove_file(&tmp(later));
                }
                return Err((visible, io_ctx(&target, e)));
            }
            visible += 1;
        }
        self.fs
            .sync_dir(&self.dir)
            .map_err(|e| (visible, io_ctx(&self.dir, e)))
    }

    /// Commits `changes` durably (see "Write protocol"); on failure undoes
    /// what became visible and returns `Storage`.
    ///
    /// Inside `apply_batch` it only adds `changes` to the open group (the
    /// caller updates the index as if they were committed); the group's
    /// commit at the end of `apply_batch` makes them durable, or undoes
    /// the group's index changes.
    pub(super) fn commit(
        &self,
        inner: &mut Inner,
        op: &'static str,
        changes: &[Change],
    ) -> QueueResult<()> {
        if let Some(group) = &mut inner.group {
            group.add(&inner.index, changes);
            return Ok(());
        }
        let Err((visible, error)) = self.apply(changes) else {
            return Ok(());
        };
        if visible > 0 {
            let undo: QueueResult<Vec<Change>> = changes[..visible]
                .iter()
                .map(|c| {
                    Ok(Change {
                        file: c.file.clone(),
                        new: c.old.as_ref().map(|o| Self::encode(op, o)).transpose()?,
                        old: None,
                    })
                })
                .collect();
            let undone = match undo {
                Ok(undo) => self.apply(&undo).map_err(|(_, e)| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(undo_error) = undone {
                tracing::error!(%op, %error, %undo_error, "a failed commit could not be undone; the store must be reopened");
                inner.poisoned = Some(format!(
                    "{op} failed ({error}) and could not be undone ({undo_error})"
                ));
            }
        }
        Err(QueueError::storage(op, error))
    }

    /// Applies `f` to each listed item and commits all of them at once.
    pub(super) fn change_many(
        &self,
        inner: &mut Inner,
        op: &'static str,
        ids: &[String],
        now: DateTime<Utc>,
        mut f: impl FnMut(&mut QueueItem, DateTime<Utc>) -> QueueResult<()>,
    ) -> QueueResult<Vec<QueueItem>> {
        let mut changes = Vec::with_capacity(ids.len());
        let mut updated = Vec::with_capacity(ids.len());
        for id in ids {
            let entry = inner.index.get(id)?;
            let mut item = entry.item.clone();
            f(&mut item, now)?;
            changes.push(Change {
                file: entry.file.clone(),
                new: Some(Self::encode(op, &item)?),
                old: Some(entry.item.clone()),
            });
            updated.push(item);
        }
        self.commit(inner, op, &changes)?;
        for (item, change) in updated.iter().zip(changes) {
            let len = change.new.as_ref().map_or(0, |d| d.len() as u64);
            inner.index.insert(item.clone(), change.file, len);
        }
        Ok(updated)
    }

    pub(super) fn change_one(
        &self,
        op: &'static str,
        id: &str,
        f: impl FnMut(&mut QueueItem, DateTime<Utc>) -> QueueResult<()>,
    ) -> QueueResult<QueueItem> {
        let mut inner = self.state(op)?;
        self.change_one_in(&mut inner, op, id, f)
    }

    pub(super) fn change_one_in(
        &self,
        inner: &mut Inner,
        op: &'static str,
        id: &str,
        f: impl FnMut(&mut QueueItem, DateTime<Utc>) -> QueueResult<()>,
    ) -> QueueResult<QueueItem> {
        let now = self.now();
        let mut items = self.change_many(inner, op, &[id.to_owned()], now, f)?;
        items.pop().ok_or_else(|| QueueError::not_found(id))
    }

    /// Removes the listed items in one commit.
    pub(super) fn remove_many(
        &self,
        inner: &mut Inner,
        op: &'static str,
        ids: &[String],
    ) -> QueueResult<()> {
        let mut changes = Vec::with_capacity(ids.len());
        for id in ids {
            let entry = inner.index.get(id)?;
            changes.push(Change {
                file: entry.file.clone(),
                new: None,
                old: Some(entry.item.clone()),
            });
        }
        self.commit(inner, op, &changes)?;
        for id in ids {
            inner.index.remove(id);
        }
        Ok(())
    }
}
