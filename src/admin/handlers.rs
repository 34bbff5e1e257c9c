//! The API's request handlers: parameter parsing, store calls on the
//! blocking pool, worker calls, and the JSON they answer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{self, HeaderMap};
use actix_web::{guard, web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::{self, Authorized};
use super::{AdminState, ApiError, ApiSettings, ControlError};
use crate::error::{QueueError, QueueResult};
use crate::item::{validate_id, ItemStatus, ItemType, NewItem, Payload, QueueItem};
use crate::metrics::CONTENT_TYPE as METRICS_CONTENT_TYPE;
use crate::store::{ListFilter, OrderBy, RetryQueue};

type State = web::Data<AdminState>;
type Settings = web::Data<ApiSettings>;

/// Registers every route.
pub(super) fn register(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/healthz").route(web::get().to(healthz)))
        .service(resource("/readyz").route(web::get().to(readyz)))
        .service(resource("/metrics").route(web::get().to(metrics)))
        .service(
            resource("/v1/items")
                .route(web::post().to(ingest))
                .route(web::get().to(list_items))
                .route(web::delete().to(purge_items)),
        )
        // Before `/v1/items/{id}`, and for POST only: a GET or DELETE of an
        // item whose ID happens to be "retry-failed" still reaches it.
        .service(
            web::resource("/v1/items/retry-failed")
                .guard(guard::Post())
                .route(web::post().to(retry_failed)),
        )
        .service(
            resource("/v1/items/{id}")
                .route(web::get().to(get_item))
                .route(web::delete().to(delete_item)),
        )
        .service(resource("/v1/items/{id}/retry").route(web::post().to(retry_item)))
        .service(resource("/v1/process-now").route(web::post().to(process_now)))
        .service(resource("/v1/pause").route(web::post().to(pause)))
        .service(resource("/v1/resume").route(web::post().to(resume)))
        .service(resource("/v1/cleanup").route(web::post().to(cleanup)))
        .service(resource("/v1/stats").route(web::get().to(stats)))
        .default_service(web::to(no_route));
}

/// A resource whose unmatched methods answer a JSON 405.
fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(method_not_allowed))
}

async fn no_route(req: HttpRequest) -> HttpResponse {
    actix_web::ResponseError::error_response(&ApiError::no_route(req.path()))
}

/// The methods a path has, for a 405's `Allow` header: given by the
/// OpenAPI document, which `super::routes` hands in as app data (the
/// document lists these handlers, so they cannot import it back).
#[derive(Clone, Copy)]
pub(super) struct AllowedMethods(pub(super) fn(&str) -> Option<String>);

async fn method_not_allowed(req: HttpRequest) -> HttpResponse {
    let mut response = HttpResponse::MethodNotAllowed();
    // RFC 9110: a 405 lists the methods the resource has (from the OpenAPI
    // document, so the two cannot disagree).
    // The literal path first: `/v1/items/retry-failed` is its own resource
    // for POST but matches `/v1/items/{id}` for other methods.
    let allowed = req
        .app_data::<web::Data<AllowedMethods>>()
        .map(|a| a.0)
        .unwrap_or(|_| None);
    if let Some(allow) =
        allowed(req.path()).or_else(|| req.match_pattern().and_then(|p| allowed(&p)))
    {
        response.insert_header((header::ALLOW, allow));
    }
    response.json(json!({
        "error": "method_not_allowed",
        "message": format!("{} is not allowed on {}", req.method(), req.path()),
    }))
}

/// Runs a blocking store call on actix's blocking pool.
async fn store_call<T, F>(state: &AdminState, call: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&dyn RetryQueue) -> QueueResult<T> + Send + 'static,
{
    let queue = Arc::clone(&state.queue);
    match web::block(move || call(queue.as_ref())).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(_) => Err(ApiError::internal("the store call did not complete")),
    }
}

