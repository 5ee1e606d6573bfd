"""Start and stop the broker under test: polyhub or Mosquitto, with the same vocabulary of limits.

Limits are always named as in polyhub's `[mqtt.limits]` (crates/polyhub-broker/src/config.rs); for
Mosquitto they are translated to the equivalent `mosquitto.conf` options, so a test states what it
needs once and runs against either broker.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

# polyhub limit name -> (mosquitto option, True if the option belongs to a listener block).
# Options without a Mosquitto equivalent map to None and are only honoured by polyhub.
MOSQUITTO_LIMITS = {
    "max_queued_messages": ("max_queued_messages", False),
    "max_inflight": ("max_inflight_messages", False),
    # `max_packet_size` is Mosquitto's whole-packet bound (what polyhub means);
    # `message_size_limit` only bounds the payload.
    "max_packet_size": ("max_packet_size", False),
    "max_connections": ("max_connections", True),
    "sys_interval": ("sys_interval", False),
    "queue_qos0_messages": ("queue_qos0_messages", False),
    "max_keep_alive": ("max_keepalive", False),
    "topic_alias_maximum": ("max_topic_alias", True),
    # Mosquitto announces max_inflight_messages as its receive maximum; no separate knob.
    "receive_maximum": (None, False),
}

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
POLYHUB_READY = {
    "mqtt": re.compile(r"\bMQTT listening on \[?([0-9a-fA-F.:]+?)\]?:(\d+)"),
    "mqtts": re.compile(r"\bMQTTS listening on \[?([0-9a-fA-F.:]+?)\]?:(\d+)"),
}


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of the test PKI (see conftest's `pki` fixture)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    # A client certificate signed by a CA the broker does not trust.
    rogue_cert: Path
    rogue_key: Path


@dataclass(frozen=True)
class TlsSettings:
    """How the broker's TLS listener is set up."""

    files: TlsFiles
    require_client_cert: bool = False


class BrokerError(AssertionError):
    """The broker did not start or stop as expected (a test failure, never a skip)."""


