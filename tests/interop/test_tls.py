"""The TLS listener: server authentication, optional required client certificates, and the
separation of the plain and TLS ports."""

from __future__ import annotations

import socket

import pytest

from interop_brokers import TlsSettings
from interop_cli import MosquittoSub, mosquitto_pub, publish_ok
from interop_client import Client, round_trip, unique
from interop_raw import connect as raw_connect

VERSIONS = ["v31", "v311", "v5"]


@pytest.fixture
def tls_broker(broker_factory, pki):
    return broker_factory(tls=TlsSettings(pki, require_client_cert=False))


@pytest.fixture
def mtls_broker(broker_factory, pki):
    return broker_factory(tls=TlsSettings(pki, require_client_cert=True))


def server_only(pki) -> dict:
    return {"ca": pki.ca_cert}


def with_client_cert(pki) -> dict:
    return {"ca": pki.ca_cert, "cert": pki.client_cert, "key": pki.client_key}


def assert_paho_refused(broker, pki, tls: dict | None, port: int) -> None:
    """A paho client must not get a successful CONNACK: the handshake fails, or the broker
    closes the connection once it has checked the certificate (TLS 1.3 sends that verdict
    after the client's handshake has finished)."""
    connack = Client(broker, "v311", tls=tls, port=port).attempt(timeout=3)
    assert connack is None or connack.rc != 0, f"connection accepted: {connack}"


@pytest.mark.parametrize("version", VERSIONS)
def test_mosquitto_clients_over_tls(tls_broker, pki, version):
    tls_args = ("--cafile", str(pki.ca_cert))
    topic = unique("interop/tls/")
    sub = MosquittoSub(tls_broker, version, [topic], "-C", "1", "-W", "10", qos=1,
                       tls_args=tls_args, port=tls_broker.tls_port)
    try:
        sub.wait_subscribed()
        publish_ok(tls_broker, version, topic, "-q", "1", "-m", "secret",
                   tls_args=tls_args, port=tls_broker.tls_port)
        assert sub.wait_exit() == 0
        assert [(m.topic, m.payload) for m in sub.messages()] == [(topic, "secret")]
    finally:
        sub.kill()


@pytest.mark.parametrize("version", VERSIONS)
def test_paho_over_tls_and_plain_side_by_side(tls_broker, pki, version):
    topic = unique("interop/tls/")
    secure = Client(tls_broker, version, tls=server_only(pki), port=tls_broker.tls_port).connect()
    plain = Client(tls_broker, version).connect()
    try:
        secure.subscribe(topic, 2)
        plain.subscribe(topic, 2)
        plain.publish(topic, b"plain to both", qos=2)
        secure.publish(topic, b"tls to both", qos=2)
        for client in (secure, plain):
            assert sorted(m.payload for m in client.expect(2)) == [b"plain to both", b"tls to both"]
    finally:
        secure.disconnect()
        plain.disconnect()


def test_server_certificate_is_verified_by_clients(tls_broker, pki):
    """The CA check is real: a client trusting another CA refuses our server."""
    result = mosquitto_pub(tls_broker, "v311", "x", "-m", "y", port=tls_broker.tls_port,
                           tls_args=("--cafile", str(pki.rogue_cert)))
    assert result.returncode != 0


def test_client_certificate_accepted_when_required(mtls_broker, pki):
    tls_args = ("--cafile", str(pki.ca_cert), "--cert", str(pki.client_cert),
                "--key", str(pki.client_key))
    topic = unique("interop/mtls/")
    sub = MosquittoSub(mtls_broker, "v311", [topic], "-C", "1", "-W", "10", qos=1,
                       tls_args=tls_args, port=mtls_broker.tls_port)
    try:
        sub.wait_subscribed()
        publish_ok(mtls_broker, "v5", topic, "-q", "1", "-m", "mutual",
                   tls_args=tls_args, port=mtls_broker.tls_port)
        assert sub.wait_exit() == 0
        assert [m.payload for m in sub.messages()] == ["mutual"]
    finally:
        sub.kill()
    round_trip(mtls_broker, "v5", tls=with_client_cert(pki), port=mtls_broker.tls_port)
    # The positive control for assert_paho_refused's way of connecting.
    connack = Client(mtls_broker, "v311", tls=with_client_cert(pki), port=mtls_broker.tls_port).attempt()
    assert connack is not None and connack.rc == 0


def test_client_without_certificate_refused_when_required(mtls_broker, pki):
    result = mosquitto_pub(mtls_broker, "v311", unique("interop/mtls/"), "-q", "1", "-m", "x",
                           port=mtls_broker.tls_port, tls_args=("--cafile", str(pki.ca_cert)))
    assert result.returncode != 0, "mosquitto_pub without a client certificate was accepted"
    assert_paho_refused(mtls_broker, pki, server_only(pki), mtls_broker.tls_port)
    # The broker is unharmed and still serves certified clients.
    round_trip(mtls_broker, "v311", tls=with_client_cert(pki), port=mtls_broker.tls_port)


def test_client_with_untrusted_certificate_refused(mtls_broker, pki):
    rogue = {"ca": pki.ca_cert, "cert": pki.rogue_cert, "key": pki.rogue_key}
    assert_paho_refused(mtls_broker, pki, rogue, mtls_broker.tls_port)
    result = mosquitto_pub(mtls_broker, "v311", "x", "-m", "y", port=mtls_broker.tls_port,
                           tls_args=("--cafile", str(pki.ca_cert), "--cert", str(pki.rogue_cert),
                                     "--key", str(pki.rogue_key)))
    assert result.returncode != 0
    round_trip(mtls_broker, "v311", tls=with_client_cert(pki), port=mtls_broker.tls_port)


def test_plain_mqtt_on_tls_port_gets_no_connack(tls_broker, pki):
    with socket.create_connection((tls_broker.host, tls_broker.tls_port), timeout=5) as sock:
        sock.sendall(raw_connect(4, client_id=unique("plain")))
        received = b""
        try:
            while len(received) < 64:
                chunk = sock.recv(64)
                if not chunk:
                    break
                received += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    # Whatever comes back (a TLS alert record, or nothing) is not an MQTT CONNACK.
    assert not received.startswith(b"\x20"), f"plain CONNECT answered with {received!r}"
    assert_paho_refused(tls_broker, pki, None, tls_broker.tls_port)
    round_trip(tls_broker, "v311", tls=server_only(pki), port=tls_broker.tls_port)


def test_tls_client_on_plain_port_fails(tls_broker, pki):
    assert_paho_refused(tls_broker, pki, server_only(pki), tls_broker.port)
    round_trip(tls_broker, "v311")
