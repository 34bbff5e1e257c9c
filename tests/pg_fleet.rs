//! Fleet tests: real `retryq run` daemons (the built binary, the real
//! `http` plugin, the scripted upstream of the system tests) sharing one
//! PostgreSQL schema on the test server (`scripts/pg-test-server`).
//!
//! - three daemons drain 3,000 items: each delivered, none twice;
//! - one of three is SIGKILLed mid-drain: nothing acknowledged is lost and
//!   its in-flight items are delivered by the others within seconds,
//!   although their lease is a minute;
//! - the database restarts during enqueue and delivery (on a server of the
//!   test's own): enqueues meanwhile answer 503, nothing acknowledged is
//!   lost, delivery resumes without restarting a daemon;
//! - an operator's pause through one daemon stops them all and survives a
//!   restart, while a 401 pause stays with the daemon that met the 401;
//! - outcomes the database refused while down are written once it is back,
//!   though the circuit is open (on a server of the test's own).
//!
//! Without a server configured each test skips, saying why (fails under
//! `RETRYQ_REQUIRE_SERVICES=1`).

#![cfg(unix)]

#[path = "support/mod.rs"]
mod support;

// Shared with the system tests, which use more of them than we do.
#[allow(dead_code)]
#[path = "system/harness.rs"]
mod harness;

#[allow(dead_code)]
#[path = "system/upstream.rs"]
mod upstream;

#[path = "pg_support/mod.rs"]
mod pg_support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use harness::{http, report, wait_until, Daemon, Deployment, TOKEN};
use pg_support::PgSchema;
use serde_json::Value;
use upstream::{Mode, Upstream};

/// Worker settings for every node: short polls and backoff so the tests
/// stay quick, and a lease of a minute, far longer than any wait here, so
/// that whatever a dead node held can only come back through the release
/// of its leases.
const NODE_SETTINGS: &str = r#"
[worker]
concurrency = 8
batch_size = 20
lease = "60s"
push_timeout = "5s"
poll_interval = "200ms"
janitor_interval = "1s"
[backoff]
base = "200ms"
max = "1s"
jitter = 0.0
[circuit]
threshold = 1000
"#;

/// The tests take turns: each runs two or three daemons, and several at
/// once on a small machine would measure its load instead of the fleet.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn take_turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// One daemon's deployment on the shared schema.
struct Node {
    dep: Deployment,
    config: Vec<PathBuf>,
}

impl Node {
    fn new(pg: &PgSchema, upstream: &Upstream, extra: &str) -> Node {
        let dep = Deployment::new();
        let store = pg.store_toml(
            &dep.path().join("node"),
            "max_items = 100000\nmax_bytes = 1073741824",
        );
        let config = dep.config(upstream, &format!("{store}\n{NODE_SETTINGS}\n{extra}"));
        Node { dep, config }
    }

    fn start(&self) -> Daemon {
        self.dep.start(&self.config)
    }

    /// The instance ID this node's latest start joined the fleet as.
    fn instance(&self) -> String {
        let text = std::fs::read_to_string(&self.dep.log).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["fields"]["message"] == "joined the fleet on PostgreSQL")
            .filter_map(|v| v["fields"]["instance"].as_str().map(str::to_owned))
            .next_back()
            .expect("the node logged no `joined the fleet` line")
    }
}

/// Enqueues `count` distinct items through `addrs` in turn, from several
/// threads; the IDs acknowledged (201).
fn enqueue_all(addrs: &[SocketAddr], scenario: &str, count: usize) -> Vec<String> {
    const THREADS: usize = 6;
    let ids = Mutex::new(Vec::with_capacity(count));
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let ids = &ids;
            scope.spawn(move || {
                for n in (t..count).step_by(THREADS) {
                    let addr = addrs[n % addrs.len()];
                    let body = report(scenario, n).to_string();
                    let (status, v) = http(
                        addr,
                        "POST",
                        "/v1/items",
                        Some(TOKEN),
                        Some(body.as_bytes()),
                    )
                    .unwrap_or_else(|e| panic!("enqueue {n}: {e}"));
                    assert_eq!(status, 201, "enqueue {n}: {v}");
                    ids.lock()
                        .unwrap()
                        .push(v["id"].as_str().unwrap().to_owned());
                }
            });
        }
    });
    ids.into_inner().unwrap()
}

/// The acknowledged IDs the upstream never accepted.
fn undelivered(upstream: &Upstream, ids: &[String]) -> Vec<String> {
    let accepted = upstream.accepted_per_key();
    ids.iter()
        .filter(|id| !accepted.contains_key(*id))
        .cloned()
        .collect()
}

