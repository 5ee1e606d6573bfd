//! Extractors that turn axum's plain-text rejections into [`ApiError`]s, so a malformed body,
//! path or query string gets the same JSON error shape as every other failure.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A JSON request body; unknown fields and syntax errors are `400 invalid_request`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

/// A query string; unknown or malformed parameters are `400 invalid_request`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

/// Path parameters; undecodable ones are `400 invalid_request`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_rejection_to_error(&rejection)),
        }
    }
}

fn json_rejection_to_error(rejection: &JsonRejection) -> ApiError {
    let message = rejection.body_text();
    match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(message),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(message),
        // axum answers a well-formed body of the wrong shape with 422; the contract says 400
        // for every malformed body, whatever the reason.
        _ => ApiError::InvalidRequest(message),
    }
}

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(query_rejection_to_error(&rejection)),
        }
    }
}

fn query_rejection_to_error(rejection: &QueryRejection) -> ApiError {
    ApiError::InvalidRequest(rejection.body_text())
}

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(rejection) => Err(path_rejection_to_error(&rejection)),
        }
    }
}

fn path_rejection_to_error(rejection: &PathRejection) -> ApiError {
    match rejection.status() {
        status if status.is_server_error() => ApiError::Internal(rejection.body_text()),
        _ => ApiError::InvalidRequest(rejection.body_text()),
    }
}
