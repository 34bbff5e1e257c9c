//! Every admin API endpoint and error status, in-process through actix-web's
//! test service, over an in-memory store and a fake worker.

mod api_support;

use retryq::item::ItemId;

use std::sync::atomic::Ordering;
use std::time::Duration;

use actix_web::dev::{Service, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::{test, App};
use api_support::{bearer, config_with_token, parse_openmetrics, Fixture, TOKEN};
use retryq::admin::{self, AdminConfig, WorkerControl};
use retryq::item::ItemStatus;
use retryq::store::RetryQueue;
use retryq::{NewItem, Payload};
use serde_json::Value;

async fn service(
    fixture: &Fixture,
    config: &AdminConfig,
) -> impl Service<actix_http::Request, Response = ServiceResponse, Error = actix_web::Error> {
    test::init_service(App::new().configure(admin::routes(config, &fixture.state))).await
}

/// The same scenario over the in-memory test store and the SQLite store
/// (the directory guard keeps the database alive for the iteration).
fn fixtures(max_items: usize, max_bytes: u64) -> Vec<(Fixture, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Fixture::sqlite(dir.path(), max_items, max_bytes);
    vec![
        (Fixture::new(max_items, max_bytes), None),
        (sqlite, Some(dir)),
    ]
}

async fn json_of(resp: ServiceResponse) -> Value {
    let body = test::read_body(resp).await;
    serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body)))
}

/// Sends `req` and returns the status and the JSON body (Null when empty).
async fn call<S>(svc: &S, req: test::TestRequest) -> (StatusCode, Value)
where
    S: Service<actix_http::Request, Response = ServiceResponse, Error = actix_web::Error>,
{
    let resp = test::call_service(svc, req.to_request()).await;
    let status = resp.status();
    let body = test::read_body(resp).await;
    let value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body)))
    };
    (status, value)
}

fn authed(req: test::TestRequest) -> test::TestRequest {
    req.insert_header(bearer())
}

fn post_item(query: &str, body: &str) -> test::TestRequest {
    authed(test::TestRequest::post().uri(&format!("/v1/items{query}"))).set_payload(body.to_owned())
}

