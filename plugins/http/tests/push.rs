//! The HTTP pusher against a real scripted server on loopback.

mod server;

use std::io::{Read, Write};
use std::time::{Duration, SystemTime};

use retryq_http::HttpPusher;
use retryq_plugin::{CallContext, ItemMeta, PushOutcome, Pusher};
use serde_json::json;
use server::{Reply, ScriptedServer};

const PAYLOAD: &[u8] = br#"{"findings":[{"id":1,"title":"weak cipher"}]}"#;

fn item() -> ItemMeta {
    ItemMeta {
        id: "0192f0c4-item-42".to_owned(),
        item_type: "findings".to_owned(),
        fingerprint: "sha256:abc123".to_owned(),
        attempts: 2,
        max_attempts: 10,
        created_at: "2026-11-29T00:00:00Z".to_owned(),
        ..ItemMeta::default()
    }
}

fn ctx() -> CallContext {
    CallContext::with_timeout(Duration::from_secs(20))
}

fn pusher(server: &ScriptedServer) -> HttpPusher {
    HttpPusher::from_settings(&json!({ "base_url": server.base_url() })).expect("valid settings")
}

fn push_once(reply: Reply) -> (PushOutcome, ScriptedServer) {
    let server = ScriptedServer::start(vec![reply]);
    let outcome = pusher(&server).push(&item(), PAYLOAD, &ctx());
    (outcome, server)
}

#[test]
fn success_statuses_deliver_with_the_documented_request() {
    for status in [200, 201, 202, 204] {
        let (outcome, server) = push_once(Reply::status(status));
        assert_eq!(outcome, PushOutcome::Delivered, "status {status}");
        let request = server.only_request();
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, "/api/v1/agent/ingest");
        assert_eq!(request.body, PAYLOAD);
        assert_eq!(request.header("content-type"), Some("application/json"));
        assert_eq!(request.header("idempotency-key"), Some("0192f0c4-item-42"));
        assert_eq!(request.header("x-retryq-type"), Some("findings"));
        assert_eq!(
            request.header("x-retryq-fingerprint"),
            Some("sha256:abc123")
        );
        assert_eq!(request.header("x-retryq-attempt"), Some("3"));
        assert_eq!(request.header("content-encoding"), None);
        assert_eq!(request.header("authorization"), None);
        assert!(request
            .header("user-agent")
            .is_some_and(|ua| ua.starts_with("retryq-http/")));
    }
}

#[test]
fn every_push_carries_the_item_id_as_idempotency_key() {
    let server = ScriptedServer::start(vec![Reply::status(503), Reply::status(200)]);
    let pusher = pusher(&server);
    let first = pusher.push(&item(), PAYLOAD, &ctx());
    let second = pusher.push(&item(), PAYLOAD, &ctx());
    assert_eq!(first.kind(), "retryable");
    assert_eq!(second, PushOutcome::Delivered);
    let keys: Vec<_> = server
        .requests()
        .iter()
        .map(|r| r.header("idempotency-key").map(str::to_owned))
        .collect();
    assert_eq!(
        keys,
        vec![
            Some("0192f0c4-item-42".to_owned()),
            Some("0192f0c4-item-42".to_owned())
        ]
    );
}

#[test]
fn configured_paths_method_and_headers_are_used() {
    let server = ScriptedServer::start(vec![Reply::status(200)]);
    let pusher = HttpPusher::from_settings(&json!({
        "base_url": format!("{}/tenant-a/", server.base_url()),
        "push_path": "/v2/results",
        "method": "PUT",
        "headers": { "X-Tenant": "a", "X-Api-Version": "2" },
        "user_agent": "scanner-fleet/1.0",
    }))
    .unwrap();
    assert_eq!(
        pusher.push(&item(), PAYLOAD, &ctx()),
        PushOutcome::Delivered
    );
    let request = server.only_request();
    assert_eq!(request.method, "PUT");
    assert_eq!(request.path, "/tenant-a/v2/results");
    assert_eq!(request.header("x-tenant"), Some("a"));
    assert_eq!(request.header("x-api-version"), Some("2"));
    assert_eq!(request.header("user-agent"), Some("scanner-fleet/1.0"));
}

#[test]
fn retryable_statuses_are_retryable() {
    for status in [408, 425, 429, 500, 502, 503, 504, 599] {
        let (outcome, _server) = push_once(Reply::status(status).body("busy"));
        match outcome {
            PushOutcome::Retryable {
                message,
                retry_after,
            } => {
                assert!(message.contains(&status.to_string()), "{message}");
                assert!(message.contains("busy"), "{message}");
                assert_eq!(retry_after, None, "status {status}");
            }
            other => panic!("status {status}: expected retryable, got {other:?}"),
        }
    }
}

