"""Bad input written byte by byte over raw sockets: each gets the spec's answer (CONNACK code,
DISCONNECT reason code or a closed socket), and the broker keeps serving everyone else.

Levels: 3 = MQTT 3.1 ("MQIsdp"), 4 = 3.1.1, 5 = 5.0. For 3.x the only possible answer to a
protocol violation is closing the connection. For v5 the server MAY send a DISCONNECT with a reason
code first (v5 4.13); when it does, the code must be the right one.
"""

from __future__ import annotations

import threading
import time

import pytest

from interop_client import Client, round_trip, unique
from interop_raw import (
    CONNACK,
    PINGRESP,
    Closed,
    DISCONNECT,
    SUBACK,
    RawClient,
    connect,
    mqtt_str,
    packet,
    publish,
    subscribe,
    v5_property_ids,
    varint,
    SUBSCRIBE,
)

LEVELS = [3, 4, 5]
MALFORMED = 0x81
PROTOCOL_ERROR = 0x82
TOPIC_NAME_INVALID = 0x90
PACKET_TOO_LARGE = 0x95
SESSION_TAKEN_OVER = 0x8E
KEEP_ALIVE_TIMEOUT = 0x8D


@pytest.fixture(params=LEVELS, ids=lambda level: f"level{level}")
def level(request) -> int:
    return request.param


@pytest.fixture
def bystander(broker):
    """A paho subscriber connected before the attack; it must be unaffected by it."""
    topic = unique("interop/bystander/")
    client = Client(broker, "v311").connect()
    client.subscribe(topic, 1)
    client.topic = topic
    yield client
    client.close()


