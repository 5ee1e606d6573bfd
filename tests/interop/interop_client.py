"""A thin, blocking wrapper around paho-mqtt 1.6 for tests: every wait is bounded.

paho is used as an independent client: the wrapper only turns its callbacks into events and a
message queue, it never builds packets itself.
"""

from __future__ import annotations

import queue
import re
import ssl
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

WAIT = 5.0
WILL_CLIENT = Path(__file__).with_name("interop_will_client.py")
# paho's debug log line for each PUBLISH read off the wire (paho 1.6 format).
WIRE_PUBLISH = re.compile(r"Received PUBLISH \(d(\d), q(\d), r(\d), m(\d+)\), '(.*)'")

PROTOCOLS = {
    "v31": mqtt.MQTTv31,
    "v311": mqtt.MQTTv311,
    "v5": mqtt.MQTTv5,
}


def unique(prefix: str = "t") -> str:
    """A short unique name, so tests never see each other's topics or sessions."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@dataclass
class Received:
    """A delivered message, copied out of paho's MQTTMessage."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    properties: Optional[Properties] = None

    def prop(self, name: str, default=None):
        if self.properties is None:
            return default
        return getattr(self.properties, name, default)


@dataclass
class ConnAck:
    rc: int
    session_present: bool
    properties: Optional[Properties] = None

    def prop(self, name: str, default=None):
        if self.properties is None:
            return default
        return getattr(self.properties, name, default)


@dataclass
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


def connect_properties(**values) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    for name, value in values.items():
        setattr(props, name, value)
    return props


def publish_properties(**values) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    for name, value in values.items():
        setattr(props, name, value)
    return props


def rc_value(rc) -> Optional[int]:
    """paho passes ints for 3.x and ReasonCodes objects for v5 (or None)."""
    if rc is None:
        return None
    return getattr(rc, "value", rc)


