"""``[gate] egress = "restricted"`` with the shipped nftables rule, in a network namespace the test makes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gate.conftest import needs_users
from tests.gate.deployment import ROOT, Interpreter, Users

pytestmark = needs_users


def _namespaces_work() -> str | None:
    """None when nft and a private network namespace are available; else why not."""
    if not shutil.which("nft"):
        return "nftables is not installed (scripts/bootstrap installs it)"
    probe = subprocess.run(["unshare", "-n", "nft", "list", "ruleset"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return (f"this sandbox cannot run nftables in a network namespace of its own "
                f"(unshare -n nft: {probe.stderr.strip()}); the test runs where root may make namespaces")
    return None


def test_only_the_gates_user_reaches_the_relay_through_the_shipped_rule(
        users: Users, interpreter: Interpreter, ledger_template: Path, tmp_path: Path) -> None:
    reason = _namespaces_work()
    if reason:
        pytest.skip(reason)
    settings = tmp_path / "settings.json"
    tmp_path.chmod(0o755)
    settings.write_text(json.dumps({
        "users": {"gate": users.gate.name, "a": users.a.name, "b": users.b.name, "c": users.c.name},
        "interpreter": {"executable": interpreter.executable, "pythonpath": interpreter.pythonpath},
        "ledger_template": str(ledger_template), "workdir": str(tmp_path)}))
    run = subprocess.run(["unshare", "-n", sys.executable, str(ROOT / "tests/gate/egress_netns.py"), str(settings)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.splitlines()[-1])
    assert (found["nft"], found["nft_error"]) == (0, "")
    assert found["site_connect"] == "Connection refused"  # the site's own SMTP: reset by the rule
    assert found["gate_user_connect"] == "connected"
    assert "mode=egress" in found["started"] and "only " + users.gate.name + " reaches the relay" in found["started"]
    assert found["sendmail"] == [0, ""]
    assert found["relayed"] == ["post@a.example"] and found["relayed_as_gate_user"]
    # Without the rule the same relay is open to the site, and the gate refuses to start.
    assert found["site_connect_without_rule"] == "connected"
    assert found["without_rule"].startswith("the gate exited with 78")
    assert "egress: nobody (uid 65534) reached the relay 127.0.0.1:25 directly" in found["without_rule_error"]
