"""Helpers of the hub suite: one `polyhub run` process with its MQTT and HTTP listeners, a
urllib client of its REST API, paho devices and control clients, and bounded polling.

Only the standard library and paho-mqtt 1.x are used.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional

import paho.mqtt.client as mqtt

HOST = "127.0.0.1"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
# Default bound of every wait for something asynchronous (ingest, presence, a reply).
WAIT = 10.0

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
LISTENING = {
    "mqtt": re.compile(r"\bMQTT listening on \[?([0-9a-fA-F.:]+?)\]?:(\d+)"),
    "http": re.compile(r"\bHTTP listening on \[?([0-9a-fA-F.:]+?)\]?:(\d+)"),
}


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = WAIT, interval: float = 0.05):
    """Polls `predicate` until it returns something truthy (which is returned) or fails the test
    after `timeout` seconds, naming `what` it was waiting for."""
    deadline = time.monotonic() + timeout
    last_error: Optional[BaseException] = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except (ApiError, OSError) as error:  # not ready yet: keep polling, report it at the end
            last_error = error
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)


# ----- the polyhub process ---------------------------------------------------------------------


class PolyhubError(AssertionError):
    """polyhub did not start or stop as expected (a test failure, never a skip)."""


class Polyhub:
    """One `polyhub run` with its own data directory and free ports.

    Attributes: `mqtt_port`, `http_url` (e.g. `http://127.0.0.1:41281`), `api` (an [`Api`]),
    `binary`, `data_dir`.
    """

    def __init__(self, binary: str, workdir: Path, config: Optional[str] = None):
        self.binary = binary
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.config = config
        self.mqtt_port: Optional[int] = None
        self.http_url: Optional[str] = None
        self.api: Optional[Api] = None
        self._process: Optional[subprocess.Popen] = None
        self._lines: list[str] = []
        self._lock = threading.Condition()
        self._reader: Optional[threading.Thread] = None

    def start(self) -> "Polyhub":
        if not os.access(self.binary, os.X_OK):
            raise PolyhubError(
                f"polyhub binary not found or not executable: {self.binary!r} "
                "(set POLYHUB_BIN, or build it with `cargo build -p polyhub`)"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary, "run",
            "--mqtt-listen", f"{HOST}:0",
            "--http-listen", f"{HOST}:0",
            "--data-dir", str(self.data_dir),
        ]
        if self.config is not None:
            config_file = self.workdir / "polyhub.toml"
            config_file.write_text(self.config)
            args += ["--config", str(config_file)]
        # Only our flags configure the polyhub under test, never the caller's POLYHUB_*.
        env = {k: v for k, v in os.environ.items() if not k.startswith("POLYHUB_") and k != "RUST_LOG"}
        env["NO_COLOR"] = "1"
        log_file = open(self.workdir / "polyhub.log", "a", encoding="utf-8", errors="replace")
        self._process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=env, cwd=self.workdir,
        )
        process = self._process

        def pump() -> None:
            assert process.stdout is not None
            for raw in iter(process.stdout.readline, b""):
                line = ANSI_ESCAPE.sub("", raw.decode("utf-8", errors="replace"))
                log_file.write(line)
                log_file.flush()
                with self._lock:
                    self._lines.append(line)
                    self._lock.notify_all()
            log_file.close()
            with self._lock:
                self._lock.notify_all()

        self._reader = threading.Thread(target=pump, name="polyhub-log", daemon=True)
        self._reader.start()
        text = self._wait_for_log(lambda t: all(p.search(t) for p in LISTENING.values()))
        self.mqtt_port = int(LISTENING["mqtt"].search(text).group(2))
        http = LISTENING["http"].search(text)
        self.http_url = f"http://{http.group(1)}:{http.group(2)}"
        self.api = Api(self.http_url)
        wait_until(lambda: self.api.get("/ready").get("status") == "ready", "GET /ready")
        return self

    def stop(self) -> None:
        """SIGTERM, then insist on a clean exit (status 0) within STOP_TIMEOUT seconds."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is not None:
            raise PolyhubError(f"polyhub had already exited with {process.returncode}\n{self.log_tail()}")
        process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)
            raise PolyhubError(f"polyhub did not exit within {STOP_TIMEOUT}s of SIGTERM\n{self.log_tail()}")
        finally:
            if self._reader is not None:
                self._reader.join(timeout=2)
        if status != 0:
            raise PolyhubError(f"polyhub exited with status {status} on SIGTERM\n{self.log_tail()}")

    def kill(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)

    def log_text(self) -> str:
        with self._lock:
            return "".join(self._lines)

    def log_tail(self, lines: int = 60) -> str:
        with self._lock:
            tail = self._lines[-lines:]
        return f"--- last {len(tail)} lines of the polyhub log ---\n" + "".join(tail)

    def _wait_for_log(self, ready: Callable[[str], bool]) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        with self._lock:
            while True:
                text = "".join(self._lines)
                if ready(text):
                    return text
                if self._process is None or self._process.poll() is not None:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._lock.wait(timeout=min(remaining, 0.2))
        status = None if self._process is None else self._process.poll()
        self.kill()
        raise PolyhubError(
            f"polyhub did not report its MQTT and HTTP listeners within {START_TIMEOUT}s "
            f"(exit status {status})\n{self.log_tail()}"
        )

    # ----- the CLI against this polyhub -------------------------------------------------------

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Runs `polyhub ARGS --api <this polyhub>` and returns the completed process (text)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("POLYHUB_")}
        env["NO_COLOR"] = "1"
        return subprocess.run(
            [self.binary, *args, "--api", self.http_url],
            capture_output=True, text=True, timeout=timeout, env=env,
        )


