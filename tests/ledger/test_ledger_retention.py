"""Retention and timeouts: the ledger stays as large as its settings say, and usage never changes by it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

from sendmail_shim import queue
from sendmail_shim.addresses import parse_mailbox
from sendmail_shim.config import LedgerConfig, QueueConfig
from sendmail_shim.envelope import Envelope
from sendmail_shim.ledger import AccountEntry, Ledger, LimitReached, RuleUsage
from sendmail_shim.message import complete, parse
from tests.ledger.common import NOON, add_account, limits

DAY = 86400.0
PER_DAY = 1000
ACCOUNTS = 20  # 50 messages (100 recipients) a day each: within the provider's limits


@pytest.fixture
def fast_sqlite_url() -> Iterator[str]:
    """The 90-day run makes 180,000 commits: on memory-backed storage when there is some."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=base) as directory:
        yield f"sqlite:///{directory}/ledger.db"


def row_counts(ledger: Ledger) -> dict[str, int]:
    tables = ("sends", "usage_buckets", "decisions", "queue_messages", "queue_recipients", "audit")
    with ledger.transaction(write=False) as tx:
        return {table: int(tx.rows(f"SELECT count(*) FROM {table}")[0][0]) for table in tables}


def all_usage(ledger: Ledger, accounts: list[AccountEntry], now: float) -> list[RuleUsage]:
    found = [u for account in accounts for u in ledger.usage("account", account.address, now=now)]
    return found + ledger.usage("customer", "kunde1", now=now)


def queue_message(ledger: Ledger, reservation: object, n: int) -> str:
    """What sendmail does when the upstream says "later": the message and its reservation, committed."""
    message = parse(f"From: site0@kunde.example\nTo: r{n}@x.example\nSubject: {n}\n\nhei\n".encode(), True)
    complete(message, parse_mailbox("site0@kunde.example"), "by test")
    envelope = Envelope(parse_mailbox("site0@kunde.example"), (parse_mailbox(f"r{n}@x.example"),))
    return queue.enqueue(ledger, QueueConfig(), reservation=reservation, envelope=envelope,  # type: ignore[arg-type]
                         message=message, error="451 try later")


def finish_queued(ledger: Ledger, queue_id: str, send_id: int, at: float) -> None:
    """What a queue runner leaves once the upstream took it."""
    with ledger.transaction(write=True) as tx:
        tx.run("UPDATE queue_recipients SET state = 'delivered', updated_at = :t WHERE queue_id = :q",
               {"t": at, "q": queue_id})
        tx.run("UPDATE queue_messages SET state = 'done', finished_at = :t WHERE id = :q", {"t": at, "q": queue_id})
        ledger.settle_in(tx, send_id, "sent")


@pytest.mark.timeout(900)
def test_ninety_days_at_a_thousand_messages_a_day_stay_within_retention(fast_sqlite_url: str) -> None:
    settings = LedgerConfig(url=fast_sqlite_url, keep_queue=7 * 86400, keep_decisions=30 * 86400)
    ledger = Ledger(fast_sqlite_url, settings=settings)  # the provider's limits: the longest window is 30 days
    ledger.upgrade()
    accounts = [add_account(ledger, f"site{i}@kunde.example", "kunde1") for i in range(ACCOUNTS)]
    start, waiting, history = NOON - 90 * DAY, [], []
    for day in range(90):
        for n in range(PER_DAY):
            at = start + day * DAY + n * DAY / PER_DAY
            reservation = ledger.reserve(accounts[n % ACCOUNTS], 1 + n % 3, message_id=f"<{day}.{n}>", now=at)
            if n % 200 == 7:
                continue  # a process killed before it settled: the timeout resolves it
            if n % 50 == 3:
                waiting.append((queue_message(ledger, reservation, n), reservation.id, at + 2 * 3600))
                continue
            outcome = "released" if n % 100 == 11 else "sent"
            ledger.settle_and_record(reservation, outcome, {"verdict": outcome, "code": 0, "time": at})
        day_end = start + (day + 1) * DAY
        for queue_id, send_id, done_at in [w for w in waiting if w[2] < day_end]:
            finish_queued(ledger, queue_id, send_id, done_at)
        waiting = [w for w in waiting if w[2] >= day_end]
        before = all_usage(ledger, accounts, day_end)
        report = ledger.prune(now=day_end)
        assert all_usage(ledger, accounts, day_end) == before, f"pruning changed usage on day {day}"
        history.append((row_counts(ledger), report))
    counts, report = history[-1]
    # What the settings keep: 30 days of sends (the longest window) and a day's margin, 30 days of
    # decisions, 7 days of finished queue messages. Each day adds 1,000 sends, 975 decisions and 20
    # queued messages; the day being pruned may hold one more day than the cut.
    assert counts["sends"] <= (30 + 1 + 1) * PER_DAY
    assert counts["decisions"] <= (30 + 1) * PER_DAY
    assert counts["queue_messages"] <= (7 + 1) * PER_DAY // 50
    assert counts["queue_recipients"] == counts["queue_messages"]
    # Steady state: nothing grew over the last 45 days but the audit log of timed-out reservations.
    for table in ("sends", "usage_buckets", "decisions", "queue_messages"):
        assert counts[table] <= 1.02 * history[44][0][table], table
    assert counts["audit"] > history[44][0]["audit"]  # kept for good
    assert report.sends_before == NOON - 30 * DAY - DAY
    # Every reservation whose process died was resolved after the timeout (as the customer sent on),
    # and each left an audit row that pruning keeps.
    with ledger.transaction(write=False) as tx:
        rows = tx.rows("SELECT state, count(*) FROM sends GROUP BY state")
    states = {str(state): int(count) for state, count in rows}
    assert "reserved" not in states and states["expired"] == 31 * PER_DAY // 200
    assert len([e for e in ledger.audit_log(10_000) if e.action == "reservation expired"]) == 90 * PER_DAY // 200
    # The sends that still count are exactly those of the last 30 days, and the limits hold on them.
    kept = ledger.list_sends("account", accounts[0].address)
    assert min(s.at for s in kept) >= report.sends_before
    assert [u.used for u in ledger.usage("account", accounts[0].address, now=NOON)][-1] == sum(
        s.recipients for s in ledger.list_sends("account", accounts[0].address, counted_only=True)
        if s.at > NOON - 30 * DAY)


