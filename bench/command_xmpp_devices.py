#!/usr/bin/env python3
"""Command round-trip benchmark (bench/commands.py): XMPP devices that answer every command.

    command_xmpp_devices.py CONFIG.json

Many slixmpp clients in one asyncio loop (bench/commands.py starts several of these processes
to spread 1,000 devices). Each logs in without TLS (loopback only), approves the hub's presence
subscription, and answers every command message as docs/commands.md asks of XMPP devices: the
XEP-0184 receipt first, then the reply `{"id", "status": "ok", "result": <payload>}` as a chat
message to the hub.

Talks to the driver over stdin/stdout like bench/command_devices.mjs:
  out {"event":"ready","devices","connect_s"}   every device logged in and sent its presence
  in  "measure" / "stop"                          restart the counters / print the result, exit

config: {host, port, password, jids: [...], connect_concurrency, hard_timeout_s}
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import slixmpp
from slixmpp.xmlstream import ET

RECEIPTS_NS = "urn:xmpp:receipts"


def emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class Counters:
    def __init__(self) -> None:
        self.commands = 0
        self.malformed = 0
        self.cpu_start = cpu_seconds()


class Device(slixmpp.ClientXMPP):
    def __init__(self, jid: str, password: str, counters: Counters) -> None:
        super().__init__(jid, password)
        self.counters = counters
        self.auto_authorize = True
        self.auto_subscribe = False
        self["feature_mechanisms"].unencrypted_plain = True
        self.enable_plaintext = True
        self.enable_starttls = False
        self.enable_direct_tls = False
        self.started = asyncio.get_event_loop().create_future()
        self.add_event_handler("session_start", self.on_start)
        self.add_event_handler("message", self.on_message)
        self.add_event_handler("failed_auth", self.on_failed_auth)

    async def on_start(self, _event) -> None:
        # No roster request: the hub's subscription arrives as a presence stanza either way.
        self.send_presence()
        if not self.started.done():
            self.started.set_result(True)

    def on_failed_auth(self, _event) -> None:
        if not self.started.done():
            self.started.set_exception(RuntimeError(f"{self.boundjid.bare}: authentication failed"))

    def on_message(self, msg) -> None:
        if msg["type"] not in ("chat", "normal"):
            return
        try:
            command = json.loads(msg["body"])
        except ValueError:
            self.counters.malformed += 1
            return
        if not isinstance(command, dict) or "id" not in command or "name" not in command:
            self.counters.malformed += 1
            return
        self.counters.commands += 1
        # The receipt (XEP-0184) first, then the answer.
        receipt = self.make_message(mto=msg["from"])
        received = ET.Element(f"{{{RECEIPTS_NS}}}received", {"id": msg["id"]})
        receipt.append(received)
        receipt.send()
        reply = {"id": command["id"], "status": "ok", "result": command.get("payload")}
        self.send_message(mto=msg["from"], mbody=json.dumps(reply), mtype="chat")


async def main() -> int:
    with open(sys.argv[1]) as file:
        config = json.load(file)
    loop = asyncio.get_running_loop()
    loop.call_later(config["hard_timeout_s"], lambda: (emit({"event": "error", "message": "hard timeout"}), os._exit(2)))
    counters = Counters()
    devices: list[Device] = []
    started = time.monotonic()
    gate = asyncio.Semaphore(config["connect_concurrency"])

    async def login(jid: str) -> None:
        async with gate:
            device = Device(jid, config["password"], counters)
            devices.append(device)
            device.connect(config["host"], int(config["port"]))
            await asyncio.wait_for(device.started, timeout=60)

    try:
        await asyncio.gather(*(login(jid) for jid in config["jids"]))
    except Exception as error:  # noqa: BLE001 (any login failure ends the run)
        emit({"event": "error", "message": f"login: {error!r}"})
        return 2
    emit({"event": "ready", "devices": len(devices), "connect_s": time.monotonic() - started})

    lines = asyncio.Queue()
    loop.add_reader(sys.stdin.fileno(), lambda: lines.put_nowait(sys.stdin.readline()))
    while True:
        word = (await lines.get()).strip()
        if word == "measure":
            counters.commands = 0
            counters.cpu_start = cpu_seconds()
        elif word in ("stop", ""):
            emit(
                {
                    "event": "result",
                    "devices": len(devices),
                    "commands": counters.commands,
                    "replies": counters.commands,
                    "malformed": counters.malformed,
                    "cpu_s": cpu_seconds() - counters.cpu_start,
                }
            )
            for device in devices:
                device.disconnect(wait=0)
            await asyncio.sleep(0.2)
            return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