# ----- the REST API ----------------------------------------------------------------------------


class ApiError(Exception):
    """A non-2xx answer: `status`, `code` and `message` of the error document, `body` raw."""

    def __init__(self, method: str, path: str, status: int, body: bytes):
        self.status = status
        self.body = body
        try:
            document = json.loads(body)
            self.code = document["error"]["code"]
            self.message = document["error"]["message"]
        except (ValueError, KeyError, TypeError):
            self.code = None
            self.message = body.decode("utf-8", errors="replace")
        super().__init__(f"{method} {path} -> HTTP {status}: {self.code}: {self.message}")


class Api:
    """A urllib client of polyhub's REST API. Methods return the decoded JSON (None for 204)
    and raise ApiError for any non-2xx status."""

    def __init__(self, base: str):
        self.base = base.rstrip("/")

    def request(self, method: str, path: str, body: Any = None, raw: Optional[bytes] = None,
                query: Optional[dict] = None, timeout: float = 30.0):
        status, data, _headers = self.request_raw(method, path, body, raw, query, timeout)
        if not data:
            return None
        return json.loads(data)

    def request_raw(self, method: str, path: str, body: Any = None, raw: Optional[bytes] = None,
                    query: Optional[dict] = None, timeout: float = 30.0):
        url = self.base + path
        if query:
            present = {k: v for k, v in query.items() if v is not None}
            url += "?" + urllib.parse.urlencode(present)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as error:
            raise ApiError(method, path, error.code, error.read()) from None

    def get(self, path: str, **query):
        return self.request("GET", path, query=query or None)

    def post(self, path: str, body: Any = None):
        return self.request("POST", path, body=body)

    def patch(self, path: str, body: Any):
        return self.request("PATCH", path, body=body)

    def delete(self, path: str):
        return self.request("DELETE", path)

    def text(self, path: str) -> str:
        _status, data, _headers = self.request_raw("GET", path)
        return data.decode()

    # ----- shortcuts ------------------------------------------------------------------------

    def add_group(self, group_id: str, **fields):
        return self.post("/groups", {"id": group_id, **fields})

    def add_hub(self, hub_id: str, group_id: str, **settings):
        """Creates a hub; `settings` are HubSettings fields (decoder, channels, isolation)."""
        body = {"id": hub_id, "group_id": group_id}
        if settings:
            body["settings"] = settings
        return self.post("/hubs", body)

    def add_device(self, device_id: str, hub_id: str, **fields):
        return self.post("/devices", {"id": device_id, "hub_id": hub_id, **fields})

    def all_rows(self, device_id: str, **query) -> list[dict]:
        """Every stored row of a device (following the range cursors), oldest first."""
        rows: list[dict] = []
        after = None
        for _page in range(1000):
            page = self.get(f"/devices/{device_id}/telemetry", limit=10000, after=after, **query)
            rows.extend(page["rows"])
            after = page["next"]
            if after is None:
                return rows
        raise AssertionError(f"range of {device_id} did not end after 1000 pages")

    def parser(self, hub_id: str) -> dict:
        return self.get(f"/hubs/{hub_id}/parser")

    def dead_letters(self, hub_id: str) -> list[dict]:
        return self.get("/dead-letters", hub=hub_id, limit=1000)["items"]


# ----- MQTT clients ----------------------------------------------------------------------------


