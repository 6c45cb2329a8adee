"""Rates: reservations against every rule, their settlement, usage, overrides and resets.

A rule "N per W" holds when, at the instant of each acceptance, the counted
sends in the last W plus this message stay within N; since usage in any window
can only grow at an acceptance, that keeps every window at every instant
within N. The check and the reservation are one transaction serialised per
customer (``Store.lock_customer``). Instants are integer microseconds, so the
window arithmetic is exact; ``windows.py`` keeps it cheap.

A send's life: ``reserved`` (counts) → ``sent`` or ``queued`` (count) or
``released`` (does not). A reservation nobody settles within ``[ledger]
reservation_timeout`` (its process was killed, its settlement failed) counts
until then, the safe side, and is then resolved with an audit row: ``queued``
when the queue holds its message, else ``expired`` (does not count). A late
settlement of an expired one still records what really happened. A gate's
reservation names the gate (``holder``): the gate's next start reports, once,
each one a dead run left unsettled (its outcome is unknown: the upstream may
have the message); it counts on until the timeout like any other.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from ..limits import Rule
from . import windows
from .connections import Tx
from .directory import require_account, require_customer
from .errors import InvalidInput, LedgerUnavailable, LimitNeverFits, LimitReached, UnknownSubject
from .inputs import SCOPES, canonical_address, check_reason, check_scope
from .journal import audit
from .store import Store
from .times import US, format_utc

if TYPE_CHECKING:
    from ..config import LedgerConfig, LimitsConfig

OUTCOMES = ("sent", "queued", "released")
_SETTLEABLE = ("reserved", "queued", "expired")
_SEND_COLUMNS = "id, account, customer_id, recipients, at_us"
TIMEOUT_ACTOR = "sendmail-shim"  # the audit log's actor for what the ledger does by itself


class Sender(Protocol):
    """What a reservation needs of the sending account."""

    @property
    def address(self) -> str: ...

    @property
    def customer_id(self) -> str: ...


class RuleLevel(NamedTuple):
    """A rule's use just before and just after a reservation: what a notice needs to see it crossed."""

    scope: str
    subject: str
    rule: Rule
    before: int
    after: int


@dataclass(frozen=True)
class Reservation:
    """A counted send; settle it with ``Ledger.settle`` once the relay has answered."""

    id: int
    account: str
    customer_id: str
    recipients: int
    at: float
    message_id: str
    # Every rule's use around this message, from the sums the check already read (no extra query).
    levels: tuple[RuleLevel, ...] = ()


class UnsettledSend(NamedTuple):
    """A reservation its gate left behind: the gate died between reserving and settling."""

    id: int
    account: str
    customer_id: str
    recipients: int
    at: float
    message_id: str | None
    uid: int | None


class Override(NamedTuple):
    id: int
    scope: str
    subject: str
    rule: Rule
    expires_at: float
    reason: str
    created_at: float
    created_by: str | None


class RuleUsage(NamedTuple):
    """One rule as it stands for one account or customer at ``now``."""

    scope: str
    subject: str
    rule: Rule
    used: int
    next_free_at: float | None  # when one more unit fits again; None while some remain
    override: Override | None

    @property
    def metric(self) -> str:
        return self.rule.metric

    @property
    def limit(self) -> int:
        return self.rule.limit

    @property
    def window_seconds(self) -> int:
        return self.rule.window_seconds

    @property
    def remaining(self) -> int:
        return max(0, self.rule.limit - self.used)


class ResetMarker(NamedTuple):
    id: int
    scope: str
    subject: str
    at: float
    reason: str
    created_by: str | None


class SendRecord(NamedTuple):
    id: int
    account: str
    customer_id: str
    recipients: int
    at: float
    state: str
    message_id: str | None


class ActiveRule(NamedTuple):
    scope: str
    subject: str
    rule: Rule
    override: Override | None

    def amount(self, recipients: int) -> int:
        return 1 if self.rule.metric == "messages" else recipients


def apply_overrides(scope: str, subject: str, rules: Sequence[Rule],
                    overrides: Sequence[Override]) -> list[ActiveRule]:
    """Configured rules with same-window overrides in place; other overrides added (newest wins)."""
    active = {(r.metric, r.window_seconds): ActiveRule(scope, subject, r, None) for r in rules}
    for override in sorted(overrides, key=lambda o: o.id):
        key = (override.rule.metric, override.rule.window_seconds)
        active[key] = ActiveRule(scope, subject, override.rule, override)
    return list(active.values())


