"""The MQTT control channels: `/<hub>/register_cmd` adds and removes devices at runtime, and
`/hub_manager/cmd` starts and stops parsers. Every control message gets exactly one reply;
malformed ones are rejected and change nothing."""

from __future__ import annotations

import json
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from hub_harness import ApiError, wait_until

MANAGER_CMD = "/hub_manager/cmd"
MANAGER_REPLY = "/hub_manager/reply"


def register_topics(hub: str) -> tuple[str, str]:
    return f"/{hub}/register_cmd", f"/{hub}/register_reply"


def device_ids(api, hub: str) -> list[str]:
    return [device["id"] for device in api.get("/devices", hub=hub)["items"]]


def assert_rejected(reply: dict, code: str) -> None:
    assert reply["status"] == "rejected", reply
    assert reply["code"] == code, reply
    assert isinstance(reply["reason"], str) and reply["reason"], reply


def test_register_add_and_remove_with_replies(api, mqtt_clients):
    api.add_group("g")
    api.add_hub("h2", "g")
    command_topic, reply_topic = register_topics("h2")
    control = mqtt_clients.controller([reply_topic])

    reply = control.command(
        command_topic,
        {"action": "add", "device": "r1", "name": "Sensor", "metadata": {"room": 4}, "request_id": "a1"},
        reply_topic,
    )
    assert reply == {"request_id": "a1", "status": "accepted", "action": "add", "hub": "h2", "device": "r1"}
    # Accepted means subscribed: publish at once, the value is ingested.
    publisher = mqtt_clients("r1-publisher")
    publisher.publish("/h2/r1/data", '{"v": 1}')
    device = api.get("/devices/r1")
    assert (device["hub_id"], device["name"], device["metadata"]) == ("h2", "Sensor", {"room": 4})
    rows = wait_until(lambda: api.all_rows("r1"), "the row of r1")
    assert [(row["signal"], row["value"]) for row in rows] == [("v", 1)]

    # Malformed or impossible commands: rejected, nothing changes.
    bad_commands = [
        (b'{"action": "add", "device": ', "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        ({"action": "explode", "device": "r2", "request_id": "b1"}, "invalid_request"),
        ({"action": "add", "device": "bad/id"}, "invalid_request"),
        ({"action": "add", "device": ""}, "invalid_request"),
        ({"action": "add", "device": "r3", "colour": "red"}, "invalid_request"),
        ({"action": "add"}, "invalid_request"),
        ({"action": "add", "device": "r4", "metadata": [1, 2]}, "invalid_request"),
        (b"[]", "invalid_request"),
        ({"action": "add", "device": "r1", "request_id": "dup"}, "conflict"),
        ({"action": "remove", "device": "ghost", "request_id": "c1"}, "unknown_device"),
    ]
    for payload, code in bad_commands:
        reply = control.command(command_topic, payload, reply_topic)
        assert_rejected(reply, code)
        if isinstance(payload, dict) and "request_id" in payload and code != "invalid_request":
            assert reply["request_id"] == payload["request_id"], reply
    assert device_ids(api, "h2") == ["r1"]

    # A device of another hub cannot be removed through this hub's channel.
    api.add_hub("other", "g")
    api.add_device("elsewhere", "other")
    reply = control.command(command_topic, {"action": "remove", "device": "elsewhere"}, reply_topic)
    assert reply["status"] == "rejected", reply
    assert device_ids(api, "other") == ["elsewhere"]

    reply = control.command(command_topic, {"action": "remove", "device": "r1", "request_id": "z"}, reply_topic)
    assert reply == {"request_id": "z", "status": "accepted", "action": "remove", "hub": "h2", "device": "r1"}
    try:
        api.get("/devices/r1")
        raise AssertionError("r1 still exists after an accepted remove")
    except ApiError as error:
        assert error.status == 404
    # Removed means unsubscribed: a publish is no longer ingested (give it time to arrive).
    publisher.publish("/h2/r1/data", '{"v": 2}')
    time.sleep(0.5)
    assert api.dead_letters("h2") == []
    assert api.parser("h2")["devices"] == 0


def test_replies_follow_the_mqtt5_response_topic(api, mqtt_clients):
    api.add_group("g")
    api.add_hub("h5r", "g")
    client = mqtt_clients("v5-controller", protocol=mqtt.MQTTv5)
    client.subscribe("answers/me")
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = "answers/me"
    properties.CorrelationData = b"corr-42"
    client.publish("/h5r/register_cmd", '{"action": "add", "device": "v5dev"}', properties=properties)
    message = client.wait_message(lambda m: m.topic == "answers/me", "a reply on the response topic")
    assert message.properties.CorrelationData == b"corr-42"
    reply = json.loads(message.payload)
    assert reply == {"request_id": None, "status": "accepted", "action": "add", "hub": "h5r", "device": "v5dev"}
    assert device_ids(api, "h5r") == ["v5dev"]


def test_hub_manager_stop_keeps_messages_until_start(api, mqtt_clients):
    api.add_group("g")
    api.add_hub("h3", "g", decoder="number")
    api.add_device("d3", "h3")
    control = mqtt_clients.controller([MANAGER_REPLY])
    wait_until(lambda: api.parser("h3")["state"] == "running", "h3 running")

    reply = control.command(MANAGER_CMD, {"action": "stop", "hub": "h3", "request_id": "s1"}, MANAGER_REPLY)
    assert reply == {**reply, "request_id": "s1", "status": "accepted", "action": "stop", "hub": "h3"}
    wait_until(lambda: api.parser("h3")["state"] == "stopped", "h3 stopped")
    assert api.get("/hubs/h3")["desired_state"] == "stopped"

    publisher = mqtt_clients("d3-publisher")
    for value in range(1, 6):
        publisher.publish("/h3/d3/data", str(value))
    time.sleep(0.3)
    assert api.all_rows("d3") == [], "a stopped hub ingested"

    reply = control.command(MANAGER_CMD, {"action": "start", "hub": "h3", "request_id": "s2"}, MANAGER_REPLY)
    assert reply["status"] == "accepted" and reply["action"] == "start", reply
    rows = wait_until(lambda: (lambda r: r if len(r) >= 5 else None)(api.all_rows("d3")), "5 rows after start")
    assert sorted(row["value"] for row in rows) == [1, 2, 3, 4, 5]
    assert api.get("/hubs/h3")["desired_state"] == "running"

    reply = control.command(MANAGER_CMD, {"action": "restart", "hub": "h3"}, MANAGER_REPLY)
    assert reply["status"] == "accepted" and reply["request_id"] is None, reply
    wait_until(lambda: api.parser("h3")["state"] == "running", "h3 running after restart")

    for payload, code in [
        ({"action": "stop", "hub": "nope", "request_id": "u"}, "unknown_hub"),
        ({"action": "pause", "hub": "h3"}, "invalid_request"),
        ({"action": "stop"}, "invalid_request"),
        ({"action": "stop", "hub": "h3", "force": True}, "invalid_request"),
        (b"stop h3", "invalid_json"),
    ]:
        assert_rejected(control.command(MANAGER_CMD, payload, MANAGER_REPLY), code)
    # None of the rejected commands stopped h3.
    assert api.parser("h3")["state"] == "running"
    assert api.get("/hubs/h3")["desired_state"] == "running"
    assert len(api.all_rows("d3")) == 5


def test_stop_or_restart_right_after_creation_is_not_a_failure(api):
    """A parser asked to stop while it is still starting was asked to: no failure is recorded
    and no failure restart is counted. (Repeated: the window is short.)"""
    api.add_group("g")
    hubs = []
    for index in range(6):
        hub = f"quick-{index}"
        hubs.append(hub)
        api.add_hub(hub, "g")
        action = "restart" if index % 2 == 0 else "stop"
        status = api.post(f"/hubs/{hub}/{action}")
        assert status["state"] != "backoff", status
        assert (status["restarts"], status["last_error"]) == (0, None), status
        if action == "stop":
            assert status["state"] == "stopped", status
    for hub in hubs:
        kinds = [event["kind"] for event in api.get(f"/hubs/{hub}/parser/events")["items"]]
        assert "failed" not in kinds, f"{hub}: {kinds}"
    wait_until(lambda: api.parser("quick-0")["state"] == "running", "quick-0 running")
