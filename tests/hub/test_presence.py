"""Presence: a device is online while an MQTT client with its id is connected to the embedded
broker, and its last-seen time advances with what it sends. sgframework resources are devices
too: `data/<resource>/<signal>` is ingested by a hub with sgframework channels, and the retained
`resourceavailable/<resource>/presence` topic sets their presence."""

from __future__ import annotations

import time

from hub_harness import wait_until


def typed(value) -> str:
    """A value's type and content as text; JSON numbers compare as floats (22 == 22.0)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(float(value))
    return repr(value)


def presence(api, device: str) -> dict:
    return api.get(f"/devices/{device}/presence")


def test_presence_follows_the_device_connection(api, mqtt_clients):
    api.add_group("g")
    api.add_hub("h5", "g")
    api.add_device("p1", "h5")
    api.add_device("p2", "h5")
    before = presence(api, "p1")
    assert before["device_id"] == "p1"
    assert before["online"] is False

    device = mqtt_clients("p1")  # client id == device id
    online = wait_until(lambda: (lambda p: p if p["online"] else None)(presence(api, "p1")), "p1 online")
    assert online["last_seen"] is not None
    assert online["changed_at"] is not None

    # Anything heard from the device moves last_seen forward.
    time.sleep(0.05)
    device.publish("/h5/p1/data", "1")
    wait_until(lambda: presence(api, "p1")["last_seen"] > online["last_seen"], "p1 last_seen advancing")

    listed = {item["device_id"]: item for item in api.get("/hubs/h5/presence")["items"]}
    assert listed["p1"]["online"] is True
    assert listed["p2"]["online"] is False

    device.close()
    offline = wait_until(lambda: (lambda p: p if not p["online"] else None)(presence(api, "p1")), "p1 offline")
    assert offline["changed_at"] >= online["changed_at"]
    assert offline["last_seen"] >= online["last_seen"]
    # Another device's connection says nothing about p1.
    mqtt_clients("p2")
    wait_until(lambda: presence(api, "p2")["online"], "p2 online")
    assert presence(api, "p1")["online"] is False


def test_sgframework_resources_are_ingested_with_presence(api, mqtt_clients):
    api.add_group("g")
    hub = api.add_hub("sg", "g", channels="sgframework")
    assert hub["settings"]["channels"] == "sgframework"
    api.add_device("pump7", "sg")
    api.add_device("quiet", "sg")

    resource = mqtt_clients("sg-resource-process")  # not the device id: presence is topic-driven
    resource.publish("resourceavailable/pump7/presence", "online", retain=True)
    wait_until(lambda: presence(api, "pump7")["online"], "pump7 online from its presence topic")

    resource.publish("data/pump7/temperature", "21.5")
    resource.publish("data/pump7/running", "True")
    resource.publish("data/pump7/mode", "eco")
    resource.publish("data/pump7/temperature", "22")
    # Not a registered device, and not the data of one: never ingested.
    resource.publish("data/stranger/temperature", "99")

    def four_rows():
        rows = api.all_rows("pump7")
        return rows if len(rows) >= 4 else None

    rows = wait_until(four_rows, "4 rows of pump7")
    assert len(rows) == 4, rows
    got = sorted((row["signal"], typed(row["value"])) for row in rows)
    assert got == sorted(
        [("temperature", "21.5"), ("running", "True"), ("mode", "'eco'"), ("temperature", "22.0")]
    )
    latest = {row["signal"]: row["value"] for row in api.get("/devices/pump7/telemetry/latest")["items"]}
    assert latest == {"temperature": 22.0, "running": True, "mode": "eco"}
    assert api.all_rows("quiet") == []

    resource.publish("resourceavailable/pump7/presence", "offline", retain=True)
    wait_until(lambda: not presence(api, "pump7")["online"], "pump7 offline from its presence topic")
    assert presence(api, "quiet")["online"] is False
