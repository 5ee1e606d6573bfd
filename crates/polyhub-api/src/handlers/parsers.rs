//! Hub parsers as the manager sees them, and their recorded events.

use axum::Json;
use axum::extract::State;
use polyhub_store::{ParserEvent, ParserState, ParserStatus, now_millis};
use serde::Deserialize;
use utoipa::IntoParams;

use super::hubs::existing_hub;
use super::{DEFAULT_LIST_LIMIT, Items, checked_limit};
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
    if let Some(status) = state.runtime.parser_status(&id) {
        return Ok(Json(status));
    }
    Ok(Json(ParserStatus {
        hub_id: hub.id,
        state: ParserState::Stopped,
        isolation: hub.settings.isolation.unwrap_or_default(),
        pid: None,
        restarts: 0,
        last_error: None,
        since: now_millis(),
        devices: 0,
        messages_in: 0,
        rows_written: 0,
        dead_letters: 0,
        duplicates_skipped: 0,
        last_batch_messages: 0,
        last_lag_ms: 0,
    }))
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

/// Every parser the manager knows, ordered by hub id.
#[utoipa::path(get, path = "/parsers", tag = "hubs",
    responses((status = 200, description = "Parser statuses", body = Items<ParserStatus>)))]
pub(crate) async fn list_parsers(State(state): State<ApiState>) -> Json<Items<ParserStatus>> {
    let mut parsers = state.runtime.parsers();
    parsers.sort_by(|a, b| a.hub_id.cmp(&b.hub_id));
    Json(Items { items: parsers })
}
