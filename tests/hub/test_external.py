"""polyhub on an external MQTT broker: a real Mosquitto (Debian's), started by the test on a free
port of 127.0.0.1, and `polyhub run` configured with `[external_broker]` to use it.

Devices talk to Mosquitto only (paho-mqtt 1.x and `mosquitto_pub`); what they publish must come
out of polyhub's REST API, exactly. Presence comes from the hub `presence` channel (a retained
`online`, and `offline` as the device's last will), and commands go out through Mosquitto to a
device that announced itself online. polyhub's own broker must not listen in this mode.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import hub_harness
from hub_harness import HOST, WAIT, command_in_state, mosquitto_pub, wait_until

# How polyhub announces the external broker; it stands in for "MQTT listening on" so that the
# harness finds the port devices must use (Mosquitto's).
EXTERNAL_BROKER_LINE = re.compile(r"using the external MQTT broker mqtt://\[?([0-9a-fA-F.:]+?)\]?:(\d+)")

# Long enough for a command to go out if it wrongly were to, short enough for a fast suite.
SETTLE = 0.5


# ----- Mosquitto ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class Mosquitto:
    """One `mosquitto -c FILE` in the foreground on a free loopback port, killed by its pid."""

    def __init__(self, rundir: Path, tls: Optional[dict] = None):
        self.rundir = rundir
        self.port = 0
        # {"ca": ..., "cert": ..., "key": ...}: a second, TLS listener on `tls_port`.
        self.tls = tls
        self.tls_port = 0
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> "Mosquitto":
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        # A port found free can be taken before Mosquitto binds it: try again then.
        for _attempt in range(3):
            self.port = free_port()
            self.tls_port = free_port() if self.tls else 0
            conf = self.rundir / "mosquitto.conf"
            lines = [
                f"listener {self.port} {HOST}",
                "allow_anonymous true",
                "persistence false",
                # Mosquitto's defaults drop QoS 1 messages of a busy session (docs/hub.md).
                "max_queued_messages 0",
                "max_inflight_messages 0",
                "log_dest stderr",
                "log_type error",
                "log_type warning",
            ]
            if os.geteuid() == 0:
                lines.append("user root")
            if self.tls:
                lines += [
                    f"listener {self.tls_port} {HOST}",
                    f"cafile {self.tls['ca']}",
                    f"certfile {self.tls['cert']}",
                    f"keyfile {self.tls['key']}",
                ]
            conf.write_text("\n".join(lines) + "\n")
            log = open(self.rundir / "mosquitto.log", "ab")
            self.process = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
            log.close()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    for port in filter(None, (self.port, self.tls_port)):
                        socket.create_connection((HOST, port), timeout=0.2).close()
                    return self
                except OSError:
                    time.sleep(0.02)
            self.stop()
        raise AssertionError(f"mosquitto did not start: {(self.rundir / 'mosquitto.log').read_text()}")

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.port}"

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


@pytest.fixture
def mosquitto(tmp_path):
    rundir = tmp_path / "mosquitto"
    rundir.mkdir()
    broker = Mosquitto(rundir).start()
    yield broker
    broker.stop()


def external_config(mosquitto: Mosquitto, extra: str = "") -> str:
    return f'[external_broker]\nurl = "{mosquitto.url}"\n{extra}'


@pytest.fixture
def start_external(mosquitto, hub_factory, monkeypatch):
    """Starts polyhubs on `mosquitto` (which is set up before, and so torn down after, them)."""
    monkeypatch.setitem(hub_harness.LISTENING, "mqtt", EXTERNAL_BROKER_LINE)

    def start(extra: str = ""):
        server = hub_factory(external_config(mosquitto, extra))
        assert server.mqtt_port == mosquitto.port
        return server

    return start


@pytest.fixture
def polyhub(start_external):
    """Overrides the suite's fixture: `polyhub run` on the external broker."""
    return start_external()


# ----- devices on Mosquitto ----------------------------------------------------------------------


def presence(api, device: str) -> dict:
    return api.get(f"/devices/{device}/presence")


def online(api, device: str) -> dict:
    return wait_until(lambda: (lambda p: p if p["online"] else None)(presence(api, device)), f"{device} online")


def offline(api, device: str) -> dict:
    return wait_until(lambda: (lambda p: p if not p["online"] else None)(presence(api, device)), f"{device} offline")