/// The query string as name/value pairs, each name at most once, every name
/// accepted by `allowed`.
fn query_params(
    req: &HttpRequest,
    allowed: impl Fn(&str) -> bool,
) -> Result<BTreeMap<String, String>, ApiError> {
    let pairs = web::Query::<Vec<(String, String)>>::from_query(req.query_string())
        .map_err(|e| ApiError::invalid_request(format!("malformed query string: {e}")))?
        .into_inner();
    let mut params = BTreeMap::new();
    for (name, value) in pairs {
        if !allowed(&name) {
            return Err(ApiError::invalid_request(format!(
                "unknown query parameter {name:?}"
            )));
        }
        if params.contains_key(&name) {
            return Err(ApiError::invalid_request(format!(
                "query parameter {name:?} is given more than once"
            )));
        }
        params.insert(name, value);
    }
    Ok(params)
}

/// A boolean parameter: `true`/`1`/`yes`/empty (present) or `false`/`0`/`no`.
fn parse_bool(name: &str, value: &str) -> Result<bool, ApiError> {
    match value.to_ascii_lowercase().as_str() {
        "" | "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(ApiError::invalid_request(format!(
            "parameter {name}: expected true or false, got {value:?}"
        ))),
    }
}

/// An item ID from the path, validated.
fn path_id(id: &str) -> Result<String, ApiError> {
    validate_id(id).map_err(|e| ApiError::invalid_request(format!("path id: {e}")))?;
    Ok(id.to_owned())
}

/// An item as JSON (the seed's field names), without its report unless asked.
fn item_json(item: &QueueItem, with_payload: bool) -> Result<Value, ApiError> {
    item.view_json(with_payload)
        .map_err(|e| ApiError::internal(format!("cannot serialize item {}: {e}", item.id)))
}

// ---- health -------------------------------------------------------------

#[utoipa::path(get, path = "/healthz", tag = "health", security(()),
    responses((status = 200, description = "Serving", body = super::schema::Health)))]
pub(super) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/readyz", tag = "health", security(()),
    responses(
        (status = 200, description = "Store open and writable, worker running", body = super::schema::Readiness),
        (status = 503, description = "Not ready", body = super::schema::Readiness)))]
pub(super) async fn readyz(state: State) -> HttpResponse {
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
        (status = 401, description = "Missing or wrong bearer token", body = super::schema::ErrorBody)))]
