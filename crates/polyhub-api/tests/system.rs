//! Health, readiness, metrics rendering, fallbacks and the OpenAPI document.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::http::{Method, StatusCode};
use metrics_exporter_prometheus::PrometheusBuilder;
use polyhub_api::{ApiConfig, ApiState, router_with_config};
use polyhub_store::Store;
use serde_json::json;
use support::{FakeRuntime, Harness, MemoryStore};

/// Every route of the contract, with `{id}` for path parameters.
const CONTRACT_ROUTES: &[(&str, &str)] = &[
    ("get", "/health"),
    ("get", "/ready"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("post", "/groups"),
    ("get", "/groups"),
    ("get", "/groups/{id}"),
    ("patch", "/groups/{id}"),
    ("delete", "/groups/{id}"),
    ("post", "/hubs"),
    ("get", "/hubs"),
    ("get", "/hubs/{id}"),
    ("patch", "/hubs/{id}"),
    ("delete", "/hubs/{id}"),
    ("post", "/hubs/{id}/start"),
    ("post", "/hubs/{id}/stop"),
    ("post", "/hubs/{id}/restart"),
    ("get", "/hubs/{id}/parser"),
    ("get", "/hubs/{id}/parser/events"),
    ("get", "/parsers"),
    ("get", "/hubs/{id}/presence"),
    ("post", "/devices"),
    ("get", "/devices"),
    ("get", "/devices/{id}"),
    ("patch", "/devices/{id}"),
    ("delete", "/devices/{id}"),
    ("get", "/devices/{id}/presence"),
    ("post", "/devices/{id}/account"),
    ("delete", "/devices/{id}/account"),
    ("post", "/devices/{id}/commands"),
    ("get", "/devices/{id}/commands"),
    ("get", "/commands/{id}"),
    ("post", "/commands/{id}/cancel"),
    ("get", "/devices/{id}/telemetry/latest"),
    ("get", "/devices/{id}/telemetry"),
    ("get", "/devices/{id}/telemetry/downsample"),
    ("get", "/dead-letters"),
];

#[tokio::test]
async fn health_is_ok() {
    let h = Harness::new();
    let reply = h.get("/health").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json, json!({"status": "ok"}));
}

#[tokio::test]
async fn ready_follows_the_manager_and_the_store() {
    let h = Harness::new();
    let reply = h.get("/ready").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json, json!({"status": "ready"}));

    h.runtime.set_ready(false);
    h.get("/ready")
        .await
        .assert_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    h.runtime.set_ready(true);

    h.store.set_down(true);
    h.get("/ready")
        .await
        .assert_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    h.store.set_down(false);
    assert_eq!(h.get("/ready").await.status, StatusCode::OK);
    // Liveness does not depend on either.
    h.store.set_down(true);
    assert_eq!(h.get("/health").await.status, StatusCode::OK);
}

#[tokio::test]
async fn metrics_is_404_without_a_handle() {
    let h = Harness::new();
    h.get("/metrics")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn metrics_renders_the_handle() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        metrics::counter!("polyhub_ingest_messages_total", "hub" => "h1").increment(7);
    });
    let state = ApiState {
        store: Arc::new(MemoryStore::new()) as Arc<dyn Store>,
        runtime: Arc::new(FakeRuntime::default()),
        commands: None,
        metrics: Some(handle),
    };
    let app = router_with_config(state, &ApiConfig::default());
    let request = axum::http::Request::get("/metrics")
        .body(axum::body::Body::empty())
        .unwrap();
    let reply = support::send(&app, request).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply
            .content_type
            .as_deref()
            .unwrap()
            .starts_with("text/plain")
    );
    assert!(
        reply
            .text
            .contains("polyhub_ingest_messages_total{hub=\"h1\"} 7"),
        "{}",
        reply.text
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_are_json_errors() {
    let h = Harness::new();
    let reply = h.get("/nope").await;
    reply.assert_error(StatusCode::NOT_FOUND, "not_found");
    h.call(Method::PUT, "/groups", None)
        .await
        .assert_error(StatusCode::METHOD_NOT_ALLOWED, "invalid_request");
}

#[tokio::test]
async fn body_limit_is_configurable() {
    let state = ApiState {
        store: Arc::new(MemoryStore::new()) as Arc<dyn Store>,
        runtime: Arc::new(FakeRuntime::default()),
        commands: None,
        metrics: None,
    };
    let config = ApiConfig {
        max_body_bytes: 64,
        ..ApiConfig::default()
    };
    let app = router_with_config(state, &config);
    let post = |body: String| {
        axum::http::Request::post("/groups")
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body))
            .unwrap()
    };
    let small = support::send(&app, post(json!({"id": "g1"}).to_string())).await;
    assert_eq!(small.status, StatusCode::CREATED);
    let large = support::send(
        &app,
        post(json!({"id": "g2", "name": "x".repeat(100)}).to_string()),
    )
    .await;
    large.assert_error(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request");
}

#[tokio::test]
async fn openapi_document_lists_exactly_the_contract_routes() {
    let h = Harness::new();
    let reply = h.get("/openapi.json").await;
    assert_eq!(reply.status, StatusCode::OK);
    let document = &reply.json;
    assert_eq!(document["openapi"], "3.1.0");
    assert_eq!(document["info"]["title"], "polyhub");

    let mut documented = BTreeSet::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "patch", "delete", "put"].contains(&method.as_str()) {
                documented.insert((method.clone(), path.clone()));
            }
        }
    }
    let expected: BTreeSet<(String, String)> = CONTRACT_ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(documented, expected);

    // The model schemas come from polyhub-store.
    let schemas = document["components"]["schemas"]
        .as_object()
        .expect("schemas");
    for name in [
        "Group",
        "NewGroup",
        "Hub",
        "HubSettings",
        "Device",
        "ParserStatus",
        "RangePage",
        "Bucket",
        "DeadLetter",
        "Presence",
        "TelemetryRow",
        "Command",
        "CommandState",
        "SubmitCommand",
        "ErrorBody",
    ] {
        assert!(schemas.contains_key(name), "schema {name} missing");
    }
    assert_eq!(
        document,
        &serde_json::to_value(polyhub_api::openapi()).unwrap()
    );
}

#[tokio::test]
async fn every_documented_route_is_served() {
    // The router is the document's source: each documented method+path must reach a handler
    // (not the unknown-route or wrong-method fallback).
    let h = Harness::new();
    for (method, path) in CONTRACT_ROUTES {
        let uri = path.replace("{id}", "x");
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let body = matches!(method, Method::POST | Method::PATCH).then(|| json!({}));
        let reply = h.call(method.clone(), &uri, body).await;
        assert_ne!(
            reply.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {uri}"
        );
        let message = reply.json["error"]["message"].as_str().unwrap_or_default();
        assert!(
            !message.starts_with("no route"),
            "{method} {uri} is not routed"
        );
    }
}

#[tokio::test]
async fn serve_answers_over_tcp_and_stops_on_cancel() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(polyhub_api::serve(
        listener,
        Harness::new().router,
        shutdown.clone(),
    ));

    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: polyhub\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_string(&mut answer),
    )
    .await
    .expect("answered in time")
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("{\"status\":\"ok\"}"), "{answer}");

    shutdown.cancel();
    let result = tokio::time::timeout(std::time::Duration::from_secs(5), server)
        .await
        .expect("serve returns after cancel")
        .unwrap();
    assert!(result.is_ok());
}