class Device:
    """A hub-style device on Mosquitto, as the external-broker contract asks (docs/external-broker.md):
    client id == device id, last will `offline` (retained, QoS 1) on its presence channel; once
    connected it subscribes its command topic and only then publishes a retained `online`.
    Commands are recorded (decoded) in arrival order."""

    def __init__(self, port: int, hub: str, device: str, announce: bool = True, protocol=mqtt.MQTTv311):
        self.hub, self.device = hub, device
        self.presence_topic = f"/{hub}/{device}/presence"
        self.commands: list[dict] = []
        self.messages: list[mqtt.MQTTMessage] = []
        self._lock = threading.Condition()
        self._ready = threading.Event()
        self.announce = announce
        self._announced: Optional[mqtt.MQTTMessageInfo] = None
        if protocol == mqtt.MQTTv5:
            self.client = mqtt.Client(client_id=device, protocol=protocol)
        else:
            self.client = mqtt.Client(client_id=device, protocol=protocol, clean_session=False)
        self.client.will_set(self.presence_topic, "offline", qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        if protocol == mqtt.MQTTv5:
            self.client.connect(HOST, port, keepalive=30, clean_start=False)
        else:
            self.client.connect(HOST, port, keepalive=30)
        self.client.loop_start()
        assert self._ready.wait(WAIT), f"device {device} did not connect and subscribe"
        if announce:
            self._announced.wait_for_publish(WAIT)
            assert self._announced.is_published(), f"device {device} could not announce itself"

    def _on_connect(self, client, _userdata, _flags, rc, _properties=None):
        if rc == 0:
            client.subscribe(f"/{self.hub}/{self.device}/cmd", 1)

    def _on_subscribe(self, client, *_args):
        # Not waited for here: this is paho's network thread, which must read the PUBACK.
        if self.announce:
            self._announced = client.publish(self.presence_topic, "online", qos=1, retain=True)
        self._ready.set()

    def _on_message(self, _client, _userdata, message):
        with self._lock:
            self.commands.append(json.loads(message.payload))
            self.messages.append(message)
            self._lock.notify_all()

    def wait_commands(self, count: int) -> list[dict]:
        deadline = time.monotonic() + WAIT
        with self._lock:
            while len(self.commands) < count:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"{self.device} received {self.commands}, not {count} commands"
                self._lock.wait(timeout=min(remaining, 0.2))
            return list(self.commands)

    def reply(self, command_id: str, result=None) -> None:
        body = {"id": command_id, "status": "ok", "result": result}
        info = self.client.publish(f"/{self.hub}/{self.device}/cmd_reply", json.dumps(body), qos=1)
        info.wait_for_publish(WAIT)
        assert info.is_published()

    def drop(self) -> None:
        """Loses the connection without DISCONNECT, as a crash or a cut cable would: the broker
        publishes the will."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def devices(polyhub):
    started: list[Device] = []

    def connect(hub: str, device: str, **options) -> Device:
        started.append(Device(polyhub.mqtt_port, hub, device, **options))
        return started[-1]

    yield connect
    for device in started:
        try:
            device.close()
        except Exception:  # noqa: BLE001 - a dropped device has nothing left to close
            pass


def publish_lines(port: int, client_id: str, topic: str, payloads: list[str]) -> None:
    """QoS 1 through one `mosquitto_pub -l`; exit status 0 means Mosquitto acknowledged all."""
    completed = subprocess.run(
        ["mosquitto_pub", "-h", HOST, "-p", str(port), "-i", client_id, "-q", "1", "-t", topic, "-l"],
        input="".join(f"{payload}\n" for payload in payloads), capture_output=True, text=True, timeout=30,
    )
    assert completed.returncode == 0, f"mosquitto_pub failed: {completed.stderr}"


def assert_exact_seqs(api, device: str, count: int) -> None:
    """Every seq 1..count stored exactly once, and nothing else (looked at again a moment later)."""
    def stored():
        rows = api.all_rows(device, signal="seq")
        return rows if len(rows) >= count else None

    rows = wait_until(stored, f"{count} rows of {device}", timeout=20)
    assert sorted(int(row["value"]) for row in rows) == list(range(1, count + 1))
    time.sleep(0.3)
    assert len(api.all_rows(device, signal="seq")) == count, f"{device}: rows appeared late"


def setup(api, hub: str, *devices: str, **settings) -> None:
    api.add_group("g")
    api.add_hub(hub, "g", decoder="json", **settings)
    for device in devices:
        api.add_device(device, hub)
    wait_until(lambda: api.parser(hub)["state"] == "running", f"{hub} running")


# ----- tests -------------------------------------------------------------------------------------


def test_telemetry_published_to_mosquitto_is_stored_exactly(polyhub, api, mosquitto):
    setup(api, "h1", "d1", "d2")
    # polyhub's own broker does not listen: the only MQTT port is Mosquitto's.
    log = polyhub.log_text()
    assert "MQTT listening on" not in log
    assert f"using the external MQTT broker {mosquitto.url}; the embedded broker does not listen" in log

    publish_lines(mosquitto.port, "pub-d1", "/h1/d1/data", [json.dumps({"seq": n}) for n in range(1, 201)])
    paho = mqtt.Client(client_id="pub-d2", protocol=mqtt.MQTTv311)
    paho.connect(HOST, mosquitto.port, keepalive=30)
    paho.loop_start()
    try:
        for n in range(1, 51):
            info = paho.publish("/h1/d2/data", json.dumps({"seq": n, "temp": 20 + n / 10}), qos=1)
            info.wait_for_publish(WAIT)
            assert info.is_published()
    finally:
        paho.disconnect()
        paho.loop_stop()
    # Not a registered device: nobody subscribed, nothing stored.
    mosquitto_pub(mosquitto.port, "/h1/ghost/data", '{"seq": 1}')

    assert_exact_seqs(api, "d1", 200)
    assert_exact_seqs(api, "d2", 50)
    latest = {row["signal"]: row["value"] for row in api.get("/devices/d2/telemetry/latest")["items"]}
    assert latest == {"seq": 50.0, "temp": 25.0}
    status = api.parser("h1")
    assert status["messages_in"] == 250 and status["rows_written"] == 300
    assert status["dead_letters"] == 0


def test_the_register_channel_works_through_mosquitto(polyhub, api, mosquitto):
    setup(api, "h2")
    replies = hub_harness.Controller(mosquitto.port, "controller", ["/h2/register_reply"])
    try:
        reply = replies.command("/h2/register_cmd", {"action": "add", "device": "r1", "request_id": "x"},
                                "/h2/register_reply")
        assert reply == {"request_id": "x", "status": "accepted", "action": "add", "hub": "h2", "device": "r1"}
        # Accepted means subscribed: the device may publish at once.
        mosquitto_pub(mosquitto.port, "/h2/r1/data", '{"seq": 1}')
        assert_exact_seqs(api, "r1", 1)
    finally:
        replies.close()


def test_presence_comes_from_the_retained_message_and_the_last_will(polyhub, api, mosquitto, devices):
    setup(api, "h3", "p1")
    assert presence(api, "p1")["online"] is False
    # A device already online (its retained message waiting on Mosquitto) before it is
    # registered: the parser's subscription receives the retained message.
    mosquitto_pub_retained(mosquitto.port, "/h3/p2/presence", "online")
    api.add_device("p2", "h3")
    online(api, "p2")

    device = devices("h3", "p1")
    first = online(api, "p1")
    assert first["changed_at"] is not None and first["last_seen"] is not None
    device.drop()
    gone = offline(api, "p1")
    assert gone["changed_at"] >= first["changed_at"]
    # p2's state is its own.
    assert presence(api, "p2")["online"] is True
    # A presence payload that is neither online nor offline is a dead letter of the device.
    mosquitto_pub_retained(mosquitto.port, "/h3/p2/presence", "maybe")
    letter = wait_until(lambda: api.dead_letters("h3"), "a dead letter")[0]
    assert letter["device_id"] == "p2" and "online" in letter["reason"]
    assert presence(api, "p2")["online"] is True


def mosquitto_pub_retained(port: int, topic: str, payload: str) -> None:
    completed = subprocess.run(
        ["mosquitto_pub", "-h", HOST, "-p", str(port), "-q", "1", "-r", "-t", topic, "-m", payload],
        capture_output=True, text=True, timeout=WAIT,
    )
    assert completed.returncode == 0, completed.stderr


def test_a_command_waits_while_the_device_is_offline_and_is_acknowledged_by_its_reply(
        polyhub, api, mosquitto, devices):
    setup(api, "h4", "c1")
    queued = api.post("/devices/c1/commands", {"name": "led", "payload": "on"})
    assert queued["state"] == "queued"
    time.sleep(SETTLE)
    assert api.get(f"/commands/{queued['id']}")["state"] == "queued", "sent to an offline device"

    # Connected but not announced: still offline as far as polyhub can tell.
    device = devices("h4", "c1", announce=False)
    time.sleep(SETTLE)
    assert device.commands == []
    assert api.get(f"/commands/{queued['id']}")["state"] == "queued"
    device.close()

    device = devices("h4", "c1")
    command = device.wait_commands(1)[0]
    assert command == {"id": queued["id"], "name": "led", "payload": "on"}
    device.reply(queued["id"], result={"led": "on"})
    done = command_in_state(api, queued["id"], "acknowledged")
    assert done["reply"] == {"led": "on"}
    assert done["created_at"] <= done["sent_at"] <= done["acknowledged_at"]

    # Online: the next one goes out at once and the API can wait for the reply.
    replier = threading.Thread(target=lambda: device.reply(device.wait_commands(2)[1]["id"], result=2))
    replier.start()
    answered = api.post("/devices/c1/commands", {"name": "count", "wait_ms": 5000})
    replier.join(timeout=WAIT)
    assert answered["state"] == "acknowledged" and answered["reply"] == 2

    # Its will turns it offline: commands wait again.
    device.drop()
    offline(api, "c1")
    waiting = api.post("/devices/c1/commands", {"name": "led", "payload": "off"})
    time.sleep(SETTLE)
    assert api.get(f"/commands/{waiting['id']}")["state"] == "queued"


def test_an_mqtt5_device_answers_on_the_response_topic_through_mosquitto(polyhub, api, mosquitto, devices):
    setup(api, "h6", "v5")
    device = devices("h6", "v5", protocol=mqtt.MQTTv5)
    wait_until(lambda: presence(api, "v5")["online"] is True, "v5 online")
    submitted = api.post("/devices/v5/commands", {"name": "led", "payload": "on"})
    device.wait_commands(1)
    request = device.messages[0]
    assert request.properties.ResponseTopic == "/h6/v5/cmd_reply"
    assert request.properties.CorrelationData == submitted["id"].encode()
    # MQTT 5 request/response: no "id" in the answer, the correlation data copied.
    properties = Properties(PacketTypes.PUBLISH)
    properties.CorrelationData = request.properties.CorrelationData
    info = device.client.publish(request.properties.ResponseTopic, json.dumps({"status": "ok", "result": "lit"}),
                                 qos=1, properties=properties)
    info.wait_for_publish(WAIT)
    done = command_in_state(api, submitted["id"], "acknowledged")
    assert done["reply"] == "lit"


def test_a_command_that_reached_no_subscriber_stays_queued_until_the_device_subscribes(
        polyhub, api, mosquitto, devices):
    setup(api, "h7", "late")
    # Online as far as polyhub can tell (a retained `online` outlives the device's connection),
    # but nobody is subscribed to its command topic.
    mosquitto_pub_retained(mosquitto.port, "/h7/late/presence", "online")
    online(api, "late")
    submitted = api.post("/devices/late/commands", {"name": "led", "payload": "on"})
    time.sleep(SETTLE)
    # Mosquitto's MQTT 5 PUBACK said "no matching subscribers": the command reached nobody,
    # so it is neither sent nor delivered.
    assert api.get(f"/commands/{submitted['id']}")["state"] == "queued"

    device = devices("h7", "late")
    command = device.wait_commands(1)[0]
    assert command == {"id": submitted["id"], "name": "led", "payload": "on"}
    device.reply(submitted["id"], result="lit")
    done = command_in_state(api, submitted["id"], "acknowledged")
    assert done["reply"] == "lit"
    assert done["attempts"] == 1, "only the send that reached the device counts"


def test_a_process_isolated_hub_ingests_from_mosquitto(polyhub, api, mosquitto, devices):
    setup(api, "h5", "q1", isolation="process")
    status = api.parser("h5")
    assert status["isolation"] == "process" and status["pid"]
    publish_lines(mosquitto.port, "pub-q1", "/h5/q1/data", [json.dumps({"seq": n}) for n in range(1, 101)])
    assert_exact_seqs(api, "q1", 100)
    # Devices added later are followed by the child too, presence included.
    api.add_device("q2", "h5")
    devices("h5", "q2")
    online(api, "q2")
    mosquitto_pub(mosquitto.port, "/h5/q2/data", '{"seq": 1}')
    assert_exact_seqs(api, "q2", 1)


def make_pki(directory: Path) -> dict:
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it (openssl), plus an
    unrelated CA that must not be trusted."""
    directory.mkdir()

    def openssl(*args: str) -> None:
        completed = subprocess.run(["openssl", *args], cwd=directory, capture_output=True, text=True, timeout=30)
        assert completed.returncode == 0, completed.stderr

    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                "-days", "2", "-subj", f"/CN=polyhub test {ca}")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=localhost")
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "san.cnf")
    return {name: directory / f"{name}.pem" for name in ("ca", "other-ca")} | {
        "cert": directory / "server.pem", "key": directory / "server.key"}


