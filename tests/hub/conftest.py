"""Fixtures of the hub suite (issue 4): every test gets a fresh `polyhub run` with its own data
directory, MQTT and HTTP listeners on free ports of 127.0.0.1, and a per-test time bound.

polyhub is found through POLYHUB_BIN, else `target/debug/polyhub` of this repository.
HTTP goes through urllib; devices are paho-mqtt 1.x clients and `mosquitto_pub`.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from hub_harness import Controller, MqttClient, Polyhub  # noqa: E402

# Upper bound for any single test, set-up and tear-down included: a hung hub must fail the
# test, never hang the suite.
TEST_TIME_LIMIT = 60


def polyhub_binary() -> str:
    return os.environ.get("POLYHUB_BIN") or str(REPO_ROOT / "target" / "debug" / "polyhub")


def pytest_report_header(config):
    return f"hub suite: polyhub at {polyhub_binary()}"


@pytest.fixture(autouse=True)
def time_limit():
    """Fail (not hang) any test that outlives TEST_TIME_LIMIT seconds."""

    def expired(_signum, _frame):
        raise TimeoutError(f"test exceeded {TEST_TIME_LIMIT}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TEST_TIME_LIMIT)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def hub_factory(tmp_path):
    """Start polyhubs (optionally with a TOML config); each must exit 0 on SIGTERM at tear-down."""
    started: list[Polyhub] = []

    def start(config: str | None = None) -> Polyhub:
        workdir = tmp_path / f"polyhub{len(started)}"
        workdir.mkdir()
        server = Polyhub(polyhub_binary(), workdir, config=config)
        started.append(server)
        return server.start()

    yield start
    errors = []
    for server in started:
        try:
            server.stop()
        except AssertionError as error:
            errors.append(str(error))
        finally:
            server.kill()
    for server in started:
        # Shown by pytest only when the test failed: polyhub's side of the story.
        print(server.log_tail(80))
    if errors:
        pytest.fail("\n".join(errors))


@pytest.fixture
def polyhub(hub_factory) -> Polyhub:
    """A fresh `polyhub run` with the embedded defaults."""
    return hub_factory()


@pytest.fixture
def api(polyhub):
    return polyhub.api


@pytest.fixture
def mqtt_clients(polyhub):
    """`mqtt_clients(client_id, **options)` connects a paho client (closed at the end);
    `mqtt_clients.controller(reply_topics)` connects a Controller."""
    started: list[MqttClient] = []
    numbers = itertools.count()

    class Factory:
        def __call__(self, client_id: str | None = None, **options) -> MqttClient:
            client = MqttClient(polyhub.mqtt_port, client_id or f"test-client-{next(numbers)}", **options)
            started.append(client)
            return client

        def controller(self, reply_topics: list[str]) -> Controller:
            client = Controller(polyhub.mqtt_port, f"test-controller-{next(numbers)}", reply_topics)
            started.append(client)
            return client

    yield Factory()
    for client in started:
        try:
            client.close()
        except Exception:  # noqa: BLE001 - a client that is already gone needs no closing
            pass
