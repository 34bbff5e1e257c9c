//! Hostile plugins under process isolation (`isolation = "process"`): a C
//! plugin compiled at test time (tests/c_plugin/hostile.c) segfaults,
//! aborts, exits, spins, allocates without bound, answers an out-of-range
//! status, invalid UTF-8 or a NULL buffer with a length, or refuses create,
//! each as a payload asks. For each: the host survives, nothing acknowledged
//! is lost, no innocent item is charged an attempt, and the item's
//! `last_error` (and the log) names the cause.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use retryq::plugin_process::{PluginTarget, ProcessOptions, ProcessPusher};
use retryq::plugin_sdk::host::PluginError;
use retryq::plugin_sdk::{CallContext, ItemMeta, PushOutcome, Pusher};
use retryq::store::{RetryQueue, SqliteRetryQueue, StoreOptions};
use retryq::worker::{EventKind, RetryWorker, RetryWorkerConfig};
use retryq::NewItem;

/// Compiles tests/c_plugin/hostile.c once per test binary.
fn hostile_lib() -> PathBuf {
    static LIB: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    LIB.get_or_init(|| compile_hostile(&[])).1.clone()
}

/// Compiles tests/c_plugin/hostile.c with `defines` into a private folder.
fn compile_hostile(defines: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("libhostile.so");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-shared", "-fPIC", "-O0", "-o"])
        .arg(&out)
        .arg("-I")
        .arg(root.join("plugins/sdk/include"))
        .args(defines)
        .arg(root.join("tests/c_plugin/hostile.c"))
        .status()
        .unwrap();
    assert!(status.success(), "cc failed");
    (dir, out)
}

fn options() -> ProcessOptions {
    ProcessOptions {
        concurrency: 4,
        // Enough for the child, small enough that "alloc" dies quickly.
        memory_limit: Some(512 << 20),
        restart_backoff: Duration::from_millis(20),
        hang_grace: Duration::from_millis(100),
        ..ProcessOptions::new(PathBuf::from(env!("CARGO_BIN_EXE_retryq")))
    }
}

fn target(settings: serde_json::Value) -> PluginTarget {
    PluginTarget {
        label: "hostile".into(),
        path: hostile_lib(),
        sha256: None,
        settings,
    }
}

fn start(options: ProcessOptions) -> Arc<ProcessPusher> {
    Arc::new(ProcessPusher::start(target(serde_json::json!({})), options).unwrap())
}

fn open_queue(dir: &Path) -> Arc<dyn RetryQueue> {
    Arc::new(SqliteRetryQueue::open(dir.join("q.db"), StoreOptions::default()).unwrap())
}

/// Room for the replays one at a time after a crash, child restarts
/// included: they share the deadline of the call that was in flight.
const REPLAY_ROOM: Duration = Duration::from_secs(10);

fn worker_config(push_timeout: Duration) -> RetryWorkerConfig {
    RetryWorkerConfig {
        batch_size: 8,
        concurrency: 4,
        push_timeout,
        lease: Duration::from_secs(30),
        ..RetryWorkerConfig::default()
    }
}

fn item(payload: &str) -> NewItem {
    NewItem::from_json(payload.as_bytes()).unwrap()
}

/// Runs one batch of `good` innocent items and one poison item through a
/// worker; checks the guarantees and returns the poison's `last_error`.
async fn one_poison(poison: &str, good: &[&str]) -> (String, Arc<ProcessPusher>) {
    one_poison_within(poison, good, REPLAY_ROOM).await
}