def test_mqtts_with_a_ca_file(tmp_path, hub_factory, monkeypatch):
    pki = make_pki(tmp_path / "pki")
    rundir = tmp_path / "mosquitto-tls"
    rundir.mkdir()
    broker = Mosquitto(rundir, tls=pki).start()
    try:
        url = f"mqtts://127.0.0.1:{broker.tls_port}"
        # A broker whose certificate does not chain to ca_file is refused at start.
        assert_refused(tmp_path, f'[external_broker]\nurl = "{url}"\nca_file = "{pki["other-ca"]}"\n',
                       status=1, expected=f"error: cannot connect to the external MQTT broker {url}: ")

        monkeypatch.setitem(hub_harness.LISTENING, "mqtt", re.compile(
            r"using the external MQTT broker mqtts://\[?([0-9a-fA-F.:]+?)\]?:(\d+)"))
        server = hub_factory(f'[external_broker]\nurl = "{url}"\nca_file = "{pki["ca"]}"\n')
        try:
            assert server.mqtt_port == broker.tls_port
            setup(server.api, "ht", "t1")
            # Devices may stay on the plain listener: it is the same broker.
            publish_lines(broker.port, "pub-t1", "/ht/t1/data", [json.dumps({"seq": n}) for n in range(1, 21)])
            assert_exact_seqs(server.api, "t1", 20)
        finally:
            server.stop()
    finally:
        broker.stop()


