//! Tests of the salvage: records that cannot be quarantined, and files
//! SQLite reports corrupt.

use super::*;
use crate::item::ItemId;
use crate::item::NewItem;
use crate::store::RetryQueue;

fn item(n: u32) -> NewItem {
    NewItem::from_json(format!("{{\"n\":{n}}}").as_bytes()).unwrap()
}

#[test]
fn a_record_that_cannot_be_quarantined_is_skipped_once_and_never_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let q = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap();
    // The bad record is the head of the ready order.
    let bad = q.enqueue(item(1)).unwrap();
    let good = [q.enqueue(item(2)).unwrap(), q.enqueue(item(3)).unwrap()];
    {
        let raw = Connection::open(&path).unwrap();
        raw.execute(
            "UPDATE payloads SET checksum = checksum + 1 \
             WHERE seq = (SELECT seq FROM items WHERE id = ?1)",
            [&bad],
        )
        .unwrap();
        // The move to quarantine now fails (and not as corruption).
        raw.execute_batch("DROP TABLE quarantine").unwrap();
    }
    let lease = Duration::from_secs(60);
    for round in 0..3 {
        let mut claimed: Vec<ItemId> = q
            .claim(10, lease)
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        claimed.sort();
        assert_eq!(claimed, good.to_vec(), "round {round}");
        assert_eq!(q.claim(10, lease).unwrap(), Vec::new(), "round {round}");
        let head = q.peek().unwrap();
        assert_eq!(head, None, "round {round}: only the skipped one is pending");
        for id in &good {
            q.release(id).unwrap();
        }
        assert_eq!(q.peek().unwrap().map(|i| i.id), Some(good[0].clone()));
    }
    assert_eq!(q.salvage.skipped_count(), 1, "counted once, not per claim");
    assert!(q.salvage.is_skipped(1));
}

#[test]
fn a_column_of_the_wrong_type_fails_its_row_not_every_query() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let q = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap();
    let bad = q.enqueue(item(1)).unwrap();
    let good = q.enqueue(item(2)).unwrap();
    Connection::open(&path)
        .unwrap()
        .execute("UPDATE items SET attempts = 'x' WHERE id = ?1", [&bad])
        .unwrap();
    let claimed = q.claim(10, Duration::from_secs(60)).unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id, good);
    let stats = q.stats().unwrap();
    assert_eq!((stats.quarantined, stats.total_items), (1, 1));
    assert_eq!(stats.skipped_entries, 0);
    assert!(matches!(q.get(&bad), Err(QueueError::ItemNotFound { .. })));
}

#[test]
fn only_the_file_itself_being_damaged_counts_as_corruption() {
    let corrupt = rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
        None,
    );
    assert!(is_corruption(&QueueError::storage("delete", corrupt)));
    let not_a_db = rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_NOTADB),
        None,
    );
    assert!(is_corruption(&QueueError::storage("open", not_a_db)));
    let busy =
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY), None);
    assert!(!is_corruption(&QueueError::storage("open", busy)));
    assert!(is_corruption(&QueueError::storage(
        "migrate",
        "q.db from schema 2 to 3: database disk image is malformed"
    )));
    assert!(!is_corruption(&QueueError::Corrupt {
        what: "one record".into(),
        detail: "payload checksum mismatch".into()
    }));
}

#[test]
fn skipped_records_are_left_out_of_a_query_before_its_order() {
    let state = SalvageState::default();
    let sql = "SELECT seq FROM items WHERE status = 0 ORDER BY next_retry LIMIT 1";
    assert_eq!(state.exclude_skipped(sql, "seq"), sql);
    let error = QueueError::storage("quarantine", "no such table");
    state.skip(7, "a", &error);
    state.skip(3, "b", &error);
    state.skip(7, "a", &error);
    assert_eq!(state.skipped_count(), 2);
    assert_eq!(
        state.exclude_skipped(sql, "seq"),
        "SELECT seq FROM items WHERE status = 0 AND seq NOT IN (3,7) ORDER BY next_retry \
         LIMIT 1"
    );
    state.succeeded();
    assert_eq!(state.exclude_skipped(sql, "seq"), sql);
}
