"""The journal: one row per sending decision, and the audit log of admin actions.

Decisions are pruned after ``[ledger] keep_decisions``; the audit log is kept.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from .connections import Tx
from .inputs import canonical_address
from .store import Store

DECISION_FIELDS = (
    "verdict", "code", "account", "customer", "uid", "user", "recipients",
    "reason", "message_id", "time", "stage", "reference", "script", "cwd", "exe",
)
# The mail log's names for the same fields, so that a log record can be stored as it is.
DECISION_ALIASES = {"rcpts": "recipients", "msgid": "message_id", "ref": "reference",
                    "sender": "account"}
_INTEGER_FIELDS = ("code", "uid", "recipients")


class Decision(NamedTuple):
    id: int
    at: float
    verdict: str | None
    code: int | None
    account: str | None
    customer: str | None
    uid: int | None
    user: str | None
    recipients: int | None
    reason: str | None
    message_id: str | None
    stage: str | None
    reference: str | None
    extra: str | None  # other fields of the decision, as key=value text


class DecisionCount(NamedTuple):
    """Decisions of one verdict and stage since some instant, and their recipients."""

    verdict: str
    stage: str | None
    messages: int
    recipients: int


class AuditEntry(NamedTuple):
    id: int
    at: float
    actor: str | None
    action: str
    subject: str
    detail: str | None


def audit(tx: Tx, action: str, subject: str, detail: str | None, actor: str | None,
          now: float | None = None) -> None:
    """One admin action (or one the ledger took by itself, with no actor), in the caller's transaction."""
    tx.run(
        "INSERT INTO audit (at, actor, action, subject, detail) "
        "VALUES (:at, :actor, :action, :subject, :detail)",
        {"at": now if now is not None else time.time(), "actor": actor, "action": action,
         "subject": subject, "detail": detail},
    )


def insert_decision(tx: Tx, fields: dict[str, object]) -> None:
    """DECISION_FIELDS (or their mail-log names) get columns; other fields go to ``extra``."""
    values: dict[str, Any] = {name: None for name in DECISION_FIELDS}
    extra = []
    for name, value in fields.items():
        column = DECISION_ALIASES.get(name, name)
        if column in values and values[column] is None:
            values[column] = value
        elif value is not None:
            extra.append(f"{name}={value}")
    for name in _INTEGER_FIELDS:
        values[name] = int(values[name]) if values[name] is not None else None
    for name in set(DECISION_FIELDS) - set(_INTEGER_FIELDS) - {"time"}:
        values[name] = str(values[name]) if values[name] is not None else None
    values["time"] = float(values["time"]) if values["time"] is not None else time.time()
    values["extra"] = " ".join(extra)[:4000] or None
    tx.run(
        "INSERT INTO decisions (at, verdict, code, account, customer_id, uid, unix_user, "
        "recipients, reason, message_id, stage, reference, script, cwd, exe, extra) VALUES (:time, "
        ":verdict, :code, :account, :customer, :uid, :user, :recipients, :reason, "
        ":message_id, :stage, :reference, :script, :cwd, :exe, :extra)",
        values,
    )


class Journal:
    """Reading and writing the decision and audit logs."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def record_decision(self, fields: dict[str, object]) -> None:
        with self.store.write() as tx:
            insert_decision(tx, fields)

    def recent_decisions(self, limit: int = 50, *, account: str | None = None,
                         customer: str | None = None) -> list[Decision]:
        """The latest decisions, newest first."""
        clauses: list[str] = ["1 = 1"]
        params: dict[str, Any] = {"n": limit}
        if account is not None:
            clauses.append("account = :a")
            params["a"] = canonical_address(account)
        if customer is not None:
            clauses.append("customer_id = :c")
            params["c"] = customer
        with self.store.read() as tx:
            rows = tx.rows(
                "SELECT id, at, verdict, code, account, customer_id, uid, unix_user, recipients, "
                "reason, message_id, stage, reference, extra FROM decisions "
                f"WHERE {' AND '.join(clauses)} ORDER BY at DESC, id DESC LIMIT :n", params,
            )
        return [Decision(int(r[0]), float(r[1]), *r[2:]) for r in rows]

    def top_scripts(self, scope: str, subject: str, since: float, limit: int = 3) -> list[tuple[str, int]]:
        """The scripts that sent most for an account or customer since ``since``: (script, messages).

        A decision without a script (not PHP, or ``mail.add_x_header`` off)
        counts under its executable, else is left out.
        """
        column = "account" if scope == "account" else "customer_id"
        key = canonical_address(subject) if scope == "account" else subject
        with self.store.read() as tx:
            rows = tx.rows(
                "SELECT COALESCE(script, exe) AS s, COUNT(*) AS n FROM decisions "
                f"WHERE {column} = :k AND at >= :since AND COALESCE(script, exe) IS NOT NULL "
                "GROUP BY COALESCE(script, exe) ORDER BY n DESC, s LIMIT :n",
                {"k": key, "since": since, "n": limit},
            )
        return [(str(r[0]), int(r[1])) for r in rows]

    def decision_counts(self, since: float) -> list[DecisionCount]:
        """Decisions made since ``since`` (epoch seconds), by verdict and stage."""
        with self.store.read() as tx:
            rows = tx.rows("SELECT verdict, stage, count(*), coalesce(sum(recipients), 0) FROM decisions "
                           "WHERE at >= :since GROUP BY verdict, stage ORDER BY verdict, stage", {"since": since})
        return [DecisionCount(str(r[0] or ""), r[1], int(r[2]), int(r[3])) for r in rows]

    def audit_log(self, limit: int = 50, *, subject: str | None = None) -> list[AuditEntry]:
        """The latest admin actions, newest first."""
        params: dict[str, Any] = {"s": subject, "n": limit}
        where = "WHERE subject = :s" if subject else ""
        with self.store.read() as tx:
            rows = tx.rows(
                f"SELECT id, at, actor, action, subject, detail FROM audit {where} "
                "ORDER BY id DESC LIMIT :n", params,
            )
        return [AuditEntry(int(r[0]), float(r[1]), r[2], r[3], r[4], r[5]) for r in rows]
