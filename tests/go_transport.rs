//! The Go transport (examples/go-transport): built with cgo
//! `-buildmode=c-shared` against the C header when a Go toolchain is
//! present, loaded under process isolation, delivering to a local HTTP
//! upstream, through the worker too. Without `go` the test says so and
//! passes, unless `RETRYQ_REQUIRE_SERVICES=1` (CI, which installs it).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use retryq::plugin_process::{PluginTarget, ProcessOptions, ProcessPusher};
use retryq::plugin_sdk::testing::sample_item;
use retryq::plugin_sdk::{CallContext, PushOutcome, Pusher};
use retryq::store::{RetryQueue, SqliteRetryQueue, StoreOptions};
use retryq::worker::{EventKind, RetryWorker, RetryWorkerConfig};
use retryq::NewItem;

/// Builds the plugin into `dir`, or `None` (with the reason printed) when
/// there is no Go toolchain and it is not required.
fn build(dir: &Path) -> Option<PathBuf> {
    if Command::new("go").arg("version").output().is_err() {
        assert!(
            std::env::var("RETRYQ_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "RETRYQ_REQUIRE_SERVICES=1 but `go` is not installed (apt-get install golang-go)"
        );
        eprintln!("skipping: no Go toolchain (`go` not found); install golang-go to run this test");
        return None;
    }
    let out = dir.join("libgo_transport.so");
    let status = Command::new("go")
        .args(["build", "-buildmode=c-shared", "-o"])
        .arg(&out)
        .arg(".")
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/go-transport"))
        .env("CGO_ENABLED", "1")
        .status()
        .unwrap();
    assert!(status.success(), "go build failed");
    Some(out)
}

/// A request as the upstream saw it.
#[derive(Debug, Clone)]
struct Seen {
    idempotency_key: String,
    body: Vec<u8>,
}

/// An HTTP upstream answering `statuses` in turn (then 200), recording
/// every request.
fn upstream(statuses: Vec<u16>) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1/reports", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        let mut statuses = statuses.into_iter();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let (mut len, mut key) = (0usize, String::new());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if lower.starts_with("idempotency-key:") {
                    key = line["idempotency-key:".len()..].trim().to_owned();
                }
            }
            let mut body = vec![0; len];
            let _ = reader.read_exact(&mut body);
            record.lock().unwrap().push(Seen {
                idempotency_key: key,
                body,
            });
            let status = statuses.next().unwrap_or(200);
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nRetry-After: 7\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    (url, seen)
}

fn start(lib: PathBuf, url: &str) -> Arc<ProcessPusher> {
    Arc::new(
        ProcessPusher::start(
            PluginTarget {
                label: "go-transport".into(),
                path: lib,
                sha256: None,
                settings: serde_json::json!({"url": url, "headers": {"X-Test": "1"}}),
            },
            ProcessOptions::new(PathBuf::from(env!("CARGO_BIN_EXE_retryq"))),
        )
        .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_go_transport_delivers_under_process_isolation() {
    let dir = tempfile::tempdir().unwrap();
    let Some(lib) = build(dir.path()) else { return };

    // Direct pushes: the status mapping, Retry-After, the raw payload.
    let (url, seen) = upstream(vec![503, 422]);
    let pusher = start(lib.clone(), &url);
    assert_eq!(pusher.health().plugin, "go-transport");
    let ctx = || CallContext::with_timeout(Duration::from_secs(10));
    let payload = br#"{"finding":"x","n":1}"#;
    assert_eq!(
        pusher.push(&sample_item("a"), payload, &ctx()),
        PushOutcome::Retryable {
            message: "upstream answered 503".into(),
            retry_after: Some(Duration::from_secs(7)),
        }
    );
    assert!(matches!(
        pusher.push(&sample_item("a"), payload, &ctx()),
        PushOutcome::Permanent { .. }
    ));
    assert_eq!(
        pusher.push(&sample_item("a"), payload, &ctx()),
        PushOutcome::Delivered
    );
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[2].body, payload);
        assert_eq!(seen[2].idempotency_key, "a");
    }

    // Settings it does not know are refused at start, by name.
    let refused = ProcessPusher::start(
        PluginTarget {
            label: "go-transport".into(),
            path: lib.clone(),
            sha256: None,
            settings: serde_json::json!({"url": url, "nope": 1}),
        },
        ProcessOptions::new(PathBuf::from(env!("CARGO_BIN_EXE_retryq"))),
    );
    assert!(
        refused
            .err()
            .is_some_and(|e| e.to_string().contains("nope")),
        "unknown key accepted"
    );

    // Through the worker: an enqueued item is delivered and deleted.
    let (url, seen) = upstream(Vec::new());
    let pusher = start(lib, &url);
    let queue: Arc<dyn RetryQueue> =
        Arc::new(SqliteRetryQueue::open(dir.path().join("q.db"), StoreOptions::default()).unwrap());
    let worker = RetryWorker::new(RetryWorkerConfig::default(), queue.clone(), pusher).unwrap();
    let id = queue
        .enqueue(NewItem::from_json(br#"{"report":42}"#).unwrap())
        .unwrap();
    let results = worker.process_now().await.unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].kind, EventKind::Delivered, "{results:?}");
    assert!(queue.get(&id).is_err());
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].idempotency_key, id);
    assert_eq!(seen[0].body, br#"{"report":42}"#);
}