class Publisher(threading.Thread):
    """Publishes `{"seq": n}` for n = 1, 2, ... at QoS 1 to Mosquitto until stopped; `acked` is
    the last n Mosquitto acknowledged."""

    def __init__(self, port: int, topic: str):
        super().__init__(daemon=True)
        self.topic = topic
        self.acked = 0
        self.error: Optional[BaseException] = None
        self._stop_asked = threading.Event()
        self.client = mqtt.Client(client_id=f"pub-{topic.replace('/', '-')}", protocol=mqtt.MQTTv311)
        self.client.connect(HOST, port, keepalive=30)
        self.client.loop_start()

    def run(self) -> None:
        try:
            n = 0
            while not self._stop_asked.is_set():
                n += 1
                info = self.client.publish(self.topic, json.dumps({"seq": n}), qos=1)
                info.wait_for_publish(WAIT)
                assert info.is_published(), f"message {n} not acknowledged by Mosquitto"
                self.acked = n
                time.sleep(0.002)
        except BaseException as error:  # noqa: BLE001 - reported by finish()
            self.error = error

    def progress(self, more: int = 30) -> None:
        target = self.acked + more
        wait_until(lambda: self.acked >= target or not self.is_alive(), "the publisher making progress")
        assert self.error is None, self.error

    def finish(self) -> int:
        self._stop_asked.set()
        self.join(timeout=WAIT)
        self.client.disconnect()
        self.client.loop_stop()
        assert self.error is None, self.error
        return self.acked


