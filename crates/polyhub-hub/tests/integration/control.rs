//! The control channels: register_cmd and hub_manager/cmd, with their replies.

use std::sync::Arc;

use bytes::Bytes;
use polyhub_hub::HubError;
use polyhub_store::{DesiredState, HubSettings, NewDevice, ParserState, Store};
use serde_json::{Value, json};

use crate::support::*;

fn reply(outgoing: &polyhub_hub::bus::Outgoing) -> Value {
    serde_json::from_slice(&outgoing.payload).unwrap()
}

async fn running_hub() -> Fixture {
    let store = Arc::new(MemoryStore::new());
    add_hub(&store, "h1", HubSettings::default(), DesiredState::Running).await;
    add_device(&store, "h1", "d1").await;
    let hub = Fixture::start(store, fast_config()).await;
    hub.wait_running("h1").await;
    hub
}

#[tokio::test]
async fn an_accepted_add_replies_after_the_parser_subscribed() {
    let mut hub = running_hub().await;
    assert!(
        hub.bus
            .subscriptions("polyhub-hub-manager")
            .contains("/+/register_cmd")
    );
    hub.bus.publish(
        "/h1/register_cmd",
        r#"{"action":"add","device":"d2","name":"Boiler","request_id":"r1"}"#,
    );
    let replies = hub.bus.wait_published("/h1/register_reply", 1).await;
    // The subscription exists as soon as the reply does.
    assert!(
        hub.bus
            .subscriptions("polyhub-parser-h1")
            .contains("/h1/d2/data")
    );
    assert_eq!(
        reply(&replies[0]),
        json!({"request_id": "r1", "status": "accepted", "action": "add", "hub": "h1", "device": "d2"})
    );
    assert_eq!(replies[0].qos, 1);
    assert!(!replies[0].retain);
    assert_eq!(hub.store.get_device("d2").await.unwrap().name, "Boiler");
    // Announced to whoever follows registrations (the command service's protocol clients).
    let announced = hub
        .registered
        .try_recv()
        .expect("the new device is announced");
    assert_eq!(
        (announced.id.as_str(), announced.name.as_str()),
        ("d2", "Boiler")
    );
    wait_until("status counts the device", || {
        hub.manager.status("h1").unwrap().devices == 2
    })
    .await;

    hub.bus.publish("/h1/d2/data", "5");
    wait_until("row of the new device", || hub.store.rows("d2").len() == 1).await;
    hub.stop().await;
}

