//! The admin API over the real `RetryWorker` and `SqliteRetryQueue`:
//! `RetryWorkerControl` and `record_worker_metrics` as the daemon wires them.

use retryq::item::ItemId;

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{test, App};
use retryq::admin::{self, record_worker_metrics, AdminConfig, AdminState, RetryWorkerControl};
use retryq::metrics::Metrics;
use retryq::plugin_sdk::{CallContext, ItemMeta, PushOutcome, Pusher};
use retryq::store::{RetryQueue, SqliteRetryQueue, StoreOptions};
use retryq::worker::{EventKind, RetryWorker, RetryWorkerConfig};
use serde_json::Value;

/// Delivers everything except payloads containing "refuse", which the
/// upstream refuses for good.
struct Upstream;

impl Pusher for Upstream {
    fn push(&self, _item: &ItemMeta, payload: &[u8], _ctx: &CallContext) -> PushOutcome {
        if String::from_utf8_lossy(payload).contains("refuse") {
            PushOutcome::Permanent {
                message: "422 from upstream".into(),
            }
        } else {
            PushOutcome::Delivered
        }
    }
}

/// A worker (not started) with default settings on a new SQLite queue in
/// `dir`.
fn sqlite_worker(
    dir: &std::path::Path,
    pusher: Arc<dyn Pusher>,
) -> (Arc<dyn RetryQueue>, Arc<RetryWorker>) {
    let queue: Arc<dyn RetryQueue> =
        Arc::new(SqliteRetryQueue::open(dir.join("q.db"), StoreOptions::default()).unwrap());
    let worker =
        Arc::new(RetryWorker::new(RetryWorkerConfig::default(), queue.clone(), pusher).unwrap());
    (queue, worker)
}

/// The API's state over `worker`, wired as the daemon wires it, and a
/// config for it.
fn api_over(
    queue: &Arc<dyn RetryQueue>,
    worker: &Arc<RetryWorker>,
    metrics: Arc<Metrics>,
) -> (AdminState, AdminConfig) {
    let control = Arc::new(RetryWorkerControl::new(worker.clone()));
    let state = AdminState::new(queue.clone(), control, metrics);
    let config = AdminConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..AdminConfig::default()
    };
    (state, config)
}

