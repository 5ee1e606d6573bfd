"""Commands over MQTT (issue 5) against `polyhub run` and its embedded broker: hub-style paho
devices that reply on `/{hub}/{device}/cmd_reply`, the real Python sgframework and the Rust SDK
as echoing resources, offline queueing, ordering, expiry, a restart in the middle, cancel and the
API's refusals. States and the order of their timestamps are asserted exactly.

Hub-style devices here keep a persistent MQTT session (clean session 0) subscribed to their
command topic: commands go out the moment the broker reports the device connected, before a
clean-session device could have subscribed again (see docs/commands.md, "Devices").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import sgframework
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from hub_harness import (
    HOST, ApiError, CommandDevice, MqttClient, command_in_state, restart, wait_until,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tests" / "sgframework"))

from sg_harness import Peer  # noqa: E402

# Long enough for a command to go out if it wrongly were to, short enough for a fast suite.
SETTLE = 0.5


def submit(api, device: str, name: str, payload=None, **options) -> dict:
    return api.post(f"/devices/{device}/commands", {"name": name, "payload": payload, **options})


def error_of(call) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call()
    return caught.value


def known_device(polyhub, hub: str, device: str) -> None:
    """Gives `device` a persistent session subscribed to its command topic, then leaves it
    offline (as the API reports it)."""
    CommandDevice(polyhub.mqtt_port, hub, device, clean=False).close()
    wait_until(lambda: not polyhub.api.get(f"/devices/{device}/presence")["online"], f"{device} offline")


def assert_steps_in_order(command: dict, *steps: str) -> None:
    """The named timestamps are all set and never decrease, from created_at on."""
    times = [command["created_at"]] + [command[step] for step in steps]
    assert None not in times, command
    assert times == sorted(times), command


def test_offline_commands_go_out_in_order_and_replies_settle_them(polyhub, api):
    api.add_group("g")
    api.add_hub("h", "g")
    api.add_device("d1", "h")
    known_device(polyhub, "h", "d1")

    sent = [
        submit(api, "d1", "led", "on"),
        submit(api, "d1", "led", "off"),
        submit(api, "d1", "reboot", {"delay_s": 1}),
    ]
    for command in sent:
        assert command["state"] == "queued"
        assert command["device_id"] == "d1" and command["hub_id"] == "h"
        assert command["protocol"] == "mqtt"
        assert command["attempts"] == 0
        assert (command["sent_at"], command["delivered_at"], command["acknowledged_at"]) == (None, None, None)
    assert [c["seq"] for c in sent] == sorted(c["seq"] for c in sent)
    assert len({c["seq"] for c in sent}) == 3
    time.sleep(SETTLE)
    assert [api.get(f"/commands/{c['id']}")["state"] for c in sent] == ["queued"] * 3

    device = CommandDevice(polyhub.mqtt_port, "h", "d1", clean=False)
    try:
        received = device.wait_commands(3)
        assert received == [{"id": c["id"], "name": c["name"], "payload": c["payload"]} for c in sent]
        for command in sent:
            delivered = command_in_state(api, command["id"], "delivered")
            assert delivered["attempts"] == 1
            assert_steps_in_order(delivered, "sent_at", "delivered_at")
        # In order: each went out no earlier than the one before it.
        sent_times = [api.get(f"/commands/{c['id']}")["sent_at"] for c in sent]
        assert sent_times == sorted(sent_times)

        device.reply(sent[0]["id"], "ok", result={"led": "on"})
        acknowledged = command_in_state(api, sent[0]["id"], "acknowledged", "failed")
        assert acknowledged["state"] == "acknowledged"
        assert acknowledged["reply"] == {"led": "on"}
        assert acknowledged["finished_at"] is None and acknowledged["reason"] is None
        assert_steps_in_order(acknowledged, "sent_at", "delivered_at", "acknowledged_at")

        device.reply(sent[1]["id"], "error", reason="led driver busy")
        failed = command_in_state(api, sent[1]["id"], "failed", "acknowledged")
        assert failed["state"] == "failed"
        assert failed["reason"] == "led driver busy"
        assert failed["acknowledged_at"] is None
        assert_steps_in_order(failed, "sent_at", "delivered_at", "finished_at")

        # An answer for an unknown command, and a second answer to a settled one, change nothing.
        device.reply("cmd-00000000000000000000000000", "ok")
        device.reply(sent[0]["id"], "error", reason="too late")
        time.sleep(SETTLE)
        assert api.get(f"/commands/{sent[0]['id']}") == acknowledged
        assert api.get(f"/commands/{sent[2]['id']}")["state"] == "delivered"

        # wait_ms, answered in time: the response is the acknowledged command.
        def answer_the_measure():
            measure = device.wait_commands(4)[3]
            device.reply(measure["id"], "ok", result=42)

        replier = threading.Thread(target=answer_the_measure, daemon=True)
        replier.start()
        started = time.monotonic()
        waited = submit(api, "d1", "measure", None, wait_ms=5000)
        elapsed = time.monotonic() - started
        replier.join(timeout=5)
        assert waited["state"] == "acknowledged"
        assert waited["reply"] == 42
        assert_steps_in_order(waited, "sent_at", "delivered_at", "acknowledged_at")
        assert elapsed < 4.5

        # wait_ms without an answer: the command as it is at the timeout.
        started = time.monotonic()
        unanswered = submit(api, "d1", "ping", None, wait_ms=400)
        assert time.monotonic() - started >= 0.35
        assert unanswered["state"] == "delivered"

        # The CLI waits the same way (and prints the API's JSON with --output json).
        def answer_the_cli():
            sixth = device.wait_commands(6)[5]
            device.reply(sixth["id"], "ok", result="on")

        replier = threading.Thread(target=answer_the_cli, daemon=True)
        replier.start()
        result = polyhub.cli("command", "send", "d1", "led", "--payload", '"on"', "--wait", "5s",
                             "--output", "json")
        replier.join(timeout=5)
        assert result.returncode == 0, result.stderr
        printed = json.loads(result.stdout)
        assert (printed["state"], printed["name"], printed["payload"], printed["reply"]) == (
            "acknowledged", "led", "on", "on")

        listed = api.get("/devices/d1/commands", state="acknowledged", order="asc")
        assert [c["id"] for c in listed["items"]] == [sent[0]["id"], waited["id"], printed["id"]]
        assert listed["next"] is None
        unfinished = api.get("/devices/d1/commands", state="queued,sent,delivered")
        assert [c["id"] for c in unfinished["items"]] == [unanswered["id"], sent[2]["id"]]
    finally:
        device.close()


def test_an_expired_command_never_goes_out(polyhub, api):
    api.add_group("g")
    api.add_hub("h", "g")
    api.add_device("d2", "h")
    known_device(polyhub, "h", "d2")

    short = submit(api, "d2", "blink", 1, ttl_ms=300)
    assert short["expires_at"] == short["created_at"] + 300
    later = submit(api, "d2", "blink", 2)
    assert later["expires_at"] is None

    expired = command_in_state(api, short["id"], "expired", timeout=5)
    assert expired["reason"] == "expired before it could be sent"
    assert expired["sent_at"] is None and expired["attempts"] == 0
    assert expired["finished_at"] >= expired["expires_at"]
    assert api.get(f"/commands/{later['id']}")["state"] == "queued"

    device = CommandDevice(polyhub.mqtt_port, "h", "d2", clean=False)
    try:
        assert device.wait_commands(1) == [{"id": later["id"], "name": "blink", "payload": 2}]
        time.sleep(SETTLE)
        assert [c["id"] for c in device.received()] == [later["id"]]
        assert api.get(f"/commands/{short['id']}") == expired
        # Expiry also ends a command that went out but was never answered.
        answered_late = submit(api, "d2", "blink", 3, ttl_ms=300)
        assert device.wait_commands(2)[1]["id"] == answered_late["id"]
        gone = command_in_state(api, answered_late["id"], "expired", timeout=5)
        assert gone["reason"] == "expired before the device acknowledged it"
        assert_steps_in_order(gone, "sent_at", "delivered_at", "finished_at")
        device.reply(answered_late["id"], "ok")
        time.sleep(SETTLE)
        assert api.get(f"/commands/{answered_late['id']}")["state"] == "expired"
    finally:
        device.close()


def test_a_restart_loses_no_command_and_resends_no_acknowledged_one(polyhub, api):
    api.add_group("g")
    api.add_hub("h", "g")
    api.add_device("d3", "h")
    known_device(polyhub, "h", "d3")

    device = CommandDevice(polyhub.mqtt_port, "h", "d3", clean=False)
    done = submit(api, "d3", "setup", "a")
    unanswered = submit(api, "d3", "setup", "b")
    first = device.wait_commands(2)
    assert [c["id"] for c in first] == [done["id"], unanswered["id"]]
    device.reply(done["id"], "ok", result="done")
    command_in_state(api, done["id"], "acknowledged")
    assert command_in_state(api, unanswered["id"], "delivered")["attempts"] == 1
    device.close()
    wait_until(lambda: not api.get("/devices/d3/presence")["online"], "d3 offline")

    queued = [submit(api, "d3", "step", n) for n in range(3)]
    time.sleep(0.2)
    assert [api.get(f"/commands/{c['id']}")["state"] for c in queued] == ["queued"] * 3

    restart(polyhub)  # SIGTERM (exit 0 asserted), then the same data directory again
    api = polyhub.api
    assert [api.get(f"/commands/{c['id']}")["state"] for c in queued] == ["queued"] * 3
    assert api.get(f"/commands/{done['id']}")["state"] == "acknowledged"

    device = CommandDevice(polyhub.mqtt_port, "h", "d3", clean=False)
    try:
        # The unanswered one goes out again (first: it is older), then the queued ones in order;
        # the acknowledged one does not.
        expected = [unanswered] + queued
        again = device.wait_commands(len(expected))
        assert [c["id"] for c in again] == [c["id"] for c in expected]
        assert [c["payload"] for c in again] == ["b", 0, 1, 2]
        for command in expected:
            device.reply(command["id"], "ok", result=command["payload"])
        for command in expected:
            settled = command_in_state(api, command["id"], "acknowledged")
            assert settled["reply"] == command["payload"]
            assert_steps_in_order(settled, "sent_at", "delivered_at", "acknowledged_at")
        assert api.get(f"/commands/{unanswered['id']}")["attempts"] == 2
        assert [api.get(f"/commands/{c['id']}")["attempts"] for c in queued] == [1, 1, 1]
        time.sleep(SETTLE)
        assert [c["id"] for c in device.received()] == [c["id"] for c in expected]
        assert api.get(f"/commands/{done['id']}")["attempts"] == 1
    finally:
        device.close()


def test_an_mqtt5_device_replies_to_the_response_topic_by_correlation_data(polyhub, api):
    api.add_group("g")
    api.add_hub("h", "g")
    api.add_device("d5", "h")
    device = MqttClient(polyhub.mqtt_port, "d5", protocol=mqtt.MQTTv5)
    try:
        device.subscribe("/h/d5/cmd")
        wait_until(lambda: api.get("/devices/d5/presence")["online"], "d5 online")
        command = submit(api, "d5", "calibrate", [1, 2])
        message = device.wait_message(lambda m: m.topic == "/h/d5/cmd", "the command")
        assert json.loads(message.payload) == {"id": command["id"], "name": "calibrate", "payload": [1, 2]}
        assert message.properties.CorrelationData == command["id"].encode()
        assert message.properties.ResponseTopic == "/h/d5/cmd_reply"
        # MQTT 5 request/response: a reply without "id" on the response topic; the correlation
        # data says which command it answers.
        properties = Properties(PacketTypes.PUBLISH)
        properties.CorrelationData = message.properties.CorrelationData
        device.publish(message.properties.ResponseTopic,
                       json.dumps({"status": "ok", "result": "calibrated"}), properties=properties)
        acknowledged = command_in_state(api, command["id"], "acknowledged")
        assert acknowledged["reply"] == "calibrated"
        # Malformed replies are ignored: the next command is unaffected by them.
        pending = submit(api, "d5", "calibrate", None)
        device.wait_message(lambda m: json.loads(m.payload)["id"] == pending["id"], "the second command")
        for junk in ["not json", "[1]", '{"status": "maybe", "id": "%s"}' % pending["id"],
                     '{"status": "ok"}']:
            device.publish("/h/d5/cmd_reply", junk)
        time.sleep(SETTLE)
        assert api.get(f"/commands/{pending['id']}")["state"] == "delivered"
    finally:
        device.close()


def test_a_python_sgframework_resource_echo_acknowledges(polyhub, api):
    api.add_group("g")
    api.add_hub("sg", "g", channels="sgframework")
    api.add_device("lamp", "sg")
    calls: list[tuple[str, str, str, str]] = []
    lock = threading.Lock()

    def on_command(_resource, messagetype, servicename, signalname, payload):
        with lock:
            calls.append((messagetype, servicename, signalname, payload))
        return payload.upper()  # echoed instead of the command's payload

    # Queued before the resource exists: it goes out once the resource announces its presence.
    early = submit(api, "lamp", "led", "on")
    time.sleep(0.2)
    assert api.get(f"/commands/{early['id']}")["state"] == "queued"

    connected = threading.Event()
    resource = sgframework.Resource("lamp", HOST, polyhub.mqtt_port)
    resource.on_broker_connectionstatus_info = lambda _r, status: connected.set() if status else None
    resource.register_incoming_command("led", on_command, echo=True)
    resource.register_incoming_command("level", on_command, echo=True)
    resource.start(use_threaded_networking=True)
    try:
        assert connected.wait(10), "sgframework resource did not connect"
        acknowledged = command_in_state(api, early["id"], "acknowledged", "failed", "expired")
        assert acknowledged["state"] == "acknowledged"
        assert acknowledged["reply"] == "ON"  # the echoed value, as a string
        assert_steps_in_order(acknowledged, "sent_at", "acknowledged_at")

        # Non-string payloads go out as their JSON text; the echo acknowledges the oldest first.
        waited = submit(api, "lamp", "level", {"percent": 40}, wait_ms=5000)
        assert waited["state"] == "acknowledged"
        assert waited["reply"] == '{"PERCENT":40}'
        with lock:
            assert calls == [
                ("command", "lamp", "led", "on"),
                ("command", "lamp", "level", '{"percent":40}'),
            ]
        # The echo is also telemetry of the resource's sgframework hub (decoded by the hub).
        wait_until(lambda: api.all_rows("lamp", signal="led"), "the echo stored as telemetry")
    finally:
        resource.stop()


@pytest.fixture(scope="module")
def sdk_peer_binary() -> str:
    """The SDK's sgframework peer (as tests/sgframework finds it); built outside the per-test
    time limit when POLYHUB_SDK_PEER does not name it."""
    explicit = os.environ.get("POLYHUB_SDK_PEER")
    if explicit:
        return explicit
    subprocess.run(
        ["cargo", "build", "-q", "-p", "polyhub-sdk", "--example", "sgframework_peer"],
        cwd=REPO_ROOT, check=True, timeout=900,
    )
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO_ROOT / "target")
    return str(target / "debug" / "examples" / "sgframework_peer")


def test_a_rust_sdk_resource_echo_acknowledges(polyhub, api, tmp_path, sdk_peer_binary):
    api.add_group("g")
    api.add_hub("sg", "g", channels="sgframework")
    api.add_device("rustsign", "sg")
    peer = Peer([sdk_peer_binary, "resource", HOST, str(polyhub.mqtt_port)], "rustsign", tmp_path)
    try:
        peer.expect("READY")
        wait_until(lambda: api.get("/devices/rustsign/presence")["online"], "rustsign online")
        first = submit(api, "rustsign", "upper", "loud", wait_ms=5000)
        second = submit(api, "rustsign", "upper", "quiet", wait_ms=5000)
        peer.expect("CALL command rustsign upper loud")
        peer.expect("CALL command rustsign upper quiet")
        assert (first["state"], first["reply"]) == ("acknowledged", "LOUD")
        assert (second["state"], second["reply"]) == ("acknowledged", "QUIET")
        assert first["acknowledged_at"] <= second["acknowledged_at"]
        # A command the resource does not echo stays unacknowledged.
        silent = submit(api, "rustsign", "silent", "hush", wait_ms=300)
        peer.expect("CALL command rustsign silent hush")
        assert silent["state"] in ("sent", "delivered")
    finally:
        peer.close()


def test_api_refusals_and_cancel(polyhub, api):
    api.add_group("g")
    api.add_hub("h", "g")
    api.add_device("d4", "h")
    api.add_device("elsewhere", "h", protocol="coap")
    known_device(polyhub, "h", "d4")

    unknown = error_of(lambda: submit(api, "nosuch", "led"))
    assert (unknown.status, unknown.code) == (404, "not_found")
    for name in ["", "a/b", "a+", "#", "x" * 129]:
        bad = error_of(lambda: submit(api, "d4", name))
        assert (bad.status, bad.code) == (400, "invalid_request"), name
    no_client = error_of(lambda: submit(api, "elsewhere", "led"))
    assert no_client.status == 400 and "no polyglot client for protocol" in no_client.message
    too_large = error_of(lambda: submit(api, "d4", "blob", "x" * (64 * 1024)))
    assert too_large.status == 413
    submit(api, "d4", "blob", "x" * (64 * 1024 - 2))  # exactly 64 KiB of JSON is accepted
    assert error_of(lambda: api.get("/commands/cmd-00000000000000000000000000")).status == 404
    assert error_of(lambda: api.post("/commands/cmd-00000000000000000000000000/cancel")).status == 404
    assert error_of(lambda: submit(api, "d4", "led", wait_ms=60001)).status == 400
    assert error_of(lambda: submit(api, "d4", "led", ttl_ms=0)).status == 400
    assert error_of(lambda: api.get("/devices/d4/commands", state="lost")).status == 400

    dropped = submit(api, "d4", "led", "dropped")
    kept = submit(api, "d4", "led", "kept")
    cancelled = api.post(f"/commands/{dropped['id']}/cancel")
    assert cancelled["state"] == "cancelled"
    assert cancelled["reason"] == "cancelled"
    assert cancelled["sent_at"] is None
    assert_steps_in_order(cancelled, "finished_at")
    again = error_of(lambda: api.post(f"/commands/{dropped['id']}/cancel"))
    assert (again.status, again.code) == (409, "conflict")

    device = CommandDevice(polyhub.mqtt_port, "h", "d4", clean=False)
    try:
        blob, arrived = device.wait_commands(2)
        assert blob["name"] == "blob" and len(blob["payload"]) == 64 * 1024 - 2
        assert arrived["id"] == kept["id"]
        device.reply(kept["id"], "ok")
        acknowledged = command_in_state(api, kept["id"], "acknowledged")
        assert acknowledged["reply"] is None
        conflict = error_of(lambda: api.post(f"/commands/{kept['id']}/cancel"))
        assert (conflict.status, conflict.code) == (409, "conflict")
        time.sleep(SETTLE)
        assert dropped["id"] not in [c["id"] for c in device.received()]
        assert len(device.received()) == 2
        assert api.get(f"/commands/{dropped['id']}") == cancelled
    finally:
        device.close()


def test_a_clean_session_device_gets_what_was_queued_once_it_has_subscribed(polyhub, api):
    """A device without a stored session connects, and only then subscribes (CONNACK first,
    as every client does): commands queued for it wait until it can receive them, and none
    is recorded delivered while nothing could receive it."""
    api.add_group("g")
    api.add_hub("h", "g")
    api.add_device("d1", "h")
    sent = [submit(api, "d1", "led", "on"), submit(api, "d1", "led", "off")]
    device = CommandDevice(polyhub.mqtt_port, "h", "d1", clean=True)
    try:
        received = device.wait_commands(2)
        assert [c["id"] for c in received] == [c["id"] for c in sent]
        for command in sent:
            device.reply(command["id"], "ok")
            assert command_in_state(api, command["id"], "acknowledged", "failed")["state"] == "acknowledged"
    finally:
        device.close()


def test_a_device_subscribed_elsewhere_first_gets_its_command_once_it_subscribes_to_it(polyhub, api):
    """Connected and subscribed to another topic is not enough: the command waits (still
    `queued`, not recorded as delivered to nobody) until the device subscribes to its command
    topic, then goes out at once."""
    api.add_group("g")
    api.add_hub("h", "g")
    api.add_device("d1", "h")
    command = submit(api, "d1", "led", "on")
    device = MqttClient(polyhub.mqtt_port, "d1")
    try:
        device.subscribe("/h/d1/config")
        time.sleep(1.5)  # the service tried and was told to wait
        assert api.get(f"/commands/{command['id']}")["state"] == "queued"
        assert device.count() == 0
        device.subscribe("/h/d1/cmd")
        subscribed = time.monotonic()
        received = device.wait_message(lambda m: m.topic == "/h/d1/cmd", "the queued command")
        assert json.loads(received.payload)["id"] == command["id"]
        # At once, not at the service's next retry (about half a second away at this point).
        assert time.monotonic() - subscribed < 0.3
        assert command_in_state(api, command["id"], "delivered")["attempts"] == 1
    finally:
        device.close()
