"""What the ledger knows, as metric families: the queue, the customers closest to a limit, recent decisions.

The gate's own counters say what this gate decided since it started; these say what
the ledger holds now, so they are the same from every gate and from ``sendmail-shim
metrics show``. They are read at scrape time, at most once per ``CACHE_SECONDS``:
a scrape costs a few indexed queries, however often Prometheus comes.

The customers are bounded: the ``top`` closest to a limit are named, the rest are
summed up under ``customer="(other)"``, so the label has at most ``top + 1`` values
however many customers the server has.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from . import __version__
from . import queue as queue_stage
from .ledger import Ledger, LedgerError, SubjectUsage
from .metrics import OTHER, Family, Sample

CACHE_SECONDS = 10.0
NEAR_LIMIT = 0.8  # a customer at this share of a rule is "near" it
RECENT_WINDOWS = (("1h", 3600), ("24h", 86400))  # for the textfile: decisions in the last hour and day


def build_info() -> Family:
    return Family("sendmail_shim_build_info", "gauge", "Always 1; the version of sendmail-shim as its label.",
                  (Sample("", (("version", __version__),), 1),))


def ledger_up(ok: bool, seconds: float) -> list[Family]:
    return [Family("sendmail_shim_ledger_up", "gauge",
                   "1 when the ledger could be read for these metrics, 0 when it could not.",
                   (Sample("", (), 1 if ok else 0),)),
            Family("sendmail_shim_ledger_read_duration_seconds", "gauge",
                   "How long reading the ledger's figures (queue, customers) took.", (Sample("", (), seconds),))]


# ------------------------------------------------------------------ the queue


def queue_families(summary: queue_stage.QueueSummary, now: float) -> list[Family]:
    oldest = 0.0 if summary.oldest_waiting_at is None else max(0.0, now - summary.oldest_waiting_at)
    return [
        Family("sendmail_shim_queue_messages", "gauge",
               "Messages in the retry queue, by state (held: never sent again, waiting for the admin).",
               tuple(Sample("", (("state", state),), count) for state, count in sorted(summary.messages.items()))),
        Family("sendmail_shim_queue_oldest_age_seconds", "gauge",
               "Age of the oldest queued message that may still be sent; 0 when none waits.",
               (Sample("", (), oldest),)),
    ]


# ------------------------------------------------------------------ customers


def customer_families(usage: Sequence[SubjectUsage], top: int) -> list[Family]:
    """The ``top`` customers closest to a limit by name, the others as ``(other)``; counts of all."""
    by_customer: dict[str, list[SubjectUsage]] = {}
    for item in usage:
        by_customer.setdefault(item.subject, []).append(item)
    ranked = sorted(by_customer, key=lambda c: (-max(u.ratio for u in by_customer[c]),
                                                -sum(u.used for u in by_customer[c]), c))
    named, others = ranked[:top], ranked[top:]
    ratios: list[Sample] = []
    used: list[Sample] = []
    for customer in named:
        for item in by_customer[customer]:
            labels = (("customer", customer), ("rule", str(item.rule)))
            ratios.append(Sample("", labels, round(item.ratio, 6)))
            used.append(Sample("", labels, item.used))
    rest: dict[str, list[SubjectUsage]] = {}
    for customer in others:
        for item in by_customer[customer]:
            rest.setdefault(str(item.rule), []).append(item)
    for rule, items in rest.items():  # in the order of the rules, as for the named customers
        labels = (("customer", OTHER), ("rule", rule))
        ratios.append(Sample("", labels, round(max(i.ratio for i in items), 6)))
        used.append(Sample("", labels, sum(i.used for i in items)))
    worst = {c: max(u.ratio for u in items) for c, items in by_customer.items()}
    return [
        Family("sendmail_shim_customer_usage_ratio", "gauge",
               f"Share of each customer rule used now, for the {top} customers closest to a limit; "
               "customer=\"(other)\" is the highest share among the rest.", tuple(ratios)),
        Family("sendmail_shim_customer_usage", "gauge",
               "Messages or recipients (as the rule counts) in each customer rule's window now; "
               "customer=\"(other)\" sums the customers not named.", tuple(used)),
        Family("sendmail_shim_customers", "gauge", "Customers registered in the ledger.",
               (Sample("", (), len(by_customer)),)),
        Family("sendmail_shim_customers_near_limit", "gauge",
               f"Customers that have used at least {NEAR_LIMIT:.0%} of one of their rules now.",
               (Sample("", (), sum(1 for r in worst.values() if r >= NEAR_LIMIT)),)),
        Family("sendmail_shim_customers_at_limit", "gauge",
               "Customers that have used all of one of their rules now: their next message waits or is refused.",
               (Sample("", (), sum(1 for r in worst.values() if r >= 1)),)),
    ]


def blocked_families(blocked: dict[str, int]) -> list[Family]:
    """How many accounts are blocked now, by an admin and by the [abuse] rules."""
    return [Family("sendmail_shim_accounts_blocked", "gauge",
                   "Sending accounts blocked now, by who blocked them: admin (account block) or auto "
                   "(the [abuse] rules).", tuple(Sample("", (("by", by),), n) for by, n in sorted(blocked.items())))]


# ------------------------------------------------------------------ decisions (for the textfile)


def recent_families(ledger: Ledger, now: float) -> list[Family]:
    """Decisions in the last hour and day, by verdict and stage: what the textfile has for counters."""
    messages: list[Sample] = []
    recipients: dict[tuple[str, str], int] = {}
    for window, seconds in RECENT_WINDOWS:
        for count in ledger.decision_counts(now - seconds):
            labels = (("verdict", count.verdict), ("stage", count.stage or ""), ("window", window))
            messages.append(Sample("", labels, count.messages))
            key = (count.verdict, window)
            recipients[key] = recipients.get(key, 0) + count.recipients
    return [
        Family("sendmail_shim_recent_messages", "gauge",
               "Messages decided in the last hour or day (window), by verdict and, for refusals, stage; "
               "from the ledger's decision log.", tuple(messages)),
        Family("sendmail_shim_recent_recipients", "gauge",
               "Envelope recipients of the messages decided in the last hour or day, by verdict.",
               tuple(Sample("", (("verdict", v), ("window", w)), n) for (v, w), n in sorted(recipients.items()))),
    ]


# ------------------------------------------------------------------ reading them


def ledger_families(ledger: Ledger, top: int, *, recent: bool = False, now: float | None = None) -> list[Family]:
    """Every family the ledger knows, read now; ``sendmail_shim_ledger_up 0`` alone when it cannot be read."""
    started = time.monotonic()
    now = time.time() if now is None else now
    try:
        found = queue_families(queue_stage.summary(ledger), now)
        found += customer_families(ledger.usage_of_every_customer(now), top)
        found += blocked_families(ledger.blocked_accounts())
        if recent:
            found += recent_families(ledger, now)
    except LedgerError:
        return ledger_up(False, time.monotonic() - started)
    return [*ledger_up(True, time.monotonic() - started), *found]


class CachedLedgerFamilies:
    """``ledger_families`` read at most once per ``interval``: a collector for the gate's registry.

    One reader at a time; a scrape that comes while another reads waits for its result.
    """

    def __init__(self, ledger: Callable[[], Ledger], top: Callable[[], int], interval: float = CACHE_SECONDS) -> None:
        self._ledger, self._top, self.interval = ledger, top, interval
        self._lock = threading.Lock()
        self._read_at = -interval
        self._families: list[Family] = []

    def __call__(self) -> list[Family]:
        with self._lock:
            if time.monotonic() - self._read_at >= self.interval:
                self._families = ledger_families(self._ledger(), self._top())
                self._read_at = time.monotonic()
            return list(self._families)


def textfile(ledger: Ledger, top: int, now: float | None = None) -> str:
    """The document ``sendmail-shim metrics write`` puts where node-exporter's textfile collector reads."""
    from .metrics import render

    return render([build_info(), *ledger_families(ledger, top, recent=True, now=now)])
