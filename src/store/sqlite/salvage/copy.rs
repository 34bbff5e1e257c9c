//! The salvage of a damaged file: building the fresh database, finding
//! every rowid the damaged one still yields and copying each row alone,
//! and swapping the files (steps 1 to 4 in the documentation of
//! `salvage`). Also the `salvages` table that records each one.

use std::collections::BTreeSet;
use std::path::Path;

use chrono::{DateTime, Utc};
use rusqlite::config::DbConfig;
use rusqlite::types::Value;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension};

use super::super::row::{load_sql, to_nanos, Loaded};
use super::super::schema::{migrate, SCHEMA_VERSION};
use super::{
    aside_path, is_corrupt_sqlite, open_damaged, read_row_or_bad, sql_error, value_bytes,
    with_suffix, SalvageReport, SCAN_PAGE,
};
use crate::error::{QueueError, QueueResult};

/// Salvages the database at `path` (see the module documentation), which
/// no connection of this process may hold. `cause` says why.
pub(super) fn salvage_file(path: &Path, cause: &str) -> QueueResult<SalvageReport> {
    let op = "salvage";
    let io = |what: &str, p: &Path, e: std::io::Error| {
        QueueError::storage(op, format!("{what} {}: {e}", p.display()))
    };
    let now = Utc::now();
    let aside = aside_path(path, now);
    let mut report = SalvageReport {
        path: path.to_path_buf(),
        moved_to: Some(aside.clone()),
        cause: cause.to_owned(),
        ..SalvageReport::default()
    };
    let tmp = with_suffix(path, ".salvage-tmp");
    let scratch = with_suffix(path, ".salvage-scratch");
    for leftover in ["", "-journal", "-wal", "-shm"] {
        // A salvage that crashed midway left these; they hold nothing new.
        for p in [with_suffix(&tmp, leftover), with_suffix(&scratch, leftover)] {
            if p.exists() {
                std::fs::remove_file(&p).map_err(|e| io("removing", &p, e))?;
            }
        }
    }
    {
        let mut fresh = Connection::open(&tmp).map_err(sql_error(op))?;
        super::super::private_files::set_private_file(&tmp)?;
        migrate(&mut fresh, 0, &tmp)?;
        // Read from a copy with its schema text restored when the damage hit
        // that text: otherwise SQLite cannot name a single table in it.
        let source = match restore_schema_copy(path, &scratch, &fresh) {
            Ok(true) => scratch.clone(),
            Ok(false) => path.to_path_buf(),
            Err(e) => {
                tracing::warn!(error = %e, "salvage: cannot restore the damaged schema text");
                path.to_path_buf()
            }
        };
        let tx = fresh.transaction().map_err(sql_error(op))?;
        tx.execute_batch(SALVAGES_TABLE).map_err(sql_error(op))?;
        match open_damaged(&source) {
            Ok(old) => {
                copy_items(&old, &tx, now, &mut report)?;
                copy_quarantine(&old, &tx, &mut report)?;
                copy_salvage_history(&old, &tx);
            }
            Err(e) => {
                report.cause = format!("{cause}; the damaged file cannot be opened: {e}");
            }
        }
        tx.execute(
            "UPDATE totals SET items = (SELECT COUNT(*) FROM items), \
             bytes = (SELECT COALESCE(SUM(size_bytes), 0) FROM items) WHERE id = 0",
            [],
        )
        .map_err(sql_error(op))?;
        tx.execute(
            "INSERT INTO salvages (at, moved_to, salvaged, quarantined, lost, cause) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                to_nanos(now),
                aside.display().to_string(),
                report.salvaged as i64,
                report.quarantined as i64,
                report.lost as i64,
                report.cause
            ],
        )
        .map_err(sql_error(op))?;
        tx.commit().map_err(sql_error(op))?;
        fresh.close().map_err(|(_, e)| QueueError::storage(op, e))?;
    }
    for suffix in ["", "-wal", "-shm"] {
        // Only a copy: the damaged original is what moves aside.
        let _ = std::fs::remove_file(with_suffix(&scratch, suffix));
    }
    swap_files(path, &tmp, &aside).map_err(|e| io("moving aside", path, e))?;
    sync_parent(path).map_err(|e| io("syncing the folder of", path, e))?;
    let log_counts = |r: &SalvageReport| {
        format!(
            "{} items salvaged, {} quarantined, {} lost ({} never found), \
             {} quarantine rows kept, {} lost",
            r.salvaged,
            r.quarantined,
            r.lost,
            r.lost_unseen,
            r.quarantine_rows_kept,
            r.quarantine_rows_lost
        )
    };
    if report.lost > 0 || report.quarantine_rows_lost > 0 {
        tracing::error!(path = %path.display(), moved_to = %aside.display(),
            "salvaged a corrupt queue database: {}", log_counts(&report));
    } else {
        tracing::warn!(path = %path.display(), moved_to = %aside.display(),
            "salvaged a corrupt queue database: {}", log_counts(&report));
    }
    Ok(report)
}

