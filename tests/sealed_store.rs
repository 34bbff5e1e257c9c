//! Payloads sealed at rest ([`retryq::seal`]) over every backend: no
//! plaintext reaches the disk, tampering ends in quarantine with the right
//! reason while the other items deliver, rotation and re-sealing, and
//! switching encryption on and off.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use retryq::item::ItemId;
use retryq::seal::{self, EncryptionSettings, Key, KeySource, Keyring, SealedQueue};
use retryq::store::{MemoryRetryQueue, StoreOptions};
use retryq::{FileRetryQueue, NewItem, Payload, QueueError, RetryQueue, SqliteRetryQueue};

fn id(text: &str) -> ItemId {
    ItemId::parse(text).unwrap()
}

const MARKER: &str = "MARKER-7f3c-secret-finding";
const LEASE: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug)]
enum Backend {
    Memory,
    Sqlite,
    Files,
}

const BACKENDS: [Backend; 3] = [Backend::Memory, Backend::Sqlite, Backend::Files];

fn open_inner(backend: Backend, dir: &Path) -> Arc<dyn RetryQueue> {
    let options = StoreOptions::default();
    match backend {
        Backend::Memory => Arc::new(MemoryRetryQueue::new(options)),
        Backend::Sqlite => Arc::new(SqliteRetryQueue::open(dir.join("queue.db"), options).unwrap()),
        Backend::Files => Arc::new(FileRetryQueue::open(dir.join("queue"), options).unwrap()),
    }
}

fn ring() -> Keyring {
    Keyring::new(vec![Key::generate().unwrap()], "test ring").unwrap()
}

fn sealed(inner: &Arc<dyn RetryQueue>, ring: &Keyring) -> SealedQueue {
    SealedQueue::new(inner.clone(), KeySource::fixed(ring.clone()).unwrap())
}

