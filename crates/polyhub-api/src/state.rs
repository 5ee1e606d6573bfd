//! What every handler shares.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use polyhub_store::Store;

use crate::runtime::HubRuntime;

/// The handlers' shared state: the store, the hub manager and the metrics to expose.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// Registry and telemetry storage.
    pub store: Arc<dyn Store>,
    /// The hub manager (parsers' lifecycle).
    pub runtime: Arc<dyn HubRuntime>,
    /// What `/metrics` renders; `None` answers `/metrics` with 404.
    pub metrics: Option<PrometheusHandle>,
}