# --------------------------------------------------------------------------- timeouts


def short_timeout_ledger(url: str, seconds: int = 600) -> Ledger:
    ledger = Ledger(url, limits=limits(["3 messages / 1h"], ["100 messages / 1h"]),
                    settings=LedgerConfig(url=url, reservation_timeout=seconds))
    ledger.upgrade()
    return ledger


def test_an_unsettled_reservation_counts_until_its_timeout_then_stops_with_an_audit_row(ledger_url: str) -> None:
    ledger = short_timeout_ledger(ledger_url)
    account = add_account(ledger)
    for i in range(3):
        ledger.reserve(account, 1, message_id=f"<{i}>", now=NOON + i)  # three processes die here
    with pytest.raises(LimitReached):
        ledger.reserve(account, 1, message_id="<4>", now=NOON + 599)  # they count until the timeout
    assert ledger.usage("account", account.address, now=NOON + 599)[0].used == 3
    assert ledger.usage("account", account.address, now=NOON + 600.5)[0].used == 2  # the first has expired
    assert ledger.reserve(account, 1, message_id="<5>", now=NOON + 603).id
    states = [s.state for s in ledger.list_sends("account", account.address)]
    assert states == ["expired", "expired", "expired", "reserved"]
    entries = [e for e in ledger.audit_log(10) if e.action == "reservation expired"]
    assert len(entries) == 3 and entries[0].actor == "sendmail-shim"
    assert entries[-1].detail == ("send #1 of 1 recipient(s) (<0>), reserved at 2026-05-09 12:00:00 UTC, "
                                  "was not settled within 600 s; released: it no longer counts")


def test_a_timed_out_reservation_whose_message_the_queue_holds_counts_as_queued(ledger_url: str) -> None:
    ledger = short_timeout_ledger(ledger_url)
    account = add_account(ledger)
    held = ledger.reserve(account, 2, message_id="<held>", now=NOON)
    with ledger.transaction(write=True) as tx:  # a queue row whose settlement never happened
        tx.run("INSERT INTO queue_messages (id, kind, state, send_id, sender, data, created_at, attempts, "
               "next_attempt_at) VALUES ('qheld', 'message', 'queued', :s, 'post@kunde.example', :d, 0, 1, 0)",
               {"s": held.id, "d": b"x"})
    assert ledger.resolve_stale(now=NOON + 601) == 1
    assert [s.state for s in ledger.list_sends("account", account.address)] == ["queued"]
    assert ledger.usage("account", account.address, now=NOON + 602)[0].used == 1
    assert ledger.audit_log(1)[0].action == "reservation queued"


def test_a_late_settlement_after_the_timeout_is_recorded_and_counts_again(ledger_url: str) -> None:
    ledger = short_timeout_ledger(ledger_url)
    account = add_account(ledger)
    slow = ledger.reserve(account, 1, message_id="<slow>", now=NOON)
    assert ledger.resolve_stale(now=NOON + 700) == 1
    assert ledger.usage("account", account.address, now=NOON + 701)[0].used == 0
    ledger.settle(slow, "sent")  # its process was alive after all, and the upstream took it
    assert ledger.usage("account", account.address, now=NOON + 702)[0].used == 1
    assert [s.state for s in ledger.list_sends("account", account.address)] == ["sent"]
    assert ledger.audit_log(1)[0].action == "reservation settled late"


def test_pruning_keeps_the_audit_log_overrides_resets_and_what_still_counts(ledger_url: str) -> None:
    from sendmail_shim.limits import parse_rule

    ledger = short_timeout_ledger(ledger_url)
    account = add_account(ledger)
    old = ledger.reserve(account, 1, message_id="<old>", now=NOON - 60 * DAY)
    ledger.settle(old, "queued")  # still in the queue after 60 days (a long max_age): it counts
    ledger.settle(ledger.reserve(account, 1, message_id="<gone>", now=NOON - 60 * DAY + 1), "sent")
    ledger.reset_usage("account", account.address, reason="x", now=NOON - 50 * DAY)
    ledger.set_override("account", account.address, parse_rule("9 messages / 90d"), expires_at=NOON + DAY,
                        reason="long window", now=NOON - 10)
    ledger.settle(ledger.reserve(account, 1, message_id="<89 days>", now=NOON - 89 * DAY), "sent")
    report = ledger.prune(now=NOON)
    assert report.sends_before == NOON - 90 * DAY - DAY  # the override's window is the longest
    assert report.sends == 0
    audit_before = len(ledger.audit_log(100))
    assert ledger.prune(now=NOON + 40 * DAY).sends == 2  # the override has expired: the hour again
    assert [s.message_id for s in ledger.list_sends("account", account.address)] == ["<old>"]
    assert len(ledger.audit_log(100)) == audit_before
    assert len(ledger.list_overrides(include_expired=True)) == 1
