//! The real `retryq run` daemon: the chaos plugin, items enqueued by the CLI
//! from another process while it runs, the token-protected API, SIGTERM
//! during delivery (exit 0, nothing lost) and a restart that drains.

#![cfg(unix)]

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_retryq");
const TOKEN: &str = "test-token-0123456789abcdef";

fn chaos_lib() -> PathBuf {
    support::plugin_lib("retryq_chaos")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Deployment {
    dir: tempfile::TempDir,
    port: u16,
}

impl Deployment {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("plugins")).unwrap();
        std::fs::copy(chaos_lib(), dir.path().join("plugins/libretryq_chaos.so")).unwrap();
        Deployment {
            dir,
            port: free_port(),
        }
    }

    fn delivered_dir(&self) -> PathBuf {
        self.dir.path().join("delivered")
    }

    /// Writes the config with the chaos plugin failing the first `fail_first` pushes.
    fn config(&self, fail_first: u32) -> PathBuf {
        let d = self.dir.path();
        let path = d.join(format!("retryq-{fail_first}.toml"));
        std::fs::write(
            &path,
            format!(
                r#"
[store]
path = "{db}"
[worker]
interval = "1s"
push_timeout = "2s"
lease = "10s"
max_attempts = 1000
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
fail_first = {fail_first}
record_dir = "{rec}"
[plugins]
search_path = ["{plugins}"]
[admin]
listen = "127.0.0.1:{port}"
[log]
level = "info"
"#,
                db = d.join("queue.db").display(),
                rec = self.delivered_dir().display(),
                plugins = d.join("plugins").display(),
                port = self.port,
            ),
        )
        .unwrap();
        path
    }

    fn start(&self, config: &Path) -> Child {
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
        wait_for("the admin API", || {
            http(self.port, "GET", "/healthz", None).is_some_and(|(s, _)| s == 200)
        });
        child
    }

    fn cli(&self, config: &Path, args: &[&str], stdin: Option<&str>) -> String {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(config)
            .args(args)
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
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "retryq {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
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

fn sigterm(mut child: Child) -> i32 {
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
    wait_for("three deliveries", || dep.deliveries().len() == 3);
    for id in &ids {
        assert!(
            dep.deliveries().iter().any(|f| f.starts_with(id.as_str())),
            "{id} delivered"
        );
    }
    // A push is acknowledged (deleted) in the commit after it: wait for it.
    wait_for("the acknowledgements", || {
        let stats = dep.cli(&config, &["stats", "--json"], None);
        let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
        stats["total_items"] == 0
    });

    // The API needs the token for everything but health.
    assert_eq!(http(dep.port, "GET", "/v1/stats", None).unwrap().0, 401);
    let (status, body) = http(dep.port, "GET", "/v1/stats", Some(TOKEN)).unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, metrics) = http(dep.port, "GET", "/metrics", Some(TOKEN)).unwrap();
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
    wait_for("the backlog to drain", || dep.deliveries().len() == 5);
    for id in &ids {
        assert!(dep.deliveries().iter().any(|f| f.starts_with(id.as_str())));
    }
    assert_eq!(sigterm(daemon), 0);
}
