"""paho-mqtt in MQTT 3.1, 3.1.1 and 5.0 modes: the behaviour every version shares.

Connect, QoS 0/1/2 round trips, retained messages, `$SYS` isolation, last will, persistent
sessions with offline queueing and its bound, client-id takeover, shared subscriptions.
"""

from __future__ import annotations

import time

import pytest

from interop_client import Client, Will, round_trip, spawn_will_client, unique

VERSIONS = ["v31", "v311", "v5"]


@pytest.fixture(params=VERSIONS)
def version(request) -> str:
    return request.param


@pytest.fixture
def clients():
    """Collects clients so they are closed even when the test fails half-way."""
    made: list[Client] = []

    def make(*args, **kwargs) -> Client:
        client = Client(*args, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def persistent(clients, broker, version, client_id, **kwargs) -> Client:
    """A client whose session outlives its connection (3.x clean session 0, v5 clean start 0
    with a session expiry)."""
    if version == "v5":
        return clients(broker, version, client_id=client_id, clean=False, session_expiry=300, **kwargs)
    return clients(broker, version, client_id=client_id, clean=False, **kwargs)


# ----- connect and QoS --------------------------------------------------------------------------


def test_connect_and_clean_disconnect(broker, clients, version):
    client = clients(broker, version).connect()
    assert client.connack.rc == 0
    assert client.connack.session_present is False
    client.disconnect()
    assert client.is_disconnected
    round_trip(broker, version)


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_publish_subscribe_round_trip(broker, clients, version, qos):
    base = unique("interop/")
    subscriber = clients(broker, version).connect()
    publisher = clients(broker, version).connect()
    assert subscriber.subscribe(f"{base}/+/temp", 2) == [2]

    payload = bytes(range(256)) * 3
    publisher.publish(f"{base}/kitchen/humidity", b"not for us", qos=qos)
    publisher.publish(f"{base}/kitchen/temp", payload, qos=qos)
    publisher.publish(f"{base}/h\u00e4ll/temp", b"unicode level", qos=qos)

    first, second = subscriber.expect(2)
    assert (first.topic, first.payload, first.qos, first.retain) == (
        f"{base}/kitchen/temp", payload, qos, False)
    assert (second.topic, second.payload, second.qos) == (f"{base}/h\u00e4ll/temp", b"unicode level", qos)
    subscriber.expect_nothing()


def test_delivery_qos_is_the_lower_of_publish_and_subscription(broker, clients, version):
    topic = unique("interop/")
    subscriber = clients(broker, version).connect()
    publisher = clients(broker, version).connect()
    assert subscriber.subscribe(topic, 1) == [1]
    publisher.publish(topic, b"two", qos=2)
    publisher.publish(topic, b"zero", qos=0)
    messages = subscriber.expect(2)
    assert [(m.payload, m.qos) for m in messages] == [(b"two", 1), (b"zero", 0)]


# ----- retained ---------------------------------------------------------------------------------


def test_retained_delivered_replaced_and_deleted(broker, clients, version):
    topic = unique("interop/retained/")
    watcher = clients(broker, version).connect()
    watcher.subscribe(topic, 1)
    publisher = clients(broker, version).connect()

    publisher.publish(topic, b"first", qos=1, retain=True)
    live = watcher.expect_one()
    # A message matching an established subscription is not flagged retained (3.1.1 3.3.1.3,
    # v5 with retain-as-published 0).
    assert (live.payload, live.retain) == (b"first", False)

    late = clients(broker, version).connect()
    late.subscribe(topic, 1)
    message = late.expect_one()
    assert (message.topic, message.payload, message.retain, message.qos) == (topic, b"first", True, 1)
    late.expect_nothing(0.3)

    publisher.publish(topic, b"second", qos=1, retain=True)
    assert watcher.expect_one().payload == b"second"
    later = clients(broker, version).connect()
    later.subscribe(topic, 1)
    message = later.expect_one()
    assert (message.payload, message.retain) == (b"second", True)
    later.expect_nothing(0.3)

    publisher.publish(topic, b"", qos=1, retain=True)
    # The deleting message itself is forwarded to existing subscribers like any other.
    deleted = watcher.expect_one()
    assert deleted.payload == b""
    latest = clients(broker, version).connect()
    latest.subscribe(topic, 1)
    latest.expect_nothing(0.5)


# ----- topic matching ---------------------------------------------------------------------------


def test_wildcard_matching(broker, clients, version):
    base = unique("interop/match/")
    expected = {
        f"{base}/#": {"", "/a", "/a/c", "/x/c", "/a/b/c", "//c", "/a/"},
        f"{base}/+": {"/a"},
        f"{base}/+/c": {"/a/c", "/x/c", "//c"},
        f"{base}/a/+": {"/a/c", "/a/"},
        f"{base}/+/+/+": {"/a/b/c"},
        f"{base}/a/b/c": {"/a/b/c"},
    }
    subscribers = {}
    for topic_filter in expected:
        subscribers[topic_filter] = clients(broker, version).connect()
        subscribers[topic_filter].subscribe(topic_filter, 1)
    publisher = clients(broker, version).connect()
    suffixes = ["", "/a", "/a/c", "/x/c", "/a/b/c", "//c", "/a/"]
    for suffix in suffixes:
        publisher.publish(base + suffix, suffix.encode(), qos=1)
    for topic_filter, wanted in expected.items():
        got = [m.payload.decode() for m in subscribers[topic_filter].expect(len(wanted))]
        assert sorted(got) == sorted(wanted), (topic_filter, got)
    time.sleep(0.3)
    for topic_filter, subscriber in subscribers.items():
        extra = subscriber.drain(0.01)
        assert not extra, (topic_filter, [m.topic for m in extra])


def test_overlapping_subscriptions_respect_highest_qos(broker, clients, version):
    base = unique("interop/overlap/")
    subscriber = clients(broker, version).connect()
    subscriber.subscribe(f"{base}/#", 0)
    subscriber.subscribe(f"{base}/+", 2)
    publisher = clients(broker, version).connect()
    publisher.publish(f"{base}/a", b"both match", qos=2)
    copies = subscriber.drain(0.5)
    # One copy at the highest granted QoS, or (3.x, v5 3.3.4) one copy per subscription.
    assert 1 <= len(copies) <= 2, copies
    assert all(m.payload == b"both match" for m in copies)
    assert max(m.qos for m in copies) == 2


# ----- $SYS ---------------------------------------------------------------------------------------


def test_sys_topics_only_for_explicit_sys_subscriptions(broker, clients, version):
    broker.restart(sys_interval=1)
    everything = clients(broker, version).connect()
    everything.subscribe("#", 0)
    sys_watcher = clients(broker, version).connect()
    sys_watcher.subscribe("$SYS/#", 0)
    publisher = clients(broker, version).connect()
    topic = unique("interop/")
    publisher.publish(topic, b"ordinary", qos=1)

    deadline = time.monotonic() + 4
    sys_topics = set()
    while "$SYS/broker/uptime" not in sys_topics and time.monotonic() < deadline:
        for message in sys_watcher.drain(0.2):
            assert message.topic.startswith("$SYS/"), message.topic
            sys_topics.add(message.topic)
    assert "$SYS/broker/uptime" in sys_topics, f"no uptime within 4s; got {sorted(sys_topics)}"

    # At least one more $SYS period has passed for the `#` subscriber by now.
    time.sleep(1.2)
    seen = [m.topic for m in everything.drain(0.2)]
    assert topic in seen
    assert not [t for t in seen if t.startswith("$")], f"'#' matched $-topics: {seen}"


def test_clients_cannot_publish_to_sys_topics(broker, clients, version):
    """`$SYS` is the broker's (Mosquitto refuses client writes there too): a forged retained
    statistic reaches nobody and is not kept, at any QoS."""
    broker.restart(sys_interval=0)
    watcher = clients(broker, version).connect()
    watcher.subscribe("$SYS/#", 1)
    marker = unique("interop/after-sys/")
    watcher.subscribe(marker, 1)
    intruder = clients(broker, version).connect()
    for qos in (0, 1, 2):
        intruder.publish("$SYS/broker/uptime", b"forged", qos=qos, retain=True)
    intruder.publish(marker, b"marker", qos=1)
    first = watcher.expect_one()
    assert (first.topic, first.payload) == (marker, b"marker")
    late = clients(broker, version).connect()
    late.subscribe("$SYS/broker/uptime", 1)
    late.expect_nothing()


@pytest.mark.parametrize("old_version", ["v31", "v311"])
def test_a_3x_client_above_max_keep_alive_is_refused(broker, clients, old_version):
    """A 3.x client cannot be told a lower keep-alive (MQTT 5's server keep-alive): refused
    with "identifier rejected", as Mosquitto does."""
    broker.restart(max_keep_alive=10)
    eager = clients(broker, old_version, keepalive=60)
    assert eager.start().rc == 2
    modest = clients(broker, old_version, keepalive=10).connect()
    assert modest.connack.rc == 0


# ----- last will --------------------------------------------------------------------------------


@pytest.mark.parametrize("will_qos", [0, 1, 2])
def test_will_published_when_client_is_killed(broker, clients, version, will_qos):
    topic = unique("interop/will/")
    watcher = clients(broker, version).connect()
    watcher.subscribe(topic, 2)
    process = spawn_will_client(broker, version, topic, "client died", will_qos, retain=True)
    watcher.expect_nothing(0.2)
    process.kill()  # SIGKILL: no DISCONNECT ever reaches the broker
    process.wait(timeout=5)

    will = watcher.expect_one(timeout=5)
    assert (will.topic, will.payload, will.qos) == (topic, b"client died", will_qos)

    # A retained will stays for later subscribers.
    late = clients(broker, version).connect()
    late.subscribe(topic, 2)
    kept = late.expect_one()
    assert (kept.payload, kept.retain) == (b"client died", True)


def test_will_not_published_on_clean_disconnect(broker, clients, version):
    topic = unique("interop/will/")
    watcher = clients(broker, version).connect()
    watcher.subscribe(topic, 1)
    leaving = clients(broker, version, will=Will(topic, b"should not appear", 1, True)).connect()
    leaving.disconnect()
    watcher.expect_nothing(1.0)
    late = clients(broker, version).connect()
    late.subscribe(topic, 1)
    late.expect_nothing(0.3)


# ----- persistent sessions -------------------------------------------------------------------


def test_persistent_session_queues_qos1_and_qos2_in_order(broker, clients, version):
    base = unique("interop/offline/")
    client_id = unique("p")
    first = persistent(clients, broker, version, client_id).connect()
    first.subscribe(f"{base}/#", 2)
    first.disconnect()

    publisher = clients(broker, version).connect()
    sent = [(0, b"q0-a"), (1, b"q1-a"), (2, b"q2-a"), (0, b"q0-b"), (1, b"q1-b"), (2, b"q2-b")]
    for index, (qos, payload) in enumerate(sent):
        publisher.publish(f"{base}/{index}", payload, qos=qos)

    back = persistent(clients, broker, version, client_id).connect()
    # MQTT 3.1's CONNACK has no session-present flag; 3.1.1 and 5 must set it.
    assert back.connack.session_present is (version != "v31")
    queued = sorted(back.expect(4), key=lambda m: m.topic)
    assert [(m.topic, m.payload, m.qos) for m in queued] == [
        (f"{base}/1", b"q1-a", 1), (f"{base}/2", b"q2-a", 2),
        (f"{base}/4", b"q1-b", 1), (f"{base}/5", b"q2-b", 2)]
    # In publication order on the wire (paho itself hands QoS 2 over only after PUBREL).
    assert back.wire_order == [(f"{base}/1", 1), (f"{base}/2", 2), (f"{base}/4", 1), (f"{base}/5", 2)]
    # QoS 0 messages are not queued for an offline session.
    back.expect_nothing(0.5)

    # The subscription survived: no new SUBSCRIBE needed.
    publisher.publish(f"{base}/live", b"live", qos=1)
    assert back.expect_one().payload == b"live"


def test_clean_session_forgets_subscriptions(broker, clients, version):
    base = unique("interop/clean/")
    client_id = unique("p")
    first = persistent(clients, broker, version, client_id).connect()
    first.subscribe(f"{base}/#", 1)
    first.disconnect()

    if version == "v5":
        fresh = clients(broker, version, client_id=client_id, clean=True, session_expiry=0)
    else:
        fresh = clients(broker, version, client_id=client_id, clean=True)
    fresh.connect()
    assert fresh.connack.session_present is False
    publisher = clients(broker, version).connect()
    publisher.publish(f"{base}/x", b"nobody listens", qos=1)
    fresh.expect_nothing(0.5)


def test_offline_queue_bound_drops_newest(broker, clients, version):
    broker.restart(max_queued_messages=5)
    base = unique("interop/bound/")
    client_id = unique("p")
    first = persistent(clients, broker, version, client_id).connect()
    first.subscribe(f"{base}/#", 1)
    first.disconnect()

    publisher = clients(broker, version).connect()
    for index in range(10):
        publisher.publish(f"{base}/{index}", f"m{index}".encode(), qos=1)

    back = persistent(clients, broker, version, client_id).connect()
    delivered = [m.payload for m in back.expect(5)]
    back.expect_nothing(0.7)
    # The documented policy (polyhub's default, Mosquitto's behaviour) keeps the oldest.
    assert delivered == [b"m0", b"m1", b"m2", b"m3", b"m4"]


# ----- takeover ---------------------------------------------------------------------------------


def test_client_id_takeover_disconnects_the_first_client(broker, clients, version):
    client_id = unique("dup")
    first = clients(broker, version, client_id=client_id).connect()
    second = clients(broker, version, client_id=client_id).connect()
    assert first.wait_disconnected(5), "the older connection was not closed"
    assert not second.wait_disconnected(0.5), "the newer connection was closed"

    topic = unique("interop/takeover/")
    second.subscribe(topic, 1)
    publisher = clients(broker, version).connect()
    publisher.publish(topic, b"to the new one", qos=1)
    assert second.expect_one().payload == b"to the new one"
    first.expect_nothing(0.2)


# ----- shared subscriptions ----------------------------------------------------------------------


@pytest.mark.parametrize("shared_version", ["v311", "v5"])
def test_shared_subscription_splits_messages(broker, clients, shared_version):
    topic = unique("interop/shared/")
    group = unique("g")
    members = [clients(broker, shared_version).connect() for _ in range(2)]
    for member in members:
        assert member.subscribe(f"$share/{group}/{topic}", 1) == [1]
    ordinary = clients(broker, shared_version).connect()
    ordinary.subscribe(topic, 1)

    publisher = clients(broker, shared_version).connect()
    for index in range(100):
        publisher.publish(topic, str(index).encode(), qos=1)

    everyone = ordinary.expect(100)
    assert [int(m.payload) for m in everyone] == list(range(100))

    received: list[list[int]] = [[], []]
    deadline = time.monotonic() + 5
    while sum(map(len, received)) < 100 and time.monotonic() < deadline:
        for slot, member in enumerate(members):
            received[slot] += [int(m.payload) for m in member.drain(0.05)]
    for slot, member in enumerate(members):
        received[slot] += [int(m.payload) for m in member.drain(0.3)]

    combined = sorted(received[0] + received[1])
    assert combined == list(range(100)), (
        f"each message exactly once to the group: {len(combined)} deliveries, "
        f"missing {sorted(set(range(100)) - set(combined))}")
    assert received[0] and received[1], f"not split: {len(received[0])} / {len(received[1])}"
