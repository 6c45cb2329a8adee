from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.gate.deployment import (
    IS_ROOT,
    LAUNCHER,
    PYTHON_CLIENT,
    RELAY_PASSWORD,
    RELAY_USER,
    Client,
    Deployment,
    Interpreter,
    Users,
    build_ledger_template,
    create_users,
    find_interpreter,
)
from tests.support import native
from tests.support.upstream import SmtpUpstream

needs_users = pytest.mark.skipif(not IS_ROOT, reason="separate Unix users need root (CI runs as root)")
# Every sendmail client a site may meet: the client tests run against each of them.
CLIENT_NAMES = ["python", "native", "native-asan"]


@pytest.fixture(scope="session")
def users() -> Iterator[Users]:
    created = create_users()
    try:
        yield created
    finally:
        created.remove()


@pytest.fixture(scope="session")
def interpreter(users: Users) -> Interpreter:
    return find_interpreter(users.a)


@pytest.fixture(scope="session")
def native_clients(interpreter: Interpreter) -> Iterator[dict[str, Client]]:
    """The native client built twice (plain, and with the sanitizers), in a place every user can run."""
    if not native.have_compiler():
        pytest.skip("the native client needs make and a C compiler (scripts/bootstrap installs them)")
    base = Path(tempfile.mkdtemp(prefix="shim-native-"))
    os.chmod(base, 0o755)
    try:
        front_end = base / "sendmail-front-end"  # what a package has in /usr/lib/sendmail-shim/sendmail
        front_end.write_text(f"#!{interpreter.executable}\n{LAUNCHER}")
        os.chmod(front_end, 0o755)
        plain = native.build(base / "plain", front_end)
        sanitized = native.build(base / "asan", front_end, sanitize=True)
        yield {"native": Client("native", plain),
               "native-asan": Client("native-asan", sanitized, dict(native.SANITIZER_ENV))}
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def client(native_clients: dict[str, Client]) -> Client:
    """The sendmail the deployment's sites run: the package's native one (test_client.py runs each)."""
    return native_clients["native"]


def pick_client(name: str, native_clients: dict[str, Client]) -> Client:
    return PYTHON_CLIENT if name == "python" else native_clients[name]


@pytest.fixture
def relay(ca: trustme.CA) -> Iterator[SmtpUpstream]:
    """The provider's upstream: STARTTLS, and AUTH with the gate's relay credentials."""
    with SmtpUpstream(ca, credentials=(RELAY_USER, RELAY_PASSWORD)) as server:
        yield server


@pytest.fixture
def open_relay(ca: trustme.CA) -> Iterator[SmtpUpstream]:
    """A relay that trusts the web server's address: AUTH is offered but not required."""
    with SmtpUpstream(ca, credentials=(RELAY_USER, RELAY_PASSWORD), trust_addresses=True) as server:
        yield server


@pytest.fixture(scope="session")
def ledger_template(users: Users, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_ledger_template(users, tmp_path_factory.mktemp("ledger-template"))


@pytest.fixture
def deployment(users: Users, interpreter: Interpreter, relay: SmtpUpstream, ca: trustme.CA,
               ledger_template: Path, client: Client, native_clients: dict[str, Client]) -> Iterator[Deployment]:
    """Files, config and ledger in place; the gate not yet started."""
    built = Deployment(users, interpreter, relay.port, ca.cert_pem.bytes(), client=client, native=native_clients)
    try:
        built.install_ledger(ledger_template)
        yield built
    finally:
        built.close()


@pytest.fixture
def gate(deployment: Deployment) -> Deployment:
    """The deployment with its gate running, handed the socket as systemd would."""
    deployment.start_gate()
    return deployment
