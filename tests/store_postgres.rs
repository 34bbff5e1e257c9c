//! The PostgreSQL store as a fleet uses it: several handles (one per
//! daemon, each its own instance ID) on one schema. Migrations run once
//! however many start together; admission stays exact under concurrent
//! enqueues; concurrent claims never hand out one item twice; a dead
//! instance's leases are released at once while a live one's are kept;
//! NOTIFY wakes the other handles; a killed connection is replaced.
//!
//! Each test has a schema of its own on the test server and skips
//! without one (fails under `RETRYQ_REQUIRE_SERVICES=1`).

use std::collections::HashSet;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use retryq::item::{ItemId, ItemStatus, NewItem, Payload};
use retryq::store::postgres::{SslMode, SCHEMA_VERSION};
use retryq::store::{
    OverflowPolicy, PostgresOptions, PostgresRetryQueue, RetryQueue, StoreOptions, WriteOp,
    WriteOutcome,
};

#[path = "store_postgres_support/mod.rs"]
mod pg;

fn fresh(test: &str) -> Option<PostgresOptions> {
    if !pg::available(test) {
        return None;
    }
    Some(pg::options(&format!("f_{}", uuid::Uuid::new_v4().simple())))
}

fn handle(options: &PostgresOptions, instance: &str, store: StoreOptions) -> PostgresRetryQueue {
    PostgresRetryQueue::open(
        options,
        StoreOptions {
            instance_id: instance.to_owned(),
            ..store
        },
    )
    .unwrap()
}

fn id(id: &str) -> ItemId {
    ItemId::parse(id).unwrap()
}

fn item(name: &str) -> NewItem {
    NewItem::new(Payload::from_json_str(&format!("{{\"for\":\"{name}\"}}")).unwrap())
        .with_id(id(name))
}

/// Waits up to `limit` for `rx` to be woken; true when it was.
fn woken(rx: &mut tokio::sync::mpsc::Receiver<()>, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if rx.try_recv().is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn drain(rx: &mut tokio::sync::mpsc::Receiver<()>) {
    while rx.try_recv().is_ok() {}
}

#[test]
fn ten_daemons_starting_at_once_migrate_exactly_once() {
    let Some(options) = fresh("ten_daemons_starting_at_once_migrate_exactly_once") else {
        return;
    };
    let barrier = Arc::new(Barrier::new(10));
    let threads: Vec<_> = (0..10)
        .map(|n| {
            let options = options.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                PostgresRetryQueue::open(
                    &options,
                    StoreOptions {
                        instance_id: format!("d{n}"),
                        ..StoreOptions::default()
                    },
                )
            })
        })
        .collect();
    let stores: Vec<PostgresRetryQueue> = threads
        .into_iter()
        .map(|t| t.join().unwrap().unwrap())
        .collect();
    let rows = pg::client()
        .query(
            &format!(
                "SELECT version FROM \"{}\".schema_version ORDER BY version",
                options.schema
            ),
            &[],
        )
        .unwrap();
    let versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
    // Every handle works on the one schema.
    stores[0].enqueue(item("a")).unwrap();
    assert_eq!(stores[9].get(&id("a")).unwrap().id, "a");
}

