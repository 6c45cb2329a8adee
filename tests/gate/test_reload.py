"""A running gate and its config: SIGHUP reloads it, `config check` tells when it is stale, and a gate
killed after relaying leaves an outcome the site and the admin are told is unknown, never "not sent"."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import trustme

from tests.gate.conftest import CLIENT_NAMES, needs_users
from tests.gate.deployment import RELAY_PASSWORD, RELAY_USER, Deployment, message
from tests.support.upstream import SmtpUpstream


@pytest.fixture
def second_relay(ca: trustme.CA) -> Iterator[SmtpUpstream]:
    """Another relay of the provider, as strict as the first: the one the admin moves the gate to."""
    with SmtpUpstream(ca, credentials=(RELAY_USER, RELAY_PASSWORD)) as server:
        yield server


def reload(deployment: Deployment, event: str = "event=gate-reload ") -> str:
    """SIGHUP, and the log line that says how it went (the first such line since)."""
    seen = len(deployment.log_lines())
    assert deployment.gate is not None
    deployment.gate.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for line in deployment.log_lines()[seen:]:
            if "event=gate-reload" in line:
                assert event in line + " ", line
                return line
        time.sleep(0.05)
    raise AssertionError(f"no reload line: {deployment.log_lines()[seen:]}, {deployment.gate_errors()}")


def config_check(deployment: Deployment) -> tuple[int, dict, str]:
    result = deployment.admin("config", "check", "--json")
    return result.code, json.loads(result.stdout), result.stderr


@needs_users
def test_sighup_sends_new_mail_to_the_changed_upstream(gate: Deployment, relay: SmtpUpstream,
                                                       second_relay: SmtpUpstream) -> None:
    assert gate.sendmail("-t", "-i", input=message(subject="before")).code == 0
    pid = gate.gate.pid if gate.gate else None
    gate.configure("upstream", port=second_relay.port)
    line = reload(gate)
    assert f"upstream.port: {relay.port} -> {second_relay.port}" in line
    result = gate.sendmail("-t", "-i", input=message(subject="after"))
    assert (result.code, result.line) == (0, "")
    assert [r.headers["subject"] for r in relay.received] == [["before"]]
    assert [r.headers["subject"] for r in second_relay.wait_for(1)] == [["after"]]
    assert gate.gate is not None and gate.gate.pid == pid and gate.gate.poll() is None  # reloaded, not restarted


@needs_users
def test_a_reload_applies_new_limits(gate: Deployment, relay: SmtpUpstream) -> None:
    assert gate.sendmail("-t", "-i", input=message()).code == 0
    gate.configure("limits", account=["1 messages / 5m"])
    assert "limits.account:" in reload(gate)
    refused = gate.sendmail("-t", "-i", input=message(subject="over"))
    assert refused.code == 69 and "1 messages per 5 minutes" in refused.line
    assert len(relay.received) == 1


@needs_users
def test_a_broken_config_on_sighup_keeps_the_running_one(gate: Deployment, relay: SmtpUpstream) -> None:
    gate.configure("upstream", port=70000)
    line = reload(gate, "event=gate-reload-failed")
    assert str(gate.config_path) in line and "upstream.port" in line and "kept the running config" in line
    result = gate.sendmail("-t", "-i", input=message())
    assert (result.code, result.line) == (0, "")
    assert len(relay.wait_for(1)) == 1
    assert gate.gate is not None and gate.gate.poll() is None


@needs_users
def test_a_reloaded_upstream_must_pass_the_trust_checks(gate: Deployment, relay: SmtpUpstream,
                                                        open_relay: SmtpUpstream) -> None:
    gate.configure("upstream", port=open_relay.port)  # takes MAIL without AUTH: any site could use it
    line = reload(gate, "event=gate-reload-failed")
    assert "did not pass the trust checks" in line and "accepts MAIL without AUTH" in line
    assert gate.sendmail("-t", "-i", input=message()).code == 0
    assert len(relay.wait_for(1)) == 1 and open_relay.received == []


@needs_users
def test_a_message_in_flight_during_a_reload_is_not_dropped(gate: Deployment, relay: SmtpUpstream,
                                                            second_relay: SmtpUpstream) -> None:
    relay.script.delays["DATA"] = 3.0  # stored by the old relay, its reply still to come
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(gate.sendmail, "-t", "-i", input=message(subject="in flight"))
        assert len(relay.wait_for(1)) == 1
        gate.configure("upstream", port=second_relay.port)
        reload(gate)
        assert not in_flight.done()
        after = gate.sendmail("-t", "-i", input=message(subject="after"))
        first = in_flight.result(timeout=30)
    assert (first.code, first.line) == (0, ""), gate.log_lines()
    assert (after.code, after.line) == (0, "")
    assert [r.headers["subject"] for r in relay.received] == [["in flight"]]
    assert [r.headers["subject"] for r in second_relay.wait_for(1)] == [["after"]]
    sent = [line for line in gate.log_lines() if "verdict=sent" in line]
    assert len(sent) == 2


@needs_users
def test_a_setting_that_needs_a_restart_is_logged_and_not_applied(gate: Deployment, relay: SmtpUpstream) -> None:
    gate.configure("gate", backlog=64, request_timeout=11)
    line = reload(gate)
    assert "gate.request_timeout: 10 -> 11" in line and "gate.backlog" not in line
    warning = gate.wait_for_log("event=gate-reload-needs-restart")
    assert "keys=gate.backlog" in warning
    assert gate.sendmail("-t", "-i", input=message()).code == 0
    code, found, err = config_check(gate)
    assert code == 0 and found["gate"]["differs"] is True
    assert "gate.backlog" in found["gate"]["found"] and "systemctl restart sendmail-shim-gate" in err


@needs_users
def test_config_check_reports_a_gate_running_another_config(gate: Deployment, relay: SmtpUpstream) -> None:
    code, found, err = config_check(gate)
    assert code == 0 and found["gate"] == {"running": True, "differs": False, "found": found["gate"]["found"],
                                           "fix": None}
    assert "note:" not in err
    gate.configure("gate", request_timeout=11)  # changed on disk, not reloaded
    code, found, err = config_check(gate)
    assert code == 0 and found["gate"]["differs"] is True  # the file itself is fine: reloading may follow
    assert "changed after the gate loaded it" in found["gate"]["found"]
    assert "note:" in err and "systemctl reload sendmail-shim-gate" in err
    reload(gate)
    code, found, err = config_check(gate)
    assert found["gate"]["differs"] is False and "note:" not in err


@needs_users
def test_the_start_line_says_what_the_gate_runs(gate: Deployment, relay: SmtpUpstream) -> None:
    line = gate.wait_for_log("event=gate-start")
    for part in ("version=", f"socket={gate.socket_path}", f"upstream=127.0.0.1:{relay.port}",
                 f"ledger={gate.ledger_path}", "rules=\"account: 25 messages / 5m", "trust_mode=auth"):
        assert part in line, line


@needs_users
@pytest.mark.parametrize("name", CLIENT_NAMES)
def test_a_gate_killed_after_relaying_leaves_the_outcome_unknown(deployment: Deployment, relay: SmtpUpstream,
                                                                  name: str) -> None:
    deployment.start_gate(env={"SENDMAIL_SHIM_CRASH_AT": "pipeline:after-relay"})
    result = deployment.sendmail("-t", "-i", input=message(), program=f"sendmail-{name}")
    (received,) = relay.wait_for(1)
    assert result.code == 69, result
    assert result.line.startswith("sendmail: outcome unknown:") and "may have been sent" in result.line
    assert "not sent" not in result.line
    assert deployment.stop_gate() == -signal.SIGKILL
    deployment.start_gate()
    (message_id,) = received.headers["message-id"]
    line = deployment.wait_for_log("event=gate-outcome-unknown")
    assert f"msgid={message_id}" in line or f'msgid="{message_id}"' in line, line
    assert f"uid={deployment.users.a.uid}" in line and "account=post@a.example" in line
    usage = json.loads(deployment.admin("usage", "--account", "post@a.example", "--json").stdout)
    assert {rule["used"] for rule in usage["rules"] if rule["metric"] == "messages"} == {1}  # still counted
    deployment.stop_gate()
    deployment.start_gate()  # reported once: the next start finds nothing left
    deployment.wait_for_log("event=gate-start")
    time.sleep(0.5)
    assert len([line for line in deployment.log_lines() if "event=gate-outcome-unknown" in line]) == 1
