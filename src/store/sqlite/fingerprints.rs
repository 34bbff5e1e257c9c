//! The dedupe index: which pending or processing item holds a fingerprint,
//! kept in memory beside the writer's connection instead of as a SQLite
//! index.
//!
//! # Why not a SQLite index
//!
//! Fingerprints are hashes, so each new item lands on a random leaf of an
//! on-disk index: one more dirty page, written to the WAL and checkpointed
//! again, for every item. That was about a third of the pages a batch of
//! 4 KiB reports wrote, and a random delete again at acknowledgement.
//!
//! # Why it is safe
//!
//! - **A hit is checked against the database.** The set maps a 64-bit hash
//!   of the fingerprint to the item's rowid; a duplicate is reported only
//!   after that row is read back and has the same fingerprint and a live
//!   status. A hash collision is just a candidate that does not match.
//! - **A miss is trusted only while nothing else wrote.** `PRAGMA
//!   data_version` changes when another connection (the admin CLI, another
//!   process) commits. The set records the value it was built at and is
//!   rebuilt from the table when it differs. It is read once per write
//!   transaction, at its first lookup: while this connection holds the
//!   write lock no other can commit, so the value cannot move until the
//!   transaction ends.
//! - **A rollback forgets it.** When a transaction fails, the store drops
//!   the set, and the next lookup rebuilds it from what was committed.
//! - It is built lazily, on the first lookup: opening a store, or a store
//!   with dedupe off, never scans the table for it.
//!
//! Cost: about 50 bytes per live item (a hash map of two integers), and a
//! scan of the table at each build: about 80 ms for 100,000 items on the
//! benchmark VM, paid by the first enqueue after open and after each commit
//! by another process (an admin CLI write, typically).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use rusqlite::Connection;

use super::{sql_err, STATUS_PENDING, STATUS_PROCESSING};
use crate::error::QueueResult;

/// Whether an item in `status` takes part in dedupe.
pub(super) fn is_live(status: i64) -> bool {
    status == STATUS_PENDING || status == STATUS_PROCESSING
}

/// A 64-bit hash of a fingerprint. Stable within a process, which is all an
/// in-memory set needs; collisions only cost an extra row read.
fn hash(fingerprint: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    fingerprint.hash(&mut hasher);
    hasher.finish()
}

/// The rowids of the live items whose fingerprints share one hash: almost
/// always one (dedupe keeps one live item per fingerprint), more after a
/// hash collision or when dedupe was off for some items.
#[derive(Debug, Clone, PartialEq)]
enum Rowids {
    One(i64),
    Many(Vec<i64>),
}

impl Rowids {
    fn as_slice(&self) -> &[i64] {
        match self {
            Rowids::One(rowid) => std::slice::from_ref(rowid),
            Rowids::Many(rowids) => rowids,
        }
    }
}

/// `hash(fingerprint)` to rowids of every live item.
type Entries = HashMap<u64, Rowids>;

fn insert(entries: &mut Entries, h: u64, rowid: i64) {
    match entries.get_mut(&h) {
        None => {
            entries.insert(h, Rowids::One(rowid));
        }
        Some(Rowids::One(first)) if *first != rowid => {
            let first = *first;
            entries.insert(h, Rowids::Many(vec![first, rowid]));
        }
        Some(Rowids::Many(rowids)) if !rowids.contains(&rowid) => rowids.push(rowid),
        Some(_) => {}
    }
}

fn remove(entries: &mut Entries, h: u64, rowid: i64) {
    let emptied = match entries.get_mut(&h) {
        Some(Rowids::One(only)) => *only == rowid,
        Some(Rowids::Many(rowids)) => {
            rowids.retain(|&r| r != rowid);
            rowids.is_empty()
        }
        None => false,
    };
    if emptied {
        entries.remove(&h);
    }
}

