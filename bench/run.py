#!/usr/bin/env python3
"""Race polyhub's MQTT broker against Mosquitto on this machine, side by side in one run.

    python3 bench/run.py            # full run: ~14 minutes, results in bench/results/
    python3 bench/run.py --quick    # 1 repetition, short runs: checks the harness in ~2 minutes

For each scenario the driver starts a fresh broker, pins it to CPU 1 and the MQTT.js load
generators (bench/loadgen.mjs) to CPU 0, offers the same paced load to each broker in turn
(A/B/C/D/A/B...), and reads the broker's CPU time and memory from /proc. Both brokers run in
both socket modes (Nagle's algorithm on and off), so each is also compared like for like. Then
it connects 10,000 idle clients to each broker and measures resident memory per connection.
See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import fnmatch
import json
import math
import os
import platform
import queue
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WORK_DIR = BENCH_DIR / "work"
LOADGEN = BENCH_DIR / "loadgen.mjs"

BROKER_CPU = 1
GENERATOR_CPU = 0

# Targets from issue 2, item 5.
TARGET_EFFICIENCY_RATIO = 1.25
TARGET_P99_RATIO = 1.0
TARGET_IDLE_BYTES = 2048


class BenchError(Exception):
    """A failure that makes a run's figures meaningless (broker did not start, generator died)."""


# --------------------------------------------------------------------------------------------
# Scenarios


@dataclass(frozen=True)
class Scenario:
    """One load shape at one QoS and payload size.

    `rate` is messages/s offered by each publisher; the run lasts `count / rate` seconds.
    Publishers and subscribers are spread over `procs` generator processes.
    """

    shape: str
    qos: int
    payload: int
    publishers: int
    subscribers: int
    rate: int
    procs: int

    @property
    def name(self) -> str:
        return f"{self.shape}-qos{self.qos}-{self.payload}b"

    def topic(self, publisher: int) -> str:
        if self.shape == "fanout":
            return "bench/fanout"
        return f"bench/{self.shape}/{publisher}"

    def filter(self, subscriber: int) -> str:
        if self.shape == "fanin":
            return "bench/fanin/+"
        if self.shape == "fanout":
            return "bench/fanout"
        return f"bench/p2p/{subscriber}"

    def deliveries_per_message(self) -> int:
        return self.subscribers if self.shape == "fanout" else 1

    def expected_per_subscriber(self, count: int) -> int:
        if self.shape == "fanin":
            return count * self.publishers
        return count


# Offered rates are chosen so that the MQTT.js generators, all sharing CPU 0, keep up with them
# (generator CPU is reported so the reader can check); the brokers run far below saturation.
# Total deliveries/s: fan-in 20 x 1,000 = 20k, fan-out 1 x 1,000 x 20 = 20k, p2p 20 x 1,000 = 20k.
# One generator process per run: it stays below about 70% of CPU 0 at these rates, and several
# processes sharing CPU 0 would add scheduling delays of milliseconds to every latency.
SHAPES = {
    "fanin": dict(publishers=20, subscribers=1, rate=1_000, procs=1),
    "fanout": dict(publishers=1, subscribers=20, rate=1_000, procs=1),
    "p2p": dict(publishers=20, subscribers=20, rate=1_000, procs=1),
}


def all_scenarios() -> list[Scenario]:
    scenarios = []
    for shape, sizes in SHAPES.items():
        for qos in (0, 1):
            for payload in (16, 256):
                scenarios.append(Scenario(shape=shape, qos=qos, payload=payload, **sizes))
    return scenarios


# --------------------------------------------------------------------------------------------
# Brokers

NAGLE_ON = "Nagle on"
NAGLE_OFF = "Nagle off"

# Every kind of broker --brokers accepts: its role (a reference, or polyhub under test) and the
# socket mode of the connections it accepts. Default Mosquitto leaves Nagle's algorithm on,
# polyhub turns it off; the two other kinds flip that, so that every comparison can also be
# made between brokers in the same socket mode.
BROKER_KINDS = {
    "mosquitto": ("reference", NAGLE_ON),
    "polyhub": ("tested", NAGLE_OFF),
    "mosquitto-nodelay": ("reference", NAGLE_OFF),
    "polyhub-nagle": ("tested", NAGLE_ON),
    # Another polyhub build (`--before-bin`) as the reference: an A/B of two builds in one run.
    "polyhub-before": ("reference", NAGLE_OFF),
}
DEFAULT_BROKERS = "mosquitto,polyhub,mosquitto-nodelay,polyhub-nagle"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Both brokers and all generators run at this niceness, so that builds and tests elsewhere on a
# shared machine disturb the measurement less (the same for both brokers).
BENCH_NICENESS = -20

# A run during which other processes kept either CPU busier than --max-other-load percent is run
# again (at most MAX_RETRIES_PER_RUN times, and at most RETRY_BUDGET x the planned runs in all);
# the least disturbed attempt counts.
MAX_RETRIES_PER_RUN = 2
RETRY_BUDGET = 0.3


def interference(run: dict) -> float:
    return max(run["other_load_cpu0_pct"], run["other_load_cpu1_pct"])


def raise_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, 0, BENCH_NICENESS)
    except OSError:
        pass  # not root: run at normal priority


def pinned(cpu: int | None):
    """A preexec_fn that pins the child to one CPU (what `taskset -c CPU` does), raises its
    priority and lifts its open-file limit to the hard limit (10,000 idle clients need as many
    descriptors)."""

    def setup() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        raise_priority()
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    return setup


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        text = stat.read()
    # The command name may contain spaces; the fields we need follow its closing parenthesis.
    fields = text[text.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def proc_status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise BenchError(f"{key} missing from /proc/{pid}/status")


def cpu_busy_seconds(cpu: int) -> float:
    """Busy time of one CPU (everything but idle and iowait), from /proc/stat."""
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith(f"cpu{cpu} "):
                ticks = [int(v) for v in line.split()[1:]]
                busy = sum(ticks) - ticks[3] - ticks[4]
                return busy / os.sysconf("SC_CLK_TCK")
    return 0.0


def meminfo_kb(key: str) -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class Broker:
    """A broker under test: started fresh for each measurement, stopped afterwards."""

    kind = "broker"

    def __init__(self, label: str, cpu: int | None) -> None:
        self.label = label
        self.cpu = cpu
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_path: Path | None = None
        self.scratch: Path | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready_line(self) -> str | None:
        """A line the broker prints on stderr once it accepts connections (None: probe the port)."""
        return None

    def start(self) -> None:
        self.port = free_port()
        self.scratch = Path(tempfile.mkdtemp(prefix=f"{self.label}-", dir=WORK_DIR))
        self.log_path = self.scratch / "broker.log"
        cmd = self.command()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=pinned(self.cpu),
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.label} exited with {self.proc.returncode} at start:\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.05)
        self.stop()
        raise BenchError(f"{self.label} did not become ready within 15 s:\n{self.log_tail()}")

    def is_ready(self) -> bool:
        line = self.ready_line()
        if line is not None:
            return line in self.log_path.read_text(errors="replace")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log_lines_matching(self, *words: str, limit: int = 5) -> list[str]:
        if not self.log_path or not self.log_path.exists():
            return []
        hits = [
            line
            for line in self.log_path.read_text(errors="replace").splitlines()
            if any(word in line.lower() for word in words)
        ]
        return hits[:limit]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


