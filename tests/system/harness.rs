//! The system tests' harness: a deployment (its own temp dir, plugin copy,
//! config layers and log file), the real `retryq run` process with real
//! signals, a minimal HTTP client for the admin API, and bounded waits.
//!
//! On a test failure each [`Daemon`] prints the tail of its log, so the
//! assertion message comes with what the daemon was doing.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support;
use crate::upstream::Upstream;

pub const BIN: &str = env!("CARGO_BIN_EXE_retryq");
pub const TOKEN: &str = "system-test-token-0123456789abcdef";

/// One deployment: a temp dir with the http plugin, config files and a log.
pub struct Deployment {
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
}

impl Deployment {
    pub fn new() -> Deployment {
        let dir = tempfile::tempdir().unwrap();
        let plugins = dir.path().join("plugins");
        std::fs::create_dir(&plugins).unwrap();
        let lib = support::plugin_lib("retryq_http");
        std::fs::copy(&lib, plugins.join(lib.file_name().unwrap())).unwrap();
        let log = dir.path().join("retryq.log");
        Deployment { dir, log }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes the base layer (store, http plugin pointed at `upstream`,
    /// admin on a free port, JSON logs) and the scenario's own layer, and
    /// returns both in `--config` order.
    pub fn config(&self, upstream: &Upstream, scenario: &str) -> Vec<PathBuf> {
        self.config_with_listen(upstream, "127.0.0.1:0", scenario)
    }

    pub fn config_with_listen(
        &self,
        upstream: &Upstream,
        listen: &str,
        scenario: &str,
    ) -> Vec<PathBuf> {
        let d = self.path();
        let base = d.join("base.toml");
        std::fs::write(
            &base,
            format!(
                r#"
[store]
path = "{db}"
[worker]
push_timeout = "3s"
[pusher]
name = "http"
[pusher.settings]
base_url = "{url}"
timeout = "3s"
connect_timeout = "1s"
[plugins]
search_path = ["{plugins}"]
[admin]
listen = "{listen}"
[log]
level = "info"
format = "json"
"#,
                db = d.join("queue.db").display(),
                url = upstream.base_url(),
                plugins = d.join("plugins").display(),
            ),
        )
        .unwrap();
        let own = d.join("scenario.toml");
        std::fs::write(&own, scenario).unwrap();
        vec![base, own]
    }

    /// `retryq` with this deployment's layers, token and working directory,
    /// for a test that reads a run's exit status and stderr itself.
    pub fn command(&self, config: &[PathBuf]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("--config-dir")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("config"));
        for file in config {
            cmd.arg("--config").arg(file);
        }
        cmd.env("RETRYQ_ADMIN_TOKEN", TOKEN)
            .env_remove("RUST_LOG")
            .current_dir(self.path());
        cmd
    }

    /// Starts `retryq run` and waits for its admin API.
    pub fn start(&self, config: &[PathBuf]) -> Daemon {
        self.try_start(config)
            .unwrap_or_else(|e| panic!("daemon did not start: {e}\n{}", log_tail(&self.log, 60)))
    }

    /// Starts `retryq run`; Err (with the reason) if it exits or never
    /// says where its API listens.
    pub fn try_start(&self, config: &[PathBuf]) -> Result<Daemon, String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        // Where this run's lines start, so the address is read from this run.
        let offset = log.metadata().unwrap().len() as usize;
        let mut child = self
            .command(config)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Err(format!("retryq run exited with {status}"));
            }
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let found = text
                .get(offset..)
                .unwrap_or_default()
                .lines()
                .find_map(|l| {
                    let v: Value = serde_json::from_str(l).ok()?;
                    if v["fields"]["message"] == "admin API listening" {
                        v["fields"]["addr"].as_str()?.parse::<SocketAddr>().ok()
                    } else {
                        None
                    }
                });
            if let Some(addr) = found {
                break addr;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("no `admin API listening` line within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let daemon = Daemon {
            child: Some(child),
            addr,
            log: self.log.clone(),
        };
        let healthy = wait_until(Duration::from_secs(10), || {
            daemon
                .api("GET", "/healthz", None)
                .is_ok_and(|r| r.0 == 200)
        });
        if !healthy {
            return Err("healthz never answered 200".into());
        }
        Ok(daemon)
    }

