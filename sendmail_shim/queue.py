"""The durable queue: messages the upstream could not take yet.

A message enters the queue only after a temporary failure (the upstream was
unreachable, answered 4xx or 421, or failed TLS). It is committed in the same
transaction that marks its ledger reservation ``queued``, and only then does
``sendmail`` exit 0: from that commit on the message cannot be lost. A runner
(``sendmail-shim queue run``) retries it with exponential backoff and jitter;
when every recipient is delivered or has failed for good the message is done,
and a delivery status notification (``bounce.py``) goes to the sender for the
failed ones.

Format: two tables in the ledger database (migration 0002_queue, defined in
``sendmail_shim/ledger/schema.py``).

``queue_messages``, one row per queued message:

=================  =================================================================
``id``             ``q`` + 20 hex digits, as ``sendmail-shim queue`` shows it
``kind``           ``message`` (a site's mail) or ``bounce`` (our notification)
``state``          ``queued`` (waiting, or being tried) or ``done``
``send_id``        the ledger ``sends`` row it counts as; NULL for bounces
``account``        sending account and its customer (NULL for bounces)
``customer_id``
``sender``         envelope sender; ``''`` (the null sender) for bounces
``message_id``     the Message-ID header: the same on every attempt
``data``           the message as accepted: CRLF lines, Bcc removed, Date and
                   Message-ID present; encoded for the upstream at each attempt
``dsn_*``          NOTIFY, RET and ENVID requested with -N/-R/-V
``created_at``     when it was accepted (the maximum age counts from here)
``attempts``       delivery attempts so far (the first is made by sendmail)
``next_attempt_at`` when a runner may try again (backoff with jitter)
``last_attempt_at``
``claimed_by``     a runner's lease: while ``claimed_until`` is in the future no
``claimed_until``  other runner touches the message; a runner killed mid-send
                   leaves a lease that simply runs out
``last_error``     the upstream's last answer
``finished_at``    when it became ``done``
=================  =================================================================

``queue_recipients``, one row per envelope recipient: ``queue_id``, ``address``,
``position`` (the envelope's order), ``state`` (``pending`` → ``delivered`` or ``failed``; never back), ``code``,
``reply``, ``updated_at``. A recipient once delivered is never sent again; a
runner that dies after the upstream's 250 but before recording it may send one
duplicate to the recipients of that transaction, with the same Message-ID.

Ledger counting: a queued message counts against the limits (it will be sent);
when it is done it is settled ``sent`` if anyone got it, ``released`` if nobody did.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .addresses import AddressError, parse_mailbox
from .envelope import NULL_SENDER, Envelope

if TYPE_CHECKING:
    from .config import QueueConfig
    from .ledger import Ledger, Reservation
    from .message import Message
    from .relay import RelayResult, Upstream

CRASH_ENV = "SENDMAIL_SHIM_CRASH_AT"  # fault injection for the crash-safety tests


class QueueError(Exception):
    """A queue operation that cannot be done."""


class UnknownQueueEntry(QueueError):
    """No queued message has that id (exit 67)."""


def crash_point(name: str) -> None:
    """Die here, as ``kill -9`` would, when the crash tests ask for it."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class RecipientState:
    address: str
    state: str
    code: int | None
    reply: str | None


@dataclass(frozen=True)
class QueuedMessage:
    id: str
    kind: str
    state: str
    sender: str
    account: str | None
    customer_id: str | None
    message_id: str | None
    created_at: float
    attempts: int
    next_attempt_at: float
    last_error: str | None
    size: int
    recipients: tuple[RecipientState, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "state": self.state, "sender": self.sender,
            "account": self.account, "customer": self.customer_id, "message_id": self.message_id,
            "created_at": self.created_at, "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at, "last_error": self.last_error, "size": self.size,
            "recipients": [{"address": r.address, "state": r.state, "code": r.code, "reply": r.reply}
                           for r in self.recipients],
        }


def backoff(attempts: int, config: QueueConfig) -> float:
    """Seconds to wait after the given number of failed attempts: doubling, jittered, bounded."""
    base = min(float(config.max_backoff), config.min_backoff * 2.0 ** max(attempts - 1, 0))
    return min(float(config.max_backoff), base * random.uniform(1.0, 1.25))