/// Moves the damaged file and its WAL and shared-memory index aside, then
/// renames the fresh file into place. The damaged file is linked aside
/// first, so its name never stands empty (an open would create an empty
/// store there), and the last rename replaces it atomically. On failure it
/// moves back what it moved.
fn swap_files(path: &Path, fresh: &Path, aside: &Path) -> std::io::Result<()> {
    let linked = std::fs::hard_link(path, aside).is_ok();
    if !linked {
        // A file system without hard links: a plain move, and a short
        // moment without a file under the store's name.
        std::fs::rename(path, aside)?;
    }
    let mut moved = Vec::new();
    let mut rest = || -> std::io::Result<()> {
        for suffix in ["-wal", "-shm"] {
            let from = with_suffix(path, suffix);
            if from.exists() {
                let to = with_suffix(aside, suffix);
                std::fs::rename(&from, &to)?;
                moved.push((from, to));
            }
        }
        std::fs::rename(fresh, path)
    };
    let result = rest();
    if result.is_err() {
        for (from, to) in moved.iter().rev() {
            let _ = std::fs::rename(to, from);
        }
        let _ = if linked {
            std::fs::remove_file(aside)
        } else {
            std::fs::rename(aside, path)
        };
    }
    result
}

/// One row of `sqlite_master`, its text columns read whatever the damage
/// left in them.
#[derive(Debug, Clone, PartialEq)]
struct SchemaRow {
    rowid: i64,
    kind: String,
    name: String,
    table: String,
    sql: Option<String>,
}

fn schema_rows(conn: &Connection) -> rusqlite::Result<Vec<SchemaRow>> {
    let text = |v: Value| value_bytes(v).map(|b| String::from_utf8_lossy(&b).into_owned());
    let mut stmt =
        conn.prepare("SELECT rowid, type, name, tbl_name, sql FROM sqlite_master ORDER BY rowid")?;
    let rows = stmt.query_map([], |r| {
        Ok(SchemaRow {
            rowid: r.get(0)?,
            kind: text(r.get(1)?).unwrap_or_default(),
            name: text(r.get(2)?).unwrap_or_default(),
            table: text(r.get(3)?).unwrap_or_default(),
            sql: text(r.get(4)?),
        })
    })?;
    rows.collect()
}

