"""Nothing acknowledged is lost, nothing is stored twice: devices publish sequence-numbered QoS 1
messages continuously while their hub is restarted, while its parser process is killed with
SIGKILL, or while polyhub itself is restarted gracefully (several times, on the same data
directory); messages published for a stopped hub wait in its parser's session across a restart
of polyhub. Afterwards the stored rows are exactly the published set."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from hub_harness import HOST, MqttClient, Polyhub, restart_polyhub, wait_until

DEVICES = ["dur-a", "dur-b", "dur-c"]
# Publishers run until stopped; this only bounds a runaway test.
MAX_PER_DEVICE = 3000
# Paced so that what arrives while a parser is down (well under a second) stays far below the
# broker's per-session queue of 1000 messages: a full queue drops messages by design, not by bug.
PACE = 0.004
RESTARTS = 4
# Graceful restarts of polyhub in the restart test.
POLYHUB_RESTARTS = 3


class Publisher(threading.Thread):
    """Publishes `{"seq": n}` (n = 1, 2, ...) with QoS 1 to one device's channel, each one
    acknowledged by the broker before the next, until stopped. `acked` is how many were
    acknowledged; `error` is set if a publish failed."""

    def __init__(self, port: int, hub: str, device: str):
        super().__init__(name=f"publisher-{device}", daemon=True)
        self.client = MqttClient(port, f"publisher-{device}")
        self.topic = f"/{hub}/{device}/data"
        self.device = device
        self.acked = 0
        self.error: BaseException | None = None
        self.stop_event = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop_event.is_set() and self.acked < MAX_PER_DEVICE:
                self.client.publish(self.topic, f'{{"seq": {self.acked + 1}}}')
                self.acked += 1
                time.sleep(PACE)
        except BaseException as error:  # noqa: BLE001 - reported by finish()
            self.error = error

    def finish(self) -> int:
        self.stop_event.set()
        self.join(timeout=20)
        self.client.close()
        assert not self.is_alive(), f"{self.name} did not stop"
        assert self.error is None, f"{self.name} failed: {self.error!r}"
        assert self.acked > 0, f"{self.name} published nothing"
        return self.acked


def start_publishers(polyhub, hub: str) -> list[Publisher]:
    publishers = [Publisher(polyhub.mqtt_port, hub, device) for device in DEVICES]
    for publisher in publishers:
        publisher.start()
    return publishers


def wait_for_progress(publishers: list[Publisher], more: int = 20) -> None:
    """Lets every publisher get `more` messages further, so each disruption lands mid-stream."""
    targets = [publisher.acked + more for publisher in publishers]
    wait_until(
        lambda: all(p.acked >= t or not p.is_alive() for p, t in zip(publishers, targets)),
        "publishers making progress",
    )
    assert all(p.is_alive() for p in publishers), "a publisher ended before the disruption"


def assert_exact_rows(api, published: dict[str, int]) -> None:
    """Waits until every published seq is stored, then checks there is nothing else."""
    for device, count in published.items():
        def stored(device=device, count=count):
            rows = api.all_rows(device, signal="seq")
            return rows if len(rows) >= count else None

        rows = wait_until(stored, f"{count} rows of {device}", timeout=30)
        seqs = sorted(int(row["value"]) for row in rows)
        missing = sorted(set(range(1, count + 1)) - set(seqs))
        duplicates = sorted({s for s in seqs if seqs.count(s) > 1})
        assert not missing, f"{device}: lost {len(missing)} acknowledged messages: {missing[:20]}"
        assert not duplicates, f"{device}: stored twice: {duplicates[:20]}"
        assert seqs == list(range(1, count + 1)), f"{device}: unexpected rows"
    # Late redeliveries would show up as extra rows: look once more after a moment.
    time.sleep(0.3)
    for device, count in published.items():
        assert len(api.all_rows(device, signal="seq")) == count, f"{device}: rows appeared late"


def setup_hub(api, hub: str, **settings) -> None:
    api.add_group("dur")
    api.add_hub(hub, "dur", decoder="json", **settings)
    for device in DEVICES:
        api.add_device(device, hub)
    wait_until(lambda: api.parser(hub)["state"] == "running", f"{hub} running")


def test_restarts_while_devices_publish_lose_and_duplicate_nothing(api, polyhub):
    setup_hub(api, "h6")
    publishers = start_publishers(polyhub, "h6")
    try:
        for _round in range(RESTARTS):
            wait_for_progress(publishers)
            status = api.post("/hubs/h6/restart")
            assert status["hub_id"] == "h6"
            wait_until(lambda: api.parser("h6")["state"] == "running", "h6 running after restart")
        wait_for_progress(publishers)
    finally:
        published = {p.device: p.finish() for p in publishers}
    assert_exact_rows(api, published)
    status = api.parser("h6")
    assert status["state"] == "running"
    # Requested restarts are not failures: no failure recorded, no failure restart counted.
    events = api.get("/hubs/h6/parser/events", limit=100)["items"]
    kinds = [event["kind"] for event in events]
    assert kinds.count("started") == RESTARTS + 1, events
    assert kinds.count("stopped") == RESTARTS, events
    assert "failed" not in kinds, events
    assert status["restarts"] == 0, status


def test_killed_parser_process_loses_and_duplicates_nothing(api, polyhub):
    setup_hub(api, "h7", isolation="process")
    first = api.parser("h7")
    assert first["isolation"] == "process"
    assert isinstance(first["pid"], int) and first["pid"] > 0, first
    restarts_before = first["restarts"]

    publishers = start_publishers(polyhub, "h7")
    try:
        wait_for_progress(publishers, more=50)
        os.kill(first["pid"], signal.SIGKILL)

        def replaced():
            status = api.parser("h7")
            fresh = status["state"] == "running" and status["pid"] not in (None, first["pid"])
            return status if fresh else None

        status = wait_until(replaced, "a new parser process for h7", timeout=20)
        assert status["restarts"] >= restarts_before + 1, status
        assert status["last_error"], status
        wait_for_progress(publishers)
    finally:
        published = {p.device: p.finish() for p in publishers}
    assert_exact_rows(api, published)

    events = api.get("/hubs/h7/parser/events", limit=100)["items"]
    kinds = [event["kind"] for event in events]
    assert "failed" in kinds, events
    assert "restarted" in kinds, events
    failure = next(event for event in events if event["kind"] == "failed")
    assert failure["hub_id"] == "h7" and failure["reason"], failure


# ----- restarts of polyhub itself ---------------------------------------------------------------


@pytest.fixture
def restartable(polyhub):
    """`restartable()` restarts the current polyhub gracefully on the same data directory and
    returns the new one; `restartable(between=f)` calls `f(data_dir)` while polyhub is down.
    Every polyhub started this way must exit 0 at tear-down."""
    servers: list[Polyhub] = [polyhub]

    def restart(between=None) -> Polyhub:
        if between is None:
            servers.append(restart_polyhub(servers[-1]))
        else:
            previous = servers[-1]
            previous.stop()
            between(previous.data_dir)
            servers.append(Polyhub(previous.binary, previous.workdir, config=previous.config).start())
        return servers[-1]

    yield restart
    errors = []
    for server in servers[1:]:
        try:
            server.stop()
        except AssertionError as error:
            errors.append(str(error))
        finally:
            server.kill()
            print(server.log_tail(80))
    if errors:
        pytest.fail("\n".join(errors))


def mosquitto_pub_lines(port: int, client_id: str, topic: str, payloads: list[str]) -> None:
    """Publishes `payloads` with QoS 1 through one `mosquitto_pub -l` connection; a zero exit
    status means every one was acknowledged by the broker."""
    completed = subprocess.run(
        ["mosquitto_pub", "-h", HOST, "-p", str(port), "-i", client_id, "-q", "1", "-t", topic, "-l"],
        input="".join(f"{payload}\n" for payload in payloads), capture_output=True, text=True,
        timeout=30,
    )
    assert completed.returncode == 0, f"mosquitto_pub failed: {completed.stderr}"


def stored_seqs(api, device: str) -> list[int]:
    return sorted(int(row["value"]) for row in api.all_rows(device, signal="seq"))


def committed_seqs(data_dir, device: str) -> set[int]:
    """The `seq` rows of `device` committed to the SQLite store, read from the file while
    polyhub is down."""
    connection = sqlite3.connect(f"file:{data_dir / 'polyhub.sqlite'}?mode=ro", uri=True)
    try:
        rows = connection.execute(
            "SELECT num FROM telemetry WHERE device_id = ? AND signal = 'seq'", (device,)
        ).fetchall()
    finally:
        connection.close()
    return {int(value) for (value,) in rows}


def test_messages_for_a_stopped_task_hub_survive_restarts_of_polyhub(api, polyhub, restartable):
    api.add_group("dur")
    api.add_hub("hs", "dur", decoder="json")
    for device in ("st-a", "st-b"):
        api.add_device(device, "hs")
    wait_until(lambda: api.parser("hs")["state"] == "running", "hs running")
    assert api.parser("hs")["isolation"] == "task"
    mosquitto_pub_lines(polyhub.mqtt_port, "st-a", "/hs/st-a/data", ['{"seq": 1}'])
    wait_until(lambda: stored_seqs(api, "st-a") == [1], "the first row of st-a")
    api.post("/hubs/hs/stop")
    wait_until(lambda: api.parser("hs")["state"] == "stopped", "hs stopped")

    # While the hub is stopped: one device through mosquitto_pub, one through paho.
    mosquitto_pub_lines(polyhub.mqtt_port, "st-a", "/hs/st-a/data",
                        [f'{{"seq": {n}}}' for n in range(2, 52)])
    device = MqttClient(polyhub.mqtt_port, "st-b")
    for n in range(1, 31):
        device.publish("/hs/st-b/data", json.dumps({"seq": n}))
    device.close()

    polyhub = restartable()
    api = polyhub.api
    assert api.parser("hs")["state"] == "stopped", "the hub stays stopped across the restart"
    # The parser's session came back with its subscriptions: it keeps collecting while the hub
    # is stopped, across a second restart too.
    mosquitto_pub_lines(polyhub.mqtt_port, "st-a", "/hs/st-a/data",
                        [f'{{"seq": {n}}}' for n in range(52, 62)])
    polyhub = restartable()
    api = polyhub.api
    device = MqttClient(polyhub.mqtt_port, "st-b")
    for n in range(31, 41):
        device.publish("/hs/st-b/data", json.dumps({"seq": n}))
    device.close()
    assert stored_seqs(api, "st-a") == [1] and stored_seqs(api, "st-b") == []

    api.post("/hubs/hs/start")
    assert_exact_rows(api, {"st-a": 61, "st-b": 40})
    status = api.parser("hs")
    assert status["duplicates_skipped"] == 0, status
    assert api.dead_letters("hs") == []


def published(info) -> bool:
    """Whether paho saw the PUBACK of `info` (False when it could not even send it)."""
    try:
        return info.rc == mqtt.MQTT_ERR_SUCCESS and info.is_published()
    except (RuntimeError, ValueError):
        return False


class RestartingPublisher(threading.Thread):
    """One device publishing `{"seq": n}` with QoS 1 as fast as acknowledged (paced), to
    whichever polyhub is current: when its connection goes (polyhub restarting) it connects
    again to `port_of()`. Every attempt gets a new n, never reused: `acked` holds the n
    acknowledged with a PUBACK, `in_doubt` those sent whose PUBACK never came (the connection
    went first), which the broker may or may not have taken."""

    def __init__(self, port_of, hub: str, device: str):
        super().__init__(name=f"restarting-publisher-{device}", daemon=True)
        self.port_of = port_of
        self.topic = f"/{hub}/{device}/data"
        self.device = device
        self.acked: set[int] = set()
        self.in_doubt: set[int] = set()
        self.connections = 0
        self.error: BaseException | None = None
        self.stop_event = threading.Event()
        self._attempts = 0

    def _connect(self):
        connected = threading.Event()
        lost = threading.Event()
        client = mqtt.Client(client_id=f"publisher-{self.device}", clean_session=True)
        client.on_connect = lambda _c, _u, _f, rc: rc == 0 and connected.set()
        client.on_disconnect = lambda _c, _u, _rc: lost.set()
        try:
            client.connect(HOST, self.port_of(), keepalive=30)
        except OSError:
            return None
        client.loop_start()
        if not connected.wait(2) or lost.is_set():
            self._close(client)
            return None
        self.connections += 1
        return client, lost

    @staticmethod
    def _close(client) -> None:
        try:
            client.disconnect()
        finally:
            client.loop_stop()

    def run(self) -> None:
        try:
            connection = None
            while not self.stop_event.is_set() and self._attempts < MAX_PER_DEVICE:
                if connection is None:
                    connection = self._connect()
                    if connection is None:
                        time.sleep(0.05)
                        continue
                client, lost = connection
                self._attempts += 1
                n = self._attempts
                info = client.publish(self.topic, json.dumps({"seq": n}), qos=1)
                deadline = time.monotonic() + 5
                while (info.rc == mqtt.MQTT_ERR_SUCCESS and not published(info)
                       and not lost.is_set() and time.monotonic() < deadline):
                    time.sleep(0.002)
                if published(info):
                    self.acked.add(n)
                    time.sleep(PACE)
                    continue
                self.in_doubt.add(n)
                self._close(client)
                connection = None
            if connection is not None:
                self._close(connection[0])
        except BaseException as error:  # noqa: BLE001 - reported by finish()
            self.error = error

    def finish(self) -> None:
        self.stop_event.set()
        self.join(timeout=20)
        assert not self.is_alive(), f"{self.name} did not stop"
        assert self.error is None, f"{self.name} failed: {self.error!r}"


@pytest.mark.parametrize("isolation", ["task", "process"])
def test_graceful_restarts_of_polyhub_while_devices_publish_lose_and_duplicate_nothing(
        api, polyhub, restartable, isolation):
    hub = "hr" if isolation == "task" else "hrp"
    setup_hub(api, hub, isolation=isolation)
    current = {"polyhub": polyhub}

    def all_acknowledged_committed(data_dir) -> None:
        # The shutdown order at work: devices are disconnected before the parsers stop, so a
        # graceful stop leaves nothing a device had acknowledged uncommitted (the old order
        # stopped the parsers first and left what arrived meanwhile behind).
        for publisher in publishers:
            acked = set(publisher.acked)
            missing = acked - committed_seqs(data_dir, publisher.device)
            assert not missing, (f"{publisher.device}: acknowledged before the stop, not committed "
                                 f"by it: {sorted(missing)[:20]}")
    publishers = [RestartingPublisher(lambda: current["polyhub"].mqtt_port, hub, device)
                  for device in DEVICES]
    for publisher in publishers:
        publisher.start()
    try:
        for _round in range(POLYHUB_RESTARTS):
            targets = [len(p.acked) + 30 for p in publishers]
            wait_until(lambda: all(len(p.acked) >= t for p, t in zip(publishers, targets)),
                       "publishers making progress")
            # A process parser loses its connection with the devices', so what was still on its
            # way to it stays in its saved session instead: checked after the restart only.
            check = all_acknowledged_committed if isolation == "task" else None
            current["polyhub"] = restartable(between=check)
            wait_until(lambda: current["polyhub"].api.parser(hub)["state"] == "running",
                       f"{hub} running after the restart")
        targets = [len(p.acked) + 30 for p in publishers]
        wait_until(lambda: all(len(p.acked) >= t for p, t in zip(publishers, targets)),
                   "publishers making progress after the last restart")
    finally:
        for publisher in publishers:
            publisher.finish()
    api = current["polyhub"].api
    for publisher in publishers:
        assert publisher.connections == POLYHUB_RESTARTS + 1, (publisher.device, publisher.connections)
        # A connection cut by the shutdown leaves at most the one message in flight in doubt.
        assert len(publisher.in_doubt) <= POLYHUB_RESTARTS, (publisher.device, publisher.in_doubt)
        expected = len(publisher.acked)

        def all_acked_stored(publisher=publisher):
            seqs = stored_seqs(api, publisher.device)
            return seqs if publisher.acked <= set(seqs) else None

        seqs = wait_until(all_acked_stored, f"every acknowledged message of {publisher.device}",
                          timeout=30)
        duplicates = sorted({s for s in seqs if seqs.count(s) > 1})
        assert not duplicates, f"{publisher.device}: stored twice: {duplicates[:20]}"
        unexpected = set(seqs) - publisher.acked - publisher.in_doubt
        assert not unexpected, f"{publisher.device}: rows never published: {sorted(unexpected)[:20]}"
        assert expected > 0
    time.sleep(0.3)
    for publisher in publishers:
        seqs = stored_seqs(api, publisher.device)
        assert len(seqs) == len(set(seqs)), f"{publisher.device}: rows appeared late"
    events = api.get(f"/hubs/{hub}/parser/events", limit=100)["items"]
    assert "failed" not in [event["kind"] for event in events], events


def test_switching_a_hubs_isolation_while_devices_publish_loses_and_duplicates_nothing(api, polyhub):
    setup_hub(api, "hx")
    assert api.parser("hx")["isolation"] == "task"
    publishers = start_publishers(polyhub, "hx")
    try:
        for isolation in ("process", "task", "process"):
            wait_for_progress(publishers)
            api.patch("/hubs/hx", {"settings": {"decoder": "json", "isolation": isolation}})
            api.post("/hubs/hx/restart")
            wait_until(
                lambda isolation=isolation: (lambda s: s["state"] == "running"
                                             and s["isolation"] == isolation)(api.parser("hx")),
                f"hx running in {isolation} isolation",
            )
        wait_for_progress(publishers)
    finally:
        published = {p.device: p.finish() for p in publishers}
    assert_exact_rows(api, published)
    events = api.get("/hubs/hx/parser/events", limit=100)["items"]
    assert "failed" not in [event["kind"] for event in events], events


def test_a_process_hub_under_a_burst_drops_nothing(api, polyhub):
    """Four publishers send far more QoS 1 messages than `[mqtt.limits] max_queued_messages`
    (1000) as fast as the broker acknowledges them to one process-isolated hub: its session is
    prepared unbounded by the parent, so every acknowledged message is stored."""
    api.add_group("burst")
    api.add_hub("hb", "burst", decoder="json", isolation="process")
    devices = [f"burst-{n}" for n in range(4)]
    for device in devices:
        api.add_device(device, "hb")
    wait_until(lambda: api.parser("hb")["state"] == "running", "hb running")
    count = 5_000
    threads = [
        threading.Thread(target=mosquitto_pub_lines, args=(
            polyhub.mqtt_port, device, f"/hb/{device}/data",
            [f'{{"seq": {n}}}' for n in range(1, count + 1)]))
        for device in devices
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert_exact_rows(api, {device: count for device in devices})
