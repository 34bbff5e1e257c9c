//! Dynamic plugins end to end: the loader's checks and errors, the chaos
//! plugin's scripted outcomes through the C ABI, panics and hangs contained,
//! a plugin written in C, and a worker delivering through a plugin.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use retryq::config::PluginSettings;
use retryq::plugin::{load_pusher, PluginError};
use retryq::plugin_sdk::testing::{check_plugin_with, CheckOptions, Report};
use retryq::plugin_sdk::{CallContext, ItemMeta, PushOutcome};
use retryq::store::{RetryQueue, SqliteRetryQueue, StoreOptions};
use retryq::worker::{EventKind, RetryWorker, RetryWorkerConfig};
use retryq::NewItem;

fn chaos_lib() -> PathBuf {
    support::plugin_lib("retryq_chaos")
}

/// Compiles tests/c_plugin/echo.c with `defines` into a private folder.
fn c_plugin(dir: &Path, name: &str, defines: &[&str]) -> PathBuf {
    c_plugin_from(dir, "echo.c", name, defines)
}

/// Compiles tests/c_plugin/`source` with `defines` into a private folder.
fn c_plugin_from(dir: &Path, source: &str, name: &str, defines: &[&str]) -> PathBuf {
    let out = dir.join(format!("lib{name}.so"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-shared", "-fPIC", "-o"])
        .arg(&out)
        .arg("-I")
        .arg(root.join("plugins/sdk/include"))
        .args(defines)
        .arg(root.join("tests/c_plugin").join(source))
        .status()
        .unwrap();
    assert!(status.success(), "cc failed");
    out
}

fn spec_path(path: &Path, settings: serde_json::Value) -> PluginSettings {
    PluginSettings {
        path: Some(path.to_path_buf()),
        settings: settings.as_object().cloned().unwrap_or_default(),
        ..PluginSettings::default()
    }
}

fn meta(id: &str) -> ItemMeta {
    ItemMeta {
        id: id.into(),
        item_type: "findings".into(),
        fingerprint: format!("fp-{id}"),
        max_attempts: 10,
        ..ItemMeta::default()
    }
}

fn ctx() -> CallContext {
    CallContext::with_timeout(Duration::from_secs(10))
}

fn load_err(spec: &PluginSettings) -> PluginError {
    match load_pusher(spec, &[]) {
        Err(e) => e,
        Ok(_) => panic!("loading {spec:?} should fail"),
    }
}

#[test]
fn chaos_outcomes_cross_the_c_abi() {
    let lib = chaos_lib();
    let pusher = load_pusher(
        &spec_path(
            &lib,
            serde_json::json!({
                "sequence": ["retryable", "permanent", "unauthorized", "delivered"],
                "retry_after": "2s"
            }),
        ),
        &[],
    )
    .unwrap();
    let outcomes: Vec<PushOutcome> = (0..4)
        .map(|i| pusher.push(&meta(&format!("i{i}")), b"{}", &ctx()))
        .collect();
    assert!(matches!(
        &outcomes[0],
        PushOutcome::Retryable { retry_after: Some(d), .. } if *d == Duration::from_secs(2)
    ));
    assert!(
        matches!(&outcomes[1], PushOutcome::Permanent { message } if message.contains("permanent"))
    );
    assert!(matches!(&outcomes[2], PushOutcome::Unauthorized { .. }));
    assert_eq!(outcomes[3], PushOutcome::Delivered);
}

#[test]
fn a_panicking_plugin_costs_one_attempt_and_is_recreated() {
    let pusher = load_pusher(
        &spec_path(&chaos_lib(), serde_json::json!({"panic_on": 1})),
        &[],
    )
    .unwrap();
    match pusher.push(&meta("a"), b"{}", &ctx()) {
        PushOutcome::Retryable { message, .. } => assert!(message.contains("panic"), "{message}"),
        other => panic!("expected retryable, got {other:?}"),
    }
    // The recreated instance starts counting again, and panic_on 1 is past
    // for the old one only: the next push on the new instance is its first,
    // so chaos panics again — proof the instance was replaced.
    assert!(matches!(
        pusher.push(&meta("b"), b"{}", &ctx()),
        PushOutcome::Retryable { .. }
    ));
}

#[test]
fn a_hanging_plugin_is_abandoned_at_the_deadline_and_the_next_call_is_served() {
    let pusher = load_pusher(
        &spec_path(
            &chaos_lib(),
            serde_json::json!({"hang_on": 1, "hang": "30s"}),
        ),
        &[],
    )
    .unwrap();
    let short = CallContext::with_timeout(Duration::from_millis(200));
    match pusher.push(&meta("slow"), b"{}", &short) {
        PushOutcome::Retryable { message, .. } => {
            assert!(message.contains("timed out"), "{message}")
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(
        pusher.push(&meta("next"), b"{}", &ctx()),
        PushOutcome::Delivered
    );
}

#[test]
fn settings_refused_by_the_plugin_name_the_key() {
    match load_err(&spec_path(
        &chaos_lib(),
        serde_json::json!({"fail_frist": 1}),
    )) {
        PluginError::BadSettings { message, .. } => {
            assert!(message.contains("fail_frist"), "{message}")
        }
        other => panic!("{other}"),
    }
}

#[test]
fn missing_files_and_unknown_names_say_where_they_looked() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_err(&spec_path(
        &dir.path().join("nope.so"),
        serde_json::json!({}),
    ));
    assert!(matches!(e, PluginError::NotFound { .. }), "{e}");
    let spec = PluginSettings {
        name: Some("no-such-plugin".into()),
        ..PluginSettings::default()
    };
    let e = match load_pusher(&spec, &[dir.path().to_path_buf()]) {
        Err(e) => e,
        Ok(_) => panic!("should fail"),
    };
    let text = e.to_string();
    assert!(text.contains("libretryq_no_such_plugin.so"), "{text}");
    assert!(text.contains(&dir.path().display().to_string()), "{text}");
}

#[test]
fn a_plugin_is_found_by_name_on_the_search_path() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(chaos_lib(), dir.path().join("libretryq_chaos.so")).unwrap();
    let spec = PluginSettings {
        name: Some("chaos".into()),
        ..PluginSettings::default()
    };
    let pusher = load_pusher(&spec, &[dir.path().to_path_buf()]).unwrap();
    assert_eq!(
        pusher.push(&meta("x"), b"{}", &ctx()),
        PushOutcome::Delivered
    );
}

#[test]
fn a_file_that_is_not_a_library_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libfake.so");
    std::fs::write(&fake, "not a library").unwrap();
    let e = load_err(&spec_path(&fake, serde_json::json!({})));
    assert!(matches!(e, PluginError::NotALibrary { .. }), "{e}");
}

#[test]
fn broken_c_plugins_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let no_entry = c_plugin(dir.path(), "noentry", &["-DNO_ENTRY"]);
    let e = load_err(&spec_path(&no_entry, serde_json::json!({})));
    assert!(matches!(e, PluginError::MissingSymbol { .. }), "{e}");

    let bad_abi = c_plugin(dir.path(), "badabi", &["-DBAD_ABI"]);
    match load_err(&spec_path(&bad_abi, serde_json::json!({}))) {
        PluginError::AbiMismatch {
            found, expected, ..
        } => {
            assert_eq!((found, expected), (99, 1));
        }
        other => panic!("{other}"),
    }

    let short = c_plugin(dir.path(), "short", &["-DSHORT_TABLE"]);
    let e = load_err(&spec_path(&short, serde_json::json!({})));
    assert!(
        matches!(e, PluginError::TableTooSmall { found: 8, .. }),
        "{e}"
    );
}

