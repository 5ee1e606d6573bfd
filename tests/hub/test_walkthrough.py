"""The README's walk-through end to end: create a group, a hub and a device over the REST API,
publish telemetry with paho-mqtt and with `mosquitto_pub`, and query it back exactly; then the
payload decoders and the dead letters."""

from __future__ import annotations

import math

from hub_harness import mosquitto_pub, wait_until

# A bucket width so wide that every row of a test falls in one bucket (buckets start at
# multiples of it since the epoch; the next boundary is in 2033).
ONE_BUCKET_MS = 1_000_000_000_000


def data_topic(hub: str, device: str) -> str:
    return f"/{hub}/{device}/data"


def wait_rows(api, device: str, count: int, **query) -> list[dict]:
    """All rows of `device` once there are exactly `count` (fails on more, or on a timeout)."""

    def enough():
        rows = api.all_rows(device, **query)
        assert len(rows) <= count, f"{device}: expected {count} rows, got {rows}"
        return rows if len(rows) == count else None

    return wait_until(enough, f"{count} rows of {device}")


def values_by_signal(rows: list[dict]) -> dict[str, list]:
    result: dict[str, list] = {}
    for row in rows:
        result.setdefault(row["signal"], []).append(row["value"])
    return result


def comparable(values: list) -> list:
    """Values as a sorted list that tells booleans, numbers and text apart (True == 1 in
    Python) and ignores 12 vs 12.0 (JSON numbers)."""

    def key(value):
        if isinstance(value, bool):
            return ("bool", value)
        if isinstance(value, (int, float)):
            return ("number", float(value))
        return ("text", value)

    return sorted(key(value) for value in values)


def test_walk_through(api, polyhub, mqtt_clients):
    group = api.add_group("acme", name="Acme Corp", metadata={"plan": "pro"})
    assert group["id"] == "acme"
    assert group["name"] == "Acme Corp"
    assert group["metadata"] == {"plan": "pro"}

    hub = api.add_hub("plant1", "acme")
    assert hub["group_id"] == "acme"
    assert hub["desired_state"] == "running"
    assert hub["settings"]["decoder"] == "auto"
    assert hub["settings"]["channels"] == "hub"
    device = api.add_device("boiler", "plant1", name="Boiler")
    assert device == {**device, "id": "boiler", "hub_id": "plant1", "name": "Boiler", "protocol": "mqtt"}

    # The registry reads back what was created.
    assert [g["id"] for g in api.get("/groups")["items"]] == ["acme"]
    assert [h["id"] for h in api.get("/hubs", group="acme")["items"]] == ["plant1"]
    assert [d["id"] for d in api.get("/devices", hub="plant1")["items"]] == ["boiler"]
    wait_until(lambda: api.parser("plant1")["state"] == "running", "the parser of plant1 running")

    # The device publishes right after POST /devices returned: its channel is subscribed.
    device_client = mqtt_clients("boiler-publisher")
    device_client.publish(data_topic("plant1", "boiler"), '{"temp": 21.5, "water": {"pressure": 1.25}}')
    mosquitto_pub(polyhub.mqtt_port, data_topic("plant1", "boiler"), '{"temp": 22.5, "burner": true}')

    rows = wait_rows(api, "boiler", 4)
    assert all(row["device_id"] == "boiler" for row in rows)
    assert values_by_signal(rows) == {
        "temp": [21.5, 22.5],
        "water.pressure": [1.25],
        "burner": [True],
    }
    assert [row["ts"] for row in rows] == sorted(row["ts"] for row in rows)

    latest = {row["signal"]: row["value"] for row in api.get("/devices/boiler/telemetry/latest")["items"]}
    assert latest == {"temp": 22.5, "water.pressure": 1.25, "burner": True}

    temps = api.get("/devices/boiler/telemetry", signal="temp")
    assert [row["value"] for row in temps["rows"]] == [21.5, 22.5]
    assert temps["next"] is None

    # Paging: one row per page, the cursors walk through both.
    first = api.get("/devices/boiler/telemetry", signal="temp", limit=1)
    assert [row["value"] for row in first["rows"]] == [21.5]
    assert first["next"] is not None
    second = api.get("/devices/boiler/telemetry", signal="temp", limit=1, after=first["next"])
    assert [row["value"] for row in second["rows"]] == [22.5]

    # A time window: from is inclusive, to exclusive.
    first_ts = temps["rows"][0]["ts"]
    window = api.get("/devices/boiler/telemetry", signal="temp", **{"from": first_ts, "to": first_ts + 1})
    assert [row["value"] for row in window["rows"]] == [21.5]

    start, end = temps["rows"][0]["ts"], temps["rows"][-1]["ts"] + 1
    buckets = api.get(
        "/devices/boiler/telemetry/downsample",
        signal="temp", interval=ONE_BUCKET_MS, **{"from": start, "to": end},
    )["items"]
    assert buckets == [{"start": ONE_BUCKET_MS, "count": 2, "min": 21.5, "max": 22.5, "avg": 22.0}]

    status = api.parser("plant1")
    assert status["messages_in"] >= 2
    assert status["rows_written"] >= 4
    assert status["devices"] == 1


