"""The gate's hot path: it answers once the outcome is durable, and keeps a secured connection ready."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trustme

from sendmail_shim.config import load
from sendmail_shim.gate.recorder import Recorder
from sendmail_shim.invocation import parse_argv
from sendmail_shim.pipeline import Caller, Runtime, decide
from tests.gate.deployment import RELAY_PASSWORD, RELAY_USER, Deployment, message
from tests.support.shim import Shim
from tests.support.upstream import SmtpUpstream


@pytest.fixture
def relay(ca: trustme.CA, request: pytest.FixtureRequest) -> Iterator[SmtpUpstream]:
    """The provider's upstream (STARTTLS, AUTH); a parameter sets how soon it drops an idle connection."""
    idle_timeout = getattr(request, "param", None)
    with SmtpUpstream(ca, credentials=(RELAY_USER, RELAY_PASSWORD), idle_timeout=idle_timeout) as server:
        yield server


def _states(ledger: sqlite3.Connection) -> list[str]:
    return [row[0] for row in ledger.execute("SELECT state FROM sends ORDER BY id")]


def test_the_gate_answers_before_it_settles_and_records(deployment: Deployment, relay: SmtpUpstream) -> None:
    """The upstream's 250 and the committed reservation are enough: the site is not kept waiting for the rest."""
    deployment.start_gate()
    ledger = sqlite3.connect(deployment.ledger_path, timeout=10, isolation_level=None, check_same_thread=False)
    held = threading.Event()

    def hold_the_ledger() -> None:  # from the moment the upstream has the message, nobody may write
        ledger.execute("BEGIN IMMEDIATE")
        held.set()

    relay.script.on_data = hold_the_ledger
    try:
        result = deployment.sendmail("-t", "-i", input=message(), timeout=8)
        assert held.is_set() and (result.code, result.line) == (0, "")
        assert len(relay.received) == 1
        assert _states(ledger) == ["reserved"]  # committed before the relay: it counts already
        assert ledger.execute("SELECT count(*) FROM decisions").fetchone() == (0,)  # recorded only later
        usage = deployment.admin("usage", "--account", "post@a.example", "--json")
        assert '"used": 1' in usage.stdout.decode()
    finally:
        ledger.execute("COMMIT")
    assert "verdict=sent" in deployment.wait_for_log("verdict=sent")
    deadline = time.monotonic() + 10
    while _states(ledger) != ["sent"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _states(ledger) == ["sent"]
    assert ledger.execute("SELECT verdict FROM decisions").fetchall() == [("sent",)]
    ledger.close()


def test_a_secured_connection_is_ready_before_the_first_message(deployment: Deployment, relay: SmtpUpstream) -> None:
    deployment.start_gate()
    deadline = time.monotonic() + 10
    # At start the gate also asks the relay, without AUTH, whether it refuses strangers; the
    # connection kept ready is the one that authenticated.
    while len(relay.auth_attempts) < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (len(relay.auth_attempts), relay.received) == (1, [])  # TLS and AUTH done, nothing sent
    for number in range(3):
        assert deployment.sendmail("-t", "-i", input=message(subject=f"n{number}")).code == 0
    assert [m.headers["subject"] for m in relay.wait_for(3)] == [["n0"], ["n1"], ["n2"]]
    assert len(relay.auth_attempts) == 1  # all three on the connection that was ready
    assert all(m.tls and m.authenticated for m in relay.received)


@pytest.mark.parametrize("relay", [0.3], indirect=True)
def test_a_connection_the_upstream_dropped_while_idle_costs_no_message(deployment: Deployment,
                                                                       relay: SmtpUpstream) -> None:
    """Reused without a probe, the dropped connection fails at MAIL: a fresh one sends the message, once."""
    deployment.start_gate()
    assert deployment.sendmail("-t", "-i", input=message(subject="first")).code == 0
    time.sleep(0.8)  # the upstream has dropped the idle connection; the gate last heard from it < 2 s ago
    result = deployment.sendmail("-t", "-i", input=message(subject="second"))
    assert (result.code, result.line) == (0, "")
    assert [m.headers["subject"] for m in relay.wait_for(2)] == [["first"], ["second"]]
    verdicts = [line for line in deployment.log_lines() if "verdict=" in line]
    assert len(verdicts) == 2 and all("verdict=sent" in line for line in verdicts)  # sent, not queued
    assert deployment.admin("queue", "list", "--json").stdout.strip() in (b"[]", b"")


def test_bookkeeping_waiting_together_shares_one_commit(shim: Shim, upstream: SmtpUpstream) -> None:
    """Five messages answered while the ledger is busy: all recorded once it frees, in two commits at most."""
    config = load(str(shim.config_path))
    runtime = Runtime(config)
    commits: list[int] = []
    settle_and_record_all = runtime.ledger.settle_and_record_all

    def counted(items: list[Any], *outcomes: Any) -> None:  # the real call, counted
        commits.append(len(items))
        settle_and_record_all(items, *outcomes)

    runtime.ledger.settle_and_record_all = counted  # type: ignore[method-assign]
    caller = Caller.current()
    answered = [decide(parse_argv(["-t", "-i"]), message("post@kunde.example", subject=f"n{n}"), caller, runtime)
                for n in range(5)]
    assert [verdict.code for verdict, _ in answered] == [0] * 5 and len(upstream.wait_for(5)) == 5
    holder = sqlite3.connect(shim.ledger.where, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the ledger is busy while the answers go out
    recorder = Recorder(config)
    try:
        for _, record in answered:
            recorder.put(record)
        time.sleep(0.3)
        assert _states(holder) == ["reserved"] * 5
    finally:
        holder.execute("COMMIT")
    recorder.close()
    assert _states(holder) == ["sent"] * 5
    assert holder.execute("SELECT count(*) FROM decisions WHERE verdict = 'sent'").fetchone() == (5,)
    assert sum(commits) == 5 and len(commits) <= 2
    holder.close()
    runtime.ledger.close()
