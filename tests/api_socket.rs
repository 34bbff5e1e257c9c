//! The admin API over a real socket: `bind` on 127.0.0.1 port 0, plain
//! HTTP/1.1 requests from a std TcpStream, graceful stop; and the refusal to
//! listen on a non-loopback address without a token.

mod api_support;

use retryq::item::ItemId;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use api_support::{config_with_token, parse_openmetrics, Fixture, TOKEN};
use retryq::admin::{self, AdminConfig, AdminError, AdminToken};
use retryq::store::RetryQueue;

/// One HTTP/1.1 exchange with `Connection: close`; returns status and body.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a full response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, body.to_owned())
}

#[actix_web::test]
async fn serves_over_a_real_socket_with_a_token() {
    let fx = Fixture::new(100, 1024 * 1024);
    let server = admin::bind(config_with_token(), fx.state.clone()).expect("bind");
    let addr = server.local_addr();
    assert!(addr.ip().is_loopback());
    assert_ne!(addr.port(), 0);
    let handle = server.handle();
    let running = actix_web::rt::spawn(server.run());

    let results = actix_web::rt::task::spawn_blocking(move || {
        let health = http(addr, "GET", "/healthz", None, "");
        let refused = http(addr, "POST", "/v1/items?type=assets", None, "{\"a\":1}");
        let created = http(
            addr,
            "POST",
            "/v1/items?type=assets",
            Some(TOKEN),
            "{\"a\":1}",
        );
        let listed = http(addr, "GET", "/v1/items", Some(TOKEN), "");
        let metrics_refused = http(addr, "GET", "/metrics", None, "");
        let metrics = http(addr, "GET", "/metrics", Some(TOKEN), "");
        (health, refused, created, listed, metrics_refused, metrics)
    })
    .await
    .unwrap();
    let (health, refused, created, listed, metrics_refused, metrics) = results;

    assert_eq!(health.0, 200, "{}", health.1);
    assert_eq!(refused.0, 401, "{}", refused.1);
    assert_eq!(created.0, 201, "{}", created.1);
    let id = serde_json::from_str::<serde_json::Value>(&created.1).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        fx.queue
            .get(&ItemId::parse(&id).unwrap())
            .unwrap()
            .item_type
            .as_str(),
        "assets"
    );
    assert_eq!(fx.queue.size().unwrap(), 1);
    let listed: serde_json::Value = serde_json::from_str(&listed.1).unwrap();
    assert_eq!(listed["items"][0]["id"], id.as_str());
    assert_eq!(metrics_refused.0, 401);
    assert_eq!(metrics.0, 200);
    let types = parse_openmetrics(&metrics.1);
    assert_eq!(
        types.get("retryq_enqueued").map(String::as_str),
        Some("counter")
    );
    assert!(
        metrics.1.contains("\nretryq_enqueued_total 1\n"),
        "{}",
        metrics.1
    );

    handle.stop(true).await;
    running.await.unwrap().expect("server stopped cleanly");
}

#[actix_web::test]
async fn oversized_body_is_413_on_the_wire() {
    let fx = Fixture::new(100, 1024 * 1024);
    let config = AdminConfig {
        body_limit: 64,
        ..config_with_token()
    };
    let server = admin::bind(config, fx.state.clone()).expect("bind");
    let addr = server.local_addr();
    let handle = server.handle();
    let running = actix_web::rt::spawn(server.run());
    let (too_big, fits) = actix_web::rt::task::spawn_blocking(move || {
        let body = format!("{{\"pad\":\"{}\"}}", "x".repeat(100));
        let too_big = http(addr, "POST", "/v1/items", Some(TOKEN), &body);
        let fits = http(addr, "POST", "/v1/items", Some(TOKEN), "{\"ok\":true}");
        (too_big, fits)
    })
    .await
    .unwrap();
    assert_eq!(too_big.0, 413, "{}", too_big.1);
    let error: serde_json::Value = serde_json::from_str(&too_big.1).unwrap();
    assert_eq!(error["error"], "too_large");
    assert_eq!(fits.0, 201, "{}", fits.1);
    assert_eq!(fx.queue.size().unwrap(), 1);
    handle.stop(true).await;
    running.await.unwrap().expect("server stopped cleanly");
}

#[actix_web::test]
async fn refuses_a_non_loopback_address_without_a_token() {
    let fx = Fixture::new(10, 1024);
    for listen in ["0.0.0.0:0", "[::]:0", "192.0.2.10:8080"] {
        let config = AdminConfig {
            listen: listen.parse().unwrap(),
            token: None,
            ..AdminConfig::default()
        };
        let err = admin::bind(config, fx.state.clone()).unwrap_err();
        assert!(matches!(err, AdminError::InsecureListen { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains("refusing to listen"), "{message}");
        assert!(message.contains("token"), "{message}");
    }
    // With a token the same address passes validation (not bound here).
    let config = AdminConfig {
        listen: "0.0.0.0:0".parse().unwrap(),
        token: Some(AdminToken::new(TOKEN, "test").unwrap()),
        ..AdminConfig::default()
    };
    config
        .validate()
        .expect("a token makes a public address acceptable");
    // Loopback without a token is fine.
    let config = AdminConfig {
        listen: "[::1]:0".parse().unwrap(),
        ..AdminConfig::default()
    };
    config.validate().expect("loopback needs no token");
    // Nonsense limits are named.
    let config = AdminConfig {
        body_limit: 0,
        ..config_with_token()
    };
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("body_limit"), "{err}");
}

#[test]
fn config_from_the_admin_settings_reads_the_token_once() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let mut settings = retryq::config::AdminSettings {
        listen: "0.0.0.0:7878".parse().unwrap(),
        token_env: "RETRYQ_API_TEST_SURELY_UNSET".into(),
        body_limit: 1234,
        ..Default::default()
    };
    let err = AdminConfig::from_settings(&settings).unwrap_err();
    assert!(matches!(err, AdminError::InsecureListen { .. }), "{err}");

    settings.token_file = Some(token_file);
    let config = AdminConfig::from_settings(&settings).unwrap();
    assert!(config.token.as_ref().unwrap().matches(TOKEN));
    assert_eq!(config.body_limit, 1234);

    settings.token_file = Some(dir.path().join("missing"));
    let err = AdminConfig::from_settings(&settings)
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing"), "{err}");
}
