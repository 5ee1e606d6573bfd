"""Helpers of the sgframework interop suite: child processes speaking a line protocol, and a
paho observer recording topics, payloads and retain flags."""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import paho.mqtt.client as mqtt

if TYPE_CHECKING:
    from interop_brokers import Broker

WAIT = 15.0


class Peer:
    """A child process speaking the line protocol of sg_resource.py / sgframework_peer."""

    def __init__(self, args: list[str], name: str, workdir: Path):
        self.name = name
        self.stderr_path = workdir / f"{name}.stderr"
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.stderr_path.open("w"), text=True, bufsize=1,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def expect(self, line: str, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while line not in self.lines:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{self.name}: {line!r} never printed; got {self.lines}\n"
                        f"stderr: {self.stderr_path.read_text()[-3000:]}"
                    )
                self._changed.wait(min(left, 0.2))

    def calls(self, prefix: str) -> list[str]:
        with self._changed:
            return [line for line in self.lines if line.startswith(prefix)]

    def send(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def close(self) -> None:
        self.kill()


class Observer:
    """A paho 1.x client subscribed to a filter, recording (topic, payload, retain)."""

    def __init__(self, broker: Broker, topic_filter: str = "#"):
        self.seen: list[tuple[str, str, bool]] = []
        self._changed = threading.Condition()
        subscribed = queue.Queue()
        self.client = mqtt.Client(client_id=f"obs-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv311)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_args: subscribed.put(True)
        # Subscribe once CONNACK is in (as sgframework does), not pipelined behind CONNECT.
        self.client.on_connect = lambda client, *_args: client.subscribe(topic_filter, qos=1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        subscribed.get(timeout=WAIT)

    def _on_message(self, _client, _userdata, message) -> None:
        with self._changed:
            self.seen.append((message.topic, message.payload.decode(), bool(message.retain)))
            self._changed.notify_all()

    def wait_for(self, topic: str, payload: str, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(t == topic and p == payload for t, p, _ in self.seen):
                left = deadline - time.monotonic()
                assert left > 0, f"{topic} = {payload!r} never arrived; seen {self.seen}"
                self._changed.wait(min(left, 0.2))

    def payloads(self, topic: str) -> list[str]:
        with self._changed:
            return [p for t, p, _ in self.seen if t == topic]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def retained(broker: Broker, topic_filter: str, settle: float = 0.5) -> dict[str, str]:
    """The retained messages under a filter now, as a fresh subscriber receives them."""
    observer = Observer(broker, topic_filter)
    time.sleep(settle)
    observer.close()
    return {topic: payload for topic, payload, retain in observer.seen if retain}


def wait_retained(broker: Broker, topic: str, payload: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        store = retained(broker, topic, settle=0.3)
        if store.get(topic) == payload:
            return
        assert time.monotonic() < deadline, f"retained {topic} is {store.get(topic)!r}, not {payload!r}"