    /// Runs a one-shot CLI command with the same config layers.
    pub fn cli(&self, config: &[PathBuf], args: &[&str]) -> Output {
        self.command(config).args(args).output().unwrap()
    }

    /// `retryq list --json` (all statuses) through the CLI, as a JSON array.
    pub fn cli_list(&self, config: &[PathBuf], args: &[&str]) -> Vec<Value> {
        let mut all = vec!["list", "--json", "--limit", "100000"];
        all.extend_from_slice(args);
        let out = self.cli(config, &all);
        assert!(
            out.status.success(),
            "retryq {all:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// A running `retryq run`. Dropped: killed (SIGKILL) and reaped; during a
/// panic, its log tail is printed first.
pub struct Daemon {
    child: Option<Child>,
    pub addr: SocketAddr,
    log: PathBuf,
}

impl Daemon {
    /// An admin API request with the token.
    pub fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> std::io::Result<(u16, Value)> {
        http(self.addr, method, path, Some(TOKEN), body)
    }

    /// An API call that must answer `expect`.
    pub fn api_ok(&self, method: &str, path: &str, body: Option<&[u8]>, expect: u16) -> Value {
        let (status, value) = self
            .api(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert_eq!(status, expect, "{method} {path}: {value}");
        value
    }

    /// `POST /v1/items`; the new ID on 201.
    pub fn enqueue(&self, payload: &Value) -> String {
        let v = self.api_ok(
            "POST",
            "/v1/items",
            Some(payload.to_string().as_bytes()),
            201,
        );
        v["id"].as_str().unwrap().to_owned()
    }

    pub fn stats(&self) -> Value {
        self.api_ok("GET", "/v1/stats", None, 200)
    }

    /// Queue stats' `total_items` is 0: everything acknowledged.
    pub fn is_empty(&self) -> bool {
        self.api("GET", "/v1/stats", None)
            .is_ok_and(|(s, v)| s == 200 && v["total_items"] == 0)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// SIGKILL, reaped.
    pub fn kill9(mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM, then waits (bounded) for the exit.
    pub fn sigterm(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "retryq did not exit within 40 s of SIGTERM\n{}",
                    log_tail(&self.log, 60)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Log lines whose message contains `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        log_messages(&self.log)
            .iter()
            .filter(|m| m.contains(needle))
            .count()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- retryq log tail ({}) ----\n{}",
                self.log.display(),
                log_tail(&self.log, 60)
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The message (plus fields) of every JSON log line, as text.
pub fn log_messages(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| match serde_json::from_str::<Value>(l) {
            Ok(v) => format!("{} {}", v["level"].as_str().unwrap_or(""), v["fields"]),
            Err(_) => l.to_owned(),
        })
        .collect()
}

/// The last `n` log lines, compacted for a test's failure output.
pub fn log_tail(log: &Path, n: usize) -> String {
    let lines = log_messages(log);
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A minimal HTTP/1.1 request (`Connection: close`); the status and the JSON
/// body (Null when the body is not JSON).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
) -> std::io::Result<(u16, Value)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let body = body.unwrap_or_default();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    stream.write_all(&request)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed response");
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

/// Polls `f` every 25 ms until it holds or `limit` passes; whether it held.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A unique JSON report: dedupe is on, so payloads must differ.
pub fn report(scenario: &str, n: usize) -> Value {
    serde_json::json!({
        "scenario": scenario,
        "n": n,
        "finding": "system test",
        "pad": "x".repeat(200),
    })
}