fn report(n: usize) -> NewItem {
    NewItem::new(Payload::from_json_str(&format!(r#"{{"finding":"{MARKER}","n":{n}}}"#)).unwrap())
        .with_id(id(&format!("item-{n}")))
        .with_attribute("x-secret-header", format!("{MARKER}-attr"))
}

fn write_key_file(path: &Path, ring: &Keyring) {
    ring.write_file(path, true).unwrap();
}

/// Every byte under `dir`, files in subdirectories included.
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(all_bytes(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.extend(bytes);
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn no_plaintext_of_a_sealed_payload_reaches_the_disk() {
    for backend in [Backend::Sqlite, Backend::Files] {
        let dir = tempfile::tempdir().unwrap();
        let inner = open_inner(backend, dir.path());
        let q = sealed(&inner, &ring());
        for n in 0..20 {
            q.enqueue(report(n)).unwrap();
        }
        // Every path an item takes: claimed, retried, updated, dead.
        let claimed = q.claim(5, LEASE).unwrap();
        assert_eq!(claimed.len(), 5, "{backend:?}");
        assert!(
            claimed[0].report.as_str().contains(MARKER),
            "opened on the way out"
        );
        q.requeue(&claimed[0].id, "boom", chrono::Utc::now())
            .unwrap();
        q.mark_failed(&claimed[1].id, "gone").unwrap();
        q.update(&claimed[2]).unwrap();
        q.enqueue_claimed(vec![report(100)], LEASE).unwrap();
        // The database and its WAL, before any checkpoint or close.
        let bytes = all_bytes(dir.path());
        assert!(!bytes.is_empty());
        assert!(!contains(&bytes, MARKER), "{backend:?}: plaintext on disk");
        assert!(
            !contains(&bytes, "x-secret-header"),
            "{backend:?}: attribute name on disk"
        );
        q.close().unwrap();
        let bytes = all_bytes(dir.path());
        assert!(
            !contains(&bytes, MARKER),
            "{backend:?}: plaintext on disk after close"
        );
        // The test would see it if it were there.
        assert!(contains(
            &[b"..", MARKER.as_bytes(), b".."].concat(),
            MARKER
        ));
    }
}

#[test]
fn sealed_items_round_trip_with_their_attributes_on_every_backend() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let inner = open_inner(backend, dir.path());
        let q = sealed(&inner, &ring());
        let item = report(1).with_type("assets");
        let mut item = item;
        item.agent_id = "agent-1".into();
        item.target_path = "/srv/secret".into();
        let fingerprint = item.report.fingerprint();
        let id = q.enqueue(item).unwrap();
        let raw = inner.get(&id).unwrap();
        assert!(!raw.report.as_str().contains(MARKER), "{backend:?}");
        assert!(raw.attributes.is_empty() && raw.target_path.is_empty());
        assert_eq!(
            raw.fingerprint, fingerprint,
            "fingerprint of the clear payload"
        );
        let got = q.get(&id).unwrap();
        assert!(got.report.as_str().contains(MARKER));
        assert_eq!(got.attributes["x-secret-header"], format!("{MARKER}-attr"));
        assert_eq!(got.agent_id, "agent-1");
        assert_eq!(got.target_path, "/srv/secret");
        // Dedupe still sees the clear payload's fingerprint.
        let dup = q
            .enqueue(report(1).with_id(ItemId::parse("other").unwrap()))
            .unwrap_err();
        assert!(
            matches!(dup, QueueError::DuplicateItem { .. }),
            "{backend:?}: {dup}"
        );
        let listed = q.list(&Default::default()).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].report, got.report);
        let claimed = q.dequeue().unwrap().unwrap();
        assert_eq!(claimed.report, got.report);
        q.close().unwrap();
    }
}

/// Changes the stored envelope of `id` through the inner store (checksums
/// and all stay valid: only the seal can tell).
fn tamper(inner: &Arc<dyn RetryQueue>, item: &str, f: impl FnOnce(&str) -> String) {
    let mut raw = inner.get(&id(item)).unwrap();
    raw.report = Payload::from_json_str(&f(raw.report.as_str())).unwrap();
    inner.update(&raw).unwrap();
}

fn flip_ct_byte(envelope: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(envelope).unwrap();
    let ct = v["ct"].as_str().unwrap();
    use base64::Engine as _;
    let mut bytes = base64::engine::general_purpose::STANDARD
        .decode(ct)
        .unwrap();
    bytes[3] ^= 0x01;
    let mut v = v.clone();
    v["ct"] = base64::engine::general_purpose::STANDARD
        .encode(bytes)
        .into();
    v.to_string()
}

#[test]
fn tampering_ends_in_quarantine_with_the_reason_and_the_rest_deliver() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let inner = open_inner(backend, dir.path());
        let q = sealed(&inner, &ring());
        for n in 0..6 {
            q.enqueue(report(n)).unwrap();
        }
        // A flipped ciphertext byte.
        tamper(&inner, "item-0", flip_ct_byte);
        // Ciphertexts swapped between two items.
        let a = inner.get(&id("item-1")).unwrap().report;
        let b = inner.get(&id("item-2")).unwrap().report;
        tamper(&inner, "item-1", |_| b.as_str().to_owned());
        tamper(&inner, "item-2", |_| a.as_str().to_owned());
        // A truncated record (what is left is still JSON, so only the
        // envelope check can catch it).
        tamper(&inner, "item-3", |env| {
            let v: serde_json::Value = serde_json::from_str(env).unwrap();
            serde_json::json!({"retryq_sealed": 1, "kid": v["kid"], "id": v["id"]}).to_string()
        });

        let err = q.get(&id("item-0")).unwrap_err();
        assert!(
            matches!(&err, QueueError::Corrupt { detail, .. } if detail.contains("failed authentication")),
            "{backend:?}: {err}"
        );
        let err = q.get(&id("item-1")).unwrap_err();
        assert!(
            err.to_string().contains("sealed for item item-2"),
            "{backend:?}: {err}"
        );
        assert_eq!(q.stats().unwrap().quarantined, 2, "{backend:?}");

        // The claim meets the other two: quarantined, the good ones delivered.
        let claimed = q.claim(10, LEASE).unwrap();
        let ids: Vec<&str> = claimed.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["item-4", "item-5"], "{backend:?}");
        assert!(claimed.iter().all(|i| i.report.as_str().contains(MARKER)));
        assert_eq!(q.stats().unwrap().quarantined, 4, "{backend:?}");
        assert_eq!(q.size().unwrap(), 2, "{backend:?}");
        for item in claimed {
            q.delete(&item.id).unwrap();
        }
        if let Backend::Sqlite = backend {
            q.close().unwrap();
            let conn = rusqlite_reasons(&dir.path().join("queue.db"));
            let find = |id: &str| {
                conn.iter()
                    .find(|(i, _)| i == id)
                    .map(|(_, r)| r.clone())
                    .unwrap_or_default()
            };
            assert!(find("item-0").contains("failed authentication"), "{conn:?}");
            assert!(
                find("item-1").contains("sealed for item item-2"),
                "{conn:?}"
            );
            assert!(
                find("item-2").contains("sealed for item item-1"),
                "{conn:?}"
            );
            assert!(find("item-3").contains("malformed"), "{conn:?}");
        }
    }
}