/// The in-memory dedupe index of one connection. See the module docs.
#[derive(Debug, Default)]
pub(super) struct FingerprintIndex {
    /// Every live item by fingerprint hash; `None` until built or after it
    /// was invalidated.
    entries: Option<Entries>,
    /// Live items in `entries`.
    live: usize,
    /// `PRAGMA data_version` when `entries` last matched the database.
    data_version: i64,
    /// `data_version` was checked in the open write transaction.
    checked_in_transaction: bool,
}

impl FingerprintIndex {
    /// Forgets the set (after a rollback); the next lookup rebuilds it.
    pub(super) fn invalidate(&mut self) {
        self.entries = None;
    }

    /// The write transaction ended (committed or rolled back): other
    /// connections may commit again, so the next lookup checks
    /// `data_version` again.
    pub(super) fn end_transaction(&mut self) {
        self.checked_in_transaction = false;
    }

    /// Rowids whose fingerprint may be `fingerprint`, as of the database
    /// `conn` sees now (rebuilding the set first when it may be stale).
    /// Only inside a write transaction that ends with
    /// [`Self::end_transaction`].
    pub(super) fn candidates(
        &mut self,
        conn: &Connection,
        fingerprint: &str,
    ) -> QueueResult<Vec<i64>> {
        if self.entries.is_none() || !self.checked_in_transaction {
            let version = data_version(conn)?;
            if self.entries.is_none() || version != self.data_version {
                self.rebuild(conn, version)?;
            }
            self.checked_in_transaction = true;
        }
        Ok(self
            .entries
            .as_ref()
            .and_then(|entries| entries.get(&hash(fingerprint)))
            .map(|rowids| rowids.as_slice().to_vec())
            .unwrap_or_default())
    }

    /// Reads every live item's fingerprint from the table.
    pub(super) fn rebuild(&mut self, conn: &Connection, version: i64) -> QueueResult<()> {
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT seq, fingerprint FROM items WHERE status IN ({STATUS_PENDING}, {STATUS_PROCESSING})"
            ))
            .map_err(sql_err("dedupe index"))?;
        let mut rows = stmt.query([]).map_err(sql_err("dedupe index"))?;
        let mut entries = Entries::new();
        let mut live = 0;
        while let Some(row) = rows.next().map_err(sql_err("dedupe index"))? {
            let rowid: i64 = row.get(0).map_err(sql_err("dedupe index"))?;
            let fingerprint: &str = row
                .get_ref(1)
                .and_then(|v| v.as_str().map_err(Into::into))
                .map_err(sql_err("dedupe index"))?;
            insert(&mut entries, hash(fingerprint), rowid);
            live += 1;
        }
        tracing::debug!(live_items = live, "built the dedupe index");
        self.entries = Some(entries);
        self.live = live;
        self.data_version = version;
        Ok(())
    }

    /// Records that the row `rowid` changed from `before` to `after`
    /// (fingerprint and status; `None` when the row did not or no longer
    /// exists). A no-op while the set is not built.
    pub(super) fn record(
        &mut self,
        rowid: i64,
        before: Option<(&str, i64)>,
        after: Option<(&str, i64)>,
    ) {
        let Some(entries) = self.entries.as_mut() else {
            return;
        };
        if let Some((fingerprint, status)) = before {
            if is_live(status) {
                remove(entries, hash(fingerprint), rowid);
                self.live = self.live.saturating_sub(1);
            }
        }
        if let Some((fingerprint, status)) = after {
            if is_live(status) {
                insert(entries, hash(fingerprint), rowid);
                self.live += 1;
            }
        }
    }

    /// Live items in the set, when built (for debug builds' cross-checks).
    #[cfg(any(test, debug_assertions))]
    pub(super) fn len(&self) -> Option<usize> {
        self.entries.as_ref().map(|_| self.live)
    }
}

