//! `/groups`: the customers that own hubs.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use polyhub_store::{Group, GroupPatch, ListQuery, NewGroup};
use serde::Deserialize;
use utoipa::IntoParams;

use super::{DEFAULT_LIST_LIMIT, Page, checked_id, checked_limit, fetch_size, into_page};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::state::ApiState;

/// Paging of `GET /groups`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct GroupListParams {
    /// Start after this group id (the previous page's `next`).
    after: Option<String>,
    /// Page size, 1 to 10000 (default 100).
    limit: Option<u32>,
}

/// Creates a group.
#[utoipa::path(post, path = "/groups", tag = "groups", request_body = NewGroup,
    responses(
        (status = 201, description = "The created group", body = Group),
        (status = 400, description = "Malformed request or invalid id", body = ErrorBody),
        (status = 409, description = "The id is taken", body = ErrorBody),
    ))]
pub(crate) async fn create_group(
    State(state): State<ApiState>,
    ApiJson(new_group): ApiJson<NewGroup>,
) -> Result<(StatusCode, Json<Group>), ApiError> {
    let group = state.store.create_group(new_group).await?;
    Ok((StatusCode::CREATED, Json(group)))
}

/// Lists groups ordered by id.
#[utoipa::path(get, path = "/groups", tag = "groups", params(GroupListParams),
    responses(
        (status = 200, description = "One page of groups", body = Page<Group>),
        (status = 400, description = "Bad query parameter", body = ErrorBody),
    ))]
pub(crate) async fn list_groups(
    State(state): State<ApiState>,
    ApiQuery(params): ApiQuery<GroupListParams>,
) -> Result<Json<Page<Group>>, ApiError> {
    let limit = checked_limit(params.limit, DEFAULT_LIST_LIMIT)?;
    let query = ListQuery {
        parent: None,
        after: params.after,
        limit: fetch_size(limit),
    };
    let groups = state.store.list_groups(query).await?;
    Ok(Json(into_page(groups, limit, |group| group.id.clone())))
}

/// Reads a group.
#[utoipa::path(get, path = "/groups/{id}", tag = "groups",
    params(("id" = String, Path, description = "Group id")),
    responses(
        (status = 200, description = "The group", body = Group),
        (status = 400, description = "Invalid id", body = ErrorBody),
        (status = 404, description = "No such group", body = ErrorBody),
    ))]
pub(crate) async fn get_group(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Group>, ApiError> {
    checked_id("group", &id)?;
    Ok(Json(state.store.get_group(&id).await?))
}

/// Changes a group's name or metadata.
#[utoipa::path(patch, path = "/groups/{id}", tag = "groups", request_body = GroupPatch,
    params(("id" = String, Path, description = "Group id")),
    responses(
        (status = 200, description = "The updated group", body = Group),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 404, description = "No such group", body = ErrorBody),
    ))]
pub(crate) async fn update_group(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(patch): ApiJson<GroupPatch>,
) -> Result<Json<Group>, ApiError> {
    checked_id("group", &id)?;
    Ok(Json(state.store.update_group(&id, patch).await?))
}

/// Deletes a group that owns no hubs.
#[utoipa::path(delete, path = "/groups/{id}", tag = "groups",
    params(("id" = String, Path, description = "Group id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Invalid id", body = ErrorBody),
        (status = 404, description = "No such group", body = ErrorBody),
        (status = 409, description = "The group still owns hubs", body = ErrorBody),
    ))]
pub(crate) async fn delete_group(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    checked_id("group", &id)?;
    state.store.delete_group(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
