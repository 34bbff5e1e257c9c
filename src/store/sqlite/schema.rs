//! The schema: the tables and indexes this build writes, its version in
//! `PRAGMA user_version`, and the migrations from every older version (the
//! history is in the module documentation of `sqlite`).

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use crate::error::{QueueError, QueueResult};

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: i64 = 3;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    item_type TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    last_error TEXT NOT NULL,
    last_attempt INTEGER,
    next_retry INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    agent_id TEXT NOT NULL,
    scanner_name TEXT NOT NULL,
    target_path TEXT NOT NULL,
    lease_until INTEGER,
    attributes TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    lease_owner TEXT
);
CREATE TABLE IF NOT EXISTS payloads (
    seq INTEGER PRIMARY KEY,
    body BLOB NOT NULL,
    checksum INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    qid INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    quarantined_at INTEGER NOT NULL,
    body BLOB
);
-- Running item count and byte total, updated inside the same
-- transaction as the change (so a rollback undoes them too): limits
-- are checked without scanning the table. Inserts and deletes add up
-- their change and write it once, before the commit: a trigger on them
-- would run for every row and make each delete keep a statement journal.
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    items INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals (id, items, bytes)
    SELECT 0, COUNT(*), COALESCE(SUM(size_bytes), 0) FROM items;
CREATE TRIGGER IF NOT EXISTS totals_resize AFTER UPDATE OF size_bytes ON items BEGIN
    UPDATE totals SET bytes = bytes - OLD.size_bytes + NEW.size_bytes WHERE id = 0;
END;
CREATE INDEX IF NOT EXISTS items_ready ON items(next_retry, created_at, id) WHERE status = 0;
CREATE INDEX IF NOT EXISTS items_leased ON items(lease_until) WHERE status = 1;
CREATE INDEX IF NOT EXISTS items_created ON items(created_at, id);
CREATE INDEX IF NOT EXISTS items_dead ON items(created_at, id) WHERE status = 2;
";

/// Schema 1 to 2, first half: the old indexes and triggers go (schema 2
/// reuses some of their names) and the old tables step aside, so `SCHEMA`
/// can create schema 2's. Runs in the migration's transaction.
pub(super) const MIGRATE_1_TO_2_BEFORE: &str = "
DROP INDEX IF EXISTS items_ready;
DROP INDEX IF EXISTS items_fingerprint;
DROP INDEX IF EXISTS items_created;
DROP INDEX IF EXISTS items_lease;
DROP TRIGGER IF EXISTS totals_insert;
DROP TRIGGER IF EXISTS totals_delete;
DROP TRIGGER IF EXISTS totals_resize;
ALTER TABLE items RENAME TO items_v1;
ALTER TABLE payloads RENAME TO payloads_v1;
";

/// Schema 1 to 2, second half (after `SCHEMA`): rows move over in creation
/// order, each payload to its item's new `seq`, and the totals are counted
/// afresh.
pub(super) const MIGRATE_1_TO_2_AFTER: &str = "
INSERT INTO items (id, item_type, fingerprint, status, attempts, max_attempts, last_error,
    last_attempt, next_retry, created_at, updated_at, agent_id, scanner_name, target_path,
    lease_until, attributes, size_bytes)
    SELECT id, item_type, fingerprint, status, attempts, max_attempts, last_error,
    last_attempt, next_retry, created_at, updated_at, agent_id, scanner_name, target_path,
    lease_until, attributes, size_bytes FROM items_v1 ORDER BY created_at, id;
INSERT INTO payloads (seq, body, checksum)
    SELECT i.seq, p.body, p.checksum FROM payloads_v1 p JOIN items i ON i.id = p.id;
DROP TABLE items_v1;
DROP TABLE payloads_v1;
UPDATE totals SET items = (SELECT COUNT(*) FROM items),
    bytes = (SELECT COALESCE(SUM(size_bytes), 0) FROM items) WHERE id = 0;
";

/// Schema 2 to 3: claims record the instance that made them, so a new
/// daemon can release its predecessors' leases at once (schema 2 rows get
/// no owner, which every owner treats as not its own).
pub(super) const MIGRATE_2_TO_3: &str = "ALTER TABLE items ADD COLUMN lease_owner TEXT;";

/// Brings a database at schema `from` (0: new) to [`SCHEMA_VERSION`] in
/// one transaction: a crash midway leaves the old version whole.
pub(super) fn migrate(conn: &mut Connection, from: i64, path: &Path) -> QueueResult<()> {
    let failed = |e: rusqlite::Error| {
        QueueError::storage(
            "migrate",
            format!(
                "{} from schema {from} to {SCHEMA_VERSION} (nothing was changed): {e}",
                path.display()
            ),
        )
    };
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(failed)?;
    // Read again under the write lock: another process opening the same
    // database may have migrated it since `from` was read, and steps such
    // as adding a column must not run twice.
    let from: i64 = tx
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(failed)?;
    if from >= SCHEMA_VERSION {
        return Ok(());
    }
    if from == 1 {
        tracing::info!(path = %path.display(), "migrating the queue database from schema 1 to 2");
        tx.execute_batch(MIGRATE_1_TO_2_BEFORE).map_err(failed)?;
    }
    if from == 2 {
        tracing::info!(path = %path.display(), "migrating the queue database from schema 2 to 3");
        tx.execute_batch(MIGRATE_2_TO_3).map_err(failed)?;
    }
    tx.execute_batch(SCHEMA).map_err(failed)?;
    if from == 1 {
        tx.execute_batch(MIGRATE_1_TO_2_AFTER).map_err(failed)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(failed)?;
    tx.commit().map_err(failed)
}
