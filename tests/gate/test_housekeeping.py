"""The gate keeps its ledger: timed-out reservations are resolved and old rows pruned, while it runs."""

from __future__ import annotations

import json
import signal
import time

from sendmail_shim.ledger import Ledger
from tests.gate.deployment import Deployment, message
from tests.support.upstream import SmtpUpstream

DAY = 86400.0


def account_used(dep: Deployment, address: str = "post@a.example") -> int:
    result = dep.admin("usage", "--account", address, "--json")
    assert result.code == 0, result.stderr
    return next(rule["used"] for rule in json.loads(result.stdout)["rules"] if rule["rule"] == "25 messages / 5m")


def test_a_gate_killed_between_reserve_and_settle_leaves_a_reservation_its_successor_resolves(
        deployment: Deployment, relay: SmtpUpstream) -> None:
    deployment.configure("ledger", reservation_timeout=2)
    gate = deployment.start_gate(env={"SENDMAIL_SHIM_CRASH_AT": "pipeline:after-reserve"})
    result = deployment.sendmail("-t", "-i", input=message())
    assert gate.wait(10) == -signal.SIGKILL
    assert result.code == 69 and relay.received == []
    deployment.stop_gate()
    assert account_used(deployment) == 1  # it counts until the timeout: the safe side
    deployment.start_gate()  # the successor, as systemd restarts it
    line = deployment.wait_for_log("event=ledger-reservations", timeout=15)
    assert "reservations_resolved=1" in line
    assert account_used(deployment) == 0
    (entry, *_) = json.loads(deployment.admin("log", "--audit", "--json").stdout)
    assert (entry["action"], entry["subject"]) == ("reservation expired", "post@a.example")
    assert deployment.sendmail("-t", "-i", input=message()).code == 0
    assert len(relay.wait_for(1)) == 1


def test_the_gate_prunes_what_retention_no_longer_keeps(deployment: Deployment, relay: SmtpUpstream) -> None:
    deployment.configure("ledger", reservation_timeout=2, keep_decisions="30d")
    ledger = Ledger(f"sqlite:///{deployment.ledger_path}")
    now = time.time()
    for age in (40, 35, 31, 29, 1):  # days
        ledger.record_decision(verdict="sent", code=0, account="post@a.example", time=now - age * DAY)
    ledger.close()
    deployment.start_gate()
    line = deployment.wait_for_log("event=ledger-prune", timeout=15)
    assert "decisions=3" in line
    kept = json.loads(deployment.admin("log", "--json", "--limit", "100").stdout)
    assert [round((now - entry_time(e)) / DAY) for e in kept] == [1, 29]
    audit = json.loads(deployment.admin("log", "--audit", "--json").stdout)
    assert [e["action"] for e in audit][-2:] == ["customer bind", "customer add"]  # the audit log stays


def entry_time(entry: dict[str, object]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(str(entry["at"]).replace("Z", "+00:00")).timestamp()
