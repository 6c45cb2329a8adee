"""Notices through the real gate and the real upstream: a warning near a limit, one when it stops.

Account post@a.example (customer ka) may send 10 messages in 5 minutes; with
``warn_at = 0.8`` the 8th message brings one warning to the customer's
contact, the 11th (refused) one limit notice, and nothing more comes however
often the site tries again. The notices go through the product's own queue,
so they count against nobody.
"""

from __future__ import annotations

import json
import sqlite3

from tests.gate.conftest import needs_users
from tests.gate.deployment import Deployment
from tests.support.mailreader import body_text, read_mail
from tests.support.upstream import Received, SmtpUpstream

pytestmark = needs_users

CONTACT = "drift@kunde-a.example"
ADMIN = "support@provider.example"
SENDER = "varsel@provider.example"
SCRIPT = "contact-form.php"


def site_message(n: int) -> bytes:
    return (f"From: post@a.example\nTo: ola@x.example\nSubject: Order {n}\n"
            f"X-PHP-Originating-Script: 1001:{SCRIPT}\n\nThank you for your order.\n").encode()


def set_up(deployment: Deployment, **notify: object) -> None:
    deployment.configure("limits", account=["10 messages / 5m"])
    deployment.configure("notify", **{"from": SENDER, "warn_at": 0.8, **notify})
    result = deployment.admin("customer", "set", "ka", "--contact", CONTACT)
    assert result.code == 0, result.stderr
    deployment.start_gate()


def send(deployment: Deployment, n: int) -> int:
    return deployment.sendmail("-t", "-i", input=site_message(n)).code


def notices(relay: SmtpUpstream) -> list[Received]:
    return [r for r in relay.received if CONTACT in r.rcpt_tos or ADMIN in r.rcpt_tos]


def notice_lines(deployment: Deployment) -> list[str]:
    return [line for line in deployment.log_lines() if "event=notice" in line]


def settled(deployment: Deployment) -> None:
    """Everything recorded before this: the recorder works in order, so a later site's line means it is done."""
    assert deployment.sendmail("-t", "-i", input=b"From: post@b.example\nTo: ola@x.example\nSubject: mark\n\n.\n",
                               user=deployment.users.b).code == 0
    deployment.wait_for_log("sender=post@b.example")


def notice_rows(deployment: Deployment) -> list[tuple]:
    with sqlite3.connect(deployment.ledger_path) as db:
        return db.execute("SELECT kind, scope, subject, rule, recipients FROM notices ORDER BY id").fetchall()


def used(deployment: Deployment, *scope: str) -> int:
    result = deployment.admin("usage", *scope, "--json")
    assert result.code == 0, result.stderr
    doc = json.loads(result.stdout)
    rules = doc["rules"] if isinstance(doc, dict) else doc
    return next(r["used"] for r in rules if r["metric"] == "messages" and r["window_seconds"] in (300, 3600))


def test_the_8th_message_warns_the_11th_stops_and_nothing_more_comes(deployment: Deployment,
                                                                     relay: SmtpUpstream) -> None:
    set_up(deployment)
    for n in range(1, 8):
        assert send(deployment, n) == 0
    assert send(deployment, 8) == 0
    warning_line = deployment.wait_for_log("event=notice")
    assert "kind=warn" in warning_line and f"to={CONTACT}" in warning_line and "queue=q" in warning_line
    (warning,) = notices(relay)
    mail = read_mail(warning.data)
    assert (warning.rcpt_tos, warning.mail_from) == ([CONTACT], SENDER)
    assert (mail["To"], mail["From"], mail["Auto-Submitted"]) == (CONTACT, SENDER, "auto-generated")
    assert mail["Subject"] == "Warning: post@a.example will soon reach its mail limit"
    text = body_text(mail)
    for fact in ("10 messages / 5m", "Used:         8 of 10", "80 %", SCRIPT, "HTTP API", "the last 5 minutes"):
        assert fact in text, (fact, text)
    assert "8 messages" in text  # the script's count in the window

    assert send(deployment, 9) == 0 and send(deployment, 10) == 0
    assert send(deployment, 11) == 69
    limit_line = deployment.wait_for_log("kind=limit")
    assert f"to={CONTACT}" in limit_line
    for n in range(12, 32):
        assert send(deployment, n) == 69
    settled(deployment)

    assert len(notice_lines(deployment)) == 2
    warning, stop = notices(relay)
    mail = read_mail(stop.data)
    assert mail["Subject"] == "Mail stopped: post@a.example reached its mail limit"
    text = body_text(mail)
    for fact in ("10 messages / 5m", "Used:         10 of 10", "Sending again: from 20", "HTTP API", SCRIPT):
        assert fact in text, (fact, text)
    assert notice_rows(deployment) == [("warn", "account", "post@a.example", "10 messages / 5m", CONTACT),
                                       ("limit", "account", "post@a.example", "10 messages / 5m", CONTACT)]
    # The two notices counted against no one: ten messages for the account, and for its customer.
    assert used(deployment, "--account", "post@a.example") == 10
    assert used(deployment, "--customer", "ka") == 10
    # The 21 refusals are the site's; the notices left the queue, delivered.
    queue = json.loads(deployment.admin("queue", "list", "--all", "--json").stdout)
    kinds = {(e["kind"], e["state"]) for e in queue}
    assert kinds == {("notice", "done")}, queue
    # What the admin reads back: newest first, to whom, with the Message-ID the contact got.
    shown = json.loads(deployment.admin("log", "--notices", "--json").stdout)
    assert [(n["kind"], n["subject"], n["rule"], n["recipients"]) for n in shown] == [
        ("limit", "post@a.example", "10 messages / 5m", [CONTACT]),
        ("warn", "post@a.example", "10 messages / 5m", [CONTACT])]
    assert shown[1]["message_id"] == read_mail(warning.data)["Message-ID"]
    table = deployment.admin("log", "--notices").stdout.decode()
    assert f"warn   account post@a.example  10 messages / 5m  to {CONTACT}" in table