class Mosquitto(Broker):
    kind = "mosquitto"

    def __init__(self, label: str, cpu: int | None, binary: str, nodelay: bool = False) -> None:
        super().__init__(label, cpu)
        self.binary = binary
        self.nodelay = nodelay

    def command(self) -> list[str]:
        conf = self.scratch / "mosquitto.conf"
        # Unlimited queues and in-flight windows: with the defaults (1000 / 20) Mosquitto drops
        # QoS 1 messages under a burst, which would measure its limits rather than its speed.
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "max_queued_messages 0\n"
            "max_inflight_messages 0\n" + ("set_tcp_nodelay true\n" if self.nodelay else "")
        )
        return [self.binary, "-c", str(conf)]

    def version(self) -> str:
        out = subprocess.run([self.binary, "-h"], capture_output=True, text=True, check=False)
        return (out.stdout or out.stderr).splitlines()[0].strip()


class Polyhub(Broker):
    kind = "polyhub"

    def __init__(self, label: str, cpu: int | None, binary: str, nodelay: bool = True) -> None:
        super().__init__(label, cpu)
        self.binary = binary
        self.nodelay = nodelay

    def command(self) -> list[str]:
        conf = self.scratch / "polyhub.toml"
        # The same unlimited queues and in-flight windows as Mosquitto's (0 = no limit of ours).
        conf.write_text(
            ("" if self.nodelay else "[mqtt]\ntcp_nodelay = false\n")
            + "[mqtt.limits]\n"
            "max_queued_messages = 0\n"
            "max_inflight = 0\n"
            "max_connections = 1000000\n"
        )
        data_dir = self.scratch / "data"
        return [
            self.binary,
            "run",
            "--config",
            str(conf),
            "--mqtt-listen",
            f"127.0.0.1:{self.port}",
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
            str(data_dir),
        ]

    def ready_line(self) -> str:
        return "MQTT listening on"

    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True, check=False, timeout=10)
        first = (out.stdout or "").strip().splitlines()
        version = first[0] if out.returncode == 0 and first else "polyhub (no --version)"
        if self.label.startswith("polyhub-before"):
            return f"{version}, binary {self.binary}"
        commit = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_DIR), "status", "--porcelain", "--", "crates"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        return f"{version}, commit {commit}{' + uncommitted changes' if dirty else ''}"


# --------------------------------------------------------------------------------------------
# Generator processes


