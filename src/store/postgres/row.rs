//! Row mapping: the one place that knows how a [`QueueItem`] sits in the
//! `items` table (its columns, their types, the payload checksum) and how
//! a row is read back, checked and written.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use postgres::types::ToSql;
use postgres::{GenericClient, Row};

use crate::item::{payload_checksum, ItemId, ItemRecord, ItemStatus, ItemType, Payload, QueueItem};

/// The columns of `items`, in the order [`decode`] reads and [`params`]
/// writes them.
pub(super) const COLUMNS: &str = "id, item_type, fingerprint, status, report, checksum, \
     attempts, max_attempts, last_error, last_attempt, next_retry, created_at, updated_at, \
     agent_id, scanner_name, target_path, lease_until, lease_owner, attributes, size_bytes";
const COLUMN_COUNT: usize = 20;

/// A row whose payload fails its checksum or whose fields do not parse.
#[derive(Debug)]
pub(super) struct CorruptRow {
    pub id: String,
    pub detail: String,
}

fn status_str(status: ItemStatus) -> &'static str {
    status.as_str()
}

/// The item a row holds, or why the row cannot be trusted.
pub(super) fn decode(row: &Row) -> Result<QueueItem, CorruptRow> {
    let id: String = row.try_get(0).unwrap_or_default();
    let corrupt = |detail: String| CorruptRow {
        id: id.clone(),
        detail,
    };
    let get_err = |e: postgres::Error| corrupt(format!("unreadable column: {e}"));
    let report: String = row.try_get(4).map_err(get_err)?;
    let checksum: i64 = row.try_get(5).map_err(get_err)?;
    if i64::from(payload_checksum(report.as_bytes())) != checksum {
        return Err(corrupt(format!(
            "payload checksum mismatch (stored {checksum:#010x})"
        )));
    }
    let report =
        Payload::from_stored(report.into_bytes()).map_err(|e| corrupt(format!("payload: {e}")))?;
    let status: String = row.try_get(3).map_err(get_err)?;
    let status: ItemStatus = status
        .parse()
        .map_err(|e| corrupt(format!("status: {e}")))?;
    let attempts: i64 = row.try_get(6).map_err(get_err)?;
    let max_attempts: i64 = row.try_get(7).map_err(get_err)?;
    let attributes: String = row.try_get(18).map_err(get_err)?;
    let attributes: BTreeMap<String, String> =
        serde_json::from_str(&attributes).map_err(|e| corrupt(format!("attributes: {e}")))?;
    let item_type: String = row.try_get(1).map_err(get_err)?;
    let checked_id = ItemId::parse(&id).map_err(|e| corrupt(format!("id: {e}")))?;
    Ok(QueueItem::from(ItemRecord {
        id: checked_id,
        item_type: ItemType::from(item_type),
        fingerprint: row.try_get(2).map_err(get_err)?,
        status,
        report,
        attempts: u32::try_from(attempts).map_err(|_| corrupt("attempts out of range".into()))?,
        max_attempts: u32::try_from(max_attempts)
            .map_err(|_| corrupt("max_attempts out of range".into()))?,
        last_error: row.try_get(8).map_err(get_err)?,
        last_attempt: row.try_get(9).map_err(get_err)?,
        next_retry: row.try_get(10).map_err(get_err)?,
        created_at: row.try_get(11).map_err(get_err)?,
        updated_at: row.try_get(12).map_err(get_err)?,
        agent_id: row.try_get(13).map_err(get_err)?,
        scanner_name: row.try_get(14).map_err(get_err)?,
        target_path: row.try_get(15).map_err(get_err)?,
        lease_until: row.try_get(16).map_err(get_err)?,
        lease_owner: row.try_get(17).map_err(get_err)?,
        attributes,
    }))
}

/// The column values of one item, ready to bind: the columns stored as
/// the item holds them are bound from the item itself, the others
/// converted here once.
pub(super) struct Encoded<'a> {
    item: &'a QueueItem,
    id: &'a str,
    item_type: &'a str,
    status: &'static str,
    report: &'a str,
    checksum: i64,
    attempts: i64,
    max_attempts: i64,
    lease_until: Option<DateTime<Utc>>,
    lease_owner: Option<&'a str>,
    attributes: String,
    size_bytes: i64,
}

