"""``Ledger``: the one object the pipeline, the queue, the gate and the admin CLI hold.

It opens nothing until first use and keeps its connections warm; one Ledger
per process (or thread pool). Each method hands the call to the concern that
owns it: ``directory``, ``rates``, ``journal`` (and the SPF cache).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from ..limits import Rule
from .connections import Tx
from .directory import AccountEntry, Customer, Directory
from .journal import AuditEntry, Decision, DecisionCount, Journal, insert_decision
from .notices import Notice, NoticeClaim
from .outcomes import Outcome, Tally, insert_outcome, tally
from .overview import SubjectUsage, blocked_accounts, usage_of_every_customer
from .rates import (
    Override,
    Rates,
    Reservation,
    ResetMarker,
    RuleLevel,
    RuleUsage,
    Sender,
    SendRecord,
    UnsettledSend,
)
from .retention import Housekeeping, PruneReport, prune, resolve_all_stale
from .schema import SchemaStatus
from .spf_cache import SqlSpfCache
from .store import Store
from .times import US

if TYPE_CHECKING:
    from ..config import Config, LedgerConfig, LimitsConfig
    from .report import Report


class Ledger:
    """The ledger at an SQLAlchemy URL."""

    def __init__(self, url: str, *, busy_timeout: float = 10.0, limits: LimitsConfig | None = None,
                 via_sqlalchemy: bool = False, settings: LedgerConfig | None = None) -> None:
        """``settings``: the ``[ledger]`` table (timeouts, retention); its defaults when not given."""
        self.url = url
        self.busy_timeout = busy_timeout
        self.store = Store(url, busy_timeout=busy_timeout, via_sqlalchemy=via_sqlalchemy)
        self.directory = Directory(self.store)
        self.rates = Rates(self.store, limits, settings)
        self.journal = Journal(self.store)

    def with_limits(self, limits: LimitsConfig) -> Ledger:
        """The same database and connections under other limits (a gate's reload); close only one of them."""
        import copy

        other = copy.copy(self)
        other.rates = Rates(self.store, limits, self.rates.settings)
        return other

    @classmethod
    def from_config(cls, config: Config) -> Ledger:
        return cls(config.ledger.url, busy_timeout=config.ledger.busy_timeout, limits=config.limits,
                   settings=config.ledger)

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()

    @property
    def limits(self) -> LimitsConfig:
        return self.rates.limits

    @property
    def dialect(self) -> str:
        return self.store.dialect

    @property
    def where(self) -> str:
        """The ledger's location for messages, without any password."""
        return self.store.where

    # ----------------------------------------------------------- for other stages (the queue)

    def transaction(self, *, write: bool) -> AbstractContextManager[Tx]:
        """A transaction for another stage's tables: ``with ledger.transaction(write=True) as tx``.

        Writes are serialised as the reservations are (BEGIN IMMEDIATE on SQLite).
        """
        return self.store.write() if write else self.store.read()

    def now(self, tx: Tx) -> float:
        """The ledger's clock (the database's on PostgreSQL, so that servers agree)."""
        return self.store.now_us(tx) / US

    # ----------------------------------------------------------- schema

    def upgrade(self) -> list[str]:
        """Create or upgrade the schema; return the names of the migrations applied now."""
        return self.store.upgrade()

    def schema_status(self) -> SchemaStatus:
        return self.store.schema_status()

    # ----------------------------------------------------------- directory

    def find_account(self, address: str) -> AccountEntry | None:
        return self.directory.find_account(address)

    def customer_of_user(self, unix_user: str) -> str | None:
        return self.directory.customer_of_user(unix_user)

    def customer_domains(self, customer_id: str) -> set[str]:
        return self.directory.customer_domains(customer_id)

    def add_customer(self, customer_id: str, unix_users: Sequence[str] = (), *,
                     default_sender: str | None = None, actor: str | None = None) -> Customer:
        return self.directory.add_customer(customer_id, unix_users, default_sender=default_sender, actor=actor)

    def default_sender(self, unix_user: str) -> str | None:
        return self.directory.default_sender(unix_user)

    def set_default_sender(self, customer_id: str, address: str | None, *, unix_user: str | None = None,
                           actor: str | None = None) -> Customer:
        return self.directory.set_default_sender(customer_id, address, unix_user=unix_user, actor=actor)

    def contact(self, customer_id: str) -> str | None:
        return self.directory.contact(customer_id)

    def set_contact(self, customer_id: str, address: str | None, *, actor: str | None = None) -> Customer:
        return self.directory.set_contact(customer_id, address, actor=actor)

    def bind_user(self, customer_id: str, unix_user: str, *, actor: str | None = None) -> Customer:
        return self.directory.bind_user(customer_id, unix_user, actor=actor)

    def unbind_user(self, unix_user: str, *, actor: str | None = None) -> str:
        return self.directory.unbind_user(unix_user, actor=actor)

    def get_customer(self, customer_id: str) -> Customer:
        return self.directory.get_customer(customer_id)

    def list_customers(self, only: str | None = None) -> list[Customer]:
        return self.directory.list_customers(only)

    def add_account(self, address: str, customer_id: str, *, authenticated: bool = False,
                    actor: str | None = None) -> AccountEntry:
        return self.directory.add_account(address, customer_id, authenticated=authenticated, actor=actor)

    def remove_account(self, address: str, *, actor: str | None = None) -> AccountEntry:
        return self.directory.remove_account(address, actor=actor)

    def authenticate(self, address: str, authenticated: bool = True, *,
                     actor: str | None = None) -> AccountEntry:
        return self.directory.authenticate(address, authenticated, actor=actor)

    def block(self, address: str, reason: str | None = None, *, actor: str | None = None) -> AccountEntry:
        return self.directory.block(address, reason, actor=actor)

    def unblock(self, address: str, reason: str | None = None, *, actor: str | None = None) -> AccountEntry:
        return self.directory.unblock(address, reason, actor=actor)

    def auto_block(self, address: str, reason: str, *, actor: str) -> AccountEntry | None:
        """Block an account the abuse rules caught, unless it is blocked already (then None)."""
        return self.directory.auto_block(address, reason, actor=actor)

    def list_accounts(self, customer_id: str | None = None) -> list[AccountEntry]:
        return self.directory.list_accounts(customer_id)

    # ----------------------------------------------------------- rates

    def reserve(self, account: Sender, recipients: int, *, message_id: str, now: float | None = None,
                holder: str | None = None, uid: int | None = None) -> Reservation:
        return self.rates.reserve(account, recipients, message_id=message_id, now=now, holder=holder, uid=uid)

    def claim_unsettled(self, holder: str) -> list[UnsettledSend]:
        """A gate's reservations left unsettled by its previous run, now marked ``unknown``."""
        return self.rates.claim_unsettled(holder)

    def settle(self, reservation: Reservation | int, outcome: str) -> None:
        self.rates.settle(reservation, outcome)

    def settle_in(self, tx: Tx, send_id: int, outcome: str) -> None:
        """``settle`` inside a transaction another stage holds (the queue's commit)."""
        self.rates.settle_in(tx, send_id, outcome)

    def usage(self, scope: str, subject: str, now: float | None = None) -> list[RuleUsage]:
        return self.rates.usage(scope, subject, now)

    def usage_of_every_customer(self, now: float | None = None) -> list[SubjectUsage]:
        """Each customer's rules and their use now, in one read (for the metrics)."""
        return usage_of_every_customer(self.rates, now)

    def blocked_accounts(self) -> dict[str, int]:
        """Accounts blocked now by ``admin`` and by ``auto`` (the abuse rules), for the metrics."""
        return blocked_accounts(self.store)

    def list_sends(self, scope: str, subject: str, *, counted_only: bool = False) -> list[SendRecord]:
        return self.rates.list_sends(scope, subject, counted_only=counted_only)

    def set_override(self, scope: str, subject: str, rule: Rule, *, expires_at: float,
                     reason: str, actor: str | None = None, now: float | None = None) -> Override:
        return self.rates.set_override(scope, subject, rule, expires_at=expires_at, reason=reason,
                                       actor=actor, now=now)

    def list_overrides(self, scope: str | None = None, subject: str | None = None, *,
                       include_expired: bool = False, now: float | None = None) -> list[Override]:
        return self.rates.list_overrides(scope, subject, include_expired=include_expired, now=now)

    def remove_override(self, override_id: int, *, actor: str | None = None) -> Override:
        return self.rates.remove_override(override_id, actor=actor)

    def reset_usage(self, scope: str, subject: str, *, reason: str, actor: str | None = None,
                    now: float | None = None) -> ResetMarker:
        return self.rates.reset_usage(scope, subject, reason=reason, actor=actor, now=now)

    # ----------------------------------------------------------- journal

    def record_decision(self, **fields: object) -> None:
        """One row per decision for ``sendmail-shim log`` (see ``journal.insert_decision``)."""
        self.journal.record_decision(fields)

    def settle_and_record(self, reservation: Reservation, outcome: str, decision: dict[str, object]) -> None:
        """``settle`` and ``record_decision`` in one transaction: one commit (one fsync) per message."""
        self.settle_and_record_all([(reservation, outcome, decision)])

    def settle_and_record_all(self, items: Sequence[tuple[Reservation | None, str | None,
                                                          dict[str, object]]],
                              outcomes: Sequence[Outcome] = ()) -> None:
        """Several messages' settles (where there is a reservation to settle), decision rows and
        recipient outcomes (for the abuse rules), one commit."""
        with self.store.write() as tx:
            for reservation, outcome, decision in items:
                if reservation is not None and outcome is not None:
                    self.rates.settle_in(tx, reservation.id, outcome)
                insert_decision(tx, decision)
            for counted in outcomes:
                insert_outcome(tx, counted)

    def outcome_tally(self, account: str, *, failed_since: float, limited_since: float) -> Tally:
        """An account's failed or deferred recipients and refusals by the limits (see ``outcomes``)."""
        return tally(self.store, account, failed_since=failed_since, limited_since=limited_since)

    def recent_decisions(self, limit: int = 50, *, account: str | None = None,
                         customer: str | None = None) -> list[Decision]:
        return self.journal.recent_decisions(limit, account=account, customer=customer)

    def top_scripts(self, scope: str, subject: str, since: float, limit: int = 3) -> list[tuple[str, int]]:
        return self.journal.top_scripts(scope, subject, since, limit)

    def decision_counts(self, since: float) -> list[DecisionCount]:
        """Decisions since ``since``, by verdict and stage (for the metrics' textfile)."""
        return self.journal.decision_counts(since)

    def report(self, by: str, since: float, until: float) -> Report:
        """Sent, queued, refused and bounced in [since, until), by account, customer, script or uid."""
        from .report import build

        return build(self.store, by, since, until)

    def audit_log(self, limit: int = 50, *, subject: str | None = None) -> list[AuditEntry]:
        return self.journal.audit_log(limit, subject=subject)

    # ----------------------------------------------------------- notices

    def claim_notice(self, notice: NoticeClaim) -> float | None:
        """Take the right to send this notice; its time, or None when it was sent (or is being sent) already."""
        from . import notices

        return notices.claim(self.store, notice)

    def window_start(self, level: RuleLevel) -> float:
        """When the window of the rule's burst began: its oldest counted send still in it."""
        from . import notices

        return notices.window_start(self.store, level.scope, level.subject, level.rule.metric,
                                    level.rule.window_seconds)

    def notices(self, limit: int = 50, *, subject: str | None = None) -> list[Notice]:
        from . import notices

        return notices.recent(self.store, limit, subject=subject)

    # ----------------------------------------------------------- retention

    def prune(self, now: float | None = None) -> PruneReport:
        """Resolve timed-out reservations and delete what ``[ledger]`` retention no longer keeps."""
        return prune(self.store, self.rates, now)

    def resolve_stale(self, now: float | None = None) -> int:
        """Resolve every reservation older than ``[ledger] reservation_timeout``; return how many."""
        return resolve_all_stale(self.store, self.rates, now)

    def housekeeping(self, report: Callable[[str, dict[str, object]], None]) -> Housekeeping:
        """The gate's background thread for both (not started)."""
        return Housekeeping(self.store, self.rates, report)

    # ----------------------------------------------------------- SPF verdicts

    def spf_cache(self) -> SqlSpfCache:
        return SqlSpfCache(self.store)
