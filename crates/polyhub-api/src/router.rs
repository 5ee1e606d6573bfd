//! Assembles the routes, the OpenAPI document, the middleware and the server loop.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Extension, Request};
use axum::http::{Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::ApiConfig;
use crate::error::{ApiError, ErrorBody};
use crate::handlers::{commands, dead_letters, devices, groups, hubs, parsers, system, telemetry};
use crate::state::ApiState;

/// Name of the request counter (labels `method` and `status`).
pub const HTTP_REQUESTS_METRIC: &str = "polyhub_http_requests_total";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "polyhub",
        description = "polyhub's REST API: registry (groups, hubs, devices), hub parsers, \
                       commands to devices, telemetry, dead letters, health and metrics."
    ),
    components(schemas(ErrorBody)),
    tags(
        (name = "system", description = "Health, readiness, metrics and this document"),
        (name = "groups", description = "Customers; they own hubs"),
        (name = "hubs", description = "Hubs and their parsers; they own devices"),
        (name = "devices", description = "Devices and their presence"),
        (name = "commands", description = "Commands to devices, tracked until the device answers"),
        (name = "telemetry", description = "Stored device telemetry"),
        (name = "dead_letters", description = "Messages that could not be ingested"),
    )
)]
struct ApiDoc;

/// The serialised OpenAPI document, computed once per router.
#[derive(Debug, Clone)]
pub(crate) struct OpenApiJson(pub(crate) Arc<serde_json::Value>);

/// Every documented route. Routes are only ever added here through `routes!`, which registers
/// the handler and its `#[utoipa::path]` description together.
fn documented_routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(system::health))
        .routes(routes!(system::ready))
        .routes(routes!(system::metrics))
        .routes(routes!(system::openapi_json))
        .routes(routes!(groups::create_group, groups::list_groups))
        .routes(routes!(
            groups::get_group,
            groups::update_group,
            groups::delete_group
        ))
        .routes(routes!(hubs::create_hub, hubs::list_hubs))
        .routes(routes!(hubs::get_hub, hubs::update_hub, hubs::delete_hub))
        .routes(routes!(hubs::start_hub))
        .routes(routes!(hubs::stop_hub))
        .routes(routes!(hubs::restart_hub))
        .routes(routes!(hubs::hub_presence))
        .routes(routes!(parsers::parser_status))
        .routes(routes!(parsers::parser_events))
        .routes(routes!(parsers::list_parsers))
        .routes(routes!(devices::create_device, devices::list_devices))
        .routes(routes!(
            devices::get_device,
            devices::update_device,
            devices::delete_device
        ))
        .routes(routes!(devices::device_presence))
        .routes(routes!(
            devices::create_device_account,
            devices::delete_device_account
        ))
        .routes(routes!(commands::submit_command, commands::list_commands))
        .routes(routes!(commands::get_command))
        .routes(routes!(commands::cancel_command))
        .routes(routes!(telemetry::latest))
        .routes(routes!(telemetry::range))
        .routes(routes!(telemetry::downsample))
        .routes(routes!(dead_letters::list_dead_letters))
}

/// The OpenAPI 3.1 document of every route, as served at `/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut document = documented_routes().into_openapi();
    document.info.version = env!("CARGO_PKG_VERSION").to_owned();
    document
}

/// The API's router with the default `[http]` settings.
pub fn router(state: ApiState) -> Router {
    router_with_config(state, &ApiConfig::default())
}

/// The API's router: every route, JSON errors for unknown routes and methods, the request body
/// limit of `config`, and the request counter.
pub fn router_with_config(state: ApiState, config: &ApiConfig) -> Router {
    let (routes, mut document) = documented_routes().split_for_parts();
    document.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let document = serde_json::to_value(&document).unwrap_or_else(|error| {
        // Serialising plain data cannot fail in practice; serve an error rather than panic.
        tracing::error!(%error, "cannot serialise the OpenAPI document");
        serde_json::json!({"error": "OpenAPI document unavailable"})
    });
    routes
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(Extension(OpenApiJson(Arc::new(document))))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        // Outermost, so that every answer is counted, rejections and fallbacks included.
        .layer(middleware::from_fn(count_requests))
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then lets in-flight requests
/// finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}

async fn count_requests(request: Request, next: Next) -> Response {
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(HTTP_REQUESTS_METRIC, "method" => method, "status" => status).increment(1);
    response
}

/// Serves the OpenAPI document stored by [`router_with_config`].
pub(crate) fn openapi_response(document: &OpenApiJson) -> Response {
    Json(document.0.as_ref().clone()).into_response()
}
