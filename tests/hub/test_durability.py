"""Nothing acknowledged is lost, nothing is stored twice: devices publish sequence-numbered QoS 1
messages continuously while their hub is restarted, or while its parser process is killed with
SIGKILL; afterwards the stored rows are exactly the published set."""

from __future__ import annotations

import os
import signal
import threading
import time

from hub_harness import MqttClient, wait_until

DEVICES = ["dur-a", "dur-b", "dur-c"]
# Publishers run until stopped; this only bounds a runaway test.
MAX_PER_DEVICE = 3000
# Paced so that what arrives while a parser is down (well under a second) stays far below the
# broker's per-session queue of 1000 messages: a full queue drops messages by design, not by bug.
PACE = 0.004
RESTARTS = 4


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
