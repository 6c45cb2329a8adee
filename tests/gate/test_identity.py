"""Who may send what through the gate: identity comes from the kernel, never from the caller."""

from __future__ import annotations

import re

from tests.gate.conftest import needs_users
from tests.gate.deployment import Deployment, message
from tests.support.upstream import SmtpUpstream

pytestmark = needs_users


def _trace_uid(data: bytes) -> int:
    found = re.search(rb"^Received: .*from userid (\d+)", data, re.MULTILINE)
    assert found, data[:300]
    return int(found.group(1))


def test_site_sends_from_its_own_account(gate: Deployment, relay: SmtpUpstream) -> None:
    result = gate.sendmail("-t", "-i", input=message("post@a.example"), user=gate.users.a)
    assert (result.code, result.line) == (0, "")
    (got,) = relay.received
    assert got.tls and got.authenticated  # the gate's credentials, inside TLS
    assert got.mail_from == "post@a.example" and got.rcpt_tos == ["ola@x.example"]
    assert _trace_uid(got.data) == gate.users.a.uid
    line = gate.wait_for_log("verdict=sent")
    assert f"uid={gate.users.a.uid}" in line and f"user={gate.users.a.name}" in line


def test_site_cannot_send_from_another_customers_account(gate: Deployment, relay: SmtpUpstream) -> None:
    result = gate.sendmail("-t", "-i", "-f", "post@b.example", input=message("post@b.example"),
                           user=gate.users.a)
    assert result.code == 77, result.line
    assert result.line.startswith("sendmail: not sent: ") and "post@b.example" in result.line
    assert relay.received == []


def test_site_cannot_put_another_customers_address_in_from(gate: Deployment, relay: SmtpUpstream) -> None:
    result = gate.sendmail("-t", "-i", input=message("post@b.example"), user=gate.users.a)
    assert result.code == 77, result.line
    assert relay.received == []


def test_environment_and_arguments_do_not_change_who_is_calling(gate: Deployment, relay: SmtpUpstream) -> None:
    b = gate.users.b
    spoofed = gate.client_env(USER=b.name, LOGNAME=b.name, SUDO_UID=str(b.uid), SUDO_USER=b.name)
    refused = gate.sendmail("-t", "-i", input=message("post@b.example"), user=gate.users.a, env=spoofed)
    assert refused.code == 77 and relay.received == []
    sent = gate.sendmail("-t", "-i", input=message("post@a.example"), user=gate.users.a, env=spoofed)
    assert sent.code == 0
    assert _trace_uid(relay.received[0].data) == gate.users.a.uid


def test_user_bound_to_no_customer_is_refused(gate: Deployment, relay: SmtpUpstream) -> None:
    result = gate.sendmail("-t", "-i", input=message("post@a.example"), user=gate.users.c)
    assert result.code == 77, result.line
    assert gate.users.c.name in result.line and "not linked to any customer" in result.line
    assert relay.received == []


def test_unbound_user_may_send_when_the_config_allows_it(deployment: Deployment, relay: SmtpUpstream) -> None:
    deployment.configure("gate", allow_unbound=True)
    deployment.start_gate()
    result = deployment.sendmail("-t", "-i", input=message("post@a.example"), user=deployment.users.c)
    assert (result.code, result.line) == (0, "")
    assert _trace_uid(relay.received[0].data) == deployment.users.c.uid


def test_each_site_is_charged_to_its_own_account(gate: Deployment, relay: SmtpUpstream) -> None:
    assert gate.sendmail("-t", "-i", input=message("post@a.example"), user=gate.users.a).code == 0
    assert gate.sendmail("-t", "-i", input=message("post@b.example"), user=gate.users.b).code == 0
    usage_a = gate.admin("usage", "--account", "post@a.example", "--json")
    usage_b = gate.admin("usage", "--account", "post@b.example", "--json")
    assert usage_a.code == usage_b.code == 0
    assert '"used": 1' in usage_a.stdout.decode() and '"used": 1' in usage_b.stdout.decode()


def test_site_cannot_name_another_customer_in_sender(gate: Deployment, relay: SmtpUpstream) -> None:
    forged = message("post@a.example").replace(b"Subject:", b"Sender: post@b.example\nSubject:")
    result = gate.sendmail("-t", "-i", input=forged, user=gate.users.a)
    assert result.code == 77
    assert "the Sender address's domain b.example is not one of the sender's domains" in result.line
    assert relay.received == []
    replying = message("post@a.example").replace(b"Subject:", b"Reply-To: post@b.example\nSubject:")
    assert gate.sendmail("-t", "-i", input=replying, user=gate.users.a).code == 0  # Reply-To stays free