#[tokio::test]
async fn malformed_and_conflicting_register_requests_are_rejected_and_change_nothing() {
    let hub = running_hub().await;
    let subscriptions_before = hub.bus.subscriptions("polyhub-parser-h1");
    let requests = [
        ("/h1/register_cmd", "{not json", json!("invalid_json")),
        (
            "/h1/register_cmd",
            r#"{"action":"add","device":"d9","colour":"red","request_id":"x"}"#,
            json!("invalid_request"),
        ),
        (
            "/h1/register_cmd",
            r#"{"action":"add","device":"bad/id"}"#,
            json!("invalid_request"),
        ),
        (
            "/h1/register_cmd",
            r#"{"action":"add","device":"d1"}"#,
            json!("conflict"),
        ),
        (
            "/h1/register_cmd",
            r#"{"action":"remove","device":"nope"}"#,
            json!("unknown_device"),
        ),
    ];
    for (count, (topic, payload, _)) in requests.iter().enumerate() {
        hub.bus.publish(topic, payload.to_string());
        hub.bus
            .wait_published("/h1/register_reply", count + 1)
            .await;
    }
    let replies = hub.bus.published_on("/h1/register_reply");
    for (outgoing, (_, _, code)) in replies.iter().zip(&requests) {
        let reply = reply(outgoing);
        assert_eq!(reply["status"], "rejected", "{reply}");
        assert_eq!(&reply["code"], code, "{reply}");
        assert!(
            reply["reason"]
                .as_str()
                .is_some_and(|reason| !reason.is_empty())
        );
    }
    assert_eq!(reply(&replies[1])["request_id"], "x");
    assert_eq!(reply(&replies[0])["request_id"], Value::Null);

    hub.bus
        .publish("/nohub/register_cmd", r#"{"action":"add","device":"d7"}"#);
    let unknown = hub.bus.wait_published("/nohub/register_reply", 1).await;
    assert_eq!(reply(&unknown[0])["code"], "unknown_hub");

    assert!(hub.store.get_device("d9").await.is_err());
    assert!(hub.store.get_device("d7").await.is_err());
    assert_eq!(
        hub.bus.subscriptions("polyhub-parser-h1"),
        subscriptions_before
    );
    hub.stop().await;
}

#[tokio::test]
async fn remove_unsubscribes_then_deletes() {
    let hub = running_hub().await;
    hub.bus
        .publish("/h1/register_cmd", r#"{"action":"remove","device":"d1"}"#);
    let replies = hub.bus.wait_published("/h1/register_reply", 1).await;
    assert_eq!(reply(&replies[0])["status"], "accepted");
    assert_eq!(reply(&replies[0])["action"], "remove");
    assert!(
        !hub.bus
            .subscriptions("polyhub-parser-h1")
            .contains("/h1/d1/data")
    );
    assert!(hub.store.get_device("d1").await.is_err());
    hub.stop().await;
}

#[tokio::test]
async fn a_request_with_a_response_topic_is_answered_there_too() {
    let hub = running_hub().await;
    let correlation = Bytes::from_static(b"corr-1");
    hub.bus.publish_request(
        "/hub_manager/cmd",
        r#"{"action":"restart","hub":"h1","request_id":"q"}"#,
        Some("client/replies"),
        Some(correlation.clone()),
    );
    let direct = hub.bus.wait_published("client/replies", 1).await;
    let general = hub.bus.wait_published("/hub_manager/reply", 1).await;
    assert_eq!(direct[0].correlation_data, Some(correlation));
    assert_eq!(reply(&direct[0]), reply(&general[0]));
    assert_eq!(
        reply(&direct[0]),
        json!({"request_id": "q", "status": "accepted", "action": "restart", "hub": "h1"})
    );
    hub.stop().await;
}

#[tokio::test]
async fn the_manager_channel_starts_and_stops_hubs_and_persists_the_choice() {
    let store = Arc::new(MemoryStore::new());
    add_hub(&store, "h2", HubSettings::default(), DesiredState::Stopped).await;
    let hub = Fixture::start(store.clone(), fast_config()).await;
    assert_eq!(
        hub.manager.status("h2").unwrap().state,
        ParserState::Stopped
    );

    hub.bus
        .publish("/hub_manager/cmd", r#"{"action":"start","hub":"h2"}"#);
    hub.bus.wait_published("/hub_manager/reply", 1).await;
    hub.wait_running("h2").await;
    assert_eq!(
        store.get_hub("h2").await.unwrap().desired_state,
        DesiredState::Running
    );

    hub.bus
        .publish("/hub_manager/cmd", r#"{"action":"stop","hub":"h2"}"#);
    hub.bus
        .publish("/hub_manager/cmd", r#"{"action":"start","hub":"nope"}"#);
    hub.bus.publish("/hub_manager/cmd", r#"{"action":"start"}"#);
    hub.bus.publish(
        "/hub_manager/cmd",
        r#"{"action":"start","hub":"h2","oops":1}"#,
    );
    let replies = hub.bus.wait_published("/hub_manager/reply", 5).await;
    let codes: Vec<Value> = replies
        .iter()
        .map(|outgoing| {
            let reply = reply(outgoing);
            if reply["status"] == "accepted" {
                reply["action"].clone()
            } else {
                reply["code"].clone()
            }
        })
        .collect();
    assert_eq!(
        codes,
        [
            json!("start"),
            json!("stop"),
            json!("unknown_hub"),
            json!("invalid_request"),
            json!("invalid_request")
        ]
    );
    assert_eq!(
        hub.manager.status("h2").unwrap().state,
        ParserState::Stopped
    );
    assert_eq!(
        store.get_hub("h2").await.unwrap().desired_state,
        DesiredState::Stopped
    );
    hub.stop().await;

    // A new manager honours the persisted choice.
    let again = Fixture::start(store.clone(), fast_config()).await;
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    assert_eq!(
        again.manager.status("h2").unwrap().state,
        ParserState::Stopped
    );
    again.stop().await;
}

#[tokio::test]
async fn the_handle_api_adds_removes_and_reports_unknown_hubs() {
    let hub = running_hub().await;
    let device = hub
        .manager
        .add_device(NewDevice {
            id: "d3".into(),
            hub_id: "h1".into(),
            name: None,
            protocol: None,
            metadata: None,
        })
        .await
        .unwrap();
    assert_eq!(device.hub_id, "h1");
    assert!(
        hub.bus
            .subscriptions("polyhub-parser-h1")
            .contains("/h1/d3/data")
    );
    let duplicate = NewDevice {
        id: "d3".into(),
        hub_id: "h1".into(),
        name: None,
        protocol: None,
        metadata: None,
    };
    assert!(matches!(
        hub.manager.add_device(duplicate).await,
        Err(HubError::Conflict(_))
    ));

    hub.manager.remove_device("d3").await.unwrap();
    assert!(
        !hub.bus
            .subscriptions("polyhub-parser-h1")
            .contains("/h1/d3/data")
    );
    assert!(matches!(
        hub.manager.remove_device("d3").await,
        Err(HubError::NotFound(_))
    ));
    assert!(matches!(
        hub.manager.start_hub("nope").await,
        Err(HubError::NotFound(_))
    ));
    assert!(hub.manager.status("nope").is_none());
    assert!(hub.manager.is_ready());

    // A refused subscription rolls the device back.
    hub.bus.refuse_filter("/h1/d4/data");
    let refused = NewDevice {
        id: "d4".into(),
        hub_id: "h1".into(),
        name: None,
        protocol: None,
        metadata: None,
    };
    assert!(matches!(
        hub.manager.add_device(refused).await,
        Err(HubError::Parser(_))
    ));
    assert!(hub.store.get_device("d4").await.is_err());

    // Devices created by someone else (the API) are announced.
    add_device(&hub.store, "h1", "d5").await;
    let d5 = hub.store.get_device("d5").await.unwrap();
    hub.manager.device_added(&d5).await.unwrap();
    assert!(
        hub.bus
            .subscriptions("polyhub-parser-h1")
            .contains("/h1/d5/data")
    );
    hub.manager.device_removed("h1", "d5").await.unwrap();
    assert!(
        !hub.bus
            .subscriptions("polyhub-parser-h1")
            .contains("/h1/d5/data")
    );

    let manager = hub.manager.clone();
    hub.stop().await;
    assert!(!manager.is_ready());
    assert!(matches!(
        manager.start_hub("h1").await,
        Err(HubError::ShutDown)
    ));
}
