"""The block notice, as the automatic blocks send it: ``notify_blocked`` against the real upstream."""

from __future__ import annotations

import pytest

from sendmail_shim.config import load
from sendmail_shim.notify import notify_blocked
from tests.support.mailreader import body_text, read_mail
from tests.support.shim import Shim
from tests.support.upstream import SmtpUpstream

CONTACT = "drift@kunde.example"
AT = 1_796_400_000.0  # 2026-12-04T16:00:00Z


@pytest.mark.parametrize(("language", "subject", "facts"), [
    ("en", "Mail blocked: post@kunde.example was blocked automatically",
     ["was blocked automatically\nat 2026-12-04T16:00:00Z: 60 % of the recipients failed",
      "contact your hosting provider", '"sendmail-shim account unblock post@kunde.example"']),
    ("nb", "E-post sperret: post@kunde.example ble sperret automatisk",
     ["ble sperret automatisk\n2026-12-04T16:00:00Z: 60 % of the recipients failed", "kontakt deretter leverandøren",
      '"sendmail-shim account unblock post@kunde.example"']),
])
def test_a_block_notice_goes_once_to_the_contact_and_the_admin(shim: Shim, upstream: SmtpUpstream, language: str,
                                                               subject: str, facts: list[str]) -> None:
    shim.configure("notify", **{"from": "varsel@provider.example", "admin": "support@provider.example",
                                "language": language})
    shim.ledger.set_contact("kunde", CONTACT)
    config = load(str(shim.config_path))
    for _ in range(2):  # the same block told twice: the claim lets one through
        notify_blocked(config, shim.ledger, account="post@kunde.example", customer_id="kunde",
                       reason="60 % of the recipients failed", at=AT)
    (notice,) = upstream.wait_for(1)
    assert notice.rcpt_tos == [CONTACT, "support@provider.example"]
    mail = read_mail(notice.data)
    assert mail["Subject"] == subject and mail["Auto-Submitted"] == "auto-generated"
    text = body_text(mail)
    for fact in facts:
        assert fact in text, (fact, text)
    (row,) = shim.ledger.notices()
    assert (row.kind, row.scope, row.subject, row.rule, row.window_start) == (
        "block", "account", "post@kunde.example", "abuse", AT)
    lines = [line for line in shim.log_lines() if "event=notice" in line]
    assert len(lines) == 1 and "kind=block" in lines[0] and "state=done" in lines[0]
    assert shim.ledger.list_sends("customer", "kunde") == []  # a notice is no send of the customer's
