//! `/devices`: devices (unique ids across hubs) and their presence.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use polyhub_store::{Device, DevicePatch, ListQuery, NewDevice, Presence};
use serde::Deserialize;
use utoipa::IntoParams;

use super::commands::command_runtime;
use super::hubs::created_but;
use super::{DEFAULT_LIST_LIMIT, Page, checked_id, checked_limit, fetch_size, into_page};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::runtime::{DeviceAccount, RuntimeError};
use crate::state::ApiState;

/// Filter and paging of `GET /devices`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct DeviceListParams {
    /// Only the devices of this hub.
    hub: Option<String>,
    /// Start after this device id (the previous page's `next`).
    after: Option<String>,
    /// Page size, 1 to 10000 (default 100).
    limit: Option<u32>,
}

/// Registers a device. When the answer is 201, its hub's running parser has already subscribed
/// to the device's channel, so the device may publish at once.
///
/// If the parser fails to subscribe, the device stays created and the answer is 500 or 503
/// explaining so; the parser subscribes every registered device when it (re)starts.
#[utoipa::path(post, path = "/devices", tag = "devices", request_body = NewDevice,
    responses(
        (status = 201, description = "The created device", body = Device),
        (status = 400, description = "Malformed request or invalid id", body = ErrorBody),
        (status = 409, description = "The id is taken or the hub does not exist", body = ErrorBody),
        (status = 500, description = "Created, but the parser failed to subscribe it", body = ErrorBody),
        (status = 503, description = "Created, but the parser was busy and did not subscribe it", body = ErrorBody),
    ))]
pub(crate) async fn create_device(
    State(state): State<ApiState>,
    ApiJson(new_device): ApiJson<NewDevice>,
) -> Result<(StatusCode, Json<Device>), ApiError> {
    let device = state.store.create_device(new_device).await?;
    match state.runtime.device_added(&device).await {
        // The manager has no parser for this hub: nothing to subscribe until it starts.
        Ok(()) | Err(RuntimeError::NotFound(_)) => {}
        Err(error) => {
            return Err(created_but(
                "device",
                &device.id,
                "its hub's parser did not subscribe it",
                error,
            ));
        }
    }
    Ok((StatusCode::CREATED, Json(device)))
}

/// Lists devices ordered by id.
#[utoipa::path(get, path = "/devices", tag = "devices", params(DeviceListParams),
    responses(
        (status = 200, description = "One page of devices", body = Page<Device>),
        (status = 400, description = "Bad query parameter", body = ErrorBody),
    ))]
pub(crate) async fn list_devices(
    State(state): State<ApiState>,
    ApiQuery(params): ApiQuery<DeviceListParams>,
) -> Result<Json<Page<Device>>, ApiError> {
    let limit = checked_limit(params.limit, DEFAULT_LIST_LIMIT)?;
    if let Some(hub) = &params.hub {
        checked_id("hub", hub)?;
    }
    let query = ListQuery {
        parent: params.hub,
        after: params.after,
        limit: fetch_size(limit),
    };
    let devices = state.store.list_devices(query).await?;
    Ok(Json(into_page(devices, limit, |device| device.id.clone())))
}

/// Reads a device.
#[utoipa::path(get, path = "/devices/{id}", tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 200, description = "The device", body = Device),
        (status = 400, description = "Invalid id", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
    ))]
pub(crate) async fn get_device(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Device>, ApiError> {
    checked_id("device", &id)?;
    Ok(Json(state.store.get_device(&id).await?))
}

/// Changes a device's name, protocol or metadata.
#[utoipa::path(patch, path = "/devices/{id}", tag = "devices", request_body = DevicePatch,
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 200, description = "The updated device", body = Device),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
    ))]
pub(crate) async fn update_device(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(patch): ApiJson<DevicePatch>,
) -> Result<Json<Device>, ApiError> {
    checked_id("device", &id)?;
    Ok(Json(state.store.update_device(&id, patch).await?))
}

/// Deletes a device; its hub's parser unsubscribes it first. Its telemetry stays queryable.
#[utoipa::path(delete, path = "/devices/{id}", tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Invalid id", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 500, description = "The parser failed to unsubscribe it; nothing was deleted", body = ErrorBody),
    ))]
pub(crate) async fn delete_device(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    checked_id("device", &id)?;
    let device = state.store.get_device(&id).await?;
    match state.runtime.device_removed(&device.hub_id, &id).await {
        // No parser for the hub: nothing subscribed.
        Ok(()) | Err(RuntimeError::NotFound(_)) => {}
        Err(error) => {
            return Err(ApiError::from(error).with_context(&format!(
                "device {id:?} was not deleted: its hub's parser did not unsubscribe it"
            )));
        }
    }
    state.store.delete_device(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A device's connection state and last-seen time.
#[utoipa::path(get, path = "/devices/{id}/presence", tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 200, description = "The device's presence", body = Presence),
        (status = 400, description = "Invalid id", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
    ))]
pub(crate) async fn device_presence(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Presence>, ApiError> {
    checked_id("device", &id)?;
    Ok(Json(state.store.get_presence(&id).await?))
}

/// Creates the device's account on the server of its protocol (XMPP: in-band registration)
/// and returns the generated credentials. polyhub does not keep the password: this answer is
/// the only place it appears.
#[utoipa::path(post, path = "/devices/{id}/account", tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 201, description = "The account was created", body = DeviceAccount),
        (status = 400, description = "Invalid id, or the device's protocol has no accounts", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 409, description = "The server refused (e.g. the account exists)", body = ErrorBody),
        (status = 503, description = "Commands are not enabled", body = ErrorBody),
    ))]
pub(crate) async fn create_device_account(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<(StatusCode, Json<DeviceAccount>), ApiError> {
    checked_id("device", &id)?;
    let device = state.store.get_device(&id).await?;
    let account = command_runtime(&state)?.create_account(&device).await?;
    Ok((StatusCode::CREATED, Json(account)))
}

/// Deletes the device's account on the server of its protocol (XMPP: the server's XEP-0133
/// delete-user command, which needs polyhub's account to be a server admin). The device itself
/// stays registered in polyhub.
#[utoipa::path(delete, path = "/devices/{id}/account", tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 204, description = "The account was deleted"),
        (status = 400, description = "Invalid id, or the device's protocol has no accounts", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
        (status = 409, description = "The server refused (no such account, or polyhub may not delete it)", body = ErrorBody),
        (status = 503, description = "Commands are not enabled", body = ErrorBody),
    ))]
pub(crate) async fn delete_device_account(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    checked_id("device", &id)?;
    let device = state.store.get_device(&id).await?;
    command_runtime(&state)?.remove_account(&device).await?;
    Ok(StatusCode::NO_CONTENT)
}
