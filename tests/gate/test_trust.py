"""Trust is enforced at start: the gate runs only when sites cannot reach the relay without it."""

from __future__ import annotations

import pytest
import trustme

from tests.gate.conftest import needs_users
from tests.gate.deployment import RELAY_PASSWORD, RELAY_USER, Deployment, message
from tests.support.upstream import SmtpUpstream, free_port

pytestmark = needs_users

FIXES = ("so any site on this server could reach the relay without the gate. Fix one: require AUTH at the "
         "relay and set [upstream] username and password_file (mode 0600, owned by {gate}), or let only {gate} "
         "reach the relay (load /etc/sendmail-shim/egress.nft with nft -f and set [gate] egress = \"restricted\"). "
         "Only a server with a single customer may set [gate] trust = \"single-tenant\"\n")

DIRECT_SMTP = """
import smtplib, ssl, sys
context = ssl.create_default_context(cafile=%(ca)r)
accepted = 0
for n in range(30):
    with smtplib.SMTP("127.0.0.1", %(port)d, timeout=10) as smtp:
        smtp.starttls(context=context)
        smtp.ehlo()
        code, _ = smtp.mail("post@b.example")
        if code == 250 and smtp.rcpt("victim@x.example")[0] == 250:
            smtp.data(b"From: post@b.example\\r\\nSubject: forged\\r\\n\\r\\nnot from B\\r\\n")
            accepted += 1
print(accepted)
"""


def _refusal(dep: Deployment) -> str:
    with pytest.raises(RuntimeError, match="exited with 78"):
        dep.start_gate()
    errors = dep.gate_errors()
    assert errors.count("\n") == 1 and errors.startswith("sendmail-shim: not started: "), errors
    assert errors.endswith(FIXES.format(gate=dep.users.gate.name)), errors
    return errors


def test_gate_refuses_to_start_against_a_relay_that_trusts_the_servers_address(
        deployment: Deployment, open_relay: SmtpUpstream) -> None:
    deployment.configure("upstream", port=open_relay.port)
    # What a hostile site does on such a server: speak SMTP itself, as another customer, past every limit.
    direct = deployment.run_as(deployment.users.a, DIRECT_SMTP % {"ca": str(deployment.etc / "ca.pem"),
                                                                  "port": open_relay.port})
    assert direct.stdout.strip() == b"30" and len(open_relay.received) == 30
    errors = _refusal(deployment)
    assert f"auth: the relay 127.0.0.1:{open_relay.port} accepts MAIL without AUTH (250 " in errors
    assert not deployment.socket_path.exists() or deployment.listening is not None
    assert len(open_relay.received) == 30  # the probe sent nothing


def test_gate_refuses_to_start_without_relay_credentials(ca: trustme.CA, deployment: Deployment) -> None:
    with SmtpUpstream(ca) as plain:
        deployment.configure("upstream", port=plain.port, username=None, password_file=None)
        errors = _refusal(deployment)
    assert "not started: auth: [upstream] sets no username and password_file;" in errors


def test_egress_rule_cannot_be_verified_by_a_gate_that_is_not_root(deployment: Deployment,
                                                                   open_relay: SmtpUpstream) -> None:
    deployment.configure("upstream", port=open_relay.port)
    deployment.configure("gate", egress="restricted")
    errors = _refusal(deployment)
    assert (f'egress: egress = "restricted" is verified by connecting as another user, which needs a gate '
            f"started as root with --user {deployment.users.gate.name} (the packaged unit does)") in errors


def test_egress_restricted_without_a_firewall_is_refused_by_the_root_probe(deployment: Deployment,
                                                                          open_relay: SmtpUpstream) -> None:
    deployment.configure("upstream", port=open_relay.port)
    deployment.configure("gate", egress="restricted")
    with pytest.raises(RuntimeError, match="exited with 78"):
        deployment.start_gate(as_root=True)
    assert f"egress: nobody (uid 65534) reached the relay 127.0.0.1:{open_relay.port} directly" in \
        deployment.gate_errors()


def test_a_relay_requiring_auth_is_verified_and_logged(gate: Deployment, relay: SmtpUpstream) -> None:
    line = gate.wait_for_log("event=gate-trust-verified")
    assert "mode=auth" in line and "refuses MAIL without AUTH (530" in line
    assert gate.sendmail("-t", "-i", input=message()).code == 0
    assert relay.received[0].authenticated


def test_single_tenant_runs_without_either_and_warns_at_every_start(deployment: Deployment,
                                                                    open_relay: SmtpUpstream) -> None:
    deployment.configure("upstream", port=open_relay.port)
    deployment.configure("gate", trust="single-tenant")
    for _ in range(2):
        deployment.start_gate()
        assert deployment.sendmail("-t", "-i", input=message()).code == 0
        deployment.stop_gate()
    warnings = [line for line in deployment.log_lines() if "event=gate-single-tenant" in line]
    assert len(warnings) == 2 and all("priority=warning" in line or "warning" in line for line in warnings)


def test_relay_down_at_start_holds_mail_in_the_queue_until_verified(deployment: Deployment,
                                                                     ca: trustme.CA) -> None:
    port = free_port()
    deployment.configure("upstream", port=port)
    deployment.start_gate()  # the relay cannot be asked: the gate starts, but trusts nothing yet
    assert "event=gate-trust-pending" in deployment.wait_for_log("gate-trust-pending")
    held = deployment.sendmail("-t", "-i", input=message(subject="held"))
    assert (held.code, held.line) == (0, "")  # durably queued, as for any relay outage
    queued = deployment.admin("queue", "list")
    assert b"post@a.example" in queued.stdout and b"has not yet verified" in queued.stdout
    with SmtpUpstream(ca, credentials=(RELAY_USER, RELAY_PASSWORD), port=port) as relay:
        deployment.wait_for_log("event=gate-trust-verified", timeout=30)
        sent = deployment.sendmail("-t", "-i", input=message(subject="after"))
        assert (sent.code, sent.line) == (0, "")
        assert [r.headers["subject"] for r in relay.received] == [["after"]]


def test_relay_down_at_start_then_open_to_everyone_stops_the_gate(deployment: Deployment,
                                                                  ca: trustme.CA) -> None:
    port = free_port()
    deployment.configure("upstream", port=port)
    deployment.configure("queue", enabled=False)
    gate = deployment.start_gate()
    refused = deployment.sendmail("-t", "-i", input=message())
    assert refused.code == 69
    assert refused.line.startswith("sendmail: not sent: the mail gate has not yet verified that only it can "
                                   "reach the relay (auth: the relay could not be asked")
    with SmtpUpstream(ca, credentials=(RELAY_USER, RELAY_PASSWORD), port=port, trust_addresses=True) as relay:
        assert gate.wait(40) == 78
        assert "accepts MAIL without AUTH" in deployment.wait_for_log("event=gate-trust-refuted")
        assert relay.received == []
    deployment.gate = None
    deployment.gate_stderr.close()