#[test]
fn a_plugin_written_in_c_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let echo = c_plugin(dir.path(), "echo", &[]);
    let pusher = load_pusher(&spec_path(&echo, serde_json::json!({})), &[]).unwrap();
    assert_eq!(
        pusher.push(&meta("a"), br#"{"ok":1}"#, &ctx()),
        PushOutcome::Delivered
    );
    assert_eq!(
        pusher.push(&meta("b"), br#"{"fail":1}"#, &ctx()),
        PushOutcome::Retryable {
            message: "echo: fail".into(),
            retry_after: Some(Duration::from_millis(1500))
        }
    );
    assert_eq!(
        pusher.push(&meta("c"), br#"{"reject":1}"#, &ctx()),
        PushOutcome::permanent("echo: rejected")
    );
    match load_err(&spec_path(&echo, serde_json::json!({"refuse": true}))) {
        PluginError::BadSettings { message, .. } => assert_eq!(message, "echo: refused as asked"),
        other => panic!("{other}"),
    }
}

#[cfg(unix)]
#[test]
fn writable_by_others_and_wrong_hash_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("libretryq_chaos.so");
    std::fs::copy(chaos_lib(), &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o666)).unwrap();
    let e = load_err(&spec_path(&copy, serde_json::json!({})));
    assert!(matches!(e, PluginError::InsecurePermissions { .. }), "{e}");

    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut spec = spec_path(&copy, serde_json::json!({}));
    spec.sha256 = Some("00".repeat(32));
    let e = load_err(&spec);
    assert!(matches!(e, PluginError::HashMismatch { .. }), "{e}");

    spec.sha256 = Some(retryq::plugin::file_sha256(&copy).unwrap());
    assert!(load_pusher(&spec, &[]).is_ok(), "the right hash loads");
}

