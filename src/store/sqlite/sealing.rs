//! What the sealing layer above ([`crate::seal`]) asks of SQLite: move one
//! item to quarantine by ID, change payloads only where they are still
//! what was read (a re-seal beside a running daemon), and count envelopes
//! per key ID with one query instead of reading every item.

use std::collections::BTreeMap;

use rusqlite::OptionalExtension as _;

use super::row::sql_err;
use super::SqliteRetryQueue;
use crate::error::{QueueError, QueueResult};
use crate::item::payload_checksum;
use crate::store::PayloadSwap;

impl SqliteRetryQueue {
    pub(super) fn quarantine_by_id(&self, id: &str, reason: &str) -> QueueResult<()> {
        self.write("quarantine", |tx| {
            let seq: Option<i64> = tx
                .query_row("SELECT seq FROM items WHERE id = ?1", [id], |r| r.get(0))
                .optional()
                .map_err(sql_err("quarantine"))?;
            let Some(seq) = seq else {
                return Err(QueueError::not_found(id));
            };
            self.quarantine_record(tx, seq, id, reason)
        })
    }

    /// One transaction for the batch; each swap is one conditional
    /// `UPDATE`, so another connection (the daemon) either committed its
    /// change before it (and the payload no longer matches) or sees it.
    /// Payloads only: the item's state is not read, so it cannot be undone.
    /// A replacement of another length is refused: the accounted size
    /// would change, and a re-seal keeps it.
    pub(super) fn swap_payloads(&self, swaps: Vec<PayloadSwap>) -> QueueResult<Vec<bool>> {
        if let Some(swap) = swaps
            .iter()
            .find(|s| s.replacement.len() != s.expected.len())
        {
            return Err(QueueError::invalid(format!(
                "a payload swap for {} changes its size ({} -> {} bytes)",
                swap.id,
                swap.expected.len(),
                swap.replacement.len()
            )));
        }
        self.write("replace_payloads", |tx| {
            let mut stmt = tx
                .prepare_cached(
                    "UPDATE payloads SET body = ?3, checksum = ?4 \
                     WHERE seq = (SELECT seq FROM items WHERE id = ?1) AND body = ?2",
                )
                .map_err(sql_err("replace_payloads"))?;
            swaps
                .iter()
                .map(|swap| {
                    let changed = stmt
                        .execute(rusqlite::params![
                            swap.id,
                            swap.expected.as_bytes(),
                            swap.replacement.as_bytes(),
                            i64::from(payload_checksum(swap.replacement.as_bytes())),
                        ])
                        .map_err(sql_err("replace_payloads"))?;
                    Ok(changed == 1)
                })
                .collect()
        })
    }

    /// One scan of the payloads: each body is matched against the
    /// prefixes in turn (a `CASE`), and grouped by what follows the match.
    pub(super) fn count_prefix(
        &self,
        prefixes: &[&str],
        width: usize,
    ) -> QueueResult<BTreeMap<String, usize>> {
        let op = "count_payload_prefix";
        if prefixes.is_empty() {
            return Ok(BTreeMap::new());
        }
        let mut case = String::from("CASE");
        let mut params: Vec<rusqlite::types::Value> = Vec::new();
        for prefix in prefixes {
            let n = params.len();
            // ?(n+1) the prefix, ?(n+2) its length.
            case.push_str(&format!(
                " WHEN substr(body, 1, ?{len}) = ?{p} THEN substr(body, ?{len} + 1, ?{w})",
                p = n + 1,
                len = n + 2,
                w = 2 * prefixes.len() + 1,
            ));
            params.push(rusqlite::types::Value::Blob(prefix.as_bytes().to_vec()));
            params.push(rusqlite::types::Value::Integer(prefix.len() as i64));
        }
        params.push(rusqlite::types::Value::Integer(width as i64));
        let sql = format!(
            "SELECT tail, COUNT(*) FROM (SELECT {case} END AS tail FROM payloads) \
             WHERE tail IS NOT NULL GROUP BY tail"
        );
        self.read(op, |conn| {
            let mut stmt = conn.prepare_cached(&sql).map_err(sql_err(op))?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(params.iter()), |r| {
                    Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?))
                })
                .map_err(sql_err(op))?;
            let mut counts = BTreeMap::new();
            for row in rows {
                let (tail, n) = row.map_err(sql_err(op))?;
                *counts
                    .entry(String::from_utf8_lossy(&tail).into_owned())
                    .or_insert(0) += n.max(0) as usize;
            }
            Ok(counts)
        })
    }
}
