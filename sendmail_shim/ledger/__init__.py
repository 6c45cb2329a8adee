"""The ledger: the store behind every decision.

One module per concern, each over one ``Store`` (``store.py``):

- ``connections``: transactions on SQLite (standard library) and on SQLAlchemy (PostgreSQL);
- ``schema``: every table, the queue's included, and the migrations;
- ``directory``: customers, accounts, domains and Unix-user bindings;
- ``rates`` and ``windows``: reservations, settlement, usage, overrides and resets;
- ``journal``: the decision log and the audit log;
- ``outcomes``: recipients failed, deferred or accepted, and refusals by the limits (the abuse rules);
- ``notices``: the claim that a notice about a limit or a block goes out once;
- ``spf_cache``: SPF verdicts shared by every process on this ledger;
- ``retention``: pruning, timed-out reservations, the gate's housekeeping;
- ``facade``: ``Ledger``, the one object the rest of the program holds.

Nothing here imports a stage above the store, and nothing heavy is imported
before it is used: ``sendmail`` imports this package on every call.
"""

from .connections import Tx
from .directory import AccountEntry, Customer
from .errors import (
    Conflict,
    InvalidInput,
    LedgerError,
    LedgerNotInitialised,
    LedgerUnavailable,
    LimitNeverFits,
    LimitReached,
    UnknownSubject,
    UnsupportedLedger,
)
from .facade import Ledger
from .inputs import SCOPES, canonical_address, canonical_domain, parse_expiry, parse_since
from .journal import DECISION_ALIASES, DECISION_FIELDS, AuditEntry, Decision, DecisionCount
from .notices import NOTICE_KINDS, Notice, NoticeClaim
from .outcomes import Outcome, Tally
from .overview import SubjectUsage
from .rates import (
    OUTCOMES,
    Override,
    Reservation,
    ResetMarker,
    RuleLevel,
    RuleUsage,
    SendRecord,
    UnsettledSend,
)
from .retention import PruneReport
from .schema import MIGRATIONS, SchemaStatus
from .spf_cache import SqlSpfCache
from .times import format_delay, format_instant, format_utc, iso_utc
from .windows import COUNTED_STATES

__all__ = [
    "COUNTED_STATES", "DECISION_ALIASES", "DECISION_FIELDS", "MIGRATIONS", "NOTICE_KINDS", "OUTCOMES", "SCOPES",
    "AccountEntry", "AuditEntry", "Conflict", "Customer", "Decision", "DecisionCount", "InvalidInput", "Ledger",
    "LedgerError", "LedgerNotInitialised", "LedgerUnavailable", "LimitNeverFits", "LimitReached",
    "Notice", "NoticeClaim", "Outcome", "Override", "PruneReport", "Reservation", "ResetMarker", "RuleLevel",
    "RuleUsage", "SchemaStatus", "SendRecord", "SqlSpfCache", "SubjectUsage", "Tally", "Tx", "UnknownSubject",
    "UnsettledSend", "UnsupportedLedger", "canonical_address", "canonical_domain", "format_delay",
    "format_instant", "format_utc", "iso_utc", "parse_expiry", "parse_since",
]