@pytest.mark.parametrize("isolation", ["task", "process"])
def test_restarts_while_a_device_publishes_lose_and_duplicate_nothing(polyhub, api, mosquitto, isolation):
    hub = f"hr-{isolation}"
    setup(api, hub, "s1", isolation=isolation)
    publisher = Publisher(mosquitto.port, f"/{hub}/s1/data")
    publisher.start()
    try:
        for _restart in range(4):
            publisher.progress()
            api.post(f"/hubs/{hub}/restart")
        publisher.progress()
        # polyhub itself goes away for a while: Mosquitto keeps the parser's session.
        hub_harness.restart(polyhub)
        wait_until(lambda: polyhub.api.parser(hub)["state"] == "running", f"{hub} running again")
        publisher.progress()
    finally:
        published = publisher.finish()
    assert_exact_seqs(polyhub.api, "s1", published)


def test_client_ids_get_the_configured_prefix(start_external, mosquitto):
    server = start_external('client_id_prefix = "site7-"\n')
    server.api.add_group("g")
    server.api.add_hub("h6", "g")
    wait_until(lambda: server.api.parser("h6")["state"] == "running", "h6 running")
    log = server.log_text()
    for client_id in ("site7-polyhub-hub-manager", "site7-polyhub-polyglot-mqtt", "site7-polyhub-parser-h6"):
        assert f"client_id={client_id}" in log, client_id


