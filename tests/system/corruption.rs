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

const ITEMS: usize = 200;
const SEED: u64 = 0x5eed_0013;

#[test]
fn flipped_bytes_in_the_sqlite_file_neither_stall_nor_loop() {
    // Past page 1 (the header and the schema): damage to records and
    // indexes. Sixteen bytes hit at most sixteen pages, and a page holds a
    // few dozen records at most: most of the queue must get through.
    damaged_sqlite("16 flips past page 1", ITEMS / 2, |db| {
        format!("offsets {:?}", flip_bytes(db, 4096, 16, SEED))
    });
}

#[test]
fn many_flipped_bytes_and_a_damaged_first_page_neither_stall_nor_loop() {
    // The issue's case: 64 bytes past the header, so page 1 (the schema)
    // can be hit too. No minimum: only no stall, no loop, and a report.
    damaged_sqlite("64 flips past the header", 0, |db| {
        let offsets = flip_bytes(db, 100, 64, SEED ^ 64);
        // SQLite fills page 1 from its end: the schema text sits there.
        let mut bytes = std::fs::read(db).unwrap();
        bytes[3900] ^= 0x5a;
        std::fs::write(db, bytes).unwrap();
        format!(
            "seed {:#x}, {} of them on page 1, plus one at 3900",
            SEED ^ 64,
            offsets.iter().filter(|o| **o < 4096).count()
        )
    });
}

#[test]
fn a_sqlite_file_truncated_to_half_is_salvaged() {
    damaged_sqlite("truncated to half", 0, |db| {
        let len = std::fs::metadata(db).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(db).unwrap();
        file.set_len(len / 2).unwrap();
        format!("{len} bytes cut to {}", len / 2)
    });
}

/// Builds a 200-item SQLite queue, stops the daemon, lets `damage` break
/// the file, restarts against an accepting upstream and checks: the daemon
/// starts, the queue drains within 30 s, nothing is pushed once drained
/// nor any item more than 3 times, at least `min_delivered` items arrive,
/// and whatever did not arrive is reported in `stats`.
fn damaged_sqlite(what: &str, min_delivered: usize, damage: impl FnOnce(&Path) -> String) {
    let upstream = Upstream::start(Mode::Unauthorized);
    let dep = Deployment::new();
    let config = dep.config(&upstream, BUILD);
    let daemon = dep.start(&config);
    let ids: Vec<String> = (0..ITEMS)
        .map(|n| daemon.enqueue(&big_report("sqlite-corrupt", n)))
        .collect();
    assert_eq!(daemon.sigterm().code(), Some(0));

    let damage = damage(&dep.path().join("queue.db"));
    let what = format!("{what} ({damage})");
    upstream.set_mode(Mode::Accept);

    let mut daemon = dep.try_start(&config).unwrap_or_else(|e| {
        panic!(
            "the daemon did not start on a database {what}: {e}\n{}",
            crate::harness::log_tail(&dep.log, 40)
        )
    });
    // Drained: nothing left to deliver (dead letters and quarantine aside).
    let drained = wait_until(Duration::from_secs(30), || {
        daemon
            .api("GET", "/v1/stats", None)
            .is_ok_and(|(s, v)| s == 200 && v["pending_items"] == 0 && v["processing_items"] == 0)
    });
    assert!(daemon.is_running(), "the daemon died on a database {what}");
    let stats = daemon.stats();
    assert!(
        drained,
        "the queue did not drain within 30 s, database {what}: {stats}"
    );

    // No re-send loop: once drained, the upstream hears nothing more, and
    // no item was pushed more than a couple of times.
    let settled = upstream.request_count();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        upstream.request_count(),
        settled,
        "pushes continue after the drain, database {what}: a loop (stats: {stats})"
    );
    let accepted = upstream.accepted_per_key();
    let worst = accepted.values().copied().max().unwrap_or(0);
    assert!(
        worst <= 3,
        "an item was delivered {worst} times, database {what}"
    );

    let delivered = ids.iter().filter(|id| accepted.contains_key(*id)).count();
    let counter = |k: &str| stats[k].as_u64().unwrap_or(0);
    eprintln!(
        "sqlite {what}: {delivered}/{ITEMS} delivered; quarantined {} salvaged {} \
         salvage_lost {} failed {}",
        counter("quarantined"),
        counter("salvaged"),
        counter("salvage_lost"),
        counter("failed_items")
    );
    assert!(
        delivered >= min_delivered,
        "only {delivered} of {ITEMS} items delivered, database {what}: {stats}"
    );
    if delivered < ITEMS {
        let reported = ["quarantined", "salvaged", "salvage_lost", "failed_items"]
            .iter()
            .map(|k| counter(k))
            .sum::<u64>();
        assert!(
            reported > 0,
            "{} items neither delivered nor reported (quarantined, salvaged, salvage_lost, \
             failed), database {what}: {stats}",
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
