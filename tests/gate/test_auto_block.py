"""Automatic blocks ([abuse]) through the real gate, against an upstream that refuses recipients.

One gate for the module: each test sends from its own account of customer ka, so
that the accounts' outcomes do not mix. The rules are set low to keep it fast:
10 failed or deferred recipients at a share of 0.5 in 1h, more than 5 refusals by
the limits in 10m.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import trustme

from tests.gate.conftest import needs_users
from tests.gate.deployment import Deployment, Interpreter, Result, Users, message
from tests.support.upstream import SmtpUpstream

pytestmark = needs_users

ACCOUNTS = ("spam@a.example", "defer@a.example", "hammer@a.example")
NOTICES_FROM = "varsel@provider.example"
CONTACT = "drift@kunde-a.example"
BLOCKED_LINE = "is blocked from sending (auto: "
HELP_LINE = "contact your hosting provider to have the block lifted"


@pytest.fixture(scope="module")
def relay(ca: trustme.CA) -> Iterator[SmtpUpstream]:
    from tests.gate.deployment import RELAY_PASSWORD, RELAY_USER

    with SmtpUpstream(ca, credentials=(RELAY_USER, RELAY_PASSWORD)) as server:
        server.script.replies["RCPT:bad1@x.example"] = "550 5.1.1 no such user"
        server.script.replies["RCPT:bad2@x.example"] = "550 5.1.1 no such user"
        for name in ("later1", "later2", "later3"):
            server.script.replies[f"RCPT:{name}@x.example"] = "451 4.7.1 greylisted, try again later"
        yield server


@pytest.fixture(scope="module")
def gate(users: Users, interpreter: Interpreter, relay: SmtpUpstream, ca: trustme.CA,
         ledger_template: object) -> Iterator[Deployment]:
    dep = Deployment(users, interpreter, relay.port, ca.cert_pem.bytes())
    try:
        dep.install_ledger(ledger_template)  # type: ignore[arg-type]
        for address in ACCOUNTS:
            assert admin(dep, "account", "add", address, "--customer", "ka", "--authenticated").code == 0
        admin(dep, "customer", "set", "ka", "--contact", CONTACT)
        dep.configure("abuse", failed_share=0.5, failed_min=10, failed_window="1h",
                      limit_refusals=5, limit_window="10m")
        dep.configure("notify", **{"from": NOTICES_FROM})
        dep.start_gate()
        yield dep
    finally:
        dep.close()


def admin(dep: Deployment, *args: str) -> Result:
    result = dep.admin(*args)
    assert result.code == 0, (args, result.stderr)
    return result


def account(dep: Deployment, address: str) -> dict:
    (found,) = [a for a in json.loads(admin(dep, "account", "list", "--json").stdout) if a["address"] == address]
    return found


def site_mail(relay: SmtpUpstream) -> int:
    """Messages the sites sent (the notices, from [notify] from, are not theirs)."""
    return sum(1 for r in relay.received if r.mail_from != NOTICES_FROM)


def send(dep: Deployment, sender: str, to: str) -> Result:
    return dep.sendmail("-t", "-i", input=message(sender=sender, to=to))


def decisions_logged(dep: Deployment, sender: str) -> int:
    return sum(1 for line in dep.log_lines() if f"sender={sender}" in line and "verdict=" in line)


def settled(dep: Deployment, sender: str, count: int) -> None:
    """Wait until the gate has logged ``count`` decisions from ``sender``.

    The gate logs a batch of decisions before it judges them, so the decisions of the
    batches before (those the caller had its answer to before sending the last) are judged.
    """
    deadline = time.monotonic() + 10
    while decisions_logged(dep, sender) < count:
        assert time.monotonic() < deadline, dep.log_lines()
        time.sleep(0.02)


def test_half_the_recipients_refused_blocks_at_the_minimum_and_unblock_restores(
        gate: Deployment, relay: SmtpUpstream) -> None:
    sender = "spam@a.example"
    half_bad = "ok1@x.example, ok2@x.example, bad1@x.example, bad2@x.example"
    for _ in range(4):  # 8 failed of 16: under the minimum of 10
        refused = send(gate, sender, half_bad)
        assert refused.code == 69 and "550 5.1.1 no such user" in refused.line, refused.line
    assert account(gate, sender)["blocked"] is False
    assert send(gate, sender, half_bad).code == 69  # 10 failed of 20: the minimum, at a share of 0.5
    line = gate.wait_for_log(f"event=auto-block account={sender}")
    assert "rule=failed-share" in line and "customer=ka" in line
    notice_line = gate.wait_for_log(f"event=notice kind=block scope=account subject={sender}")
    assert f"to={CONTACT}" in notice_line
    (notice,) = [r for r in relay.received if r.rcpt_tos == [CONTACT]]
    assert notice.mail_from == NOTICES_FROM
    text = notice.data.decode()
    assert f"Subject: Mail blocked: {sender} was blocked automatically" in text
    assert "auto: 10 of 20 recipients failed or deferred in 1h" in " ".join(text.split())

    blocked = send(gate, sender, "ok1@x.example")
    assert blocked.code == 77
    assert BLOCKED_LINE in blocked.line and HELP_LINE in blocked.line, blocked.line
    shown = account(gate, sender)
    assert shown["blocked"] is True and shown["blocked_by"] == "auto"
    assert shown["block_reason"] == ("auto: 10 of 20 recipients failed or deferred in 1h, "
                                     "a share of 0.50 where 0.5 blocks")
    assert shown["blocked_at"].endswith("Z")
    table = admin(gate, "account", "list").stdout.decode()
    assert f"{sender}  customer=ka  authenticated, BLOCKED AUTOMATICALLY since " in table
    (row,) = [e for e in json.loads(admin(gate, "log", "--audit", "--json").stdout)
              if e["subject"] == sender and e["action"] == "account block"]
    assert row["actor"] == "sendmail-shim abuse" and row["detail"] == shown["block_reason"]

    admin(gate, "account", "unblock", sender, "--reason", "addresses cleaned")
    assert account(gate, sender)["blocked_by"] is None
    before = site_mail(relay)
    assert send(gate, sender, "ok1@x.example").code == 0
    # The old outcomes no longer count: one more refusal does not block it again.
    assert send(gate, sender, half_bad).code == 69
    settled(gate, sender, 8)
    assert send(gate, sender, "ok2@x.example").code == 0
    settled(gate, sender, 9)
    assert account(gate, sender)["blocked"] is False
    assert site_mail(relay) == before + 2
    assert sum(1 for line in gate.log_lines() if f"event=auto-block account={sender}" in line) == 1


def test_deferred_recipients_count_too(gate: Deployment, relay: SmtpUpstream) -> None:
    sender = "defer@a.example"
    before = site_mail(relay)
    for _ in range(4):  # each: one delivered now, three queued for later; 12 deferred of 16
        assert send(gate, sender, "ok1@x.example, later1@x.example, later2@x.example, later3@x.example").code == 0
    assert site_mail(relay) == before + 4
    gate.wait_for_log(f"event=auto-block account={sender}")
    shown = account(gate, sender)
    assert shown["blocked_by"] == "auto" and shown["block_reason"].startswith("auto: 12 of 16 recipients")
    assert send(gate, sender, "ok1@x.example").code == 77


def test_hammering_the_limit_blocks(gate: Deployment) -> None:
    sender = "hammer@a.example"
    admin(gate, "override", "set", "--account", sender, "--rule", "1 messages / 5m", "--expires", "1h",
          "--reason", "a small limit to hit")
    assert send(gate, sender, "ok1@x.example").code == 0
    for _ in range(5):  # five refusals: not more than 5
        assert send(gate, sender, "ok1@x.example").code == 69
    assert send(gate, sender, "ok1@x.example").code == 69  # the sixth refusal: the one too many
    line = gate.wait_for_log(f"event=auto-block account={sender}")
    assert "rule=limit-refusals" in line
    assert account(gate, sender)["block_reason"] == "auto: 6 refusals by the limits in 10m, more than 5"
    blocked = send(gate, sender, "ok1@x.example")
    assert blocked.code == 77 and BLOCKED_LINE in blocked.line
