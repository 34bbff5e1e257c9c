//! The HTTP fingerprint checker against a real scripted server, and the
//! settings errors of both constructors.

mod server;

use std::io::Write;
use std::time::Duration;

use retryq_http::{HttpChecker, HttpPusher, SettingsError};
use retryq_plugin::{CallContext, CheckError, CheckResult, FingerprintChecker};
use serde_json::{json, Value};
use server::{Reply, ScriptedServer};

fn ctx() -> CallContext {
    CallContext::with_timeout(Duration::from_secs(20))
}

fn fingerprints(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn check_once(reply: Reply) -> (Result<CheckResult, CheckError>, ScriptedServer) {
    let server = ScriptedServer::start(vec![reply]);
    let checker = HttpChecker::from_settings(&json!({ "base_url": server.base_url() })).unwrap();
    let result = checker.check(&fingerprints(&["fp-a", "fp-b", "fp-c"]), &ctx());
    (result, server)
}

#[test]
fn checker_splits_existing_and_missing() {
    let (result, server) = check_once(
        Reply::status(200)
            .header("Content-Type", "application/json")
            .body(r#"{"existing":["fp-b"],"missing":["fp-a","fp-c"]}"#),
    );
    assert_eq!(
        result.unwrap(),
        CheckResult {
            existing: fingerprints(&["fp-b"]),
            missing: fingerprints(&["fp-a", "fp-c"]),
        }
    );
    let request = server.only_request();
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/api/v1/agent/ingest/check");
    assert_eq!(request.header("content-type"), Some("application/json"));
    let body: Value = serde_json::from_slice(&request.body).unwrap();
    assert_eq!(body, json!({ "fingerprints": ["fp-a", "fp-b", "fp-c"] }));
}

#[test]
fn checker_treats_unlisted_fingerprints_as_missing() {
    let (result, _server) = check_once(Reply::status(200).body(r#"{"existing":["fp-a"]}"#));
    assert_eq!(
        result.unwrap(),
        CheckResult {
            existing: fingerprints(&["fp-a"]),
            missing: fingerprints(&["fp-b", "fp-c"]),
        }
    );
}

#[test]
fn checker_with_nothing_to_ask_sends_nothing() {
    let server = ScriptedServer::start(vec![Reply::status(500)]);
    let checker = HttpChecker::from_settings(&json!({ "base_url": server.base_url() })).unwrap();
    assert_eq!(checker.check(&[], &ctx()), Ok(CheckResult::default()));
    assert!(server.requests().is_empty());
}

#[test]
fn checker_server_errors_are_unavailable() {
    for status in [500, 503, 404, 429] {
        let (result, _server) = check_once(Reply::status(status).body("down"));
        match result {
            Err(CheckError::Unavailable(message)) => {
                assert!(message.contains(&status.to_string()), "{message}")
            }
            other => panic!("status {status}: expected unavailable, got {other:?}"),
        }
    }
}

#[test]
fn checker_auth_errors_are_unauthorized() {
    for status in [401, 403] {
        let (result, _server) = check_once(Reply::status(status));
        assert!(
            matches!(&result, Err(CheckError::Unauthorized(m)) if m.contains(&status.to_string())),
            "status {status}: {result:?}"
        );
    }
}

#[test]
fn checker_malformed_json_is_unavailable() {
    for body in ["<html>oops</html>", r#"{"existing": "fp-a"}"#, ""] {
        let (result, _server) = check_once(Reply::status(200).body(body));
        match result {
            Err(CheckError::Unavailable(message)) => {
                assert!(message.contains("malformed"), "{message}")
            }
            other => panic!("body {body:?}: expected unavailable, got {other:?}"),
        }
    }
}

#[test]
fn checker_connection_refused_is_unavailable() {
    let (_held, base_url) = server::refusing_base_url();
    let checker = HttpChecker::from_settings(&json!({ "base_url": base_url })).unwrap();
    assert!(matches!(
        checker.check(&fingerprints(&["fp-a"]), &ctx()),
        Err(CheckError::Unavailable(_))
    ));
}

#[test]
fn checker_sends_token_and_custom_path() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(b"check-token\n").unwrap();
    let server = ScriptedServer::start(vec![Reply::status(200).body(r#"{"existing":[]}"#)]);
    let checker = HttpChecker::from_settings(&json!({
        "base_url": server.base_url(),
        "check_path": "/dedupe",
        "token_file": file.path(),
    }))
    .unwrap();
    assert!(!format!("{checker:?}").contains("check-token"));
    let result = checker.check(&fingerprints(&["fp-a"]), &ctx()).unwrap();
    assert_eq!(result.missing, fingerprints(&["fp-a"]));
    let request = server.only_request();
    assert_eq!(request.path, "/dedupe");
    assert_eq!(request.header("authorization"), Some("Bearer check-token"));
}

/// Both constructors refuse `settings`; returns the pusher's error.
fn refused(settings: Value) -> SettingsError {
    let checker_error = HttpChecker::from_settings(&settings).expect_err("checker must refuse");
    let pusher_error = HttpPusher::from_settings(&settings).expect_err("pusher must refuse");
    assert_eq!(checker_error.to_string(), pusher_error.to_string());
    pusher_error
}

#[test]
fn missing_base_url_is_refused() {
    let error = refused(json!({ "gzip": true }));
    assert!(error.to_string().contains("base_url"), "{error}");
    let error = refused(json!("http://example.com"));
    assert!(error.to_string().contains("base_url"), "{error}");
}

#[test]
fn bad_urls_are_refused() {
    for url in [
        "not a url",
        "ftp://example.com",
        "http://",
        "https://h/?q=1",
        "http://user:pw@h",
    ] {
        let error = refused(json!({ "base_url": url }));
        assert_eq!(error.key(), Some("base_url"), "{url}: {error}");
    }
    let error = refused(json!({ "base_url": "http://h", "push_path": "ingest" }));
    assert_eq!(error.key(), Some("push_path"), "{error}");
}

#[test]
fn unknown_keys_are_refused() {
    let error = refused(json!({ "base_url": "http://h", "retries": 3 }));
    assert!(error.to_string().contains("retries"), "{error}");
}

#[test]
fn bad_types_and_values_are_refused() {
    let error = refused(json!({ "base_url": "http://h", "timeout": "soon" }));
    assert!(
        error.to_string().contains("timeout") || error.to_string().contains("soon"),
        "{error}"
    );
    let error = refused(json!({ "base_url": "http://h", "method": "DELETE" }));
    assert!(error.to_string().contains("DELETE"), "{error}");
    let error = refused(json!({ "base_url": "http://h", "timeout": "0s" }));
    assert_eq!(error.key(), Some("timeout"));
}

#[test]
fn authorization_in_headers_is_refused() {
    for name in ["Authorization", "authorization", "Proxy-Authorization"] {
        let error = refused(json!({
            "base_url": "http://h",
            "headers": { name: "Bearer plain-text-secret" },
        }));
        assert_eq!(error.key(), Some("headers"));
        let text = error.to_string();
        assert!(text.contains("token_env"), "{text}");
        assert!(!text.contains("plain-text-secret"), "{text}");
    }
    let error = refused(json!({ "base_url": "http://h", "headers": { "Idempotency-Key": "x" } }));
    assert_eq!(error.key(), Some("headers"));
}

#[test]
fn a_token_in_the_config_is_refused() {
    let error = refused(json!({ "base_url": "http://h", "token": "plain-text-secret" }));
    let text = error.to_string();
    assert!(
        text.contains("token_env") && text.contains("token_file"),
        "{text}"
    );
    assert!(!text.contains("plain-text-secret"), "{text}");
}

#[test]
fn token_source_errors() {
    let error = refused(json!({
        "base_url": "http://h",
        "token_file": "/nonexistent/retryq-http/token",
    }));
    assert_eq!(error.key(), Some("token_file"));
    assert!(
        error.to_string().contains("/nonexistent/retryq-http/token"),
        "{error}"
    );

    let error = refused(json!({
        "base_url": "http://h",
        "token_env": "RETRYQ_HTTP_TEST_SURELY_UNSET_VAR",
    }));
    assert_eq!(error.key(), Some("token_env"));
    assert!(
        error
            .to_string()
            .contains("RETRYQ_HTTP_TEST_SURELY_UNSET_VAR"),
        "{error}"
    );

    let empty = tempfile::NamedTempFile::new().unwrap();
    let error = refused(json!({ "base_url": "http://h", "token_file": empty.path() }));
    assert_eq!(error.key(), Some("token_file"));

    let error = refused(json!({
        "base_url": "http://h",
        "token_env": "X",
        "token_file": empty.path(),
    }));
    assert_eq!(error.key(), Some("token_file"));
}

#[test]
fn ca_file_errors() {
    let error = refused(json!({ "base_url": "https://h", "ca_file": "/nonexistent/ca.pem" }));
    assert_eq!(error.key(), Some("ca_file"));
    let mut not_pem = tempfile::NamedTempFile::new().unwrap();
    not_pem.write_all(b"this is not a certificate\n").unwrap();
    let error = refused(json!({ "base_url": "https://h", "ca_file": not_pem.path() }));
    assert_eq!(error.key(), Some("ca_file"), "{error}");
}

#[test]
fn defaults_are_documented_values() {
    let settings =
        retryq_http::HttpSettings::from_value(&json!({ "base_url": "https://h" })).unwrap();
    assert_eq!(settings.push_path, "/api/v1/agent/ingest");
    assert_eq!(settings.check_path, "/api/v1/agent/ingest/check");
    assert_eq!(settings.method, retryq_http::PushMethod::Post);
    assert!(!settings.gzip);
    assert_eq!(settings.connect_timeout, Duration::from_secs(10));
    assert_eq!(settings.timeout, Duration::from_secs(30));
    assert!(settings.headers.is_empty());
}