/// [`one_poison`] with pushes bounded by `push_timeout`.
async fn one_poison_within(
    poison: &str,
    good: &[&str],
    push_timeout: Duration,
) -> (String, Arc<ProcessPusher>) {
    let dir = tempfile::tempdir().unwrap();
    let queue = open_queue(dir.path());
    let pusher = start(options());
    let worker =
        RetryWorker::new(worker_config(push_timeout), queue.clone(), pusher.clone()).unwrap();
    let mut goods = Vec::new();
    for (n, g) in good.iter().enumerate() {
        goods.push(
            queue
                .enqueue(item(&format!("{{\"n\":{n},\"w\":\"{g}\"}}")))
                .unwrap(),
        );
    }
    let bad = queue
        .enqueue(item(&format!("{{\"w\":\"{poison}\"}}")))
        .unwrap();
    let results = worker.process_now().await.unwrap();
    for id in &goods {
        let r: Vec<_> = results.iter().filter(|r| &r.item_id == id).collect();
        assert_eq!(r.len(), 1, "{poison}: {results:#?}");
        assert_eq!(
            (r[0].kind, r[0].attempts),
            (EventKind::Delivered, 1),
            "{poison}: an innocent item was charged: {r:?}"
        );
        assert!(
            queue.get(id).is_err(),
            "{poison}: delivered item still queued"
        );
    }
    let poisoned = queue.get(&bad).unwrap();
    assert_eq!(poisoned.attempts, 1, "{poison}: {poisoned:?}");
    assert_eq!(poisoned.status(), retryq::ItemStatus::Pending);
    // The host is alive and the transport serves again (a restarted child).
    let ok = pusher.push(
        &ItemMeta {
            id: "after".into(),
            ..ItemMeta::default()
        },
        b"{}",
        &CallContext::with_timeout(Duration::from_secs(5)),
    );
    assert_eq!(ok, PushOutcome::Delivered, "{poison}: no recovery");
    (poisoned.last_error, pusher)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_that_dies_fails_only_its_item_and_names_the_cause() {
    for (poison, cause) in [
        (
            "segv",
            "plugin hostile: plugin host crashed with SIGSEGV in push",
        ),
        ("abort", "plugin host crashed with SIGABRT in push"),
        ("exit", "plugin host exited with code 3 in push"),
    ] {
        let (error, pusher) = one_poison(poison, &["a", "b", "c", "d", "e"]).await;
        assert!(error.contains(cause), "{poison}: {error}");
        let health = pusher.health();
        // One death, or two when innocent calls were in flight with it (the
        // poison then dies again when replayed alone).
        assert!((1..=2).contains(&health.deaths), "{poison}: {health:?}");
        assert!(health.starts >= 2 && health.running, "{health:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hang_is_killed_at_the_deadline_and_unbounded_allocation_dies_alone() {
    let (error, pusher) = one_poison_within("loop", &["a", "b", "c"], Duration::from_secs(3)).await;
    assert!(
        error.contains("hung in push past its deadline (3s)"),
        "{error}"
    );
    assert!((1..=2).contains(&pusher.health().deaths));
    let (error, pusher) = one_poison("alloc", &["a", "b", "c"]).await;
    // Past the address-space cap malloc fails and the unchecked write faults.
    assert!(
        error.contains("plugin host crashed with") || error.contains("killed"),
        "{error}"
    );
    assert!((1..=2).contains(&pusher.health().deaths));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_answers_are_contained_in_the_child_without_a_death() {
    let (error, pusher) = one_poison("status", &["a", "b"]).await;
    assert!(error.contains("unknown status 77"), "{error}");
    let (error, _) = one_poison("utf8", &["a", "b"]).await;
    assert!(error.contains("bad \u{fffd}\u{fffd} bytes"), "{error}");
    let (error, _) = one_poison("nullbuf", &["a", "b"]).await;
    assert!(error.contains("NULL message buffer of length 5"), "{error}");
    assert_eq!(pusher.health().deaths, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn innocent_calls_in_flight_when_it_dies_are_replayed_alone() {
    // Four calls in flight; the poison segfaults after 300 ms with the three
    // innocent ones (500 ms each) still inside the child.
    let (error, pusher) = one_poison("slow segv", &["linger", "linger", "linger"]).await;
    assert!(error.contains("crashed with SIGSEGV in push"), "{error}");
    // The first death (four in flight) and the poison's replay alone.
    assert_eq!(pusher.health().deaths, 2, "{:?}", pusher.health());
}

#[test]
fn refused_create_is_a_start_error_naming_the_plugin() {
    let err = ProcessPusher::start(target(serde_json::json!({"refuse": true})), options())
        .err()
        .expect("create must be refused");
    match &err {
        PluginError::BadSettings { plugin, message } => {
            assert_eq!(plugin, "hostile");
            assert_eq!(message, "hostile: refusing create");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_crash_loop_holds_restarts_back_and_does_not_spin() {
    let pusher = start(ProcessOptions {
        crash_loop_deaths: 3,
        ..options()
    });
    // Room for a child to start on a loaded machine: each of the first
    // three pushes must reach a child and kill it.
    let ctx = || CallContext::with_timeout(Duration::from_secs(10));
    let mut messages = Vec::new();
    for n in 0..20 {
        let meta = ItemMeta {
            id: format!("i{n}"),
            ..ItemMeta::default()
        };
        match pusher.push(&meta, b"{\"w\":\"segv\"}", &ctx()) {
            PushOutcome::Retryable { message, .. } => messages.push(message),
            other => panic!("{other:?}"),
        }
    }
    let health = pusher.health();
    assert!(health.crash_loop, "{health:?}");
    // Three children died; none was started after that.
    assert_eq!((health.starts, health.deaths), (3, 3), "{health:?}");
    assert!(
        messages[3..].iter().all(|m| m.contains("crash loop")),
        "{messages:#?}"
    );
    // And /metrics says so.
    let text = retryq::metrics::Metrics::new().render(None, chrono::Utc::now());
    assert!(
        text.contains("retryq_plugin_host_crash_loop{plugin=\"hostile\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("retryq_plugin_host_deaths{plugin=\"hostile\"}"),
        "{text}"
    );
}

/// Captures what the global subscriber formats.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn plugin_logs_reach_the_host_tagged_with_name_and_level() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .init();
    let pusher = start(options());
    let meta = ItemMeta {
        id: "logged".into(),
        ..ItemMeta::default()
    };
    let outcome = pusher.push(
        &meta,
        b"{}",
        &CallContext::with_timeout(Duration::from_secs(5)),
    );
    assert_eq!(outcome, PushOutcome::Delivered);
    // The log frame precedes the answer on the pipe: it is already emitted.
    let text = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains("hostile push"))
        .unwrap_or_else(|| panic!("no plugin line in {text}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("retryq::plugin"), "{line}");
    assert!(line.contains("plugin=\"hostile\""), "{line}");
}

/// Runs the CLI beside a deployment (no daemon: it opens the store itself;
/// a daemon: it goes through its API).
fn cli(dir: &Path, config: &Path, args: &[&str], stdin: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_retryq"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RETRYQ_ADMIN_TOKEN", "test-token-0123456789abcdef")
        .current_dir(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "retryq {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_real_daemon_survives_a_segfaulting_plugin_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("retryq.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[store]
path = "{db}"
[worker]
interval = "1s"
push_timeout = "3s"
lease = "20s"
[pusher]
path = "{lib}"
isolation = "process"
memory_limit = 536870912
[admin]
listen = "127.0.0.1:0"
[log]
level = "info"
"#,
            db = dir.path().join("q.db").display(),
            lib = hostile_lib().display(),
        ),
    )
    .unwrap();
    for payload in [r#"{"n":1}"#, r#"{"w":"segv"}"#, r#"{"n":2}"#, r#"{"n":3}"#] {
        cli(dir.path(), &config, &["enqueue"], payload);
    }
    let log = dir.path().join("daemon.log");
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_retryq"))
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("RETRYQ_ADMIN_TOKEN", "test-token-0123456789abcdef")
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // A bounded wait for the daemon to act, not a timing assertion.
    let mut items: Vec<serde_json::Value> = Vec::new();
    for _ in 0..600 {
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            daemon.try_wait().unwrap().is_none(),
            "the daemon died: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let Ok(list) =
            std::panic::catch_unwind(|| cli(dir.path(), &config, &["--json", "list"], ""))
        else {
            continue;
        };
        items = serde_json::from_str(&list).unwrap();
        if items.len() == 1 && items[0]["attempts"].as_u64() >= Some(1) {
            break;
        }
    }
    assert_eq!(items.len(), 1, "{items:#?}");
    let error = items[0]["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("plugin hostile: plugin host crashed with SIGSEGV in push"),
        "{error}"
    );
    // The operator sees the death in `stats` too, through the daemon.
    let stats: serde_json::Value =
        serde_json::from_str(&cli(dir.path(), &config, &["--json", "stats"], "")).unwrap();
    let hosts = stats["worker"]["plugin_hosts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        hosts.iter().any(|h| h["plugin"] == "hostile"
            && h["deaths"].as_u64() >= Some(1)
            && h["last_death"]
                .as_str()
                .is_some_and(|d| d.contains("SIGSEGV"))),
        "{stats:#}"
    );
    let human = cli(dir.path(), &config, &["stats"], "");
    assert!(
        human.contains("plugin_host:") && human.contains("SIGSEGV"),
        "{human}"
    );
    let ok = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    assert_eq!(daemon.wait().unwrap().code(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("crashed with SIGSEGV") && text.contains("hostile"),
        "{text}"
    );
}

/// Writes a daemon config for the hostile plugin with `isolation`.
fn daemon_config(dir: &Path, isolation: &str) -> PathBuf {
    let config = dir.join(format!("retryq-{isolation}.toml"));
    std::fs::write(
        &config,
        format!(
            r#"
[store]
path = "{db}"
[worker]
interval = "1s"
push_timeout = "3s"
lease = "20s"
[pusher]
path = "{lib}"
isolation = "{isolation}"
[admin]
listen = "127.0.0.1:0"
[log]
level = "info"
"#,
            db = dir.join("q.db").display(),
            lib = hostile_lib().display(),
        ),
    )
    .unwrap();
    config
}

#[test]
fn in_process_a_poison_item_is_dead_lettered_after_two_crashes_and_innocents_are_delivered() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let config = daemon_config(dir.path(), "in_process");
    for payload in [
        r#"{"w":"slow","n":1}"#,
        r#"{"w":"slow segv"}"#,
        r#"{"w":"slow","n":2}"#,
        r#"{"w":"slow","n":3}"#,
    ] {
        cli(dir.path(), &config, &["enqueue"], payload);
    }
    let mut crashes = 0;
    let mut settled = None;
    'rounds: for _ in 0..8 {
        let mut daemon = Command::new(env!("CARGO_BIN_EXE_retryq"))
            .arg("--config")
            .arg(&config)
            .arg("run")
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // A bounded wait for the daemon to act, not a timing assertion.
        for _ in 0..300 {
            std::thread::sleep(Duration::from_millis(50));
            if let Some(status) = daemon.try_wait().unwrap() {
                assert_eq!(status.signal(), Some(11), "{status:?}");
                crashes += 1;
                continue 'rounds;
            }
            let Ok(list) =
                std::panic::catch_unwind(|| cli(dir.path(), &config, &["--json", "list"], ""))
            else {
                continue;
            };
            let items: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
            if items.len() == 1 && items[0]["status"] == "failed" {
                settled = Some((daemon, items));
                break 'rounds;
            }
        }
        panic!("the daemon neither crashed nor settled");
    }
    let (daemon, items) = settled.expect("the poison item was never dead-lettered");
    // The first crash had four items in flight (nobody charged); then the
    // poison, pushed alone, crashed twice.
    assert_eq!(crashes, 3, "{items:#?}");
    let error = items[0]["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("crashed the transport"), "{error}");
    // The crashes themselves charged no attempt: the one attempt is the
    // dead-lettering's. The innocent items were delivered (gone).
    assert_eq!(items[0]["attempts"], 1, "{items:#?}");
    let ok = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let mut daemon = daemon;
    assert_eq!(daemon.wait().unwrap().code(), Some(0));
}

/// `retryq plugins check` on `lib`, pushes bounded by `push_timeout`.
fn plugins_check(lib: &Path, push_timeout: &str) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_retryq"))
        .args(["--json", "plugins", "check"])
        .arg(lib)
        .env("RETRYQ__WORKER__PUSH_TIMEOUT", push_timeout)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn plugins_check_gives_a_crashing_plugin_a_verdict_naming_the_call() {
    let (_dir, lib) = compile_hostile(&["-DALWAYS=\"segv\""]);
    let (code, stdout) = plugins_check(&lib, "5s");
    // The CLI itself came back, with a failed verdict (exit 1).
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("crashed with SIGSEGV"), "{stdout}");
    assert!(
        stdout.contains("plugin host crashed with SIGSEGV in push"),
        "{stdout}"
    );
    let (_dir, lib) = compile_hostile(&["-DALWAYS=\"abort\""]);
    let (code, stdout) = plugins_check(&lib, "5s");
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("crashed with SIGABRT in push"), "{stdout}");
}

#[test]
fn plugins_check_gives_a_hanging_plugin_a_verdict() {
    let (_dir, lib) = compile_hostile(&["-DALWAYS=\"loop\""]);
    // Long enough for the child to start and load the plugin on a loaded
    // machine; the hang outlasts any deadline.
    let (code, stdout) = plugins_check(&lib, "3s");
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("the plugin hangs in push"), "{stdout}");
}

#[test]
fn plugins_check_reports_the_kits_own_findings_from_the_child() {
    // Pushes that return: the kit runs to its end in the child and its
    // findings come back as they are (this plugin accepts any settings).
    let (code, stdout) = plugins_check(&hostile_lib(), "5s");
    assert_eq!(code, Some(1), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["name"], "hostile");
    let findings = v["findings"].as_array().unwrap();
    let passed = |check: &str| {
        findings
            .iter()
            .find(|f| f["check"] == check)
            .map(|f| f["passed"] == true)
    };
    assert_eq!(passed("push returns an outcome"), Some(true), "{stdout}");
    assert_eq!(
        passed("refuses an unknown settings key"),
        Some(false),
        "{stdout}"
    );
}

#[test]
fn in_process_the_survivable_cases_are_contained_too() {
    use retryq::config::PluginSettings;
    let spec = |settings: serde_json::Value| PluginSettings {
        path: Some(hostile_lib()),
        settings: settings.as_object().cloned().unwrap_or_default(),
        ..PluginSettings::default()
    };
    let pusher = retryq::plugin::load_pusher(&spec(serde_json::json!({})), &[]).unwrap();
    let meta = ItemMeta {
        id: "in-process".into(),
        ..ItemMeta::default()
    };
    let push = |payload: &str, timeout: Duration| {
        pusher.push(
            &meta,
            payload.as_bytes(),
            &CallContext::with_timeout(timeout),
        )
    };
    let message = |o: PushOutcome| match o {
        PushOutcome::Retryable { message, .. } => message,
        other => panic!("{other:?}"),
    };
    let long = Duration::from_secs(5);
    assert!(message(push(r#"{"w":"status"}"#, long)).contains("unknown status 77"));
    assert!(message(push(r#"{"w":"utf8"}"#, long)).contains("bad \u{fffd}\u{fffd} bytes"));
    assert!(message(push(r#"{"w":"nullbuf"}"#, long)).contains("NULL message buffer of length 5"));
    // (A hang in process is abandoned at its deadline, its thread leaked:
    // tests/plugin_loader.rs covers it; a spin here would burn a core until
    // this binary exits.)
    assert_eq!(push("{}", long), PushOutcome::Delivered);
    match retryq::plugin::load_pusher(&spec(serde_json::json!({"refuse": true})), &[]) {
        Err(PluginError::BadSettings { message, .. }) => {
            assert_eq!(message, "hostile: refusing create")
        }
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("create must be refused"),
    }
}

#[test]
fn a_fingerprint_checker_answers_from_its_child() {
    use retryq::plugin_process::ProcessChecker;
    use retryq::plugin_sdk::FingerprintChecker;
    let checker = ProcessChecker::start(
        PluginTarget {
            label: "chaos".into(),
            path: support::plugin_lib("retryq_chaos"),
            sha256: None,
            settings: serde_json::json!({"existing": ["fp-a"]}),
        },
        options(),
    )
    .unwrap();
    let answer = checker
        .check(
            &["fp-a".into(), "fp-b".into()],
            &CallContext::with_timeout(Duration::from_secs(5)),
        )
        .unwrap();
    assert_eq!(answer.existing, ["fp-a"]);
    assert_eq!(answer.missing, ["fp-b"]);
    assert_eq!(checker.health().plugin, "chaos");
    // A plugin without a checker is refused at start, as in process.
    let err = ProcessChecker::start(target(serde_json::json!({})), options())
        .err()
        .expect("hostile has no checker");
    assert!(matches!(err, PluginError::MissingKind { .. }), "{err:?}");
}
