"""Usage over rolling windows, exact, at a cost that does not grow with use.

A send counts for a scope (its account, and its customer) while its state is
``reserved``, ``sent`` or ``queued`` and it is newer than the scope's latest
usage reset (``usage_resets.upto_send_id``).

The invariant. For every scope and every grain ``g`` of ``GRAINS`` (a day, an
hour, a minute), ``usage_buckets`` holds per bucket ``[start, start + g)`` the
messages and recipients of the sends in it that count for the scope. Whatever
makes a send start or stop counting changes its buckets in the same
transaction, under the customer's lock:

- a reservation adds the send to its three buckets in each scope;
- a release (refused, bounced, deleted from the queue, or a reservation that
  timed out) takes it away; a late settlement of a timed-out one adds it back;
- a usage reset empties the scope's buckets (everything in them is older than
  the reset), and a later change to a send older than the reset leaves them be;
- pruning removes only buckets that end before the start of every window.

Usage in the window ``(now - W, now]`` is then exact, and sends dated after
``now`` (a clock that stepped back) count too. With ``s = now - W + 1 µs``
and ``c_min <= c_hour <= c_day`` the first multiples of a minute, an hour and
a day at or after ``s``, the window is the sum of four disjoint parts:

    counted sends with  s <= at < c_min      (exact rows: under a minute of them)
    minute buckets in   [c_min, c_hour)      (fewer than 60)
    hour buckets in     [c_hour, c_day)      (fewer than 24)
    day buckets from    c_day on             (W / 1 d of them, and any after now)

so a reservation reads a bounded number of rows however many sends its
windows hold: about 110 for the 30-day rule, never 5,000.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from .connections import Tx
from .times import US

COUNTED_STATES = ("reserved", "sent", "queued")
COUNTED_SQL = "state IN ('reserved', 'sent', 'queued')"
SCOPE_COLUMN = {"account": "account", "customer": "customer_id"}

MINUTE, HOUR, DAY = 60 * US, 3600 * US, 86400 * US
GRAINS = (MINUTE, HOUR, DAY)  # in the order of the table's key, so that row locks are taken in one order
_FINER: dict[int, int | None] = {DAY: HOUR, HOUR: MINUTE, MINUTE: None}

_UPSERT = (
    "INSERT INTO usage_buckets (scope, subject, grain_us, start_us, messages, recipients) VALUES {rows} "
    "ON CONFLICT (scope, subject, grain_us, start_us) DO UPDATE SET "
    "messages = usage_buckets.messages + excluded.messages, "
    "recipients = usage_buckets.recipients + excluded.recipients"
)


class CountedSend(NamedTuple):
    """What the buckets need of one send."""

    id: int
    account: str
    customer_id: str
    recipients: int
    at_us: int

    def subject(self, scope: str) -> str:
        return self.account if scope == "account" else self.customer_id


class _Piece(NamedTuple):
    """Part of a window: exact sends (grain None) or buckets of one grain, from ``low`` to ``high``."""

    grain: int | None
    low: int
    high: int | None  # None: no end


def counted_filter(scope: str) -> str:
    """Sends that count for a scope (``:subject``): not released and newer than the latest reset."""
    return (
        f"{SCOPE_COLUMN[scope]} = :subject AND {COUNTED_SQL} AND id > "
        "(SELECT coalesce(max(upto_send_id), 0) FROM usage_resets "
        f"WHERE scope = '{scope}' AND subject = :subject)"
    )


# --------------------------------------------------------------------------- keeping the invariant


def add(tx: Tx, send: CountedSend, scopes: Sequence[str] = tuple(SCOPE_COLUMN)) -> None:
    """Count a send in its buckets of the given scopes (a new reservation: both)."""
    rows: list[str] = []
    params: dict[str, Any] = {}
    for scope in scopes:
        for grain in GRAINS:
            n = len(rows)
            rows.append(f"(:sc{n}, :su{n}, {grain}, :st{n}, 1, :r{n})")
            params.update({f"sc{n}": scope, f"su{n}": send.subject(scope),
                           f"st{n}": send.at_us // grain * grain, f"r{n}": send.recipients})
    if rows:
        tx.run(_UPSERT.format(rows=", ".join(rows)), params)


def take(tx: Tx, send: CountedSend, scopes: Sequence[str]) -> None:
    """Stop counting a send in its buckets (a bucket pruned already is left alone).

    One statement per bucket, by its whole key: an OR of keys would make SQLite
    scan the subject's buckets, and the order keeps PostgreSQL's row locks in one order.
    """
    for scope in scopes:
        for grain in GRAINS:
            tx.run("UPDATE usage_buckets SET messages = messages - 1, recipients = recipients - :r "
                   "WHERE scope = :sc AND subject = :su AND grain_us = :g AND start_us = :st",
                   {"r": send.recipients, "sc": scope, "su": send.subject(scope), "g": grain,
                    "st": send.at_us // grain * grain})


def change(tx: Tx, send: CountedSend, sign: int) -> None:
    """A send starts (+1) or stops (-1) counting after the fact: only scopes not reset since it count."""
    scopes = [scope for scope in SCOPE_COLUMN if _newer_than_reset(tx, scope, send)]
    (add if sign > 0 else take)(tx, send, scopes)


def _newer_than_reset(tx: Tx, scope: str, send: CountedSend) -> bool:
    rows = tx.rows("SELECT coalesce(max(upto_send_id), 0) FROM usage_resets WHERE scope = :sc AND subject = :su",
                   {"sc": scope, "su": send.subject(scope)})
    return send.id > int(rows[0][0])


def clear(tx: Tx, scope: str, subject: str) -> None:
    """After a usage reset: nothing sent so far counts for this scope any more."""
    tx.run("DELETE FROM usage_buckets WHERE scope = :sc AND subject = :su", {"sc": scope, "su": subject})


# --------------------------------------------------------------------------- reading windows


def _pieces(window: int, now_us: int) -> list[_Piece]:
    """The window (now - W, now] and everything after it, oldest part first."""
    start = now_us - window * US + 1
    c_min, c_hour, c_day = (_round_up(start, grain) for grain in GRAINS)
    return [_Piece(None, start, c_min), _Piece(MINUTE, c_min, c_hour), _Piece(HOUR, c_hour, c_day),
            _Piece(DAY, c_day, None)]


def _round_up(at_us: int, grain: int) -> int:
    return -(-at_us // grain) * grain


def _piece_sql(scope: str, piece: _Piece, tag: str, totals: bool) -> tuple[str, dict[str, Any]]:
    """The rows of one piece (``totals``: their sums), with parameters named after ``tag``."""
    params: dict[str, Any] = {f"lo{tag}": piece.low}
    upper = f" AND {{column}} < :hi{tag}" if piece.high is not None else ""
    if piece.high is not None:
        params[f"hi{tag}"] = piece.high
    if piece.grain is None:
        where = f"{counted_filter(scope)} AND at_us >= :lo{tag}" + upper.format(column="at_us")
        if totals:
            return f"SELECT count(*), coalesce(sum(recipients), 0) FROM sends WHERE {where}", params
        return f"SELECT at_us, 1, recipients FROM sends WHERE {where} ORDER BY at_us, id", params
    where = (f"scope = '{scope}' AND subject = :subject AND grain_us = {piece.grain} "
             f"AND start_us >= :lo{tag}" + upper.format(column="start_us"))
    if totals:
        sums = "coalesce(sum(messages), 0), coalesce(sum(recipients), 0)"
        return f"SELECT {sums} FROM usage_buckets WHERE {where}", params
    return f"SELECT start_us, messages, recipients FROM usage_buckets WHERE {where} ORDER BY start_us", params


def window_sums(tx: Tx, scope: str, subject: str, windows: Sequence[int],
                now_us: int) -> dict[tuple[str, int], int]:
    """Messages and recipients in each window (now - W, now], in one query."""
    ordered = sorted(set(windows))
    parts, params = [], {"subject": subject}
    for i, window in enumerate(ordered):
        for j, piece in enumerate(_pieces(window, now_us)):
            sql, piece_params = _piece_sql(scope, piece, f"{i}_{j}", totals=True)
            parts.append(sql.replace("SELECT ", f"SELECT {i} AS w, ", 1))
            params.update(piece_params)
    sums: dict[tuple[str, int], int] = {}
    for window in ordered:
        sums[("messages", window)] = sums[("recipients", window)] = 0
    if parts:
        for index, messages, recipients in tx.rows(" UNION ALL ".join(parts), params):
            window = ordered[int(index)]
            sums[("messages", window)] += int(messages)
            sums[("recipients", window)] += int(recipients)
    return sums


def next_free_us(tx: Tx, scope: str, subject: str, metric: str, window: int, excess: int,
                 now_us: int) -> int:
    """The instant enough of the oldest counted sends have left the window to free ``excess``.

    The walk goes oldest first; a bucket in which the total reaches ``excess``
    is opened into its finer buckets, down to the sends of one minute.
    """
    pending = _pieces(window, now_us)
    freed = 0
    while pending:
        piece = pending.pop(0)
        for position, size in _amounts(tx, scope, subject, metric, piece):
            if freed + size < excess:
                freed += size
                continue
            if piece.grain is None:
                return position + window * US
            pending = [_Piece(_FINER[piece.grain], position, position + piece.grain)]
            break
    return now_us  # unreachable while the message fits the rule at all


def _amounts(tx: Tx, scope: str, subject: str, metric: str, piece: _Piece) -> Iterator[tuple[int, int]]:
    sql, params = _piece_sql(scope, piece, "", totals=False)
    for position, messages, recipients in tx.rows(sql, {"subject": subject, **params}):
        yield int(position), int(messages if metric == "messages" else recipients)