#[test]
fn admission_is_exact_when_daemons_enqueue_at_once() {
    let Some(options) = fresh("admission_is_exact_when_daemons_enqueue_at_once") else {
        return;
    };
    let limits = StoreOptions {
        max_items: 50,
        overflow: OverflowPolicy::Reject,
        ..StoreOptions::default()
    };
    let barrier = Arc::new(Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|n| {
            let store = handle(&options, &format!("d{n}"), limits.clone());
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let mut stored = 0;
                let mut full = 0;
                let mut duplicate = 0;
                for i in 0..30 {
                    match store.enqueue(item(&format!("d{n}-{i}"))) {
                        Ok(_) => stored += 1,
                        Err(e) if e.kind() == "queue_full" => full += 1,
                        Err(e) => panic!("unexpected {e}"),
                    }
                    // All four race for one fingerprint on their first turn.
                    if i == 0 {
                        let same = NewItem::new(Payload::from_json_str("{\"same\":1}").unwrap())
                            .with_id(id(&format!("same-{n}")));
                        match store.enqueue(same) {
                            Ok(_) => stored += 1,
                            Err(e) if e.kind() == "duplicate_item" => duplicate += 1,
                            Err(e) if e.kind() == "queue_full" => full += 1,
                            Err(e) => panic!("unexpected {e}"),
                        }
                    }
                }
                (stored, full, duplicate)
            })
        })
        .collect();
    let outcomes: Vec<(usize, usize, usize)> =
        threads.into_iter().map(|t| t.join().unwrap()).collect();
    let stored: usize = outcomes.iter().map(|o| o.0).sum();
    let duplicates: usize = outcomes.iter().map(|o| o.2).sum();
    assert_eq!(stored, 50, "{outcomes:?}");
    assert_eq!(
        duplicates, 3,
        "one of four same-fingerprint items: {outcomes:?}"
    );
    let check = handle(&options, "check", limits);
    assert_eq!(check.size().unwrap(), 50);
}

#[test]
fn concurrent_claims_never_hand_out_an_item_twice() {
    let Some(options) = fresh("concurrent_claims_never_hand_out_an_item_twice") else {
        return;
    };
    let producer = handle(&options, "producer", StoreOptions::default());
    let batch: Vec<NewItem> = (0..300).map(|i| item(&format!("i{i:03}"))).collect();
    let results = producer.enqueue_batch(batch).unwrap();
    assert!(results.iter().all(Result::is_ok));
    let barrier = Arc::new(Barrier::new(3));
    let threads: Vec<_> = (0..3)
        .map(|n| {
            let store = handle(&options, &format!("w{n}"), StoreOptions::default());
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let mut got = Vec::new();
                loop {
                    let claimed = store.claim(7, Duration::from_secs(60)).unwrap();
                    if claimed.is_empty() {
                        break;
                    }
                    for it in claimed {
                        assert_eq!(it.lease_owner(), Some(format!("w{n}").as_str()));
                        store.delete(&it.id).unwrap();
                        got.push(it.id);
                    }
                }
                got
            })
        })
        .collect();
    let mut seen = HashSet::new();
    let mut total = 0;
    for t in threads {
        for id in t.join().unwrap() {
            total += 1;
            assert!(seen.insert(id.clone()), "{id} was claimed twice");
        }
    }
    assert_eq!(total, 300);
    assert_eq!(producer.size().unwrap(), 0);
}

#[test]
fn a_dead_instances_leases_are_released_and_a_live_ones_kept() {
    let Some(options) = fresh("a_dead_instances_leases_are_released_and_a_live_ones_kept") else {
        return;
    };
    let a = handle(&options, "inst-a", StoreOptions::default());
    let b = handle(&options, "inst-b", StoreOptions::default());
    for id in ["1", "2", "3", "4"] {
        a.enqueue(item(id)).unwrap();
    }
    assert_eq!(a.claim(2, Duration::from_secs(600)).unwrap().len(), 2);
    assert_eq!(b.claim(2, Duration::from_secs(600)).unwrap().len(), 2);
    // Both alive: nobody's leases are touched.
    assert_eq!(b.release_orphaned_leases().unwrap(), 0);
    assert_eq!(a.release_leases_except("inst-a").unwrap(), 0);
    // A dies: its session (and so its lock) is gone.
    let mut wake = b.subscribe();
    drain(&mut wake);
    a.close().unwrap();
    drop(a);
    assert_eq!(b.release_orphaned_leases().unwrap(), 2);
    assert!(
        woken(&mut wake, Duration::from_secs(5)),
        "a release notifies"
    );
    let processing: Vec<_> = b
        .list(&retryq::store::ListFilter::default())
        .unwrap()
        .into_iter()
        .filter(|i| i.lease_owner().is_some())
        .map(|i| i.lease_owner().map(str::to_owned))
        .collect();
    assert_eq!(processing, vec![Some("inst-b".to_owned()); 2]);
    // The items A held are claimable again, at once.
    assert_eq!(b.claim(10, Duration::from_secs(60)).unwrap().len(), 2);
}

