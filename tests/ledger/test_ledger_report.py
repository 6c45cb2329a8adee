"""The report's groups read the same from SQLite and PostgreSQL."""

from __future__ import annotations

from sendmail_shim.ledger import Ledger


def _decide(ledger: Ledger, verdict: str, *, at: float, uid: int, script: str | None = None,
            exe: str | None = None, stage: str | None = None, recipients: int = 1,
            account: str = "web@kunde.example") -> None:
    ledger.record_decision(verdict=verdict, account=account, customer="kunde", uid=uid, user=f"web{uid}",
                           recipients=recipients, stage=stage, script=script, exe=exe, time=at)


def test_report_groups_by_script_and_uid_on_both_ledgers(ledger: Ledger) -> None:
    for _ in range(3):
        _decide(ledger, "sent", at=1000.0, uid=1001, script="1001:kontakt.php", recipients=2)
    _decide(ledger, "refused", at=1001.0, uid=1001, script="1001:kontakt.php", stage="LimitReached")
    _decide(ledger, "queued", at=1002.0, uid=1002, exe="php /srv/b/cron.php")
    _decide(ledger, "sent", at=5000.0, uid=1002, script="1002:late.php")  # after the range
    _decide(ledger, "sent", at=10.0, uid=1001, script="1001:early.php")  # before it

    by_script = ledger.report("script", 500.0, 2000.0)
    assert [(g.key, g.sent, g.queued, g.refused, g.recipients) for g in by_script.groups] == [
        ("1001:kontakt.php", 3, 0, 1, 6), ("php /srv/b/cron.php", 0, 1, 0, 1)]
    assert dict(by_script.groups[0].refused_by_reason) == {"LimitReached": 1}
    assert dict(by_script.groups[0].users) == {"web1001": 4}

    by_uid = ledger.report("uid", 500.0, 2000.0)
    assert [(g.key, g.mail, g.top_scripts) for g in by_uid.groups] == [
        (1001, 3, [("1001:kontakt.php", 4)]), (1002, 1, [("php /srv/b/cron.php", 1)])]