pub(super) async fn metrics(
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

// ---- ingest -------------------------------------------------------------

/// The ingest parameters (everything but the payload).
#[derive(Debug, Default)]
struct IngestParams {
    item_type: Option<String>,
    fingerprint: Option<String>,
    id: Option<String>,
    agent_id: Option<String>,
    scanner_name: Option<String>,
    target_path: Option<String>,
    max_attempts: Option<u32>,
    attributes: BTreeMap<String, String>,
}

const INGEST_FIELDS: [&str; 7] = [
    "type",
    "fingerprint",
    "id",
    "agent_id",
    "scanner_name",
    "target_path",
    "max_attempts",
];
const ATTR_QUERY_PREFIX: &str = "attr.";
const HEADER_PREFIX: &str = "x-retryq-";
const ATTR_HEADER_PREFIX: &str = "x-retryq-attr-";

impl IngestParams {
    /// Gathers the parameters from the query string and `X-Retryq-*`
    /// headers; a name given both ways must have one value.
    fn from_request(req: &HttpRequest) -> Result<Self, ApiError> {
        let query = query_params(req, |name| {
            INGEST_FIELDS.contains(&name) || name.starts_with(ATTR_QUERY_PREFIX)
        })?;
        let headers = header_params(req.headers())?;

        // Merge: each parameter as `field` or `attr.KEY`.
        let mut merged: BTreeMap<String, String> = query;
        for (name, value) in headers {
            match merged.get(&name) {
                Some(existing) if existing != &value => {
                    return Err(ApiError::invalid_request(format!(
                        "parameter {name} is given as a query parameter and a header with different values"
                    )))
                }
                _ => {
                    merged.insert(name, value);
                }
            }
        }

        let mut params = IngestParams::default();
        for (name, value) in merged {
            if let Some(key) = name.strip_prefix(ATTR_QUERY_PREFIX) {
                if key.is_empty() {
                    return Err(ApiError::invalid_request(
                        "attribute with an empty key (use attr.KEY=VALUE)",
                    ));
                }
                params.attributes.insert(key.to_owned(), value);
                continue;
            }
            match name.as_str() {
                "type" => {
                    if value.is_empty() {
                        return Err(ApiError::invalid_request("parameter type is empty"));
                    }
                    params.item_type = Some(value)
                }
                "fingerprint" => params.fingerprint = Some(value),
                "id" => {
                    validate_id(&value)
                        .map_err(|e| ApiError::invalid_request(format!("parameter id: {e}")))?;
                    params.id = Some(value)
                }
                "agent_id" => params.agent_id = Some(value),
                "scanner_name" => params.scanner_name = Some(value),
                "target_path" => params.target_path = Some(value),
                "max_attempts" => {
                    let n: u32 = value.parse().map_err(|_| {
                        ApiError::invalid_request(format!(
                            "parameter max_attempts: expected a whole number, got {value:?}"
                        ))
                    })?;
                    if n == 0 {
                        return Err(ApiError::invalid_request(
                            "parameter max_attempts must be at least 1",
                        ));
                    }
                    params.max_attempts = Some(n)
                }
                // Unknown names were refused while parsing.
                other => {
                    return Err(ApiError::invalid_request(format!(
                        "unknown parameter {other:?}"
                    )))
                }
            }
        }
        Ok(params)
    }

    fn into_new_item(self, payload: Payload) -> NewItem {
        let mut item = NewItem::new(payload);
        if let Some(t) = self.item_type {
            item.item_type = ItemType::from(t);
        }
        item.fingerprint = self.fingerprint;
        item.id = self.id;
        item.max_attempts = self.max_attempts;
        item.agent_id = self.agent_id.unwrap_or_default();
        item.scanner_name = self.scanner_name.unwrap_or_default();
        item.target_path = self.target_path.unwrap_or_default();
        item.attributes = self.attributes;
        item
    }
}

/// The `X-Retryq-*` headers as parameters named like the query's
/// (`X-Retryq-Agent-Id` -> `agent_id`, `X-Retryq-Attr-K` -> `attr.k`).
fn header_params(headers: &HeaderMap) -> Result<BTreeMap<String, String>, ApiError> {
    let mut params = BTreeMap::new();
    for name in headers.keys() {
        // Header names are stored in lower case.
        let lower = name.as_str();
        if !lower.starts_with(HEADER_PREFIX) {
            continue;
        }
        let param = if let Some(key) = lower.strip_prefix(ATTR_HEADER_PREFIX) {
            format!("{ATTR_QUERY_PREFIX}{key}")
        } else {
            let field = lower[HEADER_PREFIX.len()..].replace('-', "_");
            if !INGEST_FIELDS.contains(&field.as_str()) {
                return Err(ApiError::invalid_request(format!("unknown header {lower}")));
            }
            field
        };
        let mut values = headers.get_all(name);
        let (Some(value), None) = (values.next(), values.next()) else {
            return Err(ApiError::invalid_request(format!(
                "header {lower} is given more than once"
            )));
        };
        let value = value.to_str().map_err(|_| {
            ApiError::invalid_request(format!("header {lower} is not visible ASCII"))
        })?;
        params.insert(param, value.to_owned());
    }
    Ok(params)
}

#[utoipa::path(post, path = "/v1/items", tag = "items",
    params(
        ("type" = Option<String>, Query, min_length = 1, description = "Report type"),
        ("fingerprint" = Option<String>, Query, min_length = 1, description = "Dedupe key (default: SHA-256 of the payload)"),
        ("id" = Option<String>, Query, min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$", description = "Caller-chosen ID (a UUID, or up to 64 of A-Z, a-z, 0-9, _ and -)"),
        ("agent_id" = Option<String>, Query),
        ("scanner_name" = Option<String>, Query),
        ("target_path" = Option<String>, Query),
        ("max_attempts" = Option<u32>, Query, minimum = 1),
    ),
    request_body(content = serde_json::Value, content_type = "application/json", description = "The payload: one JSON document"),
    responses(
        (status = 201, description = "Stored durably", body = super::schema::Created),
        (status = 400, description = "A bad parameter or body", body = super::schema::ErrorBody), (status = 401, description = "Missing or wrong bearer token", body = super::schema::ErrorBody),
        (status = 409, description = "Duplicate ID or fingerprint (existing_id names the item)", body = super::schema::ErrorBody),
        (status = 413, description = "Body over admin.max_body, or item over the store's limit", body = super::schema::ErrorBody),
        (status = 503, description = "The store is closed or in use", body = super::schema::ErrorBody),
        (status = 507, description = "The queue or the disk is full", body = super::schema::ErrorBody)))]