@pytest.fixture
def raw(broker):
    made: list[RawClient] = []

    def make(**kwargs) -> RawClient:
        client = RawClient(broker, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def assert_unharmed(broker, bystander) -> None:
    """The established client still receives, and new clients of every version still work."""
    assert not bystander.is_disconnected, "a bystander lost its connection"
    publisher = Client(broker, "v311").connect()
    try:
        publisher.publish(bystander.topic, b"after the attack", qos=1)
        assert bystander.expect_one().payload == b"after the attack"
    finally:
        publisher.disconnect()
    for version in ("v31", "v311", "v5"):
        round_trip(broker, version)


def assert_closed_with(client: RawClient, level: int, allowed_v5_codes: set[int]) -> None:
    """The broker closes the connection; a v5 client may get one DISCONNECT first, with one of
    the allowed reason codes. 3.x clients get nothing at all."""
    packets = client.packets_until_closed(timeout=5)
    if level == 5 and packets:
        assert len(packets) == 1 and packets[0].kind == DISCONNECT, f"sent {packets}"
        assert packets[0].reason_code in allowed_v5_codes, (
            f"DISCONNECT reason {packets[0].reason_code:#x}, expected one of "
            f"{sorted(hex(c) for c in allowed_v5_codes)}")
    else:
        assert packets == [], f"expected a plain close, got {packets}"


def connected(raw, level: int, **kwargs) -> RawClient:
    client = raw()
    client.connect(level, client_id=unique("raw"), **kwargs)
    return client


# ----- truncated packets --------------------------------------------------------------------------


def test_truncated_connect_then_close(broker, bystander, raw, level):
    client = raw()
    whole = connect(level, client_id=unique("raw"))
    client.send(whole[: len(whole) // 2])
    client.close()
    assert_unharmed(broker, bystander)


def test_truncated_publish_then_close_publishes_will(broker, bystander, raw, level):
    """A connection that dies mid-packet is an abnormal disconnect: the will is published and
    the half-sent message is not."""
    will_topic = unique("interop/will/")
    watcher = Client(broker, "v311").connect()
    try:
        watcher.subscribe(will_topic, 1)
        watcher.subscribe(bystander.topic, 1)
        client = connected(raw, level, will=(will_topic, b"cut off", 1, False))
        whole = publish(bystander.topic, b"half a message", qos=1, level=level)
        client.send(whole[:-5])
        client.close()
        will = watcher.expect_one()
        assert (will.topic, will.payload) == (will_topic, b"cut off")
        watcher.expect_nothing(0.3)
    finally:
        watcher.disconnect()
    assert_unharmed(broker, bystander)


# ----- oversized packets --------------------------------------------------------------------------


@pytest.mark.parametrize("send_body", [False, True], ids=["announced", "sent"])
def test_oversized_packet(broker, raw, level, send_body):
    broker.restart(max_packet_size=1024)
    bystander_client = Client(broker, "v311").connect()
    bystander_client.topic = unique("interop/bystander/")
    bystander_client.subscribe(bystander_client.topic, 1)
    try:
        client = raw()
        connack = client.connect(level, client_id=unique("raw"))
        if level == 5:
            # v5 3.2.2.3.6: the server tells the client its limit.
            props = v5_property_ids(connack.body, 2)
            assert int.from_bytes(props.get(0x27, b""), "big") == 1024, f"CONNACK properties {props}"
        body = mqtt_str("interop/big") + b"x" * 1990
        header = bytes([0x30]) + varint(len(body))
        # Announcing the size is enough for the broker to know; it must not wait for the body.
        client.send(header + (body if send_body else body[:10]))
        assert_closed_with(client, level, {PACKET_TOO_LARGE})
        # Just under the limit is fine.
        round_trip(broker, "v5")
        assert_unharmed(broker, bystander_client)
    finally:
        bystander_client.close()


# ----- malformed encodings ------------------------------------------------------------------------


def test_remaining_length_with_five_bytes_as_first_packet(broker, bystander, raw):
    client = raw()
    client.send(bytes([0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]))
    assert client.packets_until_closed() == []
    assert_unharmed(broker, bystander)


def test_remaining_length_with_five_bytes_after_connect(broker, bystander, raw, level):
    client = connected(raw, level)
    client.send(bytes([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]))
    assert_closed_with(client, level, {MALFORMED})
    assert_unharmed(broker, bystander)


@pytest.mark.parametrize("topic", [b"a/\xff\xfe", b"a/\xc0\xaf", b"a/\x00b", b"\xed\xa0\x80"],
                         ids=["invalid-bytes", "overlong", "nul", "surrogate"])
def test_invalid_utf8_topic(broker, bystander, raw, level, topic):
    client = connected(raw, level)
    client.send(publish(topic, b"x", qos=0, level=level))
    assert_closed_with(client, level, {MALFORMED})
    assert_unharmed(broker, bystander)


@pytest.mark.parametrize("topic", ["a/+/b", "a/#", "#", "+"])
def test_wildcard_in_publish_topic(broker, bystander, raw, level, topic):
    client = connected(raw, level)
    client.send(publish(topic, b"x", qos=1, level=level))
    allowed = {TOPIC_NAME_INVALID}
    if broker.kind == "mosquitto":
        # Mosquitto 2.0.11 answers 0x82 (Protocol Error) here; v5 3.3.2.1 forbids the wildcard
        # without naming a code, and 0x90 (Topic Name invalid) is the specific one.
        allowed.add(PROTOCOL_ERROR)
    assert_closed_with(client, level, allowed)
    assert_unharmed(broker, bystander)


def test_qos_3(broker, bystander, raw, level):
    client = connected(raw, level)
    client.send(publish("interop/qos3", b"x", qos=3, packet_id=1, level=level))
    # 3.1.1 [MQTT-3.3.1-4]; v5 3.3.1.2: a malformed packet.
    assert_closed_with(client, level, {MALFORMED})
    assert_unharmed(broker, bystander)


@pytest.mark.parametrize("level", [4, 5], ids=lambda level: f"level{level}")
def test_subscribe_with_reserved_flags_wrong(broker, bystander, raw, level):
    client = connected(raw, level)
    props = b"\x00" if level == 5 else b""
    client.send(packet(SUBSCRIBE, 0x0, b"\x00\x01" + props + mqtt_str("a/b") + b"\x00"))
    # 3.1.1 [MQTT-3.8.1-1] and v5 3.8.1: flags must be 0010, else malformed.
    assert_closed_with(client, level, {MALFORMED})
    assert_unharmed(broker, bystander)


def test_subscribe_with_invalid_filter(broker, bystander, raw, level):
    client = connected(raw, level)
    client.send(subscribe("a/#/b", 0, packet_id=7, level=level))
    try:
        answer = client.read_packet()
    except Closed:
        answer = None
    if answer is None:
        pass  # closed: the protocol-violation answer of every version
    elif answer.kind == SUBACK and level != 3:
        # Refusing just this filter is also allowed (3.1.1 failure 0x80; v5 0x8F Topic Filter
        # invalid or 0x80), and then the connection stays usable.
        codes_at = 2 if level == 4 else 2 + 1 + answer.body[2]
        assert answer.body[:2] == b"\x00\x07" and answer.body[codes_at:] in (b"\x80", b"\x8f"), answer
        client.send(b"\xc0\x00")
        assert client.read_packet().kind == PINGRESP
    elif answer.kind == DISCONNECT and level == 5:
        assert answer.reason_code in (MALFORMED, PROTOCOL_ERROR, 0x8F), answer
        assert client.packets_until_closed() == []
    else:
        raise AssertionError(f"invalid filter answered with {answer}")
    assert_unharmed(broker, bystander)


def test_keep_alive_enforced_and_will_published(broker, bystander, raw):
    """Silent for 1.5 x keep-alive: the broker closes the connection (3.1.1 [MQTT-3.1.2-24],
    v5 3.1.2.10) and, as for any abnormal disconnect, publishes the will. A client that keeps
    pinging stays connected. All three protocol levels run at once to keep the test short."""
    base = unique("interop/will/")
    patience = 3.0
    if broker.kind == "mosquitto":
        # Mosquitto 2.0.11 checks keep-alives only every few seconds: it closes a silent
        # keep-alive 1 client after ~5.3 s instead of 1.5 s (measured here).
        patience = 7.5
    watcher = Client(broker, "v311").connect()
    try:
        watcher.subscribe(f"{base}/#", 1)
        silent = {level: connected(raw, level, keepalive=1, will=(f"{base}/{level}", b"silent", 1, False))
                  for level in LEVELS}
        started = time.monotonic()
        pinger = connected(raw, 4, keepalive=1)
        outcome: dict[int, tuple[float, list | str]] = {}

        def watch(level: int, client: RawClient) -> None:
            try:
                packets = client.packets_until_closed(timeout=patience)
                outcome[level] = (time.monotonic() - started, packets)
            except AssertionError as error:
                outcome[level] = (time.monotonic() - started, str(error))

        watchers = [threading.Thread(target=watch, args=item, daemon=True) for item in silent.items()]
        for thread in watchers:
            thread.start()
        while any(thread.is_alive() for thread in watchers):
            pinger.send(b"\xc0\x00")
            assert pinger.read_packet(timeout=2).kind == PINGRESP
            time.sleep(0.4)

        for level in LEVELS:
            elapsed, packets = outcome[level]
            assert isinstance(packets, list), f"level {level}: {packets}"
            assert 1.4 <= elapsed, f"level {level} closed after {elapsed:.2f}s, before 1.5 x keep-alive"
            if level == 5 and packets:
                assert [(p.kind, p.reason_code) for p in packets] == [(DISCONNECT, KEEP_ALIVE_TIMEOUT)]
            else:
                assert packets == [], packets
        wills = watcher.expect(3, timeout=2)
        assert sorted(m.topic for m in wills) == sorted(f"{base}/{level}" for level in LEVELS)
        # The pinging client survived all of it.
        pinger.send(b"\xc0\x00")
        assert pinger.read_packet().kind == PINGRESP
    finally:
        watcher.disconnect()
    assert_unharmed(broker, bystander)


# ----- CONNECT problems ---------------------------------------------------------------------------


def test_unknown_protocol_level(broker, bystander, raw):
    client = raw()
    client.send(connect(6, name=b"MQTT", client_id=unique("raw")))
    packets = client.packets_until_closed()
    # 3.1.1 [MQTT-3.1.2-2]: CONNACK return code 0x01 (unacceptable protocol level), then close.
    # A server cannot know which CONNACK layout an unknown level expects; the 3.1.1 one is what
    # clients of older versions understand (v5 3.1.2.2 allows 0x84 in the v5 layout instead).
    assert len(packets) == 1 and packets[0].kind == CONNACK, packets
    assert packets[0].body in (b"\x00\x01", b"\x00\x84\x00"), packets[0]
    assert_unharmed(broker, bystander)


@pytest.mark.parametrize("level", [3, 4, 5], ids=lambda level: f"level{level}")
def test_unknown_protocol_name(broker, bystander, raw, level):
    client = raw()
    client.send(connect(level, name=b"MQTX", client_id=unique("raw")))
    packets = client.packets_until_closed()
    # 3.1.1 [MQTT-3.1.2-1]: the server MAY close without CONNACK; if it answers, code 1.
    assert packets == [] or (
        len(packets) == 1 and packets[0].kind == CONNACK and packets[0].reason_code in (0x01, 0x84)
    ), packets
    assert_unharmed(broker, bystander)


@pytest.mark.parametrize(
    "first",
    [publish("interop/early", b"x", qos=0), b"\xc0\x00", subscribe("a", 0), b"\xe0\x00"],
    ids=["publish", "pingreq", "subscribe", "disconnect"],
)
def test_first_packet_not_connect(broker, bystander, raw, first):
    client = raw()
    client.send(first)
    # 3.1.1 [MQTT-3.1.0-1] / v5 3.1: the first packet must be CONNECT, else close.
    assert client.packets_until_closed() == []
    assert_unharmed(broker, bystander)


def test_second_connect(broker, bystander, raw, level):
    client = connected(raw, level)
    client.send(connect(level, client_id=unique("raw")))
    # 3.1.1 [MQTT-3.1.0-2] / v5 3.1: a second CONNECT is a protocol error.
    assert_closed_with(client, level, {PROTOCOL_ERROR})
    assert_unharmed(broker, bystander)


def test_takeover_tells_v5_client_session_taken_over(broker, raw):
    client_id = unique("dup")
    first = raw()
    first.connect(5, client_id=client_id)
    second = raw()
    second.connect(5, client_id=client_id)
    # v5 [MQTT-3.1.4-3]: DISCONNECT 0x8E (Session taken over) to the older connection, then close.
    packets = first.packets_until_closed()
    expected = [[(DISCONNECT, SESSION_TAKEN_OVER)]]
    if broker.kind == "mosquitto":
        # Mosquitto 2.0.11 closes the old connection without any DISCONNECT (its log says
        # "already connected, closing old connection"); polyhub must send the reason code.
        expected.append([])
    assert [(p.kind, p.reason_code) for p in packets] in expected
    second.send(b"\xc0\x00")
    assert second.read_packet().kind == PINGRESP  # PINGRESP: the newer connection is alive
