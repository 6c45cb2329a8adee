"""The notice claim: one winner per rule and window, also when processes race on PostgreSQL."""

from __future__ import annotations

import multiprocessing
from typing import Any

from sendmail_shim.ledger import Ledger, NoticeClaim
from tests.ledger.common import open_ledger

FORK = multiprocessing.get_context("fork")
SUBJECTS = [f"post{i}@kunde.example" for i in range(10)]


def claim(subject: str = "post@kunde.example", start: float = 1000.0, kind: str = "limit") -> NoticeClaim:
    return NoticeClaim(kind, "account", subject, "kunde1", "10 messages / 5m", start, 300, "drift@kunde.example",
                       "<id@p>")


def test_one_claim_per_rule_and_window_and_none_while_the_last_is_recent(ledger: Ledger) -> None:
    ledger.add_customer("kunde1")
    assert ledger.claim_notice(claim()) is not None
    assert ledger.claim_notice(claim()) is None  # the same window: told already
    assert ledger.claim_notice(claim(start=1001.0)) is None  # another start, but the last notice is recent
    assert ledger.claim_notice(claim(kind="warn")) is not None  # the warning is another notice
    assert ledger.claim_notice(claim(subject="other@kunde.example")) is not None
    assert [(n.kind, n.subject) for n in ledger.notices()] == [
        ("limit", "other@kunde.example"), ("warn", "post@kunde.example"), ("limit", "post@kunde.example")]


def _race(url: str, barrier: Any, results: Any) -> None:
    try:
        ledger = Ledger(url)
        ledger.notices(1)  # connected and warm before the start
        barrier.wait(timeout=60)
        results.put([s for s in SUBJECTS if ledger.claim_notice(claim(s)) is not None])
    except Exception as exc:  # reported to the test, which fails on it
        results.put(f"{type(exc).__name__}: {exc}")


def test_racing_processes_on_postgresql_send_each_notice_once(pg_url: str) -> None:
    with open_ledger(pg_url) as ledger:
        ledger.add_customer("kunde1")
    barrier, results = FORK.Barrier(6), FORK.Queue()
    processes = [FORK.Process(target=_race, args=(pg_url, barrier, results)) for _ in range(6)]
    for process in processes:
        process.start()
    won = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    assert all(isinstance(w, list) for w in won), won
    assert sorted(s for w in won for s in w) == sorted(SUBJECTS)  # every notice once, none twice
