//! Stored items: list, get, delete, revive one or every dead letter, and
//! purge a status.

use actix_web::error::QueryPayloadError;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use serde_json::json;

use super::{
    flag, item_json, parse_bool, path_id, query_params, reason, store_call, Settings, State,
};
use crate::admin::auth::Authorized;
use crate::admin::ApiError;
use crate::error::QueueError;
use crate::item::{ItemStatus, ItemType};
use crate::store::{ListFilter, OrderBy};

#[utoipa::path(get, path = "/v1/items", tag = "items",
    params(
        ("status" = Option<crate::item::ItemStatus>, Query),
        ("type" = Option<String>, Query, min_length = 1),
        ("ready" = Option<String>, Query, pattern = "^(|[Tt][Rr][Uu][Ee]|1|[Yy][Ee][Ss]|[Ff][Aa][Ll][Ss][Ee]|0|[Nn][Oo])$", description = "Only pending items due now (true, 1, yes or empty; false, 0 or no)"),
        ("limit" = Option<usize>, Query, minimum = 1, maximum = 18446744073709551615_u64, description = "Page size (default 100, capped)"),
        ("offset" = Option<usize>, Query, maximum = 18446744073709551615_u64),
        ("order_by" = Option<crate::admin::schema::OrderByParam>, Query),
        ("desc" = Option<String>, Query, pattern = "^(|[Tt][Rr][Uu][Ee]|1|[Yy][Ee][Ss]|[Ff][Aa][Ll][Ss][Ee]|0|[Nn][Oo])$", description = "Descending (true, 1, yes or empty; false, 0 or no)"),
    ),
    responses(
        (status = 200, description = "A page of items, without payloads", body = crate::admin::schema::ItemPage),
        (status = 400, description = "A bad parameter or body", body = crate::admin::schema::ErrorBody), (status = 401, description = "Missing or wrong bearer token", body = crate::admin::schema::ErrorBody)))]
