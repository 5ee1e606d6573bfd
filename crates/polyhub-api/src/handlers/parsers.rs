//! Hub parsers as the manager sees them, and their recorded events.

use axum::Json;
use axum::extract::State;
use polyhub_store::{Hub, ListQuery, ParserEvent, ParserState, ParserStatus};
use serde::Deserialize;
use utoipa::IntoParams;

use super::hubs::existing_hub;
use super::{DEFAULT_LIST_LIMIT, Items, Page, checked_limit, fetch_size, into_page};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiPath, ApiQuery};
use crate::state::ApiState;

/// How many parser events `GET /hubs/{id}/parser/events` returns.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ParserEventParams {
    /// Most recent events to return, 1 to 10000 (default 100).
    limit: Option<u32>,
}

/// The hub's parser status. A hub the manager has not seen (e.g. created stopped and never
/// started) reports a `stopped` parser with zero counters.
#[utoipa::path(get, path = "/hubs/{id}/parser", tag = "hubs",
    params(("id" = String, Path, description = "Hub id")),
    responses(
        (status = 200, description = "The parser's status", body = ParserStatus),
        (status = 400, description = "Invalid id", body = ErrorBody),
        (status = 404, description = "No such hub", body = ErrorBody),
    ))]
pub(crate) async fn parser_status(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ParserStatus>, ApiError> {
    let hub = existing_hub(&state, &id).await?;
    Ok(Json(status_of(&state, hub)))
}

/// The manager's status of `hub`'s parser; a hub the manager has not seen (created stopped and
/// never started) has a `stopped` parser with zero counters.
fn status_of(state: &ApiState, hub: Hub) -> ParserStatus {
    if let Some(status) = state.runtime.parser_status(&hub.id) {
        return status;
    }
    ParserStatus {
        state: ParserState::Stopped,
        isolation: hub.settings.isolation.unwrap_or_default(),
        pid: None,
        restarts: 0,
        last_error: None,
        since: hub.updated_at,
        devices: 0,
        messages_in: 0,
        rows_written: 0,
        dead_letters: 0,
        duplicates_skipped: 0,
        last_batch_messages: 0,
        last_lag_ms: 0,
        hub_id: hub.id,
    }
}

/// The hub's parser events (started, stopped, failed, restarted), newest first.
#[utoipa::path(get, path = "/hubs/{id}/parser/events", tag = "hubs",
    params(("id" = String, Path, description = "Hub id"), ParserEventParams),
    responses(
        (status = 200, description = "Newest events first", body = Items<ParserEvent>),
        (status = 400, description = "Invalid id or limit", body = ErrorBody),
        (status = 404, description = "No such hub", body = ErrorBody),
    ))]
pub(crate) async fn parser_events(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(params): ApiQuery<ParserEventParams>,
) -> Result<Json<Items<ParserEvent>>, ApiError> {
    let limit = checked_limit(params.limit, DEFAULT_LIST_LIMIT)?;
    existing_hub(&state, &id).await?;
    let events = state.store.list_parser_events(Some(&id), limit).await?;
    Ok(Json(Items { items: events }))
}

/// Paging of `GET /parsers`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ParserListParams {
    /// Start after this hub id (the previous page's `next`).
    after: Option<String>,
    /// Page size, 1 to 10000 (default 100).
    limit: Option<u32>,
}

/// The parser of every hub in the registry, ordered by hub id: running ones as the manager
/// reports them, the others `stopped`.
#[utoipa::path(get, path = "/parsers", tag = "hubs", params(ParserListParams),
    responses(
        (status = 200, description = "One page of parser statuses", body = Page<ParserStatus>),
        (status = 400, description = "Bad query parameter", body = ErrorBody),
    ))]
pub(crate) async fn list_parsers(
    State(state): State<ApiState>,
    ApiQuery(params): ApiQuery<ParserListParams>,
) -> Result<Json<Page<ParserStatus>>, ApiError> {
    let limit = checked_limit(params.limit, DEFAULT_LIST_LIMIT)?;
    let query = ListQuery {
        parent: None,
        after: params.after,
        limit: fetch_size(limit),
    };
    let hubs = state.store.list_hubs(query).await?;
    let statuses = hubs.into_iter().map(|hub| status_of(&state, hub)).collect();
    Ok(Json(into_page(statuses, limit, |status: &ParserStatus| {
        status.hub_id.clone()
    })))
}
