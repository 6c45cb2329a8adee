"""Instants as the ledger keeps them (integer microseconds) and as its lines show them."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import overload

US = 1_000_000  # microseconds per second: every instant in the ledger is an integer of these


def format_instant(at: float, now: float | None = None) -> str:
    """``12:06:08 UTC``, with the date when it is not today (UTC); rounded up to the second."""
    moment = time.gmtime(math.ceil(at))
    today = time.gmtime(now if now is not None else time.time())
    if moment[:3] == today[:3]:
        return time.strftime("%H:%M:%S UTC", moment)
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", moment)


def format_utc(at: float) -> str:
    """``2026-06-01 12:00:00 UTC``."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(math.ceil(at)))


@overload
def iso_utc(at: float) -> str: ...
@overload
def iso_utc(at: None) -> None: ...
def iso_utc(at: float | None) -> str | None:
    """``2026-06-01T12:00:00.000000Z``: the one form of every time in a ``--json`` document and in the
    gate's STATUS answer (ISO 8601, UTC, exact to the microsecond the ledger keeps); None stays None."""
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def format_delay(seconds: float) -> str:
    """``2 min 31 s``; rounded up so the promise is never early."""
    total = max(0, math.ceil(seconds - 1e-9))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    return f"{secs} s"