#[actix_web::test]
async fn api_drives_the_real_worker_and_metrics_follow_its_outcomes() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, worker) = sqlite_worker(dir.path(), Arc::new(Upstream));
    let metrics = Arc::new(Metrics::new());
    record_worker_metrics(&worker, metrics.clone());
    let mut events = worker.subscribe();
    worker.start().await.unwrap();

    let (state, config) = api_over(&queue, &worker, metrics.clone());
    let svc = test::init_service(App::new().configure(admin::routes(&config, &state))).await;

    let resp = test::call_service(&svc, test::TestRequest::get().uri("/readyz").to_request()).await;
    assert_eq!(resp.status(), StatusCode::OK);

    // One item the upstream takes, one it refuses.
    let mut ids = Vec::new();
    for body in ["{\"ok\":1}", "{\"refuse\":1}"] {
        let req = test::TestRequest::post()
            .uri("/v1/items")
            .set_payload(body)
            .to_request();
        let resp = test::call_service(&svc, req).await;
        assert_eq!(resp.status(), StatusCode::CREATED);
        let body: Value = test::read_body_json(resp).await;
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    let req = test::TestRequest::post()
        .uri("/v1/process-now")
        .to_request();
    let resp = test::call_service(&svc, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let summary: Value = test::read_body_json(resp).await;
    assert!(summary["processed"].is_u64(), "{summary}");

    // Whether process-now or the woken scheduler got there first, both
    // outcomes arrive on the event stream.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let event = tokio::time::timeout(Duration::from_secs(30), events.recv())
            .await
            .expect("the worker reports both outcomes")
            .unwrap();
        seen.push((event.item_id, event.kind));
    }
    assert!(
        seen.contains(&(ids[0].clone(), EventKind::Delivered)),
        "{seen:?}"
    );
    assert!(
        seen.contains(&(ids[1].clone(), EventKind::DeadLettered)),
        "{seen:?}"
    );

    // The dead letter is listed as failed and can be revived.
    let req = test::TestRequest::get()
        .uri("/v1/items?status=failed")
        .to_request();
    let list: Value = test::read_body_json(test::call_service(&svc, req).await).await;
    assert_eq!(list["items"][0]["id"], ids[1].as_str());
    assert_eq!(list["items"][0]["last_error"], "422 from upstream");

    let req = test::TestRequest::get().uri("/metrics").to_request();
    let text = String::from_utf8(
        test::read_body(test::call_service(&svc, req).await)
            .await
            .to_vec(),
    )
    .unwrap();
    assert!(text.contains("\nretryq_enqueued_total 2\n"), "{text}");
    assert!(text.contains("\nretryq_delivered_total 1\n"), "{text}");
    assert!(text.contains("\nretryq_dead_lettered_total 1\n"), "{text}");
    assert!(text.contains("\nretryq_circuit_state 0\n"), "{text}");
    assert!(
        text.contains("\nretryq_items{status=\"failed\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("\nretryq_push_latency_seconds_count 2\n"),
        "{text}"
    );

    let req = test::TestRequest::get().uri("/v1/stats").to_request();
    let stats: Value = test::read_body_json(test::call_service(&svc, req).await).await;
    assert_eq!(stats["failed_items"], 1);
    assert_eq!(stats["worker"]["is_running"], true);
    assert_eq!(stats["worker"]["total_succeeded"], 1);

    // A cleanup with a TTL removes the (old enough) dead letter and counts it.
    let req = test::TestRequest::post()
        .uri("/v1/cleanup?ttl=1ns")
        .to_request();
    let resp = test::call_service(&svc, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let report: Value = test::read_body_json(resp).await;
    assert_eq!(report["removed"], 1, "{report}");
    let req = test::TestRequest::get().uri("/metrics").to_request();
    let text = String::from_utf8(
        test::read_body(test::call_service(&svc, req).await)
            .await
            .to_vec(),
    )
    .unwrap();
    assert!(text.contains("\nretryq_expired_total 1\n"), "{text}");

    worker.stop(Duration::from_secs(5)).await.unwrap();
    let resp = test::call_service(&svc, test::TestRequest::get().uri("/readyz").to_request()).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let resp = test::call_service(
        &svc,
        test::TestRequest::post()
            .uri("/v1/process-now")
            .to_request(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
}

/// Answers only once let go (or after 30 s, so a failed test cannot hang
/// on it), so a test can look at an item mid-push without racing a timer.
#[derive(Default)]
struct HeldUpstream {
    let_go: Mutex<bool>,
    changed: Condvar,
}

impl HeldUpstream {
    fn let_go(&self) {
        *self.let_go.lock().unwrap() = true;
        self.changed.notify_all();
    }
}

impl Pusher for HeldUpstream {
    fn push(&self, _item: &ItemMeta, _payload: &[u8], _ctx: &CallContext) -> PushOutcome {
        let held = self.let_go.lock().unwrap();
        let _ = self
            .changed
            .wait_timeout_while(held, Duration::from_secs(30), |let_go| !*let_go)
            .unwrap();
        PushOutcome::Delivered
    }
}

/// `POST /v1/items` goes through the worker: while it runs, the item is
/// stored already claimed in the enqueue's own commit (the outbox path;
/// storing it in the queue directly would leave it pending for a claim),
/// refusals keep their statuses, and a stopped worker still stores items.
#[actix_web::test]
async fn api_ingest_goes_through_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Arc::new(HeldUpstream::default());
    let (queue, worker) = sqlite_worker(dir.path(), upstream.clone());
    worker.start().await.unwrap();
    let (state, config) = api_over(&queue, &worker, Arc::new(Metrics::new()));
    let svc = test::init_service(App::new().configure(admin::routes(&config, &state))).await;
    let ingest = |body: &str| {
        test::TestRequest::post()
            .uri("/v1/items?fingerprint=fp-1")
            .set_payload(body.to_owned())
            .to_request()
    };

    let resp = test::call_service(&svc, ingest("{\"n\":1}")).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let created: Value = test::read_body_json(resp).await;
    let id = created["id"].as_str().unwrap().to_owned();
    let stored = queue.get(&ItemId::parse(&id).unwrap()).unwrap();
    assert_eq!(stored.status(), retryq::ItemStatus::Processing);
    assert_eq!(stored.updated_at, stored.created_at, "stored claimed");

    // The same fingerprint while the first is live: a 409 naming it.
    let resp = test::call_service(&svc, ingest("{\"n\":2}")).await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    let refused: Value = test::read_body_json(resp).await;
    assert_eq!(refused["existing_id"], id.as_str(), "{refused}");
    // An item only the store refuses (a fingerprint over 256 characters;
    // the API's own checks pass it): a 400 naming what is wrong, and
    // nothing stored.
    let size_before = queue.size().unwrap();
    let req = test::TestRequest::post()
        .uri(&format!("/v1/items?fingerprint={}", "f".repeat(300)))
        .set_payload("{\"n\":4}")
        .to_request();
    let resp = test::call_service(&svc, req).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let refused: Value = test::read_body_json(resp).await;
    assert!(
        refused["message"].as_str().unwrap().contains("fingerprint"),
        "{refused}"
    );
    assert_eq!(queue.size().unwrap(), size_before);

    upstream.let_go();
    for _ in 0..3000 {
        if queue.size().unwrap() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(queue.size().unwrap(), 0, "delivered and acknowledged");

    // Stopped: still stored (pending), for the next start to deliver.
    worker.stop(Duration::from_secs(5)).await.unwrap();
    let resp = test::call_service(&svc, ingest("{\"n\":3}")).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let created: Value = test::read_body_json(resp).await;
    let later = queue
        .get(&ItemId::parse(created["id"].as_str().unwrap()).unwrap())
        .unwrap();
    assert_eq!(later.status(), retryq::ItemStatus::Pending);
}

#[actix_web::test]
async fn pause_through_the_api_stops_delivery_and_stats_show_why_until_resume() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, worker) = sqlite_worker(dir.path(), Arc::new(Upstream));
    worker.start().await.unwrap();
    let (state, config) = api_over(&queue, &worker, Arc::new(Metrics::new()));
    let svc = test::init_service(App::new().configure(admin::routes(&config, &state))).await;
    let post = |uri: &str, body: &str| {
        test::TestRequest::post()
            .uri(uri)
            .set_payload(body.to_owned())
            .to_request()
    };

    let resp = test::call_service(&svc, post("/v1/pause", r#"{"reason":"maintenance"}"#)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp =
        test::call_service(&svc, test::TestRequest::get().uri("/v1/stats").to_request()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = test::read_body_json(resp).await;
    assert_eq!(body["worker"]["paused"], true, "{body}");
    assert_eq!(body["worker"]["pause_reason"], "maintenance", "{body}");
    assert!(body["worker"]["paused_since"].is_string(), "{body}");

    // Paused: an item enqueued now stays queued.
    let resp = test::call_service(&svc, post("/v1/items", "{\"ok\":2}")).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(queue.size().unwrap(), 1, "nothing delivered while paused");

    let resp = test::call_service(&svc, post("/v1/resume", "")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp =
        test::call_service(&svc, test::TestRequest::get().uri("/v1/stats").to_request()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = test::read_body_json(resp).await;
    assert_eq!(body["worker"]["paused"], false, "{body}");
    assert_eq!(body["worker"]["pause_reason"], Value::Null, "{body}");
    // Resumed: it is delivered (a bounded wait, not a timing assertion).
    for _ in 0..200 {
        if queue.size().unwrap() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(queue.size().unwrap(), 0, "delivered after resume");
    worker.stop(Duration::from_secs(5)).await.unwrap();
}