/// When SQLite cannot parse the damaged file's schema, writes a copy of
/// the file to `scratch` with the schema rows restored from `fresh` (a new
/// database at the same schema version), keeping each table's root page.
/// Returns whether it did: `false` when the schema parses, or when the
/// file is at another version, whose exact text this build does not know.
fn restore_schema_copy(path: &Path, scratch: &Path, fresh: &Connection) -> rusqlite::Result<bool> {
    {
        let probe = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        probe.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
        probe.pragma_update(None, "query_only", true)?;
        match probe.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| {
            r.get::<_, i64>(0)
        }) {
            Err(e)
                if is_corrupt_sqlite(&e) && e.to_string().contains("malformed database schema") => {
            }
            _ => return Ok(false),
        }
    }
    let old = open_damaged(path)?;
    let version: i64 = old.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version != SCHEMA_VERSION {
        return Ok(false);
    }
    let damaged = schema_rows(&old)?;
    drop(old);
    let wanted = schema_rows(fresh)?;
    // The same script created both, in the same order: pair rows by
    // position when the counts agree, else by name.
    let pairs: Vec<(&SchemaRow, &SchemaRow)> = if damaged.len() == wanted.len() {
        damaged.iter().zip(&wanted).collect()
    } else {
        damaged
            .iter()
            .filter_map(|d| wanted.iter().find(|w| w.name == d.name).map(|w| (d, w)))
            .collect()
    };
    let fixes: Vec<(i64, &SchemaRow)> = pairs
        .into_iter()
        .filter(|(d, w)| {
            (&d.kind, &d.name, &d.table, &d.sql) != (&w.kind, &w.name, &w.table, &w.sql)
        })
        .map(|(d, w)| (d.rowid, w))
        .collect();
    if fixes.is_empty() {
        return Ok(false);
    }
    let io = |e: std::io::Error| rusqlite::Error::ToSqlConversionFailure(Box::new(e));
    std::fs::copy(path, scratch).map_err(io)?;
    let wal = with_suffix(path, "-wal");
    if wal.exists() {
        std::fs::copy(&wal, with_suffix(scratch, "-wal")).map_err(io)?;
    }
    let copy = Connection::open(scratch)?;
    copy.pragma_update(None, "writable_schema", true)?;
    for (rowid, row) in &fixes {
        tracing::warn!(entry = %row.name, "salvage: restoring damaged schema text");
        copy.execute(
            "UPDATE sqlite_master SET type = ?2, name = ?3, tbl_name = ?4, sql = ?5 WHERE rowid = ?1",
            params![rowid, row.kind, row.name, row.table, row.sql],
        )?;
    }
    copy.close().map_err(|(_, e)| e)?;
    Ok(true)
}

#[cfg(unix)]
fn sync_parent(path: &Path) -> std::io::Result<()> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(parent)?.sync_all()
}

#[cfg(not(unix))]
fn sync_parent(_path: &Path) -> std::io::Result<()> {
    Ok(())
}

/// One row per salvage this database came out of (its own and its
/// predecessors'); `stats` sums them.
const SALVAGES_TABLE: &str = "CREATE TABLE IF NOT EXISTS salvages (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    moved_to TEXT NOT NULL,
    salvaged INTEGER NOT NULL,
    quarantined INTEGER NOT NULL,
    lost INTEGER NOT NULL,
    cause TEXT NOT NULL
);";

/// Items salvaged and lost by every salvage recorded in this database.
pub(in crate::store::sqlite) fn recorded(conn: &Connection) -> QueueResult<(u64, u64)> {
    let op = "stats";
    let exists: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'salvages'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(sql_error(op))?;
    if exists.is_none() {
        return Ok((0, 0));
    }
    let (salvaged, lost): (i64, i64) = conn
        .query_row(
            "SELECT COALESCE(SUM(salvaged), 0), COALESCE(SUM(lost), 0) FROM salvages",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(sql_error(op))?;
    Ok((salvaged.max(0) as u64, lost.max(0) as u64))
}

/// A table's column names; empty when the schema cannot be read.
fn columns(conn: &Connection, table: &str) -> Vec<String> {
    let read = || -> rusqlite::Result<Vec<String>> {
        let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})"))?;
        let names = stmt.query_map([], |r| r.get::<_, String>(1))?;
        names.collect()
    };
    read().unwrap_or_default()
}

