//! `/devices/{id}/commands` and `/commands/{id}`: commands to devices and their lifecycle.
//!
//! Creating and cancelling go through the [`CommandRuntime`] (the command service), which
//! stores a command before it dispatches it and sees every transition; reading and listing go
//! straight to the store. Without a command service every route here answers 503.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use polyhub_store::{Command, CommandQuery, CommandState, MAX_COMMAND_PAYLOAD};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{DEFAULT_LIST_LIMIT, Page, checked_id, checked_limit, fetch_size, into_page};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::runtime::{CommandRequest, CommandRuntime};
use crate::state::ApiState;

/// Longest `wait_ms` accepted by `POST /devices/{id}/commands` (one minute): an HTTP request
/// is not the place for longer waits; poll `GET /commands/{id}` instead.
pub const MAX_WAIT_MS: u64 = 60_000;

/// How much longer than `wait_ms` the handler gives the command service before it answers
/// anyway, so that a service that overstays cannot hold the request open.
const WAIT_GRACE: Duration = Duration::from_secs(1);

/// The body of `POST /devices/{id}/commands`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitCommand {
    /// What to do: 1 to 128 bytes, usable as one MQTT topic level (no `/`, `+`, `#`). For
    /// sgframework resources it is the command signal name.
    pub name: String,
    /// Arguments: any JSON value, at most 64 KiB once encoded (default `null`).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    /// Time to live in milliseconds (positive): unacknowledged after this long, the command
    /// expires, and if it is still queued it never goes out. Absent: it never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// Answer only once the command is acknowledged or final, or after this many
    /// milliseconds (at most 60000), whichever comes first. Absent or 0: answer at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

/// List order of `GET /devices/{id}/commands`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum CommandOrder {
    /// Oldest first.
    Asc,
    /// Newest first.
    #[default]
    Desc,
}

/// Filter, order and paging of `GET /devices/{id}/commands`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct CommandListParams {
    /// Only commands in these states, comma-separated (e.g. `queued,sent`); every state when
    /// absent. States: queued, sent, delivered, acknowledged, expired, failed, cancelled.
    state: Option<String>,
    /// Continue after this command id (the previous page's `next`).
    after: Option<String>,
    /// Page size, 1 to 10000 (default 100).
    limit: Option<u32>,
    /// `desc` (newest first, the default) or `asc` (oldest first).
    order: Option<CommandOrder>,
}

/// Sends a command to a device. It is stored (state `queued`) before this answers, then goes
/// out in order as soon as the device is online.
///
/// With `wait_ms`, the answer comes once the command is acknowledged or final (expired,
/// failed, cancelled), or when `wait_ms` passes, whichever comes first; it is 201 with the
/// command as it is then either way, so check `state`.
#[utoipa::path(post, path = "/devices/{id}/commands", tag = "commands", request_body = SubmitCommand,
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 201, description = "The stored command (after the wait, if asked)", body = Command),
        (status = 400, description = "Malformed request, bad name, bad ttl_ms or wait_ms, or no polyglot client for the device's protocol", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 413, description = "The payload is larger than 64 KiB", body = ErrorBody),
        (status = 503, description = "Commands are not enabled", body = ErrorBody),
    ))]
pub(crate) async fn submit_command(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<SubmitCommand>,
) -> Result<(StatusCode, Json<Command>), ApiError> {
    let commands = command_runtime(&state)?;
    checked_id("device", &id)?;
    let wait = checked_wait(body.wait_ms)?;
    if body.ttl_ms == Some(0) {
        return Err(ApiError::InvalidRequest(
            "ttl_ms must be positive (omit it for a command that never expires)".to_owned(),
        ));
    }
    check_payload_size(&body.payload)?;
    let request = CommandRequest {
        name: body.name,
        payload: body.payload,
        ttl_ms: body.ttl_ms,
    };
    let command = commands.submit(&id, request).await?;
    let command = match wait {
        Some(timeout) if !command.state.is_final() => {
            wait_for(&state, commands.as_ref(), command, timeout).await
        }
        _ => command,
    };
    Ok((StatusCode::CREATED, Json(command)))
}