#[test]
fn retry_after_in_delta_seconds() {
    let (outcome, _server) = push_once(Reply::status(429).header("Retry-After", "120"));
    assert_eq!(
        outcome,
        PushOutcome::Retryable {
            message: "upstream answered 429 Too Many Requests".to_owned(),
            retry_after: Some(Duration::from_secs(120)),
        }
    );
}

#[test]
fn retry_after_as_http_date() {
    let at = SystemTime::now() + Duration::from_secs(3600);
    let (outcome, _server) =
        push_once(Reply::status(503).header("Retry-After", &httpdate::fmt_http_date(at)));
    let PushOutcome::Retryable {
        retry_after: Some(delay),
        ..
    } = outcome
    else {
        panic!("expected retryable with retry_after, got {outcome:?}");
    };
    // The date has one-second resolution and some time passes in between.
    assert!(
        delay > Duration::from_secs(3500) && delay <= Duration::from_secs(3600),
        "{delay:?}"
    );
}

#[test]
fn retry_after_date_in_the_past_means_now_and_garbage_is_ignored() {
    let (past, _s1) =
        push_once(Reply::status(503).header("Retry-After", "Sun, 06 Nov 1994 08:49:37 GMT"));
    assert!(matches!(
        past,
        PushOutcome::Retryable { retry_after: Some(d), .. } if d == Duration::ZERO
    ));
    let (garbage, _s2) = push_once(Reply::status(503).header("Retry-After", "later please"));
    assert!(matches!(
        garbage,
        PushOutcome::Retryable {
            retry_after: None,
            ..
        }
    ));
}

#[test]
fn unauthorized_statuses() {
    for status in [401, 403] {
        let (outcome, _server) = push_once(Reply::status(status).body("token expired"));
        match outcome {
            PushOutcome::Unauthorized { message } => {
                assert!(message.contains(&status.to_string()), "{message}");
                assert!(message.contains("token expired"), "{message}");
            }
            other => panic!("status {status}: expected unauthorized, got {other:?}"),
        }
    }
}

