"""Commands over XMPP (issue 5) end to end: a real Prosody on loopback, `polyhub run` logged in
to it as the hub's account through `[polyglot.xmpp]` (or connected as an XEP-0114 component),
and a device played by slixmpp (tests/hub/xmpp_device.py). Everything is observed through
polyhub's REST API: presence, commands with receipts and replies, offline queueing, and
telemetry sent as chat messages.

Needs prosody (apt) and slixmpp (pip) — missing either fails the tests, it never skips them.
"""

from __future__ import annotations

import json

import pytest

from hub_harness import (
    XMPP_DOMAIN, ApiError, MqttClient, Prosody, XmppDevice, command_in_state, free_port,
    require_slixmpp, restart, wait_until, xmpp_polyglot_config,
)

HUB_PASSWORD = "hub-secret"
DEVICE_PASSWORD = "device-secret"
COMPONENT = f"hub.{XMPP_DOMAIN}"
COMPONENT_SECRET = "component-secret"


@pytest.fixture
def prosody(tmp_path):
    require_slixmpp()  # before anything starts: the devices cannot run without it
    workdir = tmp_path / "prosody"
    workdir.mkdir()
    server = Prosody(workdir).start()
    yield server
    server.stop()
    # Shown by pytest only when the test failed: the server's side of the story.
    print(server.logs())


@pytest.fixture
def component_prosody(tmp_path):
    """A Prosody that also accepts the component COMPONENT on `component_port` (loopback)."""
    require_slixmpp()
    workdir = tmp_path / "prosody"
    workdir.mkdir()
    server = Prosody(workdir)
    server.component_port = free_port()
    config = server.config.read_text()
    assert "component_ports = { }" in config, "the harness's Prosody config changed"
    config = config.replace(
        "component_ports = { }",
        f'component_ports = {{ {server.component_port} }}\ncomponent_interfaces = {{ "127.0.0.1" }}',
    )
    server.config.write_text(
        config + f'Component "{COMPONENT}"\n    component_secret = "{COMPONENT_SECRET}"\n'
    )
    server.start()
    yield server
    server.stop()
    print(server.logs())


def component_polyglot_config(prosody) -> str:
    """`[polyglot.xmpp]` as the component COMPONENT, registering device accounts on the client
    listener."""
    return (
        "[polyglot.xmpp]\n"
        'type = "xmpp"\n'
        'mode = "component"\n'
        f'component_domain = "{COMPONENT}"\n'
        f'component_secret = "{COMPONENT_SECRET}"\n'
        f'server = "127.0.0.1:{prosody.component_port}"\n'
        f'registration_server = "{prosody.server}"\n'
        "allow_plaintext = true\n"
        "send_timeout_ms = 3000\n"
    )


@pytest.fixture
def devices():
    """`devices(prosody, jid, password, hub_jid)` starts an XmppDevice; all are killed at the end."""
    started: list[XmppDevice] = []

    def start(*args) -> XmppDevice:
        device = XmppDevice(*args)
        started.append(device)
        return device

    yield start
    for device in started:
        device.kill()


def logged_in(polyhub) -> None:
    wait_until(lambda: "logged in to the XMPP server" in polyhub.log_text(), "polyhub logged in to Prosody")


def presence(api, device: str) -> dict:
    return api.get(f"/devices/{device}/presence")


def wait_online(api, device: str, online: bool) -> dict:
    state = "online" if online else "offline"
    return wait_until(
        lambda: (lambda p: p if p["online"] is online else None)(presence(api, device)),
        f"{device} {state} in GET /devices/{device}/presence",
    )


def hub_with_xmpp_device(api, device: str, **fields) -> None:
    api.add_group("g")
    api.add_hub("h", "g")
    created = api.add_device(device, "h", protocol="xmpp", **fields)
    assert created["protocol"] == "xmpp"


