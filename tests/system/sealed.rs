//! Payloads sealed at rest (issue 16) in the real daemon: a keyring from
//! `retryq keys generate`, reports carrying a marker enqueued through the
//! HTTP API onto the default SQLite store, and a scripted upstream. No byte
//! of the marker may reach any file of the deployment while items wait or
//! after they go; every item reaches the upstream with the exact bytes it
//! was enqueued with, across a `kill -9`, a rotation and a re-seal run
//! beside the daemon; and a daemon without the key refuses a sealed store
//! without changing it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{wait_until, Daemon, Deployment};
use crate::upstream::{Mode, Upstream};

/// Stands for a secret inside a finding: it must never be found on disk.
const MARKER: &str = "SEALED-7c1f-leaked-aws-secret";

/// Retries every 200 ms with the circuit kept closed, so items waiting on a
/// failing upstream are claimed, opened and rescheduled all the time.
const SCENARIO: &str = r#"
[worker]
interval = "200ms"
batch_size = 50
concurrency = 4
max_attempts = 1000
[backoff]
strategy = "constant"
base = "200ms"
max = "200ms"
jitter = 0.0
[circuit]
threshold = 1000000
"#;

/// A deployment whose store lives in `store/` and whose keyring was made by
/// `retryq keys generate`.
struct Sealed {
    upstream: Upstream,
    dep: Deployment,
    /// The layers without `[store.encryption]`: encryption off.
    clear: Vec<PathBuf>,
    /// `clear` plus the layer naming the key file.
    config: Vec<PathBuf>,
    keys: PathBuf,
}

impl Sealed {
    fn new(mode: Mode) -> Sealed {
        let upstream = Upstream::start(mode);
        let dep = Deployment::new();
        // Its own directory, so "every file of the store" is a directory
        // listing, whatever names SQLite and retryq give their side files.
        let scenario = format!(
            "[store]\npath = \"{}\"\n{SCENARIO}",
            dep.path().join("store").join("queue.db").display()
        );
        let clear = dep.config(&upstream, &scenario);
        let keys = dep.path().join("keys.toml");
        let layer = dep.path().join("encryption.toml");
        std::fs::write(
            &layer,
            format!("[store.encryption]\nkey_file = \"{}\"\n", keys.display()),
        )
        .unwrap();
        let mut config = clear.clone();
        config.push(layer);

        let out = dep.cli(&config, &["keys", "generate"]);
        assert!(
            out.status.success(),
            "keys generate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        use std::os::unix::fs::MetadataExt as _;
        let mode = std::fs::metadata(&keys).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600, "keys generate wrote mode {mode:o}");
        Sealed {
            upstream,
            dep,
            clear,
            config,
            keys,
        }
    }

    fn store_dir(&self) -> PathBuf {
        self.dep.path().join("store")
    }

    /// The key IDs in the key file, oldest (first to seal) first.
    fn key_ids(&self) -> Vec<String> {
        std::fs::read_to_string(&self.keys)
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("id = \""))
            .map(|l| l.trim_end_matches('"').to_owned())
            .collect()
    }

    /// A CLI command that must succeed; its stdout.
    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.dep.cli(&self.config, args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "retryq {args:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// `retryq keys check --json`, read from the store itself.
    fn check(&self) -> Value {
        serde_json::from_str(&self.cli_ok(&["keys", "check", "--json"])).unwrap()
    }

    /// Fails naming every file of the deployment (store, log, config)
    /// that holds the marker in clear.
    fn assert_no_plaintext(&self, when: &str) {
        let db = self.store_dir().join("queue.db");
        assert!(
            std::fs::metadata(&db).is_ok_and(|m| m.len() > 0),
            "{when}: no database at {}: the scan would prove nothing",
            db.display()
        );
        let hits: Vec<PathBuf> = files(self.dep.path())
            .into_iter()
            .filter(|f| {
                std::fs::read(f)
                    .is_ok_and(|bytes| bytes.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()))
            })
            .collect();
        assert!(
            hits.is_empty(),
            "{when}: the marker is in clear in {hits:?}"
        );
    }

    /// Every item in `sent` reached the upstream (once, or at least once)
    /// and every push of it carried exactly the bytes it was enqueued with.
    fn assert_delivered_as_sent(&self, sent: &BTreeMap<String, String>, once: bool) {
        let requests = self.upstream.requests();
        for (id, body) in sent {
            let pushes: Vec<_> = requests
                .iter()
                .filter(|r| r.key.as_deref() == Some(id.as_str()))
                .collect();
            let accepted = pushes.iter().filter(|r| r.accepted()).count();
            assert!(accepted >= 1, "item {id} never delivered");
            if once {
                assert_eq!(accepted, 1, "item {id} delivered {accepted} times");
            }
            for push in pushes {
                assert_eq!(
                    String::from_utf8_lossy(&push.body),
                    body.as_str(),
                    "item {id}: the upstream got other bytes than were enqueued"
                );
            }
        }
    }

    /// Waits until every item in `ids` has been refused by the upstream at
    /// least once: each was claimed and opened, and now waits for a retry.
    fn wait_refused(&self, ids: &[&String]) {
        let refused = wait_until(Duration::from_secs(10), || {
            let requests = self.upstream.requests();
            ids.iter().all(|id| {
                requests
                    .iter()
                    .any(|r| r.key.as_deref() == Some(id.as_str()) && !r.accepted())
            })
        });
        assert!(refused, "not every item was pushed to the failing upstream");
    }
}

