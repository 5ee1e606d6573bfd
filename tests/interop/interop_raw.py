"""MQTT packets written byte by byte, for talking to a broker over a raw socket.

Nothing here validates: the point is to send exactly the (possibly broken) bytes a test wants and
to read back exactly what the broker answers.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass
from typing import Optional

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14

PROTOCOL_NAMES = {3: b"MQIsdp", 4: b"MQTT", 5: b"MQTT"}


def varint(value: int) -> bytes:
    """MQTT variable byte integer (remaining length, v5 property lengths)."""
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def mqtt_bytes(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def mqtt_str(text) -> bytes:
    return mqtt_bytes(text.encode("utf-8") if isinstance(text, str) else text)


def packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([(kind << 4) | flags]) + varint(len(body)) + body


def connect(level: int = 4, client_id: str = "raw", keepalive: int = 30, clean: bool = True,
            name: Optional[bytes] = None, properties: bytes = b"",
            will: Optional[tuple[str, bytes, int, bool]] = None) -> bytes:
    """CONNECT for protocol level 3, 4 or 5 (`name` and `level` can be set to anything)."""
    name = PROTOCOL_NAMES.get(level, b"MQTT") if name is None else name
    flags = 0x02 if clean else 0
    payload = mqtt_str(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        if level == 5:
            payload += varint(0)  # will properties
        payload += mqtt_str(topic) + mqtt_bytes(message)
    body = mqtt_bytes(name) + bytes([level, flags]) + struct.pack("!H", keepalive)
    if level == 5:
        body += varint(len(properties)) + properties
    return packet(CONNECT, 0, body + payload)


def publish(topic, payload: bytes = b"", qos: int = 0, packet_id: int = 1, level: int = 4,
            retain: bool = False, properties: bytes = b"") -> bytes:
    """PUBLISH; `topic` may be raw bytes (e.g. invalid UTF-8), `qos` may be 3."""
    body = mqtt_str(topic)
    if qos:
        body += struct.pack("!H", packet_id)
    if level == 5:
        body += varint(len(properties)) + properties
    return packet(PUBLISH, (qos << 1) | (1 if retain else 0), body + payload)


def subscribe(topic: str, qos: int = 0, packet_id: int = 1, level: int = 4) -> bytes:
    body = struct.pack("!H", packet_id)
    if level == 5:
        body += varint(0)
    return packet(SUBSCRIBE, 0x2, body + mqtt_str(topic) + bytes([qos]))


def disconnect(level: int = 4) -> bytes:
    return packet(DISCONNECT, 0, b"\x00\x00" if level == 5 else b"")


@dataclass
class Packet:
    kind: int
    flags: int
    body: bytes

    @property
    def reason_code(self) -> Optional[int]:
        """CONNACK return/reason code or v5 DISCONNECT reason code."""
        if self.kind == CONNACK and len(self.body) >= 2:
            return self.body[1]
        if self.kind == DISCONNECT:
            return self.body[0] if self.body else 0
        return None

    def __repr__(self) -> str:
        return f"Packet(type={self.kind}, flags={self.flags:#x}, body={self.body[:40]!r})"


class Closed(Exception):
    """The broker closed the connection (EOF or reset)."""


class RawClient:
    """A plain TCP connection to the broker; every read is bounded by a timeout."""

    def __init__(self, broker, port: Optional[int] = None, timeout: float = 5.0):
        self.sock = socket.create_connection((broker.host, port or broker.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no data from broker in time")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError) as error:
            raise Closed(str(error)) from None
        except socket.timeout:
            raise TimeoutError("no data from broker in time") from None
        if not chunk:
            raise Closed("EOF")
        self._buffer += chunk

    def read_packet(self, timeout: float = 5.0) -> Packet:
        """The next packet; raises Closed on EOF/reset, TimeoutError when nothing comes."""
        deadline = time.monotonic() + timeout
        while len(self._buffer) < 2:
            self._fill(deadline)
        length, multiplier, index = 0, 1, 1
        while True:
            while len(self._buffer) <= index:
                self._fill(deadline)
            byte = self._buffer[index]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            index += 1
            if not byte & 0x80:
                break
            if index > 4:
                raise AssertionError(f"broker sent a malformed remaining length: {self._buffer[:6]!r}")
        while len(self._buffer) < index + length:
            self._fill(deadline)
        first = self._buffer[0]
        body = self._buffer[index:index + length]
        self._buffer = self._buffer[index + length:]
        return Packet(first >> 4, first & 0x0F, body)

    def connect(self, level: int = 4, **kwargs) -> Packet:
        """Send CONNECT and insist on a successful CONNACK."""
        self.send(connect(level, **kwargs))
        connack = self.read_packet()
        assert connack.kind == CONNACK, f"expected CONNACK, got {connack}"
        assert connack.reason_code == 0, f"CONNACK refused: {connack}"
        return connack

    def packets_until_closed(self, timeout: float = 5.0) -> list[Packet]:
        """Everything the broker sends until it closes the connection.

        Fails if the connection is still open after `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            try:
                seen.append(self.read_packet(timeout=max(deadline - time.monotonic(), 0.001)))
            except Closed:
                return seen
            except TimeoutError:
                raise AssertionError(
                    f"broker kept the connection open for {timeout}s; it sent {seen}"
                ) from None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def v5_property_ids(body: bytes, offset: int) -> dict[int, bytes]:
    """A rough map of property id -> raw value bytes for the properties starting at `offset`
    (enough for the few fixed-size properties the tests read)."""
    length, shift, index = 0, 0, offset
    while True:
        byte = body[index]
        length |= (byte & 0x7F) << shift
        shift += 7
        index += 1
        if not byte & 0x80:
            break
    end = index + length
    sizes = {0x01: 1, 0x02: 4, 0x11: 4, 0x13: 2, 0x21: 2, 0x22: 2, 0x23: 2, 0x24: 1, 0x25: 1,
             0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1}
    found = {}
    while index < end:
        prop = body[index]
        index += 1
        if prop in sizes:
            found[prop] = body[index:index + sizes[prop]]
            index += sizes[prop]
        elif prop in (0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F):
            (size,) = struct.unpack("!H", body[index:index + 2])
            found[prop] = body[index + 2:index + 2 + size]
            index += 2 + size
        elif prop == 0x26:
            (key_size,) = struct.unpack("!H", body[index:index + 2])
            index += 2 + key_size
            (value_size,) = struct.unpack("!H", body[index:index + 2])
            index += 2 + value_size
        elif prop == 0x0B:
            while body[index] & 0x80:
                index += 1
            index += 1
        else:
            break
    return found