/// Reads a command.
#[utoipa::path(get, path = "/commands/{id}", tag = "commands",
    params(("id" = String, Path, description = "Command id")),
    responses(
        (status = 200, description = "The command", body = Command),
        (status = 400, description = "Invalid id", body = ErrorBody),
        (status = 404, description = "No such command", body = ErrorBody),
        (status = 503, description = "Commands are not enabled", body = ErrorBody),
    ))]
pub(crate) async fn get_command(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Command>, ApiError> {
    command_runtime(&state)?;
    checked_id("command", &id)?;
    Ok(Json(state.store.get_command(&id).await?))
}

/// Lists a device's commands, newest first unless `order=asc`.
#[utoipa::path(get, path = "/devices/{id}/commands", tag = "commands", params(
        ("id" = String, Path, description = "Device id"),
        CommandListParams,
    ),
    responses(
        (status = 200, description = "One page of commands", body = Page<Command>),
        (status = 400, description = "Bad query parameter", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 503, description = "Commands are not enabled", body = ErrorBody),
    ))]
pub(crate) async fn list_commands(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(params): ApiQuery<CommandListParams>,
) -> Result<Json<Page<Command>>, ApiError> {
    command_runtime(&state)?;
    checked_id("device", &id)?;
    let limit = checked_limit(params.limit, DEFAULT_LIST_LIMIT)?;
    let states = parse_states(params.state.as_deref())?;
    if let Some(after) = &params.after {
        checked_id("command", after)?;
    }
    // An unknown device is a 404, not an empty list: a typo should not look like silence.
    state.store.get_device(&id).await?;
    let query = CommandQuery {
        device_id: Some(id),
        states,
        after: params.after,
        limit: fetch_size(limit),
        oldest_first: params.order.unwrap_or_default() == CommandOrder::Asc,
    };
    let commands = state.store.list_commands(query).await?;
    Ok(Json(into_page(commands, limit, |command| {
        command.id.clone()
    })))
}

/// Cancels a command that has not been acknowledged yet (queued, sent or delivered). A
/// command already handed to the device may still be carried out by it.
#[utoipa::path(post, path = "/commands/{id}/cancel", tag = "commands",
    params(("id" = String, Path, description = "Command id")),
    responses(
        (status = 200, description = "The cancelled command", body = Command),
        (status = 400, description = "Invalid id", body = ErrorBody),
        (status = 404, description = "No such command", body = ErrorBody),
        (status = 409, description = "The command is already final (acknowledged, expired, failed or cancelled)", body = ErrorBody),
        (status = 503, description = "Commands are not enabled", body = ErrorBody),
    ))]
pub(crate) async fn cancel_command(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Command>, ApiError> {
    let commands = command_runtime(&state)?;
    checked_id("command", &id)?;
    Ok(Json(commands.cancel(&id).await?))
}

/// The command service, or the 503 every command route answers without one.
pub(crate) fn command_runtime(state: &ApiState) -> Result<Arc<dyn CommandRuntime>, ApiError> {
    state
        .commands
        .clone()
        .ok_or_else(|| ApiError::Unavailable("commands are not enabled".to_owned()))
}

/// `wait_ms` as a timeout: `None` when absent or 0, an error above [`MAX_WAIT_MS`].
fn checked_wait(wait_ms: Option<u64>) -> Result<Option<Duration>, ApiError> {
    match wait_ms {
        None | Some(0) => Ok(None),
        Some(ms) if ms <= MAX_WAIT_MS => Ok(Some(Duration::from_millis(ms))),
        Some(ms) => Err(ApiError::InvalidRequest(format!(
            "wait_ms {ms} is above the maximum of {MAX_WAIT_MS}"
        ))),
    }
}

/// Refuses a payload whose JSON encoding is above [`MAX_COMMAND_PAYLOAD`] before anything is
/// stored. The command service checks the same limit; checking here too keeps the 413 when
/// the service is reached through another path.
fn check_payload_size(payload: &serde_json::Value) -> Result<(), ApiError> {
    let encoded = serde_json::to_vec(payload)
        .map_err(|error| ApiError::InvalidRequest(format!("payload cannot be encoded: {error}")))?;
    if encoded.len() > MAX_COMMAND_PAYLOAD {
        return Err(ApiError::PayloadTooLarge(format!(
            "the payload is {} bytes once encoded; the maximum is {MAX_COMMAND_PAYLOAD}",
            encoded.len()
        )));
    }
    Ok(())
}

/// `?state=queued,sent` → the states; empty pieces are ignored, an unknown state is a 400.
fn parse_states(text: Option<&str>) -> Result<Vec<CommandState>, ApiError> {
    let Some(text) = text else {
        return Ok(Vec::new());
    };
    let mut states = Vec::new();
    for piece in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let state: CommandState =
            serde_json::from_value(serde_json::Value::String(piece.to_owned())).map_err(|_| {
                ApiError::InvalidRequest(format!(
                    "unknown command state {piece:?} (expected queued, sent, delivered, \
                 acknowledged, expired, failed or cancelled)"
                ))
            })?;
        if !states.contains(&state) {
            states.push(state);
        }
    }
    Ok(states)
}