#[test]
fn a_killed_session_is_dead_until_it_reconnects() {
    let Some(options) = fresh("a_killed_session_is_dead_until_it_reconnects") else {
        return;
    };
    // An instance ID of its own: the kill below finds its lock by it.
    let a_id = format!("a-{}", uuid::Uuid::new_v4().simple());
    let a = handle(&options, &a_id, StoreOptions::default());
    let b = handle(&options, "inst-b", StoreOptions::default());
    let mut a_wake = a.subscribe();
    a.enqueue(item("x")).unwrap();
    // The enqueue's own wake-up first, so the next one is the reconnection's.
    assert!(woken(&mut a_wake, Duration::from_secs(5)));
    drain(&mut a_wake);
    // As when A's host dies: the server ends A's session connection.
    let killed: i64 = pg::client()
        .query_one(
            "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l \
             WHERE l.locktype = 'advisory' AND l.objsubid = 2 \
               AND l.objid = (hashtext($1))::oid AND l.granted",
            &[&a_id],
        )
        .unwrap()
        .get(0);
    assert!(killed >= 1, "A's session held its lock");
    // A's session thread reconnects, takes its lock back and wakes its
    // subscribers (notifications may have been lost meanwhile).
    assert!(woken(&mut a_wake, Duration::from_secs(10)));
    // It claims only once it holds its lock again: the others would take
    // earlier claims for a dead instance's.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a.holds_lock() {
        assert!(Instant::now() < deadline, "A never took its lock back");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(a.claim(1, Duration::from_secs(600)).unwrap().len(), 1);
    assert_eq!(b.release_orphaned_leases().unwrap(), 0, "A is alive again");
    // Its pool was untouched; its calls work.
    assert_eq!(a.get(&id("x")).unwrap().lease_owner(), Some(a_id.as_str()));
}

#[test]
fn an_enqueue_on_one_daemon_wakes_the_others() {
    let Some(options) = fresh("an_enqueue_on_one_daemon_wakes_the_others") else {
        return;
    };
    let a = handle(&options, "inst-a", StoreOptions::default());
    let b = handle(&options, "inst-b", StoreOptions::default());
    let mut wake = b.subscribe();
    drain(&mut wake);
    a.enqueue(item("one")).unwrap();
    assert!(woken(&mut wake, Duration::from_secs(5)));
    drain(&mut wake);
    // A refused enqueue stores nothing and wakes nobody.
    assert!(a.enqueue(item("one")).is_err());
    assert!(!woken(&mut wake, Duration::from_millis(300)));
    // A release wakes too; a claim does not need to.
    a.claim(1, Duration::from_secs(60)).unwrap();
    drain(&mut wake);
    a.release(&id("one")).unwrap();
    assert!(woken(&mut wake, Duration::from_secs(5)));
}

#[test]
fn killed_pool_connections_are_replaced_on_the_next_call() {
    let Some(mut options) = fresh("killed_pool_connections_are_replaced_on_the_next_call") else {
        return;
    };
    let app = format!("rq_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let separator = if options.url.contains('?') { '&' } else { '?' };
    options.url = format!("{}{separator}application_name={app}", options.url);
    let store = handle(&options, "inst-a", StoreOptions::default());
    store.enqueue(item("before")).unwrap();
    let killed: i64 = pg::client()
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = $1",
            &[&app],
        )
        .unwrap()
        .get(0);
    assert!(killed >= 2, "the pool's and the session's connections");
    // Nothing acknowledged is lost; the next calls reconnect by themselves.
    store.enqueue(item("after")).unwrap();
    assert_eq!(store.get(&id("before")).unwrap().id, "before");
    assert_eq!(store.size().unwrap(), 2);
}

