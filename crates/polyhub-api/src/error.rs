//! The API's one error type and its JSON form.
//!
//! Every failure of every route becomes an [`ApiError`], and [`ApiError`] alone decides the
//! status and the stable `code`, so clients can rely on the mapping:
//! `{"error": {"code": "...", "message": "..."}}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use polyhub_store::StoreError;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::runtime::RuntimeError;

/// Why a request failed. Each variant has one status and one stable code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The caller's request is malformed: bad JSON, unknown field, bad id, bad query parameter
    /// (400 `invalid_request`).
    #[error("{0}")]
    InvalidRequest(String),
    /// The request body is larger than `[http] max_body_bytes`, or a part of it is larger than
    /// its own limit (a command payload) (413 `invalid_request`).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The request body is not declared as JSON (415 `invalid_request`).
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The addressed item or route does not exist (404 `not_found`).
    #[error("{0}")]
    NotFound(String),
    /// The route exists but not with this method (405 `invalid_request`).
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The request conflicts with stored state (409 `conflict`).
    #[error("{0}")]
    Conflict(String),
    /// Storage or the hub manager cannot serve the request now; retrying may succeed
    /// (503 `unavailable`).
    #[error("{0}")]
    Unavailable(String),
    /// Something failed on our side (500 `internal`).
    #[error("{0}")]
    Internal(String),
}

/// The stable, machine-readable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed (4xx other than 404/409).
    InvalidRequest,
    /// No such item or route.
    NotFound,
    /// The request conflicts with stored state.
    Conflict,
    /// Temporarily unable to serve; retry later.
    Unavailable,
    /// A failure on the server's side.
    Internal,
}

/// The JSON body of every error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The code and message of an error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code to branch on.
    pub code: ErrorCode,
    /// Human-readable explanation; its wording may change.
    pub message: String,
}

impl ApiError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code clients branch on.
    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::InvalidRequest(_)
            | ApiError::PayloadTooLarge(_)
            | ApiError::UnsupportedMediaType(_)
            | ApiError::MethodNotAllowed(_) => ErrorCode::InvalidRequest,
            ApiError::NotFound(_) => ErrorCode::NotFound,
            ApiError::Conflict(_) => ErrorCode::Conflict,
            ApiError::Unavailable(_) => ErrorCode::Unavailable,
            ApiError::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The same error with `context` put in front of its message (e.g. what was already done
    /// when the failing step ran).
    pub fn with_context(self, context: &str) -> Self {
        let wrap = |message: String| format!("{context}: {message}");
        match self {
            ApiError::InvalidRequest(message) => ApiError::InvalidRequest(wrap(message)),
            ApiError::PayloadTooLarge(message) => ApiError::PayloadTooLarge(wrap(message)),
            ApiError::UnsupportedMediaType(message) => {
                ApiError::UnsupportedMediaType(wrap(message))
            }
            ApiError::NotFound(message) => ApiError::NotFound(wrap(message)),
            ApiError::MethodNotAllowed(message) => ApiError::MethodNotAllowed(wrap(message)),
            ApiError::Conflict(message) => ApiError::Conflict(wrap(message)),
            ApiError::Unavailable(message) => ApiError::Unavailable(wrap(message)),
            ApiError::Internal(message) => ApiError::Internal(wrap(message)),
        }
    }

    /// The JSON body of this error.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
            },
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound(message) => ApiError::NotFound(message),
            StoreError::Conflict(message) => ApiError::Conflict(message),
            StoreError::Invalid(message) => ApiError::InvalidRequest(message),
            error @ StoreError::Unavailable(_) => ApiError::Unavailable(error.to_string()),
            error @ StoreError::Backend(_) => ApiError::Internal(error.to_string()),
        }
    }
}

impl From<RuntimeError> for ApiError {
    fn from(error: RuntimeError) -> Self {
        match error {
            RuntimeError::NotFound(message) => ApiError::NotFound(message),
            RuntimeError::Conflict(message) => ApiError::Conflict(message),
            RuntimeError::Invalid(message) => ApiError::InvalidRequest(message),
            RuntimeError::PayloadTooLarge(message) => ApiError::PayloadTooLarge(message),
            RuntimeError::Failed(message) => ApiError::Internal(message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        // Our own failures are worth an operator's attention; the caller's mistakes are not.
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self, "request failed");
        }
        (status, Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_to_documented_statuses() {
        let cases = [
            (StoreError::NotFound("x".into()), 404, ErrorCode::NotFound),
            (StoreError::Conflict("x".into()), 409, ErrorCode::Conflict),
            (
                StoreError::Invalid("x".into()),
                400,
                ErrorCode::InvalidRequest,
            ),
            (
                StoreError::Unavailable("x".into()),
                503,
                ErrorCode::Unavailable,
            ),
            (StoreError::Backend("x".into()), 500, ErrorCode::Internal),
        ];
        for (store_error, status, code) in cases {
            let error = ApiError::from(store_error);
            assert_eq!(error.status().as_u16(), status);
            assert_eq!(error.code(), code);
        }
    }

    #[test]
    fn runtime_errors_map_to_documented_statuses() {
        let cases = [
            (RuntimeError::NotFound("x".into()), 404),
            (RuntimeError::Conflict("x".into()), 409),
            (RuntimeError::Invalid("x".into()), 400),
            (RuntimeError::PayloadTooLarge("x".into()), 413),
            (RuntimeError::Failed("x".into()), 500),
        ];
        for (runtime_error, status) in cases {
            assert_eq!(ApiError::from(runtime_error).status().as_u16(), status);
        }
    }

    #[test]
    fn body_has_the_contract_shape() {
        let body = serde_json::to_value(ApiError::Conflict("taken".into()).body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": {"code": "conflict", "message": "taken"}})
        );
    }
}
