//! The open's recovery (module doc, "Recovery at open"): leftover temp
//! files removed, every item file read and indexed or quarantined, foreign
//! entries left alone and counted, and items left `processing` returned to
//! `pending` in one commit.

use std::collections::BTreeSet;
use std::io;
use std::path::Path;

use super::fs::with_path as io_ctx;
use super::index::Index;
use super::record::{decode, parse_file_name, TMP_SUFFIX};
use super::{FileRetryQueue, OWN_ENTRIES};
use crate::error::{QueueError, QueueResult};

/// Skipped entries named one by one in the log at open; the rest are
/// counted in one line (a directory of thousands of foreign files must not
/// flood the log at every start).
const SKIPPED_NAMED: usize = 100;

/// Entries the open left alone and did not load.
#[derive(Debug, Default)]
struct Skipped {
    count: u64,
}

impl Skipped {
    fn note(&mut self, name: &str, why: &str) {
        self.count += 1;
        if self.count <= SKIPPED_NAMED as u64 {
            tracing::warn!(entry = %name, "skipping queue directory entry: {why}");
        }
    }

    fn summarize(&self) {
        if self.count > SKIPPED_NAMED as u64 {
            tracing::warn!(
                count = self.count,
                named = SKIPPED_NAMED,
                "skipped queue directory entries (only the first were named)"
            );
        }
    }
}

impl FileRetryQueue {
    pub(super) fn recover(&self) -> QueueResult<()> {
        let fs = &self.fs;
        let dir = &self.dir;
        let mut names = fs
            .read_dir(dir)
            .map_err(|e| QueueError::storage("open", io_ctx(dir, e)))?;
        names.sort();

        let mut removed_tmp = 0usize;
        // Only temp files of item files are ours; a foreign `x.tmp` stays.
        let is_item_tmp = |n: &&String| {
            n.strip_suffix(TMP_SUFFIX)
                .and_then(parse_file_name)
                .is_some()
        };
        for name in names.iter().filter(is_item_tmp) {
            match fs.remove_file(&dir.join(name)) {
                Ok(()) => removed_tmp += 1,
                Err(e) => {
                    tracing::warn!(file = %name, error = %e, "cannot remove leftover temp file")
                }
            }
        }
        if removed_tmp > 0 {
            tracing::info!(count = removed_tmp, "removed leftover temp files");
        }

        let mut index = Index::default();
        let mut bad: Vec<(String, String)> = Vec::new();
        let mut skipped = Skipped::default();
        for name in &names {
            if OWN_ENTRIES.contains(&name.as_str()) || is_item_tmp(&name) {
                continue;
            }
            let Some(id) = parse_file_name(name) else {
                skipped.note(
                    name,
                    "not a queue record (a foreign file or folder); left alone",
                );
                continue;
            };
            let path = dir.join(name);
            let bytes = match self.read_entry(&path) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == io::ErrorKind::IsADirectory => {
                    skipped.note(name, "a directory where an item file should be; left alone");
                    continue;
                }
                // Unreadable twice in a row (a dangling link, a bad
                // sector, no permission): moved aside, not deleted, so
                // the rest of the queue opens and an operator can look.
                // A file gone since the listing fails its move with
                // NotFound, below, and is simply not there.
                Err(e) => {
                    bad.push((name.clone(), format!("cannot be read: {e}")));
                    continue;
                }
            };
            match decode(&bytes, id) {
                Ok(_) if index.entries.contains_key(id) => {
                    bad.push((name.clone(), format!("a second file for id {id}")))
                }
                Ok(item) => index.insert(item, name.clone(), bytes.len() as u64),
                Err(reason) => bad.push((name.clone(), reason)),
            }
        }

        let mut quarantine: BTreeSet<String> = fs
            .read_dir(&self.quarantine_dir)
            .map_err(|e| QueueError::storage("open", io_ctx(&self.quarantine_dir, e)))?
            .into_iter()
            .filter(|n| !n.ends_with(TMP_SUFFIX))
            .collect();
        let now = self.now();
        let stamp = now.timestamp_nanos_opt().unwrap_or(0);
        let mut moved_any = false;
        for (name, reason) in &bad {
            // Prefixed by the time so the oldest sorts first; never
            // overwrite an earlier quarantined record.
            let mut target = format!("{stamp}_{name}");
            let mut n = 1;
            while quarantine.contains(&target) {
                target = format!("{stamp}_{n}_{name}");
                n += 1;
            }
            match fs.rename(&dir.join(name), &self.quarantine_dir.join(&target)) {
                Ok(()) => {
                    tracing::warn!(file = %name, quarantined_as = %target, %reason, "quarantined a bad queue record");
                    quarantine.insert(target);
                    moved_any = true;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    tracing::debug!(file = %name, "queue file vanished during open");
                }
                Err(e) => {
                    tracing::warn!(file = %name, %reason, error = %e, "bad queue record could not be quarantined; skipping it");
                    skipped.count += 1;
                }
            }
        }
        if removed_tmp > 0 || moved_any {
            let synced = fs
                .sync_dir(&self.quarantine_dir)
                .and_then(|_| fs.sync_dir(dir));
            if let Err(e) = synced {
                return Err(QueueError::storage("open", io_ctx(dir, e)));
            }
        }
        skipped.summarize();

        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.index = index;
        inner.quarantine = quarantine;
        inner.skipped_entries = skipped.count;

        // The lock proves no live process holds a claim: every processing
        // item goes back to pending.
        let stuck: Vec<String> = inner
            .index
            .leases
            .iter()
            .map(|(_, id)| id.clone())
            .collect();
        if !stuck.is_empty() {
            let returned = self.change_many(&mut inner, "open", &stuck, now, |item, now| {
                item.release(now)
            })?;
            tracing::info!(
                count = returned.len(),
                "returned items left processing to pending"
            );
        }
        Ok(())
    }

    /// Reads an entry at open, trying once more after a failure other than
    /// "is a directory" or "not found": a one-off I/O error must not send a
    /// good item to the quarantine.
    fn read_entry(&self, path: &Path) -> io::Result<Vec<u8>> {
        match self.fs.read_file(path) {
            Err(e)
                if !matches!(
                    e.kind(),
                    io::ErrorKind::IsADirectory | io::ErrorKind::NotFound
                ) =>
            {
                tracing::debug!(file = %path.display(), error = %e, "reading a queue file failed; trying again");
                self.fs.read_file(path)
            }
            read => read,
        }
    }
}
