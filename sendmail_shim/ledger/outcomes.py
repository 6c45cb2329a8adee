"""Outcomes: what the upstream did with each message's recipients, and refusals by the limits.

One row per message the upstream answered at RCPT, and one per refusal by a
limit; the automatic blocks (``sendmail_shim/abuse.py``) count them in a
window. Rows are pruned after a day (``retention.MARGIN``): no abuse window
is longer. Counting after an account's last unblock makes a lifted block a
fresh start.
"""

from __future__ import annotations

import time
from typing import NamedTuple

from .connections import Tx
from .inputs import canonical_address
from .store import Store


class Outcome(NamedTuple):
    """One message's recipients by the upstream's answer, or one refusal by a limit (``limited``)."""

    account: str
    customer_id: str | None
    accepted: int = 0
    deferred: int = 0
    failed: int = 0
    limited: int = 0
    at: float | None = None


class Tally(NamedTuple):
    """An account's outcomes since some instants (and since its last unblock)."""

    recipients: int  # accepted, deferred and failed, in the failed-share window
    failed: int  # deferred or refused, in the same window
    limited: int  # refusals by the limits, in the limit-refusals window


def insert_outcome(tx: Tx, outcome: Outcome) -> None:
    tx.run("INSERT INTO outcomes (at, account, customer_id, accepted, deferred, failed, limited) "
           "VALUES (:at, :account, :customer_id, :accepted, :deferred, :failed, :limited)",
           {**outcome._asdict(), "at": outcome.at if outcome.at is not None else time.time()})


# One indexed range read on (account, at); the window's rows are bounded by the limits.
_TALLY = (
    "SELECT coalesce(sum(CASE WHEN o.at >= :fs THEN o.accepted + o.deferred + o.failed ELSE 0 END), 0), "
    "coalesce(sum(CASE WHEN o.at >= :fs THEN o.deferred + o.failed ELSE 0 END), 0), "
    "coalesce(sum(CASE WHEN o.at >= :ls THEN o.limited ELSE 0 END), 0) "
    "FROM outcomes o WHERE o.account = :a AND o.at >= :since "
    "AND o.at > coalesce((SELECT unblocked_at FROM accounts WHERE address = :a), 0)"
)


def tally(store: Store, account: str, *, failed_since: float, limited_since: float) -> Tally:
    """The account's outcomes in both windows, only those after its last unblock."""
    params = {"a": canonical_address(account), "fs": failed_since, "ls": limited_since,
              "since": min(failed_since, limited_since)}
    with store.read() as tx:
        row = tx.rows(_TALLY, params)[0]
    return Tally(int(row[0]), int(row[1]), int(row[2]))
