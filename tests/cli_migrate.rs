//! `retryq migrate` on a copy of the Go SDK fixture: four items survive with
//! their attempts, state and timestamps, one torn file is quarantined, and
//! the source directory is left untouched. On a generated Go directory: the
//! summary counts, a re-run imports nothing new, and a run killed half way
//! then run again leaves every item exactly once. A store a daemon owns is
//! refused.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A copy of `shared/fixtures/go-retry-queue` (a queue directory as the Go
/// SDK leaves it), kept in the repository so the test needs nothing beside
/// the checkout.
fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/go-retry-queue")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn retryq(dir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_retryq"));
    for (k, _) in std::env::vars() {
        if k.starts_with("RETRYQ") {
            cmd.env_remove(k);
        }
    }
    cmd.current_dir(dir).args(args).output().unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn migrate_into(backend: &str) {
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go-queue");
    copy_dir(&fixture, &go);
    let before = listing(&go);
    std::fs::write(
        dir.path().join("r.toml"),
        format!("[store]\nbackend = \"{backend}\"\npath = \"target-store\"\n"),
    )
    .unwrap();

    let out = retryq(
        dir.path(),
        &["--json", "-c", "r.toml", "migrate", "--from", "go-queue"],
    );
    let report = json(&out);
    assert_eq!(report["found"], 4, "{report}");
    assert_eq!(report["imported"], 4, "{report}");
    assert_eq!(report["imported_failed"], 1, "{report}");
    assert_eq!(report["quarantined"], 1, "{report}");
    let q = report["quarantined_files"].as_array().unwrap();
    assert_eq!(q.len(), 1);
    assert!(q[0].as_str().unwrap().contains("c05"), "{report}");
    assert_eq!(report["skipped"], 0, "{report}");
    assert_eq!(
        report["foreign_entries"], 2,
        "notes.txt, README.md: {report}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("migrating"), "no progress with --json: {err}");
    assert!(err.contains("c05"), "quarantine reported on stderr: {err}");

    // The Go directory is untouched.
    assert_eq!(listing(&go), before);

    let stats = json(&retryq(dir.path(), &["--json", "-c", "r.toml", "stats"]));
    assert_eq!(stats["total_items"], 4);
    assert_eq!(stats["pending_items"], 3);
    assert_eq!(stats["failed_items"], 1);
    assert_eq!(stats["processing_items"], 0);

    let id = |n: u8| format!("3f1c2b9e-6a4d-4c1e-9b7a-0d2e5f8a1c0{n}");
    let c02 = json(&retryq(
        dir.path(),
        &["--json", "-c", "r.toml", "show", &id(2)],
    ));
    assert_eq!(c02["attempts"], 3);
    assert_eq!(c02["status"], "pending");
    assert!(!c02["last_error"].as_str().unwrap().is_empty());
    let go_c02: serde_json::Value = serde_json::from_slice(
        &std::fs::read(go.join(format!("1795168860500000000_{}.json", id(2)))).unwrap(),
    )
    .unwrap();
    let same_time = |a: &serde_json::Value, b: &serde_json::Value| {
        let a = chrono::DateTime::parse_from_rfc3339(a.as_str().unwrap()).unwrap();
        let b = chrono::DateTime::parse_from_rfc3339(b.as_str().unwrap()).unwrap();
        assert_eq!(a, b);
    };
    same_time(&c02["created_at"], &go_c02["created_at"]);
    same_time(&c02["next_retry"], &go_c02["next_retry"]);
    assert_eq!(c02["fingerprint"], go_c02["fingerprint"]);
    let c03 = json(&retryq(
        dir.path(),
        &["--json", "-c", "r.toml", "show", &id(3)],
    ));
    assert_eq!(c03["status"], "failed");
    let c04 = json(&retryq(
        dir.path(),
        &["--json", "-c", "r.toml", "show", &id(4)],
    ));
    assert_eq!(c04["status"], "pending", "a claim left by Go is released");

    // Running it again imports nothing twice.
    let again = json(&retryq(
        dir.path(),
        &["--json", "-c", "r.toml", "migrate", "--from", "go-queue"],
    ));
    assert_eq!(again["imported"], 0);
    assert_eq!(again["skipped"], 4);
    let stats = json(&retryq(dir.path(), &["--json", "-c", "r.toml", "stats"]));
    assert_eq!(stats["total_items"], 4);
}

#[test]
fn migrate_go_fixture_into_sqlite() {
    migrate_into("sqlite");
}

#[test]
fn migrate_go_fixture_into_files() {
    migrate_into("files");
}

#[test]
fn migrate_from_a_missing_directory_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = retryq(dir.path(), &["migrate", "--from", "nowhere"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nowhere"));
}

/// Writes `n` items as the Go SDK would (`{created nanos}_{id}.json`,
/// indented JSON with its field names, no checksum), each report about
/// `pad` bytes; every seventh has failed attempts, every thirteenth is a
/// dead letter. Returns the IDs.
pub fn write_go_queue(dir: &Path, n: usize, pad: usize) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    let base: i64 = 1_795_168_800_000_000_000;
    let padding = "x".repeat(pad);
    (0..n)
        .map(|i| {
            let id = format!("00000000-0000-4000-8000-{i:012}");
            let nanos = base + i as i64 * 1_000;
            let at = chrono::DateTime::from_timestamp_nanos(nanos).to_rfc3339();
            let (status, attempts, error) = match i {
                i if i % 13 == 0 => ("failed", 5, "422 unprocessable"),
                i if i % 7 == 0 => ("pending", 2, "503 unavailable"),
                _ => ("pending", 0, ""),
            };
            let last_attempt = if attempts > 0 {
                at.clone()
            } else {
                "0001-01-01T00:00:00Z".to_owned()
            };
            let record = serde_json::json!({
                "id": id,
                "type": "findings",
                "fingerprint": format!("fp-{i}"),
                "status": status,
                "report": {"scan": i, "pad": padding},
                "attempts": attempts,
                "max_attempts": 5,
                "last_error": error,
                "last_attempt": last_attempt,
                "next_retry": at,
                "created_at": at,
                "updated_at": at,
                "agent_id": "agent-1",
                "scanner_name": "bench",
                "target_path": "/src",
            });
            std::fs::write(
                dir.join(format!("{nanos}_{id}.json")),
                serde_json::to_vec_pretty(&record).unwrap(),
            )
            .unwrap();
            id
        })
        .collect()
}

fn sqlite_config(dir: &Path) {
    std::fs::write(
        dir.join("r.toml"),
        "[store]\nbackend = \"sqlite\"\npath = \"target.db\"\nmax_items = 1000000\n",
    )
    .unwrap();
}

fn stored_ids(dir: &Path) -> Vec<String> {
    let list = json(&retryq(
        dir,
        &["--json", "-c", "r.toml", "list", "--limit", "1000000"],
    ));
    let mut ids: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

#[test]
fn summary_counts_then_a_rerun_imports_nothing_new() {
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let ids = write_go_queue(&go, 600, 64);
    std::fs::write(go.join("1795168800000000000_torn.json"), b"{\"id\": \"to").unwrap();
    std::fs::create_dir(go.join("1795168800000000001_a-folder.json")).unwrap();
    sqlite_config(dir.path());

    // Without --json and with stderr not a terminal: plain progress lines
    // and a summary line.
    let out = retryq(dir.path(), &["-c", "r.toml", "migrate", "--from", "go"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("migrating: 601/601 items"), "{err}");
    assert!(err.contains("1795168800000000001_a-folder.json"), "{err}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("imported 600 of 600"), "{text}");
    assert!(text.contains("0 skipped"), "{text}");
    assert!(text.contains("1 quarantined"), "{text}");
    assert!(stored_ids(dir.path()) == ids, "every item imported once");

    let again = json(&retryq(
        dir.path(),
        &["--json", "-c", "r.toml", "migrate", "--from", "go"],
    ));
    assert_eq!(again["imported"], 0, "{again}");
    assert_eq!(again["skipped"], 600, "{again}");
    assert_eq!(again["quarantined"], 1, "{again}");
    assert_eq!(again["foreign_entries"], 1, "{again}");
    let stats = json(&retryq(dir.path(), &["--json", "-c", "r.toml", "stats"]));
    assert_eq!(stats["total_items"], 600);
    assert_eq!(
        stats["failed_items"],
        (0..600).filter(|i| i % 13 == 0).count()
    );
    // State and times as the Go files hold them.
    let item = json(&retryq(
        dir.path(),
        &["--json", "-c", "r.toml", "show", &ids[7]],
    ));
    assert_eq!(item["attempts"], 2);
    assert_eq!(item["last_error"], "503 unavailable");
    let created = chrono::DateTime::parse_from_rfc3339(item["created_at"].as_str().unwrap())
        .unwrap()
        .timestamp_nanos_opt()
        .unwrap();
    assert_eq!(created, 1_795_168_800_000_000_000 + 7_000);
}

#[test]
fn a_killed_run_then_a_rerun_leaves_every_item_once() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let n = 6_000;
    let ids = write_go_queue(&go, n, 512);
    sqlite_config(dir.path());

    let mut child = Command::new(env!("CARGO_BIN_EXE_retryq"))
        .current_dir(dir.path())
        .args(["-c", "r.toml", "migrate", "--from", "go"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The first progress line comes after the first batch is committed:
    // kill it there.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap() > 0 && !line.contains("migrating:") {
        line.clear();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let first = stored_ids(dir.path()).len();
    assert!(first > 0, "the first batch was committed: {line}");
    if first == n {
        eprintln!("note: the run finished before the kill landed");
    }

    let report = json(&retryq(
        dir.path(),
        &["--json", "-c", "r.toml", "migrate", "--from", "go"],
    ));
    assert_eq!(report["skipped"], first, "{report}");
    assert_eq!(report["imported"], n - first, "{report}");
    assert!(stored_ids(dir.path()) == ids, "every item exactly once");
}

#[test]
fn a_store_owned_by_a_daemon_is_refused() {
    use retryq::store::owner::{owner_lock_path, OwnerInfo, OwnerLock};
    let dir = tempfile::tempdir().unwrap();
    write_go_queue(&dir.path().join("go"), 3, 8);
    sqlite_config(dir.path());
    let lock = owner_lock_path(&dir.path().join("target.db"), false);
    let _held =
        OwnerLock::acquire(&lock, OwnerInfo::this_process(), std::time::Duration::ZERO).unwrap();
    let out = retryq(dir.path(), &["-c", "r.toml", "migrate", "--from", "go"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("daemon") && err.contains("separate store"),
        "{err}"
    );
    assert!(!dir.path().join("target.db").exists(), "nothing written");
}

/// The bulk-import figure: 20,000 Go items of about 4 KiB into SQLite. Not
/// a speed assertion (speeds live in benchmarks); it prints the rate. Run
/// with `cargo test --release --test cli_migrate -- --ignored --nocapture
/// import_rate`.
#[test]
#[ignore]
fn import_rate_of_twenty_thousand_go_items_into_sqlite() {
    let n = 20_000;
    let dir = tempfile::tempdir().unwrap();
    write_go_queue(&dir.path().join("go"), n, 4096);
    sqlite_config(dir.path());
    let started = std::time::Instant::now();
    let report = json(&retryq(
        dir.path(),
        &["--json", "-c", "r.toml", "migrate", "--from", "go"],
    ));
    let wall = started.elapsed().as_secs_f64();
    assert_eq!(report["imported"], n, "{report}");
    let import = report["seconds"].as_f64().unwrap();
    println!(
        "migrate {n} Go items (4 KiB) into SQLite: {:.0} items/s for the whole command \
         ({wall:.2} s), {:.0} items/s in the import loop ({import:.2} s)",
        n as f64 / wall,
        n as f64 / import
    );
}
