//! Row mapping: how a [`QueueItem`] is laid out in the `items` and
//! `payloads` tables (status codes, times as Unix nanoseconds, attributes
//! as JSON), and how a row is read back and checked ([`Loaded`]).

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row};

use crate::error::{QueueError, QueueResult};
use crate::item::{
    payload_checksum, ItemId, ItemRecord, ItemStatus, ItemType, Payload, QueueItem,
};

pub(super) const STATUS_PENDING: i64 = 0;

pub(super) const STATUS_PROCESSING: i64 = 1;

pub(super) const STATUS_FAILED: i64 = 2;

pub(super) fn status_code(s: ItemStatus) -> i64 {
    match s {
        ItemStatus::Pending => STATUS_PENDING,
        ItemStatus::Processing => STATUS_PROCESSING,
        ItemStatus::Failed => STATUS_FAILED,
    }
}

pub(super) fn status_from_code(c: i64) -> Option<ItemStatus> {
    match c {
        STATUS_PENDING => Some(ItemStatus::Pending),
        STATUS_PROCESSING => Some(ItemStatus::Processing),
        STATUS_FAILED => Some(ItemStatus::Failed),
        _ => None,
    }
}

/// A time as Unix nanoseconds, saturating outside 1677..2262.
pub(super) fn to_nanos(t: DateTime<Utc>) -> i64 {
    t.timestamp_nanos_opt().unwrap_or(if t.timestamp() < 0 {
        i64::MIN
    } else {
        i64::MAX
    })
}

pub(super) fn from_nanos(n: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(n)
}

pub(super) fn sql_err(op: &'static str) -> impl Fn(rusqlite::Error) -> QueueError {
    move |e| QueueError::storage(op, e)
}

pub(super) const ITEM_COLUMNS: &str =
    "i.id, i.item_type, i.fingerprint, i.status, i.attempts, i.max_attempts, \
     i.last_error, i.last_attempt, i.next_retry, i.created_at, i.updated_at, i.agent_id, \
     i.scanner_name, i.target_path, i.lease_until, i.attributes, p.body, p.checksum, i.seq, \
     i.lease_owner";

/// The query that loads items and their payloads, filtered by `where_sql`.
pub(super) fn load_sql(where_sql: &str) -> String {
    format!("SELECT {ITEM_COLUMNS} FROM items i LEFT JOIN payloads p ON p.seq = i.seq {where_sql}")
}

/// A row read back: the item, or why it failed its integrity check.
pub(super) enum Loaded {
    Ok {
        seq: i64,
        item: Box<QueueItem>,
    },
    Bad {
        seq: i64,
        id: String,
        reason: String,
    },
}

pub(super) fn read_row(row: &Row<'_>) -> rusqlite::Result<Loaded> {
    let id: String = row.get(0)?;
    let seq: i64 = row.get(18)?;
    let body: Option<Vec<u8>> = row.get(16)?;
    let checksum: Option<i64> = row.get(17)?;
    let (body, checksum) = match (body, checksum) {
        (Some(b), Some(c)) => (b, c),
        _ => {
            return Ok(Loaded::Bad {
                seq,
                id,
                reason: "payload row missing".into(),
            })
        }
    };
    if i64::from(payload_checksum(&body)) != checksum {
        return Ok(Loaded::Bad {
            seq,
            id,
            reason: "payload checksum mismatch".into(),
        });
    }
    let report = match Payload::from_stored(body) {
        Ok(p) => p,
        Err(e) => {
            return Ok(Loaded::Bad {
                seq,
                id,
                reason: e.to_string(),
            })
        }
    };
    let status_raw: i64 = row.get(3)?;
    let Some(status) = status_from_code(status_raw) else {
        return Ok(Loaded::Bad {
            seq,
            id,
            reason: format!("unknown status code {status_raw}"),
        });
    };
    let attributes: String = row.get(15)?;
    let attributes = match serde_json::from_str(&attributes) {
        Ok(a) => a,
        Err(e) => {
            return Ok(Loaded::Bad {
                seq,
                id,
                reason: format!("attributes are not a JSON object of strings: {e}"),
            })
        }
    };
    // The ID is checked where it comes back in: a row naming a bad one is
    // refused like any other failed check.
    let id = match ItemId::try_from(id.clone()) {
        Ok(checked) => checked,
        Err(e) => {
            return Ok(Loaded::Bad {
                seq,
                id,
                reason: e.to_string(),
            })
        }
    };
    let item_type: String = row.get(1)?;
    Ok(Loaded::Ok {
        seq,
        item: Box::new(QueueItem::from(ItemRecord {
            id,
            item_type: ItemType::from(item_type),
            fingerprint: row.get(2)?,
            status,
            report,
            attempts: u32::try_from(row.get::<_, i64>(4)?).unwrap_or(u32::MAX),
            max_attempts: u32::try_from(row.get::<_, i64>(5)?).unwrap_or(u32::MAX),
            last_error: row.get(6)?,
            last_attempt: row.get::<_, Option<i64>>(7)?.map(from_nanos),
            next_retry: from_nanos(row.get(8)?),
            created_at: from_nanos(row.get(9)?),
            updated_at: from_nanos(row.get(10)?),
            agent_id: row.get(11)?,
            scanner_name: row.get(12)?,
            target_path: row.get(13)?,
            lease_until: row.get::<_, Option<i64>>(14)?.map(from_nanos),
            lease_owner: row.get(19)?,
            attributes,
        })),
    })
}