class JsonLinesProcess:
    """A child process that prints one JSON event per line (each put on `events` as
    `(name, event)`, then an `exit` event) and reads words on stdin."""

    def __init__(self, name: str, argv: list[str], events: queue.Queue, cpu: int | None) -> None:
        self.name = name
        self.stderr_path = WORK_DIR / f"{name}.stderr"
        self.stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            bufsize=1,
            preexec_fn=pinned(cpu),
        )
        self.reader = threading.Thread(target=self._read, args=(events,), daemon=True)
        self.reader.start()

    def _read(self, events: queue.Queue) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "error", "message": f"unparsable output: {line.strip()}"}
            events.put((self.name, event))
        events.put((self.name, {"event": "exit", "code": self.proc.wait()}))

    def stderr_tail(self) -> str:
        self.stderr.flush()
        return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-15:])

    def send(self, word: str) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(word + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


class Generator(JsonLinesProcess):
    """One loadgen.mjs process running `config`; its events go to a shared queue."""

    def __init__(self, name: str, config: dict, events: queue.Queue, cpu: int | None) -> None:
        path = WORK_DIR / f"{name}.json"
        path.write_text(json.dumps(config))
        super().__init__(name, ["node", str(LOADGEN), str(path)], events, cpu)


def wait_events(events: queue.Queue, names: set[str], kind: str, timeout: float, broker: Broker) -> dict[str, dict]:
    """Wait until every generator in `names` reported `kind`; any error or early exit aborts."""
    got: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while set(got) != names:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(names - set(got))
            raise BenchError(f"timed out after {timeout:.0f} s waiting for '{kind}' from {missing}")
        try:
            name, event = events.get(timeout=min(remaining, 0.5))
        except queue.Empty:
            if not broker.alive():
                raise BenchError(f"{broker.label} died:\n{broker.log_tail()}")
            continue
        if event.get("event") == kind and name in names:
            got[name] = event
        elif event.get("event") == "error":
            raise BenchError(f"generator {name}: {event.get('message')}")
        elif event.get("event") == "exit" and name in names and name not in got:
            raise BenchError(f"generator {name} exited with {event.get('code')} before '{kind}'")
    return got


def split(total: int, parts: int) -> list[tuple[int, int]]:
    """(first index, count) of each of `parts` near-equal slices of range(total)."""
    parts = max(1, min(parts, total))
    base, extra = divmod(total, parts)
    slices, first = [], 0
    for part in range(parts):
        size = base + (1 if part < extra else 0)
        slices.append((first, size))
        first += size
    return slices


# --------------------------------------------------------------------------------------------
# Latency histograms (same bucket layout as loadgen.mjs)

LINEAR_US = 100
LOG_STEP = 1.01


def bucket_value_us(bucket: int) -> float:
    if bucket < LINEAR_US:
        return bucket + 0.5
    return LINEAR_US * LOG_STEP ** (bucket - LINEAR_US + 0.5)


def percentile_us(histogram: dict[int, int], fraction: float) -> float | None:
    total = sum(histogram.values())
    if total == 0:
        return None
    rank = math.ceil(total * fraction)
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return bucket_value_us(bucket)
    return bucket_value_us(max(histogram))


# --------------------------------------------------------------------------------------------
# One measured run


@dataclass
class Settings:
    count: int  # measured messages per publisher
    warmup_s: float  # seconds of unmeasured load before them
    drain_ms: int
    protocol_version: int


def run_scenario(broker: Broker, scenario: Scenario, settings: Settings, run_id: str) -> dict:
    events: queue.Queue = queue.Queue()
    generators: list[Generator] = []
    url = f"mqtt://127.0.0.1:{broker.port}"
    count = settings.count
    hard_timeout = int(count / scenario.rate + settings.warmup_s + settings.drain_ms / 1000 * 2 + 60)
    common = dict(
        url=url,
        qos=scenario.qos,
        payload=scenario.payload,
        protocol_version=settings.protocol_version,
        keepalive=60,
        drain_ms=settings.drain_ms,
        hard_timeout_s=hard_timeout,
        count=count,
        warmup=int(scenario.rate * settings.warmup_s),
        publishers_total=scenario.publishers,
    )
    cpu = GENERATOR_CPU if broker.cpu is not None else None
    try:
        sub_slices = split(scenario.subscribers, scenario.procs)
        pub_slices = split(scenario.publishers, scenario.procs)
        publishing = set()
        for part in range(max(len(sub_slices), len(pub_slices))):
            config = dict(common, role="load", subscribers=None, publishers=None)
            if part < len(sub_slices):
                first, size = sub_slices[part]
                config["subscribers"] = dict(
                    first_index=first,
                    client_prefix=f"{run_id}-s",
                    filters=[scenario.filter(first + i) for i in range(size)],
                    expected_per_client=scenario.expected_per_subscriber(count),
                )
            if part < len(pub_slices):
                first, size = pub_slices[part]
                config["publishers"] = dict(
                    first_index=first,
                    client_prefix=f"{run_id}-p",
                    topics=[scenario.topic(first + i) for i in range(size)],
                    rate=scenario.rate,
                    burst_max=max(1, scenario.rate // 100),
                )
            name = f"{run_id}-gen{part}"
            generators.append(Generator(name, config, events, cpu))
            if config["publishers"]:
                publishing.add(name)
        everyone = {g.name for g in generators}
        wait_events(events, everyone, "ready", 60, broker)

        for generator in generators:
            generator.send("go")
        wait_events(events, publishing, "measuring", settings.warmup_s + 30, broker)
        cpu_before = proc_cpu_seconds(broker.pid)
        cpus_before = [cpu_busy_seconds(GENERATOR_CPU), cpu_busy_seconds(BROKER_CPU)]
        driver_before = sum(os.times()[:2])
        wall_before = time.monotonic()
        for generator in generators:
            generator.send("measure")
        wait_events(events, publishing, "published", hard_timeout, broker)
        for generator in generators:
            generator.send("drain")
        results = wait_events(events, everyone, "result", settings.drain_ms / 1000 + 30, broker)
        cpu_after = proc_cpu_seconds(broker.pid)
        cpus_after = [cpu_busy_seconds(GENERATOR_CPU), cpu_busy_seconds(BROKER_CPU)]
        driver_cpu = sum(os.times()[:2]) - driver_before
        wall = time.monotonic() - wall_before
        rss_kb = proc_status_kb(broker.pid, "VmRSS")
        hwm_kb = proc_status_kb(broker.pid, "VmHWM")
    finally:
        for generator in generators:
            generator.stop()

    sub_results = {name: r["sub"] for name, r in results.items() if r["sub"]}
    pub_results = {name: r["pub"] for name, r in results.items() if r["pub"]}
    histogram: dict[int, int] = {}
    for result in sub_results.values():
        for bucket, n in result["histogram"].items():
            histogram[int(bucket)] = histogram.get(int(bucket), 0) + n
    # Subscribers' 100 ms slots, merged (each subscriber's slot 0 starts at its first message).
    timeline: list[list[int]] = []
    for result in sub_results.values():
        for slot, (n, worst_us) in enumerate(result.get("timeline", [])):
            if slot >= len(timeline):
                timeline.append([0, 0])
            timeline[slot][0] += n
            timeline[slot][1] = max(timeline[slot][1], worst_us)
    sent = sum(r["sent"] for r in pub_results.values())
    acked = sum(r["acked"] for r in pub_results.values())
    expected = sum(r["expected"] for r in sub_results.values())
    unique = sum(r["unique"] for r in sub_results.values())
    start_ns = min(int(r["start_ns"]) for r in pub_results.values())
    receive_ends = [int(r["last_receive_ns"]) for r in sub_results.values() if int(r["last_receive_ns"])]
    last_ns = max(receive_ends) if receive_ends else start_ns
    window_s = max((last_ns - start_ns) / 1e9, 1e-9)
    send_s = max(r["send_seconds"] for r in pub_results.values())
    broker_cpu = cpu_after - cpu_before
    generator_cpu = sum(r["cpu_s"] for r in results.values())
    offered = scenario.rate * scenario.publishers
    return {
        "scenario": scenario.name,
        "broker": broker.label,
        "offered_publish_per_s": offered,
        "achieved_publish_per_s": sent / max(send_s, 1e-9),
        "sent": sent,
        "acked": acked if scenario.qos else None,
        "expected": expected,
        "delivered": unique,
        "received_total": sum(r["received"] for r in sub_results.values()),
        "duplicates": sum(r["duplicates"] for r in sub_results.values()),
        "reordered": sum(r["reordered"] for r in sub_results.values()),
        "malformed": sum(r["malformed"] for r in sub_results.values()),
        "lost": max(0, expected - unique),
        "loss_pct": 100.0 * max(0, expected - unique) / expected if expected else 0.0,
        "window_s": window_s,
        "delivered_per_s": unique / window_s,
        "p50_us": percentile_us(histogram, 0.50),
        "p99_us": percentile_us(histogram, 0.99),
        "p999_us": percentile_us(histogram, 0.999),
        "max_us": bucket_value_us(max(histogram)) if histogram else None,
        "broker_cpu_s": broker_cpu,
        "broker_cpu_pct": 100.0 * broker_cpu / wall,
        "generator_cpu_s": generator_cpu,
        "generator_cpu_pct": 100.0 * generator_cpu / wall,
        "wall_s": wall,
        # Whatever else ran on each CPU meanwhile (other work on the machine, the kernel's
        # softirq work on behalf of the sockets, the driver): high values make a run noisy.
        "other_load_cpu0_pct": max(
            0.0, 100.0 * ((cpus_after[0] - cpus_before[0]) - generator_cpu - driver_cpu) / wall
        ),
        "other_load_cpu1_pct": max(0.0, 100.0 * ((cpus_after[1] - cpus_before[1]) - broker_cpu) / wall),
        "broker_cpu_s_per_million": broker_cpu / unique * 1e6 if unique else None,
        "msgs_per_broker_cpu_s": unique / broker_cpu if broker_cpu > 0 else None,
        "broker_rss_kb": rss_kb,
        "broker_peak_rss_kb": hwm_kb,
        "publisher_max_behind": max(r["max_behind"] for r in pub_results.values()),
        "timeline_100ms": timeline,
    }


def run_idle(broker: Broker, clients: int, procs: int, run_id: str, protocol_version: int) -> dict:
    events: queue.Queue = queue.Queue()
    generators: list[Generator] = []
    try:
        time.sleep(0.5)
        rss_before = proc_status_kb(broker.pid, "VmRSS")
        slab_before = meminfo_kb("Slab")
        cpu_before = proc_cpu_seconds(broker.pid)
        names = set()
        for part, (first, size) in enumerate(split(clients, procs)):
            name = f"{run_id}-idle{part}"
            config = dict(
                role="idle",
                url=f"mqtt://127.0.0.1:{broker.port}",
                clients=size,
                first_index=first,
                client_prefix=f"{run_id}-i",
                keepalive=300,
                protocol_version=protocol_version,
                concurrency=64,
                hard_timeout_s=600,
            )
            generators.append(Generator(name, config, events, GENERATOR_CPU if broker.cpu is not None else None))
            names.add(name)
        started = time.monotonic()
        ready = wait_events(events, names, "ready", 300, broker)
        connect_s = time.monotonic() - started
        time.sleep(2.0)  # let the broker settle (buffers freed, allocator quiet)
        rss_after = proc_status_kb(broker.pid, "VmRSS")
        slab_after = meminfo_kb("Slab")
        cpu_after = proc_cpu_seconds(broker.pid)
        connected = sum(r["clients"] for r in ready.values())
    finally:
        for generator in generators:
            generator.send("stop")
        for generator in generators:
            generator.stop()
    return {
        "broker": broker.label,
        "clients": connected,
        "rss_before_kb": rss_before,
        "rss_after_kb": rss_after,
        "bytes_per_connection": (rss_after - rss_before) * 1024 / connected,
        "kernel_slab_delta_bytes_per_connection": (slab_after - slab_before) * 1024 / connected,
        "connect_seconds": connect_s,
        "connects_per_s": connected / connect_s,
        "connect_p99_ms": max(r["connect_p99_ms"] for r in ready.values()),
        "broker_cpu_s_connecting": cpu_after - cpu_before,
    }


# --------------------------------------------------------------------------------------------
# Summaries and report


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


SUMMARY_KEYS = [
    "delivered_per_s",
    "achieved_publish_per_s",
    "p50_us",
    "p99_us",
    "p999_us",
    "broker_cpu_s_per_million",
    "msgs_per_broker_cpu_s",
    "broker_cpu_pct",
    "generator_cpu_pct",
    "other_load_cpu0_pct",
    "other_load_cpu1_pct",
    "loss_pct",
    "broker_peak_rss_kb",
]


def summarize(runs: list[dict]) -> dict:
    summary = {key: median([r[key] for r in runs]) for key in SUMMARY_KEYS}
    summary["repetitions"] = len(runs)
    summary["lost_total"] = sum(r["lost"] for r in runs)
    summary["duplicates_total"] = sum(r["duplicates"] for r in runs)
    summary["reordered_total"] = sum(r["reordered"] for r in runs)
    return summary


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "–"
    if digits == 0:
        return f"{value:,.0f}{suffix}"
    return f"{value:,.{digits}f}{suffix}"


def fmt_us(value: float | None) -> str:
    if value is None:
        return "–"
    if value >= 10_000:
        return f"{value / 1000:,.1f} ms"
    if value >= 1000:
        return f"{value / 1000:,.2f} ms"
    return f"{value:,.0f} µs"


def machine_info() -> dict:
    model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "memory_gib": round(meminfo_kb("MemTotal") / 1024 / 1024, 1),
        "hostname_hidden": True,
    }


def geomean(values: list[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def verdict(ok: bool | None) -> str:
    if ok is None:
        return "not measured"
    return "**met**" if ok else "**not met**"


def contenders(report: dict) -> tuple[str, str, list[str]]:
    """The reference broker (A), the broker under test (B) and any extra reference columns."""
    labels = report["brokers"]
    return labels[0], labels[1], labels[2:]


@dataclass(frozen=True)
class Comparison:
    """One ratio the report shows: `tested` ÷ `reference`, and what makes the pair."""

    tested: str
    reference: str
    # "Nagle on" / "Nagle off" when both brokers run in that socket mode, else None.
    like_for_like: str | None

    def ratio_name(self) -> str:
        return f"{self.tested}/{self.reference}"


def comparisons(report: dict) -> list[Comparison]:
    """B ÷ A first (the issue's targets, each broker as configured by default), then every pair
    of a tested and a reference broker in the same socket mode, then B ÷ any extra column that no
    pair used (so an A/A run or a custom list still gets its ratios)."""
    a, b, extras = contenders(report)
    roles = report.get("roles", {})
    modes = report.get("socket_modes", {})

    def same_mode(x: str, y: str) -> str | None:
        return modes[x] if modes.get(x) is not None and modes.get(x) == modes.get(y) else None

    pairs = [Comparison(b, a, same_mode(b, a))]
    for tested in report["brokers"]:
        for reference in report["brokers"]:
            if (tested, reference) == (b, a):
                continue
            if roles.get(tested) == "tested" and roles.get(reference) == "reference":
                mode = same_mode(tested, reference)
                if mode is not None:
                    pairs.append(Comparison(tested, reference, mode))
    used = {label for pair in pairs for label in (pair.tested, pair.reference)}
    pairs += [Comparison(b, extra, same_mode(b, extra)) for extra in extras if extra not in used]
    return pairs


def summary_of(scenario: dict, label: str, key: str) -> float | None:
    summary = scenario["summary"].get(label)
    return summary[key] if summary else None


def render_markdown(report: dict) -> str:
    a, b, _ = contenders(report)
    labels = report["brokers"]
    pairs = comparisons(report)
    lines = []
    lines.append(f"# Broker benchmark: {b} vs {a}, {report['date']}")
    lines.append("")
    if report["quick"]:
        lines.append("> **Quick run** (`--quick`): one repetition of short runs, for checking the harness only.")
        lines.append("")
    m = report["machine"]
    lines.append("## Machine and versions")
    lines.append("")
    lines.append(f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, {m['memory_gib']} GiB RAM")
    for label, version in report["versions"].items():
        lines.append(f"- {label}: {version}")
    lines.append(f"- Command: `{report['command']}`; total time {report['elapsed_s'] / 60:.1f} min")
    lines.append("")

    lines.append("## Targets")
    lines.append("")
    lines.append("| Target | Result | Verdict |")
    lines.append("|---|---|---|")
    for row in report["targets"]:
        lines.append(f"| {row['target']} | {row['result']} | {verdict(row['met'])} |")
    lines.append("")

    if report["scenarios"]:
        lines.append("## Summary")
        lines.append("")
        lines.append(
            "Medians per scenario. *Efficiency* is msgs per broker CPU-second, ratio tested ÷ reference "
            "(higher is better); p99 ratio tested ÷ reference (lower is better)."
            + "".join(
                f" {pair.ratio_name()}: both with {pair.like_for_like}, like for like."
                for pair in pairs
                if pair.like_for_like
            )
        )
        lines.append("")
        head = ["Scenario"]
        for pair in pairs:
            head += [f"efficiency {pair.ratio_name()}", f"p99 {pair.ratio_name()}"]
        head += [f"p99 {label}" for label in labels]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|---|" + "---:|" * (len(head) - 1))
        for scenario in report["scenarios"]:
            cells = [scenario["name"]]
            for pair in pairs:
                eff = ratio(
                    summary_of(scenario, pair.tested, "msgs_per_broker_cpu_s"),
                    summary_of(scenario, pair.reference, "msgs_per_broker_cpu_s"),
                )
                p99 = ratio(summary_of(scenario, pair.tested, "p99_us"), summary_of(scenario, pair.reference, "p99_us"))
                cells.append(f"{eff:.2f}×" if eff is not None else "–")
                cells.append(f"{p99:.2f}×" if p99 is not None else "–")
            cells += [fmt_us(summary_of(scenario, label, "p99_us")) for label in labels]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    lines.append("## Method")
    lines.append("")
    s = report["settings"]
    order = "/".join(labels) + "/…"
    lines.append(
        f"- Each scenario runs {s['repetitions']} time(s) per broker, alternating {order}, "
        "a fresh broker process for every run; tables show medians."
    )
    lines.append(
        f"- Broker pinned to CPU {BROKER_CPU}; the MQTT.js generator process and the driver to CPU "
        f"{GENERATOR_CPU} (sched_setaffinity, as `taskset -c`); all at nice {BENCH_NICENESS}."
    )
    version_name = {3: "3.1", 4: "3.1.1", 5: "5.0"}[s["protocol_version"]]
    lines.append(
        f"- Each publisher sends {s['warmup_s']} s of unmeasured warm-up messages, then {s['seconds']} s of "
        f"measured messages, paced (open loop, 1 ms ticks); MQTT {version_name}, clean sessions. "
        f"Subscribers count every message and wait up to {s['drain_ms']} ms after the last publish."
    )
    lines.append(
        "- Latency: the publisher writes `process.hrtime` (CLOCK_MONOTONIC) into the first 8 payload bytes; "
        "the subscriber subtracts it on receipt (histogram buckets 1% wide)."
    )
    lines.append(
        "- Broker CPU: utime+stime from `/proc/PID/stat` from the end of the warm-up to the last "
        "subscriber's result. *msgs/CPU-s* = delivered messages ÷ broker CPU-seconds. Generator CPU is "
        "the generator process's own (100% = CPU 0 full: the generator is the bottleneck). *Other load* "
        "is a CPU's busy time from /proc/stat minus the test's own processes: work from outside the test. "
        f"A run with more than {s.get('max_other_load', 25):.0f}% other load on either CPU was run again "
        f"(at most {MAX_RETRIES_PER_RUN} times; {report.get('retries', 0)} reruns in all) and the least "
        "disturbed attempt kept."
    )
    lines.append(
        "- Mosquitto config: `listener PORT 127.0.0.1`, `allow_anonymous true`, `persistence false`, "
        "`max_queued_messages 0`, `max_inflight_messages 0`; *mosquitto-nodelay* adds "
        "`set_tcp_nodelay true` (Nagle off, as polyhub does). polyhub: `[mqtt.limits]` "
        "`max_queued_messages = 0`, `max_inflight = 0` (both: no limit), `max_connections = 1000000`; "
        "*polyhub-nagle* adds `[mqtt] tcp_nodelay = false` (Nagle on, as default Mosquitto)."
    )
    lines.append("")

    lines.append("## Throughput, latency and CPU per scenario")
    lines.append("")
    lines.append(
        "Ratios are the tested broker ÷ the reference named in the column: above 1 is better for "
        "msgs/CPU-s, below 1 is better for p99."
    )
    lines.append("")
    for scenario in report["scenarios"]:
        shape = scenario["shape"]
        lines.append(f"### {scenario['name']}")
        lines.append("")
        lines.append(
            f"{shape['publishers']} publisher(s) → {shape['subscribers']} subscriber(s), QoS {shape['qos']}, "
            f"{shape['payload']} B, offered {shape['offered_publish_per_s']:,} publishes/s "
            f"({shape['offered_deliveries_per_s']:,} deliveries/s)."
        )
        lines.append("")
        header = "| Metric | " + " | ".join(labels) + " | " + " | ".join(p.ratio_name() for p in pairs) + " |"
        lines.append(header)
        lines.append("|---|" + "---:|" * (len(labels) + len(pairs)))
        rows = [
            ("delivered msgs/s", "delivered_per_s", fmt, False),
            ("publish rate achieved /s", "achieved_publish_per_s", fmt, False),
            ("p50 latency", "p50_us", fmt_us, False),
            ("p99 latency", "p99_us", fmt_us, True),
            ("p99.9 latency", "p999_us", fmt_us, False),
            ("broker CPU-s per 1M delivered", "broker_cpu_s_per_million", lambda v: fmt(v, 2), False),
            ("msgs per broker CPU-s", "msgs_per_broker_cpu_s", fmt, True),
            ("broker CPU (of CPU 1)", "broker_cpu_pct", lambda v: fmt(v, 1, "%"), False),
            ("generator CPU (of CPU 0)", "generator_cpu_pct", lambda v: fmt(v, 1, "%"), False),
            ("other load on CPU 0", "other_load_cpu0_pct", lambda v: fmt(v, 1, "%"), False),
            ("other load on CPU 1", "other_load_cpu1_pct", lambda v: fmt(v, 1, "%"), False),
            ("loss", "loss_pct", lambda v: fmt(v, 3, "%"), False),
            ("broker peak RSS", "broker_peak_rss_kb", lambda v: fmt(v / 1024 if v else None, 1, " MiB"), False),
        ]
        for label, key, formatter, show_ratio in rows:
            cells = [formatter(summary_of(scenario, broker, key)) for broker in labels]
            ratios = []
            for pair in pairs:
                r = ratio(summary_of(scenario, pair.tested, key), summary_of(scenario, pair.reference, key))
                ratios.append(f"**{r:.2f}×**" if (show_ratio and r is not None) else ("–" if show_ratio else ""))
            name = f"**{label}**" if show_ratio else label
            lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
        notes = []
        for label in labels:
            summary = scenario["summary"].get(label)
            if summary is None:
                notes.append(f"{label}: no successful run")
            elif summary["lost_total"] or summary["duplicates_total"] or summary["reordered_total"]:
                notes.append(
                    f"{label}: {summary['lost_total']:,} lost, {summary['duplicates_total']:,} duplicates, "
                    f"{summary['reordered_total']:,} out of order over all repetitions"
                )
        if notes:
            lines.append("")
            lines.append("Anomalies: " + "; ".join(notes) + ".")
        lines.append("")

    idle = report.get("idle") or {}
    idle_labels = [label for label in labels if label in idle]
    if idle_labels:
        lines.append("## Idle connections")
        lines.append("")
        first = idle[idle_labels[0]]
        lines.append(
            f"{first['clients']:,} idle MQTT clients (keepalive 300 s, one QoS 1 subscription each), "
            "connected by several generator processes; broker VmRSS read before and 2 s after the last "
            "SUBACK."
        )
        lines.append("")
        show_ratio = a in idle and b in idle
        lines.append("| Metric | " + " | ".join(idle_labels) + (f" | {b}/{a} |" if show_ratio else " |"))
        lines.append("|---|" + "---:|" * (len(idle_labels) + (1 if show_ratio else 0)))
        for label, key, formatter in [
            ("RSS before", "rss_before_kb", lambda v: fmt(v / 1024, 1, " MiB")),
            ("RSS after", "rss_after_kb", lambda v: fmt(v / 1024, 1, " MiB")),
            ("**user-space bytes per connection**", "bytes_per_connection", lambda v: fmt(v, 0, " B")),
            (
                "kernel slab per connection (both ends, indicative)",
                "kernel_slab_delta_bytes_per_connection",
                lambda v: fmt(v, 0, " B"),
            ),
            ("connects/s (generator-bound)", "connects_per_s", fmt),
            ("broker CPU-s for all connects", "broker_cpu_s_connecting", lambda v: fmt(v, 2)),
        ]:
            cells = [formatter(idle[broker][key]) for broker in idle_labels]
            row = f"| {label} | " + " | ".join(cells) + " |"
            if show_ratio:
                r = ratio(idle[b][key], idle[a][key])
                row += f" {f'{r:.2f}×' if r is not None else '–'} |"
            lines.append(row)
        lines.append("")
        lines.append(
            "The kernel's own per-socket memory (socket buffers, TCP state) is not in the broker's RSS; "
            "the slab row is the change of the machine-wide `Slab` in /proc/meminfo and counts both ends "
            "of every loopback connection, so it is only indicative."
        )
        lines.append("")

    if report.get("errors"):
        lines.append("## Errors")
        lines.append("")
        for error in report["errors"]:
            lines.append(f"- {error}")
        lines.append("")

    log_notes = report.get("broker_log_notes") or {}
    if log_notes:
        lines.append("## Broker log lines mentioning errors, warnings or drops")
        lines.append("")
        for label, entries in log_notes.items():
            for entry in entries[:10]:
                lines.append(f"- {label}: `{entry}`")
        lines.append("")

    lines.append("## Caveats")
    lines.append("")
    lines.append(
        "- Offered load is paced and the same for every broker, so *delivered msgs/s* shows whether a "
        "broker kept up, not its ceiling: MQTT.js on one core cannot saturate either broker. Compare "
        "brokers by CPU-seconds per message and latency at equal load."
    )
    lines.append(
        "- The VM is shared with other work; medians of several repetitions damp but do not remove "
        "the noise (see *other load*). An A/A run (`--brokers mosquitto,mosquitto`) shows the noise "
        "floor: see docs/benchmarks.md."
    )
    lines.append("")
    return "\n".join(lines)


def comparison_targets(report: dict, pair: Comparison, main: bool) -> list[dict]:
    """Efficiency at QoS 0 and QoS 1 and p99 of `pair.tested` against `pair.reference`, each row
    saying which socket modes were compared."""
    a, b = pair.reference, pair.tested
    modes = report.get("socket_modes", {})
    if pair.like_for_like:
        prefix = f"{pair.like_for_like}, like for like ({b} vs {a}): "
    elif main and modes.get(a) and modes.get(b):
        prefix = f"As configured by default ({b}: {modes[b]}, {a}: {modes[a]}): "
    else:
        prefix = ""
    scenarios = [s for s in report["scenarios"] if s["summary"].get(a) and s["summary"].get(b)]
    targets = []
    for qos in (0, 1):
        rows = [s for s in scenarios if s["shape"]["qos"] == qos]
        ratios = {
            s["name"]: ratio(summary_of(s, b, "msgs_per_broker_cpu_s"), summary_of(s, a, "msgs_per_broker_cpu_s"))
            for s in rows
        }
        present = [r for r in ratios.values() if r is not None]
        if not present:
            continue
        passed = sum(1 for r in present if r >= TARGET_EFFICIENCY_RATIO)
        targets.append(
            {
                "target": f"{prefix}≥{TARGET_EFFICIENCY_RATIO}× {a}'s msgs per broker CPU-second at QoS {qos} "
                "(every scenario)",
                "result": f"{passed}/{len(present)} scenarios; ratios {min(present):.2f}–{max(present):.2f}×, "
                f"geometric mean {geomean(present):.2f}×",
                "met": passed == len(present),
                "ratios": ratios,
            }
        )
    p99 = {s["name"]: ratio(summary_of(s, b, "p99_us"), summary_of(s, a, "p99_us")) for s in scenarios}
    present = [r for r in p99.values() if r is not None]
    if present:
        passed = sum(1 for r in present if r <= TARGET_P99_RATIO)
        targets.append(
            {
                "target": f"{prefix}p99 latency no worse than {a}'s (every scenario)",
                "result": f"{passed}/{len(present)} scenarios; ratios {min(present):.2f}–{max(present):.2f}×, "
                f"geometric mean {geomean(present):.2f}×",
                "met": passed == len(present),
                "ratios": p99,
            }
        )
    for target in targets:
        target["tested"], target["reference"], target["like_for_like"] = b, a, pair.like_for_like
    return targets


def evaluate_targets(report: dict) -> list[dict]:
    a, b, _ = contenders(report)
    pairs = comparisons(report)
    # The targets are against Mosquitto; a `polyhub-before` column is an A/B of two
    # builds, shown in the summary table only.
    def against_mosquitto(pair: Comparison) -> bool:
        return not pair.reference.startswith("polyhub-before")

    targets = comparison_targets(report, pairs[0], main=True) if against_mosquitto(pairs[0]) else []
    for pair in pairs[1:]:
        if pair.like_for_like and against_mosquitto(pair):
            targets += comparison_targets(report, pair, main=False)
    roles = report.get("roles", {})
    tested = [label for label in report["brokers"] if roles.get(label) == "tested"] or [b]
    lossy = [
        f"{s['name']} ({label})"
        for s in report["scenarios"]
        for label, summary in s["summary"].items()
        if summary and summary["lost_total"] > 0
    ]
    tested_runs = [s["summary"][label] for s in report["scenarios"] for label in tested if s["summary"].get(label)]
    targets.append(
        {
            "target": f"no message lost by {', '.join(tested)} (a correctness check, not one of the issue's targets)",
            "result": "none lost by any broker" if not lossy else "losses in " + ", ".join(lossy),
            "met": (not any(summary["lost_total"] for summary in tested_runs)) if tested_runs else None,
        }
    )
    idle = report.get("idle") or {}
    if b in idle:
        per_conn = idle[b]["bytes_per_connection"]
        reference = f" ({a}: {idle[a]['bytes_per_connection']:,.0f} B)" if a in idle else ""
        targets.append(
            {
                "target": f"≤{TARGET_IDLE_BYTES} B of RSS per idle connection ({b})",
                "result": f"{per_conn:,.0f} B{reference}",
                "met": per_conn <= TARGET_IDLE_BYTES,
            }
        )
    return targets


# --------------------------------------------------------------------------------------------
# Main


def ensure_node_modules() -> str:
    if not (BENCH_DIR / "node_modules" / "mqtt").exists():
        print("bench: installing MQTT.js (npm ci)", flush=True)
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=BENCH_DIR, check=True)
    package = json.loads((BENCH_DIR / "node_modules" / "mqtt" / "package.json").read_text())
    return package["version"]


def build_polyhub() -> str:
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO_DIR / "target"))
    print(f"bench: cargo build --release -p polyhub (target dir {target})", flush=True)
    subprocess.run(["cargo", "build", "--release", "-p", "polyhub"], cwd=REPO_DIR, check=True)
    return str(target / "release" / "polyhub")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 repetition, short runs, 2,000 idle clients")
    parser.add_argument("--broker-bin", help="polyhub binary to test (default: cargo build --release -p polyhub)")
    parser.add_argument(
        "--before-bin",
        help="another polyhub binary, raced as the reference kind `polyhub-before` (an A/B of two builds)",
    )
    parser.add_argument("--mosquitto-bin", default=shutil.which("mosquitto") or "/usr/sbin/mosquitto")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="run only matching scenarios (glob on names like fanin-qos1-16b, or 'idle'); repeatable, "
        "or several separated by commas",
    )
    parser.add_argument(
        "--brokers",
        default=DEFAULT_BROKERS,
        help="brokers to race: the reference, the one under test, then extra columns; each tested "
        "broker is also compared with every reference in the same socket mode "
        f"(default {DEFAULT_BROKERS}; mosquitto,mosquitto is an A/A check of the harness)",
    )
    parser.add_argument("--reps", type=int, help="repetitions per broker and scenario (default 3, quick 1)")
    parser.add_argument("--seconds", type=float, help="load seconds per run (default 4, quick 1.5)")
    parser.add_argument("--idle-clients", type=int, help="idle connections (default 10000, quick 2000)")
    parser.add_argument("--idle-procs", type=int, default=4, help="generator processes for the idle test")
    parser.add_argument(
        "--rate-scale", type=float, default=1.0, help="multiply every offered rate (default 1: 20k deliveries/s)"
    )
    parser.add_argument("--protocol", type=int, choices=(3, 4, 5), default=4, help="MQTT protocol level (4 = 3.1.1)")
    parser.add_argument(
        "--max-other-load",
        type=float,
        default=25.0,
        help="rerun a run when other processes used more than this %% of CPU 0 or 1 (default 25)",
    )
    parser.add_argument("--out", help="results directory (default bench/results; quick: bench/work/results)")
    return parser.parse_args(argv)