fn rusqlite_reasons(db: &Path) -> Vec<(String, String)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT item_id, reason FROM quarantine")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn a_truncated_sqlite_record_is_quarantined_by_its_integrity_check() {
    let dir = tempfile::tempdir().unwrap();
    let inner = open_inner(Backend::Sqlite, dir.path());
    let keys = ring();
    let q = sealed(&inner, &keys);
    for n in 0..3 {
        q.enqueue(report(n)).unwrap();
    }
    q.close().unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("queue.db")).unwrap();
    conn.execute(
        "UPDATE payloads SET body = substr(body, 1, 40) WHERE seq = (SELECT seq FROM items WHERE id = 'item-1')",
        [],
    )
    .unwrap();
    drop(conn);
    let inner = open_inner(Backend::Sqlite, dir.path());
    let q = sealed(&inner, &keys);
    let ids: Vec<String> = q
        .claim(10, LEASE)
        .unwrap()
        .into_iter()
        .map(|i| i.id.to_string())
        .collect();
    assert_eq!(ids, ["item-0", "item-2"]);
    assert_eq!(q.stats().unwrap().quarantined, 1);
    q.close().unwrap();
    let reasons = rusqlite_reasons(&dir.path().join("queue.db"));
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert_eq!(reasons[0].0, "item-1");
}

/// Rewrites item `item`'s stored body in the SQLite file with a valid
/// checksum, so only the seal can tell.
fn tamper_sqlite_body(db: &Path, item: &str, f: impl FnOnce(Vec<u8>) -> Vec<u8>) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let seq_of = "(SELECT seq FROM items WHERE id = ?1)";
    let body: Vec<u8> = conn
        .query_row(
            &format!("SELECT body FROM payloads WHERE seq = {seq_of}"),
            [item],
            |r| r.get(0),
        )
        .unwrap();
    let body = f(body);
    let checksum = i64::from(retryq::item::payload_checksum(&body));
    conn.execute(
        &format!("UPDATE payloads SET body = ?2, checksum = ?3 WHERE seq = {seq_of}"),
        rusqlite::params![item, body, checksum],
    )
    .unwrap();
}

