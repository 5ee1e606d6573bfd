#!/usr/bin/env python3
"""Durable ingest (issue 4, "Performance"): 1,000 devices publishing QoS 1 telemetry, side by side.

    python3 bench/ingest.py            # full run (~6 minutes), results in bench/results/ingest-DATE.{md,json}
    python3 bench/ingest.py --quick    # 1 repetition of short runs, to check the harness (~1.5 minutes)

Contenders, each run with the same load (1,000 MQTT.js devices on CPU 0 publishing JSON
`{"temp": n, "seq": k}` at QoS 1, closed loop: as fast as the broker acknowledges):

- `raw`: `polyhub run` with no hub; a QoS 1 subscriber of `/+/+/data` in the generator counts
  deliveries. The broker's ceiling for this load.
- `polyhub`: `polyhub run --http-listen 127.0.0.1:0` with a group, a hub and 1,000 devices created
  through the REST API; its parser commits the telemetry to SQLite. Rows committed per second
  come from `GET /hubs/{id}/parser` (`rows_written`), sampled every 100 ms.
- `python`: Mosquitto plus bench/ingest_subscriber.py (paho-mqtt, `sqlite3`, one commit per
  message), both on CPU 1, like polyhub.
- `python-batched`: the same subscriber committing every 100 messages or 50 ms.

Publish-to-queryable latency: a few probe devices add their send time to every message and the
generator records it; a poller polls the newest `seq` of each probe device (REST
`GET /devices/{id}/telemetry/latest` for polyhub, the SQLite file read-only for Python) every
`--poll-ms`, and a message counts as queryable at the first poll that sees its seq or a later
one. See bench/README.md, "Durable ingest".
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import math
import os
import queue
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The broker benchmark's driver: brokers, pinning, /proc sampling, generator processes.
import run as broker_bench  # noqa: E402
from run import (  # noqa: E402
    BROKER_CPU,
    GENERATOR_CPU,
    MAX_RETRIES_PER_RUN,
    RETRY_BUDGET,
    BenchError,
    Broker,
    Generator,
    Mosquitto,
    Polyhub,
    cpu_busy_seconds,
    ensure_node_modules,
    fmt,
    interference,
    machine_info,
    pinned,
    proc_cpu_seconds,
    proc_status_kb,
    raise_priority,
    verdict,
    wait_events,
)

BENCH_DIR = broker_bench.BENCH_DIR
REPO_DIR = broker_bench.REPO_DIR
WORK_DIR = broker_bench.WORK_DIR
SUBSCRIBER = BENCH_DIR / "ingest_subscriber.py"

HUB_ID = "bench"
GROUP_ID = "bench"
DATA_FILTER = "/+/+/data"

# Targets from issue 4, "Performance".
TARGET_RAW_RATIO = 0.5
TARGET_PYTHON_RATIO = 20.0

CONTENDERS = ("raw", "polyhub", "python", "python-batched")


def device_id(index: int) -> str:
    return f"d{index:04d}"


def now_us() -> int:
    """CLOCK_MONOTONIC in microseconds: the clock of process.hrtime in the generator."""
    return time.monotonic_ns() // 1000


# --------------------------------------------------------------------------------------------
# Servers under test


class PolyhubRaw(Polyhub):
    """polyhub with no hub (run.py's Polyhub already puts the REST API on a free port)."""

    kind = "polyhub-raw"


class PolyhubHub(Polyhub):
    """polyhub with the REST API on a free port; the hub and devices are created after start."""

    kind = "polyhub-hub"

    def __init__(self, label: str, cpu: int | None, binary: str) -> None:
        super().__init__(label, cpu, binary)
        self.http_port = 0

    def is_ready(self) -> bool:
        text = self.log_path.read_text(errors="replace")
        if "MQTT listening on" not in text:
            return False
        found = re.search(r"HTTP listening on\s+\S*?:(\d+)", text)
        if not found:
            return False
        self.http_port = int(found.group(1))
        return True


class PythonPipeline(Mosquitto):
    """Mosquitto plus the Python subscriber, both pinned to the server CPU."""

    kind = "python"

    def __init__(self, label: str, cpu: int | None, binary: str, commit: str) -> None:
        super().__init__(label, cpu, binary)
        self.commit = commit
        self.subscriber: subprocess.Popen | None = None
        self.progress: list[tuple[int, int, int]] = []  # (t_us, messages, rows) committed
        self.reader: threading.Thread | None = None
        self.db_path: Path | None = None
        self.ready = threading.Event()

    def start_subscriber(self) -> None:
        self.db_path = self.scratch / "ingest.sqlite"
        self.sub_log = open(self.scratch / "subscriber.log", "wb")
        self.subscriber = subprocess.Popen(
            [
                sys.executable,
                str(SUBSCRIBER),
                "--port",
                str(self.port),
                "--db",
                str(self.db_path),
                "--commit",
                self.commit,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.sub_log,
            text=True,
            bufsize=1,
            preexec_fn=pinned(self.cpu),
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if not self.ready.wait(20):
            raise BenchError(f"{self.label}: the Python subscriber did not subscribe within 20 s")

    def _read(self) -> None:
        assert self.subscriber is not None and self.subscriber.stdout is not None
        for line in self.subscriber.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "ready":
                self.ready.set()
            elif event.get("event") == "progress":
                self.progress.append((event["t_us"], event["messages"], event["rows"]))

    def server_pids(self) -> list[int]:
        pids = [self.pid]
        if self.subscriber is not None and self.subscriber.poll() is None:
            pids.append(self.subscriber.pid)
        return pids

    def stop(self) -> None:
        if self.subscriber is not None:
            if self.subscriber.poll() is None:
                self.subscriber.send_signal(signal.SIGTERM)
                try:
                    self.subscriber.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.subscriber.kill()
                    self.subscriber.wait()
            if self.reader is not None:
                self.reader.join(timeout=5)
            self.sub_log.close()
            self.subscriber = None
        super().stop()


def server_pids(server: Broker) -> list[int]:
    if isinstance(server, PythonPipeline):
        return server.server_pids()
    return [server.pid]


# --------------------------------------------------------------------------------------------
# REST client (polyhub)


class Api:
    """A keep-alive HTTP/1.1 client of polyhub's REST API."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.port = port
        self.timeout = timeout
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        # Samplers and the driver may share one client: one request at a time on the connection.
        self.lock = threading.Lock()

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
        payload = json.dumps(body) if body is not None else None
        headers = {"content-type": "application/json"} if body is not None else {}
        with self.lock:
            for attempt in (1, 2):
                try:
                    self.connection.request(method, path, body=payload, headers=headers)
                    response = self.connection.getresponse()
                    raw = response.read()
                    break
                except (OSError, http.client.HTTPException) as error:
                    # A timed-out or half-used connection cannot be reused: start a fresh one.
                    self.connection.close()
                    self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
                    if attempt == 2:
                        raise BenchError(f"{method} {path}: {error}") from error
        try:
            data = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            data = raw.decode(errors="replace")
        return response.status, data

    def expect(self, method: str, path: str, body: dict | None, status: int) -> object:
        got, data = self.call(method, path, body)
        if got != status:
            raise BenchError(f"{method} {path}: HTTP {got} (expected {status}): {data}")
        return data

    def close(self) -> None:
        self.connection.close()


def create_hub(api: Api, devices: int) -> float:
    """Creates the group, the hub and its devices; returns the seconds it took."""
    started = time.monotonic()
    api.expect("POST", "/groups", {"id": GROUP_ID, "name": "ingest benchmark"}, 201)
    api.expect("POST", "/hubs", {"id": HUB_ID, "group_id": GROUP_ID, "settings": {"decoder": "json"}}, 201)
    for index in range(devices):
        api.expect("POST", "/devices", {"id": device_id(index), "hub_id": HUB_ID}, 201)
    return time.monotonic() - started


# --------------------------------------------------------------------------------------------
# Samplers: committed rows over time, and the newest queryable seq of each probe device


class CommitSampler(threading.Thread):
    """Samples a server's committed (rows, messages) every `every_s`, for rates over a window."""

    def __init__(self, server: Broker, every_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.every_s = every_s
        self.samples: list[tuple[int, int, int | None]] = []  # (t_us, rows, messages or None)
        self.stop_event = threading.Event()
        self.error: str | None = None
        self.api = Api(server.http_port) if isinstance(server, PolyhubHub) else None

    def sample(self) -> tuple[int, int, int | None] | None:
        if self.api is not None:
            status, data = self.api.call("GET", f"/hubs/{HUB_ID}/parser")
            if status != 200 or not isinstance(data, dict):
                self.error = f"GET /hubs/{HUB_ID}/parser: HTTP {status}: {data}"
                return None
            return (now_us(), int(data.get("rows_written", 0)), None)
        if isinstance(self.server, PythonPipeline) and self.server.progress:
            t_us, messages, rows = self.server.progress[-1]
            return (t_us, rows, messages)
        return None

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                sample = self.sample()
            except BenchError as error:
                self.error = str(error)
                sample = None
            if sample is not None:
                self.samples.append(sample)
            self.stop_event.wait(self.every_s)

    def latest_rows(self) -> int:
        sample = self.sample() if self.api is not None or isinstance(self.server, PythonPipeline) else None
        if sample is not None:
            self.samples.append(sample)
        return self.samples[-1][1] if self.samples else 0

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)
        if self.api is not None:
            self.api.close()

    def rows_at(self, t_us: int) -> float | None:
        """Committed rows at `t_us`, interpolated between the samples around it."""
        before = [s for s in self.samples if s[0] <= t_us]
        after = [s for s in self.samples if s[0] >= t_us]
        if not before or not after:
            return None
        (t0, r0, _), (t1, r1, _) = before[-1], after[0]
        if t1 == t0:
            return float(r0)
        return r0 + (r1 - r0) * (t_us - t0) / (t1 - t0)


class ProbePoller(threading.Thread):
    """Polls the newest committed seq of each probe device, recording (t_us, seq) observations."""

    def __init__(self, server: Broker, probes: list[str], poll_ms: float) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.probes = probes
        self.poll_s = poll_ms / 1000
        self.observations: dict[str, list[tuple[int, int]]] = {p: [] for p in probes}
        self.polls = 0
        self.errors = 0
        self.last_error: str | None = None
        self.stop_event = threading.Event()
        self.end_us = 0

    def run(self) -> None:
        api: Api | None = None
        db: sqlite3.Connection | None = None
        if isinstance(self.server, PolyhubHub):
            api = Api(self.server.http_port, timeout=5)
        next_cycle = time.monotonic()
        while not self.stop_event.is_set():
            for probe in self.probes:
                try:
                    if api is not None:
                        seq = self.poll_api(api, probe)
                    else:
                        if db is None:
                            db = self.open_db()
                        seq = self.poll_db(db, probe) if db is not None else None
                except (BenchError, sqlite3.Error) as error:
                    self.errors += 1
                    self.last_error = str(error)
                    seq = None
                self.polls += 1
                if seq is not None:
                    self.observations[probe].append((now_us(), seq))
            next_cycle += self.poll_s
            delay = next_cycle - time.monotonic()
            if delay > 0:
                self.stop_event.wait(delay)
            else:
                next_cycle = time.monotonic()  # fell behind: poll on, without catching up in a burst
        self.end_us = now_us()
        if api is not None:
            api.close()
        if db is not None:
            db.close()

    @staticmethod
    def poll_api(api: Api, probe: str) -> int | None:
        status, data = api.call("GET", f"/devices/{probe}/telemetry/latest")
        if status != 200 or not isinstance(data, dict):
            raise BenchError(f"latest of {probe}: HTTP {status}")
        for row in data.get("items", []):
            if row.get("signal") == "seq" and isinstance(row.get("value"), (int, float)):
                return int(row["value"])
        return None

    def open_db(self) -> sqlite3.Connection | None:
        assert isinstance(self.server, PythonPipeline) and self.server.db_path is not None
        if not self.server.db_path.exists():
            return None
        return sqlite3.connect(f"file:{self.server.db_path}?mode=ro", uri=True, timeout=1.0)

    @staticmethod
    def poll_db(db: sqlite3.Connection, probe: str) -> int | None:
        row = db.execute(
            "SELECT value FROM telemetry WHERE device = ? AND signal = 'seq' ORDER BY ts DESC, id DESC LIMIT 1",
            (probe,),
        ).fetchone()
        return int(row[0]) if row else None

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)


def queryable_latencies(
    sends: dict[str, list[list[int]]], observations: dict[str, list[tuple[int, int]]], window: tuple[int, int], end_us: int
) -> tuple[list[float], int]:
    """Latency (ms) of each probe message sent within `window`: first poll that sees its seq or a
    later one, minus its send time. Messages never seen count with `end_us` (a lower bound)."""
    latencies: list[float] = []
    unseen = 0
    for probe, probe_sends in sends.items():
        seen = observations.get(probe, [])
        best = -1
        running: list[tuple[int, int]] = []
        for t_us, seq in seen:
            best = max(best, seq)
            running.append((t_us, best))
        index = 0
        for seq, sent_us in probe_sends:
            if not window[0] <= sent_us <= window[1]:
                continue
            while index < len(running) and running[index][1] < seq:
                index += 1
            if index < len(running):
                latencies.append(max(0.0, (running[index][0] - sent_us) / 1000))
            else:
                unseen += 1
                latencies.append(max(0.0, (end_us - sent_us) / 1000))
    return latencies, unseen


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = math.ceil(fraction * len(ordered))  # nearest rank, as run.py's histograms
    return ordered[min(len(ordered) - 1, max(0, rank - 1))]


# --------------------------------------------------------------------------------------------
# One measured run


@dataclass
class Settings:
    devices: int
    window: int
    probes: int
    poll_ms: float
    warmup_s: float
    seconds: float
    drain_s: float
    protocol_version: int
    contenders: list[str] = field(default_factory=list)


def run_contender(server: Broker, contender: str, settings: Settings, run_id: str) -> dict:
    events: queue.Queue = queue.Queue()
    generator: Generator | None = None
    sampler: CommitSampler | None = None
    poller: ProbePoller | None = None
    setup_s = 0.0
    cpu = GENERATOR_CPU if server.cpu is not None else None
    probe_indices = [round(i * settings.devices / settings.probes) for i in range(settings.probes)]
    probes = [device_id(i) for i in probe_indices]
    try:
        if isinstance(server, PolyhubHub):
            api = Api(server.http_port)
            try:
                setup_s = create_hub(api, settings.devices)
            finally:
                api.close()
        if isinstance(server, PythonPipeline):
            server.start_subscriber()
        hard_timeout = int(settings.warmup_s + settings.seconds + settings.drain_s * 2 + 120)
        config = dict(
            role="ingest",
            url=f"mqtt://127.0.0.1:{server.port}",
            protocol_version=settings.protocol_version,
            keepalive=60,
            hard_timeout_s=hard_timeout,
            drain_ms=int(settings.drain_s * 1000),
            warmup_s=settings.warmup_s,
            duration_s=settings.seconds,
            window=settings.window,
            devices=[
                {"client_id": device_id(i), "topic": f"/{HUB_ID}/{device_id(i)}/data"} for i in range(settings.devices)
            ],
            probes=probe_indices if contender != "raw" else [],
            subscriber={"client_id": f"{run_id}-sub", "filter": DATA_FILTER} if contender == "raw" else None,
        )
        generator = Generator(f"{run_id}-gen", config, events, cpu)
        names = {generator.name}
        wait_events(events, names, "ready", 120, server)
        if contender != "raw":
            sampler = CommitSampler(server)
            sampler.start()
            poller = ProbePoller(server, probes, settings.poll_ms)
            poller.start()
        generator.send("go")
        measuring = wait_events(events, names, "measuring", settings.warmup_s + 30, server)[generator.name]
        pids = server_pids(server)
        cpu_before = sum(proc_cpu_seconds(pid) for pid in pids)
        cpus_before = [cpu_busy_seconds(GENERATOR_CPU), cpu_busy_seconds(BROKER_CPU)]
        driver_before = sum(os.times()[:2])
        wall_before = time.monotonic()
        published = wait_events(events, names, "published", settings.seconds + settings.drain_s + 30, server)
        cpu_after = sum(proc_cpu_seconds(pid) for pid in pids)
        cpus_after = [cpu_busy_seconds(GENERATOR_CPU), cpu_busy_seconds(BROKER_CPU)]
        driver_cpu = sum(os.times()[:2]) - driver_before
        wall = time.monotonic() - wall_before
        generator.send("drain")
        result = wait_events(events, names, "result", settings.drain_s + 30, server)[generator.name]
        rss_kb = sum(proc_status_kb(pid, "VmHWM") for pid in pids)
        # Wait (bounded) until every acknowledged message is committed: the durability check.
        expected_rows = None
        final_rows = None
        drained_s = None
        if sampler is not None:
            probe_messages = sum(len(s) for s in result["probes"].values())
            expected_rows = 2 * result["acked_total"] + probe_messages
            drain_started = time.monotonic()
            while True:
                final_rows = sampler.latest_rows()
                if final_rows >= expected_rows:
                    drained_s = time.monotonic() - drain_started
                    break
                if time.monotonic() - drain_started > settings.drain_s:
                    break
                time.sleep(0.05)
            # Let the poller see the last probe messages that the drain made visible.
            time.sleep(max(0.05, 3 * settings.poll_ms / 1000))
    finally:
        if poller is not None:
            poller.stop()
        if sampler is not None:
            sampler.stop()
        if generator is not None:
            generator.stop()

    window = (measuring["t_us"], published[generator.name]["t_us"])
    window_s = result["window_s"]
    record: dict = {
        "contender": contender,
        "server": server.label,
        "devices": result["devices"],
        "setup_s": setup_s,
        "window_s": window_s,
        "acked_total": result["acked_total"],
        "unacked": result["unacked"],
        "published_per_s": result["acked_in_window"] / window_s,
        "generator_cpu_pct": 100.0 * result["cpu_s"] / window_s,
        "server_cpu_s": cpu_after - cpu_before,
        "server_cpu_pct": 100.0 * (cpu_after - cpu_before) / wall,
        "server_peak_rss_kb": rss_kb,
        "other_load_cpu0_pct": max(
            0.0, 100.0 * ((cpus_after[0] - cpus_before[0]) - result["cpu_s"] - driver_cpu) / wall
        ),
        "other_load_cpu1_pct": max(0.0, 100.0 * ((cpus_after[1] - cpus_before[1]) - (cpu_after - cpu_before)) / wall),
        "driver_cpu_pct": 100.0 * driver_cpu / wall,
    }
    if contender == "raw":
        delivered = result["delivered_in_window"]
        record["msgs_per_s"] = delivered / window_s
        record["delivered_total"] = result["delivered_total"]
        record["lost"] = max(0, result["acked_total"] - result["delivered_total"])
        record["all_delivered"] = record["lost"] == 0
    else:
        assert sampler is not None and poller is not None
        rows_start = sampler.rows_at(window[0])
        rows_end = sampler.rows_at(window[1])
        rows_per_message = expected_rows / max(1, result["acked_total"])
        if rows_start is not None and rows_end is not None:
            record["rows_per_s"] = (rows_end - rows_start) / window_s
            record["msgs_per_s"] = record["rows_per_s"] / rows_per_message
        else:
            record["rows_per_s"] = None
            record["msgs_per_s"] = None
        record["rows_per_message"] = rows_per_message
        record["expected_rows"] = expected_rows
        record["final_rows"] = final_rows
        record["all_committed"] = final_rows == expected_rows
        record["backlog_rows_at_stop"] = (
            max(0, round(expected_rows - rows_end)) if rows_end is not None and expected_rows else None
        )
        record["drain_s"] = drained_s
        latencies, unseen = queryable_latencies(result["probes"], poller.observations, window, poller.end_us)
        record["probe_messages"] = len(latencies)
        record["probe_unseen"] = unseen
        record["p50_ms"] = percentile(latencies, 0.50)
        record["p99_ms"] = percentile(latencies, 0.99)
        record["max_ms"] = max(latencies) if latencies else None
        record["polls"] = poller.polls
        record["poll_errors"] = poller.errors
        if poller.last_error:
            record["poll_last_error"] = poller.last_error
        if sampler.error:
            record["sampler_error"] = sampler.error
        if record["server_cpu_s"] > 0 and record["msgs_per_s"] is not None:
            record["msgs_per_server_cpu_s"] = record["msgs_per_s"] * window_s / record["server_cpu_s"]
    if contender == "raw" and record["server_cpu_s"] > 0:
        record["msgs_per_server_cpu_s"] = record["msgs_per_s"] * window_s / record["server_cpu_s"]
    return record


# --------------------------------------------------------------------------------------------
# Summary and report

SUMMARY_KEYS = [
    "msgs_per_s",
    "rows_per_s",
    "published_per_s",
    "p50_ms",
    "p99_ms",
    "max_ms",
    "msgs_per_server_cpu_s",
    "server_cpu_pct",
    "generator_cpu_pct",
    "other_load_cpu0_pct",
    "other_load_cpu1_pct",
    "server_peak_rss_kb",
    "backlog_rows_at_stop",
]


def median(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(runs: list[dict]) -> dict:
    summary = {key: median([r.get(key) for r in runs]) for key in SUMMARY_KEYS}
    summary["repetitions"] = len(runs)
    summary["all_committed"] = all(r.get("all_committed", r.get("all_delivered", False)) for r in runs)
    summary["probe_unseen_total"] = sum(r.get("probe_unseen", 0) for r in runs)
    return summary


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ms(value: float | None, lower_bound: bool = False) -> str:
    if value is None:
        return "–"
    prefix = "≥ " if lower_bound else ""
    if value >= 10_000:
        return f"{prefix}{value / 1000:,.1f} s"
    if value >= 100:
        return f"{prefix}{value:,.0f} ms"
    return f"{prefix}{value:,.1f} ms"


def evaluate_targets(summary: dict) -> list[dict]:
    targets = []
    raw, hub = summary.get("raw"), summary.get("polyhub")
    if hub:
        committed = hub["all_committed"]
        r = ratio(hub["msgs_per_s"], raw["msgs_per_s"]) if raw else None
        targets.append(
            {
                "target": f"polyhub ingest ≥ {TARGET_RAW_RATIO:.0%} of the raw broker's throughput, every row committed",
                "result": (f"{r:.2f}× ({fmt(hub['msgs_per_s'])} vs {fmt(raw['msgs_per_s'])} msgs/s)" if r else "–")
                + ("; every row committed" if committed else "; **rows missing after the drain**"),
                "met": (r >= TARGET_RAW_RATIO and committed) if r is not None else None,
                "ratio": r,
            }
        )
        for baseline in ("python", "python-batched"):
            base = summary.get(baseline)
            if not base:
                continue
            r = ratio(hub["rows_per_s"], base["rows_per_s"])
            targets.append(
                {
                    "target": f"polyhub ≥ {TARGET_PYTHON_RATIO:.0f}× the rows/s of `{baseline}`"
                    + ("" if baseline == "python" else " (extra: batched commits, not the issue's baseline)"),
                    "result": f"{r:.1f}× ({fmt(hub['rows_per_s'])} vs {fmt(base['rows_per_s'])} rows/s)" if r else "–",
                    "met": r >= TARGET_PYTHON_RATIO if r is not None else None,
                    "ratio": r,
                }
            )
    return targets


def render_markdown(report: dict) -> str:
    s = report["settings"]
    summary = report["summary"]
    lines = [f"# Durable ingest benchmark, {report['date']}", ""]
    if report["quick"]:
        lines += ["> **Quick run** (`--quick`): one repetition of short runs, for checking the harness only.", ""]
    m = report["machine"]
    lines += ["## Machine and versions", ""]
    lines.append(f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, {m['memory_gib']} GiB RAM")
    for label, version in report["versions"].items():
        lines.append(f"- {label}: {version}")
    lines.append(f"- Command: `{report['command']}`; total time {report['elapsed_s'] / 60:.1f} min")
    lines.append("")
    lines += ["## Targets", "", "| Target | Result | Verdict |", "|---|---|---|"]
    for row in report["targets"]:
        lines.append(f"| {row['target']} | {row['result']} | {verdict(row['met'])} |")
    if not report["targets"]:
        lines.append("| (no polyhub ingest run succeeded) | – | not measured |")
    lines.append("")

    lines += ["## Results", ""]
    lines.append(
        f"{s['devices']:,} devices, QoS 1, JSON `{{\"temp\": n, \"seq\": k}}` (2 rows per message; probe devices "
        f"add `t`, 3 rows), closed loop with {s['window']} unacknowledged message(s) per device, "
        f"{s['warmup_s']} s warm-up then {s['seconds']} s measured; medians of {s['repetitions']} repetition(s)."
    )
    lines.append("")
    present = [c for c in CONTENDERS if summary.get(c)]
    lines.append("| Metric | " + " | ".join(present) + " |")
    lines.append("|---|" + "---:|" * len(present))

    def row(label: str, key: str, formatter) -> None:
        cells = []
        for c in present:
            value = summary[c].get(key)
            cells.append(formatter(value, c))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("**messages/s (raw: delivered; others: committed)**", "msgs_per_s", lambda v, c: fmt(v))
    row("**rows committed/s**", "rows_per_s", lambda v, c: fmt(v) if c != "raw" else "–")
    row("publishes acknowledged/s", "published_per_s", lambda v, c: fmt(v))
    row(
        "publish → queryable p50",
        "p50_ms",
        lambda v, c: "–" if c == "raw" else fmt_ms(v),
    )
    row(
        "**publish → queryable p99**",
        "p99_ms",
        lambda v, c: "–" if c == "raw" else fmt_ms(v, lower_bound=summary[c]["probe_unseen_total"] > 0),
    )
    row("rows not committed when the load stopped", "backlog_rows_at_stop", lambda v, c: "–" if c == "raw" else fmt(v))
    row(
        "every acknowledged message stored (after drain)",
        "all_committed",
        lambda v, c: "yes" if summary[c]["all_committed"] else "**no**",
    )
    row("messages per server CPU-second", "msgs_per_server_cpu_s", lambda v, c: fmt(v))
    row("server CPU (of CPU 1)", "server_cpu_pct", lambda v, c: fmt(v, 1, "%"))
    row("generator CPU (of CPU 0)", "generator_cpu_pct", lambda v, c: fmt(v, 1, "%"))
    row("other load CPU 0 / CPU 1", "other_load_cpu0_pct", lambda v, c: (
        f"{fmt(v, 0, '%')} / {fmt(summary[c]['other_load_cpu1_pct'], 0, '%')}"
    ))
    row("server peak RSS", "server_peak_rss_kb", lambda v, c: fmt(v / 1024 if v else None, 1, " MiB"))
    lines.append("")

    lines += ["## Method", ""]
    lines.append(
        "- **raw**: `polyhub run` (no hub) on CPU 1; the generator (CPU 0) also runs one QoS 1 subscriber of "
        f"`{DATA_FILTER}`; messages/s = deliveries during the measured window ÷ its length."
    )
    lines.append(
        "- **polyhub**: `polyhub run --http-listen 127.0.0.1:0` on CPU 1; group, hub (decoder `json`) and "
        f"{s['devices']:,} devices created with `POST /groups`, `/hubs`, `/devices` before the load. Rows/s = "
        f"`rows_written` of `GET /hubs/{HUB_ID}/parser`, sampled every 100 ms and interpolated at the window's "
        "ends; messages/s = rows/s ÷ rows per message."
    )
    lines.append(
        "- **python**: Mosquitto (`max_queued_messages 0`, `max_inflight_messages 0`, `persistence false`) and "
        "bench/ingest_subscriber.py (paho-mqtt, subscribes `/+/+/data` at QoS 1, one `sqlite3` commit per "
        "message at SQLite's defaults; paho sends the PUBACK after the commit), both on CPU 1. "
        "**python-batched**: the same, committing every 100 messages or 50 ms in WAL mode, synchronous=NORMAL "
        "(acknowledges before committing: weaker than polyhub's guarantee). Rows/s from the subscriber's "
        "committed counter, reported every 100 ms."
    )
    lines.append(
        f"- Load: MQTT.js (bench/loadgen.mjs, role `ingest`), one client per device (client id = device id), "
        f"closed loop: each device publishes its next message as soon as the broker acknowledges the previous "
        f"(window {s['window']}), so the offered rate is what the broker sustains; all contenders get the same load."
    )
    lines.append(
        f"- Latency: {s['probes']} probe devices record the CLOCK_MONOTONIC send time of each message (and put it in "
        f"the payload as `t`). A poller in the driver reads each probe device's newest committed `seq` every "
        f"{s['poll_ms']:g} ms (polyhub: `GET /devices/{{id}}/telemetry/latest`; Python: the SQLite file, read-only). "
        "A message is queryable at the first poll that sees its seq or a later one (devices publish in order). "
        f"The figure is an upper bound, late by at most one poll interval ({s['poll_ms']:g} ms per device). "
        "Messages still invisible when polling stopped count with the time they had waited (p99 marked ≥)."
    )
    lines.append(
        "- After the load, the driver waits (at most "
        f"{s['drain_s']:g} s) until every acknowledged message's rows are committed; *every acknowledged message "
        "stored* compares the final row count with 2 × acknowledged messages + probe messages."
    )
    lines.append(
        f"- Pinning and sampling as in bench/run.py: server CPU {BROKER_CPU}, generator and driver CPU "
        f"{GENERATOR_CPU}, nice {broker_bench.BENCH_NICENESS}; server CPU is utime+stime of its processes from "
        "/proc/PID/stat over the measured window (polyhub: one process, parsers in-process). A run during which "
        f"other processes kept CPU 0 or 1 busier than {s['max_other_load']:g}% was run again (at most "
        f"{MAX_RETRIES_PER_RUN} times; {report.get('retries', 0)} reruns in all), the least disturbed attempt kept."
    )
    lines.append("")
    lines += ["## Caveats", ""]
    lines.append(
        "- Two shared cores: the generator on CPU 0 sets the ceiling of every contender. A generator near 100% "
        "means the raw and polyhub figures are generator-bound; *messages per server CPU-second* compares the "
        "servers independently of that. In `raw` the counting subscriber also runs on CPU 0."
    )
    lines.append(
        "- The Python baselines fall behind the offered load: their backlog waits in Mosquitto, so their "
        "latency grows for as long as the run lasts; their p99 is a property of the run length, their rows/s is not."
    )
    lines.append("")
    if report["errors"]:
        lines += ["## Errors", ""]
        lines += [f"- {e}" for e in report["errors"]]
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 repetition of short runs (harness check)")
    parser.add_argument("--polyhub-bin", help="polyhub binary (default: cargo build --release -p polyhub)")
    parser.add_argument("--mosquitto-bin", default=broker_bench.shutil.which("mosquitto") or "/usr/sbin/mosquitto")
    parser.add_argument(
        "--contenders", default=",".join(CONTENDERS), help=f"comma-separated subset of {','.join(CONTENDERS)}"
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--window", type=int, default=1, help="unacknowledged messages per device (default 1)")
    parser.add_argument("--probes", type=int, default=5, help="probe devices timed for latency (default 5)")
    parser.add_argument("--poll-ms", type=float, default=10.0, help="poll interval per probe device (default 10)")
    parser.add_argument("--reps", type=int, help="repetitions (default 3, quick 1)")
    parser.add_argument("--seconds", type=float, help="measured seconds (default 10, quick 3)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds (default 2, quick 1)")
    parser.add_argument("--drain", type=float, help="max seconds to wait for the backlog (default 10, quick 5)")
    parser.add_argument("--protocol", type=int, choices=(3, 4, 5), default=4)
    parser.add_argument(
        "--max-other-load",
        type=float,
        default=25.0,
        help="rerun a run when other processes used more than this %% of CPU 0 or 1 (default 25)",
    )
    parser.add_argument("--out", help="results directory (default bench/results; quick: bench/work/results)")
    return parser.parse_args(argv)


def make_server(contender: str, args: argparse.Namespace, polyhub_bin: str | None, cpu: int | None) -> Broker:
    if contender == "raw":
        return PolyhubRaw("polyhub-raw", cpu, polyhub_bin)
    if contender == "polyhub":
        return PolyhubHub("polyhub-ingest", cpu, polyhub_bin)
    if contender == "python":
        return PythonPipeline("mosquitto-python", cpu, args.mosquitto_bin, "each")
    if contender == "python-batched":
        return PythonPipeline("mosquitto-python-batched", cpu, args.mosquitto_bin, "batch")
    raise SystemExit(f"unknown contender {contender!r} ({', '.join(CONTENDERS)})")


def print_run(label: str, record: dict) -> None:
    parts = [f"{label:<34}", f"{fmt(record.get('msgs_per_s')):>8} msg/s"]
    if record.get("rows_per_s") is not None:
        parts.append(f"{fmt(record['rows_per_s']):>8} rows/s")
    if record.get("p99_ms") is not None:
        parts.append(f"p50 {fmt_ms(record['p50_ms'])} p99 {fmt_ms(record['p99_ms'])}")
    parts.append(f"server {record['server_cpu_pct']:.0f}% gen {record['generator_cpu_pct']:.0f}%")
    if "all_committed" in record:
        parts.append("all committed" if record["all_committed"] else f"MISSING rows ({record['final_rows']}/{record['expected_rows']})")
    if "all_delivered" in record:
        parts.append("all delivered" if record["all_delivered"] else f"lost {record['lost']}")
    print("  ".join(parts), flush=True)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    WORK_DIR.mkdir(exist_ok=True)
    contenders = [c for c in args.contenders.split(",") if c]
    settings = Settings(
        devices=args.devices,
        window=args.window,
        probes=max(1, min(args.probes, args.devices)),
        poll_ms=args.poll_ms,
        warmup_s=args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0),
        seconds=args.seconds or (3.0 if args.quick else 10.0),
        drain_s=args.drain if args.drain is not None else (5.0 if args.quick else 10.0),
        protocol_version=args.protocol,
        contenders=contenders,
    )
    reps = args.reps or (1 if args.quick else 3)

    mqtt_version = ensure_node_modules()
    polyhub_bin = None
    if {"raw", "polyhub"} & set(contenders):
        polyhub_bin = args.polyhub_bin or broker_bench.build_polyhub()
        if not os.access(polyhub_bin, os.X_OK):
            raise SystemExit(f"polyhub binary not found: {polyhub_bin}")

    cpu_count = len(os.sched_getaffinity(0))
    server_cpu = BROKER_CPU if cpu_count >= 2 else None
    if server_cpu is not None:
        os.sched_setaffinity(0, {GENERATOR_CPU})
    raise_priority()

    servers = {c: make_server(c, args, polyhub_bin, server_cpu) for c in contenders}
    versions: dict[str, str] = {}
    if polyhub_bin:
        versions["polyhub"] = Polyhub("v", None, polyhub_bin).version()
    if {"python", "python-batched"} & set(contenders):
        versions["mosquitto"] = Mosquitto("v", None, args.mosquitto_bin).version()
        import paho.mqtt

        versions["python"] = sys.version.split()[0]
        versions["paho-mqtt"] = paho.mqtt.__version__
        versions["sqlite"] = sqlite3.sqlite_version
    versions["node"] = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    versions["mqtt (MQTT.js)"] = mqtt_version

    report: dict = {
        "date": dt.date.today().isoformat(),
        "quick": args.quick,
        "command": "python3 bench/ingest.py " + " ".join(argv),
        "machine": machine_info(),
        "versions": versions,
        "settings": {**settings.__dict__, "repetitions": reps, "max_other_load": args.max_other_load},
        "runs": {c: [] for c in contenders},
        "errors": [],
    }
    total = reps * len(contenders)
    retries_left = int(total * RETRY_BUDGET)
    report["retries"] = 0
    done = 0
    for rep in range(reps):
        for contender in contenders:
            done += 1
            server = servers[contender]
            run_id = f"ingest-{contender}-{rep}"
            best: dict | None = None
            for attempt in range(1 + MAX_RETRIES_PER_RUN):
                try:
                    server.start()
                    record = run_contender(server, contender, settings, f"{run_id}-{attempt}")
                    record["repetition"] = rep + 1
                    record["attempt"] = attempt + 1
                    print_run(f"[{done}/{total}] {contender}", record)
                    if best is None or interference(record) < interference(best):
                        best = record
                except BenchError as error:
                    message = f"{contender} (repetition {rep + 1}): {error}"
                    print(f"[{done}/{total}] ERROR {message}", flush=True)
                    report["errors"].append(message.splitlines()[0])
                    break
                finally:
                    server.stop()
                    server.cleanup()
                # Other work on the machine disturbed this run: try again while the budget lasts.
                if interference(best) <= args.max_other_load or retries_left <= 0:
                    break
                retries_left -= 1
                report["retries"] += 1
                print(f"    other load {interference(record):.0f}% > {args.max_other_load:.0f}%: run again", flush=True)
            if best is not None:
                report["runs"][contender].append(best)

    report["summary"] = {c: summarize(runs) if runs else None for c, runs in report["runs"].items()}
    report["targets"] = evaluate_targets(report["summary"])
    report["elapsed_s"] = time.monotonic() - started
    out_dir = Path(args.out) if args.out else (WORK_DIR / "results" if args.quick else BENCH_DIR / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"ingest-{report['date']}" + ("-quick" if args.quick else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(render_markdown(report))
    print(f"bench: wrote {out_dir / stem}.md and .json ({report['elapsed_s'] / 60:.1f} min)", flush=True)
    for target in report["targets"]:
        print(f"  {target['target']}: {target['result']} -> {verdict(target['met']).strip('*')}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
