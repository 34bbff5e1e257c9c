//! Tests of reads beside the writer (`readers.rs`): they complete while a
//! write transaction is open, in this process or in a daemon beside an
//! admin client, see only committed state, and leave a corrupt record they
//! meet to the next write.

use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use rusqlite::Connection;

use super::admission::KnownTotals;
use super::*;
use crate::error::QueueError;

/// Long enough that only a read blocked behind the write lets it pass.
const HOLD_LIMIT: Duration = Duration::from_secs(60);

fn item(n: u32) -> NewItem {
    NewItem::from_json(format!("{{\"n\":{n}}}").as_bytes()).unwrap()
}

fn ids(items: Vec<QueueItem>) -> Vec<String> {
    items.into_iter().map(|i| i.id.to_string()).collect()
}

/// Holds a write transaction of `q` open (with one uncommitted enqueue in
/// it) on another thread until `release` receives, or [`HOLD_LIMIT`]
/// passes. Returns once the transaction is open; the thread's result says
/// whether it was released rather than timed out.
fn hold_write_transaction(
    q: &Arc<SqliteRetryQueue>,
    release: mpsc::Receiver<()>,
) -> thread::JoinHandle<bool> {
    let (opened_tx, opened_rx) = mpsc::channel();
    let q = Arc::clone(q);
    let writer = thread::spawn(move || {
        q.write("test", |tx| {
            q.enqueue_in(tx, item(99), None, &mut KnownTotals::default())?;
            opened_tx.send(()).unwrap();
            Ok(release.recv_timeout(HOLD_LIMIT).is_ok())
        })
        .unwrap()
    });
    opened_rx.recv().unwrap();
    writer
}

#[test]
fn reads_complete_while_a_write_transaction_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let q =
        Arc::new(SqliteRetryQueue::open(dir.path().join("q.db"), StoreOptions::default()).unwrap());
    let a = q.enqueue(item(1)).unwrap();
    let (release, released) = mpsc::channel();
    let writer = hold_write_transaction(&q, released);

    // Each read sees the last commit, not the open transaction's enqueue.
    assert_eq!(q.get(&a).unwrap().id, a);
    assert_eq!(
        ids(q.list(&ListFilter::default()).unwrap()),
        vec![a.clone()]
    );
    assert_eq!(q.peek().unwrap().map(|i| i.id), Some(a.clone()));
    assert_eq!(q.size().unwrap(), 1);
    assert_eq!(q.stats().unwrap().total_items, 1);
    assert!(q.next_due().unwrap().is_some());
    let _ = release.send(());

    assert!(
        writer.join().unwrap(),
        "the reads waited for the write transaction to end"
    );
    assert_eq!(q.size().unwrap(), 2);
    assert_eq!(q.list(&ListFilter::default()).unwrap().len(), 2);
}

#[test]
fn an_admin_client_reads_while_the_daemon_holds_a_write_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let daemon = Arc::new(SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap());
    let a = daemon.enqueue(item(1)).unwrap();
    let (release, released) = mpsc::channel();
    let writer = hold_write_transaction(&daemon, released);

    // What `retryq list` and `retryq stats` do, start to finish.
    let client = SqliteRetryQueue::open_as_client(&path, StoreOptions::default()).unwrap();
    assert_eq!(
        ids(client.list(&ListFilter::default()).unwrap()),
        vec![a.clone()]
    );
    assert_eq!(client.get(&a).unwrap().id, a);
    assert_eq!(client.stats().unwrap().total_items, 1);
    client.close().unwrap();
    let _ = release.send(());

    assert!(
        writer.join().unwrap(),
        "the client waited for the daemon's write transaction to end"
    );
    assert_eq!(daemon.size().unwrap(), 2);
}

#[test]
fn a_corrupt_record_met_by_a_read_is_reported_and_quarantined_by_the_next_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let q = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap();
    // The bad one is the head of the ready order.
    let bad = q.enqueue(item(1)).unwrap();
    let good = [q.enqueue(item(2)).unwrap(), q.enqueue(item(3)).unwrap()];
    let raw = Connection::open(&path).unwrap();
    raw.execute(
        "UPDATE payloads SET checksum = checksum + 1 \
         WHERE seq = (SELECT seq FROM items WHERE id = ?1)",
        [&bad],
    )
    .unwrap();
    let count = |sql: &str| -> i64 { raw.query_row(sql, [&bad], |r| r.get(0)).unwrap() };

    match q.get(&bad) {
        Err(QueueError::Corrupt { what, detail }) => {
            assert_eq!(what, bad);
            assert!(detail.contains("checksum"), "{detail}");
        }
        other => panic!("expected the record reported corrupt, got {other:?}"),
    }
    // Every other item still reads; the bad one is skipped.
    assert_eq!(ids(q.list(&ListFilter::default()).unwrap()), good.to_vec());
    assert_eq!(q.peek().unwrap().map(|i| i.id), Some(good[0].clone()));
    assert_eq!(q.get(&good[1]).unwrap().id, good[1]);
    // Reads wrote nothing: the record is where it was.
    assert_eq!(q.stats().unwrap().quarantined, 0);
    assert_eq!(count("SELECT COUNT(*) FROM items WHERE id = ?1"), 1);

    // The next write, whatever it is, moves it.
    q.enqueue(item(4)).unwrap();
    assert_eq!(count("SELECT COUNT(*) FROM items WHERE id = ?1"), 0);
    assert_eq!(
        count("SELECT COUNT(*) FROM quarantine WHERE item_id = ?1"),
        1
    );
    assert!(matches!(q.get(&bad), Err(QueueError::ItemNotFound { .. })));
    let stats = q.stats().unwrap();
    assert_eq!((stats.quarantined, stats.total_items), (1, 3));
}

#[test]
fn a_remembered_record_repaired_before_the_next_write_is_not_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let q = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap();
    let id = q.enqueue(item(1)).unwrap();
    let raw = Connection::open(&path).unwrap();
    let shift = |by: i64| {
        raw.execute(
            "UPDATE payloads SET checksum = checksum + ?2 \
             WHERE seq = (SELECT seq FROM items WHERE id = ?1)",
            rusqlite::params![id, by],
        )
        .unwrap();
    };
    shift(1);
    assert!(matches!(q.get(&id), Err(QueueError::Corrupt { .. })));
    shift(-1);
    // The write checks it again and leaves the intact record alone.
    q.enqueue(item(2)).unwrap();
    assert_eq!(q.get(&id).unwrap().id, id);
    assert_eq!(q.stats().unwrap().quarantined, 0);
}

#[test]
fn deleting_a_record_a_read_found_corrupt_deletes_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let q = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap();
    let id = q.enqueue(item(1)).unwrap();
    Connection::open(&path)
        .unwrap()
        .execute("UPDATE payloads SET checksum = checksum + 1", [])
        .unwrap();
    assert!(matches!(q.get(&id), Err(QueueError::Corrupt { .. })));
    // What an operator does next: the delete is answered as one, not as
    // "not found" because the write moved the record away first.
    q.delete(&id).unwrap();
    let stats = q.stats().unwrap();
    assert_eq!((stats.quarantined, stats.total_items), (0, 0));
}

#[test]
fn reads_after_close_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let q = SqliteRetryQueue::open(dir.path().join("q.db"), StoreOptions::default()).unwrap();
    let id = q.enqueue(item(1)).unwrap();
    q.close().unwrap();
    assert!(matches!(q.get(&id), Err(QueueError::QueueClosed)));
    assert!(matches!(q.stats(), Err(QueueError::QueueClosed)));
}
