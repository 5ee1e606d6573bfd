"""Fixtures of the interop suite: the broker under test (polyhub or Mosquitto), a test PKI, and a
per-test time bound.

Choose the broker with `--broker=polyhub|mosquitto` or INTEROP_BROKER (default polyhub).
polyhub is found through POLYHUB_BIN, else `target/debug/polyhub` of this repository.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from interop_brokers import Broker, TlsFiles, TlsSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
# Upper bound for any single test, set-up and tear-down included: a hung broker must fail the
# test, never hang the suite.
TEST_TIME_LIMIT = 60


def pytest_addoption(parser):
    parser.addoption(
        "--broker",
        choices=["polyhub", "mosquitto"],
        default=os.environ.get("INTEROP_BROKER", "polyhub"),
        help="broker under test (default: $INTEROP_BROKER or polyhub)",
    )


def pytest_report_header(config):
    kind = config.getoption("--broker")
    where = polyhub_binary() if kind == "polyhub" else "mosquitto from PATH"
    return f"interop broker: {kind} ({where})"


def polyhub_binary() -> str:
    return os.environ.get("POLYHUB_BIN") or str(REPO_ROOT / "target" / "debug" / "polyhub")


@pytest.fixture(scope="session")
def broker_kind(request) -> str:
    return request.config.getoption("--broker")


@pytest.fixture(autouse=True)
def time_limit():
    """Fail (not hang) any test that outlives TEST_TIME_LIMIT seconds."""

    def expired(_signum, _frame):
        raise TimeoutError(f"test exceeded {TEST_TIME_LIMIT}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TEST_TIME_LIMIT)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def broker_factory(broker_kind, tmp_path):
    """Start brokers of the selected kind; each one is stopped (and must exit 0) at tear-down."""
    started: list[Broker] = []

    def start(limits: dict | None = None, tls: TlsSettings | None = None) -> Broker:
        broker = Broker(broker_kind, tmp_path / f"broker{len(started)}", polyhub_binary())
        started.append(broker)
        return broker.start(limits=limits, tls=tls)

    yield start
    errors = []
    for broker in started:
        try:
            broker.stop()
        except AssertionError as error:
            errors.append(str(error))
        finally:
            broker.kill()
    for broker in started:
        # Shown by pytest only when the test failed: the broker's side of the story.
        print(broker.log_tail(40))
    if errors:
        pytest.fail("\n".join(errors))


@pytest.fixture
def broker(broker_factory) -> Broker:
    """A fresh broker with default limits for this test (call `broker.restart(**limits)`)."""
    return broker_factory()


# ----- TLS ---------------------------------------------------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


def make_key(directory: Path, name: str) -> Path:
    key = directory / f"{name}.key"
    # genpkey writes PKCS#8 directly, which every TLS stack here reads.
    openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key.name,
        cwd=directory,
    )
    return key


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = make_key(directory, name), directory / f"{name}.crt"
    config = directory / f"{name}.cnf"
    config.write_text(
        "[req]\ndistinguished_name = dn\nprompt = no\n"
        f"[dn]\nCN = polyhub interop {name}\n"
        "[v3]\nbasicConstraints = critical,CA:TRUE\n"
        "keyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n"
    )
    openssl(
        "req", "-x509", "-new", "-key", key.name, "-sha256", "-days", "30",
        "-config", config.name, "-extensions", "v3", "-out", cert.name, cwd=directory,
    )
    return cert, key


def make_leaf(directory: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    ca_cert, ca_key = ca
    key = make_key(directory, name)
    csr, cert = directory / f"{name}.csr", directory / f"{name}.crt"
    ext = directory / f"{name}.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyAgreement\n"
        "authorityKeyIdentifier=keyid\n" + extensions
    )
    openssl("req", "-new", "-key", key.name, "-subj", f"/CN={name}", "-out", csr.name, cwd=directory)
    openssl(
        "x509", "-req", "-in", csr.name, "-CA", str(ca_cert), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "30", "-sha256", "-extfile", ext.name, "-out", cert.name,
        cwd=directory,
    )
    return cert, key


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a client
    certificate from an untrusted CA: EC P-256 keys in PKCS#8 PEM, v3 extensions that both
    OpenSSL and rustls/webpki accept."""
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory, "ca")
    server_cert, server_key = make_leaf(
        directory, "server", ca,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    client_cert, client_key = make_leaf(
        directory, "client", ca, "extendedKeyUsage=clientAuth\n"
    )
    rogue_ca = make_ca(directory, "rogue-ca")
    rogue_cert, rogue_key = make_leaf(
        directory, "rogue-client", rogue_ca, "extendedKeyUsage=clientAuth\n"
    )
    return TlsFiles(
        ca_cert=ca[0],
        server_cert=server_cert,
        server_key=server_key,
        client_cert=client_cert,
        client_key=client_key,
        rogue_cert=rogue_cert,
        rogue_key=rogue_key,
    )
