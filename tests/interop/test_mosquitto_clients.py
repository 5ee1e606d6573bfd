"""mosquitto_pub / mosquitto_sub against the broker under test, in MQTT 3.1, 3.1.1 and 5 modes."""

from __future__ import annotations

import time

import pytest

from interop_cli import TIMED_OUT, MosquittoSub, publish_ok
from interop_client import Client, unique

VERSIONS = ["v31", "v311", "v5"]


@pytest.fixture(params=VERSIONS)
def version(request) -> str:
    return request.param


@pytest.fixture
def subs():
    made: list[MosquittoSub] = []

    def make(*args, **kwargs) -> MosquittoSub:
        sub = MosquittoSub(*args, **kwargs)
        made.append(sub)
        return sub

    yield make
    for sub in made:
        sub.kill()


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_publish_subscribe(broker, subs, version, qos):
    topic = unique("interop/cli/")
    sub = subs(broker, version, [f"{topic}/+"], "-C", "1", "-W", "10", qos=2).wait_subscribed()
    publish_ok(broker, version, f"{topic}/x", "-q", str(qos), "-m", f"hello at qos {qos}")
    assert sub.wait_exit() == 0
    [message] = sub.messages()
    assert (message.topic, message.qos, message.retain, message.payload) == (
        f"{topic}/x", qos, False, f"hello at qos {qos}")


def test_retained_and_retained_only(broker, subs, version):
    base = unique("interop/cli/")
    publish_ok(broker, version, f"{base}/a", "-r", "-q", "1", "-m", "A")
    publish_ok(broker, version, f"{base}/b", "-r", "-q", "1", "-m", "B")

    # --retained-only prints retained messages and exits at the first live one.
    sub = subs(broker, version, [f"{base}/#"], "--retained-only", "-W", "10", qos=1).wait_subscribed()
    first, second = sub.next_message(), sub.next_message()
    publish_ok(broker, version, f"{base}/c", "-q", "1", "-m", "live")
    assert sub.wait_exit() == 0
    assert sorted((m.topic, m.payload, m.retain) for m in (first, second)) == [
        (f"{base}/a", "A", True), (f"{base}/b", "B", True)]
    assert [m.payload for m in sub.messages()] == [first.payload, second.payload]

    # -n with -r sends an empty retained message, which deletes.
    publish_ok(broker, version, f"{base}/a", "-r", "-n")
    sub = subs(broker, version, [f"{base}/#"], "--retained-only", "-W", "1", qos=1)
    assert sub.wait_exit() == TIMED_OUT
    assert [(m.topic, m.payload) for m in sub.messages()] == [(f"{base}/b", "B")]


def test_will_of_killed_subscriber(broker, subs, version):
    will_topic = unique("interop/cli/will/")
    watcher = subs(broker, version, [will_topic], "-C", "1", "-W", "10", qos=1).wait_subscribed()
    victim = subs(broker, version, [unique("interop/cli/idle/")], "--will-topic", will_topic,
                  "--will-payload", "sub died", "--will-qos", "1").wait_subscribed()
    victim.kill()  # SIGKILL

    assert watcher.wait_exit() == 0
    [message] = watcher.messages()
    assert (message.topic, message.payload, message.qos) == (will_topic, "sub died", 1)


def test_will_not_sent_when_subscriber_exits_normally(broker, subs, version):
    will_topic = unique("interop/cli/will/")
    watcher = subs(broker, version, [will_topic], "-W", "2", qos=1).wait_subscribed()
    idle_topic = unique("interop/cli/idle/")
    leaver = subs(broker, version, [idle_topic], "-C", "1", "-W", "10",
                  "--will-topic", will_topic, "--will-payload", "should not appear").wait_subscribed()
    publish_ok(broker, version, idle_topic, "-m", "bye")  # -C 1: exits with a clean DISCONNECT
    assert leaver.wait_exit() == 0
    assert watcher.wait_exit() == TIMED_OUT
    assert watcher.messages() == []


def test_count_bound(broker, subs, version):
    topic = unique("interop/cli/")
    sub = subs(broker, version, [topic], "-C", "3", "-W", "10", qos=1).wait_subscribed()
    # -l publishes each stdin line as one message over a single connection.
    publish_ok(broker, version, topic, "-q", "1", "-l", stdin="m1\nm2\nm3\nm4\nm5\n")
    assert sub.wait_exit() == 0
    assert [m.payload for m in sub.messages()] == ["m1", "m2", "m3"]


def test_timeout_bound(broker, subs, version):
    started = time.monotonic()
    sub = subs(broker, version, [unique("interop/cli/silent/")], "-W", "1")
    assert sub.wait_exit(timeout=5) == TIMED_OUT
    assert time.monotonic() - started < 4
    assert sub.messages() == []


def test_mosquitto_pub_to_paho_and_back(broker, subs, version):
    """The two independent clients understand each other through the broker."""
    topic = unique("interop/cli/")
    paho = Client(broker, version).connect()
    try:
        paho.subscribe(topic, 2)
        publish_ok(broker, version, topic, "-q", "2", "-m", "from mosquitto_pub")
        message = paho.expect_one()
        assert (message.payload, message.qos) == (b"from mosquitto_pub", 2)

        sub = subs(broker, version, [topic], "-C", "1", "-W", "10", qos=1).wait_subscribed()
        paho.publish(topic, b"from paho", qos=1)
        assert sub.wait_exit() == 0
        assert [(m.payload, m.qos) for m in sub.messages()] == [("from paho", 1)]
    finally:
        paho.disconnect()


def test_v5_properties_from_mosquitto_pub(broker):
    topic = unique("interop/cli/")
    paho = Client(broker, "v5").connect()
    try:
        paho.subscribe(topic, 1)
        publish_ok(broker, "v5", topic, "-q", "1", "-m", "{}",
                   "-D", "publish", "user-property", "origin", "cli",
                   "-D", "publish", "content-type", "application/json",
                   "-D", "publish", "message-expiry-interval", "120")
        message = paho.expect_one()
        assert message.prop("UserProperty") == [("origin", "cli")]
        assert message.prop("ContentType") == "application/json"
        assert 0 < message.prop("MessageExpiryInterval", 0) <= 120
    finally:
        paho.disconnect()
