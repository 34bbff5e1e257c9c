//! Maintenance: expiry by age, the quarantine's trim, the probe that a
//! full disk has room again, and closing the database.

use std::time::Duration;

use super::row::{sql_err, to_nanos};
use super::{OpenMode, SqliteRetryQueue};
use crate::error::{QueueError, QueueResult};
use crate::store::CleanupReport;

impl SqliteRetryQueue {
    pub(super) fn cleanup_expired(&self, ttl: Duration) -> QueueResult<CleanupReport> {
        let now = self.now();
        let cutoff = |ttl: Duration| {
            chrono::Duration::from_std(ttl)
                .ok()
                .and_then(|d| now.checked_sub_signed(d))
                .map(to_nanos)
                .unwrap_or(i64::MIN)
        };
        let live_cutoff = cutoff(ttl);
        let dead_cutoff = cutoff(self.options.dead_letter_ttl.unwrap_or(ttl));
        let keep = self.options.max_quarantined as i64;
        self.write("cleanup", |tx| {
            let mut report = CleanupReport::default();
            for (status_sql, cutoff, slot) in [
                ("status IN (0, 1)", live_cutoff, &mut report.expired),
                ("status = 2", dead_cutoff, &mut report.dead_letters_expired),
            ] {
                tx.execute(
                    &format!(
                        "DELETE FROM payloads WHERE seq IN \
                         (SELECT seq FROM items WHERE {status_sql} AND created_at < ?1)"
                    ),
                    [cutoff],
                )
                .map_err(sql_err("cleanup"))?;
                let mut stmt = tx
                    .prepare(&format!(
                        "DELETE FROM items WHERE {status_sql} AND created_at < ?1 \
                         RETURNING seq, fingerprint, status, size_bytes"
                    ))
                    .map_err(sql_err("cleanup"))?;
                let mut rows = stmt.query([cutoff]).map_err(sql_err("cleanup"))?;
                while let Some(row) = rows.next().map_err(sql_err("cleanup"))? {
                    let read = || -> rusqlite::Result<(i64, String, i64, i64)> {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                    };
                    let (seq, fingerprint, status, size) = read().map_err(sql_err("cleanup"))?;
                    self.forget_row(seq, &fingerprint, status, size);
                    *slot += 1;
                }
            }
            report.quarantine_trimmed = tx
                .execute(
                    "DELETE FROM quarantine WHERE qid NOT IN \
                     (SELECT qid FROM quarantine ORDER BY qid DESC LIMIT ?1)",
                    [keep],
                )
                .map_err(sql_err("cleanup"))?;
            Ok(report)
        })
    }

    pub(super) fn probe_write(&self) -> QueueResult<bool> {
        // Rewrites the totals row with its own values: a real page write
        // and a synced commit, which a full disk refuses.
        self.write("probe_writable", |tx| {
            tx.execute("UPDATE totals SET items = items WHERE id = 0", [])
                .map_err(sql_err("probe_writable"))
        })?;
        Ok(true)
    }

    pub(super) fn close_conn(&self) -> QueueResult<()> {
        // Readers go before the writer, so the writer's close is the last
        // and may fold the WAL away.
        self.readers.close();
        // Stop the checkpointer first: the final checkpoint below must not
        // find it holding the checkpoint lock.
        drop(
            self.checkpointer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(conn) = guard.take() {
            // Fold the WAL back so the file is self-contained; failure here
            // loses nothing (the WAL is replayed at the next open).
            // A client beside a daemon only copies what it can without
            // waiting: TRUNCATE would hold back the daemon's writers.
            let mode = match self.mode {
                OpenMode::Recover => "TRUNCATE",
                OpenMode::Client => "PASSIVE",
            };
            let _ = conn.pragma_update(None, "wal_checkpoint", mode);
            conn.close()
                .map_err(|(_, e)| QueueError::storage("close", e))?;
        }
        Ok(())
    }
}
