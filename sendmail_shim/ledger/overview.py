"""Read-only views across every subject, for the metrics: each customer's usage now, the blocks."""

from __future__ import annotations

from typing import NamedTuple

from ..limits import Rule
from . import windows
from .rates import Override, Rates, apply_overrides, select_overrides
from .store import Store
from .times import US


class SubjectUsage(NamedTuple):
    """One rule of one customer and how much of it is used now."""

    subject: str
    rule: Rule
    used: int

    @property
    def ratio(self) -> float:
        return self.used / self.rule.limit if self.rule.limit else 1.0


def usage_of_every_customer(rates: Rates, now: float | None = None) -> list[SubjectUsage]:
    """Every customer's rules (overrides in force applied) and their use now, in one read.

    Each customer costs one indexed query (``windows.window_sums``), bounded however much
    it sent; timed-out reservations are shown as they stand (the next reservation resolves them).
    """
    store = rates.store
    with store.read() as tx:
        now_us = store.now_us(tx, now)
        customers = [str(r[0]) for r in tx.rows("SELECT id FROM customers ORDER BY id")]
        overrides: dict[str, list[Override]] = {}
        for found in select_overrides(tx, "scope = 'customer' AND expires_at > :now", {"now": now_us / US}):
            overrides.setdefault(found.subject, []).append(found)
        usage: list[SubjectUsage] = []
        for customer in customers:
            rules = apply_overrides("customer", customer, rates.limits.customer, overrides.get(customer, []))
            if not rules:
                continue
            used = windows.window_sums(tx, "customer", customer, [r.rule.window_seconds for r in rules], now_us)
            usage += [SubjectUsage(customer, r.rule, used[(r.rule.metric, r.rule.window_seconds)]) for r in rules]
    return usage


BLOCKERS = ("admin", "auto")


def blocked_accounts(store: Store) -> dict[str, int]:
    """Accounts blocked now, by who blocked them; a block older than migration 0008 counts as an admin's."""
    with store.read() as tx:
        rows = tx.rows("SELECT COALESCE(blocked_by, 'admin'), COUNT(*) FROM accounts WHERE blocked = 1 "
                       "GROUP BY COALESCE(blocked_by, 'admin')")
    found = dict.fromkeys(BLOCKERS, 0)
    found.update({str(by): int(n) for by, n in rows})
    return found