/// An item's attributes as the JSON object stored beside it.
pub(super) fn attributes_json(item: &QueueItem) -> QueueResult<String> {
    serde_json::to_string(&item.attributes)
        .map_err(|e| QueueError::invalid(format!("attributes: {e}")))
}

/// Runs a cached single-row query; `None` when it finds no row.
pub(super) fn query_optional<T: rusqlite::types::FromSql>(
    conn: &Connection,
    op: &'static str,
    sql: &str,
    params: impl rusqlite::Params,
) -> QueueResult<Option<T>> {
    conn.prepare_cached(sql)
        .and_then(|mut stmt| stmt.query_row(params, |r| r.get(0)).optional())
        .map_err(sql_err(op))
}

/// An item's `items` row as SQL values, bound as ?1..?18 in the column
/// order of [`insert_item`]'s statement. [`write_meta`] binds the same
/// values and leaves ?10 (`created_at`, which never changes) unused, so the
/// two statements cannot disagree on which value goes to which column.
pub(super) struct ItemRow<'a> {
    pub(super) item: &'a QueueItem,
    pub(super) item_type: &'a str,
    pub(super) status: i64,
    pub(super) attempts: i64,
    pub(super) max_attempts: i64,
    pub(super) last_attempt: Option<i64>,
    pub(super) next_retry: i64,
    pub(super) created_at: i64,
    pub(super) updated_at: i64,
    pub(super) lease_until: Option<i64>,
    pub(super) lease_owner: Option<&'a str>,
    pub(super) attributes: String,
    pub(super) size_bytes: i64,
}

impl<'a> ItemRow<'a> {
    /// Fails (before any write) only when the attributes do not serialize.
    pub(super) fn new(item: &'a QueueItem) -> QueueResult<Self> {
        Ok(ItemRow {
            item,
            item_type: item.item_type.as_str(),
            status: status_code(item.status()),
            attempts: i64::from(item.attempts),
            max_attempts: i64::from(item.max_attempts),
            last_attempt: item.last_attempt.map(to_nanos),
            next_retry: to_nanos(item.next_retry),
            created_at: to_nanos(item.created_at),
            updated_at: to_nanos(item.updated_at),
            lease_until: item.lease_until().map(to_nanos),
            lease_owner: item.lease_owner(),
            attributes: attributes_json(item)?,
            size_bytes: item.size_bytes() as i64,
        })
    }

    fn params(&self) -> [&dyn rusqlite::ToSql; 18] {
        [
            &self.item.id,
            &self.item_type,
            &self.item.fingerprint,
            &self.status,
            &self.attempts,
            &self.max_attempts,
            &self.item.last_error,
            &self.last_attempt,
            &self.next_retry,
            &self.created_at,
            &self.updated_at,
            &self.item.agent_id,
            &self.item.scanner_name,
            &self.item.target_path,
            &self.lease_until,
            &self.attributes,
            &self.size_bytes,
            &self.lease_owner,
        ]
    }
}

/// Inserts an item's metadata row; returns its `seq`.
pub(super) fn insert_item(conn: &Connection, row: &ItemRow<'_>) -> QueueResult<i64> {
    conn.prepare_cached(
        "INSERT OR FAIL INTO items (id, item_type, fingerprint, status, attempts, max_attempts, \
         last_error, last_attempt, next_retry, created_at, updated_at, agent_id, scanner_name, \
         target_path, lease_until, attributes, size_bytes, lease_owner) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
    )
    .and_then(|mut stmt| stmt.execute(row.params()))
    .map_err(sql_err("enqueue"))?;
    Ok(conn.last_insert_rowid())
}

/// Rewrites an item's metadata row (never its payload); returns its `seq`.
pub(super) fn write_meta(conn: &Connection, item: &QueueItem) -> QueueResult<i64> {
    let row = ItemRow::new(item)?;
    let seq: Option<i64> = conn
        .prepare_cached(
            "UPDATE OR FAIL items SET item_type = ?2, fingerprint = ?3, status = ?4, \
             attempts = ?5, max_attempts = ?6, last_error = ?7, last_attempt = ?8, \
             next_retry = ?9, updated_at = ?11, agent_id = ?12, scanner_name = ?13, \
             target_path = ?14, lease_until = ?15, attributes = ?16, size_bytes = ?17, \
             lease_owner = ?18 WHERE id = ?1 RETURNING seq",
        )
        .and_then(|mut stmt| stmt.query_row(row.params(), |r| r.get(0)).optional())
        .map_err(sql_err("update"))?;
    seq.ok_or_else(|| QueueError::not_found(&item.id))
}
