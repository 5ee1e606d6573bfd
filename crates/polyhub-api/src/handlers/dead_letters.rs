//! `/dead-letters`: messages that could not be ingested, with the reason.

use axum::Json;
use axum::extract::State;
use polyhub_store::DeadLetter;
use serde::Deserialize;
use utoipa::IntoParams;

use super::{DEFAULT_LIST_LIMIT, Page, checked_id, checked_limit, fetch_size, into_page};
use crate::error::{ApiError, ErrorBody};
use crate::extract::ApiQuery;
use crate::state::ApiState;

/// Filter and paging of `GET /dead-letters`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct DeadLetterParams {
    /// Only this hub's dead letters.
    hub: Option<String>,
    /// Only dead letters with a smaller id (the previous page's `next`).
    before: Option<i64>,
    /// Page size, 1 to 10000 (default 100).
    limit: Option<u32>,
}

/// Dead letters, newest first, paged backwards by id.
#[utoipa::path(get, path = "/dead-letters", tag = "dead_letters", params(DeadLetterParams),
    responses(
        (status = 200, description = "One page of dead letters, newest first", body = Page<DeadLetter>),
        (status = 400, description = "Bad query parameter", body = ErrorBody),
    ))]
pub(crate) async fn list_dead_letters(
    State(state): State<ApiState>,
    ApiQuery(params): ApiQuery<DeadLetterParams>,
) -> Result<Json<Page<DeadLetter>>, ApiError> {
    let limit = checked_limit(params.limit, DEFAULT_LIST_LIMIT)?;
    if let Some(hub) = &params.hub {
        checked_id("hub", hub)?;
    }
    let letters = state
        .store
        .list_dead_letters(params.hub.as_deref(), params.before, fetch_size(limit))
        .await?;
    Ok(Json(into_page(letters, limit, |letter| {
        letter.id.to_string()
    })))
}
