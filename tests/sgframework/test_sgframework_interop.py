"""Interop with the real Python sgframework (0.2.x, paho-mqtt 1.x, MQTT 3.1 by default): a
Python Resource driven by a Rust App, a Rust Resource driven by a Python App, and the same
announcements from both implementations. Every test runs against polyhub and Mosquitto."""

from __future__ import annotations

import threading
import time

import sgframework

from sg_harness import WAIT, retained, wait_retained


def wait_until(predicate, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_rust_app_drives_python_resource(broker, peers, observe, rust_peer_bin):
    observer = observe(broker, "+/pysign/+")
    app = peers.rust(rust_peer_bin, "app", broker)
    app.expect("READY")
    resource = peers.python(broker)
    resource.expect("READY")

    # The Python resource's announcements reach the Rust app's availability callbacks.
    app.expect("CALL resourceavailable pysign presence True")
    app.expect("CALL commandavailable pysign state True")
    app.expect("CALL dataavailable pysign speed True")
    app.expect("CALL data pysign state False")  # the echo's default
    app.expect("CALL data pysign speed 0")  # the data default

    # Commands from Rust, echoes from Python.
    app.send("command pysign state True")
    resource.expect("CALL command pysign state True")
    app.expect("CALL data pysign state True")
    wait_retained(broker, "data/pysign/state", "True")  # send_echo_as_retained
    app.send("command pysign upper loud")
    resource.expect("CALL command pysign upper loud")
    app.expect("CALL data pysign upper LOUD")  # the callback's return value is echoed

    # on_change_only on the Python side (commands) ...
    for value in ["a", "a", "b"]:
        app.send(f"command pysign mode {value}")
    observer.wait_for("data/pysign/mode", "b")
    # The echo can reach the observer before the resource's line reaches us.
    resource.expect("CALL command pysign mode b")
    assert resource.calls("CALL command pysign mode") == [
        "CALL command pysign mode a",
        "CALL command pysign mode b",
    ]
    assert observer.payloads("data/pysign/mode") == ["a", "b"]
    # ... and on the Rust side (data, registered on change only).
    for value in ["5", "5", "6", "6"]:
        resource.send(f"data speed {value}")
    observer.wait_for("data/pysign/speed", "6")
    app.expect("CALL data pysign speed 6")
    time.sleep(0.5)
    assert app.calls("CALL data pysign speed") == [
        "CALL data pysign speed 0",
        "CALL data pysign speed 5",
        "CALL data pysign speed 6",
    ]

    # A killed Python resource: its will says False, retained.
    resource.kill()
    app.expect("CALL resourceavailable pysign presence False")
    wait_retained(broker, "resourceavailable/pysign/presence", "False")


def test_python_app_drives_rust_resource(broker, peers, observe, rust_peer_bin):
    observer = observe(broker, "+/rustsign/+")
    received: list[tuple[str, str, str, str]] = []
    lock = threading.Lock()

    def record(_app, messagetype, servicename, signalname, payload):
        with lock:
            received.append((messagetype, servicename, signalname, payload))

    def got(entry) -> bool:
        with lock:
            return entry in received

    app = sgframework.App("pyapp", broker.host, broker.port)
    for signal in ["state", "upper", "silent"]:
        app.register_incoming_data("rustsign", signal, record)
    app.register_incoming_data("rustsign", "speed", record, callback_on_change_only=True)
    app.register_incoming_availability("resourceavailable", "rustsign", "presence", record)
    app.register_incoming_availability("commandavailable", "rustsign", "state", record)
    app.register_incoming_availability("dataavailable", "rustsign", "speed", record)
    app.start(use_threaded_networking=True)
    try:
        resource = peers.rust(rust_peer_bin, "resource", broker)
        resource.expect("READY")
        for entry in [
            ("resourceavailable", "rustsign", "presence", "True"),
            ("commandavailable", "rustsign", "state", "True"),
            ("dataavailable", "rustsign", "speed", "True"),
            ("data", "rustsign", "state", "False"),
            ("data", "rustsign", "speed", "0"),
        ]:
            wait_until(lambda: got(entry), f"{entry}")

        # Echo of the payload (trimmed), echo of the callback's value, no echo.
        app.send_command("rustsign", "state", "  True  ")
        resource.expect("CALL command rustsign state True")
        wait_until(lambda: got(("data", "rustsign", "state", "True")), "state echo")
        wait_retained(broker, "data/rustsign/state", "True")
        app.send_command("rustsign", "upper", "loud")
        wait_until(lambda: got(("data", "rustsign", "upper", "LOUD")), "upper echo")
        app.send_command("rustsign", "silent", "hush")
        resource.expect("CALL command rustsign silent hush")

        # on_change_only on the Rust side (commands) and on the Python side (data).
        for value in ["a", "a", "b"]:
            app.send_command("rustsign", "mode", value)
        observer.wait_for("data/rustsign/mode", "b")
        # The echo can reach the observer before the resource's line reaches us.
        resource.expect("CALL command rustsign mode b")
        assert resource.calls("CALL command rustsign mode") == [
            "CALL command rustsign mode a",
            "CALL command rustsign mode b",
        ]
        assert observer.payloads("data/rustsign/mode") == ["a", "b"]
        for value in ["5", "5", "6"]:
            resource.send(f"data speed {value}")
        resource.send("data odometer 1234")
        observer.wait_for("data/rustsign/odometer", "1234")
        time.sleep(0.5)
        with lock:
            speeds = [p for (t, _, s, p) in received if t == "data" and s == "speed"]
            silent = [p for (t, _, s, p) in received if s == "silent"]
        assert speeds == ["0", "5", "6"]
        assert silent == []
        assert observer.payloads("data/rustsign/silent") == []

        # Retained flags as sgframework sets them.
        store = retained(broker, "+/rustsign/+")
        assert store["resourceavailable/rustsign/presence"] == "True"
        assert store["commandavailable/rustsign/state"] == "True"
        assert store["dataavailable/rustsign/speed"] == "True"
        assert store["data/rustsign/odometer"] == "1234"  # registered as retained
        assert "data/rustsign/speed" not in store  # not retained

        # A killed Rust resource: the will says False.
        resource.kill()
        wait_until(
            lambda: got(("resourceavailable", "rustsign", "presence", "False")), "presence False"
        )
        wait_retained(broker, "resourceavailable/rustsign/presence", "False")
    finally:
        app.stop()


def test_clean_stop_of_rust_resource(broker, peers, rust_peer_bin):
    resource = peers.rust(rust_peer_bin, "resource", broker)
    resource.expect("READY")
    wait_retained(broker, "resourceavailable/rustsign/presence", "True")
    resource.send("stop")
    resource.expect("STOPPED")
    wait_retained(broker, "resourceavailable/rustsign/presence", "False")




def _normalised(store: dict[str, str], name: str) -> dict[str, str]:
    return {topic.replace(f"/{name}/", "/X/"): payload for topic, payload in store.items()}


def test_same_announcements_as_sgframework(broker, peers, rust_peer_bin):
    python_resource = peers.python(broker)
    python_resource.expect("READY")
    rust_resource = peers.rust(rust_peer_bin, "resource", broker)
    rust_resource.expect("READY")
    time.sleep(0.5)
    python_store = _normalised(retained(broker, "+/pysign/+"), "pysign")
    rust_store = _normalised(retained(broker, "+/rustsign/+"), "rustsign")
    assert python_store == rust_store
    assert python_store["dataavailable/X/mode"] == "True"  # echoed commands announce data too
    assert "dataavailable/X/silent" not in python_store


def test_service_manager_withdraws_a_killed_python_resource(broker, peers, observe, rust_peer_bin):
    manager = peers.rust(rust_peer_bin, "servicemanager", broker)
    manager.expect("READY")
    observer = observe(broker, "+/pysign/+")
    resource = peers.python(broker)
    resource.expect("READY")
    observer.wait_for("commandavailable/pysign/state", "True")
    observer.wait_for("dataavailable/pysign/odometer", "True")
    resource.kill()
    withdrawn = [
        "commandavailable/pysign/state",
        "commandavailable/pysign/upper",
        "commandavailable/pysign/mode",
        "commandavailable/pysign/silent",
        "dataavailable/pysign/state",
        "dataavailable/pysign/upper",
        "dataavailable/pysign/mode",
        "dataavailable/pysign/speed",
        "dataavailable/pysign/odometer",
    ]
    for topic in withdrawn:
        observer.wait_for(topic, "False")
    store = retained(broker, "+/pysign/+")
    assert {topic: store[topic] for topic in withdrawn} == {topic: "False" for topic in withdrawn}
    assert store["resourceavailable/pysign/presence"] == "False"


def test_polyhub_run_withdraws_a_killed_python_resource_by_itself(polyhub_broker, peers, observe):
    """`polyhub run` hosts the service manager: no separate manager process is started here."""
    broker = polyhub_broker
    observer = observe(broker, "+/pysign/+")
    resource = peers.python(broker)
    resource.expect("READY")
    observer.wait_for("commandavailable/pysign/state", "True")
    observer.wait_for("dataavailable/pysign/speed", "True")
    resource.kill()
    for topic in ("commandavailable/pysign/state", "dataavailable/pysign/speed"):
        observer.wait_for(topic, "False")
    store = retained(broker, "+/pysign/+")
    assert store["commandavailable/pysign/state"] == "False"
    assert store["dataavailable/pysign/odometer"] == "False"
