//! `retryq keys` and `[store.encryption]` through the real binary: make a
//! keyring, seal what is enqueued, check, rotate and re-seal, and the
//! refusals (an unsafe key file, a missing key, encryption turned off over
//! sealed items), the daemon's included.

use std::path::Path;
use std::process::{Command, Output};

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new(backend: &str, encrypted: bool) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let env = Env { dir };
        env.write_config(backend, encrypted);
        env
    }

    fn write_config(&self, backend: &str, encrypted: bool) {
        let mut cfg = format!("[store]\nbackend = \"{backend}\"\n[pusher]\nname = \"chaos\"\n");
        if encrypted {
            cfg.push_str("[store.encryption]\nkey_file = \"keys.toml\"\n");
        }
        std::fs::write(self.path().join("retryq.toml"), cfg).unwrap();
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_retryq"));
        cmd.current_dir(self.path())
            .arg("--config")
            .arg("retryq.toml")
            .args(args);
        for (k, _) in std::env::vars() {
            if k.starts_with("RETRYQ") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        cmd.output().expect("run retryq")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    }

    fn enqueue(&self, n: usize) -> String {
        let file = self.path().join(format!("r{n}.json"));
        std::fs::write(&file, format!(r#"{{"finding":"CLI-MARKER-{n}"}}"#)).unwrap();
        self.ok(&["enqueue", file.to_str().unwrap()])
            .trim()
            .to_owned()
    }

    fn store_bytes(&self) -> Vec<u8> {
        fn walk(dir: &Path, out: &mut Vec<u8>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, out);
                } else {
                    out.extend(std::fs::read(&path).unwrap_or_default());
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.path().join("retryq-data"), &mut out);
        out
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn key_ids(env: &Env) -> Vec<String> {
    let text = std::fs::read_to_string(env.path().join("keys.toml")).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("id = \""))
        .map(|l| l.trim_end_matches('"').to_owned())
        .collect()
}

fn has(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn generate_seal_check_rotate_and_reseal_on_both_backends() {
    for backend in ["sqlite", "files"] {
        let env = Env::new(backend, true);
        let out = env.ok(&["keys", "generate"]);
        assert!(out.contains("mode 0600"), "{out}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt as _;
            let mode = std::fs::metadata(env.path().join("keys.toml"))
                .unwrap()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let again = env.run(&["keys", "generate"]);
        assert!(!again.status.success());
        assert!(
            stderr(&again).contains("refusing to overwrite"),
            "{}",
            stderr(&again)
        );
        let first = key_ids(&env);
        assert_eq!(first.len(), 1);

        let ids: Vec<String> = (0..5).map(|n| env.enqueue(n)).collect();
        assert!(
            !has(&env.store_bytes(), "CLI-MARKER"),
            "{backend}: plaintext on disk"
        );
        let shown = env.ok(&["show", &ids[0], "--payload", "--json"]);
        assert!(shown.contains("CLI-MARKER-0"), "{shown}");

        let check = env.ok(&["keys", "check"]);
        assert!(
            check.contains(&format!("5 sealed ({}: 5)", first[0])),
            "{check}"
        );
        assert!(check.contains("every item opens"), "{check}");

        // Rotate: old items still open; new ones are sealed under the new key.
        env.ok(&["keys", "rotate"]);
        let keys = key_ids(&env);
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0], first[0]);
        env.enqueue(9);
        let check = env.ok(&["keys", "check", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&check).unwrap();
        assert_eq!(v["sealed"][&first[0]], 5, "{v}");
        assert_eq!(v["sealed"][&keys[1]], 1, "{v}");
        assert_eq!(v["not_opening"], 0);
        let shown = env.ok(&["show", &ids[4], "--payload", "--json"]);
        assert!(shown.contains("CLI-MARKER-4"), "{shown}");

        // Rotate again and re-seal: nothing is left under the older keys.
        let out = env.ok(&["keys", "rotate", "--reseal", "--batch", "2"]);
        assert!(out.contains("re-sealed 6 item(s)"), "{out}");
        let keys = key_ids(&env);
        let v: serde_json::Value =
            serde_json::from_str(&env.ok(&["keys", "check", "--json"])).unwrap();
        assert_eq!(v["sealed"].as_object().unwrap().len(), 1, "{v}");
        assert_eq!(v["sealed"][&keys[2]], 6, "{v}");
        let list = env.ok(&["list", "--json"]);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&list)
                .unwrap()
                .as_array()
                .map(Vec::len),
            Some(6),
            "{list}"
        );
        assert!(
            !has(&env.store_bytes(), "CLI-MARKER"),
            "{backend}: plaintext after re-seal"
        );
    }
}

#[test]
fn a_key_file_others_can_read_is_refused_with_the_fix() {
    let env = Env::new("sqlite", true);
    env.ok(&["keys", "generate"]);
    let path = env.path().join("keys.toml");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = env.run(&["stats"]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(err.contains("keys.toml has mode 0644"), "{err}");
        assert!(err.contains("chmod 600 keys.toml"), "{err}");
    }
}

#[test]
fn a_missing_key_is_refused_by_the_cli_and_the_daemon_naming_it() {
    let env = Env::new("sqlite", true);
    env.ok(&["keys", "generate"]);
    let lost = key_ids(&env).remove(0);
    for n in 0..3 {
        env.enqueue(n);
    }
    // The keyring is replaced by one that lacks the key.
    std::fs::remove_file(env.path().join("keys.toml")).unwrap();
    env.ok(&["keys", "generate"]);
    let out = env.run(&["list"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&format!("{lost} (3 items)")), "{err}");
    let check = env.run(&["keys", "check"]);
    assert!(!check.status.success());
    assert!(
        stdout(&check).contains(&format!("3 item(s) under key {lost} do not open")),
        "{}",
        stdout(&check)
    );
    let daemon = env.run(&["run"]);
    assert!(!daemon.status.success(), "the daemon must refuse to start");
    let err = stderr(&daemon);
    assert!(err.contains(&format!("{lost} (3 items)")), "{err}");
    assert!(err.contains("retryq keys quarantine --key-id"), "{err}");

    // The key is lost for good: the operator sets its items aside. A key
    // the ring holds is refused, and nothing else is touched.
    let held = key_ids(&env).remove(0);
    let out = env.run(&["keys", "quarantine", "--key-id", &held]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is in the keyring"),
        "{}",
        stderr(&out)
    );
    let moved = env.ok(&["keys", "quarantine", "--key-id", &lost]);
    assert!(moved.contains("moved 3 item(s)"), "{moved}");
    let kept = env.enqueue(7);
    assert!(env.ok(&["list"]).contains(&kept));
    let stats = env.ok(&["stats", "--json"]);
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["quarantined"], 3, "{stats}");
    assert_eq!(stats["total_items"], 1, "{stats}");
    env.ok(&["keys", "check"]);

    // Without a keyring nothing tells a lost key from a held one: refused.
    env.write_config("sqlite", false);
    let out = env.run(&["keys", "quarantine", "--key-id", &lost]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("encryption is off"),
        "{}",
        stderr(&out)
    );
    let out = env.run(&["keys", "quarantine"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--key-id"), "{}", stderr(&out));
}

#[test]
fn encryption_on_over_clear_items_works_and_off_over_sealed_is_refused() {
    let env = Env::new("sqlite", false);
    let clear = env.enqueue(1);
    env.write_config("sqlite", true);
    env.ok(&["keys", "generate"]);
    let sealed = env.enqueue(2);
    for id in [&clear, &sealed] {
        let shown = env.ok(&["show", id, "--payload", "--json"]);
        assert!(shown.contains("CLI-MARKER"), "{shown}");
    }
    let check = env.ok(&["keys", "check"]);
    assert!(check.contains("1 clear, 1 sealed"), "{check}");
    env.write_config("sqlite", false);
    let out = env.run(&["list"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("encryption is off"), "{err}");
    assert!(err.contains("1 item(s)"), "{err}");

    // Once nothing sealed remains, encryption may go off, and the marker
    // that made the open count sealed items goes with it.
    env.write_config("sqlite", true);
    env.ok(&["delete", &sealed]);
    env.write_config("sqlite", false);
    let listed = env.ok(&["list"]);
    assert!(listed.contains(clear.as_str()), "{listed}");
    assert!(
        sealed_markers(&env).is_empty(),
        "{:?}",
        sealed_markers(&env)
    );
}

/// The "sealed items may exist" markers beside the store.
fn sealed_markers(env: &Env) -> Vec<std::path::PathBuf> {
    walk_files(env.path())
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.ends_with(".sealed") || name == ".retryq.sealed"
        })
        .collect()
}

fn walk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk_files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn a_store_never_sealed_has_no_marker_and_a_sealed_one_has_it_on_both_backends() {
    for backend in ["sqlite", "files"] {
        let env = Env::new(backend, false);
        env.enqueue(1);
        env.ok(&["list"]);
        assert!(
            sealed_markers(&env).is_empty(),
            "{backend}: marked while clear"
        );
        env.write_config(backend, true);
        env.ok(&["keys", "generate"]);
        env.enqueue(2);
        assert_eq!(
            sealed_markers(&env).len(),
            1,
            "{backend}: no marker once sealed"
        );
        // The marker proves sealed items may exist: with it, off is refused.
        env.write_config(backend, false);
        let out = env.run(&["list"]);
        assert!(
            !out.status.success(),
            "{backend}: opened clear over a sealed item"
        );
        // A files-backend queue directory counts the marker as its own.
        if backend == "files" {
            env.write_config(backend, true);
            let stats = env.ok(&["stats", "--json"]);
            assert!(
                stats.contains("\"skipped_entries\": 0") || !stats.contains("skipped_entries"),
                "{stats}"
            );
        }
    }
}

#[test]
fn migrate_imports_a_go_directory_into_a_sealed_store() {
    for backend in ["sqlite", "files"] {
        let env = Env::new(backend, true);
        env.ok(&["keys", "generate"]);
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/go-retry-queue");
        let go = env.path().join("go-queue");
        std::fs::create_dir(&go).unwrap();
        for entry in std::fs::read_dir(&fixture).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), go.join(entry.file_name())).unwrap();
        }
        let out = env.ok(&["--json", "migrate", "--from", "go-queue"]);
        let report: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(report["imported"], 4, "{backend}: {report}");
        assert!(
            !has(&env.store_bytes(), "semgrep"),
            "{backend}: plaintext on disk"
        );
        let check = env.ok(&["keys", "check"]);
        assert!(
            check.contains("4 item(s): 0 clear, 4 sealed"),
            "{backend}: {check}"
        );
        let shown = env.ok(&[
            "show",
            "3f1c2b9e-6a4d-4c1e-9b7a-0d2e5f8a1c01",
            "--payload",
            "--json",
        ]);
        assert!(shown.contains("semgrep"), "{shown}");
    }
}