class MqttClient:
    """A paho client connected to polyhub that records what it receives.

    `protocol` is mqtt.MQTTv311 (default) or mqtt.MQTTv5.
    """

    def __init__(self, port: int, client_id: str, protocol=mqtt.MQTTv311, clean: bool = True):
        self.client_id = client_id
        self.protocol = protocol
        if protocol == mqtt.MQTTv5:
            self.client = mqtt.Client(client_id=client_id, protocol=protocol)
        else:
            self.client = mqtt.Client(client_id=client_id, protocol=protocol, clean_session=clean)
        self.messages: list[mqtt.MQTTMessage] = []
        self._lock = threading.Condition()
        self._connected = threading.Event()
        self._subscribed: dict[int, threading.Event] = {}
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.max_inflight_messages_set(100)
        self.client.connect(HOST, port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(WAIT):
            self.close()
            raise AssertionError(f"MQTT client {client_id} did not connect")

    def _on_connect(self, _client, _userdata, _flags, rc, _properties=None):
        if rc == 0:
            self._connected.set()

    def _on_subscribe(self, _client, _userdata, mid, _granted, _properties=None):
        event = self._subscribed.setdefault(mid, threading.Event())
        event.set()

    def _on_message(self, _client, _userdata, message):
        with self._lock:
            self.messages.append(message)
            self._lock.notify_all()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        result, mid = self.client.subscribe(topic, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS, f"subscribe {topic}: {result}"
        event = self._subscribed.setdefault(mid, threading.Event())
        assert event.wait(WAIT), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload, qos: int = 1, retain: bool = False, properties=None) -> None:
        """Publishes and, for QoS > 0, waits until polyhub acknowledged it."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish to {topic}: {info.rc}"
        if qos > 0:
            info.wait_for_publish(timeout=WAIT)
            assert info.is_published(), f"publish to {topic} was not acknowledged"

    def wait_message(self, predicate: Callable[[mqtt.MQTTMessage], bool], what: str,
                     timeout: float = WAIT, start: int = 0) -> mqtt.MQTTMessage:
        """The first received message (from index `start`) that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for message in self.messages[start:]:
                    if predicate(message):
                        return message
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"timed out waiting for {what}; received: " + ", ".join(
                    f"{m.topic}={m.payload[:200]!r}" for m in self.messages
                )
                self._lock.wait(timeout=min(remaining, 0.2))

    def count(self) -> int:
        with self._lock:
            return len(self.messages)

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


class Controller(MqttClient):
    """Sends control messages (register_cmd, hub_manager/cmd) and returns their JSON replies."""

    def __init__(self, port: int, client_id: str, reply_topics: list[str]):
        super().__init__(port, client_id)
        for topic in reply_topics:
            self.subscribe(topic)

    def command(self, topic: str, payload, reply_topic: str, timeout: float = WAIT) -> dict:
        """Publishes `payload` (a dict is sent as JSON; bytes/str as they are) and returns the
        next reply on `reply_topic`. Commands are sent one at a time, so the next reply is this
        command's reply (each control message gets exactly one)."""
        start = self.count()
        body = json.dumps(payload) if isinstance(payload, dict) else payload
        self.publish(topic, body)
        message = self.wait_message(lambda m: m.topic == reply_topic, f"a reply on {reply_topic}",
                                    timeout=timeout, start=start)
        return json.loads(message.payload)


def mosquitto_pub(port: int, topic: str, payload: str, qos: int = 1, client_id: Optional[str] = None) -> None:
    """Publishes one message with Mosquitto's own command-line client."""
    args = ["mosquitto_pub", "-h", HOST, "-p", str(port), "-q", str(qos), "-t", topic, "-m", payload]
    if client_id:
        args += ["-i", client_id]
    result = subprocess.run(args, capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 0, f"mosquitto_pub failed: {result.stderr}"


# ----- issue 5: restarts and command devices -----------------------------------------------------


def restart(server: Polyhub) -> Polyhub:
    """Stops `server` gracefully (SIGTERM, exit status 0 required) and starts it again on the
    same data directory and configuration; the ports change, so read them again afterwards.
    The log of the earlier run stays in `polyhub.log`; `log_text()` covers the new run only."""
    server.stop()
    with server._lock:
        # The earlier run's "listening" lines must not be taken for the new run's.
        server._lines = []
    return server.start()


class CommandDevice:
    """A hub-style device played by paho-mqtt 1.x: client id == device id, it subscribes its
    command topic at QoS 1 in `on_connect` (as a device does, CONNACK first), and records each
    command it receives, decoded, in arrival order (`commands`).

    `clean=False` keeps the MQTT session (and so the subscription) across connections.
    """

    def __init__(self, port: int, hub_id: str, device_id: str, clean: bool = True,
                 command_topic: Optional[str] = None, reply_topic: Optional[str] = None):
        self.device_id = device_id
        self.command_topic = command_topic or f"/{hub_id}/{device_id}/cmd"
        self.reply_topic = reply_topic or f"/{hub_id}/{device_id}/cmd_reply"
        self.commands: list[dict] = []
        self.raw: list[mqtt.MQTTMessage] = []
        self._lock = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(client_id=device_id, protocol=mqtt.MQTTv311, clean_session=clean)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(HOST, port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(WAIT):
            self.close()
            raise AssertionError(f"device {device_id} did not connect and subscribe {self.command_topic}")

    def _on_connect(self, client, _userdata, _flags, rc, _properties=None):
        if rc == 0:
            client.subscribe(self.command_topic, 1)

    def _on_message(self, _client, _userdata, message):
        with self._lock:
            self.raw.append(message)
            try:
                self.commands.append(json.loads(message.payload))
            except ValueError:
                self.commands.append({"undecodable": message.payload.decode("utf-8", "replace")})
            self._lock.notify_all()

    def wait_commands(self, count: int, timeout: float = WAIT) -> list[dict]:
        """The first `count` commands received, once that many arrived."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.commands) < count:
                remaining = deadline - time.monotonic()
                assert remaining > 0, (
                    f"device {self.device_id} received {len(self.commands)} commands, "
                    f"not {count}: {self.commands}"
                )
                self._lock.wait(timeout=min(remaining, 0.2))
            return list(self.commands[:count])

    def received(self) -> list[dict]:
        with self._lock:
            return list(self.commands)

    def reply(self, command_id: str, status: str = "ok", result: Any = None,
              reason: Optional[str] = None) -> None:
        """Answers a command by the hub channel's reply convention (QoS 1, acknowledged)."""
        body: dict = {"id": command_id, "status": status}
        if result is not None:
            body["result"] = result
        if reason is not None:
            body["reason"] = reason
        info = self.client.publish(self.reply_topic, json.dumps(body), qos=1)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published(), f"reply to {command_id} was not acknowledged"

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def command_in_state(api: Api, command_id: str, *states: str, timeout: float = WAIT) -> dict:
    """Polls `GET /commands/{id}` until the command is in one of `states`; returns it."""
    last: dict = {}

    def reached():
        last.update(api.get(f"/commands/{command_id}"))
        return dict(last) if last["state"] in states else None

    try:
        return wait_until(reached, f"command {command_id} in {states}", timeout=timeout)
    except AssertionError as error:
        raise AssertionError(f"{error}; last seen: {last}") from None


# ----- issue 5: XMPP (a Prosody server and slixmpp devices) --------------------------------------

XMPP_DOMAIN = "localhost"


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def require_slixmpp() -> None:
    """Fails (never skips) when this Python cannot run the slixmpp device script."""
    try:
        import slixmpp  # noqa: F401
    except ImportError:
        raise AssertionError(
            "slixmpp is not importable by this Python: the XMPP tests need it "
            "(python3 -m pip install slixmpp; scripts/test.sh installs it)"
        ) from None


class Prosody:
    """A Prosody on a free port of 127.0.0.1, in `workdir`, without TLS (loopback only) and with
    in-band registration enabled. `server` is `127.0.0.1:<port>`; `register()` creates accounts
    with prosodyctl. Missing prosody fails the test with what to install."""

    def __init__(self, workdir: Path):
        import shutil

        if not (shutil.which("prosody") and shutil.which("prosodyctl")):
            raise AssertionError(
                "prosody is not installed: the XMPP tests need it "
                "(apt-get install -y --no-install-recommends prosody; scripts/test.sh installs it)"
            )
        self.workdir = workdir
        self.port = free_port()
        self.server = f"{HOST}:{self.port}"
        self.config = workdir / "prosody.cfg.lua"
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        self.config.write_text(f"""
run_as_root = true
pidfile = "{workdir}/prosody.pid"
data_path = "{workdir}/data"
log = {{ info = "{workdir}/prosody.log" }}
interfaces = {{ "{HOST}" }}
c2s_ports = {{ {self.port} }}
s2s_ports = {{ }}
component_ports = {{ }}
http_ports = {{ }}
https_ports = {{ }}
modules_enabled = {{ "roster", "saslauth", "disco", "register", "offline", "ping", "adhoc", "admin_adhoc" }}
modules_disabled = {{ "s2s", "tls" }}
admins = {{ "hub@{XMPP_DOMAIN}" }}
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
allow_registration = true
min_seconds_between_registrations = 0
authentication = "internal_plain"
VirtualHost "{XMPP_DOMAIN}"
""")
        self._process: Optional[subprocess.Popen] = None

    def start(self) -> "Prosody":
        import socket

        log = open(self.workdir / "stdout.log", "ab")
        self._process = subprocess.Popen(
            ["prosody", "--config", str(self.config), "-F"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()

        def listening() -> bool:
            if self._process.poll() is not None:
                raise AssertionError(f"prosody exited with {self._process.returncode}\n{self.logs()}")
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return True
            except OSError:
                return False

        try:
            wait_until(listening, f"prosody listening on {self.server}")
        except AssertionError as error:
            self.stop()
            raise AssertionError(f"{error}\n{self.logs()}") from None
        return self

    def register(self, user: str, password: str) -> str:
        """Creates `user@localhost` and returns that JID."""
        result = subprocess.run(
            ["prosodyctl", "--config", str(self.config), "register", user, XMPP_DOMAIN, password],
            capture_output=True, text=True, timeout=WAIT,
        )
        assert result.returncode == 0, f"prosodyctl register {user} failed: {result.stdout}{result.stderr}"
        return f"{user}@{XMPP_DOMAIN}"

    def logs(self) -> str:
        texts = []
        for name in ("stdout.log", "prosody.log"):
            path = self.workdir / name
            if path.exists():
                texts.append(path.read_text(errors="replace")[-4000:])
        return "--- prosody logs ---\n" + "\n".join(texts)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT)


def xmpp_polyglot_config(prosody: Prosody, hub_jid: str, password: str, section: str = "xmpp") -> str:
    """A polyhub config file whose `[polyglot.<section>]` logs in to `prosody` as `hub_jid`."""
    return (
        f"[polyglot.{section}]\n"
        f'type = "xmpp"\n'
        f'jid = "{hub_jid}"\n'
        f'password = "{password}"\n'
        f'server = "{prosody.server}"\n'
        f'device_domain = "{XMPP_DOMAIN}"\n'
        f"allow_plaintext = true\n"
        f"send_timeout_ms = 3000\n"
    )


class XmppDevice:
    """tests/hub/xmpp_device.py, running as `jid`: it answers receipts and commands by itself;
    `commands` lists the command bodies it received, `telemetry()` makes it send a JSON chat
    message to the hub, `quit()` logs it out cleanly, `kill()` drops its connection."""

    SCRIPT = Path(__file__).resolve().parent / "xmpp_device.py"

    def __init__(self, prosody: Prosody, jid: str, password: str, hub_jid: str):
        import sys

        require_slixmpp()
        self.jid = jid
        self.commands: list[dict] = []
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._lock = threading.Condition()
        self._process = subprocess.Popen(
            [sys.executable, str(self.SCRIPT), jid, password, HOST, str(prosody.port), hub_jid],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self._reader = threading.Thread(target=self._pump, name=f"xmpp-device-{jid}", daemon=True)
        self._reader.start()
        if not self._ready.wait(WAIT):
            self.kill()
            raise AssertionError(f"the XMPP device {jid} did not log in within {WAIT}s:\n" + "".join(self.lines))

    def _pump(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            with self._lock:
                self.lines.append(line)
                if line.startswith("COMMAND "):
                    self.commands.append(json.loads(line[len("COMMAND "):]))
                self._lock.notify_all()
            if line.strip() == "READY":
                self._ready.set()

    def wait_commands(self, count: int, timeout: float = WAIT) -> list[dict]:
        """The first `count` command bodies received, once that many arrived."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.commands) < count:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"device {self.jid} received {self.commands}, not {count} commands"
                self._lock.wait(timeout=min(remaining, 0.2))
            return list(self.commands[:count])

    def _send_line(self, line: str) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write(line + "\n")
        self._process.stdin.flush()

    def telemetry(self, values: dict) -> None:
        self._send_line("telemetry " + json.dumps(values))

    def quit(self) -> None:
        """Unavailable presence and a closed stream, then the script exits (bounded)."""
        if self._process.poll() is None:
            self._send_line("quit")
            try:
                self._process.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"the XMPP device {self.jid} did not exit after quit") from None

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=STOP_TIMEOUT)


# ----- restarting polyhub on the same data directory (durability tests) ------------------------


def restart_polyhub(server: Polyhub) -> Polyhub:
    """Stops `server` gracefully (SIGTERM; a non-zero exit fails the test) and starts a new
    `polyhub run` on the same working and data directories with the same configuration. Its
    ports are new (port 0 again). The caller stops the returned one."""
    server.stop()
    return Polyhub(server.binary, server.workdir, config=server.config).start()
