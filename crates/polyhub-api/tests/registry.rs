//! Groups, hubs and devices: CRUD, paging, validation and the parser lifecycle they drive.

mod support;

use axum::http::{Method, StatusCode};
use polyhub_store::ParserState;
use serde_json::json;
use support::Harness;

#[tokio::test]
async fn group_crud_round_trip() {
    let h = Harness::new();
    let reply = h
        .post(
            "/groups",
            json!({"id": "acme", "name": "ACME", "metadata": {"tier": 1}}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    assert_eq!(reply.json["id"], "acme");
    assert_eq!(reply.json["name"], "ACME");
    assert_eq!(reply.json["metadata"], json!({"tier": 1}));

    let reply = h.get("/groups/acme").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json["name"], "ACME");

    let reply = h
        .call(
            Method::PATCH,
            "/groups/acme",
            Some(json!({"name": "Acme Inc"})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json["name"], "Acme Inc");
    assert_eq!(
        reply.json["metadata"],
        json!({"tier": 1}),
        "absent fields stay"
    );

    let reply = h.call(Method::DELETE, "/groups/acme", None).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert!(reply.text.is_empty());
    h.get("/groups/acme")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn group_errors_have_stable_codes() {
    let h = Harness::new();
    h.post("/groups", json!({"id": "g1"})).await;
    h.post("/groups", json!({"id": "g1"}))
        .await
        .assert_error(StatusCode::CONFLICT, "conflict");
    h.post("/groups", json!({"id": "bad id!"}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    h.post("/groups", json!({"id": "g2", "metadata": [1]}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    h.get("/groups/nope")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    h.get("/groups/bad%20id")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    h.call(Method::PATCH, "/groups/nope", Some(json!({"name": "x"})))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    h.call(Method::DELETE, "/groups/nope", None)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn malformed_bodies_are_json_400s() {
    let h = Harness::new();
    let unknown_field = h
        .post("/groups", json!({"id": "g1", "colour": "red"}))
        .await;
    unknown_field.assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    assert!(
        unknown_field.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("colour")
    );

    h.call_raw(Method::POST, "/groups", "{\"id\": ")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    h.call_raw(Method::POST, "/groups", "[]")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    h.post("/groups", json!({"name": "no id"}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    h.call(Method::PATCH, "/groups/g1", Some(json!({"name": 5})))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");

    // No JSON content type: 415, still the JSON error shape.
    let request = axum::http::Request::builder()
        .method(Method::POST)
        .uri("/groups")
        .body(axum::body::Body::from("{\"id\":\"g1\"}"))
        .unwrap();
    support::send(&h.router, request)
        .await
        .assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_request");
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    let h = Harness::new();
    let huge = format!(
        "{{\"id\":\"g1\",\"name\":\"{}\"}}",
        "x".repeat(1024 * 1024 + 10)
    );
    h.call_raw(Method::POST, "/groups", &huge)
        .await
        .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request");
    assert!(
        h.get("/groups").await.json["items"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn registry_lists_page_by_id() {
    let h = Harness::new();
    for id in ["g3", "g1", "g5", "g2", "g4"] {
        assert_eq!(
            h.post("/groups", json!({"id": id})).await.status,
            StatusCode::CREATED
        );
    }
    let first = h.get("/groups?limit=2").await;
    assert_eq!(first.status, StatusCode::OK);
    let ids = |reply: &support::Reply| -> Vec<String> {
        reply.json["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&first), ["g1", "g2"]);
    assert_eq!(first.json["next"], "g2");
    let second = h.get("/groups?limit=2&after=g2").await;
    assert_eq!(ids(&second), ["g3", "g4"]);
    assert_eq!(second.json["next"], "g4");
    let last = h.get("/groups?limit=2&after=g4").await;
    assert_eq!(ids(&last), ["g5"]);
    assert!(last.json["next"].is_null());
    // Exactly a full page and nothing after it: no cursor.
    let exact = h.get("/groups?limit=5").await;
    assert_eq!(ids(&exact).len(), 5);
    assert!(exact.json["next"].is_null());
    let all = h.get("/groups").await;
    assert_eq!(ids(&all).len(), 5);
    assert!(all.json["next"].is_null());
}

#[tokio::test]
async fn bad_list_parameters_are_400() {
    let h = Harness::new();
    for uri in [
        "/groups?limit=0",
        "/groups?limit=10001",
        "/groups?limit=ten",
        "/groups?limit=-1",
        "/groups?colour=red",
        "/hubs?group=bad%20id",
        "/devices?hub=..",
        "/devices?limit=99999999999",
    ] {
        h.get(uri)
            .await
            .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    }
    assert_eq!(h.get("/groups?limit=10000").await.status, StatusCode::OK);
}

#[tokio::test]
async fn creating_a_running_hub_starts_its_parser() {
    let h = Harness::new();
    h.post("/groups", json!({"id": "g1"})).await;
    let reply = h
        .post(
            "/hubs",
            json!({"id": "h1", "group_id": "g1", "settings": {"decoder": "json"}}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    assert_eq!(reply.json["desired_state"], "running");
    assert_eq!(reply.json["settings"]["decoder"], "json");
    assert_eq!(h.runtime.calls(), ["start h1"]);

    let reply = h
        .post(
            "/hubs",
            json!({"id": "h2", "group_id": "g1", "desired_state": "stopped"}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(
        h.runtime.calls(),
        ["start h1"],
        "a stopped hub is not started"
    );
}

#[tokio::test]
async fn hub_creation_errors() {
    let h = Harness::new();
    h.post("/hubs", json!({"id": "h1", "group_id": "missing"}))
        .await
        .assert_error(StatusCode::CONFLICT, "conflict");
    h.post("/groups", json!({"id": "g1"})).await;
    h.post("/hubs", json!({"id": "h1", "group_id": "g1"})).await;
    h.post("/hubs", json!({"id": "h1", "group_id": "g1"}))
        .await
        .assert_error(StatusCode::CONFLICT, "conflict");
    h.post("/hubs", json!({"id": "h/2", "group_id": "g1"}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    h.post(
        "/hubs",
        json!({"id": "h3", "group_id": "g1", "settings": {"decoder": "xml"}}),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    assert_eq!(
        h.runtime.calls(),
        ["start h1"],
        "refused hubs start nothing"
    );
}

#[tokio::test]
async fn hub_created_but_parser_failing_is_reported_and_kept() {
    let h = Harness::new();
    h.post("/groups", json!({"id": "g1"})).await;
    h.runtime.fail_next("start", "failed");
    let reply = h.post("/hubs", json!({"id": "h1", "group_id": "g1"})).await;
    reply.assert_error(StatusCode::INTERNAL_SERVER_ERROR, "internal");
    assert!(
        reply.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("was created")
    );
    assert_eq!(h.get("/hubs/h1").await.status, StatusCode::OK);
}

#[tokio::test]
async fn hub_list_filters_by_group() {
    let h = Harness::new();
    h.seed("g1", "h1", &[]).await;
    h.seed("g1", "h2", &[]).await;
    h.seed("g2", "h3", &[]).await;
    let reply = h.get("/hubs?group=g1").await;
    let ids: Vec<&str> = reply.json["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|hub| hub["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["h1", "h2"]);
    let reply = h.get("/hubs?group=g2&limit=1").await;
    assert_eq!(reply.json["items"][0]["id"], "h3");
    assert!(reply.json["next"].is_null());
    assert_eq!(
        h.get("/hubs").await.json["items"].as_array().unwrap().len(),
        3
    );
}

#[tokio::test]
async fn patching_settings_restarts_a_running_parser_only() {
    let h = Harness::new();
    h.seed("g1", "h1", &[]).await;
    h.runtime.clear_calls();

    let reply = h
        .call(Method::PATCH, "/hubs/h1", Some(json!({"name": "renamed"})))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json["name"], "renamed");
    assert!(h.runtime.calls().is_empty(), "a rename does not restart");

    let reply = h
        .call(
            Method::PATCH,
            "/hubs/h1",
            Some(json!({"settings": {"decoder": "number"}})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json["settings"]["decoder"], "number");
    assert_eq!(h.runtime.calls(), ["restart h1"]);

    h.call(Method::POST, "/hubs/h1/stop", None).await;
    h.runtime.clear_calls();
    let reply = h
        .call(
            Method::PATCH,
            "/hubs/h1",
            Some(json!({"settings": {"decoder": "json"}})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        h.runtime.calls().is_empty(),
        "a stopped parser is not restarted"
    );

    h.call(Method::PATCH, "/hubs/h1", Some(json!({"group_id": "g2"})))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    h.call(Method::PATCH, "/hubs/nope", Some(json!({"name": "x"})))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn deleting_a_hub_stops_its_parser_unless_it_owns_devices() {
    let h = Harness::new();
    h.seed("g1", "h1", &["d1"]).await;
    h.runtime.clear_calls();

    h.call(Method::DELETE, "/hubs/h1", None)
        .await
        .assert_error(StatusCode::CONFLICT, "conflict");
    assert!(
        h.runtime.calls().is_empty(),
        "a refused delete leaves the parser running"
    );

    assert_eq!(
        h.call(Method::DELETE, "/devices/d1", None).await.status,
        StatusCode::NO_CONTENT
    );
    h.runtime.clear_calls();
    assert_eq!(
        h.call(Method::DELETE, "/hubs/h1", None).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(h.runtime.calls(), ["stop h1", "hub_deleted h1"]);
    h.get("/hubs/h1")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    h.call(Method::DELETE, "/hubs/h1", None)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");

    // A group that owns hubs cannot be deleted; once empty it can.
    h.seed("g1", "h2", &[]).await;
    h.call(Method::DELETE, "/groups/g1", None)
        .await
        .assert_error(StatusCode::CONFLICT, "conflict");
    h.call(Method::DELETE, "/hubs/h2", None).await;
    assert_eq!(
        h.call(Method::DELETE, "/groups/g1", None).await.status,
        StatusCode::NO_CONTENT
    );
}

#[tokio::test]
async fn deleting_a_hub_the_manager_does_not_know_still_works() {
    let h = Harness::new();
    h.seed("g1", "h1", &[]).await;
    h.runtime.fail_next("stop", "not_found");
    assert_eq!(
        h.call(Method::DELETE, "/hubs/h1", None).await.status,
        StatusCode::NO_CONTENT
    );

    h.seed("g1", "h2", &[]).await;
    h.runtime.fail_next("stop", "failed");
    h.call(Method::DELETE, "/hubs/h2", None)
        .await
        .assert_error(StatusCode::INTERNAL_SERVER_ERROR, "internal");
    assert_eq!(
        h.get("/hubs/h2").await.status,
        StatusCode::OK,
        "not deleted when the parser did not stop"
    );
}

#[tokio::test]
async fn hub_start_stop_restart_return_parser_status() {
    let h = Harness::new();
    h.seed("g1", "h1", &[]).await;
    h.runtime.clear_calls();

    let reply = h.call(Method::POST, "/hubs/h1/stop", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json["state"], "stopped");
    let reply = h.call(Method::POST, "/hubs/h1/start", None).await;
    assert_eq!(reply.json["state"], "running");
    let reply = h.call(Method::POST, "/hubs/h1/restart", None).await;
    assert_eq!(reply.json["state"], "running");
    assert_eq!(reply.json["restarts"], 1);
    assert_eq!(h.runtime.calls(), ["stop h1", "start h1", "restart h1"]);

    for action in ["start", "stop", "restart"] {
        h.call(Method::POST, &format!("/hubs/nope/{action}"), None)
            .await
            .assert_error(StatusCode::NOT_FOUND, "not_found");
    }
    h.runtime.fail_next("start", "conflict");
    h.call(Method::POST, "/hubs/h1/start", None)
        .await
        .assert_error(StatusCode::CONFLICT, "conflict");
    h.runtime.fail_next("restart", "failed");
    h.call(Method::POST, "/hubs/h1/restart", None)
        .await
        .assert_error(StatusCode::INTERNAL_SERVER_ERROR, "internal");
    h.call(Method::GET, "/hubs/h1/start", None)
        .await
        .assert_error(StatusCode::METHOD_NOT_ALLOWED, "invalid_request");
}

#[tokio::test]
async fn device_crud_announces_to_the_runtime() {
    let h = Harness::new();
    h.seed("g1", "h1", &[]).await;
    h.runtime.clear_calls();

    let reply = h
        .post(
            "/devices",
            json!({"id": "d1", "hub_id": "h1", "name": "Boiler", "metadata": {"floor": 2}}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    assert_eq!(reply.json["protocol"], "mqtt");
    assert_eq!(reply.json["hub_id"], "h1");
    assert_eq!(h.runtime.calls(), ["device_added d1"]);

    let reply = h.get("/devices/d1").await;
    assert_eq!(reply.json["name"], "Boiler");
    let reply = h
        .call(
            Method::PATCH,
            "/devices/d1",
            Some(json!({"protocol": "xmpp"})),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json["protocol"], "xmpp");
    assert_eq!(reply.json["name"], "Boiler");

    assert_eq!(
        h.call(Method::DELETE, "/devices/d1", None).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        h.runtime.calls(),
        ["device_added d1", "device_removed h1 d1"]
    );
    h.get("/devices/d1")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    h.call(Method::DELETE, "/devices/d1", None)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn device_errors() {
    let h = Harness::new();
    h.seed("g1", "h1", &["d1"]).await;
    h.runtime.clear_calls();
    h.post("/devices", json!({"id": "d1", "hub_id": "h1"}))
        .await
        .assert_error(StatusCode::CONFLICT, "conflict");
    h.post("/devices", json!({"id": "d2", "hub_id": "nope"}))
        .await
        .assert_error(StatusCode::CONFLICT, "conflict");
    h.post("/devices", json!({"id": "", "hub_id": "h1"}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    h.post("/devices", json!({"id": "d3", "hub": "h1"}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    assert!(
        h.runtime.calls().is_empty(),
        "refused devices are not announced"
    );
    h.call(Method::PATCH, "/devices/d1", Some(json!({"hub_id": "h2"})))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    h.call(Method::PATCH, "/devices/nope", Some(json!({})))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn device_kept_when_the_parser_fails_to_subscribe() {
    let h = Harness::new();
    h.seed("g1", "h1", &[]).await;
    h.runtime.fail_next("device_added", "failed");
    let reply = h
        .post("/devices", json!({"id": "d1", "hub_id": "h1"}))
        .await;
    reply.assert_error(StatusCode::INTERNAL_SERVER_ERROR, "internal");
    assert!(
        reply.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("was created")
    );
    assert_eq!(h.get("/devices/d1").await.status, StatusCode::OK);

    h.runtime.fail_next("device_added", "conflict");
    h.post("/devices", json!({"id": "d2", "hub_id": "h1"}))
        .await
        .assert_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");

    // The manager has no parser for the hub: nothing to subscribe, a plain success.
    h.runtime.fail_next("device_added", "not_found");
    assert_eq!(
        h.post("/devices", json!({"id": "d3", "hub_id": "h1"}))
            .await
            .status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn device_not_deleted_when_the_parser_fails_to_unsubscribe() {
    let h = Harness::new();
    h.seed("g1", "h1", &["d1"]).await;
    h.runtime.fail_next("device_removed", "failed");
    h.call(Method::DELETE, "/devices/d1", None)
        .await
        .assert_error(StatusCode::INTERNAL_SERVER_ERROR, "internal");
    assert_eq!(h.get("/devices/d1").await.status, StatusCode::OK);
}

#[tokio::test]
async fn device_list_filters_by_hub_and_pages() {
    let h = Harness::new();
    h.seed("g1", "h1", &["a1", "a2", "a3"]).await;
    h.seed("g1", "h2", &["b1"]).await;
    let reply = h.get("/devices?hub=h1&limit=2").await;
    let ids: Vec<&str> = reply.json["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a1", "a2"]);
    assert_eq!(reply.json["next"], "a2");
    let reply = h.get("/devices?hub=h1&limit=2&after=a2").await;
    assert_eq!(reply.json["items"].as_array().unwrap().len(), 1);
    assert!(reply.json["next"].is_null());
    assert_eq!(
        h.get("/devices").await.json["items"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
}

#[tokio::test]
async fn parser_status_of_known_unknown_and_unseen_hubs() {
    let h = Harness::new();
    h.seed("g1", "h1", &[]).await;
    h.post("/hubs", json!({"id": "h2", "group_id": "g1", "desired_state": "stopped", "settings": {"isolation": "process"}}))
        .await;

    let reply = h.get("/hubs/h1/parser").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json["state"], "running");

    let reply = h.get("/hubs/h2/parser").await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "a hub the manager never saw is a stopped parser"
    );
    assert_eq!(reply.json["state"], "stopped");
    assert_eq!(reply.json["isolation"], "process");

    h.get("/hubs/nope/parser")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");

    let hub_ids = |json: &serde_json::Value| -> Vec<String> {
        json["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["hub_id"].as_str().unwrap().to_owned())
            .collect()
    };
    // Every hub of the registry is listed, the never-started one as stopped.
    let reply = h.get("/parsers").await;
    assert_eq!(hub_ids(&reply.json), ["h1", "h2"], "sorted by hub id");
    assert_eq!(reply.json["items"][1]["state"], "stopped");
    assert_eq!(reply.json["next"], serde_json::Value::Null);

    h.call(Method::POST, "/hubs/h2/start", None).await;
    let reply = h.get("/parsers").await;
    assert_eq!(
        serde_json::from_value::<ParserState>(reply.json["items"][1]["state"].clone()).unwrap(),
        ParserState::Running
    );

    // Pages follow the hub ids.
    h.post(
        "/hubs",
        json!({"id": "h3", "group_id": "g1", "desired_state": "stopped"}),
    )
    .await;
    let first = h.get("/parsers?limit=2").await;
    assert_eq!(hub_ids(&first.json), ["h1", "h2"]);
    assert_eq!(first.json["next"], "h2");
    let second = h.get("/parsers?limit=2&after=h2").await;
    assert_eq!(hub_ids(&second.json), ["h3"]);
    h.get("/parsers?limit=0")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");

    // A deleted hub is gone from the list.
    let reply = h.call(Method::DELETE, "/hubs/h3", None).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert_eq!(hub_ids(&h.get("/parsers").await.json), ["h1", "h2"]);
}