def _check_outcome(outcome: str) -> None:
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")


def _counted_send(row: Sequence[Any]) -> windows.CountedSend:
    return windows.CountedSend(int(row[0]), str(row[1]), str(row[2]), int(row[3]), int(row[4]))


def _stale_detail(send: windows.CountedSend, message_id: str | None, queued: bool, timeout: float) -> str:
    outcome = ("the queue holds its message, so it counts as queued" if queued
               else "released: it no longer counts")
    return (f"send #{send.id} of {send.recipients} recipient(s) ({message_id or 'no message id'}), "
            f"reserved at {format_utc(send.at_us / US)}, was not settled within {timeout:g} s; {outcome}")


def select_overrides(tx: Tx, where: str, params: dict[str, Any]) -> list[Override]:
    rows = tx.rows(
        "SELECT id, scope, subject, metric, limit_value, window_seconds, expires_at, reason, "
        f"created_at, created_by FROM overrides WHERE {where} ORDER BY id", params,
    )
    return [Override(int(r[0]), r[1], r[2], Rule(r[3], int(r[4]), int(r[5])), float(r[6]),
                     r[7], float(r[8]), r[9]) for r in rows]


class Rates:
    """The limits as they apply to one ledger."""

    def __init__(self, store: Store, limits: LimitsConfig | None = None,
                 settings: LedgerConfig | None = None) -> None:
        self.store = store
        self._limits = limits
        self._settings = settings

    @property
    def limits(self) -> LimitsConfig:
        if self._limits is None:
            from ..config import LimitsConfig

            self._limits = LimitsConfig()
        return self._limits

    @property
    def settings(self) -> LedgerConfig:
        if self._settings is None:
            from ..config import LedgerConfig

            self._settings = LedgerConfig(url=self.store.url, busy_timeout=self.store.busy_timeout)
        return self._settings

    # ----------------------------------------------------------- reserving and settling

    def reserve(self, account: Sender, recipients: int, *, message_id: str, now: float | None = None,
                holder: str | None = None, uid: int | None = None) -> Reservation:
        """Check every account and customer rule and count the message, in one transaction.

        Raises LimitNeverFits when the message is larger than a rule allows and
        LimitReached (with the exact instant it would fit) when it does not fit now.
        """
        if recipients < 1:
            raise ValueError("a message has at least one recipient")
        with self.store.write() as tx:
            clock = self.store.lock_customer(tx, account.customer_id)
            now_us = clock if clock is not None and now is None else self.store.now_us(tx, now)
            rules = self._active_rules(tx, account.address, account.customer_id, now_us / US)
            for active in rules:
                needed = active.amount(recipients)
                if needed > active.rule.limit:
                    raise LimitNeverFits(active.scope, active.subject, active.rule, needed)
            self.resolve_stale(tx, account.customer_id, now_us)
            levels = self._refuse_if_over(tx, rules, recipients, now_us)
            rows = tx.rows(
                "INSERT INTO sends (account, customer_id, message_id, recipients, at_us, state, holder, uid) "
                "VALUES (:a, :c, :m, :n, :t, 'reserved', :h, :u) RETURNING id",
                {"a": account.address, "c": account.customer_id, "m": message_id,
                 "n": recipients, "t": now_us, "h": holder, "u": uid},
            )
            send_id = int(rows[0][0])
            windows.add(tx, windows.CountedSend(send_id, account.address, account.customer_id, recipients, now_us))
        return Reservation(send_id, account.address, account.customer_id, recipients, now_us / US, message_id, levels)

    def _active_rules(self, tx: Tx, address: str, customer_id: str, now: float) -> list[ActiveRule]:
        overrides = select_overrides(
            tx, "((scope = 'account' AND subject = :a) OR (scope = 'customer' AND subject = :c)) "
                "AND expires_at > :now", {"a": address, "c": customer_id, "now": now},
        )
        return [
            *apply_overrides("account", address, self.limits.account,
                             [o for o in overrides if o.scope == "account"]),
            *apply_overrides("customer", customer_id, self.limits.customer,
                             [o for o in overrides if o.scope == "customer"]),
        ]

    def _refuse_if_over(self, tx: Tx, rules: Sequence[ActiveRule], recipients: int,
                        now_us: int) -> tuple[RuleLevel, ...]:
        """Raise LimitReached for the rule that frees last; else each rule's use before and after."""
        worst: LimitReached | None = None
        levels: list[RuleLevel] = []
        for scope in SCOPES:
            scoped = [r for r in rules if r.scope == scope]
            if not scoped:
                continue
            used = windows.window_sums(tx, scope, scoped[0].subject,
                                       [r.rule.window_seconds for r in scoped], now_us)
            for active in scoped:
                in_use = used[(active.rule.metric, active.rule.window_seconds)]
                needed = active.amount(recipients)
                if in_use + needed <= active.rule.limit:
                    levels.append(RuleLevel(scope, active.subject, active.rule, in_use, in_use + needed))
                    continue
                free_us = self._next_free_us(tx, active, in_use + needed - active.rule.limit, now_us)
                if worst is None or free_us / US > worst.next_free_at:
                    worst = LimitReached(scope, active.subject, active.rule, in_use, needed,
                                         free_us / US, now_us / US)
        if worst is not None:
            raise worst
        return tuple(levels)

    @staticmethod
    def _next_free_us(tx: Tx, active: ActiveRule, excess: int, now_us: int) -> int:
        return windows.next_free_us(tx, active.scope, active.subject, active.rule.metric,
                                    active.rule.window_seconds, excess, now_us)

    def settle(self, reservation: Reservation | int, outcome: str) -> None:
        """``sent`` or ``queued`` keep counting; ``released`` (refused, permanent failure) stops.

        Only a reserved, queued or expired send changes: a sent one is never uncounted.
        """
        _check_outcome(outcome)
        send_id = reservation if isinstance(reservation, int) else reservation.id
        with self.store.write() as tx:
            self.settle_in(tx, send_id, outcome)

    def settle_in(self, tx: Tx, send_id: int, outcome: str) -> None:
        """``settle`` inside a transaction another stage holds (the queue's commit)."""
        _check_outcome(outcome)
        found = tx.rows(f"SELECT {_SEND_COLUMNS}, state FROM sends WHERE id = :i", {"i": send_id})
        if not found or found[0][5] not in _SETTLEABLE or found[0][5] == outcome:
            return
        send, before = _counted_send(found[0]), str(found[0][5])
        counts_now = outcome in windows.COUNTED_STATES
        turns = counts_now != (before in windows.COUNTED_STATES)
        if turns:  # the buckets change: as for a reservation, under the customer's lock
            self.store.lock_customer(tx, send.customer_id)
        changed = tx.run("UPDATE sends SET state = :s, settled_at = :t WHERE id = :i AND state = :before",
                         {"s": outcome, "t": time.time(), "i": send_id, "before": before})
        if changed and turns:
            windows.change(tx, send, 1 if counts_now else -1)
        if changed and before == "expired":
            audit(tx, "reservation settled late", send.account,
                  f"send #{send.id} was {outcome} after its reservation had expired", TIMEOUT_ACTOR)

    def claim_unsettled(self, holder: str) -> list[UnsettledSend]:
        """``holder``'s unsettled reservations, each returned (and audited) once.

        Called by a gate before it serves: any reservation of its own still
        unsettled then was left by a previous run that died while relaying.
        It stays ``reserved``: it counts until ``[ledger] reservation_timeout``
        resolves it like any other (the upstream may have the message).
        """
        with self.store.write() as tx:
            rows = tx.rows("SELECT id, account, customer_id, recipients, at_us, message_id, uid FROM sends "
                           "WHERE holder = :h AND state = 'reserved' ORDER BY id", {"h": holder})
            for row in rows:
                tx.run("UPDATE sends SET holder = NULL WHERE id = :i", {"i": row[0]})  # reported: not again
                audit(tx, "outcome unknown", str(row[1]),
                      f"send #{row[0]} ({row[5] or 'no message id'}) was being relayed when its mail gate "
                      f"stopped; the upstream may have it; it counts until the reservation times out",
                      TIMEOUT_ACTOR)
        return [UnsettledSend(int(r[0]), str(r[1]), str(r[2]), int(r[3]), int(r[4]) / US, r[5],
                              None if r[6] is None else int(r[6])) for r in rows]

    def resolve_stale(self, tx: Tx, customer_id: str, now_us: int) -> int:
        """Resolve a customer's reservations older than the timeout (the caller holds its lock)."""
        timeout = self.settings.reservation_timeout
        rows = tx.rows(
            f"SELECT {_SEND_COLUMNS}, message_id, EXISTS (SELECT 1 FROM queue_messages q "
            "WHERE q.send_id = sends.id AND q.state <> 'done') FROM sends "
            "WHERE customer_id = :c AND state = 'reserved' AND at_us < :cut ORDER BY id",
            {"c": customer_id, "cut": now_us - round(timeout * US)})
        for row in rows:
            send, queued = _counted_send(row), bool(row[6])
            state = "queued" if queued else "expired"
            tx.run("UPDATE sends SET state = :s, settled_at = :t WHERE id = :i AND state = 'reserved'",
                   {"s": state, "t": now_us / US, "i": send.id})
            if not queued:
                windows.change(tx, send, -1)
            audit(tx, f"reservation {state}", send.account, _stale_detail(send, row[5], queued, timeout),
                  TIMEOUT_ACTOR, now_us / US)
        return len(rows)

    # ----------------------------------------------------------- usage

    def usage(self, scope: str, subject: str, now: float | None = None) -> list[RuleUsage]:
        """Every rule of an account (``scope="account"``) or a customer, as it stands now."""
        check_scope(scope)
        self._resolve_stale_before_report(scope, subject, now)
        with self.store.read() as tx:
            if scope == "account":
                account = require_account(tx, subject)
                subject, customer_id = account.address, account.customer_id
            else:
                require_customer(tx, subject)
                customer_id = subject
            now_us = self.store.now_us(tx, now)
            rules = [r for r in self._active_rules(tx, subject, customer_id, now_us / US)
                     if r.scope == scope]
            used = windows.window_sums(tx, scope, subject, [r.rule.window_seconds for r in rules], now_us)
            return [self._rule_usage(tx, r, used, now_us) for r in rules]

    def _resolve_stale_before_report(self, scope: str, subject: str, now: float | None) -> None:
        """Settle what has timed out, so the report shows it; a ledger this user may only read is shown as it is.

        A report is a read: the write (and on SQLite its lock) comes only when something timed out.
        """
        with self.store.read() as tx:
            customer_id = self._customer_of(tx, scope, self._require_subject(tx, scope, subject))
            cut = self.store.now_us(tx, now) - round(self.settings.reservation_timeout * US)
            if not tx.rows("SELECT 1 FROM sends WHERE customer_id = :c AND state = 'reserved' AND at_us < :cut",
                           {"c": customer_id, "cut": cut}):
                return
        try:
            with self.store.write() as tx:
                self.store.lock_customer(tx, customer_id)
                self.resolve_stale(tx, customer_id, self.store.now_us(tx, now))
        except LedgerUnavailable:
            pass

    @staticmethod
    def _customer_of(tx: Tx, scope: str, subject: str) -> str:
        return subject if scope == "customer" else require_account(tx, subject).customer_id

    def _rule_usage(self, tx: Tx, active: ActiveRule, used: dict[tuple[str, int], int],
                    now_us: int) -> RuleUsage:
        in_use = used[(active.rule.metric, active.rule.window_seconds)]
        next_free = None
        if 0 < active.rule.limit <= in_use:
            next_free = self._next_free_us(tx, active, in_use + 1 - active.rule.limit, now_us) / US
        return RuleUsage(active.scope, active.subject, active.rule, in_use, next_free, active.override)

    def list_sends(self, scope: str, subject: str, *, counted_only: bool = False) -> list[SendRecord]:
        """The send log of an account or customer, oldest first."""
        check_scope(scope)
        where = f"{windows.SCOPE_COLUMN[scope]} = :s"
        if counted_only:
            where += f" AND {windows.COUNTED_SQL}"
        with self.store.read() as tx:
            rows = tx.rows(
                "SELECT id, account, customer_id, recipients, at_us, state, message_id FROM sends "
                f"WHERE {where} ORDER BY at_us, id", {"s": subject},
            )
        return [SendRecord(int(r[0]), r[1], r[2], int(r[3]), int(r[4]) / US, r[5], r[6]) for r in rows]

    # ----------------------------------------------------------- overrides and resets

    @staticmethod
    def _require_subject(tx: Tx, scope: str, subject: str) -> str:
        check_scope(scope)
        if scope == "account":
            return require_account(tx, subject).address
        require_customer(tx, subject)
        return subject

    def set_override(self, scope: str, subject: str, rule: Rule, *, expires_at: float,
                     reason: str, actor: str | None = None, now: float | None = None) -> Override:
        """Replace the rule with the same metric and window (or add one) until ``expires_at``."""
        reason_text = check_reason(reason, required=True)
        now = time.time() if now is None else now
        if expires_at <= now:
            raise InvalidInput("the override's expiry is in the past; give a later time")
        with self.store.write() as tx:
            subject = self._require_subject(tx, scope, subject)
            tx.run(
                "DELETE FROM overrides WHERE scope = :sc AND subject = :su AND metric = :m "
                "AND window_seconds = :w",
                {"sc": scope, "su": subject, "m": rule.metric, "w": rule.window_seconds},
            )
            rows = tx.rows(
                "INSERT INTO overrides (scope, subject, metric, limit_value, window_seconds, "
                "expires_at, reason, created_at, created_by) VALUES "
                "(:sc, :su, :m, :l, :w, :e, :r, :t, :by) RETURNING id",
                {"sc": scope, "su": subject, "m": rule.metric, "l": rule.limit,
                 "w": rule.window_seconds, "e": expires_at, "r": reason_text, "t": now, "by": actor},
            )
            audit(tx, "override set", subject,
                  f"{scope} {rule} until {format_utc(expires_at)}: {reason_text}", actor, now)
        return Override(int(rows[0][0]), scope, subject, rule, expires_at, reason_text or "", now, actor)

    def list_overrides(self, scope: str | None = None, subject: str | None = None, *,
                       include_expired: bool = False, now: float | None = None) -> list[Override]:
        clauses: list[str] = ["1 = 1"]
        params: dict[str, Any] = {"now": time.time() if now is None else now}
        if scope is not None:
            clauses.append("scope = :scope")
            params["scope"] = check_scope(scope)
        if subject is not None:
            clauses.append("subject = :subject")
            params["subject"] = canonical_address(subject) if scope == "account" else subject
        if not include_expired:
            clauses.append("expires_at > :now")
        with self.store.read() as tx:
            return select_overrides(tx, " AND ".join(clauses), params)

    def remove_override(self, override_id: int, *, actor: str | None = None) -> Override:
        with self.store.write() as tx:
            found = select_overrides(tx, "id = :i", {"i": override_id})
            if not found:
                raise UnknownSubject(f"there is no override {override_id}; see: sendmail-shim override list")
            tx.run("DELETE FROM overrides WHERE id = :i", {"i": override_id})
            override = found[0]
            audit(tx, "override rm", override.subject, f"#{override.id} {override.scope} {override.rule}", actor)
        return override

    def reset_usage(self, scope: str, subject: str, *, reason: str, actor: str | None = None,
                    now: float | None = None) -> ResetMarker:
        """Forgive everything sent so far in this scope; the sends stay in the log."""
        reason_text = check_reason(reason, required=True) or ""
        with self.store.write() as tx:
            subject = self._require_subject(tx, scope, subject)
            customer_id = self._customer_of(tx, scope, subject)
            self.store.lock_customer(tx, customer_id)
            at = self.store.now_us(tx, now) / US
            upto = int(tx.rows("SELECT coalesce(max(id), 0) FROM sends")[0][0])
            windows.clear(tx, scope, subject)
            rows = tx.rows(
                "INSERT INTO usage_resets (scope, subject, upto_send_id, at, reason, created_by) "
                "VALUES (:sc, :su, :u, :at, :r, :by) RETURNING id",
                {"sc": scope, "su": subject, "u": upto, "at": at, "r": reason_text, "by": actor},
            )
            audit(tx, "usage reset", subject, f"{scope}: {reason_text}", actor, at)
        return ResetMarker(int(rows[0][0]), scope, subject, at, reason_text, actor)
