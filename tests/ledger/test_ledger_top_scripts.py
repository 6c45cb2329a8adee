"""The scripts that sent most, as a notice and a report name them."""

from __future__ import annotations

from sendmail_shim.ledger import Ledger


def test_top_scripts_ranks_by_messages_and_falls_back_to_the_executable(ledger: Ledger) -> None:
    for script, n in (("12:contact.php", 3), ("12:newsletter.php", 5)):
        for _ in range(n):
            ledger.record_decision(verdict="sent", account="web@kunde.example", customer="kunde",
                                   script=script, time=1000.0)
    ledger.record_decision(verdict="sent", account="web@kunde.example", customer="kunde",
                           exe="/usr/bin/python3", time=1000.0)
    ledger.record_decision(verdict="sent", account="web@kunde.example", customer="kunde", time=1000.0)
    ledger.record_decision(verdict="sent", account="web@kunde.example", customer="kunde",
                           script="12:old.php", time=10.0)
    ledger.record_decision(verdict="sent", account="other@kunde.example", customer="kunde",
                           script="12:other.php", time=1000.0)

    assert ledger.top_scripts("account", "WEB@kunde.example", since=500.0) == [
        ("12:newsletter.php", 5), ("12:contact.php", 3), ("/usr/bin/python3", 1)]
    assert ledger.top_scripts("customer", "kunde", since=500.0, limit=2) == [
        ("12:newsletter.php", 5), ("12:contact.php", 3)]
    assert ledger.top_scripts("account", "web@kunde.example", since=0.0, limit=10)[-1] == ("12:old.php", 1)