#[test]
fn three_daemons_drain_3000_items_each_delivered_once() {
    let Some(pg) = PgSchema::fresh("three_daemons_drain") else {
        return;
    };
    let _turn = take_turn();
    let upstream = Upstream::start(Mode::Accept);
    let nodes: Vec<Node> = (0..3).map(|_| Node::new(&pg, &upstream, "")).collect();
    let daemons: Vec<Daemon> = nodes.iter().map(Node::start).collect();
    let addrs: Vec<SocketAddr> = daemons.iter().map(|d| d.addr).collect();

    let ids = enqueue_all(&addrs, "drain", 3000);
    assert_eq!(ids.len(), 3000);
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 3000);

    let drained = wait_until(Duration::from_secs(45), || {
        upstream.accepted_per_key().len() >= 3000 && daemons[0].is_empty()
    });
    let missing = undelivered(&upstream, &ids);
    assert!(
        drained && missing.is_empty(),
        "{} of 3000 items never delivered (e.g. {:?}); stats {}",
        missing.len(),
        missing.first(),
        daemons[0].stats()
    );
    assert_eq!(
        upstream.duplicates(),
        0,
        "items delivered twice although nothing failed"
    );
    // A daemon counts a success after the commit that deletes the item, so
    // the table can be empty before the last counts are in: wait for them.
    let mut counts = Vec::new();
    let counted = wait_until(Duration::from_secs(10), || {
        counts = daemons
            .iter()
            .map(|d| d.stats()["worker"]["total_succeeded"].as_u64().unwrap_or(0))
            .collect();
        counts.iter().sum::<u64>() == 3000
    });
    assert!(
        counted,
        "the daemons' own counts {counts:?} disagree with the upstream's 3000"
    );
    // One backlog: every daemon's stats show the same (empty) queue, and
    // every daemon took a share of the work.
    for (i, daemon) in daemons.iter().enumerate() {
        let stats = daemon.stats();
        assert_eq!(stats["total_items"], 0, "daemon {i}: {stats}");
        assert!(counts[i] > 0, "daemon {i} delivered nothing: {stats}");
    }
}