def make_broker(kind: str, label: str, args: argparse.Namespace, polyhub_bin: str | None, cpu: int | None) -> Broker:
    if kind == "mosquitto":
        return Mosquitto(label, cpu, args.mosquitto_bin)
    if kind == "mosquitto-nodelay":
        return Mosquitto(label, cpu, args.mosquitto_bin, nodelay=True)
    if kind in ("polyhub", "polyhub-nagle"):
        assert polyhub_bin is not None
        return Polyhub(label, cpu, polyhub_bin, nodelay=kind == "polyhub")
    if kind == "polyhub-before":
        if not args.before_bin:
            raise SystemExit("--brokers polyhub-before needs --before-bin PATH")
        return Polyhub(label, cpu, args.before_bin, nodelay=True)
    raise SystemExit(f"unknown broker {kind!r} (one of {', '.join(BROKER_KINDS)})")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    WORK_DIR.mkdir(exist_ok=True)
    reps = args.reps or (1 if args.quick else 3)
    seconds = args.seconds or (1.5 if args.quick else 4.0)
    idle_clients = args.idle_clients or (2_000 if args.quick else 10_000)
    drain_ms = 3_000 if args.quick else 5_000

    kinds = args.brokers.split(",")
    if len(kinds) < 2:
        raise SystemExit("--brokers takes at least two names, e.g. mosquitto,polyhub")
    unknown = [kind for kind in kinds if kind not in BROKER_KINDS]
    if unknown:
        raise SystemExit(f"unknown broker {unknown[0]!r} (one of {', '.join(BROKER_KINDS)})")
    labels = []
    for kind in kinds:
        label = kind
        while label in labels:
            label += "-b"
        labels.append(label)

    # Install and build first, at normal priority on every CPU.
    mqtt_version = ensure_node_modules()
    polyhub_bin = None
    if any(BROKER_KINDS[kind][0] == "tested" for kind in kinds):
        polyhub_bin = args.broker_bin or build_polyhub()
        if not os.access(polyhub_bin, os.X_OK):
            raise SystemExit(f"polyhub binary not found: {polyhub_bin}")

    cpu_count = len(os.sched_getaffinity(0))
    if cpu_count < 2:
        print("bench: fewer than 2 CPUs available; running unpinned (figures are less meaningful)", flush=True)
    broker_cpu = BROKER_CPU if cpu_count >= 2 else None
    if broker_cpu is not None:
        # The driver itself stays off the broker's CPU.
        os.sched_setaffinity(0, {GENERATOR_CPU})
    raise_priority()

    brokers = [make_broker(kind, label, args, polyhub_bin, broker_cpu) for kind, label in zip(kinds, labels)]
    versions = {}
    for broker in brokers:
        versions[broker.label] = broker.version()
    versions["node"] = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    versions["mqtt (MQTT.js)"] = mqtt_version

    patterns = [pattern for value in args.only for pattern in value.split(",") if pattern]

    def selected(name: str) -> bool:
        return not patterns or any(fnmatch.fnmatch(name, pattern) or name.startswith(pattern) for pattern in patterns)

    scenarios = [s for s in all_scenarios() if selected(s.name)]
    if args.rate_scale != 1.0:
        scenarios = [dataclasses.replace(s, rate=max(1, round(s.rate * args.rate_scale))) for s in scenarios]
    warmup_s = 0.5 if args.quick else 1.0
    settings = Settings(count=0, warmup_s=warmup_s, drain_ms=drain_ms, protocol_version=args.protocol)
    report: dict = {
        "date": dt.date.today().isoformat(),
        "quick": args.quick,
        "command": "python3 bench/run.py " + " ".join(argv),
        "machine": machine_info(),
        "versions": versions,
        "brokers": labels,
        "roles": {label: BROKER_KINDS[kind][0] for kind, label in zip(kinds, labels)},
        "socket_modes": {label: BROKER_KINDS[kind][1] for kind, label in zip(kinds, labels)},
        "settings": {
            "repetitions": reps,
            "seconds": seconds,
            "warmup_s": warmup_s,
            "drain_ms": drain_ms,
            "protocol_version": args.protocol,
            "max_other_load": args.max_other_load,
            "count": 0,
        },
        "scenarios": [],
        "errors": [],
    }

    total_runs = len(scenarios) * reps * len(brokers)
    retries_left = int(total_runs * RETRY_BUDGET)
    report["retries"] = 0
    done = 0
    for scenario in scenarios:
        count = max(1, int(scenario.rate * seconds))
        settings.count = count
        report["settings"]["count"] = count
        runs: dict[str, list[dict]] = {b.label: [] for b in brokers}
        for rep in range(reps):
            for broker in brokers:
                done += 1
                best: dict | None = None
                for attempt in range(1 + MAX_RETRIES_PER_RUN):
                    run_id = f"{scenario.name}-{broker.label}-{rep}-{attempt}"
                    try:
                        broker.start()
                        result = run_scenario(broker, scenario, settings, run_id)
                        result["attempt"] = attempt + 1
                        warnings = broker.log_lines_matching("panic", "error", "warn", "drop")
                        if warnings:
                            result["broker_log"] = warnings
                            report.setdefault("broker_log_notes", {}).setdefault(broker.label, []).extend(
                                f"{scenario.name}: {line}" for line in warnings[:2]
                            )
                        print(
                            f"[{done}/{total_runs}] {scenario.name:<18} {broker.label:<17} "
                            f"{result['delivered_per_s']:>9,.0f} msg/s  p50 {fmt_us(result['p50_us']):>9}  "
                            f"p99 {fmt_us(result['p99_us']):>9}  broker {result['broker_cpu_pct']:5.1f}% "
                            f"({fmt(result['msgs_per_broker_cpu_s'])} msg/CPU-s)  "
                            f"gen {result['generator_cpu_pct']:5.1f}%  other {interference(result):5.1f}%  "
                            f"lost {result['lost']}",
                            flush=True,
                        )
                        if best is None or interference(result) < interference(best):
                            best = result
                    except BenchError as error:
                        message = f"{scenario.name} on {broker.label} (repetition {rep + 1}): {error}"
                        print(f"[{done}/{total_runs}] ERROR {message}", flush=True)
                        report["errors"].append(message.splitlines()[0])
                        break
                    finally:
                        broker.stop()
                        broker.cleanup()
                    # Other work on the machine disturbed this run: try again while the budget lasts.
                    if interference(best) <= args.max_other_load or retries_left <= 0:
                        break
                    retries_left -= 1
                    report["retries"] += 1
                    print(f"    other load {interference(result):.0f}% > {args.max_other_load:.0f}%: run again", flush=True)
                if best is not None:
                    runs[broker.label].append(best)
        if any(runs[b.label] for b in brokers):
            report["scenarios"].append(
                {
                    "name": scenario.name,
                    "shape": {
                        "publishers": scenario.publishers,
                        "subscribers": scenario.subscribers,
                        "qos": scenario.qos,
                        "payload": scenario.payload,
                        "offered_publish_per_s": scenario.rate * scenario.publishers,
                        "offered_deliveries_per_s": scenario.rate * scenario.publishers * scenario.deliveries_per_message(),
                        "messages_per_publisher": count,
                    },
                    "summary": {label: summarize(rs) if rs else None for label, rs in runs.items()},
                    "runs": runs,
                }
            )

    if selected("idle"):
        report["idle"] = {}
        # Nagle's algorithm does not change memory: the extra reference brokers are skipped.
        for broker in brokers[:2]:
            try:
                broker.start()
                result = run_idle(broker, idle_clients, args.idle_procs, f"idle-{broker.label}", args.protocol)
                report["idle"][broker.label] = result
                print(
                    f"idle {broker.label:<17} {result['clients']:,} clients: "
                    f"{result['bytes_per_connection']:,.0f} B/connection RSS "
                    f"({result['rss_before_kb'] / 1024:.1f} → {result['rss_after_kb'] / 1024:.1f} MiB), "
                    f"{result['connects_per_s']:,.0f} connects/s",
                    flush=True,
                )
            except BenchError as error:
                message = f"idle test on {broker.label}: {error}"
                print(f"ERROR {message}", flush=True)
                report["errors"].append(message.splitlines()[0])
            finally:
                broker.stop()
                broker.cleanup()

    report["elapsed_s"] = time.monotonic() - started
    report["targets"] = evaluate_targets(report)
    out_dir = Path(args.out) if args.out else (WORK_DIR / "results" if args.quick else BENCH_DIR / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"broker-{report['date']}" + ("-quick" if args.quick else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(render_markdown(report))
    print(f"bench: wrote {out_dir / stem}.md and .json ({report['elapsed_s'] / 60:.1f} min)", flush=True)
    for target in report["targets"]:
        print(f"  {target['target']}: {target['result']} -> {verdict(target['met']).strip('*')}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
