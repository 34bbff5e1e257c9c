//! The console's API on a real `retryq run` daemon: `GET /v1/events` read
//! as a stream by a real HTTP client, `GET /v1/stats/history`, `GET /v1/info`,
//! the embedded `/ui` assets; each with its auth, bad input and an empty
//! queue.

#![cfg(unix)]

mod console_support;

use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::Duration;

use console_support::{Daemon, Mode, Upstream, TOKEN};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// One server-sent event: its `event:` name and its `data:` parsed.
#[derive(Debug)]
struct Event {
    name: String,
    id: Option<u64>,
    data: Value,
}

/// Opens `GET /v1/events` and reads it on a thread, event by event.
fn open_stream(daemon: &Daemon) -> mpsc::Receiver<Event> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client");
    let resp = client
        .get(daemon.url("/v1/events"))
        .bearer_auth(TOKEN)
        .send()
        .expect("open the stream");
    assert_eq!(resp.status(), 200);
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "text/event-stream");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(resp);
        let (mut name, mut id, mut data) = (String::new(), None, String::new());
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let text = line.trim_end_matches('\n');
            if text.is_empty() {
                if !name.is_empty() {
                    let event = Event {
                        name: std::mem::take(&mut name),
                        id: id.take(),
                        data: serde_json::from_str(&data).expect("data is JSON"),
                    };
                    data.clear();
                    if tx.send(event).is_err() {
                        return;
                    }
                }
            } else if let Some(v) = text.strip_prefix("event: ") {
                name = v.to_owned();
            } else if let Some(v) = text.strip_prefix("id: ") {
                id = v.parse().ok();
            } else if let Some(v) = text.strip_prefix("data: ") {
                data.push_str(v);
            }
        }
    });
    rx
}

/// The next event named `name`, skipping others (bounded wait).
fn next_named(rx: &mpsc::Receiver<Event>, name: &str) -> Event {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(event) if event.name == name => return event,
            Ok(_) => continue,
            Err(e) => panic!("no {name} event: {e}"),
        }
    }
}

/// One event of each of `names` about item `id`, in whatever order they
/// arrive, skipping others (bounded wait).
fn next_for_item<const N: usize>(
    rx: &mpsc::Receiver<Event>,
    id: &str,
    names: [&str; N],
) -> [Event; N] {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut found: [Option<Event>; N] = std::array::from_fn(|_| None);
    while found.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let event = match rx.recv_timeout(left) {
            Ok(event) => event,
            Err(e) => panic!("missing {names:?} for {id}, got {found:?}: {e}"),
        };
        if event.data["item_id"] != id {
            continue;
        }
        if let Some(i) = names.iter().position(|n| *n == event.name) {
            assert!(found[i].is_none(), "{} twice for {id}", event.name);
            found[i] = Some(event);
        }
    }
    found.map(|e| e.expect("found"))
}

