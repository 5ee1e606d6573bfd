"""A polyhub device played by slixmpp, for the hub suite's XMPP tests (tests/hub/test_xmpp.py).

Usage: xmpp_device.py JID PASSWORD HOST PORT HUB_JID

Logs in without TLS (loopback only), accepts presence subscriptions (the hub subscribes to its
devices), acknowledges receipt requests (XEP-0184) as soon as a message arrives, and answers every command message
(`{"id", "name", "payload"}`) with a reply `{"id", "status": "ok", "result": {"echo": name,
"payload": payload}}` (a command named "fail" gets `{"status": "error", "reason": "asked to
fail"}`).

Talks to the test over its standard streams, one line each:
- out: `READY` once the session has started; `COMMAND <json body>` for each command received.
- in: `telemetry <json object>` sends that object to HUB_JID as a chat message body;
  `quit` sends unavailable presence, closes the stream and exits.
"""

import json
import sys
import threading

import slixmpp


class Device(slixmpp.ClientXMPP):
    def __init__(self, jid, password, hub):
        super().__init__(jid, password)
        self.hub = hub
        # The hub asks to see our presence: grant it, and ask for the hub's in return.
        self.auto_authorize = True
        self.auto_subscribe = True
        # Receipts are sent by on_message, before the reply, as a device that confirms
        # reception and then carries the command out would.
        self.register_plugin("xep_0184", pconfig={"auto_ack": False})
        self["feature_mechanisms"].unencrypted_plain = True
        self.add_event_handler("session_start", self.on_start)
        self.add_event_handler("message", self.on_message)
        self.add_event_handler("disconnected", self.on_disconnected)
        self.quitting = False

    async def on_start(self, _event):
        self.send_presence()
        await self.get_roster()
        print("READY", flush=True)

    def on_disconnected(self, _event):
        if self.quitting:
            self.loop.stop()

    def on_message(self, msg):
        if msg["type"] not in ("chat", "normal"):
            return
        if msg["request_receipt"] and not msg["receipt"]:
            self.plugin["xep_0184"].ack(msg)
        try:
            command = json.loads(msg["body"])
        except ValueError:
            return
        if not isinstance(command, dict) or "name" not in command or "id" not in command:
            return
        print("COMMAND " + json.dumps(command), flush=True)
        if command["name"] == "fail":
            reply = {"id": command["id"], "status": "error", "reason": "asked to fail"}
        else:
            reply = {
                "id": command["id"],
                "status": "ok",
                "result": {"echo": command["name"], "payload": command.get("payload")},
            }
        self.send_message(mto=msg["from"], mbody=json.dumps(reply), mtype="chat")

    def on_line(self, line):
        verb, _, rest = line.strip().partition(" ")
        if verb == "telemetry":
            self.send_message(mto=self.hub, mbody=rest, mtype="chat")
        elif verb == "quit":
            self.quitting = True
            self.disconnect()


def read_commands(device, loop):
    for line in sys.stdin:
        loop.call_soon_threadsafe(device.on_line, line)
    # The test went away: leave as if asked to.
    loop.call_soon_threadsafe(device.on_line, "quit")


def main():
    jid, password, host, port, hub = sys.argv[1:6]
    device = Device(jid, password, hub)
    if hasattr(device, "enable_plaintext"):
        # slixmpp >= 1.9: the transport is chosen by attributes.
        device.enable_plaintext = True
        device.enable_starttls = False
        device.enable_direct_tls = False
        device.connect(host, int(port))
    else:
        device.connect(address=(host, int(port)), use_ssl=False, force_starttls=False,
                       disable_starttls=True)
    loop = device.loop
    threading.Thread(target=read_commands, args=(device, loop), daemon=True).start()
    loop.run_forever()


if __name__ == "__main__":
    main()
