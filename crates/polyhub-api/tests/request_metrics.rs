//! `polyhub_http_requests_total{method,status}` counts every answered request. Its own test
//! binary, because it installs the process-wide metrics recorder.

mod support;

use axum::http::{Method, StatusCode};
use metrics_exporter_prometheus::PrometheusBuilder;
use serde_json::json;
use support::Harness;

fn count(rendered: &str, method: &str, status: u16) -> u64 {
    let series = format!("polyhub_http_requests_total{{method=\"{method}\",status=\"{status}\"}} ");
    rendered
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .map_or(0, |value| value.trim().parse().unwrap())
}

#[tokio::test]
async fn requests_are_counted_by_method_and_status() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).expect("the only recorder of this test binary");

    let h = Harness::new();
    for _ in 0..3 {
        assert_eq!(h.get("/health").await.status, StatusCode::OK);
    }
    assert_eq!(
        h.post("/groups", json!({"id": "g1"})).await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        h.post("/groups", json!({"id": "g1"})).await.status,
        StatusCode::CONFLICT
    );
    assert_eq!(
        h.post("/groups", json!({"bad": 1})).await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(h.get("/nope").await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        h.call(Method::DELETE, "/groups/g1", None).await.status,
        StatusCode::NO_CONTENT
    );

    let rendered = handle.render();
    assert_eq!(count(&rendered, "GET", 200), 3, "{rendered}");
    assert_eq!(count(&rendered, "POST", 201), 1);
    assert_eq!(count(&rendered, "POST", 409), 1);
    assert_eq!(count(&rendered, "POST", 400), 1);
    assert_eq!(count(&rendered, "GET", 404), 1);
    assert_eq!(count(&rendered, "DELETE", 204), 1);
}