/// Runs a query yielding one integer per row with `param`; returns what it
/// read and whether it stopped on an error.
fn read_keys(conn: &Connection, sql: &str, param: i64) -> (Vec<i64>, bool) {
    let mut keys = Vec::new();
    let Ok(mut stmt) = conn.prepare(sql) else {
        return (keys, true);
    };
    let Ok(mut rows) = stmt.query([param]) else {
        return (keys, true);
    };
    loop {
        match rows.next() {
            Ok(Some(row)) => match row.get::<_, i64>(0) {
                Ok(key) => keys.push(key),
                Err(_) => return (keys, true),
            },
            Ok(None) => return (keys, false),
            Err(_) => return (keys, true),
        }
    }
}

/// Every integer key `key` of `table` that scans still reach. A forward
/// scan that fails skips ahead (doubling its step) past the bad page, and
/// each landing after a skip scans backward too, so the rows between the
/// bad page and the landing are found as well.
fn rowids(conn: &Connection, table: &str, key: &str) -> BTreeSet<i64> {
    let forward =
        format!("SELECT {key} FROM {table} WHERE {key} > ?1 ORDER BY {key} LIMIT {SCAN_PAGE}");
    let backward =
        format!("SELECT {key} FROM {table} WHERE {key} < ?1 ORDER BY {key} DESC LIMIT {SCAN_PAGE}");
    let mut found = BTreeSet::new();
    let scan_back_from = |from: i64, found: &mut BTreeSet<i64>| {
        let mut before = from;
        loop {
            let (keys, failed) = read_keys(conn, &backward, before);
            let mut reached_known = false;
            for &k in &keys {
                reached_known |= !found.insert(k);
            }
            match keys.last() {
                Some(&last) if !failed && !reached_known && keys.len() == SCAN_PAGE => {
                    before = last
                }
                _ => return,
            }
        }
    };
    scan_back_from(i64::MAX, &mut found);
    // Rowids start at 1: a skip that began at i64::MIN would double its
    // way through empty keys and never reach them.
    let mut after = 0;
    let mut step: i64 = 1;
    let mut skipped = false;
    loop {
        let (keys, failed) = read_keys(conn, &forward, after);
        if skipped {
            if let Some(&first) = keys.first() {
                scan_back_from(first, &mut found);
            }
        }
        found.extend(keys.iter().copied());
        if let Some(&last) = keys.last() {
            after = last;
        }
        if failed {
            // The page after `after` fails: jump over it.
            match after.checked_add(step) {
                Some(next) if step < 1 << 40 => {
                    after = next;
                    step = step.saturating_mul(2);
                    skipped = true;
                }
                _ => break,
            }
        } else if keys.len() < SCAN_PAGE {
            break;
        } else {
            step = 1;
            skipped = false;
        }
    }
    found
}

/// Rowids of items listed by the `items_created` index (which covers all
/// items), scanned from both ends until each fails.
fn indexed_rowids(conn: &Connection) -> BTreeSet<i64> {
    let mut found = BTreeSet::new();
    for order in ["ASC", "DESC"] {
        let sql = format!(
            "SELECT seq FROM items INDEXED BY items_created WHERE ?1 IS NOT NULL \
             ORDER BY created_at {order}, id {order}"
        );
        found.extend(read_keys(conn, &sql, 0).0);
    }
    found
}

