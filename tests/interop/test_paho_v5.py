"""MQTT 5 features seen through paho's v5 mode: properties, expiry, subscription options, topic
aliases, request/response, assigned client ids and server keep-alive."""

from __future__ import annotations

import time

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from interop_client import Client, publish_properties, spawn_will_client, unique


@pytest.fixture
def clients():
    made: list[Client] = []

    def make(broker, **kwargs) -> Client:
        client = Client(broker, "v5", **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def test_user_properties_round_trip_in_order(broker, clients):
    topic = unique("interop/v5/")
    subscriber = clients(broker).connect()
    subscriber.subscribe(topic, 1)
    publisher = clients(broker).connect()
    pairs = [("zone", "kitchen"), ("unit", "\u00b0C"), ("zone", "hall"), ("a", "")]
    publisher.publish(topic, b"21.5", qos=1, properties=publish_properties(UserProperty=pairs))
    message = subscriber.expect_one()
    assert message.payload == b"21.5"
    # Order and repeated keys are preserved (v5 3.3.2.3.7).
    assert message.prop("UserProperty") == pairs


def test_payload_format_and_content_type_forwarded(broker, clients):
    topic = unique("interop/v5/")
    subscriber = clients(broker).connect()
    subscriber.subscribe(topic, 0)
    publisher = clients(broker).connect()
    publisher.publish(topic, b'{"t": 1}', properties=publish_properties(
        PayloadFormatIndicator=1, ContentType="application/json"))
    message = subscriber.expect_one()
    assert message.prop("PayloadFormatIndicator") == 1
    assert message.prop("ContentType") == "application/json"


def test_expired_message_not_delivered_to_offline_session(broker, clients):
    base = unique("interop/v5/expiry/")
    client_id = unique("e")
    first = clients(broker, client_id=client_id, clean=False, session_expiry=300).connect()
    first.subscribe(f"{base}/#", 1)
    first.disconnect()

    publisher = clients(broker).connect()
    publisher.publish(f"{base}/short", b"short-lived", qos=1,
                      properties=publish_properties(MessageExpiryInterval=1))
    publisher.publish(f"{base}/long", b"long-lived", qos=1,
                      properties=publish_properties(MessageExpiryInterval=60))
    time.sleep(2.2)

    back = clients(broker, client_id=client_id, clean=False, session_expiry=300).connect()
    assert back.connack.session_present is True
    message = back.expect_one()
    assert message.payload == b"long-lived"
    # The forwarded interval is reduced by the time spent waiting in the broker (v5 3.3.2.3.3).
    remaining = message.prop("MessageExpiryInterval")
    assert remaining is not None and 1 <= remaining <= 58, remaining
    back.expect_nothing(0.5)


def test_subscription_identifier_in_delivered_properties(broker, clients):
    base = unique("interop/v5/subid/")
    subscriber = clients(broker).connect()
    with_id = Properties(PacketTypes.SUBSCRIBE)
    with_id.SubscriptionIdentifier = 42
    subscriber.subscribe(f"{base}/tagged/+", 1, properties=with_id)
    subscriber.subscribe(f"{base}/plain", 1)
    publisher = clients(broker).connect()
    publisher.publish(f"{base}/tagged/x", b"tagged", qos=1)
    publisher.publish(f"{base}/plain", b"plain", qos=1)

    tagged, plain = subscriber.expect(2)
    assert tagged.payload == b"tagged"
    assert tagged.prop("SubscriptionIdentifier") == [42]
    assert plain.payload == b"plain"
    assert plain.prop("SubscriptionIdentifier") is None


def test_no_local(broker, clients):
    topic = unique("interop/v5/")
    talker = clients(broker).connect()
    talker.subscribe(topic, options=SubscribeOptions(qos=1, noLocal=True))
    listener = clients(broker).connect()
    listener.subscribe(topic, 1)
    other = clients(broker).connect()

    talker.publish(topic, b"own", qos=1)
    other.publish(topic, b"other", qos=1)
    # The talker's own message would have arrived first: receiving only "other" proves it was
    # suppressed, while the listener sees both.
    assert [m.payload for m in talker.expect(1)] == [b"other"]
    talker.expect_nothing(0.3)
    assert [m.payload for m in listener.expect(2)] == [b"own", b"other"]


def test_retain_as_published(broker, clients):
    topic = unique("interop/v5/")
    keeps_flag = clients(broker).connect()
    keeps_flag.subscribe(topic, options=SubscribeOptions(qos=1, retainAsPublished=True))
    clears_flag = clients(broker).connect()
    clears_flag.subscribe(topic, options=SubscribeOptions(qos=1, retainAsPublished=False))
    publisher = clients(broker).connect()
    publisher.publish(topic, b"state", qos=1, retain=True)
    publisher.publish(topic, b"event", qos=1, retain=False)

    assert [(m.payload, m.retain) for m in keeps_flag.expect(2)] == [(b"state", True), (b"event", False)]
    assert [(m.payload, m.retain) for m in clears_flag.expect(2)] == [(b"state", False), (b"event", False)]


def test_retain_handling(broker, clients):
    topic = unique("interop/v5/")
    publisher = clients(broker).connect()
    publisher.publish(topic, b"retained", qos=1, retain=True)

    never = clients(broker).connect()
    never.subscribe(topic, options=SubscribeOptions(qos=1, retainHandling=2))
    never.expect_nothing(0.5)

    always = clients(broker).connect()
    always.subscribe(topic, options=SubscribeOptions(qos=1, retainHandling=0))
    assert always.expect_one().payload == b"retained"
    always.subscribe(topic, options=SubscribeOptions(qos=1, retainHandling=0))
    assert always.expect_one().payload == b"retained"

    if_new = clients(broker).connect()
    if_new.subscribe(topic, options=SubscribeOptions(qos=1, retainHandling=1))
    assert if_new.expect_one().payload == b"retained"
    # Same filter again: the subscription already exists, so no retained message.
    if_new.subscribe(topic, options=SubscribeOptions(qos=1, retainHandling=1))
    if_new.expect_nothing(0.5)

    # Live messages are still delivered under retain handling 2.
    publisher.publish(topic, b"live", qos=1)
    assert never.expect_one().payload == b"live"


def test_topic_alias_from_client(broker, clients):
    topic = unique("interop/v5/alias/")
    subscriber = clients(broker).connect()
    subscriber.subscribe(topic, 1)
    publisher = clients(broker).connect()
    maximum = publisher.connack.prop("TopicAliasMaximum", 0)
    assert maximum >= 1, "broker announced no topic aliases"

    publisher.publish(topic, b"sets alias", qos=1, properties=publish_properties(TopicAlias=1))
    publisher.publish("", b"uses alias", qos=1, properties=publish_properties(TopicAlias=1))
    publisher.publish("", b"again", qos=0, properties=publish_properties(TopicAlias=1))
    messages = subscriber.expect(3)
    assert [(m.topic, m.payload) for m in messages] == [
        (topic, b"sets alias"), (topic, b"uses alias"), (topic, b"again")]


def test_request_response(broker, clients):
    request_topic = unique("interop/v5/req/")
    response_topic = unique("interop/v5/resp/")
    requester = clients(broker).connect()
    requester.subscribe(response_topic, 1)
    responder = clients(broker).connect()
    responder.subscribe(request_topic, 1)

    correlation = b"\x00\x01req-7\xff"
    requester.publish(request_topic, b"what time is it", qos=1, properties=publish_properties(
        ResponseTopic=response_topic, CorrelationData=correlation))
    request = responder.expect_one()
    assert request.prop("ResponseTopic") == response_topic
    assert request.prop("CorrelationData") == correlation

    responder.publish(request.prop("ResponseTopic"), b"noon", qos=1, properties=publish_properties(
        CorrelationData=request.prop("CorrelationData")))
    response = requester.expect_one()
    assert (response.topic, response.payload) == (response_topic, b"noon")
    assert response.prop("CorrelationData") == correlation


def test_assigned_client_identifier(broker, clients):
    first = clients(broker, client_id="").connect()
    second = clients(broker, client_id="").connect()
    first_id = first.connack.prop("AssignedClientIdentifier")
    second_id = second.connack.prop("AssignedClientIdentifier")
    assert first_id and second_id, "no Assigned Client Identifier in CONNACK"
    assert first_id != second_id
    # Both sessions are usable.
    topic = unique("interop/v5/")
    first.subscribe(topic, 1)
    second.publish(topic, b"hi", qos=1)
    assert first.expect_one().payload == b"hi"


def test_server_keep_alive(broker, clients):
    broker.restart(max_keep_alive=10)
    eager = clients(broker, keepalive=60).connect()
    assert eager.connack.prop("ServerKeepAlive") == 10
    modest = clients(broker, keepalive=5).connect()
    # Within the limit: the client's own value stands (no property, or the same value).
    assert modest.connack.prop("ServerKeepAlive") in (None, 5)


def test_overlapping_subscriptions_carry_every_subscription_identifier(broker, clients):
    base = unique("interop/v5/overlap/")
    subscriber = clients(broker).connect()
    for identifier, topic_filter in ((1, f"{base}/#"), (2, f"{base}/+")):
        props = Properties(PacketTypes.SUBSCRIBE)
        props.SubscriptionIdentifier = identifier
        subscriber.subscribe(topic_filter, 1, properties=props)
    publisher = clients(broker).connect()
    publisher.publish(f"{base}/a", b"x", qos=1)
    copies = subscriber.drain(0.5)
    # v5 3.3.4: one copy with both identifiers, or one copy per subscription with its own.
    assert 1 <= len(copies) <= 2, copies
    identifiers = sorted(i for m in copies for i in m.prop("SubscriptionIdentifier", []))
    assert identifiers == [1, 2]


def test_session_expiry(broker, clients):
    base = unique("interop/v5/expiry/")
    client_id = unique("s")
    short = clients(broker, client_id=client_id, clean=False, session_expiry=1).connect()
    short.subscribe(f"{base}/#", 1)
    short.disconnect()
    keeper_id = unique("s")
    keeper = clients(broker, client_id=keeper_id, clean=False, session_expiry=60).connect()
    keeper.subscribe(f"{base}/#", 1)
    keeper.disconnect()
    time.sleep(2.0)

    back = clients(broker, client_id=client_id, clean=False, session_expiry=1).connect()
    assert back.connack.session_present is False, "session outlived its expiry interval"
    kept = clients(broker, client_id=keeper_id, clean=False, session_expiry=60).connect()
    assert kept.connack.session_present is True
    publisher = clients(broker).connect()
    publisher.publish(f"{base}/x", b"after expiry", qos=1)
    assert kept.expect_one().payload == b"after expiry"
    back.expect_nothing(0.3)


def spawn_v5_will_client(broker, topic, client_id, delay, expiry):
    return spawn_will_client(broker, "v5", topic, "delayed will", 1, False, client_id=client_id,
                             v5_delay_and_expiry=(delay, expiry))


def test_will_delay_interval(broker, clients):
    topic = unique("interop/v5/will/")
    watcher = clients(broker).connect()
    watcher.subscribe(topic, 1)
    process = spawn_v5_will_client(broker, topic, unique("w"), delay=2, expiry=60)
    process.kill()
    process.wait(timeout=5)
    killed = time.monotonic()
    watcher.expect_nothing(1.2)  # v5 3.1.3.2.2: held back for the will delay
    will = watcher.expect_one(timeout=4)
    assert will.payload == b"delayed will"
    assert time.monotonic() - killed >= 1.8


def test_will_delay_cancelled_by_reconnect(broker, clients):
    topic = unique("interop/v5/will/")
    client_id = unique("w")
    watcher = clients(broker).connect()
    watcher.subscribe(topic, 1)
    process = spawn_v5_will_client(broker, topic, client_id, delay=1, expiry=60)
    process.kill()
    process.wait(timeout=5)
    # Back before the delay ends: [MQTT-3.1.3-9] the will must not be sent.
    back = clients(broker, client_id=client_id, clean=False, session_expiry=60).connect()
    assert back.connack.session_present is True
    watcher.expect_nothing(2.0)