def free_port() -> int:
    """A TCP port that was free a moment ago (Mosquitto cannot be asked to pick one itself)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class Broker:
    """One broker process of either kind.

    Attributes used by tests: `kind` ("polyhub" or "mosquitto"), `host`, `port`, `tls_port`
    (None without TLS), `limits` (the polyhub-named limits in force) and `restart(...)`.
    """

    def __init__(self, kind: str, workdir: Path, polyhub_bin: Optional[str]):
        if kind not in ("polyhub", "mosquitto"):
            raise ValueError(f"unknown broker kind {kind!r}")
        self.kind = kind
        self.host = HOST
        self.port: Optional[int] = None
        self.tls_port: Optional[int] = None
        self.limits: dict = {}
        self.tls: Optional[TlsSettings] = None
        self._workdir = workdir
        self._polyhub_bin = polyhub_bin
        self._process: Optional[subprocess.Popen] = None
        self._log_lines: list[str] = []
        self._log_lock = threading.Condition()
        self._reader: Optional[threading.Thread] = None
        self._generation = 0

    # ----- lifecycle -------------------------------------------------------------------------

    def start(self, limits: Optional[dict] = None, tls: Optional[TlsSettings] = None) -> "Broker":
        if self._process is not None:
            raise BrokerError("broker already running")
        unknown = set(limits or {}) - set(MOSQUITTO_LIMITS)
        if unknown:
            raise ValueError(f"unknown limits {sorted(unknown)}")
        self.limits = dict(limits or {})
        self.tls = tls
        self._generation += 1
        rundir = self._workdir / f"run{self._generation}"
        rundir.mkdir(parents=True, exist_ok=True)
        with self._log_lock:
            self._log_lines = []
        if self.kind == "polyhub":
            self._start_polyhub(rundir)
        else:
            self._start_mosquitto(rundir)
        return self

    def stop(self) -> None:
        """SIGTERM, then insist on a clean exit (status 0) within STOP_TIMEOUT seconds."""
        process = self._process
        if process is None:
            return
        self._process = None
        if process.poll() is not None:
            raise BrokerError(
                f"{self.kind} had already exited with status {process.returncode}\n{self.log_tail()}"
            )
        process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)
            raise BrokerError(
                f"{self.kind} did not exit within {STOP_TIMEOUT}s of SIGTERM\n{self.log_tail()}"
            )
        finally:
            if self._reader is not None:
                self._reader.join(timeout=2)
        if status != 0:
            raise BrokerError(f"{self.kind} exited with status {status} on SIGTERM\n{self.log_tail()}")

    def kill(self) -> None:
        """Hard stop without checks (used when a test already failed)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)

    def restart(self, tls: Optional[TlsSettings] = None, **limits) -> "Broker":
        """Stop cleanly, then start a fresh broker with these limits (and TLS settings).

        Sessions and retained messages do not survive: each start is a new, empty broker.
        """
        self.stop()
        return self.start(limits=limits, tls=tls)

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        with self._log_lock:
            tail = self._log_lines[-lines:]
        return f"--- last {len(tail)} lines of {self.kind} log ---\n" + "".join(tail)

    def log_text(self) -> str:
        with self._log_lock:
            return "".join(self._log_lines)

    # ----- polyhub ---------------------------------------------------------------------------

    def _start_polyhub(self, rundir: Path) -> None:
        if not self._polyhub_bin or not os.access(self._polyhub_bin, os.X_OK):
            raise BrokerError(
                f"polyhub binary not found or not executable: {self._polyhub_bin!r} "
                "(set POLYHUB_BIN, or build it with `cargo build -p polyhub`)"
            )
        data_dir = rundir / "data"
        data_dir.mkdir(exist_ok=True)
        args = [
            self._polyhub_bin,
            "run",
            "--mqtt-listen",
            f"{HOST}:0",
            "--http-listen",
            f"{HOST}:0",
            "--data-dir",
            str(data_dir),
        ]
        if self.limits:
            config = rundir / "polyhub.toml"
            body = "[mqtt.limits]\n" + "".join(
                f"{key} = {toml_value(value)}\n" for key, value in self.limits.items()
            )
            config.write_text(body)
            args += ["--config", str(config)]
        if self.tls is not None:
            files = self.tls.files
            args += [
                "--mqtts-listen",
                f"{HOST}:0",
                "--tls-cert",
                str(files.server_cert),
                "--tls-key",
                str(files.server_key),
            ]
            if self.tls.require_client_cert:
                args += ["--tls-ca", str(files.ca_cert), "--tls-require-client-cert"]
        # Only our flags and files configure the broker under test, never the caller's POLYHUB_*.
        env = {key: value for key, value in os.environ.items() if not key.startswith("POLYHUB_")}
        env["NO_COLOR"] = "1"
        self._spawn(args, env, rundir)
        wanted = ["mqtt"] + (["mqtts"] if self.tls is not None else [])
        found = self._wait_for_log(lambda text: all(POLYHUB_READY[k].search(text) for k in wanted))
        self.port = int(POLYHUB_READY["mqtt"].search(found).group(2))
        self.tls_port = (
            int(POLYHUB_READY["mqtts"].search(found).group(2)) if self.tls is not None else None
        )

    # ----- mosquitto -------------------------------------------------------------------------

    def _start_mosquitto(self, rundir: Path) -> None:
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        last_error = ""
        # A port chosen by free_port() can be taken by someone else before Mosquitto binds it.
        for _attempt in range(3):
            self.port = free_port()
            self.tls_port = free_port() if self.tls is not None else None
            conf = rundir / "mosquitto.conf"
            conf.write_text(self._mosquitto_conf())
            self._spawn([mosquitto, "-c", str(conf)], dict(os.environ), rundir)
            try:
                self._wait_for_port(self.port)
                if self.tls_port is not None:
                    self._wait_for_port(self.tls_port)
                return
            except BrokerError as error:
                last_error = str(error)
                self.kill()
                if "Address already in use" not in self.log_text():
                    break
        raise BrokerError(last_error)

    def _mosquitto_conf(self) -> str:
        global_lines = [
            "per_listener_settings false",
            "allow_anonymous true",
            "persistence false",
            "log_dest stderr",
            "log_type all",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            # Mosquitto started as root drops to user "mosquitto", who cannot read pytest's
            # private temporary directories (the certificates); "root" means stay as we are.
            global_lines.append("user root")
        listener_lines = []
        for key, value in self.limits.items():
            option, per_listener = MOSQUITTO_LIMITS[key]
            if option is None:
                continue
            line = f"{option} {toml_value(value)}"
            (listener_lines if per_listener else global_lines).append(line)
        conf = global_lines + [f"listener {self.port} {HOST}"] + listener_lines
        if self.tls is not None:
            files = self.tls.files
            conf += [
                f"listener {self.tls_port} {HOST}",
                f"cafile {files.ca_cert}",
                f"certfile {files.server_cert}",
                f"keyfile {files.server_key}",
                f"require_certificate {'true' if self.tls.require_client_cert else 'false'}",
            ] + listener_lines
        return "\n".join(conf) + "\n"

    # ----- shared plumbing -------------------------------------------------------------------

    def _spawn(self, args: list[str], env: dict, rundir: Path) -> None:
        log_file = open(rundir / "broker.log", "a", encoding="utf-8", errors="replace")
        self._process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=rundir,
        )
        process = self._process

        def pump() -> None:
            # Keeps the pipe drained (a full pipe would block the broker) and the log searchable.
            assert process.stdout is not None
            for raw in iter(process.stdout.readline, b""):
                line = ANSI_ESCAPE.sub("", raw.decode("utf-8", errors="replace"))
                log_file.write(line)
                log_file.flush()
                with self._log_lock:
                    self._log_lines.append(line)
                    self._log_lock.notify_all()
            log_file.close()
            with self._log_lock:
                self._log_lock.notify_all()

        self._reader = threading.Thread(target=pump, name=f"{self.kind}-log", daemon=True)
        self._reader.start()

    def _wait_for_log(self, ready) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        with self._log_lock:
            while True:
                text = "".join(self._log_lines)
                if ready(text):
                    return text
                if self._process is None or self._process.poll() is not None:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._log_lock.wait(timeout=min(remaining, 0.2))
        status = None if self._process is None else self._process.poll()
        self.kill()
        raise BrokerError(
            f"{self.kind} did not report its listeners within {START_TIMEOUT}s "
            f"(exit status {status})\n{self.log_tail()}"
        )

    def _wait_for_port(self, port: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                break
            try:
                with socket.create_connection((HOST, port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.02)
        raise BrokerError(f"{self.kind} is not accepting on port {port}\n{self.log_tail()}")