def new_id() -> str:
    return "q" + os.urandom(10).hex()


# --------------------------------------------------------------------------- entering the queue


def enqueue(ledger: Ledger, config: QueueConfig, *, reservation: Reservation | None, envelope: Envelope,
            message: Message, error: str, delivered: Sequence[str] = (), kind: str = "message") -> str:
    """Commit the message (and its reservation's new state) in one transaction; return its id."""
    queue_id = new_id()
    data = message.as_bytes()
    with ledger.transaction(write=True) as tx:
        now = ledger.now(tx)
        tx.run(
            "INSERT INTO queue_messages (id, kind, state, send_id, account, customer_id, sender, message_id, "
            "data, dsn_notify, dsn_ret, dsn_envid, created_at, attempts, next_attempt_at, last_attempt_at, "
            "last_error) VALUES (:id, :kind, 'queued', :send, :account, :customer, :sender, :mid, :data, "
            ":notify, :ret, :envid, :now, 1, :next, :now, :error)",
            {"id": queue_id, "kind": kind, "send": reservation.id if reservation else None,
             "account": reservation.account if reservation else None,
             "customer": reservation.customer_id if reservation else None,
             "sender": envelope.mail_from, "mid": message.message_id, "data": data,
             "notify": envelope.dsn_notify, "ret": envelope.dsn_ret, "envid": envelope.dsn_envid,
             "now": now, "next": now + backoff(1, config), "error": error[:1000]},
        )
        for position, recipient in enumerate(envelope.recipients):
            state = "delivered" if recipient.address in delivered else "pending"
            tx.run(
                "INSERT INTO queue_recipients (queue_id, address, position, state, updated_at) "
                "VALUES (:id, :address, :position, :state, :now)",
                {"id": queue_id, "address": recipient.address, "position": position, "state": state, "now": now},
            )
        if reservation is not None:
            ledger.settle_in(tx, reservation.id, "queued")
        crash_point("enqueue:before-commit")
    crash_point("enqueue:after-commit")
    return queue_id


# --------------------------------------------------------------------------- looking at it

_COLUMNS = ("id, kind, state, sender, account, customer_id, message_id, created_at, attempts, "
            "next_attempt_at, last_error, length(data)")


def _entry(row: Sequence[Any], recipients: tuple[RecipientState, ...] = ()) -> QueuedMessage:
    return QueuedMessage(str(row[0]), str(row[1]), str(row[2]), str(row[3]), row[4], row[5], row[6],
                         float(row[7]), int(row[8]), float(row[9]), row[10], int(row[11] or 0), recipients)


def _recipients(tx: Any, queue_id: str) -> tuple[RecipientState, ...]:
    rows = tx.rows("SELECT address, state, code, reply FROM queue_recipients WHERE queue_id = :id "
                   "ORDER BY position", {"id": queue_id})
    return tuple(RecipientState(str(r[0]), str(r[1]), r[2], r[3]) for r in rows)


def list_queue(ledger: Ledger, *, include_done: bool = False) -> list[QueuedMessage]:
    where = "" if include_done else "WHERE state = 'queued' "
    with ledger.transaction(write=False) as tx:
        rows = tx.rows(f"SELECT {_COLUMNS} FROM queue_messages {where}ORDER BY created_at, id")
        return [_entry(row, _recipients(tx, str(row[0]))) for row in rows]


def show(ledger: Ledger, queue_id: str) -> QueuedMessage:
    with ledger.transaction(write=False) as tx:
        rows = tx.rows(f"SELECT {_COLUMNS} FROM queue_messages WHERE id = :id", {"id": queue_id})
        if not rows:
            raise UnknownQueueEntry(f"no queued message has the id {queue_id!r}; see sendmail-shim queue list")
        return _entry(rows[0], _recipients(tx, queue_id))


def delete(ledger: Ledger, queue_id: str) -> QueuedMessage:
    """Drop a queued message without sending it; it stops counting against the limits."""
    entry = show(ledger, queue_id)
    with ledger.transaction(write=True) as tx:
        send = tx.rows("SELECT send_id FROM queue_messages WHERE id = :id", {"id": queue_id})
        tx.run("DELETE FROM queue_recipients WHERE queue_id = :id", {"id": queue_id})
        tx.run("DELETE FROM queue_messages WHERE id = :id", {"id": queue_id})
        if send and send[0][0] is not None and entry.state == "queued":
            ledger.settle_in(tx, int(send[0][0]), "released")
    return entry


