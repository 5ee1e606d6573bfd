"""A polyhub device played by slixmpp, for the XMPP backend's integration tests.

Usage: xmpp_device.py JID PASSWORD HOST PORT HUB_JID

Logs in without TLS (loopback only), accepts presence subscriptions (the hub subscribes to
its devices), acknowledges receipt requests (XEP-0184), and answers every command message
(`{"id", "name", "payload"}`) with a reply (`{"id", "status", "result"/"reason"}`) followed by
a telemetry message. A command named "fail" is answered with status "error". Prints READY
once its session has started, then runs until killed.
"""

import asyncio
import json
import sys

import slixmpp


class Device(slixmpp.ClientXMPP):
    def __init__(self, jid, password, hub):
        super().__init__(jid, password)
        self.hub = hub
        self.commands = 0
        # The hub asks to see our presence: grant it, and ask for the hub's in return.
        self.auto_authorize = True
        self.auto_subscribe = True
        self.register_plugin("xep_0184")  # acknowledges receipt requests by itself
        self["feature_mechanisms"].unencrypted_plain = True
        self.add_event_handler("session_start", self.on_start)
        self.add_event_handler("message", self.on_message)

    async def on_start(self, _event):
        self.send_presence()
        await self.get_roster()
        print("READY", flush=True)

    def on_message(self, msg):
        if msg["type"] not in ("chat", "normal"):
            return
        try:
            command = json.loads(msg["body"])
        except ValueError:
            return
        if not isinstance(command, dict) or "name" not in command or "id" not in command:
            return
        self.commands += 1
        if command["name"] == "fail":
            reply = {"id": command["id"], "status": "error", "reason": "asked to fail"}
        else:
            reply = {
                "id": command["id"],
                "status": "ok",
                "result": {"echo": command["name"], "payload": command.get("payload")},
            }
        self.send_message(mto=msg["from"], mbody=json.dumps(reply), mtype="chat")
        telemetry = {"temperature": 21.5, "commands": self.commands}
        self.send_message(mto=self.hub, mbody=json.dumps(telemetry), mtype="chat")


def main():
    jid, password, host, port, hub = sys.argv[1:6]
    device = Device(jid, password, hub)
    device.connect(address=(host, int(port)), use_ssl=False, force_starttls=False,
                   disable_starttls=True)
    asyncio.get_event_loop().run_forever()


if __name__ == "__main__":
    main()