class Client:
    """A connected paho client running its network loop in a background thread."""

    def __init__(
        self,
        broker,
        version: str = "v311",
        client_id: Optional[str] = None,
        clean: bool = True,
        session_expiry: Optional[int] = None,
        keepalive: int = 30,
        will: Optional[Will] = None,
        tls: Optional[dict] = None,
        port: Optional[int] = None,
        properties: Optional[Properties] = None,
    ):
        self.version = version
        self.protocol = PROTOCOLS[version]
        self.client_id = unique("c") if client_id is None else client_id
        self.clean = clean
        self.session_expiry = session_expiry
        self.keepalive = keepalive
        self.host = broker.host
        self.port = port if port is not None else broker.port
        self.connack: Optional[ConnAck] = None
        self.disconnect_rc = None
        self.messages: "queue.Queue[Received]" = queue.Queue()
        # (topic, qos) of each PUBLISH in the order it came off the socket. paho hands QoS 2
        # messages to the application only after PUBREL, so `messages` order can differ.
        self.wire_order: list[tuple[str, int]] = []
        self._connected = threading.Event()
        self._disconnected = threading.Event()
        self._subacks: dict[int, list] = {}
        self._suback_event = threading.Condition()
        self._connect_properties = properties

        if self.protocol == mqtt.MQTTv5:
            self.paho = mqtt.Client(self.client_id, protocol=self.protocol)
        else:
            self.paho = mqtt.Client(self.client_id, clean_session=clean, protocol=self.protocol)
        # No automatic reconnect while a test runs: a reconnect would hide takeovers and
        # disconnections the tests want to see.
        self.paho.reconnect_delay_set(min_delay=120, max_delay=120)
        self.paho.max_inflight_messages_set(100)
        if will is not None:
            self.paho.will_set(will.topic, will.payload, will.qos, will.retain)
        if tls is not None:
            self.paho.tls_set(
                ca_certs=str(tls["ca"]),
                certfile=str(tls["cert"]) if tls.get("cert") else None,
                keyfile=str(tls["key"]) if tls.get("key") else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        self.paho.on_connect = self._on_connect
        self.paho.on_disconnect = self._on_disconnect
        self.paho.on_message = self._on_message
        self.paho.on_subscribe = self._on_subscribe
        self.paho.on_log = self._on_log

    # ----- callbacks -------------------------------------------------------------------------

    def _on_connect(self, _client, _userdata, flags, rc, properties=None):
        self.connack = ConnAck(
            rc=rc_value(rc),
            session_present=bool(flags.get("session present", 0)),
            properties=properties,
        )
        self._connected.set()

    def _on_disconnect(self, _client, _userdata, rc, properties=None):
        self.disconnect_rc = rc_value(rc)
        self._disconnected.set()

    def _on_message(self, _client, _userdata, message):
        self.messages.put(
            Received(
                topic=message.topic,
                payload=bytes(message.payload),
                qos=message.qos,
                retain=bool(message.retain),
                dup=bool(message.dup),
                properties=getattr(message, "properties", None),
            )
        )

    def _on_log(self, _client, _userdata, _level, text):
        match = WIRE_PUBLISH.match(text)
        if match:
            topic = match.group(5).split("', ")[0]
            self.wire_order.append((topic, int(match.group(2))))

    def _on_subscribe(self, _client, _userdata, mid, granted, properties=None):
        with self._suback_event:
            self._subacks[mid] = [rc_value(code) for code in granted]
            self._suback_event.notify_all()

    # ----- actions -----------------------------------------------------------------------------

    def _send_connect(self) -> None:
        if self.protocol == mqtt.MQTTv5:
            props = self._connect_properties
            if self.session_expiry is not None:
                props = props or Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self.session_expiry
            self.paho.connect(
                self.host,
                self.port,
                self.keepalive,
                clean_start=self.clean,
                properties=props,
            )
        else:
            self.paho.connect(self.host, self.port, self.keepalive)

    def attempt(self, timeout: float = 3.0) -> Optional[ConnAck]:
        """Try to connect, driving paho's loop in this thread (so a TLS failure surfaces here, not
        in a background thread). The CONNACK, or None when the connection failed without one."""
        try:
            self._send_connect()
            deadline = time.monotonic() + timeout
            while not self._connected.is_set() and time.monotonic() < deadline:
                if self.paho.loop(0.1) != mqtt.MQTT_ERR_SUCCESS:
                    break
        except (OSError, ValueError):  # ssl.SSLError is an OSError
            return None
        finally:
            try:
                self.paho.disconnect()
                self.paho.loop(0.1)
            except (OSError, ValueError):
                pass
            self._disconnected.set()
        return self.connack

    def start(self, timeout: float = WAIT) -> ConnAck:
        """Connect and wait for the CONNACK, whatever its code."""
        self._send_connect()
        self.paho.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise AssertionError(
                f"no CONNACK for {self.client_id!r} within {timeout}s "
                f"(disconnected: {self._disconnected.is_set()}, rc {self.disconnect_rc})"
            )
        return self.connack

    def connect(self, timeout: float = WAIT) -> "Client":
        """Connect and insist on success."""
        connack = self.start(timeout)
        if connack.rc != 0:
            self.close()
            raise AssertionError(f"CONNACK refused {self.client_id!r}: code {connack.rc}")
        return self

    def subscribe(self, topic: str, qos: int = 0, options: Optional[SubscribeOptions] = None,
                  properties: Optional[Properties] = None, timeout: float = WAIT) -> list:
        if self.protocol == mqtt.MQTTv5:
            result, mid = self.paho.subscribe(
                topic, options=options or SubscribeOptions(qos=qos), properties=properties
            )
        else:
            result, mid = self.paho.subscribe(topic, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS, f"subscribe failed locally: {result}"
        deadline = time.monotonic() + timeout
        with self._suback_event:
            while mid not in self._subacks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no SUBACK for {topic!r} within {timeout}s")
                self._suback_event.wait(remaining)
            return self._subacks.pop(mid)

    def publish(self, topic: str, payload=b"", qos: int = 0, retain: bool = False,
                properties: Optional[Properties] = None, timeout: float = WAIT) -> None:
        """Publish and wait until paho has completed the QoS flow (sent, for QoS 0)."""
        info = self.paho.publish(topic, payload, qos, retain, properties=properties)
        info.wait_for_publish(timeout)
        assert info.is_published(), f"publish to {topic!r} (QoS {qos}) not completed in {timeout}s"

    def expect(self, count: int = 1, timeout: float = WAIT) -> list[Received]:
        """Exactly the next `count` messages, in arrival order."""
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            remaining = deadline - time.monotonic()
            try:
                got.append(self.messages.get(timeout=max(remaining, 0.001)))
            except queue.Empty:
                raise AssertionError(
                    f"{self.client_id}: expected {count} messages within {timeout}s, got {len(got)}: "
                    f"{[(m.topic, m.payload) for m in got]}"
                ) from None
        return got

    def expect_one(self, timeout: float = WAIT) -> Received:
        return self.expect(1, timeout)[0]

    def expect_nothing(self, wait: float = 0.5) -> None:
        try:
            extra = self.messages.get(timeout=wait)
        except queue.Empty:
            return
        raise AssertionError(f"{self.client_id}: unexpected message {extra.topic!r} {extra.payload!r}")

    def drain(self, wait: float = 0.3) -> list[Received]:
        """Everything that arrives until the line is quiet for `wait` seconds."""
        got = []
        while True:
            try:
                got.append(self.messages.get(timeout=wait))
            except queue.Empty:
                return got

    def wait_disconnected(self, timeout: float = WAIT) -> bool:
        return self._disconnected.wait(timeout)

    @property
    def is_disconnected(self) -> bool:
        return self._disconnected.is_set()

    def disconnect(self, timeout: float = WAIT) -> None:
        """A clean DISCONNECT, waiting until paho has sent it and closed the socket."""
        self.paho.disconnect()
        self._disconnected.wait(timeout)
        self.paho.loop_stop()

    def close(self) -> None:
        """Stop without a DISCONNECT packet if still connected (tear-down path)."""
        try:
            if not self._disconnected.is_set():
                self.paho.disconnect()
                self._disconnected.wait(1)
        except (OSError, ValueError):
            pass  # the connection is already broken (e.g. a failed TLS handshake)
        finally:
            self.paho.loop_stop()


def round_trip(broker, version: str = "v311", tls: Optional[dict] = None,
               port: Optional[int] = None) -> None:
    """A fresh subscriber and publisher exchange one QoS 1 message: the broker still serves."""
    topic = unique("alive/")
    sub = Client(broker, version, tls=tls, port=port).connect()
    pub = Client(broker, version, tls=tls, port=port).connect()
    try:
        sub.subscribe(topic, 1)
        pub.publish(topic, b"still alive", qos=1)
        message = sub.expect_one()
        assert (message.topic, message.payload) == (topic, b"still alive")
    finally:
        pub.disconnect()
        sub.disconnect()


def spawn_will_client(broker, version, topic, payload, qos, retain, client_id=None,
                      v5_delay_and_expiry: tuple[int, int] | None = None) -> subprocess.Popen:
    """A paho client in its own process, connected with a will, waiting to be SIGKILLed."""
    extra = [str(value) for value in v5_delay_and_expiry] if v5_delay_and_expiry else []
    process = subprocess.Popen(
        [sys.executable, str(WILL_CLIENT), broker.host, str(broker.port), version,
         client_id or unique("w"), topic, payload, str(qos), "1" if retain else "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = process.stdout.readline().strip()  # bounded by the client's own 10 s connect wait
    if line != "CONNECTED":
        process.kill()
        _out, err = process.communicate(timeout=5)
        raise AssertionError(f"will client did not connect: {line!r} {err}")
    return process
