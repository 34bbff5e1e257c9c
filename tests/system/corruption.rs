//! Corruption: bytes flipped in the SQLite database file, and a directory
//! (plus a foreign file) among the file backend's item files. The daemon
//! must start, deliver everything intact, report the damaged part, and
//! neither stall nor re-send in a loop.

use std::path::Path;
use std::time::Duration;

use crate::harness::{report, wait_until, Deployment};
use crate::upstream::{Mode, Upstream};

/// The queue is built against an upstream answering 401: delivery pauses
/// at the first push without burning an attempt or moving `next_retry`, so
/// every item is due again at the restart (a pause lives only in memory).
const BUILD: &str = r#"
[worker]
interval = "200ms"
batch_size = 50
max_attempts = 1000
"#;

/// A larger, varied report, so 200 of them span many database pages.
fn big_report(scenario: &str, n: usize) -> serde_json::Value {
    let mut r = report(scenario, n);
    r["detail"] = serde_json::Value::String(format!("{n:08}-").repeat(40));
    r
}

/// Flips `count` bytes of `path` at offsets from `from` on, chosen by a
/// seeded xorshift so a failure can be replayed.
fn flip_bytes(path: &Path, from: usize, count: usize, seed: u64) -> Vec<usize> {
    let mut bytes = std::fs::read(path).unwrap();
    assert!(bytes.len() > from + 4096, "{} is too small", path.display());
    let mut state = seed;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut offsets = Vec::new();
    for _ in 0..count {
        let offset = from + (next() as usize) % (bytes.len() - from);
        bytes[offset] ^= (next() % 255 + 1) as u8;
        offsets.push(offset);
    }
    std::fs::write(path, bytes).unwrap();
    offsets
}

#[test]
fn flipped_bytes_in_the_sqlite_file_neither_stall_nor_loop() {
    const ITEMS: usize = 200;
    const FLIPS: usize = 16;
    const SEED: u64 = 0x5eed_0013;
    let upstream = Upstream::start(Mode::Unauthorized);
    let dep = Deployment::new();
    let config = dep.config(&upstream, BUILD);
    let daemon = dep.start(&config);
    let ids: Vec<String> = (0..ITEMS)
        .map(|n| daemon.enqueue(&big_report("sqlite-corrupt", n)))
        .collect();
    assert_eq!(daemon.sigterm().code(), Some(0));

    let db = dep.path().join("queue.db");
    // Past page 1 (the header and the schema): damage to records and
    // indexes, not a file that is no database at all.
    let offsets = flip_bytes(&db, 4096, FLIPS, SEED);
    let sent_before = upstream.request_count();
    upstream.set_mode(Mode::Accept);

    let mut daemon = dep.try_start(&config).unwrap_or_else(|e| {
        panic!(
            "the daemon did not start on a damaged database: {e}\n{}",
            crate::harness::log_tail(&dep.log, 40)
        )
    });
    // Drained: nothing left to deliver (dead letters and quarantine aside).
    let drained = wait_until(Duration::from_secs(30), || {
        daemon
            .api("GET", "/v1/stats", None)
            .is_ok_and(|(s, v)| s == 200 && v["pending_items"] == 0 && v["processing_items"] == 0)
    });
    assert!(
        daemon.is_running(),
        "the daemon died on the damaged database"
    );
    let stats = daemon.stats();
    assert!(
        drained,
        "the queue did not drain within 30 s (flips at {offsets:?}, seed {SEED:#x}): {stats}"
    );

    // No re-send loop: once drained, the upstream hears nothing more, and
    // no item was pushed more than a couple of times.
    let settled = upstream.request_count();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        upstream.request_count(),
        settled,
        "pushes continue after the drain: a loop (stats: {stats})"
    );
    let accepted = upstream.accepted_per_key();
    let worst = accepted.values().copied().max().unwrap_or(0);
    assert!(worst <= 3, "an item was delivered {worst} times");

    let delivered = ids.iter().filter(|id| accepted.contains_key(*id)).count();
    let reported = ["quarantined", "salvage_lost", "failed_items"]
        .iter()
        .map(|k| stats[k].as_u64().unwrap_or(0))
        .sum::<u64>();
    eprintln!(
        "sqlite corruption: {FLIPS} flips at {offsets:?}: {delivered}/{ITEMS} delivered, \
         {sent_before} pushes while building; stats: quarantined {} salvaged {} salvage_lost {} failed {}",
        stats["quarantined"], stats["salvaged"], stats["salvage_lost"], stats["failed_items"]
    );
    // Sixteen flipped bytes damage at most sixteen pages; a page holds a
    // few dozen records at most, so most of the queue must get through.
    assert!(
        delivered >= ITEMS / 2,
        "only {delivered} of {ITEMS} items delivered after {FLIPS} flipped bytes: {stats}"
    );
    if delivered < ITEMS {
        assert!(
            reported > 0,
            "{} items neither delivered nor reported (quarantined, salvage_lost, failed): {stats}",
            ITEMS - delivered
        );
    }
}

#[test]
fn a_directory_among_the_queue_files_does_not_stop_the_files_backend() {
    let upstream = Upstream::start(Mode::Unauthorized);
    let dep = Deployment::new();
    let queue = dep.path().join("queue");
    let config = dep.config(
        &upstream,
        &format!(
            "[store]\nbackend = \"files\"\npath = \"{}\"\n{BUILD}",
            queue.display()
        ),
    );
    let daemon = dep.start(&config);
    let ids: Vec<String> = (0..20)
        .map(|n| daemon.enqueue(&report("files-corrupt", n)))
        .collect();
    assert_eq!(daemon.sigterm().code(), Some(0));

    // A folder with an item file's name, a foreign file and a record whose
    // name does not parse: none of them may stop the open.
    let item_file = std::fs::read_dir(&queue)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .find(|n| n.ends_with(".json"))
        .expect("an item file in the queue folder");
    let (nanos, _) = item_file.split_once('_').unwrap();
    let folder = queue.join(format!("{nanos}_01a20000-0000-7000-8000-000000000001.json"));
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(queue.join("notes.txt"), "left by an operator\n").unwrap();
    std::fs::copy(queue.join(&item_file), queue.join("garbage_name.json")).unwrap();

    upstream.set_mode(Mode::Accept);
    let mut daemon = dep.try_start(&config).unwrap_or_else(|e| {
        panic!(
            "the files backend refused to open with a folder among its items: {e}\n{}",
            crate::harness::log_tail(&dep.log, 40)
        )
    });
    let drained = wait_until(Duration::from_secs(15), || {
        daemon
            .api("GET", "/v1/stats", None)
            .is_ok_and(|(s, v)| s == 200 && v["pending_items"] == 0 && v["processing_items"] == 0)
    });
    assert!(daemon.is_running());
    let stats = daemon.stats();
    assert!(drained, "the files backend did not drain: {stats}");
    let accepted = upstream.accepted_per_key();
    for id in &ids {
        assert!(accepted.contains_key(id), "item {id} never delivered");
    }
    assert!(folder.is_dir(), "the folder was not left where it was");
    assert_eq!(
        std::fs::read_to_string(queue.join("notes.txt")).unwrap(),
        "left by an operator\n",
        "a foreign file was touched"
    );
    assert!(
        stats["skipped_entries"].as_u64() >= Some(1),
        "the folder among the items was not counted (skipped_entries): {stats}"
    );
}
