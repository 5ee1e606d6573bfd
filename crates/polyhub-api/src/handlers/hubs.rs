//! `/hubs`: hubs, their parsers' lifecycle and their devices' presence.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use polyhub_store::{
    DesiredState, Hub, HubPatch, ListQuery, NewHub, ParserState, ParserStatus, Presence,
};
use serde::Deserialize;
use utoipa::IntoParams;

use super::{DEFAULT_LIST_LIMIT, Items, Page, checked_id, checked_limit, fetch_size, into_page};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::runtime::RuntimeError;
use crate::state::ApiState;

/// Filter and paging of `GET /hubs`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct HubListParams {
    /// Only the hubs of this group.
    group: Option<String>,
    /// Start after this hub id (the previous page's `next`).
    after: Option<String>,
    /// Page size, 1 to 10000 (default 100).
    limit: Option<u32>,
}

/// Creates a hub; its parser starts at once unless `desired_state` is `stopped`.
///
/// If the hub is stored but its parser fails to start, the answer is an error and the hub stays
/// created (the manager retries it like any failed parser).
#[utoipa::path(post, path = "/hubs", tag = "hubs", request_body = NewHub,
    responses(
        (status = 201, description = "The created hub", body = Hub),
        (status = 400, description = "Malformed request or invalid id", body = ErrorBody),
        (status = 409, description = "The id is taken or the group does not exist", body = ErrorBody),
        (status = 500, description = "Created, but its parser failed to start", body = ErrorBody),
        (status = 503, description = "Created, but its parser was busy and did not start", body = ErrorBody),
    ))]
pub(crate) async fn create_hub(
    State(state): State<ApiState>,
    ApiJson(new_hub): ApiJson<NewHub>,
) -> Result<(StatusCode, Json<Hub>), ApiError> {
    let hub = state.store.create_hub(new_hub).await?;
    if hub.desired_state == DesiredState::Running {
        state
            .runtime
            .start_hub(&hub.id)
            .await
            .map_err(|error| created_but("hub", &hub.id, "its parser did not start", error))?;
    }
    Ok((StatusCode::CREATED, Json(hub)))
}

/// Explains that the item was stored although the runtime step after it failed. The request
/// itself was fine, so the answer is always a 5xx: 503 when the parser was busy (`Conflict`,
/// e.g. shutting down), 500 otherwise.
pub(crate) fn created_but(kind: &str, id: &str, what: &str, error: RuntimeError) -> ApiError {
    let error = match error {
        RuntimeError::Conflict(message) => ApiError::Unavailable(message),
        RuntimeError::NotFound(message)
        | RuntimeError::Invalid(message)
        | RuntimeError::PayloadTooLarge(message)
        | RuntimeError::Failed(message) => ApiError::Internal(message),
    };
    error.with_context(&format!("{kind} {id:?} was created but {what}"))
}

/// Lists hubs ordered by id.
#[utoipa::path(get, path = "/hubs", tag = "hubs", params(HubListParams),
    responses(
        (status = 200, description = "One page of hubs", body = Page<Hub>),
        (status = 400, description = "Bad query parameter", body = ErrorBody),
    ))]
pub(crate) async fn list_hubs(
    State(state): State<ApiState>,
    ApiQuery(params): ApiQuery<HubListParams>,
) -> Result<Json<Page<Hub>>, ApiError> {
    let limit = checked_limit(params.limit, DEFAULT_LIST_LIMIT)?;
    if let Some(group) = &params.group {
        checked_id("group", group)?;
    }
    let query = ListQuery {
        parent: params.group,
        after: params.after,
        limit: fetch_size(limit),
    };
    let hubs = state.store.list_hubs(query).await?;
    Ok(Json(into_page(hubs, limit, |hub| hub.id.clone())))
}

/// Reads a hub.
#[utoipa::path(get, path = "/hubs/{id}", tag = "hubs",
    params(("id" = String, Path, description = "Hub id")),
    responses(
        (status = 200, description = "The hub", body = Hub),
        (status = 400, description = "Invalid id", body = ErrorBody),
        (status = 404, description = "No such hub", body = ErrorBody),
    ))]
pub(crate) async fn get_hub(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Hub>, ApiError> {
    checked_id("hub", &id)?;
    Ok(Json(state.store.get_hub(&id).await?))
}

/// Changes a hub's name, metadata or settings. New settings restart a parser that is not
/// stopped, so they take effect at once.
#[utoipa::path(patch, path = "/hubs/{id}", tag = "hubs", request_body = HubPatch,
    params(("id" = String, Path, description = "Hub id")),
    responses(
        (status = 200, description = "The updated hub", body = Hub),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 404, description = "No such hub", body = ErrorBody),
        (status = 500, description = "Saved, but the parser failed to restart", body = ErrorBody),
    ))]