def test_presence_commands_receipts_offline_queue_and_telemetry(prosody, hub_factory, devices):
    """A device polyhub knows when it logs in: presence both ways, a command with wait_ms
    acknowledged with the reply after its receipt, a device-side error, telemetry, and commands
    queued while the device is offline that go out in order when it is back."""
    hub_jid = prosody.register("hub", HUB_PASSWORD)
    device_jid = prosody.register("dev1", DEVICE_PASSWORD)
    polyhub = hub_factory(xmpp_polyglot_config(prosody, hub_jid, HUB_PASSWORD))
    api = polyhub.api
    hub_with_xmpp_device(api, "dev1")  # its JID: `<id>@<device_domain>`
    # polyhub subscribes to the presence of the devices it knows when it logs in.
    restart(polyhub)
    api = polyhub.api
    logged_in(polyhub)
    assert presence(api, "dev1")["online"] is False

    device = devices(prosody, device_jid, DEVICE_PASSWORD, hub_jid)
    wait_online(api, "dev1", True)

    # A command with wait_ms: the receipt marks it delivered, the reply acknowledges it.
    command = api.post("/devices/dev1/commands", {"name": "reboot", "payload": {"delay": 5}, "wait_ms": 8000})
    assert command["state"] == "acknowledged", command
    assert command["protocol"] == "xmpp"
    assert command["reply"] == {"echo": "reboot", "payload": {"delay": 5}}
    assert command["reason"] is None
    assert command["attempts"] == 1
    times = [command[k] for k in ("created_at", "sent_at", "delivered_at", "acknowledged_at")]
    assert None not in times and times == sorted(times), command
    # What the device saw: the hub-style JSON body, the command id as the message id.
    assert device.wait_commands(1) == [{"id": command["id"], "name": "reboot", "payload": {"delay": 5}}]

    # A device-side error fails the command with the device's reason.
    failed = api.post("/devices/dev1/commands", {"name": "fail", "wait_ms": 8000})
    assert failed["state"] == "failed", failed
    assert failed["reason"] == "asked to fail"

    # Telemetry: a JSON chat message without "id"/"status", decoded like the hub's json decoder.
    device.telemetry({"temperature": 21.5, "door": {"open": True}, "label": "hall"})
    latest = wait_until(
        lambda: (lambda rows: rows if len(rows) == 3 else None)(
            {row["signal"]: row["value"] for row in api.get("/devices/dev1/telemetry/latest")["items"]}
        ),
        "dev1's telemetry in GET /devices/dev1/telemetry/latest",
    )
    assert latest == {"temperature": 21.5, "door.open": True, "label": "hall"}

    # Offline: a logged-out device is reported offline, and commands wait queued for it.
    device.quit()
    wait_online(api, "dev1", False)
    queued = [
        api.post("/devices/dev1/commands", {"name": "led", "payload": "on"}),
        api.post("/devices/dev1/commands", {"name": "led", "payload": "off"}),
    ]
    assert [c["state"] for c in queued] == ["queued", "queued"]
    waited = api.post("/devices/dev1/commands", {"name": "led", "payload": "blink", "wait_ms": 1000})
    assert waited["state"] == "queued" and waited["sent_at"] is None, waited
    queued.append(waited)

    # Back online: they go out in order and are acknowledged with the device's replies.
    device = devices(prosody, device_jid, DEVICE_PASSWORD, hub_jid)
    wait_online(api, "dev1", True)
    for sent in queued:
        done = command_in_state(api, sent["id"], "acknowledged", "failed", "expired", "cancelled")
        assert done["state"] == "acknowledged", done
        assert done["reply"] == {"echo": "led", "payload": sent["payload"]}
        assert done["delivered_at"] is not None and done["attempts"] == 1, done
    assert [c["id"] for c in device.wait_commands(3)] == [c["id"] for c in queued]

    # A dropped connection (no unavailable presence from the device itself) is noticed too.
    device.kill()
    wait_online(api, "dev1", False)


def test_a_device_added_while_polyhub_is_logged_in_comes_online_and_gets_commands(prosody, hub_factory, devices):
    """The plain order of things: polyhub is logged in, then the device is added through the
    API and comes online. (Fails while polyhub subscribes to device presence only at login:
    see "Not there yet" in docs/commands.md.)"""
    hub_jid = prosody.register("hub", HUB_PASSWORD)
    polyhub = hub_factory(xmpp_polyglot_config(prosody, hub_jid, HUB_PASSWORD))
    api = polyhub.api
    logged_in(polyhub)
    # Added through the API after polyhub logged in, with its JID in the metadata.
    device_jid = prosody.register("lamp", DEVICE_PASSWORD)
    hub_with_xmpp_device(api, "d2", metadata={"jid": device_jid})
    queued = api.post("/devices/d2/commands", {"name": "led", "payload": "on"})
    assert queued["state"] == "queued"

    devices(prosody, device_jid, DEVICE_PASSWORD, hub_jid)
    wait_online(api, "d2", True)
    done = command_in_state(api, queued["id"], "acknowledged", "failed", "expired", "cancelled")
    assert done["state"] == "acknowledged", done
    assert done["reply"] == {"echo": "led", "payload": "on"}