def test_norwegian_notices_with_a_copy_for_the_admin(deployment: Deployment, relay: SmtpUpstream) -> None:
    set_up(deployment, language="nb", admin=ADMIN)
    for n in range(1, 9):
        assert send(deployment, n) == 0
    line = deployment.wait_for_log("event=notice")
    assert f"to={CONTACT},{ADMIN}" in line
    (warning,) = notices(relay)
    assert sorted(warning.rcpt_tos) == sorted([CONTACT, ADMIN])
    mail = read_mail(warning.data)
    assert mail["Subject"] == "Varsel: e-postgrensen er snart nådd for post@a.example"
    text = body_text(mail)
    for fact in ("Brukt:        8 av 10", "10 meldinger per 5 minutter", "HTTP-API", "de siste 5 minutter", SCRIPT):
        assert fact in text, (fact, text)


def test_a_template_directory_replaces_the_built_in_text(deployment: Deployment, relay: SmtpUpstream) -> None:
    templates = deployment.etc / "notices"
    templates.mkdir(mode=0o755)
    (templates / "warn.en.txt").write_text("Subject: [Provider] $who at $used of $limit\n\n"
                                           "Rule $rule, top scripts:\n$scripts\nMove bulk mail to an HTTP API.\n")
    set_up(deployment, templates=str(templates))
    for n in range(1, 9):
        assert send(deployment, n) == 0
    deployment.wait_for_log("event=notice")
    (warning,) = notices(relay)
    mail = read_mail(warning.data)
    assert mail["Subject"] == "[Provider] post@a.example at 8 of 10"
    assert body_text(mail).startswith("Rule 10 messages / 5m, top scripts:\n")


def test_a_deferred_notice_is_delivered_by_the_queue_run(deployment: Deployment, relay: SmtpUpstream) -> None:
    set_up(deployment)
    relay.script.replies[f"RCPT:{CONTACT}"] = "451 4.3.0 mailbox busy, try later"
    for n in range(1, 9):
        assert send(deployment, n) == 0
    line = deployment.wait_for_log("event=notice")
    assert "state=queued" in line
    assert notices(relay) == []
    del relay.script.replies[f"RCPT:{CONTACT}"]
    result = deployment.admin("queue", "run", "--now", "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["delivered"] == 1
    (warning,) = notices(relay)
    assert read_mail(warning.data)["Subject"].startswith("Warning: post@a.example")
    assert used(deployment, "--account", "post@a.example") == 8


def test_no_contact_and_no_admin_is_logged_once(deployment: Deployment, relay: SmtpUpstream) -> None:
    set_up(deployment)
    assert deployment.admin("customer", "set", "ka", "--no-contact").code == 0
    for n in range(1, 12):
        send(deployment, n)
    settled(deployment)
    lines = notice_lines(deployment)
    assert len(lines) == 2 and all("no one could be told" in line for line in lines), lines
    assert notices(relay) == []
