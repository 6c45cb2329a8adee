"""Notices from ``sendmail`` deciding in-process: the customer's own rule, and a notice the upstream refuses."""

from __future__ import annotations

import json

from tests.support.mailreader import body_text, read_mail
from tests.support.shim import Shim
from tests.support.upstream import SmtpUpstream

CONTACT = "drift@kunde.example"


def mail(n: int) -> bytes:
    return f"From: post@kunde.example\nTo: ola@x.example\nSubject: n{n}\n\nHei\n".encode()


def notice_lines(shim: Shim) -> list[str]:
    return [line for line in shim.log_lines() if "event=notice" in line]


def test_a_customer_rule_warns_about_the_customer_as_a_whole(shim: Shim, upstream: SmtpUpstream) -> None:
    shim.configure("limits", customer=["5 messages / 1h"])
    shim.configure("notify", **{"from": "varsel@provider.example", "warn_at": 0.5})
    shim.ledger.set_contact("kunde", CONTACT)
    for n in range(1, 5):  # the 3rd of 5 crosses half
        assert shim.sendmail("-t", "-i", input=mail(n)).code == 0
    (line,) = notice_lines(shim)
    assert "kind=warn" in line and "scope=customer" in line and "subject=kunde" in line
    notices = [r for r in upstream.received if r.rcpt_tos == [CONTACT]]
    (notice,) = notices
    message = read_mail(notice.data)
    assert message["Subject"] == "Warning: customer kunde (all its accounts together) will soon reach its mail limit"
    assert "Used:         3 of 5" in body_text(message)


def test_a_notice_the_upstream_refuses_is_dropped_without_a_bounce(shim: Shim, upstream: SmtpUpstream) -> None:
    shim.configure("limits", account=["2 messages / 5m"])
    shim.configure("notify", **{"from": "varsel@provider.example", "warn_at": 0.5})
    shim.ledger.set_contact("kunde", CONTACT)
    upstream.script.replies[f"RCPT:{CONTACT}"] = "550 5.1.1 no such mailbox"
    assert shim.sendmail("-t", "-i", input=mail(1)).code == 0
    (line,) = notice_lines(shim)
    assert "state=done" in line
    attempt = next(line for line in shim.log_lines() if "event=queue-attempt" in line)
    assert "kind=notice" in attempt and "failed=1" in attempt
    queue = json.loads(shim.admin("queue", "list", "--all", "--json").stdout)
    assert [(e["kind"], e["state"]) for e in queue] == [("notice", "done")]  # and no bounce about it
    assert [r.rcpt_tos for r in upstream.received] == [["ola@x.example"]]