/// SQLite keeps sealed payloads in their binary form: the same tampering,
/// done to those bytes in the file, ends in quarantine with the reasons.
#[test]
fn binary_sealed_bodies_tampered_in_the_sqlite_file_are_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("queue.db");
    let inner = open_inner(Backend::Sqlite, dir.path());
    let keys = ring();
    let q = sealed(&inner, &keys);
    for n in 0..6 {
        q.enqueue(report(n)).unwrap();
    }
    q.close().unwrap();
    let body_of = |item: &str| -> Vec<u8> {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.query_row(
            "SELECT body FROM payloads WHERE seq = (SELECT seq FROM items WHERE id = ?1)",
            [item],
            |r| r.get(0),
        )
        .unwrap()
    };
    let (a, b) = (body_of("item-1"), body_of("item-2"));
    assert!(a.starts_with(b"\x01RQS1"), "stored in the binary form");
    assert!(!a.starts_with(b"{"));
    // A flipped byte of the tag, swapped bodies, and one cut inside its nonce.
    tamper_sqlite_body(&db, "item-0", |mut body| {
        let last = body.len() - 1;
        body[last] ^= 0x40;
        body
    });
    tamper_sqlite_body(&db, "item-1", |_| b.clone());
    tamper_sqlite_body(&db, "item-2", |_| a.clone());
    tamper_sqlite_body(&db, "item-3", |body| body[..5 + 8 + 1 + 6 + 4].to_vec());

    let inner = open_inner(Backend::Sqlite, dir.path());
    let q = sealed(&inner, &keys);
    let claimed = q.claim(10, LEASE).unwrap();
    let ids: Vec<&str> = claimed.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["item-4", "item-5"]);
    assert!(claimed.iter().all(|i| i.report.as_str().contains(MARKER)));
    assert_eq!(q.stats().unwrap().quarantined, 4);
    q.close().unwrap();
    let reasons = rusqlite_reasons(&db);
    let find = |id: &str| {
        reasons
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, r)| r.clone())
            .unwrap_or_default()
    };
    assert!(
        find("item-0").contains("failed authentication"),
        "{reasons:?}"
    );
    assert!(
        find("item-1").contains("sealed for item item-2"),
        "{reasons:?}"
    );
    assert!(
        find("item-2").contains("sealed for item item-1"),
        "{reasons:?}"
    );
    assert!(
        find("item-3").contains("cut short in the nonce"),
        "{reasons:?}"
    );
}

/// A sealed SQLite store moved into a JSON backend and back
/// (`retryq migrate`): the envelopes change form, not contents, and open.
#[test]
fn sealed_items_imported_between_byte_and_json_backends_still_open() {
    let dir = tempfile::tempdir().unwrap();
    let keys = ring();
    let sqlite = open_inner(Backend::Sqlite, dir.path());
    let q = sealed(&sqlite, &keys);
    for n in 0..3 {
        q.enqueue(report(n)).unwrap();
    }
    let raw = sqlite.list(&Default::default()).unwrap();
    let files = open_inner(Backend::Files, dir.path());
    let to_files = sealed(&files, &keys);
    assert!(to_files
        .import_batch(raw)
        .unwrap()
        .into_iter()
        .all(|r| r.is_ok()));
    let stored = files.list(&Default::default()).unwrap();
    assert!(stored
        .iter()
        .all(|i| i.report.as_str().starts_with("{\"retryq_sealed\":1,")));
    let back_dir = tempfile::tempdir().unwrap();
    let sqlite_again = open_inner(Backend::Sqlite, back_dir.path());
    let to_sqlite = sealed(&sqlite_again, &keys);
    assert!(to_sqlite
        .import_batch(stored)
        .unwrap()
        .into_iter()
        .all(|r| r.is_ok()));
    assert_eq!(seal::census(sqlite_again.as_ref()).unwrap().sealed(), 3);
    for (q, name) in [(&to_files, "files"), (&to_sqlite, "sqlite")] {
        let claimed = q.claim(10, LEASE).unwrap();
        assert_eq!(claimed.len(), 3, "{name}");
        assert!(
            claimed.iter().all(|i| i.report.as_str().contains(MARKER)
                && i.attributes["x-secret-header"].contains(MARKER)),
            "{name}"
        );
    }
    let db = back_dir.path().join("queue.db");
    to_sqlite.close().unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let binary: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM payloads WHERE substr(body, 1, 5) = ?1",
            [b"\x01RQS1".as_slice()],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(binary, 3, "imported into SQLite in the binary form");
}

