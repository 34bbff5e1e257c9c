//! The in-memory index: everything the directory holds, rebuilt at open
//! and kept in step by every commit, so that no call after the open scans
//! the directory.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};

use crate::error::{QueueError, QueueResult};
use crate::item::{ItemStatus, QueueItem};

/// One indexed item: its state, file name and size on disk.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) item: QueueItem,
    pub(super) file: String,
    pub(super) disk_len: u64,
}

pub(super) type ReadyKey = (DateTime<Utc>, DateTime<Utc>, String);

/// The in-memory index of everything in the directory.
#[derive(Debug, Default)]
pub(super) struct Index {
    pub(super) entries: HashMap<String, Entry>,
    /// Fingerprint -> IDs of pending and processing items with it.
    pub(super) by_fingerprint: HashMap<String, BTreeSet<String>>,
    /// Pending items in claim order.
    pub(super) ready: BTreeSet<ReadyKey>,
    /// Processing items by lease expiry (no lease sorts first: expired).
    pub(super) leases: BTreeSet<(DateTime<Utc>, String)>,
    /// All items by creation.
    pub(super) by_age: BTreeSet<(DateTime<Utc>, String)>,
    /// Dead letters by creation.
    pub(super) dead_by_age: BTreeSet<(DateTime<Utc>, String)>,
    pub(super) total_bytes: u64,
    pub(super) disk_bytes: u64,
}

pub(super) fn ready_key(item: &QueueItem) -> ReadyKey {
    (item.next_retry, item.created_at, item.id.to_string())
}

pub(super) fn lease_key(item: &QueueItem) -> (DateTime<Utc>, String) {
    (
        item.lease_until().unwrap_or(DateTime::<Utc>::MIN_UTC),
        item.id.to_string(),
    )
}

impl Index {
    pub(super) fn insert(&mut self, item: QueueItem, file: String, disk_len: u64) {
        self.remove(&item.id);
        let id = item.id.to_string();
        self.by_age.insert((item.created_at, id.clone()));
        match item.status() {
            ItemStatus::Pending => {
                self.ready.insert(ready_key(&item));
            }
            ItemStatus::Processing => {
                self.leases.insert(lease_key(&item));
            }
            ItemStatus::Failed => {
                self.dead_by_age.insert((item.created_at, id.clone()));
            }
        }
        if item.status() != ItemStatus::Failed {
            self.by_fingerprint
                .entry(item.fingerprint.clone())
                .or_default()
                .insert(id.clone());
        }
        self.total_bytes += item.size_bytes();
        self.disk_bytes += disk_len;
        self.entries.insert(
            id,
            Entry {
                item,
                file,
                disk_len,
            },
        );
    }

    pub(super) fn remove(&mut self, id: &str) -> Option<Entry> {
        let entry = self.entries.remove(id)?;
        let item = &entry.item;
        self.by_age.remove(&(item.created_at, item.id.to_string()));
        match item.status() {
            ItemStatus::Pending => {
                self.ready.remove(&ready_key(item));
            }
            ItemStatus::Processing => {
                self.leases.remove(&lease_key(item));
            }
            ItemStatus::Failed => {
                self.dead_by_age
                    .remove(&(item.created_at, item.id.to_string()));
            }
        }
        if let Some(ids) = self.by_fingerprint.get_mut(&item.fingerprint) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_fingerprint.remove(&item.fingerprint);
            }
        }
        self.total_bytes = self.total_bytes.saturating_sub(item.size_bytes());
        self.disk_bytes = self.disk_bytes.saturating_sub(entry.disk_len);
        Some(entry)
    }

    pub(super) fn get(&self, id: &str) -> QueueResult<&Entry> {
        self.entries
            .get(id)
            .ok_or_else(|| QueueError::not_found(id))
    }

    /// IDs of pending items due at `now`, in claim order.
    pub(super) fn due(&self, now: DateTime<Utc>) -> impl Iterator<Item = &String> {
        self.ready
            .iter()
            .take_while(move |(next, _, _)| *next <= now)
            .map(|(_, _, id)| id)
    }
}
