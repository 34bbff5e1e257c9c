//! Opening a directory written by the Go SDK (`shared/fixtures/go-retry-queue`)
//! does what its README table says, and what we write stays Go-shaped.

use retryq::item::ItemId;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use retryq::clock::ManualClock;
use retryq::store::{FileRetryQueue, ListFilter, RetryQueue, StoreOptions};
use retryq::{ItemStatus, ItemType};

/// A copy of `shared/fixtures/go-retry-queue`, kept in the repository.
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/go-retry-queue");
const ID_PREFIX: &str = "3f1c2b9e-6a4d-4c1e-9b7a-0d2e5f8a1c0";

fn fixture_dir() -> PathBuf {
    // The fixture lives in the shared area beside the repository; allow an
    // override for other checkouts.
    std::env::var_os("RETRYQ_GO_FIXTURE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(FIXTURE))
}

fn id(n: u8) -> String {
    format!("{ID_PREFIX}{n}")
}

fn copy_fixture(to: &Path) {
    for entry in std::fs::read_dir(fixture_dir()).expect("fixture directory") {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn at(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn open(dir: &Path) -> FileRetryQueue {
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap());
    let options = StoreOptions {
        clock: Arc::new(clock),
        ..StoreOptions::default()
    };
    FileRetryQueue::open(dir, options).unwrap()
}

fn fixture_copy() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("queue");
    std::fs::create_dir(&dir).unwrap();
    copy_fixture(&dir);
    (tmp, dir)
}

#[test]
fn opening_the_go_directory_follows_the_readme_table() {
    let (_tmp, dir) = fixture_copy();
    let q = open(&dir);

    // Four items survive: three pending (c01, c02, c04) and one failed (c03).
    let stats = q.stats().unwrap();
    assert_eq!(stats.total_items, 4);
    assert_eq!(stats.pending_items, 3);
    assert_eq!(stats.processing_items, 0);
    assert_eq!(stats.failed_items, 1);

    // c01: pending, never tried, due.
    let c01 = q.get(&ItemId::parse(&id(1)).unwrap()).unwrap();
    assert_eq!(c01.status(), ItemStatus::Pending);
    assert_eq!(c01.attempts, 0);
    assert_eq!(c01.last_attempt, None, "Go zero time reads as never");
    assert_eq!(c01.created_at, at("2026-11-20T10:00:00.123456789Z"));
    assert_eq!(c01.next_retry, at("2026-11-20T10:05:00.5Z"));
    assert_eq!(c01.item_type, ItemType::Findings);
    assert_eq!(c01.agent_id, "agent-7");
    let ready = q
        .list(&ListFilter {
            ready_only: true,
            ..ListFilter::default()
        })
        .unwrap();
    assert!(ready.iter().any(|i| i.id == id(1)), "c01 is due");

    // c02: pending after 3 failed attempts, its history kept.
    let c02 = q.get(&ItemId::parse(&id(2)).unwrap()).unwrap();
    assert_eq!(c02.status(), ItemStatus::Pending);
    assert_eq!(c02.attempts, 3);
    assert!(c02.last_error.contains("connection refused"));
    assert_eq!(c02.last_attempt, Some(at("2026-11-20T11:00:00Z")));
    assert_eq!(c02.next_retry, at("2026-11-20T11:40:00Z"));

    // c03: a dead letter.
    let c03 = q.get(&ItemId::parse(&id(3)).unwrap()).unwrap();
    assert_eq!(c03.status(), ItemStatus::Failed);
    assert_eq!(c03.attempts, 10);
    assert_eq!(c03.item_type, ItemType::Assets);

    // c04: processing when Go died -> pending, attempts kept.
    let c04 = q.get(&ItemId::parse(&id(4)).unwrap()).unwrap();
    assert_eq!(c04.status(), ItemStatus::Pending);
    assert_eq!(c04.attempts, 1);
    assert_eq!(c04.lease_until(), None);

    // c05: torn -> quarantined and reported, not indexed.
    assert!(q.get(&ItemId::parse(&id(5)).unwrap()).is_err());
    assert_eq!(stats.quarantined, 1);
    let torn = "1795169040000000000_3f1c2b9e-6a4d-4c1e-9b7a-0d2e5f8a1c05.json";
    assert!(!dir.join(torn).exists());
    let quarantined: Vec<String> = std::fs::read_dir(dir.join("corrupt"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(quarantined.len(), 1);
    assert!(quarantined[0].ends_with(torn), "{quarantined:?}");

    // c06 .tmp: removed, never indexed.
    assert!(q.get(&ItemId::parse(&id(6)).unwrap()).is_err());
    assert!(!dir
        .join("1795169100000000000_3f1c2b9e-6a4d-4c1e-9b7a-0d2e5f8a1c06.json.tmp")
        .exists());

    // notes.txt (and the fixture's README.md): foreign, left alone,
    // counted as skipped.
    assert_eq!(
        std::fs::read_to_string(dir.join("notes.txt")).unwrap(),
        "not a queue item\n"
    );
    assert!(dir.join("README.md").exists());
    assert_eq!(stats.skipped_entries, 2);

    // The return of c04 to pending was persisted: the file (same name) now
    // says pending, and a reopen sees the same queue.
    q.close().unwrap();
    let c04_file = dir.join("1795168980000000001_3f1c2b9e-6a4d-4c1e-9b7a-0d2e5f8a1c04.json");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&c04_file).unwrap()).unwrap();
    assert_eq!(json["status"], "pending");
    assert_eq!(json["attempts"], 1);
    let q = open(&dir);
    assert_eq!(
        q.get(&ItemId::parse(&id(4)).unwrap()).unwrap().status(),
        ItemStatus::Pending
    );
    assert_eq!(q.size().unwrap(), 4);
    assert_eq!(q.stats().unwrap().quarantined, 1);
}

#[test]
fn what_we_write_is_go_shaped_and_reads_back() {
    let (_tmp, dir) = fixture_copy();
    let q = open(&dir);
    let next = at("2026-11-23T13:00:00Z");
    let c02 = q
        .requeue(&ItemId::parse(&id(2)).unwrap(), "503 from upstream", next)
        .unwrap();
    assert_eq!(c02.attempts, 4);
    let fresh = q
        .enqueue(retryq::NewItem::from_json(br#"{"version": "1.0", "findings": []}"#).unwrap())
        .unwrap();
    let fresh_item = q.get(&fresh).unwrap();
    q.close().unwrap();

    // The file name follows `{created_at nanos}_{id}.json`.
    let nanos = fresh_item.created_at.timestamp_nanos_opt().unwrap();
    let fresh_file = dir.join(format!("{nanos}_{fresh}.json"));
    let text = std::fs::read_to_string(&fresh_file).unwrap();
    assert!(
        text.starts_with("{\n  \""),
        "indented JSON like Go's: {text}"
    );
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    for field in [
        "id",
        "type",
        "fingerprint",
        "status",
        "report",
        "attempts",
        "max_attempts",
        "last_error",
        "last_attempt",
        "next_retry",
        "created_at",
        "updated_at",
        "agent_id",
        "scanner_name",
        "target_path",
    ] {
        assert!(
            json.get(field).is_some(),
            "Go field {field} missing: {text}"
        );
    }
    assert_eq!(json["last_attempt"], "0001-01-01T00:00:00Z");
    assert_eq!(json["type"], "findings");
    assert_eq!(json["status"], "pending");
    assert_eq!(json["attempts"], 0);
    assert!(
        json["report"].is_object(),
        "report is inline JSON, not a string"
    );
    assert!(json.get("lease_until").is_none());
    for time_field in ["next_retry", "created_at", "updated_at"] {
        let s = json[time_field].as_str().unwrap();
        assert!(
            DateTime::parse_from_rfc3339(s).is_ok(),
            "{time_field} is RFC 3339: {s}"
        );
    }

    let c02_file = dir.join("1795168860500000000_3f1c2b9e-6a4d-4c1e-9b7a-0d2e5f8a1c02.json");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&c02_file).unwrap()).unwrap();
    assert_eq!(json["attempts"], 4);
    assert_eq!(json["last_error"], "503 from upstream");
    assert_eq!(
        json["next_retry"]
            .as_str()
            .unwrap()
            .parse::<DateTime<Utc>>()
            .unwrap(),
        next
    );
    assert_eq!(json["agent_id"], "agent-7");

    let q = open(&dir);
    assert_eq!(q.get(&fresh).unwrap(), fresh_item);
    assert_eq!(q.get(&ItemId::parse(&id(2)).unwrap()).unwrap(), c02);
}
