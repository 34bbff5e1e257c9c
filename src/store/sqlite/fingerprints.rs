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
//! Cost (measured by `cargo bench --bench scale`, 1,000,000 items, on the
//! 2-core benchmark VM):
//!
//! - memory: 17 bytes per slot of a hash table sized for every item when
//!   it is built (rounded up to a power of two): 36 MB at 1,000,000 items,
//!   20 to 39 bytes per item depending on the count;
//! - time: a scan of the table at each build, about 0.3 s of CPU at
//!   1,000,000 items (two thirds of it SQLite reading the rows), paid by
//!   the first enqueue after open and after each commit by another process
//!   (an admin CLI write, typically).

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};

use rusqlite::Connection;

use super::row::{sql_err, STATUS_PENDING, STATUS_PROCESSING};
use crate::error::QueueResult;

/// Whether an item in `status` takes part in dedupe.
pub(super) fn is_live(status: i64) -> bool {
    status == STATUS_PENDING || status == STATUS_PROCESSING
}

/// The maps' hasher: their keys are already keyed SipHash outputs
/// ([`FingerprintIndex::hash`]), uniformly spread, so hashing them again
/// (what the default hasher does) would only cost time at every one of a
/// rebuild's million inserts.
#[derive(Debug, Default, Clone, Copy)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, key: u64) {
        self.0 = key;
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; anything else still hashes.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
}

/// Rows read between two runs of inserts in a rebuild (64 KiB of pairs).
const INSERT_CHUNK: usize = 4096;

type PassThroughMap<V> = HashMap<u64, V, BuildHasherDefault<PassThrough>>;

/// `hash(fingerprint)` to the rowids of every live item, in two maps so the
/// common entry is 16 bytes (a hash and one rowid) rather than a hash and
/// a list: about 17 bytes per item with hashbrown's control byte, where a
/// map of lists took 33. A hash is in one map or the other, never both.
#[derive(Debug, Default)]
struct Entries {
    /// The hashes held by one live item: almost all (dedupe keeps one live
    /// item per fingerprint).
    single: PassThroughMap<i64>,
    /// The hashes several live items share: after a 64-bit collision, or
    /// when dedupe was off for some items or `revive` made two live.
    shared: PassThroughMap<Vec<i64>>,
}

impl Entries {
    fn with_capacity(items: usize) -> Self {
        Entries {
            single: PassThroughMap::with_capacity_and_hasher(items, Default::default()),
            shared: PassThroughMap::default(),
        }
    }

    fn get(&self, h: u64) -> Vec<i64> {
        match self.single.get(&h) {
            Some(&rowid) => vec![rowid],
            None => self.shared.get(&h).cloned().unwrap_or_default(),
        }
    }

    fn insert(&mut self, h: u64, rowid: i64) {
        if let Some(rowids) = self.shared.get_mut(&h) {
            if !rowids.contains(&rowid) {
                rowids.push(rowid);
            }
            return;
        }
        match self.single.insert(h, rowid) {
            Some(first) if first != rowid => {
                self.single.remove(&h);
                self.shared.insert(h, vec![first, rowid]);
            }
            _ => {}
        }
    }

    /// Inserts and empties `pairs` (hash, rowid).
    fn insert_all(&mut self, pairs: &mut Vec<(u64, i64)>) {
        for (h, rowid) in pairs.drain(..) {
            self.insert(h, rowid);
        }
    }

    fn remove(&mut self, h: u64, rowid: i64) {
        if self.single.get(&h) == Some(&rowid) {
            self.single.remove(&h);
        } else if let Some(rowids) = self.shared.get_mut(&h) {
            rowids.retain(|&r| r != rowid);
            // Back to the compact map when one holder is left.
            if let [only] = rowids[..] {
                self.shared.remove(&h);
                self.single.insert(h, only);
            } else if rowids.is_empty() {
                self.shared.remove(&h);
            }
        }
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.single.is_empty() && self.shared.is_empty()
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
    /// The keys of [`Self::hash`]: random per index (so fingerprints, which
    /// callers may choose, cannot be picked to collide), kept across
    /// rebuilds.
    keys: RandomState,
}

impl FingerprintIndex {
    /// A 64-bit keyed hash of a fingerprint's bytes; collisions only cost
    /// an extra row read.
    fn hash(&self, fingerprint: &[u8]) -> u64 {
        let mut hasher = self.keys.build_hasher();
        hasher.write(fingerprint);
        hasher.finish()
    }

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
        let h = self.hash(fingerprint.as_bytes());
        Ok(self
            .entries
            .as_ref()
            .map(|entries| entries.get(h))
            .unwrap_or_default())
    }

