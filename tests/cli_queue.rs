//! The real `retryq` binary on a store in a temporary directory: every queue
//! command, its `--json` output (the seed's field names) and its exit codes,
//! on the default SQLite backend and on the files backend.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

struct Env {
    dir: tempfile::TempDir,
    backend: &'static str,
}

impl Env {
    fn new(backend: &'static str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let cfg = format!("[store]\nbackend = \"{backend}\"\n[worker]\nmax_attempts = 3\n");
        std::fs::write(dir.path().join("retryq.toml"), cfg).unwrap();
        Env { dir, backend }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn cmd(&self, args: &[&str]) -> Command {
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
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run retryq")
    }

    fn run_stdin(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = self
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn retryq");
        let written = child.stdin.take().unwrap().write_all(stdin.as_bytes());
        // A command refused at argument parsing exits before it reads stdin;
        // its exit status, not the pipe, is what the test checks.
        if let Err(e) = written {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
        }
        child.wait_with_output().unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.run(&all);
        ok_json(&out, &format!("{} {args:?}", self.backend))
    }
}

fn ok_json(out: &Output, what: &str) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what}: exit {:?}, stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn every_command(backend: &'static str) {
    let env = Env::new(backend);

    // enqueue: from a file, from stdin, with every option.
    std::fs::write(env.path().join("r1.json"), r#"{"findings": [1, 2]}"#).unwrap();
    let out = env.run(&["enqueue", "r1.json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id1 = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(uuid::Uuid::try_parse(&id1).is_ok(), "{id1}");

    let out = env.run_stdin(
        &[
            "--json",
            "enqueue",
            "-",
            "--type",
            "assets",
            "--id",
            "asset-1",
            "--fingerprint",
            "fp-assets",
            "--agent-id",
            "agent-7",
            "--scanner-name",
            "nmap",
            "--target-path",
            "/srv",
            "--max-attempts",
            "5",
            "--attr",
            "tenant=acme",
            "--attr",
            "route=eu",
        ],
        r#"{"assets": ["db1"]}"#,
    );
    assert_eq!(ok_json(&out, "enqueue")["id"], "asset-1");

    let out = env.run_stdin(
        &["enqueue", "--id", "hb-1", "--type", "heartbeat"],
        "{\"ok\": true}",
    );
    assert!(out.status.success(), "{}", stderr(&out));

    // A duplicate fingerprint is refused naming the existing item (exit 1).
    let out = env.run_stdin(&["enqueue", "--fingerprint", "fp-assets"], "{\"x\": 1}");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("asset-1"), "{}", stderr(&out));
    // Bad JSON is a usage error naming the source.
    let out = env.run_stdin(&["enqueue"], "{not json");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("stdin"), "{}", stderr(&out));
    // A bad ID is refused as the argument is parsed: a usage error.
    let out = env.run_stdin(&["enqueue", "--id", "../etc"], "{}");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    // show: the seed's field names, payload only on request.
    let v = env.json(&["show", "asset-1"]);
    for field in [
        "id",
        "type",
        "fingerprint",
        "status",
        "attempts",
        "max_attempts",
        "last_error",
        "next_retry",
        "created_at",
        "updated_at",
        "agent_id",
        "scanner_name",
        "target_path",
    ] {
        assert!(v.get(field).is_some(), "show lacks {field}: {v}");
    }
    assert!(v.get("report").is_none());
    assert_eq!(v["type"], "assets");
    assert_eq!(v["status"], "pending");
    assert_eq!(v["max_attempts"], 5);
    assert_eq!(v["agent_id"], "agent-7");
    assert_eq!(v["attributes"]["tenant"], "acme");
    let v = env.json(&["show", "asset-1", "--payload"]);
    assert_eq!(v["report"], serde_json::json!({"assets": ["db1"]}));
    let v = env.json(&["show", &id1]);
    assert_eq!(v["max_attempts"], 3, "the configured default applies");
    let out = env.run(&["show", "asset"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "IDs match exactly, never by prefix"
    );
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
    let out = env.run(&["show", "asset-1", "--payload"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("db1"));

    // list: filters, order, paging.
    let v = env.json(&["list"]);
    assert_eq!(v.as_array().unwrap().len(), 3);
    let v = env.json(&["list", "--type", "assets"]);
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["id"], "asset-1");
    let v = env.json(&["list", "--status", "pending", "--ready", "--limit", "2"]);
    assert_eq!(v.as_array().unwrap().len(), 2);
    let all = env.json(&["list", "--order-by", "created_at"]);
    let desc = env.json(&["list", "--order-by", "created_at", "--desc"]);
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let mut reversed = ids(&desc);
    reversed.reverse();
    assert_eq!(ids(&all), reversed);
    let page = env.json(&["list", "--offset", "1", "--limit", "1"]);
    assert_eq!(ids(&page), vec![ids(&all)[1].clone()]);
    let v = env.json(&["list", "--order-by", "attempts", "--status", "failed"]);
    assert!(v.as_array().unwrap().is_empty());
    let out = env.run(&["list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("asset-1"));

    // stats: the seed's names.
    let v = env.json(&["stats"]);
    assert_eq!(v["total_items"], 3);
    assert_eq!(v["pending_items"], 3);
    assert_eq!(v["processing_items"], 0);
    assert_eq!(v["failed_items"], 0);
    for field in ["oldest_item", "newest_item", "total_retries", "last_retry"] {
        assert!(v.get(field).is_some(), "stats lacks {field}: {v}");
    }

    // delete.
    let v = env.json(&["delete", "hb-1"]);
    assert_eq!(v["deleted"], "hb-1");
    let out = env.run(&["delete", "hb-1"]);
    assert_eq!(out.status.code(), Some(1));

    // retry: a pending item is not a dead letter.
    let out = env.run(&["retry", "asset-1"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v = env.json(&["retry", "--failed"]);
    assert_eq!(v["revived"], 0);

    // purge and cleanup.
    let v = env.json(&["purge", "--status", "failed"]);
    assert_eq!(v["purged"], 0);
    let v = env.json(&["cleanup", "--ttl", "1h"]);
    assert_eq!(v["removed"], 0);
    assert_eq!(v["expired"], 0);
    let v = env.json(&["cleanup", "--ttl", "1ns"]);
    assert_eq!(v["expired"], 2, "{v}");
    assert_eq!(env.json(&["stats"])["total_items"], 0);
}

#[test]
fn every_queue_command_on_sqlite() {
    every_command("sqlite");
}

#[test]
fn every_queue_command_on_files() {
    every_command("files");
}

#[test]
fn default_store_is_sqlite_under_retryq_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_retryq"));
    for (k, _) in std::env::vars() {
        if k.starts_with("RETRYQ") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .current_dir(dir.path())
        .arg("enqueue")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"{}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(dir.path().join("retryq-data/queue.db").is_file());
}

#[test]
fn enqueue_refuses_a_report_over_the_api_body_limit_before_storing_it() {
    for backend in ["sqlite", "files"] {
        let env = Env::new(backend);
        let cfg = format!("[store]\nbackend = \"{backend}\"\n[admin]\nmax_body = 256\n");
        std::fs::write(env.path().join("retryq.toml"), cfg).unwrap();
        let big = format!("{{\"blob\":\"{}\"}}", "x".repeat(300));
        let out = env.run_stdin(&["enqueue"], &big);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{backend}: {err}");
        assert!(
            err.contains(&big.len().to_string()) && err.contains("256"),
            "{backend}: both sizes named: {err}"
        );
        let stats = env.json(&["stats"]);
        assert_eq!(stats["total_items"], 0, "{backend}: nothing stored");
        // At the limit exactly it is taken.
        let fits = format!("{{\"blob\":\"{}\"}}", "x".repeat(256 - 11));
        assert_eq!(fits.len(), 256);
        let out = env.run_stdin(&["enqueue"], &fits);
        assert!(out.status.success(), "{backend}: {}", stderr(&out));
    }
}

#[test]
fn pause_and_resume_need_a_running_daemon() {
    let env = Env::new("sqlite");
    for command in ["pause", "resume"] {
        let out = env.run(&[command]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(4), "{command}: {err}");
        assert!(err.contains("no daemon is running"), "{command}: {err}");
        assert!(err.contains(command), "{command}: {err}");
    }
}

#[test]
fn repair_checks_a_stopped_sqlite_store_and_explains_the_files_backend() {
    let env = Env::new("sqlite");
    let out = env.run_stdin(&["enqueue"], "{\"a\":1}");
    assert!(out.status.success(), "{}", stderr(&out));
    let report = env.json(&["repair"]);
    assert_eq!(report["healthy"], true, "{report}");
    assert_eq!(report["moved_to"], serde_json::Value::Null, "{report}");
    // Healthy means untouched: the item is still there.
    assert_eq!(env.json(&["stats"])["total_items"], 1);

    let files = Env::new("files");
    let out = files.run(&["repair"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("corrupt/"), "{err}");
}