#[test]
fn fleet_settings_are_shared_and_durable() {
    let Some(options) = fresh("fleet_settings_are_shared_and_durable") else {
        return;
    };
    let a = handle(&options, "inst-a", StoreOptions::default());
    let b = handle(&options, "inst-b", StoreOptions::default());
    assert_eq!(b.fleet_setting("paused").unwrap(), None);
    a.set_fleet_setting("paused", Some("operator")).unwrap();
    assert_eq!(
        b.fleet_setting("paused").unwrap().as_deref(),
        Some("operator")
    );
    drop(a);
    let c = handle(&options, "inst-c", StoreOptions::default());
    assert_eq!(
        c.fleet_setting("paused").unwrap().as_deref(),
        Some("operator")
    );
    c.set_fleet_setting("paused", None).unwrap();
    assert_eq!(b.fleet_setting("paused").unwrap(), None);
    assert!(b.probe_writable().unwrap());
}

/// A server of this test's own (`scripts/pg-test-server`), for an outage.
struct OwnServer {
    dir: String,
}

impl OwnServer {
    fn start() -> (OwnServer, PostgresOptions) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg-test-server");
        let out = std::process::Command::new("bash")
            .arg(script)
            .arg("start")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let var = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")))
                .unwrap_or_else(|| panic!("no {name} in {text}"))
                .trim_matches(|c| c == '"' || c == '\'')
                .to_owned()
        };
        let options = PostgresOptions {
            url: var("RETRYQ_TEST_PG_URL"),
            password_file: Some(var("RETRYQ_TEST_PG_PASSWORD_FILE").into()),
            schema: "outage".into(),
            pool_size: 2,
            connect_timeout: Duration::from_secs(1),
            ..PostgresOptions::default()
        };
        (
            OwnServer {
                dir: var("RETRYQ_TEST_PG_DIR"),
            },
            options,
        )
    }

    fn run(&self, command: &str) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg-test-server");
        let status = std::process::Command::new("bash")
            .args([script, command, &self.dir])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "pg-test-server {command}");
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.run("stop");
    }
}