pub(super) async fn ingest(
    _auth: Authorized,
    req: HttpRequest,
    body: web::Payload,
    state: State,
    settings: Settings,
) -> Result<HttpResponse, ApiError> {
    let params = IngestParams::from_request(&req)?;
    let limit = settings.body_limit;
    let declared_len = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared_len.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::body_too_large(limit));
    }
    let bytes = match body.to_bytes_limited(limit).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(err)) => {
            return Err(ApiError::invalid_request(format!(
                "cannot read the request body: {err}"
            )))
        }
        Err(_) => return Err(ApiError::body_too_large(limit)),
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid_request(
            "the request body is empty; it must be the payload, a JSON document",
        ));
    }
    let payload = Payload::from_json_bytes(&bytes)?;
    let item = params.into_new_item(payload);
    let item_type = item.item_type.clone();
    let result = match state.worker.enqueue(item) {
        Ok(through_worker) => through_worker.await.map_err(ApiError::from),
        Err(item) => {
            let stored = store_call(&state, move |q| q.enqueue(*item)).await;
            if stored.is_ok() {
                state.worker.notify_enqueued();
            }
            stored
        }
    };
    let id = match result {
        Ok(id) => id,
        Err(err) => {
            if err.status == 507 {
                tracing::warn!(message = %err.message, "ingest refused: queue full");
            } else {
                tracing::debug!(kind = err.error, message = %err.message, "ingest refused");
            }
            return Err(err);
        }
    };
    state.metrics.record_enqueued(1);
    state.console.feed.enqueued(&id, item_type.as_str());
    tracing::info!(id = %id, item_type = %item_type, bytes = bytes.len(), "item enqueued through the API");
    Ok(HttpResponse::Created()
        .insert_header((header::LOCATION, format!("/v1/items/{id}")))
        .json(json!({ "id": id })))
}

// ---- reads --------------------------------------------------------------

#[utoipa::path(get, path = "/v1/items", tag = "items",
    params(
        ("status" = Option<crate::item::ItemStatus>, Query),
        ("type" = Option<String>, Query, min_length = 1),
        ("ready" = Option<String>, Query, pattern = "^(|[Tt][Rr][Uu][Ee]|1|[Yy][Ee][Ss]|[Ff][Aa][Ll][Ss][Ee]|0|[Nn][Oo])$", description = "Only pending items due now (true, 1, yes or empty; false, 0 or no)"),
        ("limit" = Option<usize>, Query, minimum = 1, maximum = 18446744073709551615_u64, description = "Page size (default 100, capped)"),
        ("offset" = Option<usize>, Query, maximum = 18446744073709551615_u64),
        ("order_by" = Option<super::schema::OrderByParam>, Query),
        ("desc" = Option<String>, Query, pattern = "^(|[Tt][Rr][Uu][Ee]|1|[Yy][Ee][Ss]|[Ff][Aa][Ll][Ss][Ee]|0|[Nn][Oo])$", description = "Descending (true, 1, yes or empty; false, 0 or no)"),
    ),
    responses(
        (status = 200, description = "A page of items, without payloads", body = super::schema::ItemPage),
        (status = 400, description = "A bad parameter or body", body = super::schema::ErrorBody), (status = 401, description = "Missing or wrong bearer token", body = super::schema::ErrorBody)))]
