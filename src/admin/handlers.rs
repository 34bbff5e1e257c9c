//! The API's request handlers, one file a concern: [`health`] (probes,
//! metrics and statistics), [`ingest`] (`POST /v1/items`), [`items`]
//! (reading and changing stored items) and [`control`] (the worker:
//! delivery rounds, cleanup, pause). This file owns the routing table and
//! what they all share: store calls on the blocking pool, query and path
//! parameters, and the item view.
//!
//! The handlers are re-exported here with globs so that `super::openapi`
//! names them `handlers::NAME`: utoipa's `paths(...)` also needs the
//! hidden `__path_NAME` type each annotation generates, which a glob brings
//! along and a list of names would have to spell out.

mod control;
mod health;
mod ingest;
mod items;

use std::collections::BTreeMap;
use std::sync::Arc;

use actix_web::http::header;
use actix_web::{guard, web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use super::{AdminState, ApiError, ApiSettings};
use crate::error::{QueueError, QueueResult};
use crate::item::{ItemId, QueueItem};
use crate::store::RetryQueue;

pub(super) use control::*;
pub(super) use health::*;
pub(super) use ingest::*;
pub(super) use items::*;

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
    flag(name, value).map_err(ApiError::invalid_request)
}

/// [`parse_bool`]'s rule, its refusal as text (a serde field reader raises
/// it as its own error).
fn flag(name: &str, value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "" | "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(format!(
            "parameter {name}: expected true or false, got {value:?}"
        )),
    }
}

/// An item ID from the path, validated.
fn path_id(id: &str) -> Result<ItemId, ApiError> {
    ItemId::parse(id).map_err(|e| ApiError::invalid_request(format!("path id: {e}")))
}

/// An item as JSON (the seed's field names), without its report unless asked.
fn item_json(item: &QueueItem, with_payload: bool) -> Result<Value, ApiError> {
    item.view_json(with_payload)
        .map_err(|e| ApiError::internal(format!("cannot serialize item {}: {e}", item.id)))
}

/// The reason inside an `InvalidItem`, without the "invalid item:" prefix.
fn reason(err: &QueueError) -> String {
    match err {
        QueueError::InvalidItem { reason } => reason.clone(),
        other => other.to_string(),
    }
}
