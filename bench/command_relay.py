#!/usr/bin/env python3
"""The usual way to send commands to MQTT devices, as a baseline for bench/commands.py.

A small HTTP -> MQTT command relay in front of Mosquitto, the way one is typically written:
the standard library's threading HTTP server (HTTP/1.1 keep-alive, one thread per connection),
paho-mqtt (its network loop in a background thread) and sqlite3 for the command state.
It speaks the same API and wire format as polyhub, so the same load generator and devices
drive it:

- `POST /devices/{id}/commands` `{"name", "payload"?, "wait_ms"?}`: the command is stored
  (`queued`, committed), published at QoS 1 on `/{hub}/{device}/cmd` as
  `{"id", "name", "payload"}`, recorded `sent` (committed), then the request waits up to
  `wait_ms` for the reply and answers 201 with the command row as JSON.
- replies `{"id", "status", "result"?}` on `/+/+/cmd_reply` are recorded `acknowledged` or
  `failed` (committed) in paho's callback, which then wakes the waiting request.

SQLite in WAL mode with synchronous=FULL: each commit is durable, as polyhub's are.

    command_relay.py --mqtt-port N --http-port N --db FILE --hub HUB

Prints `{"event": "ready"}` on stdout once subscribed and listening.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import sqlite3
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import paho.mqtt.client as mqtt

PATH = re.compile(r"^/devices/([^/]+)/commands$")
REPLY_FILTER = "/+/+/cmd_reply"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Relay:
    def __init__(self, db_path: str, hub: str, mqtt_port: int) -> None:
        self.hub = hub
        self.db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(
            """CREATE TABLE IF NOT EXISTS commands (
                   id TEXT PRIMARY KEY, device_id TEXT NOT NULL, name TEXT NOT NULL,
                   payload TEXT NOT NULL, state TEXT NOT NULL, created_at INTEGER NOT NULL,
                   sent_at INTEGER, acknowledged_at INTEGER, finished_at INTEGER,
                   reason TEXT, reply TEXT)"""
        )
        self.db_lock = threading.Lock()
        self.waiting: dict[str, threading.Event] = {}
        self.waiting_lock = threading.Lock()
        self.subscribed = threading.Event()
        self.mqtt = mqtt.Client(client_id=f"command-relay-{uuid.uuid4().hex[:8]}", clean_session=True)
        self.mqtt.max_inflight_messages_set(0)  # no cap of ours on QoS 1 in flight
        self.mqtt.on_connect = self.on_connect
        self.mqtt.on_message = self.on_message
        self.mqtt.on_subscribe = lambda *_: self.subscribed.set()
        self.mqtt.connect("127.0.0.1", mqtt_port, keepalive=60)
        self.mqtt.loop_start()

    def write(self, sql: str, params: tuple) -> None:
        with self.db_lock:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(sql, params)
            self.db.execute("COMMIT")

    def row(self, command_id: str) -> dict:
        with self.db_lock:
            cursor = self.db.execute("SELECT * FROM commands WHERE id = ?", (command_id,))
            names = [d[0] for d in cursor.description]
            values = cursor.fetchone()
        command = dict(zip(names, values))
        command["payload"] = json.loads(command["payload"])
        if command["reply"] is not None:
            command["reply"] = json.loads(command["reply"])
        return command

    def on_connect(self, client, _userdata, _flags, rc) -> None:
        if rc != 0:
            print(f"relay: MQTT connect refused: {rc}", file=sys.stderr, flush=True)
            return
        # paho leaves Nagle on; small publishes would wait for ACKs of earlier ones.
        sock = client.socket()
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.subscribe(REPLY_FILTER, qos=1)

    def on_message(self, _client, _userdata, message) -> None:
        try:
            reply = json.loads(message.payload)
            command_id = reply["id"]
            ok = reply["status"] == "ok"
        except (ValueError, KeyError, TypeError):
            return
        at = now_ms()
        state = "acknowledged" if ok else "failed"
        column = "acknowledged_at" if ok else "finished_at"
        self.write(
            f"UPDATE commands SET state = ?, {column} = ?, reply = ? "
            "WHERE id = ? AND state IN ('queued', 'sent')",
            (state, at, json.dumps(reply.get("result")), command_id),
        )
        with self.waiting_lock:
            event = self.waiting.get(command_id)
        if event is not None:
            event.set()

    def submit(self, device_id: str, body: dict) -> dict:
        command_id = f"cmd-{uuid.uuid4().hex}"
        payload = body.get("payload")
        self.write(
            "INSERT INTO commands (id, device_id, name, payload, state, created_at) VALUES (?, ?, ?, ?, 'queued', ?)",
            (command_id, device_id, body["name"], json.dumps(payload), now_ms()),
        )
        event = threading.Event()
        with self.waiting_lock:
            self.waiting[command_id] = event
        try:
            message = json.dumps({"id": command_id, "name": body["name"], "payload": payload})
            self.mqtt.publish(f"/{self.hub}/{device_id}/cmd", message, qos=1)
            self.write(
                "UPDATE commands SET state = 'sent', sent_at = ? WHERE id = ? AND state = 'queued'",
                (now_ms(), command_id),
            )
            wait_ms = body.get("wait_ms") or 0
            if wait_ms:
                event.wait(wait_ms / 1000)
        finally:
            with self.waiting_lock:
                self.waiting.pop(command_id, None)
        return self.row(command_id)


def handler_for(relay: Relay):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # http.server writes the headers and the body separately; with Nagle on, the body
        # then waits for the client's delayed ACK (~40 ms). Off, as any tuned relay has it.
        disable_nagle_algorithm = True

        def log_message(self, *_args) -> None:
            pass

        def answer(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length)
            found = PATH.match(self.path)
            if not found:
                return self.answer(404, {"error": "not_found"})
            try:
                body = json.loads(raw)
                if not isinstance(body, dict) or not isinstance(body.get("name"), str):
                    raise ValueError("name missing")
            except ValueError as error:
                return self.answer(400, {"error": "invalid_request", "message": str(error)})
            self.answer(201, relay.submit(found.group(1), body))

    return Handler


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mqtt-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--hub", required=True)
    args = parser.parse_args()
    relay = Relay(args.db, args.hub, args.mqtt_port)
    if not relay.subscribed.wait(20):
        print("relay: no SUBACK within 20 s", file=sys.stderr, flush=True)
        return 1
    server = ThreadingHTTPServer(("127.0.0.1", args.http_port), handler_for(relay))
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(json.dumps({"event": "ready"}), flush=True)
    server.serve_forever(poll_interval=0.2)
    relay.mqtt.loop_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
