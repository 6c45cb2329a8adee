"""The durable queue: messages the upstream could not take yet.

A message enters the queue only after a temporary failure (the upstream was
unreachable, answered 4xx or 421, or failed TLS), or when the upstream has not
yet answered its final dot (see "The reply to the final dot" below). It is committed in the same
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
``kind``           ``message`` (a site's mail), ``bounce`` (our delivery report) or
                   ``notice`` (``notify.py``: never counted, never bounced)
``state``          ``queued`` (waiting, or being tried), ``awaiting_reply``,
                   ``uncertain``, ``held`` or ``done`` (see below)
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
``unconfirmed``    how many attempts sent the final dot and got no reply (0005_unconfirmed)
=================  =================================================================

The reply to the final dot. Once the whole message and its final dot are sent,
the upstream may have it even when no reply comes, so such an attempt is never
an ordinary retry. When the synchronous path's ``[upstream] sync_timeout``
runs out while the reply is awaited, the message is committed here first and
the caller gets exit 0: as ``awaiting_reply`` when the gate goes on waiting
(up to ``dot_timeout`` after the dot; its lease in ``claimed_until`` covers
that wait), as ``uncertain`` when ``sendmail`` ran in-process and must exit.
The late reply settles it: 250 done, 5xx bounced, 4xx an ordinary retry; no
reply, ``uncertain``. An ``uncertain`` message is retried once more after
the longest backoff step (``[queue] max_backoff``); if that attempt too goes
unanswered after its dot, it becomes ``held``: never sent again, kept for the
admin (``queue show``, ``queue delete``). So a message reaches its recipients
at most twice, with the same Message-ID. A gate that dies while it waits
leaves an ``awaiting_reply`` lease that runs out; a runner then takes the
message as ``uncertain``.

``queue_recipients``, one row per envelope recipient: ``queue_id``, ``address``,
``position`` (the envelope's order), ``state`` (``pending`` → ``delivered`` or ``failed``; never back), ``code``,
``reply``, ``updated_at``. A recipient once delivered is never sent again; a
runner that dies after the upstream's 250 but before recording it may send one
duplicate to the recipients of that transaction, with the same Message-ID.

Ledger counting: a queued message counts against the limits (it will be sent);
when it is done it is settled ``sent`` if anyone got it, ``released`` if nobody did;
a ``held`` one is settled ``sent`` (it most likely arrived).
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

from . import maillog
from .addresses import AddressError, parse_mailbox
from .envelope import NULL_SENDER, Envelope

if TYPE_CHECKING:
    from .config import LogConfig, QueueConfig
    from .ledger import Ledger, Reservation
    from .message import Message
    from .relay import RelayResult, Upstream

CRASH_ENV = "SENDMAIL_SHIM_CRASH_AT"  # fault injection for the crash-safety tests
WAITING = ("queued", "awaiting_reply", "uncertain")  # states a runner may still send
UNCONFIRMED_LIMIT = 2  # unanswered final dots after which a message is held, never sent again
REPLY_LEASE_MARGIN = 60.0  # an awaiting_reply lease outlasts the wait for the reply by this much


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
    unconfirmed: int = 0  # attempts whose final dot got no reply

    def as_dict(self) -> dict[str, Any]:
        from .ledger import iso_utc

        return {
            "id": self.id, "kind": self.kind, "state": self.state, "sender": self.sender,
            "account": self.account, "customer": self.customer_id, "message_id": self.message_id,
            "created_at": iso_utc(self.created_at), "attempts": self.attempts,
            "next_attempt_at": iso_utc(self.next_attempt_at), "last_error": self.last_error, "size": self.size,
            "unconfirmed": self.unconfirmed,
            "recipients": [{"address": r.address, "state": r.state, "code": r.code, "reply": r.reply}
                           for r in self.recipients],
        }


def uncertain_backoff(config: QueueConfig) -> float:
    """The wait before the one retry of a message the upstream may already have: the longest step."""
    return float(config.max_backoff)


def backoff(attempts: int, config: QueueConfig) -> float:
    """Seconds to wait after the given number of failed attempts: doubling, jittered, bounded."""
    base = min(float(config.max_backoff), config.min_backoff * 2.0 ** max(attempts - 1, 0))
    return min(float(config.max_backoff), base * random.uniform(1.0, 1.25))


def new_id() -> str:
    return "q" + os.urandom(10).hex()


# --------------------------------------------------------------------------- entering the queue


def enqueue(ledger: Ledger, config: QueueConfig, *, reservation: Reservation | None, envelope: Envelope,
            message: Message, error: str, delivered: Sequence[str] = (), kind: str = "message",
            state: str = "queued", reply_wait: float = 0.0, attempted: bool = True) -> str:
    """Commit the message (and its reservation's new state) in one transaction; return its id.

    ``attempted`` False: nobody has tried it yet (a notice), so it is due at once.

    ``state`` ``awaiting_reply``: the final dot was sent and a reply is awaited for up to
    ``reply_wait`` seconds more; ``uncertain``: it was sent and no reply will be awaited.
    """
    queue_id = new_id()
    data = message.as_bytes()
    unconfirmed = 0 if state == "queued" else 1
    with ledger.transaction(write=True) as tx:
        now = ledger.now(tx)
        wait = uncertain_backoff(config) if unconfirmed else backoff(1, config) if attempted else 0.0
        lease = now + reply_wait + REPLY_LEASE_MARGIN if state == "awaiting_reply" else None
        tx.run(
            "INSERT INTO queue_messages (id, kind, state, send_id, account, customer_id, sender, message_id, "
            "data, dsn_notify, dsn_ret, dsn_envid, created_at, attempts, next_attempt_at, last_attempt_at, "
            "last_error, unconfirmed, claimed_by, claimed_until) VALUES (:id, :kind, :state, :send, :account, "
            ":customer, :sender, :mid, :data, :notify, :ret, :envid, :now, :attempts, :next, :last, :error, "
            ":unconfirmed, :claimer, :lease)",
            {"id": queue_id, "kind": kind, "state": state, "send": reservation.id if reservation else None,
             "account": reservation.account if reservation else None,
             "customer": reservation.customer_id if reservation else None,
             "sender": envelope.mail_from, "mid": message.message_id, "data": data,
             "notify": envelope.dsn_notify, "ret": envelope.dsn_ret, "envid": envelope.dsn_envid,
             "now": now, "next": now + wait, "error": error[:1000] or None, "unconfirmed": unconfirmed,
             "attempts": int(attempted), "last": now if attempted else None,
             "claimer": f"reply-wait:{socket.gethostname()}:{os.getpid()}" if lease else None, "lease": lease},
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
            "next_attempt_at, last_error, length(data), unconfirmed")


def _entry(row: Sequence[Any], recipients: tuple[RecipientState, ...] = ()) -> QueuedMessage:
    return QueuedMessage(str(row[0]), str(row[1]), str(row[2]), str(row[3]), row[4], row[5], row[6],
                         float(row[7]), int(row[8]), float(row[9]), row[10], int(row[11] or 0), recipients,
                         int(row[12] or 0))


def _recipients(tx: Any, queue_id: str) -> tuple[RecipientState, ...]:
    rows = tx.rows("SELECT address, state, code, reply FROM queue_recipients WHERE queue_id = :id "
                   "ORDER BY position", {"id": queue_id})
    return tuple(RecipientState(str(r[0]), str(r[1]), r[2], r[3]) for r in rows)


def list_queue(ledger: Ledger, *, include_done: bool = False) -> list[QueuedMessage]:
    where = "" if include_done else "WHERE state <> 'done' "
    with ledger.transaction(write=False) as tx:
        rows = tx.rows(f"SELECT {_COLUMNS} FROM queue_messages {where}ORDER BY created_at, id")
        return [_entry(row, _recipients(tx, str(row[0]))) for row in rows]


QUEUE_STATES = ("queued", "awaiting_reply", "uncertain", "held")  # every state but done


@dataclass(frozen=True)
class QueueSummary:
    """How many messages wait in each state, and since when the oldest one that may still be sent waits."""

    messages: dict[str, int]
    oldest_waiting_at: float | None  # created_at of the oldest message in a WAITING state; None: none waits


def summary(ledger: Ledger) -> QueueSummary:
    """The queue in one grouped read (the ``queue_due`` index covers the state)."""
    with ledger.transaction(write=False) as tx:
        rows = tx.rows("SELECT state, count(*), min(created_at) FROM queue_messages WHERE state <> 'done' "
                       "GROUP BY state")
    messages = dict.fromkeys(QUEUE_STATES, 0)
    oldest: float | None = None
    for state, count, first in rows:
        messages[str(state)] = int(count)
        if state in WAITING and first is not None:
            oldest = float(first) if oldest is None else min(oldest, float(first))
    return QueueSummary(messages, oldest)


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
        if send and send[0][0] is not None and entry.state in WAITING:
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
    uncertain: int = 0  # messages whose final dot went unanswered in this run
    held: int = 0  # of those, the ones that will not be sent again
    ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"messages": self.messages, "delivered": self.delivered, "deferred": self.deferred,
                "failed": self.failed, "bounces": self.bounces, "uncertain": self.uncertain, "held": self.held}


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
    unconfirmed: int = 0


Outcomes = dict[str, tuple[str, "int | None", str]]  # recipient -> (state, code, reply)

_CLAIM_COLUMNS = ("id, kind, sender, send_id, data, message_id, created_at, attempts, dsn_notify, dsn_ret, "
                  "dsn_envid, unconfirmed")


def _claimed(tx: Any, row: Sequence[Any]) -> _Claimed:
    pending = tx.rows("SELECT address FROM queue_recipients WHERE queue_id = :id AND state = 'pending' "
                      "ORDER BY position", {"id": row[0]})
    return _Claimed(str(row[0]), str(row[1]), str(row[2]), row[3], bytes(row[4]), row[5], float(row[6]),
                    int(row[7]), (row[8], row[9], row[10]), tuple(str(r[0]) for r in pending), int(row[11] or 0))


class Runner:
    """Delivers what is due, one claimed message at a time, so any number of runners can share a queue."""

    def __init__(self, ledger: Ledger, upstream: Upstream, config: QueueConfig, *, hostname: str | None = None,
                 now: bool = False, log: LogConfig | None = None) -> None:
        self.ledger, self.upstream, self.config = ledger, upstream, config
        self.hostname = hostname or socket.gethostname()
        self.ignore_backoff = now
        self.log = log
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

    def run_one(self, queue_id: str) -> str | None:
        """Try this one message now, whatever its backoff; its new state (None: another runner has it)."""
        claimed = self._claim(only=queue_id)
        if claimed is None:
            return None
        report = RunReport(messages=1, ids=[claimed.id])
        return self._attempt(claimed, report)

    def _claim(self, only: str | None = None) -> _Claimed | None:
        skip_locked = " FOR UPDATE SKIP LOCKED" if self.ledger.dialect == "postgresql" else ""
        due = ("(last_attempt_at IS NULL OR last_attempt_at < :started)" if self.ignore_backoff
               else "next_attempt_at <= :now")
        if only is not None:
            due = "id = :only"
        waiting = ", ".join(f"'{state}'" for state in WAITING)
        with self.ledger.transaction(write=True) as tx:
            now = self.ledger.now(tx)
            # An awaiting_reply message is taken only once its waiter's lease has run out.
            rows = tx.rows(
                f"SELECT {_CLAIM_COLUMNS} FROM queue_messages WHERE state IN ({waiting}) AND "
                f"(claimed_until IS NULL OR claimed_until < :now) AND {due} "
                f"ORDER BY next_attempt_at, created_at LIMIT 1{skip_locked}",
                {"now": now, "started": self.started, "only": only},
            )
            if not rows:
                return None
            tx.run("UPDATE queue_messages SET claimed_by = :me, claimed_until = :until, last_attempt_at = :now "
                   "WHERE id = :id", {"me": self.me, "until": now + self.config.lease, "now": now, "id": rows[0][0]})
            return _claimed(tx, rows[0])

    def _attempt(self, claimed: _Claimed, report: RunReport) -> str:
        """One delivery attempt, recorded; the message's new state."""
        from .relay import RelayError

        try:
            result = self._send(claimed)
        except RelayError as exc:
            outcomes, error = failure_outcomes(exc, claimed.pending)
            unconfirmed = claimed.unconfirmed + (1 if exc.uncertain else 0)
            return self._record(claimed, outcomes, error, report, unconfirmed=unconfirmed, unanswered=exc.uncertain)
        except _Undeliverable as exc:
            outcomes = {address: ("failed", None, str(exc)) for address in claimed.pending}
            return self._record(claimed, outcomes, str(exc), report)
        crash_point("runner:after-data")
        outcomes, error = result_outcomes(result)
        return self._record(claimed, outcomes, error, report)

    def finish_reply(self, queue_id: str, result: RelayResult | BaseException) -> str | None:
        """Settle an ``awaiting_reply`` message with the late reply to its final dot; its new state.

        ``result`` is the upstream's RelayResult or the RelayError that ended the wait. None
        when the message is no longer awaiting (an admin deleted it, or the lease ran out).
        """
        from .relay import RelayError

        with self.ledger.transaction(write=False) as tx:
            rows = tx.rows(f"SELECT {_CLAIM_COLUMNS} FROM queue_messages WHERE id = :id "
                           "AND state = 'awaiting_reply'", {"id": queue_id})
            if not rows:
                return None
            claimed = _claimed(tx, rows[0])
        report = RunReport()
        if isinstance(result, RelayError):
            outcomes, error = failure_outcomes(result, claimed.pending)
            # The wait was this attempt's: unanswered, it stays at one; refused, nothing was delivered.
            unconfirmed = 1 if result.uncertain else 0
            return self._record(claimed, outcomes, error, report, unconfirmed=unconfirmed,
                                unanswered=result.uncertain, counted=False)
        if isinstance(result, BaseException):
            raise result
        outcomes, error = result_outcomes(result)
        return self._record(claimed, outcomes, error, report, counted=False)

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

    def _record(self, claimed: _Claimed, outcomes: Outcomes, error: str, report: RunReport, *,
                unconfirmed: int | None = None, unanswered: bool = False, counted: bool = True) -> str:
        """Write what the attempt did; return the message's new state.

        ``unconfirmed``: the message's count of unanswered final dots after this attempt;
        ``unanswered``: this attempt's was one; ``counted``: this is a new attempt.
        """
        unconfirmed = claimed.unconfirmed if unconfirmed is None else unconfirmed
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
            report.uncertain += 1 if unanswered else 0
            pending = [a for a, s in states.items() if s == "pending"]
            if pending:
                report.deferred += len(pending)
                state = self._still_waiting(tx, claimed, now, error, unconfirmed, unanswered, counted)
                report.held += 1 if state == "held" else 0
            else:
                state = self._done(tx, claimed, states, outcomes, now, error, report, counted)
        self._log(claimed, state, error, outcomes)
        return state

    def _still_waiting(self, tx: Any, claimed: _Claimed, now: float, error: str, unconfirmed: int,
                       unanswered: bool, counted: bool) -> str:
        """Some recipients are still pending: queued, uncertain, or held for good."""
        if unconfirmed >= UNCONFIRMED_LIMIT:
            state = "held"
            error = (f"held, not sent again: {unconfirmed} attempts sent the whole message and got no reply "
                     f"to the end of data, so the recipients may already have it (last: {error}); "
                     f"sendmail-shim queue delete {claimed.id} once checked")
            if claimed.send_id is not None:
                self.ledger.settle_in(tx, claimed.send_id, "sent")  # it most likely arrived
        elif unconfirmed:
            state = "uncertain"
        else:
            state = "queued"
        wait = uncertain_backoff(self.config) if unanswered else backoff(claimed.attempts + 1, self.config)
        tx.run("UPDATE queue_messages SET state = :state, attempts = attempts + :counted, next_attempt_at = :next, "
               "claimed_by = NULL, claimed_until = NULL, last_error = :error, unconfirmed = :unconfirmed "
               "WHERE id = :id", {"state": state, "counted": int(counted), "next": now + wait,
                                  "error": error[:1000], "unconfirmed": unconfirmed, "id": claimed.id})
        return state

    def _done(self, tx: Any, claimed: _Claimed, states: dict[str, str], outcomes: Outcomes, now: float,
              error: str, report: RunReport, counted: bool) -> str:
        """Every recipient is delivered or failed: settle, and bounce the failed ones."""
        from .bounce import delivery_report

        failed = sorted(a for a, s in states.items() if s == "failed")
        report.failed += len([a for a in failed if a in outcomes])
        tx.run("UPDATE queue_messages SET state = 'done', attempts = attempts + :counted, finished_at = :now, "
               "claimed_by = NULL, claimed_until = NULL, last_error = :error WHERE id = :id",
               {"counted": int(counted), "now": now, "error": error[:1000] or None, "id": claimed.id})
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
        return "done"

    def _log(self, claimed: _Claimed, state: str, error: str, outcomes: Outcomes) -> None:
        if self.log is None:
            return
        delivered = sum(1 for s, *_ in outcomes.values() if s == "delivered")
        fields: dict[str, object] = {"event": "queue-attempt", "queue": claimed.id, "msgid": claimed.message_id,
                                     "state": state, "delivered": delivered}
        if claimed.kind != "message":  # a bounce or a notice: never bounced itself
            fields["kind"] = claimed.kind
        failed = sum(1 for s, *_ in outcomes.values() if s == "failed")
        if failed:
            fields["failed"] = failed
        if error:
            fields["reason"] = error
        maillog.write(self.log, fields, "warning" if state in ("held", "uncertain") else "info")


def failure_outcomes(exc: Any, pending: Sequence[str]) -> tuple[Outcomes, str]:
    """Each pending recipient's state after a RelayError; after an unanswered dot, RCPT's own refusals stand."""
    error = str(exc)
    state = "pending" if exc.temporary else "failed"
    outcomes: Outcomes = {address: (state, exc.code, error) for address in pending}
    if exc.uncertain:
        for reply in exc.result.refused:
            outcomes[reply.address] = ("failed", reply.code, reply.text)
    return outcomes, error


def result_outcomes(result: RelayResult) -> tuple[Outcomes, str]:
    """Each recipient's state after the upstream's reply, and the last refusal (if any) as the error."""
    outcomes: Outcomes = {}
    error = ""
    for address in result.accepted:
        outcomes[address] = ("delivered", result.code, result.text)
    for reply in result.deferred + result.refused:
        state = "failed" if 500 <= reply.code < 600 else "pending"
        outcomes[reply.address] = (state, reply.code, reply.text)
        error = f"{reply.code} {reply.text}"
    return outcomes, error


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