pub(super) async fn list_items(
    _auth: Authorized,
    req: HttpRequest,
    state: State,
    settings: Settings,
) -> Result<HttpResponse, ApiError> {
    let params = query_params(&req, |name| {
        matches!(
            name,
            "status" | "type" | "ready" | "limit" | "offset" | "order_by" | "desc"
        )
    })?;
    let mut filter = ListFilter {
        limit: Some(super::DEFAULT_LIST_LIMIT.min(settings.max_list_limit)),
        ..ListFilter::default()
    };
    for (name, value) in &params {
        match name.as_str() {
            "status" => {
                filter.status = Some(value.parse::<ItemStatus>().map_err(|e| {
                    ApiError::invalid_request(format!("parameter status: {}", reason(&e)))
                })?)
            }
            "type" => {
                if value.is_empty() {
                    return Err(ApiError::invalid_request("parameter type is empty"));
                }
                filter.item_type = Some(ItemType::from(value.as_str()))
            }
            "ready" => filter.ready_only = parse_bool(name, value)?,
            "desc" => filter.descending = parse_bool(name, value)?,
            "order_by" => {
                filter.order_by = value.parse::<OrderBy>().map_err(|e| {
                    ApiError::invalid_request(format!("parameter order_by: {}", reason(&e)))
                })?
            }
            "limit" => {
                let limit: usize = value.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
                    ApiError::invalid_request(format!(
                        "parameter limit: expected a whole number of at least 1, got {value:?}"
                    ))
                })?;
                filter.limit = Some(limit.min(settings.max_list_limit));
            }
            "offset" => {
                filter.offset = value.parse().map_err(|_| {
                    ApiError::invalid_request(format!(
                        "parameter offset: expected a whole number, got {value:?}"
                    ))
                })?
            }
            _ => {}
        }
    }
    let list_filter = filter.clone();
    let items = store_call(&state, move |q| q.list(&list_filter)).await?;
    let items = items
        .iter()
        .map(|item| item_json(item, false))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(HttpResponse::Ok().json(json!({
        "items": items,
        "count": items.len(),
        "limit": filter.limit,
        "offset": filter.offset,
    })))
}

/// The reason inside an `InvalidItem`, without the "invalid item:" prefix.
fn reason(err: &QueueError) -> String {
    match err {
        QueueError::InvalidItem { reason } => reason.clone(),
        other => other.to_string(),
    }
}

#[utoipa::path(get, path = "/v1/items/{id}", tag = "items",
    params(("id" = String, Path, min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$", description = "The item ID"), ("payload" = Option<String>, Query, pattern = "^(|[Tt][Rr][Uu][Ee]|1|[Yy][Ee][Ss]|[Ff][Aa][Ll][Ss][Ee]|0|[Nn][Oo])$", description = "Include the report (true, 1, yes or empty; false, 0 or no)")),
    responses(
        (status = 200, description = "The item", body = super::schema::ItemView),
        (status = 400, description = "A bad parameter or body", body = super::schema::ErrorBody), (status = 401, description = "Missing or wrong bearer token", body = super::schema::ErrorBody), (status = 404, description = "No such item", body = super::schema::ErrorBody)))]
pub(super) async fn get_item(
    _auth: Authorized,
    req: HttpRequest,
    id: web::Path<String>,
    state: State,
) -> Result<HttpResponse, ApiError> {
    let id = path_id(&id)?;
    let params = query_params(&req, |name| name == "payload")?;
    let with_payload = match params.get("payload") {
        Some(value) => parse_bool("payload", value)?,
        None => false,
    };
    let item = store_call(&state, move |q| q.get(&id)).await?;
    Ok(HttpResponse::Ok().json(item_json(&item, with_payload)?))
}

