//! `retryq migrate` on a copy of the Go SDK fixture: four items survive with
//! their attempts, state and timestamps, one torn file is quarantined, and
//! the source directory is left untouched.

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
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("4/4"), "progress on stderr: {err}");
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
    assert_eq!(again["skipped"].as_array().unwrap().len(), 4);
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
