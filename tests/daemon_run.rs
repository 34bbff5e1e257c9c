//! The real `retryq run` daemon: the chaos plugin, items enqueued by the CLI
//! from another process while it runs, the token-protected API, SIGTERM
//! during delivery (exit 0, nothing lost) and a restart that drains; store
//! ownership (a second daemon refused, the CLI going through the owner's
//! API on both backends, a `kill -9`'s claims released at the next start).

#![cfg(unix)]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_retryq");
const TOKEN: &str = "test-token-0123456789abcdef";

fn chaos_lib() -> PathBuf {
    support::plugin_lib("retryq_chaos")
}

struct Deployment {
    dir: tempfile::TempDir,
    backend: &'static str,
}

/// A running `retryq run` and the port its admin API listens on (the
/// kernel's pick: `listen` is port 0). Killed if a test panics with it.
struct Daemon {
    child: Option<Child>,
    port: u16,
}

impl Daemon {
    fn id(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Deployment {
    fn new() -> Self {
        Self::on("sqlite")
    }

    /// A deployment on the `sqlite` or `files` backend.
    fn on(backend: &'static str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("plugins")).unwrap();
        std::fs::copy(chaos_lib(), dir.path().join("plugins/libretryq_chaos.so")).unwrap();
        Deployment { dir, backend }
    }

    fn store_path(&self) -> PathBuf {
        match self.backend {
            "files" => self.dir.path().join("queue"),
            _ => self.dir.path().join("queue.db"),
        }
    }

    fn owner_lock(&self) -> PathBuf {
        match self.backend {
            "files" => self.store_path().join(".retryq.owner.lock"),
            _ => self.dir.path().join("queue.db.owner.lock"),
        }
    }

    /// The owner lock's content once `pid` wrote its admin address there.
    fn owner_with_addr(&self, pid: u32) -> Option<serde_json::Value> {
        let owner: serde_json::Value = std::fs::read_to_string(self.owner_lock())
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())?;
        (owner["pid"] == pid && owner["admin_addr"].is_string()).then_some(owner)
    }

    fn delivered_dir(&self) -> PathBuf {
        self.dir.path().join("delivered")
    }

    /// Writes the config with the chaos plugin failing the first `fail_first` pushes.
    fn config(&self, fail_first: u32) -> PathBuf {
        self.config_with(
            &format!("retryq-{fail_first}.toml"),
            &format!("fail_first = {fail_first}"),
            "",
        )
    }

    /// Writes config `name`: the chaos plugin with `chaos` settings (TOML
    /// lines), `worker` lines added to `[worker]`.
    fn config_with(&self, name: &str, chaos: &str, worker: &str) -> PathBuf {
        let d = self.dir.path();
        let path = d.join(name);
        let worker = if worker.is_empty() {
            "push_timeout = \"2s\"\nlease = \"10s\"\nmax_attempts = 1000"
        } else {
            worker
        };
        std::fs::write(
            &path,
            format!(
                r#"
[store]
backend = "{backend}"
path = "{db}"
[worker]
interval = "1s"
{worker}
[backoff]
strategy = "constant"
base = "200ms"
max = "200ms"
jitter = 0.0
[circuit]
threshold = 1000000
[pusher]
name = "chaos"
[pusher.settings]
{chaos}
record_dir = "{rec}"
[plugins]
search_path = ["{plugins}"]
[admin]
listen = "127.0.0.1:0"
[log]
level = "info"
"#,
                backend = self.backend,
                db = self.store_path().display(),
                rec = self.delivered_dir().display(),
                plugins = d.join("plugins").display(),
            ),
        )
        .unwrap();
        path
    }

    /// Starts `retryq run` and waits for its API, found (as the CLI finds
    /// it) through the address it writes into the owner lock: a port picked
    /// beforehand could be taken by someone else before the daemon binds it.
    fn start(&self, config: &Path) -> Daemon {
        let child = Command::new(BIN)
            .arg("--config")
            .arg(config)
            .arg("run")
            .env("RETRYQ_ADMIN_TOKEN", TOKEN)
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut daemon = Daemon {
            child: Some(child),
            port: 0,
        };
        let pid = daemon.id();
        let mut owner = None;
        wait_for("the admin address in the owner lock", || {
            let exited = daemon.child.as_mut().unwrap().try_wait().unwrap();
            assert!(exited.is_none(), "retryq run exited: {exited:?}");
            owner = self.owner_with_addr(pid);
            owner.is_some()
        });
        daemon.port = port_of(&owner.unwrap());
        wait_for("the admin API", || {
            http(daemon.port, "GET", "/healthz", None).is_some_and(|(s, _)| s == 200)
        });
        daemon
    }

    fn cli(&self, config: &Path, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.cli_output(config, args, stdin);
        assert!(
            out.status.success(),
            "retryq {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `cli` with `--json`, parsed.
    fn cli_json(&self, config: &Path, args: &[&str], stdin: Option<&str>) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.cli(config, &all, stdin);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
    }

    /// Runs the CLI as an operator would beside the daemon: same config,
    /// same admin token.
    fn cli_output(
        &self,
        config: &Path,
        args: &[&str],
        stdin: Option<&str>,
    ) -> std::process::Output {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(config)
            .args(args)
            .env("RETRYQ_ADMIN_TOKEN", TOKEN)
            .current_dir(self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    }

    fn deliveries(&self) -> Vec<String> {
        std::fs::read_dir(self.delivered_dir())
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A minimal HTTP/1.1 request; None when nothing listens.
fn http(port: u16, method: &str, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// Whether the chaos plugin recorded a delivery of every one of `ids`.
fn all_delivered(dep: &Deployment, ids: &[String]) -> bool {
    let delivered = dep.deliveries();
    ids.iter()
        .all(|id| delivered.iter().any(|f| f.starts_with(&format!("{id}__"))))
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    // A bounded wait for the daemon to act, not a timing assertion.
    for _ in 0..600 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// The port of the admin address in an owner lock.
fn port_of(owner: &serde_json::Value) -> u16 {
    owner["admin_addr"]
        .as_str()
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no admin port in the owner lock: {owner}"))
}

fn sigterm(mut daemon: Daemon) -> i32 {
    let mut child = daemon.child.take().unwrap();
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    child.wait().unwrap().code().unwrap_or(-1)
}

#[test]
fn the_daemon_delivers_what_the_cli_enqueues_and_guards_its_api() {
    let dep = Deployment::new();
    let config = dep.config(2);
    let daemon = dep.start(&config);

    let ids: Vec<String> = (0..3)
        .map(|n| {
            dep.cli(
                &config,
                &["enqueue", "--type", "findings"],
                Some(&format!("{{\"n\":{n}}}")),
            )
            .trim()
            .to_owned()
        })
        .collect();
    // Every ID, not a count of files: a push recorded and then timed out
    // and retried leaves a second file for its item.
    wait_for("three deliveries", || all_delivered(&dep, &ids));
    // A push is acknowledged (deleted) in the commit after it: wait for it.
    wait_for("the acknowledgements", || {
        let stats = dep.cli(&config, &["stats", "--json"], None);
        let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
        stats["total_items"] == 0
    });

    // The API needs the token for everything but health.
    assert_eq!(http(daemon.port, "GET", "/v1/stats", None).unwrap().0, 401);
    let (status, body) = http(daemon.port, "GET", "/v1/stats", Some(TOKEN)).unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, metrics) = http(daemon.port, "GET", "/metrics", Some(TOKEN)).unwrap();
    assert_eq!(status, 200);
    assert!(metrics.contains("retryq_"), "{metrics}");

    assert_eq!(sigterm(daemon), 0, "graceful stop exits 0");
}

#[test]
fn sigterm_during_an_outage_loses_nothing_and_a_restart_drains() {
    let dep = Deployment::new();
    // The upstream is down for a long time.
    let down = dep.config(1_000_000);
    let daemon = dep.start(&down);
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(
            dep.cli(&down, &["enqueue"], Some(&format!("{{\"n\":{n}}}")))
                .trim()
                .to_owned(),
        );
    }
    wait_for("failed attempts", || {
        let list = dep.cli(&down, &["list", "--json"], None);
        let items: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
        items.iter().all(|i| i["attempts"].as_u64() >= Some(1))
    });
    assert_eq!(sigterm(daemon), 0);

    // Everything is still there, and nothing is left claimed.
    let list = dep.cli(&down, &["list", "--json"], None);
    let items: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
    assert_eq!(items.len(), 5);
    assert!(items.iter().all(|i| i["status"] == "pending"), "{list}");

    // The upstream is back: a restart drains the backlog.
    let up = dep.config(0);
    let daemon = dep.start(&up);
    wait_for("the backlog to drain", || all_delivered(&dep, &ids));
    assert_eq!(sigterm(daemon), 0);
}

/// Sends SIGKILL: no graceful stop, no lease released.
fn kill9(mut daemon: Daemon) {
    let mut child = daemon.child.take().unwrap();
    let ok = Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let _ = child.wait();
}

#[test]
fn a_second_daemon_on_the_same_store_is_refused_naming_the_first() {
    for backend in ["sqlite", "files"] {
        let dep = Deployment::on(backend);
        let config = dep.config(0);
        let first = dep.start(&config);
        // Same config: only the store is shared, as each listens on a port
        // of the kernel's choosing.
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .arg("run")
            .env("RETRYQ_ADMIN_TOKEN", TOKEN)
            .current_dir(dep.dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{backend}: second daemon started");
        assert!(
            stderr.contains(&format!("pid {}", first.id())),
            "{backend}: {stderr}"
        );
        // Nor may `retryq repair` replace the store under it.
        if backend == "sqlite" {
            let out = dep.cli_output(&config, &["repair"], None);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{stderr}");
            assert!(
                stderr.contains(&format!("pid {}", first.id())) && stderr.contains("stop"),
                "{stderr}"
            );
        }
        // The first one is untouched and still serving.
        let (status, _) = http(first.port, "GET", "/v1/stats", Some(TOKEN)).unwrap();
        assert_eq!(status, 200, "{backend}");
        assert_eq!(sigterm(first), 0, "{backend}");
    }
}

#[test]
fn every_cli_command_works_through_a_running_daemon_on_both_backends() {
    for backend in ["sqlite", "files"] {
        let dep = Deployment::on(backend);
        // The upstream always fails and one attempt is allowed: every item
        // becomes a dead letter and stays.
        let config = dep.config_with(
            "down.toml",
            "fail_first = 1000000",
            "push_timeout = \"2s\"\nlease = \"10s\"\nmax_attempts = 1",
        );
        let daemon = dep.start(&config);
        let ids: Vec<String> = (0..3)
            .map(|n| {
                let v = dep.cli_json(&config, &["enqueue"], Some(&format!("{{\"n\":{n}}}")));
                v["id"].as_str().unwrap().to_owned()
            })
            .collect();
        let failed = |dep: &Deployment| {
            let list = dep.cli_json(&config, &["list", "--status", "failed"], None);
            list.as_array().unwrap().len()
        };
        wait_for("three dead letters", || failed(&dep) == 3);
        let shown = dep.cli_json(&config, &["show", &ids[0], "--payload"], None);
        assert_eq!(shown["report"], serde_json::json!({"n": 0}), "{backend}");
        let human = dep.cli(&config, &["list"], None);
        assert!(
            human.contains(&ids[1]) && human.contains("failed"),
            "{backend}: {human}"
        );

        let stats = dep.cli_json(&config, &["stats"], None);
        assert_eq!(stats["failed_items"], 3, "{backend}: {stats}");
        assert_eq!(stats["worker"]["is_running"], true, "{backend}: {stats}");

        // Paused, a revived dead letter stays pending.
        let paused = dep.cli_json(&config, &["pause", "--reason", "maintenance"], None);
        assert_eq!(paused["paused"], true, "{backend}: {paused}");
        let human = dep.cli(&config, &["stats"], None);
        assert!(
            human.contains("paused since") && human.contains("maintenance"),
            "{backend}: {human}"
        );
        let revived = dep.cli_json(&config, &["retry", "--failed"], None);
        assert_eq!(revived["revived"], 3, "{backend}: {revived}");
        std::thread::sleep(Duration::from_millis(1500));
        let stats = dep.cli_json(&config, &["stats"], None);
        assert_eq!(stats["pending_items"], 3, "{backend}: {stats}");
        assert_eq!(stats["worker"]["pause_reason"], "maintenance", "{backend}");

        // Resumed, they fail again; then purge and delete.
        let resumed = dep.cli_json(&config, &["resume"], None);
        assert_eq!(resumed["paused"], false, "{backend}: {resumed}");
        wait_for("the dead letters again", || failed(&dep) == 3);
        let deleted = dep.cli_json(&config, &["delete", &ids[0]], None);
        assert_eq!(deleted["deleted"], ids[0].as_str());
        let purged = dep.cli_json(&config, &["purge", "--status", "failed"], None);
        assert_eq!(purged["purged"], 2, "{backend}: {purged}");
        let cleaned = dep.cli_json(&config, &["cleanup"], None);
        assert_eq!(cleaned["removed"], 0, "{backend}: {cleaned}");
        let stats = dep.cli_json(&config, &["stats"], None);
        assert_eq!(stats["total_items"], 0, "{backend}: {stats}");

        assert_eq!(sigterm(daemon), 0, "{backend}");
        // Without the daemon the same commands open the store themselves,
        // and pause has nobody to ask (exit 4).
        let stats = dep.cli_json(&config, &["stats"], None);
        assert_eq!(stats["total_items"], 0, "{backend}: {stats}");
        assert!(stats.get("worker").is_none(), "{backend}: {stats}");
        let out = dep.cli_output(&config, &["pause"], None);
        assert_eq!(out.status.code(), Some(4), "{backend}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no daemon is running"),
            "{backend}"
        );
    }
}

#[test]
fn a_wrong_token_is_named_when_the_cli_goes_through_the_daemon() {
    let dep = Deployment::new();
    let config = dep.config(0);
    let daemon = dep.start(&config);
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .args(["stats"])
        .env("RETRYQ_ADMIN_TOKEN", "another-token-0123456789")
        .current_dir(dep.dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("401") && stderr.contains("token"),
        "{stderr}"
    );
    assert_eq!(sigterm(daemon), 0);
}

#[test]
fn after_kill_9_the_next_daemon_takes_the_killed_ones_claims_back_at_once() {
    for backend in ["sqlite", "files"] {
        let dep = Deployment::on(backend);
        // Every push hangs far longer than the test: claims stay in flight.
        // The lease is 5 minutes, so only an at-once release can deliver
        // them within the bounded wait below.
        let hanging = dep.config_with(
            "hanging.toml",
            "fail_first = 1000000\nfailure = \"hang\"\nhang = \"10m\"",
            "push_timeout = \"4m\"\nlease = \"5m\"\nmax_attempts = 1000\nbatch_size = 20",
        );
        // Queued before the daemon starts (the CLI opens the store itself).
        let ids: Vec<String> = (0..6)
            .map(|n| {
                dep.cli(&hanging, &["enqueue"], Some(&format!("{{\"n\":{n}}}")))
                    .trim()
                    .to_owned()
            })
            .collect();
        let daemon = dep.start(&hanging);
        wait_for("claims in flight", || {
            let stats = dep.cli_json(&hanging, &["stats"], None);
            stats["processing_items"].as_u64() >= Some(1)
        });
        kill9(daemon);

        // Nobody owns the store. On SQLite the killed instance's claims are
        // still there for the next owner to release; the files backend
        // releases them whenever it opens (its own lock proves nobody else
        // has it open), the CLI's open included.
        let list = dep.cli_json(&hanging, &["list"], None);
        let items = list.as_array().unwrap();
        assert_eq!(items.len(), ids.len(), "{backend}: nothing lost: {list}");
        if backend == "sqlite" {
            let in_flight = items.iter().filter(|i| i["status"] == "processing").count();
            assert!(in_flight >= 1, "{backend}: {list}");
        }

        // The upstream is back. The new owner releases them at start.
        let up = dep.config_with(
            "up.toml",
            "fail_first = 0",
            "push_timeout = \"2s\"\nlease = \"5m\"\nmax_attempts = 1000",
        );
        let daemon = dep.start(&up);
        wait_for("every item delivered", || all_delivered(&dep, &ids));
        assert_eq!(sigterm(daemon), 0, "{backend}");
    }
}

#[test]
fn with_port_0_the_cli_finds_the_daemon_through_the_owner_lock() {
    let dep = Deployment::new();
    let config = dep.config(1_000_000);
    // The kernel picks the port (every deployment here listens on port 0):
    // only the owner lock says which.
    let daemon = dep.start(&config);
    let owner = dep
        .owner_with_addr(daemon.id())
        .expect("the daemon's pid and admin address in the owner lock");
    let port = port_of(&owner);
    assert_ne!(port, 0);
    assert_eq!(port, daemon.port, "{owner}");

    // Pause needs the daemon: it is found.
    let paused = dep.cli_json(&config, &["pause"], None);
    assert_eq!(paused["pause_reason"], "paused by an operator", "{paused}");
    let (status, body) = http(port, "GET", "/v1/stats", Some(TOKEN)).unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("paused by an operator"), "{body}");
    let stats = dep.cli_json(&config, &["stats"], None);
    assert_eq!(stats["worker"]["paused"], true, "{stats}");
    assert_eq!(sigterm(daemon), 0);
    // Released on exit: the next CLI opens the store itself.
    let stats = dep.cli_json(&config, &["stats"], None);
    assert!(stats.get("worker").is_none(), "{stats}");
}

#[test]
fn a_files_daemon_waits_for_a_cli_command_that_still_holds_the_queue_directory() {
    let dep = Deployment::on("files");
    let config = dep.config(0);
    // A CLI command that opened the directory just before the daemon took
    // the owner lock: it holds the files backend's own lock for a moment.
    let held = retryq::FileRetryQueue::open(dep.store_path(), retryq::StoreOptions::default())
        .expect("open the queue directory");
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(800));
        retryq::store::RetryQueue::close(&held).unwrap();
    });
    // `start` waits for the API: the daemon did not give up on the lock.
    let daemon = dep.start(&config);
    releaser.join().unwrap();
    let id = dep.cli(&config, &["enqueue"], Some("{\"after\":\"wait\"}"));
    let id = id.trim().to_owned();
    wait_for("the delivery", || {
        dep.deliveries().iter().any(|f| f.starts_with(id.as_str()))
    });
    assert_eq!(sigterm(daemon), 0);
}
