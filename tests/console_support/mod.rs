//! Shared by the console tests: a real `retryq run` daemon with the http
//! plugin pointed at the scripted test upstream of the system tests, and a
//! small authenticated client for its API.

#![allow(dead_code)]

#[path = "../support/mod.rs"]
mod support;
#[path = "../system/upstream.rs"]
pub mod upstream;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub use upstream::{Mode, Upstream};

pub const BIN: &str = env!("CARGO_BIN_EXE_retryq");
pub const TOKEN: &str = "console-test-token-0123456789";

/// A running daemon; killed when dropped (tests that care stop it with
/// SIGTERM through [`Daemon::sigterm`]).
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// `http` or `https`.
    pub scheme: &'static str,
    pub log: PathBuf,
    pub plugin: PathBuf,
    child: Option<Child>,
    client: reqwest::blocking::Client,
}

impl Daemon {
    /// Starts `retryq run` delivering to `upstream`, with `extra` TOML
    /// appended to the config (e.g. a `[worker]` table), and waits for its API.
    pub fn start(upstream: &Upstream, token: Option<&str>, worker: &str) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_in(dir, upstream, token, worker, None)
    }

    /// [`Daemon::start`] serving TLS with `cert` and `key` (PEM files in
    /// `dir`); the test client trusts `cert`.
    pub fn start_tls(
        dir: tempfile::TempDir,
        upstream: &Upstream,
        token: Option<&str>,
        cert: &Path,
        key: &Path,
    ) -> Daemon {
        Self::start_in(dir, upstream, token, "", Some((cert, key)))
    }

    fn start_in(
        dir: tempfile::TempDir,
        upstream: &Upstream,
        token: Option<&str>,
        worker: &str,
        tls: Option<(&Path, &Path)>,
    ) -> Daemon {
        let plugins = dir.path().join("plugins");
        std::fs::create_dir(&plugins).expect("plugins dir");
        let lib = support::plugin_lib("retryq_http");
        let plugin = plugins.join(lib.file_name().expect("library name"));
        std::fs::copy(&lib, &plugin).expect("copy the http plugin");
        let config = dir.path().join("retryq.toml");
        let tls_lines = match tls {
            Some((cert, key)) => format!(
                "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
                cert.display(),
                key.display()
            ),
            None => String::new(),
        };
        std::fs::write(
            &config,
            format!(
                r#"
[store]
path = "{db}"
max_bytes = 104857600
[worker]
interval = "500ms"
push_timeout = "3s"
{worker}
[backoff]
strategy = "constant"
base = "300ms"
max = "300ms"
jitter = 0.0
[pusher]
name = "http"
[pusher.settings]
base_url = "{url}"
timeout = "3s"
connect_timeout = "1s"
[plugins]
search_path = ["{plugins}"]
[admin]
listen = "127.0.0.1:0"
{tls_lines}
[log]
level = "info"
"#,
                db = dir.path().join("queue.db").display(),
                url = upstream.base_url(),
                plugins = plugins.display(),
            ),
        )
        .expect("write the config");
        let log = dir.path().join("retryq.log");
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(&config)
            .arg("run")
            .env_remove("RUST_LOG")
            .env_remove("RETRYQ_ADMIN_TOKEN")
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        if let Some(token) = token {
            cmd.env("RETRYQ_ADMIN_TOKEN", token);
        }
        let child = cmd.spawn().expect("spawn retryq run");
        // reqwest has rustls without a provider (see src/cli/daemon_client.rs):
        // every client the tests build, TLS or not, needs ring installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::blocking::Client::builder().timeout(Duration::from_secs(20));
        if let Some((cert, _)) = tls {
            let pem = std::fs::read(cert).expect("read the test certificate");
            let certs = reqwest::Certificate::from_pem_bundle(&pem).expect("PEM certificate");
            builder = builder.tls_certs_only(certs);
        }
        let client = builder.build().expect("http client");
        let mut daemon = Daemon {
            dir,
            port: 0,
            scheme: if tls.is_some() { "https" } else { "http" },
            log,
            plugin,
            child: Some(child),
            client,
        };
        daemon.port = daemon.admin_port();
        daemon.wait_for("the admin API", Duration::from_secs(30), || {
            daemon
                .client
                .get(daemon.url("/healthz"))
                .send()
                .is_ok_and(|r| r.status() == 200)
        });
        daemon
    }

    /// The port the daemon's API listens on, from the address it writes
    /// into its store's owner lock (where the CLI finds it): `listen` is
    /// port 0, as a port picked beforehand could be taken before the daemon
    /// binds it.
    fn admin_port(&mut self) -> u16 {
        let lock = self.dir.path().join("queue.db.owner.lock");
        let child = self.child.as_mut().expect("daemon running");
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("daemon status") {
                panic!("retryq run exited with {status}\n{}", self.log_tail());
            }
            let owner: Value = std::fs::read_to_string(&lock)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or(Value::Null);
            let port = owner["admin_addr"]
                .as_str()
                .filter(|_| owner["pid"] == pid)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok());
            if let Some(port) = port {
                return port;
            }
            if Instant::now() >= deadline {
                panic!(
                    "no admin address in {} within 30 s: {owner}\n{}",
                    lock.display(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://127.0.0.1:{}{path}", self.scheme, self.port)
    }

    /// The last lines of the daemon's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// An API call with the test token; answers the status and the body
    /// (JSON, or `Value::Null` when empty).
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        self.api_as(Some(TOKEN), method, path, body)
    }

    pub fn api_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self.client.request(method, self.url(path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req
                .header("Content-Type", "application/json")
                .body(body.to_owned());
        }
        let resp = req.send().expect("API call");
        let status = resp.status().as_u16();
        let text = resp.text().expect("API body");
        let value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    /// Enqueues `body` through the API and returns the new ID.
    pub fn enqueue(&self, body: &str, query: &str) -> String {
        let (status, value) = self.api("POST", &format!("/v1/items{query}"), Some(body));
        assert_eq!(status, 201, "enqueue: {value}");
        value["id"].as_str().expect("an id").to_owned()
    }

    pub fn stats(&self) -> Value {
        let (status, value) = self.api("GET", "/v1/stats", None);
        assert_eq!(status, 200, "stats: {value}");
        value
    }

    /// Waits (bounded) until `f` holds; panics with the log tail if not.
    pub fn wait_for(&self, what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("timed out waiting for {what}\n{}", self.log_tail());
    }

    /// SIGTERM, and the exit code and how long the stop took.
    pub fn sigterm(&mut self) -> (i32, Duration) {
        let mut child = self.child.take().expect("daemon running");
        let started = Instant::now();
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -TERM failed");
        let code = child
            .wait()
            .expect("wait for the daemon")
            .code()
            .unwrap_or(-1);
        (code, started.elapsed())
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
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