#[test]
fn a_killed_daemons_items_are_delivered_by_the_others_within_seconds() {
    let Some(pg) = PgSchema::fresh("killed_daemon") else {
        return;
    };
    let _turn = take_turn();
    // Slow answers keep every daemon's pushes in flight.
    let upstream = Upstream::start(Mode::Delay(Duration::from_millis(30)));
    let nodes: Vec<Node> = (0..3).map(|_| Node::new(&pg, &upstream, "")).collect();
    let mut daemons: Vec<Option<Daemon>> = nodes.iter().map(|n| Some(n.start())).collect();
    let victim_instance = nodes[1].instance();
    // The backlog is loaded while the fleet is paused, so that every item
    // waits in the shared table and each daemon claims its share (an
    // enqueue while delivery runs goes straight to the receiving daemon).
    let first = daemons[0].as_ref().unwrap();
    first.api_ok("POST", "/v1/pause", Some(br#"{"reason":"loading"}"#), 200);
    let paused = wait_until(Duration::from_secs(5), || {
        daemons
            .iter()
            .all(|d| d.as_ref().unwrap().stats()["worker"]["paused"] == true)
    });
    assert!(paused, "the fleet did not pause for the load");
    // Through the two survivors only: the victim's API dies with it.
    let addrs = [first.addr, daemons[2].as_ref().unwrap().addr];
    let loading = Instant::now();
    let ids = enqueue_all(&addrs, "kill", 3000);
    eprintln!("3000 items enqueued in {:?}", loading.elapsed());
    daemons[0]
        .as_ref()
        .unwrap()
        .api_ok("POST", "/v1/resume", None, 200);

    let victim_busy = wait_until(Duration::from_secs(30), || {
        upstream.accepted_per_key().len() >= 600
            && pg.query_i64(&format!(
                "SELECT count(*) FROM items WHERE status = 'processing' AND lease_owner = '{victim_instance}'"
            ))[0]
                > 0
    });
    assert!(victim_busy, "the victim never held items in flight");
    daemons[1].take().unwrap().kill9();
    let killed_at = Instant::now();
    // What it held when it died (one UPDATE releases them all, so this is
    // all or nothing; nothing only if a survivor was already quicker).
    let held: Vec<String> = pg_ids(
        &pg,
        &format!(
            "SELECT id FROM items WHERE status = 'processing' AND lease_owner = '{victim_instance}'"
        ),
    );

    let held_delivered = wait_until(Duration::from_secs(15), || {
        undelivered(&upstream, &held).is_empty()
    });
    let took = killed_at.elapsed();
    assert!(
        held_delivered,
        "{} of the {} items the killed daemon held were not delivered within 15 s (the lease is 60 s)",
        undelivered(&upstream, &held).len(),
        held.len()
    );
    eprintln!(
        "the killed daemon held {} items; all delivered by the others {took:?} after the kill",
        held.len()
    );

    let survivor = daemons[0].as_ref().unwrap();
    let drained = wait_until(Duration::from_secs(30), || {
        undelivered(&upstream, &ids).is_empty() && survivor.is_empty()
    });
    let missing = undelivered(&upstream, &ids);
    assert!(
        drained && missing.is_empty(),
        "{} acknowledged items lost after the kill; stats {}",
        missing.len(),
        survivor.stats()
    );
    // At least once: only what the victim had in flight may go out twice.
    let held: BTreeSet<&String> = held.iter().collect();
    let twice: Vec<String> = upstream
        .accepted_per_key()
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(id, _)| id)
        .collect();
    if !held.is_empty() {
        let unexplained: Vec<&String> = twice.iter().filter(|id| !held.contains(id)).collect();
        assert!(
            unexplained.is_empty(),
            "delivered twice but not held by the killed daemon: {unexplained:?}"
        );
    }
    assert!(twice.len() <= 64, "{} items delivered twice", twice.len());
}

/// The first column of each row, as text.
fn pg_ids(pg: &PgSchema, sql: &str) -> Vec<String> {
    let mut client = pg.client();
    client
        .batch_execute(&format!("SET search_path TO \"{}\"", pg.schema))
        .unwrap();
    client
        .query(sql, &[])
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

#[test]
fn a_database_restart_loses_nothing_and_delivery_resumes() {
    let Some(server) = pg_support::PgServer::dedicated("database_restart") else {
        return;
    };
    let _turn = take_turn();
    let pg = server.schema("database_restart");
    let upstream = Upstream::start(Mode::Delay(Duration::from_millis(10)));
    let nodes: Vec<Node> = (0..2).map(|_| Node::new(&pg, &upstream, "")).collect();
    let mut daemons: Vec<Daemon> = nodes.iter().map(Node::start).collect();
    let addrs: Vec<SocketAddr> = daemons.iter().map(|d| d.addr).collect();

    // Producers enqueue until told to stop, through both daemons, and keep
    // every answer.
    let stop = AtomicBool::new(false);
    let acked = Mutex::new(Vec::<String>::new());
    let refused = Mutex::new(Vec::<(u16, Value)>::new());
    let outage = std::thread::scope(|scope| {
        for t in 0..2usize {
            let (stop, acked, refused, addrs) = (&stop, &acked, &refused, &addrs);
            scope.spawn(move || {
                let mut n = t;
                while !stop.load(Ordering::SeqCst) {
                    let body = report("restart", n).to_string();
                    match http(
                        addrs[n % addrs.len()],
                        "POST",
                        "/v1/items",
                        Some(TOKEN),
                        Some(body.as_bytes()),
                    ) {
                        Ok((201, v)) => acked
                            .lock()
                            .unwrap()
                            .push(v["id"].as_str().unwrap().to_owned()),
                        Ok((status, v)) => {
                            refused.lock().unwrap().push((status, v));
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => panic!("the daemon stopped answering: {e}"),
                    }
                    n += 2;
                }
            });
        }
        let warmed = wait_until(Duration::from_secs(20), || {
            acked.lock().unwrap().len() >= 300 && !upstream.accepted_per_key().is_empty()
        });
        assert!(warmed, "enqueue and delivery never got going");
        // The outage: the server down for a while, then back (a restart,
        // or a failover to a standby at the same address).
        server.ctl("down");
        let down_at = Instant::now();
        let refused_during = wait_until(Duration::from_secs(10), || {
            refused.lock().unwrap().iter().any(|(s, _)| *s == 503)
        });
        std::thread::sleep(Duration::from_millis(500));
        server.ctl("up");
        let outage = down_at.elapsed();
        let before = acked.lock().unwrap().len();
        let resumed = wait_until(Duration::from_secs(20), || {
            acked.lock().unwrap().len() >= before + 200
        });
        stop.store(true, Ordering::SeqCst);
        assert!(
            refused_during,
            "no enqueue was refused with 503 while the database was down; refused: {:?}",
            refused.lock().unwrap()
        );
        assert!(
            resumed,
            "enqueue did not resume after the database came back"
        );
        outage
    });

    let refused = refused.into_inner().unwrap();
    for (status, body) in &refused {
        assert_eq!(
            *status, 503,
            "an enqueue failed otherwise than with 503: {body}"
        );
        let message = body["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("PostgreSQL") && message.contains("127.0.0.1"),
            "the 503 does not name the database server: {body}"
        );
    }
    let acked = acked.into_inner().unwrap();
    let drained = wait_until(Duration::from_secs(30), || {
        undelivered(&upstream, &acked).is_empty() && daemons[0].is_empty()
    });
    let missing = undelivered(&upstream, &acked);
    assert!(
        drained && missing.is_empty(),
        "{} of {} acknowledged items not delivered after the restart; stats {}",
        missing.len(),
        acked.len(),
        daemons[0].stats()
    );
    for (i, daemon) in daemons.iter_mut().enumerate() {
        assert!(daemon.is_running(), "daemon {i} exited during the outage");
    }
    eprintln!(
        "{} items acknowledged, {} enqueues refused with 503 during a {outage:?} outage; all delivered",
        acked.len(),
        refused.len()
    );
}

#[test]
fn an_operator_pause_holds_fleet_wide_and_across_restarts_but_a_401_stays_local() {
    let Some(pg) = PgSchema::fresh("fleet_pause") else {
        return;
    };
    let _turn = take_turn();
    // Node 0 meets revoked credentials; nodes 1 and 2 a healthy upstream.
    let refusing = Upstream::start(Mode::Unauthorized);
    let healthy = Upstream::start(Mode::Accept);
    let nodes = [
        Node::new(&pg, &refusing, ""),
        Node::new(&pg, &healthy, ""),
        Node::new(&pg, &healthy, ""),
    ];
    let mut daemons: Vec<Option<Daemon>> = nodes.iter().map(|n| Some(n.start())).collect();
    let d = |daemons: &[Option<Daemon>], i: usize| -> Value {
        daemons[i].as_ref().unwrap().stats()["worker"].clone()
    };

    // The 401 pauses node 0 only; the others deliver everything.
    let first = enqueue_all(&[daemons[0].as_ref().unwrap().addr], "pause-401", 20);
    let delivered = wait_until(Duration::from_secs(20), || {
        undelivered(&healthy, &first).is_empty() && d(&daemons, 0)["paused"] == true
    });
    assert!(
        delivered,
        "the healthy nodes did not deliver node 0's items, or node 0 was not paused by its 401: {}",
        d(&daemons, 0)
    );
    for i in [1, 2] {
        assert_eq!(
            d(&daemons, i)["paused"],
            false,
            "node {i} followed a 401 that was not its own"
        );
    }

    // The operator pauses through node 1: every node stops.
    let reason = "fleet maintenance window";
    daemons[1].as_ref().unwrap().api_ok(
        "POST",
        "/v1/pause",
        Some(format!(r#"{{"reason":"{reason}"}}"#).as_bytes()),
        200,
    );
    let all_paused = wait_until(Duration::from_secs(5), || {
        (0..3).all(|i| d(&daemons, i)["paused"] == true)
            && [1, 2]
                .iter()
                .all(|&i| d(&daemons, i)["pause_reason"] == reason)
    });
    assert!(
        all_paused,
        "not every node paused: node 2 {}",
        d(&daemons, 2)
    );
    let held = enqueue_all(&[daemons[2].as_ref().unwrap().addr], "paused", 20);
    let before = healthy.request_count();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        healthy.request_count(),
        before,
        "a node delivered while the fleet was paused"
    );

    // A restarted node starts paused.
    daemons[2].take().unwrap().sigterm();
    daemons[2] = Some(nodes[2].start());
    assert_eq!(
        d(&daemons, 2)["paused"],
        true,
        "the restart forgot the fleet's pause"
    );
    assert_eq!(d(&daemons, 2)["pause_reason"], reason);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        healthy.request_count(),
        before,
        "the restarted node delivered while paused"
    );

    // Resumed through node 2: the healthy nodes deliver; node 0 keeps its
    // own 401 pause.
    daemons[2]
        .as_ref()
        .unwrap()
        .api_ok("POST", "/v1/resume", None, 200);
    let resumed = wait_until(Duration::from_secs(15), || {
        undelivered(&healthy, &held).is_empty()
    });
    assert!(
        resumed,
        "the fleet did not resume: node 1 {}",
        d(&daemons, 1)
    );
    // The others read the fleet's pause every half second, node 0 too: it
    // drops the fleet's pause when it reads the resume, and only then shows
    // its own 401 pause again (waiting for that was missing, and the check
    // below failed whenever node 0 read the resume after nodes 1 and 2).
    let all_resumed = wait_until(Duration::from_secs(5), || {
        [1, 2].iter().all(|&i| d(&daemons, i)["paused"] == false)
            && d(&daemons, 0)["pause_reason"] != reason
    });
    assert!(
        all_resumed,
        "a node still holds the fleet's pause: node 0 {}, node 1 {}",
        d(&daemons, 0),
        d(&daemons, 1)
    );
    let node0 = d(&daemons, 0);
    assert_eq!(
        node0["paused"], true,
        "the fleet's resume lifted node 0's 401 pause: {node0}"
    );
    assert!(
        node0["pause_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("credentials"),
        "node 0's pause is no longer its 401: {node0}"
    );
}

/// Outcomes the database refused are written as soon as it is back, even
/// while the circuit is open: the real daemon pushes one item to a slow
/// upstream, the database goes down before the upstream answers 200, and the
/// next push fails and opens the circuit for an hour. Once the database
/// is back the delivered item is acknowledged (gone), and the failed and
/// the waiting hand-off are back to pending, within seconds: not at the
/// probe an hour later, nor at the end of a minute's lease.
#[test]
fn outcomes_refused_during_a_database_outage_are_written_while_the_circuit_is_open() {
    let Some(server) = pg_support::PgServer::dedicated("gated_outcomes") else {
        return;
    };
    let _turn = take_turn();
    let pg = server.schema("gated_outcomes");
    let answer_after = Duration::from_secs(5);
    let upstream = Upstream::start(Mode::Delay(answer_after));
    let dep = Deployment::new();
    let store = pg.store_toml(&dep.path().join("node"), "");
    // One push at a time, hand-offs of one item: the first is in flight,
    // the second waits for the push slot, the third for a hand-off.
    let settings = r#"
[worker]
concurrency = 1
batch_size = 1
lease = "60s"
push_timeout = "20s"
interval = "200ms"
poll_interval = "200ms"
[backoff]
base = "200ms"
max = "1s"
jitter = 0.0
[pusher.settings]
timeout = "20s"
[circuit]
threshold = 1
cooldown = "1h"
max_cooldown = "1h"
"#;
    let config = dep.config(&upstream, &format!("{store}\n{settings}"));
    let daemon = dep.start(&config);
    let ids: Vec<String> = (0..3)
        .map(|n| daemon.enqueue(&report("gated", n)))
        .collect();
    assert!(
        wait_until(Duration::from_secs(10), || upstream.request_count() == 1),
        "the first push never reached the upstream"
    );
    let first_arrival = upstream.requests()[0].at;
    server.ctl("down");
    upstream.set_mode(Mode::Fail(503));
    assert!(
        first_arrival.elapsed() < answer_after,
        "the database took too long to stop: the first answer may have been recorded"
    );
    // The 200 comes back with the database down, the next push fails and
    // opens the circuit.
    let opened = wait_until(Duration::from_secs(20), || {
        daemon.log_count("the store refused to record outcomes") >= 1
            && daemon.log_count("circuit opened") >= 1
    });
    assert!(
        opened,
        "expected a refused outcome and an open circuit; requests {:?}",
        upstream.requests()
    );
    server.ctl("up");

    let status = |id: &str| -> (u16, Value) {
        daemon
            .api("GET", &format!("/v1/items/{id}"), None)
            .unwrap_or((0, Value::Null))
    };
    let settled = wait_until(Duration::from_secs(20), || {
        let delivered = upstream
            .accepted_per_key()
            .into_keys()
            .collect::<BTreeSet<_>>();
        delivered.len() == 1
            && ids.iter().all(|id| {
                let (code, item) = status(id);
                if delivered.contains(id) {
                    code == 404
                } else {
                    code == 200 && item["status"] == "pending"
                }
            })
    });
    let stats = daemon.stats();
    assert!(
        settled,
        "outcomes not written within 20 s of the database's return; items {:?}; stats {stats}",
        ids.iter().map(|id| status(id)).collect::<Vec<_>>()
    );
    assert_eq!(
        stats["worker"]["circuit_state"], "open",
        "written while the circuit was still open: {stats}"
    );
    assert_eq!(upstream.duplicates(), 0);
}
