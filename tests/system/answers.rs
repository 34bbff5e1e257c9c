//! How upstream answers map to delivery on the real clock: a 429's
//! Retry-After is honoured, a hanging upstream costs one attempt per
//! deadline (and says which deadline), and an upstream failing its first N
//! pushes gets exactly N + 1.

use std::time::Duration;

use crate::harness::{report, wait_until, Deployment};
use crate::upstream::{Mode, Upstream};

/// Fast retries, so a wait that is longer than them shows the upstream's
/// word was followed; no circuit in the way.
const FAST_RETRIES: &str = r#"
[worker]
interval = "200ms"
max_attempts = 100
push_timeout = "1s"
[backoff]
strategy = "constant"
base = "100ms"
max = "100ms"
jitter = 0.0
[circuit]
threshold = 1000000
[pusher.settings]
timeout = "1s"
"#;

#[test]
fn a_429_retry_after_delays_the_next_push() {
    let upstream = Upstream::start(Mode::TooMany {
        retry_after_secs: 2,
    });
    let dep = Deployment::new();
    let daemon = dep.start(&dep.config(&upstream, FAST_RETRIES));
    let id = daemon.enqueue(&report("retry-after", 0));
    assert!(wait_until(Duration::from_secs(5), || upstream
        .request_count()
        >= 1));
    upstream.set_mode(Mode::Accept);
    assert!(
        wait_until(Duration::from_secs(8), || daemon.is_empty()),
        "not delivered after the Retry-After: {}",
        daemon.stats()
    );
    let requests = upstream.requests();
    assert_eq!(requests.len(), 2, "one 429, then one delivery");
    let waited = requests[1].at - requests[0].at;
    assert!(
        waited >= Duration::from_millis(1900),
        "the push after `Retry-After: 2` came {waited:?} later (backoff alone is 100 ms)"
    );
    assert_eq!(requests[1].key.as_deref(), Some(id.as_str()));
}

#[test]
fn a_hanging_upstream_costs_one_attempt_per_deadline() {
    let upstream = Upstream::start(Mode::Hang);
    let dep = Deployment::new();
    let daemon = dep.start(&dep.config(&upstream, FAST_RETRIES));
    let id = daemon.enqueue(&report("hang", 0));
    let path = format!("/v1/items/{id}");
    assert!(
        wait_until(Duration::from_secs(5), || {
            daemon.api_ok("GET", &path, None, 200)["attempts"].as_u64() >= Some(1)
        }),
        "a hung push never counted as a failed attempt"
    );
    let item = daemon.api_ok("GET", &path, None, 200);
    let error = item["last_error"].as_str().unwrap_or_default();
    assert!(
        !error.contains("0ns") && (error.contains("1s") || error.contains("timed out")),
        "last_error does not name the 1 s deadline: {item}"
    );
    // One attempt per deadline. Without one there is never a second
    // attempt; with too short a one, pushes follow each other at the 100 ms
    // backoff and 200 ms interval.
    assert!(
        wait_until(Duration::from_secs(30), || {
            daemon.api_ok("GET", &path, None, 200)["attempts"].as_u64() >= Some(3)
                && upstream.request_count() >= 3
        }),
        "no third attempt of a hung push: {}",
        daemon.api_ok("GET", &path, None, 200)
    );
    // Each push starts at least 1.1 s (deadline and backoff) after the one
    // before: three span 2.2 s, less however much later the first reached
    // the upstream in its push than the third did. 1.5 s leaves that room.
    let requests = upstream.requests();
    let span = requests[2].at - requests[0].at;
    assert!(
        span >= Duration::from_millis(1500),
        "three pushes to a hung upstream within {span:?}: the 1 s deadline was not waited out"
    );
    upstream.set_mode(Mode::Accept);
    assert!(
        wait_until(Duration::from_secs(5), || daemon.is_empty()),
        "not delivered once the upstream answered again"
    );
}

#[test]
fn failing_the_first_n_pushes_costs_n_plus_one_requests() {
    let upstream = Upstream::start(Mode::FailFirst(3));
    let dep = Deployment::new();
    let daemon = dep.start(&dep.config(&upstream, FAST_RETRIES));
    let payload = report("fail-first", 0);
    let id = daemon.enqueue(&payload);
    assert!(
        wait_until(Duration::from_secs(5), || daemon.is_empty()),
        "not delivered after 3 failures: {}",
        daemon.stats()
    );
    let requests = upstream.requests();
    assert_eq!(requests.len(), 4, "3 failures and one delivery");
    for r in &requests {
        assert_eq!(
            r.key.as_deref(),
            Some(id.as_str()),
            "Idempotency-Key is the item ID"
        );
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body, payload, "the push body is the report as queued");
    }
}
