//! Liveness, readiness, Prometheus metrics and the OpenAPI document.

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use polyhub_store::ListQuery;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::router::{OpenApiJson, openapi_response};
use crate::state::ApiState;

/// Answer of `/health` and `/ready`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StatusBody {
    /// `ok` (health) or `ready` (readiness).
    pub status: String,
}

/// Liveness: answers as long as the process serves requests.
#[utoipa::path(get, path = "/health", tag = "system",
    responses((status = 200, description = "Alive", body = StatusBody)))]
pub(crate) async fn health() -> Json<StatusBody> {
    Json(StatusBody {
        status: "ok".to_owned(),
    })
}

/// Readiness: the hub manager has started and the store answers a cheap query.
#[utoipa::path(get, path = "/ready", tag = "system",
    responses(
        (status = 200, description = "Ready", body = StatusBody),
        (status = 503, description = "Manager not started or store unreachable", body = ErrorBody),
    ))]
pub(crate) async fn ready(State(state): State<ApiState>) -> Result<Json<StatusBody>, ApiError> {
    if !state.runtime.is_ready() {
        return Err(ApiError::Unavailable(
            "the hub manager has not finished starting".to_owned(),
        ));
    }
    let probe = ListQuery {
        parent: None,
        after: None,
        limit: 1,
    };
    if let Err(error) = state.store.list_groups(probe).await {
        return Err(ApiError::Unavailable(format!(
            "the store does not answer: {error}"
        )));
    }
    Ok(Json(StatusBody {
        status: "ready".to_owned(),
    }))
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "system",
    responses(
        (status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
        (status = 404, description = "Metrics are not enabled", body = ErrorBody),
    ))]
pub(crate) async fn metrics(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let Some(handle) = &state.metrics else {
        return Err(ApiError::NotFound("metrics are not enabled".to_owned()));
    };
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response())
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(get, path = "/openapi.json", tag = "system",
    responses((status = 200, description = "The OpenAPI document", body = Object)))]
pub(crate) async fn openapi_json(Extension(document): Extension<OpenApiJson>) -> Response {
    openapi_response(&document)
}