# --------------------------------------------------------------------------- the runner


@dataclass
class RunReport:
    delivered: int = 0  # recipients
    deferred: int = 0
    failed: int = 0
    bounces: int = 0
    messages: int = 0
    ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"messages": self.messages, "delivered": self.delivered, "deferred": self.deferred,
                "failed": self.failed, "bounces": self.bounces}


@dataclass(frozen=True)
class _Claimed:
    id: str
    kind: str
    sender: str
    send_id: int | None
    data: bytes
    message_id: str | None
    created_at: float
    attempts: int
    dsn: tuple[str | None, str | None, str | None]
    pending: tuple[str, ...]


class Runner:
    """Delivers what is due, one claimed message at a time, so any number of runners can share a queue."""

    def __init__(self, ledger: Ledger, upstream: Upstream, config: QueueConfig, *, hostname: str | None = None,
                 now: bool = False) -> None:
        self.ledger, self.upstream, self.config = ledger, upstream, config
        self.hostname = hostname or socket.gethostname()
        self.ignore_backoff = now
        self.me = f"{self.hostname}:{os.getpid()}:{os.urandom(3).hex()}"
        self.started = time.time()

    def run(self, limit: int | None = None) -> RunReport:
        report = RunReport()
        while limit is None or report.messages < limit:
            claimed = self._claim()
            if claimed is None:
                break
            report.messages += 1
            report.ids.append(claimed.id)
            self._attempt(claimed, report)
        return report

    def _claim(self) -> _Claimed | None:
        skip_locked = " FOR UPDATE SKIP LOCKED" if self.ledger.dialect == "postgresql" else ""
        due = ("(last_attempt_at IS NULL OR last_attempt_at < :started)" if self.ignore_backoff
               else "next_attempt_at <= :now")
        with self.ledger.transaction(write=True) as tx:
            now = self.ledger.now(tx)
            rows = tx.rows(
                "SELECT id, kind, sender, send_id, data, message_id, created_at, attempts, dsn_notify, dsn_ret, "
                "dsn_envid FROM queue_messages WHERE state = 'queued' AND "
                f"(claimed_until IS NULL OR claimed_until < :now) AND {due} "
                f"ORDER BY next_attempt_at, created_at LIMIT 1{skip_locked}",
                {"now": now, "started": self.started},
            )
            if not rows:
                return None
            row = rows[0]
            tx.run("UPDATE queue_messages SET claimed_by = :me, claimed_until = :until, last_attempt_at = :now "
                   "WHERE id = :id", {"me": self.me, "until": now + self.config.lease, "now": now, "id": row[0]})
            pending = tx.rows("SELECT address FROM queue_recipients WHERE queue_id = :id AND state = 'pending' "
                              "ORDER BY position", {"id": row[0]})
        return _Claimed(str(row[0]), str(row[1]), str(row[2]), row[3], bytes(row[4]), row[5], float(row[6]),
                        int(row[7]), (row[8], row[9], row[10]), tuple(str(r[0]) for r in pending))

    def _attempt(self, claimed: _Claimed, report: RunReport) -> None:
        from .relay import RecipientReply, RelayError

        outcomes: dict[str, tuple[str, int | None, str]] = {}
        error = ""
        try:
            result = self._send(claimed)
        except RelayError as exc:
            error = str(exc)
            state = "pending" if exc.temporary else "failed"
            outcomes = {address: (state, exc.code, error) for address in claimed.pending}
        except _Undeliverable as exc:
            error = str(exc)
            outcomes = {address: ("failed", None, error) for address in claimed.pending}
        else:
            crash_point("runner:after-data")
            for address in result.accepted:
                outcomes[address] = ("delivered", result.code, result.text)
            replies: tuple[RecipientReply, ...] = result.deferred + result.refused
            for reply in replies:
                state = "failed" if 500 <= reply.code < 600 else "pending"
                outcomes[reply.address] = (state, reply.code, reply.text)
                error = f"{reply.code} {reply.text}"
        self._record(claimed, outcomes, error, report)

    def _send(self, claimed: _Claimed) -> RelayResult:
        from .message import MessageError, parse

        try:
            message = parse(claimed.data, ignore_dots=True, max_header_size=None)  # bounded when it was accepted
            sender = NULL_SENDER if not claimed.sender else parse_mailbox(claimed.sender)
            recipients = tuple(parse_mailbox(address) for address in claimed.pending)
        except (MessageError, AddressError) as exc:  # the queue was written by us; treat damage as final
            raise _Undeliverable(f"the queued message cannot be read back ({exc})") from None
        envelope = Envelope(sender, recipients, *claimed.dsn)
        return self.upstream.send(envelope, message, all_or_nothing=False)

    def _record(self, claimed: _Claimed, outcomes: dict[str, tuple[str, int | None, str]], error: str,
                report: RunReport) -> None:
        from .bounce import delivery_report

        with self.ledger.transaction(write=True) as tx:
            now = self.ledger.now(tx)
            expired = now >= claimed.created_at + self.config.max_age
            for address, (state, code, reply) in outcomes.items():
                if state == "pending" and expired:
                    state, reply = "failed", f"gave up after {_days(self.config.max_age)}; last error: {reply}"
                tx.run("UPDATE queue_recipients SET state = :state, code = :code, reply = :reply, updated_at = :now "
                       "WHERE queue_id = :id AND address = :address AND state = 'pending'",
                       {"state": state, "code": code, "reply": reply[:1000], "now": now, "id": claimed.id,
                        "address": address})
            states = {str(r[0]): str(r[1]) for r in
                      tx.rows("SELECT address, state FROM queue_recipients WHERE queue_id = :id", {"id": claimed.id})}
            report.delivered += sum(1 for s, *_ in outcomes.values() if s == "delivered")
            pending = [a for a, s in states.items() if s == "pending"]
            if pending:
                report.deferred += len(pending)
                tx.run("UPDATE queue_messages SET attempts = attempts + 1, next_attempt_at = :next, "
                       "claimed_by = NULL, claimed_until = NULL, last_error = :error WHERE id = :id",
                       {"next": now + backoff(claimed.attempts + 1, self.config), "error": error[:1000],
                        "id": claimed.id})
                return
            failed = sorted(a for a, s in states.items() if s == "failed")
            report.failed += len([a for a in failed if a in outcomes])
            tx.run("UPDATE queue_messages SET state = 'done', attempts = attempts + 1, finished_at = :now, "
                   "claimed_by = NULL, claimed_until = NULL, last_error = :error WHERE id = :id",
                   {"now": now, "error": error[:1000] or None, "id": claimed.id})
            if claimed.send_id is not None:
                anyone = any(s == "delivered" for s in states.values())
                self.ledger.settle_in(tx, claimed.send_id, "sent" if anyone else "released")
            if failed and claimed.kind == "message" and claimed.sender:
                replies = {a: str(r[0] or "") for a, *r in
                           tx.rows("SELECT address, reply FROM queue_recipients WHERE queue_id = :id "
                                   "AND state = 'failed'", {"id": claimed.id})}
                bounce = delivery_report(claimed.sender, claimed.data, replies, hostname=self.hostname,
                                         arrived=claimed.created_at)
                _insert_bounce(tx, claimed.sender, bounce, now)
                report.bounces += 1


class _Undeliverable(Exception):
    pass


def _insert_bounce(tx: Any, recipient: str, data: bytes, now: float) -> None:
    """A bounce is queued like any message, with the null sender and no ledger row (it counts nowhere)."""
    from .message import parse

    bounce_id = new_id()
    message_id = parse(data, ignore_dots=True).message_id
    tx.run(
        "INSERT INTO queue_messages (id, kind, state, sender, message_id, data, created_at, attempts, "
        "next_attempt_at) VALUES (:id, 'bounce', 'queued', '', :mid, :data, :now, 0, :now)",
        {"id": bounce_id, "mid": message_id, "data": data, "now": now},
    )
    tx.run("INSERT INTO queue_recipients (queue_id, address, position, state, updated_at) "
           "VALUES (:id, :a, 0, 'pending', :now)", {"id": bounce_id, "a": recipient, "now": now})


def _days(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:g} days" if days >= 1 else f"{seconds / 3600:g} hours"
