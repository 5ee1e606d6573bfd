"""mosquitto_pub / mosquitto_sub (Debian's mosquitto-clients) driven as subprocesses."""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Optional

CLI_VERSIONS = {"v31": "mqttv31", "v311": "mqttv311", "v5": "mqttv5"}
# mosquitto_sub prints each message as one line in this format (-F); `@` and `%` are the only
# characters it interprets.
MESSAGE_FORMAT = "MSG|%t|%q|%r|%p"
# mosquitto_sub's exit status when -W expires (ETIMEDOUT in mosquitto-clients 2.0).
TIMED_OUT = 27


@dataclass
class CliMessage:
    topic: str
    qos: int
    retain: bool
    payload: str


def parse_message(line: str) -> Optional[CliMessage]:
    if not line.startswith("MSG|"):
        return None
    _tag, topic, qos, retain, payload = line.split("|", 4)
    return CliMessage(topic, int(qos), retain == "1", payload)


def connection_args(broker, version: str, tls_args: tuple = (), port: Optional[int] = None) -> list[str]:
    return ["-h", broker.host, "-p", str(port or broker.port), "-V", CLI_VERSIONS[version], *tls_args]


def mosquitto_pub(broker, version: str, topic: str, *args: str, tls_args: tuple = (),
                  port: Optional[int] = None, stdin: Optional[str] = None,
                  timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["mosquitto_pub", *connection_args(broker, version, tls_args, port), "-t", topic, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def publish_ok(broker, version: str, topic: str, *args: str, **kwargs) -> None:
    result = mosquitto_pub(broker, version, topic, *args, **kwargs)
    assert result.returncode == 0, f"mosquitto_pub failed ({result.returncode}): {result.stderr}"


class MosquittoSub:
    """A running mosquitto_sub; its output is read continuously by background threads."""

    def __init__(self, broker, version: str, topics: list[str], *args: str, tls_args: tuple = (),
                 port: Optional[int] = None, qos: int = 0):
        # stdbuf: mosquitto_sub's debug lines (our "subscribed" signal) are block-buffered on a pipe.
        command = ["stdbuf", "-oL", "mosquitto_sub", *connection_args(broker, version, tls_args, port),
                   "-q", str(qos), "-d", "-F", MESSAGE_FORMAT, *args]
        for topic in topics:
            command += ["-t", topic]
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.all_lines: list[str] = []
        self.stderr: list[str] = []
        self._subscribed = threading.Event()
        self._stdout_reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._stdout_reader.start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self.all_lines.append(line)
            if "received SUBACK" in line:
                self._subscribed.set()
            self.lines.put(line)

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self.stderr.append(line)

    def wait_subscribed(self, timeout: float = 5) -> "MosquittoSub":
        if not self._subscribed.wait(timeout):
            self.kill()
            raise AssertionError(
                f"mosquitto_sub got no SUBACK within {timeout}s: {self.all_lines} {self.stderr}")
        return self

    def next_message(self, timeout: float = 5) -> CliMessage:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                raise AssertionError(
                    f"mosquitto_sub printed no message within {timeout}s: {self.all_lines}") from None
            message = parse_message(line)
            if message is not None:
                return message

    def wait_exit(self, timeout: float = 10) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"mosquitto_sub still running after {timeout}s: {self.all_lines}")

    def messages(self) -> list[CliMessage]:
        """Every message printed so far; after the process ended, all it ever printed."""
        if self.process.poll() is not None:
            self._stdout_reader.join(timeout=2)
        return [m for m in map(parse_message, list(self.all_lines)) if m is not None]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)