    /// Reads every live item's fingerprint from the table.
    pub(super) fn rebuild(&mut self, conn: &Connection, version: i64) -> QueueResult<()> {
        // Sized up front from the item count (dead letters included, so at
        // most a little too large): growing a map of a million entries
        // step by step rehashes it ~20 times and, at the last step, holds
        // the old and the new table at once.
        let mut entries = Entries::with_capacity(item_count(conn));
        // The old set goes first, so the two are never held together.
        self.entries = None;
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT seq, fingerprint FROM items WHERE status IN ({STATUS_PENDING}, {STATUS_PROCESSING})"
            ))
            .map_err(sql_err("dedupe index"))?;
        let mut rows = stmt.query([]).map_err(sql_err("dedupe index"))?;
        let mut live = 0;
        // Rows are hashed as they are read but inserted a chunk at a time:
        // each insert is a cache miss somewhere in a large table, and a
        // run of them overlaps those misses where one per row, between
        // SQLite's row decoding, waits for each. Measured at 1,000,000
        // items: half the rebuild's CPU time (`benches/scale.rs`).
        let mut chunk: Vec<(u64, i64)> = Vec::with_capacity(INSERT_CHUNK);
        while let Some(row) = rows.next().map_err(sql_err("dedupe index"))? {
            let rowid: i64 = row.get(0).map_err(sql_err("dedupe index"))?;
            // The bytes as stored: no UTF-8 check needed to hash them.
            let fingerprint = row
                .get_ref(1)
                .and_then(|v| v.as_bytes().map_err(Into::into))
                .map_err(sql_err("dedupe index"))?;
            chunk.push((self.hash(fingerprint), rowid));
            if chunk.len() == INSERT_CHUNK {
                entries.insert_all(&mut chunk);
            }
            live += 1;
        }
        entries.insert_all(&mut chunk);
        // Sized for dead letters too: give that room back when they were
        // most of the store.
        if entries.single.capacity() > 2 * live.max(INSERT_CHUNK) {
            entries.single.shrink_to(live);
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
        if self.entries.is_none() {
            return;
        }
        let before = before.filter(|&(_, status)| is_live(status));
        let after = after.filter(|&(_, status)| is_live(status));
        let before = before.map(|(fingerprint, _)| self.hash(fingerprint.as_bytes()));
        let after = after.map(|(fingerprint, _)| self.hash(fingerprint.as_bytes()));
        let Some(entries) = self.entries.as_mut() else {
            return;
        };
        if let Some(h) = before {
            entries.remove(h, rowid);
            self.live = self.live.saturating_sub(1);
        }
        if let Some(h) = after {
            entries.insert(h, rowid);
            self.live += 1;
        }
    }

    /// Live items in the set, when built (for debug builds' cross-checks).
    #[cfg(any(test, debug_assertions))]
    pub(super) fn len(&self) -> Option<usize> {
        self.entries.as_ref().map(|_| self.live)
    }
}

/// How many items the store holds (its `totals` row), to size the set.
/// Only a hint: without it (a table without `totals`, in unit tests) the
/// set grows as it fills.
fn item_count(conn: &Connection) -> usize {
    conn.prepare_cached("SELECT items FROM totals WHERE id = 0")
        .and_then(|mut stmt| stmt.query_row([], |r| r.get::<_, i64>(0)))
        .map_or(0, |n| usize::try_from(n).unwrap_or(0))
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
        let mut entries = Entries::default();
        entries.insert(7, 1);
        entries.insert(7, 1);
        assert_eq!(entries.get(7), vec![1]);
        assert!(entries.shared.is_empty(), "one holder stays compact");
        entries.insert(7, 2);
        entries.insert(7, 2);
        entries.insert(7, 3);
        assert_eq!(entries.get(7), vec![1, 2, 3]);
        assert!(
            !entries.single.contains_key(&7),
            "a hash is in one map only"
        );
        entries.remove(7, 1);
        assert_eq!(entries.get(7), vec![2, 3]);
        entries.remove(7, 2);
        assert_eq!(entries.get(7), vec![3]);
        assert!(entries.shared.is_empty(), "back to the compact map");
        entries.remove(7, 9);
        assert_eq!(entries.get(7), vec![3], "another rowid is not removed");
        entries.remove(7, 3);
        assert!(entries.is_empty());
        entries.remove(7, 3);
        assert!(entries.is_empty());
    }

    #[test]
    fn the_set_is_sized_from_the_totals_row() {
        let conn = table();
        conn.execute_batch(
            "CREATE TABLE totals (id INTEGER PRIMARY KEY, items INTEGER, bytes INTEGER);
             INSERT INTO totals VALUES (0, 5000, 0);",
        )
        .unwrap();
        assert_eq!(item_count(&conn), 5000);
        let mut index = FingerprintIndex::default();
        index.candidates(&conn, "aa").unwrap();
        let capacity = index.entries.as_ref().unwrap().single.capacity();
        assert!(capacity >= 5000, "sized for the store, got {capacity}");
        assert_eq!(item_count(&table()), 0, "no totals row: no hint");
    }

    #[test]
    fn room_taken_for_dead_letters_is_given_back() {
        let conn = table();
        conn.execute_batch(
            "CREATE TABLE totals (id INTEGER PRIMARY KEY, items INTEGER, bytes INTEGER);
             INSERT INTO totals VALUES (0, 100000, 0);",
        )
        .unwrap();
        let mut index = FingerprintIndex::default();
        index.candidates(&conn, "aa").unwrap();
        let capacity = index.entries.as_ref().unwrap().single.capacity();
        assert!(
            (3..100_000).contains(&capacity),
            "3 live items of a store counted at 100,000: got {capacity}"
        );
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
