//! Device account routes: created on the server of the device's protocol, shown once, removed;
//! protocols without accounts and missing devices are refused with a reason.

mod support;

use axum::http::{Method, StatusCode};
use serde_json::json;
use support::Harness;

#[tokio::test]
async fn an_xmpp_device_account_is_created_once_and_removed() {
    let h = Harness::new();
    h.seed("g", "h", &["m1"]).await;
    let reply = h
        .post(
            "/devices",
            json!({"id": "x1", "hub_id": "h", "protocol": "xmpp"}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);

    let reply = h.call(Method::POST, "/devices/x1/account", None).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    assert_eq!(
        reply.json,
        json!({"username": "x1@localhost", "password": "generated"})
    );
    h.call(Method::POST, "/devices/x1/account", None)
        .await
        .assert_error(StatusCode::CONFLICT, "conflict");

    let reply = h.call(Method::DELETE, "/devices/x1/account", None).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.text);
    h.call(Method::DELETE, "/devices/x1/account", None)
        .await
        .assert_error(StatusCode::CONFLICT, "conflict");
    // The device itself stays.
    assert_eq!(h.get("/devices/x1").await.status, StatusCode::OK);
}

#[tokio::test]
async fn accounts_of_protocols_without_them_and_of_unknown_devices_are_refused() {
    let h = Harness::new();
    h.seed("g", "h", &["m1"]).await;
    let reply = h.call(Method::POST, "/devices/m1/account", None).await;
    reply.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    assert!(reply.text.contains("mqtt"), "{}", reply.text);
    h.call(Method::DELETE, "/devices/m1/account", None)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    h.call(Method::POST, "/devices/nope/account", None)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    h.call(Method::POST, "/devices/bad%20id/account", None)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
}
