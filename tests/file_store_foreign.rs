//! Foreign and unreadable entries in a queue directory, on the real disk:
//! nothing in the directory stops the open, nothing foreign is moved or
//! changed, and what cannot be read goes to the quarantine.

mod file_store_sim;

use retryq::item::ItemId;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use file_store_sim::{clock, item, options};
use retryq::store::{FileRetryQueue, RetryQueue};

/// Everything directly in `dir` except the quarantine, with each file's
/// bytes (a folder lists as its entry count, a symlink as its target).
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    snapshot_without(dir, "corrupt")
}

/// [`snapshot`], leaving out `skip` too (a FIFO cannot be read).
fn snapshot_without(dir: &Path, skip: &str) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name() != "corrupt" && e.file_name() != skip)
        .map(|e| {
            let kind = e.file_type().unwrap();
            let bytes = if kind.is_symlink() {
                std::fs::read_link(e.path())
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else if kind.is_dir() {
                std::fs::read_dir(e.path())
                    .unwrap()
                    .count()
                    .to_string()
                    .into_bytes()
            } else {
                std::fs::read(e.path()).unwrap()
            };
            (e.file_name().into_string().unwrap(), bytes)
        })
        .collect()
}

#[test]
fn nothing_in_the_directory_stops_the_open() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("queue");
    let clock = clock();
    let store = FileRetryQueue::open(&dir, options(&clock)).unwrap();
    let ids: Vec<ItemId> = (0..20)
        .map(|n| store.enqueue(item(&format!("item-{n:02}"))).unwrap())
        .collect();
    let a_record = std::fs::read(
        std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "json"))
            .unwrap(),
    )
    .unwrap();
    store.close().unwrap();

    // A directory standing where an item file should be (with a file in it).
    let as_dir = dir.join("1795168800123456789_3f1c2b9e-6a4d-4c1e-9b7a-0d2e5f8a1c01.json");
    std::fs::create_dir(&as_dir).unwrap();
    std::fs::write(as_dir.join("inside"), b"x").unwrap();
    // An item file that cannot be read: a link to nowhere (tests run as
    // root, where a chmod 000 file still reads).
    let unreadable = "1795168800123456790_3f1c2b9e-6a4d-4c1e-9b7a-0d2e5f8a1c02.json";
    std::os::unix::fs::symlink(tmp.path().join("nowhere"), dir.join(unreadable)).unwrap();
    // A FIFO named like an item file: reading it must not block the open.
    let fifo = "1795168800123456791_3f1c2b9e-6a4d-4c1e-9b7a-0d2e5f8a1c03.json";
    let made = std::process::Command::new("mkfifo")
        .arg(dir.join(fifo))
        .status()
        .unwrap();
    assert!(made.success());
    // A valid record under a name that does not parse.
    std::fs::write(dir.join("garbage_name.json"), &a_record).unwrap();
    // Foreign entries.
    std::fs::write(dir.join("notes.txt"), b"not a queue item\n").unwrap();
    std::fs::create_dir(dir.join("backup")).unwrap();
    // retryq's own owner lock is not foreign.
    std::fs::write(dir.join(retryq::store::owner::OWNER_LOCK_FILE), b"{}").unwrap();
    let mut foreign = snapshot_without(&dir, fifo);
    foreign.remove(unreadable);

    let store = FileRetryQueue::open(&dir, options(&clock)).expect("open succeeds");
    assert_eq!(store.size().unwrap(), 20, "every intact item is there");
    for id in &ids {
        store.get(&ItemId::parse(id).unwrap()).unwrap();
    }
    let stats = store.stats().unwrap();
    assert_eq!(
        stats.quarantined, 2,
        "the unreadable item file and the FIFO"
    );
    assert_eq!(
        stats.skipped_entries, 4,
        "item-named dir, garbage_name.json, notes.txt, backup/"
    );
    // Nothing foreign moved or changed; the unreadable file went aside.
    assert_eq!(snapshot(&dir), foreign);
    let mut quarantined: Vec<String> = std::fs::read_dir(dir.join("corrupt"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    quarantined.sort();
    assert_eq!(quarantined.len(), 2);
    assert!(quarantined[0].ends_with(unreadable), "{quarantined:?}");
    assert!(quarantined[1].ends_with(fifo), "{quarantined:?}");

    // The store works, and a reopen counts the same.
    let id = store.enqueue(item("after")).unwrap();
    assert!(store
        .claim(100, Duration::from_secs(60))
        .unwrap()
        .iter()
        .any(|i| i.id == id));
    store.close().unwrap();
    let store = FileRetryQueue::open(&dir, options(&clock)).unwrap();
    let stats = store.stats().unwrap();
    assert_eq!(
        (stats.total_items, stats.quarantined, stats.skipped_entries),
        (21, 2, 4)
    );
}
