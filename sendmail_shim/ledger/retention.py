"""Retention: the ledger is as large as its settings make it, not as old as the server.

What is kept:

- sends and usage buckets for the longest window of any rule (configured or
  an override in force) plus ``MARGIN``, and every send still reserved or
  queued, whatever its age: usage is exactly the same before and after;
- finished queue messages for ``[ledger] keep_queue``;
- decisions for ``[ledger] keep_decisions``;
- recipient outcomes (for the abuse rules, whose windows are at most a day) for ``MARGIN``;
- SPF verdicts until they expire;
- the audit log, usage resets and overrides for good (admins make them, not traffic).

Pruning deletes in batches of ``BATCH`` rows, one short transaction each, so a
first prune of a large ledger never holds SQLite's write lock for long. The
gate runs ``Housekeeping`` in a thread; other installations run
``sendmail-shim db prune`` from a timer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import NamedTuple

from .errors import LedgerError
from .rates import Rates
from .store import Store
from .times import US
from .windows import DAY

MARGIN = 86400  # seconds kept beyond the longest window
BATCH = 5000
STALE_SWEEP_EVERY = 60.0  # the gate's sweep for timed-out reservations, at most this far apart
PRUNE_EVERY = 3600.0


class PruneReport(NamedTuple):
    """What one prune removed (row counts) and the instants it cut at."""

    sends: int
    usage_buckets: int
    queue_messages: int
    decisions: int
    spf_verdicts: int
    reservations_resolved: int
    sends_before: float
    queue_before: float
    decisions_before: float
    outcomes: int = 0


def resolve_all_stale(store: Store, rates: Rates, now: float | None = None) -> int:
    """Resolve every reservation older than ``[ledger] reservation_timeout``, customer by customer."""
    with store.read() as tx:
        now_us = store.now_us(tx, now)
        cut = now_us - round(rates.settings.reservation_timeout * US)
        customers = [str(row[0]) for row in tx.rows(
            "SELECT DISTINCT customer_id FROM sends WHERE state = 'reserved' AND at_us < :cut", {"cut": cut})]
    resolved = 0
    for customer_id in customers:
        with store.write() as tx:
            store.lock_customer(tx, customer_id)
            resolved += rates.resolve_stale(tx, customer_id, now_us)
    return resolved


def longest_window(store: Store, rates: Rates, now: float) -> int:
    """Seconds: the longest window of a configured rule or of an override in force."""
    configured = [rule.window_seconds for rule in (*rates.limits.account, *rates.limits.customer)]
    with store.read() as tx:
        rows = tx.rows("SELECT coalesce(max(window_seconds), 0) FROM overrides WHERE expires_at > :t", {"t": now})
    return max([*configured, int(rows[0][0]), 1])


def prune(store: Store, rates: Rates, now: float | None = None) -> PruneReport:
    """Resolve timed-out reservations, then delete what retention no longer keeps."""
    resolved = resolve_all_stale(store, rates, now)
    with store.read() as tx:
        at = store.now_us(tx, now) / US
    settings = rates.settings
    sends_before = at - longest_window(store, rates, at) - MARGIN
    cut_us = round(sends_before * US)
    queue_before, decisions_before = at - settings.keep_queue, at - settings.keep_decisions
    return PruneReport(
        sends=_in_batches(store, "sends", "id", "at_us < :cut AND state IN ('sent', 'released', 'expired')",
                          {"cut": cut_us}),
        # A bucket may go once even a day bucket starting there has ended before the cut.
        usage_buckets=_in_batches(store, "usage_buckets", "scope, subject, grain_us, start_us",
                                  "start_us <= :cut", {"cut": cut_us - DAY}),
        queue_messages=_prune_queue(store, queue_before),
        decisions=_in_batches(store, "decisions", "id", "at < :cut", {"cut": decisions_before}),
        spf_verdicts=_in_batches(store, "spf_cache", "domain, ip", "expires_at < :cut", {"cut": at}),
        reservations_resolved=resolved,
        sends_before=sends_before, queue_before=queue_before, decisions_before=decisions_before,
        outcomes=_in_batches(store, "outcomes", "id", "at < :cut", {"cut": at - MARGIN}),
    )


def _prune_queue(store: Store, before: float) -> int:
    """Finished messages and their recipients, in one transaction per batch of messages."""
    removed = 0
    while True:
        with store.write() as tx:
            ids = [str(row[0]) for row in tx.rows(
                "SELECT id FROM queue_messages WHERE state = 'done' AND finished_at < :cut ORDER BY id LIMIT :n",
                {"cut": before, "n": BATCH})]
            if not ids:
                return removed
            names = {f"q{i}": queue_id for i, queue_id in enumerate(ids)}
            listed = ", ".join(f":{name}" for name in names)
            tx.run(f"DELETE FROM queue_recipients WHERE queue_id IN ({listed})", names)
            removed += tx.run(f"DELETE FROM queue_messages WHERE id IN ({listed})", names)
        if len(ids) < BATCH:
            return removed


def _in_batches(store: Store, table: str, key: str, where: str, params: dict[str, object]) -> int:
    """DELETE the rows of ``table`` matching ``where``, at most BATCH per transaction."""
    sql = (f"DELETE FROM {table} WHERE ({key}) IN "
           f"(SELECT {key} FROM {table} WHERE {where} LIMIT {BATCH})")
    removed = 0
    while True:
        with store.write() as tx:
            count = tx.run(sql, params)
        removed += count
        if count < BATCH:
            return removed


class Housekeeping:
    """The gate's background work: timed-out reservations every minute, pruning every hour.

    Each round that changed something is reported to ``report`` (the gate logs
    it). A round that fails (the database is down) is reported and tried again
    at the next turn: housekeeping never stops the gate.
    """

    def __init__(self, store: Store, rates: Rates, report: Callable[[str, dict[str, object]], None]) -> None:
        self.store, self.rates, self.report = store, rates, report
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ledger-housekeeping", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the round in progress; a round cut short by the exit only rolls back its batch."""
        self.stopping.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        sweep = min(STALE_SWEEP_EVERY, max(1.0, self.rates.settings.reservation_timeout / 2))
        since_prune = PRUNE_EVERY - sweep  # the first prune comes soon after the start
        while not self.stopping.wait(sweep):
            since_prune += sweep
            if since_prune >= PRUNE_EVERY:
                since_prune = 0.0
                self._round("ledger-prune", lambda: prune(self.store, self.rates)._asdict())
            else:
                self._round("ledger-reservations", lambda: {
                    "reservations_resolved": resolve_all_stale(self.store, self.rates)})

    def _round(self, event: str, work: Callable[[], dict[str, object]]) -> None:
        try:
            done = work()
        except LedgerError as exc:
            self.report(event, {"reason": str(exc), "failed": True})
            return
        counts = {name: value for name, value in done.items() if not name.endswith("_before")}
        if any(counts.values()):
            self.report(event, counts)
