//! 401 then fixed credentials: an upstream that refuses our credentials
//! pauses delivery without burning attempts; once it accepts again,
//! delivery resumes after `POST /v1/resume`, `retryq resume`, or by itself
//! after an unauthorized probe (when the probe interval is configurable).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::harness::{report, wait_until, Daemon, Deployment};
use crate::upstream::{Mode, Upstream};

const SCENARIO: &str = r#"
[worker]
interval = "200ms"
batch_size = 10
concurrency = 2
max_attempts = 3
[backoff]
base = "100ms"
max = "500ms"
[circuit]
threshold = 5
cooldown = "1s"
"#;

/// Starts a daemon against a 401 upstream, queues 5 items and checks the
/// pause: no attempt burned, delivery stopped, the reason in `stats`.
fn paused_by_401(scenario: &str) -> (Upstream, Deployment, Vec<PathBuf>, Daemon, Vec<String>) {
    let upstream = Upstream::start(Mode::Unauthorized);
    let dep = Deployment::new();
    let config = dep.config(&upstream, scenario);
    let daemon = dep.start(&config);
    let ids: Vec<String> = (0..5).map(|n| daemon.enqueue(&report("auth", n))).collect();

    let paused = wait_until(Duration::from_secs(10), || {
        daemon.stats()["worker"]["paused"] == true
    });
    let stats = daemon.stats();
    assert!(paused, "a 401 did not pause delivery: {stats}");
    let reason = stats["worker"]["pause_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("401") || reason.contains("credentials"),
        "pause_reason does not say why: {stats}"
    );
    assert!(upstream.request_count() >= 1);

    // Paused: probes only, each sent a probe interval (1 s at the least)
    // after the previous 401, so a window of W holds at most 1 + W/1s of
    // them. Unpaused, the 5 items would be pushed every 200 ms.
    let started = Instant::now();
    let seen = upstream.request_count();
    std::thread::sleep(Duration::from_millis(900));
    let more = upstream.request_count() - seen;
    let window = started.elapsed();
    let allowed = 1 + window.as_secs() as usize;
    assert!(
        more <= allowed,
        "{more} pushes in {window:?} while paused by a 401"
    );

    // No attempt burned (max_attempts is 3: a burned one would show).
    for id in &ids {
        let item = daemon.api_ok("GET", &format!("/v1/items/{id}"), None, 200);
        assert_eq!(item["attempts"], 0, "a 401 burned an attempt: {item}");
        // Pending, or claimed right now as the next probe (with a probe
        // interval of 1 s, one item is in flight now and then).
        assert!(
            item["status"] == "pending" || item["status"] == "processing",
            "{item}"
        );
    }
    (upstream, dep, config, daemon, ids)
}

fn assert_drains(
    daemon: &Daemon,
    upstream: &Upstream,
    ids: &[String],
    within: Duration,
    how: &str,
) {
    assert!(
        wait_until(within, || daemon.is_empty()),
        "delivery did not resume within {within:?} after {how}: {}",
        daemon.stats()
    );
    let accepted = upstream.accepted_per_key();
    for id in ids {
        assert!(accepted.contains_key(id), "item {id} never delivered");
    }
    assert_eq!(daemon.stats()["worker"]["paused"], false);
}

#[test]
fn a_401_pauses_without_burning_attempts_and_the_api_resume_restarts_delivery() {
    let (upstream, _dep, _config, daemon, ids) = paused_by_401(SCENARIO);
    upstream.set_mode(Mode::Accept);
    let (status, body) = daemon.api("POST", "/v1/resume", None).unwrap();
    assert!(
        (200..300).contains(&status),
        "POST /v1/resume answered {status}: {body}"
    );
    assert_drains(
        &daemon,
        &upstream,
        &ids,
        Duration::from_secs(5),
        "POST /v1/resume",
    );
}

#[test]
fn a_401_pause_is_lifted_by_the_cli_resume() {
    let (upstream, dep, config, daemon, ids) = paused_by_401(SCENARIO);
    upstream.set_mode(Mode::Accept);
    let out = dep.cli(&config, &["resume"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("unrecognized subcommand") {
        eprintln!(
            "skipped: this build has no `retryq resume` ({})",
            stderr.trim()
        );
        return;
    }
    assert!(out.status.success(), "retryq resume: {stderr}");
    assert_drains(
        &daemon,
        &upstream,
        &ids,
        Duration::from_secs(5),
        "retryq resume",
    );
}

#[test]
fn a_401_pause_ends_by_itself_after_a_successful_probe() {
    let with_probe = SCENARIO.replacen(
        "[worker]\n",
        "[worker]\nunauthorized_probe_interval = \"1s\"\n",
        1,
    );
    let probe = Deployment::new();
    let up = Upstream::start(Mode::Accept);
    let check = probe.cli(&probe.config(&up, &with_probe), &["config", "check"]);
    if !check.status.success() {
        eprintln!(
            "skipped: worker.unauthorized_probe_interval is not configurable in this build ({})",
            String::from_utf8_lossy(&check.stderr).trim()
        );
        return;
    }
    drop((probe, up));

    let (upstream, _dep, _config, daemon, ids) = paused_by_401(&with_probe);
    upstream.set_mode(Mode::Accept);
    // The next probe is at most 1 s away; no resume is sent.
    assert_drains(&daemon, &upstream, &ids, Duration::from_secs(6), "a probe");
}
