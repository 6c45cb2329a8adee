"""Rate-limit rules as written in the config: ``"25 messages / 5m"``.

A rule caps one metric (``messages`` or unique envelope ``recipients``) over a
rolling window. The defaults are the provider's published limits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

METRICS = ("messages", "recipients")

DEFAULT_ACCOUNT_RULES = (
    "25 messages / 5m",
    "250 recipients / 5m",
    "1000 recipients / 24h",
    "5000 recipients / 30d",
)
DEFAULT_CUSTOMER_RULES = ("250 messages / 1h", "1500 recipients / 1h")

_UNIT_SECONDS = {
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}
_RULE = re.compile(
    r"^\s*(?P<count>\d+)\s+(?P<metric>messages?|recipients?)\s*/\s*"
    r"(?P<size>\d+)?\s*(?P<unit>[a-z]+)\s*$"
)


class RuleSyntaxError(ValueError):
    """A limit rule that cannot be read."""


@dataclass(frozen=True)
class Rule:
    """At most ``limit`` of ``metric`` within any ``window_seconds``."""

    metric: str
    limit: int
    window_seconds: int

    def __str__(self) -> str:
        return f"{self.limit} {self.metric} / {describe_window(self.window_seconds)}"

    @property
    def phrase(self) -> str:
        """Human wording for stderr lines: ``25 messages per 5 minutes``."""
        return f"{self.limit} {self.metric} per {describe_window(self.window_seconds, long=True)}"


def parse_rule(text: str) -> Rule:
    match = _RULE.match(text.lower())
    if not match:
        raise RuleSyntaxError(
            f"{text!r} is not a limit rule; write it like \"25 messages / 5m\""
        )
    unit = match["unit"]
    if unit not in _UNIT_SECONDS:
        raise RuleSyntaxError(f"{text!r}: unknown time unit {unit!r} (use s, m, h or d)")
    size = int(match["size"] or 1)
    window = size * _UNIT_SECONDS[unit]
    if window <= 0:
        raise RuleSyntaxError(f"{text!r}: the window must be longer than zero")
    metric = match["metric"] if match["metric"].endswith("s") else match["metric"] + "s"
    return Rule(metric=metric, limit=int(match["count"]), window_seconds=window)


def describe_window(seconds: int, long: bool = False) -> str:
    """``300`` → ``5m`` (or ``5 minutes`` with ``long``)."""
    for size, short, word in ((86400, "d", "day"), (3600, "h", "hour"), (60, "m", "minute")):
        if seconds % size == 0:
            count = seconds // size
            if not long:
                return f"{count}{short}"
            return word if count == 1 else f"{count} {word}s"
    return f"{seconds} seconds" if long else f"{seconds}s"