def test_device_accounts_are_created_and_removed_through_the_api(prosody, hub_factory, devices):
    """`POST /devices/{id}/account` registers the device's XMPP account (in-band registration)
    and shows its password once; the device logs in with it and is seen online; `DELETE`
    removes the account through the server's admin command (the hub's account is an admin)."""
    hub_jid = prosody.register("hub", HUB_PASSWORD)
    polyhub = hub_factory(xmpp_polyglot_config(prosody, hub_jid, HUB_PASSWORD))
    api = polyhub.api
    logged_in(polyhub)
    hub_with_xmpp_device(api, "d3")
    account = api.post("/devices/d3/account")
    assert account["username"] == f"d3@{XMPP_DOMAIN}", account
    assert len(account["password"]) >= 16
    assert_refused(lambda: api.post("/devices/d3/account"), 409, "conflict")

    device = devices(prosody, account["username"], account["password"], hub_jid)
    wait_online(api, "d3", True)
    queued = api.post("/devices/d3/commands", {"name": "ping"})
    done = command_in_state(api, queued["id"], "acknowledged", "failed", "expired", "cancelled")
    assert done["state"] == "acknowledged", done
    device.kill()
    wait_online(api, "d3", False)

    assert api.delete("/devices/d3/account") is None
    assert_refused(lambda: api.delete("/devices/d3/account"), 409, "conflict")
    # The name is free again: a new account, with a new password.
    again = api.post("/devices/d3/account")
    assert again["username"] == account["username"] and again["password"] != account["password"]
    # MQTT devices have no accounts: a 400 that says so.
    api.add_device("m1", "h")
    error = assert_refused(lambda: api.post("/devices/m1/account"), 400, "invalid_request")
    assert "does not manage device accounts" in error.message, error.message


def assert_refused(call, status: int, code: str) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call()
    assert (caught.value.status, caught.value.code) == (status, code), caught.value.message
    return caught.value


def test_a_device_registered_on_the_register_channel_is_followed_at_once(prosody, hub_factory, devices):
    """An XMPP device added through `/<hub>/register_cmd` (not the API) while polyhub is logged
    in comes online and gets its commands without polyhub logging in again."""
    hub_jid = prosody.register("hub", HUB_PASSWORD)
    polyhub = hub_factory(xmpp_polyglot_config(prosody, hub_jid, HUB_PASSWORD))
    api = polyhub.api
    logged_in(polyhub)
    api.add_group("g")
    api.add_hub("h", "g")
    device_jid = prosody.register("valve", DEVICE_PASSWORD)
    control = MqttClient(polyhub.mqtt_port, "installer")
    control.publish("/h/register_cmd", json.dumps({
        "action": "add", "device": "v1", "protocol": "xmpp", "metadata": {"jid": device_jid},
    }))
    control.close()
    wait_until(lambda: api.get("/devices/v1")["protocol"] == "xmpp", "v1 registered")
    queued = api.post("/devices/v1/commands", {"name": "open"})

    devices(prosody, device_jid, DEVICE_PASSWORD, hub_jid)
    wait_online(api, "v1", True)
    done = command_in_state(api, queued["id"], "acknowledged", "failed", "expired", "cancelled")
    assert done["state"] == "acknowledged", done


def test_component_mode_presence_commands_telemetry_and_accounts(component_prosody, hub_factory, devices):
    """`mode = "component"`: polyhub is `hub.localhost` (XEP-0114), not an account. The device's
    account is created through the API over a client connection, the device approves the
    component's presence subscription and is seen online and offline, commands are acknowledged
    after their receipt or failed by the device, telemetry arrives, and removing the account
    is refused (no admin account in component mode)."""
    prosody = component_prosody
    polyhub = hub_factory(component_polyglot_config(prosody))
    api = polyhub.api
    logged_in(polyhub)
    hub_with_xmpp_device(api, "c1")
    account = api.post("/devices/c1/account")
    assert account["username"] == f"c1@{XMPP_DOMAIN}", account
    assert presence(api, "c1")["online"] is False

    # The device talks to the component's domain; it approves the subscription request that
    # waited for it at the server, and its presence reaches polyhub.
    device = devices(prosody, account["username"], account["password"], COMPONENT)
    wait_online(api, "c1", True)

    command = api.post("/devices/c1/commands", {"name": "reboot", "payload": {"delay": 5}, "wait_ms": 8000})
    assert command["state"] == "acknowledged", command
    assert command["reply"] == {"echo": "reboot", "payload": {"delay": 5}}
    times = [command[k] for k in ("created_at", "sent_at", "delivered_at", "acknowledged_at")]
    assert None not in times and times == sorted(times), command
    assert device.wait_commands(1) == [{"id": command["id"], "name": "reboot", "payload": {"delay": 5}}]

    failed = api.post("/devices/c1/commands", {"name": "fail", "wait_ms": 8000})
    assert failed["state"] == "failed", failed
    assert failed["reason"] == "asked to fail"

    device.telemetry({"temperature": 19.5})
    wait_until(
        lambda: {row["signal"]: row["value"] for row in api.get("/devices/c1/telemetry/latest")["items"]}
        == {"temperature": 19.5},
        "c1's telemetry in GET /devices/c1/telemetry/latest",
    )

    device.kill()
    wait_online(api, "c1", False)
    # Only an admin account may delete accounts: refused, and the account is still there.
    refused = assert_refused(lambda: api.delete("/devices/c1/account"), 400, "invalid_request")
    assert "component" in refused.message, refused.message
    assert_refused(lambda: api.post("/devices/c1/account"), 409, "conflict")
