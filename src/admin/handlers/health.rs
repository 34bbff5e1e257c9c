//! Probes and figures: liveness, readiness, the metrics scrape and the
//! queue and worker statistics.

use actix_web::{HttpRequest, HttpResponse};
use serde_json::{json, Value};

use super::{store_call, Settings, State};
use crate::admin::auth::{self, Authorized};
use crate::admin::{ApiError, ControlError};
use crate::metrics::CONTENT_TYPE as METRICS_CONTENT_TYPE;

#[utoipa::path(get, path = "/healthz", tag = "health", security(()),
    responses((status = 200, description = "Serving", body = crate::admin::schema::Health)))]
pub(in crate::admin) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/readyz", tag = "health", security(()),
    responses(
        (status = 200, description = "Store open and writable, worker running", body = crate::admin::schema::Readiness),
        (status = 503, description = "Not ready", body = crate::admin::schema::Readiness)))]
pub(in crate::admin) async fn readyz(state: State) -> HttpResponse {
    let store_open = store_call(&state, |q| q.size()).await.is_ok();
    let worker_running = state.worker.is_running();
    let store_error = state.worker.store_error();
    let ready = store_open && worker_running && store_error.is_none();
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "store_open": store_open,
        "store_writable": store_error.is_none(),
        "store_error": store_error,
        "worker_running": worker_running,
    });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

#[utoipa::path(get, path = "/metrics", tag = "health",
    responses(
        (status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8", body = String),
        (status = 401, description = "Missing or wrong bearer token", body = crate::admin::schema::ErrorBody)))]
pub(in crate::admin) async fn metrics(
    req: HttpRequest,
    state: State,
    settings: Settings,
) -> Result<HttpResponse, ApiError> {
    if settings.metrics_require_token {
        auth::check(&req)?;
    }
    let snapshot = match store_call(&state, |q| q.stats()).await {
        Ok(stats) => Some(stats),
        Err(err) => {
            tracing::warn!(error = %err, "metrics: cannot read queue statistics");
            None
        }
    };
    state.worker.refresh_metrics(&state.metrics);
    let text = state.metrics.render(snapshot.as_ref(), state.clock.now());
    Ok(HttpResponse::Ok()
        .content_type(METRICS_CONTENT_TYPE)
        .body(text))
}

#[utoipa::path(get, path = "/v1/stats", tag = "items",
    responses(
        (status = 200, description = "Queue and worker statistics", body = crate::admin::schema::StatsView),
        (status = 401, description = "Missing or wrong bearer token", body = crate::admin::schema::ErrorBody)))]
pub(in crate::admin) async fn stats(
    _auth: Authorized,
    state: State,
) -> Result<HttpResponse, ApiError> {
    let queue_stats = store_call(&state, |q| q.stats()).await?;
    let worker = match state.worker.stats().await {
        Ok(value) => value,
        Err(ControlError::NotRunning) => Value::Null,
        Err(err) => return Err(err.into()),
    };
    let mut body = serde_json::to_value(&queue_stats)
        .map_err(|e| ApiError::internal(format!("cannot serialize statistics: {e}")))?;
    if let Value::Object(map) = &mut body {
        map.insert("worker".to_owned(), worker);
    }
    Ok(HttpResponse::Ok().json(body))
}