fn assert_error(status: StatusCode, body: &Value, want: StatusCode, kind: &str) {
    assert_eq!(status, want, "{body}");
    assert_eq!(body["error"], kind, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

#[actix_web::test]
async fn health_needs_no_token_and_readiness_follows_store_and_worker() {
    for (fx, _dir) in fixtures(100, 1024 * 1024) {
        let svc = service(&fx, &config_with_token()).await;
        let (status, body) = call(&svc, test::TestRequest::get().uri("/healthz")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["status"], "ok");

        let (status, body) = call(&svc, test::TestRequest::get().uri("/readyz")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "ready");

        fx.worker.running.store(false, Ordering::SeqCst);
        let (status, body) = call(&svc, test::TestRequest::get().uri("/readyz")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["worker_running"], false);
        assert_eq!(body["store_open"], true);

        fx.worker.running.store(true, Ordering::SeqCst);
        fx.queue.close().unwrap();
        let (status, body) = call(&svc, test::TestRequest::get().uri("/readyz")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["store_open"], false);
        // Liveness is unaffected.
        let (status, _) = call(&svc, test::TestRequest::get().uri("/healthz")).await;
        assert_eq!(status, StatusCode::OK);
    }
}

#[actix_web::test]
async fn token_is_required_and_accepted() {
    for (fx, _dir) in fixtures(100, 1024 * 1024) {
        let svc = service(&fx, &config_with_token()).await;
        for (method, uri) in [
            ("GET", "/v1/items"),
            ("POST", "/v1/items"),
            ("GET", "/v1/items/abc"),
            ("DELETE", "/v1/items/abc"),
            ("POST", "/v1/items/abc/retry"),
            ("POST", "/v1/process-now"),
            ("POST", "/v1/cleanup"),
            ("GET", "/v1/stats"),
            ("GET", "/metrics"),
        ] {
            let method = actix_web::http::Method::from_bytes(method.as_bytes()).unwrap();
            let req = test::TestRequest::default()
                .method(method.clone())
                .uri(uri)
                .set_payload("{}")
                .to_request();
            let resp = test::call_service(&svc, req).await;
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{method} {uri}");
            assert!(resp.headers().contains_key("www-authenticate"));
            let body = json_of(resp).await;
            assert_eq!(body["error"], "unauthorized");

            let req = test::TestRequest::default()
                .method(method.clone())
                .uri(uri)
                .insert_header(("Authorization", "Bearer wrong-token-0123456789abc"))
                .to_request();
            let resp = test::call_service(&svc, req).await;
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{method} {uri}");
        }
        // Nothing was enqueued by the refused requests.
        assert_eq!(fx.queue.size().unwrap(), 0);

        let (status, _) = call(&svc, authed(test::TestRequest::get().uri("/v1/stats"))).await;
        assert_eq!(status, StatusCode::OK);
        // Scheme is case-insensitive; a malformed header is refused.
        let (status, _) = call(
            &svc,
            test::TestRequest::get()
                .uri("/v1/stats")
                .insert_header(("Authorization", format!("bearer {TOKEN}"))),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let (status, body) = call(
            &svc,
            test::TestRequest::get()
                .uri("/v1/stats")
                .insert_header(("Authorization", TOKEN)),
        )
        .await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    }
}

#[actix_web::test]
async fn without_a_token_the_loopback_api_is_open_and_metrics_can_be_opened() {
    for (fx, _dir) in fixtures(100, 1024 * 1024) {
        let open = AdminConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..AdminConfig::default()
        };
        let svc = service(&fx, &open).await;
        let (status, _) = call(&svc, test::TestRequest::get().uri("/v1/stats")).await;
        assert_eq!(status, StatusCode::OK);

        let public_metrics = AdminConfig {
            metrics_require_token: false,
            ..config_with_token()
        };
        let svc = service(&fx, &public_metrics).await;
        let resp =
            test::call_service(&svc, test::TestRequest::get().uri("/metrics").to_request()).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let (status, _) = call(&svc, test::TestRequest::get().uri("/v1/stats")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
}

#[actix_web::test]
async fn ingest_stores_the_payload_with_query_and_header_parameters() {
    for (fx, _dir) in fixtures(100, 1024 * 1024) {
        let svc = service(&fx, &config_with_token()).await;
        let req = post_item(
            "?type=assets&agent_id=agent-7&max_attempts=3&attr.tenant=acme&fingerprint=fp-1",
            "{ \"b\": 1, \"a\": [1, 2] }",
        )
        .insert_header(("X-Retryq-Scanner-Name", "nuclei"))
        .insert_header(("X-Retryq-Target-Path", "/srv/app"))
        .insert_header(("X-Retryq-Attr-Region", "eu-west"))
        .insert_header(("X-Retryq-Agent-Id", "agent-7"));
        let resp = test::call_service(&svc, req.to_request()).await;
        assert_eq!(resp.status(), StatusCode::CREATED);
        let location = resp
            .headers()
            .get("location")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        let body = json_of(resp).await;
        let id = body["id"].as_str().unwrap().to_owned();
        assert_eq!(location, format!("/v1/items/{id}"));

        let item = fx.queue.get(&ItemId::parse(&id).unwrap()).unwrap();
        assert_eq!(item.item_type.as_str(), "assets");
        assert_eq!(item.agent_id, "agent-7");
        assert_eq!(item.scanner_name, "nuclei");
        assert_eq!(item.target_path, "/srv/app");
        assert_eq!(item.max_attempts, 3);
        assert_eq!(item.fingerprint, "fp-1");
        assert_eq!(item.report.as_str(), r#"{"b":1,"a":[1,2]}"#);
        assert_eq!(
            item.attributes.get("tenant").map(String::as_str),
            Some("acme")
        );
        assert_eq!(
            item.attributes.get("region").map(String::as_str),
            Some("eu-west")
        );
        assert_eq!(item.status(), ItemStatus::Pending);
        // The worker was woken and the counter moved.
        assert_eq!(fx.worker.nudges.load(Ordering::SeqCst), 1);
        assert_eq!(fx.metrics.enqueued_total(), 1);

        // A caller-chosen ID is kept.
        let (status, body) = call(&svc, post_item("?id=my-id_1", "{\"x\":2}")).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["id"], "my-id_1");
        assert!(fx.queue.get(&ItemId::parse("my-id_1").unwrap()).is_ok());
    }
}

#[actix_web::test]
async fn ingest_takes_every_parameter_from_headers_alone() {
    for (fx, _dir) in fixtures(100, 1024 * 1024) {
        let svc = service(&fx, &config_with_token()).await;
        let req = post_item("", "[1,2,3]")
            .insert_header(("X-Retryq-Type", "heartbeat"))
            .insert_header(("X-Retryq-Id", "hdr-id"))
            .insert_header(("X-Retryq-Fingerprint", "hdr-fp"))
            .insert_header(("X-Retryq-Max-Attempts", "4"))
            .insert_header(("X-Retryq-Agent-Id", "agent"))
            .insert_header(("X-Retryq-Scanner-Name", "scanner"))
            .insert_header(("X-Retryq-Target-Path", "target"))
            .insert_header(("X-Retryq-Attr-Trace", "t-1"));
        let (status, body) = call(&svc, req).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["id"], "hdr-id");
        let item = fx.queue.get(&ItemId::parse("hdr-id").unwrap()).unwrap();
        assert_eq!(item.item_type.as_str(), "heartbeat");
        assert_eq!(item.fingerprint, "hdr-fp");
        assert_eq!(item.max_attempts, 4);
        assert_eq!(
            (
                item.agent_id.as_str(),
                item.scanner_name.as_str(),
                item.target_path.as_str()
            ),
            ("agent", "scanner", "target")
        );
        assert_eq!(
            item.attributes.get("trace").map(String::as_str),
            Some("t-1")
        );
        assert_eq!(item.report.as_str(), "[1,2,3]");
        // The same value given both ways is accepted.
        let req = post_item("?type=assets", "{\"k\":1}").insert_header(("X-Retryq-Type", "assets"));
        let (status, body) = call(&svc, req).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
}

#[actix_web::test]
async fn duplicate_is_409_with_the_existing_id() {
    for (fx, _dir) in fixtures(100, 1024 * 1024) {
        let svc = service(&fx, &config_with_token()).await;
        let (status, first) = call(&svc, post_item("", "{\"same\": true}")).await;
        assert_eq!(status, StatusCode::CREATED);
        // Same payload, so the same default fingerprint.
        let (status, body) = call(&svc, post_item("", "{\"same\":true}")).await;
        assert_error(status, &body, StatusCode::CONFLICT, "duplicate_item");
        assert_eq!(body["existing_id"], first["id"]);
        // Same caller ID, different payload.
        let (status, _) = call(&svc, post_item("?id=dup-id", "{\"n\":1}")).await;
        assert_eq!(status, StatusCode::CREATED);
        let (status, body) = call(&svc, post_item("?id=dup-id", "{\"n\":2}")).await;
        assert_error(status, &body, StatusCode::CONFLICT, "duplicate_item");
        assert_eq!(body["existing_id"], "dup-id");
        assert_eq!(fx.queue.size().unwrap(), 2);
        assert_eq!(fx.metrics.enqueued_total(), 2);
    }
}

#[actix_web::test]
async fn full_queue_is_507() {
    for (fx, _dir) in fixtures(1, 1024 * 1024) {
        let svc = service(&fx, &config_with_token()).await;
        let (status, _) = call(&svc, post_item("", "{\"n\":1}")).await;
        assert_eq!(status, StatusCode::CREATED);
        let (status, body) = call(&svc, post_item("", "{\"n\":2}")).await;
        assert_error(
            status,
            &body,
            StatusCode::INSUFFICIENT_STORAGE,
            "queue_full",
        );
        assert_eq!(fx.queue.size().unwrap(), 1);
    }
}

#[actix_web::test]
async fn too_large_is_413_for_the_body_limit_and_for_the_store() {
    for (fx, _dir) in fixtures(100, 200) {
        let config = AdminConfig {
            body_limit: 1000,
            ..config_with_token()
        };
        let svc = service(&fx, &config).await;
        let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(2000));
        let (status, body) = call(&svc, post_item("", &big)).await;
        assert_error(status, &body, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
        assert!(body["message"].as_str().unwrap().contains("1000"), "{body}");

        // Under the body limit, over the store's byte limit.
        let medium = format!("{{\"pad\":\"{}\"}}", "x".repeat(500));
        let (status, body) = call(&svc, post_item("", &medium)).await;
        assert_error(status, &body, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
        assert_eq!(fx.queue.size().unwrap(), 0);
    }
}

#[actix_web::test]
async fn bad_ingest_input_is_400_naming_the_problem() {
    for (fx, _dir) in fixtures(100, 1024 * 1024) {
        let svc = service(&fx, &config_with_token()).await;
        let cases: Vec<(test::TestRequest, &str)> = vec![
            (post_item("", "{not json"), "JSON"),
            (post_item("", ""), "empty"),
            (post_item("", "  \n"), "empty"),
            (post_item("?id=../etc", "{}"), "id"),
            (post_item("?max_attempts=0", "{}"), "max_attempts"),
            (post_item("?max_attempts=many", "{}"), "max_attempts"),
            (post_item("?colour=blue", "{}"), "colour"),
            (post_item("?type=a&type=b", "{}"), "type"),
            (post_item("?type=", "{}"), "type"),
            (post_item("?attr.=v", "{}"), "attribute"),
            (
                post_item("?agent_id=a", "{}").insert_header(("X-Retryq-Agent-Id", "b")),
                "agent_id",
            ),
            (
                post_item("", "{}").insert_header(("X-Retryq-Colour", "blue")),
                "x-retryq-colour",
            ),
            (post_item("?fingerprint=", "{}"), "fingerprint"),
            (
                post_item("", "{}")
                    .append_header(("X-Retryq-Type", "a"))
                    .append_header(("X-Retryq-Type", "b")),
                "x-retryq-type",
            ),
        ];
        for (req, needle) in cases {
            let (status, body) = call(&svc, req).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{needle}: {body}");
            assert!(
                body["error"] == "invalid_request" || body["error"] == "invalid_item",
                "{body}"
            );
            assert!(
                body["message"].as_str().unwrap().contains(needle),
                "message should name {needle}: {body}"
            );
        }
        assert_eq!(fx.queue.size().unwrap(), 0);
        assert_eq!(fx.worker.nudges.load(Ordering::SeqCst), 0);
    }
}

/// Enqueues `n` items directly (payload `{"n": i}`, unique per fixture),
/// with the clock one second apart, and returns their IDs in creation order.
fn seed(fx: &Fixture, n: usize) -> Vec<ItemId> {
    let first = fx.queue.size().unwrap();
    (first..first + n)
        .map(|i| {
            fx.clock.advance(Duration::from_secs(1));
            let item = NewItem::new(Payload::from_json_str(&format!("{{\"n\":{i}}}")).unwrap())
                .with_type(if i % 2 == 0 { "findings" } else { "assets" });
            fx.queue.enqueue(item).unwrap()
        })
        .collect()
}

fn ids(body: &Value) -> Vec<String> {
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect()
}

#[actix_web::test]
async fn list_filters_orders_and_pages() {
    for (fx, _dir) in fixtures(100, 1024 * 1024) {
        let svc = service(&fx, &config_with_token()).await;
        let all = seed(&fx, 5);
        fx.queue
            .mark_failed(&ItemId::parse(&all[1]).unwrap(), "upstream said no")
            .unwrap();

        let get = |q: &str| authed(test::TestRequest::get().uri(&format!("/v1/items{q}")));
        let (status, body) = call(&svc, get("")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(ids(&body), all);
        assert_eq!(body["count"], 5);
        assert_eq!(body["limit"], 100);
        // Listing never carries payloads.
        assert!(body["items"][0].get("report").is_none());
        assert_eq!(body["items"][0]["type"], "findings");

        let (_, body) = call(&svc, get("?status=failed")).await;
        assert_eq!(ids(&body), vec![all[1].clone()]);
        let (_, body) = call(&svc, get("?type=assets")).await;
        assert_eq!(ids(&body), vec![all[1].clone(), all[3].clone()]);
        let (_, body) = call(&svc, get("?ready=true")).await;
        assert_eq!(
            ids(&body),
            vec![
                all[0].clone(),
                all[2].clone(),
                all[3].clone(),
                all[4].clone()
            ]
        );
        let (_, body) = call(&svc, get("?limit=2&offset=1")).await;
        assert_eq!(ids(&body), vec![all[1].clone(), all[2].clone()]);
        let (_, body) = call(&svc, get("?order_by=created_at&desc=true&limit=2")).await;
        assert_eq!(ids(&body), vec![all[4].clone(), all[3].clone()]);
        let (_, body) = call(&svc, get("?order_by=attempts&desc")).await;
        assert_eq!(ids(&body)[0], all[1]);
        // A limit above the cap is capped.
        let (status, body) = call(&svc, get("?limit=999999")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["limit"], 1000);

        for (query, param) in [
            ("?status=lost", "status"),
            ("?ready=maybe", "ready"),
            ("?limit=0", "limit"),
            ("?limit=-1", "limit"),
            ("?offset=x", "offset"),
            ("?order_by=size", "order_by"),
            ("?desc=2", "desc"),
            ("?sort=id", "sort"),
        ] {
            let (status, body) = call(&svc, get(query)).await;
            assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
            assert!(
                body["message"].as_str().unwrap().contains(param),
                "{query}: {body}"
            );
        }
    }
}

#[actix_web::test]
async fn get_item_with_and_without_payload() {
    for (fx, _dir) in fixtures(100, 1024 * 1024) {
        let svc = service(&fx, &config_with_token()).await;
        let id = seed(&fx, 1).remove(0);
        let (status, body) = call(
            &svc,
            authed(test::TestRequest::get().uri(&format!("/v1/items/{id}"))),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["id"], id.as_str());
        assert_eq!(body["status"], "pending");
        assert!(body.get("report").is_none());
        assert!(body["size_bytes"].as_u64().unwrap() > 0);

        let (status, body) = call(
            &svc,
            authed(test::TestRequest::get().uri(&format!("/v1/items/{id}?payload=true"))),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["report"], serde_json::json!({"n": 0}));

        let (status, body) = call(
            &svc,
            authed(test::TestRequest::get().uri("/v1/items/absent-id")),
        )
        .await;
        assert_error(status, &body, StatusCode::NOT_FOUND, "item_not_found");
        let (status, body) = call(
            &svc,
            authed(test::TestRequest::get().uri("/v1/items/bad.id")),
        )
        .await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
        let (status, body) = call(
            &svc,
            authed(test::TestRequest::get().uri(&format!("/v1/items/{id}?payload=perhaps"))),
        )
        .await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    }
}

#[actix_web::test]
async fn delete_is_204_then_404() {
    for (fx, _dir) in fixtures(100, 1024 * 1024) {
        let svc = service(&fx, &config_with_token()).await;
        let id = seed(&fx, 1).remove(0);
        let uri = format!("/v1/items/{id}");
        let (status, body) = call(&svc, authed(test::TestRequest::delete().uri(&uri))).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert_eq!(body, Value::Null);
        assert!(fx.queue.get(&ItemId::parse(&id).unwrap()).is_err());
        let (status, body) = call(&svc, authed(test::TestRequest::delete().uri(&uri))).await;
        assert_error(status, &body, StatusCode::NOT_FOUND, "item_not_found");
        let (status, _) = call(
            &svc,
            authed(test::TestRequest::delete().uri("/v1/items/a%2Fb")),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
}

#[actix_web::test]
async fn retry_revives_only_dead_letters() {
    for (fx, _dir) in fixtures(100, 1024 * 1024) {
        let svc = service(&fx, &config_with_token()).await;
        let ids = seed(&fx, 2);
        fx.queue
            .mark_failed(&ItemId::parse(&ids[0]).unwrap(), "exhausted")
            .unwrap();
        fx.clock.advance(Duration::from_secs(60));

        let uri = |id: &str| format!("/v1/items/{id}/retry");
        let (status, body) = call(&svc, authed(test::TestRequest::post().uri(&uri(&ids[0])))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "pending");
        assert_eq!(body["attempts"], 0);
        let item = fx.queue.get(&ItemId::parse(&ids[0]).unwrap()).unwrap();
        assert_eq!(item.status(), ItemStatus::Pending);
        assert_eq!(item.next_retry, fx.state.clock.now());
        assert_eq!(fx.worker.nudges.load(Ordering::SeqCst), 1);

        let (status, body) = call(&svc, authed(test::TestRequest::post().uri(&uri(&ids[1])))).await;
        assert_error(status, &body, StatusCode::CONFLICT, "not_failed");
        assert!(
            body["message"].as_str().unwrap().contains("pending"),
            "{body}"
        );
        let (status, body) =
            call(&svc, authed(test::TestRequest::post().uri(&uri("nobody")))).await;
        assert_error(status, &body, StatusCode::NOT_FOUND, "item_not_found");
    }
}

#[actix_web::test]
async fn retry_failed_revives_every_dead_letter_and_only_those() {
    for (fx, _dir) in fixtures(100, 1024 * 1024) {
        let svc = service(&fx, &config_with_token()).await;
        let retry_all = || test::TestRequest::post().uri("/v1/items/retry-failed");

        // Auth first, then an empty queue: nothing to revive, and no nudge.
        let (status, body) = call(&svc, retry_all()).await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
        let (status, body) = call(&svc, authed(retry_all())).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["revived"], 0);
        assert_eq!(body["ids"], serde_json::json!([]));
        assert_eq!(fx.worker.nudges.load(Ordering::SeqCst), 0);

        let ids = seed(&fx, 3);
        fx.queue
            .mark_failed(&ItemId::parse(&ids[0]).unwrap(), "exhausted")
            .unwrap();
        fx.queue
            .mark_failed(&ItemId::parse(&ids[2]).unwrap(), "refused")
            .unwrap();
        let (status, body) = call(&svc, authed(retry_all())).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["revived"], 2);
        let mut revived = api_support_ids(&body["ids"]);
        revived.sort();
        let mut want = vec![ids[0].clone(), ids[2].clone()];
        want.sort();
        assert_eq!(revived, want);
        for id in &ids {
            let item = fx.queue.get(&ItemId::parse(id).unwrap()).unwrap();
            assert_eq!(item.status(), ItemStatus::Pending, "{id}");
            assert_eq!(item.attempts, 0, "{id}");
        }
        assert_eq!(fx.worker.nudges.load(Ordering::SeqCst), 1);

        // A query parameter it does not take is named in a 400.
        let (status, body) = call(
            &svc,
            authed(test::TestRequest::post().uri("/v1/items/retry-failed?all=1")),
        )
        .await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
        assert!(body["message"].as_str().unwrap().contains("all"), "{body}");
        // Only POST is taken: a GET still means the item with that ID.
        let (status, body) = call(
            &svc,
            authed(test::TestRequest::get().uri("/v1/items/retry-failed")),
        )
        .await;
        assert_error(status, &body, StatusCode::NOT_FOUND, "item_not_found");
    }
}

fn api_support_ids(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

#[actix_web::test]
async fn purge_deletes_one_status_and_requires_it() {
    for (fx, _dir) in fixtures(100, 1024 * 1024) {
        let svc = service(&fx, &config_with_token()).await;
        let purge = |query: &str| test::TestRequest::delete().uri(&format!("/v1/items{query}"));

        let (status, body) = call(&svc, purge("?status=failed")).await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
        // Empty queue: nothing purged.
        let (status, body) = call(&svc, authed(purge("?status=failed"))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["purged"], 0);
        assert_eq!(body["status"], "failed");

        let ids = seed(&fx, 3);
        fx.queue
            .mark_failed(&ItemId::parse(&ids[1]).unwrap(), "exhausted")
            .unwrap();
        let (status, body) = call(&svc, authed(purge("?status=failed"))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["purged"], 1);
        assert!(
            fx.queue.get(&ItemId::parse(&ids[1]).unwrap()).is_err(),
            "the dead letter is gone"
        );
        assert_eq!(fx.queue.size().unwrap(), 2, "pending items are left alone");

        // No status, a bad status, or another parameter: 400, nothing deleted.
        for bad in ["", "?status=done", "?status=pending&type=x"] {
            let (status, body) = call(&svc, authed(purge(bad))).await;
            assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
        }
        let (_, body) = call(&svc, authed(purge(""))).await;
        assert!(
            body["message"].as_str().unwrap().contains("status"),
            "{body}"
        );
        assert_eq!(fx.queue.size().unwrap(), 2);

        let (status, body) = call(&svc, authed(purge("?status=pending"))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["purged"], 2);
        assert_eq!(fx.queue.size().unwrap(), 0);
    }
}

#[actix_web::test]
async fn pause_and_resume_reach_the_worker_with_the_reason() {
    for (fx, _dir) in fixtures(100, 1024 * 1024) {
        let svc = service(&fx, &config_with_token()).await;
        let pause = || test::TestRequest::post().uri("/v1/pause");
        let resume = || test::TestRequest::post().uri("/v1/resume");

        for req in [pause(), resume()] {
            let (status, body) = call(&svc, req).await;
            assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
        }
        assert_eq!(*fx.worker.pause_reason.lock().unwrap(), None);

        // No body: the default reason.
        let (status, body) = call(&svc, authed(pause())).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["paused"], true);
        assert_eq!(
            fx.worker.pause_reason.lock().unwrap().as_deref(),
            Some("paused by an operator")
        );
        // A reason of our own.
        let (status, body) = call(
            &svc,
            authed(pause()).set_payload(r#"{"reason": "upstream maintenance until 02:00"}"#),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["pause_reason"], "upstream maintenance until 02:00");

        // Bad bodies are 400 and change nothing.
        let long = format!(r#"{{"reason": "{}"}}"#, "x".repeat(501));
        for bad in [
            "not json",
            r#"{"reason": 5}"#,
            r#"{"reason": "  "}"#,
            r#"{"why": "x"}"#,
            long.as_str(),
        ] {
            let (status, body) = call(&svc, authed(pause()).set_payload(bad.to_owned())).await;
            assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
        }
        assert_eq!(
            fx.worker.pause_reason.lock().unwrap().as_deref(),
            Some("upstream maintenance until 02:00")
        );

        let (status, body) = call(&svc, authed(resume())).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["paused"], false);
        assert_eq!(*fx.worker.pause_reason.lock().unwrap(), None);
        // GET is not how you pause.
        let (status, _) = call(&svc, authed(test::TestRequest::get().uri("/v1/pause"))).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

        // No worker running: 503 for both.
        fx.worker.running.store(false, Ordering::SeqCst);
        for req in [pause(), resume()] {
            let (status, body) = call(&svc, authed(req)).await;
            assert_error(
                status,
                &body,
                StatusCode::SERVICE_UNAVAILABLE,
                "worker_unavailable",
            );
        }
    }
}

#[actix_web::test]
async fn process_now_runs_the_worker_or_is_503() {
    for (fx, _dir) in fixtures(100, 1024 * 1024) {
        let svc = service(&fx, &config_with_token()).await;
        seed(&fx, 3);
        let (status, body) = call(
            &svc,
            authed(test::TestRequest::post().uri("/v1/process-now")),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["delivered"], 3);
        assert_eq!(fx.queue.size().unwrap(), 0);

        fx.worker.running.store(false, Ordering::SeqCst);
        let (status, body) = call(
            &svc,
            authed(test::TestRequest::post().uri("/v1/process-now")),
        )
        .await;
        assert_error(
            status,
            &body,
            StatusCode::SERVICE_UNAVAILABLE,
            "worker_unavailable",
        );
    }
}

#[actix_web::test]
async fn cleanup_passes_the_ttl_and_reports() {
    for (fx, _dir) in fixtures(100, 1024 * 1024) {
        let svc = service(&fx, &config_with_token()).await;
        seed(&fx, 2);
        fx.clock.advance(Duration::from_secs(3 * 3600));
        seed(&fx, 1);
        let (status, body) = call(
            &svc,
            authed(test::TestRequest::post().uri("/v1/cleanup?ttl=2h")),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["expired"], 2);
        assert_eq!(body["removed"], 2);
        assert_eq!(fx.queue.size().unwrap(), 1);

        let (status, body) = call(&svc, authed(test::TestRequest::post().uri("/v1/cleanup"))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["expired"], 0);
        assert_eq!(
            *fx.worker.cleanup_ttls.lock().unwrap(),
            vec![Duration::from_secs(7200), fx.worker.default_ttl]
        );

        for bad in ["?ttl=soon", "?ttl=0s", "?age=1h"] {
            let (status, body) = call(
                &svc,
                authed(test::TestRequest::post().uri(&format!("/v1/cleanup{bad}"))),
            )
            .await;
            assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
        }
    }
}

#[actix_web::test]
async fn stats_use_the_seed_names_and_include_the_worker() {
    for (fx, _dir) in fixtures(100, 1024 * 1024) {
        let svc = service(&fx, &config_with_token()).await;
        let ids = seed(&fx, 3);
        fx.queue
            .mark_failed(&ItemId::parse(&ids[2]).unwrap(), "no")
            .unwrap();
        fx.worker.notify_enqueued();
        let (status, body) = call(&svc, authed(test::TestRequest::get().uri("/v1/stats"))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["total_items"], 3);
        assert_eq!(body["pending_items"], 2);
        assert_eq!(body["processing_items"], 0);
        assert_eq!(body["failed_items"], 1);
        assert_eq!(body["total_retries"], 1);
        assert!(body["total_bytes"].as_u64().unwrap() > 0);
        assert_eq!(body["worker"]["nudges"], 1);

        fx.worker.running.store(false, Ordering::SeqCst);
        let (status, body) = call(&svc, authed(test::TestRequest::get().uri("/v1/stats"))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["worker"], Value::Null);
        assert_eq!(body["total_items"], 3);

        fx.queue.close().unwrap();
        let (status, body) = call(&svc, authed(test::TestRequest::get().uri("/v1/stats"))).await;
        assert_error(
            status,
            &body,
            StatusCode::SERVICE_UNAVAILABLE,
            "queue_closed",
        );
    }
}

#[actix_web::test]
async fn metrics_are_openmetrics_text() {
    for (fx, _dir) in fixtures(100, 1024 * 1024) {
        let svc = service(&fx, &config_with_token()).await;
        let ids = seed(&fx, 2);
        fx.queue
            .mark_failed(&ItemId::parse(&ids[0]).unwrap(), "no")
            .unwrap();
        fx.clock.advance(Duration::from_secs(10));
        let (status, _) = call(&svc, post_item("", "{\"via\":\"api\"}")).await;
        assert_eq!(status, StatusCode::CREATED);
        fx.metrics.record_outcome(
            retryq::metrics::DeliveryOutcome::Delivered,
            Some(Duration::from_millis(30)),
        );
        fx.metrics.record_plugin_error("pusher");

        let resp = test::call_service(
            &svc,
            authed(test::TestRequest::get().uri("/metrics")).to_request(),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK);
        let content_type = resp
            .headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            content_type.starts_with("application/openmetrics-text; version=1.0.0"),
            "{content_type}"
        );
        let text = String::from_utf8(test::read_body(resp).await.to_vec()).unwrap();
        let types = parse_openmetrics(&text);
        for (name, kind) in [
            ("retryq_items", "gauge"),
            ("retryq_items_bytes", "gauge"),
            ("retryq_oldest_item_age_seconds", "gauge"),
            ("retryq_enqueued", "counter"),
            ("retryq_delivered", "counter"),
            ("retryq_skipped", "counter"),
            ("retryq_retried", "counter"),
            ("retryq_dead_lettered", "counter"),
            ("retryq_evicted", "counter"),
            ("retryq_expired", "counter"),
            ("retryq_quarantined", "counter"),
            ("retryq_push_latency_seconds", "histogram"),
            ("retryq_circuit_state", "gauge"),
            ("retryq_plugin_errors", "counter"),
        ] {
            assert_eq!(types.get(name).map(String::as_str), Some(kind), "{name}");
        }
        assert!(
            text.contains("\nretryq_items{status=\"pending\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("\nretryq_items{status=\"failed\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("\nretryq_enqueued_total 1\n"), "{text}");
        assert!(text.contains("\nretryq_delivered_total 1\n"), "{text}");
        assert!(
            text.contains("\nretryq_plugin_errors_total{plugin=\"pusher\"} 1\n"),
            "{text}"
        );
        // The oldest item was created 11 s before the (manual) clock's now.
        assert!(
            text.contains("\nretryq_oldest_item_age_seconds 11.0\n"),
            "{text}"
        );
    }
}

#[actix_web::test]
async fn unknown_routes_and_methods_answer_json() {
    for (fx, _dir) in fixtures(100, 1024 * 1024) {
        let svc = service(&fx, &config_with_token()).await;
        let (status, body) = call(&svc, authed(test::TestRequest::get().uri("/v2/nothing"))).await;
        assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
        let (status, body) = call(&svc, authed(test::TestRequest::put().uri("/v1/items"))).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(body["error"], "method_not_allowed");
    }
}
