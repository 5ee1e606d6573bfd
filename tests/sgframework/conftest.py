"""Fixtures of the sgframework interop suite: every test runs against polyhub's binary and
against Mosquitto; helpers to run the Rust peer and the Python resource as processes, and a
paho observer that records topics, payloads and retain flags.

polyhub is found through POLYHUB_BIN, else `target/debug/polyhub` of this repository. The Rust
peer (`cargo run -p polyhub-sdk --example sgframework_peer`) is found through
POLYHUB_SDK_PEER, else built with cargo into $CARGO_TARGET_DIR (default `target/`).
The broker helpers are those of tests/interop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO_ROOT / "tests" / "interop"))
sys.path.insert(0, str(HERE))

from interop_brokers import Broker  # noqa: E402
from sg_harness import Observer, Peer  # noqa: E402

TEST_TIME_LIMIT = 90


def polyhub_binary() -> str:
    return os.environ.get("POLYHUB_BIN") or str(REPO_ROOT / "target" / "debug" / "polyhub")


@pytest.fixture(scope="session")
def rust_peer_bin() -> str:
    explicit = os.environ.get("POLYHUB_SDK_PEER")
    if explicit:
        return explicit
    subprocess.run(
        ["cargo", "build", "-q", "-p", "polyhub-sdk", "--example", "sgframework_peer"],
        cwd=REPO_ROOT, check=True, timeout=900,
    )
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO_ROOT / "target")
    return str(target / "debug" / "examples" / "sgframework_peer")


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


@pytest.fixture(params=["polyhub", "mosquitto"])
def broker(request, tmp_path):
    broker = Broker(request.param, tmp_path / "broker", polyhub_binary())
    broker.start()
    try:
        yield broker
    finally:
        print(broker.log_tail(40))
        broker.stop()


@pytest.fixture
def peers(tmp_path):
    """Start peers: `peers.rust(mode, broker)`, `peers.python(broker)`; all killed at the end."""
    started: list[Peer] = []

    class Starter:
        @staticmethod
        def rust(bin_path: str, mode: str, broker: Broker) -> Peer:
            peer = Peer([bin_path, mode, broker.host, str(broker.port)], f"rust-{mode}", tmp_path)
            started.append(peer)
            return peer

        @staticmethod
        def python(broker: Broker) -> Peer:
            script = str(HERE / "sg_resource.py")
            peer = Peer([sys.executable, script, broker.host, str(broker.port)], "pysign", tmp_path)
            started.append(peer)
            return peer

    yield Starter
    for peer in started:
        peer.close()


@pytest.fixture
def observe():
    """`observe(broker, filter)` starts an Observer that is closed at the end."""
    started: list[Observer] = []

    def start(broker: Broker, topic_filter: str = "#") -> Observer:
        observer = Observer(broker, topic_filter)
        started.append(observer)
        return observer

    yield start
    for observer in started:
        observer.close()


@pytest.fixture
def polyhub_broker(tmp_path):
    """polyhub only: for what `polyhub run` itself provides (the built-in service manager)."""
    broker = Broker("polyhub", tmp_path / "polyhub", polyhub_binary())
    broker.start()
    try:
        yield broker
    finally:
        print(broker.log_tail(40))
        broker.stop()
