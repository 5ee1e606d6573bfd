//! `/devices/{id}/telemetry`: stored values, latest per signal, by time range, downsampled.
//!
//! Telemetry stays queryable after its device is deleted, so these routes do not require the
//! device to be registered: an unknown device simply has no rows.

use axum::Json;
use axum::extract::State;
use polyhub_store::{
    Bucket, DownsampleQuery, MAX_PAGE, Millis, RangePage, RangeQuery, TelemetryRow, now_millis,
};
use serde::Deserialize;
use utoipa::IntoParams;

use super::{Items, checked_id, checked_limit};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiPath, ApiQuery};
use crate::state::ApiState;
use crate::time::{parse_duration_ms, parse_time};

/// Rows per page of a range query when `limit` is absent.
pub const DEFAULT_RANGE_LIMIT: u32 = 1_000;
/// Window of a downsample query when `from` is absent: the hour before `to`.
pub const DEFAULT_DOWNSAMPLE_WINDOW_MS: i64 = 60 * 60 * 1_000;
/// Bucket width of a downsample query when `interval` is absent: one minute.
pub const DEFAULT_DOWNSAMPLE_INTERVAL_MS: i64 = 60 * 1_000;
/// Most buckets one downsample query may span.
pub const MAX_BUCKETS: i64 = 100_000;

/// Filter and paging of a range query.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct RangeParams {
    /// Only this signal (all signals when absent).
    signal: Option<String>,
    /// Inclusive lower bound: ms since the epoch or RFC 3339.
    from: Option<String>,
    /// Exclusive upper bound: ms since the epoch or RFC 3339.
    to: Option<String>,
    /// Rows per page, 1 to 10000 (default 1000).
    limit: Option<u32>,
    /// Continue after this cursor (the previous page's `next`).
    after: Option<String>,
}

/// Window and bucket width of a downsample query.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct DownsampleParams {
    /// The signal to aggregate (required).
    signal: String,
    /// Inclusive lower bound: ms since the epoch or RFC 3339 (default: `to` minus one hour).
    from: Option<String>,
    /// Exclusive upper bound: ms since the epoch or RFC 3339 (default: now).
    to: Option<String>,
    /// Bucket width: integer ms or `500ms`, `10s`, `5m`, `1h`, `1d` (default `1m`).
    interval: Option<String>,
}

/// The most recent value of every signal of the device, ordered by signal.
#[utoipa::path(get, path = "/devices/{id}/telemetry/latest", tag = "telemetry",
    operation_id = "telemetry_latest",
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 200, description = "One row per signal", body = Items<TelemetryRow>),
        (status = 400, description = "Invalid id", body = ErrorBody),
    ))]
pub(crate) async fn latest(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Items<TelemetryRow>>, ApiError> {
    checked_id("device", &id)?;
    Ok(Json(Items {
        items: state.store.latest(&id).await?,
    }))
}

/// The device's rows in a time range, oldest first, paged.
#[utoipa::path(get, path = "/devices/{id}/telemetry", tag = "telemetry",
    operation_id = "telemetry_range",
    params(("id" = String, Path, description = "Device id"), RangeParams),
    responses(
        (status = 200, description = "One page of rows", body = RangePage),
        (status = 400, description = "Invalid id, time, limit or cursor", body = ErrorBody),
    ))]
pub(crate) async fn range(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(params): ApiQuery<RangeParams>,
) -> Result<Json<RangePage>, ApiError> {
    checked_id("device", &id)?;
    let limit = checked_limit(params.limit, DEFAULT_RANGE_LIMIT)?;
    let from = optional_time("from", params.from.as_deref())?;
    let to = optional_time("to", params.to.as_deref())?;
    if let (Some(from), Some(to)) = (from, to)
        && from > to
    {
        return Err(ApiError::InvalidRequest(format!(
            "from ({from}) is after to ({to})"
        )));
    }
    let query = RangeQuery {
        device_id: id,
        signal: params.signal,
        from,
        to,
        limit: limit.min(MAX_PAGE),
        after: params.after,
    };
    Ok(Json(state.store.range(query).await?))
}

/// One signal's numeric values bucketed by time (min, max, avg, count), oldest bucket first;
/// empty buckets are omitted. At most 100,000 buckets per query.
#[utoipa::path(get, path = "/devices/{id}/telemetry/downsample", tag = "telemetry",
    operation_id = "telemetry_downsample",
    params(("id" = String, Path, description = "Device id"), DownsampleParams),
    responses(
        (status = 200, description = "Non-empty buckets", body = Items<Bucket>),
        (status = 400, description = "Invalid id, signal, time, interval, or too many buckets", body = ErrorBody),
    ))]
pub(crate) async fn downsample(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(params): ApiQuery<DownsampleParams>,
) -> Result<Json<Items<Bucket>>, ApiError> {
    checked_id("device", &id)?;
    if params.signal.is_empty() {
        return Err(ApiError::InvalidRequest(
            "signal must not be empty".to_owned(),
        ));
    }
    let to = optional_time("to", params.to.as_deref())?.unwrap_or_else(now_millis);
    let from = optional_time("from", params.from.as_deref())?
        .unwrap_or_else(|| to.saturating_sub(DEFAULT_DOWNSAMPLE_WINDOW_MS));
    let interval_ms = match params.interval.as_deref() {
        None => DEFAULT_DOWNSAMPLE_INTERVAL_MS,
        Some(text) => parse_duration_ms(text)
            .map_err(|reason| ApiError::InvalidRequest(format!("interval: {reason}")))?,
    };
    if from >= to {
        return Err(ApiError::InvalidRequest(format!(
            "from ({from}) must be before to ({to})"
        )));
    }
    let buckets = bucket_count(from, to, interval_ms);
    if buckets > MAX_BUCKETS {
        return Err(ApiError::InvalidRequest(format!(
            "{buckets} buckets requested, at most {MAX_BUCKETS}: use a larger interval or a \
             shorter range"
        )));
    }
    let query = DownsampleQuery {
        device_id: id,
        signal: params.signal,
        from,
        to,
        interval_ms,
    };
    Ok(Json(Items {
        items: state.store.downsample(query).await?,
    }))
}

/// Buckets (aligned on multiples of `interval_ms` since the epoch) that `[from, to)` touches.
fn bucket_count(from: Millis, to: Millis, interval_ms: i64) -> i64 {
    let first = from.div_euclid(interval_ms);
    let last = (to - 1).div_euclid(interval_ms);
    last.saturating_sub(first).saturating_add(1)
}

fn optional_time(name: &str, text: Option<&str>) -> Result<Option<Millis>, ApiError> {
    text.map(|text| {
        parse_time(text).map_err(|reason| ApiError::InvalidRequest(format!("{name}: {reason}")))
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_count_follows_epoch_alignment() {
        assert_eq!(bucket_count(0, 1_000, 1_000), 1);
        assert_eq!(bucket_count(0, 1_001, 1_000), 2);
        assert_eq!(bucket_count(500, 1_500, 1_000), 2);
        assert_eq!(bucket_count(-500, 500, 1_000), 2);
        assert_eq!(bucket_count(i64::MIN, i64::MAX, 1), i64::MAX);
    }
}
