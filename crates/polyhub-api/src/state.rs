//! What every handler shares.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use polyhub_store::Store;

use crate::runtime::{CommandRuntime, HubRuntime};

/// The handlers' shared state: the store, the hub manager, the command service and the
/// metrics to expose.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// Registry and telemetry storage.
    pub store: Arc<dyn Store>,
    /// The hub manager (parsers' lifecycle).
    pub runtime: Arc<dyn HubRuntime>,
    /// The command service; `None` (commands not enabled) answers every command route with
    /// 503 `unavailable`.
    pub commands: Option<Arc<dyn CommandRuntime>>,
    /// What `/metrics` renders; `None` answers `/metrics` with 404.
    pub metrics: Option<PrometheusHandle>,
}