/// `PRAGMA data_version`: changes when another connection commits.
fn data_version(conn: &Connection) -> QueueResult<i64> {
    conn.prepare_cached("PRAGMA data_version")
        .and_then(|mut stmt| stmt.query_row([], |r| r.get(0)))
        .map_err(sql_err("dedupe index"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE items (seq INTEGER PRIMARY KEY, fingerprint TEXT NOT NULL, status INTEGER NOT NULL);
             INSERT INTO items VALUES (1, 'aa', 0), (2, 'bb', 1), (3, 'cc', 2), (4, 'aa', 1);",
        )
        .unwrap();
        conn
    }

    #[test]
    fn builds_from_live_rows_only() {
        let conn = table();
        let mut index = FingerprintIndex::default();
        assert_eq!(index.len(), None, "not built before the first lookup");
        let mut aa = index.candidates(&conn, "aa").unwrap();
        aa.sort();
        assert_eq!(aa, vec![1, 4]);
        assert_eq!(index.candidates(&conn, "bb").unwrap(), vec![2]);
        assert!(
            index.candidates(&conn, "cc").unwrap().is_empty(),
            "dead letter"
        );
        assert!(index.candidates(&conn, "zz").unwrap().is_empty());
        assert_eq!(index.len(), Some(3));
    }

    #[test]
    fn records_status_and_fingerprint_changes() {
        let conn = table();
        let mut index = FingerprintIndex::default();
        index.candidates(&conn, "aa").unwrap();
        // 2 is dead-lettered, 3 revived with a new fingerprint, 5 inserted.
        index.record(2, Some(("bb", 1)), Some(("bb", 2)));
        index.record(3, Some(("cc", 2)), Some(("dd", 0)));
        index.record(5, None, Some(("ee", 0)));
        index.record(1, Some(("aa", 0)), None);
        assert!(index.candidates(&conn, "bb").unwrap().is_empty());
        assert_eq!(index.candidates(&conn, "dd").unwrap(), vec![3]);
        assert_eq!(index.candidates(&conn, "ee").unwrap(), vec![5]);
        assert_eq!(index.candidates(&conn, "aa").unwrap(), vec![4]);
    }

    #[test]
    fn shared_hashes_keep_every_rowid() {
        let mut entries = Entries::new();
        insert(&mut entries, 7, 1);
        insert(&mut entries, 7, 2);
        insert(&mut entries, 7, 2);
        assert_eq!(entries[&7], Rowids::Many(vec![1, 2]));
        remove(&mut entries, 7, 1);
        assert_eq!(entries[&7].as_slice(), &[2]);
        remove(&mut entries, 7, 2);
        assert!(entries.is_empty());
        remove(&mut entries, 7, 2);
        assert!(entries.is_empty());
    }

    #[test]
    fn another_connections_commit_forces_a_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fp.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE items (seq INTEGER PRIMARY KEY, fingerprint TEXT NOT NULL, status INTEGER NOT NULL);
             INSERT INTO items VALUES (1, 'aa', 0);",
        )
        .unwrap();
        let mut index = FingerprintIndex::default();
        assert_eq!(index.candidates(&conn, "aa").unwrap(), vec![1]);
        // As the store does when its write transaction ends.
        index.end_transaction();
        let other = Connection::open(&path).unwrap();
        other
            .execute_batch("DELETE FROM items; INSERT INTO items VALUES (7, 'bb', 0);")
            .unwrap();
        assert!(index.candidates(&conn, "aa").unwrap().is_empty());
        assert_eq!(index.candidates(&conn, "bb").unwrap(), vec![7]);
    }

    #[test]
    fn invalidate_rebuilds_from_the_table() {
        let conn = table();
        let mut index = FingerprintIndex::default();
        index.candidates(&conn, "aa").unwrap();
        // A change the table never saw (as after a rollback)...
        index.record(9, None, Some(("zz", 0)));
        assert_eq!(index.candidates(&conn, "zz").unwrap(), vec![9]);
        index.invalidate();
        // ...is gone once the set is rebuilt.
        assert!(index.candidates(&conn, "zz").unwrap().is_empty());
    }
}
