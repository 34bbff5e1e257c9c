//! Tests of the schema migrations: a database written at schema 1 is
//! migrated whole, and a migration that fails midway changes nothing.

use crate::item::ItemId;

use rusqlite::{params, Connection, OptionalExtension};

use super::row::to_nanos;
use super::*;
use crate::error::QueueError;
use crate::item::{payload_checksum, ItemStatus};

/// Schema 1 as retryq 0.1 wrote it, for the migration test.
const SCHEMA_V1: &str = include_str!("schema_v1.sql");

#[test]
fn a_migration_that_fails_midway_leaves_schema_1_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let body = "{\"n\":1}";
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(SCHEMA_V1).unwrap();
        c.pragma_update(None, "user_version", 1).unwrap();
        c.execute(
            "INSERT INTO items (id, item_type, fingerprint, status, attempts, max_attempts, \
             last_error, next_retry, created_at, updated_at, agent_id, scanner_name, \
             target_path, attributes, size_bytes) VALUES \
             ('kept', 'findings', 'fp', 0, 0, 10, '', 1, 1, 1, '', '', '', '{}', 10)",
            [],
        )
        .unwrap();
        c.execute(
            "INSERT INTO payloads (id, body, checksum) VALUES ('kept', ?1, ?2)",
            params![
                body.as_bytes(),
                i64::from(payload_checksum(body.as_bytes()))
            ],
        )
        .unwrap();
        // A name the migration needs is taken: its rename step fails
        // after the indexes were already dropped in its transaction.
        c.execute_batch("CREATE TABLE items_v1 (x)").unwrap();
    }
    let err = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains(&format!("from schema 1 to {SCHEMA_VERSION}"))
            && message.contains("items_v1"),
        "{message}"
    );
    {
        let c = Connection::open(&path).unwrap();
        let version: i64 = c
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, 1, "still schema 1");
        let index: Option<String> = c
            .query_row(
                "SELECT name FROM sqlite_master WHERE name = 'items_fingerprint'",
                [],
                |r| r.get(0),
            )
            .optional()
            .unwrap();
        assert!(
            index.is_some(),
            "the dropped index came back with the rollback"
        );
        c.execute_batch("DROP TABLE items_v1").unwrap();
    }
    // With the obstacle gone, the same file migrates and keeps its item.
    let q = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap();
    assert_eq!(
        q.get(&ItemId::parse("kept").unwrap())
            .unwrap()
            .report
            .as_str(),
        body
    );
    assert_eq!(q.size().unwrap(), 1);
}

#[test]
fn a_schema_1_database_is_migrated_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let now = to_nanos(Utc::now());
    let payload = |n: u32| format!("{{\"n\":{n}}}");
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(SCHEMA_V1).unwrap();
        c.pragma_update(None, "user_version", 1).unwrap();
        // Pending, processing (lease long expired) and a dead letter.
        for (n, id, status, lease) in [
            (1, "a-pending", 0, None),
            (2, "b-processing", 1, Some(now - 1_000)),
            (3, "c-dead", 2, None),
        ] {
            let body = payload(n);
            c.execute(
                "INSERT INTO items (id, item_type, fingerprint, status, attempts, max_attempts, \
                 last_error, last_attempt, next_retry, created_at, updated_at, agent_id, \
                 scanner_name, target_path, lease_until, attributes, size_bytes) VALUES \
                 (?1, 'findings', ?2, ?3, 2, 10, 'boom', ?4, ?4, ?5, ?4, 'agent', 'scanner', \
                 '/srv', ?6, '{\"k\":\"v\"}', ?7)",
                params![
                    id,
                    crate::item::sha256_hex(body.as_bytes()),
                    status,
                    now,
                    now - 10 + i64::from(n),
                    lease,
                    body.len() as i64 + 100
                ],
            )
            .unwrap();
            c.execute(
                "INSERT INTO payloads (id, body, checksum) VALUES (?1, ?2, ?3)",
                params![
                    id,
                    body.as_bytes(),
                    i64::from(payload_checksum(body.as_bytes()))
                ],
            )
            .unwrap();
        }
    }
    let q = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap();
    let version: i64 = q
        .with_conn(|c| {
            Ok(c.pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap())
        })
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let pending = q.get(&ItemId::parse("a-pending").unwrap()).unwrap();
    assert_eq!(pending.report.as_str(), payload(1));
    assert_eq!(pending.attempts, 2);
    assert_eq!(pending.last_error, "boom");
    assert_eq!(pending.attributes.get("k").map(String::as_str), Some("v"));
    // The expired lease was released at open, as for any database.
    assert_eq!(
        q.get(&ItemId::parse("b-processing").unwrap())
            .unwrap()
            .status(),
        ItemStatus::Pending
    );
    assert_eq!(
        q.get(&ItemId::parse("c-dead").unwrap()).unwrap().status(),
        ItemStatus::Failed
    );
    let stats = q.stats().unwrap();
    assert_eq!((stats.total_items, stats.failed_items), (3, 1));
    assert_eq!(q.size().unwrap(), 3, "totals survive the migration");
    // Dedupe sees the migrated live items, not the dead letter.
    match q.enqueue(NewItem::from_json(payload(1).as_bytes()).unwrap()) {
        Err(QueueError::DuplicateItem { existing_id }) => assert_eq!(existing_id, "a-pending"),
        other => panic!("expected a duplicate, got {other:?}"),
    }
    q.enqueue(NewItem::from_json(payload(3).as_bytes()).unwrap())
        .unwrap();
    let claimed = q.claim(10, Duration::from_secs(60)).unwrap();
    assert_eq!(claimed.len(), 3);
    assert_eq!(claimed[0].id, "a-pending", "ready order kept");
    let old_index: Option<String> = q
        .with_conn(|c| {
            Ok(c.query_row(
                "SELECT name FROM sqlite_master WHERE name = 'items_fingerprint'",
                [],
                |r| r.get(0),
            )
            .optional()
            .unwrap())
        })
        .unwrap();
    assert_eq!(old_index, None);
    let schema: Vec<String> = q
        .with_conn(|c| {
            let mut stmt = c
                .prepare(
                    "SELECT name || ': ' || COALESCE(sql, '') FROM sqlite_master ORDER BY name",
                )
                .unwrap();
            let rows = stmt.query_map([], |r| r.get(0)).unwrap();
            Ok(rows.map(|r| r.unwrap()).collect())
        })
        .unwrap();
    let has = |prefix: &str, part: &str| {
        schema
            .iter()
            .any(|entry| entry.starts_with(prefix) && entry.contains(part))
    };
    assert!(has("items_ready:", "WHERE status = 0"), "{schema:#?}");
    assert!(has("items_leased:", "WHERE status = 1"), "{schema:#?}");
    assert!(has("payloads:", "seq INTEGER PRIMARY KEY"), "{schema:#?}");
    assert!(!has("items_v1", ""), "old tables dropped: {schema:#?}");
    assert!(
        !has("totals_insert", ""),
        "old triggers dropped: {schema:#?}"
    );
    q.close().unwrap();
    // A second open finds schema 2 and leaves it alone.
    let q = SqliteRetryQueue::open(&path, StoreOptions::default()).unwrap();
    assert_eq!(q.size().unwrap(), 4);
}