#[utoipa::path(get, path = "/v1/stats", tag = "items",
    responses(
        (status = 200, description = "Queue and worker statistics", body = super::schema::StatsView),
        (status = 401, description = "Missing or wrong bearer token", body = super::schema::ErrorBody)))]
pub(super) async fn stats(_auth: Authorized, state: State) -> Result<HttpResponse, ApiError> {
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

// ---- changes ------------------------------------------------------------

#[utoipa::path(delete, path = "/v1/items/{id}", tag = "items",
    params(("id" = String, Path, min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$", description = "The item ID")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "A bad parameter or body", body = super::schema::ErrorBody), (status = 401, description = "Missing or wrong bearer token", body = super::schema::ErrorBody), (status = 404, description = "No such item", body = super::schema::ErrorBody)))]
pub(super) async fn delete_item(
    _auth: Authorized,
    id: web::Path<String>,
    state: State,
) -> Result<HttpResponse, ApiError> {
    let id = path_id(&id)?;
    let deleted = id.clone();
    store_call(&state, move |q| q.delete(&deleted)).await?;
    tracing::info!(id = %id, "item deleted through the API");
    Ok(HttpResponse::NoContent().finish())
}

#[utoipa::path(post, path = "/v1/items/{id}/retry", tag = "items",
    params(("id" = String, Path, min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$", description = "The item ID")),
    responses(
        (status = 200, description = "The dead letter is pending again, due now", body = super::schema::ItemView),
        (status = 400, description = "A bad parameter or body", body = super::schema::ErrorBody), (status = 401, description = "Missing or wrong bearer token", body = super::schema::ErrorBody), (status = 404, description = "No such item", body = super::schema::ErrorBody),
        (status = 409, description = "The item is not a dead letter", body = super::schema::ErrorBody)))]
pub(super) async fn retry_item(
    _auth: Authorized,
    id: web::Path<String>,
    state: State,
) -> Result<HttpResponse, ApiError> {
    let id = path_id(&id)?;
    let revive_id = id.clone();
    // `revive` refuses an item that is not failed with InvalidItem; look the
    // item up on the same blocking call to name its status in a 409.
    let outcome = store_call(&state, move |q| match q.revive(&revive_id) {
        Ok(item) => Ok(Ok(item)),
        Err(QueueError::InvalidItem { .. }) => q.get(&revive_id).map(|item| Err(item.status)),
        Err(err) => Err(err),
    })
    .await?;
    match outcome {
        Ok(item) => {
            state.worker.notify_enqueued();
            tracing::info!(id = %id, "dead letter revived through the API");
            Ok(HttpResponse::Ok().json(item_json(&item, false)?))
        }
        Err(status) => Err(ApiError::not_failed(&id, status.as_str())),
    }
}

#[utoipa::path(post, path = "/v1/process-now", tag = "delivery",
    responses(
        (status = 200, description = "The round's results", body = super::schema::ProcessNowResult),
        (status = 400, description = "A bad parameter or body", body = super::schema::ErrorBody), (status = 401, description = "Missing or wrong bearer token", body = super::schema::ErrorBody), (status = 503, description = "The worker is not running", body = super::schema::ErrorBody)))]
pub(super) async fn process_now(_auth: Authorized, state: State) -> Result<HttpResponse, ApiError> {
    tracing::info!("delivery round requested through the API");
    let summary = state.worker.process_now().await?;
    Ok(HttpResponse::Ok().json(summary))
}

#[utoipa::path(post, path = "/v1/cleanup", tag = "delivery",
    params(("ttl" = Option<String>, Query, pattern = "^[1-9][0-9]{0,4}(s|m|h|d)$", description = "A duration such as 7d (default: the configured TTL)")),
    responses(
        (status = 200, description = "What was removed", body = super::schema::CleanupResult),
        (status = 400, description = "A bad parameter or body", body = super::schema::ErrorBody), (status = 401, description = "Missing or wrong bearer token", body = super::schema::ErrorBody), (status = 503, description = "The worker is not running", body = super::schema::ErrorBody)))]
