#!/usr/bin/env python3
"""The seed's hub parser done the usual way: a paho-mqtt subscriber writing SQLite.

    python3 bench/ingest_subscriber.py --port PORT --db FILE [--commit each|batch]

This is the baseline of bench/ingest.py (contender "python"): one Python process subscribes
`/+/+/data` at QoS 1 on Mosquitto, decodes each JSON payload into one row per member
(device, signal, ts, value), inserts the rows with the standard `sqlite3` module and commits.

- `--commit each` (default, "the usual way"): one transaction per message, SQLite at its
  defaults (rollback journal, synchronous=FULL). paho-mqtt 1.x sends the PUBACK after
  `on_message` returns, so a message is acknowledged only once its rows are committed: the same
  guarantee polyhub gives.
- `--commit batch`: commit every `--batch-messages` messages or `--batch-ms` milliseconds, in
  WAL mode with synchronous=NORMAL (polyhub's settings). paho acknowledges each message when
  `on_message` returns, before the commit, so this variant can lose acknowledged messages in a
  crash: it is faster than polyhub's guarantee allows, which flatters it.

Talks to the driver over stdout, one JSON object per line: `{"event":"ready"}` once subscribed,
then `{"event":"progress","t_us":..,"messages":..,"rows":..}` (committed counts, CLOCK_MONOTONIC
microseconds) every 100 ms and once more on exit. Exits on SIGTERM or SIGINT after a last commit.
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import sys
import time

import paho.mqtt.client as mqtt

SCHEMA = """
CREATE TABLE IF NOT EXISTS telemetry (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    signal TEXT NOT NULL,
    ts INTEGER NOT NULL,
    value
);
CREATE INDEX IF NOT EXISTS telemetry_device_signal_ts ON telemetry (device, signal, ts);
"""

PROGRESS_EVERY_S = 0.1


def emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def flatten(prefix: str, value, rows: list) -> None:
    """One (signal, value) per member; nested objects become dotted signal names."""
    if isinstance(value, dict):
        for key, member in value.items():
            flatten(f"{prefix}.{key}" if prefix else key, member, rows)
    else:
        rows.append((prefix or "value", value))


class Ingest:
    """Decodes and stores messages; counts what is committed."""

    def __init__(self, db_path: str, commit: str, batch_messages: int, batch_ms: float) -> None:
        self.db = sqlite3.connect(db_path)
        if commit == "batch":
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.db.commit()
        self.commit_each = commit == "each"
        self.batch_messages = batch_messages
        self.batch_s = batch_ms / 1000
        self.pending_messages = 0
        self.pending_rows = 0
        self.first_pending = 0.0
        self.messages = 0
        self.rows = 0
        self.bad = 0

    def on_message(self, _client, _userdata, message) -> None:
        levels = message.topic.split("/")
        if len(levels) != 4:
            self.bad += 1
            return
        device = levels[2]
        try:
            payload = json.loads(message.payload)
        except ValueError:
            self.bad += 1
            return
        rows: list = []
        flatten("", payload, rows)
        ts = int(time.time() * 1000)
        self.db.executemany(
            "INSERT INTO telemetry (device, signal, ts, value) VALUES (?, ?, ?, ?)",
            [(device, signal_name, ts, value) for signal_name, value in rows],
        )
        if self.pending_messages == 0:
            self.first_pending = time.monotonic()
        self.pending_messages += 1
        self.pending_rows += len(rows)
        if self.commit_each or self.pending_messages >= self.batch_messages:
            self.commit()

    def commit_if_due(self) -> None:
        if self.pending_messages and time.monotonic() - self.first_pending >= self.batch_s:
            self.commit()

    def commit(self) -> None:
        self.db.commit()
        self.messages += self.pending_messages
        self.rows += self.pending_rows
        self.pending_messages = 0
        self.pending_rows = 0

    def progress(self) -> None:
        emit(
            {
                "event": "progress",
                "t_us": time.monotonic_ns() // 1000,
                "messages": self.messages,
                "rows": self.rows,
                "bad": self.bad,
            }
        )


def make_client(client_id: str) -> mqtt.Client:
    # paho-mqtt 2 asks which callback signatures to use; 1.x has no such argument.
    if hasattr(mqtt, "CallbackAPIVersion"):
        return mqtt.Client(mqtt.CallbackAPIVersion.VERSION1, client_id=client_id, clean_session=True)
    return mqtt.Client(client_id=client_id, clean_session=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True, help="SQLite file (created)")
    parser.add_argument("--filter", default="/+/+/data")
    parser.add_argument("--client-id", default="python-ingest")
    parser.add_argument("--commit", choices=("each", "batch"), default="each")
    parser.add_argument("--batch-messages", type=int, default=100)
    parser.add_argument("--batch-ms", type=float, default=50.0)
    args = parser.parse_args(argv)

    ingest = Ingest(args.db, args.commit, args.batch_messages, args.batch_ms)
    stopping = False

    def stop(_signum, _frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    client = make_client(args.client_id)
    client.max_inflight_messages_set(0)  # no limit: the broker's window is the only one
    subscribed = []
    client.on_message = ingest.on_message
    client.on_subscribe = lambda *_: subscribed.append(True)
    client.on_connect = lambda c, *_: c.subscribe(args.filter, qos=1)
    client.connect(args.host, args.port, keepalive=60)
    deadline = time.monotonic() + 15
    while not subscribed:
        if time.monotonic() > deadline:
            emit({"event": "error", "message": "not subscribed within 15 s"})
            return 2
        client.loop(timeout=0.05)
    emit({"event": "ready"})

    next_progress = time.monotonic()
    while not stopping:
        rc = client.loop(timeout=0.01)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            emit({"event": "error", "message": f"paho loop returned {rc}"})
            return 2
        ingest.commit_if_due()
        now = time.monotonic()
        if now >= next_progress:
            ingest.progress()
            next_progress = now + PROGRESS_EVERY_S
    if ingest.pending_messages:
        ingest.commit()
    ingest.progress()
    client.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