/// Every file under `dir`, in subdirectories too.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Enqueues `count` reports carrying the marker (in the body and in an
/// attribute, both sealed) through `POST /v1/items`; adds each ID and its
/// exact body to `sent` and returns the new IDs.
fn enqueue_marked(
    daemon: &Daemon,
    tag: &str,
    count: usize,
    sent: &mut BTreeMap<String, String>,
) -> Vec<String> {
    (0..count)
        .map(|n| {
            // Compact, as the daemon keeps every payload, so "exactly as
            // sent" is byte equality; keys out of sorted order and a string
            // with spaces, an escape and non-ASCII, which a re-encoding
            // could change.
            let body = format!(
                r#"{{"tag":"{tag}","finding":"{MARKER}","n":{n},"note":"two  spaces, \n, é","pad":"{}"}}"#,
                "x".repeat(300)
            );
            let (status, v) = daemon
                .api(
                    "POST",
                    &format!("/v1/items?attr.note={MARKER}-attribute"),
                    Some(body.as_bytes()),
                )
                .unwrap();
            assert_eq!(status, 201, "enqueue {tag} {n}: {v}");
            let id = v["id"].as_str().unwrap().to_owned();
            sent.insert(id.clone(), body);
            id
        })
        .collect()
}

fn wait_drained(daemon: &Daemon) {
    assert!(
        wait_until(Duration::from_secs(20), || daemon.is_empty()),
        "the queue did not drain: {}",
        daemon.stats()
    );
}

#[test]
fn sealed_reports_wait_without_plaintext_on_disk_and_deliver_as_sent() {
    let s = Sealed::new(Mode::Fail(503));
    let kid = s.key_ids().remove(0);
    let daemon = s.dep.start(&s.config);
    let mut sent = BTreeMap::new();
    let ids = enqueue_marked(&daemon, "wait", 20, &mut sent);

    // The store does hold the report: the scans below look for something
    // that is there, only sealed.
    let shown = s.cli_ok(&["show", &ids[0], "--payload", "--json"]);
    assert!(shown.contains(MARKER), "{shown}");

    s.wait_refused(&ids.iter().collect::<Vec<_>>());
    s.assert_no_plaintext("while the items wait on a 503 upstream");
    let check = s.check();
    assert_eq!(check["sealed"][&kid], 20, "{check}");
    assert_eq!(check["clear"], 0, "{check}");
    assert_eq!(check["not_opening"], 0, "{check}");

    s.upstream.set_mode(Mode::Accept);
    wait_drained(&daemon);
    s.assert_delivered_as_sent(&sent, true);
    s.assert_no_plaintext("after delivery");
    assert_eq!(daemon.sigterm().code(), Some(0));
    // A graceful stop checkpoints the WAL into the database file.
    s.assert_no_plaintext("after a graceful stop");
}

#[test]
fn kill_9_with_sealed_items_queued_loses_none_and_a_restart_delivers_them_as_sent() {
    // Slow refusals keep pushes in flight when the kill comes.
    let s = Sealed::new(Mode::FailSlowly(503, Duration::from_millis(150)));
    let daemon = s.dep.start(&s.config);
    let mut sent = BTreeMap::new();
    enqueue_marked(&daemon, "kill9", 30, &mut sent);
    assert!(
        wait_until(Duration::from_secs(10), || s.upstream.request_count() >= 10),
        "delivery never started"
    );
    daemon.kill9();

    // What the kill left (a WAL never checkpointed) is scanned before
    // anything opens the store again.
    s.assert_no_plaintext("after kill -9");
    let check = s.check();
    assert_eq!(check["items"], 30, "{check}");
    assert_eq!(check["not_opening"], 0, "{check}");

    s.upstream.set_mode(Mode::Accept);
    let daemon = s.dep.start(&s.config);
    wait_drained(&daemon);
    // Every push the killed daemon made was refused: each item is accepted
    // by the restarted one only.
    s.assert_delivered_as_sent(&sent, true);
    s.assert_no_plaintext("after the drain");
}