pub(crate) async fn update_hub(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(patch): ApiJson<HubPatch>,
) -> Result<Json<Hub>, ApiError> {
    checked_id("hub", &id)?;
    let before = state.store.get_hub(&id).await?;
    let hub = state.store.update_hub(&id, patch).await?;
    let parser_active = state
        .runtime
        .parser_status(&id)
        .is_some_and(|status| status.state != ParserState::Stopped);
    if hub.settings != before.settings && parser_active {
        state.runtime.restart_hub(&id).await.map_err(|error| {
            ApiError::from(error).with_context(&format!(
                "hub {id:?} was updated but its parser did not restart with the new settings"
            ))
        })?;
    }
    Ok(Json(hub))
}

/// Deletes a hub that owns no devices, stopping its parser first.
#[utoipa::path(delete, path = "/hubs/{id}", tag = "hubs",
    params(("id" = String, Path, description = "Hub id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Invalid id", body = ErrorBody),
        (status = 404, description = "No such hub", body = ErrorBody),
        (status = 409, description = "The hub still owns devices", body = ErrorBody),
    ))]
pub(crate) async fn delete_hub(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    checked_id("hub", &id)?;
    let hub = state.store.get_hub(&id).await?;
    // Checked before stopping the parser, so that a refused delete leaves ingest untouched.
    let owned = ListQuery {
        parent: Some(id.clone()),
        after: None,
        limit: 1,
    };
    if !state.store.list_devices(owned).await?.is_empty() {
        return Err(ApiError::Conflict(format!("hub {id:?} still owns devices")));
    }
    match state.runtime.stop_hub(&id).await {
        Ok(_) | Err(RuntimeError::NotFound(_)) => {}
        Err(error) => return Err(error.into()),
    }
    if let Err(error) = state.store.delete_hub(&id).await {
        // A device may have been added since the check: put the parser back as it was.
        if hub.desired_state == DesiredState::Running
            && let Err(restart_error) = state.runtime.start_hub(&id).await
        {
            tracing::warn!(hub = %id, error = %restart_error, "cannot restart the parser of a hub that was not deleted");
        }
        return Err(error.into());
    }
    if let Err(error) = state.runtime.hub_deleted(&id).await {
        // Deleted all the same: what is left is a broker session nobody will resume.
        tracing::warn!(hub = %id, %error, "the deleted hub's parser session was not discarded");
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Starts the hub's parser (desired state becomes `running`).
#[utoipa::path(post, path = "/hubs/{id}/start", tag = "hubs",
    params(("id" = String, Path, description = "Hub id")),
    responses(
        (status = 200, description = "The parser's status", body = ParserStatus),
        (status = 404, description = "No such hub", body = ErrorBody),
        (status = 409, description = "The parser cannot start now", body = ErrorBody),
        (status = 500, description = "The parser failed", body = ErrorBody),
    ))]
pub(crate) async fn start_hub(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ParserStatus>, ApiError> {
    existing_hub(&state, &id).await?;
    Ok(Json(state.runtime.start_hub(&id).await?))
}

/// Stops the hub's parser after it commits what it received (desired state `stopped`).
#[utoipa::path(post, path = "/hubs/{id}/stop", tag = "hubs",
    params(("id" = String, Path, description = "Hub id")),
    responses(
        (status = 200, description = "The parser's status", body = ParserStatus),
        (status = 404, description = "No such hub", body = ErrorBody),
        (status = 409, description = "The parser cannot stop now", body = ErrorBody),
        (status = 500, description = "The parser failed", body = ErrorBody),
    ))]
pub(crate) async fn stop_hub(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ParserStatus>, ApiError> {
    existing_hub(&state, &id).await?;
    Ok(Json(state.runtime.stop_hub(&id).await?))
}

/// Restarts the hub's parser.
#[utoipa::path(post, path = "/hubs/{id}/restart", tag = "hubs",
    params(("id" = String, Path, description = "Hub id")),
    responses(
        (status = 200, description = "The parser's status", body = ParserStatus),
        (status = 404, description = "No such hub", body = ErrorBody),
        (status = 409, description = "The parser cannot restart now", body = ErrorBody),
        (status = 500, description = "The parser failed", body = ErrorBody),
    ))]
pub(crate) async fn restart_hub(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ParserStatus>, ApiError> {
    existing_hub(&state, &id).await?;
    Ok(Json(state.runtime.restart_hub(&id).await?))
}

/// Presence of every device of the hub, ordered by device id.
#[utoipa::path(get, path = "/hubs/{id}/presence", tag = "hubs",
    params(("id" = String, Path, description = "Hub id")),
    responses(
        (status = 200, description = "Presence of the hub's devices", body = Items<Presence>),
        (status = 404, description = "No such hub", body = ErrorBody),
    ))]
pub(crate) async fn hub_presence(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Items<Presence>>, ApiError> {
    existing_hub(&state, &id).await?;
    Ok(Json(Items {
        items: state.store.list_presence(&id).await?,
    }))
}

/// The stored hub `id`: 400 for a malformed id, 404 for an unknown one.
pub(crate) async fn existing_hub(state: &ApiState, id: &str) -> Result<Hub, ApiError> {
    checked_id("hub", id)?;
    Ok(state.store.get_hub(id).await?)
}
