//! The API's error responses: one JSON shape for every failure, and the
//! mapping from store and worker errors to HTTP statuses.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use super::ControlError;
use crate::error::QueueError;
use crate::store::postgres::PgUnavailable;

/// An API failure, answered as `{"error": kind, "message": ..., "existing_id"?: ...}`.
///
/// Kinds: the store's ([`QueueError::kind`]: `queue_full` and `disk_full`
/// 507, `queue_closed` and `store_in_use` 503, `item_not_found` 404,
/// `duplicate_item` and `wrong_state` 409, `invalid_item` 400, `too_large`
/// 413, `corrupt`, `storage` and `internal` 500, but `storage` 503 when a
/// shared PostgreSQL server is down or failing) and the API's own:
/// `invalid_request` 400, `unauthorized` 401, `not_found` 404, `not_failed`
/// 409, `worker_unavailable` 503, `worker_error` and `internal` 500.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{error}: {message}")]
pub struct ApiError {
    /// The response's status code; not in the body, which the client already has it for.
    #[serde(skip)]
    pub status: u16,
    /// A snake_case kind clients may match on (`not_found`, `queue_full`, ...); it never changes for a case.
    pub error: &'static str,
    /// What went wrong, for a person.
    pub message: String,
    /// For a duplicate: the ID of the item already queued.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub existing_id: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, error: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: status.as_u16(),
            error,
            message: message.into(),
            existing_id: None,
        }
    }

    /// 400 for a bad parameter, header or body.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 404 for a path that names no endpoint.
    pub fn no_route(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no endpoint at {path}"),
        )
    }

    /// 413 for a body over the limit.
    pub fn body_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the request body exceeds the limit of {limit} bytes"),
        )
    }

    /// 409 for a retry of an item that is not a dead letter.
    pub fn not_failed(id: &str, status: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "not_failed",
            format!("item {id} is {status}, only failed items (dead letters) can be retried"),
        )
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    fn status_code_or_500(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl From<QueueError> for ApiError {
    fn from(err: QueueError) -> Self {
        let status = match &err {
            QueueError::QueueFull { .. } | QueueError::DiskFull { .. } => {
                StatusCode::INSUFFICIENT_STORAGE
            }
            QueueError::StoreInUse { .. } => StatusCode::SERVICE_UNAVAILABLE,
            QueueError::QueueClosed => StatusCode::SERVICE_UNAVAILABLE,
            QueueError::ItemNotFound { .. } => StatusCode::NOT_FOUND,
            QueueError::DuplicateItem { .. } | QueueError::WrongState { .. } => {
                StatusCode::CONFLICT
            }
            QueueError::InvalidItem { .. } => StatusCode::BAD_REQUEST,
            QueueError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            // A shared database that is down or failing over: the caller
            // should retry, as for a closed store.
            QueueError::Storage { source, .. } if source.is::<PgUnavailable>() => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            // The daemon's store was opened before the API started, so
            // its options are never at fault in a request.
            QueueError::Corrupt { .. }
            | QueueError::InvalidOptions(_)
            | QueueError::Storage { .. }
            | QueueError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(kind = err.kind(), error = %err, "admin API: store failure");
        }
        let mut api = ApiError::new(status, err.kind(), err.to_string());
        if let QueueError::DuplicateItem { existing_id } = err {
            api.existing_id = Some(existing_id);
        }
        api
    }
}

impl From<ControlError> for ApiError {
    fn from(err: ControlError) -> Self {
        match err {
            ControlError::NotRunning => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "worker_unavailable",
                "the worker is not running",
            ),
            ControlError::Queue(err) => err.into(),
            ControlError::Other(message) => {
                tracing::error!(%message, "admin API: worker failure");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "worker_error", message)
            }
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status_code_or_500()
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code_or_500());
        if self.status == StatusCode::UNAUTHORIZED.as_u16() {
            response.insert_header((header::WWW_AUTHENTICATE, "Bearer realm=\"retryq\""));
        }
        response.json(self)
    }
}
