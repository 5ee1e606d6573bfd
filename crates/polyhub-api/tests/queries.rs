//! Telemetry, presence, parser events and dead letters.

mod support;

use axum::http::StatusCode;
use polyhub_store::{NewParserEvent, ParserEventKind, Store, Value};
use serde_json::json;
use support::Harness;

const T0: i64 = 1_795_255_200_000; // 2026-11-21T10:00:00Z

async fn with_rows() -> Harness {
    let h = Harness::new();
    h.seed("g1", "h1", &["d1"]).await;
    for i in 0..5 {
        h.store
            .add_row("d1", "temp", T0 + i * 1_000, Value::Number(20.0 + i as f64));
    }
    h.store.add_row("d1", "door", T0 + 500, Value::Bool(true));
    h.store
        .add_row("d1", "door", T0 + 2_500, Value::Text("open".into()));
    h.store.add_row("d2", "temp", T0, Value::Number(99.0));
    h
}

#[tokio::test]
async fn latest_has_one_row_per_signal() {
    let h = with_rows().await;
    let reply = h.get("/devices/d1/telemetry/latest").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json,
        json!({"items": [
            {"device_id": "d1", "signal": "door", "ts": T0 + 2_500, "value": "open"},
            {"device_id": "d1", "signal": "temp", "ts": T0 + 4_000, "value": 24.0},
        ]})
    );
    let reply = h.get("/devices/unknown/telemetry/latest").await;
    assert_eq!(
        reply.json,
        json!({"items": []}),
        "an unregistered device simply has no rows"
    );
    h.get("/devices/bad%20id/telemetry/latest")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
}