#[test]
fn other_client_errors_are_permanent_with_status_and_body_start() {
    for status in [400, 404, 409, 413, 422] {
        let body = format!("{{\"error\":\"bad item\"}}{}", "x".repeat(1000));
        let (outcome, _server) = push_once(Reply::status(status).body(body));
        match outcome {
            PushOutcome::Permanent { message } => {
                assert!(message.contains(&status.to_string()), "{message}");
                assert!(message.contains(r#"{"error":"bad item"}"#), "{message}");
                // Only the start of the body is kept.
                assert!(message.len() < 400, "message too long: {}", message.len());
            }
            other => panic!("status {status}: expected permanent, got {other:?}"),
        }
    }
}

#[test]
fn redirects_are_not_followed() {
    let server = ScriptedServer::start(vec![
        Reply::status(301).header("Location", "http://127.0.0.1:1/elsewhere")
    ]);
    let outcome = pusher(&server).push(&item(), PAYLOAD, &ctx());
    match outcome {
        PushOutcome::Permanent { message } => {
            assert!(message.contains("301"), "{message}");
            assert!(message.contains("/elsewhere"), "{message}");
            assert!(message.contains("not followed"), "{message}");
        }
        other => panic!("expected permanent, got {other:?}"),
    }
    assert_eq!(server.requests().len(), 1);
}

#[test]
fn gzip_compresses_the_body() {
    let server = ScriptedServer::start(vec![Reply::status(200)]);
    let pusher =
        HttpPusher::from_settings(&json!({ "base_url": server.base_url(), "gzip": true })).unwrap();
    assert_eq!(
        pusher.push(&item(), PAYLOAD, &ctx()),
        PushOutcome::Delivered
    );
    let request = server.only_request();
    assert_eq!(request.header("content-encoding"), Some("gzip"));
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_ne!(request.body, PAYLOAD);
    let mut decoded = Vec::new();
    flate2::read::GzDecoder::new(request.body.as_slice())
        .read_to_end(&mut decoded)
        .expect("a valid gzip body");
    assert_eq!(decoded, PAYLOAD);
}

#[test]
fn bearer_token_from_env() {
    let var = "RETRYQ_HTTP_TEST_TOKEN_ENV_PUSH";
    std::env::set_var(var, "env-s3cr3t-token\n");
    let server = ScriptedServer::start(vec![Reply::status(200)]);
    let pusher =
        HttpPusher::from_settings(&json!({ "base_url": server.base_url(), "token_env": var }))
            .unwrap();
    assert!(!format!("{pusher:?}").contains("env-s3cr3t-token"));
    assert_eq!(
        pusher.push(&item(), PAYLOAD, &ctx()),
        PushOutcome::Delivered
    );
    assert_eq!(
        server.only_request().header("authorization"),
        Some("Bearer env-s3cr3t-token")
    );
}

#[test]
fn bearer_token_from_file_is_trimmed_and_not_in_debug() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(b"file-s3cr3t-token\r\n").unwrap();
    let server = ScriptedServer::start(vec![Reply::status(200)]);
    let pusher = HttpPusher::from_settings(&json!({
        "base_url": server.base_url(),
        "token_file": file.path(),
    }))
    .unwrap();
    let debug = format!("{pusher:?}");
    assert!(!debug.contains("file-s3cr3t-token"), "{debug}");
    assert!(debug.contains("redacted"), "{debug}");
    assert_eq!(
        pusher.push(&item(), PAYLOAD, &ctx()),
        PushOutcome::Delivered
    );
    assert_eq!(
        server.only_request().header("authorization"),
        Some("Bearer file-s3cr3t-token")
    );
}

#[test]
fn a_server_slower_than_the_deadline_is_retryable() {
    let server = ScriptedServer::start(vec![Reply::status(200).delay(Duration::from_secs(3))]);
    let outcome = pusher(&server).push(
        &item(),
        PAYLOAD,
        &CallContext::with_timeout(Duration::from_millis(300)),
    );
    assert_eq!(outcome.kind(), "retryable", "{outcome:?}");
}

#[test]
fn a_server_slower_than_the_configured_timeout_is_retryable() {
    let server = ScriptedServer::start(vec![Reply::status(200).delay(Duration::from_secs(3))]);
    let pusher =
        HttpPusher::from_settings(&json!({ "base_url": server.base_url(), "timeout": "300ms" }))
            .unwrap();
    let outcome = pusher.push(&item(), PAYLOAD, &ctx());
    assert_eq!(outcome.kind(), "retryable", "{outcome:?}");
}

#[test]
fn an_expired_deadline_sends_nothing() {
    let server = ScriptedServer::start(vec![Reply::status(200)]);
    let expired = CallContext::with_deadline(std::time::Instant::now());
    let outcome = pusher(&server).push(&item(), PAYLOAD, &expired);
    assert_eq!(outcome.kind(), "retryable");
    assert!(server.requests().is_empty());
}

#[test]
fn connection_refused_is_retryable() {
    let (_held, base_url) = server::refusing_base_url();
    let pusher = HttpPusher::from_settings(&json!({ "base_url": base_url })).unwrap();
    let outcome = pusher.push(&item(), PAYLOAD, &ctx());
    match outcome {
        PushOutcome::Retryable { message, .. } => {
            assert!(message.contains("connect"), "{message}")
        }
        other => panic!("expected retryable, got {other:?}"),
    }
}

const TEST_CA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/test-ca.pem");

fn tls_server() -> ScriptedServer {
    ScriptedServer::start_tls(
        vec![Reply::status(200)],
        include_bytes!("fixtures/test-server.pem"),
        include_bytes!("fixtures/test-server.key"),
    )
}

#[test]
fn https_with_ca_file_delivers() {
    let server = tls_server();
    let base_url = server.base_url().replace("http://", "https://");
    let pusher =
        HttpPusher::from_settings(&json!({ "base_url": base_url, "ca_file": TEST_CA })).unwrap();
    assert_eq!(
        pusher.push(&item(), PAYLOAD, &ctx()),
        PushOutcome::Delivered
    );
    assert_eq!(server.only_request().body, PAYLOAD);
}

#[test]
fn https_with_an_untrusted_certificate_is_retryable() {
    let server = tls_server();
    let base_url = server.base_url().replace("http://", "https://");
    let pusher = HttpPusher::from_settings(&json!({ "base_url": base_url })).unwrap();
    let outcome = pusher.push(&item(), PAYLOAD, &ctx());
    assert_eq!(outcome.kind(), "retryable", "{outcome:?}");
    assert!(server.requests().is_empty());
}

#[test]
fn building_and_dropping_inside_an_async_runtime_is_safe() {
    // Hosts may create and destroy transports on an async (actix/tokio)
    // thread; the blocking client must neither panic there nor on drop.
    let server = ScriptedServer::start(vec![Reply::status(200)]);
    let settings = json!({ "base_url": server.base_url() });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let pusher = runtime
        .block_on(async { HttpPusher::from_settings(&settings) })
        .unwrap();
    // Pushes run on blocking threads, as the host's pool does.
    let outcome = std::thread::spawn({
        let pusher = pusher.clone();
        move || pusher.push(&item(), PAYLOAD, &ctx())
    })
    .join()
    .unwrap();
    assert_eq!(outcome, PushOutcome::Delivered);
    runtime.block_on(async move { drop(pusher) });
}
