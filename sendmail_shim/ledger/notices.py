"""Notices: the claim that makes "at most one per rule and window" hold.

A notice is claimed by inserting its row; the unique key ``notices_once``
(kind, scope, subject, rule, window_start) makes the claim hold across
processes and servers sharing the ledger: whoever inserts first sends it,
everyone else finds the row and sends nothing. On top of that a claim is
refused while a notice of the same kind about the same rule is younger than
the rule's window, so that a steady sender whose oldest message keeps
leaving the window is not told again with every message; claims hold the
customer's lock, so that this check too holds across servers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from . import windows
from .store import Store
from .times import US

NOTICE_KINDS = ("warn", "limit", "block")


class Notice(NamedTuple):
    id: int
    at: float
    kind: str
    scope: str
    subject: str
    rule: str
    window_start: float
    recipients: str | None
    message_id: str | None


class NoticeClaim(NamedTuple):
    """What is about to be told, and to whom; ``window_start`` in epoch seconds."""

    kind: str
    scope: str
    subject: str
    customer_id: str  # whose lock serialises the claims, so the "recent" check holds across servers
    rule: str
    window_start: float
    window_seconds: int  # no second notice of this kind and rule within it
    recipients: str
    message_id: str


def claim(store: Store, notice: NoticeClaim) -> float | None:
    """Insert the notice's row; its time when this caller won the claim, None when it was taken already."""
    with store.write() as tx:
        store.lock_customer(tx, notice.customer_id)
        now = store.now_us(tx) / US
        recent = tx.rows(
            "SELECT 1 FROM notices WHERE kind = :k AND scope = :sc AND subject = :su AND rule = :r "
            "AND at > :since LIMIT 1",
            {"k": notice.kind, "sc": notice.scope, "su": notice.subject, "r": notice.rule,
             "since": now - notice.window_seconds})
        if recent:
            return None
        won = tx.rows(
            "INSERT INTO notices (at, kind, scope, subject, rule, window_start, recipients, message_id) "
            "VALUES (:at, :k, :sc, :su, :r, :w, :rc, :m) ON CONFLICT DO NOTHING RETURNING id",
            {"at": now, "k": notice.kind, "sc": notice.scope, "su": notice.subject, "r": notice.rule,
             "w": notice.window_start, "rc": notice.recipients, "m": notice.message_id})
    return now if won else None


def window_start(store: Store, scope: str, subject: str, metric: str, window: int) -> float:
    """When the rule's window began for the burst now in it: the oldest counted send still in it."""
    with store.read() as tx:
        now_us = store.now_us(tx)
        freed_us = windows.next_free_us(tx, scope, subject, metric, window, 1, now_us)
    return (freed_us - window * US) / US


def recent(store: Store, limit: int = 50, *, subject: str | None = None) -> list[Notice]:
    """The latest notices, newest first."""
    where = "WHERE subject = :s " if subject is not None else ""
    with store.read() as tx:
        rows = tx.rows("SELECT id, at, kind, scope, subject, rule, window_start, recipients, message_id "
                       f"FROM notices {where}ORDER BY id DESC LIMIT :n", {"s": subject, "n": limit})
    return [_notice(row) for row in rows]


def _notice(row: Sequence[Any]) -> Notice:
    return Notice(int(row[0]), float(row[1]), str(row[2]), str(row[3]), str(row[4]), str(row[5]),
                  float(row[6]), row[7], row[8])