def polyhub_binary() -> str:
    repo = Path(__file__).resolve().parents[2]
    return os.environ.get("POLYHUB_BIN") or str(repo / "target" / "debug" / "polyhub")


def run_polyhub(tmp_path: Path, config: Optional[str], *args: str, env: Optional[dict] = None):
    """Runs a `polyhub run` that is expected to stop by itself; returns (status, stderr)."""
    command = [polyhub_binary(), "run", "--http-listen", f"{HOST}:0", "--mqtt-listen", f"{HOST}:0",
               "--data-dir", str(tmp_path / "data"), *args]
    if config is not None:
        (tmp_path / "polyhub.toml").write_text(config)
        command += ["--config", str(tmp_path / "polyhub.toml")]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("POLYHUB_")}
    clean.update(env or {})
    completed = subprocess.run(command, capture_output=True, text=True, timeout=30, env=clean)
    return completed.returncode, completed.stderr


def assert_refused(tmp_path: Path, config: Optional[str], *flags: str, env: Optional[dict] = None,
                   status: int = 2, expected: str) -> None:
    code, stderr = run_polyhub(tmp_path, config, *flags, env=env)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == status, f"{config!r} {flags} {env}: exit status {code}\n{stderr}"
    assert len(errors) == 1 and expected in errors[0], f"{config!r} {flags} {env}:\n{stderr}"
    assert stderr.rstrip().splitlines()[-1] == errors[0], "the error is the last line"


def test_bad_external_configuration_is_refused_with_one_line(tmp_path, mosquitto):
    # Configuration errors: exit status 2, before anything is bound or connected.
    assert_refused(tmp_path, '[external_broker]\nurl = "localhost:1883"\n',
                   expected='error: [external_broker] url = "localhost:1883"')
    assert_refused(tmp_path, None, "--external-broker", "mqtt://127.0.0.1:0",
                   expected="not a number from 1 to 65535")
    assert_refused(tmp_path, None, env={"POLYHUB_EXTERNAL_BROKER": "mqtts://127.0.0.1"},
                   expected="mqtts:// needs ca_file")
    assert_refused(tmp_path, '[external_broker]\nurl = "mqtt://127.0.0.1:1"\nusr = "x"\n',
                   expected="unknown field `usr` in [external_broker]")
    assert_refused(tmp_path, None, env={"POLYHUB_EXTERNAL_BROKER_USERNAME": "x"},
                   expected="no external broker is")
    assert_refused(tmp_path, external_config(mosquitto, '[mqtt.tls]\nlisten = "127.0.0.1:0"\ncert_file = "c.pem"\nkey_file = "k.pem"\n'),
                   expected="[mqtt.tls] configures a listener")
    # The command client of the embedded broker would reach no device.
    assert_refused(tmp_path, external_config(mosquitto, '[polyglot.mqtt]\nbroker = "embedded"\n'), status=1,
                   expected='broker = "embedded": the embedded broker serves no devices')

    # Nobody listens there: one line naming the broker, exit status 1.
    closed = free_port()
    assert_refused(tmp_path, None, "--external-broker", f"mqtt://127.0.0.1:{closed}", status=1,
                   expected=f"error: cannot connect to the external MQTT broker mqtt://127.0.0.1:{closed}: ")