#[test]
fn an_outage_is_a_storage_error_and_nothing_acknowledged_is_lost() {
    if !pg::available("an_outage_is_a_storage_error_and_nothing_acknowledged_is_lost") {
        return;
    }
    let (server, options) = OwnServer::start();
    let store = handle(&options, "inst-a", StoreOptions::default());
    let mut wake = store.subscribe();
    store.enqueue(item("before")).unwrap();
    store.claim(1, Duration::from_secs(600)).unwrap();
    server.run("down");
    for result in [
        store.enqueue(item("during")).map(|_| ()),
        store.get(&id("before")).map(|_| ()),
        store.delete(&id("before")),
        store.size().map(|_| ()),
    ] {
        let err = result.unwrap_err();
        assert_eq!(err.kind(), "storage", "{err}");
        assert!(
            err.to_string().contains(&options.endpoint()),
            "names the server: {err}"
        );
    }
    server.run("up");
    drain(&mut wake);
    // The next calls reconnect by themselves; what was acknowledged is
    // there, what failed is not, and the delete that failed did not happen.
    let deadline = Instant::now() + Duration::from_secs(20);
    let before = loop {
        match store.get(&id("before")) {
            Ok(item) => break item,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(e.kind(), "storage", "{e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("no reconnection: {e}"),
        }
    };
    assert_eq!(before.lease_owner(), Some("inst-a"));
    assert_eq!(
        store.get(&id("during")).unwrap_err().kind(),
        "item_not_found"
    );
    store.enqueue(item("after")).unwrap();
    assert_eq!(store.size().unwrap(), 2);
    // The session came back too: it wakes its subscribers.
    assert!(woken(&mut wake, Duration::from_secs(15)));
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Gives the server a certificate for `localhost` (no IP in it) signed
/// by a fresh CA, turns TLS on and restarts it; returns the CA file.
fn enable_tls(server: &OwnServer, work: &std::path::Path) -> std::path::PathBuf {
    openssl(
        work,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=retryq test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
    );
    openssl(
        work,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        work.join("ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        work,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext",
        ],
    );
    let data = std::path::Path::new(&server.dir).join("data");
    for file in ["server.pem", "server.key"] {
        std::fs::copy(work.join(file), data.join(file)).unwrap();
    }
    let user = std::fs::read_to_string(std::path::Path::new(&server.dir).join("user")).unwrap();
    let user = user.trim();
    if !user.is_empty() {
        let status = std::process::Command::new("chown")
            .args([user, "server.pem", "server.key"])
            .current_dir(&data)
            .status()
            .unwrap();
        assert!(status.success());
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        data.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .unwrap();
    use std::io::Write;
    writeln!(
        conf,
        "ssl = on\nssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'"
    )
    .unwrap();
    server.run("restart");
    work.join("ca.pem")
}

#[test]
fn sslmode_is_honoured_with_rustls() {
    if !pg::available("sslmode_is_honoured_with_rustls") {
        return;
    }
    let (server, plain) = OwnServer::start();
    let work = tempfile::tempdir().unwrap();
    let ca = enable_tls(&server, work.path());
    let with = |url: String, mode: SslMode, root: Option<&std::path::Path>| PostgresOptions {
        url,
        sslmode: Some(mode),
        sslrootcert: root.map(std::path::Path::to_path_buf),
        schema: "tls".into(),
        ..plain.clone()
    };
    let ip_url = plain.url.clone();
    let name_url = ip_url.replace("127.0.0.1", "localhost");
    // Encrypted without a check, as libpq's `require`.
    let store = PostgresRetryQueue::open(
        &with(ip_url.clone(), SslMode::Require, None),
        StoreOptions::default(),
    )
    .unwrap();
    let tls_sessions = tls_sessions(&with(ip_url.clone(), SslMode::Require, None));
    assert!(tls_sessions >= 1, "the store's connections use TLS");
    drop(store);
    // verify-ca: the chain is checked, not the name (127.0.0.1 is not in it).
    PostgresRetryQueue::open(
        &with(ip_url.clone(), SslMode::VerifyCa, Some(&ca)),
        StoreOptions::default(),
    )
    .unwrap();
    // verify-full: the name must match.
    let err = PostgresRetryQueue::open(
        &with(ip_url.clone(), SslMode::VerifyFull, Some(&ca)),
        StoreOptions::default(),
    )
    .unwrap_err();
    assert_eq!(err.kind(), "storage", "{err}");
    assert!(err.to_string().contains("127.0.0.1"), "{err}");
    PostgresRetryQueue::open(
        &with(name_url, SslMode::VerifyFull, Some(&ca)),
        StoreOptions::default(),
    )
    .unwrap();
    // A CA the server's certificate does not chain to is refused.
    let other = tempfile::tempdir().unwrap();
    openssl(
        other.path(),
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "o.key",
            "-out",
            "o.pem",
            "-days",
            "2",
            "-subj",
            "/CN=other CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
        ],
    );
    let err = PostgresRetryQueue::open(
        &with(ip_url, SslMode::VerifyCa, Some(&other.path().join("o.pem"))),
        StoreOptions::default(),
    )
    .unwrap_err();
    assert_eq!(err.kind(), "storage", "{err}");
}

/// How many TLS sessions the server has for the role, asked over a plain
/// connection of its own.
fn tls_sessions(options: &PostgresOptions) -> i64 {
    let password = std::fs::read_to_string(options.password_file.as_ref().unwrap()).unwrap();
    let mut config: postgres::Config = options.url.parse().unwrap();
    config.password(password.trim_end());
    config.ssl_mode(postgres::config::SslMode::Disable);
    let mut plain = config.connect(postgres::NoTls).unwrap();
    plain
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid \
             WHERE s.ssl AND a.usename = current_user",
            &[],
        )
        .unwrap()
        .get(0)
}

#[test]
fn import_keeps_each_items_state_and_refuses_duplicates() {
    let Some(options) = fresh("import_keeps_each_items_state_and_refuses_duplicates") else {
        return;
    };
    let source = retryq::store::MemoryRetryQueue::default();
    for id in ["p", "dead", "claimed"] {
        source.enqueue(item(id)).unwrap();
    }
    source.requeue(&id("p"), "503", chrono::Utc::now()).unwrap();
    source.mark_failed(&id("dead"), "400").unwrap();
    source.claim(5, Duration::from_secs(60)).unwrap();
    let items = source.list(&retryq::store::ListFilter::default()).unwrap();
    let store = handle(&options, "inst-a", StoreOptions::default());
    store.enqueue(item("taken")).unwrap();
    let mut batch = items.clone();
    batch.push(items[0].clone());
    let results = store.import_batch(batch).unwrap();
    assert_eq!(results.len(), 4);
    assert!(results[..3].iter().all(Result::is_ok), "{results:?}");
    assert_eq!(results[3].as_ref().unwrap_err().kind(), "duplicate_item");
    let dead = store.get(&id("dead")).unwrap();
    assert_eq!(dead.status(), retryq::item::ItemStatus::Failed);
    assert_eq!((dead.attempts, dead.last_error.as_str()), (1, "400"));
    let claimed = store.get(&id("claimed")).unwrap();
    assert_eq!(claimed.status(), retryq::item::ItemStatus::Pending);
    assert_eq!(claimed.lease_until(), None, "an imported claim is dropped");
    assert_eq!(store.get(&id("p")).unwrap().attempts, 1);
    assert_eq!(store.size().unwrap(), 4);
}

#[test]
fn a_handle_without_its_instance_lock_claims_nothing() {
    let Some(options) = fresh("a_handle_without_its_instance_lock_claims_nothing") else {
        return;
    };
    let first = handle(&options, "same-instance", StoreOptions::default());
    assert!(first.holds_lock());
    // A second handle with the same instance ID cannot take the lock while
    // the first holds it: its claims would look orphaned to the fleet.
    let second = handle(&options, "same-instance", StoreOptions::default());
    assert!(!second.holds_lock());
    second.enqueue(item("ready")).unwrap();
    assert!(second.claim(5, Duration::from_secs(60)).unwrap().is_empty());
    // Nor does it store an item claimed: the outbox's item is stored
    // pending (for a claim), and a direct call is refused, storing nothing.
    let lease = Duration::from_secs(60);
    let outcomes = second
        .apply_batch(vec![WriteOp::EnqueueClaimed {
            item: item("handed"),
            lease,
        }])
        .unwrap();
    assert!(
        matches!(outcomes.as_slice(), [Ok(WriteOutcome::Enqueued(_))]),
        "{outcomes:?}"
    );
    assert_eq!(
        second.get(&id("handed")).unwrap().status(),
        ItemStatus::Pending
    );
    let e = second
        .enqueue_claimed(vec![item("direct")], lease)
        .unwrap_err();
    assert!(
        e.is_storage() && e.to_string().contains("instance lock"),
        "{e}"
    );
    assert!(second.get(&id("direct")).is_err(), "nothing stored");
    assert_eq!(first.claim(5, Duration::from_secs(60)).unwrap().len(), 2);
    // Once the first is gone, the second takes the lock over.
    first.close().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !second.holds_lock() {
        assert!(Instant::now() < deadline, "the lock was never taken over");
        std::thread::sleep(Duration::from_millis(20));
    }
}
