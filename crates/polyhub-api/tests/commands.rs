//! Command routes: submit (with and without waiting), read, list with filters and paging,
//! cancel, and their errors, over the in-memory store and a command service double.

mod support;

use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use polyhub_store::{CommandState, MAX_COMMAND_PAYLOAD};
use serde_json::{Value, json};
use support::{Harness, Reply};

/// A harness with group `g`, hub `h` and the mqtt devices `d1` and `d2`.
async fn seeded() -> Harness {
    let h = Harness::new();
    h.seed("g", "h", &["d1", "d2"]).await;
    h
}

async fn submit(h: &Harness, device: &str, body: Value) -> Reply {
    h.post(&format!("/devices/{device}/commands"), body).await
}

/// Submits and returns the new command's id, asserting 201.
async fn submit_ok(h: &Harness, device: &str, name: &str) -> String {
    let reply = submit(h, device, json!({"name": name})).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    reply.json["id"].as_str().unwrap().to_owned()
}

fn ids(reply: &Reply) -> Vec<String> {
    reply.json["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items: {}", reply.text))
        .iter()
        .map(|item| item["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn submit_stores_the_command_and_answers_201() {
    let h = seeded().await;
    let reply = submit(
        &h,
        "d1",
        json!({"name": "set_speed", "payload": {"rpm": 1200}, "ttl_ms": 30000}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    let command = &reply.json;
    assert!(command["id"].as_str().unwrap().starts_with("cmd-"));
    assert_eq!(command["device_id"], "d1");
    assert_eq!(command["hub_id"], "h");
    assert_eq!(command["protocol"], "mqtt");
    assert_eq!(command["name"], "set_speed");
    assert_eq!(command["payload"], json!({"rpm": 1200}));
    assert_eq!(command["state"], "queued");
    assert_eq!(command["seq"], 1);
    let created = command["created_at"].as_i64().unwrap();
    assert_eq!(command["expires_at"].as_i64(), Some(created + 30_000));

    let submits = h.commands.submits();
    assert_eq!(submits.len(), 1);
    let (device, request) = &submits[0];
    assert_eq!(device, "d1");
    assert_eq!(request.name, "set_speed");
    assert_eq!(request.ttl_ms, Some(30_000));
    assert!(h.commands.waits().is_empty(), "no wait_ms, no wait");

    // It is stored: readable at once.
    let id = command["id"].as_str().unwrap();
    let read = h.get(&format!("/commands/{id}")).await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(&read.json, command);
}

#[tokio::test]
async fn payload_defaults_to_null_and_ttl_to_never() {
    let h = seeded().await;
    let reply = submit(&h, "d1", json!({"name": "reboot"})).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    assert_eq!(reply.json["payload"], Value::Null);
    assert_eq!(reply.json["expires_at"], Value::Null);
    assert_eq!(h.commands.submits()[0].1.ttl_ms, None);
    // A string payload stays a string.
    let reply = submit(&h, "d1", json!({"name": "mode", "payload": "eco"})).await;
    assert_eq!(reply.json["payload"], "eco");
    assert_eq!(reply.json["seq"], 2);
}

#[tokio::test]
async fn submit_errors_have_documented_statuses() {
    let h = seeded().await;
    let reply = h
        .post(
            "/devices",
            json!({"id": "x1", "hub_id": "h", "protocol": "xmpp"}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED);

    submit(&h, "nope", json!({"name": "reboot"}))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    let reply = submit(&h, "x1", json!({"name": "reboot"})).await;
    reply.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    assert!(
        reply.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no polyglot client for protocol xmpp"),
        "{}",
        reply.text
    );
    for name in ["", "a/b", "a+", "#", &"n".repeat(129)] {
        submit(&h, "d1", json!({"name": name}))
            .await
            .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    }
    for body in [
        json!({}),
        json!({"name": 5}),
        json!({"name": "x", "unknown": 1}),
        json!({"name": "x", "ttl_ms": 0}),
        json!({"name": "x", "ttl_ms": -5}),
        json!({"name": "x", "wait_ms": 60_001}),
        json!({"name": "x", "wait_ms": "5s"}),
    ] {
        submit(&h, "d1", body.clone())
            .await
            .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    }
    h.call_raw(Method::POST, "/devices/d1/commands", "{not json")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    submit(&h, "bad%20id", json!({"name": "x"}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");

    // Too large: refused before the service stores anything.
    let before = h.commands.submits().len();
    let big = "x".repeat(MAX_COMMAND_PAYLOAD);
    submit(&h, "d1", json!({"name": "blob", "payload": big}))
        .await
        .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request");
    assert_eq!(h.commands.submits().len(), before);
    // Exactly at the limit is fine (a string encodes with its two quotes).
    let fits = "x".repeat(MAX_COMMAND_PAYLOAD - 2);
    let reply = submit(&h, "d1", json!({"name": "blob", "payload": fits})).await;
    assert_eq!(reply.status, StatusCode::CREATED);

    // Nothing was stored by the refused requests.
    let list = h.get("/devices/d1/commands").await;
    assert_eq!(ids(&list).len(), 1, "{}", list.text);
}

#[tokio::test]
async fn wait_returns_once_the_device_acknowledges() {
    let h = seeded().await;
    h.commands
        .settle_after(Duration::from_millis(150), CommandState::Acknowledged);
    let started = Instant::now();
    let reply = submit(&h, "d1", json!({"name": "ping", "wait_ms": 5000})).await;
    let elapsed = started.elapsed();
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    assert_eq!(reply.json["state"], "acknowledged");
    assert_eq!(reply.json["reply"], json!({"ok": true}));
    assert!(elapsed >= Duration::from_millis(150), "{elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(3),
        "answered at acknowledgement, not at the timeout: {elapsed:?}"
    );
    assert_eq!(h.commands.waits(), vec![Duration::from_millis(5000)]);
}

#[tokio::test]
async fn wait_returns_at_the_timeout_with_the_current_state() {
    let h = seeded().await;
    h.commands
        .settle_after(Duration::from_secs(5), CommandState::Acknowledged);
    let started = Instant::now();
    let reply = submit(&h, "d1", json!({"name": "ping", "wait_ms": 100})).await;
    let elapsed = started.elapsed();
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    assert_eq!(reply.json["state"], "queued");
    assert!(elapsed >= Duration::from_millis(100), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
}

#[tokio::test]
async fn wait_also_ends_at_a_final_state_other_than_acknowledged() {
    let h = seeded().await;
    h.commands
        .settle_after(Duration::from_millis(50), CommandState::Failed);
    let started = Instant::now();
    let reply = submit(&h, "d1", json!({"name": "ping", "wait_ms": 5000})).await;
    assert_eq!(reply.json["state"], "failed", "{}", reply.text);
    assert!(started.elapsed() < Duration::from_secs(3));
    // wait_ms 0 means no wait at all.
    let reply = submit(&h, "d1", json!({"name": "ping", "wait_ms": 0})).await;
    assert_eq!(reply.json["state"], "queued");
    assert_eq!(h.commands.waits().len(), 1);
}

#[tokio::test]
async fn get_command_errors() {
    let h = seeded().await;
    h.get("/commands/cmd-unknown")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    h.get("/commands/bad%20id")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
}

#[tokio::test]
async fn list_is_newest_first_filtered_and_paged() {
    let h = seeded().await;
    let mut created = Vec::new();
    for n in 0..5 {
        created.push(submit_ok(&h, "d1", &format!("c{n}")).await);
    }
    let other = submit_ok(&h, "d2", "elsewhere").await;
    let cancelled = created[1].clone();
    let reply = h
        .call(Method::POST, &format!("/commands/{cancelled}/cancel"), None)
        .await;
    assert_eq!(reply.status, StatusCode::OK);

    let newest_first: Vec<String> = created.iter().rev().cloned().collect();
    let reply = h.get("/devices/d1/commands").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(ids(&reply), newest_first);
    assert_eq!(reply.json["next"], Value::Null);
    assert!(!ids(&reply).contains(&other), "only d1's commands");

    let reply = h.get("/devices/d1/commands?order=asc").await;
    assert_eq!(ids(&reply), created);

    let reply = h.get("/devices/d1/commands?state=cancelled").await;
    assert_eq!(ids(&reply), vec![cancelled.clone()]);
    let reply = h
        .get("/devices/d1/commands?state=queued,sent&order=asc")
        .await;
    let queued: Vec<String> = created
        .iter()
        .filter(|id| **id != cancelled)
        .cloned()
        .collect();
    assert_eq!(ids(&reply), queued);

    // Paging: two at a time, following `next`, in both orders.
    for (order, expected) in [("desc", &newest_first), ("asc", &created)] {
        let mut seen = Vec::new();
        let mut uri = format!("/devices/d1/commands?order={order}&limit=2");
        loop {
            let reply = h.get(&uri).await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
            let page = ids(&reply);
            assert!(page.len() <= 2);
            seen.extend(page);
            match reply.json["next"].as_str() {
                Some(next) => {
                    uri = format!("/devices/d1/commands?order={order}&limit=2&after={next}");
                }
                None => break,
            }
        }
        assert_eq!(&seen, expected, "order {order}");
    }
}

#[tokio::test]
async fn list_errors() {
    let h = seeded().await;
    h.get("/devices/nope/commands")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    for query in [
        "state=done",
        "state=queued,later",
        "order=sideways",
        "limit=0",
        "limit=10001",
        "limit=x",
        "after=bad%20id",
        "unknown=1",
    ] {
        h.get(&format!("/devices/d1/commands?{query}"))
            .await
            .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    }
    // An empty filter means every state.
    submit_ok(&h, "d1", "x").await;
    assert_eq!(ids(&h.get("/devices/d1/commands?state=").await).len(), 1);
}

#[tokio::test]
async fn cancel_moves_to_cancelled_once() {
    let h = seeded().await;
    let id = submit_ok(&h, "d1", "reboot").await;
    let uri = format!("/commands/{id}/cancel");
    let reply = h.call(Method::POST, &uri, None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json["id"], id.as_str());
    assert_eq!(reply.json["state"], "cancelled");
    assert!(reply.json["finished_at"].is_i64());

    h.call(Method::POST, &uri, None)
        .await
        .assert_error(StatusCode::CONFLICT, "conflict");
    h.call(Method::POST, "/commands/cmd-unknown/cancel", None)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    h.call(Method::POST, "/commands/bad%20id/cancel", None)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    h.get(&uri)
        .await
        .assert_error(StatusCode::METHOD_NOT_ALLOWED, "invalid_request");
}

#[tokio::test]
async fn acknowledged_commands_cannot_be_cancelled() {
    let h = seeded().await;
    h.commands
        .settle_after(Duration::from_millis(1), CommandState::Acknowledged);
    let reply = submit(&h, "d1", json!({"name": "ping", "wait_ms": 5000})).await;
    assert_eq!(reply.json["state"], "acknowledged", "{}", reply.text);
    let id = reply.json["id"].as_str().unwrap();
    h.call(Method::POST, &format!("/commands/{id}/cancel"), None)
        .await
        .assert_error(StatusCode::CONFLICT, "conflict");
}

#[tokio::test]
async fn every_command_route_is_503_without_a_command_service() {
    let h = Harness::without_commands();
    h.seed("g", "h", &["d1"]).await;
    let calls = [
        (
            Method::POST,
            "/devices/d1/commands",
            Some(json!({"name": "x"})),
        ),
        (Method::GET, "/devices/d1/commands", None),
        (Method::GET, "/commands/cmd-1", None),
        (Method::POST, "/commands/cmd-1/cancel", None),
    ];
    for (method, uri, body) in calls {
        let reply = h.call(method.clone(), uri, body).await;
        reply.assert_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
        assert_eq!(
            reply.json["error"]["message"], "commands are not enabled",
            "{method} {uri}"
        );
    }
    assert!(h.commands.submits().is_empty());
}