#[test]
fn events_stream_outcomes_enqueues_and_gates_and_end_with_the_daemon() {
    let upstream = Upstream::start(Mode::Accept);
    let mut daemon = Daemon::start(&upstream, Some(TOKEN), "");

    // Auth: no token and a wrong one are refused; bad input is a 400.
    assert_eq!(daemon.api_as(None, "GET", "/v1/events", None).0, 401);
    assert_eq!(
        daemon
            .api_as(Some("wrong-token-0123456789abc"), "GET", "/v1/events", None)
            .0,
        401
    );
    assert_eq!(daemon.api("POST", "/v1/events", None).0, 405);

    let events = open_stream(&daemon);
    let state = next_named(&events, "state");
    assert_eq!(state.data["paused"], false);
    assert_eq!(state.data["circuit_state"], "closed");
    assert!(state.id.is_none(), "gate events carry no id");

    let id = daemon.enqueue(r#"{"finding":"x"}"#, "?type=findings");
    // The handler publishes `enqueued` after the worker hand-off returns, so
    // the worker's `delivered` may be published first: no order is promised.
    let [enqueued, delivered] = next_for_item(&events, &id, ["enqueued", "delivered"]);
    assert_eq!(enqueued.data["item_type"], "findings");
    assert_eq!(delivered.data["attempts"], 1);
    assert!(
        delivered.data["latency_ms"].is_u64(),
        "{:?}",
        delivered.data
    );
    assert!(
        enqueued.id.is_some() && delivered.id.is_some() && enqueued.id != delivered.id,
        "outcome events carry distinct ids: {:?} and {:?}",
        enqueued.id,
        delivered.id
    );

    // A failing upstream: a retried event with the error.
    upstream.set_mode(Mode::Fail(503));
    let failing = daemon.enqueue(r#"{"finding":"y"}"#, "?max_attempts=2");
    let retried = next_named(&events, "retried");
    assert_eq!(retried.data["item_id"], failing.as_str());
    assert!(retried.data["error"]
        .as_str()
        .is_some_and(|e| !e.is_empty()));
    let exhausted = next_named(&events, "exhausted");
    assert_eq!(exhausted.data["item_id"], failing.as_str());
    upstream.set_mode(Mode::Accept);

    // Pause and resume through the API show up as gate events.
    let (status, _) = daemon.api("POST", "/v1/pause", Some(r#"{"reason":"maintenance"}"#));
    assert_eq!(status, 200);
    let paused = next_named(&events, "delivery_paused");
    assert_eq!(paused.data["pause_reason"], "maintenance");
    assert!(paused.data["paused_since"].is_string());
    assert_eq!(daemon.api("POST", "/v1/resume", None).0, 200);
    let resumed = next_named(&events, "delivery_resumed");
    assert_eq!(resumed.data["paused"], false);

    // The history counted the same events in the current minute.
    let (status, history) = daemon.api("GET", "/v1/stats/history", None);
    assert_eq!(status, 200, "{history}");
    assert_eq!(history["buckets"].as_array().map(Vec::len), Some(60));
    assert_eq!(history["delivered"], 1, "{history}");
    assert_eq!(history["enqueued"], 2, "{history}");
    assert_eq!(history["failed"], 2, "{history}");
    assert_eq!(history["dead_lettered"], 1, "{history}");

    // SIGTERM with a stream open: the stream ends and the stop is prompt
    // (the server's graceful stop does not wait out its timeout for it).
    let (code, took) = daemon.sigterm();
    assert_eq!(code, 0, "{}", daemon.log_tail());
    assert!(took < Duration::from_secs(8), "stop took {took:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match events.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
            Ok(_) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("the stream did not end"),
        }
    }
}

#[test]
fn history_info_and_ui_on_an_empty_queue() {
    let upstream = Upstream::start(Mode::Accept);
    let daemon = Daemon::start(&upstream, Some(TOKEN), "");

    for path in ["/v1/stats/history", "/v1/info"] {
        assert_eq!(daemon.api_as(None, "GET", path, None).0, 401, "{path}");
        assert_eq!(daemon.api("DELETE", path, None).0, 405, "{path}");
    }
    let (status, history) = daemon.api("GET", "/v1/stats/history", None);
    assert_eq!(status, 200);
    assert_eq!(history["bucket_seconds"], 60);
    let buckets = history["buckets"].as_array().expect("buckets");
    assert_eq!(buckets.len(), 60);
    assert!(buckets
        .iter()
        .all(|b| b["delivered"] == 0 && b["failed"] == 0));

    let (status, info) = daemon.api("GET", "/v1/info", None);
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["max_bytes"], 104857600);
    let plugin = &info["plugins"][0];
    assert_eq!(plugin["role"], "pusher");
    assert_eq!(plugin["name"], "http");
    assert!(plugin["version"].as_str().is_some_and(|v| !v.is_empty()));
    let bytes = std::fs::read(&daemon.plugin).expect("read the plugin");
    let expected: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(plugin["sha256"], expected.as_str());
    let canonical = daemon.plugin.canonicalize().expect("canonical path");
    assert_eq!(plugin["path"], canonical.display().to_string().as_str());

    // The console's assets need no token, and forbid framing and inline code.
    let client = reqwest::blocking::Client::new();
    for (path, kind) in [
        ("/ui", "text/html"),
        ("/ui/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ] {
        let resp = client.get(daemon.url(path)).send().expect("asset");
        assert_eq!(resp.status(), 200, "{path}");
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        assert!(header("content-type").starts_with(kind), "{path}");
        assert!(header("content-security-policy").contains("frame-ancestors 'none'"));
        assert!(!header("content-security-policy").contains("unsafe-inline"));
        assert!(
            resp.text().expect("body").len() > 100,
            "{path} is not empty"
        );
    }
    assert_eq!(daemon.api_as(None, "GET", "/ui/missing.js", None).0, 404);

    // The OpenAPI document needs no token and is 3.1.
    let (status, doc) = daemon.api_as(None, "GET", "/v1/openapi.json", None);
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/v1/events"]["get"].is_object());
    // A 405 lists the methods the document gives the resource.
    let allow = |method: &str, path: &str| {
        let resp = client
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).expect("method"),
                daemon.url(path),
            )
            .bearer_auth(TOKEN)
            .send()
            .expect("request");
        assert_eq!(resp.status(), 405, "{method} {path}");
        resp.headers()
            .get("allow")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(allow("PUT", "/v1/items"), "GET, POST, DELETE");
    assert_eq!(allow("OPTIONS", "/v1/items/retry-failed"), "POST");
    assert_eq!(allow("PUT", "/v1/items/some-id"), "GET, DELETE");
    // The pause body is an object or nothing.
    assert_eq!(daemon.api("POST", "/v1/pause", Some("[]")).0, 400);
}

/// A self-signed certificate for 127.0.0.1 made by `openssl`, or `None`
/// (with the reason printed) when the machine has no openssl.
fn self_signed(dir: &std::path::Path) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=retryq-test"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    match made {
        Ok(status) if status.success() => Some((cert, key)),
        other => {
            assert!(
                std::env::var("RETRYQ_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "RETRYQ_REQUIRE_SERVICES=1 but openssl could not make a test certificate: {other:?}"
            );
            eprintln!("skipping the TLS test: openssl could not make a certificate ({other:?})");
            None
        }
    }
}

#[test]
fn the_listener_serves_tls_and_the_cli_follows_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Some((cert, key)) = self_signed(dir.path()) else {
        return;
    };
    let upstream = Upstream::start(Mode::Accept);
    let daemon = Daemon::start_tls(dir, &upstream, Some(TOKEN), &cert, &key);
    assert!(daemon.url("/").starts_with("https://"));

    // The API and the console over HTTPS, the certificate verified.
    let id = daemon.enqueue(r#"{"over":"tls"}"#, "");
    daemon.wait_for("the delivery", Duration::from_secs(20), || {
        daemon.stats()["total_items"] == 0
    });
    assert_eq!(upstream.accepted_per_key().get(&id), Some(&1));
    assert_eq!(daemon.api_as(None, "GET", "/ui", None).0, 200);
    assert_eq!(daemon.api_as(None, "GET", "/v1/stats", None).0, 401);

    // Plain HTTP on the same port gets no answer.
    let plain = reqwest::blocking::Client::new()
        .get(format!("http://127.0.0.1:{}/healthz", daemon.port))
        .timeout(Duration::from_secs(5))
        .send();
    assert!(
        plain.as_ref().map_or(true, |r| r.status() != 200),
        "plain HTTP answered: {plain:?}"
    );

    // The CLI reaches the daemon through its published https address,
    // trusting the configured certificate.
    let out = std::process::Command::new(console_support::BIN)
        .arg("--config")
        .arg(daemon.path().join("retryq.toml"))
        .args(["--json", "stats"])
        .env("RETRYQ_ADMIN_TOKEN", TOKEN)
        .current_dir(daemon.path())
        .output()
        .expect("run the CLI");
    assert!(
        out.status.success(),
        "retryq stats over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: Value = serde_json::from_slice(&out.stdout).expect("stats JSON");
    assert_eq!(stats["total_items"], 0, "{stats}");
}
