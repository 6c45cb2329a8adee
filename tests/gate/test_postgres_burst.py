"""A burst of callers through the gate with its ledger on PostgreSQL: every refusal is a limit."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.gate.conftest import needs_users
from tests.gate.deployment import Deployment, message
from tests.support.postgres import cluster_for_gate_user
from tests.support.upstream import SmtpUpstream

CALLERS = 100


@pytest.fixture
def pg_gate(deployment: Deployment) -> Iterator[Deployment]:
    """The gate's ledger in a PostgreSQL the gate's user reaches over its socket."""
    with cluster_for_gate_user() as cluster:
        deployment.configure("ledger", url=cluster.create_database("burst"))
        deployment.configure("gate", max_connections_per_uid=CALLERS)
        deployment.set_up_ledger()
        yield deployment


@needs_users
def test_a_hundred_callers_at_once_are_refused_by_their_limits_only(pg_gate: Deployment,
                                                                   relay: SmtpUpstream) -> None:
    pg_gate.start_gate()
    sites = [(pg_gate.users.a, "post@a.example"), (pg_gate.users.b, "post@b.example")]

    def send(number: int) -> str:
        user, sender = sites[number % 2]
        result = pg_gate.sendmail("-t", "-i", input=message(sender, subject=f"n{number}"), user=user,
                                  timeout=300)
        if result.code == 0:
            return "sent"
        return "limit" if "reached 25 messages per 5 minutes" in result.line else f"{result.code} {result.line}"

    with ThreadPoolExecutor(CALLERS) as pool:
        outcomes = Counter(pool.map(send, range(CALLERS)))
    # Each account may send 25 messages in 5 minutes: 50 sent, and the other 50 refused for that alone.
    assert outcomes == {"sent": 50, "limit": 50}
    assert len(relay.wait_for(50)) == 50
