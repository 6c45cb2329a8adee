"""Usage over rolling windows: how much of a rule's window is used, and when it frees.

A send counts for a scope (its account, its customer) while its state is
reserved, sent or queued and it is newer than the scope's latest usage reset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .connections import Tx
from .times import US

COUNTED_STATES = ("reserved", "sent", "queued")
COUNTED_SQL = "state IN ('reserved', 'sent', 'queued')"
SCOPE_COLUMN = {"account": "account", "customer": "customer_id"}


def counted_filter(scope: str) -> str:
    """Sends that count for a scope: not released and after the latest reset marker."""
    return (
        f"{SCOPE_COLUMN[scope]} = :subject AND {COUNTED_SQL} AND id > "
        "(SELECT coalesce(max(upto_send_id), 0) FROM usage_resets "
        f"WHERE scope = '{scope}' AND subject = :subject)"
    )


def window_sums(tx: Tx, scope: str, subject: str, windows: Sequence[int],
                now_us: int) -> dict[tuple[str, int], int]:
    """Messages and recipients in each window (now - W, now], one query."""
    ordered = sorted(set(windows), reverse=True)
    if not ordered:
        return {}
    params: dict[str, Any] = {"subject": subject}
    columns = []
    for i, window in enumerate(ordered):
        # Sends dated after now (a clock that stepped back) count too: that keeps
        # every later window within the limit.
        params[f"c{i}"] = now_us - window * US
        columns.append(f"coalesce(sum(CASE WHEN at_us > :c{i} THEN 1 ELSE 0 END), 0)")
        columns.append(f"coalesce(sum(CASE WHEN at_us > :c{i} THEN recipients ELSE 0 END), 0)")
    sql = (f"SELECT {', '.join(columns)} FROM sends WHERE {counted_filter(scope)} "
           "AND at_us > :c0")
    row = tx.rows(sql, params)[0]
    sums: dict[tuple[str, int], int] = {}
    for i, window in enumerate(ordered):
        sums[("messages", window)] = int(row[2 * i])
        sums[("recipients", window)] = int(row[2 * i + 1])
    return sums


def next_free_us(tx: Tx, scope: str, subject: str, metric: str, window: int, excess: int,
                 now_us: int) -> int:
    """The instant enough of the oldest sends have left the window to free ``excess``."""
    window_us = window * US
    amount = "1" if metric == "messages" else "recipients"
    rows = tx.rows(
        f"SELECT at_us, {amount} FROM sends WHERE {counted_filter(scope)} "
        "AND at_us > :cutoff ORDER BY at_us, id",
        {"subject": subject, "cutoff": now_us - window_us},
    )
    freed = 0
    for at_us, size in rows:
        freed += int(size)
        if freed >= excess:
            return int(at_us) + window_us
    return now_us  # unreachable while the message fits the rule at all
