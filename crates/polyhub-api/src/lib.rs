//! polyhub's REST API: an axum [`Router`](axum::Router) over a [`Store`](polyhub_store::Store),
//! the hub manager (seen through [`HubRuntime`]) and the command service (seen through
//! [`CommandRuntime`]).
//!
//! - Routes, JSON shapes and error codes follow the issue 4 contract; the OpenAPI 3.1 document
//!   generated from the handlers is served at `/openapi.json` (and [`openapi()`]).
//! - Every failure is an [`ApiError`]: one place maps storage and runtime errors to a status and
//!   a stable code. Malformed bodies, paths and query strings are JSON 400s too.
//! - `polyhub_http_requests_total{method,status}` counts every answered request through the
//!   `metrics` facade; `/metrics` renders the Prometheus handle given in [`ApiState`].
//!
//! Lifecycle rules the handlers apply: creating a hub whose desired state is `running` starts
//! its parser; deleting a hub stops its parser first; changing a running hub's settings restarts
//! its parser; a created device is announced to its hub's parser (if that fails the device stays
//! created and the answer is an error explaining so); a deleted device is unsubscribed first.
//! Commands are created and cancelled through the command service, which stores them first;
//! reading and listing them goes to the store.

pub mod config;
pub mod error;
pub mod extract;
mod handlers;
mod router;
pub mod runtime;
pub mod state;
pub mod time;

pub use config::ApiConfig;
pub use error::{ApiError, ErrorBody, ErrorCode, ErrorDetail};
pub use handlers::commands::{MAX_WAIT_MS, SubmitCommand};
pub use handlers::system::StatusBody;
pub use handlers::telemetry::{
    DEFAULT_DOWNSAMPLE_INTERVAL_MS, DEFAULT_DOWNSAMPLE_WINDOW_MS, DEFAULT_RANGE_LIMIT, MAX_BUCKETS,
};
pub use handlers::{DEFAULT_LIST_LIMIT, Items, Page};
pub use router::{HTTP_REQUESTS_METRIC, openapi, router, router_with_config, serve};
pub use runtime::{CommandRequest, CommandRuntime, DeviceAccount, HubRuntime, RuntimeError};
pub use state::ApiState;
