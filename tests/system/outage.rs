//! Outage then recovery: the upstream fails until the circuit opens, then
//! comes back. The backlog must drain within the cool-down plus a few
//! seconds, and the outage must cost the upstream only a few probes.

use std::time::{Duration, Instant};

use crate::harness::{report, wait_until, Deployment};
use crate::upstream::{Mode, Upstream};

const SCENARIO: &str = r#"
[worker]
interval = "200ms"
batch_size = 50
max_attempts = 50
[backoff]
base = "100ms"
max = "500ms"
[circuit]
threshold = 5
cooldown = "1s"
"#;

#[test]
fn an_outage_opens_the_circuit_and_recovery_drains_the_backlog() {
    outage_then_recovery(Mode::Fail(503));
}

/// The issue's stall: an upstream that fails slowly keeps pushes in flight
/// while the circuit opens, and their late failures left the breaker with
/// no probe scheduled (reproduced on 5dfdca8..c11dd70).
#[test]
fn a_slow_failing_outage_still_probes_and_recovers() {
    outage_then_recovery(Mode::FailSlowly(503, Duration::from_millis(300)));
}

fn outage_then_recovery(failing: Mode) {
    let upstream = Upstream::start(failing);
    let dep = Deployment::new();
    let config = dep.config(&upstream, SCENARIO);
    let daemon = dep.start(&config);

    let ids: Vec<String> = (0..20)
        .map(|n| daemon.enqueue(&report("outage", n)))
        .collect();

    let opened = wait_until(Duration::from_secs(10), || {
        daemon.stats()["worker"]["circuit_opened"].as_u64() >= Some(1)
    });
    assert!(opened, "the circuit never opened: {}", daemon.stats());
    let opened_at = Instant::now();
    let before_open = upstream.request_count();

    // README: after `threshold` (5) consecutive failures the circuit opens
    // and nothing more is pushed; only pushes already in flight (at most
    // `concurrency`, 4) may still arrive. Items already claimed or handed
    // over from the enqueue must wait too, or an outage under load costs the
    // upstream every one of them.
    assert!(
        before_open <= 5 + 4 + 2,
        "{before_open} requests reached the upstream before the circuit opened \
         (threshold 5, concurrency 4); arrivals (ms): {:?}",
        arrivals_ms(&upstream)
    );

    // Stay down for a few cool-downs: the breaker should send a handful of
    // probes (1 s, then 2 s: about two in 4 s), not one push per item.
    std::thread::sleep(Duration::from_secs(4));
    let during = upstream.request_count() - before_open;
    let stats = daemon.stats();
    assert!(
        during <= 6,
        "{during} requests reached the upstream in the 4 s after the circuit opened \
         (expected a few probes); stats: {stats}"
    );
    assert!(
        during >= 1,
        "no probe in the 4 s after the circuit opened (cool-down 1 s); stats: {stats}"
    );

    upstream.set_mode(Mode::Accept);
    let recovered_at = Instant::now();
    // The next probe comes at most one doubled cool-down (4 s) after the
    // last failed one; the rest is the drain.
    let drained = wait_until(Duration::from_secs(15), || daemon.is_empty());
    assert!(
        drained,
        "the backlog did not drain within 15 s of the upstream's recovery \
         ({} s after the circuit opened); upstream saw {} requests in all; stats: {}",
        opened_at.elapsed().as_secs(),
        upstream.request_count(),
        daemon.stats()
    );
    eprintln!(
        "outage: {before_open} requests before the circuit opened, {during} during 4 s open, \
         drained {:?} after recovery; arrivals (ms): {:?}",
        recovered_at.elapsed(),
        arrivals_ms(&upstream)
    );

    let accepted = upstream.accepted_per_key();
    for id in &ids {
        assert_eq!(accepted.get(id), Some(&1), "item {id} delivered once");
    }
    assert!(upstream
        .requests()
        .iter()
        .all(|r| r.method == "POST" && r.path == "/api/v1/agent/ingest"));
    assert_eq!(daemon.stats()["worker"]["circuit_state"], "closed");
}

/// When each request arrived, in ms after the first: the outage's timeline
/// for a failure message.
fn arrivals_ms(upstream: &Upstream) -> Vec<u128> {
    let requests = upstream.requests();
    let Some(first) = requests.first().map(|r| r.at) else {
        return Vec::new();
    };
    requests
        .iter()
        .map(|r| (r.at - first).as_millis())
        .collect()
}
