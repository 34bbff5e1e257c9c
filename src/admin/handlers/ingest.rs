//! `POST /v1/items`: the payload from the body, every other field from
//! query parameters or `X-Retryq-*` headers (which must agree), and the
//! enqueue through the worker when it runs, else straight to the store.

use std::collections::BTreeMap;

use actix_web::http::header::{self, HeaderMap};
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::{query_params, store_call, Settings, State};
use crate::admin::auth::Authorized;
use crate::admin::ApiError;
use crate::item::{ItemId, ItemType, NewItem, Payload};

/// The ingest parameters (everything but the payload).
#[derive(Debug, Default)]
struct IngestParams {
    item_type: Option<String>,
    fingerprint: Option<String>,
    id: Option<ItemId>,
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
                    let id = ItemId::parse(&value)
                        .map_err(|e| ApiError::invalid_request(format!("parameter id: {e}")))?;
                    params.id = Some(id)
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
        (status = 201, description = "Stored durably", body = crate::admin::schema::Created),
        (status = 400, description = "A bad parameter or body", body = crate::admin::schema::ErrorBody), (status = 401, description = "Missing or wrong bearer token", body = crate::admin::schema::ErrorBody),
        (status = 409, description = "Duplicate ID or fingerprint (existing_id names the item)", body = crate::admin::schema::ErrorBody),
        (status = 413, description = "Body over admin.max_body, or item over the store's limit", body = crate::admin::schema::ErrorBody),
        (status = 503, description = "The store is closed or in use", body = crate::admin::schema::ErrorBody),
        (status = 507, description = "The queue or the disk is full", body = crate::admin::schema::ErrorBody)))]
pub(in crate::admin) async fn ingest(
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