impl<'a> Encoded<'a> {
    pub(super) fn new(item: &'a QueueItem) -> Self {
        // A text column: a binary sealed payload goes in as its envelope,
        // checksummed as that text.
        let report = item.report.as_str();
        Encoded {
            item,
            id: item.id.as_str(),
            item_type: item.item_type.as_str(),
            status: status_str(item.status()),
            report,
            checksum: i64::from(payload_checksum(report.as_bytes())),
            attempts: i64::from(item.attempts),
            max_attempts: i64::from(item.max_attempts),
            lease_until: item.lease_until(),
            lease_owner: item.lease_owner(),
            // A map of strings always serializes.
            attributes: serde_json::to_string(&item.attributes).unwrap_or_else(|_| "{}".into()),
            size_bytes: i64::try_from(item.size_bytes()).unwrap_or(i64::MAX),
        }
    }

    /// The values in [`COLUMNS`] order.
    fn params(&self) -> [&(dyn ToSql + Sync); COLUMN_COUNT] {
        let item = self.item;
        [
            &self.id,
            &self.item_type,
            &item.fingerprint,
            &self.status,
            &self.report,
            &self.checksum,
            &self.attempts,
            &self.max_attempts,
            &item.last_error,
            &item.last_attempt,
            &item.next_retry,
            &item.created_at,
            &item.updated_at,
            &item.agent_id,
            &item.scanner_name,
            &item.target_path,
            &self.lease_until,
            &self.lease_owner,
            &self.attributes,
            &self.size_bytes,
        ]
    }
}

/// Rows per INSERT statement: PostgreSQL binds at most 65535 parameters.
const ROWS_PER_INSERT: usize = 1000;

/// Inserts `items` with multi-row INSERTs (one statement per thousand).
pub(super) fn insert_all(
    client: &mut impl GenericClient,
    table: &str,
    items: &[QueueItem],
) -> Result<(), postgres::Error> {
    for chunk in items.chunks(ROWS_PER_INSERT) {
        let encoded: Vec<Encoded> = chunk.iter().map(Encoded::new).collect();
        let mut sql = format!("INSERT INTO {table} ({COLUMNS}) VALUES ");
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(chunk.len() * COLUMN_COUNT);
        for (row, values) in encoded.iter().enumerate() {
            if row > 0 {
                sql.push(',');
            }
            sql.push('(');
            for col in 0..COLUMN_COUNT {
                if col > 0 {
                    sql.push(',');
                }
                sql.push_str(&format!("${}", row * COLUMN_COUNT + col + 1));
            }
            sql.push(')');
            params.extend_from_slice(&values.params());
        }
        client.execute(sql.as_str(), &params)?;
    }
    Ok(())
}

/// Column positions (in [`COLUMNS`]) that an update writes: all but
/// `created_at`, which never changes; `id` ($1) selects the row.
fn updated_positions() -> impl Iterator<Item = (usize, &'static str)> {
    COLUMNS
        .split(", ")
        .enumerate()
        .filter(|(_, c)| *c != "created_at")
}

/// `UPDATE` of every column but `id` and `created_at`, by id (`$1`).
pub(super) fn update_sql(table: &str) -> String {
    let sets: Vec<String> = updated_positions()
        .enumerate()
        .filter(|(_, (_, c))| *c != "id")
        .map(|(n, (_, c))| format!("{c} = ${}", n + 1))
        .collect();
    format!("UPDATE {table} SET {} WHERE id = $1", sets.join(", "))
}

/// Writes `item` over its row (all but `id` and `created_at`); the rows changed.
pub(super) fn write_back(
    client: &mut impl GenericClient,
    update_sql: &str,
    item: &QueueItem,
) -> Result<u64, postgres::Error> {
    let encoded = Encoded::new(item);
    let all = encoded.params();
    let params: Vec<&(dyn ToSql + Sync)> = updated_positions().map(|(i, _)| all[i]).collect();
    client.execute(update_sql, &params)
}