#[test]
fn the_conformance_kit_passes_for_the_bundled_chaos_plugin() {
    let report = retryq::plugin_sdk::testing::check_plugin(&chaos_lib(), &serde_json::json!({}));
    assert!(report.passed(), "{report:#?}");
    assert_eq!(report.name, "chaos");
    assert!(report.pusher && report.checker);
}

#[tokio::test]
async fn a_worker_delivers_retries_and_dead_letters_through_the_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("delivered");
    let clock = retryq::clock::ManualClock::new(chrono::Utc::now());
    let queue: Arc<dyn RetryQueue> = Arc::new(
        SqliteRetryQueue::open(
            dir.path().join("q.db"),
            StoreOptions {
                clock: Arc::new(clock.clone()),
                ..StoreOptions::default()
            },
        )
        .unwrap(),
    );
    let pusher = load_pusher(
        &spec_path(
            &chaos_lib(),
            serde_json::json!({"sequence": ["permanent"], "fail_first": 2, "record_dir": record}),
        ),
        &[],
    )
    .unwrap();
    let config = RetryWorkerConfig {
        batch_size: 1,
        clock: Arc::new(clock.clone()),
        ..RetryWorkerConfig::default()
    };
    let worker = RetryWorker::new(config, queue.clone(), pusher).unwrap();
    let dead = queue
        .enqueue(NewItem::from_json(b"{\"n\":1}").unwrap())
        .unwrap();
    let r = worker.process_now().await.unwrap();
    assert_eq!(r[0].kind, EventKind::DeadLettered);
    assert_eq!(
        queue.get(&dead).unwrap().status(),
        retryq::ItemStatus::Failed
    );

    let id = queue
        .enqueue(NewItem::from_json(b"{\"n\":2}").unwrap())
        .unwrap();
    let mut kinds = Vec::new();
    for _ in 0..3 {
        kinds.extend(
            worker
                .process_now()
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.kind),
        );
        clock.advance(Duration::from_secs(48 * 3600));
    }
    assert_eq!(
        kinds,
        [EventKind::Retried, EventKind::Retried, EventKind::Delivered]
    );
    assert!(matches!(
        queue.get(&id),
        Err(retryq::QueueError::ItemNotFound { .. })
    ));
    let recorded: Vec<_> = std::fs::read_dir(&record)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(recorded, [format!("{id}__0.json")]);
}

