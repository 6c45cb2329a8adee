from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.gate.deployment import (
    IS_ROOT,
    RELAY_PASSWORD,
    RELAY_USER,
    Deployment,
    Interpreter,
    Users,
    build_ledger_template,
    create_users,
    find_interpreter,
)
from tests.support.upstream import SmtpUpstream

needs_users = pytest.mark.skipif(not IS_ROOT, reason="separate Unix users need root (CI runs as root)")


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
               ledger_template: Path) -> Iterator[Deployment]:
    """Files, config and ledger in place; the gate not yet started."""
    built = Deployment(users, interpreter, relay.port, ca.cert_pem.bytes())
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
