"""Recipient outcomes and automatic blocks in the ledger, on SQLite and PostgreSQL.

What the gate test cannot reach: an admin's block in place when the rules are
over their threshold, two judgements of the same breach, and the outcomes
outside the window, before an unblock, or older than retention keeps.
"""

from __future__ import annotations

import time

from sendmail_shim import abuse
from sendmail_shim.config import Config, from_mapping
from sendmail_shim.ledger import Ledger, Outcome
from sendmail_shim.ledger.retention import MARGIN
from tests.ledger.common import add_account

ACCOUNT = "post@kunde.example"
PLAIN = {"upstream": {"host": "127.0.0.1"}, "spf": {"enabled": False}, "log": {"syslog": False}}


def abuse_config(**values: object) -> Config:
    rules = {"failed_share": 0.5, "failed_min": 4, "limit_refusals": 2, **values}
    return from_mapping({**PLAIN, "abuse": rules})


def record(ledger: Ledger, *outcomes: Outcome) -> None:
    ledger.settle_and_record_all([], outcomes)


def test_the_tally_counts_the_window_after_the_last_unblock(ledger: Ledger) -> None:
    add_account(ledger)
    now = time.time()
    record(ledger, Outcome(ACCOUNT, "kunde1", accepted=1, failed=3, at=now - 7200),  # outside the 1h window
           Outcome(ACCOUNT, "kunde1", accepted=2, deferred=1, failed=1, at=now - 60),
           Outcome(ACCOUNT, "kunde1", limited=1, at=now - 30),
           Outcome("other@kunde.example", "kunde1", failed=9, limited=9, at=now - 30))
    tally = ledger.outcome_tally(ACCOUNT, failed_since=now - 3600, limited_since=now - 600)
    assert (tally.recipients, tally.failed, tally.limited) == (4, 2, 1)
    ledger.block(ACCOUNT, "by hand")
    ledger.unblock(ACCOUNT)
    after = ledger.outcome_tally(ACCOUNT, failed_since=now - 3600, limited_since=now - 600)
    assert (after.recipients, after.failed, after.limited) == (0, 0, 0)


def test_a_breach_blocks_once_and_an_admins_block_stays(ledger: Ledger) -> None:
    add_account(ledger)
    add_account(ledger, "shop@kunde.example")
    config = abuse_config()
    for address in (ACCOUNT, "shop@kunde.example"):
        record(ledger, Outcome(address, "kunde1", accepted=4, failed=4))
    ledger.block("shop@kunde.example", "complaint from a recipient", actor="admin1")

    (block,) = abuse.judge_all(config, ledger, [Outcome(ACCOUNT, "kunde1", failed=1),
                                                Outcome("shop@kunde.example", "kunde1", failed=1)])
    assert (block.account, block.rule) == (ACCOUNT, "failed-share")
    assert block.reason == "auto: 4 of 8 recipients failed or deferred in 1h, a share of 0.50 where 0.5 blocks"
    assert abuse.judge(config, ledger, ACCOUNT, "kunde1") is None  # blocked already: not twice
    entry = ledger.find_account(ACCOUNT)
    assert entry is not None and (entry.blocked, entry.blocked_by, entry.block_reason) == (True, "auto", block.reason)
    manual = ledger.find_account("shop@kunde.example")
    assert manual is not None
    assert (manual.blocked_by, manual.block_reason) == ("admin", "complaint from a recipient")
    blocks = [e for e in ledger.audit_log(subject=ACCOUNT) if e.action == "account block"]
    assert [(e.actor, e.detail) for e in blocks] == [("sendmail-shim abuse", block.reason)]


def test_under_the_minimum_or_the_share_nothing_is_blocked(ledger: Ledger) -> None:
    add_account(ledger)
    config = abuse_config()
    record(ledger, Outcome(ACCOUNT, "kunde1", accepted=0, failed=3),  # 100 %, but 3 < 4
           Outcome(ACCOUNT, "kunde1", limited=2))  # 2 refusals: not more than 2
    assert abuse.judge(config, ledger, ACCOUNT, "kunde1") is None
    record(ledger, Outcome(ACCOUNT, "kunde1", accepted=10, failed=1))  # 4 of 14: under the share
    assert abuse.judge(config, ledger, ACCOUNT, "kunde1") is None
    record(ledger, Outcome(ACCOUNT, "kunde1", limited=1))
    block = abuse.judge(config, ledger, ACCOUNT, "kunde1")
    assert block is not None and block.reason == "auto: 3 refusals by the limits in 10m, more than 2"


def test_without_the_section_nothing_is_judged(ledger: Ledger) -> None:
    add_account(ledger)
    record(ledger, Outcome(ACCOUNT, "kunde1", failed=50))
    plain = from_mapping(PLAIN)
    assert abuse.judge_all(plain, ledger, [Outcome(ACCOUNT, "kunde1", failed=1)]) == []
    assert ledger.find_account(ACCOUNT).blocked is False  # type: ignore[union-attr]


def test_outcomes_older_than_a_day_are_pruned(ledger: Ledger) -> None:
    add_account(ledger)
    now = time.time()
    record(ledger, Outcome(ACCOUNT, "kunde1", failed=1, at=now - MARGIN - 60), Outcome(ACCOUNT, "kunde1", failed=1))
    assert ledger.prune().outcomes == 1
    tally = ledger.outcome_tally(ACCOUNT, failed_since=0, limited_since=0)
    assert tally.failed == 1
