"""The ledger's family of errors.

``str(exc)`` is the one line the user sees: what happened and what to do. The
exit code of each class is in ``sendmail_shim/exitcodes.py``, the one table.
"""

from __future__ import annotations

from ..limits import Rule
from .times import format_delay, format_instant

RUN_UPGRADE = "run: sendmail-shim db upgrade"


class LedgerError(Exception):
    """Family root."""


class LedgerUnavailable(LedgerError):
    """The ledger cannot be opened, locked or reached within the timeout: fail closed."""


class LedgerNotInitialised(LedgerError):
    """The schema is missing or older than this program: ``sendmail-shim db upgrade``."""


class UnsupportedLedger(LedgerError):
    """The ``[ledger] url`` names a database this program cannot use."""


class InvalidInput(LedgerError):
    """An address, customer id, user name, rule or reason that cannot be stored."""


class UnknownSubject(LedgerError):
    """An admin operation names an account, customer or override that does not exist."""


class Conflict(LedgerError):
    """The change contradicts what is stored (a domain or user of another customer)."""


class LimitReached(LedgerError):
    """The message does not fit a rule now; it will at ``next_free_at`` (epoch seconds)."""

    def __init__(
        self, scope: str, subject: str, rule: Rule, used: int, needed: int,
        next_free_at: float, now: float,
    ) -> None:
        self.scope, self.subject, self.rule = scope, subject, rule
        self.used, self.needed = used, needed
        self.next_free_at, self.now = next_free_at, now
        super().__init__(_limit_reached_line(self))


class LimitNeverFits(LedgerError):
    """The message is larger than a rule allows in any window."""

    def __init__(self, scope: str, subject: str, rule: Rule, needed: int) -> None:
        self.scope, self.subject, self.rule, self.needed = scope, subject, rule, needed
        who = scope_name(scope, subject)
        if rule.metric == "recipients":
            line = (f"this message has {needed} recipients but {who} may send at most "
                    f"{rule.phrase}, so it can never be sent; send to fewer recipients per "
                    f"message or use a bulk mail service")
        else:
            line = (f"{who} may send at most {rule.phrase}, so no message can be sent; "
                    f"ask your hosting provider about the limit")
        super().__init__(line)


def scope_name(scope: str, subject: str) -> str:
    return subject if scope == "account" else f"customer {subject} (all its accounts together)"


def _limit_reached_line(exc: LimitReached) -> str:
    usage = f"{exc.used} used"
    if exc.rule.metric == "recipients":
        usage += f", this message has {exc.needed}"
    # "reached" only when the rule is full; a message that merely does not fit "would exceed" it.
    verb = "reached" if exc.used >= exc.rule.limit else "would exceed"
    return (
        f"{scope_name(exc.scope, exc.subject)} {verb} {exc.rule.phrase} ({usage}); "
        f"next message possible at {format_instant(exc.next_free_at, exc.now)} "
        f"(in {format_delay(exc.next_free_at - exc.now)})"
    )


def no_customer(customer_id: str) -> UnknownSubject:
    return UnknownSubject(f"customer {customer_id} does not exist; add it with: sendmail-shim customer add")


def no_account(address: str) -> UnknownSubject:
    return UnknownSubject(f"{address} is not a registered account; add it with: sendmail-shim account add")