#[test]
fn old_key_items_deliver_after_a_rotation_and_a_reseal_leaves_none_under_it() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let inner = open_inner(backend, dir.path());
        let old = ring();
        let q = sealed(&inner, &old);
        for n in 0..10 {
            q.enqueue(report(n)).unwrap();
        }
        let rotated = old.with_key(Key::generate().unwrap()).unwrap();
        let q = sealed(&inner, &rotated);
        q.enqueue(report(50)).unwrap();
        let census = seal::census(inner.as_ref()).unwrap();
        assert_eq!(census.by_key[&old.sealing().id], 10, "{backend:?}");
        assert_eq!(census.by_key[&rotated.sealing().id], 1, "{backend:?}");
        // Old-key items still deliver.
        let first = q.claim(2, LEASE).unwrap();
        assert_eq!(first.len(), 2);
        assert!(first.iter().all(|i| i.report.as_str().contains(MARKER)));
        // A delivery in flight while the re-seal runs keeps its claim.
        let sealer = q.sealer();
        let raw = inner.list(&Default::default()).unwrap();
        for chunk in raw.chunks(3) {
            seal::reseal_batch(inner.as_ref(), &sealer, chunk).unwrap();
        }
        let census = seal::census(inner.as_ref()).unwrap();
        assert_eq!(census.by_key.len(), 1, "{backend:?}: {census:?}");
        assert_eq!(census.by_key[&rotated.sealing().id], 11);
        assert_eq!(
            inner.get(&first[0].id).unwrap().status(),
            retryq::ItemStatus::Processing
        );
        q.delete(&first[0].id).unwrap();
        // Everything opens with the new key alone.
        let only_new = Keyring::new(vec![rotated.sealing().clone()], "new").unwrap();
        let q = sealed(&inner, &only_new);
        q.check_keys().unwrap();
        assert_eq!(q.claim(20, LEASE).unwrap().len(), 9, "{backend:?}");
        q.close().unwrap();
    }
}

#[test]
fn a_reseal_leaves_alone_an_item_whose_payload_changed_since_it_was_read() {
    let dir = tempfile::tempdir().unwrap();
    let inner = open_inner(Backend::Sqlite, dir.path());
    let old = ring();
    sealed(&inner, &old).enqueue(report(1)).unwrap();
    let stale = inner.list(&Default::default()).unwrap();
    // Meanwhile somebody else re-sealed it (or updated it).
    let rotated = old.with_key(Key::generate().unwrap()).unwrap();
    let q = sealed(&inner, &rotated);
    let mut item = q.get(&id("item-1")).unwrap();
    item.max_attempts = 7;
    q.update(&item).unwrap();
    let now_stored = inner.get(&id("item-1")).unwrap();
    let report = seal::reseal_batch(inner.as_ref(), &q.sealer(), &stale).unwrap();
    assert_eq!(report.resealed, 0);
    assert_eq!(report.changed, 1);
    assert_eq!(
        inner.get(&id("item-1")).unwrap(),
        now_stored,
        "left as it was"
    );
}

#[test]
fn encryption_on_over_a_clear_queue_keeps_old_items_readable_and_seals_new_ones() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let inner = open_inner(backend, dir.path());
        inner.enqueue(report(1)).unwrap();
        let key_file = dir.path().join("keys.toml");
        write_key_file(&key_file, &ring());
        let settings = EncryptionSettings {
            key_file: Some(key_file),
            key_env: None,
        };
        let q = seal::wrap_store(inner.clone(), &settings).unwrap();
        q.enqueue(report(2)).unwrap();
        let census = seal::census(inner.as_ref()).unwrap();
        assert_eq!(census.sealed(), 1, "{backend:?}");
        assert_eq!(inner.size().unwrap(), 2);
        let claimed = q.claim(10, LEASE).unwrap();
        assert_eq!(claimed.len(), 2);
        assert!(claimed.iter().all(|i| i.report.as_str().contains(MARKER)));
        assert!(claimed
            .iter()
            .all(|i| i.attributes["x-secret-header"].contains(MARKER)));
        q.close().unwrap();
    }
}

#[test]
fn encryption_off_over_sealed_items_is_refused_with_the_count() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let inner = open_inner(backend, dir.path());
        let keys = ring();
        let q = sealed(&inner, &keys);
        for n in 0..3 {
            q.enqueue(report(n)).unwrap();
        }
        let err = seal::wrap_store(inner.clone(), &EncryptionSettings::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("encryption is off"), "{err}");
        assert!(err.contains("3 item(s)"), "{err}");
        assert!(
            err.contains(&format!("{} (3 items)", keys.sealing().id)),
            "{err}"
        );
    }
}