/// Copies every item it can read from `old` into `fresh` (see the module
/// documentation). Fails only when the fresh database refuses a write.
fn copy_items(
    old: &Connection,
    fresh: &rusqlite::Transaction<'_>,
    now: DateTime<Utc>,
    report: &mut SalvageReport,
) -> QueueResult<()> {
    let op = "salvage";
    let old_columns = columns(old, "items");
    let copied: Vec<String> = columns(fresh, "items")
        .into_iter()
        .filter(|c| old_columns.contains(c))
        .collect();
    if !copied.iter().any(|c| c == "seq") || !copied.iter().any(|c| c == "id") {
        // Not even the table's layout could be read: count what totals says.
        report.lost_unseen = expected_items(old).unwrap_or(0);
        report.lost = report.lost_unseen;
        return Ok(());
    }
    let column_list = copied.join(", ");
    let select_item = format!("SELECT {column_list} FROM items WHERE seq = ?1");
    let placeholders = (1..=copied.len())
        .map(|n| format!("?{n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let insert_item = format!("INSERT INTO items ({column_list}) VALUES ({placeholders})");
    // Schema 1 keyed payloads by the item's ID, later schemas by its rowid.
    let payload_by_seq = columns(old, "payloads").iter().any(|c| c == "seq");
    let id_index = copied.iter().position(|c| c == "id").unwrap_or(0);
    let mut seqs = rowids(old, "items", "seq");
    seqs.extend(indexed_rowids(old));
    let max_seq = seqs.last().copied().unwrap_or(0);
    let mut known_lost = 0u64;
    for seq in seqs {
        let values: Option<Vec<Value>> = match old
            .query_row(&select_item, [seq], |r| {
                (0..copied.len()).map(|i| r.get::<_, Value>(i)).collect()
            })
            .optional()
        {
            Ok(values) => values,
            Err(e) => {
                tracing::warn!(rowid = seq, error = %e, "salvage: item row unreadable, lost");
                known_lost += 1;
                continue;
            }
        };
        let Some(values) = values else {
            // Listed by an index, but the row is gone: what the index
            // pointed at was on a damaged page.
            known_lost += 1;
            continue;
        };
        let id = match &values[id_index] {
            Value::Text(id) => id.clone(),
            _ => format!("(unreadable id at row {seq})"),
        };
        let payload = if payload_by_seq {
            old.query_row(
                "SELECT body, checksum FROM payloads WHERE seq = ?1",
                [seq],
                |r| Ok((r.get::<_, Value>(0)?, r.get::<_, Value>(1)?)),
            )
        } else {
            old.query_row(
                "SELECT body, checksum FROM payloads WHERE id = ?1",
                [&id],
                |r| Ok((r.get::<_, Value>(0)?, r.get::<_, Value>(1)?)),
            )
        }
        .optional();
        let mut verdict = match fresh.execute(&insert_item, rusqlite::params_from_iter(&values)) {
            Ok(_) => None,
            Err(e) if e.sqlite_error_code() == Some(ErrorCode::ConstraintViolation) => {
                Some(format!("cannot be stored again after corruption: {e}"))
            }
            Err(e) => return Err(QueueError::storage(op, e)),
        };
        let mut body: Option<Vec<u8>> = None;
        match payload {
            Ok(Some((stored_body, checksum))) => {
                body = value_bytes(stored_body.clone());
                if verdict.is_none() {
                    fresh
                        .execute(
                            "INSERT INTO payloads (seq, body, checksum) VALUES (?1, ?2, ?3)",
                            params![seq, stored_body, checksum],
                        )
                        .map_err(sql_error(op))?;
                }
            }
            // The read path reports the missing payload row below.
            Ok(None) => {}
            Err(e) => {
                verdict.get_or_insert_with(|| format!("payload unreadable after corruption: {e}"));
            }
        }
        if verdict.is_none() {
            // The same checks a claim makes, on the copy.
            let loaded = fresh
                .query_row(&load_sql("WHERE i.seq = ?1"), [seq], read_row_or_bad)
                .map_err(sql_error(op))?;
            if let Loaded::Bad { reason, .. } = loaded {
                verdict = Some(reason);
            }
        }
        match verdict {
            None => report.salvaged += 1,
            Some(reason) => {
                for sql in [
                    "DELETE FROM items WHERE seq = ?1",
                    "DELETE FROM payloads WHERE seq = ?1",
                ] {
                    fresh.execute(sql, [seq]).map_err(sql_error(op))?;
                }
                fresh
                    .execute(
                        "INSERT INTO quarantine (item_id, reason, quarantined_at, body) \
                         VALUES (?1, ?2, ?3, ?4)",
                        params![id, reason, to_nanos(now), body],
                    )
                    .map_err(sql_error(op))?;
                tracing::warn!(item_id = %id, %reason, "salvage: item quarantined");
                report.quarantined += 1;
            }
        }
    }
    let accounted = report.salvaged + report.quarantined + known_lost;
    // A damaged totals row may claim anything: never more rows than the
    // rowids seen could have held, or, when none was seen, than the file
    // could hold (an item row takes well over 64 bytes).
    let bound = if max_seq > 0 {
        max_seq as u64
    } else {
        file_bytes(old) / 64
    };
    report.lost_unseen = expected_items(old)
        .unwrap_or(0)
        .saturating_sub(accounted)
        .min(bound);
    report.lost = known_lost + report.lost_unseen;
    Ok(())
}

/// The damaged file's size by its header (page count times page size).
fn file_bytes(old: &Connection) -> u64 {
    let read = |pragma: &str| old.pragma_query_value(None, pragma, |r| r.get::<_, i64>(0));
    match (read("page_count"), read("page_size")) {
        (Ok(pages), Ok(size)) => pages.max(0) as u64 * size.max(0) as u64,
        _ => 0,
    }
}

/// The item count the damaged file's totals row holds, if readable.
fn expected_items(old: &Connection) -> Option<u64> {
    old.query_row("SELECT items FROM totals WHERE id = 0", [], |r| {
        r.get::<_, i64>(0)
    })
    .ok()
    .map(|n| n.max(0) as u64)
}

/// Copies the quarantine rows it can read.
fn copy_quarantine(
    old: &Connection,
    fresh: &rusqlite::Transaction<'_>,
    report: &mut SalvageReport,
) -> QueueResult<()> {
    for qid in rowids(old, "quarantine", "qid") {
        let row = old.query_row(
            "SELECT item_id, reason, quarantined_at, body FROM quarantine WHERE qid = ?1",
            [qid],
            |r| {
                Ok((
                    r.get::<_, Value>(0)?,
                    r.get::<_, Value>(1)?,
                    r.get::<_, Value>(2)?,
                    r.get::<_, Value>(3)?,
                ))
            },
        );
        match row {
            Ok((item_id, reason, at, body)) => {
                let text = |v: Value| {
                    value_bytes(v)
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default()
                };
                let at = if let Value::Integer(at) = at { at } else { 0 };
                fresh
                    .execute(
                        "INSERT INTO quarantine (item_id, reason, quarantined_at, body) \
                         VALUES (?1, ?2, ?3, ?4)",
                        params![text(item_id), text(reason), at, value_bytes(body)],
                    )
                    .map_err(sql_error("salvage"))?;
                report.quarantine_rows_kept += 1;
            }
            Err(_) => report.quarantine_rows_lost += 1,
        }
    }
    Ok(())
}

/// Carries over the records of earlier salvages, best effort: they are
/// history, not queue data.
fn copy_salvage_history(old: &Connection, fresh: &rusqlite::Transaction<'_>) {
    // at, moved_to, salvaged, quarantined, lost, cause
    type Record = (i64, String, i64, i64, i64, String);
    let read = || -> rusqlite::Result<Vec<Record>> {
        let mut stmt = old.prepare(
            "SELECT at, moved_to, salvaged, quarantined, lost, cause FROM salvages ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })?;
        rows.collect()
    };
    let Ok(history) = read() else { return };
    for (at, moved_to, salvaged, quarantined, lost, cause) in history {
        let _ = fresh.execute(
            "INSERT INTO salvages (at, moved_to, salvaged, quarantined, lost, cause) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![at, moved_to, salvaged, quarantined, lost, cause],
        );
    }
}