pub(super) async fn cleanup(
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

#[utoipa::path(post, path = "/v1/items/retry-failed", tag = "items",
    responses(
        (status = 200, description = "Every dead letter is pending again, due now", body = super::schema::Revived),
        (status = 400, description = "A bad parameter or body", body = super::schema::ErrorBody), (status = 401, description = "Missing or wrong bearer token", body = super::schema::ErrorBody)))]
pub(super) async fn retry_failed(
    _auth: Authorized,
    req: HttpRequest,
    state: State,
) -> Result<HttpResponse, ApiError> {
    query_params(&req, |_| false)?;
    let ids = store_call(&state, |q| super::bulk::revive_failed(q)).await?;
    if !ids.is_empty() {
        state.worker.notify_enqueued();
    }
    tracing::info!(
        revived = ids.len(),
        "every dead letter revived through the API"
    );
    Ok(HttpResponse::Ok().json(json!({ "revived": ids.len(), "ids": ids })))
}

#[utoipa::path(delete, path = "/v1/items", tag = "items",
    params(("status" = crate::item::ItemStatus, Query, description = "The status to purge (required)")),
    responses(
        (status = 200, description = "Purged", body = super::schema::Purged),
        (status = 400, description = "A bad parameter or body", body = super::schema::ErrorBody), (status = 401, description = "Missing or wrong bearer token", body = super::schema::ErrorBody)))]
pub(super) async fn purge_items(
    _auth: Authorized,
    req: HttpRequest,
    state: State,
) -> Result<HttpResponse, ApiError> {
    let params = query_params(&req, |name| name == "status")?;
    // Required: a DELETE of the whole collection by accident must not empty
    // the queue.
    let value = params.get("status").ok_or_else(|| {
        ApiError::invalid_request(
            "parameter status is required (pending, processing or failed): DELETE /v1/items purges one status",
        )
    })?;
    let status = value
        .parse::<ItemStatus>()
        .map_err(|e| ApiError::invalid_request(format!("parameter status: {}", reason(&e))))?;
    let purged = store_call(&state, move |q| super::bulk::purge_status(q, status)).await?;
    tracing::info!(
        purged,
        status = status.as_str(),
        "items purged through the API"
    );
    Ok(HttpResponse::Ok().json(json!({ "purged": purged, "status": status.as_str() })))
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
    request_body(content = super::schema::PauseRequest, content_type = "application/json", description = "Optional: a reason (the body may be empty)"),
    responses(
        (status = 200, description = "Paused", body = super::schema::PauseState),
        (status = 400, description = "A bad parameter or body", body = super::schema::ErrorBody), (status = 401, description = "Missing or wrong bearer token", body = super::schema::ErrorBody), (status = 503, description = "The worker is not running", body = super::schema::ErrorBody)))]
pub(super) async fn pause(
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
        (status = 200, description = "Resumed (also ends a 401 pause and an open circuit)", body = super::schema::PauseState),
        (status = 400, description = "A bad parameter or body", body = super::schema::ErrorBody), (status = 401, description = "Missing or wrong bearer token", body = super::schema::ErrorBody), (status = 503, description = "The worker is not running", body = super::schema::ErrorBody)))]
pub(super) async fn resume(
    _auth: Authorized,
    req: HttpRequest,
    state: State,
) -> Result<HttpResponse, ApiError> {
    query_params(&req, |_| false)?;
    let answer = state.worker.resume().await?;
    tracing::info!("delivery resumed through the API");
    Ok(HttpResponse::Ok().json(answer))
}