#[test]
fn rotation_and_a_reseal_beside_the_daemon_keep_every_item_deliverable() {
    let s = Sealed::new(Mode::Fail(503));
    let k1 = s.key_ids().remove(0);
    let daemon = s.dep.start(&s.config);
    let mut sent = BTreeMap::new();
    let before = enqueue_marked(&daemon, "before-rotate", 10, &mut sent);
    s.wait_refused(&before.iter().collect::<Vec<_>>());

    let out = s.cli_ok(&["keys", "rotate"]);
    let keys = s.key_ids();
    assert_eq!(keys.len(), 2, "{keys:?}");
    let k2 = keys[1].clone();
    assert!(out.contains(&format!("added key {k2}")), "{out}");
    assert!(
        wait_until(Duration::from_secs(5), || daemon
            .log_count("keyring re-read")
            >= 1),
        "the daemon did not re-read the rotated key file"
    );
    enqueue_marked(&daemon, "after-rotate", 10, &mut sent);
    let check = s.check();
    assert_eq!(check["sealed"][&k1], 10, "{check}");
    assert_eq!(check["sealed"][&k2], 10, "{check}");
    assert_eq!(check["not_opening"], 0, "{check}");

    s.upstream.set_mode(Mode::Accept);
    wait_drained(&daemon);
    s.assert_delivered_as_sent(&sent, true);

    // Items sealed under k2 wait while `rotate --reseal` moves them to k3
    // beside the daemon, which keeps claiming and rescheduling them.
    s.upstream.set_mode(Mode::Fail(503));
    let waiting = enqueue_marked(&daemon, "before-reseal", 10, &mut sent);
    s.wait_refused(&waiting.iter().collect::<Vec<_>>());
    let out = s.cli_ok(&["keys", "rotate", "--reseal", "--batch", "3"]);
    let keys = s.key_ids();
    assert_eq!(keys.len(), 3, "{keys:?}");
    let k3 = keys[2].clone();
    assert!(
        out.contains(&format!(
            "re-sealed 10 item(s) under key {k3}; 0 still under an older key"
        )),
        "{out}"
    );
    let text = s.cli_ok(&["keys", "check"]);
    assert!(
        text.contains(&format!("10 item(s): 0 clear, 10 sealed ({k3}: 10)")),
        "{text}"
    );
    assert!(text.contains("every item opens"), "{text}");
    assert!(
        !text.contains(&k1) && !text.contains(&k2),
        "items left under an old key: {text}"
    );

    assert!(
        wait_until(Duration::from_secs(5), || daemon
            .log_count("keyring re-read")
            >= 2),
        "the daemon did not re-read the key file after the re-seal's rotation"
    );
    enqueue_marked(&daemon, "after-reseal", 5, &mut sent);
    let check = s.check();
    let sealed = check["sealed"].as_object().unwrap();
    assert_eq!(sealed.len(), 1, "items under an older key: {check}");
    assert_eq!(check["sealed"][&k3], 15, "{check}");
    assert_eq!(check["not_opening"], 0, "{check}");
    s.assert_no_plaintext("after the re-seal");

    s.upstream.set_mode(Mode::Accept);
    wait_drained(&daemon);
    s.assert_delivered_as_sent(&sent, true);
    assert_eq!(sent.len(), 35);
}

#[test]
fn a_daemon_without_the_key_refuses_a_sealed_store_and_leaves_it_as_it_was() {
    let s = Sealed::new(Mode::Fail(503));
    let kid = s.key_ids().remove(0);
    let daemon = s.dep.start(&s.config);
    let mut sent = BTreeMap::new();
    let ids = enqueue_marked(&daemon, "refused", 8, &mut sent);
    s.wait_refused(&ids.iter().collect::<Vec<_>>());
    assert_eq!(daemon.sigterm().code(), Some(0));

    let store_before = store_bytes(&s.store_dir());
    let listed_before = s.cli_ok(&["list", "--json"]);

    let mut child = s
        .dep
        .command(&s.clear)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the daemon ran with encryption off over 8 sealed items");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && out.status.code().is_some(),
        "exit {} with encryption off over sealed items: {stderr}",
        out.status
    );
    assert!(
        stderr.contains("encryption is off")
            && stderr.contains("8 item(s) in the store are sealed")
            && stderr.contains(&kid),
        "the refusal does not name the sealed items and their key: {stderr}"
    );

    assert!(
        store_bytes(&s.store_dir()) == store_before,
        "the refused start changed the store's files"
    );
    assert_eq!(s.cli_ok(&["list", "--json"]), listed_before);

    s.upstream.set_mode(Mode::Accept);
    let daemon = s.dep.start(&s.config);
    wait_drained(&daemon);
    s.assert_delivered_as_sent(&sent, true);
}

/// Each file of the store and its bytes, the owner lock aside: a start
/// takes ownership (and writes that lock) before it opens the store.
fn store_bytes(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    files(dir)
        .into_iter()
        .filter(|f| !f.to_string_lossy().ends_with(".owner.lock"))
        .map(|f| {
            let bytes = std::fs::read(&f).unwrap();
            (f, bytes)
        })
        .collect()
}
