//! Process deaths: SIGTERM mid-drain (exit 0, nothing lost, a restart
//! drains) and `kill -9` rounds under concurrent API load (every
//! acknowledged item delivered, duplicates bounded by what was in flight,
//! the dead instance's leases released at the next start).

use std::time::Duration;

use crate::harness::{report, wait_until, Deployment};
use crate::upstream::{Mode, Upstream};

#[test]
fn sigterm_mid_drain_loses_nothing_and_a_restart_drains() {
    // 100 items at 100 ms a push over 4 threads: about 2.5 s of drain.
    let upstream = Upstream::start(Mode::Fail(503));
    let dep = Deployment::new();
    let config = dep.config(
        &upstream,
        r#"
[worker]
interval = "200ms"
batch_size = 10
concurrency = 4
max_attempts = 1000
[backoff]
strategy = "constant"
base = "300ms"
max = "300ms"
jitter = 0.0
[circuit]
threshold = 1000000
"#,
    );
    let daemon = dep.start(&config);
    let ids: Vec<String> = (0..100)
        .map(|n| daemon.enqueue(&report("sigterm", n)))
        .collect();
    upstream.set_mode(Mode::Delay(Duration::from_millis(100)));

    let draining = wait_until(Duration::from_secs(10), || {
        upstream.accepted_per_key().len() >= 10
    });
    assert!(draining, "delivery never started");
    let status = daemon.sigterm();
    assert_eq!(status.code(), Some(0), "graceful stop exits 0 ({status})");
    let delivered_before = upstream.accepted_per_key().len();
    assert!(
        delivered_before < ids.len(),
        "the drain finished before SIGTERM: the test did not stop it mid-drain"
    );

    // Nothing left claimed: everything not delivered is pending.
    let left = dep.cli_list(&config, &[]);
    assert!(
        left.iter().all(|i| i["status"] == "pending"),
        "items left claimed after a graceful stop: {:?}",
        left.iter()
            .filter(|i| i["status"] != "pending")
            .collect::<Vec<_>>()
    );
    let accepted = upstream.accepted_per_key();
    for id in &ids {
        let stored = left.iter().any(|i| i["id"] == id.as_str());
        assert!(
            stored || accepted.contains_key(id),
            "item {id} neither delivered nor stored after SIGTERM"
        );
    }

    let daemon = dep.start(&config);
    assert!(
        wait_until(Duration::from_secs(20), || daemon.is_empty()),
        "the restart did not drain: {}",
        daemon.stats()
    );
    let accepted = upstream.accepted_per_key();
    for id in &ids {
        assert!(accepted.contains_key(id), "item {id} never delivered");
    }
    // A graceful stop waits for pushes in flight and records their outcome:
    // no item is sent twice.
    assert_eq!(upstream.duplicates(), 0, "duplicates after a graceful stop");
    eprintln!("sigterm: {delivered_before} delivered before SIGTERM, the rest after the restart");
    assert_eq!(daemon.sigterm().code(), Some(0));
}