/// Waits for `command` to settle. The command was created whatever happens here, so a failed
/// or overlong wait is not an error: the answer is then the freshest copy we can read.
async fn wait_for(
    state: &ApiState,
    commands: &dyn CommandRuntime,
    command: Command,
    timeout: Duration,
) -> Command {
    match tokio::time::timeout(timeout + WAIT_GRACE, commands.wait(&command.id, timeout)).await {
        Ok(Ok(settled)) => return settled,
        Ok(Err(error)) => {
            tracing::warn!(command = %command.id, %error, "waiting for a command failed");
        }
        Err(_) => {
            tracing::warn!(command = %command.id, "the command service overstayed wait_ms");
        }
    }
    match state.store.get_command(&command.id).await {
        Ok(fresh) => fresh,
        Err(_) => command,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_filters_parse_and_reject_unknown_states() {
        assert_eq!(parse_states(None).unwrap(), vec![]);
        assert_eq!(parse_states(Some("")).unwrap(), vec![]);
        assert_eq!(
            parse_states(Some("queued, sent,queued,")).unwrap(),
            vec![CommandState::Queued, CommandState::Sent]
        );
        let error = parse_states(Some("queued,done")).unwrap_err();
        assert_eq!(error.status(), StatusCode::BAD_REQUEST);
        assert!(error.to_string().contains("\"done\""), "{error}");
    }

    #[test]
    fn wait_is_bounded() {
        assert_eq!(checked_wait(None).unwrap(), None);
        assert_eq!(checked_wait(Some(0)).unwrap(), None);
        assert_eq!(
            checked_wait(Some(MAX_WAIT_MS)).unwrap(),
            Some(Duration::from_secs(60))
        );
        assert!(checked_wait(Some(MAX_WAIT_MS + 1)).is_err());
    }

    #[test]
    fn payload_limit_is_on_the_encoded_size() {
        // A string of n characters encodes as n + 2 bytes (the quotes).
        let fits = serde_json::Value::String("x".repeat(MAX_COMMAND_PAYLOAD - 2));
        assert!(check_payload_size(&fits).is_ok());
        let too_big = serde_json::Value::String("x".repeat(MAX_COMMAND_PAYLOAD - 1));
        let error = check_payload_size(&too_big).unwrap_err();
        assert_eq!(error.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn submit_body_defaults_and_refuses_unknown_fields() {
        let body: SubmitCommand = serde_json::from_str(r#"{"name":"reboot"}"#).unwrap();
        assert_eq!(body.payload, serde_json::Value::Null);
        assert_eq!((body.ttl_ms, body.wait_ms), (None, None));
        assert!(serde_json::from_str::<SubmitCommand>(r#"{"name":"x","ttl":1}"#).is_err());
        assert!(serde_json::from_str::<SubmitCommand>(r#"{"payload":1}"#).is_err());
    }
}