#[test]
fn the_bundled_http_plugin_loads_and_maps_a_refused_connection_to_retryable() {
    let http = chaos_lib().with_file_name(format!(
        "{}retryq_http{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    // Port 9 (discard) on loopback: nothing listens there.
    let pusher = load_pusher(
        &spec_path(
            &http,
            serde_json::json!({"base_url": "http://127.0.0.1:9", "timeout": "2s"}),
        ),
        &[],
    )
    .unwrap();
    assert!(matches!(
        pusher.push(&meta("h"), b"{}", &ctx()),
        PushOutcome::Retryable { .. }
    ));
    match load_err(&spec_path(&http, serde_json::json!({"token": "secret"}))) {
        PluginError::BadSettings { message, .. } => {
            assert!(message.contains("token"), "{message}");
            assert!(
                !message.contains("secret"),
                "the refused value is not echoed"
            );
        }
        other => panic!("{other}"),
    }
}

/// A loopback upstream answering the scripted statuses in order (then 200),
/// recording each request's Idempotency-Key.
fn scripted_upstream(statuses: Vec<u16>) -> (u16, Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let keys = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = keys.clone();
    std::thread::spawn(move || {
        let mut script = statuses.into_iter();
        for stream in listener.incoming().take(32) {
            let Ok(stream) = stream else { return };
            let mut reader = BufReader::new(stream);
            let mut length = 0usize;
            let mut key = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                if lower.starts_with("idempotency-key:") {
                    key = line["idempotency-key:".len()..].trim().to_owned();
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            seen.lock().unwrap().push(key);
            let status = script.next().unwrap_or(200);
            let reply = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nRetry-After: 7\r\nConnection: close\r\n\r\n"
            );
            let _ = reader.get_mut().write_all(reply.as_bytes());
        }
    });
    (port, keys)
}

#[tokio::test]
async fn a_worker_delivers_through_the_http_plugin_honouring_retry_after() {
    let http = chaos_lib().with_file_name(format!(
        "{}retryq_http{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    let (port, keys) = scripted_upstream(vec![503, 422]);
    let dir = tempfile::tempdir().unwrap();
    let clock = retryq::clock::ManualClock::new(chrono::Utc::now());
    let queue: Arc<dyn RetryQueue> = Arc::new(
        SqliteRetryQueue::open(
            dir.path().join("q.db"),
            StoreOptions {
                clock: Arc::new(clock.clone()),
                ..StoreOptions::default()
            },
        )
        .unwrap(),
    );
    let pusher = load_pusher(
        &spec_path(
            &http,
            serde_json::json!({"base_url": format!("http://127.0.0.1:{port}"), "timeout": "5s"}),
        ),
        &[],
    )
    .unwrap();
    let config = RetryWorkerConfig {
        batch_size: 1,
        clock: Arc::new(clock.clone()),
        ..RetryWorkerConfig::default()
    };
    let worker = RetryWorker::new(config, queue.clone(), pusher).unwrap();
    let good = queue
        .enqueue(NewItem::from_json(b"{\"n\":1}").unwrap())
        .unwrap();
    let t0 = clock_now(&clock);
    // 503 with Retry-After: 7 -> retried; the backoff (5 min) is later, so it wins.
    let r = worker.process_now().await.unwrap();
    assert_eq!(r[0].kind, EventKind::Retried);
    assert!(queue.get(&good).unwrap().next_retry >= t0 + chrono::Duration::seconds(7));
    let bad = queue
        .enqueue(NewItem::from_json(b"{\"n\":2}").unwrap())
        .unwrap();
    // 422 -> dead letter at once.
    let r = worker.process_now().await.unwrap();
    assert_eq!(
        (r[0].item_id.as_str(), r[0].kind),
        (bad.as_str(), EventKind::DeadLettered)
    );
    clock.advance(Duration::from_secs(3600));
    let r = worker.process_now().await.unwrap();
    assert_eq!(
        (r[0].item_id.as_str(), r[0].kind),
        (good.as_str(), EventKind::Delivered)
    );
    assert_eq!(*keys.lock().unwrap(), vec![good.clone(), bad, good]);
}

fn clock_now(clock: &retryq::clock::ManualClock) -> chrono::DateTime<chrono::Utc> {
    use retryq::clock::Clock;
    clock.now()
}

#[tokio::test]
async fn a_push_that_hangs_is_reported_with_the_deadline_it_was_given() {
    let dir = tempfile::tempdir().unwrap();
    let queue: Arc<dyn RetryQueue> =
        Arc::new(SqliteRetryQueue::open(dir.path().join("q.db"), StoreOptions::default()).unwrap());
    let pusher = load_pusher(
        &spec_path(
            &chaos_lib(),
            serde_json::json!({"hang_on": 1, "hang": "30s"}),
        ),
        &[],
    )
    .unwrap();
    let config = RetryWorkerConfig {
        batch_size: 1,
        push_timeout: Duration::from_millis(300),
        ..RetryWorkerConfig::default()
    };
    let worker = RetryWorker::new(config, queue.clone(), pusher).unwrap();
    let id = queue
        .enqueue(NewItem::from_json(b"{\"n\":1}").unwrap())
        .unwrap();
    let r = worker.process_now().await.unwrap();
    assert_eq!(r[0].kind, EventKind::Retried);
    let stored = queue.get(&id).unwrap();
    let last_error = stored.last_error;
    // What was left of the deadline (zero) used to be printed instead.
    assert!(
        last_error.contains("timed out (deadline 300ms)"),
        "{last_error}"
    );
}

#[test]
fn create_that_returns_no_instance_says_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let silent = c_plugin_from(dir.path(), "stuck.c", "nullinst", &["-DNULL_INSTANCE"]);
    match load_err(&spec_path(&silent, serde_json::json!({}))) {
        PluginError::CreateFailed { message, .. } => assert!(
            message.contains("create reported success (status 0) but returned no instance"),
            "{message}"
        ),
        other => panic!("{other}"),
    }
    let told = c_plugin_from(dir.path(), "stuck.c", "nullmsg", &["-DNULL_INSTANCE_MSG"]);
    let e = load_err(&spec_path(&told, serde_json::json!({})));
    let text = e.to_string();
    assert!(matches!(e, PluginError::CreateFailed { .. }), "{text}");
    assert!(text.contains("stuck: out of instances"), "{text}");
    assert!(!text.contains("settings"), "not a settings refusal: {text}");
}

/// Every call of the kit gets this long: a hang never returns, so a short
/// deadline proves as much as a long one, but `load` (a `dlopen` of a file
/// just written) on a loaded machine must fit in it.
const HANG_DEADLINE: Duration = Duration::from_secs(2);

fn quick_check(lib: &Path, settings: serde_json::Value) -> Report {
    check_plugin_with(
        lib,
        &settings,
        &CheckOptions {
            call_deadline: HANG_DEADLINE,
        },
    )
}

fn last_finding(report: &Report) -> (String, bool, String) {
    let f = report.findings.last().expect("at least one finding");
    (f.check.clone(), f.passed, f.detail.clone())
}

#[test]
fn the_conformance_kit_ends_with_a_verdict_naming_the_call_that_hung() {
    let dir = tempfile::tempdir().unwrap();
    let good = c_plugin_from(dir.path(), "stuck.c", "stuckgood", &[]);
    let report = check_plugin_with(&good, &serde_json::json!({}), &CheckOptions::default());
    assert!(
        report.passed(),
        "the well-behaved variant passes: {report:#?}"
    );

    for (define, call) in [
        ("-DHANG_CREATE", "create"),
        ("-DHANG_PUSH", "push"),
        ("-DHANG_CHECK", "check"),
        ("-DHANG_DESTROY", "destroy"),
    ] {
        let name = format!("stuck{}", call);
        let lib = c_plugin_from(dir.path(), "stuck.c", &name, &[define]);
        let report = quick_check(&lib, serde_json::json!({}));
        assert!(!report.passed(), "{define}: {report:#?}");
        let (check, passed, detail) = last_finding(&report);
        assert_eq!(
            check,
            format!("{call} returns before the deadline"),
            "{define}"
        );
        assert!(!passed);
        assert!(detail.contains("2s"), "{detail}");
    }

    // The chaos plugin told to hang: its first push with the given settings.
    let report = quick_check(
        &chaos_lib(),
        serde_json::json!({"hang_on": 1, "hang": "30s"}),
    );
    assert_eq!(last_finding(&report).0, "push returns before the deadline");
}

#[test]
fn plugins_check_on_a_hanging_plugin_returns_with_a_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let lib = c_plugin_from(dir.path(), "stuck.c", "stuckcli", &["-DHANG_PUSH"]);
    let out = Command::new(env!("CARGO_BIN_EXE_retryq"))
        .args(["--json", "plugins", "check"])
        .arg(&lib)
        .env("RETRYQ__WORKER__PUSH_TIMEOUT", "3s")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let last = report["findings"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(
        last["check"], "push returns before the deadline",
        "{report}"
    );
    assert_eq!(last["passed"], false);
}
