//! What the API asks of the worker: a delivery round now, a cleanup,
//! pause and resume.

use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::{query_params, State};
use crate::admin::auth::Authorized;
use crate::admin::ApiError;

#[utoipa::path(post, path = "/v1/process-now", tag = "delivery",
    responses(
        (status = 200, description = "The round's results", body = crate::admin::schema::ProcessNowResult),
        (status = 400, description = "A bad parameter or body", body = crate::admin::schema::ErrorBody), (status = 401, description = "Missing or wrong bearer token", body = crate::admin::schema::ErrorBody), (status = 503, description = "The worker is not running", body = crate::admin::schema::ErrorBody)))]
pub(in crate::admin) async fn process_now(
    _auth: Authorized,
    state: State,
) -> Result<HttpResponse, ApiError> {
    tracing::info!("delivery round requested through the API");
    let summary = state.worker.process_now().await?;
    Ok(HttpResponse::Ok().json(summary))
}

#[utoipa::path(post, path = "/v1/cleanup", tag = "delivery",
    params(("ttl" = Option<String>, Query, pattern = "^[1-9][0-9]{0,4}(s|m|h|d)$", description = "A duration such as 7d (default: the configured TTL)")),
    responses(
        (status = 200, description = "What was removed", body = crate::admin::schema::CleanupResult),
        (status = 400, description = "A bad parameter or body", body = crate::admin::schema::ErrorBody), (status = 401, description = "Missing or wrong bearer token", body = crate::admin::schema::ErrorBody), (status = 503, description = "The worker is not running", body = crate::admin::schema::ErrorBody)))]
pub(in crate::admin) async fn cleanup(
    _auth: Authorized,
    req: HttpRequest,
    state: State,
) -> Result<HttpResponse, ApiError> {
    let params = query_params(&req, |name| name == "ttl")?;
    let ttl: Option<Duration> = match params.get("ttl") {
        Some(text) => {
            let ttl = humantime::parse_duration(text).map_err(|e| {
                ApiError::invalid_request(format!(
                    "parameter ttl: {e} (expected a duration such as \"7d\" or \"12h\")"
                ))
            })?;
            if ttl.is_zero() {
                return Err(ApiError::invalid_request(
                    "parameter ttl must be longer than zero",
                ));
            }
            Some(ttl)
        }
        None => None,
    };
    let report = state.worker.trigger_cleanup(ttl).await?;
    tracing::info!(
        expired = report.expired,
        dead_letters_expired = report.dead_letters_expired,
        quarantine_trimmed = report.quarantine_trimmed,
        "cleanup run through the API"
    );
    Ok(HttpResponse::Ok().json(json!({
        "expired": report.expired,
        "dead_letters_expired": report.dead_letters_expired,
        "quarantine_trimmed": report.quarantine_trimmed,
        "removed": report.removed(),
    })))
}

/// The reason recorded when `POST /v1/pause` gives none.
pub(crate) const DEFAULT_PAUSE_REASON: &str = "paused by an operator";

/// Longest pause reason accepted, in characters: it is shown in `stats`.
const MAX_PAUSE_REASON: usize = 500;

/// The optional body of `POST /v1/pause`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PauseRequest {
    #[serde(default)]
    reason: Option<String>,
}

#[utoipa::path(post, path = "/v1/pause", tag = "delivery",
    request_body(content = crate::admin::schema::PauseRequest, content_type = "application/json", description = "Optional: a reason (the body may be empty)"),
    responses(
        (status = 200, description = "Paused", body = crate::admin::schema::PauseState),
        (status = 400, description = "A bad parameter or body", body = crate::admin::schema::ErrorBody), (status = 401, description = "Missing or wrong bearer token", body = crate::admin::schema::ErrorBody), (status = 503, description = "The worker is not running", body = crate::admin::schema::ErrorBody)))]
pub(in crate::admin) async fn pause(
    _auth: Authorized,
    req: HttpRequest,
    body: web::Bytes,
    state: State,
) -> Result<HttpResponse, ApiError> {
    query_params(&req, |_| false)?;
    let reason = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        // serde would also read a struct from a JSON array (`[]`): only an
        // object is the documented body.
        if !body.trim_ascii_start().starts_with(b"{") {
            return Err(ApiError::invalid_request(
                "the body must be empty or {\"reason\": \"...\"}",
            ));
        }
        let request: PauseRequest = serde_json::from_slice(&body).map_err(|e| {
            ApiError::invalid_request(format!(
                "the body must be empty or {{\"reason\": \"...\"}}: {e}"
            ))
        })?;
        request.reason
    };
    let reason = match reason {
        None => DEFAULT_PAUSE_REASON.to_owned(),
        Some(text) if text.trim().is_empty() => {
            return Err(ApiError::invalid_request(
                "reason is empty; leave it out for the default",
            ))
        }
        Some(text) if text.chars().count() > MAX_PAUSE_REASON => {
            return Err(ApiError::invalid_request(format!(
                "reason is longer than {MAX_PAUSE_REASON} characters"
            )))
        }
        Some(text) => text.trim().to_owned(),
    };
    let answer = state.worker.pause(reason.clone()).await?;
    tracing::warn!(%reason, "delivery paused through the API");
    Ok(HttpResponse::Ok().json(answer))
}

#[utoipa::path(post, path = "/v1/resume", tag = "delivery",
    responses(
        (status = 200, description = "Resumed (also ends a 401 pause and an open circuit)", body = crate::admin::schema::PauseState),
        (status = 400, description = "A bad parameter or body", body = crate::admin::schema::ErrorBody), (status = 401, description = "Missing or wrong bearer token", body = crate::admin::schema::ErrorBody), (status = 503, description = "The worker is not running", body = crate::admin::schema::ErrorBody)))]
pub(in crate::admin) async fn resume(
    _auth: Authorized,
    req: HttpRequest,
    state: State,
) -> Result<HttpResponse, ApiError> {
    query_params(&req, |_| false)?;
    let answer = state.worker.resume().await?;
    tracing::info!("delivery resumed through the API");
    Ok(HttpResponse::Ok().json(answer))
}