pub(in crate::admin) async fn list_items(
    _auth: Authorized,
    req: HttpRequest,
    state: State,
    settings: Settings,
) -> Result<HttpResponse, ApiError> {
    let mut filter = list_filter(req.query_string())?;
    filter.limit = Some(
        filter
            .limit
            .unwrap_or(crate::admin::DEFAULT_LIST_LIMIT)
            .min(settings.max_list_limit),
    );
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

/// `GET /v1/items`'s query string as the store's filter, `limit` as given
/// (`None` when absent: the caller applies the default and the cap). An
/// unknown or repeated parameter, or a bad value, is a 400 naming it.
fn list_filter(query: &str) -> Result<ListFilter, ApiError> {
    match web::Query::<ListParams>::from_query(query) {
        Ok(params) => Ok(params.into_inner().0),
        Err(QueryPayloadError::Deserialize(err)) => Err(ApiError::invalid_request(format!(
            "bad query string: {err}"
        ))),
        Err(err) => Err(ApiError::invalid_request(format!(
            "bad query string: {err}"
        ))),
    }
}

/// The query string read by serde straight into [`ListFilter`], through
/// [`ListQuery`].
#[derive(Deserialize)]
#[serde(transparent)]
struct ListParams(#[serde(deserialize_with = "ListQuery::deserialize")] ListFilter);

/// [`ListFilter`]'s fields under the API's parameter names (`type`,
/// `ready`, `desc`), as a serde remote definition: the names belong to the
/// API, not the store, and the derive stops compiling if the filter gains
/// or changes a field this does not mirror. Each field has a reader of its
/// own because serde_urlencoded's errors for a bad value do not name the
/// field; serde's own errors for an unknown or repeated one do.
#[derive(Deserialize)]
#[serde(remote = "ListFilter", deny_unknown_fields)]
struct ListQuery {
    #[serde(default, deserialize_with = "status_param")]
    status: Option<ItemStatus>,
    #[serde(rename = "type", default, deserialize_with = "type_param")]
    item_type: Option<ItemType>,
    #[serde(rename = "ready", default, deserialize_with = "ready_param")]
    ready_only: bool,
    #[serde(default, deserialize_with = "order_by_param")]
    order_by: OrderBy,
    #[serde(rename = "desc", default, deserialize_with = "desc_param")]
    descending: bool,
    #[serde(default, deserialize_with = "offset_param")]
    offset: usize,
    #[serde(default, deserialize_with = "limit_param")]
    limit: Option<usize>,
}

/// One parameter's text, parsed by `parse`, whose refusal becomes the
/// deserializer's error as it is (it names the parameter).
fn param<'de, D, T>(de: D, parse: impl FnOnce(&str) -> Result<T, String>) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    let value = String::deserialize(de)?;
    parse(&value).map_err(D::Error::custom)
}

fn status_param<'de, D: Deserializer<'de>>(de: D) -> Result<Option<ItemStatus>, D::Error> {
    param(de, |value| {
        value
            .parse::<ItemStatus>()
            .map(Some)
            .map_err(|e| format!("parameter status: {}", reason(&e)))
    })
}

fn type_param<'de, D: Deserializer<'de>>(de: D) -> Result<Option<ItemType>, D::Error> {
    param(de, |value| {
        if value.is_empty() {
            return Err("parameter type is empty".to_owned());
        }
        Ok(Some(ItemType::from(value)))
    })
}

fn ready_param<'de, D: Deserializer<'de>>(de: D) -> Result<bool, D::Error> {
    param(de, |value| flag("ready", value))
}

fn desc_param<'de, D: Deserializer<'de>>(de: D) -> Result<bool, D::Error> {
    param(de, |value| flag("desc", value))
}

fn order_by_param<'de, D: Deserializer<'de>>(de: D) -> Result<OrderBy, D::Error> {
    param(de, |value| {
        value
            .parse::<OrderBy>()
            .map_err(|e| format!("parameter order_by: {}", reason(&e)))
    })
}

fn offset_param<'de, D: Deserializer<'de>>(de: D) -> Result<usize, D::Error> {
    param(de, |value| {
        value
            .parse()
            .map_err(|_| format!("parameter offset: expected a whole number, got {value:?}"))
    })
}

fn limit_param<'de, D: Deserializer<'de>>(de: D) -> Result<Option<usize>, D::Error> {
    param(de, |value| match value.parse::<usize>() {
        Ok(limit) if limit >= 1 => Ok(Some(limit)),
        _ => Err(format!(
            "parameter limit: expected a whole number of at least 1, got {value:?}"
        )),
    })
}

#[utoipa::path(get, path = "/v1/items/{id}", tag = "items",
    params(("id" = String, Path, min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$", description = "The item ID"), ("payload" = Option<String>, Query, pattern = "^(|[Tt][Rr][Uu][Ee]|1|[Yy][Ee][Ss]|[Ff][Aa][Ll][Ss][Ee]|0|[Nn][Oo])$", description = "Include the report (true, 1, yes or empty; false, 0 or no)")),
    responses(
        (status = 200, description = "The item", body = crate::admin::schema::ItemView),
        (status = 400, description = "A bad parameter or body", body = crate::admin::schema::ErrorBody), (status = 401, description = "Missing or wrong bearer token", body = crate::admin::schema::ErrorBody), (status = 404, description = "No such item", body = crate::admin::schema::ErrorBody)))]
pub(in crate::admin) async fn get_item(
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

#[utoipa::path(delete, path = "/v1/items/{id}", tag = "items",
    params(("id" = String, Path, min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$", description = "The item ID")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "A bad parameter or body", body = crate::admin::schema::ErrorBody), (status = 401, description = "Missing or wrong bearer token", body = crate::admin::schema::ErrorBody), (status = 404, description = "No such item", body = crate::admin::schema::ErrorBody)))]
pub(in crate::admin) async fn delete_item(
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
        (status = 200, description = "The dead letter is pending again, due now", body = crate::admin::schema::ItemView),
        (status = 400, description = "A bad parameter or body", body = crate::admin::schema::ErrorBody), (status = 401, description = "Missing or wrong bearer token", body = crate::admin::schema::ErrorBody), (status = 404, description = "No such item", body = crate::admin::schema::ErrorBody),
        (status = 409, description = "The item is not a dead letter", body = crate::admin::schema::ErrorBody)))]
pub(in crate::admin) async fn retry_item(
    _auth: Authorized,
    id: web::Path<String>,
    state: State,
) -> Result<HttpResponse, ApiError> {
    let id = path_id(&id)?;
    let revive_id = id.clone();
    // One call: the refusal itself names the status the item was in.
    let item = store_call(&state, move |q| match q.revive(&revive_id) {
        Err(QueueError::WrongState { id, status, .. }) => {
            Ok(Err(ApiError::not_failed(&id, status)))
        }
        other => other.map(Ok),
    })
    .await??;
    state.worker.notify_enqueued();
    tracing::info!(id = %id, "dead letter revived through the API");
    Ok(HttpResponse::Ok().json(item_json(&item, false)?))
}

#[utoipa::path(post, path = "/v1/items/retry-failed", tag = "items",
    responses(
        (status = 200, description = "Every dead letter is pending again, due now", body = crate::admin::schema::Revived),
        (status = 400, description = "A bad parameter or body", body = crate::admin::schema::ErrorBody), (status = 401, description = "Missing or wrong bearer token", body = crate::admin::schema::ErrorBody)))]