def test_decoders_and_dead_letters(api, mqtt_clients):
    api.add_group("g")
    for decoder in ["number", "boolean", "string", "auto", "json"]:
        api.add_hub(f"h-{decoder}", "g", decoder=decoder)
        api.add_device(f"d-{decoder}", f"h-{decoder}")
    client = mqtt_clients()
    sent = {
        "number": [b"42", b" 3.5 ", b"-17", b"abc", b"", b"inf", b"NaN"],
        "boolean": [b"true", b"OFF", b"1", b"0", b"On", b"maybe", b""],
        "string": ["héllo".encode(), b"  spaced  ", b"\xff\xfe", b""],
        "auto": [b'{"a": {"b": 1}, "c": "x"}', b"12", b"on", b"hello world", b"2.5e1", b""],
        "json": [
            b'{"x": 1, "y": "two", "z": false}',
            b"7",
            b"[1, 2]",
            b'{"x": 1, "bad": null}',
            b'{"x": 2, "list": [1]}',
            b"not json",
            ("{" + '"n": {' * 20 + '"leaf": 1' + "}" * 21).encode(),
        ],
    }
    for decoder, payloads in sent.items():
        for payload in payloads:
            client.publish(data_topic(f"h-{decoder}", f"d-{decoder}"), payload)

    expected_rows = {
        "number": {"value": [42.0, 3.5, -17.0]},
        "boolean": {"value": [True, False, True, False, True]},
        "string": {"value": ["héllo", "  spaced  "]},
        "auto": {"a.b": [1], "c": ["x"], "value": [12, True, "hello world", 25.0]},
        "json": {"x": [1], "y": ["two"], "z": [False], "value": [7]},
    }
    expected_dead = {"number": 4, "boolean": 2, "string": 2, "auto": 1, "json": 5}

    for decoder, signals in expected_rows.items():
        count = sum(len(values) for values in signals.values())
        rows = wait_rows(api, f"d-{decoder}", count)
        got = {signal: comparable(values) for signal, values in values_by_signal(rows).items()}
        want = {signal: comparable(values) for signal, values in signals.items()}
        assert got == want, f"decoder {decoder}"

        letters = wait_until(
            lambda: (lambda items: items if len(items) >= expected_dead[decoder] else None)(
                api.dead_letters(f"h-{decoder}")
            ),
            f"{expected_dead[decoder]} dead letters of h-{decoder}",
        )
        assert len(letters) == expected_dead[decoder], letters
        for letter in letters:
            assert letter["hub_id"] == f"h-{decoder}"
            assert letter["device_id"] == f"d-{decoder}"
            assert letter["topic"] == data_topic(f"h-{decoder}", f"d-{decoder}")
            assert letter["reason"], letter
        empties = [letter for letter in letters if letter["payload_len"] == 0]
        if decoder != "json":
            assert [letter["reason"] for letter in empties] == ["empty payload"], decoder

    # The JSON decoder never half-applies a message: no "x": 2 from the one with a list.
    assert all(row["value"] != 2 for row in api.all_rows("d-json", signal="x"))
    # Dead letters keep the payload as text, and are listed newest first across hubs.
    number_letters = api.dead_letters("h-number")
    assert {letter["payload"] for letter in number_letters} == {"abc", "", "inf", "NaN"}
    everything = api.get("/dead-letters", limit=1000)["items"]
    ids = [letter["id"] for letter in everything]
    assert ids == sorted(ids, reverse=True)
    assert len(everything) == sum(expected_dead.values())
    # Non-finite numbers never become rows.
    assert all(math.isfinite(row["value"]) for row in api.all_rows("d-number"))