#[tokio::test]
async fn range_filters_and_pages() {
    let h = with_rows().await;
    let reply = h.get("/devices/d1/telemetry?signal=temp&limit=2").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let ts = |reply: &support::Reply| -> Vec<i64> {
        reply.json["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["ts"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(ts(&reply), [T0, T0 + 1_000]);
    let cursor = reply.json["next"].as_str().unwrap().to_owned();
    let reply = h
        .get(&format!(
            "/devices/d1/telemetry?signal=temp&limit=2&after={cursor}"
        ))
        .await;
    assert_eq!(ts(&reply), [T0 + 2_000, T0 + 3_000]);

    // Times as RFC 3339 and as milliseconds mean the same.
    let reply = h.get("/devices/d1/telemetry?signal=temp&from=2026-11-21T10:00:01Z&to=2026-11-21T11:00:03%2B01:00").await;
    assert_eq!(ts(&reply), [T0 + 1_000, T0 + 2_000]);
    let reply = h
        .get(&format!(
            "/devices/d1/telemetry?signal=temp&from={}&to={}",
            T0 + 1_000,
            T0 + 3_000
        ))
        .await;
    assert_eq!(ts(&reply), [T0 + 1_000, T0 + 2_000]);
    assert!(reply.json["next"].is_null());

    let all = h.get("/devices/d1/telemetry").await;
    assert_eq!(all.json["rows"].as_array().unwrap().len(), 7);
}

#[tokio::test]
async fn range_rejects_bad_parameters() {
    let h = with_rows().await;
    for uri in [
        "/devices/d1/telemetry?from=yesterday",
        "/devices/d1/telemetry?to=2026-11-21",
        "/devices/d1/telemetry?from=2000&to=1000",
        "/devices/d1/telemetry?limit=0",
        "/devices/d1/telemetry?limit=10001",
        "/devices/d1/telemetry?after=not-a-cursor",
        "/devices/d1/telemetry?sort=desc",
        "/devices/..%2F/telemetry",
    ] {
        h.get(uri)
            .await
            .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    }
}

#[tokio::test]
async fn downsample_buckets_numbers() {
    let h = with_rows().await;
    let from = T0;
    let to = T0 + 5_000;
    let reply = h
        .get(&format!(
            "/devices/d1/telemetry/downsample?signal=temp&from={from}&to={to}&interval=2s"
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(
        reply.json,
        json!({"items": [
            {"start": T0, "count": 2, "min": 20.0, "max": 21.0, "avg": 20.5},
            {"start": T0 + 2_000, "count": 2, "min": 22.0, "max": 23.0, "avg": 22.5},
            {"start": T0 + 4_000, "count": 1, "min": 24.0, "max": 24.0, "avg": 24.0},
        ]})
    );
    let reply = h
        .get(&format!(
            "/devices/d1/telemetry/downsample?signal=temp&from={from}&to={to}&interval=5000"
        ))
        .await;
    assert_eq!(reply.json["items"][0]["count"], 5);
    // Defaults: the hour before now, one-minute buckets; these rows are in 2026, so nothing
    // unless the clock is past them — either way the call succeeds.
    assert_eq!(
        h.get("/devices/d1/telemetry/downsample?signal=temp")
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn downsample_rejects_bad_parameters() {
    let h = with_rows().await;
    for uri in [
        "/devices/d1/telemetry/downsample",
        "/devices/d1/telemetry/downsample?signal=",
        "/devices/d1/telemetry/downsample?signal=temp&interval=0",
        "/devices/d1/telemetry/downsample?signal=temp&interval=5y",
        "/devices/d1/telemetry/downsample?signal=temp&from=1000&to=1000",
        "/devices/d1/telemetry/downsample?signal=temp&from=0&to=100001&interval=1",
        "/devices/d1/telemetry/downsample?signal=temp&from=x",
    ] {
        h.get(uri)
            .await
            .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    }
    // Exactly the maximum number of buckets is allowed.
    assert_eq!(
        h.get("/devices/d1/telemetry/downsample?signal=temp&from=0&to=100000&interval=1")
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn presence_of_devices_and_hubs() {
    let h = Harness::new();
    h.seed("g1", "h1", &["d1", "d2"]).await;
    h.store.set_presence("d2", true, T0).await.unwrap();

    let reply = h.get("/devices/d2/presence").await;
    assert_eq!(
        reply.json,
        json!({"device_id": "d2", "online": true, "last_seen": T0, "changed_at": T0})
    );
    let reply = h.get("/devices/d1/presence").await;
    assert_eq!(reply.json["online"], false);
    assert!(reply.json["last_seen"].is_null());
    h.get("/devices/nope/presence")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");

    let reply = h.get("/hubs/h1/presence").await;
    assert_eq!(reply.status, StatusCode::OK);
    let items = reply.json["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["device_id"], "d1");
    assert_eq!(items[1]["online"], true);
    h.get("/hubs/nope/presence")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn parser_events_newest_first() {
    let h = Harness::new();
    h.seed("g1", "h1", &[]).await;
    for (at, kind) in [
        (1, ParserEventKind::Started),
        (2, ParserEventKind::Failed),
        (3, ParserEventKind::Restarted),
    ] {
        let reason = (kind == ParserEventKind::Failed).then(|| "storage error".to_owned());
        h.store
            .record_parser_event(NewParserEvent {
                hub_id: "h1".into(),
                kind,
                reason,
                at,
            })
            .await
            .unwrap();
    }
    let reply = h.get("/hubs/h1/parser/events").await;
    let kinds: Vec<&str> = reply.json["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["restarted", "failed", "started"]);
    assert_eq!(reply.json["items"][1]["reason"], "storage error");
    let reply = h.get("/hubs/h1/parser/events?limit=1").await;
    assert_eq!(reply.json["items"].as_array().unwrap().len(), 1);
    h.get("/hubs/nope/parser/events")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    h.get("/hubs/h1/parser/events?limit=0")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
}

#[tokio::test]
async fn dead_letters_page_backwards() {
    let h = Harness::new();
    for i in 0..5 {
        h.store
            .add_dead_letter(if i % 2 == 0 { "h1" } else { "h2" }, "empty payload");
    }
    let ids = |reply: &support::Reply| -> Vec<i64> {
        reply.json["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_i64().unwrap())
            .collect()
    };
    let reply = h.get("/dead-letters?limit=2").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(ids(&reply), [5, 4]);
    assert_eq!(reply.json["next"], "4");
    assert_eq!(reply.json["items"][0]["reason"], "empty payload");
    let reply = h.get("/dead-letters?limit=2&before=4").await;
    assert_eq!(ids(&reply), [3, 2]);
    let reply = h.get("/dead-letters?limit=2&before=2").await;
    assert_eq!(ids(&reply), [1]);
    assert!(reply.json["next"].is_null());
    let reply = h.get("/dead-letters?hub=h1").await;
    assert_eq!(ids(&reply), [5, 3, 1]);
    for uri in [
        "/dead-letters?before=x",
        "/dead-letters?limit=0",
        "/dead-letters?hub=a%2Fb",
        "/dead-letters?hubs=h1",
    ] {
        h.get(uri)
            .await
            .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
    }
}

#[tokio::test]
async fn storage_outage_is_503() {
    let h = Harness::new();
    h.seed("g1", "h1", &[]).await;
    h.store.set_down(true);
    h.get("/hubs/h1")
        .await
        .assert_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    h.get("/devices/d1/telemetry/latest")
        .await
        .assert_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
}