#[test]
fn a_missing_key_is_refused_naming_it_and_the_items_that_need_it() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let inner = open_inner(backend, dir.path());
        let lost = ring();
        let q = sealed(&inner, &lost);
        for n in 0..4 {
            q.enqueue(report(n)).unwrap();
        }
        let key_file = dir.path().join("keys.toml");
        write_key_file(&key_file, &ring());
        let settings = EncryptionSettings {
            key_file: Some(key_file.clone()),
            key_env: None,
        };
        let err = seal::wrap_store(inner.clone(), &settings)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(&format!("{} (4 items)", lost.sealing().id)),
            "{err}"
        );
        assert!(err.contains(&key_file.display().to_string()), "{err}");
        // Nothing was destroyed for want of the key.
        if !matches!(backend, Backend::Memory) {
            let reopened = open_inner(backend, dir.path());
            let census = seal::census(reopened.as_ref()).unwrap();
            assert_eq!(census.by_key[&lost.sealing().id], 4, "{backend:?}");
        }
    }
}

#[test]
fn a_running_queue_reads_a_rotated_key_file_and_seals_with_the_new_key() {
    let dir = tempfile::tempdir().unwrap();
    let inner = open_inner(Backend::Memory, dir.path());
    let key_file = dir.path().join("keys.toml");
    let old = ring();
    write_key_file(&key_file, &old);
    let settings = EncryptionSettings {
        key_file: Some(key_file.clone()),
        key_env: None,
    };
    let q = seal::wrap_store(inner.clone(), &settings).unwrap();
    q.enqueue(report(1)).unwrap();
    // Another process (`retryq keys rotate --reseal`) adds a key and
    // re-seals under it.
    let rotated = old.with_key(Key::generate().unwrap()).unwrap();
    write_key_file(&key_file, &rotated);
    let other = sealed(&inner, &rotated);
    let raw = inner.list(&Default::default()).unwrap();
    assert_eq!(
        seal::reseal_batch(inner.as_ref(), &other.sealer(), &raw)
            .unwrap()
            .resealed,
        1
    );
    // The running queue meets the new key ID and re-reads the file.
    assert!(q
        .get(&id("item-1"))
        .unwrap()
        .report
        .as_str()
        .contains(MARKER));
    std::thread::sleep(Duration::from_millis(1100));
    q.enqueue(report(2)).unwrap();
    let census = seal::census(inner.as_ref()).unwrap();
    assert_eq!(
        census.by_key.keys().collect::<Vec<_>>(),
        [&rotated.sealing().id]
    );
}

#[test]
fn items_prepared_on_the_callers_thread_are_stored_sealed_once_and_handed_back_clear() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let inner = open_inner(backend, dir.path());
        let q = sealed(&inner, &ring());
        let prepared = q.prepare_new(vec![report(1), report(2)]).unwrap();
        assert!(prepared.iter().all(|i| !i.report.as_str().contains(MARKER)));
        let claimed = q.enqueue_claimed(prepared, LEASE).unwrap();
        let clear = claimed[0].as_ref().unwrap();
        assert!(clear.report.as_str().contains(MARKER), "{backend:?}");
        assert_eq!(
            clear.attributes.len(),
            1,
            "the marker is not stored: {:?}",
            clear.attributes
        );
        let raw = inner.get(&id("item-1")).unwrap();
        assert!(
            raw.attributes.is_empty(),
            "{backend:?}: {:?}",
            raw.attributes
        );
        assert_eq!(
            q.get(&id("item-1")).unwrap().report,
            clear.report,
            "sealed once"
        );
        // A producer cannot pass its own envelope off as prepared.
        let forged = NewItem::new(
            Payload::from_json_str(&format!(r#"{{"finding":"{MARKER}","n":3}}"#)).unwrap(),
        )
        .with_id(id("item-3"))
        .with_attribute("retryq-prepared-seal", "guess");
        q.enqueue(forged).unwrap();
        let got = q.get(&id("item-3")).unwrap();
        assert_eq!(got.attributes["retryq-prepared-seal"], "guess");
        assert!(got.report.as_str().contains(MARKER));
        q.close().unwrap();
    }
}