pub(in crate::admin) async fn retry_failed(
    _auth: Authorized,
    req: HttpRequest,
    state: State,
) -> Result<HttpResponse, ApiError> {
    query_params(&req, |_| false)?;
    let ids = store_call(&state, |q| crate::admin::bulk::revive_failed(q)).await?;
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
        (status = 200, description = "Purged", body = crate::admin::schema::Purged),
        (status = 400, description = "A bad parameter or body", body = crate::admin::schema::ErrorBody), (status = 401, description = "Missing or wrong bearer token", body = crate::admin::schema::ErrorBody)))]
pub(in crate::admin) async fn purge_items(
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
    let purged = store_call(&state, move |q| crate::admin::bulk::purge_status(q, status)).await?;
    tracing::info!(
        purged,
        status = status.as_str(),
        "items purged through the API"
    );
    Ok(HttpResponse::Ok().json(json!({ "purged": purged, "status": status.as_str() })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(query: &str) -> String {
        let err = list_filter(query).expect_err(query);
        assert_eq!(err.status, 400, "{query}: {err}");
        err.message
    }

    #[test]
    fn the_api_names_fill_the_store_filter() {
        let filter = list_filter(
            "status=failed&type=assets&ready&order_by=attempts&desc=no&offset=3&limit=7",
        )
        .unwrap();
        assert_eq!(
            filter,
            ListFilter {
                status: Some(ItemStatus::Failed),
                item_type: Some(ItemType::from("assets")),
                ready_only: true,
                order_by: OrderBy::Attempts,
                descending: false,
                offset: 3,
                limit: Some(7),
            }
        );
        // Absent parameters leave the filter's defaults; `limit` is left
        // to the handler's default and cap.
        assert_eq!(list_filter("").unwrap(), ListFilter::default());
    }

    #[test]
    fn a_bad_value_is_refused_naming_its_parameter() {
        for (query, says) in [
            ("status=lost", "parameter status: unknown status \"lost\""),
            ("type=", "parameter type is empty"),
            ("ready=maybe", "parameter ready: expected true or false"),
            ("desc=2", "parameter desc: expected true or false"),
            (
                "order_by=size",
                "parameter order_by: unknown order \"size\"",
            ),
            ("offset=x", "parameter offset: expected a whole number"),
            (
                "limit=0",
                "parameter limit: expected a whole number of at least 1",
            ),
            (
                "limit=-1",
                "parameter limit: expected a whole number of at least 1",
            ),
        ] {
            let message = refusal(query);
            assert!(message.contains(says), "{query}: {message}");
        }
    }

    #[test]
    fn an_unknown_or_repeated_parameter_is_refused_by_name() {
        let message = refusal("sort=id");
        assert!(message.contains("unknown field `sort`"), "{message}");
        let message = refusal("status=failed&status=pending");
        assert!(message.contains("duplicate field `status`"), "{message}");
        let message = refusal("ready=1&ready=0");
        assert!(message.contains("duplicate field `ready`"), "{message}");
    }
}
